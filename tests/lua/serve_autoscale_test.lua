-- tide.serve autoscaling over real HTTP: replicas grow under concurrent
-- slow requests up to max_replicas, new replicas take traffic, short spikes
-- under upscale_delay_s do not scale, idle deployments shrink back to
-- min_replicas after downscale_delay_s, and every decision is logged to
-- stderr as "[serve] scaling ...".  The controller runs in serve.poll.
-- Run: bin/tide run tests/lua/serve_autoscale_test.lua
local t = dofile("tests/lua/harness.lua")
local tide = require("tide")
tide.init({num_cpus = 4})
local serve = require("tide.serve")
local ffi = require("ffi")

local PORT = 18320

local sc = dofile("tests/lua/serve_client.lua")
local client, at_once = sc.client, sc.at_once

-- Captures this process's stderr (fd 2) into a file while the tests run,
-- to check the controller's log lines.
pcall(ffi.cdef, "int dup(int fd);")
pcall(ffi.cdef, "int dup2(int a, int b);")
pcall(ffi.cdef, "int close(int fd);")
pcall(ffi.cdef, "int open(const char *path, int flags, ...);")
local LOG = os.tmpname()
io.stderr:flush()
local saved_fd = ffi.C.dup(2)
local log_fd = ffi.C.open(LOG, 0x241, ffi.new("int", 420)) -- O_WRONLY|O_CREAT|O_TRUNC, 0644
ffi.C.dup2(log_fd, 2)
ffi.C.close(log_fd)
local function read_log()
  io.stderr:flush()
  local f = io.open(LOG)
  local s = f and f:read("*a") or ""
  if f then f:close() end
  return s
end
local function restore_stderr()
  io.stderr:flush()
  ffi.C.dup2(saved_fd, 2)
  ffi.C.close(saved_fd)
  io.stderr:write(read_log())
  os.remove(LOG)
end

local function counts(name)
  local s = serve.status()[name]
  local live, all = 0, 0
  for _, r in ipairs(s.replicas) do
    all = all + 1
    if not r.draining then live = live + 1 end
  end
  return live, all, s
end

local function poll_until(pred, timeout)
  local deadline = os.time() + (timeout or 10)
  repeat
    serve.poll(0.05)
    if pred() then return true end
  until os.time() > deadline
  return false
end

local function slow_call(self, req)
  tide.sleep(tonumber(req.query.s) or 0)
  return {actor_id = tide.get_runtime_context().actor_id}
end

local app = {
  serve.deployment{
    name = "auto", route = "/auto",
    autoscaling = {min_replicas = 1, max_replicas = 3, target_ongoing_requests = 1,
      upscale_delay_s = 0.2, downscale_delay_s = 1.0},
    call = slow_call,
  },
  serve.deployment{
    name = "steady", route = "/steady",
    autoscaling = {min_replicas = 1, max_replicas = 3, target_ongoing_requests = 1,
      upscale_delay_s = 5, downscale_delay_s = 1.0},
    call = slow_call,
  },
  serve.deployment{
    name = "floor", route = "/floor",
    autoscaling = {min_replicas = 2, max_replicas = 4, target_ongoing_requests = 2},
    call = slow_call,
  },
}
serve.run(app, {port = PORT, blocking = false})

t.test("autoscaling: deployments start at min_replicas", function()
  t.eq((counts("auto")), 1)
  t.eq((counts("steady")), 1)
  t.eq((counts("floor")), 2)
end)

t.test("autoscaling: concurrent slow requests grow the replicas up to max_replicas", function()
  local base = tide.get(client(function(httpc, p) return httpc.get(p, "/auto").json.actor_id end):remote(PORT))
  -- Four requests of 2.5 s at once: 4 ongoing / target 1 wants 4, capped at 3.
  local load = client(function(httpc, p)
    local slow = "/auto?s=2.5"
    local out = at_once(httpc, p, {slow, slow, slow, slow}, {timeout = 30})
    for i, r in ipairs(out) do out[i] = r.status end
    return out
  end):remote(PORT)
  local most = 0
  local grew = poll_until(function()
    local live = counts("auto")
    most = math.max(most, live)
    return live == 3
  end, 15)
  t.ok(grew, "scaled up to 3 replicas (most seen " .. most .. ")")
  -- New replicas take new requests while the first one is busy.
  local fresh = client(function(httpc, p)
    local a, b = httpc.connect(p), httpc.connect(p)
    a:send_raw(httpc.format_request("GET", "/auto?s=0.2"))
    b:send_raw(httpc.format_request("GET", "/auto?s=0.2"))
    local out = {a:read_response().json.actor_id, b:read_response().json.actor_id}
    a:close(); b:close()
    return out
  end):remote(PORT)
  while #tide.wait({load, fresh}, {num_returns = 2, timeout = 0}) < 2 do
    serve.poll(0.05)
    most = math.max(most, (counts("auto")))
  end
  t.deep_eq(tide.get(load), {200, 200, 200, 200})
  local f = tide.get(fresh)
  t.ok(f[1] ~= base and f[2] ~= base, "requests made after scaling up went to the new replicas")
  t.eq(most, 3, "never more than max_replicas")
  local st = serve.status().auto
  t.ok(st.requests >= 7, "requests counted")
  t.eq(st.rejected, 0, "nothing was rejected")
end)

t.test("autoscaling: an idle deployment shrinks back to min_replicas after downscale_delay_s", function()
  local shrunk = poll_until(function()
    local live, all = counts("auto")
    return live == 1 and all == 1
  end, 15)
  local live, all = counts("auto")
  t.ok(shrunk, string.format("back to 1 replica (live %d, total %d)", live, all))
  local r = tide.get(client(function(httpc, p) return httpc.get(p, "/auto") end):remote(PORT))
  t.eq(r.status, 200, "still serving after scaling down")
end)

t.test("autoscaling: scale decisions are logged to stderr", function()
  local log = read_log()
  t.ok(log:find("[serve] scaling auto up from 1 to 3", 1, true), "scale-up logged:\n" .. log)
  t.ok(log:find("[serve] scaling auto down from 3 to 1", 1, true), "scale-down logged:\n" .. log)
end)

t.test("autoscaling: a spike shorter than upscale_delay_s does not scale", function()
  local spike = client(function(httpc, p)
    local out = at_once(httpc, p, {"/steady?s=0.6", "/steady?s=0.6", "/steady?s=0.6"})
    for i, r in ipairs(out) do out[i] = r.status end
    return out
  end):remote(PORT)
  local most = 0
  while #tide.wait({spike}, {timeout = 0}) == 0 do
    serve.poll(0.05)
    most = math.max(most, (counts("steady")))
  end
  serve.poll(0.5)
  most = math.max(most, (counts("steady")))
  t.deep_eq(tide.get(spike), {200, 200, 200})
  t.eq(most, 1, "no scale-up for a short spike")
  t.ok(not read_log():find("scaling steady", 1, true), "no decision logged")
end)

t.test("autoscaling: never below min_replicas when idle", function()
  serve.poll(1.5)
  t.eq((counts("floor")), 2)
  t.ok(not read_log():find("scaling floor", 1, true), "no decision logged")
end)

restore_stderr()
serve.shutdown()
t.done()
