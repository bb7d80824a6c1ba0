/* Tide machine limits, measured in the same run as the benchmarks
 * (DESIGN §10): pipe ping-pong and pipelined message rate between two
 * processes, memcpy into pre-faulted memory, and a shared-memory futex
 * ping-pong, the floor nothing on the machine can beat. Exposed to Lua as
 * the `tide.rawbench` module. Uses only libc and Linux.
 */
#include <lauxlib.h>
#include <linux/futex.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include "td.h"

static int td__fullread(int fd, void *p, size_t n) {
  size_t got = 0;
  while (got < n) {
    ssize_t r = read(fd, (char *)p + got, n - got);
    if (r <= 0) return -1;
    got += (size_t)r;
  }
  return 0;
}

/* Round trips of 64-byte messages per second over two pipes. */
static int rb_pipe_pingpong(lua_State *L) {
  int n = (int)luaL_optinteger(L, 1, 20000);
  int a[2], b[2];
  if (pipe(a) || pipe(b)) return luaL_error(L, "pipe failed");
  char msg[64] = {0};
  pid_t pid = fork();
  if (pid == 0) {
    for (int i = 0; i < n; i++) {
      if (td__fullread(a[0], msg, 64)) _exit(1);
      if (write(b[1], msg, 64) != 64) _exit(1);
    }
    _exit(0);
  }
  double t0 = td_now();
  for (int i = 0; i < n; i++) {
    if (write(a[1], msg, 64) != 64 || td__fullread(b[0], msg, 64)) break;
  }
  double dt = td_now() - t0;
  waitpid(pid, NULL, 0);
  close(a[0]); close(a[1]); close(b[0]); close(b[1]);
  lua_pushnumber(L, n / dt);
  return 1;
}

/* Pipelined 64-byte messages per second from one process to another:
 * the sender writes each message as it goes, the reader drains. */
static int rb_pipe_stream(lua_State *L) {
  int n = (int)luaL_optinteger(L, 1, 1000000);
  int a[2], b[2];
  if (pipe(a) || pipe(b)) return luaL_error(L, "pipe failed");
  pid_t pid = fork();
  if (pid == 0) {
    char buf[64 * 256];
    size_t total = (size_t)n * 64, got = 0;
    while (got < total) {
      ssize_t r = read(a[0], buf, sizeof(buf));
      if (r <= 0) _exit(1);
      got += (size_t)r;
    }
    char done = 1;
    if (write(b[1], &done, 1) != 1) _exit(1);
    _exit(0);
  }
  char buf[64];
  memset(buf, 1, sizeof(buf));
  double t0 = td_now();
  /* One write per message: the raw rate, with no batching by the sender. */
  for (int i = 0; i < n; i++)
    if (write(a[1], buf, 64) != 64) break;
  char done;
  td__fullread(b[0], &done, 1);
  double dt = td_now() - t0;
  waitpid(pid, NULL, 0);
  close(a[0]); close(a[1]); close(b[0]); close(b[1]);
  lua_pushnumber(L, n / dt);
  return 1;
}

/* Bytes per second over a TCP loopback connection between two processes,
 * 1 MiB writes into a reader that drains: the wire between two nodes on
 * one machine, as object transfers are measured against. */
static int rb_tcp_stream(lua_State *L) {
  size_t total = (size_t)luaL_optnumber(L, 1, 1 << 30);
  int ls = socket(AF_INET, SOCK_STREAM, 0);
  struct sockaddr_in sa = {0};
  sa.sin_family = AF_INET;
  sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t sl = sizeof(sa);
  if (ls < 0 || bind(ls, (struct sockaddr *)&sa, sizeof(sa)) || listen(ls, 1) ||
      getsockname(ls, (struct sockaddr *)&sa, &sl))
    return luaL_error(L, "tcp listen failed");
  size_t chunk = 1 << 20;
  pid_t pid = fork();
  if (pid == 0) {
    int c = accept(ls, NULL, NULL);
    char *buf = malloc(chunk);
    size_t got = 0;
    while (c >= 0 && got < total) {
      ssize_t r = read(c, buf, chunk);
      if (r <= 0) _exit(1);
      got += (size_t)r;
    }
    char done = 1;
    if (write(c, &done, 1) != 1) _exit(1);
    _exit(0);
  }
  close(ls);
  int c = socket(AF_INET, SOCK_STREAM, 0);
  if (c < 0 || connect(c, (struct sockaddr *)&sa, sizeof(sa))) return luaL_error(L, "tcp connect failed");
  char *buf = malloc(chunk);
  memset(buf, 1, chunk);
  double t0 = td_now();
  for (size_t sent = 0; sent < total;) {
    ssize_t w = write(c, buf, chunk < total - sent ? chunk : total - sent);
    if (w <= 0) break;
    sent += (size_t)w;
  }
  char done;
  td__fullread(c, &done, 1);
  double dt = td_now() - t0;
  close(c);
  free(buf);
  waitpid(pid, NULL, 0);
  lua_pushnumber(L, (double)total / dt);
  return 1;
}

/* memcpy bandwidth into pre-faulted memory, bytes per second. */
static int rb_memcpy(lua_State *L) {
  size_t size = (size_t)luaL_optnumber(L, 1, 64 << 20);
  int iters = (int)luaL_optinteger(L, 2, 10);
  char *src = malloc(size), *dst = malloc(size);
  if (!src || !dst) { free(src); free(dst); return luaL_error(L, "out of memory"); }
  memset(src, 1, size);
  memset(dst, 2, size);
  double best = 0;
  for (int i = 0; i < iters; i++) {
    double t0 = td_now();
    memcpy(dst, src, size);
    double dt = td_now() - t0;
    __asm__ volatile("" ::"r"(dst) : "memory");
    if (size / dt > best) best = size / dt;
  }
  free(src);
  free(dst);
  lua_pushnumber(L, best);
  return 1;
}

static long td__futex(atomic_int *addr, int op, int val) {
  return syscall(SYS_futex, addr, op, val, NULL, NULL, 0);
}

/* Round trips per second through shared memory with futex wakeups. */
static int rb_futex_pingpong(lua_State *L) {
  int n = (int)luaL_optinteger(L, 1, 50000);
  atomic_int *flag = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
  if (flag == MAP_FAILED) return luaL_error(L, "mmap failed");
  atomic_store(flag, 0);
  pid_t pid = fork();
  if (pid == 0) {
    for (int i = 0; i < n; i++) {
      while (atomic_load(flag) != 1) td__futex(flag, FUTEX_WAIT, 0);
      atomic_store(flag, 0);
      td__futex(flag, FUTEX_WAKE, 1);
    }
    _exit(0);
  }
  double t0 = td_now();
  for (int i = 0; i < n; i++) {
    atomic_store(flag, 1);
    td__futex(flag, FUTEX_WAKE, 1);
    while (atomic_load(flag) != 0) td__futex(flag, FUTEX_WAIT, 1);
  }
  double dt = td_now() - t0;
  waitpid(pid, NULL, 0);
  munmap(flag, 4096);
  lua_pushnumber(L, n / dt);
  return 1;
}

static int rb_now(lua_State *L) {
  lua_pushnumber(L, td_now());
  return 1;
}

/* Resident set size of a process in bytes (self when no pid). */
static int rb_rss(lua_State *L) {
  char path[64];
  snprintf(path, sizeof(path), "/proc/%d/statm", (int)luaL_optinteger(L, 1, getpid()));
  FILE *f = fopen(path, "r");
  long pages = 0, rss = 0;
  if (!f || fscanf(f, "%ld %ld", &pages, &rss) != 2) {
    if (f) fclose(f);
    return 0;
  }
  fclose(f);
  lua_pushnumber(L, (double)rss * (double)sysconf(_SC_PAGESIZE));
  return 1;
}

static int rb_pid_self(lua_State *L) {
  lua_pushinteger(L, getpid());
  return 1;
}

static int rb_maxrss(lua_State *L) {
  struct rusage ru;
  getrusage(RUSAGE_SELF, &ru);
  lua_pushnumber(L, (double)ru.ru_maxrss * 1024);
  return 1;
}

int luaopen_tide_rawbench(lua_State *L) {
  static const luaL_Reg fns[] = {
    {"pipe_pingpong", rb_pipe_pingpong}, {"pipe_stream", rb_pipe_stream}, {"memcpy", rb_memcpy},
    {"tcp_stream", rb_tcp_stream},
    {"futex_pingpong", rb_futex_pingpong}, {"now", rb_now}, {"rss", rb_rss},
    {"maxrss", rb_maxrss}, {"pid_self", rb_pid_self}, {NULL, NULL}};
  lua_newtable(L);
  luaL_register(L, NULL, fns);
  return 1;
}
