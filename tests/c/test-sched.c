/* The scheduler (engine/sched.c, the placement half of engine/task.c) on a
 * node with no worker processes, alone or as a head with one fake node
 * joined to it (node-helpers.h: join_node).  Fit: a demand beyond what any
 * node has fails at once, saying what it asked and what there is; one
 * that fits waits for a worker here, or for its resources to be free.
 * Spill: a task that does not fit here goes to the joined node with room
 * (the head holds the resources there until the node's TD_M_DONE), waits
 * here when no node has room, and a short task that can never run here
 * queues at the node at once.  Placement: node affinity, hard and soft,
 * SPREAD round robin, and work on a node that dies (retried or failed).
 * Placement groups' strategies are in test-pg.c.  Each test ends with no
 * live handles (node-helpers.h). */
#include "node-helpers.h"

/* A 1-CPU task of fn 42 with strategy st toward node `node`. */
static uint64_t submit_to(td_node_t *n, uint8_t st, uint32_t node, int retries) {
  uint64_t ret = td_node_new_id(n);
  td_spec_t s = task_spec(&ret, 1);
  s.strategy = st;
  s.node = node;
  s.max_retries = retries;
  return submit(n, &s);
}

static int queued_here(td_node_t *n, uint64_t ret) {
  return row_has(n, "tasks", "ref", ret, "\"state\":\"QUEUED\"");
}

static int running_on_node1(td_node_t *n, uint64_t ret) {
  return row_has(n, "tasks", "ref", ret, "\"state\":\"RUNNING\",\"node\":\"node-1\"");
}

TEST_IMPL(sched_infeasible_and_queue) {
  td_node_t *n = mknode(2);
  ASSERT(n);
  /* More CPU than the node has, and no cluster to ask: it fails at once,
   * saying what it wanted and what the node has. */
  uint64_t big = td_node_new_id(n);
  td_spec_t s = task_spec(&big, 4);
  ASSERT(submit(n, &s));
  td_node_pump(n, 0);
  ASSERT(failed_with(n, big, "infeasible"));
  ASSERT(failed_with(n, big, "CPU = 4"));
  /* A task that fits waits for a worker (none will come here). */
  uint64_t small = td_node_new_id(n);
  s = task_spec(&small, 1);
  ASSERT(submit(n, &s));
  td_node_pump(n, 0);
  ASSERT_EQ(td_node_state(n, small), TD_OBJ_PENDING);
  td_node_stats_t st;
  td_node_stats(n, &st);
  ASSERT_EQ(st.tasks_queued, 1);
  /* Cancelled while queued: it fails as cancelled and leaves the queue. */
  ASSERT_EQ(td_node_cancel(n, small, 0), 0);
  td_node_pump(n, 0);
  ASSERT(failed_with(n, small, "cancelled before it ran"));
  ASSERT_EQ(td_node_cancel(n, small, 0), TD_ENOTFOUND); /* nothing makes it now */
  uint64_t left[] = {big, small};
  return end_test(&n, left, 2, KEEP_PEERS);
}

TEST_IMPL(sched_fit_and_wait) {
  td_node_t *n = mknode(2);
  ASSERT(n);
  /* A group takes both CPUs: a task submitted by a client waits for them. */
  double b[1][TD_NRES_MAX];
  uint64_t pg, ready;
  ASSERT_EQ(td_node_pg_create(n, 1, cpu_bundles(b, 1, 2), TD_PG_PACK, NULL, 0, &pg, &ready), 0);
  uint64_t ret = td_node_new_id(n);
  td_spec_t s = task_spec(&ret, 1);
  ASSERT_EQ(feed_submit(n, 0, &s), 0);
  td_node_pump(n, 0);
  ASSERT(queued_here(n, ret));
  ASSERT(row_has(n, "tasks", "ref", ret, "resources: waiting for CPU = 1 to be free"));
  /* Freed, it fits: without workers it waits for one, taking nothing. */
  ASSERT_EQ(td_node_pg_remove(n, pg), 0);
  td_node_pump(n, 0);
  ASSERT(row_has(n, "tasks", "ref", ret, "resources are free; waiting for a worker"));
  ASSERT_EQ(td_node_res_avail(n, TD_RES_CPU), 2);
  /* Fractional demands and custom resources the node lacks. */
  uint64_t half = td_node_new_id(n), tpu = td_node_new_id(n);
  s = task_spec(&half, 0.5);
  ASSERT(submit(n, &s));
  ASSERT(queued_here(n, half));
  s = task_spec(&tpu, 1);
  strcpy(s.res_name[0], "TPU");
  ASSERT(submit(n, &s));
  ASSERT(failed_with(n, tpu, "requires TPU = 1 but this node has TPU = 0"));
  ASSERT_EQ(td_node_cancel(n, ret, 0), 0);
  ASSERT_EQ(td_node_cancel(n, half, 0), 0);
  uint64_t left[] = {half, tpu, ready};
  return end_test(&n, left, 3, DROP_CLIENT);
}

TEST_IMPL(sched_spill_to_node) {
  td_node_t *n = head_and_node(1, 4);
  ASSERT_EQ(td_node_res_total(n, TD_RES_CPU), 5);
  /* One CPU fits here: it stays, waiting for a worker, not spilled. */
  uint64_t here = submit_to(n, TD_ST_DEFAULT, 0, 0);
  td_node_pump(n, 0);
  ASSERT(queued_here(n, here));
  ASSERT_EQ(td_node_res_avail(n, TD_RES_CPU), 5);
  /* Two do not: it goes to node-1, which holds them until it is done. */
  uint64_t two = td_node_new_id(n);
  td_spec_t s = task_spec(&two, 2);
  ASSERT(submit(n, &s));
  td_node_pump(n, 0);
  ASSERT(running_on_node1(n, two));
  ASSERT_EQ(td_node_res_avail(n, TD_RES_CPU), 3);
  ASSERT_EQ(feed_done(n, task_of(n, two), "two"), 0);
  ASSERT_EQ(td_node_state(n, two), TD_OBJ_READY);
  ASSERT_EQ(td_node_res_avail(n, TD_RES_CPU), 5);
  /* Three CPUs twice, of a function never timed: the first goes there,
   * the second waits here until node-1 has room again. */
  uint64_t c1 = td_node_new_id(n), c2 = td_node_new_id(n);
  s = task_spec(&c1, 3);
  s.fn_id = 43;
  ASSERT(submit(n, &s));
  s.rets = &c2;
  ASSERT(submit(n, &s));
  td_node_pump(n, 0);
  ASSERT(running_on_node1(n, c1));
  ASSERT(queued_here(n, c2));
  ASSERT(row_has(n, "tasks", "ref", c2, "resources: waiting for CPU = 3 to be free"));
  ASSERT_EQ(feed_done_failed(n, task_of(n, c1), "raised"), 0);
  ASSERT_EQ(td_node_state(n, c1), TD_OBJ_ERROR);
  td_node_pump(n, 0);
  ASSERT(running_on_node1(n, c2));
  /* fn 42 is known short now (two ended at once): another that can never
   * run here queues at node-1 even with no room there, holding nothing. */
  uint64_t shrt = td_node_new_id(n);
  s = task_spec(&shrt, 3);
  ASSERT(submit(n, &s));
  td_node_pump(n, 0);
  ASSERT(running_on_node1(n, shrt));
  ASSERT_EQ(td_node_res_avail(n, TD_RES_CPU), 2); /* only c2's three are held */
  ASSERT_EQ(feed_done(n, task_of(n, c2), "c2"), 0);
  ASSERT_EQ(feed_done(n, task_of(n, shrt), "short"), 0);
  ASSERT_EQ(td_node_state(n, shrt), TD_OBJ_READY);
  ASSERT_EQ(td_node_res_avail(n, TD_RES_CPU), 5);
  uint64_t all[] = {two, c1, c2, shrt, here};
  ASSERT_EQ(td_node_cancel(n, here, 0), 0);
  return end_test(&n, all, 5, DROP_CLIENT);
}

TEST_IMPL(sched_infeasible_in_cluster) {
  td_node_t *n = head_and_node(1, 4);
  /* The most any node has decides, not the sum. */
  uint64_t big = td_node_new_id(n);
  td_spec_t s = task_spec(&big, 5);
  ASSERT(submit(n, &s));
  ASSERT(failed_with(n, big, "requires CPU = 5 but the most any node has is CPU = 4"));
  /* What only node-1 has is feasible. */
  uint64_t four = td_node_new_id(n);
  s = task_spec(&four, 4);
  ASSERT(submit(n, &s));
  td_node_pump(n, 0);
  ASSERT(running_on_node1(n, four));
  /* A node that rejoins is a new node: JOIN again on a joined link, or a
   * second NODE_INFO, is malformed and ends the link. */
  msg_t m;
  td_buf_u32(&msg_begin(&m, TD_M_JOIN)->b, 1);
  ASSERT_EQ(msg_feed(n, &m, 0), TD_EPROTO);
  /* Its task had no retries: it fails, naming the node that died. */
  ASSERT(failed_with(n, four, "node-1 (fake) died"));
  ASSERT_EQ(td_node_res_total(n, TD_RES_CPU), 1);
  uint64_t left[] = {big, four};
  return end_test(&n, left, 2, KEEP_PEERS);
}

TEST_IMPL(sched_node_affinity) {
  td_node_t *n = head_and_node(2, 2);
  /* Hard affinity to a node that is not there fails at once. */
  uint64_t none = submit_to(n, TD_ST_NODE, 7, 0);
  td_node_pump(n, 0);
  ASSERT(failed_with(n, none, "no alive node node-7 for a hard node affinity"));
  /* Hard affinity to node-1 goes there though the head has room. */
  uint64_t to1 = submit_to(n, TD_ST_NODE, 1, 0);
  td_node_pump(n, 0);
  ASSERT(running_on_node1(n, to1));
  /* Soft affinity to a missing node, or hard to the head: here. */
  uint64_t soft = submit_to(n, TD_ST_NODE_SOFT, 9, 0), head = submit_to(n, TD_ST_NODE, 0, 0);
  td_node_pump(n, 0);
  ASSERT(queued_here(n, soft));
  ASSERT(queued_here(n, head));
  /* Soft affinity to node-1 while it has room: there. */
  uint64_t soft1 = submit_to(n, TD_ST_NODE_SOFT, 1, 0);
  td_node_pump(n, 0);
  ASSERT(running_on_node1(n, soft1));
  ASSERT_EQ(td_node_res_avail(n, TD_RES_CPU), 2);
  ASSERT_EQ(feed_done(n, task_of(n, to1), "1"), 0);
  ASSERT_EQ(feed_done(n, task_of(n, soft1), "2"), 0);
  ASSERT_EQ(td_node_cancel(n, soft, 0), 0);
  ASSERT_EQ(td_node_cancel(n, head, 0), 0);
  uint64_t all[] = {none, to1, soft, head, soft1};
  return end_test(&n, all, 5, DROP_CLIENT);
}

TEST_IMPL(sched_spread) {
  td_node_t *n = head_and_node(2, 2);
  /* DEFAULT keeps work here while it fits here. */
  uint64_t d[3];
  for (int i = 0; i < 3; i++) d[i] = submit_to(n, TD_ST_DEFAULT, 0, 0);
  td_node_pump(n, 0);
  for (int i = 0; i < 3; i++) ASSERT(queued_here(n, d[i]));
  for (int i = 0; i < 3; i++) ASSERT_EQ(td_node_cancel(n, d[i], 0), 0);
  /* SPREAD takes turns, the head first: a is placed here at once. */
  uint64_t a = submit_to(n, TD_ST_SPREAD, 0, 0);
  ASSERT(queued_here(n, a));
  /* The choice sticks: a waits here for a worker (there is none: no
   * workers in these tests) and is not placed again on later passes. */
  td_node_pump(n, 0);
  ASSERT(queued_here(n, a));
  /* b takes node-1's turn, c the head's again, d node-1's. */
  uint64_t b = submit_to(n, TD_ST_SPREAD, 0, 0), c = submit_to(n, TD_ST_SPREAD, 0, 0);
  uint64_t d4 = submit_to(n, TD_ST_SPREAD, 0, 0);
  td_node_pump(n, 0);
  td_node_pump(n, 0);
  ASSERT(queued_here(n, a));
  ASSERT(running_on_node1(n, b));
  ASSERT(queued_here(n, c));
  ASSERT(running_on_node1(n, d4));
  ASSERT_EQ(td_node_res_avail(n, TD_RES_CPU), 2);
  ASSERT_EQ(feed_done(n, task_of(n, b), "b"), 0);
  ASSERT_EQ(feed_done(n, task_of(n, d4), "d"), 0);
  ASSERT_EQ(td_node_cancel(n, a, 0), 0);
  ASSERT_EQ(td_node_cancel(n, c, 0), 0);
  uint64_t all[] = {d[0], d[1], d[2], a, b, c, d4};
  return end_test(&n, all, 7, DROP_CLIENT);
}

TEST_IMPL(sched_node_dies_with_work) {
  td_node_t *n = head_and_node(1, 4);
  /* Four tasks on node-1: two may retry (one bound to node-1, one only
   * preferring it), one may not, one is cancelled (the node is told; its
   * result waits for the node's answer). */
  uint64_t retry = submit_to(n, TD_ST_NODE, 1, 1);
  uint64_t soft = submit_to(n, TD_ST_NODE_SOFT, 1, 1);
  uint64_t once = submit_to(n, TD_ST_NODE, 1, 0);
  uint64_t cancel = submit_to(n, TD_ST_NODE, 1, 3);
  td_node_pump(n, 0);
  uint64_t all[] = {retry, soft, once, cancel};
  for (int i = 0; i < 4; i++) ASSERT(running_on_node1(n, all[i]));
  ASSERT_EQ(td_node_cancel(n, cancel, 0), 0);
  ASSERT_EQ(td_node_state(n, cancel), TD_OBJ_PENDING);
  ASSERT_EQ(feed_malformed(n, 0), TD_EPROTO);
  td_node_pump(n, 0);
  ASSERT(failed_with(n, once, "WorkerCrashedError"));
  ASSERT(failed_with(n, once, "node-1 (fake) died"));
  ASSERT(failed_with(n, cancel, "TaskCancelledError"));
  /* Retried: the one bound to node-1 fails now that it is gone; the other
   * runs where it can, here, as its second attempt. */
  ASSERT(failed_with(n, retry, "no alive node node-1"));
  ASSERT(queued_here(n, soft));
  ASSERT(row_has(n, "tasks", "ref", soft, "\"attempt\":1"));
  ASSERT_EQ(td_node_cancel(n, soft, 0), 0);
  return end_test(&n, all, 4, KEEP_PEERS);
}
