/* Private to the tide.core bindings: what core.c (the part both backends
 * share) and its two backends, core_driver.c (the driver's direct calls
 * into its node) and worker_api.c (a worker's requests to its node), use
 * of each other. Other files use core.h.
 */
#ifndef TD_CORE_INT_H
#define TD_CORE_INT_H

#include <lauxlib.h>

#include "core.h"

/* -- The backend -----------------------------------------------------------------
 * What the driver and a worker do differently for the calls both have.
 * Each such call is bound once, in core.c (c_get1, c_getn, c_wait,
 * c_stream_next, c_put, c_sleep): the binding checks its arguments and
 * reads ids and timeouts, then calls td_ctx.be, which reaches the node
 * (core_driver.c: directly, pumping it until done; worker_api.c: a request
 * frame, then td_w_await) and pushes the results with the td__ret_*
 * helpers. A backend function returns how many results it pushed, or what
 * td_w_await returned (a yield): the binding returns that as is. Timeouts
 * are in seconds, < 0 for none. */
typedef struct td_core_be {
  /* core.get1: pushes status 0 and the value, 1 and the error table, or 2 (timeout) alone. */
  int (*get1)(lua_State *L, uint64_t id, double timeout);
  /* core.getn: ids (n of them) are the caller's, valid until it returns; td__ret_values. */
  int (*getn)(lua_State *L, const uint64_t *ids, uint32_t n, double timeout);
  /* core.wait: pushes an array of n booleans (ready) once num are ready or on the timeout. */
  int (*wait)(lua_State *L, const uint64_t *ids, uint32_t n, int num, double timeout);
  /* core.stream_next: item idx (from 0) of the stream id; td__ret_item. */
  int (*stream_next)(lua_State *L, uint64_t id, uint32_t idx, double timeout);
  /* core.put: stores td_ctx.ser's value as a new object, *id (0 on a first
   * try, kept for a retry). Returns 0, or a TD_E* code with nothing stored. */
  int (*put)(lua_State *L, uint64_t *id);
  /* The store's capacity in bytes, for put's error; < 0 where not known. */
  double (*store_capacity)(void);
  /* core.sleep: pushes nothing, or 3 when a worker's task was cancelled. */
  int (*sleep)(lua_State *L, double seconds);
} td_core_be_t;

/* Pushes status st (0 ok, 1 error) under the value at the top; returns 2. */
int td__ret_status(lua_State *L, int st);
/* Pushes status 2, a timeout; returns 1. */
int td__ret_timeout(lua_State *L);
/* Pushes element i's value (of getn's); returns 0, 1 (an error table) or
 * < 0 (malformed, nothing pushed). */
typedef int (*td__value_fn)(lua_State *L, uint32_t i, void *ud);
/* getn's results: status 0 and the array of the n values (with field n),
 * or 1 and the first error instead. Returns 2, or value's < 0 code. */
int td__ret_values(lua_State *L, uint32_t n, td__value_fn value, void *ud);
/* stream_next's result for st: 0 the ref to item (`owned` as in
 * td_core_pushref), 1 nil (the stream ended), 2 false (timeout). Returns 1. */
int td__ret_item(lua_State *L, int st, uint64_t item, int owned);

/* -- core.c ---------------------------------------------------------------------- */

/* The id of the ObjectRef at idx; raises on anything else. */
uint64_t td__checkref(lua_State *L, int idx);
/* Whether the refs the next decode makes are owned (td_core_pushref). */
extern int td__mkref_owned_flag;
/* Decodes a value; `shm_id` names the object whose bytes lie in the store
 * (0: they do not). Returns 0, or non-zero with a message pushed. */
int td__decode(lua_State *L, const uint8_t *p, size_t n, uint64_t shm_id);
/* Number field k of the table at t, or def. */
double td__optnum(lua_State *L, int t, const char *k, double def);
/* Collects garbage and gives back the holds it drops (before a full store
 * is reported). */
void td__collect(lua_State *L);
/* The control operations a worker reaches through RPC (NULL-terminated). */
extern const char *const td__rpc_ops[];

/* -- core_driver.c ----------------------------------------------------------------- */

/* The driver's backend, and its calls a worker does not have (the
 * control operations, pump, state). */
extern const td_core_be_t td__driver_be;
extern const luaL_Reg td__driver_fns[];
/* Set while the node's private RPC state opens tide.core (no guards). */
extern int td__opening_rpc;
/* The C function in upvalue 1, run holding the node against the pump thread. */
int td__guard(lua_State *L);
/* Adds core.start and core.stop to the module table at the top. */
int td_core_register_start(lua_State *L);
/* Sets up the node's private RPC state; `from` is the driver's state. */
void td_core_driver_rpc(lua_State *from);

/* -- worker_api.c ------------------------------------------------------------------ */

/* The worker's backend, and its calls the driver does not have
 * (yield_item, stream_room, print). */
extern const td_core_be_t td__worker_be;
extern const luaL_Reg td__worker_fns[];
/* A control operation as an RPC to the node (upvalues: op, no reply wanted). */
int td__w_rpc(lua_State *L);

#endif
