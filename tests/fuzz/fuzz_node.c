/* libFuzzer target: the node's handling of messages from workers, clients
 * and other daemons (engine/node.c) and the value decoder (lua/ser.c).
 * Input is a sequence of frames [u8 type][u16 length][payload]. A frame
 * whose type byte has the top bit set goes to a second node as if from its
 * head (work, packages, chunks, kills); the others go to a head as if from
 * a client, which a JOIN turns into a joined node's link (node info,
 * heartbeats, results, lineage, the end of fetches the head directed) and
 * a PEER into another node's link (chunks only). Neither spawns workers;
 * each payload is also decoded as a value. Malformed input must be rejected, never crash,
 * corrupt or leak.
 */
#include <lauxlib.h>
#include <lualib.h>
#include <stdint.h>
#include <string.h>

#include "node.h"
#include "ser.h"

static td_node_t *node, *node2;
static lua_State *L;

static void mkref(void *ud, lua_State *L2, uint64_t id) {
  (void)ud;
  lua_pushnumber(L2, (lua_Number)id);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  if (!node) {
    td_node_opts_t o;
    memset(&o, 0, sizeof(o));
    o.num_cpus = 2;
    o.num_gpus = 1;
    o.memory = 1 << 30;
    o.store_capacity = 4 << 20;
    o.no_workers = 1;
    node = td_node_new(&o);
    node2 = td_node_new(&o);
    L = luaL_newstate();
    luaL_openlibs(L);
    luaL_newmetatable(L, TD_REF_MT);
    lua_pop(L, 1);
  }
  size_t i = 0;
  while (i + 3 <= size) {
    int to_node2 = data[i] & 0x80;
    uint8_t type = to_node2 ? (uint8_t)((data[i] & 0x7f) % (TD_M_HAVE + 1))
                            : (uint8_t)(TD_M_READY + data[i] % 36);
    uint16_t len;
    memcpy(&len, data + i + 1, 2);
    i += 3;
    if (len > size - i) len = (uint16_t)(size - i);
    if (to_node2) td_node_feed_as(node2, 1, type, data + i, len);
    else td_node_feed(node, type, data + i, len);
    td_deser_t d = {0};
    d.mkref = mkref;
    int top = lua_gettop(L);
    td_deser_value(&d, L, data + i, len);
    lua_settop(L, top);
    i += len;
  }
  /* Scheduling and request checks run as a pump would run them. */
  td_node_pump(node, 0);
  td_node_pump(node2, 0);
  return 0;
}
