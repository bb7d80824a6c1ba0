-- Trains a tiny GPT from scratch on the King James Bible (Debian package
-- bible-kjv-text), on the CPU, in a few minutes; saves a checkpoint, loads it
-- back and prints a sample from the untrained and from the trained model.
--
--   tide run examples/train_tiny_gpt.lua [steps=1200] [checkpoint path]
local GPT = require("tide.nn.gpt")
local D = require("tide.nn.corpus")
local tok = require("tide.nn.tokenizer").byte_level()

local steps = tonumber(arg and arg[1]) or 1200
local ckpt = (arg and arg[2]) or ((os.getenv("TMPDIR") or "/tmp") .. "/tide_tiny_gpt.safetensors")
local B, CTX = 16, 64
local config = {vocab_size = tok.vocab_size, n_layer = 4, n_head = 4, n_embd = 128, block_size = CTX}
local LR, WARMUP, MIN_LR = 3e-3, 30, 3e-4

local text = assert(D.bible_kjv())
local train, valid = D.split(text, 0.05)
print(string.format("data: %d bytes of KJV text (%d train, %d validation)", #text, #train, #valid))

local model = GPT.new(config, {seed = 1337})
print(string.format("model: %d layers, %d heads, width %d, context %d, %d parameters",
  config.n_layer, config.n_head, config.n_embd, config.block_size, model:num_params()))

local prompt = tok:encode("And God said, ")
local function sample(m)
  local out = m:generate(prompt, 200, {temperature = 0.8, top_k = 40, seed = 7})
  -- show control bytes of the untrained model's output as '.'
  return (tok:decode(out):gsub("[%c\128-\255]", function(c) return c == "\n" and "\n" or "." end))
end
local untrained = sample(model)

local batches, vbatches = D.batcher(train, B, CTX, 1), D.batcher(valid, B, CTX, 2)
local function val_loss()
  local s = 0
  for i = 1, 4 do
    local x, y = vbatches(i)
    local _, l = model:forward(x, y)
    s = s + l
  end
  return s / 4
end

local function lr_at(step)
  if step <= WARMUP then return LR * step / WARMUP end
  local p = (step - WARMUP) / math.max(1, steps - WARMUP)
  return MIN_LR + 0.5 * (LR - MIN_LR) * (1 + math.cos(math.pi * p))
end

local t0 = os.time()
for step = 1, steps do
  local x, y = batches(step)
  local _, loss = model:forward(x, y)
  model:zero_grad()
  model:backward()
  model:step({lr = lr_at(step), weight_decay = 0.1, grad_clip = 1.0})
  if step == 1 or step % 50 == 0 or step == steps then
    local el = os.time() - t0
    print(string.format("step %d loss %.4f val %.4f lr %.2e (%ds, %.0f tokens/s)", step, loss,
      val_loss(), lr_at(step), el, step * B * CTX / math.max(el, 1)))
    io.stdout:flush()
  end
end

model:save(ckpt, {steps = steps, data = "bible-kjv-text"})
print("saved checkpoint " .. ckpt)
local loaded = GPT.load(ckpt)
local x, y = vbatches(1)
local _, l1 = model:forward(x, y)
local _, l2 = loaded:forward(x, y)
print(string.format("reloaded checkpoint: validation loss %.4f (trained model %.4f)", l2, l1))
assert(l1 == l2, "the reloaded model must compute the same loss")

print("\n--- untrained model, prompt 'And God said, ' ---")
print(untrained)
print("\n--- trained model (loaded from the checkpoint) ---")
print(sample(loaded))
