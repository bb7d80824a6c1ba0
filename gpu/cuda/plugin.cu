/* Tide CUDA plugin: the op table of ops.h as CUDA kernels (matmul through
 * cuBLAS), device memory, and NCCL collectives, exported as one C symbol,
 * td_cuda_plugin_get() (see device.h).  Built into build/tide_cuda.so when
 * nvcc exists and dlopen()ed by the host only when a GPU is present.
 *
 * Every kernel mirrors the CPU reference in ops_cpu.c, which is its
 * specification; tests/gpu/cuda_test.lua compares the two.  Kernels are
 * written for clarity (one thread per row or element) rather than peak
 * speed; matmul, the dominant cost, is cuBLAS.  All work is queued on the
 * legacy default stream; calls that return host values synchronize.
 * Errors map to TD_GPU_ECUDA / ECUBLAS / ENCCL with the library message
 * left in the host's per-thread detail string. */
#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <nccl.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

extern "C" {
#include "device.h"
#include "gpu_err.h"
#include "ops.h"
#include "tensor.h"
}

/* -- Errors ------------------------------------------------------------------------ */

static void (*td__detail)(const char *fmt, ...) = nullptr;

static void td__set_hook(void (*fn)(const char *fmt, ...)) { td__detail = fn; }

static int td__cuda_fail(cudaError_t e, const char *what) {
  if (td__detail) td__detail("%s: %s", what, cudaGetErrorString(e));
  return TD_GPU_ECUDA;
}

#define CK(call)                                          \
  do {                                                    \
    cudaError_t e__ = (call);                             \
    if (e__ != cudaSuccess) return td__cuda_fail(e__, #call); \
  } while (0)

/* After a kernel launch: launch errors are reported now, faults later. */
#define CK_LAUNCH(name) CK(cudaGetLastError())

#define CKB(call)                                                        \
  do {                                                                   \
    cublasStatus_t s__ = (call);                                         \
    if (s__ != CUBLAS_STATUS_SUCCESS) {                                  \
      if (td__detail) td__detail("%s: cuBLAS status %d", #call, (int)s__); \
      return TD_GPU_ECUBLAS;                                            \
    }                                                                    \
  } while (0)

#define CKN(call)                                                         \
  do {                                                                    \
    ncclResult_t r__ = (call);                                            \
    if (r__ != ncclSuccess) {                                             \
      if (td__detail) td__detail("%s: %s", #call, ncclGetErrorString(r__)); \
      return TD_GPU_ENCCL;                                               \
    }                                                                     \
  } while (0)

/* The plugin is self-contained: it uses no symbol of the host binary. */
static size_t td__esize(int dtype) {
  static const size_t sz[TD__NDTYPES] = {4, 2, 2, 4, 8, 1};
  return dtype >= 0 && dtype < TD__NDTYPES ? sz[dtype] : 0;
}

static inline unsigned td__blocks(int64_t n, int threads) {
  int64_t b = (n + threads - 1) / threads;
  return (unsigned)(b < 1 ? 1 : (b > 2147483647 ? 2147483647 : b));
}

/* Grid-stride loop over i < n. */
#define FOR_N(i, n) \
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < (n); i += (int64_t)blockDim.x * gridDim.x)

#define NT 256 /* threads per block for elementwise kernels */

/* -- Device state ---------------------------------------------------------------------- */

/* One cuBLAS handle and scratch per device, made on first use. */
#define TD__MAXDEV 64
static cublasHandle_t td__blas[TD__MAXDEV];
static int *td__flag[TD__MAXDEV]; /* device int: kernels report bad ids here */

static int td__cur(int *dev) {
  CK(cudaGetDevice(dev));
  if (*dev < 0 || *dev >= TD__MAXDEV) return TD_GPU_ENODEV;
  return 0;
}

static int td__handle(cublasHandle_t *h) {
  int dev, rc = td__cur(&dev);
  if (rc) return rc;
  if (!td__blas[dev]) {
    CKB(cublasCreate(&td__blas[dev]));
    /* Exact FP32 unless asked for TF32 (then f32 matmuls drift ~1e-3). */
    if (getenv("TIDE_CUDA_TF32")) CKB(cublasSetMathMode(td__blas[dev], CUBLAS_TF32_TENSOR_OP_MATH));
  }
  *h = td__blas[dev];
  return 0;
}

static int td__errflag(int **flag) {
  int dev, rc = td__cur(&dev);
  if (rc) return rc;
  if (!td__flag[dev]) CK(cudaMalloc((void **)&td__flag[dev], sizeof(int)));
  *flag = td__flag[dev];
  return 0;
}

/* Clears the flag. */
static int td__flag_reset(int *flag) {
  CK(cudaMemset(flag, 0, sizeof(int)));
  return 0;
}

/* Reads the flag back (synchronizes): 0 or the code a kernel stored. */
static int td__flag_read(int *flag) {
  int v = 0;
  CK(cudaMemcpy(&v, flag, sizeof(int), cudaMemcpyDeviceToHost));
  return v ? TD_GPU_ERANGE : 0;
}

/* -- Memory ------------------------------------------------------------------------------ */

static int td_c_device_count(int *n) {
  int c = 0;
  cudaError_t e = cudaGetDeviceCount(&c);
  if (e == cudaErrorNoDevice || e == cudaErrorInsufficientDriver) {
    *n = 0;
    cudaGetLastError();
    if (td__detail) td__detail("%s", cudaGetErrorString(e));
    return 0;
  }
  CK(e);
  *n = c;
  return 0;
}

static int td_c_device_name(int dev, char *buf, size_t n) {
  cudaDeviceProp p;
  CK(cudaGetDeviceProperties(&p, dev));
  snprintf(buf, n, "%s", p.name);
  return 0;
}

static int td_c_set_device(int dev) {
  CK(cudaSetDevice(dev));
  return 0;
}

static int td_c_malloc(void **p, size_t n) {
  CK(cudaMalloc(p, n ? n : 4));
  return 0;
}

static int td_c_free(void *p) {
  CK(cudaFree(p));
  return 0;
}

static int td_c_memcpy(void *dst, const void *src, size_t n, int kind) {
  cudaMemcpyKind k = kind == TD_H2D ? cudaMemcpyHostToDevice
                     : kind == TD_D2H ? cudaMemcpyDeviceToHost
                                      : cudaMemcpyDeviceToDevice;
  CK(cudaMemcpy(dst, src, n, k));
  return 0;
}

static int td_c_memset(void *p, int v, size_t n) {
  CK(cudaMemset(p, v, n));
  return 0;
}

static int td_c_synchronize(void) {
  CK(cudaDeviceSynchronize());
  return 0;
}

/* -- Fill, convert, strided copy -------------------------------------------------------------- */

__global__ void k_fill_f32(float *o, int64_t n, float v) { FOR_N(i, n) o[i] = v; }
__global__ void k_fill_i32(int32_t *o, int64_t n, int32_t v) { FOR_N(i, n) o[i] = v; }

static int td_c_fill(void *out, int dtype, int64_t n, double v) {
  if (n <= 0) return 0;
  if (dtype == TD_F32)
    k_fill_f32<<<td__blocks(n, NT), NT>>>((float *)out, n, (float)v);
  else if (dtype == TD_I32)
    k_fill_i32<<<td__blocks(n, NT), NT>>>((int32_t *)out, n, (int32_t)v);
  else
    return TD_GPU_EDTYPE;
  CK_LAUNCH("fill");
  return 0;
}

__device__ double d_load(const void *p, int dt, int64_t i) {
  switch (dt) {
    case TD_F32: return ((const float *)p)[i];
    case TD_F16: return __half2float(((const __half *)p)[i]);
    case TD_BF16: return __bfloat162float(((const __nv_bfloat16 *)p)[i]);
    case TD_I32: return ((const int32_t *)p)[i];
    case TD_I64: return (double)((const int64_t *)p)[i];
    default: return ((const uint8_t *)p)[i];
  }
}

__device__ void d_store(void *p, int dt, int64_t i, double v) {
  switch (dt) {
    case TD_F32: ((float *)p)[i] = (float)v; break;
    case TD_F16: ((__half *)p)[i] = __float2half_rn((float)v); break;
    case TD_BF16: ((__nv_bfloat16 *)p)[i] = __float2bfloat16_rn((float)v); break;
    case TD_I32: ((int32_t *)p)[i] = (int32_t)v; break;
    case TD_I64: ((int64_t *)p)[i] = (int64_t)v; break;
    default: ((uint8_t *)p)[i] = (uint8_t)v; break;
  }
}

__global__ void k_convert(void *dst, int dd, const void *src, int sd, int64_t n) {
  FOR_N(i, n) d_store(dst, dd, i, d_load(src, sd, i));
}

static int td_c_convert(void *dst, int dd, const void *src, int sd, int64_t n) {
  if (td__esize(dd) == 0 || td__esize(sd) == 0) return TD_GPU_EDTYPE;
  if (n <= 0) return 0;
  if (dd == sd) {
    CK(cudaMemcpy(dst, src, (size_t)n * td__esize(dd), cudaMemcpyDeviceToDevice));
    return 0;
  }
  k_convert<<<td__blocks(n, NT), NT>>>(dst, dd, src, sd, n);
  CK_LAUNCH("convert");
  return 0;
}

struct td__strides {
  int64_t shape[TD_MAX_DIMS];
  int64_t stride[TD_MAX_DIMS];
};

__global__ void k_strided(char *dst, const char *src, int elem, int ndim, td__strides s, int64_t n) {
  FOR_N(k, n) {
    int64_t rem = k, off = 0;
    for (int d = ndim - 1; d >= 0; d--) {
      int64_t idx = rem % s.shape[d];
      rem /= s.shape[d];
      off += idx * s.stride[d];
    }
    for (int b = 0; b < elem; b++) dst[k * elem + b] = src[off * elem + b];
  }
}

static int td_c_strided_copy(void *dst, const void *src, size_t elem, int ndim,
                             const int64_t *shape, const int64_t *stride) {
  td__strides s;
  int64_t n = 1;
  for (int i = 0; i < ndim; i++) {
    s.shape[i] = shape[i];
    s.stride[i] = stride[i];
    n *= shape[i];
  }
  if (n <= 0) return 0;
  k_strided<<<td__blocks(n, NT), NT>>>((char *)dst, (const char *)src, (int)elem, ndim, s, n);
  CK_LAUNCH("strided_copy");
  return 0;
}

/* -- Matmul (cuBLAS) --------------------------------------------------------------------------- */

/* Row-major C(M,N) = op(A) op(B) is column-major C^T = op(B)^T op(A)^T:
 * cuBLAS gets B first, with the leading dimensions of the row-major
 * storage. */
static int td_c_matmul(int dtype, float *c, const void *a, const void *b, int M, int N, int K,
                       int ta, int tb, float alpha, float beta) {
  if (M < 0 || N < 0 || K < 0) return TD_GPU_EINVAL;
  if (M == 0 || N == 0) return 0;
  cudaDataType_t t;
  if (dtype == TD_F32)
    t = CUDA_R_32F;
  else if (dtype == TD_F16)
    t = CUDA_R_16F;
  else if (dtype == TD_BF16)
    t = CUDA_R_16BF;
  else
    return TD_GPU_EDTYPE;
  cublasHandle_t h;
  int rc = td__handle(&h);
  if (rc) return rc;
  if (K == 0) { /* C = beta * C, as the CPU reference defines it */
    CKB(cublasSscal(h, M * N, &beta, c, 1));
    return 0;
  }
  int lda = ta ? M : K, ldb = tb ? K : N;
  CKB(cublasGemmEx(h, tb ? CUBLAS_OP_T : CUBLAS_OP_N, ta ? CUBLAS_OP_T : CUBLAS_OP_N, N, M, K,
                   &alpha, b, t, ldb, a, t, lda, &beta, c, CUDA_R_32F, N, CUBLAS_COMPUTE_32F,
                   CUBLAS_GEMM_DEFAULT));
  return 0;
}

/* -- Elementwise and reductions ------------------------------------------------------------------ */

__global__ void k_add(float *o, const float *a, const float *b, int64_t n, int64_t nb, float al, float be) {
  FOR_N(i, n) o[i] = al * a[i] + be * b[i % nb];
}
__global__ void k_mul(float *o, const float *a, const float *b, int64_t n, int64_t nb) {
  FOR_N(i, n) o[i] = a[i] * b[i % nb];
}

static int td_c_add(float *o, const float *a, const float *b, int64_t n, int64_t nb, float al, float be) {
  if (nb <= 0 || n % nb) return TD_GPU_ESHAPE;
  if (n == 0) return 0;
  k_add<<<td__blocks(n, NT), NT>>>(o, a, b, n, nb, al, be);
  CK_LAUNCH("add");
  return 0;
}

static int td_c_mul(float *o, const float *a, const float *b, int64_t n, int64_t nb) {
  if (nb <= 0 || n % nb) return TD_GPU_ESHAPE;
  if (n == 0) return 0;
  k_mul<<<td__blocks(n, NT), NT>>>(o, a, b, n, nb);
  CK_LAUNCH("mul");
  return 0;
}

/* One thread per column, rows in order: deterministic like the CPU. */
__global__ void k_sum_rows(float *o, const float *in, int64_t rows, int64_t cols, int accum) {
  FOR_N(c, cols) {
    float s = 0;
    for (int64_t r = 0; r < rows; r++) s += in[r * cols + c];
    o[c] = accum ? o[c] + s : s;
  }
}

static int td_c_sum_rows(float *o, const float *in, int64_t rows, int64_t cols, int accum) {
  if (cols <= 0) return 0;
  k_sum_rows<<<td__blocks(cols, NT), NT>>>(o, in, rows, cols, accum);
  CK_LAUNCH("sum_rows");
  return 0;
}

/* Block-wide sum of v (blockDim.x a power of two <= 1024). */
template <typename V>
__device__ V block_sum(V v) {
  __shared__ V sh[32];
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
  if (lane == 0) sh[w] = v;
  __syncthreads();
  int nw = (blockDim.x + 31) >> 5;
  v = threadIdx.x < nw ? sh[threadIdx.x] : (V)0;
  if (w == 0)
    for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  __syncthreads();
  if (threadIdx.x == 0) sh[0] = v;
  __syncthreads();
  V r = sh[0];
  __syncthreads();
  return r;
}

__device__ float block_max(float v) {
  __shared__ float sh[32];
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_down_sync(0xffffffffu, v, o));
  int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
  if (lane == 0) sh[w] = v;
  __syncthreads();
  int nw = (blockDim.x + 31) >> 5;
  v = threadIdx.x < nw ? sh[threadIdx.x] : -INFINITY;
  if (w == 0)
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_down_sync(0xffffffffu, v, o));
  __syncthreads();
  if (threadIdx.x == 0) sh[0] = v;
  __syncthreads();
  float r = sh[0];
  __syncthreads();
  return r;
}

#define RT 256 /* threads per block for row kernels */

/* Partial sums of a[i] (* b[i]) per block into part[blockIdx.x]. */
__global__ void k_dot_part(double *part, const float *a, const float *b, int64_t n) {
  double s = 0;
  FOR_N(i, n) s += (double)a[i] * (b ? (double)b[i] : 1.0);
  s = block_sum<double>(s);
  if (threadIdx.x == 0) part[blockIdx.x] = s;
}

static int td__dot(double *out, const float *a, const float *b, int64_t n) {
  *out = 0;
  if (n <= 0) return 0;
  unsigned nb = td__blocks(n, RT);
  if (nb > 1024) nb = 1024;
  double *part = nullptr, host[1024];
  CK(cudaMalloc((void **)&part, sizeof(double) * nb));
  k_dot_part<<<nb, RT>>>(part, a, b, n);
  cudaError_t e = cudaGetLastError();
  if (e == cudaSuccess) e = cudaMemcpy(host, part, sizeof(double) * nb, cudaMemcpyDeviceToHost);
  cudaFree(part);
  if (e != cudaSuccess) return td__cuda_fail(e, "sum");
  for (unsigned i = 0; i < nb; i++) *out += host[i];
  return 0;
}

static int td_c_sum(double *out, const float *in, int64_t n) { return td__dot(out, in, nullptr, n); }
static int td_c_dot(double *out, const float *a, const float *b, int64_t n) { return td__dot(out, a, b, n); }

/* -- Softmax, layernorm, gelu --------------------------------------------------------------------- */

__global__ void k_softmax_fwd(float *y, const float *x, int64_t cols) {
  const float *xr = x + blockIdx.x * cols;
  float *yr = y + blockIdx.x * cols;
  float m = -INFINITY;
  for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) m = fmaxf(m, xr[c]);
  m = block_max(m);
  float s = 0;
  for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) s += expf(xr[c] - m);
  s = block_sum<float>(s);
  float inv = 1.0f / s;
  for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) yr[c] = expf(xr[c] - m) * inv;
}

static int td_c_softmax_fwd(float *y, const float *x, int64_t rows, int64_t cols) {
  if (rows <= 0 || cols <= 0) return 0;
  k_softmax_fwd<<<(unsigned)rows, RT>>>(y, x, cols);
  CK_LAUNCH("softmax_fwd");
  return 0;
}

__global__ void k_softmax_bwd(float *dx, const float *dy, const float *y, int64_t cols, int accum) {
  const float *dyr = dy + blockIdx.x * cols, *yr = y + blockIdx.x * cols;
  float *dxr = dx + blockIdx.x * cols;
  float d = 0;
  for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) d += dyr[c] * yr[c];
  d = block_sum<float>(d);
  for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) {
    float g = yr[c] * (dyr[c] - d);
    dxr[c] = accum ? dxr[c] + g : g;
  }
}

static int td_c_softmax_bwd(float *dx, const float *dy, const float *y, int64_t rows, int64_t cols, int accum) {
  if (rows <= 0 || cols <= 0) return 0;
  k_softmax_bwd<<<(unsigned)rows, RT>>>(dx, dy, y, cols, accum);
  CK_LAUNCH("softmax_bwd");
  return 0;
}

__global__ void k_layernorm_fwd(float *y, float *mean, float *rstd, const float *x, const float *w,
                                const float *b, int64_t cols, float eps) {
  const float *xr = x + blockIdx.x * cols;
  float *yr = y + blockIdx.x * cols;
  float s = 0;
  for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) s += xr[c];
  float m = block_sum<float>(s) / (float)cols;
  float v = 0;
  for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) {
    float d = xr[c] - m;
    v += d * d;
  }
  v = block_sum<float>(v) / (float)cols;
  float r = rsqrtf(v + eps);
  for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) yr[c] = (xr[c] - m) * r * w[c] + b[c];
  if (threadIdx.x == 0) {
    if (mean) mean[blockIdx.x] = m;
    if (rstd) rstd[blockIdx.x] = r;
  }
}

static int td_c_layernorm_fwd(float *y, float *mean, float *rstd, const float *x, const float *w,
                              const float *b, int64_t rows, int64_t cols, float eps) {
  if (rows <= 0 || cols <= 0) return 0;
  k_layernorm_fwd<<<(unsigned)rows, RT>>>(y, mean, rstd, x, w, b, cols, eps);
  CK_LAUNCH("layernorm_fwd");
  return 0;
}

__global__ void k_layernorm_bwd_dx(float *dx, const float *dy, const float *x, const float *w,
                                   const float *mean, const float *rstd, int64_t cols, int accum) {
  int64_t r = blockIdx.x;
  const float *dyr = dy + r * cols, *xr = x + r * cols;
  float *dxr = dx + r * cols;
  float m = mean[r], s = rstd[r], a = 0, bsum = 0;
  for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) {
    float norm = (xr[c] - m) * s, dn = w[c] * dyr[c];
    a += dn;
    bsum += dn * norm;
  }
  a = block_sum<float>(a) / (float)cols;
  bsum = block_sum<float>(bsum) / (float)cols;
  for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) {
    float norm = (xr[c] - m) * s, dn = w[c] * dyr[c];
    float g = (dn - a - norm * bsum) * s;
    dxr[c] = accum ? dxr[c] + g : g;
  }
}

/* dw, db: one thread per column over all rows (deterministic). */
__global__ void k_layernorm_bwd_dwdb(float *dw, float *db, const float *dy, const float *x,
                                     const float *mean, const float *rstd, int64_t rows,
                                     int64_t cols, int accum) {
  FOR_N(c, cols) {
    float sw = 0, sb = 0;
    for (int64_t r = 0; r < rows; r++) {
      float g = dy[r * cols + c];
      sb += g;
      sw += (x[r * cols + c] - mean[r]) * rstd[r] * g;
    }
    dw[c] = accum ? dw[c] + sw : sw;
    db[c] = accum ? db[c] + sb : sb;
  }
}

static int td_c_layernorm_bwd(float *dx, float *dw, float *db, const float *dy, const float *x,
                              const float *w, const float *mean, const float *rstd, int64_t rows,
                              int64_t cols, int accum) {
  if (cols <= 0) return 0;
  if (rows > 0) {
    k_layernorm_bwd_dx<<<(unsigned)rows, RT>>>(dx, dy, x, w, mean, rstd, cols, accum);
    CK_LAUNCH("layernorm_bwd");
  }
  k_layernorm_bwd_dwdb<<<td__blocks(cols, NT), NT>>>(dw, db, dy, x, mean, rstd, rows, cols, accum);
  CK_LAUNCH("layernorm_bwd");
  return 0;
}

#define GELU_K 0.7978845608028654f

__global__ void k_gelu_fwd(float *y, const float *x, int64_t n) {
  FOR_N(i, n) {
    float v = x[i];
    y[i] = 0.5f * v * (1.0f + tanhf(GELU_K * (v + 0.044715f * v * v * v)));
  }
}

__global__ void k_gelu_bwd(float *dx, const float *dy, const float *x, int64_t n, int accum) {
  FOR_N(i, n) {
    float v = x[i];
    float t = tanhf(GELU_K * (v + 0.044715f * v * v * v));
    float du = GELU_K * (1.0f + 3.0f * 0.044715f * v * v);
    float g = (0.5f * (1.0f + t) + 0.5f * v * (1.0f - t * t) * du) * dy[i];
    dx[i] = accum ? dx[i] + g : g;
  }
}

static int td_c_gelu_fwd(float *y, const float *x, int64_t n) {
  if (n <= 0) return 0;
  k_gelu_fwd<<<td__blocks(n, NT), NT>>>(y, x, n);
  CK_LAUNCH("gelu_fwd");
  return 0;
}

static int td_c_gelu_bwd(float *dx, const float *dy, const float *x, int64_t n, int accum) {
  if (n <= 0) return 0;
  k_gelu_bwd<<<td__blocks(n, NT), NT>>>(dx, dy, x, n, accum);
  CK_LAUNCH("gelu_bwd");
  return 0;
}

/* -- Embedding ---------------------------------------------------------------------------------- */

__global__ void k_check_ids(int *flag, const int32_t *ids, int64_t n, int64_t lo, int64_t vocab) {
  FOR_N(i, n) if (ids[i] < lo || ids[i] >= vocab) atomicExch(flag, 1);
}

static int td__check_ids(const int32_t *ids, int64_t n, int64_t lo, int64_t vocab) {
  if (n <= 0) return 0;
  int *flag, rc = td__errflag(&flag);
  if (!rc) rc = td__flag_reset(flag);
  if (rc) return rc;
  k_check_ids<<<td__blocks(n, NT), NT>>>(flag, ids, n, lo, vocab);
  CK_LAUNCH("check_ids");
  return td__flag_read(flag);
}

__global__ void k_embedding_fwd(float *y, const int32_t *ids, const float *table, int64_t n, int64_t dim) {
  FOR_N(k, n * dim) {
    int64_t i = k / dim, c = k % dim;
    y[k] = table[(int64_t)ids[i] * dim + c];
  }
}

__global__ void k_embedding_bwd(float *dt, const float *dy, const int32_t *ids, int64_t n, int64_t dim) {
  FOR_N(k, n * dim) {
    int64_t i = k / dim, c = k % dim;
    atomicAdd(&dt[(int64_t)ids[i] * dim + c], dy[k]);
  }
}

static int td_c_embedding_fwd(float *y, const int32_t *ids, const float *table, int64_t n,
                              int64_t vocab, int64_t dim) {
  int rc = td__check_ids(ids, n, 0, vocab);
  if (rc || n * dim <= 0) return rc;
  k_embedding_fwd<<<td__blocks(n * dim, NT), NT>>>(y, ids, table, n, dim);
  CK_LAUNCH("embedding_fwd");
  return 0;
}

static int td_c_embedding_bwd(float *dt, const float *dy, const int32_t *ids, int64_t n,
                              int64_t vocab, int64_t dim) {
  int rc = td__check_ids(ids, n, 0, vocab);
  if (rc || n * dim <= 0) return rc;
  k_embedding_bwd<<<td__blocks(n * dim, NT), NT>>>(dt, dy, ids, n, dim);
  CK_LAUNCH("embedding_bwd");
  return 0;
}

/* -- Attention ---------------------------------------------------------------------------------- */

/* One thread per (b, h, t) query row: scores, causal softmax into att, out. */
__global__ void k_attention_fwd(float *out, float *att, const float *qkv, int B, int T, int C, int NH) {
  int hs = C / NH;
  float scale = rsqrtf((float)hs);
  FOR_N(k, (int64_t)B * NH * T) {
    int t = (int)(k % T), h = (int)((k / T) % NH), b = (int)(k / ((int64_t)T * NH));
    const float *q = qkv + ((int64_t)b * T + t) * 3 * C + h * hs;
    float *a = att + (((int64_t)b * NH + h) * T + t) * T;
    float m = -INFINITY;
    for (int t2 = 0; t2 <= t; t2++) {
      const float *kk = qkv + ((int64_t)b * T + t2) * 3 * C + C + h * hs;
      float s = 0;
      for (int i = 0; i < hs; i++) s += q[i] * kk[i];
      s *= scale;
      a[t2] = s;
      m = fmaxf(m, s);
    }
    float sum = 0;
    for (int t2 = 0; t2 <= t; t2++) {
      a[t2] = expf(a[t2] - m);
      sum += a[t2];
    }
    float inv = 1.0f / sum;
    for (int t2 = 0; t2 <= t; t2++) a[t2] *= inv;
    for (int t2 = t + 1; t2 < T; t2++) a[t2] = 0;
    float *o = out + ((int64_t)b * T + t) * C + h * hs;
    for (int i = 0; i < hs; i++) {
      float acc = 0;
      for (int t2 = 0; t2 <= t; t2++) acc += a[t2] * qkv[((int64_t)b * T + t2) * 3 * C + 2 * C + h * hs + i];
      o[i] = acc;
    }
  }
}

static int td__attn_check(int B, int T, int C, int NH) {
  return B < 0 || T < 0 || C <= 0 || NH <= 0 || C % NH ? TD_GPU_EINVAL : 0;
}

static int td_c_attention_fwd(float *out, float *att, const float *qkv, int B, int T, int C, int NH) {
  if (td__attn_check(B, T, C, NH)) return TD_GPU_EINVAL;
  int64_t n = (int64_t)B * NH * T;
  if (n == 0) return 0;
  k_attention_fwd<<<td__blocks(n, 128), 128>>>(out, att, qkv, B, T, C, NH);
  CK_LAUNCH("attention_fwd");
  return 0;
}

/* Attention backward without atomics, in three passes over (b, h, row):
 *   dot[t]  = sum over t2 <= t of att[t][t2] * (v[t2] . dout[t])
 *   dq[t]  += sum over t2 <= t of dpre[t][t2] * k[t2]
 *   dk[t2] += sum over t >= t2 of dpre[t][t2] * q[t],
 *   dv[t2] += sum over t >= t2 of att[t][t2] * dout[t]
 * with dpre[t][t2] = att[t][t2] * (v[t2] . dout[t] - dot[t]) * scale: the
 * CPU reference's formulas, each output element owned by one thread. */
__device__ float d_vdot(const float *v, const float *g, int hs) {
  float s = 0;
  for (int i = 0; i < hs; i++) s += v[i] * g[i];
  return s;
}

__global__ void k_attn_bwd_dot(float *dot, const float *dout, const float *qkv, const float *att,
                               int B, int T, int C, int NH) {
  int hs = C / NH;
  FOR_N(k, (int64_t)B * NH * T) {
    int t = (int)(k % T), h = (int)((k / T) % NH), b = (int)(k / ((int64_t)T * NH));
    const float *a = att + (((int64_t)b * NH + h) * T + t) * T;
    const float *go = dout + ((int64_t)b * T + t) * C + h * hs;
    float s = 0;
    for (int t2 = 0; t2 <= t; t2++)
      s += a[t2] * d_vdot(qkv + ((int64_t)b * T + t2) * 3 * C + 2 * C + h * hs, go, hs);
    dot[k] = s;
  }
}

__global__ void k_attn_bwd_dq(float *dqkv, const float *dot, const float *dout, const float *qkv,
                              const float *att, int B, int T, int C, int NH) {
  int hs = C / NH;
  float scale = rsqrtf((float)hs);
  FOR_N(k, (int64_t)B * NH * T) {
    int t = (int)(k % T), h = (int)((k / T) % NH), b = (int)(k / ((int64_t)T * NH));
    const float *a = att + (((int64_t)b * NH + h) * T + t) * T;
    const float *go = dout + ((int64_t)b * T + t) * C + h * hs;
    float *dq = dqkv + ((int64_t)b * T + t) * 3 * C + h * hs;
    for (int t2 = 0; t2 <= t; t2++) {
      const float *row = qkv + ((int64_t)b * T + t2) * 3 * C;
      float dpre = a[t2] * (d_vdot(row + 2 * C + h * hs, go, hs) - dot[k]) * scale;
      for (int i = 0; i < hs; i++) dq[i] += dpre * row[C + h * hs + i];
    }
  }
}

__global__ void k_attn_bwd_dkv(float *dqkv, const float *dot, const float *dout, const float *qkv,
                               const float *att, int B, int T, int C, int NH) {
  int hs = C / NH;
  float scale = rsqrtf((float)hs);
  FOR_N(k, (int64_t)B * NH * T) {
    int t2 = (int)(k % T), h = (int)((k / T) % NH), b = (int)(k / ((int64_t)T * NH));
    const float *v = qkv + ((int64_t)b * T + t2) * 3 * C + 2 * C + h * hs;
    float *dk = dqkv + ((int64_t)b * T + t2) * 3 * C + C + h * hs;
    float *dv = dk + C;
    int64_t base = ((int64_t)b * NH + h) * T;
    for (int t = t2; t < T; t++) {
      float p = att[(base + t) * T + t2];
      const float *go = dout + ((int64_t)b * T + t) * C + h * hs;
      const float *q = qkv + ((int64_t)b * T + t) * 3 * C + h * hs;
      float dpre = p * (d_vdot(v, go, hs) - dot[base + t]) * scale;
      for (int i = 0; i < hs; i++) {
        dk[i] += dpre * q[i];
        dv[i] += p * go[i];
      }
    }
  }
}

static int td_c_attention_bwd(float *dqkv, const float *dout, const float *qkv, const float *att,
                              int B, int T, int C, int NH, int accum) {
  if (td__attn_check(B, T, C, NH)) return TD_GPU_EINVAL;
  if (!accum) CK(cudaMemset(dqkv, 0, sizeof(float) * (size_t)B * T * 3 * C));
  int64_t n = (int64_t)B * NH * T;
  if (n == 0) return 0;
  float *dot = nullptr;
  CK(cudaMalloc((void **)&dot, sizeof(float) * (size_t)n));
  unsigned g = td__blocks(n, 128);
  k_attn_bwd_dot<<<g, 128>>>(dot, dout, qkv, att, B, T, C, NH);
  k_attn_bwd_dq<<<g, 128>>>(dqkv, dot, dout, qkv, att, B, T, C, NH);
  k_attn_bwd_dkv<<<g, 128>>>(dqkv, dot, dout, qkv, att, B, T, C, NH);
  cudaError_t e = cudaGetLastError();
  cudaFree(dot); /* stream-ordered after the kernels that use it */
  if (e != cudaSuccess) return td__cuda_fail(e, "attention_bwd");
  return 0;
}

__global__ void k_cache_write(float *kc, float *vc, const float *qkv, int B, int Tn, int pos, int Tmax, int C) {
  FOR_N(k, (int64_t)B * Tn * C) {
    int c = (int)(k % C), t = (int)((k / C) % Tn), b = (int)(k / ((int64_t)C * Tn));
    const float *row = qkv + ((int64_t)b * Tn + t) * 3 * C;
    kc[((int64_t)b * Tmax + pos + t) * C + c] = row[C + c];
    vc[((int64_t)b * Tmax + pos + t) * C + c] = row[2 * C + c];
  }
}

#define TD__MAX_HS 256

/* One thread per (b, t, h): online softmax over the cached keys. */
__global__ void k_attention_cached(float *out, const float *kc, const float *vc, const float *qkv,
                                   int B, int Tn, int pos, int Tmax, int C, int NH) {
  int hs = C / NH;
  float scale = rsqrtf((float)hs);
  FOR_N(k, (int64_t)B * Tn * NH) {
    int h = (int)(k % NH), t = (int)((k / NH) % Tn), b = (int)(k / ((int64_t)NH * Tn));
    const float *q = qkv + ((int64_t)b * Tn + t) * 3 * C + h * hs;
    float acc[TD__MAX_HS];
    for (int i = 0; i < hs; i++) acc[i] = 0;
    float m = -INFINITY, l = 0;
    int n = pos + t + 1;
    for (int t2 = 0; t2 < n; t2++) {
      const float *kk = kc + ((int64_t)b * Tmax + t2) * C + h * hs;
      const float *v = vc + ((int64_t)b * Tmax + t2) * C + h * hs;
      float s = 0;
      for (int i = 0; i < hs; i++) s += q[i] * kk[i];
      s *= scale;
      float mn = fmaxf(m, s), f = expf(m - mn), p = expf(s - mn);
      for (int i = 0; i < hs; i++) acc[i] = acc[i] * f + p * v[i];
      l = l * f + p;
      m = mn;
    }
    float *o = out + ((int64_t)b * Tn + t) * C + h * hs;
    for (int i = 0; i < hs; i++) o[i] = acc[i] / l;
  }
}

static int td_c_attention_cached(float *out, float *kc, float *vc, const float *qkv, int B, int Tn,
                                 int pos, int Tmax, int C, int NH) {
  if (td__attn_check(B, Tn, C, NH) || pos < 0 || pos + Tn > Tmax || C / NH > TD__MAX_HS)
    return TD_GPU_EINVAL;
  int64_t n = (int64_t)B * Tn * C;
  if (n == 0) return 0;
  k_cache_write<<<td__blocks(n, NT), NT>>>(kc, vc, qkv, B, Tn, pos, Tmax, C);
  CK_LAUNCH("attention_cached");
  int64_t rows = (int64_t)B * Tn * NH;
  k_attention_cached<<<td__blocks(rows, 64), 64>>>(out, kc, vc, qkv, B, Tn, pos, Tmax, C, NH);
  CK_LAUNCH("attention_cached");
  return 0;
}

/* -- Cross-entropy ------------------------------------------------------------------------------- */

__global__ void k_ce_fwd(float *losses, const float *logits, const int32_t *tg, int64_t V) {
  int64_t r = blockIdx.x;
  if (tg[r] == -1) {
    if (threadIdx.x == 0) losses[r] = 0;
    return;
  }
  const float *l = logits + r * V;
  float m = -INFINITY;
  for (int64_t c = threadIdx.x; c < V; c += blockDim.x) m = fmaxf(m, l[c]);
  m = block_max(m);
  double s = 0;
  for (int64_t c = threadIdx.x; c < V; c += blockDim.x) s += exp((double)(l[c] - m));
  s = block_sum<double>(s);
  if (threadIdx.x == 0) losses[r] = (float)(log(s) + m - l[tg[r]]);
}

__global__ void k_ce_bwd(float *dl, const float *logits, const int32_t *tg, int64_t V, float scale, int accum) {
  int64_t r = blockIdx.x;
  const float *l = logits + r * V;
  float *d = dl + r * V;
  if (tg[r] == -1) {
    if (!accum)
      for (int64_t c = threadIdx.x; c < V; c += blockDim.x) d[c] = 0;
    return;
  }
  float m = -INFINITY;
  for (int64_t c = threadIdx.x; c < V; c += blockDim.x) m = fmaxf(m, l[c]);
  m = block_max(m);
  double s = 0;
  for (int64_t c = threadIdx.x; c < V; c += blockDim.x) s += exp((double)(l[c] - m));
  s = block_sum<double>(s);
  float inv = (float)(1.0 / s);
  for (int64_t c = threadIdx.x; c < V; c += blockDim.x) {
    float g = expf(l[c] - m) * inv;
    if (c == tg[r]) g -= 1.0f;
    g *= scale;
    d[c] = accum ? d[c] + g : g;
  }
}

static int td_c_ce_fwd(float *losses, const float *logits, const int32_t *tg, int64_t rows, int64_t V) {
  int rc = td__check_ids(tg, rows, -1, V);
  if (rc || rows <= 0) return rc;
  k_ce_fwd<<<(unsigned)rows, RT>>>(losses, logits, tg, V);
  CK_LAUNCH("cross_entropy_fwd");
  return 0;
}

static int td_c_ce_bwd(float *dl, const float *logits, const int32_t *tg, int64_t rows, int64_t V,
                       float scale, int accum) {
  int rc = td__check_ids(tg, rows, -1, V);
  if (rc || rows <= 0) return rc;
  k_ce_bwd<<<(unsigned)rows, RT>>>(dl, logits, tg, V, scale, accum);
  CK_LAUNCH("cross_entropy_bwd");
  return 0;
}

/* -- AdamW, argmax ------------------------------------------------------------------------------------ */

__global__ void k_adamw(float *p, const float *g, float *m, float *v, int64_t n, float lr, float b1,
                        float b2, float eps, float wd, float c1, float c2) {
  FOR_N(i, n) {
    float gi = g[i];
    m[i] = b1 * m[i] + (1.0f - b1) * gi;
    v[i] = b2 * v[i] + (1.0f - b2) * gi * gi;
    float mh = m[i] / c1, vh = v[i] / c2;
    p[i] -= lr * (mh / (sqrtf(vh) + eps) + wd * p[i]);
  }
}

static int td_c_adamw(float *p, const float *g, float *m, float *v, int64_t n, float lr, float b1,
                      float b2, float eps, float wd, int t) {
  if (t < 1) return TD_GPU_EINVAL;
  if (n <= 0) return 0;
  float c1 = 1.0f - powf(b1, (float)t), c2 = 1.0f - powf(b2, (float)t);
  k_adamw<<<td__blocks(n, NT), NT>>>(p, g, m, v, n, lr, b1, b2, eps, wd, c1, c2);
  CK_LAUNCH("adamw");
  return 0;
}

__global__ void k_argmax(int32_t *out, const float *x, int64_t cols) {
  int64_t r = blockIdx.x;
  if (threadIdx.x != 0) return;
  const float *xr = x + r * cols;
  int64_t best = 0;
  for (int64_t c = 1; c < cols; c++)
    if (xr[c] > xr[best]) best = c;
  out[r] = (int32_t)best;
}

static int td_c_argmax(int32_t *out, const float *x, int64_t rows, int64_t cols) {
  if (cols <= 0) return TD_GPU_EINVAL;
  if (rows <= 0) return 0;
  k_argmax<<<(unsigned)rows, 32>>>(out, x, cols);
  CK_LAUNCH("argmax");
  return 0;
}

/* -- NCCL ------------------------------------------------------------------------------------------------ */

static int td__nccl_type(int dtype, ncclDataType_t *t) {
  switch (dtype) {
    case TD_F32: *t = ncclFloat32; return 0;
    case TD_F16: *t = ncclFloat16; return 0;
    case TD_BF16: *t = ncclBfloat16; return 0;
    case TD_I32: *t = ncclInt32; return 0;
    case TD_I64: *t = ncclInt64; return 0;
    case TD_U8: *t = ncclUint8; return 0;
    default: return TD_GPU_EDTYPE;
  }
}

static int td__nccl_op(int op, ncclRedOp_t *o) {
  switch (op) {
    case TD_SUM: *o = ncclSum; return 0;
    case TD_AVG: *o = ncclAvg; return 0;
    case TD_MAX: *o = ncclMax; return 0;
    case TD_MIN: *o = ncclMin; return 0;
    default: return TD_GPU_EINVAL;
  }
}

static int td_c_nccl_id(void *id128) {
  static_assert(sizeof(ncclUniqueId) == 128, "NCCL unique id is 128 bytes");
  ncclUniqueId id;
  CKN(ncclGetUniqueId(&id));
  memcpy(id128, &id, sizeof(id));
  return 0;
}

static int td_c_nccl_init(void **comm, int nranks, const void *id128, int rank) {
  ncclUniqueId id;
  memcpy(&id, id128, sizeof(id));
  ncclComm_t c;
  CKN(ncclCommInitRank(&c, nranks, id, rank));
  *comm = c;
  return 0;
}

static int td_c_nccl_destroy(void *comm) {
  CKN(ncclCommDestroy((ncclComm_t)comm));
  return 0;
}

/* Collectives complete before returning, so a failure belongs to this call. */
static int td__nccl_done(void) {
  CK(cudaStreamSynchronize(0));
  return 0;
}

static int td_c_nccl_allreduce(void *comm, const void *s, void *r, size_t count, int dtype, int op) {
  ncclDataType_t t;
  ncclRedOp_t o;
  if (td__nccl_type(dtype, &t) || td__nccl_op(op, &o)) return TD_GPU_EINVAL;
  CKN(ncclAllReduce(s, r, count, t, o, (ncclComm_t)comm, 0));
  return td__nccl_done();
}

static int td_c_nccl_allgather(void *comm, const void *s, void *r, size_t count, int dtype) {
  ncclDataType_t t;
  if (td__nccl_type(dtype, &t)) return TD_GPU_EDTYPE;
  CKN(ncclAllGather(s, r, count, t, (ncclComm_t)comm, 0));
  return td__nccl_done();
}

static int td_c_nccl_reduce_scatter(void *comm, const void *s, void *r, size_t count, int dtype, int op) {
  ncclDataType_t t;
  ncclRedOp_t o;
  if (td__nccl_type(dtype, &t) || td__nccl_op(op, &o)) return TD_GPU_EINVAL;
  CKN(ncclReduceScatter(s, r, count, t, o, (ncclComm_t)comm, 0));
  return td__nccl_done();
}

static int td_c_nccl_broadcast(void *comm, void *buf, size_t count, int dtype, int root) {
  ncclDataType_t t;
  if (td__nccl_type(dtype, &t)) return TD_GPU_EDTYPE;
  CKN(ncclBroadcast(buf, buf, count, t, root, (ncclComm_t)comm, 0));
  return td__nccl_done();
}

static int td_c_nccl_send(void *comm, const void *buf, size_t count, int dtype, int peer) {
  ncclDataType_t t;
  if (td__nccl_type(dtype, &t)) return TD_GPU_EDTYPE;
  CKN(ncclSend(buf, count, t, peer, (ncclComm_t)comm, 0));
  return td__nccl_done();
}

static int td_c_nccl_recv(void *comm, void *buf, size_t count, int dtype, int peer) {
  ncclDataType_t t;
  if (td__nccl_type(dtype, &t)) return TD_GPU_EDTYPE;
  CKN(ncclRecv(buf, count, t, peer, (ncclComm_t)comm, 0));
  return td__nccl_done();
}

/* -- Export ----------------------------------------------------------------------------------------------- */

static td_ops_t td__cuda_ops;
static td_cuda_plugin_t td__plugin;

extern "C" __attribute__((visibility("default"))) const td_cuda_plugin_t *td_cuda_plugin_get(void) {
  td_ops_t *o = &td__cuda_ops;
  o->name = "cuda";
  o->fill = td_c_fill;
  o->convert = td_c_convert;
  o->strided_copy = td_c_strided_copy;
  o->matmul = td_c_matmul;
  o->add = td_c_add;
  o->mul = td_c_mul;
  o->sum_rows = td_c_sum_rows;
  o->sum = td_c_sum;
  o->dot = td_c_dot;
  o->softmax_fwd = td_c_softmax_fwd;
  o->softmax_bwd = td_c_softmax_bwd;
  o->layernorm_fwd = td_c_layernorm_fwd;
  o->layernorm_bwd = td_c_layernorm_bwd;
  o->gelu_fwd = td_c_gelu_fwd;
  o->gelu_bwd = td_c_gelu_bwd;
  o->embedding_fwd = td_c_embedding_fwd;
  o->embedding_bwd = td_c_embedding_bwd;
  o->attention_fwd = td_c_attention_fwd;
  o->attention_bwd = td_c_attention_bwd;
  o->attention_cached = td_c_attention_cached;
  o->cross_entropy_fwd = td_c_ce_fwd;
  o->cross_entropy_bwd = td_c_ce_bwd;
  o->adamw = td_c_adamw;
  o->argmax = td_c_argmax;
  td_cuda_plugin_t *p = &td__plugin;
  p->abi = TD_CUDA_PLUGIN_ABI;
  p->ops = o;
  p->set_detail_hook = td__set_hook;
  p->device_count = td_c_device_count;
  p->device_name = td_c_device_name;
  p->set_device = td_c_set_device;
  p->malloc = td_c_malloc;
  p->free = td_c_free;
  p->memcpy = td_c_memcpy;
  p->memset = td_c_memset;
  p->synchronize = td_c_synchronize;
  p->nccl_get_unique_id = td_c_nccl_id;
  p->nccl_comm_init = td_c_nccl_init;
  p->nccl_comm_destroy = td_c_nccl_destroy;
  p->nccl_allreduce = td_c_nccl_allreduce;
  p->nccl_allgather = td_c_nccl_allgather;
  p->nccl_reduce_scatter = td_c_nccl_reduce_scatter;
  p->nccl_broadcast = td_c_nccl_broadcast;
  p->nccl_send = td_c_nccl_send;
  p->nccl_recv = td_c_nccl_recv;
  return p;
}
