-- tide.nn.safetensors: read and write the safetensors checkpoint format
-- (https://github.com/huggingface/safetensors): an 8-byte little-endian
-- header length N, N bytes of JSON {"name": {"dtype", "shape",
-- "data_offsets": [begin, end]}, "__metadata__": {string: string}}, then the
-- raw little-endian tensor bytes (offsets relative to the end of the header).
local T = require("tide.tensor")
-- cjson writes 14 significant digits: byte offsets are exact below 1e14.
local cjson = require("cjson")

local byte, char, rep = string.byte, string.char, string.rep
local floor = math.floor
local open, pairs, ipairs, type, error, tostring = io.open, pairs, ipairs, type, error, tostring
local sort = table.sort

local M = {}

-- safetensors dtype names <-> tide dtypes
local TO_TIDE = {F32 = "f32", F16 = "f16", BF16 = "bf16", I32 = "i32", I64 = "i64", U8 = "u8"}
local FROM_TIDE = {}
for k, v in pairs(TO_TIDE) do FROM_TIDE[v] = k end

local function u64le(n)
  local b = {}
  for i = 1, 8 do
    b[i] = n % 256
    n = floor(n / 256)
  end
  return char(unpack(b))
end

local function read_u64le(s)
  local n = 0
  for i = 8, 1, -1 do n = n * 256 + byte(s, i) end
  return n
end

-- M.save(path, tensors, metadata): tensors is an array of {name, tensor}
-- (order kept in the data section) or a map name -> tensor; metadata a map
-- of strings.  Returns true or nil, err.
function M.save(path, tensors, metadata)
  local list = {}
  if tensors[1] then
    for _, e in ipairs(tensors) do list[#list + 1] = e end
  else
    for k, v in pairs(tensors) do list[#list + 1] = {k, v} end
    sort(list, function(a, b) return a[1] < b[1] end)
  end
  local header, off = {}, 0
  if metadata then
    local md = {}
    for k, v in pairs(metadata) do md[tostring(k)] = tostring(v) end
    header.__metadata__ = md
  end
  for _, e in ipairs(list) do
    local name, t = e[1], e[2]
    local dt = FROM_TIDE[t:dtype()]
    if not dt then error("safetensors.save: unsupported dtype " .. t:dtype(), 2) end
    local nbytes = t:nbytes()
    local shape = t:shape()
    -- cjson encodes {} as an object; a 0-d tensor's shape must be [].
    if #shape == 0 then shape = "__tide_empty_shape__" end
    header[name] = {dtype = dt, shape = shape, data_offsets = {off, off + nbytes}}
    off = off + nbytes
  end
  local json = cjson.encode(header):gsub('"__tide_empty_shape__"', "[]")
  json = json .. rep(" ", (8 - #json % 8) % 8) -- keep the data 8-byte aligned
  local f, err = open(path, "wb")
  if not f then return nil, err end
  f:write(u64le(#json), json)
  for _, e in ipairs(list) do f:write(e[2]:to_bytes()) end
  f:close()
  return true
end

-- M.read_header(path) -> header table, data start offset; or nil, err.
function M.read_header(path)
  local f, err = open(path, "rb")
  if not f then return nil, err end
  local len = f:read(8)
  if not len or #len < 8 then f:close(); return nil, path .. ": not a safetensors file" end
  local n = read_u64le(len)
  if n > 100 * 1024 * 1024 then f:close(); return nil, path .. ": header too large" end
  local json = f:read(n)
  f:close()
  if not json or #json < n then return nil, path .. ": truncated header" end
  local ok, header = pcall(cjson.decode, json)
  if not ok or type(header) ~= "table" then return nil, path .. ": bad header JSON" end
  return header, 8 + n
end

-- M.load(path [, {names = {...}}]) -> map name -> tensor (on the cpu, in the
-- stored dtype), metadata map.  Raises on a malformed file.
function M.load(path, opts)
  local header, base = M.read_header(path)
  if not header then error("safetensors.load: " .. tostring(base), 2) end
  local want
  if opts and opts.names then
    want = {}
    for _, n in ipairs(opts.names) do want[n] = true end
  end
  local out = {}
  for name, e in pairs(header) do
    if name ~= "__metadata__" and (not want or want[name]) then
      local dt = TO_TIDE[e.dtype]
      if not dt then error("safetensors.load: " .. name .. ": unsupported dtype " .. tostring(e.dtype), 2) end
      local o = e.data_offsets
      local t, err = T.from_file(path, base + o[1], e.shape, dt)
      if not t then error("safetensors.load: " .. err, 2) end
      if t:nbytes() ~= o[2] - o[1] then
        error("safetensors.load: " .. name .. ": data_offsets do not match shape", 2)
      end
      out[name] = t
    end
  end
  return out, header.__metadata__ or {}
end

return M
