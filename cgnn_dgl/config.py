"""Typed configuration: :class:`ModelConfig` (every option of the reference GGNN) and the generic
dataclass <-> dict helpers (:func:`dataclass_from_dict`, :func:`dataclass_to_dict`) that other configs
in this module reuse.

``dataclass_from_dict`` rejects unknown keys and values of the wrong type with
:class:`cgnn_dgl.errors.UsageError` naming the key, so a typo in a YAML/JSON file or a ``--set k=v``
never passes silently.
"""
from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass
from typing import Any, Mapping

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
    ``targets`` names the regression outputs (columns of the model output, a subset of
    :data:`cgnn_dgl.TARGETS` in any order); ``classification_heads`` adds two logits
    (insulator, magnetic).
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

    PRESETS: typing.ClassVar[dict[str, dict[str, Any]]] = {}

    def __post_init__(self) -> None:
        if isinstance(self.targets, list):
            self.targets = tuple(self.targets)
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
        bad = [t for t in self.targets if t not in TARGETS]
        if bad:
            raise UsageError(f"config key 'targets': unknown target {bad[0]!r}; expected some of {TARGETS}")
        if len(set(self.targets)) != len(self.targets):
            raise UsageError("config key 'targets': duplicate target")

    @property
    def n_targets(self) -> int:
        return len(self.targets)

    @property
    def has_edge_network(self) -> bool:
        return self.n_edge_net_layers > 0

    @classmethod
    def preset(cls, name: str, **overrides) -> "ModelConfig":
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
    def from_dict(cls, data: Mapping[str, Any]) -> "ModelConfig":
        return dataclass_from_dict(cls, data)

    def replace(self, **changes) -> "ModelConfig":
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
