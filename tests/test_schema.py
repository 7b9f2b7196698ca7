"""The heterograph schema: one builder behind single graphs, cache shards, batches and GraphIndex."""
from __future__ import annotations

import re
import subprocess
import sys
import tempfile
from pathlib import Path

import dgl
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cgnn_dgl import schema
from cgnn_dgl.batching import PackedGraphs
from cgnn_dgl.cache import Built, pack_graph, read_shard_arrays
from cgnn_dgl.graph import graph_from_bonds
from cgnn_dgl.graph_ops import GraphIndex
from cgnn_dgl.schema import ATOM, BOND, CRYSTAL, ENTRY_ID, IN, RATIO, Y_MASK, Y, Z

PACKAGE = Path(__file__).resolve().parents[1] / "cgnn_dgl"


@st.composite
def crystals(draw):
    """1-5 random crystals: 1-6 atoms each, 0-12 bonds (multi-edges and self-bonds allowed), 2 targets
    with random gaps, optional ratios."""
    k = draw(st.integers(1, 5))
    with_ratio = draw(st.booleans())
    out = []
    for key in range(k):
        n = draw(st.integers(1, 6))
        b = draw(st.integers(0, 12))
        rng = np.random.default_rng(draw(st.integers(0, 2**31)))
        nbr = rng.integers(0, n, b)
        counts = np.bincount(rng.integers(0, n, b), minlength=n)
        y = np.where(rng.random(2) < 0.3, np.nan, rng.normal(size=2))
        ratio = rng.uniform(0.5, 1.0, b).astype(np.float32) if with_ratio else None
        out.append(Built(10 * key + 3, f"c{key}", rng.integers(1, 90, n), counts, nbr, np.nan_to_num(y),
                         np.isfinite(y), ratio=ratio))
    return out


def _single(b: Built):
    return graph_from_bonds(b.numbers, b.nbr, np.repeat(np.arange(len(b.counts)), b.counts), b.y, b.y_mask,
                            b.key, b.ratio)


def test_relation_and_key_names():
    assert BOND == ("atom", "bond", "atom") and IN == ("atom", "in", "crystal")
    assert (ATOM, CRYSTAL, Z, Y, Y_MASK, ENTRY_ID, RATIO) == ("atom", "crystal", "Z", "y", "y_mask", "entry_id", "ratio")


def test_builder_stores_what_it_is_given():
    g = schema.heterograph(np.array([1, 0, 2]), np.array([0, 1, 1]), np.array([0, 0, 1]), 2,
                           numbers=torch.tensor([8, 1, 26], dtype=torch.int16), idtype=torch.int32)
    assert g.idtype == torch.int32 and g.ntypes == [ATOM, CRYSTAL]
    assert g.num_nodes(ATOM) == 3 and g.num_nodes(CRYSTAL) == 2 and g.num_edges(BOND) == 3
    assert g.nodes[ATOM].data[Z].dtype == torch.int16  # no conversion
    assert Y not in g.nodes[CRYSTAL].data and schema.bond_ratio(g) is None  # only what was given
    s, d = g.edges(etype=IN, order="eid")
    assert s.tolist() == [0, 1, 2] and d.tolist() == [0, 0, 1]


def test_crystal_of_atoms():
    assert schema.crystal_of_atoms([2, 0, 3]).tolist() == [0, 0, 2, 2, 2]
    assert schema.crystal_of_atoms([]).tolist() == []


@settings(max_examples=40, deadline=None)
@given(crystals())
def test_batch_shard_and_single_graphs_agree(built):
    """The packed batch, the cache shard and dgl.batch of single graphs are the same graph."""
    packed = PackedGraphs.from_built(built, targets=("a", "b"))
    idx = np.arange(len(built))
    batch = packed.batch(idx)
    ref = dgl.batch([_single(b) for b in built])
    for etype in (BOND, IN):
        for x, r in zip(batch.edges(etype=etype, order="eid"), ref.edges(etype=etype, order="eid")):
            assert torch.equal(x, r)
    assert torch.equal(batch.batch_num_nodes(ATOM), ref.batch_num_nodes(ATOM))
    assert torch.equal(batch.batch_num_edges(BOND), ref.batch_num_edges(BOND))
    for key in (Y, Y_MASK, ENTRY_ID):
        assert torch.equal(batch.nodes[CRYSTAL].data[key], ref.nodes[CRYSTAL].data[key]), key
    assert torch.equal(batch.nodes[ATOM].data[Z], ref.nodes[ATOM].data[Z])
    if built[0].ratio is None:
        assert schema.bond_ratio(batch) is None
    else:
        assert torch.equal(schema.bond_ratio(batch), schema.bond_ratio(ref))
    # the unbatched pieces are the single graphs again
    for one, b in zip(dgl.unbatch(batch), built):
        assert one.nodes[ATOM].data[Z].tolist() == list(b.numbers)

    g, labels = pack_graph(built, n_targets=2)
    assert g.idtype == torch.int32
    with tempfile.TemporaryDirectory() as tmp:
        dgl.save_graphs(str(Path(tmp) / "shard.bin"), [g], labels)
        a = read_shard_arrays(Path(tmp) / "shard.bin")
    np.testing.assert_array_equal(a["bond_src"], packed.bond_src)
    np.testing.assert_array_equal(a["bond_dst"], packed.bond_dst)
    np.testing.assert_array_equal(a["numbers"], packed.numbers)
    np.testing.assert_array_equal(a["y"], packed.y)
    np.testing.assert_array_equal(a["y_mask"], packed.y_mask)

    gi = GraphIndex.from_graph(batch, backend="torch")
    np.testing.assert_array_equal(gi.atom_crystal.numpy(), schema.crystal_of_atoms(packed.n_atoms))
    arr = GraphIndex.from_arrays(gi.bond_src, gi.bond_dst, gi.atom_crystal, len(built), backend="dgl")
    assert set(arr.dgl_graph.canonical_etypes) == {BOND, IN} and arr.dgl_graph.num_edges(IN) == len(packed.numbers)


@pytest.mark.parametrize("module", ["graph", "cache", "batching", "graph_ops"])
def test_only_schema_builds_or_names_the_heterograph(module):
    """graph, cache, batching and graph_ops build through schema.heterograph and spell no relation."""
    src = (PACKAGE / f"{module}.py").read_text()
    assert "dgl.heterograph(" not in src
    assert not re.search(r"""\(\s*["']atom["']\s*,\s*["'](bond|in)["']""", src)
    assert not re.search(r"""num_nodes_dict|\.nodes\[\s*["'](atom|crystal)["']\s*\]""", src)


def test_batching_does_not_import_the_cache():
    code = "import sys, cgnn_dgl.batching; print('cgnn_dgl.cache' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=PACKAGE.parent)
    assert out.stdout.strip() == "False"
