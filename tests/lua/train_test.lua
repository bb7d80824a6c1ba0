-- tide.train: data-parallel equivalence, recovery from a killed worker,
-- atomic checkpoints, exhausted max_failures, streamed reports, a dataset
-- sharded over the ranks, bad arguments.
local t = dofile("tests/lua/harness.lua")
local tide = require("tide")
tide.init({num_cpus = 2})
local train = require("tide.train")

local tmp = os.getenv("TMPDIR") or "/tmp"
local base = io.popen("mktemp -d " .. tmp .. "/tide_train_test.XXXXXX"):read("*l")
local function dir(name) return base .. "/" .. name end
local function exists(p) local f = io.open(p, "rb"); if f then f:close() end; return f ~= nil end
local function ls(d)
  local out = {}
  for l in io.popen("ls -1A " .. d .. " 2>/dev/null"):lines() do out[#out + 1] = l end
  table.sort(out)
  return out
end

local function max_diff(a, b)
  local x, y = a:to_table(), b:to_table()
  local m = 0
  local function walk(p, q)
    if type(p) == "table" then for i = 1, #p do walk(p[i], q[i]) end
    else m = math.max(m, math.abs(p - q)) end
  end
  walk(x, y)
  return m
end

-- Linear regression by SGD, data parallel: step s draws a global batch of
-- B rows (seeded by s); rank r takes rows r*B/W+1 .. (r+1)*B/W and the
-- gradients are averaged. Checkpoints every `every` steps; on restart it
-- resumes after the restored step.
local function linear_loop(ctx, cfg)
  local Tn = require("tide.tensor")
  local D, B = cfg.dim, cfg.batch
  local w_true = Tn.randn({D, 1}, {seed = 99})
  local w, start = Tn.zeros({D, 1}), 1
  local st = ctx:restore()
  if st then w, start = st.w, st.step + 1 end
  local per = B / ctx.world_size
  for step = start, cfg.steps do
    local X = Tn.randn({B, D}, {seed = 1000 + step})
    local lo = ctx.rank * per + 1
    local x = X:slice(1, lo, lo + per - 1):contiguous()
    local y = Tn.matmul(x, w_true)
    local diff = Tn.sub(Tn.matmul(x, w), y)
    local loss = Tn.dot(diff, diff) / per
    local grad = Tn.scale(Tn.matmul(x, diff, {trans_a = true}), 2 / per)
    ctx:allreduce(grad, "avg")
    Tn.add(w, grad, {alpha = 1, beta = -cfg.lr, out = w})
    if cfg.hook then cfg.hook(ctx, step, cfg) end
    ctx:report({step = step, loss = loss, tokens = step * B})
    if cfg.every and step % cfg.every == 0 then ctx:checkpoint({w = w, step = step, note = "linear",
      exact = 0.1 + 0.2, list = {1, 2, {3}}}) end
  end
  return {steps = cfg.steps}
end

local function linear_cfg(extra)
  local c = {dim = 16, batch = 8, steps = 20, lr = 0.05, every = 5}
  for k, v in pairs(extra or {}) do c[k] = v end
  return c
end

t.test("2 workers give the tiny GPT the same weights as 1 worker on the same global batch", function()
  local loop = function(ctx, cfg)
    local GPT = require("tide.nn.gpt")
    local Dc = require("tide.nn.corpus")
    local m = GPT.new(cfg.model, {seed = 1})
    local batches = Dc.batcher(cfg.text, cfg.B, cfg.model.block_size, 3)
    local per = cfg.B / ctx.world_size
    for step = 1, cfg.steps do
      local x, y = batches(step)
      local lo = ctx.rank * per + 1
      x = x:slice(1, lo, lo + per - 1):contiguous()
      y = y:slice(1, lo, lo + per - 1):contiguous()
      local _, loss = m:forward(x, y)
      m:zero_grad()
      m:backward()
      ctx:allreduce(m.grads, "avg")
      m:step({lr = 1e-2, weight_decay = 0.1})
      ctx:report({step = step, loss = loss})
    end
    ctx:checkpoint({model = m.p, step = cfg.steps})
  end
  local text = string.rep("In the beginning God created the heaven and the earth. ", 20)
  local cfg = {model = {vocab_size = 256, n_layer = 1, n_head = 2, n_embd = 16, block_size = 8},
    text = text, B = 4, steps = 4}
  local r1 = train.fit({num_workers = 1, loop = loop, config = cfg, checkpoint_dir = dir("dp1"), progress = false})
  local r2 = train.fit({num_workers = 2, loop = loop, config = cfg, checkpoint_dir = dir("dp2"), progress = false})
  local s1 = train.load_checkpoint(r1.checkpoint)
  local s2 = train.load_checkpoint(r2.checkpoint)
  local init = require("tide.nn.gpt").new(cfg.model, {seed = 1})
  local worst, moved, n = 0, 0, 0
  for name, w1 in pairs(s1.model) do
    n = n + 1
    worst = math.max(worst, max_diff(w1, s2.model[name]))
    moved = math.max(moved, max_diff(w1, init.p[name]))
  end
  t.eq(n, #init.params, "every parameter is in the checkpoint")
  t.ok(moved > 1e-3, "training moved the weights (" .. moved .. ")")
  t.ok(worst < 1e-4, "1 vs 2 workers: largest weight difference " .. worst)
  t.eq(s2.step, 4)
  t.eq(#r2.history, 4, "rank 0's four reports")
end)

t.test("a worker killed mid-run (kill -9): the group restarts from the last checkpoint and finishes", function()
  local pidfile = dir("pid1")
  local killed = false
  local cfg = linear_cfg({pidfile = pidfile, hook = function(ctx, step, c)
    if ctx.rank == 1 and step == 1 and ctx.attempt == 1 then
      local f = io.open(c.pidfile, "w")
      if f then f:write(tostring(tide.get_runtime_context().pid)); f:close() end
    end
    -- Leave the driver time to kill rank 1; rank 1 waits at step 13 to be
    -- killed, so that no checkpoint after step 10 is made however late the
    -- kill lands (under load the group reached step 15's once).
    if ctx.attempt == 1 then tide.sleep(ctx.rank == 1 and step >= 13 and 60 or 0.05) end
  end})
  local r = train.fit({num_workers = 2, loop = linear_loop, config = cfg, checkpoint_dir = dir("kill"),
    max_failures = 2, progress = false, on_report = function(rep)
      if rep.step == 12 and not killed then
        killed = true
        local pid = io.open(pidfile):read("*l")
        os.execute("kill -9 " .. pid)
      end
    end})
  t.ok(killed, "the driver killed rank 1's process")
  t.eq(r.attempts, 2, "one restart")
  t.eq(#r.failures, 1)
  t.eq(r.failures[1].rank, 1, "the failure names rank 1")
  t.eq(r.failures[1].kind, "ActorDiedError")
  t.ok(r.recoveries[1] and r.recoveries[1] > 0, "recovery time reported")
  io.write(string.format("# recovery after kill -9 of rank 1: %.3f s (death seen -> new group running)\n",
    r.recoveries[1]))
  t.eq(r.metrics.step, 20, "finished all 20 steps")
  -- the second attempt resumed after the checkpoint of step 10
  local first2
  for _, h in ipairs(r.history) do if h._attempt == 2 and not first2 then first2 = h.step end end
  t.eq(first2, 11, "attempt 2 starts after the last checkpoint (step 10)")
  -- the result equals a run that never failed
  local clean = train.fit({num_workers = 2, loop = linear_loop, config = linear_cfg(),
    checkpoint_dir = dir("clean"), progress = false})
  local a = train.load_checkpoint(r.checkpoint)
  local b = train.load_checkpoint(clean.checkpoint)
  t.eq(a.step, 20)
  t.eq(a.note, "linear")
  t.eq(a.exact, 0.1 + 0.2, "plain numbers round-trip exactly")
  t.deep_eq(a.list, {1, 2, {3}})
  t.ok(max_diff(a.w, b.w) < 1e-6, "same weights as an uninterrupted run")
  t.eq(#ls(dir("kill")), 2, "keep_checkpoints = 2 kept the last two")
end)

t.test("a crash inside ctx:checkpoint leaves the previous checkpoint intact and loadable", function()
  local d = dir("half")
  local ok, err = pcall(train.fit, {num_workers = 2, loop = linear_loop, config = linear_cfg(),
    checkpoint_dir = d, progress = false, max_failures = 0,
    runtime_env = {env_vars = {TIDE_TRAIN_FAULT = "checkpoint:2"}}})
  t.eq(ok, false)
  t.eq(getmetatable(err), train.TrainError)
  t.ok(tostring(err):find("rank 0 died"), tostring(err))
  local names = ls(d)
  t.eq(names[1]:match("^%.tmp%-checkpoint%-000002") ~= nil, true, "the half-written one is a temp dir: " .. names[1])
  t.ok(exists(d .. "/" .. names[1] .. "/tensors.safetensors"), "it was half written (tensors, no state)")
  t.ok(not exists(d .. "/" .. names[1] .. "/state.json"))
  t.eq(names[2], "checkpoint-000001")
  t.eq(#names, 2)
  t.eq(train.latest_checkpoint(d), d .. "/checkpoint-000001")
  local st = train.load_checkpoint(d .. "/checkpoint-000001")
  t.eq(st.step, 5)
  t.eq(st.w:numel(), 16)
  -- a new run in the same directory resumes from checkpoint 1
  local r = train.fit({num_workers = 2, loop = linear_loop, config = linear_cfg(), checkpoint_dir = d,
    progress = false})
  t.eq(r.history[1].step, 6, "resumed after step 5")
  t.eq(r.metrics.step, 20)
  local after = ls(d)
  t.eq(#after, 2)
  t.eq(after[2], "checkpoint-000004")
end)

t.local_test("elastic num_workers = {min, max}: as many workers as fit, fewer after a node's CPUs are lost", function()
  local pidfile = dir("pid_elastic")
  local blocker
  local cfg = linear_cfg({pidfile = pidfile, hook = function(ctx, step, c)
    if ctx.rank == 1 and step == 1 and ctx.attempt == 1 then
      local f = io.open(c.pidfile, "w")
      f:write(tostring(tide.get_runtime_context().pid))
      f:close()
    end
    if ctx.attempt == 1 then tide.sleep(0.05) end
  end})
  local Blocker = tide.actor({init = function() end, ping = function() return true end})
  local r = train.fit({num_workers = {1, 3}, loop = linear_loop, config = cfg, checkpoint_dir = dir("elastic"),
    max_failures = 1, progress = false, placement_timeout = 10, on_report = function(rep)
      if rep.step == 8 and not blocker then
        -- a CPU goes away (another job takes it as soon as it is free), and rank 1 dies
        blocker = Blocker:options({num_cpus = 1}):remote()
        os.execute("kill -9 " .. io.open(pidfile):read("*l"))
      end
    end})
  t.ok(blocker, "rank 1 was killed")
  t.eq(r.attempts, 2)
  t.eq(r.failures[1].world_size, 2, "attempt 1: 2 workers (3 do not fit on 2 CPUs)")
  t.eq(r.num_workers, 1, "attempt 2: the 1 worker that fits")
  t.eq(r.metrics._world_size, 1)
  t.eq(r.metrics.step, 20, "finished every step")
  t.eq(tide.get(blocker:ping(), {timeout = 10}), true, "the other job got its CPU")
  tide.kill(blocker)
  -- same result as the fixed-size run: the global batch does not depend on the workers
  local clean = train.fit({num_workers = 2, loop = linear_loop, config = linear_cfg(),
    checkpoint_dir = dir("elastic_clean"), progress = false})
  local a, b = train.load_checkpoint(r.checkpoint), train.load_checkpoint(clean.checkpoint)
  t.ok(max_diff(a.w, b.w) < 1e-5, "weights as an uninterrupted 2-worker run: " .. max_diff(a.w, b.w))
  t.raises(function() train.fit({loop = linear_loop, num_workers = {2, 1}}) end, "1 <= min <= max")
  t.raises(function() train.fit({loop = linear_loop, num_workers = {0, 1}}) end, "1 <= min <= max")
end)

t.test("max_failures used up: fit raises naming the rank and the cause", function()
  local cfg = linear_cfg({hook = function(ctx, step) if ctx.rank == 1 and step == 3 then os.exit(3) end end})
  local ok, err = pcall(train.fit, {num_workers = 2, loop = linear_loop, config = cfg,
    checkpoint_dir = dir("exhaust"), max_failures = 1, progress = false})
  t.eq(ok, false)
  t.eq(type(err), "table")
  local s = tostring(err)
  t.ok(s:find("rank 1 died in attempt 2 and max_failures = 1 is used up"), s)
  t.ok(s:find("ActorDiedError"), s)
  t.eq(err.rank, 1)
  t.eq(#err.failures, 2)
  -- a loop that raises is not retried
  local ok2, err2 = pcall(train.fit, {num_workers = 2, max_failures = 3, progress = false,
    loop = function(ctx) if ctx.rank == 0 then error("bad loop") end; ctx:barrier() end})
  t.eq(ok2, false)
  t.ok(tostring(err2):find("rank 0's loop raised in attempt 1") and tostring(err2):find("bad loop"), tostring(err2))
end)

t.test("reports stream to the driver while the loop runs (and computes without waiting)", function()
  local marker = dir("seen")
  local seen
  local r = train.fit({num_workers = 2, progress = false, config = {marker = marker},
    on_report = function(rep)
      if rep.step == 3 and not seen then
        seen = true
        io.open(marker, "w"):close()
      end
    end,
    loop = function(ctx, cfg)
      local now = require("tide.data.worker").now
      for step = 1, 6 do
        ctx:report({step = step})
        if step == 3 and ctx.rank == 0 then
          -- spin, making no Tide call, until the driver has seen step 3 (at most 10 s)
          local t0 = now()
          while not io.open(cfg.marker) do
            if now() - t0 > 10 then error("the driver never saw step 3 while the loop ran") end
          end
        end
        ctx:barrier()
      end
      return "done"
    end})
  t.ok(seen, "on_report saw step 3")
  t.eq(#r.history, 6)
  t.eq(r.value, "done")
  t.eq(r.metrics.step, 6)
  t.eq(r.history[6]._attempt, 1)
end)

t.local_test("fit publishes the last report as tide_train_* gauges (kept in an embedded driver)", function()
  train.fit({name = "gauges-run", num_workers = 1, progress = false, loop = function(ctx)
    for step = 1, 5 do ctx:report({step = step, loss = 1 / step, tokens = step * 10, note = "text"}) end
  end})
  local text = tide.metrics.text()
  t.ok(text:find('tide_train_step{run="gauges-run"} 5\n', 1, true), text)
  t.ok(text:find('tide_train_metric{key="loss",run="gauges-run"} 0.2\n', 1, true), text)
  t.ok(text:find('tide_train_metric{key="tokens",run="gauges-run"} 50\n', 1, true), text)
  t.ok(text:find('tide_train_workers{run="gauges-run"} 1\n', 1, true), text)
  t.ok(text:find('tide_train_running{run="gauges-run"} 0\n', 1, true), text)
  t.ok(not text:find('key="note"', 1, true) and not text:find('key="_', 1, true),
    "only the report's own numbers are published: " .. text)
end)

t.test("ctx:allreduce is exact over many sizes, with barriers between (ring buffer wrap-arounds)", function()
  local r = train.fit({num_workers = 2, progress = false, loop = function(ctx)
    local Tn = require("tide.tensor")
    -- sizes whose ring pieces straddle the end of the collective's 1 MiB
    -- channel buffer, a barrier between each: a 1-byte barrier there once
    -- made every later straddling float go wrong
    local err = 0
    for it, n in ipairs({49152, 100000, 800000, 7, 49152, 16385, 100000, 3, 65536, 49152}) do
      local x = Tn.randn({n}, {seed = it * 10 + ctx.rank})
      local want = Tn.scale(Tn.add(Tn.randn({n}, {seed = it * 10}), Tn.randn({n}, {seed = it * 10 + 1})), 0.5)
      ctx:allreduce(x, "avg")
      ctx:barrier()
      local d = Tn.sub(x, want)
      err = math.max(err, math.sqrt(Tn.dot(d, d)))
    end
    local list = {Tn.full({3, 4}, ctx.rank + 1), {"b", Tn.full({700000}, 2 * (ctx.rank + 1))}}
    ctx:allreduce(list, "sum")
    return {err = err, a = list[1]:get(3, 4), b = list[2][2]:get(700000),
      b1 = list[2][2]:get(1)}
  end})
  t.eq(r.value.err, 0, "every avg exact")
  t.eq(r.value.a, 3, "array element 1 summed")
  t.eq(r.value.b, 6, "{name, tensor} pair summed, last element")
  t.eq(r.value.b1, 6)
end)

t.test("ctx.shard iterates the rank's shard of the dataset in batches", function()
  local data = require("tide.data")
  local r = train.fit({num_workers = 2, dataset = data.range(40, {num_blocks = 4}), batch_size = 5,
    resources_per_worker = {num_cpus = 0.5}, progress = false,
    loop = function(ctx)
      local Tn = require("tide.tensor")
      local sum, rows, sizes = 0, 0, {}
      for batch in ctx.shard do
        sizes[#sizes + 1] = #batch
        for _, row in ipairs(batch) do sum = sum + row.id; rows = rows + 1 end
      end
      local x = Tn.from_table({sum, rows})
      ctx:allreduce(x, "sum")
      local v = x:to_table()
      ctx:report({rank_rows = rows, total = v[1], rows = v[2], batches = #sizes, epoch = ctx.shard.epoch})
      return v
    end})
  t.eq(r.value[1], 820, "every row once across the ranks")
  t.eq(r.value[2], 40)
  t.eq(r.metrics.rank_rows, 20, "rank 0 read half")
  t.eq(r.metrics.batches, 4, "batches of 5")
end)

t.local_test("bad arguments raise at the call with clear messages", function()
  local loop = function() end
  t.raises(function() train.fit() end, "train.fit: expected a table of options")
  t.raises(function() train.fit({num_workers = 2}) end, "option 'loop' must be a function")
  t.raises(function() train.fit({loop = loop, num_workers = 0}) end, "'num_workers' must be a positive integer")
  t.raises(function() train.fit({loop = loop, num_workers = 1.5}) end, "'num_workers' must be a positive integer")
  t.raises(function() train.fit({loop = loop, num_wrokers = 2}) end, "unknown option 'num_wrokers'")
  t.raises(function() train.fit({loop = loop, placement_strategy = "TIGHT"}) end, "placement_strategy")
  t.raises(function() train.fit({loop = loop, resources_per_worker = {cpus = 1}}) end, "unknown key 'cpus'")
  t.raises(function() train.fit({loop = loop, resources_per_worker = {num_cpus = -1}}) end, "num_cpus must be a non%-negative")
  t.raises(function() train.fit({loop = loop, dataset = {1, 2}}) end, "'dataset' must be a tide.data Dataset")
  t.raises(function() train.fit({loop = loop, max_failures = -2}) end, "max_failures")
  t.raises(function() train.fit({loop = loop, checkpoint_dir = 5}) end, "checkpoint_dir")
  t.raises(function() train.fit({loop = loop, keep_checkpoints = 0}) end, "keep_checkpoints")
  t.raises(function() train.fit({loop = loop, config = "x"}) end, "'config' must be a table")
  -- a dataset whose read tasks could never get a CPU: refused, not a hang
  t.raises(function() train.fit({loop = loop, num_workers = 2, dataset = require("tide.data").range(10)}) end,
    "hold 2 of the cluster's 2 CPUs, leaving less than the 1 CPU")
  -- the error points at the caller's line
  local _, e2 = pcall(function() train.fit({loop = loop, num_workers = 0}) end)
  t.ok(tostring(e2):find("train_test.lua:%d+:"), tostring(e2))
  -- more workers than the cluster has CPUs: a clear error, not a hang
  local ok3, e3 = pcall(train.fit, {loop = loop, num_workers = 3, placement_timeout = 1, progress = false})
  t.eq(ok3, false)
  t.ok(tostring(e3):find("could not be reserved within 1 s"), tostring(e3))
  -- ctx misuse inside the loop surfaces as the loop's error
  local ok4, e4 = pcall(train.fit, {num_workers = 1, progress = false,
    loop = function(ctx) ctx:checkpoint({x = 1}) end})
  t.eq(ok4, false)
  t.ok(tostring(e4):find("no checkpoint_dir"), tostring(e4))
  local ok5, e5 = pcall(train.fit, {num_workers = 1, progress = false, checkpoint_dir = dir("bad"),
    loop = function(ctx) ctx:checkpoint({f = print}) end})
  t.eq(ok5, false)
  t.ok(tostring(e5):find("cannot save a function at 'f'"), tostring(e5))
  t.eq(e5.kind, "TrainError")
  -- states JSON would change on the way back: refused, not saved changed
  local shared = {1}
  for _, c in ipairs({{{a = shared, b = shared}, "holds a table twice %(at b%)", "holds a table twice %(at a%)"},
                      {{sp = {[1] = 1, [5] = 2}}, "the table at 'sp' cannot be written as JSON"},
                      {{m = {1, x = 2}}, "the table at 'm' cannot be written as JSON"}}) do
    local ok6, e6 = pcall(train.fit, {num_workers = 1, progress = false, checkpoint_dir = dir("bad"),
      loop = function(ctx) ctx:checkpoint(c[1]) end})
    t.ok(not ok6 and (tostring(e6):find(c[2]) or c[3] and tostring(e6):find(c[3])), tostring(e6))
  end
end)

local function write_file(path, s)
  local f = assert(io.open(path, "w"))
  f:write(s)
  f:close()
end

-- 100 fast steps (about 3 s), reports with loss and tokens.
local PROGRESS_SCRIPT = [[
local tide = require("tide")
tide.init({num_cpus = 2})
local train = require("tide.train")
train.fit({num_workers = 2, progress_interval = 0.5, config = {steps = 100}, loop = function(ctx, cfg)
  for step = 1, cfg.steps do
    tide.sleep(0.03)
    ctx:report({step = step, loss = 1 / step, tokens = step * 1000})
    ctx:barrier()
  end
end})
]]

t.test("progress: plain periodic lines with step, loss and tokens/s when stderr is not a terminal", function()
  local script = dir("progress.lua")
  write_file(script, PROGRESS_SCRIPT)
  local out = io.popen("bin/tide run '" .. script .. "' 2>&1 >/dev/null"):read("*a")
  local n, last = 0, nil
  for line in out:gmatch("[^\n]+") do
    if line:find("^tide.train, step %d+/100, loss") then n = n + 1; last = line end
  end
  t.ok(n >= 2, "progress lines: " .. out)
  t.ok(n < 25, n .. " progress lines for 100 steps (one per step?)")
  t.ok(last:find("%d+ tokens/s, 2 workers"), last)
  t.ok(out:find("tide.train: done in [%d.]+ s: 1 attempt, last step 100"), out)
  t.ok(not out:find("\27", 1, true), "terminal escapes in a non-terminal")
end)

t.test("progress on a terminal: one line redrawn in place", function()
  local script = dir("progress_tty.lua")
  write_file(script, PROGRESS_SCRIPT)
  local out = io.popen("script -qfec \"bin/tide run '" .. script .. "'\" /dev/null 2>&1 < /dev/null"):read("*a")
  t.ok(out:find("\r\27[2Ktide.train, step ", 1, true), "no line redraw in: " .. out:sub(1, 300))
  local redraws = select(2, out:gsub("\27%[2K", ""))
  t.ok(redraws >= 5, redraws .. " redraws")
  local lines = select(2, out:gsub("\n", ""))
  t.ok(lines <= 3, lines .. " lines (the progress line should be redrawn, not repeated): " .. out:sub(1, 300))
  t.ok(out:find("tide.train, step 100/100", 1, true), "the final line shows step 100")
end)

os.execute("rm -rf " .. base)
t.done()
