-- tide: the Lua API of Tide (DESIGN.md §3). Remote functions, actors,
-- objects, placement groups, DAGs and cluster information, built on the
-- C module tide.core. The same module serves the driver and workers.
local core = require("tide.core")
local capture = require("tide.capture")
local rdt = require("tide.rdt")

local M = {}

local type, pairs, ipairs, select, setmetatable, getmetatable, error, tostring =
  type, pairs, ipairs, select, setmetatable, getmetatable, error, tostring
local format, unpack = string.format, unpack

-- The codes tide.core speaks, by name (lua/core.h, engine/proto.h,
-- engine/node.h): cached as upvalues, so a compare costs nothing.
local ST, STRATEGY, PG_STRATEGY = core.STATUS, core.STRATEGY, core.PG_STRATEGY
local ST_OK, ST_ERROR, ST_TIMEOUT, ST_CANCELLED, ST_RAISED = ST.OK, ST.ERROR, ST.TIMEOUT, ST.CANCELLED, ST.RAISED

capture.install()
local REF_MT = debug.getregistry()["tide.ObjectRef"]

local function is_ref(v) return getmetatable(v) == REF_MT end
M.is_ref = is_ref

-- -- Errors ---------------------------------------------------------------

local Error = {}
Error.__index = Error
Error.__tostring = function(e)
  local s = tostring(e.kind) .. ": " .. tostring(e.message)
  if e.traceback and e.traceback ~= "" then s = s .. "\n(remote) " .. e.traceback end
  return s
end
M.Error = Error

local function raise(kind, message, extra)
  local e = extra or {}
  e.kind, e.message = kind, message
  e.traceback = e.traceback or "" -- made here, not raised by remote code
  error(setmetatable(e, Error), 0)
end

local function raise_status(st, v, what)
  if st == ST_ERROR then
    error(setmetatable(v, Error), 0)
  elseif st == ST_TIMEOUT then
    raise("GetTimeoutError", what .. " timed out")
  elseif st == ST_CANCELLED then
    raise("TaskCancelledError", "the task was cancelled")
  elseif st == ST_RAISED then
    error(v, 0)
  end
end

-- Raises msg at the user's line: the first frame outside the tide stdlib
-- (wrappers here may have been tail-called).
local function uerror(msg)
  local level = 2
  while true do
    local info = debug.getinfo(level, "S")
    if not info then break end
    if info.what ~= "C" and not info.source:find("stdlib/tide", 1, true) then break end
    level = level + 1
  end
  error(msg, level)
end
M._uerror = uerror

-- -- Options ---------------------------------------------------------------

local COMMON = {
  num_cpus = "number", num_gpus = "number", memory = "number", resources = "table",
  name = "string", placement_group = "table", bundle_index = "number",
  scheduling_strategy = "string|table", runtime_env = "table",
}
local TASK_OPTS = {max_retries = "number", num_returns = "number|string", retry_exceptions = "boolean",
  pipeline = "boolean"}
local ACTOR_OPTS = {
  max_restarts = "number", max_task_retries = "number", namespace = "string",
  lifetime = "string", max_concurrency = "number", get_if_exists = "boolean",
  own_process = "boolean",
}
for k, v in pairs(COMMON) do TASK_OPTS[k] = v; ACTOR_OPTS[k] = v end

-- The closest of names (a set or a list) to word, for "did you mean":
-- within a third of its length in edits (Levenshtein), or nil.
local function closest(word, names)
  local best, bestd = nil, math.max(1, math.floor(#word / 3)) + 1
  for k, v in pairs(names) do
    local cand = type(k) == "string" and k or v
    if type(cand) == "string" then
      local prev = {}
      for j = 0, #cand do prev[j] = j end
      for i = 1, #word do
        local cur = {[0] = i}
        for j = 1, #cand do
          local cost = word:byte(i) == cand:byte(j) and 0 or 1
          cur[j] = math.min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + cost)
        end
        prev = cur
      end
      if prev[#cand] < bestd or (prev[#cand] == bestd and best and cand < best) then
        best, bestd = cand, prev[#cand]
      end
    end
  end
  if best and bestd <= math.max(1, math.floor(#word / 3)) then return best end
end
M._closest = closest

local function did_you_mean(word, names)
  local c = closest(word, names)
  return c and format(" (did you mean '%s'?)", c) or ""
end

local function check_opts(opts, allowed, fname, level)
  if opts == nil then return {} end
  if type(opts) ~= "table" then
    error(format("%s: options must be a table, got %s", fname, type(opts)), level + 1)
  end
  for k, v in pairs(opts) do
    local want = allowed[k]
    if not want then
      error(format("%s: unknown option '%s'%s", fname, tostring(k),
        type(k) == "string" and did_you_mean(k, allowed) or ""), level + 1)
    end
    local t = type(v)
    if not want:find(t, 1, true) then
      error(format("%s: option '%s' must be a %s, got %s", fname, k, want:gsub("|", " or "), t), level + 1)
    end
    local retries = k == "max_retries" or k == "max_restarts" or k == "max_task_retries"
    if t == "number" and v < 0 and not retries then
      error(format("%s: option '%s' must not be negative", fname, k), level + 1)
    end
    if retries and t == "number" and (v < -1 or v % 1 ~= 0) then
      error(format("%s: option '%s' must be a whole number, -1 for unlimited", fname, k), level + 1)
    end
  end
  if opts.num_returns ~= nil and opts.num_returns ~= "streaming"
     and (type(opts.num_returns) ~= "number" or opts.num_returns < 1 or opts.num_returns % 1 ~= 0) then
    error(fname .. ": option 'num_returns' must be a positive integer or \"streaming\"", level + 1)
  end
  if opts.lifetime ~= nil and opts.lifetime ~= "detached" and opts.lifetime ~= "non_detached" then
    error(fname .. ": option 'lifetime' must be \"detached\" or \"non_detached\"", level + 1)
  end
  if opts.resources then
    for rk, rv in pairs(opts.resources) do
      if type(rk) ~= "string" or type(rv) ~= "number" or rv < 0 then
        error(format("%s: option 'resources' must map names to non-negative numbers (bad entry %s)",
          fname, tostring(rk)), level + 1)
      end
    end
  end
  if opts.max_concurrency and (opts.max_concurrency < 1 or opts.max_concurrency % 1 ~= 0) then
    error(fname .. ": option 'max_concurrency' must be a positive integer", level + 1)
  end
  local ss = opts.scheduling_strategy
  if type(ss) == "string" and ss ~= "DEFAULT" and ss ~= "SPREAD" then
    error(fname .. ": option 'scheduling_strategy' must be \"DEFAULT\", \"SPREAD\" or {node_id = ..., soft = ...}",
      level + 1)
  end
  if opts.runtime_env then
    for k in pairs(opts.runtime_env) do
      if k ~= "env_vars" and k ~= "working_dir" then
        error(format("%s: unknown runtime_env key '%s'", fname, tostring(k)), level + 1)
      end
    end
  end
  return opts
end

local function merge(a, b)
  local r = {}
  for k, v in pairs(a or {}) do r[k] = v end
  for k, v in pairs(b or {}) do r[k] = v end
  return r
end

-- The flat table tide.core reads.
local function normalize(o, is_actor)
  local res = {}
  for k, v in pairs(o.resources or {}) do res[k] = v end
  res.CPU = o.num_cpus or (is_actor and 0 or 1)
  if o.num_gpus then res.GPU = o.num_gpus end
  if o.memory then res.memory = o.memory end
  local n = {
    resources = res, name = o.name, namespace = o.namespace,
    max_retries = o.max_retries, max_restarts = o.max_restarts,
    max_task_retries = o.max_task_retries, max_concurrency = o.max_concurrency,
    detached = o.lifetime == "detached", retry_exceptions = o.retry_exceptions, pipeline = o.pipeline,
    own_process = o.own_process,
  }
  if o.placement_group then
    n.pg = o.placement_group.id
    n.bundle = o.bundle_index and (o.bundle_index - 1) or -1
  end
  local ss = o.scheduling_strategy
  if ss == "SPREAD" then n.strategy = STRATEGY.SPREAD end
  if type(ss) == "table" and ss.node_id ~= nil then
    local k = type(ss.node_id) == "string" and tonumber(ss.node_id:match("^node%-(%d+)$"))
    if k then
      n.strategy = ss.soft and STRATEGY.NODE_SOFT or STRATEGY.NODE
      n.node = k
    elseif not ss.soft then
      uerror(format("no node with id %s for a hard node affinity (node ids look like \"node-1\")",
        tostring(ss.node_id)))
    end
  end
  local re = o.runtime_env
  local pkg = os.getenv("TIDE_PKG")  -- a job's shipped working directory
  if pkg and not (re and re.working_dir) then
    local ev = {TIDE_PKG = pkg}
    for k, v in pairs(re and re.env_vars or {}) do ev[k] = v end
    re = {env_vars = ev}
  end
  if re and (re.env_vars or re.working_dir) then
    n.env = {}
    for k, v in pairs(re.env_vars or {}) do n.env[k] = tostring(v) end
    if re.working_dir then
      local wd = re.working_dir
      if type(wd) ~= "string" then uerror("runtime_env.working_dir must be a path") end
      if wd:sub(1, 1) ~= "/" then wd = (os.getenv("PWD") or ".") .. "/" .. wd end
      local f = io.open(wd .. "/.", "r")
      if not f then uerror("runtime_env.working_dir " .. wd .. " is not a readable directory") end
      f:close()
      n.env.TIDE_WORKING_DIR = wd
    end
  end
  return n
end

-- -- Starting --------------------------------------------------------------

local started = not core.is_driver
local init_opts
local used

local INIT_OPTS = {
  address = "string", num_cpus = "number", num_gpus = "number", resources = "table",
  object_store_memory = "number", inline_max = "number", prestart = "number",
  namespace = "string",
}

local function start(level)
  if started then return end
  local reg = debug.getregistry()
  local o = merge(reg["tide.cli_opts"] or {}, init_opts)
  if o.resources_json then
    local ok, cjson = pcall(require, "cjson")
    if not ok then error("--resources needs lua-cjson", level + 1) end
    local ok2, t = pcall(cjson.decode, o.resources_json)
    if not ok2 or type(t) ~= "table" or not o.resources_json:match("^%s*{") then
      error("--resources: not a JSON object: " .. o.resources_json, level + 1)
    end
    for k, v in pairs(t) do
      if type(v) ~= "number" or v < 0 then
        error(format("--resources: %s must be a non-negative number", tostring(k)), level + 1)
      end
    end
    o.resources = merge(t, o.resources)
    o.resources_json = nil
  end
  if o.address and o.address ~= "" and o.address ~= "local" then
    error(format("tide.init: a script cannot attach itself to %s; run it attached: tide run --address %s "
      .. "--key FILE SCRIPT", o.address, o.address), level + 1)
  end
  local ok, err = pcall(core.start, o)
  if not ok then error(tostring(err):gsub("^[^:\n]*%.lua:%d+: ", ""), level + 1) end
  started = true
end

function M.init(opts)
  if core.is_client then
    -- Attached to a running cluster (tide run --address): it is already up,
    -- and the script runs unchanged when the cluster can give what it asks.
    check_opts(opts, INIT_OPTS, "tide.init", 2)
    local have, ignored = core.resources(false), {}
    local asked = {CPU = opts and opts.num_cpus, GPU = opts and opts.num_gpus}
    for k, v in pairs(opts and opts.resources or {}) do asked[k] = v end
    for r, v in pairs(asked) do
      if (have[r] or 0) + 1e-9 < v then
        error(format("tide.init: the running cluster this driver is attached to has %s = %g, less than the %g asked",
          r, have[r] or 0, v), 2)
      end
    end
    for k in pairs(opts or {}) do
      if k ~= "address" and k ~= "namespace" then ignored[#ignored + 1] = k end
    end
    if #ignored > 0 then
      table.sort(ignored)
      io.stderr:write(format("tide: tide.init: attached to a running cluster, which has what the script asks; "
        .. "ignoring %s\n", table.concat(ignored, ", ")))
    end
    return
  end
  if not core.is_driver then error("tide.init can only be called in the driver script", 2) end
  check_opts(opts, INIT_OPTS, "tide.init", 2)
  if started and used then error("tide.init: the cluster is already running", 2) end
  if started then
    -- tide run started it with its flags before the script; nothing has
    -- used it yet, so it restarts with these options on top.
    core.stop()
    started = false
  end
  init_opts = opts
  start(2)
end

function M.is_initialized() return started end

used = false
local function ensure()
  used = true
  if not started then start(3) end
end
M._start = function() start(2) end

-- -- Remote functions --------------------------------------------------------

local RemoteFunction = {__tide_module = "tide"}
RemoteFunction.__index = RemoteFunction

local function num_returns(o)
  local nr = o.num_returns or 1
  if nr == "streaming" then return -1 end
  return nr
end

local Generator = {}
Generator.__index = Generator

function Generator:next(timeout)
  local r = core.stream_next(self.ref, self.i, timeout)
  if r == nil then return nil end
  if r == false then raise("GetTimeoutError", "waiting for the next streamed item timed out") end
  self.i = self.i + 1
  return r
end
Generator.__call = function(self) return self:next() end
Generator.__tostring = function(self) return "ObjectRefGenerator(" .. tostring(self.ref) .. ")" end

local function make_rf(fn_id, opts)
  local self = setmetatable({fn_id = fn_id, opts = opts}, RemoteFunction)
  self.norm = normalize(opts, false)
  self.nret = num_returns(opts)
  return self
end

function M.remote(a, b)
  local opts, fn
  if type(a) == "function" and b == nil then
    fn, opts = a, {}
  elseif type(a) == "table" and type(b) == "function" then
    opts, fn = a, b
  else
    error("tide.remote: expected a function, or an options table and a function", 2)
  end
  check_opts(opts, TASK_OPTS, "tide.remote", 2)
  ensure()
  local id = core.register(fn)
  if not opts.name then
    local info = debug.getinfo(fn, "S")
    opts = merge(opts, {name = info.short_src:match("[^/]*$") .. ":" .. info.linedefined})
  end
  return make_rf(id, opts)
end

-- The most common Lua slip, f.remote(x) for f:remote(x), said at the user's line.
local function colon_slip(what, obj)
  uerror(format("%s: write %s:remote(...) with a colon, not %s.remote(...)", what, obj, obj))
end
RemoteFunction.__call = function()
  uerror("a remote function is not called directly: write f:remote(...), then tide.get the ref it returns")
end

function RemoteFunction:remote(...)
  if getmetatable(self) ~= RemoteFunction then colon_slip("remote function", "f") end
  if rdt.active() then return self:_submit(rdt.args_for_task(...)) end
  return self:_submit(...)
end

function RemoteFunction:_submit(...)
  if self.nret == -1 then
    local ref = core.submit(self.fn_id, self.norm, -1, ...)
    return setmetatable({ref = ref, i = 0}, Generator)
  end
  return core.submit(self.fn_id, self.norm, self.nret, ...)
end

function RemoteFunction:options(opts)
  check_opts(opts, TASK_OPTS, "options", 2)
  return make_rf(self.fn_id, merge(self.opts, opts))
end

RemoteFunction.__tide_ser = function(self)
  return core.encode({self.fn_id, self.opts})
end
RemoteFunction.__tostring = function(self) return "RemoteFunction(" .. tostring(self.fn_id) .. ")" end

-- -- Actors -------------------------------------------------------------------

local ActorClass = {__tide_module = "tide"}
ActorClass.__index = ActorClass
ActorClass.__tide_ser = function(c) return core.encode({"class", c.class_id, c.opts, c.rdt}) end
local ActorHandle = {__tide_module = "tide"}

-- class: the class table when known here (the handle was made here), so a
-- misspelled method fails at the call, not at tide.get. rdt: the methods
-- declared with tide.method ({name = group | false}), which travels with
-- the handle.
local function make_handle(id, class_id, ready, class, rdt_methods)
  return setmetatable({_id = id, _class_id = class_id, _ready = ready, _methods = {}, _class = class,
    _rdt = rdt_methods}, ActorHandle)
end

local HANDLE_FIELDS = {_id = true, _class_id = true, _ready = true, _methods = true, _class = true, _rdt = true}

-- Makes handle h's method k (kept in h._methods). Apart from __index: a
-- function that makes a closure cannot be compiled by LuaJIT (NYI: UCLO at
-- its returns), and __index runs at every call.
local function make_method(h, k)
  if type(k) ~= "string" or HANDLE_FIELDS[k] or not k:match("^[%a_][%w_]*$") then return nil end
  local class = rawget(h, "_class")
  if class and type(class[k]) ~= "function" then
    uerror(format("the actor has no method '%s'%s", k, did_you_mean(k, class)))
  end
  local id = rawget(h, "_id")
  local rm = rawget(h, "_rdt")
  local group = rm and rm[k]  -- declared with tide.method: its group, or false
  local m = function(self, ...)
    if self ~= h then
      uerror(format("actor method: write actor:%s(...) with a colon, not actor.%s(...)", k, k))
    end
    if group ~= nil then return rdt.call(id, k, group, ...) end
    if rdt.active() then return core.actor_call(id, k, 1, rdt.args_for_actor(id, ...)) end
    return core.actor_call(id, k, 1, ...)
  end
  h._methods[k] = m
  return m
end

ActorHandle.__index = function(h, k)
  local m = h._methods[k]
  if m then return m end
  return make_method(h, k)
end
ActorHandle.__tostring = function(h) return "ActorHandle(" .. tostring(h._id) .. ")" end
ActorHandle.__tide_ser = function(h) return core.encode({"actor", h._id, h._class_id, h._rdt}) end

function M.actor(class, opts)
  if type(class) ~= "table" then
    error("tide.actor: expected a table of methods, got " .. type(class), 2)
  end
  for k, v in pairs(class) do
    if type(k) ~= "string" or (type(v) ~= "function" and getmetatable(v) ~= rdt.METHOD) then
      error(format("tide.actor: field %s must be a method (function), got %s", tostring(k), type(v)), 2)
    end
  end
  check_opts(opts, ACTOR_OPTS, "tide.actor", 2)
  ensure()
  local rdt_methods
  class, rdt_methods = rdt.prepare_class(class)
  local id = core.register(class)
  return setmetatable({class_id = id, opts = opts or {}, class = class, rdt = rdt_methods}, ActorClass)
end

-- tide.method({tensor_transport = "collective" [, group = name]}, fn): a
-- method whose tensor result goes straight to consumers (stdlib/tide/rdt.lua).
M.method = rdt.method

function ActorClass:options(opts)
  check_opts(opts, ACTOR_OPTS, "options", 2)
  return setmetatable({class_id = self.class_id, opts = merge(self.opts, opts), class = self.class,
    rdt = self.rdt}, ActorClass)
end

ActorClass.__call = function()
  uerror("an actor class is not called directly: write Class:remote(...) to create an actor")
end

function ActorClass:remote(...)
  if getmetatable(self) ~= ActorClass then colon_slip("actor class", "Class") end
  local o = self.opts
  if o.name then
    local aid, cid = core.get_actor(o.name, o.namespace or "")
    if aid then
      if o.get_if_exists then return make_handle(aid, cid, nil, nil, self.rdt) end
      error(format("an actor named '%s' already exists in namespace '%s'", o.name, o.namespace or ""), 2)
    end
  end
  local norm = normalize(o, true)
  local aid, ready
  if rdt.active() then
    aid, ready = core.actor_new(self.class_id, norm, rdt.args_for_task(...))
  else
    aid, ready = core.actor_new(self.class_id, norm, ...)
  end
  return make_handle(aid, self.class_id, ready, self.class, self.rdt)
end

function M.get_actor(name, opts)
  if type(name) ~= "string" then error("tide.get_actor: name must be a string", 2) end
  ensure()
  local ns = opts and opts.namespace or ""
  local aid, cid, def = core.get_actor(name, ns)
  if not aid then
    error(format("tide.get_actor: no live actor named '%s' in namespace '%s'", name, ns), 2)
  end
  -- Its class's tide.method declarations, so its calls send directly as
  -- the creator's handle's do.
  return make_handle(aid, cid, nil, nil, rdt.methods_in(def))
end

function M.kill(h, opts)
  if getmetatable(h) ~= ActorHandle then error("tide.kill: expected an ActorHandle", 2) end
  local no_restart = true
  if opts and opts.no_restart == false then no_restart = false end
  core.kill(h._id, no_restart)
end

-- Decoding handles and remote functions received in values.
function M.__tide_deser(s)
  local t = core.decode(s)
  if t[1] == "actor" then return make_handle(t[2], t[3], nil, nil, t[4]) end
  if t[1] == "class" then return setmetatable({class_id = t[2], opts = t[3] or {}, rdt = t[4]}, ActorClass) end
  return make_rf(t[1], t[2])
end

-- -- Objects -------------------------------------------------------------------

-- Hang warnings: a get or wait still waiting after TIDE_HANG_WARN_S
-- seconds (30; 0: never) says once, on stderr, why (core.why: the task that
-- makes the object and where it is), then goes on waiting.
-- A number of seconds >= 0 from the environment, read once.
local env_s = {}
local function env_seconds(name, default)
  if env_s[name] == nil then
    local v = tonumber(os.getenv(name) or "")
    env_s[name] = v and v >= 0 and v or default
  end
  return env_s[name]
end

local function hang_warn_s() return env_seconds("TIDE_HANG_WARN_S", 30) end

-- The first wait of a get or wait that may hang: up to the warning, or
-- the whole timeout when that comes first (nil: no warning to give).
local function hang_first(timeout)
  local h = hang_warn_s()
  if h > 0 and (timeout == nil or timeout < 0 or timeout > h) then return h end
end

local function rest(timeout, h)
  if timeout == nil or timeout < 0 then return timeout end
  return timeout - h
end

local function warn_hang(what, ref, waited)
  -- 1: the running task's Lua stack too; 2: the node names it no more.
  local ok, text = pcall(core.why, ref, 3)
  io.stderr:write(format("tide: %s has waited %g s for %s: %s\n", what, waited, tostring(ref),
    ok and text or ("(no reason known: " .. tostring(type(text) == "table" and text.message or text) .. ")")))
  io.stderr:flush()
end
M._hang_warn_s = hang_warn_s

-- A get of many refs warns about the first one not ready.
local function warn_hang_first(refs, waited)
  local flags = core.wait(refs, #refs, 0)
  for i = 1, #refs do
    if type(flags) == "table" and not flags[i] then warn_hang("tide.get", refs[i], waited) break end
  end
end

-- Progress of large transfers, in the REPL (tide._get_progress, set by
-- stdlib/tide/repl.lua; scripts pay nothing): a get that has waited
-- TIDE_PROGRESS_AFTER s (0.5) while its node fetches the values from another node shows
-- a tide.progress bar of the bytes landed (core.xfer, counted by the node per
-- chunk), updated every PROGRESS_STEP s and closed when the get returns.
local PROGRESS_STEP, MIB = 0.2, 1024 * 1024

local function xfer_bar(bar, x, t0)
  local ok, total, got = pcall(core.xfer, x)
  if not ok or not total then
    -- Every byte has landed; what is left is reading the value.
    if bar then bar:set(bar.total) end
    return bar
  end
  if not bar then
    bar = require("tide.progress").new(math.floor(total / MIB + 0.5),
      {desc = "fetching from another node", unit = "MiB"})
    bar.t0 = t0 -- the rate is over the whole get, not from when the bar appeared
  end
  bar:set_total(math.floor(total / MIB + 0.5))
  bar:set(math.floor(got / MIB))
  return bar
end

-- get(x, seconds) -> st, v, waited for in slices: the hang warning after h
-- seconds (warn(x, h)), the bar after TIDE_PROGRESS_AFTER.
local function get_progress(get, x, timeout, h, warn)
  local now, after = core.now, env_seconds("TIDE_PROGRESS_AFTER", 0.5)
  local t0, bar = now(), nil
  local deadline = timeout and timeout >= 0 and t0 + timeout
  while true do
    local t = now()
    local step = t - t0 < after and t0 + after - t or PROGRESS_STEP
    if h then step = math.min(step, math.max(0, t0 + h - t)) end
    if deadline then step = math.min(step, math.max(0, deadline - t)) end
    local ok, st, v = pcall(get, x, step)
    t = now()
    if not ok or st ~= ST_TIMEOUT or (deadline and t >= deadline) then
      if bar then
        if st == ST_OK then bar:set(bar.total) end
        bar:close()
      end
      if not ok then error(st, 0) end
      return st, v
    end
    if h and t - t0 >= h then warn(x, h); h = nil end
    if t - t0 >= after then bar = xfer_bar(bar, x, t0) end
  end
end

-- A ref to a directly transported tensor decodes to its descriptor here:
-- tide.get fetches the tensor from its producer.
local RDT_DESC = rdt.DESC

local function warn_get1(x, waited) warn_hang("tide.get", x, waited) end

-- One ref: one call into the node whether its value is ready or not (a
-- probe with timeout 0 first made a pending get, as in a loop of remote
-- and get, enter the node twice). No closure here nor in tide.get: a
-- function whose locals a closure keeps cannot be compiled by LuaJIT
-- (NYI: UCLO at each return), which made a get of a ready value half as
-- fast.
local function get_ref(x, timeout)
  local h = hang_first(timeout)
  local st, v
  if M._get_progress then
    st, v = get_progress(core.get1, x, timeout, h, warn_get1)
  elseif h then
    st, v = core.get1(x, h)
    if st == ST_TIMEOUT then
      warn_hang("tide.get", x, h)
      st, v = core.get1(x, rest(timeout, h))
    end
  else
    st, v = core.get1(x, timeout)
  end
  if st == ST_OK then
    if getmetatable(v) == RDT_DESC then return rdt.fetch(v, timeout) end
    return v
  end
  raise_status(st, v, "tide.get")
end

function M.get(x, opts)
  if opts == nil and getmetatable(x) == REF_MT then
    ensure()
    return get_ref(x, nil)
  end
  local timeout = opts and opts.timeout
  if timeout ~= nil and type(timeout) ~= "number" then error("tide.get: timeout must be a number", 2) end
  ensure()
  local h = hang_first(timeout)
  if is_ref(x) then return get_ref(x, timeout) end
  if getmetatable(x) == Generator then
    error("tide.get: expected an ObjectRef, got a generator; iterate it to get refs", 2)
  end
  if type(x) ~= "table" or getmetatable(x) ~= nil then
    error("tide.get: expected an ObjectRef or an array of ObjectRefs, got " .. type(x), 2)
  end
  for i = 1, #x do
    if not is_ref(x[i]) then
      error(format("tide.get: element %d is a %s, expected an ObjectRef", i, type(x[i])), 2)
    end
  end
  local st, v
  if M._get_progress and #x > 0 then
    st, v = get_progress(core.getn, x, timeout, h, warn_hang_first)
  elseif h and #x > 0 then
    st, v = core.getn(x, h)
    if st == ST_TIMEOUT then
      warn_hang_first(x, h)
      st, v = core.getn(x, rest(timeout, h))
    end
  else
    st, v = core.getn(x, timeout)
  end
  if st == ST_OK then
    if rdt.seen then  -- only once this process has decoded a descriptor
      for i = 1, #x do
        if getmetatable(v[i]) == RDT_DESC then v[i] = rdt.fetch(v[i], timeout) end
      end
    end
    return v
  end
  raise_status(st, v, "tide.get")
end

function M.put(v)
  ensure()
  if is_ref(v) then error("tide.put: cannot put an ObjectRef; it is already an object", 2) end
  return core.put(v)
end

function M.wait(refs, opts)
  if type(refs) ~= "table" then error("tide.wait: expected an array of ObjectRefs", 2) end
  for i = 1, #refs do
    if not is_ref(refs[i]) then
      error(format("tide.wait: element %d is a %s, expected an ObjectRef", i, type(refs[i])), 2)
    end
  end
  local num = opts and opts.num_returns or 1
  if type(num) ~= "number" or num < 0 then error("tide.wait: num_returns must be a number", 2) end
  if num > #refs then error(format("tide.wait: num_returns %d exceeds the %d refs given", num, #refs), 2) end
  ensure()
  local timeout = opts and opts.timeout
  local h = num > 0 and hang_first(timeout)
  local flags
  if h then
    flags = core.wait(refs, num, h)
    local got = 0
    if type(flags) == "table" then for i = 1, #refs do if flags[i] then got = got + 1 end end end
    if type(flags) == "table" and got < num then
      for i = 1, #refs do
        if not flags[i] then warn_hang("tide.wait", refs[i], h) break end
      end
      flags = core.wait(refs, num, rest(timeout, h))
    end
  else
    flags = core.wait(refs, num, timeout)
  end
  if type(flags) == "number" then raise_status(flags, nil, "tide.wait") end
  local ready, pending = {}, {}
  for i = 1, #refs do
    if flags[i] and #ready < num then ready[#ready + 1] = refs[i] else pending[#pending + 1] = refs[i] end
  end
  return ready, pending
end

local CANCEL_OPTS = {force = true, recursive = true}

function M.cancel(ref, opts)
  if getmetatable(ref) == Generator then ref = ref.ref end -- a streaming task: its stream
  if not is_ref(ref) then error("tide.cancel: expected an ObjectRef or an ObjectRefGenerator", 2) end
  if opts ~= nil and type(opts) ~= "table" then error("tide.cancel: opts must be a table", 2) end
  opts = opts or {}
  for k, v in pairs(opts) do
    if not CANCEL_OPTS[k] then error("tide.cancel: unknown option '" .. tostring(k) .. "'", 2) end
    if type(v) ~= "boolean" then error("tide.cancel: option '" .. k .. "' must be a boolean", 2) end
  end
  return core.cancel(ref, opts.force or false, opts.recursive ~= false)
end

function M.yield(v)
  if not core.yield_item then
    error("tide.yield can only be called inside a task or method called with num_returns = \"streaming\"", 2)
  end
  core.yield_item(v)
end

function M.sleep(s)
  if type(s) ~= "number" then error("tide.sleep: expected seconds", 2) end
  local st = core.sleep(s)
  if st == ST_CANCELLED then raise("TaskCancelledError", "the task was cancelled") end
end

-- -- Cluster ----------------------------------------------------------------------

function M.cluster_resources() ensure(); return core.resources(false) end
function M.available_resources() ensure(); return core.resources(true) end

-- This node first, then every node joined to it (on the head: the cluster).
function M.nodes()
  ensure()
  -- The head's list (a node asks the head); the node this process is on first.
  local list, here = core.nodes(), core.context().node_id
  for i = 2, #list do
    if list[i].node_id == here then
      table.insert(list, 1, table.remove(list, i))
      break
    end
  end
  return list
end

function M.get_runtime_context()
  ensure()
  return core.context()
end

function M.stats() ensure(); return core.stats() end

-- -- Placement groups ---------------------------------------------------------------

local PlacementGroup = {}
PlacementGroup.__index = PlacementGroup
-- PG_STRATEGY's names by code, and in code order for messages.
local STRATEGY_NAMES, STRATEGY_TEXT = {}, {}
for k, v in pairs(PG_STRATEGY) do STRATEGY_NAMES[v] = k end
for i = 0, #STRATEGY_NAMES do STRATEGY_TEXT[#STRATEGY_TEXT + 1] = STRATEGY_NAMES[i] end
STRATEGY_TEXT = table.concat(STRATEGY_TEXT, ", ", 1, #STRATEGY_TEXT - 1) .. " or " .. STRATEGY_TEXT[#STRATEGY_TEXT]
M._pg_strategies = STRATEGY_TEXT

local PG_OPTS = {strategy = true, name = true, lifetime = true}

function M.placement_group(bundles, opts)
  if type(bundles) ~= "table" or #bundles == 0 then
    error("tide.placement_group: bundles must be a non-empty array of resource tables", 2)
  end
  for i, b in ipairs(bundles) do
    if type(b) ~= "table" then error(format("tide.placement_group: bundle %d is not a table", i), 2) end
    for k, v in pairs(b) do
      if type(k) ~= "string" or type(v) ~= "number" or v < 0 then
        error(format("tide.placement_group: bundle %d has a bad entry %s", i, tostring(k)), 2)
      end
    end
  end
  if opts ~= nil and type(opts) ~= "table" then error("tide.placement_group: options must be a table", 2) end
  for k in pairs(opts or {}) do
    if not PG_OPTS[k] then
      error(format("tide.placement_group: unknown option '%s'%s", tostring(k),
        type(k) == "string" and did_you_mean(k, PG_OPTS) or ""), 2)
    end
  end
  local strategy = opts and opts.strategy or "PACK"
  local code = PG_STRATEGY[strategy]
  if not code then
    error("tide.placement_group: strategy must be " .. STRATEGY_TEXT, 2)
  end
  local name, lifetime = opts and opts.name or "", opts and opts.lifetime
  if type(name) ~= "string" or #name > 63 then
    error("tide.placement_group: name must be a string of at most 63 bytes", 2)
  end
  if lifetime ~= nil and lifetime ~= "detached" and lifetime ~= "non_detached" then
    error("tide.placement_group: lifetime must be \"detached\" or \"non_detached\"", 2)
  end
  ensure()
  local id, ready = core.pg_create(bundles, code, name, lifetime == "detached")
  return setmetatable({id = id, bundles = bundles, strategy = strategy, name = name, _ready = ready},
    PlacementGroup)
end

function M.get_placement_group(name)
  if type(name) ~= "string" or name == "" then
    error("tide.get_placement_group: expected the group's name", 2)
  end
  ensure()
  local id, ready, code, bundles = core.pg_lookup(name)
  if not id then error(format("tide.get_placement_group: no placement group named %q", name), 2) end
  return setmetatable({id = id, bundles = bundles, strategy = STRATEGY_NAMES[code], name = name, _ready = ready},
    PlacementGroup)
end

function PlacementGroup:ready() return self._ready end
function PlacementGroup:wait(timeout)
  local ready = M.wait({self._ready}, {timeout = timeout})
  return #ready == 1
end

function M.remove_placement_group(pg)
  if getmetatable(pg) ~= PlacementGroup then error("tide.remove_placement_group: expected a placement group", 2) end
  core.pg_remove(pg.id)
end

-- -- DAGs ------------------------------------------------------------------------

local DAGNode = {__tide_module = "tide"}
DAGNode.__index = DAGNode
-- A recipe, not a value: sent, it would arrive as a plain table.
DAGNode.__tide_ser = function()
  error("a DAG node cannot be sent; execute it first (node:execute()) and send its ref", 0)
end

function RemoteFunction:bind(...)
  return setmetatable({rf = self, args = {n = select("#", ...), ...}}, DAGNode)
end

function ActorHandle.__index_bind(h, method, ...)
  return setmetatable({actor = h, method = method, args = {n = select("#", ...), ...}}, DAGNode)
end

local function exec_node(node, memo)
  local r = memo[node]
  if r then return r end
  local args = {}
  for i = 1, node.args.n do
    local a = node.args[i]
    if getmetatable(a) == DAGNode then a = exec_node(a, memo) end
    args[i] = a
  end
  if node.rf then
    r = node.rf:remote(unpack(args, 1, node.args.n))
  else
    local h = node.actor
    r = h[node.method](h, unpack(args, 1, node.args.n))
  end
  memo[node] = r
  return r
end

function DAGNode:execute()
  return exec_node(self, {})
end

M.ObjectRef = REF_MT
M.ActorHandle = ActorHandle
M.RemoteFunction = RemoteFunction

-- handle:bind("method", ...) builds a DAG node for an actor call.
local handle_index = ActorHandle.__index
ActorHandle.__index = function(h, k)
  if k == "bind" then return ActorHandle.__index_bind end
  return handle_index(h, k)
end

-- tide.progress(total, {desc = ...}): a progress bar (stdlib/tide/progress.lua).
M.progress = require("tide.progress").new
-- User metrics, exported by the head's /metrics (stdlib/tide/metrics.lua).
M.metrics = require("tide.metrics")

return M
