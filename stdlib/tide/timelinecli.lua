-- tide timeline [--job ID] [-o FILE] [--address A] [--key FILE]: the
-- running node's tasks and actor calls as Chrome trace events (Perfetto,
-- chrome://tracing), on stdout or into FILE. main.c has checked the flags.
local core = require("tide.core")
local timeline = require("tide.timeline")

local function die(msg, code)
  io.stderr:write("tide: ", msg, "\n")
  os.exit(code or 1)
end

if not core.call_node then die("no node to talk to (start one with `tide start --head`)") end
local job, out
local i = 1
while arg[i] do
  local a = arg[i]
  if a == "--job" then job = arg[i + 1]; i = i + 2
  elseif a == "-o" or a == "--output" then out = arg[i + 1]; i = i + 2
  elseif a == "--address" or a == "--key" then i = i + 2
  else i = i + 1 end
end
local ok, info = pcall(timeline.write, out, {job = job})
if not ok then die(tostring(type(info) == "table" and info.message or info)) end
if info.dropped > 0 then
  io.stderr:write(string.format("tide: the node's timeline ring was full: the %d oldest records were dropped "
    .. "(TIDE_TIMELINE_EVENTS sizes it)\n", info.dropped))
end
