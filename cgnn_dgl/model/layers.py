"""CGNN layers (docs/cgnn-reference.md §3.1) on :mod:`cgnn_dgl.graph_ops`.

Module and parameter names follow the reference ``GGNN`` so that its ``state_dict`` loads unchanged.
The arithmetic is reordered where that is exact and cheaper:

* a linear map of the neighbour features, ``W h_j`` per bond, is ``(W h)[src]``: it is applied per atom
  and then gathered (a crystal has ~3.4x more bonds than atoms); without an edge network or edge batch
  norm the whole gated message ``σ(W_g h_j) ⊙ f(W_m h_j)`` is per atom and the convolution becomes a
  single sparse neighbour sum (:func:`~cgnn_dgl.graph_ops.sum_src_at_dst`);
* batch norms that the reference applies per bond still see per-bond tensors (gathered first), so the
  batch statistics are unchanged;
* the T pre-poolings are averaged in one call, and ``Σ_t W_t mean(p_t)`` is done as one matmul on the
  concatenated per-crystal means.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from cgnn_dgl import graph_ops as go
from cgnn_dgl.graph_ops import GraphIndex
from cgnn_dgl.model.species import N_DESCRIPTORS, N_SPECIES, species_descriptors, species_index, species_table


def bn_act(num_features: int, activation: nn.Module | None, use_batch_norm: bool) -> nn.Module | None:
    """``BN`` / ``Sequential(BN, act)`` / ``act`` / None, named like the reference's ``_bn_act``."""
    if use_batch_norm:
        bn = nn.BatchNorm1d(num_features)
        return bn if activation is None else nn.Sequential(bn, activation)
    return activation


def linear_bn(in_features: int, out_features: int, use_batch_norm: bool, bias: bool) -> nn.Module:
    """``Linear`` or ``Sequential(Linear(no bias), BN)`` (the reference's ``_add_bn``)."""
    linear = nn.Linear(in_features, out_features, bias=bias and not use_batch_norm)
    return nn.Sequential(linear, nn.BatchNorm1d(out_features)) if use_batch_norm else linear


def _split_linear_bn(module: nn.Module) -> tuple[nn.Linear, nn.Module | None]:
    if isinstance(module, nn.Sequential):
        return module[0], module[1]
    return module, None


def edge_net_shortcuts(in_features: int, out_features: int, n_layers: int) -> nn.ModuleList:
    """The bias-free residual projections W_s,l of the reference edge networks (one per layer)."""
    return nn.ModuleList(nn.Linear(in_features if i == 0 else out_features, out_features, bias=False)
                         for i in range(n_layers))


class NodeEmbedding(nn.Module):
    """``h = W_emb onehot(Z)`` done as a column lookup of ``linear.weight`` (d_h, 89).

    With ``descriptors`` (``model.species_descriptors``) a bias-free ``W_d d(Z)`` of the standardized
    element properties (:func:`~cgnn_dgl.model.species.species_descriptors`) is added, so that species
    seen rarely in training borrow from chemically similar ones. Off: no new parameter or buffer.
    """

    def __init__(self, out_features: int, descriptors: bool = False):
        super().__init__()
        self.linear = nn.Linear(N_SPECIES, out_features, bias=False)
        self.register_buffer("species_table", species_table(), persistent=False)
        self.descriptor = None
        if descriptors:
            self.register_buffer("descriptor_table", species_descriptors())
            self.descriptor = nn.Linear(N_DESCRIPTORS, out_features, bias=False)
            # zero init: training starts from the one-hot embedding alone (unit-scale descriptors through
            # a default init would swamp the one-hot columns by ~10x) and learns W_d from every species
            nn.init.zeros_(self.descriptor.weight)

    def forward(self, z: Tensor) -> Tensor:
        idx = species_index(z, self.species_table)
        h = F.embedding(idx, self.linear.weight.t())
        if self.descriptor is not None:
            h = h + self.descriptor(self.descriptor_table[idx])
        return h


class BatchNormBilinear(nn.Module):
    """``BN(bilinear(x1, x2))`` with the reference's attribute names."""

    def __init__(self, bilinear: nn.Module, out_features: int):
        super().__init__()
        self.bn = nn.BatchNorm1d(out_features)
        self.bilinear = bilinear

    def forward(self, x1: Tensor, x2: Tensor) -> Tensor:
        return self.bn(self.bilinear(x1, x2))


class EdgeNetwork(nn.Module):
    """Original (bilinear) edge network: ``z⁰ = h_j``, ``z ← f(B_l(h_i, z)) [+ W_s z]``."""

    def __init__(self, in_features, out_features, n_layers, activation, use_batch_norm, bias, use_shortcut):
        super().__init__()
        self.out_features = out_features
        b = bias and not use_batch_norm
        layers = [nn.Bilinear(in_features, in_features if i == 0 else out_features, out_features, bias=b)
                  for i in range(n_layers)]
        if use_batch_norm:
            layers = [BatchNormBilinear(layer, out_features) for layer in layers]
        self.bilinears = nn.ModuleList(layers)
        self.shortcuts = edge_net_shortcuts(in_features, out_features, n_layers) if use_shortcut else None
        self.activation = activation
        self.per_bond_batch_norm = use_batch_norm

    def forward(self, x: Tensor, gi: GraphIndex) -> Tensor:
        h = go.gather_dst(x, gi)  # centre h_i per bond
        z = go.gather_src(x, gi)  # neighbour h_j per bond
        for i, bilinear in enumerate(self.bilinears):
            if self.shortcuts is not None:
                sc = go.gather_src(self.shortcuts[0](x), gi) if i == 0 else self.shortcuts[i](z)
            z = self.activation(bilinear(h, z))
            if self.shortcuts is not None:
                z = z + sc
        return z


class FastEdgeNetwork(nn.Module):
    """Fast edge network. Per layer ``z ← W_ee z``; type 0 ``z ← f((W_he h_i) ⊙ z)``, type 1
    ``z ← f(W_he h_i) ⊙ f(z)``; shortcut ``z += W_s z_prev``; ``z⁰ = h_j``."""

    def __init__(self, in_features, out_features, n_layers, activation, net_type, use_batch_norm, bias, use_shortcut):
        super().__init__()
        self.out_features = out_features
        self.node_linears = nn.ModuleList(
            linear_bn(in_features, out_features, use_batch_norm, bias) for _ in range(n_layers))
        self.edge_linears = nn.ModuleList(
            linear_bn(in_features if i == 0 else out_features, out_features, use_batch_norm, bias)
            for i in range(n_layers))
        self.shortcuts = edge_net_shortcuts(in_features, out_features, n_layers) if use_shortcut else None
        self.activation = activation
        self.net_type = net_type
        self.per_bond_batch_norm = use_batch_norm  # the edge_linears' BN runs over bonds

    def forward(self, x: Tensor, gi: GraphIndex) -> Tensor:
        act = self.activation
        z = None
        for i, (node_linear, edge_linear) in enumerate(zip(self.node_linears, self.edge_linears)):
            hn = node_linear(x)  # per atom (its BN, if any, runs over atoms as in the reference)
            if self.net_type == 1:
                hn = act(hn)
            if i == 0:
                sc = go.gather_src(self.shortcuts[0](x), gi) if self.shortcuts is not None else None
                lin, bn = _split_linear_bn(edge_linear)
                ze = lin(x)  # W_ee h_j computed per atom
                if bn is None:
                    if self.net_type == 1:
                        ze = act(ze)
                    z = go.src_mul_dst(ze, hn, gi)
                else:  # per-bond batch statistics: gather first
                    ze = bn(go.gather_src(ze, gi))
                    if self.net_type == 1:
                        ze = act(ze)
                    z = ze * go.gather_dst(hn, gi)
            else:
                sc = self.shortcuts[i](z) if self.shortcuts is not None else None
                ze = edge_linear(z)
                if self.net_type == 1:
                    ze = act(ze)
                z = ze * go.gather_dst(hn, gi)
            if self.net_type == 0:
                z = act(z)
            if sc is not None:
                z = z + sc
        return z


class AggregatedBilinear(nn.Module):
    """``W_out · ELU(concat_c Bilinear_c(chunk_c(ELU(W1 x1)), chunk_c(ELU(W2 x2))))`` (ELU always, as in
    the reference). The C bilinears run as one batched contraction."""

    def __init__(self, in1_features, in2_features, out_features, cardinality, width, bias):
        super().__init__()
        self.out_features = out_features
        self.cardinality = cardinality
        self.width = width
        inner = cardinality * width
        self.fc_in1 = nn.Linear(in1_features, inner, bias=bias)
        self.fc_in2 = nn.Linear(in2_features, inner, bias=bias)
        self.fc_out = nn.Linear(inner, out_features, bias=bias)
        self.bilinears = nn.ModuleList(nn.Bilinear(width, width, width, bias=bias) for _ in range(cardinality))
        self.activation = nn.ELU()

    def inner(self, a1: Tensor, a2: Tensor) -> Tensor:
        """From the activated inputs ``ELU(W1 x1)``, ``ELU(W2 x2)`` (per bond) to the output."""
        c, w = self.cardinality, self.width
        weight = torch.stack([b.weight for b in self.bilinears])  # (C, w_out, w1, w2)
        a1 = a1.reshape(-1, c, w)
        a2 = a2.reshape(-1, c, w)
        t = torch.einsum("ecp,crpq->ecrq", a1, weight)
        out = (t * a2.unsqueeze(2)).sum(-1)  # (E, C, w)
        if self.bilinears[0].bias is not None:
            out = out + torch.stack([b.bias for b in self.bilinears])
        out = self.activation(out.reshape(-1, c * w))
        return self.fc_out(out)

    def forward(self, x1: Tensor, x2: Tensor) -> Tensor:
        return self.inner(self.activation(self.fc_in1(x1)), self.activation(self.fc_in2(x2)))


class _AggregatedBN(nn.Module):
    """``BN(AggregatedBilinear)`` with the reference's attribute names (``bn``, ``bilinear``)."""

    def __init__(self, bilinear: AggregatedBilinear):
        super().__init__()
        self.bn = nn.BatchNorm1d(bilinear.out_features)
        self.bilinear = bilinear


class AggregatedEdgeNetwork(nn.Module):
    """Aggregated edge network: ``z ← f(AggBilinear(h_i, z)) [+ W_s z]``, ``z⁰ = h_j``."""

    def __init__(self, in_features, out_features, n_layers, cardinality, width, activation,
                 use_batch_norm, bias, use_shortcut):
        super().__init__()
        self.out_features = out_features
        b = bias and not use_batch_norm
        layers = [AggregatedBilinear(in_features, in_features if i == 0 else out_features, out_features,
                                     cardinality, width, b) for i in range(n_layers)]
        if use_batch_norm:
            layers = [_AggregatedBN(layer) for layer in layers]
        self.bilinears = nn.ModuleList(layers)
        self.shortcuts = edge_net_shortcuts(in_features, out_features, n_layers) if use_shortcut else None
        self.activation = activation
        self.per_bond_batch_norm = use_batch_norm

    def forward(self, x: Tensor, gi: GraphIndex) -> Tensor:
        z = None
        for i, layer in enumerate(self.bilinears):
            agg, bn = (layer.bilinear, layer.bn) if isinstance(layer, _AggregatedBN) else (layer, None)
            # ELU(W1 h_i) depends only on the centre atom, and at layer 0 ELU(W2 h_j) only on the
            # neighbour: compute per atom, then gather.
            a1 = go.gather_dst(agg.activation(agg.fc_in1(x)), gi)
            if i == 0:
                a2 = go.gather_src(agg.activation(agg.fc_in2(x)), gi)
                sc = go.gather_src(self.shortcuts[0](x), gi) if self.shortcuts is not None else None
            else:
                a2 = agg.activation(agg.fc_in2(z))
                sc = self.shortcuts[i](z) if self.shortcuts is not None else None
            out = agg.inner(a1, a2)
            if bn is not None:
                out = bn(out)
            z = self.activation(out)
            if sc is not None:
                z = z + sc
        return z


class PostconvolutionNetwork(nn.Module):
    """CB-MFCNet: ``L`` layers of ``x ← f(BN?(W x))`` on the per-atom aggregate."""

    def __init__(self, features, n_layers, activation, use_batch_norm, bias):
        super().__init__()
        self.linears = nn.ModuleList(linear_bn(features, features, use_batch_norm, bias) for _ in range(n_layers))
        self.activation = activation

    def forward(self, x: Tensor) -> Tensor:
        for linear in self.linears:
            x = self.activation(linear(x))
        return x


class RadialBasis(nn.Module):
    """Gaussian expansion of the bond ratio ``x = d / ((r_i + r_j) * factor_vol * 1.2)`` (in (0, 1)).

    ``φ_k(x) = exp(-((x - μ_k) / w)^2)`` with ``K`` centres ``μ_k`` evenly on [0, 1] and ``w`` their spacing.
    Invariances of the input: ``d`` and ``factor_vol`` (∝ V_cell^(1/3)) both scale with a uniform scaling
    of the cell, so ``x`` is unchanged by it, as well as by rotations, translations and permutations of the
    atoms. It is *not* invariant under non-uniform strain (a shear or a stretch along one axis changes the
    distances differently from ``factor_vol``), which is exactly what lets it tell neighbour shells apart.
    """

    def __init__(self, n_basis: int):
        super().__init__()
        self.n_basis = n_basis

    def forward(self, ratio: Tensor) -> Tensor:
        centres = torch.linspace(0.0, 1.0, self.n_basis, dtype=ratio.dtype, device=ratio.device)
        return torch.exp(-(((ratio.unsqueeze(1) - centres) * (self.n_basis - 1)) ** 2))


class GatedGraphConvolution(nn.Module):
    """One convolution block: ``h_i' = f_node(BN?(h_i + [MFC](Σ_j σ(BN?(g_ij)) ⊙ f_edge(BN?(m_ij)))))``.

    ``conv_type 0``: ``[g; m] = W c_ij`` with the gate in the *first* half of ``W``; ``conv_type > 0``
    (with an edge network only): ``g = W e_ij``, ``m = W_h h_j``. ``c_ij = h_j`` without an edge network.
    With ``geometry_basis`` K > 0 (``model.geometry``) a bias-free ``U φ(x_ij)`` of the bond's radial basis
    is added to ``[g; m]`` (to ``g`` for ``conv_type > 0``) before the activations; without it the block
    has exactly the reference's parameters.
    """

    def __init__(self, features, node_activation, edge_activation, use_node_batch_norm, use_edge_batch_norm,
                 bias, conv_type, edge_network=None, postconv_network=None, geometry_basis: int = 0):
        super().__init__()
        self.features = features
        b = bias and not use_edge_batch_norm
        self.linear_h = None
        if edge_network is None:
            self.linear = nn.Linear(features, 2 * features, bias=b)
        elif conv_type > 0:
            self.linear_h = nn.Linear(features, features, bias=b)
            self.linear = nn.Linear(edge_network.out_features, features, bias=b)
        else:
            self.linear = nn.Linear(edge_network.out_features, 2 * features, bias=b)
        self.use_edge_batch_norm = use_edge_batch_norm
        self.gate_activation = bn_act(features, nn.Sigmoid(), use_edge_batch_norm)
        self.node_activation = bn_act(features, node_activation, use_node_batch_norm)
        self.edge_activation = bn_act(features, edge_activation, use_edge_batch_norm)
        self.edge_network = edge_network
        self.postconv_network = postconv_network
        self.geometry = None
        if geometry_basis > 0:
            self.geometry = nn.Linear(geometry_basis, self.linear.out_features, bias=False)
        # Without per-bond batch statistics every per-bond quantity depends only on the (centre,
        # neighbour) pair, so repeated bonds are computed once and weighted by their multiplicity
        # (not with geometry: two images of one neighbour lie at different distances).
        self.compact_bonds = (not use_edge_batch_norm and not getattr(edge_network, "per_bond_batch_norm", False)
                              and self.geometry is None)

    def _gated(self, g: Tensor, m: Tensor) -> Tensor:
        g = self.gate_activation(g)
        if self.edge_activation is not None:
            m = self.edge_activation(m)
        return g * m

    def forward(self, x: Tensor, gi: GraphIndex, rbf: Tensor | None = None) -> Tensor:
        """``rbf``: the radial basis of every bond, ``(n_bonds, K)``; required with geometry."""
        d = self.features
        if self.geometry is not None:
            if rbf is None:
                raise ValueError("this convolution uses geometry: pass the bonds' radial basis (rbf)")
            geo = self.geometry(rbf)
            if self.edge_network is None:
                p = go.gather_src(self.linear(x), gi) + geo  # W h_j + U φ(x_ij) per bond
                g, m = p.split(d, dim=1)
                msg = self._gated(g, m)
            else:
                e = self.edge_network(x, gi)
                if self.linear_h is None:
                    g, m = (self.linear(e) + geo).split(d, dim=1)
                    msg = self._gated(g, m)
                else:
                    m = go.gather_src(self.linear_h(x), gi)
                    msg = self._gated(self.linear(e) + geo, m)
            agg = go.sum_at_dst(msg, gi)
        elif self.edge_network is None:
            p = self.linear(x)  # W h_j per atom
            if self.use_edge_batch_norm:  # batch statistics over bonds
                g, m = go.gather_src(p, gi).split(d, dim=1)
                agg = go.sum_at_dst(self._gated(g, m), gi)
            else:  # the whole message depends on the neighbour only
                g, m = p.split(d, dim=1)
                agg = go.sum_src_at_dst(self._gated(g, m), gi)
        else:
            if self.compact_bonds:
                gi = gi.compact()
            e = self.edge_network(x, gi)
            if self.linear_h is None:
                g, m = self.linear(e).split(d, dim=1)
                msg = self._gated(g, m)
            else:
                g = self.linear(e)
                m = self.linear_h(x)
                if self.use_edge_batch_norm:
                    msg = self._gated(g, go.gather_src(m, gi))
                else:
                    if self.edge_activation is not None:
                        m = self.edge_activation(m)
                    msg = self.gate_activation(g) * go.gather_src(m, gi)
            agg = go.sum_at_dst(msg, gi)
        if self.postconv_network is not None:
            agg = self.postconv_network(agg)
        out = x + agg
        if self.node_activation is not None:
            out = self.node_activation(out)
        return out


class GatedPooling(nn.Module):
    """Per-atom gated features ``σ(W h + b) ⊙ h`` (the mean per crystal is taken by the caller)."""

    def __init__(self, features: int):
        super().__init__()
        self.linear = nn.Linear(features, features, bias=True)

    def node_features(self, x: Tensor) -> Tensor:
        return torch.sigmoid(self.linear(x)) * x

    def forward(self, x: Tensor, gi: GraphIndex) -> Tensor:
        return go.mean_per_crystal(self.node_features(x), gi)


class LinearPooling(nn.Module):
    """Plain mean of atom features per crystal."""

    def node_features(self, x: Tensor) -> Tensor:
        return x

    def forward(self, x: Tensor, gi: GraphIndex) -> Tensor:
        return go.mean_per_crystal(x, gi)


class GraphPooling(nn.Module):
    """``Γ0 = f(BN?(Σ_t W_t γ_t))`` for T>1 pooled steps, else ``f(BN?(γ))``. Takes the pooled steps
    concatenated along features, ``(n_crystals, T·d_h)``."""

    def __init__(self, features: int, n_steps: int, activation: nn.Module, use_batch_norm: bool):
        super().__init__()
        self.linears = (nn.ModuleList(nn.Linear(features, features, bias=False) for _ in range(n_steps))
                        if n_steps > 1 else None)
        self.activation = nn.Sequential(nn.BatchNorm1d(features), activation) if use_batch_norm else activation

    def forward(self, pooled: Tensor) -> Tensor:
        if self.linears is not None:
            weight = torch.cat([lin.weight for lin in self.linears], dim=1)  # (d_h, T·d_h)
            pooled = pooled @ weight.t()
        return self.activation(pooled)


class FullConnection(nn.Module):
    """``f(W x + b)``, or ``f(BN(W x))`` with batch norm."""

    def __init__(self, in_features, out_features, activation, use_batch_norm):
        super().__init__()
        self.linear = nn.Linear(in_features, out_features, bias=not use_batch_norm)
        self.activation = nn.Sequential(nn.BatchNorm1d(out_features), activation) if use_batch_norm else activation

    def forward(self, x: Tensor) -> Tensor:
        return self.activation(self.linear(x))


class ClassificationHead(nn.Module):
    """Logits from the graph features: one linear layer (``hidden`` 0, state-dict keys ``linear.*`` as
    before) or ``Linear -> activation -> Linear`` with ``hidden`` units (keys ``hidden.*``, ``linear.*``)."""

    def __init__(self, in_features: int, out_features: int, hidden: int = 0, activation: nn.Module | None = None):
        super().__init__()
        self.hidden = nn.Linear(in_features, hidden) if hidden else None
        self.activation = activation if hidden else None
        self.linear = nn.Linear(hidden or in_features, out_features)

    def forward(self, x: Tensor) -> Tensor:
        if self.hidden is not None:
            x = self.activation(self.hidden(x))
        return self.linear(x)


class LinearRegression(nn.Module):
    """``y = W Γ + b`` with ``n_targets`` outputs; never squeezed (a batch of one stays (1, n_targets))."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.linear = nn.Linear(in_features, out_features)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(x)
