-- CUDA backend against the CPU reference.  Every test is skipped, with a
-- visible "# SKIP no GPU" on its TAP line, when no GPU is present.
-- Tolerances (max |cuda - cpu| / max(1, |cpu|)): 1e-4 for f32 kernels and
-- f32 matmul (exact FP32 cuBLAS; set TIDE_CUDA_TF32 and it no longer
-- holds), 2e-2 for bf16/f16 matmul, 1e-3 for whole-GPT logits and grads.
local t = dofile("tests/lua/harness.lua")
local T = require("tide.tensor")

local have, why = T.cuda_available()
if not have then io.write("# no GPU: " .. tostring(why) .. "\n") end
local DEV = "cuda:0"

local function gpu_test(name, fn)
  if have then
    t.test(name, fn)
  else
    t.test(name .. " # SKIP no GPU", function() end)
  end
end

local function flat(x)
  local out = {}
  local function walk(v)
    if type(v) == "table" then for _, w in ipairs(v) do walk(w) end else out[#out + 1] = v end
  end
  walk(x:to("cpu"):to_table())
  return out
end

-- Max relative difference of a device result and the CPU reference.
local function close(got, want, tol, what)
  local g, w = flat(got), flat(want)
  t.eq(#g, #w, (what or "") .. " size")
  local worst, at = 0, 0
  for i = 1, #w do
    local d = math.abs(g[i] - w[i]) / math.max(1, math.abs(w[i]))
    if d > worst or d ~= d then worst, at = d, i end
  end
  if worst ~= worst or worst > tol then -- NaN fails too
    error(string.format("%s: element %d differs by %.3g (cuda %.7g, cpu %.7g), tolerance %.1g",
      what or "tensor", at, worst, g[at] or 0 / 0, w[at] or 0 / 0, tol), 2)
  end
end

local function cu(x) return x:to(DEV) end

gpu_test("cuda device present; transfers are exact in every dtype", function()
  t.ok(T.device_count() >= 1)
  t.ok(#T.device_name(0) > 0)
  local x = T.randn({3, 5}, {seed = 1})
  for _, dt in ipairs({"f32", "f16", "bf16"}) do
    local h = x:to(dt)
    t.ok(cu(h):to("cpu"):to_bytes() == h:to_bytes(), dt .. " round trip")
  end
  local i = T.arange(7)
  t.deep_eq(cu(i):to("cpu"):to_table(), i:to_table())
  -- conversions on the device equal conversions on the host
  t.ok(cu(x):to("bf16"):to("cpu"):to_bytes() == x:to("bf16"):to_bytes(), "bf16 conversion")
  -- views are gathered on the device
  close(cu(x):transpose():contiguous(), x:transpose():contiguous(), 0, "transpose")
  close(cu(x):slice(2, 2, 4), x:slice(2, 2, 4), 0, "slice")
  t.eq(cu(x):device(), DEV)
end)

gpu_test("matmul: cuBLAS f32 and bf16/f16 against the CPU", function()
  local a = T.randn({33, 17}, {seed = 2})
  local b = T.randn({17, 29}, {seed = 3})
  close(T.matmul(cu(a), cu(b)), T.matmul(a, b), 1e-4, "f32")
  local bt = b:transpose():contiguous()
  close(T.matmul(cu(a), cu(bt), {trans_b = true}), T.matmul(a, bt, {trans_b = true}), 1e-4, "trans_b")
  local at = a:transpose():contiguous()
  close(T.matmul(cu(at), cu(b), {trans_a = true}), T.matmul(at, b, {trans_a = true}), 1e-4, "trans_a")
  local c = T.randn({33, 29}, {seed = 4})
  local cg = cu(c)
  T.matmul(cu(a), cu(b), {out = cg, alpha = 0.5, beta = 2})
  T.matmul(a, b, {out = c, alpha = 0.5, beta = 2})
  close(cg, c, 1e-4, "alpha/beta")
  for _, dt in ipairs({"bf16", "f16"}) do
    local ah, bh = a:to(dt), b:to(dt)
    -- the CPU reference computes on the same rounded inputs
    close(T.matmul(cu(ah), cu(bh)), T.matmul(ah:to("f32"), bh:to("f32")), 2e-2, dt)
  end
  local x3 = T.randn({2, 4, 6}, {seed = 5})
  local y3 = T.randn({2, 6, 3}, {seed = 6})
  close(T.matmul(cu(x3), cu(y3)), T.matmul(x3, y3), 1e-4, "batched")
end)

gpu_test("elementwise, reductions, softmax, layernorm, gelu match the CPU", function()
  local x = T.randn({7, 40}, {seed = 7})
  local r = T.randn({7, 40}, {seed = 8})
  local b = T.randn({40}, {seed = 9})
  close(T.add(cu(x), cu(b), {alpha = 2, beta = -1}), T.add(x, b, {alpha = 2, beta = -1}), 1e-6, "add")
  close(T.mul(cu(x), cu(b)), T.mul(x, b), 1e-6, "mul")
  close(T.scale(cu(x), 3), T.scale(x, 3), 1e-6, "scale")
  close(T.sum_rows(cu(x)), T.sum_rows(x), 1e-5, "sum_rows")
  t.ok(math.abs(T.sum(cu(x)) - T.sum(x)) < 1e-4, "sum")
  t.ok(math.abs(T.dot(cu(x), cu(r)) - T.dot(x, r)) < 1e-4, "dot")
  local y = T.softmax(x)
  close(T.softmax(cu(x)), y, 1e-5, "softmax")
  close(T.softmax_backward(cu(r), cu(y)), T.softmax_backward(r, y), 1e-4, "softmax_backward")
  local w = T.randn({40}, {seed = 10, mean = 1})
  local ly, lm, ls = T.layernorm(x, w, b)
  local gy, gm, gs = T.layernorm(cu(x), cu(w), cu(b))
  close(gy, ly, 1e-4, "layernorm")
  close(gm, lm, 1e-5, "mean")
  close(gs, ls, 1e-4, "rstd")
  local dx, dw, db = T.layernorm_backward(r, x, w, lm, ls)
  local gdx, gdw, gdb = T.layernorm_backward(cu(r), cu(x), cu(w), gm, gs)
  close(gdx, dx, 1e-4, "layernorm dx")
  close(gdw, dw, 1e-4, "layernorm dw")
  close(gdb, db, 1e-4, "layernorm db")
  close(T.gelu(cu(x)), T.gelu(x), 1e-5, "gelu")
  close(T.gelu_backward(cu(r), cu(x)), T.gelu_backward(r, x), 1e-4, "gelu_backward")
  local p, g, m, v = T.randn({50}, {seed = 11}), T.randn({50}, {seed = 12}), T.zeros({50}), T.zeros({50})
  local pg, gg, mg, vg = cu(p), cu(g), cu(m), cu(v)
  for step = 1, 3 do
    T.adamw(p, g, m, v, {step = step, lr = 1e-2})
    T.adamw(pg, gg, mg, vg, {step = step, lr = 1e-2})
  end
  close(pg, p, 1e-5, "adamw")
  t.deep_eq(T.argmax(cu(x)):to("cpu"):to_table(), T.argmax(x):to_table())
end)

gpu_test("embedding, attention (full and KV-cached), cross-entropy match the CPU", function()
  local tab = T.randn({11, 8}, {seed = 13})
  local ids = T.from_table({{1, 10, 3}, {0, 0, 7}}, {dtype = "i32"})
  close(T.embedding(cu(ids), cu(tab)), T.embedding(ids, tab), 0, "embedding")
  local dy = T.randn({2, 3, 8}, {seed = 14})
  close(T.embedding_backward(cu(dy), cu(ids), 11), T.embedding_backward(dy, ids, 11), 1e-5, "embedding_backward")
  local qkv = T.randn({2, 9, 24}, {seed = 15})
  local o, a = T.attention(qkv, 2)
  local go, ga = T.attention(cu(qkv), 2)
  close(go, o, 1e-4, "attention out")
  close(ga, a, 1e-4, "attention probabilities")
  local dout = T.randn({2, 9, 8}, {seed = 16})
  close(T.attention_backward(cu(dout), cu(qkv), ga, 2), T.attention_backward(dout, qkv, a, 2), 1e-4,
    "attention_backward")
  local kc, vc = T.zeros({2, 12, 8}), T.zeros({2, 12, 8})
  local gkc, gvc = cu(kc), cu(vc)
  local part = qkv:slice(2, 1, 4):contiguous()
  close(T.attention_cached(cu(part), gkc, gvc, 0, 2), T.attention_cached(part, kc, vc, 0, 2), 1e-4, "prefill")
  local one = qkv:slice(2, 5, 5):contiguous()
  close(T.attention_cached(cu(one), gkc, gvc, 4, 2), T.attention_cached(one, kc, vc, 4, 2), 1e-4, "decode")
  close(gkc, kc, 0, "k cache")
  local logits = T.randn({2, 3, 11}, {seed = 17})
  local tg = T.from_table({{1, -1, 10}, {0, 5, 5}}, {dtype = "i32"})
  local l1, ls1 = T.cross_entropy(logits, tg)
  local l2, ls2 = T.cross_entropy(cu(logits), cu(tg))
  t.ok(math.abs(l1 - l2) < 1e-5, "mean loss")
  close(ls2, ls1, 1e-5, "losses")
  close(T.cross_entropy_backward(cu(logits), cu(tg)), T.cross_entropy_backward(logits, tg), 1e-5, "dlogits")
end)

gpu_test("a CUDA error fails the call, not the process", function()
  t.raises(function() T.embedding(cu(T.from_table({{99}}, {dtype = "i32"})), cu(T.zeros({4, 2}))) end,
    "out of range")
  t.raises(function() T.zeros({1e12}, {device = DEV}) end, "CUDA error")
  -- the device still works afterwards
  close(T.add(cu(T.ones({3})), cu(T.ones({3}))), T.full({3}, 2), 0, "after errors")
  t.raises(function() T.add(cu(T.ones({3})), T.ones({3})) end, "different devices")
end)

gpu_test("GPT on CUDA: logits, loss, gradients and a training step match the CPU", function()
  local GPT = require("tide.nn.gpt")
  local cfg = {vocab_size = 64, n_layer = 2, n_head = 2, n_embd = 32, block_size = 16}
  local mc = GPT.new(cfg, {seed = 3})
  local mg = GPT.new(cfg, {seed = 3, device = DEV})
  local x = T.rand({4, 16}, {seed = 1, high = 64}):to("i32")
  local y = T.rand({4, 16}, {seed = 2, high = 64}):to("i32")
  local lc, losc = mc:forward(x, y)
  local lg, losg = mg:forward(x, y)
  close(lg, lc, 1e-3, "logits")
  t.ok(math.abs(losc - losg) < 1e-4, string.format("loss cpu %.6f cuda %.6f", losc, losg))
  mc:zero_grad(); mc:backward()
  mg:zero_grad(); mg:backward()
  for i, e in ipairs(mc.grads) do close(mg.grads[i][2], e[2], 1e-3, "grad " .. e[1]) end
  mc:step({lr = 1e-2}); mg:step({lr = 1e-2})
  local _, l2c = mc:forward(x, y)
  local _, l2g = mg:forward(x, y)
  t.ok(math.abs(l2c - l2g) < 1e-3, string.format("after a step: cpu %.6f cuda %.6f", l2c, l2g))
  t.ok(l2g < losg, "the step lowered the loss")
  -- KV-cached generation on the device agrees with the CPU model's logits
  local cache_c, cache_g = mc:new_cache(1), mg:new_cache(1)
  local p = T.from_table({{1, 2, 3}}, {dtype = "i32"})
  close(mg:_forward_cached(cache_g, cu(p), 0), mc:_forward_cached(cache_c, p, 0), 1e-3, "cached logits")
  t.eq(#mg:generate({1, 2, 3}, 5, {temperature = 0}), 8)
end)

gpu_test("NCCL: a one-rank communicator runs every collective", function()
  local id = T.nccl_unique_id()
  t.eq(#id, 128)
  local comm = T.nccl_comm(1, id, 0, DEV)
  t.eq(comm:rank(), 0)
  t.eq(comm:size(), 1)
  local x = T.randn({8, 3}, {seed = 21})
  local g = cu(x)
  comm:allreduce(g, "sum")
  close(g, x, 0, "allreduce sum")
  comm:allreduce(g, "max")
  close(g, x, 0, "allreduce max")
  close(comm:allgather(g), x, 0, "allgather")
  close(comm:reduce_scatter(g, "avg"), x, 0, "reduce_scatter")
  comm:broadcast(g, 0)
  close(g, x, 0, "broadcast")
  t.raises(function() comm:allreduce(x) end, "different devices")
  comm:destroy()
  t.raises(function() comm:rank() end, "destroyed")
end)

t.done()
