#!/bin/sh
# The tensor binding and the nn modules under AddressSanitizer and UBSan:
# the tensor and GPT Lua suites (and the CUDA suite against the fake
# plugin) run on the engine built with sanitizers (build/asan/tide, which
# links lua/tensor_*lua.c and gpu/).  Any sanitizer report fails the test.  TAP.
cd "$(dirname "$0")/../.." || exit 1
. tests/sh/lib.sh
bin=build/asan/tide
if [ ! -x $bin ]; then no "sanitized tensor suites" "$bin not built (make test builds it)"; plan; exit 0; fi
for f in tests/gpu/tensor_test.lua tests/gpu/gpt_test.lua tests/gpu/cuda_test.lua; do
  out=$(TIDE_HOME=$(pwd) ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 \
    UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 TIDE_FORCE_CUDA_PLUGIN=1 \
    TIDE_CUDA_PLUGIN="$PWD/build/fake_cuda.so" timeout -k 5 300 $bin run "$f" 2>&1)
  rc=$?
  okc=$(echo "$out" | grep -c '^ok')
  if [ $rc -eq 0 ] && echo "$out" | grep -q '^1\.\.' && ! echo "$out" | grep -q -e '^not ok' \
      -e 'runtime error' -e 'ERROR: AddressSanitizer'; then
    ok "$f under ASan and UBSan ($okc tests)"
  else
    no "$f under ASan and UBSan (exit $rc)" "$(echo "$out" | grep -v '^ok' | tail -20)"
  fi
done
plan
