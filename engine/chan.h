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
} td_chan_t;

void td_chan_init(td_chan_t *c, int fd);
void td_chan_close(td_chan_t *c); /* idempotent */
/* Reads what the socket has. Returns 0, or TD_ECLOSED / TD_EIO. */
int td_chan_read(td_chan_t *c);
/* Takes the next complete frame; the payload points into the channel's
 * buffer and stays valid until the next td_chan_read. Returns 1 if a frame
 * was taken, 0 if none is complete, TD_EPROTO on a bad length. */
int td_chan_next(td_chan_t *c, uint8_t *type, const uint8_t **p, uint32_t *n);
/* Frames are built in place: begin, append to c->out, end. */
void td_chan_begin(td_chan_t *c, uint8_t type);
void td_chan_end(td_chan_t *c);
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
