/* Tide value serialization (see ser.h for the format and the hooks). */
#include "ser.h"

#include <lauxlib.h>
#include <stdio.h>
#include <stdlib.h>

#define TD_SER_MAX_DEPTH 200

void td_ser_init(td_ser_t *s) {
  memset(s, 0, sizeof(*s));
  td_buf_init(&s->buf);
  td_buf_init(&s->path);
}

void td_ser_free(td_ser_t *s) {
  td_buf_free(&s->buf);
  td_buf_free(&s->path);
  free(s->seen.keys);
  free(s->seen.gens);
  free(s->seen.vals);
  free(s->segs);
  free(s->refs);
  free(s->deps);
  memset(s, 0, sizeof(*s));
}

static void td__ser_reset(td_ser_t *s) {
  td_buf_reset(&s->buf);
  td_buf_reset(&s->path);
  s->nsegs = s->nrefs = s->ndeps = 0;
  s->size = s->segbytes = 0;
  s->err[0] = s->why[0] = 0;
  s->depth = s->fndepth = s->nanchor = 0;
  s->nseen = 0;
  s->seen.len = 0;
  if (++s->seen.gen == 0) {  /* wrapped: stale slots could look current */
    if (s->seen.cap) memset(s->seen.gens, 0, s->seen.cap * sizeof(uint32_t));
    s->seen.gen = 1;
  }
}

/* -- The seen-tables set ------------------------------------------------------- */

static size_t td__ptr_hash(const void *p, size_t cap) {
  uint64_t h = (uint64_t)(uintptr_t)p * 0x9E3779B97F4A7C15ull;
  return (size_t)(h >> 17) & (cap - 1);
}

/* The index t was given when first encoded, or -1 (then it gets `next`). */
static long td__seen_get_or_add(td_ser_t *s, const void *t, uint32_t next) {
  if ((s->seen.len + 1) * 2 > s->seen.cap) {
    size_t oc = s->seen.cap, nc = oc ? oc * 2 : 64;
    const void **ok = s->seen.keys;
    uint32_t *og = s->seen.gens, *ov = s->seen.vals;
    s->seen.keys = td_xcalloc(nc, sizeof(void *));
    s->seen.gens = td_xcalloc(nc, sizeof(uint32_t));
    s->seen.vals = td_xcalloc(nc, sizeof(uint32_t));
    s->seen.cap = nc;
    for (size_t i = 0; i < oc; i++) {
      if (og[i] != s->seen.gen) continue;
      size_t j = td__ptr_hash(ok[i], nc);
      while (s->seen.gens[j] == s->seen.gen) j = (j + 1) & (nc - 1);
      s->seen.keys[j] = ok[i], s->seen.gens[j] = s->seen.gen, s->seen.vals[j] = ov[i];
    }
    free(ok), free(og), free(ov);
  }
  size_t j = td__ptr_hash(t, s->seen.cap);
  while (s->seen.gens[j] == s->seen.gen) {
    if (s->seen.keys[j] == t) return (long)s->seen.vals[j];
    j = (j + 1) & (s->seen.cap - 1);
  }
  s->seen.keys[j] = t, s->seen.gens[j] = s->seen.gen, s->seen.vals[j] = next;
  s->seen.len++;
  return -1;
}

static void td__push_id(uint64_t **v, int *n, int *cap, uint64_t id) {
  if (*n == *cap) {
    *cap = *cap ? *cap * 2 : 8;
    *v = td_xrealloc(*v, (size_t)*cap * sizeof(uint64_t));
  }
  (*v)[(*n)++] = id;
}

/* Records why encoding failed; the place ("field a.b") is added while the
 * failure unwinds (td__path_prepend) and the message composed at the top
 * (td__ser_compose), so the way down costs nothing. */
static int td__ser_fail(td_ser_t *s, const char *what, const char *fmt, const char *arg) {
  snprintf(s->why, sizeof(s->why), fmt, arg);
  s->what = what;
  td_buf_reset(&s->path);
  return TD_ESER;
}

static void td__ser_compose(td_ser_t *s) {
  char whatbuf[48];
  const char *what = s->what;
  /* Argument names are formatted only when something fails. */
  if (!what) {
    snprintf(whatbuf, sizeof(whatbuf), "argument %d", s->argi);
    what = whatbuf;
  }
  if (s->path.len)
    snprintf(s->err, sizeof(s->err), "%s (%s, field \"%.*s\")", s->why, what,
             (int)s->path.len, (const char *)s->path.p);
  else
    snprintf(s->err, sizeof(s->err), "%s (%s)", s->why, what);
}

static int td__is_ref(lua_State *L, int idx) {
  if (!lua_getmetatable(L, idx)) return 0;
  luaL_getmetatable(L, TD_REF_MT);
  int eq = lua_rawequal(L, -1, -2);
  lua_pop(L, 2);
  return eq;
}

/* A failure under key kidx unwinds through this table: the key goes in
 * front of the place found so far. */
static void td__path_prepend(td_ser_t *s, lua_State *L, int kidx) {
  char tmp[64];
  const char *k = tmp;
  size_t n;
  if (lua_type(L, kidx) == LUA_TSTRING) {
    k = lua_tolstring(L, kidx, &n);
  } else if (lua_type(L, kidx) == LUA_TNUMBER) {
    n = (size_t)snprintf(tmp, sizeof(tmp), "[%.14g]", lua_tonumber(L, kidx));
  } else {
    n = (size_t)snprintf(tmp, sizeof(tmp), "[<%s>]", luaL_typename(L, kidx));
  }
  int dot = s->path.len && s->path.p[0] != '[';
  size_t old = s->path.len, add = n + (size_t)dot;
  td_buf_reserve(&s->path, add);
  memmove(s->path.p + add, s->path.p, old);
  memcpy(s->path.p, k, n);
  if (dot) s->path.p[n] = '.';
  s->path.len = old + add;
}

static int td__ser(td_ser_t *s, lua_State *L, int idx, const char *what);

static int td__ser_table(td_ser_t *s, lua_State *L, int idx, const char *what) {
  /* Shared and cyclic tables are sent once and referred back to. */
  long at = td__seen_get_or_add(s, lua_topointer(L, idx), (uint32_t)s->nseen);
  if (at >= 0) {
    td_buf_u8(&s->buf, TD_T_BACK);
    td_buf_u32(&s->buf, (uint32_t)at);
    return 0;
  }
  s->nseen++;

  size_t narr = lua_objlen(L, idx);
  int allnum = 1;
  for (size_t i = 1; i <= narr; i++) {
    lua_rawgeti(L, idx, (int)i);
    if (lua_isnil(L, -1)) { lua_pop(L, 1); narr = i - 1; break; }
    if (lua_type(L, -1) != LUA_TNUMBER) allnum = 0;
    lua_pop(L, 1);
  }
  if (allnum && narr >= 16) {
    /* A plain array of numbers, if nothing else is in the table. */
    lua_pushnil(L);
    int other = 0;
    while (!other && lua_next(L, idx)) {
      lua_pop(L, 1);
      lua_Number k = lua_type(L, -1) == LUA_TNUMBER ? lua_tonumber(L, -1) : 0;
      other = !(k >= 1 && k <= (lua_Number)narr && k == (lua_Number)(size_t)k);
      if (other) lua_pop(L, 1);
    }
    if (!other) {
      td_buf_u8(&s->buf, TD_T_NUMARR);
      td_buf_u32(&s->buf, (uint32_t)narr);
      td_buf_reserve(&s->buf, narr * 8);
      for (size_t i = 1; i <= narr; i++) {
        lua_rawgeti(L, idx, (int)i);
        double v = lua_tonumber(L, -1);
        lua_pop(L, 1);
        memcpy(s->buf.p + s->buf.len, &v, 8);
        s->buf.len += 8;
      }
      return 0;
    }
  }
  td_buf_u8(&s->buf, TD_T_TABLE);
  td_buf_u32(&s->buf, (uint32_t)narr);
  size_t nhash_at = s->buf.len;  /* counted while writing, patched after */
  td_buf_u32(&s->buf, 0);
  for (size_t i = 1; i <= narr; i++) {
    lua_rawgeti(L, idx, (int)i);
    int rc = td__ser(s, L, lua_gettop(L), what);
    if (rc) {
      lua_pushinteger(L, (lua_Integer)i);
      td__path_prepend(s, L, lua_gettop(L));
      lua_pop(L, 2);
      return rc;
    }
    lua_pop(L, 1);
  }
  uint32_t nhash = 0;
  lua_pushnil(L);
  while (lua_next(L, idx)) {
    int k = lua_gettop(L) - 1, v = lua_gettop(L);
    if (lua_type(L, k) == LUA_TNUMBER) {
      lua_Number kn = lua_tonumber(L, k);
      if (kn >= 1 && kn <= (lua_Number)narr && kn == (lua_Number)(size_t)kn) {
        lua_pop(L, 1);
        continue;
      }
    }
    int rc = td__ser(s, L, k, what);
    if (!rc) rc = td__ser(s, L, v, what);
    if (rc) {
      td__path_prepend(s, L, k);
      lua_pop(L, 2);
      return rc;
    }
    nhash++;
    lua_pop(L, 1);
  }
  memcpy(s->buf.p + nhash_at, &nhash, 4);
  return 0;
}

/* A function's descriptor (the table on top) is made fresh by the dump
 * hook and dropped once encoded; the seen-set knows tables by address,
 * so a descriptor collected mid-encoding could hand its address to a
 * table made later (the next function's descriptor, or its upvalues) and
 * that table would go out as a back reference to the dead one: the wrong
 * upvalues, or "bad function descriptor" at the reader. Descriptors are
 * kept in a registry table until the encoding ends (td__unanchor). */
#define TD__ANCHOR "tide.ser.anchor"

static void td__anchor(td_ser_t *s, lua_State *L) {
  lua_getfield(L, LUA_REGISTRYINDEX, TD__ANCHOR);
  if (!lua_istable(L, -1)) {
    lua_pop(L, 1);
    lua_newtable(L);
    lua_pushvalue(L, -1);
    lua_setfield(L, LUA_REGISTRYINDEX, TD__ANCHOR);
  }
  lua_pushvalue(L, -2);
  lua_rawseti(L, -2, ++s->nanchor);
  lua_pop(L, 1);
}

static void td__unanchor(td_ser_t *s, lua_State *L) {
  if (!s->nanchor) return;
  lua_pushnil(L);
  lua_setfield(L, LUA_REGISTRYINDEX, TD__ANCHOR);
  s->nanchor = 0;
}

/* Bytes kept outside the buffer and copied once by td_ser_copy. */
static void td__seg_add(td_ser_t *s, const void *p, size_t n) {
  if (s->nsegs == s->capsegs) {
    s->capsegs = s->capsegs ? s->capsegs * 2 : 4;
    s->segs = td_xrealloc(s->segs, (size_t)s->capsegs * sizeof(td_seg_t));
  }
  s->segs[s->nsegs++] = (td_seg_t){s->buf.len, p, n};
  s->segbytes += n;
}

/* An object's raw bytes (the stack holds header, bytes, length): aligned to
 * 64 bytes from the start of the encoding, so that a store extent holding
 * it can be mapped in place by the reader. */
static void td__ser_raw(td_ser_t *s, lua_State *L, const char *mod, size_t mlen) {
  size_t hlen;
  const char *h = lua_tolstring(L, -3, &hlen);
  const void *p = lua_touserdata(L, -2);
  size_t n = (size_t)lua_tonumber(L, -1);
  td_buf_u8(&s->buf, TD_T_EXTRAW);
  td_buf_str(&s->buf, mod, mlen);
  td_buf_str(&s->buf, h, hlen);
  td_buf_u64(&s->buf, n);
  size_t at = s->buf.len + s->segbytes + 1;
  uint8_t pad = (uint8_t)((64 - at % 64) % 64);
  td_buf_u8(&s->buf, pad);
  td_buf_reserve(&s->buf, pad);
  memset(s->buf.p + s->buf.len, 0, pad);
  s->buf.len += pad;
  if (n >= TD_SER_SEG_MIN) td__seg_add(s, p, n);
  else td_buf_put(&s->buf, p, n);
}

/* Objects whose metatable carries __tide_ser (tensors, actor handles,
 * remote functions) are sent as module name + blob, or + raw bytes when
 * __tide_raw gives them. */
static int td__ser_ext(td_ser_t *s, lua_State *L, int idx, const char *what, int *handled) {
  *handled = 0;
  if (!lua_getmetatable(L, idx)) return 0;
  int top = lua_gettop(L) - 1, mt = top + 1, rc = 0;
  lua_getfield(L, mt, "__tide_ser");
  if (!lua_isfunction(L, -1)) { lua_settop(L, top); return 0; }
  *handled = 1;
  lua_getfield(L, mt, "__tide_module");
  if (lua_type(L, -1) != LUA_TSTRING) {
    lua_settop(L, top);
    return td__ser_fail(s, what, "cannot send a %s: its metatable has no __tide_module", luaL_typename(L, idx));
  }
  size_t mlen;
  const char *mod = lua_tolstring(L, -1, &mlen);
  lua_getfield(L, mt, "__tide_raw");
  if (lua_isfunction(L, -1)) {
    lua_pushvalue(L, idx);
    if (lua_pcall(L, 1, 3, 0) != 0) {
      rc = td__ser_fail(s, what, "cannot send an object: %s",
                        lua_isstring(L, -1) ? lua_tostring(L, -1) : "__tide_raw failed");
    } else if (lua_type(L, -3) == LUA_TSTRING && lua_islightuserdata(L, -2) && lua_isnumber(L, -1)) {
      td__ser_raw(s, L, mod, mlen);
    } else {
      lua_settop(L, mt + 2);
      goto blob;  /* no raw bytes for this one (a device tensor, a view) */
    }
    lua_settop(L, top);
    return rc;
  }
  lua_pop(L, 1);
blob:
  lua_pushvalue(L, mt + 1);
  lua_pushvalue(L, idx);
  if (lua_pcall(L, 1, 1, 0) != 0 || lua_type(L, -1) != LUA_TSTRING) {
    const char *e = lua_type(L, -1) == LUA_TSTRING ? lua_tostring(L, -1) : "__tide_ser did not return a string";
    rc = td__ser_fail(s, what, "cannot send an object: %s", e);
    lua_settop(L, top);
    return rc;
  }
  size_t blen;
  const char *blob = lua_tolstring(L, -1, &blen);
  td_buf_u8(&s->buf, TD_T_EXT);
  td_buf_str(&s->buf, mod, mlen);
  td_buf_str(&s->buf, blob, blen);
  lua_settop(L, top);
  return 0;
}

static int td__ser(td_ser_t *s, lua_State *L, int idx, const char *what) {
  switch (lua_type(L, idx)) {
    case LUA_TNIL: td_buf_u8(&s->buf, TD_T_NIL); return 0;
    case LUA_TBOOLEAN:
      td_buf_u8(&s->buf, lua_toboolean(L, idx) ? TD_T_TRUE : TD_T_FALSE);
      return 0;
    case LUA_TNUMBER:
      td_buf_u8(&s->buf, TD_T_NUM);
      td_buf_f64(&s->buf, lua_tonumber(L, idx));
      return 0;
    case LUA_TSTRING: {
      size_t n;
      const char *p = lua_tolstring(L, idx, &n);
      td_buf_u8(&s->buf, TD_T_STR);
      td_buf_u32(&s->buf, (uint32_t)n);
      /* Not inside a function's descriptor: its strings (the bytecode) die
       * with it when the encoding ends, before td_ser_copy reads them. */
      if (n >= TD_SER_SEG_MIN && !s->fndepth) td__seg_add(s, p, n);
      else td_buf_put(&s->buf, p, n);
      return 0;
    }
    case LUA_TTABLE: {
      int handled, rc;
      if (s->depth >= TD_SER_MAX_DEPTH)
        return td__ser_fail(s, what, "%s", "cannot send a table nested more than 200 levels deep");
      rc = td__ser_ext(s, L, idx, what, &handled);
      if (handled) return rc;
      s->depth++;
      rc = td__ser_table(s, L, idx, what);
      s->depth--;
      return rc;
    }
    case LUA_TUSERDATA: {
      if (td__is_ref(L, idx)) {
        uint64_t id = ((td_ref_ud_t *)lua_touserdata(L, idx))->id;
        if (!id) return td__ser_fail(s, what, "%s", "cannot send a released ObjectRef");
        td_buf_u8(&s->buf, TD_T_REF);
        td_buf_u64(&s->buf, id);
        td__push_id(&s->refs, &s->nrefs, &s->caprefs, id);
        return 0;
      }
      int handled, rc = td__ser_ext(s, L, idx, what, &handled);
      if (handled) return rc;
      return td__ser_fail(s, what, "cannot send a %s", "userdata");
    }
    case LUA_TFUNCTION: {
      if (lua_iscfunction(L, idx))
        return td__ser_fail(s, what, "cannot send a %s", "C function");
      if (s->depth >= TD_SER_MAX_DEPTH)
        return td__ser_fail(s, what, "%s", "cannot send functions nested more than 200 levels deep");
      lua_getfield(L, LUA_REGISTRYINDEX, TD_HOOK_DUMPFN);
      if (!lua_isfunction(L, -1)) {
        lua_pop(L, 1);
        return td__ser_fail(s, what, "cannot send a %s (no function hook)", "function");
      }
      lua_pushvalue(L, idx);
      if (lua_pcall(L, 1, 1, 0) != 0 || !lua_istable(L, -1)) {
        const char *e = lua_type(L, -1) == LUA_TSTRING ? lua_tostring(L, -1) : "bad descriptor";
        int rc = td__ser_fail(s, what, "cannot send a function: %s", e);
        lua_pop(L, 1);
        return rc;
      }
      td__anchor(s, L);
      td_buf_u8(&s->buf, TD_T_FUNC);
      s->depth++;
      s->fndepth++;
      int rc = td__ser_table(s, L, lua_gettop(L), what);
      s->fndepth--;
      s->depth--;
      lua_pop(L, 1);
      return rc;
    }
    case LUA_TTHREAD: return td__ser_fail(s, what, "cannot send a %s", "coroutine");
    case LUA_TLIGHTUSERDATA:
      /* NULL is cjson.null (what read_jsonl makes of JSON's null): it
       * arrives as NULL, equal to the receiver's cjson.null. */
      if (!lua_touserdata(L, idx)) {
        td_buf_u8(&s->buf, TD_T_NULL);
        return 0;
      }
      return td__ser_fail(s, what, "cannot send a %s", "light userdata");
    default: return td__ser_fail(s, what, "cannot send a %s", luaL_typename(L, idx));
  }
}

static void td__ser_finish(td_ser_t *s) {
  s->size = s->buf.len;
  for (int i = 0; i < s->nsegs; i++) s->size += s->segs[i].n;
}

int td_ser_value(td_ser_t *s, lua_State *L, int idx, const char *what) {
  if (idx < 0) idx = lua_gettop(L) + idx + 1;
  td__ser_reset(s);
  int top = lua_gettop(L);
  int rc = td__ser(s, L, idx, what);
  lua_settop(L, top);
  td__unanchor(s, L);
  if (rc == TD_ESER) td__ser_compose(s);
  td__ser_finish(s);
  return rc;
}

int td_ser_args(td_ser_t *s, lua_State *L, int first, int n) {
  td__ser_reset(s);
  int top = lua_gettop(L);
  td_buf_u32(&s->buf, (uint32_t)n);
  int rc = 0;
  for (int i = 0; i < n && !rc; i++) {
    int idx = first + i;
    if (lua_type(L, idx) == LUA_TUSERDATA && td__is_ref(L, idx)) {
      uint64_t id = ((td_ref_ud_t *)lua_touserdata(L, idx))->id;
      if (!id) {
        s->argi = i + 1;
        rc = td__ser_fail(s, NULL, "%s", "cannot send a released ObjectRef");
        break;
      }
      td_buf_u8(&s->buf, TD_T_ARGREF);
      td_buf_u64(&s->buf, id);
      td__push_id(&s->deps, &s->ndeps, &s->capdeps, id);
      continue;
    }
    s->argi = i + 1;
    rc = td__ser(s, L, idx, NULL);
  }
  lua_settop(L, top);
  td__unanchor(s, L);
  if (rc == TD_ESER) td__ser_compose(s);
  td__ser_finish(s);
  return rc;
}

void td_ser_copy(const td_ser_t *s, void *dst) {
  uint8_t *d = dst;
  size_t from = 0;
  for (int i = 0; i < s->nsegs; i++) {
    memcpy(d, s->buf.p + from, s->segs[i].at - from);
    d += s->segs[i].at - from;
    memcpy(d, s->segs[i].p, s->segs[i].n);
    d += s->segs[i].n;
    from = s->segs[i].at;
  }
  memcpy(d, s->buf.p + from, s->buf.len - from);
}

void td_ser_append(const td_ser_t *s, td_buf_t *b) {
  td_buf_reserve(b, s->size);
  td_ser_copy(s, b->p + b->len);
  b->len += s->size;
}

/* -- Decoder -------------------------------------------------------------- */

typedef struct td__dctx {
  td_deser_t *d;
  td_rd_t r;
  int seen;   /* stack index of the array of decoded tables */
  int nseen;
  int depth;
} td__dctx_t;

static int td__de(td__dctx_t *c, lua_State *L);

static int td__de_fail(td__dctx_t *c, const char *msg) {
  if (!c->d->err[0]) snprintf(c->d->err, sizeof(c->d->err), "%s", msg);
  return TD_EPROTO;
}

static int td__de_table_body(td__dctx_t *c, lua_State *L) {
  uint32_t narr = td_rd_u32(&c->r), nhash = td_rd_u32(&c->r);
  if (c->r.bad || narr > (size_t)(c->r.end - c->r.p) || nhash > (size_t)(c->r.end - c->r.p))
    return td__de_fail(c, "truncated table");
  lua_createtable(L, (int)narr, (int)nhash);
  int t = lua_gettop(L);
  lua_pushvalue(L, t);
  lua_rawseti(L, c->seen, ++c->nseen);
  for (uint32_t i = 1; i <= narr; i++) {
    int rc = td__de(c, L);
    if (rc) return rc;
    lua_rawseti(L, t, (int)i);
  }
  for (uint32_t i = 0; i < nhash; i++) {
    int rc = td__de(c, L);
    if (!rc) rc = td__de(c, L);
    if (rc) return rc;
    if (lua_isnil(L, -2) || (lua_type(L, -2) == LUA_TNUMBER && lua_tonumber(L, -2) != lua_tonumber(L, -2)))
      return td__de_fail(c, "table key is nil or NaN");
    lua_rawset(L, t);
  }
  return 0;
}

/* Pushes the decoding hook `name` of module m (loaded with require). */
static int td__de_hook(td__dctx_t *c, lua_State *L, const uint8_t *m, uint32_t mn, const char *name) {
  lua_getglobal(L, "require");
  lua_pushlstring(L, (const char *)m, mn);
  if (lua_pcall(L, 1, 1, 0) != 0 || !lua_istable(L, -1)) {
    snprintf(c->d->err, sizeof(c->d->err), "cannot load module %.*s for a received object: %s", (int)mn,
             m, lua_type(L, -1) == LUA_TSTRING ? lua_tostring(L, -1) : "?");
    return TD_ESER;
  }
  lua_getfield(L, -1, name);
  lua_remove(L, -2);
  if (!lua_isfunction(L, -1)) {
    snprintf(c->d->err, sizeof(c->d->err), "module %.*s has no %s", (int)mn, m, name);
    return TD_ESER;
  }
  return 0;
}

/* Calls the hook under the arguments pushed after it; leaves its value. */
static int td__de_call(td__dctx_t *c, lua_State *L, const uint8_t *m, uint32_t mn, int nargs) {
  if (lua_pcall(L, nargs, 1, 0) == 0) return 0;
  snprintf(c->d->err, sizeof(c->d->err), "cannot decode a %.*s object: %s", (int)mn, m,
           lua_type(L, -1) == LUA_TSTRING ? lua_tostring(L, -1) : "?");
  return TD_ESER;
}

static int td__de(td__dctx_t *c, lua_State *L) {
  if (++c->depth > TD_SER_MAX_DEPTH + 2) return td__de_fail(c, "nesting too deep");
  if (!lua_checkstack(L, 8)) return td__de_fail(c, "Lua stack overflow");
  uint8_t tag = td_rd_u8(&c->r);
  if (c->r.bad) return td__de_fail(c, "truncated value");
  int rc = 0;
  switch (tag) {
    case TD_T_NIL: lua_pushnil(L); break;
    case TD_T_NULL: lua_pushlightuserdata(L, NULL); break;
    case TD_T_FALSE: lua_pushboolean(L, 0); break;
    case TD_T_TRUE: lua_pushboolean(L, 1); break;
    case TD_T_NUM: lua_pushnumber(L, td_rd_f64(&c->r)); break;
    case TD_T_STR: {
      uint32_t n;
      const uint8_t *p = td_rd_str(&c->r, &n);
      if (c->r.bad) return td__de_fail(c, "truncated string");
      lua_pushlstring(L, (const char *)p, n);
      break;
    }
    case TD_T_TABLE: rc = td__de_table_body(c, L); break;
    case TD_T_BACK: {
      uint32_t at = td_rd_u32(&c->r);
      if (c->r.bad || at >= (uint32_t)c->nseen) return td__de_fail(c, "bad back reference");
      lua_rawgeti(L, c->seen, (int)at + 1);
      break;
    }
    case TD_T_REF: {
      uint64_t id = td_rd_u64(&c->r);
      if (c->r.bad || !c->d->mkref) return td__de_fail(c, "bad object ref");
      c->d->mkref(c->d->ud, L, id);
      break;
    }
    case TD_T_ARGREF: {
      uint64_t id = td_rd_u64(&c->r);
      if (c->r.bad || !c->d->argref) return td__de_fail(c, "bad argument ref");
      if (c->d->argref(c->d->ud, L, id)) return TD_ESER;
      break;
    }
    case TD_T_NUMARR: {
      uint32_t n = td_rd_u32(&c->r);
      const uint8_t *p = td_rd_bytes(&c->r, (size_t)n * 8);
      if (!p) return td__de_fail(c, "truncated number array");
      lua_createtable(L, (int)n, 0);
      lua_pushvalue(L, -1);
      lua_rawseti(L, c->seen, ++c->nseen);
      for (uint32_t i = 0; i < n; i++) {
        double v;
        memcpy(&v, p + (size_t)i * 8, 8);
        lua_pushnumber(L, v);
        lua_rawseti(L, -2, (int)i + 1);
      }
      break;
    }
    case TD_T_FUNC: {
      if (td_rd_u8(&c->r) != TD_T_TABLE) return td__de_fail(c, "bad function descriptor");
      lua_getfield(L, LUA_REGISTRYINDEX, TD_HOOK_LOADFN);
      if (!lua_isfunction(L, -1)) return td__de_fail(c, "no function loader");
      rc = td__de_table_body(c, L);
      if (rc) return rc;
      if (lua_pcall(L, 1, 1, 0) != 0) {
        snprintf(c->d->err, sizeof(c->d->err), "cannot load function: %s",
                 lua_type(L, -1) == LUA_TSTRING ? lua_tostring(L, -1) : "?");
        return TD_ESER;
      }
      break;
    }
    case TD_T_EXT: {
      uint32_t mn, bn;
      const uint8_t *m = td_rd_str(&c->r, &mn);
      const uint8_t *b = td_rd_str(&c->r, &bn);
      if (c->r.bad) return td__de_fail(c, "truncated extension object");
      if ((rc = td__de_hook(c, L, m, mn, "__tide_deser"))) return rc;
      lua_pushlstring(L, (const char *)b, bn);
      rc = td__de_call(c, L, m, mn, 1);
      break;
    }
    case TD_T_EXTRAW: {
      uint32_t mn, hn;
      const uint8_t *m = td_rd_str(&c->r, &mn);
      const uint8_t *h = td_rd_str(&c->r, &hn);
      uint64_t n = td_rd_u64(&c->r);
      td_rd_bytes(&c->r, td_rd_u8(&c->r));
      const uint8_t *b = c->r.bad || n > (uint64_t)(c->r.end - c->r.p) ? NULL : td_rd_bytes(&c->r, (size_t)n);
      if (!b) return td__de_fail(c, "truncated extension object");
      if ((rc = td__de_hook(c, L, m, mn, "__tide_deser_raw"))) return rc;
      lua_pushlstring(L, (const char *)h, hn);
      lua_pushlightuserdata(L, (void *)b);
      lua_pushnumber(L, (lua_Number)n);
      int nargs = 3;
      if (c->d->holder) {
        lua_pushlightuserdata(L, (void *)c->d->holder);
        lua_pushlightuserdata(L, c->d->holder_ctx);
        nargs = 5;
      }
      rc = td__de_call(c, L, m, mn, nargs);
      break;
    }
    default: return td__de_fail(c, "unknown value tag");
  }
  c->depth--;
  return rc;
}

static void td__dctx_init(td__dctx_t *c, td_deser_t *d, lua_State *L, const uint8_t *p, size_t n) {
  c->d = d;
  d->err[0] = 0;
  td_rd_init(&c->r, p, n);
  lua_newtable(L);
  c->seen = lua_gettop(L);
  c->nseen = 0;
  c->depth = 0;
}

int td_deser_value(td_deser_t *d, lua_State *L, const uint8_t *p, size_t n) {
  td__dctx_t c;
  int top = lua_gettop(L);
  td__dctx_init(&c, d, L, p, n);
  int rc = td__de(&c, L);
  if (rc) { lua_settop(L, top); return rc; }
  lua_remove(L, c.seen);
  return 0;
}

int td_deser_args(td_deser_t *d, lua_State *L, const uint8_t *p, size_t n, int *nargs) {
  td__dctx_t c;
  int top = lua_gettop(L);
  td__dctx_init(&c, d, L, p, n);
  uint32_t cnt = td_rd_u32(&c.r);
  if (c.r.bad || cnt > 100000) { lua_settop(L, top); return td__de_fail(&c, "bad argument count"); }
  for (uint32_t i = 0; i < cnt; i++) {
    int rc = td__de(&c, L);
    if (rc) { lua_settop(L, top); return rc; }
  }
  lua_remove(L, c.seen);
  *nargs = (int)cnt;
  return 0;
}
