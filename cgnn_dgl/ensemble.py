"""Ensembles: N members in one run folder, averaged at prediction, with a recalibrated std per target.

Why: the spread of independently trained models is a usable, cheap uncertainty (committee models), and
the mean of N models is more accurate than one (the CGNN paper's best OQMD figure is an ensemble).

Run folder (``train.ensemble: N`` > 1)::

    config.yaml        the resolved run config (train.ensemble = N)
    split.json         the one train/val/test split every member uses
    member_k/          a complete single run (config.yaml with seed = train.seed + k, split.json, last.pt,
                       best.pt, history.csv, done.json when finished); with ``train.bootstrap`` member k
                       trains on a bootstrap resample (drawn from its seed) of the training split
    ensemble.json      the members, and the calibration: one std scale factor per target

``cgnn train --out RUN --resume`` resumes it like a single run: finished members are skipped, the
interrupted one continues from its ``last.pt`` (bit for bit on CPU), and the calibration is redone.
Members train one after another, or ``train.workers`` (``--workers``) at a time in separate processes.

Prediction: the mean over members, and ``std`` = ``scale_t`` × the population standard deviation
(ddof 0) of the member predictions. ``scale_t`` is fitted on the validation split so that the
interval mean ± 1.96 std covers 95% of it: ``scale_t`` = (95th percentile of |error| / raw std) / 1.96.
A single model (``RUN/best.pt``) predicts through the same interface with ``std`` None.

With ``train.distance_uncertainty`` the std also carries a latent distance (:class:`LatentDistance`: the
mean distance to the 5 nearest of a sample of training crystals in each member's standardised graph
features, ``RUN/latent_reference.npz``): ``std = scale_t sqrt((1 - w_t) spread² + w_t (a_t d / d̄)²)``,
with the share ``w_t`` fitted on val by Gaussian likelihood (:class:`StdModel`), then ``scale_t`` as above.
Members can agree and still be wrong far from their training data; the distance sees that.
``train.local_error_uncertainty`` adds a third term, the ensemble's mean absolute training error on the
same nearest reference crystals (stored with the reference), with its own share: where the model is
wrong even on its own training data (an insulator's gap among metals), it will be wrong on new data too.

Python API for other tools (e.g. screening): ``Ensemble.load(path).predict(packed)`` or
:func:`predict_with_uncertainty`, both returning a :class:`Prediction` (mean, std, probabilities).
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cgnn_dgl.errors import CgnnError, UsageError
from cgnn_dgl.fileio import atomic_write_json
from cgnn_dgl.rundir import BEST, CONFIG

log = logging.getLogger(__name__)

ENSEMBLE_JSON = "ensemble.json"
LATENT_REFERENCE = "latent_reference.npz"  # train.distance_uncertainty: the members' reference features
FORMAT = "cgnn-dgl-ensemble"
FORMAT_VERSION = 1
DONE = "done.json"
Z95 = 1.959963984540054  # two-sided 95% quantile of the standard normal
Z68 = 0.994457883209753  # two-sided 68% quantile
STD_INTERVAL_NOTE = "mean +- 1.96 std is the 95% interval, calibrated on the validation split"
_TINY = 1e-12  # floor for a zero spread (identical members), so ratios stay finite


def member_dir(run_dir: Path, k: int) -> Path:
    return Path(run_dir) / f"member_{k}"


def is_ensemble_dir(path) -> bool:
    return Path(path).is_dir() and (Path(path) / ENSEMBLE_JSON).is_file()


# --------------------------------------------------------------------------------------------------
# calibration and uncertainty metrics (plain numpy: testable on synthetic data)


def interval_coverage(mean, std, true, z: float) -> float:
    """Fraction of ``true`` inside ``mean ± z std`` (NaN for no data)."""
    err = np.abs(np.asarray(true, float) - np.asarray(mean, float))
    if err.size == 0:
        return float("nan")
    return float(np.mean(err <= z * np.asarray(std, float)))


def calibration_scale(mean, std, true, level: float = 0.95) -> float:
    """The factor s so that ``mean ± z_level s std`` covers ``level`` of the given data (1.0 without data)."""
    from scipy.stats import norm

    err = np.abs(np.asarray(true, float) - np.asarray(mean, float))
    if err.size == 0:
        return 1.0
    r = err / np.maximum(np.asarray(std, float), _TINY)
    s = float(np.quantile(r, level)) / float(norm.ppf(0.5 + level / 2))
    return s if math.isfinite(s) and s > 0 else 1.0


def spearman(a, b) -> float | None:
    """Spearman rank correlation (ties averaged); None when undefined (fewer than 3 points, a constant)."""
    from scipy.stats import spearmanr

    a, b = np.asarray(a, float), np.asarray(b, float)
    if a.size < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return None
    return float(spearmanr(a, b).statistic)


def uncertainty_metrics(mean, std, true) -> dict:
    """Per target: Spearman(|error|, std), coverage of the 68% and 95% intervals, mean std."""
    err = np.abs(np.asarray(true, float) - np.asarray(mean, float))
    return {
        "n": int(err.size),
        "spearman_abs_error_std": spearman(err, std),
        "coverage_68": interval_coverage(mean, std, true, Z68) if err.size else None,
        "coverage_95": interval_coverage(mean, std, true, Z95) if err.size else None,
        "mean_std": float(np.mean(std)) if err.size else None,
    }


# --------------------------------------------------------------------------------------------------
# the std model: member spread, optionally mixed with a latent distance to the training data


@dataclass
class StdModel:
    """``std = scale * sqrt((1 - w - v) spread² + w (spread_norm * distance / distance_norm)²
    + v (spread_norm * local / local_norm)²)`` per target.

    ``weight`` None (or 0) is the plain calibrated spread, ``scale * spread``. The distance term is
    put in the spread's unit (``spread_norm``: the mean spread on val, ``distance_norm``: the mean
    distance on val), so ``w`` is the share of the variance that the distance carries. ``local_weight``
    ``v`` (``train.local_error_uncertainty``) is the share of the local training error (the mean error of
    the nearest reference crystals, :meth:`LatentDistance.query`), put in the spread's unit the same way
    (``local_norm``: its mean on val).
    """

    scale: np.ndarray
    weight: np.ndarray | None = None
    spread_norm: np.ndarray | None = None
    distance_norm: float = 1.0
    local_weight: np.ndarray | None = None
    local_norm: np.ndarray | None = None

    def std(self, spread: np.ndarray, distance: np.ndarray | None = None,
            local: np.ndarray | None = None) -> np.ndarray:
        spread = np.asarray(spread, float)
        if self.weight is None or distance is None:
            return spread * self.scale
        d = (np.asarray(distance, float) / self.distance_norm)[:, None] * self.spread_norm
        var = self.weight * d ** 2
        rest = 1 - self.weight
        if self.local_weight is not None and local is not None:
            r = np.asarray(local, float) / self.local_norm * self.spread_norm
            var = var + self.local_weight * r ** 2
            rest = rest - self.local_weight
        return self.scale * np.sqrt(np.maximum(rest, 0.0) * spread ** 2 + var)


def fit_shares(err, terms: list[np.ndarray], n_grid: int = 41) -> list[float]:
    """Shares ``s_1 .. s_K`` (each >= 0, summing to at most 1) of ``terms[1:]`` in the variance
    ``(1 - sum s) terms[0]² + sum s_j terms[j]²`` that maximise the Gaussian likelihood of the errors
    ``err`` (the scale at its optimum for each choice), on a grid of step ``1 / (n_grid - 1)``; zeros
    without data. The terms must be in one unit (the spread's)."""
    err = np.asarray(err, float)
    terms = [np.asarray(t, float) for t in terms]
    n_extra = len(terms) - 1
    if err.size < 3 or n_extra < 1:
        return [0.0] * max(n_extra, 0)
    steps = n_grid - 1
    sq = [t ** 2 for t in terms]
    best, best_nll = (0,) * n_extra, math.inf

    def grid(k: int, left: int):
        if k == 0:
            yield ()
            return
        for i in range(left + 1):
            for rest in grid(k - 1, left - i):
                yield (i, *rest)

    for combo in grid(n_extra, steps):
        shares = [c / steps for c in combo]
        var = (1 - sum(shares)) * sq[0]
        for s, q in zip(shares, sq[1:]):
            var = var + s * q
        g = np.maximum(np.sqrt(np.maximum(var, 0.0)), _TINY)
        # NLL up to a constant, with the best scale s² = mean((err / g)²)
        nll = 0.5 * math.log(float(np.mean((err / g) ** 2)) + _TINY) + float(np.mean(np.log(g)))
        if nll < best_nll - 1e-12:
            best, best_nll = combo, nll
    return [c / steps for c in best]


def fit_distance_weight(err, spread, distance, spread_norm: float, distance_norm: float, n_grid: int = 41) -> float:
    """The share ``w`` in [0, 1] of the distance term that maximises the Gaussian likelihood of the
    errors ``err`` (the scale at its optimum for each ``w``); 0 without data."""
    spread, distance = np.asarray(spread, float), np.asarray(distance, float)
    return fit_shares(err, [spread, distance / distance_norm * spread_norm], n_grid)[0]


def fit_std_model(pred: Prediction, true: list[np.ndarray], masks: list[np.ndarray], level: float = 0.95) -> StdModel:
    """Fit the std model on validation predictions: per target the shares of the distance (when ``pred``
    has a distance) and of the local training error (when it has one), then the scale so that
    ``mean ± z std`` covers ``level`` of the validation data."""
    T = len(pred.targets)
    scale = np.ones(T)
    use_distance = pred.distance is not None
    use_local = use_distance and pred.local_error is not None
    weight, local_w, norm, l_norm = np.zeros(T), np.zeros(T), np.ones(T), np.ones(T)
    d_norm = float(np.mean(pred.distance)) if use_distance and len(pred.distance) else 1.0
    d_norm = d_norm if d_norm > 0 else 1.0
    for k in range(T):
        m = masks[k]
        mean, raw = pred.mean[m, k], pred.std_raw[m, k]
        if use_distance and m.any():
            norm[k] = max(float(np.mean(raw)), _TINY)
            terms = [raw, pred.distance[m] / d_norm * norm[k]]
            if use_local:
                local = pred.local_error[m, k]
                l_norm[k] = max(float(np.mean(local)), _TINY)
                terms.append(local / l_norm[k] * norm[k])
            shares = fit_shares(true[k] - mean, terms)
            weight[k] = shares[0]
            if use_local:
                local_w[k] = shares[1]
    model = StdModel(np.ones(T), weight if use_distance else None, norm if use_distance else None, d_norm,
                     local_w if use_local else None, l_norm if use_local else None)
    for k in range(T):
        m = masks[k]
        shape = model.std(pred.std_raw[m], pred.distance[m] if use_distance else None,
                          pred.local_error[m] if use_local else None)[:, k]
        scale[k] = calibration_scale(pred.mean[m, k], shape, true[k], level)
    model.scale = scale
    return model


class LatentDistance:
    """Mean distance of a crystal to its ``k`` nearest reference crystals (a sample of the training split)
    in each member's graph-feature space, standardised per feature on the reference; averaged over the
    members. Cheap (one matrix of distances per batch) and blind to labels.

    With ``errors`` (``(n_reference, T)``: the ensemble's absolute training error of each reference
    crystal per target, NaN where unlabelled; ``train.local_error_uncertainty``) :meth:`query` also gives
    the local training error: the mean error of the same ``k`` neighbours per target (over the labelled
    ones; the mean over all reference crystals where none is labelled), averaged over the members. It sees
    where the model is wrong even on its own training data, e.g. the band gaps of insulators in a
    mostly-metal training set."""

    def __init__(self, refs: list[tuple[np.ndarray, np.ndarray, np.ndarray]], k: int = 5,
                 errors: np.ndarray | None = None):
        self.refs = [(np.asarray(mu, np.float32), np.asarray(sd, np.float32), np.asarray(ref, np.float32))
                     for mu, sd, ref in refs]
        self.k = int(k)
        self.errors = None if errors is None else np.asarray(errors, np.float32).reshape(len(self.refs[0][2]), -1)

    @classmethod
    def from_features(cls, member_features: list[np.ndarray], k: int = 5,
                      errors: np.ndarray | None = None) -> LatentDistance:
        refs = []
        for f in member_features:
            f = np.asarray(f, np.float32)
            mu, sd = f.mean(0), f.std(0)
            sd = np.where(sd > 1e-6, sd, 1.0).astype(np.float32)
            refs.append((mu, sd, (f - mu) / sd))
        return cls(refs, k, errors)

    def __call__(self, member_features: list[np.ndarray], chunk: int = 1024) -> np.ndarray:
        return self.query(member_features, chunk)[0]

    def query(self, member_features: list[np.ndarray], chunk: int = 1024) -> tuple[np.ndarray, np.ndarray | None]:
        """(distance ``(n,)``, local training error ``(n, T)`` or None without ``errors``)."""
        if len(member_features) != len(self.refs):
            raise CgnnError(f"latent distance: {len(member_features)} members' features for {len(self.refs)} references")
        dists, locals_ = [], []
        err = None if self.errors is None else torch.from_numpy(self.errors)
        fallback = None if err is None else torch.nan_to_num(err.nanmean(0), nan=0.0)
        for f, (mu, sd, ref) in zip(member_features, self.refs):
            x = torch.from_numpy((np.asarray(f, np.float32) - mu) / sd)
            r = torch.from_numpy(ref)
            k = min(self.k, len(ref))
            d_parts, l_parts = [], []
            for i in range(0, len(x), chunk):
                near = torch.cdist(x[i:i + chunk], r).topk(k, dim=1, largest=False)
                d_parts.append(near.values.mean(1))
                if err is not None:
                    local = err[near.indices].nanmean(1)  # (chunk, T) over the labelled neighbours
                    l_parts.append(torch.where(torch.isnan(local), fallback, local))
            dists.append(torch.cat(d_parts).double().numpy() if d_parts else np.zeros(0))
            if err is not None:
                locals_.append(torch.cat(l_parts).double().numpy() if l_parts else np.zeros((0, err.shape[1])))
        return np.mean(dists, axis=0), (np.mean(locals_, axis=0) if err is not None else None)

    def save(self, path: Path) -> None:
        arrays = {"k": np.array(self.k)}
        for j, (mu, sd, ref) in enumerate(self.refs):
            arrays.update({f"mu_{j}": mu, f"sd_{j}": sd, f"ref_{j}": ref.astype(np.float16)})
        if self.errors is not None:
            arrays["errors"] = self.errors
        tmp = Path(path).with_suffix(".tmp.npz")
        np.savez(tmp, **arrays)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path) -> LatentDistance:
        try:
            with np.load(path) as z:
                n = sum(1 for key in z.files if key.startswith("ref_"))
                errors = z["errors"] if "errors" in z.files else None
                return cls([(z[f"mu_{j}"], z[f"sd_{j}"], z[f"ref_{j}"]) for j in range(n)], int(z["k"]), errors)
        except (OSError, ValueError, KeyError) as exc:
            raise CgnnError(f"{path}: unreadable latent reference ({exc}); rerun the calibration with "
                            "`cgnn train --out RUN --resume`") from None


def calibration_curve(mean, std, true, levels=None) -> tuple[np.ndarray, np.ndarray]:
    """(nominal levels, observed coverage) of the central Gaussian intervals ``mean ± z(level) std``."""
    from scipy.stats import norm

    levels = np.linspace(0.05, 0.99, 48) if levels is None else np.asarray(levels, float)
    err = np.abs(np.asarray(true, float) - np.asarray(mean, float))
    std = np.asarray(std, float)
    obs = np.array([np.mean(err <= norm.ppf(0.5 + p / 2) * std) if err.size else np.nan for p in levels])
    return levels, obs


def calibration_plot(path: Path, curves: dict[str, tuple[np.ndarray, np.ndarray]], title: str) -> None:
    """One reliability diagram: observed vs nominal coverage, a line per target (diagonal = calibrated)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.8, 4.5), dpi=110)
    ax.plot([0, 1], [0, 1], color="0.5", lw=1, label="calibrated")
    for name, (p, obs) in curves.items():
        ax.plot(p, obs, lw=1.5, label=name)
    ax.set_xlabel("nominal coverage of mean ± z·std")
    ax.set_ylabel("observed coverage")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# --------------------------------------------------------------------------------------------------
# prediction


def first_checkpoint(path) -> Path:
    """The checkpoint file behind ``--model PATH`` (member 0 of an ensemble run, a run's best.pt, or the file)."""
    path = Path(path)
    if is_ensemble_dir(path):
        return path / read_ensemble_json(path)["members"][0]
    return path / "best.pt" if path.is_dir() else path


@dataclass
class Prediction:
    """Physical-unit predictions of a model or ensemble for ``n`` crystals, columns ``targets``.

    ``std`` is the calibrated ensemble std (None for a single model), ``std_raw`` the member spread
    before calibration, ``prob`` the mean classification probabilities (insulator, magnetic) or None,
    ``members`` the per-member predictions ``(M, n, T)``.
    """

    targets: tuple[str, ...]
    mean: np.ndarray
    std: np.ndarray | None = None
    std_raw: np.ndarray | None = None
    prob: np.ndarray | None = None
    members: np.ndarray | None = None
    distance: np.ndarray | None = None  # latent distance to the training data (train.distance_uncertainty)
    local_error: np.ndarray | None = None  # (n, T) training error of the nearest (train.local_error_uncertainty)


class Ensemble:
    """Members (CGNN models with one config) and per-target std scale factors."""

    def __init__(self, models: list, config, scale=None, source: str = "", std_model: StdModel | None = None,
                 distance: LatentDistance | None = None):
        if not models:
            raise CgnnError("an ensemble needs at least one member")
        self.models = list(models)
        self.config = config
        self.targets = tuple(config.targets)
        scale = np.ones(len(self.targets)) if scale is None else np.asarray(scale, float).reshape(-1)
        self.std_model = std_model or StdModel(scale)
        self.distance = distance
        self.source = source
        rec = getattr(self.models[0], "record", None) or {}
        self.units = dict((rec.get("tasks") or {}).get("units") or {})  # as the checkpoint records them

    def __len__(self) -> int:
        return len(self.models)

    @property
    def is_ensemble(self) -> bool:
        return len(self.models) > 1

    @property
    def scale(self) -> np.ndarray:
        """The per-target std scale factors (fitted on val)."""
        return self.std_model.scale

    @classmethod
    def load(cls, path, device: str | torch.device = "cpu", arch: str | None = None) -> Ensemble:
        """An ensemble run folder (``ensemble.json``), a single run folder (``best.pt``) or a checkpoint file
        (cgnn-dgl, or a reference state_dict with ``arch``)."""
        from cgnn_dgl.predict import load_model

        path = Path(path)
        if is_ensemble_dir(path):
            info = read_ensemble_json(path)
            ens = cls.load_members(path, info["members"], device)
            calib = info.get("calibration", {})
            scale = np.array([calib.get("scale", {}).get(t, 1.0) for t in ens.targets])
            dist = calib.get("distance")
            if dist:
                ens.distance = LatentDistance.load(path / dist["reference"])
                local = dist.get("local_error")
                ens.std_model = StdModel(scale, np.array([dist["weight"][t] for t in ens.targets]),
                                         np.array([dist["spread_norm"][t] for t in ens.targets]),
                                         float(dist["distance_norm"]),
                                         np.array([local["weight"][t] for t in ens.targets]) if local else None,
                                         np.array([local["norm"][t] for t in ens.targets]) if local else None)
                if local and ens.distance.errors is None:
                    raise CgnnError(f"{path / dist['reference']}: the calibration uses the local training error, "
                                    "but the latent reference holds no errors; rerun `cgnn train --out RUN --resume`")
            else:
                ens.std_model = StdModel(scale)
            return ens
        if path.is_dir():
            if (path / BEST).is_file():
                path = path / BEST
            elif (path / CONFIG).is_file():
                raise UsageError(f"{path}: an unfinished run (no {BEST}, no {ENSEMBLE_JSON}); finish it with "
                                 f"`cgnn train --out {path} --resume`")
            else:
                raise UsageError(f"{path}: not a run folder (no {BEST} or {ENSEMBLE_JSON})")
        model, config = load_model(path, arch, device)
        return cls([model], config, source=str(path))

    @classmethod
    def load_members(cls, run_dir, members, device: str | torch.device = "cpu") -> Ensemble:
        """The checkpoints ``members`` (paths relative to ``run_dir``), uncalibrated (scale 1)."""
        from cgnn_dgl.predict import load_model

        models, configs = [], []
        for rel in members:
            model, config = load_model(Path(run_dir) / rel, device=device)
            models.append(model)
            configs.append(config)
        if any(tuple(c.targets) != tuple(configs[0].targets) for c in configs):
            raise CgnnError(f"{run_dir}: the members predict different targets")
        return cls(models, configs[0], source=str(run_dir))

    def predict(self, packed, indices=None, batch_size: int = 512, device: str | torch.device = "cpu",
                backend: str = "auto", progress: bool = False) -> Prediction:
        from cgnn_dgl.predict import predict_packed_features

        preds, probs, feats = [], [], []
        want = self.distance is not None and self.is_ensemble
        for k, model in enumerate(self.models):
            if progress and self.is_ensemble:
                log.info("member %d/%d", k + 1, len(self.models))
            p, prob, f = predict_packed_features(model, packed, indices, batch_size, device, backend,
                                                 progress=progress, features=want)
            preds.append(p)
            probs.append(prob)
            feats.append(f)
        members = np.stack(preds)
        mean = members.mean(axis=0)
        prob = np.mean(np.stack(probs), axis=0) if probs[0] is not None else None
        if not self.is_ensemble:
            return Prediction(self.targets, mean, prob=prob, members=members)
        raw = members.std(axis=0)
        dist, local = self.distance.query(feats) if want else (None, None)
        return Prediction(self.targets, mean, self.std_model.std(raw, dist, local), raw, prob, members, dist, local)

    def latent_reference(self, packed, indices, batch_size: int = 512, device: str | torch.device = "cpu",
                         backend: str = "auto", errors: bool = False,
                         holdout: np.ndarray | None = None) -> LatentDistance:
        """The :class:`LatentDistance` reference of the crystals ``indices`` (a training sample): each
        member's graph features; with ``errors`` also the ensemble mean's absolute error on them per target
        (NaN where unlabelled), for the local training error. With ``holdout`` (per crystal, the member
        that did not train on it, or -1 for none: ``train.crossfit``) the error is that member's, out of
        fold."""
        from cgnn_dgl.predict import predict_packed_features
        from cgnn_dgl.train import target_columns

        outs = [predict_packed_features(m, packed, indices, batch_size, device, backend) for m in self.models]
        err = None
        if errors:
            idx = np.arange(len(packed)) if indices is None else np.asarray(indices, dtype=np.int64)
            cols = target_columns(self.targets, packed.targets)
            if holdout is None:
                mean = np.mean([o[0] for o in outs], axis=0)
            else:
                holdout = np.asarray(holdout, dtype=np.int64)
                preds = np.stack([o[0] for o in outs])
                mean = np.where((holdout >= 0)[:, None], preds[np.maximum(holdout, 0), np.arange(len(idx))],
                                preds.mean(axis=0))
            err = np.where(packed.y_mask[idx][:, cols], np.abs(mean - packed.y[idx][:, cols]), np.nan)
        return LatentDistance.from_features([o[2] for o in outs], errors=err)


def predict_with_uncertainty(model_path, packed, indices=None, *, batch_size: int = 512,
                             device: str | torch.device = "cpu", backend: str = "auto") -> Prediction:
    """Mean and calibrated std of an ensemble run folder (std None for a single model) on ``packed``."""
    return Ensemble.load(model_path, device).predict(packed, indices, batch_size, device, backend)


def read_ensemble_json(run_dir) -> dict:
    path = Path(run_dir) / ENSEMBLE_JSON
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CgnnError(f"{path}: unreadable ({exc})") from None
    if info.get("format") != FORMAT:
        raise CgnnError(f"{path}: not a cgnn-dgl ensemble description")
    if info.get("format_version", 0) > FORMAT_VERSION:
        raise CgnnError(f"{path}: written by a newer cgnn-dgl")
    return info


# --------------------------------------------------------------------------------------------------
# training


def member_config(cfg, k: int, run_dir: Path, workers: int = 1):
    """Member k's run config: a plain single run with seed ``train.seed + k`` in ``member_k/``."""
    from cgnn_dgl.config import RunConfig

    d = cfg.to_dict()
    d["train"].update(ensemble=1, seed=cfg.train.seed + k, out_dir=str(member_dir(run_dir, k)), workers=1)
    if cfg.train.crossfit:
        d["train"].update(crossfit_fold=k, crossfit_folds=n_crossfit_folds(cfg.train))
    if workers > 1:
        d["train"]["progress"] = False  # bars of parallel processes would interleave
        if cfg.train.num_threads <= 0:
            d["train"]["num_threads"] = max(1, (os.cpu_count() or 1) // workers)
    return RunConfig.from_dict(d, check_files=False)


def reference_sample(train_idx: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Up to ``n`` training indices (sorted), drawn without replacement from ``seed``: the latent-distance reference."""
    train_idx = np.asarray(train_idx, dtype=np.int64)
    if len(train_idx) <= n:
        return np.sort(train_idx)
    return np.sort(np.random.default_rng(seed).choice(train_idx, size=n, replace=False))


def bootstrap_indices(train_idx: np.ndarray, seed: int) -> np.ndarray:
    """A bootstrap resample (with replacement, same size) of the training indices, drawn from ``seed``."""
    rng = np.random.default_rng([int(seed), 0xB0075])
    return np.sort(rng.choice(np.asarray(train_idx), size=len(train_idx), replace=True))


def n_crossfit_folds(t, n_members: int | None = None) -> int:
    """The number of folds of a ``train.crossfit`` ensemble: ``train.crossfit_folds``, or its size."""
    return int(t.crossfit_folds or n_members or t.ensemble)


def crossfit_folds(train_idx: np.ndarray, formulas: list[str], n_folds: int, seed: int) -> np.ndarray:
    """The fold (0 .. n_folds-1) of each of ``train_idx`` (``formulas``: their reduced formulas, aligned):
    the distinct formulas, shuffled from ``seed``, are dealt round-robin, so the polymorphs of a formula
    share a fold and a member that leaves the fold out has seen none of them."""
    train_idx = np.asarray(train_idx, dtype=np.int64)
    if len(formulas) != len(train_idx):
        raise ValueError(f"{len(formulas)} formulas for {len(train_idx)} training crystals")
    distinct = sorted(set(formulas))
    order = np.random.default_rng([int(seed), 0xC805F17]).permutation(len(distinct))
    fold_of = {distinct[j]: i % n_folds for i, j in enumerate(order)}
    return np.array([fold_of[f] for f in formulas], dtype=np.int64)


def train_folds(packed, train_idx: np.ndarray, n_folds: int, seed: int) -> np.ndarray:
    """:func:`crossfit_folds` of the training crystals ``train_idx`` of ``packed``."""
    formulas = packed.formulas()
    train_idx = np.asarray(train_idx, dtype=np.int64)
    return crossfit_folds(train_idx, [formulas[i] for i in train_idx], n_folds, seed)


def _train_member(cfg, run_dir: str) -> dict:
    """Train (or resume) one member to the end and mark it done (runs in a worker process too)."""
    from cgnn_dgl.rundir import LAST
    from cgnn_dgl.train import train_run

    if not logging.getLogger().handlers:  # a spawned worker: keep the members' epoch lines
        logging.basicConfig(level=logging.INFO, format="%(message)s")
    d = Path(run_dir)
    summary = train_run(cfg, d, resume=(d / LAST).is_file())
    atomic_write_json(d / DONE, {"epochs": summary["epochs"], "best_epoch": summary["best_epoch"],
                                 "best_score": summary["best_score"], "seed": cfg.train.seed,
                                 "finished": time.strftime("%Y-%m-%dT%H:%M:%S")})
    return summary


def train_ensemble(cfg, run_dir, resume: bool = False) -> dict:
    """Train (or resume) the ``cfg.train.ensemble`` members in ``run_dir``, then calibrate on val."""
    from cgnn_dgl.rundir import CONFIG, LAST, SPLIT
    from cgnn_dgl.split import save_split
    from cgnn_dgl.train import Dist, load_cache, make_split, split_method

    run_dir = Path(run_dir)
    n = int(cfg.train.ensemble)
    if Dist.from_env().enabled:
        raise UsageError("train.ensemble > 1 trains members as separate processes (--workers); "
                         "do not launch it with torchrun")
    started = [k for k in range(n) if (member_dir(run_dir, k) / LAST).is_file()]
    if (started or (run_dir / ENSEMBLE_JSON).is_file()) and not resume:
        raise UsageError(f"{run_dir} already holds a run; pass --resume to continue it or choose another --out")
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg.save(run_dir / CONFIG)
    packed = load_cache(cfg.train.cache)
    split_path = run_dir / SPLIT
    if not split_path.is_file():  # one split for every member, fixed before the first one trains
        split = make_split(packed, cfg.train)
        save_split(split_path, split, packed.entry_id, packed.names, packed.positional_keys, method=split_method(cfg.train),
                   seed=cfg.train.split_seed, source=str(cfg.train.split_file or f"{split_method(cfg.train)}_split"))
    workers = max(1, min(int(cfg.train.workers), n))
    jobs = []
    for k in range(n):
        d = member_dir(run_dir, k)
        if (d / DONE).is_file():
            continue
        d.mkdir(exist_ok=True)
        if not (d / SPLIT).is_file():
            (d / SPLIT).write_bytes(split_path.read_bytes())
        jobs.append((member_config(cfg, k, run_dir, workers), str(d)))
    log.info("ensemble %s: %d members (%d to train%s)", run_dir, n, len(jobs),
             f", {workers} at a time" if workers > 1 else "")
    if workers > 1 and len(jobs) > 1:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn")) as pool:
            for fut in [pool.submit(_train_member, c, d) for c, d in jobs]:
                fut.result()
    else:
        for c, d in jobs:
            _train_member(c, d)
    info = calibrate_ensemble(run_dir, cfg, packed)
    return {"run_dir": str(run_dir), "members": n, "epochs": cfg.train.epochs,
            "calibration": info["calibration"]}


def std_formula(calib: dict) -> str:
    """How the std of an ensemble with this calibration is computed, in words (ensemble.json, sidecars)."""
    if "distance" not in calib:
        return "scale[target] x population std (ddof 0) of the member predictions, in the target's unit"
    words = ("spread = population std (ddof 0) of the member predictions, distance = mean distance to the "
             f"{LatentDistance.__name__} reference in the members' graph-feature spaces")
    if "local_error" not in calib["distance"]:
        return ("scale[target] x sqrt((1 - weight) spread^2 + weight (spread_norm x distance / distance_norm)^2): "
                + words + "; in the target's unit")
    return ("scale[target] x sqrt((1 - weight - local_error.weight) spread^2 + weight (spread_norm x distance / "
            "distance_norm)^2 + local_error.weight (spread_norm x local / local_error.norm)^2): " + words
            + ", local = mean absolute training error of the same nearest reference crystals; in the target's unit")


def std_note(info: dict) -> str:
    """What a ``<target>_std`` column of the ensemble described by ``info`` (its ensemble.json) means."""
    return info.get("std", "") + "; " + STD_INTERVAL_NOTE


def reference_holdout(packed, train_idx: np.ndarray, ref_idx: np.ndarray, t,
                      n_members: int | None = None) -> np.ndarray | None:
    """With ``train.crossfit``: for each reference crystal ``ref_idx`` (a subset of ``train_idx``) the member
    that left its fold out, or -1 where every member saw it (folds past the ensemble size); ``n_members``
    is the ensemble size (``train.ensemble`` by default). None without crossfit (in-sample errors)."""
    if not t.crossfit:
        return None
    train_idx = np.asarray(train_idx, dtype=np.int64)
    n_members = int(n_members or t.ensemble)
    folds = train_folds(packed, train_idx, n_crossfit_folds(t, n_members), t.split_seed)
    folds = np.where(folds < n_members, folds, -1)
    order = np.argsort(train_idx, kind="stable")
    return folds[order[np.searchsorted(train_idx[order], np.asarray(ref_idx, dtype=np.int64))]]


def calibrate_ensemble(run_dir, cfg, packed) -> dict:
    """Fit one std scale per target on the validation split and write ``ensemble.json``."""
    from cgnn_dgl.rundir import SPLIT, resolve_device
    from cgnn_dgl.split import load_split
    from cgnn_dgl.train import target_columns

    run_dir = Path(run_dir)
    n = int(cfg.train.ensemble)
    members = [f"member_{k}/best.pt" for k in range(n)]
    missing = [m for m in members if not (run_dir / m).is_file()]
    if missing:
        raise CgnnError(f"{run_dir}: members without a best.pt: {', '.join(missing)}")
    device = resolve_device(cfg.train.device)
    ens = Ensemble.load_members(run_dir, members, device)
    parts = load_split(run_dir / SPLIT, packed.entry_id, packed.names)
    val = parts["val"]
    cols = target_columns(ens.targets, packed.targets)
    calib: dict = {"split": "val", "level": 0.95, "scale": {}, "n": {}, "coverage_95_raw": {},
                   "coverage_95": {}, "coverage_68": {}}
    bs = cfg.train.eval_batch_size or cfg.train.batch_size
    if len(val) and cfg.train.distance_uncertainty:
        ref_idx = reference_sample(parts["train"], cfg.train.distance_reference, cfg.train.seed)
        ens.distance = ens.latent_reference(packed, ref_idx, bs, device, cfg.train.backend,
                                            errors=cfg.train.local_error_uncertainty,
                                            holdout=reference_holdout(packed, parts["train"], ref_idx, cfg.train))
        ens.distance.save(run_dir / LATENT_REFERENCE)
    if len(val):
        pred = ens.predict(packed, val, bs, device, cfg.train.backend)
        masks = [packed.y_mask[val, c] for c in cols]
        trues = [packed.y[val, c][m] for c, m in zip(cols, masks)]
        std_model = fit_std_model(pred, trues, masks, 0.95)
        std = std_model.std(pred.std_raw, pred.distance, pred.local_error)
        for k, t in enumerate(ens.targets):
            m, true = masks[k], trues[k]
            mean, raw = pred.mean[m, k], pred.std_raw[m, k]
            calib["scale"][t] = float(std_model.scale[k])
            calib["n"][t] = int(m.sum())
            calib["coverage_95_raw"][t] = interval_coverage(mean, raw, true, Z95) if m.any() else None
            calib["coverage_95"][t] = interval_coverage(mean, std[m, k], true, Z95) if m.any() else None
            calib["coverage_68"][t] = interval_coverage(mean, std[m, k], true, Z68) if m.any() else None
        if pred.distance is not None:
            calib["distance"] = {
                "reference": LATENT_REFERENCE, "n_reference": int(len(ens.distance.refs[0][2])),
                "neighbours": ens.distance.k, "distance_norm": std_model.distance_norm,
                "weight": {t: float(std_model.weight[k]) for k, t in enumerate(ens.targets)},
                "spread_norm": {t: float(std_model.spread_norm[k]) for k, t in enumerate(ens.targets)}}
            if pred.local_error is not None:
                calib["distance"]["local_error"] = {
                    "weight": {t: float(std_model.local_weight[k]) for k, t in enumerate(ens.targets)},
                    "norm": {t: float(std_model.local_norm[k]) for k, t in enumerate(ens.targets)}}
    else:
        log.warning("no validation split: the ensemble std is left uncalibrated (scale 1)")
        calib["scale"] = dict.fromkeys(ens.targets, 1.0)
    info = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "members": members,
        "seeds": [cfg.train.seed + k for k in range(n)],
        "bootstrap": bool(cfg.train.bootstrap),
        "crossfit": bool(cfg.train.crossfit),
        "targets": list(ens.targets),
        "units": {t: u for t, u in packed.units.items() if t in ens.targets},
        "std": std_formula(calib),
        "calibration": calib,
        "written": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    atomic_write_json(run_dir / ENSEMBLE_JSON, info)
    for t in ens.targets:
        if "distance" in calib:
            log.info("calibration %s: latent-distance share of the variance %.3f", t, calib["distance"]["weight"][t])
        if t in calib["n"]:
            log.info("calibration %s: scale %.4g, val coverage of the 95%% interval %.3f -> %.3f (n=%d)", t,
                     calib["scale"][t], calib["coverage_95_raw"][t] or float("nan"),
                     calib["coverage_95"][t] or float("nan"), calib["n"][t])
    return info

