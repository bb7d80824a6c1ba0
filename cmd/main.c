/* tide: the command-line entry point. main finds the command in
 * td__commands (its name, its handler, its help) and runs it; the small
 * commands are here. `tide run` and the commands written in Lua run a
 * driver script (run.c); client.c has the commands that ask a running
 * node, start.c and daemon.c `tide start` and its node daemon, session.c
 * the session directory and `tide stop`. `tide __worker` is how workers
 * start. Uses core (bindings), node, worker.
 */
#include <luajit.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "core.h"
#include "cmd.h"

const char *td__key_arg; /* --key FILE */
char td__cmd_home[PATH_MAX];
char td__exe[PATH_MAX];
/* The command being run, for the hint of a usage error. */
const char *td__cmd;

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

/* -- The small commands ------------------------------------------------------------ */

static int td__cmd_run(int argc, char **argv) { return td__run(argc, argv, 2, NULL); }

static int td__cmd_serve(int argc, char **argv) {
  if (argc >= 3 && !strcmp(argv[2], "run")) {
    td__serving = 1;
    return td__run(argc, argv, 3, NULL);
  }
  if (argc >= 3 && !strcmp(argv[2], "status")) return td__serve_status(argc, argv);
  if (argc >= 3 && td__is_help(argv[2])) return td__help("serve");
  return td__usage_error("%s", "serve needs 'run' or 'status'");
}

static int td__cmd_repl(int argc, char **argv) {
  td__repl = 1;
  char path[PATH_MAX + 32];
  snprintf(path, sizeof(path), "%s/stdlib/tide/repl.lua", td__cmd_home);
  /* Flags are parsed by td__run as for `tide run`. */
  return td__run(argc, argv, 2, path);
}

static int td__cmd_bench(int argc, char **argv) {
  for (int k = 2; k < argc; k++)
    if (td__is_help(argv[k])) return td__help("bench");
  char path[PATH_MAX + 32];
  snprintf(path, sizeof(path), "%s/bench/bench.lua", td__cmd_home);
  return td__run(argc, argv, 2, path);
}

static int td__cmd_stop(int argc, char **argv) {
  int all = 0;
  for (int k = 2; k < argc; k++) {
    if (td__is_help(argv[k])) return td__help("stop");
    if (!strcmp(argv[k], "--all")) all = 1;
    else
      return td__usage_error(argv[k][0] == '-' ? "unknown option %s" : "stop takes no arguments: %s",
                             argv[k]);
  }
  return all ? td__stop_all() : td__stop();
}

/* -- The commands ------------------------------------------------------------------ */

/* Each command: its name, its handler (argv[1] is the name), and its own
 * help, printed by `tide CMD --help` (or `tide help CMD`) on stdout. A
 * usage error prints one line and points there, instead of the whole usage
 * above. */
static const struct td__command {
  const char *name;
  int (*run)(int argc, char **argv);
  const char *help;
} td__commands[] = {
    {"run", td__cmd_run,
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
    {"serve", td__cmd_serve,
     "usage: tide serve run [--host H] [--port P] [run options] APP.lua [ARGS...]\n"
     "       tide serve status [--host H] [--port P]\n"
     "\n"
     "serve run: runs APP.lua, which declares deployments (serve.run), and serves\n"
     "them over HTTP on H:P (default 127.0.0.1:8000) until Ctrl-C. It takes the\n"
     "options of `tide run` too (see `tide run --help`). With --address it attaches\n"
     "to that node, whose daemon then runs the ingress (a head's dashboard and\n"
     "/metrics show it) until this process ends.\n"
     "serve status: prints the deployments of a running `tide serve run`.\n"},
    {"start", td__start,
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
     "  --host H              interface to listen on (default 127.0.0.1: this machine only)\n"
     "  --name N              this node's name\n"
     "  --node-timeout S      seconds of silence before a node counts as dead (default 5)\n"
     "  --data-plane MODE     how object bytes cross between nodes: on (direct TCP streams,\n"
     "                        AES-128-OCB; the default), plain (authenticated, not encrypted:\n"
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
    {"list", td__cmd_list,
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
    {"logs", td__cmd_list,
     "usage: tide logs worker|actor|task|job ID [--follow] [--tail N] [--address A] [--key FILE]\n"
     "\n"
     "Prints the output kept for a worker process (its stdout, stderr and its\n"
     "tasks' prints, in the session's logs/, rotated by size); for an actor or a\n"
     "task, only what it printed (its slice of its worker's log; an ended task by\n"
     "its task_id); or a job's. --follow keeps printing as it grows; --tail N\n"
     "starts at the last N lines. On a head, a worker on another node is read\n"
     "there (through a task placed on that node).\n"},
    {"stop", td__cmd_stop,
     "usage: tide stop [--all]\n"
     "\n"
     "Stops the node daemon of the session directory ($TIDE_SESSION_DIR or\n"
     "/tmp/tide-UID): SIGTERM, then SIGKILL after 5 s.\n"
     "\n"
     "  --all       stop every node daemon (`tide start`) this user runs on this\n"
     "              machine, whatever its session directory\n"
     "  -h, --help  print this help\n"},
    {"status", td__cmd_status,
     "usage: tide status [--address A] [--key FILE] [--why REF_OR_TASK]\n"
     "\n"
     "Prints the running node's resources (used / total), workers, actors, tasks,\n"
     "objects and store use; on a head, every node of the cluster. A is local\n"
     "(the default), a node.sock path, or HOST:PORT with the cluster key.\n"
     "--why ID: why an object (the 16 hex digits of an ObjectRef) or a task (its\n"
     "task_id) is not ready: what makes it, and where that task is.\n"},
    {"timeline", td__cmd_timeline,
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
    {"submit", td__cmd_job,
     "usage: tide submit [--address A] [--key FILE] [--working-dir D] SCRIPT [ARGS...]\n"
     "\n"
     "Runs SCRIPT as a job, a driver kept by the running node (default: local),\n"
     "and prints its id. --working-dir D ships the directory D to the node; the\n"
     "job runs in it and SCRIPT is found in it. See `tide job --help`.\n"},
    {"job", td__cmd_job,
     "usage: tide job list | status ID | logs ID [--follow] | stop ID\n"
     "                [--address A] [--key FILE]\n"
     "\n"
     "  list          every job of the node, with its status and exit code\n"
     "  status ID     one job: RUNNING, SUCCEEDED, FAILED or STOPPED\n"
     "  logs ID       its output so far (--follow: until it ends)\n"
     "  stop ID       stop it (SIGTERM to its driver), then print its status\n"},
    {"repl", td__cmd_repl,
     "usage: tide repl [run options]\n"
     "\n"
     "Interactive Lua with tide loaded, on an embedded cluster, or attached to a\n"
     "node with --address (see `tide run --help` for the options). :help at the\n"
     "prompt lists its commands.\n"},
    {"bench", td__cmd_bench,
     "usage: tide bench [NAME...] [--json]\n"
     "\n"
     "Runs the benchmarks (Ray's metric names) as JSON lines, each beside a\n"
     "machine limit measured in the same run; NAME keeps the metrics that start\n"
     "with it. TIDE_BENCH_SCALE scales the iteration counts.\n"},
};

int td__is_help(const char *a) { return !strcmp(a, "--help") || !strcmp(a, "-h"); }

/* Prints the help of cmd (the whole usage for NULL or an unknown one). */
int td__help(const char *cmd) {
  for (size_t i = 0; cmd && i < sizeof(td__commands) / sizeof(td__commands[0]); i++)
    if (!strcmp(td__commands[i].name, cmd)) {
      fputs(td__commands[i].help, stdout);
      return 0;
    }
  if (cmd) {
    td__cmd = NULL;
    return td__usage_error("help: no command %s", cmd);
  }
  fputs(td__usage, stdout);
  return 0;
}

int td__usage_error(const char *fmt, const char *arg) {
  fprintf(stderr, "tide: ");
  fprintf(stderr, fmt, arg);
  if (td__cmd) fprintf(stderr, "\nsee 'tide %s --help'\n", td__cmd);
  else fprintf(stderr, "\nsee 'tide --help'\n");
  return 2;
}

int main(int argc, char **argv) {
  if (argc >= 2 && !strcmp(argv[1], "__worker")) return td_worker_main(argc, argv);
  ssize_t n = readlink("/proc/self/exe", td__exe, sizeof(td__exe) - 1);
  if (n <= 0) return 1;
  td__exe[n] = 0;
  /* TIDE_HOME is the checkout: bin/tide lives in $TIDE_HOME/bin. */
  const char *home = getenv("TIDE_HOME");
  if (home) {
    snprintf(td__cmd_home, sizeof(td__cmd_home), "%s", home);
  } else {
    snprintf(td__cmd_home, sizeof(td__cmd_home), "%s", td__exe);
    for (int k = 0; k < 2; k++) {
      char *s = strrchr(td__cmd_home, '/');
      if (s) *s = 0;
    }
  }
  setenv("TIDE_HOME", td__cmd_home, 1);
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
  for (size_t i = 0; i < sizeof(td__commands) / sizeof(td__commands[0]); i++)
    if (!strcmp(td__commands[i].name, cmd)) return td__commands[i].run(argc, argv);
  td__cmd = NULL;
  return td__usage_error("unknown command %s", cmd);
}
