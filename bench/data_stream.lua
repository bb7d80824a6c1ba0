-- tide bench data_stream_lines: streams MB megabytes of text lines through
-- read_lines -> map -> write_jsonl in this process (a driver of its own, so
-- its peak RSS is this run's alone) and prints one JSON line: rows/s, input
-- MB/s, the driver's peak RSS, the store's peak use and capacity.
--   tide run bench/data_stream.lua MB [DIR] [staged]
-- With "staged", a map_batches stage of its own (batches of 8192 rows,
-- about 0.7 MB each, so they live in the shared-memory store rather than
-- inline) sits between map and the write, so every row crosses the store.
-- The input is generated under DIR (default $TMPDIR) as files of 256 MB,
-- and removed afterwards with the output.
local tide = require("tide")
local data = require("tide.data")
local raw = require("tide.rawbench")
local cjson = require("cjson")

local MB = tonumber(arg[1] or "256")
local staged = arg[3] == "staged"
local base = (arg[2] ~= nil and arg[2] ~= "" and arg[2] or os.getenv("TMPDIR") or "/tmp") .. "/tide-data-stream-" .. raw.pid_self()
local src, dst = base .. "/in", base .. "/out"
assert(os.execute("mkdir -p '" .. src .. "' '" .. dst .. "'") == 0)
local rss0 = raw.maxrss()

-- Lines of about 80 bytes, like the Ray Data peer's, in 4 MiB chunks.
local t0 = raw.now()
local lines = {}
for i = 1, 50000 do
  lines[i] = string.format("Line %d: In the beginning God created the heaven and the earth.", i)
end
local chunk = table.concat(lines, "\n") .. "\n"
local total, file_bytes, k = MB * 1e6, 256e6, 0
local written = 0
while written < total do
  k = k + 1
  local f = assert(io.open(string.format("%s/part-%04d.txt", src, k), "wb"))
  local fb = 0
  while fb < file_bytes and written < total do
    f:write(chunk)
    fb, written = fb + #chunk, written + #chunk
  end
  f:close()
end
local gen_s = raw.now() - t0

local st0 = tide.stats()
t0 = raw.now()
local ds = data.read_lines(src)
  :map(function(row) return {text = row.text:upper(), line = row.line} end)
if staged then
  ds = ds:map_batches(function(b) return b end, {batch_size = 8192, fuse = false})
end
local stats = ds:write_jsonl(dst, {progress = false})
local dt = raw.now() - t0
local peak_rss = raw.maxrss()
local out_bytes = stats.bytes_written
os.execute("rm -rf '" .. base .. "'")

io.write(cjson.encode({
  metric = string.format("data_stream_lines_%s%dMB", staged and "staged_" or "", MB),
  value = stats.rows / dt, unit = "rows/s",
  input_bytes = written, input_mb_per_s = written / dt / 1e6, output_bytes = out_bytes,
  rows = stats.rows, seconds = dt, files_in = k, generate_s = gen_s,
  driver_peak_rss_mib = peak_rss / 2^20, driver_rss_before_run_mib = rss0 / 2^20,
  peak_store_mib = stats.peak_store_bytes / 2^20, store_capacity_mib = (st0.store_capacity or 0) / 2^20,
  peak_spilled_mib = stats.peak_spilled_bytes / 2^20,
  source_blocks = stats.stages[1].blocks, peak_in_flight = stats.stages[1].peak_in_flight,
  max_in_flight = stats.stages[1].max_in_flight,
}), "\n")
