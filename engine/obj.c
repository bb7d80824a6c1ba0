/* The object table (node_int.h): every object this node knows — where its
 * value lies (inline, in the store, spilled, on another node), its
 * references and pins, the tasks waiting on it — and putting values into
 * the store, spilling to make room and bringing spilled values back. */
#include "node_int.h"

uint64_t td_node_new_id(td_node_t *n) { return ++n->objs.next_seq; }

td_obj_t *td__obj_new(td_node_t *n, uint64_t id) {
  td_obj_t *o = td_map_get(&n->objs.map, id);
  if (o) return o;
  if (n->objs.npool) {
    o = n->objs.pool[--n->objs.npool];
    memset(o, 0, sizeof(*o));
  } else {
    o = td_xcalloc(1, sizeof(*o));
  }
  o->id = id;
  td_map_set(&n->objs.map, id, o);
  return o;
}

/* Gives o its bytes in this process's memory (inline values, error blobs,
 * a spilled value read back with the store full), counted in
 * inline_bytes so that tide.stats() shows memory the store does not. */
static void td__obj_hold(td_node_t *n, td_obj_t *o, uint8_t *data) {
  o->data = data;
  n->objs.inline_bytes += o->len;
}

/* Takes o's bytes out of the count; the caller frees or keeps them. */
static void td__obj_unhold(td_node_t *n, td_obj_t *o) {
  if (o->data) n->objs.inline_bytes -= o->len;
  o->data = NULL;
}

static void td__obj_release_data(td_node_t *n, td_obj_t *o) {
  if (o->loc == LOC_SHM) td_store_free(n->objs.store, o->off, o->len);
  if (o->loc == LOC_SPILLED) td_spill_free(n->objs.spill, o->off, o->len);
  uint8_t *data = o->data;
  td__obj_unhold(n, o);
  free(data);
  o->loc = LOC_NONE;
}

void td__obj_free(td_node_t *n, td_obj_t *o) {
  td_map_del(&n->objs.map, o->id);
  /* A task kept for the result it was still to fetch (T_FETCHING) ends
   * with the last such result. */
  td_task_t *pt = o->producer && (o->away || o->chunked) ? o->producer : NULL;
  td__obj_freeing(n, o);
  if (o->chunked) { /* freed while it was coming in */
    td_store_free(n->objs.store, o->off, o->len);
    o->chunked = 0;
  }
  if (o->copies) {
    free(o->copies->c);
    free(o->copies);
  }
  td__obj_release_data(n, o);
  for (uint32_t i = 0; i < o->ncontained; i++) td_node_decref(n, o->contained[i]);
  for (uint32_t i = 0; i < o->nitems; i++) td_node_decref(n, o->items[i]);
  free(o->contained);
  free(o->items);
  free(o->waiters);
  td__obj_freed(n, pt);
  if (n->objs.npool < TD_POOL_MAX) {
    if (!n->objs.pool) n->objs.pool = td_xmalloc(TD_POOL_MAX * sizeof(void *));
    n->objs.pool[n->objs.npool++] = o;
  } else {
    free(o);
  }
}

void td_node_incref(td_node_t *n, uint64_t id) {
  td_obj_t *o = td__obj(n, id);
  if (o) o->refs++;
  else if ((o = td__foreign(n, id, 0)) != NULL) o->refs++;
}

/* Drops k references; frees the object when none is left. */
void td__unref(td_node_t *n, td_obj_t *o, int64_t k) {
  o->refs = k > o->refs ? 0 : o->refs - k;
  if (o->refs > 0 || o->nwaiters) return;
  if (o->state != OBJ_PENDING || (o->foreign && !o->pulling)) td__obj_free(n, o);
}

void td_node_decref(td_node_t *n, uint64_t id) {
  td_obj_t *o = td__obj(n, id);
  if (o) td__unref(n, o, 1);
}

int td_node_in_store(td_node_t *n, uint64_t id) {
  td_obj_t *o = td__obj(n, id);
  return o && o->state == OBJ_READY && o->loc == LOC_SHM;
}

int td_node_pin(td_node_t *n, uint64_t id, int delta) {
  td_obj_t *o = td__obj(n, id);
  if (!o || o->loc != LOC_SHM || (delta < 0 && o->pins == 0)) return 0;
  o->pins += delta > 0 ? 1 : -1;
  return 1;
}

/* Spills victims until `size` bytes fit; returns 0 or an error. */
int td__alloc(td_node_t *n, size_t size, size_t *off, td_obj_t *keep) {
  if (size > td_store_capacity(n->objs.store)) return TD_ETOOBIG;
  while (td_store_alloc(n->objs.store, size, off) != 0) {
    td_obj_t *victim = NULL, *o;
    size_t it = 0;
    while (td_map_next(&n->objs.map, &it, NULL, (void **)&o)) {
      if (o->loc != LOC_SHM || o->pins || o == keep) continue;
      if (!victim || o->last_use < victim->last_use) victim = o;
    }
    if (!victim) return TD_ESTOREFULL;
    size_t at;
    int rc = td_spill_write(n->objs.spill, td_store_base(n->objs.store) + victim->off, victim->len, &at);
    if (rc) {
      td_log("cannot spill object %llx (%zu bytes) to %s: %s", (unsigned long long)victim->id, victim->len,
             td_spill_dir(n->objs.spill), td_strerror(rc));
      return rc;
    }
    td_store_free(n->objs.store, victim->off, victim->len);
    victim->loc = LOC_SPILLED;
    victim->off = at;
    td_log("spilled object %llx (%zu bytes)", (unsigned long long)victim->id, victim->len);
  }
  return 0;
}

/* Brings a spilled object back into the store.  With the spill disk full,
 * the object is first read into memory and its own spill space given back,
 * so the victim it displaces can go there: what was stored stays readable. */
int td__obj_resident(td_node_t *n, td_obj_t *o) {
  o->last_use = ++n->objs.clock;
  if (o->loc != LOC_SPILLED) return 0;
  size_t off;
  int rc = td__alloc(n, o->len, &off, o);
  if (rc == TD_ENOSPACE) {
    uint8_t *tmp = malloc(o->len);
    if (!tmp) return rc;
    if (td_spill_read(n->objs.spill, o->off, tmp, o->len)) {
      free(tmp);
      return TD_EIO;
    }
    td_spill_free(n->objs.spill, o->off, o->len);
    o->loc = LOC_INLINE;  /* for now: not a spill victim, not in the store */
    td__obj_hold(n, o, tmp);
    rc = td__alloc(n, o->len, &off, o);
    if (rc == 0) {
      memcpy(td_store_base(n->objs.store) + off, tmp, o->len);
      td__obj_unhold(n, o);
      free(tmp);
      o->loc = LOC_SHM;
      o->off = off;
      return 0;
    }
    /* Kept in memory, whole: readable, if outside the store. */
    return 0;
  }
  if (rc) return rc;
  if (td_spill_read(n->objs.spill, o->off, td_store_base(n->objs.store) + off, o->len)) {
    td_store_free(n->objs.store, off, o->len);
    return TD_EIO;
  }
  td_spill_free(n->objs.spill, o->off, o->len);
  o->loc = LOC_SHM;
  o->off = off;
  return 0;
}

void td__add_waiter(td_obj_t *o, td_task_t *t) {
  if (o->nwaiters == o->capwaiters) {
    o->capwaiters = o->capwaiters ? o->capwaiters * 2 : 4;
    o->waiters = td_xrealloc(o->waiters, o->capwaiters * sizeof(td_task_t *));
  }
  o->waiters[o->nwaiters++] = t;
}

/* t waits for o (one more dependency pending). */
void td__wait_on(td_obj_t *o, td_task_t *t) {
  td__add_waiter(o, t);
  t->deps_pending++;
}

/* o became ready or failed. This is recorded, not acted on: what waits on
 * it (tasks, requests, other nodes' chunk requests) is woken in the objects
 * phase (node.c, td__objs_phase) once the message that changed it is done,
 * or, for a change made outside a message (the driver's own calls, chunks
 * read straight into the store, the cluster's timers), in the pump's next
 * objects phase; so o stays valid for whoever changed it. */
static void td__obj_changed(td_node_t *n, td_obj_t *o) {
  td_node_objs_t *t = &n->objs;
  if (t->nchanged == t->capchanged) {
    t->capchanged = t->capchanged ? t->capchanged * 2 : 64;
    t->changed = td_xrealloc(t->changed, t->capchanged * 8);
  }
  t->changed[t->nchanged++] = o->id;
  t->dirty = 1;
}

/* Gives a pending object its value. `data` is inline bytes (copied) or,
 * with shm, an extent the worker already filled. */
void td__obj_set(td_node_t *n, td_obj_t *o, int state, int shm, const uint8_t *data,
                        size_t len, size_t off, const uint64_t *refs, uint32_t nrefs) {
  if (o->state != OBJ_PENDING) {  /* a duplicate result, e.g. after a retry */
    if (shm) td_store_free(n->objs.store, off, len);
    return;
  }
  o->state = (uint8_t)state;
  o->len = len;
  if (shm) {
    o->loc = LOC_SHM;
    o->off = off;
  } else {
    o->loc = LOC_INLINE;
    td__obj_hold(n, o, td_xmalloc(len));
    memcpy(o->data, data, len);
  }
  if (nrefs) {
    o->contained = td_xmalloc(nrefs * 8);
    memcpy(o->contained, refs, nrefs * 8);
    o->ncontained = nrefs;
    for (uint32_t i = 0; i < nrefs; i++) td_node_incref(n, refs[i]);
  }
  o->producer = NULL;
  td__obj_changed(n, o);
}

void td__obj_fail(td_node_t *n, td_obj_t *o, const uint8_t *blob, size_t len) {
  if (o->is_stream) {
    /* A failed stream ends with one item that raises. */
    uint64_t item = td_node_new_id(n);
    td_obj_t *io = td__obj_new(n, item);
    io->refs = 1;
    td__obj_set(n, io, OBJ_ERROR, 0, blob, len, 0, NULL, 0);
    if (o->nitems == o->capitems) {
      o->capitems = o->capitems ? o->capitems * 2 : 8;
      o->items = td_xrealloc(o->items, o->capitems * 8);
    }
    o->items[o->nitems++] = item;
    o->stream_done = 1;
    o->state = OBJ_READY;
    o->loc = LOC_INLINE;
    o->producer = NULL;
    td__obj_changed(n, o);
    return;
  }
  td__obj_set(n, o, OBJ_ERROR, 0, blob, len, 0, NULL, 0);
}

int td_node_store(td_node_t *n, uint64_t id, size_t size, const uint64_t *refs, uint32_t nrefs,
                  uint8_t **dst) {
  td_obj_t *o = td__obj_new(n, id);
  if (size > n->objs.inline_max) {
    size_t off;
    int rc = td__alloc(n, size, &off, NULL);
    if (rc) {
      td_map_del(&n->objs.map, id);
      free(o);
      return rc;
    }
    o->refs = 1;
    td__obj_set(n, o, OBJ_READY, 1, NULL, size, off, refs, nrefs);
    *dst = td_store_base(n->objs.store) + off;
  } else {
    o->state = OBJ_READY;
    o->loc = LOC_INLINE;
    o->len = size;
    td__obj_hold(n, o, td_xmalloc(size));
    if (nrefs) {
      o->contained = td_xmalloc(nrefs * 8);
      memcpy(o->contained, refs, nrefs * 8);
      o->ncontained = nrefs;
      for (uint32_t i = 0; i < nrefs; i++) td_node_incref(n, refs[i]);
    }
    *dst = o->data;
    n->objs.dirty = 1;
  }
  o->refs = 1;
  o->last_use = ++n->objs.clock;
  return 0;
}

int td_node_state(td_node_t *n, uint64_t id) {
  td_obj_t *o = td__obj(n, id);
  if (!o) return TD_OBJ_MISSING;
  if (o->away && o->state == OBJ_PENDING) td__pull(n, o);  /* asked for here: fetched here */
  if (o->is_stream) return TD_OBJ_READY;
  return o->state == OBJ_PENDING ? TD_OBJ_PENDING : o->state == OBJ_READY ? TD_OBJ_READY : TD_OBJ_ERROR;
}

int td_node_bytes(td_node_t *n, uint64_t id, const uint8_t **p, size_t *len, int *is_err) {
  td_obj_t *o = td__obj(n, id);
  if (!o || o->state == OBJ_PENDING) return TD_ENOTFOUND;
  int rc = td__obj_resident(n, o);
  if (rc) return rc;
  *is_err = o->state == OBJ_ERROR;
  *p = o->loc == LOC_SHM ? td_store_base(n->objs.store) + o->off : o->data;
  *len = o->len;
  return 0;
}

int td_node_stream_item(td_node_t *n, uint64_t stream, uint32_t idx, uint64_t *item) {
  td_obj_t *o = td__obj(n, stream);
  if (!o) return TD_STREAM_ENDED;
  if (idx < o->nitems) {
    *item = o->items[idx];
    return TD_STREAM_ITEM;
  }
  return o->stream_done ? TD_STREAM_ENDED : TD_STREAM_NOT_YET;
}

void td_node_stream_window(td_node_t *n, uint64_t stream, uint32_t window) {
  td_obj_t *o = td__obj(n, stream);
  if (o) o->window = window;
}

void td_node_stream_release(td_node_t *n, uint64_t stream, uint32_t idx) {
  td_obj_t *o = td__obj(n, stream);
  if (!o) return;
  for (uint32_t i = o->released; i <= idx && i < o->nitems; i++) {
    uint64_t item = o->items[i];
    o->items[i] = 0;
    td_node_decref(n, item);
  }
  if (idx + 1 > o->released && idx < o->nitems) o->released = idx + 1;
  n->objs.dirty = 1; /* a producer waiting for room may go on */
}

/* Reads one value as sent by a worker: inline or an extent it filled. */
int td__read_value(td_rd_t *rd, int *shm, const uint8_t **p, size_t *len, size_t *off) {
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
int td__take_extent(td_wk_t *wk, size_t off, size_t len) {
  void *v = td_map_get(&wk->allocs, (uint64_t)off + 1);
  if (!v || (size_t)(uintptr_t)v != len) return 0;
  td_map_del(&wk->allocs, (uint64_t)off + 1);
  return 1;
}

/* -- Messages (node.c's table dispatches them) ------------------------------ */

/* A value a worker or client made: kept under its id, held by the sender. */
int td__on_put(td_node_t *n, td_wk_t *wk, td_rd_t *rd) {
  uint64_t id = td_rd_u64(rd);
  int shm;
  const uint8_t *vp = NULL;
  size_t vlen, off = 0;
  if (td__read_value(rd, &shm, &vp, &vlen, &off)) return TD_EPROTO;
  if (shm && !td__take_extent(wk, off, vlen)) return TD_EPROTO;
  uint32_t nrefs = td_rd_u32(rd);
  const uint8_t *rp = td_rd_bytes(rd, (size_t)nrefs * 8);
  if (rd->bad || !id || td__obj(n, id)) return TD_EPROTO;
  uint64_t *refs = td_xmalloc((size_t)nrefs * 8 + 8);
  if (nrefs) memcpy(refs, rp, (size_t)nrefs * 8);
  td_obj_t *o = td__obj_new(n, id);
  o->refs = 1;
  td__count(wk, &wk->held, id, 1);
  td__obj_set(n, o, OBJ_READY, shm, vp, vlen, off, refs, nrefs);
  free(refs);
  return 0;
}

/* References taken and given back, counted per sender so that its death
 * gives back what it held (and no more than it held). */
int td__on_refs(td_node_t *n, td_wk_t *wk, td_rd_t *rd) {
  uint32_t cnt = td_rd_u32(rd);
  for (uint32_t i = 0; i < cnt && !rd->bad; i++) {
    uint64_t id = td_rd_u64(rd);
    int32_t d = (int32_t)td_rd_u32(rd);
    if (rd->bad) break;
    td_obj_t *o = td__obj(n, id);
    if (!o && d > 0) o = td__foreign(n, id, 0); /* a ref to another node's object */
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
      if (e && e->done) td__copy_drop(o->copies, wk->node_index); /* it let its copy go */
      /* A link gives back only what it holds: refs a link that was
       * thought dead held were given back with it. */
      td__unref(n, o, wk->kind == WK_NODE || wk->kind == WK_HEAD ? give : -(int64_t)d);
    }
  }
  return rd->bad ? TD_EPROTO : 0;
}

/* Pins (zero-copy reads keep a value in place) and unpins; only a pin this
 * sender holds is let go, except by a link. */
static int td__on_pins(td_node_t *n, td_wk_t *wk, td_rd_t *rd, int pin) {
  uint32_t cnt = td_rd_u32(rd);
  for (uint32_t i = 0; i < cnt && !rd->bad; i++) {
    uint64_t id = td_rd_u64(rd);
    if (rd->bad) break;
    if (pin) {
      if (td_node_pin(n, id, 1)) td__count(wk, &wk->pinned, id, 1);
    } else if (wk->kind >= WK_NODE || td_map_get(&wk->pinned, id)) {
      td__count(wk, &wk->pinned, id, -1);
      td_node_pin(n, id, -1);
    }
  }
  return rd->bad ? TD_EPROTO : 0;
}
int td__on_pin(td_node_t *n, td_wk_t *wk, td_rd_t *rd) { return td__on_pins(n, wk, rd, 1); }
int td__on_unpin(td_node_t *n, td_wk_t *wk, td_rd_t *rd) { return td__on_pins(n, wk, rd, 0); }

/* An extent of the store lent to a local worker to write a value into; it
 * comes back whole in a PUT or DONE, or is freed with the worker. */
/* Answers a worker's ALLOC: the extent lent, or the (negative) code. */
static void td__alloc_reply(td_node_t *n, td_wk_t *wk, uint32_t req, uint64_t size, int rc, size_t off) {
  if (rc == 0) td_map_set(&wk->allocs, (uint64_t)off + 1, (void *)(uintptr_t)size);
  td_buf_t b;
  td_buf_init(&b);
  td_buf_u8(&b, rc == 0);
  td_buf_u64(&b, rc == 0 ? off : (uint64_t)(int64_t)rc); /* a code: negative, read back as int64 */
  td_node_reply(n, wk, req, b.p, b.len);
  td_buf_free(&b);
}

/* A store full of values in use (pinned by the tasks reading them) has room
 * again once some of those tasks end: an ALLOC waits for that, as Ray's
 * create requests queue, and fails only after TD_ALLOC_WAIT seconds. */
int td__on_alloc(td_node_t *n, td_wk_t *wk, td_rd_t *rd) {
  uint32_t req = td_rd_u32(rd);
  uint64_t size = td_rd_u64(rd);
  if (rd->bad) return TD_EPROTO;
  size_t off = 0;
  int rc = wk->remote ? TD_EINVAL : td__alloc(n, size, &off, NULL);
  if (rc == TD_ESTOREFULL) {
    td_allocw_t *w = td_xcalloc(1, sizeof(*w)), **pp = &n->objs.allocw;
    *w = (td_allocw_t){wk->id, req, size, td_now() + TD_ALLOC_WAIT, NULL};
    while (*pp) pp = &(*pp)->next;
    *pp = w;
    return 0;
  }
  td__alloc_reply(n, wk, req, size, rc, off);
  return 0;
}

/* The pump's retry of waiting ALLOCs, oldest first: each gets room, or
 * fails at its deadline; one whose worker died is dropped. */
void td__allocs_retry(td_node_t *n, double now) {
  for (td_allocw_t **pp = &n->objs.allocw, *w; (w = *pp);) {
    td_wk_t *wk = NULL;
    for (int i = 0; i < n->procs.n && !wk; i++)
      if (n->procs.list[i]->id == w->wk_id && !n->procs.list[i]->dead) wk = n->procs.list[i];
    size_t off = 0;
    int rc = wk ? td__alloc(n, w->size, &off, NULL) : 0;
    if (wk && rc == TD_ESTOREFULL && now < w->deadline) {
      pp = &w->next;
      continue;
    }
    if (wk) td__alloc_reply(n, wk, w->req, w->size, rc, off);
    *pp = w->next;
    free(w);
  }
}

void td__allocs_free(td_node_t *n) {
  while (n->objs.allocw) {
    td_allocw_t *w = n->objs.allocw;
    n->objs.allocw = w->next;
    free(w);
  }
}
