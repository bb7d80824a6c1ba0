/* Tide CPU collectives for tasks and actors (tide.collective): the ring of
 * gpu/ring.c over a shared-memory transport whose region lives in the
 * node's object store, which every worker on the node maps. The region is
 * lent to rank 0 by the node and its offset shared through the node's KV
 * (stdlib/tide/collective.lua does the rendezvous). Exposed to Lua as the
 * `tide.collective_c` module. Uses core, ring, tensor_lua.
 */
#include <lauxlib.h>
#include <stdlib.h>
#include <string.h>

#include "core.h"
#include "ring.h"
#include "tensor.h"
#include "tensor_lua.h"

#define TD_GROUP_MT "tide.CollectiveGroup"

typedef struct td_group {
  td_ring_shm_t *shm;    /* transport state over the store region */
  td_ring_t *ring;       /* the ring over it */
  int rank, world;
} td_group_t;

static td_group_t *td__group(lua_State *L) {
  td_group_t *g = luaL_checkudata(L, 1, TD_GROUP_MT);
  if (!g->ring) luaL_error(L, "the collective group was destroyed");
  return g;
}

/* A CPU f32 contiguous tensor argument: its data and element count; one
 * the call writes must not map an object in the store. */
static float *td__f32(lua_State *L, int idx, size_t *count, int write) {
  td_tensor_t *t = td_tensor_lua_to(L, idx);
  if (!t) luaL_argerror(L, idx, "tensor expected");
  if (td_tensor_dtype(t) != TD_F32) luaL_argerror(L, idx, "f32 tensor expected");
  if (td_tensor_device(t) != TD_CPU)
    luaL_argerror(L, idx, "CPU tensor expected (CUDA tensors use NCCL: tide.tensor.nccl_comm)");
  if (!td_tensor_is_contiguous(t)) luaL_argerror(L, idx, "contiguous tensor expected");
  if (write && td_tensor_is_readonly(t))
    luaL_argerror(L, idx, "the tensor is read-only (it maps an object in the store; use a :clone())");
  *count = (size_t)td_tensor_numel(t);
  return td_tensor_data(t);
}

static int td__check(lua_State *L, int rc, const char *what) {
  if (rc < 0) return luaL_error(L, "%s failed: %s", what, td_gpu_strerror(rc));
  return 0;
}

static int td__op(lua_State *L, int idx) {
  static const char *const ops[] = {"sum", "avg", "max", "min", NULL};
  static const int codes[] = {TD_RING_SUM, TD_RING_AVG, TD_RING_MAX, TD_RING_MIN};
  return codes[luaL_checkoption(L, idx, "sum", ops)];
}

/* g:allreduce(t, op): in place. */
static int g_allreduce(lua_State *L) {
  td_group_t *g = td__group(L);
  size_t n;
  float *p = td__f32(L, 2, &n, 1);
  td__check(L, td_ring_allreduce(g->ring, p, p, n, td__op(L, 3)), "allreduce");
  lua_settop(L, 2);
  return 1;
}

/* g:reduce_scatter(in, out, op): out gets this rank's chunk. */
static int g_reduce_scatter(lua_State *L) {
  td_group_t *g = td__group(L);
  size_t n, m;
  float *in = td__f32(L, 2, &n, 0), *out = td__f32(L, 3, &m, 1);
  if (m < td_ring_chunk_count(n, g->world, g->rank))
    return luaL_error(L, "reduce_scatter: out holds %d elements, this rank's chunk has %d", (int)m,
                      (int)td_ring_chunk_count(n, g->world, g->rank));
  td__check(L, td_ring_reduce_scatter(g->ring, in, out, n, td__op(L, 4)), "reduce_scatter");
  lua_settop(L, 3);
  return 1;
}

/* g:allgather(in, out): out = every rank's in, in rank order. */
static int g_allgather(lua_State *L) {
  td_group_t *g = td__group(L);
  size_t n, m;
  float *in = td__f32(L, 2, &n, 0), *out = td__f32(L, 3, &m, 1);
  if (m != n * (size_t)g->world)
    return luaL_error(L, "allgather: out must hold world_size * #in = %d elements, not %d",
                      (int)(n * (size_t)g->world), (int)m);
  td__check(L, td_ring_allgather(g->ring, in, out, n * sizeof(float)), "allgather");
  lua_settop(L, 3);
  return 1;
}

/* g:broadcast(t, root): root's t to everyone, in place. */
static int g_broadcast(lua_State *L) {
  td_group_t *g = td__group(L);
  size_t n;
  int root = (int)luaL_optinteger(L, 3, 0);
  float *p = td__f32(L, 2, &n, root != g->rank);
  if (root < 0 || root >= g->world) return luaL_argerror(L, 3, "root out of range");
  td__check(L, td_ring_broadcast(g->ring, p, n * sizeof(float), root), "broadcast");
  lua_settop(L, 2);
  return 1;
}

static int g_send(lua_State *L) {
  td_group_t *g = td__group(L);
  size_t n;
  float *p = td__f32(L, 2, &n, 0);
  int peer = (int)luaL_checkinteger(L, 3);
  if (peer < 0 || peer >= g->world || peer == g->rank) return luaL_argerror(L, 3, "bad peer rank");
  td__check(L, td_ring_send(g->ring, p, n * sizeof(float), peer), "send");
  return 0;
}

static int g_recv(lua_State *L) {
  td_group_t *g = td__group(L);
  size_t n;
  float *p = td__f32(L, 2, &n, 1);
  int peer = (int)luaL_checkinteger(L, 3);
  if (peer < 0 || peer >= g->world || peer == g->rank) return luaL_argerror(L, 3, "bad peer rank");
  td__check(L, td_ring_recv(g->ring, p, n * sizeof(float), peer), "recv");
  lua_settop(L, 2);
  return 1;
}

static int g_barrier(lua_State *L) {
  td_group_t *g = td__group(L);
  td__check(L, td_ring_barrier(g->ring), "barrier");
  return 0;
}

static int g_gc(lua_State *L) {
  td_group_t *g = luaL_checkudata(L, 1, TD_GROUP_MT);
  td_ring_free(&g->ring);
  td_ring_shm_free(&g->shm);
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
  static const luaL_Reg fns[] = {{"region_bytes", c_region_bytes}, {"alloc", c_alloc},
                                 {"attach", c_attach}, {"chunk_count", c_chunk_count}, {NULL, NULL}};
  lua_newtable(L);
  luaL_register(L, NULL, fns);
  return 1;
}
