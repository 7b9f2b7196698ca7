"""cgnn-dgl: OQMD rows -> structures -> crystal graphs -> cache -> batches -> CGNN -> metrics.

The DGL backend is pinned to PyTorch before anything imports dgl, so users never see DGL's
"backend not selected" message or need a ~/.dgl/config.json.
"""
import os as _os

_os.environ.setdefault("DGLBACKEND", "pytorch")

__version__ = "0.1.0"

TARGETS: tuple[str, ...] = ("formation_energy", "volume_per_atom", "band_gap", "magnetization")
"""The OQMD targets, and the default order of ``y`` / ``y_mask`` columns. A cache records its own target
names (``manifest.json`` ``targets``), so a user's cache may hold any others."""

TARGET_UNITS: dict[str, str] = {
    "formation_energy": "eV/atom",
    "volume_per_atom": "Å³/atom",
    "band_gap": "eV",
    "magnetization": "μB/atom",
}
"""Units of the OQMD targets; a cache of other targets records theirs in the manifest (``units``)."""


def default_units(names) -> dict[str, str]:
    """Units for target names, known ones from :data:`TARGET_UNITS`, unknown ones as ``""``."""
    return {str(n): TARGET_UNITS.get(str(n), "") for n in names}
