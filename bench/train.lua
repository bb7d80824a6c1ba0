-- tide bench train_dp*: issue 15's data-parallel scaling target (2 workers
-- reach >= 1.7x one worker's tokens/s on CPU), bench.lua loads this file.
--
--   train_dp_tokens_per_s_<n>w   tokens/s of rank 0 (steps after the
--                                first, no checkpoints) training the tiny
--                                GPT (4 layers, width 128, context 64) on
--                                a global batch of 16 x 64 tokens split
--                                over n workers of 1 CPU each
--   train_dp_scaling_2w          2 workers' tokens/s over 1 worker's;
--                                limit 2 (perfect scaling on 2 cores)
--   train_recovery_s             (b.part == "recovery") the same model on 2
--                                workers, checkpointed every 4 steps; rank 1
--                                kill -9s its own process at step 6: seconds
--                                from its death being seen to the new group
--                                running (result.failures[1].recovery_s),
--                                median of TIDE_BENCH_TRAIN_ROUNDS runs
--
-- Runs alternate 1 and 2 workers, TIDE_BENCH_TRAIN_ROUNDS rounds (default
-- 2), medians reported; TIDE_BENCH_SCALE scales the steps (40).
local tide = require("tide")
local train = require("tide.train")

-- One data-parallel step of the model on a batch (both loops ship it to
-- their workers as an upvalue).
local function dp_step(ctx, m, x, y)
  m:forward(x, y)
  m:zero_grad()
  m:backward()
  ctx:allreduce(m.grads, "avg")
  m:step({lr = 1e-3, grad_clip = 1.0})
end

local function recovery(b)
  local function loop(ctx, cfg)
    local G = require("tide.nn.gpt")
    local D = require("tide.nn.corpus")
    local text = assert(D.bible_kjv({max_bytes = 2e6}))
    local batches = D.batcher(text, cfg.batch / ctx.world_size, cfg.model.block_size, 1000 + ctx.rank)
    local m = G.new(cfg.model, {seed = 1337})
    local start, st = 1, ctx:restore()
    if st then
      for name, t in pairs(st.model) do m.p[name]:copy(t) end
      m.opt_m, m.opt_v, m.step_count = st.opt_m, st.opt_v, st.adam_step
      start = st.step + 1
    end
    for step = start, cfg.steps do
      if ctx.rank == 1 and step == 6 and ctx.attempt == 1 then
        os.execute("kill -9 " .. tide.get_runtime_context().pid)
        tide.sleep(10)
      end
      dp_step(ctx, m, batches(step))
      if step % 4 == 0 then
        ctx:checkpoint({model = m.p, opt_m = m.opt_m, opt_v = m.opt_v, adam_step = m.step_count, step = step})
      end
    end
  end
  local cfg = {steps = 10, batch = 16,
    model = {vocab_size = 256, n_layer = 4, n_head = 4, n_embd = 128, block_size = 64}}
  local rounds = tonumber(os.getenv("TIDE_BENCH_TRAIN_ROUNDS") or "") or 2
  local got = {}
  for k = 1, rounds do
    local dir = os.tmpname()
    os.remove(dir)
    local r = train.fit({num_workers = 2, resources_per_worker = {num_cpus = 1}, config = cfg, progress = false,
      max_failures = 1, checkpoint_dir = dir, loop = loop})
    os.execute("rm -rf '" .. dir .. "'")
    local f = r.failures and r.failures[1]
    if not (f and f.recovery_s) then error("train_recovery_s: run " .. k .. " saw no recovery") end
    got[#got + 1] = f.recovery_s
  end
  table.sort(got)
  local med = #got % 2 == 1 and got[(#got + 1) / 2] or (got[#got / 2] + got[#got / 2 + 1]) / 2
  b.m("train_recovery_s", med, "s", nil, {rounds = rounds,
    note = "kill -9 of rank 1 at step 6 -> new group of 2 running (death seen to running), tiny GPT"})
end

return function(b)
  if b.part == "recovery" then return recovery(b) end
  local cpus = tide.cluster_resources().CPU or 0
  if cpus < 2 then
    b.emit({metric = "train_dp_scaling_2w", skipped = "needs 2 CPUs, the cluster has " .. cpus})
    return
  end
  local steps = math.max(8, math.floor(40 * b.SCALE))
  local function loop(ctx, cfg)
    local G = require("tide.nn.gpt")
    local D = require("tide.nn.corpus")
    local now = require("tide.data.worker").now
    local text = assert(D.bible_kjv({max_bytes = 2e6}))
    local per, CTX = cfg.batch / ctx.world_size, cfg.model.block_size
    local batches = D.batcher(text, per, CTX, 1000 + ctx.rank)
    local m = G.new(cfg.model, {seed = 1337})
    local t1
    for s = 1, cfg.steps do
      if s == 2 then t1 = now() end
      dp_step(ctx, m, batches(s))
    end
    return (cfg.steps - 1) * cfg.batch * CTX / (now() - t1)
  end
  local cfg = {steps = steps, batch = 16,
    model = {vocab_size = 256, n_layer = 4, n_head = 4, n_embd = 128, block_size = 64}}
  local rounds = tonumber(os.getenv("TIDE_BENCH_TRAIN_ROUNDS") or "") or 2
  local got = {[1] = {}, [2] = {}}
  for _ = 1, rounds do
    for _, n in ipairs({1, 2}) do
      local r = train.fit({num_workers = n, resources_per_worker = {num_cpus = 1}, config = cfg,
        progress = false, loop = loop})
      table.insert(got[n], r.value)
    end
  end
  local function median(v)
    table.sort(v)
    local k = #v
    return k % 2 == 1 and v[(k + 1) / 2] or (v[k / 2] + v[k / 2 + 1]) / 2
  end
  local one, two = median(got[1]), median(got[2])
  b.m("train_dp_tokens_per_s_1w", one, "tokens/s", nil, {steps = steps, rounds = rounds})
  b.m("train_dp_tokens_per_s_2w", two, "tokens/s", nil, {steps = steps, rounds = rounds})
  b.m("train_dp_scaling_2w", two / one, "x", 2, {target = 1.7,
    note = "2 workers' tokens/s over 1 worker's, same global batch (16 x 64), tiny GPT, 1 CPU each"})
end
