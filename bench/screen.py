"""Benchmark: `cgnn screen` end to end, candidates/s, with and without --db (issue 10).

Builds its own small setting unless given one: a synthetic OQMD-shaped SQLite database (``cgnn db synth``;
its labels are SYNTHETIC, which does not matter for speed), a cache from it, and a small model trained for
one epoch (``configs/tiny.yaml``). The prototype is cubic perovskite ABX3 (a = 3.9 Å) with pools on A, B and
the three equivalent X sites. Every figure is wall time of the ``cgnn screen`` process, start-up included,
so the rate rises with the number of candidates.

The baseline, measured in the same run, is what a user does without `cgnn screen`: write each decorated
structure as a CIF and run ``cgnn predict`` over the folder (on the first ``--baseline`` candidates).

    python bench/screen.py                       # about 48,000 candidates without --db, 4,800 with it
    python bench/screen.py --a-pool 10 --b-pool 10 --x-pool 6 --db-limit 2000
"""
from __future__ import annotations

import argparse
import csv
import itertools
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

A_POOL = ["Li", "Na", "K", "Rb", "Cs", "Mg", "Ca", "Sr", "Ba", "La", "Ce", "Pr", "Nd", "Sm", "Gd", "Y", "Sc", "Bi", "Pb", "Ag"]
B_POOL = ["Ti", "Zr", "Hf", "V", "Nb", "Ta", "Cr", "Mo", "W", "Mn", "Fe", "Co", "Ni", "Cu", "Zn", "Al", "Ga", "In", "Sn", "Ge"]
X_POOL = ["O", "N", "F", "S", "Cl", "Br", "Se", "I"]


def cgnn(*args: str, env=None) -> tuple[float, float]:
    """Run one ``cgnn`` command; (wall s, peak RSS MiB of that process)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "cgnn_dgl.cli", *args], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(f"cgnn {' '.join(args[:1])} failed with exit code {proc.returncode}")
    return wall, usage.ru_maxrss / 1024


def setting(work: Path, entries: int) -> tuple[str, str]:
    """(sqlite URL, model path): a synthetic database and a one-epoch tiny model trained on it."""
    db = f"sqlite:///{work / 'oqmd.sqlite'}"
    cgnn("db", "init", "--db", db)
    cgnn("db", "synth", "--db", db, "--entries", str(entries), "--seed", "0")
    cgnn("ingest", "--db", db, "--out", str(work / "cache"), "--workers", "2", "--no-progress")
    cgnn("train", "--config", "configs/tiny.yaml", "--cache", str(work / "cache"), "--out", str(work / "run"),
         "--set", "train.epochs=1")
    return db, str(work / "run" / "best.pt")


def prototype(path: Path) -> None:
    import numpy as np
    from pymatgen.io.cif import CifWriter

    from cgnn_dgl.structures import Crystal

    frac = [[0, 0, 0], [0.5, 0.5, 0.5], [0.5, 0.5, 0], [0.5, 0, 0.5], [0, 0.5, 0.5]]
    proto = Crystal("ABX3", np.eye(3) * 3.9, [38, 22, 8, 8, 8], np.array(frac, float))
    path.write_text(str(CifWriter(proto.to_pymatgen())))


def count_rows(path: Path) -> int:
    with open(path, newline="") as fh:
        return sum(1 for _ in csv.DictReader(fh))


def baseline(work: Path, model: str, proto: Path, pools: tuple[list, list, list], n: int) -> tuple[int, float, float]:
    """Decorated CIFs of the first ``n`` candidates (symmetry-distinct X multisets) + one cgnn predict."""
    from pymatgen.core import Structure

    folder = work / "baseline_cifs"
    folder.mkdir(exist_ok=True)
    t0 = time.perf_counter()
    base = Structure.from_file(str(proto))
    k = 0
    for a, b, xs in itertools.product(pools[0], pools[1], itertools.combinations_with_replacement(pools[2], 3)):
        if k >= n:
            break
        s = base.copy()
        for i, el in enumerate((a, b) + xs):
            s.replace(i, el)
        s.to(filename=str(folder / f"c{k}.cif"))
        k += 1
    write_s = time.perf_counter() - t0
    wall, rss = cgnn("predict", "--model", model, str(folder), "--out", str(work / "baseline.csv"))
    return k, write_s + wall, rss


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="a trained model (default: train a tiny one on a synthetic database)")
    ap.add_argument("--db", help="known phases for --db (default: the synthetic database built here)")
    ap.add_argument("--entries", type=int, default=2000, help="synthetic database size")
    ap.add_argument("--a-pool", type=int, default=20)
    ap.add_argument("--b-pool", type=int, default=20)
    ap.add_argument("--x-pool", type=int, default=8, help="X pool size k: C(k+2, 3) X decorations")
    ap.add_argument("--db-limit", type=int, default=4, help="A and B pool sizes of the --db run")
    ap.add_argument("--baseline", type=int, default=2000, help="candidates in the CIF + cgnn predict baseline")
    ap.add_argument("--work", help="work folder (default: a temporary one)")
    args = ap.parse_args(argv)
    if bool(args.model) != bool(args.db):
        ap.error("give --model and --db together (the --db row needs a database), or neither")

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        db, model = (args.db, args.model) if args.model else setting(work, args.entries)
        print(f"setting ready in {time.perf_counter() - t0:.0f} s (model {model})", flush=True)
        proto = work / "perovskite.cif"
        prototype(proto)
        pools = (A_POOL[:args.a_pool], B_POOL[:args.b_pool], X_POOL[:args.x_pool])
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
        rows = []

        def screen(name: str, a: list, b: list, extra: list[str]) -> float:
            out = work / name
            wall, rss = cgnn("screen", "--model", model, "--prototype", str(proto), "--site", "0=" + ",".join(a),
                             "--site", "1=" + ",".join(b), "--site", "2,3,4=" + ",".join(pools[2]),
                             "--out", str(out), "--top", "10", *extra, env=env)
            n = count_rows(out / "candidates.csv")
            rows.append((name, n, wall, n / wall, rss))
            return n / wall

        rate = screen("screen", pools[0], pools[1], ["--rank-by", "formation_energy"])
        k = args.db_limit
        screen("screen --db", pools[0][:k], pools[1][:k], ["--db", db])
        n, wall, rss = baseline(work, model, proto, pools, args.baseline)
        rows.append(("CIFs + cgnn predict (baseline)", n, wall, n / wall, rss))

    print()
    print(f"cgnn screen, cubic perovskite ABX3, pools A {len(pools[0])} / B {len(pools[1])} / X {len(pools[2])} "
          f"(--db run: A {k} / B {k}); {os.cpu_count()} CPUs; wall time of each process, start-up included")
    print(f"{'run':<32} {'candidates':>10} {'wall s':>8} {'candidates/s':>13} {'peak RSS MiB':>13}")
    for name, n, w, r, m in rows:
        print(f"{name:<32} {n:>10,} {w:>8.1f} {r:>13,.0f} {m:>13.0f}")
    print(f"screen / baseline throughput: {rate / rows[-1][3]:.1f}x  (goal >= 5,000 candidates/s without --db)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
