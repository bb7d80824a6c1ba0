#!/bin/sh
# tide repl: expressions printed, multi-line chunks, pretty tables,
# ObjectRefs with their state, errors that do not end the session,
# functions defined at the prompt sent as tasks, :help/:status, and Ctrl-C
# interrupting a blocking get without leaving the REPL.
cd "$(dirname "$0")/../.."
T=$(pwd)/bin/tide
n=0
check() { n=$((n + 1)); if eval "$2"; then echo "ok $n - $1"; else echo "not ok $n - $1"; echo "$3" | sed 's/^/# /'; fi; }
W=$(mktemp -d /tmp/tide-repl-test-XXXXXX)
trap 'rm -rf "$W"' EXIT
export HOME="$W"

out=$(printf '%s\n' '1 + 41' '({a = 1,' '  b = {2, 3}})' \
  'sq = tide.remote(function(x) return x * x end)' 'r = sq:remote(9)' 'tide.get(r)' 'r' \
  'error("boom")' '"still here"' ':help' ':status' ':quit' | timeout 60 $T repl 2>&1)
check "expressions are printed" 'echo "$out" | grep -q "^42$"' "$out"
check "a chunk continues over lines until complete, tables pretty-printed" \
  'echo "$out" | grep -q "a = 1" && echo "$out" | grep -q "b = {"' "$out"
check "a function defined at the prompt runs as a task" 'echo "$out" | grep -q "^81$"' "$out"
check "ObjectRefs show their state" 'echo "$out" | grep -q "ObjectRef(.*ready)"' "$out"
check "an error is reported and the session goes on" \
  'echo "$out" | grep -q "boom" && echo "$out" | grep -q "still here"' "$out"
check ":help and :status answer" 'echo "$out" | grep -q ":status" && echo "$out" | grep -q "resources"' "$out"
check "the history file is written" '[ -s "$W/.tide_history" ]'

mkfifo "$W/in"
# The REPL's own pid gets the SIGINT, as a terminal would send it.
$T repl < "$W/in" > "$W/out" 2>&1 &
rp=$!
( sleep 60; kill -9 $rp 2>/dev/null ) &
watchdog=$!
exec 3> "$W/in"
echo 'tide.get(tide.remote(function() tide.sleep(30) end):remote())' >&3
sleep 2
kill -INT $rp
sleep 1
echo '"after" .. " interrupt"' >&3
echo ':quit' >&3
exec 3>&-
wait $rp
kill $watchdog 2>/dev/null
out=$(cat "$W/out")
check "Ctrl-C interrupts a blocking get and the REPL goes on" \
  'echo "$out" | grep -q "interrupted" && echo "$out" | grep -q "after interrupt"' "$out"
# In a real terminal (a pty from script(1)): Ctrl-C at the prompt clears the
# line, Ctrl-C stops a loop the JIT would compile, and the history is on
# disk as it grows (the REPL is then killed with -9).
if command -v script >/dev/null 2>&1; then
  rm -f "$W/.tide_history"
  trap '' PIPE  # a REPL that died must fail the checks, not end this script
  mkfifo "$W/tin"
  script -qfec "$T repl" /dev/null < "$W/tin" > "$W/tout" 2>&1 &
  sp=$!
  exec 4> "$W/tin"
  wait_for() { i=0; while [ $i -lt 100 ] && ! grep -q "$1" "$W/tout"; do sleep 0.1; i=$((i + 1)); done; }
  wait_for "tide> "
  printf 'abc' >&4; sleep 0.5; printf '\003' >&4; sleep 0.5
  printf 'y = 6 * 7\n' >&4; printf 'y + 0\n' >&4
  wait_for "^42"
  printf 'for i = 1, 1e12 do end\n' >&4; sleep 2; printf '\003' >&4; sleep 1
  printf '"still" .. " alive"\n' >&4
  wait_for "still alive"
  cp "$W/.tide_history" "$W/hist" 2>/dev/null
  kill -9 $sp 2>/dev/null; pkill -9 -f "$T repl" 2>/dev/null
  exec 4>&-
  out=$(cat "$W/tout")
  check "Ctrl-C at the prompt clears the line and the REPL goes on (a terminal)" \
    'echo "$out" | grep -q "abc^C" && echo "$out" | grep -q "^42" && ! echo "$out" | grep -q "abcy"' "$out"
  check "Ctrl-C stops a loop the JIT would compile, and the REPL goes on" \
    'echo "$out" | grep -q "interrupted" && echo "$out" | grep -q "still alive"' "$out"
  check "the history is on disk as it grows (kept when the REPL is killed)" \
    'grep -qF "y\\040=\\0406\\040*\\0407" "$W/hist" && grep -qF 1e12 "$W/hist"' "$(cat "$W/hist" 2>&1)"
fi
echo "1..$n"
