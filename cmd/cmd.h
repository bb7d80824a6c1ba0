/* Private to cmd/, the `tide` command: what its files share. Other layers
 * never include it.
 *   main.c     the command table (name, handler, help), main, and the small
 *              commands (run, serve, repl, bench, stop)
 *   run.c      running a Lua driver script (tide run, and the commands
 *              written in Lua): the flags, the interrupts, attaching
 *   client.c   the commands that ask a running node (submit, job, list,
 *              logs, timeline, status, serve status): their arguments
 *   session.c  the session directory, its lock, addresses and the cluster
 *              key; tide stop
 *   start.c    tide start: its options and checks, forking the daemon
 *   daemon.c   the node daemon: the bridge, its ports, the loop, shutdown
 */
#ifndef TD_CMD_H
#define TD_CMD_H
#include <limits.h>
#include <stdint.h>
#include <sys/types.h>
#include <lua.h>

#include "bridge.h"

/* main.c */
extern const char *td__key_arg; /* --key FILE */
extern char td__cmd_home[PATH_MAX];
extern char td__exe[PATH_MAX];
extern const char *td__cmd; /* the command being run, for the hint of a usage error */
int td__is_help(const char *a);
int td__help(const char *cmd);
int td__usage_error(const char *fmt, const char *arg);

/* run.c */
extern int td__serving;   /* tide serve run: --host/--port are allowed */
extern int td__repl;      /* tide repl: Ctrl-C interrupts, never exits */
extern int td__statuscmd; /* tide status: flags are parsed */
void td__open(lua_State *L);
int td__parse_flags(lua_State *L, int argc, char **argv, int first, int *next);
int td__run(int argc, char **argv, int first, const char *script_override);

/* client.c: the handlers of the commands that ask a running node. */
int td__cmd_job(int argc, char **argv); /* tide submit, tide job */
int td__cmd_timeline(int argc, char **argv);
int td__cmd_list(int argc, char **argv); /* tide list, tide logs */
int td__cmd_status(int argc, char **argv);
int td__serve_status(int argc, char **argv);

/* session.c */
void td__session_dir(char *out, size_t n);
int td__session_open(char *dir, size_t n, int create);
int td__lock_holder(int dfd);
int td__alive(int pid);
int td__lock_holder_live(int dfd);
int td__lock_take(int dfd);
/* What --address names: a node's Unix socket here, or a node over TCP. */
enum { TD__ADDR_UNIX, TD__ADDR_TCP };
/* Resolves --address into out: TD__ADDR_UNIX (a socket path) or
 * TD__ADDR_TCP (a ZeroMQ endpoint); -1 after printing why not. */
int td__resolve_address(const char *a, char *out, size_t n);
int td__load_key(td_cluster_key_t *key);
void td__why_no_answer(const char *ep, char *why, size_t n);
int td__stop(void);
int td__stop_all(void);

/* What `tide start` was told, and what the daemon's steps share: start.c
 * fills it from the options, daemon.c runs the node with it. */
typedef struct td__start_s {
  int head, block, port, port_given;
  int dash_port, dash_given; /* --dashboard-port: -1 off */
  const char *dash_host;
  char dash_secret[41];
  const char *join, *node_name; /* --address HOST:PORT (the head to join); --name */
  double node_timeout, join_timeout;
  uint32_t want_index;   /* --node-index: the index this node asks the head for */
  int dp_mode;           /* --data-plane (dplane.h) */
  const char *bind_host; /* --host; else loopback, or toward the head */
  char toward[64];
  int loopback_only;
  /* Resource flags are parsed by the same code as tide run. */
  char *rest[64];
  int nrest;
  char join_ep[PATH_MAX]; /* join, as tcp://HOST:PORT */
  td_cluster_key_t join_key;
  int dfd; /* the session directory */
  char dir[PATH_MAX], sock[PATH_MAX + 16], pidf[PATH_MAX + 16], logf[PATH_MAX + 16];
  char keyf[PATH_MAX + 16], dbf[PATH_MAX + 16];
  int had_db;
  lua_State *L;        /* the daemon's, that started the node */
  uint32_t node_index; /* the head gave it on joining (0: a head) */
  int link_fd;         /* the link to the head, or -1 */
  char failed[512];    /* why the node could not listen on TCP */
} td__start_t;

/* start.c */
int td__start(int argc, char **argv);

/* daemon.c */
extern int td__ready_fd;
int td__daemon(td__start_t *s);

#endif
