/* Tide CPU reference kernels: the specification and test oracle of every op
 * in ops.h, in plain C (matmul through OpenBLAS sgemm).  Written for clarity
 * first; the CUDA plugin must match these within the tolerances its tests
 * state. */
#include <cblas.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "gpu_err.h"
#include "half.h"
#include "ops.h"
#include "simd.h"
#include "tensor.h"

/* -- Dtype conversion -------------------------------------------------------- */

static double td__load(const void *p, int dtype, int64_t i) {
  switch (dtype) {
    case TD_F32: return ((const float *)p)[i];
    case TD_F16: return td__f16_to_f32(((const uint16_t *)p)[i]);
    case TD_BF16: return td__bf16_to_f32(((const uint16_t *)p)[i]);
    case TD_I32: return ((const int32_t *)p)[i];
    case TD_I64: return (double)((const int64_t *)p)[i];
    default: return ((const uint8_t *)p)[i];
  }
}

static void td__store(void *p, int dtype, int64_t i, double v) {
  switch (dtype) {
    case TD_F32: ((float *)p)[i] = (float)v; break;
    case TD_F16: ((uint16_t *)p)[i] = td__f32_to_f16((float)v); break;
    case TD_BF16: ((uint16_t *)p)[i] = td__f32_to_bf16((float)v); break;
    case TD_I32: ((int32_t *)p)[i] = (int32_t)v; break;
    case TD_I64: ((int64_t *)p)[i] = (int64_t)v; break;
    default: ((uint8_t *)p)[i] = (uint8_t)v; break;
  }
}

static int td__cpu_convert(void *dst, int dd, const void *src, int sd,
                           int64_t n) {
  if (td_dtype_size(dd) == 0 || td_dtype_size(sd) == 0) return TD_GPU_EDTYPE;
  if (dd == sd) {
    memcpy(dst, src, (size_t)n * td_dtype_size(dd));
  } else if (dd == TD_F32 && sd == TD_BF16) {
    for (int64_t i = 0; i < n; i++)
      ((float *)dst)[i] = td__bf16_to_f32(((const uint16_t *)src)[i]);
  } else if (dd == TD_BF16 && sd == TD_F32) {
    for (int64_t i = 0; i < n; i++)
      ((uint16_t *)dst)[i] = td__f32_to_bf16(((const float *)src)[i]);
  } else if (dd == TD_I64 && sd == TD_I32) {
    for (int64_t i = 0; i < n; i++)
      ((int64_t *)dst)[i] = ((const int32_t *)src)[i];
  } else if (dd == TD_I32 && sd == TD_I64) {
    for (int64_t i = 0; i < n; i++)
      ((int32_t *)dst)[i] = (int32_t)((const int64_t *)src)[i];
  } else {
    for (int64_t i = 0; i < n; i++) td__store(dst, dd, i, td__load(src, sd, i));
  }
  return 0;
}

static int td__cpu_fill(void *out, int dtype, int64_t n, double v) {
  if (dtype == TD_F32) {
    float f = (float)v, *o = out;
    for (int64_t i = 0; i < n; i++) o[i] = f;
  } else if (dtype == TD_I32) {
    int32_t x = (int32_t)v, *o = out;
    for (int64_t i = 0; i < n; i++) o[i] = x;
  } else {
    return TD_GPU_EDTYPE;
  }
  return 0;
}

static int td__cpu_strided_copy(void *dst, const void *src, size_t elem,
                                int ndim, const int64_t *shape,
                                const int64_t *stride) {
  if (ndim == 0) {
    memcpy(dst, src, elem);
    return 0;
  }
  int64_t n = 1;
  for (int i = 0; i < ndim; i++) n *= shape[i];
  if (n == 0) return 0;
  int64_t idx[TD_MAX_DIMS] = {0};
  int last = ndim - 1;
  int64_t inner = shape[last];
  char *d = dst;
  const char *s = src;
  for (int64_t k = 0; k < n; k += inner) {
    int64_t off = 0;
    for (int i = 0; i < last; i++) off += idx[i] * stride[i];
    if (stride[last] == 1) {
      memcpy(d, s + off * (int64_t)elem, (size_t)inner * elem);
    } else if (elem == 4) {
      const uint32_t *sp = (const uint32_t *)s + off;
      uint32_t *dp = (uint32_t *)d;
      for (int64_t j = 0; j < inner; j++) dp[j] = sp[j * stride[last]];
    } else {
      for (int64_t j = 0; j < inner; j++)
        memcpy(d + j * (int64_t)elem, s + (off + j * stride[last]) * (int64_t)elem,
               elem);
    }
    d += inner * (int64_t)elem;
    for (int i = last - 1; i >= 0; i--) {
      if (++idx[i] < shape[i]) break;
      idx[i] = 0;
    }
  }
  return 0;
}

/* -- Linear algebra ---------------------------------------------------------- */

static int td__cpu_matmul(int dtype, float *c, const void *a, const void *b,
                          int M, int N, int K, int ta, int tb, float alpha,
                          float beta) {
  if (dtype != TD_F32) return TD_GPU_EDTYPE;
  if (M < 0 || N < 0 || K < 0) return TD_GPU_EINVAL;
  if (M == 0 || N == 0) return 0;
  if (K == 0) { /* sgemm leaves c untouched when K == 0; define it as beta*c */
    for (int64_t i = 0; i < (int64_t)M * N; i++) c[i] = beta == 0 ? 0 : beta * c[i];
    return 0;
  }
  cblas_sgemm(CblasRowMajor, ta ? CblasTrans : CblasNoTrans,
              tb ? CblasTrans : CblasNoTrans, M, N, K, alpha, a, ta ? M : K, b,
              tb ? K : N, beta, c, N);
  return 0;
}

/* -- Elementwise ------------------------------------------------------------- */

TD__HOT static int td__cpu_add(float *out, const float *a, const float *b, int64_t n,
                       int64_t nb, float alpha, float beta) {
  if (nb <= 0 || n % nb) return TD_GPU_ESHAPE;
  for (int64_t i = 0; i < n; i += nb)
    for (int64_t j = 0; j < nb; j++) out[i + j] = alpha * a[i + j] + beta * b[j];
  return 0;
}

TD__HOT static int td__cpu_mul(float *out, const float *a, const float *b, int64_t n,
                       int64_t nb) {
  if (nb <= 0 || n % nb) return TD_GPU_ESHAPE;
  for (int64_t i = 0; i < n; i += nb)
    for (int64_t j = 0; j < nb; j++) out[i + j] = a[i + j] * b[j];
  return 0;
}

TD__HOT static int td__cpu_sum_rows(float *out, const float *in, int64_t rows,
                            int64_t cols, int accum) {
  if (!accum) memset(out, 0, sizeof(float) * (size_t)cols);
  for (int64_t r = 0; r < rows; r++)
    for (int64_t c = 0; c < cols; c++) out[c] += in[r * cols + c];
  return 0;
}

static int td__cpu_sum(double *out, const float *in, int64_t n) {
  double s = 0;
  for (int64_t i = 0; i < n; i++) s += in[i];
  *out = s;
  return 0;
}

static int td__cpu_dot(double *out, const float *a, const float *b, int64_t n) {
  double s = 0;
  for (int64_t i = 0; i < n; i++) s += (double)a[i] * b[i];
  *out = s;
  return 0;
}

/* -- Softmax, layernorm, gelu ---------------------------------------------- */

TD__HOT static int td__cpu_softmax_fwd(float *y, const float *x, int64_t rows,
                               int64_t cols) {
  for (int64_t r = 0; r < rows; r++) {
    const float *xr = x + r * cols;
    float *yr = y + r * cols;
    float m = -INFINITY;
    for (int64_t c = 0; c < cols; c++) m = fmaxf(m, xr[c]);
    float s = 0;
    for (int64_t c = 0; c < cols; c++) {
      yr[c] = td__exp(xr[c] - m);
      s += yr[c];
    }
    float inv = (float)(1.0 / s);
    for (int64_t c = 0; c < cols; c++) yr[c] *= inv;
  }
  return 0;
}

TD__HOT static int td__cpu_softmax_bwd(float *dx, const float *dy, const float *y,
                               int64_t rows, int64_t cols, int accum) {
  for (int64_t r = 0; r < rows; r++) {
    const float *dyr = dy + r * cols, *yr = y + r * cols;
    float *dxr = dx + r * cols;
    double dot = 0;
    for (int64_t c = 0; c < cols; c++) dot += (double)dyr[c] * yr[c];
    for (int64_t c = 0; c < cols; c++) {
      float g = yr[c] * (dyr[c] - (float)dot);
      dxr[c] = accum ? dxr[c] + g : g;
    }
  }
  return 0;
}

TD__HOT static int td__cpu_layernorm_fwd(float *y, float *mean, float *rstd,
                                 const float *x, const float *w, const float *b,
                                 int64_t rows, int64_t cols, float eps) {
  for (int64_t r = 0; r < rows; r++) {
    const float *xr = x + r * cols;
    float *yr = y + r * cols;
    double m = 0, v = 0;
    for (int64_t c = 0; c < cols; c++) m += xr[c];
    m /= (double)cols;
    for (int64_t c = 0; c < cols; c++) {
      double d = xr[c] - m;
      v += d * d;
    }
    v /= (double)cols;
    float s = (float)(1.0 / sqrt(v + eps)), mf = (float)m;
    for (int64_t c = 0; c < cols; c++) yr[c] = (xr[c] - mf) * s * w[c] + b[c];
    if (mean) mean[r] = mf;
    if (rstd) rstd[r] = s;
  }
  return 0;
}

TD__HOT static int td__cpu_layernorm_bwd(float *dx, float *dw, float *db,
                                 const float *dy, const float *x,
                                 const float *w, const float *mean,
                                 const float *rstd, int64_t rows, int64_t cols,
                                 int accum) {
  if (!accum) {
    memset(dw, 0, sizeof(float) * (size_t)cols);
    memset(db, 0, sizeof(float) * (size_t)cols);
  }
  for (int64_t r = 0; r < rows; r++) {
    const float *dyr = dy + r * cols, *xr = x + r * cols;
    float *dxr = dx + r * cols;
    float m = mean[r], s = rstd[r];
    double dmean = 0, dnorm_mean = 0;
    for (int64_t c = 0; c < cols; c++) {
      float norm = (xr[c] - m) * s, dn = w[c] * dyr[c];
      dmean += dn;
      dnorm_mean += dn * norm;
    }
    dmean /= (double)cols;
    dnorm_mean /= (double)cols;
    for (int64_t c = 0; c < cols; c++) {
      float norm = (xr[c] - m) * s, dn = w[c] * dyr[c];
      db[c] += dyr[c];
      dw[c] += norm * dyr[c];
      float g = (dn - (float)dmean - norm * (float)dnorm_mean) * s;
      dxr[c] = accum ? dxr[c] + g : g;
    }
  }
  return 0;
}

#define TD__GELU_K 0.7978845608028654f /* sqrt(2/pi) */

/* tanh through one exponential (libm's tanhf is several times slower);
 * absolute error ~1e-7; beyond +-15 tanh is +-1 in f32. */
static inline float td__tanh(float u) {
  u = u > 15.0f ? 15.0f : u;
  u = u < -15.0f ? -15.0f : u;
  return 1.0f - 2.0f / (td__exp(2.0f * u) + 1.0f);
}

TD__HOT static int td__cpu_gelu_fwd(float *y, const float *x, int64_t n) {
  for (int64_t i = 0; i < n; i++) {
    float v = x[i];
    y[i] = 0.5f * v * (1.0f + td__tanh(TD__GELU_K * (v + 0.044715f * v * v * v)));
  }
  return 0;
}

TD__HOT static int td__cpu_gelu_bwd(float *dx, const float *dy, const float *x,
                                    int64_t n, int accum) {
  for (int64_t i = 0; i < n; i++) {
    float v = x[i];
    float t = td__tanh(TD__GELU_K * (v + 0.044715f * v * v * v));
    float du = TD__GELU_K * (1.0f + 3.0f * 0.044715f * v * v);
    float g = (0.5f * (1.0f + t) + 0.5f * v * (1.0f - t * t) * du) * dy[i];
    dx[i] = accum ? dx[i] + g : g;
  }
  return 0;
}

/* -- Embedding ---------------------------------------------------------------- */

static int td__cpu_embedding_fwd(float *y, const int32_t *ids,
                                 const float *table, int64_t n, int64_t vocab,
                                 int64_t dim) {
  for (int64_t i = 0; i < n; i++)
    if (ids[i] < 0 || ids[i] >= vocab) return TD_GPU_ERANGE;
  for (int64_t i = 0; i < n; i++)
    memcpy(y + i * dim, table + (int64_t)ids[i] * dim, sizeof(float) * (size_t)dim);
  return 0;
}

static int td__cpu_embedding_bwd(float *dtable, const float *dy,
                                 const int32_t *ids, int64_t n, int64_t vocab,
                                 int64_t dim) {
  for (int64_t i = 0; i < n; i++)
    if (ids[i] < 0 || ids[i] >= vocab) return TD_GPU_ERANGE;
  for (int64_t i = 0; i < n; i++) {
    float *row = dtable + (int64_t)ids[i] * dim;
    const float *g = dy + i * dim;
    for (int64_t c = 0; c < dim; c++) row[c] += g[c];
  }
  return 0;
}

/* -- Attention ----------------------------------------------------------------- */

static int td__attn_check(int B, int T, int C, int NH) {
  return B < 0 || T < 0 || C <= 0 || NH <= 0 || C % NH ? TD_GPU_EINVAL : 0;
}

/* Attention per (batch, head) as two small GEMMs over strided views of
 * qkv: S = scale * Q K^T (into att), causal softmax in place, O = P V.  The
 * masked half is computed and then zeroed; at the sizes used here BLAS
 * still wins over a triangular loop by a wide margin. */
TD__HOT static int td__cpu_attention_fwd(float *out, float *att, const float *qkv,
                                 int B, int T, int C, int NH) {
  if (td__attn_check(B, T, C, NH)) return TD_GPU_EINVAL;
  if (B == 0 || T == 0) return 0;
  int hs = C / NH, C3 = 3 * C;
  float scale = 1.0f / sqrtf((float)hs);
  for (int b = 0; b < B; b++)
    for (int h = 0; h < NH; h++) {
      const float *q = qkv + (int64_t)b * T * C3 + h * hs;
      float *p = att + ((int64_t)b * NH + h) * T * T;
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, T, T, hs, scale, q, C3,
                  q + C, C3, 0.0f, p, T);
      for (int t = 0; t < T; t++) {
        float *a = p + (int64_t)t * T, m = -INFINITY, sum = 0;
        for (int t2 = 0; t2 <= t; t2++) m = fmaxf(m, a[t2]);
        for (int t2 = 0; t2 <= t; t2++) {
          a[t2] = td__exp(a[t2] - m);
          sum += a[t2];
        }
        float inv = 1.0f / sum;
        for (int t2 = 0; t2 <= t; t2++) a[t2] *= inv;
        for (int t2 = t + 1; t2 < T; t2++) a[t2] = 0;
      }
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, T, hs, T, 1.0f, p, T,
                  q + 2 * C, C3, 0.0f, out + (int64_t)b * T * C + h * hs, C);
    }
  return 0;
}

/* Backward per (batch, head): dV += P^T dO, dP = dO V^T, dS = P * (dP -
 * rowsum(P * dP)) * scale, dQ += dS K, dK += dS^T Q. */
TD__HOT static int td__cpu_attention_bwd(float *dqkv, const float *dout,
                                 const float *qkv, const float *att, int B,
                                 int T, int C, int NH, int accum) {
  if (td__attn_check(B, T, C, NH)) return TD_GPU_EINVAL;
  if (!accum) memset(dqkv, 0, sizeof(float) * (size_t)B * T * 3 * C);
  if (B == 0 || T == 0) return 0;
  int hs = C / NH, C3 = 3 * C;
  float scale = 1.0f / sqrtf((float)hs);
  float *ds = malloc(sizeof(float) * (size_t)T * T);
  if (!ds) return TD_GPU_ENOMEM;
  for (int b = 0; b < B; b++)
    for (int h = 0; h < NH; h++) {
      const float *q = qkv + (int64_t)b * T * C3 + h * hs;
      const float *p = att + ((int64_t)b * NH + h) * T * T;
      const float *go = dout + (int64_t)b * T * C + h * hs;
      float *dq = dqkv + (int64_t)b * T * C3 + h * hs;
      cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, T, hs, T, 1.0f, p, T, go, C,
                  1.0f, dq + 2 * C, C3);
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, T, T, hs, 1.0f, go, C,
                  q + 2 * C, C3, 0.0f, ds, T);
      for (int t = 0; t < T; t++) {
        const float *pr = p + (int64_t)t * T;
        float *d = ds + (int64_t)t * T, dot = 0;
        for (int t2 = 0; t2 <= t; t2++) dot += pr[t2] * d[t2];
        for (int t2 = 0; t2 <= t; t2++) d[t2] = pr[t2] * (d[t2] - dot) * scale;
        for (int t2 = t + 1; t2 < T; t2++) d[t2] = 0;
      }
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, T, hs, T, 1.0f, ds, T,
                  q + C, C3, 1.0f, dq, C3);
      cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, T, hs, T, 1.0f, ds, T, q,
                  C3, 1.0f, dq + C, C3);
    }
  free(ds);
  return 0;
}

static int td__cpu_attention_cached(float *out, float *kcache, float *vcache,
                                    const float *qkv, int B, int Tn, int pos,
                                    int Tmax, int C, int NH) {
  if (td__attn_check(B, Tn, C, NH) || pos < 0 || pos + Tn > Tmax) return TD_GPU_EINVAL;
  int hs = C / NH;
  float scale = 1.0f / sqrtf((float)hs);
  float *s = malloc(sizeof(float) * (size_t)(Tmax > 0 ? Tmax : 1));
  if (!s) return TD_GPU_ENOMEM;
  for (int b = 0; b < B; b++)
    for (int t = 0; t < Tn; t++) {
      const float *row = qkv + ((int64_t)b * Tn + t) * 3 * C;
      memcpy(kcache + ((int64_t)b * Tmax + pos + t) * C, row + C, sizeof(float) * (size_t)C);
      memcpy(vcache + ((int64_t)b * Tmax + pos + t) * C, row + 2 * C, sizeof(float) * (size_t)C);
    }
  for (int b = 0; b < B; b++)
    for (int t = 0; t < Tn; t++)
      for (int h = 0; h < NH; h++) {
        const float *q = qkv + ((int64_t)b * Tn + t) * 3 * C + h * hs;
        int n = pos + t + 1;
        float m = -INFINITY;
        for (int t2 = 0; t2 < n; t2++) {
          const float *k = kcache + ((int64_t)b * Tmax + t2) * C + h * hs;
          float d = 0;
          for (int i = 0; i < hs; i++) d += q[i] * k[i];
          s[t2] = d * scale;
          if (s[t2] > m) m = s[t2];
        }
        float sum = 0;
        for (int t2 = 0; t2 < n; t2++) {
          s[t2] = expf(s[t2] - m);
          sum += s[t2];
        }
        float *o = out + ((int64_t)b * Tn + t) * C + h * hs;
        for (int i = 0; i < hs; i++) o[i] = 0;
        for (int t2 = 0; t2 < n; t2++) {
          const float *v = vcache + ((int64_t)b * Tmax + t2) * C + h * hs;
          float w = s[t2] / sum;
          for (int i = 0; i < hs; i++) o[i] += w * v[i];
        }
      }
  free(s);
  return 0;
}

/* -- Cross-entropy ---------------------------------------------------------- */

static int td__cpu_ce_fwd(float *losses, const float *logits,
                          const int32_t *targets, int64_t rows, int64_t V) {
  if (V <= 0) return TD_GPU_EINVAL;
  for (int64_t r = 0; r < rows; r++)
    if (targets[r] < -1 || targets[r] >= V) return TD_GPU_ERANGE;
  for (int64_t r = 0; r < rows; r++) {
    if (targets[r] == -1) {
      losses[r] = 0;
      continue;
    }
    const float *l = logits + r * V;
    float m = -INFINITY;
    for (int64_t c = 0; c < V; c++) m = fmaxf(m, l[c]);
    double s = exp((double)(l[0] - m)); /* V > 0: s >= 1 once the max is in */
    for (int64_t c = 1; c < V; c++) s += exp((double)(l[c] - m));
    losses[r] = (float)(log(s) + m - l[targets[r]]);
  }
  return 0;
}

static int td__cpu_ce_bwd(float *dlogits, const float *logits,
                          const int32_t *targets, int64_t rows, int64_t V,
                          float scale, int accum) {
  if (V <= 0) return TD_GPU_EINVAL;
  for (int64_t r = 0; r < rows; r++)
    if (targets[r] < -1 || targets[r] >= V) return TD_GPU_ERANGE;
  for (int64_t r = 0; r < rows; r++) {
    const float *l = logits + r * V;
    float *d = dlogits + r * V;
    if (targets[r] == -1) {
      if (!accum) memset(d, 0, sizeof(float) * (size_t)V);
      continue;
    }
    float m = -INFINITY;
    for (int64_t c = 0; c < V; c++) m = fmaxf(m, l[c]);
    double s = 0;
    for (int64_t c = 0; c < V; c++) s += exp((double)(l[c] - m));
    float inv = (float)(1.0 / s);
    for (int64_t c = 0; c < V; c++) {
      float g = expf(l[c] - m) * inv;
      if (c == targets[r]) g -= 1.0f;
      g *= scale;
      d[c] = accum ? d[c] + g : g;
    }
  }
  return 0;
}

/* -- AdamW, argmax ------------------------------------------------------------ */

TD__HOT static int td__cpu_adamw(float *p, const float *g, float *m, float *v,
                         int64_t n, float lr, float beta1, float beta2,
                         float eps, float wd, int t) {
  if (t < 1) return TD_GPU_EINVAL;
  float c1 = 1.0f - powf(beta1, (float)t), c2 = 1.0f - powf(beta2, (float)t);
  for (int64_t i = 0; i < n; i++) {
    float gi = g[i];
    m[i] = beta1 * m[i] + (1.0f - beta1) * gi;
    v[i] = beta2 * v[i] + (1.0f - beta2) * gi * gi;
    float mh = m[i] / c1, vh = v[i] / c2;
    p[i] -= lr * (mh / (sqrtf(vh) + eps) + wd * p[i]);
  }
  return 0;
}

static int td__cpu_argmax(int32_t *out, const float *x, int64_t rows,
                          int64_t cols) {
  if (cols <= 0) return TD_GPU_EINVAL;
  for (int64_t r = 0; r < rows; r++) {
    const float *xr = x + r * cols;
    int64_t best = 0;
    for (int64_t c = 1; c < cols; c++)
      if (xr[c] > xr[best]) best = c;
    out[r] = (int32_t)best;
  }
  return 0;
}

/* -- Sampling and random numbers ------------------------------------------------ */

typedef struct {
  float v;   /* logit */
  int32_t i; /* its column */
} td__cand_t;

static int td__cand_desc(const void *a, const void *b) {
  const td__cand_t *x = a, *y = b;
  if (x->v != y->v) return x->v < y->v ? 1 : -1;
  return x->i - y->i;
}

int td_sample_rows(int32_t *out, const float *logits, int64_t rows,
                   int64_t cols, float temperature, int top_k,
                   const double *u) {
  if (cols <= 0) return TD_GPU_EINVAL;
  if (temperature <= 0) return td__cpu_argmax(out, logits, rows, cols);
  int64_t k = top_k > 0 && top_k < cols ? top_k : cols;
  td__cand_t *c = malloc(sizeof(*c) * (size_t)cols);
  if (!c) return TD_GPU_ENOMEM;
  for (int64_t r = 0; r < rows; r++) {
    const float *l = logits + r * cols;
    for (int64_t j = 0; j < cols; j++) c[j] = (td__cand_t){l[j], (int32_t)j};
    qsort(c, (size_t)cols, sizeof(*c), td__cand_desc);
    double sum = 0;
    for (int64_t j = 0; j < k; j++) sum += exp((double)(c[j].v - c[0].v) / temperature);
    double target = u[r] * sum, acc = 0;
    out[r] = c[k - 1].i;
    for (int64_t j = 0; j < k; j++) {
      acc += exp((double)(c[j].v - c[0].v) / temperature);
      if (target < acc) {
        out[r] = c[j].i;
        break;
      }
    }
  }
  free(c);
  return 0;
}

void td_rng_normal(float *out, int64_t n, uint64_t seed, float mean,
                   float std) {
  /* Box-Muller on pairs: elements 2j and 2j+1 come from draws (2j, 2j+1). */
  for (int64_t j = 0; j < n; j += 2) {
    double u1 = td_rng_uniform(seed, (uint64_t)j);
    double u2 = td_rng_uniform(seed, (uint64_t)j + 1);
    double r = sqrt(-2.0 * log(1.0 - u1)), th = 6.283185307179586 * u2;
    out[j] = (float)(mean + std * r * cos(th));
    if (j + 1 < n) out[j + 1] = (float)(mean + std * r * sin(th));
  }
}

void td_rng_fill_uniform(float *out, int64_t n, uint64_t seed, float lo,
                         float hi) {
  for (int64_t i = 0; i < n; i++)
    out[i] = (float)(lo + (hi - lo) * td_rng_uniform(seed, (uint64_t)i));
}

/* -- The table ------------------------------------------------------------------ */

const td_ops_t td_cpu_ops = {
    .name = "cpu",
    .fill = td__cpu_fill,
    .convert = td__cpu_convert,
    .strided_copy = td__cpu_strided_copy,
    .matmul = td__cpu_matmul,
    .add = td__cpu_add,
    .mul = td__cpu_mul,
    .sum_rows = td__cpu_sum_rows,
    .sum = td__cpu_sum,
    .dot = td__cpu_dot,
    .softmax_fwd = td__cpu_softmax_fwd,
    .softmax_bwd = td__cpu_softmax_bwd,
    .layernorm_fwd = td__cpu_layernorm_fwd,
    .layernorm_bwd = td__cpu_layernorm_bwd,
    .gelu_fwd = td__cpu_gelu_fwd,
    .gelu_bwd = td__cpu_gelu_bwd,
    .embedding_fwd = td__cpu_embedding_fwd,
    .embedding_bwd = td__cpu_embedding_bwd,
    .attention_fwd = td__cpu_attention_fwd,
    .attention_bwd = td__cpu_attention_bwd,
    .attention_cached = td__cpu_attention_cached,
    .cross_entropy_fwd = td__cpu_ce_fwd,
    .cross_entropy_bwd = td__cpu_ce_bwd,
    .adamw = td__cpu_adamw,
    .argmax = td__cpu_argmax,
};
