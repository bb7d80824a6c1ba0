/* Large objects between nodes (node_int.h).
 *
 * Chunks: values over TD_CHUNK cross nodes as TD_CHUNK_GET / TD_CHUNK pairs,
 * several in flight, written straight into the store extent the value will
 * live in (a sink); the sender reads them from where the value lies.
 *
 * Peers: a large object that many nodes need is not sent by the head to
 * each of them. The head keeps, per large object it has handed out, the
 * nodes that have it or are fetching it (copies), and directs each new fetch
 * to the one of them (or itself) with the fewest fetches from it under way.
 * A node serves the chunks it has, and holds a request for one still on its
 * way to it, so that a broadcast runs as a pipeline. A node that cannot get
 * a chunk from another (that node no longer has the object, or went silent)
 * fetches the rest from its head. The head's list is a hint, never trusted
 * for correctness. */
#include <errno.h>
#include <fcntl.h>
#include <unistd.h>

#include "node_int.h"

/* -- Where another node's object is, and getting it ----------------------------------
 * An object made on another node has a foreign record here that holds one
 * ref there (td__foreign, td__unhold); its value is asked of the link it
 * comes from (td__pull) and filled in when it comes (td__obj_fill). */

/* The link an object of another node is asked of: a node asks its head; the
 * head asks the node that made it. NULL: the object is this node's own. */
td_wk_t *td__upstream(td_node_t *n, uint64_t id) {
  if (!id || td_id_node(id) == n->links.index) return NULL;
  if (n->links.head) return n->links.head->dead ? NULL : n->links.head;
  return td__link(n, td_id_node(id));
}

void td__send_refs1(td_wk_t *up, uint64_t id, int32_t delta) {
  td_chan_begin(&up->ch, TD_M_REFS);
  td_buf_u32(&up->ch.out, 1);
  td_buf_u64(&up->ch.out, id);
  td_buf_u32(&up->ch.out, (uint32_t)delta);
  td_chan_end(&up->ch);
}

/* held: the ref upstream is already taken (an export); else one is asked. */
td_obj_t *td__foreign(td_node_t *n, uint64_t id, int held) {
  td_wk_t *up = td__upstream(n, id);
  if (!up) return NULL;
  td_obj_t *o = td__obj_new(n, id);
  o->foreign = 1;
  if (!held) td__send_refs1(up, id, 1);
  return o;
}

/* foreign == 2: a return of work forwarded to the head, kept there. */
td_wk_t *td__upstream_of(td_node_t *n, td_obj_t *o) {
  if (o->foreign == 2) return n->links.head && !n->links.head->dead ? n->links.head : NULL;
  if (o->up) return n->links.head ? (n->links.head->dead ? NULL : n->links.head) : td__link(n, o->up - 1);
  return td__upstream(n, o->id);
}

void td__unhold(td_node_t *n, td_obj_t *o) {
  td_wk_t *up = td__upstream_of(n, o);
  if (up) td__send_refs1(up, o->id, -1);
}

void td__pull(td_node_t *n, td_obj_t *o) {
  if (o->pulling || !o->foreign || o->state != OBJ_PENDING) return;
  td_wk_t *up = td__upstream_of(n, o);
  if (!up) return;
  o->pulling = 1;
  uint32_t req = (++n->xfer.next_pull) | 0x80000000u;
  td_map_set(&n->xfer.pulls, req, (void *)(uintptr_t)o->id);
  td_chan_begin(&up->ch, TD_M_GET);
  td_buf_u32(&up->ch.out, req);
  td_buf_f64(&up->ch.out, -1);
  td_buf_u32(&up->ch.out, 1);
  td_buf_u64(&up->ch.out, o->id);
  td_chan_end(&up->ch);
}

/* Fills a pending object from inline bytes another node sent (into the
 * store when large, so workers here map it). */
void td__obj_fill(td_node_t *n, td_obj_t *o, int state, const uint8_t *p, size_t len, const uint64_t *refs,
                  uint32_t nrefs) {
  size_t off;
  if (state == OBJ_READY && len > n->objs.inline_max && td__alloc(n, len, &off, o) == 0) {
    memcpy(td_store_base(n->objs.store) + off, p, len);
    td__obj_set(n, o, OBJ_READY, 1, NULL, len, off, refs, nrefs);
  } else {
    td__obj_set(n, o, state, 0, p, len, 0, refs, nrefs);
  }
}

/* Head: objects a node pushed beside a return value (made there, held
 * by it). Each new one holds a ref until the value that contains it is set. */
int td__link_pushed(td_node_t *n, td_rd_t *rd, uint64_t **made, uint32_t *nmade) {
  uint32_t np = td_rd_u32(rd);
  if (rd->bad || np > (uint32_t)((rd->end - rd->p) / 9)) return TD_EPROTO;
  *made = td_xmalloc((size_t)np * 8 + 8);
  for (uint32_t i = 0; i < np; i++) {
    uint64_t id = td_rd_u64(rd);
    uint8_t kind = td_rd_u8(rd);
    uint32_t vl = 0;
    const uint8_t *vp = kind == TD_V_LOST ? NULL : td_rd_str(rd, &vl);
    if (rd->bad || (kind != TD_V_INLINE && kind != TD_V_ERROR && kind != TD_V_LOST)) return TD_EPROTO;
    if (kind == TD_V_LOST || td__obj(n, id)) continue;
    td__obj_from_bytes(n, id, kind == TD_V_ERROR ? OBJ_ERROR : OBJ_READY, vp, vl);
    (*made)[(*nmade)++] = id;
  }
  return 0;
}

void td__chunk_more(td_node_t *n, td_obj_t *o, td_wk_t *up) {
  (void)n;
  while (o->asked < o->len && o->asked - o->got < (uint64_t)TD_CHUNKS_OUT * TD_CHUNK) {
    uint32_t l = o->len - o->asked < TD_CHUNK ? (uint32_t)(o->len - o->asked) : TD_CHUNK;
    td_chan_begin(&up->ch, TD_M_CHUNK_GET);
    td_buf_u64(&up->ch.out, o->id);
    td_buf_u64(&up->ch.out, o->asked);
    td_buf_u32(&up->ch.out, l);
    /* Answered on the data-plane stream (a peer without one ignores it). */
    td_buf_u8(&up->ch.out, o->dp);
    td_chan_end(&up->ch);
    o->asked += l;
  }
}

void td__chunk_fail(td_node_t *n, td_obj_t *o, const char *kind, const char *why) {
  td__have(n, o, 0);
  o->away = 0;
  if (o->chunked) td_store_free(n->objs.store, o->off, o->len);
  o->chunked = 0;
  o->pulling = 0;
  o->len = 0;
  td__errblob(&n->tmp, kind, why);
  td__obj_set(n, o, OBJ_ERROR, 0, n->tmp.p, n->tmp.len, 0, NULL, 0);
}

/* Starts fetching a value of `total` bytes from `up` into a new extent, or
 * goes on from where a fetch of it that stopped had got to. */
void td__chunk_begin(td_node_t *n, td_obj_t *o, uint64_t total, td_wk_t *up) {
  size_t off;
  /* All of one fetch's chunks come one way, so they land in order. */
  o->dp = (uint8_t)td__dp_ready(n, up);
  if (o->chunked && o->len == total) {
    o->pulling = 1;
    o->src = up->id;
    o->asked = o->got;
    td__chunk_more(n, o, up);
    return;
  }
  if (o->chunked) td_store_free(n->objs.store, o->off, o->len); /* not the same value */
  o->chunked = 0;
  if (total == 0 || td__alloc(n, total, &off, o) != 0) {
    char why[160];
    snprintf(why, sizeof(why), "no room in this node's object store for a value of %llu bytes",
             (unsigned long long)total);
    td__chunk_fail(n, o, "ObjectStoreFullError", why);
    return;
  }
  o->chunked = 1;
  o->pulling = 1;
  o->off = off;
  o->len = total;
  o->asked = o->got = 0;
  o->src = up->id;
  td__chunk_more(n, o, up);
}

/* The object a chunk of l bytes at off is for, or NULL when it is late
 * (the object is ready, failed or gone) or says the sender lost it. */
td_obj_t *td__chunk_obj(td_node_t *n, td_wk_t *wk, uint64_t id, uint64_t off, uint32_t l) {
  td_obj_t *o = td__obj(n, id);
  if (!o || !o->chunked || o->state != OBJ_PENDING || o->src != wk->id) return NULL;  /* late */
  if (l == 0 || off >= o->len || l > o->len - off) {
    if (wk->kind == WK_PEER) td__peer_fallback(n, o, "the node it came from no longer has it");
    else td__chunk_fail(n, o, "ObjectLostError", "the object was freed on the node that held it");
    return NULL;
  }
  return o;
}

/* Receiver: one chunk into place; the value is set when all have come. */
int td__on_chunk(td_node_t *n, td_wk_t *wk, td_rd_t *rd) {
  uint64_t id = td_rd_u64(rd), off = td_rd_u64(rd);
  uint32_t l;
  const uint8_t *p = td_rd_str(rd, &l);
  if (rd->bad) return TD_EPROTO;
  td_obj_t *o = td__chunk_obj(n, wk, id, off, l);
  if (!o) return 0;
  memcpy(td_store_base(n->objs.store) + o->off + off, p, l);
  td__chunk_landed(n, wk, o, l);
  return 0;
}

/* The object the chunk being read is for, if it still wants it: checked
 * again at every read, as the object may fail meanwhile, or even be
 * fetched anew (a task run again) into an extent of another size. */
static td_obj_t *td__sink_obj(td_node_t *n, td_wk_t *wk) {
  td_obj_t *o = td__obj(n, wk->sink_id);
  if (!o || !o->chunked || o->state != OBJ_PENDING || o->src != wk->id) return NULL;
  return wk->sink_off < o->len && wk->sink_len <= o->len - wk->sink_off ? o : NULL;
}

/* Where the next bytes of the chunk being read go, and how many fit
 * there; bytes of a chunk nobody wants any more go to scratch. */
static uint8_t *td__sink_dst(td_node_t *n, td_wk_t *wk, size_t *room) {
  td_obj_t *o = td__sink_obj(n, wk);
  *room = wk->sink_left;
  if (o) return td_store_base(n->objs.store) + o->off + wk->sink_off + (wk->sink_len - wk->sink_left);
  td_buf_reset(&n->tmp);
  td_buf_reserve(&n->tmp, 64 * 1024);
  if (*room > n->tmp.cap) *room = n->tmp.cap;
  return n->tmp.p;
}

/* The chunk has all come: it counts if its object still wants it. */
static void td__sink_done(td_node_t *n, td_wk_t *wk) {
  td_obj_t *o = td__sink_obj(n, wk);
  if (o) td__chunk_landed(n, wk, o, wk->sink_len);
}

/* Takes a split chunk frame from wk's channel: its bytes so far are
 * placed, the rest is left to td__sink_read. Returns 1 if one was taken,
 * 0 if none waits, TD_EPROTO for a malformed one. */
int td__sink_take(td_node_t *n, td_wk_t *wk) {
  const uint8_t *p;
  uint32_t have, len;
  if (!td_chan_partial(&wk->ch, &p, &have, &len)) return 0;
  td_rd_t rd;
  td_rd_init(&rd, p, have);
  uint64_t id = td_rd_u64(&rd), off = td_rd_u64(&rd);
  uint32_t l = td_rd_u32(&rd);
  if (rd.bad || wk->kind < WK_NODE || len != TD__CHUNK_HEAD + (uint64_t)l) return TD_EPROTO;
  td_obj_t *o = td__chunk_obj(n, wk, id, off, l);
  wk->sink_id = id;
  wk->sink_off = off;
  wk->sink_len = wk->sink_left = l;
  uint32_t k = have - TD__CHUNK_HEAD;
  if (o) memcpy(td_store_base(n->objs.store) + o->off + off, p + TD__CHUNK_HEAD, k);
  wk->sink_left -= k;
  td_chan_take(&wk->ch);
  return 1;
}

/* Reads what the link has of the chunk being taken. Returns 0 (done or
 * waiting for more) or TD_ECLOSED. */
int td__sink_read(td_node_t *n, td_wk_t *wk) {
  while (wk->sink_left) {
    size_t room;
    uint8_t *dst = td__sink_dst(n, wk, &room);
    ssize_t r = read(wk->ch.fd, dst, room);
    if (r > 0) { wk->sink_left -= (uint32_t)r; continue; }
    if (r < 0 && errno == EINTR) continue;
    if (r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) return 0;
    return TD_ECLOSED;
  }
  td__sink_done(n, wk);
  return 0;
}

/* After l more bytes of o have landed: ask for more, or set the value. */
void td__chunk_landed(td_node_t *n, td_wk_t *wk, td_obj_t *o, uint32_t l) {
  o->got += l;
  /* From a node that is not this node's head: a peer, or (on the head)
   * any node. */
  if (wk->kind == WK_PEER || wk->kind == WK_NODE) n->xfer.bytes_from_peers += l;
  if (wk->kind == WK_PEER) td__ppull_note(n, o, wk);
  if (o->got < o->len) {
    if (n->xfer.ncwait) td__cwait_serve(n, o->id); /* other nodes waiting for these bytes */
    /* The next request leaves now, not when the loop has read all the
     * link holds: the sender never waits on a full pipe for it. */
    td__chunk_more(n, o, wk);
    td_chan_flush(&wk->ch);
    return;
  }
  o->chunked = 0;
  o->pulling = 0;
  o->away = 0;
  td__have(n, o, 1);
  if (o->up) {  /* a result its node kept for us: it can go now */
    if (o->copies) td__copy_drop(o->copies, o->up - 1);  /* and so it will not have it */
    td__send_refs1(wk, o->id, -1);
    o->up = 0;
    o->foreign = 0;
  }
  size_t at = o->off, len = o->len;
  td_task_t *t = o->producer;
  o->len = 0;
  td__obj_set(n, o, OBJ_READY, 1, NULL, len, at, NULL, 0);
  if (t && t->state == T_FETCHING && !td__task_fetching(n, t)) td__task_finish(n, t);
}

int td_node_xfer(td_node_t *n, uint64_t id, uint64_t *total, uint64_t *got) {
  td_obj_t *o = td__obj(n, id);
  if (!o || o->state != OBJ_PENDING || !o->chunked) return TD_ENOTFOUND;
  *total = o->len;
  *got = o->got;
  return 0;
}

td_copy_t *td__copy(td_copies_t *cp, uint32_t node) {
  for (uint32_t i = 0; i < cp->n; i++)
    if (cp->c[i].node == node) return &cp->c[i];
  return NULL;
}

/* A fetch from `from` ended. */
static void td__copy_unload(td_copies_t *cp, uint32_t from) {
  td_copy_t *e = from ? td__copy(cp, from) : NULL;
  uint32_t *load = from ? (e ? &e->load : NULL) : &cp->load;
  if (load && *load) (*load)--;
}

static td_copy_t *td__copy_add(td_copies_t *cp, uint32_t node, uint32_t from) {
  if (cp->n == cp->cap) {
    cp->cap = cp->cap ? cp->cap * 2 : 4;
    cp->c = td_xrealloc(cp->c, cp->cap * sizeof(td_copy_t));
  }
  cp->c[cp->n] = (td_copy_t){node, from, 0, 0};
  return &cp->c[cp->n++];
}

void td__copy_drop(td_copies_t *cp, uint32_t node) {
  td_copy_t *e = td__copy(cp, node);
  if (!e) return;
  td_copy_t gone = *e;
  *e = cp->c[--cp->n];
  if (!gone.done) td__copy_unload(cp, gone.from);
}

/* Head: the node that `wk` can fetch o from with the fewest fetches from
 * it under way (NULL: none does fewer than the head, or none can serve). */
static td_wk_t *td__copy_source(td_node_t *n, td_obj_t *o, td_wk_t *wk, uint32_t best) {
  td_copies_t *cp = o->copies;
  td_wk_t *src = NULL;
  for (uint32_t i = 0; cp && wk->peer_port && i < cp->n;) {
    td_wk_t *l = td__link(n, cp->c[i].node);
    if (!l || !l->peer_port) { td__copy_drop(cp, cp->c[i].node); continue; }  /* gone */
    if (l != wk && cp->c[i].load <= best) best = cp->c[i].load, src = l;
    i++;
  }
  return src;
}

/* Head: 1 if node wk can fetch o, kept away on another node, from there. */
int td__away_source(td_node_t *n, td_obj_t *o, td_wk_t *wk) {
  return wk->kind == WK_NODE && o->away && o->state == OBJ_PENDING && td__copy_source(n, o, wk, UINT32_MAX);
}

/* Head: node `wk` asks for large object o; where it fetches it from. */
void td__put_pull(td_node_t *n, td_buf_t *b, td_obj_t *o, td_wk_t *wk) {
  if (!o->copies) o->copies = td_xcalloc(1, sizeof(td_copies_t));
  td_copies_t *cp = o->copies;
  td__copy_drop(cp, wk->node_index);  /* it fetches it again */
  /* The head is a source only when it has the value. */
  td_wk_t *src = td__copy_source(n, o, wk, o->state == OBJ_READY ? cp->load : UINT32_MAX);
  td__copy_add(cp, wk->node_index, src ? src->node_index : 0);
  if (!src) {
    cp->load++;
    td_buf_u8(b, TD_V_PULL);
    td_buf_u64(b, o->len);
    return;
  }
  td__copy(cp, src->node_index)->load++;
  char ep[128];
  const char *h = src->peer_host;
  int el = snprintf(ep, sizeof(ep), strchr(h, ':') ? "tcp://[%s]:%u" : "tcp://%s:%u", h, src->peer_port);
  td_buf_u8(b, TD_V_PEER);
  td_buf_u64(b, o->len);
  td_buf_u32(b, src->node_index);
  td_buf_str(b, ep, (size_t)el);
}

/* Head: a fetch it directed ended (ok: that node has the whole value). */
int td__on_have(td_node_t *n, td_wk_t *wk, td_rd_t *rd) {
  uint64_t id = td_rd_u64(rd);
  uint8_t ok = td_rd_u8(rd);
  if (rd->bad) return TD_EPROTO;
  td_obj_t *o = td__obj(n, id);
  td_copy_t *e = o && o->copies ? td__copy(o->copies, wk->node_index) : NULL;
  if (!e || e->done) return 0;
  if (!ok) {
    td__copy_drop(o->copies, wk->node_index);
    return 0;
  }
  e->done = 1;
  td__copy_unload(o->copies, e->from);
  return 0;
}

/* Head: a task's large result stays on the node that made it (wk), which
 * holds it for this head: tasks and calls that run on other nodes fetch it
 * from there, and the head fetches it only when something here needs it
 * (td__pull). Tasks and calls waiting for it go on (td__away_wait holds
 * back those that turn out to run here); actor creations wait for the
 * head to have it. */
void td__obj_away(td_node_t *n, td_obj_t *o, td_wk_t *wk, uint64_t total) {
  o->away = 1;
  o->len = total;
  if (!o->copies) o->copies = td_xcalloc(1, sizeof(td_copies_t));
  td__copy_drop(o->copies, wk->node_index);
  td__copy_add(o->copies, wk->node_index, 0)->done = 1;
  n->objs.dirty = 1; /* requests from nodes can be answered now */
  td__wake_waiters(n, o, 1);
  if (o->nwaiters) td__pull(n, o);
}

/* Head: t waits for those of its arguments it cannot go on without: any
 * being made again (its node died; pending, not away) and, with here (t
 * is to run on this node), those away on other nodes too, which the head
 * fetches. Returns how many it waits for (0: it can go). */
uint32_t td__away_wait(td_node_t *n, td_task_t *t, int here) {
  int away = 0;
  for (uint32_t i = 0; i < t->spec.ndeps; i++) {
    td_obj_t *o = td__obj(n, t->spec.deps[i]);
    if (!o || o->state != OBJ_PENDING) continue;
    if (o->away && !here) {
      away = 1;
      continue;
    }
    td__wait_on(o, t);
    if (o->away) td__pull(n, o);
  }
  t->has_away = (uint8_t)away;
  return t->deps_pending;
}

/* Head: of the nodes where t fits now, the one holding the most bytes of
 * its arguments kept away (NULL: none). Locality only chooses between
 * nodes that can run t: a node that lacks one of its resources would
 * refuse it as infeasible, and one that is full would only queue it. */
td_wk_t *td__away_home(td_node_t *n, td_task_t *t) {
  td_wk_t *best = NULL;
  uint64_t most = 0;
  for (uint32_t i = 0; i < t->spec.ndeps && t->spec.ndeps <= 64; i++) {
    td_obj_t *o = td__obj(n, t->spec.deps[i]);
    if (!o || !o->away || o->state != OBJ_PENDING || !o->up) continue;
    uint64_t bytes = 0;
    for (uint32_t k = 0; k < t->spec.ndeps; k++) {
      td_obj_t *x = td__obj(n, t->spec.deps[k]);
      if (x && x->away && x->state == OBJ_PENDING && x->up == o->up) bytes += x->len;
    }
    td_wk_t *w = td__link(n, o->up - 1);
    if (w && bytes > most && td__fits(w->navail, t)) most = bytes, best = w;
  }
  return best;
}

/* Node: tells the head a fetch it directed ended. */
void td__have_id(td_node_t *n, uint64_t id, int ok) {
  if (!n->links.head || n->links.head->dead) return;
  td_chan_begin(&n->links.head->ch, TD_M_HAVE);
  td_buf_u64(&n->links.head->ch.out, id);
  td_buf_u8(&n->links.head->ch.out, (uint8_t)ok);
  td_chan_end(&n->links.head->ch);
}

void td__have(td_node_t *n, td_obj_t *o, int ok) {
  if (!o->told) return;
  o->told = 0;
  td__have_id(n, o->id, ok);
}

static td_wk_t *td__wk_by_id(td_node_t *n, uint64_t id) {
  for (int i = 0; i < n->procs.n; i++)
    if (n->procs.list[i]->id == id && !n->procs.list[i]->dead) return n->procs.list[i];
  return NULL;
}

/* Node: the link to node `index` at endpoint ep, opened if need be. */
td_wk_t *td__peer(td_node_t *n, uint32_t index, const char *ep) {
  for (int i = 0; i < n->procs.n; i++) {
    td_wk_t *w = n->procs.list[i];
    if (w->kind == WK_PEER && w->bridge && !w->dead && w->node_index == index &&
        !strncmp(w->name, ep, sizeof(w->name) - 1))
      return w;
  }
  if (!n->xfer.peer_open || !n->xfer.peer_port) return NULL;
  for (uint32_t k = 0; k < n->xfer.nshun && k < TD_SHUN_MAX; k++)
    if (n->xfer.shun[k].index == index && n->xfer.shun[k].until > td_now())
      return NULL; /* the head serves it */
  int fd = -1;
  void *h = n->xfer.peer_open(n->xfer.peer_ud, ep, &fd);
  if (!h) return NULL;
  fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
  td_wk_t *w = td__wk_add(n, td__new_wk_id(n), WK_PEER, fd);
  td__link_chan(w);
  w->remote = 1;
  w->node_index = index;
  w->bridge = h;
  snprintf(w->name, sizeof(w->name), "%.63s", ep);
  td_chan_begin(&w->ch, TD_M_PEER);
  td_buf_u32(&w->ch.out, n->links.index);
  td_chan_end(&w->ch);
  td_log("opened a link to node-%u at %s", index, ep);
  return w;
}

/* Node: notes that a chunk of o came from another node just now. */
void td__ppull_note(td_node_t *n, td_obj_t *o, td_wk_t *peer) {
  for (uint32_t i = 0; i < n->xfer.nppull; i++)
    if (n->xfer.ppull[i].id == o->id) {
      n->xfer.ppull[i].wk = peer->id;
      n->xfer.ppull[i].at = td_now();
      return;
    }
  if (n->xfer.nppull == n->xfer.capppull) {
    n->xfer.capppull = n->xfer.capppull ? n->xfer.capppull * 2 : 8;
    n->xfer.ppull = td_xrealloc(n->xfer.ppull, n->xfer.capppull * sizeof(td_ppull_t));
  }
  n->xfer.ppull[n->xfer.nppull++] = (td_ppull_t){o->id, peer->id, td_now()};
}

/* Node: the rest of o comes from the head, not from the node it came from
 * (which `why` says what happened to). */
void td__peer_fallback(td_node_t *n, td_obj_t *o, const char *why) {
  fprintf(stderr, "tide: object %016llx: %s; fetching the rest from the head\n", (unsigned long long)o->id, why);
  fflush(stderr);
  if (!n->links.head || n->links.head->dead) {
    td__chunk_fail(n, o, "ObjectLostError", "the node it was fetched from lost it, and the head is gone");
    return;
  }
  /* Asked again: the head says where from now (itself, another node, or,
   * if it is making the value again, once it is made). The bytes that
   * have landed stay (chunks come in order: all before got). */
  o->src = 0;
  o->pulling = 0;
  td__pull(n, o);
}

/* Node: fetches from other nodes that went silent, or whose link closed
 * (peer: that link; NULL: any silent for the node timeout), go to the head. */
void td__ppull_check(td_node_t *n, td_wk_t *peer, double now) {
  uint64_t silent[8];
  int nsilent = 0;
  for (uint32_t i = 0; i < n->xfer.nppull;) {
    td_ppull_t p = n->xfer.ppull[i];
    td_obj_t *o = td__obj(n, p.id);
    int live = o && o->chunked && o->state == OBJ_PENDING && o->src == p.wk;
    int stuck = live && (peer ? peer->id == p.wk : now - p.at > n->links.node_timeout);
    if (live && !stuck) { i++; continue; }
    n->xfer.ppull[i] = n->xfer.ppull[--n->xfer.nppull];
    if (!stuck) continue;
    char why[96];
    if (peer) snprintf(why, sizeof(why), "the link with node-%u closed", peer->node_index);
    else snprintf(why, sizeof(why), "the node it came from sent nothing for %.1f s", now - p.at);
    td__peer_fallback(n, o, why);
    int seen = 0;
    for (int k = 0; k < nsilent; k++) seen |= silent[k] == p.wk;
    if (!peer && !seen && nsilent < 8) silent[nsilent++] = p.wk;
  }
  /* A node that went silent may be dead, or unreachable from here (a
   * firewall): its link is closed, and it is not asked for a while. */
  for (int k = 0; k < nsilent; k++) {
    td_wk_t *w = td__wk_by_id(n, silent[k]);
    if (!w) continue;
    n->xfer.shun[n->xfer.nshun++ % TD_SHUN_MAX] = (td_shun_t){w->node_index, now + TD_SHUN_S};
    td__wk_dead(n, w, "sent nothing for the node timeout");
  }
}

/* Where the len bytes of object id at off lie here, or NULL when they do
 * not (it is gone, or they have not landed yet). */
const uint8_t *td__chunk_src(td_node_t *n, uint64_t id, uint64_t off, uint32_t len) {
  td_obj_t *o = td__obj(n, id);
  if (!o || len > TD_CHUNK || off >= o->len || len > o->len - off) return NULL;
  if (o->state == OBJ_READY && td__obj_resident(n, o) == 0)
    return (o->loc == LOC_SHM ? td_store_base(n->objs.store) + o->off : o->data) + off;
  if (o->state == OBJ_PENDING && o->chunked && off + len <= o->got)
    return td_store_base(n->objs.store) + o->off + off;
  return NULL;
}

/* Sends the chunk asked for from where the value lies here (all of it, or
 * the part that has landed), or no bytes when it is not here; via: on the
 * link's data-plane stream. */
static void td__chunk_send(td_node_t *n, td_wk_t *wk, uint64_t id, uint64_t off, uint32_t len, int via) {
  if (via) {
    td__dp_send(n, wk, id, off, len);
    return;
  }
  const uint8_t *src = td__chunk_src(n, id, off, len);
  /* The bytes go from the store to the socket, not through c->out. */
  uint8_t head[20];
  uint32_t n32 = src ? len : 0;
  memcpy(head, &id, 8);
  memcpy(head + 8, &off, 8);
  memcpy(head + 16, &n32, 4);
  td_chan_frame_ext(&wk->ch, TD_M_CHUNK, head, sizeof(head), src, n32);
  n->xfer.bytes_sent += n32;
}

/* 1 if another node's request for a chunk of o waits for it to land. */
static int td__chunk_waits(const td_obj_t *o, uint64_t off, uint32_t len) {
  if (!o || o->state != OBJ_PENDING || !o->pulling) return 0;
  return !(o->chunked && off <= o->got && len <= o->got - off);
}

/* Answers, in the order asked, the waiting requests for chunks of object
 * id that have landed (or that will not: it failed or went). */
void td__cwait_serve(td_node_t *n, uint64_t id) {
  td_obj_t *o = td__obj(n, id);
  for (uint32_t i = 0; i < n->xfer.ncwait;) {
    td_cwait_t c = n->xfer.cwait[i];
    if (c.id != id || td__chunk_waits(o, c.off, c.len)) { i++; continue; }
    memmove(&n->xfer.cwait[i], &n->xfer.cwait[i + 1], (n->xfer.ncwait - i - 1) * sizeof(td_cwait_t));
    n->xfer.ncwait--;
    td_wk_t *w = td__wk_by_id(n, c.wk);
    if (w) td__chunk_send(n, w, c.id, c.off, c.len, c.via);
  }
}

/* Sender: the bytes asked for, now or once they have landed here. */
int td__on_chunk_get(td_node_t *n, td_wk_t *wk, td_rd_t *rd) {
  uint64_t id = td_rd_u64(rd), off = td_rd_u64(rd);
  uint32_t len = td_rd_u32(rd);
  uint8_t via = rd->p < rd->end ? td_rd_u8(rd) : 0;
  if (rd->bad || via > 1) return TD_EPROTO;
  td_obj_t *o = td__obj(n, id);
  int wait = wk->kind == WK_PEER && len <= TD_CHUNK && td__chunk_waits(o, off, len);
  for (uint32_t i = 0; i < n->xfer.ncwait && !wait; i++) /* keeps their order */
    wait = n->xfer.cwait[i].id == id && n->xfer.cwait[i].wk == wk->id;
  if (wait && n->xfer.ncwait < TD_CWAIT_MAX) {
    if (n->xfer.ncwait == n->xfer.capcwait) {
      n->xfer.capcwait = n->xfer.capcwait ? n->xfer.capcwait * 2 : 16;
      n->xfer.cwait = td_xrealloc(n->xfer.cwait, n->xfer.capcwait * sizeof(td_cwait_t));
    }
    n->xfer.cwait[n->xfer.ncwait++] = (td_cwait_t){wk->id, id, off, len, via};
    return 0;
  }
  td__chunk_send(n, wk, id, off, len, via);
  return 0;
}

/* -- Messages (node.c's table dispatches them) ------------------------------ */

/* Another node opens a link to fetch chunks of objects this one has. */
int td__on_peer(td_node_t *n, td_wk_t *wk, td_rd_t *rd) {
  uint32_t idx = td_rd_u32(rd);
  if (rd->bad) return TD_EPROTO;
  wk->kind = WK_PEER;
  wk->node_index = idx;
  td__link_chan(wk);
  td__dp_advertise(n, wk);
  td_log("node-%u linked to this node", idx);
  return 0;
}

/* From the TCP bridge: this client is remote (it cannot map the store);
 * the address the bridge saw it at, where other nodes are sent. */
int td__on_remote(td_node_t *n, td_wk_t *wk, td_rd_t *rd) {
  (void)n;
  uint32_t al = 0;
  const uint8_t *addr = rd->p < rd->end ? td_rd_str(rd, &al) : NULL;
  if (rd->bad) return TD_EPROTO;
  /* An IP address (v4 or v6), or nothing. */
  uint32_t ok = 0;
  while (ok < al && ok < sizeof(wk->peer_host) - 1 && strchr("0123456789abcdefABCDEF.:", addr[ok]) &&
         addr[ok])
    ok++;
  if (ok == al && al) {
    memcpy(wk->peer_host, addr, al);
    wk->peer_host[al] = 0;
  }
  wk->remote = 1;
  td_sock_bulk(wk->ch.fd); /* a bridged peer: chunks of values go this way */
  return 0;
}

/* A link to another node opened for fetches closed: what came from there
 * comes from the head now. */
void td__peer_dead(td_node_t *n, td_wk_t *wk) {
  td__ppull_check(n, wk, td_now());
  if (wk->bridge && n->xfer.peer_close) n->xfer.peer_close(n->xfer.peer_ud, wk->bridge);
  wk->bridge = NULL;
}
