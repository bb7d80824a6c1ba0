-- An object that many nodes need does not leave its one source once per
-- node: the head directs each fetch to a node that has the object, or is
-- fetching it (which passes on the chunks it has), and a fetch from a node
-- that dies midway finishes from the head. A task's large result stays
-- where it was made until needed. Needs node-1, node-2 and the
-- node whose pid file is in PEER_NODE_PID_FILE (named "peer-node"); that
-- node is killed by the last test.
local t = dofile("tests/lua/harness.lua")
local tide = require("tide")
local T = require("tide.tensor")

local function on(node) return {scheduling_strategy = {node_id = node, soft = false}} end
local peer_node
for _, nd in ipairs(tide.nodes()) do
  if nd.name == "peer-node" then peer_node = nd.node_id end
end

-- An actor keeps what it was given: its node keeps the object, and so
-- can serve it to other nodes.
local Holder = tide.actor({
  hold = function(self, x) self.x = x; return x:numel() end,
  ready = function() return true end,
  probe = function(self, i) return self.x:get(i) end,
})
local probe = tide.remote(function(x)
  local n = x:numel()
  return {n = n, first = x:get(1), mid = x:get(math.floor(n / 2) + 1), last = x:get(n)}
end)

-- A tensor of n f32 whose last element is 9 and the others 1.5.
local function value(n)
  local x = T.full({n}, 1.5)
  x:slice(1, n, n):fill(9)
  return x
end

-- Object bytes each node sent and fetched from other nodes, as its last
-- heartbeat told the head (the head's own figures are current).
local function snapshot()
  local out = {}
  for _, nd in ipairs(tide.nodes()) do
    out[nd.node_id] = {sent = nd.stats.bytes_sent or 0, peers = nd.stats.bytes_from_peers or 0}
  end
  return out
end
local function same(a, b)
  for id, x in pairs(a) do
    if not b[id] or b[id].sent ~= x.sent or b[id].peers ~= x.peers then return false end
  end
  return true
end
-- Settled figures: two readings agree although at least one heartbeat came
-- between them, so no earlier transfer is still on its way into them (on a
-- loaded machine a heartbeat can come late, and a test would count the one
-- before's bytes). A node beats every 1 to 1.25 s (its timers run every
-- 0.25 s): readings 1.1 s apart could both come before the beat that
-- carries a transfer that just ended, and count none of it.
local function traffic()
  local prev = snapshot()
  for _ = 1, 10 do
    tide.sleep(2.5)
    local cur = snapshot()
    if same(prev, cur) then return cur end
    prev = cur
  end
  return prev
end
local function delta(a, b, id, k) return (b[id] and b[id][k] or 0) - (a[id] and a[id][k] or 0) end

local MiB = 1024 * 1024
local n = 6 * MiB  -- 24 MiB: three chunks
local ref = tide.put(value(n))
local holders = {}

t.test("an object two nodes need at once leaves the head once: one node fetches it from the other", function()
  local s0 = traffic()
  holders[1] = Holder:options(on("node-1")):remote()
  holders[2] = Holder:options(on("node-2")):remote()
  local got = tide.get({holders[1]:hold(ref), holders[2]:hold(ref)}, {timeout = 60})
  t.eq(got[1], n)
  t.eq(got[2], n)
  t.eq(tide.get(holders[1]:probe(n)), 9)
  t.eq(tide.get(holders[2]:probe(n)), 9)
  local s1 = traffic()
  local bytes = 4 * n
  local head_sent = delta(s0, s1, "node-0", "sent")
  local peers = delta(s0, s1, "node-1", "peers") + delta(s0, s1, "node-2", "peers")
  t.ok(head_sent >= bytes and head_sent < 2 * bytes,
    string.format("the head sent %d bytes of a %d-byte object needed by two nodes", head_sent, bytes))
  t.ok(peers >= bytes, string.format("the nodes fetched %d bytes from each other, not %d", peers, bytes))
end)

-- A task's large result stays on the node that made it until something
-- needs it: a task that needs it runs there if it fits, a task elsewhere
-- fetches it from there, and the head fetches it only for the driver.
local make = tide.remote(function(k)
  local x = require("tide.tensor").full({k}, 3)
  x:slice(1, k, k):fill(7)
  return x
end)
local where = tide.remote(function(x)
  return {node = tide.get_runtime_context().node_id, n = x:numel(), last = x:get(x:numel())}
end)

t.test("a task that needs a large result made on another node runs where the result is", function()
  local s0 = traffic()
  local r = make:options(on("node-1")):remote(n)
  local w = tide.get(where:remote(r), {timeout = 60})
  t.eq(w.node, "node-1")
  t.eq(w.n, n)
  t.eq(w.last, 7)
  local s1 = traffic()
  t.eq(delta(s0, s1, "node-1", "sent"), 0, "bytes node-1 sent")
end)

t.test("a task on another node fetches a large result from the node that made it, not through the head", function()
  local s0 = traffic()
  local r = make:options(on("node-1")):remote(n)
  local w = tide.get(where:options(on("node-2")):remote(r), {timeout = 60})
  t.eq(w.node, "node-2")
  t.eq(w.last, 7)
  local s1 = traffic()
  t.eq(delta(s0, s1, "node-2", "peers"), 4 * n + 64, "bytes node-2 fetched from other nodes")
  t.eq(delta(s0, s1, "node-1", "sent"), 4 * n + 64, "bytes node-1 sent")
  t.eq(delta(s0, s1, "node-0", "sent"), 0, "bytes the head sent")
  -- The driver asks for it: the head fetches it now, and counts it as
  -- fetched from another node.
  local h0 = snapshot()["node-0"].peers
  local x = tide.get(r, {timeout = 60})
  t.eq(x:numel(), n)
  t.eq(x:get(n), 7)
  t.eq(snapshot()["node-0"].peers - h0, 4 * n + 64, "bytes the head fetched from node-1 for the driver")
end)

t.test("an actor on another node gets a large result as a call argument from the node that made it", function()
  local a = Holder:options(on("node-2")):remote()
  t.eq(tide.get(a:ready(), {timeout = 60}), true)
  local s0 = traffic()
  local r = make:options(on("node-1")):remote(n)
  t.eq(tide.get(a:hold(r), {timeout = 60}), n)
  t.eq(tide.get(a:probe(n)), 7)
  local s1 = traffic()
  t.eq(delta(s0, s1, "node-2", "peers"), 4 * n + 64, "bytes node-2 fetched from other nodes")
  t.eq(delta(s0, s1, "node-0", "sent"), 0, "bytes the head sent")
end)

t.test("an actor's large result goes from its node to a task on another node directly", function()
  local M = tide.actor({make = function(_, k)
    local x = require("tide.tensor").full({k}, 3)
    x:slice(1, k, k):fill(7)
    return x
  end})
  local m = M:options(on("node-1")):remote()
  local s0 = traffic()
  local r = m:make(n)
  local w = tide.get(where:options(on("node-2")):remote(r), {timeout = 60})
  t.eq(w.last, 7)
  local s1 = traffic()
  t.eq(delta(s0, s1, "node-2", "peers"), 4 * n + 64, "bytes node-2 fetched from other nodes")
  t.eq(delta(s0, s1, "node-0", "sent"), 0, "bytes the head sent")
  t.eq(tide.get(r, {timeout = 60}):get(n), 7)  -- and the driver gets it through the head
end)

t.test("a task and an actor on the head get a large result made on a node: the head fetches it first", function()
  local head = {num_cpus = 0, scheduling_strategy = {node_id = "node-0", soft = false}}
  local a = Holder:options(head):remote()
  t.eq(tide.get(a:ready(), {timeout = 60}), true)
  local r = make:options(on("node-1")):remote(n)
  local w = tide.get(where:options(head):remote(r), {timeout = 60})
  t.eq(w.node, "node-0")
  t.eq(w.last, 7)
  local r2 = make:options(on("node-2")):remote(n)
  t.eq(tide.get(a:hold(r2), {timeout = 60}), n)
  t.eq(tide.get(a:probe(n)), 7)
end)

local pidf = os.getenv("PEER_NODE_PID_FILE")
if not peer_node or not pidf then
  t.skip("a third node fetches from the nodes that keep copies", "no node named peer-node, or no PEER_NODE_PID_FILE")
  t.done()
  return
end

t.test("a node that keeps a copy serves the next node that needs it; the head sends nothing", function()
  local s0 = traffic()
  local r = tide.get(probe:options(on(peer_node)):remote(ref), {timeout = 60})
  t.eq(r.n, n)
  t.eq(r.first, 1.5)
  t.eq(r.last, 9)
  local s1 = traffic()
  -- The object's bytes, and the 64 of its encoding's header.
  t.eq(delta(s0, s1, "node-0", "sent"), 0)
  t.eq(delta(s0, s1, peer_node, "peers"), 4 * n + 64)
  t.eq(delta(s0, s1, "node-1", "sent") + delta(s0, s1, "node-2", "sent"), 4 * n + 64)
end)

t.test("a fetch from a node that is killed midway finishes from the head", function()
  -- 256 MiB that only peer-node holds, then node-2 needs it: the head
  -- sends node-2 there, and peer-node dies while the chunks flow.
  local big = 64 * MiB
  local bref = tide.put(value(big))
  local keeper = Holder:options(on(peer_node)):remote()
  t.eq(tide.get(keeper:hold(bref), {timeout = 60}), big)
  local f = io.open(pidf)
  local pid = f and f:read("*n")
  if f then f:close() end
  t.ok(pid, "no pid in " .. pidf)
  local res = probe:options(on("node-2")):remote(bref)
  tide.sleep(0.15)
  os.execute("kill -9 " .. pid)
  local r = tide.get(res, {timeout = 60})
  t.eq(r.n, big)
  t.eq(r.first, 1.5)
  t.eq(r.mid, 1.5)
  t.eq(r.last, 9)
end)

t.done()
