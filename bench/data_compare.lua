-- Tide's side of bench/data_compare.py: the Ray Data peer's pipeline
-- (bench/ray_data_bench.py) on the same files: read_lines -> filter -> map
-- (lower-case) -> map_batches on a pool of two actors (tag, length) ->
-- write_jsonl. Prints one JSON line; the cluster's start is not timed (as
-- ray.init is not in the peer).
--   tide run bench/data_compare.lua SRC_DIR DST_DIR
local tide = require("tide")
local data = require("tide.data")
local raw = require("tide.rawbench")
local cjson = require("cjson")

local src, dst = assert(arg[1], "SRC_DIR"), assert(arg[2], "DST_DIR")
tide.get(tide.remote(function() return 1 end):remote()) -- start the cluster

local t0 = raw.now()
local stats = data.read_lines(src)
  :filter(function(r) return #r.text > 0 end)
  :map(function(r) return {text = r.text:lower()} end)
  :map_batches({
    init = function(self) self.tag = "pooled" end,
    call = function(self, batch)
      for i = 1, #batch do
        local r = batch[i]
        r.tag, r.len = self.tag, #r.text
      end
      return batch
    end,
  }, {batch_size = 100, concurrency = 2})
  :write_jsonl(dst, {progress = false})
local dt = raw.now() - t0
io.write(cjson.encode({system = "tide", metric = "data_read_map_pool_write", value = stats.rows / dt,
  unit = "rows/s", rows = stats.rows, seconds = dt, peak_store_mib = stats.peak_store_bytes / 2^20,
  driver_peak_rss_mib = raw.maxrss() / 2^20, cpus = tide.cluster_resources().CPU}), "\n")
