-- The contracts between C and Lua: the codes tide.core exports by name
-- (core.STATUS, core.STRATEGY, core.PG_STRATEGY, from the C tables in
-- lua/core.h, engine/proto.h and engine/node.h) and the table of control
-- operations (td__rpc_table in lua/core_driver.c) that a worker's calls go
-- through, by the driver and by a worker.
local t = dofile("tests/lua/harness.lua")
local tide = require("tide")
local core = require("tide.core")
tide.init({num_cpus = 2})

-- The names a table must have, each an integer, no two alike.
local function names(tbl, want)
  t.ok(type(tbl) == "table", "expected a table of codes")
  local seen, n = {}, 0
  for k, v in pairs(tbl) do
    t.ok(type(k) == "string" and type(v) == "number" and v % 1 == 0, "code " .. tostring(k) .. " is not an integer")
    t.ok(not seen[v], "two names for code " .. v)
    seen[v], n = true, n + 1
  end
  for _, k in ipairs(want) do t.ok(tbl[k] ~= nil, "missing name " .. k) end
  t.eq(n, #want, "number of names")
end

t.test("core exports the status, strategy and placement-group codes by name", function()
  names(core.STATUS, {"OK", "ERROR", "TIMEOUT", "CANCELLED", "RAISED"})
  names(core.STRATEGY, {"DEFAULT", "SPREAD", "NODE", "NODE_SOFT"})
  names(core.PG_STRATEGY, {"PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"})
  t.eq(core.STATUS.OK, 0, "OK is the status a value comes with")
end)

t.test("a worker's tide.core has the same codes", function()
  local f = tide.remote(function()
    local c = require("tide.core")
    return {c.STATUS, c.STRATEGY, c.PG_STRATEGY}
  end)
  local got = tide.get(f:remote())
  t.deep_eq(got[1], core.STATUS, "STATUS")
  t.deep_eq(got[2], core.STRATEGY, "STRATEGY")
  t.deep_eq(got[3], core.PG_STRATEGY, "PG_STRATEGY")
end)

t.test("get statuses reach tide.get as errors: timeout, task error", function()
  local slow = tide.remote(function() tide.sleep(30) end)
  local r = slow:remote()
  t.raises(function() tide.get(r, {timeout = 0.05}) end, "GetTimeoutError")
  t.raises(function() tide.get({r}, {timeout = 0.05}) end, "GetTimeoutError")
  local _, te = pcall(tide.get, r, {timeout = 0})
  t.eq(te.traceback, "") -- made by the engine, as the error table's contract says
  tide.cancel(r, {force = true})
  t.raises(function() tide.get(r) end, "Cancel")
  local bad = tide.remote(function() error("boom") end)
  t.raises(function() tide.get(bad:remote()) end, "boom")
end)

t.test("a waiting task that is cancelled raises TaskCancelledError", function()
  local inner = tide.remote(function() tide.sleep(30) end)
  local outer = tide.remote(function()
    local ok, e = pcall(tide.get, inner:remote())
    return tostring(e)
  end)
  local r = outer:remote()
  tide.sleep(0.5)
  tide.cancel(r)
  -- The task sees the cancel in its tide.get (core.STATUS.CANCELLED).
  local ok, v = pcall(tide.get, r)
  t.ok(tostring(v):find("TaskCancelledError", 1, true), "got " .. tostring(v) .. " (ok " .. tostring(ok) .. ")")
end)

t.test("scheduling strategies by name: SPREAD and node affinity", function()
  local f = tide.remote(function() return tide.get_runtime_context().node_id end)
  t.eq(tide.get(f:options({scheduling_strategy = "SPREAD"}):remote()), "node-0")
  local here = tide.get_runtime_context().node_id
  t.eq(tide.get(f:options({scheduling_strategy = {node_id = here}}):remote()), here)
  t.eq(tide.get(f:options({scheduling_strategy = {node_id = here, soft = true}}):remote()), here)
  t.raises(function() f:options({scheduling_strategy = "FASTEST"}) end, "scheduling_strategy")
end)

t.test("a placement group with every strategy name, from the driver and a worker", function()
  local run = tide.remote(function() return "ran" end)
  for name in pairs(core.PG_STRATEGY) do
    local pg = tide.placement_group({{CPU = 0.25}}, {strategy = name, name = "contracts-" .. name})
    t.ok(pg:wait(10), name .. " group not ready")
    t.eq(pg.strategy, name)
    t.eq(tide.get_placement_group("contracts-" .. name).strategy, name, "looked up by name")
    t.eq(tide.get(run:options({placement_group = pg, num_cpus = 0.25}):remote()), "ran")
    tide.remove_placement_group(pg)
  end
  local inworker = tide.remote(function(name)
    local pg = require("tide").placement_group({{CPU = 0.1}}, {strategy = name})
    local ok = pg:wait(10)
    require("tide").remove_placement_group(pg)  -- a cast: sent without waiting
    return ok
  end)
  for name in pairs(core.PG_STRATEGY) do t.ok(tide.get(inworker:remote(name)), name .. " in a worker") end
  local err = t.raises(function() tide.placement_group({{CPU = 1}}, {strategy = "CLUMP"}) end, "strategy must be")
  for name in pairs(core.PG_STRATEGY) do t.ok(tostring(err):find(name, 1, true), "message names " .. name) end
end)

t.test("core.pg_create refuses a code that is no strategy", function()
  t.raises(function() core.pg_create({{CPU = 1}}, 99, "", false) end, "PG_STRATEGY")
end)

t.test("control ops from a worker go through the op table", function()
  local f = tide.remote(function()
    local c = require("tide.core")
    local out = {}
    out.unknown = select(2, pcall(c.call_node, "no_such_op", 1))
    out.raw = select(2, pcall(c.call_node, "register", "x"))
    out.put = c.call_node("kv_put", "contracts:k", {1, 2, 3})
    out.get = c.call_node("kv_get", "contracts:k")
    out.del = c.call_node("kv_del", "contracts:k")
    out.gone = c.call_node("kv_get", "contracts:k")
    out.cpus = c.resources(false).CPU
    out.by_name = c.call_node("resources", false).CPU
    out.actor = c.get_actor("contracts-nobody", "")
    return out
  end)
  local out = tide.get(f:remote())
  t.ok(tostring(out.unknown):find("unknown operation no_such_op", 1, true), tostring(out.unknown))
  t.ok(tostring(out.raw):find("unknown operation register", 1, true), tostring(out.raw))
  t.eq(out.put, true)
  t.deep_eq(out.get, {1, 2, 3})
  t.eq(out.del, true)
  t.eq(out.gone, nil)
  t.eq(out.cpus, tide.cluster_resources().CPU)
  t.eq(out.by_name, out.cpus)
  t.eq(out.actor, nil)
end)

t.test("get_actor and kill from a worker", function()
  local A = tide.actor({hi = function() return "hi" end})
  local a = A:options({name = "contracts-a"}):remote()
  t.eq(tide.get(a:hi()), "hi")
  local f = tide.remote(function()
    local h = tide.get_actor("contracts-a")
    local r = tide.get(h:hi())
    tide.kill(h)
    return r
  end)
  t.eq(tide.get(f:remote()), "hi")
  t.raises(function() tide.get(a:hi(), {timeout = 10}) end, "Actor")
end)

t.done()
