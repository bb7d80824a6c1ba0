/* tide run: runs a Lua driver script in this process, on an embedded local
 * cluster started on first use or attached to a running node (--address).
 * The commands written in Lua (tide repl, status, submit, list, timeline,
 * bench) run the same way with their script. Here: the flags that become
 * tide.init's defaults, the signals that interrupt a script, the traceback
 * of its error, and the teardown. Uses core (bindings), node, bridge.
 */
#include <luajit.h>
#include <lauxlib.h>
#include <limits.h>
#include <lualib.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "bridge.h"
#include "core.h"
#include "cmd.h"

extern volatile int td_interrupted;
int luaopen_tide_readline(lua_State *L);
static lua_State *td__L;
int td__serving;       /* tide serve run: --host/--port are allowed */
int td__repl;          /* tide repl: Ctrl-C interrupts, never exits */
int td__statuscmd;     /* tide status: flags are parsed */
static int td__remote; /* attached over TCP through the bridge */

/* -- Interrupts ---------------------------------------------------------------- */

static volatile int td__was_interrupted;

static void td__stop_hook(lua_State *L, lua_Debug *ar) {
  (void)ar;
  lua_sethook(L, NULL, 0, 0);
  luaL_error(L, "interrupted");
}

/* Compiled Lua loops do not run hooks: if the script has not stopped a
 * second after the signal, leave now. Workers die with us (PDEATHSIG) and
 * the store is an unnamed memfd, so nothing is left behind. */
static void td__on_alarm(int sig) {
  (void)sig;
  static const char msg[] = "tide: interrupted\n";
  ssize_t r = write(2, msg, sizeof(msg) - 1);
  (void)r;
  _exit(130);
}

extern volatile sig_atomic_t td_repl_reading, td_repl_sigint;

static void td__on_signal(int sig) {
  if (td__repl && sig == SIGINT && td_repl_reading) {
    td_repl_sigint = 1; /* at the prompt: the line is cleared (repl.c) */
    return;
  }
  if (td__repl && sig == SIGINT) {
    /* The REPL catches the error and prompts again. */
    td_interrupted = 1;
    if (td__L) lua_sethook(td__L, td__stop_hook, LUA_MASKCALL | LUA_MASKRET | LUA_MASKCOUNT, 1);
    return;
  }
  if (td__was_interrupted) td__on_alarm(sig);
  td__was_interrupted = 1;
  td_interrupted = 1;
  signal(SIGALRM, td__on_alarm);
  alarm(1);
  if (td__L) lua_sethook(td__L, td__stop_hook, LUA_MASKCALL | LUA_MASKRET | LUA_MASKCOUNT, 1);
  if (sig != SIGINT) {
    /* A second TERM/HUP means now. */
    signal(sig, SIG_DFL);
  }
}

/* -- Error reporting -------------------------------------------------------------- */

static int td__traceback(lua_State *L) {
  /* Error tables from tide.get carry their own description. */
  if (!lua_isstring(L, 1)) {
    if (luaL_callmeta(L, 1, "__tostring") && lua_isstring(L, -1)) {
      lua_replace(L, 1);
    } else {
      lua_pushfstring(L, "(error object is a %s value)", luaL_typename(L, 1));
      lua_replace(L, 1);
    }
  }
  luaL_traceback(L, L, lua_tostring(L, 1), 1);
  return 1;
}

void td__open(lua_State *L) {
  luaL_openlibs(L);
  td_core_setup_paths(L, td__cmd_home);
  lua_pushcfunction(L, luaopen_tide_readline);
  lua_setfield(L, -2, "tide.readline");
  lua_pop(L, 1);
  /* Scripts next to the caller can be required too. */
  lua_getglobal(L, "package");
  lua_getfield(L, -1, "path");
  lua_pushliteral(L, ";./?.lua");
  lua_concat(L, 2);
  lua_setfield(L, -2, "path");
  lua_pop(L, 1);
}

/* -- tide run --------------------------------------------------------------------- */

/* Parses option flags from argv[first]; sets registry tide.cli_opts.
 * Returns -1 to go on (with *next at the first non-option), or an exit code. */
int td__parse_flags(lua_State *L, int argc, char **argv, int first, int *next) {
  lua_newtable(L);
  int i = first;
  for (; i < argc; i++) {
    const char *a = argv[i];
    if (a[0] != '-' || !strcmp(a, "-")) break;
    if (!strcmp(a, "--")) {
      i++;
      break;
    }
    if (td__is_help(a)) return td__help(td__cmd);
    const char *key = NULL;
    if (!strcmp(a, "--num-cpus")) key = "num_cpus";
    else if (!strcmp(a, "--num-gpus")) key = "num_gpus";
    else if (!strcmp(a, "--resources")) key = "resources_json";
    else if (!strcmp(a, "--object-store-memory")) key = "object_store_memory";
    else if (!strcmp(a, "--address")) key = "address";
    else if (!strcmp(a, "--key")) {
      if (i + 1 >= argc) return td__usage_error("option %s needs a value", a);
      td__key_arg = argv[++i];
      continue;
    } else if (!strcmp(a, "--host") && td__serving) key = "serve_host";
    else if (!strcmp(a, "--port") && td__serving) key = "serve_port";
    else if (!strcmp(a, "--access-log") && td__serving) key = "serve_access_log";
    else return td__usage_error("unknown option %s", a);
    if (i + 1 >= argc) return td__usage_error("option %s needs a value", a);
    const char *v = argv[++i];
    if (strcmp(key, "resources_json") && strcmp(key, "address") && strcmp(key, "serve_host") &&
        strcmp(key, "serve_access_log")) {
      char *end;
      double d = strtod(v, &end);
      if (*end || end == v || d < 0) return td__usage_error("option needs a non-negative number: %s", a);
      lua_pushnumber(L, d);
    } else {
      lua_pushstring(L, v);
    }
    lua_setfield(L, -2, key);
  }
  lua_pushstring(L, td__exe);
  lua_setfield(L, -2, "exe");
  lua_pushboolean(L, td__serving);
  lua_setfield(L, -2, "serving"); /* tide serve run: the access log is on by default */
  lua_setfield(L, LUA_REGISTRYINDEX, "tide.cli_opts");
  if (next) *next = i;
  return -1;
}

int td__run(int argc, char **argv, int first, const char *script_override) {
  lua_State *L = luaL_newstate();
  td__L = L;
  td_ctx.is_driver = 1;
  td_ser_init(&td_ctx.ser);
  td__open(L);
  /* CLI options become tide.init defaults. */
  int i = first;
  if (!script_override || td__repl || td__statuscmd) {
    int rc = td__parse_flags(L, argc, argv, first, &i);
    if (rc >= 0) return rc;
  } else {
    td__parse_flags(L, 0, argv, 0, NULL);
  }
  /* --address (or TIDE_ADDRESS): attach to a running node instead. */
  lua_getfield(L, LUA_REGISTRYINDEX, "tide.cli_opts");
  lua_getfield(L, -1, "address");
  const char *addr = lua_tostring(L, -1);
  if (!addr) addr = getenv("TIDE_ADDRESS");
  if (addr) {
    char path[PATH_MAX], err[512];
    int kind = td__resolve_address(addr, path, sizeof(path));
    if (kind < 0) return 2;
    if (kind == TD__ADDR_TCP) {
      /* TCP: the cluster key from --key, TIDE_KEY_FILE, or this user's session. */
      td_cluster_key_t key;
      int fd;
      if (td__load_key(&key)) return 1;
      err[0] = 0;
      if (td_bridge_client_start(path, &key, &fd) || td_client_connect_fd(fd, addr, err, sizeof(err))) {
        char why[PATH_MAX + 256];
        td__why_no_answer(path, why, sizeof(why));
        fprintf(stderr, "tide: cannot attach to the node at %s: %s\n", addr, why);
        return 1;
      }
      td__remote = 1;
    } else if (td_client_connect(path, err, sizeof(err))) {
      fprintf(stderr, "tide: %s\n", err);
      return 1;
    }
    lua_pushnil(L);
    lua_setfield(L, -3, "address");
  }
  lua_pop(L, 2);
  const char *script = script_override;
  if (!script) {
    if (i >= argc)
      return td__usage_error("%s", td__serving ? "serve run needs an APP.lua" : "run needs a SCRIPT");
    script = argv[i++];
  }
  /* arg: script at 0, its arguments from 1. */
  lua_createtable(L, argc - i, 1);
  lua_pushstring(L, script);
  lua_rawseti(L, -2, 0);
  for (int k = i; k < argc; k++) {
    lua_pushstring(L, argv[k]);
    lua_rawseti(L, -2, k - i + 1);
  }
  lua_setglobal(L, "arg");
  signal(SIGINT, td__on_signal);
  signal(SIGTERM, td__on_signal);
  signal(SIGHUP, td__on_signal);
  signal(SIGPIPE, SIG_IGN);
  int rc = 0;
  /* Start the cluster before the script, so bad flags fail first (exit 2)
   * and the first task finds warm workers. */
  lua_getglobal(L, "require");
  lua_pushliteral(L, "tide");
  if (lua_pcall(L, 1, 1, 0) != 0) {
    /* The library itself is missing: a binary copied away from its
     * checkout, without TIDE_HOME. Not a usage error. */
    fprintf(stderr,
            "tide: %s\n(bin/tide finds its library in TIDE_HOME, default the directory above bin/: %s)\n",
            lua_tostring(L, -1), getenv("TIDE_HOME") ? getenv("TIDE_HOME") : "?");
    return 1;
  }
  lua_getfield(L, -1, "_start");
  if (lua_pcall(L, 0, 0, 0) != 0) {
    int rc = td__usage_error("%s", lua_tostring(L, -1));
    lua_close(L);
    return rc;
  }
  lua_pop(L, 1);
  lua_pushcfunction(L, td__traceback);
  if (luaL_loadfile(L, script) != 0) {
    fprintf(stderr, "tide: %s\n", lua_tostring(L, -1));
    rc = 1;
  } else {
    int n = 0;
    for (int k = i; k < argc; k++, n++) lua_pushstring(L, argv[k]);
    if (lua_pcall(L, n, 0, -2 - n) != 0) {
      if (td__was_interrupted) {
        fprintf(stderr, "tide: interrupted\n");
        rc = 130;
      } else {
        fprintf(stderr, "tide: %s\n", lua_tostring(L, -1));
        rc = 1;
      }
    }
  }
  fflush(stdout);
  /* Let workers' last prints arrive, then tear everything down. */
  if (td_ctx.node) {
    td_core_bg_stop();
    td_node_pump(td_ctx.node, 0);
    td_node_destroy(&td_ctx.node);
  } else if (td_ctx.ch.fd >= 0 && !td_ctx.is_driver) {
    /* An attached driver gives back every reference it still holds. */
    lua_close(L);
    L = NULL;
    td_core_flush_refs();
    td_chan_flush_all(&td_ctx.ch);
    if (td__remote) {
      close(td_ctx.ch.fd);
      td_bridge_client_stop();
    }
  }
  td__L = NULL;
  return rc;
}
