-- Batch generation with tide.data: prompts (one per line, in text files) are
-- tokenized on the CPU by tasks, then a pool of actors, each holding the
-- tiny GPT (tide.nn.gpt) loaded once in init, completes them in batches;
-- the completions land in ordered JSONL part files.
--
--   bin/tide run examples/train_tiny_gpt.lua      # optional: a trained checkpoint
--   bin/tide run examples/batch_generate.lua [CHECKPOINT] [OUT_DIR]
--   bin/tide run --num-gpus 1 examples/batch_generate.lua   # one actor per GPU
--
-- Without a checkpoint the model is untrained (it completes with random
-- bytes), so the pipeline can be tried first. With --num-gpus N each actor
-- reserves one GPU and runs the model there (cuda:0 inside its process)
-- when the CUDA backend is present, else on the CPU.
local tide = require("tide")
local data = require("tide.data")

local TMP = os.getenv("TMPDIR") or "/tmp"
local ckpt = (arg and arg[1]) or (TMP .. "/tide_tiny_gpt.safetensors")
local work = TMP .. "/tide-batch-generate-" .. tide.get_runtime_context().pid
local out = (arg and arg[2]) or (work .. "/out")
local NEW_TOKENS = 48

-- The prompts: openings of verses, in three files.
os.execute("mkdir -p '" .. work .. "/prompts'")
local openings = {"And God said, ", "In the beginning ", "And it came to pass ", "The LORD is ",
  "Blessed are ", "And he said unto them, ", "For God so ", "Then answered "}
for f = 1, 3 do
  local fh = assert(io.open(string.format("%s/prompts/p%d.txt", work, f), "wb"))
  for i = 1, 32 do fh:write(openings[(f * 5 + i) % #openings + 1], "\n") end
  if f == 2 then fh:write("\n") end -- a blank line, filtered out below
  fh:close()
end

local gpus = (tide.cluster_resources().GPU or 0)
local pool_size = gpus > 0 and math.min(gpus, 2) or 2

local stats = data.read_lines(work .. "/prompts/*.txt")
  :filter(function(row) return row.text:find("%S") ~= nil end)
  :map(function(row)
    local tok = require("tide.nn.tokenizer").byte_level()
    return {prompt = row.text, ids = tok:encode(row.text), source = row.path:match("[^/]+$") .. ":" .. row.line}
  end)
  :map_batches({
    init = function(self)
      local GPT = require("tide.nn.gpt")
      self.tok = require("tide.nn.tokenizer").byte_level()
      local device = "cpu"
      if #tide.get_runtime_context().gpu_ids > 0 then
        local ok, T = pcall(require, "tide.tensor")
        if ok and T.cuda_available and T.cuda_available() then device = "cuda:0" end
      end
      local f = io.open(ckpt, "rb")
      if f then
        f:close()
        self.model = GPT.load(ckpt, {device = device})
      else
        self.model = GPT.new({vocab_size = 256, n_layer = 2, n_head = 2, n_embd = 64, block_size = 64},
          {seed = 1, device = device})
      end
    end,
    call = function(self, batch)
      -- generate takes prompts of equal length: one call per length.
      local by_len = {}
      for i, row in ipairs(batch) do
        local g = by_len[#row.ids] or {}
        g[#g + 1] = i
        by_len[#row.ids] = g
      end
      for len, idx in pairs(by_len) do
        local prompts = {}
        for k, i in ipairs(idx) do prompts[k] = batch[i].ids end
        local outs = self.model:generate(prompts, NEW_TOKENS, {temperature = 0.8, top_k = 40, seed = len})
        for k, i in ipairs(idx) do
          local new = {}
          for j = len + 1, #outs[k] do new[#new + 1] = outs[k][j] end
          -- control and high bytes (an untrained model's output) shown as '.'
          batch[i].completion = self.tok:decode(new):gsub("[%c\128-\255]", ".")
          batch[i].ids = nil
        end
      end
      return batch
    end,
  }, {batch_size = 16, concurrency = pool_size, num_gpus = gpus > 0 and 1 or nil, name = "generate"})
  :write_jsonl(out)

print(stats)
print(string.format("%d completions in %s", stats.rows, out))
local f = assert(io.open(stats.files[1], "rb"))
print("first: " .. f:read("*l"))
f:close()
os.execute("rm -rf '" .. work .. "/prompts'")
