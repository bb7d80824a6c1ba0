/* Tide CPU ring collectives (see ring.h).
 *
 * Allreduce = reduce-scatter then allgather around the ring rank -> rank+1,
 * each of the n-1 steps moving one chunk (1/n of the data) cut into pieces,
 * so every rank sends and receives 2(n-1)/n of the data: the bandwidth
 * optimum.  Received pieces are reduced straight out of the transport's
 * buffer when it offers recv_peek (no extra copy).  Two ranks take
 * shortcuts with the same bytes moved: one whole exchange up to 64 KiB,
 * and over recv_peek the two steps interleaved per piece (td__pair_ring). */
#include "ring.h"

#include "tensor.h"

#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

struct td_ring {
  td_ring_transport_t tr; /* copy of the caller's transport */
  int rank, n;            /* this rank, ranks in the ring */
  size_t piece;           /* pipelining unit in bytes (multiple of 64) */
  void *scratch;          /* pre-faulted work memory, reused */
  size_t scratch_cap;     /* bytes at scratch */
};

/* -- Scratch ------------------------------------------------------------------- */

static void td__scratch_release(void *p, size_t n) {
  if (p) munmap(p, n);
}

/* Returns at least n bytes of pre-faulted scratch (contents undefined). */
static void *td__scratch(td_ring_t *r, size_t n) {
  if (n <= r->scratch_cap) return r->scratch;
  size_t cap = (n + 4095) & ~(size_t)4095;
  void *p = mmap(NULL, cap, PROT_READ | PROT_WRITE,
                 MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
  if (p == MAP_FAILED) return NULL;
  td__scratch_release(r->scratch, r->scratch_cap);
  r->scratch = p;
  r->scratch_cap = cap;
  return p;
}

/* -- Lifecycle ------------------------------------------------------------------- */

int td_ring_new(td_ring_t **out, const td_ring_transport_t *tr, int rank,
                int nranks, size_t piece_bytes) {
  if (!tr || !tr->send || !tr->recv || nranks < 1 || rank < 0 || rank >= nranks ||
      (tr->recv_peek && !tr->recv_release))
    return TD_GPU_EINVAL;
  td_ring_t *r = calloc(1, sizeof(*r));
  if (!r) return TD_GPU_ENOMEM;
  r->tr = *tr;
  r->rank = rank;
  r->n = nranks;
  size_t piece = piece_bytes ? piece_bytes : (256u << 10);
  /* Without sendrecv, send-then-receive is deadlock-free while four pieces
   * fit in what the transport buffers (see ring.h). */
  if (!tr->sendrecv && tr->max_inflight && piece > tr->max_inflight / 4)
    piece = tr->max_inflight / 4;
  piece &= ~(size_t)63;
  if (piece < 64) piece = 64;
  r->piece = piece;
  *out = r;
  return 0;
}

void td_ring_free(td_ring_t **r) {
  if (!r || !*r) return;
  td__scratch_release((*r)->scratch, (*r)->scratch_cap);
  free(*r);
  *r = NULL;
}

int td_ring_rank(const td_ring_t *r) { return r->rank; }
int td_ring_size(const td_ring_t *r) { return r->n; }

/* -- Received bytes ------------------------------------------------------------ */

/* What happens to received bytes: copied to dst, or reduced as
 * dst = op(a, received) (a may equal dst) in elements of dtype. */
typedef struct {
  int reduce;       /* 0 = copy, 1 = reduce */
  int op;           /* TD_RING_* when reducing */
  int dtype;        /* TD_F32 ... when reducing */
  size_t es;        /* bytes per element when reducing */
  char *dst;        /* destination of byte 0 of the message */
  const char *a;    /* first operand of byte 0 when reducing */
} td__sink_t;

static td__sink_t td__reducing(int op, int dtype, void *dst, const void *a) {
  return (td__sink_t){1, op, dtype, td_dtype_size(dtype), dst, a};
}
static td__sink_t td__copying(void *dst) { return (td__sink_t){0, 0, 0, 1, dst, NULL}; }

static void td__apply(const td__sink_t *k, size_t off, const void *in, size_t n) {
  if (!k->reduce) {
    memcpy(k->dst + off, in, n);
    return;
  }
  if ((uintptr_t)in % k->es) {
    /* Bytes read in place from a ring whose stream is not aligned to the
     * element (after a barrier's byte): reduced through an aligned copy. */
    uint64_t tmp[512];
    for (size_t done = 0; done < n; done += sizeof(tmp)) {
      size_t m = n - done < sizeof(tmp) ? n - done : sizeof(tmp);
      memcpy(tmp, (const char *)in + done, m);
      td__sink_t part = *k;
      part.dst += done;
      part.a += done;
      td__apply(&part, off, tmp, m);
    }
    return;
  }
  td_reduce(k->dst + off, k->a + off, in, n / k->es, k->dtype, k->op);
}

/* Sends slen bytes at sbuf to `to` while receiving rlen bytes from `from`
 * into sink, piece by piece. */
static int td__xfer(td_ring_t *r, int to, const char *sbuf, size_t slen,
                    int from, const td__sink_t *sink, size_t rlen) {
  const td_ring_transport_t *tr = &r->tr;
  size_t so = 0, ro = 0;
  char *tmp = NULL;
  char carry[8]; /* an element split by the ring's end, put together */
  if (!tr->recv_peek && (sink->reduce || tr->sendrecv)) {
    tmp = td__scratch(r, r->piece);
    if (!tmp) return TD_GPU_ENOMEM;
  }
  while (so < slen || ro < rlen) {
    size_t ps = slen - so < r->piece ? slen - so : r->piece;
    size_t pr = rlen - ro < r->piece ? rlen - ro : r->piece;
    int rc = 0;
    if (tr->recv_peek) {
      if (ps) rc = tr->send(tr->ctx, to, sbuf + so, ps);
      for (size_t got = 0; !rc && got < pr;) {
        const void *p;
        int64_t n = tr->recv_peek(tr->ctx, from, &p, pr - got);
        if (n <= 0) return n < 0 ? (int)n : TD_GPU_EIO;
        size_t take = (size_t)n, at = ro + got;
        if (sink->reduce) {
          /* The stream need not be aligned to the element in the ring (a
           * barrier sends one byte): an element split at the ring's end is
           * put together here and reduced whole, never by halves. */
          size_t es = sink->es, in_el = at % es;
          if (in_el || take < es) {
            size_t k = es - in_el;
            if (k > take) k = take;
            memcpy(carry + in_el, p, k);
            if (in_el + k == es) td__apply(sink, at - in_el, carry, es);
            take = k;
          } else {
            take -= take % es;
            td__apply(sink, at, p, take);
          }
        } else {
          td__apply(sink, at, p, take);
        }
        rc = tr->recv_release(tr->ctx, from, take);
        got += take;
      }
    } else {
      /* Copies land in place; reductions go through tmp. */
      char *rbuf = sink->reduce ? tmp : sink->dst + ro;
      if (tr->sendrecv && ps && pr) {
        rc = tr->sendrecv(tr->ctx, to, sbuf + so, ps, from, rbuf, pr);
      } else {
        if (ps) rc = tr->send(tr->ctx, to, sbuf + so, ps);
        if (!rc && pr) rc = tr->recv(tr->ctx, from, rbuf, pr);
      }
      if (!rc && pr && sink->reduce) td__apply(sink, ro, rbuf, pr);
    }
    if (rc) return rc;
    so += ps;
    ro += pr;
  }
  return 0;
}

/* Two-rank allreduces up to this many bytes use one direct exchange. */
#define TD__PAIR_MAX ((size_t)64 << 10)

static int td__mod(int a, int n) { return ((a % n) + n) % n; }

/* -- Collectives ---------------------------------------------------------------------- */

/* Two ranks above TD__PAIR_MAX: the ring's two steps interleaved piece by
 * piece.  Piece k of the peer's half goes out and piece k of ours comes
 * back and is reduced; that reduced piece is sent back at once, while it is
 * still in cache (the allgather), and piece k of the peer's reduced half
 * comes in.  The ring's allgather instead read the whole reduced half again
 * from memory after the reduce-scatter.  Both directions carry RS_k, AG_k,
 * RS_k+1, ... in the same order.  Offsets and lengths are in elements of
 * es bytes. */
static int td__pair_ring(td_ring_t *r, const char *send, char *recv, size_t count, int dtype, int op) {
  int peer = 1 - r->rank;
  size_t es = td_dtype_size(dtype);
  size_t m0 = td_ring_chunk_start(count, 2, r->rank), mc = td_ring_chunk_count(count, 2, r->rank);
  size_t o0 = td_ring_chunk_start(count, 2, peer), oc = td_ring_chunk_count(count, 2, peer);
  size_t step = r->piece / es;
  for (size_t k = 0; k < mc || k < oc; k += step) {
    size_t ms = k >= mc ? 0 : mc - k < step ? mc - k : step;
    size_t os = k >= oc ? 0 : oc - k < step ? oc - k : step;
    char *mine = recv + (m0 + k) * es;
    td__sink_t red = td__reducing(op, dtype, mine, send + (m0 + k) * es);
    int rc = td__xfer(r, peer, send + (o0 + k) * es, os * es, peer, &red, ms * es);
    if (!rc && op == TD_RING_AVG) td_reduce_avg(mine, ms, dtype, 2);
    td__sink_t cp = td__copying(recv + (o0 + k) * es);
    if (!rc) rc = td__xfer(r, peer, mine, ms * es, peer, &cp, os * es);
    if (rc) return rc;
  }
  return 0;
}

int td_ring_allreduce(td_ring_t *r, const void *sendv, void *recvv, size_t count, int dtype, int op) {
  int n = r->n, me = r->rank, rc = td_reduce_check(dtype, op);
  if (rc) return rc;
  const char *send = sendv;
  char *recv = recvv;
  size_t es = td_dtype_size(dtype);
  if (n == 1 || count == 0) {
    if (send != recv) memcpy(recv, send, count * es);
    return 0;
  }
  int next = (me + 1) % n, prev = (me + n - 1) % n;
  if (n == 2 && count * es <= TD__PAIR_MAX) {
    /* Two ranks, small message: one exchange of whole buffers instead of the
     * ring's two steps (same bytes moved, half the round trips); a + b is
     * the same value on both ranks.  In place needs no copy of ours:
     * td__xfer sends each piece before it reduces the peer's piece into the
     * same bytes. */
    td__sink_t k = td__reducing(op, dtype, recv, send);
    rc = td__xfer(r, next, send, count * es, prev, &k, count * es);
    if (!rc && op == TD_RING_AVG) td_reduce_avg(recv, count, dtype, 2);
    return rc;
  }
  /* Over shared memory only, where it was measured: streams between nodes
   * (coll_net.c) keep the plain ring their own figures were taken with. */
  if (n == 2 && r->tr.recv_peek) return td__pair_ring(r, send, recv, count, dtype, op);
  /* Reduce-scatter: step s sends chunk me-s, receives and reduces me-s-1
   * (recv = op(send, incoming): each chunk is reduced once per rank, so the
   * out-of-place form costs no extra copy).  Step 0 sends from send. */
  for (int s = 0; s < n - 1; s++) {
    int cs = td__mod(me - s, n), cr = td__mod(me - s - 1, n);
    size_t s0 = td_ring_chunk_start(count, n, cs) * es, r0 = td_ring_chunk_start(count, n, cr) * es;
    td__sink_t k = td__reducing(op, dtype, recv + r0, send + r0);
    rc = td__xfer(r, next, (s == 0 ? send : recv) + s0, td_ring_chunk_count(count, n, cs) * es, prev, &k,
                  td_ring_chunk_count(count, n, cr) * es);
    if (rc) return rc;
  }
  /* This rank now holds the reduced chunk me+1. */
  int mine = td__mod(me + 1, n);
  if (op == TD_RING_AVG)
    td_reduce_avg(recv + td_ring_chunk_start(count, n, mine) * es, td_ring_chunk_count(count, n, mine), dtype,
                  n);
  /* Allgather: step s sends chunk me+1-s, receives chunk me-s. */
  for (int s = 0; s < n - 1; s++) {
    int cs = td__mod(me + 1 - s, n), cr = td__mod(me - s, n);
    size_t s0 = td_ring_chunk_start(count, n, cs) * es, r0 = td_ring_chunk_start(count, n, cr) * es;
    td__sink_t k = td__copying(recv + r0);
    rc = td__xfer(r, next, recv + s0, td_ring_chunk_count(count, n, cs) * es, prev, &k,
                  td_ring_chunk_count(count, n, cr) * es);
    if (rc) return rc;
  }
  return 0;
}

int td_ring_reduce_scatter(td_ring_t *r, const void *inv, void *outv, size_t count, int dtype, int op) {
  int n = r->n, me = r->rank, rc = td_reduce_check(dtype, op);
  if (rc) return rc;
  const char *in = inv;
  char *out = outv;
  size_t es = td_dtype_size(dtype), mine = td_ring_chunk_count(count, n, me);
  if (n == 1) {
    memcpy(out, in, count * es);
    return 0;
  }
  /* Step s sends chunk me-s-1 (in[] at s = 0, else the partial reduced at
   * step s-1) and reduces chunk me-s-2 into a work buffer; the last step
   * reduces chunk me straight into out.  Two work buffers alternate. */
  size_t maxc = (td_ring_chunk_count(count, n, 0) + 1) * es;
  char *work = td__scratch(r, 2 * maxc + r->piece);
  if (!work && count) return TD_GPU_ENOMEM;
  /* td__xfer may use the scratch's head for pieces: keep the work after it. */
  char *w[2] = {NULL, NULL};
  if (work) {
    w[0] = work + r->piece;
    w[1] = w[0] + maxc;
  }
  int next = (me + 1) % n, prev = (me + n - 1) % n;
  const char *sending = NULL;
  for (int s = 0; s < n - 1; s++) {
    int cs = td__mod(me - s - 1, n), cr = td__mod(me - s - 2, n);
    if (s == 0) sending = in + td_ring_chunk_start(count, n, cs) * es;
    char *dst = s == n - 2 ? out : w[s % 2];
    td__sink_t k = td__reducing(op, dtype, dst, in + td_ring_chunk_start(count, n, cr) * es);
    rc = td__xfer(r, next, sending, td_ring_chunk_count(count, n, cs) * es, prev, &k,
                  td_ring_chunk_count(count, n, cr) * es);
    if (rc) return rc;
    sending = dst;
  }
  if (op == TD_RING_AVG) td_reduce_avg(out, mine, dtype, n);
  return 0;
}

int td_ring_allgather(td_ring_t *r, const void *send, void *recv, size_t bytes) {
  int n = r->n, me = r->rank, rc;
  char *out = recv;
  if ((const char *)send != out + (size_t)me * bytes)
    memcpy(out + (size_t)me * bytes, send, bytes);
  int next = (me + 1) % n, prev = (me + n - 1) % n;
  for (int s = 0; s < n - 1; s++) {
    int cs = td__mod(me - s, n), cr = td__mod(me - s - 1, n);
    td__sink_t k = td__copying(out + (size_t)cr * bytes);
    rc = td__xfer(r, next, out + (size_t)cs * bytes, bytes, prev, &k, bytes);
    if (rc) return rc;
  }
  return 0;
}

int td_ring_broadcast(td_ring_t *r, void *buf, size_t bytes, int root) {
  if (root < 0 || root >= r->n) return TD_GPU_EINVAL;
  int n = r->n, pos = td__mod(r->rank - root, n);
  int next = (r->rank + 1) % n, prev = (r->rank + n - 1) % n;
  const td_ring_transport_t *tr = &r->tr;
  char *p = buf;
  for (size_t off = 0; off < bytes; off += r->piece) {
    size_t len = bytes - off < r->piece ? bytes - off : r->piece;
    int rc = 0;
    if (pos > 0) rc = tr->recv(tr->ctx, prev, p + off, len);
    if (!rc && pos < n - 1) rc = tr->send(tr->ctx, next, p + off, len);
    if (rc) return rc;
  }
  return 0;
}

int td_ring_send(td_ring_t *r, const void *buf, size_t bytes, int peer) {
  if (peer < 0 || peer >= r->n || peer == r->rank) return TD_GPU_EINVAL;
  return bytes ? r->tr.send(r->tr.ctx, peer, buf, bytes) : 0;
}

int td_ring_recv(td_ring_t *r, void *buf, size_t bytes, int peer) {
  if (peer < 0 || peer >= r->n || peer == r->rank) return TD_GPU_EINVAL;
  return bytes ? r->tr.recv(r->tr.ctx, peer, buf, bytes) : 0;
}

int td_ring_barrier(td_ring_t *r) {
  /* An allgather of one byte per rank: rank r ends holding every rank's
   * byte, each sent only after its owner entered. */
  char small[64], *all = small;
  if (r->n > (int)sizeof(small)) {
    all = malloc((size_t)r->n);
    if (!all) return TD_GPU_ENOMEM;
  }
  char b = 1;
  int rc = td_ring_allgather(r, &b, all, 1);
  if (all != small) free(all);
  return rc;
}
