"""Fine-tuning (`cgnn train --init CKPT [--arch A]`, train.freeze_trunk_epochs): trunk from the init,
heads matched by target name, fresh heads for new targets, frozen trunk, the init recorded."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import shared_dir
from test_train import REPO, tiny_config, usable_rows, weights, write_cache

from cgnn_dgl.errors import CgnnError, UsageError
from cgnn_dgl.fileio import sha256_file
from cgnn_dgl.finetune import apply_init, is_trunk_key, read_init

REFERENCE = shared_dir() / "reference" / "cgnn_oqmd_fe_benchmark.pth"


@pytest.fixture(scope="module")
def cache(tmp_path_factory, dev_corpus) -> Path:
    return write_cache(tmp_path_factory.mktemp("ft") / "c", usable_rows(dev_corpus, 200))


@pytest.fixture(scope="module")
def base(cache, tmp_path_factory) -> Path:
    """A trained two-target run to fine-tune from."""
    from cgnn_dgl.train import train_run

    out = tmp_path_factory.mktemp("base") / "run"
    cfg = tiny_config(cache, out, epochs=2)
    cfg.model.targets = ("formation_energy", "volume_per_atom")
    train_run(cfg, out)
    return out / "best.pt"


def _ft_config(cache, out, init, targets=("volume_per_atom", "band_gap"), **train):
    cfg = tiny_config(cache, out, init=str(init), **train)
    cfg.model.targets = tuple(targets)
    return cfg


def _trunk(state: dict) -> dict:
    return {k: v for k, v in state.items() if is_trunk_key(k)}


def _predict(model, packed, idx):
    from cgnn_dgl.batching import iter_batches
    from cgnn_dgl.train import batch_tensors

    model.eval()
    out = []
    with torch.no_grad():
        for _, g in iter_batches(packed, idx, 64):
            z, gi, _, _ = batch_tensors(g, [0], torch.device("cpu"), "auto")
            out.append(model.to_physical(model(z, gi)).double())
    return torch.cat(out)


def test_trunk_is_the_init_kept_head_predicts_as_before_new_head_is_fresh(cache, base, tmp_path):
    from cgnn_dgl.checkpoint import load as load_ckpt
    from cgnn_dgl.checkpoint import model_from_checkpoint
    from cgnn_dgl.train import Trainer, load_cache, make_split

    packed = load_cache(str(cache))
    cfg = _ft_config(cache, tmp_path / "ft", base, standardize=False)  # other statistics than the init's
    split = make_split(packed, cfg.train)
    tr = Trainer(cfg, tmp_path / "ft", packed, split)
    init_state = weights(base)
    own = tr.model.state_dict()
    trunk = _trunk(init_state)
    assert trunk and all(torch.equal(own[k], v) for k, v in trunk.items())
    assert tr.init_record["kept_heads"] == ["volume_per_atom"] and tr.init_record["fresh_heads"] == ["band_gap"]

    # the kept head, under the new run's standardisation, predicts what the init model predicted
    init_model, _ = model_from_checkpoint(load_ckpt(base))
    idx = split["val"][:40]
    assert not torch.allclose(tr.model.target_std.double()[0], init_model.target_std.double()[1])  # stats did change
    np.testing.assert_allclose(_predict(tr.model, packed, idx)[:, 0].numpy(),
                               _predict(init_model, packed, idx)[:, 1].numpy(), rtol=1e-5, atol=1e-5)

    # the new target's head is what a run without --init starts from (same seed), not a copied head
    plain = _ft_config(cache, tmp_path / "plain", base, standardize=False)
    plain.train.init = None
    fresh = Trainer(plain, tmp_path / "plain", packed, split).model.state_dict()
    w = "regression.linear.weight"
    assert torch.equal(own[w][1], fresh[w][1])
    assert not any(torch.equal(own[w][1], init_state[w][i]) for i in range(2))
    assert not torch.equal(own[w][0], fresh[w][0])


def test_frozen_trunk_is_unchanged_for_n_epochs_then_trains(cache, base, tmp_path):
    from cgnn_dgl.train import train_run

    out = tmp_path / "ft"
    train_run(_ft_config(cache, out, base, epochs=2, freeze_trunk_epochs=2, milestones=[10]), out)
    init_trunk = _trunk(weights(base))
    after2 = weights(out / "last.pt")
    for k, v in init_trunk.items():  # weights and batch-norm running statistics alike
        assert torch.equal(after2[k], v), k
    head = "regression.linear.weight"
    start = read_init(base)
    assert not torch.equal(after2[head], start.state[head])  # the heads did train

    train_run(_ft_config(cache, out, base, epochs=3, freeze_trunk_epochs=2, milestones=[10]), out, resume=True)
    after3 = weights(out / "last.pt")
    changed = [k for k, v in init_trunk.items() if not torch.equal(after3[k], v)]
    assert len(changed) > len(init_trunk) // 2  # the trunk trains from epoch 3 on

    ck = torch.load(out / "best.pt", weights_only=True)
    assert ck["init"]["path"] == str(base) and ck["init"]["sha256"] == sha256_file(base)
    assert ck["init"]["fresh_heads"] == ["band_gap"] and ck["train_config"]["freeze_trunk_epochs"] == 2


def test_init_from_a_reference_state_dict(cache, tmp_path):
    """--arch: the official benchmark weights as the trunk; its formation-energy head is kept."""
    from cgnn_dgl.config import ModelConfig
    from cgnn_dgl.model import CGNN
    from cgnn_dgl.train import Trainer, load_cache, make_split

    if not REFERENCE.is_file():
        pytest.skip(f"{REFERENCE} not present")
    packed = load_cache(str(cache))
    cfg = _ft_config(cache, tmp_path / "ft", REFERENCE, targets=("formation_energy", "band_gap"),
                     init_arch="benchmark")
    from cgnn_dgl.finetune import init_model_config

    cfg.model = init_model_config(cfg.model, read_init(REFERENCE, "benchmark"))
    assert cfg.model == ModelConfig.preset("benchmark", targets=("formation_energy", "band_gap"))
    split = make_split(packed, cfg.train)
    tr = Trainer(cfg, tmp_path / "ft", packed, split)
    ref = CGNN.from_reference(REFERENCE, "benchmark")
    ref_sd = ref.state_dict()
    own = tr.model.state_dict()
    assert all(torch.equal(own[k], v) for k, v in ref_sd.items() if is_trunk_key(k))
    idx = split["val"][:30]
    np.testing.assert_allclose(_predict(tr.model, packed, idx)[:, 0].numpy(), _predict(ref, packed, idx)[:, 0].numpy(),
                               rtol=1e-5, atol=1e-5)
    assert tr.init_record["arch"] == "benchmark" and tr.init_record["kept_heads"] == ["formation_energy"]


def test_a_trunk_that_does_not_fit_is_a_one_line_error(base):
    from cgnn_dgl.config import ModelConfig
    from cgnn_dgl.model import CGNN

    model = CGNN(ModelConfig(n_hidden_feat=8, n_graph_feat=16, n_conv=3, n_fc=1))
    with pytest.raises(CgnnError, match=r"its trunk does not fit this model: (missing|unexpected|shape)") as err:
        apply_init(model, read_init(base))
    assert "\n" not in str(err.value)


def test_config_checks(cache, tmp_path):
    with pytest.raises(UsageError, match=r"freeze_trunk_epochs needs train\.init"):
        tiny_config(cache, tmp_path, freeze_trunk_epochs=2)
    with pytest.raises(UsageError, match=r"init: .*nope\.pt not found"):
        tiny_config(cache, tmp_path, init=str(tmp_path / "nope.pt"))
    with pytest.raises(UsageError, match="freeze_trunk_epochs must be >= 0"):
        tiny_config(cache, tmp_path, init=str(REFERENCE), freeze_trunk_epochs=-1)


def test_cli_init_and_arch(cache, base, tmp_path):
    cfg = tmp_path / "cfg.yaml"
    tiny_config(cache, tmp_path / "unused", epochs=1).save(cfg)
    env = {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    run = [sys.executable, "-m", "cgnn_dgl.cli", "train", "--config", str(cfg), "--cache", str(cache)]
    bad = subprocess.run(run + ["--out", str(tmp_path / "a"), "--arch", "benchmark"], capture_output=True,
                         text=True, env=env)
    assert bad.returncode == 2 and "state_dict" in bad.stderr and "--init" in bad.stderr
    ok = subprocess.run(run + ["--out", str(tmp_path / "b"), "--init", str(base), "--set",
                               "model.targets=[volume_per_atom]"], capture_output=True, text=True, env=env)
    assert ok.returncode == 0, ok.stderr[-2000:]
    ck = torch.load(tmp_path / "b" / "best.pt", weights_only=True)
    assert ck["init"]["sha256"] == sha256_file(base) and ck["init"]["kept_heads"] == ["volume_per_atom"]
    assert ck["model_config"]["n_conv"] == 2  # the init's architecture
    frozen = subprocess.run(run + ["--out", str(tmp_path / "c"), "--init", str(base), "--set",
                                   "train.freeze_trunk_epochs=1"], capture_output=True, text=True, env=env)
    assert frozen.returncode == 0, frozen.stderr[-2000:]  # --init counts when the config is checked


def test_init_with_detached_classification_heads_into_a_run_without_heads(cache, tmp_path):
    """The heads' settings (classification_heads, _detach, _hidden, binary_targets) are the run's, the
    trunk's (e.g. species_descriptors) the init's: fine-tuning a configs/accurate.yaml-style model into a
    plain regression run works, with the descriptor map carried over."""
    from cgnn_dgl.config import RunConfig
    from cgnn_dgl.train import train_run

    heads = {"classification_heads": True, "classification_detach": True, "classification_hidden": 8,
             "species_descriptors": True}
    src = tiny_config(cache, tmp_path / "src", epochs=1)
    src = RunConfig.from_dict({"model": {**src.model.to_dict(), **heads}, "train": src.train.to_dict()})
    train_run(src, tmp_path / "src")
    ft = _ft_config(cache, tmp_path / "ft", tmp_path / "src" / "best.pt", epochs=1)
    train_run(ft, tmp_path / "ft")
    got = torch.load(tmp_path / "ft" / "best.pt", weights_only=True)
    cfg = got["model_config"]
    assert cfg["classification_heads"] is False and cfg["classification_detach"] is False
    assert cfg["species_descriptors"] is True and "embedding.descriptor.weight" in got["model"]
    assert not any(k.startswith("classification.") for k in got["model"])
    with pytest.raises(UsageError, match=r"is a folder; give a checkpoint file, e\.g\. .*src/best\.pt"):
        _ft_config(cache, tmp_path / "ft2", tmp_path / "src").train.validate(check_files=True)


def test_init_with_valence_flags(cache, tmp_path):
    """An init whose classification heads read the valence flags: a run that keeps heads keeps the flags
    (the trunk loads; the table is rebuilt, not loaded); a run without heads drops them."""
    from cgnn_dgl.finetune import init_model_config
    from cgnn_dgl.train import Trainer, load_cache, make_split, train_run

    out = tmp_path / "init"
    cfg = tiny_config(cache, out, epochs=1)
    cfg.model.classification_heads, cfg.model.valence_features = True, "classification"
    train_run(cfg, out)
    init = read_init(out / "best.pt")
    assert "valence.valence_table" in init.state and not is_trunk_key("valence.valence_table")
    packed = load_cache(str(cache))
    for heads, want in ((True, "classification"), (False, "none")):
        ft = _ft_config(cache, tmp_path / f"ft{heads}", out / "best.pt")
        ft.model.classification_heads = heads
        ft.model = init_model_config(ft.model, init)
        assert ft.model.valence_features == want
        tr = Trainer(ft, tmp_path / f"ft{heads}", packed, make_split(packed, ft.train))
        own = tr.model.state_dict()
        assert all(torch.equal(own[k], v) for k, v in init.state.items() if is_trunk_key(k))
        assert ("valence.valence_table" in own) is heads
