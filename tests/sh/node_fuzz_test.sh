#!/bin/sh
# Fuzzes the node's message handling and the value decoder
# (tests/fuzz/fuzz_node.c) for a bounded time. TAP output.
cd "$(dirname "$0")/../.."
secs=${NODE_FUZZ_SECONDS:-20}
bin=build/fuzz-node
if [ ! -x $bin ]; then
  echo "ok 1 - fuzz node messages # SKIP $bin not built (needs clang with libFuzzer)"
  echo "1..1"
  exit 0
fi
work=build/fuzz-node-work
rm -rf $work && mkdir -p $work/corpus
# Inputs that once broke it come first (tests/fuzz/corpus-node).
cp tests/fuzz/corpus-node/* $work/corpus/ 2>/dev/null
log=$work/fuzz.log
# Packages a fuzzed head sends land here, not in the user's cache.
mkdir -p $work/pkgs
TIDE_PKG_CACHE=$(pwd)/$work/pkgs ASAN_OPTIONS=detect_leaks=0 timeout -k 5 $((secs + 60)) $bin \
  -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 -max_len=4096 \
  -artifact_prefix=$work/ $work/corpus >$log 2>&1
rc=$?
runs=$(sed -n 's/^Done \([0-9]*\) runs.*/\1/p' $log | tail -1)
if [ $rc -eq 0 ] && [ -n "$runs" ]; then
  echo "ok 1 - fuzz node messages and the value decoder ${secs}s, $runs runs"
else
  echo "not ok 1 - fuzz node messages ${secs}s (exit $rc; log $log)"
  grep -E 'ERROR|SUMMARY|#[0-9]+ 0x' $log | head -20 | sed 's/^/# /'
fi
echo "1..1"
