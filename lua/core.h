/* Tide Lua bindings: the `tide.core` module that stdlib/tide.lua builds
 * the public API on. One module, two backends: in the driver the calls go
 * straight to the embedded node; in a worker they become messages to the
 * node, and blocking calls yield the task's coroutine (or wait).
 * core.c holds what both share, core_driver.c the driver's backend,
 * worker_api.c the worker's (core_int.h, private, joins them).
 * Uses node, ser, chan.
 */
#ifndef TD_CORE_H
#define TD_CORE_H

#include <lua.h>

#include "chan.h"
#include "node.h"
#include "ser.h"

typedef int (*td_push_fn)(lua_State *L, const uint8_t *p, size_t n, void *ud);
struct td_core_be; /* the driver's or a worker's calls (core_int.h) */

/* What a blocking call tells stdlib/tide.lua (core.get1 and core.getn
 * return it first; core.wait and core.sleep return it in place of their
 * result when the wait ends early). Lua reads them by name: core.STATUS,
 * from td_get_status_codes. */
enum {
  TD_GET_OK,        /* the value follows */
  TD_GET_ERROR,     /* the task failed: its error table follows */
  TD_GET_TIMEOUT,   /* the timeout passed first */
  TD_GET_CANCELLED, /* the calling task was cancelled while it waited */
  TD_GET_RAISED     /* the reply could not be made into values: a message follows */
};
extern const td_code_t td_get_status_codes[];

/* Process-wide state of the bindings (one per process). */
typedef struct td_ctx {
  int is_driver;
  const struct td_core_be *be; /* is_driver's backend, set when tide.core opens */
  td_node_t *node;         /* driver: the embedded node */
  lua_State *rpcL;         /* driver: private state that runs worker RPCs */
  uint64_t rpc_caller;     /* driver: the process whose RPC op runs now (0: none) */
  td_chan_t ch;            /* worker: channel to the node */
  uint8_t *base;           /* worker: store mapping */
  size_t cap;
  uint64_t wk_id;          /* 0 in the driver */
  uint32_t seq;            /* worker: id counter */
  uint32_t next_req;
  int kind;                /* worker kind: WK_TASK, WK_HOST, WK_GPUHOST, WK_CLIENT (node.h) */
  size_t inline_max;
  td_map_t lrefs;          /* worker: id -> local handle count */
  uint64_t *dec;           /* refs dropped by __gc, applied at safe points */
  size_t ndec, capdec;
  uint64_t *unpin;         /* pins of zero-copy tensors let go, likewise */
  size_t nunpin, capunpin;
  int mapped;              /* views of store objects or refs made since the worker last collected */
  td_ser_t ser;            /* reusable encoder */
  /* What is running now, for get_runtime_context and print prefixes. */
  uint64_t cur_task, cur_actor;
  uint64_t print_task;        /* whose prints these are when cur_task is 0 (an actor's init) */
  char cur_name[128];
  int cur_streaming;       /* the running task or call streams (tide.yield) */
  char gpu_ids[128];
} td_ctx_t;

extern td_ctx_t td_ctx;

int luaopen_tide_core(lua_State *L);
/* package.path and preloads for a new state; leaves package.preload pushed. */
void td_core_setup_paths(lua_State *L, const char *home);
/* Applies (driver) or sends (worker) reference changes queued by __gc. */
void td_core_flush_refs(void);
/* Pushes an ObjectRef for id. `owned`: the caller already holds the
 * node-side reference (fresh returns, puts); otherwise one is taken. */
void td_core_pushref(lua_State *L, uint64_t id, int owned);
uint64_t td_core_new_id(void);
/* Ids (functions, classes, actors, placement groups, tasks, objects) cross
 * into Lua as strings of 16 lowercase hex digits: exact, hashable and
 * printable (a Lua number rounds above 2^53, and ids made on node 2 and up
 * are larger).  td_core_toid: 0, or -1 when idx holds no such string. */
void td_core_pushid(lua_State *L, uint64_t id);
int td_core_toid(lua_State *L, int idx, uint64_t *id);
/* Raises "bad argument #idx (<what> id expected, got ...)" on anything else. */
uint64_t td_core_checkid(lua_State *L, int idx, const char *what);
/* Encodes a value for a result or put: inline, or into shared memory
 * (worker: asks the node for an extent). Appends to b. Returns 0 or err. */
int td_core_put_value(const td_ser_t *s, td_buf_t *b);
/* Pushes the value an encoded wire value refers to (TD_V_*); `id` is the
 * object's (0 if unknown), for tensors that map its bytes in the store.
 * Returns 0, 1 if it is an error table (pushed), or TD_EPROTO. */
int td_core_push_wire(lua_State *L, td_rd_t *rd, uint64_t id);
/* Raises a Lua error describing a serialization failure. */
int td_core_ser_error(lua_State *L, td_ser_t *s);

/* -- Worker side (worker.c) ---------------------------------------------------- */

/* Starts a request frame of `type`; writes a new request id. */
uint32_t td_w_begin_req(uint8_t type);
/* Waits for the reply to req: yields when L is a coroutine the worker
 * resumes, blocks otherwise; `push` turns the reply into Lua values. */
int td_w_await(lua_State *L, uint32_t req, td_push_fn push, void *ud);
/* A client over TCP: the next td_w_await gives up by itself a little after
 * `timeout` s (none if < 0) when no reply comes, pushing `reply` (what the
 * node answers on a timeout; static); a reply arriving later is dropped. */
void td_w_timeout(double timeout, const uint8_t *reply, uint32_t len);
/* Allocates a shared-memory extent (blocking round trip). */
int td_w_alloc(size_t size, size_t *off);
int td_worker_main(int argc, char **argv);
/* Stops the driver's background pump thread (idempotent). */
void td_core_bg_stop(void);
/* Node daemon: serve `tide submit` jobs (stdlib/tide/jobs.lua) over RPC. */
void td_core_enable_jobs(const char *home);
/* Attaches this process to a node as a client (see worker.c). */
int td_client_connect(const char *path, char *err, size_t errlen);
/* The same over an fd from the TCP bridge (no shared memory). */
int td_client_connect_fd(int fd, const char *where, char *err, size_t errlen);
/* Worker sleep that keeps the process responsive. */
int td_w_sleep(lua_State *L, double seconds);

#endif
