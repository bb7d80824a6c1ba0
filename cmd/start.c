/* tide start: the command that starts a node daemon. It reads and checks
 * the options (the resource flags with tide run's parser) on the terminal,
 * readies the session directory, then forks the daemon and waits for its
 * word that the node listens (or why it gave up) to report it; with
 * --block this process is the daemon. What the daemon does is daemon.c.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <lauxlib.h>
#include <netdb.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include "dplane.h"
#include "proto.h"
#include "cmd.h"

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
                   inet_ntop(AF_INET, &me.sin_addr, out, (socklen_t)n)
               ? 0
               : -1;
  if (fd >= 0) close(fd);
  freeaddrinfo(ai);
  return rc;
}

/* Reads the options of `tide start` (argv[2] on) into s; the resource
 * flags are kept in s->rest for td__parse_flags. Returns -1 to go on, or
 * an exit status. */
static int td__start_options(td__start_t *s, int argc, char **argv) {
  s->rest[s->nrest++] = argv[0];
  s->rest[s->nrest++] = "start";
  for (int i = 2; i < argc; i++) {
    const char *a = argv[i];
    if (td__is_help(a)) return td__help("start");
    if (!strcmp(a, "--head")) {
      s->head = 1;
      continue;
    }
    if (!strcmp(a, "--block")) {
      s->block = 1;
      continue;
    }
    int valued = !strcmp(a, "--port") || !strcmp(a, "--host") || !strcmp(a, "--address") ||
                 !strcmp(a, "--key") || !strcmp(a, "--name") || !strcmp(a, "--node-timeout") ||
                 !strcmp(a, "--join-timeout") || !strcmp(a, "--node-index") ||
                 !strcmp(a, "--dashboard-port") || !strcmp(a, "--dashboard-host") ||
                 !strcmp(a, "--data-plane");
    if (valued && i + 1 >= argc) return td__usage_error("option %s needs a value", a);
    if (!strcmp(a, "--port")) {
      char *end;
      long p = strtol(argv[++i], &end, 10);
      if (*end || end == argv[i] || p < 0 || p > 65535)
        return td__usage_error("--port needs a port number (0-65535), not %s", argv[i]);
      s->port = (int)p, s->port_given = 1;
    } else if (!strcmp(a, "--dashboard-port")) {
      char *end;
      const char *v = argv[++i];
      long p = strtol(v, &end, 10);
      if (!strcmp(v, "off")) s->dash_port = -1;
      else if (*end || end == v || p < 0 || p > 65535)
        return td__usage_error("--dashboard-port needs a port number (0-65535) or off, not %s", v);
      else s->dash_port = (int)p;
      s->dash_given = 1;
    } else if (!strcmp(a, "--dashboard-host")) s->dash_host = argv[++i];
    else if (!strcmp(a, "--host")) s->bind_host = argv[++i];
    else if (!strcmp(a, "--address")) s->join = argv[++i];
    else if (!strcmp(a, "--key")) td__key_arg = argv[++i];
    else if (!strcmp(a, "--name")) s->node_name = argv[++i];
    else if (!strcmp(a, "--node-index")) {
      char *end;
      unsigned long v = strtoul(argv[++i], &end, 10);
      if (*end || end == argv[i] || v < 1 || v > TD_NODE_MAX)
        return td__usage_error("--node-index needs an index in 1..4095, not %s", argv[i]);
      s->want_index = (uint32_t)v;
    } else if (!strcmp(a, "--node-timeout")) {
      char *end;
      s->node_timeout = strtod(argv[++i], &end);
      if (*end || !(s->node_timeout > 0))
        return td__usage_error("%s", "--node-timeout needs a positive number of seconds");
    } else if (!strcmp(a, "--data-plane")) {
      s->dp_mode = td_dp_mode_parse(argv[++i]);
      if (s->dp_mode < 0) return td__usage_error("--data-plane takes on, plain or off, not %s", argv[i]);
    } else if (!strcmp(a, "--join-timeout")) {
      char *end;
      s->join_timeout = strtod(argv[++i], &end);
      if (*end || end == argv[i] || !(s->join_timeout >= 0))
        return td__usage_error("%s", "--join-timeout needs a number of seconds (0: keep trying)");
    } else if (s->nrest < 62) s->rest[s->nrest++] = argv[i];
    else return td__usage_error("%s", "too many options");
  }
  return -1;
}

/* Checks the options together, and settles where the node listens (and
 * the head it joins, with the key). Returns -1 to go on, or an exit
 * status. */
static int td__start_check(td__start_t *s) {
  /* The resource flags are checked here, before the daemon forks, so a bad
   * one is a usage error on the terminal rather than a line in node.log. */
  {
    lua_State *T = luaL_newstate();
    int next = s->nrest;
    int rc = td__parse_flags(T, s->nrest, s->rest, 2, &next);
    lua_close(T);
    if (rc >= 0) return rc;
    if (next < s->nrest)
      return td__usage_error("start takes no SCRIPT or other arguments: %s", s->rest[next]);
  }
  if (!s->head && !s->join)
    return td__usage_error("%s", "start needs --head, or --address HOST:PORT to join a head");
  if (s->head && s->join) return td__usage_error("%s", "start takes --head or --address, not both");
  if (s->join) {
    int kind = td__resolve_address(s->join, s->join_ep, sizeof(s->join_ep));
    if (kind < 0) return 2;
    if (kind != TD__ADDR_TCP)
      return td__usage_error("--address %s: a node joins its head at HOST:PORT", s->join);
    if (td__load_key(&s->join_key)) return 1;
    if (!s->port_given) s->port = -1; /* a port of its own choosing, for other nodes */
    if (!s->bind_host)
      s->bind_host = td__addr_toward(s->join_ep, s->toward, sizeof(s->toward)) == 0 ? s->toward : "127.0.0.1";
  }
  /* A head listens on loopback unless told otherwise: the cluster key is
   * all that guards the port, so it is not opened to the network unasked. */
  s->loopback_only = !s->bind_host || !strncmp(s->bind_host, "127.", 4) || !strcmp(s->bind_host, "localhost");
  if (!s->bind_host) s->bind_host = "127.0.0.1";
  /* Collective groups across nodes (lua/coll_net.c): the node's workers
   * inherit where their streams listen and how they protect them. */
  setenv("TIDE_COLL_HOST",
         strcmp(s->bind_host, "0.0.0.0") && strcmp(s->bind_host, "::") ? s->bind_host
         : s->toward[0]                                                ? s->toward
                                                                       : "127.0.0.1",
         1);
  setenv("TIDE_COLL_PLAIN", s->dp_mode == TD_DP_PLAIN ? "1" : "0", 1);
  return -1;
}

/* Opens the session directory (made if need be), checks that no node runs
 * there, and names its files. Returns -1 to go on, or an exit status. */
static int td__start_session(td__start_t *s) {
  s->dfd = td__session_open(s->dir, sizeof(s->dir), 1);
  if (s->dfd < 0) return 1;
  int running = td__lock_holder_live(s->dfd);
  if (running) {
    fprintf(stderr, "tide: a node is already running here (pid %d); `tide stop` stops it\n", running);
    return 1;
  }
  /* No daemon holds the lock: a socket or pid file left here is a dead
   * one's (killed, or the machine crashed), never a sign of a live node. */
  unlinkat(s->dfd, "node.sock", 0);
  unlinkat(s->dfd, "node.pid", 0);
  snprintf(s->sock, sizeof(s->sock), "%s/node.sock", s->dir);
  snprintf(s->pidf, sizeof(s->pidf), "%s/node.pid", s->dir);
  snprintf(s->logf, sizeof(s->logf), "%s/node.log", s->dir);
  snprintf(s->keyf, sizeof(s->keyf), "%s/cluster.key", s->dir);
  return -1;
}

/* In `tide start`, once the daemon (pid) is forked: waits for its word on
 * the pipe ready and says how to use the node, or why it did not start.
 * Returns the exit status. */
static int td__start_report(const td__start_t *s, pid_t pid, int ready[2]) {
  close(ready[1]);
  char why[600];
  /* A head may wait 10 s for its port (see below); a joining node
   * --join-timeout for its head, then reports why it gave up. */
  int up = td__wait_ready(ready[0], pid, s->join ? (s->join_timeout > 0 ? s->join_timeout + 15 : 15) : 30,
                          why, sizeof(why));
  close(ready[0]);
  if (up == 1) {
    printf("tide: node started (pid %d), session %s\n", (int)pid, s->dir);
    if (s->join) printf("tide: joined the head at %s\n", s->join);
    printf(
        "attach with:\n  bin/tide run --address local SCRIPT.lua\n  bin/tide repl --address local\n"
        "  bin/tide status\n");
    if (s->port > 0 && s->head && s->loopback_only) {
      printf(
          "join a node on this machine (a session directory of its own):\n"
          "  TIDE_SESSION_DIR=/tmp/tide-node1 bin/tide start --address %s:%d --key %s\n",
          s->bind_host, s->port, s->keyf);
      printf(
          "other machines cannot reach it: it listens on %s only (start it with --host ADDR, or "
          "--host 0.0.0.0 for every interface, to let them join)\n",
          s->bind_host);
    } else if (s->port > 0) {
      const char *h =
          s->head && strcmp(s->bind_host, "0.0.0.0") && strcmp(s->bind_host, "::") ? s->bind_host : "HOST";
      printf(
          "from another machine (copy the key, mode 0600):\n"
          "  bin/tide start --address %s:%d --key cluster.key     # join as a node\n"
          "  bin/tide run --address %s:%d --key cluster.key SCRIPT.lua\n",
          h, s->port, h, s->port);
    }
    printf("stop with:\n  bin/tide stop\n");
    return 0;
  }
  if (up < 0 && s->join && td__alive(pid)) {
    fprintf(stderr,
            "tide: no answer from the head at %s yet; the node keeps trying (--join-timeout 0; see %s; "
            "`tide stop` stops it)\n",
            s->join, s->logf);
    return 1;
  }
  /* A daemon that gave up cleans up and exits: nothing is left behind. */
  int st;
  for (int i = 0; i < 100 && waitpid(pid, &st, WNOHANG) == 0; i++) usleep(50000);
  if (td__alive(pid)) kill(pid, SIGKILL), waitpid(pid, &st, 0);
  if (why[0]) fprintf(stderr, "tide: %s\n", why);
  else fprintf(stderr, "tide: the node did not start; see %s\n", s->logf);
  return 1;
}

/* Forks the daemon. In `tide start`, returns its exit status once the
 * daemon has said how it went; in the daemon, leaves the terminal (output
 * to node.log) and returns -1 to go on. */
static int td__daemonize(td__start_t *s) {
  int ready[2];
  if (pipe2(ready, O_CLOEXEC) != 0) {
    fprintf(stderr, "tide: pipe: %s\n", strerror(errno));
    return 1;
  }
  pid_t pid = fork();
  if (pid < 0) return 1;
  if (pid > 0) return td__start_report(s, pid, ready);
  close(ready[0]);
  td__ready_fd = ready[1];
  setsid();
  int lf = openat(s->dfd, "node.log", O_WRONLY | O_CREAT | O_APPEND | O_NOFOLLOW | O_CLOEXEC, 0600);
  if (lf >= 0) {
    dup2(lf, 1);
    dup2(lf, 2);
    close(lf);
  }
  int nf = open("/dev/null", O_RDONLY);
  if (nf >= 0) {
    dup2(nf, 0);
    close(nf);
  }
  return -1;
}

/* tide start: the options, checked on the terminal; the session; then the
 * daemon, forked (or, with --block, this process). */
int td__start(int argc, char **argv) {
  td__start_t s = {.port = 6380,
                   .dash_port = 8265,
                   .dash_host = "127.0.0.1",
                   .join_timeout = 15,
                   .dp_mode = TD_DP_ON,
                   .link_fd = -1};
  int rc = td__start_options(&s, argc, argv);
  if (rc < 0) rc = td__start_check(&s);
  if (rc < 0) rc = td__start_session(&s);
  if (rc < 0 && !s.block) rc = td__daemonize(&s);
  return rc >= 0 ? rc : td__daemon(&s);
}
