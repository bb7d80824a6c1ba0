-- The serving tests' HTTP client: tide.http (stdlib/tide/http.lua), under
-- the name the tests have always used.
--
--   local httpc = require("httpc")          -- with tests/lua on package.path
--
-- Run as a script it is a tiny curl for shell tests:
--   bin/tide run tests/lua/httpc.lua METHOD PORT PATH [BODY]
-- prints "STATUS\n" then the body; exit status 0 when it got a response.
local M = require("tide.http")
local modname = ...
if modname ~= "httpc" and type(arg) == "table" and tostring(arg[0] or ""):find("httpc%.lua$") then
  M.main(arg)
end
return M
