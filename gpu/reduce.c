/* Reductions of the CPU collectives for every dtype.  See reduce.h. */
#include <stdint.h>

#include "gpu_err.h"
#include "half.h"
#include "reduce.h"
#include "simd.h"
#include "tensor.h"

/* One loop per op, so each vectorizes: DST = op(A, B) for i < n. */
#define TD__MAX(x, y) ((x) > (y) ? (x) : (y))
#define TD__MIN(x, y) ((x) < (y) ? (x) : (y))
#define TD__LOOPS(op, DST, A, B, ADD)                     \
  switch (op) {                                           \
    case TD_RING_MAX:                                     \
      for (size_t i = 0; i < n; i++) DST = TD__MAX(A, B); \
      break;                                              \
    case TD_RING_MIN:                                     \
      for (size_t i = 0; i < n; i++) DST = TD__MIN(A, B); \
      break;                                              \
    default:                                              \
      for (size_t i = 0; i < n; i++) DST = ADD(A, B);     \
  }

/* Sums: floats add; integers add as unsigned, so overflow wraps instead of
 * being undefined. */
#define TD__FADD(x, y) ((x) + (y))
#define TD__ADD32(x, y) ((int32_t)((uint32_t)(x) + (uint32_t)(y)))
#define TD__ADD64(x, y) ((int64_t)((uint64_t)(x) + (uint64_t)(y)))
#define TD__ADD8(x, y) ((uint8_t)((x) + (y)))

/* For element type T: dst = op(a, b) with no overlap, dst = op(dst, b) and
 * dst = op(a, dst) (restrict holds in each), and the dispatch on aliasing. */
#define TD__KERNELS(S, T, ADD)                                                                         \
  TD__HOT static void td__into_##S(T *restrict d, const T *restrict a, const T *restrict b, size_t n,  \
                                   int op){TD__LOOPS(                                                  \
      op, d[i], a[i], b[i], ADD)} TD__HOT static void td__acc_##S(T *restrict d, const T *restrict b,  \
                                                                  size_t n, int op){TD__LOOPS(         \
      op, d[i], d[i], b[i], ADD)} TD__HOT static void td__racc_##S(T *restrict d, const T *restrict a, \
                                                                   size_t n, int op) {                 \
    TD__LOOPS(op, d[i], a[i], d[i], ADD)                                                               \
  }                                                                                                    \
  static void td__red_##S(void *d, const void *a, const void *b, size_t n, int op) {                   \
    if (d == a) td__acc_##S(d, b, n, op);                                                              \
    else if (d == b) td__racc_##S(d, a, n, op);                                                        \
    else td__into_##S(d, a, b, n, op);                                                                 \
  }

TD__KERNELS(f32, float, TD__FADD)
TD__KERNELS(i32, int32_t, TD__ADD32)
TD__KERNELS(i64, int64_t, TD__ADD64)
TD__KERNELS(u8, uint8_t, TD__ADD8)

/* f16 and bf16 elements to f32 and back, m at a time. */
static void td__widen(float *out, const uint16_t *in, size_t m, int dtype) {
  if (dtype == TD_BF16)
    for (size_t i = 0; i < m; i++) out[i] = td__bf16_to_f32(in[i]);
  else
    for (size_t i = 0; i < m; i++) out[i] = td__f16_to_f32(in[i]);
}

static void td__narrow(uint16_t *out, const float *in, size_t m, int dtype) {
  if (dtype == TD_BF16)
    for (size_t i = 0; i < m; i++) out[i] = td__f32_to_bf16(in[i]);
  else
    for (size_t i = 0; i < m; i++) out[i] = td__f32_to_f16(in[i]);
}

/* A block of both operands is widened before any of dst is written, so
 * dst may be a or b. */
static void td__red_half(void *dst, const void *a, const void *b, size_t n, int dtype, int op) {
  float x[256], y[256];
  for (size_t k = 0; k < n; k += 256) {
    size_t m = n - k < 256 ? n - k : 256;
    td__widen(x, (const uint16_t *)a + k, m, dtype);
    td__widen(y, (const uint16_t *)b + k, m, dtype);
    td__acc_f32(x, y, m, op);
    td__narrow((uint16_t *)dst + k, x, m, dtype);
  }
}

int td_reduce_check(int dtype, int op) {
  if (op < TD_RING_SUM || op > TD_RING_MIN) return TD_GPU_EINVAL;
  if (td_dtype_size(dtype) == 0) return TD_GPU_EDTYPE;
  if (op == TD_RING_AVG && dtype != TD_F32 && dtype != TD_F16 && dtype != TD_BF16) return TD_GPU_EDTYPE;
  return 0;
}

void td_reduce(void *dst, const void *a, const void *b, size_t n, int dtype, int op) {
  switch (dtype) {
    case TD_F32: td__red_f32(dst, a, b, n, op); break;
    case TD_F16:
    case TD_BF16: td__red_half(dst, a, b, n, dtype, op); break;
    case TD_I32: td__red_i32(dst, a, b, n, op); break;
    case TD_I64: td__red_i64(dst, a, b, n, op); break;
    case TD_U8: td__red_u8(dst, a, b, n, op); break;
    default: break;
  }
}

void td_reduce_avg(void *p, size_t n, int dtype, int nranks) {
  float inv = 1.0f / (float)nranks, x[256];
  if (dtype == TD_F32) {
    float *f = p;
    for (size_t i = 0; i < n; i++) f[i] *= inv;
    return;
  }
  if (dtype != TD_F16 && dtype != TD_BF16) return;
  for (size_t k = 0; k < n; k += 256) {
    size_t m = n - k < 256 ? n - k : 256;
    td__widen(x, (const uint16_t *)p + k, m, dtype);
    for (size_t i = 0; i < m; i++) x[i] *= inv;
    td__narrow((uint16_t *)p + k, x, m, dtype);
  }
}
