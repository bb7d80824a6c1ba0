/* Scheduling (node_int.h): resources and GPUs, where each task or actor
 * creation goes — here, a joined node (placement: locality to its large
 * arguments, DEFAULT, SPREAD, node affinity, placement groups) or wait —
 * and leasing workers to the queue in order (td__sched).
 *
 * A head sees each node that joined it as one WK_NODE link with the node's
 * resources (cluster.c); it places tasks and actors there when they do not
 * fit here, spread, or ask for that node. Work a node's task submits that
 * would wait there while other nodes have room goes to the head too
 * (spillback, td__spills, at the end). */
#include <math.h>

#include "node_int.h"

int td_node_res_index(td_node_t *n, const char *name) {
  for (int i = 0; i < n->sched.nres; i++)
    if (!strcmp(n->sched.resname[i], name)) return i;
  if (n->sched.nres == TD_NRES_MAX || strlen(name) >= 32) return -1;
  snprintf(n->sched.resname[n->sched.nres], 32, "%s", name);
  n->sched.total[n->sched.nres] = n->sched.avail[n->sched.nres] = 0;
  return n->sched.nres++;
}

int td_node_res_count(td_node_t *n) { return n->sched.nres; }

const char *td_node_res_name(td_node_t *n, int i) { return n->sched.resname[i]; }

/* Cluster-wide: this node and every node joined to it. */
static double td__res_sum(td_node_t *n, int i, int avail) {
  double v = avail ? n->sched.avail[i] : n->sched.total[i];
  for (int k = 0; k < n->procs.n; k++) {
    td_wk_t *w = n->procs.list[k];
    if (w->kind == WK_NODE && w->joined && !w->dead) v += avail ? w->navail[i] : w->ntotal[i];
  }
  return v;
}

double td_node_res_total(td_node_t *n, int i) { return td__res_sum(n, i, 0); }

double td_node_res_avail(td_node_t *n, int i) { return td__res_sum(n, i, 1); }

/* Picks GPU ids for `amount` GPUs (whole GPUs, or a share of one). */
static int td__gpus_take(td_node_t *n, double amount, int *ids) {
  if (amount <= 0) return 0;
  int k = 0;
  if (amount < 1) {
    for (int g = 0; g < n->sched.ngpus; g++)
      if (n->sched.gpu_free[g] + 1e-9 >= amount) {
        n->sched.gpu_free[g] -= amount;
        ids[0] = g;
        return 1;
      }
    return 0;
  }
  for (int g = 0; g < n->sched.ngpus && k < (int)amount && k < 16; g++)
    if (n->sched.gpu_free[g] >= 1 - 1e-9) {
      n->sched.gpu_free[g] = 0;
      ids[k++] = g;
    }
  return k;
}

void td__gpus_give(td_node_t *n, double amount, const int *ids, int k) {
  for (int i = 0; i < k; i++) n->sched.gpu_free[ids[i]] += amount < 1 ? amount : 1;
}

double td__task_gpus(const td_task_t *t) {
  for (int i = 0; i < t->nres; i++)
    if (t->res_idx[i] == TD_RES_GPU) return t->res_amt[i];
  return 0;
}

/* Whether node link x sent t here (it had no room for it). */
static int td__origin(const td_task_t *t, const td_wk_t *x) {
  return t->origin && t->origin == x->node_index + 1;
}

/* Whether x says it has the CPUs and GPUs t asks for free, its own work
 * counted (its last heartbeat; a node that has not said: yes). */
static int td__fits_free(const td_wk_t *x, const td_task_t *t) {
  for (int i = 0; i < t->nres; i++) {
    int r = t->res_idx[i];
    if ((r == TD_RES_CPU || r == TD_RES_GPU) && x->nfree[r] >= 0 && t->res_amt[i] > x->nfree[r] + 1e-9)
      return 0;
  }
  return 1;
}

/* Where a task or actor creation goes: 0 here, 1 to *out, 2 wait, 3 fail
 * (hard affinity to a node that is not there). *hold: the node has room
 * now, so the head holds the resources there; otherwise the task was
 * asked to go there and waits in that node's queue. */
static int td__place(td_node_t *n, td_task_t *t, int bundle, int local_fits, td_wk_t **out, int *hold,
                     char *why, size_t whylen) {
  *out = NULL;
  *hold = 1;
  uint8_t st = t->spec.strategy;
  if (t->spec.pg_id) {
    /* Where its bundle is; local_fits says whether the bundle has room. */
    td_pg_t *pg = td__pg(n, t->spec.pg_id);
    if (!pg || !pg->where || bundle < 0 || bundle >= pg->nb || pg->where[bundle] == n->links.index) return 0;
    if (pg->where[bundle] == TD__NOWHERE) return 2;  /* being placed again */
    td_wk_t *w = td__link(n, pg->where[bundle]);
    if (!w) {
      snprintf(why, whylen, "node-%u, which held bundle %d of its placement group, died", pg->where[bundle],
               bundle + 1);
      return 3;
    }
    if (!local_fits) return 2;
    *out = w;
    *hold = 2;
    return 1;
  }
  td_wk_t *w = NULL;
  if (st == TD_ST_NODE || st == TD_ST_NODE_SOFT) {
    if (t->spec.node == n->links.index) {
      if (local_fits || st == TD_ST_NODE) return 0;
    } else if ((w = td__link(n, t->spec.node)) != NULL) {
      if (!td__fits(w->ntotal, t) && st == TD_ST_NODE_SOFT) w = NULL;  /* never fits there */
    } else if (st == TD_ST_NODE) {
      snprintf(why, whylen, "no alive node node-%u for a hard node affinity", t->spec.node);
      return 3;
    }
  } else if (st == TD_ST_SPREAD && n->links.nlinks) {
    /* Round robin over the nodes, this one as number 0, from the one after
     * the node chosen last: the first with room for it now; when none has
     * room, the next that can ever run it takes its turn, and the task
     * waits there (in that node's queue, or here in this one's) for it.
     * The choice sticks: a task that waits here is not placed again on
     * the next pass (before, a task whose turn fell on the busy head drew
     * again on every pass while those that drew a node were queued there
     * at once, so 8 tasks on two nodes went 1 and 7). */
    if (t->spread_to) {
      if (t->spread_to - 1 == n->links.index) return 0;
      if ((w = td__link(n, t->spread_to - 1)) != NULL && td__fits(w->ntotal, t)) {
        *hold = td__fits(w->navail, t);
        *out = w;
        return 1;
      }
      t->spread_to = 0;  /* its node died: choose again */
    }
    int k = n->links.nlinks + 1;
    td_wk_t *links[k];
    memset(links, 0, sizeof(links));
    for (int i = 0, seen = 1; i < n->procs.n && seen < k; i++) {
      td_wk_t *x = n->procs.list[i];
      if (x->kind == WK_NODE && x->joined && !x->dead) links[seen++] = x;
    }
    for (int pass = 0; pass < 2; pass++) {  /* room now; then room ever */
      for (int j = 0; j < k; j++) {
        int c = (int)((n->sched.spread + (uint32_t)j) % (uint32_t)k);
        int fits = c == 0 ? (pass ? td__fits(n->sched.total, t) : local_fits)
                          : links[c] && td__fits(pass ? links[c]->ntotal : links[c]->navail, t);
        if (!fits) continue;
        n->sched.spread = (uint32_t)c + 1;
        t->spread_to = 1 + (c == 0 ? n->links.index : links[c]->node_index);
        if (c == 0) return 0;
        *hold = !pass;
        *out = links[c];
        return 1;
      }
    }
    return 2;  /* nowhere, for now */
  }
  if (w) {
    *hold = td__fits(w->navail, t);
    *out = w;
    return 1;
  }
  if (st == TD_ST_DEFAULT && t->has_away && (w = td__away_home(n, t)) != NULL) {
    *out = w;  /* where its large arguments are, and it fits now */
    return 1;
  }
  if (local_fits || !n->links.nlinks) return 0;
  /* Spill to the node with the most free CPU where it fits now. Work a node
   * sent here for want of room there (its origin) goes to another node
   * first, and back to that one only once it says it has room: until then
   * it waits here, where any node that frees up can take it. */
  for (int i = 0; i < n->procs.n; i++) {
    td_wk_t *x = n->procs.list[i];
    if (x->kind != WK_NODE || !x->joined || x->dead || !td__fits(x->navail, t)) continue;
    int home = td__origin(t, x);
    if (home && !td__fits_free(x, t)) continue;
    if (!w || home < td__origin(t, w) ||
        (home == td__origin(t, w) && x->navail[TD_RES_CPU] > w->navail[TD_RES_CPU]))
      w = x;
  }
  if (!w && t->spec.kind == TD_K_TASK && !td__fits(n->sched.total, t)) {
    /* Nowhere free, and this node can never run it: a task known to be
     * short queues at the least busy node that can, as local tasks
     * pipeline behind a leased worker. */
    td_fnstat_t *fs = td_map_get(&n->sched.fnstats, t->spec.fn_id);
    for (int i = 0; fs && fs->avg < TD_SHORT_TASK && i < n->procs.n; i++) {
      td_wk_t *x = n->procs.list[i];
      if (x->kind != WK_NODE || !x->joined || x->dead || !td__fits(x->ntotal, t) || td__origin(t, x))
        continue;
      double cap = TD_PIPELINE * (x->ntotal[TD_RES_CPU] > 1 ? x->ntotal[TD_RES_CPU] : 1);
      if (x->inflight.len < cap && (!w || x->inflight.len < w->inflight.len)) w = x;
    }
    *hold = 0;
  }
  *out = w;
  return w ? 1 : 0;
}

static int td__task_workers(td_node_t *n, int *idle_out, td_wk_t **idle) {
  int count = 0, blocked = 0;
  *idle = NULL;
  *idle_out = 0;
  for (int i = 0; i < n->procs.n; i++) {
    td_wk_t *w = n->procs.list[i];
    if (w->dead || w->kind != WK_TASK) continue;
    count++;
    if (w->blocked) blocked++;
    if (!w->leased && !w->inflight.len) { (*idle_out)++; if (!*idle) *idle = w; }
  }
  return count - blocked;
}

static int td__same_shape(td_wk_t *w, td_task_t *t, int bundle) {
  if (w->lease_pg != t->spec.pg_id || w->lease_bundle != bundle) return 0;
  double shape[TD_NRES_MAX] = {0};
  for (int i = 0; i < t->nres; i++) shape[t->res_idx[i]] += t->res_amt[i];
  return !memcmp(shape, w->lease, sizeof(shape));
}

/* Sends an actor's creation to its host (a process here, or a node link)
 * and then the calls waiting for it. */
static void td__actor_start(td_node_t *n, td_actor_t *a, td_wk_t *host) {
  td_task_t *t = a->create;
  a->host = host;
  host->nactors++;
  a->state = A_ALIVE;
  td__persist_actor_up(a);  /* detached ones only */
  td__send_task(n, host, t);
  /* The creation is not in flight as a call: it stays with the actor. */
  td__inflight_del(n, host, t);
  t->state = T_SENT;
  td__actor_pump(n, a);
}

/* What one pass of the scheduler did with a queued task: placed it (the
 * pass goes on as if from the start), missed it (256 misses in a row end
 * the pass), or passed it by without counting. */
enum { SCHED_PLACED, SCHED_MISSED, SCHED_PASSED };

/* Placed by td__place on a link (where 1), or infeasible (where 3). */
static void td__sched_placed(td_node_t *n, td_task_t *t, int where, double *pool, int bundle, td_wk_t *to,
                             int hold, const char *why) {
  tq_del(&n->sched.queue, t);
  if (where == 3 && t->spec.kind == TD_K_TASK) {
    td__task_fail(n, t, "TaskError", why);
  } else if (where == 3) {
    t->state = T_SENT;
    td__actor_die(n, t->actor, why);
  } else if (t->spec.kind == TD_K_TASK) {
    if (hold) td__take(hold == 2 ? pool : to->navail, t, 1);
    t->node_held = (uint8_t)hold;
    t->held_bundle = bundle;
    td__send_task(n, to, t);
  } else {
    td_actor_t *a = t->actor;
    if (hold) td__take(hold == 2 ? pool : to->navail, t, 1);
    a->res_node = hold == 1 ? to : NULL;
    a->res_held = hold == 1;
    a->pg_share = hold == 2 ? (uint32_t)bundle + 1 : 0;
    td__actor_start(n, a, to);
  }
}

/* An actor created here: its resources, its GPUs, a process to host it. */
static int td__sched_actor(td_node_t *n, td_task_t *t, double *pool, int bundle) {
  td_actor_t *a = t->actor;
  if (!pool || !td__fits(pool, t)) return SCHED_MISSED;
  int gpus[16];
  double g = td__task_gpus(t);
  int k = td__gpus_take(n, g, gpus);
  if (g > 0 && !k) return SCHED_MISSED;
  td__take(pool, t, 1);
  a->res_held = t->spec.pg_id == 0;
  a->pg_share = t->spec.pg_id ? (uint32_t)bundle + 1 : 0;
  memcpy(a->gpus, gpus, sizeof(int) * (size_t)k);
  a->ngpus = k;
  td_wk_t *host = td__pick_host(n, a);
  if (!host) {
    td__take(pool, t, -1);
    td__gpus_give(n, g, gpus, k);
    a->res_held = 0;
    a->pg_share = 0;
    return SCHED_MISSED;
  }
  tq_del(&n->sched.queue, t);
  td__actor_start(n, a, host);
  return SCHED_PASSED;
}

/* A task run here: leased to an idle task worker when it fits (one is
 * started if none is idle), else pipelined behind a leased worker of the
 * same shape. */
static int td__sched_task(td_node_t *n, td_task_t *t, double *pool, int bundle) {
  int nidle;
  td_wk_t *idle;
  int active = td__task_workers(n, &nidle, &idle);
  if (pool && td__fits(pool, t)) {
    int cap = (int)(n->sched.total[TD_RES_CPU] > 1 ? n->sched.total[TD_RES_CPU] : 1);
    if (!idle && active < 4 * cap + 8) idle = td__spawn(n, WK_TASK, NULL, 0);
    if (idle) {
      int gpus[16];
      double g = td__task_gpus(t);
      int k = td__gpus_take(n, g, gpus);
      if (!(g > 0 && !k)) {
        tq_del(&n->sched.queue, t);
        td__take(pool, t, 1);
        idle->leased = 1;
        memset(idle->lease, 0, sizeof(idle->lease));
        for (int i = 0; i < t->nres; i++) idle->lease[t->res_idx[i]] += t->res_amt[i];
        idle->lease_pg = t->spec.pg_id;
        idle->lease_bundle = bundle;
        memcpy(idle->gpus, gpus, sizeof(int) * (size_t)k);
        idle->ngpus = k;
        td__send_task(n, idle, t);
        return SCHED_PLACED;
      }
    }
  }
  td_wk_t *best = NULL;
  for (int i = 0; i < n->procs.n; i++) {
    td_wk_t *w = n->procs.list[i];
    if (w->dead || w->kind != WK_TASK || !w->leased || w->blocked) continue;
    if (w->inflight.len >= TD_PIPELINE || w->nslow || !td__same_shape(w, t, bundle)) continue;
    if (!best || w->inflight.len < best->inflight.len) best = w;
  }
  if (!best) return SCHED_MISSED;
  tq_del(&n->sched.queue, t);
  td__send_task(n, best, t);
  return SCHED_PLACED;
}

static int td__sched_one(td_node_t *n, td_task_t *t) {
  int bundle;
  double *pool = td__pool(n, t, &bundle);
  td_wk_t *to;
  int hold;
  char why[200];
  if (t->restored && td_now() < n->actors.adopt_until) return SCHED_MISSED;
  if (t->restored && td__restored_gone(n, t)) return SCHED_PASSED;
  if (t->has_away && td__away_wait(n, t, 0)) { /* an argument is being made again */
    tq_del(&n->sched.queue, t);
    t->state = T_WAITDEPS;
    return SCHED_PASSED;
  }
  int where = td__place(n, t, bundle, pool && td__fits(pool, t), &to, &hold, why, sizeof(why));
  if (where == 3 || where == 1) {
    td__sched_placed(n, t, where, pool, bundle, to, hold, why);
    return SCHED_PLACED;
  }
  if (where == 2) return SCHED_MISSED;
  if (t->has_away && td__away_wait(n, t, 1)) { /* to run here: its arguments come here first */
    tq_del(&n->sched.queue, t);
    t->state = T_WAITDEPS;
    return SCHED_PASSED;
  }
  if (t->spec.kind == TD_K_ACTOR_NEW) return td__sched_actor(n, t, pool, bundle);
  return td__sched_task(n, t, pool, bundle);
}

/* One pass over the queue, oldest first: each task is placed on a link,
 * failed, started here, or left for a later pass. */
void td__sched(td_node_t *n) {
  for (td_pg_t *pg = n->pgs.list; pg; pg = pg->next) td__try_pg(n, pg);
  int misses = 0;
  for (td_task_t *t = n->sched.queue.head, *next; t && misses < 256; t = next) {
    next = t->next;
    int r = td__sched_one(n, t);
    if (r == SCHED_PLACED) misses = 0;
    else if (r == SCHED_MISSED) misses++;
  }
}

/* -- Spillback: free CPUs and GPUs across the cluster (TD_M_ROOM) ------------ */

/* The CPUs and GPUs spec s asks for (1 CPU unless it says otherwise), in
 * want; 1 when it also asks for another resource. */
static int td__cpu_gpu(const td_spec_t *s, double want[2]) {
  int other = 0;
  want[TD_RES_CPU] = 1, want[TD_RES_GPU] = 0;
  for (uint32_t i = 0; i < s->nres; i++) {
    int r = !strcmp(s->res_name[i], "CPU") ? TD_RES_CPU : !strcmp(s->res_name[i], "GPU") ? TD_RES_GPU : -1;
    if (r >= 0) want[r] = s->res_amt[i];
    else other |= s->res_amt[i] > 0;
  }
  return other;
}

/* Head: node link wk sent a plain task here, so it had no room for that
 * task's CPUs or GPUs just now, whatever it said before (TD_M_ROOM): its
 * next word on it counts. */
void td__node_full(td_wk_t *wk, const td_spec_t *s) {
  double want[2];
  td__cpu_gpu(s, want);
  for (int r = 0; r < 2; r++)
    if (want[r] > 0) wk->nfree[r] = 0;
}

/* Node: a plain task that would wait here for CPUs or GPUs while the rest
 * of the cluster has them free (as the head last said: TD_M_ROOM) goes to
 * the head, which places it there: work a task submits spreads over the
 * cluster, as Ray's spillback does, instead of queueing on the node that
 * submitted it. A function not known to be long goes as far as that room;
 * of a burst of one known to be long (50 ms), each task goes where it
 * would wait less: here, behind the work running and queued, or there,
 * behind what this node sent since the head last said (room_used).
 * Custom resources, placement, streams, tide.data's pipelined tasks and
 * tasks known to be short stay. */
#define TD__LONG_TASK 0.05 /* s: a function whose tasks take this long spills beyond the room */

int td__spills(td_node_t *n, const td_spec_t *s) {
  if (s->kind != TD_K_TASK || s->nret < 0 || s->pipeline || s->strategy != TD_ST_DEFAULT || s->pg_id ||
      !n->links.head || n->links.head->dead)
    return 0;
  /* A function whose tasks are known to be short (2 ms) stays: they
   * pipeline behind the workers here sooner than a trip through the head.
   * One not known yet goes only as far as the room there. */
  td_fnstat_t *fs = td_map_get(&n->sched.fnstats, s->fn_id);
  if (fs && fs->avg < TD_SHORT_TASK) return 0;
  int known_long = fs && fs->avg >= TD__LONG_TASK;
  double want[2];
  if (td__cpu_gpu(s, want)) return 0;
  int fits = 1;
  double wait_here = 0, wait_there = 0; /* in turns of the resource's whole amount */
  for (int r = 0; r < 2; r++) {
    if (want[r] <= 0) continue;
    if (want[r] > n->links.room[r] + 1e-9) return 0; /* no node has it free */
    fits &= want[r] <= n->sched.avail[r] + 1e-9;
    double total = n->sched.total[r], queued = (double)n->sched.queue.len * want[r];
    double here = total > 0 ? (total - n->sched.avail[r] + queued) / total : HUGE_VAL;
    double there = (n->links.room_used[r] + want[r]) / n->links.room[r];
    if (there > 1 + 1e-9 && !known_long) return 0;
    if (here > wait_here) wait_here = here;
    if (there > wait_there) wait_there = there;
  }
  if (fits || wait_there > wait_here) return 0;
  for (int r = 0; r < 2; r++) n->links.room_used[r] += want[r];
  return 1;
}

/* Head: what of resource r (CPU or GPU) is free on the head and on every
 * node but `but`: on a node, the least of what the head placed there
 * leaves and what the node says is free with its own work counted. */
static double td__room_beside(td_node_t *n, const td_wk_t *but, int r) {
  double v = n->sched.avail[r];
  for (int i = 0; i < n->procs.n; i++) {
    const td_wk_t *x = n->procs.list[i];
    if (x == but || x->kind != WK_NODE || !x->joined || x->dead) continue;
    v += x->nfree[r] >= 0 && x->nfree[r] < x->navail[r] ? x->nfree[r] : x->navail[r];
  }
  return v;
}

/* What changed of the CPUs and GPUs free, at most every TD__ROOM_S (node.c):
 * a node tells its head what it has free, all its work counted; the head
 * tells each node what the rest of the cluster has (td__spills). */
void td__room_tick(td_node_t *n) {
  for (int i = 0; i < n->procs.n; i++) {
    td_wk_t *w = n->procs.list[i];
    if (w->dead || !(w == n->links.head || (w->kind == WK_NODE && w->joined))) continue;
    double v[2];
    for (int r = 0; r < 2; r++) v[r] = w == n->links.head ? n->sched.avail[r] : td__room_beside(n, w, r);
    if (v[0] == w->room_sent[0] && v[1] == w->room_sent[1]) continue;
    td_chan_begin(&w->ch, TD_M_ROOM);
    for (int r = 0; r < 2; r++) td_buf_f64(&w->ch.out, w->room_sent[r] = v[r]);
    td_chan_end(&w->ch);
  }
}

int td__on_room(td_node_t *n, td_wk_t *wk, td_rd_t *rd) {
  double v[2];
  for (int r = 0; r < 2; r++) v[r] = td_rd_f64(rd);
  if (rd->bad) return TD_EPROTO;
  for (int r = 0; r < 2; r++) {
    if (wk->kind == WK_NODE) wk->nfree[r] = v[r];
    else if (wk == n->links.head) n->links.room[r] = v[r], n->links.room_used[r] = 0;
  }
  return 0;
}
