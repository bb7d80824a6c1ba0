/* Tide worker process: runs tasks (one at a time, in a task worker) or
 * hosts actors (many Lua states in one process, like skynet services;
 * their calls run as coroutines that yield while they wait). Talks to its
 * node over the socket on fd 3 and maps the node's store from fd 4.
 * This file: frames and the main loop, waiting for a reply (td_w_await:
 * yield or block), a Lua stack on demand, results, running tasks and
 * actor calls as coroutines, the handlers of the node's frames, and
 * clients attached to a node. The Lua states are worker_states.c's; the
 * tide.core calls that become requests are worker_api.c's.
 * Uses core (bindings), ser, chan, proto.
 */
#include <dlfcn.h>
#include <errno.h>
#include <lauxlib.h>
#include <lualib.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>
#include <sys/socket.h>
#include <sys/un.h>

#include "core.h"
#include "worker_int.h"
#include "term.h"


typedef struct td_frame {
  uint8_t type;
  uint32_t len;
  struct td_frame *next;
  uint8_t data[];
} td_frame_t;

typedef struct td_actor_st td_actor_st_t;

/* A running task or call: a coroutine and what it returns to. */
typedef struct td_co {
  lua_State *co;
  int ref;                 /* registry ref keeping the thread alive */
  td_actor_st_t *actor;    /* NULL for tasks */
  uint64_t task_id;
  int32_t nret;
  uint64_t rets[8];
  uint32_t req;            /* request it waits for, 0 = none */
  td_push_fn push;
  void *ud;
  int is_init;
  char name[128];
  char gpus[128];
} td_co_t;

/* An actor hosted here: its own Lua state. */
struct td_actor_st {
  uint64_t id;
  uint64_t create_task;       /* the node's id of the creation, for init's prints */
  lua_State *L;
  int max_conc, running;
  td_frame_t *qhead, *qtail;  /* calls waiting for a free slot */
  int ready;                  /* init finished */
  uint32_t incarnation;       /* restarts so far + 1, echoed in ACTOR_EXIT */
  char name[128];
  char gpus[128];
  uint8_t *env;               /* runtime_env env_vars, set around each call */
  struct td_actor_st *next_dead; /* destroyed, waiting to be freed */
  uint32_t envlen;
};

static lua_State *td__task_L;       /* the task worker's state */
static td_map_t td__actors;         /* actor id -> td_actor_st_t */
static td_map_t td__waiting;        /* req -> td_co_t (yielded) */
static td_frame_t *td__dq_head, *td__dq_tail;  /* deferred frames */
static td_co_t *td__cur;            /* the coroutine running now */
static td_buf_t td__out;
char td__home[4096];              /* TIDE_HOME, for new states' package.path */
static int td__gpu_env_set;       /* a task here set CUDA_VISIBLE_DEVICES */
static double td__last_read;      /* when the socket was last drained */
static double td__flushed_at;     /* when the channel's output was last flushed */
static int td__remote;            /* a client over the TCP bridge */
static td_map_t td__abandoned;    /* req -> 1: waits given up locally */
static td_map_t td__fn_us;        /* fn id -> 1 + microseconds its last run took here */
static td_actor_st_t *td__dead_actors; /* destroyed actors, freed between frames */
static double td__tmo = -1;       /* td_w_timeout's, for the next wait */
static const uint8_t *td__tmo_reply;
static uint32_t td__tmo_len;

static void td__dispatch(uint8_t type, const uint8_t *p, uint32_t len);

/* -- Frames ---------------------------------------------------------------------- */

static td_frame_t *td__frame_copy(uint8_t type, const uint8_t *p, uint32_t len) {
  td_frame_t *f = td_xmalloc(sizeof(*f) + len);
  f->type = type;
  f->len = len;
  f->next = NULL;
  memcpy(f->data, p, len);
  return f;
}

static void td__defer(uint8_t type, const uint8_t *p, uint32_t len) {
  td_frame_t *f = td__frame_copy(type, p, len);
  if (td__dq_tail) td__dq_tail->next = f; else td__dq_head = f;
  td__dq_tail = f;
}

static void td__flush(void) {
  td_core_flush_refs();
  if (td_chan_flush_all(&td_ctx.ch)) _exit(0);
  td__flushed_at = td_now();
}

/* Between frames: results wait while more frames are here, so that many
 * quick tasks' DONEs go out in one write; but not past 1 ms, or a task
 * pipelined behind a long one would hold the long one's DONE back for the
 * whole of its own run (and its submitter's next task with it). */
static void td__flush_if_late(void) {
  if (td_now() - td__flushed_at > 0.001) td__flush();
}

/* Before a task runs: results still waiting go out first unless its
 * function ran in under 1 ms here last time. A task that follows a quick
 * one (a tide.data source block, then a 15 ms unit) held the quick one's
 * DONE back for its whole run, and the driver's next stage waited on it. */
static void td__flush_before(uint64_t fn_id) {
  uintptr_t us = (uintptr_t)td_map_get(&td__fn_us, fn_id);
  if (us == 0 || us > 1000) td__flush();
}

static void td__resume(td_co_t *c, int nargs);

/* Runs c after what td__flush_before decides for key, and times it for
 * the next time. */
static void td__resume_timed(td_co_t *c, int nargs, uint64_t key) {
  td__flush_before(key);
  double t0 = td_now();
  td__resume(c, nargs);
  td_map_set(&td__fn_us, key, (void *)(uintptr_t)(1 + (td_now() - t0) * 1e6));
}

/* Reads whatever is there; exits when the node is gone. Returns poll's. */
static int td__read(int timeout_ms) {
  struct pollfd pfd = {td_ctx.ch.fd, POLLIN, 0};
  int r = poll(&pfd, 1, timeout_ms);
  if (r < 0 && errno != EINTR) _exit(0);
  if (r > 0 && td_chan_read(&td_ctx.ch)) {
    if (td_ctx.kind == WK_CLIENT) {
      fprintf(stderr, "tide: lost the connection to the node\n");
      _exit(1);
    }
    _exit(0);
  }
  td__last_read = td_now();
  return r;
}

/* True if a cancel for task_id is already here. A task pipelined behind a
 * long one may have been cancelled while it waited: look before running it
 * (reading the socket only when it has not been read for a while). */
static int td__cancel_pending(uint64_t task_id) {
  if (td_now() - td__last_read > 0.001) {
    struct pollfd pfd = {td_ctx.ch.fd, POLLIN, 0};
    if (poll(&pfd, 1, 0) > 0 && td_chan_read(&td_ctx.ch)) _exit(0);
    td__last_read = td_now();
  }
  const uint8_t *p = td_ctx.ch.in.p + td_ctx.ch.in_off, *end = td_ctx.ch.in.p + td_ctx.ch.in.len;
  while (end - p >= 5) {
    uint32_t len;
    memcpy(&len, p, 4);
    if (len < 1 || (size_t)(end - p) < 4 + (size_t)len) break;
    if (p[4] == TD_M_CANCEL && len >= 9) {
      uint64_t tid;
      memcpy(&tid, p + 5, 8);
      if (tid == task_id) return 1;
    }
    p += 4 + len;
  }
  return 0;
}

uint32_t td_w_begin_req(uint8_t type) {
  uint32_t req = ++td_ctx.next_req;
  if (!req) req = ++td_ctx.next_req;
  td_chan_begin(&td_ctx.ch, type);
  td_buf_u32(&td_ctx.ch.out, req);
  return req;
}

/* -- Stacks on demand ------------------------------------------------------------------
 * `tide status --why` and a get's hang warning ask a running task's worker for
 * its Lua stack with SIGUSR2 (why.c). The handler only sets a count hook
 * (lua_sethook is safe in a signal handler, as lua.c's SIGINT shows); the
 * hook prints at the next Lua instruction. A worker blocked in C (a get)
 * prints from its wait loop, which the signal wakes. */

static volatile sig_atomic_t td__stack_wanted;

static void td__stack_print(lua_State *L) {
  td__stack_wanted = 0;
  luaL_traceback(L, L, NULL, 0);
  fprintf(stderr, "(worker pid %d stack) %s\n", (int)getpid(), lua_tostring(L, -1));
  fflush(stderr);
  lua_pop(L, 1);
}

static void td__stack_hook(lua_State *L, lua_Debug *ar) {
  (void)ar;
  lua_sethook(L, NULL, 0, 0);
  if (td__stack_wanted) td__stack_print(L);
}

static void td__on_stack_signal(int sig) {
  (void)sig;
  td__stack_wanted = 1;
  td_co_t *c = td__cur;
  /* Not over another hook (a cancel's): the wait loop prints instead. */
  if (c && c->co && !lua_gethook(c->co)) lua_sethook(c->co, td__stack_hook, LUA_MASKCOUNT, 1);
}

/* -- Waiting ----------------------------------------------------------------------- */

/* Blocks until the reply to `req` arrives, deferring everything else. A
 * task worker hands new tasks straight back, and reports itself blocked so
 * the node can lend its CPU to others. */
static int td__block(lua_State *L, uint32_t req, td_push_fn push, void *ud, int report) {
  /* A client over TCP gives up on its own a little after the timeout it
   * sent: a head whose main loop hangs while ZeroMQ still answers its
   * heartbeats would otherwise never answer, nor let the link fail. Not
   * while a reply is still arriving (a large value crossing the link). */
  double give_up = L && td__tmo >= 0 ? td_now() + td__tmo * 1.05 + 1 : -1, last_bytes = 0;
  td__tmo = -1;
  if (report) {
    td_chan_begin(&td_ctx.ch, TD_M_BLOCKED);
    td_buf_u32(&td_ctx.ch.out, 0);
    td_chan_end(&td_ctx.ch);
  }
  /* Deferred frames may already hold the reply. */
  td_frame_t **pp = &td__dq_head, *f;
  while ((f = *pp)) {
    uint32_t r;
    if (f->type == TD_M_REPLY && f->len >= 4 && (memcpy(&r, f->data, 4), r == req)) {
      *pp = f->next;
      if (td__dq_tail == f) {
        td__dq_tail = NULL;
        for (td_frame_t *g = td__dq_head; g; g = g->next) td__dq_tail = g;
      }
      if (report) { td_chan_begin(&td_ctx.ch, TD_M_UNBLOCKED); td_chan_end(&td_ctx.ch); }
      int n = push(L, f->data + 4, f->len - 4, ud);
      free(f);
      return n;
    }
    pp = &f->next;
  }
  for (;;) {
    td__flush();
    int ms = -1;
    if (give_up >= 0) {
      double now = td_now(), t = give_up > last_bytes + 1 ? give_up : last_bytes + 1;
      if (now >= t) {
        td_map_set(&td__abandoned, req, (void *)1);
        return push(L, td__tmo_reply, td__tmo_len, ud);
      }
      ms = t - now < 3600 ? (int)((t - now) * 1000) + 1 : 3600000;
    }
    if (td__read(ms) > 0) last_bytes = td_now();
    if (td__stack_wanted && L) td__stack_print(L);
    uint8_t type;
    const uint8_t *p;
    uint32_t len;
    int got;
    while ((got = td_chan_next(&td_ctx.ch, &type, &p, &len)) == 1) {
      if (type == TD_M_REPLY && len >= 4) {
        uint32_t r;
        memcpy(&r, p, 4);
        if (r == req) {
          if (report) { td_chan_begin(&td_ctx.ch, TD_M_UNBLOCKED); td_chan_end(&td_ctx.ch); }
          return push(L, p + 4, len - 4, ud);
        }
        if (td_map_del(&td__abandoned, r)) continue;  /* came after its wait gave up */
      }
      if (type == TD_M_PRINT && td_ctx.kind == WK_CLIENT) {
        /* A task of this driver printed (it runs elsewhere). */
        td_rd_t rd;
        td_rd_init(&rd, p, len);
        uint32_t l;
        const uint8_t *s = td_rd_str(&rd, &l);
        uint8_t flags = rd.end - rd.p >= 17 ? rd.p[16] : 0; /* after u64 task, u64 actor */
        /* Above any progress bars; what a task wrote to stderr, on stderr. */
        if (!rd.bad) td_term_write(flags & TD_PRINT_STDERR ? 2 : 1, s, l);
        continue;
      }
      if (type == TD_M_TASK && report && len >= 8) {
        /* Not ours to run while blocked: give it back. */
        uint64_t tid;
        memcpy(&tid, p, 8);
        td_chan_begin(&td_ctx.ch, TD_M_BLOCKED);
        td_buf_u32(&td_ctx.ch.out, 1);
        td_buf_u64(&td_ctx.ch.out, tid);
        td_chan_end(&td_ctx.ch);
        continue;
      }
      /* A wait with no Lua state (a store allocation for the running
       * call's value) cannot be interrupted: the cancel is handled after. */
      if (type == TD_M_CANCEL && len >= 8 && td__cur && L) {
        uint64_t tid;
        memcpy(&tid, p, 8);
        if (tid == td__cur->task_id) {
          /* Tell the waiting call it was cancelled; the reply is dropped. */
          if (report) { td_chan_begin(&td_ctx.ch, TD_M_UNBLOCKED); td_chan_end(&td_ctx.ch); }
          lua_pushinteger(L, TD_GET_CANCELLED);
          return 1;
        }
      }
      td__defer(type, p, len);
    }
    if (got < 0) _exit(2);
  }
}

void td_w_timeout(double timeout, const uint8_t *reply, uint32_t len) {
  if (!td__remote || timeout < 0) return;
  td__tmo = timeout;
  td__tmo_reply = reply;
  td__tmo_len = len;
}

int td_w_await(lua_State *L, uint32_t req, td_push_fn push, void *ud) {
  if (td_ctx.kind != WK_TASK && td__cur && td__cur->co == L) {
    td__tmo = -1;
    td__cur->req = req;
    td__cur->push = push;
    td__cur->ud = ud;
    td_map_set(&td__waiting, req, td__cur);
    return lua_yield(L, 0);
  }
  return td__block(L, req, push, ud, td_ctx.kind == WK_TASK);
}

static int td__push_alloc(lua_State *L, const uint8_t *p, size_t n, void *ud) {
  (void)L;
  td_rd_t rd;
  td_rd_init(&rd, p, n);
  uint8_t ok = td_rd_u8(&rd);
  uint64_t v = td_rd_u64(&rd);
  /* The node sends the offset, or the (negative) code as a u64. */
  int64_t code = (int64_t)v;
  *(int64_t *)ud = ok && !rd.bad ? code : code < 0 && code >= INT32_MIN ? code : TD_ESTOREFULL;
  return 0;
}

int td_w_alloc(size_t size, size_t *off) {
  int64_t res = 0;
  uint32_t req = td_w_begin_req(TD_M_ALLOC);
  td_buf_u64(&td_ctx.ch.out, size);
  td_chan_end(&td_ctx.ch);
  td__block(NULL, req, td__push_alloc, &res, 0);
  if (res < 0) return (int)res;
  *off = (size_t)res;
  return 0;
}

static int td__push_nothing(lua_State *L, const uint8_t *p, size_t n, void *ud) {
  (void)L; (void)p; (void)n; (void)ud;
  return 0;
}

int td_w_sleep(lua_State *L, double seconds) {
  /* A wait on an object that never exists, with a timeout, sleeps without
   * blocking the process. */
  uint32_t req = td_w_begin_req(TD_M_WAIT);
  td_buf_f64(&td_ctx.ch.out, seconds);
  td_buf_u32(&td_ctx.ch.out, 1);
  td_buf_u32(&td_ctx.ch.out, 1);
  td_buf_u64(&td_ctx.ch.out, 0);
  td_chan_end(&td_ctx.ch);
  if (td_ctx.kind != WK_TASK && td__cur && td__cur->co == L) return td_w_await(L, req, td__push_nothing, NULL);
  return td__block(L, req, td__push_nothing, NULL, 0);
}

/* Reads a GPU id list as "0,1,...". */
static void td__read_gpus(td_rd_t *rd, char *out, size_t cap) {
  uint32_t ng = td_rd_u32(rd);
  size_t o = 0;
  out[0] = 0;
  for (uint32_t i = 0; i < ng && i < 16; i++) {
    uint32_t g = td_rd_u32(rd);
    if (o + 12 < cap) o += (size_t)snprintf(out + o, cap - o, i ? ",%u" : "%u", g);
  }
}

/* -- Results -------------------------------------------------------------------------- */

/* Turns an error value into an error table via the stdlib's formatter. */
static void td__errtable(lua_State *L, lua_State *co, int erridx, td_co_t *c) {
  lua_getfield(L, LUA_REGISTRYINDEX, "tide.hook.errfmt");
  if (lua_isnil(L, -1)) {
    lua_pop(L, 1);
    lua_getglobal(L, "require");
    lua_pushliteral(L, "tide.boot");
    if (lua_pcall(L, 1, 1, 0) == 0) lua_getfield(L, -1, "errfmt"), lua_remove(L, -2);
    else lua_pop(L, 1), lua_pushnil(L);
  }
  lua_pushvalue(co, erridx);
  lua_xmove(co, L, 1);
  luaL_traceback(L, co, NULL, 0);
  lua_pushstring(L, c->name);
  if (lua_pcall(L, 3, 1, 0) != 0 || !lua_istable(L, -1)) {
    const char *m = lua_tostring(L, -1);
    lua_pop(L, 1);
    lua_createtable(L, 0, 2);
    lua_pushliteral(L, "TaskError");
    lua_setfield(L, -2, "kind");
    lua_pushstring(L, m ? m : "task failed");
    lua_setfield(L, -2, "message");
  }
}

static void td__send_error(lua_State *L, uint64_t task_id) {
  td_ser_t *s = &td_ctx.ser;
  if (td_ser_value(s, L, -1, "error")) {
    lua_pop(L, 1);
    lua_createtable(L, 0, 2);
    lua_pushliteral(L, "TaskError");
    lua_setfield(L, -2, "kind");
    lua_pushliteral(L, "the task raised an error that cannot be sent");
    lua_setfield(L, -2, "message");
    td_ser_value(s, L, -1, "error");
  }
  lua_pop(L, 1);
  td_chan_begin(&td_ctx.ch, TD_M_DONE);
  td_buf_u64(&td_ctx.ch.out, task_id);
  td_buf_u8(&td_ctx.ch.out, 0);
  td_buf_u32(&td_ctx.ch.out, (uint32_t)s->size);
  td_ser_append(s, &td_ctx.ch.out);
  td_chan_end(&td_ctx.ch);
}

static void td__send_error_msg(lua_State *L, uint64_t task_id, const char *kind, const char *msg) {
  lua_createtable(L, 0, 3);
  lua_pushstring(L, kind);
  lua_setfield(L, -2, "kind");
  lua_pushstring(L, msg);
  lua_setfield(L, -2, "message");
  lua_pushliteral(L, "");
  lua_setfield(L, -2, "traceback");
  td__send_error(L, task_id);
}

/* Sends the results left on a finished coroutine's stack. */
static void td__send_results(lua_State *L, td_co_t *c) {
  lua_State *co = c->co;
  int n = lua_gettop(co);
  if (c->nret < 0) {
    td_chan_begin(&td_ctx.ch, TD_M_DONE);
    td_buf_u64(&td_ctx.ch.out, c->task_id);
    td_buf_u8(&td_ctx.ch.out, 1);
    td_buf_u32(&td_ctx.ch.out, 0);
    td_chan_end(&td_ctx.ch);
    return;
  }
  if (c->nret > 1 && n < c->nret) {
    char msg[160];
    snprintf(msg, sizeof(msg), "the function returned %d values but num_returns is %d", n, c->nret);
    td__send_error_msg(L, c->task_id, "TaskError", msg);
    return;
  }
  td_buf_reset(&td__out);
  for (int i = 1; i <= c->nret; i++) {
    td_ser_t *s = &td_ctx.ser;
    if (i > n) lua_pushnil(co);
    else lua_pushvalue(co, i);
    int rc = td_ser_value(s, co, -1, c->nret == 1 ? "return value" : "a return value");
    if (!rc) rc = td_core_put_value(s, &td__out);
    lua_pop(co, 1);
    if (rc) {
      td__send_error_msg(L, c->task_id, "TaskError", rc == TD_ESER ? s->err : td_strerror(rc));
      return;
    }
    td_buf_u32(&td__out, (uint32_t)s->nrefs);
    td_buf_put(&td__out, s->refs, (size_t)s->nrefs * 8);
  }
  td_chan_begin(&td_ctx.ch, TD_M_DONE);
  td_buf_u64(&td_ctx.ch.out, c->task_id);
  td_buf_u8(&td_ctx.ch.out, 1);
  td_buf_u32(&td_ctx.ch.out, (uint32_t)c->nret);
  td_buf_put(&td_ctx.ch.out, td__out.p, td__out.len);
  td_chan_end(&td_ctx.ch);
}

/* -- Running coroutines ----------------------------------------------------------------- */

static void td__actor_next(td_actor_st_t *a);
static void td__actor_destroy(td_actor_st_t *a, const char *why, int crashed);

static void td__set_env(const uint8_t *env, uint32_t len, int set) {
  for (uint32_t i = 0; i < len;) {
    const char *kv = (const char *)env + i;
    size_t l = strnlen(kv, len - i);
    const char *eq = memchr(kv, '=', l);
    if (eq) {
      char key[256];
      size_t kl = (size_t)(eq - kv) < sizeof(key) - 1 ? (size_t)(eq - kv) : sizeof(key) - 1;
      memcpy(key, kv, kl);
      key[kl] = 0;
      static char saved_cwd[4096];
      int is_wd = !strcmp(key, "TIDE_WORKING_DIR");
      if (set) {
        char val[1024];
        size_t vl = l - kl - 1 < sizeof(val) - 1 ? l - kl - 1 : sizeof(val) - 1;
        memcpy(val, eq + 1, vl);
        val[vl] = 0;
        setenv(key, val, 1);
        /* runtime_env.working_dir: the task runs there (and requires from it). */
        if (is_wd && getcwd(saved_cwd, sizeof(saved_cwd)) && chdir(val) != 0) saved_cwd[0] = 0;
      } else {
        unsetenv(key);
        if (is_wd && saved_cwd[0] && chdir(saved_cwd) != 0) saved_cwd[0] = 0;
      }
    }
    i += (uint32_t)l + 1;
  }
}

static void td__co_free(lua_State *L, td_co_t *c) {
  luaL_unref(L, LUA_REGISTRYINDEX, c->ref);
  free(c);
}

/* Resumes c with nargs values on its stack and handles how it stops. */
static void td__resume(td_co_t *c, int nargs) {
  td_actor_st_t *a = c->actor;
  lua_State *L = a ? a->L : td__task_L;
  td__cur = c;
  td_ctx.cur_task = c->task_id;
  td_ctx.print_task = c->is_init && a ? a->create_task : 0;
  td_ctx.cur_actor = a ? a->id : 0;
  memcpy(td_ctx.cur_name, c->name, sizeof(td_ctx.cur_name));
  memcpy(td_ctx.gpu_ids, c->gpus, sizeof(td_ctx.gpu_ids));
  td_ctx.cur_streaming = c->nret < 0;
  /* Actors share processes: their env_vars are set only while they run. */
  if (a && a->envlen) td__set_env(a->env, a->envlen, 1);
  int st = lua_resume(c->co, nargs);
  if (a && a->envlen) td__set_env(a->env, a->envlen, 0);
  fflush(stdout);
  td__cur = NULL;
  /* No call runs: what Lua writes now (a finalizer) is no call's. */
  td_ctx.cur_task = td_ctx.print_task = td_ctx.cur_actor = 0;
  td_ctx.cur_streaming = 0;
  if (st == LUA_YIELD) {
    if (!c->req) {  /* a plain coroutine.yield at the top: treat as an error */
      td__send_error_msg(L, c->task_id, "TaskError", "coroutine.yield outside a coroutine in a task");
    } else {
      return;
    }
  } else if (st == 0) {
    if (c->is_init) {
      a->ready = 1;
      td_chan_begin(&td_ctx.ch, TD_M_ACTOR_READY);
      td_buf_u64(&td_ctx.ch.out, a->id);
      td_chan_end(&td_ctx.ch);
    } else {
      td__send_results(L, c);
    }
  } else {
    /* os.exit inside a lightweight actor raises this marker. */
    int is_exit = 0;
    if (a && lua_istable(c->co, -1)) {
      lua_getfield(c->co, -1, "__tide_exit");
      is_exit = lua_toboolean(c->co, -1);
      lua_pop(c->co, 1);
    }
    if (is_exit) {
      /* The node fails or retries every call in flight, this one too. */
      td_co_t copy = *c;
      td__co_free(L, c);
      td__actor_destroy(a, "the actor called os.exit", 1);
      (void)copy;
      return;
    }
    td__errtable(L, c->co, lua_gettop(c->co), c);
    if (c->is_init) {
      lua_getfield(L, -1, "message");
      char why[600];
      snprintf(why, sizeof(why), "the actor's init failed: %s", lua_tostring(L, -1));
      lua_pop(L, 2);
      td_co_t copy = *c;
      td__co_free(L, c);
      (void)copy;
      td__actor_destroy(a, why, 0);
      return;
    }
    td__send_error(L, c->task_id);
  }
  int is_init = c->is_init;
  td__co_free(L, c);
  if (a && a->L) {
    if (!is_init) a->running--;
    td__actor_next(a);
  }
}

/* Starts fn (at the top of L) in a new coroutine with nargs args below... */
static td_co_t *td__co_new(lua_State *L, td_actor_st_t *a, uint64_t task_id, int32_t nret,
                           const char *name) {
  td_co_t *c = td_xcalloc(1, sizeof(*c));
  c->co = lua_newthread(L);
  c->ref = luaL_ref(L, LUA_REGISTRYINDEX);
  c->actor = a;
  c->task_id = task_id;
  c->nret = nret;
  size_t l = strlen(name);
  if (l > sizeof(c->name) - 1) l = sizeof(c->name) - 1;
  memcpy(c->name, name, l);
  c->name[l] = 0;
  if (a) memcpy(c->gpus, a->gpus, sizeof(c->gpus));
  return c;
}

/* -- Handlers ---------------------------------------------------------------------------- */

static void td__on_task(const uint8_t *p, uint32_t len) {
  td_rd_t rd;
  td_rd_init(&rd, p, len);
  uint64_t task_id = td_rd_u64(&rd), fn_id = td_rd_u64(&rd);
  int32_t nret = (int32_t)td_rd_u32(&rd);
  uint32_t nr = nret < 0 ? 1 : (uint32_t)nret;
  td_rd_bytes(&rd, (size_t)nr * 8);
  td_rd_u32(&rd); /* attempt */
  uint32_t nl, el;
  const uint8_t *name = td_rd_str(&rd, &nl);
  const uint8_t *env = td_rd_str(&rd, &el);
  char gpus[128];
  td__read_gpus(&rd, gpus, sizeof(gpus));
  int ng = gpus[0] != 0;
  uint8_t has_fn = td_rd_u8(&rd);
  const uint8_t *blob = NULL;
  uint32_t bl = 0;
  if (has_fn) blob = td_rd_str(&rd, &bl);
  if (rd.bad) _exit(2);
  lua_State *L = td__task_L;
  char nm[128];
  if (nl > sizeof(nm) - 1) nl = sizeof(nm) - 1;
  memcpy(nm, name, nl);
  nm[nl] = 0;
  if (td__load_fn(L, fn_id, blob, bl)) {
    td__send_error_msg(L, task_id, "TaskError", lua_tostring(L, -1));
    lua_pop(L, 1);
    return;
  }
  if (td__cancel_pending(task_id)) {
    lua_pop(L, 1);
    td__send_error_msg(L, task_id, "TaskCancelledError", "the task was cancelled before it ran");
    return;
  }
  td_co_t *c = td__co_new(L, NULL, task_id, nret, nm);
  memcpy(c->gpus, gpus, sizeof(c->gpus));
  lua_xmove(L, c->co, 1);
  int deperr = 0;
  int nargs = td__push_args(c->co, &rd, &deperr);
  if (nargs < 0) {
    if (!deperr) {
      const char *m = lua_tostring(c->co, -1);
      td__send_error_msg(L, task_id, "TaskError", m ? m : "bad arguments");
    } else {
      lua_xmove(c->co, L, 1);
      td__send_error(L, task_id);
    }
    td__co_free(L, c);
    return;
  }
  if (el) td__set_env(env, el, 1);
  /* A task sees exactly the GPUs it was given. */
  if (ng) setenv("CUDA_VISIBLE_DEVICES", gpus, 1);
  else if (td__gpu_env_set) unsetenv("CUDA_VISIBLE_DEVICES");
  td__gpu_env_set = ng > 0;
  td__resume_timed(c, nargs, fn_id);
  if (el) td__set_env(env, el, 0);
}

/* Edit distance between a and b (Levenshtein), for "did you mean". */
static size_t td__edits(const char *a, size_t na, const char *b, size_t nb) {
  size_t row[64];
  if (na >= 64 || nb >= 64) return (size_t)-1;
  for (size_t j = 0; j <= nb; j++) row[j] = j;
  for (size_t i = 1; i <= na; i++) {
    size_t diag = row[0];
    row[0] = i;
    for (size_t j = 1; j <= nb; j++) {
      size_t up = row[j], best = diag + (a[i - 1] != b[j - 1]);
      if (up + 1 < best) best = up + 1;
      if (row[j - 1] + 1 < best) best = row[j - 1] + 1;
      diag = up;
      row[j] = best;
    }
  }
  return row[nb];
}

/* The method of the class at the top of L's stack closest to m, or NULL. */
static const char *td__closest_method(lua_State *L, const char *m, size_t ml) {
  const char *best = NULL;
  size_t bestd = ml / 3 > 1 ? ml / 3 : 1;
  lua_pushnil(L);
  while (lua_next(L, -2)) {
    size_t kl;
    if (lua_type(L, -2) == LUA_TSTRING && lua_isfunction(L, -1)) {
      const char *k = lua_tolstring(L, -2, &kl);
      size_t d = td__edits(m, ml, k, kl);
      if (d <= bestd) best = k, bestd = d;  /* keys are kept alive by the class */
    }
    lua_pop(L, 1);
  }
  return best;
}

static void td__actor_start_call(td_actor_st_t *a, const uint8_t *p, uint32_t len) {
  td_rd_t rd;
  td_rd_init(&rd, p, len);
  uint64_t task_id = td_rd_u64(&rd);
  td_rd_u64(&rd);
  uint32_t ml;
  const uint8_t *m = td_rd_str(&rd, &ml);
  int32_t nret = (int32_t)td_rd_u32(&rd);
  uint32_t nr = nret < 0 ? 1 : (uint32_t)nret;
  td_rd_bytes(&rd, (size_t)nr * 8);
  if (rd.bad) _exit(2);
  lua_State *L = a->L;
  char name[160];
  snprintf(name, sizeof(name), "%s.%.*s", a->name, (int)ml, m);
  /* method = class[m], called as method(self, ...) */
  lua_getfield(L, LUA_REGISTRYINDEX, "tide.self");
  lua_getfield(L, -1, "__class");
  lua_pushlstring(L, (const char *)m, ml);
  lua_rawget(L, -2);
  if (!lua_isfunction(L, -1)) {
    lua_pop(L, 1);
    const char *near = td__closest_method(L, (const char *)m, ml);
    char msg[300];
    snprintf(msg, sizeof(msg), "the actor has no method '%.*s'%s%.64s%s", (int)ml, m,
             near ? " (did you mean '" : "", near ? near : "", near ? "'?)" : "");
    lua_pop(L, 2);
    td__send_error_msg(L, task_id, "TaskError", msg);
    return;
  }
  a->running++;
  td_co_t *c = td__co_new(L, a, task_id, nret, name);
  lua_pushvalue(L, -1);  /* method */
  lua_pushvalue(L, -4);  /* self */
  lua_xmove(L, c->co, 2);
  lua_pop(L, 3);
  int deperr = 0;
  int nargs = td__push_args(c->co, &rd, &deperr);
  if (nargs < 0) {
    if (!deperr) td__send_error_msg(L, task_id, "TaskError", lua_tostring(c->co, -1));
    else { lua_xmove(c->co, L, 1); td__send_error(L, task_id); }
    td__co_free(L, c);
    a->running--;
    return;
  }
  /* Timed per actor and method, as tasks are per function. */
  td__resume_timed(c, nargs + 1, td_fnv1a(a->id, m, ml));
}

static void td__actor_next(td_actor_st_t *a) {
  while (a->L && a->ready && a->qhead && a->running < a->max_conc) {
    td_frame_t *f = a->qhead;
    a->qhead = f->next;
    if (!a->qhead) a->qtail = NULL;
    td__actor_start_call(a, f->data, f->len);
    free(f);
  }
}

static void td__actor_destroy(td_actor_st_t *a, const char *why, int crashed) {
  /* Calls queued or suspended here are dropped: the node, told below,
   * fails or retries every call it sent to this actor. */
  lua_State *L = a->L;
  while (a->qhead) {
    td_frame_t *f = a->qhead;
    a->qhead = f->next;
    free(f);
  }
  a->qtail = NULL;
  size_t it = 0;
  uint64_t req;
  void *v;
  while (td_map_next(&td__waiting, &it, &req, &v)) {
    td_co_t *c = v;
    if (c->actor != a) continue;
    td_map_del(&td__waiting, req);
    free(c);
  }
  td_chan_begin(&td_ctx.ch, TD_M_ACTOR_EXIT);
  td_buf_u64(&td_ctx.ch.out, a->id);
  td_buf_u8(&td_ctx.ch.out, (uint8_t)crashed);
  td_buf_str(&td_ctx.ch.out, why, strlen(why));
  td_buf_u32(&td_ctx.ch.out, a->incarnation);
  td_chan_end(&td_ctx.ch);
  td_map_del(&td__actors, a->id);
  td__flush();
  lua_close(L);
  free(a->env);
  /* Callers up the stack (td__actor_next, td__resume) may still hold a:
   * it is freed from the main loop. */
  a->L = NULL;
  a->next_dead = td__dead_actors;
  td__dead_actors = a;
  if (td_ctx.kind == WK_GPUHOST) _exit(0);
}

static void td__on_actor_new(const uint8_t *p, uint32_t len) {
  td_rd_t rd;
  td_rd_init(&rd, p, len);
  uint64_t task_id = td_rd_u64(&rd), actor_id = td_rd_u64(&rd), class_id = td_rd_u64(&rd);
  uint32_t nl, el;
  const uint8_t *name = td_rd_str(&rd, &nl);
  uint32_t mc = td_rd_u32(&rd);
  uint32_t incarnation = td_rd_u32(&rd);
  const uint8_t *env = td_rd_str(&rd, &el);
  char gpus[128];
  td__read_gpus(&rd, gpus, sizeof(gpus));
  uint8_t has = td_rd_u8(&rd);
  const uint8_t *blob = NULL;
  uint32_t bl = 0;
  if (has) blob = td_rd_str(&rd, &bl);
  if (rd.bad) _exit(2);
  td_actor_st_t *old = td_map_get(&td__actors, actor_id);
  if (old) td__actor_destroy(old, "replaced by a restart", 0);
  td_actor_st_t *a = td_xcalloc(1, sizeof(*a));
  a->id = actor_id;
  a->create_task = task_id;
  a->max_conc = mc ? (int)mc : 1;
  a->incarnation = incarnation;
  if (nl) snprintf(a->name, sizeof(a->name), "%.*s", (int)nl, name);
  else snprintf(a->name, sizeof(a->name), "actor-%llu", (unsigned long long)actor_id);
  snprintf(a->gpus, sizeof(a->gpus), "%s", gpus);
  if (el) {
    a->env = td_xmalloc(el);
    memcpy(a->env, env, el);
    a->envlen = el;
  }
  a->L = td__newstate(td_ctx.kind == WK_HOST);
  td_map_set(&td__actors, actor_id, a);
  lua_State *L = a->L;
  /* Class functions are cached per process in the host's registry cache. */
  if (td__load_fn(L, class_id, blob, bl)) {
    char why[300];
    snprintf(why, sizeof(why), "the actor class cannot be loaded: %s", lua_tostring(L, -1));
    td__actor_destroy(a, why, 0);
    return;
  }
  /* self = setmetatable({__class = class}, {__index = class}) */
  lua_newtable(L);
  lua_pushvalue(L, -2);
  lua_setfield(L, -2, "__class");
  lua_newtable(L);
  lua_pushvalue(L, -3);
  lua_setfield(L, -2, "__index");
  lua_setmetatable(L, -2);
  lua_pushvalue(L, -1);
  lua_setfield(L, LUA_REGISTRYINDEX, "tide.self");
  lua_getfield(L, -2, "init");
  if (!lua_isfunction(L, -1)) {
    lua_pop(L, 3);
    a->ready = 1;
    td_chan_begin(&td_ctx.ch, TD_M_ACTOR_READY);
    td_buf_u64(&td_ctx.ch.out, a->id);
    td_chan_end(&td_ctx.ch);
    /* Still decode the arguments so refs in them are accounted. */
    int deperr = 0;
    int top = lua_gettop(L);
    td__push_args(L, &rd, &deperr);
    lua_settop(L, top);
    lua_gc(L, LUA_GCCOLLECT, 0);
    return;
  }
  td_co_t *c = td__co_new(L, a, 0, 0, a->name);
  c->is_init = 1;
  lua_pushvalue(L, -1);   /* init */
  lua_pushvalue(L, -3);   /* self */
  lua_xmove(L, c->co, 2);
  lua_pop(L, 3);
  int deperr = 0;
  int nargs = td__push_args(c->co, &rd, &deperr);
  if (nargs < 0) {
    char why[300];
    lua_getfield(c->co, -1, "message");
    snprintf(why, sizeof(why), "the actor's constructor arguments failed: %s",
             lua_tostring(c->co, -1) ? lua_tostring(c->co, -1) : lua_tostring(c->co, -2));
    td__co_free(L, c);
    td__actor_destroy(a, why, 0);
    return;
  }
  td__resume(c, nargs + 1);
  /* A new state carries the garbage of loading its class: collect it now,
   * so each idle actor costs only what it keeps. */
  if (td_map_get(&td__actors, actor_id) == a && a->L) lua_gc(a->L, LUA_GCCOLLECT, 0);
}

static void td__on_actor_call(const uint8_t *p, uint32_t len) {
  if (len < 16) _exit(2);
  uint64_t task_id, actor_id;
  memcpy(&task_id, p, 8);
  memcpy(&actor_id, p + 8, 8);
  td_actor_st_t *a = td_map_get(&td__actors, actor_id);
  /* An actor that ended here: the node answers for its calls. */
  if (!a) return;
  (void)task_id;
  td_frame_t *f = td__frame_copy(TD_M_ACTOR_CALL, p, len);
  if (a->qtail) a->qtail->next = f; else a->qhead = f;
  a->qtail = f;
  td__actor_next(a);
}

/* Runs the trampoline that turns a reply into values, protected, in the
 * actor's main thread; then moves them to the waiting coroutine. */
typedef struct { td_co_t *c; const uint8_t *p; size_t n; int nres; } td__pushctx_t;
static int td__push_tramp(lua_State *L) {
  td__pushctx_t *x = lua_touserdata(L, 1);
  lua_pop(L, 1);
  x->nres = x->c->push(L, x->p, x->n, x->c->ud);
  return x->nres;
}

static void td__on_reply(const uint8_t *p, uint32_t len) {
  if (len < 4) _exit(2);
  uint32_t req;
  memcpy(&req, p, 4);
  td_co_t *c = td_map_del(&td__waiting, req);
  if (!c) return;
  lua_State *L = c->actor ? c->actor->L : td__task_L;
  td__pushctx_t x = {c, p + 4, len - 4, 0};
  int top = lua_gettop(L);
  lua_pushcfunction(L, td__push_tramp);
  lua_pushlightuserdata(L, &x);
  c->req = 0;
  if (lua_pcall(L, 1, LUA_MULTRET, 0) != 0) {
    /* Resume with TD_GET_RAISED and the message: the stdlib raises it. */
    lua_pushinteger(c->co, TD_GET_RAISED);
    lua_xmove(L, c->co, 1);
    lua_settop(L, top);
    td__resume(c, 2);
    return;
  }
  int n = lua_gettop(L) - top;
  lua_xmove(L, c->co, n);
  td__resume(c, n);
}

static void td__on_cancel(const uint8_t *p, uint32_t len) {
  if (len < 8) return;
  uint64_t tid;
  memcpy(&tid, p, 8);
  size_t it = 0;
  uint64_t req;
  void *v;
  while (td_map_next(&td__waiting, &it, &req, &v)) {
    td_co_t *c = v;
    if (c->task_id != tid) continue;
    td_map_del(&td__waiting, req);
    c->req = 0;
    lua_pushinteger(c->co, TD_GET_CANCELLED);
    td__resume(c, 1);
    return;
  }
  /* Queued calls that have not started are answered at once. */
  size_t it2 = 0;
  td_actor_st_t *a;
  while (td_map_next(&td__actors, &it2, NULL, (void **)&a)) {
    for (td_frame_t **pp = &a->qhead, *f; (f = *pp); pp = &f->next) {
      uint64_t t;
      memcpy(&t, f->data, 8);
      if (t != tid) continue;
      *pp = f->next;
      if (a->qtail == f) {
        a->qtail = NULL;
        for (td_frame_t *g = a->qhead; g; g = g->next) a->qtail = g;
      }
      td__send_error_msg(a->L, tid, "TaskCancelledError", "the call was cancelled");
      free(f);
      return;
    }
  }
}

static void td__dispatch(uint8_t type, const uint8_t *p, uint32_t len) {
  switch (type) {
    case TD_M_TASK: td__on_task(p, len); break;
    case TD_M_ACTOR_NEW: td__on_actor_new(p, len); break;
    case TD_M_ACTOR_CALL: td__on_actor_call(p, len); break;
    case TD_M_REPLY: td__on_reply(p, len); break;
    case TD_M_CANCEL: td__on_cancel(p, len); break;
    case TD_M_ACTOR_KILL: {
      if (len < 8) _exit(2);
      uint64_t id;
      memcpy(&id, p, 8);
      td_actor_st_t *a = td_map_get(&td__actors, id);
      if (a) td__actor_destroy(a, "the actor was killed by tide.kill", 0);
      break;
    }
    default: _exit(2);
  }
}

/* The process's channel to its node and its tables, empty. */
static void td__ctx_init(int fd) {
  td_chan_init(&td_ctx.ch, fd);
  td_map_init(&td_ctx.lrefs);
  td_map_init(&td__actors);
  td_map_init(&td__waiting);
  td_map_init(&td__blobs);
  td_map_init(&td__abandoned);
  td_map_init(&td__fn_us);
  td_ser_init(&td_ctx.ser);
  td_buf_init(&td__out);
}


/* -- Clients ---------------------------------------------------------------------
 * A driver or REPL attached to a running node (`tide start --head`) uses
 * the worker side of the bindings: its calls become messages to the node.
 */
/* Common part: fd is connected to the node (directly or through the TCP
 * bridge); a local client first receives the store's fd. */
static int td__client_attach(int fd, int remote, const char *where, char *err, size_t errlen) {
  int storefd = -1;
  if (!remote) {
    storefd = td_sock_recv_fd(fd);
    if (storefd < 0) {
      snprintf(err, errlen, "the node at %s did not send its object store", where);
      close(fd);
      return -1;
    }
  }
  memset(&td_ctx, 0, sizeof(td_ctx));
  td_ctx.kind = WK_CLIENT;
  td__ctx_init(fd);
  td__remote = remote;
  if (storefd >= 0) {
    td_ctx.base = td_store_map(storefd, &td_ctx.cap);
    close(storefd);
  }
  for (;;) {
    uint8_t type;
    const uint8_t *p;
    uint32_t len;
    int got = td_chan_next(&td_ctx.ch, &type, &p, &len);
    if (got == 1 && type == TD_M_HELLO && len >= 16) {
      memcpy(&td_ctx.wk_id, p, 8);
      uint64_t im;
      memcpy(&im, p + 8, 8);
      /* Without the store every value travels inline. */
      td_ctx.inline_max = remote ? (size_t)1 << 40 : (size_t)im;
      return 0;
    }
    if (got != 0) break;
    struct pollfd pfd = {fd, POLLIN, 0};
    if (poll(&pfd, 1, 5000) <= 0 || td_chan_read(&td_ctx.ch)) break;
  }
  snprintf(err, errlen, "the node at %s did not answer%s", where,
           remote ? " (wrong or missing cluster key? see --key)" : "");
  return -1;
}

int td_client_connect(const char *path, char *err, size_t errlen) {
  struct sockaddr_un sa;
  memset(&sa, 0, sizeof(sa));
  sa.sun_family = AF_UNIX;
  if (strlen(path) >= sizeof(sa.sun_path)) {
    snprintf(err, errlen, "socket path too long: %s", path);
    return -1;
  }
  strcpy(sa.sun_path, path);
  int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0 || connect(fd, (struct sockaddr *)&sa, sizeof(sa)) != 0) {
    snprintf(err, errlen, "cannot connect to the node at %s: %s (is `tide start --head` running?)", path,
             strerror(errno));
    if (fd >= 0) close(fd);
    return -1;
  }
  return td__client_attach(fd, 0, path, err, errlen);
}

int td_client_connect_fd(int fd, const char *where, char *err, size_t errlen) {
  return td__client_attach(fd, 1, where, err, errlen);
}

/* Idle after work that mapped objects in the store or made refs (results
 * of the tasks it submitted, refs it got): the views and handles it dropped
 * are collected now, so their objects are let go (and unpinned) now, not
 * whenever this process next collects, which an idle one never does. */
static void td__collect(void) {
  td_ctx.mapped = 0;
  lua_gc(td__task_L, LUA_GCCOLLECT, 0);
  size_t it = 0;
  void *v;
  while (td_map_next(&td__actors, &it, NULL, &v)) {
    td_actor_st_t *a = v;
    if (a->L) lua_gc(a->L, LUA_GCCOLLECT, 0);
  }
}

int td_worker_main(int argc, char **argv) {
  if (argc < 4) return 2;
  signal(SIGINT, SIG_IGN);
  signal(SIGPIPE, SIG_IGN);
  struct sigaction sa;
  memset(&sa, 0, sizeof(sa));
  sa.sa_handler = td__on_stack_signal; /* no SA_RESTART: a wait wakes to print */
  sigaction(SIGUSR2, &sa, NULL);
  setvbuf(stdout, NULL, _IOLBF, 0);
  memset(&td_ctx, 0, sizeof(td_ctx));
  td_ctx.wk_id = strtoull(argv[2], NULL, 10);
  td_ctx.kind = atoi(argv[3]);
  snprintf(td_ctx.gpu_ids, sizeof(td_ctx.gpu_ids), "%s", argc > 4 ? argv[4] : "");
  /* A GPU actor's process sees only its GPUs. */
  if (td_ctx.gpu_ids[0]) setenv("CUDA_VISIBLE_DEVICES", td_ctx.gpu_ids, 1);
  const char *im = getenv("TIDE_INLINE_MAX");
  td_ctx.inline_max = im ? strtoull(im, NULL, 10) : 64 * 1024;
  const char *home = getenv("TIDE_HOME");
  snprintf(td__home, sizeof(td__home), "%s", home ? home : ".");
  td__ctx_init(3);
  td_ctx.base = td_store_map(4, &td_ctx.cap);
  td__task_L = td__newstate(0);
  td_chan_begin(&td_ctx.ch, TD_M_READY);
  td_buf_u32(&td_ctx.ch.out, (uint32_t)getpid());
  td_chan_end(&td_ctx.ch);
  for (;;) {
    while (td__dead_actors) {
      td_actor_st_t *a = td__dead_actors;
      td__dead_actors = a->next_dead;
      free(a);
    }
    while (td__dq_head) {
      td_frame_t *f = td__dq_head;
      td__dq_head = f->next;
      if (!td__dq_head) td__dq_tail = NULL;
      td__dispatch(f->type, f->data, f->len);
      free(f);
      td__flush_if_late();
    }
    uint8_t type;
    const uint8_t *p;
    uint32_t len;
    int got;
    /* Frames are consumed one at a time: running Lua may read more. */
    /* A copy (reading more may move the channel's buffer), into one
     * reused buffer: nested waits defer frames, they never dispatch. */
    static td_buf_t cur;
    while (!td__dq_head && (got = td_chan_next(&td_ctx.ch, &type, &p, &len)) == 1) {
      td_buf_reset(&cur);
      td_buf_put(&cur, p, len);
      td__dispatch(type, cur.p, len);
      td__flush_if_late();
    }
    if (td__dq_head) continue;
    if (td_ctx.mapped) td__collect();
    td__flush();
    td__read(-1);
    if (td__stack_wanted && !td__cur) {
      td__stack_wanted = 0;
      fprintf(stderr, "(worker pid %d stack) no Lua code runs now: its calls wait for replies\n",
              (int)getpid());
      fflush(stderr);
    }
  }
}
