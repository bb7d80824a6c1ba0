#!/bin/sh
# Tide's CPU ring allreduce against Open MPI's MPI_Allreduce on this machine:
# ROUNDS alternating runs of build/bench-allreduce and the peers' Open MPI
# harness (../shared/peers/run_mpi.sh, variant malloc-no-mmap: the steady
# state that reuses buffers, as Tide's ring does), then the median bus
# bandwidth of each per size and the ratio tide/mpi.  Machines are noisy:
# only ratios from one such run mean anything.
#   sh gpu/bench/compare_allreduce.sh [ROUNDS=3] [PEERS=../shared/peers]
cd "$(dirname "$0")/../.." || exit 1
ROUNDS=${1:-3}
PEERS=${2:-$(cd .. && pwd)/shared/peers}
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
command -v mpirun >/dev/null || { echo "compare_allreduce: Open MPI missing (apt-get install openmpi-bin libopenmpi-dev)"; exit 1; }
[ -x build/bench-allreduce ] || make build/bench-allreduce >/dev/null || exit 1
for r in $(seq 1 "$ROUNDS"); do
  build/bench-allreduce >>"$OUT/tide.jsonl" || exit 1
  MPI_VARIANTS=malloc-no-mmap bash "$PEERS/run_mpi.sh" >>"$OUT/mpi.jsonl" 2>/dev/null || exit 1
done
python3 - "$OUT/tide.jsonl" "$OUT/mpi.jsonl" <<'PY'
import json, statistics, sys
def load(p):
    d = {}
    for line in open(p):
        try: j = json.loads(line)
        except ValueError: continue
        if j.get("correct") is False: sys.exit("incorrect result in " + p)
        d.setdefault(j["metric"], []).append(j["value"])
    return d
t, m = load(sys.argv[1]), load(sys.argv[2])
print("%-26s %12s %12s %8s" % ("metric (busbw GB/s)", "tide", "openmpi", "ratio"))
for k in t:
    a, b = statistics.median(t[k]), statistics.median(m.get(k, [float("nan")]))
    print("%-26s %12.3f %12.3f %8.2f" % (k, a, b, a / b if b else float("nan")))
    print(json.dumps({"metric": k, "value": a, "unit": "GB/s", "limit": b,
                      "limit_name": "openmpi_allreduce", "fraction_of_limit": a / b if b else None,
                      "rounds": len(t[k])}))
PY
