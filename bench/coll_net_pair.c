/* The cross-node collective's exchange alone (lua/coll_net.c): two forked
 * ranks join over loopback streams and time td_cnet_allreduce_pair, as
 * the Open MPI peer times its allreduce (3 warm-up calls, the median
 * call). No cluster, no Lua: for A/B runs of the stream code itself.
 *
 *   build/bench-cnet [bytes=1048576] [calls=100] [plain=0]
 *
 * prints one JSON line: the median call's time and bus bandwidth (2
 * ranks: bytes / time), and rank 0's CPU seconds per GB it moved. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include "coll_net.h"
#include "td.h"
#include "tensor.h"

static double cpu(void) {
  struct rusage u;
  getrusage(RUSAGE_SELF, &u);
  return (double)(u.ru_utime.tv_sec + u.ru_stime.tv_sec) +
         (double)(u.ru_utime.tv_usec + u.ru_stime.tv_usec) * 1e-6;
}

static int cmp(const void *a, const void *b) {
  double x = *(const double *)a, y = *(const double *)b;
  return x < y ? -1 : x > y;
}

static int bench_ports[2]; /* the ranks' listening ports */

static int rank_main(td_cnet_t *c, int rank, size_t bytes, int calls, int plain) {
  const char *hosts[2] = {"127.0.0.1", "127.0.0.1"}, *names[2] = {"rank-0", "rank-1"};
  uint8_t secret[32];
  memset(secret, 7, sizeof(secret));
  if (td_cnet_join(c, rank, 2, hosts, bench_ports, names, secret, plain, 10)) {
    fprintf(stderr, "bench-cnet: join: %s\n", td_cnet_error(c));
    return 1;
  }
  size_t n = bytes / 4;
  float *x = malloc(n * sizeof(float));
  double *t = malloc((size_t)calls * sizeof(double));
  if (!x || !t) return 1;
  for (size_t i = 0; i < n; i++) x[i] = 1.0f;
  for (int w = 0; w < 3; w++)
    if (td_cnet_allreduce_pair(c, 1 - rank, x, n, TD_F32, 0)) {
      fprintf(stderr, "bench-cnet: warm-up: %s\n", td_cnet_error(c));
      return 1;
    }
  double c0 = cpu();
  for (int k = 0; k < calls; k++) {
    double t0 = td_now();
    if (td_cnet_allreduce_pair(c, 1 - rank, x, n, TD_F32, 0)) {
      fprintf(stderr, "bench-cnet: %s\n", td_cnet_error(c));
      return 1;
    }
    t[k] = td_now() - t0;
  }
  double dc = cpu() - c0;
  if (rank == 0) {
    qsort(t, (size_t)calls, sizeof(double), cmp);
    double med = calls % 2 ? t[calls / 2] : 0.5 * (t[calls / 2 - 1] + t[calls / 2]);
    printf(
        "{\"metric\":\"cnet_pair_allreduce_f32_sum\",\"bytes\":%zu,\"calls\":%d,\"plain\":%d,"
        "\"cipher\":\"%s\",\"ms_median\":%.4f,\"busbw_GBps\":%.3f,\"cpu_core_s_per_gb\":%.3f}\n",
        bytes, calls, plain, td_cnet_cipher(c), med * 1e3, (double)bytes / med / 1e9,
        dc / calls / (2.0 * (double)bytes / 1e9));
    fflush(stdout);
  }
  free(x);
  free(t);
  return 0;
}

int main(int argc, char **argv) {
  size_t bytes = argc > 1 ? strtoull(argv[1], NULL, 10) : 1u << 20;
  int calls = argc > 2 ? atoi(argv[2]) : 100, plain = argc > 3 ? atoi(argv[3]) : 0;
  if (bytes < 4 || calls < 1) {
    fprintf(stderr, "usage: bench-cnet [bytes>=4] [calls>=1] [plain 0|1]\n");
    return 2;
  }
  td_cnet_t *cs[2];
  for (int r = 0; r < 2; r++)
    if (td_cnet_listen(&cs[r], "127.0.0.1", &bench_ports[r])) {
      perror("bench-cnet: listen");
      return 1;
    }
  pid_t pid[2];
  for (int r = 0; r < 2; r++) {
    pid[r] = fork();
    if (pid[r] == 0) {
      td_cnet_free(&cs[1 - r]);
      _exit(rank_main(cs[r], r, bytes, calls, plain));
    }
  }
  for (int r = 0; r < 2; r++) td_cnet_free(&cs[r]);
  int bad = 0;
  for (int r = 0; r < 2; r++) {
    int st = 0;
    waitpid(pid[r], &st, 0);
    bad |= !WIFEXITED(st) || WEXITSTATUS(st);
  }
  return bad;
}
