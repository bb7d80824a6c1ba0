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

local function show(j)
  print(string.format("%-22s %-10s pid %-7s exit %-4s %s", j.id, j.status, tostring(j.pid),
    j.exit_code and tostring(j.exit_code) or "-", j.script))
end

local args = {}
local i = 1
while i <= #arg do
  if arg[i] == "--address" then i = i + 2 else args[#args + 1] = arg[i]; i = i + 1 end
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
  local f = io.open(script, "r")
  if not f then die("submit: cannot read " .. script, 1) end
  f:close()
  local rest = {}
  for n = k + 1, #args do rest[#rest + 1] = args[n] end
  local j = core.call_node("job_submit", abspath(script), rest, wd or abspath("."),
    os.getenv("TIDE_EXE"), os.getenv("TIDE_NODE_SOCKET"))
  print("submitted " .. j.id)
  print("  tide job status " .. j.id .. "\n  tide job logs " .. j.id .. " --follow")
elseif cmd == "job" then
  local sub, id = args[2], args[3]
  if sub == "list" then
    for _, j in ipairs(core.call_node("job_list")) do show(j) end
  elseif sub == "status" and id then
    show(core.call_node("job_status", id))
  elseif sub == "stop" and id then
    show(core.call_node("job_stop", id))
  elseif sub == "logs" and id then
    local follow = args[4] == "--follow"
    local j = core.call_node("job_status", id)
    local f = io.open(j.log, "r")
    if not f then die("no log for " .. id, 1) end
    while true do
      local chunk = f:read("*a")
      if chunk and #chunk > 0 then io.write(chunk); io.flush() end
      if not follow then break end
      j = core.call_node("job_status", id)
      if j.status ~= "RUNNING" then
        local rest = f:read("*a")
        if rest then io.write(rest) end
        break
      end
      require("tide").sleep(0.2)
    end
    f:close()
  else
    die("usage: tide job list | status ID | logs ID [--follow] | stop ID")
  end
else
  die("usage: tide submit [--working-dir D] SCRIPT [ARGS...]")
end
