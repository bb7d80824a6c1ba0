/* Tide node (see node.h): the loop (td_node_pump), the message table that
 * hands each message to its module once its sender may send it, and the
 * node's life (new, restore after a head restart, destroy). The modules are
 * in node_int.h. */
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

/* -- Queues ---------------------------------------------------------------- */

void td__inflight_add(td_node_t *n, td_wk_t *wk, td_task_t *t) {
  tq_push(&wk->inflight, t);
  t->slow = 0;
  if (t->spec.kind != TD_K_TASK) {
    if (n->tl) t->sent_at = td_now(); /* the timeline's start of a call */
    return;
  }
  t->sent_at = td_now();
  td_fnstat_t *st = td_map_get(&n->sched.fnstats, t->spec.fn_id);
  /* A pipeline task's submitter bounds its own tasks in flight (tide.data's
   * stages: two per CPU), so it may queue behind a long one and sit behind
   * one: its worker starts the next task without waiting for the node. */
  t->slow = !t->spec.pipeline && !(st && st->avg < TD_SHORT_TASK);
  wk->nslow += t->slow;
}

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

/* -- A restarted head: what head.db kept -------------------------------------------------- */

static void td__restore_node(void *ud, const char *key, const void *val, size_t len) {
  td_node_t *n = ud;
  (void)val, (void)len;
  unsigned long idx = strtoul(key, NULL, 10);
  /* Indices given before stay reserved for nodes that come back. */
  if (idx > n->links.next_index && idx <= TD_NODE_MAX) n->links.next_index = (uint32_t)idx;
}

/* Before any worker is made: ids continue past the last boot's. */
static void td__restore_ids(td_node_t *n) {
  if (!td_persist_on()) return;
  td_persist_each("meta", td__restore_meta, n);
  n->procs.next_id = (n->procs.next_id + 256) & ~(uint64_t)255;
  char v[24];
  int l = snprintf(v, sizeof(v), "%llu", (unsigned long long)(n->procs.next_id + 256));
  td_persist_put("meta", "next_wk", v, (size_t)l);
}

void td_node_restore(td_node_t *n) {
  td_persist_each("node", td__restore_node, n);
  if (n->links.next_index) td__settle(n, NULL); /* its nodes rejoin: work that needs them waits */
  /* Nodes still running restored actors rejoin and report them; only then
   * are the others placed anew. A node tries to rejoin every 4 s at most
   * (a 3 s handshake, a 1 s pause), and one try may start just before
   * this head listens: the wait covers two tries. */
  double adopt = 2 * n->links.node_timeout;
  n->actors.adopt_until = td_now() + (adopt > 6 ? adopt : 6);
  n->actors.restoring = 1;
  td_persist_each("pg", td__restore_pg, n);
  td_persist_each("actor", td__restore_actor, n);
  td_persist_each("actor_up", td__restore_actor_up, n);
  n->actors.restoring = 0;
}

/* -- Stats (placement groups are in pg.c) ------------------------------------------------- */

void td_node_stats(td_node_t *n, td_node_stats_t *st) {
  memset(st, 0, sizeof(*st));
  for (int i = 0; i < n->procs.n; i++) {
    if (n->procs.list[i]->dead || n->procs.list[i]->kind >= WK_CLIENT) continue; /* clients and links */
    st->workers++;
    st->tasks_running += n->procs.list[i]->inflight.len;
  }
  size_t it = 0;
  td_actor_t *a;
  while (td_map_next(&n->actors.map, &it, NULL, (void **)&a)) st->actors += a->state != A_DEAD;
  st->tasks_queued = n->sched.queue.len;
  st->objects = n->objs.map.len;
  st->store_used = td_store_used(n->objs.store);
  st->store_capacity = td_store_capacity(n->objs.store);
  st->spilled_bytes = td_spill_used(n->objs.spill);
  st->inline_bytes = n->objs.inline_bytes;
  st->bytes_sent = n->xfer.bytes_sent;
  st->bytes_from_peers = n->xfer.bytes_from_peers;
}

/* Links carry chunks of large values (transfer.c reads them into place). */
void td__link_chan(td_wk_t *wk) {
  wk->ch.split = TD_M_CHUNK;
  wk->ch.split_head = TD__CHUNK_HEAD;
}

/* -- What the object table tells the other modules ------------------------------------
 * obj.c keeps objects; it knows nothing of who waits on them, where else
 * they are or how they are made again. An object that became ready or
 * failed is recorded there and acted on in the objects phase: once the
 * message that changed it is done (Redis's signalKeyAsReady, then
 * handleClientsBlockedOnKeys after the command), or, for a change made
 * outside a message, at the pump's next objects phase. An object being
 * freed is told at once (td__obj_freeing, td__obj_freed), as its record
 * goes. */

/* The objects phase: for each object that became ready or failed
 * (obj.c records them), nodes that asked for its chunks get them, then
 * what waits on it (tasks, requests) wakes. Waking may fail tasks and so
 * change more objects: they are recorded and taken in the same pass. An
 * object freed since (or freed and being made again by lineage: pending)
 * is skipped. */
void td__objs_phase(td_node_t *n) {
  td_node_objs_t *t = &n->objs;
  for (uint32_t i = 0; i < t->nchanged; i++) {
    td_obj_t *o = td_map_get(&t->map, t->changed[i]);
    if (o && o->state != OBJ_PENDING) td__obj_done(n, o);
  }
  t->nchanged = 0;
}

void td_node_settle(td_node_t *n) {
  if (n->objs.nchanged) td__objs_phase(n);
}

/* o is ready or failed: nodes that asked for its chunks get them, then what
 * waits on it (tasks, requests) wakes. Last, as waking may free o. */
void td__obj_done(td_node_t *n, td_obj_t *o) {
  if (n->xfer.ncwait) td__cwait_serve(n, o->id);
  td__obj_wake(n, o);
}

/* o is being freed (out of the table, its value still there): a fetch of
 * it ends (the head hears it did not land), chunk requests for it are
 * answered, its lineage goes, and so does the ref held on its owner's copy. */
void td__obj_freeing(td_node_t *n, td_obj_t *o) {
  if (o->chunked) td__have(n, o, 0);
  if (n->xfer.ncwait) td__cwait_serve(n, o->id);
  if (n->lineage.specs.len) free(td_map_del(&n->lineage.specs, o->id));
  if (n->lineage.kept.len) td__lineage_drop(n, o->id);
  if (o->foreign) td__unhold(n, o);
}

/* An object of producer is gone: a task kept only until its results were
 * fetched (T_FETCHING) ends with the last of them. */
void td__obj_freed(td_node_t *n, td_task_t *producer) {
  if (producer && producer->state == T_FETCHING && !td__task_fetching(n, producer))
    td__task_finish(n, producer);
}

/* -- A worker, client or link died --------------------------------------------------
 * Each module lets go of what it had there, in this order: what a driver
 * owned; what was on the other node of a link; where fetches came from;
 * the work that was running there; the actors it hosted; last, the record. */
void td__wk_dead(td_node_t *n, td_wk_t *wk, const char *why) {
  if (wk->dead) return;
  td__raw_flush(n); /* before its calls are failed and forgotten */
  wk->dead = 1;
  td_chan_close(&wk->ch);
  char reason[256];
  td__wk_reason(wk, why, reason, sizeof(reason)); /* workers.c: reaps the process */
  if (wk->kind == WK_CLIENT) {
    td__pgs_owner_left(n, wk->id);
    td__actors_owner_left(n, wk->id);
    if (wk->submitted) td__job_end(n, wk->id, NULL); /* not for `tide status` and the like */
  }
  /* A link that never joined (a join whose answer came too late: the node
   * joined again, under the same index) had nothing: the node lives on. */
  if ((wk->kind == WK_NODE || wk->kind == WK_HEAD) && !td__wk_ghost(wk)) {
    td__link_dead(n, wk);
    if (wk->kind == WK_NODE) td__pgs_node_lost(n, wk->node_index);
  }
  if (wk->kind == WK_PEER) td__peer_dead(n, wk);
  td_log("%s", reason);
  if (wk->kind == WK_NODE || wk->kind == WK_HEAD) fprintf(stderr, "tide: %s\n", reason);
  td__tasks_lost(n, wk, reason);
  td__actors_host_lost(n, wk, reason);
  td__wk_free(n, wk);
}

/* -- Messages: from workers, clients, nodes and the head ------------------------------ */

/* Who may send what. A message from any other kind of sender is malformed:
 * the sender is dropped (a worker is killed), as for bad bytes. */
/* clang-format off */
#define K(kind) (1u << (kind))
#define FROM_LINK (K(WK_NODE) | K(WK_HEAD))                         /* head <-> node links */
#define FROM_CHUNKS (K(WK_NODE) | K(WK_HEAD) | K(WK_PEER))          /* links that carry chunks */
#define FROM_ANY (K(WK_TASK) | K(WK_HOST) | K(WK_GPUHOST) | K(WK_CLIENT) | FROM_LINK)  /* not a peer */

static int td__on_nothing(td_node_t *n, td_wk_t *wk, td_rd_t *rd) {
  (void)n, (void)wk, (void)rd;
  return 0;
}

/* One entry per message type (proto.h), as Redis's command table: what
 * handles it, and the kinds of sender it may come from. */
typedef struct {
  const char *name;
  td_msg_fn *fn;
  unsigned from;
} td_msg_t;

static const td_msg_t td__msgs[] = {
  /* A worker's or client's work (task.c), its values (obj.c), its waits and
   * control calls (workers.c), its actors (actor.c). */
  [TD_M_READY] = {"READY", td__on_nothing, FROM_ANY},
  [TD_M_SUBMIT] = {"SUBMIT", td__on_submit, FROM_ANY},
  [TD_M_DONE] = {"DONE", td__on_done, FROM_ANY},
  [TD_M_ITEM] = {"ITEM", td__on_item, FROM_ANY},
  [TD_M_PUT] = {"PUT", td__on_put, FROM_ANY},
  [TD_M_REFS] = {"REFS", td__on_refs, FROM_ANY},
  [TD_M_PIN] = {"PIN", td__on_pin, FROM_ANY},
  [TD_M_UNPIN] = {"UNPIN", td__on_unpin, FROM_ANY},
  [TD_M_ALLOC] = {"ALLOC", td__on_alloc, FROM_ANY},
  [TD_M_GET] = {"GET", td__on_get, FROM_ANY},
  [TD_M_WAIT] = {"WAIT", td__on_wait, FROM_ANY},
  [TD_M_STREAM_NEXT] = {"STREAM_NEXT", td__on_stream_next, FROM_ANY},
  [TD_M_STREAM_ROOM] = {"STREAM_ROOM", td__on_stream_room, FROM_ANY},
  [TD_M_PRINT] = {"PRINT", td__on_print, FROM_ANY},
  [TD_M_RPC] = {"RPC", td__on_rpc, FROM_ANY},
  [TD_M_BLOCKED] = {"BLOCKED", td__on_blocked, FROM_ANY},
  [TD_M_UNBLOCKED] = {"UNBLOCKED", td__on_unblocked, FROM_ANY},
  [TD_M_ACTOR_READY] = {"ACTOR_READY", td__on_actor_ready, FROM_ANY},
  [TD_M_ACTOR_EXIT] = {"ACTOR_EXIT", td__on_actor_exit, FROM_ANY},
  [TD_M_BEAT] = {"BEAT", td__on_beat, FROM_ANY},
  /* A fresh connection that says what it is (cluster.c, transfer.c). */
  [TD_M_JOIN] = {"JOIN", td__on_join, K(WK_CLIENT)},
  [TD_M_PEER] = {"PEER", td__on_peer, K(WK_CLIENT)},
  [TD_M_REMOTE] = {"REMOTE", td__on_remote, K(WK_CLIENT)},
  /* Between a head and its nodes (cluster.c, lineage.c, transfer.c). */
  [TD_M_FN] = {"FN", td__on_fn, FROM_LINK},
  [TD_M_REPLY] = {"REPLY", td__on_link_reply, FROM_LINK},
  [TD_M_NODE_INFO] = {"NODE_INFO", td__on_node_info, K(WK_NODE)},
  [TD_M_PKG_GET] = {"PKG_GET", td__on_pkg_get, K(WK_NODE)},
  [TD_M_LINEAGE] = {"LINEAGE", td__on_lineage, K(WK_NODE)},
  [TD_M_HAVE] = {"HAVE", td__on_have, K(WK_NODE)},
  [TD_M_KILL] = {"KILL", td__on_kill, K(WK_NODE)},
  [TD_M_NOTE] = {"NOTE", td__on_note, K(WK_NODE)},
  [TD_M_JOB_END] = {"JOB_END", td__on_job_end, FROM_LINK},
  [TD_M_CANCEL_REF] = {"CANCEL_REF", td__on_cancel_ref, FROM_LINK},
  [TD_M_CANCEL_TREE] = {"CANCEL_TREE", td__on_cancel_tree, FROM_LINK},
  [TD_M_ROOM] = {"ROOM", td__on_room, FROM_LINK},
  [TD_M_NODE_TASK] = {"NODE_TASK", td__on_node_task, K(WK_HEAD)},
  [TD_M_PKG] = {"PKG", td__on_pkg, K(WK_HEAD)},
  [TD_M_WELCOME] = {"WELCOME", td__on_welcome, K(WK_HEAD)},
  [TD_M_CANCEL] = {"CANCEL", td__on_cancel, K(WK_HEAD)},
  [TD_M_ACTOR_KILL] = {"ACTOR_KILL", td__on_actor_kill, K(WK_HEAD)},
  /* Chunks of large objects, on any link between nodes (transfer.c, dplane.c). */
  [TD_M_HELLO] = {"HELLO", td__on_nothing, K(WK_HEAD) | K(WK_PEER)},
  [TD_M_CHUNK_GET] = {"CHUNK_GET", td__on_chunk_get, FROM_CHUNKS},
  [TD_M_CHUNK] = {"CHUNK", td__on_chunk, FROM_CHUNKS},
  [TD_M_DP] = {"DP", td__on_dp, FROM_CHUNKS},
};
/* clang-format on */

/* The name of a message type, for logs ("?" when there is no such type). */
const char *td__msg_name(uint8_t type) {
  return type < sizeof(td__msgs) / sizeof(td__msgs[0]) && td__msgs[type].name ? td__msgs[type].name : "?";
}

static int td__on_msg(td_node_t *n, td_wk_t *wk, uint8_t type, const uint8_t *p, uint32_t len) {
  const td_msg_t *m = type < sizeof(td__msgs) / sizeof(td__msgs[0]) ? &td__msgs[type] : NULL;
  if (!m || !m->fn || !(m->from & K(wk->kind))) return TD_EPROTO;
  if (n->procs.raw.len && type != TD_M_PRINT) td__raw_flush(n); /* held output goes before what follows */
  td_rd_t rd;
  td_rd_init(&rd, p, len);
  int rc = m->fn(n, wk, &rd);
  if (n->objs.nchanged) td__objs_phase(n); /* what the message changed, acted on before the next */
  return rc;
}

/* -- Loop -------------------------------------------------------------------------------- */

void td_node_flush(td_node_t *n) {
  for (int i = 0; i < n->procs.n; i++)
    if (td_chan_pending(&n->procs.list[i]->ch)) td_chan_flush(&n->procs.list[i]->ch);
}

static void td__wk_malformed(td_node_t *n, td_wk_t *wk, uint8_t type) {
  fprintf(stderr, "tide: malformed message %s (type %u) from worker %d; stopping it\n", td__msg_name(type),
          (unsigned)type, (int)wk->pid);
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

/* How long the poll may sleep: until the nearest deadline of a waiting
 * request, of nodes settling, or of the hang scan; not at all when
 * something changed after this turn's checks (a stream's consumer let items
 * go in the tick, an object changed outside a message). */
/* The cluster's timers (heartbeats, a silent link's death, fetch and
 * data-plane checks) run every TD__TICK_S while the node is in a cluster. */
#define TD__TICK_S 0.25
#define TD__ROOM_S 0.05 /* CPUs and GPUs free, told to the head and back, at most this often */
static int td__in_cluster(const td_node_t *n) {
  return n->links.head || n->links.nlinks || n->links.next_index || n->links.waitsubs;
}

static double td__poll_timeout(td_node_t *n, double timeout) {
  double now = td_now();
  /* Sleep no longer than to the next tick: a daemon pumps with 0.5 s, and
   * a dead node was found up to that much after its timeout. */
  if (td__in_cluster(n) && n->tick_at + TD__TICK_S - now < timeout) timeout = n->tick_at + TD__TICK_S - now;
  if (n->links.room_owed && n->links.room_at + TD__ROOM_S - now < timeout)
    timeout = n->links.room_at + TD__ROOM_S - now;
  for (td_req_t *r = n->procs.reqs; r; r = r->next)
    if (r->deadline > 0 && r->deadline - now < timeout) timeout = r->deadline - now;
  if (n->links.nunplaced && n->links.settle_until - now < timeout)
    timeout = n->links.settle_until - now + 0.001;
  double scan = td__why_next(n, now);
  if (scan < timeout) timeout = scan;
  if (n->objs.allocw && timeout > 0.01) timeout = 0.01; /* ALLOCs waiting for room: look again soon */
  if (timeout < 0 || n->objs.dirty) timeout = 0;
  return timeout;
}

/* The I/O phase: waits up to timeout for any channel, the host's fd or the
 * data plane, then reads what came (each message is handled, and its
 * objects phase run, in td__wk_input). */
static void td__io_phase(td_node_t *n, double timeout) {
  if (n->cappfds < n->procs.n + 1 + TD_NODE_WATCHES) {
    n->cappfds = n->procs.n + 16 + TD_NODE_WATCHES;
    n->pfds = td_xrealloc(n->pfds, (size_t)n->cappfds * sizeof(struct pollfd));
  }
  int np = n->procs.n;
  for (int i = 0; i < np; i++) {
    n->pfds[i].fd = n->procs.list[i]->ch.fd;
    n->pfds[i].events = POLLIN | (td_chan_pending(&n->procs.list[i]->ch) ? POLLOUT : 0);
    n->pfds[i].revents = 0;
  }
  int ms = timeout > 1e6 ? -1 : (int)(timeout * 1000 + 0.999);
  int ext = 0, slot[TD_NODE_WATCHES];
  for (int i = 0; i < TD_NODE_WATCHES; i++)
    if (n->watch[i].fd >= 0) {
      slot[ext] = i;
      n->pfds[np + ext++] = (struct pollfd){n->watch[i].fd, POLLIN, 0};
    }
  int dp = td__dp_fd(n) >= 0; /* the data plane's streams, behind one epoll fd */
  if (dp) n->pfds[np + ext] = (struct pollfd){td__dp_fd(n), POLLIN, 0};
  int r = poll(n->pfds, (nfds_t)(np + ext + dp), ms);
  if (r <= 0) return;
  /* A callback may remove a watch (an ingress that stops): each is looked up afresh. */
  for (int k = 0; k < ext; k++) {
    td_node_watch_t *w = &n->watch[slot[k]];
    if (n->pfds[np + k].revents && w->fd == n->pfds[np + k].fd && w->read) w->read(w->ud);
  }
  if (dp && n->pfds[np + ext].revents) td__dp_io(n);
  /* Workers may die while handling; copy the list first. */
  td_wk_t **ready = td_xmalloc((size_t)np * sizeof(td_wk_t *) + 1);
  uint64_t *ids = td_xmalloc((size_t)np * 8 + 8);
  int nr = 0;
  for (int i = 0; i < np; i++)
    if (n->pfds[i].revents) {
      ready[nr] = n->procs.list[i];
      ids[nr++] = n->procs.list[i]->id;
    }
  for (int i = 0; i < nr; i++) {
    int alive = 0;
    for (int k = 0; k < n->procs.n; k++)
      if (n->procs.list[k] == ready[i] && n->procs.list[k]->id == ids[i]) alive = 1;
    if (alive) td__wk_input(n, ready[i]);
  }
  td__raw_flush(n);
  free(ready);
  free(ids);
}

/* One turn of the loop, in named phases (libuv's uv_run is the model):
 * schedule and send; I/O (every message, then its objects phase);
 * requests waiting for objects; results and lineage owed to the head; the
 * cluster's timers; tasks waiting for nodes to settle; the hang scan;
 * schedule again, the host's tick, and send. */
void td_node_pump(td_node_t *n, double timeout) {
  td_node_settle(n); /* what changed outside a message, since the last turn */
  td__sched(n);
  td_node_flush(n);
  td__io_phase(n, td__poll_timeout(n, timeout));
  td_node_settle(n);
  if (n->objs.dirty || n->procs.reqs) {
    n->objs.dirty = 0;
    td__reqs_check(n, td_now());
  }
  if (n->objs.allocw) td__allocs_retry(n, td_now());
  if (n->links.nfwd_ready) td__fwd_flush(n);
  if (n->lineage.nout) td__lineage_send(n);
  if (td__in_cluster(n)) {
    double now = td_now();
    n->links.room_owed = 0;
    if (now - n->tick_at >= TD__TICK_S) {
      n->tick_at = now;
      td__cluster_tick(n, now);
    } else if (now - n->links.room_at >= TD__ROOM_S) {
      n->links.room_at = now; /* between ticks too: room changes with the work */
      td__room_tick(n);
    } else {
      n->links.room_owed = 1; /* too soon after the last: the loop wakes for it */
    }
  }
  if (n->links.nunplaced) td__unplaced_check(n, td_now());
  if (n->tasks.hang_warn_s > 0 && n->tasks.map.len) td__why_tick(n, td_now());
  td_node_settle(n); /* what the timers and the tick changed */
  td__sched(n);
  for (int i = 0; i < TD_NODE_WATCHES; i++)
    if (n->watch[i].tick) n->watch[i].tick(n->watch[i].ud);
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
    if (!n->links.head) {
      wk = td__wk_add(n, td__new_wk_id(n), WK_HEAD, -1);
      wk->remote = 1;
      wk->last_seen = td_now();
      n->links.head = wk;
    }
    wk = n->links.head;
  } else {
    /* The fake client last fed, also once a JOIN made it a node's link. */
    for (int i = 0; i < n->procs.n; i++)
      if ((n->procs.list[i]->kind == WK_CLIENT || n->procs.list[i]->kind == WK_NODE ||
           n->procs.list[i]->kind == WK_PEER) &&
          n->procs.list[i]->ch.fd < 0)
        wk = n->procs.list[i];
    if (!wk) wk = td__wk_add(n, td__new_wk_id(n), WK_CLIENT, -1);
  }
  int rc = td__on_msg(n, wk, type, p, len);
  td__raw_flush(n);
  if (rc) td__wk_dead(n, wk, "sent a malformed message");
  else td_buf_reset(&wk->ch.out); /* replies go nowhere */
  return rc;
}

int td_node_add_client(td_node_t *n, int fd) {
  /* The store fd goes first, beside one byte, as SCM_RIGHTS. */
  if (td_sock_send_fd(fd, td_store_fd(n->objs.store))) {
    close(fd);
    return TD_EIO;
  }
  td_wk_t *wk = td__wk_add(n, td__new_wk_id(n), WK_CLIENT, fd);
  struct ucred cred;
  socklen_t cl = sizeof(cred);
  if (n->tl && !getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &cl)) td__tl_client(n, wk->id, cred.pid);
  td_chan_begin(&wk->ch, TD_M_HELLO);
  td_buf_u64(&wk->ch.out, wk->id);
  td_buf_u64(&wk->ch.out, n->objs.inline_max);
  td_chan_end(&wk->ch);
  td_chan_flush(&wk->ch);
  td_log("client %llu attached", (unsigned long long)wk->id);
  return 0;
}

int td_node_fds(td_node_t *n, int *fds, int max) {
  int k = 0;
  for (int i = 0; i < n->procs.n && k < max; i++)
    if (n->procs.list[i]->ch.fd >= 0) fds[k++] = n->procs.list[i]->ch.fd;
  for (int i = 0; i < TD_NODE_WATCHES; i++)
    if (n->watch[i].fd >= 0 && k < max) fds[k++] = n->watch[i].fd;
  return k;
}

void td_node_watch_fd(td_node_t *n, int fd, td_node_cb on_readable, td_node_cb on_tick, void *ud) {
  n->watch[0] = (td_node_watch_t){fd, on_readable, on_tick, ud};
}

int td_node_watch_add(td_node_t *n, int fd, td_node_cb on_readable, td_node_cb on_tick, void *ud) {
  for (int i = 1; i < TD_NODE_WATCHES; i++)
    if (n->watch[i].fd < 0 && !n->watch[i].tick) {
      n->watch[i] = (td_node_watch_t){fd, on_readable, on_tick, ud};
      return i;
    }
  return -EBUSY;
}

void td_node_watch_remove(td_node_t *n, int slot) {
  if (slot > 0 && slot < TD_NODE_WATCHES) n->watch[slot] = (td_node_watch_t){-1, NULL, NULL, NULL};
}

int td_node_proc_alive(td_node_t *n, uint64_t id) {
  for (int i = 0; i < n->procs.n; i++)
    if (n->procs.list[i]->id == id && !n->procs.list[i]->dead) return 1;
  return 0;
}

/* -- Lifecycle ------------------------------------------------------------------------------ */

td_node_t *td_node_new(const td_node_opts_t *o) {
  td_node_t *n = td_xcalloc(1, sizeof(*n));
  long ncpu = sysconf(_SC_NPROCESSORS_ONLN);
  long pages = sysconf(_SC_PHYS_PAGES), psz = sysconf(_SC_PAGESIZE);
  double mem = (double)pages * (double)psz;
  size_t cap = o->store_capacity ? o->store_capacity : (size_t)(mem * 0.3);
  n->objs.store = td_store_new(cap);
  if (!n->objs.store) {
    free(n);
    return NULL;
  }
  n->objs.inline_max = o->inline_max ? o->inline_max : 64 * 1024;
  n->objs.spill = td_spill_new(NULL);
  for (int i = 0; i < TD_NODE_WATCHES; i++) n->watch[i].fd = -1;
  n->procs.no_workers = o->no_workers;
  n->links.index = o->index <= TD_NODE_MAX ? o->index : 0;
  n->objs.next_seq = (uint64_t)n->links.index << TD_NODE_SHIFT;
  n->procs.next_id = (uint64_t)n->links.index << (TD_NODE_SHIFT - 32);
  n->links.node_timeout = o->node_timeout > 0 ? o->node_timeout : 5.0;
  snprintf(n->links.name, sizeof(n->links.name), "%s", o->name ? o->name : "");
  if (!n->links.name[0]) gethostname(n->links.name, sizeof(n->links.name) - 1);
  td_map_init(&n->links.fwd);
  td_map_init(&n->xfer.pulls);
  td_map_init(&n->lineage.specs);
  td_map_init(&n->lineage.kept);
  td_map_init(&n->links.relays);
  td_map_init(&n->links.fwd_actors);
  td_map_init(&n->objs.map);
  td_map_init(&n->tasks.map);
  td_map_init(&n->actors.map);
  td_map_init(&n->actors.names);
  td_map_init(&n->tasks.fns);
  td_map_init(&n->sched.fnstats);
  td_buf_init(&n->tmp);
  td__tl_init(n);
  td__why_init(n);
  td_node_res_index(n, "CPU");
  td_node_res_index(n, "GPU");
  td_node_res_index(n, "memory");
  n->sched.total[TD_RES_CPU] = o->num_cpus >= 0 ? o->num_cpus : (double)ncpu;
  n->sched.total[TD_RES_GPU] = o->num_gpus > 0 ? o->num_gpus : 0;
  n->sched.total[TD_RES_MEM] = o->memory >= 0 ? o->memory : mem * 0.7;
  n->sched.ngpus = (int)n->sched.total[TD_RES_GPU];
  if (n->sched.ngpus > 64) n->sched.ngpus = 64;
  for (int g = 0; g < n->sched.ngpus; g++) n->sched.gpu_free[g] = 1;
  for (int i = 0; i < o->nres; i++) {
    int idx = td_node_res_index(n, o->res_names[i]);
    if (idx >= 0) n->sched.total[idx] = o->res_amts[i];
  }
  memcpy(n->sched.avail, n->sched.total, sizeof(n->sched.total));
  snprintf(n->procs.exe, sizeof(n->procs.exe), "%s", o->exe ? o->exe : "/proc/self/exe");
  td__restore_ids(n);
  for (int i = 0; i < o->prestart; i++) td__spawn(n, WK_TASK, NULL, 0);
  return n;
}

void td_node_set_rpc(td_node_t *n, td_rpc_cb cb, void *ud) {
  n->procs.rpc = cb;
  n->procs.rpc_ud = ud;
}

/* TIDE_DEBUG_LEFTOVERS=1: what is still in the object table when the node
 * stops, and who holds it, in the log (a leak hunt under chaos). */
static void td__log_leftovers(td_node_t *n) {
  const char *e = getenv("TIDE_DEBUG_LEFTOVERS");
  if (!e || !*e || *e == '0') return;
  size_t it = 0;
  uint64_t id;
  void *v;
  while (td_map_next(&n->objs.map, &it, &id, &v)) {
    td_obj_t *o = v;
    char who[256] = "";
    size_t wl = 0;
    for (int i = 0; i < n->procs.n && wl < sizeof(who) - 40; i++) {
      intptr_t c = (intptr_t)td_map_get(&n->procs.list[i]->held, id);
      if (c)
        wl += (size_t)snprintf(who + wl, sizeof(who) - wl, " wk%d(kind %d)x%ld", i, n->procs.list[i]->kind,
                               (long)c);
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
  for (int i = 0; i < n->procs.n; i++)
    if (n->procs.list[i]->pid > 0) kill(n->procs.list[i]->pid, SIGKILL);
  for (int i = 0; i < n->procs.n; i++) {
    td_wk_t *wk = n->procs.list[i];
    if (wk->pid > 0) waitpid(wk->pid, NULL, 0);
    td_chan_close(&wk->ch);
    if (wk->bridge && n->xfer.peer_close) n->xfer.peer_close(n->xfer.peer_ud, wk->bridge);
    td_map_free(&wk->fns_sent);
    td_map_free(&wk->allocs);
    td_map_free(&wk->held);
    td_map_free(&wk->pinned);
    td__notes_free(wk);
    free(wk);
  }
  free(n->procs.list);
  td_buf_free(&n->procs.raw);
  td__tl_free(n);
  size_t it = 0;
  void *v;
  while (td_map_next(&n->objs.map, &it, NULL, &v)) {
    td_obj_t *o = v;
    if (o->copies) free(o->copies->c);
    free(o->copies); free(o->data); free(o->contained); free(o->items); free(o->waiters); free(o);
  }
  while (n->objs.npool) free(n->objs.pool[--n->objs.npool]);
  while (n->tasks.npool) free(n->tasks.pool[--n->tasks.npool]);
  free(n->objs.pool);
  free(n->objs.changed);
  td__allocs_free(n);
  free(n->tasks.pool);
  it = 0;
  while (td_map_next(&n->tasks.map, &it, NULL, &v)) {
    td_task_t *t = v;
    free(t);
  }
  it = 0;
  while (td_map_next(&n->actors.map, &it, NULL, &v)) {
    free(((td_actor_t *)v)->reason);
    free(v);
  }
  it = 0;
  while (td_map_next(&n->tasks.fns, &it, NULL, &v)) free(v);
  it = 0;
  while (td_map_next(&n->sched.fnstats, &it, NULL, &v)) free(v);
  td_map_free(&n->sched.fnstats);
  while (n->procs.reqs) {
    td_req_t *r = n->procs.reqs;
    n->procs.reqs = r->next;
    free(r->ids);
    free(r);
  }
  while (n->pgs.list) {
    td_pg_t *pg = n->pgs.list;
    n->pgs.list = pg->next;
    while (pg->adopt) {
      td_adoptee_t *e = pg->adopt;
      pg->adopt = e->next;
      free(e);
    }
    free(pg->total); free(pg->avail); free(pg->where); free(pg->hint); free(pg);
  }
  it = 0;
  while (td_map_next(&n->links.fwd, &it, NULL, &v)) {
    free(((td_fwd_t *)v)->rets);
    free(v);
  }
  td_map_free(&n->links.fwd);
  td_map_free(&n->xfer.pulls);
  it = 0;
  while (td_map_next(&n->lineage.specs, &it, NULL, &v)) free(v);
  td_map_free(&n->lineage.specs);
  it = 0;
  while (td_map_next(&n->lineage.kept, &it, NULL, &v)) free(v);
  td_map_free(&n->lineage.kept);
  free(n->lineage.out);
  td__parked_drop(n);
  for (td_waitsub_t *w = n->links.waitsubs, *next; w; w = next) {
    next = w->next;
    free(w->held);
    free(w->msg);
    free(w);
  }
  while (n->links.wdmap) {
    td_wdmap_t *m = n->links.wdmap;
    n->links.wdmap = m->next;
    free(m);
  }
  it = 0;
  while (td_map_next(&n->links.relays, &it, NULL, &v)) free(v);
  td_map_free(&n->links.relays);
  td_map_free(&n->links.fwd_actors);
  free(n->links.gone_at);
  free(n->links.fwd_ready);
  free(n->tasks.fn_order);
  free(n->xfer.cwait);
  free(n->xfer.ppull);
  td_map_free(&n->objs.map);
  td_map_free(&n->tasks.map);
  td_map_free(&n->actors.map);
  td_map_free(&n->actors.names);
  td_map_free(&n->tasks.fns);
  td_buf_free(&n->tmp);
  free(n->pfds);
  td_spill_destroy(&n->objs.spill);
  td_store_destroy(&n->objs.store);
  free(n);
  *np = NULL;
}
