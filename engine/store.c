/* Tide shared-memory object store (see store.h). First-fit over a sorted
 * array of free extents, coalesced on free; 64-byte alignment. */
#include "store.h"

#include <stdlib.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#define TD__ALIGN(n) (((n) + 63) & ~(size_t)63)

typedef struct td__ext {
  size_t off, len;
} td__ext_t;

struct td_store {
  int fd;            /* memfd holding the bytes */
  uint8_t *base;     /* mapping of the whole region */
  size_t cap;        /* region size */
  size_t used;       /* bytes allocated */
  td__ext_t *free;   /* free extents sorted by offset */
  size_t nfree, capfree;
};

td_store_t *td_store_new(size_t capacity) {
  capacity = TD__ALIGN(capacity);
  int fd = memfd_create("tide-store", MFD_CLOEXEC);
  if (fd < 0) return NULL;
  if (ftruncate(fd, (off_t)capacity) != 0) { close(fd); return NULL; }
  void *p = mmap(NULL, capacity, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_NORESERVE, fd, 0);
  if (p == MAP_FAILED) { close(fd); return NULL; }
  td_store_t *s = td_xcalloc(1, sizeof(*s));
  s->fd = fd;
  s->base = p;
  s->cap = capacity;
  s->capfree = 16;
  s->free = td_xmalloc(s->capfree * sizeof(td__ext_t));
  s->free[0] = (td__ext_t){0, capacity};
  s->nfree = capacity ? 1 : 0;
  return s;
}

void td_store_destroy(td_store_t **sp) {
  td_store_t *s = *sp;
  if (!s) return;
  munmap(s->base, s->cap);
  close(s->fd);
  free(s->free);
  free(s);
  *sp = NULL;
}

int td_store_fd(const td_store_t *s) { return s->fd; }
uint8_t *td_store_base(const td_store_t *s) { return s->base; }
size_t td_store_capacity(const td_store_t *s) { return s->cap; }
size_t td_store_used(const td_store_t *s) { return s->used; }

int td_store_alloc(td_store_t *s, size_t n, size_t *off) {
  n = TD__ALIGN(n ? n : 1);
  for (size_t i = 0; i < s->nfree; i++) {
    if (s->free[i].len < n) continue;
    *off = s->free[i].off;
    s->free[i].off += n;
    s->free[i].len -= n;
    if (!s->free[i].len) {
      memmove(&s->free[i], &s->free[i + 1], (s->nfree - i - 1) * sizeof(td__ext_t));
      s->nfree--;
    }
    s->used += n;
    return 0;
  }
  return TD_ESTOREFULL;
}

void td_store_free(td_store_t *s, size_t off, size_t n) {
  n = TD__ALIGN(n ? n : 1);
  s->used -= n;
  size_t i = 0;
  while (i < s->nfree && s->free[i].off < off) i++;
  /* Merge with the neighbours where they touch. */
  int prev = i > 0 && s->free[i - 1].off + s->free[i - 1].len == off;
  int next = i < s->nfree && off + n == s->free[i].off;
  if (prev && next) {
    s->free[i - 1].len += n + s->free[i].len;
    memmove(&s->free[i], &s->free[i + 1], (s->nfree - i - 1) * sizeof(td__ext_t));
    s->nfree--;
  } else if (prev) {
    s->free[i - 1].len += n;
  } else if (next) {
    s->free[i].off = off;
    s->free[i].len += n;
  } else {
    if (s->nfree == s->capfree) {
      s->capfree *= 2;
      s->free = td_xrealloc(s->free, s->capfree * sizeof(td__ext_t));
    }
    memmove(&s->free[i + 1], &s->free[i], (s->nfree - i) * sizeof(td__ext_t));
    s->free[i] = (td__ext_t){off, n};
    s->nfree++;
  }
}

uint8_t *td_store_map(int fd, size_t *capacity) {
  struct stat st;
  if (fstat(fd, &st) != 0) return NULL;
  *capacity = (size_t)st.st_size;
  if (!*capacity) return NULL;
  void *p = mmap(NULL, *capacity, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_NORESERVE, fd, 0);
  return p == MAP_FAILED ? NULL : p;
}
