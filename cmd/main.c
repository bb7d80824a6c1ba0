/* tide: the command-line entry point. `tide run` embeds LuaJIT, starts
 * the embedded cluster on first use and runs a driver script; `tide bench`
 * runs the benchmark suite; `tide __worker` is how workers start.
 * Uses core (bindings), node, worker.
 */
#include <dirent.h>
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
#include <errno.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <arpa/inet.h>
#include <netdb.h>
#include <poll.h>
#include <sys/socket.h>
#include <zmq.h>
#include <uv.h>

#include "bridge.h"
#include "dplane.h"
#include "persist.h"
#include "pkg.h"
#include "proto.h"
#include "core.h"
#include "introspect.h"
#include "obs.h"

extern volatile int td_interrupted;
int luaopen_tide_rawbench(lua_State *L);
int luaopen_tide_readline(lua_State *L);
static lua_State *td__L;
static int td__serving;  /* tide serve run: --host/--port are allowed */
static int td__repl;     /* tide repl: Ctrl-C interrupts, never exits */
static int td__statuscmd; /* tide status: flags are parsed */
static int td__remote;    /* attached over TCP through the bridge */
static const char *td__key_arg; /* --key FILE */
static char td__home[PATH_MAX];
static char td__exe[PATH_MAX];

static const char td__usage[] =
  "usage: tide <command> [options]\n"
  "\n"
  "  tide run [--num-cpus N] [--num-gpus N] [--resources JSON]\n"
  "           [--object-store-memory BYTES] SCRIPT [ARGS...]\n"
  "                         run a Lua driver script on an embedded local cluster\n"
  "  tide serve run [--host H] [--port P] [--access-log off|FILE] [resource flags] APP.lua [ARGS...]\n"
  "                         serve the deployments APP.lua declares (serve.run)\n"
  "  tide serve status [--port P] [--host H]\n"
  "                         print the deployments of a running `tide serve run`\n"
  "  tide start --head [--port P] [--block] [--node-timeout S] [resource flags]\n"
  "                         run a head node in the background (--block: foreground)\n"
  "  tide start --address HOST:PORT [--key F] [--name N] [--block] [resource flags]\n"
  "                         run a node that joins the head at HOST:PORT\n"
  "  tide stop [--all] | tide status [--address A]\n"
  "                         stop it (--all: every node of this user); print its nodes,\n"
  "                         resources, workers, actors, tasks, objects\n"
  "  tide submit [--address A --key F] [--working-dir D] SCRIPT [ARGS...]\n"
  "  tide job list | status ID | logs ID [--follow] | stop ID\n"
  "                         run a driver script as a job on the running node\n"
  "  tide timeline [--job ID] [-o FILE]\n"
  "                         the node's tasks and actor calls as a Chrome trace (Perfetto)\n"
  "  tide list nodes|actors|tasks|objects|placement-groups|jobs [--filter K=V] [--limit N] [--json]\n"
  "  tide logs worker|actor|task|job ID [--follow]\n"
  "                         what the head runs, and what its workers printed\n"
  "  tide run --address local SCRIPT / tide repl --address local\n"
  "                         attach a driver or a REPL to the running node\n"
  "  tide repl [resource flags]\n"
  "                         interactive Lua with tide loaded, on an embedded cluster\n"
  "  tide bench [NAME...] [--json]\n"
  "                         run the benchmarks (Ray's metric names, JSON lines)\n"
  "  tide --version         print the version\n"
  "  tide --help            print this help\n"
  "\n"
  "`tide COMMAND --help` describes a command and its options. Options come\n"
  "before SCRIPT; everything after SCRIPT is the script's `arg`.\n"
  "Exit status: 0 success, 1 script error, 2 usage error.\n";

/* Each command's own help, printed by `tide CMD --help` (or `tide help
 * CMD`) on stdout. A usage error prints one line and points here, instead
 * of the whole usage above. */
static const struct td__help {
  const char *cmd, *text;
} td__helps[] = {
  {"run",
   "usage: tide run [options] SCRIPT [ARGS...]\n"
   "\n"
   "Runs the Lua driver SCRIPT on an embedded local cluster, torn down when it\n"
   "ends; with --address, on a running node instead. Options come before\n"
   "SCRIPT (`--` ends them); everything after SCRIPT is the script's `arg`.\n"
   "\n"
   "  --num-cpus N                 CPUs the scheduler hands out (default: online CPUs)\n"
   "  --num-gpus N                 GPUs, ids 0..N-1 (default 0)\n"
   "  --resources JSON             custom resources, e.g. '{\"ssd\": 2}'\n"
   "  --object-store-memory BYTES  object store size (default 30% of RAM)\n"
   "  --address A                  attach to a running node: local, a node.sock path,\n"
   "                               or HOST:PORT (then --key FILE or TIDE_KEY_FILE)\n"
   "  --key FILE                   the cluster key for --address HOST:PORT\n"
   "  -h, --help                   print this help\n"
   "\n"
   "Exit status: 0 success, 1 script error, 2 usage error, 130 interrupted,\n"
   "n from os.exit(n).\n"},
  {"serve",
   "usage: tide serve run [--host H] [--port P] [run options] APP.lua [ARGS...]\n"
   "       tide serve status [--host H] [--port P]\n"
   "\n"
   "serve run: runs APP.lua, which declares deployments (serve.run), and serves\n"
   "them over HTTP on H:P (default 127.0.0.1:8000) until Ctrl-C. It takes the\n"
   "options of `tide run` too (see `tide run --help`).\n"
   "serve status: prints the deployments of a running `tide serve run`.\n"},
  {"start",
   "usage: tide start --head [options]\n"
   "       tide start --address HOST:PORT [--key FILE] [options]\n"
   "\n"
   "Starts a node daemon (scheduler, object store, workers) in the background\n"
   "and returns once it listens; its socket, pid, log and cluster key are in the\n"
   "session directory ($TIDE_SESSION_DIR or /tmp/tide-UID).\n"
   "\n"
   "  --head                a head: other nodes, drivers and `tide status` attach to it\n"
   "  --address HOST:PORT   join the head at HOST:PORT (with its cluster key)\n"
   "  --key FILE            the cluster key to join with (default: TIDE_KEY_FILE,\n"
   "                        then the session's cluster.key)\n"
   "  --port P              TCP port (head default 6380; a joining node picks one)\n"
   "  --host H              interface to listen on (default 0.0.0.0)\n"
   "  --name N              this node's name\n"
   "  --node-timeout S      seconds of silence before a node counts as dead (default 5)\n"
   "  --data-plane MODE     how object bytes cross between nodes: on (direct TCP streams,\n"
   "                        AES-128-GCM; the default), plain (authenticated, not encrypted:\n"
   "                        trusted networks only) or off (over the ZeroMQ links)\n"
   "  --join-timeout S      give up joining after S seconds, saying why (default 15;\n"
   "                        0: keep trying); a node that has joined always rejoins\n"
   "  --node-index N        ask the head for node index N (1..4095) if it is free\n"
   "  --dashboard-port P    a head's dashboard and Prometheus /metrics (default 8265,\n"
   "                        or any free port if that is taken; off: none)\n"
   "  --dashboard-host H    the dashboard's interface (default 127.0.0.1); other\n"
   "                        addresses need the token in the session's dashboard.token\n"
   "  --block               stay in the foreground, logging to the terminal\n"
   "  --num-cpus N, --num-gpus N, --resources JSON, --object-store-memory BYTES\n"
   "                        this node's resources, as for `tide run`\n"
   "  -h, --help            print this help\n"},
  {"list",
   "usage: tide list nodes|actors|tasks|objects|placement-groups|jobs\n"
   "                 [--filter KEY=VALUE]... [--limit N] [--offset N] [--json]\n"
   "                 [--address A] [--key FILE]\n"
   "\n"
   "Lists what the head knows, filtered and cut on the head (one request):\n"
   "a table on a terminal, JSON with --json. --filter keeps the rows whose\n"
   "field KEY is VALUE (repeatable: all must match); --limit N rows (default\n"
   "100; it says when more matched), from --offset N. Tasks are running,\n"
   "queued (with the reason they wait) and the last 1,000 failed (with the\n"
   "error and its traceback). See docs/observability.md for the fields.\n"},
  {"logs",
   "usage: tide logs worker|actor|task|job ID [--follow] [--tail N] [--address A] [--key FILE]\n"
   "\n"
   "Prints the output kept for a worker process (its stdout, stderr and its\n"
   "tasks' prints, in the session's logs/, rotated by size), for the worker an\n"
   "actor or task runs (ran) in, or for a job. --follow keeps printing as it\n"
   "grows; --tail N starts at the last N lines. On a head, a worker on another\n"
   "node is read there (through a task placed on that node).\n"},
  {"stop",
   "usage: tide stop [--all]\n"
   "\n"
   "Stops the node daemon of the session directory ($TIDE_SESSION_DIR or\n"
   "/tmp/tide-UID): SIGTERM, then SIGKILL after 5 s.\n"
   "\n"
   "  --all       stop every node daemon (`tide start`) this user runs on this\n"
   "              machine, whatever its session directory\n"
   "  -h, --help  print this help\n"},
  {"status",
   "usage: tide status [--address A] [--key FILE] [--why REF_OR_TASK]\n"
   "\n"
   "Prints the running node's resources (used / total), workers, actors, tasks,\n"
   "objects and store use; on a head, every node of the cluster. A is local\n"
   "(the default), a node.sock path, or HOST:PORT with the cluster key.\n"
   "--why ID: why an object (the 16 hex digits of an ObjectRef) or a task (its\n"
   "task_id) is not ready: what makes it, and where that task is.\n"},
  {"timeline",
   "usage: tide timeline [--job ID] [--local] [-o FILE] [--address A] [--key FILE]\n"
   "       tide timeline --merge FILE... [-o FILE]\n"
   "\n"
   "Writes the tasks and actor calls the running node kept (submitted, began,\n"
   "ended, node, worker, argument bytes, name) as Chrome trace events: load\n"
   "the file in Perfetto (ui.perfetto.dev) or chrome://tracing. On stdout\n"
   "unless -o FILE. --job ID: only that job's work (tide submit), on this node.\n"
   "Each node keeps the work it ran; on a head the trace has every node's,\n"
   "read on each node and put on one clock (--local: this node's only).\n"
   "--merge puts traces written apart (each with its own --address or\n"
   "TIDE_SESSION_DIR, and --local) on one clock.\n"},
  {"submit",
   "usage: tide submit [--address A] [--key FILE] [--working-dir D] SCRIPT [ARGS...]\n"
   "\n"
   "Runs SCRIPT as a job, a driver kept by the running node (default: local),\n"
   "and prints its id. --working-dir D ships the directory D to the node; the\n"
   "job runs in it and SCRIPT is found in it. See `tide job --help`.\n"},
  {"job",
   "usage: tide job list | status ID | logs ID [--follow] | stop ID\n"
   "                [--address A] [--key FILE]\n"
   "\n"
   "  list          every job of the node, with its status and exit code\n"
   "  status ID     one job: RUNNING, SUCCEEDED, FAILED or STOPPED\n"
   "  logs ID       its output so far (--follow: until it ends)\n"
   "  stop ID       stop it (SIGTERM to its driver), then print its status\n"},
  {"repl",
   "usage: tide repl [run options]\n"
   "\n"
   "Interactive Lua with tide loaded, on an embedded cluster, or attached to a\n"
   "node with --address (see `tide run --help` for the options). :help at the\n"
   "prompt lists its commands.\n"},
  {"bench",
   "usage: tide bench [NAME...] [--json]\n"
   "\n"
   "Runs the benchmarks (Ray's metric names) as JSON lines, each beside a\n"
   "machine limit measured in the same run; NAME keeps the metrics that start\n"
   "with it. TIDE_BENCH_SCALE scales the iteration counts.\n"},
};

/* The command being run, for the hint of a usage error. */
static const char *td__cmd;

static int td__is_help(const char *a) { return !strcmp(a, "--help") || !strcmp(a, "-h"); }

/* Prints the help of cmd (the whole usage for NULL or an unknown one). */
static int td__help(const char *cmd) {
  for (size_t i = 0; cmd && i < sizeof(td__helps) / sizeof(td__helps[0]); i++)
    if (!strcmp(td__helps[i].cmd, cmd)) {
      fputs(td__helps[i].text, stdout);
      return 0;
    }
  fputs(td__usage, stdout);
  return 0;
}

static int td__usage_error(const char *fmt, const char *arg) {
  fprintf(stderr, "tide: ");
  fprintf(stderr, fmt, arg);
  if (td__cmd) fprintf(stderr, "\nsee 'tide %s --help'\n", td__cmd);
  else fprintf(stderr, "\nsee 'tide --help'\n");
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

extern volatile sig_atomic_t td_repl_reading, td_repl_sigint;

static void td__on_signal(int sig) {
  if (td__repl && sig == SIGINT && td_repl_reading) {
    td_repl_sigint = 1;  /* at the prompt: the line is cleared (repl.c) */
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

static void td__open(lua_State *L) {
  luaL_openlibs(L);
  td_core_setup_paths(L, td__home);
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

static int td__resolve_address(const char *a, char *out, size_t n);
static void td__session_dir(char *out, size_t n);
static int td__session_foreign(void);
static int td__load_key(td_cluster_key_t *key);
static void td__why_no_answer(const char *ep, char *why, size_t n);

/* Parses option flags from argv[first]; sets registry tide.cli_opts.
 * Returns -1 to go on (with *next at the first non-option), or an exit code. */
static int td__parse_flags(lua_State *L, int argc, char **argv, int first, int *next) {
  lua_newtable(L);
  int i = first;
  for (; i < argc; i++) {
    const char *a = argv[i];
    if (a[0] != '-' || !strcmp(a, "-")) break;
    if (!strcmp(a, "--")) { i++; break; }
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
    }
    else if (!strcmp(a, "--host") && td__serving) key = "serve_host";
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
  lua_setfield(L, -2, "serving");  /* tide serve run: the access log is on by default */
  lua_setfield(L, LUA_REGISTRYINDEX, "tide.cli_opts");
  if (next) *next = i;
  return -1;
}

static int td__run(int argc, char **argv, int first, const char *script_override) {
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
    if (kind == 1) {
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
    if (i >= argc) return td__usage_error("%s", td__serving ? "serve run needs an APP.lua" : "run needs a SCRIPT");
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

/* -- Node daemon ---------------------------------------------------------------
 * `tide start --head` runs the node in the background (or in the
 * foreground with --block) with its socket, pid and log in one session
 * directory, mode 0700: only this user can attach. Drivers and REPLs attach
 * with --address (the socket path, or "local" for this user's session).
 * The default directory has a predictable name in /tmp: it is used only
 * when it is this user's and private (td_private_dir), and the files in it
 * are opened relative to it without following links. The daemon holds a
 * lock on node.lock for its whole life: the kernel says which process
 * holds it, so `tide stop` never signals a pid that a stale (or forged)
 * node.pid names. */

static void td__session_dir(char *out, size_t n) {
  const char *d = getenv("TIDE_SESSION_DIR");
  if (d) snprintf(out, n, "%s", d);
  else snprintf(out, n, "/tmp/tide-%d", (int)geteuid());
}

/* The session directory, checked, made when create; -1 after printing why
 * not (or, when it does not exist and not create, -2 quietly). */
static int td__session_open(char *dir, size_t n, int create) {
  char err[PATH_MAX + 256];
  struct stat st;
  td__session_dir(dir, n);
  if (!create && lstat(dir, &st) != 0 && errno == ENOENT) return -2;
  int fd = td_private_dir(dir, create, err, sizeof(err));
  if (fd < 0) fprintf(stderr, "tide: session directory: %s\n", err);
  return fd;
}

/* 1 (after printing why) when the session directory exists but is not a
 * private one of this user's: nothing in it is to be trusted. */
static int td__session_foreign(void) {
  char d[PATH_MAX];
  int fd = td__session_open(d, sizeof(d), 0);
  if (fd >= 0) close(fd);
  return fd == -1;
}

/* The pid of the process that holds the session's lock (a running
 * daemon), or 0. Never call this in the daemon itself: closing any fd of
 * node.lock would drop its lock (POSIX record locks). */
static int td__lock_holder(int dfd) {
  int fd = openat(dfd, "node.lock", O_RDWR | O_NOFOLLOW | O_CLOEXEC);
  if (fd < 0) return 0;
  struct flock fl = {.l_type = F_WRLCK, .l_whence = SEEK_SET};
  int pid = fcntl(fd, F_GETLK, &fl) == 0 && fl.l_type != F_UNLCK ? (int)fl.l_pid : 0;
  close(fd);
  return pid > 0 ? pid : 0;
}

/* A process that exists and is not a zombie (a killed daemon whose
 * parent, maybe an init that does not reap, has not collected it). */
static int td__alive(int pid) {
  if (kill(pid, 0) != 0) return 0;
  char path[64], buf[512];
  snprintf(path, sizeof(path), "/proc/%d/stat", pid);
  FILE *f = fopen(path, "r");
  if (!f) return 1;
  size_t n = fread(buf, 1, sizeof(buf) - 1, f);
  fclose(f);
  buf[n] = 0;
  char *p = strrchr(buf, ')');
  return !(p && p[1] == ' ' && (p[2] == 'Z' || p[2] == 'X'));
}

/* The lock holder, after waiting (up to 5 s) for one that is exiting
 * (killed a moment ago: its main thread a zombie, its other threads may
 * still hold its files, and so its lock, for a moment) to let go. */
static int td__lock_holder_live(int dfd) {
  int pid = td__lock_holder(dfd);
  for (int i = 0; i < 100 && pid && !td__alive(pid); i++) {
    usleep(50000);
    pid = td__lock_holder(dfd);
  }
  return pid;
}

/* 1 while pid still holds the lock of session directory dir. */
static int td__lock_held_by(const char *dir, int pid) {
  int dfd = open(dir, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
  if (dfd < 0) return 0;
  int held = td__lock_holder(dfd) == pid;
  close(dfd);
  return held;
}

/* Takes the session's lock for this process's life: the fd (kept open),
 * or -1 when another process holds it. */
static int td__lock_take(int dfd) {
  int fd = openat(dfd, "node.lock", O_RDWR | O_CREAT | O_NOFOLLOW | O_CLOEXEC, 0600);
  if (fd < 0) return -1;
  struct flock fl = {.l_type = F_WRLCK, .l_whence = SEEK_SET};
  if (fcntl(fd, F_SETLK, &fl) != 0) {
    close(fd);
    return -1;
  }
  return fd;
}

/* 1 when pid runs a tide binary (this one, or one rebuilt or moved since
 * it started): only such a process is signalled by `tide stop`. */
static int td__is_tide(int pid) {
  char path[64], exe[PATH_MAX];
  snprintf(path, sizeof(path), "/proc/%d/exe", pid);
  ssize_t n = readlink(path, exe, sizeof(exe) - 1);
  if (n <= 0) return 0;
  exe[n] = 0;
  if (!strcmp(exe, td__exe)) return 1;
  char *del = strstr(exe, " (deleted)");
  if (del && !del[10]) *del = 0;
  const char *base = strrchr(exe, '/');
  return base && !strcmp(base + 1, "tide");
}

/* Resolves --address: a Unix socket path (returns 0) or, for HOST:PORT, a
 * ZeroMQ endpoint (returns 1); -1 after printing why not. */
static int td__resolve_address(const char *a, char *out, size_t n) {
  if (!strcmp(a, "local") || !strcmp(a, "auto") || !*a) {
    char dir[PATH_MAX - 16];
    td__session_dir(dir, sizeof(dir));
    /* Another user's node would get this driver's code and data. */
    if (td__session_foreign()) return -1;
    snprintf(out, n, "%s/node.sock", dir);
    return 0;
  }
  if (strchr(a, '/')) {
    snprintf(out, n, "%s", a);
    return 0;
  }
  const char *colon = strrchr(a, ':');
  if (colon && colon[1] && strspn(colon + 1, "0123456789") == strlen(colon + 1) && colon > a) {
    snprintf(out, n, "tcp://%.*s:%s", (int)(colon - a), a, colon + 1);
    return 1;
  }
  td__usage_error("address %s: give HOST:PORT, local, or a node.sock path", a);
  return -1;
}

static volatile sig_atomic_t td__stop_daemon;
static void td__on_term(int sig) { (void)sig; td__stop_daemon = 1; }
static int td__listen_fd = -1;

static void td__on_accept(void *ud) {
  (void)ud;
  int fd = accept4(td__listen_fd, NULL, NULL, SOCK_CLOEXEC);
  if (fd >= 0) td_node_add_client(td_ctx.node, fd);
}

/* The pid node.pid names, or 0; read without following a link. */
static int td__read_pid(int dfd) {
  char buf[32];
  int fd = openat(dfd, "node.pid", O_RDONLY | O_NOFOLLOW | O_CLOEXEC);
  if (fd < 0) return 0;
  ssize_t r = read(fd, buf, sizeof(buf) - 1);
  close(fd);
  if (r <= 0) return 0;
  buf[r] = 0;
  int pid = atoi(buf);
  return pid > 0 ? pid : 0;
}

/* Resolves the cluster key for TCP: --key, TIDE_KEY_FILE, or this user's
 * default session (where `tide start --head` wrote it). Prints why not. */
static char td__key_used[PATH_MAX + 16]; /* the key file td__load_key read, for messages */

static int td__load_key(td_cluster_key_t *key) {
  char keyf[PATH_MAX + 16];
  const char *kf = td__key_arg ? td__key_arg : getenv("TIDE_KEY_FILE");
  if (!kf) {
    char dir[PATH_MAX - 16];
    td__session_dir(dir, sizeof(dir));
    if (td__session_foreign()) return -1;
    snprintf(keyf, sizeof(keyf), "%s/cluster.key", dir);
    kf = keyf;
  }
  snprintf(td__key_used, sizeof(td__key_used), "%s", kf);
  struct stat st;
  if (stat(kf, &st) != 0) {
    if (errno == ENOENT) fprintf(stderr, "tide: no cluster key at %s (pass --key FILE or set TIDE_KEY_FILE)\n", kf);
    else fprintf(stderr, "tide: cannot read the cluster key %s: %s\n", kf, strerror(errno));
    return -1;
  }
  if (access(kf, R_OK) != 0) {
    fprintf(stderr, "tide: cannot read the cluster key %s: %s\n", kf, strerror(errno));
    return -1;
  }
  if (td_key_load(kf, key)) {
    fprintf(stderr, "tide: the cluster key %s is malformed: it needs server_public, client_public and "
                    "client_secret lines of 40 characters each (copy the head's session cluster.key)\n", kf);
    return -1;
  }
  /* Whoever can read the key can join and run code, so say so, as ssh
   * does for a private key; unlike ssh, go on (the key still works). */
  if (st.st_mode & 077)
    fprintf(stderr, "tide: warning: the cluster key %s is accessible by others (mode %04o): anyone who can "
                    "read it can join the cluster and run code; chmod 600 %s\n", kf, (unsigned)(st.st_mode & 07777), kf);
  return 0;
}

/* Why the node at ep ("tcp://HOST:PORT") did not answer over CURVE, for
 * the message: something listens there (so the handshake failed: most
 * likely a key of another cluster), nothing does, or nothing answers at
 * all. One plain TCP connection, made only after a failure; the node
 * counts it as one more refused connection. */
static void td__why_no_answer(const char *ep, char *why, size_t n) {
  const char *hp = strncmp(ep, "tcp://", 6) ? ep : ep + 6;
  const char *colon = strrchr(hp, ':');
  char host[256];
  snprintf(host, sizeof(host), "%.*s", colon ? (int)(colon - hp) : (int)strlen(hp), hp);
  struct addrinfo hints = {0}, *ai = NULL;
  hints.ai_socktype = SOCK_STREAM;
  int gai = colon ? getaddrinfo(host, colon + 1, &hints, &ai) : EAI_NONAME;
  if (gai != 0) {
    snprintf(why, n, "cannot resolve %s: %s", host, gai_strerror(gai));
    return;
  }
  int err = ETIMEDOUT;
  int fd = socket(ai->ai_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (fd >= 0) {
    if (connect(fd, ai->ai_addr, ai->ai_addrlen) == 0) {
      err = 0;
    } else if (errno != EINPROGRESS) {
      err = errno;
    } else {
      struct pollfd p = {.fd = fd, .events = POLLOUT};
      socklen_t len = sizeof(err);
      if (poll(&p, 1, 3000) == 1) getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len);
    }
    close(fd);
  }
  freeaddrinfo(ai);
  if (err == 0)
    snprintf(why, n, "%s is listening but did not take the cluster key %s (the key of another cluster?)", hp,
             td__key_used);
  else if (err == ECONNREFUSED)
    snprintf(why, n, "nothing is listening at %s (connection refused): is the head running there, on that port?",
             hp);
  else
    snprintf(why, n, "%s does not answer (%s): a wrong host, or a firewall in the way?", hp, strerror(err));
}

/* One try at joining the head: connect over CURVE and get an index.
 * Returns 0 with *fd the link, or -1. */
static int td__join_once(const char *ep, const td_cluster_key_t *key, uint32_t want, uint32_t *index, int *fd) {
  if (td_bridge_client_start(ep, key, fd)) return -1;
  int rc = td_link_handshake(*fd, want, index, 3.0);
  if (rc == 0) return 0;
  close(*fd);
  td_bridge_client_stop();
  fprintf(stderr, "tide: cannot join the head at %s: %s; retrying\n", ep, td_strerror(rc));
  fflush(stderr);
  return -1;
}

/* The write end of a pipe to the `tide start` that forked this daemon: it
 * reports success only once the node listens everywhere it should, and a
 * failure with its reason ("+" or "-REASON", then the pipe closes; a
 * daemon that dies first just closes it). */
static int td__ready_fd = -1;
static void td__ready(const char *why_not) {
  if (td__ready_fd < 0) return;
  char msg[600];
  int n = snprintf(msg, sizeof(msg), "%s%s", why_not ? "-" : "+", why_not ? why_not : "");
  ssize_t w = write(td__ready_fd, msg, (size_t)n < sizeof(msg) ? (size_t)n : sizeof(msg) - 1);
  (void)w;
  close(td__ready_fd);
  td__ready_fd = -1;
}

/* In `tide start`: waits up to timeout_s for the daemon's word on the
 * pipe. Returns 1 up, 0 failed (why in why), -1 no word yet. */
static int td__wait_ready(int fd, pid_t pid, double timeout_s, char *why, size_t n) {
  char buf[600];
  size_t len = 0;
  double until = td_now() + timeout_s;
  why[0] = 0;
  for (;;) {
    double left = until - td_now();
    if (left <= 0) return -1;
    struct pollfd p = {.fd = fd, .events = POLLIN};
    int r = poll(&p, 1, (int)(left * 1000) + 1);
    if (r < 0 && errno == EINTR) continue;
    if (r <= 0) return -1;
    ssize_t got = read(fd, buf + len, sizeof(buf) - 1 - len);
    if (got < 0 && errno == EINTR) continue;
    if (got > 0) {
      len += (size_t)got;
      if (len < sizeof(buf) - 1) continue;
    }
    /* The pipe closed (or the message filled the buffer). */
    buf[len] = 0;
    if (len && buf[0] == '+') return 1;
    if (len && buf[0] == '-') snprintf(why, n, "%s", buf + 1);
    int st;
    waitpid(pid, &st, WNOHANG);
    return 0;
  }
}

/* Links to other nodes, over the bridge (td_node_set_peering). */
static void *td__peer_open(void *ud, const char *ep, int *fd) { return td_bridge_open(ep, ud, fd); }
static void td__peer_close(void *ud, void *h) {
  (void)ud;
  td_bridge_close(h, 0);
}

/* The address of this machine's interface toward ep ("tcp://HOST:PORT"),
 * into out: where a joining node listens, as the head tells the other
 * nodes the address it sees the node's connection come from. Nothing is
 * sent (a UDP socket only picks its route). -1 when there is no route. */
static int td__addr_toward(const char *ep, char *out, size_t n) {
  char host[256];
  const char *h = ep + 6, *colon = strrchr(h, ':');
  if (strncmp(ep, "tcp://", 6) || !colon || (size_t)(colon - h) >= sizeof(host)) return -1;
  snprintf(host, sizeof(host), "%.*s", (int)(colon - h), h);
  struct addrinfo hints = {0}, *ai;
  hints.ai_family = AF_INET;
  hints.ai_socktype = SOCK_DGRAM;
  if (getaddrinfo(host, colon + 1, &hints, &ai) != 0) return -1;
  int fd = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
  struct sockaddr_in me;
  socklen_t ml = sizeof(me);
  int rc = fd >= 0 && connect(fd, ai->ai_addr, ai->ai_addrlen) == 0 &&
           getsockname(fd, (struct sockaddr *)&me, &ml) == 0 &&
           inet_ntop(AF_INET, &me.sin_addr, out, (socklen_t)n) ? 0 : -1;
  if (fd >= 0) close(fd);
  freeaddrinfo(ai);
  return rc;
}

static int td__start(int argc, char **argv) {
  int head = 0, block = 0, port = 6380, port_given = 0;
  int dash_port = 8265, dash_given = 0;  /* --dashboard-port: -1 off */
  const char *dash_host = "127.0.0.1";
  char dash_secret[41] = "";
  const char *join = NULL, *node_name = NULL;
  double node_timeout = 0, join_timeout = 15;
  uint32_t want_index = 0;  /* --node-index: the index this node asks the head for */
  int dp_mode = TD_DP_ON;   /* --data-plane (dplane.h) */
  const char *bind_host = NULL;  /* --host; else loopback, or toward the head */
  char toward[64] = "";
  char dir[PATH_MAX], sock[PATH_MAX + 16], pidf[PATH_MAX + 16], logf[PATH_MAX + 16];
  char keyf[PATH_MAX + 16];
  /* Resource flags are parsed by the same code as tide run. */
  char *rest[64];
  int nrest = 0;
  rest[nrest++] = argv[0];
  rest[nrest++] = "start";
  for (int i = 2; i < argc; i++) {
    const char *a = argv[i];
    if (td__is_help(a)) return td__help("start");
    if (!strcmp(a, "--head")) { head = 1; continue; }
    if (!strcmp(a, "--block")) { block = 1; continue; }
    int valued = !strcmp(a, "--port") || !strcmp(a, "--host") || !strcmp(a, "--address") ||
                 !strcmp(a, "--key") || !strcmp(a, "--name") || !strcmp(a, "--node-timeout") ||
                 !strcmp(a, "--join-timeout") || !strcmp(a, "--node-index") || !strcmp(a, "--dashboard-port") ||
                 !strcmp(a, "--dashboard-host") ||
                 !strcmp(a, "--data-plane");
    if (valued && i + 1 >= argc) return td__usage_error("option %s needs a value", a);
    if (!strcmp(a, "--port")) {
      char *end;
      long p = strtol(argv[++i], &end, 10);
      if (*end || end == argv[i] || p < 0 || p > 65535)
        return td__usage_error("--port needs a port number (0-65535), not %s", argv[i]);
      port = (int)p, port_given = 1;
    }
    else if (!strcmp(a, "--dashboard-port")) {
      char *end;
      const char *v = argv[++i];
      long p = strtol(v, &end, 10);
      if (!strcmp(v, "off")) dash_port = -1;
      else if (*end || end == v || p < 0 || p > 65535)
        return td__usage_error("--dashboard-port needs a port number (0-65535) or off, not %s", v);
      else dash_port = (int)p;
      dash_given = 1;
    }
    else if (!strcmp(a, "--dashboard-host")) dash_host = argv[++i];
    else if (!strcmp(a, "--host")) bind_host = argv[++i];
    else if (!strcmp(a, "--address")) join = argv[++i];
    else if (!strcmp(a, "--key")) td__key_arg = argv[++i];
    else if (!strcmp(a, "--name")) node_name = argv[++i];
    else if (!strcmp(a, "--node-index")) {
      char *end;
      unsigned long v = strtoul(argv[++i], &end, 10);
      if (*end || end == argv[i] || v < 1 || v > TD_NODE_MAX)
        return td__usage_error("--node-index needs an index in 1..4095, not %s", argv[i]);
      want_index = (uint32_t)v;
    }
    else if (!strcmp(a, "--node-timeout")) {
      char *end;
      node_timeout = strtod(argv[++i], &end);
      if (*end || !(node_timeout > 0)) return td__usage_error("%s", "--node-timeout needs a positive number of seconds");
    }
    else if (!strcmp(a, "--data-plane")) {
      dp_mode = td_dp_mode_parse(argv[++i]);
      if (dp_mode < 0) return td__usage_error("--data-plane takes on, plain or off, not %s", argv[i]);
    }
    else if (!strcmp(a, "--join-timeout")) {
      char *end;
      join_timeout = strtod(argv[++i], &end);
      if (*end || end == argv[i] || !(join_timeout >= 0))
        return td__usage_error("%s", "--join-timeout needs a number of seconds (0: keep trying)");
    }
    else if (nrest < 62) rest[nrest++] = argv[i];
    else return td__usage_error("%s", "too many options");
  }
  /* The resource flags are checked here, before the daemon forks, so a bad
   * one is a usage error on the terminal rather than a line in node.log. */
  {
    lua_State *T = luaL_newstate();
    int next = nrest;
    int rc = td__parse_flags(T, nrest, rest, 2, &next);
    lua_close(T);
    if (rc >= 0) return rc;
    if (next < nrest) return td__usage_error("start takes no SCRIPT or other arguments: %s", rest[next]);
  }
  if (!head && !join) return td__usage_error("%s", "start needs --head, or --address HOST:PORT to join a head");
  if (head && join) return td__usage_error("%s", "start takes --head or --address, not both");
  char join_ep[PATH_MAX];
  td_cluster_key_t join_key;
  if (join) {
    int kind = td__resolve_address(join, join_ep, sizeof(join_ep));
    if (kind < 0) return 2;
    if (kind != 1) return td__usage_error("--address %s: a node joins its head at HOST:PORT", join);
    if (td__load_key(&join_key)) return 1;
    if (!port_given) port = -1;  /* a port of its own choosing, for other nodes */
    if (!bind_host) bind_host = td__addr_toward(join_ep, toward, sizeof(toward)) == 0 ? toward : "127.0.0.1";
  }
  /* A head listens on loopback unless told otherwise: the cluster key is
   * all that guards the port, so it is not opened to the network unasked. */
  int loopback_only = !bind_host || !strncmp(bind_host, "127.", 4) || !strcmp(bind_host, "localhost");
  if (!bind_host) bind_host = "127.0.0.1";
  /* Collective groups across nodes (lua/coll_net.c): the node's workers
   * inherit where their streams listen and how they protect them. */
  setenv("TIDE_COLL_HOST",
         strcmp(bind_host, "0.0.0.0") && strcmp(bind_host, "::") ? bind_host : toward[0] ? toward : "127.0.0.1", 1);
  setenv("TIDE_COLL_PLAIN", dp_mode == TD_DP_PLAIN ? "1" : "0", 1);
  int dfd = td__session_open(dir, sizeof(dir), 1);
  if (dfd < 0) return 1;
  int running = td__lock_holder_live(dfd);
  if (running) {
    fprintf(stderr, "tide: a node is already running here (pid %d); `tide stop` stops it\n", running);
    return 1;
  }
  /* No daemon holds the lock: a socket or pid file left here is a dead
   * one's (killed, or the machine crashed), never a sign of a live node. */
  unlinkat(dfd, "node.sock", 0);
  unlinkat(dfd, "node.pid", 0);
  snprintf(sock, sizeof(sock), "%s/node.sock", dir);
  snprintf(pidf, sizeof(pidf), "%s/node.pid", dir);
  snprintf(logf, sizeof(logf), "%s/node.log", dir);
  snprintf(keyf, sizeof(keyf), "%s/cluster.key", dir);
  if (!block) {
    int ready[2];
    if (pipe2(ready, O_CLOEXEC) != 0) {
      fprintf(stderr, "tide: pipe: %s\n", strerror(errno));
      return 1;
    }
    pid_t pid = fork();
    if (pid < 0) return 1;
    if (pid > 0) {
      close(ready[1]);
      char why[600];
      /* A head may wait 10 s for its port (see below); a joining node
       * --join-timeout for its head, then reports why it gave up. */
      int up = td__wait_ready(ready[0], pid, join ? (join_timeout > 0 ? join_timeout + 15 : 15) : 30, why,
                              sizeof(why));
      close(ready[0]);
      if (up == 1) {
        printf("tide: node started (pid %d), session %s\n", (int)pid, dir);
        if (join) printf("tide: joined the head at %s\n", join);
        printf("attach with:\n  bin/tide run --address local SCRIPT.lua\n  bin/tide repl --address local\n"
               "  bin/tide status\n");
        if (port > 0 && head && loopback_only) {
          printf("join a node on this machine (a session directory of its own):\n"
                 "  TIDE_SESSION_DIR=/tmp/tide-node1 bin/tide start --address %s:%d --key %s\n",
                 bind_host, port, keyf);
          printf("other machines cannot reach it: it listens on %s only (start it with --host ADDR, or "
                 "--host 0.0.0.0 for every interface, to let them join)\n", bind_host);
        } else if (port > 0) {
          const char *h = head && strcmp(bind_host, "0.0.0.0") && strcmp(bind_host, "::") ? bind_host : "HOST";
          printf("from another machine (copy the key, mode 0600):\n"
                 "  bin/tide start --address %s:%d --key cluster.key     # join as a node\n"
                 "  bin/tide run --address %s:%d --key cluster.key SCRIPT.lua\n", h, port, h, port);
        }
        printf("stop with:\n  bin/tide stop\n");
        return 0;
      }
      if (up < 0 && join && td__alive(pid)) {
        fprintf(stderr, "tide: no answer from the head at %s yet; the node keeps trying (--join-timeout 0; see %s; "
                        "`tide stop` stops it)\n", join, logf);
        return 1;
      }
      /* A daemon that gave up cleans up and exits: nothing is left behind. */
      int st;
      for (int i = 0; i < 100 && waitpid(pid, &st, WNOHANG) == 0; i++) usleep(50000);
      if (td__alive(pid)) kill(pid, SIGKILL), waitpid(pid, &st, 0);
      if (why[0]) fprintf(stderr, "tide: %s\n", why);
      else fprintf(stderr, "tide: the node did not start; see %s\n", logf);
      return 1;
    }
    close(ready[0]);
    td__ready_fd = ready[1];
    setsid();
    int lf = openat(dfd, "node.log", O_WRONLY | O_CREAT | O_APPEND | O_NOFOLLOW | O_CLOEXEC, 0600);
    if (lf >= 0) { dup2(lf, 1); dup2(lf, 2); close(lf); }
    int nf = open("/dev/null", O_RDONLY);
    if (nf >= 0) { dup2(nf, 0); close(nf); }
  }
  /* The lock is this process's (record locks are not inherited): taken
   * here, in the daemon, and held until it exits. */
  if (td__lock_take(dfd) < 0) {
    char msg[PATH_MAX + 100];
    snprintf(msg, sizeof(msg), "a node is already running in %s (pid %d); `tide stop` stops it", dir,
             td__lock_holder(dfd));
    fprintf(stderr, "tide: %s\n", msg);
    td__ready(msg);
    return 1;
  }
  int pf = openat(dfd, "node.pid", O_WRONLY | O_CREAT | O_TRUNC | O_NOFOLLOW | O_CLOEXEC, 0600);
  if (pf >= 0) {
    char pb[32];
    int pl = snprintf(pb, sizeof(pb), "%d\n", (int)getpid());
    if (write(pf, pb, (size_t)pl) != pl) fprintf(stderr, "tide: cannot write %s\n", pidf);
    close(pf);
  }
  /* Each worker's output is kept in the session's logs/ (tide logs). */
  if (td_obs_set_logdir(dir)) fprintf(stderr, "tide: cannot make %s/logs; worker output goes to node.log\n", dir);
  /* Start the node through the same Lua path as tide run, without a script. */
  lua_State *L = luaL_newstate();
  td_ctx.is_driver = 1;
  td_ser_init(&td_ctx.ser);
  td__open(L);
  int rc = td__parse_flags(L, nrest, rest, 2, NULL);
  if (rc >= 0) { unlink(pidf); return rc; }
  signal(SIGTERM, td__on_term);
  signal(SIGINT, td__on_term);
  signal(SIGPIPE, SIG_IGN);
  /* Joining: the head gives this node its index first, as every id made
   * here carries it. */
  uint32_t node_index = 0;
  int link_fd = -1;
  if (join) {
    /* A first join that does not succeed in --join-timeout seconds (a wrong
     * key, no head there) ends this daemon with the reason, rather than
     * leaving it retrying forever; 0 keeps trying. A node that has joined
     * retries for ever when it loses its head (below). */
    double give_up = join_timeout > 0 ? td_now() + join_timeout : 0;
    while (td__join_once(join_ep, &join_key, want_index, &node_index, &link_fd)) {
      if (td__stop_daemon) { unlink(pidf); return 0; }
      if (give_up && td_now() >= give_up) {
        char why[PATH_MAX + 256], msg[PATH_MAX + 512];
        td__why_no_answer(join_ep, why, sizeof(why));
        snprintf(msg, sizeof(msg), "cannot join the head at %s: %s (gave up after %g s; --join-timeout 0 keeps trying)",
                 join, why, join_timeout);
        fprintf(stderr, "tide: %s\n", msg);
        td__ready(msg);
        unlink(pidf);
        return 1;
      }
      sleep(1);
    }
    char nid[32];
    snprintf(nid, sizeof(nid), "node-%u", node_index);
    setenv("TIDE_NODE_ID", nid, 1);  /* workers' runtime context */
    printf("tide: joined the head at %s as %s\n", join, nid);
    fflush(stdout);
  }
  /* A head keeps its tables in the session's head.db: restarted, it
   * resumes them. */
  char dbf[PATH_MAX + 16];
  snprintf(dbf, sizeof(dbf), "%s/head.db", dir);
  int had_db = access(dbf, F_OK) == 0;
  if (head && td_persist_open(dbf) == 0) printf("tide: head state in %s\n", dbf);
  lua_getfield(L, LUA_REGISTRYINDEX, "tide.cli_opts");
  lua_pushinteger(L, (lua_Integer)node_index);
  lua_setfield(L, -2, "node_index");
  if (node_timeout > 0) {
    lua_pushnumber(L, node_timeout);
    lua_setfield(L, -2, "node_timeout");
  }
  if (node_name) {
    lua_pushstring(L, node_name);
    lua_setfield(L, -2, "node_name");
  }
  lua_pop(L, 1);
  lua_getglobal(L, "require");
  lua_pushliteral(L, "tide");
  if (lua_pcall(L, 1, 1, 0) != 0 || (lua_getfield(L, -1, "_start"), lua_pcall(L, 0, 0, 0)) != 0) {
    fprintf(stderr, "tide: %s\n", lua_tostring(L, -1));
    unlink(pidf);
    return 2;
  }
  /* This process pumps the node itself. */
  td_core_bg_stop();
  unlink(sock);
  struct sockaddr_un sa;
  memset(&sa, 0, sizeof(sa));
  sa.sun_family = AF_UNIX;
  if (strlen(sock) >= sizeof(sa.sun_path)) {
    fprintf(stderr, "tide: session path too long for a socket: %s\n", sock);
    return 1;
  }
  memcpy(sa.sun_path, sock, strlen(sock) + 1);
  td__listen_fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (td__listen_fd < 0 || bind(td__listen_fd, (struct sockaddr *)&sa, sizeof(sa)) != 0 ||
      listen(td__listen_fd, 64) != 0) {
    fprintf(stderr, "tide: cannot listen on %s: %s\n", sock, strerror(errno));
    unlink(pidf);
    return 1;
  }
  chmod(sock, 0600);
  /* TCP, secured with CURVE: the cluster key is made once per session by
   * a head; a node that joins listens with the key it joined with. */
  char failed[512] = "";
  if (port != 0) {
    td_cluster_key_t key;
    if (join ? td_key_save(keyf, &join_key) : td_key_load(keyf, &key) && td_key_create(keyf, &key)) {
      snprintf(failed, sizeof(failed), "cannot write the cluster key %.300s: %s", keyf, strerror(errno));
    } else {
      char ep[300];
      if (join) key = join_key;
      memcpy(dash_secret, key.server_secret, sizeof(dash_secret));
      if (port > 0) snprintf(ep, sizeof(ep), "tcp://%s:%d", bind_host, port);
      else snprintf(ep, sizeof(ep), "tcp://%s:*", bind_host);
      /* A killed predecessor may hold the port for a moment while its
       * last threads exit: try for a while before giving up. */
      int up = -1, err = 0;
      for (int i = 0; i < 100 && (up = td_bridge_server_start(ep, sock, &key)) != 0 && !td__stop_daemon; i++) {
        err = errno;
        usleep(100000);
      }
      if (up == 0 && dp_mode != TD_DP_OFF) {
        /* Bulk bytes between nodes go over direct streams (dplane.c),
         * keyed from the cluster key. */
        char kt[128], hh[256] = "";
        snprintf(kt, sizeof(kt), "%s%s", key.client_secret, key.server_public);
        if (join) {
          const char *h = join_ep + 6, *c = strrchr(h, ':');
          if (*h == '[') h++;
          size_t hl = c && c > h ? (size_t)(c - h) : 0;
          if (hl && h[hl - 1] == ']') hl--;
          snprintf(hh, sizeof(hh), "%.*s", (int)hl, h);
        }
        if (td_node_set_dplane(td_ctx.node, dp_mode, bind_host, join ? hh : NULL, kt))
          fprintf(stderr, "tide: data plane: cannot listen on %s (%s): chunks go over ZeroMQ\n", bind_host,
                  strerror(errno));
        else
          printf("tide: data plane on %s port %d (%s)\n", bind_host, td_node_dplane_port(td_ctx.node),
                 dp_mode == TD_DP_PLAIN ? "plain: authenticated, not encrypted" : "AES-128-GCM");
        memset(kt, 0, sizeof(kt));
      }
      if (up == 0 && join) {
        /* Other nodes fetch objects from this one there. */
        td_node_set_peering(td_ctx.node, td_bridge_server_port(), td__peer_open, td__peer_close, &join_key);
        printf("tide: listening for other nodes on %s port %d (CURVE)\n", bind_host, td_bridge_server_port());
      } else if (up == 0)
        printf("tide: listening on %s (CURVE; key %s)%s\n", ep, keyf,
               loopback_only ? "; loopback only: --host ADDR lets other machines join" : "");
      else if (err == EADDRINUSE)
        snprintf(failed, sizeof(failed), "cannot listen on %.100s:%d: port %d is in use (another head, or another "
                 "program); pick another with --port", bind_host, port, port);
      else
        snprintf(failed, sizeof(failed), "cannot listen on %.300s: %s", ep, zmq_strerror(err));
    }
  }
  /* Without its TCP port a head is no head for other machines: it stops,
   * and `tide start` says why, rather than running with TCP silently off. */
  if (failed[0]) {
    fprintf(stderr, "tide: %s\n", failed);
    td__ready(failed);
    td__stop_daemon = 1;
  } else {
    setenv("TIDE_SESSION_DIR", dir, 1);
    td_node_restore(td_ctx.node);
    td_core_enable_jobs(td__home);
    td_obs_enable(td__home);
  }
  signal(SIGTERM, td__on_term);
  signal(SIGINT, td__on_term);
  signal(SIGHUP, SIG_IGN);
  signal(SIGPIPE, SIG_IGN);
  td_node_watch_fd(td_ctx.node, td__listen_fd, td__on_accept, NULL, NULL);
  if (head && !failed[0] && dash_port >= 0) {
    /* The dashboard and /metrics: on loopback unless told otherwise, and
     * from other addresses only with the token derived from the cluster
     * key. A default port already taken gives way to any free one. */
    int bound = 0, rc = td_obs_dashboard_start(dash_host, dash_port, dash_secret, td__listen_fd, td__on_accept, &bound);
    if (rc == UV_EADDRINUSE && !dash_given)
      rc = td_obs_dashboard_start(dash_host, 0, dash_secret, td__listen_fd, td__on_accept, &bound);
    if (rc) {
      fprintf(stderr, "tide: no dashboard: cannot listen on %s:%d: %s\n", dash_host, dash_port, uv_strerror(rc));
    } else {
      printf("tide: dashboard and /metrics on http://%s:%d/\n", dash_host, bound);
      int df = openat(dfd, "dashboard.port", O_WRONLY | O_CREAT | O_TRUNC | O_NOFOLLOW | O_CLOEXEC, 0600);
      if (df >= 0) {
        char pb[32];
        int pl = snprintf(pb, sizeof(pb), "%d\n", bound);
        if (write(df, pb, (size_t)pl) != pl) fprintf(stderr, "tide: cannot write dashboard.port\n");
        close(df);
      }
      if (dash_secret[0]) {
        char tok[65];
        td_obs_token(dash_secret, tok);
        df = openat(dfd, "dashboard.token", O_WRONLY | O_CREAT | O_TRUNC | O_NOFOLLOW | O_CLOEXEC, 0600);
        if (df >= 0) {
          if (write(df, tok, 64) != 64 || write(df, "\n", 1) != 1) fprintf(stderr, "tide: cannot write dashboard.token\n");
          close(df);
        }
      }
    }
  }
  if (link_fd >= 0) td_node_link_head(td_ctx.node, link_fd);
  if (!failed[0]) {
    printf("tide: node listening on %s\n", sock);
    fflush(stdout);
    td__ready(NULL);
  }
  double retry_at = 0, rotate_at = 0;
  const char *lm = getenv("TIDE_LOG_MAX_BYTES");
  size_t log_max = lm && atoll(lm) > 0 ? (size_t)atoll(lm) : (size_t)64 << 20;
  while (!td__stop_daemon) {
    td_core_flush_refs();
    td_node_pump(td_ctx.node, 0.5);
    if (td_now() >= rotate_at) {
      td_obs_rotate(log_max);
      rotate_at = td_now() + 2;
    }
    if (join && !td_node_linked(td_ctx.node) && td_now() >= retry_at) {
      /* The head is gone: keep trying, under the same index. */
      td_bridge_client_stop();
      uint32_t again = 0;
      if (td__join_once(join_ep, &join_key, node_index, &again, &link_fd) == 0) {
        if (again != node_index) {
          fprintf(stderr, "tide: the head gave this node index %u, not its own %u; stopping "
                          "(start it again to join as a new node)\n", again, node_index);
          break;
        }
        td_node_link_head(td_ctx.node, link_fd);
        printf("tide: rejoined the head at %s as node-%u\n", join, node_index);
        fflush(stdout);
      } else {
        retry_at = td_now() + 1;
      }
    }
  }
  printf("tide: node stopping\n");
  td_obs_dashboard_stop();
  unlinkat(dfd, "dashboard.port", 0);
  td_bridge_server_stop();
  td_node_destroy(&td_ctx.node);
  td_bridge_client_stop();  /* after the link is closed */
  if (td_persist_on() && failed[0] && had_db) {
    td_persist_close();  /* not started: a dead head's state waits for the next start */
  } else if (td_persist_on()) {
    /* Stopped on purpose: the cluster ends, and its state with it (only a
     * head that died is resumed). */
    td_persist_close();
    unlink(dbf);
    char side[PATH_MAX + 32];
    snprintf(side, sizeof(side), "%s-wal", dbf);
    unlink(side);
    snprintf(side, sizeof(side), "%s-shm", dbf);
    unlink(side);
  }
  close(td__listen_fd);
  unlink(sock);
  unlink(pidf);
  return failed[0] ? 1 : 0;
}

static int td__stop(void) {
  char dir[PATH_MAX];
  int dfd = td__session_open(dir, sizeof(dir), 0);
  if (dfd == -1) return 1;
  int pid = dfd >= 0 ? td__lock_holder(dfd) : 0;
  if (!pid) {
    int stale = dfd >= 0 ? td__read_pid(dfd) : 0;
    if (stale) {
      /* A daemon that died without cleaning up (or a forged file): the pid
       * may be anyone's now. */
      fprintf(stderr, "tide: no node is running in %s (node.pid names pid %d, which does not hold the "
                      "session lock: not signalled)\n", dir, stale);
    } else {
      fprintf(stderr, "tide: no node is running in %s\n", dir);
    }
    if (dfd >= 0) close(dfd);
    return 1;
  }
  close(dfd);
  if (!td__is_tide(pid)) {
    fprintf(stderr, "tide: pid %d holds the lock of %s but is not a tide process: not signalled\n", pid, dir);
    return 1;
  }
  kill(pid, SIGTERM);
  /* Gone when its lock is: a zombie its parent has not reaped holds none. */
  for (int i = 0; i < 100 && td__lock_held_by(dir, pid); i++) usleep(50000);
  if (td__lock_held_by(dir, pid)) kill(pid, SIGKILL);
  printf("tide: stopped the node (pid %d)\n", pid);
  return 0;
}

/* tide stop --all: every node daemon this user runs on this machine,
 * whatever its session directory, as `ray stop` does. A daemon is a
 * process of this user (real uid) whose argv[0] is named tide and whose
 * first argument is "start": the daemon keeps the argv of the `tide start`
 * that forked it, and --block runs under that argv too. All get SIGTERM at
 * once; those still there after 5 s get SIGKILL. */
static int td__stop_all(void) {
  DIR *d = opendir("/proc");
  if (!d) {
    fprintf(stderr, "tide: cannot list processes in /proc: %s\n", strerror(errno));
    return 1;
  }
  static int pids[256];
  static char sessions[256][256];
  int n = 0;
  struct dirent *e;
  while ((e = readdir(d)) && n < (int)(sizeof(pids) / sizeof(pids[0]))) {
    char *end;
    long pid = strtol(e->d_name, &end, 10);
    if (*end || pid <= 0 || pid == (long)getpid()) continue;
    char path[64], buf[4096];
    snprintf(path, sizeof(path), "/proc/%ld/status", pid);
    FILE *f = fopen(path, "r");
    if (!f) continue;
    unsigned uid = (unsigned)-1;
    while (fgets(buf, sizeof(buf), f))
      if (sscanf(buf, "Uid: %u", &uid) == 1) break;
    fclose(f);
    if (uid != (unsigned)getuid()) continue;
    snprintf(path, sizeof(path), "/proc/%ld/cmdline", pid);
    f = fopen(path, "r");
    if (!f) continue;
    size_t len = fread(buf, 1, sizeof(buf) - 1, f);
    fclose(f);
    buf[len] = 0;
    const char *arg0 = buf, *base = strrchr(arg0, '/');
    base = base ? base + 1 : arg0;
    size_t l0 = strlen(arg0);
    if (strcmp(base, "tide") || l0 + 1 >= len || strcmp(buf + l0 + 1, "start")) continue;
    if (!td__alive((int)pid)) continue;
    /* Its session directory, for the report: the TIDE_SESSION_DIR it was
     * started with, else the default. */
    td__session_dir(sessions[n], sizeof(sessions[n]));
    snprintf(path, sizeof(path), "/proc/%ld/environ", pid);
    f = fopen(path, "r");
    if (f) {
      static char env[65536];
      size_t el = fread(env, 1, sizeof(env) - 1, f);
      fclose(f);
      env[el] = 0;
      for (size_t o = 0; o < el; o += strlen(env + o) + 1)
        if (!strncmp(env + o, "TIDE_SESSION_DIR=", 17)) snprintf(sessions[n], sizeof(sessions[n]), "%s", env + o + 17);
    }
    pids[n++] = (int)pid;
  }
  closedir(d);
  if (!n) {
    printf("tide: no node of this user is running on this machine\n");
    return 0;
  }
  for (int i = 0; i < n; i++) kill(pids[i], SIGTERM);
  for (int t = 0; t < 100; t++) {
    int left = 0;
    for (int i = 0; i < n; i++) left += td__alive(pids[i]);
    if (!left) break;
    usleep(50000);
  }
  for (int i = 0; i < n; i++) {
    int killed = td__alive(pids[i]) && kill(pids[i], SIGKILL) == 0;
    printf("tide: stopped the node (pid %d, session %s%s)\n", pids[i], sessions[i],
           killed ? "; SIGKILL after 5 s" : "");
  }
  return 0;
}

/* Checks the arguments of `tide submit` and `tide job` (what
 * stdlib/tide/jobcli.lua takes), so that --help and a mistake need no
 * running node. Returns -1 to go on, or an exit status. */
static int td__jobcli_args(int argc, char **argv) {
  int submit = !strcmp(argv[1], "submit"), follow = 0, npos = 0;
  const char *pos[2] = {NULL, NULL};
  for (int k = 2; k < argc; k++) {
    const char *a = argv[k];
    if (td__is_help(a)) return td__help(argv[1]);
    if (!strcmp(a, "--address") || !strcmp(a, "--key") || (submit && !strcmp(a, "--working-dir"))) {
      if (k + 1 >= argc) return td__usage_error("option %s needs a value", a);
      k++;
    } else if (!submit && !strcmp(a, "--follow")) {
      follow = 1;
    } else if (a[0] == '-') {
      return td__usage_error("unknown option %s", a);
    } else if (submit) {
      return -1;  /* SCRIPT: what follows is its arguments */
    } else if (npos < 2) {
      pos[npos++] = a;
    } else {
      return td__usage_error("job: unexpected argument %s", a);
    }
  }
  if (submit) return td__usage_error("%s", "submit needs a SCRIPT");
  const char *sub = pos[0];
  if (!sub) return td__usage_error("%s", "job needs list, status ID, logs ID or stop ID");
  int list = !strcmp(sub, "list");
  if (!list && strcmp(sub, "status") && strcmp(sub, "logs") && strcmp(sub, "stop"))
    return td__usage_error("job: unknown command %s (list, status, logs or stop)", sub);
  if (list && pos[1]) return td__usage_error("job list: unexpected argument %s", pos[1]);
  if (!list && !pos[1]) return td__usage_error("job %s needs a job ID", sub);
  if (follow && strcmp(sub, "logs")) return td__usage_error("%s", "--follow goes with job logs");
  return -1;
}

/* tide list / tide logs: the arguments, checked before any node is asked. */
static int td__listcli_args(int argc, char **argv) {
  int list = !strcmp(argv[1], "list"), npos = 0;
  const char *pos[2] = {NULL, NULL};
  for (int k = 2; k < argc; k++) {
    const char *a = argv[k];
    if (td__is_help(a)) return td__help(argv[1]);
    int valued = !strcmp(a, "--address") || !strcmp(a, "--key") ||
                 (list && (!strcmp(a, "--filter") || !strcmp(a, "--limit") || !strcmp(a, "--offset"))) ||
                 (!list && !strcmp(a, "--tail"));
    if (valued) {
      if (k + 1 >= argc) return td__usage_error("option %s needs a value", a);
      const char *v = argv[++k];
      if (!strcmp(a, "--filter") && (!strchr(v, '=') || v[0] == '='))
        return td__usage_error("--filter needs key=value, not %s", v);
      if (!strcmp(a, "--limit") || !strcmp(a, "--offset") || !strcmp(a, "--tail")) {
        char *end;
        long n = strtol(v, &end, 10);
        if (*end || end == v || n < 0 || (n == 0 && !strcmp(a, "--limit")))
          return td__usage_error(!strcmp(a, "--limit") ? "--limit needs a positive number, not %s"
                                                       : "this option needs a number (0 or more), not %s", v);
      }
    } else if ((list && !strcmp(a, "--json")) || (!list && !strcmp(a, "--follow"))) {
      continue;
    } else if (a[0] == '-') {
      return td__usage_error("unknown option %s", a);
    } else if (npos < 2) {
      pos[npos++] = a;
    } else {
      return td__usage_error("unexpected argument %s", a);
    }
  }
  static const char *const kinds[] = {"nodes", "actors", "tasks", "objects", "placement-groups", "jobs", NULL};
  static const char *const targets[] = {"worker", "actor", "task", "job", NULL};
  const char *const *ok = list ? kinds : targets;
  if (!pos[0])
    return td__usage_error("%s", list ? "list needs a kind: nodes, actors, tasks, objects, placement-groups or jobs"
                                      : "logs needs worker ID, actor ID, task ID or job ID");
  int found = 0;
  for (int i = 0; ok[i]; i++) found |= !strcmp(ok[i], pos[0]);
  if (!found)
    return td__usage_error(list ? "list: unknown kind %s (nodes, actors, tasks, objects, placement-groups or jobs)"
                                : "logs: unknown target %s (worker, actor, task or job)", pos[0]);
  if (list && pos[1]) return td__usage_error("list: unexpected argument %s", pos[1]);
  if (!list && !pos[1]) return td__usage_error("logs %s needs an ID", pos[0]);
  return -1;
}

/* tide serve status: asks a running ingress for /-/status. */
static int td__serve_status(int argc, char **argv) {
  const char *host = "127.0.0.1";
  int port = 8000;
  for (int i = 3; i < argc; i++) {
    if (!strcmp(argv[i], "--port") && i + 1 < argc) port = atoi(argv[++i]);
    else if (!strcmp(argv[i], "--host") && i + 1 < argc) host = argv[++i];
    else if (td__is_help(argv[i])) return td__help("serve");
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
  if (td__is_help(cmd) || !strcmp(cmd, "help")) return td__help(argc > 2 ? argv[2] : NULL);
  td__cmd = cmd;
  /* A driver's prints and its error's traceback keep their order when both
   * go to a pipe or a file: stdout would otherwise be block-buffered and
   * reach the reader after stderr. */
  setvbuf(stdout, NULL, _IOLBF, 0);
  if (!strcmp(cmd, "run")) return td__run(argc, argv, 2, NULL);
  if (!strcmp(cmd, "start")) return td__start(argc, argv);
  if (!strcmp(cmd, "submit") || !strcmp(cmd, "job")) {
    /* Clients of the node: stdlib/tide/jobcli.lua does the work, once the
     * arguments are known to be right (a mistake needs no node). */
    int rc = td__jobcli_args(argc, argv);
    if (rc >= 0) return rc;
    char path[PATH_MAX + 32];
    snprintf(path, sizeof(path), "%s/stdlib/tide/jobcli.lua", td__home);
    for (int k = 2; k + 1 < argc; k++) {
      if (!strcmp(argv[k], "--address")) setenv("TIDE_ADDRESS", argv[k + 1], 1);
      if (!strcmp(argv[k], "--key")) td__key_arg = argv[k + 1];
    }
    if (!getenv("TIDE_ADDRESS")) setenv("TIDE_ADDRESS", "local", 1);
    char sock[PATH_MAX];
    int kind = td__resolve_address(getenv("TIDE_ADDRESS"), sock, sizeof(sock));
    if (kind < 0) return 2;
    if (kind == 0) setenv("TIDE_NODE_SOCKET", sock, 1);
    setenv("TIDE_EXE", td__exe, 1);
    return td__run(argc, argv, 1, path);
  }
  if (!strcmp(cmd, "timeline")) {
    /* A client of the node: stdlib/tide/timelinecli.lua writes the trace.
     * --merge FILE... needs no node: an embedded one is started, unused. */
    int merge = 0, files = 0;
    for (int k = 2; k < argc; k++) {
      const char *a = argv[k];
      if (td__is_help(a)) return td__help("timeline");
      if (!strcmp(a, "--merge")) {
        merge = 1;
        continue;
      }
      if (merge && a[0] != '-') {
        files++;
        continue;
      }
      if (!strcmp(a, "--local")) continue;
      if (strcmp(a, "--job") && strcmp(a, "-o") && strcmp(a, "--output") && strcmp(a, "--address") &&
          strcmp(a, "--key"))
        return td__usage_error(a[0] == '-' ? "unknown option %s" : "timeline: unexpected argument %s", a);
      if (k + 1 >= argc) return td__usage_error("option %s needs a value", a);
      if (!strcmp(a, "--address")) setenv("TIDE_ADDRESS", argv[k + 1], 1);
      if (!strcmp(a, "--key")) td__key_arg = argv[k + 1];
      k++;
    }
    if (merge) {
      if (!files) return td__usage_error("%s", "timeline --merge needs trace files");
      unsetenv("TIDE_ADDRESS");
    } else if (!getenv("TIDE_ADDRESS")) {
      setenv("TIDE_ADDRESS", "local", 1);
    }
    char path[PATH_MAX + 32];
    snprintf(path, sizeof(path), "%s/stdlib/tide/timelinecli.lua", td__home);
    return td__run(argc, argv, 2, path);
  }
  if (!strcmp(cmd, "list") || !strcmp(cmd, "logs")) {
    /* Clients of the head, like job: stdlib/tide/listcli.lua. */
    int rc = td__listcli_args(argc, argv);
    if (rc >= 0) return rc;
    char path[PATH_MAX + 32];
    snprintf(path, sizeof(path), "%s/stdlib/tide/listcli.lua", td__home);
    for (int k = 2; k + 1 < argc; k++) {
      if (!strcmp(argv[k], "--address")) setenv("TIDE_ADDRESS", argv[k + 1], 1);
      if (!strcmp(argv[k], "--key")) td__key_arg = argv[k + 1];
    }
    if (!getenv("TIDE_ADDRESS")) setenv("TIDE_ADDRESS", "local", 1);
    char sock[PATH_MAX];
    int kind = td__resolve_address(getenv("TIDE_ADDRESS"), sock, sizeof(sock));
    if (kind < 0) return 2;
    if (kind == 0) setenv("TIDE_NODE_SOCKET", sock, 1);
    return td__run(argc, argv, 1, path);
  }
  if (!strcmp(cmd, "stop")) {
    int all = 0;
    for (int k = 2; k < argc; k++) {
      if (td__is_help(argv[k])) return td__help("stop");
      if (!strcmp(argv[k], "--all")) all = 1;
      else return td__usage_error(argv[k][0] == '-' ? "unknown option %s" : "stop takes no arguments: %s", argv[k]);
    }
    return all ? td__stop_all() : td__stop();
  }
  if (!strcmp(cmd, "status")) {
    char path[PATH_MAX + 32];
    snprintf(path, sizeof(path), "%s/stdlib/tide/status.lua", td__home);
    td__statuscmd = 1;
    int has_addr = 0;
    /* --why REF_OR_TASK: status.lua explains that one thing instead. */
    for (int k = 2; k < argc; k++) {
      if (strcmp(argv[k], "--why")) continue;
      if (k + 1 >= argc) return td__usage_error("option %s needs a value", argv[k]);
      setenv("TIDE_STATUS_WHY", argv[k + 1], 1);
      for (int j = k; j + 2 <= argc; j++) argv[j] = argv[j + 2];
      argc -= 2;
      k--;
    }
    for (int k = 2; k < argc; k++) has_addr |= !strcmp(argv[k], "--address");
    if (!has_addr && !getenv("TIDE_ADDRESS")) setenv("TIDE_ADDRESS", "local", 1);
    return td__run(argc, argv, 2, path);
  }
  if (!strcmp(cmd, "serve")) {
    if (argc >= 3 && !strcmp(argv[2], "run")) {
      td__serving = 1;
      return td__run(argc, argv, 3, NULL);
    }
    if (argc >= 3 && !strcmp(argv[2], "status")) return td__serve_status(argc, argv);
    if (argc >= 3 && td__is_help(argv[2])) return td__help("serve");
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
    for (int k = 2; k < argc; k++)
      if (td__is_help(argv[k])) return td__help("bench");
    char path[PATH_MAX + 32];
    snprintf(path, sizeof(path), "%s/bench/bench.lua", td__home);
    return td__run(argc, argv, 2, path);
  }
  td__cmd = NULL;
  return td__usage_error("unknown command %s", cmd);
}
