-- tide status: what the node this process is attached to is doing.
local tide = require("tide")
local total, avail = tide.cluster_resources(), tide.available_resources()
local names = {}
for k in pairs(total) do names[#names + 1] = k end
table.sort(names)
print("node-0 (alive)")
print("  resources (used / total):")
for _, k in ipairs(names) do
  print(string.format("    %-10s %g / %g", k, total[k] - (avail[k] or 0), total[k]))
end
local s = tide.stats()
print(string.format("  workers %d, actors %d, tasks running %d, queued %d", s.workers, s.actors,
  s.tasks_running, s.tasks_queued))
print(string.format("  objects %d, store %d / %d bytes, %d bytes spilled", s.objects, s.store_used,
  s.store_capacity, s.spilled_bytes))
print(string.format("  connections refused (no valid cluster key): %d", s.refused_connections or 0))
