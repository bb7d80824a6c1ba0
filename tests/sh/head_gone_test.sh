#!/bin/sh
# A node whose head is gone keeps serving its own drivers and workers while
# it tries to rejoin: a head and one node, a driver attached to the node,
# kill -9 of the head, then 7 s of small tasks (a whole cycle of the node's
# tries to rejoin). A blocking JOIN stalled the node 5 s in every 6.
cd "$(dirname "$0")/../.."
. tests/sh/lib.sh
T=$(pwd)/bin/tide
D=$(mktemp -d /tmp/tide-head-gone-XXXXXX)
PORT=$((25000 + $$ % 1000))
trap 'for s in head n1; do TIDE_SESSION_DIR=$D/$s $T stop >/dev/null 2>&1; done; rm -rf "$D"' EXIT
TIDE_SESSION_DIR=$D/head $T start --head --port $PORT --num-cpus 0 --node-timeout 2 >/dev/null 2>&1
TIDE_SESSION_DIR=$D/n1 $T start --address 127.0.0.1:$PORT --key $D/head/cluster.key --num-cpus 2 \
  --node-timeout 2 >/dev/null 2>&1
for i in $(seq 100); do
  [ "$(TIDE_SESSION_DIR=$D/head $T status 2>/dev/null | grep -c '^node-')" -ge 2 ] && break
  sleep 0.1
done
cat > $D/local.lua <<'LUA'
local tide = require("tide")
local clock = require("tide.core").now
local f = tide.remote(function() return 1 end)
tide.get(f:remote())
os.execute("kill -9 $(cat " .. arg[1] .. "/head/node.pid)")
local worst, k, t_end = 0, 0, clock() + 7
while clock() < t_end do
  local t0 = clock()
  tide.get(f:remote(), {timeout = 30})
  worst = math.max(worst, clock() - t0)
  k = k + 1
  tide.sleep(0.05)
end
print(string.format("LOCAL %d %.3f", k, worst))
LUA
out=$(TIDE_SESSION_DIR=$D/n1 timeout 60 $T run --address local $D/local.lua $D 2>&1)
slow=$(echo "$out" | sed -n 's/^LOCAL [0-9]* //p')
check "with its head gone a node runs its driver's tasks without stalls (slowest ${slow:-?} s, under 1.5)" \
  '[ -n "$slow" ] && [ "$(echo "$slow < 1.5" | bc)" = 1 ]' "$out"
check "... while it tries to rejoin" 'grep -q "cannot join the head" $D/n1/node.log' "$(tail -5 $D/n1/node.log)"
TIDE_SESSION_DIR=$D/head $T start --head --port $PORT --num-cpus 0 --node-timeout 2 >/dev/null 2>&1
for i in $(seq 150); do grep -q "rejoined the head" $D/n1/node.log && break; sleep 0.1; done
check "and rejoins once the head is back" 'grep -q "rejoined the head" $D/n1/node.log' "$(tail -5 $D/n1/node.log)"
plan
