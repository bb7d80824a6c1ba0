-- tide bench data*: issue 14's tide.data targets, each against its own
-- baseline measured in the same run (bench.lua loads this file).
--
--   data_map_batches_efficiency_<C>us_<variant>
--       rows/s of data.range(N):map_batches(f) where f costs about C µs of
--       CPU per row, against the same f called in a plain loop over the
--       same rows by two processes at once (bench/data_loop.lua, no Tide),
--       one per core. Variants: fused (f runs in the range source's tasks),
--       stage (fuse = false: f in tasks of a stage of its own, blocks through
--       the store), pool (a pool of two actors). Runs alternate
--       loop/fused/stage/pool; values are medians of the rounds, the limit
--       the loop's median, fraction_of_limit their ratio.
--   data_stream_lines_<size>, data_stream_lines_staged_<size>
--       read_lines -> map -> write_jsonl of generated files of <size>,
--       in a separate driver process (bench/data_stream.lua), so its peak
--       RSS is the run's own: rows/s, MB/s, driver peak RSS, peak store.
--       The staged run adds a map_batches stage of its own, so every row
--       crosses the object store.
--   data_read_map_pool_write[_ray_data|_dask]
--       read_lines -> filter -> map -> map_batches (pool of 2 actors) ->
--       write_jsonl against Ray Data 2.60 and Dask on the same files, side
--       by side in rounds (bench/data_compare.py): rows/s and each process
--       tree's peak memory.
-- TIDE_BENCH_SCALE scales the row counts; TIDE_BENCH_DATA_STREAM_MB sets the
-- streamed sizes (comma-separated MB, default 256,1024);
-- TIDE_BENCH_DATA_ROUNDS / TIDE_BENCH_DATA_TRIALS the rounds (default 3);
-- TIDE_BENCH_DATA_IPU the row function's iterations per µs (default:
-- calibrated each run); TIDE_BENCH_DATA_COSTS the µs per row of the
-- efficiency rows (comma-separated, default 1,10,100).
local tide = require("tide")
local data = require("tide.data")
local raw = require("tide.rawbench")
local cjson = require("cjson")

return function(ctx)
  local m, wanted, SCALE = ctx.m, ctx.wanted, ctx.SCALE
  local home = os.getenv("TIDE_HOME")
  local exe = home .. "/bin/tide"
  local work = dofile(home .. "/bench/data_work.lua")
  data.set_progress(false)

  local function median(t)
    local s = {}
    for i, v in ipairs(t) do s[i] = v end
    table.sort(s)
    local n = #s
    if n % 2 == 1 then return s[(n + 1) / 2] end
    return (s[n / 2] + s[n / 2 + 1]) / 2
  end

  -- -- Pipeline efficiency ------------------------------------------------
  if wanted("data_map_batches_efficiency") then
    -- Iterations of the row function per µs on this machine (a rough
    -- calibration: the loop's own rate, measured each round, is what the
    -- figures are compared with).
    local function iters_per_us()
      local probe = work.make(100000)
      local t0 = raw.now()
      for i = 1, 20 do probe({{id = i}}) end
      return 20 * 100000 / ((raw.now() - t0) * 1e6)
    end
    -- The fastest of several probes: the others were slowed by other work.
    -- TIDE_BENCH_DATA_IPU fixes it instead, so that runs of two builds
    -- (or under different loads) do the very same work per row.
    local ipu = tonumber(os.getenv("TIDE_BENCH_DATA_IPU") or "")
    if not ipu then
      ipu = 0
      for _ = 1, 7 do ipu = math.max(ipu, iters_per_us()) end
    end
    -- CPU seconds used by this process tree: this process (the driver and
    -- the embedded node), the children it reaped (pool actors killed at the
    -- end of a run), and its live children (workers), from /proc (ticks).
    local HZ = 100
    local function stat_cpu(pid, with_children)
      local f = io.open("/proc/" .. pid .. "/stat", "r")
      if not f then return 0 end
      local line = f:read("*l") or ""
      f:close()
      local rest = line:match("%) (.*)$") or ""
      local fld = {}
      for w in rest:gmatch("%S+") do fld[#fld + 1] = w end
      -- fields after the name: state(1) ... utime(12) stime(13) cutime(14) cstime(15)
      local t = (tonumber(fld[12]) or 0) + (tonumber(fld[13]) or 0)
      if with_children then t = t + (tonumber(fld[14]) or 0) + (tonumber(fld[15]) or 0) end
      return t / HZ
    end
    local function tree_cpu()
      local me = raw.pid_self()
      local t = stat_cpu(me, true)
      local p = io.popen("pgrep -P " .. me)
      for line in p:lines() do t = t + stat_cpu(tonumber(line), false) end
      p:close()
      return t
    end
    local BS = 256
    local ncpu = 2
    local ok, r = pcall(tide.cluster_resources)
    if ok and r.CPU then ncpu = math.max(1, math.floor(r.CPU)) end
    local rounds = tonumber(os.getenv("TIDE_BENCH_DATA_ROUNDS") or "3")
    local costs = {}
    for c in (os.getenv("TIDE_BENCH_DATA_COSTS") or "1,10,100"):gmatch("[^,]+") do costs[#costs + 1] = tonumber(c) end
    for _, cost in ipairs(costs) do
      local iters = math.max(1, math.floor(cost * ipu + 0.5))
      -- About 1 s of CPU per core per run, in 32 blocks (so the last block
      -- on a core is a small share of the run).
      local N = math.max(ncpu * BS, math.floor(ncpu * 1e6 / cost * SCALE))
      local BR = math.max(BS, math.ceil(N / 32 / BS) * BS)
      local fn = work.make(iters)
      -- The plain loop: ncpu processes over equal shares of the rows, all
      -- started at once; the slowest one's loop time.
      local function loop()
        local hs, per = {}, math.ceil(N / ncpu)
        for p = 1, ncpu do
          local lo, hi = (p - 1) * per + 1, math.min(N, p * per)
          hs[p] = io.popen(string.format("%s run %s/bench/data_loop.lua %d %d %d %d", exe, home, lo, hi, iters, BS))
        end
        local worst, cpu = 0, 0
        for p = 1, ncpu do
          local s = hs[p]:read("*a")
          hs[p]:close()
          local wall, c = s:match("^(%S+) %S+ (%S+)")
          worst = math.max(worst, tonumber(wall) or 1e9)
          cpu = cpu + (tonumber(c) or 0)
        end
        return N / worst, cpu
      end
      local variants = {
        {"fused", function()
          return data.range(N, {block_rows = BR}):map_batches(fn, {batch_size = BS}) end},
        {"stage", function()
          return data.range(N, {block_rows = BR}):map_batches(fn, {batch_size = BS, fuse = false}) end},
        {"pool", function()
          return data.range(N, {block_rows = BR}):map_batches({call = function(_, b) return fn(b) end},
            {batch_size = BS, concurrency = ncpu}) end},
      }
      local loops, loop_cpu, rates, ratios, cpus = {}, {}, {}, {}, {}
      for _, v in ipairs(variants) do rates[v[1]], ratios[v[1]], cpus[v[1]] = {}, {}, {} end
      data.range(1000):map_batches(fn):count() -- warm the workers
      for round = 1, rounds do
        loops[round], loop_cpu[round] = loop()
        for _, v in ipairs(variants) do
          local c0, t0 = tree_cpu(), raw.now()
          local n = v[2]():count()
          local rate = n / (raw.now() - t0)
          local c = tree_cpu() - c0
          assert(n == N, "tide.data lost rows")
          rates[v[1]][round] = rate
          ratios[v[1]][round] = rate / loops[round]
          -- CPU efficiency: the loop's CPU seconds over Tide's for the same
          -- rows (what other work on the machine cannot move much).
          cpus[v[1]][round] = loop_cpu[round] / math.max(c, 0.01)
        end
      end
      local base = median(loops)
      local lcpu = median(loop_cpu)
      m(string.format("data_map_batches_loop_%dus", cost), base, "rows/s", nil,
        {rows = N, processes = ncpu, iters = iters, cpu_us_per_row = lcpu * 1e6 / N, runs = rounds})
      for _, v in ipairs(variants) do
        local name = v[1]
        m(string.format("data_map_batches_efficiency_%dus_%s", cost, name), median(rates[name]), "rows/s", base,
          {rows = N, batch_size = BS, runs = rounds, ratio_per_round = ratios[name],
           median_ratio = median(ratios[name]), cpu_efficiency = median(cpus[name]),
           cpu_efficiency_per_round = cpus[name]})
      end
    end
  end

  -- -- Streaming a large file, memory bounded --------------------------------
  if wanted("data_stream_lines") then
    local sizes = {}
    for s in (os.getenv("TIDE_BENCH_DATA_STREAM_MB") or "256,1024"):gmatch("[^,]+") do
      sizes[#sizes + 1] = math.floor(tonumber(s) * SCALE)
    end
    for _, run in ipairs({"", "staged"}) do for _, mb in ipairs(sizes) do
      local h = io.popen(string.format("%s run %s/bench/data_stream.lua %d '' %s 2>&1", exe, home, mb, run))
      local rec
      for line in h:lines() do
        local okd, v = pcall(cjson.decode, line)
        if okd and type(v) == "table" and v.metric then rec = v else io.stderr:write(line, "\n") end
      end
      h:close()
      if rec then ctx.emit(rec) end
    end end
  end

  -- -- Side by side with Ray Data and Dask ---------------------------------------
  -- bench/data_compare.py runs the three systems in turn on the same files
  -- (the peers only where installed); the Tide row's limit is Ray Data's
  -- rows/s from the same rounds, so fraction_of_limit is Tide / Ray Data.
  if wanted("data_read_map_pool_write") then
    local rows = math.floor(400000 * SCALE)
    local trials = tonumber(os.getenv("TIDE_BENCH_DATA_TRIALS") or "3")
    local h = io.popen(string.format("/usr/bin/python3 %s/bench/data_compare.py --rows %d --trials %d 2>&1",
      home, rows, trials))
    local summary
    for line in h:lines() do
      local okd, v = pcall(cjson.decode, line)
      if okd and type(v) == "table" and v.metric == "data_read_map_pool_write_summary" then summary = v
      elseif okd and type(v) == "table" and (v.skipped or v.error) then io.stderr:write(line, "\n") end
    end
    h:close()
    if summary then
      local ray, dask, td = summary.ray_data, summary.dask, summary.tide
      for name, peer in pairs({ray_data = ray, dask = dask}) do
        if peer ~= cjson.null then
          m("data_read_map_pool_write_" .. name, peer.rows_per_s, "rows/s", nil,
            {peak_tree_rss_mib = peer.peak_tree_rss_mib, peak_tree_pss_mib = peer.peak_tree_pss_mib,
             runs = peer.runs, rows = summary.rows})
        end
      end
      if td then
        m("data_read_map_pool_write", td.rows_per_s, "rows/s", ray and ray.rows_per_s or nil,
          {peak_tree_rss_mib = td.peak_tree_rss_mib, peak_tree_pss_mib = td.peak_tree_pss_mib, runs = td.runs,
           rows = summary.rows, tide_over_ray_data_rows_per_s = summary.tide_over_ray_data_rows_per_s,
           tide_over_ray_data_peak_pss = summary.tide_over_ray_data_peak_pss,
           tide_over_dask_rows_per_s = summary.tide_over_dask_rows_per_s,
           tide_over_dask_peak_pss = summary.tide_over_dask_peak_pss, loadavg = summary.loadavg_before})
      end
    end
  end
end
