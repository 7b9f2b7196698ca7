"""Learning check on real DFT data: four-head CGNN on Perov-5 (../shared/data/perov5/train.csv).

Targets: ``heat_ref`` as formation energy, volume per atom computed from the structure, ``ind_gap`` as
band gap; magnetization is masked (no labels). An internal formula-grouped split (80/10/10) is used; the
model is selected on val and scored on test, next to a mean predictor (train-split mean).

    python bench/learn_perov5.py [--epochs 300] [--preset benchmark] [--limit N] [--out runs/perov5]
    python bench/learn_perov5.py --config configs/accurate.yaml     # a config file's model and train sections
"""
from __future__ import annotations

import argparse
import csv
import io
import sys
import time
import warnings
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

DEFAULT_CSV = REPO.parent / "shared" / "data" / "perov5" / "train.csv"


def read_perov5(csv_path, limit: int | None = None):
    """BuildItems (Crystal + targets) from the Perov-5 CSV."""
    from pymatgen.io.cif import CifParser

    from cgnn_dgl.pipeline import BuildItem
    from cgnn_dgl.structures import Crystal, StructureError

    csv.field_size_limit(1 << 24)
    items = []
    with open(csv_path, newline="") as fh:
        for k, row in enumerate(csv.DictReader(fh)):
            if limit and k >= limit:
                break
            name = f"perov5-{row['material_id']}"
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    s = CifParser(io.StringIO(row["cif"])).parse_structures(primitive=False)[0]
                c = Crystal.from_pymatgen(s, name=name)
                y = np.array([float(row["heat_ref"]), c.volume / c.n_atoms, float(row["ind_gap"]), np.nan])
                items.append(BuildItem(k, c, y))
            except Exception as exc:
                items.append(BuildItem(k, StructureError("parse_error", f"{name}: {exc}")))
    return items


def build_perov5_packed(csv_path=DEFAULT_CSV, limit: int | None = None, workers: int = 1):
    from cgnn_dgl.batching import PackedGraphs
    from cgnn_dgl.cache import Built
    from cgnn_dgl.pipeline import build_many

    built = [b for b in build_many(read_perov5(csv_path, limit), workers=workers) if isinstance(b, Built)]
    return PackedGraphs.from_built(built)


def run_learning_check(packed, out_dir, epochs: int = 300, model: dict | None = None, preset: str | None = None,
                       batch_size: int = 512, lr: float = 1e-3, progress: bool = True, seed: int = 12345,
                       milestones=None, train_overrides: dict | None = None) -> dict:
    """Train on an internal split of ``packed``; return per-target test MAE of the model and of the mean."""
    import torch

    from cgnn_dgl import TARGETS
    from cgnn_dgl.config import RunConfig
    from cgnn_dgl.predict import predict_packed
    from cgnn_dgl.split import formula_split
    from cgnn_dgl.train import Trainer

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    mdict = dict(model or {})
    if preset:
        mdict["preset"] = preset
    cfg = RunConfig.from_dict({"model": mdict, "train": {
        "epochs": epochs, "batch_size": batch_size, "lr": lr, "seed": seed, "progress": progress,
        "milestones": list(milestones or [max(1, int(epochs * 0.85))]), "out_dir": str(out_dir),
        **(train_overrides or {})}})
    split = formula_split(packed.formulas(), packed.n_elements(), seed=seed)
    trainer = Trainer(cfg, out_dir, packed, split)
    t0 = time.perf_counter()
    summary = trainer.fit()
    train_s = time.perf_counter() - t0
    best = torch.load(out_dir / "best.pt", weights_only=True)
    trainer.model.load_state_dict(best["model"])
    test = split["test"]
    pred, _ = predict_packed(trainer.model, packed, test, batch_size=512)
    res: dict = {"n_train": len(split["train"]), "n_val": len(split["val"]), "n_test": len(test),
                 "epochs": summary["epochs"], "best_epoch": summary["best_epoch"], "train_seconds": train_s}
    for k, name in enumerate(cfg.model.targets):
        col = TARGETS.index(name)
        m_te = packed.y_mask[test, col]
        m_tr = packed.y_mask[split["train"], col]
        if not m_te.any() or not m_tr.any():
            res[name] = {"n": 0, "model_mae": float("nan"), "mean_mae": float("nan")}
            continue
        y_te = packed.y[test, col][m_te]
        mean = packed.y[split["train"], col][m_tr].mean()
        res[name] = {"n": int(m_te.sum()), "model_mae": float(np.abs(pred[m_te, k] - y_te).mean()),
                     "mean_mae": float(np.abs(mean - y_te).mean())}
    return res


def main(argv=None) -> int:
    import torch

    from cgnn_dgl.report import print_table

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--csv", default=str(DEFAULT_CSV))
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--epochs", type=int, default=300)
    ap.add_argument("--preset", default="benchmark")
    ap.add_argument("--batch-size", type=int, default=512)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--out", default=str(REPO / "runs" / "perov5"))
    ap.add_argument("--config", default=None,
                    help="YAML config (e.g. configs/accurate.yaml): its model and train sections replace the flags")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="train config override, e.g. --set target_loss={band_gap: l1} (YAML value)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    packed = build_perov5_packed(args.csv, args.limit, args.workers)
    print(f"built {len(packed)} graphs in {time.perf_counter() - t0:.1f}s")
    import yaml

    # the four-head configs' loss choice (configs/benchmark.yaml); --set target_loss={} for plain MSE
    overrides = {"target_loss": {"band_gap": "l1", "magnetization": "l1"}}
    model = None
    if args.config:
        with open(args.config) as fh:
            doc = yaml.safe_load(fh) or {}
        model = dict(doc.get("model") or {})
        model.pop("targets", None)  # the check's own four columns
        train = {k: v for k, v in (doc.get("train") or {}).items() if k not in ("device", "out_dir")}
        overrides.update(train)
    for item in args.set:
        key, _, value = item.partition("=")
        overrides[key.strip()] = yaml.safe_load(value)
    res = run_learning_check(packed, args.out, epochs=args.epochs, model=model,
                             preset=None if model and "preset" in model else args.preset,
                             batch_size=args.batch_size, lr=args.lr, train_overrides=overrides)
    rows = []
    for name in ("formation_energy", "volume_per_atom", "band_gap", "magnetization"):
        r = res.get(name)
        if r:
            rows.append((name, r["n"], r["model_mae"], r["mean_mae"],
                         r["model_mae"] / r["mean_mae"] if r["n"] else float("nan")))
    print_table(f"perov5 test split ({res['n_train']} train / {res['n_val']} val / {res['n_test']} test; "
                f"{res['epochs']} epochs, best {res['best_epoch']}, {res['train_seconds']:.0f}s)",
                rows, header=["target", "n", "model MAE", "mean-predictor MAE", "ratio"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
