-- tide.progress: progress bars that never spam.
--   local bar = tide.progress(total, {desc = "rows"})
--   for i = 1, total do ...; bar:update() end
--   bar:close()
-- On a terminal (stderr) every open bar is one line, redrawn in place (at
-- most 10 times a second), stacked one under another, with whatever is
-- printed meanwhile (the driver's print, the prints of its tasks) written
-- above them whole. Not on a terminal (a pipe, a log file) it writes at
-- most one plain line every TIDE_PROGRESS_INTERVAL seconds (5) for all
-- bars together, and a last line for each bar that ran that long. In a task
-- or actor the plain lines go through print (to the driver). TIDE_PROGRESS=0
-- turns every bar off: nothing is written.
local core = require("tide.core")

local format, concat, floor, min = string.format, table.concat, math.floor, math.min
local type, tostring, select, setmetatable, getenv = type, tostring, select, setmetatable, os.getenv
local now = core.now

local M = {}

local Bar = {}
Bar.__index = Bar

-- Shared by every bar of this process: one terminal area, one clock for
-- the plain lines.
local open = {}          -- bars open, in the order they were made
local mode               -- "off", "tty" or "lines": decided with the first bar
local last_line = -1e9   -- when the last plain line was written
local last_draw = -1e9   -- when the area was last drawn
local REDRAW = 0.1
local orig_print         -- the driver's print, while bars take it over

local function default_interval()
  local v = tonumber(getenv("TIDE_PROGRESS_INTERVAL") or "")
  return v and v >= 0 and v or 5
end

-- Seconds between plain lines: the shortest any open bar asks for.
local function interval(b)
  if b then return b.interval or default_interval() end
  local v
  for _, o in ipairs(open) do
    local i = o.interval or default_interval()
    if not v or i < v then v = i end
  end
  return v or default_interval()
end

local function is_driver()
  local ok, ctx = pcall(core.context)
  return not ok or ctx.worker_id == "driver"
end

local function stderr_tty()
  local ok, ffi = pcall(require, "ffi")
  if not ok then return false end
  pcall(ffi.cdef, "int isatty(int fd);")
  local ok2, r = pcall(function() return ffi.C.isatty(2) end)
  return ok2 and r == 1
end

local function decide_mode()
  local v = getenv("TIDE_PROGRESS")
  if v == "0" or v == "off" then return "off" end
  if not is_driver() then return "lines" end
  if v == "plain" then return "lines" end
  return stderr_tty() and "tty" or "lines"
end

local function width()
  local c = tonumber(getenv("COLUMNS") or "")
  return c and c >= 20 and c or 80
end

-- The first n bytes of s, never ending inside a UTF-8 character.
local function cut(s, n)
  if #s <= n then return s end
  s = s:sub(1, n)
  local i = #s
  while i > 0 and s:byte(i) >= 0x80 and s:byte(i) < 0xC0 do i = i - 1 end
  if i > 0 then
    local b = s:byte(i)
    local want = b >= 0xF0 and 4 or b >= 0xE0 and 3 or b >= 0xC0 and 2 or 1
    if #s - i + 1 < want then s = s:sub(1, i - 1) end
  end
  return s
end

local function hms(s)
  if s ~= s or s == math.huge or s < 0 then return "?" end
  s = floor(s + 0.5)
  if s >= 3600 then return format("%d:%02d:%02d", floor(s / 3600), floor(s / 60) % 60, s % 60) end
  return format("%d:%02d", floor(s / 60), s % 60)
end

local function num(x)
  if x == floor(x) and x < 1e15 then return format("%d", x) end
  return format("%.1f", x)
end

local function rate_str(r, unit)
  if r ~= r then return format("? %s/s", unit) end
  if r >= 100 then return format("%d %s/s", floor(r + 0.5), unit) end
  return format("%.2f %s/s", r, unit)
end

-- One line: "desc  45% |#####     | 450/1000 [12.3 it/s, ETA 0:44] postfix".
function Bar:line(w, t)
  if self.text then
    local s = (self.desc ~= "" and (self.desc .. ": ") or "") .. self.text
    return w and cut(s, w - 1) or s
  end
  t = t or now()
  local el = t - self.t0
  -- A rate over less than a fifth of a second says little: "?".
  local r = el >= 0.2 and self.count / el or 0 / 0
  local head = self.desc ~= "" and (self.desc .. ": ") or ""
  local tail
  if self.total and self.total > 0 then
    local frac = min(1, self.count / self.total)
    local eta = self.closed and format("in %s", hms(el))
      or ("ETA " .. (r > 0 and hms((self.total - self.count) / r) or "?"))
    tail = format("%s/%s [%s, %s]", num(self.count), num(self.total), rate_str(r, self.unit), eta)
    local pct = format("%3d%% ", floor(frac * 100))
    if w then
      local room = w - 1 - #head - #pct - #tail - 3 - (self.postfix and #self.postfix + 1 or 0)
      if room >= 5 then
        local k = floor(frac * min(room, 40))
        pct = pct .. "|" .. string.rep("#", k) .. string.rep(" ", min(room, 40) - k) .. "| "
      end
    end
    head = head .. pct
  else
    tail = format("%s %s [%s, %s]", num(self.count), self.unit, rate_str(r, self.unit), hms(el))
  end
  local s = head .. tail .. (self.postfix and (" " .. self.postfix) or "")
  if w then s = cut(s, w - 1) end
  return s
end

local function print_above(...)
  local n = select("#", ...)
  local parts = {}
  for i = 1, n do parts[i] = tostring((select(i, ...))) end
  core.term_print(concat(parts, "\t") .. "\n")
end

local function draw(force)
  local t = now()
  if not force and t - last_draw < REDRAW then return end
  last_draw = t
  local w, lines = width(), {}
  for i, b in ipairs(open) do lines[i] = b:line(w, t) end
  core.term_area(concat(lines, "\n"))
end

local function emit(s)
  if is_driver() then
    io.stderr:write(s, "\n")
    io.stderr:flush()
  else
    print(s)
  end
end

-- Not a terminal: one line for every open bar together, at most once per
-- interval (forced: a bar that closes after running that long).
local function plain(force_bar)
  local t = now()
  if force_bar then
    emit(force_bar:line(nil, t))
    last_line = t
    return
  end
  if t - last_line < interval() or #open == 0 then return end
  last_line = t
  local parts = {}
  for i, b in ipairs(open) do
    parts[i], b.shown = b:line(nil, t), b.count
  end
  emit(concat(parts, " | "))
end

-- Updates the screen after bar b changed.
local function changed(force)
  if mode == "tty" then draw(force) elseif mode == "lines" then plain() end
end

function Bar:update(n)
  if n ~= nil and type(n) ~= "number" then error("progress:update: n must be a number, got " .. type(n), 2) end
  if self.closed then return self end
  self.count = self.count + (n or 1)
  if mode ~= "off" then changed(false) end
  return self
end

function Bar:set(count)
  if type(count) ~= "number" then error("progress:set: count must be a number, got " .. type(count), 2) end
  if self.closed then return self end
  self.count = count
  if mode ~= "off" then changed(false) end
  return self
end

function Bar:set_total(total)
  if total ~= nil and (type(total) ~= "number" or total < 0) then
    error("progress:set_total: total must be a non-negative number or nil", 2)
  end
  self.total = total
  return self
end

-- Extra text after the figures (a loss, a stage's rows in flight).
function Bar:set_postfix(s)
  self.postfix = s ~= nil and tostring(s) or nil
  return self
end

-- A line of text in place of the figures (a status that is no count),
-- shown as the bar would be; nil: the figures again.
function Bar:set_text(s)
  self.text = s ~= nil and tostring(s) or nil
  if self.closed or mode == "off" then return self end
  changed(false)
  return self
end

-- Ends the bar: on a terminal its last state stays on the screen above the
-- bars still open; in plain lines, a bar that ran at least an interval
-- gets a last line (none when the last plain line already showed its
-- count: a finished bar is not written twice).
function Bar:close()
  if self.closed then return self end
  self.closed = true
  for i, b in ipairs(open) do
    if b == self then table.remove(open, i) break end
  end
  if mode == "tty" then
    core.term_commit(self:line(width()) .. "\n")
    draw(true)
    if #open == 0 and orig_print then
      _G.print, orig_print = orig_print, nil
    end
  elseif mode == "lines" and now() - self.t0 >= interval(self) and self.shown ~= self.count then
    plain(self)  -- a last line, unless the last periodic one showed this count
  end
  return self
end

-- tide.progress(total, opts) -> bar. total: a count, or nil when unknown
-- (no percentage or ETA). opts: desc (a label), unit ("it"), interval
-- (seconds between plain lines while this bar is open; TIDE_PROGRESS_INTERVAL
-- or 5).
function M.new(total, opts)
  if total ~= nil and (type(total) ~= "number" or total < 0 or total ~= total) then
    error("tide.progress: total must be a non-negative number or nil, got " .. tostring(total), 2)
  end
  if opts ~= nil and type(opts) ~= "table" then
    error("tide.progress: options must be a table, got " .. type(opts), 2)
  end
  opts = opts or {}
  for k in pairs(opts) do
    if k ~= "desc" and k ~= "unit" and k ~= "interval" then
      error(format("tide.progress: unknown option '%s'", tostring(k)), 2)
    end
  end
  if opts.interval ~= nil and (type(opts.interval) ~= "number" or opts.interval < 0) then
    error("tide.progress: interval must be a non-negative number of seconds", 2)
  end
  if opts.desc ~= nil and type(opts.desc) ~= "string" then error("tide.progress: desc must be a string", 2) end
  if opts.unit ~= nil and type(opts.unit) ~= "string" then error("tide.progress: unit must be a string", 2) end
  if not mode or #open == 0 then mode = decide_mode() end
  local b = setmetatable({total = total, count = 0, desc = opts.desc or "", unit = opts.unit or "it",
    interval = opts.interval, t0 = now()}, Bar)
  if mode == "off" then return b end
  open[#open + 1] = b
  if mode == "tty" then
    -- The driver's prints go above the bars while any is open.
    if not orig_print then
      orig_print = _G.print
      _G.print = print_above
    end
    draw(true)
  end
  return b
end

-- The mode bars take in this process now: "tty", "lines" or "off".
function M.mode() return #open > 0 and mode or decide_mode() end

return M
