#!/bin/sh
# tide start --head / status / run --address / repl --address / stop:
# a node daemon in its own session directory, drivers and a REPL attached
# to it, detached actors outliving their driver, non-detached ones not.
cd "$(dirname "$0")/../.."
T=$(pwd)/bin/tide
. tests/sh/lib.sh
# Gone, or a zombie its parent (an init that reaps late) has not collected.
gone() { ! kill -0 "$1" 2>/dev/null || grep -q '^State:.*Z' /proc/"$1"/status 2>/dev/null; }
export TIDE_SESSION_DIR=$(mktemp -d /tmp/tide-cluster-test-XXXXXX)
rmdir "$TIDE_SESSION_DIR"
W=$(mktemp -d /tmp/tide-cluster-work-XXXXXX)
trap '$T stop >/dev/null 2>&1; rm -rf "$W" "$TIDE_SESSION_DIR"' EXIT

PORT=$((17000 + $$ % 1000))
out=$($T start --head --num-cpus 2 --port $PORT 2>&1)
check "start --head starts a node in the background" '[ $? -eq 0 ] && echo "$out" | grep -q "node started"' "$out"
check "the session directory is private (0700)" '[ "$(stat -c %a "$TIDE_SESSION_DIR")" = 700 ]'
check "the node socket is private (0600)" '[ "$(stat -c %a "$TIDE_SESSION_DIR/node.sock")" = 600 ]'
# The banner's join command, run as printed (its own session directory),
# joins a node.
join=$(echo "$out" | sed -n 's|^  TIDE_SESSION_DIR=[^ ]* bin/tide start |start |p')
jout=$(TIDE_SESSION_DIR="$W/joined" $T $join 2>&1); jst=$?
check "the head's banner prints a join command, and it joins a node" \
  '[ -n "$join" ] && [ $jst -eq 0 ] && grep -q "joined the head" "$W/joined/node.log"' "$out $jout"
# A node that stops beating (SIGSTOP) is shown as such, its figures kept
# out of the cluster's totals, until the node timeout drops it.
jpid=$(cat "$W/joined/node.pid" 2>/dev/null)
if [ -n "$jpid" ] && kill -STOP "$jpid" 2>/dev/null; then
  sleep 3.5
  out=$($T status 2>&1)
  kill -CONT "$jpid"
  check "tide status marks a node that stopped beating and leaves it out of the totals" \
    'echo "$out" | grep -Eq "no heartbeat for [0-9.]+ s\)" && echo "$out" | grep -q "(without node-[0-9]*: no recent heartbeat)"' "$out"
else
  no "tide status marks a node that stopped beating" "no pid file for the joined node"
fi
TIDE_SESSION_DIR="$W/joined" $T stop >/dev/null 2>&1
out=$($T start --head 2>&1)
check "a second start is refused while one runs" '[ $? -ne 0 ] && echo "$out" | grep -q "already running"' "$out"

# A head whose TCP port is taken fails (the daemon retries for 10 s, for a
# killed predecessor), naming the port, and leaves nothing running.
out=$(TIDE_SESSION_DIR="$W/busy" $T start --head --port $PORT 2>&1); st=$?
check "start --head on a port in use fails, naming the port" \
  '[ $st -eq 1 ] && echo "$out" | grep -q "port $PORT is in use" && ! echo "$out" | grep -q "node started"' "$out"
check "a head that could not listen leaves no daemon, socket or pid file" \
  '[ ! -e "$W/busy/node.pid" ] && [ ! -e "$W/busy/node.sock" ] && ! pgrep -fx "$T start --head --port $PORT" >/dev/null' \
  "$(ls "$W/busy"; pgrep -fax "$T start --head --port $PORT")"

cat > "$W/drv.lua" <<'LUA'
local tide = require("tide")
local sq = tide.remote(function(x) return x * x end)
local Keep = tide.actor({init = function(s) s.n = 0 end, incr = function(s) s.n = s.n + 1; return s.n end})
local k = Keep:options({name = "keep", lifetime = "detached"}):remote()
local t = Keep:options({name = "temp"}):remote()
print("RESULT", tide.get(sq:remote(12)), tide.get(k:incr()), tide.get(t:incr()),
  #tide.get(tide.put(string.rep("x", 300000))))
LUA
out=$($T run --address local "$W/drv.lua" 2>&1)
check "a driver attached with --address runs tasks, actors and large objects" \
  'echo "$out" | grep -q "RESULT	144	1	1	300000"' "$out"

cat > "$W/drv2.lua" <<'LUA'
local tide = require("tide")
print("KEEP", tide.get(tide.get_actor("keep"):incr()))
print("TEMP", pcall(tide.get_actor, "temp"))
LUA
out=$($T run --address local "$W/drv2.lua" 2>&1)
check "a detached actor outlives the driver that made it" 'echo "$out" | grep -q "KEEP	2"' "$out"
check "a non-detached actor ends with its driver" 'echo "$out" | grep -q "TEMP	false"' "$out"

out=$(printf 'x = tide.get(tide.get_actor("keep"):incr())\nx * 10\n:status\n' | $T repl --address local 2>&1)
check "a REPL attached to the node drives it" 'echo "$out" | grep -q "^30$"' "$out"
check "the REPL :status shows the node" 'echo "$out" | grep -q "actors"' "$out"
check "the REPL :status gives memory and store sizes in human units" \
  'echo "$out" | grep -Eq "memory +[0-9.]+ (B|[KMGT]iB) / [0-9.]+ [KMGT]iB" && echo "$out" | grep -Eq "store [0-9.]+ (B|[KMGT]iB) / [0-9.]+ [KMGT]iB" && ! echo "$out" | grep -Eq "[0-9]e\+[0-9]|[0-9]{7} bytes"' "$out"

out=$($T status 2>&1)
check "tide status prints resources and counts" \
  'echo "$out" | grep -q "CPU" && echo "$out" | grep -q "actors 1"' "$out"
check "tide status gives memory, store, spilled and sent sizes in human units, no 3.5e+10" \
  'echo "$out" | grep -Eq "memory +[0-9.]+ (B|[KMGT]iB) / [0-9.]+ [KMGT]iB" && echo "$out" | grep -Eq "store [0-9.]+ (B|[KMGT]iB) / [0-9.]+ [KMGT]iB, [0-9.]+ (B|[KMGT]iB) spilled" && echo "$out" | grep -Eq "sent to other nodes [0-9.]+ (B|[KMGT]iB)" && ! echo "$out" | grep -Eq "[0-9]e\+[0-9]|bytes"' "$out"

out=$($T run --address /nonexistent/node.sock "$W/drv2.lua" 2>&1)
check "attaching to no node fails clearly" '[ $? -ne 0 ] && echo "$out" | grep -q "cannot connect"' "$out"
check "the cluster key is private (0600)" '[ "$(stat -c %a "$TIDE_SESSION_DIR/cluster.key")" = 600 ]'
cat > "$W/tcp.lua" <<'LUA'
local tide = require("tide")
local sq = tide.remote(function(x) return x * x end)
local big = tide.remote(function(n) return string.rep("b", n) end)
print("TCP", tide.get(sq:remote(12)), tide.get(tide.get_actor("keep"):incr()),
  #tide.get(tide.put(string.rep("x", 300000))), #tide.get(big:remote(500000)))
LUA
out=$($T run --address 127.0.0.1:$PORT --key "$TIDE_SESSION_DIR/cluster.key" "$W/tcp.lua" 2>&1)
check "a driver attached over TCP (CURVE) with the cluster key runs tasks, actors and large objects" \
  'echo "$out" | grep -q "TCP	144	4	300000	500000"' "$out"
check "a private key file gives no warning" '! echo "$out" | grep -q "warning"' "$out"
cp "$TIDE_SESSION_DIR/cluster.key" "$W/open.key"; chmod 644 "$W/open.key"
out=$($T run --address 127.0.0.1:$PORT --key "$W/open.key" "$W/tcp.lua" 2>&1)
check "a key file others can read works, with a warning naming it and its mode" \
  'echo "$out" | grep -q "TCP	144" && echo "$out" | grep -q "warning: the cluster key $W/open.key is accessible by others (mode 0644)"' "$out"
printf 'server_public=short\n' >"$W/bad.key"; chmod 600 "$W/bad.key"
out=$($T run --address 127.0.0.1:$PORT --key "$W/bad.key" "$W/tcp.lua" 2>&1); st=$?
check "a malformed key file is called malformed, not missing" \
  '[ $st -eq 1 ] && echo "$out" | grep -q "cluster key $W/bad.key is malformed" && ! echo "$out" | grep -q "no cluster key"' "$out"
out=$($T run --address 127.0.0.1:$PORT --key "$W/none.key" "$W/tcp.lua" 2>&1); st=$?
check "a missing key file is called missing" '[ $st -eq 1 ] && echo "$out" | grep -q "no cluster key at $W/none.key"' "$out"
(export TIDE_SESSION_DIR="$W/other"; $T start --head --port $((PORT + 1)) >/dev/null 2>&1; $T stop >/dev/null 2>&1)
out=$(timeout 30 $T run --address 127.0.0.1:$PORT --key "$W/other/cluster.key" "$W/drv2.lua" 2>&1)
check "a driver with another cluster's key is refused, and told the key was not taken" \
  '[ $? -ne 0 ] && echo "$out" | grep -q "127.0.0.1:$PORT is listening but did not take the cluster key $W/other/cluster.key"' "$out"
out=$(timeout 30 $T run --address 127.0.0.1:$((PORT + 3)) --key "$W/other/cluster.key" "$W/drv2.lua" 2>&1)
check "a driver pointed where nothing listens is told so, not about keys" \
  '[ $? -eq 1 ] && echo "$out" | grep -q "nothing is listening at 127.0.0.1:$((PORT + 3))" && ! echo "$out" | grep -q "key"' "$out"
out=$(TIDE_SESSION_DIR="$W/join" timeout 60 $T start --address 127.0.0.1:$PORT --key "$W/other/cluster.key" --join-timeout 3 2>&1); st=$?
check "a node joining with another cluster's key gives up after --join-timeout, saying the key was not taken" \
  '[ $st -eq 1 ] && echo "$out" | grep -q "cannot join the head at 127.0.0.1:$PORT: .*did not take the cluster key"' "$out"
sleep 0.3
check "a node that gave up joining leaves no daemon or pid file" \
  '[ ! -e "$W/join/node.pid" ] && ! pgrep -f "start --address 127.0.0.1:$PORT --key $W/other/cluster.key" >/dev/null' \
  "$(pgrep -af "start --address 127.0.0.1:$PORT")"
out=$($T status 2>&1)
check "refused connections are counted in tide status" \
  'echo "$out" | grep -q "refused (no valid cluster key): [1-9]"' "$out"
check "refusals are logged by the node" 'grep -q "refused a connection" "$TIDE_SESSION_DIR/node.log"'
out=$($T run --address 10.0.0.1 "$W/drv2.lua" 2>&1)
check "a malformed address is a usage error" '[ $? -eq 2 ]' "$out"

mkdir -p "$W/wd"
cat > "$W/wd/job.lua" <<'LUA'
local tide = require("tide")
local sq = tide.remote(function(x) return x * x end)
print("JOB", arg[1], tide.get(sq:remote(tonumber(arg[1]))))
LUA
cat > "$W/wd/long.lua" <<'LUA'
local tide = require("tide")
print("LONG started"); io.stdout:flush()
tide.get(tide.remote(function() tide.sleep(60) end):remote())
LUA
out=$(cd "$W/wd" && $T submit job.lua 6 2>&1)
id=$(echo "$out" | sed -n 's/^submitted //p')
check "tide submit runs a script as a job on the node" '[ -n "$id" ]' "$out"
for i in 1 2 3 4 5 6 7 8 9 10; do
  $T job status "$id" 2>/dev/null | grep -q SUCCEEDED && break; sleep 0.5
done
out=$($T job status "$id" 2>&1)
check "tide job status shows it succeeded" 'echo "$out" | grep -q "SUCCEEDED"' "$out"
out=$($T job logs "$id" 2>&1)
check "tide job logs shows its output" 'echo "$out" | grep -q "JOB	6	36"' "$out"
out=$($T logs job "$id" --tail 1 2>&1)
check "tide logs job ID --tail 1 prints its last line only" '[ "$out" = "JOB	6	36" ]' "$out"
out=$(cd "$W/wd" && $T submit --working-dir "$W/wd" long.lua 2>&1)
lid=$(echo "$out" | sed -n 's/^submitted //p')
sleep 1.5
out=$($T job list 2>&1)
check "tide job list shows both jobs" 'echo "$out" | grep -q "$id" && echo "$out" | grep "$lid" | grep -q RUNNING' "$out"
out=$($T job stop "$lid" 2>&1)
check "tide job stop prints the job's status after the stop (STOPPED, not RUNNING)" \
  'echo "$out" | grep "$lid" | grep -q STOPPED' "$out"
out=$($T job status "$lid" 2>&1)
check "tide job stop stops a running job" 'echo "$out" | grep -q STOPPED' "$out"
# The job's task (sleeping 60 s) goes with it, as a Ray job's do.
for i in 1 2 3 4 5 6 7 8 9 10; do
  $T list tasks 2>/dev/null | grep "long.lua" | grep -q RUNNING || break; sleep 0.5
done
out=$($T list tasks 2>&1)
check "a stopped job's running task is cancelled, not left running for nobody" \
  'echo "$out" | grep "long.lua" | grep -q FAILED && ! echo "$out" | grep "long.lua" | grep -q RUNNING' "$out"
# So do the tasks of an attached driver killed outright: the one running
# and the one queued behind it (one CPU left for them: the head has 2).
cat > "$W/orphan.lua" <<'LUA'
local tide = require("tide")
local nap = tide.remote({num_cpus = 2}, function() tide.sleep(60) end)
local a, b = nap:remote(), nap:remote()
print("ORPHAN started"); io.stdout:flush()
tide.get({a, b})
LUA
$T run --address local "$W/orphan.lua" >"$W/orphan.out" 2>&1 &
opid=$!
for i in $(seq 40); do grep -q "ORPHAN started" "$W/orphan.out" && break; sleep 0.25; done
for i in $(seq 20); do $T list tasks 2>/dev/null | grep "orphan.lua" | grep -q RUNNING && break; sleep 0.25; done
kill -9 $opid; wait $opid 2>/dev/null
for i in $(seq 20); do
  $T list tasks 2>/dev/null | grep "orphan.lua" | grep -Eq "RUNNING|PENDING|QUEUED" || break; sleep 0.5
done
out=$($T list tasks 2>&1)
check "a driver killed with SIGKILL takes its running and queued tasks with it" \
  '[ "$(echo "$out" | grep "orphan.lua" | grep -c FAILED)" = 2 ]' "$out"
out=$($T job status nope 2>&1); st=$?
check "an unknown job id is an error: one line, no traceback" \
  '[ $st -eq 1 ] && [ "$out" = "tide: no job nope" ]' "$out"
out=$($T job logs nope 2>&1); st=$?
check "logs of an unknown job id: one line, no traceback" '[ $st -eq 1 ] && [ "$out" = "tide: no job nope" ]' "$out"
out=$(cd / && $T submit --working-dir "$W/wd" job.lua 5 2>&1)
wid=$(echo "$out" | sed -n 's/^submitted //p')
for i in 1 2 3 4 5 6 7 8 9 10; do
  $T job status "$wid" 2>/dev/null | grep -q SUCCEEDED && break; sleep 0.5
done
out2=$($T job logs "$wid" 2>&1)
check "submit --working-dir D SCRIPT finds SCRIPT in D, not in the current directory" \
  '[ -n "$wid" ] && echo "$out2" | grep -q "JOB	5	25"' "$out $out2"
out=$(cd / && $T submit --working-dir "$W/wd" nosuch.lua 2>&1); st=$?
check "submit --working-dir D with no such SCRIPT in D says so" \
  '[ $st -eq 1 ] && echo "$out" | grep -q "no nosuch.lua in the working directory $W/wd"' "$out"

# tide stop --all stops every daemon of this user, whatever its session
# directory, and no one else's. Run as a throwaway uid (so that it cannot
# stop other daemons of the user running the tests): needs root.
U=$((61000 + $$ % 4000))
as_u() { setpriv --reuid=$U --regid=$U --clear-groups "$@"; }
# The throwaway uid must reach bin/tide and stdlib (a checkout in a private
# directory, e.g. a mktemp -d clone, it cannot).
if [ "$(id -u)" = 0 ] && command -v setpriv >/dev/null 2>&1 && as_u test -x "$T" && as_u test -r stdlib/tide.lua; then
  mkdir -p "$W/u" && chown $U "$W/u" && chmod 711 "$W"
  TIDE_SESSION_DIR="$W/u/a" as_u $T start --head --port 0 --num-cpus 1 >"$W/ua.out" 2>&1
  TIDE_SESSION_DIR="$W/u/b" as_u $T start --head --port 0 --num-cpus 1 >"$W/ub.out" 2>&1
  pa=$(cat "$W/u/a/node.pid" 2>/dev/null); pb=$(cat "$W/u/b/node.pid" 2>/dev/null)
  check "uid $U runs two heads in two session directories" '[ -n "$pa" ] && [ -n "$pb" ]' "$(cat "$W/ua.out" "$W/ub.out")"
  out=$(as_u $T stop --all 2>&1); st=$?
  sleep 0.3
  check "tide stop --all stops both, naming their sessions" \
    '[ $st -eq 0 ] && gone $pa && gone $pb && echo "$out" | grep -q "pid $pa, session $W/u/a" && echo "$out" | grep -q "pid $pb, session $W/u/b"' "$out"
  check "tide stop --all leaves another user's node running" 'kill -0 "$(cat "$TIDE_SESSION_DIR/node.pid")"' "$out"
  out=$(as_u $T stop --all 2>&1); st=$?
  check "tide stop --all with nothing running says so, exit 0" '[ $st -eq 0 ] && echo "$out" | grep -q "no node"' "$out"
  kill -9 $pa $pb 2>/dev/null
else
  n=$((n + 1)); echo "ok $n # SKIP tide stop --all: needs root, and a checkout a throwaway uid can read"
fi

pid=$(cat "$TIDE_SESSION_DIR/node.pid")
out=$($T stop 2>&1)
sleep 0.3
check "tide stop stops the node" 'gone $pid' "$out"
check "no node worker is left after stop" '! pgrep -f "tide-worker" -P $pid >/dev/null 2>&1'
check "the socket and pid files are removed" '[ ! -e "$TIDE_SESSION_DIR/node.sock" ] && [ ! -e "$TIDE_SESSION_DIR/node.pid" ]'
out=$($T status 2>&1)
check "status without a node says so" '[ $? -ne 0 ] && echo "$out" | grep -q "cannot connect"' "$out"

out=$(timeout 10 $T start --head --block --num-cpus 1 > "$W/fg.log" 2>&1 & sleep 1.5; $T status 2>&1; $T stop 2>&1)
check "start --block runs in the foreground and answers" 'echo "$out" | grep -q "CPU"' "$out"
echo "1..$n"
