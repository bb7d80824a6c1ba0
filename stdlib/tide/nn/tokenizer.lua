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

return M
