#!/bin/sh
# Per-task and per-actor slices of a worker's log: two calls that run
# interleaved in one actor (max_concurrency 2) print distinct lines; `tide
# logs task ID` shows each call only its own lines (running or ended),
# `tide logs actor ID` only that actor's, a failed task only its own, and
# the dashboard's /api/logs the same. TAP output.
cd "$(dirname "$0")/../.."
. tests/sh/lib.sh
head_session logslice 26000

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
plan
