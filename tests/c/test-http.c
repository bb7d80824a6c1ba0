/* HTTP ingress tests: a server on an ephemeral port, its loop on a thread of
 * its own, and a blocking socket client in the test's thread. Each test
 * ends by closing the server and asserting its loop closed with no handles.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE /* memmem */
#endif
#include <arpa/inet.h>
#include <errno.h>
#include <llhttp.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <pthread.h>
#include <stddef.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

#include "http.h"
#include "http_int.h"
#include "test.h"

/* -- Fixture: server thread ---------------------------------------------- */

#define FX_MAX_HELD 256

typedef struct fx fx_t;
typedef void (*fx_handler)(fx_t *fx, td_http_server_t *srv, const td_http_request_t *req);

struct fx {
  uv_loop_t loop;            /* the server's loop, run by th */
  td_http_server_t *srv;     /* the server */
  uv_async_t stop;           /* asks the loop thread to close everything */
  pthread_t th;              /* loop thread */
  td_http_opts_t opts;       /* options (on_request/on_abort filled in) */
  fx_handler handler;        /* the test's application */
  int port;                  /* bound port */
  int loop_close_rc;         /* uv_loop_close() result after the loop ended */
  pthread_mutex_t mu;        /* guards what follows */
  pthread_cond_t cv;         /* signalled on every change */
  int started;               /* server listening */
  int nreq;                  /* requests seen by on_request */
  td_http_req_id held[FX_MAX_HELD]; /* requests kept for later answers */
  char held_path[FX_MAX_HELD][32];  /* their paths */
  int nheld;                 /* how many */
  int naborts;               /* on_abort calls */
  td_http_req_id abort_id;   /* last aborted id */
  int abort_reason;          /* last reason */
  int abort_write_rc;        /* stream_write on the dead id inside on_abort */
  int closed;                /* close callback ran */
};

static void fx_on_request(td_http_server_t *srv, const td_http_request_t *req, void *data) {
  fx_t *fx = data;
  pthread_mutex_lock(&fx->mu);
  fx->nreq++;
  pthread_mutex_unlock(&fx->mu);
  fx->handler(fx, srv, req);
  pthread_cond_broadcast(&fx->cv);
}

static void fx_on_abort(td_http_server_t *srv, td_http_req_id id,
                        td_http_abort_reason_t reason, void *data) {
  fx_t *fx = data;
  int rc = td_http_stream_write(srv, id, "x", 1);
  pthread_mutex_lock(&fx->mu);
  fx->naborts++;
  fx->abort_id = id;
  fx->abort_reason = (int)reason;
  fx->abort_write_rc = rc;
  pthread_cond_broadcast(&fx->cv);
  pthread_mutex_unlock(&fx->mu);
}

static void fx_hold(fx_t *fx, const td_http_request_t *req) {
  pthread_mutex_lock(&fx->mu);
  ASSERT(fx->nheld < FX_MAX_HELD);
  fx->held[fx->nheld] = req->id;
  snprintf(fx->held_path[fx->nheld], sizeof(fx->held_path[0]), "%s", req->path);
  fx->nheld++;
  pthread_mutex_unlock(&fx->mu);
}

static void fx_on_closed(td_http_server_t *srv, void *data) {
  fx_t *fx = data;
  (void)srv;
  fx->closed = 1;
}

static void fx_on_stop(uv_async_t *h) {
  fx_t *fx = h->data;
  td_http_server_close(fx->srv, fx_on_closed);
  uv_close((uv_handle_t *)&fx->stop, NULL);
}

static void *fx_thread(void *arg) {
  fx_t *fx = arg;
  ASSERT_EQ(uv_loop_init(&fx->loop), 0);
  fx->opts.on_request = fx_on_request;
  fx->opts.on_abort = fx_on_abort;
  fx->opts.data = fx;
  fx->srv = td_http_server_new(&fx->loop, &fx->opts);
  ASSERT(fx->srv != NULL);
  ASSERT_EQ(td_http_server_listen(fx->srv, NULL, 0), 0);
  ASSERT_EQ(td_http_server_listen(fx->srv, NULL, 0), TD_EINVAL);
  fx->port = td_http_server_port(fx->srv);
  ASSERT(fx->port > 0);
  ASSERT_EQ(uv_async_init(&fx->loop, &fx->stop, fx_on_stop), 0);
  fx->stop.data = fx;
  pthread_mutex_lock(&fx->mu);
  fx->started = 1;
  pthread_cond_broadcast(&fx->cv);
  pthread_mutex_unlock(&fx->mu);
  uv_run(&fx->loop, UV_RUN_DEFAULT);
  fx->loop_close_rc = uv_loop_close(&fx->loop);
  return NULL;
}

static fx_t *fx_start(fx_handler handler, const td_http_opts_t *opts) {
  fx_t *fx = calloc(1, sizeof(*fx));
  ASSERT(fx);
  if (opts) fx->opts = *opts;
  fx->handler = handler;
  pthread_mutex_init(&fx->mu, NULL);
  pthread_cond_init(&fx->cv, NULL);
  ASSERT_EQ(pthread_create(&fx->th, NULL, fx_thread, fx), 0);
  pthread_mutex_lock(&fx->mu);
  while (!fx->started) pthread_cond_wait(&fx->cv, &fx->mu);
  pthread_mutex_unlock(&fx->mu);
  return fx;
}

/* Closes the server and checks that nothing was left open. */
static void fx_stop(fx_t *fx) {
  uv_async_send(&fx->stop);
  ASSERT_EQ(pthread_join(fx->th, NULL), 0);
  ASSERT(fx->closed);
  ASSERT_EQ(fx->loop_close_rc, 0);
  pthread_mutex_destroy(&fx->mu);
  pthread_cond_destroy(&fx->cv);
  free(fx);
}

/* Waits (at most 5 s) until *counter >= n. */
static int fx_wait(fx_t *fx, const int *counter, int n) {
  struct timespec ts;
  clock_gettime(CLOCK_REALTIME, &ts);
  ts.tv_sec += 5;
  pthread_mutex_lock(&fx->mu);
  int rc = 0;
  while (*counter < n && rc == 0) rc = pthread_cond_timedwait(&fx->cv, &fx->mu, &ts);
  int ok = *counter >= n;
  pthread_mutex_unlock(&fx->mu);
  return ok;
}

static td_http_req_id fx_held_by_path(fx_t *fx, const char *path) {
  td_http_req_id id = 0;
  pthread_mutex_lock(&fx->mu);
  for (int i = 0; i < fx->nheld; i++)
    if (strcmp(fx->held_path[i], path) == 0) id = fx->held[i];
  pthread_mutex_unlock(&fx->mu);
  return id;
}

/* Reads a fixture counter under its lock. */
static int fx_get(fx_t *fx, const int *counter) {
  pthread_mutex_lock(&fx->mu);
  int v = *counter;
  pthread_mutex_unlock(&fx->mu);
  return v;
}

/* -- Client -------------------------------------------------------------- */

typedef struct resp {
  int status;          /* status code */
  char hdrs[4096];     /* "name: value\n" lines, names lowercased */
  size_t hlen;         /* used */
  char body[300000];   /* de-chunked body */
  size_t body_len;     /* used */
  int nchunks;         /* chunk headers seen (incl. the last 0) */
  int keep_alive;      /* llhttp_should_keep_alive */
  int in_value;        /* parser state */
} resp_t;

typedef struct client {
  int fd;                   /* socket */
  char buf[65536];          /* received bytes */
  size_t len;               /* valid */
  size_t off;               /* parsed */
  llhttp_t p;               /* response parser */
  llhttp_settings_t s;      /* its callbacks */
  resp_t *r;                /* response being read */
  int done;                 /* message complete */
} client_t;

static int rc_header_field(llhttp_t *p, const char *at, size_t n) {
  client_t *c = p->data;
  resp_t *r = c->r;
  if (r->in_value) {
    r->hdrs[r->hlen++] = '\n';
    r->in_value = 0;
  }
  for (size_t i = 0; i < n && r->hlen < sizeof(r->hdrs) - 8; i++)
    r->hdrs[r->hlen++] = (char)((at[i] >= 'A' && at[i] <= 'Z') ? at[i] + 32 : at[i]);
  return 0;
}

static int rc_header_value(llhttp_t *p, const char *at, size_t n) {
  client_t *c = p->data;
  resp_t *r = c->r;
  if (!r->in_value) {
    r->hdrs[r->hlen++] = ':';
    r->hdrs[r->hlen++] = ' ';
    r->in_value = 1;
  }
  for (size_t i = 0; i < n && r->hlen < sizeof(r->hdrs) - 8; i++) r->hdrs[r->hlen++] = at[i];
  return 0;
}

static int rc_headers_complete(llhttp_t *p) {
  client_t *c = p->data;
  if (c->r->in_value) c->r->hdrs[c->r->hlen++] = '\n';
  c->r->hdrs[c->r->hlen] = '\0';
  c->r->status = p->status_code;
  return 0;
}

static int rc_body(llhttp_t *p, const char *at, size_t n) {
  client_t *c = p->data;
  ASSERT(c->r->body_len + n < sizeof(c->r->body));
  memcpy(c->r->body + c->r->body_len, at, n);
  c->r->body_len += n;
  c->r->body[c->r->body_len] = '\0';
  return 0;
}

static int rc_chunk_header(llhttp_t *p) {
  client_t *c = p->data;
  c->r->nchunks++;
  return 0;
}

static int rc_message_complete(llhttp_t *p) {
  client_t *c = p->data;
  c->r->keep_alive = llhttp_should_keep_alive(p);
  c->done = 1;
  return HPE_PAUSED;
}

/* A client connecting from source address `from` (NULL: any). */
static client_t *cl_open_from(int port, const char *from) {
  client_t *c = calloc(1, sizeof(*c));
  ASSERT(c);
  c->fd = socket(AF_INET, SOCK_STREAM, 0);
  ASSERT(c->fd >= 0);
  struct timeval tv = {5, 0};
  setsockopt(c->fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
  int one = 1;
  setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
  struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
  sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (from) {
    struct sockaddr_in src = {.sin_family = AF_INET};
    ASSERT_EQ(inet_pton(AF_INET, from, &src.sin_addr), 1);
    ASSERT_EQ(bind(c->fd, (struct sockaddr *)&src, sizeof(src)), 0);
  }
  ASSERT_EQ(connect(c->fd, (struct sockaddr *)&sa, sizeof(sa)), 0);
  llhttp_settings_init(&c->s);
  c->s.on_header_field = rc_header_field;
  c->s.on_header_value = rc_header_value;
  c->s.on_headers_complete = rc_headers_complete;
  c->s.on_body = rc_body;
  c->s.on_chunk_header = rc_chunk_header;
  c->s.on_message_complete = rc_message_complete;
  llhttp_init(&c->p, HTTP_RESPONSE, &c->s);
  c->p.data = c;
  return c;
}

static client_t *cl_open(int port) { return cl_open_from(port, NULL); }

static void cl_close(client_t *c) {
  close(c->fd);
  free(c);
}

static void cl_send(client_t *c, const char *data, size_t n) {
  while (n > 0) {
    ssize_t k = send(c->fd, data, n, MSG_NOSIGNAL);
    ASSERT(k > 0);
    data += k;
    n -= (size_t)k;
  }
}

static void cl_sends(client_t *c, const char *s) { cl_send(c, s, strlen(s)); }

/* Reads one response into *r. Returns 0, or -1 if the connection ended (or
 * 5 s passed) before a whole response arrived. */
static int cl_read(client_t *c, resp_t *r) {
  memset(r, 0, offsetof(resp_t, body));
  r->body_len = 0;
  r->body[0] = '\0';
  c->r = r;
  c->done = 0;
  for (;;) {
    if (c->off < c->len) {
      llhttp_errno_t e = llhttp_execute(&c->p, c->buf + c->off, c->len - c->off);
      if (e == HPE_PAUSED) {
        c->off = (size_t)(llhttp_get_error_pos(&c->p) - c->buf);
        llhttp_resume(&c->p);
        return 0;
      }
      if (e != HPE_OK) return -1;
      c->off = c->len = 0;
    }
    ssize_t k = recv(c->fd, c->buf, sizeof(c->buf), 0);
    if (k <= 0) {
      if (k == 0) (void)llhttp_finish(&c->p); /* ends a close-delimited body */
      if (c->done) return 0;
      return -1;
    }
    c->len = (size_t)k;
    c->off = 0;
  }
}

/* 1 when the server has closed the connection (EOF within 5 s). */
static int cl_eof(client_t *c) {
  char b[256];
  if (c->off < c->len) return 0;
  for (;;) {
    ssize_t k = recv(c->fd, b, sizeof(b), 0);
    if (k == 0) return 1;
    if (k < 0) return errno == ECONNRESET;
    /* stray bytes: not expected */
    return 0;
  }
}

static int has_header(const resp_t *r, const char *line) {
  return strstr(r->hdrs, line) != NULL;
}

/* -- Handlers ------------------------------------------------------------ */

/* /hello -> "hello"; /echo -> the body; /stream -> 3 chunks; /hold/... kept. */
static void app_basic(fx_t *fx, td_http_server_t *srv, const td_http_request_t *req) {
  static const td_http_header_t ct[] = {TD_HTTP_HDR("Content-Type", "text/plain")};
  if (strncmp(req->path, "/hold", 5) == 0) {
    fx_hold(fx, req);
    return;
  }
  if (strcmp(req->path, "/hello") == 0) {
    ASSERT_EQ(td_http_respond(srv, req->id, 200, ct, 1, "hello", 5), 0);
  } else if (strcmp(req->path, "/echo") == 0) {
    const char *t = td_http_request_header(req, "Content-Type");
    td_http_header_t h[] = {{"Content-Type", 0, t ? t : "application/octet-stream", 0}};
    ASSERT_EQ(td_http_respond(srv, req->id, 200, h, 1, req->body, req->body_len), 0);
  } else if (strcmp(req->path, "/stream") == 0) {
    ASSERT_EQ(td_http_stream_start(srv, req->id, 200, ct, 1), 0);
    ASSERT_EQ(td_http_stream_write(srv, req->id, "one", 3), 0);
    ASSERT_EQ(td_http_stream_write(srv, req->id, "", 0), 0);
    ASSERT_EQ(td_http_stream_write(srv, req->id, "two", 3), 0);
    ASSERT_EQ(td_http_stream_write(srv, req->id, "three", 5), 0);
    ASSERT_EQ(td_http_stream_end(srv, req->id), 0);
    ASSERT_EQ(td_http_stream_end(srv, req->id), TD_ENOTFOUND);
  } else if (strcmp(req->path, "/info") == 0) {
    char b[512];
    const char *x = td_http_request_header(req, "x-test");
    int n = snprintf(b, sizeof(b), "%s|%s|%s|%s|%zu|%d", req->method, req->path, req->query,
                     x ? x : "-", req->nheaders, req->http_minor);
    ASSERT_EQ(td_http_respond(srv, req->id, 200, NULL, 0, b, (size_t)n), 0);
  } else if (strcmp(req->path, "/nocontent") == 0) {
    ASSERT_EQ(td_http_respond(srv, req->id, 204, NULL, 0, "zzz", 3), 0);
  } else {
    ASSERT_EQ(td_http_respond(srv, req->id, 404, NULL, 0, "no", 2), 0);
  }
}

/* -- Tests --------------------------------------------------------------- */

TEST_IMPL(http_get) {
  fx_t *fx = fx_start(app_basic, NULL);
  client_t *c = cl_open(fx->port);
  resp_t *r = malloc(sizeof(*r));
  cl_sends(c, "GET /info?x=1&y=%20 HTTP/1.1\r\nHost: t\r\nX-Test:  abc  \r\n\r\n");
  ASSERT_EQ(cl_read(c, r), 0);
  ASSERT_EQ(r->status, 200);
  ASSERT(strcmp(r->body, "GET|/info|x=1&y=%20|abc|2|1") == 0);
  ASSERT(has_header(r, "content-length: 27\n"));
  ASSERT(has_header(r, "date: "));
  ASSERT(r->keep_alive);
  /* An absolute-form target and a fragment. */
  cl_sends(c, "GET http://h:1/info?q#frag HTTP/1.1\r\n\r\n");
  ASSERT_EQ(cl_read(c, r), 0);
  ASSERT(strcmp(r->body, "GET|/info|q|-|0|1") == 0);
  cl_sends(c, "GET /hello HTTP/1.1\r\n\r\n");
  ASSERT_EQ(cl_read(c, r), 0);
  ASSERT(strcmp(r->body, "hello") == 0);
  ASSERT(has_header(r, "content-type: text/plain\n"));
  cl_sends(c, "GET /missing HTTP/1.1\r\n\r\n");
  ASSERT_EQ(cl_read(c, r), 0);
  ASSERT_EQ(r->status, 404);
  cl_close(c);
  free(r);
  fx_stop(fx);
  return 0;
}

TEST_IMPL(http_post_body) {
  td_http_opts_t o = {.max_body_bytes = 200000};
  fx_t *fx = fx_start(app_basic, &o);
  client_t *c = cl_open(fx->port);
  resp_t *r = malloc(sizeof(*r));
  size_t n = 150000;
  char *body = malloc(n);
  for (size_t i = 0; i < n; i++) body[i] = (char)('a' + i % 26);
  char head[256];
  snprintf(head, sizeof(head),
           "POST /echo HTTP/1.1\r\nContent-Type: application/json\r\nContent-Length: %zu\r\n\r\n", n);
  cl_sends(c, head);
  cl_send(c, body, n);
  ASSERT_EQ(cl_read(c, r), 0);
  ASSERT_EQ(r->status, 200);
  ASSERT_EQ(r->body_len, n);
  ASSERT(memcmp(r->body, body, n) == 0);
  ASSERT(has_header(r, "content-type: application/json\n"));
  /* A chunked request body is de-chunked. */
  cl_sends(c, "POST /echo HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
              "5\r\nhello\r\n7;x=y\r\n, world\r\n0\r\nX-Trailer: t\r\n\r\n");
  ASSERT_EQ(cl_read(c, r), 0);
  ASSERT(strcmp(r->body, "hello, world") == 0);
  /* Expect: 100-continue gets an interim 100 before the body is sent. */
  cl_sends(c, "PUT /echo HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 4\r\n\r\n");
  ASSERT_EQ(cl_read(c, r), 0);
  ASSERT_EQ(r->status, 100);
  cl_sends(c, "abcd");
  ASSERT_EQ(cl_read(c, r), 0);
  ASSERT_EQ(r->status, 200);
  ASSERT(strcmp(r->body, "abcd") == 0);
  cl_close(c);
  free(body);
  free(r);
  fx_stop(fx);
  return 0;
}

TEST_IMPL(http_keepalive) {
  fx_t *fx = fx_start(app_basic, NULL);
  client_t *c = cl_open(fx->port);
  resp_t *r = malloc(sizeof(*r));
  for (int i = 0; i < 20; i++) {
    cl_sends(c, i % 2 ? "GET /hello HTTP/1.1\r\nHost: x\r\n\r\n"
                      : "POST /echo HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc");
    ASSERT_EQ(cl_read(c, r), 0);
    ASSERT_EQ(r->status, 200);
    ASSERT(strcmp(r->body, i % 2 ? "hello" : "abc") == 0);
    ASSERT(r->keep_alive);
  }
  ASSERT_EQ(fx_get(fx, &fx->nreq), 20);
  /* Connection: close is honoured: the response says so, then EOF. */
  cl_sends(c, "GET /hello HTTP/1.1\r\nConnection: close\r\n\r\n");
  ASSERT_EQ(cl_read(c, r), 0);
  ASSERT(has_header(r, "connection: close\n"));
  ASSERT(cl_eof(c));
  cl_close(c);
  /* HTTP/1.0 keep-alive only when asked. */
  c = cl_open(fx->port);
  cl_sends(c, "GET /hello HTTP/1.0\r\nConnection: keep-alive\r\n\r\n");
  ASSERT_EQ(cl_read(c, r), 0);
  ASSERT(has_header(r, "connection: keep-alive\n"));
  cl_sends(c, "GET /hello HTTP/1.0\r\n\r\n");
  ASSERT_EQ(cl_read(c, r), 0);
  ASSERT(strcmp(r->body, "hello") == 0);
  ASSERT(cl_eof(c));
  cl_close(c);
  free(r);
  fx_stop(fx);
  return 0;
}

TEST_IMPL(http_pipeline_order) {
  fx_t *fx = fx_start(app_basic, NULL);
  client_t *c = cl_open(fx->port);
  resp_t *r = malloc(sizeof(*r));
  /* Five requests in one write; /hold/1 and /hold/2 are answered last, from
   * this thread (the cross-thread path), in reverse order. */
  cl_sends(c,
           "GET /hold/1 HTTP/1.1\r\n\r\n"
           "GET /hello HTTP/1.1\r\n\r\n"
           "GET /hold/2 HTTP/1.1\r\n\r\n"
           "POST /echo HTTP/1.1\r\nContent-Length: 4\r\n\r\nbody"
           "GET /stream HTTP/1.1\r\n\r\n");
  ASSERT(fx_wait(fx, &fx->nreq, 5));
  td_http_req_id h1 = fx_held_by_path(fx, "/hold/1"), h2 = fx_held_by_path(fx, "/hold/2");
  ASSERT(h1 && h2 && h1 != h2);
  ASSERT_EQ(td_http_stream_start(fx->srv, h2, 200, NULL, 0), 0);
  ASSERT_EQ(td_http_stream_write(fx->srv, h2, "late-2", 6), 0);
  ASSERT_EQ(td_http_stream_end(fx->srv, h2), 0);
  usleep(50000); /* nothing may be sent before /hold/1 is answered */
  char peek;
  ASSERT_EQ(recv(c->fd, &peek, 1, MSG_PEEK | MSG_DONTWAIT), -1);
  static const td_http_header_t h[] = {TD_HTTP_HDR("X-Late", "yes")};
  ASSERT_EQ(td_http_respond(fx->srv, h1, 200, h, 1, "late-1", 6), 0);
  const char *want[] = {"late-1", "hello", "late-2", "body", "onetwothree"};
  for (int i = 0; i < 5; i++) {
    ASSERT_EQ(cl_read(c, r), 0);
    ASSERT_EQ(r->status, 200);
    ASSERT(strcmp(r->body, want[i]) == 0);
  }
  cl_close(c);
  free(r);
  fx_stop(fx);
  return 0;
}

/* Pipelined requests with large bodies are read only while the connection
 * holds less than its byte budget (4 MiB), however many fit the pipeline. */
typedef struct sender {
  int fd;          /* where to send */
  const char *p;   /* one request */
  size_t n;        /* its length */
  int times;       /* how many times */
} sender_t;

static void *sender_main(void *arg) {
  sender_t *s = arg;
  for (int i = 0; i < s->times; i++) {
    size_t off = 0;
    while (off < s->n) {
      ssize_t k = send(s->fd, s->p + off, s->n - off, MSG_NOSIGNAL);
      if (k <= 0) return NULL; /* the test closed the socket */
      off += (size_t)k;
    }
  }
  return NULL;
}

/* One POST /hold/x request with a 1 MiB body, never answered by app_basic. */
static char *hold_request(size_t *len) {
  size_t body = 1u << 20;
  char head[128];
  int hl = snprintf(head, sizeof(head), "POST /hold/x HTTP/1.1\r\nContent-Length: %zu\r\n\r\n", body);
  char *one = malloc((size_t)hl + body);
  memcpy(one, head, (size_t)hl);
  memset(one + hl, 'b', body);
  *len = (size_t)hl + body;
  return one;
}

TEST_IMPL(http_pipeline_bytes) {
  fx_t *fx = fx_start(app_basic, NULL);
  client_t *c = cl_open(fx->port);
  size_t len;
  char *one = hold_request(&len);
  /* 20 requests of 1 MiB from a thread (the server stops reading them, so
   * a blocking send from here would not return). */
  sender_t s = {c->fd, one, len, 20};
  pthread_t th;
  ASSERT_EQ(pthread_create(&th, NULL, sender_main, &s), 0);
  ASSERT(fx_wait(fx, &fx->nreq, 1));
  usleep(300000);
  int n = fx_get(fx, &fx->nreq);
  ASSERT(n >= 1 && n <= 5); /* not 20: reading paused at the budget */
  shutdown(c->fd, SHUT_RDWR);
  pthread_join(th, NULL);
  free(one);
  cl_close(c);
  fx_stop(fx);
  return 0;
}

/* Connections together hold at most 64 MiB of pipelined requests: past
 * it, a connection with a request queued reads no more, while one with
 * none still gets its request read and answered. Here 40 connections each
 * pipeline 20 requests of 1 MiB that are never answered (alone, each
 * would have 4 or 5 read). */
TEST_IMPL(http_pipeline_bytes_server) {
  enum { NC = 40 };
  fx_t *fx = fx_start(app_basic, NULL);
  size_t len;
  char *one = hold_request(&len);
  client_t *c[NC];
  sender_t s[NC];
  pthread_t th[NC];
  for (int i = 0; i < NC; i++) {
    c[i] = cl_open(fx->port);
    s[i] = (sender_t){c[i]->fd, one, len, 20};
    ASSERT_EQ(pthread_create(&th[i], NULL, sender_main, &s[i]), 0);
  }
  ASSERT(fx_wait(fx, &fx->nreq, NC)); /* every connection got one in */
  usleep(500000);
  int n = fx_get(fx, &fx->nreq);
  ASSERT(n >= NC && n <= 64 + NC); /* not 160 and more */
  client_t *g = cl_open(fx->port);
  resp_t *r = malloc(sizeof(*r));
  cl_sends(g, "GET /hello HTTP/1.1\r\n\r\n");
  ASSERT_EQ(cl_read(g, r), 0);
  ASSERT_EQ(r->status, 200);
  ASSERT(strcmp(r->body, "hello") == 0);
  for (int i = 0; i < NC; i++) shutdown(c[i]->fd, SHUT_RDWR);
  for (int i = 0; i < NC; i++) {
    pthread_join(th[i], NULL);
    cl_close(c[i]);
  }
  cl_close(g);
  free(r);
  free(one);
  fx_stop(fx);
  return 0;
}

TEST_IMPL(http_pipeline_limit) {
  td_http_opts_t o = {.max_pipeline = 2};
  fx_t *fx = fx_start(app_basic, &o);
  client_t *c = cl_open(fx->port);
  resp_t *r = malloc(sizeof(*r));
  char req[4096] = "GET /hold/a HTTP/1.1\r\n\r\n";
  for (int i = 0; i < 30; i++) strcat(req, "GET /hello HTTP/1.1\r\n\r\n");
  cl_sends(c, req);
  ASSERT(fx_wait(fx, &fx->nreq, 2));
  usleep(50000);
  ASSERT_EQ(fx_get(fx, &fx->nreq), 2); /* parsing paused: the head is owed */
  ASSERT_EQ(td_http_respond(fx->srv, fx_held_by_path(fx, "/hold/a"), 200, NULL, 0, "a", 1), 0);
  ASSERT_EQ(cl_read(c, r), 0);
  ASSERT(strcmp(r->body, "a") == 0);
  for (int i = 0; i < 30; i++) {
    ASSERT_EQ(cl_read(c, r), 0);
    ASSERT(strcmp(r->body, "hello") == 0);
  }
  ASSERT_EQ(fx_get(fx, &fx->nreq), 31);
  cl_close(c);
  free(r);
  fx_stop(fx);
  return 0;
}

/* Streams from this thread with pauses: chunks must arrive one by one. */
TEST_IMPL(http_stream_chunked) {
  fx_t *fx = fx_start(app_basic, NULL);
  client_t *c = cl_open(fx->port);
  resp_t *r = malloc(sizeof(*r));
  cl_sends(c, "GET /stream HTTP/1.1\r\n\r\n");
  ASSERT_EQ(cl_read(c, r), 0);
  ASSERT(has_header(r, "transfer-encoding: chunked\n"));
  ASSERT(strcmp(r->body, "onetwothree") == 0);
  ASSERT_EQ(r->nchunks, 4);

  cl_sends(c, "GET /hold/sse HTTP/1.1\r\n\r\n");
  ASSERT(fx_wait(fx, &fx->nheld, 1));
  td_http_req_id id = fx->held[0];
  static const td_http_header_t h[] = {TD_HTTP_HDR("Content-Type", "text/event-stream")};
  ASSERT_EQ(td_http_stream_start(fx->srv, id, 200, h, 1), 0);
  char buf[512] = "";
  size_t got = 0;
  for (int i = 0; i < 3; i++) {
    char ev[32];
    int n = snprintf(ev, sizeof(ev), "data: %d\n\n", i);
    ASSERT_EQ(td_http_stream_write(fx->srv, id, ev, (size_t)n), 0);
    /* The chunk arrives without the stream ending. */
    while (!strstr(buf, ev)) {
      ssize_t k = recv(c->fd, buf + got, sizeof(buf) - got - 1, 0);
      ASSERT(k > 0);
      got += (size_t)k;
      buf[got] = '\0';
    }
  }
  ASSERT(strstr(buf, "text/event-stream") != NULL);
  ASSERT(strstr(buf, "0\r\n\r\n") == NULL);
  ASSERT_EQ(td_http_stream_end(fx->srv, id), 0);
  while (!strstr(buf, "\r\n0\r\n\r\n")) {
    ssize_t k = recv(c->fd, buf + got, sizeof(buf) - got - 1, 0);
    ASSERT(k > 0);
    got += (size_t)k;
    buf[got] = '\0';
  }
  cl_close(c);

  /* HTTP/1.0: raw bytes, ended by the close. */
  c = cl_open(fx->port);
  cl_sends(c, "GET /stream HTTP/1.0\r\nConnection: keep-alive\r\n\r\n");
  ASSERT_EQ(cl_read(c, r), 0);
  ASSERT(strcmp(r->body, "onetwothree") == 0);
  ASSERT(!has_header(r, "transfer-encoding"));
  ASSERT(has_header(r, "connection: close\n"));
  cl_close(c);
  free(r);
  fx_stop(fx);
  return 0;
}

TEST_IMPL(http_head_nocontent) {
  fx_t *fx = fx_start(app_basic, NULL);
  client_t *c = cl_open(fx->port);
  resp_t *r = malloc(sizeof(*r));
  /* HEAD: the length of the GET body, no body; the next response must
   * still frame correctly. */
  cl_sends(c, "HEAD /hello HTTP/1.1\r\n\r\nGET /nocontent HTTP/1.1\r\n\r\nGET /hello HTTP/1.1\r\n\r\n");
  char buf[2048];
  size_t got = 0;
  while (got < sizeof(buf) - 1) {
    ssize_t k = recv(c->fd, buf + got, sizeof(buf) - 1 - got, 0);
    ASSERT(k > 0);
    got += (size_t)k;
    buf[got] = '\0';
    if (strstr(buf, "\r\n\r\nhello")) break;
  }
  ASSERT(strncmp(buf, "HTTP/1.1 200 OK\r\n", 17) == 0);
  ASSERT(strstr(buf, "Content-Length: 5\r\n\r\nHTTP/1.1 204 No Content\r\n") != NULL);
  char *p = strstr(buf, "204 No Content");
  char *end = strstr(p, "\r\n\r\n");
  ASSERT(end && strncmp(end + 4, "HTTP/1.1 200 OK", 15) == 0);
  ASSERT(strstr(p, "zzz") == NULL);
  ASSERT(memmem(p, (size_t)(end - p), "Content-Length", 14) == NULL);
  cl_close(c);
  free(r);
  fx_stop(fx);
  return 0;
}

TEST_IMPL(http_limits) {
  td_http_opts_t o = {.max_header_bytes = 1024, .max_body_bytes = 1000, .max_headers = 10};
  fx_t *fx = fx_start(app_basic, &o);
  resp_t *r = malloc(sizeof(*r));
  char *big = malloc(8192);

  /* Header too large -> 431, then close. */
  client_t *c = cl_open(fx->port);
  snprintf(big, 8192, "GET /hello HTTP/1.1\r\nX-Big: %02000d\r\n\r\n", 7);
  cl_sends(c, big);
  ASSERT_EQ(cl_read(c, r), 0);
  ASSERT_EQ(r->status, 431);
  ASSERT(strstr(r->body, "\"status\":431") != NULL);
  ASSERT(has_header(r, "connection: close\n"));
  ASSERT(has_header(r, "content-type: application/json\n"));
  ASSERT(cl_eof(c));
  cl_close(c);

  /* Too many header fields -> 431. */
  c = cl_open(fx->port);
  strcpy(big, "GET /hello HTTP/1.1\r\n");
  for (int i = 0; i < 12; i++) strcat(big, "A: b\r\n");
  strcat(big, "\r\n");
  cl_sends(c, big);
  ASSERT_EQ(cl_read(c, r), 0);
  ASSERT_EQ(r->status, 431);
  cl_close(c);

  /* Target too long -> 414. */
  c = cl_open(fx->port);
  snprintf(big, 8192, "GET /%02000d HTTP/1.1\r\n\r\n", 1);
  cl_sends(c, big);
  ASSERT_EQ(cl_read(c, r), 0);
  ASSERT_EQ(r->status, 414);
  cl_close(c);

  /* Declared body too large -> 413 at once, before the body is sent. */
  c = cl_open(fx->port);
  cl_sends(c, "POST /echo HTTP/1.1\r\nContent-Length: 1000000\r\n\r\n");
  ASSERT_EQ(cl_read(c, r), 0);
  ASSERT_EQ(r->status, 413);
  ASSERT(cl_eof(c));
  cl_close(c);

  /* Chunked body growing past the limit -> 413; an earlier pipelined
   * request on the same connection is still answered first. */
  c = cl_open(fx->port);
  cl_sends(c, "GET /hello HTTP/1.1\r\n\r\nPOST /echo HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n");
  for (int i = 0; i < 3; i++) {
    snprintf(big, 8192, "1f4\r\n%0500d\r\n", i);
    cl_sends(c, big);
  }
  ASSERT_EQ(cl_read(c, r), 0);
  ASSERT_EQ(r->status, 200);
  ASSERT_EQ(cl_read(c, r), 0);
  ASSERT_EQ(r->status, 413);
  cl_close(c);
  /* The application never saw the oversize requests. */
  ASSERT_EQ(fx_get(fx, &fx->nreq), 1);
  free(big);
  free(r);
  fx_stop(fx);
  return 0;
}

TEST_IMPL(http_malformed) {
  fx_t *fx = fx_start(app_basic, NULL);
  resp_t *r = malloc(sizeof(*r));
  const char *bad[] = {
      "GARBAGE\r\n\r\n",
      "GET / HTTP/1.1\r\nContent-Length: abc\r\n\r\n",
      "GET / HTTP/1.1\r\nBad Header\r\n\r\n",
      "GET / HTTP/1.1\r\n: empty-name\r\n\r\n",
      "POST / HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
      "GET / HTTP/9.9\r\n\r\n",
      "CONNECT example.com:443 HTTP/1.1\r\n\r\n",
      "\x01\x02\x03\x04",
  };
  for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
    client_t *c = cl_open(fx->port);
    cl_sends(c, bad[i]);
    ASSERT_EQ(cl_read(c, r), 0);
    ASSERT(r->status == 400 || r->status == 405 || r->status == 505);
    ASSERT(has_header(r, "connection: close\n"));
    ASSERT(cl_eof(c));
    cl_close(c);
  }
  /* Good request, then garbage, on one connection: 200 then 400. */
  client_t *c = cl_open(fx->port);
  cl_sends(c, "GET /hello HTTP/1.1\r\n\r\nGET /hello HTTP/1.1\r\nX\x01Y: z\r\n\r\n");
  ASSERT_EQ(cl_read(c, r), 0);
  ASSERT_EQ(r->status, 200);
  ASSERT_EQ(cl_read(c, r), 0);
  ASSERT_EQ(r->status, 400);
  ASSERT(cl_eof(c));
  cl_close(c);
  ASSERT_EQ(fx_get(fx, &fx->nreq), 1);
  /* The server still serves. */
  c = cl_open(fx->port);
  cl_sends(c, "GET /hello HTTP/1.1\r\n\r\n");
  ASSERT_EQ(cl_read(c, r), 0);
  ASSERT_EQ(r->status, 200);
  cl_close(c);
  free(r);
  fx_stop(fx);
  return 0;
}

TEST_IMPL(http_disconnect) {
  fx_t *fx = fx_start(app_basic, NULL);
  client_t *c = cl_open(fx->port);
  cl_sends(c, "GET /hold/gen HTTP/1.1\r\n\r\n");
  ASSERT(fx_wait(fx, &fx->nheld, 1));
  td_http_req_id id = fx->held[0];
  ASSERT_EQ(td_http_stream_start(fx->srv, id, 200, NULL, 0), 0);
  ASSERT_EQ(td_http_stream_write(fx->srv, id, "tok", 3), 0);
  cl_close(c); /* the client goes away mid-stream */
  ASSERT(fx_wait(fx, &fx->naborts, 1));
  ASSERT_EQ(fx->abort_id, id);
  ASSERT_EQ(fx->abort_reason, TD_HTTP_ABORT_DISCONNECT);
  ASSERT_EQ(fx->abort_write_rc, TD_ENOTFOUND);
  /* Late calls from this thread are accepted and dropped. */
  ASSERT_EQ(td_http_stream_write(fx->srv, id, "more", 4), 0);
  ASSERT_EQ(td_http_stream_end(fx->srv, id), 0);

  /* A request not yet answered is aborted too. */
  c = cl_open(fx->port);
  cl_sends(c, "POST /hold/x HTTP/1.1\r\nContent-Length: 1\r\n\r\nz");
  ASSERT(fx_wait(fx, &fx->nheld, 2));
  cl_close(c);
  ASSERT(fx_wait(fx, &fx->naborts, 2));
  ASSERT_EQ(fx->abort_id, fx->held[1]);

  /* The server closing aborts what it holds. */
  c = cl_open(fx->port);
  cl_sends(c, "GET /hold/y HTTP/1.1\r\n\r\n");
  ASSERT(fx_wait(fx, &fx->nheld, 3));
  td_http_req_id last = fx->held[2];
  uv_async_send(&fx->stop);
  ASSERT_EQ(pthread_join(fx->th, NULL), 0);
  ASSERT_EQ(fx_get(fx, &fx->naborts), 3);
  ASSERT_EQ(fx->abort_id, last);
  ASSERT_EQ(fx->abort_reason, TD_HTTP_ABORT_SERVER_CLOSE);
  ASSERT(fx->closed);
  ASSERT_EQ(fx->loop_close_rc, 0);
  cl_close(c);
  free(fx);
  return 0;
}

TEST_IMPL(http_timeouts) {
  td_http_opts_t o = {.request_timeout_ms = 150, .keepalive_timeout_ms = 150,
                      .response_timeout_ms = 150};
  fx_t *fx = fx_start(app_basic, &o);
  resp_t *r = malloc(sizeof(*r));
  /* A request that never completes -> 408, close. */
  client_t *c = cl_open(fx->port);
  cl_sends(c, "GET /hello HTTP/1.1\r\nHost: slow");
  ASSERT_EQ(cl_read(c, r), 0);
  ASSERT_EQ(r->status, 408);
  ASSERT(cl_eof(c));
  cl_close(c);
  /* An idle keep-alive connection is closed quietly. */
  c = cl_open(fx->port);
  cl_sends(c, "GET /hello HTTP/1.1\r\n\r\n");
  ASSERT_EQ(cl_read(c, r), 0);
  ASSERT_EQ(r->status, 200);
  ASSERT(cl_eof(c));
  cl_close(c);
  /* The application never answers -> 504 and on_abort(TIMEOUT); the
   * connection stays usable. */
  c = cl_open(fx->port);
  cl_sends(c, "GET /hold/z HTTP/1.1\r\n\r\n");
  ASSERT_EQ(cl_read(c, r), 0);
  ASSERT_EQ(r->status, 504);
  ASSERT(fx_wait(fx, &fx->naborts, 1));
  ASSERT_EQ(fx->abort_reason, TD_HTTP_ABORT_TIMEOUT);
  ASSERT_EQ(td_http_respond(fx->srv, fx->held[0], 200, NULL, 0, "late", 4), 0); /* dropped */
  cl_sends(c, "GET /hello HTTP/1.1\r\n\r\n");
  ASSERT_EQ(cl_read(c, r), 0);
  ASSERT_EQ(r->status, 200);
  ASSERT(strcmp(r->body, "hello") == 0);
  cl_close(c);
  free(r);
  fx_stop(fx);
  return 0;
}

/* Answers from the loop thread with bad arguments, abort, healthz. */
static void app_api(fx_t *fx, td_http_server_t *srv, const td_http_request_t *req) {
  static const td_http_header_t crlf[] = {TD_HTTP_HDR("X-A", "1\r\nSet-Cookie: evil")};
  static const td_http_header_t badname[] = {TD_HTTP_HDR("X A", "1")};
  static const td_http_header_t own[] = {TD_HTTP_HDR("Content-Length", "999"),
                                         TD_HTTP_HDR("X-Own", "kept")};
  (void)fx;
  ASSERT_EQ(td_http_respond(srv, req->id, 99, NULL, 0, NULL, 0), TD_EINVAL);
  ASSERT_EQ(td_http_respond(srv, req->id, 600, NULL, 0, NULL, 0), TD_EINVAL);
  ASSERT_EQ(td_http_respond(srv, req->id, 200, crlf, 1, NULL, 0), TD_EINVAL);
  ASSERT_EQ(td_http_respond(srv, req->id, 200, badname, 1, NULL, 0), TD_EINVAL);
  ASSERT_EQ(td_http_stream_write(srv, req->id, "x", 1), TD_EINVAL);
  ASSERT_EQ(td_http_stream_end(srv, req->id), TD_EINVAL);
  ASSERT_EQ(td_http_respond(srv, req->id + 1, 200, NULL, 0, NULL, 0), TD_ENOTFOUND);
  ASSERT_EQ(td_http_respond(srv, 0, 200, NULL, 0, NULL, 0), TD_ENOTFOUND);
  if (strcmp(req->path, "/abort") == 0) {
    ASSERT_EQ(td_http_abort(srv, req->id), 0);
  } else if (strcmp(req->path, "/abort-stream") == 0) {
    ASSERT_EQ(td_http_stream_start(srv, req->id, 200, NULL, 0), 0);
    ASSERT_EQ(td_http_respond(srv, req->id, 200, NULL, 0, NULL, 0), TD_EINVAL);
    ASSERT_EQ(td_http_stream_write(srv, req->id, "partial", 7), 0);
    ASSERT_EQ(td_http_abort(srv, req->id), 0);
  } else {
    ASSERT_EQ(td_http_respond(srv, req->id, 201, own, 2, "ok", 2), 0);
  }
  ASSERT_EQ(td_http_respond(srv, req->id, 200, NULL, 0, NULL, 0), TD_ENOTFOUND);
  ASSERT_EQ(td_http_abort(srv, req->id), TD_ENOTFOUND);
}

TEST_IMPL(http_api_misuse) {
  fx_t *fx = fx_start(app_api, NULL);
  resp_t *r = malloc(sizeof(*r));
  client_t *c = cl_open(fx->port);
  cl_sends(c, "GET /x HTTP/1.1\r\n\r\n");
  ASSERT_EQ(cl_read(c, r), 0);
  ASSERT_EQ(r->status, 201);
  ASSERT(has_header(r, "content-length: 2\n"));
  ASSERT(has_header(r, "x-own: kept\n"));
  ASSERT(!has_header(r, "999"));
  /* abort before the response began: 500, connection kept. */
  cl_sends(c, "GET /abort HTTP/1.1\r\n\r\n");
  ASSERT_EQ(cl_read(c, r), 0);
  ASSERT_EQ(r->status, 500);
  ASSERT(r->keep_alive);
  /* healthz is answered by the server, not the application. */
  int before = fx_get(fx, &fx->nreq);
  cl_sends(c, "GET /-/healthz HTTP/1.1\r\n\r\n");
  ASSERT_EQ(cl_read(c, r), 0);
  ASSERT_EQ(r->status, 200);
  ASSERT(strcmp(r->body, "{\"status\":\"ok\"}\n") == 0);
  ASSERT_EQ(fx_get(fx, &fx->nreq), before);
  /* abort after a stream began: the client sees a truncated body. */
  cl_sends(c, "GET /abort-stream HTTP/1.1\r\n\r\n");
  ASSERT_EQ(cl_read(c, r), -1);
  ASSERT(strcmp(r->body, "partial") == 0);
  cl_close(c);
  free(r);
  fx_stop(fx);
  return 0;
}

/* Many clients at once, each keep-alive with pipelining, answered from a
 * thread that is not the loop thread. */
static void app_offthread(fx_t *fx, td_http_server_t *srv, const td_http_request_t *req) {
  (void)srv;
  fx_hold(fx, req);
}

typedef struct {
  fx_t *fx;    /* fixture */
  int stop;    /* set by the test */
  int answered;/* responses sent */
} answerer_t;

static void *answer_thread(void *arg) {
  answerer_t *a = arg;
  while (!__atomic_load_n(&a->stop, __ATOMIC_ACQUIRE)) {
    td_http_req_id ids[FX_MAX_HELD];
    char paths[FX_MAX_HELD][32];
    pthread_mutex_lock(&a->fx->mu);
    int n = a->fx->nheld;
    memcpy(ids, a->fx->held, sizeof(ids[0]) * (size_t)n);
    memcpy(paths, a->fx->held_path, sizeof(paths[0]) * (size_t)n);
    a->fx->nheld = 0;
    pthread_mutex_unlock(&a->fx->mu);
    /* Newest first: the server must restore request order. */
    for (int i = n - 1; i >= 0; i--) {
      ASSERT_EQ(td_http_respond(a->fx->srv, ids[i], 200, NULL, 0, paths[i], strlen(paths[i])), 0);
      a->answered++;
    }
    if (!n) usleep(200);
  }
  return NULL;
}

TEST_IMPL(http_many_clients_offthread) {
  fx_t *fx = fx_start(app_offthread, NULL);
  answerer_t a = {.fx = fx};
  pthread_t th;
  ASSERT_EQ(pthread_create(&th, NULL, answer_thread, &a), 0);
  resp_t *r = malloc(sizeof(*r));
  enum { NC = 8, ROUNDS = 25, DEPTH = 3 };
  client_t *cs[NC];
  for (int i = 0; i < NC; i++) cs[i] = cl_open(fx->port);
  for (int round = 0; round < ROUNDS; round++) {
    for (int i = 0; i < NC; i++) {
      char req[256];
      int n = 0;
      for (int d = 0; d < DEPTH; d++)
        n += snprintf(req + n, sizeof(req) - (size_t)n, "GET /c%d/r%d/%d HTTP/1.1\r\n\r\n", i, round, d);
      cl_send(cs[i], req, (size_t)n);
    }
    for (int i = 0; i < NC; i++)
      for (int d = 0; d < DEPTH; d++) {
        char want[64];
        snprintf(want, sizeof(want), "/c%d/r%d/%d", i, round, d);
        ASSERT_EQ(cl_read(cs[i], r), 0);
        ASSERT(strcmp(r->body, want) == 0);
      }
  }
  for (int i = 0; i < NC; i++) cl_close(cs[i]);
  __atomic_store_n(&a.stop, 1, __ATOMIC_RELEASE);
  ASSERT_EQ(pthread_join(th, NULL), 0);
  ASSERT_EQ(a.answered, NC * ROUNDS * DEPTH);
  free(r);
  fx_stop(fx);
  return 0;
}

/* The server answers after it is closed? No: calls made after close began
 * from another thread are refused. And a server that never listened closes. */
static void noop_app(fx_t *fx, td_http_server_t *srv, const td_http_request_t *req) {
  (void)fx;
  (void)srv;
  (void)req;
}

static int closed_flag;
static void on_closed_flag(td_http_server_t *srv, void *data) {
  (void)srv;
  (void)data;
  closed_flag = 1;
}
static void noop_req(td_http_server_t *srv, const td_http_request_t *req, void *data) {
  (void)srv;
  (void)req;
  (void)data;
}

/* libuv's codes stop at the ingress: what a caller acts on becomes a TD_E*
 * code (with the sentence libuv gave it), an errno without one stays
 * -errno, which td_strerror names, and libuv's own codes are TD_E* too. */
TEST_IMPL(http_errors_mapped) {
  ASSERT_EQ(td__http_err(0), 0);
  ASSERT_EQ(td__http_err(UV_EADDRINUSE), TD_EADDRINUSE);
  ASSERT(strcmp(td_strerror(TD_EADDRINUSE), uv_strerror(UV_EADDRINUSE)) == 0);
  ASSERT_EQ(td__http_err(UV_ENOMEM), TD_ENOMEM);
  ASSERT_EQ(td__http_err(UV_ETIMEDOUT), TD_ETIMEDOUT);
  ASSERT_EQ(td__http_err(UV_ECANCELED), TD_ECANCELED);
  ASSERT_EQ(td__http_err(UV_EOF), TD_ECLOSED);
  ASSERT_EQ(td__http_err(UV_EACCES), -EACCES);
  ASSERT(strcmp(td_strerror(td__http_err(UV_EACCES)), "Permission denied") == 0);
  ASSERT_EQ(td__http_err(UV_EAI_NONAME), TD_EIO);
  return 0;
}

TEST_IMPL(http_lifecycle) {
  /* Created, never listened, closed: no handle left. */
  uv_loop_t loop;
  ASSERT_EQ(uv_loop_init(&loop), 0);
  td_http_opts_t o = {.on_request = noop_req};
  td_http_server_t *srv = td_http_server_new(&loop, &o);
  ASSERT(srv);
  ASSERT_EQ(td_http_server_port(srv), 0);
  td_http_stats_t st;
  td_http_server_stats(srv, &st);
  ASSERT_EQ(st.connections, 0);
  td_http_server_close(srv, on_closed_flag);
  ASSERT_EQ(uv_run(&loop, UV_RUN_DEFAULT), 0);
  ASSERT(closed_flag);
  ASSERT_EQ(uv_loop_close(&loop), 0);

  /* A port in use is reported. */
  fx_t *fx = fx_start(noop_app, NULL);
  ASSERT_EQ(uv_loop_init(&loop), 0);
  srv = td_http_server_new(&loop, &o);
  ASSERT_EQ(td_http_server_listen(srv, "127.0.0.1", fx->port), TD_EADDRINUSE);
  ASSERT_EQ(td_http_server_listen(srv, "127.0.0.1", fx->port), TD_EINVAL);
  closed_flag = 0;
  td_http_server_close(srv, on_closed_flag);
  ASSERT_EQ(uv_run(&loop, UV_RUN_DEFAULT), 0);
  ASSERT(closed_flag);
  ASSERT_EQ(uv_loop_close(&loop), 0);
  fx_stop(fx);

  /* A host that is not an address. */
  ASSERT_EQ(uv_loop_init(&loop), 0);
  srv = td_http_server_new(&loop, &o);
  ASSERT_EQ(td_http_server_listen(srv, "not-an-ip", 0), TD_EINVAL);
  td_http_server_close(srv, NULL);
  ASSERT_EQ(uv_run(&loop, UV_RUN_DEFAULT), 0);
  ASSERT_EQ(uv_loop_close(&loop), 0);
  return 0;
}

/* A client that stops reading: the backlog limit, then the send timeout,
 * drop it with on_abort(SLOW_CLIENT). */
static void slow_client_case(td_http_opts_t *o, int total_chunks) {
  fx_t *fx = fx_start(app_basic, o);
  client_t *c = cl_open(fx->port);
  int small = 4096;
  setsockopt(c->fd, SOL_SOCKET, SO_RCVBUF, &small, sizeof(small));
  cl_sends(c, "GET /hold/big HTTP/1.1\r\n\r\n");
  ASSERT(fx_wait(fx, &fx->nheld, 1));
  td_http_req_id id = fx->held[0];
  ASSERT_EQ(td_http_stream_start(fx->srv, id, 200, NULL, 0), 0);
  size_t n = 256 * 1024;
  char *chunk = malloc(n);
  memset(chunk, 'x', n);
  for (int i = 0; i < total_chunks && fx_get(fx, &fx->naborts) == 0; i++) {
    ASSERT_EQ(td_http_stream_write(fx->srv, id, chunk, n), 0);
    usleep(2000);
  }
  ASSERT(fx_wait(fx, &fx->naborts, 1));
  ASSERT_EQ(fx->abort_id, id);
  ASSERT_EQ(fx->abort_reason, TD_HTTP_ABORT_SLOW_CLIENT);
  free(chunk);
  cl_close(c);
  fx_stop(fx);
}

TEST_IMPL(http_slow_client) {
  td_http_opts_t o1 = {.max_output_bytes = 1024 * 1024};
  slow_client_case(&o1, 400);
  td_http_opts_t o2 = {.send_timeout_ms = 200};
  slow_client_case(&o2, 64);
  return 0;
}

/* At the limit a new connection takes the place of the one idle longest;
 * when every connection is busy it is closed at once instead. */
TEST_IMPL(http_max_connections) {
  td_http_opts_t o = {.max_connections = 2};
  fx_t *fx = fx_start(app_basic, &o);
  resp_t *r = malloc(sizeof(*r));
  client_t *a = cl_open(fx->port), *b = cl_open(fx->port);
  cl_sends(a, "GET /hold/a HTTP/1.1\r\n\r\n"); /* busy: its answer is owed */
  ASSERT(fx_wait(fx, &fx->nheld, 1));
  cl_sends(b, "GET /hello HTTP/1.1\r\n\r\n");  /* answered: idle after */
  ASSERT_EQ(cl_read(b, r), 0);
  client_t *c = cl_open(fx->port);
  cl_sends(c, "GET /hello HTTP/1.1\r\n\r\n");
  ASSERT_EQ(cl_read(c, r), 0); /* let in: b made room */
  ASSERT_EQ(r->status, 200);
  ASSERT(cl_eof(b));
  cl_sends(c, "GET /hold/c HTTP/1.1\r\n\r\n");
  ASSERT(fx_wait(fx, &fx->nheld, 2));
  client_t *d = cl_open(fx->port);
  ASSERT(cl_eof(d)); /* a and c are busy: one too many, closed at once */
  cl_close(d);
  ASSERT_EQ(td_http_respond(fx->srv, fx_held_by_path(fx, "/hold/a"), 200, NULL, 0, "a", 1), 0);
  ASSERT_EQ(cl_read(a, r), 0);
  ASSERT_EQ(r->status, 200);
  ASSERT_EQ(td_http_respond(fx->srv, fx_held_by_path(fx, "/hold/c"), 200, NULL, 0, "c", 1), 0);
  ASSERT_EQ(cl_read(c, r), 0);
  cl_close(a);
  cl_close(b);
  cl_close(c);
  free(r);
  fx_stop(fx);
  return 0;
}

/* One address cannot take every slot: past max_connections_per_client its
 * idle connections make room for its new ones (or, all busy, the new one
 * is closed), while another address (127.0.0.2, also loopback) gets in. */
TEST_IMPL(http_max_connections_per_client) {
  td_http_opts_t o = {.max_connections_per_client = 2};
  fx_t *fx = fx_start(app_basic, &o);
  resp_t *r = malloc(sizeof(*r));
  client_t *a = cl_open(fx->port), *b = cl_open(fx->port);
  cl_sends(a, "GET /hold/a HTTP/1.1\r\n\r\n");
  ASSERT(fx_wait(fx, &fx->nheld, 1));
  cl_sends(b, "GET /hold/b HTTP/1.1\r\n\r\n");
  ASSERT(fx_wait(fx, &fx->nheld, 2));
  client_t *c = cl_open(fx->port);
  ASSERT(cl_eof(c)); /* a third from 127.0.0.1 while both are busy: closed */
  cl_close(c);
  client_t *d = cl_open_from(fx->port, "127.0.0.2");
  cl_sends(d, "GET /hello HTTP/1.1\r\n\r\n");
  ASSERT_EQ(cl_read(d, r), 0);
  ASSERT_EQ(r->status, 200);
  ASSERT_EQ(td_http_respond(fx->srv, fx_held_by_path(fx, "/hold/b"), 200, NULL, 0, "b", 1), 0);
  ASSERT_EQ(cl_read(b, r), 0); /* b is idle now */
  client_t *e = cl_open(fx->port);
  cl_sends(e, "GET /hello HTTP/1.1\r\n\r\n");
  ASSERT_EQ(cl_read(e, r), 0); /* it takes b's place */
  ASSERT_EQ(r->status, 200);
  ASSERT(cl_eof(b));
  ASSERT_EQ(td_http_respond(fx->srv, fx_held_by_path(fx, "/hold/a"), 200, NULL, 0, "a", 1), 0);
  ASSERT_EQ(cl_read(a, r), 0);
  cl_close(a);
  cl_close(b);
  cl_close(d);
  cl_close(e);
  free(r);
  fx_stop(fx);
  return 0;
}

/* Thousands of live requests over in-memory connections, answered in a
 * scrambled order: ids stay unique and findable (hash table growth and
 * removal), and every connection's responses come out in request order. */
#define VN_CONNS 100
#define VN_REQS 50

typedef struct vnet {
  td_http_req_id ids[VN_CONNS * VN_REQS]; /* live ids in arrival order */
  int n;                                  /* how many */
  char out[VN_CONNS][VN_REQS * 160];      /* each connection's output */
  size_t out_len[VN_CONNS];               /* used */
} vnet_t;

static vnet_t *vn;

static void vn_request(td_http_server_t *srv, const td_http_request_t *req, void *data) {
  (void)srv;
  (void)data;
  ASSERT(vn->n < VN_CONNS * VN_REQS);
  for (int i = 0; i < vn->n; i++) ASSERT(vn->ids[i] != req->id);
  vn->ids[vn->n++] = req->id;
}

static void vn_sink(void *ud, const char *d, size_t n) {
  int k = (int)(intptr_t)ud;
  ASSERT(vn->out_len[k] + n <= sizeof(vn->out[k]));
  memcpy(vn->out[k] + vn->out_len[k], d, n);
  vn->out_len[k] += n;
}

TEST_IMPL(http_ids_many) {
  vn = calloc(1, sizeof(*vn));
  uv_loop_t loop;
  ASSERT_EQ(uv_loop_init(&loop), 0);
  td_http_opts_t o = {.on_request = vn_request, .max_pipeline = VN_REQS};
  td_http_server_t *srv = td_http_server_new(&loop, &o);
  td__http_conn_t *cs[VN_CONNS];
  static char path[VN_CONNS * VN_REQS][32];
  for (int k = 0; k < VN_CONNS; k++) {
    cs[k] = td__http_virt_open(srv, vn_sink, (void *)(intptr_t)k);
    ASSERT(cs[k]);
    for (int j = 0; j < VN_REQS; j++) {
      char req[64];
      int n = snprintf(req, sizeof(req), "GET /%d/%d HTTP/1.1\r\n\r\n", k, j);
      td__http_virt_feed(cs[k], req, (size_t)n);
      snprintf(path[k * VN_REQS + j], sizeof(path[0]), "/%d/%d", k, j);
    }
  }
  td__http_virt_flush(srv);
  ASSERT_EQ(vn->n, VN_CONNS * VN_REQS);
  /* Arrival order is connection by connection: ids[i] is path[i]. */
  int total = vn->n;
  int *order = malloc(sizeof(int) * (size_t)total);
  for (int i = 0; i < total; i++) order[i] = i;
  uint32_t x = 12345;
  for (int i = total - 1; i > 0; i--) {
    x = x * 1103515245u + 12345u;
    int j = (int)((x >> 8) % (uint32_t)(i + 1));
    int t = order[i];
    order[i] = order[j];
    order[j] = t;
  }
  for (int i = 0; i < total; i++) {
    int q = order[i];
    ASSERT_EQ(td_http_respond(srv, vn->ids[q], 200, NULL, 0, path[q], strlen(path[q])), 0);
    ASSERT_EQ(td_http_respond(srv, vn->ids[q], 200, NULL, 0, NULL, 0), TD_ENOTFOUND);
    if (i % 97 == 0) td__http_virt_flush(srv);
  }
  td__http_virt_flush(srv);
  for (int k = 0; k < VN_CONNS; k++) {
    const char *p = vn->out[k], *end = vn->out[k] + vn->out_len[k];
    for (int j = 0; j < VN_REQS; j++) {
      char want[48];
      snprintf(want, sizeof(want), "\r\n\r\n/%d/%d", k, j);
      const char *hit = memmem(p, (size_t)(end - p), want, strlen(want));
      ASSERT(hit != NULL);
      p = hit + strlen(want);
    }
    td__http_virt_close(cs[k]);
  }
  td_http_stats_t st;
  td_http_server_stats(srv, &st);
  ASSERT_EQ(st.requests, (uint64_t)total);
  ASSERT_EQ(st.responses, (uint64_t)total);
  ASSERT_EQ(st.connections_open, 0);
  td_http_server_close(srv, NULL);
  ASSERT_EQ(uv_run(&loop, UV_RUN_DEFAULT), 0);
  ASSERT_EQ(uv_loop_close(&loop), 0);
  free(order);
  free(vn);
  return 0;
}

/* The server on its own thread (td_http_thread_*), requests consumed from
 * an inbox by this thread through poll(), answers made from here. */
static td_http_event_t *inbox_wait(td_http_inbox_t *ib) {
  struct pollfd pfd = {.fd = td_http_inbox_fd(ib), .events = POLLIN};
  for (int i = 0; i < 50; i++) {
    td_http_event_t *ev = td_http_inbox_pop(ib);
    if (ev) return ev;
    ASSERT(poll(&pfd, 1, 100) >= 0);
  }
  return NULL;
}

TEST_IMPL(http_inbox_thread) {
  td_http_inbox_t *ib = td_http_inbox_new();
  ASSERT(ib);
  td_http_opts_t o = {.on_request = td_http_inbox_on_request,
                      .on_abort = td_http_inbox_on_abort, .data = ib};
  td_http_thread_t *th = NULL;
  ASSERT_EQ(td_http_thread_start(&o, NULL, 0, &th), 0);
  td_http_server_t *srv = td_http_thread_server(th);
  int port = td_http_thread_port(th);
  ASSERT(port > 0);
  td_http_thread_t *th2 = (td_http_thread_t *)1;
  ASSERT_EQ(td_http_thread_start(&o, "127.0.0.1", port, &th2), TD_EADDRINUSE);
  ASSERT(th2 == NULL);

  resp_t *r = malloc(sizeof(*r));
  client_t *c = cl_open(port);
  cl_sends(c, "GET /a?x=1 HTTP/1.1\r\nX-H: v1\r\n\r\n"
              "POST /b HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello"
              "GET /-/healthz HTTP/1.1\r\n\r\n"
              "GET /c HTTP/1.1\r\n\r\n");
  td_http_event_t *ev[3];
  for (int i = 0; i < 3; i++) {
    ev[i] = inbox_wait(ib);
    ASSERT(ev[i] && ev[i]->kind == TD_HTTP_EV_REQUEST);
    ASSERT_EQ(ev[i]->id, ev[i]->req.id);
  }
  ASSERT(strcmp(ev[0]->req.path, "/a") == 0 && strcmp(ev[0]->req.query, "x=1") == 0);
  ASSERT(strcmp(td_http_request_header(&ev[0]->req, "X-H"), "v1") == 0);
  ASSERT(strcmp(ev[1]->req.method, "POST") == 0);
  ASSERT(ev[1]->req.body_len == 5 && strcmp(ev[1]->req.body, "hello") == 0);
  ASSERT(strcmp(ev[2]->req.path, "/c") == 0);
  /* Queue drained: the fd is no longer readable. */
  struct pollfd pfd = {.fd = td_http_inbox_fd(ib), .events = POLLIN};
  ASSERT_EQ(poll(&pfd, 1, 0), 0);
  for (int i = 2; i >= 0; i--) {
    ASSERT_EQ(td_http_respond(srv, ev[i]->id, 200, NULL, 0, ev[i]->req.path,
                              ev[i]->req.path_len), 0);
    td_http_event_free(ev[i]);
  }
  const char *want[] = {"/a", "/b", "{\"status\":\"ok\"}\n", "/c"};
  for (int i = 0; i < 4; i++) {
    ASSERT_EQ(cl_read(c, r), 0);
    ASSERT(strcmp(r->body, want[i]) == 0);
  }
  /* A streamed answer, then the client leaves: an abort event. */
  cl_sends(c, "GET /gen HTTP/1.1\r\n\r\n");
  td_http_event_t *g = inbox_wait(ib);
  ASSERT(g && g->kind == TD_HTTP_EV_REQUEST);
  ASSERT_EQ(td_http_stream_start(srv, g->id, 200, NULL, 0), 0);
  ASSERT_EQ(td_http_stream_write(srv, g->id, "t1", 2), 0);
  char buf[512];
  ASSERT(recv(c->fd, buf, sizeof(buf), 0) > 0);
  cl_close(c);
  td_http_event_t *a = inbox_wait(ib);
  ASSERT(a && a->kind == TD_HTTP_EV_ABORT);
  ASSERT_EQ(a->id, g->id);
  ASSERT_EQ(a->reason, TD_HTTP_ABORT_DISCONNECT);
  ASSERT_EQ(td_http_stream_write(srv, g->id, "t2", 2), 0); /* dropped */
  td_http_event_free(a);
  td_http_event_free(g);

  /* Events left in the inbox at stop are freed by destroy. */
  c = cl_open(port);
  cl_sends(c, "GET /left HTTP/1.1\r\n\r\n");
  td_http_event_t *left = inbox_wait(ib);
  ASSERT(left);
  td_http_event_free(left);
  td_http_thread_stop(&th);
  ASSERT(th == NULL);
  td_http_thread_stop(&th);
  td_http_event_t *gone = inbox_wait(ib); /* the abort of /left: server closed */
  ASSERT(gone && gone->kind == TD_HTTP_EV_ABORT);
  ASSERT_EQ(gone->reason, TD_HTTP_ABORT_SERVER_CLOSE);
  td_http_event_free(gone);
  cl_close(c);
  c = NULL;
  td_http_inbox_destroy(&ib);
  ASSERT(ib == NULL);
  td_http_inbox_destroy(&ib);
  free(r);
  return 0;
}

/* td_http_stream_notify: a drain event comes only once the client has
 * taken the stream's output down to the asked level, so a producer can
 * pace itself to a slow reader instead of buffering for it. */
TEST_IMPL(http_stream_notify) {
  td_http_inbox_t *ib = td_http_inbox_new();
  ASSERT(ib);
  td_http_opts_t o = {.on_request = td_http_inbox_on_request, .on_abort = td_http_inbox_on_abort,
                      .on_drain = td_http_inbox_on_drain, .data = ib};
  td_http_thread_t *th = NULL;
  ASSERT_EQ(td_http_thread_start(&o, NULL, 0, &th), 0);
  td_http_server_t *srv = td_http_thread_server(th);
  /* (No small SO_RCVBUF here: set after connect, it shrinks an advertised
   * window and the sender stalls in retransmission back-off.) */
  client_t *c = cl_open(td_http_thread_port(th));
  cl_sends(c, "GET /gen HTTP/1.1\r\n\r\n");
  td_http_event_t *g = inbox_wait(ib);
  ASSERT(g && g->kind == TD_HTTP_EV_REQUEST);
  ASSERT_EQ(td_http_stream_start(srv, g->id, 200, NULL, 0), 0);
  /* More than the kernel's socket buffers hold while the client sleeps. */
  size_t n = 16u << 20;
  char *chunk = malloc(n);
  memset(chunk, 'x', n);
  ASSERT_EQ(td_http_stream_write(srv, g->id, chunk, n), 0);
  ASSERT_EQ(td_http_stream_notify(srv, g->id, 64 * 1024), 0);
  struct pollfd pfd = {.fd = td_http_inbox_fd(ib), .events = POLLIN};
  ASSERT_EQ(poll(&pfd, 1, 300), 0); /* no drain: the client took nothing */
  /* The client reads it all; then (not before) the drain event comes. */
  size_t got = 0;
  td_http_event_t *d = NULL;
  while (got < n) {
    ssize_t k = recv(c->fd, chunk, 1 << 20, 0);
    ASSERT(k > 0);
    got += (size_t)k;
  }
  if (!d) d = inbox_wait(ib);
  ASSERT(d && d->kind == TD_HTTP_EV_DRAIN);
  ASSERT_EQ(d->id, g->id);
  td_http_event_free(d);
  /* Once drained, a notify answers at once. */
  ASSERT_EQ(td_http_stream_notify(srv, g->id, 1u << 30), 0);
  d = inbox_wait(ib);
  ASSERT(d && d->kind == TD_HTTP_EV_DRAIN && d->id == g->id);
  td_http_event_free(d);
  ASSERT_EQ(td_http_stream_end(srv, g->id), 0);
  td_http_event_free(g);
  free(chunk);
  cl_close(c);
  td_http_thread_stop(&th);
  td_http_inbox_destroy(&ib);
  return 0;
}
