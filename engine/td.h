/* Tide common definitions: error codes, byte buffers, id maps, logging.
 * Used by every unit of the engine and the Lua bindings; uses only libc.
 */
#ifndef TD_H
#define TD_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#define TD_VERSION "0.1.0"

/* -- Error codes ---------------------------------------------------------- */

/* Every function that can fail returns 0 or a negative code: one of these
 * TD_E* (TD__EFIRST - 1 and down: -1001, -1002, ...) or, where an errno
 * without a TD_E* of its own passes through, -errno (-1 .. -999). Library
 * codes are mapped where the library is called: libuv's in engine/http.c,
 * ZeroMQ's in engine/bridge.c,
 * CUDA's and NCCL's in the gpu layer, whose own codes count down from
 * -2000 (gpu/gpu_err.h, td_gpu_strerror). A code keeps its number when
 * codes are added at the end of the table. The messages live in one
 * table, td_strerror(). */
#define TD_ERRDEF(_)                                                      \
  _(NOMEM, "out of memory")                                               \
  _(IO, "i/o error")                                                      \
  _(PROTO, "malformed protocol message")                                  \
  _(SER, "value cannot be serialized")                                    \
  _(NOTFOUND, "not found")                                                \
  _(STOREFULL, "object store is full")                                    \
  _(TOOBIG, "value too large for the object store even after spilling")   \
  _(CLOSED, "peer closed the connection")                                 \
  _(INVAL, "invalid argument")                                            \
  _(TIMEDOUT, "timed out")                                                \
  _(NOSPACE, "no space left on the spill disk (TIDE_SPILL_DIR, or /tmp)") \
  _(ADDRINUSE, "address already in use")                                  \
  _(CANCELED, "cancelled: shutting down")                                 \
  _(SLOWPEER, "the peer stopped reading; its connection was dropped")     \
  _(ZMQ, "messaging library (ZeroMQ) failure")

/* clang-format off */
/* Each code's place in the table (0, 1, ...), for the codes below. */
enum {
#define TD__EIDX(name, msg) TD__I##name,
  TD_ERRDEF(TD__EIDX)
#undef TD__EIDX
  TD__ECOUNT /* how many TD_E* codes there are */
};

enum {
  TD_OK = 0,
  TD__EFIRST = -1000, /* TD_E* codes are below it: TD_ENOMEM is -1001 */
#define TD__ENUM(name, msg) TD_E##name = TD__EFIRST - 1 - TD__I##name,
  TD_ERRDEF(TD__ENUM)
#undef TD__ENUM
  TD__ELAST = TD__EFIRST - TD__ECOUNT /* the lowest TD_E* code */
};
/* clang-format on */

/* The message for 0, a TD_E* code or a negative errno (strerror's text);
 * "unknown error" for anything else. Static storage; never NULL. */
const char *td_strerror(int err);

/* -- Byte buffers --------------------------------------------------------- */

/* A growable byte buffer. The memory is reused across td_buf_reset() calls,
 * so hot paths reuse pre-faulted pages. */
typedef struct td_buf {
  uint8_t *p;  /* bytes, owned */
  size_t len;  /* bytes in use */
  size_t cap;  /* bytes allocated */
} td_buf_t;

void td_buf_init(td_buf_t *b);
void td_buf_free(td_buf_t *b);
void td_buf_reserve(td_buf_t *b, size_t extra); /* aborts on OOM */
static inline void td_buf_reset(td_buf_t *b) { b->len = 0; }
static inline void td_buf_put(td_buf_t *b, const void *p, size_t n) {
  if (!n) return;
  if (b->len + n > b->cap) td_buf_reserve(b, n);
  memcpy(b->p + b->len, p, n);
  b->len += n;
}
static inline void td_buf_u8(td_buf_t *b, uint8_t v) { td_buf_put(b, &v, 1); }
static inline void td_buf_u32(td_buf_t *b, uint32_t v) { td_buf_put(b, &v, 4); }
static inline void td_buf_u64(td_buf_t *b, uint64_t v) { td_buf_put(b, &v, 8); }
static inline void td_buf_f64(td_buf_t *b, double v) { td_buf_put(b, &v, 8); }
static inline void td_buf_str(td_buf_t *b, const void *s, size_t n) {
  td_buf_u32(b, (uint32_t)n);
  td_buf_put(b, s, n);
}

/* A bounds-checked reader over received bytes. Any read past the end sets
 * `bad` and yields zeroes, so decoders check once at the end. */
typedef struct td_rd {
  const uint8_t *p;  /* next byte */
  const uint8_t *end;
  int bad;           /* set on overrun */
} td_rd_t;

static inline void td_rd_init(td_rd_t *r, const void *p, size_t n) {
  r->p = p; r->end = r->p + n; r->bad = 0;
}
static inline int td_rd_take(td_rd_t *r, void *out, size_t n) {
  if ((size_t)(r->end - r->p) < n) { r->bad = 1; memset(out, 0, n); return -1; }
  memcpy(out, r->p, n); r->p += n; return 0;
}
static inline uint8_t td_rd_u8(td_rd_t *r) { uint8_t v; td_rd_take(r, &v, 1); return v; }
static inline uint32_t td_rd_u32(td_rd_t *r) { uint32_t v; td_rd_take(r, &v, 4); return v; }
static inline uint64_t td_rd_u64(td_rd_t *r) { uint64_t v; td_rd_take(r, &v, 8); return v; }
static inline double td_rd_f64(td_rd_t *r) { double v; td_rd_take(r, &v, 8); return v; }
/* Returns a pointer to n bytes inside the message (no copy), or NULL. */
static inline const uint8_t *td_rd_bytes(td_rd_t *r, size_t n) {
  if ((size_t)(r->end - r->p) < n) { r->bad = 1; r->p = r->end; return NULL; }
  const uint8_t *p = r->p; r->p += n; return p;
}
static inline const uint8_t *td_rd_str(td_rd_t *r, uint32_t *n) {
  *n = td_rd_u32(r);
  const uint8_t *p = td_rd_bytes(r, *n);
  if (!p) *n = 0;
  return p;
}

/* -- Id map --------------------------------------------------------------- */

/* Open-addressing map from 64-bit ids to pointers. The two ids the table
 * uses as marks (0 and UINT64_MAX, which a malformed message may carry)
 * live beside it, so every id works. */
typedef struct td_map {
  uint64_t *keys;  /* 0 = empty, UINT64_MAX = deleted */
  void **vals;
  size_t cap;      /* power of two */
  size_t len;      /* live entries, the two beside the table included */
  size_t used;     /* live + deleted in the table */
  void *mark_val[2];  /* the values of ids 0 and UINT64_MAX */
  uint8_t mark_has[2];
} td_map_t;

void td_map_init(td_map_t *m);
void td_map_free(td_map_t *m);
void *td_map_get(const td_map_t *m, uint64_t key);
void td_map_set(td_map_t *m, uint64_t key, void *val);
void *td_map_del(td_map_t *m, uint64_t key);
/* Iterates: for (size_t i = 0; td_map_next(m, &i, &k, &v);) */
int td_map_next(const td_map_t *m, size_t *it, uint64_t *key, void **val);

/* -- Misc ----------------------------------------------------------------- */

double td_now(void); /* monotonic seconds */
/* FNV-1a of n bytes at p, going on from h (TD_FNV_BASIS to start): a
 * 64-bit key for in-process tables, not a checksum. */
#define TD_FNV_BASIS 14695981039346656037ull
uint64_t td_fnv1a(uint64_t h, const void *p, size_t n);
void *td_xmalloc(size_t n);
void *td_xcalloc(size_t n, size_t m);
void *td_xrealloc(void *p, size_t n);
char *td_xstrdup(const char *s);
void td_log(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
extern int td_verbose;

#endif
