"""Metrics of `cgnn evaluate`: regression, classification and a hand-checked ROC AUC."""
from __future__ import annotations

import math

import numpy as np
import pytest

from cgnn_dgl.config import TrainConfig
from cgnn_dgl.evaluate import binary_metrics, compute_metrics, regression_metrics, roc_auc


def test_roc_auc_hand_example_with_ties():
    # positives 0.9, 0.5, 0.1 ; negatives 0.9, 0.3 -> pairs won: 0.5 + 1 + 0 + 1 + 0 + 0 = 2.5 of 6
    labels = [1, 0, 1, 0, 1]
    scores = [0.9, 0.9, 0.5, 0.3, 0.1]
    assert roc_auc(labels, scores) == pytest.approx(2.5 / 6, abs=1e-12)


def test_roc_auc_edge_cases():
    assert roc_auc([0, 0, 1, 1], [0.1, 0.2, 0.3, 0.4]) == 1.0
    assert roc_auc([1, 1, 0, 0], [0.1, 0.2, 0.3, 0.4]) == 0.0
    assert roc_auc([1, 0, 1, 0], [7, 7, 7, 7]) == 0.5
    assert math.isnan(roc_auc([1, 1], [0.2, 0.3]))


def test_roc_auc_matches_pair_count_on_random_ties():
    rng = np.random.default_rng(1)
    labels = rng.random(300) < 0.4
    scores = rng.integers(0, 8, 300).astype(float)  # many ties
    pos, neg = scores[labels], scores[~labels]
    brute = ((pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()) / (len(pos) * len(neg))
    assert roc_auc(labels, scores) == pytest.approx(brute, abs=1e-12)


def test_binary_and_regression_metrics():
    m = binary_metrics([1, 1, 0, 0, 1], [1, 0, 0, 1, 1], [0.9, 0.2, 0.1, 0.8, 0.7])
    assert (m["tp"], m["fp"], m["fn"], m["tn"]) == (2, 1, 1, 1)
    assert m["accuracy"] == pytest.approx(3 / 5)
    assert m["precision"] == pytest.approx(2 / 3)
    assert m["recall"] == pytest.approx(2 / 3)
    r = regression_metrics([1.0, 2.0, 4.0], [1.0, 3.0, 2.0])
    assert r["mae"] == pytest.approx(1.0)
    assert r["rmse"] == pytest.approx(math.sqrt(5 / 3))


def test_compute_metrics_uses_masks_and_thresholds():
    targets = ["formation_energy", "band_gap", "magnetization"]
    true = np.array([[0.0, 0.0, 0.0], [1.0, 2.0, 1.0], [2.0, 0.0, 0.01], [3.0, 1.5, 9.0]])
    mask = np.array([[1, 1, 1], [1, 1, 1], [0, 1, 1], [1, 1, 0]], bool)
    pred = np.array([[0.5, 0.05, 0.0], [1.0, 1.0, 2.0], [100.0, 0.5, 0.0], [2.0, 2.0, 0.0]])
    cfg = TrainConfig(gap_threshold=0.0, gap_decision_threshold=0.1, mag_threshold=0.05, mag_decision_threshold=0.05)
    m = compute_metrics(targets, pred, true, mask, cfg)
    fe = m["regression"]["formation_energy"]
    assert fe["n"] == 3 and fe["mae"] == pytest.approx((0.5 + 0 + 1) / 3)
    mi = m["classification"]["metal_insulator"]
    # labels: insulators are rows 1 and 3; predicted (>0.1): rows 1, 2, 3
    assert (mi["tp"], mi["fp"], mi["fn"], mi["tn"]) == (2, 1, 0, 1)
    mag = m["classification"]["magnetic"]
    assert mag["n"] == 3 and mag["positives"] == 1 and mag["roc_auc"] == 1.0


def test_evaluate_cli_writes_predictions_metrics_and_plots(tmp_path, dev_corpus):
    import csv
    import json
    import subprocess
    import sys
    from pathlib import Path

    from test_train import tiny_config, usable_rows, write_cache

    from cgnn_dgl.train import train_run

    repo = Path(__file__).resolve().parents[1]
    cache = write_cache(tmp_path / "cache", usable_rows(dev_corpus, 240), seed=2)
    train_run(tiny_config(cache, tmp_path / "run", epochs=2), tmp_path / "run")
    r = subprocess.run([sys.executable, "-m", "cgnn_dgl.cli", "evaluate", "--run", str(tmp_path / "run"),
                        "--out", str(tmp_path / "ev")], capture_output=True, text=True, cwd=repo, timeout=300)
    assert r.returncode == 0, r.stderr
    ev = tmp_path / "ev"
    for f in ("test_predictions.csv", "metrics.json", "training_curves.png", "parity_formation_energy.png",
              "parity_volume_per_atom.png"):
        assert (ev / f).is_file() and (ev / f).stat().st_size > 0, f
    assert (ev / "training_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    metrics = json.loads((ev / "metrics.json").read_text())
    split = json.loads((tmp_path / "run" / "split.json").read_text())
    with open(ev / "test_predictions.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == len(split["test"]) == metrics["n"]
    for t in ("formation_energy", "volume_per_atom", "band_gap", "magnetization"):
        lab = [r for r in rows if r[f"{t}_true"] != ""]
        mae = np.mean([abs(float(r[f"{t}_pred"]) - float(r[f"{t}_true"])) for r in lab])
        assert metrics["regression"][t]["n"] == len(lab)
        assert metrics["regression"][t]["mae"] == pytest.approx(mae, rel=1e-6)
    assert set(metrics["classification"]) == {"metal_insulator", "magnetic"}
    assert "ROC AUC" in r.stdout

    bad = subprocess.run([sys.executable, "-m", "cgnn_dgl.cli", "evaluate", "--run", str(tmp_path / "nothing")],
                         capture_output=True, text=True, cwd=repo, timeout=120)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1


def test_evaluate_flags_synthetic_labels(tmp_path):
    """Issue 8.11: a run on a `cgnn db synth` database says so in metrics.json, the console and the plots."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    db = f"sqlite:///{tmp_path / 's.sqlite'}"

    def cgnn(*args):
        r = subprocess.run([sys.executable, "-m", "cgnn_dgl.cli", *args], capture_output=True, text=True,
                           cwd=repo, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        return r

    cgnn("db", "init", "--db", db)
    cgnn("db", "synth", "--db", db, "--entries", "150", "--seed", "3")
    cgnn("ingest", "--db", db, "--out", str(tmp_path / "c"), "--no-progress")
    t = cgnn("train", "--config", "configs/tiny.yaml", "--cache", str(tmp_path / "c"), "--out", str(tmp_path / "r"),
             "--set", "train.epochs=1")
    assert "labels are SYNTHETIC" in t.stderr
    r = cgnn("evaluate", "--run", str(tmp_path / "r"), "--no-plots")
    metrics = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert metrics["synthetic_labels"] is True and "SYNTHETIC" in metrics["labels_note"]
    assert "SYNTHETIC labels" in r.stdout
    cgnn("examples", "--out", str(tmp_path / "cif"), "--limit", "2")
    p = cgnn("predict", "--model", str(tmp_path / "r" / "best.pt"), str(tmp_path / "cif"), "--out", str(tmp_path / "p.csv"))
    assert "SYNTHETIC labels" in p.stderr and json.loads((tmp_path / "p.json").read_text())["synthetic"] is True


def test_evaluate_split_all_scores_a_held_out_cache(tmp_path, dev_corpus):
    """`cgnn evaluate --split all --cache HELD`: every crystal of a cache the run never split, its metrics
    from the predictions CSV, the mean predictor from the run's training labels, and a count of the
    crystals the run's split names (by name: `cgnn graphs` caches number their inputs 0, 1, ... alike)."""
    import csv
    import json
    import subprocess
    import sys
    from pathlib import Path

    from test_train import tiny_config, usable_rows, write_cache

    from cgnn_dgl.evaluate import evaluate_run
    from cgnn_dgl.split import load_split
    from cgnn_dgl.train import load_cache, train_run

    repo = Path(__file__).resolve().parents[1]
    rows = [dict(r, name=f"{r['source']}-{r['name']}-{i}") for i, r in enumerate(usable_rows(dev_corpus, 300))]
    assert len(rows) == 300
    cache = write_cache(tmp_path / "cache", rows[:240], seed=2, kind="files")
    train_run(tiny_config(cache, tmp_path / "run", epochs=2), tmp_path / "run")
    held = write_cache(tmp_path / "held", rows[240:], seed=5, kind="files")  # keys 0..59, other crystals

    r = subprocess.run([sys.executable, "-m", "cgnn_dgl.cli", "evaluate", "--run", str(tmp_path / "run"), "--cache",
                        str(held), "--split", "all", "--out", str(tmp_path / "ev"), "--no-plots"],
                       capture_output=True, text=True, cwd=repo, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "0 / 0 / 0 of its crystals are in the run's train / val / test split" in r.stdout
    m = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert m["split"] == "all" and m["n"] == 60 and m["in_run_split"] == {"train": 0, "val": 0, "test": 0}
    with open(tmp_path / "ev" / "all_predictions.csv") as fh:
        pred = list(csv.DictReader(fh))
    assert [p["name"] for p in pred] == [r["name"] for r in rows[240:]]
    own, ho = load_cache(str(cache)), load_cache(str(held))
    train = load_split(tmp_path / "run" / "split.json", own.entry_id, own.names)["train"]
    for k, t in enumerate(("formation_energy", "volume_per_atom", "band_gap")):
        lab = [p for p in pred if p[f"{t}_true"] != ""]
        assert len(lab) == m["regression"][t]["n"] > 0
        mae = np.mean([abs(float(p[f"{t}_pred"]) - float(p[f"{t}_true"])) for p in lab])
        assert m["regression"][t]["mae"] == pytest.approx(mae, rel=1e-6)
        tm = own.y_mask[train, k].astype(bool)
        train_mean = own.y[train][tm, k].mean()
        hm = ho.y_mask[:, k].astype(bool)
        assert m["regression"][t]["mean_predictor_mae"] == pytest.approx(
            np.abs(ho.y[hm, k] - train_mean).mean(), rel=1e-5)

    # a run that holds out no test crystals (configs/accurate.yaml): --split test says what to do instead
    train_run(tiny_config(cache, tmp_path / "notest", epochs=1, test_fraction=0.0), tmp_path / "notest")
    r = subprocess.run([sys.executable, "-m", "cgnn_dgl.cli", "evaluate", "--run", str(tmp_path / "notest"),
                        "--no-plots"], capture_output=True, text=True, cwd=repo, timeout=300)
    assert r.returncode == 2 and "holds out no test crystals" in r.stderr and "--split all" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1

    # a "held-out" cache that holds 40 of the run's crystals: counted per part by name, with a warning
    mixed = write_cache(tmp_path / "mixed", rows[200:260], seed=7, kind="files")
    m2 = evaluate_run(tmp_path / "run", cache=str(mixed), split="all", out=str(tmp_path / "ev2"), plots=False)
    parts = load_split(tmp_path / "run" / "split.json", own.entry_id, own.names)
    shared = {r["name"] for r in rows[200:240]}
    expect = {p: sum(str(own.names[i]) in shared for i in parts[p]) for p in ("train", "val", "test")}
    assert sum(expect.values()) == 40 and m2["in_run_split"] == expect and m2["n"] == 60
