-- The per-row cost of sending small row tables: core.encode / core.decode
-- (the engine's serializer, lua/ser.c) of a block of 100,000 rows, as
-- tide.put and tide.get pay it, and the same rows as a tide.data block
-- (W.pack, then encoded; decoded, then W.unpack).
-- Prints one line per case: µs a row to encode, to decode, and the bytes.
--   tide run bench/ser_rows.lua [ROWS] [REPEATS]
-- Each figure is the least CPU time (os.clock) of REPEATS runs (default
-- 5) in this process, so other work on the machine moves it least. To
-- compare two builds, run it with each build's own tide (its stdlib's
-- W.pack is the one measured).
local core = require("tide.core")
local W = require("tide.data.worker")

local N = tonumber(arg[1]) or 100000
local REPEATS = tonumber(arg[2]) or 5

local function make_idh()
  local rows = {}
  for i = 1, N do rows[i] = {id = i, h = (i * 31 + 7) % 1000003} end
  return rows
end

local function make_lines()
  local rows = {}
  for i = 1, N do
    rows[i] = {text = "line number " .. i .. " of a text file with some words in it",
      path = "/data/prompts/part-0001.txt", line = i}
  end
  return rows
end

-- The fastest of REPEATS timings of fn(), in µs a row.
local function best(fn)
  local b = math.huge
  for _ = 1, REPEATS do
    collectgarbage()
    local t0 = os.clock()
    fn()
    local dt = os.clock() - t0
    if dt < b then b = dt end
  end
  return b * 1e6 / N
end

local function case(name, rows)
  local s = core.encode(rows)
  local enc = best(function() s = core.encode(rows) end)
  local back
  local dec = best(function() back = core.decode(s) end)
  assert(#back == N and back[N].id == rows[N].id and back[N].line == rows[N].line, "round trip lost rows")
  io.write(string.format("%-22s encode %.3f us/row  decode %.3f us/row  %d bytes\n", name, enc, dec, #s))
  local p = core.encode(W.pack(rows))
  local penc = best(function() p = core.encode(W.pack(rows)) end)
  local pdec = best(function() back = W.unpack(core.decode(p)) end)
  assert(#back == N and back[N].id == rows[N].id and back[N].text == rows[N].text, "block round trip lost rows")
  io.write(string.format("%-22s encode %.3f us/row  decode %.3f us/row  %d bytes\n", name .. " block", penc, pdec,
    #p))
end

case("{id, h}", make_idh())
case("{text, path, line}", make_lines())
