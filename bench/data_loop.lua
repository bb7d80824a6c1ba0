-- The plain-loop baseline of tide.data's efficiency benchmark: the batch
-- function of bench/data_work.lua over rows {id = lo..hi}, made in batches
-- of batch_size, in this one process, with no Tide at all. Prints the
-- seconds the loop took, a checksum (so the work cannot be skipped) and
-- the CPU seconds the process used.
--   tide run bench/data_loop.lua LO HI ITERS BATCH_SIZE
local lo, hi, iters, bs = tonumber(arg[1]), tonumber(arg[2]), tonumber(arg[3]), tonumber(arg[4])
local work = dofile(os.getenv("TIDE_HOME") .. "/bench/data_work.lua")
local raw = require("tide.rawbench")
local fn = work.make(iters)
local t0 = raw.now()
local sum = 0
for b = lo, hi, bs do
  local batch = {}
  for i = b, math.min(hi, b + bs - 1) do batch[#batch + 1] = {id = i} end
  local out = fn(batch)
  for i = 1, #out do sum = (sum + out[i].h) % 1000003 end
end
io.write(string.format("%.6f %d %.6f\n", raw.now() - t0, sum, os.clock()))
