"""Stage 3: one crystal as a DGL heterograph.

Schema (docs/design.md):
  * node types ``atom`` (data ``Z``: int64 atomic number) and ``crystal`` (data ``y`` float64 (T,),
    ``y_mask`` bool (T,), ``entry_id`` int64), T targets in the order the cache records (OQMD: 4);
  * ``('atom', 'bond', 'atom')``: one edge per entry of the reference neighbour multiset, directed
    neighbour -> centre, multi-edges and self-images kept;
    bond data ``ratio`` (float32, optional): distance / cutoff of the bond, the model's geometry input;
  * ``('atom', 'in', 'crystal')``: readout edges.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import dgl
import numpy as np
import torch

import cgnn_dgl  # noqa: F401  (sets DGLBACKEND before dgl is imported)
from cgnn_dgl import TARGETS

BOND = ("atom", "bond", "atom")
IN = ("atom", "in", "crystal")
RATIO = "ratio"  # optional bond data: distance / cutoff (float32), see coordinator.coordinate_packed


def target_arrays(targets: Mapping[str, float | None] | Sequence[float] | np.ndarray | None,
                  names: Sequence[str] = TARGETS) -> tuple[np.ndarray, np.ndarray]:
    """Turn a mapping (missing keys / None / NaN = unlabelled) or an array in the order of ``names``
    (default: the OQMD targets) into (y, y_mask)."""
    names = tuple(names)
    y = np.full(len(names), np.nan)
    if targets is not None:
        if isinstance(targets, Mapping):
            unknown = set(targets) - set(names)
            if unknown:
                raise KeyError(f"unknown target(s) {sorted(unknown)}; expected some of {names}")
            for k, name in enumerate(names):
                v = targets.get(name)
                y[k] = np.nan if v is None else float(v)
        else:
            y[:] = np.asarray(targets, dtype=np.float64).reshape(len(names))
    mask = np.isfinite(y)
    return np.where(mask, y, 0.0), mask


def bonds_from_neighbors(neighbors: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
    """Reference neighbour lists -> (src = neighbour, dst = centre) edge arrays, in reference order."""
    counts = np.fromiter((len(n) for n in neighbors), dtype=np.int64, count=len(neighbors))
    src = np.fromiter((i for n in neighbors for i in n), dtype=np.int64, count=int(counts.sum()))
    dst = np.repeat(np.arange(len(neighbors), dtype=np.int64), counts)
    return src, dst


def graph_from_bonds(
    numbers: np.ndarray,
    src: np.ndarray,
    dst: np.ndarray,
    y: np.ndarray | None = None,
    y_mask: np.ndarray | None = None,
    entry_id: int = -1,
    ratio: np.ndarray | None = None,
) -> dgl.DGLHeteroGraph:
    n = int(len(numbers))
    g = dgl.heterograph(
        {
            BOND: (torch.as_tensor(src, dtype=torch.int64), torch.as_tensor(dst, dtype=torch.int64)),
            IN: (torch.arange(n), torch.zeros(n, dtype=torch.int64)),
        },
        num_nodes_dict={"atom": n, "crystal": 1},
    )
    g.nodes["atom"].data["Z"] = torch.as_tensor(np.asarray(numbers), dtype=torch.int64)
    if y is None:
        y, y_mask = target_arrays(None)
    g.nodes["crystal"].data["y"] = torch.as_tensor(np.asarray(y, dtype=np.float64)).reshape(1, -1)
    g.nodes["crystal"].data["y_mask"] = torch.as_tensor(np.asarray(y_mask, dtype=bool)).reshape(1, -1)
    g.nodes["crystal"].data["entry_id"] = torch.tensor([int(entry_id)], dtype=torch.int64)
    if ratio is not None:
        g.edges[BOND].data[RATIO] = torch.as_tensor(np.asarray(ratio, dtype=np.float32))
    return g


def graph_from_neighbors(numbers, neighbors, targets=None, entry_id: int = -1) -> dgl.DGLHeteroGraph:
    """Build the heterograph from precomputed neighbour lists (e.g. the reference's ``neighbors``)."""
    src, dst = bonds_from_neighbors(neighbors)
    y, mask = target_arrays(targets)
    return graph_from_bonds(np.asarray(numbers), src, dst, y, mask, entry_id)


def crystal_graph(structure, targets=None, entry_id: int = -1, params=None) -> dgl.DGLHeteroGraph:
    """A pymatgen ``Structure`` (or :class:`~cgnn_dgl.structures.Crystal`) -> crystal heterograph."""
    from cgnn_dgl.coordinator import DEFAULT_PARAMS, coordinate_csr
    from cgnn_dgl.structures import as_crystal

    crystal = as_crystal(structure)
    counts, nbr, ratio = coordinate_csr(crystal, params or DEFAULT_PARAMS, ratios=True)
    dst = np.repeat(np.arange(crystal.n_atoms, dtype=np.int64), counts)
    y, mask = target_arrays(targets)
    return graph_from_bonds(crystal.numbers, nbr.astype(np.int64), dst, y, mask, entry_id, ratio)
