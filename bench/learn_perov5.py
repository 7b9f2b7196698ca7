"""Learning check on real DFT data: four-head CGNN on Perov-5 (../shared/data/perov5/train.csv).

Targets: ``heat_ref`` as formation energy, volume per atom computed from the structure, ``ind_gap`` as
band gap; magnetization is masked (no labels). An internal formula-grouped split (80/10/10, seed 12345 or --split-seed)
is used; every model is selected on val and scored on test, next to a mean predictor (train-split mean).

Rows (``--rows``, comma-separated; default all):

    benchmark          the reference recipe: preset benchmark, batch 512, multistep LR (--epochs, --lr, ...)
    accurate           one model of --config (default configs/accurate.yaml), its train.seed (else 12345)
    ensemble           --members models of --config (seeds train.seed + k), std calibrated on val
    accurate_geometry  as accurate, with model.geometry: true
    ensemble_geometry  as ensemble, with model.geometry: true

Each model trains in ``OUT/<family>/member_k`` (family benchmark, accurate or geometry); the single-model
row is member 0 of its ensemble, so ``accurate`` + ``ensemble`` train --members models, not one more.
Finished members are reused and interrupted ones resume from ``last.pt`` (the same config is checked).
``--train-member K`` trains only member K (parallel calls share the folder; a call without it scores).
Each row writes ``OUT/rows/<row>.json``; ``--merge DIR ...`` prints one table from the rows of several
output folders (long runs can be split into one row per call) and writes it to ``OUT/table.md``.

Per row: MAE per target on test and of the mean predictor, the training time (sum of epoch times over
members), the uncertainty figures of an ensemble on test (Spearman of |error| with std, coverage of the
68% and 95% intervals, std scale fitted on val; the Spearman once more with the std fitted on test and scored
on val, "rho swapped") and the metal/insulator ROC AUC (insulator = DFT gap >
0 eV), scored from ``p_insulator`` when the model has classification heads and from the band-gap
prediction always.

    python bench/learn_perov5.py --rows accurate,ensemble --members 5 --out runs/perov5
    python bench/learn_perov5.py --rows benchmark --out runs/perov5-ref
    python bench/learn_perov5.py --merge runs/perov5 runs/perov5-ref --out runs/perov5
"""
from __future__ import annotations

import argparse
import csv
import io
import json
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


ROWS = ("benchmark", "accurate", "ensemble", "accurate_geometry", "ensemble_geometry")
ROW_FAMILY = {"benchmark": "benchmark", "accurate": "accurate", "ensemble": "accurate",
              "accurate_geometry": "geometry", "ensemble_geometry": "geometry"}
SPLIT_SEED = 12345
NAMES = ("formation_energy", "volume_per_atom", "band_gap", "magnetization")
# settings that do not change what a member learns (a member trained with other values is reused)
_NEUTRAL = ("out_dir", "progress", "num_threads", "workers", "device", "ensemble", "distance_uncertainty",
            "distance_reference", "local_error_uncertainty")


def _comparable(cfg_dict: dict) -> dict:
    return {"model": cfg_dict["model"], "train": {k: v for k, v in cfg_dict["train"].items() if k not in _NEUTRAL}}


def train_member(packed, split, cfg, run_dir) -> dict:
    """Train (or resume, or reuse when finished) one model in ``run_dir``; its summary and epoch-time sum."""
    from cgnn_dgl import checkpoint as ckpt_mod
    from cgnn_dgl.rundir import LAST
    from cgnn_dgl.train import Trainer, member_split

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    state = None
    if (run_dir / LAST).is_file():
        state = ckpt_mod.load(run_dir / LAST)
        old = {"model": state["model_config"], "train": state.get("train_config") or {}}
        if json.dumps(_comparable(old), sort_keys=True, default=str) != json.dumps(
                _comparable(cfg.to_dict()), sort_keys=True, default=str):
            raise SystemExit(f"{run_dir} holds a model trained with another config; choose another --out")
    trainer = Trainer(cfg, run_dir, packed, member_split(split, cfg.train, packed), resume_state=state)
    if state is not None and trainer.epoch >= cfg.train.epochs:
        summary = {"epochs": trainer.epoch, "best_epoch": trainer.best_epoch, "best_score": trainer.best_score}
    else:
        summary = trainer.fit()
    summary["train_seconds"] = float(sum(float(h.get("time_s", 0.0)) for h in trainer.history))
    return summary


def row_config(row: str, args, base: dict):
    """The RunConfig of member 0 of ``row`` (members differ by seed only)."""
    from cgnn_dgl.config import RunConfig, apply_overrides

    if row == "benchmark":
        data = {"model": {"preset": args.preset}, "train": {
            "epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr,
            "milestones": [max(1, int(args.epochs * 0.85))], "target_loss": {"band_gap": "l1", "magnetization": "l1"}}}
    else:
        data = json.loads(json.dumps(base))
        if row.endswith("geometry"):
            data["model"]["geometry"] = True
    # member k's seed: the config's train.seed (12345 when it names none) + k; the split is --split-seed's
    data["train"].update(seed=data["train"].get("seed", SPLIT_SEED), split_seed=getattr(args, "split_seed", SPLIT_SEED),
                         progress=args.progress,
                         num_threads=args.threads, out_dir=str(Path(args.out) / ROW_FAMILY[row]))
    data = apply_overrides(data, [s if s.startswith(("model.", "train.")) else f"train.{s}" for s in args.set])
    return RunConfig.from_dict(data)


def member_seed_config(cfg, k: int, run_dir: Path, n: int):
    """Member k of ``n``: seed ``seed + k`` (and, with ``train.crossfit``, fold k of n left out)."""
    from cgnn_dgl.config import RunConfig

    d = cfg.to_dict()
    d["train"].update(seed=cfg.train.seed + k, out_dir=str(run_dir))
    if cfg.train.crossfit and n >= 2:
        from cgnn_dgl.ensemble import n_crossfit_folds

        d["train"].update(crossfit_fold=k, crossfit_folds=n_crossfit_folds(cfg.train, n))
    return RunConfig.from_dict(d)


def split_metrics(packed, idx, train_idx, pred, cols, gap_threshold: float, std=None) -> dict:
    """MAE per target (and of the train-mean predictor), uncertainty figures when ``std`` (the calibrated
    std, (n, T)) is given, and the insulator ROC AUC, on the crystals ``idx``."""
    from cgnn_dgl.ensemble import Z95, interval_coverage, uncertainty_metrics
    from cgnn_dgl.evaluate import roc_auc

    out: dict = {}
    for k, name in enumerate(pred.targets):
        col = cols[k]
        m, m_tr = packed.y_mask[idx, col], packed.y_mask[train_idx, col]
        if not m.any() or not m_tr.any():
            out[name] = {"n": 0}
            continue
        y = packed.y[idx, col][m]
        mean = packed.y[train_idx, col][m_tr].mean()
        r = {"n": int(m.sum()), "model_mae": float(np.abs(pred.mean[m, k] - y).mean()),
             "mean_mae": float(np.abs(mean - y).mean())}
        if std is not None:
            u = uncertainty_metrics(pred.mean[m, k], std[m, k], y)
            r.update(spearman=u["spearman_abs_error_std"], coverage_68=u["coverage_68"],
                     coverage_95=u["coverage_95"], mean_std=u["mean_std"])
            if name == "band_gap":  # the few crystals that matter for a gap: does the interval hold them?
                ins = y > gap_threshold
                r["coverage_95_insulators"] = (interval_coverage(pred.mean[m, k][ins], std[m, k][ins], y[ins], Z95)
                                               if ins.any() else None)
        out[name] = r
    if "band_gap" in pred.targets:
        k = list(pred.targets).index("band_gap")
        m = packed.y_mask[idx, cols[k]]
        labels = packed.y[idx, cols[k]][m] > gap_threshold
        auc = {"n": int(m.sum()), "insulators": int(labels.sum()), "from_gap": roc_auc(labels, pred.mean[m, k])}
        if pred.prob is not None:
            auc["from_p_insulator"] = roc_auc(labels, pred.prob[m, 0])
        out["insulator_auc"] = auc
    return out


def score_row(packed, split, members: list[Path], cfg) -> dict:
    """Test (and val) metrics of the mean of ``members``; with several, the std model is fitted on val
    (:func:`cgnn_dgl.ensemble.fit_std_model`, with the latent distance when
    ``train.distance_uncertainty``) and scored on test, and, under ``swapped``, fitted on test and scored
    on val (its Spearman and coverage per target)."""
    from cgnn_dgl.ensemble import Ensemble, fit_std_model, reference_holdout, reference_sample
    from cgnn_dgl.train import target_columns

    ens = Ensemble.load_members(members[0].parent.parent, [f"{m.parent.name}/{m.name}" for m in members])
    cols = target_columns(ens.targets, packed.targets)
    val, test, train = split["val"], split["test"], split["train"]
    if ens.is_ensemble and cfg.train.distance_uncertainty:
        ref = reference_sample(train, cfg.train.distance_reference, cfg.train.seed)
        ens.distance = ens.latent_reference(packed, ref, errors=cfg.train.local_error_uncertainty,
                                            holdout=reference_holdout(packed, train, ref, cfg.train, len(members)))
    pv, pt = ens.predict(packed, val), ens.predict(packed, test)
    std_v = std_t = model = None

    def fit_on(pred, idx):
        masks = [packed.y_mask[idx, c] for c in cols]
        return fit_std_model(pred, [packed.y[idx, c][m] for c, m in zip(cols, masks)], masks, 0.95)

    def std_of(model, pred):
        return model.std(pred.std_raw, pred.distance, pred.local_error)

    if ens.is_ensemble:
        model = fit_on(pv, val)
        std_v, std_t = std_of(model, pv), std_of(model, pt)
    out = split_metrics(packed, test, train, pt, cols, cfg.train.gap_threshold, std_t)
    out["val"] = split_metrics(packed, val, train, pv, cols, cfg.train.gap_threshold, std_v)
    if ens.is_ensemble:  # the swap: std fitted on test, scored on val; a gain seen both ways is not one lucky split
        swapped = split_metrics(packed, val, train, pv, cols, cfg.train.gap_threshold, std_of(fit_on(pt, test), pv))
        out["swapped"] = {name: {k: swapped[name][k] for k in ("spearman", "coverage_68", "coverage_95")}
                          for name in ens.targets if swapped[name].get("n")}
    for part in (out, out["val"]):
        for k, name in enumerate(ens.targets):
            if model is not None and part[name].get("n"):
                part[name]["std_scale"] = float(model.scale[k])
                if model.weight is not None:
                    part[name]["distance_weight"] = float(model.weight[k])
                if model.local_weight is not None:
                    part[name]["local_error_weight"] = float(model.local_weight[k])
    return out


def run_row(packed, split, row: str, args, base: dict) -> dict:
    cfg = row_config(row, args, base)
    n = args.members if row.startswith("ensemble") else 1
    family = Path(args.out) / ROW_FAMILY[row]
    summaries, members = [], []
    t0 = time.perf_counter()
    only = set(args.train_member or [])
    if only:  # train just these members (e.g. in parallel calls); a later call without it scores the row
        for k in sorted(only):
            if k < n:
                d = family / f"member_{k}"
                print(f"[{row}] member {k + 1}/{n} in {d}", flush=True)
                train_member(packed, split, member_seed_config(cfg, k, d, n), d)
        return {}
    for k in range(n):
        d = family / f"member_{k}"
        print(f"[{row}] member {k + 1}/{n} in {d}", flush=True)
        summaries.append(train_member(packed, split, member_seed_config(cfg, k, d, n), d))
        members.append(d / "best.pt")
    res = {"row": row, "members": n, "seeds": [cfg.train.seed + k for k in range(n)], "split_seed": cfg.train.split_seed,
           "config": cfg.to_dict(), "command": args.command, "date": time.strftime("%Y-%m-%d %H:%M"),
           "n_train": len(split["train"]), "n_val": len(split["val"]), "n_test": len(split["test"]),
           "epochs": [s["epochs"] for s in summaries], "best_epoch": [s["best_epoch"] for s in summaries],
           "train_seconds": float(sum(s["train_seconds"] for s in summaries)),
           "call_seconds": time.perf_counter() - t0,
           "units": {"formation_energy": "eV/atom", "volume_per_atom": "A^3/atom", "band_gap": "eV",
                     "train_seconds": "s, sum of epoch times over members (CPU, shared cores)"}}
    res.update(score_row(packed, split, members, cfg))
    rows_dir = Path(args.out) / "rows"
    rows_dir.mkdir(parents=True, exist_ok=True)
    (rows_dir / f"{row}.json").write_text(json.dumps(res, indent=1, default=float) + "\n")
    return res


def table_lines(results: list[dict]) -> tuple[str, str]:
    """(plain table, markdown table) of row results."""
    from cgnn_dgl.report import format_table

    def f(v, fmt="{:.4f}"):
        return "-" if v is None or (isinstance(v, float) and v != v) else fmt.format(v)

    header = ["row", "members", "train s", "fe MAE", "vol MAE", "gap MAE", "AUC p_ins", "AUC gap",
              "rho fe/vol/gap", "rho swapped", "cov68 fe/vol/gap", "cov95 fe/vol/gap", "gap cov95 ins"]
    rows = []
    for r in results:
        t = [r.get(n, {}) for n in NAMES[:3]]
        auc = r.get("insulator_auc", {})
        rows.append([r["row"], str(r["members"]), f"{r['train_seconds']:.0f}",
                     *[f(x.get("model_mae")) for x in t],
                     f(auc.get("from_p_insulator"), "{:.3f}"), f(auc.get("from_gap"), "{:.3f}"),
                     "/".join(f(x.get("spearman"), "{:.2f}") for x in t),
                     "/".join(f(r.get("swapped", {}).get(n, {}).get("spearman"), "{:.2f}") for n in NAMES[:3]),
                     "/".join(f(x.get("coverage_68"), "{:.2f}") for x in t),
                     "/".join(f(x.get("coverage_95"), "{:.2f}") for x in t),
                     f(t[2].get("coverage_95_insulators"), "{:.2f}")])
    if results:
        t = [results[0].get(n, {}) for n in NAMES[:3]]
        rows.append(["mean predictor", "-", "-", *[f(x.get("mean_mae")) for x in t], "-", "-", "-", "-", "-", "-", "-"])
    md = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]
    return format_table(rows, header), "\n".join(md)


def merge(dirs, out: Path) -> list[dict]:
    results = {}
    for d in dirs:
        for p in sorted((Path(d) / "rows").glob("*.json")):
            r = json.loads(p.read_text())
            results[r["row"]] = r  # a later folder's row replaces an earlier one
    ordered = [results[k] for k in ROWS if k in results]
    if not ordered:
        raise SystemExit(f"no row results (rows/*.json) in {', '.join(map(str, dirs))}")
    plain, md = table_lines(ordered)
    r0 = ordered[0]
    title = (f"perov5 internal test split ({r0['n_train']} train / {r0['n_val']} val / {r0['n_test']} test, "
             f"formula-grouped, seed {r0.get('split_seed', SPLIT_SEED)}); MAE in eV/atom, A^3/atom, eV; insulator = DFT gap > 0 eV; "
             "rho = Spearman(|error|, std) on test, std fitted on val; rho swapped = on val, std fitted on test; "
             "cov = coverage of the 68% / 95% intervals (ensembles only)")
    print(f"\n{title}\n{plain}", flush=True)
    notes = "\n".join(f"- {r['row']}: `{r['command']}` ({r['date']}; epochs {r['epochs']}, best {r['best_epoch']}, "
                      f"{r['train_seconds']:.0f} s of epochs)" for r in ordered)
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.md").write_text(f"{title}\n\n{md}\n\nRows and the commands that made them:\n{notes}\n")
    return ordered


def formula_subset(formulas, train_idx: np.ndarray, fraction: float) -> np.ndarray:
    """The rows of ``train_idx`` whose formula is among a seeded ``fraction`` of its distinct formulas (a
    learning-curve point: no formula is split, val and test stay as they are)."""
    distinct = sorted({formulas[i] for i in train_idx})
    rng = np.random.default_rng(SPLIT_SEED)
    keep = set(rng.permutation(distinct)[:round(fraction * len(distinct))].tolist())
    return np.asarray([i for i in train_idx if formulas[i] in keep], dtype=np.int64)


def main(argv=None) -> int:
    import torch
    import yaml

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--csv", default=str(DEFAULT_CSV))
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--split-seed", type=int, default=SPLIT_SEED,
                    help=f"seed of the internal formula split (default {SPLIT_SEED}: every measured row; another seed "
                         "is another split, for a figure's split-to-split spread; use its own --out)")
    ap.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated, of {', '.join(ROWS)}")
    ap.add_argument("--members", type=int, default=5, help="ensemble size of the ensemble rows")
    ap.add_argument("--epochs", type=int, default=300, help="benchmark row")
    ap.add_argument("--preset", default="benchmark", help="benchmark row")
    ap.add_argument("--batch-size", type=int, default=512, help="benchmark row")
    ap.add_argument("--lr", type=float, default=1e-3, help="benchmark row")
    ap.add_argument("--workers", type=int, default=2, help="processes building the graphs")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    ap.add_argument("--out", default=str(REPO / "runs" / "perov5"))
    ap.add_argument("--config", default=str(REPO / "configs" / "accurate.yaml"),
                    help="YAML config of the accurate/ensemble rows (its model and train sections)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override for every row: model.KEY=VALUE or [train.]KEY=VALUE (YAML value)")
    ap.add_argument("--merge", nargs="+", default=None, metavar="DIR",
                    help="train nothing: print one table of the rows in these output folders")
    ap.add_argument("--train-member", type=int, action="append", default=None, metavar="K",
                    help="only train member K of the rows (repeatable; no scoring): splits an ensemble over calls")
    ap.add_argument("--train-fraction", type=float, default=1.0, metavar="F",
                    help="learning curve: train on this fraction of the training split's formulas (val and test "
                         "unchanged; use its own --out)")
    ap.add_argument("--progress", action="store_true", help="progress bars")
    args = ap.parse_args(argv)
    if not 0 < args.train_fraction <= 1:
        ap.error(f"--train-fraction must be in (0, 1], got {args.train_fraction}")
    args.command = "python bench/learn_perov5.py " + " ".join(sys.argv[1:] if argv is None else argv)
    if args.merge:
        merge(args.merge, Path(args.out))
        return 0
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    bad = [r for r in rows if r not in ROWS]
    if bad or args.members < 1:
        ap.error(f"unknown row {bad[0]!r}; expected some of {', '.join(ROWS)}" if bad else "--members must be >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    with open(args.config) as fh:
        doc = yaml.safe_load(fh) or {}
    base = {"model": dict(doc.get("model") or {}),
            "train": {k: v for k, v in (doc.get("train") or {}).items() if k not in ("device", "out_dir", "cache")}}
    base["model"]["targets"] = list(NAMES)  # the check's own four columns
    t0 = time.perf_counter()
    packed = build_perov5_packed(args.csv, args.limit, args.workers)
    print(f"built {len(packed)} graphs in {time.perf_counter() - t0:.1f}s", flush=True)
    from cgnn_dgl.split import formula_split

    formulas = packed.formulas()
    split = formula_split(formulas, packed.n_elements(), seed=args.split_seed)
    if args.train_fraction < 1:
        split = dict(split, train=formula_subset(formulas, split["train"], args.train_fraction))
        print(f"training on {len(split['train'])} crystals, {args.train_fraction:g} of the training split's formulas",
              flush=True)
    for row in rows:
        run_row(packed, split, row, args, base)
    if not args.train_member:
        merge([args.out], Path(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
