-- Medians and new/old ratios of the JSON lines bench/ab_rows.sh kept:
--   bin/tide run bench/ab_summary.lua DIR
-- For memory rows (rss, memory) the ratio is old/new: above 1 is better,
-- as for every other row.
local cjson = require("cjson")
local dir = arg[1] or "/tmp/tide-ab"
local vals = {}
local p = io.popen("ls " .. dir .. "/old-*.json " .. dir .. "/new-*.json 2>/dev/null")
for f in p:lines() do
  local b = f:match("/(%a+)%-%d+%.json$")
  for line in io.lines(f) do
    local ok, rec = pcall(cjson.decode, line)
    if ok and type(rec) == "table" and type(rec.value) == "number" then
      vals[rec.metric] = vals[rec.metric] or {old = {}, new = {}}
      table.insert(vals[rec.metric][b], rec.value)
    end
  end
end
p:close()
local function median(t)
  table.sort(t)
  local n = #t
  return n % 2 == 1 and t[(n + 1) / 2] or (t[n / 2] + t[n / 2 + 1]) / 2
end
local names = {}
for k in pairs(vals) do names[#names + 1] = k end
table.sort(names)
for _, k in ipairs(names) do
  local o, n = vals[k].old, vals[k].new
  if #o > 0 and #n > 0 then
    local mo, mn = median(o), median(n)
    local r = (k:find("rss") or k:find("memory")) and mo / mn or mn / mo
    print(string.format("%-48s old %12.4g  new %12.4g  new/old %5.2f  (%d / %d runs)", k, mo, mn, r, #o, #n))
  end
end
