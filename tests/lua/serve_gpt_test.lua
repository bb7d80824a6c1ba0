-- The GPT served with streamed tokens (examples/serve_gpt.lua's deployment
-- on an untrained model): tokens arrive one chunk at a time, the stream
-- carries as many tokens as asked for, and SSE frames them as events.
local t = dofile("tests/lua/harness.lua")
local tide = require("tide")
tide.init({num_cpus = 2})
local serve = require("tide.serve")
local PORT = 18340

-- The example's deployment, with a checkpoint path that does not exist.
arg = {"/nonexistent/ckpt.safetensors"}
local run = serve.run
local app
serve.run = function(a) app = a end
dofile("examples/serve_gpt.lua")
serve.run = run
serve.run(app, {port = PORT, blocking = false})

local client = tide.remote(function(port, body)
  if not package.path:find("tests/lua/", 1, true) then package.path = "tests/lua/?.lua;" .. package.path end
  local httpc = require("httpc")
  local r = httpc.post(port, "/generate", {body = body, headers = {["Content-Type"] = "application/json"},
    timeout = 60})
  return {status = r.status, body = r.body, chunks = r.chunks and #r.chunks or 0,
    ctype = r.headers and r.headers["content-type"]}
end)

local function await(ref)
  for _ = 1, 3000 do
    serve.poll(0.02)
    if #tide.wait({ref}, {timeout = 0}) == 1 then return tide.get(ref) end
  end
  error("the client did not finish")
end

t.test("tokens stream as chunks, as many as asked for", function()
  local r = await(client:remote(PORT, '{"prompt": "And God said, ", "max_tokens": 20, "seed": 3}'))
  t.eq(r.status, 200)
  t.eq(#r.body, 20, "one byte per generated token")
  t.ok(r.chunks >= 20, "each token is its own chunk (got " .. tostring(r.chunks) .. ")")
end)

t.test("SSE frames each token as an event", function()
  local r = await(client:remote(PORT, '{"prompt": "In the beginning", "max_tokens": 5, "sse": true}'))
  t.eq(r.status, 200)
  t.ok(tostring(r.ctype):find("text/event-stream", 1, true), tostring(r.ctype))
  local events = 0
  for _ in r.body:gmatch("data: ") do events = events + 1 end
  t.eq(events, 5)
end)

t.test("an empty prompt is a 400", function()
  local r = await(client:remote(PORT, '{"prompt": ""}'))
  t.eq(r.status, 400)
end)

serve.shutdown()
t.done()
