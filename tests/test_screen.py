"""`cgnn screen`: symmetry-distinct counts (closed-form answers), shared-geometry graphs == coordinator."""
from __future__ import annotations

from math import comb

import numpy as np
import pytest

from cgnn_dgl.structures import Crystal

X_POOL = ("O", "N", "F", "S", "Cl")


def perovskite() -> Crystal:
    frac = [[0, 0, 0], [.5, .5, .5], [.5, .5, 0], [.5, 0, .5], [0, .5, .5]]
    return Crystal("ABX3", np.eye(3) * 3.9, [38, 22, 8, 8, 8], frac)


def rocksalt_conventional() -> Crystal:
    cat = [[0, 0, 0], [.5, .5, 0], [.5, 0, .5], [0, .5, .5]]
    an = [[.5, 0, 0], [0, .5, 0], [0, 0, .5], [.5, .5, .5]]
    return Crystal("NaCl", np.eye(3) * 5.6, [11] * 4 + [17] * 4, cat + an)


@pytest.mark.parametrize("k", [1, 2, 3, 4, 5])
def test_perovskite_x_pool_gives_multisets(k):
    from cgnn_dgl.screen import count_distinct

    # the three X sites are permuted by S3: decorations are multisets of size 3 from k elements
    assert count_distinct(perovskite(), [((2, 3, 4), X_POOL[:k])]) == comb(k + 2, 3)
    assert count_distinct(perovskite(), [((0,), ("Li", "Na", "K")), ((1,), ("Ti", "Zr")),
                                         ((2, 3, 4), X_POOL[:k])]) == 3 * 2 * comb(k + 2, 3)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_rocksalt_cation_pool_gives_multisets(k):
    from cgnn_dgl.screen import count_distinct

    # translations and the point group act on the 4 fcc cation sites as S4: multisets of size 4
    assert count_distinct(rocksalt_conventional(), [((0, 1, 2, 3), ("Na", "K", "Li")[:k])]) == comb(k + 3, 4)


def test_shared_geometry_graphs_equal_coordinator():
    from cgnn_dgl.coordinator import DEFAULT_PARAMS, coordinate_packed
    from cgnn_dgl.screen import Decorations, ProtoNeighbours

    proto = perovskite()
    sites = [((0,), ("Li", "Na", "K", "Cs")), ((1,), ("Ti", "Zr", "Hf")), ((2, 3, 4), ("O", "N", "F", "S"))]
    dec = Decorations.build(proto, sites)
    keys = dec.canonical(0, dec.total)
    numbers = dec.numbers(keys)
    from cgnn_dgl.coordinator import radius_table

    r = radius_table()
    rmin = np.array([min(r[z] for z in set(numbers[:, s])) for s in range(5)])
    rmax = np.array([max(r[z] for z in set(numbers[:, s])) for s in range(5)])
    counts, src, _dst, ratio = ProtoNeighbours(proto, rmin, rmax, DEFAULT_PARAMS).graphs(numbers)
    crystals = [Crystal(str(k), proto.lattice, nums, proto.frac) for k, nums in zip(keys, numbers)]
    _, c_ref, nbr_ref, ratio_ref = coordinate_packed(crystals, DEFAULT_PARAMS, ratios=True)
    assert np.array_equal(counts, c_ref)
    assert np.array_equal(src, nbr_ref)
    assert np.array_equal(ratio, ratio_ref)


@pytest.mark.parametrize("site,message", [("9=Li", "out of range"), ("0=", "empty element pool"),
                                          ("0=Xq", "not an element")])
def test_bad_site_arguments(site, message):
    from cgnn_dgl.errors import UsageError
    from cgnn_dgl.screen import Decorations, parse_site

    with pytest.raises(UsageError, match=message):
        Decorations.build(perovskite(), [parse_site(site)])
