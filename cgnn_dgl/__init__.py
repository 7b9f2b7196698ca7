"""cgnn-dgl: OQMD rows -> structures -> crystal graphs -> cache -> batches -> CGNN -> metrics.

The DGL backend is pinned to PyTorch before anything imports dgl, so users never see DGL's
"backend not selected" message or need a ~/.dgl/config.json.
"""
import os as _os

_os.environ.setdefault("DGLBACKEND", "pytorch")

__version__ = "0.1.0"

TARGETS: tuple[str, ...] = ("formation_energy", "volume_per_atom", "band_gap", "magnetization")
"""Order of the four regression targets in every ``y`` / ``y_mask`` array."""
