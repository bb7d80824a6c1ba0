/* Tide value serialization: Lua values <-> bytes.
 * Provides the encoder (with cycle handling, error paths that name where an
 * unsendable value sits, large strings kept as external segments so a put
 * copies them once) and the decoder. Uses td.h and the Lua C API; functions
 * and extension objects (tensors, actor handles) go through Lua hooks.
 */
#ifndef TD_SER_H
#define TD_SER_H

#include <lua.h>

#include "td.h"
#include "value.h"


/* Strings at least this long are not copied into the encoder's buffer. */
#define TD_SER_SEG_MIN (64 * 1024)

typedef struct td_seg {
  size_t at;      /* offset in buf where the bytes belong */
  const void *p;  /* bytes, owned by a Lua string kept alive by the caller */
  size_t n;
} td_seg_t;

typedef struct td_ser {
  td_buf_t buf;       /* encoded bytes, without the segments */
  td_seg_t *segs;     /* large strings, in order */
  int nsegs, capsegs;
  uint64_t *refs;     /* nested ObjectRef ids the value contains */
  int nrefs, caprefs;
  uint64_t *deps;     /* top-level argument refs (td_ser_args only) */
  int ndeps, capdeps;
  size_t size;        /* total encoded size, segments included */
  size_t segbytes;    /* bytes of the segments so far */
  td_buf_t path;      /* on failure: where it failed ("a.b[2]"), built while unwinding */
  char err[512];      /* set when encoding fails */
  char why[256];      /* on failure: what went wrong, before the place is added */
  const char *what;   /* on failure: what the value is ("return value"), or NULL */
  int depth;
  int argi;           /* with what == NULL: "argument <argi>" in errors */
  /* Tables already encoded (shared and cyclic ones are sent once): an
   * open-addressing set of table pointers; a slot counts only when its
   * generation is the current one, so a new encoding clears it in O(1). */
  struct {
    const void **keys;
    uint32_t *gens, *vals;
    size_t cap, len;
    uint32_t gen;
  } seen;
  int nseen;
  int nanchor; /* function descriptors kept alive while encoding */
  int fndepth; /* > 0: inside a function descriptor */
} td_ser_t;

void td_ser_init(td_ser_t *s);
void td_ser_free(td_ser_t *s);
/* Encodes the value at idx. `what` names it in errors ("return value").
 * Returns 0 or TD_ESER with s->err set. The Lua values must stay alive
 * until td_ser_copy(). */
int td_ser_value(td_ser_t *s, lua_State *L, int idx, const char *what);
/* Encodes n values starting at stack index first as an argument list;
 * top-level ObjectRefs become dependencies. */
int td_ser_args(td_ser_t *s, lua_State *L, int first, int n);
/* Copies the whole encoding (segments included) to dst (s->size bytes). */
void td_ser_copy(const td_ser_t *s, void *dst);
/* Appends the whole encoding to a buffer. */
void td_ser_append(const td_ser_t *s, td_buf_t *b);

/* Decoder hooks. argref pushes the value of a resolved dependency (or
 * returns nonzero if it failed); mkref pushes an ObjectRef for an id. */
typedef struct td_holder {
  void (*hold)(void *ctx);                /* keeps the bytes where they are */
  void (*release)(void *ctx, void *data); /* lets them go (once per hold) */
} td_holder_t;

typedef struct td_deser {
  void *ud;
  int (*argref)(void *ud, lua_State *L, uint64_t id);
  void (*mkref)(void *ud, lua_State *L, uint64_t id);
  /* Set when the bytes lie in shared memory that extension objects may map
   * in place (zero-copy tensors); NULL: they copy. */
  const td_holder_t *holder;
  void *holder_ctx;
  char err[256];
} td_deser_t;

/* Decodes one value (or an argument list: pushes the count, then values
 * with td_deser_args) onto L. Returns 0 or TD_EPROTO / TD_ESER. */
int td_deser_value(td_deser_t *d, lua_State *L, const uint8_t *p, size_t n);
/* Pushes the arguments; *nargs receives their count. */
int td_deser_args(td_deser_t *d, lua_State *L, const uint8_t *p, size_t n, int *nargs);

/* Registry keys of the Lua hooks (set by the stdlib at startup). */
#define TD_HOOK_DUMPFN "tide.hook.dumpfn"   /* fn -> descriptor table */
#define TD_HOOK_LOADFN "tide.hook.loadfn"   /* descriptor -> fn */

/* Extension objects with raw bytes (tensors). Their metatable's
 * __tide_raw(obj) returns header, lightuserdata bytes, length (or nil to be
 * sent through __tide_ser); the module's __tide_deser_raw(header, bytes,
 * length [, holder, ctx]) rebuilds one: given a holder (lightuserdata
 * td_holder_t and its ctx) it may call hold(ctx), map the bytes in place,
 * read-only, and call release(ctx, bytes) when done with them; without one
 * it copies them. */
#define TD_REF_MT "tide.ObjectRef"

typedef struct td_ref_ud {
  uint64_t id;
} td_ref_ud_t;

#endif
