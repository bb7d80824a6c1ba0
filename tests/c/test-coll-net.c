/* Tests of the collective streams between nodes (lua/coll_net.c): ranks
 * forked here, real TCP sockets on loopback. The ring over them gives the
 * right sums (3 ranks, encrypted and plain, records split across pieces);
 * a rank with another secret is refused at the handshake; a record changed
 * in flight fails authentication; a rank that dies fails the others'
 * operation at once, naming it, and a failed rank's streams close so the
 * others fail too instead of waiting; and, through a relay that keeps
 * what crosses the wire, a rank's bytes never appear there encrypted. */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include "coll_net.h"
#include "dtype-helpers.h"
#include "test.h"

#define N_MAX 4
#define COUNT 300007 /* floats: several records a piece, not divisible by 3 */

typedef int (*cn_fn)(td_cnet_t *c, td_ring_t *r, int rank, int n, char *msg);

/* When set, rank 1 reaches rank 0 through a relay that keeps the first
 * CN_TAP bytes rank 1 sends, as they cross the wire (memory shared with
 * the relay's process). */
#define CN_TAP (1u << 20)
static uint8_t *cn_tap;

/* When set, rank 1 runs without libgcrypt (a library path that is not
 * there), so it seals and opens with OpenSSL's OCB. */
static int cn_ossl1;

/* The relay: one connection from lfd to port on loopback, both ways,
 * until either end closes. Its writes may block: the ranks always read. */
static void cn_relay(int lfd, int port) {
  struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
  sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  int a = accept(lfd, NULL, NULL), b = socket(AF_INET, SOCK_STREAM, 0);
  if (a < 0 || b < 0 || connect(b, (struct sockaddr *)&sa, sizeof(sa))) _exit(1);
  static char buf[65536];
  size_t got = 0;
  struct pollfd pf[2] = {{a, POLLIN, 0}, {b, POLLIN, 0}};
  while (poll(pf, 2, -1) > 0)
    for (int i = 0; i < 2; i++) {
      ssize_t k = pf[i].revents ? read(pf[i].fd, buf, sizeof(buf)) : 0;
      if (pf[i].revents && k <= 0) _exit(0);
      size_t m = i == 0 && got < CN_TAP ? ((size_t)k < CN_TAP - got ? (size_t)k : CN_TAP - got) : 0;
      memcpy(cn_tap + got, buf, m);
      got += m;
      if (k > 0 && write(pf[1 - i].fd, buf, (size_t)k) != k) _exit(0);
    }
  _exit(0);
}

/* Starts the relay to rank 0's port (when cn_tap is set): its pid, and
 * the port the other ranks are to connect to instead; else 0. */
static pid_t cn_relay_start(int *port0) {
  if (!cn_tap) return 0;
  struct sockaddr_in sa = {.sin_family = AF_INET};
  sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t sl = sizeof(sa);
  int lfd = socket(AF_INET, SOCK_STREAM, 0);
  if (lfd < 0 || bind(lfd, (struct sockaddr *)&sa, sizeof(sa)) || listen(lfd, 1) ||
      getsockname(lfd, (struct sockaddr *)&sa, &sl))
    abort();
  pid_t pid = fork();
  if (pid == 0) {
    prctl(PR_SET_PDEATHSIG, SIGKILL);
    alarm(30);
    cn_relay(lfd, *port0);
  }
  close(lfd);
  *port0 = ntohs(sa.sin_port);
  return pid;
}

/* Forks n ranks, each joining with secret (rank `odd` with another one
 * when odd >= 0) and running fn; each rank's exit code and message (first
 * 200 bytes) come back in codes / msgs. */
static void cn_run(int n, int plain, int odd, const char *tamper_rank1, cn_fn fn, int *codes,
                   char (*msgs)[200]) {
  td_cnet_t *cs[N_MAX];
  int ports[N_MAX];
  const char *hosts[N_MAX], *names[N_MAX] = {"node-a", "node-b", "node-c", "node-d"};
  for (int r = 0; r < n; r++) {
    if (td_cnet_listen(&cs[r], "127.0.0.1", &ports[r])) abort();
    hosts[r] = "127.0.0.1";
  }
  pid_t relay = cn_relay_start(&ports[0]);
  char(*shared)[200] = mmap(NULL, N_MAX * 200, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
  memset(shared, 0, N_MAX * 200);
  pid_t pids[N_MAX];
  for (int r = 0; r < n; r++) {
    pids[r] = fork();
    if (pids[r] == 0) {
      prctl(PR_SET_PDEATHSIG, SIGKILL);
      alarm(30);
      for (int k = 0; k < n; k++)
        if (k != r) td_cnet_free(&cs[k]);
      if (r == 1 && tamper_rank1) setenv("TIDE_COLL_TAMPER", tamper_rank1, 1);
      if (r == 1 && cn_ossl1) setenv("TIDE_TEST_LIBGCRYPT", "/nonexistent/libgcrypt.so", 1);
      uint8_t secret[32];
      memset(secret, 7, sizeof(secret));
      if (r == odd) secret[0] = 8;
      if (td_cnet_join(cs[r], r, n, hosts, ports, names, secret, plain, 3)) {
        snprintf(shared[r], 200, "join: %s", td_cnet_error(cs[r]));
        _exit(10);
      }
      td_ring_transport_t tr;
      td_cnet_transport(cs[r], &tr);
      td_ring_t *ring = NULL;
      if (td_ring_new(&ring, &tr, r, n, 512 * 1024)) _exit(11);
      int rc = fn(cs[r], ring, r, n, shared[r]);
      td_ring_free(&ring);
      td_cnet_free(&cs[r]);
      _exit(rc);
    }
  }
  for (int r = 0; r < n; r++) td_cnet_free(&cs[r]);
  for (int r = 0; r < n; r++) {
    int st = 0;
    waitpid(pids[r], &st, 0);
    codes[r] = WIFEXITED(st) ? WEXITSTATUS(st) : 100 + (WIFSIGNALED(st) ? WTERMSIG(st) : 0);
    memcpy(msgs[r], shared[r], 200);
  }
  if (relay) waitpid(relay, NULL, 0);
  munmap(shared, N_MAX * 200);
}

static int cn_sum(td_cnet_t *c, td_ring_t *r, int rank, int n, char *msg) {
  (void)c;
  float *x = malloc(COUNT * sizeof(float));
  for (int i = 0; i < COUNT; i++) x[i] = (float)((i * 7 + rank * 13) % 101 - 50);
  int rc = td_ring_allreduce(r, x, x, COUNT, TD_F32, TD_RING_SUM);
  if (rc) {
    snprintf(msg, 200, "allreduce: %s", td_cnet_error(c));
    free(x);
    return 1;
  }
  for (int i = 0; i < COUNT; i++) {
    float want = 0;
    for (int k = 0; k < n; k++) want += (float)((i * 7 + k * 13) % 101 - 50);
    if (x[i] != want) {
      snprintf(msg, 200, "element %d: %g, not %g", i, x[i], want);
      free(x);
      return 2;
    }
  }
  free(x);
  return td_ring_barrier(r) ? 3 : 0;
}

/* fn succeeds on each of n ranks, encrypted and plain. */
static int cn_all_ok(int n, cn_fn fn) {
  int codes[N_MAX];
  char msgs[N_MAX][200];
  for (int plain = 0; plain <= 1; plain++) {
    cn_run(n, plain, -1, NULL, fn, codes, msgs);
    for (int r = 0; r < n; r++) {
      if (codes[r]) fprintf(stderr, "plain %d rank %d: %d %s\n", plain, r, codes[r], msgs[r]);
      ASSERT_EQ(codes[r], 0);
    }
  }
  return 0;
}

TEST_IMPL(coll_net_allreduce) { return cn_all_ok(3, cn_sum); }

TEST_IMPL(coll_net_wrong_secret_refused) {
  int codes[N_MAX];
  char msgs[N_MAX][200];
  cn_run(2, 0, 1, NULL, cn_sum, codes, msgs);
  /* Rank 1 (the connecting side) sees the proof fail; rank 0 drops it and
   * gives up waiting. Neither runs a collective. */
  ASSERT_EQ(codes[1], 10);
  ASSERT(strstr(msgs[1], "rank 0 on node-a") && strstr(msgs[1], "does not prove the group's secret"));
  ASSERT_EQ(codes[0], 10);
  ASSERT(strstr(msgs[0], "did not connect in time"));
  return 0;
}

/* Rank 1 changes its record number rec in flight: rank 0 refuses it, and
 * rank 1 fails too as rank 0 closes its streams. */
static int cn_tamper(cn_fn fn, const char *rec) {
  int codes[N_MAX];
  char msgs[N_MAX][200];
  cn_run(2, 0, -1, rec, fn, codes, msgs);
  ASSERT_EQ(codes[0], 1);
  ASSERT(strstr(msgs[0], "rank 1 on node-b: a record failed authentication"));
  ASSERT_EQ(codes[1], 1);
  ASSERT(strstr(msgs[1], "rank 0 on node-a"));
  return 0;
}

TEST_IMPL(coll_net_tamper_detected) { return cn_tamper(cn_sum, "2"); }

/* Rank 1 dies after joining; rank 0's allreduce must fail, naming it. */
static int cn_die(td_cnet_t *c, td_ring_t *r, int rank, int n, char *msg) {
  (void)n;
  if (rank == 1) _exit(0);
  float x[1000] = {0};
  int rc = td_ring_allreduce(r, x, x, 1000, TD_F32, TD_RING_SUM);
  snprintf(msg, 200, "%d %d %s", rc, td_cnet_peer_gone(c), td_cnet_error(c));
  return rc ? 0 : 1;
}

/* fn's rank 0 must see rank 1 gone, named. */
static int cn_death(cn_fn fn) {
  int codes[N_MAX];
  char msgs[N_MAX][200];
  cn_run(2, 0, -1, NULL, fn, codes, msgs);
  ASSERT_EQ(codes[0], 0);
  if (!strstr(msgs[0], " 1 rank 1 on node-b: ")) fprintf(stderr, "rank 0: %s\n", msgs[0]);
  ASSERT(strstr(msgs[0], " 1 rank 1 on node-b: "));
  return 0;
}

TEST_IMPL(coll_net_peer_death) { return cn_death(cn_die); }

/* Rank 1 stays silent; rank 0, with an operation timeout of 1 s, fails
 * naming it instead of waiting. */
static int cn_silent(td_cnet_t *c, td_ring_t *r, int rank, int n, char *msg) {
  (void)n;
  if (rank == 1) {
    sleep(4);
    return 0;
  }
  td_cnet_set_timeout(c, 1);
  float x[16] = {0};
  int rc = td_ring_allreduce(r, x, x, 16, TD_F32, TD_RING_SUM);
  snprintf(msg, 200, "%d %d %s", rc, td_cnet_peer_gone(c), td_cnet_error(c));
  return rc ? 0 : 1;
}

TEST_IMPL(coll_net_silent_peer_times_out) {
  int codes[N_MAX];
  char msgs[N_MAX][200];
  cn_run(2, 0, -1, NULL, cn_silent, codes, msgs);
  ASSERT_EQ(codes[0], 0);
  ASSERT(strstr(msgs[0], " 1 rank 1 on node-b: it sent nothing for 1 s"));
  return 0;
}

/* -- The two-rank exchange (td_cnet_allreduce_pair) ------------------------- */

static float cn_val(size_t i, int rank, int salt) {
  return (float)((long)((i * 7 + (size_t)rank * 13 + (size_t)salt) % 101) - 50) + (rank ? 0.25f : 0.5f);
}

/* Every op at lengths 0, 1, odd, one record and a bit, and several
 * records past the window: the pair's bytes are the ring's (run here too,
 * on the same data) and the sums computed by hand. */
static int cn_pair(td_cnet_t *c, td_ring_t *r, int rank, int n, char *msg) {
  (void)n;
  static const size_t counts[] = {0, 1, 7, 16385, COUNT};
  static const int ops[] = {TD_RING_SUM, TD_RING_MAX, TD_RING_MIN};
  float *x = malloc(COUNT * sizeof(float)), *y = malloc(COUNT * sizeof(float));
  int bad = 0;
  for (size_t ci = 0; !bad && ci < sizeof(counts) / sizeof(counts[0]); ci++)
    for (int oi = 0; !bad && oi < 3; oi++) {
      size_t cnt = counts[ci];
      for (size_t i = 0; i < cnt; i++) x[i] = y[i] = cn_val(i, rank, oi);
      int rc = td_cnet_allreduce_pair(c, 1 - rank, x, cnt, TD_F32, ops[oi]);
      if (!rc) rc = td_ring_allreduce(r, y, y, cnt, TD_F32, ops[oi]);
      if (rc) {
        snprintf(msg, 200, "count %zu op %d: %s", cnt, ops[oi], td_cnet_error(c));
        bad = 1;
        break;
      }
      for (size_t i = 0; i < cnt; i++) {
        float a = cn_val(i, 0, oi), b = cn_val(i, 1, oi);
        float want = ops[oi] == TD_RING_SUM   ? a + b
                     : ops[oi] == TD_RING_MAX ? (a > b ? a : b)
                                              : (a < b ? a : b);
        if (memcmp(&x[i], &y[i], sizeof(float)) || x[i] != want) {
          snprintf(msg, 200, "count %zu op %d element %zu: pair %g, ring %g, want %g", cnt, ops[oi], i, x[i],
                   y[i], want);
          bad = 2;
          break;
        }
      }
    }
  free(x);
  free(y);
  return bad ? bad : td_ring_barrier(r) ? 3 : 0;
}

TEST_IMPL(coll_net_pair_allreduce) { return cn_all_ok(2, cn_pair); }

/* libgcrypt's OCB on rank 0 and OpenSSL's on rank 1 (one host with
 * libgcrypt, one without) seal the same records: the exchange and the
 * ring agree, and a record changed in flight still fails. */
static int cn_pair_mixed(td_cnet_t *c, td_ring_t *r, int rank, int n, char *msg) {
  const char *want = rank == 0 ? "aes-128-ocb (libgcrypt)" : "aes-128-ocb (openssl)";
  if (strcmp(td_cnet_cipher(c), want)) {
    snprintf(msg, 200, "cipher %s, not %s", td_cnet_cipher(c), want);
    return 4;
  }
  return cn_pair(c, r, rank, n, msg);
}

TEST_IMPL(coll_net_ciphers_interoperate) {
  int codes[N_MAX];
  char msgs[N_MAX][200];
  cn_ossl1 = 1;
  cn_run(2, 0, -1, NULL, cn_pair_mixed, codes, msgs);
  for (int r = 0; r < 2; r++) {
    if (codes[r]) fprintf(stderr, "rank %d: %d %s\n", r, codes[r], msgs[r]);
    ASSERT_EQ(codes[r], 0);
  }
  cn_run(2, 0, -1, "3", cn_pair, codes, msgs);
  ASSERT_EQ(codes[0], 1);
  ASSERT(strstr(msgs[0], "rank 1 on node-b: a record failed authentication"));
  cn_ossl1 = 0;
  return 0;
}

/* The exchange in every dtype: elements of 2 and 8 bytes across records
 * (16385 elements: records of 64 KiB end inside none of them), each op,
 * against the values computed here (exact in every dtype). */
static int cn_pair_dtypes(td_cnet_t *c, td_ring_t *r, int rank, int n, char *msg) {
  (void)n;
  static const int dtypes[] = {TD_F16, TD_BF16, TD_I32, TD_I64, TD_U8};
  static const int ops[] = {TD_RING_SUM, TD_RING_MAX, TD_RING_MIN};
  const size_t cnt = 16385 * 3;
  char *x = malloc(cnt * 8);
  int bad = 0;
  for (int d = 0; !bad && d < 5; d++)
    for (int oi = 0; !bad && oi < 3; oi++) {
      int dt = dtypes[d];
      for (size_t i = 0; i < cnt; i++) dt_set(dt, x, i, (double)((i * 7 + (size_t)rank * 13) % 101));
      if (td_cnet_allreduce_pair(c, 1 - rank, x, cnt, dt, ops[oi])) {
        snprintf(msg, 200, "%s op %d: %s", td_dtype_name(dt), ops[oi], td_cnet_error(c));
        bad = 1;
      }
      for (size_t i = 0; !bad && i < cnt; i++) {
        double a = (double)((i * 7) % 101), b = (double)((i * 7 + 13) % 101);
        double want = ops[oi] == TD_RING_SUM   ? a + b
                      : ops[oi] == TD_RING_MAX ? (a > b ? a : b)
                                               : (a < b ? a : b);
        if (dt_get(dt, x, i) != want) {
          snprintf(msg, 200, "%s op %d element %zu: %g, want %g", td_dtype_name(dt), ops[oi], i,
                   dt_get(dt, x, i), want);
          bad = 2;
        }
      }
    }
  if (!bad && td_cnet_allreduce_pair(c, 1 - rank, x, 1, TD_I32, TD_RING_AVG) != TD_GPU_EINVAL) bad = 3;
  free(x);
  return bad ? bad : td_ring_barrier(r) ? 4 : 0;
}

TEST_IMPL(coll_net_pair_allreduce_dtypes) { return cn_all_ok(2, cn_pair_dtypes); }

/* A record of the exchange changed in flight (rank 1's third). */
TEST_IMPL(coll_net_pair_tamper_detected) { return cn_tamper(cn_pair, "3"); }

/* Rank 1 dies after joining; rank 0's exchange fails, naming it. */
static int cn_pair_die(td_cnet_t *c, td_ring_t *r, int rank, int n, char *msg) {
  (void)n;
  (void)r;
  if (rank == 1) _exit(0);
  float *x = calloc(COUNT, sizeof(float));
  int rc = td_cnet_allreduce_pair(c, 1, x, COUNT, TD_F32, TD_RING_SUM);
  free(x);
  snprintf(msg, 200, "%d %d %s", rc, td_cnet_peer_gone(c), td_cnet_error(c));
  return rc ? 0 : 1;
}

TEST_IMPL(coll_net_pair_peer_death) { return cn_death(cn_pair_die); }

/* Rank 1 comes to the exchange 6 s late (still computing, say) with
 * 16 MiB: rank 0 waits for it (a stream at a zero window whose probes
 * are answered is a live peer, not a host gone). */
static int cn_pair_late(td_cnet_t *c, td_ring_t *r, int rank, int n, char *msg) {
  (void)n;
  (void)r;
  size_t cnt = 4u << 20;
  float *x = malloc(cnt * sizeof(float));
  for (size_t i = 0; i < cnt; i++) x[i] = (float)(rank + 1);
  if (rank == 1) sleep(6);
  int rc = td_cnet_allreduce_pair(c, 1 - rank, x, cnt, TD_F32, TD_RING_SUM);
  int bad = rc || x[0] != 3 || x[cnt - 1] != 3;
  snprintf(msg, 200, "%d %g %s", rc, x[cnt - 1], td_cnet_error(c));
  free(x);
  return bad;
}

/* fn succeeds on both of 2 ranks, encrypted. */
static int cn_pair_ok(cn_fn fn) {
  int codes[N_MAX];
  char msgs[N_MAX][200];
  cn_run(2, 0, -1, NULL, fn, codes, msgs);
  for (int r = 0; r < 2; r++) {
    if (codes[r]) fprintf(stderr, "rank %d: %d %s\n", r, codes[r], msgs[r]);
    ASSERT_EQ(codes[r], 0);
  }
  return 0;
}

TEST_IMPL(coll_net_pair_late_peer) { return cn_pair_ok(cn_pair_late); }

/* A send of more than the socket buffers hold (32 MiB) to a rank that
 * comes to its recv 7 s later: the sender's stream sits at a zero window
 * meanwhile, its probes answered, and must wait, not fail as if the
 * receiver's host were gone (TCP_USER_TIMEOUT aborted it after 5 s). */
static int cn_send_late(td_cnet_t *c, td_ring_t *r, int rank, int n, char *msg) {
  (void)n;
  size_t cnt = 8u << 20;
  float *x = malloc(cnt * sizeof(float));
  for (size_t i = 0; i < cnt; i++) x[i] = rank == 0 ? (float)(i % 1000) : -1;
  int rc;
  if (rank == 0) {
    rc = td_ring_send(r, x, cnt * sizeof(float), 1);
  } else {
    sleep(7);
    rc = td_ring_recv(r, x, cnt * sizeof(float), 0);
  }
  int bad = rc != 0;
  for (size_t i = 0; !bad && i < cnt; i += 4099) bad = x[i] != (float)(i % 1000);
  snprintf(msg, 200, "%d %g %s", rc, x[cnt - 1], td_cnet_error(c));
  free(x);
  return bad;
}

TEST_IMPL(coll_net_send_to_late_receiver) { return cn_pair_ok(cn_send_late); }

/* What crosses the wire: encrypted, none of rank 1's bytes appear in it;
 * plain (authenticated only), they do, so the search itself can fail. */
static float cn_mark(size_t i) { return 1000.25f + (float)i; }

static int cn_marked(td_cnet_t *c, td_ring_t *r, int rank, int n, char *msg) {
  (void)r;
  (void)n;
  size_t cnt = 65536;
  float *x = malloc(cnt * sizeof(float));
  for (size_t i = 0; i < cnt; i++) x[i] = rank == 1 ? cn_mark(i) : 0;
  int rc = td_cnet_allreduce_pair(c, 1 - rank, x, cnt, TD_F32, TD_RING_SUM);
  int bad = rc || x[0] != cn_mark(0) || x[cnt - 1] != cn_mark(cnt - 1);
  snprintf(msg, 200, "%d %g %s", rc, x[cnt - 1], td_cnet_error(c));
  free(x);
  return bad;
}

TEST_IMPL(coll_net_bytes_encrypted) {
  float mark[256];
  for (size_t i = 0; i < 256; i++) mark[i] = cn_mark(i);
  for (int plain = 0; plain <= 1; plain++) {
    cn_tap = mmap(NULL, CN_TAP, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    ASSERT(cn_tap != MAP_FAILED);
    int codes[N_MAX];
    char msgs[N_MAX][200];
    cn_run(2, plain, -1, NULL, cn_marked, codes, msgs);
    for (int r = 0; r < 2; r++) {
      if (codes[r]) fprintf(stderr, "plain %d rank %d: %d %s\n", plain, r, codes[r], msgs[r]);
      ASSERT_EQ(codes[r], 0);
    }
    int seen = memmem(cn_tap, CN_TAP, mark, sizeof(mark)) != NULL;
    munmap(cn_tap, CN_TAP);
    cn_tap = NULL;
    ASSERT_EQ(seen, plain);
  }
  return 0;
}
