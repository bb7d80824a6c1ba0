/* Unit tests of the Lua binding's value serialization (lua/ser.c),
 * including malformed input, which must be rejected, never crash. */
#include <lauxlib.h>
#include <lualib.h>
#include <stdlib.h>
#include <string.h>

#include "core_int.h"
#include "ser.h"
#include "test.h"

static void test_mkref(void *ud, lua_State *L, uint64_t id) {
  (void)ud;
  lua_pushnumber(L, (lua_Number)id);
}

TEST_IMPL(ser_roundtrip) {
  lua_State *L = luaL_newstate();
  luaL_openlibs(L);
  luaL_newmetatable(L, TD_REF_MT);
  lua_pop(L, 1);
  /* A cyclic, shared, nested value with a large string and a number array. */
  ASSERT_EQ(luaL_dostring(L,
    "local t = {1, 2, 'x', flag = true, nested = {a = 1.5}}\n"
    "t.self = t; t.again = t.nested\n"
    "t.big = string.rep('z', 100000)\n"
    "t.nums = {} for i = 1, 100 do t.nums[i] = i * 0.5 end\n"
    "return t"), 0);
  td_ser_t s;
  td_ser_init(&s);
  ASSERT_EQ(td_ser_value(&s, L, -1, "value"), 0);
  ASSERT_EQ(s.nsegs, 1); /* the big string is not copied twice */
  uint8_t *bytes = malloc(s.size);
  td_ser_copy(&s, bytes);
  td_deser_t d = {0};
  d.mkref = test_mkref;
  ASSERT_EQ(td_deser_value(&d, L, bytes, s.size), 0);
  lua_setglobal(L, "u");
  ASSERT_EQ(luaL_dostring(L,
    "assert(u[1] == 1 and u[3] == 'x' and u.flag == true and u.nested.a == 1.5)\n"
    "assert(u.self == u and u.again == u.nested and #u.big == 100000)\n"
    "assert(#u.nums == 100 and u.nums[100] == 50)"), 0);
  /* Truncations and corruptions fail cleanly. */
  for (size_t cut = 0; cut < s.size; cut += 97) {
    int top = lua_gettop(L);
    td_deser_value(&d, L, bytes, cut);
    lua_settop(L, top);
  }
  srand(2);
  for (int i = 0; i < 3000; i++) {
    uint8_t junk[128];
    size_t n = (size_t)(rand() % 128);
    for (size_t k = 0; k < n; k++) junk[k] = (uint8_t)(rand() % 16);
    int top = lua_gettop(L);
    td_deser_value(&d, L, junk, n);
    lua_settop(L, top);
  }
  free(bytes);
  /* Unsendable values are named with their place. */
  ASSERT_EQ(luaL_dostring(L, "return {cfg = {cb = coroutine.create(print)}}"), 0);
  ASSERT_EQ(td_ser_value(&s, L, -1, "argument 2"), TD_ESER);
  ASSERT(strstr(s.err, "coroutine") && strstr(s.err, "argument 2") && strstr(s.err, "cfg.cb"));
  lua_pop(L, 1);
  lua_pushcfunction(L, luaopen_base);
  ASSERT_EQ(td_ser_value(&s, L, -1, "argument 1"), TD_ESER);
  ASSERT(strstr(s.err, "C function"));
  td_ser_free(&s);
  lua_close(L);
  return 0;
}

/* The control operations' table (lua/core_driver.c): every op is found by
 * its name and only by it; an op that runs without Lua is a cast (its
 * sender waits for no answer, and none comes). */
TEST_IMPL(rpc_table) {
  int n = 0, lua_ops = 0;
  for (const td_rpc_op_t *op = td__rpc_table; op->name; op++, n++) {
    ASSERT(td__rpc_find(op->name, strlen(op->name)) == op);
    ASSERT(!(op->fn && op->raw));
    if (op->raw) ASSERT(op->flags & TD_RPC_CAST);
    if (!op->fn && !op->raw) lua_ops++;
  }
  ASSERT(n > 10 && lua_ops > 0);
  ASSERT(td__rpc_find("", 0) == NULL);
  ASSERT(td__rpc_find("kv_", 3) == NULL);
  ASSERT(td__rpc_find("kv_putx", 7) == NULL);
  ASSERT(td__rpc_find("cance", 5) == NULL);
  ASSERT(td__rpc_find("cancelled", 6) == td__rpc_find("cancel", 6)); /* by length */
  ASSERT(td__rpc_find("cancel", 6)->fn != NULL);
  ASSERT(td__rpc_find("pg_remove", 9)->flags & TD_RPC_CAST);
  ASSERT(td__rpc_find("kv_get", 6)->flags & TD_RPC_HEAD);
  ASSERT(td__rpc_find("get_actor", 9)->flags & TD_RPC_HEAD_IF_NONE);
  ASSERT(td__rpc_find(TD_RPC_REGISTER, strlen(TD_RPC_REGISTER))->raw != NULL);
  return 0;
}
