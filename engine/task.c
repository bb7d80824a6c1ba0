/* Tasks (node_int.h): submission (td_node_submit: tasks, actor creations
 * and calls, from drivers, workers and the head), the records of work in
 * flight, sending a task and its arguments to a worker, counting the refs a
 * worker holds, finishing and failing, waking what waited on an object, and
 * cancelling. */
#include <signal.h>

#include "node_int.h"
#include "introspect.h"

/* What a worker, client or node link holds, counted so that its death
 * gives it back: a head that dies takes with it the refs it held on a
 * node's objects (exports, results kept for it; a restarted head knows
 * none of them), a node that dies those it held on the head's. Peer links
 * hold nothing. */
void td__count(td_wk_t *wk, td_map_t *m, uint64_t id, intptr_t d) {
  if (!wk || wk->kind == WK_PEER || !d) return;
  intptr_t c = (intptr_t)td_map_get(m, id) + d;
  if (c > 0) td_map_set(m, id, (void *)c);
  else td_map_del(m, id);
}

/* A ref handed to wk in a reply (an RPC's results): held for it, and
 * given back if it dies holding it. */
void td_node_incref_for(td_node_t *n, td_wk_t *wk, uint64_t id) {
  td_node_incref(n, id);
  if (wk) td__count(wk, &wk->held, id, 1);
}

void td__give_back(td_node_t *n, td_wk_t *wk) {
  size_t it = 0;
  uint64_t id;
  void *v;
  while (td_map_next(&wk->pinned, &it, &id, &v)) {
    td_obj_t *o = td__obj(n, id);
    if (o) o->pins = o->pins > (intptr_t)v ? o->pins - (int32_t)(intptr_t)v : 0;
  }
  it = 0;
  while (td_map_next(&wk->held, &it, &id, &v)) {
    td_obj_t *o = td__obj(n, id);
    if (o) td__unref(n, o, (intptr_t)v);
  }
  td_map_free(&wk->pinned);
  td_map_free(&wk->held);
}

/* Appends how a dependency value travels. Shared-memory values are pinned
 * until the task finishes. Returns whether it pinned one. */
int td__put_value(td_node_t *n, td_buf_t *b, uint64_t id, int pin, int remote) {
  td_obj_t *o = td__obj(n, id);
  int rc = !o || o->state == OBJ_PENDING ? TD_ENOTFOUND : td__obj_resident(n, o);
  if (rc && o && o->loc == LOC_SPILLED && rc != TD_EIO && rc != TD_ENOTFOUND &&
      (remote != 2 || o->len <= TD_CHUNK) && o->len <= UINT32_MAX) {
    /* The store is full of values in use and cannot take it back: it
     * travels from the spill file, inline (it was not lost). */
    size_t at = b->len;
    td_buf_u8(b, TD_V_INLINE);
    td_buf_u32(b, (uint32_t)o->len);
    td_buf_reserve(b, o->len);
    if (td_spill_read(n->objs.spill, o->off, b->p + b->len, o->len) == 0) {
      b->len += o->len;
      return 0;
    }
    b->len = at;
  }
  if (rc) {
    td_buf_u8(b, TD_V_LOST);
    return 0;
  }
  if (o->state == OBJ_ERROR) {
    td_buf_u8(b, TD_V_ERROR);
    td_buf_str(b, o->data, o->len);
  } else if (remote == 2 && o->len > TD_CHUNK) {
    /* To another node: it fetches the bytes in chunks. */
    td_buf_u8(b, TD_V_PULL);
    td_buf_u64(b, o->len);
  } else if (o->loc == LOC_SHM && remote) {
    /* A remote client cannot map the store: the bytes travel inline. */
    td_buf_u8(b, TD_V_INLINE);
    td_buf_str(b, td_store_base(n->objs.store) + o->off, o->len);
  } else if (o->loc == LOC_SHM) {
    td_buf_u8(b, TD_V_SHM);
    td_buf_u64(b, o->off);
    td_buf_u64(b, o->len);
    if (pin) o->pins++;
    return pin;
  } else {
    td_buf_u8(b, TD_V_INLINE);
    td_buf_str(b, o->data, o->len);
  }
  return 0;
}

void td__unpin_deps(td_node_t *n, td_task_t *t) {
  for (uint32_t i = 0; i < t->spec.ndeps; i++) {
    td_obj_t *o = td__obj(n, t->spec.deps[i]);
    if (o && o->loc == LOC_SHM && o->pins > 0) o->pins--;
  }
}

void td__send_fn(td_node_t *n, td_wk_t *wk, uint64_t fn_id) {
  if (td_map_get(&wk->fns_sent, fn_id)) {
    td_buf_u8(&wk->ch.out, 0);
    return;
  }
  td_fnblob_t *fb = td_map_get(&n->tasks.fns, fn_id);
  if (!fb) { td_buf_u8(&wk->ch.out, 0); return; }
  td_map_set(&wk->fns_sent, fn_id, (void *)1);
  td_buf_u8(&wk->ch.out, 1);
  td_buf_str(&wk->ch.out, fb->data, fb->len);
}

static void td__send_args(td_node_t *n, td_wk_t *wk, td_task_t *t) {
  td_buf_t *b = &wk->ch.out;
  td_buf_str(b, t->spec.args, t->spec.args_len);
  td_buf_u32(b, t->spec.ndeps);
  for (uint32_t i = 0; i < t->spec.ndeps; i++) {
    td_buf_u64(b, t->spec.deps[i]);
    td__put_value(n, b, t->spec.deps[i], 1, 0);
  }
}

void td__send_task(td_node_t *n, td_wk_t *wk, td_task_t *t) {
  td_buf_t *b = &wk->ch.out;
  t->wk = wk;
  t->state = T_SENT;
  t->attempt++;
  td__inflight_add(n, wk, t);
  if (wk->kind == WK_NODE) {
    td__send_node_task(n, wk, t);
  } else if (t->spec.kind == TD_K_TASK) {
    td_chan_begin(&wk->ch, TD_M_TASK);
    td_buf_u64(b, t->id);
    td_buf_u64(b, t->spec.fn_id);
    td_buf_u32(b, (uint32_t)t->spec.nret);
    uint32_t nr = t->spec.nret < 0 ? 1 : (uint32_t)t->spec.nret;
    td_buf_put(b, t->spec.rets, nr * 8);
    td_buf_u32(b, t->attempt);
    td_buf_str(b, t->spec.name, strlen(t->spec.name));
    td_buf_str(b, t->spec.env, t->spec.env_len);
    td_buf_u32(b, (uint32_t)wk->ngpus);
    for (int i = 0; i < wk->ngpus; i++) td_buf_u32(b, (uint32_t)wk->gpus[i]);
    td__send_fn(n, wk, t->spec.fn_id);
    td__send_args(n, wk, t);
  } else if (t->spec.kind == TD_K_ACTOR_NEW) {
    td_actor_t *a = t->actor;
    td_chan_begin(&wk->ch, TD_M_ACTOR_NEW);
    td_buf_u64(b, t->id);
    td_buf_u64(b, a->id);
    td_buf_u64(b, t->spec.fn_id);
    td_buf_str(b, t->spec.name, strlen(t->spec.name));
    td_buf_u32(b, (uint32_t)(t->spec.max_concurrency > 0 ? t->spec.max_concurrency : 1));
    td_buf_u32(b, t->attempt);
    td_buf_str(b, t->spec.env, t->spec.env_len);
    td_buf_u32(b, (uint32_t)a->ngpus);
    for (int i = 0; i < a->ngpus; i++) td_buf_u32(b, (uint32_t)a->gpus[i]);
    td__send_fn(n, wk, t->spec.fn_id);
    td__send_args(n, wk, t);
  } else {
    td_chan_begin(&wk->ch, TD_M_ACTOR_CALL);
    td_buf_u64(b, t->id);
    td_buf_u64(b, t->spec.actor_id);
    td_buf_str(b, t->spec.method, strlen(t->spec.method));
    td_buf_u32(b, (uint32_t)t->spec.nret);
    uint32_t nr = t->spec.nret < 0 ? 1 : (uint32_t)t->spec.nret;
    td_buf_put(b, t->spec.rets, nr * 8);
    td__send_args(n, wk, t);
  }
  td_chan_end(&wk->ch);
  if (wk->ch.out.len > (256u << 10)) td_chan_flush(&wk->ch);
}

static void td__task_free(td_node_t *n, td_task_t *t) {
  td_map_del(&n->tasks.map, t->id);
  for (uint32_t i = 0; i < t->spec.ndeps; i++) td_node_decref(n, t->spec.deps[i]);
  for (uint32_t i = 0; i < t->spec.nrefs; i++) td_node_decref(n, t->spec.refs[i]);
  if (t->pooled && n->tasks.npool < TD_POOL_MAX) {
    if (!n->tasks.pool) n->tasks.pool = td_xmalloc(TD_POOL_MAX * sizeof(void *));
    n->tasks.pool[n->tasks.npool++] = t;
  } else {
    free(t);  /* with its arrays and arguments */
  }
}

/* Gives a task's lease back when its worker has nothing left to run. */
void td__lease_done(td_node_t *n, td_wk_t *wk) {
  if (wk->kind != WK_TASK || wk->inflight.len || !wk->leased) return;
  if (!wk->blocked) {
    double *pool = n->sched.avail;
    if (wk->lease_pg) {
      td_pg_t *pg = td__pg(n, wk->lease_pg);
      pool = pg && !pg->removed && wk->lease_bundle >= 0 ? pg->avail[wk->lease_bundle] : NULL;
    }
    if (pool)
      for (int i = 0; i < n->sched.nres; i++) pool[i] += wk->lease[i];
    td__gpus_give(n, wk->lease[TD_RES_GPU], wk->gpus, wk->ngpus);
  }
  wk->ngpus = 0;
  wk->leased = 0;
  wk->blocked = 0;
  memset(wk->lease, 0, sizeof(wk->lease));
}

/* Ends a task: every return gets `blob` as an error (when given). */
void td__task_finish(td_node_t *n, td_task_t *t) {
  t->state = T_DONE;
  n->tasks.ndone++;
  td__obs_finished++;
  td__unpin_deps(n, t);
  uint32_t nr = t->spec.nret < 0 ? 1 : (uint32_t)t->spec.nret;
  for (uint32_t i = 0; i < nr; i++) {
    td_obj_t *o = td__obj(n, t->spec.rets[i]);
    if (o && o->producer == t) o->producer = NULL;
  }
  td__task_free(n, t);
}

void td__task_fail(td_node_t *n, td_task_t *t, const char *kind, const char *msg) {
  char full[600];
  if (t->spec.name[0])
    snprintf(full, sizeof(full), "%s (task %s)", msg, t->spec.name);
  else
    snprintf(full, sizeof(full), "%s", msg);
  td__obs_failed(n, t, NULL, 0, kind, full);
  td__errblob(&n->tmp, kind, full);
  if (n->tl) td__tl_failed(n, t);
  uint32_t nr = t->spec.nret < 0 ? 1 : (uint32_t)t->spec.nret;
  for (uint32_t i = 0; i < nr; i++) {
    td_obj_t *o = td__obj(n, t->spec.rets[i]);
    if (o) td__obj_fail(n, o, n->tmp.p, n->tmp.len);
  }
  td__task_finish(n, t);
}

/* Fails a task whose dependency failed, with that dependency's error. */
static int td__deps_failed(td_node_t *n, td_task_t *t) {
  for (uint32_t i = 0; i < t->spec.ndeps; i++) {
    td_obj_t *o = td__obj(n, t->spec.deps[i]);
    if (o && o->state == OBJ_ERROR) {
      uint8_t *copy = td_xmalloc(o->len);
      size_t len = o->len;
      memcpy(copy, o->data, len);
      uint32_t nr = t->spec.nret < 0 ? 1 : (uint32_t)t->spec.nret;
      for (uint32_t k = 0; k < nr; k++) {
        td_obj_t *r = td__obj(n, t->spec.rets[k]);
        if (r) td__obj_fail(n, r, copy, len);
      }
      free(copy);
      return 1;
    }
  }
  return 0;
}

/* The tasks waiting for o go on (away: tasks and actor calls, which can
 * fetch it from the node it is on; actor creations keep waiting). */
void td__wake_waiters(td_node_t *n, td_obj_t *o, int away) {
  uint32_t nw = o->nwaiters;
  td_task_t **ws = o->waiters;
  o->waiters = NULL;
  o->nwaiters = o->capwaiters = 0;
  for (uint32_t i = 0; i < nw; i++) {
    td_task_t *t = ws[i];
    if (away && t->spec.kind == TD_K_ACTOR_NEW) {  /* its actor may start here: still waits */
      td__add_waiter(o, t);
      continue;
    }
    if (away) t->has_away = 1;
    if (--t->deps_pending) continue;
    if (t->spec.kind == TD_K_ACTOR_CALL) {
      td__actor_pump(n, t->actor);
    } else if (t->state == T_WAITDEPS) {
      if (t->spec.kind == TD_K_TASK && td__deps_failed(n, t)) { td__task_finish(n, t); continue; }
      t->state = T_QUEUED;
      tq_push(&n->sched.queue, t);
      if (t->unplaced) n->links.nunplaced++;
    }
  }
  free(ws);
}

/* Frees o when nothing holds it any more: the caller must not touch o
 * after this unless it holds a ref of its own. */
void td__obj_wake(td_node_t *n, td_obj_t *o) {
  n->objs.dirty = 1;
  if (o->fwd) td__fwd_note(n, o->id);
  /* A waiter woken here may end at once (an argument failed) and drop its
   * ref to o: o stays until the wake is over. */
  o->refs++;
  td__wake_waiters(n, o, 0);
  if (--o->refs <= 0 && !o->nwaiters && o->state != OBJ_PENDING) td__obj_free(n, o);
}

/* The value of KEY in a spec's env ("K=V\0..."), copied into out. */
int td__env_get(const char *env, uint32_t len, const char *key, char *out, size_t n) {
  size_t kl = strlen(key);
  for (uint32_t i = 0; i < len;) {
    const char *kv = env + i;
    size_t l = strnlen(kv, len - i);
    if (l > kl && kv[kl] == '=' && !memcmp(kv, key, kl)) {
      snprintf(out, n, "%.*s", (int)(l - kl - 1), kv + kl + 1);
      return 1;
    }
    i += (uint32_t)l + 1;
  }
  return 0;
}

/* Work of a job with a working-directory package runs in the package's
 * directory on whatever node runs it (it is unpacked here by then). */
static void td__env_pkg(td_spec_t *s) {
  char hash[TD_PKG_HASH_LEN + 2], dir[PATH_MAX], wd[8];
  if (!td__env_get(s->env, s->env_len, "TIDE_PKG", hash, sizeof(hash)) ||
      td__env_get(s->env, s->env_len, "TIDE_WORKING_DIR", wd, sizeof(wd)) || !td_pkg_have(hash))
    return;
  td_pkg_dir(hash, dir, sizeof(dir));
  int l = snprintf(s->env + s->env_len, sizeof(s->env) - s->env_len, "TIDE_WORKING_DIR=%s", dir);
  if (l > 0 && s->env_len + (uint32_t)l + 1 <= sizeof(s->env)) s->env_len += (uint32_t)l + 1;
}

static td_task_t *td__task_new(td_node_t *n, const td_spec_t *s) {
  /* The spec is large (names, env): only what a task needs is copied.
   * Its id arrays and arguments live in the same allocation, after it. */
  uint32_t nr = s->nret < 0 ? 1 : (uint32_t)s->nret;
  size_t ids = ((size_t)nr + s->ndeps + s->nrefs) * 8;
  size_t tail_len = ids + s->args_len + 1;
  int pooled = tail_len <= TD_TASK_TAIL;
  td_task_t *t = pooled && n->tasks.npool ? n->tasks.pool[--n->tasks.npool]
                                          : td_xmalloc(sizeof(*t) + (pooled ? TD_TASK_TAIL : tail_len));
  uint64_t *tail = (uint64_t *)(t + 1);
  size_t spec_at = offsetof(td_task_t, spec), spec_end = spec_at + sizeof(td_spec_t);
  memset(t, 0, spec_at);
  memset((char *)t + spec_end, 0, sizeof(*t) - spec_end);
  memcpy(&t->spec, s, offsetof(td_spec_t, env));
  if (s->env_len) memcpy(t->spec.env, s->env, s->env_len);
  t->spec.env_len = s->env_len;
  td__env_pkg(&t->spec);
  t->spec.nres = 0;
  t->id = ++n->tasks.next;
  t->pooled = (uint8_t)pooled;
  t->owner = n->tasks.submitter;
  t->owner_task = n->tasks.submitter_task;
  t->origin = n->tasks.submitter_node;
  t->attempt = n->tasks.attempt_base;
  t->spec.rets = tail;
  memcpy(t->spec.rets, s->rets, nr * 8);
  t->spec.deps = tail + nr;
  if (s->ndeps) memcpy(t->spec.deps, s->deps, s->ndeps * 8);
  t->spec.refs = tail + nr + s->ndeps;
  if (s->nrefs) memcpy(t->spec.refs, s->refs, s->nrefs * 8);
  uint8_t *args = (uint8_t *)tail + ids;
  if (s->args_len) memcpy(args, s->args, s->args_len);
  t->spec.args = args;
  t->retries_left = s->max_retries;
  if (n->tl) t->submit_at = td_now();
  td_map_set(&n->tasks.map, t->id, t);
  return t;
}

/* Why t can never run, in why ("" if it can): its placement group or
 * bundle is gone, or it asks for more than any node has. */
void td__task_infeasible(td_node_t *n, td_task_t *t, char *why, size_t len) {
  const td_spec_t *s = &t->spec;
  why[0] = 0;
  if (s->pg_id) {
    td_pg_t *pg = td__pg(n, s->pg_id);
    if (!pg || pg->removed) {
      snprintf(why, len, "its placement group does not exist or was removed");
    } else if (s->bundle >= pg->nb) {
      snprintf(why, len, "bundle_index %d is out of range: the placement group has %d bundles",
               s->bundle + 1, pg->nb);
    } else {
      for (int i = 0; i < t->nres && !why[0]; i++) {
        int r = t->res_idx[i];
        double most = 0;
        for (int b = 0; b < pg->nb; b++)
          if ((s->bundle < 0 || b == s->bundle) && pg->total[b][r] > most) most = pg->total[b][r];
        if (t->res_amt[i] > most + 1e-9)
          snprintf(why, len, "infeasible: it requires %s = %g but its placement group bundle has %g",
                   n->sched.resname[r], t->res_amt[i], most);
      }
    }
    return;
  }
  for (int i = 0; i < t->nres && !why[0]; i++) {
    int r = t->res_idx[i];
    double most = td__cluster_max(n, r);
    if (t->res_amt[i] > most + 1e-9)
      snprintf(why, len, "infeasible: it requires %s = %g but %s %s = %g", n->sched.resname[r], t->res_amt[i],
               n->links.nlinks ? "the most any node has is" : "this node has", n->sched.resname[r], most);
  }
}

/* Settled (no node left or rejoined of late): tasks queued while their
 * demand exceeded every node now run, or fail as infeasible. */
void td__unplaced_check(td_node_t *n, double now) {
  if (!n->links.nunplaced || now < n->links.settle_until) return;
  n->links.nunplaced = 0;
  char why[400];
  for (td_task_t *t = n->sched.queue.head, *next; t; t = next) {
    next = t->next;
    if (!t->unplaced) continue;
    t->unplaced = 0;
    td__task_infeasible(n, t, why, sizeof(why));
    if (!why[0]) continue;
    size_t l = strlen(why);
    snprintf(why + l, sizeof(why) - l, " (no node that has it came back in time)");
    tq_del(&n->sched.queue, t);
    if (t->spec.kind == TD_K_TASK) {
      td__task_fail(n, t, "TaskError", why);
    } else {
      t->state = T_SENT;
      td__actor_die(n, t->actor, why);
    }
  }
  td__sched(n);
}

int td_node_submit(td_node_t *n, const td_spec_t *s, const char **msg) {
  *msg = NULL;
  td_actor_t *a = NULL;
  if (s->kind == TD_K_ACTOR_CALL) {
    a = td_map_get(&n->actors.map, s->actor_id);
    if (!a) { *msg = "unknown actor"; return TD_EINVAL; }
  }
  td_task_t *t = td__task_new(n, s);
  /* Resource demands: a task asks for 1 CPU unless told otherwise. */
  int has_cpu = 0;
  for (uint32_t i = 0; i < s->nres; i++) {
    int idx = td_node_res_index(n, s->res_name[i]);
    if (idx < 0) { td__task_free(n, t); *msg = "too many resource kinds"; return TD_EINVAL; }
    if (idx == TD_RES_CPU) has_cpu = 1;
    if (s->res_amt[i] <= 0) continue;
    t->res_idx[t->nres] = idx;
    t->res_amt[t->nres++] = s->res_amt[i];
  }
  if (!has_cpu && s->kind == TD_K_TASK) {
    t->res_idx[t->nres] = TD_RES_CPU;
    t->res_amt[t->nres++] = 1;
  }
  uint32_t nr = s->nret < 0 ? 1 : (uint32_t)s->nret;
  for (uint32_t i = 0; i < nr; i++) {
    td_obj_t *o = td__obj_new(n, s->rets[i]);
    o->refs++;
    o->producer = t;
    if (s->nret < 0) o->is_stream = 1;
  }
  if (n->links.head && !n->lineage.from_head) td__lineage_keep(n, s);
  for (uint32_t i = 0; i < s->ndeps; i++) td_node_incref(n, s->deps[i]);
  for (uint32_t i = 0; i < s->nrefs; i++) td_node_incref(n, s->refs[i]);
  for (uint32_t i = 0; i < s->ndeps; i++) {
    td_obj_t *o = td__obj(n, s->deps[i]);
    if (!o) {
      td__task_fail(n, t, "ObjectLostError", "an argument's object was freed or never existed");
      return 0;
    }
    if (o->state != OBJ_PENDING) continue;
    if (o->away && s->kind != TD_K_ACTOR_NEW) {  /* done, on another node */
      t->has_away = 1;
      continue;
    }
    if (o->foreign) td__pull(n, o);
    td__wait_on(o, t);
  }
  if (s->kind == TD_K_ACTOR_CALL) {
    t->actor = a;
    /* Calls inherit the actor's max_task_retries. */
    t->retries_left = a->create ? a->create->spec.max_retries : 0;
    tq_push(&a->queue, t);
    td__actor_pump(n, a);
    return 0;
  }
  /* A demand beyond what the cluster has can never be met: say so now
   * rather than wait forever -- unless nodes may still rejoin (a head
   * that restarted, a node that just left): then it waits for them. */
  char why[400] = "";
  if (s->kind != TD_K_ACTOR_CALL) td__task_infeasible(n, t, why, sizeof(why));
  int wait = why[0] && !s->pg_id && n->links.settle_until > td_now() && td__fits(n->links.settle_max, t);
  if (wait) why[0] = 0, t->unplaced = 1;
  if (why[0] && n->actors.restoring) why[0] = 0; /* its nodes have not rejoined yet */
  if (why[0] && s->kind == TD_K_TASK) {
    td__task_fail(n, t, "TaskError", why);
    return 0;
  }
  if (s->kind == TD_K_ACTOR_NEW && s->detached && !why[0]) td__persist_actor(n, s);
  if (s->kind == TD_K_ACTOR_NEW) {
    a = td_xcalloc(1, sizeof(*a));
    a->id = s->actor_id;
    a->create = t;
    a->state = A_PENDING;
    a->restarts_left = s->max_restarts;
    t->actor = a;
    td_map_set(&n->actors.map, a->id, a);
    if (s->name[0]) td_map_set(&n->actors.names, td__actor_name_key(s->ns, s->name), a);
    if (why[0]) {
      td__actor_die(n, a, why);
      return 0;
    }
  }
  if (t->deps_pending) {
    t->state = T_WAITDEPS;
    return 0;
  }
  if (s->kind == TD_K_TASK && td__deps_failed(n, t)) {
    td__task_finish(n, t);
    return 0;
  }
  t->state = T_QUEUED;
  tq_push(&n->sched.queue, t);
  if (t->unplaced) n->links.nunplaced++;
  /* Only a task at the head can start now; others wait their turn (the
   * next pump schedules the rest), so submitting stays O(1). */
  if (n->sched.queue.len == 1 && !n->actors.restoring)
    td__sched(n); /* restored: marked first (td__restore_actor) */
  return 0;
}

void td_node_register_fn(td_node_t *n, uint64_t id, const uint8_t *blob, size_t len) {
  if (td_map_get(&n->tasks.fns, id)) return;
  td_fnblob_t *fb = td_xmalloc(sizeof(*fb) + len);
  fb->len = len;
  memcpy(fb->data, blob, len);
  td_map_set(&n->tasks.fns, id, fb);
  if (n->tasks.nfn_order == n->tasks.capfn_order) {
    n->tasks.capfn_order = n->tasks.capfn_order ? n->tasks.capfn_order * 2 : 64;
    n->tasks.fn_order = td_xrealloc(n->tasks.fn_order, n->tasks.capfn_order * 8);
  }
  n->tasks.fn_order[n->tasks.nfn_order++] = id;
}

const uint8_t *td_node_fn(td_node_t *n, uint64_t id, size_t *len) {
  td_fnblob_t *fb = td_map_get(&n->tasks.fns, id);
  if (!fb) return NULL;
  *len = fb->len;
  return fb->data;
}

static void td__task_cancel(td_node_t *n, td_task_t *t, int force);

/* What names t as a parent (spec.parent): its first return; 0 for none. */
static uint64_t td__parent_key(const td_task_t *t) { return t->spec.nret != 0 ? t->spec.rets[0] : 0; }

static void td__cancel_tree(td_node_t *n, uint64_t parent, int force, td_wk_t *from);

/* Cancels the tasks here that have not ended and whose spec names key:
 * as their job (tasks only), or as their parent (by_parent: and then the
 * tasks each of those submitted, on every node). Returns how many. */
static size_t td__cancel_matching(td_node_t *n, int by_parent, uint64_t key, int force) {
  td_buf_t ids;
  td_buf_init(&ids);
  size_t it = 0;
  td_task_t *t;
  while (td_map_next(&n->tasks.map, &it, NULL, (void **)&t))
    if ((by_parent ? t->spec.parent == key : t->spec.job == key && t->spec.kind == TD_K_TASK) &&
        !t->cancelled && (t->state == T_WAITDEPS || t->state == T_QUEUED || t->state == T_SENT))
      td_buf_u64(&ids, t->id);
  /* Looked up again one by one: failing one fails those waiting on it. */
  for (size_t i = 0; i + 8 <= ids.len; i += 8) {
    uint64_t id;
    memcpy(&id, ids.p + i, 8);
    if (!(t = td_map_get(&n->tasks.map, id)) || t->cancelled) continue;
    uint64_t r = td__parent_key(t);
    td__task_cancel(n, t, force);
    if (by_parent && r) td__cancel_tree(n, r, force, NULL);
  }
  size_t k = ids.len / 8;
  td_buf_free(&ids);
  return k;
}

/* Cancels the tasks that the task making `parent` (its first return)
 * submitted, and theirs, as Ray's recursive cancel does: those here, and
 * those on every other node (the head passes CANCEL_TREE on, to every node
 * but `from`, which sent it). */
static void td__cancel_tree(td_node_t *n, uint64_t parent, int force, td_wk_t *from) {
  td__cancel_matching(n, 1, parent, force);
  td__tell_cluster(n, from, TD_M_CANCEL_TREE, parent, force);
}

int td__on_cancel_tree(td_node_t *n, td_wk_t *wk, td_rd_t *rd) {
  uint64_t parent = td_rd_u64(rd);
  uint8_t force = td_rd_u8(rd);
  if (rd->bad || !parent) return TD_EPROTO;
  td__cancel_tree(n, parent, force & TD_CANCEL_FORCE, wk);
  return 0;
}

/* Cancels the task that makes obj_id: here, or where the ref came from
 * (work forwarded to the head, or made on another node), unless that is
 * `from`, which asked. */
static int td__cancel_from(td_node_t *n, uint64_t obj_id, int flags, td_wk_t *from) {
  td_obj_t *o = td__obj(n, obj_id);
  if (!o) return TD_ENOTFOUND;
  int force = flags & TD_CANCEL_FORCE;
  if (o->producer) {
    uint64_t r = td__parent_key(o->producer);
    td__task_cancel(n, o->producer, force);
    if ((flags & TD_CANCEL_RECURSIVE) && r) td__cancel_tree(n, r, force, NULL);
    return 0;
  }
  td_wk_t *up = o->foreign && o->state == OBJ_PENDING ? td__upstream_of(n, o) : NULL;
  if (!up || up == from) return TD_ENOTFOUND;
  td_chan_begin(&up->ch, TD_M_CANCEL_REF);
  td_buf_u64(&up->ch.out, obj_id);
  td_buf_u8(&up->ch.out, (uint8_t)flags);
  td_chan_end(&up->ch);
  return 0;
}

int td_node_cancel(td_node_t *n, uint64_t obj_id, int flags) {
  return td__cancel_from(n, obj_id, flags, NULL);
}

int td__on_cancel_ref(td_node_t *n, td_wk_t *wk, td_rd_t *rd) {
  uint64_t id = td_rd_u64(rd);
  uint8_t flags = td_rd_u8(rd);
  if (rd->bad) return TD_EPROTO;
  td__cancel_from(n, id, flags & (TD_CANCEL_FORCE | TD_CANCEL_RECURSIVE), wk);
  return 0;
}

/* Cancels t: dropped if it has not run yet, else stopped where it runs
 * (force: its worker killed; a node is asked to do the same). */
static void td__task_cancel(td_node_t *n, td_task_t *t, int force) {
  if (t->state == T_QUEUED || t->state == T_WAITDEPS) {
    if (t->state == T_QUEUED) tq_del(&n->sched.queue, t);
    else if (t->actor && t->spec.kind == TD_K_ACTOR_CALL) tq_del(&t->actor->queue, t);
    /* Drop it from the waiter lists of its dependencies. */
    for (uint32_t i = 0; i < t->spec.ndeps; i++) {
      td_obj_t *d = td__obj(n, t->spec.deps[i]);
      if (!d) continue;
      for (uint32_t k = 0; k < d->nwaiters; k++)
        if (d->waiters[k] == t) d->waiters[k--] = d->waiters[--d->nwaiters];
    }
    td__task_fail(n, t, "TaskCancelledError", "the task was cancelled before it ran");
    return;
  }
  if (t->state == T_SENT && t->wk) {
    t->cancelled = 1;
    /* Only the task the worker runs is killed with it: one queued behind
     * another on the worker is skipped when its turn comes (the worker
     * sees the cancel first), so the other is not killed too. */
    if (force && t->wk->kind == WK_TASK && t->wk->inflight.head == t) {
      t->force_cancel = 1;
      kill(t->wk->pid, SIGKILL);
    } else {
      td_chan_begin(&t->wk->ch, TD_M_CANCEL);
      td_buf_u64(&t->wk->ch.out, t->id);
      if (t->wk->kind == WK_NODE) td_buf_u8(&t->wk->ch.out, (uint8_t)force);
      td_chan_end(&t->wk->ch);
    }
  }
}

/* The job a submission from wk belongs to: a client's own id (ids are
 * unique in the cluster: each node makes them from its index), or the job
 * of the task the worker runs. An actor's work is the actor's, as in Ray:
 * its creator's job, and none for a detached actor (it outlives drivers). */
uint64_t td__job_of(td_node_t *n, const td_wk_t *wk) {
  if (wk->kind == WK_CLIENT) return wk->id;
  const td_task_t *t = wk->inflight.head;
  if (!t) return 0;
  if (t->spec.kind == TD_K_TASK) return t->spec.job;
  const td_actor_t *a = td_map_get(&n->actors.map, t->spec.actor_id);
  const td_spec_t *c = a && a->create ? &a->create->spec : &t->spec;
  return c->detached ? 0 : c->job;
}

/* A driver that left takes its tasks with it, as a Ray job's end does:
 * every task of its job here, whoever submitted it and whichever node it
 * came from, is dropped if it has not run and stopped if it runs (its
 * worker killed), so a job that was stopped, or ended without waiting on
 * them, leaves no work running for nobody. Actors are actor.c's. */
void td__tasks_job_end(td_node_t *n, uint64_t job) {
  size_t k = td__cancel_matching(n, 0, job, 1);
  if (k) td_log("job %016llx ended: %zu of its tasks here cancelled", (unsigned long long)job, k);
}

/* -- Messages (node.c's table dispatches them) ------------------------------ */

/* A function's definition, from a link, before the work that needs it. */
int td__on_fn(td_node_t *n, td_wk_t *wk, td_rd_t *rd) {
  uint64_t id = td_rd_u64(rd);
  uint32_t bl;
  const uint8_t *blob = td_rd_str(rd, &bl);
  if (rd->bad) return TD_EPROTO;
  td_node_register_fn(n, id, blob, bl);
  td_map_set(&wk->fns_sent, id, (void *)1); /* it has this one */
  return 0;
}

/* Work a worker's task submits, a client's work, or a node's work for its
 * head: held while the head is away, forwarded to the head when it does not
 * fit here, else submitted here. A submission that fails fails the handles
 * the submitter already holds, clearly. */
int td__on_submit(td_node_t *n, td_wk_t *wk, td_rd_t *rd) {
  const uint8_t *p = rd->p; /* the whole message, to hold it */
  uint32_t len = (uint32_t)(rd->end - rd->p);
  td_spec_t s;
  uint64_t *scratch;
  int rc = td_spec_decode(&s, rd, &scratch);
  /* Whose job: a client's own, or that of the work this worker runs; a
   * node's work says. */
  if (wk->kind != WK_NODE) {
    wk->submitted = 1;
    s.job = td__job_of(n, wk);
    s.parent = wk->kind != WK_CLIENT && wk->inflight.head ? td__parent_key(wk->inflight.head) : 0;
  }
  if (!rc && wk->kind != WK_NODE && td__hold_for_head(n, wk, &s, p, len)) {
    free(scratch);
    return 0;
  }
  if (!rc && wk->kind != WK_NODE && td__forward(n, &s)) {
    uint32_t nh = s.nret < 0 ? 1 : (uint32_t)s.nret;
    for (uint32_t i = 0; i < nh; i++) td__count(wk, &wk->held, s.rets[i], 1);
    uint64_t owner = wk->kind == WK_CLIENT ? wk->id : wk->inflight.head ? wk->inflight.head->owner : 0;
    /* Kept for a driver here, until it leaves; the head's own work's
     * actors end with their job there (td__job_end), and an entry for
     * the head's link would stay for good. */
    if (s.kind == TD_K_ACTOR_NEW && !s.detached && owner && (!n->links.head || owner != n->links.head->id))
      td_map_set(&n->links.fwd_actors, s.actor_id, (void *)(uintptr_t)owner);
    free(scratch);
    return 0;
  }
  if (!rc && wk->kind == WK_NODE) {
    td__import(n, wk, s.deps, s.ndeps);
    td__import(n, wk, s.refs, s.nrefs);
    if (s.kind == TD_K_TASK && s.strategy == TD_ST_DEFAULT && !s.pg_id) td__node_full(wk, &s);
  }
  if (!rc) {
    const char *msg;
    /* Whose work: a client's, or the work of the task this worker runs. */
    n->tasks.submitter = wk->kind == WK_CLIENT ? wk->id : wk->inflight.head ? wk->inflight.head->owner : 0;
    n->tasks.submitter_task = wk->kind == WK_CLIENT || !wk->inflight.head ? 0 : wk->inflight.head->owner_task;
    n->tasks.submitter_node = wk->kind == WK_NODE ? wk->node_index + 1 : 0;
    int sub = td_node_submit(n, &s, &msg);
    n->tasks.submitter = n->tasks.submitter_task = 0;
    n->tasks.submitter_node = 0;
    if (sub == 0 && s.kind == TD_K_ACTOR_NEW) {
      td_actor_t *na = td_map_get(&n->actors.map, s.actor_id);
      if (na) na->owner = wk->id;
    }
    uint32_t nh = s.nret < 0 ? 1 : (uint32_t)s.nret;
    for (uint32_t i = 0; i < nh; i++) td__count(wk, &wk->held, s.rets[i], 1);
    if (sub != 0) {
      td__errblob(&n->tmp, s.kind == TD_K_ACTOR_CALL ? "ActorDiedError" : "TaskError", msg);
      for (uint32_t i = 0; i < nh; i++) {
        td_obj_t *o = td__obj_new(n, s.rets[i]);
        o->refs++;
        td__obj_fail(n, o, n->tmp.p, n->tmp.len);
      }
    }
  }
  free(scratch);
  return rc;
}

/* 1 while a result of t is still being fetched from the node that ran it. */
int td__task_fetching(td_node_t *n, td_task_t *t) {
  uint32_t nr = t->spec.nret < 0 ? 1 : (uint32_t)t->spec.nret;
  for (uint32_t i = 0; i < nr; i++) {
    td_obj_t *o = td__obj(n, t->spec.rets[i]);
    if (o && (o->chunked || o->away) && o->producer == t) return 1;
  }
  return 0;
}

/* A worker runs what it was sent in order: a task began when it was sent
 * or when the one before it ended, whichever is later (a node link runs
 * many at once: its tasks began when sent). */
static void td__task_timed(td_node_t *n, td_wk_t *wk, td_task_t *t, int ok) {
  if (t->spec.kind != TD_K_TASK && !n->tl) return;
  double now = td_now();
  double begun = wk->kind == WK_NODE || t->sent_at > wk->last_done ? t->sent_at : wk->last_done;
  if (n->tl) td__tl_record(n, t, wk, begun, now, ok, 1);
  if (t->spec.kind != TD_K_TASK) {
    wk->last_done = now;
    return;
  }
  double dur = now - (t->sent_at > wk->last_done ? t->sent_at : wk->last_done);
  wk->last_done = now;
  td_fnstat_t *st = td_map_get(&n->sched.fnstats, t->spec.fn_id);
  if (!st) {
    st = td_xcalloc(1, sizeof(*st));
    td_map_set(&n->sched.fnstats, t->spec.fn_id, st);
    st->avg = dur;
  } else {
    st->avg = 0.8 * st->avg + 0.2 * dur;
  }
  st->n++;
}

/* Head: a large return a node keeps for us until we have fetched it in
 * chunks (TD_V_PULL, u64 size, then refs and pushed objects as usual). */
static int td__on_done_chunked(td_node_t *n, td_wk_t *wk, td_rd_t *rd, td_obj_t *o) {
  td_rd_u8(rd);
  uint64_t total = td_rd_u64(rd), id = td_rd_u64(rd);
  uint32_t nrefs = td_rd_u32(rd);
  const uint8_t *rp = td_rd_bytes(rd, (size_t)nrefs * 8);
  if (rd->bad) return TD_EPROTO;
  uint64_t *refs = td_xmalloc((size_t)nrefs * 8 + 8), *made = NULL;
  uint32_t nmade = 0;
  if (nrefs) memcpy(refs, rp, (size_t)nrefs * 8);
  if (td__link_pushed(n, rd, &made, &nmade)) {
    free(refs);
    free(made);
    return TD_EPROTO;
  }
  td__import(n, wk, refs, nrefs);
  if (o && o->id == id && o->state == OBJ_PENDING && !o->chunked) {
    o->foreign = 1; /* holds the node's ref until fetched (or freed) */
    o->up = wk->node_index + 1;
    if (nrefs) {
      o->contained = td_xmalloc((size_t)nrefs * 8);
      memcpy(o->contained, refs, (size_t)nrefs * 8);
      o->ncontained = nrefs;
      for (uint32_t i = 0; i < nrefs; i++) td_node_incref(n, refs[i]);
    }
    if (o->producer && o->producer->spec.kind != TD_K_ACTOR_NEW && total)
      td__obj_away(n, o, wk, total); /* stays there until needed here */
    else td__chunk_begin(n, o, total, wk);
  } else {
    td__send_refs1(wk, id, -1); /* not wanted (any more): let it go */
  }
  for (uint32_t k = 0; k < nmade; k++) td_node_decref(n, made[k]);
  free(made);
  free(refs);
  return 0;
}

int td__on_done(td_node_t *n, td_wk_t *wk, td_rd_t *rd) {
  uint64_t tid = td_rd_u64(rd);
  uint8_t ok = td_rd_u8(rd);
  td_task_t *t = td_map_get(&n->tasks.map, tid);
  if (t && t->wk != wk) t = NULL;
  if (ok) {
    uint32_t nv = td_rd_u32(rd);
    if (rd->bad || (t && t->spec.nret >= 0 && nv != (uint32_t)t->spec.nret)) return TD_EPROTO;
    for (uint32_t i = 0; i < nv; i++) {
      int shm;
      const uint8_t *p = NULL;
      size_t len, off = 0;
      if (wk->kind == WK_NODE && rd->p < rd->end && *rd->p == TD_V_PULL) {
        if (td__on_done_chunked(n, wk, rd, t ? td__obj(n, t->spec.rets[i]) : NULL)) return TD_EPROTO;
        continue;
      }
      if (td__read_value(rd, &shm, &p, &len, &off)) return TD_EPROTO;
      if (shm && !td__take_extent(wk, off, len)) return TD_EPROTO;
      uint32_t nrefs = td_rd_u32(rd);
      const uint8_t *rp = td_rd_bytes(rd, (size_t)nrefs * 8);
      if (rd->bad) return TD_EPROTO;
      uint64_t *refs = nrefs ? td_xmalloc((size_t)nrefs * 8) : NULL; /* most results hold none */
      if (nrefs) memcpy(refs, rp, (size_t)nrefs * 8);
      uint64_t *made = NULL;
      uint32_t nmade = 0;
      if (wk->kind == WK_NODE) {
        if (td__link_pushed(n, rd, &made, &nmade)) {
          free(refs);
          free(made);
          return TD_EPROTO;
        }
        td__import(n, wk, refs, nrefs);
      }
      td_obj_t *o = t ? td__obj(n, t->spec.rets[i]) : NULL;
      if (o && !shm && wk->kind == WK_NODE) td__obj_fill(n, o, OBJ_READY, p, len, refs, nrefs);
      else if (o) td__obj_set(n, o, OBJ_READY, shm, p, len, off, refs, nrefs);
      else if (shm) td_store_free(n->objs.store, off, len);
      for (uint32_t k = 0; k < nmade; k++) td_node_decref(n, made[k]);
      free(made);
      free(refs);
    }
    if (t && t->spec.nret < 0) {
      td_obj_t *o = td__obj(n, t->spec.rets[0]);
      if (o) {
        o->stream_done = 1;
        o->state = OBJ_READY;
        o->loc = LOC_INLINE;
        o->producer = NULL;
        td__obj_wake(n, o);
      }
    }
  } else {
    uint32_t len;
    const uint8_t *blob = td_rd_str(rd, &len);
    if (rd->bad) return TD_EPROTO;
    if (t && t->spec.kind == TD_K_TASK && t->spec.retry_exceptions && t->retries_left != 0 && !t->cancelled) {
      /* retry_exceptions: the task runs again, like after a crash. */
      if (t->retries_left > 0) t->retries_left--;
      td__inflight_del(n, wk, t);
      td__unpin_deps(n, t);
      t->state = T_QUEUED;
      t->wk = NULL;
      tq_push_front(&n->sched.queue, t);
      td__lease_done(n, wk);
      return 0;
    }
    if (t) {
      td__obs_failed(n, t, blob, len, NULL, NULL); /* tide list tasks shows it */
      uint32_t nr = t->spec.nret < 0 ? 1 : (uint32_t)t->spec.nret;
      for (uint32_t i = 0; i < nr; i++) {
        td_obj_t *o = td__obj(n, t->spec.rets[i]);
        if (o) td__obj_fail(n, o, blob, len);
      }
    }
  }
  if (t) {
    td__inflight_del(n, wk, t);
    td__task_timed(n, wk, t, ok);
    if (td__task_fetching(n, t)) {
      td__unpin_deps(n, t);
      t->state = T_FETCHING;
      t->wk = NULL;
    } else {
      td__task_finish(n, t);
    }
    td__lease_done(n, wk);
  }
  return 0;
}

int td__on_item(td_node_t *n, td_wk_t *wk, td_rd_t *rd) {
  uint64_t tid = td_rd_u64(rd), item = td_rd_u64(rd);
  int shm;
  const uint8_t *p = NULL;
  size_t len, off = 0;
  if (td__read_value(rd, &shm, &p, &len, &off)) return TD_EPROTO;
  if (shm && !td__take_extent(wk, off, len)) return TD_EPROTO;
  uint32_t nrefs = td_rd_u32(rd);
  const uint8_t *rp = td_rd_bytes(rd, (size_t)nrefs * 8);
  if (rd->bad || !item) return TD_EPROTO;
  td_task_t *t = td_map_get(&n->tasks.map, tid);
  td_obj_t *s = t && t->wk == wk && t->spec.nret < 0 ? td__obj(n, t->spec.rets[0]) : NULL;
  if (!s || td__obj(n, item)) {
    if (shm) td_store_free(n->objs.store, off, len);
    return 0;
  }
  uint64_t *refs = td_xmalloc((size_t)nrefs * 8 + 8);
  if (nrefs) memcpy(refs, rp, (size_t)nrefs * 8);
  td_obj_t *io = td__obj_new(n, item);
  io->refs = 1; /* held by the stream */
  td__obj_set(n, io, OBJ_READY, shm, p, len, off, refs, nrefs);
  free(refs);
  if (s->nitems == s->capitems) {
    s->capitems = s->capitems ? s->capitems * 2 : 8;
    s->items = td_xrealloc(s->items, s->capitems * 8);
  }
  s->items[s->nitems++] = item;
  n->objs.dirty = 1;
  if (s->fwd) td__fwd_note(n, s->id);
  return 0;
}

/* The tasks and calls sent to a worker or node that died: a task runs
 * again if it has retries (or was only queued behind the one that was
 * running), else fails; an actor's call is sent again if both it and the
 * actor have retries, else fails. */
void td__tasks_lost(td_node_t *n, td_wk_t *wk, const char *reason) {
  int first = 1;
  while (wk->inflight.head) {
    td_task_t *t = wk->inflight.head;
    td__inflight_del(n, wk, t);
    td__unpin_deps(n, t);
    t->wk = NULL;
    if (t->spec.kind == TD_K_TASK) {
      if (t->cancelled) {
        td__task_fail(n, t, "TaskCancelledError", "the task was cancelled");
      } else if (!first || t->retries_left != 0) {
        if (first && t->retries_left > 0) t->retries_left--;
        t->state = T_QUEUED;
        tq_push_front(&n->sched.queue, t);
      } else {
        td__task_fail(n, t, "WorkerCrashedError", reason);
      }
    } else if (t->spec.kind == TD_K_ACTOR_CALL) {
      td_actor_t *a = t->actor;
      if (t->retries_left != 0 && a->restarts_left != 0) {
        if (t->retries_left > 0) t->retries_left--;
        t->state = T_QUEUED;
        tq_push_front(&a->queue, t);
      } else {
        char msg[400];
        snprintf(msg, sizeof(msg), "the actor's process died: %s", reason);
        td__task_fail(n, t, "ActorDiedError", msg);
      }
    }
    first = wk->kind == WK_NODE; /* every task on a node was running */
  }
}
