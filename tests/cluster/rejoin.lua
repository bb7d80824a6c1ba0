-- Runs attached to the head of the small cluster of tests/sh/multinode_test.sh
-- (the head {CPU=1}, a node {A=1}, a node {B=1}). A node that dies may be
-- started again: work only it could run waits for it a while (before, a
-- task submitted in the gap failed at once as infeasible), and fails as
-- infeasible when no such node comes back in time.
local t = dofile("tests/lua/harness.lua")
local tide = require("tide")
local pidfile = assert(os.getenv("NODE_B_PID_FILE"))
local start_b = assert(os.getenv("NODE_B_START"))
local where = tide.remote(function() return tide.get_runtime_context().node_id end)

local function kill_b()
  local f = assert(io.open(pidfile))
  local pid = f:read("*n")
  f:close()
  os.execute("kill -9 " .. pid)
  for _ = 1, 200 do  -- until the head sees it gone
    if #tide.nodes() == 2 then return end
    tide.sleep(0.05)
  end
  error("the head still lists the node with B")
end

local function has(r)
  for _, nd in ipairs(tide.nodes()) do
    if (nd.resources[r] or 0) > 0 then return nd.node_id end
  end
end

t.test("a task needing B, submitted while the node with B is restarted, runs when it is back", function()
  kill_b()
  t.eq(has("B"), nil)
  local r = where:options({resources = {B = 1}}):remote()
  os.execute(start_b .. " >/dev/null 2>&1 &")
  local node = tide.get(r, {timeout = 60})
  t.eq(node, has("B"))
end)

t.test("a task needing what no node ever had still fails at once", function()
  local ok, err = pcall(tide.get, where:options({resources = {C = 1}}):remote(), {timeout = 5})
  t.ok(not ok and tostring(err):find("infeasible: it requires C = 1", 1, true), tostring(err))
end)

t.test("a task needing B fails as infeasible when no node with B comes back in time", function()
  kill_b()
  local ok, err = pcall(tide.get, where:options({resources = {B = 1}}):remote(), {timeout = 60})
  t.ok(not ok and tostring(err):find("infeasible: it requires B = 1", 1, true) and
    tostring(err):find("came back in time", 1, true), tostring(err))
  os.execute(start_b .. " >/dev/null 2>&1")
  for _ = 1, 200 do
    if has("B") then break end
    tide.sleep(0.05)
  end
  t.ok(has("B"), "the node with B rejoined")
end)

t.done()
