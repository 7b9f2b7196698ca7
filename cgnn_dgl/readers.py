"""Labelled inputs for `cgnn graphs`: the field's data formats, read into :class:`BuildItem` s.

Each reader turns one input into records of (id, structure, labels). The id the user gave (id column,
file stem, ASE row id) is the structure's name everywhere after: in the cache, in ``rejects.csv`` and in
predictions. A bad row never stops a run: it becomes a crystal that fails, under its id, with a reason
(``missing_file``, ``bad_label``, ``duplicate_id``, ``unknown_column``, ...) when the build reaches it.

Labels are numbers; an empty cell, a missing key, ``NaN`` (or ``NA``, ``null``, ``None``) means
"unlabelled": the value is masked in training, the structure is kept. Structure text is parsed in the
worker processes (:class:`PendingCrystal`), so a large CSV of CIFs is parsed in parallel.

Formats (chosen by :func:`read_inputs` from the path):

- a folder holding ``id_prop.csv`` (CGCNN): ``id,value[,value...]`` with or without a header, and one
  structure file per id (``<id>.cif``, ``<id>.vasp``, ``<id>.poscar``, ``<id>`` or ``POSCAR_<id>``, ...);
- ``*.csv`` / ``*.tsv``: one row per structure, a column of CIF or POSCAR text or of structure-file paths
  (relative paths are resolved against the CSV's folder);
- ``*.extxyz`` / ``*.xyz``: extended XYZ, labels in each frame's info line (read with ``ase``);
- ``*.db``: an ASE database, labels in its key-value pairs (read with ``ase``);
- ``*.json``: pymatgen ``Structure.as_dict()`` (alone or a list; labels in its ``properties``), or a list
  of ``{name, lattice, numbers, frac[, targets]}`` records;
- anything else: structure files and folders of them, exactly as before (unlabelled).
"""
from __future__ import annotations

import csv
import json
import math
import os
import sys
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cgnn_dgl import TARGETS
from cgnn_dgl.errors import UsageError
from cgnn_dgl.structures import (
    STRUCTURE_NAMES,
    STRUCTURE_SUFFIXES,
    Crystal,
    StructureError,
    cif_blocks,
    expand_inputs,
    read_structure_file,
)

ID_PROP = "id_prop.csv"
TABLE_SUFFIXES = {".csv": ",", ".tsv": "\t", ".tab": "\t"}
EXTXYZ_SUFFIXES = (".extxyz", ".xyz")
ASE_DB_SUFFIXES = (".db",)
STRUCTURE_COLUMNS = ("structure", "cif", "poscar", "path", "file")  # tried in order without --structure-column
MISSING_LABELS = frozenset({"", "nan", "na", "n/a", "null", "none"})  # case-insensitive: unlabelled


@dataclass(frozen=True)
class ReadOptions:
    """How to read labelled inputs; ``targets=None`` means no ``--targets`` (the OQMD four, as before)."""

    targets: tuple[str, ...] | None = None
    structure_column: str | None = None
    id_column: str | None = None
    delimiter: str | None = None
    labels: bool = True  # False: structures and ids only (prediction inputs); label columns are not read

    @property
    def names(self) -> tuple[str, ...]:
        if not self.labels:
            return ()
        return self.targets if self.targets is not None else TARGETS


@dataclass
class PendingCrystal(Crystal):
    """A crystal known by its id whose arrays are read when it is first validated, i.e. in the worker
    that builds its graph; a row already known to be bad carries its ``error`` and fails there, under
    its id, like any other reject."""

    text: str | None = None
    fmt: str | None = None  # "cif" or "poscar" for text
    path: str | None = None
    error: StructureError | None = None
    block: str | None = None  # the data block of a multi-structure CIF at ``path``

    @classmethod
    def of(cls, name: str, *, text: str | None = None, fmt: str | None = None, path: str | os.PathLike | None = None,
           error: StructureError | None = None, block: str | None = None) -> PendingCrystal:
        return cls(name=name, lattice=np.zeros((3, 3)), numbers=np.zeros(0, np.int64), frac=np.zeros((0, 3)),
                   text=text, fmt=fmt, path=None if path is None else str(path), error=error, block=block)

    def load(self) -> None:
        if self.error is not None:
            raise self.error
        if self.text is None and self.path is None:
            return
        if self.path is not None:
            crystal = read_structure_file(self.path, self.block)
        else:
            crystal = crystal_from_text(self.text, self.fmt or "cif", self.name)
        self.lattice, self.numbers, self.frac = crystal.lattice, crystal.numbers, crystal.frac
        self.text = self.path = None

    def validate(self) -> None:
        try:
            self.load()
        except StructureError as exc:
            msg = str(exc)
            named = msg.startswith(f"{self.name}:") or msg.split(": ", 1)[0].endswith(self.name)
            raise StructureError(exc.reason, msg if named else f"{self.name}: {msg}") from None
        super().validate()


def failed(name: str, reason: str, message: str) -> PendingCrystal:
    """A row that cannot be built: it is rejected under ``name`` with ``reason``."""
    return PendingCrystal.of(name, error=StructureError(reason, f"{name}: {message}"))


def unreadable(path: Path, message: str) -> Record:
    """A whole input file that cannot be read: one reject under its path; the other inputs go on."""
    return Record(str(path), failed(str(path), "parse_error", message), unique=False)


def crystal_from_text(text: str, fmt: str, name: str) -> Crystal:
    """CIF or POSCAR text -> :class:`Crystal` (first block of a CIF, conventional cell as in the file)."""
    from pymatgen.core import Structure
    from pymatgen.io.cif import CifParser

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if fmt == "cif":
                structs = CifParser.from_str(text).parse_structures(primitive=False)
                if not structs:
                    raise ValueError("no structure in CIF")
                structure = structs[0]
            else:
                structure = Structure.from_str(text, fmt="poscar")
    except Exception as exc:  # pymatgen raises many types for malformed text
        raise StructureError("parse_error", f"{name}: cannot parse {fmt.upper()} text ({type(exc).__name__}: {exc})") from None
    return Crystal.from_pymatgen(structure, name=name)


def text_format(text: str) -> str:
    """``cif`` when the text has a CIF data block and cell lengths, else ``poscar``."""
    lower = text.lower()
    return "cif" if "data_" in lower and "_cell_length_a" in lower else "poscar"


# --------------------------------------------------------------------------------------------------
# labels


def parse_label(value) -> float | None:
    """A label value -> float, or ``None`` for unlabelled; raises ``ValueError`` for a non-number."""
    if value is None:
        return None
    if isinstance(value, (bool, np.bool_)):  # extxyz writes 0/1 classes as T/F
        return float(value)
    if isinstance(value, str):
        if value.strip().lower() in MISSING_LABELS:
            return None
        out = float(value.strip())
    elif isinstance(value, (int, float, np.integer, np.floating)):
        out = float(value)
    else:
        raise ValueError(f"{type(value).__name__}")
    if math.isnan(out):
        return None
    if not math.isfinite(out):
        raise ValueError("not finite")
    return out


@dataclass
class Record:
    """One structure from a labelled reader; ``unique`` says whether its id must not repeat."""

    name: str
    source: Crystal
    labels: dict[str, float | None] = field(default_factory=dict)
    unique: bool = True
    label: str = ""  # how rejects name it when not by its id (plain JSON lists: ``list.json[k] name``)


def _record(name: str, source: Crystal, raw: Mapping[str, object], unique: bool = True) -> Record:
    """Parse raw label values; a value that is not a number fails the whole row."""
    labels: dict[str, float | None] = {}
    for key, value in raw.items():
        try:
            labels[key] = parse_label(value)
        except (TypeError, ValueError):
            return Record(name, failed(name, "bad_label", f"label {key}={value!r} is not a number"), {}, unique)
    return Record(name, source, labels, unique)


# --------------------------------------------------------------------------------------------------
# CGCNN folder: id_prop.csv + one structure file per id


def _structure_file_names(ident: str) -> list[str]:
    names = [ident + s for s in STRUCTURE_SUFFIXES] + [ident]
    names += [f"{p}_{ident}" for p in STRUCTURE_NAMES]
    return names


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def read_id_prop(folder: str | os.PathLike, opts: ReadOptions) -> Iterator[Record]:
    """A CGCNN data folder. The first row is a header when none of its values is a number and its first
    field names no structure file; without a header ``--targets`` names the value columns in order."""
    folder = Path(folder)
    present = {p.name for p in folder.iterdir() if p.is_file()}
    with open(folder / ID_PROP, newline="", encoding="utf-8-sig") as fh:
        rows = [r for r in csv.reader(fh, delimiter=opts.delimiter or ",") if any(c.strip() for c in r)]
    if not rows:
        return
    first = [c.strip() for c in rows[0]]
    header = (len(first) > 1 and not any(_is_number(c) or c == "" for c in first[1:])
              and not any(n in present for n in _structure_file_names(first[0])))
    where = folder / ID_PROP
    if not opts.labels:  # structures and ids only
        id_col, missing, value_cols, width = 0, [], {}, 0
        if header:
            rows = rows[1:]
    elif header:
        columns, rows = first, rows[1:]
        id_col = _column(columns, opts.id_column, "--id-column", where) if opts.id_column else 0
        if opts.targets is None:  # every value column of an id_prop.csv is a label: none may go unread
            others = [c for k, c in enumerate(columns) if k != id_col and c not in TARGETS]
            if others:
                raise UsageError(f"{where}: name the label columns with --targets (columns: {_listed(columns)})")
        missing = [t for t in opts.targets or () if t not in columns]
        value_cols = {t: columns.index(t) for t in opts.names if t in columns}
        width = len(columns)
    else:
        if opts.targets is None:
            raise UsageError(f"{where} has no header: name its value columns, in order, with --targets")
        if opts.id_column:
            raise UsageError(f"{where} has no header, so there is no column {opts.id_column!r} for --id-column "
                             "(its first column is the id)")
        id_col, missing = 0, []
        value_cols = {t: k + 1 for k, t in enumerate(opts.targets)}
        width = None
    for k, row in enumerate(rows):
        row = [c.strip() for c in row]
        ident = row[id_col] if id_col < len(row) and row[id_col] else f"{ID_PROP}-{k}"
        if missing:
            yield Record(ident, failed(ident, "unknown_column", f"{where} has no column {', '.join(missing)} "
                                       f"(columns: {_listed(columns)})"))
            continue
        if width is None and len(row) - 1 > len(value_cols):
            yield Record(ident, failed(ident, "unknown_column", f"{len(row) - 1} values but --targets names "
                                       f"{len(value_cols)} ({', '.join(value_cols)})"))
            continue
        if width and len(row) > width:
            yield Record(ident, failed(ident, "bad_row", f"{len(row)} fields for {width} columns"))
            continue
        found = [n for n in _structure_file_names(ident) if n in present]
        if not found:
            yield Record(ident, failed(ident, "missing_file", f"no structure file {ident}.cif, {ident}.vasp, "
                                       f"{ident}.poscar, {ident} or POSCAR_{ident} in {folder}"))
            continue
        if len(found) > 1:
            yield Record(ident, failed(ident, "ambiguous_file", f"several structure files: {', '.join(found)}"))
            continue
        raw = {t: (row[c] if c < len(row) else None) for t, c in value_cols.items()}
        yield _record(ident, PendingCrystal.of(ident, path=folder / found[0]), raw)


# --------------------------------------------------------------------------------------------------
# CSV / TSV


def _listed(columns: Sequence[str]) -> str:
    return ", ".join(c or "(unnamed)" for c in columns)


def _column(columns: Sequence[str], name: str, flag: str, where) -> int:
    if name not in columns:
        raise UsageError(f"{where} has no column {name!r} for {flag} (columns: {_listed(columns)})")
    return list(columns).index(name)


def read_table(path: str | os.PathLike, opts: ReadOptions) -> Iterator[Record]:
    """One row per structure; the structure column holds CIF/POSCAR text or a path to a structure file.
    A ``--targets`` name the header lacks rejects every row of this table (reason ``unknown_column``)."""
    path = Path(path)
    delimiter = opts.delimiter or TABLE_SUFFIXES.get(path.suffix.lower(), ",")
    csv.field_size_limit(sys.maxsize if sys.maxsize < 2**63 else 2**31 - 1)
    with open(path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.reader(fh, delimiter=delimiter)
        columns = [c.strip() for c in next(reader, [])]
        if not columns:
            return
        if opts.structure_column:
            s_col = _column(columns, opts.structure_column, "--structure-column", path)
        else:
            found = [c for c in STRUCTURE_COLUMNS if c in columns]
            if not found:
                raise UsageError(f"{path}: name the column holding the structures with --structure-column "
                                 f"(columns: {_listed(columns)})")
            s_col = columns.index(found[0])
        id_col = _column(columns, opts.id_column, "--id-column", path) if opts.id_column else (
            columns.index("id") if "id" in columns else None)
        missing = [t for t in opts.targets or () if t not in columns]
        value_cols = {t: columns.index(t) for t in opts.names if t in columns}
        for k, row in enumerate(reader):
            if not any(c.strip() for c in row):
                continue
            ident = row[id_col].strip() if id_col is not None and id_col < len(row) else ""
            if not ident and opts.id_column:
                ident = f"{path.stem}-{k}"
                yield Record(ident, failed(ident, "missing_id", f"empty {opts.id_column!r} cell for --id-column"))
                continue
            named = bool(ident)
            ident = ident or f"{path.stem}-{k}"
            rec = _table_row(path, columns, row, k, ident, missing, s_col, value_cols)
            if not named:  # rejects name a row without an id by its file and row
                rec.label = f"{path}[{k}]"
            yield rec


def _table_row(path: Path, columns, row, k: int, ident: str, missing, s_col: int, value_cols) -> Record:
    if missing:
        return Record(ident, failed(ident, "unknown_column", f"{path} has no column {', '.join(missing)} "
                                    f"(columns: {_listed(columns)})"))
    if len(row) > len(columns):
        return Record(ident, failed(ident, "bad_row", f"{len(row)} fields for {len(columns)} columns"))
    cell = row[s_col] if s_col < len(row) else ""
    raw = {t: (row[c] if c < len(row) else None) for t, c in value_cols.items()}
    return _record(ident, _structure_cell(cell, path.parent, ident), raw)


def _structure_cell(cell: str, base: Path, ident: str) -> Crystal:
    text = cell.strip()
    if not text:
        return failed(ident, "missing_structure", "empty structure cell")
    if "\n" in text:
        return PendingCrystal.of(ident, text=cell, fmt=text_format(cell))
    file = Path(text).expanduser()
    file = file if file.is_absolute() else base / file
    if not file.is_file():
        return failed(ident, "missing_file", f"structure file {file} not found")
    return PendingCrystal.of(ident, path=file)


# --------------------------------------------------------------------------------------------------
# ase: extended XYZ and ASE databases


def crystal_from_atoms(atoms, name: str) -> Crystal:
    """An ``ase.Atoms`` -> :class:`Crystal`; a structure that is not periodic in 3-D fails."""
    if not bool(np.all(atoms.pbc)):
        return failed(name, "not_periodic", f"periodic boundaries {atoms.pbc.tolist()} (a crystal needs all three)")
    cell = np.asarray(atoms.cell.array, dtype=np.float64)
    if abs(np.linalg.det(cell)) <= 1e-8:
        return failed(name, "singular_lattice", "lattice volume <= 0 (singular cell)")
    frac = np.linalg.solve(cell.T, np.asarray(atoms.positions, dtype=np.float64).T).T
    return Crystal(name=name, lattice=cell, numbers=atoms.numbers, frac=frac)


def _ase_value(info: Mapping, calc_results: Mapping, key: str):
    # ase moves energy/forces/stress-like keys from the info line into a calculator; look there too
    if key in info:
        return info[key]
    return calc_results.get(key)


def read_extxyz(path: str | os.PathLike, opts: ReadOptions) -> Iterator[Record]:
    """Extended XYZ frames; labels and the ``--id-column`` key come from each frame's info line, and a
    frame without an id key is named ``<file stem>-<frame index>``."""
    import ase.io

    path = Path(path)
    try:
        frames = ase.io.read(str(path), index=":", format="extxyz")
    except Exception as exc:
        yield unreadable(path, f"cannot read as extended XYZ ({type(exc).__name__}: {exc})")
        return
    for k, atoms in enumerate(frames):
        results = dict(atoms.calc.results) if atoms.calc is not None else {}
        rec = _kv_record(atoms, atoms.info, results, f"{path.stem}-{k}", opts)
        if not opts.id_column:  # rejects name a frame without an id by its file and frame
            rec.label = f"{path}[{k}]"
        yield rec


def read_ase_db(path: str | os.PathLike, opts: ReadOptions) -> Iterator[Record]:
    """An ASE database; labels and the ``--id-column`` key come from each row's key-value pairs (or its
    stored properties, e.g. ``energy``); without ``--id-column`` the id is the row id."""
    import ase.db

    path = Path(path)
    if not _is_ase_db(path):  # ase.db.connect would add its tables to any other SQLite file
        yield unreadable(path, "cannot read as an ASE database (no 'systems' table; not written by ase.db)")
        return
    try:
        db = ase.db.connect(str(path), type="db", create_indices=False)
        rows = list(db.select())
    except Exception as exc:
        yield unreadable(path, f"cannot read as an ASE database ({type(exc).__name__}: {exc})")
        return
    for row in rows:
        stored = {k: row.get(k) for k in ("energy", "free_energy", "magmom", "charge") if row.get(k) is not None}
        rec = _kv_record(row.toatoms(), row.key_value_pairs, stored, str(row.id), opts)
        if not opts.id_column:  # a bare row id is named with its database
            rec.label = f"{path} id={row.id}"
        yield rec


def _is_ase_db(path: Path) -> bool:
    import sqlite3

    try:
        con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            return con.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='systems'").fetchone() is not None
        finally:
            con.close()
    except sqlite3.Error:
        return False


def _kv_record(atoms, info: Mapping, extra: Mapping, default_id: str, opts: ReadOptions) -> Record:
    ident = default_id
    if opts.id_column:
        value = _ase_value(info, extra, opts.id_column)
        if value is None:
            return Record(ident, failed(ident, "missing_id", f"no key {opts.id_column!r} for --id-column"))
        ident = str(value)
    raw = {t: _ase_value(info, extra, t) for t in opts.names}
    return _record(ident, crystal_from_atoms(atoms, ident), raw)


# --------------------------------------------------------------------------------------------------
# JSON: pymatgen Structure dicts, or {name, lattice, numbers, frac[, targets]} records


def is_pymatgen_structure(obj) -> bool:
    return isinstance(obj, dict) and "sites" in obj and isinstance(obj.get("lattice"), dict)


def read_json(path: str | os.PathLike, opts: ReadOptions) -> Iterator[Record]:
    """A JSON file of structures. pymatgen dicts take labels and the ``--id-column`` key from their
    ``properties`` and are otherwise named ``<stem>`` (alone) or ``<stem>-<k>`` (in a list); records take
    labels from ``targets`` (a dict, or a list in ``--targets`` order) and their id from ``--id-column``,
    else ``name``, else ``<stem>-<k>``."""
    path = Path(path)
    try:
        with open(path) as fh:
            data = json.load(fh)
    except (OSError, ValueError) as exc:
        yield unreadable(path, f"cannot read JSON ({exc})")
        return
    unique = opts.targets is not None
    if is_pymatgen_structure(data):
        rec = _pymatgen_record(data, path.stem, opts, unique)
        if not opts.id_column:
            rec.label = str(path)
        yield rec
        return
    if not isinstance(data, list):
        yield unreadable(path, "expected a pymatgen Structure (Structure.as_dict()) or a JSON list of structures")
        return
    for k, row in enumerate(data):
        default = f"{path.stem}-{k}"
        if is_pymatgen_structure(row):
            rec = _pymatgen_record(row, default, opts, unique)
            if not opts.id_column:
                rec.label = f"{path}[{k}]"
            yield rec
        elif isinstance(row, dict):
            rec = _json_record(row, default, opts, unique)
            if opts.targets is None:  # unlabelled lists keep naming rejects by file and row, as before
                rec.label = f"{path}[{k}] {rec.name}"
            yield rec
        else:
            yield Record(default, failed(default, "parse_error", f"{path}[{k}] is a {type(row).__name__}, not a structure"),
                         {}, unique)


def _pymatgen_record(obj: dict, default: str, opts: ReadOptions, unique: bool) -> Record:
    from pymatgen.core import Structure

    props = obj.get("properties") or {}
    ident = default
    if opts.id_column:
        if props.get(opts.id_column) is None:
            return Record(ident, failed(ident, "missing_id", f"no property {opts.id_column!r} for --id-column"), {}, unique)
        ident = str(props[opts.id_column])
    try:
        crystal = Crystal.from_pymatgen(Structure.from_dict(obj), name=ident)
    except StructureError as exc:
        return Record(ident, failed(ident, exc.reason, str(exc).split(": ", 1)[-1]), {}, unique)
    except Exception as exc:
        return Record(ident, failed(ident, "parse_error", f"not a pymatgen Structure ({type(exc).__name__}: {exc})"),
                      {}, unique)
    return _record(ident, crystal, {t: props.get(t) for t in opts.names}, unique)


def _json_record(row: dict, default: str, opts: ReadOptions, unique: bool) -> Record:
    key = opts.id_column or "name"
    if opts.id_column and row.get(key) is None:
        return Record(default, failed(default, "missing_id", f"no key {key!r} for --id-column"), {}, unique)
    ident = str(row[key]) if row.get(key) is not None else default
    try:
        crystal = Crystal(name=ident, lattice=row["lattice"], numbers=row["numbers"], frac=row["frac"])
    except Exception as exc:
        return Record(ident, failed(ident, "parse_error", f"{type(exc).__name__}: {exc}"), {}, unique)
    labels = row.get("targets")
    if labels is None:
        return Record(ident, crystal, {}, unique)
    names = opts.names
    if isinstance(labels, list):
        if len(labels) != len(names):
            return Record(ident, failed(ident, "unknown_column", f"{len(labels)} targets for the {len(names)} "
                                        f"names {', '.join(names)}"), {}, unique)
        labels = dict(zip(names, labels))
    if not isinstance(labels, dict):
        return Record(ident, failed(ident, "bad_label", f"targets is a {type(labels).__name__}"), {}, unique)
    if opts.targets is None:  # no --targets: a label the OQMD four lack is named, not dropped
        unknown = [t for t in labels if t not in names]
        if unknown:
            return Record(ident, failed(ident, "unknown_column", f"label {', '.join(unknown)} is not a target of "
                                        f"this cache ({', '.join(names)}); name the targets with --targets"),
                          {}, unique)
    return _record(ident, crystal, {t: labels.get(t) for t in names}, unique)


# --------------------------------------------------------------------------------------------------
# dispatch


def input_kind(path: Path) -> str:
    """Which reader takes ``path``: id_prop, table, extxyz, ase_db, json, folder or structure."""
    name = path.name.lower()
    if path.is_dir():
        return "id_prop" if (path / ID_PROP).is_file() else "folder"
    if name.endswith(tuple(TABLE_SUFFIXES)):
        return "table"
    if name.endswith(EXTXYZ_SUFFIXES):
        return "extxyz"
    if name.endswith(ASE_DB_SUFFIXES):
        return "ase_db"
    if name.endswith(".json"):
        return "json"
    return "structure"


READERS = {"id_prop": read_id_prop, "table": read_table, "extxyz": read_extxyz, "ase_db": read_ase_db,
           "json": read_json}


def cif_block_records(path: Path) -> list[Record]:
    """One record per structure block of a multi-block CIF, named ``file.cif#block`` (the graph) and
    ``path#block`` (its rejects); ``[]`` for any other file, which stays one input."""
    return [Record(f"{path.name}#{b}", PendingCrystal.of(f"{path.name}#{b}", path=path, block=b), unique=False,
                   label=f"{path}#{b}") for b in cif_blocks(path)]


def iter_records(inputs: Sequence[str | os.PathLike], opts: ReadOptions) -> Iterator[Record | Path]:
    """Records from labelled inputs, and paths of plain structure files (parsed later, as before); a CIF
    with several structure blocks gives one record per block."""
    for item in inputs:
        path = Path(item)
        if not path.exists():
            raise FileNotFoundError(f"input not found: {path}")
        kind = input_kind(path)
        if kind in READERS:
            yield from READERS[kind](path, opts)
        else:
            for file in expand_inputs([path]):
                yield from cif_block_records(file) or [file]


def read_inputs(inputs: Sequence[str | os.PathLike], opts: ReadOptions | None = None):
    """Every input as pipeline :class:`~cgnn_dgl.pipeline.BuildItem` s, keyed by input order; a repeated
    id (among records that need unique ids) is rejected (``duplicate_id``), the first one is kept."""
    from cgnn_dgl.pipeline import BuildItem

    opts = opts or ReadOptions()
    seen: dict[str, int] = {}
    items = []
    for key, rec in enumerate(iter_records(inputs, opts)):
        if isinstance(rec, Path):
            items.append(BuildItem(key, rec))
            continue
        source, labels = rec.source, rec.labels
        if rec.unique:
            if rec.name in seen:
                source = failed(rec.name, "duplicate_id", f"id repeated (first given as input #{seen[rec.name]})")
                labels = {}
            else:
                seen[rec.name] = key
        items.append(_item(BuildItem, key, source, labels or None, rec.label or rec.name))
    return items


def _item(cls, key: int, source, targets, name: str):
    # the source crystal carries the id, which names its rejects; where BuildItem also has a display
    # ``name`` (issue 8), set that as well, so every stage's reject agrees
    if "name" in getattr(cls, "__dataclass_fields__", {}):
        return cls(key, source, targets=targets, name=name)
    return cls(key, source, targets=targets)


# --------------------------------------------------------------------------------------------------
# command-line values


def parse_names(text: str | None, flag: str = "--targets") -> tuple[str, ...] | None:
    """``a,b`` -> ("a", "b"); ``None`` stays ``None`` (flag not given)."""
    if text is None:
        return None
    names = tuple(t.strip() for t in text.split(","))
    if any(not t for t in names):
        raise UsageError(f"{flag}: expected comma-separated names, got {text!r}")
    if len(set(names)) != len(names):
        raise UsageError(f"{flag}: a name is repeated in {text!r}")
    return names


def parse_units(text: str | None, targets: Sequence[str]) -> dict[str, str]:
    """``heat_all=eV,dir_gap=eV`` -> {name: unit}, for names among ``targets`` only."""
    units: dict[str, str] = {}
    for part in (text or "").split(","):
        if not part.strip():
            continue
        name, sep, unit = part.partition("=")
        if not sep or name.strip() not in targets:
            raise UsageError(f"--units: expected NAME=UNIT for the targets {', '.join(targets)}, got {part!r}")
        units[name.strip()] = unit.strip()
    return units


def refuse_if_nothing_to_build(items) -> None:
    """Stop before building when a ``--targets`` column is missing from every input that was read: each
    row would be rejected (``unknown_column``), and the cache would hold nothing. That is a typo in the
    flag, not bad data, so it is a usage error that names the columns there are."""
    errors = [it.source.error for it in items if isinstance(it.source, PendingCrystal) and it.source.error is not None]
    if items and len(errors) == len(items) and all(e.reason == "unknown_column" for e in errors):
        raise UsageError(f"nothing to build: all {len(items)} inputs were rejected while reading (unknown_column); "
                         f"first: {errors[0]}")


def n_labelled(items, name: str) -> int:
    """How many items carry a label ``name`` (rows rejected while reading carry none)."""
    return sum(1 for it in items if isinstance(it.targets, Mapping) and it.targets.get(name) is not None)
