/* Tide HTTP ingress: an HTTP/1.1 server (keep-alive, pipelining, chunked
 * streaming, limits) on a libuv loop the caller drives.
 * Uses libuv (uv_tcp, uv_timer, uv_prepare, uv_async) and llhttp (Debian
 * node-llhttp sources, compiled in by engine/http.mk), and td.h for its
 * error codes and byte buffers. Routing is not here:
 * one on_request callback receives every parsed request.
 */
#ifndef TD_HTTP_H
#define TD_HTTP_H

#include <stddef.h>
#include <stdint.h>
#include <uv.h>

#include "td.h"

/* -- Threads, ownership, lifetimes ---------------------------------------
 *
 * A server belongs to one libuv loop and to the thread that runs it (the
 * "loop thread"). td_http_server_new() records the calling thread as the
 * loop thread, so call it on the thread that will run uv_run() on the loop.
 * td_http_server_new/listen/port/stats/close run on the loop thread only,
 * and every callback (on_request, on_abort, close_cb) is called there.
 *
 * Requests are named by a td_http_req_id: a 64-bit number, never 0, never
 * reused by a server. Ids count 1, 2, 3, ... per server, so a Lua number
 * (a double, exact below 2^53) holds every id a server will hand out. Ids may be passed anywhere (other threads, Lua, other
 * processes' replies); a call with an id whose request has finished or been
 * aborted returns TD_ENOTFOUND and does nothing, so late replies are harmless.
 *
 * The response calls (td_http_respond, td_http_stream_start/write/end,
 * td_http_abort) may be called from any thread. On the loop thread they act
 * at once and report errors. From another thread they validate and copy
 * their arguments, queue them for the loop thread (uv_async_send), and
 * return 0; a queued call whose request is gone by the time it runs is
 * dropped (on_abort has told the owner). Calls for one request must come
 * from one thread so that they keep their order. No call may be made once
 * the server's close callback has run.
 *
 * The server never keeps a caller's pointer: headers and bodies passed to
 * the response calls are copied before the call returns.
 *
 * Every request handed to on_request must be finished exactly once by the
 * application: td_http_respond, td_http_stream_end or td_http_abort — unless
 * on_abort reports it first (client gone, response timeout, slow client,
 * server closing). After on_abort the id is dead.
 *
 * Errors are 0 or a negative code (td.h), never a libuv code: TD_ENOTFOUND
 * (no such live request), TD_EINVAL (bad argument, or a call that does not
 * fit the request's state, such as a second respond), TD_ESLOWPEER (the
 * client does not read: its connection was dropped), TD_ECANCELED (the
 * server is closing), TD_ENOMEM. libuv's codes are mapped where libuv is
 * called (td__http_err); one without a TD_E* code of its own stays -errno.
 * td_strerror() names them all.
 */

typedef struct td_http_server td_http_server_t;

/* A request id: 0 is never a valid id. */
typedef uint64_t td_http_req_id;

/* A header: in requests, both strings are NUL-terminated and the lengths are
 * exact; names are lowercased. In responses, a length of 0 means "the string
 * is NUL-terminated" (so {"Content-Type", 0, "text/plain", 0} works). */
typedef struct td_http_header {
  const char *name;  /* field name */
  size_t name_len;   /* its length (responses: 0 = strlen) */
  const char *value; /* field value, surrounding blanks removed */
  size_t value_len;  /* its length (responses: 0 = strlen) */
} td_http_header_t;

#define TD_HTTP_HDR(name, value) {(name), 0, (value), 0}

/* A parsed request, as handed to on_request. The server owns it; it and
 * every string it points to stay valid on the loop thread until the request
 * is finished or aborted. Another thread that handles the request must copy
 * what it needs during on_request. Strings are NUL-terminated. */
typedef struct td_http_request {
  td_http_req_id id;                /* handle for the response calls */
  const char *method;               /* "GET", "POST", ... (static string) */
  const char *path;                 /* target up to '?' ('#'), origin form, not decoded */
  size_t path_len;                  /* its length */
  const char *query;                /* after '?', without it; "" if none */
  size_t query_len;                 /* its length */
  const td_http_header_t *headers;  /* in order received, names lowercased */
  size_t nheaders;                  /* number of headers */
  const char *body;                 /* body bytes (de-chunked), NUL after them */
  size_t body_len;                  /* body length */
  int http_minor;                   /* 0 for HTTP/1.0, 1 for HTTP/1.1 */
  int keep_alive;                   /* 1 if the connection stays open after */
  uint64_t conn_id;                 /* the connection it came on (for logs) */
  char peer[48];                    /* the client's address ("" unknown): who may see what */
} td_http_request_t;

/* Why a request was aborted (on_abort's reason). */
typedef enum td_http_abort_reason {
  TD_HTTP_ABORT_DISCONNECT = 1, /* client closed or reset the connection (a FIN
                                   counts: HTTP/1.1 cannot tell a half-close) */
  TD_HTTP_ABORT_TIMEOUT,        /* no response began in response_timeout_ms; 504 sent */
  TD_HTTP_ABORT_SLOW_CLIENT,    /* output backlog or stalled write: connection dropped */
  TD_HTTP_ABORT_SERVER_CLOSE,   /* td_http_server_close() */
  TD_HTTP_ABORT_CONN_CLOSE      /* an earlier request on the connection ended it */
} td_http_abort_reason_t;

/* Called on the loop thread for every complete request (except /-/healthz,
 * answered by the server). The application must finish it (see above); it
 * may do so inside this callback or any time later, from any thread. */
typedef void (*td_http_request_cb)(td_http_server_t *srv,
                                   const td_http_request_t *req, void *data);

/* Called on the loop thread when a request handed to on_request will never
 * be answered (reason above), so a generator can be cancelled. The id is
 * already dead when it runs; response calls with it return TD_ENOTFOUND. */
typedef void (*td_http_abort_cb)(td_http_server_t *srv, td_http_req_id id,
                                 td_http_abort_reason_t reason, void *data);

/* Called on the loop thread, once per td_http_stream_notify(), when the
 * request's output not yet taken by the client has fallen to the asked
 * level: the application may write more. */
typedef void (*td_http_drain_cb)(td_http_server_t *srv, td_http_req_id id, void *data);

/* One finished request, for an access log (on_log). Strings are valid
 * during the call only and not NUL-terminated unless said. */
typedef struct td_http_log_entry {
  const char *peer;      /* client address, NUL-terminated ("-" unknown) */
  const char *method;    /* NUL-terminated; NULL when no request line was read */
  const char *path;      /* request target up to '?' */
  size_t path_len;       /* its length */
  const char *query;     /* after '?' */
  size_t query_len;      /* its length (0: none) */
  int http_minor;        /* 0 or 1 */
  int status;            /* status sent; 0 when none was (client gone first) */
  uint64_t bytes;        /* body bytes of the response */
  int complete;          /* 0: cut short (stream aborted, connection dropped) */
  uint64_t duration_ms;  /* first request byte to the end of the response */
} td_http_log_entry_t;

/* Called on the loop thread once per request that was read (whole or
 * not) when the server lets go of it: for access logs. */
typedef void (*td_http_log_cb)(td_http_server_t *srv, const td_http_log_entry_t *e, void *data);

/* Called on the loop thread once the server and all its handles are
 * closed; the server's memory is freed right after it returns. */
typedef void (*td_http_close_cb)(td_http_server_t *srv, void *data);

/* Options; a field left 0 takes the default in brackets. */
typedef struct td_http_opts {
  td_http_request_cb on_request; /* required */
  td_http_abort_cb on_abort;     /* optional */
  td_http_drain_cb on_drain;     /* optional: answers td_http_stream_notify */
  td_http_log_cb on_log;         /* optional: every request, when done (access log) */
  void *data;                    /* passed to every callback */
  size_t max_header_bytes;       /* request line + headers [16 KiB]; 431 (414: URL) */
  size_t max_headers;            /* header fields per request [100]; 431 */
  size_t max_body_bytes;         /* request body [1 MiB]; 413 */
  unsigned request_timeout_ms;   /* to receive a whole request [30000]; 408 */
  unsigned keepalive_timeout_ms; /* idle connection closed after [30000] */
  unsigned response_timeout_ms;  /* for the app to begin a response [0: none]; 504 */
  unsigned send_timeout_ms;      /* a write that makes no progress [60000] */
  unsigned max_pipeline;         /* requests in flight per connection [64] */
  size_t max_output_bytes;       /* unsent output per connection [64 MiB] */
  unsigned max_connections;      /* open connections [10000]; more are closed */
  unsigned max_connections_per_client; /* open connections from one address [256];
                                          more are closed, so one client cannot
                                          take every slot */
} td_http_opts_t;

/* Counters, read with td_http_server_stats(). */
typedef struct td_http_stats {
  uint64_t connections;      /* accepted since start */
  uint64_t connections_open; /* open now */
  uint64_t requests;         /* complete requests parsed (incl. healthz) */
  uint64_t responses;        /* responses finished (any status) */
  uint64_t aborted;          /* on_abort calls */
  uint64_t bad_requests;     /* 400: malformed HTTP */
  uint64_t timeouts;         /* 408 sent, or a write stalled past send_timeout_ms */
  uint64_t too_large;        /* 413, 414, 431 */
  uint64_t healthz;          /* /-/healthz answered */
  uint64_t refused;          /* connections closed at once: a connection limit */
} td_http_stats_t;

/* -- Server ------------------------------------------------------------- */

/* Creates a server on `loop`; the calling thread becomes its loop thread.
 * If SIGPIPE still has its default action, it is set to ignored (writes to
 * a reset connection then fail instead of killing the process). `opts` is
 * copied. Returns NULL when memory runs out. The caller owns the
 * result and releases it with td_http_server_close(). */
td_http_server_t *td_http_server_new(uv_loop_t *loop, const td_http_opts_t *opts);

/* Listens on host:port. host NULL means "127.0.0.1" (never all interfaces
 * unless asked: "0.0.0.0" or "::"); port 0 picks a free port (see
 * td_http_server_port). Returns 0, TD_EADDRINUSE, TD_EINVAL (a bad address,
 * or a second listen: a server listens on one address at most) or -errno
 * (-EACCES, -EADDRNOTAVAIL). */
int td_http_server_listen(td_http_server_t *srv, const char *host, int port);

/* The port listened on, or 0 when not listening. */
int td_http_server_port(const td_http_server_t *srv);

/* Copies the counters into *out. */
void td_http_server_stats(const td_http_server_t *srv, td_http_stats_t *out);

/* Stops listening, drops every connection (on_abort with
 * TD_HTTP_ABORT_SERVER_CLOSE for each unfinished request), closes all
 * handles, then calls cb (may be NULL) and frees the server. Call once. */
void td_http_server_close(td_http_server_t *srv, td_http_close_cb cb);

/* -- Responses (any thread) ---------------------------------------------- */

/* Sends a whole response: status 200..599, headers (Content-Length,
 * Transfer-Encoding, Connection and Date are set by the server and ignored
 * if given), body of len bytes (not sent for HEAD, 204, 304). Finishes the
 * request. Responses leave in request order whatever order they are made. */
int td_http_respond(td_http_server_t *srv, td_http_req_id id, int status,
                    const td_http_header_t *headers, size_t nheaders,
                    const void *body, size_t len);

/* Begins a streamed response: chunked transfer encoding on HTTP/1.1, raw
 * bytes then close on HTTP/1.0. For Server-Sent Events pass
 * Content-Type: text/event-stream and write whole events. */
int td_http_stream_start(td_http_server_t *srv, td_http_req_id id, int status,
                         const td_http_header_t *headers, size_t nheaders);

/* Sends one chunk (len 0 does nothing). Chunks are flushed before the loop
 * next waits for I/O. TD_ESLOWPEER: the client has stopped reading and its
 * connection was dropped (on_abort fired). */
int td_http_stream_write(td_http_server_t *srv, td_http_req_id id,
                         const void *data, size_t len);

/* Asks for one on_drain call for this streamed request once its output
 * that the client has not taken yet (everything written before this call
 * included) is at most `low` bytes. A producer that writes, notifies, and
 * waits for on_drain before writing much more paces its stream to the
 * client: memory stays bounded without dropping a slow reader. A request
 * that ends first gets no call; a second notify replaces the first. */
int td_http_stream_notify(td_http_server_t *srv, td_http_req_id id, size_t low);

/* Ends a streamed response and finishes the request. */
int td_http_stream_end(td_http_server_t *srv, td_http_req_id id);

/* Fails a request: before its response began, a 500 is sent; after a
 * stream began, the connection is closed after the partial response so the
 * client sees it truncated. Finishes the request. */
int td_http_abort(td_http_server_t *srv, td_http_req_id id);

/* Writes pending output now instead of in the loop's next prepare phase.
 * Loop thread only. (An application that is not on a libuv loop should not
 * try to pump this server's loop from its own poll(): libuv registers
 * watchers started in callbacks only at its next poll, so a poll() on
 * uv_backend_fd can sleep through a new connection's data. Run the server
 * on its own thread instead: td_http_thread_start + an inbox.) */
void td_http_server_flush(td_http_server_t *srv);

/* -- Inbox: requests handed to another thread ----------------------------
 *
 * For an application whose thread is not the loop thread (the Lua thread
 * of a node, pumped by poll()) — the recommended way to put the server
 * behind Lua: the server's callbacks copy each request
 * and each abort into a queue; td_http_inbox_fd() is readable while the
 * queue is not empty, so it can sit in that thread's poll() set. The
 * application pops events and answers with the response calls above (they
 * accept any thread).
 *
 *   td_http_inbox_t *ib = td_http_inbox_new();
 *   td_http_opts_t o = {.on_request = td_http_inbox_on_request,
 *                       .on_abort = td_http_inbox_on_abort, .data = ib};
 *   td_http_thread_start(&o, NULL, 8000, &th);       // or a loop of yours
 *   ... poll(fd = td_http_inbox_fd(ib)) ...
 *   td_http_event_t *ev;
 *   while ((ev = td_http_inbox_pop(ib))) { ...; td_http_event_free(ev); }
 */
typedef struct td_http_inbox td_http_inbox_t;

typedef enum td_http_event_kind {
  TD_HTTP_EV_REQUEST = 1, /* a new request: ev->req */
  TD_HTTP_EV_ABORT,       /* request ev->id will never be answered: ev->reason */
  TD_HTTP_EV_DRAIN        /* request ev->id drained as td_http_stream_notify asked */
} td_http_event_kind_t;

/* One event, in a single allocation owned by whoever popped it. */
typedef struct td_http_event {
  td_http_event_kind_t kind;     /* what happened */
  td_http_req_id id;             /* the request */
  td_http_abort_reason_t reason; /* TD_HTTP_EV_ABORT: why */
  td_http_request_t req;         /* TD_HTTP_EV_REQUEST: a deep copy (same layout) */
} td_http_event_t;

/* Creates an empty inbox; the caller owns it. NULL when out of memory or
 * out of file descriptors. */
td_http_inbox_t *td_http_inbox_new(void);
/* Frees the inbox and any events left in it; NULLs *ib; idempotent. Only
 * after the server posting into it has closed. */
void td_http_inbox_destroy(td_http_inbox_t **ib);
/* An eventfd, readable while events are queued. Owned by the inbox. */
int td_http_inbox_fd(const td_http_inbox_t *ib);
/* The oldest event, or NULL. Any thread; the caller owns the result. */
td_http_event_t *td_http_inbox_pop(td_http_inbox_t *ib);
void td_http_event_free(td_http_event_t *ev);
/* Callbacks for td_http_opts_t with .data = the inbox. A request that
 * cannot be copied (out of memory) is answered 503 by the callback. */
void td_http_inbox_on_request(td_http_server_t *srv, const td_http_request_t *req,
                              void *inbox);
void td_http_inbox_on_abort(td_http_server_t *srv, td_http_req_id id,
                            td_http_abort_reason_t reason, void *inbox);
void td_http_inbox_on_drain(td_http_server_t *srv, td_http_req_id id, void *inbox);

/* -- A server on a thread of its own ------------------------------------ */

typedef struct td_http_thread td_http_thread_t;

/* Starts a thread with its own loop and a server listening on host:port
 * (as td_http_server_new + _listen); callbacks run on that thread. Returns
 * 0 and the caller owns *out, or a code as td_http_server_listen's (nothing
 * is left running). */
int td_http_thread_start(const td_http_opts_t *opts, const char *host, int port,
                         td_http_thread_t **out);
/* The server, for the response calls (which any thread may make). */
td_http_server_t *td_http_thread_server(td_http_thread_t *t);
/* The port listened on. */
int td_http_thread_port(const td_http_thread_t *t);
/* Closes the server (on_abort for unfinished requests), joins the thread,
 * frees everything; NULLs *t; idempotent. */
void td_http_thread_stop(td_http_thread_t **t);

/* -- Helpers ------------------------------------------------------------- */

/* The value of the first header named `name` (any case), or NULL. */
const char *td_http_request_header(const td_http_request_t *req, const char *name);

/* The reason phrase of a status code ("Not Found"), or "Unknown". */
const char *td_http_status_text(int status);

/* -- Internal: in-memory connections for tests and the fuzzer ------------
 * A virtual connection runs the same parser, queue and writer as a TCP one
 * but hands its output to `sink` instead of a socket. Loop thread only. */
typedef struct td__http_conn td__http_conn_t;
typedef void (*td__http_sink_cb)(void *ud, const char *data, size_t len);
td__http_conn_t *td__http_virt_open(td_http_server_t *srv, td__http_sink_cb sink,
                                    void *ud);
/* Feeds bytes as if read from the socket; len 0 means end of input. */
void td__http_virt_feed(td__http_conn_t *c, const char *data, size_t len);
/* Runs pending flushes (what the loop's prepare phase would do). */
void td__http_virt_flush(td_http_server_t *srv);
/* Drops the connection (on_abort for unfinished requests) and frees it. */
void td__http_virt_close(td__http_conn_t *c);

#endif
