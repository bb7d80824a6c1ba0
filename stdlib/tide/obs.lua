-- tide.obs: observability in the node daemon's private state. RPC ops for
-- `tide list` / `tide logs` (list, worker_log), the metrics user code adds
-- (metrics_put, from tide.metrics), and the dashboard's router (M.http,
-- called by lua/obs.c for every authorised request). The engine's rows and
-- metrics come from engine/introspect.c through tide.obs_c.
local obs_c = require("tide.obs_c")
local cjson = require("cjson")
local format, concat = string.format, table.concat

local M = {}
local ops = debug.getregistry()["tide.rpc.ops"]
local home = os.getenv("TIDE_HOME") or "."

local function session()
  return os.getenv("TIDE_SESSION_DIR") or ("/tmp/tide-" .. (os.getenv("TIDE_UID") or "0"))
end

-- -- Lists ----------------------------------------------------------------------

local JOB_KEYS = {id = true, status = true, script = true, pid = true, exit_code = true}

local function list_jobs(filters, limit, offset)
  for _, f in ipairs(filters) do
    if not JOB_KEYS[f[1]] then
      error(format("unknown filter key '%s' for jobs; known keys: id status script pid exit_code", f[1]), 0)
    end
  end
  local all = ops.job_list and ops.job_list() or {}
  local rows, matched = {}, 0
  for _, j in ipairs(all) do
    local ok = true
    for _, f in ipairs(filters) do
      if tostring(j[f[1]] == nil and "" or j[f[1]]) ~= f[2] then ok = false end
    end
    if ok then
      matched = matched + 1
      if matched > offset and #rows < limit then
        rows[#rows + 1] = {id = j.id, status = j.status, script = j.script, pid = j.pid,
          exit_code = j.exit_code, started = j.started, ended = j.ended}
      end
    end
  end
  -- This cjson (2.1.0) has no empty_array_mt and writes an empty table as {}.
  local j = cjson.encode({kind = "jobs", rows = #rows > 0 and rows or "__rows__", total = #all,
    matched = matched, offset = offset, limit = limit, truncated = matched > offset + #rows})
  return (j:gsub('"rows":"__rows__"', '"rows":[]', 1))
end

-- list(kind, {{key, value}, ...}, limit, offset) -> JSON text
function M.list(kind, filters, limit, offset)
  filters = filters or {}
  limit = tonumber(limit) or 100
  offset = tonumber(offset) or 0
  if limit <= 0 then limit = 100 end
  if kind == "jobs" then return list_jobs(filters, limit, offset) end
  local j, err = obs_c.list(kind, filters, limit, offset)
  if not j then error(err, 0) end
  return j
end
ops.obs_list = M.list

-- -- Logs -----------------------------------------------------------------------

local function logdir() return session() .. "/logs" end

local function one_row(kind, key, id)
  local t = cjson.decode(obs_c.list(kind, {{key, id}}, 1, 0))
  return t.rows[1]
end

-- This node's id ("node-N"): the nodes list starts with this node.
local function here()
  local t = cjson.decode(obs_c.list("nodes", {}, 1, 0))
  return t.rows[1] and t.rows[1].node_id or "node-0"
end

-- Where a log target's output is: {wid = worker id} for a worker's whole
-- log; for an actor or a task, {wid, by = "actor"|"task", sid = its id}, the
-- slice of its prints in that worker's log, or {wids = {...}, by, sid} when
-- the node no longer knows its worker (a task that ended, an actor gone)
-- and the logs' indexes name them; or {node = "node-N", target, id} when
-- it is on another node, to ask there: a task by its first return
-- ("task-ref"), as task ids are each node's own.
local function locate(target, id)
  if type(id) ~= "string" or not id:match("^%x+$") or #id ~= 16 then
    error(format("logs %s: the ID is 16 hex digits (as tide list shows), not %s", target, tostring(id)), 0)
  end
  if target == "worker" then
    -- A worker id is its node's index << 20 | its number there.
    local node = "node-" .. math.floor(tonumber(id:sub(-8), 16) / 2 ^ 20)
    if node ~= here() then return {node = node, target = target, id = id} end
    return {wid = id}
  end
  local r, by
  if target == "actor" then
    by = "actor"
    r = one_row("actors", "actor_id", id)
    if not r then
      local wids = obs_c.log_find("actor", id)
      if #wids > 0 then return {wids = wids, by = by, sid = id} end
      error("no actor " .. id .. " (tide list actors)", 0)
    end
  elseif target == "task-ref" then
    by = "task"
    r = one_row("tasks", "ref", id)
    if not r then error("no task with return " .. id .. " running, queued or among the failed ones kept", 0) end
  else
    by = "task"
    r = one_row("tasks", "task_id", id) or one_row("tasks", "ref", id)
    if not r then
      local wids = obs_c.log_find("task", id)
      if #wids > 0 then return {wids = wids, by = by, sid = id} end
      error("no task " .. id .. " running, queued, among the failed ones kept (tide list tasks) or in a " ..
        "worker's log here (an ended task is found by its task_id)", 0)
    end
  end
  local sid = by == "actor" and id or r.task_id
  if r.worker_id then return {wid = r.worker_id, by = by, sid = sid, ended = r.state == "FAILED"} end
  if r.node and r.node ~= "" and r.node ~= here() then
    if target == "actor" then return {node = r.node, target = target, id = id} end
    if r.ref then return {node = r.node, target = "task-ref", id = r.ref} end
    error(format("task %s ran on %s and has no return to find it by there: run tide logs on that node", id, r.node), 0)
  end
  if target == "actor" then
    -- Ended (its worker gone): its lines are still in the worker logs here.
    local wids = obs_c.log_find("actor", id)
    if #wids > 0 then return {wids = wids, by = by, sid = id} end
    if r.state == "DEAD" then error(format("actor %s is dead, and no worker log here holds its output", id), 0) end
  end
  error(format("%s %s has no worker yet (it has not started)", target, id), 0)
end

local function last_lines(s, want)
  local lines = {}
  for line in s:gmatch("[^\n]*\n?") do if line ~= "" then lines[#lines + 1] = line end end
  return concat(lines, "", math.max(1, #lines - want + 1))
end

-- The worker's log file, open; raises when none is kept here.
local function worker_file(wid)
  local path = logdir() .. "/worker-" .. wid .. ".out"
  local f = io.open(path, "rb")
  if not f then error("no output kept for worker " .. wid .. " (" .. path .. ")", 0) end
  return f
end

-- A worker's whole log from offset (its last `tail` lines when offset is 0).
-- A file shorter than offset was rotated: read from 0.
local function read_whole(wid, offset, tail)
  local f = worker_file(wid)
  local size = f:seek("end")
  offset = tonumber(offset) or 0
  if offset > size then offset = 0 end
  if tail and offset == 0 then
    -- The last `tail` lines: read back from the end far enough.
    local want = tonumber(tail)
    local from = math.max(0, size - 65536 * math.max(1, math.ceil(want / 256)))
    f:seek("set", from)
    local s = f:read("*a") or ""
    f:close()
    return last_lines(s, want), size, true
  end
  f:seek("set", offset)
  local chunk = f:read(1048576) or ""
  f:close()
  return chunk, offset + #chunk, true
end

-- A task's or actor's prints in worker wid's log. offset 0: from the first
-- the log kept (the part rotation kept, then the current part); else
-- offset - 1 is the current part's index record to go on from. The next
-- offset is at least 1, so a follower never reads the rotated part twice.
-- nil when the worker has no index of prints (yet).
local function slice(loc, wid, offset, max)
  local old = offset == 0 and obs_c.log_slice_rotated(wid, loc.by, loc.sid, max) or ""
  local chunk, nxt = obs_c.log_slice(wid, loc.by, loc.sid, offset > 0 and offset - 1 or 0, max)
  if not chunk and old == "" then return nil end
  return old .. (chunk or ""), (nxt or 0) + 1
end

-- A task's or actor's prints: from `offset` (above) of its worker's log;
-- or, when only the logs' indexes know it, all of them at once.
local function read_slice(loc, offset, tail)
  offset = tonumber(offset) or 0
  local max = tail and 64 * 1048576 or 1048576
  if loc.wids then
    -- One worker ran it: read on from where this read stopped (a slice
    -- past max bytes takes several reads).
    if #loc.wids == 1 then
      local chunk, nxt = slice(loc, loc.wids[1], offset, max)
      chunk = chunk or ""
      if tail and offset == 0 then chunk = last_lines(chunk, tonumber(tail)) end
      return chunk, nxt or offset, false
    end
    if offset > 0 then return "", offset, false end
    local parts = {}
    for i, wid in ipairs(loc.wids) do parts[i] = slice(loc, wid, 0, max) or "" end
    local s = concat(parts)
    return tail and last_lines(s, tonumber(tail)) or s, 1, false
  end
  local chunk, nxt = slice(loc, loc.wid, offset, max)
  if not chunk then
    worker_file(loc.wid):close()
    return "", offset, not loc.ended -- it has printed nothing yet
  end
  if tail and offset == 0 then chunk = last_lines(chunk, tonumber(tail)) end
  return chunk, nxt, not loc.ended
end

-- worker_log(target, id, offset, tail) -> bytes from offset, the next offset,
-- whether more may come; and, when the worker is on another node, nothing
-- but that node's id and the target and id to ask it for (the client asks
-- that node: stdlib/tide/listcli.lua). For a task or an actor, only its own
-- prints (offsets count the worker log's index records, not bytes: see slice).
function M.worker_log(target, id, offset, tail)
  if target == "job" then
    local chunk, status, nxt = ops.job_log(id, offset, tail)
    if tail and (tonumber(offset) or 0) == 0 then chunk = last_lines(chunk, tonumber(tail)) end
    return chunk, nxt, status == "RUNNING"
  end
  local loc = locate(target, id)
  if loc.node then return "", tonumber(offset) or 0, true, loc.node, loc.target, loc.id end
  if loc.by then return read_slice(loc, offset, tail) end
  return read_whole(loc.wid, offset, tail)
end
ops.obs_log = M.worker_log

-- -- User metrics (tide.metrics) ---------------------------------------------------

-- The head keeps a history of tide.train's and tide.data's series
-- (tide_train_*, tide_data_*): the last 600 points of at most 400 series.
local metrics = require("tide.metrics")
local user = metrics._store()
local history = metrics._history(user)
ops.metrics_put = history.op

-- series(prefix, points) -> JSON text: {now, max_series, max_points,
-- series = {{name, labels, points = {{t, v}, ...}}, ...}}; t in seconds
-- since the epoch; a value that is not finite is null.
-- (Written by hand around cjson: this cjson writes an empty table as {}.)
function M.series(prefix, points)
  points = tonumber(points)
  if points then points = math.max(0, math.floor(points)) end
  local out = {}
  for i, s in ipairs(history.series(prefix or "", points)) do
    local pts = {}
    for j, p in ipairs(s.points) do
      local v = p[2]
      if v ~= v or v == math.huge or v == -math.huge then v = cjson.null end
      pts[j] = cjson.encode({p[1], v})
    end
    out[i] = format('{"name":%s,"labels":%s,"points":[%s]}', cjson.encode(s.name), cjson.encode(s.labels),
      concat(pts, ","))
  end
  local ms, mp = history.limits()
  return format('{"now":%s,"max_series":%d,"max_points":%d,"series":[%s]}', cjson.encode(history.now()), ms, mp,
    concat(out, ","))
end

local function jobs_text()
  local counts = {RUNNING = 0, SUCCEEDED = 0, FAILED = 0, STOPPED = 0}
  for _, j in ipairs(ops.job_list and ops.job_list() or {}) do
    counts[j.status] = (counts[j.status] or 0) + 1
  end
  local out = {"# HELP tide_jobs Jobs (tide submit) by status.\n# TYPE tide_jobs gauge\n"}
  local ks = {}
  for k in pairs(counts) do ks[#ks + 1] = k end
  table.sort(ks)
  for _, k in ipairs(ks) do out[#out + 1] = format('tide_jobs{status="%s"} %d\n', k:lower(), counts[k]) end
  return concat(out)
end

-- -- Serve ------------------------------------------------------------------------

-- A serve ingress runs in this process when a `tide serve run --address`
-- attached to this node started it (lua/serve.c): its counts are exact,
-- read from the ingress on each request, not sampled.
local rcore = debug.getregistry()["tide.rpc.core"]

-- A serve ingress on another node (an app attached there) sends its stats
-- and metrics text to its head once a second (lua/serve.c, td__note_head);
-- the head keeps each node's latest until that node leaves or the ingress
-- stops. serves() -> {{node = "node-N", stats = {...}, metrics = text}, ...}:
-- this node's own first (node-0 on a head), then the others' by node.
local function serves()
  local own = {node = format("node-%d", obs_c.node_index()),
    stats = rcore and rcore.serve_stats and rcore.serve_stats() or {},
    metrics = rcore and rcore.serve_metrics and rcore.serve_metrics() or ""}
  local out = {own}
  for _, n in ipairs(obs_c.notes("serve")) do
    local ok, t = pcall(cjson.decode, n.data)
    if ok and type(t) == "table" and type(t.stats) == "table" and type(t.metrics) == "string" then
      out[#out + 1] = {node = n.node, stats = t.stats, metrics = t.metrics}
    end
  end
  table.sort(out, function(a, b)
    if (a == own) ~= (b == own) then return a == own end
    return tonumber(a.node:match("%d+")) < tonumber(b.node:match("%d+"))
  end)
  return out
end

-- The serve metrics of every node as one Prometheus text: each family's
-- HELP and TYPE once, then its samples from each node; another node's
-- samples carry node="node-N" (the head's own stay as they were).
local function serve_text()
  local order, fams = {}, {}
  for i, s in ipairs(serves()) do
    local label = i > 1 and format('{node="%s",', s.node)
    local cur
    for line in s.metrics:gmatch("[^\n]+") do
      local kind, name = line:match("^# (%u+) ([%w_:]+)")
      if kind then
        cur = fams[name]
        if not cur then
          cur = {head = {}, seen = {}, samples = {}}
          fams[name], order[#order + 1] = cur, name
        end
        if not cur.seen[kind] then cur.seen[kind], cur.head[#cur.head + 1] = true, line end
      elseif cur then
        cur.samples[#cur.samples + 1] = label and line:gsub("^([%w_:]+){", "%1" .. label, 1) or line
      end
    end
  end
  local out = {}
  for _, name in ipairs(order) do
    local f = fams[name]
    out[#out + 1] = concat(f.head, "\n")
    if #f.samples > 0 then out[#out + 1] = concat(f.samples, "\n") end
  end
  return #out > 0 and concat(out, "\n") .. "\n" or ""
end

-- serve_json() -> {"deployments": [{name, node, route, replicas, ongoing,
-- queued, requests, errors, rejected, rate, p50_ms, p99_ms, codes}, ...]},
-- by node (this one first), then name.
function M.serve_json()
  local out = {}
  for _, s in ipairs(serves()) do
    local names = {}
    for name in pairs(s.stats) do names[#names + 1] = name end
    table.sort(names)
    for _, name in ipairs(names) do
      local d = s.stats[name]
      out[#out + 1] = cjson.encode({name = name, node = s.node, route = d.route, replicas = d.live,
        ongoing = d.ongoing, queued = d.queued, requests = d.requests, errors = d.errors, rejected = d.rejected,
        rate = d.rate, p50_ms = d.p50 and d.p50 * 1000 or cjson.null, p99_ms = d.p99 and d.p99 * 1000 or cjson.null,
        codes = next(d.codes) and d.codes or cjson.null})
    end
  end
  -- Written by hand around cjson: this cjson writes an empty table as {}.
  return format('{"deployments":[%s]}', concat(out, ","))
end

function M.metrics_text()
  return obs_c.metrics() .. jobs_text() .. serve_text() .. user.text()
end
ops.obs_metrics = M.metrics_text

-- -- The dashboard's router -----------------------------------------------------------

local function unescape(s)
  return (s:gsub("+", " "):gsub("%%(%x%x)", function(h) return string.char(tonumber(h, 16)) end))
end

local function parse_query(q)
  local t, filters = {}, {}
  for part in q:gmatch("[^&]+") do
    local k, v = part:match("^([^=]*)=(.*)$")
    if k then
      k, v = unescape(k), unescape(v)
      if k == "filter" then
        local fk, fv = v:match("^([^=]+)=(.*)$")
        if not fk then error("filter needs key=value, not " .. v, 0) end
        filters[#filters + 1] = {fk, fv}
      else
        t[k] = v
      end
    end
  end
  return t, filters
end

local TYPES = {html = "text/html; charset=utf-8", js = "application/javascript; charset=utf-8",
  css = "text/css; charset=utf-8", svg = "image/svg+xml"}
local PAGES = {["/"] = true, ["/nodes"] = true, ["/actors"] = true, ["/tasks"] = true, ["/objects"] = true,
  ["/placement-groups"] = true, ["/jobs"] = true, ["/training"] = true, ["/data"] = true, ["/serve"] = true}

local function file(name)
  local f = io.open(home .. "/stdlib/tide/dashboard/" .. name, "rb")
  if not f then return nil end
  local s = f:read("*a")
  f:close()
  return s
end

local function json_error(status, msg)
  return status, "application/json", cjson.encode({error = msg})
end

-- http(method, path, query) -> status, content type, body
function M.http(method, path, query)
  if method ~= "GET" and method ~= "HEAD" then return 405, "text/plain", "only GET\n" end
  if path == "/metrics" then
    return 200, "text/plain; version=0.0.4; charset=utf-8", M.metrics_text()
  end
  if PAGES[path] then
    local s = file("index.html")
    if not s then return 500, "text/plain", "the dashboard's files are missing from " .. home .. "\n" end
    return 200, TYPES.html, s
  end
  local kind = path:match("^/api/list/([%w%-]+)$")
  if kind then
    local okq, q, filters = pcall(parse_query, query)
    if not okq then return json_error(400, q) end
    local ok, res = pcall(M.list, kind, filters, q.limit, q.offset)
    if not ok then return json_error(400, tostring(res)) end
    return 200, "application/json", res
  end
  if path == "/api/logs" then
    local okq, q = pcall(parse_query, query)
    if not okq then return json_error(400, q) end
    local ok, chunk, nxt, more = pcall(M.worker_log, q.kind or "job", q.id, q.offset, q.tail)
    if not ok then return json_error(404, tostring(chunk)) end
    return 200, "application/json", cjson.encode({data = chunk, offset = nxt, more = more})
  end
  if path == "/api/serve" then return 200, "application/json", M.serve_json() end
  if path == "/api/series" then
    local okq, q = pcall(parse_query, query)
    if not okq then return json_error(400, q) end
    return 200, "application/json", M.series(q.prefix, q.points)
  end
  local name = path:match("^/static/([%w_%-]+%.%a+)$")
  local ext = name and name:match("%.(%a+)$")
  if name and TYPES[ext] then
    local s = file(name)
    if s then return 200, TYPES[ext], s end
  end
  return 404, "text/plain", "not found: " .. path .. "\n"
end

return M
