"""Valence flags of a crystal's composition, for ``model.valence_features`` (not in the reference).

Why: whether a crystal is an insulator is mostly chemistry. A compound whose elements can take common
oxidation states that sum to zero (charge-balanced), with every ion in a closed shell (Ti4+ d0, Zn2+
d10, Pb2+ s2, O2-, ...), is a candidate insulator; a composition with no such assignment is almost
always a metal. The gated convolutions can learn this from the one-hot species, but not from the few
hundred insulators of a typical training set. On the Perov-5 training split (3,030 crystals, 118
insulators) the 356 crystals with a closed-shell balanced assignment of common states hold 92 of the
insulators, and the 2,106 that cannot be balanced with common states hold 18.

Four flags per crystal, from the composition alone (no geometry, so a prototype gives the same flags as
its relaxed structure; invariant under any strain, rotation and choice of cell):

    charge_balanced      some assignment of common oxidation states (one per element) sums to zero
    closed_shell         some such assignment has every ion in a closed shell
    charge_balanced_any  the same over every known oxidation state (Cu+ as well as Cu2+)
    closed_shell_any     ... with every ion in a closed shell

The oxidation states come from pymatgen's ``Element.common_oxidation_states`` and ``oxidation_states``
when the model is built,
and are stored in the model's state dict (buffer ``valence_table``), so a trained model gives the same
flags whatever pymatgen predicts with it.
"""
from __future__ import annotations

import itertools
import math
from collections.abc import Iterable
from typing import ClassVar

import torch
from torch import Tensor, nn

from cgnn_dgl.model.species import N_SPECIES, SPECIES_Z, species_index

FLAG_NAMES = ("charge_balanced", "closed_shell", "charge_balanced_any", "closed_shell_any")
MAX_STATES = 12  # known oxidation states per element (Mn has 8, the most); padded with 0 = unused
_NOBLE_CORE = (2, 10, 18, 36, 54, 86)


def is_closed_shell(z: int, group: int, block: str, ox: int) -> bool:
    """Whether the ion of element ``z`` (periodic ``group``, ``block``) in oxidation state ``ox`` has a
    closed shell: noble-gas core (Na+, Ti4+, O2-, La3+), d10 (Zn2+, Ga3+, Ag+), s2 lone pair (Pb2+, Bi3+),
    or f0 / f14 (Ce4+, Lu3+)."""
    if ox < 0:  # anions: the next noble gas (O2-, N3-, F-) or hydride
        return (block == "p" and ox == group - 18) or (z == 1 and ox == -1)
    if ox == 0:
        return group == 18
    if block == "s":
        return ox == group
    if block == "p":
        return group - 10 - ox in (0, 2)
    if block == "d":
        return group - ox in (0, 10)
    core = max(c for c in _NOBLE_CORE if c < z)  # f block: electrons beyond the noble-gas core
    return z - core - ox in (0, 14)


def valence_table() -> Tensor:
    """``(89, MAX_STATES)`` int64 table, one row per species: its known oxidation states, each coded with
    its closed-shell flag and whether it is a common state as a positive integer, 0 for an unused slot
    (:func:`decode_states`)."""
    import warnings

    from pymatgen.core.periodic_table import Element

    rows = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for z in SPECIES_Z:
            el = Element.from_Z(z)
            common = {int(s) for s in (el.common_oxidation_states or ())}
            known = sorted(common | {int(s) for s in (el.oxidation_states or ())}) or [0]
            codes = [_encode(ox, is_closed_shell(z, int(el.group), str(el.block), ox), ox in common or not common)
                     for ox in known]
            if len(codes) > MAX_STATES:  # keep the common states, then those nearest to zero
                codes = sorted(codes, key=lambda c: (not decode_states([c])[0][2], abs(decode_states([c])[0][0])))
            rows.append((codes + [0] * MAX_STATES)[:MAX_STATES])
    return torch.tensor(rows, dtype=torch.int64)


def _encode(ox: int, closed: bool, common: bool) -> int:
    return ((ox + 16) * 2 + int(closed)) * 2 + int(common) + 1  # > 0 for every ox >= -16


def decode_states(codes: Iterable[int]) -> tuple[tuple[int, bool, bool], ...]:
    """(oxidation state, closed shell, common) triples of one table row."""
    return tuple(((c - 1) // 4 - 16, bool((c - 1) // 2 % 2), bool((c - 1) % 2)) for c in codes if c > 0)


def composition_flags(counts: dict[int, int], states: dict[int, tuple[tuple[int, bool, bool], ...]]
                      ) -> tuple[bool, bool, bool, bool]:
    """The :data:`FLAG_NAMES` of a composition ``{species index: atom count}``.

    Sets of reachable total charges are grown one element at a time (one oxidation state per element):
    over the common states, their closed-shell subset, every known state and its closed-shell subset.
    Linear in the number of elements.
    """
    keep = (lambda st: st[2], lambda st: st[2] and st[1], lambda st: True, lambda st: st[1])
    reach = [{0} for _ in keep]
    for s, n in counts.items():
        for k, ok in enumerate(keep):
            oxs = {st[0] for st in states[s] if ok(st)}
            reach[k] = {q + n * ox for q, ox in itertools.product(reach[k], oxs)}
    return tuple(0 in r for r in reach)


class ValenceFlags(nn.Module):
    """``(n_crystals, 4)`` float flags (:data:`FLAG_NAMES`) of each crystal in a batch, from its atoms' Z.

    The flags are computed on the host from each crystal's reduced composition and cached by it (an epoch
    revisits every composition; the cache is emptied past :attr:`CACHE_SIZE` entries so that a screen of
    millions of candidates stays bounded); the result is moved to the device of ``z``. The cache is shared
    by every module with the same ``valence_table`` in the process, so the members of an ensemble
    screening new compositions compute each one once, not once per member.
    """

    CACHE_SIZE = 200_000
    _shared: ClassVar[dict[bytes, tuple[dict, dict]]] = {}  # table bytes -> (decoded states, flag cache)

    def __init__(self):
        super().__init__()
        self.register_buffer("valence_table", valence_table())
        self._states: dict[int, tuple[tuple[int, bool, bool], ...]] | None = None
        self._cache: dict[tuple, tuple[float, ...]] = {}

    def _load_from_state_dict(self, *args, **kwargs):  # a loaded table may differ from the built one
        super()._load_from_state_dict(*args, **kwargs)
        self._states, self._cache = None, {}

    def forward(self, z: Tensor, atom_crystal: Tensor, n_crystals: int) -> Tensor:
        if self._states is None:
            table = self.valence_table.cpu()
            key = table.numpy().tobytes()
            entry = self._shared.get(key)
            if entry is None:
                rows = table.tolist()
                entry = self._shared[key] = ({s: decode_states(rows[s]) for s in range(N_SPECIES)}, {})
            self._states, self._cache = entry
        idx = species_index(z).cpu()
        crystal = atom_crystal.cpu()
        counts = torch.zeros(n_crystals, N_SPECIES, dtype=torch.int64)
        counts.index_put_((crystal, idx), torch.ones_like(idx), accumulate=True)
        out = []
        for row in counts.tolist():
            present = [(s, n) for s, n in enumerate(row) if n]
            g = math.gcd(*(n for _, n in present)) if present else 1
            key = tuple((s, n // g) for s, n in present)  # a supercell has the flags of its cell
            flags = self._cache.get(key)
            if flags is None:
                if len(self._cache) >= self.CACHE_SIZE:
                    self._cache.clear()
                flags = tuple(float(f) for f in composition_flags(dict(key), self._states))
                self._cache[key] = flags
            out.append(flags)
        return torch.tensor(out, dtype=torch.float32).reshape(n_crystals, len(FLAG_NAMES)).to(z.device)
