#!/bin/sh
# Ids made on nodes with high indices are exact.  Every id carries its
# node's index in its top bits (index << 52), so ids from node-2 up are
# above 2^53, where a Lua number rounds: tasks once ran another function's
# code there.  A head and two nodes that ask for indices 9 and 4000 (ids
# above 2^63); drivers attached to those nodes run tasks, actors and nested
# calls, the core suites run from there, and detached actors made there keep
# their state across a kill -9 of the head.
cd "$(dirname "$0")/../.."
T=$(pwd)/bin/tide
. tests/sh/lib.sh
D=$(mktemp -d /tmp/tide-highidx-XXXXXX)
stop_all() { for s in head hi lo top wrap doom; do TIDE_SESSION_DIR=$D/$s $T stop >/dev/null 2>&1; done; }
trap 'stop_all; [ -n "$KEEP" ] || rm -rf "$D"' EXIT
PORT=$((19000 + $$ % 1000))
KEY=$D/head/cluster.key
start_head() { TIDE_PKG_CACHE=$D/pkgs-head TIDE_SESSION_DIR=$D/head $T start --head --port $PORT --num-cpus 1 --node-timeout 2 "$@"; }
node() { s=$1; shift; TIDE_PKG_CACHE=$D/pkgs-$s TIDE_SESSION_DIR=$D/$s $T start --address 127.0.0.1:$PORT --key $KEY --node-timeout 2 "$@"; }
nodes_up() {  # nodes_up N SECONDS: wait until the head lists N nodes
  i=0
  while [ $i -lt $(($2 * 10)) ]; do
    [ "$(TIDE_SESSION_DIR=$D/head $T status 2>/dev/null | grep -c '^node-')" = "$1" ] && return 0
    sleep 0.1; i=$((i + 1))
  done
  return 1
}

start_head >/dev/null 2>&1
out=$(node hi --num-cpus 2 --node-index 4000 --resources '{"HI":4}' 2>&1)
check "a node that asks for index 4000 gets it" 'grep -q "as node-4000" $D/hi/node.log' "$out"
out=$(node lo --num-cpus 2 --node-index 9 --resources '{"LO":4}' 2>&1)
check "a node that asks for index 9 gets it" 'grep -q "as node-9" $D/lo/node.log' "$out"
nodes_up 3 10

cat > $D/ids.lua <<'LUA'
local tide = require("tide")
local here = tide.get_runtime_context().node_id
-- Twelve functions made here, each with its own result: a rounded id would
-- find another function's definition (or none).
local fns = {}
for i = 1, 12 do fns[i] = tide.remote(function(x) return i * 1000 + x end) end
local refs = {}
for i = 1, 12 do refs[i] = fns[i]:remote(i) end
local wrong = 0
for i, v in ipairs(tide.get(refs)) do if v ~= i * 1000 + i then wrong = wrong + 1 end end
print("FUNCTIONS", here, wrong)
-- Actors made here, each with its own state.
local C = tide.actor({init = function(s, k) s.k = k end, get = function(s) return s.k end,
  node = function() return tide.get_runtime_context().node_id end})
local as, bad = {}, 0
for i = 1, 6 do as[i] = C:remote(i) end
for i = 1, 6 do if tide.get(as[i]:get()) ~= i then bad = bad + 1 end end
print("ACTORS", bad)
-- Nested: a task (on either node) makes functions and actors and calls the
-- handles and functions it was given.
local nested = tide.remote(function(f, a)
  local g = tide.remote(function(x) return x * 2 end)
  local inner = tide.actor({v = function(_, x) return x + 1 end}):remote()
  return tide.get(f:remote(1)) + tide.get(a:get()) + tide.get(g:remote(10)) + tide.get(inner:v(100))
end)
local outs = {}
for i = 1, 4 do outs[i] = nested:options({scheduling_strategy = "SPREAD"}):remote(fns[3], as[5]) end
local sum = 0
for _, v in ipairs(tide.get(outs)) do if v == 3001 + 5 + 20 + 101 then sum = sum + 1 end end
print("NESTED", sum)
-- Named actors and placement groups made here are found by their ids.
local named = C:options({name = "hi-named"}):remote(77)
print("NAMED", tide.get(tide.get_actor("hi-named"):get()), tide.get(named:get()))
local pg = tide.placement_group({{CPU = 1}})
tide.get(pg:ready())
print("PG", tide.get(fns[7]:options({placement_group = pg}):remote(0)))
tide.remove_placement_group(pg)
local addrs = {}
print("FIRST", tide.nodes()[1].node_id == here)
for _, nd in ipairs(tide.nodes()) do addrs[#addrs + 1] = tostring(nd.address):match("^%d+%.%d+%.%d+%.%d+$") and "ip" or tostring(nd.address) end
print("ADDRESSES", #addrs, table.concat(addrs, ","))
local id = tide.get(tide.remote(function() return tide.get_runtime_context().task_id end):remote())
print("TASKID", type(id), #id)
LUA
for s in hi lo; do
  out=$(TIDE_SESSION_DIR=$D/$s timeout 120 $T run --address local $D/ids.lua 2>&1)
  check "a driver on node $s: 12 functions made there each run their own code" 'echo "$out" | grep -q "^FUNCTIONS	$( [ $s = hi ] && echo node-4000 || echo node-9 )	0$"' "$out"
  check "... 6 actors made there each keep their own state" 'echo "$out" | grep -q "^ACTORS	0$"' "$out"
  check "... tasks on every node make and call functions and actors, and call the handles they were given" \
    'echo "$out" | grep -q "^NESTED	4$"' "$out"
  check "... a named actor and a placement group made there are found" \
    'echo "$out" | grep -q "^NAMED	77	77$" && echo "$out" | grep -q "^PG	7000$"' "$out"
  check "... a task id is 16 hex digits" 'echo "$out" | grep -q "^TASKID	string	16$"' "$out"
  check "... tide.nodes() lists the three nodes with IP addresses, not names, this one first" \
    'echo "$out" | grep -q "^ADDRESSES	3	ip,ip,ip$" && echo "$out" | grep -q "^FIRST	true$"' "$out"
done

cat > $D/holder.lua <<'LUA'
local tide = require("tide")
local C = tide.actor({get = function() return tide.get_runtime_context().node_id end})
local a = C:options({name = "cross-named", resources = {LO = 1}}):remote()
print("HOLDER", tide.get(a:get()))
io.stdout:flush()
tide.get(tide.remote(function() tide.sleep(30) end):remote(), {timeout = 30})
LUA
cat > $D/finder.lua <<'LUA'
local tide = require("tide")
local C = tide.actor({get = function() return 0 end})
print("FOUND", tide.get(tide.get_actor("cross-named"):get()))
print("TWICE", pcall(function() return C:options({name = "cross-named"}):remote() end))
LUA
TIDE_SESSION_DIR=$D/lo timeout 60 $T run --address local $D/holder.lua >$D/holder.out 2>&1 &
hold=$!
for i in $(seq 100); do grep -q HOLDER $D/holder.out && break; sleep 0.1; done
out=$(TIDE_SESSION_DIR=$D/hi timeout 60 $T run --address local $D/finder.lua 2>&1)
check "a named actor a driver on node-9 made is found by name from node-4000" 'echo "$out" | grep -q "^FOUND	node-9$"' "$out $(cat $D/holder.out)"
check "... and its name cannot be taken again there" 'echo "$out" | grep -q "^TWICE	false	.*already exists"' "$out"
kill $hold 2>/dev/null; wait $hold 2>/dev/null
cat > $D/gone.lua <<'LUA'
local tide = require("tide")
local C = tide.actor({get = function() return 1 end})
local ok = false
for _ = 1, 50 do  -- the head hears of the driver's exit through its node
  ok = pcall(tide.get_actor, "cross-named")
  if not ok then break end
  tide.sleep(0.1)
end
local a = C:options({name = "cross-named"}):remote()
print("GONE", not ok, tide.get(a:get()))
local b = C:options({name = "to-kill", resources = {LO = 1}}):remote()
tide.get(b:get())
tide.kill(b)
print("KILLED", pcall(tide.get, b:get(), {timeout = 10}))
LUA
out=$(TIDE_SESSION_DIR=$D/hi timeout 60 $T run --address local $D/gone.lua 2>&1)
check "a named actor goes with the driver (on another node) that made it, and its name is free again" \
  'echo "$out" | grep -q "^GONE	true	1$"' "$out"
check "tide.kill from a driver on node-4000 kills an actor the head placed on node-9" \
  'echo "$out" | grep -q "^KILLED	false	.*ActorDiedError"' "$out"

cat > $D/init.lua <<'LUA'
local tide = require("tide")
tide.init({num_cpus = 4, resources = {HI = 2, LO = 1}})
print("INIT-OK", tide.get(tide.remote(function() return 1 end):remote()))
print("INIT-BIG", pcall(tide.init, {num_cpus = 64}))
print("INIT-BAD", pcall(tide.init, {num_cpu = 1}))
LUA
out=$(TIDE_SESSION_DIR=$D/hi timeout 60 $T run --address local $D/init.lua 2>&1)
check "attached, tide.init runs unchanged when the cluster has what it asks (one warning)" \
  'echo "$out" | grep -q "^INIT-OK	1$" && [ "$(echo "$out" | grep -c "ignoring num_cpus, resources")" = 1 ]' "$out"
check "... and raises when the cluster has less, or for an unknown option" \
  'echo "$out" | grep -q "^INIT-BIG	false	.*has CPU = 5, less than the 64 asked" &&
   echo "$out" | grep -q "^INIT-BAD	false	.*did you mean .num_cpus"' "$out"

# Indices only grow; once 4095 was given, a new node takes a free one again.
node top --num-cpus 1 --node-index 4095 >/dev/null 2>&1
node wrap --num-cpus 1 >/dev/null 2>&1
check "after index 4095 was given, a new node joins under a free index (not refused)" \
  'grep -q "as node-4095" $D/top/node.log && grep -q "joined the head at .* as node-[0-9]" $D/wrap/node.log &&
   ! grep -q "as node-\(4095\|4000\|9\)$" $D/wrap/node.log' "$(cat $D/wrap/node.log; tail -3 $D/head/node.log)"
out=$(TIDE_SESSION_DIR=$D/wrap timeout 60 $T run --address local $D/ids.lua 2>&1)
check "... and work made there runs right" 'echo "$out" | grep -q "^FUNCTIONS	.*	0$" && echo "$out" | grep -q "^ACTORS	0$"' "$out"
TIDE_SESSION_DIR=$D/top $T stop >/dev/null 2>&1
TIDE_SESSION_DIR=$D/wrap $T stop >/dev/null 2>&1
nodes_up 3 10

echo "# the core suites from a driver on node-4000"
for s in ${SUITES-tasks actors}; do
  out=$(TIDE_SESSION_DIR=$D/hi TIDE_TEST_CLUSTER=1 timeout 300 $T run --address local tests/lua/${s}_test.lua 2>&1)
  echo "$out" | grep -E '^(not )?ok ' | sed "s/^\(not ok\|ok\) [0-9]* - /\1 - from node-4000, $s: /"
  check "the $s suite ran to its end from node-4000" 'echo "$out" | grep -q "^1\.\."' "$(echo "$out" | tail -5)"
done

echo "# detached actors on nodes 9 and 4000 across a head restart"
cat > $D/before.lua <<'LUA'
local tide = require("tide")
local K = tide.actor({init = function(s) s.n = 0 end, incr = function(s) s.n = s.n + 1; return s.n end})
for _, r in ipairs({"HI", "LO"}) do
  local k = K:options({name = "keep-" .. r, lifetime = "detached", resources = {[r] = 1}}):remote()
  for _ = 1, 5 do tide.get(k:incr()) end
  local p = K:options({name = "pin-" .. r, lifetime = "detached", resources = {[r] = 1},
    scheduling_strategy = {node_id = r == "HI" and "node-4000" or "node-9"}}):remote()
  tide.get(p:incr())
end
print("MADE")
LUA
out=$(TIDE_SESSION_DIR=$D/hi timeout 60 $T run --address local $D/before.lua 2>&1)
check "detached actors made from node-4000 on nodes 9 and 4000" 'echo "$out" | grep -q MADE' "$out"
# A node that dies while the head is down takes its detached actors' state
# with it: the restarted head must not make them anew as if nothing had
# happened (a counter back at 0), unless they may restart.
node doom --num-cpus 2 >/dev/null 2>&1
nodes_up 4 10
doom_id=$(sed -n 's/.* as \(node-[0-9]*\).*/\1/p' $D/doom/node.log | head -1)
cat > $D/doom.lua <<'LUA'
local tide = require("tide")
local K = tide.actor({init = function(s) s.n = 0 end, incr = function(s) s.n = s.n + 1; return s.n end,
  node = function() return tide.get_runtime_context().node_id end})
-- Soft affinity: made anew, either would fit on another node.
local there = {node_id = arg[1], soft = true}
local d = K:options({name = "doomed", lifetime = "detached", scheduling_strategy = there}):remote()
local r = K:options({name = "restartable", lifetime = "detached", max_restarts = 1,
  scheduling_strategy = there}):remote()
for _ = 1, 4 do tide.get({d:incr(), r:incr()}) end
print("DOOMED", tide.get(d:incr()), tide.get(r:incr()), tide.get(d:node()) == arg[1], tide.get(r:node()) == arg[1])
io.stdout:flush()
-- Its node keeps this driver through the head's restart: it calls them again.
while not io.open(arg[2] .. "/headback") do tide.sleep(0.05) end
local ok, e = pcall(tide.get, d:incr(), {timeout = 30})
print("DOOMED-AFTER", ok, type(e) == "table" and e.kind or tostring(e), type(e) == "table" and e.message or "")
print("RESTARTED", pcall(tide.get, r:incr(), {timeout = 30}))
print("NAMED", pcall(tide.get_actor, "doomed"))
LUA
(TIDE_SESSION_DIR=$D/lo timeout 120 $T run --address local $D/doom.lua $doom_id $D > $D/doom.out 2>&1) &
doom_driver=$!
for i in $(seq 300); do grep -q DOOMED $D/doom.out 2>/dev/null && break; sleep 0.1; done
out=$(cat $D/doom.out)
check "detached actors on a third node ($doom_id), one without restarts and one with one" \
  'echo "$out" | grep -q "^DOOMED	5	5	true	true$"' "$out"
hpid=$(cat $D/head/node.pid)
kill -9 $hpid
for i in $(seq 100); do kill -0 $hpid 2>/dev/null || break; sleep 0.05; done
kill -9 $(cat $D/doom/node.pid)
start_head >/dev/null 2>&1
nodes_up 3 15
cat > $D/after.lua <<'LUA'
local tide = require("tide")
for _, r in ipairs({"HI", "LO"}) do
  print("KEPT-" .. r, tide.get(tide.get_actor("keep-" .. r):incr(), {timeout = 30}),
    tide.get(tide.get_actor("pin-" .. r):incr(), {timeout = 30}))
end
LUA
out=$(TIDE_SESSION_DIR=$D/head timeout 60 $T run --address local $D/after.lua 2>&1)
check "after kill -9 of the head, detached actors on node-4000 are adopted with their state" \
  'echo "$out" | grep -q "^KEPT-HI	6	2$"' "$out $(grep -i 'adopt\|restor' $D/head/node.log | tail -8)"
check "... and on node-9" 'echo "$out" | grep -q "^KEPT-LO	6	2$"' "$out"
touch $D/headback
wait $doom_driver
out=$(cat $D/doom.out)
check "a detached actor whose node died while the head was down fails loudly (ActorDiedError), never back at 0" \
  'echo "$out" | grep -q "^DOOMED-AFTER	false	ActorDiedError	.*no node still ran it"' "$out $(grep -i 'adopt\|restor\|detached' $D/head/node.log | tail -8)"
check "... and one with a restart left is restarted (fresh state, as a restart)" \
  'echo "$out" | grep -q "^RESTARTED	true	1$"' "$out"
check "... and its name is free again" 'echo "$out" | grep -q "^NAMED	false"' "$out"
stop_all
echo "1..$n"
