-- Serves one GPT split across a group of shard actors (tensor parallelism,
-- tide.nn.tp), with its tokens streamed as they are made: the way to serve
-- a model too large for one device. The replica drives W shard actors on a
-- placement group, joined in one collective group; each step runs on every
-- shard (their allreduces meet) and rank 0 samples the next token.
--
--   bin/tide serve run examples/serve_split.lua [CHECKPOINT [WORLD]]
--   curl -N -d '{"prompt": "And God said, ", "max_tokens": 120}' localhost:8000/generate
--   curl -N -d '{"prompt": "In the beginning", "sse": true}' localhost:8000/generate
--   curl localhost:8000/generate          # the shard group: pids, generation, last error
--
-- CHECKPOINT: a tide.nn.gpt safetensors file (examples/train_tiny_gpt.lua
-- writes /tmp/tide_tiny_gpt.safetensors); without one, an untrained tiny
-- model. WORLD (2) must divide the model's n_head; each shard reserves one
-- CPU (tide serve run needs WORLD CPUs free).
--
-- Body: prompt, max_tokens (100, at most 4096), temperature (0.8; 0 is
-- greedy), top_k (40), seed (1), sse; a bad one is a 400 naming the field.
-- SSE events are {"token": text, "ids": [token ids]} then [DONE]; plain
-- responses stream the text (every chunk valid UTF-8). When a shard dies
-- mid-stream the stream ends with an event {"error": ..., "kind":
-- "ShardGroupError"} (plain: a last line "[error: ...]", then the stream is
-- cut without its final chunk); the group is torn down and a new one is
-- built for the next request. A shard that died between requests is found
-- (every rank is pinged before a stream starts) and the group rebuilt, so
-- that request is answered normally.
local serve = require("tide.serve")

local ckpt = arg and arg[1] or ((os.getenv("TMPDIR") or "/tmp") .. "/tide_tiny_gpt.safetensors")
local world = tonumber(arg and arg[2]) or 2
local TINY = {vocab_size = 256, n_layer = 2, n_head = 4, n_embd = 64, block_size = 64}

-- The shard group, built on first use and again after it failed. One
-- coroutine builds; concurrent requests wait for it.
local function ensure(self)
  local tide = require("tide")
  while self.building do tide.sleep(0.01) end
  if self.group and self.group:alive() then return self.group end
  self.building = true
  local ok, g = pcall(function()
    local TP = require("tide.nn.tp")
    local opts = {world_size = world, name = "serve_split", resources_per_worker = {num_cpus = 1},
      timeout = 60}
    local f = io.open(ckpt, "rb")
    if f then
      f:close()
      opts.checkpoint = ckpt
    else
      opts.config, opts.seed = TINY, 1
    end
    return TP.group(opts)
  end)
  self.building = false
  if not ok then error(g, 0) end
  self.group = g
  self.generation = self.generation + 1
  if self.generation > 1 then
    print(string.format("[serve_split] shard group %d is up (pids %s)", self.generation,
      table.concat(g.pids, ", ")))
  end
  return g
end

local function message(e)
  if type(e) == "table" then return tostring(e.message or e), e.kind end
  return tostring(e), nil
end

local Split = serve.deployment{
  name = "gpt_split", route = "/generate", num_replicas = 1, max_ongoing_requests = 8,
  init = function(self)
    self.tok = require("tide.nn.tokenizer").byte_level()
    self.generation, self.failures = 0, 0
  end,
  call = function(self, req)
    if req.method == "GET" then
      local g = self.group
      return {world_size = world, generation = self.generation, failures = self.failures,
        alive = g ~= nil and g:alive() or false, pids = g and g.pids or {},
        params_per_rank = g and g.params_per_rank or {}, last_error = self.last_error}
    end
    local body = req.json or {}
    local function bad(msg) return serve.response{status = 400, body = {error = msg}} end
    if body.prompt ~= nil and type(body.prompt) ~= "string" then return bad("prompt must be a string") end
    local prompt = self.tok:encode(body.prompt or "And God said, ")
    if #prompt == 0 then return bad("empty prompt") end
    local n = body.max_tokens == nil and 100 or tonumber(body.max_tokens)
    if not n or n < 1 or n % 1 ~= 0 or n > 4096 then
      return bad("max_tokens must be an integer in 1..4096")
    end
    for _, k in ipairs({"temperature", "top_k", "seed"}) do
      if body[k] ~= nil and (type(body[k]) ~= "number" or body[k] < 0) then
        return bad(k .. " must be a number >= 0")
      end
    end
    -- A group that lost a rank since the last request is rebuilt now.
    local ok, g = pcall(function()
      local grp = ensure(self)
      if not pcall(grp.ping, grp, 10) then
        self.failures = self.failures + 1
        grp = ensure(self)
      end
      return grp
    end)
    if not ok then
      local msg = message(g)
      self.last_error = msg
      return serve.response{status = 503, body = {error = "the shard group is not available: " .. msg,
        kind = "ShardGroupError"}}
    end
    local tok, split = self.tok, require("tide.nn.tokenizer").utf8_split
    local sse = body.sse == true
    return serve.stream(function(send)
      local pending, ids = "", {}
      local function emit(text)
        if text ~= "" or #ids > 0 then
          send(sse and {token = text, ids = ids} or text)
          ids = {}
        end
      end
      local gok, err = pcall(g.generate, g, prompt, n, {
        temperature = tonumber(body.temperature) or 0.8, top_k = tonumber(body.top_k) or 40,
        seed = tonumber(body.seed) or 1,
        on_token = function(id)
          local text
          ids[#ids + 1] = id
          text, pending = split(pending .. tok:decode({id}), false)
          if text ~= "" then emit(text) end
        end,
      })
      if not gok then
        -- Anything but a shard failure (the client went away and the
        -- stream was cancelled) goes on as it was.
        if type(err) ~= "table" or err.kind ~= "ShardGroupError" then error(err, 0) end
        -- The group tore itself down; the next request builds a new one.
        local msg, kind = message(err)
        self.failures = self.failures + 1
        self.last_error = msg
        print("[serve_split] generation failed: " .. msg)
        if sse then
          send({error = msg, kind = kind or "error"})
          return
        end
        send("\n[error: " .. msg .. "]\n")
        error(msg, 0)
      end
      emit((split(pending, true)))
      if sse then send("[DONE]") end
    end, {sse = sse})
  end,
}

serve.run({Split})
