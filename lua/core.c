/* Tide Lua bindings (see core.h). */
#include "core.h"
#include "persist.h"
#include "pkg.h"
#include "bridge.h"
#include "term.h"

#include <lauxlib.h>
#include <lualib.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>
#include <dlfcn.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>

td_ctx_t td_ctx;

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
    int n = td_node_fds(td_ctx.node, fds, MAXFD);
    atomic_store(&td__bg_active, 0);
    for (int i = 0; i < n; i++) pfds[i] = (struct pollfd){fds[i], POLLIN, 0};
    poll(pfds, (nfds_t)n, 20);
  }
  return NULL;
}

static void td__bg_start(void) {
  if (td__bg_running) return;
  atomic_store(&td__bg_stop, 0);
  if (pthread_create(&td__bg, NULL, td__bg_main, NULL) == 0) td__bg_running = 1;
}

/* Stops the background pump (before the node goes away, or when a daemon
 * pumps the node itself). */
void td_core_bg_stop(void) {
  if (!td__bg_running) return;
  atomic_store(&td__bg_stop, 1);
  pthread_join(td__bg, NULL);
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

static int td__guard(lua_State *L) {
  lua_CFunction f = lua_tocfunction(L, lua_upvalueindex(1));
  char here;
  if (td__depth && &here > td__outer_sp) td__depth = 0;
  if (td__depth++ == 0) {
    td__outer_sp = &here;
    td__enter();
  }
  int n = f(L);
  if (--td__depth == 0) td__leave();
  return n;
}
static int td__opening_rpc; /* the node's private state takes no guards */

/* -- References ------------------------------------------------------------------ */

uint64_t td_core_new_id(void) {
  if (td_ctx.is_driver) return td_node_new_id(td_ctx.node);
  return (td_ctx.wk_id << 32) | ++td_ctx.seq;
}

void td_core_pushid(lua_State *L, uint64_t id) {
  static const char hex[] = "0123456789abcdef";
  char b[16];
  for (int i = 15; i >= 0; i--, id >>= 4) b[i] = hex[id & 15];
  lua_pushlstring(L, b, 16);
}

int td_core_toid(lua_State *L, int idx, uint64_t *id) {
  size_t n;
  if (lua_type(L, idx) != LUA_TSTRING) return -1;
  const char *p = lua_tolstring(L, idx, &n);
  if (n != 16) return -1;
  uint64_t v = 0;
  for (size_t i = 0; i < 16; i++) {
    char c = p[i];
    int d = c >= '0' && c <= '9' ? c - '0' : c >= 'a' && c <= 'f' ? c - 'a' + 10 : -1;
    if (d < 0) return -1;
    v = v << 4 | (uint64_t)d;
  }
  *id = v;
  return 0;
}

uint64_t td_core_checkid(lua_State *L, int idx, const char *what) {
  uint64_t id;
  if (td_core_toid(L, idx, &id))
    luaL_argerror(L, idx, lua_pushfstring(L, "%s id (16 hex digits) expected, got %s", what,
                                          lua_type(L, idx) == LUA_TSTRING ? lua_tostring(L, idx)
                                                                          : luaL_typename(L, idx)));
  return id;
}

static void td__send_ref(uint64_t id, int delta) {
  td_chan_begin(&td_ctx.ch, TD_M_REFS);
  td_buf_u32(&td_ctx.ch.out, 1);
  td_buf_u64(&td_ctx.ch.out, id);
  td_buf_u32(&td_ctx.ch.out, (uint32_t)delta);
  td_chan_end(&td_ctx.ch);
}

/* The process's count of its own handles to id. */
static void td__local_ref(uint64_t id, int delta) {
  intptr_t c = (intptr_t)td_map_get(&td_ctx.lrefs, id) + delta;
  if (c > 0) td_map_set(&td_ctx.lrefs, id, (void *)c);
  else td_map_del(&td_ctx.lrefs, id);
}

/* Ids for the next safe point (td_core_flush_refs). */
static void td__queue(uint64_t **v, size_t *n, size_t *cap, uint64_t id) {
  if (*n == *cap) {
    *cap = *cap ? *cap * 2 : 64;
    *v = td_xrealloc(*v, *cap * 8);
  }
  (*v)[(*n)++] = id;
}

/* True in the node's private RPC state. */
static int G_is_rpc(lua_State *L) {
  lua_getfield(L, LUA_REGISTRYINDEX, "tide.is_rpc");
  int r = lua_toboolean(L, -1);
  lua_pop(L, 1);
  return r;
}

void td_core_pushref(lua_State *L, uint64_t id, int owned) {
  td_ref_ud_t *r = lua_newuserdata(L, sizeof(*r));
  r->id = id;
  luaL_getmetatable(L, TD_REF_MT);
  lua_setmetatable(L, -2);
  if (td_ctx.is_driver) {
    if (!owned) td_node_incref(td_ctx.node, id);
  } else {
    intptr_t c = (intptr_t)td_map_get(&td_ctx.lrefs, id);
    /* The process holds one node-side reference for all its handles. */
    if (c == 0 && !owned) td__send_ref(id, 1);
    if (c > 0 && owned) td__send_ref(id, -1);
    td__local_ref(id, 1);
    td_ctx.mapped = 1;  /* a handle its work may drop: collected when it goes idle */
  }
}

static int ref_gc(lua_State *L) {
  td_ref_ud_t *r = lua_touserdata(L, 1);
  if (!r->id) return 0;
  if (td_ctx.rpcL && G_is_rpc(L)) {
    /* The node's own state runs inside a pump: drop the reference now. */
    td_node_decref(td_ctx.node, r->id);
    r->id = 0;
    return 0;
  }
  td__queue(&td_ctx.dec, &td_ctx.ndec, &td_ctx.capdec, r->id);
  r->id = 0;
  return 0;
}

void td_core_flush_refs(void) {
  if (!td_ctx.ndec) return;
  if (td_ctx.is_driver) {
    for (size_t i = 0; i < td_ctx.nunpin; i++) td_node_pin(td_ctx.node, td_ctx.unpin[i], -1);
    for (size_t i = 0; i < td_ctx.ndec; i++) td_node_decref(td_ctx.node, td_ctx.dec[i]);
    td_ctx.ndec = td_ctx.nunpin = 0;
    return;
  }
  if (td_ctx.nunpin) {
    td_chan_begin(&td_ctx.ch, TD_M_UNPIN);
    td_buf_u32(&td_ctx.ch.out, (uint32_t)td_ctx.nunpin);
    td_buf_put(&td_ctx.ch.out, td_ctx.unpin, td_ctx.nunpin * 8);
    td_chan_end(&td_ctx.ch);
    td_ctx.nunpin = 0;
  }
  /* Only the last local handle gives the node-side reference back. */
  uint32_t cnt = 0;
  td_chan_begin(&td_ctx.ch, TD_M_REFS);
  size_t at = td_ctx.ch.out.len;
  td_buf_u32(&td_ctx.ch.out, 0);
  for (size_t i = 0; i < td_ctx.ndec; i++) {
    uint64_t id = td_ctx.dec[i];
    intptr_t c = (intptr_t)td_map_get(&td_ctx.lrefs, id);
    td__local_ref(id, -1);
    if (c <= 1) {
      td_buf_u64(&td_ctx.ch.out, id);
      td_buf_u32(&td_ctx.ch.out, (uint32_t)-1);
      cnt++;
    }
  }
  memcpy(td_ctx.ch.out.p + at, &cnt, 4);
  td_chan_end(&td_ctx.ch);
  td_ctx.ndec = 0;
}

static uint64_t td__checkref(lua_State *L, int idx) {
  td_ref_ud_t *r = luaL_testudata(L, idx, TD_REF_MT);
  if (!r) return (uint64_t)luaL_argerror(L, idx, lua_pushfstring(L, "ObjectRef expected, got %s", luaL_typename(L, idx)));
  return r->id;
}

static int ref_tostring(lua_State *L) {
  td_ref_ud_t *r = lua_touserdata(L, 1);
  td_core_pushid(L, r->id);
  lua_pushfstring(L, "ObjectRef(%s)", lua_tostring(L, -1));
  return 1;
}

static int ref_eq(lua_State *L) {
  td_ref_ud_t *a = luaL_testudata(L, 1, TD_REF_MT), *b = luaL_testudata(L, 2, TD_REF_MT);
  lua_pushboolean(L, a && b && a->id == b->id);
  return 1;
}

static int ref_id(lua_State *L) {
  td_core_pushid(L, td__checkref(L, 1));
  return 1;
}

/* -- Decoding -------------------------------------------------------------------- */

static int td__mkref_owned_flag;
static void td__mkref(void *ud, lua_State *L, uint64_t id) {
  (void)ud;
  td_core_pushref(L, id, td__mkref_owned_flag);
}

/* -- Zero-copy reads ----------------------------------------------------------------
 * A tensor that maps an object's bytes in the store holds a reference and a
 * pin (no spilling) on the object until its last view goes. Released holds
 * are queued like dropped handles: a __gc cannot talk to the node. */

static void td__shm_hold(void *ctx) {
  uint64_t id = (uint64_t)(uintptr_t)ctx;
  if (td_ctx.is_driver) {
    td_node_incref(td_ctx.node, id);
    td_node_pin(td_ctx.node, id, 1);
    return;
  }
  if (!td_map_get(&td_ctx.lrefs, id)) td__send_ref(id, 1);
  td__local_ref(id, 1);
  td_ctx.mapped = 1;
  td_chan_begin(&td_ctx.ch, TD_M_PIN);
  td_buf_u32(&td_ctx.ch.out, 1);
  td_buf_u64(&td_ctx.ch.out, id);
  td_chan_end(&td_ctx.ch);
}

static void td__shm_release(void *ctx, void *data) {
  (void)data;
  uint64_t id = (uint64_t)(uintptr_t)ctx;
  td__queue(&td_ctx.unpin, &td_ctx.nunpin, &td_ctx.capunpin, id);
  td__queue(&td_ctx.dec, &td_ctx.ndec, &td_ctx.capdec, id);
}

static const td_holder_t td__shm_holder = {td__shm_hold, td__shm_release};

/* Decodes a value; `shm_id` names the object whose bytes lie in the store
 * (0: they do not), so that tensors in it can map them. */
static int td__decode(lua_State *L, const uint8_t *p, size_t n, uint64_t shm_id) {
  td_deser_t d = {0};
  d.mkref = td__mkref;
  if (shm_id) {
    d.holder = &td__shm_holder;
    d.holder_ctx = (void *)(uintptr_t)shm_id;
  }
  int rc = td_deser_value(&d, L, p, n);
  if (rc) lua_pushfstring(L, "cannot decode a value: %s", d.err);
  return rc;
}

int td_core_push_wire(lua_State *L, td_rd_t *rd, uint64_t id) {
  uint8_t kind = td_rd_u8(rd);
  const uint8_t *p;
  size_t n;
  if (kind == TD_V_INLINE || kind == TD_V_ERROR) {
    uint32_t l;
    p = td_rd_str(rd, &l);
    n = l;
  } else if (kind == TD_V_SHM) {
    uint64_t off = td_rd_u64(rd), len = td_rd_u64(rd);
    if (rd->bad || off > td_ctx.cap || len > td_ctx.cap - off) return TD_EPROTO;
    p = td_ctx.base + off;
    n = len;
  } else if (kind == TD_V_LOST) {
    lua_createtable(L, 0, 3);
    lua_pushliteral(L, "ObjectLostError");
    lua_setfield(L, -2, "kind");
    lua_pushliteral(L, "the object was lost or freed");
    lua_setfield(L, -2, "message");
    return 1;
  } else {
    return TD_EPROTO;
  }
  if (rd->bad) return TD_EPROTO;
  if (td__decode(L, p, n, kind == TD_V_SHM ? id : 0)) return TD_EPROTO;
  return kind == TD_V_ERROR ? 1 : 0;
}

/* Errors point at the user's line: the first Lua frame outside the tide
 * stdlib (API wrappers may or may not have tail-called us). */
int td_core_ser_error(lua_State *L, td_ser_t *s) {
  lua_Debug ar;
  for (int level = 1; lua_getstack(L, level, &ar); level++) {
    if (!lua_getinfo(L, "Sl", &ar) || ar.currentline <= 0) continue;
    size_t n = strlen(ar.short_src);
    if (n >= 9 && !strcmp(ar.short_src + n - 9, "/tide.lua")) continue;
    if (strstr(ar.short_src, "/stdlib/tide/")) continue;
    lua_pushfstring(L, "%s:%d: %s", ar.short_src, ar.currentline, s->err);
    return lua_error(L);
  }
  lua_pushstring(L, s->err);
  return lua_error(L);
}

/* -- Values out ---------------------------------------------------------------- */

int td_core_put_value(const td_ser_t *s, td_buf_t *b) {
  if (s->size <= td_ctx.inline_max) {
    td_buf_u8(b, TD_V_INLINE);
    td_buf_u32(b, (uint32_t)s->size);
    td_ser_append(s, b);
    return 0;
  }
  size_t off;
  int rc = td_w_alloc(s->size, &off);
  if (rc) return rc;
  td_ser_copy(s, td_ctx.base + off);
  td_buf_u8(b, TD_V_SHM);
  td_buf_u64(b, off);
  td_buf_u64(b, s->size);
  return 0;
}

/* -- Specs from normalized options ------------------------------------------------- */

static double td__optnum(lua_State *L, int t, const char *k, double def) {
  lua_getfield(L, t, k);
  double v = lua_isnumber(L, -1) ? lua_tonumber(L, -1) : def;
  lua_pop(L, 1);
  return v;
}
static void td__optstr(lua_State *L, int t, const char *k, char *dst, size_t cap) {
  lua_getfield(L, t, k);
  size_t n = 0;
  const char *s = lua_tolstring(L, -1, &n);
  if (!s) n = 0;
  if (n >= cap) n = cap - 1;
  if (n) memcpy(dst, s, n);
  dst[n] = 0;
  lua_pop(L, 1);
}

/* Clears a spec up to its env; env and demands are read only up to their
 * lengths, so a submit does not zero 3 KB. */
static void td__spec_zero(td_spec_t *s) {
  memset(s, 0, offsetof(td_spec_t, env));
  s->nres = 0;
}

/* Fills a spec from the options table that stdlib/tide.lua normalized. */
static void td__spec_opts(lua_State *L, int t, td_spec_t *s) {
  s->max_retries = (int32_t)td__optnum(L, t, "max_retries", 3);
  s->max_restarts = (int32_t)td__optnum(L, t, "max_restarts", 0);
  s->max_concurrency = (int32_t)td__optnum(L, t, "max_concurrency", 1);
  s->bundle = (int32_t)td__optnum(L, t, "bundle", -1);
  lua_getfield(L, t, "pg");
  if (!lua_isnil(L, -1) && td_core_toid(L, -1, &s->pg_id)) luaL_error(L, "option pg: a placement group id expected");
  lua_pop(L, 1);
  s->strategy = (uint8_t)td__optnum(L, t, "strategy", 0);
  s->node = (uint32_t)td__optnum(L, t, "node", 0);
  lua_getfield(L, t, "detached");
  s->detached = (uint8_t)lua_toboolean(L, -1);
  lua_pop(L, 1);
  lua_getfield(L, t, "own_process");
  s->own_process = (uint8_t)lua_toboolean(L, -1);
  lua_pop(L, 1);
  lua_getfield(L, t, "retry_exceptions");
  s->retry_exceptions = (uint8_t)lua_toboolean(L, -1);
  lua_pop(L, 1);
  td__optstr(L, t, "name", s->name, sizeof(s->name));
  td__optstr(L, t, "namespace", s->ns, sizeof(s->ns));
  lua_getfield(L, t, "resources");
  if (lua_istable(L, -1)) {
    lua_pushnil(L);
    while (lua_next(L, -2) && s->nres < TD_NRES_MAX) {
      if (lua_type(L, -2) == LUA_TSTRING && lua_isnumber(L, -1)) {
        size_t kl;
        const char *k = lua_tolstring(L, -2, &kl);
        if (kl > 31) kl = 31;
        memcpy(s->res_name[s->nres], k, kl);
        s->res_name[s->nres][kl] = 0;
        s->res_amt[s->nres++] = lua_tonumber(L, -1);
      }
      lua_pop(L, 1);
    }
  }
  lua_pop(L, 1);
  lua_getfield(L, t, "env");
  if (lua_istable(L, -1)) {
    lua_pushnil(L);
    while (lua_next(L, -2)) {
      size_t kl, vl;
      const char *k = lua_tolstring(L, -2, &kl), *v = lua_tolstring(L, -1, &vl);
      if (k && v && s->env_len + kl + vl + 2 <= sizeof(s->env)) {
        memcpy(s->env + s->env_len, k, kl);
        s->env[s->env_len + kl] = '=';
        memcpy(s->env + s->env_len + kl + 1, v, vl);
        s->env[s->env_len + kl + 1 + vl] = 0;
        s->env_len += (uint32_t)(kl + vl + 2);
      }
      lua_pop(L, 1);
    }
  }
  lua_pop(L, 1);
}

static td_buf_t td__argbuf;
static int d_put(lua_State *L);
static int w_put(lua_State *L);

#define TD__ARG_PUT_MIN (100 * 1024)

/* Large arguments become objects of their own, as Ray does: the spec stays
 * small, a node that runs the task fetches each once, and tensors in them
 * are mapped where it runs. Returns whether any was. */
static int td__promote_args(lua_State *L, int first, int n) {
  int any = 0;
  for (int idx = first; idx < first + n; idx++) {
    int ty = lua_type(L, idx);
    if (ty == LUA_TSTRING ? lua_objlen(L, idx) < TD__ARG_PUT_MIN : ty != LUA_TTABLE && ty != LUA_TUSERDATA)
      continue;
    if (ty == LUA_TUSERDATA && luaL_testudata(L, idx, TD_REF_MT)) continue;
    if (td_ser_value(&td_ctx.ser, L, idx, NULL) || td_ctx.ser.size < TD__ARG_PUT_MIN) continue;
    lua_pushcfunction(L, td_ctx.is_driver ? d_put : w_put);
    lua_pushvalue(L, idx);
    lua_call(L, 1, 1);
    lua_replace(L, idx);
    any = 1;
  }
  return any;
}

/* Sends or submits a spec and pushes the return refs. */
static int td__submit(lua_State *L, td_spec_t *s, int first_arg) {
  int nargs = lua_gettop(L) - first_arg + 1;
  if (td_ser_args(&td_ctx.ser, L, first_arg, nargs < 0 ? 0 : nargs)) return td_core_ser_error(L, &td_ctx.ser);
  if (td_ctx.ser.size >= TD__ARG_PUT_MIN && td__promote_args(L, first_arg, nargs) &&
      td_ser_args(&td_ctx.ser, L, first_arg, nargs))
    return td_core_ser_error(L, &td_ctx.ser);
  td_buf_reset(&td__argbuf);
  td_ser_append(&td_ctx.ser, &td__argbuf);
  s->args = td__argbuf.p;
  s->args_len = (uint32_t)td__argbuf.len;
  s->deps = td_ctx.ser.deps;
  s->ndeps = (uint32_t)td_ctx.ser.ndeps;
  s->refs = td_ctx.ser.refs;
  s->nrefs = (uint32_t)td_ctx.ser.nrefs;
  uint32_t nr = s->nret < 0 ? 1 : (uint32_t)s->nret;
  uint64_t rets[nr ? nr : 1];
  for (uint32_t i = 0; i < nr; i++) rets[i] = td_core_new_id();
  s->rets = rets;
  td_core_flush_refs();
  if (td_ctx.is_driver) {
    const char *msg;
    if (td_node_submit(td_ctx.node, s, &msg)) return luaL_error(L, "%s", msg);
    if (td_ctx.node && td_chan_pending(&td_ctx.ch)) td_node_flush(td_ctx.node);
  } else {
    td_chan_begin(&td_ctx.ch, TD_M_SUBMIT);
    td_spec_encode(s, &td_ctx.ch.out);
    td_chan_end(&td_ctx.ch);
  }
  luaL_checkstack(L, (int)nr + 2, "too many returns");
  for (uint32_t i = 0; i < nr; i++) td_core_pushref(L, rets[i], 1);
  return (int)nr;
}

/* core.submit(fn_id, opts, nret, ...) -> refs */
static int c_submit(lua_State *L) {
  td_spec_t s;
  td__spec_zero(&s);
  s.kind = TD_K_TASK;
  s.fn_id = td_core_checkid(L, 1, "function");
  luaL_checktype(L, 2, LUA_TTABLE);
  s.nret = (int32_t)luaL_checkinteger(L, 3);
  td__spec_opts(L, 2, &s);
  return td__submit(L, &s, 4);
}

/* core.actor_new(class_id, opts, ...) -> actor_id, ready_ref */
static int c_actor_new(lua_State *L) {
  td_spec_t s;
  td__spec_zero(&s);
  s.kind = TD_K_ACTOR_NEW;
  s.fn_id = td_core_checkid(L, 1, "actor class");
  luaL_checktype(L, 2, LUA_TTABLE);
  td__spec_opts(L, 2, &s);
  s.max_retries = (int32_t)td__optnum(L, 2, "max_task_retries", 0);
  s.actor_id = td_core_new_id();
  s.nret = 1;
  td_core_pushid(L, s.actor_id);
  lua_insert(L, 3);
  int n = td__submit(L, &s, 4);
  (void)n;
  lua_pushvalue(L, 3);
  lua_insert(L, -2);
  return 2;
}

/* core.actor_call(actor_id, method, nret, ...) -> refs */
static int c_actor_call(lua_State *L) {
  td_spec_t s;
  td__spec_zero(&s);
  s.kind = TD_K_ACTOR_CALL;
  s.actor_id = td_core_checkid(L, 1, "actor");
  size_t ml;
  const char *m = luaL_checklstring(L, 2, &ml);
  if (ml >= sizeof(s.method)) return luaL_error(L, "method name too long: %s", m);
  memcpy(s.method, m, ml + 1);
  s.nret = (int32_t)luaL_checkinteger(L, 3);
  s.max_retries = 0;
  return td__submit(L, &s, 4);
}

/* core.register(value) -> id: functions and actor classes are sent once. */
static int c_register(lua_State *L) {
  luaL_checkany(L, 1);
  if (td_ser_value(&td_ctx.ser, L, 1, "remote function")) return td_core_ser_error(L, &td_ctx.ser);
  uint64_t id = td_core_new_id();
  td_buf_reset(&td__argbuf);
  td_ser_append(&td_ctx.ser, &td__argbuf);
  if (td_ctx.is_driver) {
    td_node_register_fn(td_ctx.node, id, td__argbuf.p, td__argbuf.len);
  } else {
    td_chan_begin(&td_ctx.ch, TD_M_RPC);
    td_buf_u32(&td_ctx.ch.out, 0);
    td_buf_str(&td_ctx.ch.out, "register", 8);
    td_buf_u32(&td_ctx.ch.out, (uint32_t)(td__argbuf.len + 8));
    td_buf_u64(&td_ctx.ch.out, id);
    td_buf_put(&td_ctx.ch.out, td__argbuf.p, td__argbuf.len);
    td_chan_end(&td_ctx.ch);
  }
  td_core_pushid(L, id);
  return 1;
}

/* -- Driver: waiting on the node ---------------------------------------------------- */

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

static double td__deadline(lua_State *L, int idx) {
  if (lua_isnoneornil(L, idx)) return 1e300;
  double t = luaL_checknumber(L, idx);
  return t < 0 ? 1e300 : td_now() + t;
}

/* Mapped tensors that are garbage still hold store bytes: before a full
 * store is reported, they are collected and their holds given back. */
static void td__collect(lua_State *L) {
  lua_gc(L, LUA_GCCOLLECT, 0);
  td_core_flush_refs();
}

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

/* core.get1(ref, timeout) -> status (0 ok, 1 error, 2 timeout), value */
static int d_get1(lua_State *L) {
  uint64_t id = td__checkref(L, 1);
  double deadline = td__deadline(L, 2);
  for (;;) {
    int st = td_node_state(td_ctx.node, id);
    if (st != TD_OBJ_PENDING) break;
    if (td_now() >= deadline) { lua_pushinteger(L, 2); return 1; }
    td__pump(L, deadline);
  }
  int err = td__driver_value(L, id);
  lua_pushinteger(L, err);
  lua_insert(L, -2);
  return 2;
}

/* core.getn(refs, timeout) -> status, values|error (array in order) */
static int d_getn(lua_State *L) {
  luaL_checktype(L, 1, LUA_TTABLE);
  double deadline = td__deadline(L, 2);
  int n = (int)lua_objlen(L, 1);
  for (int i = 1; i <= n; i++) {
    lua_rawgeti(L, 1, i);
    uint64_t id = td__checkref(L, -1);
    lua_pop(L, 1);
    while (td_node_state(td_ctx.node, id) == TD_OBJ_PENDING) {
      if (td_now() >= deadline) { lua_pushinteger(L, 2); return 1; }
      td__pump(L, deadline);
    }
  }
  lua_createtable(L, n, 1);
  for (int i = 1; i <= n; i++) {
    lua_rawgeti(L, 1, i);
    uint64_t id = ((td_ref_ud_t *)lua_touserdata(L, -1))->id;
    lua_pop(L, 1);
    if (td__driver_value(L, id)) {
      lua_pushinteger(L, 1);
      lua_insert(L, -2);
      return 2;
    }
    lua_rawseti(L, -2, i);
  }
  lua_pushinteger(L, n);
  lua_setfield(L, -2, "n");
  lua_pushinteger(L, 0);
  lua_insert(L, -2);
  return 2;
}

/* core.wait(refs, num, timeout) -> array of booleans */
static int d_wait(lua_State *L) {
  luaL_checktype(L, 1, LUA_TTABLE);
  int num = (int)luaL_checkinteger(L, 2);
  double deadline = td__deadline(L, 3);
  int n = (int)lua_objlen(L, 1);
  uint64_t *ids = td_xmalloc((size_t)n * 8 + 8);
  for (int i = 1; i <= n; i++) {
    lua_rawgeti(L, 1, i);
    ids[i - 1] = td__checkref(L, -1);
    lua_pop(L, 1);
  }
  for (;;) {
    int ready = 0;
    for (int i = 0; i < n; i++) ready += td_node_state(td_ctx.node, ids[i]) != TD_OBJ_PENDING;
    if (ready >= num || td_now() >= deadline) break;
    td__pump(L, deadline);
  }
  lua_createtable(L, n, 0);
  for (int i = 0; i < n; i++) {
    lua_pushboolean(L, td_node_state(td_ctx.node, ids[i]) != TD_OBJ_PENDING);
    lua_rawseti(L, -2, i + 1);
  }
  free(ids);
  return 1;
}

/* core.stream_next(stream_ref, idx0, timeout) -> ref | nil (end) | false (timeout) */
static int d_stream_next(lua_State *L) {
  uint64_t id = td__checkref(L, 1);
  uint32_t idx = (uint32_t)luaL_checkinteger(L, 2);
  double deadline = td__deadline(L, 3);
  for (;;) {
    uint64_t item;
    int st = td_node_stream_item(td_ctx.node, id, idx, &item);
    if (st == 1) { td_core_pushref(L, item, 0); return 1; }
    if (st < 0) { lua_pushnil(L); return 1; }
    if (td_now() >= deadline) { lua_pushboolean(L, 0); return 1; }
    td__pump(L, deadline);
  }
}

/* core.put(value) -> ref */
static int d_put(lua_State *L) {
  luaL_checkany(L, 1);
  td_core_flush_refs();
  if (td_ser_value(&td_ctx.ser, L, 1, "tide.put value")) return td_core_ser_error(L, &td_ctx.ser);
  uint64_t id = td_node_new_id(td_ctx.node);
  uint8_t *dst;
  int rc = td_node_store(td_ctx.node, id, td_ctx.ser.size, td_ctx.ser.refs, (uint32_t)td_ctx.ser.nrefs, &dst);
  if (rc == TD_ESTOREFULL) {
    td__collect(L);
    rc = td_node_store(td_ctx.node, id, td_ctx.ser.size, td_ctx.ser.refs, (uint32_t)td_ctx.ser.nrefs, &dst);
  }
  if (rc) {
    td_node_stats_t st;
    td_node_stats(td_ctx.node, &st);
    return luaL_error(L, "tide.put: %s (value of %f bytes, store capacity %f bytes)", td_strerror(rc),
                      (double)td_ctx.ser.size, (double)st.store_capacity);
  }
  td_ser_copy(&td_ctx.ser, dst);
  td_core_pushref(L, id, 1);
  return 1;
}

/* core.state(ref) -> "pending" | "ready" | "failed" | "missing" (REPL display) */
static int d_state(lua_State *L) {
  static const char *names[] = {"pending", "ready", "failed", "missing"};
  int st = td_node_state(td_ctx.node, td__checkref(L, 1));
  lua_pushstring(L, names[st]);
  return 1;
}

static int d_sleep(lua_State *L) {
  double deadline = td_now() + luaL_checknumber(L, 1);
  while (td_now() < deadline) td__pump(L, deadline);
  return 0;
}

static int d_pump(lua_State *L) {
  td__pump(L, td_now() + (lua_isnumber(L, 1) ? lua_tonumber(L, 1) : 0));
  return 0;
}

/* -- Control operations (driver; workers reach them through RPC) ---------------------- */

static int c_cancel(lua_State *L) {
  uint64_t id = td__checkref(L, 1);
  int force = lua_toboolean(L, 2);
  lua_pushboolean(L, td_node_cancel(td_ctx.node, id, force) == 0);
  return 1;
}

static int c_kill(lua_State *L) {
  uint64_t id = td_core_checkid(L, 1, "actor");
  lua_pushboolean(L, td_node_kill_actor(td_ctx.node, id, lua_toboolean(L, 2)) == 0);
  return 1;
}

static int c_get_actor(lua_State *L) {
  const char *name = luaL_checkstring(L, 1), *ns = luaL_optstring(L, 2, "");
  uint64_t aid, cid;
  if (td_node_get_actor(td_ctx.node, name, ns, &aid, &cid)) return 0;
  td_core_pushid(L, aid);
  td_core_pushid(L, cid);
  return 2;
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
  const char *name = luaL_optstring(L, 3, "");
  int detached = lua_toboolean(L, 4);
  int nb = (int)lua_objlen(L, 1);
  double (*b)[TD_NRES_MAX] = td_xcalloc((size_t)(nb ? nb : 1), sizeof(*b));
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
  td_node_pg_create(td_ctx.node, nb, (const double (*)[TD_NRES_MAX])b, strategy, name, detached, &pg, &ready);
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
  const double (*b)[TD_NRES_MAX];
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
#define TD__F(k) lua_pushnumber(L, (lua_Number)st.k); lua_setfield(L, -2, #k);
#define TD__STATS_FIELDS                                                  \
  TD__F(workers) TD__F(actors) TD__F(tasks_running) TD__F(tasks_queued) \
  TD__F(objects) TD__F(store_used) TD__F(store_capacity) TD__F(spilled_bytes) \
  TD__F(bytes_sent) TD__F(bytes_from_peers)

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
    if (info[i].has_st) {  /* the node's own figures */
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
 * | nil, why: the node's ring of tasks and calls that ended (timeline.c),
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
    lua_pushnil(L);
    lua_pushliteral(L, "timeline recording is off on this node (TIDE_TIMELINE=0)");
    return 2;
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

/* core.pkg_hash(blob) -> the name of a package: its hash in hex (pkg.h). */
static int c_pkg_hash(lua_State *L) {
  size_t n;
  const char *b = luaL_checklstring(L, 1, &n);
  char h[TD_PKG_HASH_LEN + 1];
  td_pkg_hash(b, n, h);
  lua_pushstring(L, h);
  return 1;
}

/* core.pkg_install(hash[, blob]) -> dir: installs a shipped working
 * directory in this machine's cache (or finds it there). */
static int c_pkg_install(lua_State *L) {
  const char *hash = luaL_checkstring(L, 1);
  size_t n = 0;
  const char *blob = luaL_optlstring(L, 2, NULL, &n);
  char err[400] = "", dir[4096];
  if (blob && n > TD_PKG_MAX) return luaL_error(L, "package %s is larger than %d MiB", hash, (int)(TD_PKG_MAX >> 20));
  if (blob ? td_pkg_install(hash, blob, n, err, sizeof(err)) != 0 : !td_pkg_have(hash))
    return luaL_error(L, "%s", err[0] ? err : "no such package here");
  td_pkg_dir(hash, dir, sizeof(dir));
  lua_pushstring(L, dir);
  return 1;
}

/* core.register_blob(id, blob): a worker's registration, through RPC. */
static int c_register_blob(lua_State *L) {
  size_t n;
  uint64_t id = td_core_checkid(L, 1, "function");
  const char *b = luaL_checklstring(L, 2, &n);
  td_node_register_fn(td_ctx.node, id, (const uint8_t *)b, n);
  return 0;
}

/* -- Worker: requests ---------------------------------------------------------------- */

static int td__push_get1(lua_State *L, const uint8_t *p, size_t n, void *ud) {
  (void)ud;
  td_rd_t rd;
  td_rd_init(&rd, p, n);
  if (td_rd_u8(&rd)) { lua_pushinteger(L, 2); return 1; }
  td__mkref_owned_flag = 0;
  uint8_t kind = rd.p < rd.end ? *rd.p : 0;
  int rc = td_core_push_wire(L, &rd, (uint64_t)(uintptr_t)ud);
  if (rc < 0) return luaL_error(L, "malformed reply from the node");
  if (kind == TD_V_SHM) {
    uint64_t id = (uint64_t)(uintptr_t)ud;
    td_chan_begin(&td_ctx.ch, TD_M_UNPIN);
    td_buf_u32(&td_ctx.ch.out, 1);
    td_buf_u64(&td_ctx.ch.out, id);
    td_chan_end(&td_ctx.ch);
  }
  lua_pushinteger(L, rc);
  lua_insert(L, -2);
  return 2;
}

/* What the node answers when a wait times out, for td_w_timeout. */
static const uint8_t td__tmo_get[1] = {1}, td__tmo_wait[4] = {0}, td__tmo_stream[9] = {2};

static double td__timeout_arg(lua_State *L, int idx) {
  if (lua_isnoneornil(L, idx)) return -1;
  return luaL_checknumber(L, idx);
}

static int w_get1(lua_State *L) {
  uint64_t id = td__checkref(L, 1);
  double timeout = td__timeout_arg(L, 2);
  td_core_flush_refs();
  uint32_t req = td_w_begin_req(TD_M_GET);
  td_buf_f64(&td_ctx.ch.out, timeout);
  td_buf_u32(&td_ctx.ch.out, 1);
  td_buf_u64(&td_ctx.ch.out, id);
  td_chan_end(&td_ctx.ch);
  td_w_timeout(timeout, td__tmo_get, 1);
  return td_w_await(L, req, td__push_get1, (void *)(uintptr_t)id);
}

typedef struct { uint64_t *ids; uint32_t n; } td__getn_t;

static int td__push_getn(lua_State *L, const uint8_t *p, size_t n, void *ud) {
  td__getn_t *g = ud;
  td_rd_t rd;
  td_rd_init(&rd, p, n);
  if (td_rd_u8(&rd)) { free(g->ids); free(g); lua_pushinteger(L, 2); return 1; }
  td__mkref_owned_flag = 0;
  lua_createtable(L, (int)g->n, 1);
  int status = 0;
  uint32_t nshm = 0;
  uint64_t *shm = td_xmalloc((size_t)g->n * 8 + 8);
  for (uint32_t i = 0; i < g->n; i++) {
    uint8_t kind = rd.p < rd.end ? *rd.p : 0;
    if (kind == TD_V_SHM) shm[nshm++] = g->ids[i];
    int rc = td_core_push_wire(L, &rd, g->ids[i]);
    if (rc < 0) { free(shm); free(g->ids); free(g); return luaL_error(L, "malformed reply from the node"); }
    if (rc == 1 && !status) {
      status = 1;
      lua_replace(L, -2);  /* the error replaces the array */
      break;
    }
    lua_rawseti(L, -2, (int)i + 1);
  }
  if (!status) { lua_pushinteger(L, (lua_Integer)g->n); lua_setfield(L, -2, "n"); }
  if (nshm) {
    td_chan_begin(&td_ctx.ch, TD_M_UNPIN);
    td_buf_u32(&td_ctx.ch.out, nshm);
    td_buf_put(&td_ctx.ch.out, shm, (size_t)nshm * 8);
    td_chan_end(&td_ctx.ch);
  }
  free(shm);
  free(g->ids);
  free(g);
  lua_pushinteger(L, status);
  lua_insert(L, -2);
  return 2;
}

static int w_getn(lua_State *L) {
  luaL_checktype(L, 1, LUA_TTABLE);
  double timeout = td__timeout_arg(L, 2);
  td__getn_t *g = td_xcalloc(1, sizeof(*g));
  g->n = (uint32_t)lua_objlen(L, 1);
  g->ids = td_xmalloc((size_t)g->n * 8 + 8);
  for (uint32_t i = 0; i < g->n; i++) {
    lua_rawgeti(L, 1, (int)i + 1);
    td_ref_ud_t *r = luaL_testudata(L, -1, TD_REF_MT);
    if (!r) { free(g->ids); free(g); return luaL_error(L, "element %d is not an ObjectRef", (int)i + 1); }
    g->ids[i] = r->id;
    lua_pop(L, 1);
  }
  td_core_flush_refs();
  uint32_t req = td_w_begin_req(TD_M_GET);
  td_buf_f64(&td_ctx.ch.out, timeout);
  td_buf_u32(&td_ctx.ch.out, g->n);
  td_buf_put(&td_ctx.ch.out, g->ids, (size_t)g->n * 8);
  td_chan_end(&td_ctx.ch);
  td_w_timeout(timeout, td__tmo_get, 1);
  return td_w_await(L, req, td__push_getn, g);
}

static int td__push_wait(lua_State *L, const uint8_t *p, size_t n, void *ud) {
  (void)ud;
  td_rd_t rd;
  td_rd_init(&rd, p, n);
  uint32_t cnt = td_rd_u32(&rd);
  if (rd.bad || cnt > n) return luaL_error(L, "malformed reply from the node");
  lua_createtable(L, (int)cnt, 0);
  for (uint32_t i = 0; i < cnt; i++) {
    lua_pushboolean(L, td_rd_u8(&rd));
    lua_rawseti(L, -2, (int)i + 1);
  }
  return 1;
}

static int w_wait(lua_State *L) {
  luaL_checktype(L, 1, LUA_TTABLE);
  uint32_t num = (uint32_t)luaL_checkinteger(L, 2);
  double timeout = td__timeout_arg(L, 3);
  uint32_t n = (uint32_t)lua_objlen(L, 1);
  uint64_t *ids = td_xmalloc((size_t)n * 8 + 8);
  for (uint32_t i = 0; i < n; i++) {
    lua_rawgeti(L, 1, (int)i + 1);
    ids[i] = td__checkref(L, -1);
    lua_pop(L, 1);
  }
  uint32_t req = td_w_begin_req(TD_M_WAIT);
  td_buf_f64(&td_ctx.ch.out, timeout);
  td_buf_u32(&td_ctx.ch.out, num);
  td_buf_u32(&td_ctx.ch.out, n);
  td_buf_put(&td_ctx.ch.out, ids, (size_t)n * 8);
  td_chan_end(&td_ctx.ch);
  free(ids);
  td_w_timeout(timeout, td__tmo_wait, 4);
  return td_w_await(L, req, td__push_wait, NULL);
}

static int td__push_stream(lua_State *L, const uint8_t *p, size_t n, void *ud) {
  (void)ud;
  td_rd_t rd;
  td_rd_init(&rd, p, n);
  uint8_t st = td_rd_u8(&rd);
  uint64_t item = td_rd_u64(&rd);
  if (rd.bad) return luaL_error(L, "malformed reply from the node");
  if (st == 0) td_core_pushref(L, item, 1);
  else if (st == 1) lua_pushnil(L);
  else lua_pushboolean(L, 0);
  return 1;
}

static int w_stream_next(lua_State *L) {
  uint64_t id = td__checkref(L, 1);
  uint32_t idx = (uint32_t)luaL_checkinteger(L, 2);
  double timeout = td__timeout_arg(L, 3);
  uint32_t req = td_w_begin_req(TD_M_STREAM_NEXT);
  td_buf_u64(&td_ctx.ch.out, id);
  td_buf_u32(&td_ctx.ch.out, idx);
  td_buf_f64(&td_ctx.ch.out, timeout);
  td_chan_end(&td_ctx.ch);
  td_w_timeout(timeout, td__tmo_stream, 9);
  return td_w_await(L, req, td__push_stream, NULL);
}

static td_buf_t td__valbuf;

static int w_put(lua_State *L) {
  luaL_checkany(L, 1);
  if (td_ser_value(&td_ctx.ser, L, 1, "tide.put value")) return td_core_ser_error(L, &td_ctx.ser);
  td_buf_reset(&td__valbuf);
  int rc = td_core_put_value(&td_ctx.ser, &td__valbuf);
  if (rc == TD_ESTOREFULL) {
    td__collect(L);
    rc = td_core_put_value(&td_ctx.ser, &td__valbuf);
  }
  if (rc) return luaL_error(L, "tide.put: %s", td_strerror(rc));
  uint64_t id = td_core_new_id();
  td_chan_begin(&td_ctx.ch, TD_M_PUT);
  td_buf_u64(&td_ctx.ch.out, id);
  td_buf_put(&td_ctx.ch.out, td__valbuf.p, td__valbuf.len);
  td_buf_u32(&td_ctx.ch.out, (uint32_t)td_ctx.ser.nrefs);
  td_buf_put(&td_ctx.ch.out, td_ctx.ser.refs, (size_t)td_ctx.ser.nrefs * 8);
  td_chan_end(&td_ctx.ch);
  td_core_pushref(L, id, 1);
  return 1;
}

static int td__push_room(lua_State *L, const uint8_t *p, size_t n, void *ud) {
  (void)L, (void)p, (void)n, (void)ud;
  return 0;
}

/* core.stream_room(): in a streaming call, waits until its consumer has
 * taken enough items to be within the window it set (see
 * td_node_stream_window); returns at once when it set none. */
static int w_stream_room(lua_State *L) {
  if (!td_ctx.cur_task || !td_ctx.cur_streaming) return 0;
  uint32_t req = td_w_begin_req(TD_M_STREAM_ROOM);
  td_buf_u64(&td_ctx.ch.out, td_ctx.cur_task);
  td_chan_end(&td_ctx.ch);
  return td_w_await(L, req, td__push_room, NULL);
}

/* core.yield_item(value): one item of a streaming task. */
static int w_yield_item(lua_State *L) {
  luaL_checkany(L, 1);
  if (!td_ctx.cur_task || !td_ctx.cur_streaming)
    return luaL_error(L, "tide.yield can only be called inside a task or method called with num_returns = \"streaming\"");
  if (td_ser_value(&td_ctx.ser, L, 1, "yielded value")) return td_core_ser_error(L, &td_ctx.ser);
  td_buf_reset(&td__valbuf);
  int rc = td_core_put_value(&td_ctx.ser, &td__valbuf);
  if (rc) return luaL_error(L, "tide.yield: %s", td_strerror(rc));
  td_chan_begin(&td_ctx.ch, TD_M_ITEM);
  td_buf_u64(&td_ctx.ch.out, td_ctx.cur_task);
  td_buf_u64(&td_ctx.ch.out, td_core_new_id());
  td_buf_put(&td_ctx.ch.out, td__valbuf.p, td__valbuf.len);
  td_buf_u32(&td_ctx.ch.out, (uint32_t)td_ctx.ser.nrefs);
  td_buf_put(&td_ctx.ch.out, td_ctx.ser.refs, (size_t)td_ctx.ser.nrefs * 8);
  td_chan_end(&td_ctx.ch);
  return 0;
}

static int w_print(lua_State *L) {
  size_t n;
  const char *s = luaL_checklstring(L, 1, &n);
  td_chan_begin(&td_ctx.ch, TD_M_PRINT);
  td_buf_str(&td_ctx.ch.out, s, n);
  td_buf_u64(&td_ctx.ch.out, td_ctx.cur_task);
  td_chan_end(&td_ctx.ch);
  return 0;
}

static int w_sleep(lua_State *L) { return td_w_sleep(L, luaL_checknumber(L, 1)); }

/* RPC: the op's arguments are encoded as one table; the reply is a table
 * of results whose refs the node already holds for us. */
static int td__push_rpc(lua_State *L, const uint8_t *p, size_t n, void *ud) {
  (void)ud;
  td_rd_t rd;
  td_rd_init(&rd, p, n);
  uint8_t ok = td_rd_u8(&rd);
  uint32_t l;
  const uint8_t *b = td_rd_str(&rd, &l);
  if (rd.bad) return luaL_error(L, "malformed reply from the node");
  td__mkref_owned_flag = 1;
  int rc = td__decode(L, b, l, 0);
  td__mkref_owned_flag = 0;
  if (rc) return lua_error(L);
  if (!ok) {
    /* The node raised: its error is the first result. */
    if (lua_istable(L, -1)) lua_rawgeti(L, -1, 1);
    return lua_error(L);
  }
  int cnt = (int)lua_objlen(L, -1);
  luaL_checkstack(L, cnt + 2, "rpc results");
  int t = lua_gettop(L);
  for (int i = 1; i <= cnt; i++) lua_rawgeti(L, t, i);
  lua_remove(L, t);
  return cnt;
}

static int w_rpc(lua_State *L) {
  size_t ol;
  const char *op = lua_tolstring(L, lua_upvalueindex(1), &ol);
  if (!op) {
    /* core.call_node(op, ...): the op comes first. */
    op = luaL_checklstring(L, 1, &ol);
    lua_remove(L, 1);
  }
  int n = lua_gettop(L);
  lua_createtable(L, n, 0);
  for (int i = 1; i <= n; i++) {
    lua_pushvalue(L, i);
    lua_rawseti(L, -2, i);
  }
  if (td_ser_value(&td_ctx.ser, L, -1, "argument")) return td_core_ser_error(L, &td_ctx.ser);
  td_core_flush_refs();
  /* An op whose answer nobody waits for (upvalue 2) is sent without a
   * request id: the node replies to none, and order is kept. */
  int cast = lua_toboolean(L, lua_upvalueindex(2));
  uint32_t req = 0;
  if (cast) {
    td_chan_begin(&td_ctx.ch, TD_M_RPC);
    td_buf_u32(&td_ctx.ch.out, 0);
  } else {
    req = td_w_begin_req(TD_M_RPC);
  }
  td_buf_str(&td_ctx.ch.out, op, ol);
  td_buf_u32(&td_ctx.ch.out, (uint32_t)td_ctx.ser.size);
  td_ser_append(&td_ctx.ser, &td_ctx.ch.out);
  td_chan_end(&td_ctx.ch);
  if (cast) {
    td_chan_flush(&td_ctx.ch);
    lua_pushboolean(L, 1);
    return 1;
  }
  return td_w_await(L, req, td__push_rpc, NULL);
}

/* Driver side of RPC: runs `op` from the worker in the private state. */
static void td__rpc_cb(void *ud, td_wk_t *wk, uint32_t req, const char *op, const uint8_t *args,
                       size_t len) {
  lua_State *L = ud;
  td_buf_t out;
  td_buf_init(&out);
  int top = lua_gettop(L);
  if (!strcmp(op, "register")) {
    if (len >= 8) {
      uint64_t id;
      memcpy(&id, args, 8);
      td_node_register_fn(td_ctx.node, id, args + 8, len - 8);
    }
    return;
  }
  /* The KV and the cluster's resources and nodes are the head's: a node passes them on. */
  if ((!strncmp(op, "kv_", 3) || !strcmp(op, "resources") || !strcmp(op, "nodes")) && req &&
      td_node_relay(td_ctx.node, wk, req, op, args, len) == 0)
    return;
  int ok = 0;
  lua_getfield(L, LUA_REGISTRYINDEX, "tide.rpc.ops");
  lua_getfield(L, -1, op);
  if (!lua_isfunction(L, -1)) {
    lua_pushfstring(L, "unknown operation %s", op);
  } else {
    td__mkref_owned_flag = 0;
    if (td__decode(L, args, len, 0) == 0 && lua_istable(L, -1)) {
      int n = (int)lua_objlen(L, -1);
      int t = lua_gettop(L);
      for (int i = 1; i <= n; i++) lua_rawgeti(L, t, i);
      lua_remove(L, t);
      ok = lua_pcall(L, n, LUA_MULTRET, 0) == 0;
    } else {
      lua_remove(L, -2);
    }
  }
  int base = top + 2;  /* ops table, then results */
  int nres = lua_gettop(L) - base + 1;
  if (ok && nres == 0 && req && !strcmp(op, "get_actor") &&
      td_node_relay(td_ctx.node, wk, req, op, args, len) == 0) {
    lua_settop(L, top);  /* not here: maybe elsewhere in the cluster */
    return;
  }
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
  td_buf_u8(&out, (uint8_t)ok);
  td_buf_u32(&out, (uint32_t)s.size);
  td_ser_append(&s, &out);
  if (req) td_node_reply(td_ctx.node, wk, req, out.p, out.len);
  int had_refs = s.nrefs > 0;
  td_ser_free(&s);
  td_buf_free(&out);
  lua_settop(L, top);
  /* This state's handles to the refs it handed out go now, not at some
   * later collection: the requester holds what it was given, and a
   * requester that dies gives back exactly that. */
  if (had_refs) lua_gc(L, LUA_GCCOLLECT, 0);
}

/* -- Context ------------------------------------------------------------------------- */

static int c_context(lua_State *L) {
  lua_createtable(L, 0, 8);
  lua_pushliteral(L, "01");
  lua_setfield(L, -2, "job_id");
  if (td_ctx.node) {
    lua_pushfstring(L, "node-%d", (int)td_node_index(td_ctx.node));
  } else if (td_ctx.kind == WK_CLIENT) {
    /* A driver attached to a node: its id carries the node's index. */
    lua_pushfstring(L, "node-%d", (int)td_id_node(td_ctx.wk_id << 32));
  } else {
    const char *nid = getenv("TIDE_NODE_ID");
    lua_pushstring(L, nid ? nid : "node-0");
  }
  lua_setfield(L, -2, "node_id");
  if (td_ctx.is_driver || td_ctx.kind == WK_CLIENT) {
    lua_pushliteral(L, "driver");
  } else {
    lua_pushfstring(L, "worker-%d", (int)td_ctx.wk_id);
  }
  lua_setfield(L, -2, "worker_id");
  lua_pushinteger(L, (lua_Integer)getpid());
  lua_setfield(L, -2, "pid");
  if (td_ctx.cur_task) {
    td_core_pushid(L, td_ctx.cur_task);
    lua_setfield(L, -2, "task_id");
  }
  if (td_ctx.cur_actor) {
    td_core_pushid(L, td_ctx.cur_actor);
    lua_setfield(L, -2, "actor_id");
  }
  if (td_ctx.cur_name[0]) {
    lua_pushstring(L, td_ctx.cur_name);
    lua_setfield(L, -2, "name");
  }
  lua_newtable(L);
  int k = 1;
  for (const char *p = td_ctx.gpu_ids; *p;) {
    lua_pushinteger(L, strtol(p, (char **)&p, 10));
    lua_rawseti(L, -2, k++);
    if (*p == ',') p++;
    else break;
  }
  lua_setfield(L, -2, "gpu_ids");
  return 1;
}

int td_core_register_start(lua_State *L);
void td_serve_register(lua_State *L);
void td_core_driver_rpc(lua_State *from);

/* core.term_area(text), core.term_commit(text), core.term_print(text): the
 * terminal's status area (term.h), for stdlib/tide/progress.lua. */
static int c_term_area(lua_State *L) {
  size_t l;
  const char *s = luaL_optlstring(L, 1, "", &l);
  td_term_area(s, l);
  return 0;
}

static int c_term_commit(lua_State *L) {
  size_t l;
  const char *s = luaL_checklstring(L, 1, &l);
  td_term_commit(s, l);
  return 0;
}

static int c_term_print(lua_State *L) {
  size_t l;
  const char *s = luaL_checklstring(L, 1, &l);
  td_term_print(s, l);
  return 0;
}

/* core.now() -> monotonic seconds. */
static int c_now(lua_State *L) {
  lua_pushnumber(L, td_now());
  return 1;
}

/* core.encode(v) -> string; core.decode(s) -> v: for __tide_ser hooks. */
static int c_encode(lua_State *L) {
  luaL_checkany(L, 1);
  td_ser_t s;
  td_ser_init(&s);
  if (td_ser_value(&s, L, 1, "value")) {
    lua_pushstring(L, s.err);
    td_ser_free(&s);
    return lua_error(L);
  }
  td_buf_t b;
  td_buf_init(&b);
  td_ser_append(&s, &b);
  lua_pushlstring(L, (const char *)b.p, b.len);
  td_buf_free(&b);
  td_ser_free(&s);
  return 1;
}

static int c_decode(lua_State *L) {
  size_t n;
  const char *p = luaL_checklstring(L, 1, &n);
  td__mkref_owned_flag = 0;
  if (td__decode(L, (const uint8_t *)p, n, 0)) return lua_error(L);
  return 1;
}

/* -- Module --------------------------------------------------------------------------- */

/* The op of those a client or worker sends without waiting for a reply. */
static const char td__rpc_cast[] = "pg_remove";
static const char *const td__rpc_ops[] = {"cancel", "kill", "get_actor", "actor_state", "pg_create",
                                          "pg_remove", "pg_lookup", "resources", "stats", "nodes",
                                          "timeline", "why", NULL};

int luaopen_tide_core(lua_State *L) {
  if (luaL_newmetatable(L, TD_REF_MT)) {
    lua_pushcfunction(L, ref_gc);
    lua_setfield(L, -2, "__gc");
    lua_pushcfunction(L, ref_tostring);
    lua_setfield(L, -2, "__tostring");
    lua_pushcfunction(L, ref_eq);
    lua_setfield(L, -2, "__eq");
    lua_pushliteral(L, "ObjectRef");
    lua_setfield(L, -2, "__name");
    lua_pushvalue(L, -1);
    lua_setfield(L, -2, "__index");
    lua_pushcfunction(L, ref_id);
    lua_setfield(L, -2, "id");
  }
  lua_pop(L, 1);
  static const luaL_Reg common[] = {
    {"submit", c_submit}, {"actor_new", c_actor_new}, {"actor_call", c_actor_call},
    {"register", c_register}, {"context", c_context}, {"pkg_hash", c_pkg_hash},
    {"encode", c_encode}, {"decode", c_decode}, {"term_area", c_term_area}, {"term_commit", c_term_commit},
    {"term_print", c_term_print}, {"now", c_now}, {NULL, NULL}};
  static const luaL_Reg driver[] = {
    {"get1", d_get1}, {"getn", d_getn}, {"wait", d_wait}, {"stream_next", d_stream_next},
    {"put", d_put}, {"sleep", d_sleep}, {"pump", d_pump}, {"state", d_state}, {"cancel", c_cancel}, {"kill", c_kill},
    {"get_actor", c_get_actor}, {"actor_state", c_actor_state}, {"pg_create", c_pg_create},
    {"pg_remove", c_pg_remove}, {"pg_lookup", c_pg_lookup}, {"resources", c_resources},
    {"stats", c_stats}, {"nodes", c_nodes}, {"timeline", c_timeline}, {"why", c_why},
    {"register_blob", c_register_blob},
    {"persist", c_persist}, {"persisted", c_persisted}, {"pkg_install", c_pkg_install}, {NULL, NULL}};
  static const luaL_Reg worker[] = {
    {"get1", w_get1}, {"getn", w_getn}, {"wait", w_wait}, {"stream_next", w_stream_next},
    {"put", w_put}, {"sleep", w_sleep}, {"yield_item", w_yield_item}, {"stream_room", w_stream_room}, {"print", w_print},
    {NULL, NULL}};
  lua_newtable(L);
  if (td_ctx.is_driver && !td__opening_rpc) {
    /* Every driver entry point holds the node against the pump thread. */
    const luaL_Reg *lists[] = {common, driver};
    for (int k = 0; k < 2; k++)
      for (const luaL_Reg *r = lists[k]; r->name; r++) {
        lua_pushcfunction(L, r->func);
        lua_pushcclosure(L, td__guard, 1);
        lua_setfield(L, -2, r->name);
      }
  } else {
    luaL_register(L, NULL, common);
    luaL_register(L, NULL, td_ctx.is_driver ? driver : worker);
  }
  if (!td_ctx.is_driver) {
    lua_pushcfunction(L, w_rpc);
    lua_setfield(L, -2, "call_node");
    for (int i = 0; td__rpc_ops[i]; i++) {
      lua_pushstring(L, td__rpc_ops[i]);
      lua_pushboolean(L, !strcmp(td__rpc_ops[i], td__rpc_cast));
      lua_pushcclosure(L, w_rpc, 2);
      lua_setfield(L, -2, td__rpc_ops[i]);
    }
  }
  if (td_ctx.is_driver) {
    td_core_register_start(L);
    td_serve_register(L);
    if (!td__opening_rpc) {
      /* serve_* and start/stop are guarded like the rest. */
      static const char *const guarded[] = {"serve_start", "serve_deployment", "serve_replicas",
                                            "serve_remove", "serve_stats", "serve_stop", "stop", NULL};
      for (int k = 0; guarded[k]; k++) {
        lua_getfield(L, -1, guarded[k]);
        lua_pushcclosure(L, td__guard, 1);
        lua_setfield(L, -2, guarded[k]);
      }
    }
  }
  lua_pushboolean(L, td_ctx.is_driver);
  lua_setfield(L, -2, "is_driver");
  lua_pushboolean(L, !td_ctx.is_driver && td_ctx.kind == WK_CLIENT);
  lua_setfield(L, -2, "is_client");
  lua_pushnumber(L, (lua_Number)td_ctx.wk_id);
  lua_setfield(L, -2, "worker_id");
  lua_pushnumber(L, (lua_Number)td_ctx.inline_max);
  lua_setfield(L, -2, "inline_max");
  return 1;
}

int luaopen_tide_collective_c(lua_State *L);
int luaopen_tide_rawbench(lua_State *L);

/* Puts $home/stdlib on package.path and preloads tide.core and the
 * optional C modules linked into the binary (the gpu layer). Leaves
 * package.preload on the stack for the caller's own additions. */
void td_core_setup_paths(lua_State *L, const char *home) {
  static lua_CFunction tensor;
  static int looked;
  lua_getglobal(L, "package");
  lua_pushfstring(L, "%s/stdlib/?.lua;%s/stdlib/?/init.lua;", home, home);
  lua_getfield(L, -2, "path");
  lua_concat(L, 2);
  lua_setfield(L, -2, "path");
  lua_getfield(L, -1, "preload");
  lua_remove(L, -2);
  lua_pushcfunction(L, luaopen_tide_core);
  lua_setfield(L, -2, "tide.core");
  lua_pushcfunction(L, luaopen_tide_collective_c);
  lua_setfield(L, -2, "tide.collective_c");
  lua_pushcfunction(L, luaopen_tide_rawbench);
  lua_setfield(L, -2, "tide.rawbench");
  if (!looked) {
    tensor = (lua_CFunction)(uintptr_t)dlsym(RTLD_DEFAULT, "luaopen_tide_tensor");
    looked = 1;
  }
  if (tensor) {
    lua_pushcfunction(L, tensor);
    lua_setfield(L, -2, "tide.tensor");
  }
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
  lua_newtable(L);
  for (int i = 0; td__rpc_ops[i]; i++) {
    lua_getfield(L, -2, td__rpc_ops[i]);
    lua_setfield(L, -2, td__rpc_ops[i]);
  }
  lua_setfield(L, LUA_REGISTRYINDEX, "tide.rpc.ops");
  lua_setfield(L, LUA_REGISTRYINDEX, "tide.rpc.core");
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
  lua_getfield(L, LUA_REGISTRYINDEX, "tide.rpc.ops");
  lua_pushnil(L);
  while (lua_next(L, -3)) {
    lua_pushvalue(L, -2);
    lua_insert(L, -2);
    lua_settable(L, -4);
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
  o.name = lua_tostring(L, -1);  /* kept alive by the options table */
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
  if (!td_ctx.node) return luaL_error(L, "cannot start the node: object store of %f bytes", (double)o.store_capacity);
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
