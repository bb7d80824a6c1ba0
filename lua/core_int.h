/* Private to the tide.core bindings: what core.c (the part both backends
 * share) and its two backends, core_driver.c (the driver's direct calls
 * into its node) and worker_api.c (a worker's requests to its node), use
 * of each other. Other files use core.h.
 */
#ifndef TD_CORE_INT_H
#define TD_CORE_INT_H

#include <lauxlib.h>

#include "core.h"
#include "proto.h"

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

/* Pushes status TD_GET_ERROR (is_err) or TD_GET_OK under the value at the
 * top; returns 2. */
int td__ret_status(lua_State *L, int is_err);
/* Pushes status TD_GET_TIMEOUT; returns 1. */
int td__ret_timeout(lua_State *L);
/* Pushes element i's value (of getn's); returns 0, 1 (an error table) or
 * < 0 (malformed, nothing pushed). */
typedef int (*td__value_fn)(lua_State *L, uint32_t i, void *ud);
/* getn's results: TD_GET_OK and the array of the n values (with field n),
 * or TD_GET_ERROR and the first error instead. Returns 2, or value's < 0 code. */
int td__ret_values(lua_State *L, uint32_t n, td__value_fn value, void *ud);
/* stream_next's result for st (a td_sn_t): the ref to item (`owned` as in
 * td_core_pushref), nil (the stream ended) or false (timeout). Returns 1. */
int td__ret_item(lua_State *L, td_sn_t st, uint64_t item, int owned);

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

/* -- Control operations (core_driver.c) --------------------------------------------
 * Every control call a worker or client makes of its node (cancel, kill,
 * get_actor, placement groups, the KV, jobs ...) is one entry of
 * td__rpc_table, as a command of Redis's command table. The op's name is
 * its key on the wire (TD_M_RPC carries it, and a node relays it to its
 * head as is); each end finds the entry with td__rpc_find, so the table's
 * order is no contract. The driver calls a C op's function directly; a
 * worker's core.<name> sends it; the node's private Lua state runs what
 * arrives, dispatched by the entry, never by comparing names. */

/* How an op travels and where it runs. */
enum {
  TD_RPC_CAST = 1 << 0,         /* sent without a request id: nobody waits for an answer */
  TD_RPC_HEAD = 1 << 1,         /* the cluster's state: a node relays it to its head */
  TD_RPC_HEAD_IF_NONE = 1 << 2, /* answered here if it can be; relayed to the head when it returns nothing */
};

/* A C op whose arguments are bytes, not an encoded list: runs without Lua. */
typedef void (*td_rpc_raw_fn)(const uint8_t *args, size_t len);

typedef struct td_rpc_op {
  const char *name;  /* its name in Lua (core.<name>, call_node) and on the wire */
  lua_CFunction fn;  /* a C op: the driver's function, run in the private state */
  td_rpc_raw_fn raw; /* or a C op without Lua (always a cast) */
  unsigned flags;    /* TD_RPC_* */
} td_rpc_op_t;
/* fn and raw both NULL: a Lua op, a function that stdlib/tide/kv.lua,
 * jobs.lua or obs.lua installs in the private state's ops table. */

/* The op c_register sends: a function or class definition, as bytes. */
#define TD_RPC_REGISTER "register"

/* Every op, ended by {NULL}. */
extern const td_rpc_op_t td__rpc_table[];
/* The op named name[0..len), or NULL when there is none. */
const td_rpc_op_t *td__rpc_find(const char *name, size_t len);

/* -- serve.c: the serve ingress's control ops (td__rpc_table) ----------------------- */

/* core.serve_start, serve_deployment, serve_replicas, serve_remove,
 * serve_stats, serve_stop: a driver with an embedded node calls them; an
 * attached client's are RPCs that run them on its node (lua/serve.c). */
int td_serve_start(lua_State *L);
int td_serve_deployment(lua_State *L);
int td_serve_replicas(lua_State *L);
int td_serve_remove(lua_State *L);
int td_serve_stats(lua_State *L);
int td_serve_stop(lua_State *L);

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
