-- tide.data: every contract call (sources, map/filter/map_batches, the
-- consuming calls, repartition, split, stats), order, back-pressure, actor
-- pools (init count, autoscaling, a dead actor replaced), failures (retry,
-- raise with the row range, skip), sinks (ordered part files, no partial
-- files), progress lines, and a dataset several times the store's size
-- streaming through it without spilling.
local t = dofile("tests/lua/harness.lua")
local tide = require("tide")
local STORE = 32 * 2^20
tide.init({num_cpus = 2, num_gpus = 2, object_store_memory = STORE})
local data = require("tide.data")
local cjson = require("cjson")
data.set_progress(false)

local TMP = os.getenv("TMPDIR") or "/tmp"
local DIR = TMP .. "/tide-data-test-" .. tide.get_runtime_context().pid
os.execute("rm -rf '" .. DIR .. "' && mkdir -p '" .. DIR .. "'")

local function write_file(path, s)
  local f = assert(io.open(path, "wb"))
  f:write(s)
  f:close()
end
local function read_file(path)
  local f = assert(io.open(path, "rb"))
  local s = f:read("*a")
  f:close()
  return s
end
local function ls(dir)
  local p = io.popen("ls -A '" .. dir .. "'")
  local out = {}
  for l in p:lines() do out[#out + 1] = l end
  p:close()
  return out
end
local function ids(rows)
  local out = {}
  for i, r in ipairs(rows) do out[i] = r.id end
  return out
end

local Counter = tide.actor({
  init = function(self) self.n = 0 end,
  incr = function(self) self.n = self.n + 1; return self.n end,
  get = function(self) return self.n end,
})

-- -- Sources ------------------------------------------------------------------

t.test("range gives rows {id = i} in order; count and take", function()
  local ds = data.range(1000)
  t.eq(ds:count(), 1000)
  t.deep_eq(ds:take(3), {{id = 1}, {id = 2}, {id = 3}})
  local i = 0
  for row in ds:iter_rows() do
    i = i + 1
    if row.id ~= i then error("row " .. i .. " has id " .. tostring(row.id)) end
  end
  t.eq(i, 1000)
  t.eq(data.range(0):count(), 0)
  t.deep_eq(data.range(0):take(5), {})
end)

t.test("from_items keeps items and their order; take stops early", function()
  local items = {}
  for i = 1, 50 do items[i] = {name = "item" .. i, v = i * 2} end
  local ds = data.from_items(items, {block_rows = 7})
  local got = ds:take_all()
  t.eq(#got, 50)
  t.deep_eq(got[13], {name = "item13", v = 26})
  t.deep_eq(ids(ds:map(function(r) return {id = r.v} end):take(4)), {2, 4, 6, 8})
end)

t.test("bad arguments raise at the call, naming what was wrong", function()
  t.raises(function() data.range(-1) end, "n must be a non%-negative integer")
  t.raises(function() data.range(5, {blocks = 2}) end, "unknown option 'blocks'")
  t.raises(function() data.from_items("x") end, "expected an array")
  t.raises(function() data.read_lines(DIR .. "/does-not-exist.txt") end, "cannot open")
  t.raises(function() data.read_lines(DIR .. "/*.nothing") end, "no files match")
  t.raises(function() data.range(3):map(42) end, "expected a function")
  t.raises(function() data.range(3):map_batches(function(b) return b end, {batchsize = 2}) end, "unknown option 'batchsize'")
  t.raises(function() data.range(3):map_batches({call = function() end}, {concurrency = {3, 1}}) end, "concurrency")
  t.raises(function() data.range(3):map_batches({init = function() end}) end, "call")
  t.raises(function() data.range(3):filter(function() return true end, {on_error = "ignore"}) end, "on_error")
  t.raises(function() data.range(3):count({preserve = false}) end, "unknown option 'preserve'")
  t.raises(function() data.range(3):write_jsonl(nil) end, "expected a directory")
  t.raises(function() data.range(3):map(function() return nil end):count() end, "map returned nil")
end)

t.test("read_lines: globs, rows {text, path, line}, files split into blocks without losing or repeating a line", function()
  local d = DIR .. "/lines"
  os.execute("mkdir -p '" .. d .. "'")
  local expect = {}
  -- a.txt: many short lines and one long line spanning several blocks;
  -- b.txt: CRLF and no final newline; c.txt: empty; skip.dat: not matched.
  local a = {}
  for i = 1, 300 do a[i] = (i == 150) and string.rep("L", 5000) or ("line " .. i) end
  write_file(d .. "/a.txt", table.concat(a, "\n") .. "\n")
  for i = 1, 300 do expect[#expect + 1] = {d .. "/a.txt", i, a[i]} end
  write_file(d .. "/b.txt", "one\r\ntwo\r\n\r\nfour")
  for i, s in ipairs({"one", "two", "", "four"}) do expect[#expect + 1] = {d .. "/b.txt", i, s} end
  write_file(d .. "/c.txt", "")
  write_file(d .. "/skip.dat", "nope\n")
  local ds = data.read_lines(d .. "/*.txt", {block_bytes = 512})
  local rows = ds:take_all()
  t.eq(#rows, #expect)
  for i, e in ipairs(expect) do
    local r = rows[i]
    if r.path ~= e[1] or r.line ~= e[2] or r.text ~= e[3] then
      error(string.format("row %d: got %s:%s %q, expected %s:%d %q", i, tostring(r.path), tostring(r.line),
        tostring(r.text):sub(1, 20), e[1], e[2], e[3]:sub(1, 20)))
    end
  end
  t.ok(ds:stats().stages[1].blocks > 10, "a.txt was not split into blocks")
  -- a directory means every file under it
  t.eq(data.read_lines(d):count(), #expect + 1)
  t.eq(data.read_lines({d .. "/b.txt", d .. "/c.txt"}):count(), 4)
end)

t.test("pools that can hold every CPU the task stages need raise at once, not wait forever", function()
  local total = tide.cluster_resources().CPU
  local pool = {call = function(_, b) return b end}
  local err = t.raises(function()
    data.range(40):map_batches(pool, {num_cpus = 1, concurrency = total}):count()
  end, "the run would wait forever")
  t.ok(tostring(err):find("can hold " .. total .. " of the cluster's " .. total .. " CPUs", 1, true), tostring(err))
  -- With room left for the tasks, the same pipeline runs.
  if total >= 2 then
    t.eq(data.range(40):map_batches(pool, {num_cpus = 1, concurrency = total - 1}):count(), 40)
  end
end)

t.test("read_jsonl, read_csv (quoted fields) and read_binary", function()
  local d = DIR .. "/formats"
  os.execute("mkdir -p '" .. d .. "'")
  local lines = {}
  for i = 1, 40 do lines[i] = cjson.encode({i = i, s = "x" .. i}) end
  write_file(d .. "/a.jsonl", table.concat(lines, "\n") .. "\n\n")
  local rows = data.read_jsonl(d .. "/a.jsonl", {block_bytes = 100}):take_all()
  t.eq(#rows, 40)
  t.eq(rows[40].i, 40); t.eq(rows[7].s, "x7")
  -- JSON's null is cjson.null, and it crosses the object store and tasks.
  write_file(d .. "/n.jsonl", '{"a":null,"b":1}\n{"a":2,"b":null}\n')
  local nr = data.read_jsonl(d .. "/n.jsonl"):map(function(r) return {a = r.a, b = r.b} end):take_all()
  t.eq(#nr, 2)
  t.ok(nr[1].a == cjson.null and nr[1].b == 1 and nr[2].a == 2 and nr[2].b == cjson.null, cjson.encode(nr))
  local isnull = tide.remote(function(x) return x == require("cjson").null end)
  t.eq(tide.get(isnull:remote(cjson.null)), true)
  write_file(d .. "/bad.jsonl", '{"a": 1}\n{oops\n')
  t.raises(function() data.read_jsonl(d .. "/bad.jsonl"):count() end, "bad JSON line")

  write_file(d .. "/t.csv", 'name,qty,note\r\napple,3,"red, round"\npear,5,"say ""hi"""\nfig,,\n')
  local c = data.read_csv(d .. "/t.csv"):take_all()
  t.deep_eq(c, {{name = "apple", qty = "3", note = "red, round"}, {name = "pear", qty = "5", note = 'say "hi"'},
    {name = "fig", qty = "", note = ""}})
  write_file(d .. "/s.tsv", "a;b\n1;2\n")
  t.deep_eq(data.read_csv(d .. "/s.tsv", {sep = ";"}):take_all(), {{a = "1", b = "2"}})
  write_file(d .. "/bad.csv", "a,b\n1,2,3\n")
  t.raises(function() data.read_csv(d .. "/bad.csv"):count() end, "3 fields, the header 2")

  write_file(d .. "/x.bin", "\0\1\2\255")
  write_file(d .. "/y.bin", string.rep("z", 1000))
  local b = data.read_binary(d .. "/*.bin"):take_all()
  t.eq(#b, 2)
  t.eq(b[1].path, d .. "/x.bin"); t.eq(b[1].bytes, "\0\1\2\255")
  t.eq(#b[2].bytes, 1000)
end)

-- -- Transformations ----------------------------------------------------------

t.test("filter and map are fused into the source's tasks (one stage)", function()
  local ds = data.range(200):filter(function(r) return r.id % 3 == 0 end)
    :map(function(r) return {id = r.id, half = r.id / 2} end)
  local rows = ds:take_all()
  t.eq(#rows, 66)
  t.deep_eq(rows[1], {id = 3, half = 1.5})
  local st = ds:stats()
  t.eq(#st.stages, 1)
  t.eq(st.stages[1].rows_in, 200)
  t.eq(st.stages[1].rows_out, 66)
end)

t.test("stateless map_batches: fused, batches cut within blocks; fuse = false, exactly batch_size across blocks", function()
  local function sizes(batch) return {{id = #batch, first = batch[1].id}} end
  local fused = data.range(103, {block_rows = 30}):map(function(r) return r end):map_batches(sizes, {batch_size = 25})
  local rows = fused:take_all()
  t.deep_eq(ids(rows), {25, 5, 25, 5, 25, 5, 13})
  t.eq(#fused:stats().stages, 1)
  t.eq(fused:stats().stages[1].name, "range->map->map_batches")
  local ds = data.range(103, {block_rows = 10}):map_batches(sizes, {batch_size = 25, fuse = false})
  rows = ds:take_all()
  t.deep_eq(ids(rows), {25, 25, 25, 25, 3})
  t.deep_eq({rows[1].first, rows[2].first, rows[5].first}, {1, 26, 101})
  t.eq(#ds:stats().stages, 2)
  -- asking for resources also gives the batches a stage of their own
  t.eq(#data.range(10):map_batches(function(b) return b end, {num_cpus = 0.5}):take_all(), 10)
  -- without batch_size, one batch per block
  t.eq(data.range(30, {block_rows = 10}):map_batches(function(b) return {{id = #b}} end):count(), 3)
  t.raises(function() data.range(3):map_batches(sizes, {fuse = 1}) end, "fuse must be a boolean")
end)

t.test("order is kept when blocks finish out of order; preserve_order = false gives every row", function()
  local ds = data.range(60, {block_rows = 5}):map(function(r)
    if r.id % 5 == 1 then tide.sleep(((r.id * 7) % 11) / 400) end
    return r
  end)
  local got = ids(ds:take_all())
  for i = 1, 60 do if got[i] ~= i then error("position " .. i .. " holds " .. tostring(got[i])) end end
  local any = ids(ds:take_all({preserve_order = false}))
  table.sort(any)
  t.eq(#any, 60)
  for i = 1, 60 do t.eq(any[i], i) end
end)

t.test("actor pool: init runs exactly concurrency times; batches go to every actor", function()
  local inits = Counter:remote()
  local ds = data.range(64, {block_rows = 4}):map_batches({
    init = function(self) tide.get(inits:incr()); self.me = tide.get_runtime_context().actor_id end,
    call = function(self, batch)
      tide.sleep(0.01)
      for _, r in ipairs(batch) do r.actor = self.me end
      return batch
    end,
  }, {batch_size = 8, concurrency = 3})
  local rows = ds:take_all()
  t.eq(#rows, 64)
  t.eq(tide.get(inits:get()), 3)
  local seen = {}
  for i, r in ipairs(rows) do t.eq(r.id, i); seen[r.actor] = true end
  local n = 0
  for _ in pairs(seen) do n = n + 1 end
  t.eq(n, 3, "actors used")
  local st = ds:stats().stages[2]
  t.eq(st.actors, 3); t.eq(st.actors_started, 3)
  t.ok(st.utilization > 0 and st.utilization <= 1, "utilization " .. tostring(st.utilization))
end)

t.local_test("actor pool with num_gpus: each actor gets its own GPU", function()
  local ds = data.range(8, {block_rows = 2}):map_batches({
    init = function(self) self.gpus = table.concat(tide.get_runtime_context().gpu_ids, ",") end,
    call = function(self, batch) for _, r in ipairs(batch) do r.gpu = self.gpus end; return batch end,
  }, {batch_size = 2, concurrency = 2, num_gpus = 1})
  local seen = {}
  for row in ds:iter_rows() do seen[row.gpu] = true end
  t.ok(seen["0"] or seen["1"], "no GPU id seen")
  for k in pairs(seen) do t.ok(k == "0" or k == "1", "unexpected gpu ids " .. k) end
  -- fractions: four actors with half a GPU each share the two GPUs
  local inits = Counter:remote()
  local half = data.range(16, {block_rows = 2}):map_batches({
    init = function(self) tide.get(inits:incr()); self.gpus = table.concat(tide.get_runtime_context().gpu_ids, ",") end,
    call = function(self, batch) for _, r in ipairs(batch) do r.gpu = self.gpus end; return batch end,
  }, {batch_size = 2, concurrency = 4, num_gpus = 0.5})
  local per = {}
  for row in half:iter_rows() do per[row.gpu] = true end
  t.eq(tide.get(inits:get()), 4)
  for k in pairs(per) do t.ok(k == "0" or k == "1", "unexpected gpu ids " .. k) end
end)

t.test("init_args reach init; an init that raises fails the run at once", function()
  local ds = data.range(6, {block_rows = 3}):map_batches({
    init = function(self, k, tag) self.k, self.tag = k, tag end,
    call = function(self, batch)
      for _, r in ipairs(batch) do r.id = r.id * self.k; r.tag = self.tag end
      return batch
    end,
  }, {init_args = {10, "x"}})
  local rows = ds:take_all()
  t.eq(rows[6].id, 60); t.eq(rows[6].tag, "x")
  local bad = data.range(6, {block_rows = 3}):map_batches({
    init = function() error("no model here") end,
    call = function(_, batch) return batch end,
  }, {concurrency = 2})
  local err = t.raises(function() bad:count() end, "no model here")
  t.eq(err.cause, "ActorDiedError")
  t.eq(err.attempts, 1)
end)

t.test("concurrency = {min, max} grows the pool while batches queue", function()
  local inits = Counter:remote()
  local ds = data.range(40, {block_rows = 2}):map_batches({
    init = function(_) tide.get(inits:incr()) end,
    call = function(_, batch) tide.sleep(0.05); return batch end,
  }, {batch_size = 2, concurrency = {1, 3}})
  t.eq(ds:count(), 40)
  local st = ds:stats().stages[2]
  t.ok(st.actors >= 2 and st.actors <= 3, "pool size " .. tostring(st.actors))
  t.eq(tide.get(inits:get()), st.actors_started)
end)

t.test("a dead actor is replaced and its batch retried", function()
  local marker = DIR .. "/died-once"
  local ds = data.range(20, {block_rows = 5}):map_batches({
    call = function(_, batch)
      if batch[1].id == 6 then
        local f = io.open(marker, "rb")
        if not f then
          f = io.open(marker, "wb"); f:write("x"); f:close()
          os.exit(1)
        end
        f:close()
      end
      return batch
    end,
  }, {batch_size = 5, concurrency = 2})
  t.deep_eq(ids(ds:take_all()), ids(data.range(20):take_all()))
  local st = ds:stats().stages[2]
  t.eq(st.actors_replaced, 1)
  t.ok(st.retries >= 1, "the batch was not retried") -- with every call in flight on the dead actor
end)

t.test("a pool unit carries batches_per_unit batches: call once per batch_size slice, one part file per unit",
  function()
  local out = DIR .. "/out-units"
  local ds = data.range(105, {block_rows = 50}):map_batches({
    init = function(self) self.calls = 0 end,
    call = function(self, batch)
      self.calls = self.calls + 1
      for _, r in ipairs(batch) do r.bsz = #batch; r.call = self.calls end
      return batch
    end,
  }, {batch_size = 10, batches_per_unit = 5, concurrency = 1})
  local st = ds:write_jsonl(out)
  t.eq(st.rows, 105)
  local s2 = st.stages[2]
  t.eq(s2.units, 3) -- 50 + 50 + 5 rows
  t.eq(s2.calls, 11)
  t.deep_eq(ls(out), {"part-000001.jsonl", "part-000002.jsonl", "part-000003.jsonl"})
  local back = data.read_jsonl(out):take_all()
  t.eq(#back, 105)
  for i, r in ipairs(back) do
    t.eq(r.id, i)
    t.eq(r.bsz, i <= 100 and 10 or 5)
  end
  t.eq(back[1].call, 1); t.eq(back[50].call, 5); t.eq(back[51].call, 6); t.eq(back[105].call, 11)
  t.raises(function() data.range(3):map_batches({call = function(_, b) return b end}, {batches_per_unit = 2}) end,
    "batches_per_unit needs batch_size")
  t.raises(function() data.range(3):map_batches(function(b) return b end, {batch_size = 1, init_args = {}}) end,
    "need {init, call}")
  t.raises(function()
    data.range(3):map_batches({call = function(_, b) return b end}, {batch_size = 1, batches_per_unit = 0})
  end, "batches_per_unit must be a positive integer")
end)

t.test("pool units are sized by the measured time per batch: cheap batches many to a unit, slow ones few", function()
  local cheap = data.range(2000, {block_rows = 500}):map_batches({
    call = function(_, batch) return batch end,
  }, {batch_size = 10, concurrency = 1})
  t.eq(cheap:count(), 2000)
  local st = cheap:stats().stages[2]
  t.eq(st.calls, 200)
  t.ok(st.units <= 20, "200 cheap batches took " .. st.units .. " units")
  local slow = data.range(20, {block_rows = 20}):map_batches({
    call = function(_, batch) tide.sleep(0.06); return batch end,
  }, {batch_size = 2, concurrency = 1})
  t.eq(slow:count(), 20)
  st = slow:stats().stages[2]
  t.eq(st.calls, 10)
  t.ok(st.units >= 8, "10 slow batches went in " .. st.units .. " units")
end)

-- One body for both kinds of map_batches stage: units of three batches of
-- 10 rows, in which the batch of rows 21-30 raises.
local function batch_failures(kind)
  local function ds_for(fails, opts)
    local function f(batch)
      if batch[1].id == 21 and fails() then error("bad " .. kind .. " batch") end
      return batch
    end
    local src = data.range(60, {block_rows = 30})
    if kind == "task" then return src:map_batches(f, opts) end
    opts.concurrency = 1
    return src:map_batches({call = function(_, batch) return f(batch) end}, opts)
  end
  local skip = {batch_size = 10, batches_per_unit = 3, on_error = "skip", max_retries = 1}
  local always = ds_for(function() return true end, skip)
  t.deep_eq(ids(always:take_all()), (function()
    local want = {}
    for i = 1, 60 do if i < 21 or i > 30 then want[#want + 1] = i end end
    return want
  end)())
  local st = always:stats().stages[2]
  t.eq(st.units, 2); t.eq(st.calls, 6); t.eq(st.rows_out, 50)
  t.eq(st.skipped_rows, 10); t.eq(st.skipped_batches, 1); t.eq(st.retries, 1)
  local marker = DIR .. "/" .. kind .. "-flaky"
  local once = ds_for(function()
    if io.open(marker, "rb") then return false end
    io.open(marker, "wb"):close()
    return true
  end, skip)
  t.eq(once:count(), 60)
  st = once:stats().stages[2]
  t.eq(st.skipped_rows, 0); t.eq(st.retries, 1)
  local calls = Counter:remote()
  local raising = ds_for(function() tide.get(calls:incr()); return true end,
    {batch_size = 10, batches_per_unit = 3, max_retries = 2})
  local err = t.raises(function() raising:count() end, "rows 21%-30 of its input after 3 attempts")
  t.eq(err.first, 21); t.eq(err.last, 30)
  t.ok(tostring(err):find("batch of rows 21-30: ", 1, true), "batch rows not named: " .. tostring(err))
  t.ok(tostring(err):find("bad " .. kind .. " batch", 1, true), "message lost: " .. tostring(err))
  t.ok(err.traceback:find("data_test.lua", 1, true), "remote traceback lost: " .. tostring(err.traceback))
  t.eq(tide.get(calls:get()), 3) -- the failing batch once per attempt of its (whole) unit
end

t.test("a pool batch that raises inside a unit of several: with skip only that batch is dropped (retried in "
  .. "place first); with raise the unit is retried and the error names the batch's rows", function()
  batch_failures("pool")
end)

t.test("task stage units carry several batches; cheap batches travel many to a unit", function()
  local fixed = data.range(60, {block_rows = 30}):map_batches(function(batch)
    for _, r in ipairs(batch) do r.bsz = #batch end
    return batch
  end, {batch_size = 10, batches_per_unit = 3})
  local back = fixed:take_all()
  t.deep_eq(ids(back), (function() local w = {}; for i = 1, 60 do w[i] = i end; return w end)())
  for _, r in ipairs(back) do t.eq(r.bsz, 10) end
  local st = fixed:stats().stages[2] -- batches_per_unit keeps it a stage of its own
  t.eq(st.calls, 6); t.eq(st.units, 2)
  local cheap = data.range(2000, {block_rows = 500}):map_batches(function(batch) return batch end,
    {batch_size = 10, fuse = false})
  t.eq(cheap:count(), 2000)
  st = cheap:stats().stages[2]
  t.eq(st.calls, 200)
  t.ok(st.units <= 20, "200 cheap batches took " .. st.units .. " task units")
end)

-- The rows of each part file of dir, in order.
local function part_rows(dir)
  local out = {}
  for _, name in ipairs(ls(dir)) do
    local _, n = read_file(dir .. "/" .. name):gsub("\n", "")
    out[#out + 1] = n
  end
  return out
end

t.test("a unit's rows are capped by their bytes in the store, and the last units shrink to share the tail", function()
  local function run(name, rows, make)
    local dir = DIR .. "/" .. name
    local ds = data.range(rows, {block_rows = 5000})
    if make then ds = ds:map(make) end
    ds:map_batches(function(batch) return batch end, {batch_size = 100, fuse = false}):write_jsonl(dir)
    local parts, total, most = part_rows(dir), 0, 0
    for _, n in ipairs(parts) do total = total + n; most = math.max(most, n) end
    t.eq(total, rows)
    return parts, most
  end
  -- Rows of 8 bytes (an id): beyond the 8,192 rows a unit once carried.
  local small, most = run("units-small", 100000)
  t.ok(most > 8192 and most <= data.UNIT_MAX_ROWS, "largest unit of small rows: " .. most .. " rows")
  -- Once the input has ended, each unit takes its share of what is left
  -- between the two workers: the last two are at most half the largest.
  t.ok(small[#small] <= most / 2 and small[#small - 1] <= most / 2,
    string.format("last units %d and %d rows, largest %d", small[#small - 1], small[#small], most))
  -- Rows of about 1 KB: 1 MiB of them is about 1,000 rows (whole batches).
  local _, big = run("units-big", 20000, function(r) return {id = r.id, s = string.rep("x", 1000) .. r.id} end)
  t.ok(big >= 100 and big <= 1100, "largest unit of 1 KB rows: " .. big .. " rows")
end)

t.test("a task batch that raises inside a unit of several: the same as in a pool", function()
  batch_failures("task")
end)

t.test("leaving an iter_rows loop early: the next run ends the abandoned run's pool", function()
  local ds = data.range(200, {block_rows = 5}):map_batches({
    call = function(_, batch) return batch end,
  }, {batch_size = 5, concurrency = 2})
  for row in ds:iter_rows() do
    if row.id == 3 then break end
  end
  local ex = ds._last
  local h = ex.stages[2].pool.actors[1].h
  t.ok(not ex.finished, "the run ended by itself")
  collectgarbage(); collectgarbage()
  t.eq(data.range(3):count(), 3) -- any run reaps
  t.ok(ex.finished, "the abandoned run was not ended")
  local err = t.raises(function() tide.get(h:run({slices = {}, idx = 1})) end)
  t.eq(err.kind, "ActorDiedError")
end)

-- -- Failures -----------------------------------------------------------------

t.test("a batch that always raises is retried max_retries times, then the pipeline fails naming the rows", function()
  local calls = Counter:remote()
  local ds = data.range(30, {block_rows = 10}):map_batches(function(batch)
    if batch[1].id == 11 then
      tide.get(calls:incr())
      error("bad batch")
    end
    return batch
  end, {batch_size = 10, fuse = false})
  local err = t.raises(function() ds:count() end, "rows 11%-20 of its input")
  t.eq(type(err), "table")
  t.eq(err.kind, "DataError")
  t.eq(err.attempts, 4)
  t.eq(err.first, 11); t.eq(err.last, 20)
  t.ok(tostring(err):find("bad batch", 1, true), "message lost")
  t.ok(err.traceback:find("data_test.lua", 1, true), "remote traceback lost: " .. tostring(err.traceback))
  t.eq(tide.get(calls:get()), 4)
  t.raises(function() ds:count({max_retries = 0}) end, "after 1 attempt")
  -- fused into the source's tasks, the error names the source block
  local fused = data.range(30, {block_rows = 10}):map_batches(function(batch)
    if batch[1].id == 11 then error("bad batch") end
    return batch
  end)
  err = t.raises(function() fused:count({max_retries = 1}) end, "rows 11%-20 of the range after 2 attempts")
  t.eq(err.first, 11); t.eq(err.last, 20)
end)

t.test("a batch that fails once is retried and the run succeeds", function()
  local marker = DIR .. "/failed-once"
  local ds = data.range(30, {block_rows = 10}):map_batches(function(batch)
    if batch[1].id == 21 and not io.open(marker, "rb") then
      io.open(marker, "wb"):close()
      error("transient")
    end
    return batch
  end)
  t.eq(ds:count(), 30)
  t.eq(ds:stats().stages[1].retries, 1)
end)

t.test("a failing row in map names the file and line", function()
  local p = DIR .. "/rows.txt"
  write_file(p, "ok\nok\nboom\nok\n")
  local ds = data.read_lines(p):map(function(r)
    if r.text == "boom" then error("cannot parse") end
    return r
  end)
  local err = t.raises(function() ds:count({max_retries = 0}) end, "rows.txt:3")
  t.ok(tostring(err):find("cannot parse", 1, true))
end)

t.test("on_error = skip drops the bad rows or batches and counts them", function()
  local ds = data.range(100, {block_rows = 10}):map(function(r)
    if r.id % 10 == 0 then error("bad row") end
    return r
  end, {on_error = "skip"})
  t.eq(ds:count(), 90)
  t.eq(ds:stats().stages[1].skipped_rows, 10)
  local ds2 = data.range(100, {block_rows = 10}):map_batches(function(b)
    if b[1].id == 41 then error("bad batch") end
    return b
  end, {batch_size = 20, on_error = "skip", max_retries = 1, fuse = false})
  t.eq(ds2:count(), 80)
  local st = ds2:stats().stages[2]
  t.eq(st.skipped_rows, 20); t.eq(st.skipped_batches, 1); t.eq(st.retries, 1)
  -- fused: the failing batch (cut within its block of 10) is dropped at once
  local ds3 = data.range(100, {block_rows = 10}):map_batches(function(b)
    if b[1].id == 41 then error("bad batch") end
    return b
  end, {batch_size = 20, on_error = "skip"})
  t.eq(ds3:count(), 90)
  st = ds3:stats().stages[1]
  t.eq(st.skipped_rows, 10); t.eq(st.skipped_batches, 1); t.eq(st.retries, 0)
end)

-- -- Sinks ------------------------------------------------------------------------

t.test("write_jsonl writes ordered part files, never partial ones, and returns stats", function()
  local out = DIR .. "/out-jsonl"
  local st = data.range(95, {block_rows = 10}):map(function(r) return {id = r.id, s = "v" .. r.id} end)
    :write_jsonl(out)
  t.eq(st.rows, 95)
  local files = ls(out)
  t.eq(#files, 10)
  for i, f in ipairs(files) do t.eq(f, string.format("part-%06d.jsonl", i)) end
  t.eq(#st.files, 10)
  t.eq(st.files[1], out .. "/part-000001.jsonl")
  t.ok(st.bytes_written > 0)
  local back = data.read_jsonl(out):take_all()
  t.eq(#back, 95)
  for i, r in ipairs(back) do t.eq(r.id, i); t.eq(r.s, "v" .. i) end
end)

t.test("a failed write leaves no partial file behind", function()
  local out = DIR .. "/out-fail"
  t.raises(function()
    data.range(20, {block_rows = 5}):map(function(r)
      if r.id == 12 then return {f = function() end} end -- cjson cannot encode a function
      return r
    end):write_jsonl(out, {max_retries = 0})
  end, "stage 1")
  for _, f in ipairs(ls(out)) do
    t.ok(f:match("^part%-%d+%.jsonl$"), "stray file " .. f)
  end
end)

t.test("a worker that dies mid-write leaves no temporary file; the retry writes the part", function()
  local out = DIR .. "/out-crash"
  local marker = DIR .. "/crashed-once"
  local st = data.range(20, {block_rows = 5}):map(function(r)
    if r.id == 8 and not io.open(marker, "rb") then
      io.open(marker, "wb"):close()
      -- what a write cut short by a crash leaves behind
      os.execute("mkdir -p '" .. out .. "' && echo '{\"id\":6' > '" .. out .. "/.part-000002.jsonl.tmp-1'")
      os.exit(1)
    end
    return r
  end):write_jsonl(out)
  t.eq(st.rows, 20)
  t.eq(st.stages[1].retries, 1)
  t.deep_eq(ls(out), {"part-000001.jsonl", "part-000002.jsonl", "part-000003.jsonl", "part-000004.jsonl"})
  t.eq(#data.read_jsonl(out):take_all(), 20)
end)

t.test("write_csv after an actor pool; read back with read_csv", function()
  local out = DIR .. "/out-csv"
  local st = data.range(30, {block_rows = 10}):map_batches({
    call = function(_, batch)
      for _, r in ipairs(batch) do r.name = "n," .. r.id end
      return batch
    end,
  }, {batch_size = 15}):write_csv(out)
  t.eq(st.rows, 30)
  t.eq(#st.stages, 2) -- source, pool (which writes)
  t.eq(st.stages[2].name, "map_batches(actors)->write_csv")
  local back = data.read_csv(out):take_all()
  t.eq(#back, 30)
  t.eq(back[30].id, "30"); t.eq(back[30].name, "n,30")
  local cols = data.range(3):write_csv(DIR .. "/out-cols", {columns = {"id", "missing"}})
  t.eq(cols.rows, 3)
  t.eq(read_file(DIR .. "/out-cols/" .. ls(DIR .. "/out-cols")[1]):match("^[^\n]*"), "id,missing")
end)

-- -- Repartition, split, iter_batches ------------------------------------------

t.test("repartition(n) makes n blocks of nearly equal rows, in order", function()
  local ds = data.range(100, {block_rows = 30}):repartition(4)
  local sizes = {}
  for b in ds:iter_batches() do sizes[#sizes + 1] = #b end
  t.deep_eq(sizes, {25, 25, 25, 25})
  t.deep_eq(ids(ds:take(3)), {1, 2, 3})
end)

t.test("iter_batches gives batches of batch_size across blocks", function()
  local sizes, total = {}, 0
  for b in data.range(50, {block_rows = 7}):iter_batches({batch_size = 12}) do
    sizes[#sizes + 1] = #b
    for _, r in ipairs(b) do total = total + r.id end
  end
  t.deep_eq(sizes, {12, 12, 12, 12, 2})
  t.eq(total, 50 * 51 / 2)
end)

t.test("split(n) shards are disjoint, cover every row, and iterate inside tasks", function()
  local shards = data.range(100, {block_rows = 10}):map(function(r) return {id = r.id * 2} end):split(3)
  t.eq(#shards, 3)
  local per_shard = tide.remote(function(shard)
    local s = 0
    for row in shard:iter_rows() do s = s + row.id end
    return {sum = s, n = shard:count()}
  end)
  local refs = {}
  for i, sh in ipairs(shards) do refs[i] = per_shard:remote(sh) end
  local total, n = 0, 0
  for _, r in ipairs(tide.get(refs)) do total = total + r.sum; n = n + r.n; t.ok(r.n > 0, "an empty shard") end
  t.eq(n, 100)
  t.eq(total, 100 * 101)
end)

-- -- Streaming: back-pressure and memory ------------------------------------------

t.test("back-pressure: a slow sink keeps the blocks in flight under the bound and the source from running ahead", function()
  local ds = data.range(400, {block_rows = 10}):map(function(r) return r end)
    :map_batches(function(b) return b end, {fuse = false})
  local consumed, bound_ok, max_lead = 0, true, 0
  local it = ds:iter_batches({max_in_flight = 3})
  for _ in it do
    consumed = consumed + 1
    tide.sleep(0.005) -- the slow consumer
    local st = ds:stats()
    local lead = st.stages[1].units - consumed
    if lead > max_lead then max_lead = lead end
    for _, s in ipairs(st.stages) do
      if s.peak_in_flight > s.max_in_flight then bound_ok = false end
    end
  end
  t.eq(consumed, 40)
  t.ok(bound_ok, "a stage exceeded max_in_flight")
  -- At most 3 units per stage (running or buffered) can be ahead of the consumer.
  t.ok(max_lead <= 6, "the source ran " .. max_lead .. " blocks ahead")
  t.ok(max_lead >= 2, "the source never ran ahead (no pipelining): " .. max_lead)
  for _, s in ipairs(ds:stats().stages) do t.eq(s.max_in_flight, 3) end
end)

t.test("back-pressure: a slow sink (a pool of one actor writing) holds the source under its bound", function()
  local out = DIR .. "/out-slow"
  local st = data.range(60, {block_rows = 2}):map(function(r) return {id = r.id, pad = string.rep("p", 100)} end)
    :map_batches({call = function(_, b) tide.sleep(0.01); return b end}, {batch_size = 2, concurrency = 1})
    :write_jsonl(out, {max_in_flight = 2})
  t.eq(st.rows, 60)
  t.eq(#st.files, st.stages[2].units) -- one part file per pool unit
  for i, s in ipairs(st.stages) do
    t.ok(s.peak_in_flight <= 2, "stage " .. i .. " held " .. s.peak_in_flight .. " units, bound 2")
  end
  -- the pool of one never held more than its bound either
  t.eq(st.stages[2].actors, 1)
end)

t.test("count: the last stage's rows are counted where they are made, never sent", function()
  -- Rows that cannot be sent at all (a coroutine inside): count works, as
  -- nothing of the last stage enters the store; a stage boundary before
  -- it still sends, and fails naming the value.
  local ds = data.range(50, {block_rows = 10}):map(function(r) return {id = r.id, co = coroutine.create(print)} end)
  t.eq(ds:count(), 50)
  t.eq(ds:stats().stages[1].rows_out, 50)
  local staged = ds:map_batches(function(b) return b end, {fuse = false})
  t.raises(function() staged:count({max_retries = 0}) end, "cannot send a coroutine")
end)

t.test("peak_store_bytes counts blocks small enough to be kept inline (outside the store)", function()
  -- Blocks of 20 rows of ~1 KiB: about 20 KiB each, under the 64 KiB
  -- inline limit, so none enters the shared-memory store.
  local ds = data.range(400, {block_rows = 20})
    :map(function(r) return {id = r.id, s = string.rep(string.char(65 + r.id % 26), 1000)} end) -- not all one
    :map_batches(function(b) tide.sleep(0.02); return b end, {fuse = false}) -- blocks wait: sampled
  t.eq(ds:count(), 400)
  local st = ds:stats()
  t.ok(st.peak_store_bytes >= 20 * 1000, "peak_store_bytes " .. st.peak_store_bytes .. " for 20 KiB blocks")
end)

t.local_test("a dataset five times the store streams through without spilling", function()
  local payload_rows = 160 * 1024 -- 160 MiB of 1 KiB rows through a 32 MiB store
  local ds = data.range(payload_rows, {block_rows = 1024})
    :map(function(r) return {id = r.id, s = string.rep(string.char(65 + r.id % 26), 1000)} end) -- not all one
    :map_batches(function(b)
      local n = 0
      for _, r in ipairs(b) do n = n + #r.s end
      return {{id = b[1].id, bytes = n}}
    end, {fuse = false}) -- its own stage: the 1 MiB blocks go through the store
  -- Consumed blocks are let go as their units end, not when the driver
  -- next collects: with its collector stopped the run must not spill
  -- (before, under load, late collections let consumed blocks fill the
  -- store and spill 10-20 MB of live ones).
  local W = require("tide.data.worker")
  local collect = W.collect
  collectgarbage()
  W.collect = function() end
  collectgarbage("stop")
  local bytes = 0
  local ok, err = pcall(function()
    for row in ds:iter_rows() do bytes = bytes + row.bytes end
  end)
  collectgarbage("restart")
  W.collect = collect
  assert(ok, err)
  t.eq(bytes, payload_rows * 1000)
  local st = ds:stats()
  t.ok(st.peak_store_bytes <= STORE / 2, "peak store " .. st.peak_store_bytes)
  t.eq(st.peak_spilled_bytes, 0, "spilled bytes")
  t.eq(tide.stats().spilled_bytes, 0, "spilled at the end")
  t.eq(st.stages[2].rows_in, payload_rows)
end)

-- -- Progress and stats ------------------------------------------------------------------

t.test("progress: plain periodic lines when stderr is not a terminal, none when off", function()
  local script = DIR .. "/progress.lua"
  write_file(script, [[
local tide = require("tide")
tide.init({num_cpus = 2})
local data = require("tide.data")
data.set_option("progress_interval", 0.3)
local ds = data.range(400, {block_rows = 4}):map(function(r) tide.sleep(0.01); return r end)
assert(ds:count() == 400)
data.set_progress(false)
assert(ds:count() == 400)
]])
  local p = io.popen("bin/tide run '" .. script .. "' 2>&1 >/dev/null")
  local out = p:read("*a")
  p:close()
  local n = 0
  for line in out:gmatch("[^\n]+") do
    if line:find("tide.data stage 1 range%->map") then n = n + 1 end
  end
  t.ok(n >= 1, "no progress line: " .. out)
  t.ok(n < 50, n .. " progress lines for 100 blocks (one per block?)")
  t.ok(not out:find("\27", 1, true), "terminal escapes in a non-terminal")
end)

t.test("progress on a terminal: lines per stage redrawn in place", function()
  local script = DIR .. "/progress_tty.lua"
  write_file(script, [[
local tide = require("tide")
tide.init({num_cpus = 2})
local data = require("tide.data")
local ds = data.range(200, {block_rows = 4}):map(function(r) tide.sleep(0.01); return r end)
  :map_batches({call = function(_, b) return b end}, {batch_size = 8})
assert(ds:count() == 200)
]])
  local p = io.popen("script -qfec \"bin/tide run '" .. script .. "'\" /dev/null 2>&1 < /dev/null")
  local out = p:read("*a")
  p:close()
  t.ok(out:find("\27[2K", 1, true), "no line redraw in: " .. out:sub(1, 300))
  t.ok(out:find("\27%[%d+A"), "lines are not redrawn in place")
  t.ok(out:find("tide.data stage 1 range->map", 1, true), "no stage 1 line")
  t.ok(out:find("tide.data stage 2 map_batches%(actors%): 200 rows"), "no final stage 2 line")
  t.ok(out:find("tide.data store:", 1, true), "no store line")
end)

t.local_test("stats: rows and time per stage, store peak; tostring reads", function()
  local ds = data.range(50):map(function(r) return r end)
    :map_batches(function(b) return b end, {batch_size = 10, fuse = false})
  t.eq(ds:stats(), nil)
  ds:count()
  local st = ds:stats()
  t.eq(st.rows, 50)
  t.eq(#st.stages, 2)
  t.eq(st.stages[2].rows_in, 50)
  t.eq(st.stages[2].calls, 5)
  t.ok(st.stages[2].blocks >= 1 and st.stages[2].blocks <= 5, "blocks: " .. st.stages[2].blocks)
  t.ok(st.stages[1].time_s >= 0 and st.wall_s > 0)
  t.ok(st.store_capacity == STORE)
  local s = tostring(st)
  t.ok(s:find("stage 2 map_batches", 1, true), s)
end)

t.test("blocks of uniform rows travel packed by column and come back equal; other rows as they are", function()
  local W = require("tide.data.worker")
  local core = require("tide.core")
  local rows = {}
  for i = 1, 40 do
    rows[i] = {id = i, text = i % 3 == 0 and "" or ("row \0 " .. i), ok = i % 2 == 0, x = i == 7 and 0 / 0 or -i / 3,
      path = "/same/for/every/row", big = ({1 / 0, -1 / 0, 2 ^ 53 + 2, -0.0})[i % 4 + 1]}
  end
  local b = W.pack(rows)
  t.ok(b.cols and not b.rows, "uniform scalar rows are packed by column")
  for c, k in ipairs(b.keys) do
    t.eq(type(b.cols[c]), b.kinds[c] == "string" and "table" or "string") -- bytes, not arrays of values
    if k == "path" then t.eq(b.cols[c].c, "/same/for/every/row") end -- one value, sent once
  end
  local back = W.unpack(core.decode(core.encode(b)))
  t.eq(#back, 40)
  for i = 1, 40 do
    t.eq(back[i].id, i); t.eq(back[i].text, rows[i].text); t.eq(back[i].ok, rows[i].ok)
    if i == 7 then t.ok(back[i].x ~= back[i].x, "NaN kept") else t.eq(back[i].x, rows[i].x) end
    t.eq(back[i].path, "/same/for/every/row"); t.eq(back[i].big, rows[i].big)
    t.eq(1 / back[i].big, 1 / rows[i].big) -- -0.0 stays negative
    local n = 0
    for _ in pairs(back[i]) do n = n + 1 end
    t.eq(n, 6)
  end
  -- Rows that differ in keys, hold tables, have metatables or array parts,
  -- or are not tables, travel as they are.
  local function plain(mk)
    local r = {}
    for i = 1, 20 do r[i] = mk(i) end
    local pb = W.pack(r)
    t.ok(pb.rows == r, "not packed")
    t.deep_eq(W.unpack(core.decode(core.encode(pb))), r)
  end
  plain(function(i) return i % 5 == 0 and {id = i, extra = true} or {id = i} end)
  plain(function(i) return {id = i, tags = {"a"}} end)
  plain(function(i) return i == 20 and {id = i, [1] = "x"} or {id = i} end)
  plain(function(i) return i end)
  plain(function(i) return {id = i % 2 == 0 and i or tostring(i)} end)
  plain(function(i) return i == 20 and {id = i} or {id = i, h = i} end) -- a key missing
  plain(function(i)
    local r = {}
    for k = 1, 33 do r["k" .. k] = i end
    return r
  end) -- more keys than a packed block takes
  t.ok(W.pack({{id = 1}}).rows, "a short block is not packed")
  -- A range's blocks bound for the next stage are packed without making rows.
  local ids = {}
  for i = 5, 44 do ids[#ids + 1] = {id = i} end
  t.deep_eq(W.pack_range(5, 44), W.pack(ids))
  t.deep_eq(W.unpack(W.pack_range(7, 9)), {{id = 7}, {id = 8}, {id = 9}})
  -- A slice is rebuilt alone, after what out holds already.
  local part = {"a", "b"}
  t.eq(W.unpack_into(b, 11, 15, part, 2), 7)
  t.eq(#part, 7); t.eq(part[2], "b"); t.eq(part[3].id, 11); t.eq(part[7].id, 15); t.eq(part[7].text, rows[15].text)
  t.eq(W.unpack_into(b, 41, 40, part, 7), 7) -- an empty slice
  -- Through a pipeline: a stage of its own and an actor pool get them back.
  local out = data.from_items(rows, {block_rows = 25})
    :map_batches(function(batch) return batch end, {batch_size = 30, fuse = false})
    :map_batches({call = function(_, batch) return batch end}, {batch_size = 7})
    :take_all()
  t.eq(#out, 40)
  for i = 1, 40 do t.eq(out[i].id, i); t.eq(out[i].text, rows[i].text); t.eq(out[i].ok, rows[i].ok) end
  local st = data.from_items(rows):map(function(r) return {id = r.id, c = r.text:upper()} end):write_jsonl(DIR .. "/packed")
  local got = data.read_jsonl(DIR .. "/packed"):take_all()
  t.eq(#got, 40); t.eq(got[40].id, 40); t.eq(got[40].c, "ROW \0 40")
  t.eq(st.rows, 40)
end)

t.local_test("a driver's run publishes each stage's rows out, rows/s and in flight (tide_data_* gauges)", function()
  t.eq(data.range(1000):map(function(r) return r end):count({name = "gauge-pipe"}), 1000)
  -- An embedded driver keeps them in the process (a head keeps their history).
  local text = tide.metrics.text()
  local l = '{pipeline="gauge-pipe",stage="1 range->map"}'
  t.ok(text:find("tide_data_rows_out" .. l .. " 1000\n", 1, true), text)
  t.ok(text:find("tide_data_in_flight" .. l .. " 0\n", 1, true), text)
  local at = select(2, text:find("tide_data_rows_per_second" .. l .. " ", 1, true))
  t.ok(at and text:sub(at + 1, at + 1):match("[1-9]"), text)
  t.ok(text:find('tide_data_running{pipeline="gauge-pipe"} 0\n', 1, true), text)
  local ok, err = pcall(function() data.range(3):count({name = 5}) end)
  t.ok(not ok and tostring(err):find("ds:count: name must be a non%-empty string"), tostring(err))
end)

os.execute("rm -rf '" .. DIR .. "'")
t.done()
