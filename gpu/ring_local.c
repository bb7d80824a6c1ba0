/* Tide local transports for the CPU ring (see ring.h): shared memory
 * between forked processes (zero-copy peek, futex wake-ups) and socketpairs
 * (poll-driven sendrecv).  Used by tests and by build/bench-allreduce; the
 * engine supplies its own transport between nodes. */
#include <errno.h>
#include <linux/futex.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include "ring.h"

/* -- Shared memory -------------------------------------------------------------- */

/* One single-producer/single-consumer byte ring.  head and tail count bytes
 * ever written/consumed; the futex words are bumped on every publish so a
 * sleeping peer can be woken. */
typedef struct td__chan {
  uint64_t head __attribute__((aligned(64))); /* bytes written */
  uint32_t head_seq;                          /* futex: bumped after head moves */
  uint32_t reader_waiting;                    /* reader sleeps on head_seq */
  int32_t writer_pid;                         /* the writer's process, 0 before it attaches */
  uint64_t tail __attribute__((aligned(64))); /* bytes consumed */
  uint32_t tail_seq;                          /* futex: bumped after tail moves */
  uint32_t writer_waiting;                    /* writer sleeps on tail_seq */
  int32_t reader_pid;                         /* the reader's process, 0 before it attaches */
} td__chan_t;

struct td_ring_shm {
  int n;              /* ranks */
  int rank;           /* this process's rank once a transport is made */
  size_t cap;         /* bytes per channel */
  size_t map_len;     /* bytes mapped */
  td__chan_t *chans;  /* n * n headers, [from * n + to] */
  char *data;         /* n * n * cap bytes */
};

/* Waiting for a peer: yield the CPU a while, then sleep on the futex.
 * No busy-wait with PAUSE first: on the AMD VMs here a PAUSE takes 25-160
 * ns and a peer that shares our core cannot publish while we spin, so 256
 * of them cost up to 40 us a wait (a 4 KiB allreduce took 22-28 us with
 * them, 9-10 us without: build/bench-allreduce, 2026-12-07, load 5).  A
 * yield (~1 us) lets such a peer run at once, and costs a quiet machine one
 * system call. */
#define TD__YIELDS 512

static void td__futex_wait(uint32_t *addr, uint32_t seen) {
  struct timespec ts = {0, 2 * 1000 * 1000}; /* re-check every 2 ms regardless */
  syscall(SYS_futex, addr, FUTEX_WAIT, seen, &ts, NULL, 0);
}

/* A peer whose process is gone never publishes again: a wait that has
 * slept TD__LIVE_EVERY times (~100 ms) checks that the peer's process
 * still exists, so a rank that dies fails the others instead of hanging
 * them. */
#define TD__LIVE_EVERY 50

static int td__peer_gone(const int32_t *pidp) {
  int32_t pid = __atomic_load_n(pidp, __ATOMIC_ACQUIRE);
  return pid > 0 && kill(pid, 0) != 0 && errno == ESRCH;
}

static void td__futex_wake(uint32_t *addr) {
  syscall(SYS_futex, addr, FUTEX_WAKE, 1, NULL, NULL, 0);
}

int td_ring_shm_new(td_ring_shm_t **out, int nranks, size_t cap) {
  if (nranks < 1 || cap < 4096) return TD_GPU_EINVAL;
  cap = (cap + 4095) & ~(size_t)4095;
  td_ring_shm_t *s = calloc(1, sizeof(*s));
  if (!s) return TD_GPU_ENOMEM;
  size_t hdr = ((sizeof(td__chan_t) * (size_t)nranks * nranks) + 4095) & ~(size_t)4095;
  s->map_len = hdr + cap * (size_t)nranks * nranks;
  void *p = mmap(NULL, s->map_len, PROT_READ | PROT_WRITE,
                 MAP_SHARED | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
  if (p == MAP_FAILED) {
    free(s);
    return TD_GPU_ENOMEM;
  }
  s->n = nranks;
  s->rank = -1;
  s->cap = cap;
  s->chans = p;
  s->data = (char *)p + hdr;
  memset(p, 0, hdr);
  *out = s;
  return 0;
}

size_t td_ring_shm_bytes(int nranks, size_t cap) {
  cap = (cap + 4095) & ~(size_t)4095;
  size_t hdr = ((sizeof(td__chan_t) * (size_t)nranks * nranks) + 4095) & ~(size_t)4095;
  return hdr + cap * (size_t)nranks * nranks;
}

int td_ring_shm_wrap(td_ring_shm_t **out, void *mem, int nranks, size_t cap, int init) {
  if (nranks < 1 || cap < 4096 || !mem) return TD_GPU_EINVAL;
  cap = (cap + 4095) & ~(size_t)4095;
  td_ring_shm_t *s = calloc(1, sizeof(*s));
  if (!s) return TD_GPU_ENOMEM;
  size_t hdr = ((sizeof(td__chan_t) * (size_t)nranks * nranks) + 4095) & ~(size_t)4095;
  s->map_len = 0; /* not ours to unmap */
  s->n = nranks;
  s->rank = -1;
  s->cap = cap;
  s->chans = mem;
  s->data = (char *)mem + hdr;
  if (init) memset(mem, 0, hdr);
  *out = s;
  return 0;
}

void td_ring_shm_free(td_ring_shm_t **s) {
  if (!s || !*s) return;
  if ((*s)->map_len) munmap((*s)->chans, (*s)->map_len);
  free(*s);
  *s = NULL;
}

static td__chan_t *td__chan(td_ring_shm_t *s, int from, int to, char **data) {
  size_t i = (size_t)from * (size_t)s->n + (size_t)to;
  *data = s->data + i * s->cap;
  return &s->chans[i];
}

static int td__shm_send(void *ctx, int peer, const void *buf, size_t len) {
  td_ring_shm_t *s = ctx;
  if (peer < 0 || peer >= s->n || peer == s->rank) return TD_GPU_EINVAL;
  char *data;
  td__chan_t *c = td__chan(s, s->rank, peer, &data);
  const char *p = buf;
  uint64_t head = c->head; /* only this process writes head */
  while (len) {
    uint64_t tail = __atomic_load_n(&c->tail, __ATOMIC_ACQUIRE);
    for (int spins = 0; head - tail == s->cap; spins++) {
      if (spins < TD__YIELDS) {
        sched_yield();
      } else {
        if ((spins - TD__YIELDS) % TD__LIVE_EVERY == TD__LIVE_EVERY - 1 && td__peer_gone(&c->reader_pid))
          return TD_GPU_EPEER;
        uint32_t seen = __atomic_load_n(&c->tail_seq, __ATOMIC_ACQUIRE);
        __atomic_store_n(&c->writer_waiting, 1, __ATOMIC_SEQ_CST);
        if (__atomic_load_n(&c->tail, __ATOMIC_SEQ_CST) == tail) td__futex_wait(&c->tail_seq, seen);
        __atomic_store_n(&c->writer_waiting, 0, __ATOMIC_RELAXED);
      }
      tail = __atomic_load_n(&c->tail, __ATOMIC_ACQUIRE);
    }
    size_t at = (size_t)(head % s->cap);
    size_t n = s->cap - (size_t)(head - tail);
    if (n > s->cap - at) n = s->cap - at;
    if (n > len) n = len;
    /* Published a quarter channel at a time, so the reader copies out one
     * piece while this copies in the next. */
    if (n > s->cap / 4) n = s->cap / 4;
    memcpy(data + at, p, n);
    head += n;
    p += n;
    len -= n;
    __atomic_store_n(&c->head, head, __ATOMIC_SEQ_CST);
    __atomic_add_fetch(&c->head_seq, 1, __ATOMIC_SEQ_CST);
    if (__atomic_load_n(&c->reader_waiting, __ATOMIC_SEQ_CST)) td__futex_wake(&c->head_seq);
  }
  return 0;
}

static int64_t td__shm_peek(void *ctx, int peer, const void **ptr, size_t len) {
  td_ring_shm_t *s = ctx;
  if (peer < 0 || peer >= s->n || peer == s->rank) return TD_GPU_EINVAL;
  if (len == 0) return TD_GPU_EINVAL;
  char *data;
  td__chan_t *c = td__chan(s, peer, s->rank, &data);
  uint64_t tail = c->tail; /* only this process writes tail */
  uint64_t head = __atomic_load_n(&c->head, __ATOMIC_ACQUIRE);
  for (int spins = 0; head == tail; spins++) {
    if (spins < TD__YIELDS) {
      sched_yield();
    } else {
      if ((spins - TD__YIELDS) % TD__LIVE_EVERY == TD__LIVE_EVERY - 1 && td__peer_gone(&c->writer_pid))
        return TD_GPU_EPEER;
      uint32_t seen = __atomic_load_n(&c->head_seq, __ATOMIC_ACQUIRE);
      __atomic_store_n(&c->reader_waiting, 1, __ATOMIC_SEQ_CST);
      if (__atomic_load_n(&c->head, __ATOMIC_SEQ_CST) == tail) td__futex_wait(&c->head_seq, seen);
      __atomic_store_n(&c->reader_waiting, 0, __ATOMIC_RELAXED);
    }
    head = __atomic_load_n(&c->head, __ATOMIC_ACQUIRE);
  }
  size_t at = (size_t)(tail % s->cap);
  size_t n = (size_t)(head - tail);
  if (n > s->cap - at) n = s->cap - at;
  if (n > len) n = len;
  *ptr = data + at;
  return (int64_t)n;
}

static int td__shm_release(void *ctx, int peer, size_t len) {
  td_ring_shm_t *s = ctx;
  char *data;
  td__chan_t *c = td__chan(s, peer, s->rank, &data);
  __atomic_store_n(&c->tail, c->tail + len, __ATOMIC_SEQ_CST);
  __atomic_add_fetch(&c->tail_seq, 1, __ATOMIC_SEQ_CST);
  if (__atomic_load_n(&c->writer_waiting, __ATOMIC_SEQ_CST)) td__futex_wake(&c->tail_seq);
  return 0;
}

static int td__shm_recv(void *ctx, int peer, void *buf, size_t len) {
  char *p = buf;
  while (len) {
    const void *src;
    int64_t n = td__shm_peek(ctx, peer, &src, len);
    if (n < 0) return (int)n;
    memcpy(p, src, (size_t)n);
    td__shm_release(ctx, peer, (size_t)n);
    p += n;
    len -= (size_t)n;
  }
  return 0;
}

void td_ring_shm_transport(td_ring_shm_t *s, int rank, td_ring_transport_t *tr) {
  s->rank = rank;
  /* This process's end of each of its channels, for the peers' liveness
   * checks. */
  int32_t me = (int32_t)getpid();
  for (int p = 0; p < s->n; p++) {
    if (p == rank) continue;
    __atomic_store_n(&s->chans[(size_t)rank * (size_t)s->n + (size_t)p].writer_pid, me, __ATOMIC_RELEASE);
    __atomic_store_n(&s->chans[(size_t)p * (size_t)s->n + (size_t)rank].reader_pid, me, __ATOMIC_RELEASE);
  }
  memset(tr, 0, sizeof(*tr));
  tr->ctx = s;
  tr->send = td__shm_send;
  tr->recv = td__shm_recv;
  tr->recv_peek = td__shm_peek;
  tr->recv_release = td__shm_release;
  tr->max_inflight = s->cap;
}

/* -- Socketpairs ------------------------------------------------------------------- */

struct td_ring_sock {
  int n;     /* ranks */
  int rank;  /* owner once a transport is made */
  int *fd;   /* n * n: fd[i * n + j] is rank i's end towards rank j */
};

int td_ring_sock_new(td_ring_sock_t **out, int nranks) {
  if (nranks < 1) return TD_GPU_EINVAL;
  td_ring_sock_t *s = calloc(1, sizeof(*s));
  int *fd = malloc(sizeof(int) * (size_t)nranks * nranks);
  if (!s || !fd) {
    free(s);
    free(fd);
    return TD_GPU_ENOMEM;
  }
  for (int i = 0; i < nranks * nranks; i++) fd[i] = -1;
  for (int i = 0; i < nranks; i++)
    for (int j = i + 1; j < nranks; j++) {
      int sv[2];
      if (socketpair(AF_UNIX, SOCK_STREAM, 0, sv) != 0) {
        for (int k = 0; k < nranks * nranks; k++)
          if (fd[k] >= 0) close(fd[k]);
        free(fd);
        free(s);
        return TD_GPU_EIO;
      }
      fd[i * nranks + j] = sv[0];
      fd[j * nranks + i] = sv[1];
    }
  s->n = nranks;
  s->rank = -1;
  s->fd = fd;
  *out = s;
  return 0;
}

void td_ring_sock_free(td_ring_sock_t **s) {
  if (!s || !*s) return;
  for (int k = 0; k < (*s)->n * (*s)->n; k++)
    if ((*s)->fd[k] >= 0) close((*s)->fd[k]);
  free((*s)->fd);
  free(*s);
  *s = NULL;
}

static int td__sock_fd(td_ring_sock_t *s, int peer) {
  return peer >= 0 && peer < s->n && peer != s->rank ? s->fd[s->rank * s->n + peer] : -1;
}

static int td__sock_send(void *ctx, int peer, const void *buf, size_t len) {
  int fd = td__sock_fd(ctx, peer);
  if (fd < 0) return TD_GPU_EINVAL;
  const char *p = buf;
  while (len) {
    ssize_t n = send(fd, p, len, MSG_NOSIGNAL);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return TD_GPU_EIO;
    p += n;
    len -= (size_t)n;
  }
  return 0;
}

static int td__sock_recv(void *ctx, int peer, void *buf, size_t len) {
  int fd = td__sock_fd(ctx, peer);
  if (fd < 0) return TD_GPU_EINVAL;
  char *p = buf;
  while (len) {
    ssize_t n = recv(fd, p, len, 0);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return TD_GPU_EIO;
    p += n;
    len -= (size_t)n;
  }
  return 0;
}

static int td__sock_sendrecv(void *ctx, int to, const void *sbuf, size_t slen,
                             int from, void *rbuf, size_t rlen) {
  int tfd = td__sock_fd(ctx, to), ffd = td__sock_fd(ctx, from);
  if (tfd < 0 || ffd < 0) return TD_GPU_EINVAL;
  size_t so = 0, ro = 0;
  while (so < slen || ro < rlen) {
    struct pollfd p[2];
    int np = 0, si = -1, ri = -1;
    if (so < slen) si = np, p[np++] = (struct pollfd){tfd, POLLOUT, 0};
    if (ro < rlen) ri = np, p[np++] = (struct pollfd){ffd, POLLIN, 0};
    if (poll(p, (nfds_t)np, -1) < 0) {
      if (errno == EINTR) continue;
      return TD_GPU_EIO;
    }
    if (si >= 0 && (p[si].revents & (POLLOUT | POLLERR | POLLHUP))) {
      ssize_t n = send(tfd, (const char *)sbuf + so, slen - so, MSG_DONTWAIT | MSG_NOSIGNAL);
      if (n > 0)
        so += (size_t)n;
      else if (n < 0 && errno != EAGAIN && errno != EINTR) return TD_GPU_EIO;
    }
    if (ri >= 0 && (p[ri].revents & (POLLIN | POLLERR | POLLHUP))) {
      ssize_t n = recv(ffd, (char *)rbuf + ro, rlen - ro, MSG_DONTWAIT);
      if (n > 0)
        ro += (size_t)n;
      else if (n == 0 || (errno != EAGAIN && errno != EINTR)) return TD_GPU_EIO;
    }
  }
  return 0;
}

void td_ring_sock_transport(td_ring_sock_t *s, int rank, td_ring_transport_t *tr) {
  s->rank = rank;
  for (int i = 0; i < s->n; i++)
    for (int j = 0; j < s->n; j++)
      if (i != rank && s->fd[i * s->n + j] >= 0) {
        close(s->fd[i * s->n + j]);
        s->fd[i * s->n + j] = -1;
      }
  memset(tr, 0, sizeof(*tr));
  tr->ctx = s;
  tr->send = td__sock_send;
  tr->recv = td__sock_recv;
  tr->sendrecv = td__sock_sendrecv;
}
