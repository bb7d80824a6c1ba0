-- Failure handling: TaskError with the remote traceback, worker crashes and
-- retries (WorkerCrashedError), actor deaths and restarts (ActorDiedError),
-- GetTimeoutError, TaskCancelledError (queued, running, force).
local t = dofile("tests/lua/harness.lua")
local tide = require("tide")
tide.init({num_cpus = 2})

-- Counts attempts: tasks call c:hit() once per run.
local Counter = tide.actor({
  init = function(self) self.n = 0 end,
  hit = function(self) self.n = self.n + 1; return self.n end,
  get = function(self) return self.n end,
})

local slow = tide.remote(function(s) tide.sleep(s or 60); return "slept" end)
local noop = tide.remote(function() return "alive" end)

local function kind_of(fn)
  local ok, err = pcall(fn)
  if ok then return nil end
  return type(err) == "table" and err.kind or ("non-table error: " .. tostring(err)), err
end

t.test("a task that raises gives a TaskError with message and remote traceback", function()
  local f = tide.remote(function(x)
    local function inner_helper() error("boom: " .. x) end
    inner_helper()
  end)
  local err = t.raises(function() tide.get(f:remote("abc")) end)
  t.eq(type(err), "table", "error should be a table")
  t.eq(err.kind, "TaskError")
  t.ok(tostring(err.message):find("boom: abc", 1, true), "message lacks the error text: " .. tostring(err.message))
  t.ok(type(err.traceback) == "string" and err.traceback:find("inner_helper", 1, true),
    "remote traceback lacks the function name: " .. tostring(err.traceback))
  t.ok(err.traceback:find("failures_test.lua:", 1, true), "remote traceback lacks file:line")
  local s = tostring(err)
  t.ok(s:find("TaskError", 1, true) and s:find("boom: abc", 1, true), "tostring(err) not readable: " .. s)
  t.ok(not s:find("^table: "), "tostring(err) is a bare table address")
end)

t.test("the error message carries the remote file:line", function()
  local f = tide.remote(function() local x = nil; return x.field end)
  local err = t.raises(function() tide.get(f:remote()) end, "TaskError")
  t.ok(tostring(err.message):find("failures_test.lua:%d+"), "no file:line in " .. tostring(err.message))
  t.ok(tostring(err.message):find("index", 1, true), "message lost the Lua error: " .. tostring(err.message))
end)

t.test("a failed task's error propagates to a task that depends on it", function()
  local bad = tide.remote(function() error("upstream-failure") end)
  local use = tide.remote(function(x) return x end)
  local err = t.raises(function() tide.get(use:remote(bad:remote()), {timeout = 30}) end, "upstream%-failure")
  t.eq(err.kind, "TaskError")
end)

t.test("an error in a nested task reaches the driver through the outer task", function()
  local inner = tide.remote(function() error("inner-failure") end)
  local outer = tide.remote(function() return tide.get(inner:remote()) end)
  local err = t.raises(function() tide.get(outer:remote(), {timeout = 30}) end, "inner%-failure")
  t.eq(err.kind, "TaskError")
end)

t.test("a TaskError is not retried by default", function()
  local c = Counter:remote()
  local f = tide.remote({max_retries = 3}, function(c) tide.get(c:hit()); error("no retry") end)
  t.raises(function() tide.get(f:remote(c), {timeout = 30}) end, "no retry")
  t.eq(tide.get(c:get()), 1)
end)

t.test("retry_exceptions = true retries a task that raises", function()
  local c = Counter:remote()
  local f = tide.remote({max_retries = 2, retry_exceptions = true}, function(c)
    tide.get(c:hit()); error("retried")
  end)
  t.raises(function() tide.get(f:remote(c), {timeout = 30}) end, "retried")
  t.eq(tide.get(c:get()), 3, "1 attempt + 2 retries expected")
end)

t.test("os.exit in a task: retried max_retries times, then WorkerCrashedError", function()
  local c = Counter:remote()
  local f = tide.remote({max_retries = 2}, function(c) tide.get(c:hit()); os.exit(1) end)
  local k, err = kind_of(function() tide.get(f:remote(c), {timeout = 60}) end)
  t.eq(k, "WorkerCrashedError")
  t.ok(tostring(err):find("WorkerCrashedError", 1, true), "tostring lacks the kind")
  t.eq(tide.get(c:get()), 3, "1 attempt + 2 retries expected")
end)

t.test("default max_retries is 3", function()
  local c = Counter:remote()
  local f = tide.remote(function(c) tide.get(c:hit()); os.exit(2) end)
  t.eq(kind_of(function() tide.get(f:remote(c), {timeout = 60}) end), "WorkerCrashedError")
  t.eq(tide.get(c:get()), 4)
end)

t.test("a segfault in a task is a WorkerCrashedError (max_retries = 0: one attempt)", function()
  local c = Counter:remote()
  local f = tide.remote({max_retries = 0}, function(c)
    tide.get(c:hit())
    require("ffi").cast("int*", 0)[0] = 1
  end)
  local k, err = kind_of(function() tide.get(f:remote(c), {timeout = 60}) end)
  t.eq(k, "WorkerCrashedError")
  t.eq(tide.get(c:get()), 1)
end)

t.test("a task that crashes once succeeds on its retry", function()
  local c = Counter:remote()
  local f = tide.remote(function(c)
    if tide.get(c:hit()) == 1 then os.exit(3) end
    return "recovered"
  end)
  t.eq(tide.get(f:remote(c), {timeout = 60}), "recovered")
  t.eq(tide.get(c:get()), 2)
end)

t.test("the cluster keeps working after crashes, with all CPUs back", function()
  local f = tide.remote({max_retries = 0}, function() os.exit(1) end)
  for _ = 1, 3 do pcall(tide.get, f:remote(), {timeout = 60}) end
  local refs = {}
  for i = 1, 10 do refs[i] = noop:remote() end
  local vals = tide.get(refs, {timeout = 60})
  t.eq(vals[10], "alive")
  t.eq(tide.available_resources().CPU, tide.cluster_resources().CPU)
end)

t.test("an actor whose init raises: calls give ActorDiedError naming the cause", function()
  local A = tide.actor({init = function(self) error("bad-init-cause") end, m = function(self) return 1 end})
  local a = A:remote()
  local err = t.raises(function() tide.get(a:m(), {timeout = 30}) end, "bad%-init%-cause")
  t.eq(err.kind, "ActorDiedError")
end)

t.test("an error in an actor method is a TaskError with the method in the traceback", function()
  local A = tide.actor({
    init = function(self) end,
    explode = function(self) local function deep_in_method() error("method-error") end deep_in_method() end,
  })
  local err = t.raises(function() tide.get(A:remote():explode(), {timeout = 30}) end, "method%-error")
  t.eq(err.kind, "TaskError")
  t.ok(tostring(err.traceback):find("deep_in_method", 1, true), "traceback lacks the method's frames")
end)

local Fragile = tide.actor({
  init = function(self, c) self.inits = tide.get(c:hit()) end,
  inits = function(self) return self.inits end,
  crash_first = function(self, c2) if tide.get(c2:hit()) == 1 then os.exit(1) end; return "ok after retry" end,
  die = function(self) os.exit(1) end,
})

t.test("actor restarts up to max_restarts (init rerun each time), then ActorDiedError", function()
  local c = Counter:remote()
  local f = Fragile:options({max_restarts = 2}):remote(c)
  t.eq(tide.get(f:inits()), 1)
  for restart = 1, 2 do
    t.eq(kind_of(function() tide.get(f:die(), {timeout = 30}) end), "ActorDiedError")
    t.eq(tide.get(f:inits(), {timeout = 30}), restart + 1, "init not rerun on restart " .. restart)
  end
  t.eq(kind_of(function() tide.get(f:die(), {timeout = 30}) end), "ActorDiedError")
  local k, err = kind_of(function() tide.get(f:inits(), {timeout = 30}) end)
  t.eq(k, "ActorDiedError", "actor should be dead after max_restarts")
  t.eq(tide.get(c:get()), 3, "init should have run 3 times")
end)

t.test("max_task_retries: a call that hit the crash is retried on the restarted actor", function()
  local c, c2 = Counter:remote(), Counter:remote()
  local f = Fragile:options({max_restarts = 1, max_task_retries = 1}):remote(c)
  t.eq(tide.get(f:crash_first(c2), {timeout = 30}), "ok after retry")
  t.eq(tide.get(c2:get()), 2)
end)

t.test("a killed actor gives ActorDiedError to calls and tasks using it", function()
  local c = Counter:remote()
  tide.get(c:hit())
  tide.kill(c)
  t.eq(kind_of(function() tide.get(c:get(), {timeout = 30}) end), "ActorDiedError")
  local use = tide.remote(function(h) return tide.get(h:get()) end)
  local err = t.raises(function() tide.get(use:remote(c), {timeout = 30}) end, "ActorDiedError")
end)

t.test("GetTimeoutError: kind, readable text; the value is still got later", function()
  local r = slow:remote(1)
  local k, err = kind_of(function() tide.get(r, {timeout = 0.05}) end)
  t.eq(k, "GetTimeoutError")
  t.ok(tostring(err):find("GetTimeoutError", 1, true), "tostring lacks the kind: " .. tostring(err))
  t.eq(tide.get(r, {timeout = 60}), "slept")
end)

t.test("cancel a running task (interruptible sleep): TaskCancelledError", function()
  local r = slow:remote(60)
  tide.wait({r}, {timeout = 0.3})
  tide.cancel(r)
  local k, err = kind_of(function() tide.get(r, {timeout = 30}) end)
  t.eq(k, "TaskCancelledError")
  t.ok(tostring(err):find("TaskCancelledError", 1, true), "tostring lacks the kind")
end)

t.test("force-cancel a busy-looping task: TaskCancelledError, no retry, CPU freed", function()
  local c = Counter:remote()
  local spin = tide.remote(function(c)
    tide.get(c:hit())
    local x = 0
    while true do x = x + 1 end
  end)
  local r = spin:remote(c)
  -- wait until it is running
  for _ = 1, 100 do if tide.get(c:get()) > 0 then break end tide.sleep(0.05) end
  tide.cancel(r, {force = true})
  t.eq(kind_of(function() tide.get(r, {timeout = 30}) end), "TaskCancelledError")
  t.eq(tide.get(noop:remote(), {timeout = 30}), "alive")
  t.eq(tide.get(c:get()), 1, "a force-cancelled task must not be retried")
  t.eq(tide.available_resources().CPU, tide.cluster_resources().CPU)
end)

t.test("cancel a queued task (not started): TaskCancelledError, it never runs", function()
  local c = Counter:remote()
  local blockers = {slow:remote(2), slow:remote(2)}   -- hold both CPUs
  tide.wait(blockers, {timeout = 0.3})
  local mark = tide.remote(function(c) tide.get(c:hit()); return "ran" end)
  local q = mark:remote(c)
  tide.cancel(q)
  local k = kind_of(function() tide.get(q, {timeout = 30}) end)
  tide.get(blockers, {timeout = 60})
  tide.get(noop:remote())
  t.eq(k, "TaskCancelledError")
  t.eq(tide.get(c:get()), 0, "the cancelled task ran")
end)

t.test("a task depending on a cancelled task gets TaskCancelledError", function()
  local r = slow:remote(60)
  local use = tide.remote(function(x) return x end)
  local d = use:remote(r)
  tide.cancel(r, {force = true})
  t.eq(kind_of(function() tide.get(d, {timeout = 30}) end), "TaskCancelledError")
end)

t.test("a streaming task that fails mid-stream: earlier items intact, then TaskError", function()
  local g = tide.remote({num_returns = "streaming"}, function()
    tide.yield("one"); tide.yield("two"); error("mid-stream")
  end)
  local gen = g:remote()
  t.eq(tide.get(gen:next()), "one")
  t.eq(tide.get(gen:next()), "two")
  local ok, r = pcall(gen.next, gen)
  local err
  if ok and r then
    err = t.raises(function() tide.get(r) end, "mid%-stream")
  else
    err = r
    t.ok(tostring(err):find("mid-stream", 1, true), "error lost: " .. tostring(err))
  end
  t.eq(err.kind, "TaskError")
end)

t.local_test("a worker that dies gives back the refs a request to the node handed it", function()
  -- A placement group's ready object reaches its maker in an RPC reply.
  local function objects()
    collectgarbage()
    tide.get(tide.remote(function() return 0 end):remote())  -- dropped refs reach the node
    return tide.stats().objects
  end
  local K = tide.actor({
    make = function(self)
      self.pg = tide.placement_group({{CPU = 0.01}})
      tide.get(self.pg:ready())
      return io.open("/proc/self/stat"):read("*a"):match("^(%d+)")
    end,
  })
  local k = K:options({max_restarts = 0}):remote()
  local before = objects()
  local pid = tide.get(k:make())
  os.execute("kill -9 " .. pid)
  local n
  for _ = 1, 100 do
    n = objects()
    if n <= before then break end
    tide.sleep(0.05)
  end
  t.eq(n, before, "objects left behind by the dead actor")
end)

t.done()
