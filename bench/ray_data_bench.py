"""Ray Data peer of tide.data (issue 14), run by bench/data_compare.py:
read text lines -> filter -> map (lower-case) -> map_batches on an actor
pool (tag, length) -> write JSON, on the files in SRC_DIR. Prints one JSON
line. A copy of ../shared/peers/ray_data_bench.py that reads given files
(so every system reads the same ones) instead of making its own.
usage: /opt/peers-ray-venv/bin/python bench/ray_data_bench.py SRC_DIR DST_DIR"""
import json, os, sys, time

src, dst = sys.argv[1], sys.argv[2]
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
import ray

ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
ray.data.DataContext.get_current().enable_progress_bars = False


class Tagger:
    def __init__(self):
        self.tag = "pooled"

    def __call__(self, batch):
        batch["tag"] = [self.tag] * len(batch["text"])
        batch["len"] = [len(t) for t in batch["text"]]
        return batch


t0 = time.perf_counter()
ds = (ray.data.read_text(src)
      .filter(lambda r: len(r["text"]) > 0)
      .map(lambda r: {"text": r["text"].lower()})
      # 2 actors x 1 CPU would starve the read stage on 2 CPUs (Ray Data
      # then deadlocks): the peer script's choice, kept.
      .map_batches(Tagger, batch_size=100, concurrency=2, num_cpus=0.5))
ds.write_json(dst)
dt = time.perf_counter() - t0
n = 0
for name in os.listdir(dst):
    with open(os.path.join(dst, name)) as h:
        n += sum(1 for _ in h)
print(json.dumps({"system": "ray_data", "metric": "data_read_map_pool_write", "value": n / dt,
                  "unit": "rows/s", "rows": n, "seconds": dt, "ray": ray.__version__, "cpus": 2}))
ray.shutdown()
