#!/bin/sh
# Per-task and per-actor slices of a worker's log: two calls that run
# interleaved in one actor (max_concurrency 2) print distinct lines; `tide
# logs task ID` shows each call only its own lines (running or ended),
# `tide logs actor ID` only that actor's, a failed task only its own, and
# the dashboard's /api/logs the same. Then what tasks and calls write with
# io.write, io.stdout:write, io.stderr:write and io.output():write, partial
# lines too, mixed with prints: each slice has its own bytes in order, the
# driver gets them once, and without a daemon (tide run) they are on the
# terminal once, in order with the prints. TAP output.
cd "$(dirname "$0")/../.."
. tests/sh/lib.sh
head_session logslice 26000

# Without a daemon: a task's writes reach tide run's stdout and stderr once,
# in the order the task made them with its prints.
cat > "$W/embedded.lua" <<'LUA'
local tide = require("tide")
tide.get(tide.remote(function()
  print("EMB p1"); io.write("EMB w1 "); io.write("w2\n"); io.stderr:write("EMB e1\n"); print("EMB p2")
end):remote())
LUA
$T run "$W/embedded.lua" > "$W/emb.out" 2> "$W/emb.err"
s=$(sed 's/^(.* pid=[0-9]*) //' "$W/emb.out")
check "tide run without a daemon: a task's io.write on stdout once, in order with its prints" \
  '[ "$s" = "$(printf "EMB p1\nEMB w1 w2\nEMB p2")" ]' "$(cat "$W/emb.out")"
check "tide run without a daemon: its io.stderr:write on stderr once" \
  '[ "$(grep -c "EMB e1" "$W/emb.err")" = 1 ] && ! grep -q "EMB e1" "$W/emb.out"' "$(cat "$W/emb.err")"

out=$($T start --head --num-cpus 2 --port $PORT --dashboard-port $DPORT 2>&1)
check "a head starts" 'echo "$out" | grep -q "node started"' "$out"

cat > "$W/drv.lua" <<'LUA'
local tide = require("tide")
local A = tide.actor({
  work = function(self, tag, n)
    for i = 1, n do print(tag .. " line " .. i); tide.sleep(0.05) end
    local ctx = tide.get_runtime_context()
    return ctx.task_id .. " " .. ctx.actor_id
  end,
})
local a = A:options({max_concurrency = 2}):remote()
local r1, r2 = a:work("ALPHA", 6), a:work("BETA", 6)
local one, two = tide.get(r1), tide.get(r2)
local b = A:remote()
local three = tide.get(b:work("GAMMA", 2))
local bad = tide.remote(function()
  print("OMEGA before the error"); print(tide.get_runtime_context().task_id); error("boom")
end)
pcall(tide.get, bad:remote())
local f = io.open(arg[1] .. "/ids", "w")
f:write(one, "\n", two, "\n", three, "\n")
f:close()
-- A task followed while it runs: it says its id, waits to be followed, prints.
local slow = tide.remote(function(dir)
  local g = io.open(dir .. "/slow.tmp", "w"); g:write(tide.get_runtime_context().task_id); g:close()
  os.rename(dir .. "/slow.tmp", dir .. "/slow")
  while not io.open(dir .. "/following") do tide.sleep(0.05) end
  for i = 1, 5 do tide.sleep(0.3); print("SLOW line " .. i) end -- it ends as the last line lands
end)
tide.get(slow:remote(arg[1]))
while not io.open(arg[1] .. "/done") do tide.sleep(0.1) end
LUA
$T run --address local "$W/drv.lua" "$W" > "$W/drv.out" 2>&1 &
KILL=$!
for i in $(seq 1 300); do [ -s "$W/ids" ] && break; sleep 0.1; done
check "the driver ran its calls" '[ "$(wc -l < "$W/ids")" = 3 ]' "$(cat $W/drv.out)"
T1=$(sed -n 1p "$W/ids" | cut -d" " -f1); ACT=$(sed -n 1p "$W/ids" | cut -d" " -f2)
WK=$($T list actors --filter actor_id=$ACT --json 2>&1 | sed -n 's/.*"worker_id":"\([0-9a-f]*\)".*/\1/p')
T2=$(sed -n 2p "$W/ids" | cut -d" " -f1); T3=$(sed -n 3p "$W/ids" | cut -d" " -f1)
FT=$($T list tasks --filter state=FAILED --json 2>&1 | sed -n 's/.*"task_id":"\([0-9a-f]*\)".*/\1/p' | head -1)

# The worker's whole log has both calls' lines, interleaved.
whole=$($T logs worker $WK 2>&1)
order=$(echo "$whole" | grep -o "ALPHA line\|BETA line" | uniq | wc -l)
check "the two calls ran interleaved on one worker (its whole log mixes them)" \
  '[ "$(echo "$whole" | grep -c "ALPHA line")" = 6 ] && [ "$(echo "$whole" | grep -c "BETA line")" = 6 ] && [ "$order" -gt 2 ]' \
  "$whole"

s1=$($T logs task $T1 2>&1)
check "tide logs task: the first call's six lines, and nothing else" \
  '[ "$(echo "$s1" | grep -c "ALPHA line [1-6]$")" = 6 ] && [ "$(echo "$s1" | wc -l)" = 6 ]' "$s1"
s2=$($T logs task $T2 2>&1)
check "tide logs task: the second call's six lines, and nothing else" \
  '[ "$(echo "$s2" | grep -c "BETA line [1-6]$")" = 6 ] && [ "$(echo "$s2" | wc -l)" = 6 ]' "$s2"
s=$($T logs task $T1 --tail 2 2>&1)
check "tide logs task --tail 2: its last two lines" \
  '[ "$(echo "$s" | wc -l)" = 2 ] && echo "$s" | tail -1 | grep -q "ALPHA line 6$" && echo "$s" | head -1 | grep -q "ALPHA line 5$"' "$s"
s=$($T logs actor $ACT 2>&1)
check "tide logs actor: both of its calls' lines, not another actor's" \
  '[ "$(echo "$s" | grep -c "ALPHA line")" = 6 ] && [ "$(echo "$s" | grep -c "BETA line")" = 6 ] &&
   ! echo "$s" | grep -q GAMMA && [ "$(echo "$s" | wc -l)" = 12 ]' "$s"
s=$($T logs task $T3 2>&1)
check "tide logs task: the other actor's call, its two lines" \
  '[ "$(echo "$s" | grep -c "GAMMA line")" = 2 ] && [ "$(echo "$s" | wc -l)" = 2 ]' "$s"
s=$($T logs task $FT 2>&1)
check "tide logs task on a failed task: its own prints only" \
  'echo "$s" | grep -q "OMEGA before the error" && ! echo "$s" | grep -q "ALPHA\|BETA\|GAMMA" && [ "$(echo "$s" | wc -l)" = 2 ]' \
  "$FT: $s"
s=$($T logs task 00000000000fffff 2>&1); rc=$?
check "tide logs task of a task never seen: exit 1, says so" \
  '[ $rc = 1 ] && echo "$s" | grep -q "no task 00000000000fffff"' "$rc $s"

for i in $(seq 1 100); do [ -s "$W/slow" ] && break; sleep 0.1; done
timeout 30 $T logs task "$(cat $W/slow)" --follow > "$W/follow.out" 2>&1 &
FOL=$!
sleep 0.5
touch "$W/following"
wait $FOL; rc=$?
s=$(cat "$W/follow.out")
check "tide logs task --follow: the task's lines as it prints them, and it ends when the task does" \
  '[ $rc = 0 ] && [ "$(echo "$s" | grep -c "SLOW line [1-5]$")" = 5 ] && [ "$(echo "$s" | wc -l)" = 5 ]' "rc $rc: $s"

j=$(curl -s "http://127.0.0.1:$DPORT/api/logs?kind=task&id=$T2&offset=0")
check "the dashboard's /api/logs for a task: only its lines" \
  '[ "$(echo "$j" | grep -o "BETA line" | wc -l)" = 6 ] && ! echo "$j" | grep -q ALPHA' "$j"
touch "$W/done"
wait $KILL
KILL=
# Its driver gone, the actor is dead: its lines are still found.
for i in $(seq 1 50); do $T list actors --filter actor_id=$ACT 2>/dev/null | grep -q DEAD && break; sleep 0.1; done
s=$($T logs actor $ACT 2>&1); rc=$?
check "tide logs actor after the actor ended: still its calls' lines" \
  '[ $rc = 0 ] && [ "$(echo "$s" | grep -c "ALPHA line")" = 6 ] && [ "$(echo "$s" | grep -c "BETA line")" = 6 ]' "rc $rc: $s"

# Writes from Lua: a task, and two calls interleaved in one actor, each
# writing partial lines between sleeps, to stdout and stderr, between prints.
cat > "$W/writes.lua" <<'LUA'
local tide = require("tide")
local function mix(tag)
  print(tag .. " p1")
  for i = 1, 3 do
    io.write(tag, " part", i, " "); tide.sleep(0.05); io.stdout:write("end", i, "\n")
    io.stderr:write(tag, " err", i, "\n")
  end
  io.output():write(tag, " out"); tide.sleep(0.05); io.write(" more", 7, "\n")
  print(tag .. " p2")
  return tide.get_runtime_context().task_id
end
local task = tide.remote(mix)
local A = tide.actor({
  init = function(self) io.write("INIT w\n") end,
  mix = function(self, tag) return mix(tag) end,
  id = function(self) return tide.get_runtime_context().actor_id end,
})
local a = A:options({max_concurrency = 2}):remote()
local rt, rx, ry = task:remote("TSK"), a:mix("XX"), a:mix("YY")
-- Past the 1 MiB a log read returns at once: 2.5 MiB in pieces and one write.
local big = tide.remote(function()
  for _ = 1, 5 do io.write(string.rep("b", 262144)) end
  io.write(string.rep("B", 1310720), "\n")
  return tide.get_runtime_context().task_id
end)
local rb = big:remote()
local f = io.open(arg[1] .. "/wids", "w")
f:write(tide.get(rt), "\n", tide.get(rx), "\n", tide.get(ry), "\n", tide.get(a:id()), "\n", tide.get(rb), "\n")
f:close()
while not io.open(arg[1] .. "/wdone") do tide.sleep(0.1) end -- the actor lives on till then
LUA
$T run --address local "$W/writes.lua" "$W" > "$W/writes.out" 2> "$W/writes.err" &
KILL=$!
poll 300 '[ -f "$W/wids" ] && [ "$(wc -l < "$W/wids")" = 5 ]'
check "the driver ran the writing task and calls" '[ "$(wc -l < "$W/wids")" = 5 ]' \
  "$(cat "$W/writes.out" "$W/writes.err")"
# What mix(TAG) writes, prints' prefixes left out.
want() {
  printf "%s p1\n" $1
  for i in 1 2 3; do printf "%s part%s end%s\n%s err%s\n" $1 $i $i $1 $i; done
  printf "%s out more7\n%s p2\n" $1 $1
}
strip() { sed 's/^(.* pid=[0-9]*) //'; }
for k in 1 2 3; do
  tag=$(echo TSK XX YY | cut -d" " -f$k); id=$(sed -n ${k}p "$W/wids")
  s=$($T logs task $id 2>&1 | strip)
  check "tide logs task: $tag's prints and writes, partial lines whole, in order, nothing else" \
    '[ "$s" = "$(want $tag)" ]' "$(printf "%s\n--- want:\n%s" "$s" "$(want $tag)")"
done
# The actor's slice is its calls' bytes as they came, interleaved: all of
# them and its init's, byte for byte, and nothing else.
AID=$(sed -n 4p "$W/wids")
s=$($T logs actor $AID 2>&1)
calls=$(($($T logs task $(sed -n 2p "$W/wids") | wc -c) + $($T logs task $(sed -n 3p "$W/wids") | wc -c)))
check "tide logs actor: its init's write and both calls' bytes, not the task's" \
  'echo "$s" | head -1 | grep -q "^INIT w$" && [ $(($(echo "$s" | wc -c) - 7)) = $calls ] &&
   [ "$(echo "$s" | grep -o "XX part[123] " | wc -l)" = 3 ] && [ "$(echo "$s" | grep -o "YY err[123]" | wc -l)" = 3 ] &&
   ! echo "$s" | grep -q TSK' "$calls bytes in the calls' slices; the actor's: $s"
WK=$($T list actors --filter actor_id=$AID --json 2>&1 | sed -n 's/.*"worker_id":"\([0-9a-f]*\)".*/\1/p')
whole=$($T logs worker $WK 2>&1)
check "the two calls' partial lines were interleaved in the worker" \
  'echo "$whole" | grep -q "XX part[123] .*YY\|YY part[123] .*XX"' "$whole"
s=$($T logs task $(sed -n 5p "$W/wids") 2>&1 | tr -s bB)
nb=$($T logs task $(sed -n 5p "$W/wids") 2>&1 | wc -c)
check "tide logs task: a 2.5 MiB slice whole, each byte once" '[ "$nb" = 2621441 ] && [ "$s" = bB ]' "$nb bytes: $s"
touch "$W/wdone"
wait $KILL
KILL=
# The driver writes what arrives as it arrives: concurrent calls' partial
# lines mix there, as they would on one terminal.
out=$(strip < "$W/writes.out")
check "the driver got each task's stdout bytes once (and no stderr bytes on stdout)" \
  '[ "$(echo "$out" | grep -o "TSK part[123] " | wc -l)" = 3 ] && [ "$(echo "$out" | grep -o "XX out" | wc -l)" = 1 ] &&
   [ "$(echo "$out" | grep -o " more7" | wc -l)" = 3 ] && [ "$(echo "$out" | grep -c "INIT w")" = 1 ] &&
   ! grep -q "err[123]" "$W/writes.out"' "$out"
check "the driver got each task's stderr bytes once, on stderr" \
  '[ "$(grep -c "^TSK err[123]$" "$W/writes.err")" = 3 ] && [ "$(grep -c "^XX err[123]$" "$W/writes.err")" = 3 ]' \
  "$(cat "$W/writes.err")"

# A task that never yields: a whole line, and a partial one it flushes,
# are in its slice while it still runs.
cat > "$W/live.lua" <<'LUA'
local tide = require("tide")
tide.get(tide.remote(function(dir)
  io.write("LIVE line\n"); io.write("FLUSHED part"); io.stdout:flush()
  local f = io.open(dir .. "/live.tmp", "w"); f:write(tide.get_runtime_context().task_id); f:close()
  os.rename(dir .. "/live.tmp", dir .. "/live")
  while not io.open(dir .. "/go") do end -- spins: nothing else sends its output
end):remote(arg[1]))
LUA
$T run --address local "$W/live.lua" "$W" > "$W/live.out" 2>&1 &
KILL=$!
poll 300 '[ -s "$W/live" ]'
poll 50 '$T logs task "$(cat "$W/live")" 2>&1 | grep -q "FLUSHED part"'
s=$($T logs task "$(cat "$W/live")" 2>&1)
touch "$W/go"
wait $KILL
KILL=
check "a running task's written line and flushed partial line are in its slice before it yields" \
  '[ "$s" = "$(printf "LIVE line\nFLUSHED part")" ]' "$s"
plan
