-- tide status: what the node this process is attached to is doing, and on
-- a head every node joined to it.
local tide = require("tide")

local function used_total(total, avail)
  local names = {}
  for k in pairs(total) do names[#names + 1] = k end
  table.sort(names)
  for _, k in ipairs(names) do
    print(string.format("    %-10s %g / %g", k, total[k] - (avail[k] or 0), total[k]))
  end
end

local nodes = tide.nodes()
if #nodes > 1 then
  print(string.format("cluster: %d nodes", #nodes))
  print("  resources (used / total):")
  used_total(tide.cluster_resources(), tide.available_resources())
end
local function gib(b) return string.format("%.2f GiB", b / 2 ^ 30) end
if #nodes > 1 then
  local o, u, c, q = 0, 0, 0, 0
  for _, n in ipairs(nodes) do
    if n.stats then
      o, u, c, q = o + n.stats.objects, u + n.stats.store_used, c + n.stats.store_capacity, q + n.stats.tasks_queued
    end
  end
  print(string.format("  objects %d, store %s / %s, tasks queued %d", o, gib(u), gib(c), q))
end
for i, n in ipairs(nodes) do
  print(string.format("%s %s(%s, alive)", n.node_id, i == 1 and "this node " or "", n.name or "?"))
  print("  resources (used / total):")
  used_total(n.resources, n.available)
  local st = n.stats
  if i > 1 and st then
    print(string.format("  workers %d, actors %d, tasks running %d, queued %d", st.workers, st.actors,
      st.tasks_running, st.tasks_queued))
    print(string.format("  objects %d, store %s / %s, %s spilled", st.objects, gib(st.store_used),
      gib(st.store_capacity), gib(st.spilled_bytes)))
    print(string.format("  objects sent to other nodes %s, fetched from other nodes %s", gib(st.bytes_sent or 0),
      gib(st.bytes_from_peers or 0)))
  elseif i > 1 then
    print(string.format("  tasks running %d, actors %d (sent by the head)", n.tasks, n.actors))
  end
end
local s = tide.stats()
print("this node:")
print(string.format("  workers %d, actors %d, tasks running %d, queued %d", s.workers, s.actors,
  s.tasks_running, s.tasks_queued))
print(string.format("  objects %d, store %d / %d bytes, %d bytes spilled", s.objects, s.store_used,
  s.store_capacity, s.spilled_bytes))
print(string.format("  object bytes sent to other nodes %d, fetched from nodes other than the head %d",
  s.bytes_sent, s.bytes_from_peers))
print(string.format("  connections refused (no valid cluster key): %d", s.refused_connections or 0))
