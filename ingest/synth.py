"""``cgnn db synth``: SYNTHETIC data shaped like OQMD, for demos, tests and benchmarks.

Nothing here is real OQMD data. Every entry is marked: ``entries.path = '/synthetic/<seed>/<id>'``,
``entries.label = 'synthetic'``, a ``meta_data`` keyword ``synthetic``, and the ingest names such
materials ``synthetic-<id>`` instead of ``oqmd-<id>``.

What is imitated (oqmd-schema.md): real prototype structures (rocksalt, CsCl, zincblende, wurtzite,
perovskite, fluorite, rutile, L1_2, NiAs, Heusler, fcc/bcc/hcp/diamond elements; primitive and
conventional cells, hexagonal cells stored as row vectors) with element substitutions and lattice
constants scaled to the atomic radii; ``input`` / ``relaxed`` / ``static`` (current workflow) or
``input`` / ``relaxed`` / ``standard`` (legacy workflow) structures with atoms; ``relaxation`` +
``static`` or ``fine_relax`` + ``standard`` calculations, some unconverged (0 or NULL), some entries with
a second static run; formation energies of the ``standard`` fit and sometimes of ``nothing`` (stored
before or after it); duplicates (``duplicate_of_id`` pointing at an earlier entry, with their own
calculations), a few entries with ``duplicate_of_id`` NULL; spin-polarised runs (signed magmom,
MAGMOM guesses on the input atoms) and non-spin-polarised ones (NULL magmom); NULL band gaps; and a
chosen fraction of bad rows, spread evenly over: output structure without atoms, an unknown element
symbol ('Xx'), a zero-volume lattice, a NULL formation energy (NaN target), an element without radius
(At).

Fast: rows are generated per chunk and sent with ``executemany`` (PyMySQL turns it into multi-row
INSERTs) with foreign-key and unique checks off on MySQL; about 30 rows per entry.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from functools import reduce

import numpy as np
import sqlalchemy as sa

from ingest.db import create_schema, is_mysql

BAD_KINDS = ("no_atoms", "unknown_element", "zero_volume", "nan_target", "no_radius")
FITS = ("standard", "nothing", "everything")

S3 = math.sqrt(3.0)
FCC = np.array([[0, .5, .5], [.5, 0, .5], [.5, .5, 0]])
BCC = np.array([[-.5, .5, .5], [.5, -.5, .5], [.5, .5, -.5]])
CUBIC = np.eye(3)


def _hex(c_over_a: float) -> np.ndarray:
    return np.array([[1.0, 0, 0], [-0.5, S3 / 2, 0], [0, 0, c_over_a]])


def _tetra(c_over_a: float) -> np.ndarray:
    return np.diag([1.0, 1.0, c_over_a])


ROCKSALT_CONV = [("A", p) for p in [(0, 0, 0), (0, .5, .5), (.5, 0, .5), (.5, .5, 0)]] + \
                [("X", p) for p in [(.5, .5, .5), (.5, 0, 0), (0, .5, 0), (0, 0, .5)]]
ZB_CONV = [("A", p) for p in [(0, 0, 0), (0, .5, .5), (.5, 0, .5), (.5, .5, 0)]] + \
          [("X", p) for p in [(.25, .25, .25), (.25, .75, .75), (.75, .25, .75), (.75, .75, .25)]]
U = 0.305  # rutile oxygen parameter

# name -> (shape (3x3, rows = lattice vectors in units of a), sites [(class, frac)], weight)
PROTOTYPES: dict[str, tuple[np.ndarray, list, float]] = {
    "Cu": (FCC, [("M", (0, 0, 0))], 0.2),
    "W": (BCC, [("M", (0, 0, 0))], 0.2),
    "Mg": (_hex(1.633), [("M", (1 / 3, 2 / 3, .25)), ("M", (2 / 3, 1 / 3, .75))], 0.3),
    "C": (FCC, [("D", (0, 0, 0)), ("D", (.25, .25, .25))], 0.1),
    "NaCl": (FCC, [("A", (0, 0, 0)), ("X", (.5, .5, .5))], 1.0),
    "NaCl_conv": (CUBIC, ROCKSALT_CONV, 1.5),
    "CsCl": (CUBIC, [("A", (0, 0, 0)), ("B", (.5, .5, .5))], 0.8),
    "ZnS": (FCC, [("A", (0, 0, 0)), ("X", (.25, .25, .25))], 0.6),
    "ZnS_conv": (CUBIC, ZB_CONV, 1.0),
    "ZnO": (_hex(1.6), [("A", (1 / 3, 2 / 3, 0)), ("A", (2 / 3, 1 / 3, .5)),
                        ("X", (1 / 3, 2 / 3, .375)), ("X", (2 / 3, 1 / 3, .875))], 1.0),
    "CaTiO3": (CUBIC, [("A", (0, 0, 0)), ("B", (.5, .5, .5)), ("X", (.5, .5, 0)), ("X", (.5, 0, .5)),
                       ("X", (0, .5, .5))], 1.5),
    "CaTiO3_2x1x1": (np.diag([2.0, 1.0, 1.0]),
                     [(c, ((x + i) / 2, y, z)) for i in (0, 1) for c, (x, y, z) in
                      [("A", (0, 0, 0)), ("B", (.5, .5, .5)), ("X", (.5, .5, 0)), ("X", (.5, 0, .5)),
                       ("X", (0, .5, .5))]], 2.0),
    "CaF2": (FCC, [("A", (0, 0, 0)), ("X", (.25, .25, .25)), ("X", (.75, .75, .75))], 0.8),
    "TiO2": (_tetra(0.644), [("A", (0, 0, 0)), ("A", (.5, .5, .5)), ("X", (U, U, 0)), ("X", (1 - U, 1 - U, 0)),
                             ("X", (.5 + U, .5 - U, .5)), ("X", (.5 - U, .5 + U, .5))], 1.0),
    "Cu3Au": (CUBIC, [("B", (0, 0, 0)), ("A", (0, .5, .5)), ("A", (.5, 0, .5)), ("A", (.5, .5, 0))], 1.0),
    "NiAs": (_hex(1.39), [("A", (0, 0, 0)), ("A", (0, 0, .5)), ("X", (1 / 3, 2 / 3, .25)),
                          ("X", (2 / 3, 1 / 3, .75))], 0.8),
    "Cu2MnAl": (FCC, [("B", (0, 0, 0)), ("C", (.5, .5, .5)), ("A", (.25, .25, .25)), ("A", (.75, .75, .75))], 0.8),
    "Cu2MnAl_conv": (CUBIC, [(c, tuple((np.array(p) + s) % 1)) for s in [(0, 0, 0), (0, .5, .5), (.5, 0, .5), (.5, .5, 0)]
                             for c, p in [("B", (0, 0, 0)), ("C", (.5, .5, .5)), ("A", (.25, .25, .25)),
                                          ("A", (.75, .75, .75))]], 1.5),
}
PROTO_NAMES = tuple(PROTOTYPES)
PROTO_WEIGHTS = np.array([PROTOTYPES[n][2] for n in PROTO_NAMES]) / sum(PROTOTYPES[n][2] for n in PROTO_NAMES)

METALS = ("Li", "Na", "K", "Rb", "Cs", "Be", "Mg", "Ca", "Sr", "Ba", "Sc", "Y", "La", "Ti", "Zr", "Hf", "V", "Nb",
          "Ta", "Cr", "Mo", "W", "Mn", "Re", "Fe", "Ru", "Os", "Co", "Rh", "Ir", "Ni", "Pd", "Pt", "Cu", "Ag", "Au",
          "Zn", "Cd", "Hg", "Al", "Ga", "In", "Tl", "Sn", "Pb", "Bi", "Ce", "Nd", "Sm", "Gd", "Er", "Yb", "U", "Th")
ANIONS = ("O", "S", "Se", "Te", "N", "P", "As", "Sb", "F", "Cl", "Br", "I", "C", "B", "H", "Si", "Ge")
GROUP14 = ("C", "Si", "Ge", "Sn")
MAGNETIC = {"Mn", "Fe", "Co", "Ni", "Cr", "V", "Gd", "Nd", "Sm", "Er", "Ce", "U"}
# Base site moments (μB) of the synthetic ferromagnets: labels follow composition so a model can learn them.
BASE_MOMENT = {"Mn": 4.0, "Fe": 3.0, "Co": 2.0, "Ni": 1.0, "Cr": 3.0, "V": 1.5, "Gd": 7.0, "Nd": 3.0,
               "Sm": 1.0, "Er": 3.0, "Ce": 1.0, "U": 2.0}


def _electronegativity(symbol: str) -> float:
    from pymatgen.core.periodic_table import Element

    try:
        x = float(Element(symbol).X)
    except Exception:
        return 1.5
    return x if math.isfinite(x) else 1.5


def synthetic_labels(symbols: list[str], rng: np.random.Generator) -> tuple[float, float]:
    """SYNTHETIC formation energy (eV/atom) and band gap (eV): smooth functions of the electronegativity
    spread of the composition plus small noise, so that learning them is possible (they are not DFT)."""
    chi = np.array([_electronegativity(s) for s in symbols])
    spread = float(chi.max() - chi.min())
    mean = float(chi.mean())
    de = -1.0 * spread - 0.15 * (mean - 1.8) + float(rng.normal(0, 0.05))
    gap = max(0.0, 2.0 * (spread - 1.0) + float(rng.normal(0, 0.05)))
    return float(np.clip(de, -4.5, 4.9)), gap


def _radius(symbol: str) -> float:
    from pymatgen.core.periodic_table import Element

    from cgnn_dgl.coordinator import radius_table

    r = radius_table()[Element(symbol).Z]
    return 1.5 if not np.isfinite(r) else float(r)


def _formula(symbols: list[str]) -> tuple[str, int]:
    counts: dict[str, int] = {}
    for s in symbols:
        counts[s] = counts.get(s, 0) + 1
    g = reduce(math.gcd, counts.values())
    return " ".join(f"{s}{counts[s] // g:g}" for s in sorted(counts)), len(counts)


COLUMNS = {
    "entries": ("id", "path", "label", "duplicate_of_id", "composition_id", "prototype_id", "ntypes", "natoms"),
    "structures": ("id", "entry_id", "label", "prototype_id", "measured", "composition_id", "natoms", "nsites",
                   "ntypes", "x1", "x2", "x3", "y1", "y2", "y3", "z1", "z2", "z3", "sxx", "syy", "szz", "sxy",
                   "syz", "szx", "volume", "volume_pa"),
    "atoms": ("id", "structure_id", "element_id", "x", "y", "z", "magmom", "occupancy"),
    "calculations": ("id", "configuration", "label", "entry_id", "path", "composition_id", "natoms", "input_id",
                     "settings", "output_id", "energy", "energy_pa", "magmom", "magmom_pa", "band_gap", "attempt",
                     "nsteps", "converged", "runtime"),
    "formation_energies": ("id", "composition_id", "entry_id", "calculation_id", "description", "fit_id",
                           "stability", "delta_e"),
    "entries_meta_data": ("id", "entry_id", "metadata_id"),
}


@dataclass
class SynthSummary:
    entries: int = 0
    structures: int = 0
    atoms: int = 0
    calculations: int = 0
    formation_energies: int = 0
    duplicates: int = 0
    bad: dict | None = None
    seconds: float = 0.0
    first_entry_id: int = 0
    last_entry_id: int = 0
    mean_atoms: float = 0.0


class _Ids:
    def __init__(self, conn):
        self.next = {}
        for t in ("entries", "structures", "atoms", "calculations", "formation_energies", "entries_meta_data"):
            self.next[t] = int(conn.execute(sa.text(f"SELECT COALESCE(MAX(id), 0) FROM {t}")).scalar()) + 1

    def take(self, table: str) -> int:
        v = self.next[table]
        self.next[table] = v + 1
        return v


class _Generator:
    def __init__(self, seed: int, bad_fraction: float, ids: _Ids, metadata_id: int):
        self.rng = np.random.default_rng(seed)
        self.seed = seed
        self.bad_fraction = bad_fraction
        self.ids = ids
        self.metadata_id = metadata_id
        self.canonical: list[tuple[int, str, str, list[str], str]] = []  # (id, proto, formula, symbols, ...)
        self.bad_counter = 0
        self.radius = {s: _radius(s) for s in METALS + ANIONS + GROUP14 + ("At",)}
        self.compositions: set[str] = set()
        self.stats = SynthSummary(bad=dict.fromkeys(BAD_KINDS, 0))

    def _species(self, proto: str) -> dict[str, str]:
        rng = self.rng
        metals = rng.choice(len(METALS), size=3, replace=False)
        return {"A": METALS[metals[0]], "B": METALS[metals[1]], "C": METALS[metals[2]],
                "M": METALS[metals[0]], "X": ANIONS[rng.integers(len(ANIONS))],
                "D": GROUP14[rng.integers(len(GROUP14))]}

    def _lattice(self, proto: str, symbols: list[str], scale: float) -> np.ndarray:
        shape = PROTOTYPES[proto][0]
        v_atoms = sum(4.0 / 3.0 * math.pi * self.radius.get(s, 1.5) ** 3 for s in symbols)
        v_target = v_atoms / 0.6 * scale ** 3  # packing fraction 0.6
        a = (v_target / abs(np.linalg.det(shape))) ** (1.0 / 3.0)
        return shape * a

    def entry(self, rows: dict[str, list]) -> None:
        rng, ids, st = self.rng, self.ids, self.stats
        eid = ids.take("entries")
        # duplicate of an earlier entry (same material), or a NULL duplicate_of_id
        r = rng.random()
        if r < 0.08 and self.canonical:
            orig = self.canonical[rng.integers(len(self.canonical))]
            dup_of, proto, symbols = orig[0], orig[1], list(orig[3])
            st.duplicates += 1
        else:
            proto = PROTO_NAMES[rng.choice(len(PROTO_NAMES), p=PROTO_WEIGHTS)]
            spec = self._species(proto)
            symbols = [spec[c] for c, _ in PROTOTYPES[proto][1]]
            dup_of = None if r < 0.10 else eid
        bad = None
        if rng.random() < self.bad_fraction:
            bad = BAD_KINDS[self.bad_counter % len(BAD_KINDS)]
            self.bad_counter += 1
            st.bad[bad] += 1
            if bad == "no_radius":
                symbols = ["At" if s == symbols[0] else s for s in symbols]
        formula, ntypes = _formula(symbols)
        self.compositions.add(formula)
        natoms = len(symbols)
        frac0 = np.array([p for _, p in PROTOTYPES[proto][1]], dtype=float)
        rows["entries"].append((eid, f"/synthetic/{self.seed}/{eid}", "synthetic", dup_of, formula, proto, ntypes,
                                natoms))
        rows["entries_meta_data"].append((ids.take("entries_meta_data"), eid, self.metadata_id))
        if dup_of == eid:
            self.canonical.append((eid, proto, formula, tuple(symbols), ""))
        st.entries += 1

        spin = (any(s in MAGNETIC for s in symbols) and rng.random() < 0.8) or rng.random() < 0.1
        legacy = rng.random() < 0.2
        lat_in = self._lattice(proto, symbols, 1.0)
        lat_rel = lat_in * rng.uniform(0.97, 1.03)

        def structure(label, lattice, frac, magmoms=None, *, atoms=True, elems=None):
            sid = ids.take("structures")
            vol = abs(float(np.linalg.det(lattice)))
            L = lattice.reshape(-1)
            rows["structures"].append((sid, eid, label, proto, 0, formula, natoms, natoms, ntypes, *map(float, L),
                                       0.0, 0.0, 0.0, 0.0, 0.0, 0.0, vol, vol / natoms))
            st.structures += 1
            if atoms:
                for k, s in enumerate(elems or symbols):
                    rows["atoms"].append((ids.take("atoms"), sid, s, float(frac[k, 0]), float(frac[k, 1]),
                                          float(frac[k, 2]), None if magmoms is None else float(magmoms[k]), 1.0))
                st.atoms += natoms
            return sid

        guesses = np.where([s in MAGNETIC for s in symbols], 5.0, 0.6) if spin else None
        s_in = structure("input", lat_in, frac0, guesses)
        frac_rel = (frac0 + rng.uniform(-0.004, 0.004, frac0.shape)) % 1.0
        s_rel = structure("relaxed", lat_rel, frac_rel)
        out_label = "standard" if legacy else "static"
        out_lat, out_atoms, out_elems = lat_rel, True, None
        if bad == "zero_volume":
            out_lat = lat_rel.copy()
            out_lat[2] = out_lat[0]
        elif bad == "no_atoms":
            out_atoms = False
        elif bad == "unknown_element":
            out_elems = ["Xx"] + symbols[1:]
        de_label, gap_label = synthetic_labels(symbols, rng)
        moments = (np.array([BASE_MOMENT.get(x, 0.0) for x in symbols]) + rng.normal(0, 0.1, natoms)) if spin else None
        s_out = structure(out_label, out_lat, frac_rel, moments, atoms=out_atoms, elems=out_elems)
        energy_pa = float(rng.normal(-5.0, 2.0))
        ispin = 2 if spin else 1

        def calc(label, s_input, s_output, converged, fe_bearing):
            cid = ids.take("calculations")
            magmom = float(np.sum(moments)) if (spin and moments is not None) else None
            if fe_bearing:
                u = rng.random()
                band_gap = None if u < 0.08 else gap_label
            else:
                band_gap = float(rng.uniform(0, 3)) if rng.random() < 0.5 else None
            rows["calculations"].append((
                cid, label, label, eid, f"/synthetic/{self.seed}/{eid}/{label}", formula, natoms, s_input,
                f"{{'encut': 520.0, 'ispin': {ispin}, 'synthetic': True}}", s_output, energy_pa * natoms, energy_pa,
                magmom, None if magmom is None else magmom / natoms, band_gap, 1, int(rng.integers(1, 60)),
                converged, float(rng.uniform(60, 36000))))
            st.calculations += 1
            return cid

        def conv():
            u = rng.random()
            return None if u < 0.02 else (0 if u < 0.07 else 1)

        relax = "fine_relax" if legacy else "relaxation"
        calc(relax, s_in, s_rel, conv(), False)
        n_runs = 2 if rng.random() < 0.04 else 1
        for run in range(n_runs):
            cid = calc(out_label, s_rel, s_out, conv(), True)
            de = de_label + float(rng.normal(0, 0.01)) * run
            if rng.random() < 0.01:
                de = float(rng.uniform(5.0, 8.0))
            fes = [("standard", de)]
            if rng.random() < 0.25:
                other = ("nothing", de + float(rng.normal(0, 0.2)))
                fes = [other] + fes if rng.random() < 0.5 else fes + [other]
            if bad == "nan_target" and run == 0:
                fes = [("nothing", None), ("standard", de)]
            for fit, value in fes:
                rows["formation_energies"].append((ids.take("formation_energies"), formula, eid, cid, None, fit,
                                                   None if value is None else float(value) - 0.1, value))
                st.formation_energies += 1


def _literal(v) -> str:
    """SQL literal of a generated value (numbers, None, and our own ASCII strings)."""
    if v is None:
        return "NULL"
    if isinstance(v, float):
        return repr(v) if math.isfinite(v) else "NULL"
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    return "'" + str(v).replace("\\", "\\\\").replace("'", "''") + "'"


def _insert(conn, table: str, rows: list, placeholder: str, batch: int = 2000) -> None:
    """Append rows; on MySQL as multi-row INSERT text (much faster than the driver's per-value escaping)."""
    if not rows:
        return
    cols = COLUMNS[table]
    head = f"INSERT INTO `{table}` ({', '.join(f'`{c}`' for c in cols)}) VALUES "
    if placeholder == "%s":
        for k in range(0, len(rows), batch):
            body = ",".join("(" + ",".join(map(_literal, row)) + ")" for row in rows[k:k + batch])
            conn.exec_driver_sql(head + body)
    else:
        conn.exec_driver_sql(head + "(" + ", ".join([placeholder] * len(cols)) + ")", rows)


def synthesize(engine: sa.Engine, entries: int, *, seed: int = 0, bad_fraction: float = 0.02,
               chunk: int = 5000, progress=None) -> SynthSummary:
    """Append ``entries`` synthetic OQMD-shaped entries (schema created if missing)."""
    if entries < 0 or not 0 <= bad_fraction <= 1:
        raise ValueError("entries must be >= 0 and bad_fraction in [0, 1]")
    t0 = time.perf_counter()
    create_schema(engine)
    mysql = is_mysql(engine)
    ph = "%s" if mysql else "?"
    with engine.begin() as conn:
        if mysql:
            conn.exec_driver_sql("SET FOREIGN_KEY_CHECKS = 0")
        for fit in FITS:
            conn.exec_driver_sql(f"{'INSERT IGNORE' if mysql else 'INSERT OR IGNORE'} INTO fits (name) VALUES ({ph})", (fit,))
        for name in PROTO_NAMES:
            conn.exec_driver_sql(f"{'INSERT IGNORE' if mysql else 'INSERT OR IGNORE'} INTO prototypes (name) VALUES ({ph})",
                                 (name,))
        md = conn.exec_driver_sql("SELECT id FROM meta_data WHERE type = 'keyword' AND value = 'synthetic'").scalar()
        if md is None:
            conn.exec_driver_sql("INSERT INTO meta_data (type, value) VALUES ('keyword', 'synthetic')")
            md = conn.exec_driver_sql("SELECT id FROM meta_data WHERE type = 'keyword' AND value = 'synthetic'").scalar()
        ids = _Ids(conn)
    gen = _Generator(seed, bad_fraction, ids, int(md))
    gen.stats.first_entry_id = ids.next["entries"]
    done = 0
    with engine.connect() as conn:
        if mysql:
            conn.exec_driver_sql("SET FOREIGN_KEY_CHECKS = 0")
            conn.exec_driver_sql("SET UNIQUE_CHECKS = 0")
            conn.commit()
        while done < entries:
            n = min(chunk, entries - done)
            rows: dict[str, list] = {t: [] for t in COLUMNS}
            gen.compositions = set()
            for _ in range(n):
                gen.entry(rows)
            with conn.begin():
                comp_sql = (f"{'INSERT IGNORE' if mysql else 'INSERT OR IGNORE'} INTO compositions (formula, ntypes) "
                            f"VALUES ({ph}, {ph})")
                comp_rows = [(f, len(f.split())) for f in sorted(gen.compositions)]
                if comp_rows:
                    conn.exec_driver_sql(comp_sql, comp_rows)
                for table in ("entries", "structures", "atoms", "calculations", "formation_energies",
                              "entries_meta_data"):
                    _insert(conn, table, rows[table], ph)
            done += n
            if progress is not None:
                progress(done)
        if mysql:
            conn.exec_driver_sql("SET UNIQUE_CHECKS = 1")
            conn.exec_driver_sql("SET FOREIGN_KEY_CHECKS = 1")
            conn.commit()
    st = gen.stats
    st.last_entry_id = ids.next["entries"] - 1
    st.mean_atoms = st.atoms / st.structures if st.structures else 0.0
    st.seconds = time.perf_counter() - t0
    return st
