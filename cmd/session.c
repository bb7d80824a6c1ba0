/* The session directory: where a node daemon keeps its socket, pid, log,
 * lock and cluster key, and how the other commands find it; the addresses
 * a driver attaches to and the cluster key it attaches with; and tide stop.
 *
 * `tide start --head` runs the node in the background (or in the
 * foreground with --block) with its socket, pid and log in one session
 * directory, mode 0700: only this user can attach. Drivers and REPLs attach
 * with --address (the socket path, or "local" for this user's session).
 * The default directory has a predictable name in /tmp: it is used only
 * when it is this user's and private (td_private_dir), and the files in it
 * are opened relative to it without following links. The daemon holds a
 * lock on node.lock for its whole life: the kernel says which process
 * holds it, so `tide stop` never signals a pid that a stale (or forged)
 * node.pid names.
 */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <netdb.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include "bridge.h"
#include "pkg.h"
#include "cmd.h"

void td__session_dir(char *out, size_t n) {
  const char *d = getenv("TIDE_SESSION_DIR");
  if (d) snprintf(out, n, "%s", d);
  else snprintf(out, n, "/tmp/tide-%d", (int)geteuid());
}

/* The session directory, checked, made when create; -1 after printing why
 * not (or, when it does not exist and not create, -2 quietly). */
int td__session_open(char *dir, size_t n, int create) {
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
int td__lock_holder(int dfd) {
  int fd = openat(dfd, "node.lock", O_RDWR | O_NOFOLLOW | O_CLOEXEC);
  if (fd < 0) return 0;
  struct flock fl = {.l_type = F_WRLCK, .l_whence = SEEK_SET};
  int pid = fcntl(fd, F_GETLK, &fl) == 0 && fl.l_type != F_UNLCK ? (int)fl.l_pid : 0;
  close(fd);
  return pid > 0 ? pid : 0;
}

/* A process that exists and is not a zombie (a killed daemon whose
 * parent, maybe an init that does not reap, has not collected it). */
int td__alive(int pid) {
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
int td__lock_holder_live(int dfd) {
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
int td__lock_take(int dfd) {
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

/* Resolves --address: a Unix socket path, or for HOST:PORT a ZeroMQ
 * endpoint (cmd.h). */
int td__resolve_address(const char *a, char *out, size_t n) {
  if (!strcmp(a, "local") || !strcmp(a, "auto") || !*a) {
    char dir[PATH_MAX - 16];
    td__session_dir(dir, sizeof(dir));
    /* Another user's node would get this driver's code and data. */
    if (td__session_foreign()) return -1;
    snprintf(out, n, "%s/node.sock", dir);
    return TD__ADDR_UNIX;
  }
  if (strchr(a, '/')) {
    snprintf(out, n, "%s", a);
    return TD__ADDR_UNIX;
  }
  const char *colon = strrchr(a, ':');
  if (colon && colon[1] && strspn(colon + 1, "0123456789") == strlen(colon + 1) && colon > a) {
    snprintf(out, n, "tcp://%.*s:%s", (int)(colon - a), a, colon + 1);
    return TD__ADDR_TCP;
  }
  td__usage_error("address %s: give HOST:PORT, local, or a node.sock path", a);
  return -1;
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

int td__load_key(td_cluster_key_t *key) {
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
    if (errno == ENOENT)
      fprintf(stderr, "tide: no cluster key at %s (pass --key FILE or set TIDE_KEY_FILE)\n", kf);
    else fprintf(stderr, "tide: cannot read the cluster key %s: %s\n", kf, strerror(errno));
    return -1;
  }
  if (access(kf, R_OK) != 0) {
    fprintf(stderr, "tide: cannot read the cluster key %s: %s\n", kf, strerror(errno));
    return -1;
  }
  if (td_key_load(kf, key)) {
    fprintf(stderr,
            "tide: the cluster key %s is malformed: it needs server_public, client_public and "
            "client_secret lines of 40 characters each (copy the head's session cluster.key)\n",
            kf);
    return -1;
  }
  /* Whoever can read the key can join and run code, so say so, as ssh
   * does for a private key; unlike ssh, go on (the key still works). */
  if (st.st_mode & 077)
    fprintf(stderr,
            "tide: warning: the cluster key %s is accessible by others (mode %04o): anyone who can "
            "read it can join the cluster and run code; chmod 600 %s\n",
            kf, (unsigned)(st.st_mode & 07777), kf);
  return 0;
}

/* Why the node at ep ("tcp://HOST:PORT") did not answer over CURVE, for
 * the message: something listens there (so the handshake failed: most
 * likely a key of another cluster), nothing does, or nothing answers at
 * all. One plain TCP connection, made only after a failure; the node
 * counts it as one more refused connection. */
void td__why_no_answer(const char *ep, char *why, size_t n) {
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
    snprintf(why, n,
             "nothing is listening at %s (connection refused): is the head running there, on that port?", hp);
  else
    snprintf(why, n, "%s does not answer (%s): a wrong host, or a firewall in the way?", hp, strerror(err));
}

int td__stop(void) {
  char dir[PATH_MAX];
  int dfd = td__session_open(dir, sizeof(dir), 0);
  if (dfd == -1) return 1;
  int pid = dfd >= 0 ? td__lock_holder(dfd) : 0;
  if (!pid) {
    int stale = dfd >= 0 ? td__read_pid(dfd) : 0;
    if (stale) {
      /* A daemon that died without cleaning up (or a forged file): the pid
       * may be anyone's now. */
      fprintf(stderr,
              "tide: no node is running in %s (node.pid names pid %d, which does not hold the "
              "session lock: not signalled)\n",
              dir, stale);
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
int td__stop_all(void) {
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
        if (!strncmp(env + o, "TIDE_SESSION_DIR=", 17))
          snprintf(sessions[n], sizeof(sessions[n]), "%s", env + o + 17);
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
