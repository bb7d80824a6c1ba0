#!/bin/sh
# The CUDA plugin boundary: bin/tide links no CUDA library; the plugin (when
# nvcc built it) is self-contained; loading it without a GPU, or loading a
# missing plugin, fails the call with a clear message and never the
# process; the fake plugin runs every CUDA test path on the CPU.  TAP.
cd "$(dirname "$0")/../.." || exit 1
n=0
ok() { n=$((n + 1)); echo "ok $n - $1"; }
nok() { n=$((n + 1)); echo "not ok $n - $1"; [ -n "$2" ] && echo "$2" | sed 's/^/# /'; }
skip() { n=$((n + 1)); echo "ok $n - $1 # SKIP $2"; }
TMP=$(mktemp -d) && trap 'rm -rf "$TMP"' EXIT

if ldd bin/tide | grep -qiE 'libcuda|cublas|nccl|cudart'; then
  nok "bin/tide links no CUDA library" "$(ldd bin/tide | grep -iE 'cuda|cublas|nccl')"
else
  ok "bin/tide links no CUDA library"
fi

NVCC=$(command -v nvcc || { [ -x /usr/local/cuda/bin/nvcc ] && echo /usr/local/cuda/bin/nvcc; })
if [ -z "$NVCC" ]; then
  skip "the CUDA plugin is built and self-contained" "no nvcc"
elif [ ! -f build/tide_cuda.so ]; then
  nok "the CUDA plugin is built and self-contained" "build/tide_cuda.so missing although nvcc exists"
else
  und=$(nm -D --undefined-only build/tide_cuda.so | grep ' td_')
  if nm -D --defined-only build/tide_cuda.so | grep -q ' td_cuda_plugin_get$' && [ -z "$und" ]; then
    ok "the CUDA plugin is built and self-contained"
  else
    nok "the CUDA plugin is built and self-contained" "undefined: $und"
  fi
fi

cat >"$TMP/probe.lua" <<'LUA'
local T = require("tide.tensor")
local ok, why = T.cuda_available()
print("available", ok, why)
local moved, err = pcall(function() return T.ones({2}):to("cuda:0") end)
print("moved", moved, moved and "" or err)
print("cpu still works", T.matmul(T.ones({2, 2}), T.ones({2, 2})):to_table()[1][1])
LUA

if [ -f build/tide_cuda.so ]; then
  out=$(TIDE_FORCE_CUDA_PLUGIN=1 TIDE_CUDA_PLUGIN="$PWD/build/tide_cuda.so" bin/tide run "$TMP/probe.lua" 2>&1)
  rc=$?
  if [ -e /dev/nvidia0 ]; then
    echo "$out" | grep -q '^available	true' && [ $rc -eq 0 ] &&
      ok "the real plugin loads on this GPU machine" || nok "the real plugin loads on this GPU machine" "$out"
  elif [ $rc -eq 0 ] && echo "$out" | grep -q '^available	false	no GPU' &&
      echo "$out" | grep -q 'cannot move to cuda:0' && echo "$out" | grep -q 'cpu still works	2'; then
    ok "the real plugin, forced without a GPU, fails the call and not the process"
  else
    nok "the real plugin, forced without a GPU, fails the call and not the process" "$out"
  fi
else
  skip "the real plugin, forced without a GPU, fails the call and not the process" "no plugin built"
fi

out=$(TIDE_FORCE_CUDA_PLUGIN=1 TIDE_CUDA_PLUGIN=/nonexistent/tide_cuda.so bin/tide run "$TMP/probe.lua" 2>&1)
if [ $? -eq 0 ] && echo "$out" | grep -q 'CUDA plugin could not be loaded' &&
    echo "$out" | grep -q 'cpu still works	2'; then
  ok "a missing plugin gives a clear error"
else
  nok "a missing plugin gives a clear error" "$out"
fi

out=$(TIDE_FORCE_CUDA_PLUGIN=1 TIDE_CUDA_PLUGIN="$PWD/build/fake_cuda.so" bin/tide run tests/gpu/cuda_test.lua 2>&1)
pass=$(echo "$out" | grep -c '^ok ')
if [ "$pass" -ge 7 ] && ! echo "$out" | grep -q -e '^not ok' -e 'SKIP'; then
  ok "every CUDA test path runs against the fake plugin ($pass passed)"
else
  nok "every CUDA test path runs against the fake plugin" "$out"
fi
echo "1..$n"
