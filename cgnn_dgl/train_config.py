"""Typed training configuration and the run configuration file (model + train), with ``--set`` overrides.

A run config is a YAML or JSON mapping with two sections::

    model:                 # ModelConfig: a preset name plus any field overrides
      preset: benchmark
      targets: [formation_energy, volume_per_atom, band_gap, magnetization]
    train:                 # TrainConfig (below)
      epochs: 300
      lr: 1.0e-3

``--set train.lr=5e-4 --set model.n_conv=3`` overrides single keys; values are parsed as YAML scalars
(``[250, 280]`` is a list, ``null`` is None, ``true`` a bool). Unknown keys, wrong types and missing
files raise :class:`~cgnn_dgl.errors.UsageError` (CLI exit code 2).

Classification thresholds. The reference gives none (cgnn-reference.md §4). A crystal is labelled an
insulator when its DFT band gap is above ``gap_threshold`` (default 0.0 eV: OQMD stores metals with a gap
of exactly 0) and magnetic when its magnetization is above ``mag_threshold`` (default 0.05 μB/atom, above
the numerical noise of non-spin-polarised or quenched moments). The regression output is the ROC score.
Accuracy, precision and recall need a hard decision on the prediction; regression outputs of metals are
never exactly zero, so the decision thresholds on the *predicted* values are separate:
``gap_decision_threshold`` (default 0.1 eV) and ``mag_decision_threshold`` (default 0.05 μB/atom).
"""
from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from cgnn_dgl import TARGETS
from cgnn_dgl.errors import UsageError

OPTIMIZERS = ("adam", "amsgrad", "sgd")
LOSSES = ("mse", "l1", "huber")
SCHEDULERS = ("multistep", "step", "cosine", "none")
DEVICES = ("cpu", "cuda")


@dataclass
class TrainConfig:
    # optimisation (reference: Adam, lr 1e-3, coupled L2 weight decay 1e-6)
    optimizer: str = "adam"
    lr: float = 1e-3
    weight_decay: float = 1e-6
    momentum: float = 0.9  # sgd only (Nesterov, as in the reference)
    batch_size: int = 512  # global batch: split evenly across DDP processes
    eval_batch_size: int = 0  # 0 = batch_size
    epochs: int = 300
    # LR schedule, stepped once per epoch after validation (reference v1.0.2+)
    scheduler: str = "multistep"  # multistep | step (step_size = milestones[0]) | cosine | none
    milestones: list[int] = field(default_factory=lambda: [250])
    gamma: float = 0.1  # cosine: eta_min
    clip_value: float = 0.0  # > 0: clip_grad_value_
    seed: int = 12345
    patience: int = 0  # early stopping: stop after this many epochs without improvement (0 = off)
    min_delta: float = 0.0
    device: str = "cpu"
    num_threads: int = 0  # torch.set_num_threads; 0 = leave torch's default
    backend: str = "auto"  # graph ops: auto | dgl | torch
    # tasks
    targets: list[str] | None = None  # targets in the loss; None = every head of the model
    task_weights: dict[str, float] = field(default_factory=dict)  # default 1.0 each
    standardize: bool = True  # train on (y - mean) / std of the training split
    loss: str = "mse"  # mse (the reference) | l1 | huber, on standardised targets
    target_loss: dict[str, str] = field(default_factory=dict)  # per-target override, e.g. {band_gap: l1}
    classification_weight: float = 1.0  # weight of the BCE loss of optional classification heads
    gap_threshold: float = 0.0
    mag_threshold: float = 0.05
    gap_decision_threshold: float = 0.1
    mag_decision_threshold: float = 0.05
    # data and outputs
    cache: str | None = None
    split_file: str | None = None
    val_fraction: float = 0.1
    test_fraction: float = 0.1
    split_seed: int = 12345
    out_dir: str = "runs/cgnn"
    progress: bool = True
    record_seen: bool = False  # debug: write the entry ids each process trained on in epoch 1

    def validate(self, model_targets: tuple[str, ...] | list[str] = TARGETS, check_files: bool = True) -> None:
        def bad(msg: str):
            raise UsageError(f"train.{msg}")

        if self.optimizer not in OPTIMIZERS:
            bad(f"optimizer: {self.optimizer!r} is not one of {OPTIMIZERS}")
        if self.scheduler not in SCHEDULERS:
            bad(f"scheduler: {self.scheduler!r} is not one of {SCHEDULERS}")
        if self.device not in DEVICES and not self.device.startswith("cuda:"):
            bad(f"device: {self.device!r} is not one of {DEVICES}")
        if self.backend not in ("auto", "dgl", "torch"):
            bad(f"backend: {self.backend!r} is not one of auto, dgl, torch")
        if self.lr <= 0:
            bad(f"lr must be > 0 (got {self.lr})")
        if self.batch_size < 1 or self.eval_batch_size < 0:
            bad("batch_size must be >= 1 and eval_batch_size >= 0")
        if self.epochs < 0:
            bad(f"epochs must be >= 0 (got {self.epochs})")
        if self.scheduler in ("multistep", "step", "cosine") and not self.milestones:
            bad(f"milestones must not be empty with scheduler {self.scheduler}")
        if self.patience < 0 or self.clip_value < 0 or self.weight_decay < 0:
            bad("patience, clip_value and weight_decay must be >= 0")
        if not (0 <= self.val_fraction < 1 and 0 <= self.test_fraction < 1
                and self.val_fraction + self.test_fraction < 1):
            bad(f"val_fraction + test_fraction must be < 1 (got {self.val_fraction}, {self.test_fraction})")
        for t in self.targets or []:
            if t not in model_targets:
                bad(f"targets: {t!r} is not a head of the model {tuple(model_targets)}")
        for t, name in {"*": self.loss, **self.target_loss}.items():
            if name not in LOSSES:
                bad(f"loss{'' if t == '*' else f' of {t}'}: {name!r} is not one of {LOSSES}")
            if t != "*" and t not in TARGETS:
                bad(f"target_loss: unknown target {t!r}; expected some of {TARGETS}")
        for t, w in self.task_weights.items():
            if t not in TARGETS:  # weights of targets the model lacks are ignored; typos are not
                bad(f"task_weights: unknown target {t!r}; expected some of {TARGETS}")
            if w < 0:
                bad(f"task_weights: weight of {t} must be >= 0")
        if check_files and self.split_file is not None and not Path(self.split_file).is_file():
            bad(f"split_file: {self.split_file} not found")

    def used_targets(self, model_targets) -> list[str]:
        return list(self.targets) if self.targets else list(model_targets)

    def loss_of(self, target: str) -> str:
        return self.target_loss.get(target, self.loss)

    def weight(self, target: str) -> float:
        return float(self.task_weights.get(target, 1.0))

    def to_dict(self) -> dict[str, Any]:
        return copy.deepcopy(asdict(self))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        from cgnn_dgl.config import dataclass_from_dict

        data = dict(data)
        # YAML reads 1e-3 as a string; accept numbers written that way for float fields.
        for f in fields(cls):
            if f.name in data and isinstance(data[f.name], str) and "float" in str(f.type):
                try:
                    data[f.name] = float(data[f.name])
                except ValueError:
                    pass
        return dataclass_from_dict(cls, data)


@dataclass
class RunConfig:
    model: Any  # cgnn_dgl.config.ModelConfig
    train: TrainConfig

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model.to_dict(), "train": self.train.to_dict()}

    @classmethod
    def from_dict(cls, data: dict[str, Any], check_files: bool = True) -> "RunConfig":
        from cgnn_dgl.config import ModelConfig

        if not isinstance(data, dict):
            raise UsageError("config must be a mapping with sections 'model' and 'train'")
        unknown = set(data) - {"model", "train"}
        if unknown:
            raise UsageError(f"unknown config section(s) {sorted(unknown)}; expected 'model' and 'train'")
        mdata = data.get("model") or {}
        tdata = data.get("train") or {}
        if not isinstance(mdata, dict) or not isinstance(tdata, dict):
            raise UsageError("config sections 'model' and 'train' must be mappings")
        mdata = dict(mdata)
        preset = mdata.pop("preset", None)
        try:
            if preset is not None:
                model = ModelConfig.preset(str(preset), **mdata)
            else:
                model = ModelConfig.from_dict(mdata)
        except UsageError:
            raise
        except (TypeError, ValueError, KeyError) as exc:
            raise UsageError(f"model: {exc}") from None
        train = TrainConfig.from_dict(tdata)
        train.validate(tuple(model.targets), check_files=check_files)
        return cls(model=model, train=train)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


def parse_scalar(text: str) -> Any:
    """A ``--set`` value as YAML would read it (numbers, bools, null, [lists], {maps}); else the string."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if isinstance(value, str):
        try:  # YAML 1.1 reads "1e-3" as a string
            return float(value) if value.strip().lower() not in ("nan", "inf", "-inf") else value
        except ValueError:
            return value
    return value


def apply_overrides(data: dict[str, Any], overrides: list[str] | None) -> dict[str, Any]:
    """Apply ``section.key=value`` (or ``section.key.sub=value``) overrides to a raw config mapping."""
    data = copy.deepcopy(data)
    for item in overrides or []:
        if "=" not in item:
            raise UsageError(f"--set {item!r}: expected key=value, e.g. train.lr=5e-4")
        key, text = item.split("=", 1)
        parts = key.strip().split(".")
        if len(parts) < 2 or parts[0] not in ("model", "train") or not all(parts):
            raise UsageError(f"--set {item!r}: key must start with 'model.' or 'train.' (e.g. model.n_conv=3)")
        node = data.setdefault(parts[0], {})
        if node is None:
            node = data[parts[0]] = {}
        for p in parts[1:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise UsageError(f"--set {item!r}: {p} is not a mapping")
        node[parts[-1]] = parse_scalar(text)
    return data


def read_config_file(path: str | Path | None) -> dict[str, Any]:
    if path is None:
        return {}
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"config file not found: {path}")
    text = path.read_text()
    try:
        data = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UsageError(f"cannot parse config {path}: {first}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UsageError(f"config {path} must be a mapping with sections 'model' and 'train'")
    return data


def load_run_config(path: str | Path | None, overrides: list[str] | None = None, check_files: bool = True) -> RunConfig:
    """Read a YAML/JSON run config, apply ``--set`` overrides and validate (``check_files``: that a
    configured split file exists; off for a finished run, which has its own split.json)."""
    return RunConfig.from_dict(apply_overrides(read_config_file(path), overrides), check_files=check_files)
