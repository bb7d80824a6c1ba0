-- What a task's output costs (docs/performance.md, "Lua writes in a
-- task"): one task writes N times to stdout -- io.write of whole lines,
-- io.write of one byte, print -- and the driver times tide.get around it
-- on a warm worker. Prints the median of R runs per kind on stderr.
--   bin/tide run bench/task_output.lua [N [R]] >/dev/null
--   bin/tide run --address local bench/task_output.lua ...   (a daemon: worker logs)
local tide = require("tide")
local core = require("tide.core")
local n, r = tonumber(arg[1] or 10000), tonumber(arg[2] or 5)
local f = tide.remote(function(kind, k)
  if kind == "line" then
    for i = 1, k do io.write("line ", i, "\n") end
  elseif kind == "part" then
    for _ = 1, k do io.write("x") end
    io.write("\n")
  else
    for i = 1, k do print("line", i) end
  end
  return true
end)
tide.get(f:remote("line", 10))
for _, kind in ipairs({"line", "part", "print"}) do
  local ts = {}
  for i = 1, r do
    local t0 = core.now()
    tide.get(f:remote(kind, n))
    ts[i] = core.now() - t0
  end
  table.sort(ts)
  io.stderr:write(string.format("%s %.2f ms\n", kind, ts[math.floor((r + 1) / 2)] * 1000))
end
