/* Tide HTTP ingress: HTTP/1.1 server on libuv + llhttp. This file holds the
 * server and its connections: buffers, request ids and the request pool,
 * each connection's queue (responses leave in request order), writing,
 * deadlines, reading, accepting and the server's lifetime. Requests are
 * parsed in http_parse.c and responses made in http_respond.c; the three
 * share the records in http_int.h. See http.h for the threading and
 * ownership rules.
 */
#include "http_int.h"

#include <malloc.h>
#include <signal.h>
#include <stdio.h>
#include <time.h>

/* -- Errors -------------------------------------------------------------- */

/* libuv's codes stop here: the ones a caller acts on become TD_E* codes;
 * the rest are -errno on Unix and pass through, which td_strerror names
 * ("Permission denied"); libuv's own (UV_EOF, UV_EAI_*) become TD_EIO. */
int td__http_err(int uv) {
  switch (uv) {
    case 0: return 0;
    case UV_ENOMEM: return TD_ENOMEM;
    case UV_EINVAL: return TD_EINVAL;
    case UV_ETIMEDOUT: return TD_ETIMEDOUT;
    case UV_EADDRINUSE: return TD_EADDRINUSE;
    case UV_ECANCELED: return TD_ECANCELED;
    case UV_EOF:
    case UV_ECONNRESET:
    case UV_EPIPE: return TD_ECLOSED;
    default: return uv < 0 && uv > TD__EFIRST ? uv : TD_EIO;
  }
}

/* -- Buffers ------------------------------------------------------------- */

/* Trims a pooled buffer so an occasional huge request does not stay resident. */
static void hbuf_recycle(td_buf_t *b) {
  if (b->cap > TD__HTTP_KEEP_BUF) td_buf_free(b);
  b->len = 0;
}

/* -- The Date header ----------------------------------------------------- */

/* The cached "Date: ...\r\n" line, refreshed once a second of loop time. */
void td__http_date_refresh(td_http_server_t *srv) {
  static const char *wd[] = {"Sun", "Mon", "Tue", "Wed", "Thu", "Fri", "Sat"};
  static const char *mo[] = {"Jan", "Feb", "Mar", "Apr", "May", "Jun",
                             "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"};
  uint64_t tick = uv_now(srv->loop) / 1000;
  if (srv->date_len && tick == srv->date_tick) return;
  srv->date_tick = tick;
  time_t t = time(NULL);
  struct tm tm;
  gmtime_r(&t, &tm);
  int n = snprintf(srv->date, sizeof(srv->date),
                   "Date: %s, %02d %s %04d %02d:%02d:%02d GMT\r\n", wd[tm.tm_wday % 7],
                   tm.tm_mday, mo[tm.tm_mon % 12], tm.tm_year + 1900, tm.tm_hour,
                   tm.tm_min, tm.tm_sec);
  srv->date_len = (n > 0 && (size_t)n < sizeof(srv->date)) ? (size_t)n : 0;
}

/* -- Request ids and the request pool ------------------------------------ */

td__http_req_t *td__http_req_new(td__http_conn_t *c) {
  td_http_server_t *srv = c->srv;
  td__http_req_t *r = srv->pool;
  if (r) {
    srv->pool = r->next;
    srv->npool--;
  } else {
    r = calloc(1, sizeof(*r));
    if (!r) return NULL;
  }
  r->conn = c;
  r->next = NULL;
  r->has_id = 0;
  r->state = TD__RQ_PARSING;
  r->framing = TD__FR_LENGTH;
  r->head_only = r->close_after = r->healthz = r->drain_armed = r->log_cut = 0;
  r->log_status = 0;
  r->log_bytes = 0;
  r->t_start = r->t_dispatch = 0;
  r->url_len = r->body_off = 0;
  r->nhoff = 0;
  memset(&r->pub, 0, sizeof(r->pub));
  r->pub.conn_id = c->id;
  memcpy(r->pub.peer, c->peer, sizeof(r->pub.peer));
  return r;
}

/* Request ids: a hash table keyed by the id (sequential ids hash to
 * themselves); removal shifts the run back so probes never see holes. */
static int ids_grow(td_http_server_t *srv) {
  size_t cap = srv->ids_cap ? srv->ids_cap * 2 : 64;
  td__http_req_t **t = calloc(cap, sizeof(*t));
  if (!t) return TD_ENOMEM;
  for (size_t i = 0; i < srv->ids_cap; i++) {
    td__http_req_t *r = srv->ids[i];
    if (!r) continue;
    size_t k = (size_t)r->pub.id & (cap - 1);
    while (t[k]) k = (k + 1) & (cap - 1);
    t[k] = r;
  }
  free(srv->ids);
  srv->ids = t;
  srv->ids_cap = cap;
  return 0;
}

/* Gives the request an id (it is about to be handed to on_request). */
int td__http_req_assign_id(td_http_server_t *srv, td__http_req_t *r) {
  if ((srv->ids_count + 1) * 2 > srv->ids_cap && ids_grow(srv)) return TD_ENOMEM;
  r->pub.id = ++srv->next_id;
  size_t mask = srv->ids_cap - 1, k = (size_t)r->pub.id & mask;
  while (srv->ids[k]) k = (k + 1) & mask;
  srv->ids[k] = r;
  srv->ids_count++;
  r->has_id = 1;
  return 0;
}

static size_t ids_index(const td_http_server_t *srv, td_http_req_id id) {
  if (!srv->ids_cap || !id) return SIZE_MAX;
  size_t mask = srv->ids_cap - 1;
  for (size_t k = (size_t)id & mask; srv->ids[k]; k = (k + 1) & mask)
    if (srv->ids[k]->pub.id == id) return k;
  return SIZE_MAX;
}

/* Kills the request's id: later calls with it get TD_ENOTFOUND. */
void td__http_req_drop_id(td_http_server_t *srv, td__http_req_t *r) {
  if (!r->has_id) return;
  r->has_id = 0;
  size_t i = ids_index(srv, r->pub.id);
  if (i == SIZE_MAX) abort(); /* internal invariant */
  size_t mask = srv->ids_cap - 1;
  srv->ids[i] = NULL;
  srv->ids_count--;
  for (size_t j = (i + 1) & mask; srv->ids[j]; j = (j + 1) & mask) {
    size_t home = (size_t)srv->ids[j]->pub.id & mask;
    /* Move it back unless its home lies in the cyclic range (i, j]. */
    int in_range = i <= j ? (home > i && home <= j) : (home > i || home <= j);
    if (!in_range) {
      srv->ids[i] = srv->ids[j];
      srv->ids[j] = NULL;
      i = j;
    }
  }
}

td__http_req_t *td__http_req_lookup(td_http_server_t *srv, td_http_req_id id) {
  size_t k = ids_index(srv, id);
  return k == SIZE_MAX ? NULL : srv->ids[k];
}

/* The access log's entry for a request the server lets go of: one read
 * whole (or answered with an error while read), never an idle one. */
static void req_log(td_http_server_t *srv, td__http_req_t *r) {
  if (!srv->o.on_log || !r->conn || (r->state == TD__RQ_PARSING && !r->log_status)) return;
  td_http_log_entry_t e;
  memset(&e, 0, sizeof(e));
  e.peer = r->conn->peer[0] ? r->conn->peer : "-";
  e.method = r->pub.method;
  if (r->pub.path) {
    e.path = r->pub.path;
    e.path_len = r->pub.path_len;
    e.query = r->pub.query;
    e.query_len = r->pub.query ? r->pub.query_len : 0;
  }
  e.http_minor = r->pub.http_minor;
  e.status = r->log_status;
  e.bytes = r->log_bytes;
  e.complete = r->state == TD__RQ_DONE && !r->log_cut;
  e.duration_ms = r->t_start ? uv_now(srv->loop) - r->t_start : 0;
  srv->o.on_log(srv, &e, srv->o.data);
}

static void server_trim_soon(td_http_server_t *srv);

static void req_release(td_http_server_t *srv, td__http_req_t *r) {
  req_log(srv, r);
  td__http_req_drop_id(srv, r);
  if (r->in.cap + r->out.cap > TD__HTTP_KEEP_BUF) server_trim_soon(srv);
  if (srv->npool >= TD__HTTP_POOL_MAX) {
    td_buf_free(&r->in);
    td_buf_free(&r->out);
    free(r->hoff);
    free(r->hdrs);
    free(r);
    return;
  }
  hbuf_recycle(&r->in);
  hbuf_recycle(&r->out);
  r->conn = NULL;
  r->next = srv->pool;
  srv->pool = r;
  srv->npool++;
}

/* A request is "live" while the application owes it a response. */
static int req_live(const td__http_req_t *r) {
  return r->has_id &&
         (r->state == TD__RQ_DISPATCHED || r->state == TD__RQ_STREAMING);
}

/* -- Connection bookkeeping ---------------------------------------------- */

static void conn_service(td__http_conn_t *c);
static void conn_check_drain(td__http_conn_t *c);

static void on_prepare(uv_prepare_t *h);

void td__http_conn_mark_dirty(td__http_conn_t *c) {
  if (c->dirty || c->dead) return;
  td_http_server_t *srv = c->srv;
  c->dirty = 1;
  c->dnext = srv->dirty;
  srv->dirty = c;
  if (!srv->closing && !uv_is_active((uv_handle_t *)&srv->prepare))
    uv_prepare_start(&srv->prepare, on_prepare);
}

static void dirty_remove(td__http_conn_t *c) {
  if (!c->dirty) return;
  td__http_conn_t **pp = &c->srv->dirty;
  while (*pp && *pp != c) pp = &(*pp)->dnext;
  if (*pp) *pp = c->dnext;
  c->dirty = 0;
  c->dnext = NULL;
}

void td__http_conn_enqueue(td__http_conn_t *c, td__http_req_t *r) {
  r->next = NULL;
  if (c->qtail)
    c->qtail->next = r;
  else
    c->qhead = r;
  c->qtail = r;
  c->nq++;
}

/* Pops finished requests off the head, moving the next one's buffered
 * output to the socket buffer, so responses leave in request order. */
void td__http_conn_advance(td__http_conn_t *c) {
  td_http_server_t *srv = c->srv;
  int popped = 0;
  while (c->qhead && c->qhead->state == TD__RQ_DONE) {
    td__http_req_t *r = c->qhead;
    c->qhead = r->next;
    if (!c->qhead) c->qtail = NULL;
    c->nq--;
    req_release(srv, r);
    popped = 1;
    td__http_req_t *h = c->qhead;
    if (h && h->out.len) {
      td_buf_put(&c->wbuf, h->out.p, h->out.len);
      h->out.len = 0;
    }
  }
  if (popped) {
    c->t_activity = uv_now(srv->loop);
    td__http_conn_mark_dirty(c);
  }
}

/* Ends the connection now. Unfinished requests that the application holds
 * are reported to on_abort (after their ids are dead); the rest are freed.
 * TCP connections are freed in their close callbacks, virtual ones by
 * td__http_virt_close. */
static void on_conn_closed(uv_handle_t *h);

void td__http_conn_kill(td__http_conn_t *c, td_http_abort_reason_t reason) {
  if (c->dead) return;
  td_http_server_t *srv = c->srv;
  c->dead = 1;
  dirty_remove(c);
  if (c->prev)
    c->prev->next = c->next;
  else
    srv->conns = c->next;
  if (c->next) c->next->prev = c->prev;
  c->prev = c->next = NULL;
  srv->st.connections_open--;

  td__http_req_t *r = c->qhead;
  c->qhead = c->qtail = c->cur = c->ready = NULL;
  c->nq = 0;
  while (r) {
    td__http_req_t *next = r->next;
    int live = req_live(r);
    td_http_req_id id = r->pub.id;
    req_release(srv, r);
    if (live) {
      srv->st.aborted++;
      if (srv->o.on_abort) srv->o.on_abort(srv, id, reason, srv->o.data);
    }
    r = next;
  }
  if (!c->virt) {
    c->nclosing = 2;
    uv_close((uv_handle_t *)&c->tcp, on_conn_closed);
    uv_close((uv_handle_t *)&c->timer, on_conn_closed);
  }
}

static void conn_free(td__http_conn_t *c) {
  c->srv->held -= c->held;
  td_buf_free(&c->wbuf);
  td_buf_free(&c->wflight);
  td_buf_free(&c->stash);
  free(c);
}

static void server_maybe_closed(td_http_server_t *srv);

static void on_trim(uv_timer_t *h) {
  td_http_server_t *srv = h->data;
  srv->trim_at = uv_now(srv->loop);
  malloc_trim(0);
}

/* What closed connections and large requests held (bodies, response
 * buffers) goes back to the system, not only to malloc's free lists: after
 * a burst of large pipelined requests the process shrinks again. At most
 * once a second, as a trim walks the heap; but always after the last of a
 * burst (a trim skipped as too soon is run later, not dropped). */
static void server_trim_soon(td_http_server_t *srv) {
  if (srv->closing || uv_is_active((uv_handle_t *)&srv->trim_timer)) return;
  uint64_t now = uv_now(srv->loop), due = srv->trim_at + 1000;
  uv_timer_start(&srv->trim_timer, on_trim, due > now ? due - now : 0, 0);
}

static void on_conn_closed(uv_handle_t *h) {
  td__http_conn_t *c = h->data;
  if (--c->nclosing > 0) return;
  td_http_server_t *srv = c->srv;
  conn_free(c);
  srv->nhandles--;
  server_trim_soon(srv);
  server_maybe_closed(srv);
}

/* Drops every request queued after `after` (all of them if NULL): the
 * connection is going to end behind it. */
void td__http_conn_drop_after(td__http_conn_t *c, td__http_req_t *after) {
  td_http_server_t *srv = c->srv;
  td__http_req_t *r = after ? after->next : c->qhead;
  if (after) {
    after->next = NULL;
    c->qtail = after;
  } else {
    c->qhead = c->qtail = NULL;
  }
  c->cur = NULL;
  c->stop_parsing = 1;
  while (r) {
    td__http_req_t *next = r->next;
    int live = req_live(r);
    td_http_req_id id = r->pub.id;
    c->nq--;
    req_release(srv, r);
    if (live) {
      srv->st.aborted++;
      if (srv->o.on_abort) srv->o.on_abort(srv, id, TD_HTTP_ABORT_CONN_CLOSE, srv->o.data);
    }
    r = next;
  }
}

/* -- Writing ------------------------------------------------------------- */

static void on_shutdown(uv_shutdown_t *req, int status);

/* Once everything is sent on a connection that must end: FIN, then read
 * and discard until the peer closes (so a reset cannot destroy the last
 * response in flight), bounded by the linger timeout. */
static void conn_maybe_finish(td__http_conn_t *c) {
  if (c->dead || c->shut || !c->stop_parsing) return;
  if (c->nq || c->wbuf.len || c->writing) return;
  c->shut = 1;
  if (c->virt) {
    td__http_conn_kill(c, TD_HTTP_ABORT_CONN_CLOSE);
    return;
  }
  if (uv_shutdown(&c->sreq, (uv_stream_t *)&c->tcp, on_shutdown))
    td__http_conn_kill(c, TD_HTTP_ABORT_CONN_CLOSE);
}

static void on_write(uv_write_t *req, int status);

void td__http_conn_flush(td__http_conn_t *c) {
  if (c->dead || c->writing) return;
  if (c->wbuf.len == 0) {
    conn_maybe_finish(c);
    return;
  }
  if (c->virt) {
    if (c->sink) c->sink(c->sink_ud, (const char *)c->wbuf.p, c->wbuf.len);
    c->wbuf.len = 0;
    conn_maybe_finish(c);
    return;
  }
  uv_buf_t b = uv_buf_init((char *)c->wbuf.p, (unsigned)c->wbuf.len);
  int n = uv_try_write((uv_stream_t *)&c->tcp, &b, 1);
  if (n == (int)c->wbuf.len) {
    c->wbuf.len = 0;
    if (c->wbuf.cap > TD__HTTP_HIGH_WATER) td_buf_free(&c->wbuf); /* after a big one */
    conn_maybe_finish(c);
    return;
  }
  if (n < 0 && n != UV_EAGAIN) {
    td__http_conn_kill(c, TD_HTTP_ABORT_DISCONNECT);
    return;
  }
  if (n < 0) n = 0;
  /* Hand the rest to uv_write; new output collects in the other buffer. */
  td_buf_t t = c->wflight;
  c->wflight = c->wbuf;
  c->wbuf = t;
  c->wbuf.len = 0;
  b = uv_buf_init((char *)c->wflight.p + n, (unsigned)(c->wflight.len - (size_t)n));
  if (uv_write(&c->wreq, (uv_stream_t *)&c->tcp, &b, 1, on_write)) {
    td__http_conn_kill(c, TD_HTTP_ABORT_DISCONNECT);
    return;
  }
  c->writing = 1;
  c->t_write = uv_now(c->srv->loop);
  c->wq_mark = c->tcp.write_queue_size;
}

static void on_write(uv_write_t *req, int status) {
  td__http_conn_t *c = req->handle->data;
  c->writing = 0;
  c->wflight.len = 0;
  if (c->wflight.cap > TD__HTTP_HIGH_WATER) td_buf_free(&c->wflight);
  if (c->dead) return;
  if (status < 0) {
    td__http_conn_kill(c, TD_HTTP_ABORT_DISCONNECT);
    return;
  }
  conn_service(c);
}

/* -- Timers -------------------------------------------------------------- */

enum { TD__DL_NONE, TD__DL_LINGER, TD__DL_SEND, TD__DL_REQUEST, TD__DL_RESPONSE, TD__DL_IDLE };

static uint64_t conn_deadline(const td__http_conn_t *c, int *why) {
  const td_http_opts_t *o = &c->srv->o;
  uint64_t d = TD__HTTP_NEVER, t;
  int w = TD__DL_NONE;
  if (c->lingering) {
    if (why) *why = TD__DL_LINGER;
    return c->t_linger + TD__HTTP_LINGER_MS;
  }
  if (c->writing && (t = c->t_write + o->send_timeout_ms) < d) {
    d = t;
    w = TD__DL_SEND;
  }
  if (c->cur && (t = c->cur->t_start + o->request_timeout_ms) < d) {
    d = t;
    w = TD__DL_REQUEST;
  }
  if (o->response_timeout_ms) {
    for (const td__http_req_t *r = c->qhead; r; r = r->next)
      if (r->state == TD__RQ_DISPATCHED) {
        if ((t = r->t_dispatch + o->response_timeout_ms) < d) {
          d = t;
          w = TD__DL_RESPONSE;
        }
        break;
      }
  }
  if (!c->nq && !c->writing && !c->wbuf.len && !c->shut &&
      (t = c->t_activity + o->keepalive_timeout_ms) < d) {
    d = t;
    w = TD__DL_IDLE;
  }
  if (why) *why = w;
  return d;
}

static void on_timer(uv_timer_t *h);

void td__http_conn_timer_update(td__http_conn_t *c) {
  if (c->virt || c->dead) return;
  uint64_t d = conn_deadline(c, NULL);
  if (d == TD__HTTP_NEVER) return; /* an armed timer re-checks when it fires */
  if (uv_is_active((uv_handle_t *)&c->timer) && d >= c->timer_due) return;
  uint64_t now = uv_now(c->srv->loop);
  c->timer_due = d;
  uv_timer_start(&c->timer, on_timer, d > now ? d - now : 0, 0);
}

static void on_timer(uv_timer_t *h) {
  td__http_conn_t *c = h->data;
  td_http_server_t *srv = c->srv;
  if (c->dead) return;
  int why;
  uint64_t now = uv_now(srv->loop);
  uint64_t d = conn_deadline(c, &why);
  if (d > now) {
    if (d != TD__HTTP_NEVER) {
      c->timer_due = d;
      uv_timer_start(&c->timer, on_timer, d - now, 0);
    }
    return;
  }
  switch (why) {
    case TD__DL_LINGER:
    case TD__DL_IDLE: td__http_conn_kill(c, TD_HTTP_ABORT_DISCONNECT); return;
    case TD__DL_SEND:
      if (c->tcp.write_queue_size < c->wq_mark) {
        /* Slow but moving: measure the next period from now. */
        c->wq_mark = c->tcp.write_queue_size;
        c->t_write = now;
        break;
      }
      srv->st.timeouts++;
      td__http_conn_kill(c, TD_HTTP_ABORT_SLOW_CLIENT);
      return;
    case TD__DL_REQUEST: {
      td__http_req_t *r = c->cur;
      c->cur = NULL;
      srv->st.timeouts++;
      td__http_req_reply_internal(r, 408, 1);
      break;
    }
    case TD__DL_RESPONSE: {
      td__http_req_t *r = c->qhead;
      while (r && r->state != TD__RQ_DISPATCHED) r = r->next;
      if (!r) break;
      td_http_req_id id = r->pub.id;
      td__http_req_drop_id(srv, r);
      td__http_req_reply_internal(r, 504, 0);
      srv->st.aborted++;
      if (srv->o.on_abort) srv->o.on_abort(srv, id, TD_HTTP_ABORT_TIMEOUT, srv->o.data);
      break;
    }
    default:
      break;
  }
  if (!c->dead) {
    c->timer_due = 0;
    uv_timer_stop(&c->timer);
    td__http_conn_timer_update(c);
  }
}

/* -- Reading ------------------------------------------------------------- */

static void on_alloc(uv_handle_t *h, size_t hint, uv_buf_t *buf) {
  td__http_conn_t *c = h->data;
  (void)hint;
  *buf = uv_buf_init(c->srv->rbuf, sizeof(c->srv->rbuf));
}

/* The peer closed its side. Requests the application still owes are
 * aborted (the client is gone, as far as HTTP/1.1 can tell); responses
 * already made are still sent, then the connection closes. */
static void conn_eof(td__http_conn_t *c) {
  if (c->lingering) {
    td__http_conn_kill(c, TD_HTTP_ABORT_DISCONNECT);
    return;
  }
  for (td__http_req_t *r = c->qhead; r; r = r->next)
    if (req_live(r)) {
      td__http_conn_kill(c, TD_HTTP_ABORT_DISCONNECT);
      return;
    }
  if (c->cur) {
    /* A partial request: drop it (it sits at the tail). */
    td__http_req_t *prev = NULL;
    for (td__http_req_t *r = c->qhead; r && r != c->cur; r = r->next) prev = r;
    td__http_conn_drop_after(c, prev);
  }
  c->stop_parsing = 1;
  if (c->paused) {
    c->paused = 0;
    c->stash.len = c->stash_off = 0;
  }
  if (!c->virt) uv_read_stop((uv_stream_t *)&c->tcp);
  td__http_conn_mark_dirty(c);
}

static void on_read(uv_stream_t *s, ssize_t n, const uv_buf_t *buf) {
  td__http_conn_t *c = s->data;
  (void)buf;
  if (c->dead) return;
  if (n < 0) {
    if (n == UV_EOF)
      conn_eof(c);
    else td__http_conn_kill(c, TD_HTTP_ABORT_DISCONNECT);
    return;
  }
  if (n == 0) return;
  c->t_activity = uv_now(c->srv->loop);
  if (c->lingering || c->stop_parsing) return; /* discarded */
  td__http_conn_parse(c, buf->base, (size_t)n);
  if (!c->dead) {
    td__http_conn_mark_dirty(c);
    td__http_conn_timer_update(c);
  }
}

static void on_shutdown(uv_shutdown_t *req, int status) {
  td__http_conn_t *c = req->handle->data;
  if (c->dead) return;
  if (status < 0 || uv_is_closing((uv_handle_t *)&c->tcp)) {
    td__http_conn_kill(c, TD_HTTP_ABORT_CONN_CLOSE);
    return;
  }
  c->lingering = 1;
  c->t_linger = uv_now(c->srv->loop);
  if (uv_read_start((uv_stream_t *)&c->tcp, on_alloc, on_read)) {
    td__http_conn_kill(c, TD_HTTP_ABORT_CONN_CLOSE);
    return;
  }
  uv_timer_stop(&c->timer);
  td__http_conn_timer_update(c);
}

/* A streaming request at the head of its queue whose unsent output fell to
 * the level td_http_stream_notify asked for gets its on_drain call. Only
 * the head's output is in the socket buffers; a request behind it waits. */
static void conn_check_drain(td__http_conn_t *c) {
  td__http_req_t *r = c->qhead;
  if (!r || !r->drain_armed || r->state != TD__RQ_STREAMING || !r->has_id) return;
  if (c->wbuf.len + c->wflight.len > r->drain_low) return;
  r->drain_armed = 0;
  if (c->srv->o.on_drain) c->srv->o.on_drain(c->srv, r->pub.id, c->srv->o.data);
}

/* Resumes paused parsing, flushes output, re-arms the timer. */
static void conn_service(td__http_conn_t *c) {
  if (c->dead) return;
  if (c->paused && !c->stop_parsing && td__http_conn_can_parse(c)) {
    c->paused = 0;
    size_t off = c->stash_off, len = c->stash.len;
    td__http_conn_parse(c, (const char *)c->stash.p + off, len - off);
    if (c->dead) return;
    if (!c->paused) {
      c->stash.len = c->stash_off = 0;
      if (!c->virt && !c->lingering) {
        if (uv_read_start((uv_stream_t *)&c->tcp, on_alloc, on_read)) {
          td__http_conn_kill(c, TD_HTTP_ABORT_DISCONNECT);
          return;
        }
      }
    }
  }
  td__http_conn_flush(c);
  if (c->dead) return;
  conn_check_drain(c);
  td__http_conn_account(c);
  td__http_conn_timer_update(c);
}

static void server_run_dirty(td_http_server_t *srv) {
  while (srv->dirty) {
    td__http_conn_t *c = srv->dirty;
    srv->dirty = c->dnext;
    c->dirty = 0;
    c->dnext = NULL;
    conn_service(c);
  }
}

static void on_prepare(uv_prepare_t *h) {
  td_http_server_t *srv = h->data;
  td__http_date_refresh(srv);
  server_run_dirty(srv);
  uv_prepare_stop(h);
}

/* -- Accepting ----------------------------------------------------------- */

static td__http_conn_t *conn_new(td_http_server_t *srv) {
  td__http_conn_t *c = calloc(1, sizeof(*c));
  if (!c) return NULL;
  c->srv = srv;
  c->id = ++srv->next_conn_id;
  llhttp_init(&c->parser, HTTP_REQUEST, &td__http_settings);
  c->parser.data = c;
  c->t_activity = uv_now(srv->loop);
  c->next = srv->conns;
  if (srv->conns) srv->conns->prev = c;
  srv->conns = c;
  srv->st.connections++;
  srv->st.connections_open++;
  return c;
}

static void on_reject_closed(uv_handle_t *h) {
  td_http_server_t *srv = h->data;
  free(h);
  srv->nhandles--;
  server_maybe_closed(srv);
}

/* The connection idle longest (no request queued, nothing to write) among
 * those from `peer` (NULL: any), or NULL. At a connection limit it makes
 * room for a new one: idle connections held open cannot lock clients out. */
static td__http_conn_t *conn_oldest_idle(td_http_server_t *srv, const char *peer,
                                         const td__http_conn_t *skip) {
  td__http_conn_t *best = NULL;
  for (td__http_conn_t *o = srv->conns; o; o = o->next) {
    if (o == skip || o->dead || o->nq || o->wbuf.len || o->writing) continue;
    if (peer && strcmp(o->peer, peer)) continue;
    if (!best || o->t_activity < best->t_activity) best = o;
  }
  return best;
}

static void on_connection(uv_stream_t *ls, int status) {
  td_http_server_t *srv = ls->data;
  if (status < 0 || srv->closing) return;
  td__http_conn_t *idle = srv->st.connections_open >= srv->o.max_connections
                            ? conn_oldest_idle(srv, NULL, NULL) : NULL;
  if (idle) {
    srv->st.refused++;
    td__http_conn_kill(idle, TD_HTTP_ABORT_DISCONNECT);
  }
  if (srv->st.connections_open >= srv->o.max_connections) {
    srv->st.refused++;
    /* Accept and close at once: the kernel queue must not fill with them. */
    uv_tcp_t *t = malloc(sizeof(*t));
    if (!t || uv_tcp_init(srv->loop, t)) {
      free(t);
      return;
    }
    t->data = srv;
    srv->nhandles++;
    (void)uv_accept(ls, (uv_stream_t *)t);
    uv_close((uv_handle_t *)t, on_reject_closed);
    return;
  }
  td__http_conn_t *c = conn_new(srv);
  if (!c) return;
  uv_tcp_init(srv->loop, &c->tcp);
  uv_timer_init(srv->loop, &c->timer);
  c->tcp.data = c;
  c->timer.data = c;
  srv->nhandles++;
  if (uv_accept(ls, (uv_stream_t *)&c->tcp) ||
      uv_read_start((uv_stream_t *)&c->tcp, on_alloc, on_read)) {
    td__http_conn_kill(c, TD_HTTP_ABORT_DISCONNECT);
    return;
  }
  uv_tcp_nodelay(&c->tcp, 1);
  struct sockaddr_storage ss;
  int sl = (int)sizeof(ss);
  if (uv_tcp_getpeername(&c->tcp, (struct sockaddr *)&ss, &sl) ||
      uv_ip_name((struct sockaddr *)&ss, c->peer, sizeof(c->peer)))
    c->peer[0] = 0;
  /* One address may not hold more than its share of the connections: a
   * client that opens thousands and idles would lock everyone else out. */
  if (c->peer[0]) {
    unsigned same = 0;
    for (td__http_conn_t *o = srv->conns; o; o = o->next)
      if (o != c && !o->dead && !strcmp(o->peer, c->peer)) same++;
    if (same >= srv->o.max_connections_per_client) {
      srv->st.refused++;
      td__http_conn_t *old = conn_oldest_idle(srv, c->peer, c);
      if (!old) {
        td__http_conn_kill(c, TD_HTTP_ABORT_DISCONNECT);
        return;
      }
      td__http_conn_kill(old, TD_HTTP_ABORT_DISCONNECT); /* the new one takes its place */
    }
  }
  td__http_conn_timer_update(c);
}

/* -- Server lifetime ----------------------------------------------------- */

static void on_server_handle_closed(uv_handle_t *h) {
  td_http_server_t *srv = h->data;
  srv->nhandles--;
  server_maybe_closed(srv);
}

td_http_server_t *td_http_server_new(uv_loop_t *loop, const td_http_opts_t *opts) {
  if (!loop || !opts || !opts->on_request) abort(); /* API misuse */
  td_http_server_t *srv = calloc(1, sizeof(*srv));
  if (!srv) return NULL;
  srv->loop = loop;
  srv->o = *opts;
  td_http_opts_t *o = &srv->o;
  if (!o->max_header_bytes) o->max_header_bytes = 16 * 1024;
  if (!o->max_headers) o->max_headers = 100;
  if (!o->max_body_bytes) o->max_body_bytes = 1024 * 1024;
  if (!o->request_timeout_ms) o->request_timeout_ms = 30000;
  if (!o->keepalive_timeout_ms) o->keepalive_timeout_ms = 30000;
  if (!o->send_timeout_ms) o->send_timeout_ms = 60000;
  if (!o->max_pipeline) o->max_pipeline = 64;
  if (!o->max_output_bytes) o->max_output_bytes = 64u * 1024 * 1024;
  if (!o->max_connections) o->max_connections = 10000;
  if (!o->max_connections_per_client) o->max_connections_per_client = 256;
  srv->thread = pthread_self();
  /* A write to a connection the peer reset must be an error, not a
   * SIGPIPE that kills the process; libuv writes with plain write(). */
  struct sigaction sa;
  if (sigaction(SIGPIPE, NULL, &sa) == 0 && sa.sa_handler == SIG_DFL) signal(SIGPIPE, SIG_IGN);
  if (pthread_mutex_init(&srv->mu, NULL)) {
    free(srv);
    return NULL;
  }
  uv_tcp_init(loop, &srv->listener);
  uv_prepare_init(loop, &srv->prepare);
  uv_async_init(loop, &srv->async, td__http_on_async);
  uv_timer_init(loop, &srv->trim_timer);
  srv->listener.data = srv->prepare.data = srv->async.data = srv->trim_timer.data = srv;
  uv_unref((uv_handle_t *)&srv->async);
  uv_unref((uv_handle_t *)&srv->prepare);
  uv_unref((uv_handle_t *)&srv->trim_timer);
  srv->nhandles = 4;
  td__http_date_refresh(srv);
  return srv;
}

int td_http_server_listen(td_http_server_t *srv, const char *host, int port) {
  if (srv->closing) return TD_ECANCELED;
  if (srv->listen_tried) return TD_EINVAL;
  if (port < 0 || port > 65535) return TD_EINVAL;
  srv->listen_tried = 1;
  if (!host) host = "127.0.0.1";
  struct sockaddr_storage ss;
  int rc;
  if (strchr(host, ':'))
    rc = uv_ip6_addr(host, port, (struct sockaddr_in6 *)&ss);
  else
    rc = uv_ip4_addr(host, port, (struct sockaddr_in *)&ss);
  if (rc) return TD_EINVAL;
  if ((rc = uv_tcp_bind(&srv->listener, (const struct sockaddr *)&ss, 0))) return td__http_err(rc);
  if ((rc = uv_listen((uv_stream_t *)&srv->listener, 1024, on_connection))) return td__http_err(rc);
  int len = sizeof(ss);
  if ((rc = uv_tcp_getsockname(&srv->listener, (struct sockaddr *)&ss, &len))) return td__http_err(rc);
  srv->port = ntohs(ss.ss_family == AF_INET6 ? ((struct sockaddr_in6 *)&ss)->sin6_port
                                             : ((struct sockaddr_in *)&ss)->sin_port);
  return 0;
}

int td_http_server_port(const td_http_server_t *srv) { return srv->port; }

void td_http_server_stats(const td_http_server_t *srv, td_http_stats_t *out) {
  *out = srv->st;
}

static void cmds_free(td__http_cmd_t *c) {
  while (c) {
    td__http_cmd_t *n = c->next;
    free(c);
    c = n;
  }
}

static void server_maybe_closed(td_http_server_t *srv) {
  if (!srv->closing || srv->nhandles > 0) return;
  td_http_close_cb cb = srv->close_cb;
  if (cb) cb(srv, srv->o.data);
  while (srv->pool) {
    td__http_req_t *r = srv->pool;
    srv->pool = r->next;
    td_buf_free(&r->in);
    td_buf_free(&r->out);
    free(r->hoff);
    free(r->hdrs);
    free(r);
  }
  cmds_free(srv->cmd_head);
  pthread_mutex_destroy(&srv->mu);
  free(srv->ids);
  free(srv);
}

void td_http_server_close(td_http_server_t *srv, td_http_close_cb cb) {
  if (srv->closing) abort(); /* API misuse: closed twice */
  srv->closing = 1;
  srv->close_cb = cb;
  pthread_mutex_lock(&srv->mu);
  srv->mq_closed = 1;
  pthread_mutex_unlock(&srv->mu);
  while (srv->conns) td__http_conn_kill(srv->conns, TD_HTTP_ABORT_SERVER_CLOSE);
  uv_close((uv_handle_t *)&srv->listener, on_server_handle_closed);
  uv_close((uv_handle_t *)&srv->prepare, on_server_handle_closed);
  uv_close((uv_handle_t *)&srv->async, on_server_handle_closed);
  uv_close((uv_handle_t *)&srv->trim_timer, on_server_handle_closed);
}

void td_http_server_flush(td_http_server_t *srv) {
  td__http_date_refresh(srv);
  server_run_dirty(srv);
}

/* -- Virtual connections (tests, fuzzer) ---------------------------------- */

td__http_conn_t *td__http_virt_open(td_http_server_t *srv, td__http_sink_cb sink,
                                    void *ud) {
  td__http_conn_t *c = conn_new(srv);
  if (!c) return NULL;
  c->virt = 1;
  c->sink = sink;
  c->sink_ud = ud;
  return c;
}

void td__http_virt_feed(td__http_conn_t *c, const char *data, size_t len) {
  if (c->dead) return;
  if (len == 0) {
    conn_eof(c);
    return;
  }
  if (c->stop_parsing) return;
  if (c->paused) {
    td_buf_put(&c->stash, data, len);
    return;
  }
  td__http_conn_parse(c, data, len);
  td__http_conn_mark_dirty(c);
}

void td__http_virt_flush(td_http_server_t *srv) {
  td__http_date_refresh(srv);
  server_run_dirty(srv);
}

void td__http_virt_close(td__http_conn_t *c) {
  td__http_conn_kill(c, TD_HTTP_ABORT_DISCONNECT);
  conn_free(c);
}
