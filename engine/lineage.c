/* Lineage (node_int.h): results made again when they are lost.
 *
 * A task that a worker on a node submits runs there first, and its result
 * stays there until someone asks. The node keeps the spec of such a task
 * (a plain one: one return, arguments by value, retries allowed) and sends
 * it to the head with the first ref to its result the head receives; if the
 * node dies before the head fetched the value, the head runs the task again
 * elsewhere (td__lineage_rerun) instead of raising ObjectLostError. */
#include "node_int.h"

#define TD_LINEAGE_MAX (64 * 1024) /* arguments kept per task, at most */
#define TD_LINEAGE_REFS 1024       /* and refs among them */
#define TD_LINEAGE_RETS 16         /* and returns */

/* The refs a spec's arguments name: its dependencies, then nested refs.
 * Returns their count, or -1 if the spec does not decode. */
static int td__lineage_refs(const td_fnblob_t *lb, uint64_t **ids, uint64_t **scratch) {
  td_rd_t rd;
  td_rd_init(&rd, lb->data, lb->len);
  td_spec_t s;
  *scratch = NULL;
  if (td_spec_decode(&s, &rd, scratch)) return -1;
  *ids = td_xmalloc(((size_t)s.ndeps + s.nrefs) * 8 + 8);
  if (s.ndeps) memcpy(*ids, s.deps, (size_t)s.ndeps * 8);
  if (s.nrefs) memcpy(*ids + s.ndeps, s.refs, (size_t)s.nrefs * 8);
  return (int)(s.ndeps + s.nrefs);
}

/* Head: a kept spec holds its arguments' objects; dropping it lets go. */
void td__lineage_drop(td_node_t *n, uint64_t id) {
  td_fnblob_t *lb = td_map_del(&n->lineage.kept, id);
  if (!lb) return;
  uint64_t *ids, *scratch;
  int k = td__lineage_refs(lb, &ids, &scratch);
  for (int i = 0; i < k; i++) td_node_decref(n, ids[i]);
  if (k >= 0) free(ids);
  free(scratch);
  free(lb);
}

/* Node: keeps the spec of a task its workers submitted, under each of its
 * returns (sent to the head with the first ref to that return). */
void td__lineage_keep(td_node_t *n, const td_spec_t *s) {
  if (s->kind != TD_K_TASK || s->nret < 1 || s->nret > TD_LINEAGE_RETS || s->pg_id || s->max_retries == 0 ||
      s->args_len > TD_LINEAGE_MAX || s->ndeps + s->nrefs > TD_LINEAGE_REFS)
    return;
  td_buf_t b;
  td_buf_init(&b);
  td_spec_encode(s, &b);
  for (int32_t i = 0; i < s->nret; i++) {
    td_fnblob_t *lb = td_xmalloc(sizeof(*lb) + b.len);
    lb->len = b.len;
    memcpy(lb->data, b.p, b.len);
    free(td_map_del(&n->lineage.specs, s->rets[i]));
    td_map_set(&n->lineage.specs, s->rets[i], lb);
  }
  td_buf_free(&b);
}

/* After the message that exported them: the specs go to the head, with the
 * definitions it has not had. */
void td__lineage_send(td_node_t *n) {
  if (n->links.head && !n->links.head->dead) {
    td__send_fns(n, n->links.head);
    for (uint32_t i = 0; i < n->lineage.nout; i++) {
      td_fnblob_t *lb = td_map_del(&n->lineage.specs, n->lineage.out[i]);
      if (!lb) continue;
      /* Its arguments' refs travel with it (exports; their own lineage
       * follows, as they are queued in turn). */
      uint64_t *ids, *scratch;
      int k = td__lineage_refs(lb, &ids, &scratch);
      if (k > 0) td__export(n, ids, (uint32_t)k);
      if (k >= 0) free(ids);
      free(scratch);
      td_chan_begin(&n->links.head->ch, TD_M_LINEAGE);
      td_buf_u64(&n->links.head->ch.out, n->lineage.out[i]);
      td_buf_str(&n->links.head->ch.out, lb->data, lb->len);
      td_chan_end(&n->links.head->ch);
      free(lb);
    }
  }
  n->lineage.nout = 0;
}

/* Head: keeps a node's spec for a value still to come from it. */
int td__on_lineage(td_node_t *n, td_wk_t *wk, td_rd_t *rd) {
  uint64_t id = td_rd_u64(rd);
  uint32_t l;
  const uint8_t *p = td_rd_str(rd, &l);
  if (rd->bad || l > TD_LINEAGE_MAX + 4096) return TD_EPROTO;
  td_rd_t sr;
  td_rd_init(&sr, p, l);
  td_spec_t s;
  uint64_t *scratch = NULL;
  int mine = 0;
  int bad = td_spec_decode(&s, &sr, &scratch) || s.kind != TD_K_TASK || s.nret < 1 || s.nret > TD_LINEAGE_RETS ||
            s.ndeps + s.nrefs > TD_LINEAGE_REFS;
  for (int32_t i = 0; !bad && i < s.nret; i++) mine |= s.rets[i] == id;
  if (bad || !mine) {
    free(scratch);
    return TD_EPROTO;
  }
  /* The node exported the arguments' refs with it: take them over, then
   * hold them here while the spec is kept. */
  td__import(n, wk, s.deps, s.ndeps);
  td__import(n, wk, s.refs, s.nrefs);
  td_fnblob_t *lb = td_xmalloc(sizeof(*lb) + l);
  lb->len = l;
  memcpy(lb->data, p, l);
  for (uint32_t i = 0; i < s.ndeps; i++) td_node_incref(n, s.deps[i]);
  for (uint32_t i = 0; i < s.nrefs; i++) td_node_incref(n, s.refs[i]);
  free(scratch);
  td_obj_t *o = td__obj(n, id);
  td__lineage_drop(n, id);
  td_map_set(&n->lineage.kept, id, lb);
  /* Kept only for a value still to come from that node. */
  if (!o || o->foreign != 1 || o->state != OBJ_PENDING || td_id_node(id) != wk->node_index)
    td__lineage_drop(n, id);
  return 0;
}

/* Head: the node that held o died before sending it; its task runs again
 * here (wherever it fits), filling the same object. Returns 1 if it does. */
static int td__lineage_rerun(td_node_t *n, td_obj_t *o) {
  td_fnblob_t *lb = n->lineage.kept.len ? td_map_get(&n->lineage.kept, o->id) : NULL;
  if (!lb) return 0;
  td_rd_t rd;
  td_rd_init(&rd, lb->data, lb->len);
  td_spec_t s;
  uint64_t *scratch = NULL;
  const char *msg;
  int ok = td_spec_decode(&s, &rd, &scratch) == 0 && td_node_submit(n, &s, &msg) == 0;
  if (ok) {
    fprintf(stderr, "tide: making object %016llx again: the node that held it died\n", (unsigned long long)o->id);
    td_log("making object %016llx again: the node that held it died", (unsigned long long)o->id);
    /* The task's other returns come from this run too: those lost with
     * the node are no longer fetched from it. */
    for (int32_t i = 0; i < s.nret; i++) {
      td_obj_t *r = td__obj(n, s.rets[i]);
      if (!r) continue;
      r->refs--;  /* the submit's, which nobody holds */
      if (r->state != OBJ_PENDING) r->producer = NULL;  /* it has its value */
      else if (r != o) td__obj_unfetch(n, r);
      if (r != o) td__lineage_drop(n, s.rets[i]);
    }
  }
  free(scratch);
  td__lineage_drop(n, o->id);  /* the task holds its arguments now */
  return ok;
}

/* A pending object no longer comes from the node it was fetched from (it
 * will be made again): what it had of that node's value goes. */
void td__obj_unfetch(td_node_t *n, td_obj_t *o) {
  if (o->chunked) td_store_free(n->objs.store, o->off, o->len);
  o->chunked = 0;
  o->away = 0;
  o->pulling = 0;
  o->len = 0;
  o->foreign = 0;
  o->up = 0;
  for (uint32_t k = 0; k < o->ncontained; k++) td_node_decref(n, o->contained[k]);
  free(o->contained);
  o->contained = NULL;
  o->ncontained = 0;
}

void td__link_lost_objects(td_node_t *n, td_wk_t *wk) {
  size_t cnt = 0, it = 0;
  td_obj_t *o;
  uint64_t *ids = td_xmalloc((size_t)n->objs.map.len * 8 + 8);
  while (td_map_next(&n->objs.map, &it, NULL, (void **)&o)) {
    if (!o->foreign || o->state != OBJ_PENDING) continue;
    int from = wk->kind == WK_HEAD ? 1
                                   : (o->foreign == 1 && td_id_node(o->id) == wk->node_index) ||
                                         o->up == wk->node_index + 1;
    if (from) ids[cnt++] = o->id;
  }
  char msg[200];
  snprintf(msg, sizeof(msg), "the object was on %s, which died before sending it",
           wk->kind == WK_HEAD ? "the head" : "a node");
  td__errblob(&n->tmp, "ObjectLostError", msg);
  for (size_t i = 0; i < cnt; i++) {
    o = td__obj(n, ids[i]);
    /* Not foreign any more: made again already, by a run for another of
     * its task's returns. */
    if (!o || o->state != OBJ_PENDING || !o->foreign) continue;
    o->foreign = 0;  /* nothing is held there any more */
    o->up = 0;
    td_task_t *t = o->producer;
    int rerun = t && t->state == T_FETCHING && t->retries_left != 0;
    if (rerun || (n->lineage.kept.len && td_map_get(&n->lineage.kept, o->id))) {
      /* Lineage: the task that made it runs again, elsewhere. */
      td__obj_unfetch(n, o);
      if (rerun || td__lineage_rerun(n, o)) continue;
    }
    td__chunk_fail(n, o, "ObjectLostError", msg);
  }
  /* Tasks whose results were lost in transit run again. */
  size_t it2 = 0, nf = 0;
  td_task_t *t, **fetching = td_xmalloc((size_t)n->tasks.map.len * sizeof(*fetching) + 8);
  while (td_map_next(&n->tasks.map, &it2, NULL, (void **)&t))
    if (t->state == T_FETCHING && !td__task_fetching(n, t)) fetching[nf++] = t;
  for (size_t i = 0; i < nf; i++) {
    t = fetching[i];
    int lost = 0;
    uint32_t nr = t->spec.nret < 0 ? 1 : (uint32_t)t->spec.nret;
    for (uint32_t k = 0; k < nr; k++) {
      td_obj_t *r = td__obj(n, t->spec.rets[k]);
      lost |= r && r->state == OBJ_PENDING && r->producer == t;
    }
    if (!lost) {  /* its results failed instead (no retry left) */
      td__task_finish(n, t);
      continue;
    }
    if (t->retries_left > 0) t->retries_left--;
    t->state = T_QUEUED;
    if (t->spec.kind == TD_K_ACTOR_CALL && t->actor)
      tq_push_front(&t->actor->queue, t);  /* for its actor once restarted (if it dies, the call fails) */
    else tq_push_front(&n->sched.queue, t);
    fprintf(stderr, "tide: running %s %llu again: its result was lost with the node that made it\n",
            t->spec.kind == TD_K_ACTOR_CALL ? "actor call" : "task", (unsigned long long)t->id);
  }
  free(fetching);
  free(ids);
  /* Requests relayed to a lost head: each worker gets an error reply
   * (u8 ok = 0, u32 size, a string); the map is emptied after. */
  if (wk->kind != WK_HEAD) return;
  const char *err = "the head is gone (this node is rejoining it)";
  td_buf_reset(&n->tmp);
  td_buf_u8(&n->tmp, 0);
  td_buf_u32(&n->tmp, (uint32_t)(5 + strlen(err)));
  td__put_lstr(&n->tmp, err);
  it = 0;
  void *v;
  while (td_map_next(&n->links.relays, &it, NULL, &v)) {
    td_relay_t *rl = v;
    for (int i = 0; i < n->procs.n; i++)
      if (n->procs.list[i]->id == rl->wk_id)
        td_node_reply(n, n->procs.list[i], rl->req, n->tmp.p, n->tmp.len);
    free(rl);
  }
  td_map_free(&n->links.relays);
  td_map_init(&n->links.relays);
}
