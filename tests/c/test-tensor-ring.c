/* Tests of the CPU ring collectives (gpu/ring.c) between forked processes,
 * for 1-4 ranks, over three transports: shared memory (zero-copy peek),
 * socketpairs (sendrecv) and socketpairs restricted to send/recv (the
 * max_inflight path).  Sizes include 0, 1, and counts not divisible by the
 * rank count; tiny pieces and channels force pipelining and wrap-around. */
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include "dtype-helpers.h"
#include "ring.h"
#include "test.h"

enum { KIND_SHM, KIND_SOCK, KIND_SOCK_PLAIN, NKINDS };

typedef int (*rank_fn)(td_ring_t *r, int rank, int n, void *arg);

/* Forks n ranks over a transport of the given kind; each builds a ring with
 * piece bytes and runs fn; returns how many ranks failed. */
static int run_ranks(int n, int kind, size_t piece, rank_fn fn, void *arg) {
  td_ring_shm_t *shm = NULL;
  td_ring_sock_t *sock = NULL;
  if (kind == KIND_SHM)
    ASSERT_EQ(td_ring_shm_new(&shm, n, 4 * piece > 4096 ? 4 * piece : 4096), 0);
  else
    ASSERT_EQ(td_ring_sock_new(&sock, n), 0);
  pid_t pids[8];
  for (int r = 0; r < n; r++) {
    pids[r] = fork();
    ASSERT(pids[r] >= 0);
    if (pids[r] == 0) {
      /* A hung collective must not outlive the test: die with the parent
       * (the runner kills it on timeout) and after 50 s regardless. */
      prctl(PR_SET_PDEATHSIG, SIGKILL);
      if (getppid() == 1) _exit(3);
      alarm(50);
      td_ring_transport_t tr;
      if (shm)
        td_ring_shm_transport(shm, r, &tr);
      else
        td_ring_sock_transport(sock, r, &tr);
      if (kind == KIND_SOCK_PLAIN) {
        tr.sendrecv = NULL;
        tr.max_inflight = 64 << 10; /* well inside a socket's buffer */
      }
      td_ring_t *ring = NULL;
      if (td_ring_new(&ring, &tr, r, n, piece)) _exit(2);
      int rc = fn(ring, r, n, arg);
      td_ring_free(&ring);
      _exit(rc ? 1 : 0);
    }
  }
  int failed = 0;
  for (int r = 0; r < n; r++) {
    int st = 0;
    waitpid(pids[r], &st, 0);
    if (!WIFEXITED(st) || WEXITSTATUS(st) != 0) failed++;
  }
  td_ring_shm_free(&shm);
  td_ring_sock_free(&sock);
  return failed;
}

/* Exactly representable inputs so sums, maxima and minima are exact. */
static float val(int rank, size_t i) { return (float)((int)((rank * 37 + i * 11) % 101) - 50); }

typedef struct {
  size_t count;
  int op;
  int in_place;
} ar_arg;

static int check_allreduce(td_ring_t *r, int rank, int n, void *varg) {
  ar_arg *a = varg;
  size_t c = a->count;
  float *send = malloc(sizeof(float) * (c + 1)), *recv = malloc(sizeof(float) * (c + 1));
  for (size_t i = 0; i < c; i++) send[i] = val(rank, i), recv[i] = -999;
  float *out = a->in_place ? send : recv;
  if (td_ring_allreduce(r, send, out, c, TD_F32, a->op)) return 1;
  for (size_t i = 0; i < c; i++) {
    double want = val(0, i);
    for (int k = 1; k < n; k++) {
      double v = val(k, i);
      if (a->op == TD_RING_MAX) want = v > want ? v : want;
      else if (a->op == TD_RING_MIN) want = v < want ? v : want;
      else want += v;
    }
    if (a->op == TD_RING_AVG) want /= n;
    if (fabs(out[i] - want) > 1e-5 * fabs(want)) {
      fprintf(stderr, "rank %d/%d op %d count %zu: [%zu] = %g, want %g\n", rank, n, a->op, c, i,
              out[i], want);
      return 1;
    }
  }
  if (!a->in_place)
    for (size_t i = 0; i < c; i++)
      if (send[i] != val(rank, i)) return 1; /* input untouched */
  free(send);
  free(recv);
  return 0;
}

TEST_IMPL(ring_allreduce) {
  size_t counts[] = {0, 1, 2, 3, 5, 1000, 4099, 100003};
  for (int n = 1; n <= 4; n++)
    for (int kind = 0; kind < NKINDS; kind++)
      for (size_t ci = 0; ci < sizeof(counts) / sizeof(counts[0]); ci++)
        for (int op = TD_RING_SUM; op <= TD_RING_MIN; op++) {
          if (counts[ci] > 1000 && op != TD_RING_SUM && n != 3) continue; /* keep it quick */
          ar_arg a = {counts[ci], op, (int)(ci % 2)};
          int f = run_ranks(n, kind, 4096, check_allreduce, &a);
          if (f) fprintf(stderr, "n=%d kind=%d count=%zu op=%d failed\n", n, kind, counts[ci], op);
          ASSERT_EQ(f, 0);
        }
  return 0;
}

/* A barrier sends one byte, so the stream in a shared-memory ring is no
 * longer float-aligned: allreduces after it meet floats split by the
 * ring's end, which must be reduced whole (they were reduced by halves, or
 * skipped: NaN and wrong sums in data-parallel training). */
static int barrier_then_allreduce(td_ring_t *r, int rank, int n, void *varg) {
  (void)varg;
  for (int round = 0; round < 3; round++) {
    if (td_ring_barrier(r)) return 1;
    for (int k = 0; k < 8; k++) {
      /* The last four are above the two-rank exchange's 64 KiB: the
       * interleaved two-rank ring, or the ring for three. */
      ar_arg a = {(k < 4 ? 4099 : 20011) + (size_t)k * 7, k < 4 ? TD_RING_SUM : k - 4, k % 2};
      if (check_allreduce(r, rank, n, &a)) {
        fprintf(stderr, "round %d allreduce %d after a barrier is wrong\n", round, k);
        return 1;
      }
    }
  }
  return 0;
}

TEST_IMPL(ring_allreduce_after_barrier) {
  for (int n = 2; n <= 3; n++)
    for (int kind = 0; kind < NKINDS; kind++) ASSERT_EQ(run_ranks(n, kind, 4096, barrier_then_allreduce, NULL), 0);
  return 0;
}

/* -- Every dtype ----------------------------------------------------------- */

/* Exact in every dtype (|sum| <= 200 over 4 ranks: within bf16's 8 bits),
 * never negative for u8; i64 elements past 2^40 so their high bytes count. */
static double dt_val(int dtype, int rank, size_t i) {
  double v = dtype == TD_U8 ? (double)((rank * 37 + i * 11) % 51) : val(rank, i);
  return dtype == TD_I64 ? v + (double)((int64_t)(i % 3) << 40) : v;
}

typedef struct {
  int dtype, op, in_place;
  size_t count;
} dt_arg;

static int check_dtype(td_ring_t *r, int rank, int n, void *varg) {
  dt_arg *a = varg;
  size_t c = a->count, es = td_dtype_size(a->dtype);
  char *send = malloc(es * (c + 1)), *recv = malloc(es * (c + 1)), *out = a->in_place ? send : recv;
  for (size_t i = 0; i < c; i++) dt_set(a->dtype, send, i, dt_val(a->dtype, rank, i));
  /* A barrier first: its byte leaves the shared-memory stream unaligned,
   * so elements split by the ring's end are put together. */
  if (td_ring_barrier(r) || td_ring_allreduce(r, send, out, c, a->dtype, a->op)) return 1;
  for (size_t i = 0; i < c; i++) {
    double want = dt_val(a->dtype, 0, i);
    for (int k = 1; k < n; k++) {
      double v = dt_val(a->dtype, k, i);
      want = a->op == TD_RING_MAX   ? (v > want ? v : want)
             : a->op == TD_RING_MIN ? (v < want ? v : want)
                                    : want + v;
    }
    if (a->op == TD_RING_AVG) want /= n;
    if (dt_get(a->dtype, out, i) != want) {
      fprintf(stderr, "%s op %d, %d ranks, count %zu: [%zu] = %.17g, want %.17g\n", td_dtype_name(a->dtype),
              a->op, n, c, i, dt_get(a->dtype, out, i), want);
      return 1;
    }
  }
  free(send);
  free(recv);
  return 0;
}

TEST_IMPL(ring_allreduce_every_dtype) {
  static const int dtypes[] = {TD_F32, TD_F16, TD_BF16, TD_I32, TD_I64, TD_U8};
  /* Up to the two-rank exchange, past it (the interleaved pair, or the
   * ring), odd counts, pieces of 4 KiB. */
  static const size_t counts[] = {1, 7, 4099, 40009};
  for (size_t d = 0; d < 6; d++)
    for (int n = 2; n <= 4; n++)
      for (int kind = 0; kind < NKINDS; kind++)
        for (int op = TD_RING_SUM; op <= TD_RING_MIN; op++) {
          /* avg of integers is refused; /3 is not exact in every dtype. */
          if (op == TD_RING_AVG && (n == 3 || dtypes[d] >= TD_I32)) continue;
          dt_arg a = {dtypes[d], op, (int)((d + (size_t)op) % 2), counts[(d + (size_t)n + (size_t)op) % 4]};
          int f = run_ranks(n, kind, 4096, check_dtype, &a);
          if (f)
            fprintf(stderr, "every dtype: %s n=%d kind=%d op=%d failed\n", td_dtype_name(a.dtype), n, kind,
                    op);
          ASSERT_EQ(f, 0);
        }
  return 0;
}

static int dt_scatter(td_ring_t *r, int rank, int n, void *varg) {
  dt_arg *a = varg;
  size_t c = a->count, es = td_dtype_size(a->dtype), mine = td_ring_chunk_count(c, n, rank);
  size_t start = td_ring_chunk_start(c, n, rank);
  char *in = malloc(es * (c + 1)), *out = malloc(es * (mine + 1));
  for (size_t i = 0; i < c; i++) dt_set(a->dtype, in, i, dt_val(a->dtype, rank, i));
  if (td_ring_reduce_scatter(r, in, out, c, a->dtype, TD_RING_SUM)) return 1;
  for (size_t i = 0; i < mine; i++) {
    double want = 0;
    for (int k = 0; k < n; k++) want += dt_val(a->dtype, k, start + i);
    if (dt_get(a->dtype, out, i) != want) return 1;
  }
  free(in);
  free(out);
  return 0;
}

TEST_IMPL(ring_reduce_scatter_every_dtype) {
  static const int dtypes[] = {TD_F16, TD_BF16, TD_I32, TD_I64, TD_U8};
  for (size_t d = 0; d < 5; d++)
    for (int n = 2; n <= 3; n++) {
      dt_arg a = {dtypes[d], TD_RING_SUM, 0, 10007};
      ASSERT_EQ(run_ranks(n, KIND_SHM, 4096, dt_scatter, &a), 0);
    }
  return 0;
}

/* Integer sums wrap (as NCCL's and PyTorch's do); avg of an integer dtype
 * and unknown dtypes are refused before anything moves. */
static int dt_wrap(td_ring_t *r, int rank, int n, void *varg) {
  (void)n, (void)varg;
  uint8_t b[3] = {200, 255, 1};
  int32_t w[2] = {rank ? 1 : INT32_MAX, rank ? -1 : INT32_MIN};
  if (td_ring_allreduce(r, b, b, 3, TD_U8, TD_RING_SUM) || td_ring_allreduce(r, w, w, 2, TD_I32, TD_RING_SUM))
    return 1;
  if (b[0] != 144 || b[1] != 254 || b[2] != 2 || w[0] != INT32_MIN || w[1] != INT32_MAX) return 2;
  if (td_ring_allreduce(r, w, w, 2, TD_I32, TD_RING_AVG) != TD_GPU_EDTYPE) return 3;
  if (td_ring_allreduce(r, w, w, 2, 99, TD_RING_SUM) != TD_GPU_EDTYPE) return 4;
  if (td_ring_reduce_scatter(r, w, b, 2, TD_I64, TD_RING_AVG) != TD_GPU_EDTYPE) return 5;
  return 0;
}

TEST_IMPL(ring_integer_sums_wrap) {
  for (int kind = 0; kind < NKINDS; kind++) ASSERT_EQ(run_ranks(2, kind, 4096, dt_wrap, NULL), 0);
  return 0;
}

TEST_IMPL(ring_allreduce_small_pieces) {
  /* 64-byte pieces through a 4 KiB channel: many pieces, constant wrap. */
  ar_arg a = {12345, TD_RING_SUM, 0};
  for (int n = 2; n <= 4; n++)
    for (int kind = 0; kind < NKINDS; kind++) ASSERT_EQ(run_ranks(n, kind, 64, check_allreduce, &a), 0);
  /* ...and large pieces, one per chunk. */
  a.count = 300001;
  ASSERT_EQ(run_ranks(2, KIND_SHM, 1 << 20, check_allreduce, &a), 0);
  return 0;
}

/* Two ranks in place around the single-exchange limit (64 KiB = 16384
 * floats): the exchange reduces into the bytes it sends from, piece by
 * piece, with no copy of them, so each piece must leave before the peer's
 * lands on it; three rounds reuse the buffers. */
static int in_place_pair_rounds(td_ring_t *r, int rank, int n, void *varg) {
  (void)varg;
  static const size_t counts[] = {16383, 16384, 16385};
  for (int round = 0; round < 3; round++)
    for (size_t ci = 0; ci < 3; ci++)
      for (int op = TD_RING_SUM; op <= TD_RING_MIN; op++) {
        ar_arg a = {counts[ci], op, 1};
        if (check_allreduce(r, rank, n, &a)) return 1;
      }
  return 0;
}

TEST_IMPL(ring_allreduce_in_place_pair) {
  /* Pieces of 4 KiB (16 per 64 KiB, through a 16 KiB channel) and one
   * piece per message. */
  for (int kind = 0; kind < NKINDS; kind++) {
    ASSERT_EQ(run_ranks(2, kind, 4096, in_place_pair_rounds, NULL), 0);
    ASSERT_EQ(run_ranks(2, kind, 1 << 20, in_place_pair_rounds, NULL), 0);
  }
  return 0;
}

static int check_reduce_scatter(td_ring_t *r, int rank, int n, void *varg) {
  ar_arg *a = varg;
  size_t c = a->count, mine = td_ring_chunk_count(c, n, rank);
  size_t start = td_ring_chunk_start(c, n, rank);
  float *in = malloc(sizeof(float) * (c + 1)), *out = malloc(sizeof(float) * (mine + 1));
  for (size_t i = 0; i < c; i++) in[i] = val(rank, i);
  if (td_ring_reduce_scatter(r, in, out, c, TD_F32, a->op)) return 1;
  for (size_t i = 0; i < mine; i++) {
    double want = 0;
    for (int k = 0; k < n; k++) want += val(k, start + i);
    if (a->op == TD_RING_AVG) want /= n;
    if (fabs(out[i] - want) > 1e-5 * fabs(want)) {
      fprintf(stderr, "rank %d: out[%zu] = %g want %g\n", rank, i, out[i], want);
      return 1;
    }
  }
  for (size_t i = 0; i < c; i++)
    if (in[i] != val(rank, i)) return 1;
  free(in);
  free(out);
  return 0;
}

TEST_IMPL(ring_reduce_scatter) {
  size_t counts[] = {0, 1, 3, 7, 1001, 65537};
  for (int n = 1; n <= 4; n++)
    for (int kind = 0; kind < NKINDS; kind++)
      for (size_t ci = 0; ci < sizeof(counts) / sizeof(counts[0]); ci++) {
        ar_arg a = {counts[ci], ci % 2 ? TD_RING_AVG : TD_RING_SUM, 0};
        ASSERT_EQ(run_ranks(n, kind, 1024, check_reduce_scatter, &a), 0);
      }
  return 0;
}

static int check_allgather(td_ring_t *r, int rank, int n, void *varg) {
  size_t bytes = *(size_t *)varg;
  unsigned char *all = malloc(bytes * (size_t)n + 1), *mine = malloc(bytes + 1);
  for (size_t i = 0; i < bytes; i++) mine[i] = (unsigned char)(rank * 31 + i * 7);
  int in_place = rank % 2; /* mix both forms */
  if (in_place) memcpy(all + (size_t)rank * bytes, mine, bytes);
  if (td_ring_allgather(r, in_place ? all + (size_t)rank * bytes : mine, all, bytes)) return 1;
  for (int k = 0; k < n; k++)
    for (size_t i = 0; i < bytes; i++)
      if (all[(size_t)k * bytes + i] != (unsigned char)(k * 31 + i * 7)) return 1;
  free(all);
  free(mine);
  return 0;
}

TEST_IMPL(ring_allgather) {
  size_t sizes[] = {0, 1, 13, 100000};
  for (int n = 1; n <= 4; n++)
    for (int kind = 0; kind < NKINDS; kind++)
      for (size_t i = 0; i < 4; i++) ASSERT_EQ(run_ranks(n, kind, 512, check_allgather, &sizes[i]), 0);
  return 0;
}

typedef struct {
  size_t bytes;
  int root;
} bc_arg;

static int check_broadcast(td_ring_t *r, int rank, int n, void *varg) {
  bc_arg *a = varg;
  (void)n;
  unsigned char *buf = malloc(a->bytes + 1);
  for (size_t i = 0; i < a->bytes; i++)
    buf[i] = rank == a->root ? (unsigned char)(i * 13 + 5) : 0;
  if (td_ring_broadcast(r, buf, a->bytes, a->root)) return 1;
  for (size_t i = 0; i < a->bytes; i++)
    if (buf[i] != (unsigned char)(i * 13 + 5)) return 1;
  free(buf);
  return td_ring_broadcast(r, NULL, 0, n) == TD_GPU_EINVAL ? 0 : 1;
}

TEST_IMPL(ring_broadcast) {
  size_t sizes[] = {0, 7, 300000};
  for (int n = 1; n <= 4; n++)
    for (int kind = 0; kind < NKINDS; kind++)
      for (int root = 0; root < n; root++)
        for (size_t i = 0; i < 3; i++) {
          bc_arg a = {sizes[i], root};
          ASSERT_EQ(run_ranks(n, kind, 4096, check_broadcast, &a), 0);
        }
  return 0;
}

/* Barrier: every rank sets its flag in shared memory, sleeps a rank-dependent
 * time, enters the barrier, then must see every flag set. */
static int check_barrier(td_ring_t *r, int rank, int n, void *varg) {
  volatile int *flags = varg;
  for (int round = 1; round <= 3; round++) {
    usleep((useconds_t)(((rank * 7 + round * 3) % 5) * 3000));
    __atomic_store_n(&flags[rank], round, __ATOMIC_SEQ_CST);
    if (td_ring_barrier(r)) return 1;
    for (int k = 0; k < n; k++)
      if (__atomic_load_n(&flags[k], __ATOMIC_SEQ_CST) < round) return 1;
    if (td_ring_barrier(r)) return 1; /* nobody starts the next round early */
  }
  return 0;
}

TEST_IMPL(ring_barrier) {
  for (int n = 1; n <= 4; n++)
    for (int kind = 0; kind < NKINDS; kind++) {
      int *flags = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
      ASSERT(flags != MAP_FAILED);
      ASSERT_EQ(run_ranks(n, kind, 4096, check_barrier, flags), 0);
      munmap(flags, 4096);
    }
  return 0;
}

/* send/recv: rank 0 sends a distinct message to each other rank, which
 * answers with its bytes reversed. */
static int check_p2p(td_ring_t *r, int rank, int n, void *varg) {
  (void)varg;
  char msg[64], back[64];
  if (rank == 0) {
    for (int k = 1; k < n; k++) {
      int len = snprintf(msg, sizeof(msg), "hello rank %d", k);
      if (td_ring_send(r, msg, (size_t)len, k)) return 1;
    }
    for (int k = 1; k < n; k++) {
      int len = snprintf(msg, sizeof(msg), "hello rank %d", k);
      if (td_ring_recv(r, back, (size_t)len, k)) return 1;
      for (int i = 0; i < len; i++)
        if (back[i] != msg[len - 1 - i]) return 1;
    }
  } else {
    int len = snprintf(msg, sizeof(msg), "hello rank %d", rank);
    if (td_ring_recv(r, back, (size_t)len, 0)) return 1;
    if (memcmp(back, msg, (size_t)len)) return 1;
    for (int i = 0; i < len; i++) msg[i] = back[len - 1 - i];
    if (td_ring_send(r, msg, (size_t)len, 0)) return 1;
  }
  return td_ring_send(r, msg, 1, rank) == TD_GPU_EINVAL ? 0 : 1;
}

TEST_IMPL(ring_send_recv) {
  for (int n = 2; n <= 4; n++)
    for (int kind = 0; kind < NKINDS; kind++) ASSERT_EQ(run_ranks(n, kind, 4096, check_p2p, NULL), 0);
  /* misuse is refused */
  td_ring_transport_t tr = {0};
  td_ring_t *r = NULL;
  ASSERT_EQ(td_ring_new(&r, &tr, 0, 2, 0), TD_GPU_EINVAL);
  ASSERT_EQ(td_ring_chunk_start(10, 4, 4), 10u);
  ASSERT_EQ(td_ring_chunk_count(10, 4, 0) + td_ring_chunk_count(10, 4, 1) +
                td_ring_chunk_count(10, 4, 2) + td_ring_chunk_count(10, 4, 3), 10u);
  return 0;
}

/* A rank whose peer's process is gone fails (TD_GPU_EPEER) instead of
 * waiting forever: rank 1 attaches and exits, then rank 0 waits on it,
 * receiving and sending (a full channel). */
TEST_IMPL(ring_shm_peer_exit) {
  td_ring_shm_t *shm = NULL;
  ASSERT_EQ(td_ring_shm_new(&shm, 2, 4096), 0);
  pid_t peer = fork();
  ASSERT(peer >= 0);
  if (peer == 0) {
    td_ring_transport_t tr;
    td_ring_shm_transport(shm, 1, &tr);
    _exit(0);
  }
  int st = 0;
  ASSERT_EQ(waitpid(peer, &st, 0), peer); /* reaped: the pid no longer exists */
  pid_t me = fork();
  ASSERT(me >= 0);
  if (me == 0) {
    prctl(PR_SET_PDEATHSIG, SIGKILL);
    alarm(20);
    td_ring_transport_t tr;
    td_ring_shm_transport(shm, 0, &tr);
    char buf[16384];
    memset(buf, 0, sizeof(buf));
    if (tr.recv(tr.ctx, 1, buf, sizeof(buf)) != TD_GPU_EPEER) _exit(1);
    if (tr.send(tr.ctx, 1, buf, sizeof(buf)) != TD_GPU_EPEER) _exit(2);
    _exit(0);
  }
  ASSERT_EQ(waitpid(me, &st, 0), me);
  ASSERT(WIFEXITED(st));
  ASSERT_EQ(WEXITSTATUS(st), 0);
  td_ring_shm_free(&shm);
  return 0;
}
