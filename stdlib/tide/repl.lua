-- tide repl: interactive Lua with `tide` loaded, on the embedded cluster.
-- Multi-line input continues until the chunk is complete; expressions are
-- printed (tables pretty-printed, ObjectRefs with their state); Tab
-- completes tide.* and globals; Ctrl-C clears the line at the prompt and
-- interrupts a running chunk (a blocking call or a loop); history is saved
-- as it grows; :help, :status, :quit. Functions defined here can be sent as tasks.
local tide = require("tide")
local core = require("tide.core")
local rl = require("tide.readline")

_G.tide = tide

local HISTORY = (os.getenv("HOME") or ".") .. "/.tide_history"
local REF_MT = tide.ObjectRef

local function is_ident(k) return type(k) == "string" and k:match("^[%a_][%w_]*$") end

-- Pretty printer: cycles marked, depth and width bounded.
local function pretty(v, indent, seen, depth)
  local t = type(v)
  if getmetatable(v) == REF_MT then
    local ok, st = pcall(core.state, v)
    return string.format("ObjectRef(%s, %s)", tostring(v:id()), ok and st or "?")
  end
  if t == "string" then return string.format("%q", v) end
  if t ~= "table" then return tostring(v) end
  local mt = getmetatable(v)
  if mt and mt.__tostring then return tostring(v) end
  if seen[v] then return "<cycle>" end
  if depth > 5 then return "{...}" end
  seen[v] = true
  local keys = {}
  for k in pairs(v) do keys[#keys + 1] = k end
  if #keys == 0 then seen[v] = nil; return "{}" end
  local n = #v
  table.sort(keys, function(a, b)
    local ta, tb = type(a), type(b)
    if ta ~= tb then return ta < tb end
    if ta == "number" or ta == "string" then return a < b end
    return tostring(a) < tostring(b)
  end)
  local pad = indent .. "  "
  local parts, shown = {}, 0
  for _, k in ipairs(keys) do
    shown = shown + 1
    if shown > 50 then parts[#parts + 1] = pad .. "... (" .. (#keys - 50) .. " more)"; break end
    local val = pretty(v[k], pad, seen, depth + 1)
    if type(k) == "number" and k >= 1 and k <= n and k % 1 == 0 then
      parts[#parts + 1] = pad .. val
    elseif is_ident(k) then
      parts[#parts + 1] = pad .. k .. " = " .. val
    else
      parts[#parts + 1] = pad .. "[" .. pretty(k, pad, seen, depth + 1) .. "] = " .. val
    end
  end
  seen[v] = nil
  return "{\n" .. table.concat(parts, ",\n") .. "\n" .. indent .. "}"
end

local function completions()
  local words = {}
  for k in pairs(tide) do
    if is_ident(k) then words[#words + 1] = "tide." .. k end
  end
  for k in pairs(_G) do
    if is_ident(k) then words[#words + 1] = k end
  end
  for _, lib in ipairs({"string", "table", "math", "os", "io"}) do
    for k in pairs(_G[lib]) do words[#words + 1] = lib .. "." .. k end
  end
  table.sort(words)
  return words
end

local HELP = [[
  Enter Lua; expressions are printed. Incomplete chunks continue on the next line.
  tide is loaded: tide.remote, tide.get, tide.put, tide.actor, tide.wait, ...
  Ctrl-C clears the line, or interrupts what runs (a blocking call, a loop);
  Ctrl-D or :quit leaves. Code typed here runs with the JIT off (jit.on()
  turns it on, but then Ctrl-C cannot stop a compiled loop).
  :help          this text
  :status        cluster resources, workers, actors, tasks and objects
  :quit          leave]]

-- The same report as `tide status` (stdlib/tide/status.lua), for the
-- cluster this REPL drives.
local function status()
  local path = package.searchpath("tide.status", package.path)
  local ok, err = pcall(dofile, path)
  if not ok then print("status: " .. tostring(err)) end
end

local function eval(chunk)
  -- An expression first (so `1 + 1` prints), then a statement.
  local fn, err = loadstring("return " .. chunk, "=stdin")
  if not fn then fn, err = loadstring(chunk, "=stdin") end
  if not fn then
    if err:match("<eof>$") or err:match("'<eof>'") then return "incomplete" end
    print(err)
    return
  end
  local res = {xpcall(fn, function(e)
    if type(e) == "table" then return tostring(e) end
    -- The REPL's own frames are noise: cut the traceback at its entry.
    local tb = debug.traceback(tostring(e), 2)
    tb = tb:gsub("\n%s*%[C%]: in function 'xpcall'.*$", "")
    local lines = {}
    for line in tb:gmatch("[^\n]+") do
      if not line:find("[builtin#", 1, true) and not line:find("in function 'error'", 1, true) then
        lines[#lines + 1] = line
      end
    end
    if lines[#lines] == "stack traceback:" then lines[#lines] = nil end
    return table.concat(lines, "\n")
  end)}
  if not res[1] then
    print(res[2])
    return
  end
  for i = 2, table.maxn(res) do print(pretty(res[i], "", {}, 0)) end
end

-- History is written as it grows, so a REPL that is killed keeps it.
local function remember(line)
  rl.add_history(line)
  rl.save_history(HISTORY)
end

-- Compiled loops run no hooks, so Ctrl-C could not stop them: code typed
-- here runs in LuaJIT's interpreter (still fast; tasks and actors run in
-- workers with the compiler on). jit.on() turns it back on.
if jit then jit.off(); jit.flush() end
-- A get that waits for a large value another node sends shows its bytes
-- coming in (tide.progress; stdlib/tide.lua).
tide._get_progress = true

rl.load_history(HISTORY)
rl.set_words(completions())
print(string.format("tide %s REPL — %g CPUs, %g GPUs. :help for help.", "0.1",
  tide.cluster_resources().CPU or 0, tide.cluster_resources().GPU or 0))
local buf = ""
while true do
  local ok, line = pcall(rl.readline, buf == "" and "tide> " or "  ... ")
  if ok and line == nil then break end
  if ok and line == false then
    -- Ctrl-C at the prompt clears the line (and a chunk being continued).
    io.write("^C\n")
    buf = ""
  elseif ok then
    if buf == "" and line:match("^%s*:") then
      local cmd = line:match("^%s*:(%a+)")
      remember(line)
      if cmd == "quit" or cmd == "q" then break
      elseif cmd == "help" then print(HELP)
      elseif cmd == "status" then status()
      else print("unknown command :" .. tostring(cmd) .. " (try :help)") end
    elseif line:match("%S") or buf ~= "" then
      buf = buf .. line .. "\n"
      local done, r = pcall(eval, buf)
      if not done then print(r) end
      if not (done and r == "incomplete") then
        remember((buf:gsub("\n$", "")))
        buf = ""
        rl.set_words(completions())
      end
    end
  else
    print(tostring(line))
    buf = ""
  end
end
rl.save_history(HISTORY)
print()
