/* Tide worker process: what Lua code in a task or actor call writes to
 * the process's stdout or stderr (io.write, io.stdout:write,
 * io.stderr:write, io.output():write) goes to the node as the call's
 * output, in the channel in order with its prints, so that the node's log
 * index attributes it (tide logs task|actor) and its driver gets it.
 * Writes to other files, and writes while no call runs, are Lua's own.
 * Uses core (td_ctx: the channel, what runs now), chan, proto.
 */
#include <lauxlib.h>
#include <lualib.h>
#include <poll.h>
#include <stdio.h>
#include <stdio_ext.h>
#include <stdlib.h>
#include <string.h>

#include "proto.h"
#include "worker_int.h"

/* The hooks' upvalues: Lua's own function, the two files, and io.output
 * (io.write's only). */
enum { TD__UP_WRITE = 1, TD__UP_STDOUT, TD__UP_STDERR, TD__UP_OUTPUT };

/* A PRINT frame: u32 length, u8 type, u32 text length, text, then the tail. */
#define TD__HEAD 9
#define TD__TAIL 17 /* u64 task, u64 actor, u8 flags */
/* A frame's text at most: writes merged into one stay small frames, and
 * a huge write is sent in pieces, each far below TD_FRAME_MAX. */
#define TD__TEXT_MAX (1u << 20)
/* Lines on stdout go to the node at once when this long has passed since
 * the last went, or this many bytes wait: a burst of lines then costs one
 * send, not one a line, while a line now and then still goes at once. */
#define TD__LINE_S 0.01
#define TD__LINES_MAX (64u << 10)
/* Past this many unsent bytes a write waits for the node to take them,
 * as a write to a full pipe would: a task cannot fill memory with them. */
#define TD__PENDING_MAX (4u << 20)

/* The last write's frame, which the next write extends while it is the
 * channel's last frame, unsent, of the same call and stream. */
static struct {
  size_t at, end; /* where it begins and ends in td_ctx.ch.out (end 0: none) */
  uint64_t begun; /* the channel's count of frames just after it began */
} td__last;

/* What Lua's write returns on success: 1 the file (5.2 style), 0 true. */
static int td__ret_file = -1;
static double td__line_at; /* when lines last went to the node (td_now) */

/* -- Frames ------------------------------------------------------------------------- */

/* Reopens the last frame if it is (task, actor, flags)'s and unsent:
 * drops its tail so bytes can follow its text. Returns 1 if so. */
static int td__reopen(uint64_t task, uint64_t actor, uint8_t flags) {
  td_chan_t *ch = &td_ctx.ch;
  if (!td__last.end || ch->begun != td__last.begun || ch->out.len != td__last.end ||
      ch->out_off > td__last.at)
    return 0;
  const uint8_t *tail = ch->out.p + ch->out.len - TD__TAIL;
  uint64_t t, a;
  memcpy(&t, tail, 8);
  memcpy(&a, tail + 8, 8);
  if (t != task || a != actor || tail[16] != flags) return 0;
  ch->out.len -= TD__TAIL;
  return 1;
}

/* Begins a frame for (task, actor, flags), or reopens the last one if
 * it may (not when that one is full). Returns where it begins. */
static size_t td__open(uint64_t task, uint64_t actor, uint8_t flags, int reopen) {
  td_chan_t *ch = &td_ctx.ch;
  if (reopen && td__reopen(task, actor, flags)) return td__last.at;
  size_t at = ch->out.len;
  td_chan_begin(ch, TD_M_PRINT);
  td_buf_u32(&ch->out, 0); /* the text's length, set by td__close */
  return at;
}

static void td__close(size_t at, uint64_t task, uint64_t actor, uint8_t flags) {
  td_chan_t *ch = &td_ctx.ch;
  uint32_t tl = (uint32_t)(ch->out.len - at - TD__HEAD);
  memcpy(ch->out.p + at + 5, &tl, 4);
  td_buf_u64(&ch->out, task);
  td_buf_u64(&ch->out, actor);
  td_buf_u8(&ch->out, flags);
  td_chan_end(ch);
  td__last.at = at;
  td__last.end = ch->out.len;
  td__last.begun = ch->begun;
}

/* Sends arguments first..last (strings and numbers) as the running
 * call's bytes on stdout, or stderr with TD_PRINT_STDERR in flags. */
static void td__send(lua_State *L, int first, int last, uint8_t flags) {
  if (first > last) return;
  td_chan_t *ch = &td_ctx.ch;
  uint64_t task = td_ctx.cur_task ? td_ctx.cur_task : td_ctx.print_task, actor = td_ctx.cur_actor;
  FILE *f = flags & TD_PRINT_STDERR ? stderr : stdout;
  if (__fpending(f)) fflush(f); /* what stdio holds of the stream was written first */
  flags |= TD_PRINT_RAW;
  size_t at = td__open(task, actor, flags, 1);
  int eol = 0;
  for (int i = first; i <= last; i++) {
    char num[64];
    size_t l;
    const char *s = num;
    /* Numbers as Lua's write formats them (tostring may differ, e.g. nan). */
    if (lua_type(L, i) == LUA_TNUMBER)
      l = (size_t)snprintf(num, sizeof(num), LUA_NUMBER_FMT, lua_tonumber(L, i));
    else s = lua_tolstring(L, i, &l);
    eol |= memchr(s, '\n', l) != NULL;
    while (l) {
      size_t room = TD__TEXT_MAX - (ch->out.len - at - TD__HEAD);
      if (!room) {
        td__close(at, task, actor, flags);
        at = td__open(task, actor, flags, 0);
        continue;
      }
      size_t n = l < room ? l : room;
      td_buf_put(&ch->out, s, n);
      s += n, l -= n;
    }
  }
  td__close(at, task, actor, flags);
  size_t pending = ch->out.len - ch->out_off;
  if (flags & TD_PRINT_STDERR) {
    td_chan_flush(ch); /* unbuffered, as stdio's stderr */
  } else if (eol) {
    double now = td_now();
    if (now - td__line_at >= TD__LINE_S || pending >= TD__LINES_MAX) {
      td_chan_flush(ch);
      td__line_at = now;
    }
  }
  if (td_chan_pending(ch) && ch->out.len - ch->out_off > TD__PENDING_MAX) td_chan_flush_all(ch);
}

/* -- The hooks ------------------------------------------------------------------------ */

/* Which stream the file at idx is: 0 stdout, TD_PRINT_STDERR, -1 neither. */
static int td__stream(lua_State *L, int idx) {
  void *ud = lua_touserdata(L, idx);
  if (!ud) return -1;
  if (ud == lua_touserdata(L, lua_upvalueindex(TD__UP_STDOUT))) return 0;
  if (ud == lua_touserdata(L, lua_upvalueindex(TD__UP_STDERR))) return TD_PRINT_STDERR;
  return -1;
}

/* The first argument from first on that Lua's write cannot write (a
 * string or a number), or 0. Lua writes those before it and then raises:
 * so do the hooks, with Lua's message (td__raise). */
static int td__bad_arg(lua_State *L, int first) {
  for (int i = first, top = lua_gettop(L); i <= top; i++) {
    int t = lua_type(L, i);
    if (t != LUA_TSTRING && t != LUA_TNUMBER) return i;
  }
  return 0;
}

static int td__raise(lua_State *L, int bad) { return luaL_typerror(L, bad, "string"); }

/* Lua's own write with this call's arguments up to bad (0: all); then
 * raises for bad as Lua would (its own error would name no function). */
static int td__pass(lua_State *L, int bad) {
  if (bad) {
    lua_pushvalue(L, lua_upvalueindex(TD__UP_WRITE));
    for (int i = 1; i < bad; i++) lua_pushvalue(L, i);
    lua_call(L, bad - 1, 0);
    return td__raise(L, bad);
  }
  int n = lua_gettop(L);
  lua_pushvalue(L, lua_upvalueindex(TD__UP_WRITE));
  lua_insert(L, 1);
  lua_call(L, n, LUA_MULTRET);
  return lua_gettop(L);
}

/* What Lua's write returns on success; file: the index of the file. */
static int td__ok(lua_State *L, int file) {
  if (td__ret_file) lua_pushvalue(L, file);
  else lua_pushboolean(L, 1);
  return 1;
}

/* A call runs: a task, an actor's call, or its init (print_task). */
static int td__in_call(void) { return td_ctx.cur_task || td_ctx.print_task; }

/* file:write(...) */
static int td__file_write(lua_State *L) {
  FILE **fp = luaL_checkudata(L, 1, LUA_FILEHANDLE); /* Lua 5.1's layout, LuaJIT's too */
  if (!*fp) return luaL_error(L, "attempt to use a closed file");
  int bad = td__bad_arg(L, 2);
  int st = td__in_call() ? td__stream(L, 1) : -1;
  if (st < 0) return td__pass(L, bad);
  td__send(L, 2, bad ? bad - 1 : lua_gettop(L), (uint8_t)st);
  return bad ? td__raise(L, bad) : td__ok(L, 1);
}

/* io.write(...): to io.output(), which is stdout unless the code set it. */
static int td__io_write(lua_State *L) {
  int bad = td__bad_arg(L, 1);
  if (!td__in_call()) return td__pass(L, bad);
  lua_pushvalue(L, lua_upvalueindex(TD__UP_OUTPUT));
  lua_call(L, 0, 1);
  int st = td__stream(L, -1);
  if (st < 0) {
    lua_pop(L, 1);
    return td__pass(L, bad);
  }
  lua_insert(L, 1); /* the file first, the data after it */
  td__send(L, 2, bad ? bad : lua_gettop(L), (uint8_t)st);
  if (!bad) return td__ok(L, 1);
  lua_remove(L, 1); /* the arguments where the caller numbered them */
  return td__raise(L, bad);
}

/* file:flush() and io.flush() in a call: what the call wrote goes to the
 * node now (a partial line waits for its newline otherwise), then Lua's
 * own flush of the file. */
static int td__file_flush(lua_State *L) {
  FILE **fp = luaL_checkudata(L, 1, LUA_FILEHANDLE);
  if (!*fp) return luaL_error(L, "attempt to use a closed file");
  if (td__in_call()) td_chan_flush_all(&td_ctx.ch);
  return td__pass(L, 0);
}

static int td__io_flush(lua_State *L) {
  if (td__in_call()) td_chan_flush_all(&td_ctx.ch);
  return td__pass(L, 0);
}

/* os.exit in a task ends the process: what it wrote still goes to the
 * node, as stdio's buffers would have been written at exit. Bounded, so
 * that a node that does not read cannot keep the process. */
static void td__flush_at_exit(void) {
  td_chan_t *ch = &td_ctx.ch;
  for (int i = 0; i < 20 && td_chan_pending(ch); i++) {
    if (td_chan_flush(ch)) return;
    struct pollfd pfd = {ch->fd, POLLOUT, 0};
    if (td_chan_pending(ch)) poll(&pfd, 1, 100);
  }
}

/* Replaces t[name] (t at idx) by fn, with Lua's own function, stdout and
 * stderr (at so, so + 1) and io.output (at output, if not 0) as upvalues. */
static void td__hook(lua_State *L, int idx, const char *name, lua_CFunction fn, int so, int output) {
  lua_getfield(L, idx, name);
  lua_pushvalue(L, so);
  lua_pushvalue(L, so + 1);
  if (output) lua_pushvalue(L, output);
  lua_pushcclosure(L, fn, output ? 4 : 3);
  lua_setfield(L, idx, name);
}

void td__io_attribute(lua_State *L) {
  static int once;
  int top = lua_gettop(L);
  lua_getfield(L, LUA_REGISTRYINDEX, "_LOADED");
  lua_getfield(L, -1, "io");
  int io = lua_gettop(L);
  lua_getfield(L, io, "stdout");
  lua_getfield(L, io, "stderr");
  luaL_getmetatable(L, LUA_FILEHANDLE);
  lua_getfield(L, -1, "__index");
  int methods = lua_gettop(L);
  if (!lua_istable(L, io) || !lua_isuserdata(L, io + 1) || !lua_isuserdata(L, io + 2) ||
      !lua_istable(L, methods)) {
    lua_settop(L, top);
    return;
  }
  if (td__ret_file < 0) {
    lua_getfield(L, methods, "write"); /* writes nothing: how it answers */
    lua_pushvalue(L, io + 1);
    lua_call(L, 1, 1);
    td__ret_file = lua_isuserdata(L, -1);
    lua_pop(L, 1);
  }
  td__hook(L, methods, "write", td__file_write, io + 1, 0);
  td__hook(L, methods, "flush", td__file_flush, io + 1, 0);
  td__hook(L, io, "flush", td__io_flush, io + 1, 0);
  lua_getfield(L, io, "output");
  td__hook(L, io, "write", td__io_write, io + 1, lua_gettop(L));
  lua_settop(L, top);
  if (!once++) atexit(td__flush_at_exit);
}
