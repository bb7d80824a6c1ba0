/* Tide common utilities: error table, buffers, id map, clock, logging. */
#include "td.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

int td_verbose = 0;

/* -- Errors --------------------------------------------------------------- */

const char *td_strerror(int err) {
  switch (err) {
#define TD__MSG(name, msg) case TD_E##name: return msg;
    TD_ERRDEF(TD__MSG)
#undef TD__MSG
    case 0: return "success";
    default: break;
  }
  /* Below -999 strerror() would only say "Unknown error -N". On Unix a
   * libuv code in this range is -errno, so it is named too. */
  if (err < 0 && err > TD__EFIRST) return strerror(-err);
  return "unknown error";
}

/* -- Memory --------------------------------------------------------------- */

static void td__oom(void) {
  static const char msg[] = "tide: out of memory\n";
  ssize_t r = write(2, msg, sizeof(msg) - 1);
  (void)r;
  abort();
}
void *td_xmalloc(size_t n) { void *p = malloc(n ? n : 1); if (!p) td__oom(); return p; }
void *td_xcalloc(size_t n, size_t m) { void *p = calloc(n ? n : 1, m ? m : 1); if (!p) td__oom(); return p; }
void *td_xrealloc(void *p, size_t n) { p = realloc(p, n ? n : 1); if (!p) td__oom(); return p; }
char *td_xstrdup(const char *s) { size_t n = strlen(s) + 1; return memcpy(td_xmalloc(n), s, n); }

/* -- Buffers -------------------------------------------------------------- */

void td_buf_init(td_buf_t *b) { b->p = NULL; b->len = b->cap = 0; }
void td_buf_free(td_buf_t *b) { free(b->p); td_buf_init(b); }
void td_buf_reserve(td_buf_t *b, size_t extra) {
  if (b->len + extra <= b->cap) return;
  size_t cap = b->cap ? b->cap : 256;
  while (cap < b->len + extra) cap *= 2;
  b->p = td_xrealloc(b->p, cap);
  b->cap = cap;
}

/* -- Id map --------------------------------------------------------------- */

#define TD__DEL UINT64_MAX
static size_t td__hash(uint64_t k) {
  k ^= k >> 33; k *= 0xff51afd7ed558ccdULL; k ^= k >> 33;
  return (size_t)k;
}
void td_map_init(td_map_t *m) { memset(m, 0, sizeof(*m)); }
void td_map_free(td_map_t *m) { free(m->keys); free(m->vals); td_map_init(m); }

/* Which of the two marks key is (0 or 1), or -1 for an ordinary id. */
static int td__mark(uint64_t key) { return key == 0 ? 0 : key == TD__DEL ? 1 : -1; }

static void td__map_grow(td_map_t *m) {
  td_map_t n;
  memset(&n, 0, sizeof(n));
  n.cap = m->cap ? (m->len * 4 >= m->cap ? m->cap * 2 : m->cap) : 64;
  n.keys = td_xcalloc(n.cap, sizeof(uint64_t));
  n.vals = td_xcalloc(n.cap, sizeof(void *));
  for (size_t i = 0; i < m->cap; i++)
    if (m->keys[i] && m->keys[i] != TD__DEL) td_map_set(&n, m->keys[i], m->vals[i]);
  for (int k = 0; k < 2; k++) {
    n.mark_val[k] = m->mark_val[k];
    n.mark_has[k] = m->mark_has[k];
    n.len += m->mark_has[k];
  }
  free(m->keys); free(m->vals);
  *m = n;
}
void *td_map_get(const td_map_t *m, uint64_t key) {
  int k = td__mark(key);
  if (k >= 0) return m->mark_has[k] ? m->mark_val[k] : NULL;
  if (!m->cap) return NULL;
  for (size_t i = td__hash(key) & (m->cap - 1);; i = (i + 1) & (m->cap - 1)) {
    if (m->keys[i] == key) return m->vals[i];
    if (!m->keys[i]) return NULL;
  }
}
void td_map_set(td_map_t *m, uint64_t key, void *val) {
  int k = td__mark(key);
  if (k >= 0) {
    m->len += !m->mark_has[k];
    m->mark_has[k] = 1;
    m->mark_val[k] = val;
    return;
  }
  if ((m->used + 1) * 2 > m->cap) td__map_grow(m);
  size_t del = SIZE_MAX;
  for (size_t i = td__hash(key) & (m->cap - 1);; i = (i + 1) & (m->cap - 1)) {
    if (m->keys[i] == key) { m->vals[i] = val; return; }
    if (m->keys[i] == TD__DEL && del == SIZE_MAX) del = i;
    if (!m->keys[i]) {
      if (del != SIZE_MAX) i = del; else m->used++;
      m->keys[i] = key; m->vals[i] = val; m->len++;
      return;
    }
  }
}
void *td_map_del(td_map_t *m, uint64_t key) {
  int k = td__mark(key);
  if (k >= 0) {
    void *v = m->mark_has[k] ? m->mark_val[k] : NULL;
    m->len -= m->mark_has[k];
    m->mark_has[k] = 0;
    m->mark_val[k] = NULL;
    return v;
  }
  if (!m->cap) return NULL;
  for (size_t i = td__hash(key) & (m->cap - 1);; i = (i + 1) & (m->cap - 1)) {
    if (m->keys[i] == key) {
      void *v = m->vals[i];
      m->keys[i] = TD__DEL; m->vals[i] = NULL; m->len--;
      return v;
    }
    if (!m->keys[i]) return NULL;
  }
}
int td_map_next(const td_map_t *m, size_t *it, uint64_t *key, void **val) {
  for (; *it < m->cap; (*it)++) {
    uint64_t k = m->keys[*it];
    if (k && k != TD__DEL) {
      if (key) *key = k;
      if (val) *val = m->vals[*it];
      (*it)++;
      return 1;
    }
  }
  /* Then the two marks, as positions cap and cap + 1. */
  for (; *it < m->cap + 2; (*it)++) {
    int k = (int)(*it - m->cap);
    if (!m->mark_has[k]) continue;
    if (key) *key = k ? TD__DEL : 0;
    if (val) *val = m->mark_val[k];
    (*it)++;
    return 1;
  }
  return 0;
}

/* -- Misc ----------------------------------------------------------------- */

double td_now(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

uint64_t td_fnv1a(uint64_t h, const void *p, size_t n) {
  const uint8_t *b = p;
  for (size_t i = 0; i < n; i++) h = (h ^ b[i]) * 1099511628211ull;
  return h;
}

void td_log(const char *fmt, ...) {
  if (!td_verbose) return;
  va_list ap;
  va_start(ap, fmt);
  fprintf(stderr, "[tide %d] ", (int)getpid());
  vfprintf(stderr, fmt, ap);
  fputc('\n', stderr);
  va_end(ap);
}
