/* Tide tensor Lua binding: the `tide.tensor` module (luaopen_tide_tensor).
 * Tensors are full userdata (metatable "tide.tensor", __gc) boxing a
 * td_tensor_t; ops validate shapes, dtypes and devices, then call the op
 * table of the tensors' device.  Uses tensor.h, ops.h, device.h.
 *
 * This file holds the userdata (boxes, GC pressure), the argument helpers
 * the other files share (tensor_lua_int.h), the tensor methods, the device
 * queries and the module's registration; tensor_new_lua.c makes tensors
 * (and holds the object-store hooks), tensor_ops_lua.c holds the ops, the
 * arithmetic metamethods and the NCCL communicators.
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

#include "device.h"
#include "gpu_err.h"
#include "ops.h"
#include "tensor.h"
#include "tensor_lua.h"
#include "tensor_lua_int.h"

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
__attribute__((noreturn)) void td__tlua_raise(lua_State *L, const char *fn, int rc) {
  const char *d = td_gpu_last_detail();
  luaL_error(L, "tide.tensor.%s: %s%s%s", fn, td_gpu_strerror(rc),
             d[0] ? ": " : "", d);
  abort(); /* not reached: luaL_error does not return */
}

td_tensor_t *td__tlua_check(lua_State *L, int idx) {
  td__box_t *b = luaL_checkudata(L, idx, TD__MT);
  if (!b->t) luaL_error(L, "tide.tensor: argument #%d is a freed tensor", idx);
  return b->t;
}

int td__tlua_is_tensor(lua_State *L, int idx) {
  if (lua_type(L, idx) != LUA_TUSERDATA || !lua_getmetatable(L, idx)) return 0;
  luaL_getmetatable(L, TD__MT);
  int eq = lua_rawequal(L, -1, -2);
  lua_pop(L, 2);
  return eq;
}

/* Pushes a new userdata owning t (t may not be NULL). */
td_tensor_t *td__tlua_push(lua_State *L, td_tensor_t *t) {
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

int td__tlua_opt_field(lua_State *L, int opts, const char *k) {
  if (lua_type(L, opts) != LUA_TTABLE) return 0;
  lua_getfield(L, opts, k);
  if (lua_isnil(L, -1)) {
    lua_pop(L, 1);
    return 0;
  }
  return 1; /* value left on the stack */
}

double td__tlua_opt_num(lua_State *L, int opts, const char *k, double def) {
  if (!td__tlua_opt_field(L, opts, k)) return def;
  if (lua_type(L, -1) != LUA_TNUMBER)
    luaL_error(L, "tide.tensor: option '%s' must be a number", k);
  double v = lua_tonumber(L, -1);
  lua_pop(L, 1);
  return v;
}

int td__tlua_opt_bool(lua_State *L, int opts, const char *k, int def) {
  if (!td__tlua_opt_field(L, opts, k)) return def;
  int v = lua_toboolean(L, -1);
  lua_pop(L, 1);
  return v;
}

int td__tlua_opt_dtype(lua_State *L, int opts, int def) {
  if (!td__tlua_opt_field(L, opts, "dtype")) return def;
  const char *s = lua_tostring(L, -1);
  int d = s ? td_dtype_parse(s) : TD_GPU_EDTYPE;
  if (d < 0) luaL_error(L, "tide.tensor: unknown dtype '%s'", s ? s : "?");
  lua_pop(L, 1);
  return d;
}

int td__tlua_parse_device(lua_State *L, const char *s) {
  int dev;
  if (td_device_parse(s, &dev))
    luaL_error(L, "tide.tensor: unknown device '%s' (use \"cpu\" or \"cuda:N\")", s);
  return dev;
}

int td__tlua_opt_device(lua_State *L, int opts, int def) {
  if (!td__tlua_opt_field(L, opts, "device")) return def;
  const char *s = lua_tostring(L, -1);
  if (!s) luaL_error(L, "tide.tensor: option 'device' must be a string");
  int dev = td__tlua_parse_device(L, s);
  lua_pop(L, 1);
  return dev;
}

/* Reads a shape table {d1, d2, ...} at idx into shape; returns ndim. */
int td__tlua_shape_arg(lua_State *L, int idx, int64_t *shape) {
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

void td__tlua_shape_str(const td_tensor_t *t, char *buf, size_t n) {
  size_t o = 0;
  o += (size_t)snprintf(buf + o, n - o, "{");
  for (int i = 0; i < td_tensor_ndim(t) && o < n; i++)
    o += (size_t)snprintf(buf + o, n - o, "%s%lld", i ? ", " : "",
                          (long long)td_tensor_shape(t)[i]);
  if (o < n) snprintf(buf + o, n - o, "}");
}

/* The op table of t's device (loads the CUDA plugin for GPU tensors). */
const td_ops_t *td__tlua_ops(lua_State *L, const char *fn, const td_tensor_t *t) {
  int err = 0;
  const td_ops_t *ops = td_device_ops(td_tensor_device(t), &err);
  if (!ops) td__tlua_raise(L, fn, err);
  return ops;
}

void td__tlua_same_device(lua_State *L, const char *fn, const td_tensor_t *a, const td_tensor_t *b) {
  if (b && td_tensor_device(a) != td_tensor_device(b)) {
    char x[16], y[16];
    td_device_format(td_tensor_device(a), x, sizeof(x));
    td_device_format(td_tensor_device(b), y, sizeof(y));
    luaL_error(L, "tide.tensor.%s: tensors are on different devices (%s and %s)",
               fn, x, y);
  }
}

void td__tlua_want_dtype(lua_State *L, const char *fn, const td_tensor_t *t, int dtype, const char *what) {
  if (td_tensor_dtype(t) != dtype)
    luaL_error(L, "tide.tensor.%s: %s must be %s, got %s", fn, what,
               td_dtype_name(dtype), td_dtype_name(td_tensor_dtype(t)));
}

/* Returns a contiguous version of the tensor at idx: itself, or a copy
 * pushed on the stack (collected later). */
td_tensor_t *td__tlua_contig(lua_State *L, const char *fn, int idx) {
  td_tensor_t *t = td__tlua_check(L, idx);
  if (td_tensor_is_contiguous(t)) return t;
  td_tensor_t *c = NULL;
  TD__TRY(L, fn, td_tensor_contiguous(&c, t));
  return td__tlua_push(L, c);
}

/* Checked f32 contiguous input at idx on the device of ref (if given). */
const float *td__tlua_in_f32(lua_State *L, const char *fn, int idx, const td_tensor_t *ref,
                             const char *what) {
  td_tensor_t *t = td__tlua_contig(L, fn, idx);
  td__tlua_want_dtype(L, fn, t, TD_F32, what);
  if (ref) td__tlua_same_device(L, fn, ref, t);
  return td_tensor_data(t);
}

const int32_t *td__tlua_in_i32(lua_State *L, const char *fn, int idx, const td_tensor_t *ref,
                               const char *what) {
  td_tensor_t *t = td__tlua_contig(L, fn, idx);
  td__tlua_want_dtype(L, fn, t, TD_I32, what);
  if (ref) td__tlua_same_device(L, fn, ref, t);
  return td_tensor_data(t);
}

/* A tensor the call writes: not one that maps an object in the store,
 * which every reader of that object shares. */
td_tensor_t *td__tlua_mut(lua_State *L, const char *fn, int idx) {
  td_tensor_t *t = td__tlua_check(L, idx);
  if (td_tensor_is_readonly(t))
    luaL_error(L, "tide.tensor.%s: the tensor is read-only (it maps an object in the store; "
               "write to a :clone() of it)", fn);
  return t;
}

/* An output: opts[key] when given (checked: contiguous, dtype, device,
 * element count; pushed again) else a new tensor (zeroed when zero) pushed.
 * *given tells which. */
td_tensor_t *td__tlua_out(lua_State *L, const char *fn, int opts, const char *key, int dtype, int device,
                          int ndim, const int64_t *shape, int zero, int *given) {
  int64_t n = 1;
  for (int i = 0; i < ndim; i++) n *= shape[i];
  if (given) *given = 0;
  if (td__tlua_opt_field(L, opts, key)) {
    td_tensor_t *o = td__tlua_mut(L, fn, lua_gettop(L));
    if (!td_tensor_is_contiguous(o) || td_tensor_dtype(o) != dtype ||
        td_tensor_device(o) != device || td_tensor_numel(o) != n)
      luaL_error(L,
                 "tide.tensor.%s: option '%s' must be a contiguous %s tensor "
                 "of %f elements on the same device", /* %f: luaL_error knows no %lld */
                 fn, key, td_dtype_name(dtype), (double)n);
    if (given) *given = 1;
    return o;
  }
  td_tensor_t *t = NULL;
  TD__TRY(L, fn, zero ? td_tensor_zeros(&t, dtype, device, ndim, shape)
                      : td_tensor_empty(&t, dtype, device, ndim, shape));
  return td__tlua_push(L, t);
}

int td__tlua_int_arg(lua_State *L, const char *fn, int64_t v, const char *what) {
  if (v < 0 || v > INT_MAX) luaL_error(L, "tide.tensor.%s: %s too large", fn, what);
  return (int)v;
}

/* -- Methods: metadata ----------------------------------------------------- */

static int td__m_shape(lua_State *L) {
  td_tensor_t *t = td__tlua_check(L, 1);
  td__push_shape(L, td_tensor_ndim(t), td_tensor_shape(t));
  return 1;
}

static int td__m_size(lua_State *L) { /* t:size(dim) */
  td_tensor_t *t = td__tlua_check(L, 1);
  int d = (int)luaL_checkinteger(L, 2);
  if (d < 0) d += td_tensor_ndim(t) + 1;
  if (d < 1 || d > td_tensor_ndim(t)) luaL_error(L, "tide.tensor.size: bad dimension %d", d);
  lua_pushnumber(L, (lua_Number)td_tensor_shape(t)[d - 1]);
  return 1;
}

static int td__m_strides(lua_State *L) {
  td_tensor_t *t = td__tlua_check(L, 1);
  td__push_shape(L, td_tensor_ndim(t), td_tensor_strides(t));
  return 1;
}

static int td__m_dtype(lua_State *L) {
  lua_pushstring(L, td_dtype_name(td_tensor_dtype(td__tlua_check(L, 1))));
  return 1;
}

static int td__m_device(lua_State *L) {
  char buf[16];
  td_device_format(td_tensor_device(td__tlua_check(L, 1)), buf, sizeof(buf));
  lua_pushstring(L, buf);
  return 1;
}

static int td__m_numel(lua_State *L) {
  lua_pushnumber(L, (lua_Number)td_tensor_numel(td__tlua_check(L, 1)));
  return 1;
}

static int td__m_nbytes(lua_State *L) {
  lua_pushnumber(L, (lua_Number)td_tensor_nbytes(td__tlua_check(L, 1)));
  return 1;
}

static int td__m_dim(lua_State *L) {
  lua_pushinteger(L, td_tensor_ndim(td__tlua_check(L, 1)));
  return 1;
}

static int td__m_is_contiguous(lua_State *L) {
  lua_pushboolean(L, td_tensor_is_contiguous(td__tlua_check(L, 1)));
  return 1;
}

static int td__m_tostring(lua_State *L) {
  td__box_t *b = luaL_checkudata(L, 1, TD__MT);
  if (!b->t) {
    lua_pushstring(L, "tensor(freed)");
    return 1;
  }
  char sh[160], dev[16];
  td__tlua_shape_str(b->t, sh, sizeof(sh));
  td_device_format(td_tensor_device(b->t), dev, sizeof(dev));
  lua_pushfstring(L, "tensor(%s, %s, %s)", sh, td_dtype_name(td_tensor_dtype(b->t)), dev);
  return 1;
}

static int td__m_gc(lua_State *L) {
  td__box_t *b = luaL_checkudata(L, 1, TD__MT);
  td_tensor_free(&b->t);
  return 0;
}

/* t:free(): releases the tensor now; later use raises. */
static int td__m_free(lua_State *L) { return td__m_gc(L); }

/* -- Methods: views ---------------------------------------------------------- */

static int td__m_view(lua_State *L) {
  td_tensor_t *t = td__tlua_check(L, 1), *v = NULL;
  int64_t shape[TD_MAX_DIMS];
  int ndim = td__tlua_shape_arg(L, 2, shape);
  if (!td_tensor_is_contiguous(t))
    luaL_error(L, "tide.tensor.view: tensor is not contiguous (use :reshape)");
  TD__TRY(L, "view", td_tensor_view(&v, t, ndim, shape));
  td__tlua_push(L, v);
  return 1;
}

static int td__m_reshape(lua_State *L) {
  td_tensor_t *t = td__tlua_contig(L, "reshape", 1), *v = NULL;
  int64_t shape[TD_MAX_DIMS];
  int ndim = td__tlua_shape_arg(L, 2, shape);
  TD__TRY(L, "reshape", td_tensor_view(&v, t, ndim, shape));
  td__tlua_push(L, v);
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
static int td__m_slice(lua_State *L) {
  td_tensor_t *t = td__tlua_check(L, 1), *v = NULL;
  int d = td__dim_arg(L, t, 2);
  int64_t n = td_tensor_shape(t)[d];
  int64_t start = (int64_t)luaL_checknumber(L, 3);
  int64_t stop = lua_isnoneornil(L, 4) ? n : (int64_t)luaL_checknumber(L, 4);
  if (start < 1 || stop > n || stop < start - 1)
    luaL_error(L, "tide.tensor.slice: range %d..%d out of 1..%d", (int)start,
               (int)stop, (int)n);
  TD__TRY(L, "slice", td_tensor_slice(&v, t, d, start - 1, stop));
  td__tlua_push(L, v);
  return 1;
}

/* t:transpose([d1, d2]): swaps two dims (default the last two), a view. */
static int td__m_transpose(lua_State *L) {
  td_tensor_t *t = td__tlua_check(L, 1), *v = NULL;
  if (td_tensor_ndim(t) < 2 && lua_isnoneornil(L, 2))
    luaL_error(L, "tide.tensor.transpose: needs at least 2 dimensions");
  int d0 = lua_isnoneornil(L, 2) ? td_tensor_ndim(t) - 2 : td__dim_arg(L, t, 2);
  int d1 = lua_isnoneornil(L, 3) ? td_tensor_ndim(t) - 1 : td__dim_arg(L, t, 3);
  TD__TRY(L, "transpose", td_tensor_transpose(&v, t, d0, d1));
  td__tlua_push(L, v);
  return 1;
}

static int td__m_contiguous(lua_State *L) {
  td_tensor_t *t = td__tlua_check(L, 1), *c = NULL;
  if (td_tensor_is_contiguous(t)) {
    lua_settop(L, 1);
    return 1;
  }
  TD__TRY(L, "contiguous", td_tensor_contiguous(&c, t));
  td__tlua_push(L, c);
  return 1;
}

static int td__m_clone(lua_State *L) {
  td_tensor_t *t = td__tlua_check(L, 1), *c = NULL;
  TD__TRY(L, "clone", td_tensor_clone(&c, t));
  td__tlua_push(L, c);
  return 1;
}

/* t:to(target [, target2]): targets are devices ("cpu", "cuda:0") or dtypes
 * ("f32", "bf16", ...).  Always returns a new tensor. */
static int td__m_to(lua_State *L) {
  td_tensor_t *t = td__tlua_check(L, 1), *o = NULL;
  int dev = td_tensor_device(t), dtype = td_tensor_dtype(t);
  for (int i = 2; i <= 3 && !lua_isnoneornil(L, i); i++) {
    const char *s = luaL_checkstring(L, i);
    int d = td_dtype_parse(s);
    if (d >= 0)
      dtype = d;
    else dev = td__tlua_parse_device(L, s);
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
  td__tlua_push(L, o);
  return 1;
}

/* t:copy(src): copies src's elements into t (any device/dtype); returns t. */
static int td__m_copy(lua_State *L) {
  td_tensor_t *t = td__tlua_mut(L, "copy", 1), *s = td__tlua_check(L, 2);
  TD__TRY(L, "copy", td_tensor_copy(t, s));
  lua_settop(L, 1);
  return 1;
}

/* t:fill(v) in place (contiguous f32/i32); returns t. */
static int td__m_fill(lua_State *L) {
  td_tensor_t *t = td__tlua_mut(L, "fill", 1);
  double v = luaL_checknumber(L, 2);
  if (!td_tensor_is_contiguous(t)) luaL_error(L, "tide.tensor.fill: tensor not contiguous");
  TD__TRY(L, "fill", td_tensor_fill(t, v));
  lua_settop(L, 1);
  return 1;
}

static int td__m_zero(lua_State *L) {
  lua_settop(L, 1);
  lua_pushnumber(L, 0);
  return td__m_fill(L);
}

/* Host f32 copy of t (pushed), for reading elements. */
const float *td__tlua_host_f32(lua_State *L, const char *fn, td_tensor_t *t) {
  if (td_tensor_device(t) == TD_CPU && td_tensor_dtype(t) == TD_F32 &&
      td_tensor_is_contiguous(t))
    return td_tensor_data(t);
  td_tensor_t *h = NULL;
  TD__TRY(L, fn, td_tensor_to(&h, t, TD_CPU, TD_F32));
  td__tlua_push(L, h);
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
static int td__m_to_table(lua_State *L) {
  td_tensor_t *t = td__tlua_check(L, 1);
  int64_t pos = 0;
  int dt = td_tensor_dtype(t);
  int ints = dt == TD_I32 || dt == TD_I64 || dt == TD_U8;
  const void *p;
  if (ints) { /* through i64 so that large integers survive */
    td_tensor_t *h = NULL;
    TD__TRY(L, "to_table", td_tensor_to(&h, t, TD_CPU, TD_I64));
    td__tlua_push(L, h);
    p = td_tensor_data(h);
  } else {
    p = td__tlua_host_f32(L, "to_table", t);
  }
  lua_checkstack(L, td_tensor_ndim(t) + 4);
  td__to_table(L, p, ints, 0, td_tensor_ndim(t), td_tensor_shape(t), &pos);
  return 1;
}

/* t:to_bytes(): the raw contiguous element bytes as a string (host copy). */
static int td__m_to_bytes(lua_State *L) {
  td_tensor_t *t = td__tlua_check(L, 1);
  if (td_tensor_device(t) == TD_CPU && td_tensor_is_contiguous(t)) {
    lua_pushlstring(L, td_tensor_data(t), td_tensor_nbytes(t));
    return 1;
  }
  td_tensor_t *h = NULL;
  TD__TRY(L, "to_bytes", td_tensor_to(&h, t, TD_CPU, td_tensor_dtype(t)));
  td__tlua_push(L, h);
  lua_pushlstring(L, td_tensor_data(h), td_tensor_nbytes(h));
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
static int td__m_get(lua_State *L) {
  td_tensor_t *t = td__tlua_check(L, 1);
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
static int td__m_set(lua_State *L) {
  td_tensor_t *t = td__tlua_mut(L, "set", 1);
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
static int td__m_item(lua_State *L) {
  td_tensor_t *t = td__tlua_check(L, 1);
  if (td_tensor_numel(t) != 1)
    luaL_error(L, "tide.tensor.item: tensor has %d elements, not 1", (int)td_tensor_numel(t));
  td_tensor_t *h = NULL;
  TD__TRY(L, "item", td_tensor_to(&h, t, TD_CPU, TD_I64 == td_tensor_dtype(t) ? TD_I64 : TD_F32));
  td__tlua_push(L, h);
  if (td_tensor_dtype(h) == TD_I64)
    lua_pushnumber(L, (lua_Number) * (int64_t *)td_tensor_data(h));
  else
    lua_pushnumber(L, *(float *)td_tensor_data(h));
  return 1;
}
/* -- Module-level utilities ---------------------------------------------------------- */

/* T.cuda_available() -> bool, reason */
static int td__l_cuda_available(lua_State *L) {
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
static int td__l_device_count(lua_State *L) {
  lua_pushinteger(L, td_cuda_device_count());
  return 1;
}

/* T.memory() -> {host_bytes = live host tensor bytes} */
static int td__l_memory(lua_State *L) {
  lua_createtable(L, 0, 1);
  lua_pushnumber(L, (lua_Number)td_tensor_host_bytes());
  lua_setfield(L, -2, "host_bytes");
  return 1;
}

static int td__l_is_tensor(lua_State *L) {
  lua_pushboolean(L, td__tlua_is_tensor(L, 1));
  return 1;
}

/* T.synchronize(): waits for queued CUDA work (no-op without a GPU). */
static int td__l_synchronize(lua_State *L) {
  int err = 0;
  const td_cuda_plugin_t *p = td_cuda_device_count() > 0 ? td_cuda_plugin(&err) : NULL;
  if (p) TD__TRY(L, "synchronize", p->synchronize());
  return 0;
}

/* T.device_name([i = 0]) -> "NVIDIA H100 ..." or "cpu". */
static int td__l_device_name(lua_State *L) {
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

/* -- Registration ----------------------------------------------------------------- */

static const luaL_Reg td__methods[] = {{"shape", td__m_shape},
                                       {"size", td__m_size},
                                       {"strides", td__m_strides},
                                       {"dtype", td__m_dtype},
                                       {"device", td__m_device},
                                       {"numel", td__m_numel},
                                       {"dim", td__m_dim},
                                       {"nbytes", td__m_nbytes},
                                       {"is_contiguous", td__m_is_contiguous},
                                       {"view", td__m_view},
                                       {"reshape", td__m_reshape},
                                       {"slice", td__m_slice},
                                       {"transpose", td__m_transpose},
                                       {"contiguous", td__m_contiguous},
                                       {"clone", td__m_clone},
                                       {"to", td__m_to},
                                       {"copy", td__m_copy},
                                       {"fill", td__m_fill},
                                       {"zero", td__m_zero},
                                       {"to_table", td__m_to_table},
                                       {"to_bytes", td__m_to_bytes},
                                       {"get", td__m_get},
                                       {"set", td__m_set},
                                       {"item", td__m_item},
                                       {"free", td__m_free},
                                       {NULL, NULL}};

static const luaL_Reg td__funcs[] = {{"cuda_available", td__l_cuda_available},
                                     {"device_count", td__l_device_count},
                                     {"memory", td__l_memory},
                                     {"is_tensor", td__l_is_tensor},
                                     {"synchronize", td__l_synchronize},
                                     {"device_name", td__l_device_name},
                                     {NULL, NULL}};

/* Boxes t in a new userdata without a metatable check (td__tlua_push's core). */
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
  if (!td__tlua_is_tensor(L, idx)) return NULL;
  return ((td__box_t *)lua_touserdata(L, idx))->t;
}

int luaopen_tide_tensor(lua_State *L) {
  luaL_newmetatable(L, TD__MT);
  lua_pushstring(L, TD__MT);
  lua_setfield(L, -2, "__name");
  lua_pushstring(L, TD__MT);
  lua_setfield(L, -2, "__tide_module");
  luaL_register(L, NULL, td__tlua_new_meta);
  lua_pushcfunction(L, td__m_gc);
  lua_setfield(L, -2, "__gc");
  lua_pushcfunction(L, td__m_tostring);
  lua_setfield(L, -2, "__tostring");
  luaL_register(L, NULL, td__tlua_ops_meta);
  lua_newtable(L);
  luaL_register(L, NULL, td__methods);
  luaL_register(L, NULL, td__tlua_ops_methods);
  lua_setfield(L, -2, "__index");
  lua_pop(L, 1);
  td__tlua_open_comm(L);
  lua_newtable(L);
  luaL_register(L, NULL, td__funcs);
  luaL_register(L, NULL, td__tlua_new_funcs);
  luaL_register(L, NULL, td__tlua_ops_funcs);
  return 1;
}
