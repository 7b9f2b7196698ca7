"""The DGL-free GPU data path (cgnn_dgl/step.py): imports without DGL, flat batches equal to the DGL
batches, the prefetching loader, bf16 autocast against float32, compile fallback, determinism."""
from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from cgnn_dgl.batching import PackedGraphs
from cgnn_dgl.graph_ops import GraphIndex
from cgnn_dgl.step import FlatBatch, FlatLoader, assemble, autocast, index_batches, masked_mse, train_step

REPO = Path(__file__).resolve().parents[1]

BLOCKER = textwrap.dedent('''
    """Hides packages from this interpreter as if they were not installed (CGNN_BLOCK=a,b,c): their
    spec has no origin (what importlib.util.find_spec callers such as torch._dynamo skip) and importing
    them raises ModuleNotFoundError."""
    import importlib.machinery
    import os
    import sys

    class _Missing:
        def create_module(self, spec):
            raise ModuleNotFoundError(f"No module named {spec.name!r} (hidden by the test)", name=spec.name)

        def exec_module(self, module):
            raise ModuleNotFoundError(module.__name__)

    class _Blocker:
        blocked = tuple(p for p in os.environ.get("CGNN_BLOCK", "").split(",") if p)

        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in self.blocked:
                return importlib.machinery.ModuleSpec(name, _Missing())
            return None

    sys.meta_path.insert(0, _Blocker())
''')

BLOCKED = "dgl,pymatgen,sqlalchemy,yaml,pandas,scipy"


def blocked_env(tmp_path: Path, blocked: str = BLOCKED) -> dict:
    """Environment whose Python cannot import ``blocked`` (a sitecustomize meta-path blocker)."""
    import os

    site = tmp_path / "block"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(BLOCKER)
    return {**os.environ, "PYTHONPATH": f"{site}{os.pathsep}{REPO}", "CGNN_BLOCK": blocked}


def random_packed(rng: np.random.Generator, n_crystals: int, n_targets: int = 3, ratio: bool = False) -> PackedGraphs:
    na = rng.integers(1, 7, n_crystals)
    nb = rng.integers(0, 13, n_crystals)
    src = np.concatenate([rng.integers(0, a, b) for a, b in zip(na, nb)]) if nb.sum() else []
    dst = np.concatenate([rng.integers(0, a, b) for a, b in zip(na, nb)]) if nb.sum() else []
    numbers = rng.integers(1, 84, int(na.sum()))
    y = rng.normal(size=(n_crystals, n_targets))
    mask = rng.random((n_crystals, n_targets)) > 0.3
    return PackedGraphs.from_arrays(numbers, na, nb, src, dst, y, mask, np.arange(n_crystals),
                                    [f"c{i}" for i in range(n_crystals)], targets=[f"t{k}" for k in range(n_targets)],
                                    bond_ratio=rng.random(int(nb.sum())) if ratio else None)


# --------------------------------------------------------------------------------------------------
# imports without DGL


def test_gpu_path_imports_and_trains_without_dgl(tmp_path):
    """model, graph_ops, config and step import (and train a step) with dgl, pymatgen, SQLAlchemy and
    PyYAML hidden; the blocker itself is checked to bite."""
    code = textwrap.dedent('''
        import sys
        import numpy as np, torch
        for name in ("dgl", "yaml", "pymatgen", "sqlalchemy"):
            try:
                __import__(name)
            except ImportError:
                pass
            else:
                raise SystemExit(f"blocker failed for {name}")
        import cgnn_dgl.config, cgnn_dgl.graph_ops, cgnn_dgl.model, cgnn_dgl.step
        from cgnn_dgl.model import CGNN, ModelConfig
        from cgnn_dgl.step import FlatBatch, train_step
        torch.manual_seed(0)
        fb = FlatBatch.from_arrays(z=[8, 22, 8, 1], bond_src=[1, 0, 2, 1, 3], bond_dst=[0, 1, 1, 2, 3],
                                   atom_crystal=[0, 0, 0, 1], y=[[0.5], [-0.2]], y_mask=[[True], [True]])
        model = CGNN(ModelConfig.preset("benchmark", targets=("formation_energy",)))
        opt = torch.optim.Adam(model.parameters(), 1e-3)
        loss = train_step(model, opt, fb)
        assert torch.isfinite(loss)
        bad = sorted(m for m in sys.modules if m.split(".")[0] in ("dgl", "yaml", "pymatgen", "sqlalchemy"))
        print("ok", float(loss), bad)
    ''')
    r = subprocess.run([sys.executable, "-c", code], env=blocked_env(tmp_path), capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.startswith("ok") and r.stdout.strip().endswith("[]"), r.stdout


# --------------------------------------------------------------------------------------------------
# flat batches == DGL batches


@given(seed=st.integers(0, 2**32 - 1), n=st.integers(1, 40), ratio=st.booleans(), data=st.data())
def test_flat_batch_equals_dgl_batch(seed, n, ratio, data):
    """assemble() gives the DGL batch graph's own index tensors, bond ratios, atomic numbers and labels."""
    rng = np.random.default_rng(seed)
    p = random_packed(rng, n, ratio=ratio)
    idx = np.array(data.draw(st.lists(st.integers(0, n - 1), min_size=1, max_size=2 * n)))
    cols = data.draw(st.sampled_from([None, [0], [2, 0]]))
    fb = assemble(p, idx, cols)
    g = p.batch(idx)
    gi = GraphIndex.from_graph(g, backend="dgl")
    for name in ("bond_src", "bond_dst", "atom_crystal", "atom_count"):
        assert torch.equal(getattr(fb, name), getattr(gi, name)), name
    assert torch.equal(fb.z, g.nodes["atom"].data["Z"])
    c = slice(None) if cols is None else cols
    assert torch.equal(fb.y, g.nodes["crystal"].data["y"][:, c].float())
    assert torch.equal(fb.y_mask, g.nodes["crystal"].data["y_mask"][:, c])
    assert fb.n_atoms == gi.n_atoms and fb.n_crystals == gi.n_crystals
    if ratio:
        assert torch.equal(fb.graph_index().bond_ratio, gi.bond_ratio)
    else:
        assert fb.bond_ratio is None and gi.bond_ratio is None


@pytest.mark.parametrize("prefetch", [0, 1, 3])
def test_loader_yields_the_batches_in_order(prefetch):
    p = random_packed(np.random.default_rng(1), 50)
    order = np.random.default_rng(2).permutation(50)
    batches = index_batches(order, 8)
    assert [len(b) for b in batches] == [8] * 6 + [2]
    loader = FlatLoader(p, batches, "cpu", prefetch=prefetch)
    got = list(loader)
    assert len(got) == len(batches) == len(loader)
    for fb, b in zip(got, batches):
        ref = assemble(p, b)
        assert np.array_equal(fb.idx, b)
        for name in ("z", "bond_src", "bond_dst", "atom_crystal", "atom_count", "y", "y_mask"):
            assert torch.equal(getattr(fb, name), getattr(ref, name)), name


def test_loader_reraises_worker_errors_and_stops_early():
    p = random_packed(np.random.default_rng(3), 10)
    bad = [np.array([0, 1]), np.array([99])]  # row 99 does not exist
    it = iter(FlatLoader(p, bad, "cpu", prefetch=2))
    next(it)
    with pytest.raises(IndexError):
        next(it)
    # leaving a loop early does not hang on the worker thread
    for _ in FlatLoader(p, index_batches(np.arange(10), 1), "cpu", prefetch=1):
        break


def test_index_batches_drop_last():
    assert [len(b) for b in index_batches(np.arange(10), 4, drop_last=True)] == [4, 4]
    assert index_batches(np.arange(0), 4) == []


# --------------------------------------------------------------------------------------------------
# the training loop on either path


@pytest.fixture(scope="module")
def cache(tmp_path_factory, dev_corpus) -> Path:
    from tests.test_train import usable_rows, write_cache

    return write_cache(tmp_path_factory.mktemp("cache") / "c", usable_rows(dev_corpus, 160))


def _run(cache, out, **train):
    from cgnn_dgl.train import train_run
    from tests.test_train import tiny_config, weights

    train_run(tiny_config(cache, out, epochs=2, **train), out)
    hist = (out / "history.csv").read_text().splitlines()
    return weights(out / "last.pt"), [",".join(c for i, c in enumerate(r.split(",")) if i != 2) for r in hist]


def test_flat_loader_trains_exactly_like_the_dgl_loader(cache, tmp_path):
    """Same graph ops (torch backend), batches from flat arrays vs DGL graphs: bit-identical runs. Against
    DGL's own kernels (the CPU default) the losses agree to float32 rounding."""
    from tests.test_train import same_weights

    w_flat, h_flat = _run(cache, tmp_path / "flat", loader="flat", backend="torch")
    w_dgl, h_dgl = _run(cache, tmp_path / "dgl", loader="dgl", backend="torch")
    assert same_weights(w_flat, w_dgl)
    assert h_flat == h_dgl
    _, h_native = _run(cache, tmp_path / "native", loader="dgl", backend="dgl")
    for a, b in zip(h_flat[1:], h_native[1:]):
        va, vb = (np.array([float(x) for x in r.split(",")]) for r in (a, b))
        np.testing.assert_allclose(va, vb, rtol=2e-3, atol=1e-6)


def test_flat_loader_is_the_default_only_for_torch_ops():
    from cgnn_dgl.config import TrainConfig
    from cgnn_dgl.errors import UsageError
    from cgnn_dgl.train import use_flat_loader

    cpu = torch.device("cpu")
    assert not use_flat_loader(TrainConfig(), cpu)  # CPU default: DGL heterographs, unchanged
    assert use_flat_loader(TrainConfig(backend="torch"), cpu)
    assert use_flat_loader(TrainConfig(loader="flat"), cpu)
    assert not use_flat_loader(TrainConfig(backend="torch", loader="dgl"), cpu)
    with pytest.raises(UsageError, match="loader"):
        use_flat_loader(TrainConfig(loader="flat", backend="dgl"), cpu)
    with pytest.raises(UsageError, match="amp"):
        TrainConfig(amp="fp16").validate()


def test_deterministic_mode_trains_the_same_weights(cache, tmp_path):
    from tests.test_train import same_weights

    w_a, _ = _run(cache, tmp_path / "a", deterministic=True, loader="flat")
    try:
        assert torch.are_deterministic_algorithms_enabled()
    finally:
        torch.use_deterministic_algorithms(False)
    w_b, _ = _run(cache, tmp_path / "b", loader="flat")
    assert not torch.are_deterministic_algorithms_enabled()
    assert same_weights(w_a, w_b)  # the CPU kernels used here are deterministic either way


def test_compile_failure_falls_back_to_eager(cache, tmp_path, monkeypatch, caplog):
    """A compiled model that fails at its first call is replaced by the eager one for the whole run,
    and the run equals an uncompiled one."""
    from tests.test_train import same_weights

    class Broken(torch.nn.Module):
        def forward(self, *a):
            raise RuntimeError("inductor: no compiler for this platform")

    monkeypatch.setattr(torch, "compile", lambda module, **kw: Broken())
    w_c, h_c = _run(cache, tmp_path / "c", compile=True, loader="flat")
    assert "falling back to eager" in caplog.text
    w_e, h_e = _run(cache, tmp_path / "e", loader="flat")
    assert same_weights(w_c, w_e) and h_c == h_e


# --------------------------------------------------------------------------------------------------
# bf16 autocast against float32


@pytest.mark.parametrize("preset", ["benchmark", "complete"])
def test_bf16_autocast_matches_float32(dev_corpus, preset):
    """Same weights and batch: bf16 outputs, loss and gradients agree with float32 to bf16 precision
    (8 significant bits), and the loss is float32."""
    from cgnn_dgl.model import CGNN, ModelConfig
    from tests.test_train import usable_rows

    rows = usable_rows(dev_corpus, 128)
    numbers = [np.asarray(r["numbers"]) for r in rows]
    counts = [np.array([len(n) for n in r["neighbors"]]) for r in rows]
    nbr = [np.array([i for n in r["neighbors"] for i in n]) for r in rows]
    rng = np.random.default_rng(0)
    k = len(rows)
    p = PackedGraphs.from_arrays(np.concatenate(numbers), [len(n) for n in numbers], [len(x) for x in nbr],
                                 np.concatenate(nbr), np.concatenate([np.repeat(np.arange(len(c)), c) for c in counts]),
                                 rng.normal(size=(k, 1)), np.ones((k, 1), bool), np.arange(k),
                                 [r["name"] for r in rows], targets=["t"])
    fb = assemble(p, np.arange(k))
    torch.manual_seed(0)
    model = CGNN(ModelConfig.preset(preset, targets=("formation_energy",)))
    model.train()

    def run(amp):
        model.zero_grad(set_to_none=True)
        with autocast("cpu", amp):
            out = model(fb.z, fb.graph_index())
        loss = masked_mse(out.float(), fb.y, fb.y_mask)
        loss.backward()
        grad = torch.cat([q.grad.reshape(-1) for q in model.parameters() if q.grad is not None])
        return out.float().detach(), loss.detach(), grad

    out32, loss32, g32 = run("none")
    out16, loss16, g16 = run("bf16")
    assert loss16.dtype == torch.float32
    scale = float(out32.abs().max())
    assert float((out16 - out32).abs().max()) < 0.1 * scale
    assert float(loss16) == pytest.approx(float(loss32), rel=0.05)
    cos = float(torch.nn.functional.cosine_similarity(g16, g32, dim=0))
    assert cos > 0.98, cos


def test_train_step_with_bf16_learns(dev_corpus):
    """A few bf16 steps on one batch lower the loss (the optimizer state and loss stay float32)."""
    from cgnn_dgl.model import CGNN, ModelConfig

    fb = FlatBatch.from_arrays(z=[8, 22, 8, 3, 9, 9], bond_src=[1, 0, 2, 1, 4, 3, 5, 4], bond_dst=[0, 1, 1, 2, 3, 4, 4, 5],
                               atom_crystal=[0, 0, 0, 1, 1, 1], y=[[1.0], [-1.0]], y_mask=[[True], [True]])
    torch.manual_seed(0)
    model = CGNN(ModelConfig.preset("benchmark", targets=("formation_energy",), use_batch_norm=False))
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    losses = [float(train_step(model, opt, fb, amp="bf16")) for _ in range(30)]
    assert losses[-1] < 0.5 * losses[0]
    assert all(q.dtype == torch.float32 for q in model.parameters())


# --------------------------------------------------------------------------------------------------
# CUDA (skipped without a GPU)

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cuda
def test_cuda_loader_matches_cpu_batches():
    p = random_packed(np.random.default_rng(5), 64)
    batches = index_batches(np.arange(64), 16)
    for fb, b in zip(FlatLoader(p, batches, "cuda", prefetch=2), batches):
        ref = assemble(p, b)
        assert fb.z.is_cuda
        for name in ("z", "bond_src", "bond_dst", "atom_crystal", "atom_count", "y", "y_mask"):
            assert torch.equal(getattr(fb, name).cpu(), getattr(ref, name)), name


@cuda
def test_cuda_forward_and_gradients_match_cpu_float64():
    import copy

    from cgnn_dgl.model import CGNN, ModelConfig

    p = random_packed(np.random.default_rng(6), 64, n_targets=1)
    p.numbers[:] = np.where(p.numbers > 0, 8, 8)  # a species every preset knows
    fb = assemble(p, np.arange(64))
    torch.manual_seed(0)
    cpu = CGNN(ModelConfig.preset("complete", targets=("formation_energy",))).double().train()
    gpu = copy.deepcopy(cpu).cuda()
    res = []
    for model, batch in ((cpu, fb), (gpu, fb.to("cuda"))):
        out = model(batch.z, batch.graph_index())
        masked_mse(out, batch.y.double(), batch.y_mask).backward()
        res.append((out.detach().cpu(), [q.grad.cpu() for q in model.parameters()]))
    torch.testing.assert_close(res[1][0], res[0][0], rtol=1e-9, atol=1e-9)
    for a, b in zip(res[1][1], res[0][1]):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
