-- Minimal TAP harness for Lua tests run under `tide run`.
local M = {}
local n, failed = 0, 0

-- TIDE_TEST_CLUSTER=1: the suite runs attached to a live multi-node
-- cluster (tests/sh/multinode_test.sh), whose shape is fixed by its
-- daemons: tide.init's options are ignored there.
M.cluster = os.getenv("TIDE_TEST_CLUSTER") ~= nil
if M.cluster then
  local tide = require("tide")
  tide.init = function() end
end

-- A test that needs the shape tide.init gives (a small store, a CPU
-- count): skipped, visibly, when the suite runs against a live cluster.
function M.local_test(name, fn)
  if not M.cluster then return M.test(name, fn) end
  n = n + 1
  io.write(string.format("ok %d - %s # SKIP needs the node shape tide.init sets\n", n, name))
end

-- A test this machine cannot run, reported as skipped with the reason.
function M.skip(name, why)
  n = n + 1
  io.write(string.format("ok %d - %s # SKIP %s\n", n, name, why))
end

local function fmt(v)
  if type(v) == "string" then return string.format("%q", v) end
  return tostring(v)
end

function M.test(name, fn)
  n = n + 1
  local ok, err = xpcall(fn, function(e)
    if type(e) == "table" then e = tostring(e) end
    return debug.traceback(tostring(e), 2)
  end)
  if ok then
    io.write(string.format("ok %d - %s\n", n, name))
  else
    failed = failed + 1
    io.write(string.format("not ok %d - %s\n", n, name))
    io.write("# " .. tostring(err):gsub("\n", "\n# ") .. "\n")
  end
  io.flush()
end

function M.eq(a, b, msg)
  if a ~= b then
    error(string.format("%sexpected %s, got %s", msg and (msg .. ": ") or "", fmt(b), fmt(a)), 2)
  end
end

function M.ok(v, msg)
  if not v then error(msg or "expected a true value", 2) end
  return v
end

-- Asserts that fn raises; returns the error value.  `pat` is matched
-- against tostring(err) when given.
function M.raises(fn, pat)
  local ok, err = pcall(fn)
  if ok then error("expected an error" .. (pat and (" matching " .. pat) or ""), 2) end
  if pat and not tostring(err):find(pat) then
    error(string.format("error %q does not match %q", tostring(err), pat), 2)
  end
  return err
end

function M.deep_eq(a, b, path)
  path = path or "value"
  if type(a) ~= type(b) then error(path .. ": type " .. type(a) .. " ~= " .. type(b), 2) end
  if type(a) ~= "table" then
    if a ~= b then error(path .. ": " .. fmt(a) .. " ~= " .. fmt(b), 2) end
    return
  end
  for k, v in pairs(a) do M.deep_eq(v, b[k], path .. "." .. tostring(k)) end
  for k in pairs(b) do
    if a[k] == nil then error(path .. "." .. tostring(k) .. " missing", 2) end
  end
end

function M.done()
  io.write(string.format("1..%d\n", n))
  io.flush()
end

return M
