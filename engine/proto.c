/* Tide protocol helpers (see proto.h). */
#include "proto.h"

#include <stdlib.h>

static void td__put_ids(td_buf_t *b, const uint64_t *ids, uint32_t n) {
  td_buf_u32(b, n);
  td_buf_put(b, ids, (size_t)n * 8);
}

void td_spec_encode(const td_spec_t *s, td_buf_t *b) {
  td_buf_u8(b, s->kind);
  td_buf_u64(b, s->fn_id);
  td_buf_u64(b, s->actor_id);
  td_buf_str(b, s->method, strlen(s->method));
  td_buf_u32(b, (uint32_t)s->nret);
  td__put_ids(b, s->rets, s->nret < 0 ? 1 : (uint32_t)s->nret);
  td_buf_str(b, s->args, s->args_len);
  td__put_ids(b, s->deps, s->ndeps);
  td__put_ids(b, s->refs, s->nrefs);
  td_buf_u32(b, s->nres);
  for (uint32_t i = 0; i < s->nres; i++) {
    td_buf_str(b, s->res_name[i], strlen(s->res_name[i]));
    td_buf_f64(b, s->res_amt[i]);
  }
  td_buf_u32(b, (uint32_t)s->max_retries);
  td_buf_u32(b, (uint32_t)s->max_restarts);
  td_buf_u32(b, (uint32_t)s->max_concurrency);
  /* own_process and pipeline ride in bits 1 and 2 of the detached byte,
   * so specs kept in head.db by an older build still read (the bits are 0
   * there); bits 3 and 4 say the job's id and the parent's follow. */
  td_buf_u8(b, (uint8_t)((s->detached ? 1 : 0) | (s->own_process ? 2 : 0) | (s->pipeline ? 4 : 0) |
                         (s->job ? 8 : 0) | (s->parent ? 16 : 0)));
  if (s->job) td_buf_u64(b, s->job);
  if (s->parent) td_buf_u64(b, s->parent);
  td_buf_u8(b, s->retry_exceptions);
  td_buf_u64(b, s->pg_id);
  td_buf_u32(b, (uint32_t)s->bundle);
  td_buf_u8(b, s->strategy);
  td_buf_u32(b, s->node);
  td_buf_str(b, s->name, strlen(s->name));
  td_buf_str(b, s->ns, strlen(s->ns));
  td_buf_str(b, s->env, s->env_len);
}

static int td__get_str(td_rd_t *r, char *dst, size_t cap) {
  uint32_t n;
  const uint8_t *p = td_rd_str(r, &n);
  if (r->bad || n >= cap) return -1;
  memcpy(dst, p, n);
  dst[n] = 0;
  return 0;
}

/* Id arrays are copied into one scratch allocation: messages are not
 * aligned, and ids must outlive the receive buffer. */
static uint64_t *td__get_ids(td_rd_t *r, uint32_t *n, uint64_t *dst) {
  *n = td_rd_u32(r);
  const uint8_t *p = td_rd_bytes(r, (size_t)*n * 8);
  if (!p) { *n = 0; return dst; }
  memcpy(dst, p, (size_t)*n * 8);
  return dst;
}

int td_spec_decode(td_spec_t *s, td_rd_t *r, uint64_t **scratch) {
  memset(s, 0, sizeof(*s));
  *scratch = NULL;
  size_t total = (size_t)(r->end - r->p) / 8 + 4;
  uint64_t *ids = td_xmalloc(total * 8);
  *scratch = ids;
  s->kind = td_rd_u8(r);
  s->fn_id = td_rd_u64(r);
  s->actor_id = td_rd_u64(r);
  if (td__get_str(r, s->method, sizeof(s->method))) return TD_EPROTO;
  s->nret = (int32_t)td_rd_u32(r);
  uint32_t n;
  s->rets = td__get_ids(r, &n, ids);
  if (r->bad || s->nret < -1 || n != (s->nret < 0 ? 1u : (uint32_t)s->nret)) return TD_EPROTO;
  ids += n;
  uint32_t alen;
  s->args = td_rd_str(r, &alen);
  s->args_len = alen;
  s->deps = td__get_ids(r, &s->ndeps, ids);
  ids += s->ndeps;
  s->refs = td__get_ids(r, &s->nrefs, ids);
  s->nres = td_rd_u32(r);
  if (r->bad || s->nres > TD_NRES_MAX) return TD_EPROTO;
  for (uint32_t i = 0; i < s->nres; i++) {
    if (td__get_str(r, s->res_name[i], sizeof(s->res_name[i]))) return TD_EPROTO;
    s->res_amt[i] = td_rd_f64(r);
  }
  s->max_retries = (int32_t)td_rd_u32(r);
  s->max_restarts = (int32_t)td_rd_u32(r);
  s->max_concurrency = (int32_t)td_rd_u32(r);
  uint8_t flags = td_rd_u8(r);
  s->detached = flags & 1;
  s->own_process = (flags >> 1) & 1;
  s->pipeline = (flags >> 2) & 1;
  if (flags & 8) s->job = td_rd_u64(r);
  if (flags & 16) s->parent = td_rd_u64(r);
  s->retry_exceptions = td_rd_u8(r);
  s->pg_id = td_rd_u64(r);
  s->bundle = (int32_t)td_rd_u32(r);
  s->strategy = td_rd_u8(r);
  s->node = td_rd_u32(r);
  if (td__get_str(r, s->name, sizeof(s->name))) return TD_EPROTO;
  if (td__get_str(r, s->ns, sizeof(s->ns))) return TD_EPROTO;
  uint32_t elen;
  const uint8_t *e = td_rd_str(r, &elen);
  if (r->bad || elen > sizeof(s->env) || s->kind > TD_K_ACTOR_CALL || s->strategy >= TD_ST_COUNT)
    return TD_EPROTO;
  memcpy(s->env, e, elen);
  s->env_len = elen;
  return 0;
}

/* -- Codes by name ---------------------------------------------------------- */

const td_code_t td_strategy_codes[] = {{"DEFAULT", TD_ST_DEFAULT},
                                       {"SPREAD", TD_ST_SPREAD},
                                       {"NODE", TD_ST_NODE},
                                       {"NODE_SOFT", TD_ST_NODE_SOFT},
                                       {NULL, 0}};

const char *td_code_name(const td_code_t *t, int value) {
  for (; t->name; t++)
    if (t->value == value) return t->name;
  return NULL;
}
