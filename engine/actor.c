/* Actors (node_int.h): the directory of actors this node knows — their
 * state (pending, alive, restarting, dead), the process that hosts each
 * (shared by lightweight actors, its own for GPU and own_process ones),
 * calls queued on them, restarts under max_restarts, kills, names, and the
 * detached ones a head keeps in head.db and re-creates after a restart. */
#include <signal.h>

#include "node_int.h"

void td__actor_pump(td_node_t *n, td_actor_t *a) {
  if (a->state == A_DEAD) {
    while (a->queue.head) {
      td_task_t *t = a->queue.head;
      tq_del(&a->queue, t);
      td__task_fail(n, t, "ActorDiedError", a->reason ? a->reason : "the actor is dead");
    }
    return;
  }
  if (a->state != A_ALIVE || !a->host) return;
  while (a->queue.head && a->queue.head->deps_pending == 0) {
    td_task_t *t = a->queue.head;
    /* An actor here needs its arguments here; one on a node fetches them. */
    if (t->has_away && td__away_wait(n, t, a->host->kind != WK_NODE)) break;
    tq_del(&a->queue, t);
    td__send_task(n, a->host, t);
  }
}

static void td__actor_release(td_node_t *n, td_actor_t *a) {
  td_task_t *c = a->create;
  if (a->pg_share) {  /* its share of a placement group's bundle goes back there */
    td_pg_t *pg = td__pg(n, c->spec.pg_id);
    if (pg && !pg->removed && a->pg_share <= (uint32_t)pg->nb) td__take(pg->avail[a->pg_share - 1], c, -1);
    a->pg_share = 0;
    td__gpus_give(n, td__task_gpus(c), a->gpus, a->ngpus);
    a->ngpus = 0;
  }
  if (!a->res_held) return;
  if (a->res_node) {
    td__take(a->res_node->navail, c, -1);
    a->res_node = NULL;
    a->res_held = 0;
    return;
  }
  td__take(n->sched.avail, c, -1);
  td__gpus_give(n, td__task_gpus(c), a->gpus, a->ngpus);
  a->ngpus = 0;
  a->res_held = 0;
}

void td__actor_die(td_node_t *n, td_actor_t *a, const char *why) {
  if (a->state == A_DEAD) return;
  a->state = A_DEAD;
  free(a->reason);
  a->reason = td_xstrdup(why);
  if (a->create && a->create->spec.detached && td_persist_on()) {
    char key[24];
    snprintf(key, sizeof(key), "%016llx", (unsigned long long)a->id);
    td_persist_put("actor", key, NULL, 0);
    td_persist_put("actor_up", key, NULL, 0);
  }
  if (a->fwd_attempt && n->links.head) {
    /* The head decides whether it restarts, and where. */
    td_chan_begin(&n->links.head->ch, TD_M_ACTOR_EXIT);
    td_buf_u64(&n->links.head->ch.out, a->id);
    td_buf_u8(&n->links.head->ch.out, a->crashed);
    td_buf_str(&n->links.head->ch.out, why, strlen(why));
    td_buf_u32(&n->links.head->ch.out, a->fwd_attempt);
    td_chan_end(&n->links.head->ch);
  }
  if (a->host) a->host->nactors--;
  a->host = NULL;
  td__actor_release(n, a);
  /* The creation task is kept until now for restarts. */
  if (a->create && a->create->state != T_QUEUED) {
    td_obj_t *o = td__obj(n, a->create->spec.rets[0]);
    if (o && o->state == OBJ_PENDING) {
      td__errblob(&n->tmp, "ActorDiedError", why);
      td__obj_fail(n, o, n->tmp.p, n->tmp.len);
    }
  }
  td__actor_pump(n, a);
}

void td__actor_restart_or_die(td_node_t *n, td_actor_t *a, const char *why) {
  if (a->state == A_DEAD) return;
  if (a->host) a->host->nactors--;
  a->host = NULL;
  if (a->restarts_left != 0) {
    if (a->restarts_left > 0) a->restarts_left--;
    td_log("restarting actor %llx: %s", (unsigned long long)a->id, why);
    a->state = A_RESTARTING;
    td__actor_release(n, a);
    a->create->state = T_QUEUED;
    tq_push(&n->sched.queue, a->create);
    return;
  }
  char msg[512];
  /* A node's report already says so: the head passes it on as it is. */
  static const char died[] = "the actor died: ";
  snprintf(msg, sizeof(msg), "%s%s", strncmp(why, died, sizeof(died) - 1) ? died : "", why);
  a->crashed = 1;
  td__actor_die(n, a, msg);
}

/* Calls of actor a that were sent to wk: retried on the restarted actor
 * when allowed (max_task_retries), failed with ActorDiedError otherwise. */
void td__actor_calls_lost(td_node_t *n, td_actor_t *a, td_wk_t *wk, int may_retry,
                                 const char *why) {
  td_tq_t keep = {0};
  td_task_t *t = wk->inflight.head;
  while (t) {
    td_task_t *next = t->next;
    if (t->actor == a && t->spec.kind == TD_K_ACTOR_CALL) {
      tq_del(&wk->inflight, t);
      td__unpin_deps(n, t);
      t->wk = NULL;
      if (may_retry && t->retries_left != 0) {
        if (t->retries_left > 0) t->retries_left--;
        t->state = T_QUEUED;
        tq_push(&keep, t);
      } else {
        td__task_fail(n, t, "ActorDiedError", why);
      }
    }
    t = next;
  }
  while (keep.tail) {
    td_task_t *x = keep.tail;
    tq_del(&keep, x);
    tq_push_front(&a->queue, x);
  }
}

td_wk_t *td__pick_host(td_node_t *n, td_actor_t *a) {
  /* A GPU actor, or one that asked for it (own_process), gets a process
   * that hosts nothing else: its crash takes no other actor with it. */
  if (a->ngpus || (a->create && a->create->spec.own_process))
    return td__spawn(n, WK_GPUHOST, a->gpus, a->ngpus);
  td_wk_t *best = NULL;
  int hosts = 0;
  for (int i = 0; i < n->procs.n; i++) {
    td_wk_t *w = n->procs.list[i];
    if (w->dead || w->kind != WK_HOST) continue;
    hosts++;
    if (w->nactors < TD_ACTORS_PER_HOST && (!best || w->nactors < best->nactors)) best = w;
  }
  int want = (int)(n->sched.total[TD_RES_CPU] > 1 ? n->sched.total[TD_RES_CPU] : 1);
  if (!best || (hosts < want && best->nactors > 0)) {
    td_wk_t *w = td__spawn(n, WK_HOST, NULL, 0);
    if (w) best = w;
  }
  return best;
}

/* A detached actor outlives its driver, and on a head with a store also
 * the head: its definition and creation spec are kept until it dies.
 * Arguments that are refs cannot be kept (their objects die with the head). */
void td__persist_actor(td_node_t *n, const td_spec_t *s) {
  if (!td_persist_on() || s->ndeps || s->nrefs) return;
  td_fnblob_t *fb = td_map_get(&n->tasks.fns, s->fn_id);
  if (!fb) return;
  td_buf_t b;
  td_buf_init(&b);
  td_buf_str(&b, fb->data, fb->len);
  td_spec_encode(s, &b);
  char key[24];
  snprintf(key, sizeof(key), "%016llx", (unsigned long long)s->actor_id);
  td_persist_put("actor", key, b.p, b.len);
  td_buf_free(&b);
}

void td__restore_actor(void *ud, const char *key, const void *val, size_t len) {
  td_node_t *n = ud;
  td_rd_t rd;
  td_rd_init(&rd, val, len);
  uint32_t bl;
  const uint8_t *blob = td_rd_str(&rd, &bl);
  td_spec_t s;
  uint64_t *scratch = NULL;
  if (rd.bad || td_spec_decode(&s, &rd, &scratch) || s.kind != TD_K_ACTOR_NEW) {
    fprintf(stderr, "tide: dropping persisted actor %s: unreadable\n", key);
    td_persist_put("actor", key, NULL, 0);
    free(scratch);
    return;
  }
  td_node_register_fn(n, s.fn_id, blob, bl);
  const char *msg;
  if (!td_map_get(&n->actors.map, s.actor_id) && td_node_submit(n, &s, &msg) == 0) {
    td_node_decref(n, s.rets[0]);  /* nobody waits for its readiness */
    td_actor_t *a = td_map_get(&n->actors.map, s.actor_id);
    if (a && a->create) a->create->restored = 1;
    fprintf(stderr, "tide: restoring detached actor %s%s%s\n", key, s.name[0] ? " " : "", s.name);
  }
  free(scratch);
}

/* A detached actor started (or adopted): its state now lives where it
 * runs. A restarted head that finds no node still running it may not make
 * it anew unless it may restart (td__restored_gone): the head keeps the
 * restarts it has left. */
void td__persist_actor_up(td_actor_t *a) {
  if (!a->create || !a->create->spec.detached || !td_persist_on()) return;
  char key[24], v[16];
  snprintf(key, sizeof(key), "%016llx", (unsigned long long)a->id);
  int l = snprintf(v, sizeof(v), "%d", a->restarts_left);
  td_persist_put("actor_up", key, v, (size_t)l);
}

void td__restore_actor_up(void *ud, const char *key, const void *val, size_t len) {
  td_node_t *n = ud;
  char v[16];
  snprintf(v, sizeof(v), "%.*s", (int)(len < 15 ? len : 15), (const char *)val);
  td_actor_t *a = td_map_get(&n->actors.map, strtoull(key, NULL, 16));
  if (!a || !a->create || !a->create->restored) {
    td_persist_put("actor_up", key, NULL, 0);  /* its actor was not kept */
    return;
  }
  a->was_up = 1;
  a->restarts_left = atoi(v);
}

/* Head: a restored detached actor that no rejoining node reported running
 * (td__adopt) once the wait for them is over. One that an earlier head had
 * started ran on a node that died or left meanwhile, and its state with
 * it: made anew only as a restart it has left, else it dies, saying so.
 * Returns 1 when it died. */
int td__restored_gone(td_node_t *n, td_task_t *t) {
  td_actor_t *a = t->actor;
  t->restored = 0;
  if (!a || !a->was_up) return 0;
  a->was_up = 0;
  if (a->restarts_left != 0) {
    if (a->restarts_left > 0) a->restarts_left--;
    td_log("restarting detached actor %016llx: no node reported it after the head restarted",
           (unsigned long long)a->id);
    return 0;
  }
  tq_del(&n->sched.queue, t);
  t->state = T_SENT;
  td__actor_die(n, a, "the actor died: no node still ran it when the head restarted "
                      "(its node died or left while the head was down), and it has no restarts left");
  return 1;
}

int td_node_kill_actor(td_node_t *n, uint64_t actor_id, int no_restart) {
  return td__kill_actor(n, actor_id, no_restart, "killed by tide.kill");
}

/* Kills an actor (why: "killed by ..."), restarted unless no_restart. */
int td__kill_actor(td_node_t *n, uint64_t actor_id, int no_restart, const char *why) {
  td_actor_t *a = td_map_get(&n->actors.map, actor_id);
  if ((!a || (a->of_head && a->fwd_attempt)) && n->links.head && !n->links.head->dead) {
    /* Not here, or here for the head: the head keeps it (forwarded, or
     * placed on another node), and decides on its restart. Calls made
     * here from now on go there too, after the kill. */
    if (a) a->of_head = 2;
    td_chan_begin(&n->links.head->ch, TD_M_KILL);
    td_buf_u64(&n->links.head->ch.out, actor_id);
    td_buf_u8(&n->links.head->ch.out, (uint8_t)(no_restart != 0));
    td_buf_str(&n->links.head->ch.out, why, strlen(why));
    td_chan_end(&n->links.head->ch);
    return 0;
  }
  if (!a) return TD_ENOTFOUND;
  td_wk_t *host = a->host;
  char msg[200];
  snprintf(msg, sizeof(msg), "the actor was %s", why);
  if (host) td__actor_calls_lost(n, a, host, 0, msg);
  if (!no_restart && host) {
    td__actor_restart_or_die(n, a, why);
  } else {
    if ((a->state == A_PENDING || a->state == A_RESTARTING) && a->create->state == T_QUEUED)
      tq_del(&n->sched.queue, a->create);
    td__actor_die(n, a, msg);
  }
  if (host && !host->dead) {
    if (host->kind == WK_GPUHOST) {
      kill(host->pid, SIGKILL);
    } else {
      td_chan_begin(&host->ch, TD_M_ACTOR_KILL);
      td_buf_u64(&host->ch.out, actor_id);
      td_chan_end(&host->ch);
    }
  }
  /* Calls already on the host fail there; queued calls failed above. */
  return 0;
}

/* The key of a named actor in n->actors.names: FNV-1a of the namespace,
 * a 0 byte and the name. */
uint64_t td__actor_name_key(const char *ns, const char *name) {
  return td_fnv1a(td_fnv1a(TD_FNV_BASIS, ns, strlen(ns) + 1), name, strlen(name));
}

static int td__actor_named(const td_actor_t *a, const char *name, const char *ns) {
  return a->state != A_DEAD && a->create && !strcmp(a->create->spec.name, name) &&
         !strcmp(a->create->spec.ns, ns);
}

/* Looked up by name through the index, so that making N named actors (each
 * checks its name is free) is not N^2; only two names whose keys collide
 * need the scan. */
int td_node_get_actor(td_node_t *n, const char *name, const char *ns, uint64_t *actor_id,
                      uint64_t *class_id) {
  td_actor_t *a = td_map_get(&n->actors.names, td__actor_name_key(ns, name));
  if (a && a->create && (strcmp(a->create->spec.name, name) || strcmp(a->create->spec.ns, ns))) {
    size_t it = 0; /* another name with the same key */
    while (td_map_next(&n->actors.map, &it, NULL, (void **)&a) && !td__actor_named(a, name, ns)) {}
  }
  if (!a || !td__actor_named(a, name, ns)) return TD_ENOTFOUND;
  *actor_id = a->id;
  *class_id = a->create->spec.fn_id;
  return 0;
}

int td_node_actor_state(td_node_t *n, uint64_t actor_id, const char **reason) {
  td_actor_t *a = td_map_get(&n->actors.map, actor_id);
  if (!a) return -1;
  *reason = a->reason;
  return a->state;
}

void td__actor_kill_at(td_wk_t *wk, uint64_t aid) {
  td_chan_begin(&wk->ch, TD_M_ACTOR_KILL);
  td_buf_u64(&wk->ch.out, aid);
  td_chan_end(&wk->ch);
}

/* -- Messages (node.c's table dispatches them) ------------------------------ */

/* An actor's init ran: its creation's ref becomes true. */
int td__on_actor_ready(td_node_t *n, td_wk_t *wk, td_rd_t *rd) {
  uint64_t aid = td_rd_u64(rd);
  td_actor_t *a = td_map_get(&n->actors.map, aid);
  if (a && a->host == wk && a->create) {
    td_obj_t *o = td__obj(n, a->create->spec.rets[0]);
    uint8_t tt = TD_T_TRUE;
    if (o && o->state == OBJ_PENDING) {
      td__obj_set(n, o, OBJ_READY, 0, &tt, 1, 0, NULL, 0);
      if (n->tl) { /* its calls sent meanwhile begin after init */
        wk->last_done = td_now();
        td__tl_record(n, a->create, wk, a->create->sent_at, wk->last_done, 1, 1);
      }
    }
  }
  return rd->bad ? TD_EPROTO : 0;
}

/* An actor ended in its process (exit, or its init or a method crashed). */
int td__on_actor_exit(td_node_t *n, td_wk_t *wk, td_rd_t *rd) {
  uint64_t aid = td_rd_u64(rd);
  uint8_t crashed = td_rd_u8(rd);
  uint32_t l;
  const uint8_t *why = td_rd_str(rd, &l);
  if (rd->bad) return TD_EPROTO;
  uint32_t incarnation = td_rd_u32(rd);
  td_actor_t *a = td_map_get(&n->actors.map, aid);
  /* An earlier incarnation's exit (after a kill and restart) is old news. */
  if (!a || a->host != wk || rd->bad || incarnation != a->create->attempt) return 0;
  char msg[512];
  snprintf(msg, sizeof(msg), "%.*s", (int)l, why);
  char died[600];
  snprintf(died, sizeof(died), "the actor died: %s", msg);
  td__actor_calls_lost(n, a, wk, crashed && a->restarts_left != 0, died);
  if (crashed) {
    td__actor_restart_or_die(n, a, msg);
  } else {
    td__actor_die(n, a, msg);
  }
  return 0;
}

/* Head: a node asks it to kill an actor the head keeps. */
int td__on_kill(td_node_t *n, td_wk_t *wk, td_rd_t *rd) {
  (void)wk;
  uint64_t aid = td_rd_u64(rd);
  int no_restart = td_rd_u8(rd);
  uint32_t l;
  const uint8_t *why = td_rd_str(rd, &l);
  if (rd->bad) return TD_EPROTO;
  char msg[200];
  snprintf(msg, sizeof(msg), "%.*s", (int)(l < 150 ? l : 150), why);
  td__kill_actor(n, aid, no_restart, msg);
  return 0;
}

/* Node: the head killed an actor this node forwarded to it. */
int td__on_actor_kill(td_node_t *n, td_wk_t *wk, td_rd_t *rd) {
  (void)wk;
  uint64_t aid = td_rd_u64(rd);
  if (rd->bad) return TD_EPROTO;
  td_actor_t *a = td_map_get(&n->actors.map, aid);
  if (a && a->fwd_attempt) {
    a->fwd_attempt = 0; /* the head knows */
    td_node_kill_actor(n, aid, 1);
  }
  return 0;
}

/* A driver that left takes its non-detached actors with it: those here,
 * and those it made here that the head keeps. */
void td__actors_owner_left(td_node_t *n, uint64_t owner) {
  size_t it2 = 0;
  td_actor_t *oa;
  while (td_map_next(&n->actors.map, &it2, NULL, (void **)&oa))
    if (oa->owner == owner && oa->state != A_DEAD && oa->create && !oa->create->spec.detached)
      td_node_kill_actor(n, oa->id, 1);
  uint64_t aid;
  void *who;
  for (size_t it3 = 0; td_map_next(&n->links.fwd_actors, &it3, &aid, &who);)
    if ((uint64_t)(uintptr_t)who == owner) td__kill_actor(n, aid, 1, "killed: its driver left");
  for (size_t it3 = 0; td_map_next(&n->links.fwd_actors, &it3, &aid, &who);)
    if ((uint64_t)(uintptr_t)who == owner) td_map_del(&n->links.fwd_actors, aid), it3 = 0;
}

/* A job ended (its driver left; td__job_end): the non-detached actors its
 * tasks made here go too, wherever that driver was. Those this node hosts
 * for the head (fwd_attempt) are the head's to kill: it was told too. */
void td__actors_job_end(td_node_t *n, uint64_t job) {
  uint64_t *ids = NULL;
  size_t nids = 0, cap = 0, it = 0;
  td_actor_t *a;
  while (td_map_next(&n->actors.map, &it, NULL, (void **)&a)) {
    if (a->state == A_DEAD || a->fwd_attempt || !a->create || a->create->spec.job != job ||
        a->create->spec.detached)
      continue;
    if (nids == cap) ids = td_xrealloc(ids, (cap = cap ? cap * 2 : 8) * sizeof(*ids));
    ids[nids++] = a->id;
  }
  for (size_t i = 0; i < nids; i++) td__kill_actor(n, ids[i], 1, "killed: its job ended");
  free(ids);
}

/* The process hosting actors died: each restarts or dies. */
void td__actors_host_lost(td_node_t *n, td_wk_t *wk, const char *reason) {
  size_t it = 0;
  td_actor_t *a;
  while (td_map_next(&n->actors.map, &it, NULL, (void **)&a))
    if (a->host == wk) td__actor_restart_or_die(n, a, reason);
}
