-- tide.metrics: counters, gauges and histograms with labels that user code
-- adds to what the head's /metrics exports (Prometheus text format).
--
--   local m = tide.metrics
--   local reqs = m.counter("app_requests_total", {help = "Requests served."})
--   reqs:inc(1, {route = "/a"})
--   local depth = m.gauge("app_queue_depth")
--   depth:set(12)
--   local lat = m.histogram("app_latency_seconds", {buckets = {0.01, 0.1, 1}})
--   lat:observe(0.042, {route = "/a"})
--
-- In a task, an actor or a driver attached to a node (--address), each
-- update goes to the node (one request, answered before the call returns;
-- a node that is not the head keeps its own: the dashboard shows the
-- head's). In a driver with an embedded cluster (tide run) the values stay
-- in the process: tide.metrics.text() renders them.
--
-- tide.train and tide.data publish their own tide_train_* / tide_data_*
-- gauges through M._publish (many in one request); the head keeps a
-- history of those (M._history, served at /api/series by tide.obs).
local format, concat, type, tostring, tonumber = string.format, table.concat, type, tostring, tonumber

local M = {}

local NAME = "^[%a_:][%w_:]*$"
local LABEL = "^[%a_][%w_]*$"
local DEFAULT_BUCKETS = {0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10}

-- -- A store of series, and its Prometheus text (also used by the head) ---------

local function escape(v)
  return (tostring(v):gsub("\\", "\\\\"):gsub('"', '\\"'):gsub("\n", "\\n"))
end

local function labelkey(labels)
  local ks = {}
  for k in pairs(labels) do ks[#ks + 1] = k end
  table.sort(ks)
  local parts = {}
  for i, k in ipairs(ks) do parts[i] = format('%s="%s"', k, escape(labels[k])) end
  return concat(parts, ",")
end

local function num(v)
  if v == math.huge then return "+Inf" end
  if v == -math.huge then return "-Inf" end
  if v ~= v then return "NaN" end
  if v == math.floor(v) and math.abs(v) < 1e15 then return format("%d", v) end
  local short = format("%.15g", v)
  return tonumber(short) == v and short or format("%.17g", v)
end

function M._store()
  local S = {metrics = {}, order = {}}
  -- put(kind, name, help, labels, op, value, buckets): op "inc" adds, "set"
  -- sets, "observe" records one value in a histogram.
  function S.put(kind, name, help, labels, op, value, buckets)
    local m = S.metrics[name]
    if not m then
      m = {kind = kind, help = help or "", series = {}, buckets = buckets}
      S.metrics[name] = m
      S.order[#S.order + 1] = name
    elseif m.kind ~= kind then
      error(format("metric %s is a %s already, not a %s", name, m.kind, kind), 0)
    end
    local key = labelkey(labels or {})
    local s = m.series[key]
    if not s then
      s = {value = 0, count = 0, sum = 0, b = {}}
      m.series[key] = s
    end
    value = tonumber(value) or 0
    if op == "inc" then
      s.value = s.value + value
    elseif op == "set" then
      s.value = value
    elseif op == "observe" then
      s.count, s.sum = s.count + 1, s.sum + value
      for i, le in ipairs(m.buckets or DEFAULT_BUCKETS) do
        if value <= le then s.b[i] = (s.b[i] or 0) + 1 end
      end
    end
    return true, s, key
  end
  -- drop(name, key): forgets one series (key as put returns it), and the
  -- metric with its last series.
  function S.drop(name, key)
    local m = S.metrics[name]
    if not m or not m.series[key] then return end
    m.series[key] = nil
    if next(m.series) == nil then
      S.metrics[name] = nil
      for i, n in ipairs(S.order) do
        if n == name then table.remove(S.order, i); break end
      end
    end
  end
  function S.text()
    local out = {}
    for _, name in ipairs(S.order) do
      local m = S.metrics[name]
      out[#out + 1] = format("# HELP %s %s\n# TYPE %s %s\n", name,
        ((m.help ~= "" and m.help or name):gsub("\\", "\\\\"):gsub("\n", " ")), name, m.kind)
      local keys = {}
      for k in pairs(m.series) do keys[#keys + 1] = k end
      table.sort(keys)
      for _, k in ipairs(keys) do
        local s = m.series[k]
        local lb = k ~= "" and ("{" .. k .. "}") or ""
        if m.kind == "histogram" then
          local pre = k ~= "" and (k .. ",") or ""
          for i, le in ipairs(m.buckets or DEFAULT_BUCKETS) do
            out[#out + 1] = format('%s_bucket{%sle="%s"} %d\n', name, pre, num(le), s.b[i] or 0)
          end
          out[#out + 1] = format('%s_bucket{%sle="+Inf"} %d\n', name, pre, s.count)
          out[#out + 1] = format("%s_sum%s %s\n%s_count%s %d\n", name, lb, num(s.sum), name, lb, s.count)
        else
          out[#out + 1] = format("%s%s %s\n", name, lb, num(s.value))
        end
      end
    end
    return concat(out)
  end
  return S
end

-- -- History of the engine's own series (the head's training and data pages) ----

local wall -- seconds since the epoch, to the microsecond
local function wall_clock()
  if not wall then
    local ffi = require("ffi")
    pcall(ffi.cdef, "typedef struct { long tv_sec; long tv_nsec; } tide_metrics_timespec;")
    -- Other modules declare clock_gettime with their own struct type (the
    -- first declaration wins): a void * converts to whichever it is.
    pcall(ffi.cdef, "int clock_gettime(int clk, void *ts);")
    local ts = ffi.new("tide_metrics_timespec")
    local p = ffi.cast("void *", ts)
    wall = function()
      ffi.C.clock_gettime(0, p) -- CLOCK_REALTIME
      return tonumber(ts.tv_sec) + tonumber(ts.tv_nsec) * 1e-9
    end
  end
  return wall()
end

-- _history(store, opts) -> H: puts into store (H.put, the arguments of
-- store.put; H.op, the node's metrics_put: one put, or a list of them in
-- one request) and keeps, for the gauges and counters whose names start
-- with one of opts.prefixes, the last opts.max_points (time, value) points
-- of each series. At most opts.max_series such series are kept: a new one
-- past that drops the one updated least recently, from the store too.
-- H.series(prefix, points) -> {{name, labels, points = {{t, v}, ...}}, ...}
-- (the last `points` of each, all when nil), sorted by name and labels.
function M._history(store, opts)
  opts = opts or {}
  local prefixes = opts.prefixes or {"tide_train_", "tide_data_"}
  local max_series, max_points = opts.max_series or 400, opts.max_points or 600
  local clock = opts.clock or wall_clock
  local H = {}
  local by_id, count = {}, 0

  local function tracked(name)
    for _, p in ipairs(prefixes) do
      if name:sub(1, #p) == p then return true end
    end
    return false
  end

  local function evict()
    local old_id, old
    for id, h in pairs(by_id) do
      if not old or h.last < old.last then old_id, old = id, h end
    end
    if not old then return end
    by_id[old_id] = nil
    count = count - 1
    store.drop(old.name, old.key)
  end

  function H.put(kind, name, help, labels, op, value, buckets)
    local _, s, key = store.put(kind, name, help, labels, op, value, buckets)
    if kind == "histogram" or type(name) ~= "string" or not tracked(name) then return true end
    local id = name .. "{" .. key .. "}"
    local h = by_id[id]
    if not h then
      if count >= max_series then evict() end
      local l = {}
      for k, v in pairs(labels or {}) do l[k] = tostring(v) end
      h = {name = name, key = key, labels = l, t = {}, v = {}, n = 0, pos = 0}
      by_id[id] = h
      count = count + 1
    end
    local t = clock()
    h.pos = h.pos % max_points + 1
    h.t[h.pos], h.v[h.pos] = t, s.value
    if h.n < max_points then h.n = h.n + 1 end
    h.last = t
    return true
  end

  function H.op(first, ...)
    if type(first) ~= "table" then return H.put(first, ...) end
    for _, p in ipairs(first) do H.put(p[1], p[2], p[3], p[4], p[5], p[6], p[7]) end
    return true
  end

  function H.series(prefix, points)
    prefix = prefix or ""
    local ids = {}
    for id, h in pairs(by_id) do
      if h.name:sub(1, #prefix) == prefix then ids[#ids + 1] = id end
    end
    table.sort(ids)
    local out = {}
    for i, id in ipairs(ids) do
      local h = by_id[id]
      local n = points and math.min(points, h.n) or h.n
      local pts = {}
      for j = 1, n do
        local k = (h.pos - n + j - 1) % max_points + 1
        pts[j] = {h.t[k], h.v[k]}
      end
      out[i] = {name = h.name, labels = h.labels, points = pts}
    end
    return out
  end

  function H.limits() return max_series, max_points end
  function H.now() return clock() end
  return H
end

-- -- The user's side ----------------------------------------------------------------

local local_store -- an embedded driver's (no node to send to)
local names = {}  -- name -> kind, made in this process

local function send(kind, name, help, labels, op, value, buckets)
  local core = require("tide.core")
  if core.call_node then
    core.call_node("metrics_put", kind, name, help, labels, op, value, buckets)
  else
    local_store = local_store or M._store()
    local_store.put(kind, name, help, labels, op, value, buckets)
  end
end

-- _publish(puts): the engine's own series (tide.train's and tide.data's),
-- many in one request: puts = {{kind, name, help, labels, op, value}, ...},
-- labels already strings. Sent like a user's update (kept in the process
-- in an embedded driver). False when nothing was sent; a node that serves
-- no metrics (a worker of an embedded cluster) is not asked again.
local publish_off, local_bound
function M._publish(puts)
  if publish_off or #puts == 0 then return false end
  local core = require("tide.core")
  if not core.call_node then
    -- Kept here: as many series as a head keeps (a driver that runs a
    -- pipeline per epoch does not grow without end), without their history.
    local_store = local_store or M._store()
    local_bound = local_bound or M._history(local_store, {max_points = 1})
    local_bound.op(puts)
    return true
  end
  local ok, err = pcall(core.call_node, "metrics_put", puts)
  if not ok and tostring(err):find("not served", 1, true) then publish_off = true end
  return ok
end

local function check_labels(labels, kind, level)
  if labels == nil then return {} end
  if type(labels) ~= "table" then error("tide.metrics: labels must be a table of name = value", level) end
  local out = {}
  for k, v in pairs(labels) do
    if type(k) ~= "string" or not k:match(LABEL) or k:sub(1, 2) == "__" then
      error(format("tide.metrics: label name %s is not valid (letters, digits, _; not starting with __)",
        tostring(k)), level)
    end
    if kind == "histogram" and k == "le" then error("tide.metrics: a histogram cannot have a label named le", level) end
    if type(v) ~= "string" and type(v) ~= "number" and type(v) ~= "boolean" then
      error(format("tide.metrics: label %s must be a string or number, not %s", k, type(v)), level)
    end
    out[k] = tostring(v)
  end
  return out
end

local Metric = {}
Metric.__index = Metric

local function new(kind, name, opts, level)
  if type(name) ~= "string" or not name:match(NAME) then
    error(format("tide.metrics.%s: the name %s is not a valid metric name ([a-zA-Z_:][a-zA-Z0-9_:]*)", kind,
      tostring(name)), level)
  end
  if name:match("^tide_") or name:match("^process_") then
    error(format("tide.metrics.%s: the names tide_* and process_* are the engine's", kind), level)
  end
  if opts ~= nil and type(opts) ~= "table" then
    error(format("tide.metrics.%s: options must be a table", kind), level)
  end
  opts = opts or {}
  if names[name] and names[name] ~= kind then
    error(format("tide.metrics.%s: %s is a %s already", kind, name, names[name]), level)
  end
  local buckets
  if kind == "histogram" then
    buckets = opts.buckets or DEFAULT_BUCKETS
    if type(buckets) ~= "table" or #buckets == 0 then
      error("tide.metrics.histogram: buckets must be a list of increasing numbers", level)
    end
    for i, b in ipairs(buckets) do
      if type(b) ~= "number" or b ~= b or (i > 1 and b <= buckets[i - 1]) then
        error("tide.metrics.histogram: buckets must be a list of increasing numbers", level)
      end
    end
  end
  names[name] = kind
  return setmetatable({kind = kind, name = name, help = tostring(opts.help or ""), buckets = buckets,
    labels = check_labels(opts.labels, kind, level + 1)}, Metric)
end

local function merged(self, labels)
  local l = check_labels(labels, self.kind, 4)
  for k, v in pairs(self.labels) do if l[k] == nil then l[k] = v end end
  return l
end

local function checknum(v, what)
  if type(v) ~= "number" or v ~= v then error(format("tide.metrics: %s needs a number, got %s", what, type(v)), 3) end
end

function Metric:inc(by, labels)
  if getmetatable(self) ~= Metric then error("tide.metrics: write metric:inc(...) with a colon", 2) end
  if self.kind == "histogram" then error("tide.metrics: a histogram is observed, not incremented", 2) end
  by = by == nil and 1 or by
  checknum(by, "inc")
  if self.kind == "counter" and by < 0 then error("tide.metrics: a counter only goes up (inc by 0 or more)", 2) end
  send(self.kind, self.name, self.help, merged(self, labels), "inc", by)
end

function Metric:dec(by, labels)
  if getmetatable(self) ~= Metric then error("tide.metrics: write metric:dec(...) with a colon", 2) end
  if self.kind ~= "gauge" then error("tide.metrics: only a gauge goes down", 2) end
  by = by == nil and 1 or by
  checknum(by, "dec")
  send(self.kind, self.name, self.help, merged(self, labels), "inc", -by)
end

function Metric:set(v, labels)
  if getmetatable(self) ~= Metric then error("tide.metrics: write metric:set(...) with a colon", 2) end
  if self.kind ~= "gauge" then error("tide.metrics: only a gauge is set", 2) end
  checknum(v, "set")
  send(self.kind, self.name, self.help, merged(self, labels), "set", v)
end

function Metric:observe(v, labels)
  if getmetatable(self) ~= Metric then error("tide.metrics: write metric:observe(...) with a colon", 2) end
  if self.kind ~= "histogram" then error("tide.metrics: only a histogram is observed", 2) end
  checknum(v, "observe")
  send(self.kind, self.name, self.help, merged(self, labels), "observe", v, self.buckets)
end

function M.counter(name, opts) return new("counter", name, opts, 3) end
function M.gauge(name, opts) return new("gauge", name, opts, 3) end
function M.histogram(name, opts) return new("histogram", name, opts, 3) end

-- The values this process keeps (an embedded driver's), as Prometheus text.
function M.text() return local_store and local_store.text() or "" end

return M
