/* Tide op table: the kernels a transformer needs, forward and backward, as
 * one struct of function pointers with a CPU implementation (ops_cpu.c, the
 * specification and test oracle) and a CUDA implementation (cuda/ plugin).
 * Uses only <stdint.h>; pointers are host pointers for the CPU table and
 * device pointers for the CUDA table (the caller selects the device first).
 *
 * Conventions: row-major contiguous buffers; shapes in comments as (B,T,C);
 * every function returns 0 or a negative TD_GPU_E* code.  Outputs never
 * alias inputs unless stated.  `accum` = 0 writes gradients, 1 adds to them.
 * Attention packs q, k, v along channels: qkv is (B,T,3C), head h uses
 * channels [h*C/NH, (h+1)*C/NH) of each part.
 */
#ifndef TD_OPS_H
#define TD_OPS_H

#include <stddef.h>
#include <stdint.h>

typedef struct td_ops {
  const char *name; /* "cpu" or "cuda" */

  /* -- Memory-shaped ops (any dtype where stated) -- */

  /* out[i] = v for i < n; dtype TD_F32 or TD_I32. */
  int (*fill)(void *out, int dtype, int64_t n, double v);
  /* dst[i] = (dst_dtype) src[i] for i < n; every pair of dtypes. */
  int (*convert)(void *dst, int dst_dtype, const void *src, int src_dtype,
                 int64_t n);
  /* Gathers a strided view into contiguous dst: elem bytes per element,
   * shape/stride (in elements) of ndim <= TD_MAX_DIMS dims. */
  int (*strided_copy)(void *dst, const void *src, size_t elem, int ndim,
                      const int64_t *shape, const int64_t *stride);

  /* -- Linear algebra -- */

  /* c(M,N) = alpha * op(a) @ op(b) + beta * c, op(a) (M,K), op(b) (K,N);
   * ta/tb transpose the stored a (K,M) / b (N,K).  dtype is the dtype of a
   * and b (CPU: TD_F32 only; CUDA also TD_F16/TD_BF16); c is always f32. */
  int (*matmul)(int dtype, float *c, const void *a, const void *b, int M,
                int N, int K, int ta, int tb, float alpha, float beta);

  /* -- Elementwise; b broadcasts with period nb (n % nb == 0) -- */

  /* out[i] = alpha * a[i] + beta * b[i % nb]. */
  int (*add)(float *out, const float *a, const float *b, int64_t n,
             int64_t nb, float alpha, float beta);
  /* out[i] = a[i] * b[i % nb]. */
  int (*mul)(float *out, const float *a, const float *b, int64_t n,
             int64_t nb);
  /* out[c] (+)= sum over r of in(rows,cols)[r,c] (bias gradients). */
  int (*sum_rows)(float *out, const float *in, int64_t rows, int64_t cols,
                  int accum);
  /* *out = sum of in[0..n) accumulated in double (result on the host). */
  int (*sum)(double *out, const float *in, int64_t n);
  /* *out = sum of a[i] * b[i] accumulated in double (result on the host). */
  int (*dot)(double *out, const float *a, const float *b, int64_t n);

  /* -- Activations and normalisation (over the last dim, cols) -- */

  int (*softmax_fwd)(float *y, const float *x, int64_t rows, int64_t cols);
  /* dx (+)= y * (dy - sum(dy * y)) per row. */
  int (*softmax_bwd)(float *dx, const float *dy, const float *y, int64_t rows,
                     int64_t cols, int accum);
  /* y = (x - mean) * rstd * w + b; mean, rstd (rows) saved for backward. */
  int (*layernorm_fwd)(float *y, float *mean, float *rstd, const float *x,
                       const float *w, const float *b, int64_t rows,
                       int64_t cols, float eps);
  /* dx (+)= ..., dw (+)= ..., db (+)= ... (accum applies to all three). */
  int (*layernorm_bwd)(float *dx, float *dw, float *db, const float *dy,
                       const float *x, const float *w, const float *mean,
                       const float *rstd, int64_t rows, int64_t cols,
                       int accum);
  /* GELU, tanh approximation (GPT-2). */
  int (*gelu_fwd)(float *y, const float *x, int64_t n);
  int (*gelu_bwd)(float *dx, const float *dy, const float *x, int64_t n,
                  int accum);

  /* -- Embeddings -- */

  /* y(n,dim) = table(vocab,dim)[ids[i]]; TD_GPU_ERANGE on a bad id. */
  int (*embedding_fwd)(float *y, const int32_t *ids, const float *table,
                       int64_t n, int64_t vocab, int64_t dim);
  /* dtable[ids[i]] += dy[i] (always accumulates). */
  int (*embedding_bwd)(float *dtable, const float *dy, const int32_t *ids,
                       int64_t n, int64_t vocab, int64_t dim);

  /* -- Causal self-attention -- */

  /* out (B,T,C), att (B,NH,T,T) softmax probabilities (saved for backward;
   * masked entries 0), qkv (B,T,3C). */
  int (*attention_fwd)(float *out, float *att, const float *qkv, int B, int T,
                       int C, int NH);
  /* dqkv (B,T,3C) (+)= gradient given dout (B,T,C). */
  int (*attention_bwd)(float *dqkv, const float *dout, const float *qkv,
                       const float *att, int B, int T, int C, int NH,
                       int accum);
  /* KV-cached step: qkv (B,Tn,3C) holds positions pos..pos+Tn-1; their k and
   * v are written into kcache/vcache (B,Tmax,C); out (B,Tn,C) attends to
   * positions 0..pos+t. */
  int (*attention_cached)(float *out, float *kcache, float *vcache,
                          const float *qkv, int B, int Tn, int pos, int Tmax,
                          int C, int NH);

  /* -- Loss -- */

  /* losses(rows) = -log softmax(logits(rows,V))[target]; target -1 is
   * ignored (loss 0); other out-of-range targets: TD_GPU_ERANGE. */
  int (*cross_entropy_fwd)(float *losses, const float *logits,
                           const int32_t *targets, int64_t rows, int64_t V);
  /* dlogits (+)= scale * (softmax(logits) - onehot(target)); 0 for ignored. */
  int (*cross_entropy_bwd)(float *dlogits, const float *logits,
                           const int32_t *targets, int64_t rows, int64_t V,
                           float scale, int accum);

  /* -- Optimiser and decoding -- */

  /* AdamW (decoupled weight decay), step t >= 1, in place on p, m, v. */
  int (*adamw)(float *p, const float *g, float *m, float *v, int64_t n,
               float lr, float beta1, float beta2, float eps, float wd,
               int t);
  /* out[r] = index of the largest x(rows,cols)[r,:] (first on ties). */
  int (*argmax)(int32_t *out, const float *x, int64_t rows, int64_t cols);
} td_ops_t;

/* The CPU reference table (always present). */
extern const td_ops_t td_cpu_ops;

/* Samples one id per row of logits (rows,cols) on the host: temperature <= 0
 * means argmax; top_k <= 0 means the whole row; u[r] in [0,1) are the
 * uniform draws (one per row).  Returns 0 or a negative code. */
int td_sample_rows(int32_t *out, const float *logits, int64_t rows,
                   int64_t cols, float temperature, int top_k,
                   const double *u);

/* -- Deterministic random numbers (counter based, device independent) -- */

/* A 64-bit hash of (seed, i): splitmix64 finaliser. */
static inline uint64_t td_rng_hash(uint64_t seed, uint64_t i) {
  uint64_t z = seed * 0x9E3779B97F4A7C15ull + i * 0xD1B54A32D192ED03ull +
               0x632BE59BD9B4E019ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}
/* Uniform double in [0,1) from (seed, i). */
static inline double td_rng_uniform(uint64_t seed, uint64_t i) {
  return (double)(td_rng_hash(seed, i) >> 11) * (1.0 / 9007199254740992.0);
}
/* Fills out[0..n) with N(mean, std^2) values; element i depends only on
 * (seed, i), so any device or chunking gives the same numbers. */
void td_rng_normal(float *out, int64_t n, uint64_t seed, float mean, float std);
/* Fills out[0..n) with U(lo, hi) values. */
void td_rng_fill_uniform(float *out, int64_t n, uint64_t seed, float lo,
                         float hi);

#endif
