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
#include <errno.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <netdb.h>
#include <sys/socket.h>
#include <zmq.h>

#include "bridge.h"
#include "persist.h"
#include "core.h"

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
  "  tide stop | tide status [--address A]\n"
  "                         stop it; print its nodes, resources, workers, actors, tasks, objects\n"
  "  tide submit [--address A --key F] [--working-dir D] SCRIPT [ARGS...]\n"
  "  tide job list | status ID | logs ID [--follow] | stop ID\n"
  "                         run a driver script as a job on the running node\n"
  "  tide run --address local SCRIPT / tide repl --address local\n"
  "                         attach a driver or a REPL to the running node\n"
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
static int td__load_key(td_cluster_key_t *key);

/* Parses option flags from argv[first]; sets registry tide.cli_opts.
 * Returns -1 to go on (with *next at the first non-option), or an exit code. */
static int td__parse_flags(lua_State *L, int argc, char **argv, int first, int *next) {
  lua_newtable(L);
  int i = first;
  for (; i < argc; i++) {
    const char *a = argv[i];
    if (a[0] != '-' || !strcmp(a, "-")) break;
    if (!strcmp(a, "--")) { i++; break; }
    const char *key = NULL;
    if (!strcmp(a, "--num-cpus")) key = "num_cpus";
    else if (!strcmp(a, "--num-gpus")) key = "num_gpus";
    else if (!strcmp(a, "--resources")) key = "resources_json";
    else if (!strcmp(a, "--object-store-memory")) key = "object_store_memory";
    else if (!strcmp(a, "--address")) key = "address";
    else if (!strcmp(a, "--key") && i + 1 < argc) { td__key_arg = argv[++i]; continue; }
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
      if (td_bridge_client_start(path, &key, &fd) || td_client_connect_fd(fd, addr, err, sizeof(err))) {
        fprintf(stderr, "tide: %s\n", err[0] ? err : "cannot reach the node");
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
 * with --address (the socket path, or "local" for this user's session). */

static void td__session_dir(char *out, size_t n) {
  const char *d = getenv("TIDE_SESSION_DIR");
  if (d) snprintf(out, n, "%s", d);
  else snprintf(out, n, "/tmp/tide-%d", (int)getuid());
}

/* Resolves --address: a Unix socket path (returns 0) or, for HOST:PORT, a
 * ZeroMQ endpoint (returns 1); -1 after printing why not. */
static int td__resolve_address(const char *a, char *out, size_t n) {
  if (!strcmp(a, "local") || !strcmp(a, "auto") || !*a) {
    char dir[PATH_MAX - 16];
    td__session_dir(dir, sizeof(dir));
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
  fprintf(stderr, "tide: address %s: give HOST:PORT, local, or a node.sock path\n", a);
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

static int td__read_pid(const char *dir) {
  char path[PATH_MAX + 16];
  snprintf(path, sizeof(path), "%s/node.pid", dir);
  FILE *f = fopen(path, "r");
  int pid = 0;
  if (f) {
    if (fscanf(f, "%d", &pid) != 1) pid = 0;
    fclose(f);
  }
  return pid > 0 && td__alive(pid) ? pid : 0;
}

/* Resolves the cluster key for TCP: --key, TIDE_KEY_FILE, or this user's
 * default session (where `tide start --head` wrote it). Prints why not. */
static int td__load_key(td_cluster_key_t *key) {
  char keyf[PATH_MAX + 16];
  const char *kf = td__key_arg ? td__key_arg : getenv("TIDE_KEY_FILE");
  if (!kf) {
    char dir[PATH_MAX - 16];
    td__session_dir(dir, sizeof(dir));
    snprintf(keyf, sizeof(keyf), "%s/cluster.key", dir);
    kf = keyf;
  }
  if (td_key_load(kf, key)) {
    fprintf(stderr, "tide: no cluster key at %s (pass --key FILE or set TIDE_KEY_FILE)\n", kf);
    return -1;
  }
  return 0;
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

/* Links to other nodes, over the bridge (td_node_set_peering). */
static void *td__peer_open(void *ud, const char *ep, int *fd) { return td_bridge_open(ep, ud, fd); }
static void td__peer_close(void *ud, void *h) {
  (void)ud;
  td_bridge_close(h, 0);
}

static int td__start(int argc, char **argv) {
  int head = 0, block = 0, port = 6380, port_given = 0;
  const char *join = NULL, *node_name = NULL;
  double node_timeout = 0;
  const char *bind_host = "0.0.0.0";
  char dir[PATH_MAX], sock[PATH_MAX + 16], pidf[PATH_MAX + 16], logf[PATH_MAX + 16];
  char keyf[PATH_MAX + 16];
  td__session_dir(dir, sizeof(dir));
  /* Resource flags are parsed by the same code as tide run. */
  char *rest[64];
  int nrest = 0;
  rest[nrest++] = argv[0];
  rest[nrest++] = "start";
  for (int i = 2; i < argc && nrest < 62; i++) {
    if (!strcmp(argv[i], "--head")) head = 1;
    else if (!strcmp(argv[i], "--block")) block = 1;
    else if (!strcmp(argv[i], "--port") && i + 1 < argc) port = atoi(argv[++i]), port_given = 1;
    else if (!strcmp(argv[i], "--host") && i + 1 < argc) bind_host = argv[++i];
    else if (!strcmp(argv[i], "--address") && i + 1 < argc) join = argv[++i];
    else if (!strcmp(argv[i], "--key") && i + 1 < argc) td__key_arg = argv[++i];
    else if (!strcmp(argv[i], "--name") && i + 1 < argc) node_name = argv[++i];
    else if (!strcmp(argv[i], "--node-timeout") && i + 1 < argc) {
      char *end;
      node_timeout = strtod(argv[++i], &end);
      if (*end || !(node_timeout > 0)) return td__usage_error("%s", "--node-timeout needs a positive number of seconds");
    }
    else rest[nrest++] = argv[i];
  }
  if (!head && !join) return td__usage_error("%s", "start needs --head, or --address HOST:PORT to join a head");
  if (head && join) return td__usage_error("%s", "start takes --head or --address, not both");
  char join_ep[PATH_MAX];
  td_cluster_key_t join_key;
  if (join) {
    if (td__resolve_address(join, join_ep, sizeof(join_ep)) != 1)
      return td__usage_error("--address %s: a node joins its head at HOST:PORT", join);
    if (td__load_key(&join_key)) return 1;
    if (!port_given) port = -1;  /* a port of its own choosing, for other nodes */
  }
  if (mkdir(dir, 0700) != 0 && errno != EEXIST) {
    fprintf(stderr, "tide: cannot create %s: %s\n", dir, strerror(errno));
    return 1;
  }
  chmod(dir, 0700);
  int running = td__read_pid(dir);
  if (running) {
    fprintf(stderr, "tide: a node is already running here (pid %d); `tide stop` stops it\n", running);
    return 1;
  }
  snprintf(sock, sizeof(sock), "%s/node.sock", dir);
  snprintf(pidf, sizeof(pidf), "%s/node.pid", dir);
  snprintf(logf, sizeof(logf), "%s/node.log", dir);
  snprintf(keyf, sizeof(keyf), "%s/cluster.key", dir);
  if (!block) {
    pid_t pid = fork();
    if (pid < 0) return 1;
    if (pid > 0) {
      for (int i = 0; i < (join ? 300 : 100); i++) {
        struct stat st;
        if (stat(sock, &st) == 0) {
          printf("tide: node started (pid %d), session %s\n", (int)pid, dir);
          if (join) printf("tide: joined the head at %s\n", join);
          printf("attach with:\n  bin/tide run --address local SCRIPT.lua\n  bin/tide repl --address local\n"
                 "  bin/tide status\n");
          if (port > 0)
            printf("from another machine (copy the key, mode 0600):\n"
                   "  bin/tide run --address HOST:%d --key %s SCRIPT.lua\n", port, keyf);
          printf("stop with:\n  bin/tide stop\n");
          return 0;
        }
        int st2;
        if (waitpid(pid, &st2, WNOHANG) == pid) break;
        usleep(50000);
      }
      if (join && kill(pid, 0) == 0) {
        fprintf(stderr, "tide: no answer from the head at %s yet; the node keeps trying (see %s; "
                        "`tide stop` stops it)\n", join, logf);
        return 1;
      }
      fprintf(stderr, "tide: the node did not start; see %s\n", logf);
      return 1;
    }
    setsid();
    int lf = open(logf, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0600);
    if (lf >= 0) { dup2(lf, 1); dup2(lf, 2); close(lf); }
    int nf = open("/dev/null", O_RDONLY);
    if (nf >= 0) { dup2(nf, 0); close(nf); }
  }
  FILE *f = fopen(pidf, "w");
  if (f) { fprintf(f, "%d\n", (int)getpid()); fclose(f); }
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
    while (td__join_once(join_ep, &join_key, 0, &node_index, &link_fd)) {
      if (td__stop_daemon) { unlink(pidf); return 0; }
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
  if (port != 0) {
    td_cluster_key_t key;
    if (join ? td_key_save(keyf, &join_key) : td_key_load(keyf, &key) && td_key_create(keyf, &key)) {
      fprintf(stderr, "tide: cannot write the cluster key %s\n", keyf);
    } else {
      char ep[300];
      if (join) key = join_key;
      if (port > 0) snprintf(ep, sizeof(ep), "tcp://%s:%d", bind_host, port);
      else snprintf(ep, sizeof(ep), "tcp://%s:*", bind_host);
      /* A killed predecessor may hold the port for a moment while its
       * last threads exit: try for a while before giving up. */
      int up = -1;
      for (int i = 0; i < 100 && (up = td_bridge_server_start(ep, sock, &key)) != 0 && !td__stop_daemon; i++)
        usleep(100000);
      if (up == 0 && join) {
        /* Other nodes fetch objects from this one there. */
        td_node_set_peering(td_ctx.node, td_bridge_server_port(), td__peer_open, td__peer_close, &join_key);
        printf("tide: listening for other nodes on %s port %d (CURVE)\n", bind_host, td_bridge_server_port());
      } else if (up == 0)
        printf("tide: listening on %s (CURVE; key %s)\n", ep, keyf);
      else
        fprintf(stderr, "tide: TCP disabled: cannot listen on %s: %s\n", ep, zmq_strerror(errno));
    }
  }
  setenv("TIDE_SESSION_DIR", dir, 1);
  td_node_restore(td_ctx.node);
  td_core_enable_jobs(td__home);
  signal(SIGTERM, td__on_term);
  signal(SIGINT, td__on_term);
  signal(SIGHUP, SIG_IGN);
  signal(SIGPIPE, SIG_IGN);
  td_node_watch_fd(td_ctx.node, td__listen_fd, td__on_accept, NULL, NULL);
  if (link_fd >= 0) td_node_link_head(td_ctx.node, link_fd);
  printf("tide: node listening on %s\n", sock);
  fflush(stdout);
  double retry_at = 0;
  while (!td__stop_daemon) {
    td_core_flush_refs();
    td_node_pump(td_ctx.node, 0.5);
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
  td_bridge_server_stop();
  td_node_destroy(&td_ctx.node);
  td_bridge_client_stop();  /* after the link is closed */
  if (td_persist_on()) {
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
  return 0;
}

static int td__stop(void) {
  char dir[PATH_MAX];
  td__session_dir(dir, sizeof(dir));
  int pid = td__read_pid(dir);
  if (!pid) {
    fprintf(stderr, "tide: no node is running in %s\n", dir);
    return 1;
  }
  kill(pid, SIGTERM);
  for (int i = 0; i < 100 && td__alive(pid); i++) usleep(50000);
  if (td__alive(pid)) kill(pid, SIGKILL);
  printf("tide: stopped the node (pid %d)\n", pid);
  return 0;
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
  if (!strcmp(cmd, "start")) return td__start(argc, argv);
  if (!strcmp(cmd, "submit") || !strcmp(cmd, "job")) {
    /* Clients of the node: stdlib/tide/jobcli.lua does the work. */
    char path[PATH_MAX + 32];
    snprintf(path, sizeof(path), "%s/stdlib/tide/jobcli.lua", td__home);
    for (int k = 2; k + 1 < argc; k++) {
      if (!strcmp(argv[k], "--address")) setenv("TIDE_ADDRESS", argv[k + 1], 1);
      if (!strcmp(argv[k], "--key")) td__key_arg = argv[k + 1];
    }
    if (!getenv("TIDE_ADDRESS")) setenv("TIDE_ADDRESS", "local", 1);
    char sock[PATH_MAX];
    if (td__resolve_address(getenv("TIDE_ADDRESS") ? getenv("TIDE_ADDRESS") : "local", sock, sizeof(sock)) == 0)
      setenv("TIDE_NODE_SOCKET", sock, 1);
    setenv("TIDE_EXE", td__exe, 1);
    return td__run(argc, argv, 1, path);
  }
  if (!strcmp(cmd, "stop")) return td__stop();
  if (!strcmp(cmd, "status")) {
    char path[PATH_MAX + 32];
    snprintf(path, sizeof(path), "%s/stdlib/tide/status.lua", td__home);
    td__statuscmd = 1;
    int has_addr = 0;
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
