-- tide timeline [--job ID] [--local] [-o FILE] [--address A] [--key FILE]:
-- the tasks and actor calls of the running node (on a head: of every node)
-- as Chrome trace events (Perfetto, chrome://tracing), on stdout or into FILE. tide timeline --merge FILE...
-- [-o FILE]: several nodes' traces as one. cmd/client.c has checked the flags.
local core = require("tide.core")
local timeline = require("tide.timeline")

local function die(msg, code)
  io.stderr:write("tide: ", msg, "\n")
  os.exit(code or 1)
end

local job, out, merge, localonly
local i = 1
while arg[i] do
  local a = arg[i]
  if a == "--job" then job = arg[i + 1]; i = i + 2
  elseif a == "-o" or a == "--output" then out = arg[i + 1]; i = i + 2
  elseif a == "--address" or a == "--key" then i = i + 2
  elseif a == "--merge" then merge = {}; i = i + 1
  elseif a == "--local" then localonly = true; i = i + 1
  elseif merge then merge[#merge + 1] = a; i = i + 1
  else i = i + 1 end
end

-- --merge FILE...: one trace of several nodes' (no node needed).
if merge then
  local ok, t = pcall(timeline.merge, merge)
  if ok then ok, t = pcall(timeline.save, out, t) end
  if not ok then die(tostring(t)) end
  os.exit(0)
end

if not core.call_node then die("no node to talk to (start one with `tide start --head`)") end

-- This node's trace, and on a head every other node's: each node's ring
-- holds the work it ran, read there by a task placed on it (no CPU, no
-- retry) and merged here on one clock.
local ok, mine = pcall(timeline.trace, {job = job})
if not ok then die(tostring(type(mine) == "table" and mine.message or mine)) end
local traces, dropped = {mine}, {}
if (mine.otherData.dropped or 0) > 0 then dropped[#dropped + 1] = {mine.otherData.node, mine.otherData.dropped} end
local tide = require("tide")
local nodes = localonly and {} or tide.nodes()
if #nodes > 1 and job then
  io.stderr:write("tide: --job keeps only this node's work: other nodes' rings do not know the job\n")
elseif #nodes > 1 then
  local read = tide.remote(function() return require("tide.timeline").trace() end)
  local refs = {}
  for k = 2, #nodes do
    local on = {num_cpus = 0, max_retries = 0, scheduling_strategy = {node_id = nodes[k].node_id, soft = false}}
    refs[#refs + 1] = {nodes[k].node_id, read:options(on):remote()}
  end
  for _, r in ipairs(refs) do
    local got, t = pcall(tide.get, r[2], {timeout = 60})
    if got then
      traces[#traces + 1] = t
      if (t.otherData.dropped or 0) > 0 then dropped[#dropped + 1] = {r[1], t.otherData.dropped} end
    else
      io.stderr:write(string.format("tide: %s's timeline is left out: %s\n", r[1],
        tostring(type(t) == "table" and t.message or t)))
    end
  end
end
local saved, err = pcall(timeline.save, out, #traces > 1 and timeline.merge_traces(traces) or mine)
if not saved then die(tostring(err)) end
for _, d in ipairs(dropped) do
  io.stderr:write(string.format("tide: %s's timeline ring was full: the %d oldest records were dropped "
    .. "(TIDE_TIMELINE_EVENTS sizes it)\n", d[1], d[2]))
end
