-- Tensors across nodes: a contiguous tensor crosses the link in chunks into
-- the other node's store and is mapped there, read-only; objects of 2 GiB
-- and more cross both ways (skipped, with a notice, on machines whose
-- memory cannot hold the copies: the driver's tensor and two stores).
local t = dofile("tests/lua/harness.lua")
local tide = require("tide")
local T = require("tide.tensor")

local function on(node) return {scheduling_strategy = {node_id = node, soft = false}} end
local probe = tide.remote(function(x)
  local ok, err = pcall(function() x:fill(0) end)
  local n = x:numel()
  return {n = n, first = x:get(1), mid = x:get(math.floor(n / 2) + 1), last = x:get(n),
    readonly = not ok and err:find("read%-only") ~= nil}
end)
-- Element i (1-based) of the pattern: i mod 1000, exact in f32.
local function pattern(n)
  return T.arange(n, {dtype = "i32"}):to("f32")
end

t.test("a tensor argument reaches a task on another node whole, mapped read-only", function()
  local n = 3 * 1024 * 1024 + 17
  local x = pattern(n)
  local r = tide.get(probe:options(on("node-2")):remote(x))
  t.eq(r.n, n)
  t.eq(r.first, 0)
  t.eq(r.mid, x:get(math.floor(n / 2) + 1))
  t.eq(r.last, n - 1)
  t.ok(r.readonly, "the tensor was not mapped on node-2")
end)

t.test("a tensor made on a node comes back to the driver mapped", function()
  local make = tide.remote(function(n) return require("tide.tensor").full({n}, 2.5) end)
  local y = tide.get(make:options(on("node-2")):remote(5 * 1024 * 1024))
  t.eq(y:numel(), 5 * 1024 * 1024)
  t.eq(y:sum(), 2.5 * 5 * 1024 * 1024)
  t.ok(not pcall(function() y:fill(1) end), "a mapped tensor accepted a write")
end)

local function mem_gib()
  local f = io.open("/proc/meminfo")
  local kb = f and tonumber(f:read("*a"):match("MemTotal:%s*(%d+)")) or 0
  if f then f:close() end
  return kb / 1024 / 1024
end

local GiB = 1024 * 1024 * 1024
if mem_gib() < 15 then
  t.skip("objects of 2 GiB and more across nodes", string.format("%.1f GiB of memory, 15 needed", mem_gib()))
else
  t.test("a 2.1 GiB tensor crosses from the driver to a task on another node", function()
    local n = math.floor(2.1 * GiB / 4)
    local x = T.full({n}, 1)
    x:slice(1, n, n):fill(9)
    local r = tide.get(probe:options(on("node-2")):remote(x), {timeout = 240})
    t.eq(r.n, n)
    t.eq(r.first, 1)
    t.eq(r.last, 9)
    t.ok(r.readonly, "not mapped")
  end)
  collectgarbage()
  t.test("a 2.1 GiB tensor made on a node comes back to the driver", function()
    local make = tide.remote(function(n)
      local y = require("tide.tensor").full({n}, 3)
      y:slice(1, 1, 1):fill(4)
      return y
    end)
    local n = math.floor(2.1 * GiB / 4)
    local y = tide.get(make:options(on("node-2")):remote(n), {timeout = 240})
    t.eq(y:numel(), n)
    t.eq(y:get(1), 4)
    t.eq(y:get(n), 3)
  end)
end
collectgarbage()
t.done()
