-- The GPT served with streamed tokens (examples/serve_gpt.lua's deployment
-- on an untrained model): text arrives as it is made, every chunk valid
-- UTF-8 (byte tokens of one character go out together), and SSE frames
-- each piece as one JSON event, so a newline token cannot break a frame.
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
  local list = {}
  for i, c in ipairs(r.chunks or {}) do list[i] = c.data end
  return {status = r.status, body = r.body, chunk_list = list,
    ctype = r.headers and r.headers["content-type"]}
end)

local function await(ref)
  for _ = 1, 3000 do
    serve.poll(0.02)
    if #tide.wait({ref}, {timeout = 0}) == 1 then return tide.get(ref) end
  end
  error("the client did not finish")
end

-- Strict UTF-8 (no overlongs, surrogates or code points past U+10FFFF).
local function valid_utf8(s)
  local i, n = 1, #s
  while i <= n do
    local c = s:byte(i)
    local len, lo, hi = 0, 0x80, 0xBF
    if c < 0x80 then len = 1
    elseif c >= 0xC2 and c <= 0xDF then len = 2
    elseif c >= 0xE0 and c <= 0xEF then len = 3; lo = c == 0xE0 and 0xA0 or 0x80; hi = c == 0xED and 0x9F or 0xBF
    elseif c >= 0xF0 and c <= 0xF4 then len = 4; lo = c == 0xF0 and 0x90 or 0x80; hi = c == 0xF4 and 0x8F or 0xBF
    else return false end
    for j = 1, len - 1 do
      local b = s:byte(i + j)
      if not b or b < (j == 1 and lo or 0x80) or b > (j == 1 and hi or 0xBF) then return false end
    end
    i = i + len
  end
  return true
end

t.test("tokens stream as chunks, each one valid UTF-8", function()
  -- An untrained byte-level model makes bytes above 0x7F often: sent one
  -- token per chunk, they split characters or are not UTF-8 at all.
  local r = await(client:remote(PORT, '{"prompt": "And God said, ", "max_tokens": 60, "seed": 3}'))
  t.eq(r.status, 200)
  t.ok(tostring(r.ctype):find("charset=utf-8", 1, true), tostring(r.ctype))
  t.ok(#r.chunk_list >= 2 and #r.chunk_list <= 60,
    "at most one chunk per token, streamed in several (got " .. #r.chunk_list .. ")")
  for i, c in ipairs(r.chunk_list) do
    if not valid_utf8(c) then t.ok(false, "chunk " .. i .. " is not valid UTF-8: " .. c:gsub(".", function(x)
      return string.format("%02x", x:byte()) end)) return end
  end
  t.ok(valid_utf8(r.body), "the body is valid UTF-8")
end)

t.test("SSE sends each piece as one JSON event, then [DONE]", function()
  local r = await(client:remote(PORT, '{"prompt": "In the beginning", "max_tokens": 40, "sse": true, "seed": 5}'))
  t.eq(r.status, 200)
  t.ok(tostring(r.ctype):find("text/event-stream", 1, true), tostring(r.ctype))
  local cjson = require("cjson")
  local events, text, done = 0, {}, false
  for ev in r.body:gmatch("(.-)\n\n") do
    t.ok(not ev:find("\n", 1, true), "one data line per event: " .. ev)
    local data = ev:match("^data: (.*)$")
    if data == "[DONE]" then done = true
    else
      local v = cjson.decode(data)
      events = events + 1
      text[#text + 1] = v.token
    end
  end
  t.ok(done, "the stream ends with data: [DONE]")
  t.ok(events >= 1 and events <= 40, "at most one event per token (got " .. events .. ")")
  t.ok(valid_utf8(table.concat(text)), "the tokens' text is valid UTF-8")
end)

t.test("an empty prompt is a 400", function()
  local r = await(client:remote(PORT, '{"prompt": ""}'))
  t.eq(r.status, 400)
end)

serve.shutdown()
t.done()
