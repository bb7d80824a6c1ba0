-- Remote functions: arguments and returns (single, multiple, streaming),
-- closure capture (upvalues, globals, modules, other remote functions and
-- actor handles), nested tasks, refs as arguments, DAGs, options.
local t = dofile("tests/lua/harness.lua")
local tide = require("tide")
tide.init({num_cpus = 2})

t.test("a remote function runs and returns its value", function()
  local double = tide.remote(function(x) return x * 2 end)
  t.eq(tide.get(double:remote(21)), 42)
end)

t.test("the task runs in a worker process, not the driver", function()
  local pid = tide.remote(function() return tide.get_runtime_context().pid end)
  local wpid = tide.get(pid:remote())
  t.eq(type(wpid), "number")
  t.ok(wpid ~= tide.get_runtime_context().pid, "task pid equals driver pid")
end)

t.test("arguments of every plain type arrive intact, including nil holes", function()
  local echo = tide.remote(function(...)
    return {n = select("#", ...), ...}
  end)
  local v = tide.get(echo:remote(1, nil, "s", true, false, 2.5, -7, {a = {b = {1, 2, 3}}}, nil))
  t.eq(v.n, 9)
  t.eq(v[1], 1); t.eq(v[2], nil); t.eq(v[3], "s"); t.eq(v[4], true); t.eq(v[5], false)
  t.eq(v[6], 2.5); t.eq(v[7], -7); t.deep_eq(v[8], {a = {b = {1, 2, 3}}}); t.eq(v[9], nil)
end)

t.test("strings with embedded zeros and binary bytes round-trip", function()
  local s = "a\0b\255\1" .. string.rep("\0", 10)
  local echo = tide.remote(function(x) return x, #x end)
  t.eq(tide.get(echo:remote(s)), s)
end)

t.test("large numbers and special floats round-trip", function()
  local echo = tide.remote(function(x) return x end)
  t.eq(tide.get(echo:remote(2^53)), 2^53)
  t.eq(tide.get(echo:remote(-1e300)), -1e300)
  t.eq(tide.get(echo:remote(1 / 0)), 1 / 0)
  local nan = tide.get(echo:remote(0 / 0))
  t.ok(nan ~= nan, "NaN did not round-trip")
end)

t.test("nil and empty-table returns", function()
  local f = tide.remote(function() return nil end)
  t.eq(tide.get(f:remote()), nil)
  local g = tide.remote(function() return {} end)
  t.deep_eq(tide.get(g:remote()), {})
  local h = tide.remote(function() end)
  t.eq(tide.get(h:remote()), nil)
end)

t.test("num_returns = 3 gives three refs with the three values", function()
  local f = tide.remote({num_returns = 3}, function(x) return x, x + 1, {x + 2} end)
  local a, b, c = f:remote(10)
  t.ok(tide.is_ref(a) and tide.is_ref(b) and tide.is_ref(c), "expected three ObjectRefs")
  t.eq(tide.get(a), 10); t.eq(tide.get(b), 11); t.deep_eq(tide.get(c), {12})
end)

t.test("num_returns via options() and a single-return copy stays unchanged", function()
  local f = tide.remote(function() return 1, 2 end)
  local f2 = f:options({num_returns = 2})
  local a, b = f2:remote()
  t.eq(tide.get(a), 1); t.eq(tide.get(b), 2)
  local r, extra = f:remote()
  t.ok(tide.is_ref(r), "original should still return one ref")
  t.eq(extra, nil, "original should return exactly one ref")
  t.eq(tide.get(r), 1)
end)

t.test("streaming returns: next() yields refs in order, then nil", function()
  local gen_fn = tide.remote({num_returns = "streaming"}, function(n)
    for i = 1, n do tide.yield(i * i) end
  end)
  local gen = gen_fn:remote(5)
  local got = {}
  while true do
    local r = gen:next()
    if r == nil then break end
    t.ok(tide.is_ref(r), "generator item is not a ref")
    got[#got + 1] = tide.get(r)
  end
  t.deep_eq(got, {1, 4, 9, 16, 25})
  t.eq(gen:next(), nil, "exhausted generator should keep returning nil")
end)

t.test("streaming returns work in a for loop, including tables", function()
  local gen_fn = tide.remote({num_returns = "streaming"}, function(words)
    for i, w in ipairs(words) do tide.yield({i = i, w = w:upper()}) end
  end)
  local got = {}
  for ref in gen_fn:remote({"a", "b", "c"}) do got[#got + 1] = tide.get(ref) end
  t.deep_eq(got, {{i = 1, w = "A"}, {i = 2, w = "B"}, {i = 3, w = "C"}})
end)

t.test("a streaming task that yields nothing ends at once", function()
  local gen_fn = tide.remote({num_returns = "streaming"}, function() end)
  local n = 0
  for _ in gen_fn:remote() do n = n + 1 end
  t.eq(n, 0)
end)

t.test("streaming with options() on a plain remote function", function()
  local f = tide.remote(function(n) for i = 1, n do tide.yield(i) end end)
  local s = 0
  for ref in f:options({num_returns = "streaming"}):remote(100) do s = s + tide.get(ref) end
  t.eq(s, 5050)
end)

t.test("streaming is incremental: an item is available while the task still runs", function()
  local gate = tide.remote(function() tide.sleep(60); return "open" end)
  local producer = tide.remote({num_returns = "streaming"}, function(box)
    tide.yield("first")
    tide.yield(tide.get(box[1]))
  end)
  local g = gate:remote()
  local gen = producer:remote({g})
  local ok, r = pcall(gen.next, gen, 30)
  local v = ok and r and tide.get(r, {timeout = 30})
  tide.cancel(g, {force = true})
  t.ok(ok, "no item while the producer was blocked: " .. tostring(r))
  t.eq(v, "first")
  -- the producer now fails on the cancelled gate: the stream ends with an error
  t.ok(not pcall(function() local r2 = gen:next(30); if r2 then tide.get(r2, {timeout = 30}) end end),
    "expected the cancelled gate to fail the stream")
end)

t.test("generator next(timeout) raises GetTimeoutError when no item comes", function()
  local gate = tide.remote(function() tide.sleep(60); return "open" end)
  local producer = tide.remote({num_returns = "streaming"}, function(box) tide.yield(tide.get(box[1])) end)
  local g = gate:remote()
  local gen = producer:remote({g})
  local ok, err = pcall(gen.next, gen, 0.2)
  tide.cancel(g, {force = true})     -- ends the producer too
  t.ok(not ok, "next(0.2) returned while the producer was blocked")
  t.eq(type(err) == "table" and err.kind, "GetTimeoutError")
end)

t.test("tide.cancel of a task cancels the tasks it submitted too, unless recursive = false", function()
  local child = tide.remote(function() tide.sleep(60) return 1 end)
  -- A streaming parent hands its child's ref out, then waits on it.
  local parent = tide.remote({num_returns = "streaming"}, function()
    local c = child:remote()
    tide.yield({c})
    tide.yield(tide.get(c))
  end)
  local function child_after_cancel(opts)
    local gen = parent:remote()
    local c = tide.get(gen:next(30))[1]
    t.ok(tide.cancel(gen, opts), "cancel of the running parent")
    local ok, err = pcall(tide.get, c, {timeout = 1.5})
    if ok then return "done" end
    if err.kind ~= "TaskCancelledError" then tide.cancel(c, {force = true}) end
    return err.kind
  end
  t.eq(child_after_cancel({force = true}), "TaskCancelledError")
  t.eq(child_after_cancel(), "TaskCancelledError")  -- the parent stops at its wait; the child too
  t.eq(child_after_cancel({force = true, recursive = false}), "GetTimeoutError")
  local r = child:remote()
  t.raises(function() tide.cancel(r, {forse = true}) end, "unknown option 'forse'")
  t.raises(function() tide.cancel(r, {force = 1}) end, "option 'force' must be a boolean")
  t.raises(function() tide.cancel(r, true) end, "opts must be a table")
  t.raises(function() tide.cancel({}) end, "expected an ObjectRef or an ObjectRefGenerator")
  tide.cancel(r, {force = true})
end)

t.test("upvalues are captured by value when tide.remote is called", function()
  local base = 100
  local cfg = {scale = 3}
  local f = tide.remote(function(x) return base + x * cfg.scale end)
  base = 0; cfg.scale = 1000    -- later changes must not be seen
  t.eq(tide.get(f:remote(2)), 106)
end)

t.test("upvalue functions are captured and callable in the task", function()
  local function helper(x) return x .. "!" end
  local function twice(x) return helper(helper(x)) end
  local f = tide.remote(function(s) return twice(s) end)
  t.eq(tide.get(f:remote("hey")), "hey!!")
end)

GLOBAL_FACTOR = 7
function GLOBAL_HELPER(x) return x + 1 end
t.test("non-builtin globals the function reads are captured by value", function()
  local f = tide.remote(function(x) return GLOBAL_HELPER(x * GLOBAL_FACTOR) end)
  GLOBAL_FACTOR = 0
  t.eq(tide.get(f:remote(3)), 22)
  GLOBAL_FACTOR = 7
end)

t.test("builtins (string, math, table, ipairs) work inside tasks", function()
  local f = tide.remote(function(xs)
    local out = {}
    for _, x in ipairs(xs) do out[#out + 1] = string.format("%d", math.floor(x)) end
    table.sort(out)
    return table.concat(out, ",")
  end)
  t.eq(tide.get(f:remote({3.7, 1.2, 2.9})), "1,2,3")
end)

t.test("required modules are captured by name (cjson)", function()
  local cjson = require("cjson")
  local f = tide.remote(function(tbl) return cjson.encode(tbl) end)
  local s = tide.get(f:remote({a = 1}))
  t.eq(s, '{"a":1}')
end)

t.test("the tide module itself is usable in a task (tide.put/get inside)", function()
  local f = tide.remote(function(v)
    local r = tide.put(v * 2)
    return tide.get(r) + 1
  end)
  t.eq(tide.get(f:remote(20)), 41)
end)

t.test("a task calls another remote function captured as an upvalue", function()
  local sq = tide.remote(function(x) return x * x end)
  local sum_sq = tide.remote(function(n)
    local refs = {}
    for i = 1, n do refs[i] = sq:remote(i) end
    local vals = tide.get(refs)
    local s = 0
    for i = 1, vals.n do s = s + vals[i] end
    return s
  end)
  t.eq(tide.get(sum_sq:remote(10)), 385)
end)

t.test("nested tasks three levels deep", function()
  local leaf = tide.remote(function(x) return x + 1 end)
  local mid = tide.remote(function(x) return tide.get(leaf:remote(x)) * 10 end)
  local top = tide.remote(function(x) return tide.get(mid:remote(x)) + 5 end)
  t.eq(tide.get(top:remote(1)), 25)
end)

t.test("a remote function passed as an argument can be called by the task", function()
  local inc = tide.remote(function(x) return x + 1 end)
  local apply = tide.remote(function(rf, x) return tide.get(rf:remote(x)) end)
  t.eq(tide.get(apply:remote(inc, 41)), 42)
end)

t.test("a task returns a ref it created; the driver gets through it", function()
  local inner = tide.remote(function() return "deep" end)
  local outer = tide.remote(function() return inner:remote() end)
  local r = tide.get(outer:remote())
  t.ok(tide.is_ref(r), "expected the task to return an ObjectRef")
  t.eq(tide.get(r), "deep")
end)

t.test("top-level ref arguments are resolved to values", function()
  local kind = tide.remote(function(a, b) return {tide.is_ref(a), a, tide.is_ref(b), b} end)
  local p = tide.put({x = 1})
  local q = kind:remote(3)
  local v = tide.get(kind:remote(p, q))
  t.eq(v[1], false); t.deep_eq(v[2], {x = 1})
  t.eq(v[3], false); t.deep_eq(v[4], {false, 3, false})
end)

t.test("refs nested in tables stay refs and can be fetched inside", function()
  local f = tide.remote(function(box)
    local is = tide.is_ref(box.r) and tide.is_ref(box.list[2])
    return {is, tide.get(box.r) + tide.get(box.list[2])}
  end)
  local a = tide.put(40)
  local mk = tide.remote(function() return 2 end)
  local v = tide.get(f:remote({r = a, list = {"x", mk:remote()}}))
  t.eq(v[1], true, "nested refs should arrive as refs")
  t.eq(v[2], 42)
end)

t.test("a chain of tasks passes refs as dependencies", function()
  local inc = tide.remote(function(x) return x + 1 end)
  local r = tide.put(0)
  for _ = 1, 50 do r = inc:remote(r) end
  t.eq(tide.get(r), 50)
end)

t.test("tide.get of an array returns values in order with field n", function()
  local id = tide.remote(function(x) return x end)
  local refs = {}
  for i = 1, 20 do refs[i] = id:remote(i * 3) end
  local vals = tide.get(refs)
  t.eq(vals.n, 20)
  for i = 1, 20 do t.eq(vals[i], i * 3) end
  local empty = tide.get({})
  t.eq(empty.n, 0)
end)

t.test("tide.get of an array keeps nil values in place", function()
  local f = tide.remote(function(x) if x % 2 == 0 then return nil end return x end)
  local vals = tide.get({f:remote(1), f:remote(2), f:remote(3)})
  t.eq(vals.n, 3); t.eq(vals[1], 1); t.eq(vals[2], nil); t.eq(vals[3], 3)
end)

t.test("1000 tasks all return the right values", function()
  local f = tide.remote(function(i) return i * 2 + 1 end)
  local refs = {}
  for i = 1, 1000 do refs[i] = f:remote(i) end
  local vals = tide.get(refs)
  local bad = 0
  for i = 1, 1000 do if vals[i] ~= i * 2 + 1 then bad = bad + 1 end end
  t.eq(bad, 0)
end)

t.test("short tasks are not queued behind a long task while a CPU is free", function()
  local long = tide.remote(function() tide.sleep(60); return "long" end)
  local quick = tide.remote(function(i) return i end)
  local l = long:remote()
  local refs = {}
  for i = 1, 20 do refs[i] = quick:remote(i) end
  -- with 2 CPUs and one held by `long`, all 20 can finish long before it ends
  local ready = tide.wait(refs, {num_returns = 20, timeout = 20})
  tide.cancel(l, {force = true})
  t.eq(#ready, 20, "quick tasks waited behind the long task")
end)

t.test("DAG: bind/execute with nodes as arguments", function()
  local add = tide.remote(function(a, b) return a + b end)
  local mul = tide.remote(function(a, b) return a * b end)
  local x = add:bind(1, 2)             -- 3
  local y = mul:bind(x, 4)             -- 12
  local z = add:bind(y, x)             -- 15
  local r = z:execute()
  t.ok(tide.is_ref(r), "execute should return an ObjectRef")
  t.eq(tide.get(r), 15)
end)

t.test("DAG: a shared node runs once per execute", function()
  local counter = tide.actor({
    init = function(self) self.n = 0 end,
    hit = function(self) self.n = self.n + 1; return self.n end,
    count = function(self) return self.n end,
  }):remote()
  local hit = tide.remote(function(c) return tide.get(c:hit()) end)
  local add = tide.remote(function(a, b) return a + b end)
  local shared = hit:bind(counter)
  local dag = add:bind(shared, shared)
  local v = tide.get(dag:execute())
  t.eq(v, 2, "shared node should have one value used twice")
  t.eq(tide.get(counter:count()), 1, "shared node ran more than once")
end)

t.test("DAG: actor method nodes via handle:bind", function()
  local Acc = tide.actor({
    init = function(self) self.total = 0 end,
    add = function(self, x) self.total = self.total + x; return self.total end,
  })
  local h = Acc:remote()
  local dbl = tide.remote(function(x) return x * 2 end)
  local node = h:bind("add", dbl:bind(5))
  t.eq(tide.get(node:execute()), 10)
  t.eq(tide.get(node:execute()), 20)
end)

t.test("a DAG node is not sent as a plain table: it raises at the call", function()
  local dbl = tide.remote(function(x) return x * 2 end)
  local id = tide.remote(function(x) return x end)
  t.raises(function() id:remote(dbl:bind(5)) end, "a DAG node cannot be sent; execute it first")
  t.raises(function() id:remote({n = dbl:bind(5)}) end, 'field "n"')
  t.eq(tide.get(id:remote(dbl:bind(5):execute())), 10)
end)

t.test("options() returns a copy with merged options", function()
  local f = tide.remote({num_returns = 2}, function() return "a", "b", "c" end)
  local g = f:options({num_returns = 3})
  local a, b, c = g:remote()
  t.eq(tide.get(c), "c")
  local x, y, z = f:remote()
  t.eq(tide.get(y), "b")
  t.eq(z, nil, "original num_returns changed by options()")
  t.ok(g ~= f, "options() must return a new object")
end)

t.test("runtime_env env_vars are visible via os.getenv in the task", function()
  local f = tide.remote({runtime_env = {env_vars = {TIDE_TEST_VAR = "hello-env"}}}, function()
    return os.getenv("TIDE_TEST_VAR")
  end)
  t.eq(tide.get(f:remote()), "hello-env")
  local g = tide.remote(function() return os.getenv("TIDE_TEST_VAR") end)
  t.eq(tide.get(g:remote()), nil, "env_vars leaked into a task without runtime_env")
end)

t.test("an actor handle captured as an upvalue is a reference to the same actor", function()
  local Box = tide.actor({
    init = function(self) self.v = 0 end,
    set = function(self, v) self.v = v end,
    get = function(self) return self.v end,
  })
  local box = Box:remote()
  local writer = tide.remote(function(v) return tide.get(box:set(v)) end)
  tide.get(writer:remote(99))
  t.eq(tide.get(box:get()), 99)
end)

t.test("a named task reports its name in the runtime context or works normally", function()
  local f = tide.remote({name = "my-task"}, function() return tide.get_runtime_context().task_id end)
  local id = tide.get(f:remote())
  t.ok(id ~= nil, "task_id missing in a task's runtime context")
end)

t.local_test("pipeline = true: tasks queue at busy workers however long they run; without it they wait at the node", function()
  -- Two CPUs: a short task and a long one run; two more short ones
  -- follow. Without pipeline they wait at the node and both run on the
  -- worker that finished first; with it they are sent at once, one to each
  -- worker, so one of them waits behind the long task.
  local f = function(s) tide.sleep(s); return tide.get_runtime_context().pid end
  for _, pipe in ipairs({false, true}) do
    local g = tide.remote({pipeline = pipe}, f)
    local refs = {g:remote(0.05), g:remote(1.0), g:remote(0.05), g:remote(0.05)}
    local pid = {}
    for i, r in ipairs(refs) do pid[i] = tide.get(r) end
    local behind = pid[3] == pid[2] or pid[4] == pid[2]
    t.ok(pid[1] ~= pid[2], "the first two tasks ran in one worker")
    t.eq(behind, pipe, "pipeline = " .. tostring(pipe) .. ": a short task ran behind the long one")
  end
  t.raises(function() tide.remote({pipeline = 1}, f) end, "pipeline")
end)

t.local_test("a task's result reaches the driver when it ends, not after the task pipelined behind it", function()
  -- Busy, not asleep: a task that sends nothing (a sleep's WAIT would
  -- carry the DONE before it out with it).
  local g = tide.remote({pipeline = true}, function(s)
    local clock = require("tide.rawbench").now
    local stop = clock() + s
    while clock() < stop do end
    return true
  end)
  local raw = require("tide.rawbench")
  local refs = {g:remote(0.4), g:remote(0.4), g:remote(0.8), g:remote(0.8)}
  local t0 = raw.now()
  t.eq(tide.get(refs[1]), true)
  local took = raw.now() - t0
  -- 0.4 s and the round trip; 1.2 s if its DONE waited for the next task.
  t.ok(took < 1.0, string.format("the first result took %.2f s", took))
  for i = 2, 4 do t.eq(tide.get(refs[i]), true) end
end)

t.local_test("a quick task's result is not held back by a long one pipelined behind it", function()
  -- Both workers busy (a, b); q queues behind a, c behind b, d behind q.
  -- q ends in microseconds, less than the 1 ms over which a worker lets
  -- results gather; d then runs 2 s busy (sending nothing). q's DONE
  -- must go out before d runs, not with d's.
  local raw = require("tide.rawbench")
  local busy = tide.remote({pipeline = true}, function(s)
    local stop = raw.now() + s
    while raw.now() < stop do end
    return true
  end)
  local quick = tide.remote({pipeline = true}, function() return "q" end)
  tide.get({busy:remote(0.01), busy:remote(0.01)}) -- each worker knows busy is long
  local t0 = raw.now()
  local a, b = busy:remote(0.5), busy:remote(0.5)
  local q = quick:remote()
  local c, d = busy:remote(2.0), busy:remote(2.0)
  t.eq(tide.get(q), "q")
  local took = raw.now() - t0
  -- 0.5 s and a round trip; 2.5 s if its DONE waited for d.
  t.ok(took < 1.5, string.format("the quick result took %.2f s", took))
  for _, r in ipairs({a, b, c, d}) do t.eq(tide.get(r), true) end
end)

-- Each function goes out as a descriptor the dump hook makes fresh, and the
-- encoder knows tables by address: a descriptor collected while the rest
-- was still being encoded gave its address to the next one, which went out
-- as a back reference to it ("bad function descriptor" at the reader, or
-- another function's upvalues). A collector that runs at every allocation
-- makes that happen at once without the anchoring in lua/ser.c.
t.test("many closures in one argument each keep their own upvalues, the collector running throughout", function()
  local fns = {}
  for i = 1, 300 do
    local cfg = {id = i, name = "f" .. i}
    fns[i] = function() return cfg.id, cfg.name end
  end
  local check = tide.remote(function(list)
    local bad = {}
    for i, f in ipairs(list) do
      local ok, id, name = pcall(f)
      if not ok or id ~= i or name ~= "f" .. i then bad[#bad + 1] = i .. ":" .. tostring(id) end
    end
    return {#list, table.concat(bad, " ")}
  end)
  local pause, stepmul = collectgarbage("setpause", 0), collectgarbage("setstepmul", 10000)
  local ok, r = pcall(function()
    local out = {}
    for k = 1, 5 do out[k] = tide.get(check:remote(fns)) end
    return out
  end)
  collectgarbage("setpause", pause)
  collectgarbage("setstepmul", stepmul)
  t.ok(ok, tostring(r))
  for k = 1, 5 do
    t.eq(r[k][1], 300)
    t.eq(r[k][2], "")
  end
end)

t.done()
