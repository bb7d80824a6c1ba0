/* tide.tensor: making tensors.  The constructors (T.zeros, ones, full,
 * empty, randn, rand, arange), tensors from Lua tables, byte strings and
 * files, and the object-store hooks: __tide_ser and __tide_raw write a
 * tensor, T.__tide_deser and T.__tide_deser_raw read one back (ser.h).
 * Registered by luaopen_tide_tensor (tensor_lua.c) through the tables at
 * the end; helpers in tensor_lua_int.h.
 */
#include <lauxlib.h>
#include <lua.h>
#include <stdio.h>
#include <string.h>

#include "ops.h"
#include "ser.h"
#include "tensor.h"
#include "tensor_lua_int.h"

/* -- Creation ---------------------------------------------------------------- */

static int td__new_filled(lua_State *L, const char *fn, int shape_idx, int opts, double v, int zero) {
  int64_t shape[TD_MAX_DIMS];
  int ndim = td__tlua_shape_arg(L, shape_idx, shape);
  int dtype = td__tlua_opt_dtype(L, opts, TD_F32);
  int dev = td__tlua_opt_device(L, opts, TD_CPU);
  td_tensor_t *t = NULL;
  if (zero) {
    TD__TRY(L, fn, td_tensor_zeros(&t, dtype, dev, ndim, shape));
    td__tlua_push(L, t);
    return 1;
  }
  /* Fill on the host in the requested dtype, then move. */
  TD__TRY(L, fn, td_tensor_empty(&t, TD_F32, TD_CPU, ndim, shape));
  td__tlua_push(L, t);
  float *p = td_tensor_data(t);
  for (int64_t i = 0, n = td_tensor_numel(t); i < n; i++) p[i] = (float)v;
  if (dtype != TD_F32 || dev != TD_CPU) {
    td_tensor_t *o = NULL;
    TD__TRY(L, fn, td_tensor_to(&o, t, dev, dtype));
    td__tlua_push(L, o);
  }
  return 1;
}

/* T.zeros(shape [, {dtype, device}]) */
static int td__l_zeros(lua_State *L) { return td__new_filled(L, "zeros", 1, 2, 0, 1); }
/* T.ones(shape [, opts]) */
static int td__l_ones(lua_State *L) { return td__new_filled(L, "ones", 1, 2, 1, 0); }
/* T.full(shape, value [, opts]) */
static int td__l_full(lua_State *L) { return td__new_filled(L, "full", 1, 3, luaL_checknumber(L, 2), 0); }
/* T.empty(shape [, opts]): contents unspecified. */
static int td__l_empty(lua_State *L) {
  int64_t shape[TD_MAX_DIMS];
  int ndim = td__tlua_shape_arg(L, 1, shape);
  td_tensor_t *t = NULL;
  TD__TRY(
      L, "empty",
      td_tensor_empty(&t, td__tlua_opt_dtype(L, 2, TD_F32), td__tlua_opt_device(L, 2, TD_CPU), ndim, shape));
  td__tlua_push(L, t);
  return 1;
}

/* Moves the f32 host tensor on top of the stack to opts' dtype/device. */
static int td__finish_host(lua_State *L, const char *fn, td_tensor_t *t, int opts) {
  int dtype = td__tlua_opt_dtype(L, opts, TD_F32);
  int dev = td__tlua_opt_device(L, opts, TD_CPU);
  if (dtype != td_tensor_dtype(t) || dev != TD_CPU) {
    td_tensor_t *o = NULL;
    TD__TRY(L, fn, td_tensor_to(&o, t, dev, dtype));
    td__tlua_push(L, o);
  }
  return 1;
}

/* T.randn(shape [, {seed = 0, mean = 0, std = 1, dtype, device}]) */
static int td__l_randn(lua_State *L) {
  int64_t shape[TD_MAX_DIMS];
  int ndim = td__tlua_shape_arg(L, 1, shape);
  double seed = td__tlua_opt_num(L, 2, "seed", 0);
  float mean = (float)td__tlua_opt_num(L, 2, "mean", 0);
  float std = (float)td__tlua_opt_num(L, 2, "std", 1);
  td_tensor_t *t = NULL;
  TD__TRY(L, "randn", td_tensor_empty(&t, TD_F32, TD_CPU, ndim, shape));
  td__tlua_push(L, t);
  td_rng_normal(td_tensor_data(t), td_tensor_numel(t), (uint64_t)(int64_t)seed, mean, std);
  return td__finish_host(L, "randn", t, 2);
}

/* T.rand(shape [, {seed = 0, low = 0, high = 1, dtype, device}]) */
static int td__l_rand(lua_State *L) {
  int64_t shape[TD_MAX_DIMS];
  int ndim = td__tlua_shape_arg(L, 1, shape);
  double seed = td__tlua_opt_num(L, 2, "seed", 0);
  float lo = (float)td__tlua_opt_num(L, 2, "low", 0);
  float hi = (float)td__tlua_opt_num(L, 2, "high", 1);
  td_tensor_t *t = NULL;
  TD__TRY(L, "rand", td_tensor_empty(&t, TD_F32, TD_CPU, ndim, shape));
  td__tlua_push(L, t);
  td_rng_fill_uniform(td_tensor_data(t), td_tensor_numel(t), (uint64_t)(int64_t)seed, lo, hi);
  return td__finish_host(L, "rand", t, 2);
}

/* T.arange(n [, opts]) -> 0..n-1 (default dtype i32). */
static int td__l_arange(lua_State *L) {
  int64_t n = (int64_t)luaL_checknumber(L, 1);
  if (n < 0) luaL_error(L, "tide.tensor.arange: n must be >= 0");
  int dtype = td__tlua_opt_dtype(L, 2, TD_I32);
  int dev = td__tlua_opt_device(L, 2, TD_CPU);
  td_tensor_t *t = NULL;
  TD__TRY(L, "arange", td_tensor_empty(&t, TD_I32, TD_CPU, 1, &n));
  td__tlua_push(L, t);
  int32_t *p = td_tensor_data(t);
  for (int64_t i = 0; i < n; i++) p[i] = (int32_t)i;
  if (dtype != TD_I32 || dev != TD_CPU) {
    td_tensor_t *o = NULL;
    TD__TRY(L, "arange", td_tensor_to(&o, t, dev, dtype));
    td__tlua_push(L, o);
  }
  return 1;
}

/* Infers the shape of a nested table at idx. */
static int td__table_shape(lua_State *L, int idx, int64_t *shape) {
  int ndim = 0;
  lua_pushvalue(L, idx);
  while (lua_type(L, -1) == LUA_TTABLE) {
    if (ndim == TD_MAX_DIMS) luaL_error(L, "tide.tensor.from_table: more than %d levels", TD_MAX_DIMS);
    shape[ndim++] = (int64_t)lua_objlen(L, -1);
    if (lua_objlen(L, -1) == 0) break;
    lua_rawgeti(L, -1, 1);
    lua_remove(L, -2);
  }
  lua_pop(L, 1);
  return ndim;
}

/* Fills f32 elements, or i64 ones when ints (as to_table reads them, so an
 * integer above 2^24 survives). */
static void td__table_fill(lua_State *L, int idx, int dim, int ndim, const int64_t *shape, void *out,
                           int ints, int64_t *pos) {
  if (dim == ndim) {
    if (lua_type(L, idx) != LUA_TNUMBER) luaL_error(L, "tide.tensor.from_table: non-numeric element");
    if (ints) ((int64_t *)out)[(*pos)++] = (int64_t)lua_tonumber(L, idx);
    else ((float *)out)[(*pos)++] = (float)lua_tonumber(L, idx);
    return;
  }
  if (lua_type(L, idx) != LUA_TTABLE || (int64_t)lua_objlen(L, idx) != shape[dim])
    luaL_error(L, "tide.tensor.from_table: ragged nested table at depth %d", dim + 1);
  for (int64_t i = 0; i < shape[dim]; i++) {
    lua_rawgeti(L, idx, (int)i + 1);
    td__table_fill(L, lua_gettop(L), dim + 1, ndim, shape, out, ints, pos);
    lua_pop(L, 1);
  }
}

/* T.from_table(nested [, {dtype = "f32", device}]) */
static int td__l_from_table(lua_State *L) {
  int64_t shape[TD_MAX_DIMS];
  int ndim = lua_type(L, 1) == LUA_TNUMBER ? 0 : td__table_shape(L, 1, shape);
  if (lua_type(L, 1) != LUA_TNUMBER) luaL_checktype(L, 1, LUA_TTABLE);
  int dt = td__tlua_opt_dtype(L, 2, TD_F32), ints = dt == TD_I32 || dt == TD_I64 || dt == TD_U8;
  td_tensor_t *t = NULL;
  TD__TRY(L, "from_table", td_tensor_empty(&t, ints ? TD_I64 : TD_F32, TD_CPU, ndim, shape));
  td__tlua_push(L, t);
  int64_t pos = 0;
  td__table_fill(L, 1, 0, ndim, shape, td_tensor_data(t), ints, &pos);
  return td__finish_host(L, "from_table", t, 2);
}

/* T.from_bytes(s, shape [, dtype = "f32"]): copies raw little-endian bytes. */
static int td__l_from_bytes(lua_State *L) {
  size_t len;
  const char *s = luaL_checklstring(L, 1, &len);
  int64_t shape[TD_MAX_DIMS];
  int ndim = td__tlua_shape_arg(L, 2, shape);
  int dtype = TD_F32;
  if (!lua_isnoneornil(L, 3)) {
    dtype = td_dtype_parse(luaL_checkstring(L, 3));
    if (dtype < 0) luaL_error(L, "tide.tensor.from_bytes: unknown dtype");
  }
  td_tensor_t *t = NULL;
  TD__TRY(L, "from_bytes", td_tensor_empty(&t, dtype, TD_CPU, ndim, shape));
  td__tlua_push(L, t);
  if (td_tensor_nbytes(t) != len)
    luaL_error(L, "tide.tensor.from_bytes: %d bytes given, shape needs %d", (int)len,
               (int)td_tensor_nbytes(t));
  memcpy(td_tensor_data(t), s, len);
  return 1;
}

/* T.from_file(path, offset, shape [, dtype = "f32"]): reads the raw bytes
 * at offset of a file straight into a new tensor (checkpoint loading without
 * a Lua string copy).  Returns nil, err when the file cannot be read. */
static int td__l_from_file(lua_State *L) {
  const char *path = luaL_checkstring(L, 1);
  double off = luaL_checknumber(L, 2);
  int64_t shape[TD_MAX_DIMS];
  int ndim = td__tlua_shape_arg(L, 3, shape);
  int dtype = TD_F32;
  if (!lua_isnoneornil(L, 4)) {
    dtype = td_dtype_parse(luaL_checkstring(L, 4));
    if (dtype < 0) luaL_error(L, "tide.tensor.from_file: unknown dtype");
  }
  if (off < 0) luaL_error(L, "tide.tensor.from_file: negative offset");
  td_tensor_t *t = NULL;
  TD__TRY(L, "from_file", td_tensor_empty(&t, dtype, TD_CPU, ndim, shape));
  td__tlua_push(L, t);
  FILE *f = fopen(path, "rb");
  if (!f) {
    lua_pushnil(L);
    lua_pushfstring(L, "%s: cannot open", path);
    return 2;
  }
  size_t want = td_tensor_nbytes(t), got = 0;
  if (fseeko(f, (off_t)off, SEEK_SET) == 0) got = fread(td_tensor_data(t), 1, want, f);
  fclose(f);
  if (got != want) {
    lua_pushnil(L);
    lua_pushfstring(L, "%s: short read at offset %f", path, off);
    return 2;
  }
  return 1;
}

/* T.__tide_deser(s): the object-store hook, inverse of __tide_ser. */
static int td__l_deser(lua_State *L) {
  size_t len;
  const char *s = luaL_checklstring(L, 1, &len);
  td_tensor_t *t = NULL;
  TD__TRY(L, "__tide_deser", td_tensor_deserialize(&t, s, len));
  td__tlua_push(L, t);
  return 1;
}

/* T.__tide_deser_raw(header, bytes, n [, holder, ctx]): the hook for tensors
 * sent with raw bytes (ser.h).  Given a holder, the bytes lie in the shared
 * store and are mapped in place, read-only, held until the last view goes. */
static int td__l_deser_raw(lua_State *L) {
  size_t hlen;
  const char *h = luaL_checklstring(L, 1, &hlen);
  luaL_checktype(L, 2, LUA_TLIGHTUSERDATA);
  const void *p = lua_touserdata(L, 2);
  size_t n = (size_t)luaL_checknumber(L, 3);
  const td_holder_t *hd = lua_islightuserdata(L, 4) ? lua_touserdata(L, 4) : NULL;
  void *ctx = lua_touserdata(L, 5);
  td_tensor_t *t = NULL;
  if (hd) hd->hold(ctx);
  int rc = td_tensor_from_parts(&t, h, hlen, p, n, hd ? hd->release : NULL, ctx);
  if (hd && (rc || !td_tensor_is_readonly(t))) hd->release(ctx, (void *)p);
  TD__TRY(L, "__tide_deser_raw", rc);
  td__tlua_push(L, t);
  return 1;
}

/* __tide_raw(t): header, bytes, length of a contiguous CPU tensor, sent
 * without a copy into a string; nil for others (they go through
 * __tide_ser). */
static int td__m_raw(lua_State *L) {
  td_tensor_t *t = td__tlua_check(L, 1);
  if (td_tensor_device(t) != TD_CPU || !td_tensor_is_contiguous(t)) return 0;
  char h[8 + 8 * TD_MAX_DIMS];
  lua_pushlstring(L, h, td_tensor_header(t, h));
  lua_pushlightuserdata(L, td_tensor_data(t));
  lua_pushnumber(L, (lua_Number)td_tensor_nbytes(t));
  return 3;
}
/* __tide_ser(t): header + raw bytes (moves CUDA tensors to the host). */
static int td__m_ser(lua_State *L) {
  td_tensor_t *t = td__tlua_check(L, 1);
  size_t n = td_tensor_serialized_size(t);
  luaL_Buffer b;
  luaL_buffinit(L, &b);
  if (n <= LUAL_BUFFERSIZE) {
    char *p = luaL_prepbuffer(&b);
    TD__TRY(L, "__tide_ser", td_tensor_serialize(t, p, n));
    luaL_addsize(&b, n);
    luaL_pushresult(&b);
    return 1;
  }
  /* Large: serialize into a scratch userdata, then intern the string. */
  void *tmp = lua_newuserdata(L, n);
  TD__TRY(L, "__tide_ser", td_tensor_serialize(t, tmp, n));
  lua_pushlstring(L, tmp, n);
  return 1;
}

/* -- Registration ----------------------------------------------------------------- */

const luaL_Reg td__tlua_new_funcs[] = {
    {"zeros", td__l_zeros},
    {"ones", td__l_ones},
    {"full", td__l_full},
    {"empty", td__l_empty},
    {"randn", td__l_randn},
    {"rand", td__l_rand},
    {"arange", td__l_arange},
    {"from_table", td__l_from_table},
    {"from_bytes", td__l_from_bytes},
    {"from_file", td__l_from_file},
    {"__tide_deser", td__l_deser},
    {"__tide_deser_raw", td__l_deser_raw},
    {NULL, NULL},
};

const luaL_Reg td__tlua_new_meta[] = {{"__tide_ser", td__m_ser}, {"__tide_raw", td__m_raw}, {NULL, NULL}};
