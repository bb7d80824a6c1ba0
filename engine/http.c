/* Tide HTTP ingress: HTTP/1.1 server on libuv + llhttp.
 * See http.h for the threading and ownership rules.
 */
#include "http.h"

#include <llhttp.h>
#include <malloc.h>
#include <pthread.h>
#include <signal.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <time.h>
#include <unistd.h>

/* -- Constants ----------------------------------------------------------- */

#define TD__HTTP_READ_BUF (64 * 1024)                /* one shared read buffer */
#define TD__HTTP_HIGH_WATER (1024 * 1024)            /* unsent bytes that pause parsing */
#define TD__HTTP_CONN_BUDGET (4 * 1024 * 1024)       /* queued requests' bytes that pause parsing */
#define TD__HTTP_SERVER_BUDGET (64 * 1024 * 1024)    /* the same, all connections together */
#define TD__HTTP_EAGER_FLUSH (256 * 1024)            /* stream bytes that are written at once */
#define TD__HTTP_KEEP_BUF (64 * 1024)                /* pooled buffers above this are freed */
#define TD__HTTP_POOL_MAX 256                        /* idle request structs kept */
#define TD__HTTP_LINGER_MS 2000                      /* read-and-discard after our FIN */
#define TD__HTTP_NEVER UINT64_MAX

/* Error responses the server writes itself: one table of messages. */
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

/* -- Types --------------------------------------------------------------- */

/* A growable byte buffer. */
typedef struct td__hbuf {
  char *p;    /* bytes */
  size_t len; /* used */
  size_t cap; /* allocated */
} td__hbuf_t;

/* Offsets of one request header inside the request's arena. */
typedef struct td__hoff {
  uint32_t no; /* name offset */
  uint32_t nl; /* name length */
  uint32_t vo; /* value offset */
  uint32_t vl; /* value length */
} td__hoff_t;

enum {
  TD__RQ_PARSING = 0, /* bytes still arriving */
  TD__RQ_DISPATCHED,  /* handed to on_request; no response yet */
  TD__RQ_STREAMING,   /* stream started; chunks follow */
  TD__RQ_DONE         /* whole response queued; waits for its turn to be sent */
};

enum {
  TD__FR_LENGTH = 0, /* Content-Length (whole responses) */
  TD__FR_CHUNKED,    /* Transfer-Encoding: chunked */
  TD__FR_CLOSE,      /* raw bytes, the connection's close ends it (HTTP/1.0) */
  TD__FR_NONE        /* no body allowed (HEAD, 204, 304): writes are dropped */
};

typedef struct td__http_req td__http_req_t;
struct td__http_req {
  td_http_request_t pub;  /* the view handed to on_request */
  td__http_conn_t *conn;  /* the connection it arrived on */
  td__http_req_t *next;   /* next in the connection's queue, or in the pool */
  uint8_t has_id;         /* its id is live (in srv->ids) */
  uint8_t state;          /* TD__RQ_* */
  uint8_t framing;        /* TD__FR_* of a streamed response */
  uint8_t head_only;      /* HEAD request: headers only */
  uint8_t close_after;    /* the connection ends after this response */
  uint8_t healthz;        /* answered by the server */
  uint8_t drain_armed;    /* td_http_stream_notify asked for an on_drain call */
  uint8_t log_cut;        /* its streamed response was aborted (access log) */
  int log_status;         /* status of the response made, 0 before (access log) */
  uint64_t log_bytes;     /* body bytes of it (access log) */
  size_t drain_low;       /* ... when its unsent output is at most this */
  uint64_t t_start;       /* loop time of its first byte */
  uint64_t t_dispatch;    /* loop time it was handed to on_request */
  size_t url_len;         /* request target length (arena offset 0) */
  size_t body_off;        /* arena offset of the body */
  td__hbuf_t in;          /* arena: target, header names and values, body */
  td__hbuf_t out;         /* response bytes made while not at the queue head */
  td__hoff_t *hoff;       /* header offsets while parsing */
  size_t nhoff;           /* headers parsed */
  size_t choff;           /* capacity of hoff */
  td_http_header_t *hdrs; /* header views built when the request completes */
  size_t chdrs;           /* capacity of hdrs */
};

struct td__http_conn {
  uv_tcp_t tcp;             /* the socket (unused for virtual connections) */
  uv_timer_t timer;         /* deadlines: request, response, idle, send, linger */
  uv_write_t wreq;          /* the one write in flight */
  uv_shutdown_t sreq;       /* our FIN before closing */
  llhttp_t parser;          /* request parser */
  td_http_server_t *srv;    /* owner */
  td__http_conn_t *prev;    /* srv->conns list */
  td__http_conn_t *next;    /* srv->conns list */
  td__http_conn_t *dnext;   /* srv->dirty list */
  td__http_req_t *qhead;    /* requests in arrival order; the head answers first */
  td__http_req_t *qtail;    /* last queued */
  td__http_req_t *cur;      /* request being parsed (also queued) */
  td__http_req_t *ready;    /* request just completed by the parser */
  unsigned nq;              /* queued requests */
  td__hbuf_t wbuf;          /* bytes to write next */
  td__hbuf_t wflight;       /* bytes handed to uv_write */
  td__hbuf_t stash;         /* received bytes not parsed while parsing is paused */
  size_t stash_off;         /* first unparsed byte in stash */
  size_t held;              /* conn_held and unsent output, as counted in srv->held */
  size_t hbytes;            /* request line + header bytes of the current request */
  uint64_t id;              /* connection number, for logs */
  char peer[48];            /* client address, for the access log */
  uint64_t t_activity;      /* loop time of the last read or response */
  uint64_t t_write;         /* loop time the write in flight last made progress */
  size_t wq_mark;           /* libuv's write queue size then */
  uint64_t t_linger;        /* loop time our FIN was sent */
  uint64_t timer_due;       /* when the armed timer fires */
  int err_status;           /* status picked by a parser callback that failed */
  int nclosing;             /* handle close callbacks still to come */
  td__http_sink_cb sink;    /* virtual connections: where output goes */
  void *sink_ud;            /* its argument */
  uint8_t hstate;           /* 0 between headers, 1 in a name, 2 in a value */
  uint8_t in_body;          /* headers complete: later fields are trailers */
  uint8_t virt;             /* in-memory connection (tests, fuzzer) */
  uint8_t dirty;            /* in srv->dirty */
  uint8_t dead;             /* killed: no more I/O, waiting to be freed */
  uint8_t stop_parsing;     /* no more requests are read (close after the queue) */
  uint8_t writing;          /* a uv_write is in flight */
  uint8_t paused;           /* parsing paused: pipeline full or output backlog */
  uint8_t shut;             /* shutdown requested */
  uint8_t lingering;        /* shutdown done, discarding input until EOF */
};

/* A response call made on another thread, queued for the loop thread. */
typedef struct td__http_cmd td__http_cmd_t;
struct td__http_cmd {
  td__http_cmd_t *next; /* queue */
  int op;               /* TD__OP_* */
  td_http_req_id id;    /* request */
  int status;           /* respond, stream_start; notify: its level */
  size_t nh;            /* headers (copied after this struct) */
  td_http_header_t *h;  /* copied headers */
  const char *data;     /* copied body or chunk */
  size_t len;           /* its length */
};

enum { TD__OP_RESPOND = 1, TD__OP_START, TD__OP_WRITE, TD__OP_END, TD__OP_ABORT, TD__OP_NOTIFY };

struct td_http_server {
  uv_loop_t *loop;            /* the loop it runs on */
  td_http_opts_t o;           /* options with defaults filled in */
  pthread_t thread;           /* the loop thread */
  uv_tcp_t listener;          /* listening socket */
  uv_prepare_t prepare;       /* flushes dirty connections before the loop blocks */
  uv_async_t async;           /* wakes the loop for calls from other threads */
  int listen_tried;           /* td_http_server_listen was called */
  int port;                   /* bound port */
  td__http_conn_t *conns;     /* open connections */
  td__http_conn_t *dirty;     /* connections with output or parsing to resume */
  td__http_req_t **ids;       /* live requests by id: open addressing, linear probing */
  size_t ids_cap;             /* table size, a power of two (0 before the first) */
  size_t ids_count;           /* live ids */
  td_http_req_id next_id;     /* ids are 1, 2, 3, ...: exact in a double for ages */
  td__http_req_t *pool;       /* idle request structs */
  unsigned npool;             /* their number */
  td_http_stats_t st;         /* counters */
  pthread_mutex_t mu;         /* guards cmds, mq_closed */
  td__http_cmd_t *cmd_head;   /* calls from other threads */
  td__http_cmd_t *cmd_tail;   /* last one */
  int mq_closed;              /* no more cross-thread calls accepted */
  int closing;                /* td_http_server_close was called */
  int nhandles;               /* handles and connections not yet closed */
  td_http_close_cb close_cb;  /* called when nhandles reaches 0 */
  uint64_t next_conn_id;      /* connection numbering */
  uint64_t date_tick;         /* second of the cached Date header */
  uint64_t trim_at;           /* loop time memory was last given back (malloc_trim) */
  size_t held;                /* what the connections hold (their c->held) */
  uv_timer_t trim_timer;      /* the next trim, at most one a second */
  size_t date_len;            /* its length */
  char date[48];              /* "Date: ...\r\n" */
  char rbuf[TD__HTTP_READ_BUF]; /* read buffer shared by all connections */
};

/* -- Buffers ------------------------------------------------------------- */

static int hbuf_reserve(td__hbuf_t *b, size_t extra) {
  if (b->cap - b->len >= extra) return 0;
  size_t need = b->len + extra;
  if (need < b->len) return UV_ENOMEM;
  size_t cap = b->cap ? b->cap : 256;
  while (cap < need) cap *= 2;
  char *p = realloc(b->p, cap);
  if (!p) return UV_ENOMEM;
  b->p = p;
  b->cap = cap;
  return 0;
}

static int hbuf_put(td__hbuf_t *b, const void *d, size_t n) {
  if (hbuf_reserve(b, n)) return UV_ENOMEM;
  if (n) memcpy(b->p + b->len, d, n);
  b->len += n;
  return 0;
}

/* Appends without checking: callers reserved the room. */
static void hbuf_raw(td__hbuf_t *b, const void *d, size_t n) {
  memcpy(b->p + b->len, d, n);
  b->len += n;
}

static void hbuf_free(td__hbuf_t *b) {
  free(b->p);
  b->p = NULL;
  b->len = b->cap = 0;
}

/* Trims a pooled buffer so an occasional huge request does not stay resident. */
static void hbuf_recycle(td__hbuf_t *b) {
  if (b->cap > TD__HTTP_KEEP_BUF) hbuf_free(b);
  b->len = 0;
}

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

/* -- Small helpers ------------------------------------------------------- */

static int on_loop_thread(const td_http_server_t *srv) {
  return pthread_equal(pthread_self(), srv->thread);
}

static int lower(int ch) { return (ch >= 'A' && ch <= 'Z') ? ch + 32 : ch; }

static int ieq(const char *a, size_t an, const char *b) {
  size_t bn = strlen(b);
  if (an != bn) return 0;
  for (size_t i = 0; i < an; i++)
    if (lower((unsigned char)a[i]) != lower((unsigned char)b[i])) return 0;
  return 1;
}

/* RFC 9110 token characters, for header names. */
static int is_tchar(unsigned char ch) {
  if ((ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') || (ch >= '0' && ch <= '9'))
    return 1;
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

const char *td_http_request_header(const td_http_request_t *req, const char *name) {
  for (size_t i = 0; i < req->nheaders; i++)
    if (ieq(req->headers[i].name, req->headers[i].name_len, name))
      return req->headers[i].value;
  return NULL;
}

/* The cached "Date: ...\r\n" line, refreshed once a second of loop time. */
static void date_refresh(td_http_server_t *srv) {
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

static td__http_req_t *req_new(td__http_conn_t *c) {
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
  if (!t) return UV_ENOMEM;
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
static int req_assign_id(td_http_server_t *srv, td__http_req_t *r) {
  if ((srv->ids_count + 1) * 2 > srv->ids_cap && ids_grow(srv)) return UV_ENOMEM;
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

/* Kills the request's id: later calls with it get UV_ENOENT. */
static void req_drop_id(td_http_server_t *srv, td__http_req_t *r) {
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

static td__http_req_t *req_lookup(td_http_server_t *srv, td_http_req_id id) {
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
  req_drop_id(srv, r);
  if (r->in.cap + r->out.cap > TD__HTTP_KEEP_BUF) server_trim_soon(srv);
  if (srv->npool >= TD__HTTP_POOL_MAX) {
    hbuf_free(&r->in);
    hbuf_free(&r->out);
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
static void conn_flush(td__http_conn_t *c);
static void conn_timer_update(td__http_conn_t *c);
static void conn_check_drain(td__http_conn_t *c);
static void conn_parse(td__http_conn_t *c, const char *p, size_t n);

static void on_prepare(uv_prepare_t *h);

static void conn_mark_dirty(td__http_conn_t *c) {
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

static void conn_enqueue(td__http_conn_t *c, td__http_req_t *r) {
  r->next = NULL;
  if (c->qtail)
    c->qtail->next = r;
  else
    c->qhead = r;
  c->qtail = r;
  c->nq++;
}

/* Where a request's response bytes go: straight to the socket buffer when it
 * is the head of the queue, else into its own buffer until its turn. */
static td__hbuf_t *req_target(td__http_req_t *r) {
  return r == r->conn->qhead ? &r->conn->wbuf : &r->out;
}

/* Output the client has not taken: what waits behind a write the socket
 * could not take at once, plus what waits for its turn in the queue. Bytes
 * made in the current loop turn and not yet tried do not count, so a big
 * response written in pieces by one callback is not mistaken for a slow
 * client. */
static size_t conn_backlog(const td__http_conn_t *c, const td__hbuf_t *target) {
  size_t n = c->writing ? c->wbuf.len + c->wflight.len : 0;
  if (target != &c->wbuf) n += target->len;
  return n;
}

/* Pops finished requests off the head, moving the next one's buffered
 * output to the socket buffer, so responses leave in request order. */
static void conn_advance(td__http_conn_t *c) {
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
      if (hbuf_put(&c->wbuf, h->out.p, h->out.len)) {
        /* Out of memory: nothing sensible to send; the connection ends. */
        c->stop_parsing = 1;
        h->out.len = 0;
        break;
      }
      h->out.len = 0;
    }
  }
  if (popped) {
    c->t_activity = uv_now(srv->loop);
    conn_mark_dirty(c);
  }
}

/* Ends the connection now. Unfinished requests that the application holds
 * are reported to on_abort (after their ids are dead); the rest are freed.
 * TCP connections are freed in their close callbacks, virtual ones by
 * td__http_virt_close. */
static void on_conn_closed(uv_handle_t *h);

static void conn_kill(td__http_conn_t *c, td_http_abort_reason_t reason) {
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
  hbuf_free(&c->wbuf);
  hbuf_free(&c->wflight);
  hbuf_free(&c->stash);
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
static void conn_drop_after(td__http_conn_t *c, td__http_req_t *after) {
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
  return ieq(name, n, "content-length") || ieq(name, n, "transfer-encoding") ||
         ieq(name, n, "connection") || ieq(name, n, "date");
}

/* Writes the status line and headers of a response for r into b.
 * framing TD__FR_LENGTH sends Content-Length: clen. */
static int fmt_head(td__hbuf_t *b, td__http_req_t *r, int status,
                    const td_http_header_t *h, size_t nh, int framing, size_t clen) {
  td_http_server_t *srv = r->conn->srv;
  const char *reason = td_http_status_text(status);
  size_t need = 64 + strlen(reason) + srv->date_len + 48;
  for (size_t i = 0; i < nh; i++)
    need += (h[i].name_len ? h[i].name_len : strlen(h[i].name)) +
            (h[i].value_len ? h[i].value_len : strlen(h[i].value)) + 4;
  if (hbuf_reserve(b, need)) return UV_ENOMEM;
  r->log_status = status;
  char st[4] = {(char)('0' + status / 100), (char)('0' + status / 10 % 10),
                (char)('0' + status % 10), ' '};
  hbuf_raw(b, "HTTP/1.1 ", 9);
  hbuf_raw(b, st, 4);
  hbuf_raw(b, reason, strlen(reason));
  hbuf_raw(b, "\r\n", 2);
  for (size_t i = 0; i < nh; i++) {
    size_t nl = h[i].name_len ? h[i].name_len : strlen(h[i].name);
    size_t vl = h[i].value_len ? h[i].value_len : strlen(h[i].value);
    if (header_reserved(h[i].name, nl)) continue;
    hbuf_raw(b, h[i].name, nl);
    hbuf_raw(b, ": ", 2);
    hbuf_raw(b, h[i].value, vl);
    hbuf_raw(b, "\r\n", 2);
  }
  hbuf_raw(b, srv->date, srv->date_len);
  if (framing == TD__FR_LENGTH) {
    char num[24];
    hbuf_raw(b, "Content-Length: ", 16);
    hbuf_raw(b, num, fmt_u64(num, clen));
    hbuf_raw(b, "\r\n", 2);
  } else if (framing == TD__FR_CHUNKED) {
    hbuf_raw(b, "Transfer-Encoding: chunked\r\n", 28);
  }
  if (r->close_after)
    hbuf_raw(b, "Connection: close\r\n", 19);
  else if (r->pub.http_minor == 0)
    hbuf_raw(b, "Connection: keep-alive\r\n", 24);
  hbuf_raw(b, "\r\n", 2);
  return 0;
}

static int status_has_body(int status) { return status != 204 && status != 304; }

/* Queues a whole response for r (head + body) and marks it done. */
static int req_write_whole(td__http_req_t *r, int status, const td_http_header_t *h,
                           size_t nh, const void *body, size_t len) {
  td__hbuf_t *b = req_target(r);
  size_t mark = b->len;
  int has_body = status_has_body(status);
  int rc = fmt_head(b, r, status, h, nh, has_body ? TD__FR_LENGTH : TD__FR_NONE,
                    len);
  if (rc == 0 && has_body && !r->head_only) rc = hbuf_put(b, body, len);
  if (rc) {
    b->len = mark;
    return rc;
  }
  r->state = TD__RQ_DONE;
  r->log_bytes = has_body && !r->head_only ? len : 0;
  r->conn->srv->st.responses++;
  return 0;
}

/* Server-made responses: errors as {"error":..,"status":..}, healthz. */
static void req_reply_internal(td__http_req_t *r, int status, int close_conn) {
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
    len = (size_t)snprintf(body, sizeof(body), "{\"error\":\"%s\",\"status\":%d}\n", msg,
                           status);
  }
  static const td_http_header_t ct[] = {TD_HTTP_HDR("Content-Type", "application/json")};
  date_refresh(srv);
  if (req_write_whole(r, status, ct, 1, body, len)) {
    /* Out of memory: end the connection without a response. */
    r->state = TD__RQ_DONE;
    r->close_after = 1;
    c->stop_parsing = 1;
  }
  if (r->close_after) conn_drop_after(c, r);
  conn_advance(c);
  conn_mark_dirty(c);
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
  if (hbuf_put(&c->cur->in, at, len)) {
    c->err_status = 503;
    return HPE_USER;
  }
  return 0;
}

static int cb_message_begin(llhttp_t *p) {
  td__http_conn_t *c = CONN(p);
  td__http_req_t *r = req_new(c);
  if (!r) {
    c->err_status = 503;
    return -1;
  }
  conn_enqueue(c, r);
  c->cur = r;
  c->hbytes = 0;
  c->hstate = 0;
  c->in_body = 0;
  r->t_start = uv_now(c->srv->loop);
  conn_timer_update(c);
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
  for (size_t i = h->no; i < r->in.len; i++) r->in.p[i] = (char)lower((unsigned char)r->in.p[i]);
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
    if (ieq(r->in.p + r->hoff[i].no, r->hoff[i].nl, name)) return r->in.p + r->hoff[i].vo;
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
  if (ex && p->http_minor >= 1 && ieq(ex, strlen(ex), "100-continue") &&
      r == c->qhead) {
    if (hbuf_put(&c->wbuf, "HTTP/1.1 100 Continue\r\n\r\n", 25) == 0) conn_mark_dirty(c);
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
  char *base = r->in.p;
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
  if (end - t > 7 && (lower(t[0]) == 'h' && lower(t[1]) == 't' && lower(t[2]) == 't' &&
                      lower(t[3]) == 'p')) {
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

static const llhttp_settings_t td__http_settings = {
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
static void conn_account(td__http_conn_t *c) {
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
static int conn_can_parse(td__http_conn_t *c) {
  conn_account(c);
  return c->nq < c->srv->o.max_pipeline &&
         c->wbuf.len + c->wflight.len < TD__HTTP_HIGH_WATER &&
         (c->nq == 0 || (conn_held(c) < TD__HTTP_CONN_BUDGET && c->srv->held < TD__HTTP_SERVER_BUDGET));
}

/* Keeps unparsed input for later (parsing paused). */
static void conn_stash(td__http_conn_t *c, const char *p, size_t n) {
  if (c->stash.p && p >= c->stash.p && p <= c->stash.p + c->stash.len) {
    c->stash_off = (size_t)(p - c->stash.p);
  } else {
    c->stash.len = 0;
    c->stash_off = 0;
    if (hbuf_put(&c->stash, p, n)) {
      conn_kill(c, TD_HTTP_ABORT_DISCONNECT);
      return;
    }
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
    req_reply_internal(r, 200, 0);
    return;
  }
  if (req_assign_id(srv, r)) {
    req_reply_internal(r, 503, 1);
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
    r = req_new(c);
    if (!r) {
      conn_kill(c, TD_HTTP_ABORT_DISCONNECT);
      return;
    }
    conn_enqueue(c, r);
  }
  if (status == 400 || status == 505 || status == 405)
    srv->st.bad_requests++;
  else if (status == 413 || status == 414 || status == 431)
    srv->st.too_large++;
  req_reply_internal(r, status, 1);
}

static void conn_parse(td__http_conn_t *c, const char *p, size_t n) {
  while (n > 0) {
    if (c->dead) return;
    if (c->stop_parsing) return; /* the rest is discarded */
    if (!c->cur && !conn_can_parse(c)) {
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
    conn_kill(c, TD_HTTP_ABORT_CONN_CLOSE);
    return;
  }
  if (uv_shutdown(&c->sreq, (uv_stream_t *)&c->tcp, on_shutdown))
    conn_kill(c, TD_HTTP_ABORT_CONN_CLOSE);
}

static void on_write(uv_write_t *req, int status);

static void conn_flush(td__http_conn_t *c) {
  if (c->dead || c->writing) return;
  if (c->wbuf.len == 0) {
    conn_maybe_finish(c);
    return;
  }
  if (c->virt) {
    if (c->sink) c->sink(c->sink_ud, c->wbuf.p, c->wbuf.len);
    c->wbuf.len = 0;
    conn_maybe_finish(c);
    return;
  }
  uv_buf_t b = uv_buf_init(c->wbuf.p, (unsigned)c->wbuf.len);
  int n = uv_try_write((uv_stream_t *)&c->tcp, &b, 1);
  if (n == (int)c->wbuf.len) {
    c->wbuf.len = 0;
    if (c->wbuf.cap > TD__HTTP_HIGH_WATER) hbuf_free(&c->wbuf); /* after a big one */
    conn_maybe_finish(c);
    return;
  }
  if (n < 0 && n != UV_EAGAIN) {
    conn_kill(c, TD_HTTP_ABORT_DISCONNECT);
    return;
  }
  if (n < 0) n = 0;
  /* Hand the rest to uv_write; new output collects in the other buffer. */
  td__hbuf_t t = c->wflight;
  c->wflight = c->wbuf;
  c->wbuf = t;
  c->wbuf.len = 0;
  b = uv_buf_init(c->wflight.p + n, (unsigned)(c->wflight.len - (size_t)n));
  if (uv_write(&c->wreq, (uv_stream_t *)&c->tcp, &b, 1, on_write)) {
    conn_kill(c, TD_HTTP_ABORT_DISCONNECT);
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
  if (c->wflight.cap > TD__HTTP_HIGH_WATER) hbuf_free(&c->wflight);
  if (c->dead) return;
  if (status < 0) {
    conn_kill(c, TD_HTTP_ABORT_DISCONNECT);
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

static void conn_timer_update(td__http_conn_t *c) {
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
    case TD__DL_IDLE:
      conn_kill(c, TD_HTTP_ABORT_DISCONNECT);
      return;
    case TD__DL_SEND:
      if (c->tcp.write_queue_size < c->wq_mark) {
        /* Slow but moving: measure the next period from now. */
        c->wq_mark = c->tcp.write_queue_size;
        c->t_write = now;
        break;
      }
      srv->st.timeouts++;
      conn_kill(c, TD_HTTP_ABORT_SLOW_CLIENT);
      return;
    case TD__DL_REQUEST: {
      td__http_req_t *r = c->cur;
      c->cur = NULL;
      srv->st.timeouts++;
      req_reply_internal(r, 408, 1);
      break;
    }
    case TD__DL_RESPONSE: {
      td__http_req_t *r = c->qhead;
      while (r && r->state != TD__RQ_DISPATCHED) r = r->next;
      if (!r) break;
      td_http_req_id id = r->pub.id;
      req_drop_id(srv, r);
      req_reply_internal(r, 504, 0);
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
    conn_timer_update(c);
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
    conn_kill(c, TD_HTTP_ABORT_DISCONNECT);
    return;
  }
  for (td__http_req_t *r = c->qhead; r; r = r->next)
    if (req_live(r)) {
      conn_kill(c, TD_HTTP_ABORT_DISCONNECT);
      return;
    }
  if (c->cur) {
    /* A partial request: drop it (it sits at the tail). */
    td__http_req_t *prev = NULL;
    for (td__http_req_t *r = c->qhead; r && r != c->cur; r = r->next) prev = r;
    conn_drop_after(c, prev);
  }
  c->stop_parsing = 1;
  if (c->paused) {
    c->paused = 0;
    c->stash.len = c->stash_off = 0;
  }
  if (!c->virt) uv_read_stop((uv_stream_t *)&c->tcp);
  conn_mark_dirty(c);
}

static void on_read(uv_stream_t *s, ssize_t n, const uv_buf_t *buf) {
  td__http_conn_t *c = s->data;
  (void)buf;
  if (c->dead) return;
  if (n < 0) {
    if (n == UV_EOF)
      conn_eof(c);
    else
      conn_kill(c, TD_HTTP_ABORT_DISCONNECT);
    return;
  }
  if (n == 0) return;
  c->t_activity = uv_now(c->srv->loop);
  if (c->lingering || c->stop_parsing) return; /* discarded */
  conn_parse(c, buf->base, (size_t)n);
  if (!c->dead) {
    conn_mark_dirty(c);
    conn_timer_update(c);
  }
}

static void on_shutdown(uv_shutdown_t *req, int status) {
  td__http_conn_t *c = req->handle->data;
  if (c->dead) return;
  if (status < 0 || uv_is_closing((uv_handle_t *)&c->tcp)) {
    conn_kill(c, TD_HTTP_ABORT_CONN_CLOSE);
    return;
  }
  c->lingering = 1;
  c->t_linger = uv_now(c->srv->loop);
  if (uv_read_start((uv_stream_t *)&c->tcp, on_alloc, on_read)) {
    conn_kill(c, TD_HTTP_ABORT_CONN_CLOSE);
    return;
  }
  uv_timer_stop(&c->timer);
  conn_timer_update(c);
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
  if (c->paused && !c->stop_parsing && conn_can_parse(c)) {
    c->paused = 0;
    size_t off = c->stash_off, len = c->stash.len;
    conn_parse(c, c->stash.p + off, len - off);
    if (c->dead) return;
    if (!c->paused) {
      c->stash.len = c->stash_off = 0;
      if (!c->virt && !c->lingering) {
        if (uv_read_start((uv_stream_t *)&c->tcp, on_alloc, on_read)) {
          conn_kill(c, TD_HTTP_ABORT_DISCONNECT);
          return;
        }
      }
    }
  }
  conn_flush(c);
  if (c->dead) return;
  conn_check_drain(c);
  conn_account(c);
  conn_timer_update(c);
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
  date_refresh(srv);
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
    conn_kill(idle, TD_HTTP_ABORT_DISCONNECT);
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
    conn_kill(c, TD_HTTP_ABORT_DISCONNECT);
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
        conn_kill(c, TD_HTTP_ABORT_DISCONNECT);
        return;
      }
      conn_kill(old, TD_HTTP_ABORT_DISCONNECT);  /* the new one takes its place */
    }
  }
  conn_timer_update(c);
}

/* -- Server lifetime ----------------------------------------------------- */

static void on_server_handle_closed(uv_handle_t *h) {
  td_http_server_t *srv = h->data;
  srv->nhandles--;
  server_maybe_closed(srv);
}

static void on_async(uv_async_t *h);

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
  uv_async_init(loop, &srv->async, on_async);
  uv_timer_init(loop, &srv->trim_timer);
  srv->listener.data = srv->prepare.data = srv->async.data = srv->trim_timer.data = srv;
  uv_unref((uv_handle_t *)&srv->async);
  uv_unref((uv_handle_t *)&srv->prepare);
  uv_unref((uv_handle_t *)&srv->trim_timer);
  srv->nhandles = 4;
  date_refresh(srv);
  return srv;
}

int td_http_server_listen(td_http_server_t *srv, const char *host, int port) {
  if (srv->closing) return UV_ECANCELED;
  if (srv->listen_tried) return UV_EALREADY;
  if (port < 0 || port > 65535) return UV_EINVAL;
  srv->listen_tried = 1;
  if (!host) host = "127.0.0.1";
  struct sockaddr_storage ss;
  int rc;
  if (strchr(host, ':'))
    rc = uv_ip6_addr(host, port, (struct sockaddr_in6 *)&ss);
  else
    rc = uv_ip4_addr(host, port, (struct sockaddr_in *)&ss);
  if (rc) return UV_EINVAL;
  if ((rc = uv_tcp_bind(&srv->listener, (const struct sockaddr *)&ss, 0))) return rc;
  if ((rc = uv_listen((uv_stream_t *)&srv->listener, 1024, on_connection))) return rc;
  int len = sizeof(ss);
  if ((rc = uv_tcp_getsockname(&srv->listener, (struct sockaddr *)&ss, &len))) return rc;
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
    hbuf_free(&r->in);
    hbuf_free(&r->out);
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
  while (srv->conns) conn_kill(srv->conns, TD_HTTP_ABORT_SERVER_CLOSE);
  uv_close((uv_handle_t *)&srv->listener, on_server_handle_closed);
  uv_close((uv_handle_t *)&srv->prepare, on_server_handle_closed);
  uv_close((uv_handle_t *)&srv->async, on_server_handle_closed);
  uv_close((uv_handle_t *)&srv->trim_timer, on_server_handle_closed);
}

/* -- Response calls ------------------------------------------------------ */

static int respond_now(td_http_server_t *srv, td_http_req_id id, int status,
                       const td_http_header_t *h, size_t nh, const void *body,
                       size_t len) {
  td__http_req_t *r = req_lookup(srv, id);
  if (!r) return UV_ENOENT;
  if (r->state != TD__RQ_DISPATCHED) return UV_EINVAL;
  td__http_conn_t *c = r->conn;
  td__hbuf_t *b = req_target(r);
  if (conn_backlog(c, b) > srv->o.max_output_bytes) {
    conn_kill(c, TD_HTTP_ABORT_SLOW_CLIENT);
    return UV_ENOBUFS;
  }
  date_refresh(srv);
  int rc = req_write_whole(r, status, h, nh, body, len);
  if (rc) return rc;
  req_drop_id(srv, r);
  conn_advance(c);
  conn_mark_dirty(c);
  return 0;
}

static int stream_start_now(td_http_server_t *srv, td_http_req_id id, int status,
                            const td_http_header_t *h, size_t nh) {
  td__http_req_t *r = req_lookup(srv, id);
  if (!r) return UV_ENOENT;
  if (r->state != TD__RQ_DISPATCHED) return UV_EINVAL;
  td__http_conn_t *c = r->conn;
  int framing;
  if (r->head_only || !status_has_body(status))
    framing = TD__FR_NONE;
  else if (r->pub.http_minor >= 1)
    framing = TD__FR_CHUNKED;
  else
    framing = TD__FR_CLOSE;
  if (framing == TD__FR_CLOSE) {
    /* Only the connection's end can delimit this body. */
    r->close_after = 1;
    conn_drop_after(c, r);
  }
  date_refresh(srv);
  td__hbuf_t *b = req_target(r);
  int rc = fmt_head(b, r, status, h, nh, framing, 0);
  if (rc) return rc;
  r->framing = (uint8_t)framing;
  r->state = TD__RQ_STREAMING;
  conn_mark_dirty(c);
  return 0;
}

static int stream_write_now(td_http_server_t *srv, td_http_req_id id, const void *data,
                            size_t len) {
  td__http_req_t *r = req_lookup(srv, id);
  if (!r) return UV_ENOENT;
  if (r->state != TD__RQ_STREAMING) return UV_EINVAL;
  if (len == 0 || r->framing == TD__FR_NONE) return 0;
  td__http_conn_t *c = r->conn;
  td__hbuf_t *b = req_target(r);
  if (conn_backlog(c, b) > srv->o.max_output_bytes) {
    conn_kill(c, TD_HTTP_ABORT_SLOW_CLIENT);
    return UV_ENOBUFS;
  }
  if (hbuf_reserve(b, len + 24)) return UV_ENOMEM;
  r->log_bytes += len;
  if (r->framing == TD__FR_CHUNKED) {
    char hx[24];
    size_t n = fmt_hex(hx, len);
    hx[n++] = '\r';
    hx[n++] = '\n';
    hbuf_raw(b, hx, n);
    hbuf_raw(b, data, len);
    hbuf_raw(b, "\r\n", 2);
  } else {
    hbuf_raw(b, data, len);
  }
  if (b == &c->wbuf && b->len >= TD__HTTP_EAGER_FLUSH) conn_flush(c);
  conn_mark_dirty(c);
  return 0;
}

static int stream_notify_now(td_http_server_t *srv, td_http_req_id id, size_t low) {
  td__http_req_t *r = req_lookup(srv, id);
  if (!r) return UV_ENOENT;
  if (r->state != TD__RQ_STREAMING) return UV_EINVAL;
  r->drain_armed = 1;
  r->drain_low = low;
  conn_mark_dirty(r->conn);  /* checked when the loop next services it */
  return 0;
}

static int stream_end_now(td_http_server_t *srv, td_http_req_id id) {
  td__http_req_t *r = req_lookup(srv, id);
  if (!r) return UV_ENOENT;
  if (r->state != TD__RQ_STREAMING) return UV_EINVAL;
  td__http_conn_t *c = r->conn;
  if (r->framing == TD__FR_CHUNKED && hbuf_put(req_target(r), "0\r\n\r\n", 5))
    return UV_ENOMEM;
  r->state = TD__RQ_DONE;
  srv->st.responses++;
  req_drop_id(srv, r);
  conn_advance(c);
  conn_mark_dirty(c);
  return 0;
}

static int abort_now(td_http_server_t *srv, td_http_req_id id) {
  td__http_req_t *r = req_lookup(srv, id);
  if (!r) return UV_ENOENT;
  td__http_conn_t *c = r->conn;
  if (r->state == TD__RQ_DISPATCHED) {
    req_drop_id(srv, r);
    req_reply_internal(r, 500, 0);
    return 0;
  }
  if (r->state != TD__RQ_STREAMING) return UV_EINVAL;
  /* Truncate: what was sent stays, no terminating chunk, then close. */
  req_drop_id(srv, r);
  r->state = TD__RQ_DONE;
  r->log_cut = 1;
  r->close_after = 1;
  srv->st.responses++;
  conn_drop_after(c, r);
  conn_advance(c);
  conn_mark_dirty(c);
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
    default: return UV_EINVAL;
  }
}

static void on_async(uv_async_t *h) {
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
static int cmd_post(td_http_server_t *srv, int op, td_http_req_id id, int status,
                    const td_http_header_t *h, size_t nh, const void *data, size_t len) {
  size_t size = sizeof(td__http_cmd_t) + nh * sizeof(td_http_header_t) + len + 1;
  for (size_t i = 0; i < nh; i++)
    size += (h[i].name_len ? h[i].name_len : strlen(h[i].name)) +
            (h[i].value_len ? h[i].value_len : strlen(h[i].value)) + 2;
  td__http_cmd_t *m = malloc(size);
  if (!m) return UV_ENOMEM;
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
    return UV_ECANCELED;
  }
  if (srv->cmd_tail)
    srv->cmd_tail->next = m;
  else
    srv->cmd_head = m;
  srv->cmd_tail = m;
  /* Under the lock: td_http_server_close sets mq_closed under it before it
   * closes the async handle, so the handle is alive here. */
  uv_async_send(&srv->async);
  pthread_mutex_unlock(&srv->mu);
  return 0;
}

static int status_valid(int status) { return status >= 200 && status <= 599; }

int td_http_respond(td_http_server_t *srv, td_http_req_id id, int status,
                    const td_http_header_t *headers, size_t nheaders, const void *body,
                    size_t len) {
  if (!status_valid(status) || !headers_valid(headers, nheaders) || (len && !body))
    return UV_EINVAL;
  if (!on_loop_thread(srv))
    return cmd_post(srv, TD__OP_RESPOND, id, status, headers, nheaders, body, len);
  return respond_now(srv, id, status, headers, nheaders, body, len);
}

int td_http_stream_start(td_http_server_t *srv, td_http_req_id id, int status,
                         const td_http_header_t *headers, size_t nheaders) {
  if (!status_valid(status) || !headers_valid(headers, nheaders)) return UV_EINVAL;
  if (!on_loop_thread(srv))
    return cmd_post(srv, TD__OP_START, id, status, headers, nheaders, NULL, 0);
  return stream_start_now(srv, id, status, headers, nheaders);
}

int td_http_stream_write(td_http_server_t *srv, td_http_req_id id, const void *data,
                         size_t len) {
  if (len && !data) return UV_EINVAL;
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

void td_http_server_flush(td_http_server_t *srv) {
  date_refresh(srv);
  server_run_dirty(srv);
}

/* -- Inbox ----------------------------------------------------------------- */

typedef struct td__http_evnode td__http_evnode_t;
struct td__http_evnode {
  td__http_evnode_t *next; /* queue */
  td_http_event_t ev;      /* what the consumer gets */
};

struct td_http_inbox {
  pthread_mutex_t mu;       /* guards everything below */
  td__http_evnode_t *head;  /* oldest */
  td__http_evnode_t *tail;  /* newest */
  size_t n;                 /* queued */
  int fd;                   /* eventfd: nonzero count while n > 0 */
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
  if (ib->tail)
    ib->tail->next = e;
  else
    ib->head = e;
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
    if (--ib->n == 0 && read(ib->fd, &v, sizeof(v)) < 0) {
      /* Already zero: nothing to reset. */
    }
  }
  pthread_mutex_unlock(&ib->mu);
  return e ? &e->ev : NULL;
}

void td_http_inbox_on_request(td_http_server_t *srv, const td_http_request_t *req,
                              void *inbox) {
  size_t size = sizeof(td__http_evnode_t) + req->nheaders * sizeof(td_http_header_t) +
                req->path_len + req->query_len + req->body_len + 3;
  for (size_t i = 0; i < req->nheaders; i++)
    size += req->headers[i].name_len + req->headers[i].value_len + 2;
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

void td_http_inbox_on_abort(td_http_server_t *srv, td_http_req_id id,
                            td_http_abort_reason_t reason, void *inbox) {
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
  pthread_t th;           /* the loop thread */
  uv_loop_t loop;         /* its loop */
  uv_async_t stop;        /* closes the server from td_http_thread_stop */
  td_http_server_t *srv;  /* the server */
  td_http_opts_t opts;    /* as given */
  char host[64];          /* listen address */
  int port;               /* requested, then bound */
  int rc;                 /* listen result */
  int ready;              /* start finished (guarded by mu) */
  pthread_mutex_t mu;     /* start handshake */
  pthread_cond_t cv;      /* signalled when ready */
};

static void thread_on_stop(uv_async_t *h) {
  td_http_thread_t *t = h->data;
  td_http_server_close(t->srv, NULL);
  uv_close((uv_handle_t *)&t->stop, NULL);
}

static void *thread_main(void *arg) {
  td_http_thread_t *t = arg;
  int rc = uv_loop_init(&t->loop);
  if (rc == 0) {
    t->srv = td_http_server_new(&t->loop, &t->opts);
    rc = t->srv ? td_http_server_listen(t->srv, t->host[0] ? t->host : NULL, t->port)
                : UV_ENOMEM;
    if (rc == 0) rc = uv_async_init(&t->loop, &t->stop, thread_on_stop);
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

int td_http_thread_start(const td_http_opts_t *opts, const char *host, int port,
                         td_http_thread_t **out) {
  if (!opts || !opts->on_request || !out) abort(); /* API misuse */
  *out = NULL;
  if (host && strlen(host) >= sizeof(((td_http_thread_t *)0)->host)) return UV_EINVAL;
  td_http_thread_t *t = calloc(1, sizeof(*t));
  if (!t) return UV_ENOMEM;
  t->opts = *opts;
  if (host) strcpy(t->host, host);
  t->port = port;
  pthread_mutex_init(&t->mu, NULL);
  pthread_cond_init(&t->cv, NULL);
  if (pthread_create(&t->th, NULL, thread_main, t)) {
    free(t);
    return UV_EAGAIN;
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
    if (hbuf_put(&c->stash, data, len)) conn_kill(c, TD_HTTP_ABORT_DISCONNECT);
    return;
  }
  conn_parse(c, data, len);
  conn_mark_dirty(c);
}

void td__http_virt_flush(td_http_server_t *srv) {
  date_refresh(srv);
  server_run_dirty(srv);
}

void td__http_virt_close(td__http_conn_t *c) {
  conn_kill(c, TD_HTTP_ABORT_DISCONNECT);
  conn_free(c);
}
