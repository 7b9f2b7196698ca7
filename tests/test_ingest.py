"""OQMD ingest, database side: schema, the two selection rules, streaming rows -> Crystal + targets.

A hand-made fixture with one entry per pitfall of oqmd-schema.md §4 is loaded into SQLite and into a
fresh MariaDB database (127.0.0.1:3306, root, created and dropped here; MariaDB cases skip with the
reason when the server is unreachable). Every expected value below was worked out by hand from the
rules in ingest/select.py.
"""
from __future__ import annotations

import logging
import math
import os

import numpy as np
import pytest
import sqlalchemy as sa
from conftest import readonly_mysql_user

from ingest import tables as T
from ingest.db import create_schema, make_engine, mysql_reachable, resolve_url, safe_url, temporary_mysql_database
from ingest.reader import OqmdReader
from ingest.select import LATTICE, Filters

MYSQL_SERVER = os.environ.get("CGNN_TEST_MYSQL", "mysql+pymysql://root@127.0.0.1:3306/")
_mysql_down = mysql_reachable(MYSQL_SERVER)
needs_mysql = pytest.mark.skipif(_mysql_down is not None, reason=f"MariaDB/MySQL not reachable: {_mysql_down}")

# --------------------------------------------------------------------------------------------------
# fixture data: ids are entry*10+k for structures, entry*100+k for calculations, entry*1000+k for FEs

CUBIC_A = 3.85                    # CaTiO3 perovskite, V/atom = 3.85**3 / 5 = 11.413325
HEX_A, HEX_C = 3.25, 5.2          # wurtzite ZnO, a = b = 3.25, gamma = 120 deg
HEX = [[HEX_A, 0.0, 0.0], [-HEX_A / 2, HEX_A * math.sqrt(3) / 2, 0.0], [0.0, 0.0, HEX_C]]
PRECISE = -1.500001203963955      # DOUBLE must come back exactly (not Decimal rounded to 10 places)


def cubic(a):
    return [[a, 0, 0], [0, a, 0], [0, 0, a]]


PEROVSKITE = [("Ca", 0, 0, 0), ("Ti", .5, .5, .5), ("O", .5, .5, 0), ("O", .5, 0, .5), ("O", 0, .5, .5)]
WURTZITE = [("Zn", 1 / 3, 2 / 3, 0), ("Zn", 2 / 3, 1 / 3, .5), ("O", 1 / 3, 2 / 3, .375), ("O", 2 / 3, 1 / 3, .875)]
ROCKSALT_FEO = [("Fe", 0, 0, 0), ("O", .5, .5, .5)]
FCC_PRIM = [[0, 2.1, 2.1], [2.1, 0, 2.1], [2.1, 2.1, 0]]
NACL = [("Na", 0, 0, 0), ("Cl", .5, .5, .5)]
# conventional rock-salt NaCl (8 atoms) repeated 4 x 4 x 4: 512 atoms in a 22.56 A cube
_CONV = [("Na", 0, 0, 0), ("Na", 0, .5, .5), ("Na", .5, 0, .5), ("Na", .5, .5, 0),
         ("Cl", .5, .5, .5), ("Cl", .5, 0, 0), ("Cl", 0, .5, 0), ("Cl", 0, 0, .5)]
SUPERCELL_512 = [(el, (i + x) / 4, (j + y) / 4, (k + z) / 4)
                 for i in range(4) for j in range(4) for k in range(4) for el, x, y, z in _CONV]


class Fixture:
    def __init__(self):
        self.rows = {t: [] for t in ("compositions", "fits", "prototypes", "entries", "structures", "atoms",
                                     "calculations", "formation_energies")}
        self._atom_id = 0

    def entry(self, eid, dup="self", formula="Na1 Cl1", proto=None):
        self.rows["entries"].append(dict(id=eid, path=f"/home/oqmd/libraries/fixture/{eid}", label=f"fixture-{eid}",
                                         duplicate_of_id=eid if dup == "self" else dup, composition_id=formula,
                                         prototype_id=proto, delta_e=99.0))  # legacy column: must be ignored

    def structure(self, sid, eid, label, lattice, atoms, volume=None, magmoms=None):
        lat = np.asarray(lattice, dtype=float)
        row = dict(id=sid, entry_id=eid, label=label, measured=False, natoms=len(atoms),
                   volume=abs(np.linalg.det(lat)) if volume is None else volume,
                   **dict.fromkeys(("sxx", "syy", "szz", "sxy", "syz", "szx"), 0.0))
        for r, name in enumerate("xyz"):
            for col in range(3):
                row[f"{name}{col + 1}"] = float(lat[r, col])
        self.rows["structures"].append(row)
        for k, (sym, x, y, z) in enumerate(atoms):
            self._atom_id += 1
            self.rows["atoms"].append(dict(id=self._atom_id, structure_id=sid, element_id=sym, x=x, y=y, z=z,
                                           occupancy=1.0, magmom=None if magmoms is None else magmoms[k]))

    def calc(self, cid, eid, label, output, converged=True, band_gap=None, magmom=None, input_id=None, natoms=None):
        self.rows["calculations"].append(dict(id=cid, entry_id=eid, label=label, configuration=label,
                                              output_id=output, input_id=input_id, converged=converged,
                                              band_gap=band_gap, magmom=magmom, natoms=natoms,
                                              settings=f"{{'encut': 520.0, 'ispin': {1 if magmom is None else 2}}}"))

    def fe(self, fid, cid, eid, fit, delta_e):
        self.rows["formation_energies"].append(dict(id=fid, calculation_id=cid, entry_id=eid, fit_id=fit,
                                                    delta_e=delta_e, composition_id=None))

    def simple(self, eid, label="static", delta_e=-1.0, fit="standard", dup="self", converged=True,
               lattice=FCC_PRIM, atoms=NACL, band_gap=1.0):
        self.entry(eid, dup)
        self.structure(eid * 10 + 1, eid, label, lattice, atoms)
        self.calc(eid * 100 + 1, eid, label, eid * 10 + 1, converged=converged, band_gap=band_gap)
        self.fe(eid * 1000 + 1, eid * 100 + 1, eid, fit, delta_e)


def build_fixture() -> Fixture:
    f = Fixture()
    f.rows["fits"] = [dict(name=n) for n in ("standard", "nothing", "everything")]
    f.rows["compositions"] = [dict(formula=x) for x in ("Ca1 O3 Ti1", "O1 Zn1", "Fe1 O1", "Na1 Cl1")]
    f.rows["prototypes"] = [dict(name="CaTiO3"), dict(name="ZnO")]
    # 1: current static workflow; FEs of two fits, the 'nothing' one first (lower id)
    f.entry(1, formula="Ca1 O3 Ti1", proto="CaTiO3")
    f.structure(11, 1, "input", cubic(3.9), PEROVSKITE)
    f.structure(12, 1, "relaxed", cubic(CUBIC_A), PEROVSKITE)
    f.structure(13, 1, "static", cubic(CUBIC_A), PEROVSKITE, volume=CUBIC_A ** 3)  # FLOAT column
    f.calc(101, 1, "relaxation", 12, band_gap=1.0, input_id=11)
    f.calc(102, 1, "static", 13, band_gap=2.31, input_id=12, natoms=5)
    f.fe(1001, 102, 1, "nothing", -3.9)
    f.fe(1002, 102, 1, "standard", -3.35)
    # 2: duplicate of 1 with its own static calculation (first FE -3.6: higher than 1's -3.9)
    f.entry(2, dup=1, formula="Ca1 O3 Ti1")
    f.structure(21, 2, "static", cubic(3.9), PEROVSKITE)
    f.calc(201, 2, "static", 21, band_gap=2.0)
    f.fe(2001, 201, 2, "standard", -3.6)
    # 3: legacy 'standard' workflow, hexagonal cell; output structure label '' and a decoy 'standard' structure
    f.entry(3, formula="O1 Zn1", proto="ZnO")
    f.structure(31, 3, "input", HEX, WURTZITE)
    f.structure(32, 3, "", HEX, WURTZITE)
    f.structure(33, 3, "standard", cubic(9.9), WURTZITE)
    f.calc(301, 3, "fine_relax", 31, input_id=31)
    f.calc(302, 3, "standard", 32, band_gap=0.8, input_id=31)
    f.fe(3001, 302, 3, "standard", -1.7)
    # 4: spin-polarised, magmom -4.4 per 2-atom cell; input MAGMOM guesses 5.0; NULL band gap
    f.entry(4, formula="Fe1 O1")
    f.structure(41, 4, "input", FCC_PRIM, ROCKSALT_FEO, magmoms=[5.0, 5.0])
    f.structure(42, 4, "static", FCC_PRIM, ROCKSALT_FEO, magmoms=[-4.3, -0.1])
    f.calc(401, 4, "static", 42, band_gap=None, magmom=-4.4, input_id=41, natoms=2)
    f.fe(4001, 401, 4, "standard", -1.3)
    # 5: duplicate_of_id NULL -> never selected
    f.simple(5, dup=None, delta_e=-2.0)
    # 6: no converged static/standard calculation (0, NULL), a converged relaxation with an FE
    f.entry(6)
    f.structure(61, 6, "static", FCC_PRIM, NACL)
    f.calc(601, 6, "static", 61, converged=False)
    f.calc(602, 6, "standard", 61, converged=None)
    f.calc(603, 6, "relaxation", 61, converged=True)
    f.fe(6001, 601, 6, "standard", -2.0)
    f.fe(6002, 602, 6, "standard", -2.0)
    f.fe(6003, 603, 6, "standard", -9.0)
    # 7: static unconverged, standard converged -> standard
    f.entry(7)
    f.structure(71, 7, "static", FCC_PRIM, NACL)
    f.calc(701, 7, "static", 71, converged=False)
    f.calc(702, 7, "standard", 71, band_gap=0.5)
    f.fe(7001, 701, 7, "standard", -5.0)
    f.fe(7002, 702, 7, "standard", -0.7)
    # 8: static and standard both converged -> static although standard is lower
    f.entry(8)
    f.structure(81, 8, "static", FCC_PRIM, NACL)
    f.calc(801, 8, "static", 81, band_gap=0.1)
    f.calc(802, 8, "standard", 81, band_gap=0.2)
    f.fe(8001, 801, 8, "standard", -1.0)
    f.fe(8002, 802, 8, "standard", -2.0)
    # 9: only delta_e >= 5 -> reference drops it, canonical keeps it
    f.simple(9, delta_e=6.0)
    # 10: only a non-standard fit -> reference keeps it, canonical drops it
    f.simple(10, fit="nothing", delta_e=-1.0)
    # 11: two converged static calculations -> the lower delta_e (an exact double)
    f.entry(11)
    f.structure(111, 11, "static", FCC_PRIM, NACL)
    f.calc(1101, 11, "static", 111, band_gap=0.3)
    f.calc(1102, 11, "static", 111, band_gap=0.4)
    f.fe(11001, 1101, 11, "standard", -1.0)
    f.fe(11002, 1102, 11, "standard", PRECISE)
    # 12/13: canonical 12 without calculations; its duplicate 13 has one -> reference pools it under 12
    f.entry(12)
    f.simple(13, dup=12, delta_e=-0.9)
    # 14/15: the duplicate's calculation is lower -> reference takes it (key 14), canonical keeps 14's own
    f.simple(14, delta_e=-1.0)
    f.simple(15, dup=14, delta_e=-1.2, band_gap=3.0)
    # 16: first FE row (fit 'nothing') is 7.0 >= 5, standard -0.5: reference reports 7.0 (no re-check)
    f.entry(16)
    f.structure(161, 16, "static", FCC_PRIM, NACL)
    f.calc(1601, 16, "static", 161, band_gap=0.0)
    f.fe(16001, 1601, 16, "nothing", 7.0)
    f.fe(16002, 1601, 16, "standard", -0.5)
    # bad rows
    f.entry(20)  # no atoms
    f.structure(201, 20, "static", FCC_PRIM, [])
    f.calc(2001, 20, "static", 201)
    f.fe(20001, 2001, 20, "standard", -1.0)
    f.simple(21, atoms=[("Na", 0, 0, 0), ("Xx", .5, .5, .5)])      # unknown element symbol
    f.simple(22, lattice=[[1, 0, 0], [2, 0, 0], [0, 0, 1]])       # singular lattice, volume 0
    f.entry(23)  # NaN target for reference: first FE row has delta_e NULL
    f.structure(231, 23, "static", FCC_PRIM, NACL)
    f.calc(2301, 23, "static", 231)
    f.fe(23001, 2301, 23, "nothing", None)
    f.fe(23002, 2301, 23, "standard", -1.0)
    f.entry(24)  # calculation without output structure
    f.calc(2401, 24, "static", None)
    f.fe(24001, 2401, 24, "standard", -1.0)
    # issue 8, database side
    f.simple(25)  # NULL lattice columns
    f.rows["structures"][-1].update(x2=None, z3=None)
    f.simple(26)  # structures.natoms says 3, the structure has 2 atom rows
    f.rows["structures"][-1]["natoms"] = 3
    f.simple(27)  # calculations.natoms says 4
    f.rows["calculations"][-1]["natoms"] = 4
    f.simple(28, lattice=cubic(4 * 5.64), atoms=SUPERCELL_512)  # 512 atoms: a normal material
    f.entry(29)  # its only calculation is unconverged: not selected (counted, not rejected)
    f.structure(291, 29, "static", FCC_PRIM, NACL)
    f.calc(2901, 29, "static", 291, converged=False)
    f.fe(29001, 2901, 29, "standard", -1.0)
    return f


def load_fixture(engine: sa.Engine) -> None:
    # OQMD declares the lattice columns NOT NULL; a user's own or damaged database may not (entry 25)
    if engine.dialect.name == "sqlite":
        md = sa.MetaData()
        for table in T.metadata.sorted_tables:
            table.to_metadata(md)
        for col in LATTICE:
            md.tables["structures"].c[col].nullable = True
        md.create_all(engine)
    create_schema(engine)
    if engine.dialect.name in ("mysql", "mariadb"):
        with engine.begin() as conn:
            conn.exec_driver_sql("ALTER TABLE structures " + ", ".join(f"MODIFY {c} DOUBLE NULL" for c in LATTICE))
    rows = build_fixture().rows
    with engine.begin() as conn:
        if engine.dialect.name in ("mysql", "mariadb"):
            conn.exec_driver_sql("SET FOREIGN_KEY_CHECKS = 0")  # the 'Xx' atom violates the FK on purpose
        for name in ("fits", "compositions", "prototypes", "entries", "structures", "atoms", "calculations",
                     "formation_energies"):
            data = rows[name]
            # uniform keys per executemany batch
            cols = sorted({k for r in data for k in r})
            conn.execute(T.metadata.tables[name].insert(), [{c: r.get(c) for c in cols} for r in data])
        if engine.dialect.name in ("mysql", "mariadb"):
            conn.exec_driver_sql("SET FOREIGN_KEY_CHECKS = 1")


# key -> (calculation_id, delta_e, band_gap, magnetization) or reject reason
EXPECTED_REFERENCE = {
    1: (102, -3.9, 2.31, 0.0), 3: (302, -1.7, 0.8, 0.0), 4: (401, -1.3, 0.0, 2.2), 7: (702, -0.7, 0.5, 0.0),
    8: (801, -1.0, 0.1, 0.0), 10: (1001, -1.0, 1.0, 0.0), 11: (1102, PRECISE, 0.4, 0.0),
    12: (1301, -0.9, 1.0, 0.0), 14: (1501, -1.2, 3.0, 0.0), 16: (1601, 7.0, 0.0, 0.0),
    20: "no_atoms", 21: "unknown_element", 22: "singular_lattice", 23: "nan_target", 24: "no_structure",
    25: "null_lattice", 26: "natoms_mismatch", 27: "natoms_mismatch", 28: (2801, -1.0, 1.0, 0.0),
}
EXPECTED_CANONICAL = {
    1: (102, -3.35, 2.31, 0.0), 3: (302, -1.7, 0.8, 0.0), 4: (401, -1.3, float("nan"), 2.2),
    7: (702, -0.7, 0.5, 0.0), 8: (801, -1.0, 0.1, 0.0), 9: (901, 6.0, 1.0, 0.0), 11: (1102, PRECISE, 0.4, 0.0),
    14: (1401, -1.0, 1.0, 0.0), 16: (1601, -0.5, 0.0, 0.0), 23: (2301, -1.0, float("nan"), 0.0),
    20: "no_atoms", 21: "unknown_element", 22: "singular_lattice", 24: "no_structure",
    25: "null_lattice", 26: "natoms_mismatch", 27: "natoms_mismatch", 28: (2801, -1.0, 1.0, 0.0),
}
VOLUME_PA = {1: CUBIC_A ** 3 / 5, 3: abs(np.linalg.det(HEX)) / 4, 4: abs(np.linalg.det(FCC_PRIM)) / 2}


@pytest.fixture(scope="module", params=["sqlite", "mariadb"])
def fixture_db(request, tmp_path_factory):
    if request.param == "sqlite":
        engine = make_engine(f"sqlite:///{tmp_path_factory.mktemp('oqmd') / 'fixture.sqlite'}", must_exist=False)
        load_fixture(engine)
        yield engine
        engine.dispose()
        return
    if _mysql_down:
        pytest.skip(f"MariaDB/MySQL not reachable: {_mysql_down}")
    with temporary_mysql_database(MYSQL_SERVER, "cgnn_test_ingest") as url:
        engine = make_engine(url)
        load_fixture(engine)
        yield engine
        engine.dispose()


def read_all(engine, selection="reference", **kw):
    filters = kw.pop("filters", Filters())
    return {r.key: r for r in OqmdReader(engine, selection=selection, filters=filters, **kw)}


def check_expected(records, expected):
    assert sorted(records) == sorted(expected)
    for key, exp in expected.items():
        rec = records[key]
        if isinstance(exp, str):
            assert rec.reason == exp, (key, rec.reason, rec.message)
            continue
        assert rec.ok, (key, rec.reason, rec.message)
        calc, de, gap, mag = exp
        assert rec.flags["calculation_id"] == calc, key
        y = rec.targets
        assert y.dtype == np.float64 and y.shape == (4,)
        assert y[0] == de, key  # exact: DOUBLE without Decimal rounding
        assert (math.isnan(gap) and math.isnan(y[2])) or y[2] == pytest.approx(gap, abs=1e-12), key
        assert y[3] == pytest.approx(mag, abs=1e-12), key
        assert y[1] == pytest.approx(rec.crystal.volume / rec.crystal.n_atoms, rel=1e-15)
        if key in VOLUME_PA:
            assert y[1] == VOLUME_PA[key] or y[1] == pytest.approx(VOLUME_PA[key], rel=1e-15)


# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("window", [True, False], ids=["window", "fallback57"])
def test_reference_selection(fixture_db, window):
    check_expected(read_all(fixture_db, "reference", window=window), EXPECTED_REFERENCE)


@pytest.mark.parametrize("window", [True, False], ids=["window", "fallback57"])
def test_canonical_selection(fixture_db, window):
    check_expected(read_all(fixture_db, "canonical", window=window), EXPECTED_CANONICAL)


def test_window_detection_and_fallback_identical(fixture_db):
    for selection in ("reference", "canonical"):
        for filters in (Filters(), Filters(elements=("O", "Zn", "Ca", "Ti")), Filters(shard=(1, 2))):
            auto = OqmdReader(fixture_db, selection=selection, filters=filters, batch_size=3)
            a = list(auto)
            assert auto.window is True  # SQLite 3.40 / MariaDB 10.11 both have window functions
            b = list(OqmdReader(fixture_db, selection=selection, filters=filters, batch_size=3, window=False))
            assert [(r.key, r.reason, r.flags.get("calculation_id")) for r in a] == \
                   [(r.key, r.reason, r.flags.get("calculation_id")) for r in b]
            for ra, rb in zip(a, b):
                if ra.ok:
                    np.testing.assert_array_equal(ra.targets, rb.targets)
                    np.testing.assert_array_equal(ra.crystal.frac, rb.crystal.frac)


def test_hexagonal_orientation_rows_are_vectors(fixture_db):
    rec = read_all(fixture_db)[3]
    lat = rec.crystal.lattice
    a, b, c = (np.linalg.norm(v) for v in lat)
    assert a == pytest.approx(HEX_A) and b == pytest.approx(HEX_A) and c == pytest.approx(HEX_C)
    gamma = math.degrees(math.acos(lat[0] @ lat[1] / (a * b)))
    assert gamma == pytest.approx(120.0)
    np.testing.assert_array_equal(lat, np.asarray(HEX))
    # the structure is the calculation's output (label ''), not the decoy labelled 'standard'
    assert rec.flags["structure_id"] == 32
    assert list(rec.crystal.numbers) == [30, 30, 8, 8]  # symbols -> Z, atoms in id order
    np.testing.assert_allclose(rec.crystal.frac[2], [1 / 3, 2 / 3, 0.375])


def test_duplicates_pooled_only_in_reference(fixture_db):
    ref, can = read_all(fixture_db, "reference"), read_all(fixture_db, "canonical")
    assert ref[14].flags["entry_id"] == 15 and can[14].flags["entry_id"] == 14
    assert ref[12].flags["entry_id"] == 13 and 12 not in can and 13 not in can
    assert 2 not in ref and 2 not in can and 15 not in ref and 5 not in ref and 5 not in can


def test_null_magmom_and_band_gap_flags(fixture_db):
    ref, can = read_all(fixture_db, "reference"), read_all(fixture_db, "canonical")
    assert ref[4].flags["band_gap_null"] and ref[4].targets[2] == 0.0
    assert can[4].flags["band_gap_null"] and math.isnan(can[4].targets[2])
    assert ref[1].flags["magmom_null"] and ref[1].targets[3] == 0.0
    assert not ref[4].flags["magmom_null"]
    assert ref[4].targets[3] == pytest.approx(2.2)  # |-4.4| / 2 from the calculation, not atoms' 5.0 guesses


def test_float_volume_column_is_not_used(fixture_db):
    rec = read_all(fixture_db)[1]
    with fixture_db.connect() as conn:
        stored = conn.execute(sa.select(T.structures.c.volume).where(T.structures.c.id == 13)).scalar()
    exact = CUBIC_A ** 3
    assert isinstance(stored, float)
    if fixture_db.dialect.name != "sqlite":
        assert stored != exact and stored == pytest.approx(exact, rel=1e-5)  # FLOAT: ~6-7 digits
    assert rec.targets[1] == pytest.approx(exact / 5, rel=1e-15)


def test_volume_deviation_flag(fixture_db):
    rec = read_all(fixture_db)[1]
    radii = {20: 1.94, 22: 1.76, 8: 0.48}  # cgnn-reference.md §1.1
    atomic = sum(4 / 3 * math.pi * radii[z] ** 3 for z in rec.crystal.numbers) / 5
    assert rec.flags["atomic_volume_per_atom"] == pytest.approx(atomic, rel=1e-9)
    assert rec.flags["volume_deviation"] == pytest.approx(1 - atomic / rec.targets[1], rel=1e-9)
    assert rec.crystal.extra["volume_deviation"] == rec.flags["volume_deviation"]


def test_filters_are_bound(fixture_db):
    ref = read_all(fixture_db, filters=Filters(elements=("O", "Zn")))
    assert sorted(ref) == [3]
    ranged = read_all(fixture_db, filters=Filters(min_id=3, max_id=9))
    assert sorted(ranged) == [3, 4, 7, 8]
    # an injection attempt is just an element name that matches nothing
    assert read_all(fixture_db, filters=Filters(elements=("O') OR 1=1 --",))) == {}
    everything = sorted(read_all(fixture_db))
    parts = [sorted(read_all(fixture_db, filters=Filters(shard=(i, 3)))) for i in range(3)]
    assert sorted(k for p in parts for k in p) == everything
    assert all(k % 3 == i for i, p in enumerate(parts) for k in p)


def test_keyset_pages_and_resume(fixture_db):
    full = [r.key for r in OqmdReader(fixture_db, batch_size=1000)]
    reader = OqmdReader(fixture_db, batch_size=2)
    paged = [r.key for r in reader]
    assert paged == full == sorted(full)
    assert reader.pages_read >= math.ceil(len(full) / 2)
    assert [r.key for r in OqmdReader(fixture_db, batch_size=4).records(after=7)] == [k for k in full if k > 7]
    assert OqmdReader(fixture_db).count() == len(full)
    assert OqmdReader(fixture_db).count(after=7) == len([k for k in full if k > 7])


NOT_SELECTED = {"reference": {6, 9, 29}, "canonical": {2, 5, 6, 10, 12, 13, 15, 29}}


@pytest.mark.parametrize("selection", ["reference", "canonical"])
def test_not_selected_keys_are_counted(fixture_db, selection):
    """Issue 8: an entry whose only calculation is unconverged (29) is passed over and counted, per page."""
    for batch in (1000, 2, 1):
        reader = OqmdReader(fixture_db, selection=selection, batch_size=batch)
        got = {r.key for r in reader}
        assert 29 not in got
        assert reader.not_selected == len(NOT_SELECTED[selection]), batch
    parts = []
    for i in range(3):
        reader = OqmdReader(fixture_db, selection=selection, batch_size=2, filters=Filters(shard=(i, 3)))
        list(reader)
        parts.append(reader.not_selected)
    assert parts == [sum(k % 3 == i for k in NOT_SELECTED[selection]) for i in range(3)]


def test_database_defects_are_skipped_with_reasons(fixture_db, tmp_path):
    """Issue 8: NULL lattice columns, natoms against the atom rows, 512 atoms, unconverged-only entry."""
    import csv

    from cgnn_dgl.cache import load_packed
    from ingest.run import run_ingest

    url = fixture_db.url.render_as_string(hide_password=False)
    s = run_ingest(url, tmp_path / "c", workers=1, batch_size=4, progress=False)
    rejects = {int(r["key"]): r for r in csv.DictReader((tmp_path / "c" / "rejects.csv").open())}
    assert rejects[25]["reason"] == "null_lattice" and "x2, z3 are NULL" in rejects[25]["message"]
    assert rejects[26]["reason"] == "natoms_mismatch"
    assert "structure 261 says natoms = 3" in rejects[26]["message"] and "2 atom rows" in rejects[26]["message"]
    assert rejects[27]["reason"] == "natoms_mismatch" and "calculation 2701 says natoms = 4" in rejects[27]["message"]
    packed = load_packed(tmp_path / "c")
    k = list(packed.entry_id).index(28)
    assert packed.node_ptr[k + 1] - packed.node_ptr[k] == 512
    assert 29 not in set(packed.entry_id) and 29 not in rejects
    assert s.not_selected == len(NOT_SELECTED["reference"])
    assert any(label.startswith("not selected (entry groups without a converged") and n == 3
               for label, n in s.rows())
    import json

    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert json.dumps(manifest).count('"not_selected": 3') == 1


def test_synthetic_names(fixture_db):
    assert read_all(fixture_db)[1].name == "oqmd-1"


def test_schema_tables_match_sql_file_on_mariadb():
    """sql/schema.sql (docker init) and ingest/tables.py describe the same columns, types and NULLs."""
    if _mysql_down:
        pytest.skip(f"MariaDB/MySQL not reachable: {_mysql_down}")
    with temporary_mysql_database(MYSQL_SERVER, "cgnn_test_schema") as url:
        engine = make_engine(url)
        info = create_schema(engine)
        assert info["elements_seeded"] == 118
        insp = sa.inspect(engine)
        assert set(insp.get_table_names()) == set(T.metadata.tables)
        for name, table in T.metadata.tables.items():
            cols = {c["name"]: c for c in insp.get_columns(name)}
            assert list(cols) == [c.name for c in table.columns] or set(cols) == {c.name for c in table.columns}, name
            for col in table.columns:
                db = cols[col.name]
                assert db["nullable"] == col.nullable, (name, col.name)
                dbtype = type(db["type"]).__name__.upper()
                if isinstance(col.type, sa.Double):
                    assert dbtype == "DOUBLE", (name, col.name, dbtype)
                elif isinstance(col.type, sa.Float):
                    assert dbtype == "FLOAT", (name, col.name, dbtype)
                elif isinstance(col.type, sa.Text):
                    assert dbtype in ("TEXT", "LONGTEXT"), (name, col.name, dbtype)
                elif isinstance(col.type, sa.String):
                    assert dbtype == "VARCHAR" and db["type"].length == col.type.length, (name, col.name)
            idx = {tuple(i["column_names"]) for i in insp.get_indexes(name)}
            for i in table.indexes:
                assert tuple(c.name for c in i.columns) in idx, (name, i.name)
        assert "label" not in {c for i in insp.get_indexes("calculations") for c in i["column_names"]}
        fks = {(fk["constrained_columns"][0], fk["referred_table"]) for fk in insp.get_foreign_keys("atoms")}
        assert ("element_id", "elements") in fks
        # re-running init is harmless
        assert create_schema(engine)["elements_seeded"] == 0
        engine.dispose()


def test_sqlite_create_all_and_seed(tmp_path):
    engine = make_engine(f"sqlite:///{tmp_path / 'x.sqlite'}", must_exist=False)
    assert create_schema(engine)["elements_seeded"] == 118
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT z FROM elements WHERE symbol = 'Fe'")).scalar() == 26
        assert conn.execute(sa.text("SELECT count(*) FROM elements")).scalar() == 118
    assert create_schema(engine)["elements_seeded"] == 0


def test_seed_and_query_files_are_current():
    from ingest.db import SQL_DIR
    from ingest.elements import seed_sql
    from ingest.select import render_sql

    assert (SQL_DIR / "seed_elements.sql").read_text() == seed_sql()
    assert (SQL_DIR / "queries" / "reference_mysql.sql").read_text() == render_sql("reference", "mysql", window=True)
    assert (SQL_DIR / "queries" / "canonical_mysql57_fallback.sql").read_text() == \
        render_sql("canonical", "mysql", window=False)
    # docker runs every top-level *.sql in alphabetical order: schema before seed, no query files there
    assert sorted(p.name for p in SQL_DIR.glob("*.sql")) == ["schema.sql", "seed_elements.sql"]


def test_url_handling(monkeypatch, tmp_path):
    from cgnn_dgl.errors import UsageError

    monkeypatch.delenv("CGNN_DB_URL", raising=False)
    with pytest.raises(UsageError):
        resolve_url(None)
    monkeypatch.setenv("CGNN_DB_URL", "mysql://reader@db:3306/qmdb")
    monkeypatch.setenv("CGNN_DB_PASSWORD", "s3cret-pw")
    url = resolve_url(None)
    assert url.drivername == "mysql+pymysql" and url.password == "s3cret-pw"
    assert "s3cret-pw" not in safe_url(url)
    assert resolve_url("demo/x.sqlite").drivername == "sqlite"
    with pytest.raises(UsageError):
        make_engine(f"sqlite:///{tmp_path / 'missing.sqlite'}")


PASSWORD_PIECES = ("p@ss", "ss/w", "w:rd", "rd%Z", "%Z", "%3A", "%25", "%40", "***@")


@pytest.mark.parametrize("url", ["mysql+pymysql://user:p@ss/w:rd%Z@127.0.0.1:3306/qmdb",
                                 "mysql://user:p@ss/w:rd%Z@127.0.0.1/qmdb?charset=utf8mb4"])
def test_malformed_url_never_echoes_the_password(url, monkeypatch):
    """Issue 8: an unescaped '@' in the password is refused as malformed, no piece of it in the message."""
    from cgnn_dgl.errors import UsageError

    monkeypatch.delenv("CGNN_DB_PASSWORD", raising=False)
    with pytest.raises(UsageError, match="looks malformed") as e:
        resolve_url(url)
    msg = str(e.value)
    assert not [p for p in PASSWORD_PIECES if p in msg], msg
    assert "URL-encode" in msg and "$CGNN_DB_PASSWORD" in msg


def test_malformed_url_cli_one_line_no_leak(tmp_path):
    import subprocess
    import sys

    url = "mysql+pymysql://user:p@ss/w:rd%Z@127.0.0.1:3306/qmdb"
    r = subprocess.run([sys.executable, "-m", "cgnn_dgl.cli", "ingest", "--db", url, "--out", str(tmp_path / "c")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    out = r.stdout + r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "looks malformed" in r.stderr, r.stderr
    assert not [p for p in PASSWORD_PIECES if p in out], out


@needs_mysql
@pytest.mark.parametrize("fixture_db", ["mariadb"], indirect=True)
def test_read_only_user_and_no_password_leak(fixture_db, caplog):
    admin = sa.create_engine(make_engine(MYSQL_SERVER, must_exist=False).url, isolation_level="AUTOCOMMIT")
    try:
        with readonly_mysql_user(admin, fixture_db.url.database) as (user, password):
            url = fixture_db.url.set(username=user, password=password)
            ro = make_engine(url)
            with ro.connect() as conn, pytest.raises(sa.exc.DBAPIError):
                conn.exec_driver_sql("CREATE TABLE nope (x int)")  # really read-only
            caplog.set_level(logging.DEBUG)
            check_expected(read_all(ro, "reference"), EXPECTED_REFERENCE)
            check_expected(read_all(ro, "canonical"), EXPECTED_CANONICAL)
            assert password not in safe_url(ro.url)
            assert password not in caplog.text
            ro.dispose()
    finally:
        admin.dispose()


@needs_mysql
@pytest.mark.parametrize("fixture_db", ["mariadb"], indirect=True)
def test_lost_connection_is_retried(fixture_db, caplog):
    """Kill the reader's MySQL connection between pages: it reconnects and resumes from the last key."""
    expected = [r.key for r in OqmdReader(fixture_db)]
    engine = make_engine(fixture_db.url)
    reader = OqmdReader(engine, batch_size=3, backoff=0.01)
    admin = sa.create_engine(fixture_db.url, isolation_level="AUTOCOMMIT")
    got, killed = [], 0
    for page in reader.pages():
        got.extend(r.key for r in page)
        if killed < 2:
            # find the pooled connection of the reader and kill it from another session
            with engine.connect() as conn:
                cid = conn.exec_driver_sql("SELECT CONNECTION_ID()").scalar()
            with admin.connect() as conn:
                conn.exec_driver_sql(f"KILL {int(cid)}")
            killed += 1
    assert got == expected
    assert killed == 2
    engine.dispose()
    admin.dispose()


@needs_mysql
@pytest.mark.parametrize("fixture_db", ["mariadb"], indirect=True)
def test_lost_connection_in_the_middle_of_a_page_is_retried(fixture_db, caplog):
    """Kill the connection after a page's rows were read and before its atoms are: the page is re-read."""
    expected = [(r.key, r.reason, r.flags.get("calculation_id")) for r in OqmdReader(fixture_db)]
    engine = make_engine(fixture_db.url)
    admin = sa.create_engine(fixture_db.url, isolation_level="AUTOCOMMIT")
    kills = []

    @sa.event.listens_for(engine, "before_cursor_execute")
    def kill_before_atoms(conn, cursor, statement, params, context, executemany):
        if "FROM atoms" in statement and "structure_id IN" in statement and len(kills) < 3:
            cid = conn.exec_driver_sql("SELECT CONNECTION_ID()").scalar()
            with admin.connect() as other:
                other.exec_driver_sql(f"KILL {int(cid)}")
            kills.append(cid)

    reader = OqmdReader(engine, batch_size=4, backoff=0.01)
    with caplog.at_level(logging.WARNING, logger="ingest.reader"):
        got = [(r.key, r.reason, r.flags.get("calculation_id")) for r in reader]
    assert len(kills) == 3 and reader.retried == 3
    assert got == expected  # nothing skipped, nothing read twice
    assert sum("retry" in r.getMessage() for r in caplog.records) == 3
    engine.dispose()
    admin.dispose()


def test_synthetic_data_shape_and_determinism(tmp_path):
    from ingest.synth import BAD_KINDS, synthesize

    def make(name, seed):
        engine = make_engine(f"sqlite:///{tmp_path / name}", must_exist=False)
        st = synthesize(engine, 600, seed=seed, bad_fraction=0.1, chunk=250)
        return engine, st

    a, st = make("a.sqlite", 5)
    b, _ = make("b.sqlite", 5)
    c, _ = make("c.sqlite", 6)

    def dump(engine):
        with engine.connect() as conn:
            return {t: conn.execute(sa.text(f"SELECT * FROM {t} ORDER BY 1")).all()
                    for t in ("entries", "structures", "atoms", "calculations", "formation_energies")}

    assert dump(a) == dump(b) and dump(a) != dump(c)
    assert st.entries == 600 and st.duplicates > 0 and sum(st.bad.values()) == pytest.approx(60, abs=25)
    assert set(st.bad) == set(BAD_KINDS) and all(v > 0 for v in st.bad.values())
    q = lambda sql: a.connect().execute(sa.text(sql)).scalar()  # noqa: E731
    assert q("SELECT count(*) FROM entries WHERE path NOT LIKE '/synthetic/5/%' OR label != 'synthetic'") == 0
    assert q("SELECT count(*) FROM entries WHERE duplicate_of_id IS NULL") > 0
    assert q("SELECT count(*) FROM entries WHERE duplicate_of_id IS NOT NULL AND duplicate_of_id != id") > 0
    assert q("SELECT count(*) FROM calculations WHERE magmom IS NULL AND label = 'static'") > 0
    assert q("SELECT count(*) FROM calculations WHERE magmom IS NOT NULL") > 0
    assert q("SELECT count(*) FROM calculations WHERE band_gap IS NULL AND label IN ('static','standard')") > 0
    assert q("SELECT count(*) FROM calculations WHERE converged = 0") > 0
    assert q("SELECT count(*) FROM calculations WHERE converged IS NULL") > 0
    assert q("SELECT count(DISTINCT label) FROM calculations") == 4  # relaxation/static, fine_relax/standard
    assert q("SELECT count(DISTINCT fit_id) FROM formation_energies") == 2
    assert q("SELECT count(*) FROM structures WHERE label = 'input'") == 600
    # hexagonal prototypes are stored as row vectors: |a| = |b|, b at 120 degrees
    row = a.connect().execute(sa.text("SELECT x1,x2,x3,y1,y2,y3 FROM structures WHERE prototype_id = 'ZnO' "
                                      "AND label = 'input' LIMIT 1")).one()
    va, vb = np.array(row[:3]), np.array(row[3:])
    assert np.linalg.norm(va) == pytest.approx(np.linalg.norm(vb))
    assert math.degrees(math.acos(va @ vb / np.linalg.norm(va) ** 2)) == pytest.approx(120.0)
    for e in (a, b, c):
        e.dispose()


@pytest.mark.parametrize("text, kind, ok", [
    ("5.7.29-log", "mysql", False), ("5.7.44", "mysql", False), ("8.0.34", "mysql", True),
    ("8.4.2", "mysql", True), ("10.1.48-MariaDB", "mariadb", False), ("10.2.44-MariaDB-1:10.2.44", "mariadb", True),
    ("10.11.19-MariaDB-0+deb12u1", "mariadb", True), ("5.5.5-10.11.6-MariaDB", "mariadb", True),
])
def test_window_function_support_from_server_version(text, kind, ok):
    from ingest.db import parse_server_version, window_functions_supported

    k, version = parse_server_version(text)
    assert k == kind
    assert window_functions_supported(k, version) is ok
