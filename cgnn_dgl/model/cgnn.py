"""The CGNN model (the reference ``GGNN``) with multitask heads, and reference-weight loading."""
from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

from cgnn_dgl.config import ModelConfig
from cgnn_dgl.errors import CgnnError
from cgnn_dgl.graph_ops import GraphIndex, mean_per_crystal
from cgnn_dgl.model.activations import get_activation
from cgnn_dgl.model.layers import (
    AggregatedEdgeNetwork,
    ClassificationHead,
    EdgeNetwork,
    FastEdgeNetwork,
    FullConnection,
    GatedGraphConvolution,
    GatedPooling,
    GraphPooling,
    LinearPooling,
    LinearRegression,
    NodeEmbedding,
    PostconvolutionNetwork,
    RadialBasis,
)
from cgnn_dgl.model.valence import FLAG_NAMES as VALENCE_FLAG_NAMES
from cgnn_dgl.model.valence import ValenceFlags

CLASS_NAMES: tuple[str, ...] = ("insulator", "magnetic")
"""Columns of the OQMD preset's classification logits (``classification_heads=True``); a model's own are
:func:`cgnn_dgl.tasks.class_names` of its config."""

# state_dict entries of ours that the reference GGNN does not have.
EXTRA_BUFFERS = ("target_mean", "target_std")
EXTRA_PREFIXES = ("classification.",)


class CGNN(nn.Module):
    """Gated graph neural network of the reference (embedding -> T gated convolutions -> gated pooling
    of every block -> graph pooling -> FC layers -> linear regression [-> extension]).

    ``forward(z, gi)`` takes the atomic numbers of the batch's atoms (int64, ``(n_atoms,)``) and a
    :class:`~cgnn_dgl.graph_ops.GraphIndex`, and returns standardised predictions
    ``(n_crystals, n_targets)`` in the column order of ``config.targets`` (never squeezed).
    :meth:`to_physical` undoes the standardisation with the buffers ``target_mean``/``target_std``
    (defaults 0/1, saved in the state_dict). With ``config.classification_heads`` the method
    :meth:`forward_heads` returns ``{"regression": (n, n_targets), "logits": (n, n_classes)}`` from one
    pass, logit columns :func:`cgnn_dgl.tasks.class_names` (insulator, magnetic for the OQMD preset).
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        config.validate()
        self.config = config
        c = config
        act = lambda: get_activation(c.activation)  # noqa: E731 - one module instance per use
        self.embedding = NodeEmbedding(c.n_hidden_feat, c.species_descriptors)
        convs = []
        for _ in range(c.n_conv):
            edge_net = None
            if c.n_edge_net_layers > 0:
                edge_act = get_activation(c.edge_net_activation)
                if c.use_aggregated_edge_network:
                    edge_net = AggregatedEdgeNetwork(
                        c.n_hidden_feat, c.n_edge_net_feat, c.n_edge_net_layers, c.edge_net_cardinality,
                        c.edge_net_width, edge_act, c.use_edge_net_batch_norm, c.edge_net_bias,
                        c.use_edge_net_shortcut)
                elif c.use_fast_edge_network:
                    edge_net = FastEdgeNetwork(
                        c.n_hidden_feat, c.n_edge_net_feat, c.n_edge_net_layers, edge_act,
                        c.fast_edge_network_type, c.use_edge_net_batch_norm, c.edge_net_bias,
                        c.use_edge_net_shortcut)
                else:
                    edge_net = EdgeNetwork(
                        c.n_hidden_feat, c.n_edge_net_feat, c.n_edge_net_layers, edge_act,
                        c.use_edge_net_batch_norm, c.edge_net_bias, c.use_edge_net_shortcut)
            postconv = None
            if c.n_postconv_net_layers > 0:
                postconv = PostconvolutionNetwork(
                    c.n_hidden_feat, c.n_postconv_net_layers, get_activation(c.postconv_net_activation),
                    c.use_postconv_net_batch_norm, c.postconv_net_bias)
            convs.append(GatedGraphConvolution(
                c.n_hidden_feat,
                node_activation=get_activation(c.node_activation, allow_none=True),
                edge_activation=get_activation(c.edge_activation, allow_none=True),
                use_node_batch_norm=c.use_node_batch_norm,
                use_edge_batch_norm=c.use_edge_batch_norm,
                bias=c.conv_bias,
                conv_type=c.conv_type,
                edge_network=edge_net,
                postconv_network=postconv,
                geometry_basis=c.geometry_basis if c.geometry else 0))
        self.convs = nn.ModuleList(convs)
        self.radial = RadialBasis(c.geometry_basis) if c.geometry else None
        def pool():
            return GatedPooling(c.n_hidden_feat) if c.gated_pooling else LinearPooling()

        if c.full_pooling:
            pre = [pool() for _ in range(c.n_conv)]
        else:
            pre = [None] * (c.n_conv - 1) + [pool()]
        self.pre_poolings = nn.ModuleList(pre)
        n_steps = c.n_conv if c.full_pooling else 1
        self.pooling = GraphPooling(c.n_hidden_feat, n_steps, act(), c.use_batch_norm)
        self.fcs = nn.ModuleList(
            FullConnection(c.n_hidden_feat if k == 0 else c.n_graph_feat, c.n_graph_feat, act(), c.use_batch_norm)
            for k in range(c.n_fc))
        self.valence = ValenceFlags() if c.valence_features != "none" else None
        n_flags = len(VALENCE_FLAG_NAMES) if self.valence is not None else 0
        self.regression = LinearRegression(c.n_graph_feat + (n_flags if c.valence_features == "all" else 0),
                                           c.n_targets)
        from cgnn_dgl.tasks import class_names, hurdle_pairs

        n_classes = len(class_names(c))
        self.classification = (ClassificationHead(c.n_graph_feat + n_flags, n_classes, c.classification_hidden,
                                                  act()) if n_classes else None)
        self.hurdle = hurdle_pairs(c)
        # one output per hurdle target, on the classification heads' input, trained on positive crystals only
        self.conditional = (ClassificationHead(c.n_graph_feat + n_flags, len(self.hurdle), c.classification_hidden,
                                               act()) if self.hurdle else None)
        self.register_buffer("target_mean", torch.zeros(c.n_targets))
        self.register_buffer("target_std", torch.ones(c.n_targets))

    # -- forward ------------------------------------------------------------------------------------

    def graph_features(self, z: Tensor, gi: GraphIndex) -> Tensor:
        """The graph-level representation after the FC layers, ``(n_crystals, n_graph_feat)``."""
        x = self.embedding(z)
        rbf = None
        if self.radial is not None:
            if gi.bond_ratio is None:
                raise CgnnError("this model uses model.geometry, but the graphs carry no bond distance ratios "
                                "(a cache built before cgnn-dgl stored them): rebuild the cache with "
                                "`cgnn graphs ... --overwrite` or `cgnn ingest ... --overwrite`")
            rbf = self.radial(gi.bond_ratio.to(x.dtype))
        node_feats = []
        for conv, pre in zip(self.convs, self.pre_poolings):
            x = conv(x, gi, rbf)
            if pre is not None:
                node_feats.append(pre.node_features(x))
        pooled = mean_per_crystal(node_feats[0] if len(node_feats) == 1 else torch.cat(node_feats, dim=1), gi)
        h = self.pooling(pooled)
        for fc in self.fcs:
            h = fc(h)
        return h

    def valence_flags(self, z: Tensor, gi: GraphIndex) -> Tensor | None:
        """The crystals' valence flags ``(n_crystals, 4)`` with ``model.valence_features``, else None."""
        return None if self.valence is None else self.valence(z, gi.atom_crystal, gi.n_crystals)

    def _regression(self, h: Tensor, gi: GraphIndex, flags: Tensor | None = None) -> Tensor:
        if self.config.valence_features == "all":
            h = torch.cat([h, flags.to(h.dtype)], dim=1)
        y = self.regression(h)
        if self.config.use_extension:
            y = y * gi.atom_count.to(y.dtype).unsqueeze(1)
        return y

    def forward(self, z: Tensor, gi: GraphIndex) -> Tensor:
        """Standardised regression outputs ``(n_crystals, n_targets)``."""
        return self._regression(self.graph_features(z, gi), gi, self.valence_flags(z, gi))

    def forward_heads(self, z: Tensor, gi: GraphIndex, features: bool = False) -> dict[str, Tensor]:
        """``{"regression": (n, n_targets)[, "logits": (n, 2)]}`` from one pass (logits only with
        ``classification_heads`` or ``binary_targets``; columns :func:`cgnn_dgl.tasks.class_names`). With
        ``classification_detach`` the logits see a detached copy of the graph features: their loss trains
        the logit layer only. ``features``: also ``"features"``, the graph features (n, n_graph_feat). With
        ``hurdle_targets``: also ``"conditional"`` (n, n_hurdle), the outputs trained on positive crystals,
        and ``"prediction"``, the regression with the hurdle columns gated (:meth:`gate`): what to report;
        ``"regression"`` stays the plain output that its loss trains."""
        h = self.graph_features(z, gi)
        flags = self.valence_flags(z, gi)
        out = {"regression": self._regression(h, gi, flags)}
        if features:
            out["features"] = h
        if self.classification is not None:
            hc = h.detach() if self.config.classification_detach else h
            hc = hc if flags is None else torch.cat([hc, flags.to(hc.dtype)], dim=1)
            out["logits"] = self.classification(hc)
            if self.conditional is not None:
                out["conditional"] = self.conditional(hc)
                out["prediction"] = self.gate(out["regression"], out["logits"], out["conditional"])
        return out

    def gate(self, regression: Tensor, logits: Tensor, conditional: Tensor) -> Tensor:
        """The standardised predictions with each hurdle target's column taken from its conditional output
        where its head says positive (logit > 0, p > 0.5): the L1-optimal answer of a two-part model, whose
        median is the plain output (0 eV for a metal) below p = 0.5 and within the positive part above."""
        pred = regression.clone()
        for j, (col, head) in enumerate(self.hurdle):
            pred[:, col] = torch.where(logits[:, head] > 0, conditional[:, j].to(pred.dtype), regression[:, col])
        return pred

    # -- target standardisation ---------------------------------------------------------------------

    def set_target_stats(self, mean, std) -> None:
        """Set the per-target standardisation (physical = standardised * std + mean)."""
        mean = torch.as_tensor(mean, dtype=self.target_mean.dtype).reshape(-1)
        std = torch.as_tensor(std, dtype=self.target_std.dtype).reshape(-1)
        if mean.numel() != self.config.n_targets or std.numel() != self.config.n_targets:
            raise ValueError(f"expected {self.config.n_targets} means and stds")
        if not bool(torch.all(std > 0)):
            raise ValueError("target std must be positive")
        self.target_mean.copy_(mean)
        self.target_std.copy_(std)

    def to_physical(self, out: Tensor) -> Tensor:
        return out * self.target_std.to(out.dtype) + self.target_mean.to(out.dtype)

    def to_standardised(self, y: Tensor) -> Tensor:
        return (y - self.target_mean.to(y.dtype)) / self.target_std.to(y.dtype)

    def n_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # -- reference weights --------------------------------------------------------------------------

    @classmethod
    def from_reference(cls, state_dict_or_path, preset: str | None = None, **overrides) -> CGNN:
        """A single-target (formation energy by default) model with reference weights. ``preset`` is
        detected from the keys and shapes when not given."""
        sd = read_reference_state_dict(state_dict_or_path)
        preset = preset or detect_reference_preset(sd)
        overrides.setdefault("targets", ("formation_energy",))
        model = cls(ModelConfig.preset(preset, **overrides))
        load_reference_state_dict(model, sd)
        return model


def _is_extra(key: str) -> bool:
    return key in EXTRA_BUFFERS or key.startswith(EXTRA_PREFIXES)


def read_reference_state_dict(state_dict_or_path) -> dict[str, Tensor]:
    if isinstance(state_dict_or_path, (str, os.PathLike)):
        path = Path(state_dict_or_path)
        if not path.is_file():
            raise CgnnError(f"reference weights not found: {path}")
        sd = torch.load(path, weights_only=True, map_location="cpu")
    else:
        sd = state_dict_or_path
    if not isinstance(sd, Mapping):
        raise CgnnError("reference weights: expected a state_dict mapping")
    return dict(sd)


def reference_key_mismatch(model: CGNN, state_dict: Mapping[str, Tensor]) -> list[str]:
    """Problems loading ``state_dict`` into ``model``: missing/unexpected keys and shape mismatches."""
    own = {k: v for k, v in model.state_dict().items() if not _is_extra(k)}
    problems = [f"missing key {k}" for k in own if k not in state_dict]
    problems += [f"unexpected key {k}" for k in state_dict if k not in own]
    problems += [
        f"shape of {k}: reference {tuple(state_dict[k].shape)}, model {tuple(v.shape)}"
        for k, v in own.items()
        if k in state_dict and tuple(state_dict[k].shape) != tuple(v.shape)
    ]
    return problems


def detect_reference_preset(state_dict: Mapping[str, Tensor]) -> str:
    """Name of the preset whose single-target model has exactly these keys and shapes."""
    w = state_dict.get("regression.linear.weight")
    n_targets = max(1, int(w.shape[0]) if w is not None else 1)
    for name in ModelConfig.PRESETS:
        model = CGNN(ModelConfig.preset(name, targets=tuple(f"target_{k}" for k in range(n_targets))))
        if not reference_key_mismatch(model, state_dict):
            return name
    raise CgnnError("reference weights match none of the presets " + ", ".join(ModelConfig.PRESETS))


def load_reference_state_dict(model: CGNN, state_dict) -> CGNN:
    """Load a reference ``GGNN`` state_dict (or a path to a ``.pth``) into ``model``.

    Every reference key must exist in the model with the same shape and every model parameter/buffer
    must be given (except our own ``target_mean``/``target_std`` and classification head, left as
    they are); anything else raises :class:`CgnnError` listing the problems.
    """
    sd = read_reference_state_dict(state_dict)
    problems = reference_key_mismatch(model, sd)
    if problems:
        shown = "; ".join(problems[:8]) + (f"; ... ({len(problems)} in all)" if len(problems) > 8 else "")
        raise CgnnError(f"reference weights do not fit this model configuration: {shown}")
    merged = model.state_dict()
    merged.update(dict(sd.items()))
    model.load_state_dict(merged, strict=True)
    return model
