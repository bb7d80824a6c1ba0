/* The data plane: chunks of large objects between nodes over direct TCP
 * streams, beside the control links (node_int.h, dplane.h).
 *
 * Why: over a control link every byte went node -> Unix socket -> bridge
 * thread -> ZeroMQ I/O thread -> CURVE (XSalsa20-Poly1305, ~1.6 GB/s a
 * core) -> TCP, and back the same way: objects crossed at 0.11-0.20 of raw
 * TCP (docs/performance.md). Here the node's own loop encrypts from its
 * store extent into a socket, and the fetching node reads into the extent
 * the value will live in and opens it there: records sealed with
 * AES-128-OCB (aead.h; libgcrypt's vector AES, 15-19.5 GB/s a core
 * here, against 4-4.5 for OpenSSL's AES-128-GCM that these streams used
 * before; the 128-bit key is chosen for speed, its security margin what
 * TLS 1.3 uses by default).
 *
 * Streams: every node with a listener tells the other end of each of its
 * links (head <-> node, and a node another node linked to for chunks)
 * its port and a random token for that link (TD_M_DP). The end that
 * fetches over the link opens a stream there as soon as it learns of it
 * (again on the next fetch after one failed), presenting the token: the sender then knows which link the stream
 * serves. Requests (TD_M_CHUNK_GET) stay on the link, marked to be
 * answered on the stream; one fetch's chunks all come one way, so they
 * land in order.
 *
 * Handshake: both ends prove they hold the cluster key (a secret derived
 * from it, never sent) with HMAC-SHA256 over both ends' fresh random
 * nonces; the stream's keys, one per direction, are derived from the
 * secret and the whole handshake. Records: u32 length, u8 type, 3 zero
 * bytes (authenticated as AAD), the payload, a 16-byte OCB tag; the
 * nonce is the record's number on the stream (never reused: keys are
 * fresh per stream). Plain mode sends payloads in the clear with a GMAC
 * tag over them. A record that fails authentication closes the stream:
 * its chunk never counts, and the fetch goes on from where it had got to
 * over the control link (as it does when a stream cannot be opened or
 * closes); so do the fetches of a peer that has no data plane. */
#include "dplane.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

#include "aead.h"
#include "crypto.h"
#include "node_int.h"

#define TD__DP_REC (256u << 10)   /* payload bytes of one record */
#define TD__DP_OUT (1u << 20)     /* ciphertext made ahead of the socket, at most */
#define TD__DP_HS_MAX 32          /* streams in their handshake, in all */
#define TD__DP_HS_S 5.0           /* seconds a handshake may take */
#define TD__DP_RETRY_S 10.0       /* after a stream failed: fetches go over the link this long */
#define TD__DP_MAGIC "TDP2"       /* 2: AES-128-OCB records (1: AES-128-GCM) */

enum { R_READY = 1, R_HEAD, R_DATA };                     /* record types */
enum { S_CONNECTING, S_HS1, S_HS2, S_HS3, S_WAITREADY, S_UP }; /* stream states */

/* A chunk to send on a stream, made into records as the socket takes them. */
typedef struct td__dpq {
  uint64_t id, off;
  uint32_t len, done;   /* done: payload bytes sent */
  uint8_t head_sent;
} td__dpq_t;

typedef struct td__dps {
  int fd;
  int out_side;         /* 1: we send chunks (we accepted it); 0: we fetch */
  int state;            /* S_* */
  uint64_t wk;          /* the link it serves */
  double since;
  char host[64];
  uint8_t hs[160];      /* handshake bytes so far (both messages, in order) */
  uint32_t hlen, hwant;
  td_aead_t tx, rx;
  /* Sending: */
  td_buf_t out;
  size_t out_off;
  td__dpq_t *q;
  uint32_t nq, qh, capq;
  int want_out;         /* EPOLLOUT registered */
  /* Receiving: the record being read. */
  int rpart;            /* 0 header, 1 payload, 2 tag */
  uint8_t rhdr[8], rtag[16], rsmall[32];
  uint32_t rhave, rlen, rtagn; /* bytes of header or payload read, payload bytes, tag bytes read */
  uint8_t rtype;
  uint64_t sink_id, sink_off;  /* the chunk being received */
  uint32_t sink_len, sink_done;
  /* The record's payload is opened in whole 16-byte blocks as it lands
   * (OCB's unit), up to ropen; the bytes of a partial block after it wait
   * in place, a copy in rcarry, for the block's next bytes. rbase: where
   * the payload's first byte went (its store extent, rsmall, or scratch). */
  uint32_t ropen, rcn; /* rcn: bytes in rcarry */
  uint8_t rcarry[16], *rbase;
  uint8_t *scratch; /* payload of chunks nobody wants any more (TD__DP_REC) */
  uint32_t moved;   /* tests: bytes before this one stayed in the store (0: none moved) */
} td__dps_t;

/* What this node knows of a link: its own token for it, and the other
 * end's listener (when it has one), and the stream to it. */
typedef struct td__dplink {
  uint64_t wk;
  uint8_t mine[16];     /* streams presenting this serve the link */
  int sent;             /* mine was sent */
  char host[64];
  uint16_t port;        /* 0: the other end has no data plane */
  uint8_t theirs[16];
  uint8_t mode;
  td__dps_t *in;        /* our stream to fetch over */
  double retry_at;      /* no new stream before then */
} td__dplink_t;

struct td_dp {
  int mode;
  int lfd, efd;
  int port;
  char head_host[64];
  uint8_t secret[32];
  td__dps_t **s;
  int ns, caps;
  td__dplink_t *l;
  int nl, capl;
  uint64_t refused, refused_logged, auth_failed;
  double refused_at;
  int tamper;           /* TIDE_DP_TAMPER (tests): flip a byte of that data record sent */
  /* TIDE_DP_MOVE (tests): the first data record from this one on that lands
   * in pieces moves to scratch mid-way, as if its chunk had gone (0: none). */
  int move;
  uint64_t data_got; /* data records received whole */
  uint64_t data_sent;
};

int td_dp_mode_parse(const char *s) {
  if (!s || !strcmp(s, "on") || !strcmp(s, "aes-gcm")) return s ? TD_DP_ON : -1;
  if (!strcmp(s, "plain")) return TD_DP_PLAIN;
  if (!strcmp(s, "off")) return TD_DP_OFF;
  return -1;
}

static const char *td__dp_mode_name(int m) {
  return m == TD_DP_PLAIN ? "plain (GMAC, not encrypted)" : "AES-128-OCB";
}

static td_wk_t *td__dp_wk(td_node_t *n, uint64_t id) {
  for (int i = 0; i < n->procs.n; i++)
    if (n->procs.list[i]->id == id && !n->procs.list[i]->dead) return n->procs.list[i];
  return NULL;
}

static td__dplink_t *td__dp_link(td_node_t *n, uint64_t wk, int make) {
  struct td_dp *d = n->xfer.dp;
  for (int i = 0; i < d->nl; i++)
    if (d->l[i].wk == wk) return &d->l[i];
  if (!make) return NULL;
  if (d->nl == d->capl) {
    d->capl = d->capl ? d->capl * 2 : 8;
    d->l = td_xrealloc(d->l, (size_t)d->capl * sizeof(td__dplink_t));
  }
  td__dplink_t *l = &d->l[d->nl++];
  memset(l, 0, sizeof(*l));
  l->wk = wk;
  RAND_bytes(l->mine, sizeof(l->mine));
  return l;
}

/* -- Streams ---------------------------------------------------------------- */

static void td__dps_watch(struct td_dp *d, td__dps_t *s, int out) {
  struct epoll_event ev = {.events = EPOLLIN | (out ? EPOLLOUT : 0), .data.ptr = s};
  epoll_ctl(d->efd, EPOLL_CTL_MOD, s->fd, &ev);
  s->want_out = out;
}

static td__dps_t *td__dps_new(td_node_t *n, int fd, int out_side, const char *host) {
  struct td_dp *d = n->xfer.dp;
  td__dps_t *s = td_xcalloc(1, sizeof(*s));
  s->fd = fd;
  s->out_side = out_side;
  s->since = td_now();
  snprintf(s->host, sizeof(s->host), "%s", host);
  td_buf_init(&s->out);
  fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
  td_sock_bulk(fd);
  int one = 1;
  setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
  struct epoll_event ev = {.events = EPOLLIN, .data.ptr = s};
  epoll_ctl(d->efd, EPOLL_CTL_ADD, fd, &ev);
  if (d->ns == d->caps) {
    d->caps = d->caps ? d->caps * 2 : 8;
    d->s = td_xrealloc(d->s, (size_t)d->caps * sizeof(*d->s));
  }
  d->s[d->ns++] = s;
  return s;
}

/* Closes stream s. A stream we fetched over: the fetches it carried go on
 * from where they had got to, over the link, and no new stream is opened
 * for a while when it failed (why: what happened, logged). */
static void td__dps_close(td_node_t *n, td__dps_t *s, const char *why) {
  struct td_dp *d = n->xfer.dp;
  for (int i = 0; i < d->ns; i++)
    if (d->s[i] == s) { d->s[i] = d->s[--d->ns]; break; }
  epoll_ctl(d->efd, EPOLL_CTL_DEL, s->fd, NULL);
  close(s->fd);
  td__dplink_t *l = td__dp_link(n, s->wk, 0);
  if (l && l->in == s) {
    l->in = NULL;
    if (why) l->retry_at = td_now() + TD__DP_RETRY_S;
  }
  if (why) {
    fprintf(stderr, "tide: data plane: closed the stream %s %s: %s\n", s->out_side ? "from" : "to", s->host, why);
    fflush(stderr);
  }
  td_wk_t *wk = !s->out_side && s->state == S_UP ? td__dp_wk(n, s->wk) : NULL;
  if (wk) {
    size_t it = 0;
    uint64_t id;
    td_obj_t *o;
    while (td_map_next(&n->objs.map, &it, &id, (void **)&o)) {
      if (!o->dp || o->src != wk->id || !o->chunked || o->state != OBJ_PENDING) continue;
      o->dp = 0;
      o->asked = o->got;  /* what had not landed is asked for again, over the link */
      td__chunk_more(n, o, wk);
    }
    td_chan_flush(&wk->ch);
  }
  td_aead_free(&s->tx);
  td_aead_free(&s->rx);
  free(s->scratch);
  td_buf_free(&s->out);
  free(s->q);
  free(s);
}

/* Writes what the socket takes. 0, or -1 when the stream is broken. */
static int td__dps_flush(td__dps_t *s) {
  while (s->out_off < s->out.len) {
    ssize_t w = send(s->fd, s->out.p + s->out_off, s->out.len - s->out_off, MSG_NOSIGNAL);
    if (w > 0) { s->out_off += (size_t)w; continue; }
    if (w < 0 && errno == EINTR) continue;
    if (w < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) return 0;
    return -1;
  }
  s->out.len = s->out_off = 0;
  return 0;
}

/* Appends one record of len payload bytes from p (NULL: none) to s->out. */
static void td__rec_put(td__dps_t *s, uint8_t type, const uint8_t *p, uint32_t len) {
  /* The buffer is moved down only when that is cheap against what was
   * sent from it (the bytes left are few), so it neither creeps nor costs
   * a copy of its own. */
  size_t left = s->out.len - s->out_off;
  if (s->out_off && (s->out_off >= 8 * left || s->out_off > (16u << 20))) {
    memmove(s->out.p, s->out.p + s->out_off, left);
    s->out.len = left;
    s->out_off = 0;
  }
  uint8_t hdr[8] = {0};
  memcpy(hdr, &len, 4);
  hdr[4] = type;
  td_buf_reserve(&s->out, 8 + (size_t)len + 16);
  uint8_t *at = s->out.p + s->out.len;
  memcpy(at, hdr, 8);
  td_aead_begin(&s->tx, hdr, 8);
  size_t w = td_aead_update(&s->tx, at + 8, p, len, 1);
  td_aead_end(&s->tx, at + 8 + w, at + 8 + len);
  s->out.len += 8 + (size_t)len + 16;
}

/* Makes the queued chunks into records while the socket takes them. */
static void td__dps_pump(td_node_t *n, td__dps_t *s) {
  struct td_dp *d = n->xfer.dp;
  if (s->state != S_UP) return;
  for (int rounds = 0; rounds < 64; rounds++) {
    while (s->out.len - s->out_off < TD__DP_OUT && s->qh < s->nq) {
      td__dpq_t *c = &s->q[s->qh];
      if (!c->head_sent) {
        /* The whole chunk must be here; else it is sent as gone (no bytes). */
        const uint8_t *src = td__chunk_src(n, c->id, c->off, c->len);
        if (!src) c->len = 0;
        uint8_t h[20];
        memcpy(h, &c->id, 8);
        memcpy(h + 8, &c->off, 8);
        memcpy(h + 16, &c->len, 4);
        td__rec_put(s, R_HEAD, h, 20);
        c->head_sent = 1;
      }
      if (c->done < c->len) {
        uint32_t k = c->len - c->done < TD__DP_REC ? c->len - c->done : TD__DP_REC;
        /* Looked up again for every record: the value may have gone. */
        const uint8_t *src = td__chunk_src(n, c->id, c->off + c->done, k);
        if (!src) {
          td__dps_close(n, s, "a value being sent went away");
          return;
        }
        size_t at = s->out.len;
        td__rec_put(s, R_DATA, src, k);
        if (d->tamper && ++d->data_sent == (uint64_t)d->tamper) {
          s->out.p[at + 8 + k / 2] ^= 0x20;  /* a byte changed in flight (tests) */
          fprintf(stderr, "tide: data plane: TIDE_DP_TAMPER changed a byte of data record %d sent\n", d->tamper);
        }
        c->done += k;
        n->xfer.bytes_sent += k;
      }
      if (c->done >= c->len) s->qh++;
    }
    if (s->qh == s->nq) s->qh = s->nq = 0;
    if (td__dps_flush(s)) {
      td__dps_close(n, s, "the other end closed it");
      return;
    }
    if (s->out.len > s->out_off || s->qh == s->nq) break;  /* the socket is full, or all is sent */
  }
  int pending = s->out.len > s->out_off || s->qh < s->nq;
  if (pending != s->want_out) td__dps_watch(d, s, pending);
}

/* -- Handshake ---------------------------------------------------------------
 * 1 fetcher -> sender: "TDP1", u8 mode, nonce[32], token[16]        (53)
 * 2 sender -> fetcher: "TDP1", u8 mode, nonce[32], HMAC("server", 1 | 2 so far) (69)
 * 3 fetcher -> sender: HMAC("client", 1 | 2)                       (32)
 * 4 sender -> fetcher: a READY record under the new keys.
 * Keys: HMAC(secret, "s2c" | 1 | 2) and HMAC(secret, "c2s" | 1 | 2). */
#define TD__HS1 53
#define TD__HS2 69

static int td__hs_read(td__dps_t *s) {
  while (s->hlen < s->hwant) {
    ssize_t r = read(s->fd, s->hs + s->hlen, s->hwant - s->hlen);
    if (r > 0) { s->hlen += (uint32_t)r; continue; }
    if (r < 0 && errno == EINTR) continue;
    if (r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) return 0;
    return -1;
  }
  return 1;
}

static int td__hs_write(td__dps_t *s, const uint8_t *p, size_t len) {
  ssize_t w = send(s->fd, p, len, MSG_NOSIGNAL);
  return w == (ssize_t)len ? 0 : -1;  /* a few bytes on a fresh socket: taken whole */
}

static void td__dp_refused(td_node_t *n, td__dps_t *s, const char *why) {
  struct td_dp *d = n->xfer.dp;
  d->refused++;
  double now = td_now();
  if (now - d->refused_at >= 1) {
    uint64_t more = d->refused - d->refused_logged - 1;
    fprintf(stderr, "tide: data plane: refused a stream from %s: %s", s->host, why);
    if (more) fprintf(stderr, " (%llu more since the last line)", (unsigned long long)more);
    fprintf(stderr, "\n");
    fflush(stderr);
    d->refused_logged = d->refused;
    d->refused_at = now;
  }
  td__dps_close(n, s, NULL);
}

static void td__dps_keys(struct td_dp *d, td__dps_t *s) {
  int plain = d->mode == TD_DP_PLAIN;
  td_aead_keyed(&s->tx, plain, 1, d->secret, s->out_side ? "s2c" : "c2s", s->hs, TD__HS1 + TD__HS2);
  td_aead_keyed(&s->rx, plain, 0, d->secret, s->out_side ? "c2s" : "s2c", s->hs, TD__HS1 + TD__HS2);
}

/* The sender's side of a handshake, as its bytes come. */
static void td__hs_server(td_node_t *n, td__dps_t *s) {
  struct td_dp *d = n->xfer.dp;
  int r = td__hs_read(s);
  if (r < 0) { td__dp_refused(n, s, "it closed during the handshake"); return; }
  if (r == 0) return;
  if (s->state == S_HS1) {
    if (memcmp(s->hs, TD__DP_MAGIC, 4)) { td__dp_refused(n, s, "not a Tide data-plane stream"); return; }
    if (s->hs[4] != d->mode) { td__dp_refused(n, s, "its --data-plane mode differs from this node's"); return; }
    td__dplink_t *l = NULL;
    for (int i = 0; i < d->nl && !l; i++)
      if (d->l[i].sent && !memcmp(d->l[i].mine, s->hs + 37, 16)) l = &d->l[i];
    if (!l || !td__dp_wk(n, l->wk)) { td__dp_refused(n, s, "no link of this node has its token"); return; }
    s->wk = l->wk;
    uint8_t *m = s->hs + TD__HS1;
    memcpy(m, TD__DP_MAGIC, 4);
    m[4] = (uint8_t)d->mode;
    RAND_bytes(m + 5, 32);
    td_aead_hmac(d->secret, "server", s->hs, TD__HS1 + 37, m + 37);
    if (td__hs_write(s, m, TD__HS2)) { td__dp_refused(n, s, "it closed during the handshake"); return; }
    s->state = S_HS3;
    s->hlen = TD__HS1 + TD__HS2;
    s->hwant = s->hlen + 32;
    return;
  }
  uint8_t mac[32];
  td_aead_hmac(d->secret, "client", s->hs, TD__HS1 + TD__HS2, mac);
  if (CRYPTO_memcmp(mac, s->hs + TD__HS1 + TD__HS2, 32)) {
    td__dp_refused(n, s, "it does not hold the cluster key");
    return;
  }
  td__dps_keys(d, s);
  /* A stream that serves the link already is replaced. */
  for (int i = 0; i < d->ns; i++)
    if (d->s[i] != s && d->s[i]->out_side && d->s[i]->wk == s->wk) {
      td__dps_close(n, d->s[i], NULL);
      break;
    }
  s->state = S_UP;
  td__rec_put(s, R_READY, NULL, 0);
  if (td__dps_flush(s)) { td__dps_close(n, s, "the other end closed it"); return; }
  td_log("data plane: stream from %s up", s->host);
}

/* -- Receiving ---------------------------------------------------------------- */

/* The object the chunk being received is for, if it still wants it. */
static td_obj_t *td__dp_sink(td_node_t *n, td__dps_t *s, td_wk_t *wk) {
  td_obj_t *o = td__obj(n, s->sink_id);
  if (!o || !o->chunked || o->state != OBJ_PENDING || !wk || o->src != wk->id) return NULL;
  return s->sink_off < o->len && s->sink_len <= o->len - s->sink_off ? o : NULL;
}

/* A record's payload: where its next bytes go, and how many. */
static uint8_t *td__dp_dst(td_node_t *n, td__dps_t *s, td_wk_t *wk, uint32_t *room) {
  *room = s->rlen - s->rhave;
  if (s->rtype != R_DATA) return s->rsmall + s->rhave;
  td_obj_t *o = s->moved ? NULL : td__dp_sink(n, s, wk);
  if (o) return td_store_base(n->objs.store) + o->off + s->sink_off + s->sink_done + s->rhave;
  if (!s->scratch) s->scratch = td_xmalloc(TD__DP_REC);
  return s->scratch + s->rhave; /* rlen <= TD__DP_REC */
}

/* Tests (TIDE_DP_MOVE): the record's bytes that went to scratch, opened,
 * back where its chunk wants them. */
static void td__dp_moved_back(td_node_t *n, td__dps_t *s, td_wk_t *wk) {
  uint32_t at = s->moved;
  s->moved = 0;
  s->rhave = 0;
  uint32_t room;
  uint8_t *dst = td__dp_dst(n, s, wk, &room);
  if (dst != s->scratch) memcpy(dst + at, s->scratch + at, s->rlen - at);
  fprintf(stderr, "tide: data plane: TIDE_DP_MOVE opened data record %llu from byte %u in scratch\n",
          (unsigned long long)n->xfer.dp->data_got, at);
}

/* Opens the payload's whole blocks landed so far (all of it, last: the
 * tag has come), at base, where its first byte lands now: a record whose
 * chunk went away mid-way goes on in scratch, its partial block carried
 * over. 0, or -1 when the record is not authentic. */
static int td__dp_open(td__dps_t *s, uint8_t *base, int last) {
  if (base != s->rbase) {
    memcpy(base + s->ropen, s->rcarry, s->rcn);
    s->rbase = base;
  }
  uint32_t upto = last ? s->rhave : s->rhave & ~15u;
  uint8_t *at = base + s->ropen;
  size_t w = upto > s->ropen || last ? td_aead_update(&s->rx, at, at, upto - s->ropen, last) : 0;
  s->ropen = upto;
  s->rcn = s->rhave - upto;
  memcpy(s->rcarry, base + upto, s->rcn);
  return last ? td_aead_end(&s->rx, at + w, s->rtag) : 0;
}

/* A record has come whole and authentic. 0, or -1: the stream is broken. */
static int td__dp_record(td_node_t *n, td__dps_t *s, td_wk_t *wk) {
  if (s->rtype == R_READY) {
    if (s->state != S_WAITREADY) return -1;
    s->state = S_UP;
    fprintf(stderr, "tide: data plane: stream to %s up (%s%s)\n", s->host, td__dp_mode_name(n->xfer.dp->mode),
            s->rx.plain ? ""
            : s->rx.gh  ? ", libgcrypt"
                        : ", OpenSSL");
    fflush(stderr);
    return 0;
  }
  if (s->state != S_UP || !wk) return -1;
  if (s->rtype == R_HEAD) {
    if (s->rlen != 20 || s->sink_done < s->sink_len) return -1;
    uint64_t id, off;
    uint32_t len;
    memcpy(&id, s->rsmall, 8);
    memcpy(&off, s->rsmall + 8, 8);
    memcpy(&len, s->rsmall + 16, 4);
    if (len > TD_CHUNK) return -1;
    s->sink_id = id, s->sink_off = off, s->sink_len = len, s->sink_done = 0;
    /* Checks it, and handles a sender that no longer has it (len 0). */
    if (!td__chunk_obj(n, wk, id, off, len)) s->sink_id = 0;
    return 0;
  }
  if (s->rtype != R_DATA || s->rlen > s->sink_len - s->sink_done) return -1;
  s->sink_done += s->rlen;
  if (s->sink_done == s->sink_len) {
    td_obj_t *o = td__dp_sink(n, s, wk);
    if (o) td__chunk_landed(n, wk, o, s->sink_len);
  }
  return 0;
}

/* Reads records while the socket has them (at most a few MiB, so the
 * loop goes on to other links too). 0, or -1 when s was closed. */
static int td__dp_read(td_node_t *n, td__dps_t *s) {
  struct td_dp *d = n->xfer.dp;
  size_t budget = 16u << 20;
  while (budget) {
    td_wk_t *wk = td__dp_wk(n, s->wk);
    uint8_t *dst;
    uint32_t room;
    if (s->rpart == 0) dst = s->rhdr + s->rhave, room = 8 - s->rhave;
    else if (s->rpart == 1) dst = td__dp_dst(n, s, wk, &room);
    else dst = s->rtag + s->rtagn, room = 16 - s->rtagn;
    ssize_t r = room ? read(s->fd, dst, room) : 0;
    if (room && r <= 0) {
      if (r < 0 && errno == EINTR) continue;
      if (r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) return 0;
      td__dps_close(n, s, r == 0 ? "the other end closed it" : strerror(errno));
      return -1;
    }
    budget = (size_t)r < budget ? budget - (size_t)r : 0;
    if (s->rpart == 0) {
      s->rhave += (uint32_t)r;
      if (s->rhave < 8) continue;
      memcpy(&s->rlen, s->rhdr, 4);
      s->rtype = s->rhdr[4];
      if (s->rtype < R_READY || s->rtype > R_DATA || s->rhdr[5] || s->rhdr[6] || s->rhdr[7] ||
          s->rlen > (s->rtype == R_DATA ? TD__DP_REC : (uint32_t)sizeof(s->rsmall))) {
        td__dps_close(n, s, "a malformed record");
        return -1;
      }
      if (s->rtype == R_DATA && s->rlen > s->sink_len - s->sink_done) {  /* beyond its chunk */
        td__dps_close(n, s, "a record longer than its chunk");
        return -1;
      }
      td_aead_begin(&s->rx, s->rhdr, 8);
      s->rpart = 1;
      s->rhave = s->ropen = s->rcn = 0;
      s->rbase = NULL;
      s->rtagn = 0;
      if (!s->rlen) s->rpart = 2; /* no payload: its tag next */
      continue;
    }
    if (s->rpart == 1) {
      /* Opened in place as it lands, while in cache; it counts only once
       * its tag is checked. */
      uint8_t *base = dst - s->rhave;
      s->rhave += (uint32_t)r;
      td__dp_open(s, base, 0);
      if (s->rhave == s->rlen) s->rpart = 2;
      else if (d->move && s->rtype == R_DATA && d->data_got + 1 >= (uint64_t)d->move && s->ropen && s->rcn)
        s->moved = s->ropen, d->move = 0; /* tests: as if its chunk went away, a partial block pending */
      continue;
    }
    s->rtagn += (uint32_t)r;
    if (s->rtagn < 16) continue;
    if (td__dp_open(s, td__dp_dst(n, s, wk, &room) - s->rhave, 1)) {
      d->auth_failed++;
      td__dps_close(n, s, "a record failed authentication (changed in flight, or not from a cluster member); "
                          "what it carried is fetched again over the control link");
      return -1;
    }
    s->rpart = 0;
    s->rhave = 0;
    if (s->rtype == R_DATA) d->data_got++;
    if (s->moved) td__dp_moved_back(n, s, wk);
    if (td__dp_record(n, s, wk)) {
      td__dps_close(n, s, "an unexpected record");
      return -1;
    }
  }
  return 0;
}

/* The fetcher's side of a handshake, as its bytes come. */
static void td__hs_client(td_node_t *n, td__dps_t *s) {
  struct td_dp *d = n->xfer.dp;
  if (s->state == S_CONNECTING) {
    int err = 0;
    socklen_t el = sizeof(err);
    getsockopt(s->fd, SOL_SOCKET, SO_ERROR, &err, &el);
    if (err) { td__dps_close(n, s, strerror(err)); return; }
    if (td__hs_write(s, s->hs, TD__HS1)) { td__dps_close(n, s, "it closed during the handshake"); return; }
    s->state = S_HS2;
    s->hlen = TD__HS1;
    s->hwant = TD__HS1 + TD__HS2;
    td__dps_watch(d, s, 0);
    return;
  }
  if (s->state == S_HS2) {
    int r = td__hs_read(s);
    if (r < 0) { td__dps_close(n, s, "it closed during the handshake (a --data-plane mode or cluster key that differs?)"); return; }
    if (r == 0) return;
    uint8_t mac[32];
    td_aead_hmac(d->secret, "server", s->hs, TD__HS1 + 37, mac);
    if (memcmp(s->hs + TD__HS1, TD__DP_MAGIC, 4) || s->hs[TD__HS1 + 4] != d->mode ||
        CRYPTO_memcmp(mac, s->hs + TD__HS1 + 37, 32)) {
      td__dps_close(n, s, "it does not hold the cluster key, or runs another --data-plane mode");
      return;
    }
    td_aead_hmac(d->secret, "client", s->hs, TD__HS1 + TD__HS2, mac);
    if (td__hs_write(s, mac, 32)) { td__dps_close(n, s, "it closed during the handshake"); return; }
    td__dps_keys(d, s);
    s->state = S_WAITREADY;
  }
  td__dp_read(n, s);
}

/* -- The node's side ------------------------------------------------------------ */

int td_node_set_dplane(td_node_t *n, int mode, const char *bind_host, const char *head_host, const char *key_text) {
  if (mode == TD_DP_OFF || n->xfer.dp) return 0;
  if (td_crypto_load()) {
    fprintf(stderr, "tide: data plane off: %s\n", td_crypto_error());
    errno = ENOENT;
    return -1;
  }
  struct td_dp *d = td_xcalloc(1, sizeof(*d));
  d->mode = mode;
  d->lfd = d->efd = -1;
  /* The head's address as a number, found once here: streams are opened
   * from the node's loop, which must not wait on a name lookup. */
  snprintf(d->head_host, sizeof(d->head_host), "%s", head_host ? head_host : "");
  struct addrinfo hh = {0}, *hai = NULL;
  hh.ai_socktype = SOCK_STREAM;
  if (head_host && head_host[0] && getaddrinfo(head_host, NULL, &hh, &hai) == 0) {
    getnameinfo(hai->ai_addr, hai->ai_addrlen, d->head_host, sizeof(d->head_host), NULL, 0, NI_NUMERICHOST);
    freeaddrinfo(hai);
  }
  SHA256((const uint8_t *)key_text, strlen(key_text), d->secret);
  td_aead_hmac(d->secret, "tide data plane v1", (const uint8_t *)"", 0, d->secret);
  /* Tests: a node that derives another secret (as one with another key would). */
  const char *ts = getenv("TIDE_DP_TEST_SECRET");
  if (ts) td_aead_hmac(d->secret, ts, (const uint8_t *)"", 0, d->secret);
  const char *t = getenv("TIDE_DP_TAMPER");
  d->tamper = t ? atoi(t) : 0;
  d->move = getenv("TIDE_DP_MOVE") ? atoi(getenv("TIDE_DP_MOVE")) : 0;
  struct addrinfo hints = {0}, *ai = NULL;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_PASSIVE;
  int err = 0;
  if (getaddrinfo(bind_host, "0", &hints, &ai) != 0) {
    free(d);
    errno = EINVAL;
    return -1;
  }
  d->lfd = socket(ai->ai_family, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
  if (d->lfd < 0 || bind(d->lfd, ai->ai_addr, ai->ai_addrlen) || listen(d->lfd, 64)) err = errno;
  freeaddrinfo(ai);
  struct sockaddr_storage ss;
  socklen_t sl = sizeof(ss);
  if (!err && getsockname(d->lfd, (struct sockaddr *)&ss, &sl) == 0)
    d->port = ntohs(ss.ss_family == AF_INET6 ? ((struct sockaddr_in6 *)&ss)->sin6_port
                                             : ((struct sockaddr_in *)&ss)->sin_port);
  d->efd = epoll_create1(EPOLL_CLOEXEC);
  if (err || d->efd < 0) {
    if (d->lfd >= 0) close(d->lfd);
    if (d->efd >= 0) close(d->efd);
    free(d);
    errno = err ? err : EMFILE;
    return -1;
  }
  struct epoll_event ev = {.events = EPOLLIN, .data.ptr = NULL};
  epoll_ctl(d->efd, EPOLL_CTL_ADD, d->lfd, &ev);
  n->xfer.dp = d;
  /* Links made before: their other ends learn of it now. */
  for (int i = 0; i < n->procs.n; i++)
    if (n->procs.list[i]->kind >= WK_NODE && !n->procs.list[i]->dead && n->procs.list[i]->ch.fd >= 0)
      td__dp_advertise(n, n->procs.list[i]);
  return 0;
}

int td_node_dplane_port(td_node_t *n) { return n->xfer.dp ? n->xfer.dp->port : 0; }

int td__dp_fd(td_node_t *n) { return n->xfer.dp ? n->xfer.dp->efd : -1; }

/* Tells the other end of wk where to open streams to fetch from this node. */
void td__dp_advertise(td_node_t *n, td_wk_t *wk) {
  if (!n->xfer.dp) return;
  td__dplink_t *l = td__dp_link(n, wk->id, 1);
  l->sent = 1;
  td_chan_begin(&wk->ch, TD_M_DP);
  td_buf_u32(&wk->ch.out, (uint32_t)n->xfer.dp->port);
  td_buf_str(&wk->ch.out, l->mine, 16);
  td_buf_u8(&wk->ch.out, (uint8_t)n->xfer.dp->mode);
  td_chan_end(&wk->ch);
}

/* The other end of wk has a data plane: u32 port, str token, u8 mode. */
int td__on_dp(td_node_t *n, td_wk_t *wk, td_rd_t *rd) {
  uint32_t port = td_rd_u32(rd), tl;
  const uint8_t *tok = td_rd_str(rd, &tl);
  uint8_t mode = td_rd_u8(rd);
  if (rd->bad || port == 0 || port > 65535 || tl != 16 || (mode != TD_DP_ON && mode != TD_DP_PLAIN))
    return TD_EPROTO;
  if (!n->xfer.dp) { /* this node fetches over the link */
    fprintf(stderr,
            "tide: data plane: %s%u has one, this node runs --data-plane off: chunks go over the link\n",
            wk->kind == WK_HEAD ? "the head, node-" : "node-", wk->node_index);
    return 0;
  }
  if (mode != n->xfer.dp->mode) {
    fprintf(stderr, "tide: data plane: %s%u runs --data-plane %s, this node %s: chunks go over the link\n",
            wk->kind == WK_HEAD ? "the head, node-" : "node-", wk->node_index,
            mode == TD_DP_PLAIN ? "plain" : "on", n->xfer.dp->mode == TD_DP_PLAIN ? "plain" : "on");
    return 0;
  }
  /* Where the other end is: the address its link came from, the host in
   * the endpoint this node opened it to, or this node's head. */
  char host[64] = "";
  if (wk->kind == WK_HEAD) snprintf(host, sizeof(host), "%s", n->xfer.dp->head_host);
  else if (wk->kind == WK_PEER && !strncmp(wk->name, "tcp://", 6)) {
    const char *h = wk->name + 6, *c = strrchr(h, ':');
    if (*h == '[') h++;
    size_t hl = c ? (size_t)(c - h) : 0;
    if (hl && h[hl - 1] == ']') hl--;
    if (hl < sizeof(host)) snprintf(host, sizeof(host), "%.*s", (int)hl, h);
  } else snprintf(host, sizeof(host), "%s", wk->peer_host);
  if (!host[0]) return 0;
  td__dplink_t *l = td__dp_link(n, wk->id, 1);
  snprintf(l->host, sizeof(l->host), "%s", host);
  l->port = (uint16_t)port;
  memcpy(l->theirs, tok, 16);
  l->mode = mode;
  /* Opened now, with the link, so that the link's first fetch can use it
   * too (a stream is an idle socket until then). */
  td__dp_ready(n, wk);
  return 0;
}

/* 1 if chunks asked for over wk can come on a stream now; else 0, and a
 * stream is opened if it can be (the next fetch uses it). */
int td__dp_ready(td_node_t *n, td_wk_t *wk) {
  struct td_dp *d = n->xfer.dp;
  if (!d || !wk) return 0;
  td__dplink_t *l = td__dp_link(n, wk->id, 0);
  if (!l || !l->port) return 0;
  if (l->in) return l->in->state == S_UP;
  if (td_now() < l->retry_at) return 0;
  struct addrinfo hints = {0}, *ai = NULL;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_NUMERICHOST;
  char port[8];
  snprintf(port, sizeof(port), "%u", l->port);
  l->retry_at = td_now() + TD__DP_RETRY_S;
  if (getaddrinfo(l->host, port, &hints, &ai) != 0) return 0;
  int fd = socket(ai->ai_family, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
  int rc = fd < 0 ? -1 : connect(fd, ai->ai_addr, ai->ai_addrlen);
  freeaddrinfo(ai);
  if (fd < 0 || (rc && errno != EINPROGRESS)) {
    if (fd >= 0) close(fd);
    return 0;
  }
  char who[96];
  snprintf(who, sizeof(who), "%s:%u", l->host, l->port);
  td__dps_t *s = td__dps_new(n, fd, 0, who);
  s->wk = wk->id;
  s->state = S_CONNECTING;
  memcpy(s->hs, TD__DP_MAGIC, 4);
  s->hs[4] = (uint8_t)d->mode;
  RAND_bytes(s->hs + 5, 32);
  memcpy(s->hs + 37, l->theirs, 16);
  td__dps_watch(d, s, 1);
  l->in = s;
  return 0;
}

/* Sends the chunk asked for over wk on the stream that serves wk. With
 * none (it failed), nothing: the fetcher sees its stream end, and asks
 * again over the link. */
void td__dp_send(td_node_t *n, td_wk_t *wk, uint64_t id, uint64_t off, uint32_t len) {
  struct td_dp *d = n->xfer.dp;
  td__dps_t *s = NULL;
  for (int i = 0; d && i < d->ns && !s; i++)
    if (d->s[i]->out_side && d->s[i]->wk == wk->id && d->s[i]->state == S_UP) s = d->s[i];
  if (!s || len > TD_CHUNK) return;
  if (s->nq == s->capq) {
    s->capq = s->capq ? s->capq * 2 : 16;
    s->q = td_xrealloc(s->q, s->capq * sizeof(td__dpq_t));
  }
  s->q[s->nq++] = (td__dpq_t){id, off, len, 0, 0};
  td__dps_pump(n, s);
}

static void td__dp_accept(td_node_t *n) {
  struct td_dp *d = n->xfer.dp;
  for (int k = 0; k < 64; k++) {
    struct sockaddr_storage ss;
    socklen_t sl = sizeof(ss);
    int fd = accept4(d->lfd, (struct sockaddr *)&ss, &sl, SOCK_CLOEXEC | SOCK_NONBLOCK);
    if (fd < 0) return;
    char host[64] = "?";
    if (ss.ss_family == AF_INET) inet_ntop(AF_INET, &((struct sockaddr_in *)&ss)->sin_addr, host, sizeof(host));
    else if (ss.ss_family == AF_INET6) inet_ntop(AF_INET6, &((struct sockaddr_in6 *)&ss)->sin6_addr, host, sizeof(host));
    int hs = 0;
    for (int i = 0; i < d->ns; i++) hs += d->s[i]->state != S_UP;
    td__dps_t *s = td__dps_new(n, fd, 1, host);
    s->state = S_HS1;
    s->hwant = TD__HS1;
    if (hs >= TD__DP_HS_MAX) td__dp_refused(n, s, "too many streams in their handshake");
  }
}

void td__dp_io(td_node_t *n) {
  struct td_dp *d = n->xfer.dp;
  if (!d) return;
  struct epoll_event ev[32];
  int k = epoll_wait(d->efd, ev, 32, 0);
  /* A stream handled may close others: each is looked up before use. */
  for (int i = 0; i < k; i++) {
    td__dps_t *s = ev[i].data.ptr;
    if (!s) { td__dp_accept(n); continue; }
    int live = 0;
    for (int j = 0; j < d->ns && !live; j++) live = d->s[j] == s;
    if (!live) continue;
    if (s->out_side) {
      if (s->state != S_UP) { td__hs_server(n, s); continue; }
      if (ev[i].events & (EPOLLIN | EPOLLERR | EPOLLHUP)) {
        /* The fetcher sends nothing after its handshake: bytes or an end
         * here end the stream. */
        uint8_t b[64];
        ssize_t r = read(s->fd, b, sizeof(b));
        if (r == 0 || (r < 0 && errno != EAGAIN && errno != EINTR)) { td__dps_close(n, s, NULL); continue; }
        if (r > 0) { td__dps_close(n, s, "the fetcher sent bytes after its handshake"); continue; }
      }
      if (ev[i].events & EPOLLOUT) td__dps_pump(n, s);
      continue;
    }
    if (s->state == S_CONNECTING || s->state == S_HS2) td__hs_client(n, s);
    else td__dp_read(n, s);
  }
}

/* Streams whose link is gone, and handshakes that take too long, end. */
void td__dp_tick(td_node_t *n, double now) {
  struct td_dp *d = n->xfer.dp;
  if (!d) return;
  for (int i = d->ns - 1; i >= 0; i--) {
    td__dps_t *s = d->s[i];
    if (s->state != S_UP && now - s->since > TD__DP_HS_S) {
      if (s->out_side) td__dp_refused(n, s, "its handshake took too long");
      else td__dps_close(n, s, "its handshake took too long");
    } else if (s->wk && !td__dp_wk(n, s->wk))
      td__dps_close(n, s, NULL);
  }
  for (int i = d->nl - 1; i >= 0; i--)
    if (!td__dp_wk(n, d->l[i].wk) && !d->l[i].in) d->l[i] = d->l[--d->nl];
}

void td__dp_free(td_node_t *n) {
  struct td_dp *d = n->xfer.dp;
  if (!d) return;
  while (d->ns) {
    d->s[0]->state = S_CONNECTING;  /* the node is going: nothing is asked again */
    td__dps_close(n, d->s[0], NULL);
  }
  close(d->lfd);
  close(d->efd);
  free(d->s);
  free(d->l);
  OPENSSL_cleanse(d->secret, sizeof(d->secret));
  free(d);
  n->xfer.dp = NULL;
}
