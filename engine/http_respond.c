/* Tide HTTP ingress, the application's side: formatting responses (the
 * server's own errors and healthz too), the response calls of http.h made
 * on the loop thread or queued to it from another, the inbox that carries
 * requests to a consumer thread, and a server on a thread of its own. The
 * connections these write to live in http.c, the parser in http_parse.c.
 */
#include "http_int.h"

#include <stdio.h>
#include <sys/eventfd.h>
#include <unistd.h>

/* Error responses the server writes itself: one table of messages. */
/* clang-format off */
static const struct {
  int status;      /* HTTP status */
  const char *msg; /* JSON "error" text */
} td__http_errmsg[] = {
    {400, "malformed HTTP request"},
    {405, "method not allowed"},
    {408, "request not received in time"},
    {413, "request body too large"},
    {414, "request target too long"},
    {431, "request header fields too large"},
    {500, "internal server error"},
    {503, "server out of memory"},
    {504, "no response in time"},
    {505, "HTTP version not supported"},
};
/* clang-format on */

/* -- Small helpers --------------------------------------------------------- */

static size_t fmt_u64(char *dst, uint64_t v) {
  char t[24];
  size_t n = 0;
  do {
    t[n++] = (char)('0' + v % 10);
    v /= 10;
  } while (v);
  for (size_t i = 0; i < n; i++) dst[i] = t[n - 1 - i];
  return n;
}

static size_t fmt_hex(char *dst, uint64_t v) {
  static const char hx[] = "0123456789abcdef";
  char t[24];
  size_t n = 0;
  do {
    t[n++] = hx[v & 15];
    v >>= 4;
  } while (v);
  for (size_t i = 0; i < n; i++) dst[i] = t[n - 1 - i];
  return n;
}

static int on_loop_thread(const td_http_server_t *srv) { return pthread_equal(pthread_self(), srv->thread); }

/* RFC 9110 token characters, for header names. */
static int is_tchar(unsigned char ch) {
  if ((ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') || (ch >= '0' && ch <= '9')) return 1;
  return ch && strchr("!#$%&'*+-.^_`|~", ch) != NULL;
}

const char *td_http_status_text(int status) {
  switch (status) {
    case 100: return "Continue";
    case 200: return "OK";
    case 201: return "Created";
    case 202: return "Accepted";
    case 203: return "Non-Authoritative Information";
    case 204: return "No Content";
    case 205: return "Reset Content";
    case 206: return "Partial Content";
    case 301: return "Moved Permanently";
    case 302: return "Found";
    case 303: return "See Other";
    case 304: return "Not Modified";
    case 307: return "Temporary Redirect";
    case 308: return "Permanent Redirect";
    case 400: return "Bad Request";
    case 401: return "Unauthorized";
    case 402: return "Payment Required";
    case 403: return "Forbidden";
    case 404: return "Not Found";
    case 405: return "Method Not Allowed";
    case 406: return "Not Acceptable";
    case 408: return "Request Timeout";
    case 409: return "Conflict";
    case 410: return "Gone";
    case 411: return "Length Required";
    case 412: return "Precondition Failed";
    case 413: return "Content Too Large";
    case 414: return "URI Too Long";
    case 415: return "Unsupported Media Type";
    case 416: return "Range Not Satisfiable";
    case 417: return "Expectation Failed";
    case 421: return "Misdirected Request";
    case 422: return "Unprocessable Content";
    case 425: return "Too Early";
    case 426: return "Upgrade Required";
    case 428: return "Precondition Required";
    case 429: return "Too Many Requests";
    case 431: return "Request Header Fields Too Large";
    case 451: return "Unavailable For Legal Reasons";
    case 500: return "Internal Server Error";
    case 501: return "Not Implemented";
    case 502: return "Bad Gateway";
    case 503: return "Service Unavailable";
    case 504: return "Gateway Timeout";
    case 505: return "HTTP Version Not Supported";
    case 507: return "Insufficient Storage";
    default: return "Unknown";
  }
}

/* Where a request's response bytes go: straight to the socket buffer when it
 * is the head of the queue, else into its own buffer until its turn. */
static td_buf_t *req_target(td__http_req_t *r) { return r == r->conn->qhead ? &r->conn->wbuf : &r->out; }

/* Output the client has not taken: what waits behind a write the socket
 * could not take at once, plus what waits for its turn in the queue. Bytes
 * made in the current loop turn and not yet tried do not count, so a big
 * response written in pieces by one callback is not mistaken for a slow
 * client. */
static size_t conn_backlog(const td__http_conn_t *c, const td_buf_t *target) {
  size_t n = c->writing ? c->wbuf.len + c->wflight.len : 0;
  if (target != &c->wbuf) n += target->len;
  return n;
}

/* -- Response formatting ------------------------------------------------- */

static int headers_valid(const td_http_header_t *h, size_t n) {
  if (n && !h) return 0;
  for (size_t i = 0; i < n; i++) {
    if (!h[i].name || !h[i].value) return 0;
    size_t nl = h[i].name_len ? h[i].name_len : strlen(h[i].name);
    size_t vl = h[i].value_len ? h[i].value_len : strlen(h[i].value);
    if (nl == 0) return 0;
    for (size_t k = 0; k < nl; k++)
      if (!is_tchar((unsigned char)h[i].name[k])) return 0;
    for (size_t k = 0; k < vl; k++) {
      unsigned char ch = (unsigned char)h[i].value[k];
      if ((ch < 0x20 && ch != '\t') || ch == 0x7f) return 0; /* no CR/LF injection */
    }
  }
  return 1;
}

/* Headers the server frames itself; the application's copies are ignored. */
static int header_reserved(const char *name, size_t n) {
  return td__http_ieq(name, n, "content-length") || td__http_ieq(name, n, "transfer-encoding") ||
         td__http_ieq(name, n, "connection") || td__http_ieq(name, n, "date");
}

/* Writes the status line and headers of a response for r into b.
 * framing TD__FR_LENGTH sends Content-Length: clen. */
static void fmt_head(td_buf_t *b, td__http_req_t *r, int status, const td_http_header_t *h, size_t nh,
                     int framing, size_t clen) {
  td_http_server_t *srv = r->conn->srv;
  const char *reason = td_http_status_text(status);
  size_t need = 64 + strlen(reason) + srv->date_len + 48;
  for (size_t i = 0; i < nh; i++)
    need += (h[i].name_len ? h[i].name_len : strlen(h[i].name)) +
            (h[i].value_len ? h[i].value_len : strlen(h[i].value)) + 4;
  td_buf_reserve(b, need); /* one growth for the whole head */
  r->log_status = status;
  char st[4] = {(char)('0' + status / 100), (char)('0' + status / 10 % 10), (char)('0' + status % 10), ' '};
  td_buf_put(b, "HTTP/1.1 ", 9);
  td_buf_put(b, st, 4);
  td_buf_put(b, reason, strlen(reason));
  td_buf_put(b, "\r\n", 2);
  for (size_t i = 0; i < nh; i++) {
    size_t nl = h[i].name_len ? h[i].name_len : strlen(h[i].name);
    size_t vl = h[i].value_len ? h[i].value_len : strlen(h[i].value);
    if (header_reserved(h[i].name, nl)) continue;
    td_buf_put(b, h[i].name, nl);
    td_buf_put(b, ": ", 2);
    td_buf_put(b, h[i].value, vl);
    td_buf_put(b, "\r\n", 2);
  }
  td_buf_put(b, srv->date, srv->date_len);
  if (framing == TD__FR_LENGTH) {
    char num[24];
    td_buf_put(b, "Content-Length: ", 16);
    td_buf_put(b, num, fmt_u64(num, clen));
    td_buf_put(b, "\r\n", 2);
  } else if (framing == TD__FR_CHUNKED) {
    td_buf_put(b, "Transfer-Encoding: chunked\r\n", 28);
  }
  if (r->close_after) td_buf_put(b, "Connection: close\r\n", 19);
  else if (r->pub.http_minor == 0) td_buf_put(b, "Connection: keep-alive\r\n", 24);
  td_buf_put(b, "\r\n", 2);
}

static int status_has_body(int status) { return status != 204 && status != 304; }

/* Queues a whole response for r (head + body) and marks it done. */
static void req_write_whole(td__http_req_t *r, int status, const td_http_header_t *h, size_t nh,
                            const void *body, size_t len) {
  td_buf_t *b = req_target(r);
  int has_body = status_has_body(status);
  fmt_head(b, r, status, h, nh, has_body ? TD__FR_LENGTH : TD__FR_NONE, len);
  if (has_body && !r->head_only) td_buf_put(b, body, len);
  r->state = TD__RQ_DONE;
  r->log_bytes = has_body && !r->head_only ? len : 0;
  r->conn->srv->st.responses++;
}

/* Server-made responses: errors as {"error":..,"status":..}, healthz. */
void td__http_req_reply_internal(td__http_req_t *r, int status, int close_conn) {
  td__http_conn_t *c = r->conn;
  td_http_server_t *srv = c->srv;
  char body[160];
  size_t len;
  const char *msg = NULL;
  if (close_conn) r->close_after = 1;
  if (r->healthz) {
    len = (size_t)snprintf(body, sizeof(body), "{\"status\":\"ok\"}\n");
  } else {
    for (size_t i = 0; i < sizeof(td__http_errmsg) / sizeof(td__http_errmsg[0]); i++)
      if (td__http_errmsg[i].status == status) msg = td__http_errmsg[i].msg;
    if (!msg) msg = td_http_status_text(status);
    len = (size_t)snprintf(body, sizeof(body), "{\"error\":\"%s\",\"status\":%d}\n", msg, status);
  }
  static const td_http_header_t ct[] = {TD_HTTP_HDR("Content-Type", "application/json")};
  td__http_date_refresh(srv);
  req_write_whole(r, status, ct, 1, body, len);
  if (r->close_after) td__http_conn_drop_after(c, r);
  td__http_conn_advance(c);
  td__http_conn_mark_dirty(c);
}

/* -- Response calls ------------------------------------------------------ */

static int respond_now(td_http_server_t *srv, td_http_req_id id, int status, const td_http_header_t *h,
                       size_t nh, const void *body, size_t len) {
  td__http_req_t *r = td__http_req_lookup(srv, id);
  if (!r) return TD_ENOTFOUND;
  if (r->state != TD__RQ_DISPATCHED) return TD_EINVAL;
  td__http_conn_t *c = r->conn;
  td_buf_t *b = req_target(r);
  if (conn_backlog(c, b) > srv->o.max_output_bytes) {
    td__http_conn_kill(c, TD_HTTP_ABORT_SLOW_CLIENT);
    return TD_ESLOWPEER;
  }
  td__http_date_refresh(srv);
  req_write_whole(r, status, h, nh, body, len);
  td__http_req_drop_id(srv, r);
  td__http_conn_advance(c);
  td__http_conn_mark_dirty(c);
  return 0;
}

static int stream_start_now(td_http_server_t *srv, td_http_req_id id, int status, const td_http_header_t *h,
                            size_t nh) {
  td__http_req_t *r = td__http_req_lookup(srv, id);
  if (!r) return TD_ENOTFOUND;
  if (r->state != TD__RQ_DISPATCHED) return TD_EINVAL;
  td__http_conn_t *c = r->conn;
  int framing;
  if (r->head_only || !status_has_body(status)) framing = TD__FR_NONE;
  else if (r->pub.http_minor >= 1) framing = TD__FR_CHUNKED;
  else framing = TD__FR_CLOSE;
  if (framing == TD__FR_CLOSE) {
    /* Only the connection's end can delimit this body. */
    r->close_after = 1;
    td__http_conn_drop_after(c, r);
  }
  td__http_date_refresh(srv);
  td_buf_t *b = req_target(r);
  fmt_head(b, r, status, h, nh, framing, 0);
  r->framing = (uint8_t)framing;
  r->state = TD__RQ_STREAMING;
  td__http_conn_mark_dirty(c);
  return 0;
}

static int stream_write_now(td_http_server_t *srv, td_http_req_id id, const void *data, size_t len) {
  td__http_req_t *r = td__http_req_lookup(srv, id);
  if (!r) return TD_ENOTFOUND;
  if (r->state != TD__RQ_STREAMING) return TD_EINVAL;
  if (len == 0 || r->framing == TD__FR_NONE) return 0;
  td__http_conn_t *c = r->conn;
  td_buf_t *b = req_target(r);
  if (conn_backlog(c, b) > srv->o.max_output_bytes) {
    td__http_conn_kill(c, TD_HTTP_ABORT_SLOW_CLIENT);
    return TD_ESLOWPEER;
  }
  td_buf_reserve(b, len + 24);
  r->log_bytes += len;
  if (r->framing == TD__FR_CHUNKED) {
    char hx[24];
    size_t n = fmt_hex(hx, len);
    hx[n++] = '\r';
    hx[n++] = '\n';
    td_buf_put(b, hx, n);
    td_buf_put(b, data, len);
    td_buf_put(b, "\r\n", 2);
  } else {
    td_buf_put(b, data, len);
  }
  if (b == &c->wbuf && b->len >= TD__HTTP_EAGER_FLUSH) td__http_conn_flush(c);
  td__http_conn_mark_dirty(c);
  return 0;
}

static int stream_notify_now(td_http_server_t *srv, td_http_req_id id, size_t low) {
  td__http_req_t *r = td__http_req_lookup(srv, id);
  if (!r) return TD_ENOTFOUND;
  if (r->state != TD__RQ_STREAMING) return TD_EINVAL;
  r->drain_armed = 1;
  r->drain_low = low;
  td__http_conn_mark_dirty(r->conn); /* checked when the loop next services it */
  return 0;
}

static int stream_end_now(td_http_server_t *srv, td_http_req_id id) {
  td__http_req_t *r = td__http_req_lookup(srv, id);
  if (!r) return TD_ENOTFOUND;
  if (r->state != TD__RQ_STREAMING) return TD_EINVAL;
  td__http_conn_t *c = r->conn;
  if (r->framing == TD__FR_CHUNKED) td_buf_put(req_target(r), "0\r\n\r\n", 5);
  r->state = TD__RQ_DONE;
  srv->st.responses++;
  td__http_req_drop_id(srv, r);
  td__http_conn_advance(c);
  td__http_conn_mark_dirty(c);
  return 0;
}

static int abort_now(td_http_server_t *srv, td_http_req_id id) {
  td__http_req_t *r = td__http_req_lookup(srv, id);
  if (!r) return TD_ENOTFOUND;
  td__http_conn_t *c = r->conn;
  if (r->state == TD__RQ_DISPATCHED) {
    td__http_req_drop_id(srv, r);
    td__http_req_reply_internal(r, 500, 0);
    return 0;
  }
  if (r->state != TD__RQ_STREAMING) return TD_EINVAL;
  /* Truncate: what was sent stays, no terminating chunk, then close. */
  td__http_req_drop_id(srv, r);
  r->state = TD__RQ_DONE;
  r->log_cut = 1;
  r->close_after = 1;
  srv->st.responses++;
  td__http_conn_drop_after(c, r);
  td__http_conn_advance(c);
  td__http_conn_mark_dirty(c);
  return 0;
}

static int cmd_run(td_http_server_t *srv, const td__http_cmd_t *m) {
  switch (m->op) {
    case TD__OP_RESPOND: return respond_now(srv, m->id, m->status, m->h, m->nh, m->data, m->len);
    case TD__OP_START: return stream_start_now(srv, m->id, m->status, m->h, m->nh);
    case TD__OP_WRITE: return stream_write_now(srv, m->id, m->data, m->len);
    case TD__OP_END: return stream_end_now(srv, m->id);
    case TD__OP_ABORT: return abort_now(srv, m->id);
    case TD__OP_NOTIFY: return stream_notify_now(srv, m->id, (size_t)m->status);
    default: return TD_EINVAL;
  }
}

void td__http_on_async(uv_async_t *h) {
  td_http_server_t *srv = h->data;
  pthread_mutex_lock(&srv->mu);
  td__http_cmd_t *m = srv->cmd_head;
  srv->cmd_head = srv->cmd_tail = NULL;
  pthread_mutex_unlock(&srv->mu);
  while (m) {
    td__http_cmd_t *n = m->next;
    if (!srv->closing) (void)cmd_run(srv, m);
    free(m);
    m = n;
  }
}

/* Copies a call made on another thread and queues it for the loop. */
static int cmd_post(td_http_server_t *srv, int op, td_http_req_id id, int status, const td_http_header_t *h,
                    size_t nh, const void *data, size_t len) {
  size_t size = sizeof(td__http_cmd_t) + nh * sizeof(td_http_header_t) + len + 1;
  for (size_t i = 0; i < nh; i++)
    size += (h[i].name_len ? h[i].name_len : strlen(h[i].name)) +
            (h[i].value_len ? h[i].value_len : strlen(h[i].value)) + 2;
  td__http_cmd_t *m = malloc(size);
  if (!m) return TD_ENOMEM;
  m->next = NULL;
  m->op = op;
  m->id = id;
  m->status = status;
  m->nh = nh;
  m->h = (td_http_header_t *)(m + 1);
  char *s = (char *)(m->h + nh);
  for (size_t i = 0; i < nh; i++) {
    size_t nl = h[i].name_len ? h[i].name_len : strlen(h[i].name);
    size_t vl = h[i].value_len ? h[i].value_len : strlen(h[i].value);
    memcpy(s, h[i].name, nl);
    s[nl] = '\0';
    m->h[i].name = s;
    m->h[i].name_len = nl;
    s += nl + 1;
    memcpy(s, h[i].value, vl);
    s[vl] = '\0';
    m->h[i].value = s;
    m->h[i].value_len = vl;
    s += vl + 1;
  }
  if (len) memcpy(s, data, len);
  m->data = s;
  m->len = len;
  pthread_mutex_lock(&srv->mu);
  if (srv->mq_closed) {
    pthread_mutex_unlock(&srv->mu);
    free(m);
    return TD_ECANCELED;
  }
  if (srv->cmd_tail) srv->cmd_tail->next = m;
  else srv->cmd_head = m;
  srv->cmd_tail = m;
  /* Under the lock: td_http_server_close sets mq_closed under it before it
   * closes the async handle, so the handle is alive here. */
  uv_async_send(&srv->async);
  pthread_mutex_unlock(&srv->mu);
  return 0;
}

static int status_valid(int status) { return status >= 200 && status <= 599; }

int td_http_respond(td_http_server_t *srv, td_http_req_id id, int status, const td_http_header_t *headers,
                    size_t nheaders, const void *body, size_t len) {
  if (!status_valid(status) || !headers_valid(headers, nheaders) || (len && !body)) return TD_EINVAL;
  if (!on_loop_thread(srv)) return cmd_post(srv, TD__OP_RESPOND, id, status, headers, nheaders, body, len);
  return respond_now(srv, id, status, headers, nheaders, body, len);
}

int td_http_stream_start(td_http_server_t *srv, td_http_req_id id, int status,
                         const td_http_header_t *headers, size_t nheaders) {
  if (!status_valid(status) || !headers_valid(headers, nheaders)) return TD_EINVAL;
  if (!on_loop_thread(srv)) return cmd_post(srv, TD__OP_START, id, status, headers, nheaders, NULL, 0);
  return stream_start_now(srv, id, status, headers, nheaders);
}

int td_http_stream_write(td_http_server_t *srv, td_http_req_id id, const void *data, size_t len) {
  if (len && !data) return TD_EINVAL;
  if (!on_loop_thread(srv)) {
    if (len == 0) return 0;
    return cmd_post(srv, TD__OP_WRITE, id, 0, NULL, 0, data, len);
  }
  return stream_write_now(srv, id, data, len);
}

int td_http_stream_notify(td_http_server_t *srv, td_http_req_id id, size_t low) {
  if (low > INT32_MAX) low = INT32_MAX;
  /* The level travels in the command's status field; it carries no data. */
  if (!on_loop_thread(srv)) return cmd_post(srv, TD__OP_NOTIFY, id, (int)low, NULL, 0, NULL, 0);
  return stream_notify_now(srv, id, low);
}

int td_http_stream_end(td_http_server_t *srv, td_http_req_id id) {
  if (!on_loop_thread(srv)) return cmd_post(srv, TD__OP_END, id, 0, NULL, 0, NULL, 0);
  return stream_end_now(srv, id);
}

int td_http_abort(td_http_server_t *srv, td_http_req_id id) {
  if (!on_loop_thread(srv)) return cmd_post(srv, TD__OP_ABORT, id, 0, NULL, 0, NULL, 0);
  return abort_now(srv, id);
}

/* -- Inbox ----------------------------------------------------------------- */

typedef struct td__http_evnode td__http_evnode_t;
struct td__http_evnode {
  td__http_evnode_t *next; /* queue */
  td_http_event_t ev;      /* what the consumer gets */
};

struct td_http_inbox {
  pthread_mutex_t mu;      /* guards everything below */
  td__http_evnode_t *head; /* oldest */
  td__http_evnode_t *tail; /* newest */
  size_t n;                /* queued */
  int fd;                  /* eventfd: nonzero count while n > 0 */
};

td_http_inbox_t *td_http_inbox_new(void) {
  td_http_inbox_t *ib = calloc(1, sizeof(*ib));
  if (!ib) return NULL;
  ib->fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
  if (ib->fd < 0 || pthread_mutex_init(&ib->mu, NULL)) {
    if (ib->fd >= 0) close(ib->fd);
    free(ib);
    return NULL;
  }
  return ib;
}

void td_http_event_free(td_http_event_t *ev) {
  if (ev) free((char *)ev - offsetof(td__http_evnode_t, ev));
}

void td_http_inbox_destroy(td_http_inbox_t **pib) {
  td_http_inbox_t *ib = *pib;
  if (!ib) return;
  *pib = NULL;
  td__http_evnode_t *e = ib->head;
  while (e) {
    td__http_evnode_t *n = e->next;
    free(e);
    e = n;
  }
  close(ib->fd);
  pthread_mutex_destroy(&ib->mu);
  free(ib);
}

int td_http_inbox_fd(const td_http_inbox_t *ib) { return ib->fd; }

static void inbox_push(td_http_inbox_t *ib, td__http_evnode_t *e) {
  uint64_t one = 1;
  e->next = NULL;
  pthread_mutex_lock(&ib->mu);
  if (ib->tail) ib->tail->next = e;
  else ib->head = e;
  ib->tail = e;
  if (ib->n++ == 0 && write(ib->fd, &one, sizeof(one)) < 0) {
    /* The count cannot overflow at one write per empty-to-full edge. */
  }
  pthread_mutex_unlock(&ib->mu);
}

td_http_event_t *td_http_inbox_pop(td_http_inbox_t *ib) {
  uint64_t v;
  pthread_mutex_lock(&ib->mu);
  td__http_evnode_t *e = ib->head;
  if (e) {
    ib->head = e->next;
    if (!ib->head) ib->tail = NULL;
    /* A failed read: the count was already zero, nothing to reset. */
    if (--ib->n == 0 && read(ib->fd, &v, sizeof(v)) < 0) {}
  }
  pthread_mutex_unlock(&ib->mu);
  return e ? &e->ev : NULL;
}

void td_http_inbox_on_request(td_http_server_t *srv, const td_http_request_t *req, void *inbox) {
  size_t size = sizeof(td__http_evnode_t) + req->nheaders * sizeof(td_http_header_t) + req->path_len +
                req->query_len + req->body_len + 3;
  for (size_t i = 0; i < req->nheaders; i++) size += req->headers[i].name_len + req->headers[i].value_len + 2;
  td__http_evnode_t *e = malloc(size);
  if (!e) {
    static const td_http_header_t ct[] = {TD_HTTP_HDR("Content-Type", "application/json")};
    static const char msg[] = "{\"error\":\"server out of memory\",\"status\":503}\n";
    (void)td_http_respond(srv, req->id, 503, ct, 1, msg, sizeof(msg) - 1);
    return;
  }
  td_http_event_t *ev = &e->ev;
  memset(ev, 0, sizeof(*ev));
  ev->kind = TD_HTTP_EV_REQUEST;
  ev->id = req->id;
  ev->req = *req;
  td_http_header_t *h = (td_http_header_t *)(e + 1);
  char *p = (char *)(h + req->nheaders);
#define TD__COPY(dst, src, n) \
  do {                        \
    memcpy(p, (src), (n));    \
    p[(n)] = '\0';            \
    (dst) = p;                \
    p += (n) + 1;             \
  } while (0)
  for (size_t i = 0; i < req->nheaders; i++) {
    h[i].name_len = req->headers[i].name_len;
    h[i].value_len = req->headers[i].value_len;
    TD__COPY(h[i].name, req->headers[i].name, h[i].name_len);
    TD__COPY(h[i].value, req->headers[i].value, h[i].value_len);
  }
  ev->req.headers = req->nheaders ? h : NULL;
  TD__COPY(ev->req.path, req->path, req->path_len);
  TD__COPY(ev->req.query, req->query, req->query_len);
  TD__COPY(ev->req.body, req->body, req->body_len);
#undef TD__COPY
  inbox_push(inbox, e);
}

void td_http_inbox_on_abort(td_http_server_t *srv, td_http_req_id id, td_http_abort_reason_t reason,
                            void *inbox) {
  (void)srv;
  td__http_evnode_t *e = calloc(1, sizeof(*e));
  if (!e) return; /* the owner keeps a dead id; its late answer is dropped */
  e->ev.kind = TD_HTTP_EV_ABORT;
  e->ev.id = id;
  e->ev.reason = reason;
  inbox_push(inbox, e);
}

void td_http_inbox_on_drain(td_http_server_t *srv, td_http_req_id id, void *inbox) {
  (void)srv;
  td__http_evnode_t *e = calloc(1, sizeof(*e));
  if (!e) return; /* the stream stalls until the slow-client limits end it */
  e->ev.kind = TD_HTTP_EV_DRAIN;
  e->ev.id = id;
  inbox_push(inbox, e);
}

/* -- A server on its own thread -------------------------------------------- */

struct td_http_thread {
  pthread_t th;          /* the loop thread */
  uv_loop_t loop;        /* its loop */
  uv_async_t stop;       /* closes the server from td_http_thread_stop */
  td_http_server_t *srv; /* the server */
  td_http_opts_t opts;   /* as given */
  char host[64];         /* listen address */
  int port;              /* requested, then bound */
  int rc;                /* listen result */
  int ready;             /* start finished (guarded by mu) */
  pthread_mutex_t mu;    /* start handshake */
  pthread_cond_t cv;     /* signalled when ready */
};

static void thread_on_stop(uv_async_t *h) {
  td_http_thread_t *t = h->data;
  td_http_server_close(t->srv, NULL);
  uv_close((uv_handle_t *)&t->stop, NULL);
}

static void *thread_main(void *arg) {
  td_http_thread_t *t = arg;
  int rc = td__http_err(uv_loop_init(&t->loop));
  if (rc == 0) {
    t->srv = td_http_server_new(&t->loop, &t->opts);
    rc = t->srv ? td_http_server_listen(t->srv, t->host[0] ? t->host : NULL, t->port) : TD_ENOMEM;
    if (rc == 0) rc = td__http_err(uv_async_init(&t->loop, &t->stop, thread_on_stop));
    if (rc == 0) {
      t->stop.data = t;
      t->port = td_http_server_port(t->srv);
    } else if (t->srv) {
      td_http_server_close(t->srv, NULL);
      uv_run(&t->loop, UV_RUN_DEFAULT);
    }
  }
  pthread_mutex_lock(&t->mu);
  t->rc = rc;
  t->ready = 1;
  pthread_cond_signal(&t->cv);
  pthread_mutex_unlock(&t->mu);
  if (rc == 0) uv_run(&t->loop, UV_RUN_DEFAULT);
  uv_loop_close(&t->loop);
  return NULL;
}

int td_http_thread_start(const td_http_opts_t *opts, const char *host, int port, td_http_thread_t **out) {
  if (!opts || !opts->on_request || !out) abort(); /* API misuse */
  *out = NULL;
  if (host && strlen(host) >= sizeof(((td_http_thread_t *)0)->host)) return TD_EINVAL;
  td_http_thread_t *t = calloc(1, sizeof(*t));
  if (!t) return TD_ENOMEM;
  t->opts = *opts;
  if (host) strcpy(t->host, host);
  t->port = port;
  pthread_mutex_init(&t->mu, NULL);
  pthread_cond_init(&t->cv, NULL);
  int e = pthread_create(&t->th, NULL, thread_main, t);
  if (e) {
    free(t);
    return -e; /* EAGAIN: no resources for a thread */
  }
  pthread_mutex_lock(&t->mu);
  while (!t->ready) pthread_cond_wait(&t->cv, &t->mu);
  pthread_mutex_unlock(&t->mu);
  int rc = t->rc;
  if (rc) {
    pthread_join(t->th, NULL);
    pthread_mutex_destroy(&t->mu);
    pthread_cond_destroy(&t->cv);
    free(t);
    return rc;
  }
  *out = t;
  return 0;
}

td_http_server_t *td_http_thread_server(td_http_thread_t *t) { return t->srv; }

int td_http_thread_port(const td_http_thread_t *t) { return t->port; }

void td_http_thread_stop(td_http_thread_t **pt) {
  td_http_thread_t *t = *pt;
  if (!t) return;
  *pt = NULL;
  uv_async_send(&t->stop);
  pthread_join(t->th, NULL);
  pthread_mutex_destroy(&t->mu);
  pthread_cond_destroy(&t->cv);
  free(t);
}
