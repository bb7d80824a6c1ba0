-- The hot paths of the Lua API compile under LuaJIT. A function that
-- LuaJIT cannot compile (a closure made where its locals are kept: NYI
-- bytecodes FNEW/UCLO) runs interpreted, and every loop through it with
-- it: tide.get and method lookup once ran 1.4x the instructions that way
-- (docs/performance.md). jit.v names each trace LuaJIT gives up on and
-- why; none of the aborts may be an NYI inside Tide's own Lua.
local t = dofile("tests/lua/harness.lua")
local tide = require("tide")

tide.init({num_cpus = 1})

local ok_v, jv = pcall(require, "jit.v")

-- Tide's Lua files by the names jit.v gives them (their file names).
local ours = {}
do
  local p = io.popen("find stdlib -name '*.lua'")
  for path in p:lines() do ours[path:match("[^/]+$")] = true end
  p:close()
end

-- The NYI aborts in Tide's Lua (tide.lua, tide/*.lua) while fn runs.
local function nyi_aborts(fn)
  local out = os.tmpname()
  jv.on(out)
  local ok, err = pcall(fn)
  jv.off()
  local f = io.open(out)
  local log = f and f:read("*a") or ""
  if f then f:close() end
  os.remove(out)
  assert(ok, err)
  local bad = {}
  for line in log:gmatch("[^\n]+") do
    local at = line:find("TRACE ---", 1, true) and line:match("NYI.- at ([^:%s]+):%d+")
    if at and ours[at] then bad[#bad + 1] = line end
  end
  return bad
end

local function check(name, fn)
  if not ok_v then return t.skip(name, "jit.v is not installed (it comes with LuaJIT's common files)") end
  t.test(name, function()
    local bad = nyi_aborts(fn)
    t.ok(#bad == 0, "LuaJIT gave up on Tide's Lua: " .. table.concat(bad, "; "))
  end)
end

local A = tide.actor({ping = function(_, x) return x end})
local a = A:remote()
local f = tide.remote(function(x) return x end)
tide.get({a:ping(1), f:remote(1)}) -- the worker and the actor are up

check("tide.get of a ready value compiles", function()
  local r, s = tide.put(42), 0
  for _ = 1, 20000 do s = s + tide.get(r) end
  assert(s == 20000 * 42)
end)

check("an actor call through its handle and its get compile", function()
  local s = 0
  for i = 1, 3000 do s = s + tide.get(a:ping(i)) end
  assert(s == 3000 * 3001 / 2)
end)

check("a task's remote and get compile, one at a time and many at once", function()
  local s = 0
  for i = 1, 2000 do s = s + tide.get(f:remote(i)) end
  local refs = {}
  for i = 1, 3000 do refs[i] = f:remote(i) end
  for _, v in ipairs(tide.get(refs)) do s = s + v end
  assert(s == 2000 * 2001 / 2 + 3000 * 3001 / 2)
end)

-- The check itself: a closure kept by its function's locals is reported.
if not ok_v then
  t.skip("the check sees an NYI abort when there is one", "jit.v is not installed")
else
  t.test("the check sees an NYI abort when there is one", function()
    -- Loaded under a name the filter takes as Tide's own.
    ours["jit_test_fake.lua"] = true
    local M = {}
    assert(load([[
      local M = ...
      function M.g(x)
        local y = x
        local h = function() return y end
        if x > 0 then return y end
        return h()
      end
    ]], "@jit_test_fake.lua"))(M)
    local bad = nyi_aborts(function()
      local s = 0
      for i = 1, 2000 do s = s + M.g(i) end
    end)
    t.ok(#bad > 0, "no NYI abort reported for a closure kept by its locals")
  end)
end

t.done()
