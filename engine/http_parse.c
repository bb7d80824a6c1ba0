/* Tide HTTP ingress, the request side: llhttp's callbacks build each
 * request in its arena (target, headers, body, within the limits), and the
 * parse loop hands complete requests to on_request, pausing while the
 * connection or the server holds too much. All that reads a client's bytes
 * is here (what the fuzzer aims at); connections live in http.c.
 */
#include "http_int.h"

/* -- Request headers ------------------------------------------------------- */

const char *td_http_request_header(const td_http_request_t *req, const char *name) {
  for (size_t i = 0; i < req->nheaders; i++)
    if (td__http_ieq(req->headers[i].name, req->headers[i].name_len, name)) return req->headers[i].value;
  return NULL;
}

/* -- Parser callbacks ---------------------------------------------------- */

#define CONN(p) ((td__http_conn_t *)(p)->data)

static int hdr_limit(td__http_conn_t *c, size_t len, int status) {
  c->hbytes += len;
  if (c->hbytes > c->srv->o.max_header_bytes) {
    c->err_status = status;
    return HPE_USER;
  }
  return 0;
}

static int arena_put(td__http_conn_t *c, const char *at, size_t len) {
  td_buf_put(&c->cur->in, at, len);
  return 0;
}

static int cb_message_begin(llhttp_t *p) {
  td__http_conn_t *c = CONN(p);
  td__http_req_t *r = td__http_req_new(c);
  if (!r) {
    c->err_status = 503;
    return -1;
  }
  td__http_conn_enqueue(c, r);
  c->cur = r;
  c->hbytes = 0;
  c->hstate = 0;
  c->in_body = 0;
  r->t_start = uv_now(c->srv->loop);
  td__http_conn_timer_update(c);
  return 0;
}

static int cb_url(llhttp_t *p, const char *at, size_t len) {
  td__http_conn_t *c = CONN(p);
  if (hdr_limit(c, len, 414)) return HPE_USER;
  return arena_put(c, at, len);
}

static int cb_url_complete(llhttp_t *p) {
  td__http_conn_t *c = CONN(p);
  c->cur->url_len = c->cur->in.len;
  return arena_put(c, "", 1);
}

/* Ends the header whose value is being read. */
static int header_finish(td__http_conn_t *c) {
  td__http_req_t *r = c->cur;
  td__hoff_t *h = &r->hoff[r->nhoff];
  size_t end = r->in.len;
  while (end > h->vo && (r->in.p[end - 1] == ' ' || r->in.p[end - 1] == '\t')) end--;
  r->in.len = end;
  h->vl = (uint32_t)(end - h->vo);
  r->nhoff++;
  c->hstate = 0;
  return arena_put(c, "", 1);
}

static int cb_header_field(llhttp_t *p, const char *at, size_t len) {
  td__http_conn_t *c = CONN(p);
  if (hdr_limit(c, len, 431)) return HPE_USER;
  if (c->in_body) return 0; /* trailers of a chunked body: counted, not kept */
  td__http_req_t *r = c->cur;
  if (c->hstate == 2 && header_finish(c)) return HPE_USER;
  if (c->hstate == 0) {
    if (r->nhoff >= c->srv->o.max_headers) {
      c->err_status = 431;
      return HPE_USER;
    }
    if (r->nhoff == r->choff) {
      size_t cap = r->choff ? r->choff * 2 : 16;
      td__hoff_t *n = realloc(r->hoff, cap * sizeof(*n));
      if (!n) {
        c->err_status = 503;
        return HPE_USER;
      }
      r->hoff = n;
      r->choff = cap;
    }
    r->hoff[r->nhoff].no = (uint32_t)r->in.len;
    c->hstate = 1;
  }
  return arena_put(c, at, len);
}

static int cb_header_field_complete(llhttp_t *p) {
  td__http_conn_t *c = CONN(p);
  if (c->in_body) return 0;
  td__http_req_t *r = c->cur;
  if (c->hstate != 1 || r->in.len == r->hoff[r->nhoff].no) {
    /* llhttp 8.1 lets an empty field name (": v") through; RFC 9110 does not. */
    c->err_status = 400;
    return HPE_USER;
  }
  td__hoff_t *h = &r->hoff[r->nhoff];
  h->nl = (uint32_t)(r->in.len - h->no);
  for (size_t i = h->no; i < r->in.len; i++) r->in.p[i] = (char)td__http_lower((unsigned char)r->in.p[i]);
  if (arena_put(c, "", 1)) return HPE_USER;
  h->vo = (uint32_t)r->in.len;
  c->hstate = 2;
  return 0;
}

static int cb_header_value(llhttp_t *p, const char *at, size_t len) {
  td__http_conn_t *c = CONN(p);
  if (hdr_limit(c, len, 431)) return HPE_USER;
  if (c->in_body || c->hstate != 2) return 0;
  return arena_put(c, at, len);
}

static int cb_header_value_complete(llhttp_t *p) {
  td__http_conn_t *c = CONN(p);
  if (c->in_body || c->hstate != 2) return 0;
  return header_finish(c) ? HPE_USER : 0;
}

static const char *arena_header(td__http_req_t *r, const char *name) {
  for (size_t i = 0; i < r->nhoff; i++)
    if (td__http_ieq((const char *)r->in.p + r->hoff[i].no, r->hoff[i].nl, name))
      return (const char *)r->in.p + r->hoff[i].vo;
  return NULL;
}

static int cb_headers_complete(llhttp_t *p) {
  td__http_conn_t *c = CONN(p);
  td_http_server_t *srv = c->srv;
  td__http_req_t *r = c->cur;
  if (c->hstate == 2 && header_finish(c)) return -1;
  c->hstate = 0;
  c->in_body = 1;
  if (p->http_major != 1) {
    c->err_status = 505;
    return -1;
  }
  if (p->method == HTTP_CONNECT) {
    c->err_status = 405;
    return -1;
  }
  r->pub.method = llhttp_method_name((llhttp_method_t)p->method);
  r->pub.http_minor = p->http_minor;
  r->pub.keep_alive = llhttp_should_keep_alive(p);
  r->head_only = p->method == HTTP_HEAD;
  if (!r->pub.keep_alive || p->upgrade) r->close_after = 1; /* no protocol switch */
  if ((p->flags & F_CONTENT_LENGTH) && p->content_length > srv->o.max_body_bytes) {
    c->err_status = 413;
    return -1;
  }
  r->body_off = r->in.len;
  /* "Expect: 100-continue": say go on now, unless an earlier response is
   * still owed (an interim response may not overtake it). */
  const char *ex = arena_header(r, "expect");
  if (ex && p->http_minor >= 1 && td__http_ieq(ex, strlen(ex), "100-continue") && r == c->qhead) {
    td_buf_put(&c->wbuf, "HTTP/1.1 100 Continue\r\n\r\n", 25);
    td__http_conn_mark_dirty(c);
  }
  return 0;
}

static int cb_body(llhttp_t *p, const char *at, size_t len) {
  td__http_conn_t *c = CONN(p);
  td__http_req_t *r = c->cur;
  if (r->in.len - r->body_off + len > c->srv->o.max_body_bytes) {
    c->err_status = 413;
    return HPE_USER;
  }
  return arena_put(c, at, len);
}

/* The request is complete: build its public view, then pause the parser so
 * that the request is dispatched outside llhttp_execute. */
static int cb_message_complete(llhttp_t *p) {
  td__http_conn_t *c = CONN(p);
  td__http_req_t *r = c->cur;
  size_t body_len = r->in.len - r->body_off;
  if (arena_put(c, "", 1)) return HPE_USER;
  if (r->nhoff > r->chdrs) {
    td_http_header_t *h = realloc(r->hdrs, r->nhoff * sizeof(*h));
    if (!h) {
      c->err_status = 503;
      return HPE_USER;
    }
    r->hdrs = h;
    r->chdrs = r->nhoff;
  }
  char *base = (char *)r->in.p;
  for (size_t i = 0; i < r->nhoff; i++) {
    r->hdrs[i].name = base + r->hoff[i].no;
    r->hdrs[i].name_len = r->hoff[i].nl;
    r->hdrs[i].value = base + r->hoff[i].vo;
    r->hdrs[i].value_len = r->hoff[i].vl;
  }
  r->pub.headers = r->hdrs;
  r->pub.nheaders = r->nhoff;
  r->pub.body = base + r->body_off;
  r->pub.body_len = body_len;

  /* Target: origin form "/p?q", absolute form "http://h/p?q", or "*". */
  char *t = base, *end = base + r->url_len;
  for (char *s = t; s < end; s++)
    if (*s == '#') {
      *s = '\0';
      end = s;
      break;
    }
  if (end - t > 7 && (td__http_lower(t[0]) == 'h' && td__http_lower(t[1]) == 't' &&
                      td__http_lower(t[2]) == 't' && td__http_lower(t[3]) == 'p')) {
    char *s = memchr(t, ':', (size_t)(end - t));
    if (s && s + 3 <= end && s[1] == '/' && s[2] == '/') {
      s += 3;
      while (s < end && *s != '/' && *s != '?') s++;
      t = s;
    }
  }
  char *q = memchr(t, '?', (size_t)(end - t));
  if (q) {
    *q = '\0';
    r->pub.query = q + 1;
    r->pub.query_len = (size_t)(end - q - 1);
    end = q;
  } else {
    r->pub.query = "";
    r->pub.query_len = 0;
  }
  if (t == end) {
    r->pub.path = "/";
    r->pub.path_len = 1;
  } else {
    r->pub.path = t;
    r->pub.path_len = (size_t)(end - t);
  }
  c->ready = r;
  c->cur = NULL;
  c->in_body = 0;
  return HPE_PAUSED;
}

const llhttp_settings_t td__http_settings = {
    .on_message_begin = cb_message_begin,
    .on_url = cb_url,
    .on_header_field = cb_header_field,
    .on_header_value = cb_header_value,
    .on_headers_complete = cb_headers_complete,
    .on_body = cb_body,
    .on_message_complete = cb_message_complete,
    .on_url_complete = cb_url_complete,
    .on_header_field_complete = cb_header_field_complete,
    .on_header_value_complete = cb_header_value_complete,
};

/* -- Parsing and dispatch ------------------------------------------------ */

/* Bytes held for the requests queued on a connection: their bodies and
 * the responses made for them that wait for their turn. */
static size_t conn_held(const td__http_conn_t *c) {
  size_t n = 0;
  for (const td__http_req_t *r = c->qhead; r; r = r->next) n += r->in.len + r->out.len;
  return n;
}

/* Counts what the connection holds now in the server's total. */
void td__http_conn_account(td__http_conn_t *c) {
  size_t h = conn_held(c) + c->wbuf.len + c->wflight.len;
  c->srv->held = c->srv->held - c->held + h;
  c->held = h;
}

/* A new request is read only while the connection holds little: a client
 * that pipelines large requests and reads slowly gets no more memory than
 * this budget (and its own socket buffers) before it must catch up. And
 * while the connections together hold more than theirs, a connection
 * reads a request only when it has none queued: many pipelining
 * connections cannot take the process's memory, nor lock out a client
 * that sends one request at a time. */
int td__http_conn_can_parse(td__http_conn_t *c) {
  td__http_conn_account(c);
  return c->nq < c->srv->o.max_pipeline && c->wbuf.len + c->wflight.len < TD__HTTP_HIGH_WATER &&
         (c->nq == 0 || (conn_held(c) < TD__HTTP_CONN_BUDGET && c->srv->held < TD__HTTP_SERVER_BUDGET));
}

/* Keeps unparsed input for later (parsing paused). */
static void conn_stash(td__http_conn_t *c, const char *p, size_t n) {
  const char *s = (const char *)c->stash.p;
  if (s && p >= s && p <= s + c->stash.len) {
    c->stash_off = (size_t)(p - s);
  } else {
    c->stash.len = 0;
    c->stash_off = 0;
    td_buf_put(&c->stash, p, n);
  }
  if (!c->paused) {
    c->paused = 1;
    if (!c->virt) uv_read_stop((uv_stream_t *)&c->tcp);
  }
}

static void conn_dispatch(td__http_conn_t *c) {
  td_http_server_t *srv = c->srv;
  td__http_req_t *r = c->ready;
  c->ready = NULL;
  if (!r) return;
  srv->st.requests++;
  if (r->close_after) c->stop_parsing = 1;
  if (r->pub.path_len == 10 && memcmp(r->pub.path, "/-/healthz", 10) == 0 &&
      (r->head_only || strcmp(r->pub.method, "GET") == 0)) {
    r->healthz = 1;
    srv->st.healthz++;
    td__http_req_reply_internal(r, 200, 0);
    return;
  }
  if (td__http_req_assign_id(srv, r)) {
    td__http_req_reply_internal(r, 503, 1);
    return;
  }
  r->state = TD__RQ_DISPATCHED;
  r->t_dispatch = uv_now(srv->loop);
  srv->o.on_request(srv, &r->pub, srv->o.data);
  /* r may be gone now; c stays allocated until its close callbacks. */
}

static void conn_parse_error(td__http_conn_t *c, llhttp_errno_t e) {
  td_http_server_t *srv = c->srv;
  int status = c->err_status ? c->err_status : 400;
  (void)e;
  c->err_status = 0;
  td__http_req_t *r = c->cur;
  c->cur = NULL;
  if (!r) {
    r = td__http_req_new(c);
    if (!r) {
      td__http_conn_kill(c, TD_HTTP_ABORT_DISCONNECT);
      return;
    }
    td__http_conn_enqueue(c, r);
  }
  if (status == 400 || status == 505 || status == 405) srv->st.bad_requests++;
  else if (status == 413 || status == 414 || status == 431) srv->st.too_large++;
  td__http_req_reply_internal(r, status, 1);
}

void td__http_conn_parse(td__http_conn_t *c, const char *p, size_t n) {
  while (n > 0) {
    if (c->dead) return;
    if (c->stop_parsing) return; /* the rest is discarded */
    if (!c->cur && !td__http_conn_can_parse(c)) {
      conn_stash(c, p, n);
      return;
    }
    llhttp_errno_t e = llhttp_execute(&c->parser, p, n);
    if (e == HPE_OK) return;
    if (e == HPE_PAUSED || e == HPE_PAUSED_UPGRADE) {
      const char *pos = llhttp_get_error_pos(&c->parser);
      size_t used = (pos >= p && pos <= p + n) ? (size_t)(pos - p) : n;
      if (e == HPE_PAUSED) {
        llhttp_resume(&c->parser);
      } else {
        c->stop_parsing = 1; /* nothing after an Upgrade request is HTTP to us */
      }
      p += used;
      n -= used;
      conn_dispatch(c);
      continue;
    }
    conn_parse_error(c, e);
    return;
  }
}
