/* Collectives across nodes: the ring's transport over TCP (coll_net.h).
 *
 * Why not the node's data-plane streams (engine/dplane.c): those carry
 * object chunks from one node's store into another's, driven by the node
 * daemon's loop; a collective moves bytes between two worker processes
 * that already hold them in their own memory, step after step, and waits
 * on each piece. A stream straight between the two ranks costs no hop
 * through either daemon. The wire format follows the data plane's: the
 * same records (u32 length, u8 type, 3 zero bytes as AAD, payload, 16-byte
 * tag; the nonce is the record's number, keys fresh per stream), sealed
 * with AES-128-OCB rather than GCM (engine/aead.c says why; plain streams
 * keep GCM's GMAC), and the same handshake shape (both ends' random nonces, HMAC-
 * SHA256 proofs of a shared secret, one key per direction derived from the
 * secret and the whole handshake). The secret is the group's: rank 0 makes
 * it and hands it out through the head's KV, which only CURVE-
 * authenticated members of the cluster reach; so a stream is only ever
 * accepted from a rank of the same group incarnation.
 *
 * Streams: every pair of ranks has one; the higher rank connects to the
 * lower, so joining never waits in a cycle. Operations poll the sockets
 * (send to one peer while receiving from another: the ring's sendrecv),
 * and a peer that closes, resets, or says nothing for the timeout fails
 * the operation with an error naming its rank and node: a rank whose node
 * died (its workers die with it) fails the others at once instead of
 * leaving them waiting. */
#include "coll_net.h"
#include "aead.h"
#include "crypto.h"

#include "tensor.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define TD__CN_REC (256u << 10) /* payload bytes of one record, at most */
/* Payload bytes a record is sealed with: small enough that a 1 MiB
 * exchange is many records, so one rank seals while the other opens and
 * the wire carries a third (each record waits whole before it opens).
 * 128 bytes under 64 KiB: with its header and tag a record (65,432 bytes)
 * goes out as two full loopback segments (MSS 32,741), where a 64 KiB one
 * went as two and a 78-byte third (TCP_NODELAY sends each send's tail at
 * once): 0.57 against 0.66 ms a 1 MiB pair allreduce, 10.4 against 11.7
 * at 16 MiB (medians of 9 and 5 alternated runs of two forked ranks). */
#define TD__CN_SEAL ((64u << 10) - 128)
/* Reducing in place, bytes sent ahead of those received and reduced. It
 * stays well under what the socket buffers hold (4 MiB each end), which
 * keeps what is in flight in the caches (one forked two-rank run each at
 * load ~6: 0.79 core-s/GB unbounded, 0.44 at 512 KiB; 512 KiB and 2 MiB,
 * three each: 0.54 and 0.60 at 256 MiB). */
#define TD__CN_AHEAD (512u << 10)
/* Records sealed before one send (the first of an operation goes alone,
 * to start the other side): fewer sends cost a rank less of the kernel's
 * time per byte (a 1 MiB pair allreduce of two forked ranks, 5 alternated
 * runs: 0.32 ms a call one record a send, 0.30 four). */
#define TD__CN_BATCH 4
#define TD__CN_HDR 8
#define TD__CN_TAG TD_AEAD_TAG
/* Receive buffer: two of the largest records, so a record cut by its end
 * always fits once moved to its start. */
#define TD__CN_IBUF (2 * (TD__CN_HDR + TD__CN_REC + TD__CN_TAG))
#define TD__CN_MAGIC "TDC2" /* 2: AES-128-OCB records (1: AES-128-GCM) */
#define TD__CN_HELLO 41 /* magic, mode, u32 rank, 32-byte nonce */

typedef struct td__cpeer {
  int fd;
  td_aead_t tx, rx;
  uint8_t *obuf; /* the records being written (TD__CN_BATCH at most) */
  size_t olen, opos;
  uint8_t *ibuf; /* records read: the next one from ioff, up to ifill */
  size_t ioff, ifill;
  uint64_t rbytes;   /* bytes received in all */
  uint8_t *plain_at; /* the last record opened in place: its plaintext */
  size_t pbeg, pend; /* plaintext not yet handed out, from plain_at */
  char name[64];
  double silent_since; /* when its TCP was first seen unanswering (0: it answers) */
} td__cpeer_t;

struct td_cnet {
  int lfd, rank, world, plain, gone;
  long tamper; /* tests: the record of this number on each stream is changed in flight */
  double timeout;
  td__cpeer_t *p;
  void *subs[4]; /* sub-transport contexts, freed with the cnet */
  int nsubs;
  char err[256];
};

typedef struct td__csub {
  td_cnet_t *c;
  int n, map[];
} td__csub_t;

static double td__now(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

int td_cnet_random(uint8_t out[32]) { return td_crypto_load() || RAND_bytes(out, 32) != 1 ? -1 : 0; }

/* A group that failed in an operation shuts every stream: the other ranks
 * fail at once too (they see it closed), rather than wait on this one. */
static void td__break(td_cnet_t *c) {
  for (int i = 0; c->p && i < c->world; i++)
    if (c->p[i].fd >= 0) shutdown(c->p[i].fd, SHUT_RDWR);
}

static int td__fail(td_cnet_t *c, int peer, int gone, const char *fmt, const char *why) {
  char what[160];
  td__break(c);
  snprintf(what, sizeof(what), fmt, why);
  if (peer >= 0)
    snprintf(c->err, sizeof(c->err), "rank %d on %s: %s", peer, c->p[peer].name[0] ? c->p[peer].name : "?",
             what);
  else snprintf(c->err, sizeof(c->err), "%s", what);
  c->gone |= gone;
  return TD_GPU_EIO;
}

const char *td_cnet_error(const td_cnet_t *c) { return c->err; }
int td_cnet_peer_gone(const td_cnet_t *c) { return c->gone; }
void td_cnet_set_timeout(td_cnet_t *c, double s) { c->timeout = s; }

const char *td_cnet_cipher(const td_cnet_t *c) {
  for (int i = 0; c->p && i < c->world; i++)
    if (c->p[i].fd >= 0)
      return td_aead_name(&c->p[i].tx);
  return "none";
}

int td_cnet_listen(td_cnet_t **out, const char *host, int *port) {
  if (td_crypto_load()) {
    errno = ENOENT;
    return -1;
  }
  struct addrinfo hints = {0}, *ai = NULL;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_PASSIVE | AI_NUMERICHOST;
  if (getaddrinfo(host, "0", &hints, &ai) != 0) {
    errno = EINVAL;
    return -1;
  }
  int fd = socket(ai->ai_family, SOCK_STREAM | SOCK_CLOEXEC, 0), err = 0;
  if (fd < 0 || bind(fd, ai->ai_addr, ai->ai_addrlen) || listen(fd, 64)) err = errno;
  freeaddrinfo(ai);
  struct sockaddr_storage ss;
  socklen_t sl = sizeof(ss);
  if (!err && getsockname(fd, (struct sockaddr *)&ss, &sl)) err = errno;
  if (err) {
    if (fd >= 0) close(fd);
    errno = err;
    return -1;
  }
  *port = ntohs(ss.ss_family == AF_INET6 ? ((struct sockaddr_in6 *)&ss)->sin6_port
                                         : ((struct sockaddr_in *)&ss)->sin_port);
  td_cnet_t *c = calloc(1, sizeof(*c));
  if (!c) {
    close(fd);
    errno = ENOMEM;
    return -1;
  }
  c->lfd = fd;
  c->timeout = 60;
  *out = c;
  return 0;
}

/* -- Joining ------------------------------------------------------------------ */

/* Reads or writes exactly len bytes on a blocking fd before deadline. */
static int td__io_full(int fd, void *p, size_t len, int wr, double deadline) {
  size_t done = 0;
  while (done < len) {
    int ms = (int)((deadline - td__now()) * 1000);
    if (ms <= 0) return -2;
    struct pollfd pf = {fd, wr ? POLLOUT : POLLIN, 0};
    int r = poll(&pf, 1, ms);
    if (r < 0 && errno == EINTR) continue;
    if (r <= 0) return r == 0 ? -2 : -1;
    ssize_t k = wr ? send(fd, (char *)p + done, len - done, MSG_NOSIGNAL | MSG_DONTWAIT)
                   : recv(fd, (char *)p + done, len - done, MSG_DONTWAIT);
    if (k > 0) done += (size_t)k;
    else if (k == 0 && !wr) return -1;
    else if (k < 0 && errno != EINTR && errno != EAGAIN && errno != EWOULDBLOCK) return -1;
  }
  return 0;
}

static void td__tune(int fd) {
  int one = 1, buf = 4 << 20;
  setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
  /* A peer host that vanishes without closing (power, network) is found
   * by keepalive probes in about 5 s (the default node timeout) while the
   * stream is idle, however long an operation may rightly wait for a slow
   * rank; with bytes outstanding, by td__peer_silent. Not by
   * TCP_USER_TIMEOUT: it also aborts a stream whose live peer has simply
   * not read yet (a zero window, probes answered) -- a send of more than
   * the buffers hold to a rank that comes to its recv 5 s later. */
  int idle = 2, intvl = 1, cnt = 3;
  setsockopt(fd, SOL_SOCKET, SO_KEEPALIVE, &one, sizeof(one));
  setsockopt(fd, IPPROTO_TCP, TCP_KEEPIDLE, &idle, sizeof(idle));
  setsockopt(fd, IPPROTO_TCP, TCP_KEEPINTVL, &intvl, sizeof(intvl));
  setsockopt(fd, IPPROTO_TCP, TCP_KEEPCNT, &cnt, sizeof(cnt));
  setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &buf, sizeof(buf));
  setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &buf, sizeof(buf));
  fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
}

static int td__peer_keys(td_cnet_t *c, td__cpeer_t *p, const uint8_t *secret, const uint8_t *hs, size_t hl,
                         int server) {
  if (td_aead_keyed(&p->tx, c->plain, 1, secret, server ? "s2c" : "c2s", hs, hl) ||
      td_aead_keyed(&p->rx, c->plain, 0, secret, server ? "c2s" : "s2c", hs, hl))
    return -1;
  p->obuf = malloc(TD__CN_BATCH * (TD__CN_HDR + TD__CN_SEAL + TD__CN_TAG));
  p->ibuf = malloc(TD__CN_IBUF);
  return p->obuf && p->ibuf ? 0 : -1;
}

/* The connecting (higher) rank's side with peer (lower). */
static int td__join_client(td_cnet_t *c, int peer, const char *host, int port, const uint8_t *secret,
                           double deadline) {
  struct addrinfo hints = {0}, *ai = NULL;
  hints.ai_socktype = SOCK_STREAM;
  char ps[16];
  snprintf(ps, sizeof(ps), "%d", port);
  if (getaddrinfo(host, ps, &hints, &ai) != 0)
    return td__fail(c, peer, 0, "cannot resolve its address %s", host);
  int fd = -1;
  /* The peer listens before it publishes its address, but a refused
   * connection is retried until the deadline all the same. */
  while (1) {
    fd = socket(ai->ai_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd >= 0 && connect(fd, ai->ai_addr, ai->ai_addrlen) == 0) break;
    int e = errno;
    if (fd >= 0) close(fd);
    fd = -1;
    if (td__now() > deadline) {
      freeaddrinfo(ai);
      return td__fail(c, peer, 1, "cannot connect to it: %s", strerror(e));
    }
    usleep(20000);
  }
  freeaddrinfo(ai);
  uint8_t hs[TD__CN_HELLO * 2 + 32 + 32];
  memcpy(hs, TD__CN_MAGIC, 4);
  hs[4] = (uint8_t)c->plain;
  uint32_t r = (uint32_t)c->rank;
  memcpy(hs + 5, &r, 4);
  RAND_bytes(hs + 9, 32);
  uint8_t mac[32];
  int rc = td__io_full(fd, hs, TD__CN_HELLO, 1, deadline);
  if (!rc) rc = td__io_full(fd, hs + TD__CN_HELLO, TD__CN_HELLO + 32, 0, deadline);
  if (rc) {
    close(fd);
    return td__fail(c, peer, 1, "%s during the handshake", rc == -2 ? "no answer" : "it closed the stream");
  }
  td_aead_hmac(secret, "server", hs, 2 * TD__CN_HELLO, mac);
  uint32_t pr;
  memcpy(&pr, hs + TD__CN_HELLO + 5, 4);
  if (memcmp(hs + TD__CN_HELLO, TD__CN_MAGIC, 4) || hs[TD__CN_HELLO + 4] != c->plain ||
      pr != (uint32_t)peer || CRYPTO_memcmp(mac, hs + 2 * TD__CN_HELLO, 32)) {
    close(fd);
    return td__fail(c, peer, 0, "%s",
                    "its stream does not prove the group's secret (a stale address, or another "
                    "--data-plane mode?)");
  }
  td_aead_hmac(secret, "client", hs, 2 * TD__CN_HELLO + 32, hs + 2 * TD__CN_HELLO + 32);
  if (td__io_full(fd, hs + 2 * TD__CN_HELLO + 32, 32, 1, deadline)) {
    close(fd);
    return td__fail(c, peer, 1, "%s", "it closed the stream during the handshake");
  }
  td__cpeer_t *p = &c->p[peer];
  p->fd = fd;
  if (td__peer_keys(c, p, secret, hs, sizeof(hs), 0)) return td__fail(c, peer, 0, "%s", "out of memory");
  td__tune(fd);
  return 0;
}

/* Takes one connection from a higher rank. */
static int td__join_server(td_cnet_t *c, const uint8_t *secret, double deadline) {
  while (1) {
    int ms = (int)((deadline - td__now()) * 1000);
    if (ms <= 0) return td__fail(c, -1, 1, "%s", "a higher rank did not connect in time");
    struct pollfd pf = {c->lfd, POLLIN, 0};
    if (poll(&pf, 1, ms) <= 0) continue;
    int fd = accept4(c->lfd, NULL, NULL, SOCK_CLOEXEC);
    if (fd < 0) continue;
    /* A connection that is not one of the group's ranks is dropped, and
     * the wait goes on. */
    double dl = td__now() + 5 < deadline ? td__now() + 5 : deadline;
    uint8_t hs[TD__CN_HELLO * 2 + 32 + 32], mac[32];
    uint32_t r;
    if (td__io_full(fd, hs, TD__CN_HELLO, 0, dl) || memcmp(hs, TD__CN_MAGIC, 4) || hs[4] != c->plain) {
      close(fd);
      continue;
    }
    memcpy(&r, hs + 5, 4);
    if ((int)r <= c->rank || (int)r >= c->world || c->p[r].fd >= 0) {
      close(fd);
      continue;
    }
    memcpy(hs + TD__CN_HELLO, TD__CN_MAGIC, 4);
    hs[TD__CN_HELLO + 4] = (uint8_t)c->plain;
    uint32_t me = (uint32_t)c->rank;
    memcpy(hs + TD__CN_HELLO + 5, &me, 4);
    RAND_bytes(hs + TD__CN_HELLO + 9, 32);
    td_aead_hmac(secret, "server", hs, 2 * TD__CN_HELLO, hs + 2 * TD__CN_HELLO);
    if (td__io_full(fd, hs + TD__CN_HELLO, TD__CN_HELLO + 32, 1, dl) ||
        td__io_full(fd, hs + 2 * TD__CN_HELLO + 32, 32, 0, dl)) {
      close(fd);
      continue;
    }
    td_aead_hmac(secret, "client", hs, 2 * TD__CN_HELLO + 32, mac);
    if (CRYPTO_memcmp(mac, hs + 2 * TD__CN_HELLO + 32, 32)) {
      close(fd);
      continue;
    }
    td__cpeer_t *p = &c->p[r];
    p->fd = fd;
    if (td__peer_keys(c, p, secret, hs, sizeof(hs), 1)) return td__fail(c, (int)r, 0, "%s", "out of memory");
    td__tune(fd);
    return 0;
  }
}

int td_cnet_join(td_cnet_t *c, int rank, int world, const char *const *hosts, const int *ports,
                 const char *const *names, const uint8_t secret[32], int plain, double timeout) {
  if (c->p || rank < 0 || rank >= world) return td__fail(c, -1, 0, "%s", "bad rank or a group joined twice");
  c->p = calloc((size_t)world, sizeof(*c->p));
  if (!c->p) return td__fail(c, -1, 0, "%s", "out of memory");
  c->rank = rank;
  c->world = world;
  c->plain = plain ? 1 : 0;
  const char *t = getenv("TIDE_COLL_TAMPER");
  c->tamper = t ? atol(t) : 0;
  for (int i = 0; i < world; i++) {
    c->p[i].fd = -1;
    snprintf(c->p[i].name, sizeof(c->p[i].name), "%s", names[i] ? names[i] : "?");
  }
  double deadline = td__now() + timeout;
  for (int i = 0; i < rank; i++)
    if (td__join_client(c, i, hosts[i], ports[i], secret, deadline)) return -1;
  for (int i = rank + 1; i < world; i++)
    if (td__join_server(c, secret, deadline)) return -1;
  close(c->lfd);
  c->lfd = -1;
  return 0;
}

void td_cnet_free(td_cnet_t **cp) {
  if (!cp || !*cp) return;
  td_cnet_t *c = *cp;
  if (c->lfd >= 0) close(c->lfd);
  for (int i = 0; c->p && i < c->world; i++) {
    td__cpeer_t *p = &c->p[i];
    if (p->fd >= 0) close(p->fd);
    td_aead_free(&p->tx);
    td_aead_free(&p->rx);
    free(p->obuf);
    free(p->ibuf);
  }
  free(c->p);
  for (int i = 0; i < c->nsubs; i++) free(c->subs[i]);
  free(c);
  *cp = NULL;
}

/* -- Moving bytes -------------------------------------------------------------- */

/* Seals the next record of up to TD__CN_SEAL bytes from src after those
 * in the peer's out buffer. */
static size_t td__seal(td_cnet_t *c, td__cpeer_t *p, const uint8_t *src, size_t len) {
  size_t k = len < TD__CN_SEAL ? len : TD__CN_SEAL;
  uint8_t *h = p->obuf + p->olen;
  uint32_t l32 = (uint32_t)k;
  memset(h, 0, TD__CN_HDR);
  memcpy(h, &l32, 4);
  td_aead_begin(&p->tx, h, TD__CN_HDR);
  size_t w = td_aead_update(&p->tx, h + TD__CN_HDR, src, k, 1);
  td_aead_end(&p->tx, h + TD__CN_HDR + w, h + TD__CN_HDR + k);
  p->olen += TD__CN_HDR + k + TD__CN_TAG;
  if (c->tamper && p->tx.seq == (uint64_t)c->tamper) h[TD__CN_HDR + k / 2] ^= 0x40;
  return k;
}

/* The next record whole in ibuf: 1, or 0 when the socket has no more
 * yet, or a negative code. Each recv takes what the buffer has room for,
 * several records at a time when they are there (one syscall for a
 * record cost a rank more than its cipher); a record cut by the buffer's
 * end moves to its start first. */
static int td__fill_rec(td_cnet_t *c, int peer, size_t *want) {
  td__cpeer_t *p = &c->p[peer];
  for (;;) {
    size_t have = p->ifill - p->ioff;
    *want = TD__CN_HDR;
    if (have >= TD__CN_HDR) {
      const uint8_t *h = p->ibuf + p->ioff;
      uint32_t l32;
      memcpy(&l32, h, 4);
      if (l32 == 0 || l32 > TD__CN_REC || h[4] || h[5] || h[6] || h[7])
        return td__fail(c, peer, 0, "%s", "a malformed record: the stream is closed");
      *want = TD__CN_HDR + l32 + TD__CN_TAG;
      if (have >= *want && (p->ioff + TD__CN_HDR) % 8 == 0) return 1;
    }
    /* A body that would not start 8-aligned (after a record whose length
     * is not a multiple of 8: the end of an operation) moves too, for the
     * reduction's loads. */
    if (p->ioff && (TD__CN_IBUF - p->ioff < *want || (p->ioff + TD__CN_HDR) % 8 ||
                    TD__CN_IBUF - p->ifill < TD__CN_HDR + TD__CN_SEAL + TD__CN_TAG)) {
      memmove(p->ibuf, p->ibuf + p->ioff, have);
      p->ioff = 0;
      p->ifill = have;
      continue;
    }
    ssize_t k = recv(p->fd, p->ibuf + p->ifill, TD__CN_IBUF - p->ifill, 0);
    if (k > 0) {
      p->ifill += (size_t)k;
      p->rbytes += (size_t)k;
      continue;
    }
    if (k == 0)
      return td__fail(c, peer, 1, "%s",
                      "it closed its stream: its process or node died, or the group failed there");
    if (errno == EINTR) continue;
    if (errno == EAGAIN || errno == EWOULDBLOCK) return 0;
    return td__fail(c, peer, 1, "its stream failed: %s (its process or node died?)", strerror(errno));
  }
}

/* Reads what the socket has; opens the next record when it is whole.
 * Returns 0 (progress or none), or a negative code. */
static int td__pull(td_cnet_t *c, int peer, uint8_t *dst, size_t room, size_t *took) {
  td__cpeer_t *p = &c->p[peer];
  size_t want;
  int rc = td__fill_rec(c, peer, &want);
  if (rc <= 0) return rc;
  uint8_t *h = p->ibuf + p->ioff, *body = h + TD__CN_HDR;
  size_t len = want - TD__CN_HDR - TD__CN_TAG;
  /* The whole record fits what the caller still wants: opened straight
   * into it (one copy less); else in place, handed out as asked. Bytes of
   * a record whose tag then fails are in the caller's buffer, but the
   * operation fails and the group with it: nothing reads them as a result. */
  int direct = room >= len;
  td_aead_begin(&p->rx, h, TD__CN_HDR);
  uint8_t *out = direct ? dst : body;
  size_t w = td_aead_update(&p->rx, out, body, len, 1);
  if (td_aead_end(&p->rx, out + w, body + len))
    return td__fail(c, peer, 0, "%s", "a record failed authentication: the stream is closed");
  p->plain_at = body;
  p->pbeg = 0;
  p->pend = direct ? 0 : len;
  *took = direct ? len : 0;
  p->ioff += want;
  return 0;
}

/* How received plaintext lands: copied (op < 0), or reduced into the
 * receive buffer as op(lower rank's, higher rank's) in elements of dtype,
 * the same value on both ranks whatever the op. */
typedef struct td__rx {
  int op, mine_first, dtype;
  size_t es; /* bytes per element */
} td__rx_t;

static const td__rx_t td__copy = {-1, 0, 0, 1};

/* Hands opened plaintext to the receive buffer at *rdone: copied, or
 * reduced. Reducing in place (sbuf == rbuf), bytes of ours not yet sealed
 * are not overwritten: returns 1 to wait for the sender to pass them. */
static int td__land(td_cnet_t *c, int from, const td__rx_t *x, uint8_t *rbuf, size_t rlen, size_t *rdone,
                    size_t sealed) {
  td__cpeer_t *pr = &c->p[from];
  size_t k = pr->pend - pr->pbeg < rlen - *rdone ? pr->pend - pr->pbeg : rlen - *rdone;
  const uint8_t *in = pr->plain_at + pr->pbeg;
  if (x->op < 0) {
    memcpy(rbuf + *rdone, in, k);
  } else {
    if (sealed < *rdone + k) return 1;
    if (k % x->es || (*rdone + k) % x->es)
      return td__fail(c, from, 0, "%s", "a record that splits an element: the ranks' lengths differ?");
    uint8_t *dst = rbuf + *rdone;
    td_reduce(dst, x->mine_first ? dst : in, x->mine_first ? in : dst, k / x->es, x->dtype, x->op);
  }
  pr->pbeg += k;
  *rdone += k;
  return 0;
}

/* Sends slen bytes to peer `to` while receiving rlen from `from` (either
 * length may be 0) into rbuf as x says; rbuf may be sbuf when reducing. */
/* Whether the host behind a stream with bytes outstanding has stopped
 * answering: the kernel has data unacknowledged or a zero-window probe
 * unanswered, and nothing was acknowledged for TD__CN_SILENT_MS, seen so
 * for a second (a live peer answers a probe within a round trip, though
 * probes back off to minutes apart while it does not read). */
#define TD__CN_SILENT_S 5
#define TD__CN_SILENT_MS (TD__CN_SILENT_S * 1000)
#define TD__CN_STR_(x) #x
#define TD__CN_STR(x) TD__CN_STR_(x)

static int td__peer_silent(td__cpeer_t *p, double now) {
  struct tcp_info ti;
  socklen_t len = sizeof(ti);
  if (getsockopt(p->fd, IPPROTO_TCP, TCP_INFO, &ti, &len) != 0) return 0;
  if (!(ti.tcpi_unacked > 0 || ti.tcpi_probes > 0) || ti.tcpi_last_ack_recv < TD__CN_SILENT_MS) {
    p->silent_since = 0;
    return 0;
  }
  if (p->silent_since == 0) p->silent_since = now;
  return now - p->silent_since >= 1.0;
}

static int td__xfer(td_cnet_t *c, int to, const uint8_t *sbuf, size_t slen, int from, uint8_t *rbuf,
                    size_t rlen, const td__rx_t *x) {
  if (c->err[0]) return TD_GPU_EIO; /* a failed group stays failed */
  td__cpeer_t *ps = slen ? &c->p[to] : NULL, *pr = rlen ? &c->p[from] : NULL;
  if ((ps && ps->fd < 0) || (pr && pr->fd < 0)) return TD_GPU_EINVAL;
  size_t sdone = 0, rdone = 0, sealed = x->op >= 0 && rbuf == sbuf ? 0 : SIZE_MAX;
  double last = td__now();
  while (1) {
    int progress = 0, held = 0, ahead = 0;
    /* Receive: plaintext already opened first, then the socket. Reducing,
     * records open in place and are reduced from there (no copy). */
    while (pr && rdone < rlen) {
      if (pr->pend > pr->pbeg) {
        int rc = td__land(c, from, x, rbuf, rlen, &rdone, sealed);
        if (rc < 0) return rc;
        if (rc) {
          held = 1;
          break;
        }
        progress = 1;
        continue;
      }
      uint64_t before = pr->rbytes;
      size_t took = 0;
      int direct = x->op < 0;
      int rc = td__pull(c, from, direct ? rbuf + rdone : NULL, direct ? rlen - rdone : 0, &took);
      if (rc) return rc;
      if (took) {
        rdone += took;
        progress = 1;
        continue;
      }
      if (pr->pend > pr->pbeg) continue;
      if (pr->rbytes == before) break;
      progress = 1;
    }
    /* Send: records sealed a few at a time, written as the socket takes them. */
    while (ps && (sdone < slen || ps->opos < ps->olen)) {
      if (ps->opos == ps->olen) {
        ps->opos = ps->olen = 0;
        for (int j = 0; j < (sdone ? TD__CN_BATCH : 1) && sdone < slen; j++) {
          if (sealed != SIZE_MAX && sdone - rdone >= TD__CN_AHEAD) {
            ahead = 1;
            break;
          }
          sdone += td__seal(c, ps, sbuf + sdone, slen - sdone);
          if (sealed != SIZE_MAX) sealed = sdone;
          progress = 1;
        }
        if (!ps->olen) break;
      }
      ssize_t k = send(ps->fd, ps->obuf + ps->opos, ps->olen - ps->opos, MSG_NOSIGNAL);
      if (k > 0) {
        ps->opos += (size_t)k;
        progress = 1;
        continue;
      }
      if (k < 0 && errno == EINTR) continue;
      if (k < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) break;
      return td__fail(c, to, 1, "its stream failed: %s (its process or node died?)",
                      k < 0 ? strerror(errno) : "closed");
    }
    int sending = ps && (sdone < slen || ps->opos < ps->olen), receiving = pr && rdone < rlen;
    if (!sending && !receiving) return 0;
    if (progress && held) continue; /* a record sealed: the held one may land now */
    double now = td__now();
    if (progress) last = now;
    else if (c->timeout > 0 && now - last > c->timeout) {
      int who = receiving ? from : to;
      char w[64];
      snprintf(w, sizeof(w), "%.0f", c->timeout);
      return td__fail(c, who, 1, "it sent nothing for %s s (its node stopped answering?)", w);
    }
    if (!progress) {
      static const char silent[] = "its host acknowledged nothing for %s s (gone from the network?)";
      const char *secs = TD__CN_STR(TD__CN_SILENT_S);
      if (sending && td__peer_silent(ps, now)) return td__fail(c, to, 1, silent, secs);
      if (receiving && (!sending || pr != ps) && td__peer_silent(pr, now))
        return td__fail(c, from, 1, silent, secs);
    }
    /* A record held for our own bytes to be sealed first needs no more
     * input yet: waiting on POLLIN would spin. */
    struct pollfd pf[2];
    int np = 0;
    if (receiving && !held) pf[np++] = (struct pollfd){pr->fd, POLLIN, 0};
    if (sending && (ps->opos < ps->olen || !ahead)) {
      if (np && pf[0].fd == ps->fd) pf[0].events |= POLLOUT;
      else pf[np++] = (struct pollfd){ps->fd, POLLOUT, 0};
    }
    int wait = c->timeout > 0 ? (int)((c->timeout - (now - last)) * 1000) + 1 : 1000;
    if (wait > 1000) wait = 1000;
    if (poll(pf, (nfds_t)np, wait) < 0 && errno != EINTR)
      return td__fail(c, -1, 0, "poll: %s", strerror(errno));
  }
}

int td_cnet_allreduce_pair(td_cnet_t *c, int peer, void *buf, size_t count, int dtype, int op) {
  if (peer < 0 || peer >= c->world || peer == c->rank || op == TD_RING_AVG) return TD_GPU_EINVAL;
  int rc = td_reduce_check(dtype, op);
  if (rc || count == 0) return rc;
  td__rx_t x = {op, c->rank < peer, dtype, td_dtype_size(dtype)};
  size_t len = count * x.es;
  return td__xfer(c, peer, buf, len, peer, buf, len, &x);
}

static td_cnet_t *td__sub_c(void *ctx, int *to) {
  td__csub_t *s = ctx;
  if (to) *to = s->map[*to];
  return s->c;
}

static int t_send(void *ctx, int peer, const void *buf, size_t len) {
  td_cnet_t *c = td__sub_c(ctx, &peer);
  return td__xfer(c, peer, buf, len, -1, NULL, 0, &td__copy);
}
static int t_recv(void *ctx, int peer, void *buf, size_t len) {
  td_cnet_t *c = td__sub_c(ctx, &peer);
  return td__xfer(c, -1, NULL, 0, peer, buf, len, &td__copy);
}
static int t_sendrecv(void *ctx, int to, const void *sbuf, size_t slen, int from, void *rbuf, size_t rlen) {
  td__sub_c(ctx, &from);
  td_cnet_t *c = td__sub_c(ctx, &to);
  return td__xfer(c, to, sbuf, slen, from, rbuf, rlen, &td__copy);
}

static void td__fill(td_ring_transport_t *tr, void *ctx) {
  memset(tr, 0, sizeof(*tr));
  tr->ctx = ctx;
  tr->send = t_send;
  tr->recv = t_recv;
  tr->sendrecv = t_sendrecv;
}

int td_cnet_sub_transport(td_cnet_t *c, const int *map, int n, td_ring_transport_t *tr) {
  if (n < 1 || n > c->world || c->nsubs == 4) return -1;
  td__csub_t *s = malloc(sizeof(*s) + (size_t)n * sizeof(int));
  if (!s) return -1;
  s->c = c;
  s->n = n;
  memcpy(s->map, map, (size_t)n * sizeof(int));
  c->subs[c->nsubs++] = s;
  td__fill(tr, s);
  return 0;
}

void td_cnet_transport(td_cnet_t *c, td_ring_transport_t *tr) {
  int *map = malloc((size_t)c->world * sizeof(int));
  for (int i = 0; map && i < c->world; i++) map[i] = i;
  if (!map || td_cnet_sub_transport(c, map, c->world, tr)) memset(tr, 0, sizeof(*tr));
  free(map);
}
