-- tide.collective across nodes, for `tide bench multinode` (bench.lua runs
-- it attached to the head of its loopback cluster: node-1 and node-2 run
-- the ranks). Prints multinode_allreduce_f32_sum_<size> (bus bandwidth,
-- 2 ranks on 2 nodes, AES-128-OCB streams unless the cluster runs
-- --data-plane plain) and, where mpirun is installed, Open MPI's allreduce
-- over its TCP transport (mpirun --mca btl self,tcp, 2 ranks, this host)
-- at the same sizes in the same run, with Tide's ratio to it.
local tide = require("tide")
local C = dofile(os.getenv("TIDE_HOME") .. "/bench/common.lua")
local SCALE = tonumber(os.getenv("TIDE_BENCH_SCALE") or "1")
local dp = os.getenv("TD_DATA_PLANE") or "on"

local sizes = {1048576, 16777216, 67108864, 268435456}
local function label(b) return math.floor(b / 1048576) .. "MiB" end

-- Timed as ../shared/peers/mpi_allreduce.c times Open MPI's, so that the
-- two numbers mean the same: 3 calls of warm-up, then 100 timed calls at
-- 1 MiB and below and 10 above (times TIDE_BENCH_SCALE, at least 3), each
-- after a barrier; a call's time is the slower rank's, and the figure is
-- the median call's bus bandwidth. (A mean over calls after one warm-up
-- call, as this bench took before, let a slow first few calls of a size
-- -- the streams' windows still opening -- weigh on it.)
local function iters_for(bytes) return math.max(3, math.floor((bytes <= 1048576 and 100 or 10) * SCALE)) end

local rank_fn = tide.remote({num_cpus = 0}, function(rank, sizes_, counts)
  local T = require("tide.tensor")
  local Co = require("tide.collective")
  local raw = require("tide.rawbench")
  Co.init_group(2, rank, "bench-multinode")
  -- This process's CPU seconds (user + system), from /proc.
  local function cpu()
    local f = io.open("/proc/self/stat")
    local st = f:read("*a")
    f:close()
    local k, t = 0, 0
    for w in (st:match("%) (.*)$") or ""):gmatch("%S+") do
      k = k + 1
      if k == 12 or k == 13 then t = t + tonumber(w) / 100 end
      if k == 13 then break end
    end
    return t
  end
  local out = {}
  for i, bytes in ipairs(sizes_) do
    local x = T.ones({bytes / 4})
    for _ = 1, 3 do Co.allreduce(x, "sum") end -- pages faulted in, streams' windows open
    local times, c0 = {}, cpu()
    for k = 1, counts[i] do
      Co.barrier()
      local t0 = raw.now()
      Co.allreduce(x, "sum")
      times[k] = raw.now() - t0
    end
    -- 2 ranks: each sends and receives the whole buffer once.
    out[i] = {times = times, cpu_per_gb = (cpu() - c0) / counts[i] / (2 * bytes / 1e9)}
  end
  Co.destroy_group("bench-multinode")
  return out
end)
local counts = {}
for i, b in ipairs(sizes) do counts[i] = iters_for(b) end
local on = function(n) return {scheduling_strategy = {node_id = n}} end
local res = tide.get({rank_fn:options(on("node-1")):remote(0, sizes, counts),
                      rank_fn:options(on("node-2")):remote(1, sizes, counts)}, {timeout = 600})

-- The median over calls of the slower rank's time.
local function median_call(i)
  local t = {}
  for k = 1, counts[i] do t[k] = math.max(res[1][i].times[k], res[2][i].times[k]) end
  table.sort(t)
  local n = #t
  return n % 2 == 1 and t[(n + 1) / 2] or (t[n / 2] + t[n / 2 + 1]) / 2
end

-- Open MPI over TCP (2 ranks, loopback), same sizes, when it is installed.
local mpi = {}
local peers = os.getenv("TIDE_HOME") .. "/../shared/peers/mpi_allreduce.c"
local have = io.open(peers) and os.execute("command -v mpirun >/dev/null 2>&1 && command -v mpicc >/dev/null 2>&1")
if have == true or have == 0 then
  local exe = os.tmpname()
  if os.execute(string.format("mpicc -O2 -o %s %s 2>/dev/null", exe, peers)) then
    local f = io.popen(string.format(
      "OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 timeout 300 mpirun --allow-run-as-root " ..
      "--oversubscribe -np 2 --bind-to none --mca pml ob1 --mca btl self,tcp --mca btl_base_warn_component_unused 0 " ..
      "-x PEERS_VARIANT=tcp %s 10 3 268435456 2>/dev/null", exe))
    for line in f:lines() do
      local metric, v = line:match('"metric":"allreduce_f32_sum_(%w+)","value":([%d.]+)')
      if metric then mpi[metric] = tonumber(v) end
    end
    f:close()
  end
  os.remove(exe)
end

for i, bytes in ipairs(sizes) do
  local l = label(bytes)
  local bw = bytes / median_call(i) / 1e9 -- 2 ranks: bus bandwidth = size / time
  local rec = {metric = "multinode_allreduce_f32_sum_" .. l, value = bw, unit = "GB/s busbw",
    ranks = 2, nodes = 2, bytes = bytes, data_plane = dp, iters = counts[i], warmup = 3, stat = "median call",
    cpu_core_s_per_gb = (res[1][i].cpu_per_gb + res[2][i].cpu_per_gb) / 2}
  if mpi[l] then
    rec.openmpi_tcp = mpi[l]
    rec.ratio_to_openmpi_tcp = bw / mpi[l]
  end
  C.emit(rec)
  if mpi[l] then
    C.emit({metric = "openmpi_tcp_allreduce_f32_sum_" .. l, value = mpi[l], unit = "GB/s busbw", ranks = 2,
      note = "mpirun --mca btl self,tcp, 2 ranks on this host, same run"})
  end
end
