#!/bin/sh
# Chaos: a head and three nodes on loopback, a driver checking every result
# (tests/chaos/driver.lua, attached to node n1), and a killer that kill -9s
# workers, nodes and the head at random and starts them again.  Prints TAP:
# zero wrong results, zero hangs, no actor state lost silently, only the
# typed errors the docs promise, every kill survived, nothing left behind.
#   sh tests/chaos/chaos.sh [SECONDS] [SEED]     (make chaos: 600 s)
cd "$(dirname "$0")/../.."
T=${TIDE_BIN:-$(pwd)/bin/tide}  # TIDE_BIN: another build (build/asan/tide)
DURATION=${1:-40}
SEED=${2:-$$}
n=0
ok() { n=$((n + 1)); echo "ok $n - $1"; }
no() { n=$((n + 1)); echo "not ok $n - $1"; [ -n "$2" ] && echo "$2" | head -30 | sed 's/^/# /'; }
check() { if eval "$2"; then ok "$1"; else no "$1" "$3"; fi; }
D=$(mktemp -d /tmp/tide-chaos-XXXXXX)
# Daemons log what is left in their object table when they stop.
export TIDE_DEBUG_LEFTOVERS=1
stop_all() { for s in head n1 n2 n3; do TIDE_SESSION_DIR=$D/$s $T stop >/dev/null 2>&1; done; }
trap 'stop_all; [ -n "$KEEP" ] || rm -rf "$D"' EXIT
PORT=$((22000 + $$ % 1000))
KEY=$D/head/cluster.key
start_head() { TIDE_SESSION_DIR=$D/head $T start ${CHAOS_DP:+--data-plane $CHAOS_DP} --head --port $PORT --num-cpus 1 --node-timeout 2 >>$D/starts.log 2>&1; }
start_node() {  # start_node NAME: n1 is the driver's (never killed), n2 and n3 are killed
  res='{"W": 100}'
  [ "$1" = n1 ] && res='{}'
  TIDE_SESSION_DIR=$D/$1 $T start ${CHAOS_DP:+--data-plane $CHAOS_DP} --address 127.0.0.1:$PORT --key $KEY --node-timeout 2 --num-cpus 2 \
    --resources "$res" --name "chaos-$1" >>$D/starts.log 2>&1
}
nodes_up() {
  i=0
  while [ $i -lt $(($2 * 10)) ]; do
    [ "$(TIDE_SESSION_DIR=$D/head $T status 2>/dev/null | grep -c '^node-')" -ge "$1" ] && return 0
    sleep 0.1; i=$((i + 1))
  done
  return 1
}
# A small deterministic random source (awk's srand), so a seed replays a run's kills.
rnd() { RS=$((RS + 1)); awk -v s="$SEED" -v k="$RS" -v m="$1" 'BEGIN { srand(s * 1000 + k); print int(rand() * m) }'; }
RS=0

start_head
for s in n1 n2 n3; do start_node $s; done
check "a head and three nodes start" 'nodes_up 4 20' "$(cat $D/starts.log)"
head_rss_start=$(awk '/VmRSS/ { print $2 }' /proc/$(cat $D/head/node.pid)/status)

TIDE_SESSION_DIR=$D/n1 timeout $((DURATION + 180)) $T run --address local tests/chaos/driver.lua $DURATION \
  >$D/driver.out 2>$D/driver.err &
driver=$!

# The killer: every 3-9 s (every 10-20 s in runs of 10 minutes and more).
lo=3; span=6
[ "$DURATION" -ge 600 ] && lo=10 && span=10
t_end=$(($(date +%s) + DURATION - 5))
kills_worker=0; kills_node=0; kills_head=0
while [ "$(date +%s)" -lt $t_end ] && kill -0 $driver 2>/dev/null; do
  sleep $((lo + $(rnd $span)))
  [ "$(date +%s)" -lt $t_end ] || break
  # What to kill cycles worker, node, head, worker (the head at most once
  # every two minutes of run); which worker or node is random.
  k=$((kills_worker + kills_node + kills_head))
  case $((k % 4)) in 0|3) pick=0 ;; 1) pick=5 ;; 2) pick=9 ;; esac
  if [ $pick -lt 5 ]; then        # a worker on any node
    s=$(echo "n1 n2 n3" | cut -d' ' -f$(($(rnd 3) + 1)))
    w=$(pgrep -P "$(cat $D/$s/node.pid 2>/dev/null)" 2>/dev/null | head -$(($(rnd 3) + 1)) | tail -1)
    [ -n "$w" ] && kill -9 "$w" 2>/dev/null && kills_worker=$((kills_worker + 1)) &&
      echo "$(date +%T) kill -9 worker $w of $s" >>$D/kills.log
  elif [ $pick -lt 8 ] || [ $kills_head -ge $((DURATION / 120 + 1)) ]; then   # a node
    s=$(echo "n2 n3" | cut -d' ' -f$(($(rnd 2) + 1)))
    p=$(cat $D/$s/node.pid 2>/dev/null)
    [ -n "$p" ] && kill -9 "$p" && kills_node=$((kills_node + 1)) && echo "$(date +%T) kill -9 node $s ($p)" >>$D/kills.log
    sleep 1
    start_node $s
  else                            # the head, a few times per run
    p=$(cat $D/head/node.pid)
    kill -9 "$p" && kills_head=$((kills_head + 1)) && echo "$(date +%T) kill -9 head ($p)" >>$D/kills.log
    for i in $(seq 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
    start_head
  fi
done
wait $driver
rc=$?
report=$(grep '^CHAOS' $D/driver.out)
echo "# $report"
echo "# kills: $kills_worker workers, $kills_node nodes, $kills_head heads (seed $SEED)"
field() { echo "$report" | sed -n "s/.* $1=\([^ ]*\).*/\1/p"; }
check "the driver ran to its end and reported" '[ $rc -eq 0 ] && [ -n "$report" ]' \
  "rc=$rc $(tail -20 $D/driver.err) $(cat $D/kills.log)"
check "zero wrong results" '[ "$(field wrong)" = 0 ]' "$(grep WRONG $D/driver.err)"
check "zero hangs (no get waited out its 60 s)" '[ "$(field hangs)" = 0 ]' "$(cat $D/kills.log)"
check "no actor state lost silently" '[ "$(field state_lost)" = 0 ]' "$(grep 'state lost' $D/driver.err)"
check "only the typed errors the docs promise" \
  '! field errors | tr , "\n" | grep -v "^none$" | grep -qv "^\(WorkerCrashedError\|ActorDiedError\|ObjectLostError\)="' \
  "$(grep 'unexpected error' $D/driver.err | sort | uniq -c | head -20)"
check "most work succeeded under chaos (correct > 90% of submitted)" \
  '[ "$(field correct)" -gt 0 ] && [ $(( $(field correct) * 10 )) -gt $(( $(field submitted) * 9 )) ]' "$report"
check "the killer killed workers and nodes" '[ $kills_worker -gt 0 ] && [ $kills_node -gt 0 ]' "$(cat $D/kills.log)"
nodes_up 4 20
check "every node is back in the cluster after the run" 'nodes_up 4 1' "$(TIDE_SESSION_DIR=$D/head $T status 2>&1)"
# The driver is gone: what it made must not stay behind on any node
# (without kills: tests/lua/objects_test.lua).  Under kills the last
# references come back within a few seconds (a head's sweep of dead
# records runs every 5 s, and releases travel between nodes).
left_objs() { for s in head n1 n2 n3; do TIDE_SESSION_DIR=$D/$s $T status 2>/dev/null | sed -n '/^this node:/,$p' |
  sed -n 's/^  objects \([0-9]*\),.*/\1/p' | head -1; done | awk '{ s += $1 } END { print s + 0 }'; }
i=0; while [ $i -lt 150 ] && [ "$(left_objs)" != 0 ]; do sleep 0.2; i=$((i + 1)); done
left_n=$(left_objs)
check "nothing the driver made is left on any node within 30 s of it leaving" '[ "$left_n" = 0 ]' \
  "$left_n objects left (what they are is logged when the nodes stop)"
head_rss_end=$(awk '/VmRSS/ { print $2 }' /proc/$(cat $D/head/node.pid)/status)
echo "# head RSS: $head_rss_start kB at start, $head_rss_end kB at the end (restarted $kills_head times)"
stop_all
sleep 1
(cd $D && grep -A1 "leftover object" head/node.log n*/node.log 2>/dev/null | head -20 | sed 's/^/# /')
left=$(pgrep -f "$D" 2>/dev/null | tr '\n' ' ')
check "no process is left behind after tide stop" '[ -z "$left" ]' "$(ps -o pid,args -p $left 2>/dev/null)"
echo "1..$n"
