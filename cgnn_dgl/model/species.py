"""The 89 OQMD species of the reference one-hot: Z = 1..83 and 89..94 -> index 0..88."""
from __future__ import annotations

import torch

from cgnn_dgl.errors import CgnnError

SPECIES_Z: tuple[int, ...] = tuple(range(1, 84)) + tuple(range(89, 95))
N_SPECIES = len(SPECIES_Z)  # 89
MAX_Z = 94


class UnsupportedSpeciesError(CgnnError, ValueError):
    """An atomic number outside the 89 species the model was trained on (e.g. Po..Ac, Z=84..88)."""

    def __init__(self, elements: list[int]):
        self.elements = sorted({int(z) for z in elements})
        super().__init__(
            f"unsupported element(s) Z={self.elements}: the CGNN embedding covers Z=1-83 and 89-94 only"
        )


def species_table() -> torch.Tensor:
    """Lookup table of length MAX_Z + 2: ``table[Z]`` = species index or -1 (index MAX_Z+1 = overflow)."""
    table = torch.full((MAX_Z + 2,), -1, dtype=torch.int64)
    table[torch.tensor(SPECIES_Z)] = torch.arange(N_SPECIES)
    return table


def species_index(z: torch.Tensor, table: torch.Tensor | None = None) -> torch.Tensor:
    """Map atomic numbers to species indices 0..88; raises :class:`UnsupportedSpeciesError`."""
    if table is None:
        table = species_table().to(z.device)
    idx = table[z.clamp(0, MAX_Z + 1)]
    if idx.numel() and bool((idx < 0).any()):
        raise UnsupportedSpeciesError(z[idx < 0].tolist())
    return idx
