-- Tide quickstart: remote functions, actors and objects on an embedded
-- local cluster.   make demo   (or: bin/tide run examples/quickstart.lua)
local tide = require("tide")

-- Remote functions run in worker processes; :remote() returns an ObjectRef.
local square = tide.remote(function(x) return x * x end)
local refs = {}
for i = 1, 8 do refs[i] = square:remote(i) end
local squares = tide.get(refs)
print("squares:", table.concat(squares, " "))

-- Closures travel with the function: `offset` is captured by value.
local offset = 100
local shift = tide.remote(function(x) return x + offset end)
print("shifted:", tide.get(shift:remote(1)))

-- Refs passed as arguments are resolved before the task runs, so tasks
-- chain without the driver waiting in between.
local total = tide.remote(function(a, b) return a + b end)
print("chained:", tide.get(total:remote(square:remote(3), square:remote(4))))

-- Objects: put once, share with many tasks. Large values live in the
-- node's shared-memory store and are read there by the workers.
local text = tide.put(string.rep("tide ", 200000))
local count = tide.remote(function(s, word)
  local n = 0
  for _ in s:gmatch(word) do n = n + 1 end
  return n
end)
print("words in a 1 MB object:", tide.get(count:remote(text, "tide")))

-- Actors keep state between calls; calls from one caller run in order.
local Counter = tide.actor({
  init = function(self, start) self.n = start or 0 end,
  incr = function(self, k) self.n = self.n + (k or 1); return self.n end,
})
local c = Counter:options({name = "hits"}):remote(10)
c:incr(); c:incr(2)
print("counter:", tide.get(c:incr(5)))
print("found by name:", tide.get(tide.get_actor("hits"):incr(0)))

-- Streaming: a task yields items as it makes them.
local countdown = tide.remote({num_returns = "streaming"}, function(n)
  for i = n, 1, -1 do tide.yield(i) end
end)
local items = {}
for ref in countdown:remote(5) do items[#items + 1] = tide.get(ref) end
print("streamed:", table.concat(items, " "))

-- Errors come back as tables with a kind, a message and the remote traceback.
local fails = tide.remote(function() error("something went wrong") end)
local ok, err = pcall(tide.get, fails:remote())
print("error kind:", ok, err.kind)

-- Worker output is forwarded with its origin.
tide.get(tide.remote(function() print("hello from a worker") end):remote())

print("resources:", tide.cluster_resources().CPU, "CPUs")
