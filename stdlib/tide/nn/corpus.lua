-- tide.nn.corpus: training text shipped by Debian packages, and random
-- (inputs, targets) batches drawn from it.
--
-- bible-kjv-text installs /usr/lib/bible.data: a header, a table of segment
-- offsets, then 64 KiB segments each compressed with compress(1)'s LZW
-- (16-bit codes, block mode, the 3-byte .Z header left out).  The decoder
-- below is a port of ncompress's decompress loop.
local T = require("tide.tensor")

local byte, char, concat, sub = string.byte, string.char, table.concat, string.sub
local floor, min = math.floor, math.min
local open, error, unpack = io.open, error, unpack
local bit = require("bit")
local band, lshift, rshift, bor = bit.band, bit.lshift, bit.rshift, bit.bor

local M = {}

M.KJV_PATH = os.getenv("TIDE_KJV_PATH") or "/usr/lib/bible.data"

local function u32be(s, pos)
  local a, b, c, d = byte(s, pos, pos + 3)
  return ((a * 256 + b) * 256 + c) * 256 + d
end

-- Decodes one headerless LZW stream (maxbits 16, block mode) in s[first..last].
local function lzw_decode(s, first, last)
  local INIT, MAXBITS, CLEAR = 9, 16, 256
  local maxmax = lshift(1, MAXBITS)
  local prefix, suffix = {}, {}
  local out, parts, stack = {}, {}, {}
  local n_bits, maxcode, free_ent = INIT, lshift(1, INIT) - 1, 257
  local total_bits = (last - first + 1) * 8
  local pos, base = 0, 0 -- bit position; start of the current code group
  local oldcode, finchar = -1, 0
  local function align()
    local g = n_bits * 8
    local rel = pos - base
    if rel > 0 then pos = base + floor((rel + g - 1) / g) * g end
    base = pos
  end
  local function flush()
    for i = 1, #out, 4000 do parts[#parts + 1] = char(unpack(out, i, min(i + 3999, #out))) end
    out = {}
  end
  while true do
    if free_ent > maxcode then
      align()
      n_bits = n_bits + 1
      maxcode = n_bits == MAXBITS and maxmax or lshift(1, n_bits) - 1
    end
    if pos + n_bits > total_bits then break end
    -- read n_bits at pos, least significant bit first
    local bpos = first + rshift(pos, 3)
    local b0, b1, b2 = byte(s, bpos, bpos + 2)
    local w = bor(b0 or 0, lshift(b1 or 0, 8), lshift(b2 or 0, 16))
    local code = band(rshift(w, band(pos, 7)), lshift(1, n_bits) - 1)
    pos = pos + n_bits
    if oldcode == -1 then
      if code >= 256 then error("corpus: corrupt LZW stream") end
      oldcode, finchar = code, code
      out[#out + 1] = code
    elseif code == CLEAR then
      prefix, suffix = {}, {}
      free_ent = 256
      align()
      n_bits, maxcode = INIT, lshift(1, INIT) - 1
    else
      local incode, sp = code, 0
      if code >= free_ent then
        if code > free_ent then error("corpus: corrupt LZW stream") end
        sp = sp + 1; stack[sp] = finchar
        code = oldcode
      end
      while code >= 256 do
        sp = sp + 1; stack[sp] = suffix[code]
        code = prefix[code]
      end
      finchar = code
      sp = sp + 1; stack[sp] = code
      for i = sp, 1, -1 do out[#out + 1] = stack[i] end
      if #out >= 8192 then flush() end
      if free_ent < maxmax then
        prefix[free_ent], suffix[free_ent] = oldcode, finchar
        free_ent = free_ent + 1
      end
      oldcode = incode
    end
  end
  if #out > 0 then flush() end
  return concat(parts)
end
M._lzw_decode = lzw_decode

-- M.bible_kjv([{max_bytes = n, path = M.KJV_PATH, raw = false}]) -> text.
-- Verse references ("Ge1:1 ") are stripped unless raw.  Returns nil, err
-- when the package is not installed.
function M.bible_kjv(opts)
  opts = opts or {}
  local f, err = open(opts.path or M.KJV_PATH, "rb")
  if not f then return nil, "bible-kjv-text is not installed (" .. tostring(err) .. ")" end
  local s = f:read("*a")
  f:close()
  if sub(s, 1, 4) ~= "EC02" then return nil, "unknown bible.data format" end
  local nseg = u32be(s, 0x59)
  local parts, have = {}, 0
  local max_bytes = opts.max_bytes or math.huge
  for i = 0, nseg - 1 do
    local a, b = u32be(s, 0x5d + 4 * i), u32be(s, 0x5d + 4 * (i + 1))
    local seg = lzw_decode(s, a + 1, b)
    parts[#parts + 1] = seg
    have = have + #seg
    if have >= max_bytes then break end
  end
  local text = concat(parts)
  if not opts.raw then
    text = text:gsub("\n[%w]+%d+:%d+ ", "\n")
    text = text:gsub("^[^\n]*\n", "") -- the title line
  end
  if #text > max_bytes then text = sub(text, 1, max_bytes) end
  return text
end

-- M.read_text(path) -> contents of a plain text file, or nil, err.
function M.read_text(path)
  local f, err = open(path, "rb")
  if not f then return nil, err end
  local s = f:read("*a")
  f:close()
  return s
end

-- M.batcher(text, B, T, seed) -> function(step) returning inputs, targets:
-- (B,T) i32 tensors of byte ids, targets shifted by one.  Offsets are
-- drawn deterministically from (seed, step).
function M.batcher(text, B, Tn, seed)
  if #text < Tn + 2 then error("corpus.batcher: text shorter than the context", 2) end
  return function(step)
    local offs = T.rand({B}, {seed = (seed or 0) * 1000003 + step}):to_table()
    local rows = {}
    for b = 1, B do
      local o = floor(offs[b] * (#text - Tn - 1)) + 1
      rows[b] = sub(text, o, o + Tn)
    end
    local all = T.from_bytes(concat(rows), {B, Tn + 1}, "u8"):to("i32")
    return all:slice(2, 1, Tn):contiguous(), all:slice(2, 2, Tn + 1):contiguous()
  end
end

-- M.split(text, frac) -> train, validation (the last frac of the text).
function M.split(text, frac)
  local n = floor(#text * (1 - (frac or 0.1)))
  return sub(text, 1, n), sub(text, n + 1)
end

return M
