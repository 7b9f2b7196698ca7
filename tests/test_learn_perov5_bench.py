"""bench/learn_perov5.py rows, smoke-sized (240 Perov-5 structures, 2 epochs, a small trunk): one row per
call, the single model reused as ensemble member 0, the merged table, a changed config refused."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

REPO = Path(__file__).resolve().parents[1]
NAMES3 = ("formation_energy", "volume_per_atom", "band_gap")


def _load_bench():
    sys.path.insert(0, str(REPO / "bench"))
    try:
        import learn_perov5
    finally:
        sys.path.pop(0)
    return learn_perov5


@pytest.fixture(scope="module")
def bench():
    return _load_bench()


def test_rows_one_at_a_time_then_merge(bench, shared, tmp_path):
    csv_path = shared / "data" / "perov5" / "train.csv"
    cfg = tmp_path / "acc.yaml"
    cfg.write_text(yaml.safe_dump({
        "model": {"preset": "benchmark", "classification_heads": True, "classification_detach": True},
        "train": {"batch_size": 64, "epochs": 2, "scheduler": "cosine", "milestones": [1], "warmup_epochs": 1,
                  "target_loss": {"band_gap": "l1"}}}))
    small = ["--csv", str(csv_path), "--limit", "240", "--workers", "1", "--threads", "1", "--epochs", "2",
             "--set", "model.n_hidden_feat=8", "--set", "model.n_graph_feat=16", "--config", str(cfg)]
    a, b = tmp_path / "a", tmp_path / "b"
    assert bench.main([*small, "--rows", "accurate", "--out", str(a)]) == 0
    m0 = a / "accurate" / "member_0" / "best.pt"
    stamp = m0.stat().st_mtime_ns
    assert bench.main([*small, "--rows", "ensemble", "--members", "2", "--out", str(a),
                       "--set", "train.distance_uncertainty=true"]) == 0  # scoring only: member 0 still reused
    assert m0.stat().st_mtime_ns == stamp  # member 0 is the single model, reused
    assert (a / "accurate" / "member_1" / "best.pt").is_file()
    assert bench.main([*small, "--rows", "benchmark", "--out", str(b)]) == 0

    single = json.loads((a / "rows" / "accurate.json").read_text())
    ens = json.loads((a / "rows" / "ensemble.json").read_text())
    ref = json.loads((b / "rows" / "benchmark.json").read_text())
    assert (single["members"], ens["members"], ref["members"]) == (1, 2, 1)
    assert ens["seeds"] == [12345, 12346] and ens["config"]["model"]["n_hidden_feat"] == 8
    assert ref["config"]["train"]["batch_size"] == 512 and ref["config"]["model"]["classification_heads"] is False
    for res in (single, ens, ref):
        assert res["n_train"] + res["n_val"] + res["n_test"] == 240
        for name in ("formation_energy", "volume_per_atom", "band_gap"):
            r = res[name]
            assert r["n"] > 0 and r["model_mae"] > 0 and r["mean_mae"] > 0
            assert ("coverage_95" in r) == (res is ens)
        auc = res["insulator_auc"]
        assert auc["n"] == res["band_gap"]["n"]
        assert ("from_p_insulator" in auc) == (res is not ref)
        assert math.isnan(auc["from_gap"]) or 0 <= auc["from_gap"] <= 1
    for name in ("formation_energy", "volume_per_atom", "band_gap"):
        r = ens[name]
        assert r["std_scale"] > 0 and 0 <= r["coverage_68"] <= r["coverage_95"] <= 1
        assert 0 <= r["distance_weight"] <= 1  # train.distance_uncertainty
        assert "distance_weight" not in single[name]
        assert ens["val"][name]["coverage_95"] == pytest.approx(0.95, abs=0.1)  # fitted there
    assert single["train_seconds"] > 0 and ens["train_seconds"] > single["train_seconds"]
    assert "swapped" not in single and set(ens["swapped"]) >= set(NAMES3)
    for name in NAMES3:
        sw = ens["swapped"][name]
        assert -1 <= sw["spearman"] <= 1 and 0 <= sw["coverage_68"] <= sw["coverage_95"] <= 1

    # without the distance the std is the members' spread times a scale: ranks do not see the scale, so the
    # swap (fitted on test, scored on val) must give val's own Spearman; scoring test by mistake would not
    assert bench.main([*small, "--rows", "ensemble", "--members", "2", "--out", str(a),
                       "--set", "train.distance_uncertainty=false"]) == 0
    plain = json.loads((a / "rows" / "ensemble.json").read_text())
    assert any(plain["val"][n]["spearman"] != pytest.approx(plain[n]["spearman"]) for n in NAMES3)
    for name in NAMES3:
        assert plain["swapped"][name]["spearman"] == pytest.approx(plain["val"][name]["spearman"])

    assert bench.main(["--merge", str(a), str(b), "--out", str(tmp_path / "m")]) == 0
    table = (tmp_path / "m" / "table.md").read_text()
    lines = [line for line in table.splitlines() if line.startswith("| ")]
    assert [line.split("|")[1].strip() for line in lines[1:]] == ["benchmark", "accurate", "ensemble", "mean predictor"]
    assert "--rows ensemble --members 2" in table

    with pytest.raises(SystemExit, match="another config"):
        bench.main([*small, "--rows", "accurate", "--out", str(a), "--set", "train.lr=0.01"])


@pytest.mark.filterwarnings("ignore:No Pauling electronegativity")
def test_crossfit_row_leaves_each_members_fold_out(bench, shared, tmp_path):
    """--set train.crossfit=true: member k of the ensemble row is saved with fold k of --members left out
    of its training split, and the row is scored with the out-of-fold local error."""
    import torch

    csv_path = shared / "data" / "perov5" / "train.csv"
    args = ["--csv", str(csv_path), "--limit", "160", "--workers", "1", "--threads", "1", "--rows", "ensemble",
            "--members", "2", "--out", str(tmp_path / "cf"), "--set", "model.n_hidden_feat=8",
            "--set", "model.n_graph_feat=16", "--set", "train.epochs=1", "--set", "train.crossfit=true",
            "--set", "train.local_error_uncertainty=true"]
    assert bench.main(args) == 0
    res = json.loads((tmp_path / "cf" / "rows" / "ensemble.json").read_text())
    assert res["config"]["train"]["crossfit"] is True and res["formation_energy"]["n"] > 0
    assert 0 <= res["formation_energy"]["local_error_weight"] <= 1
    for k in range(2):
        ck = torch.load(tmp_path / "cf" / "accurate" / f"member_{k}" / "best.pt", weights_only=False)
        t = ck["train_config"]
        assert (t["crossfit_fold"], t["crossfit_folds"]) == (k, 2)


@given(st.lists(st.sampled_from(["A", "B", "C", "D", "E", "F", "G"]), min_size=1, max_size=40),
       st.floats(0.05, 1.0))
@settings(max_examples=60, deadline=None)
def test_formula_subset_keeps_whole_formulas(formulas, fraction):
    """--train-fraction: a subset of the training rows made of whole formulas, round(fraction * distinct) of
    them, and every row of a kept formula."""
    import numpy as np

    subset = _load_bench().formula_subset
    train = np.arange(len(formulas))[::2]  # the training split: every other row
    got = subset(formulas, train, fraction)
    assert set(got.tolist()) <= set(train.tolist())
    kept = {formulas[i] for i in got}
    assert len(kept) == round(fraction * len({formulas[i] for i in train}))
    assert sorted(got.tolist()) == [i for i in train.tolist() if formulas[i] in kept]


def test_member_seeds_follow_the_configs_seed(bench, tmp_path):
    """The accurate / ensemble rows seed member k with the config's train.seed + k (configs/accurate.yaml's
    measured seeds), 12345 + k when the config names none; the split seed and the benchmark row stay 12345."""
    import argparse

    args = argparse.Namespace(preset="benchmark", epochs=2, batch_size=64, lr=1e-3, progress=False, threads=1,
                              out=str(tmp_path), set=[])
    base = {"model": {"preset": "benchmark"}, "train": {"seed": 777}}
    cfg = bench.row_config("ensemble", args, base)
    assert (cfg.train.seed, cfg.train.split_seed) == (777, bench.SPLIT_SEED)
    assert bench.member_seed_config(cfg, 3, tmp_path / "m3", 5).train.seed == 780
    assert bench.row_config("accurate", args, {"model": {"preset": "benchmark"}, "train": {}}).train.seed == 12345
    assert bench.row_config("benchmark", args, base).train.seed == bench.SPLIT_SEED
    args.split_seed = 4242  # --split-seed moves the split, not the members' seeds
    cfg = bench.row_config("ensemble", args, base)
    assert (cfg.train.seed, cfg.train.split_seed) == (777, 4242)
    assert bench.row_config("benchmark", args, base).train.seed == bench.SPLIT_SEED
    shipped = yaml.safe_load((REPO / "configs" / "accurate.yaml").read_text())
    assert bench.row_config("ensemble", args, {"model": shipped["model"], "train": shipped["train"]}).train.seed \
        == shipped["train"]["seed"]
