"""graph_ops: the DGL-kernel path and the torch index path agree (forward and backward) on batched
crystal heterographs with isolated atoms, multi-edges and self-loops, and both match plain loops."""
from __future__ import annotations

import dgl
import numpy as np
import pytest
import torch

import cgnn_dgl  # noqa: F401
from cgnn_dgl import graph_ops as go
from cgnn_dgl.graph import graph_from_neighbors
from cgnn_dgl.graph_ops import GraphIndex


def random_crystal(rng: np.random.Generator, n_atoms: int, isolated: bool = True):
    """Neighbour lists with repeats (multi-edges), self-images and, optionally, isolated atoms."""
    neighbors = []
    for i in range(n_atoms):
        if isolated and n_atoms > 1 and i == n_atoms - 1:
            neighbors.append([])  # receives nothing ...
            continue
        k = int(rng.integers(0, 7))
        nb = [int(j) for j in rng.integers(0, max(n_atoms - (1 if isolated and n_atoms > 1 else 0), 1), size=k)]
        if k and rng.random() < 0.5:
            nb.append(i)  # self-image
        if nb and rng.random() < 0.5:
            nb.append(nb[0])  # explicit multi-edge
        neighbors.append(nb)
    numbers = rng.integers(1, 84, size=n_atoms)
    return numbers, neighbors


def random_batch(seed: int = 0, n_crystals: int = 7):
    rng = np.random.default_rng(seed)
    graphs = [graph_from_neighbors(*random_crystal(rng, int(rng.integers(1, 9)))) for _ in range(n_crystals)]
    graphs.append(graph_from_neighbors([8], [[]]))  # one atom, no bonds at all
    graphs.append(graph_from_neighbors([26, 26], [[0, 0, 0], [1]]))  # only self-loops
    return dgl.batch(graphs)


@pytest.fixture(scope="module", params=[0, 1, 2])
def batch(request):
    g = random_batch(request.param)
    return g, GraphIndex.from_graph(g, backend="dgl"), GraphIndex.from_graph(g, backend="torch")


def _loop_reference(g):
    src, dst = (t.numpy() for t in g.edges(etype=go.BOND, order="eid"))
    a_src, a_dst = (t.numpy() for t in g.edges(etype=go.IN, order="eid"))
    crystal = np.empty(g.num_nodes("atom"), dtype=np.int64)
    crystal[a_src] = a_dst
    return src, dst, crystal


def test_index_fields(batch):
    g, gd, gt = batch
    src, dst, crystal = _loop_reference(g)
    for gi in (gd, gt):
        assert gi.n_atoms == g.num_nodes("atom") and gi.n_crystals == g.num_nodes("crystal")
        assert gi.bond_src.dtype == torch.int64 and gi.bond_dst.dtype == torch.int64
        np.testing.assert_array_equal(gi.bond_src.numpy(), src)
        np.testing.assert_array_equal(gi.bond_dst.numpy(), dst)
        np.testing.assert_array_equal(gi.atom_crystal.numpy(), crystal)
        np.testing.assert_array_equal(gi.atom_count.numpy(), np.bincount(crystal, minlength=gi.n_crystals))
        assert gi.atom_count.dtype == torch.float32
    assert gd.backend == "dgl" and gd.dgl_graph is not None
    assert gt.backend == "torch"


def _inputs(gi: GraphIndex, seed: int, feat=(5,)):
    gen = torch.Generator().manual_seed(seed)
    return {
        "atom": torch.randn((gi.n_atoms,) + feat, generator=gen, dtype=torch.float64),
        "bond": torch.randn((gi.n_bonds,) + feat, generator=gen, dtype=torch.float64),
        "crystal": torch.randn((gi.n_crystals,) + feat, generator=gen, dtype=torch.float64),
    }


OPS = {
    "gather_src": (go.gather_src, ("atom",)),
    "gather_dst": (go.gather_dst, ("atom",)),
    "sum_at_dst": (go.sum_at_dst, ("bond",)),
    "sum_src_at_dst": (go.sum_src_at_dst, ("atom",)),
    "src_mul_dst": (go.src_mul_dst, ("atom", "atom")),
    "mean_per_crystal": (go.mean_per_crystal, ("atom",)),
    "broadcast_to_atoms": (go.broadcast_to_atoms, ("crystal",)),
}


def _run(op, kinds, gi, seed, feat=(5,)):
    base = _inputs(gi, seed, feat)
    gen = torch.Generator().manual_seed(seed + 100)
    args = []
    for n, kind in enumerate(kinds):
        t = base[kind] if n == 0 else _inputs(gi, seed + 7, feat)[kind]
        args.append(t.clone().requires_grad_(True))
    out = op(*args, gi)
    weight = torch.randn(out.shape, generator=gen, dtype=out.dtype)
    (out * weight).sum().backward()
    return out.detach(), [a.grad for a in args]


@pytest.mark.parametrize("name", sorted(OPS))
@pytest.mark.parametrize("feat", [(5,), (3, 2)])
def test_backends_agree_forward_and_backward(batch, name, feat):
    _, gd, gt = batch
    op, kinds = OPS[name]
    out_d, grads_d = _run(op, kinds, gd, 3, feat)
    out_t, grads_t = _run(op, kinds, gt, 3, feat)
    torch.testing.assert_close(out_d, out_t, rtol=1e-12, atol=1e-12)
    for a, b in zip(grads_d, grads_t):
        assert a is not None and b is not None
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_ops_match_plain_loops(batch):
    g, gd, gt = batch
    src, dst, crystal = _loop_reference(g)
    x = _inputs(gt, 5)["atom"]
    msg = _inputs(gt, 5)["bond"]
    c = _inputs(gt, 5)["crystal"]
    want_sum = np.zeros((gt.n_atoms, 5))
    want_nb = np.zeros((gt.n_atoms, 5))
    for b in range(len(src)):
        want_sum[dst[b]] += msg[b].numpy()
        want_nb[dst[b]] += x[src[b]].numpy()
    want_mean = np.zeros((gt.n_crystals, 5))
    for k in range(gt.n_crystals):
        members = np.flatnonzero(crystal == k)
        if len(members):
            want_mean[k] = x.numpy()[members].mean(0)
    for gi in (gd, gt):
        np.testing.assert_allclose(go.sum_at_dst(msg, gi).numpy(), want_sum, atol=1e-12)
        np.testing.assert_allclose(go.sum_src_at_dst(x, gi).numpy(), want_nb, atol=1e-12)
        np.testing.assert_allclose(go.mean_per_crystal(x, gi).numpy(), want_mean, atol=1e-12)
        np.testing.assert_allclose(go.gather_src(x, gi).numpy(), x.numpy()[src])
        np.testing.assert_allclose(go.gather_dst(x, gi).numpy(), x.numpy()[dst])
        np.testing.assert_allclose(go.broadcast_to_atoms(c, gi).numpy(), c.numpy()[crystal])
        np.testing.assert_allclose(go.src_mul_dst(x, x, gi).numpy(), x.numpy()[src] * x.numpy()[dst])
    # atoms without incoming bonds get exactly zero
    no_in = np.setdiff1d(np.arange(gt.n_atoms), dst)
    assert len(no_in) > 0
    assert torch.all(go.sum_at_dst(msg, gd)[no_in] == 0)


@pytest.mark.parametrize("backend", ["dgl", "torch"])
def test_compact_index_preserves_multiset_sums(batch, backend):
    _, gd, gt = batch
    gi = gd if backend == "dgl" else gt
    cg = gi.compact()
    assert cg is gi.compact()  # cached
    assert cg.compact() is cg
    assert cg.n_bonds < gi.n_bonds  # the random graphs do repeat bonds
    assert float(cg.bond_weight.sum()) == gi.n_bonds
    pairs = {(int(s), int(d)) for s, d in zip(gi.bond_src, gi.bond_dst)}
    assert {(int(s), int(d)) for s, d in zip(cg.bond_src, cg.bond_dst)} == pairs
    x = _inputs(gi, 9)["atom"].requires_grad_(True)
    y = x.detach().clone().requires_grad_(True)
    full = go.sum_at_dst(go.gather_src(x, gi) * go.gather_dst(x, gi), gi)
    comp = go.sum_at_dst(go.src_mul_dst(y, y, cg), cg)
    torch.testing.assert_close(full, comp, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(go.sum_src_at_dst(x, gi), go.sum_src_at_dst(y, cg), rtol=1e-12, atol=1e-12)
    full.sum().backward()
    comp.sum().backward()
    torch.testing.assert_close(x.grad, y.grad, rtol=1e-12, atol=1e-12)


def test_from_arrays_matches_from_graph(batch):
    _g, gd, gt = batch
    for backend in ("torch", "dgl"):
        ga = GraphIndex.from_arrays(gt.bond_src, gt.bond_dst, gt.atom_crystal, n_crystals=gt.n_crystals, backend=backend)
        assert ga.backend == backend
        x = _inputs(gt, 11)["atom"]
        torch.testing.assert_close(go.sum_src_at_dst(x, ga), go.sum_src_at_dst(x, gt))
        torch.testing.assert_close(go.mean_per_crystal(x, ga), go.mean_per_crystal(x, gd))
    with pytest.raises(ValueError):
        GraphIndex.from_arrays([0, 5], [1, 1], [0, 0, 0])


def test_crystal_without_atoms_gives_zero_mean():
    gi_t = GraphIndex.from_arrays([0], [1], [0, 0], n_crystals=2, backend="torch")
    gi_d = GraphIndex.from_arrays([0], [1], [0, 0], n_crystals=2, backend="dgl")
    x = torch.ones(2, 3)
    for gi in (gi_t, gi_d):
        m = go.mean_per_crystal(x, gi)
        assert torch.equal(m, torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]]))


def test_backend_resolution():
    assert go.resolve_backend("auto", "cpu") == "dgl"
    assert go.resolve_backend("torch", "cpu") == "torch"
    assert not go.dgl_supports_device("meta")
    assert go.resolve_backend("auto", "meta") == "torch"
    with pytest.raises(ValueError):
        go.resolve_backend("dgl", "meta")
    with pytest.raises(ValueError):
        go.resolve_backend("cuda-magic", "cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_paths_match_cpu():
    g = random_batch(4)
    cpu = GraphIndex.from_graph(g, backend="torch")
    gpu = GraphIndex.from_graph(g, device="cuda", backend="auto")
    assert gpu.device.type == "cuda"
    assert gpu.backend == ("dgl" if go.dgl_supports_device("cuda") else "torch")
    for name, (op, kinds) in OPS.items():
        out_c, grads_c = _run(op, kinds, cpu, 1)
        base = _inputs(cpu, 1)
        args = [(base[k] if n == 0 else _inputs(cpu, 8)[k]).cuda().requires_grad_(True) for n, k in enumerate(kinds)]
        out_g = op(*args, gpu)
        weight = torch.randn(out_g.shape, generator=torch.Generator().manual_seed(101), dtype=out_g.dtype).cuda()
        (out_g * weight).sum().backward()
        torch.testing.assert_close(out_g.cpu(), out_c, msg=name)
        for a, want in zip(args, grads_c):
            torch.testing.assert_close(a.grad.cpu(), want, msg=name)
