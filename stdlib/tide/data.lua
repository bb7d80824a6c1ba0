-- tide.data: streaming datasets (DESIGN §5). A Dataset is a recipe: a
-- source (a range, items, or files split into byte ranges) and a chain of
-- operations (map, filter, map_batches with tasks or a pool of actors,
-- repartition). Nothing runs until a consuming call (iter_rows,
-- iter_batches, take, count, write_*); each runs the whole pipeline once,
-- streaming, through tide.data.exec. Row operations that follow one another
-- are fused into the tasks of the stage before them.
local tide = require("tide")
local core = require("tide.core")
local W = require("tide.data.worker")
local E = require("tide.data.exec")

local type, pairs, ipairs, tostring, setmetatable, getmetatable, error, select, newproxy =
  type, pairs, ipairs, tostring, setmetatable, getmetatable, error, select, newproxy
local format, concat, floor, ceil, max, min = string.format, table.concat, math.floor, math.ceil, math.max, math.min
local open, popen = io.open, io.popen

local M = {}

M.DataError = E.DataError

-- Defaults for every consuming call; set with data.set_option(key, value).
local defaults = {
  preserve_order = true,
  progress = true,
  progress_interval = 5, -- seconds between plain progress lines (not a terminal)
  max_retries = 3,
  on_error = "raise",
  max_in_flight = nil, -- per stage; nil: 2 per CPU (tasks), 2 per actor + 2 (pools)
  block_bytes = nil,   -- source block size; nil: 2 MiB, less with a small store
}
local function valid_option(k) return defaults[k] ~= nil or k == "max_in_flight" or k == "block_bytes" end

local function check_opts(fn, opts, allowed, level)
  if opts == nil then return {} end
  if type(opts) ~= "table" then
    error(format("%s: options must be a table, got %s", fn, type(opts)), level + 1)
  end
  for k in pairs(opts) do
    if not allowed[k] then error(format("%s: unknown option '%s'", fn, tostring(k)), level + 1) end
  end
  return opts
end

local function set_of(...)
  local s = {}
  for i = 1, select("#", ...) do s[select(i, ...)] = true end
  return s
end

local function check_on_error(fn, v, level)
  if v ~= nil and v ~= "raise" and v ~= "skip" then
    error(format("%s: on_error must be \"raise\" or \"skip\", got %s", fn, tostring(v)), level + 1)
  end
end

local function check_count(fn, key, v, level, allow_zero)
  if v ~= nil and (type(v) ~= "number" or v ~= floor(v) or v < (allow_zero and 0 or 1)) then
    error(format("%s: %s must be a %s integer, got %s", fn, key,
      allow_zero and "non-negative" or "positive", tostring(v)), level + 1)
  end
end

-- data.set_option(key, value): changes a default of every later run:
-- preserve_order, progress, progress_interval, max_retries, on_error, max_in_flight, block_bytes.
function M.set_option(k, v)
  if not valid_option(k) then error(format("data.set_option: unknown option '%s'", tostring(k)), 2) end
  defaults[k] = v
end

-- data.set_progress(on): progress lines on stderr (default on, in the driver).
function M.set_progress(on) defaults.progress = not not on end

-- -- Datasets ---------------------------------------------------------------

local Dataset = {}
Dataset.__index = Dataset
Dataset.__tide_module = "tide.data"
-- A Dataset sent to a task or actor (say, a shard of ds:split) arrives as
-- a Dataset: its recipe travels, user functions included.
Dataset.__tide_ser = function(ds) return core.encode({ds._src, ds._ops}) end
function M.__tide_deser(s)
  local t = core.decode(s)
  return setmetatable({_src = t[1], _ops = t[2]}, Dataset)
end
Dataset.__tostring = function(ds)
  local parts = {ds._src.name}
  for _, op in ipairs(ds._ops) do parts[#parts + 1] = op.kind end
  return "Dataset(" .. concat(parts, " -> ") .. ")"
end

local function new_ds(src, ops) return setmetatable({_src = src, _ops = ops}, Dataset) end

local function with_op(ds, op)
  local ops = {}
  for i, o in ipairs(ds._ops) do ops[i] = o end
  ops[#ops + 1] = op
  return new_ds(ds._src, ops)
end

function M.is_dataset(v) return getmetatable(v) == Dataset end

-- -- Sources ----------------------------------------------------------------

-- The cluster's CPUs: a whole count of at least 1, and as it reports them.
local function cpus()
  local ok, r = pcall(tide.cluster_resources)
  local n = ok and r.CPU or nil
  return n and max(1, floor(n)) or 1, n or 1
end

local RANGE_OPTS = set_of("block_rows", "num_blocks")

local function row_blocks(fn, n, opts)
  local br = opts.block_rows
  check_count(fn, "block_rows", br, 3)
  check_count(fn, "num_blocks", opts.num_blocks, 3)
  if not br then
    local nb = opts.num_blocks or max(min(n, 16), ceil(n / 100000))
    br = max(1, ceil(n / max(nb, 1)))
  end
  return br
end

-- data.range(n [, {block_rows, num_blocks}]): rows {id = 1..n}.
function M.range(n, opts)
  if type(n) ~= "number" or n ~= floor(n) or n < 0 then
    error("data.range: n must be a non-negative integer, got " .. tostring(n), 2)
  end
  opts = check_opts("data.range", opts, RANGE_OPTS, 2)
  local br = row_blocks("data.range", n, opts)
  return new_ds({kind = "range", name = "range", n = n, block_rows = br}, {})
end

-- data.from_items(array [, {block_rows, num_blocks}]): one row per item.
function M.from_items(items, opts)
  if type(items) ~= "table" then
    error("data.from_items: expected an array of rows, got " .. type(items), 2)
  end
  opts = check_opts("data.from_items", opts, RANGE_OPTS, 2)
  local n = #items
  for k in pairs(items) do
    if type(k) ~= "number" or k < 1 or k > n or k ~= floor(k) then
      error("data.from_items: expected an array of rows (found key " .. tostring(k) .. ")", 2)
    end
  end
  local copy = {}
  for i = 1, n do copy[i] = items[i] end
  local br = row_blocks("data.from_items", n, opts)
  return new_ds({kind = "items", name = "from_items", items = copy, block_rows = br}, {})
end

local function shell_quote(s) return "'" .. s:gsub("'", "'\\''") .. "'" end

local function is_dir(path)
  local f = open(path .. "/.", "rb")
  if f then f:close(); return true end
  return false
end

local function file_size(path)
  local f = open(path, "rb")
  if not f then return nil end
  local size = f:seek("end")
  f:close()
  return size
end

-- Turns a glob pattern (* ? [..]) for one path component into a Lua pattern.
local function glob_to_pattern(g)
  local out, i = {"^"}, 1
  while i <= #g do
    local c = g:sub(i, i)
    if c == "*" then out[#out + 1] = "[^/]*"
    elseif c == "?" then out[#out + 1] = "[^/]"
    elseif c == "[" then
      local j = g:find("]", i + 1, true)
      if not j then out[#out + 1] = "%[" else
        local body = g:sub(i + 1, j - 1):gsub("^!", "^"):gsub("%%", "%%%%")
        out[#out + 1] = "[" .. body .. "]"
        i = j
      end
    elseif c:find("[%^%$%(%)%%%.%+%-]") then out[#out + 1] = "%" .. c
    else out[#out + 1] = c end
    i = i + 1
  end
  out[#out + 1] = "$"
  return concat(out)
end

-- Lists the regular files in dir (recursively when deep), sorted.
local function list_files(dir, deep)
  local cmd = format("find %s %s -type f -print 2>/dev/null", shell_quote(dir), deep and "" or "-maxdepth 1")
  local p = popen(cmd)
  local out = {}
  for line in p:lines() do out[#out + 1] = line end
  p:close()
  table.sort(out)
  return out
end

-- Expands paths, directories (every file under them, recursively) and
-- globs (wildcards in the last component) into a sorted list of files.
-- Errors at level 4: the caller of data.read_* (via file_source).
local function expand_paths(fn, spec)
  if type(spec) == "string" then spec = {spec} end
  if type(spec) ~= "table" or #spec == 0 then
    error(fn .. ": expected a path, a glob or an array of them", 4)
  end
  local files = {}
  for _, p in ipairs(spec) do
    if type(p) ~= "string" then error(fn .. ": paths must be strings, got " .. type(p), 4) end
    if p:find("[%*%?%[]") then
      local dir, base = p:match("^(.*)/([^/]*)$")
      if not dir then dir, base = ".", p end
      if dir:find("[%*%?%[]") then
        error(fn .. ": wildcards are supported in the last path component only: " .. p, 4)
      end
      local pat = glob_to_pattern(base)
      local n0 = #files
      for _, f in ipairs(list_files(dir == "" and "/" or dir, false)) do
        if f:match("([^/]*)$"):match(pat) then
          files[#files + 1] = (dir == "." and not p:find("^%./")) and f:gsub("^%./", "") or f
        end
      end
      if #files == n0 then error(fn .. ": no files match " .. p, 4) end
    elseif is_dir(p) then
      local n0 = #files
      for _, f in ipairs(list_files(p, true)) do files[#files + 1] = f end
      if #files == n0 then error(fn .. ": no files in directory " .. p, 4) end
    else
      if not file_size(p) then error(fn .. ": cannot open " .. p, 4) end
      files[#files + 1] = p
    end
  end
  return files
end

local FILE_OPTS = set_of("block_bytes")

local function file_source(fn, kind, spec, opts, extra)
  opts = check_opts(fn, opts, extra or FILE_OPTS, 3)
  check_count(fn, "block_bytes", opts.block_bytes, 3)
  local files = expand_paths(fn, spec)
  local src = {kind = kind, name = fn:gsub("^data%.", ""), block_bytes = opts.block_bytes, files = {}}
  for i, f in ipairs(files) do src.files[i] = {path = f, size = file_size(f) or 0} end
  return src
end

-- data.read_lines(paths [, {block_bytes}]): rows {text, path, line}.
function M.read_lines(paths, opts) return new_ds(file_source("data.read_lines", "lines", paths, opts), {}) end

-- data.read_jsonl(paths [, {block_bytes}]): one row per JSON line.
function M.read_jsonl(paths, opts) return new_ds(file_source("data.read_jsonl", "jsonl", paths, opts), {}) end

-- data.read_csv(paths [, {block_bytes, sep}]): rows keyed by the header's names.
function M.read_csv(paths, opts)
  local src = file_source("data.read_csv", "csv", paths, opts, set_of("block_bytes", "sep"))
  local sep = opts and opts.sep or ","
  if type(sep) ~= "string" or #sep ~= 1 or sep == '"' then
    error("data.read_csv: sep must be one character (not a quote)", 2)
  end
  src.sep = sep
  return new_ds(src, {})
end

-- data.read_binary(paths [, {block_bytes}]): rows {path, bytes}, one per file.
function M.read_binary(paths, opts) return new_ds(file_source("data.read_binary", "binary", paths, opts), {}) end

-- The source's block descriptors for one run.
local function plan_source(src, shard, block_bytes)
  local descs = {}
  local k = src.kind
  if k == "range" or k == "items" then
    local n = k == "range" and src.n or #src.items
    local br = src.block_rows
    for lo = 1, n, br do
      local hi = min(n, lo + br - 1)
      if k == "range" then descs[#descs + 1] = {kind = "range", lo = lo, hi = hi}
      else
        local items = {}
        for i = lo, hi do items[#items + 1] = src.items[i] end
        descs[#descs + 1] = {kind = "items", items = items, first = lo}
      end
    end
  elseif k == "binary" then
    local cur, bytes = nil, 0
    for _, f in ipairs(src.files) do
      if not cur or bytes + f.size > block_bytes then
        cur = {kind = "binary", paths = {}}
        descs[#descs + 1] = cur
        bytes = 0
      end
      cur.paths[#cur.paths + 1] = f.path
      bytes = bytes + f.size
    end
  else
    for _, f in ipairs(src.files) do
      local nb = max(1, ceil(f.size / block_bytes))
      for b = 1, nb do
        local d = {kind = k, path = f.path, size = f.size, sep = src.sep,
          start = floor((b - 1) * f.size / nb), stop = floor(b * f.size / nb)}
        if k == "lines" and nb > 1 then d.chain = true; d.first_in_file = b == 1 end
        descs[#descs + 1] = d
      end
    end
  end
  if shard then
    for i, d in ipairs(descs) do
      if (i - 1) % shard[2] ~= shard[1] - 1 then d.skip = true end
    end
  end
  return descs
end

-- -- Transformations ----------------------------------------------------------

local ROW_OPTS = set_of("on_error", "name")

local function row_op(ds, kind, fn, opts, level)
  if type(fn) ~= "function" then
    error(format("ds:%s: expected a function(row), got %s", kind, type(fn)), level + 1)
  end
  opts = check_opts("ds:" .. kind, opts, ROW_OPTS, level + 1)
  check_on_error("ds:" .. kind, opts.on_error, level + 1)
  return with_op(ds, {kind = kind, fn = fn, on_error = opts.on_error, name = opts.name})
end

-- ds:map(fn(row) -> row): one row out per row in.
function Dataset:map(fn, opts) return row_op(self, "map", fn, opts, 2) end

-- ds:filter(fn(row) -> keep): keeps the rows for which fn is true.
function Dataset:filter(fn, opts) return row_op(self, "filter", fn, opts, 2) end

local MB_OPTS = set_of("batch_size", "fuse", "concurrency", "num_gpus", "num_cpus", "memory", "resources",
  "max_retries", "on_error", "max_in_flight", "init_args", "name", "max_tasks_in_flight_per_actor",
  "batches_per_unit")

-- A unit of a map_batches stage (one task or actor call, one part file when
-- the stage writes) carries at most this many rows when batches_per_unit is
-- not given (but always at least one batch), fewer when its rows are large
-- (tide.data.exec's UNIT_MAX_BYTES): the stage before cuts its blocks to
-- this size, so a unit decodes about the rows it uses.
M.UNIT_MAX_ROWS = 16384

-- ds:map_batches(fn(batch) -> batch, opts) with tasks, or
-- ds:map_batches({init = fn(self, ...), call = fn(self, batch)}, opts) with a
-- pool of actors.
function Dataset:map_batches(fn, opts)
  local stateful = type(fn) == "table"
  if not stateful and type(fn) ~= "function" then
    error("ds:map_batches: expected a function(batch) or a table {init = ..., call = ...}, got " .. type(fn), 2)
  end
  if stateful then
    if type(fn.call) ~= "function" then error("ds:map_batches: the table needs a call = function(self, batch)", 2) end
    if fn.init ~= nil and type(fn.init) ~= "function" then error("ds:map_batches: init must be a function(self)", 2) end
    for k in pairs(fn) do
      if k ~= "init" and k ~= "call" then
        error("ds:map_batches: unknown field '" .. tostring(k) .. "' (expected init, call)", 2)
      end
    end
  end
  opts = check_opts("ds:map_batches", opts, MB_OPTS, 2)
  check_count("ds:map_batches", "batch_size", opts.batch_size, 2)
  check_count("ds:map_batches", "max_retries", opts.max_retries, 2, true)
  check_count("ds:map_batches", "max_in_flight", opts.max_in_flight, 2)
  check_count("ds:map_batches", "max_tasks_in_flight_per_actor", opts.max_tasks_in_flight_per_actor, 2)
  check_count("ds:map_batches", "batches_per_unit", opts.batches_per_unit, 2)
  check_on_error("ds:map_batches", opts.on_error, 2)
  for _, key in ipairs({"num_gpus", "num_cpus", "memory"}) do
    local v = opts[key]
    if v ~= nil and (type(v) ~= "number" or v < 0) then
      error(format("ds:map_batches: %s must be a non-negative number, got %s", key, tostring(v)), 2)
    end
  end
  local conc = opts.concurrency
  if conc ~= nil then
    if type(conc) == "number" then
      check_count("ds:map_batches", "concurrency", conc, 2)
      conc = {conc, conc}
    elseif type(conc) == "table" then
      local a, b = conc[1], conc[2]
      if type(a) ~= "number" or type(b) ~= "number" or a ~= floor(a) or b ~= floor(b) or a < 1 or b < a then
        error("ds:map_batches: concurrency must be n or {min, max} with 1 <= min <= max", 2)
      end
      conc = {a, b}
    else
      error("ds:map_batches: concurrency must be n or {min, max}, got " .. type(conc), 2)
    end
  end
  if opts.fuse ~= nil and type(opts.fuse) ~= "boolean" then
    error("ds:map_batches: fuse must be a boolean, got " .. type(opts.fuse), 2)
  end
  if not stateful and (opts.init_args or opts.max_tasks_in_flight_per_actor) then
    error("ds:map_batches: init_args and max_tasks_in_flight_per_actor need {init, call} (an actor pool)", 2)
  end
  if opts.batches_per_unit and not opts.batch_size then
    error("ds:map_batches: batches_per_unit needs batch_size", 2)
  end
  return with_op(self, {kind = "map_batches", fn = fn, stateful = stateful, opts = opts, concurrency = conc})
end

-- ds:repartition(n): n blocks of (nearly) equal rows; waits for all input.
function Dataset:repartition(n)
  check_count("ds:repartition", "n", n, 2)
  if n == nil then error("ds:repartition: expected a number of blocks", 2) end
  return with_op(self, {kind = "repartition", n = n})
end

-- ds:split(n) -> n datasets (shards): shard i runs its own part of the
-- source blocks through the whole pipeline, independently of the others.
function Dataset:split(n)
  check_count("ds:split", "n", n, 2)
  if n == nil then error("ds:split: expected a number of shards", 2) end
  if self._src.shard then error("ds:split: the dataset is already a shard", 2) end
  local out = {}
  for i = 1, n do
    local src = {}
    for k, v in pairs(self._src) do src[k] = v end
    src.shard = {i, n}
    src.name = format("%s[shard %d/%d]", self._src.name, i, n)
    out[i] = new_ds(src, self._ops)
  end
  return out
end

-- -- Compiling a run ------------------------------------------------------------

local RUN_OPTS = set_of("preserve_order", "progress", "progress_interval", "max_retries", "on_error",
  "max_in_flight", "block_bytes", "name")

local function run_options(fn, opts, level)
  opts = check_opts(fn, opts, RUN_OPTS, level + 1)
  check_on_error(fn, opts.on_error, level + 1)
  check_count(fn, "max_retries", opts.max_retries, level + 1, true)
  check_count(fn, "max_in_flight", opts.max_in_flight, level + 1)
  check_count(fn, "block_bytes", opts.block_bytes, level + 1)
  if opts.name ~= nil and (type(opts.name) ~= "string" or opts.name == "") then
    error(format("%s: name must be a non-empty string, got %s", fn, tostring(opts.name)), level + 1)
  end
  local o = {}
  for k, v in pairs(defaults) do o[k] = v end
  for k, v in pairs(opts) do o[k] = v end
  -- A run in a task or actor (a training rank's shard) shows no progress
  -- and publishes no tide_data_* series: only the driver's runs do.
  local ok, ctx = pcall(tide.get_runtime_context)
  o.publish = not (ok and ctx.worker_id ~= "driver")
  if not o.publish then o.progress = false end
  return o
end

-- Stages: the source with the row operations after it; then one stage per
-- map_batches or repartition, each with the row operations after it; the
-- sink fused into the last stage (a pool's actors write their own output:
-- a separate write stage would cost one more trip through the store).
-- `discard`: the last stage only counts its rows (ds:count), so its
-- blocks never enter the store.
local function compile(ds, run, sink, discard)
  local ncpu, total = cpus()
  local defs = {}
  local cur = {kind = "tasks", name = ds._src.name, ops = {}, on_error = run.on_error,
    max_retries = run.max_retries, task_opts = {}}
  local function push()
    defs[#defs + 1] = cur
  end
  for _, op in ipairs(ds._ops) do
    local o = op.opts or {}
    if op.kind == "map" or op.kind == "filter" then
      cur.ops[#cur.ops + 1] = {kind = op.kind, fn = op.fn, skip = (op.on_error or run.on_error) == "skip"}
      cur.name = cur.name .. "->" .. (op.name or op.kind)
    elseif op.kind == "map_batches" and not op.stateful and cur.kind == "tasks" and not cur.sink
      and o.num_gpus == nil and o.num_cpus == nil and o.memory == nil and o.resources == nil
      and op.concurrency == nil and o.max_in_flight == nil and o.batches_per_unit == nil and o.fuse ~= false then
      -- Fused into the tasks before it: no trip through the store. Batches
      -- are cut within each block.
      cur.ops[#cur.ops + 1] = {kind = "batch", fn = op.fn, batch_size = o.batch_size,
        skip = (o.on_error or run.on_error) == "skip"}
      cur.name = cur.name .. "->" .. (o.name or "map_batches")
      if o.max_retries then cur.max_retries = o.max_retries end
    elseif op.kind == "map_batches" then
      push()
      cur = {kind = op.stateful and "actors" or "tasks",
        name = o.name or (op.stateful and "map_batches(actors)" or "map_batches"),
        ops = {}, batch_size = o.batch_size, on_error = o.on_error or run.on_error,
        max_retries = o.max_retries or run.max_retries, fn = op.fn, max_in_flight = o.max_in_flight,
        task_opts = {num_gpus = o.num_gpus, num_cpus = o.num_cpus, memory = o.memory, resources = o.resources},
        concurrency = op.concurrency, init_args = o.init_args, per_actor = o.max_tasks_in_flight_per_actor}
      if op.stateful then cur.concurrency = cur.concurrency or {1, 1} end
      if o.batch_size then
        cur.batches_per_unit = o.batches_per_unit
        cur.max_batches_per_unit = o.batches_per_unit or max(1, floor(M.UNIT_MAX_ROWS / o.batch_size))
      end
    elseif op.kind == "repartition" then
      push()
      cur = {kind = "tasks", name = "repartition(" .. op.n .. ")", ops = {}, repartition = op.n,
        on_error = run.on_error, max_retries = run.max_retries, task_opts = {}}
    end
  end
  if sink then
    cur.sink = sink
    cur.name = cur.name == "write" and "write_" .. sink.format or cur.name .. "->write_" .. sink.format
  end
  push()
  -- A pool's actors hold their CPUs for the whole run, up to its largest
  -- size: pools that can hold so many that a task of another stage no
  -- longer fits would leave the run waiting forever.
  local held, need, needy = 0, 0, nil
  for _, def in ipairs(defs) do
    if def.kind == "actors" then held = held + def.concurrency[2] * (def.task_opts.num_cpus or 0)
    elseif (def.task_opts.num_cpus or 1) > need then need, needy = def.task_opts.num_cpus or 1, def.name end
  end
  if held > 0 and need > 0 and held + need > total + 1e-9 then
    error(format("tide.data: the actor pools can hold %g of the cluster's %g CPUs (concurrency x num_cpus), "
      .. "leaving less than the %g CPU a task of stage '%s' needs: the run would wait forever. Lower the "
      .. "pools' concurrency or num_cpus", held, total, need, needy), 0)
  end

  local store = tide.stats().store_capacity or 0
  local bb = run.block_bytes or ds._src.block_bytes
  if not bb then
    bb = 2 * 2^20 -- Lua rows cost far more than their bytes: keep blocks modest
    if store > 0 then bb = max(64 * 1024, min(bb, floor(store / 64))) end
  end
  defs[1].descs = plan_source(ds._src, ds._src.shard, bb)

  for i, def in ipairs(defs) do
    local nxt = defs[i + 1]
    local split = nxt and not nxt.repartition and nxt.batch_size or nil
    -- Blocks cut to the next stage's largest unit, not to one batch.
    if split and nxt.max_batches_per_unit then split = split * nxt.max_batches_per_unit end
    local plan = {ops = def.ops, sink = def.sink, label = def.name, split_rows = split,
      discard = discard and i == #defs or nil}
    plan.skip, plan.max_retries = def.on_error == "skip", def.max_retries
    if def.kind == "actors" then
      plan.call = def.fn.call
      local user = {init = def.fn.init}
      local topts = {max_concurrency = 1}
      for k, v in pairs(def.task_opts) do topts[k] = v end
      def.class = tide.actor({
        init = function(self, args) W.actor_init(self, user, args) end,
        run = function(self, spec, ...) return W.run(plan, self, spec, ...) end,
      }, topts)
      local per = def.per_actor or 2
      def.max_in_flight = def.max_in_flight or run.max_in_flight or (def.concurrency[2] * per + 2)
    else
      plan.batch_fn = def.fn
      -- pipeline: the executor bounds the units in flight, so each worker
      -- may hold its next unit while it runs one (no idle round trip).
      local topts = {max_retries = 0, name = "tide.data:" .. def.name, pipeline = true}
      for k, v in pairs(def.task_opts) do topts[k] = v end
      def.rf = tide.remote(topts, function(spec, ...) return W.run(plan, nil, spec, ...) end)
      local conc = def.concurrency and def.concurrency[2]
      def.slots = conc or ncpu -- the units that run at once, for the last units' sizes
      def.max_in_flight = def.max_in_flight or run.max_in_flight or conc or 2 * ncpu
    end
  end
  return defs
end

-- Runs whose iterator was dropped before the end (a loop left with break):
-- the iterator's guard marks them when collected, and the next run ends
-- them (cancels their work, kills their pools). A finalizer only marks:
-- it may run in the middle of any Tide call.
local abandoned = {}

-- An output block's rows; the block is let go at once (the rows are a
-- copy), not when the caller's state next collects.
local function fetch(m)
  local b = W.unpack(tide.get(m.ref))
  core.release(m.ref)
  return b
end

local function guard(ex)
  local p = newproxy(true)
  getmetatable(p).__gc = function()
    if not ex.finished then abandoned[#abandoned + 1] = ex end
  end
  return p
end

-- M.reap(): ends the runs of abandoned iterators now (done by every run).
function M.reap()
  while #abandoned > 0 do
    local ex = table.remove(abandoned)
    pcall(ex.shutdown, ex)
  end
end

local count_rf
local runs = 0
local function start(ds, run, sink, discard)
  M.reap()
  local defs = compile(ds, run, sink, discard)
  count_rf = count_rf or tide.remote({num_cpus = 0, name = "tide.data:count_lines"}, W.count_lines)
  runs = runs + 1
  local ex = E.new(defs, {preserve_order = run.preserve_order, progress = run.progress,
    progress_interval = run.progress_interval, count_rf = count_rf, publish = run.publish,
    name = run.name or format("data-%d-%d-%d", W.getpid(), os.time(), runs)})
  ds._last = ex
  return ex
end

-- -- Consuming calls -------------------------------------------------------------

-- ds:iter_rows([opts]) -> iterator over rows, streaming.
function Dataset:iter_rows(opts)
  local ex = start(self, run_options("ds:iter_rows", opts, 2))
  local block, i = nil, 0
  local keep = guard(ex)
  return function()
    if not keep then return nil end
    while true do
      if block and i < #block then
        i = i + 1
        return block[i]
      end
      local m = ex:next_output()
      if not m then return nil end
      block, i = m.n > 0 and fetch(m) or nil, 0
    end
  end
end

-- ds:iter_batches([{batch_size, ...}]) -> iterator over arrays of rows.
function Dataset:iter_batches(opts)
  opts = opts or {}
  if type(opts) ~= "table" then error("ds:iter_batches: options must be a table", 2) end
  local bs = opts.batch_size
  check_count("ds:iter_batches", "batch_size", bs, 2)
  local ro = {}
  for k, v in pairs(opts) do if k ~= "batch_size" then ro[k] = v end end
  local ex = start(self, run_options("ds:iter_batches", ro, 2))
  local block, off = nil, 0
  local keep = guard(ex)
  return function()
    if not keep then return nil end
    local out, n = {}, 0
    while true do
      if block and off < #block then
        if not bs and n == 0 then
          off = #block
          return block
        end
        while off < #block and n < bs do off = off + 1; n = n + 1; out[n] = block[off] end
        if n == bs then return out end
      end
      local m = ex:next_output()
      if not m then return n > 0 and out or nil end
      block, off = m.n > 0 and fetch(m) or nil, 0
    end
  end
end

-- ds:take(n [, opts]) -> the first n rows (fewer if there are fewer); stops
-- the pipeline once it has them.
function Dataset:take(n, opts)
  n = n == nil and 20 or n
  check_count("ds:take", "n", n, 2, true)
  local ex = start(self, run_options("ds:take", opts, 2))
  local out = {}
  while #out < n do
    local m = ex:next_output()
    if not m then break end
    if m.n > 0 then
      local b = fetch(m)
      for i = 1, min(#b, n - #out) do out[#out + 1] = b[i] end
    end
  end
  ex:shutdown()
  return out
end

-- ds:take_all([opts]) -> every row, in one array.
function Dataset:take_all(opts)
  local out = {}
  for row in self:iter_rows(opts) do out[#out + 1] = row end
  return out
end

-- ds:count([opts]) -> the number of rows; the last stage's blocks are
-- counted where they are made, never stored or fetched.
function Dataset:count(opts)
  local ex = start(self, run_options("ds:count", opts, 2), nil, true)
  local n = 0
  while true do
    local m = ex:next_output()
    if not m then break end
    n = n + m.n
  end
  return n
end

local function write(ds, fmt, dir, opts, level)
  if type(dir) ~= "string" or dir == "" then
    error(format("ds:write_%s: expected a directory path, got %s", fmt, type(dir)), level + 1)
  end
  local columns
  if opts and fmt == "csv" then
    columns = opts.columns
    if columns ~= nil and (type(columns) ~= "table" or #columns == 0) then
      error("ds:write_csv: columns must be a non-empty array of names", level + 1)
    end
    local o = {}
    for k, v in pairs(opts) do if k ~= "columns" then o[k] = v end end
    opts = o
  end
  local run = run_options("ds:write_" .. fmt, opts, level + 1)
  dir = dir:gsub("/+$", "")
  if dir == "" then dir = "/" end
  if not is_dir(dir) then
    local ok = os.execute("mkdir -p " .. shell_quote(dir) .. " 2>/dev/null")
    if (ok ~= 0 and ok ~= true) or not is_dir(dir) then
      error(format("ds:write_%s: cannot create directory %s", fmt, dir), level + 1)
    end
  end
  local ex = start(ds, run, {dir = dir, format = fmt, columns = columns})
  -- Temporary files of attempts that died mid-write (a crashed worker)
  -- are removed at the end, whether the run succeeds or fails.
  local clean = "find " .. shell_quote(dir) .. " -maxdepth 1 -name '.part-*.tmp-*' -delete 2>/dev/null"
  local ok, err = pcall(function() while ex:next_output() do end end)
  os.execute(clean)
  if not ok then error(err, 0) end
  return ds:stats()
end

-- ds:write_jsonl(dir [, opts]) -> stats: one dir/part-NNNNNN.jsonl per block.
function Dataset:write_jsonl(dir, opts) return write(self, "jsonl", dir, opts, 2) end

-- ds:write_csv(dir [, {columns, ...}]) -> stats: one part-NNNNNN.csv per block.
function Dataset:write_csv(dir, opts) return write(self, "csv", dir, opts, 2) end

local Stats = {}
Stats.__index = Stats
Stats.__tostring = function(s)
  local out = {format("%d rows in %.2f s; peak store %s of %s, peak spilled %s",
    s.rows, s.wall_s, E.fmt_bytes(s.peak_store_bytes), E.fmt_bytes(s.store_capacity),
    E.fmt_bytes(s.peak_spilled_bytes))}
  for i, st in ipairs(s.stages) do
    local l = format("  stage %d %s (%s): %d rows in, %d out, %d blocks, %.2f s, busy %.2f s, peak %d/%d in flight",
      i, st.name, st.kind, st.rows_in, st.rows_out, st.blocks, st.time_s, st.busy_s,
      st.peak_in_flight, st.max_in_flight)
    if st.retries > 0 then l = l .. format(", %d retries", st.retries) end
    if st.skipped_rows > 0 or st.skipped_batches > 0 then
      l = l .. format(", %d rows skipped (%d batches)", st.skipped_rows, st.skipped_batches)
    end
    if st.actors then
      l = l .. format(", %d calls", st.calls)
      l = l .. format(", %d actors (%d started, %d replaced), %.0f%% busy",
        st.actors, st.actors_started, st.actors_replaced, st.utilization * 100)
    end
    out[#out + 1] = l
  end
  if s.bytes_written > 0 then out[#out + 1] = format("  wrote %d files, %s", #s.files, E.fmt_bytes(s.bytes_written)) end
  return concat(out, "\n")
end

-- ds:stats() -> the statistics of this dataset's last run (nil before one).
function Dataset:stats()
  if not self._last then return nil end
  return setmetatable(self._last:stats(), Stats)
end

M.Dataset = Dataset
return M
