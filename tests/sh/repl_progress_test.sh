#!/bin/sh
# Progress of a large transfer in `tide repl`: a REPL attached to a head
# gets a value made on another node (in chunks), and shows a tide.progress
# bar of its bytes: redrawn in place on a terminal (a pty from script(1)),
# a few throttled lines in a pipe, nothing with TIDE_PROGRESS=0. Also
# `tide list objects` shows the bytes landed of a fetch under way.
cd "$(dirname "$0")/../.."
. tests/sh/lib.sh
head_session repl-progress 23000
MIB=384
$T start --head --port $PORT --num-cpus 1 --dashboard-port off >/dev/null 2>&1
join_node $W/n1 --num-cpus 1 --resources '{"A":1}'

# The value is made on node-1 (only it has A) and kept there until the
# REPL, attached to the head, gets it: the head fetches it in chunks.
cat > "$W/in.txt" <<EOF
mk = tide.remote({resources = {A = 1}, num_cpus = 0}, function(n) return string.rep("x", n) end)
r = mk:remote($MIB * 1024 * 1024)
ready = tide.wait({r}, {fetch_local = false})
n = #tide.get(r)
print("len " .. n)
:quit
EOF
# repl PROGRESS_ENV...: one REPL session on a pty; its output in $W/out.
repl_tty() {
  env "$@" timeout 120 script -qfec "$T repl --address local" /dev/null < "$W/in.txt" > "$W/out" 2>&1
}
# TIDE_PROGRESS_AFTER=0: the bar from the first slice (0.2 s), so that a
# fast machine's transfer still shows one.
repl_tty TIDE_PROGRESS_AFTER=0
out=$(cat "$W/out")
check "the get returns the whole value" 'echo "$out" | grep -q "len $((MIB * 1048576))"' "$out"
check "on a terminal a bar of the bytes fetched is drawn in place (carriage return, erase line)" \
  'printf "%s" "$out" | grep -q "$(printf "\r\033\\[2K")fetching from another node:"' "$out"
check "the bar ends at the whole value, and stays on the screen" \
  'echo "$out" | grep -Eq "fetching from another node: 100% .*$MIB/$MIB \[.* MiB/s, in [0-9]"' "$out"

repl_tty TIDE_PROGRESS_AFTER=0 TIDE_PROGRESS=0
out=$(cat "$W/out")
check "TIDE_PROGRESS=0: no bar at all, the value still comes" \
  'echo "$out" | grep -q "len $((MIB * 1048576))" && ! echo "$out" | grep -q "fetching from"' "$out"

# In a pipe: plain lines, one every TIDE_PROGRESS_INTERVAL (here 0.5 s),
# however often the bar is updated (every 0.2 s), and a last one.
t0=$(date +%s.%N)
out=$(TIDE_PROGRESS_AFTER=0 TIDE_PROGRESS_INTERVAL=0.5 timeout 120 $T repl --address local < "$W/in.txt" 2>&1)
el=$(echo "$(date +%s.%N) - $t0" | bc)
lines=$(echo "$out" | grep -c "fetching from another node")
max=$(echo "$el / 0.5 + 2" | bc)
check "in a pipe: plain lines without escapes, at most one per interval (+ the last)" \
  'echo "$out" | grep -q "len $((MIB * 1048576))" && [ "$lines" -ge 1 ] && [ "$lines" -le "$max" ] &&
   ! printf "%s" "$out" | grep -q "$(printf "\r")"' "$lines lines in $el s (at most $max): $out"
t0=$(date +%s.%N)
out=$(timeout 120 $T repl --address local < "$W/in.txt" 2>&1)
el=$(echo "$(date +%s.%N) - $t0" | bc)
lines=$(echo "$out" | grep -c "fetching from another node")
max=$(echo "$el / 5 + 2" | bc)
check "in a pipe with the default 5 s interval, a fetch writes a line per 5 s at most, and a finished one once" \
  'echo "$out" | grep -q "len $((MIB * 1048576))" && [ "$lines" -le "$max" ] &&
   [ "$(echo "$out" | grep -c "fetching from another node: 100%")" -le 1 ]' "$lines lines in $el s (at most $max): $out"

# tide list objects: the bytes landed of a fetch under way, sampled while
# a script's get waits (a machine that fetches it before the first sample
# skips the check rather than fail it).
cat > "$W/hold.lua" <<EOF
local tide = require("tide")
local mk = tide.remote({resources = {A = 1}, num_cpus = 0}, function(n) return string.rep("y", n) end)
local r = mk:remote($MIB * 1024 * 1024)
tide.wait({r}, {fetch_local = false})
print("ready " .. r:id())
io.stdout:flush()
print(#tide.get(r))
EOF
timeout 120 $T run --address local "$W/hold.lua" > "$W/hold.out" 2>&1 &
KILL=$!
i=0
while [ $i -lt 300 ] && ! grep -q "^ready" "$W/hold.out"; do sleep 0.1; i=$((i + 1)); done
id=$(sed -n 's/^ready //p' "$W/hold.out")
fetched=0
while [ "$fetched" = 0 ] && kill -0 $KILL 2>/dev/null && ! grep -q "^$((MIB * 1048576))$" "$W/hold.out"; do
  row=$($T list objects --filter object_id=$id --json 2>&1)
  fetched=$(echo "$row" | sed -n 's/.*"fetched":\([0-9]*\).*/\1/p')
  [ -z "$fetched" ] && fetched=0
done
if [ "$fetched" = 0 ]; then
  skip "tide list objects: a value being fetched shows the bytes landed so far" "the fetch ended before a sample"
else
  check "tide list objects: a value being fetched shows the bytes landed so far" \
    '[ "$fetched" -gt 0 ] && [ "$fetched" -le $((MIB * 1048576)) ]' "$row"
fi
wait $KILL
KILL=
check "the script's get then completes" 'grep -q "^$((MIB * 1048576))$" "$W/hold.out"' "$(cat "$W/hold.out")"
plan
