-- tide bench: Ray's microbenchmark metrics (DESIGN §10) as JSON lines, each
-- against a machine limit measured in this same run.
--   tide bench [NAME...] [--json]      NAME filters metrics by prefix
-- TIDE_BENCH_SCALE scales iteration counts (default 1).
local tide = require("tide")
local raw = require("tide.rawbench")
local cjson = require("cjson")

local SCALE = tonumber(os.getenv("TIDE_BENCH_SCALE") or "1")
local filters = {}
for _, a in ipairs(arg) do
  if a ~= "--json" then filters[#filters + 1] = a end
end

local function wanted(name)
  if #filters == 0 then return true end
  for _, f in ipairs(filters) do
    if name:sub(1, #f) == f then return true end
  end
  return false
end

local common = dofile(os.getenv("TIDE_HOME") .. "/bench/common.lua")
local emit, rate = common.emit, common.rate

-- -- Machine limits ------------------------------------------------------
local limits = {}
-- Median of three runs each: placement on one core or two changes these.
local function median3(f, ...)
  local v = {f(...), f(...), f(...)}
  table.sort(v)
  return v[2]
end
limits.pipe_pingpong = median3(raw.pipe_pingpong, 20000)
limits.pipe_stream = median3(raw.pipe_stream, 500000)
limits.memcpy = raw.memcpy(64 * 1024 * 1024, 8)
limits.futex = median3(raw.futex_pingpong, 50000)
emit({metric = "limit_pipe_pingpong_64b", value = limits.pipe_pingpong, unit = "round trips/s"})
emit({metric = "limit_pipe_pipelined_64b", value = limits.pipe_stream, unit = "msgs/s"})
emit({metric = "limit_memcpy_prefaulted", value = limits.memcpy / 1e9, unit = "GB/s"})
emit({metric = "limit_shm_futex_pingpong", value = limits.futex, unit = "round trips/s"})

local nop = tide.remote(function() return 0 end)

local batch = common.batch
local function m(name, value, unit, limit, extra)
  local r = {metric = name, value = value, unit = unit, limit = limit}
  for k, v in pairs(extra or {}) do r[k] = v end
  emit(r)
end

-- Warm the worker pool.
tide.get(nop:remote())

if wanted("single_client_tasks_sync") then
  m("single_client_tasks_sync", rate(function() tide.get(nop:remote()) end, 1), "tasks/s",
    limits.pipe_pingpong)
end

if wanted("single_client_tasks_async") then
  local N = 10000
  m("single_client_tasks_async", rate(function()
    batch(N, function() return nop:remote() end)
  end, N, 3), "tasks/s", limits.pipe_stream)
end

if wanted("multi_client_tasks_async") then
  local client = tide.remote({num_cpus = 0}, function(n)
    local refs = {}
    for i = 1, n do refs[i] = nop:remote() end
    tide.get(refs)
    return n
  end)
  local N = 5000
  m("multi_client_tasks_async", rate(function()
    tide.get({client:remote(N), client:remote(N)})
  end, 2 * N, 3), "tasks/s", limits.pipe_stream)
end

local Actor = common.actor()

if wanted("1_1_actor_calls_sync") then
  local a = Actor:remote()
  tide.get(a:small())
  m("1_1_actor_calls_sync", rate(function() tide.get(a:small()) end, 1), "calls/s", limits.pipe_pingpong)
end

if wanted("1_1_actor_calls_async") then
  local a = Actor:remote()
  local N = 10000
  m("1_1_actor_calls_async", rate(function()
    batch(N, function() return a:small() end)
  end, N, 3), "calls/s", limits.pipe_stream)
end

if wanted("1_n_actor_calls_async") then
  local actors = {}
  for i = 1, 4 do actors[i] = Actor:remote() end
  local N = 10000
  m("1_n_actor_calls_async", rate(function()
    batch(N, function(i) return actors[(i % 4) + 1]:small() end)
  end, N, 3), "calls/s", limits.pipe_stream)
end

if wanted("n_n_actor_calls_async") then
  local callers, callees = {}, {}
  for i = 1, 2 do callers[i] = Actor:remote(); callees[i] = Actor:remote() end
  local N = 5000
  m("n_n_actor_calls_async", rate(function()
    tide.get({callers[1]:call_n(callees[1], N), callers[2]:call_n(callees[2], N)})
  end, 2 * N, 3), "calls/s", limits.pipe_stream)
end

if wanted("single_client_get_calls") then
  local r = tide.put(0)
  m("single_client_get_calls", rate(function() for _ = 1, 100 do tide.get(r) end end, 100),
    "calls/s", limits.pipe_pingpong)
end

if wanted("single_client_put_calls") then
  m("single_client_put_calls", rate(function() for _ = 1, 100 do tide.put(0) end end, 100),
    "calls/s", limits.pipe_pingpong)
end

if wanted("single_client_put_gigabytes") then
  local big = string.rep("x", 64 * 1024 * 1024)
  local r = tide.put(big) -- fault the store's pages in once
  r = nil
  collectgarbage()
  -- Each ref is dropped and collected, so the store reuses its extent.
  local gb = rate(function()
    local ref = tide.put(big)
    ref = nil
    collectgarbage()
  end, #big / 1e9, 2)
  m("single_client_put_gigabytes", gb, "GB/s", limits.memcpy / 1e9)
end

-- A 64 MiB tensor as a task's argument: put into the store once (one copy),
-- mapped by the worker (no copy); the task reads one element.
if wanted("tensor_task_arg_gigabytes") then
  local T = require("tide.tensor")
  local x = T.ones({16 * 1024 * 1024})
  local first = tide.remote(function(t) return t:get(1) end)
  tide.get(first:remote(x))
  collectgarbage()
  local gb = rate(function()
    tide.get(first:remote(x))
    collectgarbage()
  end, x:nbytes() / 1e9, 2)
  m("tensor_task_arg_gigabytes", gb, "GB/s", limits.memcpy / 1e9)
end

if wanted("single_client_tasks_and_get_batch") then
  m("single_client_tasks_and_get_batch", rate(function()
    batch(1000, function() return nop:remote() end)
  end, 1, 2), "batches/s", limits.pipe_stream / 1000)
end

if wanted("single_client_wait_1k_refs") then
  local refs = {}
  for i = 1, 1000 do refs[i] = nop:remote() end
  tide.get(refs)
  m("single_client_wait_1k_refs", rate(function() tide.wait(refs, {num_returns = 1000}) end, 1),
    "waits/s")
end

if wanted("placement_group_create") then
  m("placement_group_create/removal", rate(function()
    local pg = tide.placement_group({{CPU = 0.01}})
    tide.remove_placement_group(pg)
  end, 1), "pgs/s")
end

if wanted("cold_start") then
  local tmp = os.tmpname()
  local f = assert(io.open(tmp, "w"))
  f:write('local tide = require("tide")\n',
    'assert(tide.get(tide.remote(function() return 1 end):remote()) == 1)\n')
  f:close()
  local exe = os.getenv("TIDE_HOME") .. "/bin/tide"
  local times = {}
  for i = 1, 7 do
    local t0 = raw.now()
    assert(os.execute(exe .. " run " .. tmp .. " >/dev/null 2>&1") == 0)
    times[i] = raw.now() - t0
  end
  os.remove(tmp)
  table.sort(times)
  m("cold_start_first_task", times[4] * 1000, "ms", nil, {runs = 7})
end

if wanted("idle_worker_rss") then
  local pid = tide.get(tide.remote(function() return tide.get_runtime_context().pid end):remote())
  m("idle_worker_rss", (raw.rss(pid) or 0) / 1024, "KiB")
end

if wanted("million_tasks") then
  local N = math.floor(1000000 * SCALE)
  local t0 = raw.now()
  local per_batch = 20000
  local done = 0
  while done < N do
    batch(per_batch, function() return nop:remote() end)
    done = done + per_batch
  end
  local dt = raw.now() - t0
  m("million_tasks", N / dt, "tasks/s", nil, {tasks = N, seconds = dt,
    driver_max_rss_mib = raw.maxrss() / 1048576})
end

if wanted("actors_100k") then
  local N = math.floor(100000 * SCALE)
  local Tiny = tide.actor({get = function(self) return 1 end})
  local before = 0
  local t0 = raw.now()
  local handles = {}
  for i = 1, N do handles[i] = Tiny:remote() end
  -- One call to the last actor proves they are all created.
  tide.get(handles[N]:get())
  local dt = raw.now() - t0
  -- Memory of the processes hosting them.
  local pids = {}
  for line in io.popen("pgrep -P " .. raw.pid_self()):lines() do pids[#pids + 1] = tonumber(line) end
  local rss = 0
  for _, p in ipairs(pids) do rss = rss + (raw.rss(p) or 0) end
  m("actors_created_per_s", N / dt, "actors/s", nil, {actors = N})
  m("actor_memory", (rss - before) / N / 1024, "KiB/actor", nil, {actors = N, worker_rss_mib = rss / 1048576})
  for i = 1, N, math.max(1, math.floor(N / 10)) do assert(tide.get(handles[i]:get()) == 1) end
end

-- Serving: GET /hello and POST /echo (JSON decoded and encoded again by a
-- Lua replica), driven by the closed-loop client in bench/http.
if wanted("http") then
  local home = os.getenv("TIDE_HOME")
  local client = home .. "/build/bench-http"
  local f = io.open(client, "r")
  if not f then
    io.stderr:write("tide bench: " .. client .. " is missing (make build/bench-http); skipping http\n")
  else
    f:close()
    local serve = require("tide.serve")
    local hello = serve.deployment{name = "hello", route = "/hello", num_replicas = 1,
      call = function() return "ok" end}
    local echo = serve.deployment{name = "echo", route = "/echo", num_replicas = 1,
      call = function(_, req) return req.json end}
    local port = serve.run({hello, echo}, {port = 18950, blocking = false})
    -- The JSON records in the client's output.
    local function records(text)
      local out = {}
      for line in text:gmatch("[^\n]+") do
        local ok, rec = pcall(cjson.decode, line)
        if ok and type(rec) == "table" then out[#out + 1] = rec end
      end
      return out
    end
    -- Runs the HTTP client with args in the background while this process
    -- serves; returns its output.
    local function run_client(args)
      local out = os.tmpname()
      os.execute(string.format("(%s %s > %s 2>&1; echo END >> %s) &", client, args, out, out))
      local text
      repeat
        serve.poll(0.2)
        local h = io.open(out, "r")
        text = h and h:read("*a") or ""
        if h then h:close() end
      until text:find("END")
      os.remove(out)
      return text
    end
    local function load(name, path, post, limit)
      local text = run_client(string.format("--url http://127.0.0.1:%d%s -c 32 -d %g %s", port, path, 3 * SCALE,
        post and ("--post '" .. post .. "'") or ""))
      for _, rec in ipairs(records(text)) do
        if rec.value then
          m(name, rec.value, "req/s", limit, {p50_ms = rec.p50_ms, p99_ms = rec.p99_ms, errors = rec.errors})
          return
        end
      end
      io.stderr:write("tide bench: no result from the HTTP client: " .. text .. "\n")
    end
    -- The peer in the same run when nginx is installed: nginx's own
    -- `return 200` (an upper bound for nginx + lua-nginx-module running the
    -- same handler; Debian's Lua module conflicts with this LuaJIT).
    local nginx_rps
    if os.execute("command -v nginx >/dev/null 2>&1") == 0 then
      os.execute("mkdir -p /tmp/tide-bench-nginx && nginx -p /tmp/tide-bench-nginx/ -e /tmp/tide-bench-nginx/error.log -c "
        .. home .. "/bench/http/nginx_plain.conf >/dev/null 2>&1")
      local h = io.popen(string.format("%s --url http://127.0.0.1:18081/hello -c 32 -d %g 2>/dev/null", client, 3 * SCALE))
      local text = h:read("*a")
      h:close()
      os.execute("nginx -p /tmp/tide-bench-nginx/ -e /tmp/tide-bench-nginx/error.log -c " .. home
        .. "/bench/http/nginx_plain.conf -s stop >/dev/null 2>&1")
      for _, rec in ipairs(records(text)) do
        if rec.value then nginx_rps = rec.value end
      end
      if nginx_rps then m("http_get_hello_nginx_return", nginx_rps, "req/s") end
    end
    load("http_get_hello", "/hello", nil, nginx_rps)
    load("http_post_echo_json", "/echo", '{"user":"tide","items":[1,2,3],"note":"benchmark body"}')
    -- Ingress overhead: one request at a time over HTTP against calling an
    -- actor with the same handler directly, medians from the same run.
    local text = run_client(string.format("--url http://127.0.0.1:%d/hello -c 1 -d %g", port, 2 * SCALE))
    local p50_http
    for _, rec in ipairs(records(text)) do
      if rec.p50_ms then p50_http = rec.p50_ms end
    end
    -- Time to first chunk of a stream whose handler sends at once, one
    -- request at a time on a keep-alive connection, from a task.
    local streamer = serve.deployment{name = "stream1", route = "/stream1", num_replicas = 1,
      call = function() return serve.stream(function(send) send("x") end) end}
    serve.deploy({streamer})
    local ttfc = tide.remote({num_cpus = 0}, function(port_, n, home)
      package.path = home .. "/tests/lua/?.lua;" .. package.path
      local httpc = require("httpc")
      local c = httpc.connect("127.0.0.1", port_)
      c:request("GET", "/stream1")
      local ts = {}
      for i = 1, n do
        local t0 = httpc.now()
        local r = c:request("GET", "/stream1")
        ts[i] = r.chunks[1].t - t0
      end
      c:close()
      table.sort(ts)
      return ts[math.floor(n / 2)]
    end)
    local ref = ttfc:remote(port, 300, home)
    repeat serve.poll(0.05) until #tide.wait({ref}, {timeout = 0}) == 1
    m("http_stream_first_chunk_p50", tide.get(ref) * 1e6, "us", nil, {requests = 300})
    local Direct = tide.actor({call = function() return "ok" end})
    local d = Direct:remote()
    tide.get(d:call())
    local lat = {}
    for i = 1, 2000 do
      local t0 = raw.now()
      tide.get(d:call())
      lat[i] = raw.now() - t0
    end
    table.sort(lat)
    local p50_direct = lat[1000] * 1000
    if p50_http then
      m("http_ingress_overhead_p50", (p50_http - p50_direct) * 1000, "us", nil,
        {http_p50_ms = p50_http, direct_call_p50_ms = p50_direct})
    end
    serve.shutdown()
  end
end

-- CPU collectives between two tasks through tide.collective (bus bandwidth,
-- the Open MPI peer's metric names; `tide bench allreduce` runs just these).
-- Timed as the peer times MPI_Allreduce (../shared/peers/mpi_allreduce.c),
-- so the figures compare one to one: per size 3 warm-up calls, then 100
-- timed calls up to 1 MiB and 10 above, each a barrier, the call, and its
-- time the max over the ranks; value = bus bandwidth of the median time.
-- mean_GBps is the same calls' mean (a loaded machine's stalls show there).
if wanted("allreduce") then
  local rank_fn = tide.remote({num_cpus = 0}, function(world, rank, name, sizes, scale)
    local T = require("tide.tensor")
    local C = require("tide.collective")
    local raw_ = require("tide.rawbench")
    C.init_group(world, rank, name)
    local out, dt = {}, T.zeros({1})
    for i, bytes in ipairs(sizes) do
      local x = T.ones({math.floor(bytes / 4)})
      for _ = 1, 3 do C.allreduce(x, "sum") end -- warm up, fault pages in
      local iters = math.max(3, math.floor((bytes <= 1048576 and 100 or 10) * scale))
      local ts, sum = {}, 0
      for k = 1, iters do
        C.barrier()
        local t0 = raw_.now()
        C.allreduce(x, "sum")
        dt:set(1, raw_.now() - t0)
        C.allreduce(dt, "max")
        ts[k] = dt:get(1)
        sum = sum + ts[k]
      end
      table.sort(ts)
      local med = iters % 2 == 1 and ts[(iters + 1) / 2] or (ts[iters / 2] + ts[iters / 2 + 1]) / 2
      local bus = 2 * (world - 1) / world * bytes / 1e9
      out[i] = {median = bus / med, mean = bus / (sum / iters), min_us = ts[1] * 1e6}
    end
    return out
  end)
  local sizes = {4096, 65536, 1048576, 16777216, 67108864, 268435456}
  local res = tide.get({rank_fn:remote(2, 0, "bench", sizes, SCALE),
                        rank_fn:remote(2, 1, "bench", sizes, SCALE)})
  for i, bytes in ipairs(sizes) do
    local label = bytes >= 1048576 and (math.floor(bytes / 1048576) .. "MiB") or (math.floor(bytes / 1024) .. "KiB")
    local r = res[1][i]
    m("allreduce_f32_sum_" .. label, r.median, "GB/s", nil,
      {ranks = 2, bytes = bytes, mean_GBps = r.mean, time_us_min = r.min_us})
  end
end

-- A 64 MiB tensor from one actor to another (issue 16, item 4), both
-- ways in the same run: a plain method's result through the object store
-- (one copy in, mapped by the consumer) and a tide.method with
-- tensor_transport = "collective" (held by the producer, sent over the
-- pair's collective group). Each call reads one element of what it got.
if wanted("actor_tensor") then
  local Side = tide.actor({
    setup = function(self, rank)
      require("tide.collective").init_group(2, rank, "bench-rdt")
      self.x = require("tide.tensor").ones({16 * 1024 * 1024})
    end,
    plain = function(self) return self.x end,
    direct = tide.method({tensor_transport = "collective"}, function(self) return self.x end),
    first = function(_, x) return x:get(1) end,
  })
  local p = Side:options({own_process = true}):remote()
  local c = Side:options({own_process = true}):remote()
  tide.get({p:setup(0), c:setup(1)})
  local bytes = 64 * 1024 * 1024
  for _, way in ipairs({"plain", "direct"}) do
    tide.get(c:first(p[way](p)))  -- warm: pages, pools, definitions
    collectgarbage()
    local gb = rate(function()
      tide.get(c:first(p[way](p)))
      collectgarbage()
    end, bytes / 1e9, 2)
    m(way == "plain" and "actor_tensor_64MiB_object_store" or "actor_tensor_64MiB_direct", gb, "GB/s",
      limits.memcpy / 1e9, {bytes = bytes})
  end
  tide.kill(p)
  tide.kill(c)
end

-- tide.data (issue 14): pipeline efficiency against a plain loop, a large
-- file streamed with memory bounded, and Tide's side of the Ray Data / Dask
-- comparison (bench/data.lua; `tide bench data` runs just these).
if wanted("data_map_batches") or wanted("data_stream_lines") or wanted("data_read_map_pool_write") then
  dofile(os.getenv("TIDE_HOME") .. "/bench/data.lua")({m = m, wanted = wanted, SCALE = SCALE, emit = emit})
end

-- tide.train (issue 15): data-parallel scaling of the tiny GPT, 1 vs 2
-- workers in the same run (bench/train.lua; `tide bench train_dp`).
if wanted("train_dp") then
  dofile(os.getenv("TIDE_HOME") .. "/bench/train.lua")({m = m, emit = emit, SCALE = SCALE})
end
if wanted("train_recovery") then
  dofile(os.getenv("TIDE_HOME") .. "/bench/train.lua")({m = m, emit = emit, SCALE = SCALE, part = "recovery"})
end

if wanted("dashboard") then
  dofile(os.getenv("TIDE_HOME") .. "/bench/dashboard.lua")({m = m, SCALE = SCALE, now = raw.now})
end

-- Multi-node (`tide bench multinode`): a head and two nodes started here as
-- daemons on loopback, each in its own session directory; bench/multinode.lua
-- runs attached to the head. Then the head is killed and restarted, and the
-- time until its nodes are back is measured.
if wanted("multinode") then
  local exe = os.getenv("TIDE_HOME") .. "/bin/tide"
  local dir = os.tmpname()
  os.remove(dir)
  math.randomseed(os.time() + raw.pid_self())
  local port = 19000 + math.random(0, 900)
  local key = dir .. "/head/cluster.key"
  local function sh(cmd) return os.execute(cmd .. " >/dev/null 2>&1") end
  -- TD_BENCH_DATA_PLANE=off|plain|on: how objects cross (--data-plane), for A/B runs.
  local dpm = os.getenv("TD_BENCH_DATA_PLANE") or "on"
  local dpf = " --data-plane " .. dpm
  local function start_head()
    return sh(string.format("TIDE_SESSION_DIR=%s/head %s start --head --port %d --num-cpus 0%s", dir, exe, port, dpf))
  end
  local function nodes_up()
    local f = io.popen(string.format("TIDE_SESSION_DIR=%s/head %s status 2>/dev/null", dir, exe))
    local k = 0
    for line in f:lines() do if line:match("^node%-") then k = k + 1 end end
    f:close()
    return k
  end
  os.execute("mkdir -p " .. dir)
  start_head()
  for k = 1, 2 do
    sh(string.format("TIDE_SESSION_DIR=%s/n%d %s start --address 127.0.0.1:%d --key %s --num-cpus 2%s",
      dir, k, exe, port, key, dpf))
  end
  local t0 = raw.now()
  while nodes_up() < 3 and raw.now() - t0 < 20 do tide.sleep(0.05) end
  local tcp = raw.tcp_stream(512 * 1024 * 1024)
  emit({metric = "limit_tcp_loopback", value = tcp / 1e9, unit = "GB/s"})
  -- Collectives across the two nodes, beside Open MPI over TCP (bench/multinode_coll.lua);
  -- first, as multinode.lua kills node-2 at its end.
  local f = io.popen(string.format(
    "TD_DATA_PLANE=%s TIDE_SESSION_DIR=%s/head %s run --address local %s/bench/multinode_coll.lua 2>&1",
    dpm, dir, exe, os.getenv("TIDE_HOME")))
  for line in f:lines() do io.write(line, "\n") end
  io.flush()
  f:close()
  f = io.popen(string.format(
    "TD_LIMIT_PINGPONG=%f TD_LIMIT_STREAM=%f TD_LIMIT_TCP=%f TD_NODE2_PID=%s/n2/node.pid " ..
    "TD_HEAD_PID=%s/head/node.pid TD_NODE1_PID=%s/n1/node.pid TD_DATA_PLANE=%s " ..
    "TIDE_SESSION_DIR=%s/head %s run --address local %s/bench/multinode.lua 2>&1",
    limits.pipe_pingpong, limits.pipe_stream, tcp, dir, dir, dir, dpm, dir, exe, os.getenv("TIDE_HOME")))
  for line in f:lines() do io.write(line, "\n") end
  io.flush()
  f:close()
  -- Head restart: kill -9, start again; the node left rejoins by itself.
  local want = nodes_up()
  local hf = io.open(dir .. "/head/node.pid")
  local hpid = hf and hf:read("*n")
  if hf then hf:close() end
  if hpid then
    sh("kill -9 " .. hpid)
    -- Until it is gone (or a zombie nobody reaped yet).
    sh(string.format("for i in $(seq 100); do kill -0 %d || break; " ..
      "grep -q '^State:.*Z' /proc/%d/status && break; sleep 0.05; done", hpid, hpid))
    local t1 = raw.now()
    start_head()
    while nodes_up() < want and raw.now() - t1 < 30 do tide.sleep(0.05) end
    m("multinode_head_restart", raw.now() - t1, "s", nil,
      {note = "kill -9 of the head; start again until its " .. (want - 1) .. " node(s) rejoined"})
  end
  for _, s in ipairs({"head", "n1", "n2"}) do
    sh(string.format("TIDE_SESSION_DIR=%s/%s %s stop", dir, s, exe))
  end
  if not os.getenv("TD_BENCH_KEEP") then os.execute("rm -rf " .. dir) else print(dir) end
end
