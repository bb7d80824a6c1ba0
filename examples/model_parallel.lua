-- Splits one GPT across 2 workers (tensor parallelism, tide.nn.tp): each
-- worker is a shard actor on a placement group holding half of every
-- attention block's heads and half of every MLP, joined with the other in
-- one collective group. Checks the split model's logits against the whole
-- model's, then generates greedily, printing each token as it comes.
--
--   bin/tide run examples/model_parallel.lua [CHECKPOINT] [WORLD]
--
-- CHECKPOINT: a tide.nn.gpt safetensors file (examples/train_tiny_gpt.lua
-- writes /tmp/tide_tiny_gpt.safetensors) or a tide.train checkpoint
-- directory whose state has model = model.p and config = model.config;
-- without one, an untrained 4-layer model. WORLD (2) must divide n_head.
local tide = require("tide")
local T = require("tide.tensor")
local GPT = require("tide.nn.gpt")
local TP = require("tide.nn.tp")
local tok = require("tide.nn.tokenizer").byte_level()

local ckpt = (arg and arg[1]) or ((os.getenv("TMPDIR") or "/tmp") .. "/tide_tiny_gpt.safetensors")
local world = tonumber(arg and arg[2]) or 2
tide.init({num_cpus = math.max(2, world)})

-- The whole model, in the driver, to compare against.
local model, source
local f = io.open(ckpt, "rb")
if f then
  f:close()
  source = {checkpoint = ckpt}
  local cfg, params = TP.load_full(source)           -- GPT files and tide.train directories alike
  model = GPT.new(cfg)
  for name, p in pairs(params) do model.p[name]:copy(p) end
  print("checkpoint: " .. ckpt)
else
  local cfg = {vocab_size = 256, n_layer = 4, n_head = 4, n_embd = 128, block_size = 64}
  source = {config = cfg, seed = 1}
  model = GPT.new(cfg, {seed = 1})
  print("no checkpoint at " .. ckpt .. ": an untrained model (examples/train_tiny_gpt.lua makes one)")
end
local cfg = model.config
print(string.format("model: %d layers, %d heads, width %d, %d parameters", cfg.n_layer, cfg.n_head,
  cfg.n_embd, model:num_params()))

local now = require("tide.data.worker").now
local opts = {world_size = world, resources_per_worker = {num_cpus = 1}}
for k, v in pairs(source) do opts[k] = v end
local g = TP.group(opts)
print(string.format("split across %d shard actors (pids %s), %d parameters each (%.0f%% of the model)",
  world, table.concat(g.pids, ", "), g.params_per_rank[1], 100 * g.params_per_rank[1] / model:num_params()))

-- The same batch through both.
local text = "In the beginning God created the heaven and the earth."
local ids = tok:encode(text)
local rows = {{}, {}}
for i = 1, 32 do rows[1][i] = ids[i]; rows[2][i] = ids[#ids - 32 + i] end
local want = model:forward(T.from_table(rows, {dtype = "i32"})):clone()
local got = g:logits(rows)
local a, b = want:view({-1}):to_table(), got:view({-1}):to_table()
local worst = 0
for i = 1, #a do worst = math.max(worst, math.abs(a[i] - b[i])) end
print(string.format("logits of a (2, 32) batch: max |whole - split| = %.3g over %d values", worst, #a))
assert(worst < 1e-3, "the split model's logits differ from the whole model's")

-- Greedy generation from the split model, token by token.
local prompt = tok:encode("And God said, ")
io.write("split model, greedy: And God said, ")
local split = tok.utf8_split or require("tide.nn.tokenizer").utf8_split
local pending = ""
local t0 = now()
local out = g:generate(prompt, 120, {temperature = 0, on_token = function(id)
  local s
  s, pending = split(pending .. tok:decode({id}), false)
  io.write(s)
  io.flush()
end})
io.write(split(pending, true), "\n")
local t_split = now() - t0
t0 = now()
local whole = model:generate(prompt, 120, {temperature = 0})
local t_whole = now() - t0
print(string.format("120 tokens: split %.0f tokens/s (%d ranks, 2 allreduces per block per token), whole %.0f tokens/s",
  120 / t_split, world, 120 / t_whole))
print(table.concat(out, ",") == table.concat(whole, ",") and "the whole model generates the same tokens"
  or "the whole model's greedy tokens differ (near-ties between logits)")
g:close()
