-- tide.nn.tp: tensor-parallel GPT (Megatron-LM style) over tide.collective.
--
-- W ranks each hold 1/W of every transformer block: the attention's heads
-- (c_attn split by columns, head-aligned in each of q, k and v; c_proj split
-- by rows) and the MLP's hidden units (c_fc split by columns, its c_proj by
-- rows). A column-split layer needs no communication; the row-split layer
-- after it leaves each rank a partial sum, so one allreduce follows each
-- row-split layer (two per block forward, two more per block backward).
-- Embeddings, layer norms and the tied output head are replicated, so every
-- rank ends with the same, full logits.
--
--   -- inside an actor or task that joined collective group "g" as rank r of W:
--   local TP = require("tide.nn.tp")
--   local m = TP.shard({checkpoint = "gpt.safetensors"}, {rank = r, world_size = W, group = "g"})
--   local logits = m:forward(ids)                    -- the full model's logits
--   local out = m:generate(prompt, 50, {temperature = 0})
--
--   -- from a driver or a serve replica: W shard actors on a placement group
--   local g = TP.group({world_size = 2, checkpoint = "gpt.safetensors"})
--   g:generate(prompt, 50, {on_token = function(id) io.write(id, " ") end})
--   g:close()
local T = require("tide.tensor")
local GPT = require("tide.nn.gpt")

local ipairs, pairs, type, error, tostring, format = ipairs, pairs, type, error, tostring, string.format
local floor, max, sqrt = math.floor, math.max, math.sqrt
local setmetatable = setmetatable

local M = {}

-- -- Slicing a full model ------------------------------------------------------

-- How each parameter of a block is split: "qkv" (columns, a slice from each
-- of q, k and v), "col" (columns), "row" (rows); anything else is replicated.
local SPLIT = {
  ["attn.c_attn.weight"] = "qkv", ["attn.c_attn.bias"] = "qkv",
  ["attn.c_proj.weight"] = "row",
  ["mlp.c_fc.weight"] = "col", ["mlp.c_fc.bias"] = "col",
  ["mlp.c_proj.weight"] = "row",
}

local function split_of(name)
  local rest = name:match("^h%.%d+%.(.*)$")
  return rest and SPLIT[rest]
end
M.split_of = split_of

local function check_world(cfg, rank, world)
  if type(world) ~= "number" or world < 1 or world % 1 ~= 0 then
    error("tide.nn.tp: world_size must be a positive integer", 3)
  end
  if type(rank) ~= "number" or rank < 0 or rank >= world or rank % 1 ~= 0 then
    error(format("tide.nn.tp: rank must be an integer in 0..%d", world - 1), 3)
  end
  if cfg.n_head % world ~= 0 then
    error(format("tide.nn.tp: world_size %d must divide n_head %d (each rank holds whole heads)",
      world, cfg.n_head), 3)
  end
end

-- M.shard_params(params, config, rank, world_size) -> map name -> tensor:
-- rank's slice of every split parameter (contiguous copies) and the
-- replicated ones as they are. params: a full model's map name -> tensor
-- (model.p, or a tide.train checkpoint's model table).
function M.shard_params(params, cfg, rank, world)
  check_world(cfg, rank, world)
  local C = cfg.n_embd
  local out = {}
  for name, t in pairs(params) do
    local how = split_of(name)
    if t:dtype() ~= "f32" then t = t:to("f32") end
    if how == "qkv" then
      -- columns [j*C + rank*Cw, j*C + (rank+1)*Cw) of q, k and v (j = 0, 1, 2):
      -- whole heads, as T.attention lays them out.
      local Cw = C / world
      local d = t:dim()
      local shape = t:shape()
      shape[d] = 3 * Cw
      local s = T.empty(shape)
      for j = 0, 2 do
        local from = j * C + rank * Cw
        s:slice(d, j * Cw + 1, (j + 1) * Cw):copy(t:slice(d, from + 1, from + Cw))
      end
      out[name] = s
    elseif how == "col" then
      local d = t:dim()
      local n = t:size(d) / world
      out[name] = t:slice(d, rank * n + 1, (rank + 1) * n):clone()
    elseif how == "row" then
      local n = t:size(1) / world
      out[name] = t:slice(1, rank * n + 1, (rank + 1) * n):clone()
    else
      out[name] = t
    end
  end
  return out
end

-- M.load_full(src) -> config, params (map name -> CPU f32 tensor) of a full
-- model. src is one of
--   {checkpoint = "model.safetensors" [, config = {...}]}  GPT.save's format
--   {checkpoint = "ckpt/checkpoint-000003", config = {...} [, key = "model"]}
--       a tide.train checkpoint directory; state[key] is the model's map
--   {model = m}                                            a tide.nn.gpt model
--   {params = map, config = {...}}                         a full model's tensors (gather_params)
--   {config = {...}, seed = 1}                             GPT.new's initialisation
function M.load_full(src)
  if type(src) ~= "table" then error("tide.nn.tp: expected a weights source table", 3) end
  if src.model then return src.model.config, src.model.p end
  if src.params then
    if type(src.params) ~= "table" or type(src.config) ~= "table" then
      error("tide.nn.tp: params needs a map name -> tensor and config = {...}", 3)
    end
    return GPT.check_config(src.config), src.params
  end
  if src.checkpoint ~= nil then
    local path = src.checkpoint
    if type(path) ~= "string" then error("tide.nn.tp: checkpoint must be a path", 3) end
    local f = io.open(path .. "/state.json", "rb")
    if f then
      f:close()
      local state = require("tide.train").load_checkpoint(path)
      local key = src.key or "model"
      local params = state[key]
      if type(params) ~= "table" then
        error(format("tide.nn.tp: the checkpoint %s has no table '%s' of tensors", path, key), 3)
      end
      local cfg = src.config or state.config
      if type(cfg) ~= "table" then
        error("tide.nn.tp: a tide.train checkpoint carries no model config: pass config = {...}", 3)
      end
      cfg = GPT.check_config(cfg)
      return cfg, params
    end
    f = io.open(path, "rb")
    if not f then error("tide.nn.tp: cannot open checkpoint " .. path, 3) end
    f:close()
    local m = GPT.load(path, src.config and {config = src.config} or nil)
    return m.config, m.p
  end
  if src.config then
    local m = GPT.new(src.config, {seed = src.seed or 0})
    return m.config, m.p
  end
  error("tide.nn.tp: the weights source needs checkpoint, model or config", 3)
end

-- -- One rank's shard --------------------------------------------------------

local Shard = {}
Shard.__index = Shard
-- The KV-cached sampling loop is the full model's: it only calls
-- new_cache and _forward_cached, which the shard provides.
Shard.generate = GPT.Model.generate
M.Shard = Shard

local function layer_names(l)
  local p = "h." .. l .. "."
  return p, {
    ln1w = p .. "ln_1.weight", ln1b = p .. "ln_1.bias",
    attnw = p .. "attn.c_attn.weight", attnb = p .. "attn.c_attn.bias",
    projw = p .. "attn.c_proj.weight", projb = p .. "attn.c_proj.bias",
    ln2w = p .. "ln_2.weight", ln2b = p .. "ln_2.bias",
    fcw = p .. "mlp.c_fc.weight", fcb = p .. "mlp.c_fc.bias",
    fcpw = p .. "mlp.c_proj.weight", fcpb = p .. "mlp.c_proj.bias",
  }
end

-- M.shard(src, {rank, world_size, group [, device, ctx]}) -> shard model.
-- Call it on every rank (inside tasks or actors that joined collective
-- group `group`), or pass a tide.train ctx (its rank, world size and
-- group). src as M.load_full, or the full params already sliced by
-- M.shard_params ({sharded = params, config = cfg}).
function M.shard(src, opts)
  opts = opts or {}
  local rank, world, group = opts.rank, opts.world_size, opts.group
  if opts.ctx then rank, world, group = opts.ctx.rank, opts.ctx.world_size, opts.ctx._group end
  local cfg, params
  if type(src) == "table" and src.sharded then
    cfg = GPT.check_config(src.config)
    check_world(cfg, rank, world)
    -- Tensors that came as arguments map the object store read-only: the
    -- shard owns writable copies (the optimizer updates them in place).
    params = {}
    for name, t in pairs(src.sharded) do params[name] = t:clone() end
  else
    local full
    cfg, full = M.load_full(src)
    params = M.shard_params(full, cfg, rank, world)
  end
  local device = opts.device or "cpu"
  local C = require("tide.collective")
  local self = setmetatable({config = cfg, rank = rank, world_size = world, group = group,
    device = device, n_head_local = cfg.n_head / world, width_local = cfg.n_embd / world,
    params = {}, p = {}, sharded = {}, grads = nil, g = nil, opt_m = nil, opt_v = nil,
    step_count = 0, acts = nil}, Shard)
  -- The order of GPT's checkpoints; every rank the same, so flat buffers line up.
  local names = {"wte.weight", "wpe.weight"}
  for l = 0, cfg.n_layer - 1 do
    local _, n = layer_names(l)
    for _, k in ipairs({"ln1w", "ln1b", "attnw", "attnb", "projw", "projb",
                        "ln2w", "ln2b", "fcw", "fcb", "fcpw", "fcpb"}) do
      names[#names + 1] = n[k]
    end
  end
  names[#names + 1] = "ln_f.weight"
  names[#names + 1] = "ln_f.bias"
  for i, name in ipairs(names) do
    local t = params[name]
    if not t then error("tide.nn.tp: missing parameter " .. name, 2) end
    if t:device() ~= device then t = t:to(device) end
    self.params[i] = {name, t}
    self.p[name] = t
    self.sharded[name] = split_of(name) ~= nil
  end
  self.L = {}
  for l = 0, cfg.n_layer - 1 do
    local prefix, n = layer_names(l)
    local v = {prefix = prefix}
    for k, name in pairs(n) do v[k] = self.p[name] end
    self.L[l + 1] = v
  end
  -- The partial sums of row-split layers, summed over the ranks in place.
  if world == 1 then
    self.reduce = function() end
  else
    self.reduce = function(t) C.allreduce(t, "sum", group) end
  end
  return self
end

-- m:num_params() -> scalars this rank holds.
function Shard:num_params()
  local n = 0
  for _, e in ipairs(self.params) do n = n + e[2]:numel() end
  return n
end

function Shard:_acts(B, Tn)
  local a = self.acts
  if a and a.B == B and a.T == Tn then return a end
  local cfg = self.config
  local C, V, L, Cw, NHl = cfg.n_embd, cfg.vocab_size, cfg.n_layer, self.width_local, self.n_head_local
  local N = B * Tn
  local dev = {device = self.device}
  local function empty(shape) return T.empty(shape, dev) end
  a = {B = B, T = Tn, N = N, res = {}, layer = {}}
  for l = 1, L + 1 do a.res[l] = empty({N, C}) end
  for l = 1, L do
    local y = {
      ln1 = empty({N, C}), ln1_mean = empty({N}), ln1_rstd = empty({N}),
      qkv = empty({N, 3 * Cw}), atty = empty({N, Cw}), att = empty({B, NHl, Tn, Tn}),
      x2 = empty({N, C}), ln2 = empty({N, C}), ln2_mean = empty({N}), ln2_rstd = empty({N}),
      fch = empty({N, 4 * Cw}), fch_gelu = empty({N, 4 * Cw}), tmp = empty({N, C}),
    }
    y.qkv3 = y.qkv:view({B, Tn, 3 * Cw})
    y.atty3 = y.atty:view({B, Tn, Cw})
    a.layer[l] = y
  end
  a.lnf = empty({N, C}); a.lnf_mean = empty({N}); a.lnf_rstd = empty({N})
  a.logits = empty({N, V}); a.losses = empty({N})
  a.dres = empty({N, C}); a.dC = empty({N, C}); a.dCw = empty({N, Cw}); a.d3C = empty({N, 3 * Cw})
  a.d4C = empty({N, 4 * Cw}); a.dlogits = empty({N, V})
  a.d3C3 = a.d3C:view({B, Tn, 3 * Cw}); a.dCw3 = a.dCw:view({B, Tn, Cw})
  self.acts = a
  return a
end

local function check_ids(self, idx, what)
  if not T.is_tensor(idx) or idx:dtype() ~= "i32" or idx:dim() ~= 2 then
    error("tide.nn.tp: " .. what .. " must be a (B, T) i32 tensor", 3)
  end
  local s = idx:shape()
  if s[2] > self.config.block_size then
    error("tide.nn.tp: sequence length " .. s[2] .. " exceeds block_size " .. self.config.block_size, 3)
  end
  if idx:device() ~= self.device then idx = idx:to(self.device) end
  return s[1], s[2], idx
end

-- m:forward(inputs [, targets]) -> logits (B,T,V) [, mean loss], as the
-- full model's (every rank gets the same). A collective: every rank calls it.
function Shard:forward(idx, targets)
  local B, Tn
  B, Tn, idx = check_ids(self, idx, "inputs")
  local cfg = self.config
  local C, eps, NHl = cfg.n_embd, cfg.ln_eps, self.n_head_local
  local a = self:_acts(B, Tn)
  local P, reduce = self.p, self.reduce
  local x = a.res[1]
  T.embedding(idx, P["wte.weight"], {out = x})
  T.add(x:view({B, Tn, C}), P["wpe.weight"]:slice(1, 1, Tn), {out = x})
  for l = 1, cfg.n_layer do
    local w, y = self.L[l], a.layer[l]
    local xin, xout = a.res[l], a.res[l + 1]
    T.layernorm(xin, w.ln1w, w.ln1b, {eps = eps, out = y.ln1, mean = y.ln1_mean, rstd = y.ln1_rstd})
    T.matmul(y.ln1, w.attnw, {out = y.qkv})                -- column-split: this rank's heads
    T.add(y.qkv, w.attnb, {out = y.qkv})
    T.attention(y.qkv3, NHl, {out = y.atty3, att = y.att})
    T.matmul(y.atty, w.projw, {out = y.tmp})               -- row-split: a partial sum
    reduce(y.tmp)
    T.add(y.tmp, w.projb, {out = y.tmp})                   -- the bias once, after the sum
    T.add(xin, y.tmp, {out = y.x2})
    T.layernorm(y.x2, w.ln2w, w.ln2b, {eps = eps, out = y.ln2, mean = y.ln2_mean, rstd = y.ln2_rstd})
    T.matmul(y.ln2, w.fcw, {out = y.fch})
    T.add(y.fch, w.fcb, {out = y.fch})
    T.gelu(y.fch, {out = y.fch_gelu})
    T.matmul(y.fch_gelu, w.fcpw, {out = y.tmp})
    reduce(y.tmp)
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
    if tb ~= B or tt ~= Tn then error("tide.nn.tp: targets must have the shape of inputs", 2) end
    self._targets = targets
    return logits, T.cross_entropy(a.logits, targets:view({B * Tn}), {out = a.losses})
  end
  return logits
end

-- m:zero_grad(), as the full model's (this rank's parameters).
function Shard:zero_grad()
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

-- m:backward([scale]): the gradients of this rank's parameters. The input
-- gradient of each column-split layer is a partial sum (each rank saw some
-- of the heads or hidden units), so it is allreduced before it joins the
-- residual stream; after that every rank holds the same residual gradient,
-- so the replicated parameters get the same gradients everywhere.
function Shard:backward(scale)
  if not self._targets then error("tide.nn.tp: backward needs a forward with targets", 2) end
  if not self.grads then self:zero_grad() end
  local cfg = self.config
  local L, NHl = cfg.n_layer, self.n_head_local
  local a, P, G, reduce = self.acts, self.p, self.g, self.reduce
  local B, Tn = a.B, a.T
  local targets = self._targets:view({B * Tn})
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
    T.matmul(y.fch_gelu, a.dres, {trans_a = true, out = G[p .. "mlp.c_proj.weight"], beta = 1})
    T.sum_rows(a.dres, {out = G[p .. "mlp.c_proj.bias"], accumulate = true})
    T.matmul(a.dres, w.fcpw, {trans_b = true, out = a.d4C})
    T.gelu_backward(a.d4C, y.fch, {out = a.d4C})
    T.matmul(y.ln2, a.d4C, {trans_a = true, out = G[p .. "mlp.c_fc.weight"], beta = 1})
    T.sum_rows(a.d4C, {out = G[p .. "mlp.c_fc.bias"], accumulate = true})
    T.matmul(a.d4C, w.fcw, {trans_b = true, out = a.dC})
    reduce(a.dC)
    T.layernorm_backward(a.dC, y.x2, w.ln2w, y.ln2_mean, y.ln2_rstd,
                         {dx = a.dres, dw = G[p .. "ln_2.weight"], db = G[p .. "ln_2.bias"],
                          accumulate = true})
    T.matmul(y.atty, a.dres, {trans_a = true, out = G[p .. "attn.c_proj.weight"], beta = 1})
    T.sum_rows(a.dres, {out = G[p .. "attn.c_proj.bias"], accumulate = true})
    T.matmul(a.dres, w.projw, {trans_b = true, out = a.dCw})
    T.attention_backward(a.dCw3, y.qkv3, y.att, NHl, {out = a.d3C3})
    T.matmul(y.ln1, a.d3C, {trans_a = true, out = G[p .. "attn.c_attn.weight"], beta = 1})
    T.sum_rows(a.d3C, {out = G[p .. "attn.c_attn.bias"], accumulate = true})
    T.matmul(a.d3C, w.attnw, {trans_b = true, out = a.dC})
    reduce(a.dC)
    T.layernorm_backward(a.dC, a.res[l], w.ln1w, y.ln1_mean, y.ln1_rstd,
                         {dx = a.dres, dw = G[p .. "ln_1.weight"], db = G[p .. "ln_1.bias"],
                          accumulate = true})
  end
  T.embedding_backward(a.dres, self._inputs:view({B * Tn}), G["wte.weight"])
  local C = cfg.n_embd
  T.sum_rows(a.dres:view({B, Tn * C}),
             {out = G["wpe.weight"]:slice(1, 1, Tn):view({Tn * C}), accumulate = true})
end

-- m:grad_norm() -> the full model's gradient norm: the split parameters'
-- squares summed over the ranks, the replicated ones counted once.
-- A collective.
function Shard:grad_norm()
  local split, rep = 0, 0
  for _, e in ipairs(self.grads or {}) do
    local d = T.dot(e[2], e[2])
    if self.sharded[e[1]] then split = split + d else rep = rep + d end
  end
  if self.world_size > 1 then
    local s = T.from_table({split})
    self.reduce(s)
    split = s:get(1)
  end
  return sqrt(split + rep)
end

-- m:step(opts): AdamW on this rank's parameters, options as the full
-- model's m:step (grad_clip uses the whole model's norm: a collective then).
function Shard:step(opts)
  opts = opts or {}
  if not self.grads then error("tide.nn.tp: step before backward", 2) end
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
    o.weight_decay = e[2]:dim() >= 2 and wd or 0
    T.adamw(e[2], self.grads[i][2], self.opt_m[i], self.opt_v[i], o)
  end
  return norm
end

-- m:gather_params() -> map name -> the full model's tensor (CPU), on every
-- rank: the split parameters' slices allgathered and put back in place.
-- A collective. For checkpoints: rank 0 saves what a whole tide.nn.gpt
-- model would (ctx:checkpoint({model = m:gather_params(), ...})), and any
-- number of ranks, or a whole model, loads it.
function Shard:gather_params()
  local C = require("tide.collective")
  local W, out = self.world_size, {}
  for _, e in ipairs(self.params) do
    local name, t = e[1], e[2]
    local how = self.sharded[name] and split_of(name)
    t = t:to("cpu"):contiguous()
    if not how or W == 1 then
      out[name] = t:clone()
    else
      local n = t:numel()
      local all = T.empty({W * n})
      if self.device ~= "cpu" then
        -- NCCL gathers device tensors.
        all = C.allgather(e[2]:contiguous(), nil, self.group):to("cpu")
      else
        C.allgather(t:view({n}), all, self.group)
      end
      local shape, d = t:shape(), t:dim()
      if how == "row" then
        shape[1] = shape[1] * W
        out[name] = all:view(shape)
      else
        -- Rank r's (..., k) block goes to columns r*k.. (col), or to
        -- r*k/3.. of each of q, k and v (qkv).
        local k = shape[d]
        local full = shape
        full[d] = k * W
        local res = T.empty(full)
        for r = 0, W - 1 do
          local part = all:slice(1, r * n + 1, (r + 1) * n):view(t:shape())
          if how == "col" then
            res:slice(d, r * k + 1, (r + 1) * k):copy(part)
          else
            local kw = k / 3
            for j = 0, 2 do
              local to = j * kw * W + r * kw
              res:slice(d, to + 1, to + kw):copy(part:slice(d, j * kw + 1, (j + 1) * kw))
            end
          end
        end
        out[name] = res
      end
    end
  end
  return out
end

-- m:new_cache(B): this rank's keys and values (its heads only: 1/W of the
-- full model's cache).
function Shard:new_cache(B)
  local cfg = self.config
  local c = {k = {}, v = {}, B = B, pos = 0}
  for l = 1, cfg.n_layer do
    c.k[l] = T.zeros({B, cfg.block_size, self.width_local}, {device = self.device})
    c.v[l] = T.zeros({B, cfg.block_size, self.width_local}, {device = self.device})
  end
  return c
end

-- Positions pos..pos+Tn-1 of idx (B,Tn) through the shard with its cache:
-- the logits (B,V) of the last position (the same on every rank).
function Shard:_forward_cached(cache, idx, pos)
  local cfg = self.config
  local C, eps, NHl = cfg.n_embd, cfg.ln_eps, self.n_head_local
  local s = idx:shape()
  local B, Tn = s[1], s[2]
  local P, reduce = self.p, self.reduce
  local x = T.embedding(idx, P["wte.weight"])
  T.add(x, P["wpe.weight"]:slice(1, pos + 1, pos + Tn), {out = x})
  for l = 1, cfg.n_layer do
    local w = self.L[l]
    local h = T.layernorm(x, w.ln1w, w.ln1b, {eps = eps})
    local qkv = T.matmul(h, w.attnw)
    T.add(qkv, w.attnb, {out = qkv})
    local att = T.attention_cached(qkv, cache.k[l], cache.v[l], pos, NHl)
    local proj = T.matmul(att, w.projw)
    reduce(proj)
    T.add(proj, w.projb, {out = proj})
    T.add(x, proj, {out = x})
    h = T.layernorm(x, w.ln2w, w.ln2b, {eps = eps})
    local f = T.matmul(h, w.fcw)
    T.add(f, w.fcb, {out = f})
    f = T.gelu(f, {out = f})
    local o = T.matmul(f, w.fcpw)
    reduce(o)
    T.add(o, w.fcpb, {out = o})
    T.add(x, o, {out = x})
  end
  local last = x:slice(2, Tn, Tn):reshape({B, C})
  last = T.layernorm(last, P["ln_f.weight"], P["ln_f.bias"], {eps = eps})
  return T.matmul(last, P["wte.weight"], {trans_b = true})
end

-- -- Shard actors and the group that drives them ------------------------------

local ShardActor

local function now() return require("tide.data.worker").now() end

local function actor_class()
  if ShardActor then return ShardActor end
  local tide = require("tide")
  ShardActor = tide.actor({
    init = function(self, spec)
      self.spec = spec
      self.sessions = {}
      -- Each rank computes on the CPUs it reserved (as tide.train's ranks).
      if spec.blas_threads then
        local ffi = require("ffi")
        pcall(ffi.cdef, "void openblas_set_num_threads(int);")
        pcall(function() ffi.C.openblas_set_num_threads(spec.blas_threads) end)
      end
    end,
    -- Joins the collective group and loads this rank's slice of the weights.
    setup = function(self)
      local spec = self.spec
      local C = require("tide.collective")
      local TP = require("tide.nn.tp")
      local gopts = {timeout = spec.timeout}
      if spec.device ~= "cpu" then gopts.backend, gopts.device = "nccl", spec.device end
      C.init_group(spec.world_size, spec.rank, spec.group, gopts)
      self.model = TP.shard(spec.source, {rank = spec.rank, world_size = spec.world_size,
        group = spec.group, device = spec.device})
      collectgarbage()                      -- the full weights go; the slice stays
      -- Every rank is in the group before the first request.
      local probe = require("tide.tensor").ones({1})
      if spec.device ~= "cpu" then probe = probe:to(spec.device) end
      if spec.world_size > 1 then C.allreduce(probe, "sum", spec.group) end
      return {pid = require("tide").get_runtime_context().pid, params = self.model:num_params(),
        config = self.model.config}
    end,
    -- Full logits (B,T,V) of ids (a table of rows); rank 0 returns them.
    forward = function(self, rows)
      local T2 = require("tide.tensor")
      local logits = self.model:forward(T2.from_table(rows, {dtype = "i32"}))
      if self.spec.rank == 0 then return logits:to("cpu"):clone() end
      return true
    end,
    -- One decoding step of session sid: rows (B,Tn) at position pos
    -- (pos 0 starts a new cache). Rank 0 samples the next ids.
    step = function(self, sid, rows, pos, sopts)
      local T2 = require("tide.tensor")
      local m = self.model
      local cache = self.sessions[sid]
      if pos == 0 or not cache then
        cache = m:new_cache(#rows)
        self.sessions[sid] = cache
      end
      local logits = m:_forward_cached(cache, T2.from_table(rows, {dtype = "i32", device = m.device}), pos)
      if self.spec.rank ~= 0 then return true end
      return T2.sample(logits, sopts):to_table()
    end,
    ping = function() return true end,
    release = function(self, sid)
      self.sessions[sid] = nil
      return true
    end,
    -- Runs fn(model, rank, ...) on this rank (a collective if fn makes one).
    run = function(self, fn, ...)
      return fn(self.model, self.spec.rank, ...)
    end,
  })
  return ShardActor
end

local Group = {}
Group.__index = Group
M.Group = Group

local group_counter = 0

local function describe(e)
  if type(e) == "table" then
    return (e.kind or "error") .. ": " .. tostring(e.message or e), e.kind
  end
  return tostring(e), nil
end

-- M.group(opts) -> a group of W shard actors holding one model between
-- them, from a driver, a task or a serve replica.
--   world_size = 2                         ranks (must divide n_head)
--   checkpoint / config + seed / model / key   the weights, as M.load_full
--   resources_per_worker = {num_cpus = 1}  each rank's bundle ({num_gpus = 1}: CUDA, NCCL)
--   placement_strategy = "PACK"
--   name = "tp"                            prefix of the collective group's name
--   timeout = 60                           seconds for the group to form, and for one step
function M.group(opts)
  if type(opts) ~= "table" then error("tide.nn.tp.group: expected an options table", 2) end
  local tide = require("tide")
  local world = opts.world_size or 2
  if type(world) ~= "number" or world < 1 or world % 1 ~= 0 then
    error("tide.nn.tp.group: world_size must be a positive integer", 2)
  end
  local source, cfg
  if opts.model then
    -- A model object does not travel (metatable, buffers): each rank gets
    -- its slice of the weights, cut here.
    if type(opts.model) ~= "table" or type(opts.model.p) ~= "table" then
      error("tide.nn.tp.group: model must be a tide.nn.gpt model", 2)
    end
    cfg = opts.model.config
  elseif opts.checkpoint then
    if type(opts.checkpoint) ~= "string" then error("tide.nn.tp.group: checkpoint must be a path", 2) end
    source = {checkpoint = opts.checkpoint, config = opts.config, key = opts.key}
  elseif opts.config then
    source = {config = opts.config, seed = opts.seed}
    cfg = opts.config
  else
    error("tide.nn.tp.group: pass checkpoint = path, config = {...} (with seed) or model = m", 2)
  end
  -- A config known here is checked here, so a bad one fails in the caller, not in W actors.
  if cfg then
    cfg = GPT.check_config(cfg)
    if cfg.n_head % world ~= 0 then
      error(format("tide.nn.tp.group: world_size %d must divide n_head %d (each rank holds whole heads)",
        world, cfg.n_head), 2)
    end
  end
  local rpw = opts.resources_per_worker or {num_cpus = 1}
  local bundle = {CPU = rpw.num_cpus or 0}
  if (rpw.num_gpus or 0) > 0 then bundle.GPU = rpw.num_gpus end
  local bundles = {}
  for i = 1, world do bundles[i] = bundle end
  local timeout = opts.timeout or 60
  local pg = tide.placement_group(bundles, {strategy = opts.placement_strategy or "PACK"})
  if not pg:wait(timeout) then
    pcall(tide.remove_placement_group, pg)
    error(format("tide.nn.tp.group: %d shard workers ({CPU = %g%s} each) could not be reserved within %g s",
      world, bundle.CPU, bundle.GPU and (", GPU = " .. bundle.GPU) or "", timeout), 2)
  end
  group_counter = group_counter + 1
  local ctx = tide.get_runtime_context()
  local gname = format("%s.%s.%d.%d", opts.name or "tp", tostring(ctx.pid), group_counter,
    floor((os.time() % 100000)))
  local device = (rpw.num_gpus or 0) > 0 and "cuda:0" or "cpu"
  local cls = actor_class()
  local self = setmetatable({world_size = world, name = gname, pg = pg, actors = {}, device = device,
    timeout = timeout, sid = 0, dead = nil}, Group)
  local refs = {}
  for r = 0, world - 1 do
    local rsrc = source or {sharded = M.shard_params(opts.model.p, cfg, r, world), config = cfg}
    local spec = {rank = r, world_size = world, group = gname, device = device, source = rsrc,
      timeout = timeout,
      blas_threads = device == "cpu" and (rpw.num_cpus or 0) >= 1 and floor(rpw.num_cpus) or nil}
    self.actors[r + 1] = cls:options({placement_group = pg, bundle_index = r + 1,
      num_cpus = rpw.num_cpus or 0, num_gpus = rpw.num_gpus or 0, own_process = true,
      max_restarts = 0}):remote(spec)
  end
  for r = 1, world do refs[r] = self.actors[r]:setup() end
  local infos = self:_collect(refs, "setup", timeout)
  self.config = infos[1].config
  self.block_size = self.config.block_size
  self.pids, self.params_per_rank = {}, {}
  for r = 1, world do
    self.pids[r] = infos[r].pid
    self.params_per_rank[r] = infos[r].params
  end
  return self
end

-- Waits for one call on every rank. The first failure (a dead rank, an
-- error) tears the whole group down — the other ranks would wait in the
-- collective for the dead one forever — and raises a ShardGroupError.
function Group:_collect(refs, what, timeout)
  local tide = require("tide")
  local rank_of = {}
  for i, ref in ipairs(refs) do rank_of[ref:id()] = i - 1 end
  local pending, out = refs, {}
  local deadline = now() + (timeout or self.timeout)
  while #pending > 0 do
    local ready
    ready, pending = tide.wait(pending, {num_returns = 1, timeout = max(0.001, deadline - now())})
    if #ready == 0 then
      local late = {}
      for _, ref in ipairs(pending) do late[#late + 1] = tostring(rank_of[ref:id()]) end
      self:_fail(format("%s timed out after %g s waiting for rank(s) %s", what, timeout or self.timeout,
        table.concat(late, ", ")), "GetTimeoutError")
    end
    for _, ref in ipairs(ready) do
      local ok, v = pcall(tide.get, ref)
      local rank = rank_of[ref:id()]
      if not ok then
        local msg, kind = describe(v)
        -- The caller itself was cancelled (a serve client hung up) while it
        -- waited: every rank was given its call and finishes it, so the
        -- group stays whole; only this caller stops.
        if kind == "TaskCancelledError" then error(v, 0) end
        self:_fail(format("shard rank %d of %d failed in %s: %s", rank, self.world_size, what, msg), kind)
      end
      out[rank + 1] = v
    end
  end
  return out
end

local GroupError = {}
GroupError.__index = GroupError
GroupError.__tostring = function(e) return "ShardGroupError: " .. e.message end
M.GroupError = GroupError

function Group:_fail(msg, cause_kind)
  self:close()
  self.dead = msg
  error(setmetatable({kind = "ShardGroupError", message = msg .. "; the group was torn down",
    cause = cause_kind}, GroupError), 0)
end

-- g:alive() -> true, or false and why the group is gone.
function Group:alive()
  if self.dead then return false, self.dead end
  if not self.actors then return false, "closed" end
  return true
end

local function check_alive(self)
  if self.dead then
    error(setmetatable({kind = "ShardGroupError", message = "the group is gone: " .. self.dead},
      GroupError), 3)
  end
  if not self.actors then error("tide.nn.tp: the group is closed", 3) end
end

-- g:ping(): every rank answers a call (not a collective), or the group is
-- torn down and ShardGroupError raised: how a server finds a rank that died
-- between requests before it starts a stream.
function Group:ping(timeout)
  check_alive(self)
  local refs = {}
  for r = 1, self.world_size do refs[r] = self.actors[r]:ping() end
  self:_collect(refs, "ping", timeout)
  return true
end

-- g:logits(rows) -> the full logits (B,T,V) of a batch of id rows.
function Group:logits(rows)
  check_alive(self)
  if type(rows) ~= "table" or type(rows[1]) ~= "table" then
    error("tide.nn.tp: logits expects a table of rows of token ids", 2)
  end
  local refs = {}
  for r = 1, self.world_size do refs[r] = self.actors[r]:forward(rows) end
  return self:_collect(refs, "forward")[1]
end

-- Runs one step on every rank; rank 0's sampled ids.
function Group:_step(sid, rows, pos, sopts)
  local refs = {}
  for r = 1, self.world_size do refs[r] = self.actors[r]:step(sid, rows, pos, sopts) end
  return self:_collect(refs, "a decoding step")[1]
end

-- g:generate(prompt, n [, {temperature = 1, top_k = 0, seed = 0, on_token = fn}]) -> ids
-- As tide.nn.gpt's m:generate (the same sampling, so the same ids for the
-- same logits), driven from here one step at a time: every rank runs the
-- step (their allreduces meet), rank 0 samples, and on_token(id, step)
-- sees each token as soon as it is made. Calls from coroutines of one
-- caller may overlap (each has its own cache on the ranks).
function Group:generate(prompt, n, opts)
  check_alive(self)
  opts = opts or {}
  if type(prompt) ~= "table" then error("tide.nn.tp: generate expects an array of token ids", 2) end
  local batched = type(prompt[1]) == "table"
  local seqs = batched and prompt or {prompt}
  local B = #seqs
  local out = {}
  for b = 1, B do
    out[b] = {}
    for i, v in ipairs(seqs[b]) do out[b][i] = v end
    if #out[b] ~= #out[1] then error("tide.nn.tp: prompts must have equal lengths", 2) end
  end
  if #out[1] == 0 then error("tide.nn.tp: empty prompt", 2) end
  if type(n) ~= "number" or n < 0 then error("tide.nn.tp: generate needs a token count", 2) end
  self.sid = self.sid + 1
  local sid = self.sid
  local bs = opts.block_size or self.block_size
  local sopts = {temperature = opts.temperature or 1, top_k = opts.top_k or 0,
                 seed = opts.seed or 0, offset = 0}
  local pos = 0
  local function prefill(keep)
    local len = #out[1]
    local start = max(1, len - keep + 1)
    local rows = {}
    for b = 1, B do
      local r = {}
      for i = start, len do r[#r + 1] = out[b][i] end
      rows[b] = r
    end
    local ids = self:_step(sid, rows, 0, sopts)
    pos = len - start + 1
    return ids
  end
  local ok, err = pcall(function()
    local next_ids = prefill(bs)
    for step = 1, n do
      for b = 1, B do out[b][#out[b] + 1] = next_ids[b] end
      if opts.on_token and opts.on_token(batched and next_ids or next_ids[1], step) == false then break end
      if step == n then break end
      sopts.offset = step * B
      if pos >= bs then
        next_ids = prefill(floor(bs / 2))
      else
        local col = {}
        for b = 1, B do col[b] = {next_ids[b]} end
        next_ids = self:_step(sid, col, pos, sopts)
        pos = pos + 1
      end
    end
  end)
  -- Also after an error that left the group up (the caller was
  -- cancelled): the ranks drop this generation's cache.
  if self.actors and not self.dead then
    for r = 1, self.world_size do pcall(self.actors[r].release, self.actors[r], sid) end
  end
  if not ok then error(err, 0) end
  return batched and out or out[1]
end

-- g:run(fn, ...) -> fn(model, rank, ...) of every rank, by rank (1-based
-- table). fn runs in each shard actor (captured like a remote function).
function Group:run(fn, ...)
  check_alive(self)
  local refs = {}
  for r = 1, self.world_size do refs[r] = self.actors[r]:run(fn, ...) end
  return self:_collect(refs, "run")
end

-- g:close(): kills the shard actors and gives their placement group back.
function Group:close()
  local tide = require("tide")
  for _, h in ipairs(self.actors or {}) do pcall(tide.kill, h) end
  if self.pg then pcall(tide.remove_placement_group, self.pg) end
  self.actors, self.pg = nil, nil
end

return M
