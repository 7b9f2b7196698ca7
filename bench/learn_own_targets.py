"""Learning check on a user's own data and target names, through the CLI only (issue 9).

1. The first ``--n-base`` rows of ``../shared/data/perov5/train.csv`` become a CGCNN folder (headerless
   ``id_prop.csv`` + one CIF per id); ``cgnn graphs DIR --targets heat_all,dir_gap`` (names no preset knows)
   builds the cache; ``cgnn train --targets heat_all,dir_gap`` trains on the internal formula split;
   ``cgnn evaluate`` scores the test split, beside the mean predictor.
2. Fine-tuning on a target the first model never saw: the remaining rows (never seen by step 1) labelled
   with ``heat_ref``; 300 train / 100 val / the rest test, by a split file. One model starts from step 1's
   checkpoint (``--init``, fresh ``heat_ref`` head, trunk frozen for the first epochs), one from scratch.

    python bench/learn_own_targets.py                 # about 10 minutes on 2 cores
    python bench/learn_own_targets.py --epochs 30 --ft-epochs 60 --work /tmp/own
"""
from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CSV = REPO.parent / "shared" / "data" / "perov5" / "train.csv"


def cgnn(*args: str) -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "cgnn_dgl.cli", *args], check=True, cwd=REPO,
                   stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def cgcnn_folder(rows: list[dict], folder: Path, targets: list[str]) -> None:
    folder.mkdir(parents=True)
    with open(folder / "id_prop.csv", "w", newline="") as fh:
        w = csv.writer(fh, lineterminator="\n")
        for r in rows:
            w.writerow([r["material_id"], *(r[t] for t in targets)])
            (folder / f"{r['material_id']}.cif").write_text(r["cif"])


def test_mae(run: Path) -> dict:
    m = json.loads((run / "metrics.json").read_text())["regression"]
    return {t: (v["n"], v["mae"], v.get("mean_predictor_mae"), v.get("unit", "")) for t, v in m.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--csv", default=str(CSV))
    ap.add_argument("--n-base", type=int, default=3000, help="rows for the first model")
    ap.add_argument("--epochs", type=int, default=60)
    ap.add_argument("--ft-epochs", type=int, default=100)
    ap.add_argument("--freeze", type=int, default=20, help="train.freeze_trunk_epochs of the fine-tuned run")
    ap.add_argument("--work", help="work folder (default: a temporary one)")
    args = ap.parse_args(argv)
    with open(args.csv, newline="") as fh:
        rows = list(csv.DictReader(fh))
    base_rows, ft_rows = rows[:args.n_base], rows[args.n_base:]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        common = ["--set", "model.preset=benchmark", "--set", "train.batch_size=64",
                  "--set", f"train.milestones=[{int(args.epochs * 0.8)}]"]
        cfg = REPO / "configs" / "benchmark.yaml"
        cgcnn_folder(base_rows, work / "base_in", ["heat_all", "dir_gap"])
        t_graphs = cgnn("graphs", str(work / "base_in"), "--targets", "heat_all,dir_gap",
                        "--units", "heat_all=eV/atom,dir_gap=eV", "--out", str(work / "base_cache"))
        t_base = cgnn("train", "--config", str(cfg), "--cache", str(work / "base_cache"), "--targets",
                      "heat_all,dir_gap", "--set", f"train.epochs={args.epochs}", "--set",
                      "train.target_loss={dir_gap: l1}", *common, "--out", str(work / "base_run"))
        cgnn("evaluate", "--run", str(work / "base_run"))
        base = test_mae(work / "base_run")

        cgcnn_folder(ft_rows, work / "ft_in", ["heat_ref"])
        cgnn("graphs", str(work / "ft_in"), "--targets", "heat_ref", "--units", "heat_ref=eV/atom",
             "--out", str(work / "ft_cache"))
        ids = [r["material_id"] for r in ft_rows]
        with open(work / "split.csv", "w", newline="") as fh:
            w = csv.writer(fh, lineterminator="\n")
            w.writerow(["id", "split"])
            for k, i in enumerate(ids):
                w.writerow([i, "train" if k < 300 else "val" if k < 400 else "test"])
        ft_common = ["--config", str(cfg), "--cache", str(work / "ft_cache"), "--targets", "heat_ref",
                     "--set", "train.split=file", "--set", f"train.split_file={work / 'split.csv'}",
                     "--set", f"train.epochs={args.ft_epochs}", "--set", "train.batch_size=32",
                     "--set", f"train.milestones=[{int(args.ft_epochs * 0.8)}]"]
        t_ft = cgnn("train", *ft_common, "--init", str(work / "base_run" / "best.pt"),
                    "--set", f"train.freeze_trunk_epochs={args.freeze}", "--out", str(work / "ft_run"))
        t_scratch = cgnn("train", *ft_common, "--set", "model.preset=benchmark", "--out", str(work / "scratch_run"))
        for r in ("ft_run", "scratch_run"):
            cgnn("evaluate", "--run", str(work / r))
        ft, scratch = test_mae(work / "ft_run")["heat_ref"], test_mae(work / "scratch_run")["heat_ref"]

    print(f"\n1. own targets on Perov-5 as a CGCNN folder ({len(base_rows)} rows; graphs {t_graphs:.0f} s, "
          f"train {t_base:.0f} s, {args.epochs} epochs, benchmark preset, batch 64), internal test split")
    print(f"{'target':<10} {'n':>5} {'MAE':>8} {'mean predictor':>15}  unit")
    for t, (n, mae, mp, unit) in base.items():
        print(f"{t:<10} {n:>5} {mae:>8.4f} {mp:>15.4f}  {unit}")
    print(f"\n2. heat_ref on {len(ft_rows)} unseen rows: 300 train / 100 val / {len(ft_rows) - 400} test "
          f"({args.ft_epochs} epochs)")
    print(f"{'start':<34} {'test MAE':>9} {'mean predictor':>15} {'train s':>8}")
    print(f"{'--init first model, freeze ' + str(args.freeze):<34} {ft[1]:>9.4f} {ft[2]:>15.4f} {t_ft:>8.0f}")
    print(f"{'from scratch':<34} {scratch[1]:>9.4f} {scratch[2]:>15.4f} {t_scratch:>8.0f}")
    print(f"fine-tuned / scratch MAE: {ft[1] / scratch[1]:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
