-- Serves the tiny GPT behind HTTP with its tokens streamed as they are made.
--
--   bin/tide run examples/train_tiny_gpt.lua     # writes /tmp/tide_tiny_gpt.safetensors
--   bin/tide serve run examples/serve_gpt.lua [CHECKPOINT]
--   curl -N -d '{"prompt": "And God said, ", "max_tokens": 120}' localhost:8000/generate
--   curl -N -d '{"prompt": "In the beginning", "sse": true}' localhost:8000/generate
--
-- Plain responses stream the text (every chunk valid UTF-8: a character
-- made of several byte tokens goes out whole); SSE sends one event per
-- piece, data: {"token": "..."}, then data: [DONE].
--
-- Without a checkpoint it serves an untrained model (random bytes), so the
-- plumbing can be tried before training.
local serve = require("tide.serve")

-- The tokenizer is byte-level: a character outside ASCII takes several
-- tokens, and an untrained model makes byte sequences that are not UTF-8
-- at all; tokenizer.utf8_split keeps every chunk sent valid UTF-8.
local utf8_split = require("tide.nn.tokenizer").utf8_split

local ckpt = (arg and arg[1]) or ((os.getenv("TMPDIR") or "/tmp") .. "/tide_tiny_gpt.safetensors")

local Generate = serve.deployment{
  name = "gpt", route = "/generate", num_replicas = 1, max_ongoing_requests = 8,
  init = function(self)
    local GPT = require("tide.nn.gpt")
    self.tok = require("tide.nn.tokenizer").byte_level()
    local f = io.open(ckpt, "rb")
    if f then
      f:close()
      self.model = GPT.load(ckpt)
    else
      self.model = GPT.new({vocab_size = self.tok.vocab_size, n_layer = 2, n_head = 2, n_embd = 64,
        block_size = 64}, {seed = 1})
    end
  end,
  call = function(self, req)
    local body = req.json or {}
    local prompt = self.tok:encode(type(body.prompt) == "string" and body.prompt or "And God said, ")
    if #prompt == 0 then return serve.response{status = 400, body = {error = "empty prompt"}} end
    local n = math.max(1, math.min(tonumber(body.max_tokens) or 100, 1000))
    local tok, model = self.tok, self.model
    local sse = body.sse == true
    return serve.stream(function(send)
      -- Plain: the text itself. SSE: one JSON event per piece of text,
      -- {"token": "..."}, so a newline is escaped inside the event.
      local function emit(text)
        if text ~= "" then send(sse and {token = text} or text) end
      end
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
      if sse then send("[DONE]") end
    end, {sse = sse})
  end,
}

serve.run({Generate})
