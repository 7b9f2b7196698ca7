"""Benchmark `cgnn ingest` end to end (MariaDB/MySQL -> graph cache) on SYNTHETIC OQMD-shaped data.

    python bench/ingest.py                       # 25k then 100k entries, 1 and 2 workers
    python bench/ingest.py --entries 20000 --small 5000 --workers 2

Creates its own database on the server (default root@127.0.0.1:3306), fills it with `cgnn db synth`
data (the smaller size first, then tops it up to --entries), runs `cgnn ingest` as a subprocess for
each size and worker count, and prints wall time, entries/s (end to end, including start-up), peak RSS
of the ingest process and of its whole process tree, and the projected time for OQMD v1.2's 561,888
entries. Memory is "flat" when the peak RSS of the reading process grows by less than 20% (or 40 MiB)
from the small size to the large one. The database and caches are removed at the end (--keep keeps
them).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cgnn_dgl.report import print_table  # noqa: E402
from ingest.db import make_engine, mysql_reachable, safe_url, temporary_mysql_database  # noqa: E402
from ingest.synth import synthesize  # noqa: E402

OQMD_V12 = 561_888
TARGET_RATE = 600.0


def run_ingest(url: str, out: Path, workers: int, extra: list[str]) -> dict:
    cmd = [sys.executable, "-m", "cgnn_dgl.cli", "ingest", "--db", url, "--out", str(out), "--workers",
           str(workers), "--no-progress", *extra]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ps = psutil.Process(proc.pid)
    peak_main = peak_tree = 0
    while proc.poll() is None:
        try:
            main = ps.memory_info().rss
            tree = main + sum(c.memory_info().rss for c in ps.children(recursive=True))
        except psutil.Error:
            break
        peak_main, peak_tree = max(peak_main, main), max(peak_tree, tree)
        time.sleep(0.05)
    _stdout, stderr = proc.communicate()
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"cgnn ingest failed ({proc.returncode}):\n{stderr[-2000:]}")
    m = json.loads((out / "manifest.json").read_text())
    s = m["summary"]
    return {"wall": wall, "entries": s["entries_read"], "graphs": m["totals"]["graphs"],
            "rejects": m["totals"]["rejects"], "inner_rate": s["entries_per_s"],
            "peak_main_mb": peak_main / 2**20, "peak_tree_mb": peak_tree / 2**20}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--server", default=os.environ.get("CGNN_TEST_MYSQL", "mysql+pymysql://root@127.0.0.1:3306/"))
    ap.add_argument("--entries", type=int, default=100_000, help="synthetic entries, large size (default 100000)")
    ap.add_argument("--small", type=int, default=25_000, help="small size for the memory check (default 25000)")
    ap.add_argument("--workers", default="1,2", help="worker counts to time (default 1,2)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--bad-fraction", type=float, default=0.02)
    ap.add_argument("--batch-size", type=int, default=1000)
    ap.add_argument("--keep", action="store_true", help="keep the database and caches")
    args = ap.parse_args()
    workers = [int(w) for w in args.workers.split(",")]
    down = mysql_reachable(args.server)
    if down:
        print(f"skipped: {down}")
        return 0
    sizes = sorted({min(args.small, args.entries), args.entries})
    rows, results = [], {}
    tmp = Path(tempfile.mkdtemp(prefix="cgnn-bench-ingest-"))
    ctx = temporary_mysql_database(args.server, "cgnn_bench_ingest")
    url = ctx.__enter__()
    try:
        engine = make_engine(url)
        have = 0
        for n in sizes:
            st = synthesize(engine, n - have, seed=args.seed + have, bad_fraction=args.bad_fraction)
            print(f"synthetic entries {have + 1}..{n}: {st.entries / st.seconds:,.0f} entries/s into "
                  f"{safe_url(url)} ({st.seconds:.1f} s, {st.atoms:,} atoms, {st.mean_atoms:.2f} atoms/structure)",
                  flush=True)
            have = n
            for w in workers:
                out = tmp / f"cache-{n}-{w}"
                r = run_ingest(url.render_as_string(hide_password=False), out, w, ["--batch-size", str(args.batch_size)])
                results[(n, w)] = r
                rate = r["entries"] / r["wall"]
                rows.append((f"{n:,}", w, r["entries"], r["graphs"], r["rejects"], round(r["wall"], 1), round(rate),
                             round(r["inner_rate"] or 0), round(r["peak_main_mb"]), round(r["peak_tree_mb"]),
                             f"{OQMD_V12 / rate / 60:.1f}"))
                print(f"  {n:,} entries, {w} worker(s): {rate:,.0f} entries/s end to end", flush=True)
                shutil.rmtree(out, ignore_errors=True)
        engine.dispose()
    finally:
        if args.keep:
            print(f"kept database {url.database} and {tmp}")
        else:
            ctx.__exit__(None, None, None)
            shutil.rmtree(tmp, ignore_errors=True)
    print_table("cgnn ingest, MariaDB -> graph cache (SYNTHETIC OQMD-shaped data)", rows,
                header=("DB entries", "workers", "selected", "graphs", "rejects", "wall s", "entries/s",
                        "in-run/s", "peak RSS MiB", "tree RSS MiB", "561,888 in min"))
    verdicts = []
    if len(sizes) == 2:
        for w in workers:
            a, b = results[(sizes[0], w)], results[(sizes[1], w)]
            grow = b["peak_main_mb"] - a["peak_main_mb"]
            flat = grow < max(40.0, 0.2 * a["peak_main_mb"])
            verdicts.append((f"memory flat {sizes[0]:,} -> {sizes[1]:,}, {w} worker(s)",
                             f"{'yes' if flat else 'NO'} ({a['peak_main_mb']:.0f} -> {b['peak_main_mb']:.0f} MiB)"))
    best = max(results.items(), key=lambda kv: kv[1]["entries"] / kv[1]["wall"])
    (n, w), r = best
    rate = r["entries"] / r["wall"]
    verdicts.append(("best end-to-end rate", f"{rate:,.0f} entries/s ({w} workers, {n:,} entries)"))
    verdicts.append((f"target {TARGET_RATE:.0f} entries/s", "met" if rate >= TARGET_RATE else "NOT met"))
    verdicts.append(("projected OQMD v1.2 (561,888)", f"{OQMD_V12 / rate / 60:.1f} min"))
    print_table("verdict", verdicts)
    return 0


if __name__ == "__main__":
    sys.exit(main())
