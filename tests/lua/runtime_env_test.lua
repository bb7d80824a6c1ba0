-- runtime_env: env_vars and working_dir for tasks and actors.
local t = dofile("tests/lua/harness.lua")
local tide = require("tide")

local dir = os.tmpname()
os.remove(dir)
os.execute("mkdir -p " .. dir)
local f = assert(io.open(dir .. "/wd_helper_mod.lua", "w"))
f:write('return {hello = "from the working dir"}\n')
f:close()

t.test("working_dir: the task runs there and requires modules from it", function()
  local g = tide.remote({runtime_env = {working_dir = dir}}, function()
    return require("wd_helper_mod").hello, io.popen("pwd"):read("*l")
  end):options({num_returns = 2})
  local a, b = g:remote()
  t.eq(tide.get(a), "from the working dir")
  t.eq(tide.get(b), dir)
end)

t.test("working_dir does not leak into the next task on the same worker", function()
  local g = tide.remote(function() return io.popen("pwd"):read("*l") end)
  for _ = 1, 4 do t.ok(tide.get(g:remote()) ~= dir, "a later task ran in the working dir") end
end)

t.test("an actor's working_dir and env_vars apply to its calls", function()
  local A = tide.actor({where = function() return io.popen("pwd"):read("*l"), os.getenv("WD_TEST") end})
  local a = A:options({runtime_env = {working_dir = dir, env_vars = {WD_TEST = "yes"}}}):remote()
  local r = tide.get(a:where())
  t.eq(r, dir)
end)

t.test("a missing working_dir is refused at the call that names it", function()
  t.raises(function()
    tide.remote({runtime_env = {working_dir = "/nonexistent/dir"}}, function() end)
  end, "runtime_env_test.lua:%d+: runtime_env.working_dir")
end)

os.execute("rm -rf " .. dir)
t.done()
