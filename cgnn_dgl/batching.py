"""Stage 5: from cached graphs to mini-batch heterographs.

All crystals of a cache are held as a handful of flat numpy arrays (about 0.3 kB per OQMD crystal)
and every mini-batch graph is built straight from sliced arrays: one ``dgl.heterograph`` call per
batch instead of ``dgl.batch`` over hundreds of small graph objects. Shuffling is numpy fancy
indexing. This keeps the data path far ahead of the training step (see ``bench/cache.py``).
DGL is imported only to build batch graphs, so the same packed arrays also feed the DGL-free GPU
path (:mod:`cgnn_dgl.step`).
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch

from cgnn_dgl import TARGETS, default_units
from cgnn_dgl.schema import (
    ATOM,
    BOND,
    ENTRY_ID,
    Y_MASK,
    Y,
    atom_numbers,
    bond_ratio,
    crystal_data,
    heterograph,
)
from cgnn_dgl.step import ranges as _ranges

if TYPE_CHECKING:
    import dgl


def _joined_ratios(parts: Sequence[np.ndarray | None]) -> np.ndarray | None:
    """The per-bond ratios of joined parts, or None when any part lacks them (no half-filled array)."""
    if any(p is None for p in parts):
        return None
    return np.concatenate(parts).astype(np.float32) if parts else np.zeros(0, np.float32)


@dataclass
class PackedGraphs:
    """Many crystal graphs as compact arrays; bonds use per-crystal local atom indices.
    (Read from a cache by :func:`cgnn_dgl.cache.load_packed`: this module does not import the cache.)"""

    numbers: np.ndarray  # (A,) uint8 atomic numbers
    node_ptr: np.ndarray  # (K+1,) int64 offsets into numbers
    bond_src: np.ndarray  # (B,) int32 neighbour, local to its crystal
    bond_dst: np.ndarray  # (B,) int32 centre, local to its crystal
    edge_ptr: np.ndarray  # (K+1,) int64 offsets into bonds
    y: np.ndarray  # (K, T) float64, columns in the order of ``targets``
    y_mask: np.ndarray  # (K, T) bool
    entry_id: np.ndarray  # (K,) int64 keys (OQMD entry id or input index)
    names: list[str]
    targets: tuple[str, ...] = TARGETS  # the names of the y columns, as the cache's manifest records them
    units: dict[str, str] = field(default_factory=dict)  # unit per target ("" when unknown)
    # (B,) float32 distance / cutoff per bond (model.geometry's input); None when the graphs came
    # without it (caches written before it existed, reference neighbour lists)
    bond_ratio: np.ndarray | None = None
    # True when ``entry_id`` is only the input order (a `cgnn graphs` cache): a split is then keyed by name,
    # so that it still maps onto a cache rebuilt from reordered inputs
    positional_keys: bool = False

    def __post_init__(self) -> None:
        self.targets = tuple(self.targets)
        self.units = {**default_units(self.targets), **self.units}
        if self.y.ndim != 2 or self.y.shape[1] != len(self.targets):
            raise ValueError(f"y has shape {self.y.shape}, expected (K, {len(self.targets)}) for {self.targets}")
        if self.bond_ratio is not None and self.bond_ratio.shape != self.bond_src.shape:
            raise ValueError(f"bond_ratio has shape {self.bond_ratio.shape}, expected {self.bond_src.shape}")

    def __len__(self) -> int:
        return int(self.entry_id.shape[0])

    @property
    def n_atoms(self) -> np.ndarray:
        return np.diff(self.node_ptr)

    @property
    def n_bonds(self) -> np.ndarray:
        return np.diff(self.edge_ptr)

    @property
    def nbytes(self) -> int:
        arrays = (self.numbers, self.node_ptr, self.bond_src, self.bond_dst, self.edge_ptr, self.y, self.y_mask,
                  self.entry_id)
        return int(sum(a.nbytes for a in arrays)) + (0 if self.bond_ratio is None else int(self.bond_ratio.nbytes))

    # -- construction ------------------------------------------------------------------------------
    @classmethod
    def from_arrays(cls, numbers, n_atoms, n_bonds, bond_src, bond_dst, y, y_mask, entry_id, names,
                    targets: Sequence[str] = TARGETS, units: dict[str, str] | None = None,
                    bond_ratio=None) -> PackedGraphs:
        node_ptr = np.zeros(len(n_atoms) + 1, dtype=np.int64)
        np.cumsum(n_atoms, out=node_ptr[1:])
        edge_ptr = np.zeros(len(n_bonds) + 1, dtype=np.int64)
        np.cumsum(n_bonds, out=edge_ptr[1:])
        return cls(np.asarray(numbers, np.uint8), node_ptr, np.asarray(bond_src, np.int32),
                   np.asarray(bond_dst, np.int32), edge_ptr, np.asarray(y, np.float64), np.asarray(y_mask, bool),
                   np.asarray(entry_id, np.int64), list(names), tuple(targets), dict(units or {}),
                   None if bond_ratio is None else np.asarray(bond_ratio, np.float32))

    @classmethod
    def concatenate(cls, parts: Sequence[PackedGraphs], targets: Sequence[str] | None = None,
                    units: dict[str, str] | None = None) -> PackedGraphs:
        """Join packed sets that share one target layout (``targets`` names it when ``parts`` is empty)."""
        targets = tuple(targets) if targets is not None else (parts[0].targets if parts else TARGETS)
        units = units if units is not None else (parts[0].units if parts else None)
        if any(p.targets != targets for p in parts):
            raise ValueError(f"cannot join graphs with different targets: {sorted({p.targets for p in parts})}")
        if not parts:
            n = len(targets)
            return cls.from_arrays([], [], [], [], [], np.zeros((0, n)), np.zeros((0, n), bool), [], [], targets, units)
        return cls.from_arrays(
            np.concatenate([p.numbers for p in parts]),
            np.concatenate([p.n_atoms for p in parts]),
            np.concatenate([p.n_bonds for p in parts]),
            np.concatenate([p.bond_src for p in parts]),
            np.concatenate([p.bond_dst for p in parts]),
            np.concatenate([p.y for p in parts]),
            np.concatenate([p.y_mask for p in parts]),
            np.concatenate([p.entry_id for p in parts]),
            [n for p in parts for n in p.names],
            targets,
            units,
            _joined_ratios([p.bond_ratio for p in parts]),
        )

    @classmethod
    def from_built(cls, built: Sequence, targets: Sequence[str] = TARGETS,
                   units: dict[str, str] | None = None) -> PackedGraphs:
        """From :class:`cgnn_dgl.cache.Built` records (e.g. straight from the pipeline, no cache)."""
        counts = [b.counts for b in built]
        n = len(tuple(targets))
        return cls.from_arrays(
            np.concatenate([b.numbers for b in built]) if built else [],
            [len(b.numbers) for b in built],
            [len(b.nbr) for b in built],
            np.concatenate([b.nbr for b in built]) if built else [],
            np.concatenate([np.repeat(np.arange(len(c)), c) for c in counts]) if built else [],
            np.stack([b.y for b in built]) if built else np.zeros((0, n)),
            np.stack([b.y_mask for b in built]) if built else np.zeros((0, n), bool),
            [b.key for b in built],
            [b.name for b in built],
            targets,
            units,
            _joined_ratios([getattr(b, "ratio", None) for b in built]) if built else None,
        )

    @classmethod
    def from_graphs(cls, graphs: Sequence[dgl.DGLHeteroGraph], names: Sequence[str] | None = None,
                    targets: Sequence[str] = TARGETS) -> PackedGraphs:
        """From single-crystal heterographs as made by :func:`cgnn_dgl.graph.crystal_graph`."""
        parts_src, parts_dst, nums, na, nb, ys, masks, ids, ratios = [], [], [], [], [], [], [], [], []
        for g in graphs:
            ratio = bond_ratio(g)
            ratios.append(None if ratio is None else ratio.numpy())
            s, d = g.edges(etype=BOND, order="eid")
            parts_src.append(s.numpy())
            parts_dst.append(d.numpy())
            nums.append(atom_numbers(g).numpy())
            na.append(g.num_nodes(ATOM))
            nb.append(g.num_edges(BOND))
            c = crystal_data(g)
            ys.append(c[Y].numpy().reshape(-1))
            masks.append(c[Y_MASK].numpy().reshape(-1))
            ids.append(int(c[ENTRY_ID][0]) if ENTRY_ID in c else len(ids))
        names = list(names) if names is not None else [str(i) for i in ids]
        return cls.from_arrays(np.concatenate(nums) if nums else [], na, nb,
                               np.concatenate(parts_src) if parts_src else [],
                               np.concatenate(parts_dst) if parts_dst else [],
                               np.stack(ys) if ys else np.zeros((0, len(targets))),
                               np.stack(masks) if masks else np.zeros((0, len(targets)), bool), ids, names, targets,
                               bond_ratio=_joined_ratios(ratios) if ratios else None)

    # -- selection ---------------------------------------------------------------------------------
    def subset(self, idx) -> PackedGraphs:
        idx = np.asarray(idx, dtype=np.int64)
        na, nb = self.n_atoms[idx], self.n_bonds[idx]
        atoms = _ranges(self.node_ptr[idx], na)
        bonds = _ranges(self.edge_ptr[idx], nb)
        return PackedGraphs.from_arrays(self.numbers[atoms], na, nb, self.bond_src[bonds], self.bond_dst[bonds],
                                        self.y[idx], self.y_mask[idx], self.entry_id[idx],
                                        [self.names[i] for i in idx], self.targets, self.units,
                                        None if self.bond_ratio is None else self.bond_ratio[bonds])

    def batch(self, idx) -> dgl.DGLHeteroGraph:
        """One batched heterograph for crystals ``idx`` (schema of ``graph.py``), built from arrays.
        (The DGL-free twin for the GPU path is :func:`cgnn_dgl.step.assemble`.)"""
        idx = np.asarray(idx, dtype=np.int64)
        na, nb = self.n_atoms[idx], self.n_bonds[idx]
        atoms = _ranges(self.node_ptr[idx], na)
        bonds = _ranges(self.edge_ptr[idx], nb)
        new_off = np.zeros(len(idx), dtype=np.int64)
        np.cumsum(na[:-1], out=new_off[1:])
        shift = np.repeat(new_off, nb)
        src = self.bond_src[bonds] + shift
        dst = self.bond_dst[bonds] + shift
        return heterograph(src, dst, np.repeat(np.arange(len(idx)), na), len(idx),
                           numbers=torch.from_numpy(self.numbers[atoms].astype(np.int64)),
                           y=torch.from_numpy(self.y[idx]), y_mask=torch.from_numpy(self.y_mask[idx]),
                           entry_id=torch.from_numpy(self.entry_id[idx]),
                           ratio=None if self.bond_ratio is None else torch.from_numpy(self.bond_ratio[bonds]),
                           batch_atoms=na, batch_bonds=nb)

    # -- composition helpers (splits, statistics) --------------------------------------------------
    def compositions(self) -> list[dict[int, int]]:
        out = []
        for k in range(len(self)):
            z, c = np.unique(self.numbers[self.node_ptr[k]:self.node_ptr[k + 1]], return_counts=True)
            out.append(dict(zip(z.tolist(), c.tolist())))
        return out

    def n_elements(self) -> np.ndarray:
        return np.array([len(c) for c in self.compositions()], dtype=np.int64)

    def formulas(self) -> list[str]:
        """Reduced formulas (pymatgen convention), e.g. for the reference's formula-grouped split."""
        import warnings

        from pymatgen.core import Composition, Element

        cache: dict[tuple, str] = {}
        out = []
        with warnings.catch_warnings():  # pymatgen warns about noble-gas electronegativities
            warnings.simplefilter("ignore")
            for comp in self.compositions():
                key = tuple(sorted(comp.items()))
                if key not in cache:
                    cache[key] = Composition({Element.from_Z(z): n for z, n in key}).reduced_formula
                out.append(cache[key])
        return out


def iter_batches(packed: PackedGraphs, indices, batch_size: int, shuffle: bool = False,
                 rng: np.random.Generator | None = None, drop_last: bool = False) -> Iterator[tuple[np.ndarray, dgl.DGLHeteroGraph]]:
    """Yield ``(idx, graph)`` mini-batches over ``indices`` (reshuffled per call when ``shuffle``)."""
    indices = np.asarray(indices, dtype=np.int64)
    if shuffle:
        rng = rng if rng is not None else np.random.default_rng()
        indices = indices[rng.permutation(len(indices))]
    stop = len(indices) - (len(indices) % batch_size if drop_last else 0)
    for start in range(0, stop, batch_size):
        idx = indices[start:start + batch_size]
        if len(idx):
            yield idx, packed.batch(idx)
