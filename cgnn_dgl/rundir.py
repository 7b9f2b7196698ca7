"""The run folder of `cgnn train` and the compute device: shared by train, evaluate, predict, ensemble
and screen, so none of them imports the training loop to find a file or a device.

Run folder (``cgnn train --out RUN``)::

    config.yaml     the resolved run config (model + train)
    split.json      the train/val/test split (train.split: formula | random | file), keyed by entry id (or
                    name); reused on resume
    last.pt         full state after the latest epoch (weights, optimizer, scheduler, RNG, history, ...)
    best.pt         the model with the best validation score so far (what evaluate/predict use); like
                    last.pt it records its tasks, units, standardisation and the cache's coordinator
                    parameters (cgnn_dgl.checkpoint)
    history.csv     epoch, lr, time, train/val loss, train/val MAE per target, val score

Every file is written atomically (temporary file, fsync, rename), so ``kill -9`` at any moment leaves a
consistent run. An ensemble run (``train.ensemble > 1``) holds one such folder per member (``member_k``)
beside ``ensemble.json`` (:mod:`cgnn_dgl.ensemble`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Protocol

import torch

from cgnn_dgl.errors import UsageError

LAST, BEST, CONFIG, SPLIT, HISTORY = "last.pt", "best.pt", "config.yaml", "split.json", "history.csv"


class _Ranked(Protocol):
    """What :func:`resolve_device` needs of a distributed launch (``cgnn_dgl.train.Dist``)."""

    @property
    def enabled(self) -> bool: ...

    local_rank: int


def resolve_device(name: str, dist: _Ranked | None = None) -> torch.device:
    """``cpu`` / ``cuda`` / ``cuda:N`` -> a device, with one-line errors for a missing GPU or an unknown
    name; plain ``cuda`` under torchrun is the process's own GPU (LOCAL_RANK)."""
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UsageError(f"device {name!r} requested but CUDA is not available (torch {torch.__version__})")
        if dist is not None and dist.enabled and name == "cuda":
            return torch.device("cuda", dist.local_rank)
        return torch.device(name)
    if name != "cpu":
        raise UsageError(f"unknown device {name!r}; expected cpu or cuda")
    return torch.device("cpu")


def best_model(path: str | Path) -> Path:
    """A run folder -> its ``best.pt``; any other path is returned as given (a checkpoint file)."""
    path = Path(path)
    return path / BEST if path.is_dir() and (path / BEST).is_file() else path
