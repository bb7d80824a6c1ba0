-- tide list / tide logs: the client side, asking the head (one request per
-- page; filtering and limits are done there, stdlib/tide/obs.lua).
--   tide list KIND [--filter K=V]... [--limit N] [--offset N] [--json]
--   tide logs worker|actor|task|job ID [--follow] [--tail N]
-- The arguments were checked by cmd/client.c (td__listcli_args) already.
local core = require("tide.core")
local cjson = require("cjson")
local format = string.format

local function die(msg, code)
  io.stderr:write("tide: ", msg, "\n")
  os.exit(code or 2)
end

if not core.call_node then die("no node to talk to (start one with `tide start --head`)", 1) end

local function call(...)
  local res = {pcall(core.call_node, ...)}
  if not res[1] then
    local err = res[2]
    local msg = type(err) == "table" and tostring(err.message or err) or tostring(err)
    if msg:match("unknown operation") then
      msg = msg .. " (the node is older than this tide, or not a head: restart it)"
    end
    die(msg, 1)
  end
  return unpack(res, 2)
end

local cmd = arg[1]
local pos, filters, opts = {}, {}, {}
local i = 2
while i <= #arg do
  local a = arg[i]
  if a == "--address" or a == "--key" then i = i + 2
  elseif a == "--filter" then
    local k, v = arg[i + 1]:match("^([^=]+)=(.*)$")
    filters[#filters + 1] = {k, v}
    i = i + 2
  elseif a == "--limit" or a == "--offset" or a == "--tail" then opts[a:sub(3)] = tonumber(arg[i + 1]); i = i + 2
  elseif a == "--json" or a == "--follow" then opts[a:sub(3)] = true; i = i + 1
  else pos[#pos + 1] = a; i = i + 1 end
end

-- -- tide list ------------------------------------------------------------------

-- The columns a table shows, per kind (--json has every field).
local COLUMNS = {
  nodes = {"node_id", "name", "address", "state", "workers", "actors", "tasks_running", "tasks_queued",
    "store_used", "store_capacity"},
  actors = {"actor_id", "state", "name", "node", "pid", "restarts", "queued_calls", "death_reason"},
  tasks = {"task_id", "state", "type", "name", "method", "node", "pid", "running_s", "wait_reason", "error"},
  objects = {"object_id", "state", "size", "where", "refs", "pins"},
  ["placement-groups"] = {"pg_id", "name", "state", "strategy", "nodes"},
  jobs = {"id", "status", "pid", "exit_code", "script"},
}

local function cell(v)
  if v == nil or v == cjson.null then return "" end
  if type(v) == "table" then return cjson.encode(v) end
  if type(v) == "number" then
    if v == math.floor(v) and math.abs(v) < 2 ^ 53 then return format("%d", v) end
    return format("%.3f", v)
  end
  return (tostring(v):gsub("\n.*", " ..."))
end

local function table_print(kind, res)
  local cols = COLUMNS[kind]
  local rows, width = {}, {}
  for c, name in ipairs(cols) do width[c] = #name end
  for r, row in ipairs(res.rows) do
    rows[r] = {}
    for c, name in ipairs(cols) do
      local s = cell(row[name])
      if #s > 60 then s = s:sub(1, 57) .. "..." end
      rows[r][c] = s
      if #s > width[c] then width[c] = #s end
    end
  end
  local function line(cells)
    local parts = {}
    for c = 1, #cols do parts[c] = cells[c] .. string.rep(" ", width[c] - #cells[c]) end
    print((table.concat(parts, "  "):gsub("%s+$", "")))
  end
  local head = {}
  for c, name in ipairs(cols) do head[c] = name:upper() end
  line(head)
  for _, r in ipairs(rows) do line(r) end
end

if cmd == "list" then
  local kind = pos[1]
  local text = call("obs_list", kind, filters, opts.limit or 100, opts.offset or 0)
  local res = cjson.decode(text)
  local shown = #res.rows
  if opts.json then
    io.write(text, "\n")
  else
    table_print(kind, res)
  end
  local note
  if res.truncated then
    note = format("%d of %d matching %s shown (from %d); --limit N or --offset N for more", shown, res.matched,
      kind, res.offset)
  elseif shown == 0 then
    note = format("no %s%s", kind, #filters > 0 and " match the filters" or "")
  end
  -- On stderr: --json output stays one JSON document.
  if note then io.stderr:write(note, "\n") end
  os.exit(0)
end

-- -- tide logs ------------------------------------------------------------------

-- A worker on another node: a task placed there (no CPU, no retry) asks
-- that node for the bytes, which come back through the head.
local fetch
local function log_chunk(off, tail)
  local chunk, nxt, more, node, target, id = call("obs_log", pos[1], pos[2], off, tail)
  if not node then return chunk, nxt, more end
  local tide = require("tide")
  fetch = fetch or tide.remote(function(...) return {pcall(require("tide.core").call_node, "obs_log", ...)} end)
  local on = {num_cpus = 0, max_retries = 0, scheduling_strategy = {node_id = node, soft = false}}
  local ok, r = pcall(tide.get, fetch:options(on):remote(target, id, off, tail), {timeout = 60})
  if not ok then
    die(format("cannot read the log on %s: %s", node, type(r) == "table" and tostring(r.message) or tostring(r)), 1)
  end
  if not r[1] then die(format("%s (on %s)", tostring(r[2]), node), 1) end
  if r[5] then die(format("%s %s: %s says it is on %s", pos[1], pos[2], node, r[5]), 1) end
  return r[2], r[3], r[4]
end

local off = 0
local tail = opts.tail
while true do
  local chunk, nxt, more = log_chunk(off, tail)
  tail = nil
  if #chunk > 0 then io.write(chunk); io.flush() end
  if nxt < off then io.stderr:write("tide: (the log was rotated)\n") end
  local grew = nxt ~= off
  off = nxt
  if not opts.follow then
    if #chunk == 0 or #chunk < 1048576 then break end
  elseif not more and not grew then
    break
  elseif not grew then
    require("tide").sleep(0.25)
  end
end
