/* Placement groups (engine/pg.c) on a node with no worker processes,
 * alone or as a head with one fake node joined (node-helpers.h).  Atomic
 * reserve: every bundle or none, by strategy (PACK, SPREAD, STRICT_PACK,
 * STRICT_SPREAD); a group that cannot be placed takes nothing and waits,
 * and is reserved when resources free up or a node joins.  Release:
 * removing a group gives its share back, fails its queued work and
 * cancels its running work; a group made by a client goes with it; one
 * whose node died is placed again.  Tasks in a bundle draw on the
 * bundle's share only.  Each test ends with no live handles. */
#include "node-helpers.h"

/* A group of nb bundles of `cpus` CPUs each. */
static uint64_t mkgroup(td_node_t *n, int nb, double cpus, int strategy, uint64_t *ready) {
  double b[8][TD_NRES_MAX];
  uint64_t pg;
  ASSERT(nb <= 8);
  ASSERT_EQ(td_node_pg_create(n, nb, cpu_bundles(b, nb, cpus), strategy, NULL, 0, &pg, ready), 0);
  return pg;
}

/* Whether the group is reserved, on these nodes ("[\"node-0\",...]"). */
static int placed_on(td_node_t *n, uint64_t pg, const char *nodes) {
  char needle[200];
  snprintf(needle, sizeof(needle), "\"state\":\"CREATED\",\"strategy\":");
  if (!row_has(n, "placement-groups", "pg_id", pg, needle)) return 0;
  snprintf(needle, sizeof(needle), "\"nodes\":%s", nodes);
  return row_has(n, "placement-groups", "pg_id", pg, needle);
}

static int waiting(td_node_t *n, uint64_t pg) {
  return row_has(n, "placement-groups", "pg_id", pg, "\"state\":\"PENDING\"");
}

/* A 1-CPU task in bundle `bundle` (-1: any) of group pg. */
static uint64_t submit_in(td_node_t *n, uint64_t pg, int bundle, double cpus) {
  uint64_t ret = td_node_new_id(n);
  td_spec_t s = task_spec(&ret, cpus);
  s.pg_id = pg;
  s.bundle = bundle;
  return submit(n, &s);
}

static void remove_all(td_node_t *n, const uint64_t *pgs, int k) {
  for (int i = 0; i < k; i++) ASSERT_EQ(td_node_pg_remove(n, pgs[i]), 0);
}

TEST_IMPL(pg_reserve_release) {
  td_node_t *n = mknode(2);
  ASSERT(n);
  double bundles_cpu[3][TD_NRES_MAX];
  cpu_bundles(bundles_cpu, 3, 1);
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
  uint64_t left[] = {r1, r2, r3};
  return end_test(&n, left, 3, KEEP_PEERS);
}

TEST_IMPL(pg_strategies_one_node) {
  td_node_t *n = mknode(8);
  ASSERT(n);
  uint64_t pg[5], ready[5];
  /* On one node every strategy but STRICT_SPREAD places two bundles. */
  pg[0] = mkgroup(n, 2, 1, TD_PG_PACK, &ready[0]);
  pg[1] = mkgroup(n, 2, 1, TD_PG_SPREAD, &ready[1]);
  pg[2] = mkgroup(n, 2, 1, TD_PG_STRICT_PACK, &ready[2]);
  pg[3] = mkgroup(n, 2, 1, TD_PG_STRICT_SPREAD, &ready[3]);
  td_node_pump(n, 0);
  for (int i = 0; i < 3; i++) ASSERT(placed_on(n, pg[i], "[\"node-0\",\"node-0\"]"));
  ASSERT(waiting(n, pg[3]));
  ASSERT_EQ(td_node_state(n, ready[3]), TD_OBJ_PENDING);
  ASSERT_EQ(td_node_res_avail(n, TD_RES_CPU), 2); /* nothing taken for it */
  /* One bundle is spread enough. */
  pg[4] = mkgroup(n, 1, 1, TD_PG_STRICT_SPREAD, &ready[4]);
  ASSERT(placed_on(n, pg[4], "[\"node-0\"]"));
  ASSERT_EQ(td_node_res_avail(n, TD_RES_CPU), 1);
  /* A waiting group's ready object fails when it is removed. */
  ASSERT_EQ(td_node_pg_remove(n, pg[3]), 0);
  ASSERT(failed_with(n, ready[3], "the placement group was removed"));
  ASSERT_EQ(td_node_pg_remove(n, pg[3]), TD_ENOTFOUND);
  uint64_t left[] = {pg[0], pg[1], pg[2], pg[4]};
  remove_all(n, left, 4);
  return end_test(&n, ready, 5, KEEP_PEERS);
}

TEST_IMPL(pg_strategies_cluster) {
  td_node_t *n = head_and_node(2, 4);
  uint64_t pg[3], ready[3];
  /* STRICT_SPREAD: one bundle a node. */
  pg[0] = mkgroup(n, 2, 1, TD_PG_STRICT_SPREAD, &ready[0]);
  ASSERT(placed_on(n, pg[0], "[\"node-0\",\"node-1\"]"));
  /* STRICT_PACK of three: only node-1 has room for all of them. */
  pg[1] = mkgroup(n, 3, 1, TD_PG_STRICT_PACK, &ready[1]);
  ASSERT(placed_on(n, pg[1], "[\"node-1\",\"node-1\",\"node-1\"]"));
  /* PACK of two with one CPU free in the whole cluster: nothing taken. */
  pg[2] = mkgroup(n, 2, 1, TD_PG_PACK, &ready[2]);
  td_node_pump(n, 0);
  ASSERT(waiting(n, pg[2]));
  ASSERT_EQ(td_node_res_avail(n, TD_RES_CPU), 1);
  /* Room on node-1 again: both its bundles go there together. */
  ASSERT_EQ(td_node_pg_remove(n, pg[1]), 0);
  td_node_pump(n, 0);
  ASSERT(placed_on(n, pg[2], "[\"node-1\",\"node-1\"]"));
  ASSERT_EQ(td_node_state(n, ready[2]), TD_OBJ_READY);
  ASSERT_EQ(td_node_res_avail(n, TD_RES_CPU), 2);
  uint64_t left[] = {pg[0], pg[2]};
  remove_all(n, left, 2);
  ASSERT_EQ(td_node_res_avail(n, TD_RES_CPU), 6);
  return end_test(&n, ready, 3, DROP_CLIENT);
}

TEST_IMPL(pg_waits_for_a_node) {
  td_node_t *n = mknode(1);
  ASSERT(n);
  uint64_t ready, pg = mkgroup(n, 2, 1, TD_PG_STRICT_PACK, &ready);
  td_node_pump(n, 0);
  ASSERT(waiting(n, pg));
  ASSERT_EQ(td_node_res_avail(n, TD_RES_CPU), 1);
  /* A node with room joins: the next pass reserves the group there. */
  ASSERT_EQ(join_node(n, 0, 2), 0);
  td_node_pump(n, 0);
  ASSERT(placed_on(n, pg, "[\"node-1\",\"node-1\"]"));
  ASSERT_EQ(td_node_state(n, ready), TD_OBJ_READY);
  ASSERT_EQ(td_node_res_avail(n, TD_RES_CPU), 1);
  remove_all(n, &pg, 1);
  return end_test(&n, &ready, 1, DROP_CLIENT);
}

TEST_IMPL(pg_bundle_share) {
  td_node_t *n = head_and_node(1, 2);
  /* One bundle of two CPUs: all of node-1. */
  uint64_t ready, pg = mkgroup(n, 1, 2, TD_PG_PACK, &ready);
  ASSERT(placed_on(n, pg, "[\"node-1\"]"));
  /* Tasks in it run on its share, taking nothing more from the cluster. */
  uint64_t a = submit_in(n, pg, 0, 1), b = submit_in(n, pg, -1, 1), c = submit_in(n, pg, 0, 1);
  td_node_pump(n, 0);
  ASSERT(row_has(n, "tasks", "ref", a, "\"state\":\"RUNNING\",\"node\":\"node-1\""));
  ASSERT(row_has(n, "tasks", "ref", b, "\"state\":\"RUNNING\",\"node\":\"node-1\""));
  ASSERT(row_has(n, "tasks", "ref", c, "\"state\":\"QUEUED\"")); /* the share is used up */
  ASSERT_EQ(td_node_res_avail(n, TD_RES_CPU), 1);
  /* Work outside the group cannot use the share: it waits. */
  uint64_t out = td_node_new_id(n);
  td_spec_t s = task_spec(&out, 2);
  s.fn_id = 43; /* not known to be short: it does not queue at node-1 without room (test-sched.c) */
  ASSERT(submit(n, &s));
  td_node_pump(n, 0);
  ASSERT(row_has(n, "tasks", "ref", out, "resources: waiting for CPU = 2 to be free"));
  /* Beyond the bundle, or a bundle it has not: failed at once. */
  uint64_t big = submit_in(n, pg, 0, 3), bad = submit_in(n, pg, 5, 1);
  ASSERT(failed_with(n, big, "requires CPU = 3 but its placement group bundle has 2"));
  ASSERT(failed_with(n, bad, "bundle_index 6 is out of range: the placement group has 1 bundles"));
  /* a ends: its share goes to c. */
  ASSERT_EQ(feed_done(n, task_of(n, a), "a"), 0);
  td_node_pump(n, 0);
  ASSERT(row_has(n, "tasks", "ref", c, "\"state\":\"RUNNING\",\"node\":\"node-1\""));
  /* Removed: its running work is cancelled (the node answers), and its
   * CPUs go to the task that waited. */
  ASSERT_EQ(td_node_pg_remove(n, pg), 0);
  td_node_pump(n, 0);
  ASSERT(row_has(n, "tasks", "ref", out, "\"state\":\"RUNNING\",\"node\":\"node-1\""));
  ASSERT_EQ(feed_done_failed(n, task_of(n, b), "cancelled"), 0);
  ASSERT_EQ(feed_done_failed(n, task_of(n, c), "cancelled"), 0);
  ASSERT_EQ(feed_done(n, task_of(n, out), "out"), 0);
  ASSERT_EQ(td_node_state(n, b), TD_OBJ_ERROR);
  ASSERT_EQ(td_node_res_avail(n, TD_RES_CPU), 3);
  uint64_t all[] = {ready, a, b, c, out, big, bad};
  return end_test(&n, all, 7, DROP_CLIENT);
}

TEST_IMPL(pg_remove_fails_its_work) {
  td_node_t *n = mknode(2);
  ASSERT(n);
  uint64_t ready, pg = mkgroup(n, 2, 1, TD_PG_PACK, &ready);
  uint64_t wready, wpg = mkgroup(n, 2, 1, TD_PG_STRICT_SPREAD, &wready);
  uint64_t queued = submit_in(n, pg, 1, 1);
  ASSERT(row_has(n, "tasks", "ref", queued, "\"state\":\"QUEUED\""));
  /* The waiting group's ready object fails; the reserved group's queued
   * task fails; work submitted to it after fails at once. */
  ASSERT_EQ(td_node_pg_remove(n, wpg), 0);
  ASSERT(failed_with(n, wready, "the placement group was removed"));
  ASSERT_EQ(td_node_pg_remove(n, pg), 0);
  ASSERT(failed_with(n, queued, "its placement group was removed"));
  ASSERT_EQ(td_node_res_avail(n, TD_RES_CPU), 2);
  uint64_t late = submit_in(n, pg, 0, 1);
  ASSERT(failed_with(n, late, "its placement group does not exist or was removed"));
  uint64_t all[] = {ready, wready, queued, late};
  return end_test(&n, all, 4, KEEP_PEERS);
}

TEST_IMPL(pg_node_dies) {
  td_node_t *n = head_and_node(2, 2);
  uint64_t ready, pg = mkgroup(n, 2, 1, TD_PG_SPREAD, &ready);
  ASSERT(placed_on(n, pg, "[\"node-0\",\"node-1\"]"));
  ASSERT_EQ(td_node_res_avail(n, TD_RES_CPU), 2);
  /* node-1 dies: the bundle it held is placed again, here. */
  ASSERT_EQ(feed_malformed(n, 0), TD_EPROTO);
  td_node_pump(n, 0);
  ASSERT(placed_on(n, pg, "[\"node-0\",\"node-0\"]"));
  ASSERT_EQ(td_node_res_avail(n, TD_RES_CPU), 0);
  remove_all(n, &pg, 1);
  return end_test(&n, &ready, 1, KEEP_PEERS);
}

/* What the RPC handler below made, and where. */
typedef struct rpc_made {
  td_node_t *n;
  uint64_t pg, ready;
} rpc_made_t;

/* The bindings' RPC handler, reduced to one op: "pg" makes a group of
 * two 1-CPU bundles for the client that asked. */
static void pg_rpc(void *ud, td_wk_t *wk, uint32_t req, const char *op, const uint8_t *args, size_t len) {
  (void)wk, (void)req, (void)args, (void)len;
  rpc_made_t *made = ud;
  double b[2][TD_NRES_MAX];
  if (!strcmp(op, "pg"))
    ASSERT_EQ(
        td_node_pg_create(made->n, 2, cpu_bundles(b, 2, 1), TD_PG_PACK, "theirs", 0, &made->pg, &made->ready),
        0);
}

TEST_IMPL(pg_goes_with_its_client) {
  td_node_t *n = mknode(2);
  ASSERT(n);
  rpc_made_t made = {n, 0, 0};
  td_node_set_rpc(n, pg_rpc, &made);
  msg_t m;
  td_buf_u32(&msg_begin(&m, TD_M_RPC)->b, 0);
  td_buf_str(&m.b, "pg", 2);
  td_buf_str(&m.b, "", 0);
  ASSERT_EQ(msg_feed(n, &m, 0), 0);
  ASSERT(made.pg && placed_on(n, made.pg, "[\"node-0\",\"node-0\"]"));
  ASSERT_EQ(td_node_res_avail(n, TD_RES_CPU), 0);
  /* The client that made it goes: so does the group. */
  ASSERT_EQ(feed_malformed(n, 0), TD_EPROTO);
  ASSERT_EQ(td_node_res_avail(n, TD_RES_CPU), 2);
  uint64_t fid, fready;
  int strat, nb;
  const double(*b)[TD_NRES_MAX];
  ASSERT_EQ(td_node_pg_find(n, "theirs", &fid, &fready, &strat, &nb, &b), TD_ENOTFOUND);
  td_node_decref(n, made.ready);
  return end_test(&n, NULL, 0, KEEP_PEERS);
}

/* Each code table names every value of its enum once, by a distinct name,
 * and td_code_name answers for exactly those: Lua learns the codes from
 * these tables only (core.STRATEGY, core.PG_STRATEGY). */
static void codes_cover(const td_code_t *t, int count) {
  int seen[64] = {0}, k = 0;
  ASSERT(count <= 64);
  for (const td_code_t *c = t; c->name; c++, k++) {
    ASSERT(c->value >= 0 && c->value < count && !seen[c->value]);
    seen[c->value] = 1;
    for (const td_code_t *d = t; d != c; d++) ASSERT(strcmp(d->name, c->name) != 0);
    ASSERT(td_code_name(t, c->value) == c->name);
  }
  ASSERT_EQ(k, count);
  ASSERT(td_code_name(t, count) == NULL && td_code_name(t, -1) == NULL);
}

TEST_IMPL(pg_codes_by_name) {
  codes_cover(td_pg_strategy_codes, TD_PG_COUNT);
  codes_cover(td_strategy_codes, TD_ST_COUNT);
  ASSERT(!strcmp(td_code_name(td_pg_strategy_codes, TD_PG_STRICT_SPREAD), "STRICT_SPREAD"));
  ASSERT(!strcmp(td_code_name(td_strategy_codes, TD_ST_NODE_SOFT), "NODE_SOFT"));
  return 0;
}
