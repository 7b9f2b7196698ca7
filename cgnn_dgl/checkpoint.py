"""Checkpoints: atomic writes, ``weights_only`` loads, and model reconstruction.

A cgnn-dgl checkpoint is a plain dict of tensors and Python primitives (so ``torch.load(...,
weights_only=True)`` reads it, and no class path is pickled)::

    format: "cgnn-dgl-checkpoint", format_version, package_version,
    model_config: ModelConfig.to_dict(), train_config: TrainConfig.to_dict() (optional),
    model: state_dict (includes the target_mean / target_std buffers),
    target_mean, target_std: lists (also in the state dict; kept readable),
    optimizer, scheduler: state dicts;  rng: {torch, numpy (Generator state), python};
    epoch: epochs completed;  best_score, best_epoch, epochs_since_best;  history: list of row dicts;
    tasks: TaskSet.record() (targets, units, kinds, classes, standardisation with the train-split mean/std);
    coordinator: the coordinator parameters of the cache it was trained on (`cgnn predict` builds with them);
    synthetic: whether that cache's labels were synthetic (None: unknown);  cache: its path and source kind.

A checkpoint without ``tasks`` (written before the task layer) holds the targets of its ``model_config``
(the OQMD four by default) and is read as such.

An official reference checkpoint is a bare state_dict of the reference ``GGNN``; :func:`load_model` turns
it into a model of the given preset (``arch``).
"""
from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cgnn_dgl import TARGETS, __version__
from cgnn_dgl.errors import CgnnError, UsageError

FORMAT = "cgnn-dgl-checkpoint"
FORMAT_VERSION = 1


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` through :func:`cgnn_dgl.fileio.atomic_open` (a kill never leaves half a checkpoint)."""
    from cgnn_dgl.fileio import atomic_open

    with atomic_open(path, "wb") as fh:
        torch.save(obj, fh)


def load(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"checkpoint not found: {path}")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # truncated file, not a torch file, disallowed globals
        raise CgnnError(f"cannot load checkpoint {path}: {type(exc).__name__}: {str(exc).splitlines()[0]}") from None
    if not isinstance(obj, dict):
        raise CgnnError(f"{path}: not a checkpoint or state_dict")
    return obj


def is_cgnn_checkpoint(obj: dict) -> bool:
    return obj.get("format") == FORMAT


def rng_state(np_rng: np.random.Generator) -> dict:
    return {
        "torch": torch.get_rng_state(),
        "numpy": np_rng.bit_generator.state,
        "python": random.getstate(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict, np_rng: np.random.Generator) -> None:
    torch.set_rng_state(state["torch"])
    np_rng.bit_generator.state = state["numpy"]
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def make_checkpoint(model, model_config, **extra) -> dict:
    """The checkpoint dict for ``model`` (a bare module, not a DDP wrapper)."""
    sd = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    ckpt = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "package_version": __version__,
        "model_config": model_config.to_dict(),
        "model": sd,
    }
    for name in ("target_mean", "target_std"):
        if name in sd:
            ckpt[name] = [float(x) for x in sd[name].reshape(-1)]
    ckpt.update(extra)
    return ckpt


def cache_record(cache_dir) -> dict:
    """What a checkpoint records of the cache it was trained on: ``coordinator`` (the parameters its graphs
    were built with), ``synthetic`` (True when ingest flagged any entry synthetic, False for an ingest cache
    without such entries or a `cgnn graphs` cache of the user's own labels, None when unknown) and ``cache``."""
    import csv

    from cgnn_dgl.cache import read_manifest

    root = Path(str(cache_dir))
    manifest = read_manifest(root) or {}
    kind = (manifest.get("source") or {}).get("kind")
    synthetic = None
    flags = root / "ingest_flags.csv"
    if flags.is_file():
        with open(flags, newline="") as fh:
            synthetic = any(row.get("synthetic") == "True" for row in csv.DictReader(fh))
    elif kind == "files":
        synthetic = False
    return {"coordinator": manifest.get("coordinator"), "synthetic": synthetic,
            "cache": {"path": str(root), "source": kind, "targets": list(manifest.get("targets", TARGETS))}}


def record_of(ckpt: dict) -> dict:
    """The task / cache record of a checkpoint (``tasks``, ``coordinator``, ``synthetic``, ``cache``); for a
    checkpoint older than the record, the tasks of its model config with the OQMD units."""
    rec = {k: ckpt.get(k) for k in ("tasks", "coordinator", "synthetic", "cache")}
    if rec["tasks"] is None and is_cgnn_checkpoint(ckpt):
        from cgnn_dgl.config import ModelConfig
        from cgnn_dgl.tasks import TaskSet

        rec["tasks"] = TaskSet.from_configs(ModelConfig.from_dict(ckpt["model_config"])).record(
            ckpt.get("target_mean"), ckpt.get("target_std") if ckpt.get("target_mean") is not None else None)
    return rec


def model_from_checkpoint(ckpt: dict, arch: str | None = None, path: str = "checkpoint"):
    """Build the model a checkpoint describes and load its weights (strictly).

    For a bare reference state_dict, ``arch`` names the preset (benchmark | no_edgenet | complete); the
    model then predicts formation energy, like the official weights.
    """
    from cgnn_dgl.config import ModelConfig
    from cgnn_dgl.model import CGNN

    if is_cgnn_checkpoint(ckpt):
        if ckpt.get("format_version", 0) > FORMAT_VERSION:
            raise CgnnError(f"{path}: written by a newer cgnn-dgl ({ckpt.get('package_version')})")
        config = ModelConfig.from_dict(ckpt["model_config"])
        model = CGNN(config)
        try:
            model.load_state_dict(ckpt["model"], strict=True)
        except RuntimeError as exc:
            raise CgnnError(f"{path}: weights do not fit the stored model config: {str(exc).splitlines()[0]}") from None
        return model, config
    if not all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        raise CgnnError(f"{path}: neither a cgnn-dgl checkpoint nor a plain state_dict")
    if arch is None:
        raise UsageError(f"{path} is a plain reference state_dict; say which model it is with --arch "
                         "benchmark|no_edgenet|complete")
    from cgnn_dgl.model import load_reference_state_dict

    try:
        config = ModelConfig.preset(arch, targets=["formation_energy"])  # what the official weights predict
    except (KeyError, ValueError) as exc:
        raise UsageError(f"--arch {arch}: {exc}") from None
    model = CGNN(config)
    try:
        load_reference_state_dict(model, ckpt)
    except (KeyError, RuntimeError, ValueError) as exc:
        raise CgnnError(f"{path}: does not fit --arch {arch}: {str(exc).splitlines()[0]}") from None
    return model, config
