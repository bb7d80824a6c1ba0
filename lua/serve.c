/* Tide serving glue: HTTP requests from the ingress thread (engine/http.c)
 * are routed by path prefix to deployment replicas (actors) and answered
 * from the replicas' streamed results, all in C on the node's loop: no Lua
 * runs in the driver per request. Replicas run stdlib/tide/serve.lua's
 * __serve method, which yields one header item and then body chunks.
 * The ingress runs in the process that has the node: a driver's embedded
 * node, or, for a driver attached to a node daemon (`tide serve run
 * --address`), that daemon, whose dashboard and /metrics then show it.
 * Uses http, node, ser; exposed to Lua as tide.core serve_* functions,
 * which are control ops (core_int.h) so that an attached client's run here.
 */
#include <lauxlib.h>
#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "core.h"
#include "core_int.h"
#include "http.h"

#define TD_SERVE_MAX_DEPS 64
/* Status codes counted per deployment: 100 .. 599. */
#define TD_SERVE_CODES 500
/* p50 and p99 are over a deployment's last TD_SERVE_RECENT requests; req/s
 * over the last TD_SERVE_RATE_S whole seconds. */
#define TD_SERVE_RECENT 1024
#define TD_SERVE_RATE_S 10
/* Arrivals are counted per whole second in a ring one longer than the
 * window, so the window's oldest second is never the slot the current one
 * reuses. */
#define TD_SERVE_RATE_SLOTS (TD_SERVE_RATE_S + 1)
/* Latency buckets of /-/metrics (seconds, Prometheus' defaults). */
#define TD_SERVE_NBUCKETS 11
static const double td__serve_buckets[TD_SERVE_NBUCKETS] = {0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10};

typedef struct td_replica {
  uint64_t actor_id;
  int ongoing;           /* requests sent to it and not finished */
  int draining;          /* replaced: gets no new requests */
  int dead;              /* a call saw it die: gets no new requests */
} td_replica_t;

typedef struct td_dep {
  char name[64];
  char prefix[256];      /* route, e.g. "/echo" */
  size_t plen;
  td_replica_t *reps;
  int nreps, capreps;
  int max_ongoing;       /* per replica; beyond it requests get 503 */
  uint64_t requests, errors, rejected;
  uint64_t lat[TD_SERVE_NBUCKETS + 1]; /* finished requests by latency bucket (+Inf last), for /-/metrics */
  double lat_sum;        /* seconds, of those */
  uint64_t codes[TD_SERVE_CODES]; /* finished requests by status (code - 100; 499: the client left first) */
  float recent[TD_SERVE_RECENT];  /* the last requests' latencies (s), a ring, for p50 and p99 */
  uint64_t nrecent;               /* requests put in the ring so far */
  uint32_t rate_n[TD_SERVE_RATE_SLOTS];   /* requests that arrived in second rate_sec[i] */
  uint64_t rate_sec[TD_SERVE_RATE_SLOTS]; /* which second (uv_hrtime / 1e9) slot i counts */
} td_dep_t;

typedef struct td_pend {
  td_http_req_id rid;
  uint64_t stream;       /* the replica call's stream object */
  uint64_t actor_id;
  td_dep_t *dep;
  uint32_t next;         /* next item to read */
  int started;           /* a chunked response has begun */
  int retried;
  int idempotent;
  uint64_t parked_ns;    /* waiting for a live replica since (uv_hrtime), or 0 */
  size_t unacked;        /* stream bytes written that the client may not have taken */
  size_t notify_mark;    /* unacked when the pending drain notice was asked for */
  int notified;          /* a drain notice is pending */
  uint8_t *args;         /* kept to retry on another replica */
  size_t args_len;
  char what[160];        /* "METHOD /path", for the error log */
  uint64_t start_ns;     /* when it arrived (uv_hrtime), for the latency histogram */
  int status;            /* the status sent, or 0: none yet (499 if it ends so) */
  struct td_pend *prev, *nxt;
} td_pend_t;

/* Stream pacing: the ingress reads a stream's next item only while fewer
 * than TD_SERVE_STREAM_HIGH bytes it wrote may still wait for the client,
 * asking the HTTP thread (td_http_stream_notify) to say when all but
 * TD_SERVE_STREAM_LOW of them are gone. A slow reader so holds back the
 * ingress instead of filling its memory or being dropped as too slow. */
#define TD_SERVE_STREAM_HIGH (4u << 20)
#define TD_SERVE_STREAM_LOW (256u << 10)
/* Items a replica's stream may run ahead of the ingress (see
 * td_node_stream_window): with the byte window above, a slow reader holds
 * the replica back too, so the object store does not fill either. */
#define TD_SERVE_STREAM_ITEMS 8

static struct {
  td_http_thread_t *th;
  td_http_server_t *srv;
  td_http_inbox_t *ib;
  td_dep_t deps[TD_SERVE_MAX_DEPS];
  int ndeps;
  td_pend_t *pend;       /* requests in flight */
  td_map_t by_rid;       /* rid -> td_pend_t */
  uint32_t rng;
  td_buf_t buf;
  FILE *access;          /* access log (stderr, a file), or NULL: off */
  int access_owned;      /* fclose it at stop */
  pthread_mutex_t log_mu; /* one line at a time from the HTTP thread and this one */
  int watch;              /* the node's watch slot (td_node_watch_add) */
  uint64_t owner;         /* the attached client that started it (0: this process's driver) */
  uint64_t noted_ns;      /* when its stats last went to the head (td__note_head) */
} S;

/* -- Logs ------------------------------------------------------------------ */

/* The access log, in common log format, written on the HTTP thread as each
 * request finishes: host ident user [date] "request line" status bytes. */
static void td__on_log(td_http_server_t *srv, const td_http_log_entry_t *e, void *data) {
  (void)srv, (void)data;
  if (!S.access) return;
  char date[64];
  time_t now = time(NULL);
  struct tm tm;
  localtime_r(&now, &tm);
  strftime(date, sizeof(date), "%d/%b/%Y:%H:%M:%S %z", &tm);
  /* The target as received, with quotes, backslashes and bytes outside
   * printable ASCII escaped, so a line is always one parseable line. */
  char target[1024];
  size_t o = 0;
  for (int part = 0; part < 2; part++) {
    const char *s = part ? e->query : e->path;
    size_t n = part ? e->query_len : e->path_len;
    if (part && n && o < sizeof(target) - 1) target[o++] = '?';
    for (size_t i = 0; s && i < n && o < sizeof(target) - 5; i++) {
      unsigned char c = (unsigned char)s[i];
      if (c < 0x20 || c >= 0x7f || c == '"' || c == '\\')
        o += (size_t)snprintf(target + o, sizeof(target) - o, "\\x%02x", c);
      else target[o++] = (char)c;
    }
  }
  target[o] = 0;
  char bytes[24];
  if (e->bytes) snprintf(bytes, sizeof(bytes), "%llu", (unsigned long long)e->bytes);
  else snprintf(bytes, sizeof(bytes), "-");
  /* No response at all (the client left first) is logged as 499, as nginx does. */
  pthread_mutex_lock(&S.log_mu);
  if (e->method)
    fprintf(S.access, "%s - - [%s] \"%s %s HTTP/1.%d\" %d %s\n", e->peer, date, e->method,
            o ? target : "-", e->http_minor, e->status ? e->status : 499, bytes);
  else
    fprintf(S.access, "%s - - [%s] \"-\" %d %s\n", e->peer, date, e->status ? e->status : 499, bytes);
  fflush(S.access);
  pthread_mutex_unlock(&S.log_mu);
}

/* A short id for one failure: the client gets it, the log has the details. */
static void td__error_id(char out[17]) {
  S.rng = S.rng * 1103515245u + 12345u;
  uint64_t x = uv_hrtime() ^ ((uint64_t)S.rng << 32) ^ (uint64_t)getpid();
  x ^= x >> 33; x *= 0xff51afd7ed558ccdull; x ^= x >> 33;
  snprintf(out, 17, "%016llx", (unsigned long long)x);
}

/* Logs a failed request with its id on stderr: what the client does not
 * get to see (messages, tracebacks, server paths). */
static void td__log_error(const td_pend_t *p, const char *id, const char *kind, uint32_t kl,
                          const char *msg, uint32_t ml) {
  pthread_mutex_lock(&S.log_mu);
  fprintf(stderr, "[serve] error %s: %s (deployment %s): %.*s: %.*s\n", id, p->what, p->dep->name,
          (int)kl, kind, (int)ml, msg);
  fflush(stderr);
  pthread_mutex_unlock(&S.log_mu);
}

/* -- Replicas -------------------------------------------------------------- */

static td_replica_t *td__rep(td_dep_t *d, uint64_t actor_id) {
  for (int i = 0; i < d->nreps; i++)
    if (d->reps[i].actor_id == actor_id) return &d->reps[i];
  return NULL;
}

/* Power of two choices over replicas with room. */
static td_replica_t *td__pick(td_dep_t *d, uint64_t avoid) {
  td_replica_t *c[2] = {NULL, NULL};
  int live = 0;
  for (int i = 0; i < d->nreps; i++) {
    td_replica_t *r = &d->reps[i];
    if (r->draining || r->dead || r->ongoing >= d->max_ongoing || r->actor_id == avoid) continue;
    live++;
    /* Reservoir-sample two distinct candidates. */
    S.rng = S.rng * 1103515245u + 12345u;
    if (live <= 2) c[live - 1] = r;
    else if ((S.rng >> 8) % (uint32_t)live < 2) c[(S.rng >> 4) & 1] = r;
  }
  if (!c[0]) return NULL;
  if (!c[1]) return c[0];
  if (c[0]->ongoing != c[1]->ongoing) return c[0]->ongoing < c[1]->ongoing ? c[0] : c[1];
  S.rng = S.rng * 1103515245u + 12345u;
  return c[(S.rng >> 16) & 1];  /* ties broken at random, so idle replicas share */
}

/* Replicas that take new requests; 0 while dead ones are being replaced. */
static int td__live(const td_dep_t *d) {
  int live = 0;
  for (int i = 0; i < d->nreps; i++) live += !d->reps[i].draining && !d->reps[i].dead;
  return live;
}

/* How long a request waits for a replacement when a deployment has no live
 * replica (its replicas died with their process): the controller starts
 * new ones within a second or two. */
#define TD_SERVE_PARK_NS (10ull * 1000000000ull)

static td_dep_t *td__route(const char *path, size_t len) {
  td_dep_t *best = NULL;
  for (int i = 0; i < S.ndeps; i++) {
    td_dep_t *d = &S.deps[i];
    if (d->plen > len || memcmp(d->prefix, path, d->plen)) continue;
    /* "/echo" matches "/echo" and "/echo/x", not "/echoes". */
    if (d->plen > 1 && len > d->plen && path[d->plen] != '/') continue;
    if (!best || d->plen > best->plen) best = d;
  }
  return best;
}

/* -- Responses --------------------------------------------------------------- */

static void td__respond_json(td_http_req_id rid, int status, const char *json) {
  td_http_header_t h[2] = {TD_HTTP_HDR("Content-Type", "application/json"), TD_HTTP_HDR("Retry-After", "1")};
  td_http_respond(S.srv, rid, status, h, status == 503 ? 2 : 1, json, strlen(json));
}

/* Answers a routed request, remembering its status for the counts. */
static void td__respond_pend(td_pend_t *p, int status, const char *json) {
  p->status = status;
  td__respond_json(p->rid, status, json);
}

static void td__json_str(td_buf_t *b, const char *s, size_t n) {
  td_buf_u8(b, '"');
  for (size_t i = 0; i < n; i++) {
    unsigned char c = (unsigned char)s[i];
    if (c == '"' || c == '\\') { td_buf_u8(b, '\\'); td_buf_u8(b, c); }
    else if (c < 0x20) {
      char e[8];
      snprintf(e, sizeof(e), "\\u%04x", c);
      td_buf_put(b, e, 6);
    } else td_buf_u8(b, c);
  }
  td_buf_u8(b, '"');
}

/* Finds a string field in an encoded error table. */
static int td__blob_field(const uint8_t *p, size_t n, const char *key, const char **out, uint32_t *olen) {
  td_rd_t r;
  td_rd_init(&r, p, n);
  if (td_rd_u8(&r) != TD_T_TABLE) return -1;
  uint32_t narr = td_rd_u32(&r), nhash = td_rd_u32(&r);
  if (narr) return -1;
  for (uint32_t i = 0; i < nhash && !r.bad; i++) {
    if (td_rd_u8(&r) != TD_T_STR) return -1;
    uint32_t kl;
    const uint8_t *k = td_rd_str(&r, &kl);
    uint8_t vt = td_rd_u8(&r);
    if (vt != TD_T_STR) {
      /* Skip simple values; anything nested ends the search. */
      if (vt == TD_T_NUM) { td_rd_f64(&r); continue; }
      if (vt == TD_T_NIL || vt == TD_T_TRUE || vt == TD_T_FALSE) continue;
      return -1;
    }
    uint32_t vl;
    const uint8_t *v = td_rd_str(&r, &vl);
    if (!r.bad && kl == strlen(key) && !memcmp(k, key, kl)) {
      *out = (const char *)v;
      *olen = vl;
      return 0;
    }
  }
  return -1;
}

/* Counts a finished request by its status (0: none was sent, the client
 * left first: 499, as nginx logs it). */
static void td__count_code(td_dep_t *d, int status) {
  if (status == 0) status = 499;
  if (status >= 100 && status < 100 + TD_SERVE_CODES) d->codes[status - 100]++;
}

/* Counts an arrival in its second's slot. */
static void td__rate_bump(td_dep_t *d, uint64_t now_ns) {
  uint64_t sec = now_ns / 1000000000ull;
  int i = (int)(sec % TD_SERVE_RATE_SLOTS);
  if (d->rate_sec[i] != sec) d->rate_sec[i] = sec, d->rate_n[i] = 0;
  d->rate_n[i]++;
}

/* Requests per second that arrived over the last TD_SERVE_RATE_S whole seconds. */
static double td__rate(const td_dep_t *d, uint64_t now_ns) {
  uint64_t sec = now_ns / 1000000000ull, n = 0;
  for (int i = 0; i < TD_SERVE_RATE_SLOTS; i++)
    if (d->rate_sec[i] < sec && d->rate_sec[i] + TD_SERVE_RATE_S >= sec) n += d->rate_n[i];
  return (double)n / TD_SERVE_RATE_S;
}

static int td__float_cmp(const void *a, const void *b) {
  float x = *(const float *)a, y = *(const float *)b;
  return x < y ? -1 : x > y;
}

/* p50 and p99 (nearest rank, seconds) of the last requests; 0 when none. */
static int td__quantiles(const td_dep_t *d, double *p50, double *p99) {
  static float tmp[TD_SERVE_RECENT];
  size_t n = d->nrecent < TD_SERVE_RECENT ? (size_t)d->nrecent : TD_SERVE_RECENT;
  if (n == 0) return 0;
  memcpy(tmp, d->recent, n * sizeof(float));
  qsort(tmp, n, sizeof(float), td__float_cmp);
  *p50 = tmp[(n * 50 + 99) / 100 - 1];
  *p99 = tmp[(n * 99 + 99) / 100 - 1];
  return 1;
}

/* Requests waiting for a live replica (parked): the deployment's queue. */
static int td__queued(const td_dep_t *d) {
  int k = 0;
  for (const td_pend_t *p = S.pend; p; p = p->nxt) k += p->dep == d && p->parked_ns;
  return k;
}

static void td__pend_free(td_pend_t *p) {
  if (p->start_ns) {
    double s = (double)(uv_hrtime() - p->start_ns) / 1e9;
    int b = 0;
    while (b < TD_SERVE_NBUCKETS && s > td__serve_buckets[b]) b++;
    p->dep->lat[b]++;
    p->dep->lat_sum += s;
    p->dep->recent[p->dep->nrecent++ % TD_SERVE_RECENT] = (float)s;
    td__count_code(p->dep, p->status);
  }
  td_replica_t *r = td__rep(p->dep, p->actor_id);
  if (r && r->ongoing > 0) r->ongoing--;
  if (p->prev) p->prev->nxt = p->nxt; else S.pend = p->nxt;
  if (p->nxt) p->nxt->prev = p->prev;
  td_map_del(&S.by_rid, p->rid);
  if (p->stream) td_node_decref(td_ctx.node, p->stream);
  free(p->args);
  free(p);
}

/* Sends the request to a replica as a streaming call of __serve. */
static int td__dispatch(td_pend_t *p, uint64_t avoid) {
  td_replica_t *r = td__pick(p->dep, avoid);
  if (!r) return -1;
  td_spec_t s;
  memset(&s, 0, sizeof(s));
  s.kind = TD_K_ACTOR_CALL;
  s.actor_id = r->actor_id;
  strcpy(s.method, "__serve");
  s.nret = -1;
  uint64_t ret = td_node_new_id(td_ctx.node);
  s.rets = &ret;
  s.args = p->args;
  s.args_len = (uint32_t)p->args_len;
  const char *msg;
  if (td_node_submit(td_ctx.node, &s, &msg)) return -1;
  r->ongoing++;
  p->actor_id = r->actor_id;
  p->stream = ret;
  td_node_stream_window(td_ctx.node, ret, TD_SERVE_STREAM_ITEMS);
  p->next = 0;
  return 0;
}

/* A request that will not be retried (not idempotent) needs its encoded
 * copy no more once sent: a large body is not held twice meanwhile. */
static void td__drop_args(td_pend_t *p) {
  if (p->idempotent) return;
  free(p->args);
  p->args = NULL;
  p->args_len = 0;
}

/* Encodes the request as the single argument of __serve: a table. */
static void td__encode_req(td_buf_t *b, const td_http_request_t *q, const td_dep_t *d) {
  td_buf_reset(b);
  td_buf_u32(b, 1);
  td_buf_u8(b, TD_T_TABLE);
  td_buf_u32(b, 0);
  td_buf_u32(b, 7);
#define TD__KV(k, v, n) td_buf_u8(b, TD_T_STR); td_buf_str(b, k, strlen(k)); \
  td_buf_u8(b, TD_T_STR); td_buf_str(b, v, n);
  TD__KV("method", q->method, strlen(q->method));
  TD__KV("path", q->path, q->path_len);
  TD__KV("query_string", q->query, q->query_len);
  TD__KV("body", q->body ? q->body : "", q->body_len);
  TD__KV("route", d->prefix, d->plen);
  TD__KV("deployment", d->name, strlen(d->name));
#undef TD__KV
  td_buf_u8(b, TD_T_STR);
  td_buf_str(b, "headers", 7);
  td_buf_u8(b, TD_T_TABLE);
  td_buf_u32(b, 0);
  td_buf_u32(b, (uint32_t)q->nheaders);
  for (size_t i = 0; i < q->nheaders; i++) {
    td_buf_u8(b, TD_T_STR);
    td_buf_str(b, q->headers[i].name, q->headers[i].name_len);
    td_buf_u8(b, TD_T_STR);
    td_buf_str(b, q->headers[i].value, q->headers[i].value_len);
  }
}

/* /-/metrics: the ingress's counters per deployment in Prometheus text
 * format (scrape it beside the head's /metrics; docs/observability.md). */
static void td__prom_esc(char *out, size_t n, const char *s, size_t len) {
  size_t o = 0;
  for (size_t i = 0; i < len && o + 3 < n; i++) {
    if (s[i] == '"' || s[i] == '\\') out[o++] = '\\';
    out[o++] = s[i] == '\n' ? ' ' : s[i];
  }
  out[o] = 0;
}

/* "deployment=\"NAME\",route=\"ROUTE\"" for d's samples. */
static void td__labels(char *out, size_t n, const td_dep_t *d) {
  char en[140], ep[300];
  td__prom_esc(en, sizeof(en), d->name, strlen(d->name));
  td__prom_esc(ep, sizeof(ep), d->prefix, d->plen ? d->plen : 1);
  snprintf(out, n, "deployment=\"%s\",route=\"%s\"", en, ep);
}

static void td__metrics_family(td_buf_t *b, const char *name, const char *type, const char *help) {
  char t[512];
  td_buf_put(b, t, (size_t)snprintf(t, sizeof(t), "# HELP %s %s\n# TYPE %s %s\n", name, help, name, type));
}

static void td__metrics_codes(td_buf_t *b) {
  char t[600], lb[480];
  td__metrics_family(b, "tide_serve_requests_total", "counter",
                     "Requests answered, by deployment, route and status code (499: the client left first).");
  for (int i = 0; i < S.ndeps; i++) {
    td__labels(lb, sizeof(lb), &S.deps[i]);
    for (int c = 0; c < TD_SERVE_CODES; c++)
      if (S.deps[i].codes[c])
        td_buf_put(b, t,
                   (size_t)snprintf(t, sizeof(t), "tide_serve_requests_total{%s,code=\"%d\"} %llu\n", lb,
                                    c + 100, (unsigned long long)S.deps[i].codes[c]));
  }
}

static void td__metrics_histogram(td_buf_t *b) {
  char t[1600], lb[480];
  td__metrics_family(b, "tide_serve_request_duration_seconds", "histogram",
                     "Time from a request's arrival to the end of its response.");
  for (int i = 0; i < S.ndeps; i++) {
    td_dep_t *d = &S.deps[i];
    uint64_t cum = 0;
    td__labels(lb, sizeof(lb), d);
    for (int k = 0; k < TD_SERVE_NBUCKETS; k++) {
      cum += d->lat[k];
      td_buf_put(
          b, t,
          (size_t)snprintf(t, sizeof(t), "tide_serve_request_duration_seconds_bucket{%s,le=\"%g\"} %llu\n",
                           lb, td__serve_buckets[k], (unsigned long long)cum));
    }
    cum += d->lat[TD_SERVE_NBUCKETS];
    td_buf_put(b, t,
               (size_t)snprintf(t, sizeof(t),
                                "tide_serve_request_duration_seconds_bucket{%s,le=\"+Inf\"} %llu\n"
                                "tide_serve_request_duration_seconds_sum{%s} %.9g\n"
                                "tide_serve_request_duration_seconds_count{%s} %llu\n",
                                lb, (unsigned long long)cum, lb, d->lat_sum, lb, (unsigned long long)cum));
  }
}

/* The ingress's metrics in Prometheus text format into b (reset first):
 * served at /-/metrics, and by a daemon's /metrics (core.serve_metrics). */
static void td__metrics_text(td_buf_t *b) {
  td_buf_reset(b);
  char t[600], lb[480];
  static const struct {
    const char *name, *type, *help;
  } fams[] = {
      {"tide_serve_errors_total", "counter", "Requests that failed (500, or 503 with no live replica)."},
      {"tide_serve_rejected_total", "counter",
       "Requests refused with 503: every replica at max_ongoing_requests."},
      {"tide_serve_replicas", "gauge", "Replicas taking requests."},
      {"tide_serve_ongoing_requests", "gauge", "Requests being handled now."},
      {"tide_serve_queued_requests", "gauge", "Requests waiting for a live replica."},
  };
  td__metrics_codes(b);
  for (size_t f = 0; f < sizeof(fams) / sizeof(fams[0]); f++) {
    td__metrics_family(b, fams[f].name, fams[f].type, fams[f].help);
    for (int i = 0; i < S.ndeps; i++) {
      td_dep_t *d = &S.deps[i];
      int live = 0, ongoing = 0;
      for (int k = 0; k < d->nreps; k++) live += !d->reps[k].draining, ongoing += d->reps[k].ongoing;
      uint64_t v = f == 0   ? d->errors
                   : f == 1 ? d->rejected
                   : f == 2 ? (uint64_t)live
                   : f == 3 ? (uint64_t)ongoing
                            : (uint64_t)td__queued(d);
      td__labels(lb, sizeof(lb), d);
      td_buf_put(b, t,
                 (size_t)snprintf(t, sizeof(t), "%s{%s} %llu\n", fams[f].name, lb, (unsigned long long)v));
    }
  }
  td__metrics_histogram(b);
}

/* {"route": ..., "requests": n, ..., "codes": {"200": n}}: what
 * core.serve_stats has of d, but its replicas, as JSON into b. */
static void td__stats_json(td_buf_t *b, const td_dep_t *d, uint64_t now) {
  char t[400];
  int ongoing = 0;
  for (int k = 0; k < d->nreps; k++) ongoing += d->reps[k].ongoing;
  td_buf_put(b, "{\"route\":", 9);
  td__json_str(b, d->prefix, d->plen ? d->plen : 1);
  td_buf_put(b, t,
             (size_t)snprintf(
                 t, sizeof(t),
                 ",\"requests\":%llu,\"errors\":%llu,\"rejected\":%llu,\"rate\":%.9g,\"live\":%d,"
                 "\"ongoing\":%d,\"queued\":%d",
                 (unsigned long long)d->requests, (unsigned long long)d->errors,
                 (unsigned long long)d->rejected, td__rate(d, now), td__live(d), ongoing, td__queued(d)));
  double p50, p99;
  if (td__quantiles(d, &p50, &p99))
    td_buf_put(b, t, (size_t)snprintf(t, sizeof(t), ",\"p50\":%.9g,\"p99\":%.9g", p50, p99));
  td_buf_put(b, ",\"codes\":{", 10);
  for (int c = 0, first = 1; c < TD_SERVE_CODES; c++) {
    if (!d->codes[c]) continue;
    td_buf_put(b, t,
               (size_t)snprintf(t, sizeof(t), "%s\"%d\":%llu", first ? "" : ",", c + 100,
                                (unsigned long long)d->codes[c]));
    first = 0;
  }
  td_buf_put(b, "}}", 2);
}

/* On a node that is not the head, the ingress's stats and metrics go to the
 * head once a second, {"stats": {name: {...}}, "metrics": text}, so that
 * the head's /api/serve, /serve page and /metrics show this node's
 * deployments too (stdlib/tide/obs.lua). */
static void td__note_head(void) {
  uint64_t now = uv_hrtime();
  if (now - S.noted_ns < 1000000000ull || td_node_index(td_ctx.node) == 0) return;
  S.noted_ns = now;
  td_buf_t m, b;
  td_buf_init(&m);
  td_buf_init(&b);
  td__metrics_text(&m);
  td_buf_put(&b, "{\"metrics\":", 11);
  td__json_str(&b, (const char *)m.p, m.len);
  td_buf_put(&b, ",\"stats\":{", 10);
  for (int i = 0; i < S.ndeps; i++) {
    if (i) td_buf_u8(&b, ',');
    td__json_str(&b, S.deps[i].name, strlen(S.deps[i].name));
    td_buf_u8(&b, ':');
    td__stats_json(&b, &S.deps[i], now);
  }
  td_buf_put(&b, "}}", 2);
  td_node_note_head(td_ctx.node, "serve", b.p, b.len);
  td_buf_free(&m);
  td_buf_free(&b);
}

static void td__metrics(td_http_req_id rid) {
  td__metrics_text(&S.buf);
  td_http_header_t h[1] = {TD_HTTP_HDR("Content-Type", "text/plain; version=0.0.4; charset=utf-8")};
  td_http_respond(S.srv, rid, 200, h, 1, S.buf.p, S.buf.len);
}

static void td__on_request(const td_http_request_t *q) {
  if (q->path_len == 9 && !memcmp(q->path, "/-/status", 9)) {
    td_buf_reset(&S.buf);
    td_buf_put(&S.buf, "{\"deployments\":{", 16);
    for (int i = 0; i < S.ndeps; i++) {
      td_dep_t *d = &S.deps[i];
      int live = 0, ongoing = 0;
      for (int k = 0; k < d->nreps; k++) {
        live += !d->reps[k].draining;
        ongoing += d->reps[k].ongoing;
      }
      if (i) td_buf_u8(&S.buf, ',');
      td__json_str(&S.buf, d->name, strlen(d->name));
      char tmp[256];
      int n = snprintf(tmp, sizeof(tmp), ":{\"route\":");
      td_buf_put(&S.buf, tmp, (size_t)n);
      td__json_str(&S.buf, d->prefix, d->plen ? d->plen : 1);
      n = snprintf(tmp, sizeof(tmp),
                   ",\"replicas\":%d,\"ongoing\":%d,\"requests\":%llu,\"errors\":%llu,\"rejected\":%llu}",
                   live, ongoing, (unsigned long long)d->requests, (unsigned long long)d->errors,
                   (unsigned long long)d->rejected);
      td_buf_put(&S.buf, tmp, (size_t)n);
    }
    td_buf_put(&S.buf, "}}", 3);
    td__respond_json(q->id, 200, (const char *)S.buf.p);
    return;
  }
  if (q->path_len == 10 && !memcmp(q->path, "/-/metrics", 10)) {
    td__metrics(q->id);
    return;
  }
  if (q->path_len == 9 && !memcmp(q->path, "/-/routes", 9)) {
    td_buf_reset(&S.buf);
    td_buf_u8(&S.buf, '{');
    for (int i = 0; i < S.ndeps; i++) {
      if (i) td_buf_u8(&S.buf, ',');
      td__json_str(&S.buf, S.deps[i].prefix, S.deps[i].plen);
      td_buf_u8(&S.buf, ':');
      td__json_str(&S.buf, S.deps[i].name, strlen(S.deps[i].name));
    }
    td_buf_put(&S.buf, "}", 2);
    td__respond_json(q->id, 200, (const char *)S.buf.p);
    return;
  }
  td_dep_t *d = td__route(q->path, q->path_len);
  if (!d) {
    td__respond_json(q->id, 404, "{\"error\":\"no route matches this path\"}");
    return;
  }
  d->requests++;
  td_pend_t *p = td_xcalloc(1, sizeof(*p));
  p->rid = q->id;
  p->dep = d;
  p->start_ns = uv_hrtime();
  td__rate_bump(d, p->start_ns);
  snprintf(p->what, sizeof(p->what), "%s %.*s", q->method, (int)(q->path_len < 140 ? q->path_len : 140), q->path);
  p->idempotent = !strcmp(q->method, "GET") || !strcmp(q->method, "HEAD") ||
                  !strcmp(q->method, "PUT") || !strcmp(q->method, "DELETE");
  td__encode_req(&S.buf, q, d);
  p->args = td_xmalloc(S.buf.len);
  memcpy(p->args, S.buf.p, S.buf.len);
  p->args_len = S.buf.len;
  if (td__dispatch(p, 0) == 0) {
    td__drop_args(p);
  } else {
    if (td__live(d) == 0) {
      p->parked_ns = uv_hrtime();  /* td__on_tick dispatches it once a replica is back */
    } else {
      d->rejected++;
      td__count_code(d, 503);
      td__respond_json(q->id, 503, "{\"error\":\"every replica is at max_ongoing_requests; retry later\"}");
      free(p->args);
      free(p);
      return;
    }
  }
  p->nxt = S.pend;
  if (S.pend) S.pend->prev = p;
  S.pend = p;
  td_map_set(&S.by_rid, p->rid, p);
}

/* Asks for a drain notice once half the window is out. */
static void td__stream_pace(td_pend_t *p) {
  if (p->notified || p->unacked < TD_SERVE_STREAM_HIGH / 2) return;
  if (td_http_stream_notify(S.srv, p->rid, TD_SERVE_STREAM_LOW)) {
    p->unacked = 0;  /* no notice will come (the request is gone): do not wait for one */
    return;
  }
  p->notified = 1;
  p->notify_mark = p->unacked;
}

static void td__on_readable(void *ud) {
  (void)ud;
  td_http_event_t *ev;
  while ((ev = td_http_inbox_pop(S.ib))) {
    if (ev->kind == TD_HTTP_EV_REQUEST) {
      td__on_request(&ev->req);
    } else if (ev->kind == TD_HTTP_EV_DRAIN) {
      /* All but TD_SERVE_STREAM_LOW of what was out at the notice is gone. */
      td_pend_t *p = td_map_get(&S.by_rid, ev->id);
      if (p && p->notified) {
        p->notified = 0;
        p->unacked = p->unacked - p->notify_mark + TD_SERVE_STREAM_LOW;
        td__stream_pace(p);
      }
    } else {
      /* The client went away, or the ingress answered 504 itself (the
       * response took too long): stop the generation. */
      td_pend_t *p = td_map_get(&S.by_rid, ev->id);
      if (p) {
        if (p->stream) td_node_cancel(td_ctx.node, p->stream, 0);
        if (ev->reason == TD_HTTP_ABORT_TIMEOUT && !p->status) p->status = 504;
        td__pend_free(p);
      }
    }
    td_http_event_free(ev);
  }
}

/* Parses the header item: "F<status>\n" or "C<status>\n", header lines
 * "Name: value\n", a blank line, then (F) the whole body. */
static int td__start_response(td_pend_t *p, const char *s, size_t n) {
  if (n < 5 || (s[0] != 'F' && s[0] != 'C')) return -1;
  int status = atoi(s + 1);
  if (status < 100 || status > 599) status = 500;
  const char *e = s + n, *line = memchr(s, '\n', n);
  if (!line) return -1;
  p->status = status;
  line++;
  td_http_header_t h[32];
  size_t nh = 0;
  while (line < e && *line != '\n') {
    const char *nl = memchr(line, '\n', (size_t)(e - line));
    const char *colon = memchr(line, ':', nl ? (size_t)(nl - line) : (size_t)(e - line));
    if (!nl || !colon) return -1;
    if (nh < 32) {
      const char *v = colon + 1;
      while (v < nl && *v == ' ') v++;
      h[nh++] = (td_http_header_t){line, (size_t)(colon - line), v, (size_t)(nl - v)};
      if (h[nh - 1].value_len == 0) nh--;
    }
    line = nl + 1;
  }
  if (line < e) line++;
  if (s[0] == 'F') {
    td_http_respond(S.srv, p->rid, status, h, nh, line, (size_t)(e - line));
    return 1;
  }
  td_http_stream_start(S.srv, p->rid, status, h, nh);
  p->started = 1;
  return 0;
}

/* The replica's stream ended in an error: an idempotent request whose
 * replica died tries another one (or waits for one); otherwise the client
 * gets the kind of failure and an id, and the log the message. */
static void td__item_failed(td_pend_t *p, const uint8_t *b, size_t len) {
  const char *kind = "", *msg = "the request failed";
  uint32_t kl = 0, ml = (uint32_t)strlen(msg);
  td__blob_field(b, len, "kind", &kind, &kl);
  td__blob_field(b, len, "message", &msg, &ml);
  int died = kl == 14 && !memcmp(kind, "ActorDiedError", 14);
  if (died) {
    /* No new requests for it: the controller replaces it. */
    td_replica_t *r = td__rep(p->dep, p->actor_id);
    if (r) r->dead = 1;
  }
  if (!p->started && died && p->idempotent && !p->retried) {
    /* The replica died: an idempotent request tries another one, or
     * waits for a replacement when none is left. */
    uint64_t dead = p->actor_id;
    td_replica_t *r = td__rep(p->dep, dead);
    if (r && r->ongoing > 0) r->ongoing--;
    p->actor_id = 0;
    td_node_decref(td_ctx.node, p->stream);
    p->stream = 0;
    p->retried = 1;
    if (td__dispatch(p, dead) == 0) return;
    if (td__live(p->dep) == 0) {
      p->parked_ns = uv_hrtime();
      return;
    }
  }
  p->dep->errors++;
  /* The message (a traceback, server paths) goes to the log under an
   * id; the client gets the id and the kind of failure only. */
  char eid[17];
  td__error_id(eid);
  td__log_error(p, eid, kind, kl, msg, ml);
  if (p->started) {
    td_http_abort(S.srv, p->rid); /* no final chunk: the client sees it cut */
  } else {
    td_buf_reset(&S.buf);
    td_buf_put(&S.buf, "{\"error\":", 9);
    const char *say = died ? "the replica died while handling the request; retry" : "internal server error";
    td__json_str(&S.buf, say, strlen(say));
    td_buf_put(&S.buf, ",\"kind\":", 8);
    td__json_str(&S.buf, kind, kl);
    td_buf_put(&S.buf, ",\"id\":", 6);
    td__json_str(&S.buf, eid, 16);
    td_buf_put(&S.buf, "}", 2);
    td__respond_pend(p, died ? 503 : 500, (const char *)S.buf.p);
  }
  td__pend_free(p);
}

static void td__stop(void);

static void td__on_tick(void *ud) {
  (void)ud;
  /* An attached `tide serve run` that went away (stopped, killed) leaves
   * no ingress behind on the daemon: its replicas went with it. */
  if (S.owner && !td_node_proc_alive(td_ctx.node, S.owner)) {
    fprintf(stderr, "[serve] the client that started the ingress (%016llx) is gone: it stops\n",
            (unsigned long long)S.owner);
    td__stop();
    return;
  }
  td__note_head();
  td_pend_t *p = S.pend;
  while (p) {
    td_pend_t *nxt = p->nxt;
    if (p->parked_ns) {
      if (td__dispatch(p, 0) == 0) {
        p->parked_ns = 0;
        td__drop_args(p);
      } else if (uv_hrtime() - p->parked_ns > TD_SERVE_PARK_NS) {
        p->dep->errors++;
        td__respond_pend(
            p, 503,
            "{\"error\":\"the deployment has no live replica (they are being replaced); retry later\"}");
        td__pend_free(p);
        p = nxt;
        continue;
      } else {
        p = nxt;
        continue;
      }
    }
    for (;;) {
      uint64_t item;
      if (p->unacked >= TD_SERVE_STREAM_HIGH) break;  /* the client is behind: wait for a drain */
      int st = td_node_stream_item(td_ctx.node, p->stream, p->next, &item);
      if (st == TD_STREAM_NOT_YET) break;
      if (st == TD_STREAM_ENDED) {
        if (p->started) td_http_stream_end(S.srv, p->rid);
        else td__respond_pend(p, 500, "{\"error\":\"the handler produced no response\"}");
        td__pend_free(p);
        break;
      }
      p->next++;
      const uint8_t *b;
      size_t len;
      int is_err;
      if (td_node_bytes(td_ctx.node, item, &b, &len, &is_err)) continue;
      if (is_err) {
        td__item_failed(p, b, len);
        break;
      }
      /* Items are strings: the header item, then body chunks. */
      td_rd_t rd;
      td_rd_init(&rd, b, len);
      uint32_t sl = 0;
      const uint8_t *sp = td_rd_u8(&rd) == TD_T_STR ? td_rd_str(&rd, &sl) : NULL;
      if (!sp || rd.bad) continue;
      if (!p->started) {
        int rc = td__start_response(p, (const char *)sp, sl);
        if (rc != 0) {
          if (rc < 0) td__respond_pend(p, 500, "{\"error\":\"malformed response from the replica\"}");
          td__pend_free(p);
          break;
        }
        td_node_stream_release(td_ctx.node, p->stream, p->next - 1);
      } else {
        td_http_stream_write(S.srv, p->rid, sp, sl);  /* copies the bytes */
        td_node_stream_release(td_ctx.node, p->stream, p->next - 1);
        p->unacked += sl;
        td__stream_pace(p);
      }
    }
    p = nxt;
  }
}

/* -- Lua ------------------------------------------------------------------------ */

/* core.serve_start(host, port, max_body, timeout_ms, access_log) -> port;
 * access_log: "off" (or nil), "-" (stderr), or a file to append to. */
int td_serve_start(lua_State *L) {
  const char *host = luaL_optstring(L, 1, "127.0.0.1");
  int port = (int)luaL_optinteger(L, 2, 8000);
  const char *alog = luaL_optstring(L, 5, "off");
  if (!td_ctx.node) return luaL_error(L, "the cluster is not running");
  if (S.th && S.owner) {
    /* luaL_error's format knows no %llx: the id is made here. */
    char who[24];
    snprintf(who, sizeof(who), "%016llx", (unsigned long long)S.owner);
    return luaL_error(L, "a serve ingress already runs on this node (for the attached client %s, on port %d)",
                      who, td_http_thread_port(S.th));
  }
  if (S.th) return luaL_error(L, "the HTTP ingress is already running");
  pthread_mutex_init(&S.log_mu, NULL);
  S.access = NULL;
  S.access_owned = 0;
  if (!strcmp(alog, "-") || !strcmp(alog, "stderr")) {
    S.access = stderr;
  } else if (strcmp(alog, "off")) {
    S.access = fopen(alog, "a");
    if (!S.access) return luaL_error(L, "cannot open the access log %s: %s", alog, strerror(errno));
    S.access_owned = 1;
  }
  S.ib = td_http_inbox_new();
  td_map_init(&S.by_rid);
  td_buf_init(&S.buf);
  S.rng = 2463534242u;
  td_http_opts_t o;
  memset(&o, 0, sizeof(o));
  o.on_request = td_http_inbox_on_request;
  o.on_abort = td_http_inbox_on_abort;
  o.on_drain = td_http_inbox_on_drain;
  o.on_log = td__on_log;
  o.data = S.ib;
  o.max_body_bytes = (size_t)luaL_optnumber(L, 3, 0);
  o.response_timeout_ms = (uint64_t)luaL_optnumber(L, 4, 0);
  int rc = td_http_thread_start(&o, host, port, &S.th);
  if (rc) {
    if (S.access_owned) fclose(S.access);
    S.access = NULL;
    td_http_inbox_destroy(&S.ib);
    return luaL_error(L, "cannot listen on %s:%d: %s", host, port, td_strerror(rc));
  }
  S.srv = td_http_thread_server(S.th);
  S.watch = td_node_watch_add(td_ctx.node, td_http_inbox_fd(S.ib), td__on_readable, td__on_tick, NULL);
  if (S.watch < 0) {
    td__stop();
    return luaL_error(L, "cannot serve: the node watches as many fds as it can");
  }
  S.owner = td_ctx.rpc_caller;
  lua_pushinteger(L, td_http_thread_port(S.th));
  return 1;
}

/* core.serve_deployment(name, route, max_ongoing) */
int td_serve_deployment(lua_State *L) {
  const char *name = luaL_checkstring(L, 1);
  size_t plen;
  const char *prefix = luaL_checklstring(L, 2, &plen);
  int max_ongoing = (int)luaL_optinteger(L, 3, 100);
  td_dep_t *d = NULL;
  for (int i = 0; i < S.ndeps; i++)
    if (!strcmp(S.deps[i].name, name)) d = &S.deps[i];
  if (!d) {
    if (S.ndeps == TD_SERVE_MAX_DEPS) return luaL_error(L, "too many deployments");
    d = &S.deps[S.ndeps++];
    memset(d, 0, sizeof(*d));
    snprintf(d->name, sizeof(d->name), "%s", name);
  }
  if (plen >= sizeof(d->prefix)) return luaL_error(L, "route too long");
  memcpy(d->prefix, prefix, plen + 1);
  d->plen = plen;
  if (plen > 1 && prefix[plen - 1] == '/') d->plen--;
  d->max_ongoing = max_ongoing > 0 ? max_ongoing : 100;
  return 0;
}

static td_dep_t *td__checkdep(lua_State *L, int idx) {
  const char *name = luaL_checkstring(L, idx);
  for (int i = 0; i < S.ndeps; i++)
    if (!strcmp(S.deps[i].name, name)) return &S.deps[i];
  luaL_error(L, "no deployment named %s", name);
  return NULL;
}

/* core.serve_replicas(name, {actor_id, ...}): new replicas take traffic;
 * replicas left out drain (no new requests) until removed. */
int td_serve_replicas(lua_State *L) {
  td_dep_t *d = td__checkdep(L, 1);
  luaL_checktype(L, 2, LUA_TTABLE);
  for (int i = 0; i < d->nreps; i++) d->reps[i].draining = 1;
  int n = (int)lua_objlen(L, 2);
  for (int i = 1; i <= n; i++) {
    lua_rawgeti(L, 2, i);
    uint64_t id;
    if (td_core_toid(L, -1, &id)) return luaL_error(L, "serve_replicas: entry %d is not an actor id", i);
    lua_pop(L, 1);
    td_replica_t *r = td__rep(d, id);
    if (r) { r->draining = 0; continue; }
    if (d->nreps == d->capreps) {
      d->capreps = d->capreps ? d->capreps * 2 : 8;
      d->reps = td_xrealloc(d->reps, (size_t)d->capreps * sizeof(td_replica_t));
    }
    d->reps[d->nreps++] = (td_replica_t){id, 0, 0, 0};
  }
  return 0;
}

/* core.serve_remove(name, actor_id): forgets a drained replica. */
int td_serve_remove(lua_State *L) {
  td_dep_t *d = td__checkdep(L, 1);
  uint64_t id = td_core_checkid(L, 2, "actor");
  for (int i = 0; i < d->nreps; i++) {
    if (d->reps[i].actor_id != id) continue;
    d->reps[i] = d->reps[--d->nreps];
    break;
  }
  return 0;
}

static void td__set_num(lua_State *L, const char *k, double v) {
  lua_pushnumber(L, v);
  lua_setfield(L, -2, k);
}

/* Pushes {["200"] = n, ...}: d's finished requests by status. */
static void td__push_codes(lua_State *L, const td_dep_t *d) {
  lua_newtable(L);
  for (int c = 0; c < TD_SERVE_CODES; c++) {
    if (!d->codes[c]) continue;
    lua_pushfstring(L, "%d", c + 100);
    lua_pushnumber(L, (lua_Number)d->codes[c]);
    lua_settable(L, -3);
  }
}

static void td__push_replicas(lua_State *L, const td_dep_t *d) {
  lua_createtable(L, d->nreps, 0);
  for (int k = 0; k < d->nreps; k++) {
    lua_createtable(L, 0, 3);
    td_core_pushid(L, d->reps[k].actor_id);
    lua_setfield(L, -2, "id");
    lua_pushinteger(L, d->reps[k].ongoing);
    lua_setfield(L, -2, "ongoing");
    lua_pushboolean(L, d->reps[k].draining);
    lua_setfield(L, -2, "draining");
    lua_rawseti(L, -2, k + 1);
  }
}

/* core.serve_stats() -> {name = {route, requests, errors, rejected, codes =
 * {["200"] = n}, rate (req/s), p50, p99 (s; absent before a request
 * finished), live, ongoing, queued, replicas = {{id, ongoing, draining}}}} */
int td_serve_stats(lua_State *L) {
  uint64_t now = uv_hrtime();
  lua_createtable(L, 0, S.ndeps);
  for (int i = 0; i < S.ndeps; i++) {
    td_dep_t *d = &S.deps[i];
    lua_createtable(L, 0, 14);
    lua_pushlstring(L, d->prefix, d->plen ? d->plen : 1);
    lua_setfield(L, -2, "route");
    td__set_num(L, "requests", (double)d->requests);
    td__set_num(L, "errors", (double)d->errors);
    td__set_num(L, "rejected", (double)d->rejected);
    td__set_num(L, "rate", td__rate(d, now));
    double p50, p99;
    if (td__quantiles(d, &p50, &p99)) td__set_num(L, "p50", p50), td__set_num(L, "p99", p99);
    int ongoing = 0;
    for (int k = 0; k < d->nreps; k++) ongoing += d->reps[k].ongoing;
    td__set_num(L, "live", td__live(d));
    td__set_num(L, "ongoing", ongoing);
    td__set_num(L, "queued", td__queued(d));
    td__push_codes(L, d);
    lua_setfield(L, -2, "codes");
    td__push_replicas(L, d);
    lua_setfield(L, -2, "replicas");
    lua_setfield(L, -2, d->name);
  }
  return 1;
}

/* core.serve_metrics() -> the ingress's Prometheus text ("" when none runs). */
static int s_metrics(lua_State *L) {
  if (!S.th) {
    lua_pushliteral(L, "");
    return 1;
  }
  td__metrics_text(&S.buf);
  lua_pushlstring(L, (const char *)S.buf.p, S.buf.len);
  return 1;
}

static void td__stop(void) {
  if (!S.th) return;
  if (td_ctx.node) td_node_note_head(td_ctx.node, "serve", "", 0); /* the head forgets it */
  S.noted_ns = 0;
  if (S.watch > 0) td_node_watch_remove(td_ctx.node, S.watch);
  S.watch = 0;
  S.owner = 0;
  td_http_thread_stop(&S.th);
  if (S.access_owned) fclose(S.access);
  S.access = NULL;
  while (S.pend) td__pend_free(S.pend);
  td_http_inbox_destroy(&S.ib);
  for (int i = 0; i < S.ndeps; i++) free(S.deps[i].reps);
  S.ndeps = 0;
  td_map_free(&S.by_rid);
  td_buf_free(&S.buf);
  S.srv = NULL;
}

int td_serve_stop(lua_State *L) {
  (void)L;
  td__stop();
  return 0;
}

/* The driver's serve_* that are not control ops (the others: td__rpc_table). */
void td_serve_register(lua_State *L) {
  static const luaL_Reg fns[] = {{"serve_metrics", s_metrics}, {NULL, NULL}};
  luaL_register(L, NULL, fns);
}
