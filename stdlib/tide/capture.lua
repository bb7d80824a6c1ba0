-- tide.capture: turns a Lua function into a sendable descriptor and back.
-- Free names are captured by value when the function is sent, the way
-- cloudpickle does it: upvalues, and globals the function reads that are
-- not standard builtins. Modules loaded with `require` travel by name and
-- are required again on the worker; standard C functions travel by name.
local M = {}

local jutil = require("jit.util")
local bit = require("bit")
local funcbc, funck, funcinfo = jutil.funcbc, jutil.funck, jutil.funcinfo
local band, rshift = bit.band, bit.rshift
local getupvalue, setupvalue = debug.getupvalue, debug.setupvalue
local getmetatable = getmetatable
local type, pairs, rawget, setmetatable, getfenv, setfenv = type, pairs, rawget, setmetatable, getfenv, setfenv
local loadstring, dump = loadstring, string.dump

-- Standard globals are never captured: every Lua state has them.
local BUILTIN = {}
for name in ([[_G _VERSION assert collectgarbage dofile error gcinfo getfenv getmetatable
  ipairs load loadfile loadstring module newproxy next pairs pcall print rawequal rawget
  rawlen rawset require select setfenv setmetatable tonumber tostring type unpack xpcall
  coroutine debug io math os package string table bit jit arg]]):gmatch("%S+") do
  BUILTIN[name] = true
end

-- C functions of the standard libraries, by value and by name.
local CFN_NAME, CFN_VALUE = {}, {}
do
  local function index(prefix, t)
    for k, v in pairs(t) do
      if type(v) == "function" and type(k) == "string" then
        local name = prefix .. k
        CFN_NAME[v] = name
        CFN_VALUE[name] = v
      end
    end
  end
  index("", _G)
  for _, lib in ipairs({"string", "table", "math", "io", "os", "coroutine", "debug", "bit", "jit"}) do
    if type(_G[lib]) == "table" then index(lib .. ".", _G[lib]) end
  end
end

-- The GGET opcode, found by compiling a probe: works for both LuaJIT
-- flavours without reading vmdef.
local GGET
do
  local probe = loadstring("return __tide_probe_global__")
  GGET = band(funcbc(probe, 1), 0xff)
end

-- Global names a function (and the functions nested in it) reads.
local function globals_read(fn, out)
  local pc = 1
  while true do
    local ins = funcbc(fn, pc)
    if not ins then break end
    if band(ins, 0xff) == GGET then
      local name = funck(fn, -rshift(ins, 16) - 1)
      if type(name) == "string" then out[name] = true end
    end
    pc = pc + 1
  end
  local info = funcinfo(fn)
  for i = 1, info.gcconsts or 0 do
    local k = funck(fn, -i)
    if type(k) == "proto" or (type(k) == "function" and k ~= fn) then globals_read(k, out) end
  end
  return out
end

local function module_name(v)
  for name, m in pairs(package.loaded) do
    if m == v and type(name) == "string" and name ~= "_G" then return name end
  end
end

local SELF, MOD, CFN = "\0tide.self", "\0tide.mod", "\0tide.cfn"

local function capture_value(v, fn)
  if v == fn then return {[SELF] = true} end
  local t = type(v)
  if t == "table" then
    if v == _G then return {[MOD] = "_G"} end
    local name = module_name(v)
    if name then return {[MOD] = name} end
  elseif t == "function" and CFN_NAME[v] then
    return {[CFN] = CFN_NAME[v]}
  end
  return v
end

-- fn -> descriptor table (called by the C serializer).
function M.dumpfn(fn)
  local info = funcinfo(fn)
  if info.ffid then error("cannot send a C function", 0) end
  local d = {bc = dump(fn), nup = info.upvalues or 0, up = {}}
  for i = 1, d.nup do
    local name, v = getupvalue(fn, i)
    local t = type(v)
    if t == "thread" or (t == "function" and funcinfo(v).ffid and not CFN_NAME[v])
       or (t == "userdata" and not (getmetatable(v) or {}).__tide_ser and not (getmetatable(v) or {}).__name) then
      error(string.format("cannot send a %s captured as upvalue '%s'",
        t == "thread" and "coroutine" or t == "function" and "C function" or t, name), 0)
    end
    if v ~= nil then d.up[i] = capture_value(v, fn) end
  end
  local env = getfenv(fn)
  local g
  for name in pairs(globals_read(fn, {})) do
    if not BUILTIN[name] then
      local v = rawget(env, name)
      if v ~= nil then
        g = g or {}
        g[name] = capture_value(v, fn)
      end
    end
  end
  d.g = g
  return d
end

local function restore(v, fn)
  if type(v) ~= "table" then return v end
  if rawget(v, SELF) then return fn end
  local m = rawget(v, MOD)
  if m then
    if m == "_G" then return _G end
    return require(m)
  end
  local c = rawget(v, CFN)
  if c then return CFN_VALUE[c] end
  return v
end

-- descriptor -> fn (called by the C decoder).
function M.loadfn(d)
  local fn, err = loadstring(d.bc)
  if not fn then error("cannot load function bytecode: " .. tostring(err), 0) end
  for i = 1, d.nup or 0 do
    local v = d.up[i]
    if v ~= nil then setupvalue(fn, i, restore(v, fn)) end
  end
  if d.g then
    local env = {}
    for k, v in pairs(d.g) do env[k] = restore(v, fn) end
    setfenv(fn, setmetatable(env, {__index = _G, __newindex = _G}))
  end
  return fn
end

-- Registers the hooks the C serializer calls.
function M.install()
  local reg = debug.getregistry()
  reg["tide.hook.dumpfn"] = M.dumpfn
  reg["tide.hook.loadfn"] = M.loadfn
end

return M
