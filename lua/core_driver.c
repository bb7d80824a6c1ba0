/* Tide Lua bindings, the driver's backend of tide.core (see core.h): its
 * direct calls into the node embedded in the driver process. The pump
 * thread that advances the node while the script computes, and the guard
 * around every driver entry point; its backend of the calls a worker has
 * too (td__driver_be: gets, waits, streams, puts and sleeps that pump the
 * node until done, bound in core.c); the control operations (cancel, kill, actors,
 * placement groups, resources, nodes, stats, timeline, why, persist,
 * packages) and their table, td__rpc_table, through which workers' RPCs
 * are dispatched; the node's private Lua state that runs those RPCs
 * (td_core_driver_rpc, td__rpc_cb) and jobs; and core.start/core.stop.
 * Uses core.c (core_int.h), node, persist, pkg, bridge.
 */
#include "core_int.h"
#include "persist.h"
#include "pkg.h"
#include "bridge.h"

#include <lauxlib.h>
#include <lualib.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <sys/eventfd.h>

/* -- Background pump -----------------------------------------------------------
 * The embedded node lives in the driver process and advances when the
 * driver is inside a tide call. So that workers are not stalled while the
 * script computes, a thread pumps the node whenever the driver is not in a
 * call. The two never touch the node at once: a Dekker-style handshake on
 * two sequentially consistent flags. The thread runs no Lua but the node's
 * private RPC state. */
static _Atomic int td__driver_in, td__bg_active, td__bg_stop;
static pthread_t td__bg;
static int td__bg_running;
/* Wakes the thread from its poll when it is to stop, so that a script's
 * exit does not wait out the poll's timeout (it made `tide run` of a
 * one-line script take 18 or 38 ms, by chance). */
static int td__bg_wake = -1;

static inline void td__enter(void) {
  atomic_store(&td__driver_in, 1);
  while (atomic_load(&td__bg_active)) sched_yield();
}
static inline void td__leave(void) { atomic_store(&td__driver_in, 0); }

static void *td__bg_main(void *arg) {
  (void)arg;
  enum { MAXFD = 4096 };
  static int fds[MAXFD];
  static struct pollfd pfds[MAXFD];
  while (!atomic_load(&td__bg_stop)) {
    if (atomic_load(&td__driver_in)) {
      usleep(2000);
      continue;
    }
    atomic_store(&td__bg_active, 1);
    if (atomic_load(&td__driver_in)) {
      atomic_store(&td__bg_active, 0);
      continue;
    }
    td_node_pump(td_ctx.node, 0);
    int n = td_node_fds(td_ctx.node, fds, MAXFD - 1);
    atomic_store(&td__bg_active, 0);
    for (int i = 0; i < n; i++) pfds[i] = (struct pollfd){fds[i], POLLIN, 0};
    pfds[n] = (struct pollfd){td__bg_wake, POLLIN, 0};
    poll(pfds, (nfds_t)n + 1, 20);
  }
  return NULL;
}

static void td__bg_start(void) {
  if (td__bg_running) return;
  if (td__bg_wake < 0) td__bg_wake = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  atomic_store(&td__bg_stop, 0);
  if (pthread_create(&td__bg, NULL, td__bg_main, NULL) == 0) td__bg_running = 1;
}

/* Stops the background pump (before the node goes away, or when a daemon
 * pumps the node itself). */
void td_core_bg_stop(void) {
  if (!td__bg_running) return;
  atomic_store(&td__bg_stop, 1);
  uint64_t one = 1;
  ssize_t w = write(td__bg_wake, &one, sizeof(one));
  (void)w;
  pthread_join(td__bg, NULL);
  uint64_t got;
  w = read(td__bg_wake, &got, sizeof(got)); /* ready for a next start */
  td__bg_running = 0;
  atomic_store(&td__driver_in, 0);
}

/* Wraps a driver function: the node is ours while it runs. Guards nest
 * (a put may call a __tide_ser hook that calls core.encode); only the
 * outermost gives the node back. A Lua error unwinds past the guards
 * without leaving them: the next entry sees that its frame is above the
 * recorded outermost one (the stack grows down) and starts over. */
static int td__depth;
static char *td__outer_sp;

int td__guard(lua_State *L) {
  lua_CFunction f = lua_tocfunction(L, lua_upvalueindex(1));
  char here;
  if (td__depth && &here > td__outer_sp) td__depth = 0;
  if (td__depth++ == 0) {
    td__outer_sp = &here;
    td__enter();
  }
  int n = f(L);
  if (--td__depth == 0) {
    if (td_ctx.node) td_node_settle(td_ctx.node); /* what the call changed takes effect before it returns */
    td__leave();
  }
  return n;
}
int td__opening_rpc; /* the node's private state takes no guards */

/* -- Driver: the backend (td__driver_be), waiting on the node ------------------------ */

extern volatile int td_interrupted;
volatile int td_interrupted;

static void td__pump(lua_State *L, double deadline) {
  td_core_flush_refs();
  double wait = deadline - td_now();
  if (wait > 0.5) wait = 0.5;
  td_node_pump(td_ctx.node, wait < 0 ? 0 : wait);
  if (td_interrupted) {
    td_interrupted = 0;
    lua_sethook(L, NULL, 0, 0);
    luaL_error(L, "interrupted");
  }
}

/* When a wait of `timeout` s (< 0: none) begun now gives up. */
static double td__deadline(double timeout) { return timeout < 0 ? 1e300 : td_now() + timeout; }

/* Pushes the value (or error table) of a finished object; returns status
 * 0 ok, 1 error. */
static int td__driver_value(lua_State *L, uint64_t id) {
  const uint8_t *p;
  size_t n;
  int is_err;
  int rc = td_node_bytes(td_ctx.node, id, &p, &n, &is_err);
  if (rc == TD_ESTOREFULL) {
    td__collect(L);
    rc = td_node_bytes(td_ctx.node, id, &p, &n, &is_err);
  }
  if (rc) {
    lua_createtable(L, 0, 2);
    lua_pushstring(L, rc == TD_ENOTFOUND ? "ObjectLostError" : "ObjectStoreError");
    lua_setfield(L, -2, "kind");
    lua_pushstring(L, rc == TD_ENOTFOUND ? "the object was freed or never existed" : td_strerror(rc));
    lua_setfield(L, -2, "message");
    return 1;
  }
  /* Hold it while decoding: __gc may run and drop the last handle. */
  td_node_incref(td_ctx.node, id);
  td__mkref_owned_flag = 0;
  rc = td__decode(L, p, n, !is_err && td_node_in_store(td_ctx.node, id) ? id : 0);
  td_node_decref(td_ctx.node, id);
  if (rc) return lua_error(L);
  return is_err;
}

/* Pumps until id is done or the deadline passes; returns whether it is done.
 * The deadline (*deadline, 0 until needed) is taken only when id is not done
 * yet: a get of a ready value (tide.get passes the hang warning's timeout on
 * every call) reads no clock. */
static int td__until_done(lua_State *L, uint64_t id, double timeout, double *deadline) {
  while (td_node_state(td_ctx.node, id) == TD_OBJ_PENDING) {
    if (*deadline == 0) *deadline = td__deadline(timeout);
    if (td_now() >= *deadline) return 0;
    td__pump(L, *deadline);
  }
  return 1;
}

static int d_get1(lua_State *L, uint64_t id, double timeout) {
  double deadline = 0;
  if (!td__until_done(L, id, timeout, &deadline)) return td__ret_timeout(L);
  return td__ret_status(L, td__driver_value(L, id));
}

static int td__driver_value_at(lua_State *L, uint32_t i, void *ud) {
  return td__driver_value(L, ((const uint64_t *)ud)[i]);
}

static int d_getn(lua_State *L, const uint64_t *ids, uint32_t n, double timeout) {
  double deadline = 0;
  for (uint32_t i = 0; i < n; i++)
    if (!td__until_done(L, ids[i], timeout, &deadline)) return td__ret_timeout(L);
  return td__ret_values(L, n, td__driver_value_at, (void *)ids);
}

static int d_wait(lua_State *L, const uint64_t *ids, uint32_t n, int num, double timeout) {
  double deadline = td__deadline(timeout);
  for (;;) {
    int ready = 0;
    for (uint32_t i = 0; i < n; i++) ready += td_node_state(td_ctx.node, ids[i]) != TD_OBJ_PENDING;
    if (ready >= num || td_now() >= deadline) break;
    td__pump(L, deadline);
  }
  lua_createtable(L, (int)n, 0);
  for (uint32_t i = 0; i < n; i++) {
    lua_pushboolean(L, td_node_state(td_ctx.node, ids[i]) != TD_OBJ_PENDING);
    lua_rawseti(L, -2, (int)i + 1);
  }
  return 1;
}

static int d_stream_next(lua_State *L, uint64_t id, uint32_t idx, double timeout) {
  double deadline = td__deadline(timeout);
  for (;;) {
    uint64_t item = 0;
    int st = td_node_stream_item(td_ctx.node, id, idx, &item);
    if (st == TD_STREAM_ITEM) return td__ret_item(L, TD_SN_ITEM, item, 0);
    if (st == TD_STREAM_ENDED) return td__ret_item(L, TD_SN_ENDED, 0, 0);
    if (td_now() >= deadline) return td__ret_item(L, TD_SN_TIMEOUT, 0, 0);
    td__pump(L, deadline);
  }
}

static int d_put(lua_State *L, uint64_t *id) {
  (void)L;
  td_core_flush_refs();
  if (!*id) *id = td_node_new_id(td_ctx.node);
  uint8_t *dst;
  int rc =
      td_node_store(td_ctx.node, *id, td_ctx.ser.size, td_ctx.ser.refs, (uint32_t)td_ctx.ser.nrefs, &dst);
  if (rc) return rc;
  td_ser_copy(&td_ctx.ser, dst);
  return 0;
}

static double d_store_capacity(void) {
  td_node_stats_t st;
  td_node_stats(td_ctx.node, &st);
  return (double)st.store_capacity;
}

/* core.state(ref) -> "pending" | "ready" | "failed" | "missing" (REPL display) */
static int d_state(lua_State *L) {
  static const char *names[] = {"pending", "ready", "failed", "missing"};
  int st = td_node_state(td_ctx.node, td__checkref(L, 1));
  lua_pushstring(L, names[st]);
  return 1;
}

static int d_sleep(lua_State *L, double seconds) {
  double deadline = td_now() + seconds;
  while (td_now() < deadline) td__pump(L, deadline);
  return 0;
}

const td_core_be_t td__driver_be = {
    .get1 = d_get1,
    .getn = d_getn,
    .wait = d_wait,
    .stream_next = d_stream_next,
    .put = d_put,
    .store_capacity = d_store_capacity,
    .sleep = d_sleep,
};

static int d_pump(lua_State *L) {
  td__pump(L, td_now() + (lua_isnumber(L, 1) ? lua_tonumber(L, 1) : 0));
  return 0;
}

/* -- Control operations (driver; workers reach them through RPC) ---------------------- */

static int c_cancel(lua_State *L) {
  uint64_t id = td__checkref(L, 1);
  int flags = (lua_toboolean(L, 2) ? TD_CANCEL_FORCE : 0) | (lua_toboolean(L, 3) ? TD_CANCEL_RECURSIVE : 0);
  lua_pushboolean(L, td_node_cancel(td_ctx.node, id, flags) == 0);
  return 1;
}

static int c_kill(lua_State *L) {
  uint64_t id = td_core_checkid(L, 1, "actor");
  lua_pushboolean(L, td_node_kill_actor(td_ctx.node, id, lua_toboolean(L, 2)) == 0);
  return 1;
}

/* core.get_actor(name, ns) -> actor id, class id, the class's definition
 * (encoded, when this node has it: its tide.method declarations). */
static int c_get_actor(lua_State *L) {
  const char *name = luaL_checkstring(L, 1), *ns = luaL_optstring(L, 2, "");
  uint64_t aid, cid;
  if (td_node_get_actor(td_ctx.node, name, ns, &aid, &cid)) return 0;
  td_core_pushid(L, aid);
  td_core_pushid(L, cid);
  size_t len;
  const uint8_t *def = td_node_fn(td_ctx.node, cid, &len);
  if (!def) return 2;
  lua_pushlstring(L, (const char *)def, len);
  return 3;
}

static int c_actor_state(lua_State *L) {
  const char *reason = NULL;
  int st = td_node_actor_state(td_ctx.node, td_core_checkid(L, 1, "actor"), &reason);
  static const char *names[] = {"PENDING", "ALIVE", "RESTARTING", "DEAD"};
  lua_pushstring(L, st < 0 ? "UNKNOWN" : names[st]);
  lua_pushstring(L, reason);
  return 2;
}

/* core.pg_create({{CPU=1}, ...}, strategy, name, detached) -> pg_id, ready_ref */
static int c_pg_create(lua_State *L) {
  luaL_checktype(L, 1, LUA_TTABLE);
  int strategy = (int)luaL_checkinteger(L, 2);
  if (!td_code_name(td_pg_strategy_codes, strategy))
    return luaL_argerror(L, 2, "a core.PG_STRATEGY code expected");
  const char *name = luaL_optstring(L, 3, "");
  int detached = lua_toboolean(L, 4);
  int nb = (int)lua_objlen(L, 1);
  double(*b)[TD_NRES_MAX] = td_xcalloc((size_t)(nb ? nb : 1), sizeof(*b));
  for (int i = 0; i < nb; i++) {
    lua_rawgeti(L, 1, i + 1);
    lua_pushnil(L);
    while (lua_next(L, -2)) {
      int idx = lua_type(L, -2) == LUA_TSTRING ? td_node_res_index(td_ctx.node, lua_tostring(L, -2)) : -1;
      if (idx >= 0) b[i][idx] += lua_tonumber(L, -1);
      lua_pop(L, 1);
    }
    lua_pop(L, 1);
  }
  uint64_t pg, ready;
  td_node_pg_create(td_ctx.node, nb, (const double(*)[TD_NRES_MAX])b, strategy, name, detached, &pg, &ready);
  free(b);
  td_core_pushid(L, pg);
  td_core_pushref(L, ready, 1);
  return 2;
}

static int c_pg_remove(lua_State *L) {
  lua_pushboolean(L, td_node_pg_remove(td_ctx.node, td_core_checkid(L, 1, "placement group")) == 0);
  return 1;
}

/* core.pg_lookup(name) -> pg_id, ready_ref, strategy, bundles | nothing */
static int c_pg_lookup(lua_State *L) {
  uint64_t id, ready;
  int strategy, nb;
  const double(*b)[TD_NRES_MAX];
  if (td_node_pg_find(td_ctx.node, luaL_checkstring(L, 1), &id, &ready, &strategy, &nb, &b)) return 0;
  td_core_pushid(L, id);
  td_core_pushref(L, ready, 1);
  lua_pushinteger(L, strategy);
  lua_createtable(L, nb, 0);
  for (int i = 0; i < nb; i++) {
    lua_newtable(L);
    for (int r = 0; r < td_node_res_count(td_ctx.node); r++) {
      if (b[i][r] <= 0) continue;
      lua_pushnumber(L, b[i][r]);
      lua_setfield(L, -2, td_node_res_name(td_ctx.node, r));
    }
    lua_rawseti(L, -2, i + 1);
  }
  return 4;
}

/* core.resources(avail) -> {CPU = n, ...} */
static int c_resources(lua_State *L) {
  int avail = lua_toboolean(L, 1);
  lua_newtable(L);
  for (int i = 0; i < td_node_res_count(td_ctx.node); i++) {
    double v = avail ? td_node_res_avail(td_ctx.node, i) : td_node_res_total(td_ctx.node, i);
    if (td_node_res_total(td_ctx.node, i) <= 0) continue;
    lua_pushnumber(L, v < 0 ? 0 : v);
    lua_setfield(L, -2, td_node_res_name(td_ctx.node, i));
  }
  return 1;
}

/* core.nodes() -> {{node_id, name, alive, resources, available, tasks, actors,
 *                   last_heartbeat_s, stats}, ...} */
/* Sets the fields of td_node_stats_t st on the table at the top. */
/* clang-format off */
#define TD__F(k) lua_pushnumber(L, (lua_Number)st.k); lua_setfield(L, -2, #k);
#define TD__STATS_FIELDS                                                  \
  TD__F(workers) TD__F(actors) TD__F(tasks_running) TD__F(tasks_queued) \
  TD__F(objects) TD__F(store_used) TD__F(store_capacity) TD__F(spilled_bytes) \
  TD__F(inline_bytes) TD__F(bytes_sent) TD__F(bytes_from_peers)
/* clang-format on */

static int c_nodes(lua_State *L) {
  td_node_info_t info[256];
  int k = td_node_cluster(td_ctx.node, info, 256);
  lua_createtable(L, k, 0);
  for (int i = 0; i < k; i++) {
    lua_createtable(L, 0, 8);
    lua_pushfstring(L, "node-%d", (int)info[i].index);
    lua_setfield(L, -2, "node_id");
    lua_pushstring(L, info[i].name);
    lua_setfield(L, -2, "name");
    lua_pushstring(L, info[i].address);
    lua_setfield(L, -2, "address");
    lua_pushboolean(L, info[i].alive);
    lua_setfield(L, -2, "alive");
    for (int pass = 0; pass < 2; pass++) {
      const double *v = pass ? info[i].avail : info[i].total;
      lua_newtable(L);
      for (int r = 0; r < td_node_res_count(td_ctx.node); r++) {
        if (info[i].total[r] <= 0) continue;
        lua_pushnumber(L, v[r] < 0 ? 0 : v[r]);
        lua_setfield(L, -2, td_node_res_name(td_ctx.node, r));
      }
      lua_setfield(L, -2, pass ? "available" : "resources");
    }
    lua_pushinteger(L, info[i].tasks);
    lua_setfield(L, -2, "tasks");
    lua_pushinteger(L, info[i].actors);
    lua_setfield(L, -2, "actors");
    lua_pushnumber(L, info[i].heard_ago);
    lua_setfield(L, -2, "last_heartbeat_s");
    if (info[i].has_st) { /* the node's own figures */
      lua_createtable(L, 0, 8);
      td_node_stats_t st = info[i].st;
      TD__STATS_FIELDS
      lua_setfield(L, -2, "stats");
    }
    lua_rawseti(L, -2, i + 1);
  }
  return 1;
}

static int c_stats(lua_State *L) {
  td_node_stats_t st;
  td_node_stats(td_ctx.node, &st);
  lua_createtable(L, 0, 8);
  TD__STATS_FIELDS
  lua_pushnumber(L, (lua_Number)td_bridge_refused());
  lua_setfield(L, -2, "refused_connections");
  return 1;
}

/* core.timeline() -> {dropped = n, events = {{name, kind, submit, start, end, ...}, ...}}
 * (raises when TIDE_TIMELINE=0): the node's ring of tasks and calls that ended (timeline.c),
 * times in unix seconds; stdlib/tide/timeline.lua makes Chrome trace events. */
static void td__tl_push(void *ud, const td_tl_event_t *e) {
  static const char *kinds[] = {"task", "actor_new", "actor_call"};
  lua_State *L = ud;
  double w = lua_tonumber(L, -2); /* wall0, below the events table */
  lua_createtable(L, 0, 18);
  lua_pushstring(L, e->name);
  lua_setfield(L, -2, "name");
  lua_pushstring(L, e->kind <= TD_K_ACTOR_CALL ? kinds[e->kind] : "task");
  lua_setfield(L, -2, "kind");
  lua_pushnumber(L, e->submit > 0 ? e->submit + w : e->start + w);
  lua_setfield(L, -2, "submit");
  lua_pushnumber(L, e->start + w);
  lua_setfield(L, -2, "start");
  lua_pushnumber(L, e->end + w);
  lua_setfield(L, -2, "end");
  td_core_pushid(L, e->task);
  lua_setfield(L, -2, "task_id");
  if (e->ref) {
    td_core_pushid(L, e->ref);
    lua_setfield(L, -2, "ref");
  }
  td_core_pushid(L, e->owner);
  lua_setfield(L, -2, "owner");
  int32_t pid, ppid;
  if (e->owner && !td_node_client_pid(td_ctx.node, e->owner, &pid, &ppid)) {
    lua_pushinteger(L, pid);
    lua_setfield(L, -2, "owner_pid");
    lua_pushinteger(L, ppid);
    lua_setfield(L, -2, "owner_ppid");
  }
  if (e->actor) {
    td_core_pushid(L, e->actor);
    lua_setfield(L, -2, "actor_id");
  }
  if (e->wk) {
    td_core_pushid(L, e->wk);
    lua_setfield(L, -2, "worker_id");
  }
  lua_pushinteger(L, e->node);
  lua_setfield(L, -2, "node");
  lua_pushinteger(L, e->pid);
  lua_setfield(L, -2, "pid");
  lua_pushnumber(L, e->args);
  lua_setfield(L, -2, "args_bytes");
  lua_pushboolean(L, e->ok);
  lua_setfield(L, -2, "ok");
  lua_pushboolean(L, e->ran);
  lua_setfield(L, -2, "ran");
  lua_rawseti(L, -2, (int)lua_objlen(L, -2) + 1);
}

static int c_timeline(lua_State *L) {
  uint64_t dropped;
  double wall0;
  lua_settop(L, 0);
  lua_pushnil(L); /* wall0's slot, read by td__tl_push */
  lua_newtable(L);
  if (td_node_timeline(td_ctx.node, NULL, NULL, &dropped, &wall0)) {
    /* Raised, not returned: an RPC from a client carries an error's
     * message, but only a call's first result. */
    return luaL_error(L, "timeline recording is off on this node (TIDE_TIMELINE=0)");
  }
  lua_pushnumber(L, wall0);
  lua_replace(L, 1);
  td_node_timeline(td_ctx.node, td__tl_push, L, &dropped, &wall0);
  lua_createtable(L, 0, 3);
  lua_insert(L, -2);
  lua_setfield(L, -2, "events");
  lua_pushnumber(L, (lua_Number)dropped);
  lua_setfield(L, -2, "dropped");
  lua_pushfstring(L, "node-%d", (int)td_node_index(td_ctx.node));
  lua_setfield(L, -2, "node_id");
  return 1;
}

/* core.why(ref | id, flags) -> text, found: why an object or task is not
 * done (why.c); flags: 1 ask for the running task's Lua stack, 2 a waiter
 * warned (the node does not name that task again). */
static int c_why(lua_State *L) {
  uint64_t id;
  if (luaL_testudata(L, 1, TD_REF_MT)) id = td__checkref(L, 1);
  else if (td_core_toid(L, 1, &id)) return luaL_argerror(L, 1, "expected an ObjectRef or a 16-hex-digit id");
  int flags = (int)luaL_optinteger(L, 2, 0);
  char buf[4096];
  int rc = td_node_why(td_ctx.node, id, flags, buf, sizeof(buf));
  lua_pushstring(L, buf);
  lua_pushboolean(L, rc == 0);
  return 2;
}

/* core.xfer(ref | {ref, ...}) -> total, got | nil: the bytes of these
 * objects that this node is fetching from other nodes, and how many of them
 * have landed (td_node_xfer); nil when none is being fetched. The REPL's
 * tide.get draws its progress bar from it. */
static int c_xfer(lua_State *L) {
  uint64_t total = 0, got = 0, t, g;
  int any = 0;
  if (lua_istable(L, 1)) {
    for (int i = 1, k = (int)lua_objlen(L, 1); i <= k; i++) {
      lua_rawgeti(L, 1, i);
      uint64_t id = td__checkref(L, lua_gettop(L));
      lua_pop(L, 1);
      if (td_node_xfer(td_ctx.node, id, &t, &g)) continue;
      total += t, got += g, any = 1;
    }
  } else if (!td_node_xfer(td_ctx.node, td__checkref(L, 1), &t, &g)) {
    total = t, got = g, any = 1;
  }
  if (!any) return 0;
  lua_pushnumber(L, (lua_Number)total);
  lua_pushnumber(L, (lua_Number)got);
  return 2;
}

/* core.persist(kind, key, bytes|nil): the head's store (persist.h). */
static int c_persist(lua_State *L) {
  size_t n = 0;
  const char *kind = luaL_checkstring(L, 1), *key = luaL_checkstring(L, 2);
  const char *v = lua_isnil(L, 3) ? NULL : luaL_checklstring(L, 3, &n);
  td_persist_put(kind, key, v, n);
  return 0;
}

static void td__persisted_row(void *ud, const char *key, const void *val, size_t len) {
  lua_State *L = ud;
  lua_pushlstring(L, val ? val : "", len);
  lua_setfield(L, -2, key);
}

/* core.persisted(kind) -> {key = bytes}: what a restarted head had. */
static int c_persisted(lua_State *L) {
  const char *kind = luaL_checkstring(L, 1);
  lua_newtable(L);
  td_persist_each(kind, td__persisted_row, L);
  return 1;
}

/* core.pkg_install(hash[, blob]) -> dir: installs a shipped working
 * directory in this machine's cache (or finds it there). */
static int c_pkg_install(lua_State *L) {
  const char *hash = luaL_checkstring(L, 1);
  size_t n = 0;
  const char *blob = luaL_optlstring(L, 2, NULL, &n);
  char err[400] = "", dir[4096];
  if (blob && n > TD_PKG_MAX)
    return luaL_error(L, "package %s is larger than %d MiB", hash, (int)(TD_PKG_MAX >> 20));
  if (blob ? td_pkg_install(hash, blob, n, err, sizeof(err)) != 0 : !td_pkg_have(hash))
    return luaL_error(L, "%s", err[0] ? err : "no such package here");
  td_pkg_dir(hash, dir, sizeof(dir));
  lua_pushstring(L, dir);
  return 1;
}

/* The driver's calls a worker does not have; luaopen_tide_core wraps each
 * (and the shared ones) in td__guard. */
const luaL_Reg td__driver_fns[] = {{"pump", d_pump},
                                   {"state", d_state},
                                   {"persist", c_persist},
                                   {"persisted", c_persisted},
                                   {"pkg_install", c_pkg_install},
                                   {NULL, NULL}};

/* -- The control operations' table (core_int.h) ------------------------------------ */

/* A worker's or client's registration of a function or class: u64 id, then
 * its encoded definition. */
static void td__rpc_register(const uint8_t *args, size_t len) {
  uint64_t id;
  if (len < 8) return;
  memcpy(&id, args, 8);
  td_node_register_fn(td_ctx.node, id, args + 8, len - 8);
}

const td_rpc_op_t td__rpc_table[] = {
    {TD_RPC_REGISTER, NULL, td__rpc_register, TD_RPC_CAST},
    /* C ops, in this file; a worker's core.<name> sends them. */
    {"cancel", c_cancel, NULL, 0},
    {"kill", c_kill, NULL, 0},
    {"get_actor", c_get_actor, NULL, TD_RPC_HEAD_IF_NONE}, /* named actors live on the head */
    {"actor_state", c_actor_state, NULL, 0},
    {"pg_create", c_pg_create, NULL, 0},
    {"pg_remove", c_pg_remove, NULL, TD_RPC_CAST},
    {"pg_lookup", c_pg_lookup, NULL, 0},
    {"resources", c_resources, NULL, TD_RPC_HEAD}, /* the cluster's */
    {"stats", c_stats, NULL, 0},
    {"nodes", c_nodes, NULL, TD_RPC_HEAD},
    {"timeline", c_timeline, NULL, 0},
    {"why", c_why, NULL, 0},
    {"xfer", c_xfer, NULL, 0},
    /* Lua ops: the head's key-value store (stdlib/tide/kv.lua). */
    {"kv_put", NULL, NULL, TD_RPC_HEAD},
    {"kv_get", NULL, NULL, TD_RPC_HEAD},
    {"kv_del", NULL, NULL, TD_RPC_HEAD},
    /* A daemon's jobs (stdlib/tide/jobs.lua, td_core_enable_jobs). */
    {"pkg_put", NULL, NULL, 0},
    {"job_submit", NULL, NULL, 0},
    {"job_log", NULL, NULL, 0},
    {"job_list", NULL, NULL, 0},
    {"job_status", NULL, NULL, 0},
    {"job_stop", NULL, NULL, 0},
    /* A daemon's observability (stdlib/tide/obs.lua, td_obs_enable). */
    {"obs_list", NULL, NULL, 0},
    {"obs_log", NULL, NULL, 0},
    {"obs_metrics", NULL, NULL, 0},
    {"metrics_put", NULL, NULL, 0},
    /* A serve ingress on this node for an attached `tide serve run` (lua/serve.c). */
    {"serve_start", td_serve_start, NULL, 0},
    {"serve_deployment", td_serve_deployment, NULL, 0},
    {"serve_replicas", td_serve_replicas, NULL, 0},
    {"serve_remove", td_serve_remove, NULL, 0},
    {"serve_stats", td_serve_stats, NULL, 0},
    {"serve_stop", td_serve_stop, NULL, 0},
    {NULL, NULL, NULL, 0}};

/* Name -> entry, made once (FNV-1a of the name; td__rpc_find compares the
 * name too). Every process opens tide.core, which indexes the table,
 * before its first RPC. */
static td_map_t td__rpc_index;
static int td__rpc_indexed;

static uint64_t td__rpc_hash(const char *s, size_t n) {
  uint64_t h = 0xcbf29ce484222325ull;
  for (size_t i = 0; i < n; i++) h = (h ^ (uint8_t)s[i]) * 0x100000001b3ull;
  return h;
}

static void td__rpc_make_index(void) {
  td_map_init(&td__rpc_index);
  for (const td_rpc_op_t *op = td__rpc_table; op->name; op++) {
    uint64_t h = td__rpc_hash(op->name, strlen(op->name));
    if (td_map_get(&td__rpc_index, h)) {
      fprintf(stderr, "tide: BUG: two control operations hash alike in td__rpc_table: %s\n", op->name);
      abort();
    }
    td_map_set(&td__rpc_index, h, (void *)op);
  }
  td__rpc_indexed = 1;
}

const td_rpc_op_t *td__rpc_find(const char *name, size_t len) {
  if (!td__rpc_indexed) td__rpc_make_index();
  const td_rpc_op_t *op = td_map_get(&td__rpc_index, td__rpc_hash(name, len));
  return op && !strncmp(op->name, name, len) && !op->name[len] ? op : NULL;
}

/* The private state's ops table ("tide.rpc.ops"): its functions by entry
 * (t[index + 1]), so dispatch is one rawgeti. Lua modules install and read
 * ops by name (ops.kv_put = f): the metamethods map the name to its entry,
 * and refuse a name that is not a Lua op of td__rpc_table. */
static int td__ops_index(lua_State *L) {
  size_t n;
  const char *k = lua_type(L, 2) == LUA_TSTRING ? lua_tolstring(L, 2, &n) : NULL;
  const td_rpc_op_t *op = k ? td__rpc_find(k, n) : NULL;
  if (!op) return 0;
  lua_rawgeti(L, 1, (int)(op - td__rpc_table) + 1);
  return 1;
}

static int td__ops_newindex(lua_State *L) {
  size_t n;
  const char *k = lua_type(L, 2) == LUA_TSTRING ? lua_tolstring(L, 2, &n) : NULL;
  const td_rpc_op_t *op = k ? td__rpc_find(k, n) : NULL;
  if (!op || op->fn || op->raw)
    return luaL_error(
        L, "cannot install control operation %s: not a Lua op of td__rpc_table (lua/core_driver.c)",
        k ? k : luaL_typename(L, 2));
  lua_pushvalue(L, 3);
  lua_rawseti(L, 1, (int)(op - td__rpc_table) + 1);
  return 0;
}

/* Pushes the op's results and returns 1, or pushes an error message and
 * returns 0. `args` is the encoded argument list. */
static int td__rpc_run(lua_State *L, const td_rpc_op_t *op, const uint8_t *args, size_t len) {
  lua_getfield(L, LUA_REGISTRYINDEX, "tide.rpc.ops");
  lua_rawgeti(L, -1, (int)(op - td__rpc_table) + 1);
  lua_remove(L, -2);
  if (!lua_isfunction(L, -1)) {
    lua_pop(L, 1);
    lua_pushfstring(L, "operation %s is not served by this node", op->name);
    return 0;
  }
  td__mkref_owned_flag = 0;
  if (td__decode(L, args, len, 0) != 0) {
    lua_remove(L, -2); /* the decoder's message stays */
    return 0;
  }
  if (!lua_istable(L, -1)) {
    lua_pop(L, 2);
    lua_pushfstring(L, "operation %s: its arguments are not a list", op->name);
    return 0;
  }
  int n = (int)lua_objlen(L, -1), t = lua_gettop(L);
  luaL_checkstack(L, n + 1, "rpc arguments");
  for (int i = 1; i <= n; i++) lua_rawgeti(L, t, i);
  lua_remove(L, t);
  return lua_pcall(L, n, LUA_MULTRET, 0) == 0;
}

/* Answers request req of wk (none when 0) with ok and the nres values
 * from index base: one encoded list. */
static void td__rpc_answer(lua_State *L, td_wk_t *wk, uint32_t req, int ok, int base, int nres) {
  lua_createtable(L, nres, 0);
  for (int i = 0; i < nres; i++) {
    lua_pushvalue(L, base + i);
    lua_rawseti(L, -2, i + 1);
  }
  td_ser_t s;
  td_ser_init(&s);
  if (td_ser_value(&s, L, -1, "result")) {
    ok = 0;
    lua_pushstring(L, s.err);
    td_ser_value(&s, L, -1, "result");
  }
  /* The worker's handles to returned refs are taken here for it (and
   * given back if it dies first). */
  for (int i = 0; i < s.nrefs && req; i++) td_node_incref_for(td_ctx.node, wk, s.refs[i]);
  td_buf_t out;
  td_buf_init(&out);
  td_buf_u8(&out, (uint8_t)ok);
  td_buf_u32(&out, (uint32_t)s.size);
  td_ser_append(&s, &out);
  if (req) td_node_reply(td_ctx.node, wk, req, out.p, out.len);
  int had_refs = s.nrefs > 0;
  td_ser_free(&s);
  td_buf_free(&out);
  /* This state's handles to the refs it handed out go now, not at some
   * later collection: the requester holds what it was given, and a
   * requester that dies gives back exactly that. */
  if (had_refs) {
    lua_settop(L, base - 1);
    lua_gc(L, LUA_GCCOLLECT, 0);
  }
}

/* The driver's side of RPC (td_rpc_cb): a control op from a worker, a
 * client or, on a head, a node that relays it. Its entry says how it runs. */
static void td__rpc_cb(void *ud, td_wk_t *wk, uint32_t req, const char *name, const uint8_t *args,
                       size_t len) {
  lua_State *L = ud;
  const td_rpc_op_t *op = td__rpc_find(name, strlen(name));
  if (op && op->raw) {
    op->raw(args, len);
    return;
  }
  /* The cluster's state is the head's: a node passes the op on. */
  if (op && (op->flags & TD_RPC_HEAD) && req && td_node_relay(td_ctx.node, wk, req, name, args, len) == 0)
    return;
  int top = lua_gettop(L), ok = 0;
  td_ctx.rpc_caller = wk ? td_wk_id(wk) : 0; /* an op that keeps state for its caller (serve_start) */
  if (op) ok = td__rpc_run(L, op, args, len);
  else lua_pushfstring(L, "unknown operation %s", name);
  td_ctx.rpc_caller = 0;
  int nres = lua_gettop(L) - top;
  if (ok && nres == 0 && (op->flags & TD_RPC_HEAD_IF_NONE) && req &&
      td_node_relay(td_ctx.node, wk, req, name, args, len) == 0) {
    lua_settop(L, top); /* not here: maybe elsewhere in the cluster */
    return;
  }
  td__rpc_answer(L, wk, req, ok, top + 1, nres);
  lua_settop(L, top);
}

/* Sets up the driver's private RPC state once the node exists; `from` is
 * the driver's state, whose package.path finds the stdlib. */
void td_core_driver_rpc(lua_State *from) {
  lua_State *L = luaL_newstate();
  luaL_openlibs(L);
  lua_pushboolean(L, 1);
  lua_setfield(L, LUA_REGISTRYINDEX, "tide.is_rpc");
  td__opening_rpc = 1;
  luaopen_tide_core(L);
  td__opening_rpc = 0;
  lua_setfield(L, LUA_REGISTRYINDEX, "tide.rpc.core");
  /* The ops table: the C ops now, the Lua ops as their modules load. */
  lua_newtable(L);
  for (const td_rpc_op_t *op = td__rpc_table; op->name; op++) {
    if (!op->fn) continue;
    lua_pushcfunction(L, op->fn);
    lua_rawseti(L, -2, (int)(op - td__rpc_table) + 1);
  }
  lua_createtable(L, 0, 2);
  lua_pushcfunction(L, td__ops_index);
  lua_setfield(L, -2, "__index");
  lua_pushcfunction(L, td__ops_newindex);
  lua_setfield(L, -2, "__newindex");
  lua_setmetatable(L, -2);
  lua_setfield(L, LUA_REGISTRYINDEX, "tide.rpc.ops");
  /* The head's key-value store (stdlib/tide/kv.lua) adds its ops. */
  lua_getglobal(from, "package");
  lua_getfield(from, -1, "path");
  lua_getglobal(L, "package");
  lua_pushstring(L, lua_tostring(from, -1));
  lua_setfield(L, -2, "path");
  lua_pop(from, 2);
  lua_pop(L, 1);
  lua_getglobal(L, "require");
  lua_pushliteral(L, "tide.kv");
  int bad = lua_pcall(L, 1, 1, 0);
  if (!bad) {
    lua_getfield(L, -1, "install");
    lua_getfield(L, LUA_REGISTRYINDEX, "tide.rpc.ops");
    lua_getfield(L, LUA_REGISTRYINDEX, "tide.rpc.core");
    bad = lua_pcall(L, 2, 0, 0);
  }
  if (bad) fprintf(stderr, "tide: BUG: the node's KV: %s\n", lua_tostring(L, -1));
  lua_settop(L, 0);
  td_ctx.rpcL = L;
  td_node_set_rpc(td_ctx.node, td__rpc_cb, L);
}

/* The node daemon also keeps jobs (tide submit): their ops run in the
 * private state, from stdlib/tide/jobs.lua. */
void td_core_enable_jobs(const char *home) {
  lua_State *L = td_ctx.rpcL;
  if (!L) return;
  td_core_setup_paths(L, home);
  lua_pop(L, 1);
  lua_getglobal(L, "require");
  lua_pushliteral(L, "tide.jobs");
  if (lua_pcall(L, 1, 1, 0) != 0) {
    fprintf(stderr, "tide: cannot load tide.jobs: %s\n", lua_tostring(L, -1));
    lua_pop(L, 1);
    return;
  }
  /* Each of the module's functions is the Lua op of that name. */
  lua_getfield(L, LUA_REGISTRYINDEX, "tide.rpc.ops");
  lua_pushnil(L);
  while (lua_next(L, -3)) {
    size_t n;
    const char *k = lua_type(L, -2) == LUA_TSTRING ? lua_tolstring(L, -2, &n) : NULL;
    const td_rpc_op_t *op = k ? td__rpc_find(k, n) : NULL;
    if (op && !op->fn && !op->raw && lua_isfunction(L, -1)) lua_rawseti(L, -3, (int)(op - td__rpc_table) + 1);
    else {
      fprintf(stderr, "tide: BUG: tide.jobs.%s is not a Lua op of td__rpc_table\n", k ? k : "?");
      lua_pop(L, 1);
    }
  }
  lua_pop(L, 2);
}

/* core.start(opts): creates the embedded node (driver only). */
static int d_start(lua_State *L) {
  if (td_ctx.node) return 0;
  luaL_checktype(L, 1, LUA_TTABLE);
  td_node_opts_t o;
  memset(&o, 0, sizeof(o));
  o.num_cpus = td__optnum(L, 1, "num_cpus", -1);
  o.num_gpus = td__optnum(L, 1, "num_gpus", 0);
  o.memory = td__optnum(L, 1, "memory", -1);
  o.store_capacity = (size_t)td__optnum(L, 1, "object_store_memory", 0);
  o.inline_max = (size_t)td__optnum(L, 1, "inline_max", 64 * 1024);
  o.prestart = (int)td__optnum(L, 1, "prestart", 0);
  o.index = (uint32_t)td__optnum(L, 1, "node_index", 0);
  o.node_timeout = td__optnum(L, 1, "node_timeout", 5);
  lua_getfield(L, 1, "node_name");
  o.name = lua_tostring(L, -1); /* kept alive by the options table */
  lua_pop(L, 1);
  lua_getfield(L, 1, "exe");
  o.exe = lua_tostring(L, -1);
  lua_pop(L, 1);
  lua_getfield(L, 1, "resources");
  if (lua_istable(L, -1)) {
    lua_pushnil(L);
    while (lua_next(L, -2) && o.nres < TD_NRES_MAX - 3) {
      if (lua_type(L, -2) == LUA_TSTRING && lua_isnumber(L, -1)) {
        snprintf(o.res_names[o.nres], 32, "%s", lua_tostring(L, -2));
        o.res_amts[o.nres++] = lua_tonumber(L, -1);
      }
      lua_pop(L, 1);
    }
  }
  lua_pop(L, 1);
  td_ctx.inline_max = o.inline_max;
  char im[32];
  snprintf(im, sizeof(im), "%zu", o.inline_max);
  setenv("TIDE_INLINE_MAX", im, 1);
  td_ctx.node = td_node_new(&o);
  if (!td_ctx.node)
    return luaL_error(L,
                      "cannot start the node: no object store of %f bytes could be made "
                      "(object_store_memory, or --object-store-memory, too large for this machine?)",
                      (double)o.store_capacity);
  td_core_driver_rpc(L);
  td__bg_start();
  return 0;
}

/* core.stop(): tears the embedded node down (before a restart). */
static int d_stop(lua_State *L) {
  (void)L;
  td_core_bg_stop();
  if (td_ctx.rpcL) lua_close(td_ctx.rpcL);
  td_ctx.rpcL = NULL;
  td_node_destroy(&td_ctx.node);
  td_ctx.ndec = 0; /* drops queued by the closing states refer to the old node */
  return 0;
}

int td_core_register_start(lua_State *L) {
  lua_pushcfunction(L, d_start);
  lua_setfield(L, -2, "start");
  lua_pushcfunction(L, d_stop);
  lua_setfield(L, -2, "stop");
  return 0;
}
