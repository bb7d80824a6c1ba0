/* Placement groups (node_int.h): bundles reserved atomically over the
 * nodes (PACK, SPREAD, STRICT_PACK, STRICT_SPREAD), released with their
 * actors and tasks, kept by a head with a store (detached groups) and
 * placed again after a restart, where their detached actors are adopted. */
#include "node_int.h"

#include <assert.h>

const td_code_t td_pg_strategy_codes[] = {{"PACK", TD_PG_PACK},
                                          {"SPREAD", TD_PG_SPREAD},
                                          {"STRICT_PACK", TD_PG_STRICT_PACK},
                                          {"STRICT_SPREAD", TD_PG_STRICT_SPREAD},
                                          {NULL, 0}};

/* The pool of resources of the node with index idx (this one or a link). */
static double *td__node_pool(td_node_t *n, uint32_t idx) {
  if (idx == n->links.index) return n->sched.avail;
  td_wk_t *w = td__link(n, idx);
  return w ? w->navail : NULL;
}

static int td__bundle_fits(td_node_t *n, const double *pool, const double *bundle) {
  for (int i = 0; i < n->sched.nres; i++)
    if (pool[i] + 1e-9 < bundle[i]) return 0;
  return 1;
}

int td__try_pg(td_node_t *n, td_pg_t *pg) {
  if (pg->created || pg->removed) return 0;
  /* Restored: placed once its nodes had time to rejoin and report the
   * actors they still run in it (their bundles go to those nodes). */
  if (pg->holds_ready && td_now() < n->actors.adopt_until) return 0;
  int k = 1 + n->links.nlinks, c;
  uint32_t *idx = td_xmalloc((size_t)k * sizeof(uint32_t));
  double (*av)[TD_NRES_MAX] = td_xmalloc((size_t)k * sizeof(*av));
  int *used = td_xcalloc((size_t)k, sizeof(int)), *at = td_xmalloc((size_t)pg->nb * sizeof(int) + 1);
  idx[0] = n->links.index;
  memcpy(av[0], n->sched.avail, sizeof(av[0]));
  k = 1;
  for (int i = 0; i < n->procs.n; i++) {
    td_wk_t *w = n->procs.list[i];
    if (w->kind != WK_NODE || !w->joined || w->dead) continue;
    idx[k] = w->node_index;
    memcpy(av[k++], w->navail, sizeof(av[0]));
  }
  int ok = 1;
  int strict_pack = pg->strategy == TD_PG_STRICT_PACK, pack = pg->strategy == TD_PG_PACK;
  /* After a node died, only its bundles are placed again, around the rest
   * (where[b] == TD__NOWHERE marks them). */
  int repair = pg->where != NULL, home = -1, left = 0;
  for (int b = 0; repair && b < pg->nb; b++) left += pg->where[b] != TD__NOWHERE;
  if (repair && !left) {  /* every bundle was lost: place it afresh */
    free(pg->where);
    pg->where = NULL;
    repair = 0;
  }
  for (int b = 0; repair && b < pg->nb; b++) {
    at[b] = -1;
    if (pg->where[b] == TD__NOWHERE) continue;
    for (c = 0; c < k && idx[c] != pg->where[b]; c++) {}
    at[b] = c < k ? c : -1;
    if (c < k) used[c] = 1, home = c;
  }
  if (repair && strict_pack && home >= 0) {
    for (int b = 0; b < pg->nb && ok; b++) {
      if (pg->where[b] != TD__NOWHERE) continue;
      if (!td__bundle_fits(n, av[home], pg->total[b])) ok = 0;
      for (int i = 0; ok && i < n->sched.nres; i++) av[home][i] -= pg->total[b][i];
      at[b] = home;
    }
    goto decided;
  }
  if ((strict_pack || pack) && !repair) {
    /* All on one node when some node has room for the sum (the node a
     * restored group's bundles were on, first). */
    double need[TD_NRES_MAX] = {0};
    for (int b = 0; b < pg->nb; b++)
      for (int i = 0; i < n->sched.nres; i++) need[i] += pg->total[b][i];
    c = k;
    for (int b = 0; b < pg->nb && pg->hint && c == k; b++) {
      if (!pg->hint[b]) continue;
      for (c = 0; c < k && !(idx[c] + 1 == pg->hint[b] && td__bundle_fits(n, av[c], need)); c++) {}
    }
    if (c == k)
      for (c = 0; c < k && !td__bundle_fits(n, av[c], need); c++) {}
    if (c < k) {
      for (int b = 0; b < pg->nb; b++) at[b] = c;
    } else if (strict_pack) {
      ok = 0;
    }
    if (c < k || strict_pack) goto decided;
  }
  for (int b = 0; b < pg->nb && ok; b++) {
    int pick = -1;
    if (repair && pg->where[b] != TD__NOWHERE) continue;
    /* A restored group's bundle: the node it was on, first. */
    for (c = 0; pg->hint && pg->hint[b] && c < k && pick < 0; c++)
      if (idx[c] + 1 == pg->hint[b] && td__bundle_fits(n, av[c], pg->total[b])) pick = c;
    /* SPREAD and STRICT_SPREAD: a node no other bundle has, first. */
    if (!pack && pick < 0)
      for (c = 0; c < k && pick < 0; c++)
        if (!used[c] && td__bundle_fits(n, av[c], pg->total[b])) pick = c;
    if (pick < 0 && pg->strategy != TD_PG_STRICT_SPREAD)
      for (c = 0; c < k && pick < 0; c++)
        if (td__bundle_fits(n, av[c], pg->total[b])) pick = c;
    if (pick < 0) { ok = 0; break; }
    at[b] = pick;
    used[pick] = 1;
    for (int i = 0; i < n->sched.nres; i++) av[pick][i] -= pg->total[b][i];
  }
decided:
  if (ok) {
    if (!repair) pg->where = td_xmalloc((size_t)pg->nb * sizeof(uint32_t));
    for (int b = 0; b < pg->nb; b++) {
      if (repair && pg->where[b] != TD__NOWHERE) continue;
      pg->where[b] = idx[at[b]];
      double *pool = td__node_pool(n, pg->where[b]);
      for (int i = 0; i < n->sched.nres; i++) pool[i] -= pg->total[b][i];
    }
    pg->created = 1;
    td__pg_adopt(n, pg);
    td_obj_t *o = td__obj(n, pg->ready_id);
    if (o) {
      uint8_t t = TD_T_TRUE;
      td__obj_set(n, o, OBJ_READY, 0, &t, 1, 0, NULL, 0);
    }
  }
  free(idx);
  free(av);
  free(used);
  free(at);
  return ok;
}

/* A detached group's row in head.db: strategy, name and bundles by
 * resource name (indices are given anew at each start). */
static void td__persist_pg(td_node_t *n, const td_pg_t *pg) {
  if (!td_persist_on()) return;
  td_buf_t b;
  td_buf_init(&b);
  td_buf_u32(&b, (uint32_t)pg->strategy);
  td_buf_str(&b, pg->name, strlen(pg->name));
  td_buf_u32(&b, (uint32_t)pg->nb);
  for (int i = 0; i < pg->nb; i++) {
    size_t at = b.len;
    uint32_t k = 0;
    td_buf_u32(&b, 0);
    for (int r = 0; r < n->sched.nres; r++) {
      if (pg->total[i][r] <= 0) continue;
      td_buf_str(&b, n->sched.resname[r], strlen(n->sched.resname[r]));
      td_buf_f64(&b, pg->total[i][r]);
      k++;
    }
    memcpy(b.p + at, &k, 4);
  }
  char key[24];
  snprintf(key, sizeof(key), "%016llx", (unsigned long long)pg->id);
  td_persist_put("pg", key, b.p, b.len);
  td_buf_free(&b);
}

static td_pg_t *td__pg_new(td_node_t *n, uint64_t id, int nb, const double (*bundles)[TD_NRES_MAX],
                           int strategy, const char *name, int detached) {
  td_pg_t *pg = td_xcalloc(1, sizeof(*pg));
  pg->id = id;
  pg->nb = nb;
  pg->strategy = strategy;
  pg->total = td_xcalloc((size_t)nb, sizeof(*pg->total));
  pg->avail = td_xcalloc((size_t)nb, sizeof(*pg->avail));
  memcpy(pg->total, bundles, (size_t)nb * sizeof(*pg->total));
  memcpy(pg->avail, bundles, (size_t)nb * sizeof(*pg->avail));
  snprintf(pg->name, sizeof(pg->name), "%s", name ? name : "");
  pg->detached = (uint8_t)(detached != 0);
  pg->owner = !detached && n->procs.rpc_wk && n->procs.rpc_wk->kind == WK_CLIENT ? n->procs.rpc_wk->id : 0;
  pg->ready_id = td_node_new_id(n);
  td_obj_t *o = td__obj_new(n, pg->ready_id);
  o->refs = 1;
  pg->next = n->pgs.list;
  n->pgs.list = pg;
  return pg;
}

int td_node_pg_create(td_node_t *n, int nb, const double (*bundles)[TD_NRES_MAX], int strategy,
                      const char *name, int detached, uint64_t *pg_id, uint64_t *ready_id) {
  assert(strategy >= 0 && strategy < TD_PG_COUNT); /* the caller checks a user's strategy */
  td_pg_t *pg = td__pg_new(n, td_node_new_id(n), nb, bundles, strategy, name, detached);
  if (detached) td__persist_pg(n, pg);
  *pg_id = pg->id;
  *ready_id = pg->ready_id;
  td__try_pg(n, pg);
  return 0;
}

/* A restarted head reserves its detached groups again, under their ids
 * and names; they are ready once their nodes are back. */
void td__restore_pg(void *ud, const char *key, const void *val, size_t len) {
  td_node_t *n = ud;
  td_rd_t rd;
  td_rd_init(&rd, val, len);
  int strategy = (int)td_rd_u32(&rd);
  uint32_t nl, nb;
  const uint8_t *name = td_rd_str(&rd, &nl);
  nb = td_rd_u32(&rd);
  double (*b)[TD_NRES_MAX] = NULL;
  int ok = !rd.bad && nb > 0 && nb <= 1024 && nl < 64 && strategy >= 0 && strategy < TD_PG_COUNT;
  if (ok) b = td_xcalloc(nb, sizeof(*b));
  for (uint32_t i = 0; ok && i < nb; i++) {
    uint32_t k = td_rd_u32(&rd);
    for (uint32_t j = 0; ok && j < k; j++) {
      uint32_t rl;
      const uint8_t *r = td_rd_str(&rd, &rl);
      double v = td_rd_f64(&rd);
      char rname[32];
      ok = !rd.bad && rl > 0 && rl < sizeof(rname);
      if (!ok) break;
      memcpy(rname, r, rl);
      rname[rl] = 0;
      int idx = td_node_res_index(n, rname);
      if (idx >= 0) b[i][idx] = v;
    }
  }
  if (!ok) {
    fprintf(stderr, "tide: dropping persisted placement group %s: unreadable\n", key);
    td_persist_put("pg", key, NULL, 0);
    free(b);
    return;
  }
  char nm[64];
  memcpy(nm, name, nl);
  nm[nl] = 0;
  uint64_t id = strtoull(key, NULL, 16);
  /* The node's own ids go on past it (the worker ids' store does not cover them). */
  if (td_id_node(id) == td_id_node(n->objs.next_seq) && id > n->objs.next_seq) n->objs.next_seq = id;
  td_pg_t *pg = td__pg_new(n, id, (int)nb, (const double (*)[TD_NRES_MAX])b, strategy, nm, 1);
  pg->holds_ready = 1;
  pg->hint = td_xcalloc(nb, sizeof(uint32_t));
  free(b);
  fprintf(stderr, "tide: restoring detached placement group %s%s%s\n", key, nm[0] ? " " : "", nm);
}

int td_node_pg_remove(td_node_t *n, uint64_t pg_id) {
  td_pg_t **pp = &n->pgs.list, *pg;
  while ((pg = *pp) && pg->id != pg_id) pp = &pg->next;
  if (!pg) return TD_ENOTFOUND;
  if (pg->created)
    for (int b = 0; b < pg->nb; b++) {
      double *pool = td__node_pool(n, pg->where[b]);  /* NULL: that node died */
      for (int i = 0; pool && i < n->sched.nres; i++) pool[i] += pg->total[b][i];
    }
  /* Work still running in it keeps its worker; its lease returns nowhere. */
  for (int i = 0; i < n->procs.n; i++)
    if (n->procs.list[i]->lease_pg == pg_id) n->procs.list[i]->lease_pg = UINT64_MAX;
  td_obj_t *o = td__obj(n, pg->ready_id);
  if (o && o->state == OBJ_PENDING) {
    td__errblob(&n->tmp, "TaskCancelledError", "the placement group was removed");
    td__obj_fail(n, o, n->tmp.p, n->tmp.len);
  }
  if (o && pg->holds_ready) td__unref(n, o, 1);
  if (pg->detached) {
    char key[24];
    snprintf(key, sizeof(key), "%016llx", (unsigned long long)pg->id);
    td_persist_put("pg", key, NULL, 0);
  }
  *pp = pg->next;
  pg->removed = 1;
  td__pg_adopt(n, pg);  /* its actors still running, not adopted yet, are ended */
  free(pg->total);
  free(pg->avail);
  free(pg->where);
  free(pg->hint);
  free(pg);
  /* Work queued for the group can never run now. */
  td_task_t *t = n->sched.queue.head;
  while (t) {
    td_task_t *next = t->next;
    if (t->spec.pg_id == pg_id) {
      tq_del(&n->sched.queue, t);
      if (t->spec.kind == TD_K_ACTOR_NEW) {
        t->state = T_DONE;
        td__actor_die(n, t->actor, "its placement group was removed");
      } else {
        td__task_fail(n, t, "TaskError", "its placement group was removed");
      }
    }
    t = next;
  }
  /* What runs in it ends, as in Ray: its actors are killed, its running
   * tasks cancelled. */
  size_t it = 0, k = 0, cap = n->actors.map.len + n->tasks.map.len;
  uint64_t *ids = td_xmalloc(cap * 8 + 8);
  td_actor_t *a;
  while (td_map_next(&n->actors.map, &it, NULL, (void **)&a))
    if (a->state != A_DEAD && a->create && a->create->spec.pg_id == pg_id) ids[k++] = a->id;
  for (size_t i = 0; i < k; i++) td__kill_actor(n, ids[i], 1, "killed: its placement group was removed");
  k = 0;
  it = 0;
  while (td_map_next(&n->tasks.map, &it, NULL, (void **)&t))
    if (t->state == T_SENT && t->spec.kind == TD_K_TASK && t->spec.pg_id == pg_id) ids[k++] = t->spec.rets[0];
  for (size_t i = 0; i < k; i++) td_node_cancel(n, ids[i], 1);
  free(ids);
  td__sched(n);
  return 0;
}

int td_node_pg_find(td_node_t *n, const char *name, uint64_t *pg_id, uint64_t *ready_id,
                    int *strategy, int *nb, const double (**bundles)[TD_NRES_MAX]) {
  td_pg_t *pg = n->pgs.list;
  while (pg && (!name[0] || strcmp(pg->name, name))) pg = pg->next;
  if (!pg) return TD_ENOTFOUND;
  *pg_id = pg->id;
  *ready_id = pg->ready_id;
  td_node_incref(n, pg->ready_id);
  *strategy = pg->strategy;
  *nb = pg->nb;
  *bundles = (const double (*)[TD_NRES_MAX])pg->total;
  return 0;
}

/* Placement groups with a bundle on a dead node are placed again, whole
 * (as Ray reschedules them): the other bundles give their share back and
 * the next pass reserves all of them anew. Work in them waits meanwhile. */
void td__pgs_node_lost(td_node_t *n, uint32_t index) {
  for (td_pg_t *pg = n->pgs.list; pg; pg = pg->next) {
    if (!pg->created || pg->removed || !pg->where) continue;
    int lost = 0;
    for (int b = 0; b < pg->nb; b++) {
      if (pg->where[b] != index) continue;
      pg->where[b] = TD__NOWHERE;
      memcpy(pg->avail[b], pg->total[b], sizeof(pg->avail[b]));
      lost++;
    }
    if (!lost) continue;
    pg->created = 0;
    fprintf(stderr, "tide: placement group %llx lost %d bundle(s) on node-%u; placing them again\n",
            (unsigned long long)pg->id, lost, index);
  }
}

/* The restored creation of a detached actor still waiting to be placed. */
static td_task_t *td__adoptable(td_node_t *n, uint64_t aid) {
  td_actor_t *a = td_map_get(&n->actors.map, aid);
  td_task_t *t = a ? a->create : NULL;
  return t && a->state == A_PENDING && t->state == T_QUEUED && t->restored ? t : NULL;
}

/* Head: a rejoining node still runs a detached actor an earlier head placed
 * there, in a group this head restored: it waits for the group to be
 * placed, its bundle on that node if it fits (td__pg_adopt). */
static int td__adopt_later(td_node_t *n, td_wk_t *wk, td_task_t *t, uint32_t attempt) {
  td_pg_t *pg = td__pg(n, t->spec.pg_id);
  if (!pg || !pg->holds_ready || pg->created || pg->removed) return 0;
  int b = t->spec.bundle;
  for (int k = 0; b < 0 && k < pg->nb; k++)
    if (!pg->hint[k] || pg->hint[k] == wk->node_index + 1) b = k;
  if (b < 0 || b >= pg->nb || (pg->hint[b] && pg->hint[b] != wk->node_index + 1)) return 0;
  pg->hint[b] = wk->node_index + 1;
  td_adoptee_t *e = td_xcalloc(1, sizeof(*e));
  *e = (td_adoptee_t){t->actor->id, attempt, wk->node_index, b, pg->adopt};
  pg->adopt = e;
  return 1;
}

void td__adopt(td_node_t *n, td_wk_t *wk, uint64_t aid, uint32_t attempt) {
  td_task_t *t = td__adoptable(n, aid);
  if (t && t->spec.pg_id && td__adopt_later(n, wk, t, attempt)) return;
  if (!t || t->spec.pg_id || !td__fits(wk->navail, t)) {
    td__actor_kill_at(wk, aid);
    return;
  }
  td__take(wk->navail, t, 1);
  t->actor->res_node = wk;
  t->actor->res_held = 1;
  td__adopt_at(n, wk, t, attempt);
}

/* Head: group pg is placed; its detached actors still running where their
 * bundles went are adopted, the others ended there. */
void td__pg_adopt(td_node_t *n, td_pg_t *pg) {
  while (pg->adopt) {
    td_adoptee_t *e = pg->adopt;
    pg->adopt = e->next;
    td_task_t *t = td__adoptable(n, e->actor);
    td_wk_t *wk = td__link(n, e->node);
    if (wk && t && pg->created && !pg->removed && pg->where[e->bundle] == e->node &&
        td__fits(pg->avail[e->bundle], t)) {
      td__take(pg->avail[e->bundle], t, 1);
      t->actor->pg_share = (uint32_t)e->bundle + 1;
      td__adopt_at(n, wk, t, e->attempt);
    } else if (wk) {
      td__actor_kill_at(wk, e->actor);
    }
    free(e);
  }
}

/* Takes a running actor as it is, its resources taken already. */
void td__adopt_at(td_node_t *n, td_wk_t *wk, td_task_t *t, uint32_t attempt) {
  td_actor_t *a = t->actor;
  uint64_t aid = a->id;
  tq_del(&n->sched.queue, t);
  a->host = wk;
  wk->nactors++;
  a->state = A_ALIVE;
  td__persist_actor_up(a);
  t->state = T_SENT;
  t->attempt = attempt;  /* its exits carry the incarnation it was started as */
  td_obj_t *o = td__obj(n, t->spec.rets[0]);
  uint8_t tt = TD_T_TRUE;
  if (o && o->state == OBJ_PENDING) td__obj_set(n, o, OBJ_READY, 0, &tt, 1, 0, NULL, 0);
  td_log("adopted detached actor %016llx%s%s, still running on node-%u", (unsigned long long)aid,
         t->spec.name[0] ? " " : "", t->spec.name, wk->node_index);
  fprintf(stderr, "tide: adopted detached actor %016llx%s%s on node-%u\n", (unsigned long long)aid,
          t->spec.name[0] ? " " : "", t->spec.name, wk->node_index);
  td__actor_pump(n, a);
}

/* A driver that left takes its placement groups with it. */
void td__pgs_owner_left(td_node_t *n, uint64_t owner) {
  for (td_pg_t *pg = n->pgs.list, *next; pg; pg = next) {
    next = pg->next;
    if (pg->owner == owner) td_node_pg_remove(n, pg->id);
  }
}
