/* Tests of the CPU reference ops (gpu/ops_cpu.c): every forward against a
 * direct formula and every backward against central finite differences of
 * loss = sum(out * R) for a random R.  Shapes are small so that every input
 * element is perturbed. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "ops.h"
#include "tensor.h"
#include "test.h"

/* -- Helpers -------------------------------------------------------------------- */

static float *rnd(int64_t n, uint64_t seed, float std) {
  float *p = malloc(sizeof(float) * (size_t)(n ? n : 1));
  td_rng_normal(p, n, seed, 0, std);
  return p;
}

static double dotd(const float *a, const float *b, int64_t n) {
  double s = 0;
  for (int64_t i = 0; i < n; i++) s += (double)a[i] * b[i];
  return s;
}

static int close_to(double got, double want, double rtol, double atol) {
  return fabs(got - want) <= atol + rtol * fmax(fabs(got), fabs(want));
}

#define ASSERT_CLOSE(got, want, rtol, atol)                                    \
  do {                                                                         \
    double g__ = (got), w__ = (want);                                          \
    if (!close_to(g__, w__, rtol, atol)) {                                     \
      fprintf(stderr, "%s:%d: %s = %.7g, want %.7g\n", __FILE__, __LINE__,     \
              #got, g__, w__);                                                 \
      abort();                                                                 \
    }                                                                          \
  } while (0)

/* A forward pass over the inputs writing nout floats; ctx carries shapes. */
typedef void (*fwd_fn)(void *ctx, float **in, float *out);

/* Checks analytic gradients grad[k] of loss = sum(out * r) against central
 * differences for every element of each input k with grad[k] != NULL. */
static void fd_check(fwd_fn f, void *ctx, float **in, const int64_t *nin,
                     int k_inputs, int64_t nout, const float *r, float **grad,
                     float eps, double rtol, double atol) {
  float *out = malloc(sizeof(float) * (size_t)nout);
  for (int k = 0; k < k_inputs; k++) {
    if (!grad[k]) continue;
    for (int64_t i = 0; i < nin[k]; i++) {
      float keep = in[k][i];
      in[k][i] = keep + eps;
      f(ctx, in, out);
      double lp = dotd(out, r, nout);
      in[k][i] = keep - eps;
      f(ctx, in, out);
      double lm = dotd(out, r, nout);
      in[k][i] = keep;
      double num = (lp - lm) / (2.0 * eps);
      if (!close_to(grad[k][i], num, rtol, atol)) {
        fprintf(stderr, "input %d element %lld: analytic %.7g numeric %.7g\n", k,
                (long long)i, grad[k][i], num);
        abort();
      }
    }
  }
  free(out);
}

static const td_ops_t *O = &td_cpu_ops;

/* -- matmul ---------------------------------------------------------------------- */

typedef struct {
  int M, N, K, ta, tb;
} mm_ctx;

static void mm_fwd(void *vc, float **in, float *out) {
  mm_ctx *c = vc;
  ASSERT_EQ(O->matmul(TD_F32, out, in[0], in[1], c->M, c->N, c->K, c->ta, c->tb, 1, 0), 0);
}

TEST_IMPL(tensor_matmul_forward) {
  int M = 5, N = 3, K = 4;
  for (int ta = 0; ta < 2; ta++)
    for (int tb = 0; tb < 2; tb++) {
      float *a = rnd(M * K, 1, 1), *b = rnd(K * N, 2, 1), *c = rnd(M * N, 3, 1);
      float *c0 = malloc(sizeof(float) * M * N);
      memcpy(c0, c, sizeof(float) * M * N);
      ASSERT_EQ(O->matmul(TD_F32, c, a, b, M, N, K, ta, tb, 2.0f, 0.5f), 0);
      for (int i = 0; i < M; i++)
        for (int j = 0; j < N; j++) {
          double s = 0;
          for (int k = 0; k < K; k++)
            s += (double)(ta ? a[k * M + i] : a[i * K + k]) * (tb ? b[j * K + k] : b[k * N + j]);
          ASSERT_CLOSE(c[i * N + j], 2 * s + 0.5 * c0[i * N + j], 1e-5, 1e-5);
        }
      free(a), free(b), free(c), free(c0);
    }
  /* Non-f32 dtypes are CUDA-only. */
  float x = 0;
  ASSERT_EQ(O->matmul(TD_BF16, &x, &x, &x, 1, 1, 1, 0, 0, 1, 0), TD_GPU_EDTYPE);
  return 0;
}

TEST_IMPL(tensor_matmul_backward) {
  /* c = a @ b:  da = dc @ b^T, db = a^T @ dc (through matmul itself). */
  mm_ctx c = {4, 3, 5, 0, 0};
  float *a = rnd(c.M * c.K, 4, 1), *b = rnd(c.K * c.N, 5, 1), *r = rnd(c.M * c.N, 6, 1);
  float *da = malloc(sizeof(float) * c.M * c.K), *db = malloc(sizeof(float) * c.K * c.N);
  ASSERT_EQ(O->matmul(TD_F32, da, r, b, c.M, c.K, c.N, 0, 1, 1, 0), 0);
  ASSERT_EQ(O->matmul(TD_F32, db, a, r, c.K, c.N, c.M, 1, 0, 1, 0), 0);
  float *in[2] = {a, b}, *g[2] = {da, db};
  int64_t n[2] = {c.M * c.K, c.K * c.N};
  fd_check(mm_fwd, &c, in, n, 2, c.M * c.N, r, g, 1e-2f, 1e-3, 1e-3);
  free(a), free(b), free(r), free(da), free(db);
  return 0;
}

/* -- add / mul / sum_rows ----------------------------------------------------------- */

TEST_IMPL(tensor_elementwise) {
  int64_t n = 12, nb = 4;
  float *a = rnd(n, 7, 1), *b = rnd(nb, 8, 1), out[12], s[4];
  ASSERT_EQ(O->add(out, a, b, n, nb, 2, -3), 0);
  for (int64_t i = 0; i < n; i++) ASSERT_CLOSE(out[i], 2 * a[i] - 3 * b[i % nb], 1e-6, 1e-6);
  ASSERT_EQ(O->mul(out, a, b, n, nb), 0);
  for (int64_t i = 0; i < n; i++) ASSERT_CLOSE(out[i], a[i] * b[i % nb], 1e-6, 1e-7);
  ASSERT_EQ(O->add(out, a, b, n, 5, 1, 1), TD_GPU_ESHAPE);
  ASSERT_EQ(O->sum_rows(s, a, 3, 4, 0), 0);
  for (int c = 0; c < 4; c++) ASSERT_CLOSE(s[c], a[c] + a[4 + c] + a[8 + c], 1e-6, 1e-6);
  ASSERT_EQ(O->sum_rows(s, a, 3, 4, 1), 0);
  for (int c = 0; c < 4; c++) ASSERT_CLOSE(s[c], 2 * (a[c] + a[4 + c] + a[8 + c]), 1e-6, 1e-6);
  double tot = 0;
  ASSERT_EQ(O->sum(&tot, a, n), 0);
  ASSERT_CLOSE(tot, dotd(a, (float[12]){1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1}, n), 1e-9, 1e-9);
  free(a), free(b);
  return 0;
}

/* -- softmax ---------------------------------------------------------------------- */

typedef struct {
  int64_t rows, cols;
} rc_ctx;

static void sm_fwd(void *vc, float **in, float *out) {
  rc_ctx *c = vc;
  ASSERT_EQ(O->softmax_fwd(out, in[0], c->rows, c->cols), 0);
}

TEST_IMPL(tensor_softmax) {
  rc_ctx c = {3, 5};
  float *x = rnd(15, 9, 2), *r = rnd(15, 10, 1), y[15], dx[15];
  ASSERT_EQ(O->softmax_fwd(y, x, 3, 5), 0);
  for (int i = 0; i < 3; i++) {
    double z = 0;
    for (int j = 0; j < 5; j++) z += exp(x[i * 5 + j]);
    for (int j = 0; j < 5; j++) ASSERT_CLOSE(y[i * 5 + j], exp(x[i * 5 + j]) / z, 1e-5, 1e-7);
  }
  ASSERT_EQ(O->softmax_bwd(dx, r, y, 3, 5, 0), 0);
  float *in[1] = {x}, *g[1] = {dx};
  int64_t n[1] = {15};
  fd_check(sm_fwd, &c, in, n, 1, 15, r, g, 1e-2f, 5e-3, 5e-4);
  /* accumulate adds */
  float dx2[15];
  memcpy(dx2, dx, sizeof(dx));
  ASSERT_EQ(O->softmax_bwd(dx2, r, y, 3, 5, 1), 0);
  for (int i = 0; i < 15; i++) ASSERT_CLOSE(dx2[i], 2 * dx[i], 1e-6, 1e-7);
  /* Large logits do not overflow. */
  float big[2] = {1000, 1000}, yb[2];
  ASSERT_EQ(O->softmax_fwd(yb, big, 1, 2), 0);
  ASSERT_CLOSE(yb[0], 0.5, 1e-6, 0);
  free(x), free(r);
  return 0;
}

/* -- layernorm ----------------------------------------------------------------------- */

static void ln_fwd(void *vc, float **in, float *out) {
  rc_ctx *c = vc;
  ASSERT_EQ(O->layernorm_fwd(out, NULL, NULL, in[0], in[1], in[2], c->rows, c->cols, 1e-5f), 0);
}

TEST_IMPL(tensor_layernorm) {
  rc_ctx c = {4, 6};
  int64_t n = 24;
  float *x = rnd(n, 11, 1.5f), *w = rnd(6, 12, 1), *b = rnd(6, 13, 1), *r = rnd(n, 14, 1);
  float y[24], mean[4], rstd[4], dx[24], dw[6], db[6];
  float ones[6] = {1, 1, 1, 1, 1, 1}, zeros[6] = {0};
  ASSERT_EQ(O->layernorm_fwd(y, mean, rstd, x, ones, zeros, 4, 6, 1e-5f), 0);
  for (int i = 0; i < 4; i++) { /* unit weights: each row has mean 0, variance 1 */
    double m = 0, v = 0;
    for (int j = 0; j < 6; j++) m += y[i * 6 + j];
    for (int j = 0; j < 6; j++) v += y[i * 6 + j] * y[i * 6 + j];
    ASSERT_CLOSE(m / 6, 0, 0, 1e-5);
    ASSERT_CLOSE(v / 6, 1, 1e-4, 1e-4);
  }
  ASSERT_EQ(O->layernorm_fwd(y, mean, rstd, x, w, b, 4, 6, 1e-5f), 0);
  ASSERT_EQ(O->layernorm_bwd(dx, dw, db, r, x, w, mean, rstd, 4, 6, 0), 0);
  float *in[3] = {x, w, b}, *g[3] = {dx, dw, db};
  int64_t ns[3] = {n, 6, 6};
  fd_check(ln_fwd, &c, in, ns, 3, n, r, g, 1e-2f, 5e-3, 5e-4);
  free(x), free(w), free(b), free(r);
  return 0;
}

/* -- gelu ---------------------------------------------------------------------------- */

static void gelu_fwd(void *vc, float **in, float *out) {
  ASSERT_EQ(O->gelu_fwd(out, in[0], *(int64_t *)vc), 0);
}

TEST_IMPL(tensor_gelu) {
  int64_t n = 20;
  float *x = rnd(n, 15, 2), *r = rnd(n, 16, 1), y[20], dx[20];
  ASSERT_EQ(O->gelu_fwd(y, x, n), 0);
  for (int i = 0; i < n; i++) {
    double v = x[i];
    ASSERT_CLOSE(y[i], 0.5 * v * (1 + tanh(sqrt(2 / M_PI) * (v + 0.044715 * v * v * v))), 1e-5, 1e-6);
  }
  ASSERT_EQ(O->gelu_bwd(dx, r, x, n, 0), 0);
  float *in[1] = {x}, *g[1] = {dx};
  fd_check(gelu_fwd, &n, in, &n, 1, n, r, g, 1e-2f, 5e-3, 5e-4);
  free(x), free(r);
  return 0;
}

/* -- embedding --------------------------------------------------------------------------- */

typedef struct {
  const int32_t *ids;
  int64_t n, vocab, dim;
} emb_ctx;

static void emb_fwd(void *vc, float **in, float *out) {
  emb_ctx *c = vc;
  ASSERT_EQ(O->embedding_fwd(out, c->ids, in[0], c->n, c->vocab, c->dim), 0);
}

TEST_IMPL(tensor_embedding) {
  int32_t ids[5] = {2, 0, 2, 3, 1};
  emb_ctx c = {ids, 5, 4, 3};
  float *tab = rnd(12, 17, 1), *r = rnd(15, 18, 1), y[15], dt[12] = {0};
  ASSERT_EQ(O->embedding_fwd(y, ids, tab, 5, 4, 3), 0);
  for (int i = 0; i < 5; i++)
    for (int j = 0; j < 3; j++) ASSERT_EQ(y[i * 3 + j], tab[ids[i] * 3 + j]);
  ASSERT_EQ(O->embedding_bwd(dt, r, ids, 5, 4, 3), 0);
  float *in[1] = {tab}, *g[1] = {dt};
  int64_t n = 12;
  fd_check(emb_fwd, &c, in, &n, 1, 15, r, g, 1e-2f, 1e-3, 1e-4);
  int32_t bad[1] = {4};
  ASSERT_EQ(O->embedding_fwd(y, bad, tab, 1, 4, 3), TD_GPU_ERANGE);
  bad[0] = -1;
  ASSERT_EQ(O->embedding_bwd(dt, r, bad, 1, 4, 3), TD_GPU_ERANGE);
  free(tab), free(r);
  return 0;
}

/* -- attention ------------------------------------------------------------------------------ */

typedef struct {
  int B, T, C, NH;
  float *att;
} att_ctx;

static void att_fwd(void *vc, float **in, float *out) {
  att_ctx *c = vc;
  ASSERT_EQ(O->attention_fwd(out, c->att, in[0], c->B, c->T, c->C, c->NH), 0);
}

TEST_IMPL(tensor_attention) {
  att_ctx c = {2, 4, 6, 2, NULL};
  int64_t nq = (int64_t)c.B * c.T * 3 * c.C, no = (int64_t)c.B * c.T * c.C;
  float *qkv = rnd(nq, 19, 1), *r = rnd(no, 20, 1);
  float *out = malloc(sizeof(float) * no), *dq = malloc(sizeof(float) * nq);
  c.att = malloc(sizeof(float) * c.B * c.NH * c.T * c.T);
  ASSERT_EQ(O->attention_fwd(out, c.att, qkv, c.B, c.T, c.C, c.NH), 0);
  /* Direct formula for one (b, t, h): b=1, t=2, h=1. */
  int hs = c.C / c.NH, b = 1, t = 2, h = 1;
  double w[4], z = 0;
  for (int t2 = 0; t2 <= t; t2++) {
    double s = 0;
    for (int i = 0; i < hs; i++)
      s += qkv[(b * c.T + t) * 18 + h * hs + i] * qkv[(b * c.T + t2) * 18 + 6 + h * hs + i];
    w[t2] = exp(s / sqrt(hs));
    z += w[t2];
  }
  for (int i = 0; i < hs; i++) {
    double o = 0;
    for (int t2 = 0; t2 <= t; t2++) o += w[t2] / z * qkv[(b * c.T + t2) * 18 + 12 + h * hs + i];
    ASSERT_CLOSE(out[(b * c.T + t) * 6 + h * hs + i], o, 1e-5, 1e-6);
  }
  /* Causality: the masked probabilities are exactly 0. */
  ASSERT_EQ(c.att[((1 * c.NH + 1) * c.T + 1) * c.T + 3], 0.0f);
  ASSERT_EQ(O->attention_bwd(dq, r, qkv, c.att, c.B, c.T, c.C, c.NH, 0), 0);
  float *in[1] = {qkv}, *g[1] = {dq};
  fd_check(att_fwd, &c, in, &nq, 1, no, r, g, 1e-2f, 5e-3, 5e-4);
  ASSERT_EQ(O->attention_fwd(out, c.att, qkv, 1, 1, 5, 2), TD_GPU_EINVAL);
  free(qkv), free(r), free(out), free(dq), free(c.att);
  return 0;
}

TEST_IMPL(tensor_attention_cached) {
  /* Feeding a sequence through the KV cache in pieces (prefill 3, then one
   * at a time) gives the same outputs as full causal attention. */
  int B = 2, T = 6, C = 8, NH = 2, Tmax = 8;
  float *qkv = rnd((int64_t)B * T * 3 * C, 21, 1);
  float *full = malloc(sizeof(float) * B * T * C), *att = malloc(sizeof(float) * B * NH * T * T);
  ASSERT_EQ(O->attention_fwd(full, att, qkv, B, T, C, NH), 0);
  float *kc = calloc((size_t)B * Tmax * C, sizeof(float)), *vc = calloc((size_t)B * Tmax * C, sizeof(float));
  int pos = 0;
  int pieces[4] = {3, 1, 1, 1};
  for (int p = 0; p < 4; p++) {
    int tn = pieces[p];
    float *chunk = malloc(sizeof(float) * B * tn * 3 * C), *o = malloc(sizeof(float) * B * tn * C);
    for (int b = 0; b < B; b++)
      memcpy(chunk + (size_t)b * tn * 3 * C, qkv + ((size_t)b * T + pos) * 3 * C, sizeof(float) * tn * 3 * C);
    ASSERT_EQ(O->attention_cached(o, kc, vc, chunk, B, tn, pos, Tmax, C, NH), 0);
    for (int b = 0; b < B; b++)
      for (int t = 0; t < tn; t++)
        for (int i = 0; i < C; i++)
          ASSERT_CLOSE(o[((size_t)b * tn + t) * C + i], full[((size_t)b * T + pos + t) * C + i], 1e-5, 1e-6);
    pos += tn;
    free(chunk), free(o);
  }
  float o1[16];
  ASSERT_EQ(O->attention_cached(o1, kc, vc, qkv, 1, 3, 6, Tmax, C, NH), TD_GPU_EINVAL);
  free(qkv), free(full), free(att), free(kc), free(vc);
  return 0;
}

/* -- cross-entropy ------------------------------------------------------------------------- */

typedef struct {
  const int32_t *tg;
  int64_t rows, V;
} ce_ctx;

static void ce_fwd(void *vc, float **in, float *out) {
  ce_ctx *c = vc;
  ASSERT_EQ(O->cross_entropy_fwd(out, in[0], c->tg, c->rows, c->V), 0);
}

TEST_IMPL(tensor_cross_entropy) {
  int32_t tg[4] = {1, -1, 4, 0};
  ce_ctx c = {tg, 4, 5};
  float *lg = rnd(20, 22, 2), *r = rnd(4, 23, 1), loss[4], dl[20];
  ASSERT_EQ(O->cross_entropy_fwd(loss, lg, tg, 4, 5), 0);
  for (int i = 0; i < 4; i++) {
    if (tg[i] < 0) {
      ASSERT_EQ(loss[i], 0.0f);
      continue;
    }
    double z = 0;
    for (int j = 0; j < 5; j++) z += exp(lg[i * 5 + j]);
    ASSERT_CLOSE(loss[i], log(z) - lg[i * 5 + tg[i]], 1e-5, 1e-6);
  }
  /* Backward with per-row scale r: one call per row to apply r[i]. */
  for (int i = 0; i < 4; i++)
    ASSERT_EQ(O->cross_entropy_bwd(dl + i * 5, lg + i * 5, tg + i, 1, 5, r[i], 0), 0);
  float *in[1] = {lg}, *g[1] = {dl};
  int64_t n = 20;
  fd_check(ce_fwd, &c, in, &n, 1, 4, r, g, 1e-2f, 5e-3, 5e-4);
  int32_t bad[1] = {5};
  ASSERT_EQ(O->cross_entropy_fwd(loss, lg, bad, 1, 5), TD_GPU_ERANGE);
  free(lg), free(r);
  return 0;
}

/* -- AdamW, argmax, sampling ---------------------------------------------------------------- */

TEST_IMPL(tensor_adamw) {
  float p[3] = {1, -2, 0.5f}, g[3] = {0.1f, -0.3f, 0}, m[3] = {0}, v[3] = {0};
  double pr[3] = {1, -2, 0.5}, mr[3] = {0}, vr[3] = {0};
  double lr = 0.01, b1 = 0.9, b2 = 0.95, eps = 1e-8, wd = 0.1;
  for (int t = 1; t <= 3; t++) {
    ASSERT_EQ(O->adamw(p, g, m, v, 3, (float)lr, (float)b1, (float)b2, (float)eps, (float)wd, t), 0);
    for (int i = 0; i < 3; i++) {
      mr[i] = b1 * mr[i] + (1 - b1) * g[i];
      vr[i] = b2 * vr[i] + (1 - b2) * g[i] * g[i];
      double mh = mr[i] / (1 - pow(b1, t)), vh = vr[i] / (1 - pow(b2, t));
      pr[i] -= lr * (mh / (sqrt(vh) + eps) + wd * pr[i]);
      ASSERT_CLOSE(p[i], pr[i], 1e-5, 1e-6);
    }
  }
  ASSERT_EQ(O->adamw(p, g, m, v, 3, 0.1f, 0.9f, 0.9f, 1e-8f, 0, 0), TD_GPU_EINVAL);
  return 0;
}

TEST_IMPL(tensor_argmax_sample) {
  float x[6] = {0.1f, 3, -1, 5, 5, 2};
  int32_t out[2];
  ASSERT_EQ(O->argmax(out, x, 2, 3), 0);
  ASSERT_EQ(out[0], 1);
  ASSERT_EQ(out[1], 0); /* first of a tie */
  double u[2] = {0.99, 0.99};
  ASSERT_EQ(td_sample_rows(out, x, 2, 3, 0, 0, u), 0); /* temperature 0 = argmax */
  ASSERT_EQ(out[0], 1);
  ASSERT_EQ(td_sample_rows(out, x, 2, 3, 1, 1, u), 0); /* top-1 = argmax */
  ASSERT_EQ(out[0], 1);
  /* Sampled frequencies follow softmax(x / temperature) within top-k. */
  float l[4] = {0, 1, 2, -5};
  int counts[4] = {0};
  int n = 20000;
  for (int i = 0; i < n; i++) {
    double ui = td_rng_uniform(99, (uint64_t)i);
    int32_t id;
    ASSERT_EQ(td_sample_rows(&id, l, 1, 4, 2.0f, 3, &ui), 0);
    counts[id]++;
  }
  ASSERT_EQ(counts[3], 0); /* outside the top 3 */
  double z = exp(0.0) + exp(0.5) + exp(1.0);
  for (int j = 0; j < 3; j++) ASSERT_CLOSE(counts[j] / (double)n, exp(j / 2.0) / z, 0, 0.015);
  return 0;
}

TEST_IMPL(tensor_rng) {
  float a[1001], b[1001];
  td_rng_normal(a, 1001, 7, 0, 1);
  td_rng_normal(b, 1001, 7, 0, 1);
  ASSERT(memcmp(a, b, sizeof(a)) == 0); /* deterministic */
  td_rng_normal(b, 1001, 8, 0, 1);
  ASSERT(memcmp(a, b, sizeof(a)) != 0); /* seed matters */
  double m = 0, v = 0;
  for (int i = 0; i < 1001; i++) m += a[i];
  m /= 1001;
  for (int i = 0; i < 1001; i++) v += (a[i] - m) * (a[i] - m);
  v /= 1000;
  ASSERT_CLOSE(m, 0, 0, 0.1);
  ASSERT_CLOSE(v, 1, 0.12, 0);
  /* Prefix property: element i depends only on (seed, i). */
  td_rng_normal(b, 10, 7, 0, 1);
  ASSERT(memcmp(a, b, sizeof(float) * 10) == 0);
  return 0;
}
