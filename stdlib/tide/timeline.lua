-- tide.timeline: the tasks and actor calls the node ran, as Chrome trace
-- events (the JSON that Perfetto and chrome://tracing load).
--   local tl = require("tide.timeline")
--   tl.write("trace.json")            -- every task and call the node keeps
--   tl.trace({job = "job-..."})       -- the trace as a Lua table, one job's work
--   tl.merge({"head.json", "node1.json"}) -- traces of several nodes as one
-- The node keeps a fixed ring (TIDE_TIMELINE_EVENTS, 65536 by default) of
-- work that ended; `dropped` counts what the ring let go.
local core = require("tide.core")
local cjson = require("cjson")

local M = {}
local format, floor = string.format, math.floor

-- The raw records, oldest first: {name, kind, submit, start, end, node, pid,
-- worker_id, task_id, ref, owner, args_bytes, ok, ran, ...}; dropped.
local function records()
  local ok, r = pcall(core.timeline)
  if not ok then error("tide.timeline: " .. tostring(type(r) == "table" and r.message or r), 0) end
  return r
end

-- The processes of a job: its shell's pid (job_status), whose child is the
-- job's driver.
local function job_pid(job)
  if not core.call_node then
    error("tide.timeline: job filter needs a node daemon (tide start); this driver runs its own node", 0)
  end
  local ok, j = pcall(core.call_node, "job_status", job)
  if not ok then error("tide.timeline: " .. tostring(type(j) == "table" and j.message or j), 0) end
  return j.pid
end


-- Builds the trace. opts.job: only that job's work.
function M.trace(opts)
  opts = opts or {}
  if type(opts) ~= "table" then error("tide.timeline: options must be a table", 2) end
  local r = records()
  local pid
  if opts.job ~= nil then
    if type(opts.job) ~= "string" then error("tide.timeline: job must be a job id string", 2) end
    pid = job_pid(opts.job)
  end
  local ev, named = {}, {}
  local function name_track(p, t, pname, tname)
    local key = p .. ":" .. t
    if not named["p" .. p] then
      named["p" .. p] = true
      ev[#ev + 1] = {ph = "M", name = "process_name", pid = p, tid = 0, args = {name = pname}}
    end
    if not named[key] then
      named[key] = true
      ev[#ev + 1] = {ph = "M", name = "thread_name", pid = p, tid = t, args = {name = tname}}
    end
  end
  -- Times are microseconds from the first submission kept: unix
  -- microseconds have 16 digits, more than the JSON encoder writes.
  local t0 = math.huge
  for _, e in ipairs(r.events) do
    if e.submit < t0 then t0 = e.submit end
  end
  local function us(t) return floor((t - t0) * 1e6 + 0.5) end
  local kept = 0
  -- Flow ids unique across nodes, so that merged traces keep their arrows.
  local idbase = (tonumber(r.node_id:match("%d+")) or 0) * 2 ^ 32
  for i, e in ipairs(r.events) do
    if not pid or e.owner_pid == pid or e.owner_ppid == pid then
      kept = kept + 1
      local node = "node-" .. e.node
      -- A worker is a thread of its node's process; work sent to another
      -- node (as its head saw it) goes on that node's "sent here" track.
      local tid = e.pid ~= 0 and e.pid or 0
      name_track(e.node, tid, node, tid ~= 0 and format("worker pid %d", tid) or "sent to this node")
      -- Submissions go on a track of the submitter (a client, or the
      -- node's own driver), joined to the run by a flow arrow.
      local sub_tid = e.owner_pid or 1
      name_track(e.node, sub_tid, node, e.owner_pid and format("client pid %d (submits)", e.owner_pid)
        or "driver (submits)")
      local args = {task_id = e.task_id, ref = e.ref, owner = e.owner, actor_id = e.actor_id,
        worker_id = e.worker_id, args_bytes = e.args_bytes, ok = e.ok, queued_ms = (e.start - e.submit) * 1e3}
      if not e.ran then args.failed_before_running = true end
      local cat = e.kind
      ev[#ev + 1] = {ph = "i", s = "t", name = "submit " .. e.name, cat = cat, ts = us(e.submit),
        pid = e.node, tid = sub_tid, args = {task_id = e.task_id}}
      ev[#ev + 1] = {ph = "s", id = idbase + i, name = "submit", cat = cat, ts = us(e.submit), pid = e.node,
        tid = sub_tid}
      ev[#ev + 1] = {ph = "X", name = e.name, cat = cat, ts = us(e.start), dur = us(e["end"]) - us(e.start),
        pid = e.node, tid = tid, args = args}
      ev[#ev + 1] = {ph = "f", bp = "e", id = idbase + i, name = "submit", cat = cat, ts = us(e.start), pid = e.node,
        tid = tid}
    end
  end
  return {traceEvents = ev, displayTimeUnit = "ms",
    otherData = {node = r.node_id, recorded = #r.events, kept = kept, dropped = r.dropped,
      start_unix_s = t0 < math.huge and t0 or nil}}
end

-- The JSON text of a trace table (M.trace, M.merge).
local function text(t)
  local s = cjson.encode(t)
  -- cjson writes an empty table as an object; the format wants an array.
  if #t.traceEvents == 0 then s = s:gsub('"traceEvents":{}', '"traceEvents":[]') end
  return s
end

function M.encode(opts)
  local t = M.trace(opts)
  return text(t), t.otherData
end

-- Writes a trace table to path ("-" or nil: stdout).
function M.save(path, t)
  if path == nil or path == "-" then
    io.stdout:write(text(t), "\n")
    return
  end
  local f, err = io.open(path, "w")
  if not f then error("tide.timeline: " .. tostring(err), 2) end
  f:write(text(t), "\n")
  f:close()
end

-- Merges traces written by `tide timeline` on several nodes (each node's
-- ring holds the work it ran itself) into one, on one clock: each file's
-- times move by the difference of its start_unix_s.
function M.merge(paths)
  if type(paths) ~= "table" or #paths == 0 then error("tide.timeline.merge: expected a list of trace files", 2) end
  local traces = {}
  for i, path in ipairs(paths) do
    local f, err = io.open(path, "r")
    if not f then error("tide.timeline.merge: " .. tostring(err), 2) end
    local body = f:read("*a")
    f:close()
    local ok, t = pcall(cjson.decode, body)
    if not ok or type(t) ~= "table" or type(t.traceEvents) ~= "table" then
      error(format("tide.timeline.merge: %s is not a trace of tide timeline", path), 2)
    end
    traces[i] = t
  end
  return M.merge_traces(traces)
end

-- The same, of traces as M.trace returns them.
function M.merge_traces(traces)
  local t0 = math.huge
  for _, t in ipairs(traces) do
    local st = t.otherData and tonumber(t.otherData.start_unix_s)
    if st and st < t0 then t0 = st end
  end
  local ev, dropped, nodes = {}, 0, {}
  for _, t in ipairs(traces) do
    local od = t.otherData or {}
    local shift = od.start_unix_s and floor((od.start_unix_s - t0) * 1e6 + 0.5) or 0
    dropped = dropped + (tonumber(od.dropped) or 0)
    nodes[#nodes + 1] = od.node
    for _, e in ipairs(t.traceEvents) do
      if e.ts then e.ts = e.ts + shift end
      ev[#ev + 1] = e
    end
  end
  return {traceEvents = ev, displayTimeUnit = "ms",
    otherData = {nodes = nodes, dropped = dropped, start_unix_s = t0 < math.huge and t0 or nil}}
end

-- Writes the trace to path ("-" or nil: stdout). Returns the trace's
-- summary: {recorded, kept, dropped, node}.
function M.write(path, opts)
  local t = M.trace(opts)
  M.save(path, t)
  return t.otherData
end

return M
