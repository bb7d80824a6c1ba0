-- Data-parallel training of the tiny GPT with tide.train: 2 workers (ranks)
-- in a placement group, each on its half of every global batch of the King
-- James Bible (Debian package bible-kjv-text), gradients averaged with
-- ctx:allreduce, a checkpoint every 20 steps (restored if a worker dies),
-- then a sample from the trained model, loaded from the last checkpoint.
--
--   tide run examples/train_dp.lua [steps=60] [workers=2]
local train = require("tide.train")
local GPT = require("tide.nn.gpt")
local tok = require("tide.nn.tokenizer").byte_level()

local steps = tonumber(arg and arg[1]) or 60
local workers = tonumber(arg and arg[2]) or 2
local ckpt_dir = io.popen("mktemp -d " .. (os.getenv("TMPDIR") or "/tmp") .. "/tide_train_dp.XXXXXX"):read("*l")

local config = {
  steps = steps, batch = 16, lr = 3e-3, warmup = 10, min_lr = 3e-4, checkpoint_every = 20,
  model = {vocab_size = 256, n_layer = 4, n_head = 4, n_embd = 128, block_size = 64},
}
print(string.format(
  "training the tiny GPT (%d layers, width %d) for %d steps on %d workers, global batch %d x %d tokens",
  config.model.n_layer, config.model.n_embd, steps, workers, config.batch, config.model.block_size))

-- Runs on every rank, in its own process.
local function loop(ctx, cfg)
  local G = require("tide.nn.gpt")
  local D = require("tide.nn.corpus")
  local text = assert(D.bible_kjv())
  local per = cfg.batch / ctx.world_size
  local CTX = cfg.model.block_size
  -- each rank draws its own rows of every global batch
  local batches = D.batcher(text, per, CTX, 1000 + ctx.rank)
  local m = G.new(cfg.model, {seed = 1337})      -- the same initial weights on every rank
  local start = 1
  local st = ctx:restore()
  if st then   -- a restart after a failure: weights, AdamW state and step
    for name, t in pairs(st.model) do m.p[name]:copy(t) end
    m.opt_m, m.opt_v, m.step_count = st.opt_m, st.opt_v, st.adam_step
    start = st.step + 1
  end
  local function lr_at(step)
    if step <= cfg.warmup then return cfg.lr * step / cfg.warmup end
    local p = (step - cfg.warmup) / math.max(1, cfg.steps - cfg.warmup)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * p))
  end
  local now = require("tide.data.worker").now    -- a monotonic clock
  local t1
  for step = start, cfg.steps do
    if step == start + 1 then t1 = now() end       -- time steps after the first (warm buffers)
    local x, y = batches(step)
    local _, loss = m:forward(x, y)
    m:zero_grad()
    m:backward()
    ctx:allreduce(m.grads, "avg")                -- one flat allreduce of every gradient
    m:step({lr = lr_at(step), weight_decay = 0.1, grad_clip = 1.0})
    local l = require("tide.tensor").from_table({loss})
    ctx:allreduce(l, "avg")                      -- the loss over the global batch
    ctx:report({step = step, loss = l:item(), tokens = step * cfg.batch * CTX})
    if step % cfg.checkpoint_every == 0 or step == cfg.steps then
      ctx:checkpoint({model = m.p, opt_m = m.opt_m, opt_v = m.opt_v, adam_step = m.step_count, step = step})
    end
  end
  local n = cfg.steps - start
  return {tokens_per_s = t1 and n > 0 and n * cfg.batch * CTX / (now() - t1) or nil}
end

local result = train.fit({
  num_workers = workers,
  resources_per_worker = {num_cpus = 1},
  placement_strategy = "PACK",
  config = config,
  max_failures = 2,
  checkpoint_dir = ckpt_dir,
  progress_interval = 2,
  loop = loop,
})

local first, last = result.history[1], result.metrics
print(string.format("loss %.3f at step %d -> %.3f at step %d; %.1f s, %d attempt(s)", first.loss, first.step,
  last.loss, last.step, result.wall_s, result.attempts))
if result.value and result.value.tokens_per_s then
  print(string.format("%d workers: %.0f tokens/s (steps 2-%d, checkpoints included)", workers,
    result.value.tokens_per_s, steps))
end
print("last checkpoint: " .. result.checkpoint)

-- The checkpoint's tensors go straight into a model in the driver.
local state = train.load_checkpoint(result.checkpoint)
local model = GPT.new(config.model)
for name, t in pairs(state.model) do model.p[name]:copy(t) end
local out = model:generate(tok:encode("And God said, "), 120, {temperature = 0.8, top_k = 40, seed = 7})
print("\n--- sample from the trained model ---")
print((tok:decode(out):gsub("[%c\128-\255]", function(c) return c == "\n" and "\n" or "." end)))
os.execute("rm -rf '" .. ckpt_dir .. "'")
