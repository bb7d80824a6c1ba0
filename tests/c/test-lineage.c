/* Lineage (engine/lineage.c): a result lost with the node that made it is
 * made again.  Without worker processes nothing runs to the end, so these
 * tests drive the parts a node does alone, with one fake node joined to a
 * head (node-helpers.h) or a fake head linked to a node:
 *  - on a head: a task whose large result a node kept (TD_V_PULL) is run
 *    again when that node dies, if it may retry, else its result fails
 *    with ObjectLostError; a spec a node sent (TD_M_LINEAGE) is kept for
 *    a value still to come from it, holding its arguments, resubmitted
 *    when the node dies and dropped when the value's last ref goes;
 *    malformed TD_M_LINEAGE ends the link;
 *  - on a node: the spec of a task its own client submits (retries
 *    allowed) is kept, sent to the head when the head first gets a ref to
 *    its result, and freed with the result; work the head sent is not
 *    kept (the head keeps it) and ends when the head cancels it.
 * The rerun's own run needs a worker and is not covered here (the Lua
 * cluster tests do).  Each test ends with no live handles. */
#include "node-helpers.h"

#define KEPT_SIZE (1u << 20) /* a result the node keeps until fetched */

static int lineage_kept(td_node_t *n) {
  td_node_handles_t h;
  td_node_handles(n, &h);
  return h.lineage;
}

/* A 1-CPU task that prefers node-1 (it runs here once node-1 is gone). */
static uint64_t submit_to_node1(td_node_t *n, int retries) {
  uint64_t ret = td_node_new_id(n);
  td_spec_t s = task_spec(&ret, 1);
  s.strategy = TD_ST_NODE_SOFT;
  s.node = 1;
  s.max_retries = retries;
  return submit(n, &s);
}

/* node-1's TD_M_LINEAGE: the spec of the task that makes `id`. */
static int feed_lineage(td_node_t *head, uint64_t id, const td_spec_t *s) {
  td_buf_t spec;
  td_buf_init(&spec);
  td_spec_encode(s, &spec);
  msg_t m;
  td_buf_u64(&msg_begin(&m, TD_M_LINEAGE)->b, id);
  td_buf_str(&m.b, spec.p, spec.len);
  td_buf_free(&spec);
  return msg_feed(head, &m, 0);
}

/* An id as node-1 makes them. */
static uint64_t node1_id(uint32_t seq) { return ((uint64_t)1 << TD_NODE_SHIFT) | seq; }

TEST_IMPL(lineage_rerun_when_kept_result_lost) {
  td_node_t *n = head_and_node(1, 2);
  uint64_t again = submit_to_node1(n, 1), lost = submit_to_node1(n, 0);
  td_node_pump(n, 0);
  ASSERT(row_has(n, "tasks", "ref", again, "\"node\":\"node-1\""));
  /* Both done; node-1 keeps their large results until fetched. */
  ASSERT_EQ(feed_done_kept(n, task_of(n, again), again, KEPT_SIZE), 0);
  ASSERT_EQ(feed_done_kept(n, task_of(n, lost), lost, KEPT_SIZE), 0);
  ASSERT(row_has(n, "tasks", "ref", again, "\"state\":\"FETCHING\""));
  ASSERT(row_has(n, "objects", "object_id", again, "\"where\":\"node-1\""));
  ASSERT_EQ(td_node_res_avail(n, TD_RES_CPU), 3); /* done: its CPUs are back */
  /* node-1 dies with them: one runs again (here), one is lost. */
  ASSERT_EQ(feed_malformed(n, 0), TD_EPROTO);
  td_node_pump(n, 0);
  ASSERT(row_has(n, "tasks", "ref", again, "\"state\":\"QUEUED\""));
  ASSERT_EQ(td_node_state(n, again), TD_OBJ_PENDING);
  ASSERT(failed_with(n, lost, "ObjectLostError"));
  ASSERT(failed_with(n, lost, "which died before sending it"));
  ASSERT_EQ(td_node_cancel(n, again, 0), 0);
  uint64_t left[] = {again, lost};
  return end_test(&n, left, 2, KEEP_PEERS);
}

/* A head with node-1 joined, where the driver holds x, a value node-1
 * made (its id: seq) by a task taking *arg, an object here: *s is that
 * task's spec, with `retries`, for node-1's TD_M_LINEAGE (it points to
 * *x and *arg). */
static td_node_t *remote_result(uint32_t seq, int retries, uint64_t *x, uint64_t *arg, td_spec_t *s) {
  td_node_t *n = head_and_node(1, 2);
  uint8_t *dst;
  *arg = td_node_new_id(n);
  *x = node1_id(seq);
  ASSERT_EQ(td_node_store(n, *arg, 3, NULL, 0, &dst), 0);
  memcpy(dst, "arg", 3);
  td_node_incref(n, *x);
  ASSERT(row_has(n, "objects", "object_id", *x, "\"where\":\"node-1 (foreign)\""));
  *s = task_spec(x, 1);
  s->deps = arg;
  s->ndeps = 1;
  s->max_retries = retries;
  return n;
}

TEST_IMPL(lineage_spec_kept_and_resubmitted) {
  uint64_t x, arg;
  td_spec_t s;
  td_node_t *n = remote_result(5, 1, &x, &arg, &s);
  ASSERT_EQ(feed_lineage(n, x, &s), 0);
  ASSERT_EQ(lineage_kept(n), 1);
  ASSERT(row_has(n, "objects", "object_id", arg, "\"refs\":2")); /* the kept spec holds it */
  /* node-1 dies before x came: its task is submitted here, the spec let go. */
  ASSERT_EQ(feed_malformed(n, 0), TD_EPROTO);
  td_node_pump(n, 0);
  ASSERT_EQ(lineage_kept(n), 0);
  ASSERT(row_has(n, "tasks", "ref", x, "\"state\":\"QUEUED\""));
  ASSERT(row_has(n, "objects", "object_id", x, "\"refs\":1"));   /* the driver's, as before */
  ASSERT(row_has(n, "objects", "object_id", arg, "\"refs\":2")); /* now held by the task */
  ASSERT_EQ(td_node_cancel(n, x, 0), 0);
  ASSERT(failed_with(n, x, "cancelled"));
  uint64_t left[] = {x, arg};
  return end_test(&n, left, 2, KEEP_PEERS);
}

TEST_IMPL(lineage_dropped_with_last_ref) {
  uint64_t x, arg;
  td_spec_t s;
  td_node_t *n = remote_result(9, -1, &x, &arg, &s);
  ASSERT_EQ(feed_lineage(n, x, &s), 0);
  ASSERT_EQ(lineage_kept(n), 1);
  /* Nobody wants x any more: its record, spec and hold on arg go. */
  td_node_decref(n, x);
  ASSERT_EQ(lineage_kept(n), 0);
  ASSERT(row_has(n, "objects", "object_id", arg, "\"refs\":1"));
  /* A spec for a value not coming from that node is not kept. */
  ASSERT_EQ(feed_lineage(n, x, &s), 0);
  ASSERT_EQ(lineage_kept(n), 0);
  ASSERT(row_has(n, "objects", "object_id", arg, "\"refs\":1"));
  /* node-1 dies: nothing is resubmitted. */
  ASSERT_EQ(feed_malformed(n, 0), TD_EPROTO);
  td_node_pump(n, 0);
  td_node_stats_t st;
  td_node_stats(n, &st);
  ASSERT_EQ(st.tasks_queued, 0);
  return end_test(&n, &arg, 1, KEEP_PEERS);
}

TEST_IMPL(lineage_malformed) {
  td_node_t *n = mknode(1);
  ASSERT(n);
  uint64_t x = node1_id(3), other = node1_id(4);
  td_spec_t s = task_spec(&x, 1);
  s.max_retries = 1;
  /* Only a joined node may send lineage. */
  ASSERT_EQ(feed_lineage(n, x, &s), TD_EPROTO);
  /* A spec that does not make the id named, or is no task, ends the link. */
  ASSERT_EQ(join_node(n, 1, 2), 0);
  ASSERT_EQ(td_node_res_total(n, TD_RES_CPU), 3);
  ASSERT_EQ(feed_lineage(n, other, &s), TD_EPROTO);
  ASSERT_EQ(td_node_res_total(n, TD_RES_CPU), 1);
  ASSERT_EQ(join_node(n, 1, 2), 0);
  s.kind = TD_K_ACTOR_NEW;
  ASSERT_EQ(feed_lineage(n, x, &s), TD_EPROTO);
  ASSERT_EQ(join_node(n, 1, 2), 0);
  msg_t m;
  td_buf_u64(&msg_begin(&m, TD_M_LINEAGE)->b, x);
  td_buf_str(&m.b, "junk", 4);
  ASSERT_EQ(msg_feed(n, &m, 0), TD_EPROTO);
  ASSERT_EQ(lineage_kept(n), 0);
  return end_test(&n, NULL, 0, KEEP_PEERS);
}

TEST_IMPL(lineage_node_keeps_and_sends) {
  /* node-1 with a (fake) head; its client submits. */
  td_node_t *n = mknode_at(1, 2);
  ASSERT(n);
  ASSERT_EQ(td_node_feed_as(n, 1, TD_M_HELLO, NULL, 0), 0);
  ASSERT(td_node_linked(n));
  uint64_t x = td_node_new_id(n), once = td_node_new_id(n), y = td_node_new_id(n);
  td_spec_t s = task_spec(&x, 1);
  s.max_retries = 1;
  ASSERT_EQ(feed_submit(n, 0, &s), 0);
  ASSERT_EQ(lineage_kept(n), 1);
  /* No retries: nothing to run again, nothing kept. */
  s = task_spec(&once, 1);
  ASSERT_EQ(feed_submit(n, 0, &s), 0);
  ASSERT_EQ(lineage_kept(n), 1);
  /* A task this node cannot run goes to the head with x as its argument:
   * x's spec follows it there (sent after the message, at the pump). */
  s = task_spec(&y, 8);
  s.deps = &x;
  s.ndeps = 1;
  ASSERT_EQ(feed_submit(n, 0, &s), 0);
  ASSERT(row_has(n, "objects", "object_id", y, "\"where\":\"node-1 (foreign)\""));
  ASSERT_EQ(lineage_kept(n), 1);
  td_node_pump(n, 0);
  ASSERT_EQ(lineage_kept(n), 0);
  ASSERT(row_has(n, "objects", "object_id", x, "\"refs\":2")); /* the client's, and the head's export */
  /* The client goes, and its tasks here with it (cancelled); the head's
   * hold on x goes with the head. */
  ASSERT_EQ(feed_malformed(n, 0), TD_EPROTO);
  ASSERT_EQ(td_node_state(n, y), TD_OBJ_MISSING);
  ASSERT(failed_with(n, x, "cancelled"));
  ASSERT_EQ(td_node_cancel(n, x, 0), TD_ENOTFOUND);
  ASSERT_EQ(feed_malformed(n, 1), TD_EPROTO);
  ASSERT(!td_node_linked(n));
  return end_test(&n, NULL, 0, KEEP_PEERS);
}

TEST_IMPL(lineage_freed_with_result) {
  td_node_t *n = mknode_at(1, 2);
  ASSERT(n);
  ASSERT_EQ(td_node_feed_as(n, 1, TD_M_HELLO, NULL, 0), 0);
  uint64_t x = td_node_new_id(n);
  td_spec_t s = task_spec(&x, 1);
  s.max_retries = 2;
  ASSERT_EQ(feed_submit(n, 0, &s), 0);
  ASSERT_EQ(lineage_kept(n), 1);
  /* Its result fails (cancelled) and its last holder lets go: the spec
   * goes with the result. */
  ASSERT_EQ(td_node_cancel(n, x, 0), 0);
  ASSERT_EQ(lineage_kept(n), 1);
  ASSERT_EQ(feed_refs(n, 0, x, -1), 0);
  ASSERT_EQ(td_node_state(n, x), TD_OBJ_MISSING);
  ASSERT_EQ(lineage_kept(n), 0);
  return end_test(&n, NULL, 0, DROP_CLIENT | DROP_HEAD);
}

TEST_IMPL(lineage_head_work_not_kept) {
  td_node_t *n = mknode_at(1, 2);
  ASSERT(n);
  /* The head sends task 77 (attempt 1, no definition, no arguments). */
  uint64_t x = node1_id(100);
  td_spec_t s = task_spec(&x, 1);
  s.max_retries = 3;
  msg_t m;
  td_buf_u64(&msg_begin(&m, TD_M_NODE_TASK)->b, 77);
  td_buf_u32(&m.b, 1);
  td_spec_encode(&s, &m.b);
  td_buf_u8(&m.b, 0);
  td_buf_u32(&m.b, 0);
  ASSERT_EQ(msg_feed(n, &m, 1), 0);
  td_node_handles_t h;
  td_node_handles(n, &h);
  ASSERT_EQ(h.forwarded, 1);
  ASSERT_EQ(h.lineage, 0); /* the head keeps its own work's lineage */
  ASSERT(row_has(n, "tasks", "ref", x, "\"state\":\"QUEUED\""));
  /* The head cancels it: it fails, the result goes back, the record ends. */
  td_buf_u64(&msg_begin(&m, TD_M_CANCEL)->b, 77);
  td_buf_u8(&m.b, 0);
  ASSERT_EQ(msg_feed(n, &m, 1), 0);
  td_node_pump(n, 0);
  td_node_handles(n, &h);
  ASSERT_EQ(h.forwarded, 0);
  ASSERT_EQ(td_node_state(n, x), TD_OBJ_MISSING);
  return end_test(&n, NULL, 0, DROP_HEAD);
}
