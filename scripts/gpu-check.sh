#!/bin/sh
# GPU validation for a machine with a GPU and no package registry, from a
# build made elsewhere.
#
#   sh scripts/gpu-check.sh pack [BUNDLE=build/gpu-bundle]   (build machine)
#       Copies bin/tide, build/tide_cuda.so, stdlib/, the GPU tests and
#       benchmarks, the KJV data file, lua-cjson, and every shared library
#       the binary and the plugin link (found with ldd; glibc and the NVIDIA
#       driver's libcuda excepted) into BUNDLE, then makes BUNDLE.tar.gz.
#       NO_CUDA_LIBS=1 leaves out cuBLAS/NCCL (~800 MB) for GPU machines
#       that have a CUDA toolkit in /usr/local/cuda.
#   sh scripts/gpu-check.sh run [OUT=results]                 (GPU machine,
#       from inside the unpacked bundle, or from a source tree with a build)
#       Runs the GPU tests (CUDA against the CPU reference, NCCL), then the
#       GPU benchmarks (matmul vs the cuBLAS/peak, GPT training tokens/s and
#       MFU, NCCL allreduce bus bandwidth when there are >= 2 GPUs).  Each
#       step has a timeout; JSON lines and logs go to OUT; a summary prints
#       at the end.  Exit status 0 when every test passed.
#   sh scripts/gpu-check.sh all   pack, unpack into a temp dir, run (local).
set -u
HERE=$(cd "$(dirname "$0")/.." && pwd)

pack() {
  B=${1:-build/gpu-bundle}
  cd "$HERE" || exit 1
  [ -x bin/tide ] || { echo "gpu-check: build first (make)"; exit 1; }
  [ -f build/tide_cuda.so ] || echo "gpu-check: warning: no build/tide_cuda.so (nvcc missing?)"
  rm -rf "$B" && mkdir -p "$B/bin" "$B/build/cuda-libs" "$B/lib" "$B/lua" "$B/data" "$B/scripts" \
    "$B/tests/lua" "$B/gpu" || exit 1
  cp bin/tide "$B/bin/"
  cp -r stdlib "$B/"
  cp -r tests/gpu "$B/tests/"
  cp tests/lua/harness.lua "$B/tests/lua/"
  cp -r gpu/bench "$B/gpu/"
  cp -r examples "$B/" 2>/dev/null
  cp scripts/gpu-check.sh "$B/scripts/"
  [ -f /usr/lib/bible.data ] && cp /usr/lib/bible.data "$B/data/"
  # Lua C modules the scripts require (cjson), found through package.cpath.
  for m in cjson; do
    so=$(luajit -e "print(package.searchpath('$m', package.cpath) or '')" 2>/dev/null)
    [ -n "$so" ] && cp "$so" "$B/lua/"
  done
  # Every shared library but glibc's own and the driver's.
  skip='^(linux-vdso|ld-linux|libc\.so|libm\.so|libpthread|libdl\.so|librt\.so|libcuda\.so|libnvidia)'
  carry() { # carry BINARY DEST
    ldd "$1" | awk '/=> \// {print $1, $3}' | while read -r name path; do
      echo "$name" | grep -qE "$skip" && continue
      cp -L "$path" "$2/$name"
    done
  }
  carry bin/tide "$B/lib"
  if [ -f build/tide_cuda.so ]; then
    cp build/tide_cuda.so "$B/build/"
    # cuBLAS, cuBLASLt and NCCL are ~800 MB; a GPU machine with its own CUDA
    # toolkit in /usr/local/cuda can do without them (NO_CUDA_LIBS=1).
    if [ -z "${NO_CUDA_LIBS:-}" ]; then
      carry build/tide_cuda.so "$B/build/cuda-libs"
    else
      skip="$skip|^(libcublas|libnccl)"
      carry build/tide_cuda.so "$B/build/cuda-libs"
    fi
  fi
  [ -f build/fake_cuda.so ] && cp build/fake_cuda.so "$B/build/"
  tar -C "$(dirname "$B")" -czf "$B.tar.gz" "$(basename "$B")"
  echo "gpu-check: bundle $B ($(du -sh "$B" | cut -f1)), archive $B.tar.gz"
}

run() {
  OUT=${1:-results}
  cd "$HERE" || exit 1
  mkdir -p "$OUT"
  # Inside a bundle: its libraries, cjson, data; in a source tree: the system's.
  [ -d lib ] && export LD_LIBRARY_PATH="$HERE/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  [ -d lua ] && export LUA_CPATH="$HERE/lua/?.so;;"
  [ -f data/bible.data ] && export TIDE_KJV_PATH="$HERE/data/bible.data"
  date -u +%Y-%m-%dT%H:%M:%SZ >"$OUT/date"
  { command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 || echo "no nvidia-smi"; } |
    tee "$OUT/gpus.txt"
  ngpu=$(bin/tide run /dev/stdin <<'LUA' 2>/dev/null
print(require("tide.tensor").device_count())
LUA
)
  echo "gpu-check: tide sees ${ngpu:-0} CUDA device(s)"
  fail=0
  step() { # step NAME TIMEOUT CMD...
    name=$1 t=$2
    shift 2
    echo "== $name"
    timeout -k 10 "$t" "$@" >"$OUT/$name.log" 2>&1
    rc=$?
    grep -E '^(not ok|ok .*SKIP)|"metric"' "$OUT/$name.log" | head -40
    [ $rc -ne 0 ] && echo "   ($name exit status $rc)"
    return $rc
  }
  for f in tests/gpu/*_test.lua; do
    n=$(basename "$f" .lua)
    step "$n" 300 bin/tide run "$f" || fail=1
    grep -q '^not ok' "$OUT/$n.log" && fail=1
  done
  if grep -q 'SKIP no GPU' "$OUT/cuda_test.log" 2>/dev/null; then
    echo "gpu-check: the CUDA tests were skipped: no usable GPU"
    fail=1
  fi
  step tensor_bench 600 bin/tide run gpu/bench/tensor_bench.lua cuda:0 || fail=1
  if [ "${ngpu:-0}" -ge 2 ]; then
    id="$OUT/nccl.id"
    rm -f "$id"
    echo "== nccl_bench ($ngpu ranks)"
    r=1
    while [ $r -lt "$ngpu" ]; do
      timeout -k 10 300 bin/tide run gpu/bench/nccl_bench.lua $r "$ngpu" "$id" >"$OUT/nccl_rank$r.log" 2>&1 &
      r=$((r + 1))
    done
    timeout -k 10 300 bin/tide run gpu/bench/nccl_bench.lua 0 "$ngpu" "$id" >"$OUT/nccl_bench.log" 2>&1 || fail=1
    wait
    grep '"metric"' "$OUT/nccl_bench.log"
  else
    echo "== nccl_bench: skipped, needs at least 2 GPUs (bus bandwidth of one rank is meaningless)"
  fi
  cat "$OUT"/*.log | grep '"metric"' >"$OUT/results.jsonl"
  echo "gpu-check: $(grep -c '^ok' "$OUT"/*_test.log | awk -F: '{s += $2} END {print s}') tests passed," \
    "$(cat "$OUT"/*_test.log | grep -c '^not ok') failed; results in $OUT/results.jsonl"
  return $fail
}

case "${1:-}" in
  pack) shift; pack "$@" ;;
  run) shift; run "$@" ;;
  all)
    pack build/gpu-bundle || exit 1
    T=$(mktemp -d) && tar -C "$T" -xzf build/gpu-bundle.tar.gz &&
      sh "$T/gpu-bundle/scripts/gpu-check.sh" run "$T/results"
    ;;
  *) sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'; exit 2 ;;
esac
