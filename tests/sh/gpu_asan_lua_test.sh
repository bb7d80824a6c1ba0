#!/bin/sh
# The tensor binding and the nn modules under AddressSanitizer and UBSan:
# builds the module with sanitizers, preloads the runtimes into luajit and
# runs the tensor and GPT Lua suites (and the CUDA suite against the fake
# plugin).  Any sanitizer report fails the test.  TAP.
cd "$(dirname "$0")/../.." || exit 1
n=0
TMP=$(mktemp -d) && trap 'rm -rf "$TMP"' EXIT
ASAN_RT=$(gcc -print-file-name=libasan.so)
UBSAN_RT=$(gcc -print-file-name=libubsan.so)
if ! command -v luajit >/dev/null || [ ! -e "$ASAN_RT" ] ||
    ! gcc -O1 -g -fsanitize=address,undefined -fno-omit-frame-pointer -std=gnu11 -D_GNU_SOURCE \
      -Igpu $(pkg-config --cflags luajit) -fPIC -shared -o "$TMP/tensor.so" gpu/gpu_err.c \
      gpu/tensor.c gpu/ops_cpu.c gpu/device.c gpu/tensor_lua.c gpu/ring.c gpu/ring_local.c \
      gpu/nccl_comm.c -lopenblas -lm -lpthread -ldl 2>"$TMP/cc.log"; then
  echo "ok 1 - sanitized Lua suites # SKIP no luajit, libasan or sanitizer build ($(head -c 200 "$TMP/cc.log"))"
  echo "1..1"
  exit 0
fi
cat >"$TMP/prelude.lua" <<LUA
package.path = "stdlib/?.lua;stdlib/?/init.lua;" .. package.path
package.preload["tide.tensor"] = assert(package.loadlib("$TMP/tensor.so", "luaopen_tide_tensor"))
LUA
for f in tests/gpu/tensor_test.lua tests/gpu/gpt_test.lua tests/gpu/cuda_test.lua; do
  n=$((n + 1))
  out=$(ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 \
    TIDE_FORCE_CUDA_PLUGIN=1 TIDE_CUDA_PLUGIN="$PWD/build/fake_cuda.so" \
    LD_PRELOAD="$ASAN_RT $UBSAN_RT" timeout 300 luajit -e "dofile('$TMP/prelude.lua')" "$f" 2>&1)
  rc=$?
  if [ $rc -eq 0 ] && echo "$out" | grep -q '^1\.\.' && ! echo "$out" | grep -q -e '^not ok' \
      -e 'runtime error' -e 'ERROR: AddressSanitizer'; then
    echo "ok $n - $f under ASan and UBSan"
  else
    echo "not ok $n - $f under ASan and UBSan (exit $rc)"
    echo "$out" | grep -v '^ok' | tail -20 | sed 's/^/# /'
  fi
done
echo "1..$n"
