-- tide.data.worker: the code tide.data's tasks and pool actors run. It is
-- captured by name (required again on the worker), so the remote functions
-- the executor makes carry only their plan: the user's functions and a few
-- options. A unit of work reads one source block (or gathers one batch from
-- the blocks given as arguments), applies the stage's batch function and
-- its fused row operations, and either puts the result into the object
-- store or, for a fused sink, writes it to one file.
local tide = require("tide")
local core = require("tide.core")
local ffi = require("ffi")

local type, select, error, pcall, xpcall, tostring, tonumber =
  type, select, error, pcall, xpcall, tostring, tonumber
local format, concat = string.format, table.concat
local open, rename, remove = io.open, os.rename, os.remove

local W = {}

-- -- Clock ---------------------------------------------------------------

-- A monotonic clock with sub-second resolution (os.time has seconds,
-- os.clock counts CPU time only, which would hide time spent waiting).
pcall(ffi.cdef, [[
typedef struct { long tv_sec; long tv_nsec; } td_data_timespec;
int clock_gettime(int clk, td_data_timespec *ts);
int isatty(int fd);
int getpid(void);
]])
local ts = ffi.new("td_data_timespec")
function W.now()
  ffi.C.clock_gettime(1, ts) -- CLOCK_MONOTONIC
  return tonumber(ts.tv_sec) + tonumber(ts.tv_nsec) * 1e-9
end
function W.isatty(fd) return ffi.C.isatty(fd) == 1 end
function W.getpid() return ffi.C.getpid() end
local now = W.now

-- A full garbage collection, so that refs this process dropped release
-- their objects in the store; but at most 5% of the time: with a large
-- heap (a model, a vocabulary) one collection costs more, and runs less
-- often (unless forced: the store is filling up).
local gc_cost, gc_last = 0, -1e9
function W.collect(force)
  local t = now()
  if not force and t - gc_last < 20 * gc_cost then return end
  collectgarbage()
  gc_last = now()
  gc_cost = gc_last - t
end

-- -- Blocks in the store ---------------------------------------------------

-- A block travels through the store as {n = rows, rows = array} or, when
-- every row is a plain table with the same string keys and scalar values
-- (the usual case: {text, path, line}, {id, h}), packed by column:
-- {n, keys, kinds, cols}. Each column is one string: numbers as the bytes
-- of an array of doubles, booleans one byte each, strings as {s = all of
-- them joined, lens = their lengths as int32s}, or {c = the value} when
-- every row has the same one (a path). The engine's serializer costs about
-- 1 µs to encode and 0.4-0.6 µs to decode each small row table (a table
-- per row, its keys again for every row), and 0.13 µs to encode each
-- element of an array of numbers (a C API call or more each); one long
-- string it copies whole. A packed block arrives as new, separate row
-- tables: rows that were the same table in the sender are separate rows in
-- the receiver. The bytes are the machine's own: nodes share a byte order.
local PACK_MIN = 16 -- below this the engine's own path is as cheap
local PACK_MAX_KEYS = 32 -- rows with more keys travel as they are
local ok_tnew, tnew = pcall(require, "table.new")
if not ok_tnew then tnew = function() return {} end end
local getmetatable, next, sub, rep, loadstring = getmetatable, next, string.sub, string.rep, loadstring
local SCALAR = {number = true, string = true, boolean = true}
local CTYPE = {number = ffi.typeof("double[?]"), boolean = ffi.typeof("uint8_t[?]")}
local CPTR = {number = ffi.typeof("const double *"), boolean = ffi.typeof("const uint8_t *"),
  lens = ffi.typeof("const int32_t *")}
local int32s = ffi.typeof("int32_t[?]")

-- A function(rows, n, k1, t1, c1, ..., knk, tnk, cnk) that copies value
-- kc of every row into column cc (cc[i], i from 1), or returns false if a
-- row is no plain table, a value not of type tc, or a row has a key beyond
-- k1..knk. Generated per number of keys so that each row is straight-line
-- code, which LuaJIT compiles (a loop over the keys inside the loop over
-- the rows it would not).
local gatherers = {}
local function gatherer(nk)
  local f = gatherers[nk]
  if f then return f end
  local params, body = {}, {}
  for c = 1, nk do
    params[c] = format("k%d, t%d, c%d", c, c, c)
    body[c] = format("    local v%d = r[k%d]\n    if type(v%d) ~= t%d then return false end\n    c%d[i] = v%d",
      c, c, c, c, c, c)
  end
  local src = "local type, getmetatable, next = ...\n"
    .. "return function(rows, n, " .. concat(params, ", ") .. ")\n"
    .. "  for i = 1, n do\n"
    .. "    local r = rows[i]\n"
    .. "    if type(r) ~= \"table\" or getmetatable(r) ~= nil then return false end\n"
    .. concat(body, "\n") .. "\n"
    -- r holds k1..knk (their values are not nil): nk keys, and no other.
    .. "    local k = next(r)\n" .. rep("    k = next(r, k)\n", nk - 1)
    .. "    if next(r, k) ~= nil then return false end\n"
    .. "  end\n  return true\nend\n"
  f = assert(loadstring(src, "=tide.data.pack" .. nk))(type, getmetatable, next)
  gatherers[nk] = f
  return f
end

-- The bytes of a string column: {c = v} if every value is v, else the
-- values joined and their lengths.
local function string_column(col, n)
  local v1, same = col[1], true
  for i = 2, n do if col[i] ~= v1 then same = false; break end end
  if same then return {c = v1} end
  local lens = int32s(n)
  for i = 1, n do lens[i - 1] = #col[i] end
  return {s = concat(col, "", 1, n), lens = ffi.string(lens, 4 * n)}
end

function W.pack(rows)
  local n = #rows
  local plain = {n = n, rows = rows}
  if n < PACK_MIN then return plain end
  local r1 = rows[1]
  if type(r1) ~= "table" or getmetatable(r1) ~= nil then return plain end
  local keys, kinds, nk = {}, {}, 0
  for k, v in pairs(r1) do
    local tv = type(v)
    if type(k) ~= "string" or not SCALAR[tv] or nk == PACK_MAX_KEYS then return plain end
    nk = nk + 1
    keys[nk], kinds[nk] = k, tv
  end
  if nk == 0 then return plain end
  -- Numbers and booleans go straight into C arrays (index 0 unused).
  local cols, args = {}, {}
  for c = 1, nk do
    local ct = CTYPE[kinds[c]]
    cols[c] = ct and ct(n + 1) or tnew(n, 0)
    args[3 * c - 2], args[3 * c - 1], args[3 * c] = keys[c], kinds[c], cols[c]
  end
  if not gatherer(nk)(rows, n, unpack(args, 1, 3 * nk)) then return plain end
  for c = 1, nk do
    local kind, col = kinds[c], cols[c]
    if kind == "string" then cols[c] = string_column(col, n)
    else cols[c] = ffi.string(col + 1, ffi.sizeof(col) / (n + 1) * n) end
  end
  return {n = n, keys = keys, kinds = kinds, cols = cols}
end

-- W.pack of the rows {id = lo} .. {id = hi} of a range, made without them.
function W.pack_range(lo, hi)
  local n = hi - lo + 1
  local ids = CTYPE.number(n)
  for i = 0, n - 1 do ids[i] = lo + i end
  return {n = n, keys = {"id"}, kinds = {"number"}, cols = {ffi.string(ids, 8 * n)}}
end

-- The bytes a block made by W.pack takes in the store (its columns), or
-- nil for rows that travel as they are (their size is not known here).
function W.packed_bytes(b)
  if b.rows then return nil end
  local size, cols = 0, b.cols
  for c = 1, #cols do
    local col = cols[c]
    if type(col) == "string" then size = size + #col
    elseif col.c ~= nil then size = size + #col.c
    else size = size + #col.s + #col.lens end
  end
  return size
end

-- Sets field k of out[base + 1 .. base + hi - lo + 1] to values lo..hi of
-- a packed column (kind: number, boolean or string).
local function unpack_column(k, kind, col, lo, hi, out, base)
  local d = base - lo + 1
  if kind == "string" then
    if col.c ~= nil then
      local v = col.c
      for j = lo, hi do out[j + d][k] = v end
      return
    end
    local s, lens, pos = col.s, ffi.cast(CPTR.lens, col.lens), 1
    for j = 0, lo - 2 do pos = pos + lens[j] end
    for j = lo, hi do
      local e = pos + lens[j - 1]
      out[j + d][k] = sub(s, pos, e - 1)
      pos = e
    end
  elseif kind == "boolean" then
    local p = ffi.cast(CPTR.boolean, col)
    for j = lo, hi do out[j + d][k] = p[j - 1] == 1 end
  else
    local p = ffi.cast(CPTR.number, col)
    for j = lo, hi do out[j + d][k] = p[j - 1] end
  end
end

-- Appends rows lo..hi of a block made by W.pack to out (after out[n]),
-- decoding only those rows: a unit that needs a slice of a larger block
-- does not pay for the rest of it. Returns the new count.
function W.unpack_into(b, lo, hi, out, n)
  if b.rows then
    local rows = b.rows
    for j = lo, hi do n = n + 1; out[n] = rows[j] end
    return n
  end
  local keys, kinds, cols = b.keys, b.kinds, b.cols
  local nk = #keys
  for j = 1, hi - lo + 1 do out[n + j] = tnew(0, nk) end
  for c = 1, nk do unpack_column(keys[c], kinds[c], cols[c], lo, hi, out, n) end
  return n + hi - lo + 1
end

-- The rows of a block made by W.pack.
function W.unpack(b)
  if b.rows then return b.rows end
  local rows = tnew(b.n, 0)
  W.unpack_into(b, 1, b.n, rows, 0)
  return rows
end

-- -- Sources -------------------------------------------------------------

local function open_file(path)
  local f, err = open(path, "rb")
  if not f then error("tide.data: cannot open " .. tostring(err), 0) end
  return f
end

-- Reads the text of the lines that START in bytes [start, stop) of path:
-- a block owns a line when the line begins inside it, so lines are never
-- split between blocks and none is read twice. Returns the text (ending
-- at a line end, or at the end of the file) or "".
local function read_range_text(path, start, stop)
  local f = open_file(path)
  local pos = start
  if start > 0 then
    f:seek("set", start - 1)
    local c = f:read(1)
    if c ~= "\n" then
      local rest = f:read("*l") -- the end of a line owned by the block before
      pos = start + (rest and #rest + 1 or 0)
    end
  end
  if pos >= stop then f:close(); return "" end
  local chunk = f:read(stop - pos) or ""
  if #chunk > 0 and chunk:sub(-1) ~= "\n" then
    local rest = f:read("*l") -- finish the last line, owned by this block
    if rest then chunk = chunk .. rest .. "\n" end
  end
  f:close()
  return chunk
end

-- Calls fn(line) for each line of text, without the "\n" (and "\r").
local function each_line(text, fn)
  local i, n = 1, #text
  while i <= n do
    local j = text:find("\n", i, true)
    local line = text:sub(i, (j or n + 1) - 1)
    if line:byte(-1) == 13 then line = line:sub(1, -2) end
    fn(line)
    if not j then break end
    i = j + 1
  end
end

-- The number of lines that start in bytes [start, stop) of a file of
-- `size` bytes: the line at 0, plus one per "\n" at q with q + 1 in range.
function W.count_lines(base, path, start, stop, size)
  local n = (start == 0 and size > 0) and 1 or 0
  local a = (start > 0 and start or 1) - 1
  if stop - 1 > a then
    local f = open_file(path)
    f:seek("set", a)
    local s = f:read(stop - 1 - a) or ""
    f:close()
    local _, k = s:gsub("\n", "")
    n = n + k
  end
  return base + n
end

-- Splits one CSV record (RFC 4180 quoting, no newlines inside fields).
local function csv_fields(line, sep, where)
  local out, i, n = {}, 1, #line
  while true do
    if line:sub(i, i) == '"' then
      local buf, j = {}, i + 1
      while true do
        local q = line:find('"', j, true)
        if not q then error(format("tide.data: %s: unterminated quoted field", where), 0) end
        buf[#buf + 1] = line:sub(j, q - 1)
        if line:sub(q + 1, q + 1) == '"' then buf[#buf + 1] = '"'; j = q + 2
        else j = q + 1; break end
      end
      out[#out + 1] = concat(buf)
      if j > n then break end
      if line:sub(j, j) ~= sep then
        error(format("tide.data: %s: text after a closing quote", where), 0)
      end
      i = j + 1
    else
      local s = line:find(sep, i, true)
      if not s then out[#out + 1] = line:sub(i); break end
      out[#out + 1] = line:sub(i, s - 1)
      i = s + 1
    end
  end
  return out
end
W.csv_fields = csv_fields

-- Reads one source block into an array of rows. `base` is the number of
-- lines of the file before the block (read_lines only).
function W.read_source(d, base)
  local rows, n = {}, 0
  local k = d.kind
  if k == "range" then
    for i = d.lo, d.hi do n = n + 1; rows[n] = {id = i} end
  elseif k == "items" then
    rows = d.items
  elseif k == "lines" then
    local line_no, path = base or 0, d.path
    each_line(read_range_text(path, d.start, d.stop), function(s)
      line_no = line_no + 1
      n = n + 1; rows[n] = {text = s, path = path, line = line_no}
    end)
  elseif k == "jsonl" then
    local cjson = require("cjson")
    local decode = cjson.decode
    each_line(read_range_text(d.path, d.start, d.stop), function(s)
      if s:find("%S") then
        local ok, v = pcall(decode, s)
        if not ok then
          error(format("tide.data: %s (bytes %d-%d): bad JSON line %q: %s",
            d.path, d.start, d.stop, s:sub(1, 80), tostring(v)), 0)
        end
        n = n + 1; rows[n] = v
      end
    end)
  elseif k == "csv" then
    local f = open_file(d.path)
    local header = f:read("*l") or ""
    f:close()
    if header:byte(-1) == 13 then header = header:sub(1, -2) end
    local cols = csv_fields(header, d.sep, d.path .. ": header")
    local start = d.start
    if start == 0 then start = #header + 1 end -- the header is not a row
    if start < d.stop then
      each_line(read_range_text(d.path, start, d.stop), function(s)
        if s ~= "" then
          local v = csv_fields(s, d.sep, d.path)
          if #v ~= #cols then
            error(format("tide.data: %s: a record has %d fields, the header %d: %q",
              d.path, #v, #cols, s:sub(1, 80)), 0)
          end
          local row = {}
          for c = 1, #cols do row[cols[c]] = v[c] end
          n = n + 1; rows[n] = row
        end
      end)
    end
  elseif k == "binary" then
    for i = 1, #d.paths do
      local f = open_file(d.paths[i])
      local s = f:read("*a") or ""
      f:close()
      rows[i] = {path = d.paths[i], bytes = s}
    end
  else
    error("tide.data: unknown source kind " .. tostring(k), 0)
  end
  return rows
end

-- -- Sinks ---------------------------------------------------------------

local function csv_quote(v, sep)
  local s = v == nil and "" or tostring(v)
  if s:find('[' .. sep .. '"\r\n]') then s = '"' .. s:gsub('"', '""') .. '"' end
  return s
end

-- Writes rows to dir/part-NNNNNN.<ext> through a temporary name and a
-- rename, so a reader never sees a partial file. Returns the path and the
-- bytes written.
local function write_block(sink, idx, rows)
  local name = format("part-%06d.%s", idx, sink.format)
  local path = sink.dir .. "/" .. name
  local tmp = format("%s/.%s.tmp-%d", sink.dir, name, ffi.C.getpid())
  local parts = {}
  if sink.format == "jsonl" then
    local encode = require("cjson").encode
    for i = 1, #rows do parts[i] = encode(rows[i]) end
  else
    local cols = sink.columns
    if not cols then
      local seen = {}
      cols = {}
      for i = 1, #rows do
        for key in pairs(rows[i]) do
          if not seen[key] then seen[key] = true; cols[#cols + 1] = key end
        end
      end
      table.sort(cols, function(a, b) return tostring(a) < tostring(b) end)
    end
    local line = {}
    for c = 1, #cols do line[c] = csv_quote(cols[c], ",") end
    parts[1] = concat(line, ",")
    for i = 1, #rows do
      local r = rows[i]
      for c = 1, #cols do line[c] = csv_quote(r[cols[c]], ",") end
      parts[i + 1] = concat(line, ",")
    end
  end
  parts[#parts + 1] = ""
  local body = concat(parts, "\n")
  local f, err = open(tmp, "wb")
  if not f then error("tide.data: cannot write " .. tostring(err), 0) end
  local ok, werr = f:write(body)
  local cok, cerr = f:close()
  if not ok or not cok then
    remove(tmp)
    error(format("tide.data: writing %s failed: %s", tmp, tostring(werr or cerr)), 0)
  end
  local rok, rerr = rename(tmp, path)
  if not rok then
    remove(tmp)
    error(format("tide.data: renaming %s to %s failed: %s", tmp, path, tostring(rerr)), 0)
  end
  return path, #body
end

-- -- Running a unit ---------------------------------------------------------

-- Applies a run of row operations (map, filter) to rows. A row whose
-- function raises is dropped and counted when that operation skips errors;
-- otherwise the error names the row (and its path:line) and carries the
-- traceback.
local function apply_rows(ops, first, last, rows, label)
  local out, n, skipped = {}, 0, 0
  local k = first -- the operation running, for the error
  local function one(r)
    for j = first, last do
      k = j
      local op = ops[j]
      if op.kind == "filter" then
        if not op.fn(r) then return nil end
      else
        local v = op.fn(r)
        if v == nil then error("map returned nil (use filter to drop rows)", 2) end
        r = v
      end
    end
    return r
  end
  local any_skip = false
  for j = first, last do if ops[j].skip then any_skip = true end end
  local i = 0
  local function fail(err)
    local r, where = rows[i], ""
    if type(r) == "table" and r.path and r.line then where = format(" (%s:%d)", tostring(r.path), r.line) end
    error(format("%s: %s failed on row %d of the block%s: %s", label, ops[k].kind, i, where, err), 0)
  end
  local tb = function(e) return debug.traceback(tostring(e), 2) end
  if any_skip then
    for j = 1, #rows do
      i = j
      local ok, r = xpcall(one, tb, rows[j])
      if not ok then
        if ops[k].skip then skipped = skipped + 1 else fail(r) end
      elseif r ~= nil then n = n + 1; out[n] = r end
    end
    return out, skipped
  end
  local ok, err = xpcall(function()
    for j = 1, #rows do
      i = j
      local r = one(rows[j])
      if r ~= nil then n = n + 1; out[n] = r end
    end
  end, tb)
  if not ok then fail(err) end
  return out, 0
end

local function check_batch_out(out, label)
  if type(out) ~= "table" then
    error(format("%s: the batch function must return an array of rows, got %s", label, type(out)), 0)
  end
  return out
end

-- A map_batches fused into this stage: batches of batch_size cut from the
-- block (the block's last batch shorter). With skip, a batch whose function
-- raises is dropped and counted.
local function apply_batches(op, rows, label, acc)
  local bs = op.batch_size or #rows
  if bs >= #rows then
    if op.skip then
      local ok, out = pcall(op.fn, rows)
      if ok then return check_batch_out(out, label) end
      acc.skipped, acc.batches = acc.skipped + #rows, acc.batches + 1
      return {}
    end
    return check_batch_out(op.fn(rows), label)
  end
  local out, n = {}, 0
  for lo = 1, #rows, bs do
    local batch = {}
    for j = lo, math.min(#rows, lo + bs - 1) do batch[j - lo + 1] = rows[j] end
    local ok, res = true
    if op.skip then ok, res = pcall(op.fn, batch) else res = op.fn(batch) end
    if ok then
      check_batch_out(res, label)
      for j = 1, #res do n = n + 1; out[n] = res[j] end
    else
      acc.skipped, acc.batches = acc.skipped + #batch, acc.batches + 1
    end
  end
  return out
end

-- Applies the stage's fused operations in order: runs of row operations,
-- and map_batches fused in. Returns rows, {skipped rows, skipped batches}.
local function apply_ops(ops, rows, label, acc)
  local i, nops = 1, #ops
  while i <= nops do
    if ops[i].kind == "batch" then
      rows = apply_batches(ops[i], rows, label, acc)
      i = i + 1
    else
      local j = i
      while j < nops and ops[j + 1].kind ~= "batch" do j = j + 1 end
      local sk
      rows, sk = apply_rows(ops, i, j, rows, label)
      acc.skipped = acc.skipped + sk
      i = j + 1
    end
  end
  return rows, acc
end

-- Gathers one batch: spec.slices holds {arg index, first, last} over the
-- blocks passed as the extra arguments (resolved by Tide before the call).
local function gather(slices, ...)
  if #slices == 1 then
    local s = slices[1]
    local b = W.unpack((select(s[1], ...)))
    if s[2] == 1 and s[3] == #b then return b end
  end
  local rows, n = {}, 0
  for i = 1, #slices do
    local s = slices[i]
    n = W.unpack_into((select(s[1], ...)), s[2], s[3], rows, n)
  end
  return rows
end

-- os.exit in a lightweight actor raises a marker table that must reach
-- the engine (it ends the actor); other errors get their traceback.
local function is_exit(e) return type(e) == "table" and e.__tide_exit end
local tb_handler = function(e)
  if is_exit(e) then return e end
  return debug.traceback(tostring(e), 2)
end

-- A map_batches unit (a task, or a call on a pool actor): calls the user's
-- function once per spec.bs rows of the unit (a unit carries a block of
-- several batches, so the driver's round trip, the task and the part file
-- are paid per block, not per batch). A call that raises:
--   on_error = "raise": the unit fails naming the batch's rows (the
--     driver retries the whole unit, then fails the pipeline);
--   on_error = "skip": the batch is called again here, up to max_retries
--     times, then dropped and counted; the unit's other batches are kept.
local function call_batches(plan, call, self, rows, spec, acc)
  local n = #rows
  local bs = spec.bs or n
  if bs < 1 then bs = 1 end
  local first = spec.first or 1
  local out, m = nil, 0
  local lo = 1
  repeat
    local hi = math.min(n, lo + bs - 1)
    local batch = rows
    if lo ~= 1 or hi ~= n then
      batch = tnew(hi - lo + 1, 0)
      for j = lo, hi do batch[j - lo + 1] = rows[j] end
    end
    acc.calls = acc.calls + 1
    local ok, res
    if plan.skip then
      for attempt = 1, (plan.max_retries or 0) + 1 do
        ok, res = pcall(call, self, batch)
        if not ok and is_exit(res) then error(res, 0) end
        if ok and type(res) ~= "table" then ok = false end
        if ok then break end
        if attempt <= (plan.max_retries or 0) then acc.retries = acc.retries + 1 end
      end
      if not ok then
        acc.skipped, acc.batches = acc.skipped + #batch, acc.batches + 1
        res = nil
      end
    else
      ok, res = xpcall(call, tb_handler, self, batch)
      if not ok then
        if is_exit(res) then error(res, 0) end
        error(format("%s: call failed on the batch of rows %d-%d: %s", plan.label,
          first + lo - 1, first + hi - 1, tostring(res)), 0)
      end
      check_batch_out(res, plan.label)
    end
    if res then
      if lo == 1 and hi >= n then return res end -- one batch: its result as is
      out = out or {}
      for j = 1, #res do m = m + 1; out[m] = res[j] end
    end
    lo = hi + 1
  until lo > n
  return out or {}
end

-- Puts a unit's n output rows into the store: one block (meta.ref), or,
-- when the next stage takes at most k rows a unit, parts of k rows
-- (meta.parts), so that each of its units decodes only the rows it uses.
-- block(lo, hi) makes the block of rows lo..hi. Each block's packed bytes
-- go with it (size), so that the next stage sizes its units by bytes.
--
-- This process's handles of the blocks it put are given back when its next
-- unit starts (W.run): by then the unit's result, which holds the blocks
-- for the driver, has gone to the node ahead of the release. Waiting for
-- the collector instead kept them (and the blocks) alive, or cost a full
-- collection before every unit, up to 5% of the worker's time. Weak: a
-- worker that goes idle after its last unit collects them (worker.c).
local put_refs, n_put = setmetatable({}, {__mode = "v"}), 0
local function put(b)
  local ref = tide.put(b)
  n_put = n_put + 1
  put_refs[n_put] = ref
  return ref
end

local function release_puts()
  for i = 1, n_put do
    local r = put_refs[i]
    if r then core.release(r) end
    put_refs[i] = nil
  end
  n_put = 0
end

local function put_blocks(meta, n, k, block)
  if not k or n <= k then
    local b = block(1, n)
    meta.ref, meta.size = put(b), W.packed_bytes(b)
    return
  end
  local parts = {}
  for lo = 1, n, k do
    local hi = math.min(n, lo + k - 1)
    local b = block(lo, hi)
    parts[#parts + 1] = {ref = put(b), n = hi - lo + 1, size = W.packed_bytes(b)}
  end
  meta.parts = parts
end

-- Runs one unit of a stage. plan: {batch_fn?, call?, ops, sink?, label};
-- self is the pool actor's state (nil in a task).
function W.run(plan, self, spec, ...)
  release_puts()
  local t0 = now()
  local d = spec.desc
  if d and d.kind == "range" and #plan.ops == 0 and not plan.sink and not plan.discard then
    -- Its rows only cross to the next stage: packed ids, no row tables.
    local n = d.hi - d.lo + 1
    local meta = {n = n, n_in = n}
    put_blocks(meta, n, plan.split_rows, function(lo, hi) return W.pack_range(d.lo + lo - 1, d.lo + hi - 1) end)
    meta.t = now() - t0
    return meta
  end
  local rows
  if d then rows = W.read_source(d, (...))
  else rows = gather(spec.slices, ...) end
  local n_in = #rows
  local acc = {skipped = 0, batches = 0, calls = 0, retries = 0}
  if plan.call then
    rows = call_batches(plan, plan.call, self, rows, spec, acc)
  elseif plan.batch_fn then
    local fn = plan.batch_fn
    rows = call_batches(plan, function(_, batch) return fn(batch) end, nil, rows, spec, acc)
  end
  rows = apply_ops(plan.ops, rows, plan.label, acc)
  local n = #rows
  local meta = {n = n, n_in = n_in, skipped = acc.skipped, skipped_batches = acc.batches,
    calls = acc.calls, retries = acc.retries}
  if plan.sink then
    if n > 0 then meta.path, meta.bytes = write_block(plan.sink, spec.idx, rows) end
  elseif not plan.discard then -- (ds:count: the rows are counted, not kept)
    put_blocks(meta, n, plan.split_rows, function(lo, hi)
      if lo == 1 and hi == n then return W.pack(rows) end
      local part = tnew(hi - lo + 1, 0)
      for j = lo, hi do part[j - lo + 1] = rows[j] end
      return W.pack(part)
    end)
  end
  meta.t = now() - t0
  return meta
end

-- A pool actor's constructor: runs the user's init once.
function W.actor_init(self, user, args)
  if user.init then user.init(self, unpack(args or {})) end
end

return W
