-- tide status: what the node this process is attached to is doing, and on
-- a head every node joined to it.
-- Also the REPL's :status. Sizes are in human units (B, KiB, MiB, GiB, TiB)
-- everywhere, counts as plain numbers (never 3.5e+10).
local tide = require("tide")

local function human(b)
  b = tonumber(b) or 0
  if b < 1024 then return string.format("%d B", b) end
  local units = {"KiB", "MiB", "GiB", "TiB", "PiB"}
  local u = 0
  repeat b = b / 1024; u = u + 1 until b < 1024 or u == #units
  return string.format(b < 10 and "%.2f %s" or "%.1f %s", b, units[u])
end

local function num(x)
  if x == math.floor(x) and math.abs(x) < 2 ^ 53 then return string.format("%d", x) end
  return string.format("%.4g", x)
end

-- Resources measured in bytes.
local BYTES = {memory = true, object_store_memory = true}

local function used_total(total, avail)
  local names = {}
  for k in pairs(total) do names[#names + 1] = k end
  table.sort(names)
  for _, k in ipairs(names) do
    local f = BYTES[k] and human or num
    print(string.format("    %-10s %s / %s", k, f(total[k] - (avail[k] or 0)), f(total[k])))
  end
end

-- tide status --why REF_OR_TASK (cmd/client.c passes it in TIDE_STATUS_WHY): why
-- that object or task is not done, then nothing else.
local why = os.getenv("TIDE_STATUS_WHY")
if why then
  local core = require("tide.core")
  local id = why:match("^ObjectRef%((%x+)%)$") or why
  if not id:match("^%x+$") or #id > 16 then
    io.stderr:write("tide: status --why needs an ObjectRef's or a task's id (up to 16 hex digits), got ", why,
      "\nsee 'tide status --help'\n")
    os.exit(2)
  end
  id = string.rep("0", 16 - #id) .. id:lower()
  local text, found = core.why(id, 1)
  print(text)
  os.exit(found and 0 or 1)
end

local nodes = tide.nodes()
if #nodes > 1 then
  print(string.format("cluster: %d nodes", #nodes))
  print("  resources (used / total):")
  used_total(tide.cluster_resources(), tide.available_resources())
end
-- Nodes beat every second: one not heard from for longer may be dead, and
-- its figures are those of its last heartbeat.
local STALE_S = 2.5
local function stale(n) return (n.last_heartbeat_s or 0) > STALE_S end
if #nodes > 1 then
  local o, u, c, q, left = 0, 0, 0, 0, {}
  for _, n in ipairs(nodes) do
    if stale(n) then
      left[#left + 1] = n.node_id
    elseif n.stats then
      o, u, c, q = o + n.stats.objects, u + n.stats.store_used, c + n.stats.store_capacity, q + n.stats.tasks_queued
    end
  end
  print(string.format("  objects %d, store %s / %s, tasks queued %d%s", o, human(u), human(c), q,
    #left > 0 and " (without " .. table.concat(left, ", ") .. ": no recent heartbeat)" or ""))
end
for i, n in ipairs(nodes) do
  local state = stale(n) and string.format("no heartbeat for %.1f s", n.last_heartbeat_s) or "alive"
  print(string.format("%s %s(%s, %s)", n.node_id, i == 1 and "this node " or "", n.name or "?", state))
  print("  resources (used / total):")
  used_total(n.resources, n.available)
  local st = n.stats
  if i > 1 and st then
    print(string.format("  workers %d, actors %d, tasks running %d, queued %d", st.workers, st.actors,
      st.tasks_running, st.tasks_queued))
    print(string.format("  objects %d, store %s / %s, %s spilled", st.objects, human(st.store_used),
      human(st.store_capacity), human(st.spilled_bytes)))
    print(string.format("  objects sent to other nodes %s, fetched from other nodes %s", human(st.bytes_sent or 0),
      human(st.bytes_from_peers or 0)))
  elseif i > 1 then
    print(string.format("  tasks running %d, actors %d (sent by the head)", n.tasks, n.actors))
  end
end
local s = tide.stats()
print("this node:")
print(string.format("  workers %d, actors %d, tasks running %d, queued %d", s.workers, s.actors,
  s.tasks_running, s.tasks_queued))
print(string.format("  objects %d, store %s / %s, %s spilled", s.objects, human(s.store_used),
  human(s.store_capacity), human(s.spilled_bytes)))
print(string.format("  objects sent to other nodes %s, fetched from nodes other than the head %s",
  human(s.bytes_sent), human(s.bytes_from_peers)))
print(string.format("  connections refused (no valid cluster key): %d", s.refused_connections or 0))
