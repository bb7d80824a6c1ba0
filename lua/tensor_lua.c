/* Tide tensor Lua binding: the `tide.tensor` module (luaopen_tide_tensor).
 * Tensors are full userdata (metatable "tide.tensor", __gc) boxing a
 * td_tensor_t; ops validate shapes, dtypes and devices, then call the op
 * table of the tensors' device.  Uses tensor.h, ops.h, device.h.
 *
 * Errors: misuse (bad shapes, dtypes, devices, arguments) and failed device
 * work raise a Lua error "tide.tensor.<fn>: <message>"; no C resource is
 * held across a raise (temporaries are userdata, freed by the GC).
 * Dimensions and indices are 1-based as everywhere in Lua.
 */
#include <lauxlib.h>
#include <limits.h>
#include <lua.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "device.h"
#include "gpu_err.h"
#include "nccl_comm.h"
#include "ops.h"
#include "tensor.h"
#include "tensor_lua.h"
#include "ser.h"

#define TD__MT "tide.tensor"

/* -- Boxes, errors, GC pressure -------------------------------------------- */

typedef struct {
  td_tensor_t *t; /* owned; NULL after :free() */
} td__box_t;

/* Host bytes allocated since the last full collection that we asked for.
 * The Lua GC does not see tensor memory, so allocation-heavy scripts ask
 * for a collection once that much has been allocated again. */
static size_t td__pressure;
#define TD__PRESSURE_MIN ((size_t)64 << 20)

/* Raises "tide.tensor.<fn>: <message>[: <detail>]" for a failed call. */
__attribute__((noreturn)) static void td__raise(lua_State *L, const char *fn,
                                                int rc) {
  const char *d = td_gpu_last_detail();
  luaL_error(L, "tide.tensor.%s: %s%s%s", fn, td_gpu_strerror(rc),
             d[0] ? ": " : "", d);
  abort(); /* not reached: luaL_error does not return */
}

#define TD__TRY(L, fn, expr)           \
  do {                                 \
    int rc__ = (expr);                 \
    if (rc__) td__raise(L, fn, rc__);  \
  } while (0)

static td_tensor_t *td__check(lua_State *L, int idx) {
  td__box_t *b = luaL_checkudata(L, idx, TD__MT);
  if (!b->t) luaL_error(L, "tide.tensor: argument #%d is a freed tensor", idx);
  return b->t;
}

static int td__is_tensor(lua_State *L, int idx) {
  if (lua_type(L, idx) != LUA_TUSERDATA || !lua_getmetatable(L, idx)) return 0;
  luaL_getmetatable(L, TD__MT);
  int eq = lua_rawequal(L, -1, -2);
  lua_pop(L, 2);
  return eq;
}

/* Pushes a new userdata owning t (t may not be NULL). */
static td_tensor_t *td__push(lua_State *L, td_tensor_t *t) {
  td__box_t *b = lua_newuserdata(L, sizeof(*b));
  b->t = t;
  luaL_getmetatable(L, TD__MT);
  lua_setmetatable(L, -2);
  /* Device tensors count too: their memory is as invisible to the GC. */
  td__pressure += td_tensor_nbytes(t);
  size_t live = td_tensor_host_bytes();
  if (td__pressure > TD__PRESSURE_MIN && td__pressure > live) {
    td__pressure = 0;
    lua_gc(L, LUA_GCCOLLECT, 0);
  }
  return t;
}

/* -- Argument helpers ---------------------------------------------------------- */

static int td__opt_field(lua_State *L, int opts, const char *k) {
  if (lua_type(L, opts) != LUA_TTABLE) return 0;
  lua_getfield(L, opts, k);
  if (lua_isnil(L, -1)) {
    lua_pop(L, 1);
    return 0;
  }
  return 1; /* value left on the stack */
}

static double td__opt_num(lua_State *L, int opts, const char *k, double def) {
  if (!td__opt_field(L, opts, k)) return def;
  if (lua_type(L, -1) != LUA_TNUMBER)
    luaL_error(L, "tide.tensor: option '%s' must be a number", k);
  double v = lua_tonumber(L, -1);
  lua_pop(L, 1);
  return v;
}

static int td__opt_bool(lua_State *L, int opts, const char *k, int def) {
  if (!td__opt_field(L, opts, k)) return def;
  int v = lua_toboolean(L, -1);
  lua_pop(L, 1);
  return v;
}

static int td__opt_dtype(lua_State *L, int opts, int def) {
  if (!td__opt_field(L, opts, "dtype")) return def;
  const char *s = lua_tostring(L, -1);
  int d = s ? td_dtype_parse(s) : -TD_GPU_EDTYPE;
  if (d < 0) luaL_error(L, "tide.tensor: unknown dtype '%s'", s ? s : "?");
  lua_pop(L, 1);
  return d;
}

static int td__parse_device(lua_State *L, const char *s) {
  int dev;
  if (td_device_parse(s, &dev))
    luaL_error(L, "tide.tensor: unknown device '%s' (use \"cpu\" or \"cuda:N\")", s);
  return dev;
}

static int td__opt_device(lua_State *L, int opts, int def) {
  if (!td__opt_field(L, opts, "device")) return def;
  const char *s = lua_tostring(L, -1);
  if (!s) luaL_error(L, "tide.tensor: option 'device' must be a string");
  int dev = td__parse_device(L, s);
  lua_pop(L, 1);
  return dev;
}

/* Reads a shape table {d1, d2, ...} at idx into shape; returns ndim. */
static int td__shape_arg(lua_State *L, int idx, int64_t *shape) {
  luaL_checktype(L, idx, LUA_TTABLE);
  int n = (int)lua_objlen(L, idx);
  if (n > TD_MAX_DIMS) luaL_error(L, "tide.tensor: at most %d dimensions", TD_MAX_DIMS);
  for (int i = 0; i < n; i++) {
    lua_rawgeti(L, idx, i + 1);
    if (lua_type(L, -1) != LUA_TNUMBER)
      luaL_error(L, "tide.tensor: shape entries must be numbers");
    double v = lua_tonumber(L, -1);
    if (v != floor(v) || v < -1 || v > 1e15)
      luaL_error(L, "tide.tensor: bad shape entry %f", v);
    shape[i] = (int64_t)v;
    lua_pop(L, 1);
  }
  return n;
}

static void td__push_shape(lua_State *L, int ndim, const int64_t *shape) {
  lua_createtable(L, ndim, 0);
  for (int i = 0; i < ndim; i++) {
    lua_pushnumber(L, (lua_Number)shape[i]);
    lua_rawseti(L, -2, i + 1);
  }
}

static void td__shape_str(const td_tensor_t *t, char *buf, size_t n) {
  size_t o = 0;
  o += (size_t)snprintf(buf + o, n - o, "{");
  for (int i = 0; i < td_tensor_ndim(t) && o < n; i++)
    o += (size_t)snprintf(buf + o, n - o, "%s%lld", i ? ", " : "",
                          (long long)td_tensor_shape(t)[i]);
  if (o < n) snprintf(buf + o, n - o, "}");
}

/* The op table of t's device (loads the CUDA plugin for GPU tensors). */
static const td_ops_t *td__ops(lua_State *L, const char *fn, const td_tensor_t *t) {
  int err = 0;
  const td_ops_t *ops = td_device_ops(td_tensor_device(t), &err);
  if (!ops) td__raise(L, fn, err);
  return ops;
}

static void td__same_device(lua_State *L, const char *fn, const td_tensor_t *a,
                            const td_tensor_t *b) {
  if (b && td_tensor_device(a) != td_tensor_device(b)) {
    char x[16], y[16];
    td_device_format(td_tensor_device(a), x, sizeof(x));
    td_device_format(td_tensor_device(b), y, sizeof(y));
    luaL_error(L, "tide.tensor.%s: tensors are on different devices (%s and %s)",
               fn, x, y);
  }
}

static void td__want_dtype(lua_State *L, const char *fn, const td_tensor_t *t,
                           int dtype, const char *what) {
  if (td_tensor_dtype(t) != dtype)
    luaL_error(L, "tide.tensor.%s: %s must be %s, got %s", fn, what,
               td_dtype_name(dtype), td_dtype_name(td_tensor_dtype(t)));
}

/* Returns a contiguous version of the tensor at idx: itself, or a copy
 * pushed on the stack (collected later). */
static td_tensor_t *td__contig(lua_State *L, const char *fn, int idx) {
  td_tensor_t *t = td__check(L, idx);
  if (td_tensor_is_contiguous(t)) return t;
  td_tensor_t *c = NULL;
  TD__TRY(L, fn, td_tensor_contiguous(&c, t));
  return td__push(L, c);
}

/* Checked f32 contiguous input at idx on the device of ref (if given). */
static const float *td__in_f32(lua_State *L, const char *fn, int idx,
                               const td_tensor_t *ref, const char *what) {
  td_tensor_t *t = td__contig(L, fn, idx);
  td__want_dtype(L, fn, t, TD_F32, what);
  if (ref) td__same_device(L, fn, ref, t);
  return td_tensor_data(t);
}

static const int32_t *td__in_i32(lua_State *L, const char *fn, int idx,
                                 const td_tensor_t *ref, const char *what) {
  td_tensor_t *t = td__contig(L, fn, idx);
  td__want_dtype(L, fn, t, TD_I32, what);
  if (ref) td__same_device(L, fn, ref, t);
  return td_tensor_data(t);
}

/* A tensor the call writes: not one that maps an object in the store,
 * which every reader of that object shares. */
static td_tensor_t *td__mut(lua_State *L, const char *fn, int idx) {
  td_tensor_t *t = td__check(L, idx);
  if (td_tensor_is_readonly(t))
    luaL_error(L, "tide.tensor.%s: the tensor is read-only (it maps an object in the store; "
               "write to a :clone() of it)", fn);
  return t;
}

/* An output: opts[key] when given (checked: contiguous, dtype, device,
 * element count; pushed again) else a new tensor (zeroed when zero) pushed.
 * *given tells which. */
static td_tensor_t *td__out(lua_State *L, const char *fn, int opts,
                            const char *key, int dtype, int device, int ndim,
                            const int64_t *shape, int zero, int *given) {
  int64_t n = 1;
  for (int i = 0; i < ndim; i++) n *= shape[i];
  if (given) *given = 0;
  if (td__opt_field(L, opts, key)) {
    td_tensor_t *o = td__mut(L, fn, lua_gettop(L));
    if (!td_tensor_is_contiguous(o) || td_tensor_dtype(o) != dtype ||
        td_tensor_device(o) != device || td_tensor_numel(o) != n)
      luaL_error(L, "tide.tensor.%s: option '%s' must be a contiguous %s tensor "
                 "of %lld elements on the same device",
                 fn, key, td_dtype_name(dtype), (long long)n);
    if (given) *given = 1;
    return o;
  }
  td_tensor_t *t = NULL;
  TD__TRY(L, fn, zero ? td_tensor_zeros(&t, dtype, device, ndim, shape)
                      : td_tensor_empty(&t, dtype, device, ndim, shape));
  return td__push(L, t);
}

static int td__int_arg(lua_State *L, const char *fn, int64_t v, const char *what) {
  if (v < 0 || v > INT_MAX) luaL_error(L, "tide.tensor.%s: %s too large", fn, what);
  return (int)v;
}

/* -- Creation ---------------------------------------------------------------- */

static int td__new_filled(lua_State *L, const char *fn, int shape_idx,
                          int opts, double v, int zero) {
  int64_t shape[TD_MAX_DIMS];
  int ndim = td__shape_arg(L, shape_idx, shape);
  int dtype = td__opt_dtype(L, opts, TD_F32);
  int dev = td__opt_device(L, opts, TD_CPU);
  td_tensor_t *t = NULL;
  if (zero) {
    TD__TRY(L, fn, td_tensor_zeros(&t, dtype, dev, ndim, shape));
    td__push(L, t);
    return 1;
  }
  /* Fill on the host in the requested dtype, then move. */
  TD__TRY(L, fn, td_tensor_empty(&t, TD_F32, TD_CPU, ndim, shape));
  td__push(L, t);
  float *p = td_tensor_data(t);
  for (int64_t i = 0, n = td_tensor_numel(t); i < n; i++) p[i] = (float)v;
  if (dtype != TD_F32 || dev != TD_CPU) {
    td_tensor_t *o = NULL;
    TD__TRY(L, fn, td_tensor_to(&o, t, dev, dtype));
    td__push(L, o);
  }
  return 1;
}

/* T.zeros(shape [, {dtype, device}]) */
static int td_l_zeros(lua_State *L) { return td__new_filled(L, "zeros", 1, 2, 0, 1); }
/* T.ones(shape [, opts]) */
static int td_l_ones(lua_State *L) { return td__new_filled(L, "ones", 1, 2, 1, 0); }
/* T.full(shape, value [, opts]) */
static int td_l_full(lua_State *L) {
  return td__new_filled(L, "full", 1, 3, luaL_checknumber(L, 2), 0);
}
/* T.empty(shape [, opts]): contents unspecified. */
static int td_l_empty(lua_State *L) {
  int64_t shape[TD_MAX_DIMS];
  int ndim = td__shape_arg(L, 1, shape);
  td_tensor_t *t = NULL;
  TD__TRY(L, "empty", td_tensor_empty(&t, td__opt_dtype(L, 2, TD_F32),
                                      td__opt_device(L, 2, TD_CPU), ndim, shape));
  td__push(L, t);
  return 1;
}

/* Moves the f32 host tensor on top of the stack to opts' dtype/device. */
static int td__finish_host(lua_State *L, const char *fn, td_tensor_t *t, int opts) {
  int dtype = td__opt_dtype(L, opts, TD_F32);
  int dev = td__opt_device(L, opts, TD_CPU);
  if (dtype != td_tensor_dtype(t) || dev != TD_CPU) {
    td_tensor_t *o = NULL;
    TD__TRY(L, fn, td_tensor_to(&o, t, dev, dtype));
    td__push(L, o);
  }
  return 1;
}

/* T.randn(shape [, {seed = 0, mean = 0, std = 1, dtype, device}]) */
static int td_l_randn(lua_State *L) {
  int64_t shape[TD_MAX_DIMS];
  int ndim = td__shape_arg(L, 1, shape);
  double seed = td__opt_num(L, 2, "seed", 0);
  float mean = (float)td__opt_num(L, 2, "mean", 0);
  float std = (float)td__opt_num(L, 2, "std", 1);
  td_tensor_t *t = NULL;
  TD__TRY(L, "randn", td_tensor_empty(&t, TD_F32, TD_CPU, ndim, shape));
  td__push(L, t);
  td_rng_normal(td_tensor_data(t), td_tensor_numel(t), (uint64_t)(int64_t)seed,
                mean, std);
  return td__finish_host(L, "randn", t, 2);
}

/* T.rand(shape [, {seed = 0, low = 0, high = 1, dtype, device}]) */
static int td_l_rand(lua_State *L) {
  int64_t shape[TD_MAX_DIMS];
  int ndim = td__shape_arg(L, 1, shape);
  double seed = td__opt_num(L, 2, "seed", 0);
  float lo = (float)td__opt_num(L, 2, "low", 0);
  float hi = (float)td__opt_num(L, 2, "high", 1);
  td_tensor_t *t = NULL;
  TD__TRY(L, "rand", td_tensor_empty(&t, TD_F32, TD_CPU, ndim, shape));
  td__push(L, t);
  td_rng_fill_uniform(td_tensor_data(t), td_tensor_numel(t),
                      (uint64_t)(int64_t)seed, lo, hi);
  return td__finish_host(L, "rand", t, 2);
}

/* T.arange(n [, opts]) -> 0..n-1 (default dtype i32). */
static int td_l_arange(lua_State *L) {
  int64_t n = (int64_t)luaL_checknumber(L, 1);
  if (n < 0) luaL_error(L, "tide.tensor.arange: n must be >= 0");
  int dtype = td__opt_dtype(L, 2, TD_I32);
  int dev = td__opt_device(L, 2, TD_CPU);
  td_tensor_t *t = NULL;
  TD__TRY(L, "arange", td_tensor_empty(&t, TD_I32, TD_CPU, 1, &n));
  td__push(L, t);
  int32_t *p = td_tensor_data(t);
  for (int64_t i = 0; i < n; i++) p[i] = (int32_t)i;
  if (dtype != TD_I32 || dev != TD_CPU) {
    td_tensor_t *o = NULL;
    TD__TRY(L, "arange", td_tensor_to(&o, t, dev, dtype));
    td__push(L, o);
  }
  return 1;
}

/* Infers the shape of a nested table at idx. */
static int td__table_shape(lua_State *L, int idx, int64_t *shape) {
  int ndim = 0;
  lua_pushvalue(L, idx);
  while (lua_type(L, -1) == LUA_TTABLE) {
    if (ndim == TD_MAX_DIMS)
      luaL_error(L, "tide.tensor.from_table: more than %d levels", TD_MAX_DIMS);
    shape[ndim++] = (int64_t)lua_objlen(L, -1);
    if (lua_objlen(L, -1) == 0) break;
    lua_rawgeti(L, -1, 1);
    lua_remove(L, -2);
  }
  lua_pop(L, 1);
  return ndim;
}

static void td__table_fill(lua_State *L, int idx, int dim, int ndim,
                           const int64_t *shape, float *out, int64_t *pos) {
  if (dim == ndim) {
    if (lua_type(L, idx) != LUA_TNUMBER)
      luaL_error(L, "tide.tensor.from_table: non-numeric element");
    out[(*pos)++] = (float)lua_tonumber(L, idx);
    return;
  }
  if (lua_type(L, idx) != LUA_TTABLE || (int64_t)lua_objlen(L, idx) != shape[dim])
    luaL_error(L, "tide.tensor.from_table: ragged nested table at depth %d", dim + 1);
  for (int64_t i = 0; i < shape[dim]; i++) {
    lua_rawgeti(L, idx, (int)i + 1);
    td__table_fill(L, lua_gettop(L), dim + 1, ndim, shape, out, pos);
    lua_pop(L, 1);
  }
}

/* T.from_table(nested [, {dtype = "f32", device}]) */
static int td_l_from_table(lua_State *L) {
  int64_t shape[TD_MAX_DIMS];
  int ndim = lua_type(L, 1) == LUA_TNUMBER ? 0 : td__table_shape(L, 1, shape);
  if (lua_type(L, 1) != LUA_TNUMBER) luaL_checktype(L, 1, LUA_TTABLE);
  td_tensor_t *t = NULL;
  TD__TRY(L, "from_table", td_tensor_empty(&t, TD_F32, TD_CPU, ndim, shape));
  td__push(L, t);
  int64_t pos = 0;
  td__table_fill(L, 1, 0, ndim, shape, td_tensor_data(t), &pos);
  return td__finish_host(L, "from_table", t, 2);
}

/* T.from_bytes(s, shape [, dtype = "f32"]): copies raw little-endian bytes. */
static int td_l_from_bytes(lua_State *L) {
  size_t len;
  const char *s = luaL_checklstring(L, 1, &len);
  int64_t shape[TD_MAX_DIMS];
  int ndim = td__shape_arg(L, 2, shape);
  int dtype = TD_F32;
  if (!lua_isnoneornil(L, 3)) {
    dtype = td_dtype_parse(luaL_checkstring(L, 3));
    if (dtype < 0) luaL_error(L, "tide.tensor.from_bytes: unknown dtype");
  }
  td_tensor_t *t = NULL;
  TD__TRY(L, "from_bytes", td_tensor_empty(&t, dtype, TD_CPU, ndim, shape));
  td__push(L, t);
  if (td_tensor_nbytes(t) != len)
    luaL_error(L, "tide.tensor.from_bytes: %d bytes given, shape needs %d",
               (int)len, (int)td_tensor_nbytes(t));
  memcpy(td_tensor_data(t), s, len);
  return 1;
}

/* T.from_file(path, offset, shape [, dtype = "f32"]): reads the raw bytes
 * at offset of a file straight into a new tensor (checkpoint loading without
 * a Lua string copy).  Returns nil, err when the file cannot be read. */
static int td_l_from_file(lua_State *L) {
  const char *path = luaL_checkstring(L, 1);
  double off = luaL_checknumber(L, 2);
  int64_t shape[TD_MAX_DIMS];
  int ndim = td__shape_arg(L, 3, shape);
  int dtype = TD_F32;
  if (!lua_isnoneornil(L, 4)) {
    dtype = td_dtype_parse(luaL_checkstring(L, 4));
    if (dtype < 0) luaL_error(L, "tide.tensor.from_file: unknown dtype");
  }
  if (off < 0) luaL_error(L, "tide.tensor.from_file: negative offset");
  td_tensor_t *t = NULL;
  TD__TRY(L, "from_file", td_tensor_empty(&t, dtype, TD_CPU, ndim, shape));
  td__push(L, t);
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
static int td_l_deser(lua_State *L) {
  size_t len;
  const char *s = luaL_checklstring(L, 1, &len);
  td_tensor_t *t = NULL;
  TD__TRY(L, "__tide_deser", td_tensor_deserialize(&t, s, len));
  td__push(L, t);
  return 1;
}

/* T.__tide_deser_raw(header, bytes, n [, holder, ctx]): the hook for tensors
 * sent with raw bytes (ser.h).  Given a holder, the bytes lie in the shared
 * store and are mapped in place, read-only, held until the last view goes. */
static int td_l_deser_raw(lua_State *L) {
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
  td__push(L, t);
  return 1;
}

/* __tide_raw(t): header, bytes, length of a contiguous CPU tensor, sent
 * without a copy into a string; nil for others (they go through
 * __tide_ser). */
static int td_m_raw(lua_State *L) {
  td_tensor_t *t = td__check(L, 1);
  if (td_tensor_device(t) != TD_CPU || !td_tensor_is_contiguous(t)) return 0;
  char h[8 + 8 * TD_MAX_DIMS];
  lua_pushlstring(L, h, td_tensor_header(t, h));
  lua_pushlightuserdata(L, td_tensor_data(t));
  lua_pushnumber(L, (lua_Number)td_tensor_nbytes(t));
  return 3;
}

/* -- Methods: metadata ----------------------------------------------------- */

static int td_m_shape(lua_State *L) {
  td_tensor_t *t = td__check(L, 1);
  td__push_shape(L, td_tensor_ndim(t), td_tensor_shape(t));
  return 1;
}

static int td_m_size(lua_State *L) { /* t:size(dim) */
  td_tensor_t *t = td__check(L, 1);
  int d = (int)luaL_checkinteger(L, 2);
  if (d < 0) d += td_tensor_ndim(t) + 1;
  if (d < 1 || d > td_tensor_ndim(t)) luaL_error(L, "tide.tensor.size: bad dimension %d", d);
  lua_pushnumber(L, (lua_Number)td_tensor_shape(t)[d - 1]);
  return 1;
}

static int td_m_strides(lua_State *L) {
  td_tensor_t *t = td__check(L, 1);
  td__push_shape(L, td_tensor_ndim(t), td_tensor_strides(t));
  return 1;
}

static int td_m_dtype(lua_State *L) {
  lua_pushstring(L, td_dtype_name(td_tensor_dtype(td__check(L, 1))));
  return 1;
}

static int td_m_device(lua_State *L) {
  char buf[16];
  td_device_format(td_tensor_device(td__check(L, 1)), buf, sizeof(buf));
  lua_pushstring(L, buf);
  return 1;
}

static int td_m_numel(lua_State *L) {
  lua_pushnumber(L, (lua_Number)td_tensor_numel(td__check(L, 1)));
  return 1;
}

static int td_m_nbytes(lua_State *L) {
  lua_pushnumber(L, (lua_Number)td_tensor_nbytes(td__check(L, 1)));
  return 1;
}

static int td_m_dim(lua_State *L) {
  lua_pushinteger(L, td_tensor_ndim(td__check(L, 1)));
  return 1;
}

static int td_m_is_contiguous(lua_State *L) {
  lua_pushboolean(L, td_tensor_is_contiguous(td__check(L, 1)));
  return 1;
}

static int td_m_tostring(lua_State *L) {
  td__box_t *b = luaL_checkudata(L, 1, TD__MT);
  if (!b->t) {
    lua_pushstring(L, "tensor(freed)");
    return 1;
  }
  char sh[160], dev[16];
  td__shape_str(b->t, sh, sizeof(sh));
  td_device_format(td_tensor_device(b->t), dev, sizeof(dev));
  lua_pushfstring(L, "tensor(%s, %s, %s)", sh, td_dtype_name(td_tensor_dtype(b->t)), dev);
  return 1;
}

static int td_m_gc(lua_State *L) {
  td__box_t *b = luaL_checkudata(L, 1, TD__MT);
  td_tensor_free(&b->t);
  return 0;
}

/* t:free(): releases the tensor now; later use raises. */
static int td_m_free(lua_State *L) { return td_m_gc(L); }

/* -- Methods: views ---------------------------------------------------------- */

static int td_m_view(lua_State *L) {
  td_tensor_t *t = td__check(L, 1), *v = NULL;
  int64_t shape[TD_MAX_DIMS];
  int ndim = td__shape_arg(L, 2, shape);
  if (!td_tensor_is_contiguous(t))
    luaL_error(L, "tide.tensor.view: tensor is not contiguous (use :reshape)");
  TD__TRY(L, "view", td_tensor_view(&v, t, ndim, shape));
  td__push(L, v);
  return 1;
}

static int td_m_reshape(lua_State *L) {
  td_tensor_t *t = td__contig(L, "reshape", 1), *v = NULL;
  int64_t shape[TD_MAX_DIMS];
  int ndim = td__shape_arg(L, 2, shape);
  TD__TRY(L, "reshape", td_tensor_view(&v, t, ndim, shape));
  td__push(L, v);
  return 1;
}

static int td__dim_arg(lua_State *L, const td_tensor_t *t, int idx) {
  int d = (int)luaL_checkinteger(L, idx);
  if (d < 0) d += td_tensor_ndim(t) + 1;
  if (d < 1 || d > td_tensor_ndim(t))
    luaL_error(L, "tide.tensor: dimension %d out of range 1..%d", d, td_tensor_ndim(t));
  return d - 1;
}

/* t:slice(dim, start [, stop]): 1-based, inclusive, a view. */
static int td_m_slice(lua_State *L) {
  td_tensor_t *t = td__check(L, 1), *v = NULL;
  int d = td__dim_arg(L, t, 2);
  int64_t n = td_tensor_shape(t)[d];
  int64_t start = (int64_t)luaL_checknumber(L, 3);
  int64_t stop = lua_isnoneornil(L, 4) ? n : (int64_t)luaL_checknumber(L, 4);
  if (start < 1 || stop > n || stop < start - 1)
    luaL_error(L, "tide.tensor.slice: range %d..%d out of 1..%d", (int)start,
               (int)stop, (int)n);
  TD__TRY(L, "slice", td_tensor_slice(&v, t, d, start - 1, stop));
  td__push(L, v);
  return 1;
}

/* t:transpose([d1, d2]): swaps two dims (default the last two), a view. */
static int td_m_transpose(lua_State *L) {
  td_tensor_t *t = td__check(L, 1), *v = NULL;
  if (td_tensor_ndim(t) < 2 && lua_isnoneornil(L, 2))
    luaL_error(L, "tide.tensor.transpose: needs at least 2 dimensions");
  int d0 = lua_isnoneornil(L, 2) ? td_tensor_ndim(t) - 2 : td__dim_arg(L, t, 2);
  int d1 = lua_isnoneornil(L, 3) ? td_tensor_ndim(t) - 1 : td__dim_arg(L, t, 3);
  TD__TRY(L, "transpose", td_tensor_transpose(&v, t, d0, d1));
  td__push(L, v);
  return 1;
}

static int td_m_contiguous(lua_State *L) {
  td_tensor_t *t = td__check(L, 1), *c = NULL;
  if (td_tensor_is_contiguous(t)) {
    lua_settop(L, 1);
    return 1;
  }
  TD__TRY(L, "contiguous", td_tensor_contiguous(&c, t));
  td__push(L, c);
  return 1;
}

static int td_m_clone(lua_State *L) {
  td_tensor_t *t = td__check(L, 1), *c = NULL;
  TD__TRY(L, "clone", td_tensor_clone(&c, t));
  td__push(L, c);
  return 1;
}

/* t:to(target [, target2]): targets are devices ("cpu", "cuda:0") or dtypes
 * ("f32", "bf16", ...).  Always returns a new tensor. */
static int td_m_to(lua_State *L) {
  td_tensor_t *t = td__check(L, 1), *o = NULL;
  int dev = td_tensor_device(t), dtype = td_tensor_dtype(t);
  for (int i = 2; i <= 3 && !lua_isnoneornil(L, i); i++) {
    const char *s = luaL_checkstring(L, i);
    int d = td_dtype_parse(s);
    if (d >= 0)
      dtype = d;
    else
      dev = td__parse_device(L, s);
  }
  if (dev != TD_CPU && dev != td_tensor_device(t)) {
    int err = 0;
    if (!td_cuda_plugin(&err)) {
      const char *why = td_gpu_last_detail();
      luaL_error(L, "tide.tensor.to: cannot move to cuda:%d: %s%s%s%s", dev,
                        td_gpu_strerror(err), why[0] ? " (" : "", why,
                 why[0] ? ")" : "");
    }
  }
  TD__TRY(L, "to", td_tensor_to(&o, t, dev, dtype));
  td__push(L, o);
  return 1;
}

/* t:copy(src): copies src's elements into t (any device/dtype); returns t. */
static int td_m_copy(lua_State *L) {
  td_tensor_t *t = td__mut(L, "copy", 1), *s = td__check(L, 2);
  TD__TRY(L, "copy", td_tensor_copy(t, s));
  lua_settop(L, 1);
  return 1;
}

/* t:fill(v) in place (contiguous f32/i32); returns t. */
static int td_m_fill(lua_State *L) {
  td_tensor_t *t = td__mut(L, "fill", 1);
  double v = luaL_checknumber(L, 2);
  if (!td_tensor_is_contiguous(t)) luaL_error(L, "tide.tensor.fill: tensor not contiguous");
  TD__TRY(L, "fill", td_tensor_fill(t, v));
  lua_settop(L, 1);
  return 1;
}

static int td_m_zero(lua_State *L) {
  lua_settop(L, 1);
  lua_pushnumber(L, 0);
  return td_m_fill(L);
}

/* Host f32 copy of t (pushed), for reading elements. */
static const float *td__host_f32(lua_State *L, const char *fn, td_tensor_t *t) {
  if (td_tensor_device(t) == TD_CPU && td_tensor_dtype(t) == TD_F32 &&
      td_tensor_is_contiguous(t))
    return td_tensor_data(t);
  td_tensor_t *h = NULL;
  TD__TRY(L, fn, td_tensor_to(&h, t, TD_CPU, TD_F32));
  td__push(L, h);
  return td_tensor_data(h);
}

/* Builds nested tables from contiguous host data: f32, or i64 when ints. */
static void td__to_table(lua_State *L, const void *p, int ints, int dim,
                         int ndim, const int64_t *shape, int64_t *pos) {
  if (dim == ndim) {
    if (ints)
      lua_pushnumber(L, (lua_Number)((const int64_t *)p)[(*pos)++]);
    else
      lua_pushnumber(L, ((const float *)p)[(*pos)++]);
    return;
  }
  lua_createtable(L, (int)shape[dim], 0);
  for (int64_t i = 0; i < shape[dim]; i++) {
    td__to_table(L, p, ints, dim + 1, ndim, shape, pos);
    lua_rawseti(L, -2, (int)i + 1);
  }
}

/* t:to_table(): nested tables of numbers (a number for 0-d). */
static int td_m_to_table(lua_State *L) {
  td_tensor_t *t = td__check(L, 1);
  int64_t pos = 0;
  int dt = td_tensor_dtype(t);
  int ints = dt == TD_I32 || dt == TD_I64 || dt == TD_U8;
  const void *p;
  if (ints) { /* through i64 so that large integers survive */
    td_tensor_t *h = NULL;
    TD__TRY(L, "to_table", td_tensor_to(&h, t, TD_CPU, TD_I64));
    td__push(L, h);
    p = td_tensor_data(h);
  } else {
    p = td__host_f32(L, "to_table", t);
  }
  lua_checkstack(L, td_tensor_ndim(t) + 4);
  td__to_table(L, p, ints, 0, td_tensor_ndim(t), td_tensor_shape(t), &pos);
  return 1;
}

/* t:to_bytes(): the raw contiguous element bytes as a string (host copy). */
static int td_m_to_bytes(lua_State *L) {
  td_tensor_t *t = td__check(L, 1);
  if (td_tensor_device(t) == TD_CPU && td_tensor_is_contiguous(t)) {
    lua_pushlstring(L, td_tensor_data(t), td_tensor_nbytes(t));
    return 1;
  }
  td_tensor_t *h = NULL;
  TD__TRY(L, "to_bytes", td_tensor_to(&h, t, TD_CPU, td_tensor_dtype(t)));
  td__push(L, h);
  lua_pushlstring(L, td_tensor_data(h), td_tensor_nbytes(h));
  return 1;
}

/* __tide_ser(t): header + raw bytes (moves CUDA tensors to the host). */
static int td_m_ser(lua_State *L) {
  td_tensor_t *t = td__check(L, 1);
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

/* Flat element offset from 1-based indices at stack idx.. (count = ndim). */
static int64_t td__elem_offset(lua_State *L, const td_tensor_t *t, int idx,
                               const char *fn) {
  int nd = td_tensor_ndim(t);
  int64_t off = 0;
  for (int d = 0; d < nd; d++) {
    int64_t i = (int64_t)luaL_checknumber(L, idx + d);
    if (i < 1 || i > td_tensor_shape(t)[d])
      luaL_error(L, "tide.tensor.%s: index %d out of range in dimension %d", fn,
                 (int)i, d + 1);
    off += (i - 1) * td_tensor_strides(t)[d];
  }
  return off;
}

/* t:get(i, j, ...) -> number (host tensors; 1-based). */
static int td_m_get(lua_State *L) {
  td_tensor_t *t = td__check(L, 1);
  if (lua_gettop(L) - 1 != td_tensor_ndim(t))
    luaL_error(L, "tide.tensor.get: expected %d indices", td_tensor_ndim(t));
  if (td_tensor_device(t) != TD_CPU)
    luaL_error(L, "tide.tensor.get: tensor is not on the cpu (use :to(\"cpu\"))");
  int64_t off = td__elem_offset(L, t, 2, "get");
  const char *p = td_tensor_data(t);
  double v;
  switch (td_tensor_dtype(t)) {
    case TD_F32: v = ((const float *)p)[off]; break;
    case TD_I32: v = ((const int32_t *)p)[off]; break;
    case TD_I64: v = (double)((const int64_t *)p)[off]; break;
    case TD_U8: v = ((const uint8_t *)p)[off]; break;
    default: {
      float f;
      td_cpu_ops.convert(&f, TD_F32, p + off * 2, td_tensor_dtype(t), 1);
      v = f;
    }
  }
  lua_pushnumber(L, v);
  return 1;
}

/* t:set(i, j, ..., v) (host tensors; 1-based). */
static int td_m_set(lua_State *L) {
  td_tensor_t *t = td__mut(L, "set", 1);
  if (lua_gettop(L) - 2 != td_tensor_ndim(t))
    luaL_error(L, "tide.tensor.set: expected %d indices and a value", td_tensor_ndim(t));
  if (td_tensor_device(t) != TD_CPU)
    luaL_error(L, "tide.tensor.set: tensor is not on the cpu");
  int64_t off = td__elem_offset(L, t, 2, "set");
  double v = luaL_checknumber(L, lua_gettop(L));
  float f = (float)v;
  char *p = td_tensor_data(t);
  switch (td_tensor_dtype(t)) {
    case TD_F32: ((float *)p)[off] = f; break;
    case TD_I32: ((int32_t *)p)[off] = (int32_t)v; break;
    case TD_I64: ((int64_t *)p)[off] = (int64_t)v; break;
    case TD_U8: ((uint8_t *)p)[off] = (uint8_t)v; break;
    default: td_cpu_ops.convert(p + off * 2, td_tensor_dtype(t), &f, TD_F32, 1);
  }
  return 0;
}

/* t:item(): the value of a one-element tensor. */
static int td_m_item(lua_State *L) {
  td_tensor_t *t = td__check(L, 1);
  if (td_tensor_numel(t) != 1)
    luaL_error(L, "tide.tensor.item: tensor has %d elements, not 1", (int)td_tensor_numel(t));
  td_tensor_t *h = NULL;
  TD__TRY(L, "item", td_tensor_to(&h, t, TD_CPU, TD_I64 == td_tensor_dtype(t) ? TD_I64 : TD_F32));
  td__push(L, h);
  if (td_tensor_dtype(h) == TD_I64)
    lua_pushnumber(L, (lua_Number) * (int64_t *)td_tensor_data(h));
  else
    lua_pushnumber(L, *(float *)td_tensor_data(h));
  return 1;
}

/* -- Ops: linear algebra ------------------------------------------------------ */

/* T.matmul(a, b [, {trans_a, trans_b, alpha = 1, beta = 0, out}])
 * a (..., K) @ b (K, N) -> (..., N); or batched a (B,M,K) @ b (B,K,N).
 * trans_a needs a 2-D a stored (K, M); trans_b takes b stored (N, K). */
static int td_l_matmul(lua_State *L) {
  const char *fn = "matmul";
  td_tensor_t *a = td__contig(L, fn, 1), *b = td__contig(L, fn, 2);
  td__same_device(L, fn, a, b);
  int dtype = td_tensor_dtype(a);
  if (td_tensor_dtype(b) != dtype)
    luaL_error(L, "tide.tensor.matmul: dtypes differ (%s and %s)",
               td_dtype_name(dtype), td_dtype_name(td_tensor_dtype(b)));
  int ta = td__opt_bool(L, 3, "trans_a", 0), tb = td__opt_bool(L, 3, "trans_b", 0);
  float alpha = (float)td__opt_num(L, 3, "alpha", 1);
  float beta = (float)td__opt_num(L, 3, "beta", 0);
  int an = td_tensor_ndim(a), bn = td_tensor_ndim(b);
  const int64_t *as = td_tensor_shape(a), *bs = td_tensor_shape(b);
  int64_t batch = 1, M, K, K2, N, oshape[TD_MAX_DIMS];
  int on;
  if (an == 3 && bn == 3) {
    if (as[0] != bs[0]) luaL_error(L, "tide.tensor.matmul: batch sizes differ");
    batch = as[0];
    M = ta ? as[2] : as[1];
    K = ta ? as[1] : as[2];
    K2 = tb ? bs[2] : bs[1];
    N = tb ? bs[1] : bs[2];
    on = 3;
    oshape[0] = batch;
    oshape[1] = M;
    oshape[2] = N;
  } else {
    if (bn != 2) luaL_error(L, "tide.tensor.matmul: b must be 2-D (or both 3-D)");
    if (an < 1) luaL_error(L, "tide.tensor.matmul: a must have at least 1 dimension");
    if (ta && an != 2) luaL_error(L, "tide.tensor.matmul: trans_a needs a 2-D a");
    K2 = tb ? bs[1] : bs[0];
    N = tb ? bs[0] : bs[1];
    if (ta) {
      K = as[0];
      M = as[1];
      on = 2;
      oshape[0] = M;
    } else {
      K = as[an - 1];
      M = K ? td_tensor_numel(a) / K : 0;
      on = an;
      for (int i = 0; i < an - 1; i++) oshape[i] = as[i];
    }
    oshape[on - 1] = N;
  }
  if (K != K2) {
    char x[160], y[160];
    td__shape_str(a, x, sizeof(x));
    td__shape_str(b, y, sizeof(y));
    luaL_error(L, "tide.tensor.matmul: inner dimensions differ: %s @ %s%s", x, y,
               ta || tb ? " (with transposes)" : "");
  }
  int given;
  td_tensor_t *o = td__out(L, fn, 3, "out", TD_F32, td_tensor_device(a), on,
                           oshape, 0, &given);
  if (beta != 0 && !given) luaL_error(L, "tide.tensor.matmul: beta needs an 'out' tensor");
  const td_ops_t *ops = td__ops(L, fn, a);
  size_t es = td_dtype_size(dtype);
  int m = td__int_arg(L, fn, M, "M"), n = td__int_arg(L, fn, N, "N"),
      k = td__int_arg(L, fn, K, "K");
  for (int64_t i = 0; i < batch; i++)
    TD__TRY(L, fn, ops->matmul(dtype, (float *)td_tensor_data(o) + i * M * N,
                               (const char *)td_tensor_data(a) + (size_t)(i * M * K) * es,
                               (const char *)td_tensor_data(b) + (size_t)(i * K * N) * es,
                               m, n, k, ta, tb, alpha, beta));
  return 1;
}

/* -- Ops: elementwise ---------------------------------------------------------- */

/* Period of b broadcast against a: b's shape (minus leading 1s) must be a
 * suffix of a's shape. */
static int64_t td__bcast(lua_State *L, const char *fn, const td_tensor_t *a,
                         const td_tensor_t *b) {
  int an = td_tensor_ndim(a), bn = td_tensor_ndim(b);
  const int64_t *as = td_tensor_shape(a), *bs = td_tensor_shape(b);
  int skip = 0;
  while (skip < bn && bs[skip] == 1) skip++;
  int ok = bn - skip <= an;
  for (int i = 0; ok && i < bn - skip; i++)
    ok = bs[bn - 1 - i] == as[an - 1 - i];
  if (!ok) {
    char x[160], y[160];
    td__shape_str(a, x, sizeof(x));
    td__shape_str(b, y, sizeof(y));
    luaL_error(L, "tide.tensor.%s: shape %s does not broadcast to %s", fn, y, x);
  }
  return td_tensor_numel(b);
}

/* Tensor argument, or a number turned into a 1-element tensor on ref's device. */
static td_tensor_t *td__tensor_or_scalar(lua_State *L, const char *fn, int idx,
                                         const td_tensor_t *ref) {
  if (lua_type(L, idx) != LUA_TNUMBER) return td__contig(L, fn, idx);
  td_tensor_t *h = NULL, *d = NULL;
  TD__TRY(L, fn, td_tensor_empty(&h, TD_F32, TD_CPU, 0, NULL));
  td__push(L, h);
  *(float *)td_tensor_data(h) = (float)lua_tonumber(L, idx);
  if (td_tensor_device(ref) == TD_CPU) return h;
  TD__TRY(L, fn, td_tensor_to(&d, h, td_tensor_device(ref), TD_F32));
  return td__push(L, d);
}

static int td__add(lua_State *L, const char *fn, float alpha, float beta) {
  td_tensor_t *a = td__contig(L, fn, 1);
  td__want_dtype(L, fn, a, TD_F32, "a");
  td_tensor_t *b = td__tensor_or_scalar(L, fn, 2, a);
  td__want_dtype(L, fn, b, TD_F32, "b");
  td__same_device(L, fn, a, b);
  int64_t nb = td__bcast(L, fn, a, b);
  alpha *= (float)td__opt_num(L, 3, "alpha", 1);
  beta *= (float)td__opt_num(L, 3, "beta", 1);
  td_tensor_t *o = td__out(L, fn, 3, "out", TD_F32, td_tensor_device(a),
                           td_tensor_ndim(a), td_tensor_shape(a), 0, NULL);
  const td_ops_t *ops = td__ops(L, fn, a);
  if (td_tensor_numel(a) > 0)
    TD__TRY(L, fn, ops->add(td_tensor_data(o), td_tensor_data(a), td_tensor_data(b),
                            td_tensor_numel(a), nb, alpha, beta));
  return 1;
}

/* T.add(a, b [, {alpha = 1, beta = 1, out}]) -> alpha*a + beta*b (b broadcasts). */
static int td_l_add(lua_State *L) { return td__add(L, "add", 1, 1); }
/* T.sub(a, b [, opts]) -> a - b. */
static int td_l_sub(lua_State *L) { return td__add(L, "sub", 1, -1); }

/* T.mul(a, b [, {out}]) -> a * b elementwise (b broadcasts, or a number). */
static int td_l_mul(lua_State *L) {
  const char *fn = "mul";
  td_tensor_t *a = td__contig(L, fn, 1);
  td__want_dtype(L, fn, a, TD_F32, "a");
  td_tensor_t *b = td__tensor_or_scalar(L, fn, 2, a);
  td__want_dtype(L, fn, b, TD_F32, "b");
  td__same_device(L, fn, a, b);
  int64_t nb = td__bcast(L, fn, a, b);
  td_tensor_t *o = td__out(L, fn, 3, "out", TD_F32, td_tensor_device(a),
                           td_tensor_ndim(a), td_tensor_shape(a), 0, NULL);
  const td_ops_t *ops = td__ops(L, fn, a);
  if (td_tensor_numel(a) > 0)
    TD__TRY(L, fn, ops->mul(td_tensor_data(o), td_tensor_data(a), td_tensor_data(b),
                            td_tensor_numel(a), nb));
  return 1;
}

/* T.scale(a, s [, {out}]) -> s * a. */
static int td_l_scale(lua_State *L) {
  const char *fn = "scale";
  td_tensor_t *a = td__contig(L, fn, 1);
  td__want_dtype(L, fn, a, TD_F32, "a");
  float s = (float)luaL_checknumber(L, 2);
  td_tensor_t *o = td__out(L, fn, 3, "out", TD_F32, td_tensor_device(a),
                           td_tensor_ndim(a), td_tensor_shape(a), 0, NULL);
  const td_ops_t *ops = td__ops(L, fn, a);
  int64_t n = td_tensor_numel(a);
  if (n > 0)
    TD__TRY(L, fn, ops->add(td_tensor_data(o), td_tensor_data(a), td_tensor_data(a),
                            n, n, s, 0));
  return 1;
}

/* T.sum_rows(x [, {out, accumulate}]) -> (last dim): sums over all leading
 * dimensions (bias gradients). */
static int td_l_sum_rows(lua_State *L) {
  const char *fn = "sum_rows";
  td_tensor_t *x = td__contig(L, fn, 1);
  td__want_dtype(L, fn, x, TD_F32, "x");
  if (td_tensor_ndim(x) < 1) luaL_error(L, "tide.tensor.sum_rows: x must have a dimension");
  int64_t cols = td_tensor_shape(x)[td_tensor_ndim(x) - 1];
  int64_t rows = cols ? td_tensor_numel(x) / cols : 0;
  int accum = td__opt_bool(L, 2, "accumulate", 0);
  td_tensor_t *o = td__out(L, fn, 2, "out", TD_F32, td_tensor_device(x), 1, &cols,
                           0, NULL);
  TD__TRY(L, fn, td__ops(L, fn, x)->sum_rows(td_tensor_data(o), td_tensor_data(x),
                                             rows, cols, accum));
  return 1;
}

/* T.mul_backward(dout, a, b [, {accumulate, da, db}]) -> da, db for out = a*b
 * (db summed back to b's broadcast shape). */
static int td_l_mul_backward(lua_State *L) {
  const char *fn = "mul_backward";
  td_tensor_t *dy = td__contig(L, fn, 1), *a = td__contig(L, fn, 2),
              *b = td__contig(L, fn, 3);
  td__want_dtype(L, fn, dy, TD_F32, "dout");
  td__same_device(L, fn, dy, a);
  td__same_device(L, fn, dy, b);
  if (td_tensor_numel(dy) != td_tensor_numel(a))
    luaL_error(L, "tide.tensor.mul_backward: dout and a differ in size");
  int64_t nb = td__bcast(L, fn, a, b), n = td_tensor_numel(a);
  int accum = td__opt_bool(L, 4, "accumulate", 0);
  const td_ops_t *ops = td__ops(L, fn, a);
  td_tensor_t *tmp = NULL;
  TD__TRY(L, fn, td_tensor_empty(&tmp, TD_F32, td_tensor_device(a), td_tensor_ndim(a),
                                 td_tensor_shape(a)));
  td__push(L, tmp);
  int dai = 0;
  td_tensor_t *da = td__out(L, fn, 4, "da", TD_F32, td_tensor_device(a),
                            td_tensor_ndim(a), td_tensor_shape(a), 0, NULL);
  dai = lua_gettop(L);
  td_tensor_t *db = td__out(L, fn, 4, "db", TD_F32, td_tensor_device(a),
                            td_tensor_ndim(b), td_tensor_shape(b), 0, NULL);
  if (n > 0) {
    /* da (+)= dy * b */
    TD__TRY(L, fn, ops->mul(td_tensor_data(tmp), td_tensor_data(dy), td_tensor_data(b), n, nb));
    if (accum)
      TD__TRY(L, fn, ops->add(td_tensor_data(da), td_tensor_data(da), td_tensor_data(tmp), n, n, 1, 1));
    else
      TD__TRY(L, fn, ops->add(td_tensor_data(da), td_tensor_data(tmp), td_tensor_data(tmp), n, n, 1, 0));
    /* db (+)= sum over rows of dy * a */
    TD__TRY(L, fn, ops->mul(td_tensor_data(tmp), td_tensor_data(dy), td_tensor_data(a), n, n));
    TD__TRY(L, fn, ops->sum_rows(td_tensor_data(db), td_tensor_data(tmp), n / nb, nb, accum));
  }
  lua_pushvalue(L, dai);
  lua_insert(L, -2);
  return 2;
}

static double td__sum(lua_State *L, const char *fn, int idx) {
  td_tensor_t *x = td__contig(L, fn, idx);
  td__want_dtype(L, fn, x, TD_F32, "x");
  double s = 0;
  TD__TRY(L, fn, td__ops(L, fn, x)->sum(&s, td_tensor_data(x), td_tensor_numel(x)));
  return s;
}

/* T.sum(x) -> number (accumulated in double). */
static int td_l_sum(lua_State *L) {
  lua_pushnumber(L, td__sum(L, "sum", 1));
  return 1;
}

/* T.dot(a, b) -> number: sum of a * b over all elements (same numel). */
static int td_l_dot(lua_State *L) {
  const char *fn = "dot";
  td_tensor_t *a = td__contig(L, fn, 1), *b = td__contig(L, fn, 2);
  td__want_dtype(L, fn, a, TD_F32, "a");
  td__want_dtype(L, fn, b, TD_F32, "b");
  td__same_device(L, fn, a, b);
  if (td_tensor_numel(a) != td_tensor_numel(b))
    luaL_error(L, "tide.tensor.dot: sizes differ (%d and %d)", (int)td_tensor_numel(a),
               (int)td_tensor_numel(b));
  double s = 0;
  TD__TRY(L, fn, td__ops(L, fn, a)->dot(&s, td_tensor_data(a), td_tensor_data(b),
                                        td_tensor_numel(a)));
  lua_pushnumber(L, s);
  return 1;
}

/* T.mean(x) -> number. */
static int td_l_mean(lua_State *L) {
  double s = td__sum(L, "mean", 1);
  int64_t n = td_tensor_numel(td__check(L, 1));
  lua_pushnumber(L, n ? s / (double)n : NAN);
  return 1;
}

/* -- Ops: activations and normalisation ------------------------------------------ */

static int64_t td__cols(lua_State *L, const char *fn, const td_tensor_t *x) {
  if (td_tensor_ndim(x) < 1) luaL_error(L, "tide.tensor.%s: x must have a dimension", fn);
  return td_tensor_shape(x)[td_tensor_ndim(x) - 1];
}

/* T.softmax(x [, {out}]) over the last dimension. */
static int td_l_softmax(lua_State *L) {
  const char *fn = "softmax";
  td_tensor_t *x = td__contig(L, fn, 1);
  td__want_dtype(L, fn, x, TD_F32, "x");
  int64_t cols = td__cols(L, fn, x), rows = cols ? td_tensor_numel(x) / cols : 0;
  td_tensor_t *o = td__out(L, fn, 2, "out", TD_F32, td_tensor_device(x),
                           td_tensor_ndim(x), td_tensor_shape(x), 0, NULL);
  TD__TRY(L, fn, td__ops(L, fn, x)->softmax_fwd(td_tensor_data(o), td_tensor_data(x),
                                                rows, cols));
  return 1;
}

/* Checks that tensor at idx has the same element count as ref. */
static void td__same_numel(lua_State *L, const char *fn, const td_tensor_t *ref,
                           const td_tensor_t *t, const char *what) {
  if (td_tensor_numel(ref) != td_tensor_numel(t))
    luaL_error(L, "tide.tensor.%s: %s has %d elements, expected %d", fn, what,
               (int)td_tensor_numel(t), (int)td_tensor_numel(ref));
}

/* T.softmax_backward(dy, y [, {out, accumulate}]) -> dx. */
static int td_l_softmax_backward(lua_State *L) {
  const char *fn = "softmax_backward";
  td_tensor_t *dy = td__contig(L, fn, 1), *y = td__contig(L, fn, 2);
  td__want_dtype(L, fn, dy, TD_F32, "dy");
  td__want_dtype(L, fn, y, TD_F32, "y");
  td__same_device(L, fn, dy, y);
  td__same_numel(L, fn, y, dy, "dy");
  int64_t cols = td__cols(L, fn, y), rows = cols ? td_tensor_numel(y) / cols : 0;
  int accum = td__opt_bool(L, 3, "accumulate", 0);
  td_tensor_t *o = td__out(L, fn, 3, "out", TD_F32, td_tensor_device(y),
                           td_tensor_ndim(y), td_tensor_shape(y), 0, NULL);
  TD__TRY(L, fn, td__ops(L, fn, y)->softmax_bwd(td_tensor_data(o), td_tensor_data(dy),
                                                td_tensor_data(y), rows, cols, accum));
  return 1;
}

/* T.layernorm(x, w, b [, {eps = 1e-5, out}]) -> y, mean, rstd. */
static int td_l_layernorm(lua_State *L) {
  const char *fn = "layernorm";
  td_tensor_t *x = td__contig(L, fn, 1);
  td__want_dtype(L, fn, x, TD_F32, "x");
  int64_t cols = td__cols(L, fn, x), rows = cols ? td_tensor_numel(x) / cols : 0;
  td_tensor_t *w = td__contig(L, fn, 2), *b = td__contig(L, fn, 3);
  td__want_dtype(L, fn, w, TD_F32, "w");
  td__want_dtype(L, fn, b, TD_F32, "b");
  td__same_device(L, fn, x, w);
  td__same_device(L, fn, x, b);
  if (td_tensor_numel(w) != cols || td_tensor_numel(b) != cols)
    luaL_error(L, "tide.tensor.layernorm: w and b must have %d elements", (int)cols);
  float eps = (float)td__opt_num(L, 4, "eps", 1e-5);
  int dev = td_tensor_device(x);
  td_tensor_t *y = td__out(L, fn, 4, "out", TD_F32, dev, td_tensor_ndim(x),
                           td_tensor_shape(x), 0, NULL);
  int yi = lua_gettop(L);
  td_tensor_t *m = td__out(L, fn, 4, "mean", TD_F32, dev, td_tensor_ndim(x) - 1,
                           td_tensor_shape(x), 0, NULL);
  int mi = lua_gettop(L);
  td_tensor_t *r = td__out(L, fn, 4, "rstd", TD_F32, dev, td_tensor_ndim(x) - 1,
                           td_tensor_shape(x), 0, NULL);
  int ri = lua_gettop(L);
  TD__TRY(L, fn, td__ops(L, fn, x)->layernorm_fwd(td_tensor_data(y), td_tensor_data(m),
                                                  td_tensor_data(r), td_tensor_data(x),
                                                  td_tensor_data(w), td_tensor_data(b),
                                                  rows, cols, eps));
  lua_pushvalue(L, yi);
  lua_pushvalue(L, mi);
  lua_pushvalue(L, ri);
  return 3;
}

/* T.layernorm_backward(dy, x, w, mean, rstd [, {dx, dw, db, accumulate}])
 * -> dx, dw, db. */
static int td_l_layernorm_backward(lua_State *L) {
  const char *fn = "layernorm_backward";
  td_tensor_t *dy = td__contig(L, fn, 1), *x = td__contig(L, fn, 2);
  td__want_dtype(L, fn, x, TD_F32, "x");
  int64_t cols = td__cols(L, fn, x), rows = cols ? td_tensor_numel(x) / cols : 0;
  const float *pdy = td__in_f32(L, fn, 1, x, "dy");
  const float *pw = td__in_f32(L, fn, 3, x, "w");
  const float *pm = td__in_f32(L, fn, 4, x, "mean");
  const float *pr = td__in_f32(L, fn, 5, x, "rstd");
  td__same_numel(L, fn, x, dy, "dy");
  if (td_tensor_numel(td__check(L, 3)) != cols ||
      td_tensor_numel(td__check(L, 4)) != rows || td_tensor_numel(td__check(L, 5)) != rows)
    luaL_error(L, "tide.tensor.layernorm_backward: w, mean or rstd has the wrong size");
  int accum = td__opt_bool(L, 6, "accumulate", 0);
  int dev = td_tensor_device(x);
  td_tensor_t *dx = td__out(L, fn, 6, "dx", TD_F32, dev, td_tensor_ndim(x),
                            td_tensor_shape(x), 0, NULL);
  int xi = lua_gettop(L);
  td_tensor_t *dw = td__out(L, fn, 6, "dw", TD_F32, dev, 1, &cols, 0, NULL);
  int wi = lua_gettop(L);
  td_tensor_t *db = td__out(L, fn, 6, "db", TD_F32, dev, 1, &cols, 0, NULL);
  int bi = lua_gettop(L);
  TD__TRY(L, fn, td__ops(L, fn, x)->layernorm_bwd(
                     td_tensor_data(dx), td_tensor_data(dw), td_tensor_data(db), pdy,
                     td_tensor_data(x), pw, pm, pr, rows, cols, accum));
  lua_pushvalue(L, xi);
  lua_pushvalue(L, wi);
  lua_pushvalue(L, bi);
  return 3;
}

/* T.gelu(x [, {out}]) (tanh approximation). */
static int td_l_gelu(lua_State *L) {
  const char *fn = "gelu";
  td_tensor_t *x = td__contig(L, fn, 1);
  td__want_dtype(L, fn, x, TD_F32, "x");
  td_tensor_t *o = td__out(L, fn, 2, "out", TD_F32, td_tensor_device(x),
                           td_tensor_ndim(x), td_tensor_shape(x), 0, NULL);
  TD__TRY(L, fn, td__ops(L, fn, x)->gelu_fwd(td_tensor_data(o), td_tensor_data(x),
                                             td_tensor_numel(x)));
  return 1;
}

/* T.gelu_backward(dy, x [, {out, accumulate}]) -> dx. */
static int td_l_gelu_backward(lua_State *L) {
  const char *fn = "gelu_backward";
  td_tensor_t *x = td__contig(L, fn, 2);
  td__want_dtype(L, fn, x, TD_F32, "x");
  const float *pdy = td__in_f32(L, fn, 1, x, "dy");
  td__same_numel(L, fn, x, td__check(L, 1), "dy");
  int accum = td__opt_bool(L, 3, "accumulate", 0);
  td_tensor_t *o = td__out(L, fn, 3, "out", TD_F32, td_tensor_device(x),
                           td_tensor_ndim(x), td_tensor_shape(x), 0, NULL);
  TD__TRY(L, fn, td__ops(L, fn, x)->gelu_bwd(td_tensor_data(o), pdy, td_tensor_data(x),
                                             td_tensor_numel(x), accum));
  return 1;
}

/* -- Ops: embedding, attention, loss --------------------------------------------- */

/* T.embedding(ids, table [, {out}]) -> ids.shape .. {dim}. */
static int td_l_embedding(lua_State *L) {
  const char *fn = "embedding";
  td_tensor_t *tab = td__contig(L, fn, 2);
  td__want_dtype(L, fn, tab, TD_F32, "table");
  if (td_tensor_ndim(tab) != 2) luaL_error(L, "tide.tensor.embedding: table must be 2-D");
  td_tensor_t *ids = td__check(L, 1);
  const int32_t *pid = td__in_i32(L, fn, 1, tab, "ids");
  int64_t shape[TD_MAX_DIMS];
  int nd = td_tensor_ndim(ids);
  if (nd + 1 > TD_MAX_DIMS) luaL_error(L, "tide.tensor.embedding: too many dimensions");
  memcpy(shape, td_tensor_shape(ids), sizeof(int64_t) * (size_t)nd);
  shape[nd] = td_tensor_shape(tab)[1];
  td_tensor_t *o = td__out(L, fn, 3, "out", TD_F32, td_tensor_device(tab), nd + 1,
                           shape, 0, NULL);
  TD__TRY(L, fn, td__ops(L, fn, tab)->embedding_fwd(
                     td_tensor_data(o), pid, td_tensor_data(tab), td_tensor_numel(ids),
                     td_tensor_shape(tab)[0], td_tensor_shape(tab)[1]));
  return 1;
}

/* T.embedding_backward(dy, ids, vocab_or_dtable) -> dtable: a new (vocab,
 * dim) gradient, or accumulated into the given dtable. */
static int td_l_embedding_backward(lua_State *L) {
  const char *fn = "embedding_backward";
  td_tensor_t *dy = td__contig(L, fn, 1);
  td__want_dtype(L, fn, dy, TD_F32, "dy");
  td_tensor_t *ids = td__check(L, 2);
  const int32_t *pid = td__in_i32(L, fn, 2, dy, "ids");
  int64_t dim = td__cols(L, fn, dy);
  if (td_tensor_numel(dy) != td_tensor_numel(ids) * dim)
    luaL_error(L, "tide.tensor.embedding_backward: dy must be ids.shape .. {dim}");
  td_tensor_t *dt;
  if (lua_type(L, 3) == LUA_TNUMBER) {
    int64_t shape[2] = {(int64_t)lua_tonumber(L, 3), dim};
    dt = NULL;
    TD__TRY(L, fn, td_tensor_zeros(&dt, TD_F32, td_tensor_device(dy), 2, shape));
    td__push(L, dt);
  } else {
    dt = td__check(L, 3);
    if (!td_tensor_is_contiguous(dt) || td_tensor_ndim(dt) != 2 ||
        td_tensor_shape(dt)[1] != dim || td_tensor_dtype(dt) != TD_F32)
      luaL_error(L, "tide.tensor.embedding_backward: dtable must be a contiguous f32 (vocab, %d)",
                 (int)dim);
    td__same_device(L, fn, dy, dt);
    lua_pushvalue(L, 3);
  }
  TD__TRY(L, fn, td__ops(L, fn, dy)->embedding_bwd(td_tensor_data(dt), td_tensor_data(dy),
                                                   pid, td_tensor_numel(ids),
                                                   td_tensor_shape(dt)[0], dim));
  return 1;
}

/* Reads B, T, C from a (B,T,3C) qkv tensor. */
static void td__qkv_dims(lua_State *L, const char *fn, const td_tensor_t *qkv,
                         int nh, int *B, int *T, int *C) {
  if (td_tensor_ndim(qkv) != 3 || td_tensor_shape(qkv)[2] % 3)
    luaL_error(L, "tide.tensor.%s: qkv must be (B, T, 3C)", fn);
  *B = td__int_arg(L, fn, td_tensor_shape(qkv)[0], "B");
  *T = td__int_arg(L, fn, td_tensor_shape(qkv)[1], "T");
  *C = td__int_arg(L, fn, td_tensor_shape(qkv)[2] / 3, "C");
  if (nh <= 0 || *C % nh)
    luaL_error(L, "tide.tensor.%s: n_head %d does not divide C = %d", fn, nh, *C);
}

/* T.attention(qkv, n_head [, {out, att}]) -> out (B,T,C), att (B,NH,T,T). */
static int td_l_attention(lua_State *L) {
  const char *fn = "attention";
  td_tensor_t *qkv = td__contig(L, fn, 1);
  td__want_dtype(L, fn, qkv, TD_F32, "qkv");
  int nh = (int)luaL_checkinteger(L, 2), B, T, C;
  td__qkv_dims(L, fn, qkv, nh, &B, &T, &C);
  int dev = td_tensor_device(qkv);
  int64_t os[3] = {B, T, C}, as[4] = {B, nh, T, T};
  td_tensor_t *o = td__out(L, fn, 3, "out", TD_F32, dev, 3, os, 0, NULL);
  int oi = lua_gettop(L);
  td_tensor_t *a = td__out(L, fn, 3, "att", TD_F32, dev, 4, as, 0, NULL);
  TD__TRY(L, fn, td__ops(L, fn, qkv)->attention_fwd(td_tensor_data(o), td_tensor_data(a),
                                                    td_tensor_data(qkv), B, T, C, nh));
  lua_pushvalue(L, oi);
  lua_insert(L, -2);
  return 2;
}

/* T.attention_backward(dout, qkv, att, n_head [, {out, accumulate}]) -> dqkv. */
static int td_l_attention_backward(lua_State *L) {
  const char *fn = "attention_backward";
  td_tensor_t *qkv = td__contig(L, fn, 2);
  td__want_dtype(L, fn, qkv, TD_F32, "qkv");
  int nh = (int)luaL_checkinteger(L, 4), B, T, C;
  td__qkv_dims(L, fn, qkv, nh, &B, &T, &C);
  const float *pd = td__in_f32(L, fn, 1, qkv, "dout");
  const float *pa = td__in_f32(L, fn, 3, qkv, "att");
  if (td_tensor_numel(td__check(L, 1)) != (int64_t)B * T * C ||
      td_tensor_numel(td__check(L, 3)) != (int64_t)B * nh * T * T)
    luaL_error(L, "tide.tensor.attention_backward: dout or att has the wrong size");
  int accum = td__opt_bool(L, 5, "accumulate", 0);
  td_tensor_t *o = td__out(L, fn, 5, "out", TD_F32, td_tensor_device(qkv), 3,
                           td_tensor_shape(qkv), 0, NULL);
  TD__TRY(L, fn, td__ops(L, fn, qkv)->attention_bwd(td_tensor_data(o), pd,
                                                    td_tensor_data(qkv), pa, B, T, C,
                                                    nh, accum));
  return 1;
}

/* T.attention_cached(qkv, kcache, vcache, pos, n_head [, {out}]) -> out.
 * qkv (B,Tn,3C) holds positions pos..pos+Tn-1 (pos = tokens already cached,
 * 0-based); caches (B,Tmax,C) are updated in place. */
static int td_l_attention_cached(lua_State *L) {
  const char *fn = "attention_cached";
  td_tensor_t *qkv = td__contig(L, fn, 1);
  td__want_dtype(L, fn, qkv, TD_F32, "qkv");
  td_tensor_t *kc = td__mut(L, fn, 2), *vc = td__mut(L, fn, 3);
  int pos = (int)luaL_checkinteger(L, 4), nh = (int)luaL_checkinteger(L, 5), B, T, C;
  td__qkv_dims(L, fn, qkv, nh, &B, &T, &C);
  for (int i = 0; i < 2; i++) {
    td_tensor_t *c = i ? vc : kc;
    if (!td_tensor_is_contiguous(c) || td_tensor_dtype(c) != TD_F32 ||
        td_tensor_ndim(c) != 3 || td_tensor_shape(c)[0] != B || td_tensor_shape(c)[2] != C)
      luaL_error(L, "tide.tensor.attention_cached: caches must be contiguous f32 (%d, Tmax, %d)",
                 B, C);
    td__same_device(L, fn, qkv, c);
  }
  int tmax = td__int_arg(L, fn, td_tensor_shape(kc)[1], "Tmax");
  if (td_tensor_shape(vc)[1] != tmax) luaL_error(L, "tide.tensor.attention_cached: caches differ");
  if (pos < 0 || pos + T > tmax)
    luaL_error(L, "tide.tensor.attention_cached: positions %d..%d exceed the cache (%d)", pos,
               pos + T, tmax);
  int64_t os[3] = {B, T, C};
  td_tensor_t *o = td__out(L, fn, 6, "out", TD_F32, td_tensor_device(qkv), 3, os, 0, NULL);
  TD__TRY(L, fn, td__ops(L, fn, qkv)->attention_cached(td_tensor_data(o), td_tensor_data(kc),
                                                       td_tensor_data(vc), td_tensor_data(qkv),
                                                       B, T, pos, tmax, C, nh));
  return 1;
}

/* Rows/V of logits (..., V) against targets (...). */
static void td__ce_dims(lua_State *L, const char *fn, const td_tensor_t *logits,
                        const td_tensor_t *targets, int64_t *rows, int64_t *V) {
  *V = td__cols(L, fn, logits);
  *rows = td_tensor_numel(targets);
  if (*rows * *V != td_tensor_numel(logits))
    luaL_error(L, "tide.tensor.%s: logits must be targets.shape .. {V}", fn);
}

/* Number of targets that are not -1 (host read). */
static int64_t td__ce_valid(lua_State *L, const char *fn, td_tensor_t *targets) {
  const int32_t *p;
  if (td_tensor_device(targets) == TD_CPU) {
    p = td_tensor_data(targets);
  } else {
    td_tensor_t *h = NULL;
    TD__TRY(L, fn, td_tensor_to(&h, targets, TD_CPU, TD_I32));
    td__push(L, h);
    p = td_tensor_data(h);
  }
  int64_t n = 0, rows = td_tensor_numel(targets);
  for (int64_t i = 0; i < rows; i++) n += p[i] != -1;
  return n;
}

/* T.cross_entropy(logits, targets [, {out}]) -> mean loss (number), losses
 * tensor.  targets is i32; -1 entries are ignored. */
static int td_l_cross_entropy(lua_State *L) {
  const char *fn = "cross_entropy";
  td_tensor_t *lg = td__contig(L, fn, 1);
  td__want_dtype(L, fn, lg, TD_F32, "logits");
  td_tensor_t *tg = td__contig(L, fn, 2);
  td__want_dtype(L, fn, tg, TD_I32, "targets");
  td__same_device(L, fn, lg, tg);
  int64_t rows, V;
  td__ce_dims(L, fn, lg, tg, &rows, &V);
  td_tensor_t *o = td__out(L, fn, 3, "out", TD_F32, td_tensor_device(lg),
                           td_tensor_ndim(tg), td_tensor_shape(tg), 0, NULL);
  int oi = lua_gettop(L);
  const td_ops_t *ops = td__ops(L, fn, lg);
  TD__TRY(L, fn, ops->cross_entropy_fwd(td_tensor_data(o), td_tensor_data(lg),
                                        td_tensor_data(tg), rows, V));
  double s = 0;
  TD__TRY(L, fn, ops->sum(&s, td_tensor_data(o), rows));
  int64_t valid = td__ce_valid(L, fn, tg);
  lua_pushnumber(L, valid ? s / (double)valid : 0);
  lua_pushvalue(L, oi);
  return 2;
}

/* T.cross_entropy_backward(logits, targets [, {scale, out, accumulate}])
 * -> dlogits of the mean loss (scale defaults to 1 / valid targets). */
static int td_l_cross_entropy_backward(lua_State *L) {
  const char *fn = "cross_entropy_backward";
  td_tensor_t *lg = td__contig(L, fn, 1);
  td__want_dtype(L, fn, lg, TD_F32, "logits");
  td_tensor_t *tg = td__contig(L, fn, 2);
  td__want_dtype(L, fn, tg, TD_I32, "targets");
  td__same_device(L, fn, lg, tg);
  int64_t rows, V;
  td__ce_dims(L, fn, lg, tg, &rows, &V);
  double scale;
  if (td__opt_field(L, 3, "scale")) {
    scale = luaL_checknumber(L, -1);
    lua_pop(L, 1);
  } else {
    int64_t valid = td__ce_valid(L, fn, tg);
    scale = valid ? 1.0 / (double)valid : 0;
  }
  int accum = td__opt_bool(L, 3, "accumulate", 0);
  td_tensor_t *o = td__out(L, fn, 3, "out", TD_F32, td_tensor_device(lg),
                           td_tensor_ndim(lg), td_tensor_shape(lg), 0, NULL);
  TD__TRY(L, fn, td__ops(L, fn, lg)->cross_entropy_bwd(td_tensor_data(o), td_tensor_data(lg),
                                                       td_tensor_data(tg), rows, V,
                                                       (float)scale, accum));
  return 1;
}

/* T.adamw(p, g, m, v, {step = t, lr = 1e-3, beta1 = 0.9, beta2 = 0.999,
 * eps = 1e-8, weight_decay = 0.01}): updates p, m, v in place. */
static int td_l_adamw(lua_State *L) {
  const char *fn = "adamw";
  td_tensor_t *p = td__check(L, 1);
  for (int i = 1; i <= 4; i++) {
    td_tensor_t *t = i == 2 ? td__check(L, i) : td__mut(L, fn, i);
    if (!td_tensor_is_contiguous(t) || td_tensor_dtype(t) != TD_F32)
      luaL_error(L, "tide.tensor.adamw: argument #%d must be a contiguous f32 tensor", i);
    td__same_device(L, fn, p, t);
    td__same_numel(L, fn, p, t, "a state tensor");
  }
  luaL_checktype(L, 5, LUA_TTABLE);
  double step = td__opt_num(L, 5, "step", 0);
  if (step < 1) luaL_error(L, "tide.tensor.adamw: option 'step' (>= 1) is required");
  TD__TRY(L, fn, td__ops(L, fn, p)->adamw(
                     td_tensor_data(p), td_tensor_data(td__check(L, 2)),
                     td_tensor_data(td__check(L, 3)), td_tensor_data(td__check(L, 4)),
                     td_tensor_numel(p), (float)td__opt_num(L, 5, "lr", 1e-3),
                     (float)td__opt_num(L, 5, "beta1", 0.9),
                     (float)td__opt_num(L, 5, "beta2", 0.999),
                     (float)td__opt_num(L, 5, "eps", 1e-8),
                     (float)td__opt_num(L, 5, "weight_decay", 0.01), (int)step));
  return 0;
}

/* T.argmax(x) -> i32 tensor of x.shape without the last dim (0-based ids). */
static int td_l_argmax(lua_State *L) {
  const char *fn = "argmax";
  td_tensor_t *x = td__contig(L, fn, 1);
  td__want_dtype(L, fn, x, TD_F32, "x");
  int64_t cols = td__cols(L, fn, x), rows = cols ? td_tensor_numel(x) / cols : 0;
  td_tensor_t *o = td__out(L, fn, 2, "out", TD_I32, td_tensor_device(x),
                           td_tensor_ndim(x) - 1, td_tensor_shape(x), 0, NULL);
  TD__TRY(L, fn, td__ops(L, fn, x)->argmax(td_tensor_data(o), td_tensor_data(x), rows, cols));
  return 1;
}

/* T.sample(logits [, {temperature = 1, top_k = 0, seed = 0, offset = 0}])
 * -> i32 cpu tensor of ids (logits.shape without the last dim).  Row r uses
 * the uniform draw (seed, offset + r), so a generation loop passes a new
 * offset each step.  temperature 0 is argmax. */
static int td_l_sample(lua_State *L) {
  const char *fn = "sample";
  td_tensor_t *x = td__check(L, 1);
  int64_t cols = td__cols(L, fn, x), rows = cols ? td_tensor_numel(x) / cols : 0;
  float temp = (float)td__opt_num(L, 2, "temperature", 1);
  int top_k = (int)td__opt_num(L, 2, "top_k", 0);
  uint64_t seed = (uint64_t)(int64_t)td__opt_num(L, 2, "seed", 0);
  uint64_t off = (uint64_t)(int64_t)td__opt_num(L, 2, "offset", 0);
  const float *p = td__host_f32(L, fn, x);
  td_tensor_t *o = NULL;
  TD__TRY(L, fn, td_tensor_empty(&o, TD_I32, TD_CPU, td_tensor_ndim(x) - 1,
                                 td_tensor_shape(x)));
  td__push(L, o);
  double *u = lua_newuserdata(L, sizeof(double) * (size_t)(rows ? rows : 1));
  for (int64_t r = 0; r < rows; r++) u[r] = td_rng_uniform(seed, off + (uint64_t)r);
  TD__TRY(L, fn, td_sample_rows(td_tensor_data(o), p, rows, cols, temp, top_k, u));
  lua_pop(L, 1);
  return 1;
}

/* -- Module-level utilities ---------------------------------------------------------- */

/* T.cuda_available() -> bool, reason */
static int td_l_cuda_available(lua_State *L) {
  int err = 0;
  const td_cuda_plugin_t *p = td_cuda_plugin(&err);
  lua_pushboolean(L, p != NULL);
  if (p) {
    lua_pushnil(L);
  } else {
    const char *d = td_gpu_last_detail();
    lua_pushfstring(L, "%s%s%s", td_gpu_strerror(err), d[0] ? ": " : "", d);
  }
  return 2;
}

/* T.device_count() -> number of CUDA devices (0 without a GPU). */
static int td_l_device_count(lua_State *L) {
  lua_pushinteger(L, td_cuda_device_count());
  return 1;
}

/* T.memory() -> {host_bytes = live host tensor bytes} */
static int td_l_memory(lua_State *L) {
  lua_createtable(L, 0, 1);
  lua_pushnumber(L, (lua_Number)td_tensor_host_bytes());
  lua_setfield(L, -2, "host_bytes");
  return 1;
}

static int td_l_is_tensor(lua_State *L) {
  lua_pushboolean(L, td__is_tensor(L, 1));
  return 1;
}

/* T.synchronize(): waits for queued CUDA work (no-op without a GPU). */
static int td_l_synchronize(lua_State *L) {
  int err = 0;
  const td_cuda_plugin_t *p = td_cuda_device_count() > 0 ? td_cuda_plugin(&err) : NULL;
  if (p) TD__TRY(L, "synchronize", p->synchronize());
  return 0;
}

/* T.device_name([i = 0]) -> "NVIDIA H100 ..." or "cpu". */
static int td_l_device_name(lua_State *L) {
  int dev = (int)luaL_optinteger(L, 1, 0), err = 0;
  if (td_cuda_device_count() <= dev || dev < 0) {
    lua_pushstring(L, "cpu");
    return 1;
  }
  char buf[256];
  const td_cuda_plugin_t *p = td_cuda_plugin(&err);
  TD__TRY(L, "device_name", p ? p->device_name(dev, buf, sizeof(buf)) : err);
  lua_pushstring(L, buf);
  return 1;
}

/* -- NCCL communicators ------------------------------------------------------------ */

#define TD__COMM_MT "tide.nccl_comm"

typedef struct {
  td_nccl_t *c; /* owned; NULL once destroyed */
} td__comm_t;

static td_nccl_t *td__check_comm(lua_State *L, int idx) {
  td__comm_t *b = luaL_checkudata(L, idx, TD__COMM_MT);
  if (!b->c) luaL_error(L, "tide.tensor: the NCCL communicator was destroyed");
  return b->c;
}

static int td__redop_arg(lua_State *L, int idx) {
  const char *s = luaL_optstring(L, idx, "sum");
  if (!strcmp(s, "sum")) return TD_SUM;
  if (!strcmp(s, "avg")) return TD_AVG;
  if (!strcmp(s, "max")) return TD_MAX;
  if (!strcmp(s, "min")) return TD_MIN;
  return luaL_error(L, "tide.tensor: unknown reduction '%s' (sum, avg, max, min)", s);
}

/* T.nccl_unique_id() -> 128-byte string (rank 0 makes it, all ranks use it). */
static int td_l_nccl_unique_id(lua_State *L) {
  uint8_t id[TD_NCCL_ID_BYTES];
  TD__TRY(L, "nccl_unique_id", td_nccl_unique_id(id));
  lua_pushlstring(L, (const char *)id, sizeof(id));
  return 1;
}

/* T.nccl_comm(nranks, id, rank [, device = "cuda:0"]) -> communicator. */
static int td_l_nccl_comm(lua_State *L) {
  int n = (int)luaL_checkinteger(L, 1);
  size_t len;
  const char *id = luaL_checklstring(L, 2, &len);
  int rank = (int)luaL_checkinteger(L, 3);
  int dev = td__parse_device(L, luaL_optstring(L, 4, "cuda:0"));
  if (len != TD_NCCL_ID_BYTES) luaL_error(L, "tide.tensor.nccl_comm: id must be %d bytes", TD_NCCL_ID_BYTES);
  if (dev == TD_CPU) luaL_error(L, "tide.tensor.nccl_comm: NCCL needs a cuda device");
  td__comm_t *b = lua_newuserdata(L, sizeof(*b));
  b->c = NULL;
  luaL_getmetatable(L, TD__COMM_MT);
  lua_setmetatable(L, -2);
  TD__TRY(L, "nccl_comm", td_nccl_new(&b->c, n, (const uint8_t *)id, rank, dev));
  return 1;
}

static int td_c_gc(lua_State *L) {
  td__comm_t *b = luaL_checkudata(L, 1, TD__COMM_MT);
  td_nccl_free(&b->c);
  return 0;
}

static int td_c_rank(lua_State *L) {
  lua_pushinteger(L, td_nccl_rank(td__check_comm(L, 1)));
  return 1;
}

static int td_c_size(lua_State *L) {
  lua_pushinteger(L, td_nccl_size(td__check_comm(L, 1)));
  return 1;
}

/* comm:allreduce(t [, op = "sum"]) -> t (in place). */
static int td_c_allreduce(lua_State *L) {
  td_nccl_t *c = td__check_comm(L, 1);
  TD__TRY(L, "allreduce", td_nccl_allreduce(c, td__check(L, 2), td__redop_arg(L, 3)));
  lua_settop(L, 2);
  return 1;
}

/* New tensor like t with the first dimension scaled by num/den. */
static td_tensor_t *td__resized(lua_State *L, const char *fn, td_tensor_t *t, int64_t num,
                                int64_t den) {
  int64_t shape[TD_MAX_DIMS];
  int nd = td_tensor_ndim(t);
  if (nd < 1) luaL_error(L, "tide.tensor.%s: tensor needs a dimension", fn);
  memcpy(shape, td_tensor_shape(t), sizeof(int64_t) * (size_t)nd);
  if ((shape[0] * num) % den) luaL_error(L, "tide.tensor.%s: first dimension not divisible", fn);
  shape[0] = shape[0] * num / den;
  td_tensor_t *o = NULL;
  TD__TRY(L, fn, td_tensor_empty(&o, td_tensor_dtype(t), td_tensor_device(t), nd, shape));
  return td__push(L, o);
}

/* comm:allgather(t) -> new tensor, ranks' t concatenated along dim 1. */
static int td_c_allgather(lua_State *L) {
  td_nccl_t *c = td__check_comm(L, 1);
  td_tensor_t *t = td__check(L, 2);
  td_tensor_t *o = td__resized(L, "allgather", t, td_nccl_size(c), 1);
  TD__TRY(L, "allgather", td_nccl_allgather(c, t, o));
  return 1;
}

/* comm:reduce_scatter(t [, op]) -> new tensor: this rank's slice of dim 1. */
static int td_c_reduce_scatter(lua_State *L) {
  td_nccl_t *c = td__check_comm(L, 1);
  td_tensor_t *t = td__check(L, 2);
  int op = td__redop_arg(L, 3);
  td_tensor_t *o = td__resized(L, "reduce_scatter", t, 1, td_nccl_size(c));
  TD__TRY(L, "reduce_scatter", td_nccl_reduce_scatter(c, t, o, op));
  return 1;
}

/* comm:broadcast(t, root) -> t (in place; root 0-based). */
static int td_c_broadcast(lua_State *L) {
  td_nccl_t *c = td__check_comm(L, 1);
  TD__TRY(L, "broadcast", td_nccl_broadcast(c, td__check(L, 2), (int)luaL_checkinteger(L, 3)));
  lua_settop(L, 2);
  return 1;
}

static int td_c_send(lua_State *L) {
  td_nccl_t *c = td__check_comm(L, 1);
  TD__TRY(L, "send", td_nccl_send(c, td__check(L, 2), (int)luaL_checkinteger(L, 3)));
  return 0;
}

static int td_c_recv(lua_State *L) {
  td_nccl_t *c = td__check_comm(L, 1);
  TD__TRY(L, "recv", td_nccl_recv(c, td__check(L, 2), (int)luaL_checkinteger(L, 3)));
  lua_settop(L, 2);
  return 1;
}

static const luaL_Reg td__comm_methods[] = {
    {"rank", td_c_rank},           {"size", td_c_size},
    {"allreduce", td_c_allreduce}, {"allgather", td_c_allgather},
    {"reduce_scatter", td_c_reduce_scatter}, {"broadcast", td_c_broadcast},
    {"send", td_c_send},           {"recv", td_c_recv},
    {"destroy", td_c_gc},          {NULL, NULL}};

/* -- Operators ------------------------------------------------------------------ */

/* a + b, a - b, a * b with tensors or numbers on either side. */
static int td__arith(lua_State *L, const char *fn, lua_CFunction f, int commutes) {
  lua_settop(L, 2);
  if (!td__is_tensor(L, 1)) {
    if (!commutes) { /* n - t = -(t) + n */
      lua_pushcfunction(L, td_l_add);
      lua_pushvalue(L, 2);
      lua_pushvalue(L, 1);
      lua_createtable(L, 0, 2);
      lua_pushnumber(L, -1);
      lua_setfield(L, -2, "alpha");
      lua_call(L, 3, 1);
      return 1;
    }
    lua_insert(L, 1);
  }
  (void)fn;
  lua_pushcfunction(L, f);
  lua_insert(L, 1);
  lua_call(L, 2, 1);
  return 1;
}

static int td_op_add(lua_State *L) { return td__arith(L, "add", td_l_add, 1); }
static int td_op_sub(lua_State *L) { return td__arith(L, "sub", td_l_sub, 0); }
static int td_op_mul(lua_State *L) { return td__arith(L, "mul", td_l_mul, 1); }
static int td_op_unm(lua_State *L) {
  lua_settop(L, 1);
  lua_pushnumber(L, -1);
  return td_l_scale(L);
}
static int td_op_div(lua_State *L) {
  if (lua_type(L, 2) != LUA_TNUMBER)
    luaL_error(L, "tide.tensor: only division by a number is supported");
  lua_Number d = lua_tonumber(L, 2);
  lua_settop(L, 1);
  lua_pushnumber(L, 1.0 / d);
  return td_l_scale(L);
}

/* -- Registration ----------------------------------------------------------------- */

static const luaL_Reg td__methods[] = {
    {"shape", td_m_shape},       {"size", td_m_size},
    {"strides", td_m_strides},   {"dtype", td_m_dtype},
    {"device", td_m_device},     {"numel", td_m_numel},
    {"dim", td_m_dim},           {"nbytes", td_m_nbytes},           {"is_contiguous", td_m_is_contiguous},
    {"view", td_m_view},         {"reshape", td_m_reshape},
    {"slice", td_m_slice},       {"transpose", td_m_transpose},
    {"contiguous", td_m_contiguous}, {"clone", td_m_clone},
    {"to", td_m_to},             {"copy", td_m_copy},
    {"fill", td_m_fill},         {"zero", td_m_zero},
    {"to_table", td_m_to_table}, {"to_bytes", td_m_to_bytes},
    {"get", td_m_get},           {"set", td_m_set},
    {"item", td_m_item},         {"free", td_m_free},
    {"sum", td_l_sum},           {"mean", td_l_mean},
    {NULL, NULL}};

static const luaL_Reg td__funcs[] = {
    {"zeros", td_l_zeros},
    {"ones", td_l_ones},
    {"full", td_l_full},
    {"empty", td_l_empty},
    {"randn", td_l_randn},
    {"rand", td_l_rand},
    {"arange", td_l_arange},
    {"from_table", td_l_from_table},
    {"from_bytes", td_l_from_bytes},
    {"from_file", td_l_from_file},
    {"__tide_deser", td_l_deser},
    {"__tide_deser_raw", td_l_deser_raw},
    {"matmul", td_l_matmul},
    {"add", td_l_add},
    {"sub", td_l_sub},
    {"mul", td_l_mul},
    {"scale", td_l_scale},
    {"sum_rows", td_l_sum_rows},
    {"mul_backward", td_l_mul_backward},
    {"sum", td_l_sum},
    {"mean", td_l_mean},
    {"dot", td_l_dot},
    {"softmax", td_l_softmax},
    {"softmax_backward", td_l_softmax_backward},
    {"layernorm", td_l_layernorm},
    {"layernorm_backward", td_l_layernorm_backward},
    {"gelu", td_l_gelu},
    {"gelu_backward", td_l_gelu_backward},
    {"embedding", td_l_embedding},
    {"embedding_backward", td_l_embedding_backward},
    {"attention", td_l_attention},
    {"attention_backward", td_l_attention_backward},
    {"attention_cached", td_l_attention_cached},
    {"cross_entropy", td_l_cross_entropy},
    {"cross_entropy_backward", td_l_cross_entropy_backward},
    {"adamw", td_l_adamw},
    {"argmax", td_l_argmax},
    {"sample", td_l_sample},
    {"cuda_available", td_l_cuda_available},
    {"device_count", td_l_device_count},
    {"memory", td_l_memory},
    {"is_tensor", td_l_is_tensor},
    {"synchronize", td_l_synchronize},
    {"device_name", td_l_device_name},
    {"nccl_unique_id", td_l_nccl_unique_id},
    {"nccl_comm", td_l_nccl_comm},
    {NULL, NULL}};

/* Boxes t in a new userdata without a metatable check (td__push's core). */
static void td__box_new(lua_State *L, td_tensor_t *t) {
  td__box_t *b = lua_newuserdata(L, sizeof(*b));
  b->t = t;
  luaL_getmetatable(L, TD__MT);
  lua_setmetatable(L, -2);
}

#define TD__PUSHED "tide.tensor.pushed" /* registry slot for td__push_p */

/* Under lua_cpcall: makes the box (and the metatables if needed) and parks
 * it in the registry, so a memory error cannot lose t. */
static int td__push_p(lua_State *L) {
  td_tensor_t *t = lua_touserdata(L, 1);
  luaL_getmetatable(L, TD__MT);
  int have = !lua_isnil(L, -1);
  lua_pop(L, 1);
  if (!have) {
    luaopen_tide_tensor(L);
    lua_pop(L, 1);
  }
  td__box_new(L, t);
  lua_setfield(L, LUA_REGISTRYINDEX, TD__PUSHED);
  return 0;
}

void td_tensor_lua_push(lua_State *L, td_tensor_t *t) {
  if (lua_cpcall(L, td__push_p, t) != 0) {
    td_tensor_free(&t); /* clean up, then raise the error left on the stack */
    lua_error(L);
  }
  lua_getfield(L, LUA_REGISTRYINDEX, TD__PUSHED);
  lua_pushnil(L);
  lua_setfield(L, LUA_REGISTRYINDEX, TD__PUSHED);
}

td_tensor_t *td_tensor_lua_to(lua_State *L, int idx) {
  if (!td__is_tensor(L, idx)) return NULL;
  return ((td__box_t *)lua_touserdata(L, idx))->t;
}

int luaopen_tide_tensor(lua_State *L) {
  luaL_newmetatable(L, TD__MT);
  lua_pushstring(L, TD__MT);
  lua_setfield(L, -2, "__name");
  lua_pushstring(L, TD__MT);
  lua_setfield(L, -2, "__tide_module");
  lua_pushcfunction(L, td_m_ser);
  lua_setfield(L, -2, "__tide_ser");
  lua_pushcfunction(L, td_m_raw);
  lua_setfield(L, -2, "__tide_raw");
  lua_pushcfunction(L, td_m_gc);
  lua_setfield(L, -2, "__gc");
  lua_pushcfunction(L, td_m_tostring);
  lua_setfield(L, -2, "__tostring");
  lua_pushcfunction(L, td_op_add);
  lua_setfield(L, -2, "__add");
  lua_pushcfunction(L, td_op_sub);
  lua_setfield(L, -2, "__sub");
  lua_pushcfunction(L, td_op_mul);
  lua_setfield(L, -2, "__mul");
  lua_pushcfunction(L, td_op_div);
  lua_setfield(L, -2, "__div");
  lua_pushcfunction(L, td_op_unm);
  lua_setfield(L, -2, "__unm");
  lua_newtable(L);
  luaL_register(L, NULL, td__methods);
  lua_setfield(L, -2, "__index");
  lua_pop(L, 1);
  luaL_newmetatable(L, TD__COMM_MT);
  lua_pushstring(L, TD__COMM_MT);
  lua_setfield(L, -2, "__name");
  lua_pushcfunction(L, td_c_gc);
  lua_setfield(L, -2, "__gc");
  lua_newtable(L);
  luaL_register(L, NULL, td__comm_methods);
  lua_setfield(L, -2, "__index");
  lua_pop(L, 1);
  lua_newtable(L);
  luaL_register(L, NULL, td__funcs);
  return 1;
}
