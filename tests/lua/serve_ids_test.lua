-- Serve job ids come from the OS's random source: user code that reseeds
-- math.random in the same Lua state cannot make them repeat, and they are
-- not a function of a seed. Run: bin/tide run tests/lua/serve_ids_test.lua
local t = dofile("tests/lua/harness.lua")
local serve = require("tide.serve")

t.test("job ids do not repeat when math.random is reseeded between them", function()
  serve._job_id()
  math.randomseed(7)
  local a = serve._job_id()
  math.randomseed(7)
  local b = serve._job_id()
  t.ok(a ~= b, "same seed, different ids: " .. a .. " " .. b)
end)

t.test("job ids are job- and 16 hex digits, all distinct over 10000", function()
  local seen, n = {}, 0
  for _ = 1, 10000 do
    local id = serve._job_id()
    t.ok(id:match("^job%-%x%x%x%x%x%x%x%x%x%x%x%x%x%x%x%x$"), "format: " .. id)
    if not seen[id] then n = n + 1 end
    seen[id] = true
  end
  t.eq(n, 10000)
end)

t.done()
