-- The CPU-bound batch function of the tide.data efficiency benchmark
-- (bench/data.lua), shared by the pipeline and by the plain loop it is
-- compared with (bench/data_loop.lua), so both run the very same code.
-- Each row costs `iters` rounds of integer-like arithmetic, which LuaJIT
-- compiles to a tight loop: a known amount of CPU per row.
local M = {}

function M.make(iters)
  return function(batch)
    for i = 1, #batch do
      local r = batch[i]
      local x = r.id
      for k = 1, iters do x = (x * 31 + k) % 1000003 end
      r.h = x
    end
    return batch
  end
end

return M
