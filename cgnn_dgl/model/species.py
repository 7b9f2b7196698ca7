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


# Elemental descriptors for ``model.species_descriptors`` (not in the reference). The one-hot embedding
# learns each species from the crystals it appears in; on a few thousand structures many of the 89
# species are seen a handful of times. Tabulated element properties let rare species borrow from
# chemically similar ones (the idea behind CGCNN's atom features).
DESCRIPTOR_NAMES: tuple[str, ...] = (
    "Z", "row", "group", "X", "atomic_radius", "mendeleev_no", "ionization_energy", "electron_affinity",
    "molar_volume", "atomic_mass", "min_oxidation_state", "max_oxidation_state",
    "block_s", "block_p", "block_d", "block_f",
)
N_DESCRIPTORS = len(DESCRIPTOR_NAMES)


def _element_row(z: int) -> list[float]:
    import warnings

    from pymatgen.core.periodic_table import Element

    def num(value) -> float:
        try:
            return float(value)
        except (TypeError, ValueError):
            return float("nan")

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        el = Element.from_Z(z)
        oxi = el.common_oxidation_states or el.oxidation_states or (0,)
        row = [z, el.row, el.group, num(el.X), num(el.atomic_radius), num(el.mendeleev_no),
               num(el.ionization_energy), num(el.electron_affinity), num(el.molar_volume),
               num(el.atomic_mass), min(oxi), max(oxi)]
        row += [float(el.block == b) for b in "spdf"]
    return [float(v) for v in row]


def species_descriptors() -> torch.Tensor:
    """(89, :data:`N_DESCRIPTORS`) float32 table, one row per species, each column standardized.

    Missing values (no electronegativity for the noble gases, for example) become the column mean,
    i.e. 0 after standardization. Stored in the model's state dict, so a trained model does not
    depend on the pymatgen version that predicts with it.
    """
    table = torch.tensor([_element_row(z) for z in SPECIES_Z], dtype=torch.float64)
    mean = torch.nanmean(table, dim=0)
    table = torch.where(torch.isnan(table), mean.expand_as(table), table)
    std = table.std(dim=0)
    table = (table - table.mean(dim=0)) / torch.where(std > 0, std, torch.ones_like(std))
    return table.to(torch.float32)
