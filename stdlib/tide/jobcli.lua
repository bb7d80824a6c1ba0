-- tide submit / tide job: the client side of jobs kept by a running node.
--   tide submit [--address A] [--working-dir D] SCRIPT [ARGS...]
--   tide job list | status ID | logs ID [--follow] | stop ID
local core = require("tide.core")

local function die(msg, code)
  io.stderr:write("tide: ", msg, "\n")
  os.exit(code or 2)
end

if not core.call_node then die("no node to talk to (start one with `tide start --head`)", 1) end

local function abspath(p)
  if p:sub(1, 1) == "/" then return p end
  local cwd = os.getenv("PWD") or io.popen("pwd"):read("*l")
  return cwd .. "/" .. p
end

-- A working directory as one package ("TDPKG1", engine/pkg.h): every
-- regular file under dir (but .git), named by its path relative to dir.
local function le(v, bytes)
  local t = {}
  for b = 1, bytes do
    t[b] = string.char(v % 256)
    v = math.floor(v / 256)
  end
  return table.concat(t)
end
local function pack(dir)
  local q = "'" .. dir:gsub("'", "'\\''") .. "'"
  local p = io.popen("cd " .. q .. " && find . -type f -not -path './.git/*' | LC_ALL=C sort")
  local parts, n, total = {}, 0, 0
  for path in p:lines() do
    path = path:gsub("^%./", "")
    local f = io.open(dir .. "/" .. path, "rb")
    if f then
      local data = f:read("*a")
      f:close()
      total = total + #data
      if total > 512 * 1024 * 1024 then die("submit: the working directory is over 512 MiB", 1) end
      parts[#parts + 1] = le(#path, 4) .. path .. le(#data, 8) .. data
      n = n + 1
    end
  end
  p:close()
  return "TDPKG1" .. le(n, 4) .. table.concat(parts)
end

-- A call to the node; its error (an unknown job id, ...) ends the command
-- with that message, not a Lua traceback.
local function call(...)
  local res = {pcall(core.call_node, ...)}
  if not res[1] then
    local err = res[2]
    die(type(err) == "table" and tostring(err.message or err) or tostring(err), 1)
  end
  return unpack(res, 2)
end

local function show(j)
  print(string.format("%-22s %-10s pid %-7s exit %-4s %s", j.id, j.status, tostring(j.pid),
    j.exit_code and tostring(j.exit_code) or "-", j.script))
end

-- The arguments were checked by cmd/client.c (td__jobcli_args) already.
local args, follow = {}, false
local i = 1
while i <= #arg do
  if arg[i] == "--address" or arg[i] == "--key" then i = i + 2
  elseif arg[1] == "job" and arg[i] == "--follow" then follow = true; i = i + 1
  else args[#args + 1] = arg[i]; i = i + 1 end
end

local cmd = args[1]
if cmd == "submit" then
  local wd, k = nil, 2
  while args[k] and args[k]:sub(1, 2) == "--" do
    if args[k] == "--working-dir" and args[k + 1] then wd = abspath(args[k + 1]); k = k + 2
    else die("submit: unknown option " .. args[k]) end
  end
  local script = args[k]
  if not script then die("submit needs a SCRIPT") end
  local function readable(path)
    local f = io.open(path, "r")
    if f then f:close() end
    return f ~= nil
  end
  -- With --working-dir D, a relative SCRIPT is named inside D (as the job
  -- sees it); a path to a file under D from here works too.
  local inside
  if wd then
    wd = wd:gsub("/+$", "")
    if wd == "" then wd = "/" end
    if os.execute("test -d '" .. wd:gsub("'", "'\\''") .. "'") ~= 0 then
      die("submit: --working-dir " .. wd .. " is not a directory", 1)
    end
    local s = abspath(script)
    if script:sub(1, 1) ~= "/" and readable(wd .. "/" .. script) then
      inside = script:gsub("^%./", "")
    elseif s:sub(1, #wd + 1) == wd .. "/" and readable(s) then
      inside = s:sub(#wd + 2)
    elseif readable(script) then
      inside = abspath(script)
    else
      die("submit: no " .. script .. " in the working directory " .. wd, 1)
    end
  elseif not readable(script) then
    die("submit: cannot read " .. script, 1)
  end
  local rest = {}
  for n = k + 1, #args do rest[#rest + 1] = args[n] end
  local j
  if wd then
    -- Shipped: the node keeps it by content hash, and every node that runs
    -- the job's work fetches it once. The script is named inside it.
    local blob = pack(wd)
    local hash = core.pkg_hash(blob)
    call("pkg_put", hash, blob)
    j = call("job_submit", inside, rest, false, os.getenv("TIDE_EXE") or false, false, hash)
  else
    j = call("job_submit", abspath(script), rest, abspath("."),
      os.getenv("TIDE_EXE"), os.getenv("TIDE_NODE_SOCKET"))
  end
  print("submitted " .. j.id)
  print("  tide job status " .. j.id .. "\n  tide job logs " .. j.id .. " --follow")
elseif cmd == "job" then
  local sub, id = args[2], args[3]
  if sub == "list" then
    for _, j in ipairs(call("job_list")) do show(j) end
  elseif sub == "status" and id then
    show(call("job_status", id))
  elseif sub == "stop" and id then
    -- The node signals the job's driver and answers at once; the status
    -- shown is the one after the driver has gone (it exits within about a
    -- second of SIGTERM), not the RUNNING of the moment before.
    local j = call("job_stop", id)
    local until_t = os.time() + 10
    while j.status == "RUNNING" and os.time() <= until_t do
      require("tide").sleep(0.1)
      j = call("job_status", id)
    end
    show(j)
    if j.status == "RUNNING" then die("job " .. id .. " is still running 10 s after SIGTERM", 1) end
  elseif sub == "logs" and id then
    -- Through the node, so it works from any machine.
    local off = 0
    while true do
      local chunk, status = call("job_log", id, off)
      if #chunk > 0 then io.write(chunk); io.flush(); off = off + #chunk end
      if #chunk == 0 and (not follow or status ~= "RUNNING") then break end
      if #chunk == 0 then require("tide").sleep(0.2) end
    end
  else
    die("usage: tide job list | status ID | logs ID [--follow] | stop ID")
  end
else
  die("usage: tide submit [--working-dir D] SCRIPT [ARGS...]")
end
