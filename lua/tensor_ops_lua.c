/* tide.tensor: the ops.  Linear algebra, elementwise ops, activations,
 * normalisation, embedding, attention, losses, the optimizer step and
 * sampling (T.matmul ... T.sample, t:sum(), t:mean()), the arithmetic
 * metamethods (a + b, a - b, a * b, a / n, -a), and NCCL communicators
 * (T.nccl_comm and the "tide.nccl_comm" userdata).  Each op checks its
 * arguments, then calls the op table of the tensors' device.  Registered
 * by luaopen_tide_tensor (tensor_lua.c) through the tables at the end;
 * helpers in tensor_lua_int.h.
 */
#include <lauxlib.h>
#include <lua.h>
#include <math.h>
#include <string.h>

#include "nccl_comm.h"
#include "ops.h"
#include "tensor.h"
#include "tensor_lua_int.h"

/* -- Ops: linear algebra ------------------------------------------------------ */

/* T.matmul(a, b [, {trans_a, trans_b, alpha = 1, beta = 0, out}])
 * a (..., K) @ b (K, N) -> (..., N); or batched a (B,M,K) @ b (B,K,N).
 * trans_a needs a 2-D a stored (K, M); trans_b takes b stored (N, K). */
static int td__l_matmul(lua_State *L) {
  const char *fn = "matmul";
  td_tensor_t *a = td__tlua_contig(L, fn, 1), *b = td__tlua_contig(L, fn, 2);
  td__tlua_same_device(L, fn, a, b);
  int dtype = td_tensor_dtype(a);
  if (td_tensor_dtype(b) != dtype)
    luaL_error(L, "tide.tensor.matmul: dtypes differ (%s and %s)", td_dtype_name(dtype),
               td_dtype_name(td_tensor_dtype(b)));
  int ta = td__tlua_opt_bool(L, 3, "trans_a", 0), tb = td__tlua_opt_bool(L, 3, "trans_b", 0);
  float alpha = (float)td__tlua_opt_num(L, 3, "alpha", 1);
  float beta = (float)td__tlua_opt_num(L, 3, "beta", 0);
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
    td__tlua_shape_str(a, x, sizeof(x));
    td__tlua_shape_str(b, y, sizeof(y));
    luaL_error(L, "tide.tensor.matmul: inner dimensions differ: %s @ %s%s", x, y,
               ta || tb ? " (with transposes)" : "");
  }
  int given;
  td_tensor_t *o = td__tlua_out(L, fn, 3, "out", TD_F32, td_tensor_device(a), on, oshape, 0, &given);
  if (beta != 0 && !given) luaL_error(L, "tide.tensor.matmul: beta needs an 'out' tensor");
  const td_ops_t *ops = td__tlua_ops(L, fn, a);
  size_t es = td_dtype_size(dtype);
  int m = td__tlua_int_arg(L, fn, M, "M"), n = td__tlua_int_arg(L, fn, N, "N"),
      k = td__tlua_int_arg(L, fn, K, "K");
  for (int64_t i = 0; i < batch; i++)
    TD__TRY(L, fn,
            ops->matmul(dtype, (float *)td_tensor_data(o) + i * M * N,
                        (const char *)td_tensor_data(a) + (size_t)(i * M * K) * es,
                        (const char *)td_tensor_data(b) + (size_t)(i * K * N) * es, m, n, k, ta, tb, alpha,
                        beta));
  return 1;
}

/* -- Ops: elementwise ---------------------------------------------------------- */

/* Period of b broadcast against a: b's shape (minus leading 1s) must be a
 * suffix of a's shape. */
static int64_t td__bcast(lua_State *L, const char *fn, const td_tensor_t *a, const td_tensor_t *b) {
  int an = td_tensor_ndim(a), bn = td_tensor_ndim(b);
  const int64_t *as = td_tensor_shape(a), *bs = td_tensor_shape(b);
  int skip = 0;
  while (skip < bn && bs[skip] == 1) skip++;
  int ok = bn - skip <= an;
  for (int i = 0; ok && i < bn - skip; i++) ok = bs[bn - 1 - i] == as[an - 1 - i];
  if (!ok) {
    char x[160], y[160];
    td__tlua_shape_str(a, x, sizeof(x));
    td__tlua_shape_str(b, y, sizeof(y));
    luaL_error(L, "tide.tensor.%s: shape %s does not broadcast to %s", fn, y, x);
  }
  return td_tensor_numel(b);
}

/* Tensor argument, or a number turned into a 1-element tensor on ref's device. */
static td_tensor_t *td__tensor_or_scalar(lua_State *L, const char *fn, int idx, const td_tensor_t *ref) {
  if (lua_type(L, idx) != LUA_TNUMBER) return td__tlua_contig(L, fn, idx);
  td_tensor_t *h = NULL, *d = NULL;
  TD__TRY(L, fn, td_tensor_empty(&h, TD_F32, TD_CPU, 0, NULL));
  td__tlua_push(L, h);
  *(float *)td_tensor_data(h) = (float)lua_tonumber(L, idx);
  if (td_tensor_device(ref) == TD_CPU) return h;
  TD__TRY(L, fn, td_tensor_to(&d, h, td_tensor_device(ref), TD_F32));
  return td__tlua_push(L, d);
}

static int td__add(lua_State *L, const char *fn, float alpha, float beta) {
  td_tensor_t *a = td__tlua_contig(L, fn, 1);
  td__tlua_want_dtype(L, fn, a, TD_F32, "a");
  td_tensor_t *b = td__tensor_or_scalar(L, fn, 2, a);
  td__tlua_want_dtype(L, fn, b, TD_F32, "b");
  td__tlua_same_device(L, fn, a, b);
  int64_t nb = td__bcast(L, fn, a, b);
  alpha *= (float)td__tlua_opt_num(L, 3, "alpha", 1);
  beta *= (float)td__tlua_opt_num(L, 3, "beta", 1);
  td_tensor_t *o = td__tlua_out(L, fn, 3, "out", TD_F32, td_tensor_device(a), td_tensor_ndim(a),
                                td_tensor_shape(a), 0, NULL);
  const td_ops_t *ops = td__tlua_ops(L, fn, a);
  if (td_tensor_numel(a) > 0)
    TD__TRY(L, fn,
            ops->add(td_tensor_data(o), td_tensor_data(a), td_tensor_data(b), td_tensor_numel(a), nb, alpha,
                     beta));
  return 1;
}

/* T.add(a, b [, {alpha = 1, beta = 1, out}]) -> alpha*a + beta*b (b broadcasts). */
static int td__l_add(lua_State *L) { return td__add(L, "add", 1, 1); }
/* T.sub(a, b [, opts]) -> a - b. */
static int td__l_sub(lua_State *L) { return td__add(L, "sub", 1, -1); }

/* T.mul(a, b [, {out}]) -> a * b elementwise (b broadcasts, or a number). */
static int td__l_mul(lua_State *L) {
  const char *fn = "mul";
  td_tensor_t *a = td__tlua_contig(L, fn, 1);
  td__tlua_want_dtype(L, fn, a, TD_F32, "a");
  td_tensor_t *b = td__tensor_or_scalar(L, fn, 2, a);
  td__tlua_want_dtype(L, fn, b, TD_F32, "b");
  td__tlua_same_device(L, fn, a, b);
  int64_t nb = td__bcast(L, fn, a, b);
  td_tensor_t *o = td__tlua_out(L, fn, 3, "out", TD_F32, td_tensor_device(a), td_tensor_ndim(a),
                                td_tensor_shape(a), 0, NULL);
  const td_ops_t *ops = td__tlua_ops(L, fn, a);
  if (td_tensor_numel(a) > 0)
    TD__TRY(L, fn, ops->mul(td_tensor_data(o), td_tensor_data(a), td_tensor_data(b), td_tensor_numel(a), nb));
  return 1;
}

/* T.scale(a, s [, {out}]) -> s * a. */
static int td__l_scale(lua_State *L) {
  const char *fn = "scale";
  td_tensor_t *a = td__tlua_contig(L, fn, 1);
  td__tlua_want_dtype(L, fn, a, TD_F32, "a");
  float s = (float)luaL_checknumber(L, 2);
  td_tensor_t *o = td__tlua_out(L, fn, 3, "out", TD_F32, td_tensor_device(a), td_tensor_ndim(a),
                                td_tensor_shape(a), 0, NULL);
  const td_ops_t *ops = td__tlua_ops(L, fn, a);
  int64_t n = td_tensor_numel(a);
  if (n > 0) TD__TRY(L, fn, ops->add(td_tensor_data(o), td_tensor_data(a), td_tensor_data(a), n, n, s, 0));
  return 1;
}

/* T.sum_rows(x [, {out, accumulate}]) -> (last dim): sums over all leading
 * dimensions (bias gradients). */
static int td__l_sum_rows(lua_State *L) {
  const char *fn = "sum_rows";
  td_tensor_t *x = td__tlua_contig(L, fn, 1);
  td__tlua_want_dtype(L, fn, x, TD_F32, "x");
  if (td_tensor_ndim(x) < 1) luaL_error(L, "tide.tensor.sum_rows: x must have a dimension");
  int64_t cols = td_tensor_shape(x)[td_tensor_ndim(x) - 1];
  int64_t rows = cols ? td_tensor_numel(x) / cols : 0;
  int accum = td__tlua_opt_bool(L, 2, "accumulate", 0);
  td_tensor_t *o = td__tlua_out(L, fn, 2, "out", TD_F32, td_tensor_device(x), 1, &cols, 0, NULL);
  TD__TRY(L, fn, td__tlua_ops(L, fn, x)->sum_rows(td_tensor_data(o), td_tensor_data(x), rows, cols, accum));
  return 1;
}

/* T.mul_backward(dout, a, b [, {accumulate, da, db}]) -> da, db for out = a*b
 * (db summed back to b's broadcast shape). */
static int td__l_mul_backward(lua_State *L) {
  const char *fn = "mul_backward";
  td_tensor_t *dy = td__tlua_contig(L, fn, 1), *a = td__tlua_contig(L, fn, 2), *b = td__tlua_contig(L, fn, 3);
  td__tlua_want_dtype(L, fn, dy, TD_F32, "dout");
  td__tlua_same_device(L, fn, dy, a);
  td__tlua_same_device(L, fn, dy, b);
  if (td_tensor_numel(dy) != td_tensor_numel(a))
    luaL_error(L, "tide.tensor.mul_backward: dout and a differ in size");
  int64_t nb = td__bcast(L, fn, a, b), n = td_tensor_numel(a);
  int accum = td__tlua_opt_bool(L, 4, "accumulate", 0);
  const td_ops_t *ops = td__tlua_ops(L, fn, a);
  td_tensor_t *tmp = NULL;
  TD__TRY(L, fn, td_tensor_empty(&tmp, TD_F32, td_tensor_device(a), td_tensor_ndim(a), td_tensor_shape(a)));
  td__tlua_push(L, tmp);
  int dai = 0;
  td_tensor_t *da = td__tlua_out(L, fn, 4, "da", TD_F32, td_tensor_device(a), td_tensor_ndim(a),
                                 td_tensor_shape(a), 0, NULL);
  dai = lua_gettop(L);
  td_tensor_t *db = td__tlua_out(L, fn, 4, "db", TD_F32, td_tensor_device(a), td_tensor_ndim(b),
                                 td_tensor_shape(b), 0, NULL);
  if (n > 0) {
    /* da (+)= dy * b */
    TD__TRY(L, fn, ops->mul(td_tensor_data(tmp), td_tensor_data(dy), td_tensor_data(b), n, nb));
    if (accum)
      TD__TRY(L, fn, ops->add(td_tensor_data(da), td_tensor_data(da), td_tensor_data(tmp), n, n, 1, 1));
    else TD__TRY(L, fn, ops->add(td_tensor_data(da), td_tensor_data(tmp), td_tensor_data(tmp), n, n, 1, 0));
    /* db (+)= sum over rows of dy * a */
    TD__TRY(L, fn, ops->mul(td_tensor_data(tmp), td_tensor_data(dy), td_tensor_data(a), n, n));
    TD__TRY(L, fn, ops->sum_rows(td_tensor_data(db), td_tensor_data(tmp), n / nb, nb, accum));
  }
  lua_pushvalue(L, dai);
  lua_insert(L, -2);
  return 2;
}

static double td__sum(lua_State *L, const char *fn, int idx) {
  td_tensor_t *x = td__tlua_contig(L, fn, idx);
  td__tlua_want_dtype(L, fn, x, TD_F32, "x");
  double s = 0;
  TD__TRY(L, fn, td__tlua_ops(L, fn, x)->sum(&s, td_tensor_data(x), td_tensor_numel(x)));
  return s;
}

/* T.sum(x) -> number (accumulated in double). */
static int td__l_sum(lua_State *L) {
  lua_pushnumber(L, td__sum(L, "sum", 1));
  return 1;
}

/* T.dot(a, b) -> number: sum of a * b over all elements (same numel). */
static int td__l_dot(lua_State *L) {
  const char *fn = "dot";
  td_tensor_t *a = td__tlua_contig(L, fn, 1), *b = td__tlua_contig(L, fn, 2);
  td__tlua_want_dtype(L, fn, a, TD_F32, "a");
  td__tlua_want_dtype(L, fn, b, TD_F32, "b");
  td__tlua_same_device(L, fn, a, b);
  if (td_tensor_numel(a) != td_tensor_numel(b))
    luaL_error(L, "tide.tensor.dot: sizes differ (%d and %d)", (int)td_tensor_numel(a),
               (int)td_tensor_numel(b));
  double s = 0;
  TD__TRY(L, fn, td__tlua_ops(L, fn, a)->dot(&s, td_tensor_data(a), td_tensor_data(b), td_tensor_numel(a)));
  lua_pushnumber(L, s);
  return 1;
}

/* T.mean(x) -> number. */
static int td__l_mean(lua_State *L) {
  double s = td__sum(L, "mean", 1);
  int64_t n = td_tensor_numel(td__tlua_check(L, 1));
  lua_pushnumber(L, n ? s / (double)n : NAN);
  return 1;
}

/* -- Ops: activations and normalisation ------------------------------------------ */

static int64_t td__cols(lua_State *L, const char *fn, const td_tensor_t *x) {
  if (td_tensor_ndim(x) < 1) luaL_error(L, "tide.tensor.%s: x must have a dimension", fn);
  return td_tensor_shape(x)[td_tensor_ndim(x) - 1];
}

/* T.softmax(x [, {out}]) over the last dimension. */
static int td__l_softmax(lua_State *L) {
  const char *fn = "softmax";
  td_tensor_t *x = td__tlua_contig(L, fn, 1);
  td__tlua_want_dtype(L, fn, x, TD_F32, "x");
  int64_t cols = td__cols(L, fn, x), rows = cols ? td_tensor_numel(x) / cols : 0;
  td_tensor_t *o = td__tlua_out(L, fn, 2, "out", TD_F32, td_tensor_device(x), td_tensor_ndim(x),
                                td_tensor_shape(x), 0, NULL);
  TD__TRY(L, fn, td__tlua_ops(L, fn, x)->softmax_fwd(td_tensor_data(o), td_tensor_data(x), rows, cols));
  return 1;
}

/* Checks that tensor at idx has the same element count as ref. */
static void td__same_numel(lua_State *L, const char *fn, const td_tensor_t *ref, const td_tensor_t *t,
                           const char *what) {
  if (td_tensor_numel(ref) != td_tensor_numel(t))
    luaL_error(L, "tide.tensor.%s: %s has %d elements, expected %d", fn, what, (int)td_tensor_numel(t),
               (int)td_tensor_numel(ref));
}

/* T.softmax_backward(dy, y [, {out, accumulate}]) -> dx. */
static int td__l_softmax_backward(lua_State *L) {
  const char *fn = "softmax_backward";
  td_tensor_t *dy = td__tlua_contig(L, fn, 1), *y = td__tlua_contig(L, fn, 2);
  td__tlua_want_dtype(L, fn, dy, TD_F32, "dy");
  td__tlua_want_dtype(L, fn, y, TD_F32, "y");
  td__tlua_same_device(L, fn, dy, y);
  td__same_numel(L, fn, y, dy, "dy");
  int64_t cols = td__cols(L, fn, y), rows = cols ? td_tensor_numel(y) / cols : 0;
  int accum = td__tlua_opt_bool(L, 3, "accumulate", 0);
  td_tensor_t *o = td__tlua_out(L, fn, 3, "out", TD_F32, td_tensor_device(y), td_tensor_ndim(y),
                                td_tensor_shape(y), 0, NULL);
  TD__TRY(L, fn,
          td__tlua_ops(L, fn, y)->softmax_bwd(td_tensor_data(o), td_tensor_data(dy), td_tensor_data(y), rows,
                                              cols, accum));
  return 1;
}

/* T.layernorm(x, w, b [, {eps = 1e-5, out}]) -> y, mean, rstd. */
static int td__l_layernorm(lua_State *L) {
  const char *fn = "layernorm";
  td_tensor_t *x = td__tlua_contig(L, fn, 1);
  td__tlua_want_dtype(L, fn, x, TD_F32, "x");
  int64_t cols = td__cols(L, fn, x), rows = cols ? td_tensor_numel(x) / cols : 0;
  td_tensor_t *w = td__tlua_contig(L, fn, 2), *b = td__tlua_contig(L, fn, 3);
  td__tlua_want_dtype(L, fn, w, TD_F32, "w");
  td__tlua_want_dtype(L, fn, b, TD_F32, "b");
  td__tlua_same_device(L, fn, x, w);
  td__tlua_same_device(L, fn, x, b);
  if (td_tensor_numel(w) != cols || td_tensor_numel(b) != cols)
    luaL_error(L, "tide.tensor.layernorm: w and b must have %d elements", (int)cols);
  float eps = (float)td__tlua_opt_num(L, 4, "eps", 1e-5);
  int dev = td_tensor_device(x);
  td_tensor_t *y = td__tlua_out(L, fn, 4, "out", TD_F32, dev, td_tensor_ndim(x), td_tensor_shape(x), 0, NULL);
  int yi = lua_gettop(L);
  td_tensor_t *m =
      td__tlua_out(L, fn, 4, "mean", TD_F32, dev, td_tensor_ndim(x) - 1, td_tensor_shape(x), 0, NULL);
  int mi = lua_gettop(L);
  td_tensor_t *r =
      td__tlua_out(L, fn, 4, "rstd", TD_F32, dev, td_tensor_ndim(x) - 1, td_tensor_shape(x), 0, NULL);
  int ri = lua_gettop(L);
  TD__TRY(L, fn,
          td__tlua_ops(L, fn, x)->layernorm_fwd(td_tensor_data(y), td_tensor_data(m), td_tensor_data(r),
                                                td_tensor_data(x), td_tensor_data(w), td_tensor_data(b), rows,
                                                cols, eps));
  lua_pushvalue(L, yi);
  lua_pushvalue(L, mi);
  lua_pushvalue(L, ri);
  return 3;
}

/* T.layernorm_backward(dy, x, w, mean, rstd [, {dx, dw, db, accumulate}])
 * -> dx, dw, db. */
static int td__l_layernorm_backward(lua_State *L) {
  const char *fn = "layernorm_backward";
  td_tensor_t *dy = td__tlua_contig(L, fn, 1), *x = td__tlua_contig(L, fn, 2);
  td__tlua_want_dtype(L, fn, x, TD_F32, "x");
  int64_t cols = td__cols(L, fn, x), rows = cols ? td_tensor_numel(x) / cols : 0;
  const float *pdy = td__tlua_in_f32(L, fn, 1, x, "dy");
  const float *pw = td__tlua_in_f32(L, fn, 3, x, "w");
  const float *pm = td__tlua_in_f32(L, fn, 4, x, "mean");
  const float *pr = td__tlua_in_f32(L, fn, 5, x, "rstd");
  td__same_numel(L, fn, x, dy, "dy");
  if (td_tensor_numel(td__tlua_check(L, 3)) != cols || td_tensor_numel(td__tlua_check(L, 4)) != rows ||
      td_tensor_numel(td__tlua_check(L, 5)) != rows)
    luaL_error(L, "tide.tensor.layernorm_backward: w, mean or rstd has the wrong size");
  int accum = td__tlua_opt_bool(L, 6, "accumulate", 0);
  int dev = td_tensor_device(x);
  td_tensor_t *dx = td__tlua_out(L, fn, 6, "dx", TD_F32, dev, td_tensor_ndim(x), td_tensor_shape(x), 0, NULL);
  int xi = lua_gettop(L);
  td_tensor_t *dw = td__tlua_out(L, fn, 6, "dw", TD_F32, dev, 1, &cols, 0, NULL);
  int wi = lua_gettop(L);
  td_tensor_t *db = td__tlua_out(L, fn, 6, "db", TD_F32, dev, 1, &cols, 0, NULL);
  int bi = lua_gettop(L);
  TD__TRY(L, fn,
          td__tlua_ops(L, fn, x)->layernorm_bwd(td_tensor_data(dx), td_tensor_data(dw), td_tensor_data(db),
                                                pdy, td_tensor_data(x), pw, pm, pr, rows, cols, accum));
  lua_pushvalue(L, xi);
  lua_pushvalue(L, wi);
  lua_pushvalue(L, bi);
  return 3;
}

/* T.gelu(x [, {out}]) (tanh approximation). */
static int td__l_gelu(lua_State *L) {
  const char *fn = "gelu";
  td_tensor_t *x = td__tlua_contig(L, fn, 1);
  td__tlua_want_dtype(L, fn, x, TD_F32, "x");
  td_tensor_t *o = td__tlua_out(L, fn, 2, "out", TD_F32, td_tensor_device(x), td_tensor_ndim(x),
                                td_tensor_shape(x), 0, NULL);
  TD__TRY(L, fn, td__tlua_ops(L, fn, x)->gelu_fwd(td_tensor_data(o), td_tensor_data(x), td_tensor_numel(x)));
  return 1;
}

/* T.gelu_backward(dy, x [, {out, accumulate}]) -> dx. */
static int td__l_gelu_backward(lua_State *L) {
  const char *fn = "gelu_backward";
  td_tensor_t *x = td__tlua_contig(L, fn, 2);
  td__tlua_want_dtype(L, fn, x, TD_F32, "x");
  const float *pdy = td__tlua_in_f32(L, fn, 1, x, "dy");
  td__same_numel(L, fn, x, td__tlua_check(L, 1), "dy");
  int accum = td__tlua_opt_bool(L, 3, "accumulate", 0);
  td_tensor_t *o = td__tlua_out(L, fn, 3, "out", TD_F32, td_tensor_device(x), td_tensor_ndim(x),
                                td_tensor_shape(x), 0, NULL);
  TD__TRY(
      L, fn,
      td__tlua_ops(L, fn, x)->gelu_bwd(td_tensor_data(o), pdy, td_tensor_data(x), td_tensor_numel(x), accum));
  return 1;
}

/* -- Ops: embedding, attention, loss --------------------------------------------- */

/* T.embedding(ids, table [, {out}]) -> ids.shape .. {dim}. */
static int td__l_embedding(lua_State *L) {
  const char *fn = "embedding";
  td_tensor_t *tab = td__tlua_contig(L, fn, 2);
  td__tlua_want_dtype(L, fn, tab, TD_F32, "table");
  if (td_tensor_ndim(tab) != 2) luaL_error(L, "tide.tensor.embedding: table must be 2-D");
  td_tensor_t *ids = td__tlua_check(L, 1);
  const int32_t *pid = td__tlua_in_i32(L, fn, 1, tab, "ids");
  int64_t shape[TD_MAX_DIMS];
  int nd = td_tensor_ndim(ids);
  if (nd + 1 > TD_MAX_DIMS) luaL_error(L, "tide.tensor.embedding: too many dimensions");
  memcpy(shape, td_tensor_shape(ids), sizeof(int64_t) * (size_t)nd);
  shape[nd] = td_tensor_shape(tab)[1];
  td_tensor_t *o = td__tlua_out(L, fn, 3, "out", TD_F32, td_tensor_device(tab), nd + 1, shape, 0, NULL);
  TD__TRY(L, fn,
          td__tlua_ops(L, fn, tab)
              ->embedding_fwd(td_tensor_data(o), pid, td_tensor_data(tab), td_tensor_numel(ids),
                              td_tensor_shape(tab)[0], td_tensor_shape(tab)[1]));
  return 1;
}

/* T.embedding_backward(dy, ids, vocab_or_dtable) -> dtable: a new (vocab,
 * dim) gradient, or accumulated into the given dtable. */
static int td__l_embedding_backward(lua_State *L) {
  const char *fn = "embedding_backward";
  td_tensor_t *dy = td__tlua_contig(L, fn, 1);
  td__tlua_want_dtype(L, fn, dy, TD_F32, "dy");
  td_tensor_t *ids = td__tlua_check(L, 2);
  const int32_t *pid = td__tlua_in_i32(L, fn, 2, dy, "ids");
  int64_t dim = td__cols(L, fn, dy);
  if (td_tensor_numel(dy) != td_tensor_numel(ids) * dim)
    luaL_error(L, "tide.tensor.embedding_backward: dy must be ids.shape .. {dim}");
  td_tensor_t *dt;
  if (lua_type(L, 3) == LUA_TNUMBER) {
    int64_t shape[2] = {(int64_t)lua_tonumber(L, 3), dim};
    dt = NULL;
    TD__TRY(L, fn, td_tensor_zeros(&dt, TD_F32, td_tensor_device(dy), 2, shape));
    td__tlua_push(L, dt);
  } else {
    dt = td__tlua_check(L, 3);
    if (!td_tensor_is_contiguous(dt) || td_tensor_ndim(dt) != 2 || td_tensor_shape(dt)[1] != dim ||
        td_tensor_dtype(dt) != TD_F32)
      luaL_error(L, "tide.tensor.embedding_backward: dtable must be a contiguous f32 (vocab, %d)", (int)dim);
    td__tlua_same_device(L, fn, dy, dt);
    lua_pushvalue(L, 3);
  }
  TD__TRY(L, fn,
          td__tlua_ops(L, fn, dy)->embedding_bwd(td_tensor_data(dt), td_tensor_data(dy), pid,
                                                 td_tensor_numel(ids), td_tensor_shape(dt)[0], dim));
  return 1;
}

/* Reads B, T, C from a (B,T,3C) qkv tensor. */
static void td__qkv_dims(lua_State *L, const char *fn, const td_tensor_t *qkv, int nh, int *B, int *T,
                         int *C) {
  if (td_tensor_ndim(qkv) != 3 || td_tensor_shape(qkv)[2] % 3)
    luaL_error(L, "tide.tensor.%s: qkv must be (B, T, 3C)", fn);
  *B = td__tlua_int_arg(L, fn, td_tensor_shape(qkv)[0], "B");
  *T = td__tlua_int_arg(L, fn, td_tensor_shape(qkv)[1], "T");
  *C = td__tlua_int_arg(L, fn, td_tensor_shape(qkv)[2] / 3, "C");
  if (nh <= 0 || *C % nh) luaL_error(L, "tide.tensor.%s: n_head %d does not divide C = %d", fn, nh, *C);
}

/* T.attention(qkv, n_head [, {out, att}]) -> out (B,T,C), att (B,NH,T,T). */
static int td__l_attention(lua_State *L) {
  const char *fn = "attention";
  td_tensor_t *qkv = td__tlua_contig(L, fn, 1);
  td__tlua_want_dtype(L, fn, qkv, TD_F32, "qkv");
  int nh = (int)luaL_checkinteger(L, 2), B, T, C;
  td__qkv_dims(L, fn, qkv, nh, &B, &T, &C);
  int dev = td_tensor_device(qkv);
  int64_t os[3] = {B, T, C}, as[4] = {B, nh, T, T};
  td_tensor_t *o = td__tlua_out(L, fn, 3, "out", TD_F32, dev, 3, os, 0, NULL);
  int oi = lua_gettop(L);
  td_tensor_t *a = td__tlua_out(L, fn, 3, "att", TD_F32, dev, 4, as, 0, NULL);
  TD__TRY(L, fn,
          td__tlua_ops(L, fn, qkv)
              ->attention_fwd(td_tensor_data(o), td_tensor_data(a), td_tensor_data(qkv), B, T, C, nh));
  lua_pushvalue(L, oi);
  lua_insert(L, -2);
  return 2;
}

/* T.attention_backward(dout, qkv, att, n_head [, {out, accumulate}]) -> dqkv. */
static int td__l_attention_backward(lua_State *L) {
  const char *fn = "attention_backward";
  td_tensor_t *qkv = td__tlua_contig(L, fn, 2);
  td__tlua_want_dtype(L, fn, qkv, TD_F32, "qkv");
  int nh = (int)luaL_checkinteger(L, 4), B, T, C;
  td__qkv_dims(L, fn, qkv, nh, &B, &T, &C);
  const float *pd = td__tlua_in_f32(L, fn, 1, qkv, "dout");
  const float *pa = td__tlua_in_f32(L, fn, 3, qkv, "att");
  if (td_tensor_numel(td__tlua_check(L, 1)) != (int64_t)B * T * C ||
      td_tensor_numel(td__tlua_check(L, 3)) != (int64_t)B * nh * T * T)
    luaL_error(L, "tide.tensor.attention_backward: dout or att has the wrong size");
  int accum = td__tlua_opt_bool(L, 5, "accumulate", 0);
  td_tensor_t *o =
      td__tlua_out(L, fn, 5, "out", TD_F32, td_tensor_device(qkv), 3, td_tensor_shape(qkv), 0, NULL);
  TD__TRY(L, fn,
          td__tlua_ops(L, fn, qkv)
              ->attention_bwd(td_tensor_data(o), pd, td_tensor_data(qkv), pa, B, T, C, nh, accum));
  return 1;
}

/* T.attention_cached(qkv, kcache, vcache, pos, n_head [, {out}]) -> out.
 * qkv (B,Tn,3C) holds positions pos..pos+Tn-1 (pos = tokens already cached,
 * 0-based); caches (B,Tmax,C) are updated in place. */
static int td__l_attention_cached(lua_State *L) {
  const char *fn = "attention_cached";
  td_tensor_t *qkv = td__tlua_contig(L, fn, 1);
  td__tlua_want_dtype(L, fn, qkv, TD_F32, "qkv");
  td_tensor_t *kc = td__tlua_mut(L, fn, 2), *vc = td__tlua_mut(L, fn, 3);
  int pos = (int)luaL_checkinteger(L, 4), nh = (int)luaL_checkinteger(L, 5), B, T, C;
  td__qkv_dims(L, fn, qkv, nh, &B, &T, &C);
  for (int i = 0; i < 2; i++) {
    td_tensor_t *c = i ? vc : kc;
    if (!td_tensor_is_contiguous(c) || td_tensor_dtype(c) != TD_F32 || td_tensor_ndim(c) != 3 ||
        td_tensor_shape(c)[0] != B || td_tensor_shape(c)[2] != C)
      luaL_error(L, "tide.tensor.attention_cached: caches must be contiguous f32 (%d, Tmax, %d)", B, C);
    td__tlua_same_device(L, fn, qkv, c);
  }
  int tmax = td__tlua_int_arg(L, fn, td_tensor_shape(kc)[1], "Tmax");
  if (td_tensor_shape(vc)[1] != tmax) luaL_error(L, "tide.tensor.attention_cached: caches differ");
  if (pos < 0 || pos + T > tmax)
    luaL_error(L, "tide.tensor.attention_cached: positions %d..%d exceed the cache (%d)", pos, pos + T, tmax);
  int64_t os[3] = {B, T, C};
  td_tensor_t *o = td__tlua_out(L, fn, 6, "out", TD_F32, td_tensor_device(qkv), 3, os, 0, NULL);
  TD__TRY(L, fn,
          td__tlua_ops(L, fn, qkv)
              ->attention_cached(td_tensor_data(o), td_tensor_data(kc), td_tensor_data(vc),
                                 td_tensor_data(qkv), B, T, pos, tmax, C, nh));
  return 1;
}

/* Rows/V of logits (..., V) against targets (...). */
static void td__ce_dims(lua_State *L, const char *fn, const td_tensor_t *logits, const td_tensor_t *targets,
                        int64_t *rows, int64_t *V) {
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
    td__tlua_push(L, h);
    p = td_tensor_data(h);
  }
  int64_t n = 0, rows = td_tensor_numel(targets);
  for (int64_t i = 0; i < rows; i++) n += p[i] != -1;
  return n;
}

/* T.cross_entropy(logits, targets [, {out}]) -> mean loss (number), losses
 * tensor.  targets is i32; -1 entries are ignored. */
static int td__l_cross_entropy(lua_State *L) {
  const char *fn = "cross_entropy";
  td_tensor_t *lg = td__tlua_contig(L, fn, 1);
  td__tlua_want_dtype(L, fn, lg, TD_F32, "logits");
  td_tensor_t *tg = td__tlua_contig(L, fn, 2);
  td__tlua_want_dtype(L, fn, tg, TD_I32, "targets");
  td__tlua_same_device(L, fn, lg, tg);
  int64_t rows, V;
  td__ce_dims(L, fn, lg, tg, &rows, &V);
  td_tensor_t *o = td__tlua_out(L, fn, 3, "out", TD_F32, td_tensor_device(lg), td_tensor_ndim(tg),
                                td_tensor_shape(tg), 0, NULL);
  int oi = lua_gettop(L);
  const td_ops_t *ops = td__tlua_ops(L, fn, lg);
  TD__TRY(L, fn, ops->cross_entropy_fwd(td_tensor_data(o), td_tensor_data(lg), td_tensor_data(tg), rows, V));
  double s = 0;
  TD__TRY(L, fn, ops->sum(&s, td_tensor_data(o), rows));
  int64_t valid = td__ce_valid(L, fn, tg);
  lua_pushnumber(L, valid ? s / (double)valid : 0);
  lua_pushvalue(L, oi);
  return 2;
}

/* T.cross_entropy_backward(logits, targets [, {scale, out, accumulate}])
 * -> dlogits of the mean loss (scale defaults to 1 / valid targets). */
static int td__l_cross_entropy_backward(lua_State *L) {
  const char *fn = "cross_entropy_backward";
  td_tensor_t *lg = td__tlua_contig(L, fn, 1);
  td__tlua_want_dtype(L, fn, lg, TD_F32, "logits");
  td_tensor_t *tg = td__tlua_contig(L, fn, 2);
  td__tlua_want_dtype(L, fn, tg, TD_I32, "targets");
  td__tlua_same_device(L, fn, lg, tg);
  int64_t rows, V;
  td__ce_dims(L, fn, lg, tg, &rows, &V);
  double scale;
  if (td__tlua_opt_field(L, 3, "scale")) {
    scale = luaL_checknumber(L, -1);
    lua_pop(L, 1);
  } else {
    int64_t valid = td__ce_valid(L, fn, tg);
    scale = valid ? 1.0 / (double)valid : 0;
  }
  int accum = td__tlua_opt_bool(L, 3, "accumulate", 0);
  td_tensor_t *o = td__tlua_out(L, fn, 3, "out", TD_F32, td_tensor_device(lg), td_tensor_ndim(lg),
                                td_tensor_shape(lg), 0, NULL);
  TD__TRY(L, fn,
          td__tlua_ops(L, fn, lg)->cross_entropy_bwd(td_tensor_data(o), td_tensor_data(lg),
                                                     td_tensor_data(tg), rows, V, (float)scale, accum));
  return 1;
}

/* T.adamw(p, g, m, v, {step = t, lr = 1e-3, beta1 = 0.9, beta2 = 0.999,
 * eps = 1e-8, weight_decay = 0.01}): updates p, m, v in place. */
static int td__l_adamw(lua_State *L) {
  const char *fn = "adamw";
  td_tensor_t *p = td__tlua_check(L, 1);
  for (int i = 1; i <= 4; i++) {
    td_tensor_t *t = i == 2 ? td__tlua_check(L, i) : td__tlua_mut(L, fn, i);
    if (!td_tensor_is_contiguous(t) || td_tensor_dtype(t) != TD_F32)
      luaL_error(L, "tide.tensor.adamw: argument #%d must be a contiguous f32 tensor", i);
    td__tlua_same_device(L, fn, p, t);
    td__same_numel(L, fn, p, t, "a state tensor");
  }
  luaL_checktype(L, 5, LUA_TTABLE);
  double step = td__tlua_opt_num(L, 5, "step", 0);
  if (step < 1) luaL_error(L, "tide.tensor.adamw: option 'step' (>= 1) is required");
  TD__TRY(L, fn,
          td__tlua_ops(L, fn, p)->adamw(
              td_tensor_data(p), td_tensor_data(td__tlua_check(L, 2)), td_tensor_data(td__tlua_check(L, 3)),
              td_tensor_data(td__tlua_check(L, 4)), td_tensor_numel(p),
              (float)td__tlua_opt_num(L, 5, "lr", 1e-3), (float)td__tlua_opt_num(L, 5, "beta1", 0.9),
              (float)td__tlua_opt_num(L, 5, "beta2", 0.999), (float)td__tlua_opt_num(L, 5, "eps", 1e-8),
              (float)td__tlua_opt_num(L, 5, "weight_decay", 0.01), (int)step));
  return 0;
}

/* T.argmax(x) -> i32 tensor of x.shape without the last dim (0-based ids). */
static int td__l_argmax(lua_State *L) {
  const char *fn = "argmax";
  td_tensor_t *x = td__tlua_contig(L, fn, 1);
  td__tlua_want_dtype(L, fn, x, TD_F32, "x");
  int64_t cols = td__cols(L, fn, x), rows = cols ? td_tensor_numel(x) / cols : 0;
  td_tensor_t *o = td__tlua_out(L, fn, 2, "out", TD_I32, td_tensor_device(x), td_tensor_ndim(x) - 1,
                                td_tensor_shape(x), 0, NULL);
  TD__TRY(L, fn, td__tlua_ops(L, fn, x)->argmax(td_tensor_data(o), td_tensor_data(x), rows, cols));
  return 1;
}

/* T.sample(logits [, {temperature = 1, top_k = 0, seed = 0, offset = 0}])
 * -> i32 cpu tensor of ids (logits.shape without the last dim).  Row r uses
 * the uniform draw (seed, offset + r), so a generation loop passes a new
 * offset each step.  temperature 0 is argmax. */
static int td__l_sample(lua_State *L) {
  const char *fn = "sample";
  td_tensor_t *x = td__tlua_check(L, 1);
  int64_t cols = td__cols(L, fn, x), rows = cols ? td_tensor_numel(x) / cols : 0;
  float temp = (float)td__tlua_opt_num(L, 2, "temperature", 1);
  int top_k = (int)td__tlua_opt_num(L, 2, "top_k", 0);
  uint64_t seed = (uint64_t)(int64_t)td__tlua_opt_num(L, 2, "seed", 0);
  uint64_t off = (uint64_t)(int64_t)td__tlua_opt_num(L, 2, "offset", 0);
  const float *p = td__tlua_host_f32(L, fn, x);
  td_tensor_t *o = NULL;
  TD__TRY(L, fn, td_tensor_empty(&o, TD_I32, TD_CPU, td_tensor_ndim(x) - 1, td_tensor_shape(x)));
  td__tlua_push(L, o);
  double *u = lua_newuserdata(L, sizeof(double) * (size_t)(rows ? rows : 1));
  for (int64_t r = 0; r < rows; r++) u[r] = td_rng_uniform(seed, off + (uint64_t)r);
  TD__TRY(L, fn, td_sample_rows(td_tensor_data(o), p, rows, cols, temp, top_k, u));
  lua_pop(L, 1);
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
static int td__l_nccl_unique_id(lua_State *L) {
  uint8_t id[TD_NCCL_ID_BYTES];
  TD__TRY(L, "nccl_unique_id", td_nccl_unique_id(id));
  lua_pushlstring(L, (const char *)id, sizeof(id));
  return 1;
}

/* T.nccl_comm(nranks, id, rank [, device = "cuda:0"]) -> communicator. */
static int td__l_nccl_comm(lua_State *L) {
  int n = (int)luaL_checkinteger(L, 1);
  size_t len;
  const char *id = luaL_checklstring(L, 2, &len);
  int rank = (int)luaL_checkinteger(L, 3);
  int dev = td__tlua_parse_device(L, luaL_optstring(L, 4, "cuda:0"));
  if (len != TD_NCCL_ID_BYTES) luaL_error(L, "tide.tensor.nccl_comm: id must be %d bytes", TD_NCCL_ID_BYTES);
  if (dev == TD_CPU) luaL_error(L, "tide.tensor.nccl_comm: NCCL needs a cuda device");
  td__comm_t *b = lua_newuserdata(L, sizeof(*b));
  b->c = NULL;
  luaL_getmetatable(L, TD__COMM_MT);
  lua_setmetatable(L, -2);
  TD__TRY(L, "nccl_comm", td_nccl_new(&b->c, n, (const uint8_t *)id, rank, dev));
  return 1;
}

static int td__c_gc(lua_State *L) {
  td__comm_t *b = luaL_checkudata(L, 1, TD__COMM_MT);
  td_nccl_free(&b->c);
  return 0;
}

static int td__c_rank(lua_State *L) {
  lua_pushinteger(L, td_nccl_rank(td__check_comm(L, 1)));
  return 1;
}

static int td__c_size(lua_State *L) {
  lua_pushinteger(L, td_nccl_size(td__check_comm(L, 1)));
  return 1;
}

/* comm:allreduce(t [, op = "sum"]) -> t (in place). */
static int td__c_allreduce(lua_State *L) {
  td_nccl_t *c = td__check_comm(L, 1);
  TD__TRY(L, "allreduce", td_nccl_allreduce(c, td__tlua_check(L, 2), td__redop_arg(L, 3)));
  lua_settop(L, 2);
  return 1;
}

/* New tensor like t with the first dimension scaled by num/den. */
static td_tensor_t *td__resized(lua_State *L, const char *fn, td_tensor_t *t, int64_t num, int64_t den) {
  int64_t shape[TD_MAX_DIMS];
  int nd = td_tensor_ndim(t);
  if (nd < 1) luaL_error(L, "tide.tensor.%s: tensor needs a dimension", fn);
  memcpy(shape, td_tensor_shape(t), sizeof(int64_t) * (size_t)nd);
  if ((shape[0] * num) % den) luaL_error(L, "tide.tensor.%s: first dimension not divisible", fn);
  shape[0] = shape[0] * num / den;
  td_tensor_t *o = NULL;
  TD__TRY(L, fn, td_tensor_empty(&o, td_tensor_dtype(t), td_tensor_device(t), nd, shape));
  return td__tlua_push(L, o);
}

/* comm:allgather(t) -> new tensor, ranks' t concatenated along dim 1. */
static int td__c_allgather(lua_State *L) {
  td_nccl_t *c = td__check_comm(L, 1);
  td_tensor_t *t = td__tlua_check(L, 2);
  td_tensor_t *o = td__resized(L, "allgather", t, td_nccl_size(c), 1);
  TD__TRY(L, "allgather", td_nccl_allgather(c, t, o));
  return 1;
}

/* comm:reduce_scatter(t [, op]) -> new tensor: this rank's slice of dim 1. */
static int td__c_reduce_scatter(lua_State *L) {
  td_nccl_t *c = td__check_comm(L, 1);
  td_tensor_t *t = td__tlua_check(L, 2);
  int op = td__redop_arg(L, 3);
  td_tensor_t *o = td__resized(L, "reduce_scatter", t, 1, td_nccl_size(c));
  TD__TRY(L, "reduce_scatter", td_nccl_reduce_scatter(c, t, o, op));
  return 1;
}

/* comm:broadcast(t, root) -> t (in place; root 0-based). */
static int td__c_broadcast(lua_State *L) {
  td_nccl_t *c = td__check_comm(L, 1);
  TD__TRY(L, "broadcast", td_nccl_broadcast(c, td__tlua_check(L, 2), (int)luaL_checkinteger(L, 3)));
  lua_settop(L, 2);
  return 1;
}

static int td__c_send(lua_State *L) {
  td_nccl_t *c = td__check_comm(L, 1);
  TD__TRY(L, "send", td_nccl_send(c, td__tlua_check(L, 2), (int)luaL_checkinteger(L, 3)));
  return 0;
}

static int td__c_recv(lua_State *L) {
  td_nccl_t *c = td__check_comm(L, 1);
  TD__TRY(L, "recv", td_nccl_recv(c, td__tlua_check(L, 2), (int)luaL_checkinteger(L, 3)));
  lua_settop(L, 2);
  return 1;
}

static const luaL_Reg td__comm_methods[] = {{"rank", td__c_rank},
                                            {"size", td__c_size},
                                            {"allreduce", td__c_allreduce},
                                            {"allgather", td__c_allgather},
                                            {"reduce_scatter", td__c_reduce_scatter},
                                            {"broadcast", td__c_broadcast},
                                            {"send", td__c_send},
                                            {"recv", td__c_recv},
                                            {"destroy", td__c_gc},
                                            {NULL, NULL}};

void td__tlua_open_comm(lua_State *L) {
  luaL_newmetatable(L, TD__COMM_MT);
  lua_pushstring(L, TD__COMM_MT);
  lua_setfield(L, -2, "__name");
  lua_pushcfunction(L, td__c_gc);
  lua_setfield(L, -2, "__gc");
  lua_newtable(L);
  luaL_register(L, NULL, td__comm_methods);
  lua_setfield(L, -2, "__index");
  lua_pop(L, 1);
}

/* -- Operators ------------------------------------------------------------------ */

/* a + b, a - b, a * b with tensors or numbers on either side. */
static int td__arith(lua_State *L, const char *fn, lua_CFunction f, int commutes) {
  lua_settop(L, 2);
  if (!td__tlua_is_tensor(L, 1)) {
    if (!commutes) { /* n - t = -(t) + n */
      lua_pushcfunction(L, td__l_add);
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

static int td__op_add(lua_State *L) { return td__arith(L, "add", td__l_add, 1); }
static int td__op_sub(lua_State *L) { return td__arith(L, "sub", td__l_sub, 0); }
static int td__op_mul(lua_State *L) { return td__arith(L, "mul", td__l_mul, 1); }
static int td__op_unm(lua_State *L) {
  lua_settop(L, 1);
  lua_pushnumber(L, -1);
  return td__l_scale(L);
}
static int td__op_div(lua_State *L) {
  if (lua_type(L, 2) != LUA_TNUMBER) luaL_error(L, "tide.tensor: only division by a number is supported");
  lua_Number d = lua_tonumber(L, 2);
  lua_settop(L, 1);
  lua_pushnumber(L, 1.0 / d);
  return td__l_scale(L);
}

/* -- Registration ----------------------------------------------------------------- */

const luaL_Reg td__tlua_ops_funcs[] = {
    {"matmul", td__l_matmul},
    {"add", td__l_add},
    {"sub", td__l_sub},
    {"mul", td__l_mul},
    {"scale", td__l_scale},
    {"sum_rows", td__l_sum_rows},
    {"mul_backward", td__l_mul_backward},
    {"sum", td__l_sum},
    {"mean", td__l_mean},
    {"dot", td__l_dot},
    {"softmax", td__l_softmax},
    {"softmax_backward", td__l_softmax_backward},
    {"layernorm", td__l_layernorm},
    {"layernorm_backward", td__l_layernorm_backward},
    {"gelu", td__l_gelu},
    {"gelu_backward", td__l_gelu_backward},
    {"embedding", td__l_embedding},
    {"embedding_backward", td__l_embedding_backward},
    {"attention", td__l_attention},
    {"attention_backward", td__l_attention_backward},
    {"attention_cached", td__l_attention_cached},
    {"cross_entropy", td__l_cross_entropy},
    {"cross_entropy_backward", td__l_cross_entropy_backward},
    {"adamw", td__l_adamw},
    {"argmax", td__l_argmax},
    {"sample", td__l_sample},
    {"nccl_unique_id", td__l_nccl_unique_id},
    {"nccl_comm", td__l_nccl_comm},
    {NULL, NULL},
};

const luaL_Reg td__tlua_ops_methods[] = {{"sum", td__l_sum}, {"mean", td__l_mean}, {NULL, NULL}};

const luaL_Reg td__tlua_ops_meta[] = {{"__add", td__op_add}, {"__sub", td__op_sub}, {"__mul", td__op_mul},
                                      {"__div", td__op_div}, {"__unm", td__op_unm}, {NULL, NULL}};
