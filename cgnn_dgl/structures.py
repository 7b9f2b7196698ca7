"""Stage 1: crystal structures as plain arrays.

Everything downstream (coordinator, graphs, cache) works on :class:`Crystal`, a light record of a
lattice, atomic numbers and fractional coordinates. Keeping it free of pymatgen objects makes it cheap
to send to worker processes and to build from database rows; pymatgen is used only at the edges to
parse CIF/POSCAR files.
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

STRUCTURE_SUFFIXES = (".cif", ".vasp", ".poscar", ".contcar", ".cif.gz", ".vasp.gz")
STRUCTURE_NAMES = ("POSCAR", "CONTCAR")  # also POSCAR_xyz, CONTCAR.relax, ... (prefix match)


class StructureError(ValueError):
    """A structure that cannot become a crystal graph; ``reason`` is a short machine-readable tag."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason

    def __reduce__(self):  # travel between worker processes intact
        return (type(self), (self.reason, str(self)))


@dataclass
class Crystal:
    """A periodic structure: ``lattice`` rows are the vectors a, b, c in Å; ``frac`` is (n, 3)."""

    name: str
    lattice: np.ndarray
    numbers: np.ndarray
    frac: np.ndarray
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.lattice = np.asarray(self.lattice, dtype=np.float64).reshape(3, 3)
        self.numbers = np.asarray(self.numbers, dtype=np.int64).reshape(-1)
        self.frac = np.asarray(self.frac, dtype=np.float64).reshape(-1, 3)

    @property
    def n_atoms(self) -> int:
        return int(self.numbers.shape[0])

    @property
    def volume(self) -> float:
        return float(abs(np.linalg.det(self.lattice)))

    def validate(self) -> None:
        """Raise :class:`StructureError` for rows no graph can be built from."""
        if self.n_atoms == 0:
            raise StructureError("no_atoms", f"{self.name}: structure has no atoms")
        if self.frac.shape[0] != self.n_atoms:
            raise StructureError("bad_shape", f"{self.name}: {self.frac.shape[0]} coordinates for {self.n_atoms} atoms")
        if not np.all(np.isfinite(self.lattice)) or not np.all(np.isfinite(self.frac)):
            raise StructureError("non_finite", f"{self.name}: non-finite lattice or coordinates")
        det = np.linalg.det(self.lattice)
        if not det > 1e-8 and not det < -1e-8:
            raise StructureError("singular_lattice", f"{self.name}: lattice volume {det:.3g} <= 0 (singular cell)")
        if np.any(self.numbers < 1) or np.any(self.numbers > 118):
            raise StructureError("unknown_element", f"{self.name}: atomic number outside 1..118")

    @classmethod
    def from_pymatgen(cls, structure, name: str = "") -> Crystal:
        if not structure.is_ordered:
            raise StructureError("disordered", f"{name}: partially occupied sites are not supported")
        return cls(
            name=name,
            lattice=structure.lattice.matrix,
            numbers=[site.specie.Z for site in structure],
            frac=structure.frac_coords,
        )

    def to_pymatgen(self):
        from pymatgen.core import Lattice, Structure

        return Structure(Lattice(self.lattice), [int(z) for z in self.numbers], self.frac, coords_are_cartesian=False)


def as_crystal(obj, name: str = "") -> Crystal:
    """Accept a :class:`Crystal` or a pymatgen ``Structure``."""
    if isinstance(obj, Crystal):
        return obj
    return Crystal.from_pymatgen(obj, name=name)


def read_structure_file(path: str | os.PathLike, block: str | None = None) -> Crystal:
    """Parse one CIF or POSCAR file into a :class:`Crystal`; ``block`` picks one data block of a CIF with
    several structures (see :func:`cif_blocks`; without it, the first structure)."""
    import warnings

    from pymatgen.core import Structure

    path = Path(path)
    where = f"{path}#{block}" if block is not None else str(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if path.name.lower().endswith((".cif", ".cif.gz")):
                from pymatgen.io.cif import CifFile, CifParser

                if block is None:
                    structs = CifParser(str(path)).parse_structures(primitive=False)
                else:
                    data = CifFile.from_str(path.read_text(errors="replace")).data
                    if block not in data:
                        raise ValueError(f"no data block {block!r}")
                    structs = CifParser.from_str(str(data[block])).parse_structures(primitive=False)
                if not structs:
                    raise ValueError("no structure in CIF")
                structure = structs[0]
            else:
                structure = Structure.from_file(str(path))
    except StructureError:
        raise
    except Exception as exc:  # pymatgen raises many types for malformed files
        raise StructureError("parse_error", f"{where}: cannot parse ({type(exc).__name__}: {exc})") from None
    if block is not None:
        return Crystal.from_pymatgen(structure, name=f"{path.name}#{block}")
    return Crystal.from_pymatgen(structure, name=path.stem if path.name not in STRUCTURE_NAMES else str(path))


def cif_blocks(path: str | os.PathLike) -> list[str]:
    """Names of the data blocks of a plain ``.cif`` file that hold atom sites, when there are two or more
    (each becomes its own input, ``file.cif#block``); ``[]`` for a single-structure CIF, anything else, or
    an unreadable file (which then fails, as before, when it is parsed). A cheap text scan: no parsing."""
    import re

    path = Path(path)
    if not path.name.lower().endswith(".cif"):
        return []
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return []
    parts = re.split(r"(?im)^[ \t]*data_(\S+)[^\n]*$", text)
    blocks = [parts[k] for k in range(1, len(parts) - 1, 2) if "_atom_site_" in parts[k + 1].lower()]
    return blocks if len(blocks) > 1 else []


def crystals_from_json(path: str | os.PathLike) -> Iterator[Crystal | StructureError]:
    """Read a JSON list shaped like ``coordinator_dev.json`` (lattice, numbers, frac, name)."""
    with open(path) as fh:
        rows = json.load(fh)
    if not isinstance(rows, list):
        raise StructureError("parse_error", f"{path}: expected a JSON list of structures")
    for k, row in enumerate(rows):
        name = str(row.get("name", f"{Path(path).stem}-{k}")) if isinstance(row, dict) else f"{k}"
        try:
            yield Crystal(name=name, lattice=row["lattice"], numbers=row["numbers"], frac=row["frac"])
        except Exception as exc:
            yield StructureError("parse_error", f"{path}[{k}] {name}: {type(exc).__name__}: {exc}")


def is_structure_file(path: Path) -> bool:
    name = path.name.lower()
    return name.endswith(STRUCTURE_SUFFIXES) or name.startswith(tuple(n.lower() for n in STRUCTURE_NAMES))


def expand_inputs(inputs: Sequence[str | os.PathLike]) -> list[Path]:
    """Files named directly, plus structure files (sorted) inside named folders, recursively."""
    out: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            out.extend(sorted(f for f in p.rglob("*") if f.is_file() and is_structure_file(f)))
        elif p.exists():
            out.append(p)
        else:
            raise FileNotFoundError(f"input not found: {p}")
    return out


def iter_inputs(inputs: Sequence[str | os.PathLike]) -> Iterator[Crystal | StructureError | Path]:
    """Yield crystals from JSON lists, and paths of structure files (parsed later, in workers)."""
    for path in expand_inputs(inputs):
        if path.suffix.lower() == ".json":
            yield from crystals_from_json(path)
        else:
            yield path
