/* The commands that ask a running node: tide submit and tide job (run by
 * stdlib/tide/jobcli.lua), tide list and tide logs (listcli.lua), tide
 * timeline (timelinecli.lua) and tide status (status.lua), each a driver
 * script attached to the node; and tide serve status, which asks a running
 * ingress over HTTP. Their arguments are checked here first, so that
 * --help and a mistake need no running node.
 */
#include <limits.h>
#include <netdb.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "cmd.h"

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
      return -1; /* SCRIPT: what follows is its arguments */
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
                                                       : "this option needs a number (0 or more), not %s",
                                 v);
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
  static const char *const kinds[] = {"nodes", "actors", "tasks", "objects", "placement-groups",
                                      "jobs",  NULL};
  static const char *const targets[] = {"worker", "actor", "task", "job", NULL};
  const char *const *ok = list ? kinds : targets;
  if (!pos[0])
    return td__usage_error("%s",
                           list ? "list needs a kind: nodes, actors, tasks, objects, placement-groups or jobs"
                                : "logs needs worker ID, actor ID, task ID or job ID");
  int found = 0;
  for (int i = 0; ok[i]; i++) found |= !strcmp(ok[i], pos[0]);
  if (!found)
    return td__usage_error(
        list ? "list: unknown kind %s (nodes, actors, tasks, objects, placement-groups or jobs)"
             : "logs: unknown target %s (worker, actor, task or job)",
        pos[0]);
  if (list && pos[1]) return td__usage_error("list: unexpected argument %s", pos[1]);
  if (!list && !pos[1]) return td__usage_error("logs %s needs an ID", pos[0]);
  return -1;
}

/* tide serve status: asks a running ingress for /-/status. */
int td__serve_status(int argc, char **argv) {
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

/* Runs stdlib/tide/SCRIPT attached to the node a client command asks:
 * --address (else TIDE_ADDRESS, else local), with --key. Returns the exit
 * status. */
static int td__client_run(int argc, char **argv, const char *script) {
  char path[PATH_MAX + 32];
  snprintf(path, sizeof(path), "%s/stdlib/tide/%s", td__cmd_home, script);
  for (int k = 2; k + 1 < argc; k++) {
    if (!strcmp(argv[k], "--address")) setenv("TIDE_ADDRESS", argv[k + 1], 1);
    if (!strcmp(argv[k], "--key")) td__key_arg = argv[k + 1];
  }
  if (!getenv("TIDE_ADDRESS")) setenv("TIDE_ADDRESS", "local", 1);
  char sock[PATH_MAX];
  int kind = td__resolve_address(getenv("TIDE_ADDRESS"), sock, sizeof(sock));
  if (kind < 0) return 2;
  if (kind == TD__ADDR_UNIX) setenv("TIDE_NODE_SOCKET", sock, 1);
  return td__run(argc, argv, 1, path);
}

/* tide submit, tide job: clients of the node. stdlib/tide/jobcli.lua does
 * the work, once the arguments are known to be right (a mistake needs no
 * node). */
int td__cmd_job(int argc, char **argv) {
  int rc = td__jobcli_args(argc, argv);
  if (rc >= 0) return rc;
  setenv("TIDE_EXE", td__exe, 1);
  return td__client_run(argc, argv, "jobcli.lua");
}

/* tide timeline: a client of the node: stdlib/tide/timelinecli.lua writes
 * the trace. --merge FILE... needs no node: an embedded one is started,
 * unused. */
int td__cmd_timeline(int argc, char **argv) {
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
  snprintf(path, sizeof(path), "%s/stdlib/tide/timelinecli.lua", td__cmd_home);
  return td__run(argc, argv, 2, path);
}

/* tide list, tide logs: clients of the head, like job:
 * stdlib/tide/listcli.lua. */
int td__cmd_list(int argc, char **argv) {
  int rc = td__listcli_args(argc, argv);
  if (rc >= 0) return rc;
  return td__client_run(argc, argv, "listcli.lua");
}

/* tide status: stdlib/tide/status.lua, with the flags of tide run. */
int td__cmd_status(int argc, char **argv) {
  char path[PATH_MAX + 32];
  snprintf(path, sizeof(path), "%s/stdlib/tide/status.lua", td__cmd_home);
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
