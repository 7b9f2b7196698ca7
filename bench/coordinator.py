"""Benchmark of the crystal graph coordinator on the reference dev corpus.

    python bench/coordinator.py [--json PATH] [--limit N] [--repeat R] [--workers 1 2] [--chunk 256]

Times :func:`cgnn_dgl.coordinator.coordinate_many` on the corpus' crystals (already parsed into
``Crystal`` objects; JSON parsing is not timed): once in this process, and with a pool of worker
processes, each coordinating chunks of the batch (the crystals reach the workers by fork, the results
come back pickled, as in a build pipeline). Reports the best of ``--repeat`` runs, structures/s and
atoms/s, the speed-up over the reference coordinator (~23 structures/s on one core: scikit-learn
KMeans on every atom) and the peak RSS of this process and of the workers.

BLAS threads are pinned to 1 (the coordinator does not use BLAS, but numpy's einsum may) so that
"1 process" really means one core.
"""
from __future__ import annotations

import os

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import json  # noqa: E402
import multiprocessing as mp  # noqa: E402
import resource  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cgnn_dgl.coordinator import DEFAULT_PARAMS, CoordinatorParams, coordinate_many, coordinate_packed, radius_table  # noqa: E402
from cgnn_dgl.structures import Crystal  # noqa: E402

REFERENCE_PER_CORE = 23.0  # structures/s of Tony-Y/cgnn tools/mp_graph.py on one core
DEFAULT_JSON = Path(os.environ.get("CGNN_SHARED", ROOT.parent / "shared")) / "reference" / "coordinator_dev.json"

_CRYSTALS: list[Crystal] = []  # inherited by forked workers


def _init_worker() -> None:
    radius_table()  # import pymatgen and build the table before the clock starts


def _work(span: tuple[int, int]):
    a, b = span
    return coordinate_many(_CRYSTALS[a:b], DEFAULT_PARAMS, errors="return")


def _work_packed(span: tuple[int, int]):
    a, b = span
    return coordinate_packed(_CRYSTALS[a:b], DEFAULT_PARAMS, errors="return")


def load(path: Path, limit: int | None) -> list[Crystal]:
    with open(path) as fh:
        rows = json.load(fh)
    if limit:
        rows = rows[:limit]
    return [Crystal(r.get("name", str(k)), r["lattice"], r["numbers"], r["frac"]) for k, r in enumerate(rows)]


def maxrss_mib(who: int) -> float:
    return resource.getrusage(who).ru_maxrss / 1024.0  # kB on Linux


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", type=Path, default=DEFAULT_JSON, help="corpus (coordinator_dev.json layout)")
    ap.add_argument("--limit", type=int, default=None, help="use only the first N structures")
    ap.add_argument("--repeat", type=int, default=5, help="timed runs per setting (best is reported)")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="process counts to time")
    ap.add_argument("--chunk", type=int, default=512, help="structures per task in the worker pool")
    args = ap.parse_args(argv)

    global _CRYSTALS
    if not args.json.is_file():
        print(f"corpus not found: {args.json} (set CGNN_SHARED or pass --json)", file=sys.stderr)
        return 2
    _CRYSTALS = load(args.json, args.limit)
    n_struct = len(_CRYSTALS)
    n_atoms = sum(c.n_atoms for c in _CRYSTALS)
    radius_table()
    coordinate_many(_CRYSTALS[:50], errors="return")  # warm-up
    n_fail = sum(isinstance(r, Exception) for r in coordinate_many(_CRYSTALS, errors="return"))
    print(f"corpus: {args.json} ({n_struct} structures, {n_atoms} atoms, {n_fail} rejected); "
          f"best of {args.repeat}; cores available: {os.cpu_count()}")

    rows = []
    for workers in args.workers:
        for packed in (False, True):
            times, cpu = [], None
            label = f"{workers}" + (" packed" if packed else "")
            if workers == 1:
                fn = coordinate_packed if packed else coordinate_many
                c0 = time.process_time()
                for _ in range(args.repeat):
                    t = time.perf_counter()
                    fn(_CRYSTALS, errors="return")
                    times.append(time.perf_counter() - t)
                cpu = (time.process_time() - c0) / args.repeat
            else:
                spans = [(a, min(a + args.chunk, n_struct)) for a in range(0, n_struct, args.chunk)]
                work = _work_packed if packed else _work
                with mp.get_context("fork").Pool(workers, initializer=_init_worker) as pool:
                    pool.map(work, spans[:workers])  # start the workers before timing
                    for _ in range(args.repeat):
                        t = time.perf_counter()
                        out = pool.map(work, spans, chunksize=1)
                        times.append(time.perf_counter() - t)
                got = sum(len(o[0]) if packed else len(o) for o in out)
                assert got == n_struct, (got, n_struct)
            best = min(times)
            rows.append((label, best, cpu, n_struct / best, n_atoms / best, workers))
    # the opt-in KMeans-compatible pruning (bit-for-bit reference graphs), one process
    kmeans = CoordinatorParams(pruning="kmeans")
    times = []
    c0 = time.process_time()
    for _ in range(args.repeat):
        t = time.perf_counter()
        coordinate_many(_CRYSTALS, kmeans, errors="return")
        times.append(time.perf_counter() - t)
    rows.append(("1 kmeans", min(times), (time.process_time() - c0) / args.repeat, n_struct / min(times),
                 n_atoms / min(times), 1))

    print()
    print("packed: coordinate_packed (one CSR per batch) instead of coordinate_many (arrays per crystal); "
          "kmeans: --pruning kmeans (the reference's KMeans choices)")
    print(f"{'processes':>10} {'best s':>7} {'cpu s':>6} {'structures/s':>13} {'atoms/s':>10} "
          f"{'vs ref/core':>12} {'vs ref x procs':>15}")
    for label, best, cpu, sps, aps, workers in rows:
        cpu_s = f"{cpu:.3f}" if cpu is not None else "-"
        print(f"{label:>10} {best:>7.3f} {cpu_s:>6} {sps:>13,.0f} {aps:>10,.0f} "
              f"{sps / REFERENCE_PER_CORE:>11,.0f}x {sps / (REFERENCE_PER_CORE * workers):>14,.0f}x")
    if any(r[2] is not None for r in rows):
        cpu1 = min(r[2] for r in rows if r[2] is not None and "kmeans" not in r[0])
        print(f"1 process per CPU-second: {n_struct / cpu1:,.0f} structures/s "
              f"({n_struct / cpu1 / REFERENCE_PER_CORE:,.0f}x the reference's {REFERENCE_PER_CORE:.0f}/s)")
    print()
    print(f"peak RSS: this process {maxrss_mib(resource.RUSAGE_SELF):.0f} MiB, "
          f"largest worker {maxrss_mib(resource.RUSAGE_CHILDREN):.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
