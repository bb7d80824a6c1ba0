#!/bin/sh
# The core Lua suites again with the engine built under ASan+UBSan
# (build/asan/tide): the node, workers and bindings must not touch freed
# memory, overflow or corrupt their queues on any of these paths.
cd "$(dirname "$0")/../.."
bin=build/asan/tide
n=0
if [ ! -x $bin ]; then echo "ok 1 - asan suites # SKIP $bin not built"; echo "1..1"; exit 0; fi
for s in tasks actors failures objects tensor_store contracts rdt; do
  n=$((n + 1))
  log=build/test-logs/asan-$s.log
  TIDE_HOME=$(pwd) ASAN_OPTIONS=detect_leaks=0:handle_abort=1 UBSAN_OPTIONS=print_stacktrace=1 \
    timeout -k 5 400 $bin run tests/lua/${s}_test.lua > $log 2>&1
  okc=$(grep -c '^ok' $log); bad=$(grep -c '^not ok' $log)
  # The segfault a test provokes on purpose is reported by ASan in that worker.
  errs=$(grep -E 'ERROR: AddressSanitizer|runtime error|tide: BUG' $log | grep -vc 'SEGV on unknown address 0x000000000000')
  if [ "$bad" -eq 0 ] && [ "$errs" -eq 0 ] && grep -q '^1\.\.' $log; then
    echo "ok $n - ${s}_test under ASan+UBSan ($okc tests)"
  else
    echo "not ok $n - ${s}_test under ASan+UBSan ($okc ok, $bad failed, $errs sanitizer reports; $log)"
    grep -E '^not ok|ERROR: AddressSanitizer|runtime error|tide: BUG' $log | head -5 | sed 's/^/# /'
  fi
done
echo "1..$n"
