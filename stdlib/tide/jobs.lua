-- tide.jobs: driver scripts submitted to a running node (`tide submit`),
-- kept by the node itself: each job runs as `tide run --address <node>` in
-- its working directory, its output in the session's jobs/ directory.
-- These functions run inside the node daemon, called by clients via RPC.
local M = {}

local jobs, order = {}, {}
local format = string.format

-- On a head with a store (head.db) the table is kept there too, so a
-- restarted head still lists, reports and shows the logs of its jobs.
local core = debug.getregistry()["tide.rpc.core"]
local function keep(j)
  if core and core.persist then
    pcall(core.persist, "job", j.id, core.encode({id = j.id, status = j.status, script = j.script,
      args = j.args, wd = j.wd, pid = j.pid, started = j.started, ended = j.ended, log = j.log,
      dir = j.dir, exit_code = j.exit_code, stopped = j.stopped}))
  end
end
if core and core.persisted then
  local rows = core.persisted("job")
  local ids = {}
  for id in pairs(rows) do ids[#ids + 1] = id end
  table.sort(ids)
  for _, id in ipairs(ids) do
    local ok, j = pcall(core.decode, rows[id])
    if ok and type(j) == "table" and j.id then
      jobs[id] = j
      order[#order + 1] = id
    end
  end
end

local function sh_quote(s)
  return "'" .. tostring(s):gsub("'", "'\\''") .. "'"
end

local function session()
  return os.getenv("TIDE_SESSION_DIR") or ("/tmp/tide-" .. (os.getenv("TIDE_UID") or "0"))
end

local function read_file(path)
  local f = io.open(path, "r")
  if not f then return nil end
  local s = f:read("*a")
  f:close()
  return s
end

local refresh_
local function refresh(j)
  local before = j.status
  refresh_(j)
  if j.status ~= before then keep(j) end
end
refresh_ = function(j)
  if j.status ~= "RUNNING" then return end
  local code = read_file(j.dir .. "/" .. j.id .. ".exit")
  if code then
    j.exit_code = tonumber(code:match("%d+"))
    j.status = j.stopped and "STOPPED" or (j.exit_code == 0 and "SUCCEEDED" or "FAILED")
    j.ended = os.time()
  elseif j.pid and os.execute("kill -0 " .. j.pid .. " 2>/dev/null") ~= 0 then
    -- Gone without leaving an exit status (killed hard).
    j.status = j.stopped and "STOPPED" or "FAILED"
    j.ended = os.time()
  end
end

local function view(j)
  refresh(j)
  return {id = j.id, status = j.status, script = j.script, args = j.args, working_dir = j.wd,
    pid = j.pid, exit_code = j.exit_code, started = j.started, ended = j.ended, log = j.log}
end

-- job_submit(script, args, working_dir, exe, socket) -> job view
-- pkg_put(hash, blob) -> dir: a working directory shipped by `tide submit`,
-- unpacked into this machine's package cache (nodes fetch it from here).
function M.pkg_put(hash, blob)
  return core.pkg_install(hash, blob)
end

-- job_submit(script, args, working_dir, exe, socket[, pkg]) -> job view.
-- With pkg, working_dir is ignored: the job runs in the package's
-- directory, and so do its tasks and actors on every node.
function M.job_submit(script, args, wd, exe, _, pkg)
  if type(script) ~= "string" or script == "" then error("job_submit: script must be a path", 0) end
  local env = ""
  if wd == false then wd = nil end
  if pkg then
    wd = core.pkg_install(pkg)  -- already here: just its directory
    env = "TIDE_PKG=" .. sh_quote(pkg) .. " "
  end
  -- The driver attaches to this node with this node's own binary (the
  -- submitter may be another machine).
  local own = (os.getenv("TIDE_HOME") or "") .. "/bin/tide"
  if io.open(own, "r") then exe = own end
  local sock = session() .. "/node.sock"
  local dir = session() .. "/jobs"
  os.execute("mkdir -p " .. sh_quote(dir))
  local id = format("job-%d-%04d", os.time(), #order + 1)
  local log = dir .. "/" .. id .. ".log"
  local argv = {}
  for i, a in ipairs(args or {}) do argv[i] = sh_quote(a) end
  local cmd = format("cd %s && (%s%s run --address %s %s %s; echo $? > %s) > %s 2>&1 < /dev/null & echo $!",
    sh_quote(wd or "."), env, sh_quote(exe), sh_quote(sock), sh_quote(script), table.concat(argv, " "),
    sh_quote(dir .. "/" .. id .. ".exit"), sh_quote(log))
  local p = io.popen(cmd)
  local pid = tonumber(p:read("*l") or "")
  p:close()
  local j = {id = id, status = pid and "RUNNING" or "FAILED", script = script, args = args or {},
    wd = wd, pid = pid, started = os.time(), log = log, dir = dir, pkg = pkg}
  jobs[id] = j
  order[#order + 1] = id
  keep(j)
  return view(j)
end

-- job_log(id, offset[, tail]) -> bytes of the job's output from offset
-- (0-based), status, the offset after them: for `tide job logs` and `tide
-- logs job` from any machine. tail (from offset 0): the log's last MiB
-- instead, for the caller to cut its last lines from.
function M.job_log(id, offset, tail)
  local j = jobs[id]
  if not j then error("no job " .. tostring(id), 0) end
  refresh(j)
  local f = io.open(j.log, "rb")
  offset = tonumber(offset) or 0
  if not f then return "", j.status, offset end
  if tail and offset == 0 then offset = math.max(0, f:seek("end") - 1048576) end
  f:seek("set", offset)
  local chunk = f:read(1048576) or ""
  f:close()
  return chunk, j.status, offset + #chunk
end

function M.job_list()
  local out = {}
  for i, id in ipairs(order) do out[i] = view(jobs[id]) end
  return out
end

function M.job_status(id)
  local j = jobs[id]
  if not j then error("no job " .. tostring(id), 0) end
  return view(j)
end

function M.job_stop(id)
  local j = jobs[id]
  if not j then error("no job " .. tostring(id), 0) end
  refresh(j)
  if j.status == "RUNNING" and j.pid then
    j.stopped = true
    keep(j)
    -- The job's shell and its driver: the driver's workers die with it.
    -- The driver (child of the job's shell) gets SIGTERM; the shell then
    -- records its exit status.
    os.execute(format("pkill -TERM -P %d 2>/dev/null", j.pid))
  end
  return view(j)
end

return M
