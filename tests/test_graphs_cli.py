"""`cgnn graphs`: mixed inputs, bad files counted by reason, parallel workers, kill -9 and resume."""
from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from cgnn_dgl.cache import load_packed
from cgnn_dgl.cli import main

POSCAR_NACL = """NaCl rocksalt
1.0
0.0 2.82 2.82
2.82 0.0 2.82
2.82 2.82 0.0
Na Cl
1 1
Direct
0.0 0.0 0.0
0.5 0.5 0.5
"""

CIF_CU = """data_Cu
_cell_length_a 3.615
_cell_length_b 3.615
_cell_length_c 3.615
_cell_angle_alpha 90
_cell_angle_beta 90
_cell_angle_gamma 90
_symmetry_space_group_name_H-M 'P 1'
loop_
_atom_site_label
_atom_site_type_symbol
_atom_site_fract_x
_atom_site_fract_y
_atom_site_fract_z
Cu1 Cu 0 0 0
Cu2 Cu 0 0.5 0.5
Cu3 Cu 0.5 0 0.5
Cu4 Cu 0.5 0.5 0
"""


@pytest.fixture()
def inputs(tmp_path, dev_corpus):
    folder = tmp_path / "structures"
    (folder / "sub").mkdir(parents=True)
    (folder / "POSCAR").write_text(POSCAR_NACL)
    (folder / "sub" / "Cu.cif").write_text(CIF_CU)
    (folder / "sub" / "POSCAR_mp-22862").write_text(POSCAR_NACL)  # POSCAR_* names are found in folders too
    (folder / "broken.cif").write_text("data_broken\nthis is not a CIF\n")
    (folder / "notes.txt").write_text("ignored: not a structure file")
    rows = [r for r in dev_corpus if r["error"] is None][:20] + [r for r in dev_corpus if r["error"]][:2]
    rows.append({"name": "no-atoms", "lattice": np.eye(3).tolist(), "numbers": [], "frac": []})
    rows.append({"name": "flat", "lattice": [[1, 0, 0], [0, 1, 0], [0, 0, 0]], "numbers": [1], "frac": [[0, 0, 0]]})
    (tmp_path / "list.json").write_text(json.dumps(rows))
    return folder, tmp_path / "list.json", rows


def test_graphs_from_files_folders_and_json(tmp_path, inputs, capsys):
    folder, js, rows = inputs
    rc = main(["graphs", str(folder), str(js), "--out", str(tmp_path / "cache"), "--workers", "2"])
    assert rc == 0
    out = capsys.readouterr().out
    packed = load_packed(tmp_path / "cache")
    assert len(packed) == 3 + 20  # NaCl twice, Cu, 20 good JSON rows
    with open(tmp_path / "cache" / "rejects.csv") as fh:
        rejects = list(csv.DictReader(fh))
    reasons = sorted(r["reason"] for r in rejects)
    n_ref_errors = sum(1 for r in rows if r.get("error"))
    assert n_ref_errors >= 1
    assert reasons == sorted(["parse_error", "no_atoms", "singular_lattice"] + ["no_radius"] * n_ref_errors)
    assert "rejected: no_radius" in out
    # fcc Cu conventional cell: every atom has 12 neighbours
    cu = packed.names.index("Cu")
    assert np.all(np.bincount(packed.subset([cu]).bond_dst) == 12)
    # the JSON rows keep the reference neighbour multisets
    for row in rows[:20]:
        k = packed.names.index(row["name"])
        one = packed.subset([k])
        got = [sorted(one.bond_src[one.bond_dst == j].tolist()) for j in range(len(row["numbers"]))]
        assert got == [sorted(n) for n in row["neighbors"]], row["name"]


def test_missing_input_is_a_usage_error(tmp_path, capsys):
    assert main(["graphs", str(tmp_path / "nope"), "--out", str(tmp_path / "c")]) == 2
    assert "input not found" in capsys.readouterr().err


def _run_graphs(js, out, *extra):
    return subprocess.Popen([sys.executable, "-m", "cgnn_dgl.cli", "graphs", str(js), "--out", str(out),
                             "--shard-size", "150", "--workers", "1", *extra],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _digests(root):
    m = json.loads((Path(root) / "manifest.json").read_text())
    return [(s["key_first"], s["key_last"], s["content_sha256"], s["meta_sha256"]) for s in m["shards"]]


def _n_shards(root) -> int:
    try:
        return len(json.loads((Path(root) / "manifest.json").read_text())["shards"])
    except (OSError, ValueError):
        return 0


def test_kill_and_resume_gives_the_clean_cache(tmp_path, dev_corpus):
    js = tmp_path / "dev.json"
    js.write_text(json.dumps(dev_corpus * 2))
    clean = _run_graphs(js, tmp_path / "clean")
    assert clean.wait(timeout=300) == 0, clean.stderr.read()
    killed = 0
    rng = np.random.default_rng()
    for target in sorted(rng.choice(np.arange(3, 40), size=3, replace=False)):
        proc = _run_graphs(js, tmp_path / "resumed")
        while proc.poll() is None and _n_shards(tmp_path / "resumed") < target:
            time.sleep(0.01)
        time.sleep(rng.uniform(0, 0.05))  # land anywhere, also in the middle of a shard write
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            killed += 1
        proc.wait()
    assert killed >= 3
    final = _run_graphs(js, tmp_path / "resumed")
    assert final.wait(timeout=300) == 0, final.stderr.read()
    assert _digests(tmp_path / "resumed") == _digests(tmp_path / "clean")
    assert (tmp_path / "resumed" / "rejects.csv").read_text() == (tmp_path / "clean" / "rejects.csv").read_text()


def test_export_gives_reference_neighbour_lists(tmp_path, dev_corpus):
    rows = [r for r in dev_corpus if r["error"] is None][:200]
    js = tmp_path / "in.json"
    js.write_text(json.dumps(rows))
    assert main(["graphs", str(js), "--out", str(tmp_path / "c"), "--workers", "1", "--pruning", "kmeans"]) == 0
    assert main(["cache", "export", str(tmp_path / "c"), "--out", str(tmp_path / "out.json")]) == 0
    out = json.loads((tmp_path / "out.json").read_text())
    assert [o["name"] for o in out] == [r["name"] for r in rows]
    for o, r in zip(out, rows):
        assert o["numbers"] == r["numbers"] and o["neighbors"] == r["neighbors"], r["name"]
        assert set(o["targets"]) == {"formation_energy", "volume_per_atom", "band_gap", "magnetization"}


def test_build_cache_lays_out_labels_by_the_caches_target_names(tmp_path):
    """Labels given by name land in the columns the cache names; absent or NaN ones are masked, not dropped."""
    from cgnn_dgl.cache import CacheWriter
    from cgnn_dgl.coordinator import DEFAULT_PARAMS
    from cgnn_dgl.pipeline import BuildItem, build_cache
    from cgnn_dgl.structures import Crystal

    lattice = np.array([[0.0, 2.82, 2.82], [2.82, 0.0, 2.82], [2.82, 2.82, 0.0]])
    nacl = Crystal("nacl", lattice, np.array([11, 17]), np.array([[0.0, 0, 0], [0.5, 0.5, 0.5]]))
    items = [BuildItem(0, nacl, {"dir_gap": 5.0, "heat_all": -2.1}), BuildItem(1, nacl, {"dir_gap": float("nan")}),
             BuildItem(2, nacl, None)]
    writer = CacheWriter(tmp_path / "c", source={"kind": "test"}, params=DEFAULT_PARAMS, targets=("heat_all", "dir_gap"))
    build_cache(items, writer, workers=1, params=DEFAULT_PARAMS)
    packed = load_packed(tmp_path / "c")
    assert packed.targets == ("heat_all", "dir_gap")
    np.testing.assert_array_equal(packed.y_mask, [[True, True], [False, False], [False, False]])
    np.testing.assert_allclose(packed.y[0], [-2.1, 5.0])
    # a label the cache does not hold is a bad row, not a silent drop
    writer = CacheWriter(tmp_path / "d", source={"kind": "test"}, params=DEFAULT_PARAMS, targets=("heat_all",))
    summary = build_cache([BuildItem(0, nacl, {"bulk_modulus": 1.0}), BuildItem(1, nacl, {"heat_all": 1.0})],
                          writer, workers=1, params=DEFAULT_PARAMS)
    assert (summary["total_rejects"], summary["total_graphs"]) == (1, 1)


# --------------------------------------------------------------------------------------------------
# labelled inputs: `cgnn graphs DIR|data.csv --targets ...` (readers: tests/test_readers.py)


def _perov5(shared, n):
    csv.field_size_limit(2**31 - 1)
    with open(shared / "data" / "perov5" / "train.csv", newline="") as fh:
        reader = csv.DictReader(fh)
        return [next(reader) for _ in range(n)]


def _export(root, out):
    assert main(["cache", "export", str(root), "--out", str(out)]) == 0
    return {r["name"]: (r["numbers"], r["neighbors"], r["targets"]) for r in json.loads(Path(out).read_text())}


def test_graphs_from_a_cgcnn_folder_and_the_same_csv(tmp_path, shared, capsys):
    rows = _perov5(shared, 8)
    folder = tmp_path / "perov5"
    folder.mkdir()
    lines = []
    for r in rows:
        (folder / f"{r['material_id']}.cif").write_text(r["cif"])
        lines.append(f"{r['material_id']},{r['heat_all']},{r['dir_gap']}")  # CGCNN layout: no header
    lines += ["404,1.0,1.0", f"{rows[0]['material_id']}x,one,1.0"]  # no structure file; a word for a label
    (folder / f"{rows[0]['material_id']}x.cif").write_text(rows[0]["cif"])
    (folder / "id_prop.csv").write_text("\n".join(lines) + "\n")
    rc = main(["graphs", str(folder), "--targets", "heat_all,dir_gap", "--units", "heat_all=eV/atom,dir_gap=eV",
               "--out", str(tmp_path / "c1"), "--workers", "2"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "inputs labelled heat_all" in out and "rejected: missing_file" in out
    manifest = json.loads((tmp_path / "c1" / "manifest.json").read_text())
    assert manifest["targets"] == ["heat_all", "dir_gap"]
    assert manifest["units"] == {"heat_all": "eV/atom", "dir_gap": "eV"}
    with open(tmp_path / "c1" / "rejects.csv") as fh:
        rejects = {r["name"]: r["reason"] for r in csv.DictReader(fh)}
    assert rejects == {"404": "missing_file", f"{rows[0]['material_id']}x": "bad_label"}
    packed = load_packed(tmp_path / "c1")
    assert packed.names == [r["material_id"] for r in rows]
    assert packed.y.tolist() == [[float(r["heat_all"]), float(r["dir_gap"])] for r in rows]

    # the shipped CSV layout, the same rows: the same cache content
    with open(shared / "data" / "perov5" / "train.csv", newline="") as fh, \
            open(tmp_path / "data.csv", "w", newline="") as dst:
        src, w = csv.reader(fh), csv.writer(dst, lineterminator="\n")
        for _ in range(len(rows) + 1):
            w.writerow(next(src))
    rc = main(["graphs", str(tmp_path / "data.csv"), "--structure-column", "cif", "--id-column", "material_id",
               "--targets", "heat_all,dir_gap", "--out", str(tmp_path / "c2"), "--workers", "1"])
    assert rc == 0
    assert _export(tmp_path / "c2", tmp_path / "c2.json") == _export(tmp_path / "c1", tmp_path / "c1.json")


@pytest.mark.parametrize(("extra", "message"), [
    (["--structure-column", "poscar"], "no column 'poscar' for --structure-column"),
    (["--id-column", "mpid"], "no column 'mpid' for --id-column"),
    (["--units", "band_gap=eV"], "--units: expected NAME=UNIT for the targets heat_all"),
    (["--targets", "heat_all,,dir_gap"], "--targets: expected comma-separated names"),
])
def test_labelled_usage_errors_are_one_line(tmp_path, shared, capsys, extra, message):
    rows = _perov5(shared, 2)
    with open(tmp_path / "d.csv", "w", newline="") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(["material_id", "cif", "heat_all"])
        w.writerows([r["material_id"], r["cif"], r["heat_all"]] for r in rows)
    args = ["graphs", str(tmp_path / "d.csv"), "--out", str(tmp_path / "c")]
    if "--targets" not in extra:
        args += ["--targets", "heat_all"]
    assert main(args + extra) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err and "Traceback" not in err


def test_headerless_id_prop_needs_targets(tmp_path, shared, capsys):
    row = _perov5(shared, 1)[0]
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / f"{row['material_id']}.cif").write_text(row["cif"])
    (tmp_path / "d" / "id_prop.csv").write_text(f"{row['material_id']},{row['heat_all']}\n")
    assert main(["graphs", str(tmp_path / "d"), "--out", str(tmp_path / "c")]) == 2
    assert "no header: name its value columns, in order, with --targets" in capsys.readouterr().err


def test_pymatgen_structure_json_is_read(tmp_path, shared, capsys):
    from pymatgen.io.cif import CifParser

    row = _perov5(shared, 1)[0]
    s = CifParser.from_str(row["cif"]).parse_structures(primitive=False)[0]
    s.properties = {"heat_all": float(row["heat_all"])}
    (tmp_path / "s.json").write_text(json.dumps(s.as_dict()))  # once refused with the path thrice
    assert main(["graphs", str(tmp_path / "s.json"), "--targets", "heat_all", "--out", str(tmp_path / "c")]) == 0
    packed = load_packed(tmp_path / "c")
    assert packed.names == ["s"] and packed.targets == ("heat_all",)
    assert packed.y.tolist() == [[float(row["heat_all"])]]


def test_a_targets_column_no_input_has_stops_before_building(tmp_path, shared, capsys):
    rows = _perov5(shared, 3)
    with open(tmp_path / "d.csv", "w", newline="") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(["", "material_id", "cif", "heat_all"])
        w.writerows([k, r["material_id"], r["cif"], r["heat_all"]] for k, r in enumerate(rows))
    rc = main(["graphs", str(tmp_path / "d.csv"), "--targets", "heat_all,bulk_modulus", "--id-column", "material_id",
               "--out", str(tmp_path / "c")])
    assert rc == 2
    err = capsys.readouterr().err
    assert "all 3 inputs were rejected while reading (unknown_column)" in err
    assert "has no column bulk_modulus (columns: (unnamed), material_id, cif, heat_all)" in err
    assert not (tmp_path / "c" / "manifest.json").exists()


def test_all_bad_inputs_end_cleanly_with_rejects_listed(tmp_path, capsys):
    """Issue 8.1: a folder of bad files, and a JSON list of one 2x2-lattice record, used to crash."""
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "x.cif").write_text("garbage\n")
    (tmp_path / "in" / "x.vasp").write_text("junk\n")
    assert main(["graphs", str(tmp_path / "in"), "--out", str(tmp_path / "c1")]) == 0
    names = [r["name"] for r in csv.DictReader((tmp_path / "c1" / "rejects.csv").open())]
    assert sorted(Path(n).name for n in names) == ["x.cif", "x.vasp"]
    assert len(load_packed(tmp_path / "c1")) == 0
    bad = [{"name": "m1", "lattice": [[1, 0], [0, 1]], "species": ["Na"], "coords": [[0, 0, 0]]}]
    (tmp_path / "l.json").write_text(json.dumps(bad))
    assert main(["graphs", str(tmp_path / "l.json"), "--out", str(tmp_path / "c2")]) == 0
    rows = list(csv.DictReader((tmp_path / "c2" / "rejects.csv").open()))
    assert len(rows) == 1 and len(load_packed(tmp_path / "c2")) == 0


def _no_radius_poscar(symbol: str = "At") -> str:
    return POSCAR_NACL.replace("Na Cl", f"{symbol} Cl")


def test_late_rejects_name_the_file_as_given(tmp_path, capsys):
    """Issue 8.2: a reject found by the coordinator (no radius) named only the stem, so x.cif and x.vasp
    could not be told apart; every reject names the path with its extension, or the row of a list."""
    from pymatgen.core import Structure

    (tmp_path / "in").mkdir()
    s = Structure.from_str(_no_radius_poscar(), fmt="poscar")
    (tmp_path / "in" / "x.cif").write_text(s.to(fmt="cif"))
    (tmp_path / "in" / "x.vasp").write_text(_no_radius_poscar())
    (tmp_path / "in" / "ok.vasp").write_text(POSCAR_NACL)
    frames = tmp_path / "frames.extxyz"
    import ase.io

    ase.io.write(str(frames), [s.to_ase_atoms(), Structure.from_str(POSCAR_NACL, fmt="poscar").to_ase_atoms()],
                 format="extxyz")
    rows = [{"name": "m1", "lattice": s.lattice.matrix.tolist(), "numbers": [85, 17],
             "frac": s.frac_coords.tolist()}]
    (tmp_path / "l.json").write_text(json.dumps(rows))
    assert main(["graphs", str(tmp_path / "in"), str(frames), str(tmp_path / "l.json"),
                 "--out", str(tmp_path / "c"), "--workers", "1"]) == 0
    rejects = list(csv.DictReader((tmp_path / "c" / "rejects.csv").open()))
    got = sorted((r["name"], r["reason"]) for r in rejects)
    assert got == sorted([(str(tmp_path / "in" / "x.cif"), "no_radius"), (str(tmp_path / "in" / "x.vasp"), "no_radius"),
                          (f"{frames}[0]", "no_radius"), (f"{tmp_path / 'l.json'}[0] m1", "no_radius")])
    for r in rejects:  # the message names it the same way
        assert r["message"].startswith(r["name"] + ": "), r
    assert load_packed(tmp_path / "c").names == ["ok", "frames-1"]


def test_predict_inputs_rejects_name_the_json_row(tmp_path):
    from pymatgen.core import Structure

    from cgnn_dgl.predict import build_inputs

    s = Structure.from_str(_no_radius_poscar("Cm"), fmt="poscar")
    rows = [{"name": "m1", "lattice": s.lattice.matrix.tolist(), "numbers": [96, 17], "frac": s.frac_coords.tolist()},
            {"name": "m2", "lattice": [[1, 0], [0, 1]], "numbers": [1], "frac": [[0, 0, 0]]}]
    (tmp_path / "l.json").write_text(json.dumps(rows))
    packed, rejects = build_inputs([str(tmp_path / "l.json")])
    assert len(packed) == 0
    assert [(r.name, r.reason) for r in rejects] == [(f"{tmp_path / 'l.json'}[0] m1", "no_radius"),
                                                      (f"{tmp_path / 'l.json'}[1]", "parse_error")]


def test_overlapping_atoms_reject_and_tolerance_flag(tmp_path, capsys):
    """Issue 8.3: two sites 0.1 Å apart gave a graph with no word; now reason overlapping_atoms, and
    --overlap-tolerance changes the threshold (0 turns the check off)."""
    close = POSCAR_NACL.replace("0.5 0.5 0.5", "0.02 0.0 0.0")  # 0.1 Å from Na (|0.02 a| with a ~ 4 Å)
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "close.vasp").write_text(close)
    (tmp_path / "in" / "ok.vasp").write_text(POSCAR_NACL)
    assert main(["graphs", str(tmp_path / "in"), "--out", str(tmp_path / "c1"), "--workers", "1"]) == 0
    rejects = list(csv.DictReader((tmp_path / "c1" / "rejects.csv").open()))
    assert [(r["name"], r["reason"]) for r in rejects] == [(str(tmp_path / "in" / "close.vasp"), "overlapping_atoms")]
    assert "Å apart" in rejects[0]["message"] and "rejected: overlapping_atoms" in capsys.readouterr().out
    assert load_packed(tmp_path / "c1").names == ["ok"]
    assert main(["graphs", str(tmp_path / "in"), "--out", str(tmp_path / "c2"), "--workers", "1",
                 "--overlap-tolerance", "0"]) == 0
    assert sorted(load_packed(tmp_path / "c2").names) == ["close", "ok"]
    manifest = json.loads((tmp_path / "c2" / "manifest.json").read_text())
    assert manifest["coordinator"]["overlap_tolerance"] == 0.0


def test_multi_block_cif_gives_every_block(tmp_path):
    """Issue 8.4: a CIF with several data blocks gave its first structure only; now each structure block
    is an input, ``file.cif#block``; a block without atom sites (publication metadata) is no input."""
    from cgnn_dgl.predict import build_inputs

    ag = CIF_CU.replace("data_Cu", "data_Ag").replace("Cu", "Ag").replace("3.615", "4.086")
    bad = CIF_CU.replace("data_Cu", "data_bad") + "Cu5 Cu 0 0 0.01\n"  # 0.04 Å from Cu1
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "multi.cif").write_text("data_global\n_journal_name_full 'J'\n\n" + CIF_CU + "\n" + ag + "\n" + bad)
    (tmp_path / "in" / "single.cif").write_text("data_global\n_journal_name_full 'J'\n\n" + CIF_CU)
    assert main(["graphs", str(tmp_path / "in"), "--out", str(tmp_path / "c"), "--workers", "1"]) == 0
    packed = load_packed(tmp_path / "c")
    assert packed.names == ["multi.cif#Cu", "multi.cif#Ag", "single"]
    assert np.all(np.bincount(packed.subset([1]).bond_dst) == 12)  # fcc Ag: its own block, not Cu's
    rejects = list(csv.DictReader((tmp_path / "c" / "rejects.csv").open()))
    assert [(r["name"], r["reason"]) for r in rejects] == [(f"{tmp_path / 'in' / 'multi.cif'}#bad", "overlapping_atoms")]
    packed, rejects = build_inputs([str(tmp_path / "in")])
    assert packed.names == ["multi.cif#Cu", "multi.cif#Ag", "single"]
    assert [r.name for r in rejects] == [f"{tmp_path / 'in' / 'multi.cif'}#bad"]


def test_rerun_after_adding_a_file_says_what_to_do(tmp_path, capsys):
    """Issue 8.10: a folder that gained a file is not a resume: one clear error, then --overwrite works."""
    inputs = tmp_path / "in"
    assert main(["examples", "--out", str(inputs), "--limit", "5"]) == 0
    out = tmp_path / "c"
    assert main(["graphs", str(inputs), "--out", str(out), "--workers", "1"]) == 0
    capsys.readouterr()
    (inputs / "extra.vasp").write_text(POSCAR_NACL)
    assert main(["graphs", str(inputs), "--out", str(out), "--workers", "1"]) == 1
    res = capsys.readouterr()
    assert "resuming" not in res.out
    assert "built from 5 structures" in res.err and "hold 6 now" in res.err and "--overwrite" in res.err
    assert res.err.count("\n") == 1
    assert main(["graphs", str(inputs), "--out", str(out), "--workers", "1", "--overwrite"]) == 0
    assert len(load_packed(out).names) == 6
    # another folder altogether names both
    other = tmp_path / "other"
    other.mkdir()
    (other / "nacl.vasp").write_text(POSCAR_NACL)
    capsys.readouterr()
    assert main(["graphs", str(other), "--out", str(out), "--workers", "1"]) == 1
    err = capsys.readouterr().err
    assert f"built from 6 structures of {inputs.resolve()}, not from 1 structure of {other.resolve()}" in err
