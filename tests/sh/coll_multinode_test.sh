#!/bin/sh
# tide.collective groups across nodes (lua/coll_net.c, stdlib/tide/
# collective.lua): real daemons on loopback (a head without CPUs, nodes that
# run the ranks), real TCP streams between the ranks. A group whose ranks
# sit on two nodes gives the same bytes as the same group on one node, for
# every op and collective, at sizes 0, 1, odd and 1 MiB, and in f16, bf16,
# i32, i64 and u8 (avg of integers refused clearly); a tensor returned with direct transport (tide.method)
# goes from an actor on node-1 to one on node-2 over the group, and
# tide.get of its ref still works; a group over 3 nodes with 2 ranks on one of them
# (hierarchical: shared memory inside the node, streams between nodes)
# agrees with one node too, and so does a group of 3 ranks over 2 nodes
# (the nodes' first ranks exchange instead of running the ring); the
# streams are AES-128-OCB (plain with --data-plane plain, and two such
# groups agree); a rank's node killed in the middle of allreduces fails the others at once with NodeDiedError
# naming the rank and node; tide.train with 2 workers spread over 2 nodes
# trains to the loss of the same run on one node, and when node-2 is
# killed mid-run, fit takes the survivor's NodeDiedError as a death and
# restarts from the checkpoint.
cd "$(dirname "$0")/../.."
. tests/sh/lib.sh
T=$(pwd)/bin/tide
D=$(mktemp -d /tmp/tide-collmn-XXXXXX)
stop_all() { for s in head n1 n2 n3; do TIDE_SESSION_DIR=$D/$s $T stop >/dev/null 2>&1; done; }
trap 'stop_all; rm -rf "$D"' EXIT
PORT=$((24000 + $$ % 1000))
KEY=$D/head/cluster.key
# cluster NODES "FLAGS": a fresh head and NODES nodes (node-1..), in order.
cluster() {
  stop_all
  rm -rf "$D/head" "$D/n1" "$D/n2" "$D/n3"
  TIDE_SESSION_DIR=$D/head $T start --head --port $PORT --num-cpus 0 --node-timeout 2 $2 >/dev/null 2>&1
  k=1
  while [ $k -le $1 ]; do
    TIDE_SESSION_DIR=$D/n$k $T start --address 127.0.0.1:$PORT --key $KEY --num-cpus 2 --node-timeout 2 \
      $2 >/dev/null 2>&1
    i=0
    while [ $i -lt 100 ]; do
      [ "$(TIDE_SESSION_DIR=$D/head $T status 2>/dev/null | grep -c '^node-')" = "$((k + 1))" ] && break
      sleep 0.1; i=$((i + 1))
    done
    k=$((k + 1))
  done
}
cat > $D/coll.lua <<'LUA'
-- Runs one group with its ranks on the nodes named in arg[2] (comma-
-- separated, rank order) and prints a line per result, its bytes hashed:
-- two placements agree when their lines are the same.
local tide = require("tide")
local T = require("tide.tensor")
local tag, where = arg[1], arg[2]
local nodes = {}
for s in where:gmatch("[^,]+") do nodes[#nodes + 1] = s end
local world = #nodes
local body = tide.remote({num_cpus = 0}, function(world, rank, name)
  local T = require("tide.tensor")
  local C = require("tide.collective")
  C.init_group(world, rank, name, {timeout = 30})
  -- Integers in f32: any order of summing gives the same bytes.
  local function data(n, salt)
    local v = {}
    for i = 1, n do v[i] = ((i * 7 + rank * 13 + salt) % 101) - 50 end
    return T.from_table(v)
  end
  local function hash(t)
    if t:numel() == 0 then return "empty" end
    local w = T.arange(t:numel(), {dtype = "f32"})
    local v = t:to_table()
    return string.format("%d %.17g %.17g %.17g %.17g", t:numel(), t:sum(), T.dot(t, w), v[1], v[#v])
  end
  local out = {}
  for _, n in ipairs({0, 1, 7, 1001, 262144}) do
    for _, op in ipairs({"sum", "avg", "max", "min"}) do
      local x = data(n, #op)
      C.allreduce(x, op)
      out[#out + 1] = string.format("allreduce %s %d: %s", op, n, hash(x))
    end
    local g = T.zeros({n * world})
    C.allgather(data(n, 3), g)
    out[#out + 1] = string.format("allgather %d: %s", n, hash(g))
    local rs = T.zeros({C.chunk_count(n, world, rank)})
    C.reduce_scatter(data(n, 5), rs, "sum")
    out[#out + 1] = string.format("reduce_scatter %d: %s", n, hash(rs))
    local b = data(n, 9)
    C.broadcast(b, world - 1)
    out[#out + 1] = string.format("broadcast %d: %s", n, hash(b))
    if rank == 0 then C.send(data(n, 11), world - 1)
    elseif rank == world - 1 then
      local r = T.zeros({n})
      C.recv(r, 0)
      out[#out + 1] = string.format("recv %d: %s", n, hash(r))
    end
    C.barrier()
  end
  -- Every other dtype, compared as f32 (small integers: exact in each;
  -- u8 sums wrap the same way wherever the ranks are).
  for _, dt in ipairs({"f16", "bf16", "i32", "i64", "u8"}) do
    local function typed(n, salt)
      local v = {}
      for i = 1, n do v[i] = ((i * 7 + rank * 13 + salt) % 101) - (dt == "u8" and 0 or 50) end
      return T.from_table(v, {dtype = dt})
    end
    for _, n in ipairs({7, 262144}) do
      local ops = dt:find("^[bf]") and {"sum", "avg", "max", "min"} or {"sum", "max", "min"}
      for _, op in ipairs(ops) do
        local x = typed(n, #op)
        C.allreduce(x, op)
        out[#out + 1] = string.format("%s allreduce %s %d: %s", dt, op, n, hash(x:to("f32")))
      end
      local g = T.zeros({n * world}, {dtype = dt})
      C.allgather(typed(n, 3), g)
      out[#out + 1] = string.format("%s allgather %d: %s", dt, n, hash(g:to("f32")))
      local b = typed(n, 9)
      C.broadcast(b, world - 1)
      out[#out + 1] = string.format("%s broadcast %d: %s", dt, n, hash(b:to("f32")))
    end
  end
  local ok, e = pcall(C.allreduce, T.zeros({3}, {dtype = "i32"}), "avg")
  out[#out + 1] = "i32 avg: " .. (ok and "accepted" or tostring(e):match("avg needs a float tensor") or tostring(e))
  out.where = string.format("on %s, group over %d nodes", require("tide.core").context().node_id, C.num_nodes())
  return out
end)
local refs = {}
for r = 0, world - 1 do
  refs[r + 1] = body:options({scheduling_strategy = {node_id = nodes[r + 1]}}):remote(world, r, tag)
end
local t0 = os.time()
local res = tide.get(refs, {timeout = 120})
for r = 1, world do
  for _, line in ipairs(res[r]) do print(string.format("rank %d %s", r - 1, line)) end
  print(string.format("where rank %d %s", r - 1, res[r].where))
end
io.stderr:write(string.format("took %d s\n", os.time() - t0))
LUA
coll() { TIDE_SESSION_DIR=$D/head timeout 200 $T run --address local $D/coll.lua "$@" 2>&1; }
same() { [ -n "$1" ] && [ "$1" = "$2" ] && ! echo "$1" | grep -q "not\|rror"; }

echo "# two nodes (encrypted, the default)"
cluster 3 ""
one=$(coll one2 node-1,node-1)
two=$(coll two2 node-1,node-2)
check "2 ranks on 2 nodes: every collective and op, sizes 0/1/7/1001/1 MiB, the same bytes as on one node" \
  'same "$(echo "$one" | grep "^rank")" "$(echo "$two" | grep "^rank")"' \
  "$(echo "$one" > $D/a; echo "$two" > $D/b; diff $D/a $D/b | head -20)"
check "the ranks ran on node-1 and node-2, in a group over 2 nodes" \
  'echo "$two" | grep -q "where rank 0 on node-1, group over 2 nodes" && echo "$two" | grep -q "where rank 1 on node-2, group over 2 nodes"' \
  "$(echo "$two" | grep where)"
check "the 1 MiB allreduce sum is the one computed by hand" \
  'echo "$two" | grep -q "^rank 1 allreduce sum 262144: 262144 "' "$(echo "$two" | grep "allreduce sum 262144")"
check "f16, bf16, i32, i64 and u8 cross nodes too (in the same bytes as on one node, above); the 1 MiB i64 sum is right" \
  'echo "$two" | grep -q "^rank 1 i64 allreduce sum 262144: 262144 " && [ "$(echo "$two" | grep -c "^rank 1 u8 ")" = 10 ]' \
  "$(echo "$two" | grep "i64 allreduce sum\|u8" | head -5)"
check "avg of an integer tensor is refused clearly across nodes" \
  '[ "$(echo "$two" | grep -c "i32 avg: avg needs a float tensor")" = 2 ]' "$(echo "$two" | grep "i32 avg")"
cat > $D/rdt.lua <<'LUA'
-- Direct tensor transport across nodes: a producer actor on node-1, a
-- consumer on node-2, in one group; the consumer gets the bytes over the
-- group's streams, and the driver's tide.get fetches them through the store.
local tide = require("tide")
local W = tide.actor({
  setup = function(_, rank) require("tide.collective").init_group(2, rank, "rdt-mn", {timeout = 30}) end,
  make = tide.method({tensor_transport = "collective"}, function(_, n)
    return require("tide.tensor").randn({n}, {seed = 5})
  end),
  check = function(_, x, n)
    return x:to_bytes() == require("tide.tensor").randn({n}, {seed = 5}):to_bytes()
  end,
  stats = function() return require("tide.rdt").stats() end,
})
local p = W:options({own_process = true, scheduling_strategy = {node_id = "node-1"}}):remote()
local c = W:options({own_process = true, scheduling_strategy = {node_id = "node-2"}}):remote()
tide.get({p:setup(0), c:setup(1)}, {timeout = 60})
local n = 3 * 1024 * 1024 + 5
local r = p:make(n)
print("SAME", tide.get(c:check(r, n), {timeout = 60}))
print("RECEIVED", tide.get(c:stats()).received_bytes, "SENT", tide.get(p:stats()).sent_bytes)
local x = tide.get(r, {timeout = 60})
print("GET", x:numel() == n and x:to_bytes() == require("tide.tensor").randn({n}, {seed = 5}):to_bytes())
LUA
out=$(TIDE_SESSION_DIR=$D/head timeout 120 $T run --address local $D/rdt.lua 2>&1)
check "direct tensor transport across nodes: the consumer on node-2 gets the producer's bytes over the group" \
  'echo "$out" | grep -q "^SAME.true" && echo "$out" | grep -q "^RECEIVED.$((4 * (3 * 1024 * 1024 + 5))).SENT.$((4 * (3 * 1024 * 1024 + 5)))$"' "$out"
check "... and tide.get of the same ref in the driver fetches it through the store" \
  'echo "$out" | grep -q "^GET.true"' "$out"

# spread TAG PLACES NODES WHAT: the group on the nodes in PLACES (rank
# order) gives the same bytes as the same group on node-1 alone, and ran
# where asked, in a group over NODES nodes.
spread() {
  places=$2 nn=$3 w=$(echo "$2" | tr , "\n" | wc -l)
  one=$(coll "one$1" "$(echo "$2" | sed "s/node-[0-9]/node-1/g")")
  many=$(coll "many$1" "$2")
  check "$w ranks on $3 nodes ($4): the same bytes as $w ranks on one node" \
    'same "$(echo "$one" | grep "^rank")" "$(echo "$many" | grep "^rank")"' \
    "$(echo "$one" > $D/a; echo "$many" > $D/b; diff $D/a $D/b | head -20)"
  check "the $w ranks were on $(echo "$2" | tr , " "), in a group over $3 nodes" \
    '[ "$(echo "$many" | grep "^where" | sed "s/.* on \(node-[0-9]\),.*/\1/" | tr "\n" ",")" = "$places," ] &&
     [ "$(echo "$many" | grep -c "group over $nn nodes")" = "$w" ]' "$(echo "$many" | grep where)"
}
echo "# two nodes, two ranks on node-1 (the nodes' first ranks exchange, lua/coll_net.c)"
spread 3 node-1,node-2,node-1 2 "2 on node-1, odd sizes too"
echo "# three nodes, two ranks on node-1"
spread 4 node-1,node-2,node-1,node-3 3 "2 on node-1"

cat > $D/loop.lua <<'LUA'
-- Rank 0 on node-1 and rank 1 on node-2 allreduce 4 MiB over and over;
-- rank 0 writes arg[2] after a few rounds. Prints how rank 0 ended.
local tide = require("tide")
local body = tide.remote({num_cpus = 0}, function(rank, name, marker)
  local T = require("tide.tensor")
  local C = require("tide.collective")
  C.init_group(2, rank, name, {timeout = 30})
  local x = T.ones({1024 * 1024})
  for i = 1, 1e9 do
    C.allreduce(x, "max")
    if i == 3 and rank == 0 then io.open(marker, "w"):close() end
  end
end)
local r0 = body:options({scheduling_strategy = {node_id = "node-1"}}):remote(0, arg[1], arg[2])
local r1 = body:options({scheduling_strategy = {node_id = "node-2"}}):remote(1, arg[1], arg[2])
local ok, e = pcall(tide.get, r0, {timeout = 60})
print("RANK0", ok, tostring(e))
local ok1, e1 = pcall(tide.get, r1, {timeout = 60})
print("RANK1", ok1, tostring(e1))
LUA

echo "# a rank's node killed in the middle of allreduces"
rm -f $D/marker
TIDE_SESSION_DIR=$D/head timeout 120 $T run --address local $D/loop.lua kill1 $D/marker > $D/kill.out 2>&1 &
rp=$!
i=0
while [ $i -lt 300 ] && [ ! -e $D/marker ]; do sleep 0.1; i=$((i + 1)); done
t0=$(date +%s)
kill -9 "$(cat $D/n2/node.pid)" 2>/dev/null
wait $rp
t1=$(date +%s)
out=$(cat $D/kill.out)
check "the allreduces were running when node-2 was killed" '[ -e $D/marker ]' "$out"
check "rank 0 fails with NodeDiedError naming rank 1 on node-2, $((t1 - t0)) s after the kill (no hang)" \
  'echo "$out" | grep "^RANK0.false" | grep -q "NodeDiedError: allreduce failed: rank 1 on node-2" && [ $((t1 - t0)) -le 8 ]' "$out"

echo "# a record changed in flight"
stop_all
rm -rf "$D/head" "$D/n1" "$D/n2" "$D/n3"
TIDE_SESSION_DIR=$D/head $T start --head --port $PORT --num-cpus 0 --node-timeout 2 >/dev/null 2>&1
TIDE_SESSION_DIR=$D/n1 $T start --address 127.0.0.1:$PORT --key $KEY --num-cpus 2 --node-timeout 2 >/dev/null 2>&1
sleep 0.5
TIDE_COLL_TAMPER=40 TIDE_SESSION_DIR=$D/n2 $T start --address 127.0.0.1:$PORT --key $KEY --num-cpus 2 \
  --node-timeout 2 >/dev/null 2>&1
i=0
while [ $i -lt 100 ] && [ "$(TIDE_SESSION_DIR=$D/head $T status 2>/dev/null | grep -c '^node-')" != 3 ]; do
  sleep 0.1; i=$((i + 1))
done
out=$(TIDE_SESSION_DIR=$D/head timeout 120 $T run --address local $D/loop.lua tamper1 $D/marker2 2>&1)
check "rank 0 refuses the changed record: the allreduce fails naming rank 1 on node-2" \
  'echo "$out" | grep "^RANK0.false" | grep -q "allreduce failed: rank 1 on node-2: a record failed authentication"' "$out"
check "rank 1 fails too (its streams were closed), not hanging" 'echo "$out" | grep -q "^RANK1.false"' "$out"

echo "# --data-plane plain"
cluster 2 "--data-plane plain"
one=$(coll plain1 node-1,node-1)
two=$(coll plain2 node-1,node-2)
check "plain (authenticated, not encrypted): 2 ranks on 2 nodes give the same bytes as one node" \
  'same "$(echo "$one" | grep "^rank")" "$(echo "$two" | grep "^rank")" && echo "$two" | grep -q "group over 2 nodes"' \
  "$(echo "$one" > $D/a; echo "$two" > $D/b; diff $D/a $D/b | head -20)"

echo "# tide.train, 2 workers spread over 2 nodes"
cluster 2 ""
cat > $D/train.lua <<'LUA'
-- Linear regression by data-parallel SGD (gradients averaged with
-- ctx:allreduce), 2 workers of 1 CPU: PACK puts both on one node, SPREAD
-- one on each. Prints each run's final loss, where the ranks ran, and the
-- largest weight difference between the two runs.
local tide = require("tide")
local train = require("tide.train")
local dir = arg[1]
local loop = function(ctx, cfg)
  local Tn = require("tide.tensor")
  local C = require("tide.collective")
  local f = io.open(string.format("%s/%s-rank%d", cfg.dir, cfg.tag, ctx.rank), "w")
  f:write(require("tide.core").context().node_id, " ", C.num_nodes(ctx._group), "\n")
  f:close()
  local D, B = 64, 16
  local w_true = Tn.randn({D, 1}, {seed = 99})
  local w = Tn.zeros({D, 1})
  local per = B / ctx.world_size
  for step = 1, 30 do
    local X = Tn.randn({B, D}, {seed = 1000 + step})
    local lo = ctx.rank * per + 1
    local x = X:slice(1, lo, lo + per - 1):contiguous()
    local diff = Tn.sub(Tn.matmul(x, w), Tn.matmul(x, w_true))
    local loss = Tn.dot(diff, diff) / per
    local grad = Tn.scale(Tn.matmul(x, diff, {trans_a = true}), 2 / per)
    ctx:allreduce(grad, "avg")
    local l = Tn.from_table({loss})
    ctx:allreduce(l, "avg")
    Tn.add(w, grad, {alpha = 1, beta = -0.05, out = w})
    ctx:report({step = step, loss = l:to_table()[1]})
  end
  ctx:checkpoint({w = w})
end
local res = {}
for _, how in ipairs({"PACK", "SPREAD"}) do
  local r = train.fit({num_workers = 2, resources_per_worker = {num_cpus = 1}, placement_strategy = how,
    loop = loop, config = {dir = dir, tag = how}, checkpoint_dir = dir .. "/ck-" .. how, progress = false})
  res[how] = r
  local ranks = {}
  for k = 0, 1 do ranks[k + 1] = io.open(string.format("%s/%s-rank%d", dir, how, k)):read("*l") end
  print(string.format("%s loss %.9g first %.9g ranks on %s | %s", how, r.history[#r.history].loss,
    r.history[1].loss, ranks[1], ranks[2]))
end
local a = train.load_checkpoint(res.PACK.checkpoint).w:to_table()
local b = train.load_checkpoint(res.SPREAD.checkpoint).w:to_table()
local worst = 0
for i = 1, #a do worst = math.max(worst, math.abs(a[i][1] - b[i][1])) end
print(string.format("WEIGHTS %.3g", worst))
LUA
out=$(TIDE_SESSION_DIR=$D/head timeout 200 $T run --address local $D/train.lua $D 2>&1)
pl=$(echo "$out" | sed -n 's/^PACK loss \([^ ]*\) .*/\1/p')
sl=$(echo "$out" | sed -n 's/^SPREAD loss \([^ ]*\) .*/\1/p')
fl=$(echo "$out" | sed -n 's/^SPREAD loss [^ ]* first \([^ ]*\) .*/\1/p')
check "PACK ran both workers on one node, SPREAD one on each of 2 nodes (a group over 2 nodes)" \
  'echo "$out" | grep -Eq "^PACK .* ranks on (node-[12]) 1 \| \1 1$" &&
   echo "$out" | grep -Eq "^SPREAD .* ranks on node-[12] 2 \| node-[12] 2$" &&
   ! echo "$out" | grep -Eq "^SPREAD .* ranks on (node-[12]) 2 \| \1 2$"' "$out"
check "tide.train over 2 nodes trains (loss $fl -> $sl) to the loss of the one-node run ($pl), within 1e-5" \
  'awk -v a="$pl" -v b="$sl" -v f="$fl" "BEGIN { d = a - b; if (d < 0) d = -d; exit !(a != \"\" && b < f / 10 && d <= 1e-5 * (a > 1 ? a : 1)) }"' "$out"
check "and to the same weights (largest difference under 1e-5)" \
  'echo "$out" | awk "/^WEIGHTS/ { found = 1; ok = (\$2 + 0 < 1e-5) } END { exit !(found && ok) }"' "$out"

echo "# tide.train: a rank's node killed mid-run"
cluster 2 ""
cat > $D/trainkill.lua <<'LUA'
-- 2 workers SPREAD over node-1 and node-2, a checkpoint every 5 steps;
-- the rank on node-2 writes arg[2] at step 10 of the first attempt and the
-- test kills node-2 then. fit must restart (both ranks then on node-1)
-- from the last checkpoint and finish.
local tide = require("tide")
local train = require("tide.train")
local loop = function(ctx, cfg)
  local Tn = require("tide.tensor")
  local D, B = 32, 8
  local w_true = Tn.randn({D, 1}, {seed = 99})
  local w, start = Tn.zeros({D, 1}), 1
  local st = ctx:restore()
  if st then w, start = st.w, st.step + 1 end
  local node = require("tide.core").context().node_id
  local per = B / ctx.world_size
  for step = start, 40 do
    local X = Tn.randn({B, D}, {seed = 1000 + step})
    local lo = ctx.rank * per + 1
    local x = X:slice(1, lo, lo + per - 1):contiguous()
    local diff = Tn.sub(Tn.matmul(x, w), Tn.matmul(x, w_true))
    local grad = Tn.scale(Tn.matmul(x, diff, {trans_a = true}), 2 / per)
    ctx:allreduce(grad, "avg")
    Tn.add(w, grad, {alpha = 1, beta = -0.05, out = w})
    local l = Tn.from_table({Tn.dot(diff, diff) / per})
    ctx:allreduce(l, "avg")
    ctx:report({step = step, loss = l:to_table()[1]})
    if step % 5 == 0 then ctx:checkpoint({w = w, step = step}) end
    if step == 10 and node == "node-2" and not st then io.open(cfg.marker, "w"):close() end
    if not st then require("tide").sleep(0.1) end
  end
end
local ok, r = pcall(train.fit, {num_workers = 2, resources_per_worker = {num_cpus = 1},
  placement_strategy = "SPREAD", loop = loop, config = {marker = arg[2]}, checkpoint_dir = arg[1],
  max_failures = 2, progress = false})
if not ok then print("FAILED " .. tostring(r)) return end
local f = r.failures[1] or {}
-- A second failure can come from node-2 too: the next attempt may be
-- placed before the head has seen it die (the node timeout).
local kinds = {}
for _, x in ipairs(r.failures) do kinds[#kinds + 1] = tostring(x.kind) end
print(string.format("DONE attempts %d failures %d kind %s loss %.6g first %.6g steps %d kinds %s",
  r.attempts, #r.failures, tostring(f.kind), r.history[#r.history].loss, r.history[1].loss,
  r.history[#r.history].step, table.concat(kinds, ",")))
print("MESSAGE " .. tostring(f.message))
LUA
rm -f $D/tmarker
TIDE_SESSION_DIR=$D/head timeout 200 $T run --address local $D/trainkill.lua $D/ck-kill $D/tmarker > $D/tk.out 2>&1 &
rp=$!
i=0
while [ $i -lt 600 ] && [ ! -e $D/tmarker ]; do sleep 0.1; i=$((i + 1)); done
kill -9 "$(cat $D/n2/node.pid)" 2>/dev/null
wait $rp
out=$(cat $D/tk.out)
check "node-2 was killed while the 2 ranks trained across 2 nodes" '[ -e $D/tmarker ]' "$out"
check "fit counts the collective's NodeDiedError as a death, restarts from the checkpoint and finishes all 40 steps" \
  'echo "$out" | grep -Eq "^DONE attempts [23] failures [12] kind NodeDiedError .* steps 40 kinds (NodeDiedError|ActorDiedError|WorkerCrashedError)(,(NodeDiedError|ActorDiedError|WorkerCrashedError))?$"' "$out"
check "the failure names the collective's dead peer (rank and node) or the dead node" \
  'echo "$out" | grep "^MESSAGE" | grep -Eq "rank [01] on node-2|node-2"' "$out"
plan
