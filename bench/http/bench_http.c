/* HTTP ingress benchmark: a closed-loop load generator (N keep-alive
 * connections, one request in flight on each, like `wrk -t1 -cN`) on one
 * thread, and by default the Tide C ingress answering GET /hello and
 * POST /echo on a loop thread of its own in the same process.
 *
 *   build/bench-http [-c 32] [-d 5] [-w 1]          both metrics, in-process server
 *   build/bench-http --url http://127.0.0.1:18080/hello [--post JSON]  load only
 *   build/bench-http --serve 8080                   server only (for wrk)
 *   build/bench-http --inbox [-c ..] [-d ..]       server thread + inbox consumer thread
 *     (the path a Lua application thread takes: requests copied into a
 *     td_http_inbox, answers made from another thread)
 *
 * Prints one JSON line per metric:
 *   {"metric":"http_get_hello","value":<req/s>,"unit":"req/s","p50_ms":..,"p99_ms":..}
 */
#include <llhttp.h>
#include <math.h>
#include <poll.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "http.h"

#define ECHO_BODY "{\"id\":42,\"name\":\"peer\",\"tags\":[\"a\",\"b\",\"c\"],\"value\":3.5,\"ok\":true}"

/* -- Server -------------------------------------------------------------- */

typedef struct server_thread {
  pthread_t th;          /* loop thread */
  uv_loop_t loop;        /* its loop */
  uv_async_t stop;       /* closes the server */
  td_http_server_t *srv; /* the server */
  int port;              /* 0: ephemeral */
  volatile int ready;    /* listening */
} server_thread_t;

static void app(td_http_server_t *srv, const td_http_request_t *req, void *data) {
  static const td_http_header_t text[] = {TD_HTTP_HDR("Content-Type", "text/plain")};
  static const td_http_header_t json[] = {TD_HTTP_HDR("Content-Type", "application/json")};
  (void)data;
  if (req->path_len == 6 && memcmp(req->path, "/hello", 6) == 0)
    td_http_respond(srv, req->id, 200, text, 1, "ok", 2);
  else if (req->path_len == 5 && memcmp(req->path, "/echo", 5) == 0)
    td_http_respond(srv, req->id, 200, json, 1, req->body, req->body_len);
  else
    td_http_respond(srv, req->id, 404, text, 1, "not found", 9);
}

static void on_stop(uv_async_t *h) {
  server_thread_t *s = h->data;
  td_http_server_close(s->srv, NULL);
  uv_close((uv_handle_t *)&s->stop, NULL);
}

static void *server_main(void *arg) {
  server_thread_t *s = arg;
  uv_loop_init(&s->loop);
  td_http_opts_t o = {.on_request = app, .keepalive_timeout_ms = 120000};
  s->srv = td_http_server_new(&s->loop, &o);
  int rc = td_http_server_listen(s->srv, "127.0.0.1", s->port);
  if (rc) {
    fprintf(stderr, "bench-http: listen: %s\n", td_strerror(rc));
    exit(1);
  }
  s->port = td_http_server_port(s->srv);
  uv_async_init(&s->loop, &s->stop, on_stop);
  s->stop.data = s;
  __atomic_store_n(&s->ready, 1, __ATOMIC_RELEASE);
  uv_run(&s->loop, UV_RUN_DEFAULT);
  uv_loop_close(&s->loop);
  return NULL;
}

/* -- Inbox consumer: answers from a thread that is not the loop thread ----- */

typedef struct consumer {
  pthread_t th;            /* consumer thread */
  td_http_inbox_t *ib;     /* requests */
  td_http_server_t *srv;   /* for the answers */
  volatile int stop;       /* set to end */
} consumer_t;

static void *consumer_main(void *arg) {
  consumer_t *k = arg;
  struct pollfd pfd = {.fd = td_http_inbox_fd(k->ib), .events = POLLIN};
  while (!__atomic_load_n(&k->stop, __ATOMIC_ACQUIRE)) {
    td_http_event_t *ev;
    int any = 0;
    while ((ev = td_http_inbox_pop(k->ib))) {
      any = 1;
      if (ev->kind == TD_HTTP_EV_REQUEST) app(k->srv, &ev->req, NULL);
      td_http_event_free(ev);
    }
    if (!any) poll(&pfd, 1, 50);
  }
  return NULL;
}

/* -- Load generator ------------------------------------------------------ */

typedef struct load load_t;

typedef struct lconn {
  uv_tcp_t tcp;       /* socket */
  uv_connect_t creq;  /* connect request */
  llhttp_t parser;    /* response parser */
  load_t *L;          /* owner */
  uint64_t t_sent;    /* hrtime the request went out */
  int done;           /* response complete */
} lconn_t;

struct load {
  uv_loop_t loop;           /* client loop */
  uv_timer_t timer;         /* phases */
  llhttp_settings_t ps;     /* response parser callbacks */
  lconn_t *conns;           /* connections */
  int nconns;               /* their number */
  char *req;                /* the request bytes */
  size_t req_len;           /* length */
  uint64_t t_measure;       /* hrtime measuring starts */
  uint64_t t_end;           /* hrtime sending stops */
  int stopping;             /* no new requests */
  uint64_t count;           /* responses in the measured window */
  uint64_t errors;          /* non-2xx responses, parse and socket errors */
  uint32_t *lat;            /* latency samples, us */
  size_t nlat, clat;        /* used, capacity */
  int status;               /* last status seen */
  char rbuf[65536];         /* read buffer */
};

static void lc_send(lconn_t *c);

static int lp_headers_complete(llhttp_t *p) {
  lconn_t *c = p->data;
  c->L->status = p->status_code;
  return 0;
}

static int lp_message_complete(llhttp_t *p) {
  lconn_t *c = p->data;
  c->done = 1;
  return HPE_PAUSED;
}

static void lc_record(lconn_t *c) {
  load_t *L = c->L;
  uint64_t now = uv_hrtime();
  if (L->status < 200 || L->status > 299) L->errors++;
  if (now >= L->t_measure && now < L->t_end) {
    L->count++;
    if (L->nlat == L->clat) {
      L->clat = L->clat ? L->clat * 2 : 1 << 16;
      L->lat = realloc(L->lat, L->clat * sizeof(*L->lat));
      if (!L->lat) abort();
    }
    L->lat[L->nlat++] = (uint32_t)((now - c->t_sent) / 1000);
  }
}

static void lc_alloc(uv_handle_t *h, size_t hint, uv_buf_t *b) {
  lconn_t *c = h->data;
  (void)hint;
  *b = uv_buf_init(c->L->rbuf, sizeof(c->L->rbuf));
}

static void lc_read(uv_stream_t *s, ssize_t n, const uv_buf_t *b) {
  lconn_t *c = s->data;
  if (n < 0) {
    if (!c->L->stopping) c->L->errors++;
    uv_close((uv_handle_t *)s, NULL);
    return;
  }
  const char *p = b->base;
  size_t left = (size_t)n;
  while (left > 0) {
    llhttp_errno_t e = llhttp_execute(&c->parser, p, left);
    if (e == HPE_OK) break;
    if (e != HPE_PAUSED) {
      c->L->errors++;
      uv_close((uv_handle_t *)s, NULL);
      return;
    }
    const char *pos = llhttp_get_error_pos(&c->parser);
    left -= (size_t)(pos - p);
    p = pos;
    llhttp_resume(&c->parser);
    c->done = 0;
    lc_record(c);
    lc_send(c);
  }
}

static void lc_send(lconn_t *c) {
  load_t *L = c->L;
  if (L->stopping) {
    uv_close((uv_handle_t *)&c->tcp, NULL);
    return;
  }
  uv_buf_t b = uv_buf_init(L->req, (unsigned)L->req_len);
  c->t_sent = uv_hrtime();
  int n = uv_try_write((uv_stream_t *)&c->tcp, &b, 1);
  if (n != (int)L->req_len) { /* a ~150-byte request always fits a fresh socket */
    L->errors++;
    uv_close((uv_handle_t *)&c->tcp, NULL);
  }
}

static void lc_connected(uv_connect_t *req, int status) {
  lconn_t *c = req->data;
  if (status < 0) {
    fprintf(stderr, "bench-http: connect: %s\n", uv_strerror(status));
    exit(1);
  }
  uv_tcp_nodelay(&c->tcp, 1);
  uv_read_start((uv_stream_t *)&c->tcp, lc_alloc, lc_read);
  lc_send(c);
}

static void on_phase(uv_timer_t *t) {
  load_t *L = t->data;
  L->stopping = 1;
  uv_close((uv_handle_t *)t, NULL);
  /* Responses still in flight are outside the window: close everything. */
  for (int i = 0; i < L->nconns; i++)
    if (!uv_is_closing((uv_handle_t *)&L->conns[i].tcp))
      uv_close((uv_handle_t *)&L->conns[i].tcp, NULL);
}

static int cmp_u32(const void *a, const void *b) {
  uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
  return x < y ? -1 : x > y;
}

static double pct(const uint32_t *v, size_t n, double q) {
  if (!n) return 0;
  size_t i = (size_t)ceil(q * (double)n) - 1;
  if (i >= n) i = n - 1;
  return v[i] / 1000.0;
}

/* Runs one closed-loop measurement; prints its JSON line. */
static int run_load(const char *metric, const char *host, int port, const char *path,
                    const char *post_body, int nconns, double warm_s, double dur_s,
                    const char *server_name) {
  load_t *L = calloc(1, sizeof(*L));
  uv_loop_init(&L->loop);
  llhttp_settings_init(&L->ps);
  L->ps.on_headers_complete = lp_headers_complete;
  L->ps.on_message_complete = lp_message_complete;
  L->req = malloc(4096);
  if (post_body)
    L->req_len = (size_t)snprintf(L->req, 4096,
                                  "POST %s HTTP/1.1\r\nHost: %s:%d\r\n"
                                  "Content-Type: application/json\r\nContent-Length: %zu\r\n\r\n%s",
                                  path, host, port, strlen(post_body), post_body);
  else
    L->req_len = (size_t)snprintf(L->req, 4096, "GET %s HTTP/1.1\r\nHost: %s:%d\r\n\r\n", path,
                                  host, port);
  L->nconns = nconns;
  L->conns = calloc((size_t)nconns, sizeof(lconn_t));
  uint64_t now = uv_hrtime();
  L->t_measure = now + (uint64_t)(warm_s * 1e9);
  L->t_end = L->t_measure + (uint64_t)(dur_s * 1e9);
  struct sockaddr_in sa;
  uv_ip4_addr(host, port, &sa);
  for (int i = 0; i < nconns; i++) {
    lconn_t *c = &L->conns[i];
    c->L = L;
    uv_tcp_init(&L->loop, &c->tcp);
    c->tcp.data = c;
    c->creq.data = c;
    llhttp_init(&c->parser, HTTP_RESPONSE, &L->ps);
    c->parser.data = c;
    uv_tcp_connect(&c->creq, &c->tcp, (const struct sockaddr *)&sa, lc_connected);
  }
  uv_timer_init(&L->loop, &L->timer);
  L->timer.data = L;
  uv_timer_start(&L->timer, on_phase, (uint64_t)((warm_s + dur_s) * 1000), 0);
  uv_run(&L->loop, UV_RUN_DEFAULT);
  uv_loop_close(&L->loop);

  qsort(L->lat, L->nlat, sizeof(*L->lat), cmp_u32);
  double mean = 0;
  for (size_t i = 0; i < L->nlat; i++) mean += L->lat[i];
  mean = L->nlat ? mean / (double)L->nlat / 1000.0 : 0;
  printf("{\"metric\":\"%s\",\"value\":%.1f,\"unit\":\"req/s\",\"p50_ms\":%.3f,"
         "\"p90_ms\":%.3f,\"p99_ms\":%.3f,\"max_ms\":%.3f,\"mean_ms\":%.3f,"
         "\"requests\":%llu,\"errors\":%llu,\"connections\":%d,\"duration_s\":%.1f,"
         "\"server\":\"%s\",\"client\":\"bench-http closed loop, 1 thread\"}\n",
         metric, (double)L->count / dur_s, pct(L->lat, L->nlat, 0.50),
         pct(L->lat, L->nlat, 0.90), pct(L->lat, L->nlat, 0.99),
         pct(L->lat, L->nlat, 1.0), mean, (unsigned long long)L->count,
         (unsigned long long)L->errors, nconns, dur_s, server_name);
  fflush(stdout);
  int bad = L->count == 0 || L->errors > 0;
  free(L->lat);
  free(L->req);
  free(L->conns);
  free(L);
  return bad;
}

/* -- Main ---------------------------------------------------------------- */

static int parse_url(const char *url, char *host, size_t hn, int *port, char *path, size_t pn) {
  if (strncmp(url, "http://", 7) != 0) return -1;
  const char *h = url + 7, *slash = strchr(h, '/'), *colon = strchr(h, ':');
  if (!slash) slash = h + strlen(h);
  if (colon && colon < slash) {
    snprintf(host, hn, "%.*s", (int)(colon - h), h);
    *port = atoi(colon + 1);
  } else {
    snprintf(host, hn, "%.*s", (int)(slash - h), h);
    *port = 80;
  }
  snprintf(path, pn, "%s", *slash ? slash : "/");
  return 0;
}

int main(int argc, char **argv) {
  int nconns = 32, serve_port = -1, inbox = 0;
  double dur = 5, warm = 1;
  const char *url = NULL, *post = NULL;
  for (int i = 1; i < argc; i++) {
    if (!strcmp(argv[i], "-c") && i + 1 < argc) nconns = atoi(argv[++i]);
    else if (!strcmp(argv[i], "-d") && i + 1 < argc) dur = atof(argv[++i]);
    else if (!strcmp(argv[i], "-w") && i + 1 < argc) warm = atof(argv[++i]);
    else if (!strcmp(argv[i], "--url") && i + 1 < argc) url = argv[++i];
    else if (!strcmp(argv[i], "--post") && i + 1 < argc) post = argv[++i];
    else if (!strcmp(argv[i], "--serve") && i + 1 < argc) serve_port = atoi(argv[++i]);
    else if (!strcmp(argv[i], "--inbox")) inbox = 1;
    else {
      fprintf(stderr,
              "usage: bench-http [-c CONNS] [-d SECONDS] [-w WARMUP_S]\n"
              "       bench-http --url http://HOST:PORT/PATH [--post BODY] [-c ..] [-d ..]\n"
              "       bench-http --serve PORT\n");
      return 2;
    }
  }
  if (nconns < 1 || dur <= 0) return 2;
  if (serve_port >= 0) {
    server_thread_t s = {.port = serve_port};
    server_main(&s);
    return 0;
  }
  if (url) {
    char host[256], path[1024];
    int port;
    if (parse_url(url, host, sizeof(host), &port, path, sizeof(path))) return 2;
    return run_load(post ? "http_post_echo_json" : "http_get_hello", host, port, path, post,
                    nconns, warm, dur, url);
  }
  if (inbox) {
    consumer_t k = {.ib = td_http_inbox_new()};
    td_http_opts_t o = {.on_request = td_http_inbox_on_request,
                        .on_abort = td_http_inbox_on_abort, .data = k.ib,
                        .keepalive_timeout_ms = 120000};
    td_http_thread_t *th;
    int rc = td_http_thread_start(&o, NULL, 0, &th);
    if (rc) {
      fprintf(stderr, "bench-http: %s\n", uv_strerror(rc));
      return 1;
    }
    k.srv = td_http_thread_server(th);
    pthread_create(&k.th, NULL, consumer_main, &k);
    int port = td_http_thread_port(th);
    int bad = run_load("http_get_hello", "127.0.0.1", port, "/hello", NULL, nconns, warm, dur,
                       "tide-c-ingress+inbox-thread");
    bad |= run_load("http_post_echo_json", "127.0.0.1", port, "/echo", ECHO_BODY, nconns,
                    warm, dur, "tide-c-ingress+inbox-thread");
    __atomic_store_n(&k.stop, 1, __ATOMIC_RELEASE);
    pthread_join(k.th, NULL);
    td_http_thread_stop(&th);
    td_http_inbox_destroy(&k.ib);
    return bad;
  }
  server_thread_t s = {.port = 0};
  pthread_create(&s.th, NULL, server_main, &s);
  while (!__atomic_load_n(&s.ready, __ATOMIC_ACQUIRE)) usleep(1000);
  int bad = run_load("http_get_hello", "127.0.0.1", s.port, "/hello", NULL, nconns, warm, dur,
                     "tide-c-ingress");
  bad |= run_load("http_post_echo_json", "127.0.0.1", s.port, "/echo", ECHO_BODY, nconns, warm,
                  dur, "tide-c-ingress");
  uv_async_send(&s.stop);
  pthread_join(s.th, NULL);
  return bad;
}
