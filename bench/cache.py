"""Benchmark the graph cache and the batch path against one-DGL-graph-per-crystal.

Graphs are the reference graphs of ../shared/reference/coordinator_dev.json (real structures, the
reference neighbour lists), repeated with fresh keys up to --graphs (default 100,000) so that the
projection to the full OQMD (562k graphs) rests on a large measurement.

    python bench/cache.py [--graphs 100000] [--baseline 5000]
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import dgl

from cgnn_dgl.batching import iter_batches
from cgnn_dgl.cache import Built, CacheWriter, ShardStream, load_packed
from cgnn_dgl.graph import graph_from_neighbors
from cgnn_dgl.report import peak_rss_mb, print_table

OQMD = 561_888


def dev_rows(shared: Path) -> list[dict]:
    with open(shared / "reference" / "coordinator_dev.json") as fh:
        return [r for r in json.load(fh) if r["error"] is None]


def make_built(rows: list[dict], n: int) -> list[Built]:
    out = []
    for key in range(n):
        row = rows[key % len(rows)]
        counts = np.array([len(x) for x in row["neighbors"]], dtype=np.int64)
        nbr = np.array([i for x in row["neighbors"] for i in x], dtype=np.int64)
        y = np.array([-0.5, 12.0, 1.0, 0.0])
        out.append(Built(key, row["name"], np.array(row["numbers"], dtype=np.int64), counts, nbr, y,
                         np.ones(4, bool)))
    return out


def rss_mb() -> float:
    return psutil.Process().memory_info().rss / 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--graphs", type=int, default=100_000)
    ap.add_argument("--baseline", type=int, default=5_000, help="graphs for the one-graph-per-crystal baseline")
    ap.add_argument("--batch-size", type=int, default=512)
    ap.add_argument("--shared", default=os.environ.get("CGNN_SHARED", str(Path(__file__).resolve().parents[2] / "shared")))
    args = ap.parse_args()

    rows = dev_rows(Path(args.shared))
    built = make_built(rows, args.graphs)
    n_atoms = sum(len(b.numbers) for b in built) / len(built)
    n_bonds = sum(len(b.nbr) for b in built) / len(built)
    tmp = Path(tempfile.mkdtemp(prefix="cgnn-bench-cache-"))

    # -- packed cache ------------------------------------------------------------------------------
    t = time.perf_counter()
    writer = CacheWriter(tmp / "packed", source={"kind": "bench"}, params={"bench": True}, shard_size=8192)
    stream = ShardStream(writer)
    for b in built:
        stream.add(b)
    stream.flush()
    writer.close()
    t_write = time.perf_counter() - t
    disk = sum(f.stat().st_size for f in (tmp / "packed" / "shards").iterdir())
    del built, writer, stream
    gc.collect()

    rss0 = rss_mb()
    t = time.perf_counter()
    packed = load_packed(tmp / "packed", verify=True)
    t_read = time.perf_counter() - t
    rss_load = rss_mb() - rss0

    rng = np.random.default_rng(0)
    t = time.perf_counter()
    n_batched = 0
    for idx, _g in iter_batches(packed, np.arange(len(packed)), args.batch_size, shuffle=True, rng=rng):
        n_batched += len(idx)
    t_batch = time.perf_counter() - t

    # -- baseline: one DGL graph per crystal --------------------------------------------------------
    nb = min(args.baseline, len(rows) * 10)
    graphs = [graph_from_neighbors(rows[k % len(rows)]["numbers"], rows[k % len(rows)]["neighbors"],
                                   [-0.5, 12.0, 1.0, 0.0], entry_id=k) for k in range(nb)]
    t = time.perf_counter()
    dgl.save_graphs(str(tmp / "single.bin"), graphs)
    b_write = time.perf_counter() - t
    b_disk = (tmp / "single.bin").stat().st_size
    t = time.perf_counter()
    loaded, _ = dgl.load_graphs(str(tmp / "single.bin"))
    b_read = time.perf_counter() - t
    t = time.perf_counter()
    order = rng.permutation(nb)
    for s in range(0, nb, args.batch_size):
        dgl.batch([loaded[i] for i in order[s:s + args.batch_size]])
    b_batch = time.perf_counter() - t

    n = len(packed)
    rate = lambda k, s: k / s if s > 0 else float("nan")  # noqa: E731
    w, r, bt = rate(n, t_write), rate(n, t_read), rate(n_batched, t_batch)
    bw, br, bb = rate(nb, b_write), rate(nb, b_read), rate(nb, b_batch)
    rows_out = [
        ("cache write (graphs/s)", w, bw, w / bw),
        ("cache read (graphs/s)", r, br, r / br),
        (f"batch assembly @ {args.batch_size} (structures/s)", bt, bb, bt / bb),
        ("bytes per graph on disk", disk / n, b_disk / nb, (disk / n) / (b_disk / nb)),
        ("bytes per graph in RAM (arrays)", packed.nbytes / n, float("nan"), float("nan")),
        ("RSS growth per graph on load (bytes)", rss_load * 2**20 / n, float("nan"), float("nan")),
    ]
    print(f"\n{n:,} graphs (mean {n_atoms:.1f} atoms, {n_bonds:.1f} bonds), baseline on {nb:,} graphs")
    print_table("graph cache vs one DGL graph per crystal", rows_out,
                header=["measure", "packed cache", "per-crystal DGL", "ratio"])
    proj_load = OQMD / r
    proj_mem = max(packed.nbytes, rss_load * 2**20) / n * OQMD / 2**20
    print_table(f"projection to the full OQMD ({OQMD:,} graphs)", [
        ("load time (s)", proj_load, "target < 30"),
        ("memory (MiB)", proj_mem, "target < 2048"),
        ("one epoch of batch assembly (s)", OQMD / bt, ""),
        ("peak RSS of this benchmark (MiB)", peak_rss_mb(), ""),
    ], header=["measure", "value", "target"])
    import shutil

    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
