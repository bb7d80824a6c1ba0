-- Runs attached to the head of a 3-node cluster (tests/sh/multinode_test.sh):
-- node-0 the head (no CPU), node-1 {CPU=2, A=1}, node-2 {CPU=2, GPU=2}.
local t = dofile("tests/lua/harness.lua")
local tide = require("tide")

local where = tide.remote(function() return tide.get_runtime_context().node_id end)

t.test("tide.nodes() lists the three nodes with their resources", function()
  local ns = tide.nodes()
  t.eq(#ns, 3)
  local by = {}
  for _, n in ipairs(ns) do by[n.node_id] = n end
  t.eq(by["node-1"].resources.A, 1)
  t.eq(by["node-2"].resources.GPU, 2)
  t.eq(tide.cluster_resources().CPU, 4)
end)

t.test("a custom resource sends the task to the node that has it", function()
  t.eq(tide.get(where:options({resources = {A = 1}}):remote()), "node-1")
end)

t.test("a GPU task runs on the GPU node with CUDA_VISIBLE_DEVICES set", function()
  local f = tide.remote(function()
    return tide.get_runtime_context().node_id .. " " .. tostring(os.getenv("CUDA_VISIBLE_DEVICES"))
  end)
  t.ok(tide.get(f:options({num_gpus = 1}):remote()):match("^node%-2 [01]$"))
end)

t.test("hard node affinity runs there; to a missing node it fails; soft falls back", function()
  t.eq(tide.get(where:options({scheduling_strategy = {node_id = "node-2"}}):remote()), "node-2")
  t.eq(tide.get(where:options({scheduling_strategy = {node_id = "node-1", soft = true}}):remote()), "node-1")
  t.raises(function()
    tide.get(where:options({scheduling_strategy = {node_id = "node-9"}}):remote(), {timeout = 10})
  end, "node%-9")
  local n = tide.get(where:options({scheduling_strategy = {node_id = "node-9", soft = true}}):remote())
  t.ok(n == "node-1" or n == "node-2", n)
end)

t.test("SPREAD reaches every node with CPUs", function()
  local refs, seen = {}, {}
  for i = 1, 40 do refs[i] = where:options({scheduling_strategy = "SPREAD"}):remote() end
  for _, n in ipairs(tide.get(refs)) do seen[n] = (seen[n] or 0) + 1 end
  t.ok((seen["node-1"] or 0) >= 5 and (seen["node-2"] or 0) >= 5,
    string.format("node-1 %d, node-2 %d", seen["node-1"] or 0, seen["node-2"] or 0))
end)

t.test("a demand no node can meet fails at once, naming it", function()
  t.raises(function() tide.get(where:options({resources = {A = 5}}):remote(), {timeout = 10}) end,
    "infeasible.*A = 5")
end)

t.test("an actor on another node keeps its state; a task there finds it by name", function()
  local C = tide.actor({
    init = function(s, n) s.n = n end,
    add = function(s, k) s.n = s.n + k; return s.n end,
    node = function() return tide.get_runtime_context().node_id end,
  })
  local c = C:options({name = "mn-counter", resources = {A = 0.5}}):remote(10)
  t.eq(tide.get(c:node()), "node-1")
  t.eq(tide.get(c:add(5)), 15)
  local viaTask = tide.remote(function()
    return tide.get(tide.get_actor("mn-counter"):add(1)), tide.get_runtime_context().node_id
  end)
  local r1, r2 = viaTask:options({num_returns = 2, num_gpus = 1}):remote()
  t.eq(tide.get(r1), 16)
  t.eq(tide.get(r2), "node-2")
  tide.kill(c)
end)

t.test("large values cross nodes both ways, and refs inside values follow", function()
  local big = string.rep("x", 20 * 1024 * 1024)  -- over TD_CHUNK: chunked both ways
  local f = tide.remote(function(s) return #s, string.rep("y", #s) end)
  local a, b = f:options({num_returns = 2, resources = {A = 1}}):remote(big)
  t.eq(tide.get(a), #big)
  t.eq(#tide.get(b), #big)
  local mk = tide.remote(function() return {tide.put("inner"), tide.put(string.rep("z", 200000))} end)
  local v = tide.get(mk:options({resources = {A = 1}}):remote())
  t.eq(tide.get(v[1]), "inner")
  t.eq(#tide.get(v[2]), 200000)
  local r = tide.put({1, 2, 3})
  local g = tide.remote(function(tab) return tide.get(tab[1])[2] end)
  t.eq(tide.get(g:options({num_gpus = 1}):remote({r})), 2)
end)

t.test("a task on one node calls remote functions that run on another", function()
  local inner = tide.remote(function(x) return x * 10, tide.get_runtime_context().node_id end)
  local outer = tide.remote(function(x)
    local a, b = inner:options({num_returns = 2, num_gpus = 1}):remote(x)
    return tide.get(a) + 1, tide.get(b)
  end)
  local a, b = outer:options({num_returns = 2, resources = {A = 1}}):remote(4)
  t.eq(tide.get(a), 41)
  t.eq(tide.get(b), "node-2")
end)

t.test("errors carry the remote traceback; streams yield across nodes", function()
  local bad = tide.remote(function() error("boom on a node") end)
  t.raises(function() tide.get(bad:options({resources = {A = 1}}):remote()) end, "boom on a node")
  local gen = tide.remote(function(n) for i = 1, n do tide.yield(i * i) end end)
  local out = {}
  for r in gen:options({num_returns = "streaming", resources = {A = 1}}):remote(5) do out[#out + 1] = tide.get(r) end
  t.eq(table.concat(out, ","), "1,4,9,16,25")
end)

t.test("a worker killed on a remote node: the task is retried there", function()
  local marker = os.tmpname()
  os.remove(marker)
  local f = tide.remote(function(m)
    local fh = io.open(m, "r")
    if not fh then
      io.open(m, "w"):close()
      os.execute("kill -9 " .. tide.get_runtime_context().pid)
    end
    if fh then fh:close() end
    return "survived"
  end)
  t.eq(tide.get(f:options({resources = {A = 1}, max_retries = 2}):remote(marker), {timeout = 30}), "survived")
  os.remove(marker)
end)

t.test("placement groups across nodes: all four strategies, all bundles or none", function()
  local where_in = function(pg, b)
    return tide.get(where:options({placement_group = pg, bundle_index = b, num_cpus = 1}):remote())
  end
  local cpu0 = tide.available_resources().CPU
  local ss = tide.placement_group({{CPU = 1}, {CPU = 1}}, {strategy = "STRICT_SPREAD"})
  t.eq(tide.get(ss:ready(), {timeout = 10}), true)
  t.ok(where_in(ss, 1) ~= where_in(ss, 2), "STRICT_SPREAD bundles on one node")
  t.eq(tide.available_resources().CPU, cpu0 - 2)
  tide.remove_placement_group(ss)
  local sp = tide.placement_group({{CPU = 2}}, {strategy = "STRICT_PACK"})
  t.eq(tide.get(sp:ready(), {timeout = 10}), true)
  local sp2 = tide.placement_group({{CPU = 1}, {CPU = 1}}, {strategy = "STRICT_PACK"})
  t.eq(tide.get(sp2:ready(), {timeout = 10}), true)
  t.eq(where_in(sp2, 1), where_in(sp2, 2))
  t.ok(where_in(sp, 1) ~= where_in(sp2, 1), "two full nodes, two groups")
  tide.remove_placement_group(sp)
  tide.remove_placement_group(sp2)
  local a = tide.placement_group({{A = 1}, {GPU = 1}}, {strategy = "SPREAD"})
  t.eq(tide.get(a:ready(), {timeout = 10}), true)
  t.eq(tide.get(where:options({placement_group = a, bundle_index = 1, num_cpus = 0, resources = {A = 1}}):remote()), "node-1")
  t.eq(tide.get(where:options({placement_group = a, bundle_index = 2, num_cpus = 0, num_gpus = 1}):remote()), "node-2")
  tide.remove_placement_group(a)
  -- Three CPU bundles on distinct nodes: only two nodes have CPUs, so
  -- none is reserved.
  local none = tide.placement_group({{CPU = 1}, {CPU = 1}, {CPU = 1}}, {strategy = "STRICT_SPREAD"})
  t.raises(function() tide.get(none:ready(), {timeout = 1}) end, "GetTimeoutError")
  t.eq(tide.available_resources().CPU, cpu0)
  tide.remove_placement_group(none)
  local p = tide.placement_group({{CPU = 1}, {CPU = 1}, {CPU = 1}}, {strategy = "PACK"})
  t.eq(tide.get(p:ready(), {timeout = 10}), true)
  tide.remove_placement_group(p)
  t.eq(tide.available_resources().CPU, cpu0)
end)

t.test("a task's runtime_env working_dir is shipped to the node that runs it", function()
  local dir = os.tmpname()
  os.remove(dir)
  os.execute("mkdir -p " .. dir .. "/sub")
  local f = io.open(dir .. "/shipped_mod.lua", "w")
  f:write("return {answer = 42}\n")
  f:close()
  f = io.open(dir .. "/sub/data.txt", "w")
  f:write("deep")
  f:close()
  local g = tide.remote(function()
    local m = require("shipped_mod")
    local d = io.open("sub/data.txt"):read("*a")
    return m.answer .. " " .. d .. " " .. io.popen("pwd"):read("*l")
  end)
  for _, node in ipairs({"node-1", "node-2"}) do
    local out = tide.get(g:options({runtime_env = {working_dir = dir},
      scheduling_strategy = {node_id = node}}):remote(), {timeout = 30})
    local answer, data, cwd = out:match("^(%S+) (%S+) (.*)$")
    t.eq(answer, "42")
    t.eq(data, "deep")
    t.ok(cwd ~= dir, "ran in the head's directory, not a shipped copy: " .. cwd)
  end
  os.execute("rm -rf " .. dir)
end)

t.test("1000 tasks over two nodes all come back right", function()
  local sq = tide.remote(function(x) return x * x end)
  local refs = {}
  for i = 1, 1000 do refs[i] = sq:options({scheduling_strategy = "SPREAD"}):remote(i) end
  local v = tide.get(refs)
  local ok = true
  for i = 1, 1000 do ok = ok and v[i] == i * i end
  t.ok(ok)
end)

t.done()
