#!/bin/sh
# Compares object fetches between nodes for two builds of tide, alternated
# on this machine: bench/fetch_compare.sh OLD_TIDE NEW_TIDE [RUNS]. Each run
# starts a head (no CPU) and two nodes on loopback with one build and runs
# bench/fetch_compare.lua against them.
cd "$(dirname "$0")/.."
here=$(pwd)
run() {  # run BIN PORT
  D=$(mktemp -d /tmp/tide-fetch-XXXXXX)
  TIDE_SESSION_DIR=$D/h "$1" start --head --port "$2" --num-cpus 0 >/dev/null 2>&1
  for s in n1 n2; do
    TIDE_PKG_CACHE=$D/p-$s TIDE_SESSION_DIR=$D/$s "$1" start --address 127.0.0.1:"$2" --key $D/h/cluster.key \
      --num-cpus 2 >/dev/null 2>&1
  done
  sleep 1
  TIDE_SESSION_DIR=$D/h timeout 300 "$1" run --address local "$here/bench/fetch_compare.lua"
  for s in h n1 n2; do TIDE_SESSION_DIR=$D/$s "$1" stop >/dev/null 2>&1; done
  rm -rf "$D"
}
[ $# -ge 2 ] || { echo "usage: bench/fetch_compare.sh OLD_TIDE NEW_TIDE [RUNS]" >&2; exit 2; }
i=0
while [ $i -lt "${3:-2}" ]; do
  printf 'old: '; run "$1" $((19600 + $$ % 200))
  printf 'new: '; run "$2" $((19800 + $$ % 200))
  i=$((i + 1))
done
