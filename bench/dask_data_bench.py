"""Dask peer of tide.data (issue 14), run by bench/data_compare.py:
dask.bag read_text -> filter -> map (lower-case) -> map_partitions (tag,
length: Dask has no actor pools; a partition function is the nearest) ->
JSON lines, on the files in SRC_DIR, on a LocalCluster of 2 worker processes
x 1 thread (as ../shared/peers/dask_bench.py). Prints one JSON line.
usage: /usr/bin/python3 bench/dask_data_bench.py SRC_DIR DST_DIR"""
import json, logging, os, sys, time

src, dst = sys.argv[1], sys.argv[2]
import dask
import dask.bag as db
from distributed import Client, LocalCluster


def tag(part):
    out = []
    for r in part:
        r["tag"] = "pooled"
        r["len"] = len(r["text"])
        out.append(r)
    return out


if __name__ == "__main__":
    cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                           dashboard_address=None, silence_logs=logging.ERROR)
    client = Client(cluster)
    client.wait_for_workers(2, timeout=60)
    t0 = time.perf_counter()
    b = (db.read_text(os.path.join(src, "*.txt"), blocksize=2 ** 21)
         .map(lambda line: line.rstrip("\n"))
         .filter(lambda t: len(t) > 0)
         .map(lambda t: {"text": t.lower()})
         .map_partitions(tag)
         .map(json.dumps))
    b.to_textfiles(os.path.join(dst, "part-*.jsonl"))
    dt = time.perf_counter() - t0
    n = 0
    for name in os.listdir(dst):
        with open(os.path.join(dst, name)) as h:
            n += sum(1 for _ in h)
    print(json.dumps({"system": "dask", "metric": "data_read_map_pool_write", "value": n / dt,
                      "unit": "rows/s", "rows": n, "seconds": dt, "dask": dask.__version__,
                      "workers": 2, "threads_per_worker": 1}))
    client.close()
    cluster.close()
