/* Private to the HTTP ingress: the records shared by engine/http.c (the
 * server and its connections), http_parse.c (requests in) and
 * http_respond.c (responses out), the limits they keep, and the functions
 * they call across files. Other layers use http.h.
 */
#ifndef TD_HTTP_INT_H
#define TD_HTTP_INT_H
#include "http.h"
#include "td.h"

#include <llhttp.h>
#include <pthread.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* -- Constants ----------------------------------------------------------- */

#define TD__HTTP_READ_BUF (64 * 1024)             /* one shared read buffer */
#define TD__HTTP_HIGH_WATER (1024 * 1024)         /* unsent bytes that pause parsing */
#define TD__HTTP_CONN_BUDGET (4 * 1024 * 1024)    /* queued requests' bytes that pause parsing */
#define TD__HTTP_SERVER_BUDGET (64 * 1024 * 1024) /* the same, all connections together */
#define TD__HTTP_EAGER_FLUSH (256 * 1024)         /* stream bytes that are written at once */
#define TD__HTTP_KEEP_BUF (64 * 1024)             /* pooled buffers above this are freed */
#define TD__HTTP_POOL_MAX 256                     /* idle request structs kept */
#define TD__HTTP_LINGER_MS 2000                   /* read-and-discard after our FIN */
#define TD__HTTP_NEVER UINT64_MAX

/* -- Types --------------------------------------------------------------- */

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
  td_buf_t in;            /* arena: target, header names and values, body */
  td_buf_t out;           /* response bytes made while not at the queue head */
  td__hoff_t *hoff;       /* header offsets while parsing */
  size_t nhoff;           /* headers parsed */
  size_t choff;           /* capacity of hoff */
  td_http_header_t *hdrs; /* header views built when the request completes */
  size_t chdrs;           /* capacity of hdrs */
};

struct td__http_conn {
  uv_tcp_t tcp;           /* the socket (unused for virtual connections) */
  uv_timer_t timer;       /* deadlines: request, response, idle, send, linger */
  uv_write_t wreq;        /* the one write in flight */
  uv_shutdown_t sreq;     /* our FIN before closing */
  llhttp_t parser;        /* request parser */
  td_http_server_t *srv;  /* owner */
  td__http_conn_t *prev;  /* srv->conns list */
  td__http_conn_t *next;  /* srv->conns list */
  td__http_conn_t *dnext; /* srv->dirty list */
  td__http_req_t *qhead;  /* requests in arrival order; the head answers first */
  td__http_req_t *qtail;  /* last queued */
  td__http_req_t *cur;    /* request being parsed (also queued) */
  td__http_req_t *ready;  /* request just completed by the parser */
  unsigned nq;            /* queued requests */
  td_buf_t wbuf;          /* bytes to write next */
  td_buf_t wflight;       /* bytes handed to uv_write */
  td_buf_t stash;         /* received bytes not parsed while parsing is paused */
  size_t stash_off;       /* first unparsed byte in stash */
  size_t held;            /* conn_held and unsent output, as counted in srv->held */
  size_t hbytes;          /* request line + header bytes of the current request */
  uint64_t id;            /* connection number, for logs */
  char peer[48];          /* client address, for the access log */
  uint64_t t_activity;    /* loop time of the last read or response */
  uint64_t t_write;       /* loop time the write in flight last made progress */
  size_t wq_mark;         /* libuv's write queue size then */
  uint64_t t_linger;      /* loop time our FIN was sent */
  uint64_t timer_due;     /* when the armed timer fires */
  int err_status;         /* status picked by a parser callback that failed */
  int nclosing;           /* handle close callbacks still to come */
  td__http_sink_cb sink;  /* virtual connections: where output goes */
  void *sink_ud;          /* its argument */
  uint8_t hstate;         /* 0 between headers, 1 in a name, 2 in a value */
  uint8_t in_body;        /* headers complete: later fields are trailers */
  uint8_t virt;           /* in-memory connection (tests, fuzzer) */
  uint8_t dirty;          /* in srv->dirty */
  uint8_t dead;           /* killed: no more I/O, waiting to be freed */
  uint8_t stop_parsing;   /* no more requests are read (close after the queue) */
  uint8_t writing;        /* a uv_write is in flight */
  uint8_t paused;         /* parsing paused: pipeline full or output backlog */
  uint8_t shut;           /* shutdown requested */
  uint8_t lingering;      /* shutdown done, discarding input until EOF */
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
  uv_loop_t *loop;              /* the loop it runs on */
  td_http_opts_t o;             /* options with defaults filled in */
  pthread_t thread;             /* the loop thread */
  uv_tcp_t listener;            /* listening socket */
  uv_prepare_t prepare;         /* flushes dirty connections before the loop blocks */
  uv_async_t async;             /* wakes the loop for calls from other threads */
  int listen_tried;             /* td_http_server_listen was called */
  int port;                     /* bound port */
  td__http_conn_t *conns;       /* open connections */
  td__http_conn_t *dirty;       /* connections with output or parsing to resume */
  td__http_req_t **ids;         /* live requests by id: open addressing, linear probing */
  size_t ids_cap;               /* table size, a power of two (0 before the first) */
  size_t ids_count;             /* live ids */
  td_http_req_id next_id;       /* ids are 1, 2, 3, ...: exact in a double for ages */
  td__http_req_t *pool;         /* idle request structs */
  unsigned npool;               /* their number */
  td_http_stats_t st;           /* counters */
  pthread_mutex_t mu;           /* guards cmds, mq_closed */
  td__http_cmd_t *cmd_head;     /* calls from other threads */
  td__http_cmd_t *cmd_tail;     /* last one */
  int mq_closed;                /* no more cross-thread calls accepted */
  int closing;                  /* td_http_server_close was called */
  int nhandles;                 /* handles and connections not yet closed */
  td_http_close_cb close_cb;    /* called when nhandles reaches 0 */
  uint64_t next_conn_id;        /* connection numbering */
  uint64_t date_tick;           /* second of the cached Date header */
  uint64_t trim_at;             /* loop time memory was last given back (malloc_trim) */
  size_t held;                  /* what the connections hold (their c->held) */
  uv_timer_t trim_timer;        /* the next trim, at most one a second */
  size_t date_len;              /* its length */
  char date[48];                /* "Date: ...\r\n" */
  char rbuf[TD__HTTP_READ_BUF]; /* read buffer shared by all connections */
};

/* -- Small helpers --------------------------------------------------------- */

static inline int td__http_lower(int ch) { return (ch >= 'A' && ch <= 'Z') ? ch + 32 : ch; }

static inline int td__http_ieq(const char *a, size_t an, const char *b) {
  size_t bn = strlen(b);
  if (an != bn) return 0;
  for (size_t i = 0; i < an; i++)
    if (td__http_lower((unsigned char)a[i]) != td__http_lower((unsigned char)b[i])) return 0;
  return 1;
}

/* -- engine/http.c: buffers, requests, connections ------------------------- */

/* The cached "Date: ...\r\n" line, refreshed once a second of loop time. */
void td__http_date_refresh(td_http_server_t *srv);
td__http_req_t *td__http_req_new(td__http_conn_t *c);
/* Gives the request an id (it is about to be handed to on_request). */
int td__http_req_assign_id(td_http_server_t *srv, td__http_req_t *r);
/* A libuv code as a TD_E* code (or -errno); 0 stays 0. */
int td__http_err(int uv);

/* Kills the request's id: later calls with it get TD_ENOTFOUND. */
void td__http_req_drop_id(td_http_server_t *srv, td__http_req_t *r);
td__http_req_t *td__http_req_lookup(td_http_server_t *srv, td_http_req_id id);
void td__http_conn_mark_dirty(td__http_conn_t *c);
void td__http_conn_enqueue(td__http_conn_t *c, td__http_req_t *r);
/* Pops finished requests off the head, so responses leave in request order. */
void td__http_conn_advance(td__http_conn_t *c);
/* Ends the connection now (on_abort for what the application holds). */
void td__http_conn_kill(td__http_conn_t *c, td_http_abort_reason_t reason);
/* Drops every request queued after `after` (all of them if NULL). */
void td__http_conn_drop_after(td__http_conn_t *c, td__http_req_t *after);
void td__http_conn_flush(td__http_conn_t *c);
void td__http_conn_timer_update(td__http_conn_t *c);

/* -- engine/http_parse.c: requests in -------------------------------------- */

extern const llhttp_settings_t td__http_settings;
/* Counts what the connection holds now in the server's total. */
void td__http_conn_account(td__http_conn_t *c);
/* Whether a new request may be read now (the memory budgets). */
int td__http_conn_can_parse(td__http_conn_t *c);
void td__http_conn_parse(td__http_conn_t *c, const char *p, size_t n);

/* -- engine/http_respond.c: responses out ---------------------------------- */

/* Server-made responses: errors as {"error":..,"status":..}, healthz. */
void td__http_req_reply_internal(td__http_req_t *r, int status, int close_conn);
/* Runs the response calls other threads queued for the loop. */
void td__http_on_async(uv_async_t *h);

#endif
