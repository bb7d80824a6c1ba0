-- Tensors through the object store: a contiguous CPU tensor is written into
-- the store once and read back by mapping the store's bytes (zero copy),
-- read-only, held (referenced and not spilled) for as long as a view of it
-- lives; everything else still travels by copy.
local t = dofile("tests/lua/harness.lua")
local tide = require("tide")
local T = require("tide.tensor")

local MiB = 1024 * 1024
local STORE = 64 * MiB
tide.init({num_cpus = 2, object_store_memory = STORE})

local noop = tide.remote(function() return true end)
local function flush()
  for _ = 1, 2 do
    collectgarbage(); collectgarbage()
    tide.get(noop:remote())
  end
end

local function sum(x)
  return x:sum()
end

t.test("a large tensor comes back from the store mapped, read-only, equal", function()
  local a = T.arange(4 * MiB / 4, {dtype = "f32"}):reshape({1024, 1024})
  local b = tide.get(tide.put(a))
  t.deep_eq(b:shape(), {1024, 1024})
  t.eq(b:dtype(), "f32")
  t.eq(b:get(1024, 1024), a:get(1024, 1024))
  t.eq(sum(b), sum(a))
  local ok, err = pcall(function() b:fill(0) end)
  t.ok(not ok and err:find("read%-only"), "fill of a mapped tensor: " .. tostring(err))
  ok, err = pcall(function() b:set(1, 1, 5) end)
  t.ok(not ok and err:find("read%-only"), "set of a mapped tensor: " .. tostring(err))
  ok, err = pcall(function() T.add(a, a, {out = b}) end)
  t.ok(not ok and err:find("read%-only"), "out = mapped tensor: " .. tostring(err))
  ok, err = pcall(function() b:slice(1, 1, 2):copy(a:slice(1, 1, 2)) end)
  t.ok(not ok and err:find("read%-only"), "a view shares read-only: " .. tostring(err))
  -- A clone is an ordinary tensor; the object is unchanged.
  local c = b:clone()
  c:fill(1)
  t.eq(sum(c), 1024 * 1024)
  t.eq(tide.get(tide.put(a)):get(2, 3), a:get(2, 3))
end)

t.test("a mapped tensor keeps its object alive after the last ObjectRef goes", function()
  local a = T.full({2 * MiB / 4}, 3)
  local r = tide.put(a)
  local b = tide.get(r)
  r = nil -- luacheck: ignore 311
  flush()
  -- Fill the store with other objects: b's bytes must not be reused.
  local keep = {}
  for i = 1, 8 do keep[i] = tide.put(T.full({2 * MiB / 4}, i)) end
  t.eq(sum(b), 3 * 2 * MiB / 4)
  keep = nil -- luacheck: ignore 311
end)

t.test("the store bytes are given back when the last view goes", function()
  flush()
  local before = tide.stats().store_used
  local b = tide.get(tide.put(T.ones({8 * MiB / 4})))
  local v = b:slice(1, 1, 10)
  b = nil -- luacheck: ignore 311
  flush()
  t.ok(tide.stats().store_used >= before + 8 * MiB, "freed while a view lives")
  t.eq(sum(v), 10)
  v = nil -- luacheck: ignore 311
  flush()
  t.eq(tide.stats().store_used, before, "store bytes given back")
end)

t.test("a mapped tensor is not spilled while it lives; others are", function()
  flush()
  local held = tide.get(tide.put(T.full({20 * MiB / 4}, 7)))
  -- More than the store holds: the other objects spill, the held one stays.
  local refs = {}
  for i = 1, 6 do refs[i] = tide.put(T.full({16 * MiB / 4}, i)) end
  t.eq(sum(held), 7 * 20 * MiB / 4)
  for i = 1, 6 do t.eq(tide.get(refs[i]):get(1), i) end
  t.ok(tide.stats().spilled_bytes > 0, "nothing was spilled")
end)

t.test("tasks read tensor arguments mapped and return tensors through the store", function()
  local info = tide.remote(function(x)
    local ok, err = pcall(function() x:fill(0) end)
    return {sum = x:sum(), readonly = not ok and err:find("read%-only") ~= nil}
  end)
  local a = T.full({1024, 512}, 2)
  local r = tide.get(info:remote(a))
  t.eq(r.sum, 2 * 1024 * 512)
  t.ok(r.readonly, "a large tensor argument was not mapped")
  -- Inside a table, through a put.
  local nested = tide.remote(function(box) return box.w:sum() + box.n end)
  t.eq(tide.get(nested:remote(tide.put({w = a, n = 1}))), 2 * 1024 * 512 + 1)
  -- Results: a task's tensor comes back mapped in the driver.
  local make = tide.remote(function(n) return require("tide.tensor").full({n}, 5) end)
  local out = tide.get(make:remote(MiB))
  t.eq(sum(out), 5 * MiB)
  local ok = pcall(function() out:fill(1) end)
  t.ok(not ok, "a large task result should be mapped read-only")
end)

t.test("a tensor kept by an actor past the call stays valid", function()
  local Keeper = tide.actor({
    init = function(self) self.kept = nil end,
    keep = function(self, x) self.kept = x; return true end,
    sum = function(self) collectgarbage(); return self.kept:sum() end,
  })
  local k = Keeper:remote()
  local r = tide.put(T.full({MiB}, 4))
  tide.get(k:keep(r))
  r = nil -- luacheck: ignore 311
  flush()
  local keep = {}
  for i = 1, 6 do keep[i] = tide.put(T.full({MiB}, 9)) end
  t.eq(tide.get(k:sum()), 4 * MiB)
  keep = nil -- luacheck: ignore 311
end)

-- Store bytes in use once they are back to `before`, or after 5 s.
local function settle(before)
  local used
  for _ = 1, 100 do
    flush()
    used = tide.stats().store_used
    if used == before then break end
    tide.sleep(0.05)
  end
  return used
end

t.test("an idle worker lets go of the objects its finished tasks mapped", function()
  flush()
  local before = tide.stats().store_used
  local f = tide.remote(function(x) return x:numel() end)
  local r = tide.put(T.full({MiB}, 2))
  t.eq(tide.get(f:remote(r)), MiB)
  r = nil -- luacheck: ignore 311
  t.eq(settle(before), before, "store bytes still held once the task and the ref are gone")
end)

t.test("a worker that dies holding objects gives its refs and pins back", function()
  flush()
  local before = tide.stats().store_used
  local K = tide.actor({
    keep = function(self, x)
      self.x = x
      self.y = tide.put(x:clone())
      return io.open("/proc/self/stat"):read("*a"):match("^(%d+)")
    end,
  })
  local k = K:options({max_restarts = 0}):remote()
  local r = tide.put(T.full({4 * MiB / 4}, 1))
  local pid = tide.get(k:keep(r))
  t.ok(tide.stats().store_used >= before + 8 * MiB, "the actor's objects are not in the store")
  -- Its process dies at once, holding a mapped tensor and a put of its own.
  os.execute("kill -9 " .. pid)
  r = nil -- luacheck: ignore 311
  t.eq(settle(before), before, "store bytes held by the dead actor")
end)

t.test("small, non-contiguous and typed tensors travel by copy and stay writable", function()
  local small = tide.get(tide.put(T.ones({4})))
  small:fill(2)
  t.eq(sum(small), 8)
  local a = T.arange(1000 * 300, {dtype = "f32"}):reshape({1000, 300})
  local tr = tide.get(tide.put(a:transpose(1, 2)))
  t.deep_eq(tr:shape(), {300, 1000})
  t.eq(tr:get(7, 9), a:get(9, 7))
  for _, dt in ipairs({"i32", "u8", "f16", "bf16", "i64"}) do
    local x = T.ones({200000}, {dtype = dt})
    local y = tide.get(tide.put(x))
    t.eq(y:dtype(), dt)
    t.eq(y:to("f32"):sum(), 200000)
  end
end)

t.test("a malformed raw tensor is a clear error, not a crash", function()
  local ok, err = pcall(T.__tide_deser_raw, "TDT1", nil, 4)
  t.ok(not ok and tostring(err):find("userdata expected"), tostring(err))
end)

t.done()
