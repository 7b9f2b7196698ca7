"""`cgnn screen`: symmetry-distinct counts (closed-form answers), shared-geometry graphs == coordinator,
screen == predict, hull against a hand-built phase diagram, resume."""
from __future__ import annotations

import json
import math
from math import comb

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cgnn_dgl.structures import Crystal

X_POOL = ("O", "N", "F", "S", "Cl")


def perovskite() -> Crystal:
    frac = [[0, 0, 0], [.5, .5, .5], [.5, .5, 0], [.5, 0, .5], [0, .5, .5]]
    return Crystal("ABX3", np.eye(3) * 3.9, [38, 22, 8, 8, 8], frac)


def rocksalt_conventional() -> Crystal:
    cat = [[0, 0, 0], [.5, .5, 0], [.5, 0, .5], [0, .5, .5]]
    an = [[.5, 0, 0], [0, .5, 0], [0, 0, .5], [.5, .5, .5]]
    return Crystal("NaCl", np.eye(3) * 5.6, [11] * 4 + [17] * 4, cat + an)


@pytest.mark.parametrize("k", [1, 2, 3, 4, 5])
def test_perovskite_x_pool_gives_multisets(k):
    from cgnn_dgl.screen import count_distinct

    # the three X sites are permuted by S3: decorations are multisets of size 3 from k elements
    assert count_distinct(perovskite(), [((2, 3, 4), X_POOL[:k])]) == comb(k + 2, 3)
    assert count_distinct(perovskite(), [((0,), ("Li", "Na", "K")), ((1,), ("Ti", "Zr")),
                                         ((2, 3, 4), X_POOL[:k])]) == 3 * 2 * comb(k + 2, 3)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_rocksalt_cation_pool_gives_multisets(k):
    from cgnn_dgl.screen import count_distinct

    # translations and the point group act on the 4 fcc cation sites as S4: multisets of size 4
    assert count_distinct(rocksalt_conventional(), [((0, 1, 2, 3), ("Na", "K", "Li")[:k])]) == comb(k + 3, 4)


def test_shared_geometry_graphs_equal_coordinator():
    from cgnn_dgl.coordinator import DEFAULT_PARAMS, coordinate_packed
    from cgnn_dgl.screen import Decorations, ProtoNeighbours

    proto = perovskite()
    sites = [((0,), ("Li", "Na", "K", "Cs")), ((1,), ("Ti", "Zr", "Hf")), ((2, 3, 4), ("O", "N", "F", "S"))]
    dec = Decorations.build(proto, sites)
    keys = dec.canonical(0, dec.total)
    numbers = dec.numbers(keys)
    from cgnn_dgl.coordinator import radius_table

    r = radius_table()
    rmin = np.array([min(r[z] for z in set(numbers[:, s])) for s in range(5)])
    rmax = np.array([max(r[z] for z in set(numbers[:, s])) for s in range(5)])
    counts, src, _dst, ratio = ProtoNeighbours(proto, rmin, rmax, DEFAULT_PARAMS).graphs(numbers)
    crystals = [Crystal(str(k), proto.lattice, nums, proto.frac) for k, nums in zip(keys, numbers)]
    _, c_ref, nbr_ref, ratio_ref = coordinate_packed(crystals, DEFAULT_PARAMS, ratios=True)
    assert np.array_equal(counts, c_ref)
    assert np.array_equal(src, nbr_ref)
    assert np.array_equal(ratio, ratio_ref)


@pytest.mark.parametrize("site,message", [("9=Li", "out of range"), ("0=", "empty element pool"),
                                          ("0=Xq", "not an element")])
def test_bad_site_arguments(site, message):
    from cgnn_dgl.errors import UsageError
    from cgnn_dgl.screen import Decorations, parse_site

    with pytest.raises(UsageError, match=message):
        Decorations.build(perovskite(), [parse_site(site)])


# --------------------------------------------------------------------------------------------------
# end to end with a trained (tiny, 2-member) ensemble: screen == predict, volumes, ensemble std


def _read_csv(path):
    import csv

    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


TARGETS4 = ("formation_energy", "volume_per_atom", "band_gap", "magnetization")
SITES = (((0,), ("Ca", "Sr", "Ba")), ((1,), ("Ti", "Zr")), ((2, 3, 4), ("O", "F")))


@pytest.fixture(scope="module")
def trained(tmp_path_factory, dev_corpus):
    from test_train import tiny_config, usable_rows, write_cache

    from cgnn_dgl.ensemble import train_ensemble
    from cgnn_dgl.fileio import atomic_write_text

    root = tmp_path_factory.mktemp("screen")
    rows = usable_rows(dev_corpus, 200, sources=("perov_val",))
    cache = write_cache(root / "cache", rows, seed=1)
    train_ensemble(tiny_config(cache, root / "run", epochs=2, ensemble=2, bootstrap=True), root / "run")
    from pymatgen.io.cif import CifWriter

    atomic_write_text(root / "proto.cif", str(CifWriter(perovskite().to_pymatgen())))
    return root


def _screen(root, model, out, **kw):
    from cgnn_dgl.config import ScreenConfig
    from cgnn_dgl.screen import Screen, finish

    cfg = ScreenConfig(model=str(model), prototype=str(root / "proto.cif"), sites=SITES, out=str(out),
                       top=kw.pop("top", 3), **kw)
    screen = Screen(cfg, progress=False)
    stats = screen.run()
    if cfg.shard[1] == 1:
        finish([out], out, cfg.top, run_stats=stats, hull=screen.hull)
    return screen


def _predict_cli(model, inputs, out):
    import subprocess
    import sys
    from pathlib import Path

    r = subprocess.run([sys.executable, "-m", "cgnn_dgl.cli", "predict", "--model", str(model), *map(str, inputs),
                        "--out", str(out)], capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    assert r.returncode == 0, r.stderr[-2000:]
    return _read_csv(out)


def test_screen_equals_predict_and_cif_volume(trained, tmp_path):
    """Each candidate's predictions are `cgnn predict`'s on the decorated prototype written as CIF; the top
    CIFs hold V = predicted volume_per_atom x n, and predicting those scaled cells gives the same numbers."""
    from pymatgen.core import Element, Structure
    from pymatgen.io.cif import CifWriter

    from cgnn_dgl.screen import scaled_structure

    model = trained / "run" / "member_0" / "best.pt"
    out = tmp_path / "s"
    _screen(trained, model, out, top=4)
    rows = _read_csv(out / "candidates.csv")
    assert len(rows) == 3 * 2 * 4  # X pool of 2 on 3 equivalent sites: C(4, 3) = 4 multisets
    meta = json.loads((out / "candidates.meta.json").read_text())
    assert meta["untrained_columns"] == [] and meta["untrained_note"] == ""  # every target had labels
    assert "formation_energy_std" not in rows[0]
    proto = perovskite()
    cifs = tmp_path / "cifs"
    cifs.mkdir()
    for r in rows:
        numbers = proto.numbers.copy()
        for s in range(5):
            numbers[s] = Element(r[f"site_{s}"]).Z
        (cifs / f"k{r['key']}.cif").write_text(str(CifWriter(scaled_structure(proto, numbers, None).to_pymatgen())))
    got = {p["name"].removesuffix(".cif").removeprefix("k"): p for p in _predict_cli(model, [cifs], tmp_path / "p.csv")}
    assert len(got) == len(rows)
    for r in rows:
        p = got[r["key"]]
        for t in TARGETS4:
            assert float(r[t]) == pytest.approx(float(p[t]), rel=1e-5, abs=1e-6), (r["formula"], t)
    tops = sorted((out / "top").glob("*.cif"))
    assert len(tops) == 4
    pred_top = _predict_cli(model, tops, tmp_path / "t.csv")
    for rank, (path, p) in enumerate(zip(tops, pred_top), start=1):
        r = rows[rank - 1]
        assert int(r["rank"]) == rank and path.name.startswith(f"{rank:04d}_")
        s = Structure.from_file(path)
        assert s.volume == pytest.approx(float(r["volume_per_atom"]) * len(s), rel=1e-5)
        for t in TARGETS4:  # scale invariance: the scaled cell predicts what the prototype cell did
            assert float(p[t]) == pytest.approx(float(r[t]), rel=1e-5, abs=1e-6), (path.name, t)


def test_ensemble_run_writes_std_columns(trained, tmp_path):
    """`--model RUN` of an ensemble: the members' mean and the calibrated std, as `cgnn predict` gives them."""
    out = tmp_path / "e"
    _screen(trained, trained / "run", out)
    rows = _read_csv(out / "candidates.csv")
    assert all(f"{t}_std" in rows[0] for t in TARGETS4)
    std = np.array([[float(r[f"{t}_std"]) for t in TARGETS4] for r in rows])
    assert np.isfinite(std).all() and (std >= 0).all() and (std > 0).any()
    meta = json.loads((out / "candidates.meta.json").read_text())  # the file says how the std is made
    assert meta["column_notes"]["<target>_std"].startswith("scale[target] x ") and "95% interval" in meta["column_notes"]["<target>_std"]
    single = {r["key"]: r for r in _read_csv(_screen(trained, trained / "run" / "member_0" / "best.pt",
                                                      tmp_path / "m0").out / "candidates.csv")}
    other = {r["key"]: r for r in _read_csv(_screen(trained, trained / "run" / "member_1" / "best.pt",
                                                     tmp_path / "m1").out / "candidates.csv")}
    for r in rows:
        for t in TARGETS4:
            mean = (float(single[r["key"]][t]) + float(other[r["key"]][t])) / 2
            assert float(r[t]) == pytest.approx(mean, rel=1e-5, abs=1e-6)


def test_resume_and_shards_equal_one_run(trained, tmp_path):
    """Deleting one part file recomputes only that chunk, to the same candidates.csv; shards + merge == one run."""
    import os

    from cgnn_dgl.screen import PARTS, finish

    model = trained / "run" / "member_0" / "best.pt"
    full = tmp_path / "full"
    s = _screen(trained, model, full, chunk_size=5)
    parts = sorted((full / PARTS).glob("*.csv"))
    assert len(parts) == s.n_chunks > 2
    before = (full / "candidates.csv").read_bytes()
    stamps = {p: os.stat(p).st_mtime_ns for p in parts}
    parts[1].unlink()
    s2 = _screen(trained, model, full, chunk_size=5)
    assert s2.run()["chunks_run"] == 0  # already complete after the rerun
    for p in parts:
        if p != parts[1]:
            assert os.stat(p).st_mtime_ns == stamps[p]
    assert parts[1].exists() and (full / "candidates.csv").read_bytes() == before
    shards = []
    for i in range(2):
        d = tmp_path / f"shard{i}"
        _screen(trained, model, d, chunk_size=5, shard=(i, 2))
        shards.append(d)
    merged = tmp_path / "merged"
    finish(shards, merged, 3)
    # a shard batches other candidates together, so floats may differ in the last digits (batched sums);
    # the ranking (key order) and the values to 1e-6 are the same as one full run's
    one, joined = _read_csv(full / "candidates.csv"), _read_csv(merged / "candidates.csv")
    assert [r["key"] for r in joined] == [r["key"] for r in one]
    for a, b in zip(one, joined):
        for t in TARGETS4:
            assert float(b[t]) == pytest.approx(float(a[t]), rel=1e-6, abs=1e-7)


# --------------------------------------------------------------------------------------------------
# stability: the hull of a hand-built Ni-Al phase diagram in OQMD schema

NI_AL_KNOWN = {"Ni2Al": -0.8, "NiAl": -1.0, "NiAl3": -0.4}  # eV/atom; NiAl3 lies above the NiAl-Al tie line
FCC4 = [(0, 0, 0), (.5, .5, 0), (.5, 0, .5), (0, .5, .5)]


def ni_al_db(path):
    """SQLite in the OQMD schema: the three known phases, and entries ingest's rules must NOT use."""
    from test_ingest import Fixture

    from ingest.db import create_schema, make_engine

    f = Fixture()
    f.rows["fits"] = [dict(name=n) for n in ("standard", "nothing")]
    f.rows["compositions"] = [dict(formula=x) for x in ("Al1 Ni2", "Al1 Ni1", "Al3 Ni1", "Al1 Ni3", "Ni1 O1")]
    cub = [[3.6, 0, 0], [0, 3.6, 0], [0, 0, 3.6]]
    cells = {"Ni2Al": [("Ni", 0, 0, 0), ("Ni", 1 / 3, 1 / 3, 1 / 3), ("Al", 2 / 3, 2 / 3, 2 / 3)],
             "NiAl": [("Ni", 0, 0, 0), ("Al", .5, .5, .5)],
             "NiAl3": [("Ni", *FCC4[0])] + [("Al", *p) for p in FCC4[1:]],
             "Ni3Al": [("Al", *FCC4[0])] + [("Ni", *p) for p in FCC4[1:]]}
    for eid, (name, e) in enumerate(NI_AL_KNOWN.items(), start=1):
        f.simple(eid, delta_e=e, lattice=cub, atoms=cells[name])
    # 4: higher polymorph of NiAl, a duplicate of entry 2: reference pools it and keeps the lower -1.0
    f.simple(4, dup=2, delta_e=-0.3, lattice=cub, atoms=cells["NiAl"])
    # 5: Ni3Al far below the hull but duplicate_of_id NULL: never selected
    f.simple(5, dup=None, delta_e=-5.0, lattice=cub, atoms=cells["Ni3Al"])
    # 6: Ni3Al with an unconverged static (-5.0) and a converged relaxation (-9.0): no usable calculation
    f.entry(6)
    f.structure(61, 6, "static", cub, cells["Ni3Al"])
    f.calc(601, 6, "static", 61, converged=False)
    f.calc(602, 6, "relaxation", 61, converged=True)
    f.fe(6001, 601, 6, "standard", -5.0)
    f.fe(6002, 602, 6, "standard", -9.0)
    # 7: NiAl3 whose only formation energy is >= 5 eV/atom: the reference rule drops it (would not lower anyway)
    f.simple(7, delta_e=6.0, lattice=cub, atoms=cells["NiAl3"])
    # 8: Ni3Al whose first formation-energy row (fit 'nothing') is -0.1 and its 'standard' one -3.0: the
    #    reference rule takes the first row (-0.1, above the hull: no change), canonical the standard (-3.0)
    f.entry(8)
    f.structure(81, 8, "static", cub, cells["Ni3Al"])
    f.calc(801, 8, "static", 81)
    f.fe(8001, 801, 8, "nothing", -0.1)
    f.fe(8002, 801, 8, "standard", -3.0)
    # 9: NiO, outside the candidates' chemical system
    f.simple(9, delta_e=-2.0, lattice=cub, atoms=[("Ni", 0, 0, 0), ("O", .5, .5, .5)])
    engine = make_engine(f"sqlite:///{path}", must_exist=False)
    create_schema(engine)
    from ingest import tables as T

    with engine.begin() as conn:
        for name in ("fits", "compositions", "entries", "structures", "atoms", "calculations", "formation_energies"):
            data = f.rows[name]
            cols = sorted({k for r in data for k in r})
            conn.execute(T.metadata.tables[name].insert(), [{c: r.get(c) for c in cols} for r in data])
    engine.dispose()
    return f"sqlite:///{path}"


def _hand_hull(x_al: float, known: list[tuple[str, float]]) -> tuple[float, dict[str, float]]:
    """Lower convex envelope of (x_Al, E) points by brute force over pairs: (energy, {formula: atom fraction})."""
    from pymatgen.core import Composition

    pts = [("Ni", 0.0, 0.0), ("Al", 1.0, 0.0)] + [(k, Composition(k).get_atomic_fraction("Al"), e) for k, e in known]
    best: tuple[float, dict] = (math.inf, {})
    for a in pts:
        for b in pts:
            if not a[1] <= x_al <= b[1]:
                continue
            w = 0.0 if b[1] == a[1] else (x_al - a[1]) / (b[1] - a[1])
            e = (1 - w) * a[2] + w * b[2]
            if e < best[0] - 1e-12:
                dec: dict[str, float] = {}
                for name, amt in ((a[0], 1 - w), (b[0], w)):
                    if amt > 1e-12:
                        key = Composition(name).reduced_formula
                        dec[key] = dec.get(key, 0.0) + amt
                best = (e, dec)
    return best


@pytest.mark.parametrize("selection", ["reference", "canonical"])
def test_hull_against_hand_built_phase_diagram(trained, tmp_path, selection):
    """e_above_hull = predicted formation energy - the hull worked out by hand from the known phases;
    entries ingest's selection rule would not use (unconverged, duplicate_of NULL, non-static) never lower it."""
    from pymatgen.core import Composition
    from pymatgen.io.cif import CifWriter

    from cgnn_dgl.config import ScreenConfig
    from cgnn_dgl.fileio import atomic_write_text
    from cgnn_dgl.screen import Screen, finish

    url = ni_al_db(tmp_path / "nial.sqlite")
    proto = Crystal("Ni", np.eye(3) * 3.52, [28] * 4, FCC4)
    atomic_write_text(tmp_path / "fcc.cif", str(CifWriter(proto.to_pymatgen())))
    out = tmp_path / "s"
    cfg = ScreenConfig(model=str(trained / "run" / "member_0" / "best.pt"), prototype=str(tmp_path / "fcc.cif"),
                       sites=(((0, 1, 2, 3), ("Ni", "Al")),), out=str(out), top=5, db=url, selection=selection)
    screen = Screen(cfg, progress=False)
    assert screen.rank_by == "e_above_hull"
    summary = finish([out], out, 5, run_stats=screen.run(), hull=screen.hull)
    # what each rule selects (worked out from the rules in ingest/select.py, entry by entry in ni_al_db):
    known = list(NI_AL_KNOWN.items())
    if selection == "reference":
        known += [("Ni3Al", -0.1)]  # entry 8's first formation-energy row; 4 pooled under 2; 5, 6, 7 dropped
    else:
        known += [("Ni3Al", -3.0), ("NiAl3", 6.0)]  # entry 8's standard fit; 7 kept (no delta_e cap); 4, 5, 6 dropped
    assert summary["known_phases"]["count"] == len(known)
    rows = _read_csv(out / "candidates.csv")
    assert sorted(Composition(r["formula"]).reduced_formula for r in rows) == sorted(
        Composition(f).reduced_formula for f in ("Ni", "Ni3Al", "NiAl", "NiAl3", "Al"))
    e_above = []
    for r in rows:
        e_hull, dec = _hand_hull(Composition(r["formula"]).get_atomic_fraction("Al"), known)
        assert float(r["hull_energy"]) == pytest.approx(e_hull, abs=1e-9), r["formula"]
        assert float(r["e_above_hull"]) == pytest.approx(float(r["formation_energy"]) - e_hull, abs=1e-7)
        got: dict[str, float] = {}
        for term in r["decomposition"].split(" + "):
            amt, phase = term.split(" ")
            got[Composition(phase).reduced_formula] = float(amt)
        assert got.keys() == dec.keys(), (r["formula"], got, dec)
        for k in dec:
            assert got[k] == pytest.approx(dec[k], abs=1e-3)
        e_above.append(float(r["e_above_hull"]))
    assert e_above == sorted(e_above) and [int(r["rank"]) for r in rows] == [1, 2, 3, 4, 5]
    if selection == "reference":  # the hull is the hand one, not lowered by the decoys: NiAl3 and Ni3Al off it
        assert _hand_hull(0.25, known)[0] == pytest.approx(-0.6) and _hand_hull(0.75, known)[0] == pytest.approx(-0.5)


# --------------------------------------------------------------------------------------------------
# kill -9 mid-screen, rerun the same command: the same candidates.csv as an uninterrupted run

BIG_SITES = ("0=Li,Na,K,Rb,Cs,Ca,Sr,Ba", "1=Ti,Zr,Hf,V,Nb,Ta", "2,3,4=O,N,F,S")  # 8 * 6 * C(6, 3) = 960


def _screen_cmd(trained, out, *extra):
    import sys

    cmd = [sys.executable, "-m", "cgnn_dgl.cli", "screen", "--model", str(trained / "run" / "member_0" / "best.pt"),
           "--prototype", str(trained / "proto.cif"), "--out", str(out), "--chunk-size", "16", "--threads", "1",
           "--top", "3", *extra]
    for s in BIG_SITES:
        cmd += ["--site", s]
    return cmd


def test_kill9_mid_screen_resumes_with_nothing_lost_or_repeated(trained, tmp_path):
    import subprocess
    from pathlib import Path

    from conftest import sigkill_after_lines

    from cgnn_dgl.screen import PARTS

    repo = Path(__file__).resolve().parents[1]
    ref = tmp_path / "ref"
    r = subprocess.run(_screen_cmd(trained, ref), capture_output=True, text=True, cwd=repo)
    assert r.returncode == 0, r.stderr[-2000:]
    n_chunks = 8 * 6 * 4 ** 3 // 16
    assert len(list((ref / PARTS).glob("part-*.csv"))) == n_chunks
    out = tmp_path / "killed"
    proc = subprocess.Popen(_screen_cmd(trained, out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=repo)
    watch = out / PARTS / f"part-0000of0001-{n_chunks // 3:08d}.csv"
    killed = sigkill_after_lines(proc, watch, 1, timeout=300)
    assert killed is not None, "the screen finished before it could be killed"
    assert proc.returncode == -9
    done = sorted((out / PARTS).glob("part-*.csv"))
    assert n_chunks // 3 < len(done) < n_chunks and not (out / "candidates.csv").exists()
    stamps = {p.name: p.stat().st_mtime_ns for p in done}
    r = subprocess.run(_screen_cmd(trained, out), capture_output=True, text=True, cwd=repo)
    assert r.returncode == 0, r.stderr[-2000:]
    after = {p.name: p for p in (out / PARTS).glob("part-*.csv")}
    assert len(after) == n_chunks
    assert all(after[name].stat().st_mtime_ns == t for name, t in stamps.items())  # finished chunks not redone
    rows = _read_csv(out / "candidates.csv")
    keys = [r["key"] for r in rows]
    assert len(keys) == len(set(keys)) == 8 * 6 * comb(6, 3)  # nothing repeated, nothing lost
    assert (out / "candidates.csv").read_bytes() == (ref / "candidates.csv").read_bytes()
    assert (out / "unscoreable.csv").read_bytes() == (ref / "unscoreable.csv").read_bytes()


def test_rank_by_a_target_the_model_lacks_is_one_line(trained, tmp_path):
    import subprocess
    from pathlib import Path

    r = subprocess.run(_screen_cmd(trained, tmp_path / "x", "--rank-by", "bulk_modulus"), capture_output=True,
                       text=True, cwd=Path(__file__).resolve().parents[1])
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "--rank-by bulk_modulus" in lines[0] and "formation_energy" in lines[0], r.stderr
    assert not (tmp_path / "x").exists()  # refused before any output
    r = subprocess.run(_screen_cmd(trained, tmp_path / "y", "--rank-by", "e_above_hull"), capture_output=True,
                       text=True, cwd=Path(__file__).resolve().parents[1])
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "--db" in r.stderr


def test_unscoreable_candidates_listed_with_decoration_and_reason(trained, tmp_path):
    """At has no atomic radius, Po has one but is outside the model's species: their decorations are listed
    in unscoreable.csv (not scored, not dropped silently); the others are scored as usual."""
    import json

    from cgnn_dgl.config import ScreenConfig
    from cgnn_dgl.screen import Screen, finish

    sites = (((0,), ("Ca", "At", "Po")), ((1,), ("Ti", "Zr")), ((2, 3, 4), ("O", "F")))
    out = tmp_path / "u"
    cfg = ScreenConfig(model=str(trained / "run" / "member_0" / "best.pt"), prototype=str(trained / "proto.cif"),
                       sites=sites, out=str(out), top=2, chunk_size=7)
    screen = Screen(cfg, progress=False)
    finish([out], out, 2, run_stats=screen.run(), hull=None)
    ok = _read_csv(out / "candidates.csv")
    bad = _read_csv(out / "unscoreable.csv")
    assert len(ok) == 2 * 4 and {r["site_0"] for r in ok} == {"Ca"}
    assert len(bad) == 2 * 2 * 4
    assert list(bad[0]) == ["key", "formula", "site_0", "site_1", "site_2", "site_3", "site_4", "reason"]
    seen = set()
    for r in bad:
        assert r["site_0"] in ("At", "Po") and r["site_1"] in ("Ti", "Zr")
        assert {r[f"site_{s}"] for s in (2, 3, 4)} <= {"O", "F"}
        assert r["site_0"] in r["formula"]
        if r["site_0"] == "At":
            assert r["reason"].startswith("no_radius") and "At has no atomic radius" in r["reason"]
        else:
            assert r["reason"].startswith("unsupported_element") and "Po is outside the model" in r["reason"]
        seen.add((r["site_0"], r["site_1"], "".join(sorted(r[f"site_{s}"] for s in (2, 3, 4)))))
    assert len(seen) == len(bad)  # each symmetry-distinct decoration once
    summary = json.loads((out / "summary.json").read_text())
    assert summary["unscoreable"] == 16 and summary["unscoreable_reasons"] == {"no_radius": 8,
                                                                               "unsupported_element": 8}
    assert summary["symmetry_distinct"] == 24 and summary["scored"] == 8


def test_model_labels_come_from_the_checkpoint_record(tmp_path):
    """What the model learnt (synthetic or real labels) is read from the checkpoint's record when it has one,
    else from its cache's ingest flags."""
    import torch

    from cgnn_dgl.screen import _model_labels

    for flag, want in ((True, "synthetic"), (False, "real")):
        torch.save({"synthetic": flag, "train_config": {"cache": str(tmp_path / "none")}}, tmp_path / "m.pt")
        assert _model_labels(str(tmp_path / "m.pt")) == want
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "ingest_flags.csv").write_text("name,synthetic\na,True\n")
    torch.save({"train_config": {"cache": str(tmp_path / "c")}}, tmp_path / "old.pt")
    assert _model_labels(str(tmp_path / "old.pt")) == "synthetic"
    torch.save({"synthetic": None, "train_config": {"cache": str(tmp_path / "none")}}, tmp_path / "u.pt")
    assert _model_labels(str(tmp_path / "u.pt")) == "unknown"


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 94), st.integers(1, 12)), min_size=1, max_size=5, unique_by=lambda t: t[0]))
def test_reduced_formula_equals_pymatgen(comp):
    """The fast formula of a candidate is pymatgen's reduced formula, rare rewrites included."""
    import warnings

    from pymatgen.core import Composition, Element

    from cgnn_dgl.screen import reduced_formula

    z = np.array(sorted(a for a, _ in comp))
    counts = np.array([dict(comp)[a] for a in z])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = Composition({Element.from_Z(int(a)): int(n) for a, n in zip(z, counts)}).reduced_formula
        assert reduced_formula(z, counts) == expected


def test_screen_flags_outputs_without_training_labels(trained, dev_corpus, tmp_path):
    from test_train import tiny_config, usable_rows, write_cache

    from cgnn_dgl.train import train_run

    rows = usable_rows(dev_corpus, 120, sources=("perov_val",))
    cache = write_cache(tmp_path / "cache", rows, seed=3, unlabelled=(3,))
    train_run(tiny_config(cache, tmp_path / "run", epochs=1), tmp_path / "run")
    out = tmp_path / "s"
    _screen(trained, tmp_path / "run" / "best.pt", out)
    meta = json.loads((out / "candidates.meta.json").read_text())
    assert meta["untrained_columns"] == ["magnetization"] and "not predictions" in meta["untrained_note"]
