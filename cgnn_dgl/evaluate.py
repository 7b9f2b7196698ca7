"""`cgnn evaluate`: predictions, metrics and plots for one split of a trained run.

Writes into ``--out`` (default: the run folder)::

    {split}_predictions.csv   name, entry_id, then <target>_pred / <target>_true per target (true empty if unlabelled)
    metrics.json              per target: n, MAE, RMSE; classification (metal/insulator from band_gap,
                              non-magnetic/magnetic from magnetization): n, positives, accuracy, precision,
                              recall, ROC AUC, thresholds
    parity_<target>.png       predicted vs DFT
    training_curves.png       loss and validation MAE per epoch (from history.csv)

``--split all`` scores every crystal of ``--cache`` instead of a part of the run's ``split.json``: a
held-out set built with ``cgnn graphs`` or ``cgnn ingest``. metrics.json then names the cache and counts
(``in_run_split``) its crystals that the run's split names (by entry id between database caches, else by
name), so that training crystals in a "held-out" set are seen (a warning for train or val ones); the mean
predictor is the training split's mean as the model's standardisation stored it.

For an ensemble run folder (``ensemble.json``, :mod:`cgnn_dgl.ensemble`) predictions are the members'
mean, the CSV gains ``<target>_std`` (calibrated std, the target's unit), metrics.json gains per target
``uncertainty``: Spearman correlation of |error| with std, coverage of the 68% and 95% intervals
(mean ± 0.994 / 1.96 std; also before calibration) and the std scale fitted on val; and
``calibration.png`` shows observed against nominal coverage for every target.

Classification labels: insulator = DFT band gap > ``train.gap_threshold``; magnetic = DFT magnetization
> ``train.mag_threshold`` (see :mod:`cgnn_dgl.config` for the defaults and why). The ROC score is
the regression prediction (or the classification head's probability when the model has one); the hard
decision for accuracy/precision/recall is prediction > ``*_decision_threshold`` (probability > 0.5 for a
classification head).
"""
from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import numpy as np

from cgnn_dgl.errors import UsageError

log = logging.getLogger(__name__)

SPLITS = ("test", "val", "train", "all")
"""``--split``: a part of the run's split.json, or ``all``, every crystal of ``--cache`` (a held-out set)."""


# --------------------------------------------------------------------------------------------------
# metrics


def regression_metrics(pred, true) -> dict:
    pred, true = np.asarray(pred, float), np.asarray(true, float)
    n = int(len(true))
    if n == 0:
        return {"n": 0, "mae": None, "rmse": None}
    err = pred - true
    return {"n": n, "mae": float(np.mean(np.abs(err))), "rmse": float(np.sqrt(np.mean(err ** 2)))}


def roc_auc(labels, scores) -> float:
    """Area under the ROC curve = P(score of a random positive > score of a random negative) + ½ P(tie).

    Computed from average ranks (Mann-Whitney U), so tied scores count one half. NaN when only one class
    is present.
    """
    labels = np.asarray(labels).astype(bool).reshape(-1)
    scores = np.asarray(scores, dtype=float).reshape(-1)
    if labels.shape != scores.shape:
        raise ValueError("labels and scores differ in length")
    n_pos = int(labels.sum())
    n_neg = int(len(labels) - n_pos)
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    sorted_scores = scores[order]
    ranks = np.empty(len(scores), dtype=float)
    # average 1-based rank for every run of tied scores
    boundaries = np.flatnonzero(np.diff(sorted_scores)) + 1
    starts = np.concatenate([[0], boundaries])
    ends = np.concatenate([boundaries, [len(scores)]])
    avg = (starts + ends + 1) / 2.0  # mean of (start+1 .. end)
    ranks[order] = np.repeat(avg, ends - starts)
    u = ranks[labels].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def binary_metrics(labels, predicted, scores) -> dict:
    labels = np.asarray(labels).astype(bool)
    predicted = np.asarray(predicted).astype(bool)
    tp = int((labels & predicted).sum())
    fp = int((~labels & predicted).sum())
    fn = int((labels & ~predicted).sum())
    tn = int((~labels & ~predicted).sum())
    n = len(labels)
    auc = roc_auc(labels, scores) if n else float("nan")
    return {
        "n": n,
        "positives": int(labels.sum()),
        "accuracy": (tp + tn) / n if n else None,
        "precision": tp / (tp + fp) if tp + fp else None,
        "recall": tp / (tp + fn) if tp + fn else None,
        "roc_auc": None if auc != auc else auc,
        "tp": tp, "fp": fp, "fn": fn, "tn": tn,
    }


def compute_metrics(targets, pred, true, mask, train_cfg, prob=None, tasks=None) -> dict:
    """Each task's metrics (:meth:`cgnn_dgl.tasks.TaskSet.metrics`). Without ``tasks``: the regression
    ``targets`` and the OQMD classifications they allow (from heads when ``prob`` is given)."""
    if tasks is None:
        from cgnn_dgl.config import ModelConfig
        from cgnn_dgl.tasks import TaskSet

        tasks = TaskSet.from_configs(ModelConfig(targets=tuple(targets), classification_heads=prob is not None),
                                     train_cfg)
    return tasks.metrics(pred, true, mask, prob)


def split_overlap(run_dir: Path, run_cache: str | None, packed) -> dict[str, int] | None:
    """How many crystals of a (held-out) cache the run's ``split.json`` names per part: ``--split all``
    reports it so that training crystals in a "held-out" set are seen. Entry ids are compared only between
    two database caches (a ``cgnn graphs`` cache numbers its inputs 0, 1, ...); otherwise names are, through
    the run's own cache. None when that cannot be told (the run's cache is gone)."""
    from cgnn_dgl.checkpoint import cache_record
    from cgnn_dgl.rundir import SPLIT
    from cgnn_dgl.split import PARTS

    path = run_dir / SPLIT
    if not path.is_file():
        return None
    key = json.loads(path.read_text()).get("key", "name")
    by_id = (not packed.positional_keys and run_cache is not None
             and cache_record(run_cache)["cache"]["source"] != "files")
    if key == "name" or by_id:
        return _quiet_overlap(path, packed.entry_id, packed.names)
    if run_cache is None or not Path(run_cache).is_dir():
        return None
    from cgnn_dgl.train import load_cache

    own = load_cache(run_cache)
    parts = _quiet_overlap(path, own.entry_id, own.names, rows=True)
    names = {str(n) for n in packed.names}
    return {p: sum(str(own.names[i]) in names for i in parts[p]) for p in PARTS}


def _quiet_overlap(path: Path, entry_ids, names, rows: bool = False) -> dict:
    """load_split without its warnings (a held-out cache misses most of a run's split): the part sizes, or
    the row arrays with ``rows``; zero / empty parts when nothing matches."""
    from cgnn_dgl.split import PARTS, load_split

    split_log = logging.getLogger("cgnn_dgl.split")
    level = split_log.level
    split_log.setLevel(logging.ERROR)
    try:
        parts = load_split(path, entry_ids, names)
    except UsageError:
        parts = {p: np.zeros(0, np.int64) for p in PARTS}
    finally:
        split_log.setLevel(level)
    return parts if rows else {p: int(len(r)) for p, r in parts.items()}


def training_means(ens, tasks) -> tuple[np.ndarray, np.ndarray]:
    """The training split's label mean per target, as the first member's standardisation stored it, in the
    (y, mask) form of :func:`add_mean_baseline`; a target trained without standardisation has none."""
    mean = ens.models[0].target_mean.detach().cpu().double().numpy()
    known = np.array([t.standardise for t in tasks.regression], dtype=bool)
    return mean.reshape(1, -1), known.reshape(1, -1)


def add_mean_baseline(metrics: dict, targets, y_train, m_train, y_eval, m_eval) -> None:
    """MAE of predicting the train-split mean: the bar any model must clear (``mean_predictor_mae``)."""
    for k, name in enumerate(targets):
        entry = metrics["regression"][name]
        if m_train[:, k].any() and m_eval[:, k].any():
            mean = float(y_train[m_train[:, k], k].mean())
            entry["mean_predictor_mae"] = float(np.abs(y_eval[m_eval[:, k], k] - mean).mean())
        else:
            entry["mean_predictor_mae"] = None


# --------------------------------------------------------------------------------------------------
# plots


def parity_plot(path: Path, name: str, pred, true, metrics: dict, unit: str | None = None,
                synthetic: bool = False) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 4.5), dpi=110)
    if len(true):
        lo = float(min(np.min(true), np.min(pred)))
        hi = float(max(np.max(true), np.max(pred)))
        ax.plot([lo, hi], [lo, hi], color="0.5", lw=1)
        ax.scatter(true, pred, s=4, alpha=0.5, lw=0)
    unit = metrics.get("unit", "") if unit is None else unit
    what = f" ({unit})" if unit else ""
    ax.set_xlabel(f"{'SYNTHETIC' if synthetic else 'true'} {name}{what}")
    ax.set_ylabel(f"predicted {name}{what}")
    if metrics.get("mae") is not None:
        ax.set_title(f"{name}: MAE {metrics['mae']:.4g}, RMSE {metrics['rmse']:.4g} (n={metrics['n']})"
                     + ("\nSYNTHETIC labels: not physics" if synthetic else ""), fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def curves_plot(path: Path, history_csv: Path, units: dict[str, str] | None = None) -> bool:
    if not history_csv.is_file():
        return False
    with open(history_csv) as fh:
        rows = list(csv.DictReader(fh))
    if not rows:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def col(key):
        return np.array([float(r[key]) if r.get(key) not in (None, "", "nan") else np.nan for r in rows])

    ep = col("epoch")
    maes = [k for k in rows[0] if k.startswith("val_mae_")]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), dpi=110)
    axes[0].plot(ep, col("train_loss"), label="train")
    axes[0].plot(ep, col("val_loss"), label="val")
    axes[0].set_yscale("log")
    axes[0].set_xlabel("epoch")
    axes[0].set_ylabel("loss (standardised MSE)")
    axes[0].legend()
    for k in maes:
        name = k[len("val_mae_"):]
        v = col(k)
        if np.isfinite(v).any():
            unit = (units or {}).get(name, "")
            axes[1].plot(ep, v, label=f"{name} ({unit})" if unit else name)
    axes[1].set_yscale("log")
    axes[1].set_xlabel("epoch")
    axes[1].set_ylabel("validation MAE")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


# --------------------------------------------------------------------------------------------------
# command


def evaluate_run(run_dir, cache: str | None = None, split: str = "test", out: str | None = None,
                 device: str = "cpu", batch_size: int | None = None, plots: bool = True) -> dict:
    from cgnn_dgl.config import load_run_config
    from cgnn_dgl.ensemble import Ensemble, is_ensemble_dir
    from cgnn_dgl.rundir import BEST, CONFIG, HISTORY, SPLIT, resolve_device
    from cgnn_dgl.split import load_split
    from cgnn_dgl.tasks import TaskSet
    from cgnn_dgl.train import load_cache

    run_dir = Path(run_dir)
    ensemble = is_ensemble_dir(run_dir)
    if not ensemble and not (run_dir / BEST).is_file():
        raise UsageError(f"{run_dir}: no {BEST} or ensemble.json (not a finished training run folder?)")
    if split not in SPLITS:
        raise UsageError(f"--split must be one of {', '.join(SPLITS)} (got {split!r})")
    cfg = load_run_config(run_dir / CONFIG, check_files=False) if (run_dir / CONFIG).is_file() else None
    from cgnn_dgl.config import TrainConfig

    train_cfg = cfg.train if cfg is not None else TrainConfig()
    dev = resolve_device(device)
    ens = Ensemble.load(run_dir, device=dev)
    mcfg = ens.config
    packed = load_cache(cache or train_cfg.cache)
    if mcfg.geometry:
        from cgnn_dgl.cache import require_bond_ratios

        require_bond_ratios(packed, cache or train_cfg.cache)
    overlap = None
    if split == "all":  # a held-out cache: every crystal of it, whatever the run's split.json says
        idx = np.arange(len(packed.names), dtype=np.int64)
        parts, overlap = None, split_overlap(run_dir, train_cfg.cache, packed)
        if len(idx) == 0:
            raise UsageError(f"the cache {cache or train_cfg.cache} holds no crystals")
    else:
        if not (run_dir / SPLIT).is_file():
            raise UsageError(f"{run_dir}: no {SPLIT}")
        parts = load_split(run_dir / SPLIT, packed.entry_id, packed.names)
        idx = parts[split]
        if len(idx) == 0 and split == "test" and not json.loads((run_dir / SPLIT).read_text())["test"]:
            raise UsageError(f"{run_dir} holds out no test crystals (train.test_fraction 0, as configs/accurate.yaml "
                             "sets it, to train on the rest): score it on held-out data with --cache DIR --split "
                             "all, or on --split val (optimistic: the model and its std were chosen on val)")
        if len(idx) == 0:
            raise UsageError(f"the {split} split of {run_dir} has no crystals in this cache"
                             + ("; for a held-out cache use --split all" if split == "test" else ""))
    res = ens.predict(packed, idx, batch_size or train_cfg.eval_batch_size or train_cfg.batch_size, dev,
                      train_cfg.backend)
    pred, prob, std = res.mean, res.prob, res.std
    tasks = TaskSet.from_configs(mcfg, train_cfg, {**packed.units, **getattr(ens, "units", {})})
    cols = tasks.columns(packed.targets, f"the cache {cache or train_cfg.cache}")
    T = len(tasks.names)
    true_all, mask_all = packed.y[idx][:, cols], packed.y_mask[idx][:, cols]
    metrics = tasks.metrics(pred, true_all, mask_all, prob)
    true, mask = true_all[:, :T], mask_all[:, :T]
    cols = cols[:T]
    from cgnn_dgl.checkpoint import cache_record

    synthetic = cache_record(cache or train_cfg.cache)["synthetic"]
    metrics.update(split=split, n=int(len(idx)), run=str(run_dir), synthetic_labels=synthetic)
    if split == "all":
        metrics["cache"] = str(cache or train_cfg.cache)
        metrics["in_run_split"] = overlap
        if overlap is None:
            log.warning("the cache %s of %s is gone, so it cannot be told whether training crystals are in "
                        "this one", train_cfg.cache, run_dir)
        elif overlap["train"] or overlap["val"]:
            log.warning("%d train and %d val crystals of %s are in this cache: the figures are not held-out "
                        "for them", overlap["train"], overlap["val"], run_dir)
    if synthetic:
        metrics["labels_note"] = "SYNTHETIC labels (cgnn db synth): these figures show the pipeline works, not physics"
    if std is not None:
        add_uncertainty(metrics, mcfg.targets, res, true, mask, ens.scale, tasks.units())
        if ens.std_model.weight is not None:  # train.distance_uncertainty: the latent distance's share
            for k, name in enumerate(mcfg.targets):
                metrics["uncertainty"][name]["distance_weight"] = float(ens.std_model.weight[k])
                if ens.std_model.local_weight is not None:  # train.local_error_uncertainty
                    metrics["uncertainty"][name]["local_error_weight"] = float(ens.std_model.local_weight[k])
        metrics["members"] = len(ens)
    if parts is not None:
        add_mean_baseline(metrics, mcfg.targets, packed.y[parts["train"]][:, cols],
                          packed.y_mask[parts["train"]][:, cols], true, mask)
    else:  # the training split is not in a held-out cache: its mean is the standardisation's
        add_mean_baseline(metrics, mcfg.targets, *training_means(ens, tasks), true, mask)

    out_dir = Path(out) if out else run_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / f"{split}_predictions.csv", "w", newline="") as fh:
        w = csv.writer(fh, lineterminator="\n")
        header = ["name", "entry_id"]
        for name in mcfg.targets:
            header += [f"{name}_pred", f"{name}_true"] + ([f"{name}_std"] if std is not None else [])
        if prob is not None:
            header += [f"p_{c}" for c in tasks.class_names]
        w.writerow(header)
        for r, i in enumerate(idx):
            row = [packed.names[i], int(packed.entry_id[i])]
            for k in range(len(mcfg.targets)):
                row += [f"{pred[r, k]:.9g}", f"{true[r, k]:.9g}" if mask[r, k] else ""]
                if std is not None:
                    row.append(f"{std[r, k]:.6g}")
            if prob is not None:
                row += [f"{p:.6g}" for p in prob[r]]
            w.writerow(row)
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    if plots:
        for k, name in enumerate(mcfg.targets):
            m = mask[:, k]
            if m.any():
                parity_plot(out_dir / f"parity_{name}.png", name, pred[m, k], true[m, k], metrics["regression"][name],
                            synthetic=bool(synthetic))
        curves_plot(out_dir / "training_curves.png", run_dir / HISTORY, tasks.units())
        if std is not None:
            from cgnn_dgl.ensemble import calibration_curve, calibration_plot

            curves = {name: calibration_curve(pred[mask[:, k], k], std[mask[:, k], k], true[mask[:, k], k])
                      for k, name in enumerate(mcfg.targets) if mask[:, k].any()}
            calibration_plot(out_dir / "calibration.png", curves,
                             f"{split} split, {len(ens)}-member ensemble, std calibrated on val")
    return metrics


def add_uncertainty(metrics: dict, targets, res, true, mask, scale, units: dict[str, str] | None = None) -> None:
    """Per-target uncertainty figures of an ensemble prediction (calibrated, and raw coverage)."""
    from cgnn_dgl.ensemble import Z95, interval_coverage, uncertainty_metrics

    out = {}
    for k, name in enumerate(targets):
        m = mask[:, k]
        u = uncertainty_metrics(res.mean[m, k], res.std[m, k], true[m, k])
        u["coverage_95_uncalibrated"] = (interval_coverage(res.mean[m, k], res.std_raw[m, k], true[m, k], Z95)
                                         if m.any() else None)
        u["std_scale"] = float(scale[k])
        u["unit"] = (units or {}).get(name, "")
        out[name] = u
    metrics["uncertainty"] = out


def print_metrics(metrics: dict) -> None:
    from cgnn_dgl.report import print_table

    def num(v):
        return float("nan") if v is None else v

    rows = [(name, m["n"], num(m["mae"]), num(m["rmse"]), num(m.get("mean_predictor_mae")), m["unit"])
            for name, m in metrics["regression"].items()]
    labels = ", SYNTHETIC labels" if metrics.get("synthetic_labels") else ""
    if metrics.get("in_run_split"):
        o = metrics["in_run_split"]
        print(f"all of {metrics['cache']}: {o['train']} / {o['val']} / {o['test']} of its crystals are in the "
              "run's train / val / test split")
    print_table(f"{metrics['split']} split ({metrics['n']} crystals{labels})", rows,
                header=["target", "n", "MAE", "RMSE", "mean-predictor MAE", "unit"])
    if metrics["classification"]:
        rows = [(task, m["n"], m["positives"], num(m["accuracy"]), num(m["precision"]), num(m["recall"]),
                 num(m["roc_auc"]))
                for task, m in metrics["classification"].items()]
        print_table("classification", rows, header=["task", "n", "positives", "accuracy", "precision", "recall", "ROC AUC"])
    if metrics.get("uncertainty"):
        rows = [(name, u["n"], num(u["spearman_abs_error_std"]), num(u["coverage_68"]), num(u["coverage_95"]),
                 num(u["coverage_95_uncalibrated"]), num(u["mean_std"]), u["std_scale"])
                for name, u in metrics["uncertainty"].items()]
        print_table(f"uncertainty ({metrics.get('members')}-member ensemble; std calibrated on val)", rows,
                    header=["target", "n", "Spearman |err|~std", "cover 68%", "cover 95%", "cover 95% raw",
                            "mean std", "std scale"])


def _cmd_evaluate(args) -> int:
    metrics = evaluate_run(args.run, cache=args.cache, split=args.split, out=args.out, device=args.device,
                           batch_size=args.batch_size, plots=not args.no_plots)
    print_metrics(metrics)
    print(f"\nwrote {Path(args.out or args.run) / 'metrics.json'}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("evaluate", help="metrics, predictions CSV and plots of a trained run",
                       description="Evaluate a run (RUN/best.pt, or the ensemble of RUN/ensemble.json) on one "
                                   "split of the run's split.json, or on every crystal of a held-out --cache "
                                   "(--split all): writes <split>_predictions.csv, metrics.json, parity plots "
                                   "and training curves (and calibration.png for an ensemble).")
    p.add_argument("--run", required=True, metavar="RUNDIR", help="a `cgnn train` run folder (holds best.pt)")
    p.add_argument("--cache", metavar="DIR", help="graph cache (default: the run's train.cache)")
    p.add_argument("--split", default="test", choices=list(SPLITS),
                   help="which part of the run's split.json, or all: every crystal of --cache (a held-out "
                        "set, e.g. from `cgnn graphs`); default: %(default)s")
    p.add_argument("--out", metavar="DIR", help="output folder (default: RUNDIR)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="default: %(default)s")
    p.add_argument("--batch-size", type=int, default=None, help="default: the run's train.batch_size")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG parity plots and curves")
    p.set_defaults(func=_cmd_evaluate)
