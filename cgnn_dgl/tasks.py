"""The task layer: what a model learns, as data. Each :class:`Task` is one output (a regression column
or a binary classification logit) with its name, unit, kind, loss, weight and standardisation; a
:class:`TaskSet` holds a model's tasks in output order and is what the training loop asks for the loss,
evaluation for the metrics, and predict for the column names and units. Nothing outside this module
needs to know how many targets there are or what they are called.

A binary task either reads its own 0/1 label column (``source`` None) or is derived from a regression
target by a threshold (label = source > threshold, or < with ``below``; in a config
``train.binary_from: {stable: "e_hull < 0.05"}`` for a name in ``model.binary_targets``): the OQMD preset derives ``insulator`` from
``band_gap`` and ``magnetic`` from ``magnetization`` (:func:`oqmd_preset`, the behaviour of every
existing config, which :meth:`TaskSet.from_configs` reproduces exactly).
"""
from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from cgnn_dgl import TARGET_UNITS, TARGETS
from cgnn_dgl.errors import UsageError

log = logging.getLogger(__name__)

REGRESSION, BINARY = "regression", "binary"
REGRESSION_LOSSES = ("mse", "l1", "huber")
_LOSS_CODE = {"mse": 0, "l1": 1, "huber": 2}  # element-wise loss: squared, absolute, Huber (delta 1)


@dataclass(frozen=True)
class Task:
    """One learnt quantity. ``kind`` regression: a standardised output column (``standardise``: train on
    (y - mean) / std of the training split), loss mse | l1 | huber. ``kind`` binary: a logit (``head``) or,
    without a head, scored from its source's regression output (``decision_threshold``); loss BCE.
    ``weight`` scales the task's loss. ``title`` is its key in metrics.json (default: ``name``)."""

    name: str
    unit: str = ""
    kind: str = REGRESSION
    loss: str = "mse"
    weight: float = 1.0
    standardise: bool = True
    source: str | None = None  # binary: the regression target the label derives from; None = read 0/1 labels
    threshold: float = 0.0  # binary from a source: label = source > threshold
    decision_threshold: float = 0.5  # binary without a head: predicted positive when source prediction > this
    head: bool = True  # binary: the model has a logit for it
    title: str = ""
    below: bool = False  # binary from a source: label = source < threshold instead

    def __post_init__(self) -> None:
        if self.kind not in (REGRESSION, BINARY):
            raise UsageError(f"task {self.name!r}: kind must be {REGRESSION} or {BINARY}, got {self.kind!r}")
        if self.kind == REGRESSION and self.loss not in REGRESSION_LOSSES:
            raise UsageError(f"task {self.name!r}: loss {self.loss!r} is not one of {REGRESSION_LOSSES}")
        if self.kind == BINARY and self.loss != "bce":
            raise UsageError(f"task {self.name!r}: a binary task's loss is bce, got {self.loss!r}")
        if self.weight < 0:
            raise UsageError(f"task {self.name!r}: weight must be >= 0, got {self.weight}")

    @property
    def key(self) -> str:
        return self.title or self.name

    @property
    def label_column(self) -> str:
        """The cache column its labels come from."""
        return self.source or self.name if self.kind == BINARY else self.name

    def labels(self, values):
        """0/1 labels from the label column's values (torch or numpy): source > threshold (< with ``below``),
        or the 0/1 label."""
        if self.source is not None and self.below:
            return values < self.threshold
        return values > (self.threshold if self.source is not None else 0.5)

    def metrics(self, pred, true, prob=None) -> dict:
        """This task's metrics on labelled rows: ``pred`` its regression column (regression, or the source of a
        headless binary task), ``true`` the label column's values, ``prob`` its head's probabilities."""
        from cgnn_dgl.evaluate import binary_metrics, regression_metrics

        if self.kind == REGRESSION:
            return {**regression_metrics(pred, true), "unit": self.unit}
        labels = np.asarray(self.labels(np.asarray(true, float)))
        if prob is not None:
            return {**binary_metrics(labels, prob > 0.5, prob), "label_threshold": self._label_threshold(),
                    "decision_threshold": 0.5, "score": "classification head"}
        pred = np.asarray(pred, float)
        return {**binary_metrics(labels, pred > self.decision_threshold, pred),
                "label_threshold": self._label_threshold(), "decision_threshold": self.decision_threshold,
                "score": f"{self.source} regression"}

    def _label_threshold(self):
        if self.source is None:
            return "0/1 label"
        return f"{self.source} < {self.threshold:g}" if self.below else self.threshold


_RULE = re.compile(r"^\s*([^\s<>]+)\s*([<>])\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*$")


def parse_rule(text: str, key: str = "train.binary_from") -> tuple[str, bool, float]:
    """``"e_hull < 0.05"`` -> (source, below, threshold): a binary label derived from a regression target."""
    m = _RULE.match(str(text))
    if m is None:
        raise UsageError(f"{key}: {text!r} is not a rule like 'dir_gap > 1.0' or 'e_hull < 0.05'")
    return m.group(1), m.group(2) == "<", float(m.group(3))


# the OQMD preset's classifications: (name, metrics key, source, TrainConfig label / decision threshold keys)
OQMD_CLASSES = (("insulator", "metal_insulator", "band_gap", "gap_threshold", "gap_decision_threshold"),
                ("magnetic", "magnetic", "magnetization", "mag_threshold", "mag_decision_threshold"))


def class_names(model_cfg) -> tuple[str, ...]:
    """The logit columns of a model: the OQMD classifications with ``classification_heads``, then one per
    ``binary_targets`` column."""
    oqmd = tuple(c[0] for c in OQMD_CLASSES) if model_cfg.classification_heads else ()
    return oqmd + tuple(getattr(model_cfg, "binary_targets", ()))


def hurdle_pairs(model_cfg) -> tuple[tuple[int, int], ...]:
    """(regression column, logit column) of each ``model.hurdle_targets`` entry, in its order: the target
    and the classification head that gates it (band_gap and insulator, magnetization and magnetic)."""
    heads = class_names(model_cfg)
    gate = {c[2]: c[0] for c in OQMD_CLASSES}
    targets = list(model_cfg.targets)
    return tuple((targets.index(t), heads.index(gate[t])) for t in getattr(model_cfg, "hurdle_targets", ()))


@dataclass
class TaskSet:
    """A model's tasks: ``regression`` in the order of its output columns, ``binary`` in the order of its
    logits (those with ``head``) followed by headless ones scored from a regression column. ``used`` names
    the regression tasks in the loss and the selection score (default: all)."""

    regression: tuple[Task, ...]
    binary: tuple[Task, ...] = ()
    used: tuple[str, ...] = ()
    classification_weight: float = 1.0

    def __post_init__(self) -> None:
        self.regression, self.binary = tuple(self.regression), tuple(self.binary)
        if not self.regression:
            raise UsageError("a model needs at least one regression target")
        names = [t.name for t in self.regression] + [t.name for t in self.binary]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise UsageError(f"task names must be unique; repeated: {', '.join(dup)}")
        if any(t.kind != REGRESSION for t in self.regression) or any(t.kind != BINARY for t in self.binary):
            raise UsageError("regression and binary tasks are in the wrong lists")
        self.used = tuple(self.used) or self.names
        bad = [u for u in self.used if u not in self.names]
        if bad:
            raise UsageError(f"train.targets: {bad[0]!r} is not a head of the model {self.names}")
        heads = [t.head for t in self.binary]
        if heads != sorted(heads, reverse=True):
            raise UsageError("binary tasks with a head come before those without")

    # -- names ---------------------------------------------------------------------------------------
    @property
    def names(self) -> tuple[str, ...]:
        """The regression targets, in output column order."""
        return tuple(t.name for t in self.regression)

    @property
    def heads(self) -> tuple[Task, ...]:
        """The binary tasks with a logit, in logit order."""
        return tuple(t for t in self.binary if t.head)

    @property
    def class_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.heads)

    @property
    def label_columns(self) -> tuple[str, ...]:
        """The cache columns a batch carries: the regression targets, then the 0/1 label columns of binary
        tasks that read their own labels."""
        extra = [t.name for t in self.binary if t.source is None and t.name not in self.names]
        return self.names + tuple(extra)

    def units(self) -> dict[str, str]:
        return {t.name: t.unit for t in self.regression}

    def prediction_columns(self, std: bool = False) -> list[tuple[str, str]]:
        """(column, unit) of a predictions CSV: each target (and ``<target>_std``), then ``p_<class>``."""
        cols = []
        for t in self.regression:
            cols.append((t.name, t.unit))
            if std:
                cols.append((f"{t.name}_std", t.unit))
        cols += [(f"p_{t.name}", "probability") for t in self.heads]
        return cols

    def columns(self, cache_targets: Sequence[str], where: str = "the cache") -> list[int]:
        """Indices of :attr:`label_columns` among a cache's target columns; a one-line error naming what the
        cache holds when any is missing."""
        held = list(cache_targets)
        missing = [n for n in self.label_columns if n not in held]
        if missing:
            raise UsageError(f"{where} has no target {', '.join(missing)}; it holds {', '.join(held) or 'none'} "
                             "(set model.targets or --targets to some of these, or rebuild it with "
                             "`cgnn graphs ... --targets`)")
        return [held.index(n) for n in self.label_columns]

    # -- training ------------------------------------------------------------------------------------
    def target_stats(self, y: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per regression column mean / std over labelled rows of the training split (0 / 1 for a task
        that is not standardised, and where there are too few labels)."""
        n = len(self.regression)
        mean, std = np.zeros(n), np.ones(n)
        for k, t in enumerate(self.regression):
            if not t.standardise:
                continue
            v = y[mask[:, k], k]
            if len(v) >= 1:
                mean[k] = v.mean()
            if len(v) >= 2 and v.std() > 1e-12:
                std[k] = v.std()
        return mean, std

    def loss_weights(self, labelled: np.ndarray):
        """Regression loss weights: ``weight`` for used targets, 0 for the rest, divided by the summed
        weights of the targets labelled in the training split (``labelled``, one bool per column)."""
        import torch

        w = torch.zeros(len(self.regression))
        for k, t in enumerate(self.regression):
            if t.name in self.used:
                w[k] = t.weight
        denom = float((w * torch.as_tensor(np.asarray(labelled, bool))).sum())
        return w / (denom if denom > 0 else 1.0)

    def regression_loss(self, device):
        """A function ``(reg, ys, maskf, cnt) -> (loss, sq)`` of standardised outputs and labels: the
        weighted sum over targets of each target's masked mean loss, and the masked squared errors."""
        import torch

        kind = torch.tensor([_LOSS_CODE[t.loss] for t in self.regression], device=device)
        robust = any(t.loss != "mse" for t in self.regression)  # known on the host

        def loss_fn(reg, ys, maskf, cnt, loss_w):
            diff = reg - ys
            sq = diff ** 2 * maskf
            elem = sq
            if robust:
                ad = diff.abs()
                huber = torch.where(ad < 1.0, 0.5 * diff ** 2, ad - 0.5)
                elem = torch.where(kind == 1, ad, torch.where(kind == 2, huber, diff ** 2)) * maskf
            per_t = elem.sum(0) / cnt.clamp(min=1.0)
            return (per_t * loss_w).sum(), sq

        return loss_fn

    def binary_labels(self, y, mask):
        """(labels, label mask), one column per head, from a batch's label columns (torch tensors). A task
        derived from a target the model does not predict has no labels (as before the task layer)."""
        import torch

        cols = list(self.label_columns)
        heads = self.heads
        labels = torch.zeros(y.shape[0], len(heads), device=y.device)
        lmask = torch.zeros(y.shape[0], len(heads), dtype=torch.bool, device=y.device)
        for j, t in enumerate(heads):
            if t.label_column in cols:
                k = cols.index(t.label_column)
                labels[:, j] = t.labels(y[:, k]).float()
                lmask[:, j] = mask[:, k]
        return labels, lmask

    def head_weights(self, y_train: np.ndarray, m_train: np.ndarray):
        """1 per head, 0 for a task whose training labels are all one class (or absent): such a head can
        only learn a constant, and its loss would pull on the trunk for nothing."""
        import torch

        w = torch.ones(len(self.heads))
        labels, lmask = self.binary_labels(torch.as_tensor(y_train), torch.as_tensor(m_train))
        for j, t in enumerate(self.heads):
            lab = labels[lmask[:, j], j]
            if lab.numel() == 0 or bool((lab == lab[0]).all()):
                w[j] = 0.0
                what = "no labels" if lab.numel() == 0 else f"only class {int(lab[0])} ({lab.numel()} labels)"
                log.warning("classification task %s: %s in the training split; its loss is off (weight 0)",
                            t.title.replace("_", "/") if t.title else t.name, what)
        return w

    def check_binary_labels(self, y: np.ndarray, mask: np.ndarray) -> None:
        """0/1 label columns must hold 0 or 1 where labelled."""
        cols = list(self.label_columns)
        for t in self.binary:
            if t.source is None:
                v = y[mask[:, cols.index(t.name)], cols.index(t.name)]
                bad = v[(v != 0) & (v != 1)]
                if len(bad):
                    raise UsageError(f"binary target {t.name}: labels must be 0 or 1; found {bad[0]:g}")

    def positive_weights(self, y_train: np.ndarray, m_train: np.ndarray):
        """Per head, n_negative / n_positive over the labelled training rows (1 where a class is absent): the
        BCE ``pos_weight`` that gives both classes the same total weight."""
        import torch

        labels, lmask = self.binary_labels(torch.as_tensor(y_train), torch.as_tensor(m_train))
        pos = (labels * lmask).sum(0)
        neg = ((1 - labels) * lmask).sum(0)
        return torch.where((pos > 0) & (neg > 0), neg / pos.clamp(min=1.0), torch.ones_like(pos))

    def binary_loss(self, logits, labels, lmask, head_w, pos_weight=None):
        """The weighted BCE of the heads (mean over labelled rows per head); ``pos_weight`` (one per head)
        multiplies the loss of the positive rows."""
        import torch

        bce = torch.nn.functional.binary_cross_entropy_with_logits(logits.float(), labels, reduction="none",
                                                                   pos_weight=pos_weight)
        lm = lmask.float()
        per_c = (bce * lm).sum(0) / lm.sum(0).clamp(min=1.0)
        weights = [t.weight for t in self.heads]
        if all(w == weights[0] for w in weights):
            return weights[0] * (per_c * head_w).sum() if weights else per_c.sum()
        return (per_c * head_w * torch.tensor(weights, device=per_c.device)).sum()

    # -- evaluation ----------------------------------------------------------------------------------
    def metrics(self, pred: np.ndarray, true: np.ndarray, mask: np.ndarray, prob: np.ndarray | None = None) -> dict:
        """``{"regression": {name: ...}, "classification": {key: ...}}``: each task's metrics over its
        labelled rows. ``true`` / ``mask`` are over :attr:`label_columns`; ``prob`` over the heads."""
        out: dict = {"regression": {}, "classification": {}}
        cols = list(self.label_columns)
        for k, t in enumerate(self.regression):
            m = mask[:, k]
            out["regression"][t.name] = t.metrics(pred[m, k], true[m, k])
        head_of = {t.name: j for j, t in enumerate(self.heads)}
        for t in self.binary:
            if t.label_column not in cols:
                continue
            k = cols.index(t.label_column)
            m = mask[:, k]
            if prob is not None and t.name in head_of:
                out["classification"][t.key] = t.metrics(None, true[m, k], prob[m, head_of[t.name]])
            elif t.source is not None and t.source in self.names:
                out["classification"][t.key] = t.metrics(pred[m, self.names.index(t.source)], true[m, k])
        return out

    def record(self, mean=None, std=None) -> dict:
        """What a checkpoint records of its tasks (plain JSON types): targets, units, kinds, classes, the
        binary tasks' definitions and the standardisation (per-target flag, train-split mean / std)."""
        rec = {"targets": list(self.names), "units": self.units(),
               "kinds": {t.name: t.kind for t in self.regression + self.binary},
               "classes": list(self.class_names),
               "binary": [{"name": t.name, "source": t.source, "threshold": t.threshold, "below": t.below,
                           "head": t.head}
                          for t in self.binary],
               "standardised": {t.name: t.standardise for t in self.regression}}
        if mean is not None:
            rec["mean"] = [float(x) for x in np.asarray(mean).reshape(-1)]
            rec["std"] = [float(x) for x in np.asarray(std).reshape(-1)]
        return rec

    # -- construction --------------------------------------------------------------------------------
    @classmethod
    def from_configs(cls, model_cfg, train_cfg=None, units: Mapping[str, str] | None = None) -> TaskSet:
        """The tasks of a run: the model's ``targets`` (units from the cache, else the OQMD units), losses,
        weights and standardisation from the train config; the OQMD classifications (with heads when
        ``classification_heads``; scored from band_gap / magnetization otherwise); and a head per
        ``binary_targets`` column (0/1 labels)."""
        from cgnn_dgl.config import TrainConfig

        t = train_cfg if train_cfg is not None else TrainConfig()
        units = dict(units or {})
        reg = tuple(Task(n, unit=units.get(n) or TARGET_UNITS.get(n, ""), loss=t.loss_of(n), weight=t.weight(n),
                         standardise=t.standardize) for n in model_cfg.targets)
        names = tuple(model_cfg.targets)
        heads, headless = [], []
        for name, key, source, thr, decision in OQMD_CLASSES:
            task = Task(name, "probability", BINARY, "bce", t.classification_weight, False, source,
                        getattr(t, thr), getattr(t, decision), bool(model_cfg.classification_heads), key)
            if task.head:
                heads.append(task)
            elif source in names:
                headless.append(task)
        rules = dict(getattr(t, "binary_from", {}) or {})
        for n in getattr(model_cfg, "binary_targets", ()):
            if n not in rules:  # 0/1 labels read from its own column
                heads.append(Task(n, "probability", BINARY, "bce", t.classification_weight, False))
                continue
            source, below, thr = parse_rule(rules[n], f"train.binary_from.{n}")
            if source not in names:
                raise UsageError(f"train.binary_from.{n}: {source!r} is not a target of the model {names}")
            heads.append(Task(n, "probability", BINARY, "bce", t.classification_weight, False, source, thr,
                              head=True, below=below))
        extra = sorted(set(rules) - set(getattr(model_cfg, "binary_targets", ())))
        if extra:
            raise UsageError(f"train.binary_from: {extra[0]!r} is not in model.binary_targets")
        return cls(reg, tuple(heads + headless), tuple(t.used_targets(names)), t.classification_weight)


def oqmd_preset(train_cfg=None, classification_heads: bool = True) -> TaskSet:
    """The four OQMD targets (formation energy, volume per atom, band gap, magnetization) and the two
    classifications derived from them (insulator: band_gap > train.gap_threshold; magnetic: magnetization
    > train.mag_threshold), as every config before the task layer trained them."""
    from cgnn_dgl.config import ModelConfig

    return TaskSet.from_configs(ModelConfig(targets=TARGETS, classification_heads=classification_heads), train_cfg)


def untrained_columns(task_record: dict | None) -> list[str]:
    """The output columns of a model that learnt nothing, from its checkpoint's task record: targets
    without a label in the training split, and ``p_<class>`` of heads whose loss was off (one class
    only). Empty for a checkpoint older than the record."""
    rec = task_record or {}
    out = [t for t, n in (rec.get("training_labels") or {}).items() if int(n) == 0]
    out += [f"p_{c}" for c, trained in (rec.get("heads_trained") or {}).items() if not trained]
    return out


UNTRAINED_NOTE = ("the model saw no (or only one class of) training labels for these columns: their values "
                  "are not predictions")
