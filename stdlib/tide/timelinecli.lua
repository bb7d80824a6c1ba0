-- tide timeline [--job ID] [-o FILE] [--address A] [--key FILE]: the
-- running node's tasks and actor calls as Chrome trace events (Perfetto,
-- chrome://tracing), on stdout or into FILE. tide timeline --merge FILE...
-- [-o FILE]: several nodes' traces as one. main.c has checked the flags.
local core = require("tide.core")
local timeline = require("tide.timeline")

local function die(msg, code)
  io.stderr:write("tide: ", msg, "\n")
  os.exit(code or 1)
end

local job, out, merge
local i = 1
while arg[i] do
  local a = arg[i]
  if a == "--job" then job = arg[i + 1]; i = i + 2
  elseif a == "-o" or a == "--output" then out = arg[i + 1]; i = i + 2
  elseif a == "--address" or a == "--key" then i = i + 2
  elseif a == "--merge" then merge = {}; i = i + 1
  elseif merge then merge[#merge + 1] = a; i = i + 1
  else i = i + 1 end
end

-- --merge FILE...: one trace of several nodes' (no node needed).
if merge then
  local cjson = require("cjson")
  local ok, t = pcall(timeline.merge, merge)
  if not ok then die(tostring(t)) end
  local s = cjson.encode(t)
  if #t.traceEvents == 0 then s = s:gsub('"traceEvents":{}', '"traceEvents":[]') end
  local f = out and io.open(out, "w") or io.stdout
  if not f then die("cannot write " .. out) end
  f:write(s, "\n")
  if out then f:close() end
  os.exit(0)
end

if not core.call_node then die("no node to talk to (start one with `tide start --head`)") end
local ok, info = pcall(timeline.write, out, {job = job})
if not ok then die(tostring(type(info) == "table" and info.message or info)) end
if info.dropped > 0 then
  io.stderr:write(string.format("tide: the node's timeline ring was full: the %d oldest records were dropped "
    .. "(TIDE_TIMELINE_EVENTS sizes it)\n", info.dropped))
end
