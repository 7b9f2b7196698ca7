"""The crystal heterograph schema: the one definition graph, cache, batching and graph_ops build on.

Node types ``atom`` (data ``Z``: atomic number) and ``crystal`` (data ``y`` (K, T) labels, ``y_mask``
(K, T) which labels exist, ``entry_id`` (K,) the crystal's key), T targets in the order the cache
records. Relations:

  * ``BOND = ('atom', 'bond', 'atom')``: one edge per entry of the neighbour multiset, directed
    neighbour -> centre, multi-edges and self-images kept; optional data ``ratio`` (float32, the
    bond's distance / cutoff, the model's geometry input);
  * ``IN = ('atom', 'in', 'crystal')``: one readout edge per atom, to its crystal.

Each caller chose its own dtypes before this module existed (int32 ids and int16 ``Z`` in cache shards,
int64 in batch graphs), so :func:`heterograph` stores what it is given and converts nothing.
DGL is imported only when a graph is built, so importing the names costs nothing.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch

import cgnn_dgl  # noqa: F401  (sets DGLBACKEND before dgl is imported)

if TYPE_CHECKING:
    import dgl

ATOM = "atom"
CRYSTAL = "crystal"
BOND = (ATOM, "bond", ATOM)
IN = (ATOM, "in", CRYSTAL)

Z = "Z"  # atom data: atomic number
Y = "y"  # crystal data: labels, one column per target
Y_MASK = "y_mask"  # crystal data: which labels exist
ENTRY_ID = "entry_id"  # crystal data: the crystal's key (OQMD entry id or input index)
RATIO = "ratio"  # optional bond data: distance / cutoff (float32), see coordinator.coordinate_packed


def _tensor(a: Any) -> torch.Tensor:
    return a if isinstance(a, torch.Tensor) else torch.as_tensor(np.asarray(a))


def crystal_of_atoms(atom_counts) -> np.ndarray:
    """The crystal index of every atom, for crystals of ``atom_counts`` atoms laid out one after another."""
    counts = np.asarray(atom_counts, dtype=np.int64)
    return np.repeat(np.arange(len(counts), dtype=np.int64), counts)


def heterograph(bond_src, bond_dst, atom_crystal, n_crystals: int, *, numbers=None, y=None, y_mask=None,
                entry_id=None, ratio=None, idtype: torch.dtype = torch.int64,
                batch_atoms=None, batch_bonds=None, device: torch.device | str | None = None) -> dgl.DGLHeteroGraph:
    """The crystal heterograph over global atom ids: bonds ``bond_src -> bond_dst`` and atom ``a`` in
    crystal ``atom_crystal[a]``. Node and bond data are set only where given, as given.

    ``batch_atoms`` / ``batch_bonds`` (per-crystal counts) mark the graph as a batch of single-crystal
    graphs (``dgl.unbatch`` and per-graph readouts then work) without calling ``dgl.batch``.
    """
    import dgl

    src, dst = _tensor(bond_src).to(idtype), _tensor(bond_dst).to(idtype)
    crystal = _tensor(atom_crystal).to(idtype)
    n_atoms = int(crystal.shape[0])
    g = dgl.heterograph(
        {BOND: (src, dst), IN: (torch.arange(n_atoms, dtype=idtype), crystal)},
        num_nodes_dict={ATOM: n_atoms, CRYSTAL: int(n_crystals)},
        idtype=idtype,
    )
    if batch_atoms is not None:
        na = _tensor(batch_atoms).to(torch.int64)
        g.set_batch_num_nodes({ATOM: na, CRYSTAL: torch.ones(int(n_crystals), dtype=torch.int64)})
        g.set_batch_num_edges({BOND: _tensor(batch_bonds).to(torch.int64), IN: na})
    for ntype, key, value in ((ATOM, Z, numbers), (CRYSTAL, Y, y), (CRYSTAL, Y_MASK, y_mask),
                              (CRYSTAL, ENTRY_ID, entry_id)):
        if value is not None:
            g.nodes[ntype].data[key] = _tensor(value)
    if ratio is not None:
        g.edges[BOND].data[RATIO] = _tensor(ratio)
    return g if device is None else g.to(device)


def bond_ratio(g) -> torch.Tensor | None:
    """The per-bond distance / cutoff of a graph, or None when it was built without it."""
    return g.edges[BOND].data.get(RATIO)


def atom_numbers(g) -> torch.Tensor:
    return g.nodes[ATOM].data[Z]


def crystal_data(g):
    """The crystal node data (``y``, ``y_mask``, ``entry_id``) of a graph."""
    return g.nodes[CRYSTAL].data
