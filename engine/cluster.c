/* The cluster (node_int.h): the links between a head and its nodes.
 *
 * Head: nodes join (an index each, reused only when long free), report
 * their resources and heartbeats, get tasks and actors it places there
 * (td__send_node_task), their functions and working-directory packages
 * (workdir.c),
 * and the objects those need; it relays a node's requests for the KV,
 * names and resources.  Node: work it cannot do goes to the head
 * (td__forward); values it holds for the head are fetched from it
 * (td__pull); when the head goes silent it drops the head's work but keeps
 * its own drivers' and its detached actors, and rejoins. */
#define TD_INDEX_REST 600.0 /* seconds a node index rests before it is given again */

/* -- Objects and definitions between nodes ------------------------------------------
 * An object belongs to the node whose index its id carries, or to the head
 * when it was sent there. A node that meets a ref to an object it does not
 * have keeps a foreign record: it holds one ref upstream (the head, or on
 * the head the node that made it) until the record is freed, and asks for
 * the value when something needs it. */
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <ifaddrs.h>
#include <math.h>
#include <net/if.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include "node_int.h"

td_wk_t *td__link(td_node_t *n, uint32_t index) {
  for (int i = 0; i < n->procs.n; i++) {
    td_wk_t *w = n->procs.list[i];
    if (w->kind == WK_NODE && w->joined && !w->dead && w->node_index == index) return w;
  }
  return NULL;
}

/* The most of resource r any live node has (this one included). */
double td__cluster_max(td_node_t *n, int r) {
  double most = n->sched.total[r];
  if (!n->links.nlinks) return most; /* one node: no scan on the submit path */
  for (int i = 0; i < n->procs.n; i++) {
    td_wk_t *w = n->procs.list[i];
    if (w->kind == WK_NODE && w->joined && !w->dead && w->ntotal[r] > most) most = w->ntotal[r];
  }
  return most;
}

/* Head: nodes may come back (this head restarted, or a node that had
 * `had` of each resource left; NULL: any amount): for a while, work that
 * only they could run waits for them instead of failing as infeasible
 * (td__unplaced_check). */
void td__settle(td_node_t *n, const double *had) {
  double now = td_now(), grace = 3 * n->links.node_timeout;
  if (grace < 10) grace = 10;
  if (n->links.settle_until < now) memset(n->links.settle_max, 0, sizeof(n->links.settle_max));
  for (int r = 0; r < TD_NRES_MAX; r++)
    if (!had || had[r] > n->links.settle_max[r]) n->links.settle_max[r] = had ? had[r] : HUGE_VAL;
  n->links.settle_until = now + grace;
}

/* Head -> node: the whole spec (demands by name), the function the first
 * time, and the argument values inline. */
void td__send_node_task(td_node_t *n, td_wk_t *wk, td_task_t *t) {
  td_buf_t *b = &wk->ch.out;
  td__send_fns(n, wk);
  td_chan_begin(&wk->ch, TD_M_NODE_TASK);
  td_buf_u64(b, t->id);
  td_buf_u32(b, t->attempt);
  td_spec_t s;
  memcpy(&s, &t->spec, sizeof(s));
  s.nres = 0;
  for (int i = 0; i < t->nres; i++) {
    snprintf(s.res_name[s.nres], sizeof(s.res_name[0]), "%s", n->sched.resname[t->res_idx[i]]);
    s.res_amt[s.nres++] = t->res_amt[i];
  }
  int has_cpu = 0;
  for (int i = 0; i < t->nres; i++) has_cpu |= t->res_idx[i] == TD_RES_CPU;
  if (s.kind == TD_K_TASK && !has_cpu && s.nres < TD_NRES_MAX) {  /* asked for no CPU: say so */
    snprintf(s.res_name[s.nres], sizeof(s.res_name[0]), "CPU");
    s.res_amt[s.nres++] = 0;
  }
  s.strategy = TD_ST_DEFAULT;
  s.pg_id = 0;
  td_spec_encode(&s, b);
  td__send_fn(n, wk, t->spec.fn_id);
  td_buf_u32(b, t->spec.ndeps);
  for (uint32_t i = 0; i < t->spec.ndeps; i++) {
    td_obj_t *o = td__obj(n, t->spec.deps[i]);
    if (o && (o->state == OBJ_READY || (o->away && o->state == OBJ_PENDING)) && o->len > n->objs.inline_max)
      td_buf_u8(b, TD_V_PULL);  /* fetched once by the node, however many tasks use it */
    else
      td__put_value(n, b, t->spec.deps[i], 0, 1);
  }
}

int td_node_relay(td_node_t *n, td_wk_t *wk, uint32_t req, const char *op, const uint8_t *args, size_t len) {
  if (!n->links.head || n->links.head->dead) return TD_ENOTFOUND;
  td_relay_t *r = td_xmalloc(sizeof(*r));
  r->wk_id = wk->id;
  r->req = req;
  uint32_t fr = (++n->xfer.next_pull & 0x3fffffffu) | 0x40000000u;
  td_map_set(&n->links.relays, fr, r);
  td_chan_begin(&n->links.head->ch, TD_M_RPC);
  td_buf_u32(&n->links.head->ch.out, fr);
  td_buf_str(&n->links.head->ch.out, op, strlen(op));
  td_buf_str(&n->links.head->ch.out, args, len);
  td_chan_end(&n->links.head->ch);
  return 0;
}

/* A link answers a pull (u32 req, u8 timed out, value) or a relayed
 * request (its reply goes back to the worker that asked). */
int td__on_link_reply(td_node_t *n, td_wk_t *wk, td_rd_t *rd) {
  uint32_t req = td_rd_u32(rd);
  td_relay_t *rl = rd->bad ? NULL : td_map_get(&n->links.relays, req);
  if (rl) {
    td_map_del(&n->links.relays, req);
    for (int i = 0; i < n->procs.n; i++)
      if (n->procs.list[i]->id == rl->wk_id)
        td_node_reply(n, n->procs.list[i], rl->req, rd->p, (size_t)(rd->end - rd->p));
    free(rl);
    return 0;
  }
  uint8_t timed_out = td_rd_u8(rd);
  if (rd->bad) return TD_EPROTO;
  void *v = td_map_get(&n->xfer.pulls, req);
  if (!v) return 0;
  td_map_del(&n->xfer.pulls, req);
  td_obj_t *o = td__obj(n, (uint64_t)(uintptr_t)v);
  uint8_t kind = timed_out ? TD_V_LOST : td_rd_u8(rd);
  uint32_t vl = 0, from = 0, epl = 0;
  uint64_t total = kind == TD_V_PULL || kind == TD_V_PEER ? td_rd_u64(rd) : 0;
  const uint8_t *ep = NULL;
  if (kind == TD_V_PEER) {
    from = td_rd_u32(rd);
    ep = td_rd_str(rd, &epl);
  }
  const uint8_t *vp = kind >= TD_V_LOST ? NULL : td_rd_str(rd, &vl);
  if (rd->bad || kind == TD_V_SHM || kind > TD_V_PEER) return TD_EPROTO;
  if (kind == TD_V_PEER && (wk != n->links.head || epl == 0 || epl > 127)) return TD_EPROTO;
  if (!o || o->state != OBJ_PENDING) {
    if (kind >= TD_V_PULL && wk == n->links.head) td__have_id(n, (uint64_t)(uintptr_t)v, 0); /* not fetched */
    return 0;
  }
  if (kind >= TD_V_PULL) {
    td_wk_t *up = wk;
    if (kind == TD_V_PEER) {  /* from another node, as the head says */
      char e[128];
      memcpy(e, ep, epl);
      e[epl] = 0;
      td_wk_t *peer = td__peer(n, from, e);
      if (peer) up = peer;
    }
    o->told = wk == n->links.head;
    td__chunk_begin(n, o, total, up);
    if (up != wk && o->chunked) td__ppull_note(n, o, up);
    return 0;
  }
  o->pulling = 0;
  if (kind == TD_V_LOST) {
    td__errblob(&n->tmp, "ObjectLostError", "the object was lost on the node that held it");
    td__obj_set(n, o, OBJ_ERROR, 0, n->tmp.p, n->tmp.len, 0, NULL, 0);
  } else {
    td__obj_fill(n, o, kind == TD_V_ERROR ? OBJ_ERROR : OBJ_READY, vp, vl, NULL, 0);
  }
  return 0;
}

/* Function definitions the other side has not had yet. */
void td__send_fns(td_node_t *n, td_wk_t *wk) {
  for (; wk->fns_upto < n->tasks.nfn_order; wk->fns_upto++) {
    uint64_t id = n->tasks.fn_order[wk->fns_upto];
    td_fnblob_t *fb = td_map_get(&n->tasks.fns, id);
    if (!fb || td_map_get(&wk->fns_sent, id)) continue;
    td_map_set(&wk->fns_sent, id, (void *)1);
    td_chan_begin(&wk->ch, TD_M_FN);
    td_buf_u64(&wk->ch.out, id);
    td_buf_str(&wk->ch.out, fb->data, fb->len);
    td_chan_end(&wk->ch);
  }
}

/* Ids a node hands the head inside a message (refs in a value, a spec's
 * arguments): the node holds each for the head (an export, counted on the
 * head's link so that a head that dies gives them back); the head keeps
 * that hold in a new foreign record, or gives it back if it has one. */
void td__export(td_node_t *n, const uint64_t *ids, uint32_t k) {
  for (uint32_t i = 0; i < k; i++) {
    td_node_incref_for(n, n->links.head, ids[i]);
    if (!n->lineage.specs.len || !td_map_get(&n->lineage.specs, ids[i])) continue;
    if (n->lineage.nout == n->lineage.capout) {
      n->lineage.capout = n->lineage.capout ? n->lineage.capout * 2 : 16;
      n->lineage.out = td_xrealloc(n->lineage.out, n->lineage.capout * 8);
    }
    n->lineage.out[n->lineage.nout++] = ids[i];
  }
}

void td__import(td_node_t *n, td_wk_t *from, const uint64_t *ids, uint32_t k) {
  for (uint32_t i = 0; i < k; i++) {
    if (!td__obj(n, ids[i])) {
      if (td__upstream(n, ids[i]) == from) {
        td__obj_new(n, ids[i])->foreign = 1;
        continue;
      }
    }
    td__send_refs1(from, ids[i], -1);
  }
}

/* Node: work a worker here submitted that this node cannot do (a call to
 * an actor it does not host, a demand it cannot meet) goes to the head.
 * So does every actor while the head is there: the head keeps the
 * cluster's actors, so that a handle works on every node (a call from
 * another node reaches the head, which knows where the actor is), and
 * their names (one actor per name), and persists detached ones, which a
 * restarted head adopts. It places them here when they can ever fit
 * (td__forward). Without a head, named and detached ones wait for it.
 * So does work whose placement only the head can decide: in a placement
 * group (the head keeps them), on another node, or spread over the
 * cluster. Returns 1 when forwarded. */
static int td__for_head(td_node_t *n, const td_spec_t *s) {
  if (s->nret < 0) return 0;  /* streams stay here */
  if (s->kind == TD_K_ACTOR_CALL) {
    /* One the head keeps that died here: the head restarts it (or fails
     * the call), wherever. */
    const td_actor_t *a = td_map_get(&n->actors.map, s->actor_id);
    return !a || (a->of_head && (a->state == A_DEAD || a->of_head == 2));
  }
  if (s->kind == TD_K_ACTOR_NEW && (s->detached || s->name[0] || n->links.head)) return 1;
  if (s->pg_id && !td__pg(n, s->pg_id)) return 1;
  if ((s->strategy == TD_ST_NODE || s->strategy == TD_ST_NODE_SOFT) && s->node != n->links.index) return 1;
  if (s->strategy == TD_ST_SPREAD) return 1;
  if (td__spills(n, s)) return 1;
  for (uint32_t i = 0; i < s->nres; i++) {
    int idx = td_node_res_index(n, s->res_name[i]);
    if (idx >= 0 && s->res_amt[i] > n->sched.total[idx] + 1e-9) return 1;
  }
  return 0;
}

int td__forward(td_node_t *n, const td_spec_t *s) {
  if (!n->links.head || !td__for_head(n, s)) return 0;
  td_wk_t *h = n->links.head;
  td__send_fns(n, h);
  td__export(n, s->deps, s->ndeps);
  td__export(n, s->refs, s->nrefs);
  td_chan_begin(&h->ch, TD_M_SUBMIT);
  if (s->kind == TD_K_ACTOR_NEW && s->strategy == TD_ST_DEFAULT && !s->pg_id) {
    td_spec_t here = *s; /* made here when it can ever fit here, as before the head kept them all */
    here.strategy = TD_ST_NODE_SOFT;
    here.node = n->links.index;
    td_spec_encode(&here, &h->ch.out);
  } else {
    td_spec_encode(s, &h->ch.out);
  }
  td_chan_end(&h->ch);
  /* The returns live on the head; here they are foreign records that
   * hold the submitter's ref there. */
  uint32_t nr = s->nret < 0 ? 1 : (uint32_t)s->nret;
  for (uint32_t i = 0; i < nr; i++) {
    td_obj_t *o = td__obj_new(n, s->rets[i]);
    o->foreign = 2;
    o->refs++;
  }
  return 1;
}

/* Node: the head is gone and this node rejoins it. Work that would go to
 * the head waits here for it (at most TD_HEAD_WAIT s) instead of failing
 * at once: its returns are pending records, its arguments held. Returns 1
 * when held. */
int td__hold_for_head(td_node_t *n, td_wk_t *wk, const td_spec_t *s, const uint8_t *msg, uint32_t len) {
  if (n->links.head || n->links.rejoin_until <= td_now() || !td__for_head(n, s)) return 0;
  td_waitsub_t *w = td_xcalloc(1, sizeof(*w));
  /* Whose work, as td_node_submit is told it (a client's, or that of the
   * task this worker runs). */
  w->owner = wk->kind == WK_CLIENT ? wk->id : wk->inflight.head ? wk->inflight.head->owner : 0;
  w->owner_task = wk->kind == WK_CLIENT || !wk->inflight.head ? 0 : wk->inflight.head->owner_task;
  w->job = s->job;
  w->parent = s->parent;
  w->msg = td_xmalloc(len + 1);
  memcpy(w->msg, msg, len);
  w->len = len;
  td_waitsub_t **tail = &n->links.waitsubs;
  while (*tail) tail = &(*tail)->next;
  *tail = w;  /* in submission order */
  for (uint32_t i = 0; i < (uint32_t)s->nret; i++) {
    td__obj_new(n, s->rets[i])->refs++;
    td__count(wk, &wk->held, s->rets[i], 1);
  }
  /* The arguments this node has stay while it waits (others' records
   * cannot be made without a head). */
  w->held = td_xmalloc(((size_t)s->ndeps + s->nrefs) * 8 + 8);
  for (uint32_t i = 0; i < s->ndeps + s->nrefs; i++) {
    uint64_t id = i < s->ndeps ? s->deps[i] : s->refs[i - s->ndeps];
    td_obj_t *o = td__obj(n, id);
    if (!o) continue;
    o->refs++;
    w->held[w->nheld++] = id;
  }
  return 1;
}

/* Whether something here waits for id: a task's argument, or a get. */
static int td__waited_for(td_node_t *n, td_obj_t *o) {
  if (o->nwaiters) return 1;
  for (td_req_t *r = n->procs.reqs; r; r = r->next)
    for (uint32_t i = 0; r->op == TD_M_GET && i < r->n; i++)
      if (r->ids[i] == o->id) return 1;
  return 0;
}

/* The held work goes on (the head is back: forwarded, or run here when
 * this node can now) or fails (why != NULL: the head did not come back). */
static void td__waitsubs_end(td_node_t *n, const char *why) {
  td_waitsub_t *w = n->links.waitsubs;
  n->links.waitsubs = NULL;
  while (w) {
    td_waitsub_t *next = w->next;
    td_spec_t s;
    uint64_t *scratch = NULL;
    td_rd_t rd;
    td_rd_init(&rd, w->msg, w->len);
    if (td_spec_decode(&s, &rd, &scratch) == 0) {
      const char *msg = why;
      s.job = w->job;
      s.parent = w->parent;
      if (!why && td__forward(n, &s)) {
        if (s.kind == TD_K_ACTOR_NEW && !s.detached && w->owner)
          td_map_set(&n->links.fwd_actors, s.actor_id, (void *)(uintptr_t)w->owner);
      } else if (!why) {
        n->tasks.submitter = w->owner;
        n->tasks.submitter_task = w->owner_task;
        if (td_node_submit(n, &s, &msg) == 0) msg = NULL;
        n->tasks.submitter = n->tasks.submitter_task = 0;
      }
      if (msg) td__errblob(&n->tmp, s.kind == TD_K_ACTOR_CALL ? "ActorDiedError" : "TaskError", msg);
      for (uint32_t i = 0; i < (uint32_t)s.nret; i++) {
        td_obj_t *o = td__obj(n, s.rets[i]);
        if (!o) continue;
        if (msg && o->state == OBJ_PENDING && !o->producer) td__obj_fail(n, o, n->tmp.p, n->tmp.len);
        if (!msg && o->foreign && td__waited_for(n, o)) td__pull(n, o);  /* a get asked before it was sent */
        td__unref(n, o, 1);  /* the hold's */
      }
    }
    for (uint32_t i = 0; i < w->nheld; i++) td_node_decref(n, w->held[i]);
    free(scratch);
    free(w->held);
    free(w->msg);
    free(w);
    w = next;
  }
}

void td__waitsubs_check(td_node_t *n, double now) {
  if (!n->links.waitsubs) return;
  if (n->links.head) {
    td__waitsubs_end(n, NULL);
  } else if (now >= n->links.rejoin_until) {
    char why[160];
    snprintf(why, sizeof(why), "the head is gone and did not come back within %d s (this node keeps rejoining it)",
             TD_HEAD_WAIT);
    td__waitsubs_end(n, why);
  }
}

/* A value from another node, inline: it goes to the store when large, so
 * workers here map it. Returns the object (state set, one ref held). */
td_obj_t *td__obj_from_bytes(td_node_t *n, uint64_t id, int state, const uint8_t *p, size_t len) {
  td_obj_t *o = td__obj_new(n, id);
  o->refs++;
  td__obj_fill(n, o, state, p, len, NULL, 0);
  return o;
}

/* Head: whether index could go to a new node: no node has it now, and no
 * object, task or actor the head knows carries it (ids hold their node's
 * index, so a reused one must not meet ids of the node that had it). */
static int td__index_free(td_node_t *n, uint32_t idx) {
  if (idx == n->links.index) return 0;
  for (int i = 0; i < n->procs.n; i++)
    if (n->procs.list[i]->kind == WK_NODE && !n->procs.list[i]->dead && n->procs.list[i]->node_index == idx)
      return 0;
  const td_map_t *maps[] = {&n->objs.map, &n->tasks.map, &n->actors.map};
  for (int m = 0; m < 3; m++) {
    uint64_t id;
    for (size_t it = 0; td_map_next(maps[m], &it, &id, NULL);)
      if (td_id_node(id) == idx) return 0;
  }
  return 1;
}

/* Head: every index was given (nodes take a new one each time they start):
 * the free index whose node left longest ago, and at least TD_INDEX_REST
 * seconds ago; 0 when there is none. */
static uint32_t td__reuse_index(td_node_t *n) {
  double now = td_now(), oldest = now - TD_INDEX_REST;
  uint32_t best = 0;
  for (uint32_t idx = 1; idx <= TD_NODE_MAX; idx++) {
    double gone = n->links.gone_at ? n->links.gone_at[idx] : 0;
    if (gone > oldest || !td__index_free(n, idx)) continue;
    best = idx;
    oldest = gone;
    if (gone == 0) break;  /* never seen by this head: free since it started */
  }
  return best;
}

/* Head: a client asks to join as a node. */
int td__on_join(td_node_t *n, td_wk_t *wk, td_rd_t *rd) {
  uint32_t want = td_rd_u32(rd);
  if (rd->bad) return TD_EPROTO;
  uint32_t idx = want;
  if (!idx || idx > TD_NODE_MAX || idx == n->links.index || td__link(n, idx)) {
    do idx = ++n->links.next_index;
    while (idx <= TD_NODE_MAX && (idx == n->links.index || td__link(n, idx)));
    if (idx > TD_NODE_MAX) {
      n->links.next_index = TD_NODE_MAX;
      idx = td__reuse_index(n);
      if (!idx) { td_log("refusing a node: no node index left"); return TD_EPROTO; }
      td_log("every node index was given: node index %u is given again", idx);
    }
  }
  if (idx > n->links.next_index) n->links.next_index = idx;
  wk->kind = WK_NODE;
  td__link_chan(wk);
  wk->node_index = idx;
  wk->last_seen = td_now();
  td_chan_begin(&wk->ch, TD_M_WELCOME);
  td_buf_u32(&wk->ch.out, idx);
  td_chan_end(&wk->ch);
  return 0;
}

/* Head: a joined node says what it has. */
int td__on_node_info(td_node_t *n, td_wk_t *wk, td_rd_t *rd) {
  if (wk->joined) return TD_EPROTO;
  uint32_t l;
  const uint8_t *name = td_rd_str(rd, &l);
  uint32_t nr = td_rd_u32(rd);
  if (rd->bad || nr > TD_NRES_MAX) return TD_EPROTO;
  snprintf(wk->name, sizeof(wk->name), "%.*s", (int)(l < 63 ? l : 63), (const char *)name);
  char line[512];
  int o = snprintf(line, sizeof(line), "node-%u (%s) joined:", wk->node_index, wk->name);
  for (uint32_t i = 0; i < nr; i++) {
    uint32_t rl;
    const uint8_t *rn = td_rd_str(rd, &rl);
    double v = td_rd_f64(rd);
    if (rd->bad || rl == 0 || rl >= 32 || !(v >= 0)) return TD_EPROTO;
    char rname[32];
    memcpy(rname, rn, rl);
    rname[rl] = 0;
    int idx = td_node_res_index(n, rname);
    if (idx < 0) continue;
    wk->ntotal[idx] = wk->navail[idx] = v;
    if (o < (int)sizeof(line) - 48) o += snprintf(line + o, sizeof(line) - (size_t)o, " %s=%g", rname, v);
  }
  wk->joined = 1;
  n->links.nlinks++;
  char key[16];
  snprintf(key, sizeof(key), "%u", wk->node_index);
  td_persist_put("node", key, wk->name, strlen(wk->name));
  td_log("%s", line);
  fprintf(stderr, "tide: %s\n", line);
  uint32_t na = rd->p < rd->end ? td_rd_u32(rd) : 0;
  for (uint32_t i = 0; i < na && !rd->bad; i++) {
    uint64_t aid = td_rd_u64(rd);
    uint32_t attempt = td_rd_u32(rd);
    if (!rd->bad) td__adopt(n, wk, aid, attempt);
  }
  uint32_t port = rd->p < rd->end ? td_rd_u32(rd) : 0;
  if (port > 65535) return TD_EPROTO;
  if (wk->peer_host[0]) wk->peer_port = port;  /* other nodes may fetch from it */
  if (rd->bad) return TD_EPROTO;
  td__dp_advertise(n, wk);  /* the node fetches from the head's data plane */
  return 0;
}

/* Argument values the head sent with the work: each object made here holds
 * one ref (listed in made) until the work is submitted. */
static void td__node_task_args(td_node_t *n, td_rd_t *rd, const td_spec_t *s, uint32_t nd, uint64_t *made,
                               uint32_t *nmade) {
  for (uint32_t i = 0; i < nd; i++) {
    uint8_t kind = td_rd_u8(rd);
    uint32_t vl = 0;
    const uint8_t *vp = kind >= TD_V_LOST ? NULL : td_rd_str(rd, &vl);
    if (rd->bad || kind == TD_V_SHM || kind > TD_V_PULL) {
      rd->bad = 1;
      break;
    }
    if (td__obj(n, s->deps[i])) continue;
    if (kind == TD_V_PULL) {
      td_obj_t *o = td__foreign(n, s->deps[i], 0);
      if (!o) {
        rd->bad = 1;
        break;
      }
      o->refs++;
    } else if (kind == TD_V_LOST) {
      td__errblob(&n->tmp, "ObjectLostError", "an argument's object was lost before it reached this node");
      td__obj_from_bytes(n, s->deps[i], OBJ_ERROR, n->tmp.p, n->tmp.len);
    } else {
      td__obj_from_bytes(n, s->deps[i], kind == TD_V_ERROR ? OBJ_ERROR : OBJ_READY, vp, vl);
    }
    made[(*nmade)++] = s->deps[i];
  }
}

/* Runs the head's work here. The head places, retries and restarts; here
 * it just runs, and its results are kept for the head (td_fwd_t). A
 * submission that fails is answered with a failed DONE at once. */
static void td__node_task_run(td_node_t *n, td_wk_t *wk, td_spec_t *s, uint64_t htid, uint32_t attempt) {
  s->strategy = TD_ST_DEFAULT;
  s->pg_id = 0;
  s->max_restarts = 0;
  s->retry_exceptions = 0; /* the head sees the error and retries */
  const char *msg = NULL;
  n->tasks.submitter = wk->id; /* prints go back to the head, as this task's */
  n->tasks.submitter_task = htid;
  /* An actor's incarnation here is the head's: a restart on this node, in
   * the same worker, then tells the old one's exit from the new one's. */
  n->tasks.attempt_base = s->kind == TD_K_ACTOR_NEW && attempt > 0 ? attempt - 1 : 0;
  n->lineage.from_head = 1; /* the head keeps its lineage */
  int sub = s->kind == TD_K_ACTOR_CALL && !td_map_get(&n->actors.map, s->actor_id)
                ? (msg = "the actor is not on this node", TD_EINVAL)
                : td_node_submit(n, s, &msg);
  n->tasks.submitter = n->tasks.submitter_task = 0;
  n->tasks.attempt_base = 0;
  n->lineage.from_head = 0;
  if (sub != 0) {
    td__errblob(&n->tmp, s->kind == TD_K_ACTOR_CALL ? "ActorDiedError" : "TaskError", msg);
    td_chan_begin(&wk->ch, TD_M_DONE);
    td_buf_u64(&wk->ch.out, htid);
    td_buf_u8(&wk->ch.out, 0);
    td_buf_str(&wk->ch.out, n->tmp.p, n->tmp.len);
    td_chan_end(&wk->ch);
    return;
  }
  td_fwd_t *f = td_xcalloc(1, sizeof(*f));
  f->task = htid;
  f->kind = s->kind;
  f->nret = s->nret;
  f->actor = s->actor_id;
  uint32_t nr = s->nret < 0 ? 1 : (uint32_t)s->nret;
  f->rets = td_xmalloc(nr * 8 + 8);
  memcpy(f->rets, s->rets, nr * 8);
  td_map_set(&n->links.fwd, htid, f);
  for (uint32_t i = 0; i < nr; i++) {
    td_obj_t *o = td__obj(n, s->rets[i]);
    if (!o) continue;
    o->fwd = f;
    if (o->state != OBJ_PENDING) td__obj_wake(n, o);
  }
  if (s->kind == TD_K_ACTOR_NEW) {
    td_actor_t *a = td_map_get(&n->actors.map, s->actor_id);
    if (a) a->fwd_attempt = attempt, a->of_head = 1;
  }
}

int td__on_node_task(td_node_t *n, td_wk_t *wk, td_rd_t *rd) {
  if (wk != n->links.head) return TD_EPROTO;
  uint64_t htid = td_rd_u64(rd);
  uint32_t attempt = td_rd_u32(rd);
  td_spec_t s;
  uint64_t *scratch;
  const uint8_t *msg = rd->p - 12; /* the whole message, to park it */
  uint32_t msglen = (uint32_t)(rd->end - msg);
  if (td_spec_decode(&s, rd, &scratch)) {
    free(scratch);
    return TD_EPROTO;
  }
  char key[1024] = "";
  td__node_task_wd(n, &s, key, sizeof(key));
  if (key[0]) {
    free(scratch);
    td__node_task_park(n, wk, key, msg, msglen);
    return 0;
  }
  int rc = TD_EPROTO;
  if (td_rd_u8(rd)) {
    uint32_t bl;
    const uint8_t *blob = td_rd_str(rd, &bl);
    if (rd->bad) goto out;
    td_node_register_fn(n, s.fn_id, blob, bl);
  }
  uint32_t nd = td_rd_u32(rd);
  if (rd->bad || nd != s.ndeps || td_map_get(&n->links.fwd, htid)) goto out;
  uint64_t *made = td_xmalloc((size_t)nd * 8 + 8);
  uint32_t nmade = 0;
  td__node_task_args(n, rd, &s, nd, made, &nmade);
  if (!rd->bad) {
    rc = 0;
    td__node_task_run(n, wk, &s, htid, attempt);
  }
  for (uint32_t i = 0; i < nmade; i++) td_node_decref(n, made[i]);
  free(made);
out:
  free(scratch);
  return rc;
}

/* Node: one return value for the head, with the contained objects made
 * here (the head has no other way to reach them). */
static void td__put_link_value(td_node_t *n, td_buf_t *b, td_obj_t *o) {
  td__put_value(n, b, o->id, 0, 2);
  if (o->state == OBJ_READY && o->len > TD_CHUNK) {  /* kept until the head has fetched it */
    td_buf_u64(b, o->id);
    td_node_incref_for(n, n->links.head, o->id); /* given back if the head dies first */
  }
  td_buf_u32(b, o->ncontained);
  td_buf_put(b, o->contained, (size_t)o->ncontained * 8);
  uint32_t at = (uint32_t)b->len, cnt = 0;
  td_buf_u32(b, 0);
  for (uint32_t i = 0; i < o->ncontained; i++) {
    td_obj_t *c = td__obj(n, o->contained[i]);
    if (!c || c->state != OBJ_READY || td__obj_resident(n, c) != 0) continue;
    td_buf_u64(b, c->id);
    td__put_value(n, b, c->id, 0, 1);
    cnt++;
  }
  memcpy(b->p + at, &cnt, 4);
  td__export(n, o->contained, o->ncontained);
}

static void td__fwd_end(td_node_t *n, td_fwd_t *f) {
  uint32_t nr = f->nret < 0 ? 1 : (uint32_t)f->nret;
  td_map_del(&n->links.fwd, f->task);
  for (uint32_t i = 0; i < nr; i++) {
    td_obj_t *o = td__obj(n, f->rets[i]);
    if (o && o->fwd == f) o->fwd = NULL;
    if (o) td_node_decref(n, f->rets[i]);
  }
  free(f->rets);
  free(f);
}

void td__link_fail(td_node_t *n, uint64_t task, const uint8_t *blob, size_t len) {
  td_chan_begin(&n->links.head->ch, TD_M_DONE);
  td_buf_u64(&n->links.head->ch.out, task);
  td_buf_u8(&n->links.head->ch.out, 0);
  td_buf_str(&n->links.head->ch.out, blob, len);
  td_chan_end(&n->links.head->ch);
}

/* Node: sends the head what finished of its work. */
void td__fwd_flush(td_node_t *n) {
  uint32_t cnt = n->links.nfwd_ready;
  uint64_t *ids = n->links.fwd_ready;
  n->links.fwd_ready = NULL;
  n->links.nfwd_ready = n->links.capfwd_ready = 0;
  for (uint32_t k = 0; k < cnt; k++) {
    td_obj_t *o = td__obj(n, ids[k]);
    td_fwd_t *f = o ? o->fwd : NULL;
    if (!f || !n->links.head) continue;
    td_buf_t *b = &n->links.head->ch.out;
    if (f->nret < 0) {
      /* A stream: its new items, then its end (or the error that ended it). */
      int failed = 0;
      for (; f->items_sent < o->nitems && !failed; f->items_sent++) {
        td_obj_t *it = td__obj(n, o->items[f->items_sent]);
        if (it && it->state == OBJ_ERROR) {
          td__link_fail(n, f->task, it->data, it->len);
          failed = 1;
          break;
        }
        if (!it) continue;
        td_chan_begin(&n->links.head->ch, TD_M_ITEM);
        td_buf_u64(b, f->task);
        td_buf_u64(b, it->id);
        td__put_value(n, b, it->id, 0, 1);
        td_buf_u32(b, 0);
        td_chan_end(&n->links.head->ch);
      }
      if (failed || o->stream_done) {
        if (!failed) {
          td_chan_begin(&n->links.head->ch, TD_M_DONE);
          td_buf_u64(b, f->task);
          td_buf_u8(b, 1);
          td_buf_u32(b, 0);
          td_chan_end(&n->links.head->ch);
        }
        td__fwd_end(n, f);
      }
      continue;
    }
    uint32_t nr = (uint32_t)f->nret;
    td_obj_t *err = NULL;
    int pending = 0;
    for (uint32_t i = 0; i < nr; i++) {
      td_obj_t *r = td__obj(n, f->rets[i]);
      if (!r || r->state == OBJ_PENDING) pending = 1;
      else if (r->state == OBJ_ERROR && !err) err = r;
    }
    if (pending) continue;
    if (f->kind == TD_K_ACTOR_NEW) {
      /* Ready; a failed init reaches the head as the actor's exit. */
      if (!err) {
        td_chan_begin(&n->links.head->ch, TD_M_ACTOR_READY);
        td_buf_u64(b, f->actor);
        td_chan_end(&n->links.head->ch);
      }
    } else if (err) {
      td__link_fail(n, f->task, err->data, err->len);
    } else {
      td_chan_begin(&n->links.head->ch, TD_M_DONE);
      td_buf_u64(b, f->task);
      td_buf_u8(b, 1);
      td_buf_u32(b, nr);
      for (uint32_t i = 0; i < nr; i++) td__put_link_value(n, b, td__obj(n, f->rets[i]));
      td_chan_end(&n->links.head->ch);
    }
    td__fwd_end(n, f);
  }
  free(ids);
  if (n->links.head && n->links.head->ch.out.len > (256u << 10)) td_chan_flush(&n->links.head->ch);
}

void td__fwd_note(td_node_t *n, uint64_t id) {
  if (n->links.nfwd_ready == n->links.capfwd_ready) {
    n->links.capfwd_ready = n->links.capfwd_ready ? n->links.capfwd_ready * 2 : 64;
    n->links.fwd_ready = td_xrealloc(n->links.fwd_ready, n->links.capfwd_ready * 8);
  }
  n->links.fwd_ready[n->links.nfwd_ready++] = id;
}

void td__head_lost(td_node_t *n) {
  n->links.rejoin_until = td_now() + TD_HEAD_WAIT;
  size_t it = 0, k = 0;
  void *v;
  td_fwd_t **fs = td_xmalloc((size_t)n->links.fwd.len * sizeof(*fs) + 8);
  while (td_map_next(&n->links.fwd, &it, NULL, &v)) fs[k++] = v;
  for (size_t i = 0; i < k; i++) td__fwd_end(n, fs[i]);
  free(fs);
  /* Its actors here (each has fwd_attempt set when created for it); the
   * detached ones live on, for a restarted head to adopt (td__adopt). */
  uint64_t *actors = td_xmalloc((size_t)n->actors.map.len * 8 + 8);
  uint32_t na = 0;
  td_actor_t *a;
  it = 0;
  while (td_map_next(&n->actors.map, &it, NULL, (void **)&a))
    if (a->fwd_attempt && a->state != A_DEAD && !(a->create && a->create->spec.detached)) actors[na++] = a->id;
  n->links.head = NULL;
  for (uint32_t i = 0; i < na; i++) td_node_kill_actor(n, actors[i], 1);
  free(actors);
  td__parked_drop(n);  /* its work waiting for packages goes too */
}

/* Records of other nodes' objects that nobody here wants any more and no
 * fetch is bringing: td__unref frees them when their last reference
 * goes, but a fetch that ended without its value (its source died, the
 * head directed it elsewhere) could leave one behind for ever, holding a
 * ref on the node that has the value (seen under kill -9 chaos).  Freed
 * here, as td__unref would have, at most 64 a pass. */
static void td__sweep_foreign(td_node_t *n) {
  size_t it = 0, k = 0;
  td_obj_t *o;
  uint64_t ids[64];
  while (k < 64 && td_map_next(&n->objs.map, &it, NULL, (void **)&o))
    if (o->refs <= 0 && !o->nwaiters && o->state == OBJ_PENDING && o->foreign && !o->pulling && !o->chunked)
      ids[k++] = o->id;
  for (size_t i = 0; i < k; i++) {
    o = td__obj(n, ids[i]);
    if (o) td__obj_free(n, o);
  }
}

/* Heartbeats both ways; a link silent past the timeout is dead. */
void td__cluster_tick(td_node_t *n, double now) {
  td__dp_tick(n, now);
  n->links.room_at = now;
  td__room_tick(n);
  if (n->links.waitsubs) td__waitsubs_check(n, now);
  if (n->xfer.nppull) td__ppull_check(n, NULL, now);
  int beat = now - n->links.beat_at >= 1.0;
  if (beat) n->links.beat_at = now;
  if (beat && n->objs.map.len && (uint64_t)now % 5 == 0) td__sweep_foreign(n);
  for (int i = 0; i < n->procs.n; i++) {
    td_wk_t *w = n->procs.list[i];
    if ((w->kind != WK_NODE && w->kind != WK_HEAD) || w->dead) continue;
    if (now - w->last_seen > n->links.node_timeout) {
      char why[160];
      if (w->last_seen == 0)
        snprintf(why, sizeof(why), "restarted and no longer knows this node");
      else
        snprintf(why, sizeof(why), "sent no heartbeat for %.1f s", now - w->last_seen);
      td__wk_dead(n, w, why);
      i = -1;  /* the list changed */
      continue;
    }
    if (beat && (w->joined || w->kind == WK_HEAD)) {
      td_chan_begin(&w->ch, TD_M_BEAT);
      if (w->kind == WK_HEAD) {  /* a node tells its head how it is doing */
        td_node_stats_t st;
        td_node_stats(n, &st);
        td_buf_u32(&w->ch.out, (uint32_t)st.workers);
        td_buf_u32(&w->ch.out, (uint32_t)st.actors);
        td_buf_u32(&w->ch.out, (uint32_t)st.tasks_running);
        td_buf_u32(&w->ch.out, (uint32_t)st.tasks_queued);
        td_buf_u64(&w->ch.out, st.objects);
        td_buf_u64(&w->ch.out, st.store_used);
        td_buf_u64(&w->ch.out, st.store_capacity);
        td_buf_u64(&w->ch.out, st.spilled_bytes);
        td_buf_u64(&w->ch.out, st.bytes_sent);
        td_buf_u64(&w->ch.out, st.bytes_from_peers);
        td_buf_u64(&w->ch.out, st.inline_bytes);
      }
      td_chan_end(&w->ch);
    }
  }
}

int td_link_join_start(td_link_join_t *j, int fd, uint32_t want) {
  td_chan_init(&j->c, fd);
  td_chan_begin(&j->c, TD_M_JOIN);
  td_buf_u32(&j->c.out, want);
  td_chan_end(&j->c);
  return td_chan_flush_all(&j->c) ? TD_EIO : 0;
}

int td_link_join_poll(td_link_join_t *j, uint32_t *index) {
  struct pollfd pfd = {j->c.fd, POLLIN, 0};
  if (poll(&pfd, 1, 0) <= 0) return TD_ETIMEDOUT;
  if (td_chan_read(&j->c)) return TD_EIO;
  uint8_t type;
  const uint8_t *p;
  uint32_t len;
  int got;
  while ((got = td_chan_next(&j->c, &type, &p, &len)) == 1) {
    if (type != TD_M_WELCOME) continue; /* the node's HELLO to a client */
    td_rd_t rd;
    td_rd_init(&rd, p, len);
    *index = td_rd_u32(&rd);
    return rd.bad || !*index ? TD_EPROTO : 0;
  }
  return got < 0 ? TD_EPROTO : TD_ETIMEDOUT;
}

void td_link_join_end(td_link_join_t *j) {
  j->c.fd = -1;
  td_chan_close(&j->c);
}

int td_link_handshake(int fd, uint32_t want, uint32_t *index, double timeout) {
  td_link_join_t j;
  int rc = td_link_join_start(&j, fd, want);
  double deadline = td_now() + timeout;
  if (rc == 0) rc = td_link_join_poll(&j, index);
  while (rc == TD_ETIMEDOUT && td_now() < deadline) {
    struct pollfd pfd = {fd, POLLIN, 0};
    poll(&pfd, 1, (int)((deadline - td_now()) * 1000) + 1);
    rc = td_link_join_poll(&j, index);
  }
  td_link_join_end(&j);
  return rc;
}

int td_node_link_head(td_node_t *n, int fd) {
  if (n->links.head) return TD_EINVAL;
  fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
  td_wk_t *wk = td__wk_add(n, td__new_wk_id(n), WK_HEAD, fd);
  td__link_chan(wk);
  wk->remote = 1;
  wk->last_seen = td_now();
  n->links.head = wk;
  td_chan_begin(&wk->ch, TD_M_NODE_INFO);
  td_buf_str(&wk->ch.out, n->links.name, strlen(n->links.name));
  td_buf_u32(&wk->ch.out, (uint32_t)n->sched.nres);
  for (int i = 0; i < n->sched.nres; i++) {
    td_buf_str(&wk->ch.out, n->sched.resname[i], strlen(n->sched.resname[i]));
    td_buf_f64(&wk->ch.out, n->sched.total[i]);
  }
  /* Detached actors an earlier head placed here, still running. */
  size_t at = wk->ch.out.len, it = 0;
  uint32_t na = 0;
  td_actor_t *a;
  td_buf_u32(&wk->ch.out, 0);
  while (td_map_next(&n->actors.map, &it, NULL, (void **)&a)) {
    if (!a->fwd_attempt || a->state != A_ALIVE) continue;
    td_buf_u64(&wk->ch.out, a->id);
    td_buf_u32(&wk->ch.out, a->fwd_attempt);
    na++;
  }
  memcpy(wk->ch.out.p + at, &na, 4);
  td_buf_u32(&wk->ch.out, (uint32_t)n->xfer.peer_port);
  td_chan_end(&wk->ch);
  td__dp_advertise(n, wk);
  td_chan_flush(&wk->ch);
  return 0;
}

void td_node_set_peering(td_node_t *n, int port, td_peer_open_cb open, td_peer_close_cb close, void *ud) {
  n->xfer.peer_port = port;
  n->xfer.peer_open = open;
  n->xfer.peer_close = close;
  n->xfer.peer_ud = ud;
}

int td_node_linked(td_node_t *n) { return n->links.head != NULL; }

uint32_t td_node_index(td_node_t *n) { return n->links.index; }

/* This machine's address as other machines would see it: its first
 * IPv4 address that is up and not loopback, else loopback. */
static const char *td__host_address(void) {
  static char addr[INET_ADDRSTRLEN];
  if (addr[0]) return addr;
  snprintf(addr, sizeof(addr), "127.0.0.1");
  struct ifaddrs *ifs, *i;
  if (getifaddrs(&ifs) != 0) return addr;
  for (i = ifs; i; i = i->ifa_next) {
    if (!i->ifa_addr || i->ifa_addr->sa_family != AF_INET || !(i->ifa_flags & IFF_UP) ||
        (i->ifa_flags & IFF_LOOPBACK))
      continue;
    inet_ntop(AF_INET, &((struct sockaddr_in *)i->ifa_addr)->sin_addr, addr, sizeof(addr));
    break;
  }
  freeifaddrs(ifs);
  return addr;
}

int td_node_cluster(td_node_t *n, td_node_info_t *out, int max) {
  int k = 0;
  if (max < 1) return 0;
  td_node_stats_t st;
  td_node_stats(n, &st);
  td_node_links_t *l = &n->links;
  out[k++] = (td_node_info_t){l->index,
                              l->name,
                              td__host_address(),
                              1,
                              n->sched.total,
                              n->sched.avail,
                              st.tasks_running,
                              st.actors,
                              st,
                              1,
                              0};
  double now = td_now();
  for (int i = 0; i < n->procs.n && k < max; i++) {
    td_wk_t *w = n->procs.list[i];
    if (w->kind != WK_NODE || !w->joined || w->dead) continue;
    /* A node on this machine comes from loopback (or a unix socket). */
    const char *a = w->peer_host[0] && strcmp(w->peer_host, "127.0.0.1") && strcmp(w->peer_host, "::1")
                      ? w->peer_host : td__host_address();
    out[k++] = (td_node_info_t){w->node_index, w->name, a, 1, w->ntotal, w->navail, w->inflight.len,
                                w->nactors, w->nstats, w->has_nstats, now - w->last_seen};
  }
  return k;
}

/* -- Messages (node.c's table dispatches them) ------------------------------ */

/* Head: a node's heartbeat and figures; a client that beats is a node of an
 * earlier head, told to join again. */
int td__on_beat(td_node_t *n, td_wk_t *wk, td_rd_t *rd) {
  (void)n;
  if (wk->kind == WK_NODE && rd->end - rd->p >= 48) {
    td_node_stats_t *st = &wk->nstats;
    st->workers = (int)td_rd_u32(rd);
    st->actors = (int)td_rd_u32(rd);
    st->tasks_running = (int)td_rd_u32(rd);
    st->tasks_queued = (int)td_rd_u32(rd);
    st->objects = td_rd_u64(rd);
    st->store_used = td_rd_u64(rd);
    st->store_capacity = td_rd_u64(rd);
    st->spilled_bytes = td_rd_u64(rd);
    st->bytes_sent = rd->p < rd->end ? td_rd_u64(rd) : 0;
    st->bytes_from_peers = rd->p < rd->end ? td_rd_u64(rd) : 0;
    st->inline_bytes = rd->p < rd->end ? td_rd_u64(rd) : 0;
    wk->has_nstats = !rd->bad;
  }
  if (wk->kind == WK_CLIENT) {
    td_chan_begin(&wk->ch, TD_M_WELCOME);
    td_buf_u32(&wk->ch.out, 0);
    td_chan_end(&wk->ch);
  }
  return 0;
}

/* -- Notes (node.h) ------------------------------------------------------------ */

#define TD_NOTE_TOPIC 16
#define TD_NOTE_MAX 8 /* topics kept per node */
#define TD_NOTE_BYTES (1u << 20)

typedef struct td_note {
  char topic[TD_NOTE_TOPIC];
  uint8_t *p;
  size_t len;
} td_note_t;

int td_node_note_head(td_node_t *n, const char *topic, const void *p, size_t len) {
  td_wk_t *h = n->links.head;
  if (!h || h->dead || strlen(topic) >= TD_NOTE_TOPIC || len > TD_NOTE_BYTES) return TD_ENOTFOUND;
  td_chan_begin(&h->ch, TD_M_NOTE);
  td_buf_str(&h->ch.out, topic, strlen(topic));
  td_buf_str(&h->ch.out, p, len);
  td_chan_end(&h->ch);
  return 0;
}

void td_node_notes(td_node_t *n, const char *topic, td_note_cb cb, void *ud) {
  for (int i = 0; i < n->procs.n; i++) {
    td_wk_t *w = n->procs.list[i];
    if (w->kind != WK_NODE || w->dead) continue;
    for (uint32_t k = 0; k < w->nnotes; k++)
      if (!strcmp(w->notes[k].topic, topic)) cb(ud, w->node_index, w->name, w->notes[k].p, w->notes[k].len);
  }
}

void td__notes_free(td_wk_t *wk) {
  for (uint32_t k = 0; k < wk->nnotes; k++) free(wk->notes[k].p);
  free(wk->notes);
  wk->notes = NULL;
  wk->nnotes = 0;
}

/* Head: a node's note replaces its last one under the same topic. */
int td__on_note(td_node_t *n, td_wk_t *wk, td_rd_t *rd) {
  (void)n;
  uint32_t tl, l;
  const uint8_t *t = td_rd_str(rd, &tl);
  const uint8_t *p = td_rd_str(rd, &l);
  if (rd->bad || tl == 0 || tl >= TD_NOTE_TOPIC || l > TD_NOTE_BYTES) return TD_EPROTO;
  uint32_t k = 0;
  while (k < wk->nnotes && (strlen(wk->notes[k].topic) != tl || memcmp(wk->notes[k].topic, t, tl))) k++;
  if (k == wk->nnotes) {
    if (l == 0) return 0;
    if (k == TD_NOTE_MAX) return 0; /* a node with more topics than that keeps its first ones */
    wk->notes = td_xrealloc(wk->notes, (k + 1) * sizeof(td_note_t));
    memset(&wk->notes[k], 0, sizeof(td_note_t));
    memcpy(wk->notes[k].topic, t, tl);
    wk->nnotes++;
  }
  td_note_t *nt = &wk->notes[k];
  free(nt->p);
  nt->p = NULL;
  nt->len = 0;
  if (l == 0) {
    *nt = wk->notes[--wk->nnotes];
    return 0;
  }
  nt->p = td_xmalloc(l);
  memcpy(nt->p, p, l);
  nt->len = l;
  return 0;
}

/* Node: index 0 means the head restarted and does not know this node. */
int td__on_welcome(td_node_t *n, td_wk_t *wk, td_rd_t *rd) {
  (void)n;
  if (td_rd_u32(rd) == 0) wk->last_seen = 0;
  return 0;
}

/* Node: the head cancels a task it sent here. */
int td__on_cancel(td_node_t *n, td_wk_t *wk, td_rd_t *rd) {
  (void)wk;
  uint64_t htid = td_rd_u64(rd);
  uint8_t force = td_rd_u8(rd);
  td_fwd_t *f = rd->bad ? NULL : td_map_get(&n->links.fwd, htid);
  if (f) td_node_cancel(n, f->rets[0], force & TD_CANCEL_FORCE);
  return rd->bad ? TD_EPROTO : 0;
}

/* A job ended: its driver (id job) left this node, or a link says so
 * (from). Its tasks and non-detached actors here go (task.c, actor.c),
 * and so do those on every other node: the head tells each node, a node
 * its head, so a task tree that spread over the cluster goes whole. */
void td__job_end(td_node_t *n, uint64_t job, td_wk_t *from) {
  td__tasks_job_end(n, job);
  td__actors_job_end(n, job);
  td__tell_cluster(n, from, TD_M_JOB_END, job, -1);
}

/* Tells the rest of the cluster something about id (u64 id, then u8 flags
 * unless flags < 0): a head tells every node, a node its head; not `from`,
 * which told us. */
void td__tell_cluster(td_node_t *n, td_wk_t *from, uint8_t type, uint64_t id, int flags) {
  for (int i = 0; i < n->procs.n; i++) {
    td_wk_t *w = n->procs.list[i];
    if (w == from || w->dead || td__wk_ghost(w) || (w->kind != WK_NODE && w != n->links.head)) continue;
    td_chan_begin(&w->ch, type);
    td_buf_u64(&w->ch.out, id);
    if (flags >= 0) td_buf_u8(&w->ch.out, (uint8_t)flags);
    td_chan_end(&w->ch);
  }
}

int td__on_job_end(td_node_t *n, td_wk_t *wk, td_rd_t *rd) {
  uint64_t job = td_rd_u64(rd);
  if (rd->bad || !job) return TD_EPROTO;
  td__job_end(n, job, wk); /* not told back; a node's only link on is to its head */
  return 0;
}

/* A link between this node and another died (not a ghost: see
 * td__wk_ghost): the objects that were there are lost or fetched again;
 * a head counts the node gone, and waits a while for it to come back; a
 * node has lost its head. */
void td__link_dead(td_node_t *n, td_wk_t *wk) {
  td__link_lost_objects(n, wk);
  if (wk->kind == WK_NODE) {
    n->links.nlinks--;
    if (!n->links.gone_at) n->links.gone_at = td_xcalloc(TD_NODE_MAX + 1, sizeof(double));
    n->links.gone_at[wk->node_index] = td_now();
    td__settle(n, wk->ntotal); /* it may be restarted: work only it could run waits a while */
  } else if (n->links.head == wk) {
    td__head_lost(n);
  }
}
