-- A large result is lost with the node that made it: the node dies after
-- the task returned, while the head is still fetching the result in chunks
-- (or, if timing differs, before): the task runs again elsewhere and the
-- driver gets the value whole.
local t = dofile("tests/lua/harness.lua")
local tide = require("tide")

-- Waits until the head no longer lists node `target` (dead); returns
-- whether it went within `tries` tenths of a second.
local function gone(target, tries)
  for _ = 1, tries do
    local alive = false
    for _, n in ipairs(tide.nodes()) do alive = alive or n.node_id == target end
    if not alive then return true end
    tide.sleep(0.1)
  end
  return false
end

t.test("a result lost with its node is made again by running its task elsewhere", function()
  local target
  for _, n in ipairs(tide.nodes()) do if n.name == "lineage-node" then target = n.node_id end end
  t.ok(target, "no node named lineage-node")
  local marker = os.tmpname()
  os.remove(marker)
  local make = tide.remote(function(m, mib)
    local f = io.open(m, "r")
    if not f then
      -- First run: this node dies 1.5 s from now (its daemon is this
      -- worker's parent), after the value below has been returned.
      io.open(m, "w"):close()
      local st = io.open("/proc/self/stat"):read("*a")
      local ppid = st:match("^%d+ %b() %S+ (%d+)")
      os.execute("(sleep 1.5; kill -9 " .. ppid .. ") >/dev/null 2>&1 &")
    else
      f:close()
    end
    return string.rep("L", mib * 1048576 - 4) .. "tail"
  end)
  local v = make:options({max_retries = 3, scheduling_strategy = {node_id = target, soft = true}}):remote(marker, 256)
  local s = tide.get(v, {timeout = 120})
  t.eq(#s, 256 * 1048576)
  t.eq(s:sub(-4), "tail")
  -- The node dies 1.5 s after its first run returned, whether or not the
  -- value was still on its way then (which run delivered it is timing).
  t.ok(gone(target, 100), "the node that made it first died")
  os.remove(marker)
end)

t.test("the objects a node's own task made (two returns, from a ref argument) are made again, by one run, when that node dies first", function()
  local target
  for _, n in ipairs(tide.nodes()) do if n.name == "nested-node" then target = n.node_id end end
  t.ok(target, "no node named nested-node")
  local runs = os.tmpname()
  -- The inner task runs on the outer one's node (it fits there: the outer
  -- one takes no CPU), writes where it ran and is still running when that
  -- node dies; only the node had its task.
  local inner = tide.remote(function(log, data, n)
    local f = io.open(log, "a")
    f:write(tide.get_runtime_context().node_id, "\n")
    f:close()
    tide.sleep(3)
    return string.rep("n", n) .. data .. "end", #data
  end)
  -- Its argument is a ref to an object the driver put: the head holds it
  -- for the spec it keeps, so the second run still has it.
  local data = tide.put("DATA")
  local outer = tide.remote(function(log, box)
    local r, len = inner:options({num_returns = 2}):remote(log, box[1], 5000)
    -- This node dies 1 s from now (its daemon is this worker's parent).
    local st = io.open("/proc/self/stat"):read("*a")
    os.execute("(sleep 1; kill -9 " .. st:match("^%d+ %b() %S+ (%d+)") .. ") >/dev/null 2>&1 &")
    return {r, len}
  end)
  local box = tide.get(outer:options({num_cpus = 0, scheduling_strategy = {node_id = target, soft = false}})
    :remote(runs, {data}), {timeout = 60})
  data = nil -- luacheck: ignore 311
  collectgarbage()
  -- Wait until the head has seen the node die: only then is the value asked for.
  t.ok(gone(target, 150), "nested-node did not die")
  local v = tide.get(box[1], {timeout = 60})
  t.eq(#v, 5007)
  t.eq(v:sub(-7), "DATAend")
  t.eq(tide.get(box[2], {timeout = 60}), 4, "its second return, made by the same run")
  local where = {}
  for line in io.lines(runs) do where[#where + 1] = line end
  os.remove(runs)
  t.eq(#where, 2, "the inner task ran twice (once again for both returns)")
  t.eq(where[1], target)
  t.ok(where[2] ~= target, "the second run was on another node")
end)

t.done()
