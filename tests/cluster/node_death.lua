-- Kills node-1 (its daemon, kill -9) in the middle of work: the running
-- task is retried elsewhere, an actor with restarts left comes back on
-- another node, one without restarts fails with ActorDiedError, an object
-- only node-1 had, whose task may not run again (max_retries = 0), is lost,
-- and a placement group bundle it held is placed again on a live node.
local t = dofile("tests/lua/harness.lua")
local tide = require("tide")
local pidfile = assert(os.getenv("NODE1_PID_FILE"))

t.test("node-1 dies: its work runs again elsewhere, its actors restart or die", function()
  local A = tide.actor({
    init = function(s) s.n = 0 end,
    hit = function(s) s.n = s.n + 1; return tide.get_runtime_context().node_id end,
  })
  local on1 = {node_id = "node-1", soft = true}
  -- A ref to an object still being made on node-1, held on the head; its
  -- task allows no retry, so it is not made again (tests/cluster/lineage.lua
  -- has the other case).
  local mk = tide.remote(function()
    local inner = tide.remote({num_cpus = 0, max_retries = 0}, function() os.execute("sleep 30"); return 1 end)
    return {inner:remote()}
  end)
  local box = tide.get(mk:options({scheduling_strategy = {node_id = "node-1"}}):remote())
  local keep = A:options({max_restarts = 1, scheduling_strategy = on1}):remote()
  local lose = A:options({max_restarts = 0, scheduling_strategy = on1}):remote()
  t.eq(tide.get(keep:hit()), "node-1")
  t.eq(tide.get(lose:hit()), "node-1")
  -- A placement group with a bundle on each node (the head has no CPU).
  local pg = tide.placement_group({{CPU = 1}, {CPU = 1}}, {strategy = "SPREAD"})
  t.eq(tide.get(pg:ready(), {timeout = 10}), true)
  local where = tide.remote(function() return tide.get_runtime_context().node_id end)
  local in_bundle = function(b)
    return tide.get(where:options({placement_group = pg, bundle_index = b, num_cpus = 1}):remote(), {timeout = 30})
  end
  local before = {in_bundle(1), in_bundle(2)}
  t.ok(before[1] ~= before[2], "SPREAD bundles share a node")
  local lost = before[1] == "node-1" and 1 or 2
  local slow = tide.remote(function()
    os.execute("sleep 2")
    return tide.get_runtime_context().node_id
  end)
  local r = slow:options({scheduling_strategy = on1, num_cpus = 0, max_retries = 2}):remote()
  tide.sleep(0.5)
  local t0 = os.time()
  os.execute("kill -9 $(cat " .. pidfile .. ")")
  local again = tide.get(r, {timeout = 30})
  t.ok(again ~= "node-1", "the task ran again on " .. again)
  local back = tide.get(keep:hit(), {timeout = 30})
  t.ok(back ~= "node-1", "the actor came back on " .. back)
  io.write(string.format("# node death to actor restarted elsewhere: %d s (whole seconds)\n", os.time() - t0))
  t.raises(function() tide.get(lose:hit(), {timeout = 30}) end, "ActorDiedError")
  t.eq(#tide.nodes(), 2)
  t.raises(function() tide.get(box[1], {timeout = 30}) end, "ObjectLostError")
  t.eq(in_bundle(lost), "node-2", "the lost bundle was placed again")
  tide.remove_placement_group(pg)
end)

t.done()
