-- A fine-tuning service: a tide.serve app with two deployments.
--
--   /generate  the tiny GPT, tokens streamed as they are made (POST), and
--              which checkpoint it serves (GET)
--   /jobs      an async job endpoint: POST /jobs/finetune starts a fine-tune
--              (train.fit on the cluster: 2 data-parallel workers when there
--              is room, else 1), GET /jobs/<id> shows its progress (step,
--              loss, tokens/s), and when it succeeds the new weights are
--              loaded into every /generate replica while they keep serving
--
--   bin/tide run examples/train_dp.lua                      # or any GPT checkpoint
--   bin/tide serve run examples/finetune_service.lua [CHECKPOINT] [STATE_DIR]
--   curl -N -d '{"prompt": "And God said, ", "max_tokens": 80, "temperature": 0}' localhost:8000/generate
--   curl -s localhost:8000/generate                         # {"checkpoint": ...}
--   curl -s -d '{"base": "current", "dataset": "/path/to/text.txt", "steps": 40}' localhost:8000/jobs/finetune
--   curl -s localhost:8000/jobs/job-<id>                    # status, progress, note = {step, loss, tokens_per_s}
--   curl -sN localhost:8000/jobs/job-<id>/events            # the same, streamed as it changes
--
-- The request: "base" is a checkpoint (a train.fit checkpoint directory, a
-- GPT .safetensors file, or "current": what /generate serves now),
-- "dataset" a text file the workers read, "steps" a positive integer, and
-- optionally "lr".  A bad request is answered 400 {"error", "field"}; a base
-- or dataset that cannot be read fails the job, with the reason in its
-- record's "error".
--
-- The swap: the job writes the new checkpoint's path to STATE_DIR/current
-- (renamed into place), then calls `load` on every /generate replica
-- (handle:broadcast).  A replica swaps its model between two tokens of its
-- other requests: a stream in flight keeps the model it started with and
-- finishes; new requests get the new weights.  A replica started later
-- (a replacement) reads STATE_DIR/current in init.
--
-- Required (dofile) it returns the builder, M.app(opts), that
-- examples/genai.lua uses; run directly it serves.
local M = {}

-- A model from a checkpoint: a train.fit checkpoint directory whose state
-- has model (tensors) and model_config, or a GPT .safetensors file.
local function load_model(path)
  local GPT = require("tide.nn.gpt")
  if path:match("%.safetensors$") then return GPT.load(path) end
  local state = require("tide.train").load_checkpoint(path)
  if type(state.model) ~= "table" or type(state.model_config) ~= "table" then
    error("checkpoint " .. path .. " has no model and model_config", 0)
  end
  local m = GPT.new(state.model_config)
  for name, t in pairs(state.model) do m.p[name]:copy(t) end
  return m
end
M.load_model = load_model

local function read_current(state_dir)
  local f = io.open(state_dir .. "/current", "rb")
  if not f then return nil end
  local p = f:read("*l")
  f:close()
  return p ~= "" and p or nil
end

-- Atomic: a replica that reads it sees the old path or the new, never half.
local function write_current(state_dir, path)
  local tmp = state_dir .. "/.current." .. tostring(os.time()) .. "." .. tostring(math.random(1e9))
  local f = assert(io.open(tmp, "wb"))
  f:write(path, "\n")
  f:close()
  assert(os.rename(tmp, state_dir .. "/current"))
end

-- The fine-tune loop, on every rank: the base weights, the dataset's text,
-- a fixed global batch split over the ranks, gradients averaged.
local function finetune_loop(ctx, cfg)
  local D = require("tide.nn.corpus")
  local T = require("tide.tensor")
  local now = require("tide.data.worker").now
  local text = assert(D.read_text(cfg.dataset))
  local m = load_model(cfg.base)
  local start = 1
  local st = ctx:restore()
  if st then
    for name, t in pairs(st.model) do m.p[name]:copy(t) end
    m.opt_m, m.opt_v, m.step_count = st.opt_m, st.opt_v, st.adam_step
    start = st.step + 1
  end
  local per = math.max(1, math.floor(cfg.batch / ctx.world_size))
  local CTX = math.min(m.config.block_size, #text - 2)
  local batches = D.batcher(text, per, CTX, 500 + ctx.rank)
  local t0, t0_step
  for step = start, cfg.steps do
    local x, y = batches(step)
    local _, loss = m:forward(x, y)
    m:zero_grad()
    m:backward()
    ctx:allreduce(m.grads, "avg")
    m:step({lr = cfg.lr, weight_decay = 0.0, grad_clip = 1.0})
    local l = T.from_table({loss})
    ctx:allreduce(l, "avg")
    -- tokens/s from the second step on (the first warms buffers)
    local tps
    if not t0 then t0, t0_step = now(), step
    else tps = (step - t0_step) * per * ctx.world_size * CTX / (now() - t0) end
    ctx:report({step = step, loss = l:item(), tokens_per_s = tps, tokens = step * per * ctx.world_size * CTX})
    if step == cfg.steps or step % 50 == 0 then
      ctx:checkpoint({model = m.p, model_config = m.config, opt_m = m.opt_m, opt_v = m.opt_v,
        adam_step = m.step_count, step = step})
    end
  end
end

local FIELDS = {base = true, dataset = true, steps = true, lr = true}

-- 400 {"error", "field"}: the field named, for a client to show.
local function bad(serve, field, msg)
  return serve.response{status = 400, body = {error = field .. ": " .. msg, field = field}}
end

-- M.app{checkpoint = path?, state_dir = dir, replicas = 1, max_workers = 2,
--       max_steps = 10000, batch = 8, placement_timeout = 600,
--       route = "/generate", jobs_route = "/jobs"}
-- -> an array of deployments for serve.run / serve.deploy.
function M.app(opts)
  local serve = require("tide.serve")
  opts = opts or {}
  local state_dir = assert(opts.state_dir, "finetune_service.app: state_dir is required")
  os.execute("mkdir -p '" .. state_dir:gsub("'", "'\\''") .. "'")
  if opts.checkpoint and not read_current(state_dir) then write_current(state_dir, opts.checkpoint) end
  local max_workers, max_steps, batch = opts.max_workers or 2, opts.max_steps or 10000, opts.batch or 8
  local gen_name = opts.name or "gpt"
  local placement_timeout = opts.placement_timeout or 600

  local Generate = serve.deployment{
    name = gen_name, route = opts.route or "/generate", num_replicas = opts.replicas or 1,
    max_ongoing_requests = 16,
    init = function(self)
      self.tok = require("tide.nn.tokenizer").byte_level()
      local path = read_current(state_dir)
      if path then
        self.model, self.checkpoint = load_model(path), path
      else   -- nothing trained yet: an untrained model, so the plumbing can be tried
        self.model = require("tide.nn.gpt").new({n_layer = 2, n_head = 2, n_embd = 64, block_size = 64}, {seed = 1})
        self.checkpoint = "untrained"
      end
      self.loads = 0
    end,
    extra_methods = {
      -- Loads new weights; requests in flight keep the model they hold.
      load = function(self, path)
        self.model, self.checkpoint = load_model(path), path
        self.loads = self.loads + 1
        return {checkpoint = path, loads = self.loads}
      end,
    },
    methods = {
      GET = function(self)
        return {checkpoint = self.checkpoint, loads = self.loads, params = self.model:num_params()}
      end,
      POST = function(self, req)
        local body = type(req.json) == "table" and req.json or {}
        if body.prompt ~= nil and type(body.prompt) ~= "string" then
          return serve.response{status = 400, body = {error = "prompt: expected a string", field = "prompt"}}
        end
        local tok, model, ckpt = self.tok, self.model, self.checkpoint
        local prompt = tok:encode(body.prompt or "And God said, ")
        if #prompt == 0 then
          return serve.response{status = 400, body = {error = "prompt: empty", field = "prompt"}}
        end
        local n = math.max(1, math.min(tonumber(body.max_tokens) or 100, 1000))
        local sse = body.sse == true
        local utf8_split = require("tide.nn.tokenizer").utf8_split
        return serve.stream(function(send)
          local function emit(text) if text ~= "" then send(sse and {token = text} or text) end end
          local pending = ""
          model:generate(prompt, n, {
            temperature = tonumber(body.temperature) or 0.8, top_k = 40, seed = tonumber(body.seed) or 1,
            on_token = function(id)
              local text
              text, pending = utf8_split(pending .. tok:decode({id}), false)
              emit(text)
            end,
          })
          emit((utf8_split(pending, true)))
          if sse then send({done = true, checkpoint = ckpt}); send("[DONE]") end
        end, {sse = sse})
      end,
    },
  }

  local Finetune = serve.deployment{
    name = opts.jobs_name or "finetune", route = opts.jobs_route or "/jobs",
    jobs = {
      finetune = {
        validate = function(_, req)
          local b = req.json
          if type(b) ~= "table" or b[1] ~= nil then
            return serve.response{status = 400, body = {error =
              'body: must be a JSON object {"base": ..., "dataset": ..., "steps": ...}', field = "body"}}
          end
          for k in pairs(b) do
            if not FIELDS[k] then return bad(serve, tostring(k), "unknown field (base, dataset, steps, lr)") end
          end
          if b.base == nil then return bad(serve, "base", 'required: a checkpoint path or "current"') end
          if type(b.base) ~= "string" or b.base == "" then
            return bad(serve, "base", 'must be a checkpoint path or "current"')
          end
          if b.dataset == nil then return bad(serve, "dataset", "required: the path of a text file") end
          if type(b.dataset) ~= "string" or b.dataset == "" then
            return bad(serve, "dataset", "must be the path of a text file")
          end
          if b.steps == nil then return bad(serve, "steps", "required: a positive integer") end
          if type(b.steps) ~= "number" or b.steps % 1 ~= 0 or b.steps < 1 or b.steps > max_steps then
            return bad(serve, "steps", "must be an integer from 1 to " .. max_steps .. ", got " .. tostring(b.steps))
          end
          if b.lr ~= nil and (type(b.lr) ~= "number" or not (b.lr > 0 and b.lr < 1)) then
            return bad(serve, "lr", "must be a number in (0, 1), got " .. tostring(b.lr))
          end
        end,
        run = function(_, req, job)
          local tide = require("tide")
          local train = require("tide.train")
          local b = req.json
          local base = b.base
          if base == "current" then
            base = read_current(state_dir)
            if not base then error("base: \"current\" but nothing is served from a checkpoint yet", 0) end
          end
          -- Checked here, not at the POST: the paths are read where the job
          -- runs, and the job's record is where the reason goes.
          local ok, err = pcall(load_model, base)
          if not ok then   -- the reason without file:line prefixes (server paths)
            error("base: cannot load checkpoint " .. base .. ": " .. tostring(err):gsub("[^%s:]+%.lua:%d+: ", ""), 0)
          end
          local f, ferr = io.open(b.dataset, "rb")
          if not f then error("dataset: cannot read " .. tostring(ferr), 0) end
          local size = f:seek("end")
          f:close()
          if not size or size < 16 then error("dataset: " .. b.dataset .. " holds too little text (" ..
            tostring(size) .. " bytes)", 0) end
          local out = state_dir .. "/" .. job.id
          local first_loss
          local result = train.fit{
            num_workers = max_workers > 1 and {1, max_workers} or 1,   -- 2 when the cluster has room, else 1
            resources_per_worker = {num_cpus = 1},
            placement_timeout = placement_timeout,   -- jobs queue for workers while others train
            config = {base = base, dataset = b.dataset, steps = b.steps, lr = b.lr or 1e-3, batch = batch},
            max_failures = 1,
            checkpoint_dir = out,
            keep_checkpoints = 1,
            progress = false,
            on_report = function(r)
              first_loss = first_loss or r.loss
              job:progress(r.step / b.steps, {step = r.step, steps = b.steps, loss = r.loss,
                tokens_per_s = r.tokens_per_s and math.floor(r.tokens_per_s + 0.5), workers = r._world_size})
            end,
            loop = finetune_loop,
          }
          local path = assert(result.checkpoint, "the fine-tune wrote no checkpoint")
          write_current(state_dir, path)
          local refs = serve.get_handle(gen_name):broadcast("load", path)
          tide.get(refs)
          return {checkpoint = path, base = base, steps = b.steps, workers = result.num_workers,
            first_loss = first_loss, loss = result.metrics and result.metrics.loss,
            replicas_swapped = #refs, train_s = result.wall_s}
        end,
      },
    },
  }
  return {Generate, Finetune}
end

-- Run directly (tide serve run examples/finetune_service.lua [CHECKPOINT] [STATE_DIR]): serve.
if type(arg) == "table" and tostring(arg[0] or ""):find("finetune_service%.lua$") then
  local serve = require("tide.serve")
  local state_dir = arg[2] or ((os.getenv("TMPDIR") or "/tmp") .. "/tide-finetune-service")
  serve.run(M.app({checkpoint = arg[1], state_dir = state_dir}))
end

return M
