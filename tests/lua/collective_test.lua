-- tide.collective between tasks: every collective, 2-4 ranks, sizes that do
-- not divide by the rank count, checked element by element.
local t = dofile("tests/lua/harness.lua")
local tide = require("tide")
tide.init({num_cpus = 2})

-- Each rank fills x[i] = (rank + 1) * i and runs every collective.
local rank_body = tide.remote({num_cpus = 0}, function(world, rank, n, name)
  local T = require("tide.tensor")
  local C = require("tide.collective")
  C.init_group(world, rank, name)
  if os.getenv("COLL_DEBUG") then print("joined", name, rank) end
  local function filled(scale)
    local v = {}
    for i = 1, n do v[i] = scale * i end
    return T.from_table(v)
  end
  local out = {}
  for _, op in ipairs({"sum", "avg", "max", "min"}) do
    local x = filled(rank + 1)
    C.allreduce(x, op)
    local v = x:to_table()
    out[op] = {v[1], v[n]}
  end
  local g = T.zeros({n * world})
  C.allgather(filled(rank + 1), g)
  local gv = g:to_table()
  out.gather = {gv[1], gv[n * world]}
  local chunk = C.chunk_count(n, world, rank)
  local rs = T.zeros({chunk})
  C.reduce_scatter(filled(rank + 1), rs, "sum")
  out.rs_len = chunk
  out.rs_first = rs:to_table()[1]
  local b = filled(rank == 1 % world and 7 or 0)
  C.broadcast(b, 1 % world)
  out.bcast = b:to_table()[n]
  if world >= 2 then
    if rank == 0 then C.send(filled(5), 1)
    elseif rank == 1 then
      local r = T.zeros({n})
      C.recv(r, 0)
      out.recv = r:to_table()[n]
    end
  end
  if os.getenv("COLL_DEBUG") then print("before barrier", name, rank) end
  C.barrier()
  return out
end)

local function run(world, n)
  local name = "g" .. world .. "_" .. n
  local refs = {}
  for r = 0, world - 1 do refs[r + 1] = rank_body:remote(world, r, n, name) end
  return tide.get(refs, {timeout = 60})
end

for _, case in ipairs({{2, 1000}, {3, 1001}, {4, 1023}, {2, 7}}) do
  local world, n = case[1], case[2]
  t.test(string.format("%d ranks, %d elements: every collective", world, n), function()
    local res = run(world, n)
    local s = world * (world + 1) / 2  -- sum of (rank + 1)
    for rank = 0, world - 1 do
      local o = res[rank + 1]
      t.eq(o.sum[1], s, "allreduce sum")
      t.eq(o.sum[2], s * n, "allreduce sum, last element")
      t.ok(math.abs(o.avg[2] - s * n / world) < 1e-3 * n, "allreduce avg")
      t.eq(o.max[2], world * n, "allreduce max")
      t.eq(o.min[2], n, "allreduce min")
      t.eq(o.gather[1], 1, "allgather first")
      t.eq(o.gather[2], world * n, "allgather last (rank world-1's last)")
      t.eq(o.bcast, 7 * n, "broadcast from rank 1")
    end
    -- reduce_scatter: rank r holds chunk r of the sum; chunks cover n.
    local total, start = 0, 1
    for rank = 0, world - 1 do
      local o = res[rank + 1]
      t.eq(o.rs_first, s * start, "reduce_scatter chunk start")
      start = start + o.rs_len
      total = total + o.rs_len
    end
    t.eq(total, n, "reduce_scatter chunks cover the tensor")
    t.eq(res[2].recv, 5 * n, "send/recv")
  end)
end

-- Every element against a plain reference: sizes around the two-rank
-- exchange's limit (64 KiB = 16384 floats) and across several of the
-- ring's 256 KiB pieces, odd lengths, every op, in place, three rounds
-- reusing the same tensor. x[i] = ((rank * 37 + i * 11) % 101) - 50 keeps
-- sums, maxima and minima exact.
local exact_body = tide.remote({num_cpus = 0}, function(world, rank, sizes, name)
  local T = require("tide.tensor")
  local C = require("tide.collective")
  C.init_group(world, rank, name)
  local function val(r, i) return (r * 37 + i * 11) % 101 - 50 end
  local bad = {}
  for _, n in ipairs(sizes) do
    local x = T.zeros({n})
    for round = 1, 3 do
      for _, op in ipairs({"sum", "avg", "max", "min"}) do
        for i = 1, n do x:set(i, val(rank + round, i)) end
        C.allreduce(x, op)
        for i = 1, n do
          local want = val(round, i)
          for r = 1, world - 1 do
            local v = val(r + round, i)
            if op == "max" then want = math.max(want, v)
            elseif op == "min" then want = math.min(want, v)
            else want = want + v end
          end
          if op == "avg" then want = want / world end
          local got = x:get(i)
          if math.abs(got - want) > 1e-5 * math.abs(want) then
            bad[#bad + 1] = string.format("n=%d round %d %s [%d] = %g, want %g", n, round, op, i, got, want)
            break
          end
        end
      end
    end
  end
  return table.concat(bad, "; ")
end)

for _, world in ipairs({2, 3}) do
  t.test(string.format("%d ranks: allreduce equals a plain reference, every element", world), function()
    local sizes = {1, 7, 16383, 16384, 16385, 262147}
    local refs = {}
    for r = 0, world - 1 do refs[r + 1] = exact_body:remote(world, r, sizes, "exact" .. world) end
    for r, msg in ipairs(tide.get(refs, {timeout = 120})) do t.eq(msg, "", "rank " .. (r - 1)) end
  end)
end

-- Every dtype (gradients in bf16 or f16, token counts in i32 or i64, bytes
-- in u8): allreduce with each op it takes, reduce_scatter, allgather,
-- broadcast and send/recv, sizes on both sides of the two-rank exchange's
-- 64 KiB; values exact in every dtype (|sum| <= 150 fits bf16's 8 bits).
local dtype_body = tide.remote({num_cpus = 0}, function(world, rank, name)
  local T = require("tide.tensor")
  local C = require("tide.collective")
  C.init_group(world, rank, name)
  local bad = {}
  local function val(dt, r, i)
    local v = (r * 37 + i * 11) % 51 - (dt == "u8" and 0 or 25)
    return dt == "i64" and v + (i % 3) * 2 ^ 40 or v
  end
  local function filled(dt, r, n)
    local v = {}
    for i = 1, n do v[i] = val(dt, r, i) end
    return T.from_table(v, {dtype = dt})
  end
  local function check(what, x, want_at)
    local v = x:to_table()
    for i = 1, #v do
      if v[i] ~= want_at(i) then
        bad[#bad + 1] = string.format("%s [%d] = %s, want %s", what, i, tostring(v[i]), tostring(want_at(i)))
        return
      end
    end
  end
  for _, dt in ipairs({"f16", "bf16", "i32", "i64", "u8"}) do
    for _, n in ipairs({7, 40001}) do
      local ops = (dt == "f16" or dt == "bf16") and world == 2 and {"sum", "avg", "max", "min"} or {"sum", "max", "min"}
      for _, op in ipairs(ops) do
        local x = filled(dt, rank, n)
        C.allreduce(x, op)
        check(dt .. " allreduce " .. op .. " n=" .. n, x, function(i)
          local w = val(dt, 0, i)
          for r = 1, world - 1 do
            local v = val(dt, r, i)
            w = op == "max" and math.max(w, v) or op == "min" and math.min(w, v) or w + v
          end
          return op == "avg" and w / world or w
        end)
      end
      local rs = T.zeros({C.chunk_count(n, world, rank)}, {dtype = dt})
      C.reduce_scatter(filled(dt, rank, n), rs, "sum")
      local start = 0
      for r = 0, rank - 1 do start = start + C.chunk_count(n, world, r) end
      check(dt .. " reduce_scatter n=" .. n, rs, function(i)
        local w = 0
        for r = 0, world - 1 do w = w + val(dt, r, start + i) end
        return w
      end)
      local g = T.zeros({n * world}, {dtype = dt})
      C.allgather(filled(dt, rank, n), g)
      check(dt .. " allgather n=" .. n, g, function(i) return val(dt, math.floor((i - 1) / n), (i - 1) % n + 1) end)
      local b = rank == 1 and filled(dt, 9, n) or T.zeros({n}, {dtype = dt})
      C.broadcast(b, 1)
      check(dt .. " broadcast n=" .. n, b, function(i) return val(dt, 9, i) end)
      if rank == 0 then C.send(filled(dt, 5, n), 1)
      elseif rank == 1 then
        local r = T.zeros({n}, {dtype = dt})
        C.recv(r, 0)
        check(dt .. " recv n=" .. n, r, function(i) return val(dt, 5, i) end)
      end
    end
  end
  -- Refused clearly: avg of integers, and two dtypes in one call.
  local ok1, e1 = pcall(C.allreduce, T.zeros({4}, {dtype = "i32"}), "avg")
  local ok2, e2 = pcall(C.allgather, T.zeros({4}, {dtype = "bf16"}), T.zeros({4 * world}))
  if ok1 or not tostring(e1):find("allreduce: avg needs a float tensor (f32, f16 or bf16), not i32", 1, true) then
    bad[#bad + 1] = "avg of i32: " .. tostring(e1)
  end
  if ok2 or not tostring(e2):find("allgather: in is bf16, out is f32: both must have the same dtype", 1, true) then
    bad[#bad + 1] = "mixed dtypes: " .. tostring(e2)
  end
  C.barrier()
  return table.concat(bad, "; ")
end)

for _, world in ipairs({2, 3}) do
  t.test(string.format("%d ranks: every collective in f16, bf16, i32, i64 and u8", world), function()
    local refs = {}
    for r = 0, world - 1 do refs[r + 1] = dtype_body:remote(world, r, "dtypes" .. world) end
    for r, msg in ipairs(tide.get(refs, {timeout = 120})) do t.eq(msg, "", "rank " .. (r - 1)) end
  end)
end

t.test("bad arguments are refused clearly", function()
  local f = tide.remote({num_cpus = 0}, function()
    local C = require("tide.collective")
    local ok1, e1 = pcall(C.init_group, 2, 5, "bad")
    local ok2, e2 = pcall(C.allreduce, require("tide.tensor").ones({3}))
    return ok1, tostring(e1), ok2, tostring(e2)
  end):options({num_returns = 4})
  local a, b, c, d = f:remote()
  t.eq(tide.get(a), false)
  t.ok(tide.get(b):find("rank"), tide.get(b))
  t.eq(tide.get(c), false)
  t.ok(tide.get(d):find("init_group"), tide.get(d))
end)

t.test("bad timeouts are refused clearly", function()
  local f = tide.remote({num_cpus = 0}, function()
    local C = require("tide.collective")
    local ok1, e1 = pcall(C.init_group, 2, 0, "badt", {timeout = "soon"})
    local ok2, e2 = pcall(C.init_group, 2, 0, "badt", {op_timeout = -1})
    return ok1, tostring(e1), ok2, tostring(e2)
  end):options({num_returns = 4})
  local a, b, c, d = f:remote()
  t.eq(tide.get(a), false)
  t.ok(tide.get(b):find("init_group: timeout must be a number of seconds >= 0, got soon", 1, true), tide.get(b))
  t.eq(tide.get(c), false)
  t.ok(tide.get(d):find("init_group: op_timeout must be a number of seconds >= 0, got -1", 1, true), tide.get(d))
end)

t.test("an NCCL group without a GPU fails clearly", function()
  local f = tide.remote({num_cpus = 0}, function()
    local C = require("tide.collective")
    local ok, e = pcall(C.init_group, 1, 0, "nccl-nogpu", {backend = "nccl"})
    local ok2, e2 = pcall(C.init_group, 1, 0, "x", {backend = "mpi"})
    return ok, tostring(e), ok2, tostring(e2)
  end):options({num_returns = 4})
  local a, b, c, d = f:remote()
  if tide.get(a) then return end  -- a GPU is present: nothing to check here
  t.ok(#tide.get(b) > 0, "an error message")
  t.eq(tide.get(c), false)
  t.ok(tide.get(d):find("backend"), tide.get(d))
end)

t.done()
