/* The node's modules through its C API alone (engine/node.h), with no
 * worker processes (no_workers): the object table (references held by
 * other objects, freeing), the scheduler (infeasible demands fail at once,
 * feasible ones wait, cancelling a queued task) and placement groups
 * (atomic reserve, waiting groups, release).  Each test ends with no
 * object, task or reservation left: the node must count back to zero. */
#include <string.h>

#include "node.h"
#include "test.h"

static td_node_t *mknode(double cpus) {
  td_node_opts_t o;
  memset(&o, 0, sizeof(o));
  o.num_cpus = cpus;
  o.num_gpus = 0;
  o.memory = 1 << 30;
  o.store_capacity = 4 << 20;
  o.no_workers = 1;
  return td_node_new(&o);
}

/* Nothing left behind: no object, no queued or running task, every CPU free. */
static int drained(td_node_t *n, double cpus) {
  td_node_stats_t st;
  td_node_stats(n, &st);
  return st.objects == 0 && st.tasks_queued == 0 && st.tasks_running == 0 && st.store_used == 0 &&
         td_node_res_avail(n, TD_RES_CPU) == cpus;
}

/* Whether a failed object's encoded error mentions `what`. */
static int failed_with(td_node_t *n, uint64_t id, const char *what) {
  const uint8_t *p;
  size_t len;
  int is_err = 0;
  if (td_node_state(n, id) != TD_OBJ_ERROR) return 0;
  if (td_node_bytes(n, id, &p, &len, &is_err) != 0 || !is_err) return 0;
  return memmem(p, len, what, strlen(what)) != NULL;
}

TEST_IMPL(node_objects_refs) {
  td_node_t *n = mknode(2);
  ASSERT(n);
  uint8_t *dst;
  uint64_t a = td_node_new_id(n), b = td_node_new_id(n);
  ASSERT_EQ(td_node_store(n, a, 100000, NULL, 0, &dst), 0);
  memset(dst, 1, 100000);
  /* b holds a reference to a, as a value holding a nested ref does. */
  ASSERT_EQ(td_node_store(n, b, 100, &a, 1, &dst), 0);
  memset(dst, 2, 100);
  td_node_decref(n, a);
  td_node_pump(n, 0);
  ASSERT_EQ(td_node_state(n, a), TD_OBJ_READY); /* kept for b */
  td_node_incref(n, b);
  td_node_decref(n, b);
  ASSERT_EQ(td_node_state(n, b), TD_OBJ_READY); /* one reference left */
  td_node_decref(n, b);
  td_node_pump(n, 0);
  ASSERT_EQ(td_node_state(n, b), TD_OBJ_MISSING);
  ASSERT_EQ(td_node_state(n, a), TD_OBJ_MISSING); /* freed with the last holder */
  ASSERT(drained(n, 2));
  td_node_destroy(&n);
  ASSERT(n == NULL);
  return 0;
}

static td_spec_t task_spec(uint64_t *ret, double cpus) {
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

TEST_IMPL(node_sched_infeasible_and_queue) {
  td_node_t *n = mknode(2);
  ASSERT(n);
  const char *msg = NULL;
  /* More CPU than the node has, and no cluster to ask: it fails at once,
   * saying what it wanted and what the node has. */
  uint64_t big = td_node_new_id(n);
  td_spec_t s = task_spec(&big, 4);
  ASSERT_EQ(td_node_submit(n, &s, &msg), 0);
  td_node_pump(n, 0);
  ASSERT(failed_with(n, big, "infeasible"));
  ASSERT(failed_with(n, big, "CPU = 4"));
  /* A task that fits waits for a worker (none will come here). */
  uint64_t small = td_node_new_id(n);
  s = task_spec(&small, 1);
  ASSERT_EQ(td_node_submit(n, &s, &msg), 0);
  td_node_pump(n, 0);
  ASSERT_EQ(td_node_state(n, small), TD_OBJ_PENDING);
  td_node_stats_t st;
  td_node_stats(n, &st);
  ASSERT_EQ(st.tasks_queued, 1);
  /* Cancelled while queued: it fails as cancelled and leaves the queue. */
  ASSERT_EQ(td_node_cancel(n, small, 0), 0);
  td_node_pump(n, 0);
  ASSERT_EQ(td_node_state(n, small), TD_OBJ_ERROR);
  td_node_decref(n, big);
  td_node_decref(n, small);
  td_node_pump(n, 0);
  ASSERT(drained(n, 2));
  td_node_destroy(&n);
  return 0;
}

static double bundles_cpu[3][TD_NRES_MAX];

TEST_IMPL(node_pg_reserve_release) {
  td_node_t *n = mknode(2);
  ASSERT(n);
  for (int i = 0; i < 3; i++) bundles_cpu[i][TD_RES_CPU] = 1;
  uint64_t pg1, r1, pg2, r2, pg3, r3;
  /* Two bundles of one CPU: both reserved at once. */
  ASSERT_EQ(
      td_node_pg_create(n, 2, (const double(*)[TD_NRES_MAX])bundles_cpu, TD_PG_PACK, "g1", 0, &pg1, &r1), 0);
  td_node_pump(n, 0);
  ASSERT_EQ(td_node_state(n, r1), TD_OBJ_READY);
  ASSERT_EQ(td_node_res_avail(n, TD_RES_CPU), 0);
  /* Another group of one CPU waits, with nothing reserved for it. */
  ASSERT_EQ(
      td_node_pg_create(n, 1, (const double(*)[TD_NRES_MAX])bundles_cpu, TD_PG_PACK, NULL, 0, &pg2, &r2), 0);
  td_node_pump(n, 0);
  ASSERT_EQ(td_node_state(n, r2), TD_OBJ_PENDING);
  /* A group of three CPUs never fits: it is not reserved in part. */
  ASSERT_EQ(
      td_node_pg_create(n, 3, (const double(*)[TD_NRES_MAX])bundles_cpu, TD_PG_PACK, NULL, 0, &pg3, &r3), 0);
  td_node_pump(n, 0);
  ASSERT(td_node_state(n, r3) != TD_OBJ_READY);
  /* Found by name while it lives. */
  uint64_t fid, fready;
  int strat, nb;
  const double(*b)[TD_NRES_MAX];
  ASSERT_EQ(td_node_pg_find(n, "g1", &fid, &fready, &strat, &nb, &b), 0);
  ASSERT(fid == pg1 && nb == 2 && strat == TD_PG_PACK && b[1][TD_RES_CPU] == 1);
  td_node_decref(n, fready);
  /* Releasing the first lets the waiting one in, and only it. */
  ASSERT_EQ(td_node_pg_remove(n, pg1), 0);
  td_node_pump(n, 0);
  ASSERT_EQ(td_node_state(n, r2), TD_OBJ_READY);
  ASSERT_EQ(td_node_res_avail(n, TD_RES_CPU), 1);
  ASSERT(td_node_pg_find(n, "g1", &fid, &fready, &strat, &nb, &b) != 0);
  ASSERT_EQ(td_node_pg_remove(n, pg2), 0);
  ASSERT_EQ(td_node_pg_remove(n, pg3), 0);
  td_node_pump(n, 0);
  td_node_decref(n, r1);
  td_node_decref(n, r2);
  td_node_decref(n, r3);
  td_node_pump(n, 0);
  ASSERT(drained(n, 2));
  td_node_destroy(&n);
  return 0;
}
