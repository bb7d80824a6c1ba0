-- `tide bench dashboard`: the head's dashboard with 100,000 live actors
-- (TIDE_BENCH_SCALE scales it). A head is started as a daemon in a session
-- directory of its own, a driver attached to it creates the actors (no
-- names: they are found by id), then each page and endpoint is asked for 5
-- times with curl; the median time is reported against issue 17's 200 ms.
return function(b)
  local exe = os.getenv("TIDE_HOME") .. "/bin/tide"
  local dir = os.tmpname()
  os.remove(dir)
  local env = "TIDE_SESSION_DIR=" .. dir
  local n = math.floor(100000 * b.SCALE)
  os.execute("mkdir -p " .. dir)
  os.execute(env .. " " .. exe .. " start --head --port 0 --dashboard-port 0 --num-cpus 2 >/dev/null 2>&1")
  local f = io.open(dir .. "/dashboard.port")
  local port = f and f:read("*n")
  if f then f:close() end
  if not port then
    io.stderr:write("bench dashboard: the head did not start (see " .. dir .. "/node.log)\n")
    return
  end
  local drv = dir .. "/actors.lua"
  f = io.open(drv, "w")
  f:write([[
local tide = require("tide")
local A = tide.actor({ping = function() return 1 end})
local hs, refs = {}, {}
for i = 1, tonumber(arg[1]) do hs[i] = A:options({lifetime = "detached"}):remote() end
for i = 1, #hs, 997 do refs[#refs + 1] = hs[i]:ping() end
tide.get(refs)
]])
  f:close()
  local t0 = b.now()
  os.execute(string.format("%s %s run --address local %s %d >/dev/null 2>&1", env, exe, drv, n))
  b.m("dashboard_create_actors", n / (b.now() - t0), "actors/s", nil, {actors = n})
  local function median(path)
    local ts = {}
    for k = 1, 5 do
      local p = io.popen(string.format("curl -s -o /dev/null -w '%%{time_total}' 'http://127.0.0.1:%d%s'", port, path))
      ts[k] = tonumber(p:read("*a")) or 0
      p:close()
    end
    table.sort(ts)
    return ts[3] * 1000
  end
  local pages = {
    {"dashboard_page_actors_html", "/actors"},
    {"dashboard_api_actors_page", "/api/list/actors?limit=50"},
    {"dashboard_api_actors_last_page", "/api/list/actors?limit=50&offset=" .. (n - 50)},
    {"dashboard_api_actors_filtered", "/api/list/actors?filter=state%3DALIVE&limit=50"},
    {"dashboard_api_tasks_running", "/api/list/tasks?filter=state%3DRUNNING&limit=1"},
    {"dashboard_metrics", "/metrics"},
  }
  for _, p in ipairs(pages) do
    b.m(p[1], median(p[2]), "ms", 200, {actors = n, path = p[2], note = "median of 5 (curl), target <= 200 ms"})
  end
  os.execute(env .. " " .. exe .. " stop >/dev/null 2>&1")
  os.execute("rm -rf " .. dir)
end
