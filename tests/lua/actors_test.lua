-- Actors: constructor, ordered calls, named actors and namespaces, get_actor,
-- kill, max_concurrency through coroutines, restarts, handles passed to tasks
-- and actors, os.exit isolation in shared processes, many actors.
local t = dofile("tests/lua/harness.lua")
local tide = require("tide")
tide.init({num_cpus = 2})

local Counter = tide.actor({
  init = function(self, start) self.n = start or 0 end,
  incr = function(self, k) self.n = self.n + (k or 1); return self.n end,
  get = function(self) return self.n end,
  pid = function(self) return tide.get_runtime_context().pid end,
  ctx = function(self) return tide.get_runtime_context() end,
  exit = function(self) os.exit(1) end,
  segv = function(self) require("ffi").cast("int*", 0)[0] = 1 end,
  fail = function(self, msg) error(msg) end,
})

local Log = tide.actor({
  init = function(self) self.items = {} end,
  append = function(self, x)
    -- uneven work per call, so reordering would show
    if x % 7 == 0 then local s = 0; for i = 1, 20000 do s = s + i end end
    self.items[#self.items + 1] = x
    return #self.items
  end,
  items_ = function(self) return self.items end,
})

local slow = tide.remote(function() tide.sleep(60); return "gate" end)

t.test("init runs with the constructor arguments and state persists", function()
  local c = Counter:remote(10)
  t.eq(tide.get(c:incr(5)), 15)
  t.eq(tide.get(c:incr()), 16)
  t.eq(tide.get(c:get()), 16)
end)

t.test("an actor's runtime context names the actor", function()
  local c = Counter:remote()
  local ctx = tide.get(c:ctx())
  t.ok(ctx.actor_id ~= nil, "actor_id missing in an actor's context")
  t.ok(ctx.pid ~= tide.get_runtime_context().pid, "actor runs in the driver process")
  t.eq(tide.get_runtime_context().actor_id, nil, "the driver should have no actor_id")
end)

t.test("calls from one caller run in submission order", function()
  local log = Log:remote()
  local refs = {}
  for i = 1, 300 do refs[i] = log:append(i) end
  local lens = tide.get(refs)
  for i = 1, 300 do t.eq(lens[i], i) end
  local items = tide.get(log:items_())
  for i = 1, 300 do t.eq(items[i], i) end
end)

t.test("calls from several callers each keep their own order", function()
  local log = Log:remote()
  local send = tide.remote(function(h, base)
    local refs = {}
    for i = 1, 100 do refs[i] = h:append(base + i) end
    tide.get(refs)
    return true
  end)
  tide.get({send:remote(log, 1000), send:remote(log, 2000), send:remote(log, 3000)}, {timeout = 60})
  local items = tide.get(log:items_())
  t.eq(#items, 300)
  local last = {}
  for _, x in ipairs(items) do
    local caller = math.floor(x / 1000)
    t.ok((last[caller] or 0) < x, "caller " .. caller .. " out of order at " .. x)
    last[caller] = x
  end
end)

t.test("several actors of one class keep separate state", function()
  local cs = {}
  for i = 1, 6 do cs[i] = Counter:remote(i * 100) end
  for i = 1, 6 do cs[i]:incr(i) end
  for i = 1, 6 do t.eq(tide.get(cs[i]:get()), i * 100 + i) end
end)

t.test("an error in a method is a TaskError and the actor stays alive", function()
  local c = Counter:remote(1)
  local err = t.raises(function() tide.get(c:fail("boom-in-method")) end, "boom%-in%-method")
  t.eq(err.kind, "TaskError")
  t.eq(tide.get(c:incr()), 2, "state lost after a method error")
end)

t.test("calling a method the actor does not have raises naming it", function()
  local c = Counter:remote()
  t.raises(function() tide.get(c:no_such_method(1)) end, "no_such_method")
  t.eq(tide.get(c:incr()), 1, "actor broken after a bad method call")
end)

t.test("named actor: get_actor returns a handle to the same actor", function()
  local c = Counter:options({name = "counter-a"}):remote(0)
  tide.get(c:incr(3))
  local h = tide.get_actor("counter-a")
  t.eq(tide.get(h:incr(1)), 4)
  t.eq(tide.get(c:get()), 4)
end)

t.test("get_actor works inside a task", function()
  Counter:options({name = "counter-b", namespace = "tasks"}):remote(50)
  local f = tide.remote(function()
    local h = tide.get_actor("counter-b", {namespace = "tasks"})
    return tide.get(h:incr(1))
  end)
  t.eq(tide.get(f:remote()), 51)
end)

t.test("namespaces: one name in two namespaces is two actors", function()
  local a = Counter:options({name = "same", namespace = "ns1"}):remote(1)
  local b = Counter:options({name = "same", namespace = "ns2"}):remote(2)
  tide.get({a:get(), b:get()})
  t.eq(tide.get(tide.get_actor("same", {namespace = "ns1"}):get()), 1)
  t.eq(tide.get(tide.get_actor("same", {namespace = "ns2"}):get()), 2)
  t.raises(function() tide.get_actor("same", {namespace = "ns3"}) end, "same")
  t.raises(function() tide.get_actor("same") end, "same")
end)

t.test("a second actor with a taken name raises; get_if_exists returns it", function()
  local a = Counter:options({name = "dup", namespace = "d"}):remote(7)
  tide.get(a:get())
  t.raises(function() Counter:options({name = "dup", namespace = "d"}):remote(8) end, "dup")
  local b = Counter:options({name = "dup", namespace = "d", get_if_exists = true}):remote(9)
  t.eq(tide.get(b:get()), 7)
end)

t.test("get_actor of an unknown name raises naming it", function()
  t.raises(function() tide.get_actor("nobody-here") end, "nobody%-here")
end)

t.test("detached lifetime is accepted", function()
  local a = Counter:options({name = "det", namespace = "d2", lifetime = "detached"}):remote(3)
  t.eq(tide.get(a:incr()), 4)
  tide.kill(a)
end)

t.test("kill: later calls raise ActorDiedError and the name is released", function()
  local c = Counter:options({name = "to-kill", max_restarts = 3}):remote(1)
  t.eq(tide.get(c:incr()), 2)
  tide.kill(c)
  local err = t.raises(function() tide.get(c:incr(), {timeout = 30}) end, "ActorDiedError")
  t.eq(err.kind, "ActorDiedError")
  t.raises(function() tide.get_actor("to-kill") end, "to%-kill")
  -- The released name is free for a new actor, which get_actor then finds.
  local d = Counter:options({name = "to-kill"}):remote(40)
  t.eq(tide.get(tide.get_actor("to-kill"):incr()), 41)
  t.eq(tide.get(d:incr()), 42)
end)

t.test("kill with calls in flight: every pending call gets ActorDiedError", function()
  local Waiter = tide.actor({
    init = function(self) end,
    wait_on = function(self, box) return tide.get(box[1]) end,
  })
  local w = Waiter:remote()
  local g = slow:remote()
  local refs = {}
  for i = 1, 5 do refs[i] = w:wait_on({g}) end
  tide.wait({refs[1]}, {timeout = 0.3})
  tide.kill(w)
  local kinds = {}
  for i = 1, 5 do
    local ok, err = pcall(tide.get, refs[i], {timeout = 30})
    kinds[i] = ok and "ok" or (type(err) == "table" and err.kind or tostring(err))
  end
  tide.cancel(g, {force = true})
  for i = 1, 5 do t.eq(kinds[i], "ActorDiedError", "pending call " .. i) end
end)

t.test("kill with no_restart = false restarts the actor with init rerun", function()
  local c = Counter:options({max_restarts = 1}):remote(10)
  t.eq(tide.get(c:incr(5)), 15)
  tide.kill(c, {no_restart = false})
  local v = tide.get(c:incr(1), {timeout = 30})
  t.eq(v, 11, "state after restart should come from a fresh init")
end)

t.test("max_concurrency = 2: a call waiting on a ref lets a second call finish", function()
  local Waiter = tide.actor({
    init = function(self) end,
    wait_on = function(self, box) return tide.get(box[1]) end,
    quick = function(self) return "quick" end,
  })
  local w = Waiter:options({max_concurrency = 2}):remote()
  local g = slow:remote()
  local r1 = w:wait_on({g})
  local r2 = w:quick()
  local ok, v = pcall(tide.get, r2, {timeout = 30})
  local ready = tide.wait({r1}, {timeout = 0})
  tide.cancel(g, {force = true})     -- release the gate before asserting
  t.ok(ok, "second call did not finish while the first waited: " .. tostring(v))
  t.eq(v, "quick")
  t.eq(#ready, 0, "the waiting call finished before its gate")
  t.raises(function() tide.get(r1, {timeout = 30}) end)
  t.eq(tide.get(w:quick(), {timeout = 30}), "quick")
end)

t.test("max_concurrency = 1 (default): a second call waits for the first", function()
  local Waiter = tide.actor({
    init = function(self) end,
    wait_on = function(self, box) return tide.get(box[1]) end,
    quick = function(self) return "quick" end,
  })
  local w = Waiter:remote()
  local g = slow:remote()
  local r1 = w:wait_on({g})
  local r2 = w:quick()
  local ready = tide.wait({r2}, {timeout = 0.5})
  tide.cancel(g, {force = true})     -- release the gate before asserting
  pcall(tide.get, r1, {timeout = 30})
  t.eq(#ready, 0, "second call ran while the first was still running")
  t.eq(tide.get(r2, {timeout = 30}), "quick")
end)

t.test("max_concurrency = 3: three calls overlap (all wait on one gate)", function()
  local Gated = tide.actor({
    init = function(self) self.inside = 0; self.peak = 0 end,
    enter = function(self, box)
      self.inside = self.inside + 1
      if self.inside > self.peak then self.peak = self.inside end
      local ok = pcall(tide.get, box[1])
      self.inside = self.inside - 1
      return self.peak
    end,
    peak = function(self) return self.peak end,
  })
  local a = Gated:options({max_concurrency = 3}):remote()
  local gate = tide.remote(function() tide.sleep(0.5); return 1 end):remote()
  local refs = {a:enter({gate}), a:enter({gate}), a:enter({gate})}
  tide.get(refs, {timeout = 30})
  t.eq(tide.get(a:peak()), 3)
end)

t.test("os.exit in an actor: ActorDiedError, restarted with init rerun", function()
  local c = Counter:options({max_restarts = 1}):remote(5)
  t.eq(tide.get(c:incr()), 6)
  local err = t.raises(function() tide.get(c:exit(), {timeout = 30}) end, "ActorDiedError")
  t.eq(err.kind, "ActorDiedError")
  t.eq(tide.get(c:incr(), {timeout = 30}), 6, "restarted actor should start from init(5)")
  -- no restarts left: dies for good
  t.raises(function() tide.get(c:exit(), {timeout = 30}) end, "ActorDiedError")
  t.raises(function() tide.get(c:incr(), {timeout = 30}) end, "ActorDiedError")
end)

t.test("max_restarts = 0: the actor stays dead after os.exit", function()
  local c = Counter:remote(1)
  t.raises(function() tide.get(c:exit(), {timeout = 30}) end, "ActorDiedError")
  local err = t.raises(function() tide.get(c:incr(), {timeout = 30}) end, "ActorDiedError")
  t.eq(err.kind, "ActorDiedError")
end)

-- Creates an actor with opts_a, then actors with opts_b until one shares
-- its worker process; returns both handles, the pid and their init values.
local function same_process_pair(class, opts_a, opts_b)
  local firsts = {}
  for i = 1, 4 do
    local h = class:options(opts_a):remote(i)
    firsts[tide.get(h:pid(), {timeout = 30})] = {h = h, i = i}
  end
  for i = 101, 116 do
    local h = class:options(opts_b):remote(i)
    local pid = tide.get(h:pid(), {timeout = 30})
    if firsts[pid] then return firsts[pid].h, h, pid, firsts[pid].i, i end
  end
end

t.test("lightweight actors share worker processes", function()
  local pids, n = {}, 0
  local hs = {}
  for i = 1, 20 do hs[i] = Counter:remote(i) end
  for i = 1, 20 do
    local pid = tide.get(hs[i]:pid(), {timeout = 30})
    if not pids[pid] then pids[pid] = true; n = n + 1 end
  end
  t.ok(n < 20, "20 actors used 20 processes; expected sharing")
end)

t.test("os.exit ends only that actor; others in its process keep working", function()
  local bystander, victim, pid, bi, vi = same_process_pair(Counter, {}, {})
  t.ok(victim, "could not find two actors sharing a process")
  tide.get(bystander:incr(1000))
  t.raises(function() tide.get(victim:exit(), {timeout = 30}) end, "ActorDiedError")
  t.eq(tide.get(bystander:get(), {timeout = 30}), bi + 1000, "bystander lost its state")
  t.eq(tide.get(bystander:pid()), pid, "bystander's process changed")
end)

t.test("a crash of a shared process restarts each actor under its own max_restarts", function()
  local keep, lose, pid, ki, li = same_process_pair(Counter, {max_restarts = 1}, {max_restarts = 0})
  t.ok(keep, "could not find two actors sharing a process")
  tide.get({keep:incr(100), lose:incr(100)})
  -- crash the shared process from outside (SIGKILL), as a native crash would
  os.execute("kill -9 " .. pid)
  -- the actor without restarts dies; once that is seen, the crash is known
  t.raises(function() tide.get(lose:get(), {timeout = 30}) end, "ActorDiedError")
  t.raises(function() tide.get(lose:get(), {timeout = 30}) end, "ActorDiedError")
  t.eq(tide.get(keep:get(), {timeout = 30}), ki, "actor with a restart left should be back with init state")
  t.ok(tide.get(keep:pid(), {timeout = 30}) ~= pid, "restarted actor still reports the dead pid")
end)

t.test("the ffi module works inside an actor", function()
  local F = tide.actor({
    init = function(self) end,
    size = function(self) return tonumber(require("ffi").sizeof("int32_t")) end,
  })
  t.eq(tide.get(F:remote():size()), 4)
end)

t.test("a handle passed to a task calls the same actor", function()
  local c = Counter:remote(0)
  local bump = tide.remote(function(h, k) return tide.get(h:incr(k)) end)
  tide.get({bump:remote(c, 1), bump:remote(c, 2), bump:remote(c, 3)})
  t.eq(tide.get(c:get()), 6)
end)

t.test("a handle passed to another actor calls the same actor", function()
  local c = Counter:remote(0)
  local Proxy = tide.actor({
    init = function(self, target) self.target = target end,
    forward = function(self, k) return tide.get(self.target:incr(k)) end,
  })
  local p = Proxy:remote(c)
  t.eq(tide.get(p:forward(5)), 5)
  t.eq(tide.get(p:forward(5)), 10)
  t.eq(tide.get(c:get()), 10)
end)

t.test("an actor creates and calls another actor", function()
  local Maker = tide.actor({
    init = function(self) end,
    make = function(self, n)
      local h = Counter:remote(n)
      return tide.get(h:incr(1))
    end,
  })
  local m = Maker:remote()
  t.eq(tide.get(m:make(41), {timeout = 30}), 42)
end)

t.test("250 actors created and called", function()
  local hs = {}
  for i = 1, 250 do hs[i] = Counter:remote(i) end
  local refs = {}
  for i = 1, 250 do refs[i] = hs[i]:incr(i) end
  local vals = tide.get(refs, {timeout = 120})
  local bad = 0
  for i = 1, 250 do if vals[i] ~= 2 * i then bad = bad + 1 end end
  t.eq(bad, 0, "actors with a wrong result")
  t.ok(tide.stats().workers < 50, "250 lightweight actors used " .. tide.stats().workers .. " workers")
end)

t.done()
