"""Offline example structures: the AFLOW prototype library that ships inside pymatgen.

Used by `make demo` and by users who want a few real crystals to try the tool on without a network.
"""
from __future__ import annotations

import re
import warnings
from pathlib import Path


def prototype_structures(limit: int | None = None):
    """(name, pymatgen Structure) for each AFLOW prototype bundled with pymatgen."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from pymatgen.analysis.prototypes import AFLOW_PROTOTYPE_LIBRARY

    out = []
    for entry in AFLOW_PROTOTYPE_LIBRARY[:limit]:
        snl = entry["snl"]
        tags = entry.get("tags", {})
        name = tags.get("aflow") or snl.structure.composition.reduced_formula
        out.append((re.sub(r"[^A-Za-z0-9_.-]", "_", str(name)), snl.structure))
    return out


def write_prototypes(folder, limit: int | None = None) -> list[Path]:
    from pymatgen.io.cif import CifWriter

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    seen: dict[str, int] = {}
    for name, structure in prototype_structures(limit):
        seen[name] = seen.get(name, 0) + 1
        path = folder / (f"{name}.cif" if seen[name] == 1 else f"{name}-{seen[name]}.cif")
        CifWriter(structure).write_file(str(path))
        paths.append(path)
    return paths


def _cmd_examples(args) -> int:
    paths = write_prototypes(args.out, args.limit)
    print(f"wrote {len(paths)} AFLOW prototype structures (bundled with pymatgen) as CIF files to {args.out}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("examples", help="write pymatgen's bundled AFLOW prototypes as CIF files (offline)")
    p.add_argument("--out", required=True, help="folder for the CIF files")
    from cgnn_dgl.errors import positive_int

    p.add_argument("--limit", type=positive_int, default=None, help="write only the first N (default: all)")
    p.set_defaults(func=_cmd_examples)
