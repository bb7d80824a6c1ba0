/* CPU ring allreduce benchmark: nranks processes forked on this host over the
 * shared-memory transport, float32 sum, the conventions of nccl-tests and of
 * ../shared/peers/mpi_allreduce.c (the Open MPI peer), so figures compare
 * one to one:
 *   per size, `warmup` untimed iterations, then `iters` timed ones (10x for
 *   sizes <= 1 MiB); each is barrier, t0, out-of-place allreduce, t1, its
 *   time the max over ranks; value = bus bandwidth of the median time,
 *   busbw = bytes / t * 2(n-1)/n.  Buffers are pre-faulted and reused.
 * One JSON line per size on stdout.
 *
 * Usage: bench-allreduce [iters=10] [warmup=3] [max_bytes=268435456] [ranks=2]
 * Env:   TIDE_RING_PIECE (bytes per pipelined piece, default 262144)
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <signal.h>
#include <time.h>
#include <unistd.h>

#include "ring.h"
#include "tensor.h"

static double now(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static int cmp_double(const void *a, const void *b) {
  double x = *(const double *)a, y = *(const double *)b;
  return (x > y) - (x < y);
}

static void *prefaulted(size_t n) {
  void *p = mmap(NULL, n, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
  return p == MAP_FAILED ? NULL : p;
}

static int run_rank(td_ring_shm_t *shm, int rank, int n, int iters, int warmup,
                    size_t max_bytes, size_t piece) {
  static const size_t sizes[] = {4u << 10, 64u << 10, 1u << 20, 16u << 20, 64u << 20, 256u << 20};
  static const char *labels[] = {"4KiB", "64KiB", "1MiB", "16MiB", "64MiB", "256MiB"};
  td_ring_transport_t tr;
  td_ring_shm_transport(shm, rank, &tr);
  td_ring_t *ring = NULL;
  if (td_ring_new(&ring, &tr, rank, n, piece)) return 1;
  size_t cap = 0;
  for (int s = 0; s < 6; s++)
    if (sizes[s] <= max_bytes && sizes[s] > cap) cap = sizes[s];
  float *send = prefaulted(cap), *recv = prefaulted(cap);
  double *times = malloc(sizeof(double) * (size_t)iters * 10);
  if (!send || !recv || !times) return 1;
  for (size_t i = 0; i < cap / sizeof(float); i++) send[i] = (float)(rank + 1);
  const float expect = (float)n * (float)(n + 1) / 2.0f;
  for (int s = 0; s < 6; s++) {
    size_t bytes = sizes[s];
    if (bytes > max_bytes) continue;
    size_t count = bytes / sizeof(float);
    int n_it = bytes <= (1u << 20) ? iters * 10 : iters;
    for (int w = 0; w < warmup; w++)
      if (td_ring_allreduce(ring, send, recv, count, TD_F32, TD_RING_SUM)) return 1;
    for (int it = 0; it < n_it; it++) {
      if (td_ring_barrier(ring)) return 1;
      double t0 = now();
      if (td_ring_allreduce(ring, send, recv, count, TD_F32, TD_RING_SUM)) return 1;
      float dt = (float)((now() - t0) * 1e6), dtmax;
      if (td_ring_allreduce(ring, &dt, &dtmax, 1, TD_F32, TD_RING_MAX)) return 1;
      times[it] = dtmax * 1e-6;
    }
    float ok = recv[0] == expect && recv[count / 2] == expect && recv[count - 1] == expect, all_ok;
    if (td_ring_allreduce(ring, &ok, &all_ok, 1, TD_F32, TD_RING_MIN)) return 1;
    if (rank == 0) {
      double sum = 0;
      for (int it = 0; it < n_it; it++) sum += times[it];
      qsort(times, (size_t)n_it, sizeof(double), cmp_double);
      double med = n_it % 2 ? times[n_it / 2] : 0.5 * (times[n_it / 2 - 1] + times[n_it / 2]);
      double algbw = (double)bytes / med / 1e9, busbw = algbw * 2.0 * (n - 1) / n;
      printf("{\"system\":\"tide\",\"metric\":\"allreduce_f32_sum_%s\",\"value\":%.4f,"
             "\"unit\":\"GB/s\",\"size_bytes\":%zu,\"ranks\":%d,\"time_us_median\":%.2f,"
             "\"time_us_min\":%.2f,\"time_us_mean\":%.2f,\"algbw_GBps\":%.4f,"
             "\"busbw_GBps\":%.4f,\"iters\":%d,\"warmup\":%d,\"piece_bytes\":%zu,"
             "\"transport\":\"shm\",\"correct\":%s}\n",
             labels[s], busbw, bytes, n, med * 1e6, times[0] * 1e6, sum / n_it * 1e6, algbw,
             busbw, n_it, warmup, piece, all_ok == 1.0f ? "true" : "false");
      fflush(stdout);
    }
  }
  td_ring_free(&ring);
  return 0;
}

int main(int argc, char **argv) {
  int iters = argc > 1 ? atoi(argv[1]) : 10;
  int warmup = argc > 2 ? atoi(argv[2]) : 3;
  size_t max_bytes = argc > 3 ? (size_t)strtoull(argv[3], NULL, 10) : (256u << 20);
  int n = argc > 4 ? atoi(argv[4]) : 2;
  const char *pe = getenv("TIDE_RING_PIECE");
  size_t piece = pe && *pe ? (size_t)strtoull(pe, NULL, 10) : (256u << 10);
  if (iters < 1) iters = 1;
  if (iters > 1000) iters = 1000;
  if (warmup < 0) warmup = 0;
  if (n < 1 || n > 16) n = 2;
  td_ring_shm_t *shm = NULL;
  if (td_ring_shm_new(&shm, n, 4 * piece)) {
    fprintf(stderr, "bench-allreduce: cannot map shared memory\n");
    return 1;
  }
  pid_t pids[16];
  for (int r = 0; r < n; r++) {
    pids[r] = fork();
    if (pids[r] == 0) {
      prctl(PR_SET_PDEATHSIG, SIGKILL);
      _exit(run_rank(shm, r, n, iters, warmup, max_bytes, piece));
    }
  }
  int rc = 0;
  for (int r = 0; r < n; r++) {
    int st = 0;
    waitpid(pids[r], &st, 0);
    if (!WIFEXITED(st) || WEXITSTATUS(st)) rc = 1;
  }
  td_ring_shm_free(&shm);
  return rc;
}
