-- The chaos driver: runs checked work against a cluster for DURATION
-- seconds while tests/chaos/chaos.sh kills workers, nodes and the head, and
-- prints what came back: correct, wrong (a value that is not the one
-- computed: never acceptable), errors by kind (the typed ones the docs
-- promise), hangs (a get that timed out) and actor state lost silently (a
-- counter that went back without an ActorDiedError).
--   tide run --address local driver.lua DURATION
local tide = require("tide")
local format = string.format

local DURATION = tonumber(arg[1]) or 40
local GET_TIMEOUT = 60
-- The driver's node (n1) has no W: work asking for some runs on the nodes
-- the killer kills (n2, n3), and its values cross nodes.
local AWAY = {resources = {W = 0.01}}
local MiB = 1024 * 1024
local r = {submitted = 0, correct = 0, wrong = 0, hangs = 0, state_lost = 0, big_bytes_checked = 0,
  actor_calls = 0, errors = {}}
-- Errors a killed worker, node or head may cause, as documented.
local TYPED = {WorkerCrashedError = true, ActorDiedError = true, ObjectLostError = true}

-- A large value, different for every seed, that the driver can remake.
local function big(seed, mib)
  return string.rep(format("%07d;", seed % 10000000), MiB / 8 * mib) .. tostring(seed)
end

local square = tide.remote({max_retries = 5}, function(x)
  return x * x + 7, tide.get_runtime_context().node_id
end):options({num_returns = 2})
local make_big = tide.remote({max_retries = 5}, function(seed, mib)
  return string.rep(string.format("%07d;", seed % 10000000), 1024 * 1024 / 8 * mib) .. tostring(seed)
end)
local probe = tide.remote({max_retries = 5}, function(s)  -- length and bytes at fixed places
  local half = math.floor(#s / 2)
  local m0 = half + 1 - (half % 8)
  return {#s, s:sub(1, 8), s:sub(m0, m0 + 7), s:sub(-12)}
end)
local nested = tide.remote({max_retries = 5}, function(x)
  local inner = tide.remote({max_retries = 5}, function(y) return y + 1 end)
  return tide.get(inner:remote(x)) * 2
end)
local Counter = tide.actor({
  init = function(self) self.n = 0 end,
  incr = function(self) self.n = self.n + 1; return self.n end,
})

local shown_err = {}
local function count_error(e)
  local kind = type(e) == "table" and e.kind or "untyped"
  shown_err[kind] = (shown_err[kind] or 0) + 1
  if shown_err[kind] <= 3 then  -- what they say, for the log
    io.stderr:write(format("chaos: error: %s\n", tostring(type(e) == "table" and e.message or e)))
  end
  if kind == "GetTimeoutError" then r.hangs = r.hangs + 1 end
  r.errors[kind] = (r.errors[kind] or 0) + 1
  if not TYPED[kind] and kind ~= "GetTimeoutError" then
    io.stderr:write(format("chaos: unexpected error: %s\n", tostring(type(e) == "table" and
      (tostring(e.kind) .. ": " .. tostring(e.message)) or e)))
  end
end

-- Runs check(); a false result is a wrong value; an error is counted by kind.
local function checked(what, check)
  r.submitted = r.submitted + 1
  local ok, good, detail = pcall(check)
  if not ok then return count_error(good) end
  if good then
    r.correct = r.correct + 1
  else
    r.wrong = r.wrong + 1
    io.stderr:write(format("chaos: WRONG %s: %s\n", what, tostring(detail)))
  end
end

local function get(ref) return tide.get(ref, {timeout = GET_TIMEOUT}) end

-- Actors without restarts: a counter either counts on or the actor is dead
-- with ActorDiedError; never back to an earlier value.
-- Counters 1-3 belong to this driver (1 here, 2-3 on the killed nodes);
-- 4 is detached, on a killed node: it must survive the head's restarts
-- (adopted where it runs) and die loudly with its node.
local made = 0
local function new_counter(i)
  made = made + 1
  local o = {max_restarts = 0}
  if i > 1 then o.resources = AWAY.resources end
  if i == 4 then o.lifetime, o.name = "detached", string.format("chaos-%d-%d", os.time(), made) end
  return Counter:options(o):remote()
end
local actors = {}
for i = 1, 4 do actors[i] = {h = new_counter(i), n = 0, i = i} end

local seed, round, shown = 0, 0, {}
local t_end = os.time() + DURATION
while os.time() < t_end do
  round = round + 1
  -- Eight small tasks, spread over the nodes.
  local refs = {}
  for i = 1, 8 do
    seed = seed + 1
    local a = (i % 2 == 0 and square:options(AWAY) or square):remote(seed)
    refs[i] = {a, seed}
  end
  for _, p in ipairs(refs) do
    checked("square", function() local v = get(p[1]); return v == p[2] * p[2] + 7, v end)
  end
  -- A 9 MiB result, compared byte for byte.
  seed = seed + 1
  local s = seed
  checked("big result", function()
    local v = get(make_big:options(AWAY):remote(s, 9))
    r.big_bytes_checked = r.big_bytes_checked + #v
    return v == big(s, 9), #v
  end)
  -- A 4 MiB argument made here, read in a task elsewhere.
  seed = seed + 1
  local arg_s = big(seed, 4)
  local ref = tide.put(arg_s)
  checked("big argument", function()
    local n, head, mid, tail = unpack(get(probe:options(AWAY):remote(ref)))
    local half = math.floor(#arg_s / 2)
    local m0 = half + 1 - (half % 8)
    return n == #arg_s and head == arg_s:sub(1, 8) and mid == arg_s:sub(m0, m0 + 7) and tail == arg_s:sub(-12),
      format("%s %s", tostring(n), tostring(head))
  end)
  ref = nil
  -- A task that submits a task.
  seed = seed + 1
  local x = seed
  checked("nested", function() local v = get(nested:options(AWAY):remote(x)); return v == (x + 1) * 2, v end)
  -- The counters.
  for _, a in ipairs(actors) do
    r.submitted = r.submitted + 1
    r.actor_calls = r.actor_calls + 1
    local ok, v = pcall(get, a.h:incr())
    if ok and v == a.n + 1 then
      a.n = v
      r.correct = r.correct + 1
    elseif ok then
      r.state_lost = r.state_lost + 1
      io.stderr:write(format("chaos: actor state lost: counter %s after %d\n", tostring(v), a.n))
      a.n = v
    else
      count_error(v)
      if type(v) == "table" and v.kind == "ActorDiedError" then
        if a.i == 4 then pcall(tide.kill, a.h) end
        a.h, a.n = new_counter(a.i), 0
      end
      local kind = type(v) == "table" and v.kind or "untyped"
      shown[kind] = (shown[kind] or 0) + 1
      if shown[kind] <= 3 then io.stderr:write(format("chaos: counter %d: %s\n", a.i, tostring(v))) end
    end
  end
  collectgarbage()
end

pcall(tide.kill, actors[4].h)  -- detached: it would outlive the run
local kinds = {}
for k, v in pairs(r.errors) do kinds[#kinds + 1] = format("%s=%d", k, v) end
table.sort(kinds)
print(format("CHAOS rounds=%d submitted=%d correct=%d wrong=%d hangs=%d state_lost=%d actor_calls=%d "
  .. "big_mib_checked=%d errors=%s", round, r.submitted, r.correct, r.wrong, r.hangs, r.state_lost,
  r.actor_calls, math.floor(r.big_bytes_checked / MiB), #kinds > 0 and table.concat(kinds, ",") or "none"))
