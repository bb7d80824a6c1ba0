-- What the serve suites share: an HTTP client (tests/lua/httpc.lua) running
-- in tasks while the driver keeps the ingress served with serve.poll.
--   local sc = dofile("tests/lua/serve_client.lua")
local tide = require("tide")
local serve = require("tide.serve")
local M = {}

-- A remote function that runs fn(httpc, ...) in a task.
function M.client(fn)
  return tide.remote(function(...)
    if not package.path:find("tests/lua/", 1, true) then
      package.path = "tests/lua/?.lua;" .. package.path
    end
    return fn(require("httpc"), ...)
  end)
end

-- Inside a client task: one GET per path, each on a connection of its
-- own, all sent before any answer is read (so they are in flight at
-- once); the responses, in the paths' order.
function M.at_once(httpc, port, paths, read_opts)
  local cs = {}
  for i, path in ipairs(paths) do
    cs[i] = httpc.connect(port)
    cs[i]:send_raw(httpc.format_request("GET", path))
  end
  local out = {}
  for i = 1, #cs do out[i] = cs[i]:read_response(read_opts); cs[i]:close() end
  return out
end

-- Waits for refs (one or a list) while serving and running the controller.
function M.await(refs, timeout)
  local single = tide.is_ref(refs)
  if single then refs = {refs} end
  local deadline = os.time() + (timeout or 60)
  while true do
    serve.poll(0.02)
    local ready = tide.wait(refs, {num_returns = #refs, timeout = 0})
    if #ready == #refs then break end
    if os.time() > deadline then error("client tasks did not finish in time") end
  end
  local out = tide.get(refs)
  if single then return out[1] end
  return out
end

-- run(fn, ...): fn(httpc, port, ...) in a task, awaited.
function M.runner(port)
  return function(fn, ...) return M.await(M.client(fn):remote(port, ...)) end
end

return M
