/* Tide CPU collectives: bandwidth-optimal ring allreduce (reduce-scatter then
 * allgather, chunked and pipelined), allgather, reduce_scatter, broadcast,
 * send/recv and barrier among nranks processes, over any byte transport the
 * caller supplies (td_ring_transport_t).  Uses only libc; ring_local.c adds
 * shared-memory and socketpair transports for processes forked on one host.
 *
 * Data layout: a buffer of count elements is cut into nranks chunks, chunk
 * c holding elements [td_ring_chunk_start(count, n, c), ..start(c + 1)); the
 * sizes differ by at most one, so any count works (including count < n).
 *
 * Ownership: the caller owns the transport and every buffer; a td_ring_t
 * owns only its scratch (pre-faulted once, reused by every call).  A
 * td_ring_t is used by one thread at a time.  All ranks must make the same
 * calls with the same counts, in the same order.
 */
#ifndef TD_RING_H
#define TD_RING_H

#include <stddef.h>
#include <stdint.h>

#include "gpu_err.h"
#include "reduce.h"

/* How bytes move between ranks.  send/recv are required; the optional
 * members let a transport avoid deadlock or copies:
 *  - sendrecv: send to one peer while receiving from another.  Without it
 *    the ring sends a piece and then receives one, which is deadlock-free
 *    only if send() can buffer max_inflight >= piece bytes without a
 *    matching recv (the ring then caps its pieces at max_inflight).
 *  - recv_peek/recv_release: zero-copy receive; peek returns in *ptr up to
 *    len bytes (at least 1, possibly fewer when the data wraps) of what peer
 *    sent next, valid until recv_release(peer, n) consumes n of them.  The
 *    reduce step then reads the peer's bytes in place. */
typedef struct td_ring_transport {
  void *ctx; /* passed to every call */
  int (*send)(void *ctx, int peer, const void *buf, size_t len);
  int (*recv)(void *ctx, int peer, void *buf, size_t len);
  int (*sendrecv)(void *ctx, int to, const void *sbuf, size_t slen, int from,
                  void *rbuf, size_t rlen);              /* optional */
  /* Returns bytes available at *ptr (> 0) or a negative code. */
  int64_t (*recv_peek)(void *ctx, int peer, const void **ptr, size_t len); /* optional */
  int (*recv_release)(void *ctx, int peer, size_t len); /* with recv_peek */
  size_t max_inflight; /* bytes send() buffers unmatched; 0 = unlimited */
} td_ring_transport_t;

typedef struct td_ring td_ring_t;

/* First element of chunk c when count elements are split over n ranks. */
static inline size_t td_ring_chunk_start(size_t count, int n, int c) {
  return (size_t)(((unsigned __int128)count * (unsigned)c) / (unsigned)n);
}
/* Elements in chunk c. */
static inline size_t td_ring_chunk_count(size_t count, int n, int c) {
  return td_ring_chunk_start(count, n, c + 1) - td_ring_chunk_start(count, n, c);
}

/* Creates a ring for rank (0-based) of nranks over tr (copied; tr->ctx must
 * outlive the ring).  piece_bytes is the pipelining unit (0 = 256 KiB).
 * Caller owns *out and frees it with td_ring_free(). */
int td_ring_new(td_ring_t **out, const td_ring_transport_t *tr, int rank,
                int nranks, size_t piece_bytes);
/* Frees the ring (not the transport) and NULLs *r; idempotent. */
void td_ring_free(td_ring_t **r);
int td_ring_rank(const td_ring_t *r);
int td_ring_size(const td_ring_t *r);

/* recv[i] = op over ranks of send[i], i < count elements of dtype (TD_F32
 * ..., reduce.h says how each reduces).  send == recv is the in-place form.
 * TD_RING_AVG divides the sum by nranks (float dtypes only: see
 * td_reduce_check, whose code is returned for a pair it refuses). */
int td_ring_allreduce(td_ring_t *r, const void *send, void *recv, size_t count, int dtype, int op);
/* out = the reduced chunk td_ring_chunk(count, nranks, rank) of in (count
 * elements of dtype on every rank); out holds td_ring_chunk_count(..,
 * rank) elements.  in is not modified. */
int td_ring_reduce_scatter(td_ring_t *r, const void *in, void *out, size_t count, int dtype, int op);
/* recv (nranks * bytes) = every rank's send (bytes each), in rank order;
 * send may be recv + rank * bytes (in place). */
int td_ring_allgather(td_ring_t *r, const void *send, void *recv, size_t bytes);
/* buf (bytes) of rank root is copied to every rank (pipelined along the
 * ring). */
int td_ring_broadcast(td_ring_t *r, void *buf, size_t bytes, int root);
/* Point to point, through the transport. */
int td_ring_send(td_ring_t *r, const void *buf, size_t bytes, int peer);
int td_ring_recv(td_ring_t *r, void *buf, size_t bytes, int peer);
/* Returns once every rank has entered the barrier. */
int td_ring_barrier(td_ring_t *r);

/* -- Local transports (ring_local.c) -------------------------------------- */

/* Shared-memory transport for nranks processes forked after its creation:
 * one single-producer/single-consumer byte ring per ordered pair of ranks
 * (cap bytes each, pre-faulted), futex wake-ups, zero-copy peek. */
typedef struct td_ring_shm td_ring_shm_t;
int td_ring_shm_new(td_ring_shm_t **out, int nranks, size_t cap);
/* Fills *tr with the transport as seen by rank (call in that process). */
void td_ring_shm_transport(td_ring_shm_t *s, int rank, td_ring_transport_t *tr);
/* Bytes a region for nranks with cap bytes per channel needs, and a
 * transport over memory the caller shares by other means (the object
 * store); init zeroes the headers (one rank, before the others attach). */
size_t td_ring_shm_bytes(int nranks, size_t cap);
int td_ring_shm_wrap(td_ring_shm_t **out, void *mem, int nranks, size_t cap, int init);
/* Unmaps the region (each process that holds it); NULLs *s. */
void td_ring_shm_free(td_ring_shm_t **s);

/* Socketpair transport: one AF_UNIX stream pair per pair of ranks, sendrecv
 * through poll().  No peek, no buffering guarantee (max_inflight 0 would be
 * wrong, so it provides sendrecv). */
typedef struct td_ring_sock td_ring_sock_t;
int td_ring_sock_new(td_ring_sock_t **out, int nranks);
/* Fills *tr for rank and closes the descriptors that rank does not use. */
void td_ring_sock_transport(td_ring_sock_t *s, int rank, td_ring_transport_t *tr);
void td_ring_sock_free(td_ring_sock_t **s);

#endif
