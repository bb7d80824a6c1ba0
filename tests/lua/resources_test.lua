-- Resources and scheduling: CPU, (fake) GPU with CUDA_VISIBLE_DEVICES and
-- gpu_ids, memory, custom resources, waiting for resources, placement groups,
-- scheduling strategies, nodes and the runtime context.
local t = dofile("tests/lua/harness.lua")
local tide = require("tide")
tide.init({num_cpus = 2, num_gpus = 2, resources = {A = 1, B = 3}})

-- Lets n callers meet: arrive() returns true once n have arrived (false
-- after `limit` seconds). Needs max_concurrency >= n.
local Latch = tide.actor({
  init = function(self, n) self.n = n; self.count = 0 end,
  arrive = function(self, limit)
    self.count = self.count + 1
    local waited = 0
    while self.count < self.n and waited < limit do tide.sleep(0.02); waited = waited + 0.02 end
    return self.count >= self.n
  end,
})

-- Monotonic seconds, the same clock in every process on this machine.
local function now()
  local ffi = require("ffi")
  pcall(ffi.cdef, "struct tide_test_ts { long s; long ns; }; int clock_gettime(int, struct tide_test_ts *);")
  local ts = ffi.new("struct tide_test_ts")
  ffi.C.clock_gettime(1, ts)
  return tonumber(ts.s) + tonumber(ts.ns) * 1e-9
end

-- Largest number of [start, finish] intervals that overlap at one instant.
local function max_overlap(iv)
  local ev = {}
  for _, x in ipairs(iv) do ev[#ev + 1] = {x[1], 1}; ev[#ev + 1] = {x[2], -1} end
  table.sort(ev, function(a, b) if a[1] ~= b[1] then return a[1] < b[1] end return a[2] < b[2] end)
  local cur, peak = 0, 0
  for _, e in ipairs(ev) do cur = cur + e[2]; if cur > peak then peak = cur end end
  return peak
end

local function wait_idle()
  -- until no task holds CPU or GPU (for checks on available_resources)
  for _ = 1, 500 do
    local a = tide.available_resources()
    if a.CPU == 2 and a.GPU == 2 then return a end
    tide.sleep(0.02)
  end
  return tide.available_resources()
end

t.test("cluster_resources and available_resources report the configured amounts", function()
  local c = tide.cluster_resources()
  t.eq(c.CPU, 2); t.eq(c.GPU, 2); t.eq(c.A, 1); t.eq(c.B, 3)
  t.ok(type(c.memory) == "number" and c.memory > 0, "memory missing from cluster_resources")
  local a = wait_idle()
  t.eq(a.CPU, 2); t.eq(a.GPU, 2); t.eq(a.A, 1); t.eq(a.B, 3)
end)

t.test("tide.nodes() lists one live node with its resources", function()
  local ns = tide.nodes()
  t.eq(#ns, 1)
  local n = ns[1]
  t.ok(type(n.node_id) == "string" and n.node_id ~= "", "node_id missing")
  t.ok(type(n.address) == "string" and n.address ~= "", "address missing")
  t.eq(n.alive, true)
  t.eq(n.resources.CPU, 2); t.eq(n.resources.GPU, 2); t.eq(n.resources.A, 1)
end)

t.test("runtime context in the driver", function()
  local c = tide.get_runtime_context()
  local f = io.open("/proc/self/stat")
  local mypid = tonumber(f:read("*a"):match("^(%d+)"))
  f:close()
  t.eq(c.pid, mypid)
  t.ok(c.job_id ~= nil and c.job_id ~= "", "job_id missing")
  t.eq(c.node_id, tide.nodes()[1].node_id)
  t.eq(c.actor_id, nil)
  t.eq(type(c.gpu_ids), "table"); t.eq(#c.gpu_ids, 0)
end)

t.test("runtime context in tasks: same job and node, own task ids and worker", function()
  local ctx = tide.remote(function() return tide.get_runtime_context() end)
  local a, b = tide.get(ctx:remote()), tide.get(ctx:remote())
  local d = tide.get_runtime_context()
  t.eq(a.job_id, d.job_id); t.eq(a.node_id, d.node_id)
  t.ok(a.task_id ~= nil and b.task_id ~= nil and a.task_id ~= b.task_id, "task ids missing or equal")
  t.ok(a.worker_id ~= nil, "worker_id missing")
  t.ok(a.pid ~= d.pid, "task ran in the driver")
  t.eq(a.actor_id, nil)
end)

t.test("runtime context in actors: actor_id stable across calls, distinct per actor", function()
  local A = tide.actor({init = function(self) end, ctx = function(self) return tide.get_runtime_context() end})
  local x, y = A:remote(), A:remote()
  local x1, x2, y1 = tide.get(x:ctx()), tide.get(x:ctx()), tide.get(y:ctx())
  t.ok(x1.actor_id ~= nil, "actor_id missing")
  t.eq(x1.actor_id, x2.actor_id)
  t.ok(x1.actor_id ~= y1.actor_id, "two actors share an actor_id")
end)

t.test("a task with num_gpus = 1 sees CUDA_VISIBLE_DEVICES equal to its gpu_ids", function()
  local g = tide.remote({num_gpus = 1}, function()
    local c = tide.get_runtime_context()
    return {os.getenv("CUDA_VISIBLE_DEVICES"), c.gpu_ids}
  end)
  local v = tide.get(g:remote())
  t.eq(#v[2], 1)
  t.eq(v[1], tostring(v[2][1]))
  t.ok(v[1] == "0" or v[1] == "1", "unexpected GPU id " .. tostring(v[1]))
end)

t.test("two concurrent one-GPU tasks get different GPUs", function()
  local latch = Latch:options({max_concurrency = 2}):remote(2)
  local g = tide.remote({num_gpus = 1}, function(l)
    local met = tide.get(l:arrive(30))
    return {met, os.getenv("CUDA_VISIBLE_DEVICES")}
  end)
  local r = tide.get({g:remote(latch), g:remote(latch)}, {timeout = 60})
  t.ok(r[1][1] and r[2][1], "the two GPU tasks did not run at the same time")
  t.ok(r[1][2] ~= r[2][2], "both tasks got GPU " .. tostring(r[1][2]))
end)

t.test("a task with num_gpus = 2 gets both GPUs", function()
  local g = tide.remote({num_gpus = 2}, function()
    local c = tide.get_runtime_context()
    local ids = {}
    for i, id in ipairs(c.gpu_ids) do ids[i] = tostring(id) end
    table.sort(ids)
    return {os.getenv("CUDA_VISIBLE_DEVICES"), table.concat(ids, ",")}
  end)
  local v = tide.get(g:remote())
  t.eq(v[2], "0,1")
  local seen = {}
  for id in tostring(v[1]):gmatch("[^,]+") do seen[#seen + 1] = id end
  table.sort(seen)
  t.eq(table.concat(seen, ","), "0,1")
end)

t.test("a task without GPUs sees no GPU (after GPU tasks ran in the pool)", function()
  local g = tide.remote({num_gpus = 1}, function() return os.getenv("CUDA_VISIBLE_DEVICES") end)
  tide.get({g:remote(), g:remote(), g:remote()})
  local plain = tide.remote(function()
    return {os.getenv("CUDA_VISIBLE_DEVICES"), #tide.get_runtime_context().gpu_ids}
  end)
  local refs = {}
  for i = 1, 6 do refs[i] = plain:remote() end
  local vals = tide.get(refs)
  for i = 1, 6 do
    t.eq(vals[i][2], 0, "gpu_ids of a CPU task")
    t.ok(vals[i][1] == nil or vals[i][1] == "",
      "CPU task sees CUDA_VISIBLE_DEVICES=" .. tostring(vals[i][1]))
  end
end)

t.test("GPU tasks never exceed the GPUs: 6 one-GPU tasks, at most 2 at once", function()
  -- no blocking get inside: a task blocked in tide.get may lend its CPU
  local g = tide.remote({num_gpus = 1, num_cpus = 0}, function()
    local t0 = now(); tide.sleep(0.1)
    return {t0, now(), os.getenv("CUDA_VISIBLE_DEVICES")}
  end)
  local refs = {}
  for i = 1, 6 do refs[i] = g:remote() end
  local iv = tide.get(refs, {timeout = 60})
  t.ok(max_overlap(iv) <= 2, "more GPU tasks at once than GPUs: " .. max_overlap(iv))
  for i = 1, 6 do
    t.ok(iv[i][3] == "0" or iv[i][3] == "1", "bad CUDA_VISIBLE_DEVICES " .. tostring(iv[i][3]))
    for j = i + 1, 6 do
      if iv[i][1] < iv[j][2] and iv[j][1] < iv[i][2] then
        t.ok(iv[i][3] ~= iv[j][3], "overlapping GPU tasks share GPU " .. tostring(iv[i][3]))
      end
    end
  end
end)

t.test("an actor with num_gpus = 1 gets its own process and holds the GPU while alive", function()
  wait_idle()
  local A = tide.actor({init = function(self) end, info = function(self)
    local c = tide.get_runtime_context()
    return {os.getenv("CUDA_VISIBLE_DEVICES"), c.pid, c.gpu_ids[1]}
  end})
  local cpu_actors = {}
  for i = 1, 4 do cpu_actors[i] = A:remote() end
  local cpu_pids = {}
  for i = 1, 4 do cpu_pids[tide.get(cpu_actors[i]:info())[2]] = true end
  local ga = A:options({num_gpus = 1}):remote()
  local gb = A:options({num_gpus = 1}):remote()
  local ia, ib = tide.get(ga:info()), tide.get(gb:info())
  t.ok(ia[1] ~= nil and ia[1] == tostring(ia[3]), "GPU actor: CUDA_VISIBLE_DEVICES " .. tostring(ia[1]))
  t.ok(ia[1] ~= ib[1], "two GPU actors share GPU " .. tostring(ia[1]))
  t.ok(not cpu_pids[ia[2]] and not cpu_pids[ib[2]], "GPU actor shares a process with CPU actors")
  t.ok(ia[2] ~= ib[2], "two GPU actors share a process")
  t.eq(tide.available_resources().GPU, 0, "GPU actors should hold their GPUs")
  tide.kill(ga); tide.kill(gb)
  local a
  for _ = 1, 500 do
    a = tide.available_resources()
    if a.GPU == 2 then break end
    tide.sleep(0.02)
  end
  t.eq(a.GPU, 2, "GPUs not returned after killing the GPU actors")
end)

t.test("a task waits until its custom resource is free (A = 1)", function()
  local hold = tide.remote({resources = {A = 1}}, function(s) tide.sleep(s); return "held" end)
  local first = hold:remote(60)
  -- wait until the first one holds A
  for _ = 1, 500 do if tide.available_resources().A == 0 then break end tide.sleep(0.02) end
  local held = tide.available_resources().A
  local second = hold:remote(0)
  local ready = tide.wait({second}, {timeout = 0.5})
  tide.cancel(first, {force = true})
  t.eq(held, 0, "A not held by the running task")
  t.eq(#ready, 0, "second A=1 task ran while the first held A")
  t.eq(tide.get(second, {timeout = 30}), "held", "second task did not run once A was free")
end)

t.test("tasks on a custom resource never overlap beyond its amount", function()
  local f = tide.remote({resources = {A = 1}, num_cpus = 0}, function()
    local t0 = now(); tide.sleep(0.05); return {t0, now()}
  end)
  local refs = {}
  for i = 1, 5 do refs[i] = f:remote() end
  t.eq(max_overlap(tide.get(refs, {timeout = 60})), 1)
end)

t.test("fractional custom resources: B = 3 lets three B = 1 tasks run at once", function()
  local latch = Latch:options({max_concurrency = 3}):remote(3)
  local f = tide.remote({resources = {B = 1}, num_cpus = 0}, function(l) return tide.get(l:arrive(30)) end)
  local r = tide.get({f:remote(latch), f:remote(latch), f:remote(latch)}, {timeout = 60})
  t.ok(r[1] and r[2] and r[3], "three B=1 tasks did not run concurrently")
end)

t.test("a task asking for 2 CPUs runs alone", function()
  local two = tide.remote({num_cpus = 2}, function()
    local t0 = now(); tide.sleep(0.05); return {t0, now()}
  end)
  local refs = {}
  for i = 1, 3 do refs[i] = two:remote() end
  t.eq(max_overlap(tide.get(refs, {timeout = 60})), 1, "num_cpus = 2 tasks overlapped on 2 CPUs")
end)

t.test("one-CPU tasks: at most 2 at once on 2 CPUs", function()
  local one = tide.remote(function()
    local t0 = now(); tide.sleep(0.05); return {t0, now()}
  end)
  local refs = {}
  for i = 1, 6 do refs[i] = one:remote() end
  t.ok(max_overlap(tide.get(refs, {timeout = 60})) <= 2, "more one-CPU tasks at once than CPUs")
end)

t.test("fractional CPUs share: four num_cpus = 0.5 tasks run at once on 2 CPUs", function()
  local Count = tide.actor({
    init = function(self) self.n = 0 end,
    arrive = function(self) self.n = self.n + 1 end,
    n = function(self) return self.n end,
  })
  local c = Count:remote()
  -- arrive without waiting, then hold the CPU share (no blocking get)
  local half = tide.remote({num_cpus = 0.5}, function(c) c:arrive(); tide.sleep(60) end)
  local refs = {}
  for i = 1, 4 do refs[i] = half:remote(c) end
  local n = 0
  for _ = 1, 1000 do
    n = tide.get(c:n())
    if n >= 4 then break end
    tide.sleep(0.02)
  end
  for i = 1, 4 do tide.cancel(refs[i], {force = true}) end
  for i = 1, 4 do pcall(tide.get, refs[i], {timeout = 30}) end
  t.eq(n, 4, "num_cpus = 0.5 tasks running at once")
end)

t.test("the memory resource is accounted while a task runs", function()
  local total = tide.cluster_resources().memory
  local m = tide.remote({memory = 1e9}, function(s) tide.sleep(s) end)
  local r = m:remote(60)
  local during
  for _ = 1, 500 do
    during = tide.available_resources().memory
    if during <= total - 1e9 + 1 then break end
    tide.sleep(0.02)
  end
  tide.cancel(r, {force = true})
  pcall(tide.get, r, {timeout = 30})
  t.ok(during <= total - 1e9 + 1, "memory not deducted: total " .. total .. ", during " .. during)
end)

t.test("placement group PACK: ready, holds its resources, tasks run in its bundles", function()
  wait_idle()
  local pg = tide.placement_group({{CPU = 1}, {CPU = 1}}, {strategy = "PACK"})
  t.eq(tide.get(pg:ready(), {timeout = 30}), true)
  t.eq(tide.available_resources().CPU, 0, "pg bundles should hold the CPUs")
  local f = tide.remote(function(i) return i * 10 end)
  local r1 = f:options({placement_group = pg, bundle_index = 1}):remote(1)
  local r2 = f:options({placement_group = pg, bundle_index = 2}):remote(2)
  local r3 = f:options({placement_group = pg}):remote(3)
  t.deep_eq({tide.get(r1, {timeout = 30}), tide.get(r2, {timeout = 30}), tide.get(r3, {timeout = 30})},
    {10, 20, 30})
  -- a task outside the pg waits: the pg holds every CPU
  local outside = f:remote(4)
  local ready = tide.wait({outside}, {timeout = 0.5})
  tide.remove_placement_group(pg)
  t.eq(#ready, 0, "a task outside the pg used the pg's CPUs")
  t.eq(tide.get(outside, {timeout = 30}), 40, "task did not run after the pg was removed")
  t.eq(wait_idle().CPU, 2, "CPUs not returned after remove_placement_group")
end)

t.test("placement group STRICT_PACK with custom and GPU bundles", function()
  wait_idle()
  local pg = tide.placement_group({{CPU = 1, GPU = 1}, {A = 1}}, {strategy = "STRICT_PACK"})
  t.eq(tide.get(pg:ready(), {timeout = 30}), true)
  local a = tide.available_resources()
  t.eq(a.GPU, 1); t.eq(a.A, 0); t.eq(a.CPU, 1)
  local g = tide.remote({num_gpus = 1, placement_group = pg, bundle_index = 1}, function()
    return os.getenv("CUDA_VISIBLE_DEVICES")
  end)
  local id = tide.get(g:remote(), {timeout = 30})
  t.ok(id == "0" or id == "1", "GPU task in a pg got CUDA_VISIBLE_DEVICES=" .. tostring(id))
  local ua = tide.remote({resources = {A = 1}, num_cpus = 0, placement_group = pg, bundle_index = 2},
    function() return "used A" end)
  t.eq(tide.get(ua:remote(), {timeout = 30}), "used A")
  tide.remove_placement_group(pg)
  local b = wait_idle()
  t.eq(b.GPU, 2); t.eq(b.CPU, 2)
  for _ = 1, 500 do if tide.available_resources().A == 1 then break end tide.sleep(0.02) end
  t.eq(tide.available_resources().A, 1)
end)

t.test("a placement group that cannot fit is not ready", function()
  local pg = tide.placement_group({{CPU = 1}, {CPU = 1}, {CPU = 1}}, {strategy = "PACK"})
  local ready = tide.wait({pg:ready()}, {timeout = 0.5})
  t.eq(#ready, 0, "a pg needing 3 CPUs on a 2-CPU node became ready")
  tide.remove_placement_group(pg)
  t.eq(wait_idle().CPU, 2)
end)

t.test("an actor in a placement group bundle", function()
  local pg = tide.placement_group({{CPU = 1}}, {strategy = "STRICT_PACK"})
  tide.get(pg:ready(), {timeout = 30})
  local A = tide.actor({init = function(self) end, hi = function(self) return "hi" end})
  local a = A:options({placement_group = pg, bundle_index = 1, num_cpus = 1}):remote()
  t.eq(tide.get(a:hi(), {timeout = 30}), "hi")
  tide.kill(a)
  tide.remove_placement_group(pg)
end)

t.test("an actor in a placement group that dies gives its share of the bundle back", function()
  local pg = tide.placement_group({{CPU = 1}})
  tide.get(pg:ready())
  local A = tide.actor({hi = function() return "hi" end})
  local first = A:options({placement_group = pg, num_cpus = 1}):remote()
  t.eq(tide.get(first:hi()), "hi")
  tide.kill(first)
  -- The bundle has room for one such actor: the next one starts only if
  -- the killed one gave its share back.
  local second = A:options({placement_group = pg, num_cpus = 1}):remote()
  t.eq(tide.get(second:hi(), {timeout = 30}), "hi")
  tide.kill(second)
  tide.remove_placement_group(pg)
end)

t.test("removing a placement group kills its actors and cancels its running tasks", function()
  local pg = tide.placement_group({{CPU = 1}, {CPU = 0.5}})
  tide.get(pg:ready(), {timeout = 30})
  local A = tide.actor({hi = function() return "hi" end})
  local a = A:options({placement_group = pg, bundle_index = 1, num_cpus = 1}):remote()
  t.eq(tide.get(a:hi(), {timeout = 30}), "hi")
  local long = tide.remote(function() tide.sleep(60) return "done" end)
  local r = long:options({placement_group = pg, bundle_index = 2, num_cpus = 0.5}):remote()
  tide.sleep(0.5)  -- running
  tide.remove_placement_group(pg)
  local err = t.raises(function() tide.get(a:hi(), {timeout = 30}) end, "placement group was removed")
  t.eq(err.kind, "ActorDiedError")
  err = t.raises(function() tide.get(r, {timeout = 30}) end)
  t.eq(err.kind, "TaskCancelledError")
end)

t.test("a named placement group is found again with tide.get_placement_group", function()
  local pg = tide.placement_group({{CPU = 1}}, {strategy = "STRICT_PACK", name = "found-pg", lifetime = "detached"})
  local again = tide.get_placement_group("found-pg")
  t.eq(again.id, pg.id)
  t.eq(again.strategy, "STRICT_PACK")
  t.deep_eq(again.bundles, {{CPU = 1}})
  t.eq(tide.get(again:ready(), {timeout = 30}), true)
  local f = tide.remote(function() return "in found-pg" end)
  t.eq(tide.get(f:options({placement_group = again}):remote(), {timeout = 30}), "in found-pg")
  tide.remove_placement_group(again)
  t.raises(function() tide.get_placement_group("found-pg") end, "no placement group named \"found%-pg\"")
  t.raises(function() tide.get_placement_group("") end, "expected the group's name")
  t.raises(function() tide.placement_group({{CPU = 1}}, {lifetime = "forever"}) end, "lifetime must be")
  t.eq(wait_idle().CPU, 2)
end)

t.test("scheduling strategies: SPREAD and node affinity to the local node", function()
  local f = tide.remote(function() return tide.get_runtime_context().node_id end)
  local node = tide.nodes()[1].node_id
  t.eq(tide.get(f:options({scheduling_strategy = "SPREAD"}):remote()), node)
  t.eq(tide.get(f:options({scheduling_strategy = "DEFAULT"}):remote()), node)
  t.eq(tide.get(f:options({scheduling_strategy = {node_id = node, soft = false}}):remote()), node)
  t.eq(tide.get(f:options({scheduling_strategy = {node_id = "no-such-node", soft = true}}):remote()), node)
  t.raises(function()
    tide.get(f:options({scheduling_strategy = {node_id = "no-such-node", soft = false}}):remote(), {timeout = 10})
  end, "no%-such%-node")
end)

t.done()
