/* The object table (engine/obj.c) driven as a client drives it: values
 * PUT by td_node_feed, references counted by TD_M_REFS deltas (forged
 * ones included: huge or negative deltas neither overflow nor spin, and a
 * link gives back only what it holds), objects held by other objects'
 * nested refs, pins (TD_M_PIN / TD_M_UNPIN, and the pins a GET takes:
 * only a pin the client holds is let go), pending GET requests, and the
 * refs and pins a client held given back when a malformed message drops
 * it.  Each test ends with no live handles (node-helpers.h). */
#include <stdint.h>

#include "node-helpers.h"

#define MIB (1u << 20)

/* Whether id is ready with exactly these bytes. */
static int holds_value(td_node_t *n, uint64_t id, const char *value) {
  const uint8_t *p;
  size_t len;
  int is_err = 1;
  return td_node_bytes(n, id, &p, &len, &is_err) == 0 && !is_err && len == strlen(value) &&
         !memcmp(p, value, len);
}

/* A value of `size` bytes in the shared-memory store, one ref held by
 * the driver; 0 when the store has no room for it. */
static uint64_t store_big(td_node_t *n, size_t size) {
  uint8_t *dst;
  uint64_t id = td_node_new_id(n);
  if (td_node_store(n, id, size, NULL, 0, &dst) != 0) return 0;
  memset(dst, 7, size);
  return id;
}

TEST_IMPL(obj_api_nested_refs) {
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
  return end_test(&n, NULL, 0, KEEP_PEERS);
}

TEST_IMPL(obj_put_and_ref_deltas) {
  td_node_t *n = mknode(2);
  ASSERT(n);
  uint64_t a = td_node_new_id(n);
  ASSERT_EQ(feed_put(n, a, "hello", NULL, 0), 0);
  ASSERT(holds_value(n, a, "hello"));
  /* Two more refs, then three given back: the PUT's own is the last. */
  ASSERT_EQ(feed_refs(n, 0, a, 2), 0);
  ASSERT_EQ(feed_refs(n, 0, a, -1), 0);
  ASSERT_EQ(feed_refs(n, 0, a, -1), 0);
  ASSERT_EQ(td_node_state(n, a), TD_OBJ_READY);
  ASSERT_EQ(feed_refs(n, 0, a, -1), 0);
  ASSERT_EQ(td_node_state(n, a), TD_OBJ_MISSING);
  /* Deltas on an object nobody has made name nothing: no record appears. */
  ASSERT_EQ(feed_refs(n, 0, td_node_new_id(n), 5), 0);
  ASSERT_EQ(feed_refs(n, 0, a, -3), 0);
  td_node_stats_t st;
  td_node_stats(n, &st);
  ASSERT_EQ(st.objects, 0);
  /* The same id PUT twice, or id 0, is malformed: the client goes. */
  uint64_t b = td_node_new_id(n);
  ASSERT_EQ(feed_put(n, b, "once", NULL, 0), 0);
  ASSERT_EQ(feed_put(n, b, "twice", NULL, 0), TD_EPROTO);
  ASSERT_EQ(td_node_state(n, b), TD_OBJ_MISSING); /* its PUT's ref went with it */
  ASSERT_EQ(feed_put(n, 0, "zero", NULL, 0), TD_EPROTO);
  return end_test(&n, NULL, 0, KEEP_PEERS);
}

TEST_IMPL(obj_forged_deltas) {
  td_node_t *n = mknode(2);
  ASSERT(n);
  /* A huge positive delta, sent three times, does not wrap the count;
   * the client's death then gives all of it back in one step. */
  uint64_t a = td_node_new_id(n);
  ASSERT_EQ(feed_put(n, a, "a", NULL, 0), 0);
  for (int i = 0; i < 3; i++) ASSERT_EQ(feed_refs(n, 0, a, INT32_MAX), 0);
  ASSERT_EQ(td_node_state(n, a), TD_OBJ_READY);
  ASSERT_EQ(feed_malformed(n, 0), TD_EPROTO);
  ASSERT_EQ(td_node_state(n, a), TD_OBJ_MISSING);
  /* The most negative delta ends the count at zero in one step: the
   * object is freed once, and the driver's later decref is harmless. */
  uint64_t b = td_node_new_id(n);
  ASSERT_EQ(feed_put(n, b, "b", NULL, 0), 0);
  ASSERT_EQ(feed_refs(n, 0, b, INT32_MAX), 0);
  ASSERT_EQ(feed_refs(n, 0, b, INT32_MIN), 0);
  ASSERT_EQ(td_node_state(n, b), TD_OBJ_MISSING);
  td_node_decref(n, b);
  td_node_incref(n, b); /* nothing to resurrect */
  ASSERT_EQ(td_node_state(n, b), TD_OBJ_MISSING);
  return end_test(&n, NULL, 0, DROP_CLIENT);
}

TEST_IMPL(obj_link_gives_back_only_its_refs) {
  /* A node (index 1) whose head link forges a huge negative delta on an
   * object the head holds no ref to: nothing is let go. */
  td_node_t *n = mknode_at(1, 2);
  ASSERT(n);
  uint8_t *dst;
  uint64_t a = td_node_new_id(n);
  ASSERT_EQ(td_node_store(n, a, 8, NULL, 0, &dst), 0);
  memcpy(dst, "driver's", 8);
  ASSERT_EQ(feed_refs(n, 1, a, -1000), 0);
  ASSERT_EQ(td_node_state(n, a), TD_OBJ_READY);
  /* What it does hold it gives back, and no more. */
  ASSERT_EQ(feed_refs(n, 1, a, 2), 0);
  ASSERT_EQ(feed_refs(n, 1, a, INT32_MIN), 0);
  ASSERT_EQ(td_node_state(n, a), TD_OBJ_READY);
  td_node_decref(n, a);
  ASSERT_EQ(td_node_state(n, a), TD_OBJ_MISSING);
  return end_test(&n, NULL, 0, DROP_HEAD);
}

TEST_IMPL(obj_nested_refs_by_put) {
  td_node_t *n = mknode(2);
  ASSERT(n);
  uint64_t a = td_node_new_id(n), b = td_node_new_id(n), ghost = td_node_new_id(n);
  ASSERT_EQ(feed_put(n, a, "inner", NULL, 0), 0);
  /* b's value holds a ref to a, and one to an object that never was. */
  uint64_t refs[2] = {a, ghost};
  ASSERT_EQ(feed_put(n, b, "outer", refs, 2), 0);
  ASSERT_EQ(feed_refs(n, 0, a, -1), 0);
  ASSERT(holds_value(n, a, "inner")); /* b still holds it */
  ASSERT_EQ(feed_refs(n, 0, b, -1), 0);
  ASSERT_EQ(td_node_state(n, b), TD_OBJ_MISSING);
  ASSERT_EQ(td_node_state(n, a), TD_OBJ_MISSING); /* with its last holder */
  ASSERT_EQ(td_node_state(n, ghost), TD_OBJ_MISSING);
  return end_test(&n, NULL, 0, DROP_CLIENT);
}

TEST_IMPL(obj_pins) {
  td_node_t *n = mknode(2);
  ASSERT(n);
  /* 3 MiB of a 4 MiB store: another 2 MiB fits only by spilling it. */
  uint64_t a = store_big(n, 3 * MIB);
  ASSERT(a && td_node_in_store(n, a));
  ASSERT_EQ(feed_pin(n, TD_M_PIN, a), 0);
  ASSERT(row_has(n, "objects", "object_id", a, "\"pins\":1"));
  ASSERT_EQ(store_big(n, 2 * MIB), 0); /* pinned: it cannot be spilled */
  /* The driver pins it too; the client lets go of its pin, then tries to
   * let go of one more, which is the driver's: that one stays. */
  ASSERT_EQ(td_node_pin(n, a, 1), 1);
  ASSERT_EQ(feed_pin(n, TD_M_UNPIN, a), 0);
  ASSERT_EQ(feed_pin(n, TD_M_UNPIN, a), 0);
  ASSERT(row_has(n, "objects", "object_id", a, "\"pins\":1"));
  ASSERT_EQ(store_big(n, 2 * MIB), 0);
  ASSERT_EQ(td_node_pin(n, a, -1), 1);
  ASSERT_EQ(td_node_pin(n, a, -1), 0); /* no pin left to let go */
  /* Unpinned, it is spilled to make room. */
  uint64_t b = store_big(n, 2 * MIB);
  ASSERT(b);
  ASSERT(!td_node_in_store(n, a));
  td_node_stats_t st;
  td_node_stats(n, &st);
  ASSERT_EQ(st.spilled_bytes, 3 * MIB);
  /* An inline value has no place to pin. */
  uint64_t c = td_node_new_id(n);
  ASSERT_EQ(feed_put(n, c, "small", NULL, 0), 0);
  ASSERT_EQ(td_node_pin(n, c, 1), 0);
  uint64_t left[] = {a, b};
  return end_test(&n, left, 2, DROP_CLIENT);
}

/* A worker's ALLOC that finds the store full of values in use waits for
 * room, and gets it when a pin goes; it does not fail at once. */
TEST_IMPL(obj_alloc_waits_for_room) {
  td_node_t *n = mknode(2);
  ASSERT(n);
  uint64_t big = store_big(n, 3 * MIB);
  ASSERT(big);
  ASSERT_EQ(feed_pin(n, TD_M_PIN, big), 0); /* in use: it cannot spill */
  msg_t m;
  td_buf_u32(&msg_begin(&m, TD_M_ALLOC)->b, 7);
  td_buf_u64(&m.b, 2 * MIB);
  ASSERT_EQ(msg_feed(n, &m, 0), 0);
  td_node_pump(n, 0);
  td_node_handles_t h;
  td_node_handles(n, &h);
  ASSERT_EQ(h.requests, 1); /* waiting, not failed */
  ASSERT(td_node_in_store(n, big));
  ASSERT_EQ(feed_pin(n, TD_M_UNPIN, big), 0);
  td_node_pump(n, 0);
  td_node_handles(n, &h);
  ASSERT_EQ(h.requests, 0); /* answered: big spilled to make room */
  ASSERT(!td_node_in_store(n, big));
  uint64_t left[] = {big};
  return end_test(&n, left, 1, DROP_CLIENT);
}

TEST_IMPL(obj_client_death_gives_back) {
  td_node_t *n = mknode(2);
  ASSERT(n);
  uint64_t driver = store_big(n, 3 * MIB);
  ASSERT(driver);
  /* The client holds: a value it PUT, two refs to the driver's object,
   * a pin on it, a GET's pin on it, and a GET waiting for a task. */
  uint64_t mine = td_node_new_id(n), ret = td_node_new_id(n);
  ASSERT_EQ(feed_put(n, mine, "mine", NULL, 0), 0);
  ASSERT_EQ(feed_refs(n, 0, driver, 2), 0);
  ASSERT_EQ(feed_pin(n, TD_M_PIN, driver), 0);
  ASSERT_EQ(feed_get(n, 1, driver, -1), 0); /* answered at once: the value stays pinned for it */
  ASSERT(row_has(n, "objects", "object_id", driver, "\"pins\":2"));
  td_spec_t s = task_spec(&ret, 1);
  ASSERT_EQ(feed_submit(n, 0, &s), 0);
  ASSERT_EQ(feed_get(n, 2, ret, -1), 0);
  td_node_handles_t h;
  td_node_handles(n, &h);
  ASSERT_EQ(h.requests, 1);
  ASSERT_EQ(store_big(n, 2 * MIB), 0);
  /* A malformed message drops it: everything it held is given back. */
  ASSERT_EQ(feed_malformed(n, 0), TD_EPROTO);
  td_node_handles(n, &h);
  ASSERT_EQ(h.requests, 0);
  ASSERT_EQ(td_node_state(n, mine), TD_OBJ_MISSING);
  ASSERT(row_has(n, "objects", "object_id", driver, "\"refs\":1"));
  ASSERT(row_has(n, "objects", "object_id", driver, "\"pins\":0"));
  uint64_t more = store_big(n, 2 * MIB); /* unpinned: the driver's value spills */
  ASSERT(more);
  /* Its task, still queued, went with it (a driver's work ends with the
   * driver): nothing is left to cancel, and its result, with no holder,
   * goes. */
  ASSERT_EQ(td_node_cancel(n, ret, 0), TD_ENOTFOUND);
  td_node_settle(n);
  ASSERT_EQ(td_node_state(n, ret), TD_OBJ_MISSING);
  uint64_t left[] = {driver, more};
  return end_test(&n, left, 2, KEEP_PEERS);
}

/* A change made outside a message (here the host's own cancel) is
 * recorded, not acted on inside the call: what waits on the object wakes
 * at td_node_settle (the driver's call guard, or the pump's next turn),
 * so the object table never calls up into the task layer. */
TEST_IMPL(obj_changes_outside_a_message_settle) {
  td_node_t *n = mknode(2);
  ASSERT(n);
  uint64_t a = td_node_new_id(n), b = td_node_new_id(n);
  td_spec_t s = task_spec(&a, 1);
  ASSERT(submit(n, &s)); /* it fits and waits, queued, for a worker (none comes here) */
  s = task_spec(&b, 1);
  s.deps = &a;
  s.ndeps = 1;
  ASSERT(submit(n, &s));
  td_node_incref(n, a); /* held, so that it stays failed, not freed */
  ASSERT_EQ(td_node_cancel(n, a, 0), 0);
  ASSERT_EQ(td_node_state(n, a), TD_OBJ_ERROR);
  ASSERT_EQ(td_node_state(n, b), TD_OBJ_PENDING); /* its waiter is not woken inside the call */
  td_node_settle(n);
  ASSERT(failed_with(n, b, "cancel")); /* woken: a dependency failed */
  td_node_decref(n, a);
  td_node_decref(n, a);
  td_node_decref(n, b);
  return end_test(&n, NULL, 0, KEEP_PEERS);
}

TEST_IMPL(obj_get_requests) {
  td_node_t *n = mknode(2);
  ASSERT(n);
  uint64_t r1 = td_node_new_id(n), r2 = td_node_new_id(n);
  td_spec_t s = task_spec(&r1, 1);
  ASSERT(submit(n, &s));
  s = task_spec(&r2, 1);
  ASSERT(submit(n, &s));
  /* Two GETs wait: one for good, one with a short timeout. */
  ASSERT_EQ(feed_get(n, 1, r1, -1), 0);
  ASSERT_EQ(feed_get(n, 2, r2, 0.01), 0);
  td_node_handles_t h;
  td_node_handles(n, &h);
  ASSERT_EQ(h.requests, 2);
  double until = td_now() + 5;
  do {
    td_node_pump(n, 0.005);
    td_node_handles(n, &h);
  } while (h.requests == 2 && td_now() < until);
  ASSERT_EQ(h.requests, 1); /* the timed one was answered */
  /* The other is answered when its object fails (cancelled). */
  ASSERT_EQ(td_node_cancel(n, r1, 0), 0);
  td_node_pump(n, 0);
  td_node_handles(n, &h);
  ASSERT_EQ(h.requests, 0);
  ASSERT(failed_with(n, r1, "cancelled"));
  ASSERT_EQ(td_node_cancel(n, r2, 0), 0);
  uint64_t left[] = {r1, r2};
  return end_test(&n, left, 2, DROP_CLIENT);
}
