/* tide: the command-line entry point. `tide run` embeds LuaJIT, starts
 * the embedded cluster on first use and runs a driver script; `tide bench`
 * runs the benchmark suite; `tide __worker` is how workers start.
 * Uses core (bindings), node, worker.
 */
#include <dlfcn.h>
#include <luajit.h>
#include <lauxlib.h>
#include <limits.h>
#include <lualib.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <netdb.h>
#include <sys/socket.h>

#include "core.h"

extern volatile int td_interrupted;
int luaopen_tide_rawbench(lua_State *L);
int luaopen_tide_readline(lua_State *L);
static lua_State *td__L;
static int td__serving;  /* tide serve run: --host/--port are allowed */
static int td__repl;     /* tide repl: Ctrl-C interrupts, never exits */
static char td__home[PATH_MAX];
static char td__exe[PATH_MAX];

static const char td__usage[] =
  "usage: tide <command> [options]\n"
  "\n"
  "  tide run [--num-cpus N] [--num-gpus N] [--resources JSON]\n"
  "           [--object-store-memory BYTES] SCRIPT [ARGS...]\n"
  "                         run a Lua driver script on an embedded local cluster\n"
  "  tide serve run [--host H] [--port P] [resource flags] APP.lua [ARGS...]\n"
  "                         serve the deployments APP.lua declares (serve.run)\n"
  "  tide serve status [--port P] [--host H]\n"
  "                         print the deployments of a running `tide serve run`\n"
  "  tide repl [resource flags]\n"
  "                         interactive Lua with tide loaded, on an embedded cluster\n"
  "  tide bench [NAME...] [--json]\n"
  "                         run the benchmarks (Ray's metric names, JSON lines)\n"
  "  tide --version         print the version\n"
  "  tide --help            print this help\n"
  "\n"
  "Options come before SCRIPT; everything after SCRIPT is the script's `arg`.\n"
  "Exit status: 0 success, 1 script error, 2 usage error.\n";

static int td__usage_error(const char *fmt, const char *arg) {
  fprintf(stderr, "tide: ");
  fprintf(stderr, fmt, arg);
  fprintf(stderr, "\n\n%s", td__usage);
  return 2;
}

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

static void td__on_signal(int sig) {
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

static void td__open(lua_State *L) {
  luaL_openlibs(L);
  lua_getglobal(L, "package");
  lua_pushfstring(L, "%s/stdlib/?.lua;%s/stdlib/?/init.lua;./?.lua;", td__home, td__home);
  lua_getfield(L, -2, "path");
  lua_concat(L, 2);
  lua_setfield(L, -2, "path");
  lua_getfield(L, -1, "preload");
  lua_pushcfunction(L, luaopen_tide_core);
  lua_setfield(L, -2, "tide.core");
  lua_pushcfunction(L, luaopen_tide_rawbench);
  lua_setfield(L, -2, "tide.rawbench");
  lua_pushcfunction(L, luaopen_tide_readline);
  lua_setfield(L, -2, "tide.readline");
  /* Optional C modules linked into this binary (the gpu layer). */
  lua_CFunction tensor = (lua_CFunction)(uintptr_t)dlsym(RTLD_DEFAULT, "luaopen_tide_tensor");
  if (tensor) {
    lua_pushcfunction(L, tensor);
    lua_setfield(L, -2, "tide.tensor");
  }
  lua_pop(L, 2);
}

/* -- tide run --------------------------------------------------------------------- */

static int td__run(int argc, char **argv, int first, const char *script_override) {
  lua_State *L = luaL_newstate();
  td__L = L;
  td_ctx.is_driver = 1;
  td_ser_init(&td_ctx.ser);
  td__open(L);
  /* CLI options become tide.init defaults. */
  lua_newtable(L);
  int i = first;
  for (; i < argc && (!script_override || td__repl); i++) {
    const char *a = argv[i];
    if (a[0] != '-' || !strcmp(a, "-")) break;
    if (!strcmp(a, "--")) { i++; break; }
    const char *key = NULL;
    if (!strcmp(a, "--num-cpus")) key = "num_cpus";
    else if (!strcmp(a, "--num-gpus")) key = "num_gpus";
    else if (!strcmp(a, "--resources")) key = "resources_json";
    else if (!strcmp(a, "--object-store-memory")) key = "object_store_memory";
    else if (!strcmp(a, "--address")) key = "address";
    else if (!strcmp(a, "--host") && td__serving) key = "serve_host";
    else if (!strcmp(a, "--port") && td__serving) key = "serve_port";
    else return td__usage_error("unknown option %s", a);
    if (i + 1 >= argc) return td__usage_error("option %s needs a value", a);
    const char *v = argv[++i];
    if (strcmp(key, "resources_json") && strcmp(key, "address") && strcmp(key, "serve_host")) {
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
  lua_setfield(L, LUA_REGISTRYINDEX, "tide.cli_opts");
  const char *script = script_override;
  if (!script) {
    if (i >= argc) return td__usage_error("%s", "run needs a SCRIPT");
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
    fprintf(stderr, "tide: %s\n", lua_tostring(L, -1));
    return 2;
  }
  lua_getfield(L, -1, "_start");
  if (lua_pcall(L, 0, 0, 0) != 0) {
    fprintf(stderr, "tide: %s\n", lua_tostring(L, -1));
    lua_close(L);
    return 2;
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
    td_node_pump(td_ctx.node, 0);
    td_node_destroy(&td_ctx.node);
  }
  td__L = NULL;
  return rc;
}

/* tide serve status: asks a running ingress for /-/status. */
static int td__serve_status(int argc, char **argv) {
  const char *host = "127.0.0.1";
  int port = 8000;
  for (int i = 3; i < argc; i++) {
    if (!strcmp(argv[i], "--port") && i + 1 < argc) port = atoi(argv[++i]);
    else if (!strcmp(argv[i], "--host") && i + 1 < argc) host = argv[++i];
    else return td__usage_error("unknown option %s", argv[i]);
  }
  struct addrinfo hints = {0}, *ai;
  hints.ai_socktype = SOCK_STREAM;
  char ps[16];
  snprintf(ps, sizeof(ps), "%d", port);
  if (getaddrinfo(host, ps, &hints, &ai) != 0) {
    fprintf(stderr, "tide: cannot resolve %s\n", host);
    return 1;
  }
  int fd = socket(ai->ai_family, SOCK_STREAM, 0);
  if (fd < 0 || connect(fd, ai->ai_addr, ai->ai_addrlen) != 0) {
    fprintf(stderr, "tide: no serve ingress at %s:%d (is `tide serve run` running?)\n", host, port);
    freeaddrinfo(ai);
    return 1;
  }
  freeaddrinfo(ai);
  const char req[] = "GET /-/status HTTP/1.0\r\nHost: tide\r\n\r\n";
  if (write(fd, req, sizeof(req) - 1) < 0) return 1;
  char buf[65536];
  size_t len = 0;
  ssize_t r;
  while (len < sizeof(buf) - 1 && (r = read(fd, buf + len, sizeof(buf) - 1 - len)) > 0) len += (size_t)r;
  close(fd);
  buf[len] = 0;
  char *body = strstr(buf, "\r\n\r\n");
  printf("%s\n", body ? body + 4 : buf);
  return 0;
}

int main(int argc, char **argv) {
  if (argc >= 2 && !strcmp(argv[1], "__worker")) return td_worker_main(argc, argv);
  ssize_t n = readlink("/proc/self/exe", td__exe, sizeof(td__exe) - 1);
  if (n <= 0) return 1;
  td__exe[n] = 0;
  /* TIDE_HOME is the checkout: bin/tide lives in $TIDE_HOME/bin. */
  const char *home = getenv("TIDE_HOME");
  if (home) {
    snprintf(td__home, sizeof(td__home), "%s", home);
  } else {
    snprintf(td__home, sizeof(td__home), "%s", td__exe);
    for (int k = 0; k < 2; k++) {
      char *s = strrchr(td__home, '/');
      if (s) *s = 0;
    }
  }
  setenv("TIDE_HOME", td__home, 1);
  if (getenv("TIDE_VERBOSE")) td_verbose = 1;
  if (argc < 2) { fputs(td__usage, stderr); return 2; }
  const char *cmd = argv[1];
  if (!strcmp(cmd, "--version") || !strcmp(cmd, "version")) {
    printf("tide %s (%s)\n", TD_VERSION, LUAJIT_VERSION);
    return 0;
  }
  if (!strcmp(cmd, "--help") || !strcmp(cmd, "-h") || !strcmp(cmd, "help")) {
    fputs(td__usage, stdout);
    return 0;
  }
  if (!strcmp(cmd, "run")) return td__run(argc, argv, 2, NULL);
  if (!strcmp(cmd, "serve")) {
    if (argc >= 3 && !strcmp(argv[2], "run")) {
      td__serving = 1;
      return td__run(argc, argv, 3, NULL);
    }
    if (argc >= 3 && !strcmp(argv[2], "status")) return td__serve_status(argc, argv);
    return td__usage_error("%s", "serve needs 'run' or 'status'");
  }
  if (!strcmp(cmd, "repl")) {
    td__repl = 1;
    char path[PATH_MAX + 32];
    snprintf(path, sizeof(path), "%s/stdlib/tide/repl.lua", td__home);
    /* Flags are parsed by td__run as for `tide run`. */
    return td__run(argc, argv, 2, path);
  }
  if (!strcmp(cmd, "bench")) {
    char path[PATH_MAX + 32];
    snprintf(path, sizeof(path), "%s/bench/bench.lua", td__home);
    return td__run(argc, argv, 2, path);
  }
  return td__usage_error("unknown command %s", cmd);
}
