/* A stand-in CUDA plugin for machines without a GPU: "device" memory is host
 * memory and the kernels are the CPU reference table, so the CUDA code paths
 * of the tensor layer, the GPT and tests/gpu/cuda_test.lua (transfers,
 * device dispatch, error propagation, one-rank NCCL) run here.  It proves
 * nothing about the real kernels in gpu/cuda/; it proves the plumbing.
 * Loaded with TIDE_FORCE_CUDA_PLUGIN=1 TIDE_CUDA_PLUGIN=build/fake_cuda.so. */
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>

#include "device.h"
#include "gpu_err.h"
#include "ops.h"
#include "tensor.h"

static void (*fake_detail)(const char *fmt, ...);

static void fake_hook(void (*fn)(const char *fmt, ...)) { fake_detail = fn; }
static int fake_count(int *n) {
  *n = 1;
  return 0;
}
static int fake_name(int dev, char *buf, size_t n) {
  (void)dev;
  strncpy(buf, "fake CUDA device (host memory, CPU kernels)", n - 1);
  buf[n - 1] = '\0';
  return 0;
}
static int fake_set(int dev) { return dev == 0 ? 0 : TD_GPU_ENODEV; }
static int fake_malloc(void **p, size_t n) {
  *p = n > ((size_t)1 << 40) ? NULL : malloc(n ? n : 4);
  if (!*p) {
    if (fake_detail) fake_detail("cudaMalloc: out of memory");
    return TD_GPU_ECUDA;
  }
  return 0;
}
static int fake_free(void *p) {
  free(p);
  return 0;
}
static int fake_memcpy(void *d, const void *s, size_t n, int kind) {
  (void)kind;
  memmove(d, s, n);
  return 0;
}
static int fake_memset(void *p, int v, size_t n) {
  memset(p, v, n);
  return 0;
}
static int fake_sync(void) { return 0; }

/* One-rank NCCL: every collective is a copy. */
static int fake_id(void *id) {
  memset(id, 7, 128);
  return 0;
}
static int fake_init(void **comm, int nranks, const void *id, int rank) {
  (void)id;
  if (nranks != 1 || rank != 0) {
    if (fake_detail) fake_detail("the fake plugin only has one rank");
    return TD_GPU_ENCCL;
  }
  *comm = malloc(1);
  return 0;
}
static int fake_destroy(void *comm) {
  free(comm);
  return 0;
}
static size_t fake_esize(int dt) { return dt == TD_F16 || dt == TD_BF16 ? 2 : dt == TD_U8 ? 1 : dt == TD_I64 ? 8 : 4; }
static int fake_allreduce(void *c, const void *s, void *r, size_t n, int dt, int op) {
  (void)c, (void)op;
  memmove(r, s, n * fake_esize(dt));
  return 0;
}
static int fake_allgather(void *c, const void *s, void *r, size_t n, int dt) {
  return fake_allreduce(c, s, r, n, dt, 0);
}
static int fake_rs(void *c, const void *s, void *r, size_t n, int dt, int op) {
  return fake_allreduce(c, s, r, n, dt, op);
}
static int fake_bcast(void *c, void *b, size_t n, int dt, int root) {
  (void)c, (void)b, (void)n, (void)dt;
  return root == 0 ? 0 : TD_GPU_EINVAL;
}
static int fake_p2p(void *c, const void *b, size_t n, int dt, int peer) {
  (void)c, (void)b, (void)n, (void)dt, (void)peer;
  return TD_GPU_ENCCL;
}
static int fake_recv(void *c, void *b, size_t n, int dt, int peer) {
  return fake_p2p(c, b, n, dt, peer);
}

/* Half-precision matmul as the GPU does it: f32 accumulation of the
 * rounded inputs. */
static int fake_matmul(int dtype, float *c, const void *a, const void *b, int M, int N, int K,
                       int ta, int tb, float alpha, float beta) {
  if (dtype == TD_F32) return td_cpu_ops.matmul(dtype, c, a, b, M, N, K, ta, tb, alpha, beta);
  if (dtype != TD_F16 && dtype != TD_BF16) return TD_GPU_EDTYPE;
  float *af = malloc(sizeof(float) * ((size_t)M * K + 1)), *bf = malloc(sizeof(float) * ((size_t)K * N + 1));
  int rc = !af || !bf ? TD_GPU_ENOMEM : 0;
  if (!rc) rc = td_cpu_ops.convert(af, TD_F32, a, dtype, (int64_t)M * K);
  if (!rc) rc = td_cpu_ops.convert(bf, TD_F32, b, dtype, (int64_t)K * N);
  if (!rc) rc = td_cpu_ops.matmul(TD_F32, c, af, bf, M, N, K, ta, tb, alpha, beta);
  free(af);
  free(bf);
  return rc;
}

static td_ops_t fake_ops;

static td_cuda_plugin_t fake = {
    .abi = TD_CUDA_PLUGIN_ABI,
    .ops = &fake_ops,
    .set_detail_hook = fake_hook,
    .device_count = fake_count,
    .device_name = fake_name,
    .set_device = fake_set,
    .malloc = fake_malloc,
    .free = fake_free,
    .memcpy = fake_memcpy,
    .memset = fake_memset,
    .synchronize = fake_sync,
    .nccl_get_unique_id = fake_id,
    .nccl_comm_init = fake_init,
    .nccl_comm_destroy = fake_destroy,
    .nccl_allreduce = fake_allreduce,
    .nccl_allgather = fake_allgather,
    .nccl_reduce_scatter = fake_rs,
    .nccl_broadcast = fake_bcast,
    .nccl_send = fake_p2p,
    .nccl_recv = fake_recv,
};

__attribute__((visibility("default"))) const td_cuda_plugin_t *td_cuda_plugin_get(void) {
  fake_ops = td_cpu_ops;
  fake_ops.name = "fake-cuda";
  fake_ops.matmul = fake_matmul;
  return &fake;
}
