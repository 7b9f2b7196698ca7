"""Stream OQMD materials out of the database as :class:`Crystal` + targets, one page at a time.

One page = three queries on one pooled connection, whatever the page size:

1. the page window: the next ``batch_size`` values of the key column after the last one seen, from its
   index (keyset pagination, ``ingest.select.window_stmt``), then the selected keys inside that window
   (``keys_stmt``);
2. the chosen calculation of each key with its output structure's lattice (``rows_stmt``);
3. the atoms of all those structures: ``structure_id IN (...) ORDER BY structure_id, id``.

Memory is one page, however large the database. A transient database error (lost connection, server
gone away, deadlock, a locked SQLite file) is retried with exponential backoff by re-reading the page
from the last key, so nothing is skipped or read twice.

Each material becomes a :class:`Record`: either a crystal with its targets
(``cgnn_dgl.TARGETS`` order: formation_energy, volume_per_atom, band_gap, magnetization; NaN = missing)
or a reject with a reason: ``no_structure``, ``null_lattice`` (a NULL lattice column), ``no_atoms``,
``natoms_mismatch`` (the structure's or the calculation's ``natoms`` disagrees with its atom rows: a
partly stored structure, whose volume and magnetization per atom would be wrong), ``unknown_element``,
``singular_lattice`` (volume <= 0), ``non_finite``, ``nan_target``. (``no_radius`` and
``overlapping_atoms`` are found later, by the coordinator.)

Keys of the key column that the selection rule leaves out (no converged ``static``/``standard``
calculation with a formation energy; for ``canonical`` also the duplicates) are not materials; each page
counts them in :attr:`OqmdReader.not_selected`, so a run can say how many it passed over, and why.
"""
from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import sqlalchemy as sa
from sqlalchemy import bindparam, select

from cgnn_dgl.errors import CgnnError
from cgnn_dgl.structures import Crystal, StructureError
from ingest import tables as T
from ingest.db import describe_error, supports_window_functions
from ingest.select import LATTICE, Filters, choose, count_stmt, keys_stmt, rows_stmt, window_stmt

log = logging.getLogger(__name__)

SYNTHETIC_PREFIX = "/synthetic/"

# MySQL/MariaDB client and server error codes worth a retry: can't connect, server gone away, lost
# connection, too many connections, shutdown in progress, lock wait timeout, deadlock, query interrupted,
# connection killed (MariaDB).
TRANSIENT_MYSQL_CODES = {2003, 2006, 2013, 2055, 1040, 1053, 1205, 1213, 1317, 1927, 4031}


@dataclass
class Record:
    """One material: ``crystal`` + ``targets`` (4,) + ``flags``, or a reject (``reason`` set)."""

    key: int
    name: str
    crystal: Crystal | None = None
    targets: np.ndarray | None = None
    flags: dict = field(default_factory=dict)
    reason: str | None = None
    message: str = ""

    @property
    def ok(self) -> bool:
        return self.reason is None


def is_transient(exc: BaseException) -> bool:
    if isinstance(exc, sa.exc.DBAPIError) and exc.connection_invalidated:
        return True
    if not isinstance(exc, (sa.exc.OperationalError, sa.exc.InterfaceError)):
        return False
    orig = getattr(exc, "orig", None)
    args = getattr(orig, "args", ())
    if args and isinstance(args[0], int):
        return args[0] in TRANSIENT_MYSQL_CODES
    text = str(orig).lower()
    return any(w in text for w in ("locked", "lost connection", "gone away", "connection was killed",
                                     "timed out", "broken pipe", "connection reset"))


def radii_table() -> np.ndarray:
    """The coordinator's radius per atomic number (Å, CGNN's rule); NaN where an element has none."""
    from cgnn_dgl.coordinator import radius_table

    return radius_table()


def volume_deviation(numbers: np.ndarray, volume_per_atom: float) -> tuple[float, float]:
    """(atomic_volume_per_atom, 1 - atomic_volume_per_atom / volume_per_atom), NaN if a radius is missing."""
    r = radii_table()[numbers]
    atomic = float(np.sum(4.0 / 3.0 * math.pi * r**3) / len(numbers))
    if not math.isfinite(atomic) or volume_per_atom <= 0:
        return float("nan"), float("nan")
    return atomic, 1.0 - atomic / volume_per_atom


def atoms_stmt() -> sa.Select:
    a, el = T.atoms.alias("a"), T.elements.alias("el")
    return (select(a.c.structure_id, a.c.element_id, el.c.z.label("number"), a.c.x, a.c.y, a.c.z)
            .select_from(a.outerjoin(el, el.c.symbol == a.c.element_id))
            .where(a.c.structure_id.in_(bindparam("sids", expanding=True)))
            .order_by(a.c.structure_id, a.c.id))


class OqmdReader:
    """Iterate the selected materials of an OQMD database in key order.

    ``window=None`` picks the window-function SQL or the MySQL 5.7 fallback from the server version.
    """

    def __init__(self, engine: sa.Engine, *, selection: str = "reference", filters: Filters | None = None,
                 batch_size: int = 1000, window: bool | None = None, retries: int = 6, backoff: float = 0.5,
                 null_as_zero: bool | None = None):
        self.engine = engine
        self.selection = selection
        self.filters = filters or Filters()
        self.batch_size = int(batch_size)
        self.window = window
        self.retries = retries
        self.backoff = backoff
        # reference CGNN: NULL band gap -> 0.0; canonical: NULL band gap -> missing. NULL magmom -> 0 in both.
        self.band_gap_null_as_zero = (selection == "reference") if null_as_zero is None else null_as_zero
        self.pages_read = 0
        self.retried = 0
        self.not_selected = 0  # keys of the key column in the pages read that the selection left out
        self._atoms_stmt = atoms_stmt()

    # -- database access with retry -------------------------------------------------------------------
    def _with_retry(self, fn, what: str, after):
        for attempt in range(self.retries + 1):
            try:
                with self.engine.connect() as conn:
                    return fn(conn)
            except (sa.exc.OperationalError, sa.exc.InterfaceError, sa.exc.DBAPIError) as exc:
                if not is_transient(exc) or attempt == self.retries:
                    raise CgnnError(describe_error(exc, self.engine.url)) from None
                delay = self.backoff * (2 ** attempt)
                self.retried += 1
                log.warning("%s; retry %d/%d of %s in %.1f s (resuming after key %s)",
                            describe_error(exc), attempt + 1, self.retries, what, delay, after)
                time.sleep(delay)
                self.engine.dispose()

    def count(self, after: int | None = None) -> int:
        stmt = count_stmt(self.selection, self.filters, after)
        return int(self._with_retry(lambda conn: conn.execute(stmt).scalar() or 0, "count", after))

    def _unselected(self, span, keys) -> int:
        """How many distinct key values of a window, inside the key filters, the selection left out."""
        i, n = self.filters.shard
        return len({k for k in span if k % n == i} - set(keys))

    def _fetch(self, conn: sa.Connection, after: int | None):
        """(new ``after``, chosen rows, atoms, keys passed over) of the next page holding keys.

        A new ``after`` of None means the end.
        """
        if self.window is None:
            self.window = supports_window_functions(conn)
            log.debug("selection %s with %s", self.selection,
                      "window functions" if self.window else "the MySQL 5.7 fallback (no window functions)")
        passed_over = 0
        while True:
            span = conn.execute(window_stmt(self.selection, self.filters, after, self.batch_size)).scalars().all()
            if not span:
                return None, [], [], passed_over
            upto = span[-1]
            keys = conn.execute(keys_stmt(self.selection, self.filters, after, upto)).scalars().all()
            passed_over += self._unselected(span, keys)
            if keys:
                break
            after = upto  # a window without selected materials: move on in the same round trip
        rows = choose(conn.execute(rows_stmt(self.selection, keys, self.filters, window=self.window)),
                      window=self.window)
        sids = sorted({r.structure_id for r in rows if r.structure_found is not None})
        atoms = conn.execute(self._atoms_stmt, {"sids": sids}).all() if sids else []
        return upto, rows, atoms, passed_over

    def pages(self, after: int | None = None) -> Iterator[list[Record]]:
        """Lists of records, one per page; ``after`` = resume after this key."""
        while True:
            upto, rows, atoms, passed_over = self._with_retry(lambda conn, after=after: self._fetch(conn, after),
                                                               "page", after)
            self.not_selected += passed_over  # counted once a page has been read whole (not per retry)
            if upto is None:
                return
            self.pages_read += 1
            yield self._records(rows, atoms)
            after = upto

    def __iter__(self) -> Iterator[Record]:
        return self.records()

    def records(self, after: int | None = None) -> Iterator[Record]:
        for page in self.pages(after):
            yield from page

    # -- rows -> records --------------------------------------------------------------------------------
    def _records(self, rows, atoms) -> list[Record]:
        by_sid: dict[int, list] = {}
        for a in atoms:
            by_sid.setdefault(a[0], []).append(a)
        return [self._record(r, by_sid.get(r.structure_id, ())) for r in rows]

    def _record(self, r, atoms) -> Record:
        key = int(r.key)
        synthetic = bool(r.key_path) and r.key_path.startswith(SYNTHETIC_PREFIX)
        name = f"{'synthetic' if synthetic else 'oqmd'}-{key}"
        flags = {"entry_id": int(r.entry_id), "calculation_id": int(r.calculation_id),
                 "formationenergy_id": int(r.formationenergy_id), "calc_label": r.calc_label, "fit": r.fit,
                 "structure_id": None if r.structure_id is None else int(r.structure_id),
                 "synthetic": synthetic}

        def reject(reason, message):
            return Record(key, name, flags=flags, reason=reason, message=f"{name}: {message}")

        if r.structure_found is None:
            return reject("no_structure", f"calculation {r.calculation_id} has no output structure")
        nulls = [c for c in LATTICE if getattr(r, c) is None]
        if nulls:
            return reject("null_lattice", f"structure {r.structure_id}: lattice column(s) {', '.join(nulls)} are NULL")
        if not atoms:
            return reject("no_atoms", f"structure {r.structure_id} has no atoms")
        for what, natoms in ((f"structure {r.structure_id}", r.structure_natoms),
                             (f"calculation {r.calculation_id}", r.calc_natoms)):
            if natoms is not None and int(natoms) != len(atoms):
                return reject("natoms_mismatch", f"{what} says natoms = {int(natoms)}, but structure "
                                                 f"{r.structure_id} has {len(atoms)} atom rows")
        unknown = sorted({str(a[1]) for a in atoms if a[2] is None})
        if unknown:
            return reject("unknown_element", f"structure {r.structure_id}: unknown element symbol(s) {', '.join(unknown)}")
        numbers = np.fromiter((a[2] for a in atoms), dtype=np.int64, count=len(atoms))
        frac = np.array([(a[3], a[4], a[5]) for a in atoms], dtype=np.float64)
        lattice = np.array([r.x1, r.x2, r.x3, r.y1, r.y2, r.y3, r.z1, r.z2, r.z3], dtype=np.float64).reshape(3, 3)
        crystal = Crystal(name=name, lattice=lattice, numbers=numbers, frac=frac)
        try:
            crystal.validate()
        except StructureError as exc:
            return reject(exc.reason, str(exc).removeprefix(f"{name}: "))

        n = crystal.n_atoms
        volume_pa = abs(float(np.linalg.det(lattice))) / n
        delta_e = np.nan if r.delta_e is None else float(r.delta_e)
        flags["band_gap_null"] = r.band_gap is None
        flags["magmom_null"] = r.magmom is None
        if r.band_gap is not None:
            band_gap = float(r.band_gap)
        else:
            band_gap = 0.0 if self.band_gap_null_as_zero else np.nan
        magnetization = 0.0 if r.magmom is None else abs(float(r.magmom)) / n
        if not math.isfinite(delta_e):
            return reject("nan_target", f"formation energy {r.delta_e!r} of calculation {r.calculation_id}")
        if not math.isfinite(volume_pa) or not volume_pa > 0:
            return reject("nan_target", f"volume per atom {volume_pa!r}")
        if not math.isfinite(magnetization) or (r.band_gap is not None and not math.isfinite(band_gap)):
            return reject("nan_target", "non-finite band gap or magnetization")
        atomic_pa, deviation = volume_deviation(numbers, volume_pa)
        flags["atomic_volume_per_atom"] = atomic_pa
        flags["volume_deviation"] = deviation
        crystal.extra = dict(flags)
        targets = np.array([delta_e, volume_pa, band_gap, magnetization], dtype=np.float64)
        return Record(key, name, crystal, targets, flags)
