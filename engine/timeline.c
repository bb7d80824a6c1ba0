/* Timeline (node_int.h, node.h): every task and actor call that ends on
 * this node -- when it was submitted, began, ended, where it ran, the size
 * of its arguments, its name -- kept in a fixed ring so recording costs a
 * copy of one record and memory stays bounded; the oldest records are
 * dropped (and counted) when the ring is full. `tide timeline` turns the
 * ring into Chrome trace events (stdlib/tide/timeline.lua).
 */
#include "node_int.h"

#include <sys/time.h>

#define TD__TL_DEFAULT 65536 /* records kept: about 7 MiB */
#define TD__TL_MAX (1u << 24)
#define TD__TL_CLIENTS 256 /* clients remembered (id -> pid) for --job */

typedef struct td_tl_client {
  uint64_t id;       /* the client's worker-table id (a task's owner) */
  int32_t pid, ppid; /* its process, and that process's parent (a job's shell) */
} td_tl_client_t;

struct td_tl {
  td_tl_event_t *ev; /* the ring, cap records */
  uint32_t cap;
  uint64_t n;                             /* records ever written: the next goes at n % cap */
  double wall0;                           /* unix time minus td_now(), to report wall-clock times */
  td_tl_client_t clients[TD__TL_CLIENTS]; /* a ring of the clients that attached */
  uint32_t nclients;
};

/* Makes the ring unless TIDE_TIMELINE=0; TIDE_TIMELINE_EVENTS sizes it. */
void td__tl_init(td_node_t *n) {
  const char *on = getenv("TIDE_TIMELINE");
  if (on && !strcmp(on, "0")) return;
  uint32_t cap = TD__TL_DEFAULT;
  const char *e = getenv("TIDE_TIMELINE_EVENTS");
  if (e && *e) {
    char *end;
    unsigned long v = strtoul(e, &end, 10);
    if (*end || v == 0 || v > TD__TL_MAX)
      fprintf(stderr, "tide: TIDE_TIMELINE_EVENTS=%s is not a count from 1 to %u; keeping %u\n", e,
              TD__TL_MAX, cap);
    else cap = (uint32_t)v;
  }
  td_tl_t *tl = td_xcalloc(1, sizeof(*tl));
  tl->ev = td_xcalloc(cap, sizeof(td_tl_event_t));
  tl->cap = cap;
  struct timeval tv;
  gettimeofday(&tv, NULL);
  tl->wall0 = (double)tv.tv_sec + tv.tv_usec / 1e6 - td_now();
  n->tl = tl;
}

void td__tl_free(td_node_t *n) {
  if (!n->tl) return;
  free(n->tl->ev);
  free(n->tl);
  n->tl = NULL;
}

/* A client attached: its process and parent are kept, so that a job (a
 * shell that runs `tide run --address`) finds its tasks after it left. */
void td__tl_client(td_node_t *n, uint64_t id, int32_t pid) {
  td_tl_t *tl = n->tl;
  if (!tl) return;
  int32_t ppid = 0;
  char path[64], buf[512];
  snprintf(path, sizeof(path), "/proc/%d/stat", (int)pid);
  FILE *f = fopen(path, "r");
  if (f) {
    size_t k = fread(buf, 1, sizeof(buf) - 1, f);
    buf[k] = 0;
    fclose(f);
    const char *p = strrchr(buf, ')');              /* the name may hold spaces */
    if (p) ppid = (int32_t)strtol(p + 3, NULL, 10); /* ") S ppid" */
  }
  tl->clients[tl->nclients++ % TD__TL_CLIENTS] = (td_tl_client_t){id, pid, ppid};
}

/* Keeps the name of t cheaply (no formatting on the hot path): a task's
 * name (file:line by default), a call's method (the actor's name is added
 * when the ring is read), a creation's actor name. */
static void td__tl_name(const td_task_t *t, char *out, size_t len) {
  const td_spec_t *s = &t->spec;
  const char *src = s->kind == TD_K_ACTOR_CALL ? s->method : s->name;
  size_t k = strnlen(src, len - 1);
  /* Cut at a character, not inside one: the trace must stay UTF-8. */
  if (src[k])
    while (k > 0 && ((unsigned char)src[k] & 0xC0) == 0x80) k--;
  memcpy(out, src, k);
  out[k] = 0;
}

/* Drops a UTF-8 sequence that formatting cut short at the end of s. */
static void td__utf8_trim(char *s) {
  size_t l = strlen(s), i = l;
  while (i > 0 && ((unsigned char)s[i - 1] & 0xC0) == 0x80) i--;
  if (i == 0) return;
  unsigned char lead = (unsigned char)s[i - 1];
  size_t want = lead >= 0xF0 ? 4 : lead >= 0xE0 ? 3 : lead >= 0xC0 ? 2 : 1;
  if (l - (i - 1) < want) s[i - 1] = 0;
}

/* The name as the user knows it: Actor.method for calls (the actor's
 * name, or "actor"), name.new for creations, "task" for a nameless task. */
static void td__tl_fullname(td_node_t *n, const td_tl_event_t *e, char *out, size_t len) {
  if (e->kind == TD_K_ACTOR_CALL) {
    td_actor_t *a = td_map_get(&n->actors.map, e->actor);
    const char *an = a && a->create && a->create->spec.name[0] ? a->create->spec.name : "actor";
    snprintf(out, len, "%.20s.%.23s", an, e->name);
  } else if (e->kind == TD_K_ACTOR_NEW) {
    snprintf(out, len, "%.40s.new", e->name[0] ? e->name : "actor");
  } else {
    snprintf(out, len, "%.44s", e->name[0] ? e->name : "task");
  }
  td__utf8_trim(out);
}

/* Records t's run: begun..ended on wk (ran 1), or its failure before it
 * ran (ran 0). */
void td__tl_record(td_node_t *n, const td_task_t *t, const td_wk_t *wk, double begun, double ended, int ok,
                   int ran) {
  td_tl_t *tl = n->tl;
  td_tl_event_t *e = &tl->ev[tl->n++ % tl->cap];
  e->submit = t->submit_at;
  e->start = begun;
  e->end = ended;
  e->task = t->id;
  e->ref = t->spec.rets ? t->spec.rets[0] : 0;
  e->owner = t->owner;
  e->actor = t->spec.kind == TD_K_TASK ? 0 : t->spec.actor_id;
  e->node = wk && wk->kind == WK_NODE ? wk->node_index : n->links.index;
  e->pid = wk && wk->kind < WK_NODE ? (int32_t)wk->pid : 0;
  e->wk = wk && wk->kind < WK_NODE ? wk->id : 0;
  e->args = t->spec.args_len;
  e->kind = t->spec.kind;
  e->ok = (uint8_t)ok;
  e->ran = (uint8_t)ran;
  td__tl_name(t, e->name, sizeof(e->name));
}

/* A task that fails here without a worker's answer (its worker died, it
 * was cancelled, a dependency failed, it cannot be placed). */
void td__tl_failed(td_node_t *n, const td_task_t *t) {
  double now = td_now();
  int sent = t->state == T_SENT && t->wk;
  td__tl_record(n, t, sent ? t->wk : NULL, sent ? t->sent_at : now, now, 0, sent);
}

int td_node_timeline(td_node_t *n, td_tl_cb cb, void *ud, uint64_t *dropped, double *wall0) {
  td_tl_t *tl = n->tl;
  *dropped = 0;
  *wall0 = 0;
  if (!tl) return TD_ENOTFOUND;
  *wall0 = tl->wall0;
  uint64_t first = tl->n > tl->cap ? tl->n - tl->cap : 0;
  *dropped = first;
  for (uint64_t i = first; cb && i < tl->n; i++) {
    td_tl_event_t e = tl->ev[i % tl->cap];
    td__tl_fullname(n, &tl->ev[i % tl->cap], e.name, sizeof(e.name));
    cb(ud, &e);
  }
  return 0;
}

int td_node_client_pid(td_node_t *n, uint64_t id, int32_t *pid, int32_t *ppid) {
  td_tl_t *tl = n->tl;
  *pid = *ppid = 0;
  if (!tl) return TD_ENOTFOUND;
  uint32_t k = tl->nclients < TD__TL_CLIENTS ? tl->nclients : TD__TL_CLIENTS;
  for (uint32_t i = 0; i < k; i++)
    if (tl->clients[i].id == id) {
      *pid = tl->clients[i].pid;
      *ppid = tl->clients[i].ppid;
      return 0;
    }
  return TD_ENOTFOUND;
}
