#!/bin/sh
# A/B of chosen `tide bench` rows between two built trees, alternated
# round by round (the order flips each round), as docs/performance.md's
# issue-13 tables were taken:
#   OLD=/path/to/old/checkout [ROWS="..."] [MN=1] sh bench/ab_rows.sh [ROUNDS=5] [OUT=/tmp/tide-ab]
# Each tree runs `bin/tide bench $ROWS`; with MN=1 also the first rows of
# bench/multinode.lua (tasks sync/async, n:n actor calls, placement groups)
# against a fresh 3-node loopback cluster of its own build. JSON lines go to
# OUT/<old|new>-<round>.json; bench/ab_summary.lua prints medians and ratios.
cd "$(dirname "$0")/.." || exit 1
NEW=$(pwd)
: "${OLD:?set OLD to the other built checkout}"
R=${1:-5}
OUT=${2:-/tmp/tide-ab}
ROWS=${ROWS:-"single_client_tasks_sync single_client_get_calls 1_1_actor_calls_sync"}
mkdir -p "$OUT"
sed -n '1,/^end, 1), unit = "pgs\/s"/p' bench/multinode.lua > "$OUT/mn_rows.lua"
mn() {  # mn TREE: the multinode rows against that tree's own cluster
  T=$1/bin/tide D=$(mktemp -d /tmp/tide-ab-mn-XXXXXX) P=$((25000 + $$ % 900))
  TIDE_SESSION_DIR=$D/head $T start --head --port $P --num-cpus 0 >/dev/null 2>&1
  for k in 1 2; do
    TIDE_SESSION_DIR=$D/n$k $T start --address 127.0.0.1:$P --key $D/head/cluster.key --num-cpus 2 >/dev/null 2>&1
  done
  i=0
  while [ $i -lt 200 ] && [ "$(TIDE_SESSION_DIR=$D/head $T status 2>/dev/null | grep -c '^node-')" != 3 ]; do
    sleep 0.1; i=$((i + 1))
  done
  (cd "$1" && TIDE_SESSION_DIR=$D/head timeout 300 $T run --address local "$OUT/mn_rows.lua" 2>/dev/null | grep '^{')
  for s in head n1 n2; do TIDE_SESSION_DIR=$D/$s $T stop >/dev/null 2>&1; done
  rm -rf "$D"
}
for r in $(seq 1 "$R"); do
  if [ $((r % 2)) = 1 ]; then order="old new"; else order="new old"; fi
  for b in $order; do
    d=$OLD; [ $b = new ] && d=$NEW
    echo "round $r $b $(date -u +%H:%M:%S) load $(cut -d' ' -f1 /proc/loadavg)" >&2
    (cd "$d" && bin/tide bench $ROWS 2>/dev/null | grep '^{') > "$OUT/$b-$r.json"
    [ -n "${MN:-}" ] && mn "$d" >> "$OUT/$b-$r.json"
  done
done
bin/tide run bench/ab_summary.lua "$OUT"
