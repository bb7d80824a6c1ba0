-- What bench.lua and the drivers it starts (multinode.lua) share: JSON
-- lines with the fraction of their limit, and the median-of-3 rate.
local raw = require("tide.rawbench")
local cjson = require("cjson")
local M = {}
M.SCALE = tonumber(os.getenv("TIDE_BENCH_SCALE") or "1")

function M.emit(rec)
  if rec.limit then rec.fraction_of_limit = rec.value / rec.limit end
  io.write(cjson.encode(rec), "\n")
  io.flush()
end

-- Runs fn repeatedly for about `secs`, returns the median rate of 3 runs
-- (units of `per` work items per call).
function M.rate(fn, per, secs)
  secs = (secs or 1) * M.SCALE
  local rates = {}
  for r = 1, 3 do
    local n, t0 = 0, raw.now()
    repeat fn(); n = n + 1 until raw.now() - t0 >= secs / 3
    rates[r] = n * per / (raw.now() - t0)
  end
  table.sort(rates)
  return rates[2]
end

-- The actor the call benchmarks use: a no-op method, and one that makes n
-- pipelined calls to another actor.
function M.actor()
  return require("tide").actor({
    small = function() return 0 end,
    call_n = function(_, other, n)
      local refs = {}
      for i = 1, n do refs[i] = other:small() end
      require("tide").get(refs)
      return n
    end,
  })
end

-- Makes n refs with make(i) and gets them all (one pipelined batch).
function M.batch(n, make)
  local tide = require("tide")
  local refs = {}
  for i = 1, n do refs[i] = make(i) end
  return tide.get(refs)
end

return M
