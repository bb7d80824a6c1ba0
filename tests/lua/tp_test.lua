-- tide.nn.tp: a GPT split across shard actors (tensor parallelism) gives
-- the full model's logits, greedy tokens, gradients and AdamW steps; loads
-- split from a GPT checkpoint and from a tide.train checkpoint; and
-- examples/serve_split.lua streams the split model's tokens over real
-- HTTP, surviving a shard killed mid-stream and between requests.
local t = dofile("tests/lua/harness.lua")
local tide = require("tide")
-- Logical CPUs: each shard reserves one, the HTTP client tasks none.
tide.init({num_cpus = 4})
local T = require("tide.tensor")
local GPT = require("tide.nn.gpt")
local TP = require("tide.nn.tp")
local PORT = 18371

local CFG = {vocab_size = 256, n_layer = 2, n_head = 4, n_embd = 64, block_size = 32}
local full = GPT.new(CFG, {seed = 3})
local TMP = os.getenv("TMPDIR") or "/tmp"
local dir = TMP .. "/tide_tp_test." .. tide.get_runtime_context().pid
os.execute("rm -rf " .. dir .. " && mkdir -p " .. dir)

local function max_diff(a, b)
  local x, y = a:contiguous():view({-1}):to_table(), b:contiguous():view({-1}):to_table()
  assert(#x == #y, "sizes differ: " .. #x .. " vs " .. #y)
  local m = 0
  for i = 1, #x do m = math.max(m, math.abs(x[i] - y[i])) end
  return m
end

local ROWS = {{1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12}, {72, 101, 108, 108, 111, 32, 119, 111, 114, 108, 100, 33}}
local PROMPT = {84, 104, 101, 32}

local g = TP.group({world_size = 2, config = CFG, seed = 3})

t.test("W=2: each shard holds its slice, the logits equal the full model's", function()
  t.eq(#g.pids, 2)
  t.ok(g.pids[1] ~= g.pids[2], "the shards run in processes of their own")
  -- Embeddings (256*64 + 32*64), layer norms and the row-split biases are
  -- replicated; the rest is halved.
  local C, L = 64, 2
  local replicated = 256 * C + 32 * C + 2 * C + L * (4 * C + 2 * C)
  t.eq(g.params_per_rank[1], replicated + (full:num_params() - replicated) / 2)
  local want = full:forward(T.from_table(ROWS, {dtype = "i32"})):clone()
  local got = g:logits(ROWS)
  t.eq(table.concat(got:shape(), ","), "2,12,256")
  local d = max_diff(want, got)
  io.write(string.format("# max |logits(full) - logits(W=2)| = %.3g\n", d))
  t.ok(d < 1e-4, "logits differ by " .. d)
end)

t.test("greedy and seeded generation from the split model equal the full model's", function()
  -- 40 new tokens past block_size 32: the context is re-encoded on the way.
  local want = full:generate(PROMPT, 40, {temperature = 0})
  local seen = {}
  local got = g:generate(PROMPT, 40, {temperature = 0, on_token = function(id, step) seen[step] = id end})
  t.eq(table.concat(got, ","), table.concat(want, ","))
  t.eq(#seen, 40, "on_token saw every token")
  t.eq(seen[40], got[#got])
  local ws = full:generate(PROMPT, 30, {temperature = 0.9, top_k = 20, seed = 11})
  local gs = g:generate(PROMPT, 30, {temperature = 0.9, top_k = 20, seed = 11})
  t.eq(table.concat(gs, ","), table.concat(ws, ","))
  -- A batch of two prompts.
  local wb = full:generate({{1, 2, 3}, {4, 5, 6}}, 10, {temperature = 0})
  local gb = g:generate({{1, 2, 3}, {4, 5, 6}}, 10, {temperature = 0})
  t.eq(table.concat(gb[2], ","), table.concat(wb[2], ","))
end)

-- The full model's gradients and a few AdamW steps, for the training tests.
local X = {{5, 6, 7, 8, 9, 10, 11, 12}, {40, 41, 42, 43, 44, 45, 46, 47}}
local Y = {{6, 7, 8, 9, 10, 11, 12, 13}, {41, 42, 43, 44, 45, 46, 47, -1}}
local ref = GPT.new(CFG, {seed = 3})
local _, ref_loss = ref:forward(T.from_table(X, {dtype = "i32"}), T.from_table(Y, {dtype = "i32"}))
ref:zero_grad()
ref:backward()
local ref_grads = {}
for name, gr in pairs(ref.g) do ref_grads[name] = gr:clone() end

t.test("backward: every shard's gradients are the full model's, sliced", function()
  local res = g:run(function(m, _, x, y)
    local Tt = require("tide.tensor")
    local _, loss = m:forward(Tt.from_table(x, {dtype = "i32"}), Tt.from_table(y, {dtype = "i32"}))
    m:zero_grad()
    m:backward()
    local out = {}
    for name, gr in pairs(m.g) do out[name] = gr:clone() end
    return {loss = loss, grads = out}
  end, X, Y)
  local worst, where = 0, nil
  for r = 0, 1 do
    t.ok(math.abs(res[r + 1].loss - ref_loss) < 1e-5, "rank " .. r .. " loss " .. res[r + 1].loss)
    local want = TP.shard_params(ref_grads, ref.config, r, 2)
    for name, w in pairs(want) do
      local d = max_diff(w, res[r + 1].grads[name])
      if d > worst then worst, where = d, name .. " on rank " .. r end
    end
  end
  io.write(string.format("# max gradient difference %.3g (%s)\n", worst, tostring(where)))
  t.ok(worst < 1e-5, "gradients differ by " .. worst .. " at " .. tostring(where))
end)

t.test("three AdamW steps with grad_clip: the shards' weights stay the full model's, sliced", function()
  local m = GPT.new(CFG, {seed = 3})
  local h = TP.group({world_size = 2, config = CFG, seed = 3})
  local xt, yt = T.from_table(X, {dtype = "i32"}), T.from_table(Y, {dtype = "i32"})
  local norms = {}
  for s = 1, 3 do
    m:forward(xt, yt); m:zero_grad(); m:backward()
    norms[s] = m:step({lr = 1e-2, grad_clip = 0.5})
  end
  local res = h:run(function(sm, _, x, y)
    local Tt = require("tide.tensor")
    local xs, ys = Tt.from_table(x, {dtype = "i32"}), Tt.from_table(y, {dtype = "i32"})
    local ns = {}
    for s = 1, 3 do
      sm:forward(xs, ys); sm:zero_grad(); sm:backward()
      ns[s] = sm:step({lr = 1e-2, grad_clip = 0.5})
    end
    local out = {}
    for name, p in pairs(sm.p) do out[name] = p:clone() end
    return {p = out, norms = ns}
  end, X, Y)
  h:close()
  local worst = 0
  for r = 0, 1 do
    for s = 1, 3 do
      t.ok(math.abs(res[r + 1].norms[s] - norms[s]) < 1e-4 * norms[s],
        string.format("rank %d step %d grad norm %g vs %g", r, s, res[r + 1].norms[s], norms[s]))
    end
    for name, w in pairs(TP.shard_params(m.p, m.config, r, 2)) do
      worst = math.max(worst, max_diff(w, res[r + 1].p[name]))
    end
  end
  io.write(string.format("# max weight difference after 3 steps: %.3g\n", worst))
  -- Adam divides by the gradient's running RMS, so a weight whose
  -- gradient is ~0 moves by up to lr in a direction set by rounding: the
  -- bound is a small fraction of the 3 * lr a wrong gradient would move it.
  t.ok(worst < 1e-3, "weights differ by " .. worst)
end)

t.test("tensor-parallel training under train.fit (2 ranks, ctx's group) steps as the full model; its checkpoint is a whole model's", function()
  local train = require("tide.train")
  local m = GPT.new(CFG, {seed = 3})
  local xt, yt = T.from_table(X, {dtype = "i32"}), T.from_table(Y, {dtype = "i32"})
  local losses = {}
  for s = 1, 3 do
    local _, loss = m:forward(xt, yt)
    losses[s] = loss
    m:zero_grad(); m:backward(); m:step({lr = 1e-2})
  end
  local r = train.fit({num_workers = 2, resources_per_worker = {num_cpus = 1}, progress = false,
    config = {cfg = CFG, x = X, y = Y},
    loop = function(ctx, config)
      local TPm = require("tide.nn.tp")
      local Tt = require("tide.tensor")
      local sm = TPm.shard({config = config.cfg, seed = 3}, {ctx = ctx})
      local xs, ys = Tt.from_table(config.x, {dtype = "i32"}), Tt.from_table(config.y, {dtype = "i32"})
      for s = 1, 3 do
        local _, loss = sm:forward(xs, ys)
        ctx:report({step = s, loss = loss})
        sm:zero_grad(); sm:backward(); sm:step({lr = 1e-2})
      end
      -- Every rank gathers the whole model; rank 0's goes in a checkpoint.
      local whole = sm:gather_params()
      ctx:checkpoint({model = whole, config = config.cfg})
      return whole
    end, checkpoint_dir = dir .. "/tp_ckpt"})
  for s = 1, 3 do
    t.ok(math.abs(r.history[s].loss - losses[s]) < 1e-5,
      string.format("step %d loss %g vs %g", s, r.history[s].loss, losses[s]))
  end
  local worst, count = 0, 0
  for name, w in pairs(m.p) do
    worst = math.max(worst, max_diff(w, r.value[name]))
    count = count + 1
  end
  t.eq(count, #m.params)
  t.ok(worst < 1e-3, "the gathered weights differ by " .. worst)
  -- The checkpoint of the split run is a whole model's: it loads into one
  -- model, and split again.
  local state = train.load_checkpoint(r.checkpoint)
  local whole = GPT.new(CFG)
  for name, p in pairs(state.model) do whole.p[name]:copy(p) end
  local h = TP.group({world_size = 2, checkpoint = r.checkpoint})
  local d = max_diff(whole:forward(T.from_table(ROWS, {dtype = "i32"})):clone(), h:logits(ROWS))
  h:close()
  t.ok(d < 1e-4, "logits of the reloaded split checkpoint differ by " .. d)
end)

t.test("a GPT checkpoint, a model in the caller and a tide.train checkpoint load split", function()
  local path = dir .. "/full.safetensors"
  full:save(path)
  local h = TP.group({world_size = 2, checkpoint = path})
  local d = max_diff(full:forward(T.from_table(ROWS, {dtype = "i32"})):clone(), h:logits(ROWS))
  h:close()
  t.ok(d < 1e-4, "safetensors checkpoint: logits differ by " .. d)
  -- A model in the caller, sliced there.
  local hm = TP.group({world_size = 2, model = full})
  local dm = max_diff(full:forward(T.from_table(ROWS, {dtype = "i32"})):clone(), hm:logits(ROWS))
  hm:close()
  t.ok(dm < 1e-4, "model = m: logits differ by " .. dm)
  -- A model trained by tide.train, served split: its checkpoint's "model" table.
  local train = require("tide.train")
  local r = train.fit({num_workers = 1, resources_per_worker = {num_cpus = 1}, progress = false,
    checkpoint_dir = dir .. "/ckpt", config = {cfg = CFG},
    loop = function(ctx, config)
      local G = require("tide.nn.gpt")
      local Tt = require("tide.tensor")
      local mm = G.new(config.cfg, {seed = 5})
      mm:forward(Tt.from_table({{1, 2, 3, 4}}, {dtype = "i32"}), Tt.from_table({{2, 3, 4, 5}}, {dtype = "i32"}))
      mm:zero_grad(); mm:backward(); mm:step({lr = 1e-2})
      ctx:checkpoint({model = mm.p, config = mm.config, step = 1})
    end})
  t.ok(r.checkpoint, "the run left a checkpoint")
  local state = train.load_checkpoint(r.checkpoint)
  local trained = GPT.new(CFG, {seed = 5})
  for name, p in pairs(state.model) do trained.p[name]:copy(p) end
  local h2 = TP.group({world_size = 2, checkpoint = r.checkpoint})
  local d2 = max_diff(trained:forward(T.from_table(ROWS, {dtype = "i32"})):clone(), h2:logits(ROWS))
  local want = trained:generate(PROMPT, 12, {temperature = 0})
  t.eq(table.concat(h2:generate(PROMPT, 12, {temperature = 0}), ","), table.concat(want, ","))
  h2:close()
  t.ok(d2 < 1e-4, "train checkpoint: logits differ by " .. d2)
end)

t.test("bad input: clear errors", function()
  t.raises(function() TP.group({world_size = 3, config = CFG}) end, "world_size 3 must divide n_head 4")
  t.raises(function() TP.group({world_size = 2}) end, "pass checkpoint = path")
  t.raises(function() TP.group({world_size = 0, config = CFG}) end, "world_size must be a positive integer")
  t.raises(function() TP.shard_params(full.p, full.config, 2, 2) end, "rank must be an integer in 0..1")
  t.raises(function() g:logits({1, 2, 3}) end, "table of rows")
  t.raises(function() g:generate({}, 3) end, "empty prompt")
  -- Found by the shards: the group is torn down and the error names the file.
  local e = t.raises(function() TP.group({world_size = 2, checkpoint = dir .. "/missing.safetensors"}) end,
    "cannot open checkpoint .*missing.safetensors")
  t.eq(e.kind, "ShardGroupError")
end)

g:close()


-- -- Serving: examples/serve_split.lua over real HTTP --------------------------

local serve = require("tide.serve")
_G.arg = {"/nonexistent/ckpt.safetensors", "2"}
local run = serve.run
local app
serve.run = function(a) app = a end
dofile("examples/serve_split.lua")
serve.run = run
serve.run(app, {port = PORT, blocking = false})
-- The model the example serves without a checkpoint.
local served = GPT.new({vocab_size = 256, n_layer = 2, n_head = 4, n_embd = 64, block_size = 64}, {seed = 1})

-- A real HTTP client in a task (no CPU: the shards hold them). With
-- kill_pid, it kills that process after the first streamed chunk.
local client = tide.remote({num_cpus = 0}, function(port, method, body, kill_pid, hang_up)
  if not package.path:find("tests/lua/", 1, true) then package.path = "tests/lua/?.lua;" .. package.path end
  local httpc = require("httpc")
  local c = httpc.connect(port, {timeout = 60})
  c:send_raw(httpc.format_request(method, "/generate", {body = body,
    headers = {["Content-Type"] = "application/json"}}))
  local r = c:read_head({timeout = 60})
  local chunks, cut, first, last = {}, nil, nil, nil
  if r.chunked then
    while true do
      local ok, data, at = pcall(c.read_chunk, c, {timeout = 60})
      if not ok then cut = tostring(data) break end
      if not data then break end
      chunks[#chunks + 1] = data
      first, last = first or at, at
      if kill_pid and #chunks == 1 then os.execute("kill -9 " .. kill_pid) end
      if hang_up and #chunks == hang_up then cut = "hung up" break end
    end
  else
    r.body = c:read_body({timeout = 60})
  end
  c:close()
  return {status = r.status, ctype = r.headers["content-type"], chunks = chunks, cut = cut, body = r.body,
    first = first, last = last}
end)

local function await(cref)
  for _ = 1, 6000 do
    serve.poll(0.02)
    if #tide.wait({cref}, {timeout = 0}) == 1 then return tide.get(cref) end
  end
  error("the client did not finish")
end

local cjson = require("cjson")
-- SSE events of a response: ids in order, the error event, whether [DONE] came.
local function events(r)
  local ids, err, done, texts = {}, nil, false, {}
  for ev in table.concat(r.chunks):gmatch("(.-)\n\n") do
    local data = ev:match("^data: (.*)$")
    if data == "[DONE]" then done = true
    elseif data then
      local v = cjson.decode(data)
      if v.error then err = v end
      for _, id in ipairs(v.ids or {}) do ids[#ids + 1] = id end
      texts[#texts + 1] = v.token
    end
  end
  return ids, err, done, table.concat(texts)
end

local function status()
  local r = await(client:remote(PORT, "GET", nil))
  return cjson.decode(r.body)
end

local function tail(list, from)
  local out = {}
  for i = from, #list do out[#out + 1] = list[i] end
  return table.concat(out, ",")
end

local tok = require("tide.nn.tokenizer").byte_level()
local P2 = "In the beginning"

t.test("the streamed endpoint (SSE) sends the full model's greedy tokens as they are made", function()
  local r = await(client:remote(PORT, "POST", cjson.encode({prompt = P2, max_tokens = 80, temperature = 0,
    sse = true})))
  t.eq(r.status, 200)
  t.ok(tostring(r.ctype):find("text/event-stream", 1, true), tostring(r.ctype))
  local ids, err, done = events(r)
  t.ok(not err, "no error event")
  t.ok(done, "the stream ends with [DONE]")
  t.ok(#r.chunks >= 10, "streamed in many chunks (got " .. #r.chunks .. ")")
  local prompt = tok:encode(P2)
  local want = served:generate(prompt, 80, {temperature = 0})
  t.eq(table.concat(ids, ","), tail(want, #prompt + 1))
  -- Plain text: the same tokens' text (bytes that are not UTF-8 replaced).
  local p = await(client:remote(PORT, "POST", cjson.encode({prompt = P2, max_tokens = 80, temperature = 0})))
  t.eq(p.status, 200)
  local split = require("tide.nn.tokenizer").utf8_split
  local text = split(tok:decode({unpack(want, #prompt + 1)}), true)
  t.eq(table.concat(p.chunks), text)
end)

t.test("concurrent streams share the group, each with the full model's tokens", function()
  local prompts = {"In the beginning", "And God said, ", "Let there be"}
  local refs = {}
  for i, p in ipairs(prompts) do
    refs[i] = client:remote(PORT, "POST", cjson.encode({prompt = p, max_tokens = 60, temperature = 0, sse = true}))
  end
  local spans = {}
  for i, p in ipairs(prompts) do
    local r = await(refs[i])
    spans[#spans + 1] = string.format("%.3f..%.3f", r.first, r.last)
    local ids, err, done = events(r)
    t.ok(not err and done, "request " .. i .. " answered in full")
    local prompt = tok:encode(p)
    t.eq(table.concat(ids, ","), tail(served:generate(prompt, 60, {temperature = 0}), #prompt + 1), p)
  end
  io.write("# streams' first..last chunk times: " .. table.concat(spans, ", ") .. "\n")
end)

t.test("a client that hangs up mid-stream is no shard failure: the group serves on", function()
  local s1 = status()
  local r = await(client:remote(PORT, "POST", cjson.encode({prompt = P2, max_tokens = 3000, temperature = 0,
    sse = true}), nil, 2))
  t.eq(r.cut, "hung up")
  local ids, err, done = events(await(client:remote(PORT, "POST", cjson.encode({prompt = P2, max_tokens = 30,
    temperature = 0, sse = true}))))
  t.ok(not err and done and #ids == 30, "the next request is answered in full")
  local s2 = status()
  t.eq(s2.generation, s1.generation, "the same group")
  t.eq(s2.failures, s1.failures, "no failure counted")
  t.eq(s2.pids[1], s1.pids[1])
end)

t.test("bad bodies are a 400 naming the field", function()
  for _, c in ipairs({{'{"prompt": 5}', "prompt must be a string"}, {'{"prompt": ""}', "empty prompt"},
      {'{"max_tokens": 0}', "max_tokens must be an integer in 1..4096"},
      {'{"max_tokens": "x"}', "max_tokens must be an integer"}, {'{"max_tokens": 5000}', "1..4096"},
      {'{"temperature": -1}', "temperature must be a number >= 0"}}) do
    local r = await(client:remote(PORT, "POST", c[1]))
    t.eq(r.status, 400, c[1])
    t.ok(r.body:find(c[2], 1, true), c[1] .. " -> " .. tostring(r.body))
  end
end)

t.test("a shard killed mid-stream: the stream ends with a clear error; the next request gets a new group", function()
  local s1 = status()
  t.eq(s1.generation, 1)
  t.eq(#s1.pids, 2)
  local r = await(client:remote(PORT, "POST", cjson.encode({prompt = P2, max_tokens = 3000, temperature = 0,
    sse = true}), s1.pids[2]))
  t.eq(r.status, 200)
  local ids, err, done = events(r)
  t.ok(err, "an error event ends the stream")
  t.ok(not done, "no [DONE] after the error")
  t.ok(#ids < 3000, "the stream stopped early (" .. #ids .. " tokens)")
  t.eq(err.kind, "ShardGroupError")
  t.ok(err.error:find("shard rank 1 of 2 failed", 1, true) and err.error:find("ActorDiedError", 1, true),
    "the error names the rank and the death: " .. err.error)
  io.write("# " .. err.error .. "\n")
  local r2 = await(client:remote(PORT, "POST", cjson.encode({prompt = P2, max_tokens = 40, temperature = 0,
    sse = true})))
  local ids2, err2, done2 = events(r2)
  t.ok(not err2 and done2, "the next request is answered in full")
  local prompt = tok:encode(P2)
  t.eq(table.concat(ids2, ","), tail(served:generate(prompt, 40, {temperature = 0}), #prompt + 1))
  local s2 = status()
  t.eq(s2.generation, 2, "the group was rebuilt once")
  t.ok(s2.pids[1] ~= s1.pids[1] and s2.pids[2] ~= s1.pids[2], "new shard processes")
  t.ok(s2.last_error:find("shard rank 1", 1, true), s2.last_error)
  -- Rank 0 was waiting in the allreduce for the dead rank 1: the teardown
  -- ended its process too.
  local gone = false
  for _ = 1, 250 do
    local rc = os.execute("kill -0 " .. s1.pids[1] .. " 2>/dev/null")
    if not (rc == 0 or rc == true) then gone = true break end
    tide.sleep(0.02)
  end
  t.ok(gone, "the old rank 0's process " .. s1.pids[1] .. " is gone")
end)

t.test("a shard killed between requests: the next request is answered by a rebuilt group", function()
  local s1 = status()
  os.execute("kill -9 " .. s1.pids[1])
  local r = await(client:remote(PORT, "POST", cjson.encode({prompt = P2, max_tokens = 20, temperature = 0,
    sse = true})))
  local ids, err, done = events(r)
  t.ok(not err and done, "answered in full")
  t.eq(#ids, 20)
  local s2 = status()
  t.eq(s2.generation, s1.generation + 1)
  t.eq(s2.failures, s1.failures + 1)
end)

serve.shutdown()
os.execute("rm -rf " .. dir)
t.done()
