"""Which calculation (structure + targets) represents each material: the two selection rules as SQL.

Both rules produce one row per *key* (the canonical entry id the cache stores as ``entry_id``), and both
are evaluated page by page with keyset pagination, never OFFSET: :func:`window_stmt` reads the next
``limit`` values of the key column from its index (``WHERE key > :after ORDER BY key LIMIT :n``), whose
last value bounds the page; :func:`keys_stmt` returns the selected keys in ``(:after, :last]``, and
:func:`rows_stmt` the chosen calculation of each of them. Every page costs the same however far into
the table it is.

``reference`` (default) reproduces the reference CGNN extraction (cgnn-reference.md §2.1,
oqmd-schema.md §2.4):

* a key is a value of ``entries.duplicate_of_id`` (so duplicate groups are pooled under their canonical
  id, and entries with a NULL ``duplicate_of_id`` are skipped) having at least one converged
  ``static``/``standard`` calculation with a formation energy ``delta_e < 5`` (any fit);
* among the converged ``static`` calculations of all entries of the group, or the ``standard`` ones if
  there is no ``static``, take the one whose *first* formation energy row (lowest id, any fit: Django's
  ``formationenergy_set.first()``) has the lowest ``delta_e``; ties -> lowest calculation id; a NULL
  ``delta_e`` sorts last (it then becomes a ``nan_target`` reject);
* targets come from that calculation and that formation energy row.

``canonical`` is the ``fit='standard'`` query of oqmd-schema.md §2.2: canonical entries only
(``duplicate_of_id = id``), their own converged ``static``/``standard`` calculations with a
``standard``-fit, non-NULL formation energy; static first, then lowest ``delta_e``, then lowest
formation-energy id.

Each rule exists twice: with ``ROW_NUMBER() OVER (PARTITION BY key ...)`` (MySQL >= 8.0, MariaDB >= 10.2,
SQLite >= 3.25) and, for MySQL 5.7, as the same candidate rows in the same order of which
:func:`choose` keeps the first per key in Python. :func:`render_sql` prints both (``python -m
ingest.select``); ``sql/queries/`` holds that output for reading.

Filters reach SQL only as bound parameters: ``min_id``/``max_id`` bound the key, ``shard=(i, n)`` keeps
``key % n = i``, and ``elements`` keeps a material only when every atom of its chosen structure has an
element in the list (``--elements Fe,O`` -> Fe, O, FeO, Fe2O3 ..., not Fe3Al; a structure without atoms
never matches).
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy import and_, bindparam, case, exists, func, literal, or_, select

from ingest import tables as T

SELECTIONS = ("reference", "canonical")
QUERY_VERSION = {"reference": "reference-cgnn-v1", "canonical": "canonical-standard-fit-v1"}
LABELS = ("static", "standard")
MAX_DELTA_E = 5.0
LATTICE = ("x1", "x2", "x3", "y1", "y2", "y3", "z1", "z2", "z3")


@dataclass(frozen=True)
class Filters:
    elements: tuple[str, ...] | None = None
    min_id: int | None = None
    max_id: int | None = None
    shard: tuple[int, int] = (0, 1)

    def as_dict(self) -> dict:
        return {"elements": list(self.elements) if self.elements else None, "min_id": self.min_id,
                "max_id": self.max_id, "shard": f"{self.shard[0]}/{self.shard[1]}"}


def _check(selection: str) -> None:
    if selection not in SELECTIONS:
        raise ValueError(f"unknown selection {selection!r}; expected one of {SELECTIONS}")


def _key_filters(key, filters: Filters, after: int | None, upto: int | None = None) -> list:
    conds = []
    if after is not None:
        conds.append(key > after)
    if upto is not None:
        conds.append(key <= upto)
    if filters.min_id is not None:
        conds.append(key >= filters.min_id)
    if filters.max_id is not None:
        conds.append(key <= filters.max_id)
    i, n = filters.shard
    if n > 1:
        conds.append(key % n == i)
    return conds


def _window_column(selection: str):
    """The indexed ``entries`` column whose values are the keys: duplicate_of_id (reference) or id."""
    return T.entries.c.duplicate_of_id if selection == "reference" else T.entries.c.id


def window_stmt(selection: str, filters: Filters, after: int | None, limit: int) -> sa.Select:
    """Step 1 of a page: the next ``limit`` values of the key column after ``after``, from its index alone.

    Its last value bounds the page, ``after < key <= last``, so every page costs O(limit) however
    large the tables are (a DISTINCT ... LIMIT over the joins would re-scan the rest of the table on
    every page in MySQL).
    """
    _check(selection)
    col = _window_column(selection)
    conds = [col.is_not(None)]
    if after is not None:
        conds.append(col > after)
    if filters.min_id is not None:
        conds.append(col >= filters.min_id)
    if filters.max_id is not None:
        conds.append(col <= filters.max_id)
    return select(col.label("key")).where(*conds).order_by(col).limit(limit)


def _qualifying(selection: str):
    """(key column, FROM clause, WHERE conditions) whose distinct keys are the materials.

    Plain joins, not EXISTS: MariaDB materialises an EXISTS over formation_energies into a full scan.
    """
    e, c, f = T.entries.alias("e"), T.calculations.alias("c"), T.formation_energies.alias("f")
    if selection == "reference":
        key = e.c.duplicate_of_id
        frm = e.join(c, c.c.entry_id == e.c.id).join(f, f.c.calculation_id == c.c.id)
        where = [c.c.label.in_(LABELS), c.c.converged == True, key.is_not(None),  # noqa: E712
                 f.c.delta_e < MAX_DELTA_E]
    else:
        key = e.c.id
        frm = e.join(f, f.c.entry_id == e.c.id).join(c, c.c.id == f.c.calculation_id)
        where = [f.c.fit_id == "standard", f.c.delta_e.is_not(None), c.c.converged == True,  # noqa: E712
                 c.c.label.in_(LABELS), e.c.duplicate_of_id == e.c.id]
    return key, frm, where


def keys_stmt(selection: str, filters: Filters, after: int | None, upto: int | None) -> sa.Select:
    """Step 2 of a page: the selected keys with ``after < key <= upto``, ascending."""
    _check(selection)
    key, frm, where = _qualifying(selection)
    key = key.label("key")
    return (select(key).distinct().select_from(frm)
            .where(*where, *_key_filters(key.element, filters, after, upto))
            .order_by(key.element))


def count_stmt(selection: str, filters: Filters, after: int | None = None) -> sa.Select:
    """How many keys are left after ``after`` (one scan; used only for the progress bar's total)."""
    _check(selection)
    key, frm, where = _qualifying(selection)
    return select(func.count(sa.distinct(key))).select_from(frm).where(*where, *_key_filters(key, filters, after))


def _candidates(selection: str, keys: Sequence[int] | None, filters: Filters):
    """(columns, FROM, WHERE, partition key, ORDER BY) of the candidate calculations of a page of keys."""
    e, c, s = T.entries.alias("e"), T.calculations.alias("c"), T.structures.alias("s")
    k = T.entries.alias("k")  # the key's own entry row: its path tells synthetic data apart
    f, f2 = T.formation_energies.alias("f"), T.formation_energies.alias("f2")
    keyset = bindparam("keys", expanding=True) if keys is None else keys
    if selection == "reference":
        first_fe = select(func.min(f2.c.id)).where(f2.c.calculation_id == c.c.id).scalar_subquery()
        key = e.c.duplicate_of_id
        frm = (c.join(e, e.c.id == c.c.entry_id)
               .join(f, and_(f.c.calculation_id == c.c.id, f.c.id == first_fe))
               .join(k, k.c.id == e.c.duplicate_of_id).outerjoin(s, s.c.id == c.c.output_id))
        where = [key.in_(keyset), c.c.label.in_(LABELS), c.c.converged == True]  # noqa: E712
        order = [case((c.c.label == "static", 0), else_=1), case((f.c.delta_e.is_(None), 1), else_=0),
                 f.c.delta_e, c.c.id]
    else:
        key = e.c.id
        k = e  # the key is the entry itself
        frm = (f.join(c, c.c.id == f.c.calculation_id).join(e, e.c.id == f.c.entry_id)
               .outerjoin(s, s.c.id == c.c.output_id))
        where = [key.in_(keyset), f.c.fit_id == "standard", f.c.delta_e.is_not(None),
                 c.c.converged == True, c.c.label.in_(LABELS), e.c.duplicate_of_id == e.c.id]  # noqa: E712
        order = [case((c.c.label == "static", 0), else_=1), f.c.delta_e, f.c.id]
    if filters.elements:
        a = T.atoms.alias("a")
        foreign = exists().where(and_(
            a.c.structure_id == c.c.output_id,
            or_(a.c.element_id.is_(None), a.c.element_id.not_in(bindparam("elements", list(filters.elements),
                                                                           expanding=True)))))
        a2 = T.atoms.alias("a2")
        has_atoms = exists().where(a2.c.structure_id == c.c.output_id)
        elements_ok = case((foreign, 0), (has_atoms, 1), else_=0)
    else:
        elements_ok = literal(1)
    cols = [
        key.label("key"), k.c.path.label("key_path"), c.c.entry_id.label("entry_id"), c.c.id.label("calculation_id"),
        c.c.label.label("calc_label"), f.c.id.label("formationenergy_id"), f.c.fit_id.label("fit"),
        f.c.delta_e.label("delta_e"), c.c.band_gap.label("band_gap"), c.c.magmom.label("magmom"),
        c.c.natoms.label("calc_natoms"), c.c.output_id.label("structure_id"),
        s.c.id.label("structure_found"), s.c.natoms.label("structure_natoms"), *[s.c[n].label(n) for n in LATTICE], elements_ok.label("elements_ok"),
    ]
    return cols, frm, where, key, order


def rows_stmt(selection: str, keys: Sequence[int] | None, filters: Filters, *, window: bool) -> sa.Select:
    """Chosen calculations of a page of keys (``keys=None`` leaves an expanding ``:keys`` parameter).

    ``window=True``: one row per key, filters applied, ordered by key. ``window=False``: every candidate,
    ordered by key then preference; pass the rows through :func:`choose`.
    """
    _check(selection)
    cols, frm, where, key, order = _candidates(selection, keys, filters)
    if not window:
        return select(*cols).select_from(frm).where(*where).order_by(key, *order)
    rn = func.row_number().over(partition_by=key, order_by=order).label("rn")
    inner = select(*cols, rn).select_from(frm).where(*where).subquery("cand")
    return (select(*[inner.c[col.name] for col in cols])
            .where(inner.c.rn == 1, inner.c.elements_ok == 1).order_by(inner.c.key))


def choose(rows: Iterable, *, window: bool) -> list:
    """Rows of :func:`rows_stmt` -> one chosen row per key (the first of each key when ``window`` is False)."""
    if window:
        return list(rows)
    out, last = [], None
    for row in rows:
        if row.key == last:
            continue
        last = row.key
        if row.elements_ok:
            out.append(row)
    return out


def render_sql(selection: str, dialect_name: str, *, window: bool, elements: bool = False) -> str:
    """The SQL text of one page (keys query + rows query) for a dialect, with named parameters."""
    from sqlalchemy.dialects import mysql, sqlite

    dialect = {"mysql": mysql.dialect(paramstyle="named"), "sqlite": sqlite.dialect(paramstyle="named")}[dialect_name]
    filters = Filters(elements=("Fe", "O") if elements else None)
    ws = window_stmt(selection, filters, after=100, limit=1000)
    ks = keys_stmt(selection, filters, after=100, upto=1180)
    rs = rows_stmt(selection, [101, 103, 104], filters, window=window)
    lit = {"literal_binds": True}
    ws_sql = str(ws.compile(dialect=dialect, compile_kwargs=lit))
    ks_sql = str(ks.compile(dialect=dialect, compile_kwargs=lit))
    rs_sql = str(rs.compile(dialect=dialect, compile_kwargs=lit))
    how = "window functions" if window else "no window functions (MySQL 5.7): keep the first row per key"
    return (f"-- {selection} selection, {dialect_name}, {how}\n"
            f"-- generated by `python -m ingest.select`; ingest/select.py is what runs. Values shown inline\n"
            f"-- (after=100, LIMIT 1000, last=1180, keys 101, 103, 104) are bound parameters at run time.\n"
            f"-- 1. page window from the key column's index (keyset pagination, never OFFSET); last value = :last\n"
            f"{ws_sql};\n\n"
            f"-- 2. the selected keys of the window, :after < key <= :last\n{ks_sql};\n\n"
            f"-- 3. chosen calculation per key of the page\n{rs_sql};\n")


def write_sql_files(directory) -> list:
    from pathlib import Path

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for selection in SELECTIONS:
        for dialect in ("mysql", "sqlite"):
            for window in (True, False):
                if dialect == "sqlite" and not window:
                    continue
                name = f"{selection}_{dialect}{'' if window else '57_fallback'}.sql"
                (directory / name).write_text(render_sql(selection, dialect, window=window))
                written.append(directory / name)
    return written


if __name__ == "__main__":
    from ingest.db import SQL_DIR

    for p in write_sql_files(SQL_DIR / "queries"):
        print(p)
