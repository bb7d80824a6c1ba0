-- wrk reporting hook: one machine-readable line at the end (latencies in
-- wrk are microseconds). Same fields as ../shared/peers/nginx_lua/wrk_report.lua.
--   WRKJSON {"requests":..,"rps":..,"p50_ms":..,"p99_ms":..,...}
-- With WRK_BODY set, every request is a POST of that JSON body.
if os.getenv("WRK_BODY") then
  wrk.method = "POST"
  wrk.headers["Content-Type"] = "application/json"
  wrk.body = os.getenv("WRK_BODY")
end

function done(summary, latency, requests)
  local secs = summary.duration / 1e6
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests":%d,"duration_s":%.3f,"rps":%.1f,' ..
    '"p50_ms":%.3f,"p90_ms":%.3f,"p99_ms":%.3f,"max_ms":%.3f,"mean_ms":%.3f,' ..
    '"err_connect":%d,"err_read":%d,"err_write":%d,"err_status":%d,"err_timeout":%d}\n',
    summary.requests, secs, summary.requests / secs,
    latency:percentile(50) / 1000, latency:percentile(90) / 1000,
    latency:percentile(99) / 1000, latency.max / 1000, latency.mean / 1000,
    e.connect, e.read, e.write, e.status, e.timeout))
end
