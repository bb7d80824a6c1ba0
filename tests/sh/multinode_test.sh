#!/bin/sh
# A real cluster on loopback: a head and two nodes, each a daemon in its own
# session directory, joined over ZeroMQ CURVE on distinct ports with fake
# resources. Runs placement checks and the core Lua suites against it, then
# kills a worker, a node and the head with kill -9 in the middle of work.
cd "$(dirname "$0")/../.."
T=$(pwd)/bin/tide
. tests/sh/lib.sh
D=$(mktemp -d /tmp/tide-multinode-XXXXXX)
stop_all() { for s in head n1 n2 n3 n4 n5 n6 bad sh sa sb; do TIDE_SESSION_DIR=$D/$s $T stop >/dev/null 2>&1; done; }
trap 'stop_all; rm -rf "$D"' EXIT
PORT=$((18000 + $$ % 1000))
KEY=$D/head/cluster.key
# Each daemon has its own package cache, as on separate machines.
start_head() { TIDE_PKG_CACHE=$D/pkgs-head TIDE_SESSION_DIR=$D/head $T start --head --port $PORT --num-cpus 0 --node-timeout 2 "$@"; }
node() { s=$1; shift; TIDE_PKG_CACHE=$D/pkgs-$s TIDE_SESSION_DIR=$D/$s $T start --address 127.0.0.1:$PORT --key $KEY --node-timeout 2 "$@"; }
nodes_up() {  # nodes_up N SECONDS: wait until the head lists N nodes
  i=0
  while [ $i -lt $(($2 * 10)) ]; do
    [ "$(TIDE_SESSION_DIR=$D/head $T status 2>/dev/null | grep -c '^node-')" = "$1" ] && return 0
    sleep 0.1; i=$((i + 1))
  done
  return 1
}
now() { date +%s.%N; }

echo "# scheduling on a small cluster where the head runs work too"
SPORT=$((PORT + 2))
TIDE_SESSION_DIR=$D/sh $T start --head --port $SPORT --num-cpus 1 --node-timeout 2 >/dev/null 2>&1
for s in sa sb; do
  r='{"A":1}'; [ $s = sb ] && r='{"B":1}'
  TIDE_PKG_CACHE=$D/pkgs-$s TIDE_SESSION_DIR=$D/$s $T start --address 127.0.0.1:$SPORT --key $D/sh/cluster.key \
    --node-timeout 2 --num-cpus 1 --resources "$r" >/dev/null 2>&1
done
TIDE_SESSION_DIR=$D/sh timeout 180 $T run --address local tests/cluster/sched.lua 2>&1
# The node with B dies and is started again (a supervisor would): work that
# needs B waits for it, for a while.
NODE_B_PID_FILE=$D/sb/node.pid NODE_B_START="TIDE_PKG_CACHE=$D/pkgs-sb TIDE_SESSION_DIR=$D/sb $T start \
  --address 127.0.0.1:$SPORT --key $D/sh/cluster.key --node-timeout 2 --num-cpus 1 --resources '{\"B\":1}'" \
  TIDE_SESSION_DIR=$D/sh timeout 180 $T run --address local tests/cluster/rejoin.lua 2>&1
for s in sh sa sb; do TIDE_SESSION_DIR=$D/$s $T stop >/dev/null 2>&1; done

out=$(start_head 2>&1)
check "the head starts and prints how to join" 'echo "$out" | grep -q "node started"' "$out"
out=$(node n1 --num-cpus 2 --resources '{"A":1}' 2>&1)
check "a node joins the head with --address and the cluster key" 'echo "$out" | grep -q "joined the head"' "$out"
out=$(node n2 --num-cpus 2 --num-gpus 2 2>&1)
check "a second node joins" 'echo "$out" | grep -q "joined the head"' "$out"
nodes_up 3 10
st=$(TIDE_SESSION_DIR=$D/head $T status 2>&1)
check "tide status on the head lists three nodes and their resources" \
  'echo "$st" | grep -q "cluster: 3 nodes" && echo "$st" | grep -q "^node-2" && echo "$st" | grep -Eq "A +0 / 1"' "$st"

# A node without the cluster key is refused, logged and counted.
TIDE_SESSION_DIR=$D/other $T start --head --port $((PORT + 1)) >/dev/null 2>&1
TIDE_SESSION_DIR=$D/other $T stop >/dev/null 2>&1
TIDE_SESSION_DIR=$D/bad timeout 4 $T start --block --address 127.0.0.1:$PORT --key $D/other/cluster.key >/dev/null 2>&1
st=$(TIDE_SESSION_DIR=$D/head $T status 2>&1)
check "a node with the wrong key is refused and counted" \
  'echo "$st" | grep -q "cluster: 3 nodes" && echo "$st" | grep -Eq "refused \(no valid cluster key\): [1-9]"' "$st"
# 4 s of tries (ZeroMQ reconnects once a second): a line a second at most,
# and the last may come as the 4 s end, a fifth second begun.
check "the head's log names the refused peer (not its own endpoint), once a second at most" \
  'grep -q "refused a connection from 127.0.0.1: no valid cluster key" $D/head/node.log &&
   [ "$(grep -c "refused a connection" $D/head/node.log)" -le 6 ]' "$(tail -5 $D/head/node.log)"

echo "# placement across nodes"
TIDE_SESSION_DIR=$D/head timeout 240 $T run --address local tests/cluster/placement.lua 2>&1
st=$(TIDE_SESSION_DIR=$D/head $T status 2>&1)
check "tide status on the head shows each node's workers, queued tasks, objects and store use (from its heartbeats)" \
  'echo "$st" | grep -A6 "^node-1" | grep -Eq "queued [0-9]+" && echo "$st" | grep -A6 "^node-2" | grep -Eq "objects [0-9]+, store [0-9.]+ (B|[KMGT]iB) / [0-9.]+ (B|[KMGT]iB)"' "$st"
cat > $D/prints.lua <<'LUA'
local tide = require("tide")
local f = tide.remote(function() print("PRINTED on " .. tide.get_runtime_context().node_id) return 1 end)
local A = tide.actor({init = function() print("INIT PRINTED") end, hi = function() print("CALL PRINTED") return 1 end})
tide.get(f:options({scheduling_strategy = {node_id = "node-2"}}):remote())
local a = A:options({scheduling_strategy = {node_id = "node-1"}}):remote()
tide.get(a:hi())
LUA
out=$(TIDE_SESSION_DIR=$D/head timeout 60 $T run --address local $D/prints.lua 2>&1)
check "prints of tasks and actors on other nodes reach the driver" \
  'echo "$out" | grep -q "PRINTED on node-2" && echo "$out" | grep -q "INIT PRINTED" && echo "$out" | grep -q "CALL PRINTED"' "$out"
# tide logs on the head: output kept on the node a worker ran on comes
# through the head (a task placed there reads it).
cat > $D/logged.lua <<'LUA'
local tide = require("tide")
local A = tide.actor({hi = function() print("LOGGED on " .. tide.get_runtime_context().node_id) return 1 end})
local a = A:options({name = "logged", lifetime = "detached", scheduling_strategy = {node_id = "node-1"}}):remote()
tide.get(a:hi())
local bad = tide.remote(function() print("BEFORE FAILING on " .. tide.get_runtime_context().node_id); error("failed") end)
pcall(tide.get, bad:options({scheduling_strategy = {node_id = "node-2"}, max_retries = 0}):remote())
LUA
TIDE_SESSION_DIR=$D/head timeout 60 $T run --address local $D/logged.lua >/dev/null 2>&1
aid=$(TIDE_SESSION_DIR=$D/head $T list actors --filter name=logged --json | sed -n 's/.*"actor_id":"\([0-9a-f]*\)".*/\1/p')
out=$(TIDE_SESSION_DIR=$D/head timeout 60 $T logs actor "$aid" 2>&1)
check "tide logs actor ID on the head: the output of its worker on node-1" 'echo "$out" | grep -q "LOGGED on node-1"' "$aid: $out"
tid=$(TIDE_SESSION_DIR=$D/head $T list tasks --filter state=FAILED --filter node=node-2 --json | sed -n 's/.*"task_id":"\([0-9a-f]*\)".*/\1/p' | head -1)
out=$(TIDE_SESSION_DIR=$D/head timeout 60 $T logs task "$tid" --tail 1 2>&1)
check "tide logs task ID --tail 1 on the head: the last line of the worker a failed task ran in on node-2" \
  '[ "$(echo "$out" | wc -l)" = 1 ] && echo "$out" | grep -q "BEFORE FAILING on node-2"' "$tid: $out"
wid=$(grep -l "LOGGED on" $D/n1/logs/worker-*.out | sed -n 's/.*worker-\([0-9a-f]*\)\.out$/\1/p' | head -1)
out=$(TIDE_SESSION_DIR=$D/head timeout 60 $T logs worker "$wid" 2>&1)
check "tide logs worker ID on the head: a worker of node-1, by its id" \
  '[ -n "$wid" ] && [ "$out" = "$(cat $D/n1/logs/worker-$wid.out)" ]' "$wid: $out"
out=$(TIDE_SESSION_DIR=$D/head timeout 60 $T logs worker 00000000fff00001 2>&1); st=$?
check "... a worker of a node that is not there: a clear error" \
  '[ $st = 1 ] && echo "$out" | grep -q "cannot read the log on node-4095"' "$out"
echo 'require("tide").kill(require("tide").get_actor("logged"))' > $D/unlog.lua
TIDE_SESSION_DIR=$D/head timeout 60 $T run --address local $D/unlog.lua >/dev/null 2>&1

echo "# a driver that leaves takes its work with it, on every node"
# A task on node-1 starts a task and two actors on node-2: the task and
# the non-detached actor go when the driver is killed, wherever it was
# attached (the head, or node-1: its node tells the head, which tells the
# others); the detached actor stays.
cat > $D/tree.lua <<'LUA'
local tide = require("tide")
local tag = arg[1]
local leaf = tide.remote(function() tide.sleep(120) return 1 end)
local Held = tide.actor({hi = function() return 1 end})
local on = function(node) return {scheduling_strategy = {node_id = node}} end
local mid = tide.remote(function()
  local l = leaf:options(on("node-2")):remote()
  local a = Held:options({name = "tree-child-" .. tag, scheduling_strategy = {node_id = "node-2"}}):remote()
  local d = Held:options({name = "tree-kept-" .. tag, lifetime = "detached",
    scheduling_strategy = {node_id = "node-2"}}):remote()
  tide.get({a:hi(), d:hi()})
  print("TREE up"); io.stdout:flush()
  return tide.get(l)
end)
tide.get(mid:options(on("node-1")):remote())
LUA
for at in head n1; do
  TIDE_SESSION_DIR=$D/$at $T run --address local $D/tree.lua $at >$D/tree-$at.out 2>&1 &
  tp=$!
  for i in $(seq 80); do grep -q "TREE up" $D/tree-$at.out && break; sleep 0.25; done
  before=$(TIDE_SESSION_DIR=$D/n2 $T list tasks 2>&1 | grep "tree.lua")
  kill -9 $tp; wait $tp 2>/dev/null
  for i in $(seq 40); do
    TIDE_SESSION_DIR=$D/n2 $T list tasks 2>/dev/null | grep "tree.lua" | grep -Eq "RUNNING|PENDING" || break; sleep 0.25
  done
  after=$(for s in head n1 n2; do TIDE_SESSION_DIR=$D/$s $T list tasks 2>&1 | grep "tree.lua"; done)
  check "a driver on $at killed: its task's task on node-2 is cancelled, nothing of it left running on any node" \
    'echo "$before" | grep -q RUNNING && ! echo "$after" | grep -Eq "RUNNING|PENDING"' "$(cat $D/tree-$at.out) $before / $after"
  for i in $(seq 20); do
    TIDE_SESSION_DIR=$D/head $T list actors --filter name=tree-child-$at 2>/dev/null | grep -q DEAD && break; sleep 0.25
  done
  acts=$(TIDE_SESSION_DIR=$D/head $T list actors 2>&1 | grep "tree-")
  check "... its task's non-detached actor on node-2 is killed, the detached one stays" \
    'echo "$acts" | grep "tree-child-$at" | grep -q DEAD && echo "$acts" | grep "tree-kept-$at" | grep -q ALIVE' "$acts"
  echo "require('tide').kill(require('tide').get_actor('tree-kept-$at'))" > $D/untree.lua
  TIDE_SESSION_DIR=$D/head timeout 60 $T run --address local $D/untree.lua >/dev/null 2>&1
done

echo "# a task on a node places its own work over the cluster, and cancels it"
cat > $D/nested.lua <<'LUA'
local tide = require("tide")
local where = tide.remote(function() return tide.get_runtime_context().node_id end)
local nap = tide.remote(function() tide.sleep(60) return "slept" end)
local probe = tide.remote(function()
  local out = {tide.get(where:options({scheduling_strategy = {node_id = "node-2"}}):remote())}
  local pg = tide.placement_group({{CPU = 1}})
  tide.get(pg:ready())
  out[2] = tide.get(where:options({placement_group = pg}):remote())
  tide.remove_placement_group(pg)
  local s, seen = {}, {}
  for i = 1, 6 do s[i] = where:options({scheduling_strategy = "SPREAD"}):remote() end
  for _, v in ipairs(tide.get(s)) do seen[v] = true end
  out[3] = (seen["node-1"] and "1" or "") .. (seen["node-2"] and "2" or "")
  local r = nap:options({scheduling_strategy = {node_id = "node-2"}}):remote()
  tide.sleep(0.5)
  out[4] = tostring(tide.cancel(r, {force = true}))
  local ok, err = pcall(tide.get, r, {timeout = 20})
  out[5] = tostring(ok) .. " " .. tostring(err.kind)
  return out
end)
print("NESTED", table.concat(tide.get(probe:options({scheduling_strategy = {node_id = "node-1"}}):remote()), "|"))
LUA
out=$(TIDE_SESSION_DIR=$D/head timeout 60 $T run --address local $D/nested.lua 2>&1)
check "a task on node-1: its task with affinity to node-2 runs there, its placement group's task runs, SPREAD reaches both nodes" \
  'echo "$out" | grep -Eq "^NESTED	node-2\|node-[12]\|12\|"' "$out"
check "... and tide.cancel of its task on node-2 cancels it (the head keeps it)" \
  'echo "$out" | grep -q "|true|false TaskCancelledError$"' "$out"

cat > $D/rcancel.lua <<'LUA'
local tide = require("tide")
local child = tide.remote(function() tide.sleep(60) return 1 end)
local parent = tide.remote({num_returns = "streaming"}, function()
  local c = child:options({scheduling_strategy = {node_id = "node-2"}}):remote()
  tide.yield({c})
  tide.yield(tide.get(c))
end)
local gen = parent:options({scheduling_strategy = {node_id = "node-1"}}):remote()
local c = tide.get(gen:next(30))[1]
tide.sleep(0.3)
tide.cancel(gen)
local ok, err = pcall(tide.get, c, {timeout = 10})
print("RCANCEL", ok, type(err) == "table" and err.kind or err)
LUA
out=$(TIDE_SESSION_DIR=$D/head timeout 60 $T run --address local $D/rcancel.lua 2>&1)
check "tide.cancel of a task on node-1 cancels the task it started on node-2 (recursive, as Ray's)" \
  'echo "$out" | grep -q "^RCANCEL	false	TaskCancelledError$"' "$out"

# Work a task submits beyond its node's CPUs runs on the other nodes too
# (spillback): 8 half-second tasks from a task on node-1 (2 CPUs), with
# node-2's 2 CPUs free.
cat > $D/fan.lua <<'LUA'
local tide = require("tide")
local work = tide.remote(function() tide.sleep(0.5) return tide.get_runtime_context().node_id end)
local fan = tide.remote(function()
  tide.sleep(0.5) -- the nodes' free CPUs reach the head and back (every 50 ms)
  local rs = {}
  for i = 1, 8 do rs[i] = work:remote() end
  local seen = {}
  for _, v in ipairs(tide.get(rs)) do seen[v] = (seen[v] or 0) + 1 end
  return (seen["node-1"] or 0) .. " " .. (seen["node-2"] or 0)
end)
print("FAN", tide.get(fan:options({num_cpus = 0, scheduling_strategy = {node_id = "node-1"}}):remote()))
LUA
out=$(TIDE_SESSION_DIR=$D/head timeout 60 $T run --address local $D/fan.lua 2>&1)
check "a task on node-1 that submits more than node-1 can run at once: node-2 runs some of it" \
  'echo "$out" | grep -Eq "^FAN	[0-9]+ [2-9]$"' "$out"

echo "# the core suites against the cluster"
for s in tasks actors objects failures; do
  TIDE_SESSION_DIR=$D/head TIDE_TEST_CLUSTER=1 timeout 300 $T run --address local tests/lua/${s}_test.lua 2>&1 |
    sed "s/^\(not ok\|ok\) \([0-9]*\) - /\1 \2 - cluster $s: /"
done

echo "# a job submitted over TCP with its working directory"
mkdir -p $D/proj/lib
cat > $D/proj/lib/greet.lua <<'LUA'
return function(who) return "hello " .. who .. " from " .. require("tide").get_runtime_context().node_id end
LUA
cat > $D/proj/main.lua <<'LUA'
package.path = "./lib/?.lua;" .. package.path
local tide = require("tide")
print("DRIVER", require("greet")("driver"))
local f = tide.remote(function(i)
  package.path = "./lib/?.lua;" .. package.path
  return require("greet")("task")
end)
local refs = {}
for i = 1, 8 do refs[i] = f:options({scheduling_strategy = "SPREAD"}):remote(i) end
for _, v in ipairs(tide.get(refs)) do print("TASK", v) end
LUA
out=$(cd / && $T submit --address 127.0.0.1:$PORT --key $KEY --working-dir $D/proj $D/proj/main.lua 2>&1)
id=$(echo "$out" | sed -n 's/^submitted //p')
i=0
while [ $i -lt 100 ] && ! TIDE_SESSION_DIR=$D/head $T job status "$id" 2>/dev/null | grep -q SUCCEEDED; do sleep 0.2; i=$((i + 1)); done
logs=$(cd / && $T job logs "$id" --address 127.0.0.1:$PORT --key $KEY 2>&1)
check "a job's shipped working directory is importable by its driver" \
  'echo "$logs" | grep -q "DRIVER	hello driver from node-0"' "$out $logs"
check "... and by its tasks on every node (each node fetched the package once)" \
  'echo "$logs" | grep -q "TASK	hello task from node-1" && echo "$logs" | grep -q "TASK	hello task from node-2" &&
   ls $D/pkgs-n1/*.pkg >/dev/null && ls $D/pkgs-n2/*.pkg >/dev/null' "$logs $(ls -R $D/pkgs-n1 $D/pkgs-n2 2>&1)"

echo "# tensors across nodes, 2 GiB and more"
TIDE_SESSION_DIR=$D/head timeout 400 $T run --address local tests/cluster/big_tensor.lua 2>&1

echo "# an object many nodes need: fetched from the nodes that have it"
out=$(node n6 --num-cpus 1 --name peer-node 2>&1)
check "every node that joins listens for the other nodes" \
  'nodes_up 4 10 && grep -q "listening for other nodes" $D/n6/node.log' "$out $(tail -3 $D/n6/node.log)"
PEER_NODE_PID_FILE=$D/n6/node.pid TIDE_SESSION_DIR=$D/head timeout 180 $T run --address local tests/cluster/broadcast.lua 2>&1
check "a node whose source node died midway says it fetched the rest from the head" \
  'grep -q "fetching the rest from the head" $D/n2/node.log' "$(tail -5 $D/n2/node.log)"
nodes_up 3 10

echo "# node death"
t0=$(now)
NODE1_PID_FILE=$D/n1/node.pid TIDE_SESSION_DIR=$D/head timeout 120 $T run --address local tests/cluster/node_death.lua 2>&1
check "the head logs the dead node" 'grep -q "node-1 .* died" $D/head/node.log' "$(tail -5 $D/head/node.log)"
out=$(node n3 --num-cpus 2 --resources '{"A":1}' 2>&1)
check "a replacement node joins as a new node" 'echo "$out" | grep -q "joined the head" && nodes_up 3 10' "$out"
n3id=$(sed -n 's/.*joined the head at .* as \(node-[0-9]*\).*/\1/p' $D/n3/node.log | head -1)  # holds resource A

echo "# lineage: a result lost in transit is made again"
out=$(node n4 --num-cpus 1 --name lineage-node 2>&1)
out=$(node n5 --num-cpus 1 --name nested-node 2>&1)
nodes_up 5 10
TIDE_SESSION_DIR=$D/head timeout 240 $T run --address local tests/cluster/lineage.lua 2>&1
if grep -q "running task .* again" $D/head/node.log; then
  echo "# the head re-ran the task whose result was lost in transit"
else
  echo "# the node died before its result reached the head (retried as a lost task)"
fi
check "the head made a nested task's object again from the lineage its node had sent" \
  'grep -q "making object .* again: the node that held it died" $D/head/node.log' "$(tail -5 $D/head/node.log)"
nodes_up 3 10

echo "# head death and restart"
cat > $D/before.lua <<'LUA'
local tide = require("tide")
local K = tide.actor({init = function(s) s.n = 0 end, incr = function(s) s.n = s.n + 1; return s.n end,
  node = function() return tide.get_runtime_context().node_id end})
local k = K:options({name = "keeper", lifetime = "detached", resources = {A = 0.5}}):remote()
local kept = tide.placement_group({{CPU = 1}}, {name = "kept-pg", lifetime = "detached"})
local gone = tide.placement_group({{CPU = 1}}, {name = "gone-pg"})
tide.get({kept:ready(), gone:ready()})
local pk = K:options({name = "pg-keeper", lifetime = "detached", placement_group = kept}):remote()
print("BEFORE", tide.get(k:incr()), tide.get(k:node()), require("tide.core").call_node("kv_put", "mn-key", "kept"))
print("PG-BEFORE", tide.get(pk:incr()), tide.get(pk:incr()))
LUA
out=$(TIDE_SESSION_DIR=$D/head timeout 60 $T run --address local $D/before.lua 2>&1)
check "a detached actor and a KV entry made before the head dies" 'echo "$out" | grep -q "BEFORE	1	$n3id	true"' "$out"
check "... and a detached actor in a detached placement group" 'echo "$out" | grep -q "PG-BEFORE	1	2"' "$out"
echo 'print("JOB RAN")' > $D/job.lua
TIDE_SESSION_DIR=$D/head $T submit $D/job.lua >/dev/null 2>&1
cat > $D/tcp_wait.lua <<'LUA'
local tide = require("tide")
local r = tide.remote(function() tide.sleep(120) return 1 end):options({num_cpus = 0}):remote()
io.stdout:write("WAITING\n"); io.stdout:flush()
print("GOT", pcall(tide.get, r, {timeout = 60}))
LUA
# A driver attached over TCP, blocked in a get when the head dies: it must
# learn at once that its link is gone (before, it waited for ever).
(cd / && timeout 100 $T run --address 127.0.0.1:$PORT --key $KEY $D/tcp_wait.lua > $D/tcp_wait.out 2>&1; echo "rc=$?" >> $D/tcp_wait.out) &
tcp_driver=$!
for i in $(seq 100); do grep -q WAITING $D/tcp_wait.out 2>/dev/null && break; sleep 0.1; done
# A driver on node n2, which has no A: what it submits while the head is
# gone waits on the node for the head to come back (before, it failed at
# once as infeasible), and runs where A is once the head is back.
cat > $D/held.lua <<'LUA'
local tide = require("tide")
local f = tide.remote(function(x) return x * 2, tide.get_runtime_context().node_id end)
tide.get(f:options({num_returns = 2, resources = {A = 0.5}}):remote(1))  -- known to the head
io.stdout:write("READY\n"); io.stdout:flush()
while not io.open(arg[1] .. "/headgone") do tide.sleep(0.05) end
local a, b = f:options({num_returns = 2, resources = {A = 0.5}}):remote(21)
io.stdout:write("SUBMITTED\n"); io.stdout:flush()
print("HELD", tide.get(a, {timeout = 60}), tide.get(b, {timeout = 60}))
LUA
lost_before=$(grep -c "lost the head" $D/n2/node.log)
(TIDE_SESSION_DIR=$D/n2 timeout 100 $T run --address local $D/held.lua $D > $D/held.out 2>&1) &
held_driver=$!
for i in $(seq 100); do grep -q READY $D/held.out 2>/dev/null && break; sleep 0.1; done
sleep 1
hpid=$(cat $D/head/node.pid)
kill -9 $hpid
for i in $(seq 50); do [ "$(grep -c "lost the head" $D/n2/node.log)" -gt "$lost_before" ] && break; sleep 0.1; done
touch $D/headgone
for i in $(seq 100); do grep -q SUBMITTED $D/held.out 2>/dev/null && break; sleep 0.1; done
sleep 4
t0=$(now)
wait $tcp_driver
took=$(echo "$(now) - $t0" | bc)
out=$(cat $D/tcp_wait.out)
check "a driver attached over TCP, waiting in a get when the head dies, stops with a clear error within 5 s ($took s)" \
  'echo "$out" | grep -q "lost the connection to the node" && echo "$out" | grep -q "rc=1" && [ "$(echo "$took < 5" | bc)" = 1 ]' "$out"
for i in $(seq 100); do   # until it is gone, or a zombie nobody reaped yet
  kill -0 $hpid 2>/dev/null || break
  grep -q '^State:.*Z' /proc/$hpid/status 2>/dev/null && break
  sleep 0.05
done
t0=$(now)
start_head >/dev/null 2>&1
nodes_up 3 15
t1=$(now)
took=$(echo "$t1 - $t0" | bc)
echo "# head restart to all nodes back: $took s"
check "after kill -9 of the head, a restarted head gets its nodes back" 'nodes_up 3 1' \
  "$(TIDE_SESSION_DIR=$D/head $T status 2>&1)"
cat > $D/after.lua <<'LUA'
local tide = require("tide")
local f = tide.remote(function(x) return x + 1, tide.get_runtime_context().node_id end)
local a, b = f:options({num_returns = 2, resources = {A = 0.5}}):remote(41)
print("AFTER", tide.get(a), tide.get(b))
LUA
out=$(TIDE_SESSION_DIR=$D/head timeout 60 $T run --address local $D/after.lua 2>&1)
wait $held_driver
held=$(cat $D/held.out)
check "work a node's driver submitted while the head was gone waited for it and ran where it could (A, on node $n3id)" \
  'echo "$held" | grep -q "HELD	42	$n3id"' "$held"
check "work placed on a rejoined node runs" 'echo "$out" | grep -q "AFTER	42	$n3id"' "$out"
check "the nodes log that they rejoined" 'grep -q "rejoined the head" $D/n2/node.log' "$(tail -5 $D/n2/node.log)"
cat > $D/resumed.lua <<'LUA'
local tide = require("tide")
local k = tide.get_actor("keeper")
print("RESUMED", tide.get(k:incr(), {timeout = 30}), tide.get(k:node()),
  require("tide.core").call_node("kv_get", "mn-key"))
print("PG-KEEPER", tide.get(tide.get_actor("pg-keeper"):incr(), {timeout = 30}))
local pg = tide.get_placement_group("kept-pg")
local f = tide.remote(function() return "in kept-pg" end)
print("PG", tide.get(pg:ready(), {timeout = 30}), tide.get(f:options({placement_group = pg}):remote(), {timeout = 30}),
  pcall(tide.get_placement_group, "gone-pg"))
tide.remove_placement_group(pg)
LUA
out=$(TIDE_SESSION_DIR=$D/head timeout 60 $T run --address local $D/resumed.lua 2>&1)
check "the restarted head adopts its detached actor where it still runs (state kept, init not run again) and resumes its KV from head.db" \
  'echo "$out" | grep -q "RESUMED	2	$n3id	kept" && grep -q "adopted detached actor .* keeper" $D/head/node.log' "$out $(grep -i adopt $D/head/node.log)"
check "the restarted head adopts the detached actor of its detached placement group where it still runs (its bundle placed there again)" \
  'echo "$out" | grep -q "PG-KEEPER	3" && grep -q "adopted detached actor .* pg-keeper" $D/head/node.log' "$out $(grep -i adopt $D/head/node.log)"
check "the restarted head reserves its detached placement group again; the driver's other group went with the driver" \
  'echo "$out" | grep -q "PG	true	in kept-pg	false"' "$out"
out=$(TIDE_SESSION_DIR=$D/head $T job list 2>&1)
check "the restarted head still lists the job it ran" 'echo "$out" | grep -q "SUCCEEDED"' "$out"

stop_all
check "tide stop stops every daemon" '! TIDE_SESSION_DIR=$D/head $T status >/dev/null 2>&1'
check "a head stopped on purpose leaves no state to resume" '[ ! -e $D/head/head.db ]'
echo "1..$n"
