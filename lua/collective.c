/* Tide CPU collectives for tasks and actors (tide.collective): the ring of
 * gpu/ring.c over a shared-memory transport whose region lives in the
 * node's object store, which every worker on the node maps. The region is
 * lent to rank 0 by the node and its offset shared through the node's KV
 * (stdlib/tide/collective.lua does the rendezvous). Exposed to Lua as the
 * `tide.collective_c` module. Uses core, ring, tensor_lua.
 */
#include <errno.h>
#include <lauxlib.h>
#include <stdlib.h>
#include <string.h>

#include "coll_net.h"
#include "core.h"
#include "crypto.h"
#include "ring.h"
#include "tensor.h"
#include "tensor_lua.h"

#define TD_GROUP_MT "tide.CollectiveGroup"

typedef struct td_group {
  td_ring_shm_t *shm;    /* transport state over the store region */
  td_ring_t *ring;       /* the ring every operation uses (over shm, or net) */
  int rank, world;
  /* A group that spans nodes: streams to every rank (net); ring is the
   * flat ring over them, and allreduce is hierarchical: local (the ring
   * over this node's shared memory, NULL alone on the node), then xring
   * among the nodes' first ranks (NULL on the others) or, between two
   * nodes, one exchange with xpeer (the other node's first rank; -1
   * otherwise), then a broadcast back over local. */
  td_cnet_t *net;
  td_ring_t *local, *xring;
  int xpeer;
} td_group_t;

#define TD_NET_MT "tide.CollectiveNet"
typedef struct td_netud {
  td_cnet_t *c; /* moves into the group made from it */
  int port;
} td_netud_t;

static td_group_t *td__group(lua_State *L) {
  td_group_t *g = luaL_checkudata(L, 1, TD_GROUP_MT);
  if (!g->ring) luaL_error(L, "the collective group was destroyed");
  return g;
}

/* A CPU contiguous tensor argument: its data, element count and dtype;
 * one the call writes must not map an object in the store. */
typedef struct {
  void *p;
  size_t count, bytes;
  int dtype;
} td__arg_t;

static td__arg_t td__tensor(lua_State *L, int idx, int write) {
  td_tensor_t *t = td_tensor_lua_to(L, idx);
  if (!t) luaL_argerror(L, idx, "tensor expected");
  if (td_tensor_device(t) != TD_CPU)
    luaL_argerror(L, idx, "CPU tensor expected (CUDA tensors use NCCL: tide.tensor.nccl_comm)");
  if (!td_tensor_is_contiguous(t)) luaL_argerror(L, idx, "contiguous tensor expected");
  if (write && td_tensor_is_readonly(t))
    luaL_argerror(L, idx, "the tensor is read-only (it maps an object in the store; use a :clone())");
  td__arg_t a = {td_tensor_data(t), (size_t)td_tensor_numel(t), 0, td_tensor_dtype(t)};
  a.bytes = a.count * td_dtype_size(a.dtype);
  return a;
}

/* Two tensors of one operation must have one dtype. */
static void td__same_dtype(lua_State *L, const char *what, const td__arg_t *in, const td__arg_t *out) {
  if (in->dtype != out->dtype)
    luaL_error(L, "%s: in is %s, out is %s: both must have the same dtype", what, td_dtype_name(in->dtype),
               td_dtype_name(out->dtype));
}

static int td__check(lua_State *L, int rc, const char *what) {
  if (rc < 0) return luaL_error(L, "%s failed: %s", what, td_gpu_strerror(rc));
  return 0;
}

/* A group's operation failed: a group across nodes says which rank and
 * node, and whether the rank is gone (NodeDiedError). */
static int td__gcheck(lua_State *L, td_group_t *g, int rc, const char *what) {
  if (rc < 0 && g->net && td_cnet_error(g->net)[0])
    return luaL_error(L, "%s%s failed: %s", td_cnet_peer_gone(g->net) ? "NodeDiedError: " : "", what,
                      td_cnet_error(g->net));
  return td__check(L, rc, what);
}

/* The op at idx, checked against the dtype it reduces. */
static int td__op(lua_State *L, int idx, const char *what, int dtype) {
  static const char *const ops[] = {"sum", "avg", "max", "min", NULL};
  static const int codes[] = {TD_RING_SUM, TD_RING_AVG, TD_RING_MAX, TD_RING_MIN};
  int op = codes[luaL_checkoption(L, idx, "sum", ops)];
  if (td_reduce_check(dtype, op))
    luaL_error(L, "%s: avg needs a float tensor (f32, f16 or bf16), not %s (sum it, then divide)", what,
               td_dtype_name(dtype));
  return op;
}

/* g:allreduce(t, op): in place. */
static int g_allreduce(lua_State *L) {
  td_group_t *g = td__group(L);
  td__arg_t a = td__tensor(L, 2, 1);
  int op = td__op(L, 3, "allreduce", a.dtype);
  if (!g->net) {
    td__check(L, td_ring_allreduce(g->ring, a.p, a.p, a.count, a.dtype, op), "allreduce");
  } else {
    /* Sums for avg, divided once at the end (as the flat ring does). */
    int hop = op == TD_RING_AVG ? TD_RING_SUM : op, rc = 0;
    if (g->local) rc = td_ring_allreduce(g->local, a.p, a.p, a.count, a.dtype, hop);
    if (!rc && g->xring) rc = td_ring_allreduce(g->xring, a.p, a.p, a.count, a.dtype, hop);
    if (!rc && g->xpeer >= 0) rc = td_cnet_allreduce_pair(g->net, g->xpeer, a.p, a.count, a.dtype, hop);
    if (!rc && g->local) rc = td_ring_broadcast(g->local, a.p, a.bytes, 0);
    td__gcheck(L, g, rc, "allreduce");
    if (op == TD_RING_AVG) td_reduce_avg(a.p, a.count, a.dtype, g->world);
  }
  lua_settop(L, 2);
  return 1;
}

/* g:reduce_scatter(in, out, op): out gets this rank's chunk. */
static int g_reduce_scatter(lua_State *L) {
  td_group_t *g = td__group(L);
  td__arg_t in = td__tensor(L, 2, 0), out = td__tensor(L, 3, 1);
  td__same_dtype(L, "reduce_scatter", &in, &out);
  int op = td__op(L, 4, "reduce_scatter", in.dtype);
  if (out.count < td_ring_chunk_count(in.count, g->world, g->rank))
    return luaL_error(L, "reduce_scatter: out holds %d elements, this rank's chunk has %d", (int)out.count,
                      (int)td_ring_chunk_count(in.count, g->world, g->rank));
  td__gcheck(L, g, td_ring_reduce_scatter(g->ring, in.p, out.p, in.count, in.dtype, op), "reduce_scatter");
  lua_settop(L, 3);
  return 1;
}

/* g:allgather(in, out): out = every rank's in, in rank order. */
static int g_allgather(lua_State *L) {
  td_group_t *g = td__group(L);
  td__arg_t in = td__tensor(L, 2, 0), out = td__tensor(L, 3, 1);
  td__same_dtype(L, "allgather", &in, &out);
  if (out.count != in.count * (size_t)g->world)
    return luaL_error(L, "allgather: out must hold world_size * #in = %d elements, not %d",
                      (int)(in.count * (size_t)g->world), (int)out.count);
  td__gcheck(L, g, td_ring_allgather(g->ring, in.p, out.p, in.bytes), "allgather");
  lua_settop(L, 3);
  return 1;
}

/* g:broadcast(t, root): root's t to everyone, in place. */
static int g_broadcast(lua_State *L) {
  td_group_t *g = td__group(L);
  int root = (int)luaL_optinteger(L, 3, 0);
  td__arg_t a = td__tensor(L, 2, root != g->rank);
  if (root < 0 || root >= g->world) return luaL_argerror(L, 3, "root out of range");
  td__gcheck(L, g, td_ring_broadcast(g->ring, a.p, a.bytes, root), "broadcast");
  lua_settop(L, 2);
  return 1;
}

static int g_send(lua_State *L) {
  td_group_t *g = td__group(L);
  td__arg_t a = td__tensor(L, 2, 0);
  int peer = (int)luaL_checkinteger(L, 3);
  if (peer < 0 || peer >= g->world || peer == g->rank) return luaL_argerror(L, 3, "bad peer rank");
  td__gcheck(L, g, td_ring_send(g->ring, a.p, a.bytes, peer), "send");
  return 0;
}

static int g_recv(lua_State *L) {
  td_group_t *g = td__group(L);
  td__arg_t a = td__tensor(L, 2, 1);
  int peer = (int)luaL_checkinteger(L, 3);
  if (peer < 0 || peer >= g->world || peer == g->rank) return luaL_argerror(L, 3, "bad peer rank");
  td__gcheck(L, g, td_ring_recv(g->ring, a.p, a.bytes, peer), "recv");
  lua_settop(L, 2);
  return 1;
}

static int g_barrier(lua_State *L) {
  td_group_t *g = td__group(L);
  td__gcheck(L, g, td_ring_barrier(g->ring), "barrier");
  return 0;
}

static int g_gc(lua_State *L) {
  td_group_t *g = luaL_checkudata(L, 1, TD_GROUP_MT);
  td_ring_free(&g->ring);
  td_ring_free(&g->local);
  td_ring_free(&g->xring);
  td_ring_shm_free(&g->shm);
  td_cnet_free(&g->net);
  return 0;
}

/* chunk_count(count, world, rank): elements of rank's reduce_scatter chunk. */
static int c_chunk_count(lua_State *L) {
  size_t n = (size_t)luaL_checknumber(L, 1);
  int world = (int)luaL_checkinteger(L, 2), rank = (int)luaL_checkinteger(L, 3);
  if (world < 1 || rank < 0 || rank >= world) return luaL_error(L, "bad world or rank");
  lua_pushnumber(L, (lua_Number)td_ring_chunk_count(n, world, rank));
  return 1;
}

/* region_bytes(world, cap) */
static int c_region_bytes(lua_State *L) {
  int world = (int)luaL_checkinteger(L, 1);
  lua_pushnumber(L, (lua_Number)td_ring_shm_bytes(world, (size_t)luaL_checknumber(L, 2)));
  return 1;
}

/* alloc(bytes) -> offset of a region in the node's store (workers). */
static int c_alloc(lua_State *L) {
  if (td_ctx.is_driver || !td_ctx.base)
    return luaL_error(L, "tide.collective groups are made inside tasks and actors");
  size_t off;
  int rc = td_w_alloc((size_t)luaL_checknumber(L, 1), &off);
  if (rc) return luaL_error(L, "cannot place the group in the object store: %s", td_strerror(rc));
  lua_pushnumber(L, (lua_Number)off);
  return 1;
}

/* attach(offset, bytes, world, rank, cap, init) -> group */
static int c_attach(lua_State *L) {
  size_t off = (size_t)luaL_checknumber(L, 1), bytes = (size_t)luaL_checknumber(L, 2);
  int world = (int)luaL_checkinteger(L, 3), rank = (int)luaL_checkinteger(L, 4);
  size_t cap = (size_t)luaL_checknumber(L, 5);
  int init = lua_toboolean(L, 6);
  if (!td_ctx.base || off > td_ctx.cap || bytes > td_ctx.cap - off)
    return luaL_error(L, "the group's region is not in this process's object store");
  if (rank < 0 || rank >= world) return luaL_error(L, "rank %d is outside 0..%d", rank, world - 1);
  td_group_t *g = lua_newuserdata(L, sizeof(*g));
  memset(g, 0, sizeof(*g));
  luaL_getmetatable(L, TD_GROUP_MT);
  lua_setmetatable(L, -2);
  g->rank = rank;
  g->world = world;
  td__check(L, td_ring_shm_wrap(&g->shm, td_ctx.base + off, world, cap, init), "group setup");
  td_ring_transport_t tr;
  td_ring_shm_transport(g->shm, rank, &tr);
  td__check(L, td_ring_new(&g->ring, &tr, rank, world, 256 * 1024), "ring setup");
  return 1;
}

/* -- Groups across nodes --------------------------------------------------- */

/* net_listen(host) -> net: listens for the group's other ranks. */
static int c_net_listen(lua_State *L) {
  const char *host = luaL_checkstring(L, 1);
  td_netud_t *u = lua_newuserdata(L, sizeof(*u));
  memset(u, 0, sizeof(*u));
  luaL_getmetatable(L, TD_NET_MT);
  lua_setmetatable(L, -2);
  if (td_crypto_load()) return luaL_error(L, "init_group: a group across nodes needs %s", td_crypto_error());
  if (td_cnet_listen(&u->c, host, &u->port))
    return luaL_error(L, "init_group: cannot listen on %s for the group's other nodes: %s", host,
                      strerror(errno));
  return 1;
}

static td_netud_t *td__net(lua_State *L, int idx) {
  td_netud_t *u = luaL_checkudata(L, idx, TD_NET_MT);
  if (!u->c) luaL_error(L, "the group's streams were handed on or closed");
  return u;
}

static int n_port(lua_State *L) {
  lua_pushinteger(L, td__net(L, 1)->port);
  return 1;
}

static int n_gc(lua_State *L) {
  td_netud_t *u = luaL_checkudata(L, 1, TD_NET_MT);
  td_cnet_free(&u->c);
  return 0;
}

static int td__hexval(int ch) {
  if (ch >= '0' && ch <= '9') return ch - '0';
  if (ch >= 'a' && ch <= 'f') return ch - 'a' + 10;
  return -1;
}

/* net:join(rank, {host...}, {port...}, {node...}, secret_hex, plain, timeout
 * [, op_timeout]): streams to every other rank (tables indexed by rank + 1);
 * op_timeout: seconds an operation waits on a silent peer (0: no limit;
 * TCP keepalive still finds a vanished host). */
static int n_join(lua_State *L) {
  td_netud_t *u = td__net(L, 1);
  int rank = (int)luaL_checkinteger(L, 2);
  luaL_checktype(L, 3, LUA_TTABLE);
  luaL_checktype(L, 4, LUA_TTABLE);
  luaL_checktype(L, 5, LUA_TTABLE);
  size_t sl;
  const char *hex = luaL_checklstring(L, 6, &sl);
  int plain = lua_toboolean(L, 7);
  double timeout = luaL_optnumber(L, 8, 60), op_timeout = luaL_optnumber(L, 9, 0);
  int world = (int)lua_objlen(L, 3);
  if (world < 1 || (int)lua_objlen(L, 4) != world || (int)lua_objlen(L, 5) != world || rank < 0 ||
      rank >= world)
    return luaL_error(L, "init_group: the group's table of ranks is inconsistent");
  uint8_t secret[32];
  if (sl != 64) return luaL_error(L, "init_group: the group's secret is malformed");
  for (int i = 0; i < 32; i++) {
    int hi = td__hexval(hex[2 * i]), lo = td__hexval(hex[2 * i + 1]);
    if (hi < 0 || lo < 0) return luaL_error(L, "init_group: the group's secret is malformed");
    secret[i] = (uint8_t)(hi << 4 | lo);
  }
  const char **hosts = lua_newuserdata(L, 2 * (size_t)world * sizeof(char *));
  const char **names = hosts + world;
  int *ports = lua_newuserdata(L, (size_t)world * sizeof(int));
  for (int i = 0; i < world; i++) {
    lua_rawgeti(L, 3, i + 1);
    hosts[i] = lua_tostring(L, -1);
    lua_pop(L, 1); /* the table keeps the string */
    lua_rawgeti(L, 4, i + 1);
    ports[i] = (int)lua_tointeger(L, -1);
    lua_pop(L, 1);
    lua_rawgeti(L, 5, i + 1);
    names[i] = lua_tostring(L, -1);
    lua_pop(L, 1);
    if (!hosts[i] || !names[i] || ports[i] <= 0 || ports[i] > 65535)
      return luaL_error(L, "init_group: rank %d's address in the group's table is malformed", i);
  }
  int rc = td_cnet_join(u->c, rank, world, hosts, ports, names, secret, plain, timeout);
  OPENSSL_cleanse(secret, sizeof(secret));
  if (rc) return luaL_error(L, "init_group: cannot reach the group's other ranks: %s", td_cnet_error(u->c));
  td_cnet_set_timeout(u->c, op_timeout);
  return 0;
}

/* attach_net(net, world, rank, leaders, offset|nil, bytes, lworld, lrank, cap, init)
 * -> group: the flat ring over net, the local ring over the store region
 * at offset (nil when rank is alone on its node), and, on a node's first
 * rank, the ring among the nodes' first ranks (leaders: their group ranks,
 * in ring order; nil elsewhere). net moves into the group. */
static int c_attach_net(lua_State *L) {
  td_netud_t *u = td__net(L, 1);
  int world = (int)luaL_checkinteger(L, 2), rank = (int)luaL_checkinteger(L, 3);
  td_group_t *g = lua_newuserdata(L, sizeof(*g));
  memset(g, 0, sizeof(*g));
  luaL_getmetatable(L, TD_GROUP_MT);
  lua_setmetatable(L, -2);
  g->rank = rank;
  g->world = world;
  g->net = u->c;
  g->xpeer = -1;
  u->c = NULL;
  td_ring_transport_t tr;
  td_cnet_transport(g->net, &tr);
  if (!tr.send) return luaL_error(L, "group setup failed: out of memory");
  td__check(L, td_ring_new(&g->ring, &tr, rank, world, 512 * 1024), "ring setup");
  if (lua_istable(L, 4)) {
    int nl = (int)lua_objlen(L, 4), me = -1, map[256];
    if (nl < 1 || nl > 256) return luaL_error(L, "group setup failed: %d nodes", nl);
    for (int i = 0; i < nl; i++) {
      lua_rawgeti(L, 4, i + 1);
      map[i] = (int)lua_tointeger(L, -1);
      lua_pop(L, 1);
      if (map[i] == rank) me = i;
    }
    if (me < 0) return luaL_error(L, "group setup failed: this rank is not among the nodes' first ranks");
    if (nl == 2) g->xpeer = map[1 - me];
    if (nl > 2) {
      if (td_cnet_sub_transport(g->net, map, nl, &tr))
        return luaL_error(L, "group setup failed: out of memory");
      td__check(L, td_ring_new(&g->xring, &tr, me, nl, 512 * 1024), "ring setup");
    }
  }
  if (!lua_isnoneornil(L, 5)) {
    size_t off = (size_t)luaL_checknumber(L, 5), bytes = (size_t)luaL_checknumber(L, 6);
    int lworld = (int)luaL_checkinteger(L, 7), lrank = (int)luaL_checkinteger(L, 8);
    size_t cap = (size_t)luaL_checknumber(L, 9);
    if (!td_ctx.base || off > td_ctx.cap || bytes > td_ctx.cap - off)
      return luaL_error(L, "the group's region is not in this process's object store");
    td__check(L, td_ring_shm_wrap(&g->shm, td_ctx.base + off, lworld, cap, lua_toboolean(L, 10)),
              "group setup");
    td_ring_shm_transport(g->shm, lrank, &tr);
    td__check(L, td_ring_new(&g->local, &tr, lrank, lworld, 256 * 1024), "ring setup");
  }
  return 1;
}

/* owner_key() -> "a<actor id>" inside an actor, else "t<task id>": whose
 * groups these are. Every operation checks it, so it is made here without
 * building core.context()'s table (2 us, 6% of a 64 KiB allreduce). */
static int c_owner_key(lua_State *L) {
  int actor = td_ctx.cur_actor != 0;
  char key[24];
  snprintf(key, sizeof(key), "%c%016llx", actor ? 'a' : 't',
           (unsigned long long)(actor ? td_ctx.cur_actor : td_ctx.cur_task));
  lua_pushstring(L, key);
  return 1;
}

/* random_hex() -> 64 hex digits (a group's secret). */
static int c_random_hex(lua_State *L) {
  uint8_t r[32];
  char hex[65];
  if (td_cnet_random(r))
    return luaL_error(L, "init_group: no random bytes%s%s", td_crypto_error()[0] ? ": " : "",
                      td_crypto_error());
  for (int i = 0; i < 32; i++) snprintf(hex + 2 * i, 3, "%02x", r[i]);
  OPENSSL_cleanse(r, sizeof(r));
  lua_pushlstring(L, hex, 64);
  return 1;
}

int luaopen_tide_collective_c(lua_State *L) {
  static const luaL_Reg methods[] = {
    {"allreduce", g_allreduce}, {"reduce_scatter", g_reduce_scatter}, {"allgather", g_allgather},
    {"broadcast", g_broadcast}, {"send", g_send}, {"recv", g_recv}, {"barrier", g_barrier},
    {"destroy", g_gc}, {NULL, NULL}};
  if (luaL_newmetatable(L, TD_GROUP_MT)) {
    lua_newtable(L);
    luaL_register(L, NULL, methods);
    lua_setfield(L, -2, "__index");
    lua_pushcfunction(L, g_gc);
    lua_setfield(L, -2, "__gc");
  }
  lua_pop(L, 1);
  static const luaL_Reg nmethods[] = {{"port", n_port}, {"join", n_join}, {"close", n_gc}, {NULL, NULL}};
  if (luaL_newmetatable(L, TD_NET_MT)) {
    lua_newtable(L);
    luaL_register(L, NULL, nmethods);
    lua_setfield(L, -2, "__index");
    lua_pushcfunction(L, n_gc);
    lua_setfield(L, -2, "__gc");
  }
  lua_pop(L, 1);
  static const luaL_Reg fns[] = {{"region_bytes", c_region_bytes},
                                 {"alloc", c_alloc},
                                 {"attach", c_attach},
                                 {"chunk_count", c_chunk_count},
                                 {"net_listen", c_net_listen},
                                 {"attach_net", c_attach_net},
                                 {"random_hex", c_random_hex},
                                 {NULL, NULL}};
  lua_newtable(L);
  luaL_register(L, NULL, fns);
  lua_pushcfunction(L, c_owner_key);
  lua_setfield(L, -2, "owner_key");
  return 1;
}
