#!/bin/sh
# Nodes with addresses of their own: a head in this network namespace and
# two nodes in namespaces of their own (iproute2, veth pairs), joined over
# TCP with CURVE. Needs root and network namespaces; skipped (visibly)
# where they are not available.
cd "$(dirname "$0")/../.."
T=$(pwd)/bin/tide
n=0
ok() { n=$((n + 1)); echo "ok $n - $1"; }
no() { n=$((n + 1)); echo "not ok $n - $1"; [ -n "$2" ] && echo "$2" | sed 's/^/# /' | head -30; }
check() { if eval "$2"; then ok "$1"; else no "$1" "$3"; fi; }
S=$$
NS1=tide-n1-$S NS2=tide-n2-$S
if [ "$(id -u)" != 0 ] || ! ip netns add $NS1 2>/dev/null; then
  echo "ok 1 - # SKIP network namespaces need root and iproute2"
  echo "1..1"
  exit 0
fi
ip netns add $NS2 || { ip netns del $NS1; echo "ok 1 - # SKIP network namespaces need root and iproute2"; echo "1..1"; exit 0; }
D=$(mktemp -d /tmp/tide-netns-XXXXXX)
PORT=$((21000 + S % 1000))
cleanup() {
  for s in head n1 n2; do TIDE_SESSION_DIR=$D/$s $T stop >/dev/null 2>&1; done
  ip netns del $NS1 2>/dev/null; ip netns del $NS2 2>/dev/null
  ip link del tdh1-$S 2>/dev/null; ip link del tdh2-$S 2>/dev/null
  rm -rf "$D"
}
trap cleanup EXIT
# One veth pair per node: 10.<a>.<b>.1 on the head's side, .2 in the node's.
setup() {
  k=0
  for ns in $NS1 $NS2; do
    k=$((k + 1))
    net="10.$((100 + k)).$((S % 250))"
    ip link add tdh$k-$S type veth peer name tdn$k-$S &&
      ip link set tdn$k-$S netns $ns &&
      ip addr add $net.1/24 dev tdh$k-$S &&
      ip link set tdh$k-$S up &&
      ip netns exec $ns ip addr add $net.2/24 dev tdn$k-$S &&
      ip netns exec $ns ip link set tdn$k-$S up &&
      ip netns exec $ns ip link set lo up || return 1
  done
}
if ! setup 2>/dev/null; then
  echo "ok 1 - # SKIP cannot make veth pairs between network namespaces here"
  echo "1..1"
  exit 0
fi
NET1="10.101.$((S % 250))" NET2="10.102.$((S % 250))"

TIDE_SESSION_DIR=$D/head $T start --head --port $PORT --num-cpus 0 >/dev/null 2>&1
out1=$(TIDE_SESSION_DIR=$D/n1 ip netns exec $NS1 $T start --address $NET1.1:$PORT --key $D/head/cluster.key \
  --num-cpus 1 --name ns-one 2>&1)
out2=$(TIDE_SESSION_DIR=$D/n2 ip netns exec $NS2 $T start --address $NET2.1:$PORT --key $D/head/cluster.key \
  --num-cpus 1 --name ns-two 2>&1)
check "nodes in their own network namespaces join the head at its veth addresses" \
  'echo "$out1" | grep -q "joined the head" && echo "$out2" | grep -q "joined the head"' "$out1 $out2"
cat > $D/drv.lua <<'LUA'
local tide = require("tide")
local names = {}
for _, n in ipairs(tide.nodes()) do names[#names + 1] = n.name end
table.sort(names)
print("NODES " .. table.concat(names, ","))
local f = tide.remote(function(s)
  -- The address this node's worker sees for itself.
  local ip = io.popen("ip -4 -o addr show scope global"):read("*a"):match("inet (%d+%.%d+%.%d+%.%d+)")
  return tide.get_runtime_context().node_id .. " " .. tostring(ip) .. " " .. #s
end)
local big = string.rep("n", 12 * 1024 * 1024)
for _, id in ipairs({"node-1", "node-2"}) do
  print("RAN " .. tide.get(f:options({scheduling_strategy = {node_id = id}}):remote(big), {timeout = 60}))
end
LUA
out=$(TIDE_SESSION_DIR=$D/head timeout 120 $T run --address local $D/drv.lua 2>&1)
check "the head lists both nodes" 'echo "$out" | grep -q "^NODES.*ns-one,ns-two"' "$out"
check "work and a 12 MiB argument reach each node, which has its own address" \
  'echo "$out" | grep -q "RAN node-1 $NET1.2 12582912" && echo "$out" | grep -q "RAN node-2 $NET2.2 12582912"' "$out"
echo "1..$n"
