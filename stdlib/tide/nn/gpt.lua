-- tide.nn.gpt: a GPT-2 style transformer composed from tide.tensor ops
-- (forward, explicit backward, AdamW, KV-cached generation, safetensors
-- checkpoints with GPT-2's tensor names and layout, so checkpoints with the
-- same layout load through the same code).
--
--   local GPT = require("tide.nn.gpt")
--   local m = GPT.new({n_layer = 4, n_head = 4, n_embd = 128, block_size = 64}, {seed = 1})
--   local logits, loss = m:forward(inputs, targets)  -- (B,T) i32 tensors
--   m:zero_grad(); m:backward(); m:step({lr = 1e-3})
--   local ids = m:generate(prompt_ids, 100, {temperature = 0.8, top_k = 40, seed = 1})
--   m:save("ckpt.safetensors"); local m2 = GPT.load("ckpt.safetensors")
--
-- Layout (as GPT-2): wte (V,C) tied with the output head, wpe (block,C),
-- per layer h.<i>.ln_1, attn.c_attn (C,3C), attn.c_proj (C,C), ln_2,
-- mlp.c_fc (C,4C), mlp.c_proj (4C,C) — weights stored (in, out), y = x W + b.
local T = require("tide.tensor")
local cjson = require("cjson")
local st = require("tide.nn.safetensors")

local ipairs, pairs, type, error, tostring = ipairs, pairs, type, error, tostring
local sqrt, floor, max = math.sqrt, math.floor, math.max
local setmetatable = setmetatable

local M = {}

M.DEFAULT = {vocab_size = 256, n_layer = 4, n_head = 4, n_embd = 128, block_size = 64,
             init_std = 0.02, ln_eps = 1e-5}

local Model = {}
Model.__index = Model

local function check_config(c)
  local cfg = {}
  for k, v in pairs(M.DEFAULT) do cfg[k] = v end
  for k, v in pairs(c or {}) do
    if M.DEFAULT[k] == nil then error("gpt: unknown config key '" .. tostring(k) .. "'", 3) end
    cfg[k] = v
  end
  for _, k in ipairs({"vocab_size", "n_layer", "n_head", "n_embd", "block_size"}) do
    local v = cfg[k]
    if type(v) ~= "number" or v < 1 or v ~= floor(v) then
      error("gpt: config." .. k .. " must be a positive integer", 3)
    end
  end
  if cfg.n_embd % cfg.n_head ~= 0 then error("gpt: n_head must divide n_embd", 3) end
  return cfg
end

-- Parameter names and shapes in checkpoint order.
local function param_specs(cfg)
  local C, V = cfg.n_embd, cfg.vocab_size
  local specs = {
    {"wte.weight", {V, C}, "normal"},
    {"wpe.weight", {cfg.block_size, C}, "normal"},
  }
  for l = 0, cfg.n_layer - 1 do
    local p = "h." .. l .. "."
    local add = function(n, shape, init) specs[#specs + 1] = {p .. n, shape, init} end
    add("ln_1.weight", {C}, "ones"); add("ln_1.bias", {C}, "zeros")
    add("attn.c_attn.weight", {C, 3 * C}, "normal"); add("attn.c_attn.bias", {3 * C}, "zeros")
    add("attn.c_proj.weight", {C, C}, "proj"); add("attn.c_proj.bias", {C}, "zeros")
    add("ln_2.weight", {C}, "ones"); add("ln_2.bias", {C}, "zeros")
    add("mlp.c_fc.weight", {C, 4 * C}, "normal"); add("mlp.c_fc.bias", {4 * C}, "zeros")
    add("mlp.c_proj.weight", {4 * C, C}, "proj"); add("mlp.c_proj.bias", {C}, "zeros")
  end
  specs[#specs + 1] = {"ln_f.weight", {C}, "ones"}
  specs[#specs + 1] = {"ln_f.bias", {C}, "zeros"}
  return specs
end

local function wrap(cfg, params, device)
  device = device or "cpu"
  local m = setmetatable({config = cfg, params = {}, p = {}, grads = nil, g = nil,
                          opt_m = nil, opt_v = nil, step_count = 0, acts = nil,
                          device = device}, Model)
  for i, spec in ipairs(param_specs(cfg)) do
    local name = spec[1]
    local t = params[name]
    if not t then error("gpt: missing parameter " .. name, 3) end
    local want = spec[2]
    local got = t:shape()
    local ok = #got == #want
    for d = 1, #want do ok = ok and got[d] == want[d] end
    if not ok then
      error("gpt: parameter " .. name .. " has shape {" .. table.concat(got, ",") ..
            "}, config wants {" .. table.concat(want, ",") .. "}", 3)
    end
    if t:device() ~= device then t = t:to(device) end
    m.params[i] = {name, t}
    m.p[name] = t
  end
  m:_layer_views()
  return m
end

-- Per-layer parameter tables for quick access.
function Model:_layer_views()
  self.L = {}
  for l = 0, self.config.n_layer - 1 do
    local p = "h." .. l .. "."
    local P = self.p
    self.L[l + 1] = {
      ln1w = P[p .. "ln_1.weight"], ln1b = P[p .. "ln_1.bias"],
      attnw = P[p .. "attn.c_attn.weight"], attnb = P[p .. "attn.c_attn.bias"],
      projw = P[p .. "attn.c_proj.weight"], projb = P[p .. "attn.c_proj.bias"],
      ln2w = P[p .. "ln_2.weight"], ln2b = P[p .. "ln_2.bias"],
      fcw = P[p .. "mlp.c_fc.weight"], fcb = P[p .. "mlp.c_fc.bias"],
      fcpw = P[p .. "mlp.c_proj.weight"], fcpb = P[p .. "mlp.c_proj.bias"],
      prefix = p,
    }
  end
end

-- M.new(config [, {seed = 0, device = "cpu"}]) -> model with deterministic
-- GPT-2 init: N(0, init_std) weights, residual projections scaled by
-- 1/sqrt(2 n_layer), zero biases, unit layernorm weights.  Parameter i uses
-- seed*7919 + i; the numbers are drawn on the CPU, so every device starts
-- from the same weights.
function M.new(config, opts)
  local cfg = check_config(config)
  local seed = (opts and opts.seed) or 0
  local params = {}
  local proj_std = cfg.init_std / sqrt(2 * cfg.n_layer)
  for i, spec in ipairs(param_specs(cfg)) do
    local name, shape, init = spec[1], spec[2], spec[3]
    local t
    if init == "ones" then
      t = T.ones(shape)
    elseif init == "zeros" then
      t = T.zeros(shape)
    else
      t = T.randn(shape, {seed = seed * 7919 + i, std = init == "proj" and proj_std or cfg.init_std})
    end
    params[name] = t
  end
  return wrap(cfg, params, opts and opts.device)
end

-- m:num_params() -> number of scalars.
function Model:num_params()
  local n = 0
  for _, e in ipairs(self.params) do n = n + e[2]:numel() end
  return n
end

-- -- Activation buffers -------------------------------------------------------

-- Buffers for a (B,T) batch, reused across steps so a training step
-- allocates nothing.
function Model:_acts(B, Tn)
  local a = self.acts
  if a and a.B == B and a.T == Tn then return a end
  local cfg = self.config
  local C, V, NH, L = cfg.n_embd, cfg.vocab_size, cfg.n_head, cfg.n_layer
  local N = B * Tn
  local dev = {device = self.device}
  local function empty(shape) return T.empty(shape, dev) end
  a = {B = B, T = Tn, N = N, res = {}, layer = {}}
  for l = 1, L + 1 do a.res[l] = empty({N, C}) end -- res[l] = input of layer l
  for l = 1, L do
    a.layer[l] = {
      ln1 = empty({N, C}), ln1_mean = empty({N}), ln1_rstd = empty({N}),
      qkv = empty({N, 3 * C}), atty = empty({N, C}), att = empty({B, NH, Tn, Tn}),
      x2 = empty({N, C}), ln2 = empty({N, C}), ln2_mean = empty({N}),
      ln2_rstd = empty({N}), fch = empty({N, 4 * C}), fch_gelu = empty({N, 4 * C}),
      tmp = empty({N, C}),
    }
    local y = a.layer[l]
    y.qkv3 = y.qkv:view({B, Tn, 3 * C})
    y.atty3 = y.atty:view({B, Tn, C})
  end
  a.lnf = empty({N, C}); a.lnf_mean = empty({N}); a.lnf_rstd = empty({N})
  a.logits = empty({N, V}); a.losses = empty({N})
  -- gradient scratch
  a.dres = empty({N, C}); a.dC = empty({N, C}); a.d3C = empty({N, 3 * C})
  a.d4C = empty({N, 4 * C}); a.dlogits = empty({N, V})
  a.d3C3 = a.d3C:view({B, Tn, 3 * C}); a.dC3 = a.dC:view({B, Tn, C})
  self.acts = a
  return a
end

-- Checks (B,T) i32 ids and moves them to the model's device.
local function check_ids(self, idx, what)
  if not T.is_tensor(idx) or idx:dtype() ~= "i32" or idx:dim() ~= 2 then
    error("gpt: " .. what .. " must be a (B, T) i32 tensor", 3)
  end
  local s = idx:shape()
  if s[2] > self.config.block_size then
    error("gpt: sequence length " .. s[2] .. " exceeds block_size " .. self.config.block_size, 3)
  end
  if idx:device() ~= self.device then idx = idx:to(self.device) end
  return s[1], s[2], idx
end

-- -- Forward -------------------------------------------------------------------

-- m:forward(inputs [, targets]) -> logits (B,T,V) [, mean loss].
-- inputs/targets are (B,T) i32 tensors of token ids (targets -1 = ignore).
-- The activations are kept for m:backward() (logits is a reused buffer:
-- clone it to keep it past the next forward).
function Model:forward(idx, targets)
  local B, Tn
  B, Tn, idx = check_ids(self, idx, "inputs")
  local cfg = self.config
  local C, NH, eps = cfg.n_embd, cfg.n_head, cfg.ln_eps
  local a = self:_acts(B, Tn)
  local P = self.p
  -- token + position embeddings
  local x = a.res[1]
  T.embedding(idx, P["wte.weight"], {out = x})
  T.add(x:view({B, Tn, C}), P["wpe.weight"]:slice(1, 1, Tn), {out = x})
  for l = 1, cfg.n_layer do
    local w, y = self.L[l], a.layer[l]
    local xin, xout = a.res[l], a.res[l + 1]
    T.layernorm(xin, w.ln1w, w.ln1b, {eps = eps, out = y.ln1, mean = y.ln1_mean, rstd = y.ln1_rstd})
    T.matmul(y.ln1, w.attnw, {out = y.qkv})
    T.add(y.qkv, w.attnb, {out = y.qkv})
    T.attention(y.qkv3, NH, {out = y.atty3, att = y.att})
    T.matmul(y.atty, w.projw, {out = y.tmp})
    T.add(y.tmp, w.projb, {out = y.tmp})
    T.add(xin, y.tmp, {out = y.x2})
    T.layernorm(y.x2, w.ln2w, w.ln2b, {eps = eps, out = y.ln2, mean = y.ln2_mean, rstd = y.ln2_rstd})
    T.matmul(y.ln2, w.fcw, {out = y.fch})
    T.add(y.fch, w.fcb, {out = y.fch})
    T.gelu(y.fch, {out = y.fch_gelu})
    T.matmul(y.fch_gelu, w.fcpw, {out = y.tmp})
    T.add(y.tmp, w.fcpb, {out = y.tmp})
    T.add(y.x2, y.tmp, {out = xout})
  end
  T.layernorm(a.res[cfg.n_layer + 1], P["ln_f.weight"], P["ln_f.bias"],
              {eps = eps, out = a.lnf, mean = a.lnf_mean, rstd = a.lnf_rstd})
  T.matmul(a.lnf, P["wte.weight"], {trans_b = true, out = a.logits})
  self._inputs, self._targets = idx, nil
  local logits = a.logits:view({B, Tn, cfg.vocab_size})
  if targets then
    local tb, tt
    tb, tt, targets = check_ids(self, targets, "targets")
    if tb ~= B or tt ~= Tn then error("gpt: targets must have the shape of inputs", 2) end
    self._targets = targets
    local loss = T.cross_entropy(a.logits, targets:view({B * Tn}), {out = a.losses})
    return logits, loss
  end
  return logits
end

-- -- Backward ------------------------------------------------------------------

-- m:zero_grad(): sets every gradient to zero (allocates them the first time).
function Model:zero_grad()
  if not self.grads then
    self.grads, self.g = {}, {}
    for i, e in ipairs(self.params) do
      local g = T.zeros(e[2]:shape(), {device = self.device})
      self.grads[i] = {e[1], g}
      self.g[e[1]] = g
    end
  else
    for _, e in ipairs(self.grads) do e[2]:zero() end
  end
end

-- m:backward([scale = 1]): adds d(scale * loss)/d(params) of the last
-- forward (called with targets) into the gradients, so micro-batches
-- accumulate; call m:zero_grad() between optimizer steps.
function Model:backward(scale)
  if not self._targets then error("gpt: backward needs a forward with targets", 2) end
  if not self.grads then self:zero_grad() end
  local cfg = self.config
  local NH, L = cfg.n_head, cfg.n_layer
  local a, P, G = self.acts, self.p, self.g
  local B, Tn = a.B, a.T
  local targets = self._targets:view({B * Tn})
  -- loss -> logits -> final layernorm
  local opts = {out = a.dlogits}
  if scale then
    local valid = 0
    for _, v in ipairs(targets:to_table()) do if v ~= -1 then valid = valid + 1 end end
    opts.scale = valid > 0 and scale / valid or 0
  end
  T.cross_entropy_backward(a.logits, targets, opts)
  T.matmul(a.dlogits, a.lnf, {trans_a = true, out = G["wte.weight"], beta = 1})
  T.matmul(a.dlogits, P["wte.weight"], {out = a.dC})
  a.dres:zero()
  T.layernorm_backward(a.dC, a.res[L + 1], P["ln_f.weight"], a.lnf_mean, a.lnf_rstd,
                       {dx = a.dres, dw = G["ln_f.weight"], db = G["ln_f.bias"], accumulate = true})
  for l = L, 1, -1 do
    local w, y, p = self.L[l], a.layer[l], self.L[l].prefix
    -- MLP: xout = x2 + gelu(ln2(x2) Wfc + bfc) Wfcp + bfcp
    T.matmul(y.fch_gelu, a.dres, {trans_a = true, out = G[p .. "mlp.c_proj.weight"], beta = 1})
    T.sum_rows(a.dres, {out = G[p .. "mlp.c_proj.bias"], accumulate = true})
    T.matmul(a.dres, w.fcpw, {trans_b = true, out = a.d4C})
    T.gelu_backward(a.d4C, y.fch, {out = a.d4C})
    T.matmul(y.ln2, a.d4C, {trans_a = true, out = G[p .. "mlp.c_fc.weight"], beta = 1})
    T.sum_rows(a.d4C, {out = G[p .. "mlp.c_fc.bias"], accumulate = true})
    T.matmul(a.d4C, w.fcw, {trans_b = true, out = a.dC})
    T.layernorm_backward(a.dC, y.x2, w.ln2w, y.ln2_mean, y.ln2_rstd,
                         {dx = a.dres, dw = G[p .. "ln_2.weight"], db = G[p .. "ln_2.bias"],
                          accumulate = true})
    -- attention: x2 = xin + attn(ln1(xin) Wattn + battn) Wproj + bproj
    T.matmul(y.atty, a.dres, {trans_a = true, out = G[p .. "attn.c_proj.weight"], beta = 1})
    T.sum_rows(a.dres, {out = G[p .. "attn.c_proj.bias"], accumulate = true})
    T.matmul(a.dres, w.projw, {trans_b = true, out = a.dC})
    T.attention_backward(a.dC3, y.qkv3, y.att, NH, {out = a.d3C3})
    T.matmul(y.ln1, a.d3C, {trans_a = true, out = G[p .. "attn.c_attn.weight"], beta = 1})
    T.sum_rows(a.d3C, {out = G[p .. "attn.c_attn.bias"], accumulate = true})
    T.matmul(a.d3C, w.attnw, {trans_b = true, out = a.dC})
    T.layernorm_backward(a.dC, a.res[l], w.ln1w, y.ln1_mean, y.ln1_rstd,
                         {dx = a.dres, dw = G[p .. "ln_1.weight"], db = G[p .. "ln_1.bias"],
                          accumulate = true})
  end
  -- embeddings
  T.embedding_backward(a.dres, self._inputs:view({B * Tn}), G["wte.weight"])
  local C = cfg.n_embd
  T.sum_rows(a.dres:view({B, Tn * C}),
             {out = G["wpe.weight"]:slice(1, 1, Tn):view({Tn * C}), accumulate = true})
end

-- m:grad_norm() -> global L2 norm of the gradients.
function Model:grad_norm()
  local s = 0
  for _, e in ipairs(self.grads or {}) do
    s = s + T.dot(e[2], e[2])
  end
  return sqrt(s)
end

-- m:step([{lr = 1e-3, beta1 = 0.9, beta2 = 0.95, eps = 1e-8,
--          weight_decay = 0.1, grad_clip = nil}]) -> grad norm (or nil)
-- AdamW on every parameter; weight decay only on matrices (ndim >= 2), as
-- in GPT-2 training.  With grad_clip the gradients are scaled down to that
-- global norm first.
function Model:step(opts)
  opts = opts or {}
  if not self.grads then error("gpt: step before backward", 2) end
  if not self.opt_m then
    self.opt_m, self.opt_v = {}, {}
    for i, e in ipairs(self.params) do
      self.opt_m[i] = T.zeros(e[2]:shape(), {device = self.device})
      self.opt_v[i] = T.zeros(e[2]:shape(), {device = self.device})
    end
  end
  local norm
  if opts.grad_clip then
    norm = self:grad_norm()
    if norm > opts.grad_clip then
      local s = opts.grad_clip / (norm + 1e-6)
      for _, e in ipairs(self.grads) do T.scale(e[2], s, {out = e[2]}) end
    end
  end
  self.step_count = self.step_count + 1
  local lr, wd = opts.lr or 1e-3, opts.weight_decay or 0.1
  local o = {step = self.step_count, lr = lr, beta1 = opts.beta1 or 0.9,
             beta2 = opts.beta2 or 0.95, eps = opts.eps or 1e-8, weight_decay = wd}
  for i, e in ipairs(self.params) do
    local p = e[2]
    o.weight_decay = p:dim() >= 2 and wd or 0
    T.adamw(p, self.grads[i][2], self.opt_m[i], self.opt_v[i], o)
  end
  return norm
end

-- -- Generation with a KV cache ------------------------------------------------

-- Runs positions pos..pos+Tn-1 of idx (B,Tn) through the model using and
-- extending the cache; returns the logits (B,V) of the last position.
function Model:_forward_cached(cache, idx, pos)
  local cfg = self.config
  local C, NH, eps = cfg.n_embd, cfg.n_head, cfg.ln_eps
  local s = idx:shape()
  local B, Tn = s[1], s[2]
  local P = self.p
  local x = T.embedding(idx, P["wte.weight"]) -- (B,Tn,C)
  T.add(x, P["wpe.weight"]:slice(1, pos + 1, pos + Tn), {out = x})
  for l = 1, cfg.n_layer do
    local w = self.L[l]
    local h = T.layernorm(x, w.ln1w, w.ln1b, {eps = eps})
    local qkv = T.matmul(h, w.attnw)
    T.add(qkv, w.attnb, {out = qkv})
    local att = T.attention_cached(qkv, cache.k[l], cache.v[l], pos, NH)
    local proj = T.matmul(att, w.projw)
    T.add(proj, w.projb, {out = proj})
    T.add(x, proj, {out = x})
    h = T.layernorm(x, w.ln2w, w.ln2b, {eps = eps})
    local f = T.matmul(h, w.fcw)
    T.add(f, w.fcb, {out = f})
    f = T.gelu(f, {out = f})
    local o = T.matmul(f, w.fcpw)
    T.add(o, w.fcpb, {out = o})
    T.add(x, o, {out = x})
  end
  local last = x:slice(2, Tn, Tn):reshape({B, C})
  last = T.layernorm(last, P["ln_f.weight"], P["ln_f.bias"], {eps = eps})
  return T.matmul(last, P["wte.weight"], {trans_b = true})
end

-- m:new_cache(B) -> an empty KV cache for B sequences.
function Model:new_cache(B)
  local cfg = self.config
  local c = {k = {}, v = {}, B = B, pos = 0}
  for l = 1, cfg.n_layer do
    c.k[l] = T.zeros({B, cfg.block_size, cfg.n_embd}, {device = self.device})
    c.v[l] = T.zeros({B, cfg.block_size, cfg.n_embd}, {device = self.device})
  end
  return c
end

-- m:generate(prompt, n [, {temperature = 1, top_k = 0, seed = 0, on_token = fn}]) -> ids
-- prompt: an array of ids (one sequence) or an array of equal-length arrays
-- (a batch); returns the prompt followed by n new ids (same nesting).
-- Uses a KV cache: one forward over the prompt, then one position per new
-- token; when the context fills up, the last half is re-encoded.
function Model:generate(prompt, n, opts)
  opts = opts or {}
  local batched = type(prompt[1]) == "table"
  local seqs = batched and prompt or {prompt}
  local B = #seqs
  local out = {}
  for b = 1, B do
    out[b] = {}
    for i, v in ipairs(seqs[b]) do out[b][i] = v end
    if #out[b] ~= #out[1] then error("gpt.generate: prompts must have equal lengths", 2) end
  end
  if #out[1] == 0 then error("gpt.generate: empty prompt", 2) end
  local bs = self.config.block_size
  local cache, logits
  local function prefill(keep)
    cache = self:new_cache(B)
    local rows = {}
    local len = #out[1]
    local start = max(1, len - keep + 1)
    for b = 1, B do
      local r = {}
      for i = start, len do r[#r + 1] = out[b][i] end
      rows[b] = r
    end
    local idx = T.from_table(rows, {dtype = "i32", device = self.device})
    logits = self:_forward_cached(cache, idx, 0)
    cache.pos = len - start + 1
  end
  prefill(bs)
  local sopts = {temperature = opts.temperature or 1, top_k = opts.top_k or 0,
                 seed = opts.seed or 0, offset = 0}
  for step = 1, n do
    sopts.offset = (step - 1) * B
    local next_ids = T.sample(logits, sopts):to_table()
    for b = 1, B do out[b][#out[b] + 1] = next_ids[b] end
    -- on_token(id | ids, step) sees each new token as it is made (streaming);
    -- returning false stops the generation early.
    if opts.on_token and opts.on_token(batched and next_ids or next_ids[1], step) == false then break end
    if step == n then break end
    if cache.pos >= bs then
      prefill(floor(bs / 2))
    else
      local col = {}
      for b = 1, B do col[b] = {next_ids[b]} end
      logits = self:_forward_cached(cache, T.from_table(col, {dtype = "i32", device = self.device}),
                                    cache.pos)
      cache.pos = cache.pos + 1
    end
  end
  return batched and out or out[1]
end

-- -- Checkpoints -------------------------------------------------------------

-- m:save(path [, metadata]): safetensors with GPT-2 tensor names, f32, and
-- the config in __metadata__.tide_config (JSON).
function Model:save(path, metadata)
  local md = {format = "pt", tide_config = cjson.encode(self.config)}
  for k, v in pairs(metadata or {}) do md[k] = tostring(v) end
  local ok, err = st.save(path, self.params, md)
  if not ok then error("gpt.save: " .. tostring(err), 2) end
  return true
end

-- M.load(path [, {config = {...}, device = "cpu"}]) -> model.  The config comes from the
-- checkpoint's metadata unless given (real GPT-2 checkpoints carry none;
-- pass their config.json values).  Names may carry a "transformer." prefix;
-- other dtypes (f16, bf16) are converted to f32; extra tensors (attention
-- mask buffers, an untied lm_head) are ignored.
function M.load(path, opts)
  local tensors, md = st.load(path)
  local cfg = opts and opts.config
  if not cfg then
    if not md.tide_config then error("gpt.load: no config in the checkpoint; pass {config = ...}", 2) end
    cfg = cjson.decode(md.tide_config)
  end
  cfg = check_config(cfg)
  local params = {}
  for _, spec in ipairs(param_specs(cfg)) do
    local name = spec[1]
    local t = tensors[name] or tensors["transformer." .. name]
    if not t then error("gpt.load: checkpoint lacks " .. name, 2) end
    if t:dtype() ~= "f32" then t = t:to("f32") end
    params[name] = t
  end
  return wrap(cfg, params, opts and opts.device)
end

-- m:to(device) -> a new model with the same weights on device (gradients
-- and optimizer state are not carried).
function Model:to(device)
  local params = {}
  for _, e in ipairs(self.params) do params[e[1]] = e[2]:to(device) end
  return wrap(self.config, params, device)
end

-- M.Model: the model's methods, so tide.nn.tp's shards reuse generate();
-- M.check_config: the config check (defaults filled in).
M.Model = Model
M.check_config = check_config

-- m:clone_params() -> map name -> copy (tests, checkpoints in memory).
function Model:clone_params()
  local out = {}
  for _, e in ipairs(self.params) do out[e[1]] = e[2]:clone() end
  return out
end

return M
