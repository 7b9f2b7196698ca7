"""The task layer: the OQMD preset, losses against a plain loop, labels, metrics, and training / evaluating /
predicting on targets no preset knows (heat_all, dir_gap, a 0/1 label) from a cache built by `cgnn graphs`."""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from cgnn_dgl import TARGETS
from cgnn_dgl.cli import main
from cgnn_dgl.config import ModelConfig, TrainConfig
from cgnn_dgl.errors import UsageError
from cgnn_dgl.tasks import BINARY, Task, TaskSet, class_names, oqmd_preset

TINY_MODEL = {"n_hidden_feat": 8, "n_graph_feat": 16, "n_conv": 2, "n_fc": 1, "use_batch_norm": True,
              "full_pooling": True, "gated_pooling": True}


def test_oqmd_preset_is_the_four_targets_and_two_classifications():
    tasks = oqmd_preset()
    assert tasks.names == TARGETS
    assert tasks.units() == {"formation_energy": "eV/atom", "volume_per_atom": "Å³/atom", "band_gap": "eV",
                             "magnetization": "μB/atom"}
    assert tasks.class_names == ("insulator", "magnetic")
    ins, mag = tasks.heads
    assert (ins.source, ins.threshold, ins.decision_threshold, ins.key) == ("band_gap", 0.0, 0.1, "metal_insulator")
    assert (mag.source, mag.threshold, mag.decision_threshold, mag.key) == ("magnetization", 0.05, 0.05, "magnetic")
    assert tasks.label_columns == TARGETS  # derived classes need no column of their own
    assert [c for c, _ in tasks.prediction_columns()] == list(TARGETS) + ["p_insulator", "p_magnetic"]
    # without heads the classifications are scored from the band-gap / magnetization regressions
    plain = oqmd_preset(classification_heads=False)
    assert plain.heads == () and [t.key for t in plain.binary] == ["metal_insulator", "magnetic"]
    assert class_names(ModelConfig()) == ()


@given(st.integers(1, 4), st.integers(1, 9), st.lists(st.sampled_from(["mse", "l1", "huber"]), min_size=4,
                                                     max_size=4),
       st.lists(st.sampled_from([0.0, 0.25, 1.0, 2.5]), min_size=4, max_size=4), st.integers(0, 2**31 - 1))
def test_regression_loss_is_the_weighted_mean_of_each_tasks_masked_loss(n_t, n, losses, weights, seed):
    rng = np.random.default_rng(seed)
    names = [f"t{k}" for k in range(n_t)]
    train = TrainConfig(target_loss=dict(zip(names, losses)), task_weights=dict(zip(names, weights)))
    tasks = TaskSet.from_configs(ModelConfig(targets=tuple(names)), train)
    reg = torch.tensor(rng.normal(size=(n, n_t)) * 2)
    ys = torch.tensor(rng.normal(size=(n, n_t)))
    mask = rng.random((n, n_t)) < 0.7
    maskf = torch.tensor(mask, dtype=torch.float64)
    w = tasks.loss_weights(mask.any(axis=0)).double()
    loss, sq = tasks.regression_loss("cpu")(reg, ys, maskf, maskf.sum(0), w)
    # the same by a plain loop over tasks and labelled rows
    elems = {"mse": lambda d: d * d, "l1": abs, "huber": lambda d: 0.5 * d * d if abs(d) < 1 else abs(d) - 0.5}
    total, denom = 0.0, sum(weights[k] for k in range(n_t) if mask[:, k].any())
    for k in range(n_t):
        rows = [float(reg[i, k] - ys[i, k]) for i in range(n) if mask[i, k]]
        if rows:
            total += weights[k] * sum(elems[losses[k]](d) for d in rows) / len(rows)
    expected = total / denom if denom > 0 else total
    assert float(loss) == pytest.approx(expected, rel=1e-6, abs=1e-9)  # weights are float32
    assert torch.equal(sq, (reg - ys) ** 2 * maskf)


def test_binary_labels_derived_by_threshold_or_read_as_0_1():
    cfg = ModelConfig(targets=("dir_gap", "band_gap"), classification_heads=True, binary_targets=("stable",))
    tasks = TaskSet.from_configs(cfg, TrainConfig(gap_threshold=0.5))
    assert tasks.label_columns == ("dir_gap", "band_gap", "stable")
    assert tasks.class_names == ("insulator", "magnetic", "stable")
    y = torch.tensor([[1.0, 0.4, 1.0], [2.0, 0.6, 0.0], [3.0, 9.0, 1.0]])
    mask = torch.tensor([[True, True, True], [True, True, False], [True, False, True]])
    labels, lmask = tasks.binary_labels(y, mask)
    assert labels[:, 0].tolist() == [0.0, 1.0, 1.0] and lmask[:, 0].tolist() == [True, True, False]
    assert not lmask[:, 1].any()  # magnetic derives from magnetization, which this model lacks
    assert labels[:, 2].tolist() == [1.0, 0.0, 1.0] and lmask[:, 2].tolist() == [True, False, True]
    w = tasks.head_weights(y.numpy(), mask.numpy())
    assert w.tolist() == [1.0, 0.0, 0.0]  # magnetic: no labels; stable: only class 1 where labelled
    tasks.check_binary_labels(y.numpy(), mask.numpy())
    with pytest.raises(UsageError, match=r"binary target stable: labels must be 0 or 1; found 0\.5"):
        tasks.check_binary_labels(np.array([[1.0, 0.0, 0.5]]), np.ones((1, 3), bool))


def test_binary_loss_is_the_weighted_masked_bce():
    tasks = TaskSet.from_configs(ModelConfig(targets=("a",), binary_targets=("p", "q")),
                                 TrainConfig(classification_weight=0.5))
    logits = torch.tensor([[0.3, -1.0], [2.0, 0.1], [-0.5, 0.7]])
    labels = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    lmask = torch.tensor([[True, False], [True, True], [False, True]])
    got = tasks.binary_loss(logits, labels, lmask, torch.tensor([1.0, 1.0]))

    def bce(x, y):
        return -(y * math.log(1 / (1 + math.exp(-x))) + (1 - y) * math.log(1 - 1 / (1 + math.exp(-x))))

    p = (bce(0.3, 1) + bce(2.0, 0)) / 2
    q = (bce(0.1, 1) + bce(0.7, 1)) / 2
    assert float(got) == pytest.approx(0.5 * (p + q), rel=1e-6)


def test_balanced_bce_weights_the_rare_class_by_the_class_ratio():
    """train.classification_balance: pos_weight = n_negative / n_positive per head, counted over labelled
    rows only (1 for a head with one class); the positive rows' BCE is multiplied by it."""
    tasks = TaskSet.from_configs(ModelConfig(targets=("a",), binary_targets=("p", "q")))
    y = np.array([[0.0, 1, 1], [0.0, 0, 1], [0.0, 0, 1], [0.0, 0, 1], [0.0, 1, 1]])
    m = np.ones_like(y, dtype=bool)
    m[4, 1] = False  # p: 1 positive, 3 negatives labelled; q: all positive
    w = tasks.positive_weights(y, m)
    assert w.tolist() == [3.0, 1.0]
    logits = torch.tensor([[0.3, -1.0], [2.0, 0.1], [-0.5, 0.7]])
    labels = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    lmask = torch.tensor([[True, False], [True, True], [False, True]])
    got = tasks.binary_loss(logits, labels, lmask, torch.tensor([1.0, 1.0]), torch.tensor([3.0, 2.0]))

    def bce(x, y, pw):
        s = 1 / (1 + math.exp(-x))
        return -(pw * y * math.log(s) + (1 - y) * math.log(1 - s))

    p = (bce(0.3, 1, 3.0) + bce(2.0, 0, 3.0)) / 2
    q = (bce(0.1, 1, 2.0) + bce(0.7, 1, 2.0)) / 2
    assert float(got) == pytest.approx(p + q, rel=1e-6)


def test_columns_name_what_the_cache_holds():
    tasks = TaskSet.from_configs(ModelConfig(targets=("heat_all", "bulk")))
    assert tasks.columns(("dir_gap", "heat_all", "bulk")) == [1, 2]
    with pytest.raises(UsageError) as exc:
        tasks.columns(("heat_all", "dir_gap"), "the cache C")
    msg = str(exc.value)
    assert "\n" not in msg and msg.startswith("the cache C has no target bulk; it holds heat_all, dir_gap")


def test_task_definitions_are_checked():
    with pytest.raises(UsageError, match="kind"):
        Task("x", kind="ordinal")
    with pytest.raises(UsageError, match="loss"):
        Task("x", loss="bce")
    with pytest.raises(UsageError, match="repeated: x"):
        TaskSet((Task("x"),), (Task("x", kind=BINARY, loss="bce"),))
    with pytest.raises(UsageError, match="duplicate target"):
        ModelConfig(targets=("a",), binary_targets=("a",))
    with pytest.raises(UsageError, match="unknown target 'bulk'"):  # typos of a custom name still fail
        TrainConfig(task_weights={"bulk": 2.0}).validate(("heat_all",))
    TrainConfig(task_weights={"band_gap": 2.0}).validate(("heat_all",))  # OQMD names a model lacks: ignored


def test_metrics_per_task_with_names_units_and_head_probabilities():
    cfg = ModelConfig(targets=("heat_all",), binary_targets=("stable",))
    tasks = TaskSet.from_configs(cfg, units={"heat_all": "eV/atom"})
    true = np.array([[0.1, 1.0], [0.3, 0.0], [0.2, 1.0], [9.0, 0.0]])
    mask = np.array([[1, 1], [1, 1], [1, 1], [0, 1]], bool)
    pred = np.array([[0.2], [0.1], [0.2], [0.0]])
    prob = np.array([[0.9], [0.6], [0.4], [0.1]])
    m = tasks.metrics(pred, true, mask, prob)
    assert m["regression"]["heat_all"]["unit"] == "eV/atom"
    assert m["regression"]["heat_all"]["mae"] == pytest.approx((0.1 + 0.2 + 0.0) / 3)
    s = m["classification"]["stable"]
    assert (s["tp"], s["fp"], s["fn"], s["tn"]) == (1, 1, 1, 1) and s["roc_auc"] == pytest.approx(0.75)
    assert s["label_threshold"] == "0/1 label"


# --------------------------------------------------------------------------------------------------
# end to end on targets no preset knows


@pytest.fixture(scope="module")
def perov_cache(tmp_path_factory, shared) -> Path:
    """A CGCNN folder of 40 Perov-5 structures (heat_all, dir_gap and a 0/1 wide_gap label) -> `cgnn graphs`."""
    csv.field_size_limit(2**31 - 1)
    root = tmp_path_factory.mktemp("perov")
    folder = root / "in"
    folder.mkdir()
    lines = []
    with open(shared / "data" / "perov5" / "train.csv", newline="") as fh:
        for r, _ in zip(csv.DictReader(fh), range(40)):
            (folder / f"{r['material_id']}.cif").write_text(r["cif"])
            wide = int(float(r["dir_gap"]) > 1.0)
            lines.append(f"{r['material_id']},{r['heat_all']},{r['dir_gap']},{wide}")
    (folder / "id_prop.csv").write_text("\n".join(lines) + "\n")
    rc = main(["graphs", str(folder), "--targets", "heat_all,dir_gap,wide_gap",
               "--units", "heat_all=eV/atom,dir_gap=eV", "--out", str(root / "cache"), "--workers", "1"])
    assert rc == 0
    return root / "cache"


def _config(path: Path, **model) -> Path:
    import yaml

    path.write_text(yaml.safe_dump({"model": {**TINY_MODEL, **model},
                                    "train": {"epochs": 2, "batch_size": 16, "milestones": [2], "lr": 3e-3,
                                              "progress": False, "val_fraction": 0.2, "test_fraction": 0.2,
                                              "split": "random"}}))
    return path


def test_train_evaluate_predict_on_custom_targets(perov_cache, tmp_path, capsys):
    cfg = _config(tmp_path / "c.yaml", binary_targets=["wide_gap"])
    run = tmp_path / "run"
    assert main(["train", "--config", str(cfg), "--cache", str(perov_cache), "--targets", "heat_all,dir_gap",
                 "--out", str(run)]) == 0
    split = json.loads((run / "split.json").read_text())
    assert split["method"] == "random" and (len(split["train"]), len(split["val"]), len(split["test"])) == (24, 8, 8)
    with open(run / "history.csv", newline="") as fh:
        header = next(csv.reader(fh))
    assert "val_mae_heat_all" in header and "val_mae_dir_gap" in header
    assert not any("band_gap" in h or "formation" in h for h in header)

    assert main(["evaluate", "--run", str(run), "--out", str(tmp_path / "ev"), "--split", "val"]) == 0
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert set(metrics["regression"]) == {"heat_all", "dir_gap"}
    assert metrics["regression"]["heat_all"]["unit"] == "eV/atom" and metrics["regression"]["dir_gap"]["unit"] == "eV"
    assert set(metrics["classification"]) == {"wide_gap"}
    assert (tmp_path / "ev" / "parity_heat_all.png").is_file() and (tmp_path / "ev" / "parity_dir_gap.png").is_file()
    raw = (tmp_path / "ev" / "val_predictions.csv").read_bytes()
    assert b"\r" not in raw
    assert raw.split(b"\n")[0].decode() == ("name,entry_id,heat_all_pred,heat_all_true,dir_gap_pred,dir_gap_true,"
                                            "p_wide_gap")

    cif = next(p for p in (perov_cache.parent / "in").iterdir() if p.suffix == ".cif")
    out = tmp_path / "p.csv"
    assert main(["predict", "--model", str(run / "best.pt"), str(cif), "--out", str(out)]) == 0
    raw = out.read_bytes()
    assert b"\r" not in raw
    rows = list(csv.DictReader(raw.decode().splitlines()))
    assert list(rows[0]) == ["name", "heat_all", "dir_gap", "p_wide_gap"]
    assert 0.0 <= float(rows[0]["p_wide_gap"]) <= 1.0

    # the checkpoint records what it learnt and from which cache; the sidecar explains the CSV
    import hashlib

    best = torch.load(run / "best.pt", weights_only=True)
    manifest = json.loads((perov_cache / "manifest.json").read_text())
    rec = best["tasks"]
    assert rec["targets"] == ["heat_all", "dir_gap"] and rec["classes"] == ["wide_gap"]
    assert rec["units"] == {"heat_all": "eV/atom", "dir_gap": "eV"}
    assert rec["kinds"] == {"heat_all": "regression", "dir_gap": "regression", "wide_gap": "binary"}
    assert rec["std"] == pytest.approx(best["model"]["target_std"].tolist())
    assert best["coordinator"] == manifest["coordinator"] and best["synthetic"] is False
    side = json.loads((tmp_path / "p.json").read_text())
    assert side["units"] == {"heat_all": "eV/atom", "dir_gap": "eV", "p_wide_gap": "probability"}
    assert side["model_sha256"] == hashlib.sha256((run / "best.pt").read_bytes()).hexdigest()
    assert side["coordinator"] == {**side["coordinator"], **manifest["coordinator"]}
    assert side["coordinator_from"] == "checkpoint record" and side["synthetic"] is False
    assert side["code_version"]


def test_predict_builds_graphs_with_the_checkpoints_coordinator_parameters(perov_cache, tmp_path, monkeypatch):
    """A checkpoint whose cache was built with other coordinator settings gets graphs built with those."""
    from cgnn_dgl import predict

    run = tmp_path / "run"
    assert main(["train", "--config", str(_config(tmp_path / "c.yaml")), "--cache", str(perov_cache),
                 "--targets", "heat_all", "--out", str(run)]) == 0
    best = torch.load(run / "best.pt", weights_only=True)
    best["coordinator"] = {**best["coordinator"], "radius_factor": 1.35, "max_rounds": 7}
    torch.save(best, tmp_path / "other.pt")
    seen = []
    real = predict.build_inputs

    def spy(*a, **k):
        seen.append(k["params"])
        return real(*a, **k)

    monkeypatch.setattr(predict, "build_inputs", spy)
    cif = next(p for p in (perov_cache.parent / "in").iterdir() if p.suffix == ".cif")
    assert main(["predict", "--model", str(tmp_path / "other.pt"), str(cif), "--out", str(tmp_path / "p.csv")]) == 0
    assert (seen[-1].radius_factor, seen[-1].max_rounds) == (1.35, 7)
    assert json.loads((tmp_path / "p.json").read_text())["coordinator"]["radius_factor"] == 1.35
    # a checkpoint from before the record: the OQMD four, default coordinator parameters
    for key in ("tasks", "coordinator", "synthetic", "cache"):
        best.pop(key)
    torch.save(best, tmp_path / "old.pt")
    assert main(["predict", "--model", str(tmp_path / "old.pt"), str(cif), "--out", str(tmp_path / "q.csv")]) == 0
    assert seen[-1] == predict.coordinator_params_for({"format": "cgnn-dgl-checkpoint"})
    assert json.loads((tmp_path / "q.json").read_text())["coordinator_from"].startswith("defaults")


def test_set_targets_and_a_target_the_cache_lacks(perov_cache, tmp_path, capsys):
    cfg = _config(tmp_path / "c.yaml")
    assert main(["train", "--config", str(cfg), "--cache", str(perov_cache), "--set",
                 "model.targets=[heat_all, dir_gap]", "--out", str(tmp_path / "r1")]) == 0
    best = torch.load(tmp_path / "r1" / "best.pt", weights_only=True)
    assert best["model_config"]["targets"] == ["heat_all", "dir_gap"]
    capsys.readouterr()
    rc = main(["train", "--config", str(cfg), "--cache", str(perov_cache), "--targets", "heat_all,bulk_modulus",
               "--out", str(tmp_path / "r2")])
    err = capsys.readouterr().err.strip()
    assert rc != 0 and len(err.splitlines()) == 1
    assert "has no target bulk_modulus; it holds heat_all, dir_gap, wide_gap" in err
    # the default config asks for the OQMD four, which this cache does not hold
    rc = main(["train", "--config", str(cfg), "--cache", str(perov_cache), "--out", str(tmp_path / "r3")])
    err = capsys.readouterr().err.strip()
    assert rc != 0 and "has no target formation_energy, volume_per_atom, band_gap, magnetization" in err


def test_binary_task_derived_by_a_rule_on_any_target():
    cfg = ModelConfig(targets=("heat_all", "e_hull"), binary_targets=("stable", "wide"))
    train = TrainConfig(binary_from={"stable": "e_hull < 0.05", "wide": "heat_all > 1.5"})
    tasks = TaskSet.from_configs(cfg, train)
    assert tasks.label_columns == ("heat_all", "e_hull")  # derived labels need no column of their own
    y = torch.tensor([[1.0, 0.0], [2.0, 0.05], [1.6, 0.2]])
    mask = torch.tensor([[True, True], [True, True], [False, True]])
    labels, lmask = tasks.binary_labels(y, mask)
    assert labels[:, 0].tolist() == [1.0, 0.0, 0.0] and lmask[:, 0].tolist() == [True, True, True]
    assert labels[:, 1].tolist() == [0.0, 1.0, 1.0] and lmask[:, 1].tolist() == [True, True, False]
    m = tasks.metrics(np.zeros((3, 2)), y.numpy(), mask.numpy(), np.array([[0.9, 0.1], [0.2, 0.8], [0.4, 0.5]]))
    assert m["classification"]["stable"]["label_threshold"] == "e_hull < 0.05"
    assert (m["classification"]["stable"]["tp"], m["classification"]["stable"]["tn"]) == (1, 2)
    with pytest.raises(UsageError, match="'band_gap' is not a target of the model"):
        TaskSet.from_configs(cfg, TrainConfig(binary_from={"stable": "band_gap > 0"}))
    with pytest.raises(UsageError, match=r"is not in model\.binary_targets"):
        TaskSet.from_configs(cfg, TrainConfig(binary_from={"metal": "e_hull > 0"}))
    with pytest.raises(UsageError, match="is not a rule like"):
        TrainConfig(binary_from={"stable": "e_hull <= 0.05"}).validate(("e_hull",))


def test_train_with_a_rule_derived_head(perov_cache, tmp_path):
    cfg = _config(tmp_path / "c.yaml", binary_targets=["low_heat"])
    run = tmp_path / "run"
    assert main(["train", "--config", str(cfg), "--cache", str(perov_cache), "--targets", "heat_all,dir_gap",
                 "--set", "train.binary_from={low_heat: 'heat_all < 1.0'}", "--out", str(run)]) == 0
    best = torch.load(run / "best.pt", weights_only=True)
    assert best["tasks"]["binary"] == [{"name": "low_heat", "source": "heat_all", "threshold": 1.0, "below": True,
                                        "head": True}]
    assert main(["evaluate", "--run", str(run), "--out", str(tmp_path / "ev"), "--split", "train"]) == 0
    got = json.loads((tmp_path / "ev" / "metrics.json").read_text())["classification"]["low_heat"]
    from cgnn_dgl.cache import load_packed

    packed = load_packed(perov_cache)
    split = json.loads((run / "split.json").read_text())
    key = split["key"]
    rows = [i for i, (e, n) in enumerate(zip(packed.entry_id, packed.names))
            if (int(e) if key == "entry_id" else n) in set(split["train"])]
    heat = packed.y[rows, packed.targets.index("heat_all")]
    assert got["n"] == len(rows) and got["positives"] == int((heat < 1.0).sum())
