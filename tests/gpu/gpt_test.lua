-- tide.nn.gpt and friends: config checks, deterministic init, gradients
-- against finite differences, training lowers the loss, KV-cached
-- generation matches the full forward, safetensors round trips, the
-- tokenizer and the KJV text loader.
local t = dofile("tests/lua/harness.lua")
local T = require("tide.tensor")
local GPT = require("tide.nn.gpt")
local st = require("tide.nn.safetensors")
local tok = require("tide.nn.tokenizer").byte_level()
local D = require("tide.nn.corpus")

local TMP = os.getenv("TMPDIR") or "/tmp"
local function tmpfile(name) return TMP .. "/tide-gpt-test-" .. name end

local function ids(rows) return T.from_table(rows, {dtype = "i32"}) end

local TINY = {vocab_size = 16, n_layer = 2, n_head = 2, n_embd = 8, block_size = 8}

t.test("config is checked", function()
  t.raises(function() GPT.new({n_embd = 10, n_head = 3}) end, "n_head must divide")
  t.raises(function() GPT.new({n_layers = 2}) end, "unknown config key")
  t.raises(function() GPT.new({n_layer = 0}) end, "positive integer")
  local m = GPT.new(TINY)
  t.raises(function() m:forward(ids({{1, 2, 3, 4, 5, 6, 7, 8, 9}})) end, "exceeds block_size")
  t.raises(function() m:forward(T.zeros({1, 2})) end, "i32")
  t.raises(function() m:forward(ids({{1, 16}})) end, "out of range")
end)

t.test("init is deterministic in the seed", function()
  local x = ids({{1, 2, 3}, {4, 5, 6}})
  local a = GPT.new(TINY, {seed = 3}):forward(x):to_bytes()
  local b = GPT.new(TINY, {seed = 3}):forward(x):to_bytes()
  local c = GPT.new(TINY, {seed = 4}):forward(x):to_bytes()
  t.ok(a == b, "same seed, same logits")
  t.ok(a ~= c, "another seed, other logits")
  local m = GPT.new(TINY)
  t.eq(m:num_params(), 16 * 8 + 8 * 8 + 2 * (12 * 64 + 13 * 8) + 16)
end)

-- Loss as a function of the current parameters.
local function loss_of(m, x, y)
  local _, l = m:forward(x, y)
  return l
end

t.test("gradients match finite differences (tiny config)", function()
  local cfg = {vocab_size = 16, n_layer = 2, n_head = 2, n_embd = 8, block_size = 8,
               init_std = 0.3}
  local m = GPT.new(cfg, {seed = 11})
  -- perturb layernorm weights/biases away from 1/0 so their gradients matter
  for _, e in ipairs(m.params) do
    if e[1]:find("ln_") or e[1]:find("bias") then
      local r = T.randn(e[2]:shape(), {seed = #e[1], std = 0.3})
      T.add(e[2], r, {out = e[2]})
    end
  end
  local x = ids({{1, 5, 2, 9, 3, 3}, {0, 15, 7, 7, 1, 2}})
  local y = ids({{5, 2, 9, 3, 3, 4}, {15, 7, -1, 1, 2, 8}})
  m:forward(x, y)
  m:zero_grad()
  m:backward()
  local eps = 1e-2
  local checked = 0
  for i, e in ipairs(m.params) do
    local name, p = e[1], e[2]
    local g = m.grads[i][2]
    -- 1) directional derivative along a random direction d
    local d = T.randn(p:shape(), {seed = 100 + i})
    d = T.scale(d, 1 / math.sqrt(T.sum(T.mul(d, d)))) -- a unit step in this tensor
    local analytic = T.sum(T.mul(g, d))
    local keep = p:clone()
    T.add(keep, d, {beta = eps, out = p}); local lp = loss_of(m, x, y)
    T.add(keep, d, {beta = -eps, out = p}); local lm = loss_of(m, x, y)
    p:copy(keep)
    local numeric = (lp - lm) / (2 * eps)
    if math.abs(analytic - numeric) > 2e-2 * math.abs(numeric) + 2e-4 then
      error(string.format("%s: directional derivative analytic %.6g numeric %.6g",
        name, analytic, numeric))
    end
    -- 2) the element with the largest gradient
    local flat_g, flat_p = g:view({-1}), p:view({-1})
    local best, bi = -1, 1
    for j, v in ipairs(flat_g:to_table()) do
      if math.abs(v) > best then best, bi = math.abs(v), j end
    end
    local v0 = flat_p:get(bi)
    flat_p:set(bi, v0 + eps); lp = loss_of(m, x, y)
    flat_p:set(bi, v0 - eps); lm = loss_of(m, x, y)
    flat_p:set(bi, v0)
    numeric = (lp - lm) / (2 * eps)
    if math.abs(flat_g:get(bi) - numeric) > 2e-2 * math.abs(numeric) + 2e-4 then
      error(string.format("%s[%d]: analytic %.6g numeric %.6g", name, bi, flat_g:get(bi), numeric))
    end
    checked = checked + 1
  end
  t.eq(checked, #m.params)
  -- ignored targets contribute nothing: wpe rows beyond T stay zero
  t.eq(T.sum(T.mul(m.g["wpe.weight"]:slice(1, 7, 8), m.g["wpe.weight"]:slice(1, 7, 8))), 0)
  -- backward accumulates across calls
  local before = {}
  for i, e in ipairs(m.grads) do before[i] = e[2]:clone() end
  m:forward(x, y); m:backward()
  for i, e in ipairs(m.grads) do
    local diff = T.sub(e[2], T.scale(before[i], 2))
    t.ok(T.sum(T.mul(diff, diff)) < 1e-10, e[1] .. ": a second backward doubles the gradient")
  end
end)

t.test("training a tiny GPT lowers the loss well below its start", function()
  local text = ("In the beginning God created the heaven and the earth. " ..
                "And the earth was without form, and void. "):rep(20)
  local cfg = {vocab_size = 256, n_layer = 2, n_head = 2, n_embd = 32, block_size = 16}
  local m = GPT.new(cfg, {seed = 1})
  local batch = D.batcher(text, 8, 16, 7)
  local x, y = batch(0)
  local _, first = m:forward(x, y)
  t.ok(math.abs(first - math.log(256)) < 0.2, "initial loss near log(256): " .. first)
  local last
  for step = 1, 150 do
    x, y = batch(step)
    local _, l = m:forward(x, y)
    m:zero_grad(); m:backward()
    m:step({lr = 3e-3, weight_decay = 0, grad_clip = 1.0})
    last = l
  end
  x, y = batch(10000) -- a batch it has not been fed in this order
  local _, held = m:forward(x, y)
  t.ok(held < 0.5 * first, string.format("loss %.3f -> %.3f (last train %.3f)", first, held, last))
end)

t.test("KV-cached generation matches the full forward", function()
  local m = GPT.new({vocab_size = 32, n_layer = 2, n_head = 4, n_embd = 16, block_size = 12}, {seed = 5})
  local seq = {3, 1, 4, 1, 5, 9, 2, 6, 5, 3}
  local cache = m:new_cache(1)
  local logits = m:_forward_cached(cache, ids({{3, 1, 4}}), 0)
  local pos = 3
  for i = 3, #seq do
    local full = m:forward(ids({{unpack(seq, 1, i)}}))
    local want = full:slice(2, i, i):reshape({1, 32}):to_table()[1]
    local got = logits:to_table()[1]
    for j = 1, 32 do
      if math.abs(got[j] - want[j]) > 1e-4 then
        error(string.format("position %d logit %d: cached %.6g full %.6g", i, j, got[j], want[j]))
      end
    end
    if i < #seq then
      logits = m:_forward_cached(cache, ids({{seq[i + 1]}}), pos)
      pos = pos + 1
    end
  end
  -- greedy generation equals argmax of the full forward, step by step
  local out = m:generate({3, 1, 4}, 5, {temperature = 0})
  t.eq(#out, 8)
  for i = 4, 8 do
    local full = m:forward(ids({{unpack(out, 1, i - 1)}}))
    local am = T.argmax(full:slice(2, i - 1, i - 1):reshape({1, 32})):get(1)
    t.eq(out[i], am, "greedy token " .. i)
  end
  -- sampling is deterministic in the seed; batches work; the context slides
  local s1 = m:generate({1, 2}, 20, {seed = 9, top_k = 5})
  t.deep_eq(m:generate({1, 2}, 20, {seed = 9, top_k = 5}), s1)
  t.eq(#s1, 22)
  local b = m:generate({{1, 2}, {3, 4}}, 4, {temperature = 0})
  t.eq(#b, 2)
  t.eq(#b[2], 6)
  t.deep_eq(b[1], m:generate({1, 2}, 4, {temperature = 0}))
end)

t.test("save -> load gives identical logits; safetensors layout", function()
  local m = GPT.new({vocab_size = 64, n_layer = 1, n_head = 2, n_embd = 8, block_size = 8}, {seed = 2})
  local path = tmpfile("ckpt.safetensors")
  m:save(path, {note = "test"})
  local m2 = GPT.load(path)
  local x = ids({{1, 2, 3, 60}})
  t.ok(m:forward(x):to_bytes() == m2:forward(x):to_bytes(), "identical logits")
  t.deep_eq(m2.config, m.config)
  -- the file itself: u64 header length, JSON header, aligned data
  local f = io.open(path, "rb")
  local raw = f:read("*a")
  f:close()
  local n = 0
  for i = 8, 1, -1 do n = n * 256 + raw:byte(i) end
  t.eq((8 + n) % 8, 0)
  local header = require("cjson").decode(raw:sub(9, 8 + n))
  t.eq(header.__metadata__.note, "test")
  local e = header["h.0.attn.c_attn.weight"]
  t.eq(e.dtype, "F32")
  t.deep_eq(e.shape, {8, 24})
  t.eq(e.data_offsets[2] - e.data_offsets[1], 8 * 24 * 4)
  t.eq(#raw, 8 + n + 4 * m:num_params())
  os.remove(path)
end)

t.test("safetensors: dtypes, prefixes, external config, errors", function()
  local path = tmpfile("mixed.safetensors")
  local a = T.from_table({{1.5, -2}, {0.25, 8}})
  st.save(path, {{"x.f16", a:to("f16")}, {"x.bf16", a:to("bf16")}, {"n", T.arange(3)},
                 {"s", T.from_table(7)}}, {k = 1})
  local got, md = st.load(path)
  t.eq(md.k, "1")
  t.deep_eq(got["x.f16"]:to("f32"):to_table(), a:to_table())
  t.deep_eq(got["x.bf16"]:to("f32"):to_table(), a:to_table())
  t.deep_eq(got.n:to_table(), {0, 1, 2})
  t.eq(got.s:item(), 7)
  t.deep_eq(got.s:shape(), {})
  -- a GPT-2 style file: "transformer." names, f16, no tide metadata
  local cfg = {vocab_size = 32, n_layer = 1, n_head = 2, n_embd = 8, block_size = 4}
  local m = GPT.new(cfg, {seed = 8})
  local list = {}
  for _, e in ipairs(m.params) do list[#list + 1] = {"transformer." .. e[1], e[2]:to("f16")} end
  list[#list + 1] = {"transformer.h.0.attn.bias", T.ones({1, 1, 4, 4})}
  st.save(path, list)
  t.raises(function() GPT.load(path) end, "no config")
  local m2 = GPT.load(path, {config = cfg})
  local x = ids({{1, 2, 3}})
  local d = T.sub(m:forward(x), m2:forward(x))
  t.ok(T.sum(T.mul(d, d)) / d:numel() < 1e-4, "f16 checkpoint logits close")
  table.remove(list, 3)
  st.save(path, list)
  t.raises(function() GPT.load(path, {config = cfg}) end, "lacks")
  local f = io.open(path, "wb"); f:write("junk"); f:close()
  t.raises(function() st.load(path) end, "not a safetensors file")
  os.remove(path)
end)

t.test("byte tokenizer round trips any bytes", function()
  local s = "Hello, world!\n\0\255 é"
  local e = tok:encode(s)
  t.eq(#e, #s)
  t.eq(e[1], 72)
  t.eq(tok:decode(e), s)
  t.eq(tok:decode(tok:encode_tensor(s)), s)
  t.eq(tok:encode_tensor(s):dtype(), "i32")
  t.raises(function() tok:decode({256}) end, "out of range")
  local long = ("abc"):rep(5000)
  t.eq(tok:decode(tok:encode(long)), long)
end)

t.test("KJV text from bible-kjv-text decodes (LZW) exactly", function()
  local text, err = D.bible_kjv({max_bytes = 200000, raw = true})
  if not text then
    t.ok(false, "bible-kjv-text missing: " .. tostring(err))
  end
  t.eq(text:sub(1, 19), "Holy Bible, Authori")
  t.ok(text:find("Ge1:1 In the beginning God created the heaven and the earth.", 1, true))
  t.eq(#text, 200000)
  local clean = D.bible_kjv({max_bytes = 1000})
  t.eq(clean:sub(1, 54), "In the beginning God created the heaven and the earth.")
  t.ok(not clean:find("Ge1:2", 1, true), "verse references stripped")
  local x, y = D.batcher(clean, 3, 10, 1)(1)
  t.deep_eq(x:shape(), {3, 10})
  t.deep_eq(x:slice(2, 2, 10):to_table(), y:slice(2, 1, 9):to_table())
end)

t.done()
