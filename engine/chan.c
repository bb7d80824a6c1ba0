/* Tide channels (see chan.h). */
#include "chan.h"

#include <assert.h>
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

void td_chan_init(td_chan_t *c, int fd) {
  memset(c, 0, sizeof(*c));
  c->fd = fd;
  td_buf_init(&c->in);
  td_buf_init(&c->out);
  if (fd >= 0) fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
}

void td_chan_close(td_chan_t *c) {
  if (c->fd >= 0) close(c->fd);
  c->fd = -1;
  td_buf_free(&c->in);
  td_buf_free(&c->out);
  c->in_off = c->out_off = 0;
}

/* 1 when `in` holds the head of an incomplete split frame (see chan.h):
 * reading stops there. Complete frames before it are skipped once. */
static int td__chan_at_split(td_chan_t *c) {
  if (!c->split) return 0;
  if (c->scan < c->in_off) c->scan = c->in_off;
  while (c->in.len - c->scan >= 5) {
    uint32_t len;
    memcpy(&len, c->in.p + c->scan, 4);
    if (len < 1 || len > TD_FRAME_MAX) return 0;  /* td_chan_next reports it */
    size_t avail = c->in.len - c->scan;
    if (avail >= 4 + (size_t)len) {
      c->scan += 4 + (size_t)len;
      continue;
    }
    return c->in.p[c->scan + 4] == c->split && avail >= 5 + (size_t)c->split_head;
  }
  return 0;
}

int td_chan_read(td_chan_t *c) {
  if (c->fd < 0) return TD_ECLOSED;
  /* Drop consumed bytes before reading more. */
  if (c->in_off) {
    memmove(c->in.p, c->in.p + c->in_off, c->in.len - c->in_off);
    c->in.len -= c->in_off;
    c->scan = c->scan > c->in_off ? c->scan - c->in_off : 0;
    c->in_off = 0;
  }
  for (;;) {
    if (td__chan_at_split(c)) return 0;
    /* A large frame whose length is known gets its whole size at once,
     * not a doubling series of copies; split frames come in small reads,
     * so that little of their bulk lands here. */
    size_t want = 64 * 1024, most = c->split ? want : SIZE_MAX;
    if (c->in.len >= 5) {
      uint32_t flen;
      memcpy(&flen, c->in.p, 4);
      if (flen <= TD_FRAME_MAX && !(c->split && c->in.p[4] == c->split) && 4 + (size_t)flen > c->in.len + want)
        want = most = 4 + (size_t)flen - c->in.len;
    }
    td_buf_reserve(&c->in, want);
    size_t room = c->in.cap - c->in.len;
    ssize_t r = read(c->fd, c->in.p + c->in.len, room < most ? room : most);
    if (r > 0) {
      c->in.len += (size_t)r;
      if ((size_t)r < (room < most ? room : most)) return 0;
      continue;
    }
    if (r == 0) return TD_ECLOSED;
    if (errno == EINTR) continue;
    if (errno == EAGAIN || errno == EWOULDBLOCK) return 0;
    return TD_EIO;
  }
}

int td_chan_next(td_chan_t *c, uint8_t *type, const uint8_t **p, uint32_t *n) {
  size_t avail = c->in.len - c->in_off;
  if (avail < 5) return 0;
  uint32_t len;
  memcpy(&len, c->in.p + c->in_off, 4);
  if (len < 1 || len > TD_FRAME_MAX) return TD_EPROTO;
  if (avail < 4 + (size_t)len) return 0;
  *type = c->in.p[c->in_off + 4];
  *p = c->in.p + c->in_off + 5;
  *n = len - 1;
  c->in_off += 4 + (size_t)len;
  return 1;
}

int td_chan_partial(td_chan_t *c, const uint8_t **p, uint32_t *have, uint32_t *len) {
  if (!td__chan_at_split(c) || c->scan != c->in_off) return 0;
  memcpy(len, c->in.p + c->in_off, 4);
  *len -= 1;
  *p = c->in.p + c->in_off + 5;
  *have = (uint32_t)(c->in.len - c->in_off - 5);
  return 1;
}

void td_chan_take(td_chan_t *c) { c->in.len = c->scan = c->in_off; }

void td_chan_begin(td_chan_t *c, uint8_t type) {
  c->begun++;
  c->frame_at = c->out.len;
  td_buf_u32(&c->out, 0);
  td_buf_u8(&c->out, type);
}

void td_chan_end(td_chan_t *c) {
  uint32_t len = (uint32_t)(c->out.len - c->frame_at - 4);
  memcpy(c->out.p + c->frame_at, &len, 4);
}

void td_chan_frame_ext(td_chan_t *c, uint8_t type, const void *head, size_t hl, const uint8_t *p, size_t n) {
  uint8_t pre[5 + 64];
  size_t pl = 5 + hl, done = 0;
  assert(hl <= 64 && 1 + hl + n <= TD_FRAME_MAX);
  uint32_t len = (uint32_t)(1 + hl + n);
  c->begun++;
  memcpy(pre, &len, 4);
  pre[4] = type;
  memcpy(pre + 5, head, hl);
  if (c->fd >= 0 && td_chan_flush(c) == 0 && !td_chan_pending(c)) {
    struct iovec iov[2] = {{pre, pl}, {(void *)p, n}};
    ssize_t w;
    do w = writev(c->fd, iov, 2); while (w < 0 && errno == EINTR);
    if (w > 0) done = (size_t)w;
  }
  if (done < pl) td_buf_put(&c->out, pre + done, pl - done);
  done = done > pl ? done - pl : 0;
  if (done < n) td_buf_put(&c->out, p + done, n - done);
}

int td_chan_flush(td_chan_t *c) {
  while (c->out_off < c->out.len) {
    if (c->fd < 0) return TD_ECLOSED;
    ssize_t w = write(c->fd, c->out.p + c->out_off, c->out.len - c->out_off);
    if (w > 0) { c->out_off += (size_t)w; continue; }
    if (w < 0 && errno == EINTR) continue;
    if (w < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) return 0;
    return TD_ECLOSED;
  }
  c->out.len = c->out_off = 0;
  return 0;
}

int td_chan_flush_all(td_chan_t *c) {
  for (;;) {
    int rc = td_chan_flush(c);
    if (rc) return rc;
    if (!td_chan_pending(c)) return 0;
    struct pollfd pfd = {c->fd, POLLOUT, 0};
    poll(&pfd, 1, 1000);
  }
}

int td_sock_send_fd(int sock, int fd) {
  char byte = 'T';
  struct iovec iov = {&byte, 1};
  char ctl[CMSG_SPACE(sizeof(int))];
  memset(ctl, 0, sizeof(ctl));
  struct msghdr mh = {0};
  mh.msg_iov = &iov;
  mh.msg_iovlen = 1;
  mh.msg_control = ctl;
  mh.msg_controllen = sizeof(ctl);
  struct cmsghdr *cm = CMSG_FIRSTHDR(&mh);
  cm->cmsg_level = SOL_SOCKET;
  cm->cmsg_type = SCM_RIGHTS;
  cm->cmsg_len = CMSG_LEN(sizeof(int));
  memcpy(CMSG_DATA(cm), &fd, sizeof(int));
  return sendmsg(sock, &mh, MSG_NOSIGNAL) == 1 ? 0 : -1;
}

int td_sock_recv_fd(int sock) {
  char byte;
  struct iovec iov = {&byte, 1};
  char ctl[CMSG_SPACE(sizeof(int))];
  struct msghdr mh = {0};
  mh.msg_iov = &iov;
  mh.msg_iovlen = 1;
  mh.msg_control = ctl;
  mh.msg_controllen = sizeof(ctl);
  if (recvmsg(sock, &mh, MSG_CMSG_CLOEXEC) != 1) return -1;
  struct cmsghdr *cm = CMSG_FIRSTHDR(&mh);
  int fd = -1;
  if (cm && cm->cmsg_level == SOL_SOCKET && cm->cmsg_type == SCM_RIGHTS) memcpy(&fd, CMSG_DATA(cm), sizeof(int));
  return fd;
}

void td_sock_bulk(int fd) {
  int size = 4 << 20;
  setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &size, sizeof(size));
  setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &size, sizeof(size));
}
