/* Introspection of a head's tables: rows for `tide list` and the
 * dashboard (filtered and paged here), the Prometheus text of /metrics,
 * and the history of failed tasks. See introspect.h.
 */
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <sys/stat.h>
#include <stdarg.h>
#include <stddef.h>
#include <unistd.h>

#include "introspect.h"
#include "node_int.h"
#include "value.h"

/* -- JSON ------------------------------------------------------------------ */

void td_json_str(td_buf_t *out, const char *s, size_t len) {
  static const char hex[] = "0123456789abcdef";
  td_buf_u8(out, '"');
  for (size_t i = 0; i < len; i++) {
    unsigned char c = (unsigned char)s[i];
    if (c == '"' || c == '\\') {
      td_buf_u8(out, '\\');
      td_buf_u8(out, c);
    } else if (c == '\n') {
      td_buf_put(out, "\\n", 2);
    } else if (c < 0x20 || c == 0x7f) {
      char u[6] = {'\\', 'u', '0', '0', hex[c >> 4], hex[c & 15]};
      td_buf_put(out, u, 6);
    } else {
      td_buf_u8(out, c);
    }
  }
  td_buf_u8(out, '"');
}

static void td__puts(td_buf_t *b, const char *s) { td_buf_put(b, s, strlen(s)); }

static void td__printf(td_buf_t *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void td__printf(td_buf_t *b, const char *fmt, ...) {
  char tmp[512];
  va_list ap;
  va_start(ap, fmt);
  int k = vsnprintf(tmp, sizeof(tmp), fmt, ap);
  va_end(ap);
  if (k > 0) td_buf_put(b, tmp, (size_t)k < sizeof(tmp) ? (size_t)k : sizeof(tmp) - 1);
}

static void td__hexid(char out[17], uint64_t id) {
  static const char hex[] = "0123456789abcdef";
  for (int i = 15; i >= 0; i--, id >>= 4) out[i] = hex[id & 15];
  out[16] = 0;
}

/* -- Rows ------------------------------------------------------------------ */

/* One row being built: its fields as text (numbers as JSON numbers, raw
 * fields as JSON already), kept in one buffer so filters can compare
 * them before anything is written out. */
#define TD_ROW_MAX 32
enum { F_STR, F_NUM, F_RAW };
typedef struct td_row {
  int n;
  const char *key[TD_ROW_MAX];
  uint8_t type[TD_ROW_MAX];
  size_t off[TD_ROW_MAX]; /* each value's offset in b, NUL-terminated */
  td_buf_t b;
  const td_list_req_t *q; /* its filters: a field that fails one ends the row's building */
  int reject;             /* 1: a filter failed; 2: all passed and it is not written (only
                             counted): either way the rest is not formatted */
  int show;               /* it would be written if it matches */
  uint32_t passed;        /* bit f: filter f passed */
} td_row_t;

static void td__field(td_row_t *r, const char *key, int type, const char *v, size_t len) {
  if (r->n == TD_ROW_MAX || r->reject) return;
  for (int f = 0; r->q && f < r->q->nfilter; f++) {
    if (strcmp(r->q->key[f], key)) continue;
    if (strlen(r->q->val[f]) != len || memcmp(r->q->val[f], v, len)) r->reject = 1;
    else r->passed |= 1u << f;
  }
  if (!r->reject && r->q && r->q->nfilter && !r->show && r->passed == (1u << r->q->nfilter) - 1) r->reject = 2;
  r->key[r->n] = key;
  r->type[r->n] = (uint8_t)type;
  r->off[r->n] = r->b.len;
  td_buf_put(&r->b, v, len);
  td_buf_u8(&r->b, 0);
  r->n++;
}
static void rs(td_row_t *r, const char *key, const char *v) { td__field(r, key, F_STR, v ? v : "", v ? strlen(v) : 0); }
static void rn(td_row_t *r, const char *key, double v) {
  if (r->reject) return;
  char t[40];
  int k = isfinite(v) ? (v == floor(v) && fabs(v) < 9e15 ? snprintf(t, sizeof(t), "%.0f", v)
                                                          : snprintf(t, sizeof(t), "%.6g", v))
                      : snprintf(t, sizeof(t), "null");
  td__field(r, key, F_NUM, t, (size_t)k);
}
static void rid(td_row_t *r, const char *key, uint64_t id) {
  if (r->reject) return;
  char h[17];
  td__hexid(h, id);
  td__field(r, key, F_STR, h, 16);
}
static void rraw(td_row_t *r, const char *key, td_buf_t *json) { td__field(r, key, F_RAW, (const char *)json->p, json->len); }

/* Every field a kind's rows have, for the error that names a bad filter. */
static const char *const td__keys_nodes[] = {"node_id", "index", "name", "address", "state", "workers", "actors",
  "tasks_running", "tasks_queued", "objects", "store_used", "store_capacity", "spilled_bytes", "bytes_sent",
  "bytes_from_peers", "resources", "available", NULL};
static const char *const td__keys_actors[] = {"actor_id", "state", "name", "namespace", "class_id", "node",
  "worker_id", "pid", "restarts", "detached", "queued_calls", "death_reason", NULL};
static const char *const td__keys_tasks[] = {"task_id", "ref", "name", "type", "state", "node", "worker_id", "pid",
  "actor_id", "method", "attempt", "running_s", "wait_reason", "error_kind", "error", "traceback", NULL};
static const char *const td__keys_objects[] = {"object_id", "state", "size",   "where",   "node",
                                               "refs",      "pins",  "stream", "fetched", NULL};
static const char *const td__keys_pgs[] = {"pg_id", "name", "state", "strategy", "bundles", "nodes", "detached",
  NULL};

typedef struct td_lister {
  const td_list_req_t *q;
  td_buf_t *out;
  td_row_t row;
  long total, matched, written;
} td_lister_t;

/* Whether the next row must be built: to test it against filters, or to
 * write it. Otherwise it is only counted (a page of 50 of 100,000 actors
 * builds 50 rows). */
static int td__need(td_lister_t *ls) {
  if (ls->q->nfilter || (ls->matched >= ls->q->offset && ls->written < ls->q->limit)) return 1;
  ls->total++;
  ls->matched++;
  return 0;
}

static int td__known(const char *const *keys, const char *k) {
  for (int i = 0; keys[i]; i++)
    if (!strcmp(keys[i], k)) return 1;
  return 0;
}

/* Ends the row being built: counted, kept if every filter matches, written
 * if it falls in the page. */
static void td__emit(td_lister_t *ls) {
  td_row_t *r = &ls->row;
  ls->total++;
  if (r->reject == 2) ls->matched++;
  if (r->reject) goto done;
  for (int f = 0; f < ls->q->nfilter; f++) {
    int ok = 0;
    for (int i = 0; i < r->n && !ok; i++)
      if (!strcmp(r->key[i], ls->q->key[f])) ok = !strcmp((const char *)r->b.p + r->off[i], ls->q->val[f]);
    if (!ok) goto done;
  }
  ls->matched++;
  if (ls->matched > ls->q->offset && ls->written < ls->q->limit) {
    td_buf_t *o = ls->out;
    if (ls->written++) td_buf_u8(o, ',');
    td_buf_u8(o, '{');
    for (int i = 0; i < r->n; i++) {
      if (i) td_buf_u8(o, ',');
      td_json_str(o, r->key[i], strlen(r->key[i]));
      td_buf_u8(o, ':');
      const char *v = (const char *)r->b.p + r->off[i];
      if (r->type[i] == F_STR) td_json_str(o, v, strlen(v));
      else td__puts(o, v);
    }
    td_buf_u8(o, '}');
  }
done:
  r->n = 0;
  r->reject = 0;
  r->passed = 0;
  r->show = ls->matched >= ls->q->offset && ls->written < ls->q->limit;
  td_buf_reset(&r->b);
}

/* {"CPU": 4, ...} of a table of amounts by resource index. */
static void td__res_json(td_node_t *n, td_buf_t *b, const double *v) {
  td_buf_reset(b);
  td_buf_u8(b, '{');
  for (int i = 0; i < n->sched.nres; i++) {
    if (i) td_buf_u8(b, ',');
    td_json_str(b, n->sched.resname[i], strlen(n->sched.resname[i]));
    td__printf(b, v[i] == floor(v[i]) && fabs(v[i]) < 9e15 ? ":%.0f" : ":%.17g", v[i]);
  }
  td_buf_u8(b, '}');
}

/* -- Kinds ----------------------------------------------------------------- */

static void td__list_nodes(td_node_t *n, td_lister_t *ls) {
  td_node_info_t info[TD_NODE_MAX + 1];
  int k = td_node_cluster(n, info, TD_NODE_MAX + 1);
  td_buf_t tmp;
  td_buf_init(&tmp);
  for (int i = 0; i < k; i++) {
    td_row_t *r = &ls->row;
    char id[32];
    snprintf(id, sizeof(id), "node-%u", info[i].index);
    rs(r, "node_id", id);
    rn(r, "index", info[i].index);
    rs(r, "name", info[i].name);
    rs(r, "address", info[i].address);
    rs(r, "state", info[i].alive ? "ALIVE" : "DEAD");
    const td_node_stats_t *st = &info[i].st;
    if (info[i].has_st) {
      rn(r, "workers", st->workers);
      rn(r, "actors", st->actors);
      rn(r, "tasks_running", st->tasks_running);
      rn(r, "tasks_queued", st->tasks_queued);
      rn(r, "objects", (double)st->objects);
      rn(r, "store_used", (double)st->store_used);
      rn(r, "store_capacity", (double)st->store_capacity);
      rn(r, "spilled_bytes", (double)st->spilled_bytes);
      rn(r, "bytes_sent", (double)st->bytes_sent);
      rn(r, "bytes_from_peers", (double)st->bytes_from_peers);
    } else {
      rn(r, "actors", info[i].actors);
      rn(r, "tasks_running", info[i].tasks);
    }
    td__res_json(n, &tmp, info[i].total);
    rraw(r, "resources", &tmp);
    td__res_json(n, &tmp, info[i].avail);
    rraw(r, "available", &tmp);
    td__emit(ls);
  }
  td_buf_free(&tmp);
}

static const char *const td__actor_states[] = {"PENDING", "ALIVE", "RESTARTING", "DEAD"};

/* The node index a worker or link stands for (this node's own workers: n->links.index). */
static uint32_t td__wk_node(td_node_t *n, const td_wk_t *wk) {
  return wk && wk->kind == WK_NODE ? wk->node_index : n->links.index;
}

static void td__list_actors(td_node_t *n, td_lister_t *ls) {
  size_t it = 0;
  td_actor_t *a;
  while (td_map_next(&n->actors.map, &it, NULL, (void **)&a)) {
    if (!td__need(ls)) continue;
    td_row_t *r = &ls->row;
    rid(r, "actor_id", a->id);
    rs(r, "state", a->state >= 0 && a->state <= A_DEAD ? td__actor_states[a->state] : "?");
    const td_spec_t *s = a->create ? &a->create->spec : NULL;
    rs(r, "name", s ? s->name : "");
    rs(r, "namespace", s ? s->ns : "");
    if (s) rid(r, "class_id", s->fn_id);
    td_wk_t *w = a->host ? a->host : a->res_node;
    char node[24];
    snprintf(node, sizeof(node), "node-%u", td__wk_node(n, w));
    rs(r, "node", w || a->state == A_ALIVE ? node : "");
    if (w && w->kind != WK_NODE) {
      rid(r, "worker_id", w->id);
      rn(r, "pid", w->pid);
    }
    if (s) rn(r, "restarts", s->max_restarts < 0 ? -a->restarts_left : s->max_restarts - a->restarts_left);
    rs(r, "detached", s && s->detached ? "true" : "false");
    rn(r, "queued_calls", a->queue.len);
    if (a->reason) rs(r, "death_reason", a->reason);
    td__emit(ls);
  }
}

/* -- Failed tasks: a ring of the last TD_FAILED_KEEP ----------------------- */

typedef struct td_failed {
  uint64_t task, ref, actor, worker;
  uint32_t node, attempt;
  int pid;
  uint8_t type;
  char name[128], method[64], kind[64];
  char *message, *traceback; /* owned */
} td_failed_t;

static td_failed_t td__failed[TD_FAILED_KEEP];
static uint64_t td__nfailed; /* failures ever; td__failed[(i) % KEEP] */
uint64_t td__obs_finished;

/* Skips one encoded value of the kinds an error table holds; 0, or -1 on
 * anything else (the caller stops reading there). */
static int td__blob_skip(td_rd_t *rd, int depth) {
  uint8_t tag = td_rd_u8(rd);
  uint32_t l;
  switch (tag) {
    case TD_T_NIL: case TD_T_FALSE: case TD_T_TRUE: return rd->bad ? -1 : 0;
    case TD_T_NUM: td_rd_f64(rd); return rd->bad ? -1 : 0;
    case TD_T_STR: td_rd_str(rd, &l); return rd->bad ? -1 : 0;
    case TD_T_TABLE: {
      uint32_t narr = td_rd_u32(rd), nhash = td_rd_u32(rd);
      if (rd->bad || depth > 4 || narr > 1024 || nhash > 1024) return -1;
      for (uint32_t i = 0; i < narr + 2 * nhash; i++)
        if (td__blob_skip(rd, depth + 1)) return -1;
      return 0;
    }
    default: return -1;
  }
}

/* Reads the string fields kind, message and traceback of an encoded error
 * table (tide.boot's errfmt: those, and task, pid, cause). */
static void td__blob_fields(const uint8_t *blob, size_t len, td_failed_t *f) {
  td_rd_t rd;
  td_rd_init(&rd, blob, len);
  if (td_rd_u8(&rd) != TD_T_TABLE) return;
  uint32_t narr = td_rd_u32(&rd), nhash = td_rd_u32(&rd);
  if (rd.bad || narr) return;
  for (uint32_t i = 0; i < nhash && i < 64; i++) {
    uint32_t kl, vl;
    if (td_rd_u8(&rd) != TD_T_STR) return;
    const uint8_t *k = td_rd_str(&rd, &kl);
    if (rd.bad || rd.p >= rd.end) return;
    if (*rd.p != TD_T_STR) {
      if (td__blob_skip(&rd, 0)) return;
      continue;
    }
    td_rd_u8(&rd);
    const uint8_t *v = td_rd_str(&rd, &vl);
    if (rd.bad) return;
    if (kl == 4 && !memcmp(k, "kind", 4)) snprintf(f->kind, sizeof(f->kind), "%.*s", (int)vl, (const char *)v);
    else if (kl == 7 && !memcmp(k, "message", 7) && !f->message) f->message = strndup((const char *)v, vl);
    else if (kl == 9 && !memcmp(k, "traceback", 9) && !f->traceback) f->traceback = strndup((const char *)v, vl);
  }
}

void td__obs_failed(td_node_t *n, struct td_task *t, const uint8_t *blob, size_t len, const char *kind,
                    const char *msg) {
  td_failed_t *f = &td__failed[td__nfailed++ % TD_FAILED_KEEP];
  free(f->message);
  free(f->traceback);
  memset(f, 0, sizeof(*f));
  f->task = t->id;
  f->ref = t->spec.nret != 0 ? t->spec.rets[0] : 0;
  f->type = t->spec.kind;
  f->actor = t->spec.actor_id;
  f->attempt = t->attempt;
  f->node = td__wk_node(n, t->wk);
  if (t->wk && t->wk->kind != WK_NODE) f->worker = t->wk->id, f->pid = t->wk->pid;
  snprintf(f->name, sizeof(f->name), "%s", t->spec.name);
  snprintf(f->method, sizeof(f->method), "%s", t->spec.method);
  if (blob) td__blob_fields(blob, len, f);
  if (kind) snprintf(f->kind, sizeof(f->kind), "%s", kind);
  if (msg && !f->message) f->message = strdup(msg);
}

/* A live actor keeps its creation task (for restarts): the actor is listed
 * under actors, not as a task running for ever. */
static int td__live_creation(const td_task_t *t) {
  return t->spec.kind == TD_K_ACTOR_NEW && t->actor && t->actor->create == t && t->actor->state != A_PENDING;
}

static const char *const td__types[] = {"TASK", "ACTOR_CREATION", "ACTOR_CALL"};

/* Why a queued task waits, as far as this node can tell. */
static void td__wait_reason(td_node_t *n, td_task_t *t, char *why, size_t len) {
  why[0] = 0;
  if (t->state == T_WAITDEPS) {
    snprintf(why, len, "dependencies: %u argument%s not ready", t->deps_pending, t->deps_pending == 1 ? "" : "s");
    return;
  }
  if (t->state == T_FETCHING) {
    snprintf(why, len, "done; its result is being fetched from the node that made it");
    return;
  }
  if (t->on != &n->sched.queue) {
    if (t->actor && t->spec.kind == TD_K_ACTOR_CALL)
      snprintf(why, len, "actor: queued behind the actor's other calls (actor %s)",
               t->actor->state == A_ALIVE ? "alive" : td__actor_states[t->actor->state]);
    return;
  }
  if (t->unplaced) {
    snprintf(why, len, "infeasible for now: no node has what it asks for; waiting for departed nodes to rejoin");
    return;
  }
  if (t->spec.pg_id) {
    td_pg_t *pg = td__pg(n, t->spec.pg_id);
    if (!pg || pg->removed) { snprintf(why, len, "infeasible: its placement group was removed"); return; }
    if (!pg->created) { snprintf(why, len, "placement group: waiting for its bundles to be reserved"); return; }
  }
  for (int i = 0; i < t->nres; i++) {
    int r = t->res_idx[i];
    if (t->res_amt[i] > td__cluster_max(n, r) + 1e-9) {
      snprintf(why, len, "infeasible: it requires %s = %g but the most any node has is %g",
               n->sched.resname[r], t->res_amt[i], td__cluster_max(n, r));
      return;
    }
  }
  /* Feasible: is there a node with the resources free now? */
  int fits = td__fits(n->sched.avail, t);
  for (int i = 0; i < n->procs.n && !fits; i++) {
    td_wk_t *w = n->procs.list[i];
    if (w->kind == WK_NODE && w->joined && !w->dead && td__fits(w->navail, t)) fits = 1;
  }
  if (fits) {
    snprintf(why, len, "scheduling: resources are free; waiting for a worker");
    return;
  }
  char need[256] = "";
  size_t k = 0;
  for (int i = 0; i < t->nres && k < sizeof(need) - 40; i++)
    k += (size_t)snprintf(need + k, sizeof(need) - k, "%s%s = %g", i ? ", " : "",
                          n->sched.resname[t->res_idx[i]], t->res_amt[i]);
  snprintf(why, len, "resources: waiting for %s to be free", need);
}

static void td__list_tasks(td_node_t *n, td_lister_t *ls) {
  size_t it = 0;
  td_task_t *t;
  double now = td_now();
  char why[400];
  while (td_map_next(&n->tasks.map, &it, NULL, (void **)&t)) {
    if (t->state == T_DONE) continue;
    if (td__live_creation(t) || !td__need(ls)) continue;
    td_row_t *r = &ls->row;
    rid(r, "task_id", t->id);
    if (t->spec.nret != 0) rid(r, "ref", t->spec.rets[0]);
    rs(r, "name", t->spec.name);
    rs(r, "type", td__types[t->spec.kind <= TD_K_ACTOR_CALL ? t->spec.kind : 0]);
    const char *state = t->state == T_SENT ? "RUNNING" : t->state == T_FETCHING ? "FETCHING"
                        : t->state == T_WAITDEPS ? "WAITING_DEPS" : "QUEUED";
    rs(r, "state", state);
    if (t->state == T_SENT && t->wk) {
      char node[24];
      snprintf(node, sizeof(node), "node-%u", td__wk_node(n, t->wk));
      rs(r, "node", node);
      if (t->wk->kind != WK_NODE) {
        rid(r, "worker_id", t->wk->id);
        rn(r, "pid", t->wk->pid);
      }
      rn(r, "running_s", t->sent_at > 0 ? now - t->sent_at : 0);
    }
    if (t->spec.kind != TD_K_TASK) rid(r, "actor_id", t->spec.actor_id);
    if (t->spec.kind == TD_K_ACTOR_CALL) rs(r, "method", t->spec.method);
    rn(r, "attempt", t->attempt);
    if (t->state != T_SENT) {
      td__wait_reason(n, t, why, sizeof(why));
      if (why[0]) rs(r, "wait_reason", why);
    }
    td__emit(ls);
  }
  /* Then the failed ones still remembered, newest first. */
  uint64_t kept = td__nfailed < TD_FAILED_KEEP ? td__nfailed : TD_FAILED_KEEP;
  for (uint64_t i = 0; i < kept; i++) {
    td_failed_t *f = &td__failed[(td__nfailed - 1 - i) % TD_FAILED_KEEP];
    td_row_t *r = &ls->row;
    rid(r, "task_id", f->task);
    if (f->ref) rid(r, "ref", f->ref);
    rs(r, "name", f->name);
    rs(r, "type", td__types[f->type <= TD_K_ACTOR_CALL ? f->type : 0]);
    rs(r, "state", "FAILED");
    char node[24];
    snprintf(node, sizeof(node), "node-%u", f->node);
    rs(r, "node", node);
    if (f->worker) {
      rid(r, "worker_id", f->worker);
      rn(r, "pid", f->pid);
    }
    if (f->type != TD_K_TASK) rid(r, "actor_id", f->actor);
    if (f->type == TD_K_ACTOR_CALL) rs(r, "method", f->method);
    rn(r, "attempt", f->attempt);
    rs(r, "error_kind", f->kind);
    rs(r, "error", f->message ? f->message : "");
    if (f->traceback && f->traceback[0]) rs(r, "traceback", f->traceback);
    td__emit(ls);
  }
}

static void td__list_objects(td_node_t *n, td_lister_t *ls) {
  size_t it = 0;
  td_obj_t *o;
  static const char *const states[] = {"PENDING", "READY", "ERROR"};
  static const char *const locs[] = {"none", "inline", "shm", "spilled"};
  while (td_map_next(&n->objs.map, &it, NULL, (void **)&o)) {
    if (!td__need(ls)) continue;
    td_row_t *r = &ls->row;
    rid(r, "object_id", o->id);
    rs(r, "state", o->state <= OBJ_ERROR ? states[o->state] : "?");
    rn(r, "size", (double)o->len);
    char where[32];
    if (o->away) snprintf(where, sizeof(where), "node-%u", o->up - 1);
    else if (o->foreign) snprintf(where, sizeof(where), "node-%u (foreign)", td_id_node(o->id));
    else snprintf(where, sizeof(where), "%s", o->loc <= LOC_SPILLED ? locs[o->loc] : "?");
    rs(r, "where", where);
    char node[24];
    snprintf(node, sizeof(node), "node-%u", td_id_node(o->id));
    rs(r, "node", node);
    rn(r, "refs", (double)o->refs);
    rn(r, "pins", o->pins);
    rs(r, "stream", o->is_stream ? "true" : "false");
    /* Bytes landed of a value being fetched from another node in chunks. */
    rn(r, "fetched", o->chunked && o->state == OBJ_PENDING ? (double)o->got : 0);
    td__emit(ls);
  }
}

static void td__list_pgs(td_node_t *n, td_lister_t *ls) {
  td_buf_t tmp, one;
  td_buf_init(&tmp);
  td_buf_init(&one);
  for (td_pg_t *pg = n->pgs.list; pg; pg = pg->next) {
    td_row_t *r = &ls->row;
    rid(r, "pg_id", pg->id);
    rs(r, "name", pg->name);
    rs(r, "state", pg->removed ? "REMOVED" : pg->created ? "CREATED" : "PENDING");
    const char *strategy = td_code_name(td_pg_strategy_codes, pg->strategy);
    rs(r, "strategy", strategy ? strategy : "?");
    td_buf_reset(&tmp);
    td_buf_u8(&tmp, '[');
    for (int b = 0; b < pg->nb; b++) {
      if (b) td_buf_u8(&tmp, ',');
      double v[TD_NRES_MAX];
      for (int i = 0; i < TD_NRES_MAX; i++) v[i] = pg->total[b][i];
      td__res_json(n, &one, v);
      td_buf_put(&tmp, one.p, one.len);
    }
    td_buf_u8(&tmp, ']');
    rraw(r, "bundles", &tmp);
    td_buf_reset(&tmp);
    td_buf_u8(&tmp, '[');
    for (int b = 0; pg->where && pg->created && b < pg->nb; b++) {
      if (b) td_buf_u8(&tmp, ',');
      if (pg->where[b] == TD__NOWHERE) td__puts(&tmp, "null");
      else td__printf(&tmp, "\"node-%u\"", pg->where[b]);
    }
    td_buf_u8(&tmp, ']');
    rraw(r, "nodes", &tmp);
    rs(r, "detached", pg->detached ? "true" : "false");
    td__emit(ls);
  }
  td_buf_free(&tmp);
  td_buf_free(&one);
}

static const struct td_kind {
  const char *name;
  void (*list)(td_node_t *, td_lister_t *);
  const char *const *keys;
} td__kinds[] = {
  {"nodes", td__list_nodes, td__keys_nodes},
  {"actors", td__list_actors, td__keys_actors},
  {"tasks", td__list_tasks, td__keys_tasks},
  {"objects", td__list_objects, td__keys_objects},
  {"placement-groups", td__list_pgs, td__keys_pgs},
};

int td_introspect_list(td_node_t *n, const td_list_req_t *q, td_buf_t *out, char *err, size_t errn) {
  const struct td_kind *k = NULL;
  for (size_t i = 0; i < sizeof(td__kinds) / sizeof(td__kinds[0]); i++)
    if (q->kind && !strcmp(q->kind, td__kinds[i].name)) k = &td__kinds[i];
  if (!k) {
    snprintf(err, errn, "unknown kind '%s': expected nodes, actors, tasks, objects, placement-groups or jobs",
             q->kind ? q->kind : "");
    return TD_EINVAL;
  }
  for (int f = 0; f < q->nfilter; f++) {
    if (td__known(k->keys, q->key[f])) continue;
    size_t w = (size_t)snprintf(err, errn, "unknown filter key '%s' for %s; known keys:", q->key[f], k->name);
    for (int i = 0; k->keys[i] && w < errn; i++) w += (size_t)snprintf(err + w, errn - w, " %s", k->keys[i]);
    return TD_EINVAL;
  }
  td_list_req_t page = *q;
  if (page.limit <= 0) page.limit = 100;
  if (page.offset < 0) page.offset = 0;
  td_lister_t ls = {.q = &page, .out = out};
  td_buf_init(&ls.row.b);
  ls.row.q = &page;
  ls.row.show = page.offset == 0;
  td__puts(out, "{\"kind\":");
  td_json_str(out, k->name, strlen(k->name));
  td__puts(out, ",\"rows\":[");
  k->list(n, &ls);
  td_buf_free(&ls.row.b);
  td__printf(out, "],\"total\":%ld,\"matched\":%ld,\"offset\":%ld,\"limit\":%ld,\"truncated\":%s}", ls.total,
             ls.matched, page.offset, page.limit, ls.matched > page.offset + ls.written ? "true" : "false");
  return 0;
}

/* -- Prometheus text ------------------------------------------------------- */

static void td__help(td_buf_t *b, const char *name, const char *type, const char *help) {
  td__printf(b, "# HELP %s %s\n# TYPE %s %s\n", name, help, name, type);
}

/* Prometheus label values escape backslash, quote and newline. */
static void td__label(td_buf_t *b, const char *s) {
  for (; *s; s++) {
    if (*s == '\\' || *s == '"') td_buf_u8(b, '\\'), td_buf_u8(b, (uint8_t)*s);
    else if (*s == '\n') td__puts(b, "\\n");
    else td_buf_u8(b, (uint8_t)*s);
  }
}

static void td__proc_self(double *cpu_s, double *rss) {
  *cpu_s = *rss = 0;
  FILE *f = fopen("/proc/self/stat", "r");
  if (!f) return;
  char buf[1024];
  size_t k = fread(buf, 1, sizeof(buf) - 1, f);
  fclose(f);
  buf[k] = 0;
  char *p = strrchr(buf, ')');
  if (!p) return;
  unsigned long ut = 0, st = 0;
  long rsspages = 0;
  /* After the name: state, then fields 4.. ; utime is 14, stime 15, rss 24. */
  if (sscanf(p + 2, "%*c %*d %*d %*d %*d %*d %*u %*u %*u %*u %*u %lu %lu %*d %*d %*d %*d %*d %*d %*u %*u %ld",
             &ut, &st, &rsspages) == 3) {
    double hz = (double)sysconf(_SC_CLK_TCK);
    *cpu_s = (double)(ut + st) / (hz > 0 ? hz : 100);
    *rss = (double)rsspages * (double)sysconf(_SC_PAGESIZE);
  }
}

void td_introspect_metrics(td_node_t *n, td_buf_t *b) {
  /* Tasks by state, in one pass over the task table. */
  long st[5] = {0};
  size_t it = 0;
  td_task_t *t;
  while (td_map_next(&n->tasks.map, &it, NULL, (void **)&t))
    if (t->state <= T_FETCHING && !td__live_creation(t)) st[t->state]++;
  td__help(b, "tide_tasks", "gauge", "Tasks and actor calls the head knows, by state.");
  td__printf(b, "tide_tasks{state=\"waiting_deps\"} %ld\ntide_tasks{state=\"queued\"} %ld\n"
             "tide_tasks{state=\"running\"} %ld\ntide_tasks{state=\"fetching\"} %ld\n",
             st[T_WAITDEPS], st[T_QUEUED], st[T_SENT], st[T_FETCHING]);
  td__help(b, "tide_tasks_finished_total", "counter", "Tasks and actor calls that ended (any outcome).");
  td__printf(b, "tide_tasks_finished_total %llu\n", (unsigned long long)td__obs_finished);
  td__help(b, "tide_tasks_failed_total", "counter", "Tasks and actor calls that ended in an error.");
  td__printf(b, "tide_tasks_failed_total %llu\n", (unsigned long long)td__nfailed);
  long as[4] = {0};
  td_actor_t *a;
  it = 0;
  while (td_map_next(&n->actors.map, &it, NULL, (void **)&a))
    if (a->state >= 0 && a->state <= A_DEAD) as[a->state]++;
  td__help(b, "tide_actors", "gauge", "Actors by state.");
  for (int i = 0; i <= A_DEAD; i++) {
    char lower[16];
    size_t k;
    for (k = 0; td__actor_states[i][k] && k < sizeof(lower) - 1; k++) lower[k] = (char)(td__actor_states[i][k] | 0x20);
    lower[k] = 0;
    td__printf(b, "tide_actors{state=\"%s\"} %ld\n", lower, as[i]);
  }
  long pgs[3] = {0};
  for (td_pg_t *pg = n->pgs.list; pg; pg = pg->next) pgs[pg->removed ? 2 : pg->created ? 1 : 0]++;
  td__help(b, "tide_placement_groups", "gauge", "Placement groups by state.");
  td__printf(b, "tide_placement_groups{state=\"pending\"} %ld\ntide_placement_groups{state=\"created\"} %ld\n"
             "tide_placement_groups{state=\"removed\"} %ld\n", pgs[0], pgs[1], pgs[2]);
  /* Per node: this one's own figures, the others' from their heartbeats. */
  td_node_info_t info[TD_NODE_MAX + 1];
  int k = td_node_cluster(n, info, TD_NODE_MAX + 1);
  td__help(b, "tide_nodes", "gauge", "Nodes joined to the head (the head included) that are alive.");
  td__printf(b, "tide_nodes %d\n", k);
  static const struct { const char *name, *type, *help; size_t off; } per[] = {
    {"tide_workers", "gauge", "Worker processes on the node.", offsetof(td_node_stats_t, workers)},
    {"tide_node_actors", "gauge", "Live actors on the node.", offsetof(td_node_stats_t, actors)},
    {"tide_node_tasks_running", "gauge", "Tasks running on the node.", offsetof(td_node_stats_t, tasks_running)},
    {"tide_node_tasks_queued", "gauge", "Tasks queued on the node.", offsetof(td_node_stats_t, tasks_queued)},
    {"tide_objects", "gauge", "Objects in the node's table.", offsetof(td_node_stats_t, objects)},
    {"tide_object_store_used_bytes", "gauge", "Shared-memory object store bytes in use.",
     offsetof(td_node_stats_t, store_used)},
    {"tide_object_store_capacity_bytes", "gauge", "Shared-memory object store size.",
     offsetof(td_node_stats_t, store_capacity)},
    {"tide_object_store_spilled_bytes", "gauge", "Object bytes spilled to disk.",
     offsetof(td_node_stats_t, spilled_bytes)},
    {"tide_node_sent_bytes_total", "counter", "Object bytes the node sent other nodes in chunks.",
     offsetof(td_node_stats_t, bytes_sent)},
    {"tide_node_fetched_bytes_total", "counter", "Object bytes the node fetched from nodes other than the head.",
     offsetof(td_node_stats_t, bytes_from_peers)},
  };
  for (size_t m = 0; m < sizeof(per) / sizeof(per[0]); m++) {
    td__help(b, per[m].name, per[m].type, per[m].help);
    int is_int = per[m].off < offsetof(td_node_stats_t, objects);
    for (int i = 0; i < k; i++) {
      if (!info[i].has_st) continue;
      const char *p = (const char *)&info[i].st + per[m].off;
      double v = is_int ? (double)*(const int *)p
                 : per[m].off >= offsetof(td_node_stats_t, bytes_sent) ? (double)*(const uint64_t *)p
                                                                       : (double)*(const size_t *)p;
      td__printf(b, "%s{node=\"node-%u\",name=\"", per[m].name, info[i].index);
      td__label(b, info[i].name ? info[i].name : "");
      td__printf(b, "\"} %.0f\n", v);
    }
  }
  for (int pass = 0; pass < 2; pass++) {
    const char *name = pass ? "tide_node_resources_available" : "tide_node_resources";
    td__help(b, name, "gauge", pass ? "Logical resources free on the node (CPU, GPU, memory bytes, custom)."
                                    : "Logical resources of the node (CPU, GPU, memory bytes, custom).");
    for (int i = 0; i < k; i++)
      for (int r = 0; r < n->sched.nres; r++) {
        const double *v = pass ? info[i].avail : info[i].total;
        if (v[r] == 0 && r > TD_RES_MEM) continue;
        td__printf(b, "%s{node=\"node-%u\",resource=\"", name, info[i].index);
        td__label(b, n->sched.resname[r]);
        td__printf(b, v[r] == floor(v[r]) && fabs(v[r]) < 9e15 ? "\"} %.0f\n" : "\"} %.17g\n", v[r]);
      }
  }
  double cpu, rss;
  td__proc_self(&cpu, &rss);
  td__help(b, "process_cpu_seconds_total", "counter", "CPU time of the head process (user + system).");
  td__printf(b, "process_cpu_seconds_total %.2f\n", cpu);
  td__help(b, "process_resident_memory_bytes", "gauge", "Resident memory of the head process.");
  td__printf(b, "process_resident_memory_bytes %.0f\n", rss);
  FILE *mf = fopen("/proc/meminfo", "r");
  if (mf) {
    char line[256];
    double total = -1, avail = -1;
    while (fgets(line, sizeof(line), mf)) {
      unsigned long kb;
      if (sscanf(line, "MemTotal: %lu kB", &kb) == 1) total = kb * 1024.0;
      if (sscanf(line, "MemAvailable: %lu kB", &kb) == 1) avail = kb * 1024.0;
    }
    fclose(mf);
    if (total >= 0 && avail >= 0) {
      td__help(b, "tide_host_memory_total_bytes", "gauge", "Memory of the head's machine.");
      td__printf(b, "tide_host_memory_total_bytes{node=\"node-%u\"} %.0f\n", n->links.index, total);
      td__help(b, "tide_host_memory_available_bytes", "gauge", "Memory available on the head's machine.");
      td__printf(b, "tide_host_memory_available_bytes{node=\"node-%u\"} %.0f\n", n->links.index, avail);
    }
  }
  double la[1];
  if (getloadavg(la, 1) == 1) {
    td__help(b, "tide_host_load1", "gauge", "One-minute load average of the head's machine.");
    td__printf(b, "tide_host_load1{node=\"node-%u\"} %.2f\n", n->links.index, la[0]);
  }
}

/* -- Live handles (node.h) ------------------------------------------------- */

void td_node_handles(td_node_t *n, td_node_handles_t *h) {
  memset(h, 0, sizeof(*h));
  h->records = n->procs.n;
  for (td_req_t *r = n->procs.reqs; r; r = r->next) h->requests++;
  for (td_allocw_t *w = n->objs.allocw; w; w = w->next) h->requests++; /* ALLOCs waiting for room */
  h->tasks = (int)n->tasks.map.len;
  for (td_pg_t *pg = n->pgs.list; pg; pg = pg->next) h->groups++;
  h->lineage = (int)(n->lineage.specs.len + n->lineage.kept.len);
  h->forwarded = (int)n->links.fwd.len;
}
