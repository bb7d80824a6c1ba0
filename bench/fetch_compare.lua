-- Same-run comparison of two builds (bench/fetch_compare.sh): a 64 MiB
-- result made on node-1 read by a task on node-2, end to end; and a 64 MiB
-- object read by a task on node-1 and one on node-2 at once.
local tide = require("tide")
local raw = require("tide.rawbench")
local T = require("tide.tensor")
local function on(k) return {scheduling_strategy = {node_id = "node-" .. k, soft = false}} end
local nop = tide.remote(function() return 0 end)
local make = tide.remote(function(k) return require("tide.tensor").full({k}, 1) end)
local count = tide.remote(function(t) return t:numel() end)
local n = 16 * 1024 * 1024
local function best_of(reps, f)
  local best = math.huge
  for _ = 1, reps do
    local t = f()
    if t < best then best = t end
    collectgarbage(); tide.get(nop:remote()); tide.sleep(0.3)
  end
  return best
end
local chain = best_of(5, function()
  local t0 = raw.now()
  local r = make:options(on(1)):remote(n)
  assert(tide.get(count:options(on(2)):remote(r)) == n)
  return raw.now() - t0
end)
local x = T.full({n}, 1)
local bcast = best_of(5, function()
  local r = tide.put(x)
  local t0 = raw.now()
  tide.get({count:options(on(1)):remote(r), count:options(on(2)):remote(r)})
  return raw.now() - t0
end)
print(string.format("chain %.3f GB/s  broadcast %.3f GB/s", n * 4 / chain / 1e9, 2 * n * 4 / bcast / 1e9))
