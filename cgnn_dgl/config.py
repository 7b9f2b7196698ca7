"""Typed configuration, one module for the whole run: :class:`ModelConfig` (every option of the
reference GGNN), :class:`TrainConfig`, and :class:`RunConfig` (both, as read from a YAML/JSON file
with ``--set`` overrides), plus the generic dataclass <-> dict helpers they share.

``dataclass_from_dict`` rejects unknown keys and values of the wrong type with
:class:`cgnn_dgl.errors.UsageError` naming the key, so a typo in a YAML/JSON file or a ``--set k=v``
never passes silently.

Typed training configuration and the run configuration file (model + train), with ``--set`` overrides.

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

import contextlib
import copy
import dataclasses
import json
import re
import types
import typing
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from cgnn_dgl import TARGETS
from cgnn_dgl.errors import UsageError

# ---------------------------------------------------------------------------------------------------
# Generic helpers
# ---------------------------------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and return it in canonical form (lists -> tuples,
    ints -> floats for float fields). Raises UsageError naming ``key``."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except UsageError:
                pass
        raise UsageError(f"config key {key!r}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")
    if origin is typing.Literal:
        if value in typing.get_args(tp):
            return value
        raise UsageError(f"config key {key!r}: expected one of {typing.get_args(tp)}, got {value!r}")
    if origin in (tuple, list):
        if isinstance(value, str) or not isinstance(value, (list, tuple)):
            raise UsageError(f"config key {key!r}: expected a list, got {value!r} ({type(value).__name__})")
        args = typing.get_args(tp)
        if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
            items = tuple(_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
        elif origin is tuple and args:
            if len(args) != len(value):
                raise UsageError(f"config key {key!r}: expected {len(args)} items, got {len(value)}")
            items = tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(args, value)))
        else:
            inner = args[0] if args else Any
            items = tuple(_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value))
        return items if origin is tuple else list(items)
    if origin is dict:
        if not isinstance(value, Mapping):
            raise UsageError(f"config key {key!r}: expected a mapping, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise UsageError(f"config key {key!r}: expected a mapping, got {value!r}")
        return dataclass_from_dict(tp, value, prefix=f"{key}.")
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    elif isinstance(tp, type):
        if isinstance(value, tp):
            return value
    else:  # an annotation we do not interpret
        return value
    raise UsageError(f"config key {key!r}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")


def dataclass_from_dict(cls, data: Mapping[str, Any], prefix: str = ""):
    """Build dataclass ``cls`` from a mapping, checking every value against the field annotations.

    Unknown keys and wrong types raise :class:`UsageError` naming the key (``prefix`` is prepended,
    for nested configs). Missing keys take the field defaults. ``bool`` is never accepted for ``int``
    or ``float`` fields and strings are never parsed here (do that in the CLI layer).
    """
    if not isinstance(data, Mapping):
        raise UsageError(f"{cls.__name__}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [k for k in data if k not in fields]
    if unknown:
        raise UsageError(
            f"unknown {cls.__name__} key {prefix}{unknown[0]!r}"
            + (f" (and {len(unknown) - 1} more: {unknown[1:]})" if len(unknown) > 1 else "")
            + f"; valid keys: {', '.join(sorted(fields))}"
        )
    kwargs = {k: _coerce(v, hints[k], prefix + k) for k, v in data.items()}
    return cls(**kwargs)


def dataclass_to_dict(obj) -> dict[str, Any]:
    """Plain JSON/YAML-friendly dict of a dataclass (tuples become lists)."""

    def plain(v):
        if dataclasses.is_dataclass(v) and not isinstance(v, type):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(obj)


# ---------------------------------------------------------------------------------------------------
# ModelConfig
# ---------------------------------------------------------------------------------------------------

VALENCE_MODES = ("none", "classification", "all")  # model.valence_features

_ACTIVATION_RE = re.compile(r"^(softplus|ssp|relu|selu|elu|celu)(\((\d+\.\d+)\))?$")


def check_activation(name: str | None, key: str, allow_none: bool) -> None:
    """Validate an activation name of the reference (``softplus``, ``ssp``, ``elu``/``elu(α)``, ``relu``,
    ``selu``, ``celu``/``celu(α)``; case-insensitive; α needs a decimal point; ``None`` where allowed)."""
    if name is None or (isinstance(name, str) and name.lower() == "none"):
        if allow_none:
            return
        raise UsageError(f"config key {key!r}: an activation is required here (None is not allowed)")
    m = _ACTIVATION_RE.match(name.strip().lower())
    if m is None or (m.group(2) and m.group(1) not in ("elu", "celu")):
        raise UsageError(
            f"config key {key!r}: unsupported activation {name!r}; expected softplus, ssp, relu, selu, "
            "elu, celu, elu(α) or celu(α) with a decimal α such as ELU(0.5)"
        )


@dataclass
class ModelConfig:
    """Every option of the reference ``GGNN`` (Tony-Y/cgnn ``src/cgnn.py`` names and CLI defaults, except
    ``n_node_feat`` which is fixed at the 89 OQMD species), plus the output heads.

    Use :meth:`preset` for the reference models (``benchmark``, ``no_edgenet``, ``complete``).
    ``targets`` names the regression outputs (columns of the model output: any columns of the cache, the
    OQMD four by default); ``classification_heads`` adds the OQMD preset's two logits (insulator,
    magnetic) and ``binary_targets`` one logit per cache column of 0/1 labels (:mod:`cgnn_dgl.tasks`).
    """

    n_node_feat: int = 89
    n_hidden_feat: int = 16
    n_graph_feat: int = 32
    n_conv: int = 3
    n_fc: int = 2
    activation: str = "softplus"
    use_batch_norm: bool = False
    node_activation: str | None = None
    use_node_batch_norm: bool = False
    edge_activation: str | None = None
    use_edge_batch_norm: bool = False
    n_edge_net_feat: int = 16
    n_edge_net_layers: int = 0
    edge_net_activation: str = "elu"
    use_edge_net_batch_norm: bool = False
    use_fast_edge_network: bool = False
    fast_edge_network_type: int = 0
    use_aggregated_edge_network: bool = False
    edge_net_cardinality: int = 32
    edge_net_width: int = 4
    use_edge_net_shortcut: bool = False
    n_postconv_net_layers: int = 0
    postconv_net_activation: str = "elu"
    use_postconv_net_batch_norm: bool = False
    conv_bias: bool = False
    edge_net_bias: bool = False
    postconv_net_bias: bool = False
    full_pooling: bool = False
    gated_pooling: bool = False
    conv_type: int = 0
    use_extension: bool = False
    targets: tuple[str, ...] = TARGETS
    classification_heads: bool = False
    binary_targets: tuple[str, ...] = ()
    # Stop-gradient for the classification heads (issue 11): they read a detached copy of the trunk's
    # graph features, so their BCE loss trains the two logits only and never pulls on the regression
    # trunk. Off by default (no parameter, no change to any preset); needs classification_heads.
    classification_detach: bool = False
    # Width of one hidden layer (activation ``activation``) in the classification heads; 0 = one linear
    # layer on the graph features (a linear probe). A hidden layer lets a detached head read the trunk
    # nonlinearly without touching the regression.
    classification_hidden: int = 0
    # Optional scale-invariant geometry (not in the reference; off in every preset): each bond's
    # distance / cutoff, d / ((r_i + r_j) * factor_vol * 1.2), in a Gaussian basis of ``geometry_basis``
    # functions, enters every convolution's per-bond gate and message. See cgnn_dgl.model.layers.RadialBasis.
    geometry: bool = False
    geometry_basis: int = 16
    # Optional elemental descriptors (not in the reference; off in every preset): 16 standardized
    # element properties (Z, row, group, electronegativity, radius, ...) enter the node embedding
    # beside the one-hot. See cgnn_dgl.model.species.species_descriptors.
    species_descriptors: bool = False
    # Optional valence flags of the composition (not in the reference; off in every preset): whether the
    # crystal can be charge-balanced with common oxidation states, and with every ion in a closed shell
    # (cgnn_dgl.model.valence). "classification": extra inputs of the classification heads only (the
    # regression stays bit-identical); "all": of the regression layer too; "none": no module, no buffer.
    valence_features: str = "none"
    # Hurdle predictions for zero-inflated targets (not in the reference; none in any preset): for each
    # target named here (band_gap with the insulator head, magnetization with the magnetic head) a second
    # output, trained on the positive crystals only (insulators), gives the prediction where the head says
    # positive (p > 0.5); elsewhere the plain regression output stands. It reads what the classification
    # heads read. See cgnn_dgl.tasks.hurdle_pairs.
    hurdle_targets: tuple[str, ...] = ()

    PRESETS: typing.ClassVar[dict[str, dict[str, Any]]] = {}

    def __post_init__(self) -> None:
        if isinstance(self.targets, list):
            self.targets = tuple(self.targets)
        if isinstance(self.binary_targets, list):
            self.binary_targets = tuple(self.binary_targets)
        if isinstance(self.hurdle_targets, list):
            self.hurdle_targets = tuple(self.hurdle_targets)
        # "None" spelled as a string (YAML / --set) means no activation.
        for key in ("node_activation", "edge_activation"):
            v = getattr(self, key)
            if isinstance(v, str) and v.lower() == "none":
                setattr(self, key, None)
        self.validate()

    def validate(self) -> None:
        """Raise :class:`UsageError` for an inconsistent or unsupported configuration."""
        if self.n_node_feat != 89:
            raise UsageError("config key 'n_node_feat': only the 89 OQMD species one-hot (89) is supported")
        for key in ("n_hidden_feat", "n_graph_feat", "n_conv", "n_fc", "edge_net_cardinality", "edge_net_width"):
            if getattr(self, key) < 1:
                raise UsageError(f"config key {key!r}: must be >= 1, got {getattr(self, key)}")
        for key in ("n_edge_net_layers", "n_postconv_net_layers", "conv_type"):
            if getattr(self, key) < 0:
                raise UsageError(f"config key {key!r}: must be >= 0, got {getattr(self, key)}")
        if self.classification_detach and not (self.classification_heads or self.binary_targets):
            raise UsageError("config key 'classification_detach': needs classification_heads: true or binary_targets")
        if self.classification_hidden < 0:
            raise UsageError(f"config key 'classification_hidden': must be >= 0, got {self.classification_hidden}")
        if self.classification_hidden and not (self.classification_heads or self.binary_targets):
            raise UsageError("config key 'classification_hidden': needs classification_heads: true or binary_targets")
        if self.valence_features not in VALENCE_MODES:
            raise UsageError(f"config key 'valence_features': expected one of {', '.join(VALENCE_MODES)}, "
                             f"got {self.valence_features!r}")
        if self.valence_features == "classification" and not (self.classification_heads or self.binary_targets):
            raise UsageError("config key 'valence_features: classification': needs classification_heads: true "
                             "or binary_targets")
        if self.hurdle_targets:
            from cgnn_dgl.tasks import OQMD_CLASSES

            gates = {c[2]: c[0] for c in OQMD_CLASSES}
            for t in self.hurdle_targets:
                if t not in gates:
                    raise UsageError(f"config key 'hurdle_targets': {t!r} has no classification head to gate it; "
                                     f"expected some of {', '.join(gates)}")
                if t not in self.targets or not self.classification_heads:
                    raise UsageError(f"config key 'hurdle_targets': {t} needs {t} in targets and "
                                     f"classification_heads: true (its {gates[t]} head)")
            if len(set(self.hurdle_targets)) != len(self.hurdle_targets):
                raise UsageError("config key 'hurdle_targets': a target is named twice")
        if self.geometry and self.geometry_basis < 2:
            raise UsageError(f"config key 'geometry_basis': must be >= 2, got {self.geometry_basis}")
        if self.n_edge_net_layers > 0 and self.n_edge_net_feat < 1:
            raise UsageError("config key 'n_edge_net_feat': must be >= 1")
        if self.fast_edge_network_type not in (0, 1):
            raise UsageError(f"config key 'fast_edge_network_type': must be 0 or 1, got {self.fast_edge_network_type}")
        check_activation(self.activation, "activation", allow_none=False)
        check_activation(self.node_activation, "node_activation", allow_none=True)
        check_activation(self.edge_activation, "edge_activation", allow_none=True)
        check_activation(self.edge_net_activation, "edge_net_activation", allow_none=False)
        check_activation(self.postconv_net_activation, "postconv_net_activation", allow_none=False)
        if not self.targets:
            raise UsageError("config key 'targets': at least one target is needed")
        for key in ("targets", "binary_targets"):
            bad = [t for t in getattr(self, key) if not isinstance(t, str) or not t.strip()]
            if bad:
                raise UsageError(f"config key {key!r}: target names must be non-empty strings, got {bad[0]!r}")
        names = list(self.targets) + list(self.binary_targets)
        if len(set(names)) != len(names):
            dup = sorted({t for t in names if names.count(t) > 1})
            raise UsageError(f"config key 'targets': duplicate target {', '.join(dup)}")

    @property
    def n_targets(self) -> int:
        return len(self.targets)

    @property
    def has_edge_network(self) -> bool:
        return self.n_edge_net_layers > 0

    @classmethod
    def preset(cls, name: str, **overrides) -> ModelConfig:
        """A reference configuration (``benchmark``, ``no_edgenet``, ``complete``) with overrides.

        With ``targets=("formation_energy",)`` the parameter counts are those of the reference:
        212,833 / 288,097 / 490,849.
        """
        if name not in cls.PRESETS:
            raise UsageError(f"unknown model preset {name!r}; expected one of {sorted(cls.PRESETS)}")
        return cls.from_dict({**cls.PRESETS[name], **overrides})

    def to_dict(self) -> dict[str, Any]:
        return dataclass_to_dict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelConfig:
        return dataclass_from_dict(cls, data)

    def replace(self, **changes) -> ModelConfig:
        return self.from_dict({**self.to_dict(), **changes})


_BENCHMARK = dict(
    n_node_feat=89,
    n_hidden_feat=96,
    n_graph_feat=192,
    n_conv=4,
    n_fc=2,
    activation="softplus",
    use_batch_norm=True,
    full_pooling=True,
    gated_pooling=True,
)
_NO_EDGENET = dict(_BENCHMARK, n_postconv_net_layers=2, use_postconv_net_batch_norm=True)
_COMPLETE = dict(
    _NO_EDGENET,
    n_edge_net_feat=144,
    n_edge_net_layers=1,
    use_fast_edge_network=True,
    fast_edge_network_type=1,
    use_edge_net_shortcut=True,
)
ModelConfig.PRESETS.update(benchmark=_BENCHMARK, no_edgenet=_NO_EDGENET, complete=_COMPLETE)

MODEL_PRESETS = tuple(ModelConfig.PRESETS)


# ---------------------------------------------------------------------------------------------------
# Training and the run file
# ---------------------------------------------------------------------------------------------------

OPTIMIZERS = ("adam", "amsgrad", "sgd")
LOSSES = ("mse", "l1", "huber")
SCHEDULERS = ("multistep", "step", "cosine", "none")
DEVICES = ("cpu", "cuda")
LOADERS = ("auto", "dgl", "flat")
AMP_MODES = ("none", "bf16")


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
    warmup_epochs: int = 0  # > 0: linear LR warm-up from lr / (warmup_epochs + 1) over these epochs, then the schedule
    clip_value: float = 0.0  # > 0: clip_grad_value_
    # > 0: "precise batch norm". Before each validation the batch-norm running statistics are recomputed
    # as the plain average over the whole training split, in batches of this size, instead of the
    # momentum-0.1 trace of the last ~10 training batches. At small batch sizes that trace is noisy, so
    # validation scores (and the best.pt choice) jitter from epoch to epoch even at a tiny LR.
    precise_bn_batch_size: int = 0
    seed: int = 12345
    patience: int = 0  # early stopping: stop after this many epochs without improvement (0 = off)
    min_delta: float = 0.0
    device: str = "cpu"
    num_threads: int = 0  # torch.set_num_threads; 0 = leave torch's default
    backend: str = "auto"  # graph ops: auto | dgl | torch
    # GPU data path and numerics (cgnn_dgl/step.py)
    loader: str = "auto"  # auto: flat index tensors when the graph backend is torch, DGL batch graphs otherwise
    amp: str = "none"  # none | bf16 (torch.autocast; loss and optimizer state stay float32)
    compile: bool = False  # torch.compile the model; falls back to eager (with a warning) if compiling fails
    deterministic: bool = False  # torch.use_deterministic_algorithms; cost measured by bench/gpu.py
    # tasks
    targets: list[str] | None = None  # targets in the loss; None = every head of the model
    task_weights: dict[str, float] = field(default_factory=dict)  # default 1.0 each
    standardize: bool = True  # train on (y - mean) / std of the training split
    loss: str = "mse"  # mse (the reference) | l1 | huber, on standardised targets
    target_loss: dict[str, str] = field(default_factory=dict)  # per-target override, e.g. {band_gap: l1}
    classification_weight: float = 1.0  # weight of the BCE loss of optional classification heads
    # Weight each head's positive class by n_negative / n_positive of the training split (BCE pos_weight), so
    # that a rare class (insulators are 4% of Perov-5) pulls on the head as much as the common one
    classification_balance: bool = False
    # model.binary_targets derived from a regression target by a rule, e.g. {stable: "e_hull < 0.05"}; the
    # others read their own column of 0/1 labels (cgnn_dgl/tasks.py)
    binary_from: dict[str, str] = field(default_factory=dict)
    gap_threshold: float = 0.0
    mag_threshold: float = 0.05
    gap_decision_threshold: float = 0.1
    mag_decision_threshold: float = 0.05
    # ensembles (cgnn_dgl/ensemble.py): N members with seeds seed, seed+1, ... in RUN/member_k/
    ensemble: int = 1
    bootstrap: bool = False  # train on a bootstrap resample of the training split (drawn from the seed)
    # Cross-fitting: member k of N leaves out fold k of N of the training split (folds grouped by reduced
    # formula, drawn from split_seed), so every training crystal has one member that never saw it. The
    # local training error of the std (local_error_uncertainty) is then that member's out-of-fold error,
    # an honest error, instead of the ensemble's in-sample one, which is small wherever it memorised.
    crossfit: bool = False
    # the number of folds F (0: the ensemble size N); with F > N member k still leaves out fold k only, so
    # each member trains on (F-1)/F of the data and folds N .. F-1 are seen by every member
    crossfit_folds: int = 0
    crossfit_fold: int = -1  # set per member by the ensemble: the fold this model leaves out (-1: none)
    # Latent-distance term in the ensemble std: the mean distance of a crystal's graph features to its 5
    # nearest training crystals (a sample of distance_reference of them), per member, mixed with the member
    # spread in a proportion fitted on val (Gaussian likelihood). Far from the training data the
    # members can agree and still be wrong; the distance sees that. See cgnn_dgl.ensemble.LatentDistance.
    distance_uncertainty: bool = False
    distance_reference: int = 20000
    # A third term (needs distance_uncertainty): the local training error, the ensemble's mean absolute
    # error on the same nearest reference crystals, per target, with its own share fitted on val. It is
    # where the model stays wrong on its own training data (insulators' gaps among metals, say).
    local_error_uncertainty: bool = False
    workers: int = 1  # ensemble members trained at the same time, in separate processes
    # data and outputs
    cache: str | None = None
    split: str = "formula"  # formula (the reference's, grouped by formula) | random (seeded) | file (split_file)
    split_file: str | None = None  # ids per part (JSON train/val/test lists or CSV id,split); implies split: file
    val_fraction: float = 0.1
    test_fraction: float = 0.1
    split_seed: int = 12345
    out_dir: str = "runs/cgnn"
    progress: bool = True
    record_seen: bool = False  # debug: write the entry ids each process trained on in epoch 1
    # fine-tuning (cgnn_dgl/finetune.py): start from the trunk of this model (RUN/best.pt, or a reference
    # state_dict whose preset init_arch names); heads of targets it lacks are fresh
    init: str | None = None
    init_arch: str | None = None  # benchmark | no_edgenet | complete, for a reference state_dict
    freeze_trunk_epochs: int = 0  # train only the heads for the first N epochs (needs init)

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
        if self.loader not in LOADERS:
            bad(f"loader: {self.loader!r} is not one of {LOADERS}")
        if self.amp not in AMP_MODES:
            bad(f"amp: {self.amp!r} is not one of {AMP_MODES}")
        if self.lr <= 0:
            bad(f"lr must be > 0 (got {self.lr})")
        if self.distance_reference < 10:
            bad(f"distance_reference must be >= 10 (got {self.distance_reference})")
        if self.local_error_uncertainty and not self.distance_uncertainty:
            bad("local_error_uncertainty needs distance_uncertainty: true (it uses the same nearest reference crystals)")
        if self.precise_bn_batch_size < 0:
            bad(f"precise_bn_batch_size must be >= 0 (got {self.precise_bn_batch_size})")
        if self.batch_size < 1 or self.eval_batch_size < 0:
            bad("batch_size must be >= 1 and eval_batch_size >= 0")
        if self.epochs < 0:
            bad(f"epochs must be >= 0 (got {self.epochs})")
        if self.scheduler in ("multistep", "step", "cosine") and not self.milestones:
            bad(f"milestones must not be empty with scheduler {self.scheduler}")
        if self.ensemble < 1 or self.workers < 1:
            bad(f"ensemble and workers must be >= 1 (got {self.ensemble}, {self.workers})")
        if self.crossfit and self.crossfit_fold < 0 and self.ensemble < 2:
            bad("crossfit needs train.ensemble >= 2 (member k leaves out fold k of the ensemble size)")
        if self.crossfit and self.bootstrap:
            bad("crossfit and bootstrap are two ways to leave data out of a member; choose one")
        if self.crossfit and self.crossfit_fold < 0 and 0 < self.crossfit_folds < self.ensemble:
            bad(f"crossfit_folds {self.crossfit_folds} is smaller than the ensemble ({self.ensemble}): "
                "each member needs a fold of its own")
        if self.crossfit_fold >= 0 and not 0 <= self.crossfit_fold < self.crossfit_folds:
            bad(f"crossfit_fold {self.crossfit_fold} is not one of the {self.crossfit_folds} folds")
        if self.crossfit_fold >= 0 and self.crossfit_folds < 2:
            bad(f"crossfit_folds must be >= 2 (got {self.crossfit_folds}): one fold would leave out all the data")
        if self.warmup_epochs < 0:
            bad(f"warmup_epochs must be >= 0 (got {self.warmup_epochs})")
        if self.patience < 0 or self.clip_value < 0 or self.weight_decay < 0:
            bad("patience, clip_value and weight_decay must be >= 0")
        if not (0 <= self.val_fraction < 1 and 0 <= self.test_fraction < 1
                and self.val_fraction + self.test_fraction < 1):
            bad(f"val_fraction + test_fraction must be < 1 (got {self.val_fraction}, {self.test_fraction})")
        for t in self.targets or []:
            if t not in model_targets:
                bad(f"targets: {t!r} is not a head of the model {tuple(model_targets)}")
        # settings for the OQMD targets a model lacks are ignored (one config serves several target sets);
        # any other name must be a target of the model, so typos do not pass
        known = tuple(model_targets) + tuple(t for t in TARGETS if t not in model_targets)
        for t, name in {"*": self.loss, **self.target_loss}.items():
            if name not in LOSSES:
                bad(f"loss{'' if t == '*' else f' of {t}'}: {name!r} is not one of {LOSSES}")
            if t != "*" and t not in known:
                bad(f"target_loss: unknown target {t!r}; expected some of {known}")
        for t, w in self.task_weights.items():
            if t not in known:
                bad(f"task_weights: unknown target {t!r}; expected some of {known}")
            if w < 0:
                bad(f"task_weights: weight of {t} must be >= 0")
        from cgnn_dgl.tasks import parse_rule

        for name, rule in self.binary_from.items():
            source, _, _ = parse_rule(rule, f"train.binary_from.{name}")
            if source not in model_targets:
                bad(f"binary_from.{name}: {source!r} is not a target of the model {tuple(model_targets)}")
        if self.split not in ("formula", "random", "file"):
            bad(f"split: {self.split!r} is not one of formula, random, file")
        if self.split == "file" and not self.split_file:
            bad("split: file needs train.split_file (a JSON or CSV of ids per part)")
        if self.split == "random" and self.split_file:
            bad("split: random and a split_file exclude each other; drop one")
        if check_files and self.split_file is not None and not Path(self.split_file).is_file():
            bad(f"split_file: {self.split_file} not found")
        if self.freeze_trunk_epochs < 0:
            bad(f"freeze_trunk_epochs must be >= 0 (got {self.freeze_trunk_epochs})")
        if self.freeze_trunk_epochs and not self.init:
            bad("freeze_trunk_epochs needs train.init (--init CKPT): a fresh trunk has nothing worth keeping")
        if self.init_arch is not None and self.init_arch not in MODEL_PRESETS:
            bad(f"init_arch: {self.init_arch!r} is not one of {MODEL_PRESETS}")
        if self.init_arch is not None and not self.init:
            bad("init_arch names the model of a train.init reference state_dict; give train.init (--init CKPT)")
        if check_files and self.init is not None and Path(self.init).is_dir():
            found = [str(p) for p in (Path(self.init) / "best.pt", Path(self.init) / "member_0" / "best.pt") if p.is_file()]
            bad(f"init: {self.init} is a folder; give a checkpoint file"
                + (f", e.g. {' or '.join(found)}" if found else " (the folder holds no best.pt)"))
        if check_files and self.init is not None and not Path(self.init).is_file():
            bad(f"init: {self.init} not found")

    def used_targets(self, model_targets) -> list[str]:
        return list(self.targets) if self.targets else list(model_targets)

    def loss_of(self, target: str) -> str:
        return self.target_loss.get(target, self.loss)

    def weight(self, target: str) -> float:
        return float(self.task_weights.get(target, 1.0))

    def to_dict(self) -> dict[str, Any]:
        return copy.deepcopy(asdict(self))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        data = dict(data)
        # YAML reads 1e-3 as a string; accept numbers written that way for float fields.
        for f in fields(cls):
            if f.name in data and isinstance(data[f.name], str) and "float" in str(f.type):
                with contextlib.suppress(ValueError):
                    data[f.name] = float(data[f.name])
        return dataclass_from_dict(cls, data)


@dataclass
class RunConfig:
    model: ModelConfig
    train: TrainConfig

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model.to_dict(), "train": self.train.to_dict()}

    @classmethod
    def from_dict(cls, data: dict[str, Any], check_files: bool = True) -> RunConfig:
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
        import yaml  # lazy: the GPU path (model, step) imports config where only torch and numpy exist

        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


def parse_scalar(text: str) -> Any:
    """A ``--set`` value as YAML would read it (numbers, bools, null, [lists], {maps}); else the string."""
    import yaml

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
    import yaml

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


@dataclass(frozen=True)
class ScreenConfig:
    """Settings of one `cgnn screen` run (cgnn_dgl/screen.py); built from the command line, recorded in
    the output folder's screen.json so that a rerun resumes only with the same settings."""

    model: str
    prototype: str
    sites: tuple[tuple[tuple[int, ...], tuple[str, ...]], ...]  # (site indices, element pool) per --site
    out: str
    top: int = 20
    db: str | None = None
    rank_by: str | None = None  # a model target or e_above_hull; None = the default rule of screen.py
    descending: bool = False
    shard: tuple[int, int] = (0, 1)
    chunk_size: int = 8192  # decoration keys per chunk (one atomically written part file each)
    batch_size: int = 1024
    device: str = "cpu"
    selection: str = "reference"  # ingest's rule for which calculation represents a known material
    symprec: float = 1e-3
    overlap_tolerance: float = 0.5  # Å: a prototype with atoms closer than this is refused (coordinator.OVERLAP_TOLERANCE)
