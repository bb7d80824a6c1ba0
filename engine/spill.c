/* The spill file (spill.h): an extent allocator over an unnamed file. */
#include "spill.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "td.h"

typedef struct {
  size_t off, len;
} td_extent_t;

struct td_spill {
  int fd;               /* -1 until the first write */
  char dir[256];        /* where the file lives */
  size_t end;           /* the file's length: every extent lies below it */
  size_t used;          /* bytes of live extents */
  td_extent_t *free;    /* free extents below end, sorted by offset, never adjacent */
  size_t nfree, capfree;
};

td_spill_t *td_spill_new(const char *dir) {
  td_spill_t *sp = td_xcalloc(1, sizeof(*sp));
  sp->fd = -1;
  if (!dir) dir = getenv("TIDE_SPILL_DIR");
  snprintf(sp->dir, sizeof(sp->dir), "%s", dir && *dir ? dir : "/tmp");
  return sp;
}

void td_spill_destroy(td_spill_t **spp) {
  td_spill_t *sp = *spp;
  if (!sp) return;
  if (sp->fd >= 0) close(sp->fd);
  free(sp->free);
  free(sp);
  *spp = NULL;
}

size_t td_spill_used(const td_spill_t *sp) { return sp->used; }
size_t td_spill_end(const td_spill_t *sp) { return sp->end; }
const char *td_spill_dir(const td_spill_t *sp) { return sp->dir; }

/* First fit among the free extents, else the end of the file. */
static size_t td__take(td_spill_t *sp, size_t len) {
  for (size_t i = 0; i < sp->nfree; i++) {
    td_extent_t *e = &sp->free[i];
    if (e->len < len) continue;
    size_t off = e->off;
    e->off += len;
    e->len -= len;
    if (!e->len) memmove(e, e + 1, (sp->nfree - i - 1) * sizeof(*e)), sp->nfree--;
    return off;
  }
  size_t off = sp->end;
  sp->end += len;
  return off;
}

/* Back into the sorted free list, merged with its neighbours; a free tail
 * shortens the file. */
static void td__give(td_spill_t *sp, size_t off, size_t len) {
  size_t i = 0;
  while (i < sp->nfree && sp->free[i].off < off) i++;
  if (i > 0 && sp->free[i - 1].off + sp->free[i - 1].len == off) {
    sp->free[i - 1].len += len;
    i--;
  } else {
    if (sp->nfree == sp->capfree) {
      sp->capfree = sp->capfree ? sp->capfree * 2 : 16;
      sp->free = td_xrealloc(sp->free, sp->capfree * sizeof(*sp->free));
    }
    memmove(sp->free + i + 1, sp->free + i, (sp->nfree - i) * sizeof(*sp->free));
    sp->free[i] = (td_extent_t){off, len};
    sp->nfree++;
  }
  td_extent_t *e = &sp->free[i];
  if (i + 1 < sp->nfree && e->off + e->len == e[1].off) {
    e->len += e[1].len;
    memmove(e + 1, e + 2, (sp->nfree - i - 2) * sizeof(*e));
    sp->nfree--;
  }
  if (i == sp->nfree - 1 && e->off + e->len == sp->end) {
    sp->end = e->off;
    sp->nfree--;
    if (sp->fd >= 0 && ftruncate(sp->fd, (off_t)sp->end) != 0) {
      /* The tail stays allocated on disk: harmless, it is punched below. */
    }
  }
}

int td_spill_write(td_spill_t *sp, const void *src, size_t len, size_t *off) {
  if (sp->fd < 0) {
    sp->fd = open(sp->dir, O_TMPFILE | O_RDWR | O_CLOEXEC, 0600);
    if (sp->fd < 0) return errno == ENOSPC ? TD_ENOSPACE : TD_EIO;
  }
  size_t at = td__take(sp, len), done = 0;
  while (done < len) {
    ssize_t w = pwrite(sp->fd, (const char *)src + done, len - done, (off_t)(at + done));
    if (w > 0) { done += (size_t)w; continue; }
    if (w < 0 && errno == EINTR) continue;
    int full = w == 0 || errno == ENOSPC || errno == EDQUOT || errno == EFBIG;
    td__give(sp, at, len);
    if (sp->fd >= 0) fallocate(sp->fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, (off_t)at, (off_t)len);
    return full ? TD_ENOSPACE : TD_EIO;
  }
  sp->used += len;
  *off = at;
  return 0;
}

int td_spill_read(td_spill_t *sp, size_t off, void *dst, size_t len) {
  size_t done = 0;
  while (done < len) {
    ssize_t r = pread(sp->fd, (char *)dst + done, len - done, (off_t)(off + done));
    if (r > 0) { done += (size_t)r; continue; }
    if (r < 0 && errno == EINTR) continue;
    return TD_EIO;
  }
  return 0;
}

void td_spill_free(td_spill_t *sp, size_t off, size_t len) {
  sp->used -= len;
  /* The disk space goes back now, whether or not the extent is reused. */
  fallocate(sp->fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, (off_t)off, (off_t)len);
  td__give(sp, off, len);
}
