/* Observability in the node daemon: the `tide.obs_c` module (rows for
 * `tide list`, the /metrics text) loaded into the daemon's private RPC
 * state, and the dashboard's HTTP server on the head.
 *
 * The dashboard runs on a thread of its own (td_http_thread_start); its
 * requests reach the daemon's loop through an inbox whose fd sits in one
 * epoll set with the daemon's listening socket (the node polls one
 * extension fd: the host's watch slot). Each request is answered on the loop thread by
 * stdlib/tide/obs.lua (obs.http), which reads the node's tables through
 * engine/introspect.c: no copy of the state is kept anywhere else.
 *
 * Who may ask: a client on loopback, or one that shows the dashboard token
 * (derived from the cluster key, so only holders of the key have it); a
 * request from another address without it is refused (403). Uses http,
 * introspect, core.
 */
#include <errno.h>
#include <lauxlib.h>
#include <lua.h>
#include <sodium.h>
#include <stdio.h>
#include <string.h>
#include <sys/epoll.h>
#include <unistd.h>

#include "core.h"
#include "http.h"
#include "introspect.h"
#include "obs.h"

/* -- tide.obs_c: for the daemon's private state ------------------------------ */

/* obs_c.list(kind, {key = value, ...} or {{key, value}, ...}, limit, offset) -> json | nil, err */
static int o_list(lua_State *L) {
  td_list_req_t q;
  memset(&q, 0, sizeof(q));
  q.kind = luaL_checkstring(L, 1);
  if (lua_istable(L, 2)) {
    int n = (int)lua_objlen(L, 2);
    for (int i = 1; i <= n; i++) {
      lua_rawgeti(L, 2, i);
      if (!lua_istable(L, -1)) return luaL_error(L, "list: filter %d is not a {key, value} pair", i);
      lua_rawgeti(L, -1, 1);
      lua_rawgeti(L, -2, 2);
      if (!lua_isstring(L, -2) || !lua_isstring(L, -1)) return luaL_error(L, "list: filter %d needs a key and a value", i);
      if (q.nfilter == TD_LIST_FILTERS) {
        lua_pushnil(L);
        lua_pushfstring(L, "at most %d filters", TD_LIST_FILTERS);
        return 2;
      }
      q.key[q.nfilter] = lua_tostring(L, -2);  /* kept alive by the table */
      q.val[q.nfilter++] = lua_tostring(L, -1);
      lua_pop(L, 3);
    }
  }
  q.limit = (long)luaL_optnumber(L, 3, 100);
  q.offset = (long)luaL_optnumber(L, 4, 0);
  if (!td_ctx.node) return luaL_error(L, "list: no node here");
  td_buf_t b;
  td_buf_init(&b);
  char err[600];
  if (td_introspect_list(td_ctx.node, &q, &b, err, sizeof(err))) {
    td_buf_free(&b);
    lua_pushnil(L);
    lua_pushstring(L, err);
    return 2;
  }
  lua_pushlstring(L, (const char *)b.p, b.len);
  td_buf_free(&b);
  return 1;
}

/* obs_c.metrics() -> the engine's Prometheus text */
static int o_metrics(lua_State *L) {
  if (!td_ctx.node) return luaL_error(L, "metrics: no node here");
  td_buf_t b;
  td_buf_init(&b);
  td_introspect_metrics(td_ctx.node, &b);
  lua_pushlstring(L, (const char *)b.p, b.len);
  td_buf_free(&b);
  return 1;
}

/* obs_c.json_str(s) -> s as a JSON string literal */
static int o_json_str(lua_State *L) {
  size_t n;
  const char *s = luaL_checklstring(L, 1, &n);
  td_buf_t b;
  td_buf_init(&b);
  td_json_str(&b, s, n);
  lua_pushlstring(L, (const char *)b.p, b.len);
  td_buf_free(&b);
  return 1;
}

static td_slice_by_t td__slice_by(lua_State *L, int idx) {
  const char *by = luaL_checkstring(L, idx);
  if (!strcmp(by, "task")) return TD_SLICE_TASK;
  if (!strcmp(by, "actor")) return TD_SLICE_ACTOR;
  luaL_error(L, "log slices are by task or actor, not %s", by);
  return TD_SLICE_TASK;
}

/* obs_c.log_slice(worker_id, "task"|"actor", id, record, max_bytes) ->
 * bytes, next record | nil, why: the prints of one task or actor in a
 * worker's log, from index record `record` on (engine/worklog.h). */
static int o_log_slice(lua_State *L) {
  uint64_t wk = td_core_checkid(L, 1, "worker");
  td_slice_by_t by = td__slice_by(L, 2);
  uint64_t id = td_core_checkid(L, 3, by == TD_SLICE_TASK ? "task" : "actor");
  uint64_t rec = (uint64_t)luaL_optnumber(L, 4, 0);
  size_t max = (size_t)luaL_optnumber(L, 5, 1048576);
  td_buf_t b;
  td_buf_init(&b);
  if (td_obs_log_slice(wk, by, id, &rec, max, &b) != 0) {
    td_buf_free(&b);
    lua_pushnil(L);
    lua_pushfstring(L, "worker %s has no index of prints (it printed none that were a task's or an actor's)",
                    lua_tostring(L, 1));
    return 2;
  }
  lua_pushlstring(L, (const char *)b.p, b.len);
  td_buf_free(&b);
  lua_pushnumber(L, (lua_Number)rec);
  return 2;
}

/* obs_c.log_slice_rotated(worker_id, "task"|"actor", id[, max]) -> bytes | nil:
 * the slice of the part of the worker's log that rotation kept (.1). */
static int o_log_slice_rotated(lua_State *L) {
  uint64_t wk = td_core_checkid(L, 1, "worker");
  td_slice_by_t by = td__slice_by(L, 2);
  uint64_t id = td_core_checkid(L, 3, by == TD_SLICE_TASK ? "task" : "actor");
  size_t max = (size_t)luaL_optnumber(L, 4, 1048576);
  td_buf_t b;
  td_buf_init(&b);
  if (td_obs_log_slice_rotated(wk, by, id, max, &b) != 0) {
    td_buf_free(&b);
    return 0;
  }
  lua_pushlstring(L, (const char *)b.p, b.len);
  td_buf_free(&b);
  return 1;
}

/* obs_c.log_find("task"|"actor", id) -> {worker_id, ...}: the workers on
 * this node whose logs hold its prints. */
static int o_log_find(lua_State *L) {
  td_slice_by_t by = td__slice_by(L, 1);
  uint64_t id = td_core_checkid(L, 2, by == TD_SLICE_TASK ? "task" : "actor");
  uint64_t wks[16];
  int n = td_obs_log_find(by, id, wks, 16);
  lua_createtable(L, n, 0);
  for (int i = 0; i < n; i++) {
    td_core_pushid(L, wks[i]);
    lua_rawseti(L, -2, i + 1);
  }
  return 1;
}

static void td__push_note(void *ud, uint32_t node, const char *name, const uint8_t *p, size_t len) {
  lua_State *L = ud;
  lua_createtable(L, 0, 3);
  lua_pushfstring(L, "node-%d", (int)node);
  lua_setfield(L, -2, "node");
  lua_pushstring(L, name);
  lua_setfield(L, -2, "name");
  lua_pushlstring(L, (const char *)p, len);
  lua_setfield(L, -2, "data");
  lua_rawseti(L, -2, (int)lua_objlen(L, -2) + 1);
}

/* obs_c.notes(topic) -> {{node = "node-N", name, data}, ...}: the latest
 * note under topic of each node joined to this head (td_node_notes). */
static int o_notes(lua_State *L) {
  const char *topic = luaL_checkstring(L, 1);
  lua_newtable(L);
  if (td_ctx.node) td_node_notes(td_ctx.node, topic, td__push_note, L);
  return 1;
}

/* obs_c.node_index() -> this node's index (0: the head). */
static int o_node_index(lua_State *L) {
  lua_pushinteger(L, td_ctx.node ? (lua_Integer)td_node_index(td_ctx.node) : 0);
  return 1;
}

int luaopen_tide_obs_c(lua_State *L) {
  static const luaL_Reg fns[] = {{"list", o_list},
                                 {"metrics", o_metrics},
                                 {"json_str", o_json_str},
                                 {"log_slice", o_log_slice},
                                 {"log_find", o_log_find},
                                 {"notes", o_notes},
                                 {"node_index", o_node_index},
                                 {"log_slice_rotated", o_log_slice_rotated},
                                 {NULL, NULL}};
  lua_newtable(L);
  luaL_register(L, NULL, fns);
  return 1;
}

int td_obs_enable(const char *home) {
  lua_State *L = td_ctx.rpcL;
  if (!L) return TD_EINVAL;
  td_core_setup_paths(L, home);
  lua_pushcfunction(L, luaopen_tide_obs_c);
  lua_setfield(L, -2, "tide.obs_c");
  lua_pop(L, 1);
  lua_getglobal(L, "require");
  lua_pushliteral(L, "tide.obs");
  if (lua_pcall(L, 1, 1, 0) != 0) {
    fprintf(stderr, "tide: cannot load tide.obs: %s\n", lua_tostring(L, -1));
    lua_pop(L, 1);
    return TD_EINVAL;
  }
  lua_setfield(L, LUA_REGISTRYINDEX, "tide.obs");
  return 0;
}

/* -- The dashboard server ---------------------------------------------------- */

static struct {
  td_http_thread_t *th;
  td_http_server_t *srv;
  td_http_inbox_t *ib;
  int ep;                 /* epoll: the daemon's listening socket and the inbox */
  int listen_fd;
  td_node_cb on_accept;
  char token[65];         /* hex; "" when there is no cluster key */
} D = {.ep = -1, .listen_fd = -1};

void td_obs_token(const char *secret, char out[65]) {
  unsigned char h[32];
  static const char ctx[] = "tide dashboard token v1";
  crypto_generichash(h, sizeof(h), (const unsigned char *)ctx, sizeof(ctx) - 1, (const unsigned char *)secret,
                     strlen(secret));
  sodium_bin2hex(out, 65, h, sizeof(h));
}

static int td__loopback(const char *peer) {
  return !strncmp(peer, "127.", 4) || !strcmp(peer, "::1") || !strncmp(peer, "::ffff:127.", 11);
}

/* The token from "Authorization: Bearer T", or from ?token=T (a browser
 * opening the first page). */
static int td__authorized(const td_http_request_t *r) {
  if (td__loopback(r->peer)) return 1;
  if (!D.token[0]) return 0;
  const char *h = td_http_request_header(r, "authorization");
  const char *t = NULL;
  size_t tl = 0;
  if (h && !strncasecmp(h, "Bearer ", 7)) t = h + 7, tl = strlen(t);
  for (const char *q = r->query; !t && q && *q;) {
    const char *amp = strchr(q, '&');
    size_t l = amp ? (size_t)(amp - q) : strlen(q);
    if (l > 6 && !strncmp(q, "token=", 6)) t = q + 6, tl = l - 6;
    q = amp ? amp + 1 : NULL;
  }
  return t && tl == 64 && sodium_memcmp(t, D.token, 64) == 0;
}

static void td__answer(const td_http_request_t *r) {
  static const char refused[] = "403 Forbidden: the dashboard answers other addresses only with its token "
                                "(Authorization: Bearer TOKEN; the head's session directory has it in dashboard.token)\n";
  if (!td__authorized(r)) {
    td_http_header_t h[] = {TD_HTTP_HDR("Content-Type", "text/plain")};
    td_http_respond(D.srv, r->id, 403, h, 1, refused, sizeof(refused) - 1);
    return;
  }
  lua_State *L = td_ctx.rpcL;
  int top = lua_gettop(L);
  lua_getfield(L, LUA_REGISTRYINDEX, "tide.obs");
  lua_getfield(L, -1, "http");
  lua_pushstring(L, r->method);
  lua_pushlstring(L, r->path, r->path_len);
  lua_pushlstring(L, r->query, r->query_len);
  if (lua_pcall(L, 3, 3, 0) != 0) {
    const char *e = lua_tostring(L, -1);
    td_http_header_t h[] = {TD_HTTP_HDR("Content-Type", "text/plain")};
    td_http_respond(D.srv, r->id, 500, h, 1, e ? e : "error", e ? strlen(e) : 5);
    lua_settop(L, top);
    return;
  }
  int status = (int)lua_tointeger(L, -3);
  const char *ct = lua_tostring(L, -2);
  size_t bl = 0;
  const char *body = lua_tolstring(L, -1, &bl);
  td_http_header_t h[] = {TD_HTTP_HDR("Content-Type", ct ? ct : "text/plain"),
                          TD_HTTP_HDR("Cache-Control", "no-store"),
                          TD_HTTP_HDR("X-Content-Type-Options", "nosniff")};
  td_http_respond(D.srv, r->id, status >= 200 && status <= 599 ? status : 500, h, 3, body ? body : "", bl);
  lua_settop(L, top);
}

static void td__on_readable(void *ud) {
  (void)ud;
  struct epoll_event ev[4];
  int k = epoll_wait(D.ep, ev, 4, 0);
  for (int i = 0; i < k; i++) {
    if (ev[i].data.fd == D.listen_fd) {
      if (D.on_accept) D.on_accept(NULL);
      continue;
    }
    td_http_event_t *e;
    /* A bounded batch per pump: the node's own work goes on between. */
    for (int n = 0; n < 64 && (e = td_http_inbox_pop(D.ib)); n++) {
      if (e->kind == TD_HTTP_EV_REQUEST) td__answer(&e->req);
      td_http_event_free(e);
    }
  }
}

int td_obs_dashboard_start(const char *host, int port, const char *secret, int listen_fd, td_node_cb on_accept,
                           int *bound) {
  if (!td_ctx.node || !td_ctx.rpcL) return TD_EINVAL;
  D.token[0] = 0;
  if (secret && secret[0]) td_obs_token(secret, D.token);
  D.ib = td_http_inbox_new();
  if (!D.ib) return TD_ENOMEM;
  td_http_opts_t o;
  memset(&o, 0, sizeof(o));
  o.on_request = td_http_inbox_on_request;
  o.on_abort = td_http_inbox_on_abort;
  o.data = D.ib;
  o.max_body_bytes = 64 * 1024;
  o.max_connections = 256;
  o.max_connections_per_client = 64;
  int rc = td_http_thread_start(&o, host, port, &D.th);
  if (rc) {
    td_http_inbox_destroy(&D.ib);
    return rc;
  }
  D.srv = td_http_thread_server(D.th);
  D.ep = epoll_create1(EPOLL_CLOEXEC);
  D.listen_fd = listen_fd;
  D.on_accept = on_accept;
  struct epoll_event ev = {.events = EPOLLIN};
  ev.data.fd = listen_fd;
  epoll_ctl(D.ep, EPOLL_CTL_ADD, listen_fd, &ev);
  ev.data.fd = td_http_inbox_fd(D.ib);
  epoll_ctl(D.ep, EPOLL_CTL_ADD, ev.data.fd, &ev);
  td_node_watch_fd(td_ctx.node, D.ep, td__on_readable, NULL, NULL);
  *bound = td_http_thread_port(D.th);
  return 0;
}

void td_obs_dashboard_stop(void) {
  if (!D.th) return;
  td_http_thread_stop(&D.th);
  td_http_inbox_destroy(&D.ib);
  if (D.ep >= 0) close(D.ep);
  D.ep = -1;
}
