/* Tide Lua bindings, the tide.core module (see core.h): what both
 * backends share. The process's context (td_ctx); ObjectRefs and the
 * process's count of them; decoding values (zero-copy tensors over the
 * store) and encoding them for results and puts; the calls both backends
 * have (get, wait, stream, put, sleep), each bound once over td_ctx.be,
 * and the shaping of their results (td__ret_*); task, actor and
 * registration specs (submit); the runtime context, terminal and
 * encode/decode calls; and the module's opening, which picks a backend:
 * core_driver.c (the driver's direct calls into its embedded node) or
 * worker_api.c (a worker's or client's requests to its node).
 */
#include "core_int.h"
#include "pkg.h"
#include "term.h"

#include <lauxlib.h>
#include <lualib.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>
#include <dlfcn.h>

td_ctx_t td_ctx;

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

uint64_t td__checkref(lua_State *L, int idx) {
  td_ref_ud_t *r = luaL_testudata(L, idx, TD_REF_MT);
  if (!r) return (uint64_t)luaL_argerror(L, idx, lua_pushfstring(L, "ObjectRef expected, got %s", luaL_typename(L, idx)));
  if (!r->id) return (uint64_t)luaL_argerror(L, idx, "a released ObjectRef");
  return r->id;
}

/* core.release(ref): gives this handle's reference back now, as its
 * collection would (tide.data lets a consumed block go at once instead of
 * whenever the driver next collects). The handle is empty afterwards: a
 * later use raises, a later collection does nothing. */
static int c_release(lua_State *L) {
  luaL_checkudata(L, 1, TD_REF_MT);
  lua_settop(L, 1);
  ref_gc(L);
  td_core_flush_refs();
  return 0;
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

int td__mkref_owned_flag;
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
int td__decode(lua_State *L, const uint8_t *p, size_t n, uint64_t shm_id) {
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

/* Mapped tensors that are garbage still hold store bytes: before a full
 * store is reported, they are collected and their holds given back. */
void td__collect(lua_State *L) {
  lua_gc(L, LUA_GCCOLLECT, 0);
  td_core_flush_refs();
}

/* -- Calls both backends have ---------------------------------------------------------
 * Each is bound once: the binding checks its arguments and reads ids and
 * timeouts; td_ctx.be reaches the node and pushes the results with the
 * td__ret_* helpers (core_int.h). What a backend returns (a worker's
 * yield too) is returned as is. */

int td__ret_status(lua_State *L, int is_err) {
  lua_pushinteger(L, is_err ? TD_GET_ERROR : TD_GET_OK);
  lua_insert(L, -2);
  return 2;
}

int td__ret_timeout(lua_State *L) {
  lua_pushinteger(L, TD_GET_TIMEOUT);
  return 1;
}

int td__ret_values(lua_State *L, uint32_t n, td__value_fn value, void *ud) {
  lua_createtable(L, (int)n, 1);
  for (uint32_t i = 0; i < n; i++) {
    int rc = value(L, i, ud);
    if (rc < 0) return rc;
    if (rc == 1) return td__ret_status(L, 1); /* the error, not the array */
    lua_rawseti(L, -2, (int)i + 1);
  }
  lua_pushinteger(L, (lua_Integer)n);
  lua_setfield(L, -2, "n");
  return td__ret_status(L, 0);
}

int td__ret_item(lua_State *L, td_sn_t st, uint64_t item, int owned) {
  if (st == TD_SN_ITEM) td_core_pushref(L, item, owned);
  else if (st == TD_SN_ENDED) lua_pushnil(L);
  else lua_pushboolean(L, 0);
  return 1;
}

/* The timeout argument at idx: nil for none (< 0), or seconds. */
static double td__timeout_arg(lua_State *L, int idx) {
  if (lua_isnoneornil(L, idx)) return -1;
  return luaL_checknumber(L, idx);
}

/* Ids that fit here need no allocation. */
#define TD__IDS_STACK 64

/* The ids of the n ObjectRefs in the array at t, in buf when they fit
 * (TD__IDS_STACK), else in a userdata left on the stack (collected, so a
 * raise leaks nothing). */
static uint64_t *td__ref_ids(lua_State *L, int t, uint32_t n, uint64_t *buf) {
  uint64_t *ids = n <= TD__IDS_STACK ? buf : lua_newuserdata(L, (size_t)n * 8);
  for (uint32_t i = 0; i < n; i++) {
    lua_rawgeti(L, t, (int)i + 1);
    td_ref_ud_t *r = luaL_testudata(L, -1, TD_REF_MT);
    if (!r) {
      luaL_error(L, "element %d is not an ObjectRef", (int)i + 1);
      return NULL; /* not reached */
    }
    if (!r->id) {
      luaL_error(L, "element %d is a released ObjectRef", (int)i + 1);
      return NULL; /* not reached */
    }
    ids[i] = r->id;
    lua_pop(L, 1);
  }
  return ids;
}

/* core.get1(ref, timeout) -> status (core.STATUS: OK, ERROR, TIMEOUT), value */
static int c_get1(lua_State *L) {
  uint64_t id = td__checkref(L, 1);
  return td_ctx.be->get1(L, id, td__timeout_arg(L, 2));
}

/* core.getn(refs, timeout) -> status, values|error (array in order, with n) */
static int c_getn(lua_State *L) {
  luaL_checktype(L, 1, LUA_TTABLE);
  double timeout = td__timeout_arg(L, 2);
  uint32_t n = (uint32_t)lua_objlen(L, 1);
  uint64_t buf[TD__IDS_STACK];
  return td_ctx.be->getn(L, td__ref_ids(L, 1, n, buf), n, timeout);
}

/* core.wait(refs, num, timeout) -> array of booleans (ready) */
static int c_wait(lua_State *L) {
  luaL_checktype(L, 1, LUA_TTABLE);
  int num = (int)luaL_checkinteger(L, 2);
  double timeout = td__timeout_arg(L, 3);
  uint32_t n = (uint32_t)lua_objlen(L, 1);
  uint64_t buf[TD__IDS_STACK];
  return td_ctx.be->wait(L, td__ref_ids(L, 1, n, buf), n, num, timeout);
}

/* core.stream_next(stream_ref, idx0, timeout) -> ref | nil (end) | false (timeout) */
static int c_stream_next(lua_State *L) {
  uint64_t id = td__checkref(L, 1);
  uint32_t idx = (uint32_t)luaL_checkinteger(L, 2);
  return td_ctx.be->stream_next(L, id, idx, td__timeout_arg(L, 3));
}

/* core.put(value) -> ref */
static int c_put(lua_State *L) {
  luaL_checkany(L, 1);
  if (td_ser_value(&td_ctx.ser, L, 1, "tide.put value")) return td_core_ser_error(L, &td_ctx.ser);
  uint64_t id = 0;
  int rc = td_ctx.be->put(L, &id);
  if (rc == TD_ESTOREFULL) {
    td__collect(L);
    rc = td_ctx.be->put(L, &id);
  }
  if (rc) {
    double cap = td_ctx.be->store_capacity();
    if (cap < 0) return luaL_error(L, "tide.put: %s", td_strerror(rc));
    return luaL_error(L, "tide.put: %s (value of %f bytes, store capacity %f bytes)", td_strerror(rc),
                      (double)td_ctx.ser.size, cap);
  }
  td_core_pushref(L, id, 1);
  return 1;
}

/* core.sleep(seconds) -> nothing | core.STATUS.CANCELLED (a worker's task was cancelled) */
static int c_sleep(lua_State *L) { return td_ctx.be->sleep(L, luaL_checknumber(L, 1)); }

/* -- Specs from normalized options ------------------------------------------------- */

double td__optnum(lua_State *L, int t, const char *k, double def) {
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
  lua_Number st = td__optnum(L, t, "strategy", TD_ST_DEFAULT);
  if (!td_code_name(td_strategy_codes, (int)st))
    luaL_error(L, "option strategy: a core.STRATEGY code expected");
  s->strategy = (uint8_t)st;
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
  lua_getfield(L, t, "pipeline");
  s->pipeline = (uint8_t)lua_toboolean(L, -1);
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
    lua_pushcfunction(L, c_put);
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
    td_buf_str(&td_ctx.ch.out, TD_RPC_REGISTER, sizeof(TD_RPC_REGISTER) - 1);
    td_buf_u32(&td_ctx.ch.out, (uint32_t)(td__argbuf.len + 8));
    td_buf_u64(&td_ctx.ch.out, id);
    td_buf_put(&td_ctx.ch.out, td__argbuf.p, td__argbuf.len);
    td_chan_end(&td_ctx.ch);
  }
  td_core_pushid(L, id);
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

void td_serve_register(lua_State *L);

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

/* -- Codes by name ------------------------------------------------------------------- */

const td_code_t td_get_status_codes[] = {{"OK", TD_GET_OK},           {"ERROR", TD_GET_ERROR},
                                         {"TIMEOUT", TD_GET_TIMEOUT}, {"CANCELLED", TD_GET_CANCELLED},
                                         {"RAISED", TD_GET_RAISED},   {NULL, 0}};

/* Sets t[field] = {NAME = code, ...} on the table at the top, from a code
 * table: the only place Lua learns the codes' values. */
static void td__set_codes(lua_State *L, const char *field, const td_code_t *codes) {
  lua_newtable(L);
  for (const td_code_t *c = codes; c->name; c++) {
    lua_pushinteger(L, c->value);
    lua_setfield(L, -2, c->name);
  }
  lua_setfield(L, -2, field);
}

/* -- Module --------------------------------------------------------------------------- */

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
  td_ctx.be = td_ctx.is_driver ? &td__driver_be : &td__worker_be;
  static const luaL_Reg common[] = {{"get1", c_get1},
                                    {"getn", c_getn},
                                    {"wait", c_wait},
                                    {"stream_next", c_stream_next},
                                    {"put", c_put},
                                    {"release", c_release},
                                    {"sleep", c_sleep},
                                    {"submit", c_submit},
                                    {"actor_new", c_actor_new},
                                    {"actor_call", c_actor_call},
                                    {"register", c_register},
                                    {"context", c_context},
                                    {"pkg_hash", c_pkg_hash},
                                    {"encode", c_encode},
                                    {"decode", c_decode},
                                    {"term_area", c_term_area},
                                    {"term_commit", c_term_commit},
                                    {"term_print", c_term_print},
                                    {"now", c_now},
                                    {NULL, NULL}};
  lua_newtable(L);
  if (td_ctx.is_driver && !td__opening_rpc) {
    /* Every driver entry point holds the node against the pump thread. */
    const luaL_Reg *lists[] = {common, td__driver_fns};
    for (int k = 0; k < 2; k++)
      for (const luaL_Reg *r = lists[k]; r->name; r++) {
        lua_pushcfunction(L, r->func);
        lua_pushcclosure(L, td__guard, 1);
        lua_setfield(L, -2, r->name);
      }
  } else {
    luaL_register(L, NULL, common);
    luaL_register(L, NULL, td_ctx.is_driver ? td__driver_fns : td__worker_fns);
  }
  /* The C control ops (td__rpc_table): the driver calls them, a worker
   * sends them to its node; core.call_node sends any op by name. */
  td__rpc_find("", 0); /* indexes the table before the first RPC */
  for (const td_rpc_op_t *op = td__rpc_table; op->name; op++) {
    if (!op->fn) continue;
    if (td_ctx.is_driver) {
      lua_pushcfunction(L, op->fn);
      if (!td__opening_rpc) lua_pushcclosure(L, td__guard, 1);
    } else {
      lua_pushlightuserdata(L, (void *)op);
      lua_pushcclosure(L, td__w_rpc, 1);
    }
    lua_setfield(L, -2, op->name);
  }
  if (!td_ctx.is_driver) {
    lua_pushcfunction(L, td__w_rpc);
    lua_setfield(L, -2, "call_node");
  }
  if (td_ctx.is_driver) {
    td_core_register_start(L);
    td_serve_register(L);
    if (!td__opening_rpc) {
      /* serve_metrics and start/stop are guarded like the rest (the
       * other serve_* are control ops, guarded above). */
      static const char *const guarded[] = {"serve_metrics", "stop", NULL};
      for (int k = 0; guarded[k]; k++) {
        lua_getfield(L, -1, guarded[k]);
        lua_pushcclosure(L, td__guard, 1);
        lua_setfield(L, -2, guarded[k]);
      }
    }
  }
  td__set_codes(L, "STATUS", td_get_status_codes);
  td__set_codes(L, "STRATEGY", td_strategy_codes);
  td__set_codes(L, "PG_STRATEGY", td_pg_strategy_codes);
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
