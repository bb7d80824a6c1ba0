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
for i, n in ipairs(nodes) do
  print(string.format("%s %s(%s, alive)", n.node_id, i == 1 and "this node " or "", n.name or "?"))
  print("  resources (used / total):")
  used_total(n.resources, n.available)
  if i > 1 then print(string.format("  tasks running %d, actors %d", n.tasks, n.actors)) end
end
local s = tide.stats()
print("this node:")
print(string.format("  workers %d, actors %d, tasks running %d, queued %d", s.workers, s.actors,
  s.tasks_running, s.tasks_queued))
print(string.format("  objects %d, store %d / %d bytes, %d bytes spilled", s.objects, s.store_used,
  s.store_capacity, s.spilled_bytes))
print(string.format("  connections refused (no valid cluster key): %d", s.refused_connections or 0))
