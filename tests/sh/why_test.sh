#!/bin/sh
# Why is it stuck: a tide.get / tide.wait that waits longer than
# TIDE_HANG_WARN_S says once why (a task queued for a GPU an actor holds; a
# long-running task, with its worker's Lua stack), the node names a task
# that makes no progress once, and `tide status --why ID` explains an
# object, a task waiting for its arguments and a call queued at its actor.
cd "$(dirname "$0")/../.."
T=$(pwd)/bin/tide
n=0
ok() { n=$((n + 1)); echo "ok $n - $1"; }
no() { n=$((n + 1)); echo "not ok $n - $1"; [ -n "$2" ] && echo "# $2"; }
check() { if eval "$2"; then ok "$1"; else no "$1" "$3"; fi; }
export TIDE_SESSION_DIR=$(mktemp -d /tmp/tide-why-test-XXXXXX)
rmdir "$TIDE_SESSION_DIR"
W=$(mktemp -d /tmp/tide-why-work-XXXXXX)
trap '$T stop >/dev/null 2>&1; rm -rf "$W" "$TIDE_SESSION_DIR"' EXIT
PORT=$((24000 + $$ % 1000))

cat > "$W/get.lua" <<'LUA'
local tide = require("tide")
local Holder = tide.actor({ping = function() return 1 end})
local h = Holder:options({num_gpus = 1}):remote()
tide.get(h:ping())
local gpu = tide.remote(function() return "gpu ran" end):options({num_gpus = 1, name = "needs_gpu"})
local r = gpu:remote()
print("REF", tostring(r))
local ok, err = pcall(tide.get, r, {timeout = 2.5})  -- waits 2.5 s: warns once, at 1 s
print("GET1", ok, err and err.kind)
local spin = tide.remote(function()
  for _ = 1, 60 do tide.sleep(0.05) end  -- the line it waits on
  return "spun"
end):options({name = "spinner"})
print("GET2", tide.get(spin:remote()))
local ready = tide.wait({r}, {timeout = 2})
print("WAIT", #ready)
tide.kill(h)
print("GET3", tide.get(r))
LUA
TIDE_HANG_WARN_S=1 $T run --num-cpus 2 --num-gpus 1 "$W/get.lua" > "$W/out" 2> "$W/err"
ref=$(sed -n 's/^REF	//p' "$W/out")
check "the script ends (the task runs once the actor lets the GPU go)" \
  'grep -q "^GET1	false	GetTimeoutError" "$W/out" && grep -q "^GET2	spun" "$W/out" && grep -q "^GET3	gpu ran" "$W/out"' \
  "$(cat "$W/out" "$W/err")"
check "a get on a task queued for a GPU an actor holds says so, once" \
  '[ "$(grep -c "tide.get has waited 1 s for $ref" "$W/err")" -eq 1 ] &&
   grep "tide.get has waited 1 s for $ref" "$W/err" | grep -q "task needs_gpu .* is queued for resources: it asks for [CPU=1, ]*GPU=1[, CPU=1]*; no node has that free now (node-0: .*GPU 0 of 1 free"' \
  "$(cat "$W/err")"
check "a get on a long-running task says where it runs and for how long, once" \
  '[ "$(grep -c "has waited 1 s for .*task spinner" "$W/err")" -eq 1 ] &&
   grep "task spinner" "$W/err" | grep -q "is running on node-0 in worker [0-9a-f]* (pid [0-9]*) for 1.0 s"' "$(cat "$W/err")"
check "its worker prints its Lua stack, at the line it spins on" \
  'grep -A4 "^(worker pid [0-9]* stack) stack traceback:" "$W/err" | grep -q "get.lua:11: in function"' "$(cat "$W/err")"
check "a wait warns too (once per wait, naming the task)" \
  '[ "$(grep -c "tide.wait has waited 1 s for $ref: .*needs_gpu" "$W/err")" -eq 1 ]' "$(cat "$W/err")"
check "the node does not name a task a waiter already warned about" '! grep -q "no progress for" "$W/err"' "$(cat "$W/err")"

# No waiter: the node itself names the stuck task, once.
cat > "$W/node.lua" <<'LUA'
local tide = require("tide")
local Holder = tide.actor({ping = function() return 1 end})
local h = Holder:options({num_gpus = 1}):remote()
tide.get(h:ping())
local r = tide.remote(function() return 1 end):options({num_gpus = 1, name = "starved"}):remote()
tide.sleep(3.5)
tide.kill(h)
print("GOT", tide.get(r))
LUA
TIDE_HANG_WARN_S=1 $T run --num-cpus 2 --num-gpus 1 "$W/node.lua" > "$W/out" 2> "$W/err"
check "a task that makes no progress is named once by the node, with its reason" \
  'grep -q "^GOT	1" "$W/out" && [ "$(grep -c "no progress for 1 s: task starved" "$W/err")" -eq 1 ] &&
   grep "task starved" "$W/err" | grep -q "asks for .*GPU=1"' "$(cat "$W/out" "$W/err")"
# A long queue that moves is not a hang: 40 tasks of 0.1 s on 1 CPU.
cat > "$W/queue.lua" <<'LUA'
local tide = require("tide")
local f = tide.remote(function() local t = require("tide.core").now(); while require("tide.core").now() - t < 0.1 do end return 1 end)
local r = {}
for i = 1, 40 do r[i] = f:remote() end
tide.sleep(4.5)
print("SUM", #tide.get(r))
LUA
TIDE_HANG_WARN_S=1 $T run --num-cpus 1 "$W/queue.lua" > "$W/out" 2> "$W/err"
check "a long queue that moves is not named (no warning over 4 s of a 1 s threshold)" \
  'grep -q "^SUM	40" "$W/out" && [ ! -s "$W/err" ]' "$(cat "$W/out" "$W/err")"
TIDE_HANG_WARN_S=0 $T run --num-cpus 2 --num-gpus 1 "$W/node.lua" > "$W/out" 2> "$W/err"
check "TIDE_HANG_WARN_S=0 turns the warnings off" 'grep -q "^GOT	1" "$W/out" && [ ! -s "$W/err" ]' "$(cat "$W/err")"

# tide status --why against a running node, while a driver waits.
out=$($T start --head --num-cpus 2 --num-gpus 1 --port $PORT 2>&1)
check "a head starts" '[ $? -eq 0 ]' "$out"
cat > "$W/hold.lua" <<'LUA'
local tide = require("tide")
local Holder = tide.actor({ping = function() return 1 end, nap = function(_, s) tide.sleep(s) return s end})
local h = Holder:options({num_gpus = 1}):remote()
tide.get(h:ping())
local r = tide.remote(function() return 1 end):options({num_gpus = 1, name = "needs_gpu"}):remote()
local d = tide.remote(function(x) return x end):options({name = "after_gpu"}):remote(r)
local n1 = h:nap(20)
tide.sleep(0.3)  -- the first call runs; the next queues behind it
local n2 = h:nap(0)
print("IDS", r:id(), d:id(), n2:id(), n1:id())
io.stdout:flush()
tide.sleep(20)
LUA
TIDE_HANG_WARN_S=0 $T run --address local "$W/hold.lua" > "$W/hold.out" 2>&1 &
hp=$!
for _ in $(seq 1 100); do grep -q "^IDS" "$W/hold.out" && break; sleep 0.1; done
set -- $(sed -n 's/^IDS	//p' "$W/hold.out")
gpu_ref=$1 after_ref=$2 queued_call=$3 long_call=$4
out=$($T status --why "$gpu_ref" 2>&1); st=$?
check "status --why REF: queued for a GPU nobody has free" \
  '[ $st -eq 0 ] && echo "$out" | grep -q "task needs_gpu (task_id [0-9a-f]*).* is queued for resources: it asks for .*GPU=1"' "$out $(cat "$W/hold.out")"
task=$(echo "$out" | sed -n 's/.*needs_gpu (task_id \([0-9a-f]*\)).*/\1/p')
out2=$($T status --why "$task" 2>&1); st=$?
check "status --why TASK_ID says the same of the task" '[ $st -eq 0 ] && echo "$out2" | grep -q "^task needs_gpu (task_id $task).*queued for resources"' "$out2"
out=$($T status --why "ObjectRef($after_ref)" 2>&1)
check "status --why on a task's result that waits for an argument names the argument's task" \
  'echo "$out" | grep -q "task after_gpu .* waits for 1 of its arguments" && echo "$out" | grep -q "argument 1: object $gpu_ref is pending; .*needs_gpu"' "$out"
out=$($T status --why "$queued_call" 2>&1)
check "status --why on an actor call behind a long call: sent to its actor's worker, runs after 1 call" \
  'echo "$out" | grep -q "actor call actor.nap .* was sent to worker [0-9a-f]* (pid [0-9]*) on node-0 [0-9.]* s ago and runs after the 1 call before it there"' "$out"
out=$($T status --why "$long_call" 2>&1)
check "status --why on the long call: running in its worker for how long" \
  'echo "$out" | grep -q "actor call actor.nap .* is running on node-0 in worker [0-9a-f]* (pid [0-9]*) for [0-9.]* s"' "$out"
out=$($T status --why 00000000deadbeef 2>&1); st=$?
check "status --why on an unknown id says so (exit 1)" '[ $st -eq 1 ] && echo "$out" | grep -q "knows no object or unfinished task 00000000deadbeef"' "$out"
out=$($T status --why nothex 2>&1); st=$?
check "status --why with a malformed id is a usage error" '[ $st -eq 2 ] && echo "$out" | grep -q "needs an ObjectRef.s or a task.s id" && echo "$out" | grep -q "see .tide status --help."' "$out"
out=$($T status --why 2>&1); st=$?
check "status --why without a value is a usage error" '[ $st -eq 2 ] && echo "$out" | grep -q "option --why needs a value"' "$out"
kill $hp 2>/dev/null
wait $hp 2>/dev/null
echo "1..$n"
