-- tide.data.exec: the streaming executor. The driver (or whatever task
-- consumes the dataset) runs a loop that submits units of work (tasks, or
-- calls on a pool of actors), waits for any of them with tide.wait, and
-- hands each finished block to the next stage. Blocks stay in the object
-- store; only their small metadata ({ref, n, ...}) comes back here.
--
-- Memory is bounded by construction: a stage may hold at most
-- `max_in_flight` units (running, or finished and not yet taken by the next
-- stage), so a slow stage fills its predecessor's buffer and the
-- predecessor stops submitting — back-pressure up to the source. Sources
-- also pause while the store is more than 70% full.
local tide = require("tide")
local core = require("tide.core")
local W = require("tide.data.worker")
local release = core.release

local type, pairs, ipairs, pcall, error, tostring, setmetatable =
  type, pairs, ipairs, pcall, error, tostring, setmetatable
local format, floor, ceil, min = string.format, math.floor, math.ceil, math.min
local unpack = unpack
local now = W.now

local E = {}

-- A map_batches unit's target length when batches_per_unit is not given:
-- the executor measures the time per batch and sizes each unit to about
-- this many seconds of a task's or actor's work (at least one batch, at
-- most the stage's max_batches_per_unit), so cheap batches travel many to
-- a unit (a task costs the driver and the worker about 0.2 ms, which a
-- batch of 1 µs rows does not cover) and a slow model's batches one at a
-- time.
E.UNIT_TARGET_S = 0.1

-- A unit's input takes at most about this many bytes in the store (rows of
-- blocks that were not packed count UNKNOWN_ROW_BYTES each), and at most
-- data.UNIT_MAX_ROWS rows. Small rows (an id and a number) travel up to
-- 16,384 a unit, so that a unit of 1 µs rows is more than a few ms of work
-- for its task's trip through the driver and the node (at 8,192, before
-- task stages were pipelined, the workers sat idle 8-15% of a stage run
-- between units); not more, as units of 65,536 such rows cost 5-10% more
-- CPU a row, their rows no longer in the caches. Large rows (text,
-- images) travel fewer, so a unit's memory stays about the same.
E.UNIT_MAX_BYTES = 2 ^ 20
E.UNKNOWN_ROW_BYTES = 128

-- -- Errors ----------------------------------------------------------------

-- The error a failed pipeline raises: a table (kind, stage, rows, message,
-- traceback, attempts) that reads well through tostring.
local DataError = {}
DataError.__index = DataError
DataError.__tostring = function(e)
  local s = format("DataError: %s", e.message)
  if e.traceback and e.traceback ~= "" then s = s .. "\n(remote) " .. e.traceback end
  return s
end
E.DataError = DataError

-- The rows of the batch a unit's error names (W's "call failed on the
-- batch of rows A-B: "), and the message with the batch function's own
-- traceback taken out of it: a unit of many batches fails on one.
local function failed_batch(msg, tb)
  local a, b = msg:match("call failed on the batch of rows (%d+)%-(%d+): ")
  if not a then return nil, nil, msg, tb end
  local cut = msg:find("\nstack traceback:", 1, true)
  if cut then msg, tb = msg:sub(1, cut - 1), msg:sub(cut + 1) .. (tb ~= "" and "\n" .. tb or "") end
  return tonumber(a), tonumber(b), msg, tb
end

local function fail(ex, st, unit, err, attempts)
  local kind, msg, tb = "Error", tostring(err), ""
  if type(err) == "table" then
    kind, msg, tb = err.kind or "Error", err.message or tostring(err), err.traceback or ""
  end
  local first, last
  first, last, msg, tb = failed_batch(msg, tb)
  first, last = first or unit.first, last or unit.last
  local where
  if unit.spec.desc then
    where = E.describe_desc(unit.spec.desc)
  elseif first then
    where = format("rows %d-%d of its input", first, last)
  else
    where = format("block %d", unit.idx)
  end
  ex:shutdown()
  error(setmetatable({kind = "DataError", stage = st.index, stage_name = st.name, where = where,
    first = first, last = last, attempts = attempts, cause = kind, remote_message = msg,
    message = format("stage %d (%s) failed on %s after %d attempt%s: %s: %s", st.index, st.name,
      where, attempts, attempts == 1 and "" or "s", kind, msg),
    traceback = tb}, DataError), 0)
end

function E.describe_desc(d)
  if d.kind == "range" then return format("rows %d-%d of the range", d.lo, d.hi) end
  if d.kind == "items" then return format("items %d-%d", d.first, d.first + #d.items - 1) end
  if d.kind == "binary" then return format("files %s...", tostring(d.paths[1])) end
  return format("%s bytes %d-%d", d.path, d.start, d.stop)
end

-- -- Stages ----------------------------------------------------------------

-- A stage: what runs (rf for tasks, pool for actors), its input (the stage
-- before it, or source descriptors), and its bookkeeping:
--   running   units submitted and not finished
--   done      seq -> metadata of finished output blocks not yet consumed
--   pending   input blocks taken from the stage before, not yet batched
local Stage = {}
Stage.__index = Stage

local function new_stage(ex, def, index)
  local st = setmetatable({ex = ex, def = def, index = index, name = def.name,
    kind = def.kind, running = 0, n_done = 0, done = {}, next_read = 1, next_seq = 1,
    next_idx = 1, pending = {}, pending_rows = 0, retry = {}, cap = def.max_in_flight,
    sizes = nil, in_rows = 0, in_bytes = 0,
    st = {name = def.name, kind = def.kind == "actors" and "actor pool" or "tasks",
      rows_in = 0, rows_out = 0, blocks = 0, units = 0, calls = 0, retries = 0, skipped_rows = 0,
      skipped_batches = 0, busy_s = 0, peak_in_flight = 0, max_in_flight = def.max_in_flight,
      first_start = nil, last_end = nil}}, Stage)
  return st
end

function Stage:in_flight() return self.running + self.n_done end

-- True when no more output will ever come from this stage's input.
function Stage:input_ended()
  if not self.input then return self.src_next > #self.descs end
  return self.input:drained()
end

-- True when the stage has finished everything and its output was taken.
function Stage:drained()
  return self:input_ended() and self.running == 0 and self.pending_rows == 0
    and #self.pending == 0 and #self.retry == 0 and self.n_done == 0
    and (not self.barrier or self.barrier_done)
end

-- Takes the next finished output block (in order unless preserve_order is
-- off, when seqs are given in completion order anyway).
function Stage:take()
  local m = self.done[self.next_read]
  if m == nil then return nil end
  self.done[self.next_read] = nil
  self.next_read = self.next_read + 1
  self.n_done = self.n_done - 1
  return m
end

-- -- Units -----------------------------------------------------------------

local function submit(ex, st, unit)
  local t = now()
  st.st.first_start = st.st.first_start or t
  unit.t_submit = t
  if st.kind == "actors" then
    local a = st.pool:pick()
    unit.actor = a
    a.inflight = a.inflight + 1
    unit.ref = a.h:run(unit.spec, unpack(unit.args, 1, unit.args.n or #unit.args))
  else
    unit.ref = st.rf:remote(unit.spec, unpack(unit.args, 1, unit.args.n or #unit.args))
  end
  ex.inflight[unit.ref:id()] = unit
  ex.n_inflight = ex.n_inflight + 1
  st.running = st.running + 1
  st.st.units = st.st.units + 1
  local f = st:in_flight()
  if f > st.st.peak_in_flight then st.st.peak_in_flight = f end
end

-- A unit is done with its input blocks (it succeeded, or was skipped):
-- each block whose rows every unit has taken and finished is let go now.
-- Waiting for the driver's next collection instead left consumed blocks
-- in the store long enough, under load, to fill it and spill live ones.
local function let_go(unit)
  local blocks = unit.blocks
  if not blocks then return end
  unit.blocks = nil
  for i = 1, unit.args.n do
    local b = blocks[i]
    b.users = b.users - 1
    if b.users == 0 and b.off >= b.n then release(b.ref) end
  end
end

local function store_output(st, unit, meta)
  let_go(unit)
  local seq = unit.seq
  if not st.ex.preserve_order or not seq then seq = st.next_seq; st.next_seq = st.next_seq + 1 end
  st.done[seq] = meta
  st.n_done = st.n_done + 1
end

-- A finished unit: its metadata, or its failure.
local function complete(ex, unit)
  local st = unit.stage
  ex.inflight[unit.ref:id()] = nil
  ex.n_inflight = ex.n_inflight - 1
  st.running = st.running - 1
  if unit.actor then unit.actor.inflight = unit.actor.inflight - 1 end
  -- The result holds the refs of the blocks it made: let it go now, so
  -- that they live only as long as the handles in meta.
  local ok, meta = pcall(tide.get, unit.ref)
  release(unit.ref)
  unit.ref = nil
  local t = now()
  st.st.last_end = t
  if ok then
    local s = st.st
    s.rows_in = s.rows_in + (meta.n_in or 0)
    s.rows_out = s.rows_out + meta.n
    s.skipped_rows = s.skipped_rows + (meta.skipped or 0)
    s.skipped_batches = s.skipped_batches + (meta.skipped_batches or 0)
    s.busy_s = s.busy_s + (meta.t or 0)
    s.blocks = s.blocks + 1
    if meta.bytes then
      ex.bytes_written = ex.bytes_written + meta.bytes
      ex.files[#ex.files + 1] = meta.path
    end
    s.calls = s.calls + (meta.calls or 0)
    s.retries = s.retries + (meta.retries or 0)
    if unit.actor then unit.actor.busy = unit.actor.busy + (meta.t or 0) end
    if st.bpu_auto and (meta.calls or 0) > 0 and meta.t then
      -- Smoothed time per batch; the next units carry what fits the target.
      local per = meta.t / meta.calls
      st.per_batch = st.per_batch and (0.7 * st.per_batch + 0.3 * per) or per
      local b = st.per_batch > 0 and floor(E.UNIT_TARGET_S / st.per_batch) or st.bpu_max
      st.bpu = b < 1 and 1 or (b > st.bpu_max and st.bpu_max or b)
    end
    meta.t, meta.n_in, meta.skipped, meta.skipped_batches, meta.calls, meta.retries = nil, nil, nil, nil, nil, nil
    store_output(st, unit, meta)
    return
  end
  local err = meta
  local kind = type(err) == "table" and err.kind or "Error"
  if unit.actor and kind == "ActorDiedError" then
    local msg = type(err) == "table" and tostring(err.message) or tostring(err)
    if msg:find("init failed", 1, true) or msg:find("infeasible", 1, true) then
      fail(ex, st, unit, err, unit.attempts)
    end
    st.pool:replace(unit.actor)
  end
  if kind == "TaskCancelledError" and ex.stopping then return end
  if unit.attempts <= st.def.max_retries then
    unit.attempts = unit.attempts + 1
    st.st.retries = st.st.retries + 1
    st.retry[#st.retry + 1] = unit
    return
  end
  if st.def.on_error == "skip" then
    -- The whole unit: each of its batches counts.
    local bs = st.def.batch_size
    st.st.skipped_batches = st.st.skipped_batches + (bs and math.ceil((unit.rows or 0) / bs) or 1)
    st.st.skipped_rows = st.st.skipped_rows + (unit.rows or 0)
    st.st.rows_in = st.st.rows_in + (unit.rows or 0)
    store_output(st, unit, {n = 0})
    return
  end
  fail(ex, st, unit, err, unit.attempts)
end

-- -- Actor pools -------------------------------------------------------------

local Pool = {}
Pool.__index = Pool

local function new_pool(ex, st)
  local def = st.def
  local cmin, cmax = def.concurrency[1], def.concurrency[2]
  local p = setmetatable({ex = ex, st = st, actors = {}, min = cmin, max = cmax,
    per_actor = def.per_actor or 2, class = def.class, started = 0, replaced = 0,
    dead_time = 0, dead_busy = 0, peak = 0}, Pool)
  for _ = 1, cmin do p:add() end
  return p
end

function Pool:add()
  local h = self.class:remote(self.st.def.init_args)
  local a = {h = h, inflight = 0, busy = 0, t0 = now()}
  self.actors[#self.actors + 1] = a
  self.started = self.started + 1
  if #self.actors > self.peak then self.peak = #self.actors end
  return a
end

-- An idle actor first, else the least loaded one with room, else nil.
function Pool:pick()
  local best
  for _, a in ipairs(self.actors) do
    if a.inflight == 0 then return a end
    if a.inflight < self.per_actor and (not best or a.inflight < best.inflight) then best = a end
  end
  return best
end

-- A dead actor leaves the pool and a fresh one (init again) takes its place.
function Pool:replace(a)
  for i, b in ipairs(self.actors) do
    if b == a then
      table.remove(self.actors, i)
      self.dead_time = self.dead_time + (now() - a.t0)
      self.dead_busy = self.dead_busy + a.busy
      pcall(tide.kill, a.h)
      self.replaced = self.replaced + 1
      self:add()
      return
    end
  end
end

-- Grows the pool by one while batches wait and every actor is busy.
function Pool:autoscale(queued)
  if queued > 0 and #self.actors < self.max then
    for _, a in ipairs(self.actors) do if a.inflight == 0 then return end end
    self:add()
  end
end

function Pool:utilization(t_end)
  local alive, busy = self.dead_time, self.dead_busy
  for _, a in ipairs(self.actors) do alive = alive + (t_end - a.t0); busy = busy + a.busy end
  return alive > 0 and min(1, busy / alive) or 0
end

function Pool:shutdown()
  for _, a in ipairs(self.actors) do pcall(tide.kill, a.h) end
end

-- -- Scheduling ----------------------------------------------------------------

-- Makes one batch unit out of the first `k` pending rows.
local function take_batch(st, k)
  local slices, args, first, blocks = {}, {n = 0}, st.rows_batched + 1, {}
  local got = 0
  while got < k do
    local b = st.pending[1]
    local take = min(k - got, b.n - b.off)
    args.n = args.n + 1
    args[args.n] = b.ref
    blocks[args.n] = b
    b.users = b.users + 1
    slices[#slices + 1] = {args.n, b.off + 1, b.off + take}
    b.off = b.off + take
    got = got + take
    if b.off >= b.n then table.remove(st.pending, 1) end
  end
  st.pending_rows = st.pending_rows - k
  st.rows_batched = st.rows_batched + k
  local idx = st.next_idx
  st.next_idx = idx + 1
  local spec = {slices = slices, idx = idx, first = first, bs = st.def.batch_size}
  return {stage = st, seq = idx, idx = idx, spec = spec, args = args, blocks = blocks,
    attempts = 1, rows = k, first = first, last = first + k - 1}
end

-- Counts an input block's rows and bytes: a stage that sizes its own
-- units carries at most the rows of that size that E.UNIT_MAX_BYTES holds.
local function note_size(st, n, size)
  st.in_rows, st.in_bytes = st.in_rows + n, st.in_bytes + (size or E.UNKNOWN_ROW_BYTES * n)
  if not st.bpu_auto then return end
  local b = floor(E.UNIT_MAX_BYTES * st.in_rows / (st.in_bytes + 1) / st.def.batch_size)
  st.bpu_max = b < 1 and 1 or (b > st.bpu_cap and st.bpu_cap or b)
  if st.bpu > st.bpu_max then st.bpu = st.bpu_max end
end

-- Takes an output block of the stage before into this stage's pending
-- input: a block, or the parts it was cut into for this stage's batches.
local function absorb(st, m)
  if m.n == 0 then return end
  if m.parts then
    for _, p in ipairs(m.parts) do
      st.pending[#st.pending + 1] = {ref = p.ref, n = p.n, off = 0, users = 0}
      note_size(st, p.n, p.size)
    end
  else
    st.pending[#st.pending + 1] = {ref = m.ref, n = m.n, off = 0, users = 0}
    note_size(st, m.n, m.size)
  end
  st.pending_rows = st.pending_rows + m.n
end

-- The most rows the next unit takes once the stage's input has ended: its
-- share of the rows left among the stage's workers (guided
-- self-scheduling), in whole batches, so the last units shrink and the
-- workers finish together instead of one running a full unit alone.
local function tail_rows(st, bs)
  local workers = st.pool and #st.pool.actors or st.def.slots or 1
  return ceil(st.pending_rows / (workers * bs)) * bs
end

-- Whether the stage can start one more unit now.
local function has_room(st)
  if st:in_flight() >= st.cap then return false end
  if st.kind == "actors" then return st.pool:pick() ~= nil end
  return true
end

local function schedule_stage(ex, st)
  -- Retries first: they are the oldest work.
  while #st.retry > 0 and has_room(st) do
    submit(ex, st, table.remove(st.retry, 1))
  end
  if not st.input then
    -- A source: one unit per descriptor, paused while the store is full.
    while st.src_next <= #st.descs and has_room(st) do
      if ex.store_full and ex.n_inflight > 0 then break end
      local i = st.src_next
      st.src_next = i + 1
      local d = st.descs[i]
      if not d.skip then
        local args = {n = 0}
        if d.chain then args = {n = 1, ex:line_base(st, i)} end
        local idx = st.next_idx
        st.next_idx = idx + 1
        local unit = {stage = st, seq = idx, idx = idx, spec = {desc = d, idx = idx}, args = args, attempts = 1}
        if d.kind == "range" then unit.rows, unit.first, unit.last = d.hi - d.lo + 1, d.lo, d.hi
        elseif d.kind == "items" then unit.rows, unit.first, unit.last = #d.items, d.first, d.first + #d.items - 1 end
        submit(ex, st, unit)
      elseif d.chain then
        ex:line_base(st, i) -- keep the line-number chain going past other shards' blocks
      end
    end
    return
  end
  -- Take input blocks while a batch is not complete (so a batch wider than
  -- the stage before's buffer never deadlocks).
  local input = st.input
  -- A unit's rows: batch_size, times the batches a unit carries.
  local bs = st.def.batch_size
  local unit_rows = bs and bs * (st.bpu or 1)
  local want = unit_rows or 1
  while true do
    if st.barrier then
      local m = input:take()
      if not m then break end
      absorb(st, m)
    else
      if st.pending_rows >= want or not has_room(st) then break end
      local m = input:take()
      if not m then break end
      absorb(st, m)
    end
  end
  local ended = input:drained()
  if st.barrier then
    -- repartition: once every input block is in, n units of equal rows.
    if not ended then return end
    if not st.sizes then
      local n, total = st.def.repartition, st.pending_rows
      st.sizes, st.size_next = {}, 1
      for i = 1, n do st.sizes[i] = floor(i * total / n) - floor((i - 1) * total / n) end
    end
    while st.size_next <= #st.sizes and has_room(st) do
      local k = st.sizes[st.size_next]
      st.size_next = st.size_next + 1
      submit(ex, st, take_batch(st, k))
    end
    if st.size_next > #st.sizes then st.barrier_done = true end
    return
  end
  while st.pending_rows > 0 and has_room(st) do
    local k
    if bs then
      if st.pending_rows < unit_rows and not ended then break end
      k = min(unit_rows, st.pending_rows)
      if ended and st.bpu_auto then k = min(k, tail_rows(st, bs)) end
    else
      k = st.pending[1].n - st.pending[1].off -- one batch per input block
    end
    submit(ex, st, take_batch(st, k))
    -- Blocks keep arriving while we batch; take more if a batch is short.
    while st.pending_rows < want and has_room(st) do
      local m = input:take()
      if not m then break end
      absorb(st, m)
    end
  end
  if st.pool then
    -- Queue depth: batches waiting here plus blocks waiting in the stage before.
    local queued = (bs and floor(st.pending_rows / unit_rows) or #st.pending) + input.n_done
    st.pool:autoscale(queued + #st.retry)
  end
end

-- -- The executor ----------------------------------------------------------------

local Exec = {}
Exec.__index = Exec

-- The store figures of the whole cluster: this node's own now, plus every
-- other node's as of its last heartbeat (tide.nodes lists them on a head).
-- `held` adds the values small enough to be kept inline, outside the
-- store (blocks of up to 64 KiB): memory the blocks take all the same.
local function store_stats(cluster)
  local s = tide.stats()
  local used, cap, spilled = s.store_used or 0, s.store_capacity or 0, s.spilled_bytes or 0
  local held = used + (s.inline_bytes or 0)
  if cluster then
    local ok, nodes = pcall(tide.nodes)
    if ok then
      for i = 2, #nodes do
        local ns = nodes[i].stats
        if ns then
          used = used + (ns.store_used or 0)
          held = held + (ns.store_used or 0) + (ns.inline_bytes or 0)
          cap = cap + (ns.store_capacity or 0)
          spilled = spilled + (ns.spilled_bytes or 0)
        end
      end
    end
  end
  return used, cap, spilled, held
end

-- E.new(defs, opts): defs are the compiled stages (see tide.data's
-- compile); opts: preserve_order, progress.
function E.new(defs, opts)
  local ex = setmetatable({stages = {}, inflight = {}, n_inflight = 0, preserve_order = opts.preserve_order,
    progress = opts.progress, progress_interval = opts.progress_interval or 5, t0 = now(), bytes_written = 0,
    files = {}, peak_store = 0,
    peak_spilled = 0, store_full = false, last_sample = 0,
    final_rows = 0, chains = {},
    count_rf = opts.count_rf, publish_on = opts.publish, name = opts.name, pub = {}}, Exec)
  local okn, nodes = pcall(tide.nodes)
  ex.cluster = okn and #nodes > 1
  local _, cap, spilled = store_stats(ex.cluster)
  ex.store_capacity = cap
  ex.spilled0 = spilled
  for i, def in ipairs(defs) do
    local st = new_stage(ex, def, i)
    st.rows_batched = 0
    if i == 1 then st.descs, st.src_next = def.descs, 1
    else st.input = ex.stages[i - 1] end
    if def.repartition then st.barrier = true end
    if def.kind == "actors" then st.pool = new_pool(ex, st) else st.rf = def.rf end
    -- Batches per unit of a map_batches stage: fixed, or measured
    -- (starting at one).
    st.bpu, st.bpu_max = def.batches_per_unit or 1, def.max_batches_per_unit or 1
    st.bpu_cap = st.bpu_max
    st.bpu_auto = def.batches_per_unit == nil and def.batch_size ~= nil and not def.repartition
    ex.stages[i] = st
  end
  ex.final = ex.stages[#ex.stages]
  ex:publish(false, true)
  return ex
end

-- The ref (or number) of the count of lines before source block i, made
-- by a chain of small counting tasks (each adds its block's lines to the
-- count before it), so read tasks run in parallel and still number lines
-- exactly.
function Exec:line_base(st, i)
  local d = st.descs[i]
  if d.first_in_file then
    self.chains[d.path] = {i = i, base = 0}
    return 0
  end
  local c = self.chains[d.path]
  local p = st.descs[c.i]
  c.base = self.count_rf:remote(c.base, p.path, p.start, p.stop, p.size)
  c.i = i
  return c.base
end

function Exec:sample(force)
  local t = now()
  if not force and t - self.last_sample < (self.cluster and 0.25 or 0.05) then return end
  self.last_sample = t
  local used, _, spilled, held = store_stats(self.cluster)
  if held > self.peak_store then self.peak_store = held end
  local sp = spilled - self.spilled0
  if sp > self.peak_spilled then self.peak_spilled = sp end
  self.store_used = used
  self.store_full = self.store_capacity > 0 and used > 0.7 * self.store_capacity
end

local function fmt_bytes(b)
  if b >= 2^30 then return format("%.1f GiB", b / 2^30) end
  if b >= 2^20 then return format("%.1f MiB", b / 2^20) end
  if b >= 2^10 then return format("%.1f KiB", b / 2^10) end
  return format("%d B", b)
end
E.fmt_bytes = fmt_bytes

-- One bar per stage (tide.progress): its rows out, rows/s, units in
-- flight and actors; and a line for the store's use. On a terminal
-- the bars are redrawn in place, with prints above them; otherwise one
-- plain line every progress_interval seconds for all of them, never one
-- per block.
function Exec:show_progress(final)
  if not self.progress then return end
  if not self.bars then
    self.bars = {}
    for i, st in ipairs(self.stages) do
      self.bars[i] = tide.progress(nil, {desc = format("tide.data stage %d %s", st.index, st.name), unit = "rows",
        interval = self.progress_interval})
    end
    self.bars[#self.stages + 1] = tide.progress(nil, {desc = "tide.data store", interval = self.progress_interval})
  end
  self.bars[#self.stages + 1]:set_text(format("%s used, %.1f s", fmt_bytes(self.store_used or 0), now() - self.t0))
  for i, st in ipairs(self.stages) do
    local bar = self.bars[i]
    local extra = format("%d in flight", st:in_flight())
    if st.pool then extra = extra .. format(", %d actors", #st.pool.actors) end
    bar:set_postfix(extra)
    bar:set(st.st.rows_out)
  end
  if final then
    for _, bar in ipairs(self.bars) do bar:close() end
  end
end

-- Each stage's rows out, rows/s and units in flight as gauges (the head's
-- /metrics and data page), labelled with the pipeline's name and the
-- stage ("2 map_batches"): when the run starts (rows and rate 0), then
-- once a second, and at the end, so even a run shorter than a second has
-- a line of two points on the data page's chart. rows/s is over the time
-- since the last publish (at the end, after less than 0.25 s: the last
-- rate kept, or the whole run's; the start's 0 is no rate).
local HELP_ROWS = "Rows out of a tide.data pipeline's stage so far."
local HELP_RATE = "Rows per second out of a tide.data pipeline's stage."
local HELP_FLIGHT = "Units (tasks or actor calls) in flight in a tide.data pipeline's stage."
function Exec:publish(final, start)
  if not self.publish_on then return end
  local t = now()
  local dt = t - (self.pub_t or self.t0)
  if not final and not start and dt < 1 then return end
  local puts = {}
  for i, st in ipairs(self.stages) do
    local p = self.pub[i] or {rows = 0}
    self.pub[i] = p
    local rows = st.st.rows_out
    local labels = {pipeline = self.name, stage = format("%d %s", i, st.name)}
    if start then
      p.rate = nil -- the start's 0 is no rate to keep
    elseif not final or dt >= 0.25 then p.rate = dt > 0 and (rows - p.rows) / dt or 0
    elseif not p.rate then p.rate = t > self.t0 and rows / (t - self.t0) or 0 end
    p.rows = rows
    puts[#puts + 1] = {"gauge", "tide_data_rows_out", HELP_ROWS, labels, "set", rows}
    puts[#puts + 1] = {"gauge", "tide_data_rows_per_second", HELP_RATE, labels, "set", p.rate or 0}
    puts[#puts + 1] = {"gauge", "tide_data_in_flight", HELP_FLIGHT, labels, "set", final and 0 or st:in_flight()}
  end
  puts[#puts + 1] = {"gauge", "tide_data_running", "1 while a tide.data pipeline runs, 0 once it ended.",
    {pipeline = self.name}, "set", final and 0 or 1}
  self.pub_t = t
  require("tide.metrics")._publish(puts)
end

-- One round: submit what the bounds allow (downstream first, so blocks
-- move on before new ones are made), then wait for some unit to finish.
function Exec:step()
  for i = #self.stages, 1, -1 do schedule_stage(self, self.stages[i]) end
  if self.n_inflight == 0 then return false end
  local refs, n = {}, 0
  for _, u in pairs(self.inflight) do n = n + 1; refs[n] = u.ref end
  local ready = tide.wait(refs, {num_returns = 1, timeout = 0.2})
  if #ready > 0 then
    ready = tide.wait(refs, {num_returns = n, timeout = 0})
    for _, r in ipairs(ready) do
      local u = self.inflight[r:id()]
      if u then complete(self, u) end
    end
    -- Blocks and results are let go explicitly (let_go, complete); other
    -- refs dropped here free their objects once collected, which a full
    -- store no longer waits for.
    if self.store_full then W.collect(true) end
  end
  self:sample()
  self:show_progress(false)
  self:publish(false)
  return true
end

-- The next output block's metadata of the last stage, or nil at the end.
function Exec:next_output()
  local fs = self.final
  while true do
    local m = fs:take()
    if m then
      self.final_rows = self.final_rows + m.n
      return m
    end
    if fs:drained() then
      self:finish()
      return nil
    end
    if not self:step() then
      -- Nothing runs: schedule once more (input may have just ended).
      for i = #self.stages, 1, -1 do schedule_stage(self, self.stages[i]) end
      if self.n_inflight == 0 and not fs.done[fs.next_read] and not fs:drained() then
        self:shutdown()
        error("tide.data: the pipeline stalled (no work can be started); this is a bug", 0)
      end
    end
  end
end

function Exec:finish()
  if self.finished then return end
  self.finished = true
  self:sample(true)
  self.t_end = now()
  self:show_progress(true)
  self:publish(true)
  for _, st in ipairs(self.stages) do if st.pool then st.pool:shutdown() end end
end

-- Stops early (take(n), an error): cancels running units, ends the pools.
function Exec:shutdown()
  if self.finished then return end
  self.stopping = true
  for _, u in pairs(self.inflight) do pcall(tide.cancel, u.ref) end
  self.inflight, self.n_inflight = {}, 0
  self:finish()
end

-- The run's statistics (see docs/data.md).
function Exec:stats()
  local t_end = self.t_end or now()
  local stages = {}
  for i, st in ipairs(self.stages) do
    local s = {}
    for k, v in pairs(st.st) do s[k] = v end
    s.time_s = (s.first_start and s.last_end) and (s.last_end - s.first_start) or 0
    s.first_start, s.last_end = nil, nil
    if st.pool then
      s.actors = st.pool.peak
      s.actors_started = st.pool.started
      s.actors_replaced = st.pool.replaced
      s.utilization = st.pool:utilization(t_end)
    end
    stages[i] = s
  end
  local files = {}
  for i, f in ipairs(self.files) do files[i] = f end
  table.sort(files) -- part names sort in output order
  return {rows = self.final_rows, wall_s = t_end - self.t0, stages = stages,
    peak_store_bytes = self.peak_store, peak_spilled_bytes = self.peak_spilled,
    store_capacity = self.store_capacity, bytes_written = self.bytes_written,
    files = files}
end

return E
