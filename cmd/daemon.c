/* The node daemon that `tide start` forks (with --block, `tide start`
 * itself): it holds the session's lock, starts the node through tide's Lua
 * path, joins its head, listens on the session's socket, on TCP through
 * the CURVE bridge, for the data plane and the dashboard, tells `tide
 * start` it is up, and pumps the node until SIGTERM; then it shuts down
 * and cleans up. Its steps share the td__start_t that start.c filled.
 */
#include <errno.h>
#include <fcntl.h>
#include <lauxlib.h>
#include <limits.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include "bridge.h"
#include "dplane.h"
#include "introspect.h"
#include "obs.h"
#include "persist.h"
#include "core.h"
#include "cmd.h"

static volatile sig_atomic_t td__stop_daemon;
static void td__on_term(int sig) {
  (void)sig;
  td__stop_daemon = 1;
}
static int td__listen_fd = -1;

static void td__on_accept(void *ud) {
  (void)ud;
  int fd = accept4(td__listen_fd, NULL, NULL, SOCK_CLOEXEC);
  if (fd >= 0) td_node_add_client(td_ctx.node, fd);
}

/* How long a head has to answer a JOIN. */
#define TD__JOIN_WAIT_S 3.0

/* A join that failed with rc: the link is closed, and the log says why. */
static void td__join_failed(const char *ep, int fd, int rc) {
  close(fd);
  td_bridge_client_drop(); /* a JOIN nobody answered need not be delivered */
  fprintf(stderr, "tide: cannot join the head at %s: %s; retrying\n", ep, td_strerror(rc));
  fflush(stderr);
}

/* One try at joining the head: connect over CURVE and get an index.
 * Returns 0 with *fd the link, or -1. */
static int td__join_once(const char *ep, const td_cluster_key_t *key, uint32_t want, uint32_t *index,
                         int *fd) {
  if (td_bridge_client_start(ep, key, fd)) return -1;
  int rc = td_link_handshake(*fd, want, index, TD__JOIN_WAIT_S);
  if (rc == 0) return 0;
  td__join_failed(ep, *fd, rc);
  return -1;
}

/* The write end of a pipe to the `tide start` that forked this daemon: it
 * reports success only once the node listens everywhere it should, and a
 * failure with its reason ("+" or "-REASON", then the pipe closes; a
 * daemon that dies first just closes it). */
int td__ready_fd = -1;
static void td__ready(const char *why_not) {
  if (td__ready_fd < 0) return;
  char msg[600];
  int n = snprintf(msg, sizeof(msg), "%s%s", why_not ? "-" : "+", why_not ? why_not : "");
  ssize_t w = write(td__ready_fd, msg, (size_t)n < sizeof(msg) ? (size_t)n : sizeof(msg) - 1);
  (void)w;
  close(td__ready_fd);
  td__ready_fd = -1;
}

/* Links to other nodes, over the bridge (td_node_set_peering). */
static void *td__peer_open(void *ud, const char *ep, int *fd) { return td_bridge_open(ep, ud, fd); }
static void td__peer_close(void *ud, void *h) {
  (void)ud;
  td_bridge_close(h, 0);
}

/* Takes the session's lock, writes node.pid, and keeps each worker's
 * output in the session's logs/. Returns -1 to go on, or an exit status. */
static int td__daemon_lock(td__start_t *s) {
  /* The lock is this process's (record locks are not inherited): taken
   * here, in the daemon, and held until it exits. */
  if (td__lock_take(s->dfd) < 0) {
    char msg[PATH_MAX + 100];
    snprintf(msg, sizeof(msg), "a node is already running in %s (pid %d); `tide stop` stops it", s->dir,
             td__lock_holder(s->dfd));
    fprintf(stderr, "tide: %s\n", msg);
    td__ready(msg);
    return 1;
  }
  int pf = openat(s->dfd, "node.pid", O_WRONLY | O_CREAT | O_TRUNC | O_NOFOLLOW | O_CLOEXEC, 0600);
  if (pf >= 0) {
    char pb[32];
    int pl = snprintf(pb, sizeof(pb), "%d\n", (int)getpid());
    if (write(pf, pb, (size_t)pl) != pl) fprintf(stderr, "tide: cannot write %s\n", s->pidf);
    close(pf);
  }
  /* Each worker's output is kept in the session's logs/ (tide logs). */
  if (td_obs_set_logdir(s->dir))
    fprintf(stderr, "tide: cannot make %s/logs; worker output goes to node.log\n", s->dir);
  return -1;
}

/* The node's Lua state, with the resource flags, and the signals that stop
 * the daemon. Returns -1 to go on, or an exit status. */
static int td__daemon_lua(td__start_t *s) {
  /* Start the node through the same Lua path as tide run, without a script. */
  lua_State *L = s->L = luaL_newstate();
  td_ctx.is_driver = 1;
  td_ser_init(&td_ctx.ser);
  td__open(L);
  int rc = td__parse_flags(L, s->nrest, s->rest, 2, NULL);
  if (rc >= 0) {
    unlink(s->pidf);
    return rc;
  }
  signal(SIGTERM, td__on_term);
  signal(SIGINT, td__on_term);
  signal(SIGPIPE, SIG_IGN);
  return -1;
}

/* Joining: the head gives this node its index first, as every id made
 * here carries it. Returns -1 to go on, or an exit status. */
static int td__daemon_join(td__start_t *s) {
  if (!s->join) return -1;
  /* A first join that does not succeed in --join-timeout seconds (a wrong
   * key, no head there) ends this daemon with the reason, rather than
   * leaving it retrying forever; 0 keeps trying. A node that has joined
   * retries for ever when it loses its head (below). */
  double give_up = s->join_timeout > 0 ? td_now() + s->join_timeout : 0;
  while (td__join_once(s->join_ep, &s->join_key, s->want_index, &s->node_index, &s->link_fd)) {
    if (td__stop_daemon) {
      unlink(s->pidf);
      return 0;
    }
    if (give_up && td_now() >= give_up) {
      char why[PATH_MAX + 256], msg[PATH_MAX + 512];
      td__why_no_answer(s->join_ep, why, sizeof(why));
      snprintf(msg, sizeof(msg),
               "cannot join the head at %s: %s (gave up after %g s; --join-timeout 0 keeps trying)", s->join,
               why, s->join_timeout);
      fprintf(stderr, "tide: %s\n", msg);
      td__ready(msg);
      unlink(s->pidf);
      return 1;
    }
    sleep(1);
  }
  char nid[32];
  snprintf(nid, sizeof(nid), "node-%u", s->node_index);
  setenv("TIDE_NODE_ID", nid, 1); /* workers' runtime context */
  printf("tide: joined the head at %s as %s\n", s->join, nid);
  fflush(stdout);
  return -1;
}

/* Starts the node (require "tide"; tide._start) with this node's options;
 * a head resumes its tables from head.db. Returns -1 to go on, or an exit
 * status. */
static int td__daemon_node(td__start_t *s) {
  lua_State *L = s->L;
  /* A head keeps its tables in the session's head.db: restarted, it
   * resumes them. */
  snprintf(s->dbf, sizeof(s->dbf), "%s/head.db", s->dir);
  s->had_db = access(s->dbf, F_OK) == 0;
  if (s->head && td_persist_open(s->dbf) == 0) printf("tide: head state in %s\n", s->dbf);
  lua_getfield(L, LUA_REGISTRYINDEX, "tide.cli_opts");
  lua_pushinteger(L, (lua_Integer)s->node_index);
  lua_setfield(L, -2, "node_index");
  if (s->node_timeout > 0) {
    lua_pushnumber(L, s->node_timeout);
    lua_setfield(L, -2, "node_timeout");
  }
  if (s->node_name) {
    lua_pushstring(L, s->node_name);
    lua_setfield(L, -2, "node_name");
  }
  lua_pop(L, 1);
  lua_getglobal(L, "require");
  lua_pushliteral(L, "tide");
  if (lua_pcall(L, 1, 1, 0) != 0 || (lua_getfield(L, -1, "_start"), lua_pcall(L, 0, 0, 0)) != 0) {
    fprintf(stderr, "tide: %s\n", lua_tostring(L, -1));
    unlink(s->pidf);
    return 2;
  }
  /* This process pumps the node itself. */
  td_core_bg_stop();
  return -1;
}

/* Listens on the session's socket, node.sock (mode 0600), where drivers
 * and this user's commands attach. Returns -1 to go on, or an exit
 * status. */
static int td__daemon_listen(td__start_t *s) {
  unlink(s->sock);
  struct sockaddr_un sa;
  memset(&sa, 0, sizeof(sa));
  sa.sun_family = AF_UNIX;
  if (strlen(s->sock) >= sizeof(sa.sun_path)) {
    fprintf(stderr, "tide: session path too long for a socket: %s\n", s->sock);
    return 1;
  }
  memcpy(sa.sun_path, s->sock, strlen(s->sock) + 1);
  td__listen_fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (td__listen_fd < 0 || bind(td__listen_fd, (struct sockaddr *)&sa, sizeof(sa)) != 0 ||
      listen(td__listen_fd, 64) != 0) {
    fprintf(stderr, "tide: cannot listen on %s: %s\n", s->sock, strerror(errno));
    unlink(s->pidf);
    return 1;
  }
  chmod(s->sock, 0600);
  return -1;
}

/* Bulk bytes between nodes go over direct streams (dplane.c), keyed from
 * the cluster key. */
static void td__daemon_dplane(td__start_t *s, const td_cluster_key_t *key) {
  char kt[128], hh[256] = "";
  snprintf(kt, sizeof(kt), "%s%s", key->client_secret, key->server_public);
  if (s->join) {
    const char *h = s->join_ep + 6, *c = strrchr(h, ':');
    if (*h == '[') h++;
    size_t hl = c && c > h ? (size_t)(c - h) : 0;
    if (hl && h[hl - 1] == ']') hl--;
    snprintf(hh, sizeof(hh), "%.*s", (int)hl, h);
  }
  if (td_node_set_dplane(td_ctx.node, s->dp_mode, s->bind_host, s->join ? hh : NULL, kt))
    fprintf(stderr, "tide: data plane: cannot listen on %s (%s): chunks go over ZeroMQ\n", s->bind_host,
            strerror(errno));
  else
    printf("tide: data plane on %s port %d (%s)\n", s->bind_host, td_node_dplane_port(td_ctx.node),
           s->dp_mode == TD_DP_PLAIN ? "plain: authenticated, not encrypted" : "AES-128-OCB");
  memset(kt, 0, sizeof(kt));
}

/* TCP, secured with CURVE: the cluster key is made once per session by
 * a head; a node that joins listens with the key it joined with. Why it
 * cannot goes in s->failed. */
static void td__daemon_tcp(td__start_t *s) {
  if (s->port == 0) return;
  td_cluster_key_t key;
  int rc = s->join ? td_key_save(s->keyf, &s->join_key) : td_key_load(s->keyf, &key);
  if (!s->join && rc) rc = td_key_create(s->keyf, &key);
  if (rc) {
    snprintf(s->failed, sizeof(s->failed), "cannot write the cluster key %.300s: %s", s->keyf,
             td_strerror(rc));
    return;
  }
  char ep[300];
  if (s->join) key = s->join_key;
  memcpy(s->dash_secret, key.server_secret, sizeof(s->dash_secret));
  if (s->port > 0) snprintf(ep, sizeof(ep), "tcp://%s:%d", s->bind_host, s->port);
  else snprintf(ep, sizeof(ep), "tcp://%s:*", s->bind_host);
  /* A killed predecessor may hold the port for a moment while its
   * last threads exit: try for a while before giving up. */
  int up = -1;
  for (int i = 0; i < 100 && (up = td_bridge_server_start(ep, s->sock, &key)) != 0 && !td__stop_daemon; i++)
    usleep(100000);
  if (up == 0 && s->dp_mode != TD_DP_OFF) td__daemon_dplane(s, &key);
  if (up == 0 && s->join) {
    /* Other nodes fetch objects from this one there. */
    td_node_set_peering(td_ctx.node, td_bridge_server_port(), td__peer_open, td__peer_close, &s->join_key);
    printf("tide: listening for other nodes on %s port %d (CURVE)\n", s->bind_host, td_bridge_server_port());
  } else if (up == 0)
    printf("tide: listening on %s (CURVE; key %s)%s\n", ep, s->keyf,
           s->loopback_only ? "; loopback only: --host ADDR lets other machines join" : "");
  else if (up == TD_EADDRINUSE)
    snprintf(s->failed, sizeof(s->failed),
             "cannot listen on %.100s:%d: port %d is in use (another head, or another "
             "program); pick another with --port",
             s->bind_host, s->port, s->port);
  else snprintf(s->failed, sizeof(s->failed), "cannot listen on %.300s: %s", ep, td_strerror(up));
}

/* The dashboard and /metrics: on loopback unless told otherwise, and
 * from other addresses only with the token derived from the cluster
 * key. A default port already taken gives way to any free one. */
static void td__daemon_dashboard(td__start_t *s) {
  int bound = 0, rc = td_obs_dashboard_start(s->dash_host, s->dash_port, s->dash_secret, td__listen_fd,
                                             td__on_accept, &bound);
  if (rc == TD_EADDRINUSE && !s->dash_given)
    rc = td_obs_dashboard_start(s->dash_host, 0, s->dash_secret, td__listen_fd, td__on_accept, &bound);
  if (rc) {
    fprintf(stderr, "tide: no dashboard: cannot listen on %s:%d: %s\n", s->dash_host, s->dash_port,
            td_strerror(rc));
    return;
  }
  printf("tide: dashboard and /metrics on http://%s:%d/\n", s->dash_host, bound);
  int df = openat(s->dfd, "dashboard.port", O_WRONLY | O_CREAT | O_TRUNC | O_NOFOLLOW | O_CLOEXEC, 0600);
  if (df >= 0) {
    char pb[32];
    int pl = snprintf(pb, sizeof(pb), "%d\n", bound);
    if (write(df, pb, (size_t)pl) != pl) fprintf(stderr, "tide: cannot write dashboard.port\n");
    close(df);
  }
  if (s->dash_secret[0]) {
    char tok[65];
    td_obs_token(s->dash_secret, tok);
    df = openat(s->dfd, "dashboard.token", O_WRONLY | O_CREAT | O_TRUNC | O_NOFOLLOW | O_CLOEXEC, 0600);
    if (df >= 0) {
      if (write(df, tok, 64) != 64 || write(df, "\n", 1) != 1)
        fprintf(stderr, "tide: cannot write dashboard.token\n");
      close(df);
    }
  }
}

/* Opens the node for work (its jobs, its observability, the dashboard, the
 * link to its head) and tells `tide start` it is up; or, without its TCP
 * port, that it is not. */
static void td__daemon_up(td__start_t *s) {
  /* Without its TCP port a head is no head for other machines: it stops,
   * and `tide start` says why, rather than running with TCP silently off. */
  if (s->failed[0]) {
    fprintf(stderr, "tide: %s\n", s->failed);
    td__ready(s->failed);
    td__stop_daemon = 1;
  } else {
    setenv("TIDE_SESSION_DIR", s->dir, 1);
    td_node_restore(td_ctx.node);
    td_core_enable_jobs(td__cmd_home);
    td_obs_enable(td__cmd_home);
  }
  signal(SIGTERM, td__on_term);
  signal(SIGINT, td__on_term);
  signal(SIGHUP, SIG_IGN);
  signal(SIGPIPE, SIG_IGN);
  td_node_watch_fd(td_ctx.node, td__listen_fd, td__on_accept, NULL, NULL);
  if (s->head && !s->failed[0] && s->dash_port >= 0) td__daemon_dashboard(s);
  if (s->link_fd >= 0) td_node_link_head(td_ctx.node, s->link_fd);
  if (!s->failed[0]) {
    printf("tide: node listening on %s\n", s->sock);
    fflush(stdout);
    td__ready(NULL);
  }
}

/* Pumps the node until SIGTERM: rotates the worker logs, and rejoins a
 * head that went away. */
static void td__daemon_loop(td__start_t *s) {
  double retry_at = 0, rotate_at = 0, join_until = 0;
  const char *lm = getenv("TIDE_LOG_MAX_BYTES");
  size_t log_max = lm && atoll(lm) > 0 ? (size_t)atoll(lm) : (size_t)64 << 20;
  /* Rejoining a head that went away: JOIN is sent and its answer looked
   * for between turns of the loop, so the node keeps serving its own
   * workers and drivers meanwhile (the blocking handshake stopped it for
   * up to TD__JOIN_WAIT_S in every second the head was away). */
  td_link_join_t join;
  int joining = 0;
  while (!td__stop_daemon) {
    td_core_flush_refs();
    td_node_pump(td_ctx.node, joining ? 0.02 : 0.5);
    if (td_now() >= rotate_at) {
      td_obs_rotate(log_max);
      rotate_at = td_now() + 2;
    }
    if (s->join && !joining && !td_node_linked(td_ctx.node) && td_now() >= retry_at) {
      /* The head is gone: keep trying, under the same index. Its old link
       * is dead: nothing queued on it need wait to be delivered. */
      td_bridge_client_drop();
      retry_at = td_now() + 1;
      if (td_bridge_client_start(s->join_ep, &s->join_key, &s->link_fd)) continue;
      int rc = td_link_join_start(&join, s->link_fd, s->node_index);
      if (rc) {
        td_link_join_end(&join);
        td__join_failed(s->join_ep, s->link_fd, rc);
        continue;
      }
      joining = 1;
      join_until = td_now() + TD__JOIN_WAIT_S;
    }
    if (!joining) continue;
    uint32_t again = 0;
    int rc = td_link_join_poll(&join, &again);
    if (rc == TD_ETIMEDOUT && td_now() < join_until) continue;
    td_link_join_end(&join);
    joining = 0;
    retry_at = td_now() + 1;
    if (rc) {
      td__join_failed(s->join_ep, s->link_fd, rc);
    } else if (again != s->node_index) {
      fprintf(stderr,
              "tide: the head gave this node index %u, not its own %u; stopping "
              "(start it again to join as a new node)\n",
              again, s->node_index);
      break;
    } else {
      td_node_link_head(td_ctx.node, s->link_fd);
      printf("tide: rejoined the head at %s as node-%u\n", s->join, s->node_index);
      fflush(stdout);
    }
  }
  if (joining) td_link_join_end(&join);
}

/* Stops the node and removes what it leaves in the session directory.
 * Returns the exit status. */
static int td__daemon_shutdown(td__start_t *s) {
  printf("tide: node stopping\n");
  td_obs_dashboard_stop();
  unlinkat(s->dfd, "dashboard.port", 0);
  td_bridge_server_stop();
  td_node_destroy(&td_ctx.node);
  td_bridge_client_stop(); /* after the link is closed */
  if (td_persist_on() && s->failed[0] && s->had_db) {
    td_persist_close(); /* not started: a dead head's state waits for the next start */
  } else if (td_persist_on()) {
    /* Stopped on purpose: the cluster ends, and its state with it (only a
     * head that died is resumed). */
    td_persist_close();
    unlink(s->dbf);
    char side[PATH_MAX + 32];
    snprintf(side, sizeof(side), "%s-wal", s->dbf);
    unlink(side);
    snprintf(side, sizeof(side), "%s-shm", s->dbf);
    unlink(side);
  }
  close(td__listen_fd);
  unlink(s->sock);
  unlink(s->pidf);
  return s->failed[0] ? 1 : 0;
}

/* The daemon, in the session directory start.c readied: the node, its
 * ports, the loop, then the shutdown. Returns the exit status. */
int td__daemon(td__start_t *s) {
  int rc = td__daemon_lock(s);
  if (rc < 0) rc = td__daemon_lua(s);
  if (rc < 0) rc = td__daemon_join(s);
  if (rc < 0) rc = td__daemon_node(s);
  if (rc < 0) rc = td__daemon_listen(s);
  if (rc >= 0) return rc;
  td__daemon_tcp(s);
  td__daemon_up(s);
  td__daemon_loop(s);
  return td__daemon_shutdown(s);
}
