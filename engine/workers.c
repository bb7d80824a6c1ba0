/* Worker processes (node_int.h): ids, spawning (task workers, actor hosts,
 * GPU and own-process actors), and the requests a worker makes of the node
 * and waits on — get, wait, next streamed item — answered when their
 * objects are ready or their timeout passes. */
#include <fcntl.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include "node_int.h"
#include "introspect.h"
#include "term.h"

uint64_t td_wk_id(const td_wk_t *wk) { return wk->id; }

/* Worker and client ids. A head with a store keeps the next one ahead of
 * use, so ids a restarted head gives never repeat those of objects and
 * actors it restores. */
uint64_t td__new_wk_id(td_node_t *n) {
  uint64_t id = ++n->procs.next_id;
  if ((id & 255) == 0 && td_persist_on()) {
    char v[24];
    int l = snprintf(v, sizeof(v), "%llu", (unsigned long long)(id + 256));
    td_persist_put("meta", "next_wk", v, (size_t)l);
  }
  return id;
}

void td__restore_meta(void *ud, const char *key, const void *val, size_t len) {
  td_node_t *n = ud;
  char v[24];
  if (strcmp(key, "next_wk") || len >= sizeof(v)) return;
  memcpy(v, val, len);
  v[len] = 0;
  uint64_t w = strtoull(v, NULL, 10);
  if (w > n->procs.next_id) n->procs.next_id = w;
}

/* A new entry in the node's table of workers, clients and links. */
td_wk_t *td__wk_add(td_node_t *n, uint64_t id, int kind, int fd) {
  td_wk_t *wk = td_xcalloc(1, sizeof(*wk));
  wk->id = id;
  wk->kind = kind;
  wk->nfree[0] = wk->nfree[1] = wk->room_sent[0] = wk->room_sent[1] = -1; /* not said yet */
  td_chan_init(&wk->ch, fd);
  td_map_init(&wk->fns_sent);
  td_map_init(&wk->allocs);
  if (n->procs.n == n->procs.cap) {
    n->procs.cap = n->procs.cap ? n->procs.cap * 2 : 16;
    n->procs.list = td_xrealloc(n->procs.list, (size_t)n->procs.cap * sizeof(td_wk_t *));
  }
  n->procs.list[n->procs.n++] = wk;
  return wk;
}

td_wk_t *td__spawn(td_node_t *n, int kind, const int *gpus, int ngpus) {
  if (n->procs.no_workers) return NULL;
  int sv[2];
  if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) != 0) return NULL;
  uint64_t id = td__new_wk_id(n);
  char idbuf[32], kindbuf[8], gpubuf[128] = "";
  snprintf(idbuf, sizeof(idbuf), "%llu", (unsigned long long)id);
  snprintf(kindbuf, sizeof(kindbuf), "%d", kind);
  for (int i = 0, o = 0; i < ngpus && o < 120; i++)
    o += snprintf(gpubuf + o, sizeof(gpubuf) - (size_t)o, i ? ",%d" : "%d", gpus[i]);
  int lfd = td__obs_worker_log(id);  /* a daemon keeps each worker's output (tide logs) */
  pid_t pid = fork();
  if (pid < 0) { close(sv[0]); close(sv[1]); if (lfd >= 0) close(lfd); return NULL; }
  if (pid == 0) {
    prctl(PR_SET_PDEATHSIG, SIGKILL);
    if (getppid() == 1) _exit(1);
    if (lfd >= 0) dup2(lfd, 1), dup2(lfd, 2);
    /* Move the socket and the store to fds 3 and 4 without clobbering
     * either, and keep them across exec. */
    int sock = sv[1] == 4 ? dup(sv[1]) : sv[1];
    if (td_store_fd(n->objs.store) != 4) dup2(td_store_fd(n->objs.store), 4);
    if (sock != 3) dup2(sock, 3);
    fcntl(3, F_SETFD, 0);
    fcntl(4, F_SETFD, 0);
    close_range(5, ~0U, 0);
    signal(SIGINT, SIG_IGN);
    /* No setenv here (not safe after fork in a threaded process): the
     * worker sets CUDA_VISIBLE_DEVICES from argv. */
    char *argv[] = {"tide-worker", "__worker", idbuf, kindbuf, gpubuf, NULL};
    execv(n->procs.exe, argv);
    _exit(127);
  }
  close(sv[1]);
  if (lfd >= 0) close(lfd);
  td_wk_t *wk = td__wk_add(n, id, kind, sv[0]);
  wk->pid = pid;
  wk->ngpus = ngpus;
  if (ngpus) memcpy(wk->gpus, gpus, (size_t)ngpus * sizeof(int));
  td_log("spawned worker %llu pid %d kind %d", (unsigned long long)id, (int)pid, kind);
  return wk;
}

void td_node_reply(td_node_t *n, td_wk_t *wk, uint32_t req, const void *p, size_t len) {
  (void)n;
  if (wk->dead) return;
  td_chan_begin(&wk->ch, TD_M_REPLY);
  td_buf_u32(&wk->ch.out, req);
  td_buf_put(&wk->ch.out, p, len);
  td_chan_end(&wk->ch);
}

/* Answers a request if it can be answered now (or `expired`). */
static int td__req_try(td_node_t *n, td_req_t *r, int expired) {
  td_buf_t *b = &r->wk->ch.out;
  if (r->op == TD_M_GET) {
    /* A value kept on another node: a node fetches it from there; anyone
     * else waits for this head to fetch it. */
    for (uint32_t i = 0; i < r->n && !expired; i++) {
      td_obj_t *o = td__obj(n, r->ids[i]);
      if (!o || o->state != OBJ_PENDING || td__away_source(n, o, r->wk)) continue;
      if (o->away) td__pull(n, o);
      return 0;
    }
    td_chan_begin(&r->wk->ch, TD_M_REPLY);
    td_buf_u32(b, r->req);
    int timed_out = 0;
    for (uint32_t i = 0; i < r->n; i++) {
      td_obj_t *o = td__obj(n, r->ids[i]);
      if (o && o->state == OBJ_PENDING && !td__away_source(n, o, r->wk)) timed_out = 1;
    }
    td_buf_u8(b, (uint8_t)timed_out);
    for (uint32_t i = 0; i < r->n && !timed_out; i++) {
      td_obj_t *o = td__obj(n, r->ids[i]);
      if (r->wk->kind == WK_NODE && o && ((o->state == OBJ_READY && o->len > TD_CHUNK) || o->away))
        td__put_pull(n, b, o, r->wk);  /* a node fetches it: from here, or another node */
      else if (td__put_value(n, b, r->ids[i], !r->wk->remote, r->wk->kind >= WK_NODE ? 2 : r->wk->remote))
        td__count(r->wk, &r->wk->pinned, r->ids[i], 1);  /* until its UNPIN */
    }
    td_chan_end(&r->wk->ch);
    return 1;
  }
  if (r->op == TD_M_WAIT) {
    uint32_t ready = 0;
    for (uint32_t i = 0; i < r->n; i++) {
      td_obj_t *o = td__obj(n, r->ids[i]);
      /* id 0 never becomes ready: workers sleep on it. */
      if (r->ids[i] && (!o || o->state != OBJ_PENDING || o->away)) ready++;
    }
    if (ready < r->num && !expired) return 0;
    td_chan_begin(&r->wk->ch, TD_M_REPLY);
    td_buf_u32(b, r->req);
    td_buf_u32(b, r->n);
    for (uint32_t i = 0; i < r->n; i++) {
      td_obj_t *o = td__obj(n, r->ids[i]);
      td_buf_u8(b, !o || o->state != OBJ_PENDING || o->away);
    }
    td_chan_end(&r->wk->ch);
    return 1;
  }
  if (r->op == TD_M_STREAM_ROOM) {
    /* ids[0] = the stream; gone, ended or unwindowed streams have room. */
    td_obj_t *o = td__obj(n, r->ids[0]);
    if (o && o->window && !o->stream_done && o->nitems - o->released >= o->window) return 0;
    td_chan_begin(&r->wk->ch, TD_M_REPLY);
    td_buf_u32(b, r->req);
    td_chan_end(&r->wk->ch);
    return 1;
  }
  /* TD_M_STREAM_NEXT: ids[0] = stream, num = index */
  uint64_t item = 0;
  int st = td_node_stream_item(n, r->ids[0], r->num, &item);
  if (st == TD_STREAM_NOT_YET && !expired) return 0;
  td_chan_begin(&r->wk->ch, TD_M_REPLY);
  td_buf_u32(b, r->req);
  td_buf_u8(b, st == TD_STREAM_ITEM ? TD_SN_ITEM : st == TD_STREAM_ENDED ? TD_SN_ENDED : TD_SN_TIMEOUT);
  td_buf_u64(b, item);
  if (st == TD_STREAM_ITEM) td_node_incref(n, item); /* the worker's new handle */
  td_chan_end(&r->wk->ch);
  return 1;
}

void td__reqs_check(td_node_t *n, double now) {
  td_req_t **pp = &n->procs.reqs, *r;
  while ((r = *pp)) {
    int expired = r->deadline > 0 && now >= r->deadline;
    if (r->wk->dead || td__req_try(n, r, expired)) {
      *pp = r->next;
      free(r->ids);
      free(r);
    } else {
      pp = &r->next;
    }
  }
}

/* A worker's GET, WAIT, STREAM_NEXT or STREAM_ROOM (op), answered now if it
 * can be, else kept until it can or its deadline passes; TD_EPROTO when the
 * body is malformed. */
int td__req_add(td_node_t *n, td_wk_t *wk, int op, td_rd_t *rd) {
  td_req_t *r = td_xcalloc(1, sizeof(*r));
  r->wk = wk;
  r->op = op;
  r->req = td_rd_u32(rd);
  if (op == TD_M_STREAM_NEXT) {
    r->n = 1;
    r->ids = td_xmalloc(8);
    r->ids[0] = td_rd_u64(rd);
    r->num = td_rd_u32(rd);
    double timeout = td_rd_f64(rd);
    r->deadline = timeout >= 0 ? td_now() + timeout : 0;
  } else if (op == TD_M_STREAM_ROOM) {
    /* Named by the producing task: the worker does not know the stream. */
    td_task_t *t = td_map_get(&n->tasks.map, td_rd_u64(rd));
    r->n = 1;
    r->ids = td_xmalloc(8);
    r->ids[0] = t && t->wk == wk && t->spec.nret < 0 ? t->spec.rets[0] : 0;
  } else {
    double timeout = td_rd_f64(rd);
    r->deadline = timeout >= 0 ? td_now() + timeout : 0;
    if (op == TD_M_WAIT) r->num = td_rd_u32(rd);
    r->n = td_rd_u32(rd);
    const uint8_t *p = td_rd_bytes(rd, (size_t)r->n * 8);
    if (!p) { /* a count beyond the message */
      free(r);
      return TD_EPROTO;
    }
    r->ids = td_xmalloc((size_t)r->n * 8 + 8);
    memcpy(r->ids, p, (size_t)r->n * 8);
  }
  if (rd->bad) {
    free(r->ids);
    free(r);
    return TD_EPROTO;
  }
  for (uint32_t i = 0; i < r->n; i++) {
    td_obj_t *o = td__obj(n, r->ids[i]);
    /* A value kept on a node is fetched here only for a GET that cannot
     * fetch it from there itself. */
    if (o && o->foreign && !(o->away && (op == TD_M_WAIT || td__away_source(n, o, wk)))) td__pull(n, o);
  }
  if (td__req_try(n, r, 0)) {
    free(r->ids);
    free(r);
    return 0;
  }
  r->next = n->procs.reqs;
  n->procs.reqs = r;
  return 0;
}

/* -- Messages (node.c's table dispatches them) ------------------------------ */

/* Requests answered once their objects are ready or their timeout passes. */
int td__on_get(td_node_t *n, td_wk_t *wk, td_rd_t *rd) { return td__req_add(n, wk, TD_M_GET, rd); }
int td__on_wait(td_node_t *n, td_wk_t *wk, td_rd_t *rd) { return td__req_add(n, wk, TD_M_WAIT, rd); }
int td__on_stream_next(td_node_t *n, td_wk_t *wk, td_rd_t *rd) {
  return td__req_add(n, wk, TD_M_STREAM_NEXT, rd);
}
int td__on_stream_room(td_node_t *n, td_wk_t *wk, td_rd_t *rd) {
  return td__req_add(n, wk, TD_M_STREAM_ROOM, rd);
}

/* A print from task tid goes to the client whose work it is (a driver
 * attached to this node), or to the head when the head sent the task.
 * Returns 1 if it was sent, 0 if the task has no such owner here. */
static int td__print_to_owner(td_node_t *n, uint64_t tid, const uint8_t *s, uint32_t l, uint8_t flags) {
  td_task_t *t = tid ? td_map_get(&n->tasks.map, tid) : NULL;
  if (!t || !t->owner) return 0;
  for (int i = 0; i < n->procs.n; i++) {
    td_wk_t *w = n->procs.list[i];
    if (w->id != t->owner || w->dead || (w->kind != WK_CLIENT && w->kind != WK_HEAD)) continue;
    td_chan_begin(&w->ch, TD_M_PRINT);
    td_buf_str(&w->ch.out, s, l);
    td_buf_u64(&w->ch.out, w->kind == WK_HEAD ? t->owner_task : 0);
    td_buf_u64(&w->ch.out, 0);
    td_buf_u8(&w->ch.out, flags);
    td_chan_end(&w->ch);
    return 1;
  }
  return 0;
}

/* A worker's output: on this terminal, in its log (tide logs), and to the
 * driver or head whose work printed it. PRINT is str text, then (from a
 * worker) u64 task and u64 actor: whose it is, 0 for none, so that the log's
 * index can slice one task's or actor's lines out; then u8 flags. */
int td__on_print(td_node_t *n, td_wk_t *wk, td_rd_t *rd) {
  uint32_t l;
  const uint8_t *s = td_rd_str(rd, &l);
  if (rd->bad) return TD_EPROTO;
  uint64_t tid = rd->end - rd->p >= 8 ? td_rd_u64(rd) : 0;
  uint64_t aid = rd->end - rd->p >= 8 ? td_rd_u64(rd) : 0;
  uint8_t flags = rd->end - rd->p >= 1 ? td_rd_u8(rd) : 0;
  td_node_procs_t *pr = &n->procs;
  if (pr->raw.len && (!(flags & TD_PRINT_RAW) || pr->raw_wk != wk->id || pr->raw_task != tid ||
                      pr->raw_actor != aid || pr->raw_flags != flags || pr->raw.len >= (1u << 20)))
    td__raw_flush(n);
  if (flags & TD_PRINT_RAW) {
    pr->raw_wk = wk->id;
    pr->raw_task = tid;
    pr->raw_actor = aid;
    pr->raw_flags = flags;
    td_buf_put(&pr->raw, s, l);
    return 0;
  }
  td_term_print(s, l); /* above any progress bars */
  td__obs_print(wk->kind == WK_NODE ? 0 : wk->id, tid, aid, s, l);
  td__print_to_owner(n, tid, s, l, flags);
  return 0;
}

/* Bytes a task wrote to stdout or stderr go where the worker's own stdout
 * or stderr would have put them -- its log, or this node's output when it
 * keeps none -- and to the driver whose work it is. From another node,
 * they were kept there: this node only passes them on, or shows them when
 * no driver of the task is attached (an embedded one). */
void td__raw_flush(td_node_t *n) {
  td_node_procs_t *pr = &n->procs;
  if (!pr->raw.len) return;
  td_wk_t *wk = NULL;
  for (int i = 0; i < pr->n && !wk; i++)
    if (pr->list[i]->id == pr->raw_wk) wk = pr->list[i];
  uint64_t from = wk && wk->kind != WK_NODE ? wk->id : 0; /* a worker of this node */
  const uint8_t *s = pr->raw.p;
  uint32_t l = (uint32_t)pr->raw.len;
  int kept = from && td__obs_print(from, pr->raw_task, pr->raw_actor, s, l) == 0;
  int sent = td__print_to_owner(n, pr->raw_task, s, l, pr->raw_flags);
  if (!kept && (from || !sent)) td_term_write(pr->raw_flags & TD_PRINT_STDERR ? 2 : 1, s, l);
  pr->raw.len = 0;
}

/* A control call (cancel, kill, placement groups, the KV ...), answered by
 * the host's handler (the driver's, in lua/core.c). */
int td__on_rpc(td_node_t *n, td_wk_t *wk, td_rd_t *rd) {
  uint32_t req = td_rd_u32(rd);
  uint32_t ol, al;
  const uint8_t *op = td_rd_str(rd, &ol);
  const uint8_t *args = td_rd_str(rd, &al);
  if (rd->bad || ol >= 64) return TD_EPROTO;
  char opname[64];
  memcpy(opname, op, ol);
  opname[ol] = 0;
  n->procs.rpc_wk = wk;
  if (n->procs.rpc) n->procs.rpc(n->procs.rpc_ud, wk, req, opname, args, al);
  n->procs.rpc_wk = NULL;
  return 0;
}

/* A worker blocks in get or wait: the tasks it had not begun go back to the
 * queue, and its CPU is free for others until it runs again. */
int td__on_blocked(td_node_t *n, td_wk_t *wk, td_rd_t *rd) {
  uint32_t cnt = td_rd_u32(rd);
  for (uint32_t i = 0; i < cnt && !rd->bad; i++) {
    td_task_t *t = td_map_get(&n->tasks.map, td_rd_u64(rd));
    if (!t || t->wk != wk || t->state != T_SENT) continue;
    td__inflight_del(n, wk, t);
    td__unpin_deps(n, t);
    t->attempt--;
    t->state = T_QUEUED;
    t->wk = NULL;
    tq_push_front(&n->sched.queue, t);
  }
  if (wk->kind == WK_TASK && wk->leased && !wk->blocked) {
    n->sched.avail[TD_RES_CPU] += wk->lease[TD_RES_CPU];
    wk->blocked = 1;
  }
  return rd->bad ? TD_EPROTO : 0;
}

int td__on_unblocked(td_node_t *n, td_wk_t *wk, td_rd_t *rd) {
  (void)rd;
  if (wk->blocked) {
    n->sched.avail[TD_RES_CPU] -= wk->lease[TD_RES_CPU];
    wk->blocked = 0;
  }
  return 0;
}

/* -- Worker death ---------------------------------------------------------- */

/* Gives back what a dead worker was lent and never used. */
static void td__free_lent(td_node_t *n, td_wk_t *wk) {
  size_t it = 0;
  uint64_t k;
  void *v;
  while (td_map_next(&wk->allocs, &it, &k, &v))
    td_store_free(n->objs.store, (size_t)(k - 1), (size_t)(uintptr_t)v);
  td_map_free(&wk->allocs);
}

/* Why wk died, in words (a worker process's exit status, reaped here, or
 * which link closed), for logs and for the errors of what it was running. */
void td__wk_reason(td_wk_t *wk, const char *why, char *reason, size_t cap) {
  int st = 0;
  pid_t r = 0;
  for (int i = 0; wk->pid > 0 && i < 200 && (r = waitpid(wk->pid, &st, WNOHANG)) == 0; i++) usleep(1000);
  if (td__wk_ghost(wk)) {
    snprintf(reason, cap, "a connection given index %u closed before it joined: it %s", wk->node_index, why);
  } else if (wk->kind == WK_NODE) {
    snprintf(reason, cap, "node-%u (%s) died: it %s", wk->node_index, wk->name, why);
  } else if (wk->kind == WK_HEAD) {
    snprintf(reason, cap, "lost the head: it %s", why);
  } else if (wk->kind == WK_PEER) {
    snprintf(reason, cap, "the link with node-%u closed: it %s", wk->node_index, why);
  } else if (r == wk->pid && WIFSIGNALED(st))
    snprintf(reason, cap, "worker process %d was killed by signal %d", (int)wk->pid, WTERMSIG(st));
  else if (r == wk->pid && WIFEXITED(st))
    snprintf(reason, cap, "worker process %d exited with status %d", (int)wk->pid, WEXITSTATUS(st));
  else snprintf(reason, cap, "worker process %d %s", (int)wk->pid, why);
}

/* The last of a dead worker: its lease, its place in the list, its waiting
 * requests, the refs and pins it held, the extents lent to it. */
void td__wk_free(td_node_t *n, td_wk_t *wk) {
  wk->ngpus = wk->kind == WK_TASK ? wk->ngpus : 0;
  td__lease_done(n, wk);
  for (int i = 0; i < n->procs.n; i++) {
    if (n->procs.list[i] != wk) continue;
    n->procs.list[i] = n->procs.list[--n->procs.n];
    break;
  }
  /* Its pending requests die with it. */
  for (td_req_t **pp = &n->procs.reqs, *r; (r = *pp);) {
    if (r->wk != wk) {
      pp = &r->next;
      continue;
    }
    *pp = r->next;
    free(r->ids);
    free(r);
  }
  td__give_back(n, wk);
  td_map_free(&wk->fns_sent);
  td__free_lent(n, wk);
  td__notes_free(wk);
  free(wk);
  n->objs.dirty = 1;
}
