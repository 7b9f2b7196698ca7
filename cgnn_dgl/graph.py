"""Stage 3: one crystal as a DGL heterograph.

The schema is :mod:`cgnn_dgl.schema` (docs/design.md); single-crystal graphs hold int64 ids and ``Z``,
float64 ``y`` (1, T), bool ``y_mask`` (1, T) and int64 ``entry_id``, T targets in the order the cache
records (OQMD: 4). Bonds follow the reference neighbour multiset.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import dgl
import numpy as np
import torch

import cgnn_dgl  # noqa: F401  (sets DGLBACKEND before dgl is imported)
from cgnn_dgl import TARGETS
from cgnn_dgl.schema import heterograph


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
    if y is None:
        y, y_mask = target_arrays(None)
    return heterograph(
        torch.as_tensor(src, dtype=torch.int64), torch.as_tensor(dst, dtype=torch.int64),
        torch.zeros(n, dtype=torch.int64), 1,
        numbers=torch.as_tensor(np.asarray(numbers), dtype=torch.int64),
        y=torch.as_tensor(np.asarray(y, dtype=np.float64)).reshape(1, -1),
        y_mask=torch.as_tensor(np.asarray(y_mask, dtype=bool)).reshape(1, -1),
        entry_id=torch.tensor([int(entry_id)], dtype=torch.int64),
        ratio=None if ratio is None else torch.as_tensor(np.asarray(ratio, dtype=np.float32)),
    )


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
