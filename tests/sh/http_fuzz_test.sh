#!/bin/sh
# Fuzzes the HTTP ingress request path (tests/fuzz/fuzz_http.c) for a bounded
# time from the seed corpus. TAP: "ok 1 - fuzz http parser 25s, N runs".
# Env: HTTP_FUZZ_SECONDS (25).
cd "$(dirname "$0")/../.."
secs=${HTTP_FUZZ_SECONDS:-25}
bin=build/fuzz-http
if [ ! -x $bin ]; then
  echo "ok 1 - fuzz http parser # SKIP $bin not built (needs clang with libFuzzer)"
  echo "1..1"
  exit 0
fi
work=build/fuzz-http-work
rm -rf $work && mkdir -p $work/corpus
log=$work/fuzz.log
# New inputs go to the scratch corpus; the seeds in the tree are read only.
ASAN_OPTIONS=detect_leaks=1 timeout -k 5 $((secs + 60)) $bin \
  -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
  -dict=tests/fuzz/http.dict -artifact_prefix=$work/ \
  $work/corpus tests/fuzz/corpus-http >$log 2>&1
rc=$?
runs=$(sed -n 's/^Done \([0-9]*\) runs.*/\1/p' $log | tail -1)
if [ $rc -eq 0 ] && [ -n "$runs" ]; then
  echo "ok 1 - fuzz http parser ${secs}s, $runs runs"
else
  echo "not ok 1 - fuzz http parser ${secs}s (exit $rc; log $log)"
  grep -E 'ERROR|SUMMARY|#[0-9]+ 0x' $log | head -20 | sed 's/^/# /'
  ls $work/crash-* $work/leak-* $work/timeout-* 2>/dev/null | sed 's/^/# artifact: /'
fi
echo "1..1"
