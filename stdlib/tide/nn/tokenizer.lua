-- tide.nn.tokenizer: a byte-level tokenizer (vocabulary of the 256 byte
-- values; no files, no downloads).  Ids are 0-based, as in every tokenizer.
local T = require("tide.tensor")

local byte, char, concat = string.byte, string.char, table.concat
local type, error = type, error

local M = {}

local Byte = {}
Byte.__index = Byte

-- M.byte_level() -> tokenizer with vocab_size = 256.
function M.byte_level()
  return setmetatable({vocab_size = 256, name = "byte"}, Byte)
end

-- tok:encode(s) -> array of ids (one per byte).
function Byte.encode(_, s)
  if type(s) ~= "string" then error("tokenizer.encode: expected a string", 2) end
  local ids = {}
  for i = 1, #s do ids[i] = byte(s, i) end
  return ids
end

-- tok:encode_tensor(s) -> i32 tensor {#s} of ids (fast path, in C).
function Byte.encode_tensor(_, s)
  if type(s) ~= "string" then error("tokenizer.encode_tensor: expected a string", 2) end
  return T.from_bytes(s, {#s}, "u8"):to("i32")
end

-- tok:decode(ids) -> string; ids is an array of numbers or an i32 tensor.
-- Ids outside 0..255 raise.
function Byte.decode(_, ids)
  if T.is_tensor(ids) then ids = ids:view({-1}):to_table() end
  local parts, chunk = {}, {}
  for i = 1, #ids do
    local id = ids[i]
    if id < 0 or id > 255 then error("tokenizer.decode: id " .. id .. " out of range", 2) end
    chunk[#chunk + 1] = id
    if #chunk == 4096 then
      parts[#parts + 1] = char(unpack(chunk))
      chunk = {}
    end
  end
  if #chunk > 0 then parts[#parts + 1] = char(unpack(chunk)) end
  return concat(parts)
end

-- M.utf8_split(bytes, final) -> text to send now, bytes to keep, for
-- streaming decoded tokens: a character outside ASCII takes several byte
-- tokens, and an untrained model makes byte sequences that are not UTF-8
-- at all.  The text holds whole characters only: an incomplete one is kept
-- for the next token (or, when final, replaced), and bytes that cannot be
-- UTF-8 are replaced by U+FFFD, so every chunk a client gets is valid UTF-8.
local REPLACEMENT = "\239\191\189"
function M.utf8_split(s, final)
  local out, i, n = {}, 1, #s
  while i <= n do
    local c = s:byte(i)
    local len, lo, hi = 0, 0x80, 0xBF
    if c < 0x80 then len = 1
    elseif c >= 0xC2 and c <= 0xDF then len = 2
    elseif c >= 0xE0 and c <= 0xEF then
      len = 3
      if c == 0xE0 then lo = 0xA0 elseif c == 0xED then hi = 0x9F end  -- no overlongs, no surrogates
    elseif c >= 0xF0 and c <= 0xF4 then
      len = 4
      if c == 0xF0 then lo = 0x90 elseif c == 0xF4 then hi = 0x8F end  -- up to U+10FFFF
    end
    local j, bad = 1, len == 0
    while not bad and j < len and i + j <= n do
      local b = s:byte(i + j)
      if b < (j == 1 and lo or 0x80) or b > (j == 1 and hi or 0xBF) then bad = true else j = j + 1 end
    end
    if bad then
      out[#out + 1] = REPLACEMENT
      i = i + 1
    elseif j < len then           -- the character's last bytes are still to come
      if not final then return concat(out), s:sub(i) end
      out[#out + 1] = REPLACEMENT
      i = n + 1
    else
      out[#out + 1] = s:sub(i, i + len - 1)
      i = i + len
    end
  end
  return concat(out), ""
end

return M
