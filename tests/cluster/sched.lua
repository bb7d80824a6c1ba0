-- Runs attached to the head of a small cluster (tests/sh/multinode_test.sh)
-- where every node can run work: node-0 the head {CPU=1}, then a node
-- {CPU=1, A=1} and a node {CPU=1, B=1}. Checks that SPREAD rotates over
-- every node, the head included, and that a large argument kept on one
-- node draws a task there only when the task can run there.
local t = dofile("tests/lua/harness.lua")
local tide = require("tide")

local nodes = {}
for _, nd in ipairs(tide.nodes()) do
  if (nd.resources.A or 0) > 0 then nodes.A = nd.node_id end
  if (nd.resources.B or 0) > 0 then nodes.B = nd.node_id end
end
local where = tide.remote(function(s) return tide.get_runtime_context().node_id, #(s or "") end)

t.test("the cluster is a head with a CPU and two nodes, one with A and one with B", function()
  t.eq(#tide.nodes(), 3)
  t.eq(tide.cluster_resources().CPU, 3)
  t.ok(nodes.A and nodes.B, "nodes with A and B")
end)

-- 9 tasks of 0.4 s, one CPU each, on three nodes of one CPU: SPREAD gives
-- each node its turn, so each runs three (before, a task whose turn fell on
-- the busy head drew again, and the head ran one of them).
t.test("SPREAD runs sleeping tasks on every node in turn, the head included", function()
  local f = tide.remote(function()
    tide.sleep(0.4)
    return tide.get_runtime_context().node_id
  end)
  for round = 1, 2 do
    local refs, seen = {}, {}
    for i = 1, 9 do refs[i] = f:options({scheduling_strategy = "SPREAD"}):remote() end
    for _, n in ipairs(tide.get(refs, {timeout = 60})) do seen[n] = (seen[n] or 0) + 1 end
    local got = string.format("round %d: node-0 %d, %s %d, %s %d", round, seen["node-0"] or 0,
      nodes.A, seen[nodes.A] or 0, nodes.B, seen[nodes.B] or 0)
    -- Three each, give or take one when a busy machine delays a node.
    for _, id in ipairs({"node-0", nodes.A, nodes.B}) do
      t.ok((seen[id] or 0) >= 2 and (seen[id] or 0) <= 4, got)
    end
  end
end)

t.test("SPREAD skips a node that lacks the task's resource", function()
  local refs, seen = {}, {}
  for i = 1, 6 do refs[i] = where:options({scheduling_strategy = "SPREAD", resources = {B = 0.5}}):remote() end
  for i = 1, 6 do seen[tide.get(refs[i], {timeout = 60})] = true end
  t.ok(seen[nodes.B] and not seen[nodes.A] and not seen["node-0"], "ran outside the node with B")
end)

-- A result over the inline limit stays on the node that made it; a task
-- that needs B and takes it runs on the node with B, which fetches it
-- (before: the task was sent to the node holding the argument, which
-- refused it as infeasible).
for _, size in ipairs({1024, 100 * 1024, 16 * 1024 * 1024}) do
  t.test(string.format("a task needing B takes a %d-byte result made on the node with A", size), function()
    local make = tide.remote(function(n) return string.rep("x", n) end)
    local r = make:options({resources = {A = 1}}):remote(size)
    local n1, len1 = where:options({num_returns = 2, resources = {B = 1}}):remote(r)
    t.eq(tide.get(n1, {timeout = 60}), nodes.B)
    t.eq(tide.get(len1), size)
    -- Again once the result is known to be kept on the node with A.
    local n2, len2 = where:options({num_returns = 2, resources = {B = 1}}):remote(r)
    t.eq(tide.get(n2, {timeout = 60}), nodes.B)
    t.eq(tide.get(len2), size)
  end)
end

t.test("a task that fits where its large argument is still runs there", function()
  local make = tide.remote(function(n) return string.rep("x", n) end)
  local r = make:options({resources = {A = 1}}):remote(16 * 1024 * 1024)
  tide.wait({r}, {timeout = 60})
  local n, len = where:options({num_returns = 2}):remote(r)
  t.eq(tide.get(n, {timeout = 60}), nodes.A)
  t.eq(tide.get(len), 16 * 1024 * 1024)
end)

t.done()
