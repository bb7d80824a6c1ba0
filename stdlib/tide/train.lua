-- tide.train: data-parallel training on a group of actors (DESIGN §5–§6).
--
--   local result = train.fit{num_workers = 2, loop = function(ctx, config) ... end, ...}
--
-- fit reserves the workers as one placement group (all or none), starts one
-- actor per rank in it (each in a process of its own, so ranks compute at
-- the same time), joins them in one tide.collective group (the CPU ring;
-- NCCL when the workers have GPUs) and runs the loop on every rank. Rank
-- 0's reports stream to the driver through a small reporter actor while
-- training runs. If a rank's actor (or its node) dies, the whole group is
-- torn down (every rank killed, the placement group removed) and started
-- again; the loop finds the last checkpoint with ctx:restore().
--
-- Checkpoints: ctx:checkpoint(state) is called by every rank; rank 0 writes
-- <checkpoint_dir>/.tmp-checkpoint-N-<pid>/ (tensors.safetensors for the
-- tensors, state.json for the plain values and where each tensor goes),
-- renames it to checkpoint-N (atomic: a crash leaves either the old set or
-- the new one, never half of one) and deletes all but the last
-- keep_checkpoints; then every rank passes a barrier.
local tide = require("tide")
local W = require("tide.data.worker")
local ST = require("tide.nn.safetensors")
local T = require("tide.tensor")
local Metrics = require("tide.metrics")

local type, pairs, ipairs, tostring, tonumber, error, pcall, xpcall =
  type, pairs, ipairs, tostring, tonumber, error, pcall, xpcall
local format, concat = string.format, table.concat
local floor = math.floor
local now = W.now
local ffi = require("ffi")
local function getpid() return ffi.C.getpid() end -- declared by tide.data.worker

local M = {}

-- A private cjson instance (its settings are per instance). It writes 14
-- significant digits at most: a number that does not survive that (or is
-- inf or nan) is saved as {"__f64__": "%.17g"}, so plain values round-trip exactly.
local cj = require("cjson").new()
cj.encode_number_precision(14)

local function enc_num(v)
  if v == v and v ~= math.huge and v ~= -math.huge and tonumber(format("%.14g", v)) == v then return v end
  return {__f64__ = format("%.17g", v)}
end

local function dec_num(s)
  if s == "inf" then return math.huge elseif s == "-inf" then return -math.huge end
  local v = tonumber(s)
  if v == nil then return 0 / 0 end
  return v
end

-- -- Errors ----------------------------------------------------------------------

local TrainError = {kind = "TrainError"}
TrainError.__index = TrainError
TrainError.__tostring = function(e) return "TrainError: " .. e.message end
M.TrainError = TrainError

local function train_error(fields)
  return setmetatable(fields, TrainError)
end

-- -- Files ---------------------------------------------------------------------------

local function shell_quote(s) return "'" .. s:gsub("'", "'\\''") .. "'" end

local function mkdir_p(dir)
  local ok = os.execute("mkdir -p " .. shell_quote(dir))
  return ok == 0 or ok == true
end

local function rm_rf(path) os.execute("rm -rf " .. shell_quote(path)) end

local function list_dir(dir)
  local p = io.popen("ls -1A " .. shell_quote(dir) .. " 2>/dev/null")
  local out = {}
  if not p then return out end
  for line in p:lines() do out[#out + 1] = line end
  p:close()
  return out
end

local function join(dir, name)
  if dir:sub(-1) == "/" then return dir .. name end
  return dir .. "/" .. name
end

local CKPT_PAT = "^checkpoint%-(%d+)$"

-- Complete checkpoints of dir, oldest first: {index, path}. Temporary
-- directories (a writer that died) never match the pattern.
local function checkpoints(dir)
  local list = {}
  for _, name in ipairs(list_dir(dir)) do
    local n = name:match(CKPT_PAT)
    if n then list[#list + 1] = {index = tonumber(n), path = join(dir, name)} end
  end
  table.sort(list, function(a, b) return a.index < b.index end)
  return list
end

-- M.latest_checkpoint(dir) -> path of the newest complete checkpoint, or nil.
function M.latest_checkpoint(dir)
  if type(dir) ~= "string" then error("train.latest_checkpoint: expected a directory path", 2) end
  local list = checkpoints(dir)
  return list[#list] and list[#list].path or nil
end

-- -- Checkpoint encoding ------------------------------------------------------------------

-- The state tree goes to JSON with each tensor replaced by
-- {"__tensor__": name}; the tensors go to one safetensors file under those
-- names (their path in the tree, made unique).
local function flatten(state)
  local tensors, used = {}, {}
  local seen = {}
  local function walk(v, path)
    if T.is_tensor(v) then
      local name = path == "" and "tensor" or path
      local base, k = name, 1
      while used[name] do k = k + 1; name = base .. "#" .. k end
      used[name] = true
      if v:device() ~= "cpu" then v = v:to("cpu") end
      tensors[#tensors + 1] = {name, v:contiguous()}
      return {__tensor__ = name}
    end
    local tv = type(v)
    if tv == "table" then
      -- Shared or cyclic: JSON would write it twice (and load two tables).
      if seen[v] then error("ctx:checkpoint: the state holds a table twice (at " .. path .. ")", 0) end
      seen[v] = true
      local out, nnum, nstr = {}, 0, 0
      for k, x in pairs(v) do
        local kt = type(k)
        if kt ~= "string" and kt ~= "number" then
          error(format("ctx:checkpoint: a key of type %s at '%s' (keys must be strings or numbers)",
            kt, path), 0)
        end
        if kt == "number" then nnum = nnum + 1 else nstr = nstr + 1 end
        out[k] = walk(x, path == "" and tostring(k) or path .. "." .. tostring(k))
      end
      -- JSON has arrays (1..n) and objects (string keys): anything else
      -- would load back changed (holes as cjson.null, numbers as strings).
      if nnum > 0 and (nstr > 0 or nnum ~= #v or v[nnum] == nil) then
        error(format("ctx:checkpoint: the table at '%s' cannot be written as JSON: its keys must be all strings, "
          .. "or the numbers 1 to n without holes", path == "" and "state" or path), 0)
      end
      return out
    elseif tv == "number" then
      return enc_num(v)
    elseif tv == "string" or tv == "boolean" then
      return v
    end
    error(format("ctx:checkpoint: cannot save a %s at '%s' (tensors, numbers, strings, booleans and tables only)",
      tv, path == "" and "state" or path), 0)
  end
  local tree = walk(state, "")
  return tree, tensors
end

local function unflatten(tree, tensors)
  if type(tree) ~= "table" then return tree end
  if tree.__f64__ then return dec_num(tree.__f64__) end
  if tree.__tensor__ then
    local t = tensors[tree.__tensor__]
    if not t then
      error("checkpoint: tensor '" .. tostring(tree.__tensor__) .. "' missing from tensors.safetensors", 0)
    end
    return t
  end
  local out = {}
  for k, v in pairs(tree) do out[k] = unflatten(v, tensors) end
  return out
end

-- M.load_checkpoint(path) -> state (tensors on the CPU), info {index, time}.
function M.load_checkpoint(path)
  if type(path) ~= "string" then error("train.load_checkpoint: expected a checkpoint directory", 2) end
  local f, err = io.open(join(path, "state.json"), "rb")
  if not f then error("train.load_checkpoint: " .. tostring(err), 2) end
  local s = f:read("*a")
  f:close()
  local ok, doc = pcall(cj.decode, s)
  if not ok or type(doc) ~= "table" then error("train.load_checkpoint: " .. path .. "/state.json is not JSON", 2) end
  local tensors = {}
  if doc.num_tensors and doc.num_tensors > 0 then tensors = ST.load(join(path, "tensors.safetensors")) end
  local ok2, state = pcall(unflatten, doc.state, tensors)
  if not ok2 then error("train.load_checkpoint: " .. path .. ": " .. tostring(state), 2) end
  return state, {index = doc.index, time = doc.time, path = path}
end

-- Writes checkpoint `index` of dir atomically; returns its path. fault
-- (tests) makes the writer exit halfway, after the tensors are written.
local function write_checkpoint(dir, index, state, keep, fault)
  local tree, tensors = flatten(state)
  if not mkdir_p(dir) then error("ctx:checkpoint: cannot create " .. dir, 0) end
  -- Leftovers of writers that died are deleted: only one writer runs at a time.
  for _, name in ipairs(list_dir(dir)) do
    if name:match("^%.tmp%-checkpoint%-") then rm_rf(join(dir, name)) end
  end
  local final = join(dir, format("checkpoint-%06d", index))
  local tmp = join(dir, format(".tmp-checkpoint-%06d-%d", index, getpid()))
  rm_rf(tmp)
  if not mkdir_p(tmp) then error("ctx:checkpoint: cannot create " .. tmp, 0) end
  if #tensors > 0 then
    local ok, err = ST.save(join(tmp, "tensors.safetensors"), tensors, {tide_checkpoint = tostring(index)})
    if not ok then rm_rf(tmp); error("ctx:checkpoint: " .. tostring(err), 0) end
  end
  if fault then os.exit(1) end
  local ok, json = pcall(cj.encode, {version = 1, index = index, time = os.time(),
    num_tensors = #tensors, state = tree})
  if not ok then
    rm_rf(tmp)
    error("ctx:checkpoint: the state's plain values cannot be written as JSON: " .. tostring(json), 0)
  end
  local f, err = io.open(join(tmp, "state.json"), "wb")
  if not f then rm_rf(tmp); error("ctx:checkpoint: " .. tostring(err), 0) end
  f:write(json)
  f:close()
  rm_rf(final) -- a checkpoint of this index from a run that died before its barrier
  local rok, rerr = os.rename(tmp, final)
  if not rok then rm_rf(tmp); error("ctx:checkpoint: rename failed: " .. tostring(rerr), 0) end
  local list = checkpoints(dir)
  for i = 1, #list - keep do rm_rf(list[i].path) end
  return final
end

-- -- The rank's context ----------------------------------------------------------------

local Ctx = {}
Ctx.__index = Ctx

local Shard = {}
Shard.__index = Shard

-- for batch in ctx.shard do ... end: one pass (epoch) over the rank's
-- shard; the next loop starts another pass.
Shard.__call = function(sh)
  if not sh._it then
    sh._it = sh.dataset:iter_batches({batch_size = sh.batch_size, progress = false})
    sh.epoch = sh.epoch + 1
  end
  local b = sh._it()
  if b == nil then sh._it = nil end
  return b
end
function Shard:iter_batches(opts) return self.dataset:iter_batches(opts) end
function Shard:iter_rows(opts) return self.dataset:iter_rows(opts) end

local function new_ctx(spec)
  local C = require("tide.collective")
  local ctx = setmetatable({rank = spec.rank, world_size = spec.world_size, device = spec.device,
    attempt = spec.attempt, checkpoint_dir = spec.checkpoint_dir, _spec = spec, _C = C,
    _group = spec.group, _index = spec.last_index or 0,
    _flat = setmetatable({}, {__mode = "k"})}, Ctx)
  if spec.shard then
    ctx.shard = setmetatable({dataset = spec.shard, batch_size = spec.batch_size, epoch = 0}, Shard)
  end
  return ctx
end

-- ctx:allreduce(x [, op = "sum"]): x a tensor, or an array of tensors (or of
-- {name, tensor} pairs, as model.grads), reduced in place across the ranks.
-- An array goes through one flat buffer (one collective instead of one per tensor).
function Ctx:allreduce(x, op)
  op = op or "sum"
  local C, g = self._C, self._group
  if T.is_tensor(x) then return C.allreduce(x, op, g) end
  if type(x) ~= "table" or #x == 0 then
    error("ctx:allreduce: expected a tensor or an array of tensors", 2)
  end
  local list = {}
  local total, dtype = 0, nil
  for i, e in ipairs(x) do
    local t = T.is_tensor(e) and e or (type(e) == "table" and T.is_tensor(e[2]) and e[2])
    if not t then error(format("ctx:allreduce: element %d is not a tensor or a {name, tensor} pair", i), 2) end
    list[i] = t
    total = total + t:numel()
    -- One dtype (bf16 gradients): the buffer has it, so half the bytes
    -- move; mixed dtypes reduce in f32.
    dtype = (dtype == nil or dtype == t:dtype()) and t:dtype() or "f32"
  end
  local flat = self._flat[x]
  if not flat or flat:numel() ~= total or flat:dtype() ~= dtype then
    flat = T.zeros({total}, {device = list[1]:device(), dtype = dtype})
    self._flat[x] = flat
  end
  local off = 0
  for _, t in ipairs(list) do
    local n = t:numel()
    flat:slice(1, off + 1, off + n):view(t:shape()):copy(t)
    off = off + n
  end
  C.allreduce(flat, op, g)
  off = 0
  for _, t in ipairs(list) do
    local n = t:numel()
    t:copy(flat:slice(1, off + 1, off + n):view(t:shape()))
    off = off + n
  end
  return x
end

-- The barrier is a small allreduce, not tide.collective's barrier: that one
-- sends one byte, after which the shared-memory ring's byte stream is no
-- longer float-aligned, and a float split across the end of its buffer is
-- then reduced wrongly (gpu/ring.c; reported). Allreduces move whole floats.
function Ctx:barrier()
  if self.device ~= "cpu" then return self._C.barrier(self._group) end
  local b = self._bar
  if not b then
    b = T.zeros({self.world_size})
    self._bar = b
  end
  self._C.allreduce(b, "sum", self._group)
end

function Ctx:broadcast(t, root) return self._C.broadcast(t, root or 0, self._group) end

-- ctx:report(metrics): rank 0's reports go to the driver (history,
-- progress, on_report) at once, as an actor call that is not waited for.
function Ctx:report(m)
  if type(m) ~= "table" then error("ctx:report: expected a table of metrics", 2) end
  if self.rank ~= 0 then return end
  local r = {}
  for k, v in pairs(m) do r[k] = v end
  -- Stamped with this rank's clock (the driver computes tokens/s from it)
  -- and its attempt and world: a report of a failed attempt may reach the
  -- driver after the next attempt began.
  local ref = self._spec.reporter:push({{r = r, t = now(), a = self.attempt, w = self.world_size}})
  self._last_push = ref
  -- A worker sends what it submitted when it next talks to its node: a
  -- loop that computes without waiting would hold its reports until the
  -- end. A zero-timeout wait is that talk.
  tide.wait({ref}, {timeout = 0})
end

-- ctx:checkpoint(state) -> path: every rank calls it; rank 0 writes.
function Ctx:checkpoint(state)
  if type(state) ~= "table" then error("ctx:checkpoint: expected a table (tensors and plain values)", 2) end
  local dir = self.checkpoint_dir
  if not dir then error("ctx:checkpoint: train.fit was given no checkpoint_dir", 2) end
  self._index = self._index + 1
  local path = join(dir, format("checkpoint-%06d", self._index))
  local err
  if self.rank == 0 then
    local fault = self._spec.fault_at == self._index
    local ok, e = pcall(write_checkpoint, dir, self._index, state, self._spec.keep, fault)
    if not ok then err = e end
  end
  -- Everyone waits for the write: a rank that goes on cannot be told later
  -- that the checkpoint it relies on does not exist.
  self:barrier()
  if err then error(err, 2) end
  return path
end

-- ctx:restore() -> the last checkpoint's state, or nil.
function Ctx:restore()
  local p = self._spec.restore_path
  if not p then return nil end
  return (M.load_checkpoint(p))
end

-- -- Driver side --------------------------------------------------------------------------

local OPTS = {num_workers = true, resources_per_worker = true, placement_strategy = true,
  dataset = true, config = true, max_failures = true, checkpoint_dir = true, loop = true,
  keep_checkpoints = true, batch_size = true, on_report = true, progress = true,
  progress_interval = true, runtime_env = true, placement_timeout = true, name = true,
  retry_exceptions = true}
local RES_KEYS = {num_cpus = true, num_gpus = true, memory = true, resources = true}
local STRATEGIES = require("tide.core").PG_STRATEGY  -- placement-group strategies by name

local function is_int(v, lo) return type(v) == "number" and v % 1 == 0 and v >= lo end

local function check(opts)
  if type(opts) ~= "table" then error("train.fit: expected a table of options, got " .. type(opts), 3) end
  for k in pairs(opts) do
    if not OPTS[k] then error(format("train.fit: unknown option '%s'", tostring(k)), 3) end
  end
  local o = {}
  for k, v in pairs(opts) do o[k] = v end
  if type(o.loop) ~= "function" then
    error("train.fit: option 'loop' must be a function(ctx, config), got " .. type(o.loop), 3)
  end
  local nw = o.num_workers or 1
  if type(nw) == "table" then
    -- elastic: as many workers as fit, from max down to min, at each start
    local lo, hi = nw[1], nw[2]
    if not (is_int(lo, 1) and is_int(hi, 1) and lo <= hi) or nw[3] ~= nil then
      error("train.fit: num_workers = {min, max} needs integers 1 <= min <= max", 3)
    end
    o.min_workers, o.max_workers = lo, hi
  elseif not is_int(nw, 1) then
    error("train.fit: option 'num_workers' must be a positive integer or {min, max}, got " .. tostring(nw), 3)
  else
    o.min_workers, o.max_workers = nw, nw
  end
  local rpw = o.resources_per_worker or {num_cpus = 1}
  if type(rpw) ~= "table" then error("train.fit: option 'resources_per_worker' must be a table", 3) end
  for k, v in pairs(rpw) do
    if not RES_KEYS[k] then
      error(format("train.fit: resources_per_worker: unknown key '%s' (num_cpus, num_gpus, memory, resources)",
        tostring(k)), 3)
    end
    if k == "resources" then
      if type(v) ~= "table" then error("train.fit: resources_per_worker.resources must be a table", 3) end
      for rk, rv in pairs(v) do
        if type(rk) ~= "string" or type(rv) ~= "number" or rv < 0 then
          error(format("train.fit: resources_per_worker.resources has a bad entry %s", tostring(rk)), 3)
        end
      end
    elseif type(v) ~= "number" or v < 0 then
      error(format("train.fit: resources_per_worker.%s must be a non-negative number, got %s", k, tostring(v)), 3)
    end
  end
  o.resources_per_worker = rpw
  o.placement_strategy = o.placement_strategy or "PACK"
  if not STRATEGIES[o.placement_strategy] then
    error("train.fit: option 'placement_strategy' must be " .. tide._pg_strategies .. ", got "
      .. tostring(o.placement_strategy), 3)
  end
  if o.dataset ~= nil and not require("tide.data").is_dataset(o.dataset) then
    error("train.fit: option 'dataset' must be a tide.data Dataset, got " .. type(o.dataset), 3)
  end
  if o.config ~= nil and type(o.config) ~= "table" then
    error("train.fit: option 'config' must be a table, got " .. type(o.config), 3)
  end
  o.config = o.config or {}
  o.max_failures = o.max_failures or 0
  if not (is_int(o.max_failures, 0) or o.max_failures == -1) then
    error("train.fit: option 'max_failures' must be a non-negative integer (or -1: no limit), got "
      .. tostring(o.max_failures), 3)
  end
  if o.checkpoint_dir ~= nil and (type(o.checkpoint_dir) ~= "string" or o.checkpoint_dir == "") then
    error("train.fit: option 'checkpoint_dir' must be a directory path", 3)
  end
  o.keep_checkpoints = o.keep_checkpoints or 2
  if not is_int(o.keep_checkpoints, 1) then
    error("train.fit: option 'keep_checkpoints' must be a positive integer, got " .. tostring(o.keep_checkpoints), 3)
  end
  if o.batch_size ~= nil and not is_int(o.batch_size, 1) then
    error("train.fit: option 'batch_size' must be a positive integer, got " .. tostring(o.batch_size), 3)
  end
  if o.on_report ~= nil and type(o.on_report) ~= "function" then
    error("train.fit: option 'on_report' must be a function(report)", 3)
  end
  if o.progress ~= nil and type(o.progress) ~= "boolean" then
    error("train.fit: option 'progress' must be a boolean", 3)
  end
  o.progress_interval = o.progress_interval or 5
  if type(o.progress_interval) ~= "number" or o.progress_interval <= 0 then
    error("train.fit: option 'progress_interval' must be a positive number", 3)
  end
  if o.runtime_env ~= nil and type(o.runtime_env) ~= "table" then
    error("train.fit: option 'runtime_env' must be a table", 3)
  end
  o.placement_timeout = o.placement_timeout or 60
  if type(o.placement_timeout) ~= "number" or o.placement_timeout <= 0 then
    error("train.fit: option 'placement_timeout' must be a positive number of seconds", 3)
  end
  if o.name ~= nil and (type(o.name) ~= "string" or o.name == "") then
    error("train.fit: option 'name' must be a non-empty string", 3)
  end
  return o
end

local Reporter, Worker

local function classes()
  if Reporter then return end
  Reporter = tide.actor({
    init = function(self) self.q = {} end,
    push = function(self, items)
      local q = self.q
      for _, it in ipairs(items) do q[#q + 1] = it end
      return true
    end,
    drain = function(self)
      local q = self.q
      self.q = {}
      return q
    end,
  }, {num_cpus = 0, max_restarts = -1})
  Worker = tide.actor({
    run = function(_, spec, loop, config)
      local Tr = require("tide.train")
      return Tr._run_rank(spec, loop, config)
    end,
  })
end

-- Runs on each rank's actor: joins the group, runs the loop.
function M._run_rank(spec, loop, config)
  local C = require("tide.collective")
  -- A rank computes on the CPUs it reserved: OpenBLAS would otherwise start
  -- a thread per core in every rank, and the ranks would fight over them.
  if spec.blas_threads then
    pcall(ffi.cdef, "void openblas_set_num_threads(int);")
    pcall(function() ffi.C.openblas_set_num_threads(spec.blas_threads) end)
  end
  local gopts = {timeout = 120}
  if spec.device ~= "cpu" then gopts.backend, gopts.device = "nccl", spec.device end
  C.init_group(spec.world_size, spec.rank, spec.group, gopts)
  local ctx = new_ctx(spec)
  ctx:barrier()
  if spec.rank == 0 then tide.get(spec.reporter:push({{__event = "running", attempt = spec.attempt}})) end
  local ok, res = xpcall(loop, function(e)
    if type(e) == "table" then return e end
    return debug.traceback(tostring(e), 2)
  end, ctx, config)
  -- The last report is in the reporter before the driver sees the result.
  if ctx._last_push then pcall(tide.get, ctx._last_push, {timeout = 60}) end
  if not ok then error(res, 0) end
  C.destroy_group(spec.group)
  return res
end

local function fmt_num(v)
  if type(v) ~= "number" then return tostring(v) end
  if v ~= 0 and (math.abs(v) >= 1e5 or math.abs(v) < 1e-3) then return format("%.3g", v) end
  if v % 1 == 0 then return format("%d", v) end
  return format("%.4f", v)
end

local RETRYABLE = {ActorDiedError = true, WorkerCrashedError = true, NodeDiedError = true}

local run_counter = 0

-- train.fit(opts) -> result {metrics, history, checkpoint, value, attempts, failures, recoveries, wall_s}
function M.fit(opts)
  local o = check(opts)
  classes()
  local t0 = now()
  local progress = o.progress
  if progress == nil then
    local ok, rc = pcall(tide.get_runtime_context)
    progress = not ok or rc.worker_id == "driver"
  end
  local tty = W.isatty(2)
  run_counter = run_counter + 1
  local run_name = o.name or format("train-%d-%d-%d", getpid(), os.time(), run_counter)
  local world = o.max_workers
  local rpw = o.resources_per_worker
  local device = (rpw.num_gpus or 0) > 0 and "cuda:0" or "cpu"
  local bundle = {}
  if (rpw.num_cpus or 0) > 0 then bundle.CPU = rpw.num_cpus end
  if (rpw.num_gpus or 0) > 0 then bundle.GPU = rpw.num_gpus end
  if (rpw.memory or 0) > 0 then bundle.memory = rpw.memory end
  for k, v in pairs(rpw.resources or {}) do bundle[k] = v end
  local function bundles_of(k)
    local list = {}
    for i = 1, k do
      local b = {}
      for key, v in pairs(bundle) do b[key] = v end
      list[i] = b
    end
    return list
  end
  local fault_at
  if o.runtime_env and o.runtime_env.env_vars then
    local f = o.runtime_env.env_vars.TIDE_TRAIN_FAULT
    fault_at = f and tonumber(f:match("^checkpoint:(%d+)$"))
  end
  local max_world = o.max_workers
  if o.dataset then
    -- tide.data reads with tasks of 1 CPU, outside the placement group: a
    -- group that holds every CPU would leave the shards waiting forever.
    local total = tide.cluster_resources().CPU or 0
    local per = rpw.num_cpus or 0
    while max_world >= o.min_workers and total - max_world * per < 1 do max_world = max_world - 1 end
    if max_world < o.min_workers then
      local held = o.min_workers * per
      error(format("train.fit: the %d workers hold %s of the cluster's %s CPUs, leaving less than the 1 CPU"
        .. " that the dataset's read tasks need (they run outside the workers' placement group);"
        .. " ask for less in resources_per_worker.num_cpus", o.min_workers, fmt_num(held), fmt_num(total)), 2)
    end
  end
  local shard_cache = {}
  local function shards_for(k)
    if not o.dataset then return nil end
    shard_cache[k] = shard_cache[k] or o.dataset:split(k)
    return shard_cache[k]
  end

  -- The placement group of the most workers that fit now (elastic), or of
  -- exactly num_workers. Sizes the free resources cannot hold are skipped
  -- without waiting; a size that might fit gets 2 s before the next smaller.
  local function reserve()
    local free = tide.available_resources()
    for k = max_world, o.min_workers, -1 do
      local fits = true
      if k > o.min_workers then
        for key, v in pairs(bundle) do
          if (free[key] or 0) < k * v then fits = false end
        end
      end
      if fits then
        local g = tide.placement_group(bundles_of(k), {strategy = o.placement_strategy})
        local wait = k > o.min_workers and math.min(2, o.placement_timeout) or o.placement_timeout
        if g:wait(wait) then return g, k end
        tide.remove_placement_group(g)
      end
    end
    return nil
  end

  local reporter = Reporter:remote()
  local history, metrics, value = {}, nil, nil
  local failures, recoveries = {}, {}
  local attempt, death_t = 0, nil
  local last_line, lines_drawn = 0, false
  local rate = {t = nil, tokens = nil, tps = nil}
  local pub = {t = nil, dirty = false}

  local function show(final)
    if not progress or not metrics then return end
    local t = now()
    local every = tty and 0.2 or o.progress_interval
    if not final and t - last_line < every then return end
    if final and not tty then return end
    last_line = t
    local parts = {"tide.train"}
    if metrics.step then
      parts[#parts + 1] = o.config.steps and format("step %s/%s", fmt_num(metrics.step), fmt_num(o.config.steps))
        or "step " .. fmt_num(metrics.step)
    end
    if metrics.loss then parts[#parts + 1] = "loss " .. fmt_num(metrics.loss) end
    local tps = metrics.tokens_per_s or rate.tps
    if tps then parts[#parts + 1] = format("%.0f tokens/s", tps) end
    parts[#parts + 1] = format("%d workers", world)
    if attempt > 1 then parts[#parts + 1] = format("attempt %d", attempt) end
    parts[#parts + 1] = format("%.1f s", t - t0)
    local line = concat(parts, ", ")
    if tty then
      io.stderr:write("\r\27[2K", line, final and "\n" or "")
      lines_drawn = not final
    else
      io.stderr:write(line, "\n")
    end
    io.stderr:flush()
  end

  local function say(msg)
    if not progress then return end
    if lines_drawn then io.stderr:write("\r\27[2K") end
    lines_drawn = false
    io.stderr:write("tide.train: ", msg, "\n")
    io.stderr:flush()
  end

  local function take(items)
    for _, r in ipairs(items) do
      if r.__event == "running" then
        if death_t then
          recoveries[#recoveries + 1] = now() - death_t
          failures[#failures].recovery_s = recoveries[#recoveries]
          say(format("training runs again (attempt %d) %.2f s after the failure", attempt, recoveries[#recoveries]))
          death_t = nil
        end
      else
        local rt, ra, rw = r.t, r.a, r.w
        r = r.r
        -- tokens/s over windows of at least 0.5 s of rank 0's clock
        if type(r.tokens) == "number" then
          rate.tl, rate.tokl = rt, r.tokens
          if not rate.t then
            rate.t, rate.tokens = rt, r.tokens
            rate.t0, rate.tokens0 = rt, r.tokens
          elseif rt - rate.t >= 0.5 then
            rate.tps = (r.tokens - rate.tokens) / (rt - rate.t)
            rate.t, rate.tokens = rt, r.tokens
          end
        end
        r._attempt, r._t, r._world_size = ra or attempt, now() - t0, rw or world
        history[#history + 1] = r
        metrics = r
        pub.dirty = true
        if o.on_report then o.on_report(r) end
      end
    end
  end

  local function drain()
    local ok, items = pcall(tide.get, reporter:drain(), {timeout = 30})
    if ok and items then take(items) end
  end

  -- The last report as gauges (the head's /metrics and training page): at
  -- once for the first report, then at most once a second, and at the end.
  local function publish(final)
    if not metrics or (not final and not (pub.dirty and (not pub.t or now() - pub.t >= 1))) then return end
    pub.t, pub.dirty = now(), false
    local run = {run = run_name}
    local puts = {}
    local function gauge(name, help, v, labels)
      puts[#puts + 1] = {"gauge", name, help, labels or run, "set", v}
    end
    for k, v in pairs(metrics) do
      if type(k) == "string" and type(v) == "number" and k:sub(1, 1) ~= "_" then
        gauge("tide_train_metric", "The last value of each number in a training run's reports.", v,
          {run = run_name, key = k})
      end
    end
    if type(metrics.step) == "number" then
      gauge("tide_train_step", "The step of a training run's last report.", metrics.step)
    end
    local tps = tonumber(metrics.tokens_per_s) or rate.tps
    if not tps and final and rate.t0 and rate.tl > rate.t0 then
      tps = (rate.tokl - rate.tokens0) / (rate.tl - rate.t0) -- a run shorter than one window
    end
    if tps then gauge("tide_train_tokens_per_second", "A training run's tokens per second.", tps) end
    gauge("tide_train_workers", "The workers (ranks) of a training run.", world or 0)
    gauge("tide_train_running", "1 while a training run runs, 0 once train.fit returned or raised.",
      final and 0 or 1)
    Metrics._publish(puts)
  end

  local pg, actors
  local function teardown()
    for _, h in ipairs(actors or {}) do pcall(tide.kill, h) end
    if pg then pcall(tide.remove_placement_group, pg) end
    pg, actors = nil, nil
  end

  local ok_all, err_all = pcall(function()
    while true do
      attempt = attempt + 1
      rate.t, rate.tokens, rate.tps, rate.t0, rate.tokens0 = nil, nil, nil, nil, nil
      local last = o.checkpoint_dir and checkpoints(o.checkpoint_dir) or {}
      last = last[#last]
      if attempt > 1 then
        say(format("restarting from %s (failure %d of at most %s)",
          last and last.path or "the start (no checkpoint yet)", #failures,
          o.max_failures == -1 and "unlimited" or tostring(o.max_failures)))
      end
      pg, world = reserve()
      if not pg then
        world = o.min_workers
        local have = tide.cluster_resources()
        local b = {}
        for k, v in pairs(bundle) do b[#b + 1] = k .. " = " .. fmt_num(v) end
        local h = {}
        for k, v in pairs(have) do if k ~= "memory" then h[#h + 1] = k .. " = " .. fmt_num(v) end end
        table.sort(b); table.sort(h)
        error(train_error({message = format(
          "the %d workers ({%s} each, %s) could not be reserved within %g s (the cluster has %s in all)",
          world, concat(b, ", "), o.placement_strategy, o.placement_timeout, concat(h, ", "))}), 0)
      end
      if o.min_workers < o.max_workers then
        say(format("attempt %d runs on %d workers (num_workers = {%d, %d})", attempt, world,
          o.min_workers, o.max_workers))
      end
      local shards = shards_for(world)
      actors = {}
      local refs = {}
      local group = format("%s.a%d", run_name, attempt)
      for r = 0, world - 1 do
        local aopts = {placement_group = pg, bundle_index = r + 1, num_cpus = rpw.num_cpus or 0,
          num_gpus = rpw.num_gpus or 0, memory = rpw.memory or 0, resources = rpw.resources or {},
          own_process = true, max_restarts = 0, max_concurrency = 1}
        if o.runtime_env then aopts.runtime_env = o.runtime_env end
        actors[r + 1] = Worker:options(aopts):remote()
        local spec = {rank = r, world_size = world, device = device, attempt = attempt, group = group,
          reporter = reporter, checkpoint_dir = o.checkpoint_dir, keep = o.keep_checkpoints,
          restore_path = last and last.path, last_index = last and last.index or 0,
          shard = shards and shards[r + 1], batch_size = o.batch_size,
          fault_at = fault_at,
          blas_threads = device == "cpu" and (rpw.num_cpus or 0) >= 1 and floor(rpw.num_cpus) or nil}
        refs[r + 1] = actors[r + 1]:run(spec, o.loop, o.config)
      end
      local rank_of = {}
      for i, ref in ipairs(refs) do rank_of[ref:id()] = i - 1 end
      local pending, results, failure = refs, {}, nil
      local last_drain = 0
      while #pending > 0 and not failure do
        local ready
        ready, pending = tide.wait(pending, {num_returns = 1, timeout = 0.1})
        for _, ref in ipairs(ready) do
          local ok, v = pcall(tide.get, ref)
          local rank = rank_of[ref:id()]
          if ok then results[rank + 1] = v
          else
            failure = {rank = rank, err = v}
            break
          end
        end
        if now() - last_drain >= 0.1 then
          drain()
          last_drain = now()
          show(false)
          publish(false)
        end
      end
      drain()
      if not failure then
        value = results[1]
        teardown()
        return
      end
      death_t = now()
      teardown()
      local e = failure.err
      local kind = type(e) == "table" and e.kind or "error"
      local msg = type(e) == "table" and (e.message or tostring(e)) or tostring(e)
      -- A rank whose collective peer's node died (a group over several
      -- nodes) fails before that node's death reaches here: a death too.
      if not RETRYABLE[kind] and msg:find("NodeDiedError: ", 1, true) then kind = "NodeDiedError" end
      failures[#failures + 1] = {rank = failure.rank, kind = kind, message = msg, attempt = attempt,
        time = death_t - t0, world_size = world}
      local retry = RETRYABLE[kind] or (o.retry_exceptions and true or false)
      say(format("rank %d failed in attempt %d: %s: %s", failure.rank, attempt, kind, msg))
      if not retry then
        error(train_error({rank = failure.rank, cause = e, failures = failures, message = format(
          "rank %d's loop raised in attempt %d: %s: %s (not retried: only deaths of workers are,"
            .. " unless retry_exceptions = true)",
          failure.rank, attempt, kind, msg)}), 0)
      end
      if o.max_failures ~= -1 and #failures > o.max_failures then
        error(train_error({rank = failure.rank, cause = e, failures = failures, message = format(
          "rank %d died in attempt %d and max_failures = %d is used up: %s: %s",
          failure.rank, attempt, o.max_failures, kind, msg)}), 0)
      end
    end
  end)
  teardown()
  pcall(tide.kill, reporter)
  publish(true)
  if not ok_all then
    if lines_drawn then io.stderr:write("\n") end
    error(err_all, 0)
  end
  show(true)
  if metrics or progress then
    say(format("done in %.1f s: %d attempt%s%s", now() - t0, attempt, attempt == 1 and "" or "s",
      metrics and metrics.step and format(", last step %s", fmt_num(metrics.step)) or ""))
  end
  local latest = o.checkpoint_dir and M.latest_checkpoint(o.checkpoint_dir) or nil
  return {metrics = metrics, history = history, checkpoint = latest, value = value,
    attempts = attempt, failures = failures, recoveries = recoveries, wall_s = now() - t0,
    num_workers = world}
end

return M
