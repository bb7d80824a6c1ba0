#!/bin/sh
# The `tide run` CLI: exit codes, syntax and runtime errors, teardown (no
# worker left after a normal exit, an error, Ctrl-C, or kill -9 of the
# driver), worker print forwarding, and the --num-cpus / --num-gpus /
# --resources / --object-store-memory flags. Prints TAP.
cd "$(dirname "$0")/../.."
TIDE=bin/tide
D=$(mktemp -d /tmp/tide-cli-test.XXXXXX)
trap 'rm -rf "$D"' EXIT
n=0
ok()    { n=$((n + 1)); echo "ok $n - $1"; }
notok() { n=$((n + 1)); echo "not ok $n - $1"; shift; for l in "$@"; do echo "# $l"; done; }
check() {  # check NAME CONDITION-STATUS [diagnostics...]
  name=$1; st=$2; shift 2
  if [ "$st" -eq 0 ]; then ok "$name"; else notok "$name" "$@"; fi
}
tailof() { tail -c 600 "$1" | sed 's/^/  /'; }

# True if process $1 exists and is not a zombie.
running() {
  [ -r /proc/$1/stat ] || return 1
  st_=$(sed 's/^.*) \(.\).*/\1/' /proc/$1/stat 2>/dev/null) || return 1
  [ -n "$st_" ] && [ "$st_" != Z ] && [ "$st_" != X ]
}

# Waits up to $2 tenths of a second for every pid in $1 to be gone;
# prints the ones still alive.
alive_after() {
  i=0
  while :; do
    left=""
    for p in $1; do running "$p" && left="$left $p"; done
    [ -z "$left" ] && return 0
    [ "$i" -ge "$2" ] && { echo "$left"; return 1; }
    sleep 0.1; i=$((i + 1))
  done
}

# A driver that starts workers (tasks and an actor), reports their pids,
# then does $1: "ok", "error", or "block" (waits on a long task).
cat >"$D/workers.lua" <<'EOF'
local tide = require("tide")
local mode = arg[1]
local pid = tide.remote(function() return tide.get_runtime_context().pid end)
local A = tide.actor({init = function(self) end, pid = function(self) return tide.get_runtime_context().pid end})
local a = A:remote()
local pids = {tide.get(pid:remote()), tide.get(pid:remote()), tide.get(a:pid())}
local slow = tide.remote(function() tide.sleep(120) end)
local s = slow:remote()
tide.wait({s}, {timeout = 0.2})
io.stdout:write("DRIVER ", tide.get_runtime_context().pid, "\n")
io.stdout:write("WORKERS ", table.concat(pids, " "), "\n")
io.stdout:flush()
if mode == "error" then error("driver-failure-marker") end
if mode == "block" then tide.get(s) end
tide.cancel(s, {force = true})
EOF

# 1. --version / --help
out=$($TIDE --version 2>&1); st=$?
[ $st -eq 0 ] && [ -n "$out" ]; check "tide --version exits 0 and prints a version" $? "status $st: $out"
$TIDE --help >"$D/help" 2>&1; st=$?
[ $st -eq 0 ] && grep -q "run" "$D/help"; check "tide --help exits 0 and describes run" $? "status $st"

# 2. usage errors exit 2
$TIDE run --no-such-flag "$D/workers.lua" >"$D/o" 2>&1; st=$?
[ $st -eq 2 ] && grep -q -- "--no-such-flag" "$D/o"; check "unknown run option: exit 2 naming it" $? "status $st" "$(tailof $D/o)"
$TIDE no-such-command >"$D/o" 2>&1; st=$?
[ $st -eq 2 ]; check "unknown command: exit 2" $? "status $st"
$TIDE run >"$D/o" 2>&1; st=$?
[ $st -eq 2 ]; check "run without a script: exit 2" $? "status $st"
$TIDE run --num-cpus abc "$D/workers.lua" >"$D/o" 2>&1; st=$?
[ $st -eq 2 ] && grep -q -- "--num-cpus" "$D/o"; check "--num-cpus abc: exit 2 naming the flag" $? "status $st" "$(tailof $D/o)"
printf 'print("ran")\n' >"$D/hello.lua"
$TIDE run --resources '{bad json' "$D/hello.lua" >"$D/o" 2>&1; st=$?
[ $st -eq 2 ] && grep -q -- "--resources" "$D/o" && ! grep -q "^ran" "$D/o"
check "--resources with bad JSON: exit 2 before the script runs" $? "status $st" "$(tailof $D/o)"
$TIDE run --resources '[1,2]' "$D/hello.lua" >"$D/o" 2>&1; st=$?
[ $st -eq 2 ] && grep -q -- "--resources: not a JSON object" "$D/o" && grep -q "see 'tide run --help'" "$D/o" &&
  ! grep -q "^ran" "$D/o"
check "--resources with a JSON array: exit 2, a hint, before the script runs" $? "status $st" "$(tailof $D/o)"
$TIDE help nosuch >"$D/o" 2>&1; st=$?
[ $st -eq 2 ] && grep -q "no command nosuch" "$D/o"; check "tide help of no such command: exit 2, says so" $? "status $st" "$(tailof $D/o)"

# 2b. every command has its own --help (exit 0, on stdout, no node needed);
# a usage error is one line naming the mistake and a hint, not the usage
for c in run start stop status submit job repl bench serve; do
  TIDE_SESSION_DIR="$D/nosession" $TIDE $c --help >"$D/o" 2>"$D/e"; st=$?
  [ $st -eq 0 ] && head -1 "$D/o" | grep -q "^usage: tide $c" && [ ! -s "$D/e" ]
  check "tide $c --help prints its own usage and exits 0" $? "status $st" "$(tailof $D/o)" "$(tailof $D/e)"
done
$TIDE run --help >"$D/o" 2>&1
grep -q -- "--num-cpus" "$D/o" && grep -q -- "--address" "$D/o" && ! grep -q "unknown option" "$D/o" &&
  ! grep -q "tide start" "$D/o"
check "tide run --help lists run's options only" $? "$(tailof $D/o)"
$TIDE help start >"$D/o" 2>&1; st=$?
[ $st -eq 0 ] && head -1 "$D/o" | grep -q "^usage: tide start"; check "tide help start = tide start --help" $? "$(tailof $D/o)"
printf 'print(arg[1])\n' >"$D/echo1.lua"
out=$($TIDE run "$D/echo1.lua" --help 2>&1); st=$?
[ $st -eq 0 ] && [ "$out" = "--help" ]; check "--help after SCRIPT is the script's argument" $? "status $st: $out"
for cmdline in "run --no-such-flag $D/hello.lua|run|--no-such-flag" "start --head --no-such-flag|start|--no-such-flag" \
    "start --head --port abc|start|abc" "stop --bogus|stop|--bogus" "job|job|job needs" "job frob|job|frob" \
    "job status|job|needs a job ID" "submit|submit|SCRIPT" "serve|serve|serve needs" "run --num-cpus|run|needs a value" \
    "no-such-command||no-such-command"; do
  args=${cmdline%%|*}; rest=${cmdline#*|}; c=${rest%%|*}; what=${rest#*|}
  TIDE_SESSION_DIR="$D/nosession" $TIDE $args >"$D/o" 2>"$D/e"; st=$?
  hint="see 'tide --help'"; [ -n "$c" ] && hint="see 'tide $c --help'"
  [ $st -eq 2 ] && [ "$(wc -l <"$D/e")" -eq 2 ] && head -1 "$D/e" | grep -q -- "^tide: .*$what" &&
    [ "$(sed -n 2p "$D/e")" = "$hint" ] && [ ! -s "$D/o" ]
  check "usage error 'tide $args': exit 2, one line and the hint" $? "status $st" "$(tailof $D/e)"
done
[ ! -e "$D/nosession/node.pid" ]; check "a start with a bad option leaves no daemon" $?

# 2c. piped output keeps its order: the prints before an error come first
printf 'print("first-line")\nio.write("second-line\\n")\nerror("third-marker")\n' >"$D/order.lua"
$TIDE run "$D/order.lua" >"$D/o" 2>&1; st=$?
a=$(grep -n "first-line" "$D/o" | cut -d: -f1); b=$(grep -n "second-line" "$D/o" | cut -d: -f1)
c=$(grep -n "third-marker" "$D/o" | head -1 | cut -d: -f1)
[ $st -eq 1 ] && [ -n "$a" ] && [ -n "$b" ] && [ -n "$c" ] && [ "$a" -lt "$b" ] && [ "$b" -lt "$c" ]
check "stdout and stderr to one pipe: prints appear before the error's traceback" $? "status $st" "$(tailof $D/o)"

# 3. missing script
$TIDE run "$D/nope.lua" >"$D/o" 2>&1; st=$?
[ $st -ne 0 ] && grep -q "nope.lua" "$D/o"; check "missing script: non-zero exit naming the file" $? "status $st"

# 4. syntax error: exit 1 and file:line
printf 'local a = 1\nlocal b = = 2\n' >"$D/syntax.lua"
$TIDE run "$D/syntax.lua" >"$D/o" 2>&1; st=$?
[ $st -eq 1 ] && grep -q "syntax.lua:2:" "$D/o"; check "syntax error: exit 1 with file:line" $? "status $st" "$(tailof $D/o)"

# 5. runtime error: exit 1 with a traceback on stderr
printf 'local function inner() error("kaboom-marker") end\nlocal function outer() inner() end\nouter()\n' >"$D/err.lua"
$TIDE run "$D/err.lua" >"$D/o" 2>"$D/e"; st=$?
[ $st -eq 1 ] && grep -q "kaboom-marker" "$D/e" && grep -q "traceback" "$D/e" && grep -q "err.lua:3" "$D/e"
check "script error: exit 1 with message and traceback on stderr" $? "status $st" "$(tailof $D/e)"

# 6. an uncaught tide error table is printed readably
cat >"$D/tideerr.lua" <<'EOF'
local tide = require("tide")
local f = tide.remote(function() error("remote-marker") end)
tide.get(f:remote())
EOF
$TIDE run "$D/tideerr.lua" >"$D/o" 2>"$D/e"; st=$?
[ $st -eq 1 ] && grep -q "TaskError" "$D/e" && grep -q "remote-marker" "$D/e" && ! grep -q "table: 0x" "$D/e"
check "uncaught TaskError: exit 1, printed with kind and message" $? "status $st" "$(tailof $D/e)"

# 7. success, arg, os.exit status
printf 'assert(arg[1] == "x" and arg[2] == "y z" and #arg == 2, "bad arg")\nprint("args-ok")\n' >"$D/args.lua"
out=$($TIDE run "$D/args.lua" x "y z" 2>&1); st=$?
[ $st -eq 0 ] && [ "$out" = "args-ok" ]; check "script args are passed in arg; exit 0" $? "status $st: $out"
printf 'os.exit(7)\n' >"$D/exit7.lua"
$TIDE run "$D/exit7.lua" >/dev/null 2>&1; st=$?
[ $st -eq 7 ]; check "os.exit(7) in the driver gives status 7" $? "status $st"

# 8. teardown after a normal exit and after an error
for mode in ok error; do
  $TIDE run "$D/workers.lua" $mode >"$D/o" 2>"$D/e"; st=$?
  pids=$(sed -n 's/^WORKERS //p' "$D/o")
  want=0; [ $mode = error ] && want=1
  [ $st -eq $want ] && [ -n "$pids" ]; check "driver mode $mode: exit $want after starting workers" $? "status $st" "$(tailof $D/e)"
  left=$(alive_after "$pids" 50)
  check "no worker left after the driver exits ($mode)" $? "still alive:$left"
done

# 9. teardown on Ctrl-C (SIGINT) while the driver blocks in tide.get
env --default-signal=INT $TIDE run "$D/workers.lua" block >"$D/o" 2>"$D/e" &
tp=$!
i=0; while [ $i -lt 300 ] && ! grep -q '^WORKERS' "$D/o"; do sleep 0.1; i=$((i + 1)); done  # 30 s: slow under load
pids=$(sed -n 's/^WORKERS //p' "$D/o")
kids=$(pgrep -P $tp | tr '\n' ' ')
kill -INT $tp
left=$(alive_after "$tp" 100); gone=$?
wait $tp 2>/dev/null; st=$?
[ -n "$pids" ] && [ $gone -eq 0 ] && [ $st -ne 0 ]
check "SIGINT ends a blocked driver with a non-zero status" $? "workers: $pids" "driver alive: $left, status $st" "$(tailof $D/e)"
grep -qi "interrupt" "$D/e" && ! grep -q "error in error handling" "$D/e"
check "SIGINT: stderr says the run was interrupted" $? "$(tailof $D/e)"
left=$(alive_after "$pids $kids" 50)
check "no worker left after SIGINT" $? "still alive:$left"
kill -9 $tp $pids $kids 2>/dev/null

# 10. teardown when the driver is killed with SIGKILL
$TIDE run "$D/workers.lua" block >"$D/o" 2>"$D/e" &
tp=$!
i=0; while [ $i -lt 300 ] && ! grep -q '^WORKERS' "$D/o"; do sleep 0.1; i=$((i + 1)); done  # 30 s: slow under load
pids=$(sed -n 's/^WORKERS //p' "$D/o")
kids=$(pgrep -P $tp | tr '\n' ' ')
kill -9 $tp
wait $tp 2>/dev/null
[ -n "$pids" ]; check "driver started workers before kill -9" $? "$(tailof $D/e)"
left=$(alive_after "$pids $kids" 100)
check "no worker left after kill -9 of the driver" $? "still alive:$left"
kill -9 $pids $kids 2>/dev/null

# 11. worker print output reaches the driver's stdout with its origin
cat >"$D/print.lua" <<'EOF'
local tide = require("tide")
local named = tide.remote({name = "printer"}, function(x)
  print("hello from task", x)
  return tide.get_runtime_context().pid
end)
local anon = tide.remote(function() print("anon-line") return tide.get_runtime_context().pid end)
local A = tide.actor({init = function(self) end, say = function(self) print("actor-line"); return tide.get_runtime_context().pid end})
print("PID_NAMED " .. tide.get(named:remote(42)))
print("PID_ANON " .. tide.get(anon:remote()))
print("PID_ACTOR " .. tide.get(A:remote():say()))
print("driver-line")
EOF
$TIDE run "$D/print.lua" >"$D/o" 2>"$D/e"; st=$?
p=$(sed -n 's/^PID_NAMED //p' "$D/o")
[ $st -eq 0 ] && [ -n "$p" ] && grep -q "^(printer pid=$p) hello from task	42\$" "$D/o"
check "task print appears on stdout as '(printer pid=N) ...'" $? "status $st" "$(tailof $D/o)"
p=$(sed -n 's/^PID_ANON //p' "$D/o")
grep -q "^(print.lua:6 pid=$p) anon-line\$" "$D/o"
check "unnamed task print is prefixed with file:line and pid" $? "$(grep anon-line $D/o)"
p=$(sed -n 's/^PID_ACTOR //p' "$D/o")
grep -q "^(.*pid=$p) actor-line\$" "$D/o"
check "actor print is prefixed with its origin and pid" $? "$(grep actor-line $D/o)"
grep -q "^driver-line\$" "$D/o" && ! grep -q "hello from task" "$D/e"
check "driver print is unprefixed; worker prints go to stdout" $? "$(tailof $D/o)"

# 12. resource flags
cat >"$D/res.lua" <<'EOF'
local tide = require("tide")
local c = tide.cluster_resources()
print("CPU=" .. tostring(c.CPU) .. " GPU=" .. tostring(c.GPU) .. " A=" .. tostring(c.A) .. " B=" .. tostring(c.B))
print("STORE=" .. tostring(tide.stats().store_capacity))
local g = tide.remote({num_gpus = 1}, function() return os.getenv("CUDA_VISIBLE_DEVICES") end)
local a = tide.remote({resources = {A = 1}}, function() return "used-A" end)
if (c.GPU or 0) > 0 then print("CVD=" .. tostring(tide.get(g:remote()))) end
if (c.A or 0) > 0 then print("RES=" .. tide.get(a:remote())) end
EOF
$TIDE run --num-cpus 3 --num-gpus 2 --resources '{"A": 1, "B": 2.5}' --object-store-memory 33554432 "$D/res.lua" >"$D/o" 2>"$D/e"; st=$?
[ $st -eq 0 ] && grep -q "^CPU=3 GPU=2 A=1 B=2.5\$" "$D/o"
check "--num-cpus 3 --num-gpus 2 --resources set the cluster resources" $? "status $st" "$(tailof $D/o)" "$(tailof $D/e)"
grep -q "^CVD=[01]\$" "$D/o"; check "--num-gpus 2: a one-GPU task sees CUDA_VISIBLE_DEVICES 0 or 1" $? "$(grep CVD $D/o)"
grep -q "^RES=used-A\$" "$D/o"; check "--resources: a task using A runs" $? "$(grep RES $D/o)"
grep -q "^STORE=33554432\$" "$D/o"; check "--object-store-memory sets the store capacity" $? "$(grep STORE $D/o)"
$TIDE run "$D/res.lua" >"$D/o" 2>"$D/e"; st=$?
[ $st -eq 0 ] && grep -q "GPU=0\|GPU=nil" "$D/o"; check "without --num-gpus there are no (fake) GPUs" $? "$(tailof $D/o)"

# 13. a clean run leaves no child process behind
$TIDE run "$D/workers.lua" ok >"$D/o" 2>&1 &
tp=$!
wait $tp; st=$?
pids=$(sed -n 's/^WORKERS //p' "$D/o")
left=""; for p in $pids; do running "$p" && left="$left $p"; done
[ $st -eq 0 ] && [ -z "$left" ]; check "workers are gone by the time tide run returns" $? "status $st; alive:$left"
kill -9 $left 2>/dev/null

echo "1..$n"
