#!/bin/sh
# Tide's CPU allreduce against Open MPI's MPI_Allreduce on this machine:
# ROUNDS alternating runs of Tide's side and the peers' Open MPI harness
# (../shared/peers/run_mpi.sh, variant malloc-no-mmap: the steady state that
# reuses buffers, as Tide's ring does), then the median bus bandwidth of
# each per size and the ratio tide/mpi, with the load average before each
# run.  Machines are noisy: only ratios from one such run mean anything.
#   sh gpu/bench/compare_allreduce.sh [ROUNDS=3] [PEERS=../shared/peers]
# Env: SIDE=engine (default) times `bin/tide bench allreduce` (two tasks in
#      a tide.collective group); SIDE=ring times build/bench-allreduce (the
#      ring alone between forked processes).
#      BASE=/other/checkout/bin/tide (engine side only) also runs another
#      build's `bench allreduce` in each round, for a before/after column.
cd "$(dirname "$0")/../.." || exit 1
ROUNDS=${1:-3}
PEERS=${2:-$(cd .. && pwd)/shared/peers}
SIDE=${SIDE:-engine}
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
# Debian's openmpi-bin names its tools mpicc.openmpi / mpirun.openmpi; the
# plain names come from alternatives that an unconfigured package lacks.
if ! command -v mpicc >/dev/null && command -v mpicc.openmpi >/dev/null; then
  mkdir -p "$OUT/bin"
  ln -s "$(command -v mpicc.openmpi)" "$OUT/bin/mpicc"
  ln -s "$(command -v mpirun.openmpi)" "$OUT/bin/mpirun"
  PATH=$OUT/bin:$PATH
fi
command -v mpirun >/dev/null && command -v mpicc >/dev/null ||
  { echo "compare_allreduce: Open MPI missing (apt-get install openmpi-bin libopenmpi-dev)"; exit 1; }
case $SIDE in
  engine) [ -x bin/tide ] || make bin/tide >/dev/null || exit 1 ;;
  ring) [ -x build/bench-allreduce ] || make build/bench-allreduce >/dev/null || exit 1 ;;
  *) echo "compare_allreduce: SIDE must be engine or ring, not $SIDE"; exit 1 ;;
esac
for r in $(seq 1 "$ROUNDS"); do
  if [ "$SIDE" = engine ] && [ -n "$BASE" ]; then
    echo "round $r base load $(cut -d' ' -f1-3 /proc/loadavg)"
    "$BASE" bench allreduce >>"$OUT/base.jsonl" || exit 1
  fi
  echo "round $r tide load $(cut -d' ' -f1-3 /proc/loadavg)"
  if [ "$SIDE" = engine ]; then
    bin/tide bench allreduce >>"$OUT/tide.jsonl" || exit 1
  else
    build/bench-allreduce >>"$OUT/tide.jsonl" || exit 1
  fi
  echo "round $r mpi  load $(cut -d' ' -f1-3 /proc/loadavg)"
  MPI_VARIANTS=malloc-no-mmap bash "$PEERS/run_mpi.sh" >>"$OUT/mpi.jsonl" 2>/dev/null || exit 1
done
touch "$OUT/base.jsonl"
python3 - "$OUT/tide.jsonl" "$OUT/mpi.jsonl" "$OUT/base.jsonl" <<'PY'
import json, statistics, sys
def load(p):
    d = {}
    for line in open(p):
        try: j = json.loads(line)
        except ValueError: continue
        if not j.get("metric", "").startswith("allreduce_f32_sum_"): continue
        if j.get("correct") is False: sys.exit("incorrect result in " + p)
        d.setdefault(j["metric"], []).append(j["value"])
    return d
t, m, base = load(sys.argv[1]), load(sys.argv[2]), load(sys.argv[3])
if base:
    print("%-26s %12s %12s %8s   %s" % ("metric (busbw GB/s)", "base", "tide", "tide/base", "base runs"))
    for k in t:
        a, b = statistics.median(t[k]), statistics.median(base.get(k, [float("nan")]))
        print("%-26s %12.3f %12.3f %8.2f   %s" % (k, b, a, a / b if b else float("nan"),
              " ".join("%.2f" % v for v in base.get(k, []))))
print("%-26s %12s %12s %8s   %s" % ("metric (busbw GB/s)", "tide", "openmpi", "ratio", "tide runs / mpi runs"))
for k in t:
    a, b = statistics.median(t[k]), statistics.median(m.get(k, [float("nan")]))
    print("%-26s %12.3f %12.3f %8.2f   %s / %s" % (k, a, b, a / b if b else float("nan"),
          " ".join("%.2f" % v for v in t[k]), " ".join("%.2f" % v for v in m.get(k, []))))
    print(json.dumps({"metric": k, "value": a, "unit": "GB/s", "limit": b,
                      "limit_name": "openmpi_allreduce", "fraction_of_limit": a / b if b else None,
                      "rounds": len(t[k])}))
PY
