/* Why is it stuck (node_int.h, node.h): a plain-words account of an
 * object that is not ready or a task that has not finished -- the task that
 * makes it, and where that task is: waiting for its arguments, queued for
 * a resource (which, how much is free, or infeasible), queued at its actor,
 * running on which node and worker for how long. `tide status --why` and
 * the hang warnings of tide.get / tide.wait print it; the node itself warns
 * once about each task that waited longer than TIDE_HANG_WARN_S to start.
 */
#include "node_int.h"

#include <signal.h>
#include <stdarg.h>

#define TD__WHY_SCAN 1.0   /* seconds between the node's scans for stuck tasks */
#define TD__WHY_WARN_MAX 5 /* tasks named per scan; the rest are counted */

/* A bounded text being written. */
typedef struct td_wb {
  char *p;
  size_t len, cap;
} td_wb_t;

static void __attribute__((format(printf, 2, 3))) td__wf(td_wb_t *b, const char *fmt, ...) {
  if (b->len + 1 >= b->cap) return;
  va_list ap;
  va_start(ap, fmt);
  int k = vsnprintf(b->p + b->len, b->cap - b->len, fmt, ap);
  va_end(ap);
  if (k > 0) b->len += (size_t)k < b->cap - b->len ? (size_t)k : b->cap - b->len - 1;
}

static const char *td__kind_word(const td_task_t *t) {
  return t->spec.kind == TD_K_ACTOR_CALL  ? "actor call"
         : t->spec.kind == TD_K_ACTOR_NEW ? "actor creation"
                                          : "task";
}

static void td__name(const td_task_t *t, td_wb_t *b) {
  const td_spec_t *s = &t->spec;
  if (s->kind == TD_K_ACTOR_CALL) {
    const char *an = t->actor && t->actor->create ? t->actor->create->spec.name : "";
    td__wf(b, "%s.%s", an[0] ? an : "actor", s->method);
  } else if (s->kind == TD_K_ACTOR_NEW) {
    td__wf(b, "%s.new", s->name[0] ? s->name : "actor");
  } else {
    td__wf(b, "%s", s->name[0] ? s->name : "task");
  }
}

/* "CPU=1, GPU=0.5" */
static void td__demand(td_node_t *n, const td_task_t *t, td_wb_t *b) {
  if (!t->nres) {
    td__wf(b, "nothing");
    return;
  }
  for (int i = 0; i < t->nres; i++)
    td__wf(b, "%s%s=%g", i ? ", " : "", n->sched.resname[t->res_idx[i]], t->res_amt[i]);
}

/* "CPU 0 of 2 free" for each resource t asks for, in pool (of total). */
static void td__free(td_node_t *n, const td_task_t *t, const double *pool, const double *total, td_wb_t *b) {
  for (int i = 0; i < t->nres; i++) {
    int r = t->res_idx[i];
    td__wf(b, "%s%s %g of %g free", i ? ", " : "", n->sched.resname[r], pool[r] > 0 ? pool[r] : 0, total[r]);
  }
}

static const char *td__actor_word(int st) {
  static const char *w[] = {"PENDING (not created yet)", "ALIVE", "RESTARTING", "DEAD"};
  return st >= 0 && st <= A_DEAD ? w[st] : "?";
}

static void td__task(td_node_t *n, td_task_t *t, td_wb_t *b, int depth, int stack, double now);

/* One line on an object: ready, failed, or what makes it. */
static void td__obj_line(td_node_t *n, uint64_t id, td_wb_t *b, int depth, int stack, double now) {
  td_obj_t *o = td__obj(n, id);
  if (!o) {
    td__wf(b, "object %016llx is not known on node-%u (freed, never made, or another node's)",
           (unsigned long long)id, n->links.index);
    return;
  }
  if (o->state == OBJ_READY) {
    td__wf(b, "object %016llx is ready (%zu bytes)", (unsigned long long)id, o->len);
    return;
  }
  if (o->state == OBJ_ERROR) {
    td__wf(b, "object %016llx failed: its task raised or could not run (get it to see the error)",
           (unsigned long long)id);
    return;
  }
  td__wf(b, "object %016llx is pending", (unsigned long long)id);
  if (o->producer) {
    td__wf(b, "; the %s that makes it, ", td__kind_word(o->producer));
    td__task(n, o->producer, b, depth, stack, now);
  } else if (o->chunked || o->pulling) {
    td__wf(b, ": it is made and being fetched from node-%u (%llu of %zu bytes here)",
           o->up ? o->up - 1 : td_id_node(id), (unsigned long long)o->got, o->len);
  } else if (o->foreign) {
    td__wf(b, ": it belongs to node-%u, which makes it; ask there (tide status --why on that node)",
           td_id_node(id));
  } else {
    td__wf(b, ": no task on node-%u makes it (its maker runs elsewhere, or was lost)", n->links.index);
  }
}

/* Asks t's worker to print its Lua stack to its stderr (worker.c: SIGUSR2
 * sets a debug hook that prints at the next Lua instruction). */
static int td__ask_stack(const td_wk_t *wk) {
  return wk && wk->pid > 0 && (wk->kind == WK_TASK || wk->kind == WK_HOST || wk->kind == WK_GPUHOST) &&
         kill(wk->pid, SIGUSR2) == 0;
}

/* A queued task or call: behind its actor's other calls, or waiting for
 * resources (and for what: a bundle, a node that had them, its turn). */
static void td__task_queued(td_node_t *n, td_task_t *t, td_wb_t *b, int depth, double now) {
  if (t->actor && t->on == &t->actor->queue) {
    int ahead = 0;
    for (td_task_t *q = t->actor->queue.head; q && q != t; q = q->next) ahead++;
    td__wf(b, " is queued at its actor %016llx (state %s), %d call%s before it",
           (unsigned long long)t->actor->id, td__actor_word(t->actor->state), ahead, ahead == 1 ? "" : "s");
    if (t->actor->state == A_PENDING && t->actor->create && t->actor->create != t && depth == 0) {
      td__wf(b, "\n  the actor: ");
      td__task(n, t->actor->create, b, depth + 1, 0, now);
    } else if (t->actor->state == A_ALIVE && t->actor->host) {
      td__wf(b, "; the actor runs in worker pid %d with %d call%s in flight", (int)t->actor->host->pid,
             t->actor->host->inflight.len, t->actor->host->inflight.len == 1 ? "" : "s");
    }
    return;
  }
  td__wf(b, " is queued for resources: it asks for ");
  td__demand(n, t, b);
  char why[400];
  td__task_infeasible(n, t, why, sizeof(why));
  if (why[0]) {
    td__wf(b, "; %s", why);
    if (t->unplaced)
      td__wf(b, " (it waits %.0f s more for a node that had it to rejoin)", n->links.settle_until - now);
    return;
  }
  int bundle;
  double *pool = td__pool(n, t, &bundle);
  if (t->spec.pg_id) {
    if (!pool) {
      td__wf(b,
             "; its placement group %016llx is not created yet (its bundles wait for resources) or was "
             "removed",
             (unsigned long long)t->spec.pg_id);
      return;
    }
    td_pg_t *pg = td__pg(n, t->spec.pg_id);
    td__wf(b, " from bundle %d of placement group %016llx: ", bundle + 1, (unsigned long long)t->spec.pg_id);
    td__free(n, t, pool, pg->total[bundle], b);
    return;
  }
  int fits_here = td__fits(n->sched.avail, t), fits_node = -1;
  for (int i = 0; i < n->procs.n && fits_node < 0; i++) {
    td_wk_t *w = n->procs.list[i];
    if (w->kind == WK_NODE && w->joined && !w->dead && td__fits(w->navail, t)) fits_node = (int)w->node_index;
  }
  int ahead = 0;
  for (td_task_t *q = n->sched.queue.head; q && q != t; q = q->next) ahead++;
  if (fits_here || fits_node >= 0) {
    td__wf(b, "; node-%u has that free now: it waits its turn (%d queued before it) or a worker starting",
           fits_here ? n->links.index : (uint32_t)fits_node, ahead);
  } else {
    td__wf(b, "; no node has that free now (node-%u: ", n->links.index);
    td__free(n, t, n->sched.avail, n->sched.total, b);
    td__wf(b, "%s): it waits for running work to finish, %d queued before it",
           n->links.nlinks ? "; other nodes are short too" : "", ahead);
  }
  return;
}

static void td__task(td_node_t *n, td_task_t *t, td_wb_t *b, int depth, int stack, double now) {
  td__wf(b, "%s ", td__kind_word(t));
  td__name(t, b);
  td__wf(b, " (task_id %016llx)", (unsigned long long)t->id);
  if (t->submit_at > 0) td__wf(b, ", submitted %.1f s ago,", now - t->submit_at);
  switch (t->state) {
    case T_WAITDEPS: {
      td__wf(b, " waits for %u of its arguments", t->deps_pending);
      if (depth > 0) return;
      int shown = 0;
      for (uint32_t i = 0; i < t->spec.ndeps && shown < 3; i++) {
        td_obj_t *o = td__obj(n, t->spec.deps[i]);
        if (!o || o->state != OBJ_PENDING) continue;
        td__wf(b, "\n  argument %d: ", (int)i + 1);
        td__obj_line(n, t->spec.deps[i], b, depth + 1, 0, now);
        shown++;
      }
      return;
    }
    case T_QUEUED: td__task_queued(n, t, b, depth, now); return;
    case T_SENT: {
      td_wk_t *wk = t->wk;
      double since = t->sent_at > 0 ? now - t->sent_at : -1;
      if (!wk) {
        td__wf(b, " was sent");
        return;
      }
      if (wk->kind == WK_NODE) {
        td__wf(b, " was sent to node-%u (%s)", wk->node_index, wk->name);
        if (since >= 0) td__wf(b, " %.1f s ago", since);
        td__wf(b, " and runs there (tide status --why on that node tells more)");
        return;
      }
      /* A worker runs its tasks one after another; an actor runs as many
       * of its calls at once as its max_concurrency. */
      int ahead = 0, room = 1;
      if (t->spec.kind == TD_K_ACTOR_CALL) {
        const td_task_t *c = t->actor ? t->actor->create : NULL;
        room = c && c->spec.max_concurrency > 1 ? c->spec.max_concurrency : 1;
        for (td_task_t *q = wk->inflight.head; q && q != t; q = q->next)
          ahead += q->spec.kind == TD_K_ACTOR_CALL && q->spec.actor_id == t->spec.actor_id;
      } else {
        for (td_task_t *q = wk->inflight.head; q && q != t; q = q->next) ahead++;
      }
      int running = ahead < room;
      if (running) {
        td__wf(b, " is running on node-%u in worker %016llx (pid %d)", n->links.index,
               (unsigned long long)wk->id, (int)wk->pid);
        if (since >= 0) td__wf(b, " for %.1f s", since);
      } else {
        td__wf(b, " was sent to worker %016llx (pid %d) on node-%u", (unsigned long long)wk->id, (int)wk->pid,
               n->links.index);
        if (since >= 0) td__wf(b, " %.1f s ago", since);
        td__wf(b, " and runs after the %d %s before it there", ahead,
               t->spec.kind == TD_K_ACTOR_CALL ? (ahead == 1 ? "call" : "calls")
                                               : (ahead == 1 ? "task" : "tasks"));
      }
      if (stack && running && td__ask_stack(wk))
        td__wf(b, "; its Lua stack follows on the worker's stderr, marked \"(worker pid %d stack)\"",
               (int)wk->pid);
      return;
    }
    case T_FETCHING: td__wf(b, " has finished on another node; its result is being fetched here"); return;
    default: td__wf(b, " is done");
  }
}

int td_node_why(td_node_t *n, uint64_t id, int flags, char *out, size_t len) {
  td_wb_t b = {out, 0, len};
  if (len) out[0] = 0;
  double now = td_now();
  int stack = flags & TD_WHY_STACK;
  td_obj_t *o = td__obj(n, id);
  if (o) {
    /* A get that warned: the node does not name the same task again. */
    if ((flags & TD_WHY_WARNED) && o->producer) o->producer->hang_warned = 1;
    td__obj_line(n, id, &b, 0, stack, now);
    return 0;
  }
  td_task_t *t = td_map_get(&n->tasks.map, id);
  if (t) {
    td__task(n, t, &b, 0, stack, now);
    return 0;
  }
  td__wf(&b,
         "node-%u knows no object or unfinished task %016llx (finished and freed, never made, or another "
         "node's)",
         n->links.index, (unsigned long long)id);
  return TD_ENOTFOUND;
}

/* TIDE_HANG_WARN_S: seconds a task may wait to start before the node says
 * why, once (default 30; 0 turns it off). */
void td__why_init(td_node_t *n) {
  n->tasks.hang_warn_s = 30;
  const char *e = getenv("TIDE_HANG_WARN_S");
  if (e && *e) {
    char *end;
    double v = strtod(e, &end);
    if (*end || v < 0 || v != v)
      fprintf(stderr, "tide: TIDE_HANG_WARN_S=%s is not a number of seconds >= 0; keeping 30\n", e);
    else n->tasks.hang_warn_s = v;
  }
}

/* Every second: a task queued (for resources, or at its actor) that has
 * not started hang_warn_s after a scan first saw it, while no task ended on
 * this node meanwhile, is named once on stderr with the reason. Work that
 * moves (a long batch on few CPUs) re-arms the wait instead: that is a
 * queue, not a hang. Tasks waiting for arguments are not named here: what
 * makes their arguments is, or a get that waits on them says why. */
void td__why_tick(td_node_t *n, double now) {
  if (n->tasks.hang_warn_s <= 0 || now < n->tasks.hang_scan_at) return;
  n->tasks.hang_scan_at = now + TD__WHY_SCAN;
  size_t it = 0;
  uint64_t id;
  void *v;
  int named = 0, more = 0;
  char buf[2048];
  while (td_map_next(&n->tasks.map, &it, &id, &v)) {
    td_task_t *t = v;
    if (t->state != T_QUEUED || t->hang_warned) continue;
    if (t->hang_seen <= 0 || (t->hang_done != n->tasks.ndone && !t->unplaced)) {
      t->hang_seen = now;
      t->hang_done = n->tasks.ndone;
      continue;
    }
    if (now - t->hang_seen < n->tasks.hang_warn_s) continue;
    t->hang_warned = 1;
    if (named >= TD__WHY_WARN_MAX) {
      more++;
      continue;
    }
    named++;
    td_wb_t b = {buf, 0, sizeof(buf)};
    buf[0] = 0;
    td__task(n, t, &b, 0, 0, now);
    fprintf(stderr, "tide: no progress for %.0f s: %s\n", n->tasks.hang_warn_s, buf);
  }
  if (more)
    fprintf(stderr, "tide: and %d more tasks not started for %.0f s (tide status --why TASK_ID for one)\n",
            more, n->tasks.hang_warn_s);
}

double td__why_next(td_node_t *n, double now) {
  if (n->tasks.hang_warn_s <= 0 || !n->tasks.map.len) return 1e9;
  return n->tasks.hang_scan_at > now ? n->tasks.hang_scan_at - now : 0;
}
