-- Kills node-1 (its daemon, kill -9) in the middle of work: the running
-- task is retried elsewhere, an actor with restarts left comes back on
-- another node, one without restarts fails with ActorDiedError.
local t = dofile("tests/lua/harness.lua")
local tide = require("tide")
local pidfile = assert(os.getenv("NODE1_PID_FILE"))

t.test("node-1 dies: its task runs again elsewhere, its actors restart or die", function()
  local A = tide.actor({
    init = function(s) s.n = 0 end,
    hit = function(s) s.n = s.n + 1; return tide.get_runtime_context().node_id end,
  })
  local on1 = {scheduling_strategy = {node_id = "node-1", soft = true}}
  -- A ref to an object still being made on node-1, held on the head.
  local mk = tide.remote(function()
    local inner = tide.remote({num_cpus = 0}, function() os.execute("sleep 30"); return 1 end)
    return {inner:remote()}
  end)
  local box = tide.get(mk:options({scheduling_strategy = {node_id = "node-1"}}):remote())
  local keep = A:options({max_restarts = 1, scheduling_strategy = on1.scheduling_strategy, num_cpus = 1}):remote()
  local lose = A:options({max_restarts = 0, scheduling_strategy = on1.scheduling_strategy}):remote()
  t.eq(tide.get(keep:hit()), "node-1")
  t.eq(tide.get(lose:hit()), "node-1")
  local slow = tide.remote(function()
    os.execute("sleep 2")
    return tide.get_runtime_context().node_id
  end)
  local r = slow:options({scheduling_strategy = on1.scheduling_strategy, max_retries = 2}):remote()
  tide.sleep(0.5)
  local t0 = os.time()
  os.execute("kill -9 $(cat " .. pidfile .. ")")
  t.eq(tide.get(r, {timeout = 30}), "node-2")
  t.eq(tide.get(keep:hit(), {timeout = 30}), "node-2")
  local t1 = os.time()
  io.write(string.format("# node death to actor restarted elsewhere: %d s (whole seconds)\n", t1 - t0))
  t.raises(function() tide.get(lose:hit(), {timeout = 30}) end, "ActorDiedError")
  t.eq(#tide.nodes(), 2)
  t.raises(function() tide.get(box[1], {timeout = 30}) end, "ObjectLostError")
end)

t.done()
