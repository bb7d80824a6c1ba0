"""tide.data side by side with Ray Data and Dask (issue 14's third target).

Makes ROWS text lines in FILES files (the Ray Data peer's lines), then runs
read -> filter -> map -> map_batches on an actor pool -> write JSON lines on
them with each system in turn, TRIALS rounds (tide, ray_data, dask in each
round, so each round's systems see the same machine load), and prints one
JSON line per run and a summary: median rows/s of each system, median peak
memory of each system's whole process tree (the sum of RSS, and the sum of
PSS, which counts shared memory such as an object store once), and the
ratios Tide / Ray Data and Tide / Dask from the same rounds.

  /usr/bin/python3 bench/data_compare.py [--rows N] [--files F] [--trials T]
      [--systems tide,ray_data,dask] [--tide-only]

Ray comes from /opt/peers-ray-venv (../shared/peers/install.sh); Dask is
Debian's python3-distributed (this script runs under /usr/bin/python3 for
psutil and Dask). A system that is not installed is reported as skipped.
Each system's cluster start is excluded from its rows/s (ray.init, the Dask
LocalCluster, Tide's first task), as in the Ray Data peer; the memory is
sampled over the whole process, start included.
"""
import argparse, json, os, shutil, subprocess, sys, tempfile, threading, time

import psutil

HERE = os.path.dirname(os.path.abspath(__file__))
HOME = os.path.dirname(HERE)
RAY_PY = os.environ.get("RAY_PYTHON", "/opt/peers-ray-venv/bin/python")
DASK_PY = os.environ.get("DASK_PYTHON", "/usr/bin/python3")


def make_input(src, rows, files):
    per = rows // files
    for f in range(files):
        with open(os.path.join(src, f"part-{f}.txt"), "w") as h:
            for i in range(per):
                h.write(f"Line {i} of part {f}: In the beginning God created the heaven and the earth.\n")
    return per * files


def run_sampled(cmd, env=None):
    """Runs cmd, sampling the memory of its process tree every 0.1 s.
    Returns (rc, stdout, stderr, peak RSS sum, peak PSS sum) in bytes."""
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
    peak = {"rss": 0, "pss": 0}
    done = threading.Event()

    def sample():
        try:
            root = psutil.Process(p.pid)
        except psutil.Error:
            return
        while not done.is_set():
            rss = pss = 0
            try:
                procs = [root] + root.children(recursive=True)
            except psutil.Error:
                procs = []
            for q in procs:
                try:
                    mi = q.memory_full_info()
                    rss += mi.rss
                    pss += getattr(mi, "pss", mi.rss)
                except psutil.Error:
                    pass
            peak["rss"] = max(peak["rss"], rss)
            peak["pss"] = max(peak["pss"], pss)
            done.wait(0.1)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    out, err = p.communicate()
    done.set()
    t.join()
    return p.returncode, out, err, peak["rss"], peak["pss"]


def command(system, src, dst, session):
    env = dict(os.environ)
    if system == "tide":
        env["TIDE_SESSION_DIR"] = session
        return [os.path.join(HOME, "bin", "tide"), "run", os.path.join(HERE, "data_compare.lua"), src, dst], env
    if system == "ray_data":
        if not os.path.exists(RAY_PY):
            return None, f"{RAY_PY} missing (run ../shared/peers/install.sh)"
        return [RAY_PY, os.path.join(HERE, "ray_data_bench.py"), src, dst], env
    if system == "dask":
        r = subprocess.run([DASK_PY, "-c", "import dask.bag, distributed"], capture_output=True)
        if r.returncode != 0:
            return None, "dask.bag / distributed not importable (apt-get install python3-distributed)"
        return [DASK_PY, os.path.join(HERE, "dask_data_bench.py"), src, dst], env
    raise SystemExit(f"unknown system {system}")


def median(v):
    s = sorted(v)
    n = len(s)
    return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=400_000)
    ap.add_argument("--files", type=int, default=8)
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--systems", default="tide,ray_data,dask")
    ap.add_argument("--tide-only", action="store_true")
    ap.add_argument("rows_pos", nargs="?", type=int)
    a = ap.parse_args()
    if a.rows_pos:
        a.rows = a.rows_pos
    systems = ["tide"] if a.tide_only else a.systems.split(",")
    tmp = tempfile.mkdtemp(prefix="tide-data-compare-")
    src = os.path.join(tmp, "in")
    os.makedirs(src)
    rows = make_input(src, a.rows, a.files)
    load = os.getloadavg()
    results = {s: [] for s in systems}
    try:
        for trial in range(1, a.trials + 1):
            for s in systems:
                cmd, env = command(s, src, os.path.join(tmp, f"out-{s}-{trial}"), os.path.join(tmp, f"session-{trial}"))
                if cmd is None:
                    if trial == 1:
                        print(json.dumps({"system": s, "metric": "data_read_map_pool_write", "skipped": env}), flush=True)
                    continue
                t0 = time.perf_counter()
                rc, out, err, rss, pss = run_sampled(cmd, env)
                wall = time.perf_counter() - t0
                rec = None
                for line in out.splitlines():
                    try:
                        v = json.loads(line)
                    except ValueError:
                        continue
                    if isinstance(v, dict) and v.get("metric"):
                        rec = v
                if rc != 0 or rec is None:
                    print(json.dumps({"system": s, "metric": "data_read_map_pool_write", "trial": trial,
                                      "error": f"exit {rc}", "stderr_tail": err[-2000:]}), flush=True)
                    continue
                if rec.get("rows") != rows:
                    rec["error"] = f"wrote {rec.get('rows')} rows, expected {rows}"
                rec.update(trial=trial, peak_tree_rss_mib=rss / 2**20, peak_tree_pss_mib=pss / 2**20,
                           process_wall_s=wall)
                results[s].append(rec)
                print(json.dumps(rec), flush=True)
                shutil.rmtree(os.path.join(tmp, f"out-{s}-{trial}"), ignore_errors=True)
        summary = {"metric": "data_read_map_pool_write_summary", "rows": rows, "files": a.files,
                   "trials": a.trials, "loadavg_before": [round(x, 2) for x in load],
                   "loadavg_after": [round(x, 2) for x in os.getloadavg()]}
        for s, rs in results.items():
            if rs:
                summary[s] = {"rows_per_s": median([r["value"] for r in rs]),
                              "peak_tree_rss_mib": median([r["peak_tree_rss_mib"] for r in rs]),
                              "peak_tree_pss_mib": median([r["peak_tree_pss_mib"] for r in rs]),
                              "runs": len(rs)}
        for peer in ("ray_data", "dask"):
            if results.get("tide") and results.get(peer):
                by_trial = {r["trial"]: r for r in results[peer]}
                ratios = [t["value"] / by_trial[t["trial"]]["value"] for t in results["tide"] if t["trial"] in by_trial]
                mem = [t["peak_tree_pss_mib"] / by_trial[t["trial"]]["peak_tree_pss_mib"]
                       for t in results["tide"] if t["trial"] in by_trial]
                summary[f"tide_over_{peer}_rows_per_s"] = median(ratios)
                summary[f"tide_over_{peer}_peak_pss"] = median(mem)
        print(json.dumps(summary), flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
