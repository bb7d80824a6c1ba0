/* Tests of the collective streams between nodes (lua/coll_net.c): ranks
 * forked here, real TCP sockets on loopback. The ring over them gives the
 * right sums (3 ranks, encrypted and plain, records split across pieces);
 * a rank with another secret is refused at the handshake; a record changed
 * in flight fails authentication; a rank that dies fails the others'
 * operation at once, naming it, and a failed rank's streams close so the
 * others fail too instead of waiting. */
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include "coll_net.h"
#include "test.h"

#define N_MAX 4
#define COUNT 300007 /* floats: several records a piece, not divisible by 3 */

typedef int (*cn_fn)(td_cnet_t *c, td_ring_t *r, int rank, int n, char *msg);

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
  munmap(shared, N_MAX * 200);
}

static int cn_sum(td_cnet_t *c, td_ring_t *r, int rank, int n, char *msg) {
  (void)c;
  float *x = malloc(COUNT * sizeof(float));
  for (int i = 0; i < COUNT; i++) x[i] = (float)((i * 7 + rank * 13) % 101 - 50);
  int rc = td_ring_allreduce(r, x, x, COUNT, TD_RING_SUM);
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

TEST_IMPL(coll_net_allreduce) {
  int codes[N_MAX];
  char msgs[N_MAX][200];
  for (int plain = 0; plain <= 1; plain++) {
    cn_run(3, plain, -1, NULL, cn_sum, codes, msgs);
    for (int r = 0; r < 3; r++) {
      if (codes[r]) fprintf(stderr, "rank %d: %d %s\n", r, codes[r], msgs[r]);
      ASSERT_EQ(codes[r], 0);
    }
  }
  return 0;
}

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

TEST_IMPL(coll_net_tamper_detected) {
  int codes[N_MAX];
  char msgs[N_MAX][200];
  cn_run(2, 0, -1, "2", cn_sum, codes, msgs);
  ASSERT_EQ(codes[0], 1);
  ASSERT(strstr(msgs[0], "rank 1 on node-b: a record failed authentication"));
  /* Rank 1 fails too: rank 0 closed its streams. */
  ASSERT_EQ(codes[1], 1);
  ASSERT(strstr(msgs[1], "rank 0 on node-a"));
  return 0;
}

/* Rank 1 dies after joining; rank 0's allreduce must fail, naming it. */
static int cn_die(td_cnet_t *c, td_ring_t *r, int rank, int n, char *msg) {
  (void)n;
  if (rank == 1) _exit(0);
  float x[1000] = {0};
  int rc = td_ring_allreduce(r, x, x, 1000, TD_RING_SUM);
  snprintf(msg, 200, "%d %d %s", rc, td_cnet_peer_gone(c), td_cnet_error(c));
  return rc ? 0 : 1;
}

TEST_IMPL(coll_net_peer_death) {
  int codes[N_MAX];
  char msgs[N_MAX][200];
  cn_run(2, 0, -1, NULL, cn_die, codes, msgs);
  ASSERT_EQ(codes[0], 0);
  if (!strstr(msgs[0], " 1 rank 1 on node-b: ")) fprintf(stderr, "rank 0: %s\n", msgs[0]);
  ASSERT(strstr(msgs[0], " 1 rank 1 on node-b: "));
  return 0;
}

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
  int rc = td_ring_allreduce(r, x, x, 16, TD_RING_SUM);
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
