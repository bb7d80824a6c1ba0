-- NCCL allreduce bus bandwidth (float32 sum), nccl-tests conventions: one
-- process per GPU; per size `warmup` untimed and `iters` timed allreduces,
-- each time the max over ranks; value = busbw of the median,
-- busbw = bytes / t * 2(n-1)/n.  Rank 0 prints one JSON line per size.
--
--   tide run gpu/bench/nccl_bench.lua RANK NRANKS IDFILE [iters=20] [max_bytes]
-- Rank 0 writes the NCCL unique id to IDFILE; the others wait for it (the
-- engine exchanges it through the head's KV store; a file does here).
local T = require("tide.tensor")
local cjson = require("cjson")
local ffi = require("ffi")

local rank, n, idfile = tonumber(arg[1]), tonumber(arg[2]), arg[3]
local iters = tonumber(arg[4]) or 20
local max_bytes = tonumber(arg[5]) or 256 * 1024 * 1024
assert(rank and n and idfile, "usage: nccl_bench.lua RANK NRANKS IDFILE [iters] [max_bytes]")

ffi.cdef([[
typedef struct { long tv_sec; long tv_nsec; } td_nb_ts;
int clock_gettime(int clk, td_nb_ts *ts);
int usleep(unsigned usec);
]])
local ts = ffi.new("td_nb_ts")
local function now()
  ffi.C.clock_gettime(1, ts)
  return tonumber(ts.tv_sec) + tonumber(ts.tv_nsec) * 1e-9
end

local id
if rank == 0 then
  id = T.nccl_unique_id()
  local f = assert(io.open(idfile .. ".tmp", "wb"))
  f:write(id)
  f:close()
  assert(os.rename(idfile .. ".tmp", idfile))
else
  for _ = 1, 6000 do
    local f = io.open(idfile, "rb")
    if f then
      id = f:read("*a")
      f:close()
      if #id == 128 then break end
    end
    ffi.C.usleep(10000)
  end
  assert(id and #id == 128, "no NCCL id appeared in " .. idfile)
end
local dev = "cuda:" .. (rank % T.device_count())
local comm = T.nccl_comm(n, id, rank, dev)

local sizes = {{4096, "4KiB"}, {65536, "64KiB"}, {1048576, "1MiB"}, {16777216, "16MiB"},
               {67108864, "64MiB"}, {268435456, "256MiB"}}
local tmax = T.zeros({1}, {device = dev})
for _, s in ipairs(sizes) do
  local bytes, label = s[1], s[2]
  if bytes <= max_bytes then
    local count = bytes / 4
    local x = T.full({count}, rank + 1, {device = dev})
    for _ = 1, 5 do comm:allreduce(x) end
    local times = {}
    for i = 1, iters do
      x:fill(rank + 1)
      comm:allreduce(tmax) -- a barrier
      local t0 = now()
      comm:allreduce(x) -- returns once complete
      local dt = now() - t0
      tmax:fill(dt)
      comm:allreduce(tmax, "max")
      times[i] = tmax:to("cpu"):item()
    end
    table.sort(times)
    local med = times[math.floor((iters + 1) / 2)]
    local expect = n * (n + 1) / 2
    local h = x:slice(1, 1, 1):to("cpu"):item()
    if rank == 0 then
      local algbw = bytes / med / 1e9
      io.write(cjson.encode({system = "tide-nccl", metric = "nccl_allreduce_f32_sum_" .. label,
        value = algbw * 2 * (n - 1) / n, unit = "GB/s", size_bytes = bytes, ranks = n,
        time_us_median = med * 1e6, algbw_GBps = algbw, iters = iters,
        correct = h == expect, device = T.device_name(0)}), "\n")
      io.flush()
    end
  end
end
comm:destroy()
