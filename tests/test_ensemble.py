"""Ensembles: calibration on a synthetic case with a known answer, uncertainty metrics, the run folder,
`cgnn predict --model RUN` std columns, evaluate's uncertainty report, kill -9 resume, parallel members."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import sigkill_after_lines
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from test_train import same_weights, tiny_config, usable_rows, weights, write_cache

from cgnn_dgl.ensemble import (
    ENSEMBLE_JSON,
    LATENT_REFERENCE,
    Z68,
    Z95,
    Ensemble,
    LatentDistance,
    Prediction,
    StdModel,
    bootstrap_indices,
    calibration_curve,
    calibration_scale,
    fit_distance_weight,
    fit_std_model,
    interval_coverage,
    spearman,
    uncertainty_metrics,
)

REPO = Path(__file__).resolve().parents[1]
TARGETS4 = ("formation_energy", "volume_per_atom", "band_gap", "magnetization")


def _cli(*args, env=None, timeout=600):
    return subprocess.run([sys.executable, "-m", "cgnn_dgl.cli", *args], capture_output=True, text=True, cwd=REPO,
                          timeout=timeout, env=env)


def _read(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


# --------------------------------------------------------------------------------------------------
# calibration: synthetic data with a known answer


def _synthetic(rng, n, true_factor):
    """Predicted std per point, and errors drawn with std = true_factor x predicted std."""
    std = rng.uniform(0.1, 2.0, n)
    mean = rng.normal(size=n)
    true = mean + rng.normal(size=n) * std * true_factor
    return mean, std, true


@pytest.mark.parametrize("true_factor", [3.0, 0.4])
def test_recalibration_moves_coverage_to_nominal(true_factor):
    """Errors are Gaussian with std = c x the raw std, so the right scale is c; fitted on a validation
    sample it brings the 95% coverage of fresh data from far off to ~95% (and the 68% one to ~68%)."""
    rng = np.random.default_rng(0)
    val = _synthetic(rng, 4000, true_factor)
    test = _synthetic(rng, 20000, true_factor)
    raw_val = interval_coverage(*val[:2], val[2], Z95)
    s = calibration_scale(*val, level=0.95)
    assert s == pytest.approx(true_factor, rel=0.05)
    after_val = interval_coverage(val[0], s * val[1], val[2], Z95)
    assert abs(after_val - 0.95) < abs(raw_val - 0.95) and abs(after_val - 0.95) < 0.005
    raw_test = interval_coverage(*test[:2], test[2], Z95)
    after_test = interval_coverage(test[0], s * test[1], test[2], Z95)
    assert abs(raw_test - 0.95) > 0.04  # clearly miscalibrated before (too wide: ~100% covered)
    assert abs(after_test - 0.95) < 0.01
    assert abs(interval_coverage(test[0], s * test[1], test[2], Z68) - 0.68) < 0.02


def test_calibration_edge_cases():
    assert calibration_scale([], [], []) == 1.0
    # identical members (std 0) with errors: a finite, large factor, never inf / nan
    s = calibration_scale([0.0, 0.0, 1.0], [0.0, 0.0, 0.0], [0.5, 0.0, 1.0])
    assert np.isfinite(s) and s > 0


def test_uncertainty_metrics_by_hand():
    mean = np.zeros(4)
    true = np.array([0.5, -1.5, 3.0, 0.1])
    std = np.array([1.0, 1.0, 1.0, 1.0])
    u = uncertainty_metrics(mean, std, true)
    # |err| = .5, 1.5, 3, .1: inside 0.994 -> 2 of 4; inside 1.96 -> 3 of 4
    assert u["coverage_68"] == 0.5 and u["coverage_95"] == 0.75 and u["n"] == 4
    assert u["spearman_abs_error_std"] is None  # constant std: rank correlation undefined
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    _levels, obs = calibration_curve(mean, std, true, levels=[0.68, 0.95])
    assert obs.tolist() == [0.5, 0.75]


def test_bootstrap_is_a_seeded_resample():
    idx = np.arange(100, 300)
    a, b, c = bootstrap_indices(idx, 1), bootstrap_indices(idx, 1), bootstrap_indices(idx, 2)
    assert a.tolist() == b.tolist() and a.tolist() != c.tolist()
    assert len(a) == len(idx) and set(a) <= set(idx) and len(set(a)) < len(idx)  # with replacement


@given(st.lists(st.sampled_from([f"A{i}B" for i in range(30)]), min_size=1, max_size=120),
       st.integers(2, 12), st.integers(0, 2 ** 31 - 1))
def test_crossfit_folds_group_formulas_and_balance_them(formulas, n_folds, seed):
    from cgnn_dgl.ensemble import crossfit_folds

    idx = np.arange(len(formulas)) * 3 + 7
    folds = crossfit_folds(idx, formulas, n_folds, seed)
    assert folds.shape == (len(formulas),) and ((folds >= 0) & (folds < n_folds)).all()
    np.testing.assert_array_equal(folds, crossfit_folds(idx, formulas, n_folds, seed))  # seeded
    fold_of: dict[str, int] = {}
    for f, k in zip(formulas, folds):
        assert fold_of.setdefault(f, int(k)) == k  # a formula's polymorphs share one fold
    per_fold = np.bincount(list(fold_of.values()), minlength=n_folds)
    assert per_fold.max() - per_fold.min() <= 1  # distinct formulas dealt round-robin


# --------------------------------------------------------------------------------------------------
# latent-distance term of the std (train.distance_uncertainty): synthetic data with a known answer


def _spread_distance(rng, n, share):
    """Member spread and latent distance (independent), and errors with variance
    (1 - share) spread² + share (distance in spread units)²."""
    spread = rng.uniform(0.1, 2.0, n)
    distance = rng.uniform(0.5, 5.0, n)
    d = distance / distance.mean() * spread.mean()
    sigma = np.sqrt((1 - share) * spread ** 2 + share * d ** 2)
    mean = rng.normal(size=n)
    return mean, spread, distance, mean + rng.normal(size=n) * sigma * 1.7


@pytest.mark.parametrize("share", [0.0, 0.5, 1.0])
def test_distance_weight_recovers_the_source_of_the_errors(share):
    rng = np.random.default_rng(1)
    mean, spread, distance, true = _spread_distance(rng, 6000, share)
    w = fit_distance_weight(true - mean, spread, distance, spread.mean(), distance.mean())
    assert w == pytest.approx(share, abs=0.08)
    # the fitted std model on val, then fresh data: 95% coverage, and it ranks the errors as the truth does
    pred = Prediction(("t",), mean[:, None], std_raw=spread[:, None], distance=distance)
    model = fit_std_model(pred, [true], [np.ones(len(true), bool)])
    assert model.weight[0] == pytest.approx(w)
    m2, s2, d2, t2 = _spread_distance(np.random.default_rng(2), 20000, share)
    std = model.std(s2[:, None], d2)[:, 0]
    assert abs(interval_coverage(m2, std, t2, Z95) - 0.95) < 0.01
    if share == 1.0:  # the spread alone cannot rank errors made by the distance; the fitted std can
        assert spearman(np.abs(t2 - m2), std) > spearman(np.abs(t2 - m2), s2) + 0.2


def test_std_model_without_distance_is_the_scaled_spread():
    spread = np.array([[0.1, 1.0], [0.3, 2.0]])
    np.testing.assert_allclose(StdModel(np.array([2.0, 3.0])).std(spread), spread * [2.0, 3.0])
    with_zero = StdModel(np.array([2.0, 3.0]), np.zeros(2), np.ones(2), 1.0)
    np.testing.assert_allclose(with_zero.std(spread, np.array([5.0, 7.0])), spread * [2.0, 3.0])
    assert fit_distance_weight([], [], [], 1.0, 1.0) == 0.0


@given(hnp.arrays(np.float64, (12, 3), elements=st.floats(-5, 5)),
       hnp.arrays(np.float64, 3, elements=st.floats(0.1, 10)),
       hnp.arrays(np.float64, 3, elements=st.floats(-10, 10)),
       st.permutations(range(3)))
def test_latent_distance_ignores_units_and_order_of_the_features(feats, a, b, perm):
    """Standardised on the reference, the distance is unchanged by a positive affine map of each feature
    (a member whose features come out scaled) or a reordering of the features; a reference crystal is
    at distance 0 from itself with one neighbour."""
    feats = feats + np.arange(12)[:, None] * np.array([1.0, -0.5, 0.25])  # no constant feature
    ref, query = feats[:8], feats[8:]
    base = LatentDistance.from_features([ref], k=2)([query])
    moved = LatentDistance.from_features([(ref * a + b)[:, perm]], k=2)([(query * a + b)[:, perm]])
    np.testing.assert_allclose(moved, base, rtol=1e-3, atol=1e-3)
    assert np.allclose(LatentDistance.from_features([ref], k=1)([ref]), 0.0, atol=1e-3)


# local training error (train.local_error_uncertainty): the third term of the std


@pytest.mark.parametrize("shares", [(0.0, 0.0), (0.0, 0.6), (0.3, 0.4)])
def test_shares_recover_the_sources_of_the_errors(shares):
    """Errors drawn with variance (1 - w - v) spread² + w d² + v r² (independent terms in one unit): the
    fitted shares come back, and on fresh data the fitted std covers 95% and ranks like the truth."""
    w, v = shares

    def draw(rng, n):
        spread, distance, local = rng.uniform(0.1, 2.0, n), rng.uniform(0.5, 5.0, n), rng.uniform(0.01, 1.0, n)
        d = distance / distance.mean() * spread.mean()
        r = local / local.mean() * spread.mean()
        sigma = np.sqrt((1 - w - v) * spread ** 2 + w * d ** 2 + v * r ** 2)
        mean = rng.normal(size=n)
        return mean, spread, distance, local, mean + rng.normal(size=n) * sigma * 0.8, sigma

    mean, spread, distance, local, true, _ = draw(np.random.default_rng(3), 8000)
    pred = Prediction(("t",), mean[:, None], std_raw=spread[:, None], distance=distance, local_error=local[:, None])
    model = fit_std_model(pred, [true], [np.ones(len(true), bool)])
    assert model.weight[0] == pytest.approx(w, abs=0.08)
    assert model.local_weight[0] == pytest.approx(v, abs=0.08)
    m2, s2, d2, l2, t2, sigma2 = draw(np.random.default_rng(4), 20000)
    std = model.std(s2[:, None], d2, l2[:, None])[:, 0]
    assert abs(interval_coverage(m2, std, t2, Z95) - 0.95) < 0.01
    assert np.corrcoef(std, sigma2)[0, 1] > 0.98  # the shape of the true sigma, up to the scale
    # without a local error at prediction time the model falls back to spread and distance only
    assert np.isfinite(model.std(s2[:, None], d2)).all()


@given(hnp.arrays(np.float64, (10, 3), elements=st.floats(-5, 5)),
       hnp.arrays(np.float64, (10, 2), elements=st.floats(0, 3)),
       hnp.arrays(np.bool_, (10, 2)), st.integers(1, 4))
def test_local_error_is_the_mean_error_of_the_nearest(feats, errors, unlabelled, k):
    """The local training error of a query is the mean error of its k nearest reference crystals (the
    ones the distance uses), over the labelled ones; the reference mean where none is labelled."""
    feats = feats + np.arange(10)[:, None] * np.array([1.0, -0.5, 0.25])  # distinct points
    errors = np.where(unlabelled, np.nan, errors)
    ref, query = feats[:7], feats[7:]
    ld = LatentDistance.from_features([ref], k=k, errors=errors[:7])
    dist, local = ld.query([query])
    mu, sd, z = ld.refs[0]
    zq = ((query - mu) / sd).astype(np.float32)
    d = np.linalg.norm(zq[:, None, :] - z[None, :, :], axis=2)
    for i in range(len(query)):
        near = np.argsort(d[i], kind="stable")[:k]
        assert dist[i] == pytest.approx(np.sort(d[i])[:k].mean(), rel=1e-4, abs=1e-4)
        ranked = np.sort(d[i])
        if np.isclose(ranked[k - 1], ranked[k], rtol=1e-4):
            continue  # a tie at the k-th neighbour: either crystal is a right answer
        for t in range(2):
            e = errors[:7][near, t]
            e = e[~np.isnan(e)]
            ref_mean = np.nanmean(errors[:7, t]) if (~np.isnan(errors[:7, t])).any() else 0.0
            expect = e.mean() if e.size else ref_mean
            assert local[i, t] == pytest.approx(expect, rel=1e-4, abs=1e-5)


def test_local_error_needs_the_distance():
    from cgnn_dgl.config import TrainConfig
    from cgnn_dgl.errors import UsageError

    with pytest.raises(UsageError, match="local_error_uncertainty needs distance_uncertainty"):
        TrainConfig(local_error_uncertainty=True).validate()


# --------------------------------------------------------------------------------------------------
# a trained two-member ensemble


@pytest.fixture(scope="module")
def ensemble_run(tmp_path_factory, dev_corpus):
    from cgnn_dgl.ensemble import train_ensemble

    root = tmp_path_factory.mktemp("ens")
    rows = usable_rows(dev_corpus, 200, sources=("perov_val",))
    cache = write_cache(root / "cache", rows, seed=1)
    cfg = tiny_config(cache, root / "run", epochs=2, ensemble=2, bootstrap=True)
    summary = train_ensemble(cfg, root / "run")
    return root, rows, cfg, summary


def test_ensemble_run_folder(ensemble_run):
    root, _, cfg, _summary = ensemble_run
    run = root / "run"
    info = json.loads((run / ENSEMBLE_JSON).read_text())
    assert info["members"] == ["member_0/best.pt", "member_1/best.pt"]
    assert info["seeds"] == [cfg.train.seed, cfg.train.seed + 1] and info["bootstrap"] is True
    assert set(info["calibration"]["scale"]) == set(TARGETS4)
    assert all(s > 0 for s in info["calibration"]["scale"].values())
    for k in range(2):
        d = run / f"member_{k}"
        assert (d / "best.pt").is_file() and (d / "done.json").is_file()
        assert (d / "split.json").read_text() == (run / "split.json").read_text()
    assert not same_weights(weights(run / "member_0" / "best.pt"), weights(run / "member_1" / "best.pt"))
    # the calibration moved the val coverage of the 95% interval to (about) 95% wherever there is spread
    cal = info["calibration"]
    for t in TARGETS4:
        if cal["n"][t] >= 10:
            assert abs(cal["coverage_95"][t] - 0.95) <= abs(cal["coverage_95_raw"][t] - 0.95) + 1e-12


def test_predict_ensemble_folder_writes_std_columns(ensemble_run, tmp_path):
    """`cgnn predict --model RUN`: the members' mean, and a non-negative <target>_std beside each target."""
    root, rows, _, _ = ensemble_run
    json_in = tmp_path / "in.json"
    json_in.write_text(json.dumps([{k: r[k] for k in ("name", "lattice", "numbers", "frac")} for r in rows[:12]]))
    out = tmp_path / "p.csv"
    r = _cli("predict", "--model", str(root / "run"), str(json_in), "--out", str(out))
    assert r.returncode == 0, r.stderr
    got = _read(out)
    assert list(got[0]) == ["name"] + [c for t in TARGETS4 for c in (t, f"{t}_std")]
    std = np.array([[float(row[f"{t}_std"]) for t in TARGETS4] for row in got])
    assert np.isfinite(std).all() and (std >= 0).all() and (std > 0).any()
    # the mean column is the average of the members' own predictions
    singles = []
    for k in range(2):
        r = _cli("predict", "--model", str(root / "run" / f"member_{k}" / "best.pt"), str(json_in),
                 "--out", str(tmp_path / f"m{k}.csv"))
        assert r.returncode == 0, r.stderr
        singles.append(np.array([[float(row[t]) for t in TARGETS4] for row in _read(tmp_path / f"m{k}.csv")]))
    mean = np.array([[float(row[t]) for t in TARGETS4] for row in got])
    np.testing.assert_allclose(mean, (singles[0] + singles[1]) / 2, rtol=1e-6, atol=1e-6)
    info = json.loads((root / "run" / ENSEMBLE_JSON).read_text())
    scale = np.array([info["calibration"]["scale"][t] for t in TARGETS4])
    np.testing.assert_allclose(std, np.abs(singles[0] - singles[1]) / 2 * scale, rtol=1e-4, atol=1e-6)


def test_evaluate_ensemble_reports_uncertainty(ensemble_run, tmp_path):
    root, _, _, _ = ensemble_run
    r = _cli("evaluate", "--run", str(root / "run"), "--out", str(tmp_path / "ev"), "--split", "val")
    assert r.returncode == 0, r.stderr
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert metrics["members"] == 2
    for t in TARGETS4:
        u = metrics["uncertainty"][t]
        assert {"spearman_abs_error_std", "coverage_68", "coverage_95", "coverage_95_uncalibrated", "std_scale"} <= set(u)
    info = json.loads((root / "run" / ENSEMBLE_JSON).read_text())
    for t in TARGETS4:  # on the split it was fitted on, evaluate reproduces the calibration's coverage
        if info["calibration"]["n"][t]:
            assert metrics["uncertainty"][t]["coverage_95"] == pytest.approx(info["calibration"]["coverage_95"][t])
    assert (tmp_path / "ev" / "calibration.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = _read(tmp_path / "ev" / "val_predictions.csv")
    assert all(float(row[f"{t}_std"]) >= 0 for row in rows for t in TARGETS4)
    assert "cover 95%" in r.stdout


def test_evaluate_ensemble_split_all_agrees_with_its_parts(ensemble_run, tmp_path):
    """--split all on the run's own cache: every crystal, the run's parts counted (warned: not held out),
    and each val crystal's mean and std the same as --split val gives."""
    root, rows, _, _ = ensemble_run
    run = root / "run"
    r = _cli("evaluate", "--run", str(run), "--out", str(tmp_path / "all"), "--split", "all", "--no-plots")
    assert r.returncode == 0, r.stderr
    assert "not held-out" in r.stderr
    metrics = json.loads((tmp_path / "all" / "metrics.json").read_text())
    split = json.loads((run / "split.json").read_text())
    assert metrics["n"] == len(rows) and metrics["in_run_split"] == {p: len(split[p]) for p in ("train", "val", "test")}
    assert set(metrics["uncertainty"]) == set(TARGETS4)
    assert _cli("evaluate", "--run", str(run), "--out", str(tmp_path / "val"), "--split", "val",
                "--no-plots").returncode == 0
    every = {row["name"]: row for row in _read(tmp_path / "all" / "all_predictions.csv")}
    val = _read(tmp_path / "val" / "val_predictions.csv")
    assert len(val) == len(split["val"]) > 0
    for row in val:
        for t in TARGETS4:
            for c in (f"{t}_pred", f"{t}_std"):
                assert float(every[row["name"]][c]) == pytest.approx(float(row[c]), rel=1e-5, abs=1e-7)


def test_single_model_through_the_ensemble_interface(ensemble_run):
    from cgnn_dgl.batching import PackedGraphs  # noqa: F401  (load_packed returns it)
    from cgnn_dgl.cache import load_packed

    root, _, _, _ = ensemble_run
    packed = load_packed(root / "cache")
    one = Ensemble.load(root / "run" / "member_0")
    assert not one.is_ensemble
    res = one.predict(packed, np.arange(5))
    assert res.std is None and res.mean.shape == (5, 4)
    ens = Ensemble.load(root / "run")
    res = ens.predict(packed, np.arange(5))
    assert res.members.shape == (2, 5, 4) and (res.std >= 0).all()


def test_distance_uncertainty_end_to_end(ensemble_run, tmp_path):
    """train.distance_uncertainty: the calibration writes the reference and the fitted shares; the
    loaded ensemble's std is the documented formula; `cgnn predict` writes non-negative std columns."""
    import shutil

    from cgnn_dgl.cache import load_packed
    from cgnn_dgl.config import RunConfig
    from cgnn_dgl.ensemble import calibrate_ensemble
    from cgnn_dgl.errors import CgnnError

    root, rows, cfg, _ = ensemble_run
    run = tmp_path / "run"
    shutil.copytree(root / "run", run)
    d = cfg.to_dict()
    d["train"].update(distance_uncertainty=True, distance_reference=50)
    packed = load_packed(root / "cache")
    info = calibrate_ensemble(run, RunConfig.from_dict(d), packed)
    dist = info["calibration"]["distance"]
    assert (run / LATENT_REFERENCE).is_file() and dist["n_reference"] == 50 and dist["neighbours"] == 5
    assert all(0.0 <= w <= 1.0 for w in dist["weight"].values())
    ens = Ensemble.load(run)
    res = ens.predict(packed, np.arange(20))
    assert res.distance.shape == (20,) and (res.distance > 0).all()
    w = np.array([dist["weight"][t] for t in TARGETS4])
    norm = np.array([dist["spread_norm"][t] for t in TARGETS4])
    scale = np.array([info["calibration"]["scale"][t] for t in TARGETS4])
    term = (res.distance / dist["distance_norm"])[:, None] * norm
    np.testing.assert_allclose(res.std, scale * np.sqrt((1 - w) * res.std_raw ** 2 + w * term ** 2), rtol=1e-9)
    json_in = tmp_path / "in.json"
    json_in.write_text(json.dumps([{k: r[k] for k in ("name", "lattice", "numbers", "frac")} for r in rows[:6]]))
    r = _cli("predict", "--model", str(run), str(json_in), "--out", str(tmp_path / "p.csv"))
    assert r.returncode == 0, r.stderr
    std = np.array([[float(row[f"{t}_std"]) for t in TARGETS4] for row in _read(tmp_path / "p.csv")])
    assert np.isfinite(std).all() and (std >= 0).all()
    r = _cli("evaluate", "--run", str(run), "--out", str(tmp_path / "ev"), "--split", "val", "--cache", str(root / "cache"))
    assert r.returncode == 0, r.stderr
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    for t in TARGETS4:  # evaluate reproduces the calibration's val coverage with the distance std
        assert metrics["uncertainty"][t]["distance_weight"] == pytest.approx(dist["weight"][t])
        if info["calibration"]["n"][t]:
            assert metrics["uncertainty"][t]["coverage_95"] == pytest.approx(info["calibration"]["coverage_95"][t])
    (run / LATENT_REFERENCE).write_bytes(b"broken")
    with pytest.raises(CgnnError, match="latent reference"):
        Ensemble.load(run)


def test_local_error_uncertainty_end_to_end(ensemble_run, tmp_path):
    """train.local_error_uncertainty: the reference stores the ensemble's training errors, ensemble.json
    the fitted shares and the formula; the loaded ensemble's std is that formula; evaluate reports the
    share and reproduces the val coverage; `cgnn predict` names the formula in its sidecar."""
    import shutil

    from cgnn_dgl.cache import load_packed
    from cgnn_dgl.config import RunConfig
    from cgnn_dgl.ensemble import calibrate_ensemble, reference_sample
    from cgnn_dgl.errors import CgnnError
    from cgnn_dgl.split import load_split

    root, rows, cfg, _ = ensemble_run
    run = tmp_path / "run"
    shutil.copytree(root / "run", run)
    d = cfg.to_dict()
    d["train"].update(distance_uncertainty=True, local_error_uncertainty=True, distance_reference=60)
    packed = load_packed(root / "cache")
    info = calibrate_ensemble(run, RunConfig.from_dict(d), packed)
    dist = info["calibration"]["distance"]
    local = dist["local_error"]
    assert "local" in info["std"] and set(local["weight"]) == set(TARGETS4)
    assert all(dist["weight"][t] >= 0.0 and local["weight"][t] >= 0.0 and dist["weight"][t] + local["weight"][t] <= 1.0
               for t in TARGETS4)
    ens = Ensemble.load(run)
    errors = ens.distance.errors
    assert errors.shape == (60, 4)
    # the stored errors are |ensemble mean - label| on the reference crystals, NaN where unlabelled
    train_idx = load_split(run / "split.json", packed.entry_id, packed.names)["train"]
    ref_idx = reference_sample(train_idx, 60, cfg.train.seed)
    truth = ens.predict(packed, ref_idx).mean
    labelled = packed.y_mask[ref_idx][:, :4]
    np.testing.assert_array_equal(np.isnan(errors), ~labelled)
    np.testing.assert_allclose(errors[labelled], np.abs(truth - packed.y[ref_idx][:, :4])[labelled], rtol=1e-4, atol=1e-5)
    res = ens.predict(packed, np.arange(20))
    assert res.local_error.shape == (20, 4) and (res.local_error >= 0).all()
    w = np.array([dist["weight"][t] for t in TARGETS4])
    v = np.array([local["weight"][t] for t in TARGETS4])
    norm = np.array([dist["spread_norm"][t] for t in TARGETS4])
    l_norm = np.array([local["norm"][t] for t in TARGETS4])
    scale = np.array([info["calibration"]["scale"][t] for t in TARGETS4])
    term_d = (res.distance / dist["distance_norm"])[:, None] * norm
    term_r = res.local_error / l_norm * norm
    np.testing.assert_allclose(res.std, scale * np.sqrt((1 - w - v) * res.std_raw ** 2 + w * term_d ** 2
                                                        + v * term_r ** 2), rtol=1e-9)
    r = _cli("evaluate", "--run", str(run), "--out", str(tmp_path / "ev"), "--split", "val", "--cache", str(root / "cache"))
    assert r.returncode == 0, r.stderr
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    for t in TARGETS4:
        assert metrics["uncertainty"][t]["local_error_weight"] == pytest.approx(local["weight"][t])
        if info["calibration"]["n"][t]:
            assert metrics["uncertainty"][t]["coverage_95"] == pytest.approx(info["calibration"]["coverage_95"][t])
    json_in = tmp_path / "in.json"
    json_in.write_text(json.dumps([{k: r[k] for k in ("name", "lattice", "numbers", "frac")} for r in rows[:4]]))
    r = _cli("predict", "--model", str(run), str(json_in), "--out", str(tmp_path / "p.csv"))
    assert r.returncode == 0, r.stderr
    sidecar = json.loads((tmp_path / "p.json").read_text())
    assert "local = mean absolute training error" in json.dumps(sidecar)
    # a reference without errors cannot serve a calibration that uses them
    ens.distance.errors = None
    ens.distance.save(run / LATENT_REFERENCE)
    with pytest.raises(CgnnError, match="holds no errors"):
        Ensemble.load(run)


@pytest.mark.filterwarnings("ignore:No Pauling electronegativity")
@pytest.mark.parametrize("n_folds", [0, 3])
def test_crossfit_ensemble_stores_out_of_fold_errors(tmp_path, dev_corpus, n_folds):
    """train.crossfit: member k's config leaves out fold k, it trains on the rest of the training split,
    and the latent reference's error of each training crystal is the error of the member that never saw
    it, not the ensemble mean's. With 3 folds for 2 members, fold 2 is seen by both and keeps the
    ensemble mean's error."""
    from cgnn_dgl.cache import load_packed
    from cgnn_dgl.config import load_run_config
    from cgnn_dgl.ensemble import reference_sample, train_ensemble, train_folds
    from cgnn_dgl.split import load_split

    rows = usable_rows(dev_corpus, 160, sources=("perov_val",))
    cache = write_cache(tmp_path / "cache", rows, seed=2)
    run = tmp_path / "run"
    cfg = tiny_config(cache, run, epochs=1, ensemble=2, crossfit=True, crossfit_folds=n_folds,
                      distance_uncertainty=True, local_error_uncertainty=True, distance_reference=50)
    train_ensemble(cfg, run)
    info = json.loads((run / ENSEMBLE_JSON).read_text())
    assert info["crossfit"] is True
    packed = load_packed(cache)
    train_idx = load_split(run / "split.json", packed.entry_id, packed.names)["train"]
    for k in range(2):
        member = load_run_config(run / f"member_{k}" / "config.yaml", check_files=False)
        assert (member.train.crossfit_fold, member.train.crossfit_folds) == (k, n_folds or 2)
    ens = Ensemble.load(run)
    ref_idx = reference_sample(train_idx, 50, cfg.train.seed)
    folds = train_folds(packed, train_idx, n_folds or 2, cfg.train.split_seed)[np.searchsorted(train_idx, ref_idx)]
    assert set(folds) == set(range(n_folds or 2))
    per_member = ens.predict(packed, ref_idx).members  # (2, n, T)
    oof = np.where((folds < 2)[:, None], per_member[np.minimum(folds, 1), np.arange(len(ref_idx))],
                   per_member.mean(0))
    labelled = packed.y_mask[ref_idx][:, :4]
    errors = ens.distance.errors
    np.testing.assert_array_equal(np.isnan(errors), ~labelled)
    np.testing.assert_allclose(errors[labelled], np.abs(oof - packed.y[ref_idx][:, :4])[labelled], rtol=1e-4, atol=1e-5)
    in_sample = np.abs(per_member.mean(0) - packed.y[ref_idx][:, :4])
    out = folds < 2
    assert not np.allclose(errors[out][labelled[out]], in_sample[out][labelled[out]], rtol=1e-3)


# --------------------------------------------------------------------------------------------------
# kill -9 in the middle of the second member, then --resume; and members in parallel processes


def test_ensemble_sigkill_then_resume_matches_uninterrupted(tmp_path, dev_corpus):
    from cgnn_dgl.ensemble import train_ensemble

    cache = write_cache(tmp_path / "cache", usable_rows(dev_corpus, 160), seed=3)
    epochs = 8
    cfg = tiny_config(cache, tmp_path / "killed", epochs=epochs, batch_size=16, num_threads=1)
    cfg_file = tmp_path / "cfg.yaml"
    cfg.save(cfg_file)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "cgnn_dgl.cli", "train", "--config", str(cfg_file),
                             "--set", "train.ensemble=2", "--out", str(tmp_path / "killed")],
                            cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    hist = tmp_path / "killed" / "member_1" / "history.csv"
    killed_after = sigkill_after_lines(proc, hist, 3, timeout=300)  # member 1 has >= 2 epochs
    assert killed_after is not None, f"run ended before it could be killed: {proc.stderr.read().decode()[-2000:]}"
    assert killed_after < epochs and not (tmp_path / "killed" / ENSEMBLE_JSON).exists()
    again = _cli("train", "--out", str(tmp_path / "killed"), env=env)  # without --resume: refused
    assert again.returncode == 2 and "--resume" in again.stderr
    r = _cli("train", "--out", str(tmp_path / "killed"), "--resume", env=env)
    assert r.returncode == 0, r.stderr
    torch.set_num_threads(1)
    try:
        straight = tiny_config(cache, tmp_path / "straight", epochs=epochs, batch_size=16, num_threads=1, ensemble=2)
        train_ensemble(straight, tmp_path / "straight")
    finally:
        torch.set_num_threads(max(1, os.cpu_count() or 1))
    for k in range(2):
        a = torch.load(tmp_path / "killed" / f"member_{k}" / "last.pt", weights_only=True)
        assert a["epoch"] == epochs
        assert same_weights(a["model"], weights(tmp_path / "straight" / f"member_{k}" / "last.pt"))
    ka = json.loads((tmp_path / "killed" / ENSEMBLE_JSON).read_text())["calibration"]["scale"]
    kb = json.loads((tmp_path / "straight" / ENSEMBLE_JSON).read_text())["calibration"]["scale"]
    assert ka == kb


def test_parallel_members_equal_sequential(tmp_path, dev_corpus):
    from cgnn_dgl.ensemble import train_ensemble

    cache = write_cache(tmp_path / "cache", usable_rows(dev_corpus, 120), seed=4)
    torch.set_num_threads(1)
    try:
        train_ensemble(tiny_config(cache, tmp_path / "seq", epochs=2, num_threads=1, ensemble=2), tmp_path / "seq")
    finally:
        torch.set_num_threads(max(1, os.cpu_count() or 1))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cfg = tiny_config(cache, tmp_path / "par", epochs=2, num_threads=1, ensemble=2)
    cfg.save(tmp_path / "cfg.yaml")
    r = _cli("train", "--config", str(tmp_path / "cfg.yaml"), "--out", str(tmp_path / "par"), "--workers", "2", env=env)
    assert r.returncode == 0, r.stderr
    assert "2 members" in r.stdout
    for k in range(2):
        assert same_weights(weights(tmp_path / "seq" / f"member_{k}" / "best.pt"),
                            weights(tmp_path / "par" / f"member_{k}" / "best.pt"))
