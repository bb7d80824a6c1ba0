/* Private to the tide.core bindings: what core.c (the part both backends
 * share) and its two backends, core_driver.c (the driver's direct calls
 * into its node) and worker_api.c (a worker's requests to its node), use
 * of each other. Other files use core.h.
 */
#ifndef TD_CORE_INT_H
#define TD_CORE_INT_H

#include <lauxlib.h>

#include "core.h"

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

/* The driver's backend: the d_* calls and the control operations. */
extern const luaL_Reg td__driver_fns[];
/* Set while the node's private RPC state opens tide.core (no guards). */
extern int td__opening_rpc;
/* The C function in upvalue 1, run holding the node against the pump thread. */
int td__guard(lua_State *L);
/* core.put in the driver. */
int td__d_put(lua_State *L);
/* Adds core.start and core.stop to the module table at the top. */
int td_core_register_start(lua_State *L);
/* Sets up the node's private RPC state; `from` is the driver's state. */
void td_core_driver_rpc(lua_State *from);

/* -- worker_api.c ------------------------------------------------------------------ */

/* The worker's backend: the w_* calls. */
extern const luaL_Reg td__worker_fns[];
/* core.put in a worker. */
int td__w_put(lua_State *L);
/* A control operation as an RPC to the node (upvalues: op, no reply wanted). */
int td__w_rpc(lua_State *L);

#endif
