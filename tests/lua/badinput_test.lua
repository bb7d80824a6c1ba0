-- Bad input gets a clear error, never a crash or a hang: non-refs to get,
-- unknown option keys and wrong option types (naming the key), values that
-- cannot be sent (naming the type and where they sit), cyclic tables.
local t = dofile("tests/lua/harness.lua")
local tide = require("tide")
tide.init({num_cpus = 2})

local count = tide.remote(function(...) return select("#", ...) end)
local echo = tide.remote(function(x) return x end)
local Echo = tide.actor({init = function(self, x) end, m = function(self, ...) return select("#", ...) end})

-- The error is raised at the caller's line, not inside the library.
local function here(err)
  local m = tostring(err)
  return m:find("^[^\n]*badinput_test.lua:%d+:") ~= nil and not m:find("stdlib/tide", 1, true)
end

t.test("tide.get(42) raises naming the type", function()
  local err = t.raises(function() tide.get(42) end, "number")
  t.ok(tostring(err):find("ObjectRef", 1, true), "message should say an ObjectRef was expected")
  t.ok(here(err), "error not reported at the caller's line: " .. tostring(err))
end)

t.test("tide.get of a string, nil, or a plain table element raises naming the type", function()
  t.raises(function() tide.get("ref") end, "string")
  t.raises(function() tide.get(nil) end, "nil")
  t.raises(function() tide.get({tide.put(1), 5}) end, "element 2 is a number")
  t.raises(function() tide.get({tide.put(1), {}}) end, "element 2 is a table")
end)

t.test("tide.get of a generator explains to iterate it", function()
  local g = tide.remote({num_returns = "streaming"}, function() tide.yield(1) end)
  t.raises(function() tide.get(g:remote()) end, "generator")
end)

t.test("tide.get with a non-number timeout names the timeout", function()
  t.raises(function() tide.get(tide.put(1), {timeout = "soon"}) end, "timeout")
end)

t.test("unknown option keys raise naming the key (remote, options, actor)", function()
  local err = t.raises(function() tide.remote({num_cpu = 1}, function() end) end, "num_cpu")
  t.ok(here(err), "error not at the caller's line: " .. tostring(err))
  t.raises(function() count:options({bogus_key = 1}) end, "bogus_key")
  t.raises(function() tide.actor({m = function() end}, {max_restart = 1}) end, "max_restart")
  t.raises(function() Echo:options({lifetme = "detached"}) end, "lifetme")
  t.raises(function() tide.init({num_gpu = 1}) end, "num_gpu")
  t.raises(function() tide.placement_group({{CPU = 1}}, {nam = "x"}) end, "unknown option 'nam' %(did you mean 'name'%?%)")
end)

t.test("retry counts are whole numbers, -1 for unlimited", function()
  t.raises(function() tide.remote({max_retries = -2}, function() end) end, "'max_retries' must be a whole number")
  t.raises(function() count:options({max_retries = 1.5}) end, "'max_retries' must be a whole number")
  t.raises(function() tide.actor({m = function() end}, {max_restarts = -3}) end, "'max_restarts' must be a whole")
  t.ok(pcall(count.options, count, {max_retries = -1}), "-1 (unlimited) is refused")
end)

t.test("wrong option types raise naming the key and the types", function()
  local err = t.raises(function() tide.remote({num_cpus = "two"}, function() end) end, "num_cpus")
  t.ok(tostring(err):find("number", 1, true) and tostring(err):find("string", 1, true),
    "message should name the wanted and the given type: " .. tostring(err))
  t.raises(function() count:options({max_retries = "3"}) end, "max_retries")
  t.raises(function() count:options({resources = 5}) end, "resources")
  t.raises(function() count:options({resources = {A = "x"}}) end, "resources")
  t.raises(function() Echo:options({max_concurrency = "x"}) end, "max_concurrency")
  t.raises(function() Echo:options({name = 5}) end, "name")
  t.raises(function() count:options({runtime_env = {env_vars = {A = "1"}, pip = {}}}) end, "pip")
end)

t.test("bad option values raise naming the key", function()
  t.raises(function() count:options({num_cpus = -1}) end, "num_cpus")
  t.raises(function() count:options({num_returns = 0}) end, "num_returns")
  t.raises(function() count:options({num_returns = "many"}) end, "num_returns")
  t.raises(function() count:options({scheduling_strategy = "FASTEST"}) end, "scheduling_strategy")
  t.raises(function() Echo:options({max_concurrency = 0}) end, "max_concurrency")
  t.raises(function() Echo:options({lifetime = "forever"}) end, "lifetime")
end)

t.test("a coroutine argument raises naming the type and the argument", function()
  local err = t.raises(function() count:remote(1, coroutine.create(function() end)) end, "coroutine")
  t.ok(tostring(err):find("argument 2", 1, true), "argument position missing: " .. tostring(err))
  t.ok(here(err), "error not at the caller's line: " .. tostring(err))
end)

t.test("a C function nested in a table names the field path", function()
  local err = t.raises(function() count:remote(1, {cfg = {cb = print}}) end, "C function")
  t.ok(tostring(err):find('argument 2, field "cfg.cb"', 1, true), "location missing: " .. tostring(err))
end)

t.test("userdata and cdata arguments raise naming the type", function()
  t.raises(function() count:remote(io.stdout) end, "userdata")
  local err = t.raises(function() count:remote(1, 2, {a = {b = io.stdout}}) end, "userdata")
  t.ok(tostring(err):find('argument 3, field "a.b"', 1, true), "location missing: " .. tostring(err))
  t.raises(function() count:remote(require("ffi").new("int[2]")) end, "cdata")
end)

t.test("tide.put of an unsendable value names it", function()
  local err = t.raises(function() tide.put({x = coroutine.create(print)}) end, 'coroutine.*field "x"')
  t.ok(here(err), "error not (only) at the caller's line: " .. tostring(err))
end)

t.test("actor call and constructor arguments are checked too, at the caller's line", function()
  local h = Echo:remote()
  local err = t.raises(function() h:m(1, coroutine.create(print)) end, "coroutine")
  t.ok(tostring(err):find("argument 2", 1, true), "position missing: " .. tostring(err))
  t.ok(here(err), "call error not at the caller's line: " .. tostring(err))
  err = t.raises(function() Echo:remote(io.stdout) end, "userdata")
  t.ok(here(err), "constructor error not at the caller's line: " .. tostring(err))
  t.eq(tide.get(h:m(1, 2, 3)), 3, "actor unusable after a rejected call")
end)

t.test("a remote function capturing an unsendable upvalue raises at tide.remote", function()
  local co = coroutine.create(print)
  local err = t.raises(function() tide.remote(function() return co end) end, "coroutine")
  t.ok(here(err), "error not (only) at the caller's line: " .. tostring(err))
end)

t.test("a task returning an unsendable value gives a TaskError naming it", function()
  local f = tide.remote(function() return {h = coroutine.create(print)} end)
  local err = t.raises(function() tide.get(f:remote(), {timeout = 30}) end, "coroutine")
  t.eq(err.kind, "TaskError")
end)

t.test("cyclic tables are sent with their cycles preserved", function()
  local cyc = {name = "root"}
  cyc.self = cyc
  cyc.kids = {{parent = cyc}, {parent = cyc}}
  cyc.kids[1].sibling = cyc.kids[2]
  local check = tide.remote(function(x)
    return {x.self == x, x.kids[1].parent == x, x.kids[2].parent == x, x.kids[1].sibling == x.kids[2], x.name}
  end)
  t.deep_eq(tide.get(check:remote(cyc), {timeout = 30}), {true, true, true, true, "root"})
  local back = tide.get(tide.put(cyc))
  t.ok(back.self == back and back.kids[1].parent == back, "cycle lost through put/get")
end)

t.test("a table shared twice in one value stays one table", function()
  local shared = {v = 1}
  local check = tide.remote(function(t2) return t2[1] == t2[2] end)
  t.eq(tide.get(check:remote({shared, shared})), true)
end)

t.test("a very deeply nested table raises clearly instead of crashing", function()
  local deep = {}
  local cur = deep
  for _ = 1, 100000 do cur.n = {}; cur = cur.n end
  t.raises(function() echo:remote(deep) end, "deep")
  t.eq(tide.get(echo:remote("still fine")), "still fine")
end)

t.test("tables with non-string keys round-trip", function()
  local v = tide.get(echo:remote({[true] = "b", [2.5] = "f", [-1] = "neg", [1] = "one"}))
  t.eq(v[true], "b"); t.eq(v[2.5], "f"); t.eq(v[-1], "neg"); t.eq(v[1], "one")
end)

t.test("bad arguments to other API functions name what is wrong", function()
  t.raises(function() tide.remote(42) end, "function")
  t.raises(function() tide.remote({}) end, "function")
  t.raises(function() tide.wait(5) end, "ObjectRef")
  t.raises(function() tide.wait({1}) end, "element 1")
  t.raises(function() tide.wait({tide.put(1)}, {num_returns = 2}) end, "num_returns")
  t.raises(function() tide.cancel(5) end, "ObjectRef")
  t.raises(function() tide.kill(5) end, "ActorHandle")
  t.raises(function() tide.actor(5) end, "table")
  t.raises(function() tide.actor({init = 5}) end, "init")
  t.raises(function() tide.get_actor(5) end, "name")
  t.raises(function() tide.put(tide.put(1)) end, "ObjectRef")
  t.raises(function() tide.placement_group({}) end, "bundles")
  t.raises(function() tide.placement_group({{CPU = "1"}}) end, "bundle 1")
  t.raises(function() tide.placement_group({{CPU = 1}}, {strategy = "CLUMP"}) end, "strategy")
  t.raises(function() tide.remove_placement_group({}) end, "placement group")
  t.raises(function() tide.sleep("1") end, "seconds")
end)

t.test("tide.init after the cluster started raises clearly", function()
  t.raises(function() tide.init({num_cpus = 1}) end, "already")
end)

t.test("a task needing more CPUs than the cluster has fails clearly instead of hanging", function()
  local big = tide.remote({num_cpus = 1000}, function() return 1 end)
  local ok, err = pcall(function() return tide.get(big:remote(), {timeout = 10}) end)
  t.ok(not ok, "an infeasible task ran")
  t.ok(type(err) == "table" and err.kind ~= "GetTimeoutError",
    "an infeasible task hangs (got " .. tostring(err) .. ")")
  t.ok(tostring(err):find("CPU", 1, true), "error should name the resource: " .. tostring(err))
end)

t.test("an unknown custom resource fails clearly instead of hanging", function()
  local f = tide.remote({resources = {NoSuchThing = 1}}, function() return 1 end)
  local ok, err = pcall(function() return tide.get(f:remote(), {timeout = 10}) end)
  t.ok(not ok, "a task needing an absent resource ran")
  t.ok(type(err) == "table" and err.kind ~= "GetTimeoutError",
    "an infeasible task hangs (got " .. tostring(err) .. ")")
  t.ok(tostring(err):find("NoSuchThing", 1, true), "error should name the resource: " .. tostring(err))
end)

t.test("f.remote(x) (a dot for the colon) says to write f:remote(x), at the caller's line", function()
  local err = t.raises(function() local r = echo.remote(3); return r end, "with a colon")
  t.ok(tostring(err):find("f:remote(...) with a colon", 1, true), tostring(err))
  t.ok(here(err), "error not reported at the caller's line: " .. tostring(err))
  err = t.raises(function() local r = Echo.remote(); return r end, "Class")
  t.ok(tostring(err):find("Class:remote(...) with a colon", 1, true) and here(err), tostring(err))
end)

t.test("calling a remote function or actor class directly says what to write instead", function()
  local err = t.raises(function() local r = echo(3); return r end, "f:remote")
  t.ok(here(err), "error not reported at the caller's line: " .. tostring(err))
  err = t.raises(function() local r = Echo(); return r end, "Class:remote")
  t.ok(here(err), "error not reported at the caller's line: " .. tostring(err))
end)

t.test("a misspelled actor method fails at the call with a suggestion; a.m(x) says to use a colon", function()
  local a = Echo:remote()
  local err = t.raises(function() local r = a:n(); return r end, "no method 'n'")
  t.ok(here(err), "error not reported at the caller's line: " .. tostring(err))
  err = t.raises(function() local r = a:mm(); return r end, "did you mean 'm'?")
  err = t.raises(function() local r = a.m(1, 2); return r end, "write actor:m%(%.%.%.%) with a colon")
  t.ok(here(err), "error not reported at the caller's line: " .. tostring(err))
  t.eq(tide.get(a:m(1, 2)), 2)
end)

t.test("a misspelled method of a handle found by name fails at tide.get with a suggestion", function()
  local W = tide.actor({hello = function() return "hi" end})
  local _keep = W:options({name = "badinput-named"}):remote()
  local h = tide.get_actor("badinput-named")
  local err = t.raises(function() return tide.get(h:helo()) end, "no method 'helo'")
  t.ok(tostring(err):find("did you mean 'hello'?", 1, true), tostring(err))
  t.eq(tide.get(h:hello()), "hi")
end)

t.test("an unknown option suggests the option meant", function()
  t.raises(function() tide.remote({num_cpu = 1}, function() end) end, "did you mean 'num_cpus'?")
  t.raises(function() Echo:options({max_restart = 1}) end, "did you mean 'max_restarts'?")
  local err = t.raises(function() tide.remote({zzzzzz = 1}, function() end) end, "unknown option 'zzzzzz'")
  t.ok(not tostring(err):find("did you mean", 1, true), "no suggestion expected: " .. tostring(err))
end)

t.test("the engine still works after all of the above", function()
  t.eq(tide.get(count:remote(1, 2, 3)), 3)
end)

t.done()
