/* Helpers shared by the node's module tests (test-obj.c, test-sched.c,
 * test-pg.c, test-lineage.c): a node with no worker processes, the
 * "no live handles" check every test ends with, and encoders of the
 * protocol messages (engine/proto.h) fed to the node as a client, a node
 * that joined it, or its head would send them (td_node_feed_as).
 *
 * The fake peer: td_node_feed speaks for one client, made on first use;
 * a JOIN turns that client into a joined node's link (on a head), and
 * every later td_node_feed speaks for that link.  td_node_feed_as with
 * from_head 1 speaks for the node's head.  A malformed message drops the
 * peer that sent it, as on a real socket: tests end that way, so that
 * what the peer held must be given back. */
#ifndef TD_NODE_HELPERS_H
#define TD_NODE_HELPERS_H
#include <inttypes.h>
#include <stdio.h>
#include <string.h>

#include "introspect.h"
#include "node.h"
#include "test.h"

/* A node of `cpus` CPUs, 1 GiB of memory and a 4 MiB store that never
 * starts workers; index 0 is a head. */
static inline td_node_t *mknode_at(uint32_t index, double cpus) {
  td_node_opts_t o;
  memset(&o, 0, sizeof(o));
  o.num_cpus = cpus;
  o.memory = 1 << 30;
  o.store_capacity = 4 << 20;
  o.no_workers = 1;
  o.index = index;
  o.name = index ? "test-node" : "test-head";
  return td_node_new(&o);
}

static inline td_node_t *mknode(double cpus) { return mknode_at(0, cpus); }

/* No live handles: no object, no task record (queued, running or
 * otherwise), no store, spill or inline bytes, every resource of every
 * live node free (no lease, no reservation), and no worker, client or link record,
 * pending request, placement group, kept lineage or forwarded work.
 * Says on stderr what is left. */
static inline int no_live_handles(td_node_t *n) {
  td_node_stats_t st;
  td_node_handles_t h;
  td_node_stats(n, &st);
  td_node_handles(n, &h);
  const struct {
    long count;
    const char *what;
  } kinds[] = {
      {(long)st.objects, "objects"},
      {(long)st.tasks_queued + st.tasks_running + h.tasks, "tasks"},
      {(long)(st.store_used + st.spilled_bytes), "store bytes"},
      {(long)st.inline_bytes, "inline bytes"},
      {h.records, "worker, client or link records"},
      {h.requests, "pending requests"},
      {h.groups, "placement groups"},
      {h.lineage, "lineage"},
      {h.forwarded, "forwarded work"},
  };
  const char *left = NULL;
  for (size_t i = 0; !left && i < sizeof(kinds) / sizeof(kinds[0]); i++)
    if (kinds[i].count) left = kinds[i].what;
  for (int i = 0; !left && i < td_node_res_count(n); i++)
    if (td_node_res_avail(n, i) != td_node_res_total(n, i)) left = td_node_res_name(n, i);
  if (left) fprintf(stderr, "live handles left: %s\n", left);
  return left == NULL;
}

/* Whether a failed object's encoded error mentions `what`. */
static inline int failed_with(td_node_t *n, uint64_t id, const char *what) {
  const uint8_t *p;
  size_t len;
  int is_err = 0;
  if (td_node_state(n, id) != TD_OBJ_ERROR) return 0;
  if (td_node_bytes(n, id, &p, &len, &is_err) != 0 || !is_err) return 0;
  return memmem(p, len, what, strlen(what)) != NULL;
}

/* A task of one return asking for `cpus` CPUs (ret: its return's id). */
static inline td_spec_t task_spec(uint64_t *ret, double cpus) {
  td_spec_t s;
  memset(&s, 0, sizeof(s));
  s.kind = TD_K_TASK;
  s.fn_id = 42;
  s.nret = 1;
  s.rets = ret;
  s.bundle = -1;
  s.nres = 1;
  strcpy(s.res_name[0], "CPU");
  s.res_amt[0] = cpus;
  strcpy(s.name, "test_task");
  return s;
}

/* Submits through the C API; returns the return's id (0: refused). */
static inline uint64_t submit(td_node_t *n, td_spec_t *s) {
  const char *msg = NULL;
  return td_node_submit(n, s, &msg) == 0 ? s->rets[0] : 0;
}

/* One CPU-only bundle per row, for td_node_pg_create. */
static inline const double (*cpu_bundles(double (*b)[TD_NRES_MAX], int nb, double cpus))[TD_NRES_MAX] {
  memset(b, 0, (size_t)nb * sizeof(*b));
  for (int i = 0; i < nb; i++) b[i][TD_RES_CPU] = cpus;
  return (const double(*)[TD_NRES_MAX])b;
}

/* The id of the task that makes `ret`, read from td_node_why (0: none). */
static inline uint64_t task_of(td_node_t *n, uint64_t ret) {
  char why[1024];
  uint64_t tid = 0;
  if (td_node_why(n, ret, 0, why, sizeof(why)) != 0) return 0;
  const char *p = strstr(why, "task_id ");
  return p && sscanf(p + 8, "%" SCNx64, &tid) == 1 ? tid : 0;
}

/* Whether the `kind` row (td_introspect_list) whose `key` is id has
 * `needle` in its JSON, e.g. "\"state\":\"QUEUED\"". */
static inline int row_has(td_node_t *n, const char *kind, const char *key, uint64_t id, const char *needle) {
  char hex[17], err[256];
  snprintf(hex, sizeof(hex), "%016" PRIx64, id);
  td_list_req_t q;
  memset(&q, 0, sizeof(q));
  q.kind = kind;
  q.key[0] = key;
  q.val[0] = hex;
  q.nfilter = 1;
  td_buf_t b;
  td_buf_init(&b);
  int ok = td_introspect_list(n, &q, &b, err, sizeof(err)) == 0 && memmem(b.p, b.len, needle, strlen(needle));
  if (!ok) fprintf(stderr, "%s %s: no %s in %.*s\n", kind, hex, needle, (int)b.len, (const char *)b.p);
  td_buf_free(&b);
  return ok;
}

/* -- Messages -------------------------------------------------------------- */

/* A message being built, fed when done. */
typedef struct msg {
  td_buf_t b;
  uint8_t type;
} msg_t;

static inline msg_t *msg_begin(msg_t *m, uint8_t type) {
  td_buf_init(&m->b);
  m->type = type;
  return m;
}

/* Feeds it as a client (or the link a JOIN made of it), or with
 * from_head as the head; frees it. Returns td_node_feed_as's code. */
static inline int msg_feed(td_node_t *n, msg_t *m, int from_head) {
  int rc = td_node_feed_as(n, from_head, m->type, m->b.p, (uint32_t)m->b.len);
  td_buf_free(&m->b);
  return rc;
}

/* TD_M_PUT of an inline value holding nrefs nested refs. */
static inline int feed_put(td_node_t *n, uint64_t id, const char *value, const uint64_t *refs,
                           uint32_t nrefs) {
  msg_t m;
  td_buf_u64(&msg_begin(&m, TD_M_PUT)->b, id);
  td_buf_u8(&m.b, TD_V_INLINE);
  td_buf_str(&m.b, value, strlen(value));
  td_buf_u32(&m.b, nrefs);
  td_buf_put(&m.b, refs, (size_t)nrefs * 8);
  return msg_feed(n, &m, 0);
}

/* TD_M_REFS with one (id, delta). */
static inline int feed_refs(td_node_t *n, int from_head, uint64_t id, int32_t delta) {
  msg_t m;
  td_buf_u32(&msg_begin(&m, TD_M_REFS)->b, 1);
  td_buf_u64(&m.b, id);
  td_buf_u32(&m.b, (uint32_t)delta);
  return msg_feed(n, &m, from_head);
}

/* TD_M_PIN or TD_M_UNPIN of one id. */
static inline int feed_pin(td_node_t *n, uint8_t type, uint64_t id) {
  msg_t m;
  td_buf_u32(&msg_begin(&m, type)->b, 1);
  td_buf_u64(&m.b, id);
  return msg_feed(n, &m, 0);
}

/* TD_M_GET of one id (timeout < 0: none). */
static inline int feed_get(td_node_t *n, uint32_t req, uint64_t id, double timeout) {
  msg_t m;
  td_buf_u32(&msg_begin(&m, TD_M_GET)->b, req);
  td_buf_f64(&m.b, timeout);
  td_buf_u32(&m.b, 1);
  td_buf_u64(&m.b, id);
  return msg_feed(n, &m, 0);
}

/* TD_M_SUBMIT of a spec. */
static inline int feed_submit(td_node_t *n, int from_head, const td_spec_t *s) {
  msg_t m;
  td_spec_encode(s, &msg_begin(&m, TD_M_SUBMIT)->b);
  return msg_feed(n, &m, from_head);
}

/* A message no peer may send (type 0): the node drops the peer. */
static inline int feed_malformed(td_node_t *n, int from_head) {
  return td_node_feed_as(n, from_head, 0, NULL, 0);
}

/* -- A node joined to a head ------------------------------------------------ */

/* The fake client joins the head as node `want` with `cpus` CPUs (JOIN,
 * then NODE_INFO: its name, resources, no actors, no port). */
static inline int join_node(td_node_t *head, uint32_t want, double cpus) {
  msg_t m;
  td_buf_u32(&msg_begin(&m, TD_M_JOIN)->b, want);
  int rc = msg_feed(head, &m, 0);
  if (rc) return rc;
  msg_begin(&m, TD_M_NODE_INFO);
  td_buf_str(&m.b, "fake", 4);
  td_buf_u32(&m.b, 1);
  td_buf_str(&m.b, "CPU", 3);
  td_buf_f64(&m.b, cpus);
  td_buf_u32(&m.b, 0);
  td_buf_u32(&m.b, 0);
  return msg_feed(head, &m, 0);
}

/* A head of head_cpus CPUs with the fake client joined as node-1, of
 * `cpus` CPUs. */
static inline td_node_t *head_and_node(double head_cpus, double cpus) {
  td_node_t *n = mknode(head_cpus);
  ASSERT(n);
  ASSERT_EQ(join_node(n, 1, cpus), 0);
  return n;
}

/* Begins the joined node's TD_M_DONE for the head's task tid: it
 * returned one value, of this kind (TD_V_*). */
static inline msg_t *done_begin(msg_t *m, uint64_t tid, uint8_t kind) {
  td_buf_u64(&msg_begin(m, TD_M_DONE)->b, tid);
  td_buf_u8(&m->b, 1);
  td_buf_u32(&m->b, 1);
  td_buf_u8(&m->b, kind);
  return m;
}

/* ... an inline value, then no refs and no pushed objects. */
static inline int feed_done(td_node_t *head, uint64_t tid, const char *value) {
  msg_t m;
  td_buf_str(&done_begin(&m, tid, TD_V_INLINE)->b, value, strlen(value));
  td_buf_u64(&m.b, 0); /* u32 refs, u32 pushed objects */
  return msg_feed(head, &m, 0);
}

/* ... a large value the node keeps until the head fetches it (its size,
 * its id), then no refs and no pushed objects. */
static inline int feed_done_kept(td_node_t *head, uint64_t tid, uint64_t id, uint64_t size) {
  msg_t m;
  td_buf_u64(&done_begin(&m, tid, TD_V_PULL)->b, size);
  td_buf_u64(&m.b, id);
  td_buf_u64(&m.b, 0); /* u32 refs, u32 pushed objects */
  return msg_feed(head, &m, 0);
}

/* The joined node's TD_M_DONE for a task that raised (an opaque error). */
static inline int feed_done_failed(td_node_t *head, uint64_t tid, const char *error) {
  msg_t m;
  td_buf_u64(&msg_begin(&m, TD_M_DONE)->b, tid);
  td_buf_u8(&m.b, 0);
  td_buf_str(&m.b, error, strlen(error));
  return msg_feed(head, &m, 0);
}

/* -- The end of a test ------------------------------------------------------- */

enum { KEEP_PEERS = 0, DROP_CLIENT = 1, DROP_HEAD = 2 };

/* Ends a test: the driver lets go of ids, the fake peers named in drop
 * send a malformed message (and are dropped with what they held), then
 * nothing may be left; the node is destroyed. Returns 0, for
 * `return end_test(...)`. */
static inline int end_test(td_node_t **np, const uint64_t *ids, int k, int drop) {
  td_node_t *n = *np;
  for (int i = 0; i < k; i++) td_node_decref(n, ids[i]);
  if (drop & DROP_CLIENT) ASSERT_EQ(feed_malformed(n, 0), TD_EPROTO);
  if (drop & DROP_HEAD) ASSERT_EQ(feed_malformed(n, 1), TD_EPROTO);
  td_node_pump(n, 0);
  ASSERT(no_live_handles(n));
  td_node_destroy(np);
  ASSERT(*np == NULL);
  return 0;
}

#endif
