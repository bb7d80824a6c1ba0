-- The generative-AI flagship, what `make demo` runs: on the embedded
-- cluster of this one machine, in a couple of minutes on 2 CPU cores,
--
--   1. train a tiny GPT with 2 data-parallel workers (tide.train) on the
--      King James Bible (tide.nn.corpus), with checkpoints;
--   2. batch-generate continuations for a file of prompts (tide.data);
--   3. serve the model over HTTP with streamed tokens (tide.serve) and ask
--      it a few questions through a real HTTP client (tide.http);
--   4. fine-tune it through the job endpoint of the fine-tuning service
--      (examples/finetune_service.lua) on a small text of another style,
--      and show the served output change (same prompt, greedy decoding);
--   5. shut everything down.
--
--   bin/tide run examples/genai.lua            # the full demo
--   bin/tide run examples/genai.lua quick      # a short run (make test)
local tide = require("tide")
local train = require("tide.train")
local data = require("tide.data")
local serve = require("tide.serve")
local cjson = require("cjson")

local quick = (arg and arg[1] == "quick") or os.getenv("TIDE_DEMO_QUICK") == "1"
local here = (arg and arg[0] or ""):match("^(.*)/[^/]*$") or "."
local svc = dofile(here .. "/finetune_service.lua")
local TMP = os.getenv("TMPDIR") or "/tmp"
local work = io.popen("mktemp -d " .. TMP .. "/tide-genai.XXXXXX"):read("*l")
local t_start = require("tide.http").now()

local function step(n, title)
  print(string.format("\n== %d. %s  [%.0f s]", n, title, require("tide.http").now() - t_start))
end
-- Control and high bytes (an undertrained byte-level model makes some) shown as '.'
local function printable(s) return (s:gsub("[%c\128-\255]", function(c) return c == "\n" and " " or "." end)) end

local MODEL = quick and {vocab_size = 256, n_layer = 2, n_head = 2, n_embd = 64, block_size = 32}
  or {vocab_size = 256, n_layer = 4, n_head = 4, n_embd = 128, block_size = 64}
local STEPS, FT_STEPS = quick and 16 or 300, quick and 12 or 60
tide.init({num_cpus = 2})

-- 1. ------------------------------------------------------------------------
step(1, string.format("training a tiny GPT (%d layers, width %d, %d parameters) for %d steps on 2 workers",
  MODEL.n_layer, MODEL.n_embd, require("tide.nn.gpt").new(MODEL):num_params(), STEPS))
local CKPT = work .. "/ckpt"
local every = math.max(1, math.floor(STEPS / 8))
local result = train.fit({
  num_workers = 2,
  resources_per_worker = {num_cpus = 1},
  config = {steps = STEPS, batch = 16, lr = 3e-3, warmup = math.floor(STEPS / 8), model = MODEL},
  max_failures = 2,
  checkpoint_dir = CKPT,
  progress = false,
  on_report = function(r)
    if r.step % every == 0 or r.step == 1 then
      print(string.format("   step %3d/%d  loss %.3f%s", r.step, STEPS, r.loss,
        r.tokens_per_s and string.format("  %5.0f tokens/s", r.tokens_per_s) or ""))
    end
  end,
  loop = function(ctx, cfg)
    local G = require("tide.nn.gpt")
    local D = require("tide.nn.corpus")
    local T = require("tide.tensor")
    local now = require("tide.data.worker").now
    local text = assert(D.bible_kjv())
    local per, CTX = cfg.batch / ctx.world_size, cfg.model.block_size
    local batches = D.batcher(text, per, CTX, 1000 + ctx.rank)    -- this rank's rows of each batch
    local m = G.new(cfg.model, {seed = 1337})                      -- the same weights on every rank
    local start = 1
    local st = ctx:restore()                                       -- after a worker's death
    if st then
      for name, t in pairs(st.model) do m.p[name]:copy(t) end
      m.opt_m, m.opt_v, m.step_count = st.opt_m, st.opt_v, st.adam_step
      start = st.step + 1
    end
    local t1
    for s = start, cfg.steps do
      if s == start + 1 then t1 = now() end
      local x, y = batches(s)
      local _, loss = m:forward(x, y)
      m:zero_grad()
      m:backward()
      ctx:allreduce(m.grads, "avg")                                -- data parallel: average the gradients
      local lr = s <= cfg.warmup and cfg.lr * s / math.max(1, cfg.warmup) or cfg.lr
      m:step({lr = lr, weight_decay = 0.1, grad_clip = 1.0})
      local l = T.from_table({loss})
      ctx:allreduce(l, "avg")
      ctx:report({step = s, loss = l:item(),
        tokens_per_s = t1 and s > start + 1 and (s - start - 1) * cfg.batch * CTX / (now() - t1) or nil})
      if s % 20 == 0 or s == cfg.steps then
        -- model_config goes with the weights, so the service can load it
        ctx:checkpoint({model = m.p, model_config = m.config, opt_m = m.opt_m, opt_v = m.opt_v,
          adam_step = m.step_count, step = s})
      end
    end
  end,
})
local first, last = result.history[1], result.metrics
print(string.format("   loss %.3f -> %.3f in %.1f s; checkpoint %s", first.loss, last.loss, result.wall_s,
  result.checkpoint))
local ckpt = result.checkpoint

-- 2. ------------------------------------------------------------------------
step(2, "batch generation with tide.data: a file of prompts -> JSONL of continuations")
os.execute("mkdir -p '" .. work .. "/prompts'")
local openings = {"And God said, ", "In the beginning ", "And it came to pass ", "The LORD is ",
  "Blessed are ", "And he said unto them, ", "For God so ", "Then answered "}
local fh = assert(io.open(work .. "/prompts/prompts.txt", "wb"))
for i = 1, quick and 8 or 24 do fh:write(openings[(i - 1) % #openings + 1], "\n") end
fh:close()
local load_model = svc.load_model
local NEW = quick and 16 or 40
local stats = data.read_lines(work .. "/prompts/*.txt")
  :map_batches({
    init = function(self) self.model = load_model(ckpt) end,       -- once per actor of the pool
    call = function(self, batch)
      local tok = require("tide.nn.tokenizer").byte_level()
      local by_len = {}                                            -- generate takes equal-length prompts
      for i, row in ipairs(batch) do
        local n = #row.text
        by_len[n] = by_len[n] or {}
        table.insert(by_len[n], i)
      end
      for len, idx in pairs(by_len) do
        local prompts = {}
        for k, i in ipairs(idx) do prompts[k] = tok:encode(batch[i].text) end
        local outs = self.model:generate(prompts, NEW, {temperature = 0.8, top_k = 40, seed = len})
        for k, i in ipairs(idx) do
          batch[i] = {prompt = batch[i].text, completion = tok:decode({unpack(outs[k], len + 1)})}
        end
      end
      return batch
    end,
  }, {batch_size = 8, concurrency = 2, name = "generate"})
  :write_jsonl(work .. "/out")
print(string.format("   %d prompts -> %d completions in %s", stats.rows, stats.rows, work .. "/out"))
local shown = 0
for _, path in ipairs(stats.files) do
  for line in io.lines(path) do
    if shown < 3 then
      local row = cjson.decode(line)
      print(string.format("   %q -> %q", row.prompt, printable(row.completion)))
      shown = shown + 1
    end
  end
end

-- 3. ------------------------------------------------------------------------
step(3, "serving the model over HTTP with streamed tokens (tide.serve)")
local port = serve.run(svc.app({checkpoint = ckpt, state_dir = work .. "/service", batch = 8}),
  {port = tonumber(os.getenv("TIDE_DEMO_PORT") or "") or 0, blocking = false})
print(string.format("   POST http://127.0.0.1:%d/generate, POST http://127.0.0.1:%d/jobs/finetune", port, port))

-- The HTTP client runs in tasks (it blocks; the driver keeps serving) that
-- hold no CPU, so they run while the fine-tune's workers hold both.
local http_task = tide.remote(function(p, method, path, body)
  local r = require("tide.http").request(p, method, path, {body = body, timeout = 120,
    headers = body and {["Content-Type"] = "application/json"} or nil})
  local chunks = {}
  for i, c in ipairs(r.chunks or {}) do chunks[i] = c.t end
  return {status = r.status, body = r.body, json = r.json, chunks = chunks}
end):options({num_cpus = 0})
local function http(method, path, body)
  local ref = http_task:remote(port, method, path, body and cjson.encode(body))
  while #tide.wait({ref}, {timeout = 0}) == 0 do serve.poll(0.02) end
  local r = tide.get(ref)
  if r.status >= 300 then error(string.format("%s %s: HTTP %d: %s", method, path, r.status, r.body)) end
  return r
end

for _, prompt in ipairs({"And God said, ", "The LORD is my "}) do
  local r = http("POST", "/generate", {prompt = prompt, max_tokens = quick and 24 or 60, temperature = 0.8, seed = 7})
  local ct = r.chunks
  print(string.format("   %q -> %q", prompt, printable(r.body)))
  print(string.format("      (streamed: %d chunks, one per token)", #ct))
end

-- 4. ------------------------------------------------------------------------
step(4, "fine-tuning through the service's job endpoint on a text of another style")
local style = work .. "/sea.txt"
local lines = {"the tide comes in and the tide goes out.", "the moon pulls the sea and the sea pulls the sand.",
  "row the boat home to the harbour light.", "the gulls cry over the grey water."}
fh = assert(io.open(style, "wb"))
for i = 1, 400 do fh:write(lines[(i - 1) % #lines + 1], "\n") end
fh:close()
local PROMPT = "And the "
local function greedy()
  return http("POST", "/generate", {prompt = PROMPT, max_tokens = quick and 24 or 60, temperature = 0}).body
end
local before = greedy()
local job = http("POST", "/jobs/finetune", {base = "current", dataset = style, steps = FT_STEPS, lr = 3e-3}).json
print(string.format("   POST /jobs/finetune {\"base\": \"current\", \"dataset\": %q, \"steps\": %d} -> %s",
  style, FT_STEPS, job.id))
local rec
local last_step = ""
repeat
  serve.poll(quick and 0.2 or 1)
  rec = http("GET", "/jobs/" .. job.id).json
  local n = rec.note
  if type(n) == "table" and rec.status .. n.step ~= last_step then
    last_step = rec.status .. n.step
    print(string.format("   GET /jobs/%s: %s, step %d/%d, loss %.3f, %s tokens/s, %d workers", job.id, rec.status,
      n.step, n.steps, n.loss, tostring(n.tokens_per_s or "-"), n.workers or 0))
  end
until rec.status ~= "pending" and rec.status ~= "running"
if rec.status ~= "succeeded" then error("the fine-tune job " .. rec.status .. ": " .. tostring(rec.error)) end
print(string.format("   %s: loss %.3f -> %.3f on %d workers; %s swapped into %d replica(s)", rec.status,
  rec.result.first_loss, rec.result.loss, rec.result.workers, rec.result.checkpoint, rec.result.replicas_swapped))
local after = greedy()
print(string.format("   same prompt %q, greedy decoding:", PROMPT))
print("     before: " .. printable(before))
print("     after:  " .. printable(after))
if after == before then error("the served output did not change after the fine-tune") end

-- 5. ------------------------------------------------------------------------
step(5, "shutting down")
serve.shutdown()
os.execute("rm -rf '" .. work .. "'")
print(string.format("done in %.0f s", require("tide.http").now() - t_start))
