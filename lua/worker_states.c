/* Tide worker process: the Lua states it runs code in (see worker.c).
 * The task worker's full state and an actor's lightweight one (libraries
 * that load on first use, a C loader for functions, print and os.exit for
 * a state that shares its process); the process's cache of function and
 * class definitions (td__load_fn); and a task's arguments decoded onto a
 * state with the values of its dependencies (td__push_args).
 * Uses core (bindings), ser, proto.
 */
#include <lauxlib.h>
#include <lualib.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

#include "core.h"
#include "worker_int.h"

/* -- Lua states -------------------------------------------------------------------- */

/* -- Lightweight actor states --------------------------------------------------
 * An actor's state opens only the libraries every script expects at once;
 * io, debug, jit, ffi and the capture module load on first use. Functions
 * are loaded by a C loader, so a new state parses no Lua source. */

static const char *const td__restore_marks[] = {"\0tide.self", "\0tide.mod", "\0tide.cfn"};

/* Replaces a capture marker table at the top of L by what it stands for. */
static void td__restore(lua_State *L, int fn) {
  if (!lua_istable(L, -1)) return;
  lua_pushstring(L, td__restore_marks[0]);
  lua_rawget(L, -2);
  if (lua_toboolean(L, -1)) {
    lua_pop(L, 2);
    lua_pushvalue(L, fn);
    return;
  }
  lua_pop(L, 1);
  lua_pushlstring(L, td__restore_marks[1], 9);
  lua_rawget(L, -2);
  if (lua_isstring(L, -1)) {
    lua_remove(L, -2);
    if (!strcmp(lua_tostring(L, -1), "_G")) {
      lua_pop(L, 1);
      lua_pushvalue(L, LUA_GLOBALSINDEX);
      return;
    }
    lua_getglobal(L, "require");
    lua_insert(L, -2);
    lua_call(L, 1, 1);
    return;
  }
  lua_pop(L, 1);
  lua_pushlstring(L, td__restore_marks[2], 9);
  lua_rawget(L, -2);
  if (lua_isstring(L, -1)) {
    /* "lib.name" or "name" */
    char path[128];
    snprintf(path, sizeof(path), "%s", lua_tostring(L, -1));
    lua_pop(L, 2);
    char *dot = strchr(path, '.');
    if (dot) {
      *dot = 0;
      lua_getglobal(L, path);
      lua_getfield(L, -1, dot + 1);
      lua_remove(L, -2);
    } else {
      lua_getglobal(L, path);
    }
    return;
  }
  lua_pop(L, 1);
}

/* loadfn hook: descriptor {bc, nup, up, g} -> function. */
static int td__c_loadfn(lua_State *L) {
  luaL_checktype(L, 1, LUA_TTABLE);
  lua_getfield(L, 1, "bc");
  size_t n;
  const char *bc = lua_tolstring(L, -1, &n);
  if (!bc || luaL_loadbuffer(L, bc, n, "=remote") != 0) return luaL_error(L, "cannot load function bytecode");
  int fn = lua_gettop(L);
  lua_getfield(L, 1, "nup");
  int nup = (int)lua_tointeger(L, -1);
  lua_pop(L, 1);
  lua_getfield(L, 1, "up");
  int up = lua_gettop(L);
  for (int i = 1; i <= nup; i++) {
    lua_rawgeti(L, up, i);
    if (lua_isnil(L, -1)) {
      lua_pop(L, 1);
      continue;
    }
    td__restore(L, fn);
    lua_setupvalue(L, fn, i);
  }
  lua_getfield(L, 1, "g");
  if (lua_istable(L, -1)) {
    int g = lua_gettop(L);
    lua_newtable(L);
    int env = lua_gettop(L);
    lua_pushnil(L);
    while (lua_next(L, g)) {
      td__restore(L, fn);
      lua_pushvalue(L, -2);
      lua_insert(L, -2);
      lua_rawset(L, env);
    }
    lua_newtable(L);
    lua_pushvalue(L, LUA_GLOBALSINDEX);
    lua_setfield(L, -2, "__index");
    lua_pushvalue(L, LUA_GLOBALSINDEX);
    lua_setfield(L, -2, "__newindex");
    lua_setmetatable(L, env);
    lua_setfenv(L, fn);
  }
  lua_settop(L, fn);
  return 1;
}

/* dumpfn hook for actor states: the capture module loads on first use. */
static int td__c_dumpfn(lua_State *L) {
  lua_getglobal(L, "require");
  lua_pushliteral(L, "tide.capture");
  lua_call(L, 1, 1);
  lua_getfield(L, -1, "dumpfn");
  lua_pushvalue(L, 1);
  lua_call(L, 1, 1);
  return 1;
}

static int td__c_print(lua_State *L) {
  int n = lua_gettop(L);
  luaL_Buffer b;
  luaL_buffinit(L, &b);
  char pre[200];
  snprintf(pre, sizeof(pre), "(%s pid=%d) ", td_ctx.cur_name[0] ? td_ctx.cur_name : "actor", (int)getpid());
  luaL_addstring(&b, pre);
  for (int i = 1; i <= n; i++) {
    lua_getglobal(L, "tostring");
    lua_pushvalue(L, i);
    lua_call(L, 1, 1);
    if (i > 1) luaL_addchar(&b, '\t');
    luaL_addvalue(&b);
  }
  luaL_addchar(&b, '\n');
  luaL_pushresult(&b);
  size_t len;
  const char *s = lua_tolstring(L, -1, &len);
  td_chan_begin(&td_ctx.ch, TD_M_PRINT);
  td_buf_str(&td_ctx.ch.out, s, len);
  td_buf_u64(&td_ctx.ch.out, td_ctx.cur_task ? td_ctx.cur_task : td_ctx.print_task); /* to its driver */
  td_buf_u64(&td_ctx.ch.out, td_ctx.cur_actor); /* its log's index slices by both */
  td_chan_end(&td_ctx.ch);
  return 0;
}

static int td__c_exit(lua_State *L) {
  lua_createtable(L, 0, 1);
  lua_pushboolean(L, 1);
  lua_setfield(L, -2, "__tide_exit");
  return lua_error(L);
}

/* _G's __index: opens io, debug, jit and ffi the first time they are named. */
static int td__lazy_global(lua_State *L) {
  const char *k = lua_tostring(L, 2);
  lua_CFunction open = NULL;
  if (!k) return 0;
  if (!strcmp(k, "io")) open = luaopen_io;
  else if (!strcmp(k, "debug")) open = luaopen_debug;
  else if (!strcmp(k, "jit")) open = luaopen_jit;
  else return 0;
  lua_pushcfunction(L, open);
  lua_pushstring(L, k);
  lua_call(L, 1, 0);
  if (open == luaopen_io) td__io_attribute(L);
  lua_rawget(L, 1);
  return 1;
}

/* package.preload for jit.util / jit.opt: opening jit registers them. */
static int td__preload_jit_sub(lua_State *L) {
  const char *name = luaL_checkstring(L, 1);
  /* require left a sentinel in _LOADED[name]; the library replaces it. */
  lua_getfield(L, LUA_REGISTRYINDEX, "_LOADED");
  lua_pushnil(L);
  lua_setfield(L, -2, name);
  lua_pushcfunction(L, luaopen_jit);
  lua_pushliteral(L, "jit");
  lua_call(L, 1, 1);
  lua_setglobal(L, "jit");
  /* Opening jit pre-registers the real loaders of its submodules. */
  lua_getfield(L, LUA_REGISTRYINDEX, "_PRELOAD");
  lua_getfield(L, -1, name);
  if (lua_tocfunction(L, -1) != td__preload_jit_sub && lua_isfunction(L, -1)) {
    lua_pushstring(L, name);
    lua_call(L, 1, 1);
    return 1;
  }
  lua_getfield(L, -4, name);
  return 1;
}

lua_State *td__newstate(int actor) {
  lua_State *L = luaL_newstate();
  if (!L) return NULL;
  if (actor) {
    static const luaL_Reg libs[] = {{"", luaopen_base},
                                    {LUA_LOADLIBNAME, luaopen_package},
                                    {LUA_TABLIBNAME, luaopen_table},
                                    {LUA_STRLIBNAME, luaopen_string},
                                    {LUA_MATHLIBNAME, luaopen_math},
                                    {LUA_OSLIBNAME, luaopen_os},
                                    {LUA_BITLIBNAME, luaopen_bit},
                                    {NULL, NULL}};
    for (const luaL_Reg *lib = libs; lib->func; lib++) {
      lua_pushcfunction(L, lib->func);
      lua_pushstring(L, lib->name);
      lua_call(L, 1, 0);
    }
    lua_newtable(L);
    lua_pushcfunction(L, td__lazy_global);
    lua_setfield(L, -2, "__index");
    lua_setmetatable(L, LUA_GLOBALSINDEX);
  } else {
    luaL_openlibs(L);
    td__io_attribute(L);
  }
  td_core_setup_paths(L, td__home);
  if (actor) {
    /* The debug and jit libraries some modules require by name. */
    lua_pushcfunction(L, luaopen_debug);
    lua_setfield(L, -2, "debug");
    lua_pushcfunction(L, luaopen_jit);
    lua_setfield(L, -2, "jit");
    lua_pushcfunction(L, td__preload_jit_sub);
    lua_setfield(L, -2, "jit.util");
    lua_pushcfunction(L, td__preload_jit_sub);
    lua_setfield(L, -2, "jit.opt");
    lua_pushcfunction(L, luaopen_ffi);
    lua_setfield(L, -2, "ffi");
  }
  lua_pop(L, 1);
  if (actor) {
    lua_pushcfunction(L, td__c_loadfn);
    lua_setfield(L, LUA_REGISTRYINDEX, TD_HOOK_LOADFN);
    lua_pushcfunction(L, td__c_dumpfn);
    lua_setfield(L, LUA_REGISTRYINDEX, TD_HOOK_DUMPFN);
    lua_pushcfunction(L, td__c_print);
    lua_setglobal(L, "print");
    lua_getglobal(L, "os");
    lua_pushcfunction(L, td__c_exit);
    lua_setfield(L, -2, "exit");
    lua_pop(L, 1);
    return L;
  }
  lua_getglobal(L, "require");
  lua_pushliteral(L, "tide.boot");
  if (lua_pcall(L, 1, 1, 0) != 0) {
    fprintf(stderr, "tide worker: cannot load tide.boot: %s\n", lua_tostring(L, -1));
    _exit(3);
  }
  lua_getfield(L, -1, "setup");
  lua_pushboolean(L, actor);
  lua_call(L, 1, 0);
  lua_pop(L, 1);
  return L;
}

/* Definitions arrive once per process; every Lua state here loads them
 * from this cache. */
typedef struct td__blob {
  uint32_t len;
  uint8_t data[];
} td__blob_t;
td_map_t td__blobs;

/* Loads a function or class by id, caching it in the state's registry. */
int td__load_fn(lua_State *L, uint64_t id, const uint8_t *blob, uint32_t len) {
  if (blob) {
    if (!td_map_get(&td__blobs, id)) {
      td__blob_t *b = td_xmalloc(sizeof(*b) + len);
      b->len = len;
      memcpy(b->data, blob, len);
      td_map_set(&td__blobs, id, b);
    }
  } else {
    td__blob_t *b = td_map_get(&td__blobs, id);
    if (b) {
      blob = b->data;
      len = b->len;
    }
  }
  lua_getfield(L, LUA_REGISTRYINDEX, "tide.fns");
  if (lua_isnil(L, -1)) {
    lua_pop(L, 1);
    lua_newtable(L);
    lua_pushvalue(L, -1);
    lua_setfield(L, LUA_REGISTRYINDEX, "tide.fns");
  }
  lua_pushlstring(L, (const char *)&id, sizeof(id)); /* exact: never a double */
  lua_rawget(L, -2);
  if (!lua_isnil(L, -1)) {
    lua_remove(L, -2);
    return 0;
  }
  lua_pop(L, 1);
  if (!blob) {
    lua_pop(L, 1);
    lua_pushliteral(L, "function definition was not sent");
    return -1;
  }
  td_deser_t d = {0};
  if (td_deser_value(&d, L, blob, len)) {
    lua_pop(L, 1);
    lua_pushfstring(L, "cannot load the remote function: %s", d.err);
    return -1;
  }
  lua_pushlstring(L, (const char *)&id, sizeof(id));
  lua_pushvalue(L, -2);
  lua_rawset(L, -4);
  lua_remove(L, -2);
  return 0;
}

/* Argument refs resolve to the values the node sent with the task. */
typedef struct td__deps {
  uint32_t n;
  uint64_t *ids;
  const uint8_t **at; /* where each value starts in the message */
  const uint8_t *end;
  int failed; /* index+1 of a dependency that failed */
} td__deps_t;

static int td__argref(void *ud, lua_State *L, uint64_t id) {
  td__deps_t *d = ud;
  for (uint32_t i = 0; i < d->n; i++) {
    if (d->ids[i] != id) continue;
    td_rd_t rd;
    td_rd_init(&rd, d->at[i], (size_t)(d->end - d->at[i]));
    int rc = td_core_push_wire(L, &rd, id);
    if (rc == 1) {
      d->failed = (int)i + 1;
      return 1;
    }
    return rc ? 1 : 0;
  }
  lua_pushnil(L);
  return 0;
}

static void td__mkref(void *ud, lua_State *L, uint64_t id) {
  (void)ud;
  td_core_pushref(L, id, 0);
}

/* Skips one wire value. */
static void td__skip_wire(td_rd_t *rd) {
  uint8_t k = td_rd_u8(rd);
  if (k == TD_V_INLINE || k == TD_V_ERROR) {
    uint32_t l;
    td_rd_str(rd, &l);
  } else if (k == TD_V_SHM) {
    td_rd_u64(rd);
    td_rd_u64(rd);
  }
}

/* Decodes args+deps from rd onto L. Returns nargs, or -1 with an error
 * value pushed (error table when a dependency failed: *deperr set). */
int td__push_args(lua_State *L, td_rd_t *rd, int *deperr) {
  uint32_t alen;
  const uint8_t *args = td_rd_str(rd, &alen);
  td__deps_t d = {0};
  d.n = td_rd_u32(rd);
  if (rd->bad || d.n > 100000) {
    lua_pushliteral(L, "malformed task");
    return -1;
  }
  d.ids = td_xmalloc((size_t)d.n * 8 + 8);
  d.at = td_xmalloc((size_t)d.n * sizeof(void *) + 8);
  for (uint32_t i = 0; i < d.n; i++) {
    d.ids[i] = td_rd_u64(rd);
    d.at[i] = rd->p;
    td__skip_wire(rd);
  }
  d.end = rd->end;
  int nargs = -1;
  if (!rd->bad) {
    td_deser_t ds = {0};
    ds.ud = &d;
    ds.argref = td__argref;
    ds.mkref = td__mkref;
    int top = lua_gettop(L);
    int rc = td_deser_args(&ds, L, args, alen, &nargs);
    if (rc) {
      if (d.failed) {
        td_rd_t r2;
        td_rd_init(&r2, d.at[d.failed - 1], (size_t)(d.end - d.at[d.failed - 1]));
        lua_settop(L, top);
        td_core_push_wire(L, &r2, 0);
        *deperr = 1;
      } else {
        lua_settop(L, top);
        lua_pushfstring(L, "cannot decode the arguments: %s", ds.err);
      }
      nargs = -1;
    }
  } else {
    lua_pushliteral(L, "malformed task");
  }
  free(d.ids);
  free((void *)d.at);
  return nargs;
}
