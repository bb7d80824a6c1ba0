/* Tide TCP bridge (see bridge.h). */
#include "bridge.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <arpa/inet.h>
#include <netinet/in.h>
#include <unistd.h>
#include <zmq.h>

#include "chan.h"
#include "proto.h"
#include "td.h"

#define TD__IDLE_S 15.0    /* a client silent this long is gone */
#define TD__BEAT_S 2.0     /* clients send an empty message this often */
#define TD__SILENT_S 10.0  /* a link whose peer answers nothing this long is lost */

/* Chunks of a byte stream must never be dropped, as a ROUTER does at its
 * high-water mark: no limit (the peer's reading paces the sender). */
static void td__no_hwm(void *sock) {
  int zero = 0;
  zmq_setsockopt(sock, ZMQ_SNDHWM, &zero, sizeof(zero));
  zmq_setsockopt(sock, ZMQ_RCVHWM, &zero, sizeof(zero));
}

#define TD__SLAB (4u << 20)   /* bytes of a read buffer (see Slabs) */
#define TD__SMALL (64u << 10) /* reads shorter than this are copied, not pinned */
#define TD__KEEP 16           /* idle slabs a bridge keeps warm */

/* Limits on what a peer can make this process hold (see Limits). */
#define TD__MSG_MAX (1u << 20)  /* bytes of one ZeroMQ message, either way */
#define TD__RCVHWM 32           /* messages queued from one peer before its reads pause */
#define TD__HANDSHAKE_MS 10000  /* a peer gets this long to prove it has the key */
#define TD__HS_MAX 64           /* connections still handshaking, in all */
#define TD__HS_MAX_IP 16        /* ... from one address */

/* -- Limits -------------------------------------------------------------------
 * A peer could make the listening side allocate whatever a frame header
 * claims, before the CURVE handshake has shown it holds the key (libzmq
 * buffers whole frames; 4 connections claiming 256 MiB frames took a head
 * from 58 MB to 1 GB). Every message either side of a bridge sends is a
 * piece of a byte stream cut at TD__MSG_MAX (td__forward), so a frame
 * claiming more is refused at its header (ZMQ_MAXMSGSIZE); a peer's
 * messages queue up to TD__RCVHWM before ZeroMQ stops reading its
 * socket (back-pressure, nothing dropped); and the server lets at most
 * TD__HS_MAX connections (TD__HS_MAX_IP from one address) be in their
 * handshake at once, each for at most TD__HANDSHAKE_MS, closing the
 * newest beyond that. So peers without the key hold at most about
 * TD__HS_MAX * TD__MSG_MAX (64 MiB), and one address a quarter of it. */

static void td__limit_size(void *sock) {
  int64_t max = TD__MSG_MAX + 1024;  /* the limit is on frames, which CURVE makes longer */
  zmq_setsockopt(sock, ZMQ_MAXMSGSIZE, &max, sizeof(max));
}

/* -- Slabs --------------------------------------------------------------------- */

/* Bytes read from a local socket go to ZeroMQ without a copy: a read lands
 * in a slab, and the message sent refers to its bytes until ZeroMQ's I/O
 * thread has encoded them. Reads fill one slab after another, so a slab
 * backs many messages; it returns to its pool, pages still faulted in, when
 * the last of them is done (on these VMs a fresh page is first touched at
 * ~0.35 GB/s, against 17-40 GB/s for a copy). Small reads are copied instead, so a message
 * queued for a slow peer never pins a whole slab for a few bytes. */

typedef struct td__pool td__pool_t;

typedef struct td__slab {
  _Atomic int refs;  /* messages using it, +1 while it is being filled */
  td__pool_t *pool;  /* where it returns */
  size_t used;       /* bytes handed to messages */
  uint8_t data[];    /* TD__SLAB bytes */
} td__slab_t;

struct td__pool {
  pthread_mutex_t mu;        /* slabs come back on ZeroMQ's I/O thread */
  td__slab_t *idle[TD__KEEP]; /* warm slabs */
  int nidle;
  td__slab_t *cur;           /* the slab being filled (bridge thread only) */
};

static void td__slab_unref(void *data, void *hint) {
  (void)data;
  td__slab_t *sl = hint;
  if (atomic_fetch_sub(&sl->refs, 1) != 1) return;
  td__pool_t *p = sl->pool;
  pthread_mutex_lock(&p->mu);
  int keep = p->nidle < TD__KEEP;
  if (keep) p->idle[p->nidle++] = sl;
  pthread_mutex_unlock(&p->mu);
  if (!keep) free(sl);
}

/* The slab to read into, with room for at least TD__SMALL more bytes. */
static td__slab_t *td__slab_cur(td__pool_t *p) {
  if (p->cur && TD__SLAB - p->cur->used >= TD__SMALL) return p->cur;
  if (p->cur) td__slab_unref(NULL, p->cur);
  pthread_mutex_lock(&p->mu);
  td__slab_t *sl = p->nidle ? p->idle[--p->nidle] : NULL;
  pthread_mutex_unlock(&p->mu);
  if (!sl) {
    sl = td_xmalloc(sizeof(*sl) + TD__SLAB);
    sl->pool = p;
  }
  atomic_store(&sl->refs, 1);
  sl->used = 0;
  p->cur = sl;
  return sl;
}

static void td__pool_init(td__pool_t *p) {
  memset(p, 0, sizeof(*p));
  pthread_mutex_init(&p->mu, NULL);
}

/* After the sockets are closed: every message has given its slab back. */
static void td__pool_free(td__pool_t *p) {
  if (p->cur) td__slab_unref(NULL, p->cur);
  p->cur = NULL;
  while (p->nidle) free(p->idle[--p->nidle]);
  pthread_mutex_destroy(&p->mu);
}

/* Reads what fd has and sends it on sock as messages of at most
 * TD__MSG_MAX bytes, each after the routing id when there is one.
 * Returns 1 if bytes were sent, 0 if none were ready, -1 when fd reached
 * its end or failed. */
static int td__forward(td__pool_t *p, void *sock, int fd, const void *id, size_t idlen) {
  td__slab_t *sl = td__slab_cur(p);
  ssize_t r = read(fd, sl->data + sl->used, TD__SLAB - sl->used);
  if (r < 0 && (errno == EAGAIN || errno == EINTR)) return 0;
  if (r <= 0) return -1;
  if ((size_t)r < TD__SMALL) {
    if (id) zmq_send(sock, id, idlen, ZMQ_SNDMORE);
    zmq_send(sock, sl->data + sl->used, (size_t)r, 0);
    return 1;
  }
  for (size_t off = 0; off < (size_t)r;) {
    size_t l = (size_t)r - off < TD__MSG_MAX ? (size_t)r - off : TD__MSG_MAX;
    zmq_msg_t m;
    atomic_fetch_add(&sl->refs, 1);
    zmq_msg_init_data(&m, sl->data + sl->used + off, l, td__slab_unref, sl);
    if (id) zmq_send(sock, id, idlen, ZMQ_SNDMORE);
    if (zmq_msg_send(&m, sock, 0) < 0) zmq_msg_close(&m);
    off += l;
  }
  sl->used += (size_t)r;
  return 1;
}

/* The code for ZeroMQ's last failure (zmq_errno): -errno for the system
 * errors it passes on, TD_EADDRINUSE by name, and TD_EZMQ for its own
 * (EFSM, ETERM, ...), which strerror() cannot name. */
static int td__zerr(void) {
  int e = zmq_errno();
  if (e == EADDRINUSE) return TD_EADDRINUSE;
  return e > 0 && e < ZMQ_HAUSNUMERO ? -e : TD_EZMQ;
}

/* -errno for the system call that just failed (never 0). */
static int td__syserr(void) { return errno > 0 ? -errno : TD_EIO; }

/* -- Keys -------------------------------------------------------------------- */

int td_key_create(const char *path, td_cluster_key_t *k) {
  if (zmq_curve_keypair(k->server_public, k->server_secret) ||
      zmq_curve_keypair(k->client_public, k->client_secret))
    return td__zerr();
  return td_key_save(path, k);
}

int td_key_save(const char *path, const td_cluster_key_t *k) {
  /* Never through a link: a key written into someone else's file. */
  int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_NOFOLLOW | O_CLOEXEC, 0600);
  if (fd < 0) return td__syserr();
  fchmod(fd, 0600);
  char buf[512];
  int n = snprintf(buf, sizeof(buf),
                   "# Tide cluster key: whoever holds this file may join and run code.\n"
                   "server_public=%s\nserver_secret=%s\nclient_public=%s\nclient_secret=%s\n",
                   k->server_public, k->server_secret, k->client_public, k->client_secret);
  ssize_t w = write(fd, buf, (size_t)n);
  int rc = w == n ? 0 : w < 0 ? td__syserr() : TD_ENOSPACE;
  close(fd);
  return rc;
}

int td_key_load(const char *path, td_cluster_key_t *k) {
  FILE *f = fopen(path, "r");
  if (!f) return td__syserr();
  memset(k, 0, sizeof(*k));
  char line[256];
  while (fgets(line, sizeof(line), f)) {
    char *eq = strchr(line, '=');
    if (!eq || line[0] == '#') continue;
    *eq = 0;
    char *v = eq + 1;
    v[strcspn(v, "\r\n")] = 0;
    if (strlen(v) != 40) continue;
    if (!strcmp(line, "server_public")) memcpy(k->server_public, v, 41);
    else if (!strcmp(line, "server_secret")) memcpy(k->server_secret, v, 41);
    else if (!strcmp(line, "client_public")) memcpy(k->client_public, v, 41);
    else if (!strcmp(line, "client_secret")) memcpy(k->client_secret, v, 41);
  }
  fclose(f);
  return k->server_public[0] && k->client_public[0] && k->client_secret[0] ? 0 : TD_EINVAL;
}

/* -- Node side ----------------------------------------------------------------- */

typedef struct td__conn {
  uint8_t id[256];   /* ZeroMQ routing id */
  size_t idlen;
  int fd;            /* client connection on the node's Unix socket */
  double seen;       /* last message from the peer */
} td__conn_t;

static struct {
  void *ctx, *router, *zap, *mon;
  pthread_t th;
  int running;
  _Atomic int stop;
  _Atomic uint64_t refused;
  char unix_sock[256];
  td_cluster_key_t key;
  uint8_t client_pub[32];
  td__conn_t *conns;
  int nconns, capconns;
  td__pool_t pool;   /* read buffers for the peers' connections */
  /* Connections in their handshake (see Limits): the socket and its
   * peer's address, from the monitor's ACCEPTED to its DISCONNECTED or
   * to the first message from the socket (ZMQ_SRCFD). ACCEPTED is read
   * before that message: the handshake needs our answer to its ZAP
   * request, sent after ACCEPTED, and the monitor is read right after
   * the ZAP socket, before the router. */
  struct { int fd; uint64_t addr; double since; char host[48]; } hs[TD__HS_MAX];
  int nhs;
  uint64_t capped, capped_logged;  /* connections closed at the cap, and when last logged */
  double capped_at;
  uint64_t failed_logged;          /* refusals when the last one was logged */
  double failed_at;
  int failed_unnamed;              /* a refusal whose socket's DISCONNECTED names its peer */
  char failed_host[48];            /* the last refused peer named */
} B;

uint64_t td_bridge_refused(void) { return atomic_load(&B.refused); }

static int td__write_all(int fd, const void *p, size_t n) {
  const uint8_t *b = p;
  while (n) {
    ssize_t w = write(fd, b, n);
    if (w < 0 && errno == EINTR) continue;
    if (w < 0 && errno == EAGAIN) {
      struct pollfd pfd = {fd, POLLOUT, 0};
      poll(&pfd, 1, 1000);
      continue;
    }
    if (w <= 0) return -1;
    b += w;
    n -= (size_t)w;
  }
  return 0;
}

/* A new peer becomes a client of the node: connect, drop the store fd the
 * node offers (a remote peer cannot map it), and say it is remote and from
 * which address (a node that joins is reached there by other nodes). */
static int td__conn_open(td__conn_t *c, const char *addr) {
  struct sockaddr_un sa;
  memset(&sa, 0, sizeof(sa));
  sa.sun_family = AF_UNIX;
  memcpy(sa.sun_path, B.unix_sock, strlen(B.unix_sock) + 1);
  int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0 || connect(fd, (struct sockaddr *)&sa, sizeof(sa)) != 0) {
    if (fd >= 0) close(fd);
    return -1;
  }
  int sfd = td_sock_recv_fd(fd);
  if (sfd < 0) { close(fd); return -1; }
  close(sfd);
  uint8_t frame[5 + 4 + 64];
  uint32_t al = addr ? (uint32_t)strnlen(addr, 64) : 0, fl = 1 + 4 + al;
  memcpy(frame, &fl, 4);
  frame[4] = TD_M_REMOTE;
  memcpy(frame + 5, &al, 4);
  if (al) memcpy(frame + 9, addr, al);
  if (td__write_all(fd, frame, 4 + fl)) { close(fd); return -1; }
  td_sock_bulk(fd);
  fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
  c->fd = fd;
  return 0;
}

static void td__conn_close(int i) {
  close(B.conns[i].fd);
  B.conns[i] = B.conns[--B.nconns];
}

/* ZAP: only the cluster's client key gets in; everyone else is counted. */
static void td__zap_one(void) {
  zmq_msg_t parts[7];
  int n = 0, more = 1;
  while (more && n < 7) {
    zmq_msg_init(&parts[n]);
    if (zmq_msg_recv(&parts[n], B.zap, 0) < 0) break;
    more = zmq_msg_more(&parts[n]);
    n++;
  }
  while (more) {  /* drain anything unexpected */
    zmq_msg_t x;
    zmq_msg_init(&x);
    zmq_msg_recv(&x, B.zap, 0);
    more = zmq_msg_more(&x);
    zmq_msg_close(&x);
  }
  int ok = n == 7 && zmq_msg_size(&parts[5]) == 5 && !memcmp(zmq_msg_data(&parts[5]), "CURVE", 5) &&
           zmq_msg_size(&parts[6]) == 32 && !memcmp(zmq_msg_data(&parts[6]), B.client_pub, 32);
  /* Refusals are counted from the socket monitor's handshake events. */
  const char *rid = n > 1 ? zmq_msg_data(&parts[1]) : "";
  size_t ridlen = n > 1 ? zmq_msg_size(&parts[1]) : 0;
  zmq_send(B.zap, "1.0", 3, ZMQ_SNDMORE);
  zmq_send(B.zap, rid, ridlen, ZMQ_SNDMORE);
  zmq_send(B.zap, ok ? "200" : "400", 3, ZMQ_SNDMORE);
  zmq_send(B.zap, ok ? "OK" : "no cluster key", ok ? 2 : 14, ZMQ_SNDMORE);
  zmq_send(B.zap, "", 0, ZMQ_SNDMORE);
  zmq_send(B.zap, "", 0, 0);
  for (int i = 0; i < n; i++) zmq_msg_close(&parts[i]);
}

/* The address a connected socket's peer has, as a number to compare, and
 * as text in host ("?" when unknown). */
static uint64_t td__peer_addr(int fd, char *host, size_t hostlen) {
  struct sockaddr_storage ss;
  socklen_t sl = sizeof(ss);
  snprintf(host, hostlen, "?");
  if (getpeername(fd, (struct sockaddr *)&ss, &sl)) return 0;
  const uint8_t *a = NULL;
  size_t al = 0;
  if (ss.ss_family == AF_INET) {
    a = (const uint8_t *)&((struct sockaddr_in *)&ss)->sin_addr;
    al = 4;
  } else if (ss.ss_family == AF_INET6) {
    a = (const uint8_t *)&((struct sockaddr_in6 *)&ss)->sin6_addr;
    al = 16;
  }
  if (a) inet_ntop(ss.ss_family, a, host, (socklen_t)hostlen);
  return td_fnv1a(TD_FNV_BASIS, a, al);
}

static void td__hs_del(int fd) {
  for (int i = 0; i < B.nhs; i++)
    if (B.hs[i].fd == fd) {
      B.hs[i] = B.hs[--B.nhs];
      return;
    }
}

/* A connection was accepted: it joins those in their handshake, or is
 * closed at once when there are too many already (in all, or from its
 * address). shutdown() and not close(): the socket stays ZeroMQ's, whose
 * I/O thread sees it end and cleans up. gone: it has ended already (its
 * socket may be another's by now): only noted, to name its peer. */
static void td__hs_accepted(int fd, int gone) {
  double now = td_now();
  /* ZeroMQ ends every handshake within TD__HANDSHAKE_MS: an entry older
   * than twice that lost its DISCONNECTED somehow, and must not hold a
   * place for ever. */
  for (int i = B.nhs - 1; i >= 0; i--)
    if (now - B.hs[i].since > 2 * TD__HANDSHAKE_MS / 1000.0) B.hs[i] = B.hs[--B.nhs];
  char host[48];
  uint64_t addr = td__peer_addr(fd, host, sizeof(host));
  int same = 0;
  for (int i = 0; i < B.nhs; i++) same += B.hs[i].addr == addr;
  if (B.nhs < TD__HS_MAX && (same < TD__HS_MAX_IP || gone)) {
    B.hs[B.nhs].fd = fd;
    B.hs[B.nhs].since = now;
    memcpy(B.hs[B.nhs].host, host, sizeof(host));
    B.hs[B.nhs++].addr = addr;
    return;
  }
  if (gone) return;
  shutdown(fd, SHUT_RDWR);
  B.capped++;
  if (now - B.capped_at >= 10) {  /* logged at most every 10 s, with the count since */
    fprintf(stderr,
            "tide: closed %llu connection(s) (the last from %s) without a handshake: %d connections are "
            "in their handshake (at most %d, %d from one address)\n",
            (unsigned long long)(B.capped - B.capped_logged), host, B.nhs, TD__HS_MAX, TD__HS_MAX_IP);
    fflush(stderr);
    B.capped_logged = B.capped;
    B.capped_at = now;
  }
}

/* Monitor events, up to 256 of those ready (returns how many). A failed
 * handshake (no key, wrong key, not ZeroMQ at all): counted and logged
 * (at most once a second, with the count since), the peer never reaches
 * the node. ACCEPTED and DISCONNECTED carry the socket, and track
 * handshakes (see Limits). A failure's event names no peer (its address
 * is this end's endpoint): the DISCONNECTED that follows it names the
 * socket, whose peer was noted at ACCEPTED. */
static int td__monitor_drain(void) {
  enum { N = 256 };
  struct { uint16_t event; int32_t value; } ev[N];
  int k = 0;
  while (k < N) {
    zmq_msg_t e, a;
    zmq_msg_init(&e);
    zmq_msg_init(&a);
    if (zmq_msg_recv(&e, B.mon, ZMQ_DONTWAIT) < 0) {
      zmq_msg_close(&e);
      zmq_msg_close(&a);
      break;
    }
    if (zmq_msg_more(&e)) zmq_msg_recv(&a, B.mon, 0);
    if (zmq_msg_size(&e) >= 6) {
      memcpy(&ev[k].event, zmq_msg_data(&e), 2);
      memcpy(&ev[k].value, (uint8_t *)zmq_msg_data(&e) + 2, 4);
      k++;
    }
    zmq_msg_close(&e);
    zmq_msg_close(&a);
  }
  uint64_t failed = 0;
  for (int i = 0; i < k; i++) {
    if (ev[i].event == ZMQ_EVENT_ACCEPTED) {
      int gone = 0;
      for (int j = i + 1; j < k && !gone; j++)
        gone = ev[j].event == ZMQ_EVENT_DISCONNECTED && ev[j].value == ev[i].value;
      td__hs_accepted(ev[i].value, gone);
    } else if (ev[i].event == ZMQ_EVENT_DISCONNECTED) {
      if (B.failed_unnamed) {  /* the one that failed (one I/O thread: no other comes between) */
        snprintf(B.failed_host, sizeof(B.failed_host), "?");
        for (int h = 0; h < B.nhs; h++)
          if (B.hs[h].fd == ev[i].value) memcpy(B.failed_host, B.hs[h].host, sizeof(B.failed_host));
        B.failed_unnamed = 0;
      }
      td__hs_del(ev[i].value);
    } else if (ev[i].event & (ZMQ_EVENT_HANDSHAKE_FAILED_NO_DETAIL | ZMQ_EVENT_HANDSHAKE_FAILED_PROTOCOL |
                              ZMQ_EVENT_HANDSHAKE_FAILED_AUTH)) {
      failed++;
      B.failed_unnamed = 1;
    }
  }
  uint64_t total = atomic_fetch_add(&B.refused, failed) + failed;
  /* Logged once its peer is named, at most once a second. */
  if (total == B.failed_logged || B.failed_unnamed || td_now() - B.failed_at < 1) return k;
  uint64_t more = total - B.failed_logged - 1;
  const char *who = B.failed_host[0] ? B.failed_host : "?";
  if (more)
    fprintf(stderr,
            "tide: refused a connection from %s: no valid cluster key (%llu more since the last line)\n", who,
            (unsigned long long)more);
  else
    fprintf(stderr, "tide: refused a connection from %s: no valid cluster key\n", who);
  fflush(stderr);
  B.failed_logged = total;
  B.failed_at = td_now();
  return k;
}

static void *td__server_main(void *arg) {
  (void)arg;
  while (!atomic_load(&B.stop)) {
    int n = 3 + B.nconns;
    zmq_pollitem_t items[n];
    items[0] = (zmq_pollitem_t){B.router, 0, ZMQ_POLLIN, 0};
    items[1] = (zmq_pollitem_t){B.zap, 0, ZMQ_POLLIN, 0};
    items[2] = (zmq_pollitem_t){B.mon, 0, ZMQ_POLLIN, 0};
    for (int i = 0; i < B.nconns; i++) items[3 + i] = (zmq_pollitem_t){NULL, B.conns[i].fd, ZMQ_POLLIN, 0};
    if (zmq_poll(items, n, 500) < 0 && errno != EINTR) break;
    if (items[1].revents) td__zap_one();
    /* Before the router, so a message's ACCEPTED is read first. */
    while (td__monitor_drain() == 256) {}
    double now = td_now();
    if (items[0].revents) {
      for (;;) {
        zmq_msg_t id, data;
        zmq_msg_init(&id);
        if (zmq_msg_recv(&id, B.router, ZMQ_DONTWAIT) < 0) { zmq_msg_close(&id); break; }
        zmq_msg_init(&data);
        int have = zmq_msg_more(&id) && zmq_msg_recv(&data, B.router, 0) >= 0;
        if (have && B.nhs) {  /* its socket is past the handshake */
          int sfd = zmq_msg_get(&data, ZMQ_SRCFD);
          if (sfd >= 0) td__hs_del(sfd);
        }
        size_t idlen = zmq_msg_size(&id);
        int ci = -1;
        for (int i = 0; i < B.nconns; i++)
          if (B.conns[i].idlen == idlen && !memcmp(B.conns[i].id, zmq_msg_data(&id), idlen)) ci = i;
        if (ci < 0 && idlen <= sizeof(B.conns[0].id)) {
          if (B.nconns == B.capconns) {
            B.capconns = B.capconns ? B.capconns * 2 : 16;
            B.conns = td_xrealloc(B.conns, (size_t)B.capconns * sizeof(td__conn_t));
          }
          td__conn_t *c = &B.conns[B.nconns];
          memcpy(c->id, zmq_msg_data(&id), idlen);
          c->idlen = idlen;
          const char *addr = have ? zmq_msg_gets(&data, "Peer-Address") : NULL;
          if (td__conn_open(c, addr) == 0) ci = B.nconns++;
        }
        if (ci >= 0) {
          B.conns[ci].seen = now;
          if (have && zmq_msg_size(&data) && td__write_all(B.conns[ci].fd, zmq_msg_data(&data), zmq_msg_size(&data)))
            td__conn_close(ci);
        }
        zmq_msg_close(&id);
        zmq_msg_close(&data);
      }
    }
    for (int i = B.nconns - 1; i >= 0; i--) {
      if (i + 3 < n && items[3 + i].revents && items[3 + i].fd == B.conns[i].fd) {
        int rc = td__forward(&B.pool, B.router, B.conns[i].fd, B.conns[i].id, B.conns[i].idlen);
        if (rc > 0) continue;
        if (rc < 0) { td__conn_close(i); continue; }
      }
      if (now - B.conns[i].seen > TD__IDLE_S) td__conn_close(i);  /* the peer is gone */
    }
  }
  return NULL;
}

int td_bridge_server_start(const char *endpoint, const char *unix_sock, const td_cluster_key_t *k) {
  if (strlen(unix_sock) >= sizeof(B.unix_sock)) return TD_EINVAL;
  memcpy(B.unix_sock, unix_sock, strlen(unix_sock) + 1);
  B.key = *k;
  if (!zmq_z85_decode(B.client_pub, k->client_public)) return TD_EINVAL;
  B.ctx = zmq_ctx_new();
  /* The ZAP handler is bound before any CURVE socket. */
  B.zap = zmq_socket(B.ctx, ZMQ_REP);
  if (zmq_bind(B.zap, "inproc://zeromq.zap.01")) {
    int rc = td__zerr();
    zmq_close(B.zap);
    zmq_ctx_term(B.ctx);
    return rc;
  }
  B.router = zmq_socket(B.ctx, ZMQ_ROUTER);
  int one = 1, linger = 0;
  zmq_setsockopt(B.router, ZMQ_CURVE_SERVER, &one, sizeof(one));
  zmq_setsockopt(B.router, ZMQ_CURVE_SECRETKEY, k->server_secret, 40);
  zmq_setsockopt(B.router, ZMQ_LINGER, &linger, sizeof(linger));
  td__no_hwm(B.router);
  int hwm = TD__RCVHWM, hs_ms = TD__HANDSHAKE_MS;
  zmq_setsockopt(B.router, ZMQ_RCVHWM, &hwm, sizeof(hwm));  /* inbound: pauses the peer, drops nothing */
  zmq_setsockopt(B.router, ZMQ_HANDSHAKE_IVL, &hs_ms, sizeof(hs_ms));
  td__limit_size(B.router);
  zmq_setsockopt(B.router, ZMQ_ZAP_DOMAIN, "tide", 4);
  zmq_socket_monitor(B.router, "inproc://tide-bridge-monitor",
                     ZMQ_EVENT_HANDSHAKE_FAILED_NO_DETAIL | ZMQ_EVENT_HANDSHAKE_FAILED_PROTOCOL |
                         ZMQ_EVENT_HANDSHAKE_FAILED_AUTH | ZMQ_EVENT_ACCEPTED | ZMQ_EVENT_DISCONNECTED);
  B.mon = zmq_socket(B.ctx, ZMQ_PAIR);
  td__no_hwm(B.mon);  /* a flood of connections must not drop the events that end them */
  zmq_connect(B.mon, "inproc://tide-bridge-monitor");
  if (zmq_bind(B.router, endpoint)) {
    int rc = td__zerr();
    zmq_close(B.mon);
    zmq_close(B.router);
    zmq_close(B.zap);
    zmq_ctx_term(B.ctx);
    return rc;
  }
  atomic_store(&B.stop, 0);
  td__pool_init(&B.pool);
  int err = pthread_create(&B.th, NULL, td__server_main, NULL);
  if (err) return -err;
  B.running = 1;
  return 0;
}

int td_bridge_server_port(void) {
  char ep[256];
  size_t l = sizeof(ep);
  if (!B.running || zmq_getsockopt(B.router, ZMQ_LAST_ENDPOINT, ep, &l)) return 0;
  const char *colon = strrchr(ep, ':');
  return colon ? atoi(colon + 1) : 0;
}

void td_bridge_server_stop(void) {
  if (!B.running) return;
  atomic_store(&B.stop, 1);
  pthread_join(B.th, NULL);
  while (B.nconns) td__conn_close(0);
  zmq_close(B.mon);
  zmq_close(B.router);
  zmq_close(B.zap);
  zmq_ctx_term(B.ctx);
  td__pool_free(&B.pool);
  B.nhs = 0;
  B.running = 0;
}

/* -- Client side --------------------------------------------------------------- */

struct td_bridge_client {
  void *ctx, *dealer, *mon;
  int fd;            /* our end of the socketpair */
  pthread_t th;
  _Atomic int stop;
  td__pool_t pool;   /* read buffers for the socketpair */
};

/* The link is a byte stream: once its connection is lost, what follows
 * on a new one (ZeroMQ reconnects by itself) would not continue it, and
 * a restarted head would not know it. So after a handshake succeeded, the
 * connection ending (the peer's process died: at once; its machine or the
 * network went silent: after TD__SILENT_S without an answer to ZeroMQ's
 * heartbeats) ends the link: the local end sees the stream end, and the
 * driver says it lost its node, a node rejoins its head (before, a driver
 * waited for ever, even in a get with a timeout). Returns 1 when the link
 * is lost. */
static int td__client_lost(td_bridge_client_t *C, int *up) {
  int lost = 0;
  for (;;) {
    zmq_msg_t e, a;
    zmq_msg_init(&e);
    if (zmq_msg_recv(&e, C->mon, ZMQ_DONTWAIT) < 0) {
      zmq_msg_close(&e);
      break;
    }
    zmq_msg_init(&a);
    if (zmq_msg_more(&e)) zmq_msg_recv(&a, C->mon, 0);
    uint16_t ev = 0;
    if (zmq_msg_size(&e) >= 2) memcpy(&ev, zmq_msg_data(&e), 2);
    if (ev == ZMQ_EVENT_HANDSHAKE_SUCCEEDED) *up = 1;
    if (ev == ZMQ_EVENT_DISCONNECTED && *up) lost = 1;
    zmq_msg_close(&e);
    zmq_msg_close(&a);
  }
  return lost;
}

static void *td__client_main(void *arg) {
  td_bridge_client_t *C = arg;
  double beat = td_now();
  int open = 1, up = 0;
  while (open || !atomic_load(&C->stop)) {
    zmq_pollitem_t items[3] = {
        {C->dealer, 0, ZMQ_POLLIN, 0}, {C->mon, 0, ZMQ_POLLIN, 0}, {NULL, C->fd, ZMQ_POLLIN, 0}};
    int n = open ? 3 : 2;
    if (zmq_poll(items, n, 250) < 0 && errno != EINTR) break;
    int lost = items[1].revents && td__client_lost(C, &up);
    if (items[0].revents || lost) {  /* what came before the loss is delivered first */
      for (;;) {
        zmq_msg_t m;
        zmq_msg_init(&m);
        if (zmq_msg_recv(&m, C->dealer, ZMQ_DONTWAIT) < 0) { zmq_msg_close(&m); break; }
        if (open && zmq_msg_size(&m) && td__write_all(C->fd, zmq_msg_data(&m), zmq_msg_size(&m))) open = 0;
        zmq_msg_close(&m);
      }
    }
    if (open && items[2].revents && td__forward(&C->pool, C->dealer, C->fd, NULL, 0) < 0) open = 0;
    if (lost && open) {
      shutdown(C->fd, SHUT_RDWR);  /* the local end reads the end of the stream */
      open = 0;
    }
    if (td_now() - beat > TD__BEAT_S) {
      zmq_send(C->dealer, "", 0, ZMQ_DONTWAIT);
      beat = td_now();
    }
    if (!open) break;
  }
  return NULL;
}

td_bridge_client_t *td_bridge_open(const char *endpoint, const td_cluster_key_t *k, int *fd) {
  int sv[2];
  if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv)) return NULL;
  td_bridge_client_t *C = td_xcalloc(1, sizeof(*C));
  C->ctx = zmq_ctx_new();
  C->dealer = zmq_socket(C->ctx, ZMQ_DEALER);
  int linger = 2000, ivl = 1000;
  /* A refused handshake is retried once a second, not flooded. */
  zmq_setsockopt(C->dealer, ZMQ_RECONNECT_IVL, &ivl, sizeof(ivl));
  zmq_setsockopt(C->dealer, ZMQ_CURVE_SERVERKEY, k->server_public, 40);
  zmq_setsockopt(C->dealer, ZMQ_CURVE_PUBLICKEY, k->client_public, 40);
  zmq_setsockopt(C->dealer, ZMQ_CURVE_SECRETKEY, k->client_secret, 40);
  zmq_setsockopt(C->dealer, ZMQ_LINGER, &linger, sizeof(linger));
  td__no_hwm(C->dealer);
  td__limit_size(C->dealer);  /* nor does a node or head we join send more */
  /* ZeroMQ's own heartbeats (answered by the peer's I/O thread, however
   * busy the peer is) find a peer gone silent; see td__client_lost. */
  int hb_ivl = (int)(TD__BEAT_S * 1000), hb_timeout = (int)(TD__SILENT_S * 1000);
  zmq_setsockopt(C->dealer, ZMQ_HEARTBEAT_IVL, &hb_ivl, sizeof(hb_ivl));
  zmq_setsockopt(C->dealer, ZMQ_HEARTBEAT_TIMEOUT, &hb_timeout, sizeof(hb_timeout));
  int started = 0;
  td__pool_init(&C->pool);
  C->mon = zmq_socket(C->ctx, ZMQ_PAIR);
  td__no_hwm(C->mon);
  if (zmq_socket_monitor(C->dealer, "inproc://tide-client-monitor",
                         ZMQ_EVENT_HANDSHAKE_SUCCEEDED | ZMQ_EVENT_DISCONNECTED) == 0 &&
      zmq_connect(C->mon, "inproc://tide-client-monitor") == 0 && zmq_connect(C->dealer, endpoint) == 0) {
    /* The first message makes the node's bridge open our connection. */
    zmq_send(C->dealer, "", 0, 0);
    C->fd = sv[1];
    td_sock_bulk(sv[0]);
    td_sock_bulk(sv[1]);
    fcntl(C->fd, F_SETFL, fcntl(C->fd, F_GETFL) | O_NONBLOCK);
    started = pthread_create(&C->th, NULL, td__client_main, C) == 0;
  }
  if (!started) {
    td__pool_free(&C->pool);
    zmq_close(C->mon);
    zmq_close(C->dealer);
    zmq_ctx_term(C->ctx);
    close(sv[0]);
    close(sv[1]);
    free(C);
    return NULL;
  }
  *fd = sv[0];
  return C;
}

void td_bridge_close(td_bridge_client_t *C, int flush) {
  if (!C) return;
  int zero = 0;
  if (!flush) zmq_setsockopt(C->dealer, ZMQ_LINGER, &zero, sizeof(zero));
  /* The caller closed its end: the thread forwards what is left, sees the
   * end of the stream and stops; zmq_close then lingers to deliver it. */
  atomic_store(&C->stop, 1);
  pthread_join(C->th, NULL);
  close(C->fd);
  zmq_close(C->mon);
  zmq_close(C->dealer);
  zmq_ctx_term(C->ctx);
  td__pool_free(&C->pool);
  free(C);
}

/* The link of a node to its head, or of a driver to its node. */
static td_bridge_client_t *td__client;

int td_bridge_client_start(const char *endpoint, const td_cluster_key_t *k, int *fd) {
  td__client = td_bridge_open(endpoint, k, fd);
  return td__client ? 0 : TD_EIO;
}

void td_bridge_client_stop(void) {
  td_bridge_close(td__client, 1);
  td__client = NULL;
}

void td_bridge_client_drop(void) {
  td_bridge_close(td__client, 0);
  td__client = NULL;
}
