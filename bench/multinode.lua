-- The multi-node section of tide bench, run by bench.lua as a driver
-- attached to the head of a 3-node loopback cluster (the head has no CPU,
-- node-1 and node-2 two each), so every task and call crosses nodes.
-- Prints JSON lines; the limits come from bench.lua (same run).
local tide = require("tide")
local raw = require("tide.rawbench")
local pipe_pingpong = tonumber(os.getenv("TD_LIMIT_PINGPONG"))
local pipe_stream = tonumber(os.getenv("TD_LIMIT_STREAM"))
local tcp = tonumber(os.getenv("TD_LIMIT_TCP"))

local C = dofile(os.getenv("TIDE_HOME") .. "/bench/common.lua")
local dp = os.getenv("TD_DATA_PLANE") or "on"

-- CPU seconds (user + system) the head's and node-1's daemons have used:
-- both ends of a transfer from the head to node-1 (the node loops that
-- send, encrypt, receive and decrypt; the task's own process not counted).
local function pid_of(env)
  local f = os.getenv(env) and io.open(os.getenv(env))
  local p = f and f:read("*n")
  if f then f:close() end
  return p
end
local pids = {pid_of("TD_HEAD_PID"), pid_of("TD_NODE1_PID")}
local function cpu_s()
  local t = 0
  for _, p in ipairs(pids) do
    local f = io.open("/proc/" .. p .. "/stat")
    if f then
      local st = f:read("*a")
      f:close()
      local rest = st:match("%) (.*)$") or ""
      local k, ut, stt = 0, 0, 0
      for w in rest:gmatch("%S+") do
        k = k + 1
        if k == 12 then ut = tonumber(w) end
        if k == 13 then stt = tonumber(w) break end
      end
      t = t + (ut + stt) / 100  -- clock ticks (USER_HZ 100)
    end
  end
  return t
end
local emit, rate, batch = C.emit, C.rate, C.batch

local nop = tide.remote(function() return 0 end)
-- After dropping a large object: the drop reaches the head and the nodes
-- before the next one, so their stores reuse the extents they touched.
local function let_go(pause)
  collectgarbage()
  tide.get(nop:remote())
  tide.sleep(pause)
end
for _ = 1, 3 do batch(100, function() return nop:remote() end) end

emit({metric = "multinode_tasks_sync", value = rate(function() tide.get(nop:remote()) end, 1),
  unit = "tasks/s", limit = pipe_pingpong, nodes = 3})
local N = 5000
emit({metric = "multinode_tasks_async", value = rate(function()
  batch(N, function() return nop:remote() end)
end, N, 3), unit = "tasks/s", limit = pipe_stream, nodes = 3})

local Actor = C.actor()
local on = function(k) return {scheduling_strategy = {node_id = "node-" .. k}} end
-- Callers on one node call actors on the other: every call crosses nodes.
local callers = {Actor:options(on(1)):remote(), Actor:options(on(2)):remote()}
local callees = {Actor:options(on(2)):remote(), Actor:options(on(1)):remote()}
tide.get({callers[1]:small(), callers[2]:small(), callees[1]:small(), callees[2]:small()})
N = 2000
emit({metric = "multinode_n_n_actor_calls_async", value = rate(function()
  tide.get({callers[1]:call_n(callees[1], N), callers[2]:call_n(callees[2], N)})
end, 2 * N, 3), unit = "calls/s", limit = pipe_stream, nodes = 3})

-- Placement groups over the nodes: two bundles on two nodes, created
-- (waited for) and removed, from a driver attached to the head.
emit({metric = "multinode_placement_group_create/removal", value = rate(function()
  local pg = tide.placement_group({{CPU = 1}, {CPU = 1}}, {strategy = "STRICT_SPREAD"})
  tide.get(pg:ready())
  tide.remove_placement_group(pg)
end, 1), unit = "pgs/s", nodes = 3, note = "STRICT_SPREAD, 2 bundles on 2 nodes, attached driver"})

-- Object transfer: a value in the head's store read by a task on node-1.
local len = tide.remote(function(s) return #s end)
for _, mib in ipairs({1, 16, 256}) do
  local size = mib * 1024 * 1024
  local reps = mib >= 256 and 2 or (mib >= 16 and 6 or 30)
  local s = string.rep("t", size)
  tide.get(len:options(on(1)):remote(tide.put(s)))  -- warm: the node's store pages
  local best, cpu, moved = 0, 0, 0
  for _ = 1, 3 do
    -- Distinct objects: each is its own transfer (a node fetches an
    -- object once, however many of its tasks use it).
    local objs = {}
    for i = 1, reps do objs[i] = tide.put(s) end
    local c0, t0 = cpu_s(), raw.now()
    local refs = {}
    for i = 1, reps do refs[i] = len:options(on(1)):remote(objs[i]) end
    tide.get(refs)
    local bw = reps * size / (raw.now() - t0)
    cpu, moved = cpu + cpu_s() - c0, moved + reps * size
    if bw > best then best = bw end
    objs, refs = nil, nil -- luacheck: ignore 311
    collectgarbage()
  end
  emit({metric = "multinode_object_transfer_" .. mib .. "MiB", value = best / 1e9, unit = "GB/s",
    limit = tcp / 1e9, ratio = best / tcp, data_plane = dp, cpu_core_s_per_GB = cpu / (moved / 1e9),
    note = "head store -> node-1 store -> worker, distinct objects, best of 3; ratio: of raw TCP loopback " ..
      "this run; cpu: head + node-1 daemons, all 3 rounds"})
  s = nil -- luacheck: ignore 311
  collectgarbage()
end

-- Objects of 2 GiB and more: a 2.1 GiB tensor (mapped where it lands, not
-- decoded) from the head's store to a task on node-1; the third of three
-- transfers, so both stores' pages are touched already.
do
  local T = require("tide.tensor")
  local n = math.floor(2.1 * 1024 ^ 3 / 4)
  local x = T.full({n}, 1)
  local count = tide.remote(function(t) return t:numel() end)
  local bw, cpu
  for _ = 1, 3 do
    local r = tide.put(x)
    local c0, t0 = cpu_s(), raw.now()
    assert(tide.get(count:options(on(1)):remote(r)) == n)
    bw = n * 4 / (raw.now() - t0)
    cpu = cpu_s() - c0
    r = nil -- luacheck: ignore 311
    let_go(0.5)
  end
  emit({metric = "multinode_object_transfer_2GiB", value = bw / 1e9, unit = "GB/s", limit = tcp / 1e9,
    ratio = bw / tcp, data_plane = dp, cpu_core_s_per_GB = cpu / (n * 4 / 1e9),
    note = "a 2.1 GiB tensor, head store -> node-1 store, mapped by the task; third of three"})
  x = nil -- luacheck: ignore 311
  collectgarbage()
end

-- Broadcast: one 64 MiB tensor needed at once by a task on each node. The
-- head sends it about once: one node fetches it from the other, which
-- passes the chunks on as they land (bytes delivered to both / time).
do
  local T = require("tide.tensor")
  local n = 16 * 1024 * 1024
  local x = T.full({n}, 1)
  local count = tide.remote(function(t) return t:numel() end)
  local function head_sent()
    for _, nd in ipairs(tide.nodes()) do
      if nd.node_id == "node-0" then return nd.stats.bytes_sent end
    end
  end
  local best, sent0, reps = 0, head_sent(), 3
  for _ = 1, reps do
    local r = tide.put(x)
    local t0 = raw.now()
    tide.get({count:options(on(1)):remote(r), count:options(on(2)):remote(r)})
    local bw = 2 * n * 4 / (raw.now() - t0)
    if bw > best then best = bw end
    r = nil -- luacheck: ignore 311
    let_go(0.3)
  end
  emit({metric = "multinode_object_broadcast_64MiB", value = best / 1e9, unit = "GB/s", limit = tcp / 1e9,
    ratio = best / tcp, data_plane = dp,
    note = string.format("a 64 MiB tensor to a task on each of 2 nodes at once, bytes delivered / time, " ..
      "best of %d; the head sent %.2f copies per broadcast", reps, (head_sent() - sent0) / (reps * n * 4))})
  x = nil -- luacheck: ignore 311
  collectgarbage()
end

-- A chain across nodes: a 64 MiB result made on node-1, needed by a task on
-- node-2, goes from node-1 to node-2 directly (it stays where it was made),
-- not through the head.
do
  local make = tide.remote(function(k) return require("tide.tensor").full({k}, 1) end)
  local count = tide.remote(function(t) return t:numel() end)
  local n = 16 * 1024 * 1024
  local best = math.huge
  for _ = 1, 3 do
    local t0 = raw.now()
    local r = make:options(on(1)):remote(n)
    assert(tide.get(count:options(on(2)):remote(r)) == n)
    best = math.min(best, raw.now() - t0)
    r = nil -- luacheck: ignore 311
    let_go(0.3)
  end
  emit({metric = "multinode_result_to_task_64MiB", value = n * 4 / best / 1e9, unit = "GB/s", limit = tcp / 1e9,
    note = "a task on node-1 makes a 64 MiB tensor, a task on node-2 reads it (node to node); " ..
      "bytes / time from the first submit to the second result, best of 3"})
end

-- A 64 MiB tensor from an actor on node-1 to an actor on node-2 (issue
-- 16, item 4), both ways in the same run: a plain method's result through
-- the object store (node to node) and a tide.method with tensor_transport
-- = "collective" (sent over the pair's group, its encrypted streams).
do
  local Side = tide.actor({
    setup = function(self, rank)
      require("tide.collective").init_group(2, rank, "bench-rdt-mn", {timeout = 30})
      self.x = require("tide.tensor").ones({16 * 1024 * 1024})
    end,
    plain = function(self) return self.x end,
    direct = tide.method({tensor_transport = "collective"}, function(self) return self.x end),
    first = function(_, x) return x:get(1) end,
  })
  local p = Side:options({own_process = true, scheduling_strategy = {node_id = "node-1"}}):remote()
  local c = Side:options({own_process = true, scheduling_strategy = {node_id = "node-2"}}):remote()
  tide.get({p:setup(0), c:setup(1)}, {timeout = 60})
  for _, way in ipairs({"plain", "direct"}) do
    local best = math.huge
    for i = 1, 4 do
      local t0 = raw.now()
      tide.get(c:first(p[way](p)), {timeout = 60})
      if i > 1 then best = math.min(best, raw.now() - t0) end  -- the first warms up
      let_go(0.3)
    end
    emit({metric = "multinode_actor_tensor_64MiB_" .. (way == "plain" and "object_store" or "direct"),
      value = 64 * 1024 * 1024 / best / 1e9, unit = "GB/s", limit = tcp / 1e9, data_plane = dp,
      note = "an actor on node-1 returns a 64 MiB tensor, an actor on node-2 reads one element of it; " ..
        "bytes / time per call pair, best of 3 after a warm-up"})
  end
  tide.kill(p)
  tide.kill(c)
end

-- Node death: an actor on node-2 with a restart left answers again from
-- another node; the time includes detection (the heartbeat timeout).
local pidfile = os.getenv("TD_NODE2_PID")
if pidfile then
  local P = tide.actor({where = function() return tide.get_runtime_context().node_id end})
  local a = P:options({max_restarts = 1, max_task_retries = 1, num_cpus = 1,
    scheduling_strategy = {node_id = "node-2", soft = true}}):remote()
  assert(tide.get(a:where()) == "node-2")
  local t0 = raw.now()
  os.execute("kill -9 $(cat " .. pidfile .. ")")
  local where = tide.get(a:where(), {timeout = 60})
  emit({metric = "multinode_node_death_to_actor_restart", value = raw.now() - t0, unit = "s",
    note = "kill -9 of node-2 until its actor answers from " .. where ..
      " (node timeout " .. (os.getenv("TD_NODE_TIMEOUT") or "5") .. " s)"})
end
