/* Tide Lua bindings, the worker's backend of tide.core (see core.h): in a
 * worker or a client attached to a node, gets, waits, streams, puts,
 * streamed items, prints and RPCs to the node's control operations become
 * request frames to the node, and their replies become Lua values (td__push_*).
 * Waiting for a reply (td_w_await: yield or block) is the executor's
 * (worker.c). Uses core.c (core_int.h), chan, ser.
 */
#include "core_int.h"

#include <lauxlib.h>
#include <stdlib.h>

/* -- Worker: the backend (td__worker_be) -------------------------------------------- */

static int td__push_get1(lua_State *L, const uint8_t *p, size_t n, void *ud) {
  td_rd_t rd;
  td_rd_init(&rd, p, n);
  if (td_rd_u8(&rd)) return td__ret_timeout(L);
  td__mkref_owned_flag = 0;
  uint8_t kind = rd.p < rd.end ? *rd.p : 0;
  int rc = td_core_push_wire(L, &rd, (uint64_t)(uintptr_t)ud);
  if (rc < 0) return luaL_error(L, "malformed reply from the node");
  if (kind == TD_V_SHM) {
    uint64_t id = (uint64_t)(uintptr_t)ud;
    td_chan_begin(&td_ctx.ch, TD_M_UNPIN);
    td_buf_u32(&td_ctx.ch.out, 1);
    td_buf_u64(&td_ctx.ch.out, id);
    td_chan_end(&td_ctx.ch);
  }
  return td__ret_status(L, rc);
}

/* What the node answers when a wait times out, for td_w_timeout. */
static const uint8_t td__tmo_get[1] = {1}, td__tmo_wait[4] = {0}, td__tmo_stream[9] = {TD_SN_TIMEOUT};

/* Sends a GET for n ids with the timeout. */
static uint32_t td__send_get(const uint64_t *ids, uint32_t n, double timeout) {
  td_core_flush_refs();
  uint32_t req = td_w_begin_req(TD_M_GET);
  td_buf_f64(&td_ctx.ch.out, timeout);
  td_buf_u32(&td_ctx.ch.out, n);
  td_buf_put(&td_ctx.ch.out, ids, (size_t)n * 8);
  td_chan_end(&td_ctx.ch);
  td_w_timeout(timeout, td__tmo_get, 1);
  return req;
}

static int w_get1(lua_State *L, uint64_t id, double timeout) {
  uint32_t req = td__send_get(&id, 1, timeout);
  return td_w_await(L, req, td__push_get1, (void *)(uintptr_t)id);
}

/* A getn's ids, kept until its reply; one allocation. */
typedef struct {
  uint32_t n;
  uint64_t ids[];
} td__getn_t;

/* Reading a getn's reply: the objects in the store, to unpin after. */
typedef struct {
  td_rd_t rd;
  const td__getn_t *g;
  uint64_t *shm;
  uint32_t nshm;
} td__getn_rd_t;

static int td__wire_value_at(lua_State *L, uint32_t i, void *ud) {
  td__getn_rd_t *r = ud;
  uint8_t kind = r->rd.p < r->rd.end ? *r->rd.p : 0;
  if (kind == TD_V_SHM) r->shm[r->nshm++] = r->g->ids[i];
  return td_core_push_wire(L, &r->rd, r->g->ids[i]);
}

static int td__push_getn(lua_State *L, const uint8_t *p, size_t n, void *ud) {
  td__getn_t *g = ud;
  td__getn_rd_t r = {.g = g};
  td_rd_init(&r.rd, p, n);
  if (td_rd_u8(&r.rd)) {
    free(g);
    return td__ret_timeout(L);
  }
  td__mkref_owned_flag = 0;
  r.shm = td_xmalloc((size_t)g->n * 8 + 8);
  int nres = td__ret_values(L, g->n, td__wire_value_at, &r);
  if (nres >= 0 && r.nshm) {
    td_chan_begin(&td_ctx.ch, TD_M_UNPIN);
    td_buf_u32(&td_ctx.ch.out, r.nshm);
    td_buf_put(&td_ctx.ch.out, r.shm, (size_t)r.nshm * 8);
    td_chan_end(&td_ctx.ch);
  }
  free(r.shm);
  free(g);
  if (nres < 0) return luaL_error(L, "malformed reply from the node");
  return nres;
}

static int w_getn(lua_State *L, const uint64_t *ids, uint32_t n, double timeout) {
  td__getn_t *g = td_xmalloc(sizeof(*g) + (size_t)n * 8);
  g->n = n;
  memcpy(g->ids, ids, (size_t)n * 8);
  uint32_t req = td__send_get(ids, n, timeout);
  return td_w_await(L, req, td__push_getn, g);
}

static int td__push_wait(lua_State *L, const uint8_t *p, size_t n, void *ud) {
  (void)ud;
  td_rd_t rd;
  td_rd_init(&rd, p, n);
  uint32_t cnt = td_rd_u32(&rd);
  if (rd.bad || cnt > n) return luaL_error(L, "malformed reply from the node");
  lua_createtable(L, (int)cnt, 0);
  for (uint32_t i = 0; i < cnt; i++) {
    lua_pushboolean(L, td_rd_u8(&rd));
    lua_rawseti(L, -2, (int)i + 1);
  }
  return 1;
}

static int w_wait(lua_State *L, const uint64_t *ids, uint32_t n, int num, double timeout) {
  uint32_t req = td_w_begin_req(TD_M_WAIT);
  td_buf_f64(&td_ctx.ch.out, timeout);
  td_buf_u32(&td_ctx.ch.out, (uint32_t)num);
  td_buf_u32(&td_ctx.ch.out, n);
  td_buf_put(&td_ctx.ch.out, ids, (size_t)n * 8);
  td_chan_end(&td_ctx.ch);
  td_w_timeout(timeout, td__tmo_wait, 4);
  return td_w_await(L, req, td__push_wait, NULL);
}

static int td__push_stream(lua_State *L, const uint8_t *p, size_t n, void *ud) {
  (void)ud;
  td_rd_t rd;
  td_rd_init(&rd, p, n);
  uint8_t st = td_rd_u8(&rd);
  uint64_t item = td_rd_u64(&rd);
  if (rd.bad || st > TD_SN_TIMEOUT) return luaL_error(L, "malformed reply from the node");
  return td__ret_item(L, (td_sn_t)st, item, 1);
}

static int w_stream_next(lua_State *L, uint64_t id, uint32_t idx, double timeout) {
  uint32_t req = td_w_begin_req(TD_M_STREAM_NEXT);
  td_buf_u64(&td_ctx.ch.out, id);
  td_buf_u32(&td_ctx.ch.out, idx);
  td_buf_f64(&td_ctx.ch.out, timeout);
  td_chan_end(&td_ctx.ch);
  td_w_timeout(timeout, td__tmo_stream, 9);
  return td_w_await(L, req, td__push_stream, NULL);
}

static td_buf_t td__valbuf;

static int w_put(lua_State *L, uint64_t *id) {
  (void)L;
  td_buf_reset(&td__valbuf);
  int rc = td_core_put_value(&td_ctx.ser, &td__valbuf);
  if (rc) return rc;
  *id = td_core_new_id();
  td_chan_begin(&td_ctx.ch, TD_M_PUT);
  td_buf_u64(&td_ctx.ch.out, *id);
  td_buf_put(&td_ctx.ch.out, td__valbuf.p, td__valbuf.len);
  td_buf_u32(&td_ctx.ch.out, (uint32_t)td_ctx.ser.nrefs);
  td_buf_put(&td_ctx.ch.out, td_ctx.ser.refs, (size_t)td_ctx.ser.nrefs * 8);
  td_chan_end(&td_ctx.ch);
  return 0;
}

/* A worker does not know the store's size. */
static double w_store_capacity(void) { return -1; }

const td_core_be_t td__worker_be = {
    .get1 = w_get1,
    .getn = w_getn,
    .wait = w_wait,
    .stream_next = w_stream_next,
    .put = w_put,
    .store_capacity = w_store_capacity,
    .sleep = td_w_sleep,
};

/* -- Worker: its own calls ----------------------------------------------------------- */

static int td__push_room(lua_State *L, const uint8_t *p, size_t n, void *ud) {
  (void)L, (void)p, (void)n, (void)ud;
  return 0;
}

/* core.stream_room(): in a streaming call, waits until its consumer has
 * taken enough items to be within the window it set (see
 * td_node_stream_window); returns at once when it set none. */
static int w_stream_room(lua_State *L) {
  if (!td_ctx.cur_task || !td_ctx.cur_streaming) return 0;
  uint32_t req = td_w_begin_req(TD_M_STREAM_ROOM);
  td_buf_u64(&td_ctx.ch.out, td_ctx.cur_task);
  td_chan_end(&td_ctx.ch);
  return td_w_await(L, req, td__push_room, NULL);
}

/* core.yield_item(value): one item of a streaming task. */
static int w_yield_item(lua_State *L) {
  luaL_checkany(L, 1);
  if (!td_ctx.cur_task || !td_ctx.cur_streaming)
    return luaL_error(
        L, "tide.yield can only be called inside a task or method called with num_returns = \"streaming\"");
  if (td_ser_value(&td_ctx.ser, L, 1, "yielded value")) return td_core_ser_error(L, &td_ctx.ser);
  td_buf_reset(&td__valbuf);
  int rc = td_core_put_value(&td_ctx.ser, &td__valbuf);
  if (rc) return luaL_error(L, "tide.yield: %s", td_strerror(rc));
  td_chan_begin(&td_ctx.ch, TD_M_ITEM);
  td_buf_u64(&td_ctx.ch.out, td_ctx.cur_task);
  td_buf_u64(&td_ctx.ch.out, td_core_new_id());
  td_buf_put(&td_ctx.ch.out, td__valbuf.p, td__valbuf.len);
  td_buf_u32(&td_ctx.ch.out, (uint32_t)td_ctx.ser.nrefs);
  td_buf_put(&td_ctx.ch.out, td_ctx.ser.refs, (size_t)td_ctx.ser.nrefs * 8);
  td_chan_end(&td_ctx.ch);
  return 0;
}

static int w_print(lua_State *L) {
  size_t n;
  const char *s = luaL_checklstring(L, 1, &n);
  td_chan_begin(&td_ctx.ch, TD_M_PRINT);
  td_buf_str(&td_ctx.ch.out, s, n);
  td_buf_u64(&td_ctx.ch.out, td_ctx.cur_task ? td_ctx.cur_task : td_ctx.print_task); /* to its driver */
  td_buf_u64(&td_ctx.ch.out, td_ctx.cur_actor); /* its log's index slices by both */
  td_chan_end(&td_ctx.ch);
  return 0;
}

/* The worker's calls the driver does not have (luaopen_tide_core); the
 * control operations are RPCs (td__w_rpc), added there. */
const luaL_Reg td__worker_fns[] = {
    {"yield_item", w_yield_item}, {"stream_room", w_stream_room}, {"print", w_print}, {NULL, NULL}};

/* RPC: the op's arguments are encoded as one table; the reply is a table
 * of results whose refs the node already holds for us. */
static int td__push_rpc(lua_State *L, const uint8_t *p, size_t n, void *ud) {
  (void)ud;
  td_rd_t rd;
  td_rd_init(&rd, p, n);
  uint8_t ok = td_rd_u8(&rd);
  uint32_t l;
  const uint8_t *b = td_rd_str(&rd, &l);
  if (rd.bad) return luaL_error(L, "malformed reply from the node");
  td__mkref_owned_flag = 1;
  int rc = td__decode(L, b, l, 0);
  td__mkref_owned_flag = 0;
  if (rc) return lua_error(L);
  if (!ok) {
    /* The node raised: its error is the first result. */
    if (lua_istable(L, -1)) lua_rawgeti(L, -1, 1);
    return lua_error(L);
  }
  int cnt = (int)lua_objlen(L, -1);
  luaL_checkstack(L, cnt + 2, "rpc results");
  int t = lua_gettop(L);
  for (int i = 1; i <= cnt; i++) lua_rawgeti(L, t, i);
  lua_remove(L, t);
  return cnt;
}

int td__w_rpc(lua_State *L) {
  const td_rpc_op_t *op = lua_touserdata(L, lua_upvalueindex(1));
  if (!op) {
    /* core.call_node(op, ...): the op's name comes first. */
    size_t nl;
    const char *name = luaL_checklstring(L, 1, &nl);
    op = td__rpc_find(name, nl);
    if (!op || op->raw) return luaL_error(L, "unknown operation %s", name);
    lua_remove(L, 1);
  }
  int n = lua_gettop(L);
  lua_createtable(L, n, 0);
  for (int i = 1; i <= n; i++) {
    lua_pushvalue(L, i);
    lua_rawseti(L, -2, i);
  }
  if (td_ser_value(&td_ctx.ser, L, -1, "argument")) return td_core_ser_error(L, &td_ctx.ser);
  td_core_flush_refs();
  /* An op whose answer nobody waits for is sent without a request id:
   * the node replies to none, and order is kept. */
  int cast = (op->flags & TD_RPC_CAST) != 0;
  uint32_t req = 0;
  if (cast) {
    td_chan_begin(&td_ctx.ch, TD_M_RPC);
    td_buf_u32(&td_ctx.ch.out, 0);
  } else {
    req = td_w_begin_req(TD_M_RPC);
  }
  td_buf_str(&td_ctx.ch.out, op->name, strlen(op->name));
  td_buf_u32(&td_ctx.ch.out, (uint32_t)td_ctx.ser.size);
  td_ser_append(&td_ctx.ser, &td_ctx.ch.out);
  td_chan_end(&td_ctx.ch);
  if (cast) {
    td_chan_flush(&td_ctx.ch);
    lua_pushboolean(L, 1);
    return 1;
  }
  return td_w_await(L, req, td__push_rpc, NULL);
}
