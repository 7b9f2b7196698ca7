"""CGNN model: parameter counts of the reference presets, every layer option against a naive per-bond
implementation written from docs/cgnn-reference.md §3.1, backend agreement, reference-weight parity
on the shared dev set, batch of one, configuration handling."""
from __future__ import annotations

import json
import re

import dgl
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import shared_dir

import cgnn_dgl  # noqa: F401
from cgnn_dgl import TARGETS
from cgnn_dgl.config import ModelConfig, dataclass_from_dict
from cgnn_dgl.errors import CgnnError, UsageError
from cgnn_dgl.graph import crystal_graph, graph_from_neighbors
from cgnn_dgl.graph_ops import GraphIndex
from cgnn_dgl.model import (
    CGNN,
    SPECIES_Z,
    UnsupportedSpeciesError,
    detect_reference_preset,
    get_activation,
    load_reference_state_dict,
)
from cgnn_dgl.model.species import DESCRIPTOR_NAMES, N_DESCRIPTORS, species_descriptors
from cgnn_dgl.schema import BOND

SHARED = shared_dir()
REFERENCE_PTH = SHARED / "reference" / "cgnn_oqmd_fe_benchmark.pth"
DEV_JSON = SHARED / "reference" / "coordinator_dev.json"
ONE = ("formation_energy",)

# ---------------------------------------------------------------------------------------------------
# a small random batch
# ---------------------------------------------------------------------------------------------------


def small_batch(seed: int = 0, n_crystals: int = 6):
    rng = np.random.default_rng(seed)
    graphs = []
    for _k in range(n_crystals):
        n = int(rng.integers(1, 7))
        neighbors = []
        for i in range(n):
            if n > 2 and i == n - 1:
                neighbors.append([])  # atom that receives no message
                continue
            nb = [int(j) for j in rng.integers(0, n, size=int(rng.integers(1, 6)))]
            neighbors.append(nb + [nb[0]])  # at least one repeated bond
        numbers = rng.choice(SPECIES_Z, size=n)
        graphs.append(graph_from_neighbors(numbers, neighbors))
    g = dgl.batch(graphs)
    # distance / cutoff per bond for model.geometry (models without it ignore the bond data)
    g.edges[BOND].data["ratio"] = torch.as_tensor(rng.uniform(0.5, 1.0, g.num_edges(BOND)), dtype=torch.float32)
    return g


# ---------------------------------------------------------------------------------------------------
# naive implementation: per-bond tensors everywhere, in the reference's order of operations
# ---------------------------------------------------------------------------------------------------


def naive_forward(model: CGNN, z: torch.Tensor, gi: GraphIndex) -> torch.Tensor:
    c = model.config
    src, dst = gi.bond_src, gi.bond_dst
    onehot = torch.zeros(len(z), 89, dtype=model.embedding.linear.weight.dtype)
    onehot[torch.arange(len(z)), torch.tensor([SPECIES_Z.index(int(v)) for v in z])] = 1
    x = onehot @ model.embedding.linear.weight.t()
    if c.species_descriptors:  # W_d d(Z): the descriptor row of each atom's species
        x = x + onehot @ model.embedding.descriptor_table.to(x.dtype) @ model.embedding.descriptor.weight.t()

    def mean_pool(v):
        out = torch.zeros(gi.n_crystals, v.shape[1], dtype=v.dtype).index_add_(0, gi.atom_crystal, v)
        return out / gi.atom_count.to(v.dtype).unsqueeze(1)

    def edge_net(net, x):
        h_i, z_ = x[dst], x[src]  # EdgeNet(centre, neighbour)
        kind = type(net).__name__
        for l in range(len(net.shortcuts) if net.shortcuts is not None else len(net.bilinears if kind != "FastEdgeNetwork" else net.node_linears)):
            sc = net.shortcuts[l](z_) if net.shortcuts is not None else None
            if kind == "FastEdgeNetwork":
                zz = net.edge_linears[l](z_)
                if net.net_type == 0:
                    z_ = net.activation(net.node_linears[l](x)[dst] * zz)
                else:
                    z_ = net.activation(net.node_linears[l](x))[dst] * net.activation(zz)
            elif kind == "EdgeNetwork":
                z_ = net.activation(net.bilinears[l](h_i, z_))
            else:  # aggregated
                layer = net.bilinears[l]
                agg = layer.bilinear if hasattr(layer, "bn") else layer
                a1 = F.elu(agg.fc_in1(h_i)).chunk(agg.cardinality, dim=1)
                a2 = F.elu(agg.fc_in2(z_)).chunk(agg.cardinality, dim=1)
                out = agg.fc_out(F.elu(torch.cat([b(p, q) for b, p, q in zip(agg.bilinears, a1, a2)], dim=1)))
                if hasattr(layer, "bn"):
                    out = layer.bn(out)
                z_ = net.activation(out)
            if sc is not None:
                z_ = z_ + sc
        return z_

    rbf = None
    if c.geometry:  # Gaussians of width = spacing, centres evenly on [0, 1]
        mu = torch.linspace(0, 1, c.geometry_basis, dtype=x.dtype)
        rbf = torch.exp(-(((gi.bond_ratio.to(x.dtype)[:, None] - mu) * (c.geometry_basis - 1)) ** 2))
    pooled = []
    for conv, pre in zip(model.convs, model.pre_poolings):
        h_j = x[src]
        e = h_j if conv.edge_network is None else edge_net(conv.edge_network, x)
        geo = conv.geometry(rbf) if rbf is not None else 0.0
        if conv.linear_h is None:
            g, m = torch.chunk(conv.linear(e) + geo, 2, dim=1)  # first half = gate
        else:
            g, m = conv.linear(e) + geo, conv.linear_h(h_j)
        g = conv.gate_activation(g)
        if conv.edge_activation is not None:
            m = conv.edge_activation(m)
        agg = torch.zeros_like(x).index_add_(0, dst, g * m)
        x = x + (conv.postconv_network(agg) if conv.postconv_network is not None else agg)
        if conv.node_activation is not None:
            x = conv.node_activation(x)
        if pre is not None:
            v = torch.sigmoid(pre.linear(x)) * x if hasattr(pre, "linear") else x
            pooled.append(mean_pool(v))
    if model.pooling.linears is not None:
        gamma = sum(lin(p) for lin, p in zip(model.pooling.linears, pooled))
    else:
        gamma = pooled[-1]
    h = model.pooling.activation(gamma)
    for fc in model.fcs:
        h = fc.activation(fc.linear(h))
    y = model.regression.linear(h)
    if c.use_extension:
        y = y * gi.atom_count.to(y.dtype).unsqueeze(1)
    return y


SMALL = dict(n_hidden_feat=8, n_graph_feat=10, n_conv=2, n_fc=2, n_edge_net_feat=6, edge_net_cardinality=3, edge_net_width=2)

VARIANTS = {
    "cli_defaults": {},
    "benchmark_like": dict(use_batch_norm=True, full_pooling=True, gated_pooling=True),
    "linear_pooling_last": dict(gated_pooling=False),
    "gated_pooling_last": dict(gated_pooling=True),
    "full_linear_pooling": dict(full_pooling=True),
    "ssp": dict(activation="ssp"),
    "elu_alpha": dict(activation="ELU(0.5)", use_batch_norm=True),
    "relu": dict(activation="relu"),
    "selu": dict(activation="selu"),
    "celu_alpha": dict(activation="celu(1.5)"),
    "node_act_bn": dict(node_activation="softplus", use_node_batch_norm=True),
    "node_bn_only": dict(use_node_batch_norm=True),
    "node_act": dict(node_activation="elu"),
    "edge_act_bn": dict(edge_activation="relu", use_edge_batch_norm=True, conv_bias=True),
    "edge_bn_only": dict(use_edge_batch_norm=True),
    "edge_act_bias": dict(edge_activation="ssp", conv_bias=True),
    "postconv": dict(n_postconv_net_layers=2, postconv_net_activation="celu"),
    "postconv_bn": dict(n_postconv_net_layers=2, use_postconv_net_batch_norm=True),
    "postconv_bias": dict(n_postconv_net_layers=1, postconv_net_bias=True),
    "original_edge_net": dict(n_edge_net_layers=2),
    "original_edge_net_bn_sc": dict(n_edge_net_layers=2, use_edge_net_batch_norm=True, use_edge_net_shortcut=True),
    "original_edge_net_bias": dict(n_edge_net_layers=1, edge_net_bias=True, edge_net_activation="softplus"),
    "fast0": dict(n_edge_net_layers=2, use_fast_edge_network=True, fast_edge_network_type=0),
    "fast1_shortcut": dict(n_edge_net_layers=1, use_fast_edge_network=True, fast_edge_network_type=1, use_edge_net_shortcut=True),
    "fast1_2layers_sc": dict(n_edge_net_layers=2, use_fast_edge_network=True, fast_edge_network_type=1, use_edge_net_shortcut=True),
    "fast0_bn": dict(n_edge_net_layers=2, use_fast_edge_network=True, use_edge_net_batch_norm=True, use_edge_net_shortcut=True),
    "fast1_bn": dict(n_edge_net_layers=1, use_fast_edge_network=True, fast_edge_network_type=1, use_edge_net_batch_norm=True),
    "fast_bias": dict(n_edge_net_layers=2, use_fast_edge_network=True, edge_net_bias=True),
    "aggregated": dict(n_edge_net_layers=2, use_aggregated_edge_network=True),
    "aggregated_bn_sc": dict(n_edge_net_layers=2, use_aggregated_edge_network=True, use_edge_net_batch_norm=True, use_edge_net_shortcut=True),
    "aggregated_bias": dict(n_edge_net_layers=1, use_aggregated_edge_network=True, edge_net_bias=True),
    "conv_type1": dict(n_edge_net_layers=1, use_fast_edge_network=True, conv_type=1, edge_activation="elu"),
    "conv_type1_edge_bn": dict(n_edge_net_layers=1, conv_type=1, use_edge_batch_norm=True, conv_bias=True),
    "conv_type1_no_edge_net": dict(conv_type=1),
    "edge_net_edge_bn": dict(n_edge_net_layers=1, use_fast_edge_network=True, fast_edge_network_type=1, use_edge_batch_norm=True),
    "no_bn_fc3": dict(n_fc=3, use_batch_norm=False, full_pooling=True, gated_pooling=True),
    "fc1": dict(n_fc=1, use_batch_norm=True),
    "extension": dict(use_extension=True),
    "geometry": dict(geometry=True, geometry_basis=5),
    "descriptors": dict(species_descriptors=True),
    "descriptors_geometry_bn": dict(species_descriptors=True, geometry=True, use_batch_norm=True, full_pooling=True),
    "geometry_benchmark_like": dict(geometry=True, use_batch_norm=True, full_pooling=True, gated_pooling=True),
    "geometry_edge_bn": dict(geometry=True, geometry_basis=4, use_edge_batch_norm=True, edge_activation="relu"),
    "geometry_fast1_sc": dict(geometry=True, n_edge_net_layers=1, use_fast_edge_network=True, fast_edge_network_type=1,
                              use_edge_net_shortcut=True),
    "geometry_conv_type1": dict(geometry=True, n_edge_net_layers=1, use_fast_edge_network=True, conv_type=1),
    "complete_like": dict(use_batch_norm=True, full_pooling=True, gated_pooling=True, n_postconv_net_layers=2,
                          use_postconv_net_batch_norm=True, n_edge_net_layers=1, use_fast_edge_network=True,
                          fast_edge_network_type=1, use_edge_net_shortcut=True),
}


def _model(overrides: dict, seed: int = 0, **extra) -> CGNN:
    torch.manual_seed(seed)
    model = CGNN(ModelConfig.from_dict({**SMALL, **overrides, **extra}))
    # random BN affine parameters and running stats, so that batch norm is not the identity, and a
    # nonzero descriptor map (its init is zero)
    with torch.no_grad():
        if model.embedding.descriptor is not None:
            model.embedding.descriptor.weight.normal_()
        for mod in model.modules():
            if isinstance(mod, torch.nn.BatchNorm1d):
                mod.weight.uniform_(0.5, 1.5)
                mod.bias.uniform_(-0.5, 0.5)
                mod.running_mean.uniform_(-0.5, 0.5)
                mod.running_var.uniform_(0.5, 2.0)
    return model.double()


def _forward_backward(model, z, gi, fn=None):
    model.zero_grad()
    out = (fn or model)(z, gi)
    weight = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).reshape(out.shape)
    (out * weight).sum().backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    return out.detach(), grads


@pytest.fixture(scope="module")
def batch():
    g = small_batch(3)
    return g, g.nodes["atom"].data["Z"]


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_option_matches_naive_on_both_backends(batch, variant, mode):
    g, z = batch
    model = _model(VARIANTS[variant], targets=("formation_energy", "band_gap"))
    model.train(mode == "train")
    gi_t = GraphIndex.from_graph(g, backend="torch")
    gi_d = GraphIndex.from_graph(g, backend="dgl")
    want, want_grads = _forward_backward(model, z, gi_t, fn=lambda z_, gi_: naive_forward(model, z_, gi_))
    assert want.shape == (g.num_nodes("crystal"), 2)
    for gi in (gi_t, gi_d):
        out, grads = _forward_backward(model, z, gi)
        torch.testing.assert_close(out, want, rtol=1e-9, atol=1e-10)
        assert grads.keys() == want_grads.keys()
        for name in grads:
            torch.testing.assert_close(grads[name], want_grads[name], rtol=1e-8, atol=1e-10, msg=name)
            assert torch.isfinite(grads[name]).all()


@pytest.mark.parametrize("backend", ["dgl", "torch"])
def test_float32_forward_backward_on_both_backends(batch, backend):
    g, z = batch
    torch.manual_seed(1)
    model = CGNN(ModelConfig.preset("complete", **{k: v for k, v in SMALL.items() if k != "n_edge_net_feat"}))
    gi = GraphIndex.from_graph(g, backend=backend)
    out = model(z, gi)
    assert out.dtype == torch.float32 and out.shape == (g.num_nodes("crystal"), len(TARGETS))
    out.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


# ---------------------------------------------------------------------------------------------------
# presets and reference weights
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("preset,count", [("benchmark", 212_833), ("no_edgenet", 288_097), ("complete", 490_849)])
def test_preset_parameter_counts(preset, count):
    model = CGNN(ModelConfig.preset(preset, targets=ONE))
    assert model.n_parameters() == count
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == count
    sd = model.state_dict()
    assert "target_mean" in sd and "target_std" in sd
    assert detect_reference_preset({k: v for k, v in sd.items() if k not in ("target_mean", "target_std")}) == preset


def test_complete_preset_keys():
    keys = set(CGNN(ModelConfig.preset("complete", targets=ONE)).state_dict())
    for t in range(4):
        assert f"convs.{t}.edge_network.node_linears.0.weight" in keys
        assert f"convs.{t}.edge_network.edge_linears.0.weight" in keys
        assert f"convs.{t}.edge_network.shortcuts.0.weight" in keys
        assert f"convs.{t}.postconv_network.linears.1.0.weight" in keys
        assert f"convs.{t}.postconv_network.linears.1.1.running_var" in keys


needs_reference = pytest.mark.skipif(
    not (REFERENCE_PTH.is_file() and DEV_JSON.is_file()), reason=f"shared reference data not found under {SHARED}")


@pytest.fixture(scope="module")
def reference_state():
    return torch.load(REFERENCE_PTH, weights_only=True, map_location="cpu")


@needs_reference
def test_benchmark_keys_and_shapes_equal_reference(reference_state):
    sd = CGNN(ModelConfig.preset("benchmark", targets=ONE)).state_dict()
    ours = {k: tuple(v.shape) for k, v in sd.items() if k not in ("target_mean", "target_std")}
    assert ours == {k: tuple(v.shape) for k, v in reference_state.items()}


@needs_reference
def test_reference_loading_fails_loudly(reference_state):
    with pytest.raises(CgnnError, match=re.escape("missing key convs.0.postconv_network")):
        load_reference_state_dict(CGNN(ModelConfig.preset("no_edgenet", targets=ONE)), reference_state)
    with pytest.raises(CgnnError, match=re.escape("shape of regression.linear.weight")):
        load_reference_state_dict(CGNN(ModelConfig.preset("benchmark")), reference_state)
    extra = dict(reference_state, **{"convs.9.linear.weight": torch.zeros(1)})
    with pytest.raises(CgnnError, match=re.escape("unexpected key convs.9.linear.weight")):
        load_reference_state_dict(CGNN(ModelConfig.preset("benchmark", targets=ONE)), extra)
    missing = {k: v for k, v in reference_state.items() if k != "fcs.1.activation.0.running_var"}
    with pytest.raises(CgnnError, match=re.escape("missing key fcs.1.activation.0.running_var")):
        load_reference_state_dict(CGNN(ModelConfig.preset("benchmark", targets=ONE)), missing)
    assert detect_reference_preset(reference_state) == "benchmark"


@pytest.fixture(scope="module")
def dev_records():
    with open(DEV_JSON) as fh:
        return [r for r in json.load(fh) if r["benchmark_prediction"] is not None]


@needs_reference
@pytest.mark.parametrize("backend", ["dgl", "torch"])
def test_reference_parity_on_dev_set(dev_records, backend):
    model = CGNN.from_reference(REFERENCE_PTH).eval()
    assert model.config.targets == ONE
    errors = []
    for i in range(0, len(dev_records), 256):
        chunk = dev_records[i:i + 256]
        g = dgl.batch([graph_from_neighbors(r["numbers"], r["neighbors"]) for r in chunk])
        with torch.no_grad():
            pred = model.to_physical(model(g.nodes["atom"].data["Z"], GraphIndex.from_graph(g, backend=backend)))
        assert pred.shape == (len(chunk), 1)
        want = torch.tensor([r["benchmark_prediction"] for r in chunk], dtype=torch.float64)
        errors.append((pred[:, 0].double() - want).abs())
    err = torch.cat(errors)
    print(f"\nreference parity ({backend}): {len(err)} structures, max |pred - reference| = {err.max():.3e} eV/atom")
    assert len(err) == len(dev_records) > 3000
    assert float(err.max()) <= 1e-5


@needs_reference
def test_batch_of_one(dev_records):
    model = CGNN.from_reference(REFERENCE_PTH).eval()
    for r in dev_records[:3] + dev_records[-2:]:
        g = graph_from_neighbors(r["numbers"], r["neighbors"])
        for batched in (g, dgl.batch([g])):
            with torch.no_grad():
                out = model(batched.nodes["atom"].data["Z"], GraphIndex.from_graph(batched))
            assert out.shape == (1, 1)
            assert abs(float(out[0, 0]) - r["benchmark_prediction"]) <= 1e-5


def test_batch_of_one_single_atom_without_bonds():
    model = CGNN(ModelConfig.preset("complete", targets=ONE)).eval()
    g = graph_from_neighbors([29], [[]])
    with torch.no_grad():
        for backend in ("dgl", "torch"):
            out = model(g.nodes["atom"].data["Z"], GraphIndex.from_graph(g, backend=backend))
            assert out.shape == (1, 1) and torch.isfinite(out).all()


# ---------------------------------------------------------------------------------------------------
# heads, standardisation, species
# ---------------------------------------------------------------------------------------------------


def test_classification_heads_and_standardisation(batch):
    g, z = batch
    model = CGNN(ModelConfig.from_dict({**SMALL, "classification_heads": True, "use_batch_norm": True}))
    n_params = CGNN(ModelConfig.from_dict({**SMALL, "use_batch_norm": True})).n_parameters()
    assert model.n_parameters() == n_params + SMALL["n_graph_feat"] * 2 + 2
    gi = GraphIndex.from_graph(g)
    out = model.forward_heads(z, gi)
    assert out["regression"].shape == (g.num_nodes("crystal"), 4)
    assert out["logits"].shape == (g.num_nodes("crystal"), 2)
    model.eval()
    torch.testing.assert_close(model(z, gi), model.forward_heads(z, gi)["regression"])
    model.set_target_stats([1.0, 2.0, 3.0, 4.0], [0.5, 1.0, 2.0, 4.0])
    y = model(z, gi)
    phys = model.to_physical(y)
    torch.testing.assert_close(phys, y * torch.tensor([0.5, 1.0, 2.0, 4.0]) + torch.tensor([1.0, 2.0, 3.0, 4.0]))
    torch.testing.assert_close(model.to_standardised(phys), y)
    sd = model.state_dict()
    assert torch.equal(sd["target_std"], torch.tensor([0.5, 1.0, 2.0, 4.0]))
    fresh = CGNN(model.config)
    fresh.load_state_dict(sd)
    assert torch.equal(fresh.target_mean, model.target_mean)
    with pytest.raises(ValueError):
        model.set_target_stats([0.0] * 4, [1.0, 0.0, 1.0, 1.0])


def test_unsupported_species_raise_clearly():
    model = CGNN(ModelConfig.from_dict(SMALL))
    gi = GraphIndex.from_arrays([0, 1], [1, 0], [0, 0])
    for bad in (84, 88, 0, 95, 118):
        with pytest.raises(UnsupportedSpeciesError, match=f"Z=\\[{bad}\\]") as info:
            model(torch.tensor([6, bad]), gi)
        assert info.value.elements == [bad]
    for ok in (1, 83, 89, 94):
        assert torch.isfinite(model(torch.tensor([ok, ok]), gi)).all()


def test_embedding_is_the_one_hot_linear():
    model = CGNN(ModelConfig.from_dict(SMALL))
    z = torch.tensor(SPECIES_Z)
    torch.testing.assert_close(model.embedding(z), model.embedding.linear(torch.eye(89)))


def test_activations():
    x = torch.linspace(-3, 3, 13)
    torch.testing.assert_close(get_activation("SSP")(x), F.softplus(x) - torch.log(torch.tensor(2.0)))
    assert get_activation("ssp")(torch.zeros(1)).abs().item() < 1e-7
    torch.testing.assert_close(get_activation("ELU(0.5)")(x), F.elu(x, 0.5))
    torch.testing.assert_close(get_activation("celu(2.0)")(x), F.celu(x, 2.0))
    torch.testing.assert_close(get_activation("Softplus")(x), F.softplus(x))
    assert get_activation(None, allow_none=True) is None
    assert get_activation("None", allow_none=True) is None
    for bad in ("tanh", "elu(1)", "relu(0.5)"):
        with pytest.raises(UsageError):
            get_activation(bad)
    with pytest.raises(UsageError):
        get_activation(None)


# ---------------------------------------------------------------------------------------------------
# ModelConfig
# ---------------------------------------------------------------------------------------------------


def test_config_round_trip_and_presets():
    cfg = ModelConfig.preset("complete", targets=["formation_energy", "band_gap"])
    assert cfg.targets == ("formation_energy", "band_gap")
    d = cfg.to_dict()
    assert d["targets"] == ["formation_energy", "band_gap"]
    assert json.loads(json.dumps(d)) == d
    assert ModelConfig.from_dict(d) == cfg
    assert cfg.n_edge_net_feat == 144 and cfg.fast_edge_network_type == 1 and cfg.use_edge_net_shortcut
    assert ModelConfig().targets == TARGETS
    assert ModelConfig.preset("benchmark", n_conv=3).n_conv == 3
    assert ModelConfig.from_dict({"node_activation": "None"}).node_activation is None
    assert ModelConfig.from_dict({"n_hidden_feat": 8}).replace(n_conv=5).n_conv == 5


@pytest.mark.parametrize(
    "data,match",
    [
        ({"n_hiden_feat": 8}, "n_hiden_feat"),
        ({"n_conv": "4"}, "n_conv"),
        ({"n_conv": 4.0}, "n_conv"),
        ({"use_batch_norm": 1}, "use_batch_norm"),
        ({"use_batch_norm": "yes"}, "use_batch_norm"),
        ({"activation": None}, "activation"),
        ({"activation": "tanh"}, "activation"),
        ({"node_activation": 3}, "node_activation"),
        ({"targets": "band_gap"}, "targets"),
        ({"targets": ["band_gap", "band_gap"]}, "targets"),
        ({"targets": ["band_gap", ""]}, "targets"),
        ({"targets": []}, "targets"),
        ({"n_node_feat": 4}, "n_node_feat"),
        ({"fast_edge_network_type": 2}, "fast_edge_network_type"),
        ({"n_conv": 0}, "n_conv"),
    ],
)
def test_config_rejects_bad_input(data, match):
    with pytest.raises(UsageError, match=match):
        ModelConfig.from_dict(data)


def test_unknown_preset():
    with pytest.raises(UsageError, match="paper"):
        ModelConfig.preset("paper")


def test_dataclass_from_dict_generic():
    from dataclasses import dataclass

    @dataclass
    class Train:
        lr: float = 1e-3
        milestones: tuple[int, ...] = (10,)
        name: str | None = None

    t = dataclass_from_dict(Train, {"lr": 1, "milestones": [250], "name": None})
    assert t == Train(lr=1.0, milestones=(250,), name=None) and isinstance(t.lr, float)
    with pytest.raises(UsageError, match="milestones\\[1\\]"):
        dataclass_from_dict(Train, {"milestones": [1, "x"]})
    with pytest.raises(UsageError, match="'batch'"):
        dataclass_from_dict(Train, {"batch": 3})


# ---------------------------------------------------------------------------------------------------
# optional geometry (model.geometry): invariances, presets unchanged, missing ratios
# ---------------------------------------------------------------------------------------------------


def test_geometry_off_leaves_every_preset_unchanged():
    """geometry is off in every preset: same parameter names and shapes as without the option."""
    for name in ModelConfig.PRESETS:
        cfg = ModelConfig.preset(name, targets=ONE)
        assert cfg.geometry is False
        model = CGNN(cfg)
        assert not any("geometry" in k for k in model.state_dict())
        assert model.radial is None
        on = CGNN(ModelConfig.preset(name, targets=ONE, geometry=True, geometry_basis=7))
        extra = {k: tuple(v.shape) for k, v in on.state_dict().items() if k not in model.state_dict()}
        assert sorted(extra) == [f"convs.{t}.geometry.weight" for t in range(cfg.n_conv)]
        assert all(shape[1] == 7 for shape in extra.values())


# optional elemental descriptors (model.species_descriptors)
# ---------------------------------------------------------------------------------------------------


def test_descriptors_off_leaves_every_preset_unchanged():
    for name in ModelConfig.PRESETS:
        cfg = ModelConfig.preset(name, targets=ONE)
        assert cfg.species_descriptors is False
        keys = CGNN(cfg).state_dict().keys()
        assert not any("descriptor" in k for k in keys)
        on = CGNN(ModelConfig.preset(name, targets=ONE, species_descriptors=True)).state_dict()
        extra = {k: tuple(v.shape) for k, v in on.items() if k not in keys}
        assert extra == {"embedding.descriptor_table": (89, N_DESCRIPTORS),
                         "embedding.descriptor.weight": (cfg.n_hidden_feat, N_DESCRIPTORS)}


def test_species_descriptors_table():
    """Standardized columns, no gaps, and the chemistry in the right order."""
    t = species_descriptors().double()
    assert t.shape == (89, N_DESCRIPTORS) and torch.isfinite(t).all()
    torch.testing.assert_close(t.mean(0), torch.zeros(N_DESCRIPTORS, dtype=t.dtype), atol=1e-6, rtol=0)
    torch.testing.assert_close(t.std(0), torch.ones(N_DESCRIPTORS, dtype=t.dtype), atol=1e-6, rtol=0)
    col = {name: t[:, k] for k, name in enumerate(DESCRIPTOR_NAMES)}
    row = {z: i for i, z in enumerate(SPECIES_Z)}
    assert bool((col["Z"].diff() > 0).all())  # Z increases along the species order
    assert int(col["X"].argmax()) == row[9]  # fluorine is the most electronegative
    assert col["X"][row[8]] > col["X"][row[11]]  # O more than Na
    assert col["atomic_mass"][row[92]] > col["atomic_mass"][row[26]]
    for z, block in ((1, "s"), (8, "p"), (26, "d"), (92, "f"), (57, "f")):
        onehot = {b: float(col[f"block_{b}"][row[z]] > 0) for b in "spdf"}
        assert onehot == {b: float(b == block) for b in "spdf"}, z


def test_descriptors_give_rare_species_a_shared_start():
    """The embedding is one-hot column + W_d d(Z), and d puts similar elements (Na, K) closer
    together than dissimilar ones (Na, F), so a species rare in training starts near its relatives."""
    torch.manual_seed(0)
    model = CGNN(ModelConfig.from_dict({**SMALL, "species_descriptors": True}))
    assert not model.embedding.descriptor.weight.any()  # zero init: starts as the one-hot embedding
    with torch.no_grad():
        model.embedding.descriptor.weight.normal_()
    z = torch.tensor([11, 19, 9])
    table = model.embedding.descriptor_table
    d = table[[SPECIES_Z.index(int(v)) for v in z]]
    want = model.embedding.linear.weight.t()[[SPECIES_Z.index(int(v)) for v in z]] + d @ model.embedding.descriptor.weight.t()
    torch.testing.assert_close(model.embedding(z), want)
    assert torch.dist(d[0], d[1]) < 0.5 * torch.dist(d[0], d[2])


def _dev_crystals(k=40):
    from cgnn_dgl.structures import Crystal

    if not DEV_JSON.is_file():
        pytest.skip("reference corpus not found")
    with open(DEV_JSON) as fh:
        rows = [r for r in json.load(fh) if r["error"] is None]
    rng = np.random.default_rng(5)
    return [Crystal(r["name"], r["lattice"], r["numbers"], r["frac"]) for r in (rows[i] for i in rng.choice(len(rows), k, replace=False))]


def _predict(model, crystals):
    g = dgl.batch([crystal_graph(c) for c in crystals])
    with torch.no_grad():
        return model(g.nodes["atom"].data["Z"], GraphIndex.from_graph(g))


@pytest.fixture(scope="module")
def geometry_model():
    torch.manual_seed(4)
    model = CGNN(ModelConfig.preset("benchmark", geometry=True, n_hidden_feat=16, n_graph_feat=24)).eval()
    with torch.no_grad():  # a visible geometry term: larger U than its default init
        for conv in model.convs:
            conv.geometry.weight.mul_(5.0)
    return model


@pytest.mark.parametrize("transform", ["scale", "rotation"])
def test_geometry_model_invariant_under_uniform_scaling_and_rotation(geometry_model, transform):
    from cgnn_dgl.structures import Crystal

    crystals = _dev_crystals()
    rot, _ = np.linalg.qr(np.random.default_rng(6).normal(size=(3, 3)))
    move = {"scale": lambda lat: lat * 1.23, "rotation": lambda lat: lat @ rot.T}[transform]
    moved = [Crystal(c.name, move(c.lattice), c.numbers, c.frac) for c in crystals]
    torch.testing.assert_close(_predict(geometry_model, moved), _predict(geometry_model, crystals), rtol=1e-5, atol=1e-5)


def test_geometry_tells_shells_apart(geometry_model):
    """Same graph, other bond ratios: a geometry model answers differently, a plain one the same."""
    g = dgl.batch([crystal_graph(c) for c in _dev_crystals(8)])
    z = g.nodes["atom"].data["Z"]
    gi = GraphIndex.from_graph(g)
    squeezed = GraphIndex.from_graph(g)
    squeezed.bond_ratio = gi.bond_ratio * 0.9
    with torch.no_grad():
        assert not torch.allclose(geometry_model(z, gi), geometry_model(z, squeezed), atol=1e-4)
        plain = CGNN(ModelConfig.preset("benchmark", n_hidden_feat=16, n_graph_feat=24)).eval()
        torch.testing.assert_close(plain(z, gi), plain(z, squeezed))


def test_geometry_without_ratios_is_one_clear_error(geometry_model):
    g = graph_from_neighbors([29, 8], [[1], [0]])  # reference neighbour lists carry no distances
    with pytest.raises(CgnnError, match=r"no bond distance ratios.*rebuild"):
        geometry_model(g.nodes["atom"].data["Z"], GraphIndex.from_graph(g))


# hurdle targets (model.hurdle_targets)
# ---------------------------------------------------------------------------------------------------


def test_hurdle_gate_takes_the_conditional_output_where_the_head_says_positive(batch):
    g, z = batch
    gi = GraphIndex.from_graph(g)
    torch.manual_seed(2)
    model = CGNN(ModelConfig.from_dict({**SMALL, "targets": list(TARGETS), "classification_heads": True,
                                        "hurdle_targets": ["band_gap"]})).eval()
    col, head = TARGETS.index("band_gap"), 0  # the insulator logit gates the band gap
    with torch.no_grad():  # shift the insulator logit so that the batch has both answers
        logits = model.forward_heads(z, gi)["logits"][:, head]
        model.classification.linear.bias[head] -= (logits.min() + logits.max()) / 2
        out = model.forward_heads(z, gi)
    assert model.hurdle == ((col, head),)
    pos = out["logits"][:, head] > 0
    assert pos.any() and (~pos).any()
    pred = out["prediction"]
    torch.testing.assert_close(pred[pos, col], out["conditional"][pos, 0])
    torch.testing.assert_close(pred[~pos, col], out["regression"][~pos, col])
    other = [k for k in range(len(TARGETS)) if k != col]
    assert torch.equal(pred[:, other], out["regression"][:, other])
    assert "prediction" not in CGNN(ModelConfig.from_dict({**SMALL, "targets": list(TARGETS)})).forward_heads(z, gi)


@pytest.mark.parametrize("bad, match", [
    (dict(hurdle_targets=["formation_energy"], classification_heads=True), "no classification head"),
    (dict(hurdle_targets=["band_gap"]), "classification_heads: true"),
    (dict(hurdle_targets=["band_gap"], classification_heads=True, targets=["formation_energy"]), "in targets"),
])
def test_hurdle_config_errors(bad, match):
    with pytest.raises(UsageError, match=match):
        ModelConfig.from_dict({**SMALL, **bad})
