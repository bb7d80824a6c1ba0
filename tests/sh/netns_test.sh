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
  ip link del tdh1-$S 2>/dev/null; ip link del tdh2-$S 2>/dev/null; ip link del tdp1-$S 2>/dev/null
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

# Other namespaces reach the head: it listens on every interface.
TIDE_SESSION_DIR=$D/head $T start --head --port $PORT --host 0.0.0.0 --num-cpus 0 >/dev/null 2>&1
out1=$(TIDE_SESSION_DIR=$D/n1 ip netns exec $NS1 $T start --address $NET1.1:$PORT --key $D/head/cluster.key \
  --num-cpus 1 --name ns-one --node-timeout 2 2>&1)
out2=$(TIDE_SESSION_DIR=$D/n2 ip netns exec $NS2 $T start --address $NET2.1:$PORT --key $D/head/cluster.key \
  --num-cpus 1 --name ns-two --node-timeout 2 2>&1)
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

# Nodes fetch a large object from each other at the addresses the head saw
# them at. The namespaces have no route to each other until a direct veth
# pair joins them; cut again, node-2's fetch from node-1 falls back to the
# head, and node-2 does not ask node-1 again for a while.
ip link add tdp1-$S type veth peer name tdp2-$S &&
  ip link set tdp1-$S netns $NS1 && ip link set tdp2-$S netns $NS2 &&
  ip netns exec $NS1 ip link set tdp1-$S up && ip netns exec $NS2 ip link set tdp2-$S up &&
  ip netns exec $NS1 ip route add $NET2.2/32 dev tdp1-$S &&
  ip netns exec $NS2 ip route add $NET1.2/32 dev tdp2-$S
cat > $D/bcast.lua <<'LUA'
local tide = require("tide")
local T = require("tide.tensor")
local H = tide.actor({hold = function(self, x) self.x = x; return x:get(x:numel()) end})
local function on(id) return {scheduling_strategy = {node_id = id}} end
local r = tide.put(T.full({6 * 1024 * 1024}, 2))
-- node-1 first, then node-2, which the head sends to node-1 for it.
local hs = {H:options(on("node-1")):remote(), H:options(on("node-2")):remote()}
local got = {tide.get(hs[1]:hold(r), {timeout = 60})}
got[2] = tide.get(hs[2]:hold(r), {timeout = 60})
tide.sleep(1.3)  -- a heartbeat
local peers = 0
for _, nd in ipairs(tide.nodes()) do peers = peers + (nd.stats.bytes_from_peers or 0) end
print("HELD " .. got[1] .. " " .. got[2] .. " PEERS " .. string.format("%d", peers))
LUA
bcast() { TIDE_SESSION_DIR=$D/head timeout 120 $T run --address local $D/bcast.lua 2>&1; }
fallbacks() { cat $D/n1/node.log $D/n2/node.log | grep -c "fetching the rest from the head"; }
out=$(bcast)
check "two nodes in their own namespaces fetch a 24 MiB object from each other, at the addresses the head saw them at" \
  'echo "$out" | grep -Eq "^HELD 2 2 PEERS (2516[0-9]{4}|[3-9][0-9]{7})"' "$out"
check "the nodes open data-plane streams to the head at its veth addresses (AES-128-OCB)" \
  'grep -q "data plane: stream to $NET1.1:[0-9]* up (AES-128-OCB, libgcrypt)" $D/n1/node.log &&
   grep -q "data plane: stream to $NET2.1:[0-9]* up (AES-128-OCB, libgcrypt)" $D/n2/node.log' \
  "$(grep -h 'data plane' $D/n1/node.log $D/n2/node.log)"
# A tide.collective group over the two namespaces: rank 0 on node-1, rank
# 1 on node-2, streams between the nodes' own addresses (AES-128-OCB).
cat > $D/coll.lua <<'LUA'
local tide = require("tide")
local body = tide.remote({num_cpus = 0}, function(rank)
  local T = require("tide.tensor")
  local C = require("tide.collective")
  C.init_group(2, rank, "netns", {timeout = 30})
  local res = {}
  for _, n in ipairs({7, 262144}) do
    local v = {}
    for i = 1, n do v[i] = (i * 7 + rank * 13) % 101 - 50 end
    local x = T.from_table(v)
    C.allreduce(x, "sum")
    res[#res + 1] = string.format("%d:%.17g", n, T.dot(x, T.arange(n, {dtype = "f32"})))
  end
  return C.num_nodes() .. " " .. table.concat(res, " ")
end)
local function on(id) return {scheduling_strategy = {node_id = id}} end
local got = tide.get({body:options(on("node-1")):remote(0), body:options(on("node-2")):remote(1)}, {timeout = 90})
-- The same sums made here, in f64 (integers: exact either way).
local want = {}
for _, n in ipairs({7, 262144}) do
  local d = 0
  for i = 1, n do d = d + ((i * 7) % 101 - 50 + (i * 7 + 13) % 101 - 50) * (i - 1) end
  want[#want + 1] = string.format("%d:%.17g", n, d)
end
print("GOT " .. got[1] .. " | " .. got[2])
print("WANT 2 " .. table.concat(want, " "))
LUA
out=$(TIDE_SESSION_DIR=$D/head timeout 150 $T run --address local $D/coll.lua 2>&1)
want=$(echo "$out" | sed -n 's/^WANT //p')
check "a collective group over the two namespaces: the allreduce gives the sums made on one machine" \
  '[ -n "$want" ] && echo "$out" | grep -qxF "GOT $want | $want"' "$out"
# A host that goes silent in the middle of an operation fails it on both
# ranks within seconds (the sender: TCP acknowledged nothing for 5 s; the
# receiver: keepalive), not after the kernel's retries (minutes). Files
# order it: rank 0 says it sends, the link is cut, then rank 1 receives.
cat > $D/cut.lua <<'LUA'
local tide = require("tide")
local body = tide.remote({num_cpus = 0}, function(rank, dir)
  local T = require("tide.tensor")
  local C = require("tide.collective")
  local now = require("tide.rawbench").now
  C.init_group(2, rank, "netns-cut", {timeout = 30})
  local x = T.zeros({16 * 1024 * 1024})
  C.barrier()
  if rank == 0 then
    io.open(dir .. "/sending", "w"):close()
  else
    while not io.open(dir .. "/cut") do tide.sleep(0.05) end
  end
  local t0 = now()
  local ok, err = pcall(rank == 0 and C.send or C.recv, x, 1 - rank)
  return string.format("%s %.1f %s", tostring(ok), now() - t0, tostring(err))
end)
local dir = arg[1]
local function on(id) return {scheduling_strategy = {node_id = id}} end
local got = tide.get({body:options(on("node-1")):remote(0, dir), body:options(on("node-2")):remote(1, dir)},
  {timeout = 90})
print("CUT0 " .. got[1])
print("CUT1 " .. got[2])
LUA
TIDE_SESSION_DIR=$D/head timeout 120 $T run --address local $D/cut.lua $D >$D/cut.out 2>&1 &
cutp=$!
i=0; while [ $i -lt 300 ] && [ ! -e $D/sending ]; do sleep 0.05; i=$((i + 1)); done
ip netns exec $NS1 ip link set tdp1-$S down
touch $D/cut
wait $cutp
out=$(cat $D/cut.out)
check "a node gone silent mid-send fails the operation on both ranks within 20 s (NodeDiedError), not the kernel's minutes" \
  'echo "$out" | grep -q "^CUT0 false .*NodeDiedError" && echo "$out" | grep -q "^CUT1 false .*NodeDiedError" &&
   echo "$out" | awk "/^CUT/ { if (\$3 + 0 > 20) bad = 1 } END { exit bad }"' "$out"
out=$(bcast)
check "with the link between them cut, the fetch stalls and finishes from the head" \
  'echo "$out" | grep -q "^HELD 2 2" && [ "$(fallbacks)" = 1 ]' "$out $(fallbacks)"
out=$(bcast)
check "... and the node that went silent is not asked again: no stall the next time" \
  'echo "$out" | grep -q "^HELD 2 2" && [ "$(fallbacks)" = 1 ]' "$out $(fallbacks)"
echo "1..$n"
