-- A minimal tide.serve endpoint with two replicas, and a token stream.
--
--   bin/tide serve run --port 8000 examples/serve_echo.lua
--   curl -s -d '{"hello": "world"}' http://127.0.0.1:8000/echo
--   curl -sN http://127.0.0.1:8000/tokens?text=streamed+one+word+at+a+time
--   curl -s http://127.0.0.1:8000/-/routes
local tide = require("tide")
local serve = require("tide.serve")

local Echo = serve.deployment{
  name = "echo", route = "/echo", num_replicas = 2,
  init = function(self) self.served = 0 end,
  call = function(self, req)
    self.served = self.served + 1
    return {
      method = req.method, path = req.path, query = req.query, json = req.json,
      replica = tide.get_runtime_context().actor_id, served_by_this_replica = self.served,
    }
  end,
}

-- Server-Sent Events, one word per event, as a model would send tokens.
local Tokens = serve.deployment{
  name = "tokens", route = "/tokens",
  call = function(self, req)
    local text = req.query.text or "hello from tide serve"
    return serve.stream(function(send)
      for word in text:gmatch("%S+") do
        send({token = word})
        tide.sleep(0.1)
      end
      send("[DONE]")
    end, {sse = true})
  end,
}

serve.run({Echo, Tokens})
