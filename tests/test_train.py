"""`cgnn train`: config handling, masked multitask loss, exact resume (also after kill -9), DDP, devices."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import sigkill_after_lines

from cgnn_dgl.config import RunConfig, TrainConfig, apply_overrides, load_run_config
from cgnn_dgl.errors import UsageError

REPO = Path(__file__).resolve().parents[1]

TINY_MODEL = {"n_hidden_feat": 8, "n_graph_feat": 16, "n_conv": 2, "n_fc": 1, "use_batch_norm": True,
              "full_pooling": True, "gated_pooling": True}


# --------------------------------------------------------------------------------------------------
# helpers shared with test_evaluate / test_predict


def synthetic_targets(numbers: np.ndarray, lattice: np.ndarray, rng) -> tuple[np.ndarray, np.ndarray]:
    """Learnable fake labels from the composition (+ the real volume per atom); some labels missing."""
    z = numbers.astype(float)
    y = np.array([
        np.mean(np.sin(z / 7.0)) - 0.2,                      # "formation energy"
        abs(np.linalg.det(lattice)) / len(z),                # volume per atom
        max(0.0, 2.0 * np.mean(np.cos(z / 5.0))),            # "band gap" (zero for about half)
        float(np.mean((z >= 24) & (z <= 28))),               # "magnetization"
    ])
    mask = rng.random(4) > 0.15
    mask[0] = True
    return y, mask


def write_cache(path: Path, rows: list[dict], seed: int = 0, labelled: bool = True, unlabelled=(),
                kind: str = "test") -> Path:
    """A real on-disk cache (CacheWriter) from reference neighbour lists, with synthetic targets (none
    for the target columns ``unlabelled``, e.g. (3,): no magnetization labels); ``kind`` is the manifest's
    source kind (``files`` as `cgnn graphs` writes it)."""
    from cgnn_dgl.cache import Built, CacheWriter, ShardStream

    rng = np.random.default_rng(seed)
    writer = CacheWriter(path, source={"kind": kind, "n": len(rows), "seed": seed},
                         params={"radius_factor": 1.2, "cc_cutoff": 0.03, "max_rounds": 10}, shard_size=64)
    stream = ShardStream(writer)
    for key, row in enumerate(rows):
        numbers = np.asarray(row["numbers"], np.int64)
        counts = np.array([len(n) for n in row["neighbors"]], np.int64)
        nbr = np.array([i for n in row["neighbors"] for i in n], np.int64)
        y, mask = synthetic_targets(numbers, np.asarray(row["lattice"]), rng)
        mask = mask if labelled else np.zeros_like(mask)
        mask[list(unlabelled)] = False
        stream.add(Built(key, row["name"], numbers, counts, nbr, np.where(mask, y, 0.0), mask))
    stream.flush()
    writer.close()
    return path


def usable_rows(dev_corpus, n: int, sources=("perov_val", "aflow", "dcdft")) -> list[dict]:
    from cgnn_dgl.model.species import SPECIES_Z

    ok = set(SPECIES_Z)
    out = [r for r in dev_corpus if r["source"] in sources and r["error"] is None
           and all(z in ok for z in r["numbers"]) and len(r["numbers"]) <= 12]
    return out[:n]


def tiny_config(cache: Path, out: Path, **train) -> RunConfig:
    t = {"epochs": 3, "batch_size": 32, "milestones": [2], "lr": 3e-3, "cache": str(cache), "out_dir": str(out),
         "progress": False, **train}
    return RunConfig.from_dict({"model": dict(TINY_MODEL), "train": t})


def weights(path: Path) -> dict:
    return torch.load(path, weights_only=True)["model"]


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def cache(tmp_path_factory, dev_corpus) -> Path:
    return write_cache(tmp_path_factory.mktemp("cache") / "c", usable_rows(dev_corpus, 240))


# --------------------------------------------------------------------------------------------------
# configuration


def test_config_defaults_are_the_reference_recipe():
    t = TrainConfig()
    assert (t.optimizer, t.lr, t.weight_decay, t.batch_size, t.milestones, t.gamma, t.seed) == \
        ("adam", 1e-3, 1e-6, 512, [250], 0.1, 12345)
    cfg = load_run_config(REPO / "configs" / "reference_fe.yaml")
    assert cfg.model.targets == ("formation_energy",) and cfg.train.standardize is False
    from cgnn_dgl.model import CGNN

    assert CGNN(cfg.model).n_parameters() == 212_833


def test_set_overrides_parse_yaml_scalars():
    cfg = load_run_config(REPO / "configs" / "benchmark.yaml",
                          ["train.lr=5e-4", "model.n_conv=3", "train.milestones=[10, 20]", "train.patience=4",
                           "train.standardize=false", "model.targets=[band_gap]", "train.split_file=null"])
    assert cfg.train.lr == 5e-4 and cfg.model.n_conv == 3 and cfg.train.milestones == [10, 20]
    assert cfg.train.standardize is False and cfg.model.targets == ("band_gap",) and cfg.train.patience == 4
    assert apply_overrides({}, ["train.task_weights.band_gap=2"]) == {"train": {"task_weights": {"band_gap": 2}}}


@pytest.mark.parametrize("overrides,needle", [
    (["train.lrr=1"], "lrr"),
    (["model.n_convv=1"], "n_convv"),
    (["train.epochs=many"], "epochs"),
    (["train.optimizer=rmsprop"], "optimizer"),
    (["train.targets=[band_gap, spin]"], "spin"),
    (["lr=1"], "model."),
    (["train.split_file=/nonexistent/split.json"], "split_file"),
])
def test_bad_configs_raise_usage_error(overrides, needle):
    with pytest.raises(UsageError, match=needle.replace(".", r"\.")):
        load_run_config(REPO / "configs" / "tiny.yaml", overrides)


def _cli(*args, env=None, cwd=REPO, timeout=300):
    return subprocess.run([sys.executable, "-m", "cgnn_dgl.cli", *args], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=timeout)


def test_cli_bad_config_one_line_exit_2(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {preset: benchmark}\ntrain: {epochs: 3, learning_rate: 0.1}\n")
    for args in (["train", "--config", str(bad), "--out", str(tmp_path / "r")],
                 ["train", "--config", str(tmp_path / "missing.yaml")],
                 ["train", "--config", str(REPO / "configs" / "tiny.yaml"), "--set", "train.batch_size=big"],
                 ["train", "--config", str(REPO / "configs" / "tiny.yaml"), "--cache", str(tmp_path / "nocache"),
                  "--out", str(tmp_path / "r2")]):
        r = _cli(*args)
        assert r.returncode == 2, (args, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr, r.stderr
        assert r.stderr.startswith("cgnn train: error:")


# --------------------------------------------------------------------------------------------------
# loss and training behaviour


LOSS_FUNCTIONS = {"mse": torch.nn.functional.mse_loss, "l1": torch.nn.functional.l1_loss,
                  "huber": torch.nn.functional.huber_loss}


@pytest.mark.parametrize("loss", ["mse", "l1", "huber"])
def test_single_target_loss_matches_torch(cache, tmp_path, loss):
    """mse (the default) is the reference's MSELoss exactly; l1 and huber are torch's own."""
    from cgnn_dgl.batching import iter_batches
    from cgnn_dgl.train import Trainer, batch_tensors, load_cache, make_split

    extra = {} if loss == "mse" else {"loss": loss}
    cfg = tiny_config(cache, tmp_path, standardize=False, batch_size=1000, **extra)
    cfg.model = cfg.model.replace(targets=["formation_energy"])
    packed = load_cache(str(cache))
    split = make_split(packed, cfg.train)
    tr = Trainer(cfg, tmp_path, packed, split)
    res = tr._pass(split["val"], train=False, desc="val")
    tr.model.eval()
    _, g = next(iter_batches(packed, split["val"], 1000))
    z, gi, y, mask = batch_tensors(g, [0], torch.device("cpu"), "auto")
    with torch.no_grad():
        pred = tr.model(z, gi).reshape(-1)
    assert mask.all()
    assert res["loss"] == pytest.approx(float(LOSS_FUNCTIONS[loss](pred, y.reshape(-1))), rel=1e-5)
    assert res["mae"][0] == pytest.approx(float((pred - y.reshape(-1)).abs().mean()), rel=1e-5)


def test_unknown_loss_is_a_usage_error(cache, tmp_path):
    with pytest.raises(UsageError, match="loss"):
        tiny_config(cache, tmp_path, loss="hinge").train.validate()
    with pytest.raises(UsageError, match="target_loss"):
        tiny_config(cache, tmp_path, target_loss={"gap": "l1"}).train.validate()


def test_masked_targets_do_not_leak(cache, tmp_path):
    """Heads of targets left out of train.targets get exactly zero gradient (so Adam never moves them)."""
    from cgnn_dgl.train import Trainer, load_cache, make_split

    cfg = tiny_config(cache, tmp_path, targets=["formation_energy", "volume_per_atom"], epochs=1, weight_decay=0.0)
    packed = load_cache(str(cache))
    split = make_split(packed, cfg.train)
    tr = Trainer(cfg, tmp_path, packed, split)
    w0 = tr.model.regression.linear.weight.detach().clone()
    b0 = tr.model.regression.linear.bias.detach().clone()
    tr._pass(split["train"], train=True, desc="t")
    w1 = tr.model.regression.linear.weight.detach()
    b1 = tr.model.regression.linear.bias.detach()
    assert torch.equal(w1[2:], w0[2:]) and torch.equal(b1[2:], b0[2:])  # band_gap, magnetization untouched
    assert (w1[:2] - w0[:2]).abs().max() > 1e-4  # the used heads did train


def test_training_writes_run_folder_and_is_deterministic(cache, tmp_path):
    from cgnn_dgl.train import train_run

    a = train_run(tiny_config(cache, tmp_path / "a"), tmp_path / "a")
    train_run(tiny_config(cache, tmp_path / "b"), tmp_path / "b")
    for f in ("config.yaml", "split.json", "last.pt", "best.pt", "history.csv"):
        assert (tmp_path / "a" / f).is_file(), f
    assert a["epochs"] == 3
    assert same_weights(weights(tmp_path / "a" / "last.pt"), weights(tmp_path / "b" / "last.pt"))
    hist = (tmp_path / "a" / "history.csv").read_text().splitlines()
    assert len(hist) == 4 and hist[0].startswith("epoch,lr,time_s,train_loss,val_loss")
    ck = torch.load(tmp_path / "a" / "last.pt", weights_only=True)
    for key in ("model_config", "optimizer", "scheduler", "rng", "epoch", "best_score", "target_mean",
                "target_std", "package_version", "history"):
        assert key in ck, key
    # LR drops by gamma at the milestone (epoch 2 -> third epoch runs at lr * 0.1)
    lrs = [float(line.split(",")[1]) for line in hist[1:]]
    assert lrs[0] == pytest.approx(3e-3) and lrs[2] == pytest.approx(3e-4)
    with pytest.raises(UsageError, match="--resume"):
        train_run(tiny_config(cache, tmp_path / "a"), tmp_path / "a")


def test_resume_in_process_is_exact(cache, tmp_path):
    from cgnn_dgl.train import train_run

    train_run(tiny_config(cache, tmp_path / "straight", epochs=4), tmp_path / "straight")
    train_run(tiny_config(cache, tmp_path / "split", epochs=2), tmp_path / "split")
    train_run(tiny_config(cache, tmp_path / "split", epochs=4), tmp_path / "split", resume=True)
    assert same_weights(weights(tmp_path / "straight" / "last.pt"), weights(tmp_path / "split" / "last.pt"))
    assert same_weights(weights(tmp_path / "straight" / "best.pt"), weights(tmp_path / "split" / "best.pt"))
    h1 = (tmp_path / "straight" / "history.csv").read_text().splitlines()
    h2 = (tmp_path / "split" / "history.csv").read_text().splitlines()
    strip = lambda rows: [",".join(c for i, c in enumerate(r.split(",")) if i != 2) for r in rows]  # noqa: E731
    assert strip(h1) == strip(h2)  # everything but the wall time


def test_early_stopping(cache, tmp_path):
    from cgnn_dgl.train import train_run

    s = train_run(tiny_config(cache, tmp_path / "r", epochs=10, patience=2, min_delta=1e9), tmp_path / "r")
    assert s["epochs"] == 3 and s["best_epoch"] == 1


def test_graph_index_moves_only_index_tensors_never_the_dgl_graph(monkeypatch):
    """With the torch backend, GraphIndex.from_graph must put its index tensors on the requested device
    and leave the DGL graph where it is: DGLGraph.to() copies every feature to the device, which is what
    the index exists to avoid. The 'meta' device stands in for a GPU, so this runs without one."""
    import dgl

    from cgnn_dgl.graph import graph_from_neighbors
    from cgnn_dgl.graph_ops import GraphIndex

    g = dgl.batch([graph_from_neighbors([8, 1, 1], [[1, 2], [0], [0]]),
                   graph_from_neighbors([11, 17], [[1], [0]])])
    calls = []

    def refuse(self, *a, **k):
        calls.append((a, k))
        raise AssertionError(f"DGLGraph.to{a} was called")

    monkeypatch.setattr(dgl.DGLGraph, "to", refuse)  # patched after building: DGL calls .to() inside batch
    gi = GraphIndex.from_graph(g, device="meta", backend="torch")
    assert calls == []
    assert gi.dgl_graph is None and g.device == torch.device("cpu")
    for t in (gi.bond_src, gi.bond_dst, gi.atom_crystal, gi.atom_count):
        assert t.device.type == "meta"
    assert (gi.n_atoms, gi.n_crystals) == (5, 2) and gi.bond_src.shape == (6,)


def test_training_never_moves_the_dgl_graph(cache, tmp_path, monkeypatch):
    """No module of ours calls DGLGraph.to() during a training run with the torch backend (DGL itself
    calls .to(None) internally when batching, so only calls from cgnn_dgl count)."""
    import inspect

    import dgl

    original = dgl.DGLGraph.to
    calls = []

    def guarded(self, *a, **k):
        caller = inspect.stack()[1].filename
        if f"{os.sep}cgnn_dgl{os.sep}" in caller:
            calls.append((caller, a, k))
        return original(self, *a, **k)

    monkeypatch.setattr(dgl.DGLGraph, "to", guarded)
    from cgnn_dgl.train import train_run

    s = train_run(tiny_config(cache, tmp_path / "r", epochs=1, backend="torch"), tmp_path / "r")
    assert s["epochs"] == 1
    assert calls == []


def test_cuda_without_gpu_is_a_usage_error(cache, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    from cgnn_dgl.train import train_run

    with pytest.raises(UsageError, match="CUDA"):
        train_run(tiny_config(cache, tmp_path / "r", device="cuda"), tmp_path / "r")


# --------------------------------------------------------------------------------------------------
# kill -9 and resume, in a real subprocess


def test_sigkill_then_resume_matches_uninterrupted_run(cache, tmp_path):
    from cgnn_dgl.train import train_run

    epochs = 12
    cfg = tiny_config(cache, tmp_path / "straight", epochs=epochs, batch_size=16, num_threads=1)
    cfg_file = tmp_path / "cfg.yaml"
    cfg.train.out_dir = str(tmp_path / "killed")
    cfg.save(cfg_file)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "cgnn_dgl.cli", "train", "--config", str(cfg_file), "--out",
                             str(tmp_path / "killed")], cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    hist = tmp_path / "killed" / "history.csv"
    killed_after = sigkill_after_lines(proc, hist, 3, timeout=240)  # >= 2 epochs done
    assert killed_after is not None, f"run ended before it could be killed: {proc.stderr.read().decode()[-2000:]}"
    assert killed_after < epochs
    r = _cli("train", "--out", str(tmp_path / "killed"), "--resume", env=env)
    assert r.returncode == 0, r.stderr
    ck = torch.load(tmp_path / "killed" / "last.pt", weights_only=True)
    assert ck["epoch"] == epochs
    torch.set_num_threads(1)  # same thread count as the subprocess
    try:
        cfg.train.out_dir = str(tmp_path / "straight")
        train_run(cfg, tmp_path / "straight")
    finally:
        torch.set_num_threads(max(1, os.cpu_count() or 1))
    assert same_weights(ck["model"], weights(tmp_path / "straight" / "last.pt"))
    assert same_weights(weights(tmp_path / "killed" / "best.pt"), weights(tmp_path / "straight" / "best.pt"))


# --------------------------------------------------------------------------------------------------
# DDP with gloo on CPU


def test_ddp_two_processes_gloo(cache, tmp_path):
    cfg = tiny_config(cache, tmp_path / "ddp", epochs=2, record_seen=True, batch_size=32)
    cfg_file = tmp_path / "ddp.yaml"
    cfg.save(cfg_file)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                        "--master_port", str(29500 + os.getpid() % 1000), "-m", "cgnn_dgl.cli", "train",
                        "--config", str(cfg_file), "--out", str(tmp_path / "ddp")],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stderr[-3000:]
    seen0 = (tmp_path / "ddp" / "seen_rank0.txt").read_text().split()
    seen1 = (tmp_path / "ddp" / "seen_rank1.txt").read_text().split()
    split = json.loads((tmp_path / "ddp" / "split.json").read_text())
    train_ids = {str(k) for k in split["train"]}
    assert abs(len(seen0) - len(seen1)) == 0
    assert len(set(seen0) & set(seen1)) <= 1  # at most the one padding sample when the count is odd
    assert set(seen0) | set(seen1) == train_ids
    ck = torch.load(tmp_path / "ddp" / "last.pt", weights_only=True)
    assert ck["epoch"] == 2 and ck["world_size"] == 2
    assert all(torch.isfinite(v).all() for v in ck["model"].values() if v.is_floating_point())
    assert np.isfinite(ck["best_score"])
    # rank 0 alone writes: one history with one row per epoch
    assert len((tmp_path / "ddp" / "history.csv").read_text().splitlines()) == 3


# --------------------------------------------------------------------------------------------------
# learning on real DFT data (perov5), small and fast


def test_learns_perov5_better_than_mean(shared, tmp_path):
    sys.path.insert(0, str(REPO / "bench"))
    try:
        from learn_perov5 import build_perov5_packed, run_learning_check
    finally:
        sys.path.pop(0)
    packed = build_perov5_packed(shared / "data" / "perov5" / "train.csv", limit=900, workers=1)
    res = run_learning_check(packed, tmp_path, epochs=25, model=dict(n_hidden_feat=32, n_graph_feat=64, n_conv=3,
                                                                     n_fc=2, use_batch_norm=True, full_pooling=True,
                                                                     gated_pooling=True),
                             batch_size=64, lr=3e-3, progress=False)
    print({k: v for k, v in res.items() if isinstance(v, dict)})
    for target in ("formation_energy", "volume_per_atom"):
        assert res[target]["model_mae"] < 0.85 * res[target]["mean_mae"], res


def test_single_class_classification_tasks_do_not_pull(caplog):
    """A classification head whose training labels are one class (or none) gets loss weight 0, with a warning."""
    import logging

    from cgnn_dgl.train import class_task_weights

    t = TrainConfig()
    targets = ["formation_energy", "band_gap", "magnetization"]
    y = np.array([[0.1, 0.0, 0.0], [0.2, 1.5, 0.0], [0.3, 0.0, 0.0], [0.4, 2.0, 0.01]])
    m = np.ones_like(y, dtype=bool)
    with caplog.at_level(logging.WARNING, logger="cgnn_dgl.train"):
        w = class_task_weights(y, m, targets, t)
    assert w.tolist() == [1.0, 0.0]  # gaps on both sides of 0 eV; every moment below 0.05 μB/atom
    assert "magnetic: only class 0 (4 labels)" in caplog.text
    m[:, 1] = False  # no band-gap labels at all
    assert class_task_weights(y, m, targets, t).tolist() == [0.0, 0.0]
    y[3, 2] = 0.5
    m[:, 1] = True
    assert class_task_weights(y, m, targets, t).tolist() == [1.0, 1.0]
    assert class_task_weights(y, m, ["formation_energy"], t).tolist() == [0.0, 0.0]  # no head inputs


def test_detached_classification_heads_leave_the_regression_untouched(cache, tmp_path):
    """model.classification_detach: the BCE loss trains the logit layer only, so trunk and regression
    weights equal those of the same run without classification heads, bit for bit (CPU); without the
    stop-gradient the classification loss changes them."""
    from cgnn_dgl.train import train_run

    def run(name, **model):
        cfg = tiny_config(cache, tmp_path / name)
        cfg = RunConfig.from_dict({"model": {**cfg.model.to_dict(), **model}, "train": cfg.train.to_dict()})
        train_run(cfg, tmp_path / name)
        return weights(tmp_path / name / "last.pt")

    plain = run("plain")
    detached = run("detached", classification_heads=True, classification_detach=True)
    attached = run("attached", classification_heads=True)
    assert any(k.startswith("classification.") for k in detached)
    assert same_weights(plain, {k: v for k, v in detached.items() if not k.startswith("classification.")})
    assert not same_weights(plain, {k: v for k, v in attached.items() if not k.startswith("classification.")})
    assert not torch.equal(detached["classification.linear.weight"], attached["classification.linear.weight"])
    # a hidden layer in the detached head: still bit-identical regression, and the head has two layers
    hidden = run("hidden", classification_heads=True, classification_detach=True, classification_hidden=8)
    assert hidden["classification.hidden.weight"].shape[0] == 8
    assert same_weights(plain, {k: v for k, v in hidden.items() if not k.startswith("classification.")})
    # train.classification_balance reweights the head's loss only: the regression stays bit-identical
    cfg = tiny_config(cache, tmp_path / "balanced")
    cfg = RunConfig.from_dict({"model": {**cfg.model.to_dict(), "classification_heads": True,
                                         "classification_detach": True},
                               "train": {**cfg.train.to_dict(), "classification_balance": True}})
    train_run(cfg, tmp_path / "balanced")
    balanced = weights(tmp_path / "balanced" / "last.pt")
    assert same_weights(plain, {k: v for k, v in balanced.items() if not k.startswith("classification.")})
    assert not torch.equal(detached["classification.linear.weight"], balanced["classification.linear.weight"])
    with pytest.raises(UsageError, match="classification_hidden"):
        RunConfig.from_dict({"model": {**TINY_MODEL, "classification_hidden": 8}, "train": {}})
    with pytest.raises(UsageError, match="classification_detach"):
        RunConfig.from_dict({"model": {**TINY_MODEL, "classification_detach": True}, "train": {}})


# --------------------------------------------------------------------------------------------------
# runs that would learn nothing are refused (issue 8, defect 6)


def test_zero_epochs_is_a_one_line_error_exit_2(cache, tmp_path):
    r = _cli("train", "--config", str(REPO / "configs" / "tiny.yaml"), "--cache", str(cache),
             "--out", str(tmp_path / "r"), "--set", "train.epochs=0", "--set", "train.progress=false")
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert len(r.stderr.strip().splitlines()) == 1 and "train.epochs is 0" in r.stderr, r.stderr
    assert "best epoch" not in r.stdout and not (tmp_path / "r").exists()


def test_no_labels_for_the_targets_is_an_error(dev_corpus, tmp_path):
    from cgnn_dgl.errors import CgnnError
    from cgnn_dgl.train import train_run

    c = write_cache(tmp_path / "c", usable_rows(dev_corpus, 60), labelled=False)
    with pytest.raises(CgnnError, match="has a label for formation_energy") as e:
        train_run(tiny_config(c, tmp_path / "r", epochs=1), tmp_path / "r")
    assert "train.targets" in str(e.value) and not (tmp_path / "r" / "best.pt").exists()


def test_empty_validation_split_is_an_error_unless_chosen(dev_corpus, tmp_path):
    from cgnn_dgl.errors import CgnnError
    from cgnn_dgl.train import train_run

    c = write_cache(tmp_path / "c", usable_rows(dev_corpus, 6))  # < 10 formulas: int(0.1 n) = 0 val
    with pytest.raises(CgnnError, match=r"validation split is empty \(\d+ train / 0 val") as e:
        train_run(tiny_config(c, tmp_path / "r", epochs=1), tmp_path / "r")
    assert "train.val_fraction=0" in str(e.value)
    s = train_run(tiny_config(c, tmp_path / "r0", epochs=1, val_fraction=0.0), tmp_path / "r0")
    assert s["best_epoch"] == 1 and (tmp_path / "r0" / "best.pt").is_file()


def test_a_constant_target_is_warned_about_once(dev_corpus, tmp_path, monkeypatch, caplog):
    """Issue 8.5: a target constant in the training split (magnetization, 0 for all of Perov-5) trained
    with no word; now one warning at the start names it and its value."""
    import logging
    import sys

    from cgnn_dgl.train import train_run

    plain = synthetic_targets

    def zero_magnetization(numbers, lattice, rng):
        y, mask = plain(numbers, lattice, rng)
        y[3] = 0.0
        return y, mask

    c = write_cache(tmp_path / "c0", usable_rows(dev_corpus, 60))
    with caplog.at_level(logging.WARNING, logger="cgnn_dgl.train"):
        train_run(tiny_config(c, tmp_path / "r0", epochs=1), tmp_path / "r0")
    assert not [r for r in caplog.records if "constant" in r.getMessage()]
    caplog.clear()
    monkeypatch.setattr(sys.modules[__name__], "synthetic_targets", zero_magnetization)
    c = write_cache(tmp_path / "c", usable_rows(dev_corpus, 60))
    with caplog.at_level(logging.WARNING, logger="cgnn_dgl.train"):
        train_run(tiny_config(c, tmp_path / "r", epochs=2), tmp_path / "r")
    warned = [r.getMessage() for r in caplog.records if "constant" in r.getMessage()]
    assert len(warned) == 1 and "magnetization = 0" in warned[0], warned
    assert "formation_energy" not in warned[0]


# --------------------------------------------------------------------------------------------------
# precise batch norm (train.precise_bn_batch_size)


def test_precise_bn_statistics_are_the_training_split_average(cache, tmp_path):
    """With one batch covering the training split, each batch norm's running mean / variance equal the
    mean / unbiased variance of its input over the whole split. The weights are those of the run
    without it, bit for bit (running statistics do not enter a train-mode forward), while the plain
    run's statistics (a momentum trace) differ."""
    from cgnn_dgl.train import Trainer, load_cache, make_split

    packed = load_cache(str(cache))

    def fit(name, **train):
        cfg = tiny_config(cache, tmp_path / name, epochs=2, **train)
        (tmp_path / name).mkdir()
        trainer = Trainer(cfg, tmp_path / name, packed, make_split(packed, cfg.train))
        trainer.fit()
        return trainer

    plain = fit("plain")
    precise = fit("precise", precise_bn_batch_size=100_000)
    p_state, q_state = plain.model.state_dict(), precise.model.state_dict()
    params = {n for n, _ in plain.model.named_parameters()}
    assert all(torch.equal(p_state[n], q_state[n]) for n in params)

    model = precise.model
    bns = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.BatchNorm1d)}
    assert bns
    seen: dict[str, torch.Tensor] = {}
    hooks = [m.register_forward_hook(lambda mod, inp, out, n=n: seen.__setitem__(n, inp[0].detach()))
             for n, m in bns.items()]
    stats = {n: (m.running_mean.clone(), m.running_var.clone()) for n, m in bns.items()}
    train_idx = precise.split["train"]
    z, gi, _, _ = next(precise._batches(train_idx, len(train_idx)))
    model.train()
    with torch.no_grad():
        model(z, gi)
    for h in hooks:
        h.remove()
    for n, (mean, var) in stats.items():
        torch.testing.assert_close(mean, seen[n].mean(0), rtol=1e-5, atol=1e-6, msg=n)
        torch.testing.assert_close(var, seen[n].var(0, unbiased=True), rtol=1e-4, atol=1e-6, msg=n)
    assert any(not torch.allclose(p_state[f"{n}.running_mean"], stats[n][0]) for n in bns)
    with pytest.raises(UsageError, match="precise_bn_batch_size"):
        TrainConfig(precise_bn_batch_size=-1).validate()


def test_member_split_bootstraps_only_the_training_part():
    from cgnn_dgl.train import member_split

    split = {"train": np.arange(100, 200), "val": np.arange(10), "test": np.arange(10, 20)}
    assert member_split(split, TrainConfig()) is split
    a = member_split(split, TrainConfig(bootstrap=True, seed=3))
    b = member_split(split, TrainConfig(bootstrap=True, seed=3))
    c = member_split(split, TrainConfig(bootstrap=True, seed=4))
    assert np.array_equal(a["train"], b["train"]) and not np.array_equal(a["train"], c["train"])
    assert len(a["train"]) == 100 and len(np.unique(a["train"])) < 100  # with replacement
    assert set(a["train"]) <= set(split["train"])
    assert a["val"] is split["val"] and a["test"] is split["test"]


@pytest.mark.filterwarnings("ignore:No Pauling electronegativity")
def test_member_split_crossfit_leaves_out_its_fold(cache):
    """train.crossfit: member k trains on the training part minus fold k; the folds partition the training
    part, group it by formula, and val / test are untouched."""
    from cgnn_dgl.ensemble import train_folds
    from cgnn_dgl.train import load_cache, member_split

    packed = load_cache(cache)
    formulas = packed.formulas()
    split = {"train": np.arange(40, len(packed)), "val": np.arange(20), "test": np.arange(20, 40)}
    left_out = []
    for k in range(3):
        part = member_split(split, TrainConfig(crossfit_fold=k, crossfit_folds=3), packed)
        assert part["val"] is split["val"] and part["test"] is split["test"]
        out = np.setdiff1d(split["train"], part["train"])
        assert set(part["train"]) <= set(split["train"]) and len(out) > 0
        assert not {formulas[i] for i in out} & {formulas[i] for i in part["train"]}  # no formula on both sides
        left_out.append(out)
    np.testing.assert_array_equal(np.sort(np.concatenate(left_out)), split["train"])  # a partition
    folds = train_folds(packed, split["train"], 3, TrainConfig().split_seed)
    for k in range(3):
        np.testing.assert_array_equal(left_out[k], split["train"][folds == k])
    with pytest.raises(ValueError, match="needs the cache"):
        member_split(split, TrainConfig(crossfit_fold=0, crossfit_folds=3))


def test_crossfit_config_is_checked():
    with pytest.raises(UsageError, match=r"crossfit needs train\.ensemble >= 2"):
        TrainConfig(crossfit=True).validate()
    with pytest.raises(UsageError, match="choose one"):
        TrainConfig(crossfit=True, bootstrap=True, ensemble=3).validate()
    with pytest.raises(UsageError, match="is not one of the 3 folds"):
        TrainConfig(crossfit_fold=3, crossfit_folds=3).validate()
    with pytest.raises(UsageError, match="would leave out all the data"):
        TrainConfig(crossfit_fold=0, crossfit_folds=1).validate()
    with pytest.raises(UsageError, match="each member needs a fold of its own"):
        TrainConfig(crossfit=True, ensemble=3, crossfit_folds=2).validate()
    TrainConfig(crossfit=True, ensemble=3).validate()
    TrainConfig(crossfit=True, ensemble=3, crossfit_folds=6).validate()
    TrainConfig(crossfit=True, crossfit_fold=2, crossfit_folds=3).validate()  # a member's own config


def test_a_lone_last_training_batch_is_dropped(cache, tmp_path):
    """33 training crystals at batch 32 (and precise batch norm in batches of 16) leave a batch of one
    crystal, which batch norm cannot normalise in training mode: that crystal sits the epoch out."""
    from cgnn_dgl.train import Trainer, drop_lone_last, load_cache

    assert drop_lone_last(np.arange(33), 32).tolist() == list(range(32))
    assert drop_lone_last(np.arange(34), 32).tolist() == list(range(34))
    assert drop_lone_last(np.arange(1), 32).tolist() == [0]
    packed = load_cache(str(cache))
    split = {"train": np.arange(33), "val": np.arange(33, 45), "test": np.arange(45, 50)}
    cfg = tiny_config(cache, tmp_path / "r", epochs=2, precise_bn_batch_size=16)
    (tmp_path / "r").mkdir()
    summary = Trainer(cfg, tmp_path / "r", packed, split).fit()
    assert summary["epochs"] == 2 and np.isfinite(summary["best_score"])


def test_valence_flags_and_hurdle_leave_the_regression_untouched(cache, tmp_path):
    """model.valence_features: classification and model.hurdle_targets on detached heads train the heads
    and the conditional output only: trunk and regression weights equal the plain run's bit for bit, the
    conditional output trains, and the checkpoint records both options."""
    from cgnn_dgl.train import train_run

    def run(name, **model):
        cfg = tiny_config(cache, tmp_path / name)
        cfg = RunConfig.from_dict({"model": {**cfg.model.to_dict(), **model}, "train": cfg.train.to_dict()})
        train_run(cfg, tmp_path / name)
        return torch.load(tmp_path / name / "last.pt", weights_only=True)

    plain = run("plain")["model"]
    ck = run("hurdle", classification_heads=True, classification_detach=True, valence_features="classification",
             hurdle_targets=["band_gap"])
    both = ck["model"]
    heads = ("classification.", "conditional.", "valence.")
    assert same_weights(plain, {k: v for k, v in both.items() if not k.startswith(heads)})
    assert both["conditional.linear.weight"].shape[0] == 1
    torch.manual_seed(0)
    from cgnn_dgl.model import CGNN

    fresh = CGNN(RunConfig.from_dict({"model": ck["model_config"]}).model).state_dict()
    assert not torch.equal(fresh["conditional.linear.weight"], both["conditional.linear.weight"])
    assert ck["model_config"]["hurdle_targets"] == ["band_gap"]
    assert ck["model_config"]["valence_features"] == "classification"


def test_hurdle_loss_reads_positive_crystals_only():
    from cgnn_dgl.train import hurdle_loss

    ys = torch.tensor([[0.0, 2.0], [0.0, -1.0], [0.0, 3.0], [0.0, 5.0]])
    maskf = torch.tensor([[1.0, 1.0], [1.0, 1.0], [1.0, 1.0], [1.0, 0.0]])
    labels = torch.tensor([[1.0], [0.0], [1.0], [1.0]])  # crystal 3 is positive but its target is unlabelled
    lmask = torch.tensor([[True], [True], [True], [True]])
    cond = torch.tensor([[1.0], [100.0], [3.5], [-50.0]])
    loss = hurdle_loss(cond, ys, maskf, labels, lmask, ((1, 0),))
    assert float(loss) == pytest.approx((1.0 + 0.5) / 2)
