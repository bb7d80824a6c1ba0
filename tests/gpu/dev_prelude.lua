-- Development prelude for running the GPU-layer Lua tests under plain
-- `luajit` (before or without bin/tide):
--   luajit -e 'dofile("tests/gpu/dev_prelude.lua")' tests/gpu/tensor_test.lua
-- bin/tide already provides tide.tensor and puts stdlib/ on package.path.
package.path = "stdlib/?.lua;stdlib/?/init.lua;" .. package.path
if not package.preload["tide.tensor"] then
  local f = assert(package.loadlib("build/tide_tensor_dev.so", "luaopen_tide_tensor"))
  package.preload["tide.tensor"] = f
end
