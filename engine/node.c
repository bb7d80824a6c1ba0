/* Tide node (see node.h): workers, scheduling, objects, actors. */
#include "node.h"

#include <errno.h>
#include <netinet/in.h>
#include <arpa/inet.h>
#include <net/if.h>
#include <ifaddrs.h>
#include <stddef.h>
#include <fcntl.h>
#include <limits.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "chan.h"
#include "spill.h"
#include "persist.h"
#include "pkg.h"
#include "value.h"
#include "term.h"

#include "node_int.h"
#include "introspect.h"

td_obj_t *td__obj_from_bytes(td_node_t *n, uint64_t id, int state, const uint8_t *p, size_t len);
void td__wk_dead(td_node_t *n, td_wk_t *wk, const char *why);
int td__task_fetching(td_node_t *n, td_task_t *t);
void td__task_finish(td_node_t *n, td_task_t *t);

/* -- Queues ---------------------------------------------------------------- */

void td__inflight_add(td_node_t *n, td_wk_t *wk, td_task_t *t) {
  tq_push(&wk->inflight, t);
  t->slow = 0;
  if (t->spec.kind != TD_K_TASK) {
    if (n->tl) t->sent_at = td_now(); /* the timeline's start of a call */
    return;
  }
  t->sent_at = td_now();
  td_fnstat_t *st = td_map_get(&n->fnstats, t->spec.fn_id);
  t->slow = !(st && st->avg < TD_SHORT_TASK);
  wk->nslow += t->slow;
}

void td__take(double *pool, const td_task_t *t, double sign);
void td__inflight_del(td_node_t *n, td_wk_t *wk, td_task_t *t) {
  tq_del(&wk->inflight, t);
  if (t->node_held == 1) {  /* back to the node link it held */
    td__take(wk->navail, t, -1);
  } else if (t->node_held == 2) {  /* back to its bundle */
    td_pg_t *pg = td__pg(n, t->spec.pg_id);
    if (pg && !pg->removed && t->held_bundle >= 0 && t->held_bundle < pg->nb) td__take(pg->avail[t->held_bundle], t, -1);
  }
  t->node_held = 0;
  wk->nslow -= t->slow;
  t->slow = 0;
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
  td_fnstat_t *st = td_map_get(&n->fnstats, t->spec.fn_id);
  if (!st) {
    st = td_xcalloc(1, sizeof(*st));
    td_map_set(&n->fnstats, t->spec.fn_id, st);
    st->avg = dur;
  } else {
    st->avg = 0.8 * st->avg + 0.2 * dur;
  }
  st->n++;
}

/* -- Error blobs -------------------------------------------------------------
 * Errors made by the node are encoded like a Lua table
 * {kind = ..., message = ..., traceback = ""}, so the bindings decode every
 * error the same way. */

void td__put_lstr(td_buf_t *b, const char *s) {
  td_buf_u8(b, TD_T_STR);
  td_buf_str(b, s, strlen(s));
}
void td__errblob(td_buf_t *b, const char *kind, const char *msg) {
  td_buf_reset(b);
  td_buf_u8(b, TD_T_TABLE);
  td_buf_u32(b, 0);
  td_buf_u32(b, 3);
  td__put_lstr(b, "kind"); td__put_lstr(b, kind);
  td__put_lstr(b, "message"); td__put_lstr(b, msg);
  td__put_lstr(b, "traceback"); td__put_lstr(b, "");
}

void td__pull(td_node_t *n, td_obj_t *o);
void td__send_fns(td_node_t *n, td_wk_t *wk);
void td__export(td_node_t *n, const uint64_t *ids, uint32_t k);
void td__import(td_node_t *n, td_wk_t *from, const uint64_t *ids, uint32_t k);

void td__obj_wake(td_node_t *n, td_obj_t *o);

/* Reserves every bundle of a placement group on the nodes its strategy
 * allows, or none: the choice is made on copies of the pools first. */

static void td__restore_node(void *ud, const char *key, const void *val, size_t len) {
  td_node_t *n = ud;
  (void)val, (void)len;
  unsigned long idx = strtoul(key, NULL, 10);
  /* Indices given before stay reserved for nodes that come back. */
  if (idx > n->next_index && idx <= TD_NODE_MAX) n->next_index = (uint32_t)idx;
}

/* Before any worker is made: ids continue past the last boot's. */
static void td__restore_ids(td_node_t *n) {
  if (!td_persist_on()) return;
  td_persist_each("meta", td__restore_meta, n);
  n->next_wk = (n->next_wk + 256) & ~(uint64_t)255;
  char v[24];
  int l = snprintf(v, sizeof(v), "%llu", (unsigned long long)(n->next_wk + 256));
  td_persist_put("meta", "next_wk", v, (size_t)l);
}

void td_node_restore(td_node_t *n) {
  td_persist_each("node", td__restore_node, n);
  if (n->next_index) td__settle(n, NULL);  /* its nodes rejoin: work that needs them waits */
  /* Nodes still running restored actors rejoin and report them; only then
   * are the others placed anew. A node tries to rejoin every 4 s at most
   * (a 3 s handshake, a 1 s pause), and one try may start just before
   * this head listens: the wait covers two tries. */
  double adopt = 2 * n->node_timeout;
  n->adopt_until = td_now() + (adopt > 6 ? adopt : 6);
  n->restoring = 1;
  td_persist_each("pg", td__restore_pg, n);
  td_persist_each("actor", td__restore_actor, n);
  td_persist_each("actor_up", td__restore_actor_up, n);
  n->restoring = 0;
}

/* -- A restarted head: what head.db kept -------------------------------------------------- */

int td__kill_actor(td_node_t *n, uint64_t actor_id, int no_restart, const char *why);

/* -- Stats (placement groups are in pg.c) ------------------------------------------------- */

void td_node_stats(td_node_t *n, td_node_stats_t *st) {
  memset(st, 0, sizeof(*st));
  for (int i = 0; i < n->nwks; i++) {
    if (n->wks[i]->dead || n->wks[i]->kind >= WK_CLIENT) continue;  /* clients and links */
    st->workers++;
    st->tasks_running += n->wks[i]->inflight.len;
  }
  size_t it = 0;
  td_actor_t *a;
  while (td_map_next(&n->actors, &it, NULL, (void **)&a)) st->actors += a->state != A_DEAD;
  st->tasks_queued = n->queue.len;
  st->objects = n->objs.len;
  st->store_used = td_store_used(n->store);
  st->store_capacity = td_store_capacity(n->store);
  st->spilled_bytes = td_spill_used(n->spill);
  st->bytes_sent = n->bytes_sent;
  st->bytes_from_peers = n->bytes_from_peers;
}

/* -- Messages from workers ---------------------------------------------------------------- */

/* Reads one value as sent by a worker: inline or an extent it filled. */
static int td__read_value(td_rd_t *rd, int *shm, const uint8_t **p, size_t *len, size_t *off) {
  uint8_t kind = td_rd_u8(rd);
  if (kind == TD_V_INLINE) {
    uint32_t l;
    *p = td_rd_str(rd, &l);
    *len = l;
    *shm = 0;
  } else if (kind == TD_V_SHM) {
    *off = td_rd_u64(rd);
    *len = td_rd_u64(rd);
    *shm = 1;
  } else {
    return TD_EPROTO;
  }
  return rd->bad ? TD_EPROTO : 0;
}

/* A worker may only hand back an extent it was lent, whole: anything else
 * would let a bad message free or alias memory it does not own. */
static int td__take_extent(td_wk_t *wk, size_t off, size_t len) {
  void *v = td_map_get(&wk->allocs, (uint64_t)off + 1);
  if (!v || (size_t)(uintptr_t)v != len) return 0;
  td_map_del(&wk->allocs, (uint64_t)off + 1);
  return 1;
}

/* Gives back what a dead worker was lent and never used. */
static void td__free_lent(td_node_t *n, td_wk_t *wk) {
  size_t it = 0;
  uint64_t k;
  void *v;
  while (td_map_next(&wk->allocs, &it, &k, &v)) td_store_free(n->store, (size_t)(k - 1), (size_t)(uintptr_t)v);
  td_map_free(&wk->allocs);
}

void td__wk_dead(td_node_t *n, td_wk_t *wk, const char *why);

void td__send_refs1(td_wk_t *up, uint64_t id, int32_t delta);

/* 1 while a result of t is still being fetched from the node that ran it. */
int td__task_fetching(td_node_t *n, td_task_t *t) {
  uint32_t nr = t->spec.nret < 0 ? 1 : (uint32_t)t->spec.nret;
  for (uint32_t i = 0; i < nr; i++) {
    td_obj_t *o = td__obj(n, t->spec.rets[i]);
    if (o && (o->chunked || o->away) && o->producer == t) return 1;
  }
  return 0;
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
  if (td__link_pushed(n, rd, &made, &nmade)) { free(refs); free(made); return TD_EPROTO; }
  td__import(n, wk, refs, nrefs);
  if (o && o->id == id && o->state == OBJ_PENDING && !o->chunked) {
    o->foreign = 1;  /* holds the node's ref until fetched (or freed) */
    o->up = wk->node_index + 1;
    if (nrefs) {
      o->contained = td_xmalloc((size_t)nrefs * 8);
      memcpy(o->contained, refs, (size_t)nrefs * 8);
      o->ncontained = nrefs;
      for (uint32_t i = 0; i < nrefs; i++) td_node_incref(n, refs[i]);
    }
    if (o->producer && o->producer->spec.kind != TD_K_ACTOR_NEW && total)
      td__obj_away(n, o, wk, total);  /* stays there until needed here */
    else
      td__chunk_begin(n, o, total, wk);
  } else {
    td__send_refs1(wk, id, -1);  /* not wanted (any more): let it go */
  }
  for (uint32_t k = 0; k < nmade; k++) td_node_decref(n, made[k]);
  free(made);
  free(refs);
  return 0;
}

static int td__on_done(td_node_t *n, td_wk_t *wk, td_rd_t *rd) {
  uint64_t tid = td_rd_u64(rd);
  uint8_t ok = td_rd_u8(rd);
  td_task_t *t = td_map_get(&n->tasks, tid);
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
      uint64_t *refs = nrefs ? td_xmalloc((size_t)nrefs * 8) : NULL;  /* most results hold none */
      if (nrefs) memcpy(refs, rp, (size_t)nrefs * 8);
      uint64_t *made = NULL;
      uint32_t nmade = 0;
      if (wk->kind == WK_NODE) {
        if (td__link_pushed(n, rd, &made, &nmade)) { free(refs); free(made); return TD_EPROTO; }
        td__import(n, wk, refs, nrefs);
      }
      td_obj_t *o = t ? td__obj(n, t->spec.rets[i]) : NULL;
      if (o && !shm && wk->kind == WK_NODE) td__obj_fill(n, o, OBJ_READY, p, len, refs, nrefs);
      else if (o) td__obj_set(n, o, OBJ_READY, shm, p, len, off, refs, nrefs);
      else if (shm) td_store_free(n->store, off, len);
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
      tq_push_front(&n->queue, t);
      td__lease_done(n, wk);
      return 0;
    }
    if (t) {
      td__obs_failed(n, t, blob, len, NULL, NULL);  /* tide list tasks shows it */
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

static int td__on_item(td_node_t *n, td_wk_t *wk, td_rd_t *rd) {
  uint64_t tid = td_rd_u64(rd), item = td_rd_u64(rd);
  int shm;
  const uint8_t *p = NULL;
  size_t len, off = 0;
  if (td__read_value(rd, &shm, &p, &len, &off)) return TD_EPROTO;
  if (shm && !td__take_extent(wk, off, len)) return TD_EPROTO;
  uint32_t nrefs = td_rd_u32(rd);
  const uint8_t *rp = td_rd_bytes(rd, (size_t)nrefs * 8);
  if (rd->bad || !item) return TD_EPROTO;
  td_task_t *t = td_map_get(&n->tasks, tid);
  td_obj_t *s = t && t->wk == wk && t->spec.nret < 0 ? td__obj(n, t->spec.rets[0]) : NULL;
  if (!s || td__obj(n, item)) {
    if (shm) td_store_free(n->store, off, len);
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
  n->dirty = 1;
  if (s->fwd) td__fwd_note(n, s->id);
  return 0;
}

/* Links carry chunks of large values (transfer.c reads them into place). */
void td__link_chan(td_wk_t *wk) {
  wk->ch.split = TD_M_CHUNK;
  wk->ch.split_head = TD__CHUNK_HEAD;
}

/* -- Messages: from workers, clients, nodes and the head ------------------------------ */

/* A print from task tid goes to the client whose work it is (a driver
 * attached to this node), or to the head when the head sent the task. */
static void td__print_to_owner(td_node_t *n, uint64_t tid, const uint8_t *s, uint32_t l) {
  td_task_t *t = tid ? td_map_get(&n->tasks, tid) : NULL;
  if (!t || !t->owner) return;
  for (int i = 0; i < n->nwks; i++) {
    td_wk_t *w = n->wks[i];
    if (w->id != t->owner || w->dead || (w->kind != WK_CLIENT && w->kind != WK_HEAD)) continue;
    td_chan_begin(&w->ch, TD_M_PRINT);
    td_buf_str(&w->ch.out, s, l);
    if (w->kind == WK_HEAD) td_buf_u64(&w->ch.out, t->owner_task);
    td_chan_end(&w->ch);
    return;
  }
}

static int td__on_msg(td_node_t *n, td_wk_t *wk, uint8_t type, const uint8_t *p, uint32_t len) {
  td_rd_t rd;
  td_rd_init(&rd, p, len);
  /* Another node's link carries chunks, and nothing else. */
  if (wk->kind == WK_PEER && type != TD_M_CHUNK_GET && type != TD_M_CHUNK && type != TD_M_HELLO && type != TD_M_DP)
    return TD_EPROTO;
  switch (type) {
    case TD_M_READY: return 0;
    case TD_M_FN: {
      if (wk->kind != WK_NODE && wk->kind != WK_HEAD) return TD_EPROTO;
      uint64_t id = td_rd_u64(&rd);
      uint32_t bl;
      const uint8_t *blob = td_rd_str(&rd, &bl);
      if (rd.bad) return TD_EPROTO;
      td_node_register_fn(n, id, blob, bl);
      td_map_set(&wk->fns_sent, id, (void *)1);  /* it has this one */
      return 0;
    }
    case TD_M_REPLY:
      if (wk->kind != WK_NODE && wk->kind != WK_HEAD) return TD_EPROTO;
      return td__on_link_reply(n, wk, &rd);
    case TD_M_PKG_GET: return td__on_pkg_get(n, wk, &rd);
    case TD_M_CHUNK_GET: return td__on_chunk_get(n, wk, &rd);
    case TD_M_CHUNK: return td__on_chunk(n, wk, &rd);
    case TD_M_LINEAGE: return td__on_lineage(n, wk, &rd);
    case TD_M_PKG: return td__on_pkg(n, wk, &rd);
    case TD_M_BEAT:
      if (wk->kind == WK_NODE && len >= 48) {
        td_node_stats_t *st = &wk->nstats;
        st->workers = (int)td_rd_u32(&rd);
        st->actors = (int)td_rd_u32(&rd);
        st->tasks_running = (int)td_rd_u32(&rd);
        st->tasks_queued = (int)td_rd_u32(&rd);
        st->objects = td_rd_u64(&rd);
        st->store_used = td_rd_u64(&rd);
        st->store_capacity = td_rd_u64(&rd);
        st->spilled_bytes = td_rd_u64(&rd);
        st->bytes_sent = rd.p < rd.end ? td_rd_u64(&rd) : 0;
        st->bytes_from_peers = rd.p < rd.end ? td_rd_u64(&rd) : 0;
        wk->has_nstats = !rd.bad;
      }
      if (wk->kind == WK_CLIENT) {
        /* A node of an earlier head: tell it to join again. */
        td_chan_begin(&wk->ch, TD_M_WELCOME);
        td_buf_u32(&wk->ch.out, 0);
        td_chan_end(&wk->ch);
      }
      return 0;
    case TD_M_JOIN: return td__on_join(n, wk, &rd);
    case TD_M_NODE_INFO: return td__on_node_info(n, wk, &rd);
    case TD_M_NODE_TASK: return td__on_node_task(n, wk, &rd);
    case TD_M_HELLO: return wk->kind == WK_HEAD || wk->kind == WK_PEER ? 0 : TD_EPROTO;
    case TD_M_PEER: {  /* another node, to fetch chunks of objects this one has */
      uint32_t idx = td_rd_u32(&rd);
      if (rd.bad || wk->kind != WK_CLIENT) return TD_EPROTO;
      wk->kind = WK_PEER;
      wk->node_index = idx;
      td__link_chan(wk);
      td__dp_advertise(n, wk);
      td_log("node-%u linked to this node", idx);
      return 0;
    }
    case TD_M_HAVE: return td__on_have(n, wk, &rd);
    case TD_M_DP: return td__on_dp(n, wk, &rd);
    case TD_M_KILL: {
      uint64_t aid = td_rd_u64(&rd);
      int no_restart = td_rd_u8(&rd);
      uint32_t l;
      const uint8_t *why = td_rd_str(&rd, &l);
      if (rd.bad || wk->kind != WK_NODE) return TD_EPROTO;
      char msg[200];
      snprintf(msg, sizeof(msg), "%.*s", (int)(l < 150 ? l : 150), why);
      td__kill_actor(n, aid, no_restart, msg);
      return 0;
    }
    case TD_M_WELCOME:
      /* Index 0: the head restarted and does not know this node. */
      if (wk->kind != WK_HEAD) return TD_EPROTO;
      if (td_rd_u32(&rd) == 0) wk->last_seen = 0;
      return 0;
    case TD_M_CANCEL: {
      if (wk->kind != WK_HEAD) return TD_EPROTO;
      uint64_t htid = td_rd_u64(&rd);
      uint8_t force = td_rd_u8(&rd);
      td_fwd_t *f = rd.bad ? NULL : td_map_get(&n->fwd, htid);
      if (f) td_node_cancel(n, f->rets[0], force);
      return rd.bad ? TD_EPROTO : 0;
    }
    case TD_M_ACTOR_KILL: {
      if (wk->kind != WK_HEAD) return TD_EPROTO;
      uint64_t aid = td_rd_u64(&rd);
      if (rd.bad) return TD_EPROTO;
      td_actor_t *a = td_map_get(&n->actors, aid);
      if (a && a->fwd_attempt) {
        a->fwd_attempt = 0;  /* the head knows */
        td_node_kill_actor(n, aid, 1);
      }
      return 0;
    }
    case TD_M_REMOTE: {
      if (wk->kind != WK_CLIENT) return TD_EPROTO;
      uint32_t al = 0;
      const uint8_t *addr = rd.p < rd.end ? td_rd_str(&rd, &al) : NULL;
      if (rd.bad) return TD_EPROTO;
      /* An IP address (v4 or v6), or nothing: other nodes are sent there. */
      uint32_t ok = 0;
      while (ok < al && ok < sizeof(wk->peer_host) - 1 && strchr("0123456789abcdefABCDEF.:", addr[ok]) && addr[ok]) ok++;
      if (ok == al && al) {
        memcpy(wk->peer_host, addr, al);
        wk->peer_host[al] = 0;
      }
      wk->remote = 1;
      td_sock_bulk(wk->ch.fd);  /* a bridged peer: chunks of values go this way */
      return 0;
    }
    case TD_M_DONE: return td__on_done(n, wk, &rd);
    case TD_M_ITEM: return td__on_item(n, wk, &rd);
    case TD_M_SUBMIT: {
      td_spec_t s;
      uint64_t *scratch;
      int rc = td_spec_decode(&s, &rd, &scratch);
      if (!rc && wk->kind != WK_NODE && td__hold_for_head(n, wk, &s, p, len)) {
        free(scratch);
        return 0;
      }
      if (!rc && wk->kind != WK_NODE && td__forward(n, &s)) {
        uint32_t nh = s.nret < 0 ? 1 : (uint32_t)s.nret;
        for (uint32_t i = 0; i < nh; i++) td__count(wk, &wk->held, s.rets[i], 1);
        uint64_t owner = wk->kind == WK_CLIENT ? wk->id : wk->inflight.head ? wk->inflight.head->owner : 0;
        if (s.kind == TD_K_ACTOR_NEW && !s.detached && owner)
          td_map_set(&n->fwd_actors, s.actor_id, (void *)(uintptr_t)owner);
        free(scratch);
        return 0;
      }
      if (!rc && wk->kind == WK_NODE) {
        td__import(n, wk, s.deps, s.ndeps);
        td__import(n, wk, s.refs, s.nrefs);
      }
      if (!rc) {
        const char *msg;
        /* Whose work: a client's, or the work of the task this worker runs. */
        n->submitter = wk->kind == WK_CLIENT ? wk->id : wk->inflight.head ? wk->inflight.head->owner : 0;
        n->submitter_task = wk->kind == WK_CLIENT || !wk->inflight.head ? 0 : wk->inflight.head->owner_task;
        int sub = td_node_submit(n, &s, &msg);
        n->submitter = n->submitter_task = 0;
        if (sub == 0 && s.kind == TD_K_ACTOR_NEW) {
          td_actor_t *na = td_map_get(&n->actors, s.actor_id);
          if (na) na->owner = wk->id;
        }
        uint32_t nh = s.nret < 0 ? 1 : (uint32_t)s.nret;
        for (uint32_t i = 0; i < nh; i++) td__count(wk, &wk->held, s.rets[i], 1);
        if (sub != 0) {
          /* The submitter already holds handles: fail them clearly. */
          td__errblob(&n->tmp, s.kind == TD_K_ACTOR_CALL ? "ActorDiedError" : "TaskError", msg);
          uint32_t nr = s.nret < 0 ? 1 : (uint32_t)s.nret;
          for (uint32_t i = 0; i < nr; i++) {
            td_obj_t *o = td__obj_new(n, s.rets[i]);
            o->refs++;
            td__obj_fail(n, o, n->tmp.p, n->tmp.len);
          }
        }
      }
      free(scratch);
      return rc;
    }
    case TD_M_GET:
    case TD_M_WAIT:
    case TD_M_STREAM_NEXT:
    case TD_M_STREAM_ROOM:
      td__req_add(n, wk, type, &rd);
      return rd.bad ? TD_EPROTO : 0;
    case TD_M_PUT: {
      uint64_t id = td_rd_u64(&rd);
      int shm;
      const uint8_t *vp = NULL;
      size_t vlen, off = 0;
      if (td__read_value(&rd, &shm, &vp, &vlen, &off)) return TD_EPROTO;
      if (shm && !td__take_extent(wk, off, vlen)) return TD_EPROTO;
      uint32_t nrefs = td_rd_u32(&rd);
      const uint8_t *rp = td_rd_bytes(&rd, (size_t)nrefs * 8);
      if (rd.bad || !id || td__obj(n, id)) return TD_EPROTO;
      uint64_t *refs = td_xmalloc((size_t)nrefs * 8 + 8);
      if (nrefs) memcpy(refs, rp, (size_t)nrefs * 8);
      td_obj_t *o = td__obj_new(n, id);
      o->refs = 1;
      td__count(wk, &wk->held, id, 1);
      td__obj_set(n, o, OBJ_READY, shm, vp, vlen, off, refs, nrefs);
      free(refs);
      return 0;
    }
    case TD_M_REFS: {
      uint32_t cnt = td_rd_u32(&rd);
      for (uint32_t i = 0; i < cnt && !rd.bad; i++) {
        uint64_t id = td_rd_u64(&rd);
        int32_t d = (int32_t)td_rd_u32(&rd);
        if (rd.bad) break;
        td_obj_t *o = td__obj(n, id);
        if (!o && d > 0) o = td__foreign(n, id, 0);  /* a ref to another node's object */
        if (!o || d == 0) continue;
        if (d > 0) {
          /* Saturate: a forged count cannot overflow. */
          if (o->refs > INT64_MAX / 2) continue;
          o->refs += d;
          td__count(wk, &wk->held, id, d);
        } else {
          /* One step, whatever the count: a forged delta cannot spin. */
          intptr_t held = (intptr_t)td_map_get(&wk->held, id);
          intptr_t give = held < -(intptr_t)d ? held : -(intptr_t)d;
          td__count(wk, &wk->held, id, -give);
          td_copy_t *e = o->copies && wk->kind == WK_NODE ? td__copy(o->copies, wk->node_index) : NULL;
          if (e && e->done) td__copy_drop(o->copies, wk->node_index);  /* it let its copy go */
          /* A link gives back only what it holds: refs a link that was
           * thought dead held were given back with it. */
          td__unref(n, o, wk->kind == WK_NODE || wk->kind == WK_HEAD ? give : -(int64_t)d);
        }
      }
      return rd.bad ? TD_EPROTO : 0;
    }
    case TD_M_PIN:
    case TD_M_UNPIN: {
      uint32_t cnt = td_rd_u32(&rd);
      for (uint32_t i = 0; i < cnt && !rd.bad; i++) {
        uint64_t id = td_rd_u64(&rd);
        if (rd.bad) break;
        if (type == TD_M_PIN) {
          if (td_node_pin(n, id, 1)) td__count(wk, &wk->pinned, id, 1);
        } else if (wk->kind >= WK_NODE || td_map_get(&wk->pinned, id)) {
          /* Only a pin this worker holds is let go. */
          td__count(wk, &wk->pinned, id, -1);
          td_node_pin(n, id, -1);
        }
      }
      return rd.bad ? TD_EPROTO : 0;
    }
    case TD_M_PRINT: {
      uint32_t l;
      const uint8_t *s = td_rd_str(&rd, &l);
      if (rd.bad) return TD_EPROTO;
      uint64_t tid = rd.end - rd.p >= 8 ? td_rd_u64(&rd) : 0;
      td_term_print(s, l);  /* above any progress bars */
      td__obs_print(wk->kind == WK_NODE ? 0 : wk->id, s, l);  /* its worker's log (tide logs) */
      td__print_to_owner(n, tid, s, l);
      return 0;
    }
    case TD_M_ALLOC: {
      uint32_t req = td_rd_u32(&rd);
      uint64_t size = td_rd_u64(&rd);
      if (rd.bad) return TD_EPROTO;
      size_t off = 0;
      int rc = wk->remote ? TD_EINVAL : td__alloc(n, size, &off, NULL);
      if (rc == 0) td_map_set(&wk->allocs, (uint64_t)off + 1, (void *)(uintptr_t)size);
      td_buf_t b;
      td_buf_init(&b);
      td_buf_u8(&b, rc == 0);
      td_buf_u64(&b, rc == 0 ? off : (uint64_t)rc);
      td_node_reply(n, wk, req, b.p, b.len);
      td_buf_free(&b);
      return 0;
    }
    case TD_M_BLOCKED: {
      uint32_t cnt = td_rd_u32(&rd);
      for (uint32_t i = 0; i < cnt && !rd.bad; i++) {
        td_task_t *t = td_map_get(&n->tasks, td_rd_u64(&rd));
        if (!t || t->wk != wk || t->state != T_SENT) continue;
        td__inflight_del(n, wk, t);
        td__unpin_deps(n, t);
        t->attempt--;
        t->state = T_QUEUED;
        t->wk = NULL;
        tq_push_front(&n->queue, t);
      }
      if (wk->kind == WK_TASK && wk->leased && !wk->blocked) {
        n->avail[TD_RES_CPU] += wk->lease[TD_RES_CPU];
        wk->blocked = 1;
      }
      return rd.bad ? TD_EPROTO : 0;
    }
    case TD_M_UNBLOCKED:
      if (wk->blocked) {
        n->avail[TD_RES_CPU] -= wk->lease[TD_RES_CPU];
        wk->blocked = 0;
      }
      return 0;
    case TD_M_ACTOR_READY: {
      uint64_t aid = td_rd_u64(&rd);
      td_actor_t *a = td_map_get(&n->actors, aid);
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
      return rd.bad ? TD_EPROTO : 0;
    }
    case TD_M_ACTOR_EXIT: {
      uint64_t aid = td_rd_u64(&rd);
      uint8_t crashed = td_rd_u8(&rd);
      uint32_t l;
      const uint8_t *why = td_rd_str(&rd, &l);
      if (rd.bad) return TD_EPROTO;
      uint32_t incarnation = td_rd_u32(&rd);
      td_actor_t *a = td_map_get(&n->actors, aid);
      /* An earlier incarnation's exit (after a kill and restart) is old news. */
      if (!a || a->host != wk || rd.bad || incarnation != a->create->attempt) return 0;
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
    case TD_M_RPC: {
      uint32_t req = td_rd_u32(&rd);
      uint32_t ol, al;
      const uint8_t *op = td_rd_str(&rd, &ol);
      const uint8_t *args = td_rd_str(&rd, &al);
      if (rd.bad || ol >= 64) return TD_EPROTO;
      char opname[64];
      memcpy(opname, op, ol);
      opname[ol] = 0;
      n->rpc_wk = wk;
      if (n->rpc) n->rpc(n->rpc_ud, wk, req, opname, args, al);
      n->rpc_wk = NULL;
      return 0;
    }
    default: return TD_EPROTO;
  }
}

/* -- Worker death ---------------------------------------------------------------------- */

/* Objects that only the lost link could give: ObjectLostError (they were
 * made there and never sent; nothing here can make them again). */

void td__wk_dead(td_node_t *n, td_wk_t *wk, const char *why) {
  if (wk->dead) return;
  wk->dead = 1;
  td_chan_close(&wk->ch);
  int st = 0;
  char reason[256];
  pid_t r = 0;
  for (int i = 0; wk->pid > 0 && i < 200 && (r = waitpid(wk->pid, &st, WNOHANG)) == 0; i++) usleep(1000);
  if (wk->kind == WK_CLIENT) {
    /* A driver that leaves takes its placement groups and non-detached
     * actors with it. */
    for (td_pg_t *pg = n->pgs, *next; pg; pg = next) {
      next = pg->next;
      if (pg->owner == wk->id) td_node_pg_remove(n, pg->id);
    }
    size_t it2 = 0;
    td_actor_t *oa;
    while (td_map_next(&n->actors, &it2, NULL, (void **)&oa))
      if (oa->owner == wk->id && oa->state != A_DEAD && oa->create && !oa->create->spec.detached)
        td_node_kill_actor(n, oa->id, 1);
    /* and those it made here that the head keeps */
    uint64_t aid;
    void *owner;
    for (size_t it3 = 0; td_map_next(&n->fwd_actors, &it3, &aid, &owner);)
      if ((uint64_t)(uintptr_t)owner == wk->id) td__kill_actor(n, aid, 1, "killed: its driver left");
    for (size_t it3 = 0; td_map_next(&n->fwd_actors, &it3, &aid, &owner);)
      if ((uint64_t)(uintptr_t)owner == wk->id) td_map_del(&n->fwd_actors, aid), it3 = 0;
  }
  /* A link that never joined (a join whose answer came too late: the node
   * joined again, under the same index) had nothing: the node lives on. */
  int ghost = wk->kind == WK_NODE && !wk->joined;
  if ((wk->kind == WK_NODE && !ghost) || wk->kind == WK_HEAD) td__link_lost_objects(n, wk);
  if (wk->kind == WK_PEER) {
    td__ppull_check(n, wk, td_now());  /* what came from there comes from the head now */
    if (wk->bridge && n->peer_close) n->peer_close(n->peer_ud, wk->bridge);
    wk->bridge = NULL;
  }
  if (ghost) {
    snprintf(reason, sizeof(reason), "a connection given index %u closed before it joined: it %s", wk->node_index, why);
  } else if (wk->kind == WK_NODE) {
    n->nlinks--;
    if (!n->gone_at) n->gone_at = td_xcalloc(TD_NODE_MAX + 1, sizeof(double));
    n->gone_at[wk->node_index] = td_now();
    td__settle(n, wk->ntotal);  /* it may be restarted: work only it could run waits a while */
    td__pgs_node_lost(n, wk->node_index);
    snprintf(reason, sizeof(reason), "node-%u (%s) died: it %s", wk->node_index, wk->name, why);
  } else if (wk->kind == WK_HEAD) {
    snprintf(reason, sizeof(reason), "lost the head: it %s", why);
    if (n->head == wk) td__head_lost(n);
  } else if (wk->kind == WK_PEER) {
    snprintf(reason, sizeof(reason), "the link with node-%u closed: it %s", wk->node_index, why);
  } else if (r == wk->pid && WIFSIGNALED(st))
    snprintf(reason, sizeof(reason), "worker process %d was killed by signal %d", (int)wk->pid, WTERMSIG(st));
  else if (r == wk->pid && WIFEXITED(st))
    snprintf(reason, sizeof(reason), "worker process %d exited with status %d", (int)wk->pid, WEXITSTATUS(st));
  else
    snprintf(reason, sizeof(reason), "worker process %d %s", (int)wk->pid, why);
  td_log("%s", reason);
  if (wk->kind == WK_NODE || wk->kind == WK_HEAD) fprintf(stderr, "tide: %s\n", reason);
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
        tq_push_front(&n->queue, t);
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
    first = wk->kind == WK_NODE;  /* every task on a node was running */
  }
  size_t it = 0;
  td_actor_t *a;
  while (td_map_next(&n->actors, &it, NULL, (void **)&a))
    if (a->host == wk) td__actor_restart_or_die(n, a, reason);
  wk->ngpus = wk->kind == WK_TASK ? wk->ngpus : 0;
  td__lease_done(n, wk);
  for (int i = 0; i < n->nwks; i++) {
    if (n->wks[i] != wk) continue;
    n->wks[i] = n->wks[--n->nwks];
    break;
  }
  /* Its pending requests die with it. */
  for (td_req_t **pp = &n->reqs, *r; (r = *pp);) {
    if (r->wk != wk) { pp = &r->next; continue; }
    *pp = r->next;
    free(r->ids);
    free(r);
  }
  td__give_back(n, wk);
  td_map_free(&wk->fns_sent);
  td__free_lent(n, wk);
  free(wk);
  n->dirty = 1;
}

/* -- Loop -------------------------------------------------------------------------------- */

void td_node_flush(td_node_t *n) {
  for (int i = 0; i < n->nwks; i++)
    if (td_chan_pending(&n->wks[i]->ch)) td_chan_flush(&n->wks[i]->ch);
}

static void td__wk_malformed(td_node_t *n, td_wk_t *wk, uint8_t type) {
  fprintf(stderr, "tide: malformed message (type %u) from worker %d; stopping it\n", (unsigned)type,
          (int)wk->pid);
  if (wk->pid > 0) kill(wk->pid, SIGKILL);
  td__wk_dead(n, wk, "sent a malformed message");
}

static void td__wk_input(td_node_t *n, td_wk_t *wk) {
  for (;;) {
    if (wk->sink_left && td__sink_read(n, wk)) {
      td__wk_dead(n, wk, "closed its connection");
      return;
    }
    if (wk->sink_left || wk->dead) return;  /* the rest of a chunk comes later */
    int rc = td_chan_read(&wk->ch);
    if (wk->kind >= WK_NODE) wk->last_seen = td_now();
    uint8_t type;
    const uint8_t *p;
    uint32_t len;
    int got;
    while ((got = td_chan_next(&wk->ch, &type, &p, &len)) == 1) {
      if (td__on_msg(n, wk, type, p, len) != 0) { td__wk_malformed(n, wk, type); return; }
      if (wk->dead) return;
    }
    if (got < 0) {
      if (wk->pid > 0) kill(wk->pid, SIGKILL);
      td__wk_dead(n, wk, "sent a malformed frame");
      return;
    }
    if (rc) { td__wk_dead(n, wk, "closed its connection"); return; }
    int took = td__sink_take(n, wk);
    if (took < 0) { td__wk_malformed(n, wk, TD_M_CHUNK); return; }
    if (!took || wk->dead) return;
  }
}

void td_node_pump(td_node_t *n, double timeout) {
  td__sched(n);
  td_node_flush(n);
  double now = td_now();
  for (td_req_t *r = n->reqs; r; r = r->next)
    if (r->deadline > 0 && r->deadline - now < timeout) timeout = r->deadline - now;
  if (n->nunplaced && n->settle_until - now < timeout) timeout = n->settle_until - now + 0.001;
  double scan = td__why_next(n, now);
  if (scan < timeout) timeout = scan;
  /* Something changed after this round's checks (a stream's consumer let
   * items go in the tick): check again at once instead of sleeping. */
  if (timeout < 0 || n->dirty) timeout = 0;
  if (n->cappfds < n->nwks + 2) {
    n->cappfds = n->nwks + 16;
    n->pfds = td_xrealloc(n->pfds, (size_t)n->cappfds * sizeof(struct pollfd));
  }
  int np = n->nwks;
  for (int i = 0; i < np; i++) {
    n->pfds[i].fd = n->wks[i]->ch.fd;
    n->pfds[i].events = POLLIN | (td_chan_pending(&n->wks[i]->ch) ? POLLOUT : 0);
    n->pfds[i].revents = 0;
  }
  int ms = timeout > 1e6 ? -1 : (int)(timeout * 1000 + 0.999);
  int ext = n->ext_fd >= 0;
  if (ext) n->pfds[np] = (struct pollfd){n->ext_fd, POLLIN, 0};
  int dp = td__dp_fd(n) >= 0;  /* the data plane's streams, behind one epoll fd */
  if (dp) n->pfds[np + ext] = (struct pollfd){td__dp_fd(n), POLLIN, 0};
  int r = poll(n->pfds, (nfds_t)(np + ext + dp), ms);
  if (r > 0 && ext && n->pfds[np].revents) n->ext_read(n->ext_ud);
  if (r > 0 && dp && n->pfds[np + ext].revents) td__dp_io(n);
  if (r > 0) {
    /* Workers may die while handling; copy the list first. */
    td_wk_t **ready = td_xmalloc((size_t)np * sizeof(td_wk_t *) + 1);
    uint64_t *ids = td_xmalloc((size_t)np * 8 + 8);
    int nr = 0;
    for (int i = 0; i < np; i++)
      if (n->pfds[i].revents) { ready[nr] = n->wks[i]; ids[nr++] = n->wks[i]->id; }
    for (int i = 0; i < nr; i++) {
      int alive = 0;
      for (int k = 0; k < n->nwks; k++) if (n->wks[k] == ready[i] && n->wks[k]->id == ids[i]) alive = 1;
      if (alive) td__wk_input(n, ready[i]);
    }
    free(ready);
    free(ids);
  }
  if (n->dirty || n->reqs) {
    n->dirty = 0;
    td__reqs_check(n, td_now());
  }
  if (n->nfwd_ready) td__fwd_flush(n);
  if (n->nlin_out) td__lineage_send(n);
  if (n->head || n->nlinks || n->next_index || n->waitsubs) {
    double now = td_now();
    if (now - n->tick_at >= 0.25) {
      n->tick_at = now;
      td__cluster_tick(n, now);
    }
  }
  if (n->nunplaced) td__unplaced_check(n, td_now());
  if (n->hang_warn_s > 0 && n->tasks.len) td__why_tick(n, td_now());
  td__sched(n);
  if (n->ext_tick) n->ext_tick(n->ext_ud);
  td_node_flush(n);
}

/* Feeds one message as if a client sent it (fuzzing and tests): a
 * malformed one is rejected and the client dropped, as on a real socket. */
int td_node_feed(td_node_t *n, uint8_t type, const uint8_t *p, uint32_t len) {
  return td_node_feed_as(n, 0, type, p, len);
}

int td_node_feed_as(td_node_t *n, int from_head, uint8_t type, const uint8_t *p, uint32_t len) {
  td_wk_t *wk = NULL;
  if (from_head) {
    if (!n->head) {
      wk = td__wk_add(n, td__new_wk_id(n), WK_HEAD, -1);
      wk->remote = 1;
      wk->last_seen = td_now();
      n->head = wk;
    }
    wk = n->head;
  } else {
    /* The fake client last fed, also once a JOIN made it a node's link. */
    for (int i = 0; i < n->nwks; i++)
      if ((n->wks[i]->kind == WK_CLIENT || n->wks[i]->kind == WK_NODE || n->wks[i]->kind == WK_PEER) &&
          n->wks[i]->ch.fd < 0)
        wk = n->wks[i];
    if (!wk) wk = td__wk_add(n, td__new_wk_id(n), WK_CLIENT, -1);
  }
  int rc = td__on_msg(n, wk, type, p, len);
  if (rc) td__wk_dead(n, wk, "sent a malformed message");
  else td_buf_reset(&wk->ch.out); /* replies go nowhere */
  return rc;
}

int td_node_add_client(td_node_t *n, int fd) {
  /* The store fd goes first, beside one byte, as SCM_RIGHTS. */
  if (td_sock_send_fd(fd, td_store_fd(n->store))) { close(fd); return TD_EIO; }
  td_wk_t *wk = td__wk_add(n, td__new_wk_id(n), WK_CLIENT, fd);
  struct ucred cred;
  socklen_t cl = sizeof(cred);
  if (n->tl && !getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &cl)) td__tl_client(n, wk->id, cred.pid);
  td_chan_begin(&wk->ch, TD_M_HELLO);
  td_buf_u64(&wk->ch.out, wk->id);
  td_buf_u64(&wk->ch.out, n->inline_max);
  td_chan_end(&wk->ch);
  td_chan_flush(&wk->ch);
  td_log("client %llu attached", (unsigned long long)wk->id);
  return 0;
}

int td_node_fds(td_node_t *n, int *fds, int max) {
  int k = 0;
  for (int i = 0; i < n->nwks && k < max; i++)
    if (n->wks[i]->ch.fd >= 0) fds[k++] = n->wks[i]->ch.fd;
  if (n->ext_fd >= 0 && k < max) fds[k++] = n->ext_fd;
  return k;
}

void td_node_watch_fd(td_node_t *n, int fd, td_node_cb on_readable, td_node_cb on_tick, void *ud) {
  n->ext_fd = fd;
  n->ext_read = on_readable;
  n->ext_tick = on_tick;
  n->ext_ud = ud;
}

/* -- Lifecycle ------------------------------------------------------------------------------ */

td_node_t *td_node_new(const td_node_opts_t *o) {
  td_node_t *n = td_xcalloc(1, sizeof(*n));
  long ncpu = sysconf(_SC_NPROCESSORS_ONLN);
  long pages = sysconf(_SC_PHYS_PAGES), psz = sysconf(_SC_PAGESIZE);
  double mem = (double)pages * (double)psz;
  size_t cap = o->store_capacity ? o->store_capacity : (size_t)(mem * 0.3);
  n->store = td_store_new(cap);
  if (!n->store) { free(n); return NULL; }
  n->inline_max = o->inline_max ? o->inline_max : 64 * 1024;
  n->spill = td_spill_new(NULL);
  n->ext_fd = -1;
  n->no_workers = o->no_workers;
  n->index = o->index <= TD_NODE_MAX ? o->index : 0;
  n->next_seq = (uint64_t)n->index << TD_NODE_SHIFT;
  n->next_wk = (uint64_t)n->index << (TD_NODE_SHIFT - 32);
  n->node_timeout = o->node_timeout > 0 ? o->node_timeout : 5.0;
  snprintf(n->name, sizeof(n->name), "%s", o->name ? o->name : "");
  if (!n->name[0]) gethostname(n->name, sizeof(n->name) - 1);
  td_map_init(&n->fwd);
  td_map_init(&n->pulls);
  td_map_init(&n->lineage);
  td_map_init(&n->lin_kept);
  td_map_init(&n->relays);
  td_map_init(&n->fwd_actors);
  td_map_init(&n->objs);
  td_map_init(&n->tasks);
  td_map_init(&n->actors);
  td_map_init(&n->fns);
  td_map_init(&n->fnstats);
  td_buf_init(&n->tmp);
  td__tl_init(n);
  td__why_init(n);
  td_node_res_index(n, "CPU");
  td_node_res_index(n, "GPU");
  td_node_res_index(n, "memory");
  n->total[TD_RES_CPU] = o->num_cpus >= 0 ? o->num_cpus : (double)ncpu;
  n->total[TD_RES_GPU] = o->num_gpus > 0 ? o->num_gpus : 0;
  n->total[TD_RES_MEM] = o->memory >= 0 ? o->memory : mem * 0.7;
  n->ngpus = (int)n->total[TD_RES_GPU];
  if (n->ngpus > 64) n->ngpus = 64;
  for (int g = 0; g < n->ngpus; g++) n->gpu_free[g] = 1;
  for (int i = 0; i < o->nres; i++) {
    int idx = td_node_res_index(n, o->res_names[i]);
    if (idx >= 0) n->total[idx] = o->res_amts[i];
  }
  memcpy(n->avail, n->total, sizeof(n->total));
  snprintf(n->exe, sizeof(n->exe), "%s", o->exe ? o->exe : "/proc/self/exe");
  td__restore_ids(n);
  for (int i = 0; i < o->prestart; i++) td__spawn(n, WK_TASK, NULL, 0);
  return n;
}

void td_node_set_rpc(td_node_t *n, td_rpc_cb cb, void *ud) {
  n->rpc = cb;
  n->rpc_ud = ud;
}

/* TIDE_DEBUG_LEFTOVERS=1: what is still in the object table when the node
 * stops, and who holds it, in the log (a leak hunt under chaos). */
static void td__log_leftovers(td_node_t *n) {
  const char *e = getenv("TIDE_DEBUG_LEFTOVERS");
  if (!e || !*e || *e == '0') return;
  size_t it = 0;
  uint64_t id;
  void *v;
  while (td_map_next(&n->objs, &it, &id, &v)) {
    td_obj_t *o = v;
    char who[256] = "";
    size_t wl = 0;
    for (int i = 0; i < n->nwks && wl < sizeof(who) - 40; i++) {
      intptr_t c = (intptr_t)td_map_get(&n->wks[i]->held, id);
      if (c)
        wl += (size_t)snprintf(who + wl, sizeof(who) - wl, " wk%d(kind %d)x%ld", i, n->wks[i]->kind, (long)c);
    }
    fprintf(stderr,
            "tide: leftover object %016llx (node-%u): state %d loc %d len %zu refs %lld pins %d "
            "foreign %d pulling %d chunked %d told %d up %u away %d fwd %d stream %d producer %d "
            "waiters %u contained %u copies %u held by:%s\n",
            (unsigned long long)id, td_id_node(id), o->state, o->loc, o->len, (long long)o->refs, o->pins,
            o->foreign, o->pulling, o->chunked, o->told, o->up, o->away, o->fwd != NULL, o->is_stream, o->producer != NULL, o->nwaiters,
            o->ncontained, o->copies ? o->copies->n : 0, wl ? who : " nobody");
    td_task_t *t = o->producer;
    if (t)
      fprintf(stderr, "tide:   its producer %s: state %d attempt %u cancelled %d sent to %s%u (dead %d)\n",
              t->spec.name[0] ? t->spec.name : "(unnamed)", t->state, t->attempt, t->cancelled,
              !t->wk ? "nothing " : t->wk->kind == WK_NODE ? "node-" : "worker kind ",
              !t->wk ? 0 : t->wk->kind == WK_NODE ? t->wk->node_index : (uint32_t)t->wk->kind,
              t->wk ? t->wk->dead : 0);
  }
}

void td_node_destroy(td_node_t **np) {
  td_node_t *n = *np;
  if (!n) return;
  td__log_leftovers(n);
  td__dp_free(n);
  for (int i = 0; i < n->nwks; i++)
    if (n->wks[i]->pid > 0) kill(n->wks[i]->pid, SIGKILL);
  for (int i = 0; i < n->nwks; i++) {
    td_wk_t *wk = n->wks[i];
    if (wk->pid > 0) waitpid(wk->pid, NULL, 0);
    td_chan_close(&wk->ch);
    if (wk->bridge && n->peer_close) n->peer_close(n->peer_ud, wk->bridge);
    td_map_free(&wk->fns_sent);
    td_map_free(&wk->allocs);
    td_map_free(&wk->held);
    td_map_free(&wk->pinned);
    free(wk);
  }
  free(n->wks);
  td__tl_free(n);
  size_t it = 0;
  void *v;
  while (td_map_next(&n->objs, &it, NULL, &v)) {
    td_obj_t *o = v;
    if (o->copies) free(o->copies->c);
    free(o->copies); free(o->data); free(o->contained); free(o->items); free(o->waiters); free(o);
  }
  while (n->nobj_pool) free(n->obj_pool[--n->nobj_pool]);
  while (n->ntask_pool) free(n->task_pool[--n->ntask_pool]);
  free(n->obj_pool);
  free(n->task_pool);
  it = 0;
  while (td_map_next(&n->tasks, &it, NULL, &v)) {
    td_task_t *t = v;
    free(t);
  }
  it = 0;
  while (td_map_next(&n->actors, &it, NULL, &v)) { free(((td_actor_t *)v)->reason); free(v); }
  it = 0;
  while (td_map_next(&n->fns, &it, NULL, &v)) free(v);
  it = 0;
  while (td_map_next(&n->fnstats, &it, NULL, &v)) free(v);
  td_map_free(&n->fnstats);
  while (n->reqs) { td_req_t *r = n->reqs; n->reqs = r->next; free(r->ids); free(r); }
  while (n->pgs) {
    td_pg_t *pg = n->pgs;
    n->pgs = pg->next;
    while (pg->adopt) {
      td_adoptee_t *e = pg->adopt;
      pg->adopt = e->next;
      free(e);
    }
    free(pg->total); free(pg->avail); free(pg->where); free(pg->hint); free(pg);
  }
  it = 0;
  while (td_map_next(&n->fwd, &it, NULL, &v)) { free(((td_fwd_t *)v)->rets); free(v); }
  td_map_free(&n->fwd);
  td_map_free(&n->pulls);
  it = 0;
  while (td_map_next(&n->lineage, &it, NULL, &v)) free(v);
  td_map_free(&n->lineage);
  it = 0;
  while (td_map_next(&n->lin_kept, &it, NULL, &v)) free(v);
  td_map_free(&n->lin_kept);
  free(n->lin_out);
  td__parked_drop(n);
  for (td_waitsub_t *w = n->waitsubs, *next; w; w = next) {
    next = w->next;
    free(w->held);
    free(w->msg);
    free(w);
  }
  while (n->wdmap) {
    td_wdmap_t *m = n->wdmap;
    n->wdmap = m->next;
    free(m);
  }
  it = 0;
  while (td_map_next(&n->relays, &it, NULL, &v)) free(v);
  td_map_free(&n->relays);
  td_map_free(&n->fwd_actors);
  free(n->gone_at);
  free(n->fwd_ready);
  free(n->fn_order);
  free(n->cwait);
  free(n->ppull);
  td_map_free(&n->objs); td_map_free(&n->tasks); td_map_free(&n->actors); td_map_free(&n->fns);
  td_buf_free(&n->tmp);
  free(n->pfds);
  td_spill_destroy(&n->spill);
  td_store_destroy(&n->store);
  free(n);
  *np = NULL;
}
