-- The fine-tuning service (examples/finetune_service.lua) driven through
-- its HTTP job API with a real client (tide.http, in tasks): bad requests
-- get 400 naming the field, a missing dataset fails the job with the reason
-- in its record, a good job streams progress (step, loss, tokens/s),
-- trains with train.fit and swaps its checkpoint into the /generate
-- deployment, whose greedy output then changes; a stream in flight during
-- a swap finishes.
local t = dofile("tests/lua/harness.lua")
local tide = require("tide")
tide.init({num_cpus = 2})
local serve = require("tide.serve")
local cjson = require("cjson")
local http = require("tide.http")
local PORT = 18470

local dir = io.popen("mktemp -d " .. (os.getenv("TMPDIR") or "/tmp") .. "/tide_finetune_test.XXXXXX"):read("*l")
-- A small base model, saved as a GPT .safetensors checkpoint.
local GPT = require("tide.nn.gpt")
local base = dir .. "/base.safetensors"
GPT.new({n_layer = 1, n_head = 2, n_embd = 32, block_size = 32}, {seed = 3}):save(base)
-- A distinctive text to fine-tune on.
local ds = dir .. "/style.txt"
local f = assert(io.open(ds, "wb"))
for _ = 1, 200 do f:write("zip zap zoom! ") end
f:close()

local svc = dofile("examples/finetune_service.lua")
serve.run(svc.app({checkpoint = base, state_dir = dir .. "/state", batch = 4}), {port = PORT, blocking = false})

-- fn(http, port, ...) in a task that holds no CPU (the fine-tune's workers hold them).
local function client(fn)
  return tide.remote(function(...) return fn(require("tide.http"), ...) end):options({num_cpus = 0})
end
local function await(ref, timeout)
  local deadline = os.time() + (timeout or 120)
  while #tide.wait({ref}, {timeout = 0}) == 0 do
    serve.poll(0.02)
    if os.time() > deadline then error("the client task did not finish in time") end
  end
  return tide.get(ref)
end
local req = client(function(h, port, method, path, body)
  local r = h.request(port, method, path, {body = body, timeout = 60,
    headers = body and {["Content-Type"] = "application/json"} or nil})
  return {status = r.status, body = r.body, json = r.json}
end)
local function call(method, path, body) return await(req:remote(PORT, method, path, body)) end
local function greedy(prompt)
  local r = call("POST", "/generate", cjson.encode({prompt = prompt, max_tokens = 40, temperature = 0}))
  t.eq(r.status, 200, r.body)
  return r.body
end
-- Polls the job until it ends; returns its last record and every note seen.
local function wait_job(id)
  local notes = {}
  for _ = 1, 600 do
    local r = call("GET", "/jobs/" .. id)
    t.eq(r.status, 200, r.body)
    if type(r.json.note) == "table" then notes[#notes + 1] = r.json.note end
    if r.json.status ~= "pending" and r.json.status ~= "running" then return r.json, notes end
    serve.poll(0.2)
  end
  error("job " .. id .. " did not end")
end

t.test("/generate serves the base checkpoint", function()
  local r = call("GET", "/generate")
  t.eq(r.status, 200, r.body)
  t.eq(r.json.checkpoint, base)
  t.eq(r.json.loads, 0)
end)

t.test("bad fine-tune requests get 400 naming the field", function()
  local cases = {
    {'{"dataset": "x", "steps": 2}', "base"},
    {'{"base": "current", "steps": 2}', "dataset"},
    {'{"base": "current", "dataset": "x"}', "steps"},
    {'{"base": "current", "dataset": "x", "steps": -1}', "steps"},
    {'{"base": "current", "dataset": "x", "steps": 2.5}', "steps"},
    {'{"base": 7, "dataset": "x", "steps": 2}', "base"},
    {'{"base": "current", "dataset": ["x"], "steps": 2}', "dataset"},
    {'{"base": "current", "dataset": "x", "steps": 2, "lr": 5}', "lr"},
    {'{"base": "current", "dataset": "x", "steps": 2, "epochs": 3}', "epochs"},
    {'[1, 2]', "body"},
  }
  for _, c in ipairs(cases) do
    local r = call("POST", "/jobs/finetune", c[1])
    t.eq(r.status, 400, c[1] .. " -> " .. tostring(r.body))
    t.eq(r.json.field, c[2], c[1])
    t.ok(r.json.error:find(c[2], 1, true) == 1, "the error names " .. c[2] .. ": " .. r.json.error)
  end
  local r = call("POST", "/jobs/finetune", "{not json")
  t.eq(r.status, 400, "a body that is not JSON")
end)

t.test("a job whose dataset is missing fails with the reason in its record", function()
  local r = call("POST", "/jobs/finetune", cjson.encode({base = "current", dataset = dir .. "/nope.txt", steps = 2}))
  t.eq(r.status, 202, r.body)
  local rec = wait_job(r.json.id)
  t.eq(rec.status, "failed")
  t.ok(rec.error:find("^dataset: cannot read .*nope%.txt: No such file"), rec.error)
  r = call("POST", "/jobs/finetune", cjson.encode({base = dir .. "/nobase", dataset = ds, steps = 2}))
  rec = wait_job(r.json.id)
  t.eq(rec.status, "failed")
  t.ok(rec.error:find("^base: cannot load checkpoint .*nobase: train.load_checkpoint: .*state.json: No such file"),
    rec.error)
end)

local before
t.test("a fine-tune job reports progress, succeeds, and /generate serves the new weights", function()
  before = greedy("zip ")
  local r = call("POST", "/jobs/finetune", cjson.encode({base = "current", dataset = ds, steps = 30, lr = 3e-3}))
  t.eq(r.status, 202, r.body)
  local rec, notes = wait_job(r.json.id)
  t.eq(rec.status, "succeeded", cjson.encode(rec))
  t.ok(#notes >= 1, "progress notes were seen while it ran")
  local n = notes[#notes]
  t.ok(type(n.step) == "number" and type(n.loss) == "number" and n.steps == 30, cjson.encode(n))
  t.ok(type(n.tokens_per_s) == "number" and n.tokens_per_s > 0, "tokens/s in the note: " .. cjson.encode(n))
  t.eq(rec.result.workers, 2, "2 workers on a 2-CPU cluster")
  t.ok(rec.result.loss < rec.result.first_loss, "loss went down: " .. cjson.encode(rec.result))
  t.eq(rec.result.replicas_swapped, 1)
  t.ok(rec.result.checkpoint:find(dir .. "/state/" .. r.json.id, 1, true) == 1, rec.result.checkpoint)
  local g = call("GET", "/generate")
  t.eq(g.json.checkpoint, rec.result.checkpoint, "the served checkpoint is the job's")
  t.eq(g.json.loads, 1)
  local after = greedy("zip ")
  t.ok(after ~= before, "greedy output changed: " .. before .. " -> " .. after)
  t.ok(after:find("z", 1, true), "the fine-tuned model writes the new style: " .. after)
  -- "current" is now the fine-tuned checkpoint: a second job starts from it.
  r = call("POST", "/jobs/finetune", cjson.encode({base = "current", dataset = ds, steps = 1}))
  rec = wait_job(r.json.id)
  t.eq(rec.status, "succeeded", cjson.encode(rec))
  t.eq(rec.result.base, g.json.checkpoint)
end)

t.test("a job that finds the CPUs taken waits, then trains on the 1 worker there is room for", function()
  local a = call("POST", "/jobs/finetune", cjson.encode({base = base, dataset = ds, steps = 600})).json.id
  local deadline = os.time() + 60
  repeat   -- until job a's 2 workers are training
    serve.poll(0.05)
    local rec = call("GET", "/jobs/" .. a).json
  until type(rec.note) == "table" or rec.status ~= "pending" and rec.status ~= "running" or os.time() > deadline
  local b = call("POST", "/jobs/finetune", cjson.encode({base = base, dataset = ds, steps = 2})).json.id
  local ra, rb = wait_job(a), wait_job(b)
  t.eq(ra.status, "succeeded", cjson.encode(ra))
  t.eq(rb.status, "succeeded", cjson.encode(rb))
  t.eq(ra.result.workers, 2)
  t.eq(rb.result.workers, 1, "the second job ran on 1 worker")
end)

t.test("a stream in flight while the weights are swapped finishes", function()
  -- A model slow enough that 1000 tokens take a while, then the swap back
  -- to the base while it streams.
  local big = dir .. "/big.safetensors"
  GPT.new({n_layer = 4, n_head = 4, n_embd = 128, block_size = 64}, {seed = 5}):save(big)
  local refs0 = serve.get_handle("gpt"):broadcast("load", big)
  while #tide.wait(refs0, {num_returns = #refs0, timeout = 0}) < #refs0 do serve.poll(0.01) end
  local stream = client(function(h, port)
    local t0 = h.now()
    local r = h.request(port, "POST", "/generate", {timeout = 60, headers = {["Content-Type"] = "application/json"},
      body = '{"prompt": "zip ", "max_tokens": 1000, "temperature": 0}'})
    return {status = r.status, len = #r.body, chunks = #(r.chunks or {}), t0 = t0, t1 = h.now()}
  end):remote(PORT)
  -- Swap once the stream is running on the replica.
  local function ongoing()
    local n = 0
    for _, rep in ipairs((serve.status().gpt or {}).replicas or {}) do n = n + rep.ongoing end
    return n
  end
  local deadline = os.time() + 30
  while ongoing() == 0 and os.time() < deadline do serve.poll(0.005) end
  t.eq(ongoing(), 1, "the stream is in flight")
  local refs = serve.get_handle("gpt"):broadcast("load", base)
  t.eq(#refs, 1)
  while #tide.wait(refs, {num_returns = #refs, timeout = 0}) < #refs do serve.poll(0.01) end
  local swapped_at = http.now()
  local res = await(stream)
  t.eq(res.status, 200)
  t.ok(res.t0 < swapped_at and swapped_at < res.t1,
    string.format("the swap (%.3f) happened while the stream ran (%.3f..%.3f)", swapped_at, res.t0, res.t1))
  t.ok(res.len >= 900, "the whole stream arrived (" .. res.len .. " bytes)")
  t.eq(call("GET", "/generate").json.checkpoint, base)
end)

t.test("serve jobs given as {run, validate}: a string is a 400, a raise a 500, changes reach the job", function()
  serve.deploy(serve.deployment{name = "v", route = "/v", jobs = {j = {
    validate = function(_, rq)
      local x = type(rq.json) == "table" and rq.json.x
      if x == 1 then return "x: must not be 1" elseif x == 2 then error("validator exploded") end
      rq.json.y = 5
    end,
    run = function(_, rq) return {y = rq.json.y} end,
  }}})
  local r = call("POST", "/v/j", '{"x": 1}')
  t.eq(r.status, 400, r.body)
  t.eq(r.json.error, "x: must not be 1")
  r = call("POST", "/v/j", '{"x": 2}')
  t.eq(r.status, 500, r.body)
  t.ok(not r.body:find("exploded", 1, true), "the validator's message stays in the log: " .. r.body)
  r = call("POST", "/v/j", '{"x": 3}')
  t.eq(r.status, 202, r.body)
  local rec = wait_job(r.json.id)
  t.eq(rec.status, "succeeded", cjson.encode(rec))
  t.eq(rec.result.y, 5, "the job got the request as validate changed it")
  t.raises(function() serve.deployment{name = "w", jobs = {j = {validate = function() end}}} end,
    "jobs.j.run must be a function")
  t.raises(function() serve.deployment{name = "w", jobs = {j = 5}} end,
    "jobs.j must be a function or {run = fn, validate = fn}")
  t.raises(function() serve.deployment{name = "w", jobs = {["a/b"] = function() end}} end,
    "job name 'a/b' must be letters, digits, _ or %-")
end)

serve.shutdown()
os.execute("rm -rf '" .. dir .. "'")
t.done()
