/* Tide channels: length-framed messages over a stream socket (Unix
 * socketpair between a node and its workers). Non-blocking reads and
 * buffered writes, so many small frames share one system call.
 * Frame: u32 length of what follows, u8 type, payload.
 */
#ifndef TD_CHAN_H
#define TD_CHAN_H

#include "td.h"

#define TD_FRAME_MAX (1u << 30)

typedef struct td_chan {
  int fd;          /* owned; -1 when closed */
  td_buf_t in;     /* received bytes */
  size_t in_off;   /* first unconsumed byte in `in` */
  td_buf_t out;    /* bytes to send */
  size_t out_off;  /* first unsent byte in `out` */
  size_t frame_at; /* start of the frame being built */
  uint8_t split;   /* frames of this type are taken in pieces (0: none) */
  uint32_t split_head; /* payload bytes the taker needs to see first */
  size_t scan;     /* first frame in `in` not yet checked for `split` */
  uint64_t begun;  /* frames begun so far: tells a writer its frame is still the last */
} td_chan_t;

void td_chan_init(td_chan_t *c, int fd);
void td_chan_close(td_chan_t *c); /* idempotent */
/* Reads what the socket has. Returns 0, or TD_ECLOSED / TD_EIO. */
int td_chan_read(td_chan_t *c);
/* Takes the next complete frame; the payload points into the channel's
 * buffer and stays valid until the next td_chan_read. Returns 1 if a frame
 * was taken, 0 if none is complete, TD_EPROTO on a bad length. */
int td_chan_next(td_chan_t *c, uint8_t *type, const uint8_t **p, uint32_t *n);
/* Split frames: reading stops once the first split_head payload bytes of
 * an incomplete frame of type c->split are in, so its bulk need not pass
 * through `in`. td_chan_partial then gives that frame's payload so far and
 * its full length; td_chan_take drops it from `in`, and the caller reads
 * the rest of it from c->fd itself before calling td_chan_read again.
 * td_chan_partial returns 1, or 0 when no such frame waits. */
int td_chan_partial(td_chan_t *c, const uint8_t **p, uint32_t *have, uint32_t *len);
void td_chan_take(td_chan_t *c);
/* Frames are built in place: begin, append to c->out, end. */
void td_chan_begin(td_chan_t *c, uint8_t type);
void td_chan_end(td_chan_t *c);
/* Sends a frame of `type` made of a header of hl bytes (at most 64) and n
 * bytes that live elsewhere (a store extent): when nothing is queued ahead
 * of it, it is written straight from p, and only what the socket does not
 * take is copied into c->out. p need not outlive the call. */
void td_chan_frame_ext(td_chan_t *c, uint8_t type, const void *head, size_t hl, const uint8_t *p, size_t n);
/* Writes what it can without blocking. Returns 0 (maybe partial) or an error. */
int td_chan_flush(td_chan_t *c);
/* Writes everything, waiting for the socket as needed. */
int td_chan_flush_all(td_chan_t *c);
/* Passes an fd (with one byte) over a Unix socket; the receiver gets the
 * fd or -1 (the byte is consumed either way). Return 0 / -1. */
int td_sock_send_fd(int sock, int fd);
int td_sock_recv_fd(int sock);
/* Gives a local socket that carries bulk bytes (a bridged link) send and
 * receive buffers of a few MiB, as the system allows: a transfer then
 * crosses in few system calls instead of one per 200 KiB. */
void td_sock_bulk(int fd);

static inline int td_chan_pending(const td_chan_t *c) { return c->out.len > c->out_off; }

#endif
