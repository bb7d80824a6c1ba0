#!/bin/sh
# Runs every test: C unit tests (plain and ASan+UBSan) and the Lua suites,
# each Lua file in its own `tide run` with a timeout.  Counts TAP lines and
# ends with "N passed, N failed".
cd "$(dirname "$0")/.."
pass=0; fail=0; failed=""
LOG=build/test-logs; rm -rf $LOG; mkdir -p $LOG
count() {  # count FILE LABEL: tally TAP results of one run
  p=$(grep -c '^ok ' "$1"); f=$(grep -c '^not ok ' "$1")
  pass=$((pass + p)); fail=$((fail + f))
  grep '^not ok ' "$1" | sed "s|^|  $2: |"
  [ "$f" -gt 0 ] && failed="$failed $2"
  if ! grep -q '^1\.\.' "$1"; then
    echo "  $2: no plan line (crashed or timed out); tail of log:"; tail -5 "$1" | sed 's/^/    /'
    fail=$((fail + 1)); failed="$failed $2"
  fi
}
for b in ctest-engine ctest ctest-asan; do
  echo "== $b"
  ASAN_OPTIONS=detect_leaks=1 timeout 600 build/$b >$LOG/$b.log 2>&1
  count $LOG/$b.log $b
done
for f in ${TESTS:-tests/lua/*_test.lua tests/gpu/*_test.lua}; do
  [ -f "$f" ] || continue
  name=$(basename "$f" .lua)
  echo "== $name"
  timeout -k 5 ${TEST_TIMEOUT:-300} bin/tide run "$f" >$LOG/$name.log 2>&1
  rc=$?
  [ $rc -ne 0 ] && echo "  $name: exit status $rc" >>$LOG/$name.log
  count $LOG/$name.log "$name"
done
for f in tests/sh/*_test.sh; do
  [ -f "$f" ] || continue
  name=$(basename "$f" .sh)
  echo "== $name"
  timeout -k 5 300 sh "$f" >$LOG/$name.log 2>&1
  count $LOG/$name.log "$name"
done
[ -n "$failed" ] && echo "failing:$failed (logs in $LOG)"
echo "$pass passed, $fail failed"
[ "$fail" -eq 0 ]
