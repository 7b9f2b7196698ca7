"""Labelled readers: every input format on real structures, every bad-row kind, and one cache from all.

The structures are real: rows of the reference coordinator corpus (whose neighbour lists are the
reference's, an oracle independent of this code) and rows of the Perov-5 CSV (CIF text as shipped).
The files in each format are written here with pymatgen and ase directly, not with the code under test.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cgnn_dgl.cache import CacheWriter, load_packed
from cgnn_dgl.coordinator import DEFAULT_PARAMS
from cgnn_dgl.errors import UsageError
from cgnn_dgl.pipeline import build_cache, build_chunk
from cgnn_dgl.readers import ReadOptions, input_kind, parse_label, read_inputs

NAMES = ("heat_all", "dir_gap")
OPTS = ReadOptions(targets=NAMES)


# --------------------------------------------------------------------------------------------------
# the structures, and writers of every format (pymatgen / ase only)


def _perov_rows(shared, n):
    csv.field_size_limit(2**31 - 1)
    with open(shared / "data" / "perov5" / "train.csv", newline="") as fh:
        reader = csv.DictReader(fh)
        return [next(reader) for _ in range(n)]


@pytest.fixture(scope="module")
def structures(dev_corpus, shared):
    """[(id, pymatgen Structure, {label: value or None}, reference neighbours or None)]: four corpus
    rows (one without dir_gap) and three Perov-5 rows with their own labels."""
    from pymatgen.core import Lattice, Structure
    from pymatgen.io.cif import CifParser

    good = [r for r in dev_corpus if r["error"] is None][:4]
    out = []
    for k, r in enumerate(good):
        s = Structure(Lattice(r["lattice"]), [int(z) for z in r["numbers"]], r["frac"])
        out.append((r["name"], s, {"heat_all": -0.25 * k, "dir_gap": None if k == 1 else 0.5 + k}, r["neighbors"]))
    for row in _perov_rows(shared, 3):
        s = CifParser.from_str(row["cif"]).parse_structures(primitive=False)[0]
        out.append((row["material_id"], s, {"heat_all": float(row["heat_all"]), "dir_gap": float(row["dir_gap"])}, None))
    return out


def _cif(s) -> str:
    from pymatgen.io.cif import CifWriter

    return str(CifWriter(s))


def _poscar(s) -> str:
    from pymatgen.io.vasp import Poscar

    return Poscar(s).get_str(significant_figures=12)


def _atoms(s, ident, labels):
    from pymatgen.io.ase import AseAtomsAdaptor

    atoms = AseAtomsAdaptor.get_atoms(s)
    atoms.info = {"material_id": ident, **{k: v for k, v in labels.items() if v is not None}}
    return atoms


def _cell(v):
    return "" if v is None else repr(v)


def write_id_prop(folder: Path, structs, header=True) -> Path:
    folder.mkdir(parents=True)
    lines = ["id,heat_all,dir_gap"] if header else []
    for k, (ident, s, labels, _) in enumerate(structs):
        if k % 2:
            (folder / f"{ident}.vasp").write_text(_poscar(s))
        else:
            (folder / f"{ident}.cif").write_text(_cif(s))
        lines.append(f"{ident},{_cell(labels['heat_all'])},{_cell(labels['dir_gap'])}")
    (folder / "id_prop.csv").write_text("\n".join(lines) + "\n")
    return folder


def write_csv(path: Path, structs, *, delimiter=",", paths_in: Path | None = None) -> Path:
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh, delimiter=delimiter, lineterminator="\n")
        w.writerow(["material_id", "cif", "heat_all", "dir_gap"])
        for ident, s, labels, _ in structs:
            cell = _cif(s)
            if paths_in is not None:  # a relative path to a POSCAR file instead of the text
                (paths_in / f"POSCAR_{ident}").write_text(_poscar(s))
                cell = f"{paths_in.name}/POSCAR_{ident}"
            w.writerow([ident, cell, _cell(labels["heat_all"]), _cell(labels["dir_gap"])])
    return path


def write_extxyz(path: Path, structs) -> Path:
    import ase.io

    ase.io.write(str(path), [_atoms(s, i, lab) for i, s, lab, _ in structs], format="extxyz")
    return path


def write_db(path: Path, structs) -> Path:
    import ase.db

    with ase.db.connect(str(path)) as db:
        for ident, s, labels, _ in structs:
            atoms = _atoms(s, ident, labels)
            kv = dict(atoms.info)  # ase refuses a numeric string as a value: the id goes in as a number
            kv["material_id"] = int(ident) if ident.isdigit() else ident
            db.write(atoms, key_value_pairs=kv)
    return path


def write_pymatgen_json(path: Path, structs) -> Path:
    rows = []
    for ident, s, labels, _ in structs:
        s = s.copy()
        s.properties = {"material_id": ident, **labels}
        rows.append(s.as_dict())
    path.write_text(json.dumps(rows))
    return path


def write_records_json(path: Path, structs) -> Path:
    rows = [{"name": i, "lattice": s.lattice.matrix.tolist(), "numbers": [site.specie.Z for site in s],
             "frac": s.frac_coords.tolist(), "targets": labels} for i, s, labels, _ in structs]
    path.write_text(json.dumps(rows))
    return path


# --------------------------------------------------------------------------------------------------
# helpers


def built_and_rejected(items, names=NAMES):
    """Build a chunk in memory: ({name: Built}, {name: reason}); no cache, so no shard can be empty."""
    out = build_chunk(items, DEFAULT_PARAMS, names)
    built = {b.name: b for b in out if hasattr(b, "numbers")}
    rejected = {r.name: r.reason for r in out if not hasattr(r, "numbers")}
    return built, rejected


def cache_content(root):
    """Everything a cache says about its graphs, keyed by name: numbers, sorted neighbour lists, labels."""
    p = load_packed(root)
    out = {}
    for k, name in enumerate(p.names):
        one = p.subset([k])
        nbr = tuple(tuple(sorted(one.bond_src[one.bond_dst == j].tolist())) for j in range(len(one.numbers)))
        labels = tuple(float(y) if m else None for y, m in zip(p.y[k], p.y_mask[k]))
        out[name] = (tuple(one.numbers.tolist()), nbr, labels)
    return p.targets, out


def build(tmp_path, name, inputs, opts=OPTS):
    items = read_inputs([str(i) for i in inputs], opts)
    writer = CacheWriter(tmp_path / name, source={"kind": "test", "name": name}, params=DEFAULT_PARAMS,
                         targets=opts.names)
    build_cache(items, writer)
    return tmp_path / name


# --------------------------------------------------------------------------------------------------
# the same structures in every format give the same cache


def test_every_format_gives_the_same_cache(tmp_path, structures):
    (tmp_path / "poscars").mkdir()
    inputs = {
        "id_prop": [write_id_prop(tmp_path / "cgcnn", structures)],
        "id_prop_no_header": [write_id_prop(tmp_path / "cgcnn_nh", structures, header=False)],
        "csv_text": [write_csv(tmp_path / "data.csv", structures)],
        "tsv_paths": [write_csv(tmp_path / "data.tsv", structures, delimiter="\t", paths_in=tmp_path / "poscars")],
        "extxyz": [write_extxyz(tmp_path / "data.extxyz", structures)],
        "ase_db": [write_db(tmp_path / "data.db", structures)],
        "pymatgen_json": [write_pymatgen_json(tmp_path / "pmg.json", structures)],
        "records_json": [write_records_json(tmp_path / "records.json", structures)],
    }
    caches = {}
    for kind, paths in inputs.items():
        id_column = None if kind.startswith(("id_prop", "records")) else "material_id"
        root = build(tmp_path, kind, paths, ReadOptions(targets=NAMES, id_column=id_column))
        caches[kind] = cache_content(root)
        assert not (root / "rejects.csv").read_text().strip().splitlines()[1:], kind
    ids = [s[0] for s in structures]
    # formats that keep the atoms in the file's order give identical arrays; pymatgen's CIF parser groups
    # the sites by element, so a CIF-fed cache holds the same graphs up to that renumbering of the atoms
    ref_targets, ref = caches["records_json"]
    assert ref_targets == NAMES
    assert sorted(ref) == sorted(ids)
    for ident, _, labels, neighbors in structures:
        assert ref[ident][2] == tuple(labels[n] for n in NAMES)  # the labels given; None = unlabelled
        if neighbors is not None:  # the reference coordinator's own neighbour lists
            assert ref[ident][1] == tuple(tuple(sorted(n)) for n in neighbors), ident
    for kind in ("extxyz", "ase_db", "pymatgen_json"):
        assert caches[kind] == caches["records_json"], kind
    for kind in ("id_prop", "id_prop_no_header", "csv_text", "tsv_paths"):
        targets, content = caches[kind]
        assert targets == NAMES and sorted(content) == sorted(ref), kind
        for ident, (numbers, nbr, labels) in content.items():
            assert labels == ref[ident][2], (kind, ident)
            assert _same_graph(numbers, nbr, *ref[ident][:2]), (kind, ident)


def _graph(numbers, nbr):
    import networkx as nx

    g = nx.MultiDiGraph()
    g.add_nodes_from((j, {"z": z}) for j, z in enumerate(numbers))
    g.add_edges_from((i, j) for j, srcs in enumerate(nbr) for i in srcs)
    return g


def _same_graph(numbers_a, nbr_a, numbers_b, nbr_b) -> bool:
    """The two crystal graphs are the same up to a renumbering of atoms that keeps the elements."""
    import networkx as nx

    return nx.is_isomorphic(_graph(numbers_a, nbr_a), _graph(numbers_b, nbr_b), node_match=lambda a, b: a["z"] == b["z"])


def test_kind_by_path(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "id_prop.csv").write_text("a,1\n")
    for name in ("x.csv", "x.tsv", "x.extxyz", "x.xyz", "x.db", "x.json", "x.cif", "POSCAR"):
        (tmp_path / name).write_text("")
    kinds = {n: input_kind(tmp_path / n) for n in ("d", "e", "x.csv", "x.tsv", "x.extxyz", "x.xyz", "x.db", "x.json",
                                                   "x.cif", "POSCAR")}
    assert kinds == {"d": "folder", "e": "id_prop", "x.csv": "table", "x.tsv": "table", "x.extxyz": "extxyz",
                     "x.xyz": "extxyz", "x.db": "ase_db", "x.json": "json", "x.cif": "structure",
                     "POSCAR": "structure"}


@pytest.mark.parametrize(("raw", "value"), [("1.5", 1.5), (" -2e-3 ", -0.002), (3, 3.0), (True, 1.0), ("", None),
                                            ("NaN", None), ("nan", None), ("NA", None), (None, None),
                                            (float("nan"), None)])
def test_parse_label(raw, value):
    assert parse_label(raw) == value


@pytest.mark.parametrize("raw", ["abc", "1,5", "inf", [1.0], {"a": 1}])
def test_parse_label_refuses_non_numbers(raw):
    with pytest.raises((TypeError, ValueError)):
        parse_label(raw)


# --------------------------------------------------------------------------------------------------
# bad rows, format by format: listed by id and reason, the others still built


def test_id_prop_bad_rows(tmp_path, structures):
    folder = write_id_prop(tmp_path / "cgcnn", structures[:3])
    a, b, c = (s[0] for s in structures[:3])
    with open(folder / "id_prop.csv", "a") as fh:
        fh.write("missing-one,1.0,2.0\n")  # no structure file
        fh.write(f"{a},9.0,9.0\n")  # repeated id
    text = (folder / "id_prop.csv").read_text().replace(f"{c},-0.5,2.5", f"{c},abc,2.5")
    (folder / "id_prop.csv").write_text(text)
    built, rejected = built_and_rejected(read_inputs([folder], OPTS))
    assert set(built) == {a, b}
    assert rejected == {"missing-one": "missing_file", a: "duplicate_id", c: "bad_label"}
    assert built[a].y.tolist() == [0.0, 0.5]  # the first row of a repeated id is kept, not the repeat
    assert built[b].y_mask.tolist() == [True, False]  # an empty cell is unlabelled, not a reject


def test_id_prop_without_header(tmp_path, structures):
    folder = write_id_prop(tmp_path / "cgcnn", structures[:2], header=False)
    with open(folder / "id_prop.csv", "a") as fh:
        fh.write(f"{structures[0][0]}x,1.0,2.0,3.0\n")  # a third value --targets does not name
    (folder / f"{structures[0][0]}x.cif").write_text(_cif(structures[0][1]))
    built, rejected = built_and_rejected(read_inputs([folder], OPTS))
    assert set(built) == {structures[0][0], structures[1][0]}
    assert rejected == {f"{structures[0][0]}x": "unknown_column"}
    # one name for two value columns: every row has a value no name covers
    _, rejected = built_and_rejected(read_inputs([folder], ReadOptions(targets=("heat_all",))))
    assert set(rejected.values()) == {"unknown_column"}
    with pytest.raises(UsageError, match="no header"):
        read_inputs([folder], ReadOptions())


def test_id_prop_header_without_targets(tmp_path, structures):
    folder = write_id_prop(tmp_path / "cgcnn", structures[:2])
    with pytest.raises(UsageError, match="name the label columns with --targets"):  # heat_all is no OQMD name
        read_inputs([folder], ReadOptions())
    text = (folder / "id_prop.csv").read_text().replace("id,heat_all,dir_gap", "id,band_gap,formation_energy")
    (folder / "id_prop.csv").write_text(text)
    built, _ = built_and_rejected(read_inputs([folder], ReadOptions()), ("formation_energy", "volume_per_atom",
                                                                         "band_gap", "magnetization"))
    assert built[structures[0][0]].y.tolist() == [0.5, 0.0, 0.0, 0.0]  # OQMD names: read into the four
    assert built[structures[0][0]].y_mask.tolist() == [True, False, True, False]


def test_id_prop_header_lacking_a_target_rejects_its_rows(tmp_path, structures):
    folder = write_id_prop(tmp_path / "cgcnn", structures[:2])
    built, rejected = built_and_rejected(read_inputs([folder], ReadOptions(targets=("heat_all", "bulk_modulus"))),
                                         ("heat_all", "bulk_modulus"))
    assert not built
    assert rejected == {structures[0][0]: "unknown_column", structures[1][0]: "unknown_column"}
    items = read_inputs([folder], ReadOptions(targets=("heat_all", "bulk_modulus")))
    with pytest.raises(ValueError, match="no column bulk_modulus"):
        items[0].source.validate()


def test_csv_bad_rows_and_usage_errors(tmp_path, structures):
    path = write_csv(tmp_path / "data.csv", structures[:3])
    ids = [s[0] for s in structures[:3]]
    with open(path, "a", newline="") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(["gone", "nowhere/POSCAR_gone", "1.0", "2.0"])  # a path to no file
        w.writerow(["empty", "", "1.0", "2.0"])
        w.writerow([ids[1], _cif(structures[1][1]), "1.0", "2.0"])  # repeated id
        w.writerow(["worded", _cif(structures[2][1]), "1.0", "two"])
        w.writerow(["garbled", "data_x\n_cell_length_a 3\nnot a cif\n", "1.0", "NaN"])
        w.writerow(["unlabelled", _poscar(structures[0][1]), "NaN", ""])  # POSCAR text, no labels: kept, masked
        w.writerow(["", _cif(structures[0][1]), "1.0", "2.0"])  # no id where --id-column points
    opts = ReadOptions(targets=NAMES, id_column="material_id", structure_column="cif")
    built, rejected = built_and_rejected(read_inputs([path], opts))
    assert set(built) == {*ids, "unlabelled"}
    assert built["unlabelled"].y_mask.tolist() == [False, False]
    assert rejected == {"gone": "missing_file", "empty": "missing_structure", ids[1]: "duplicate_id",
                        "worded": "bad_label", "garbled": "parse_error", "data-9": "missing_id"}
    with pytest.raises(UsageError, match="no column 'structure' for --structure-column"):
        read_inputs([path], ReadOptions(targets=NAMES, structure_column="structure"))
    with pytest.raises(UsageError, match="no column 'mp_id' for --id-column"):
        read_inputs([path], ReadOptions(targets=NAMES, id_column="mp_id"))
    # a --targets column the table lacks: the whole table's rows are listed (per input, not per row)
    items = read_inputs([path], ReadOptions(targets=("heat_all", "bulk"), id_column="material_id"))
    reasons = [r.reason for r in build_chunk(items, DEFAULT_PARAMS, ("heat_all", "bulk"))]
    assert reasons == ["unknown_column"] * 5 + ["duplicate_id"] + ["unknown_column"] * 3 + ["missing_id"]


def test_csv_of_real_perov5_rows(tmp_path, shared):
    """The shipped Perov-5 CSV layout (unnamed index column, CIF text, several label columns)."""
    rows = _perov_rows(shared, 6)
    src = shared / "data" / "perov5" / "train.csv"
    csv.field_size_limit(2**31 - 1)
    with open(src, newline="") as fh, open(tmp_path / "perov.csv", "w", newline="") as out:
        reader, writer = csv.reader(fh), csv.writer(out, lineterminator="\n")
        for _ in range(7):
            writer.writerow(next(reader))
    items = read_inputs([tmp_path / "perov.csv"], ReadOptions(targets=("heat_all", "dir_gap"), id_column="material_id"))
    built, rejected = built_and_rejected(items)
    assert not rejected
    assert list(built) == [r["material_id"] for r in rows]
    for r in rows:
        b = built[r["material_id"]]
        assert b.y.tolist() == [float(r["heat_all"]), float(r["dir_gap"])]
        assert len(b.numbers) == 5  # ABX3 perovskites, one formula unit


def test_extxyz_bad_rows(tmp_path, structures):
    import ase.io
    from ase import Atoms

    frames = [_atoms(s, i, lab) for i, s, lab, _ in structures[:3]]
    frames[1].info["dir_gap"] = "wide"  # a word where a number belongs
    frames.append(_atoms(structures[0][1], structures[0][0], {"heat_all": 1.0}))  # repeated id
    frames.append(Atoms("H2", positions=[[0, 0, 0], [0, 0, 0.74]], info={"material_id": "h2-molecule"}))
    no_id = _atoms(structures[2][1], "x", {"heat_all": 1.0})
    del no_id.info["material_id"]
    frames.append(no_id)
    ase.io.write(str(tmp_path / "d.extxyz"), frames, format="extxyz")
    built, rejected = built_and_rejected(read_inputs([tmp_path / "d.extxyz"], ReadOptions(targets=NAMES, id_column="material_id")))
    ids = [s[0] for s in structures[:3]]
    assert set(built) == {ids[0], ids[2]}
    assert rejected == {ids[1]: "bad_label", ids[0]: "duplicate_id", "h2-molecule": "not_periodic", "d-5": "missing_id"}
    # without --id-column, frames are named <stem>-<index>
    built, _ = built_and_rejected(read_inputs([tmp_path / "d.extxyz"], OPTS))
    assert {"d-0", "d-2", "d-5"} <= set(built)


def test_extxyz_energy_label_moved_to_a_calculator_is_still_read(tmp_path, structures):
    import ase.io

    atoms = _atoms(structures[0][1], "e1", {})
    atoms.info["energy"] = -3.5  # ase reads this key into a SinglePointCalculator, not info
    ase.io.write(str(tmp_path / "e.extxyz"), [atoms], format="extxyz")
    assert "energy" not in ase.io.read(str(tmp_path / "e.extxyz")).info
    built, _ = built_and_rejected(read_inputs([tmp_path / "e.extxyz"], ReadOptions(targets=("energy",))), ("energy",))
    assert built["e-0"].y.tolist() == [-3.5]


def test_ase_db_rows(tmp_path, structures):
    import ase.db

    path = write_db(tmp_path / "d.db", structures[:3])
    with ase.db.connect(str(path)) as db:
        db.write(_atoms(structures[0][1], "x", {}), key_value_pairs={"material_id": structures[0][0], "heat_all": 1.0})
        db.write(_atoms(structures[1][1], "x", {}), key_value_pairs={"material_id": "worded", "heat_all": "high"})
    built, rejected = built_and_rejected(read_inputs([path], ReadOptions(targets=NAMES, id_column="material_id")))
    ids = [s[0] for s in structures[:3]]
    assert set(built) == set(ids)
    assert rejected == {ids[0]: "duplicate_id", "worded": "bad_label"}
    assert built[ids[1]].y_mask.tolist() == [True, False]  # no dir_gap key: unlabelled
    built, _ = built_and_rejected(read_inputs([path], OPTS))  # without --id-column: the row ids
    assert set(built) == {"1", "2", "3", "4"}
    from ase.calculators.singlepoint import SinglePointCalculator

    atoms = _atoms(structures[0][1], "x", {})
    atoms.calc = SinglePointCalculator(atoms, energy=-7.25)  # a stored property, not a key-value pair
    with ase.db.connect(str(tmp_path / "e.db")) as db:
        db.write(atoms)
    built, _ = built_and_rejected(read_inputs([tmp_path / "e.db"], ReadOptions(targets=("energy",))), ("energy",))
    assert built["1"].y.tolist() == [-7.25]


def test_unreadable_files_are_one_reject_each_and_the_run_goes_on(tmp_path, structures):
    import sqlite3

    con = sqlite3.connect(tmp_path / "other.db")
    con.execute("create table t (x int)")
    con.commit()
    con.close()
    before = (tmp_path / "other.db").read_bytes()
    (tmp_path / "text.db").write_text("not sqlite at all")
    (tmp_path / "bad.extxyz").write_text("2\nLattice=\"1 0 0\" nonsense\nH 0 0\n")
    (tmp_path / "bad.json").write_text("{not json")
    (tmp_path / "dict.json").write_text(json.dumps({"a": 1}))
    good = write_records_json(tmp_path / "good.json", structures[:1])
    names = ["other.db", "text.db", "bad.extxyz", "bad.json", "dict.json"]
    out = build_chunk(read_inputs([tmp_path / n for n in names] + [good], OPTS), DEFAULT_PARAMS, NAMES)
    assert [(r.name, r.reason) for r in out[:-1]] == [(str(tmp_path / n), "parse_error") for n in names]
    assert "cannot read as an ASE database" in out[0].message and "cannot read as an ASE database" in out[1].message
    assert "cannot read as extended XYZ" in out[2].message and "cannot read JSON" in out[3].message
    assert "expected a pymatgen Structure" in out[4].message
    assert out[-1].name == structures[0][0] and hasattr(out[-1], "numbers")
    assert (tmp_path / "other.db").read_bytes() == before  # the user's file is left as it was


def test_pymatgen_json_alone_and_in_a_list(tmp_path, structures):
    _, s, labels, _ = structures[0]
    one = s.copy()
    one.properties = dict(labels)
    (tmp_path / "one.json").write_text(json.dumps(one.as_dict()))
    built, rejected = built_and_rejected(read_inputs([tmp_path / "one.json"], OPTS))
    assert not rejected and list(built) == ["one"]  # alone: named by the file stem
    assert built["one"].y.tolist() == [0.0, 0.5]
    # no --targets: the OQMD four, unlabelled, as any plain structure
    built, _ = built_and_rejected(read_inputs([tmp_path / "one.json"]), ("formation_energy", "volume_per_atom",
                                                                           "band_gap", "magnetization"))
    assert not built["one"].y_mask.any()
    path = write_pymatgen_json(tmp_path / "many.json", structures[:2])
    rows = json.loads(path.read_text())
    rows.append({"@module": "pymatgen.core.structure", "lattice": {"matrix": "junk"}, "sites": []})
    rows.append(rows[0])
    path.write_text(json.dumps(rows))
    built, rejected = built_and_rejected(read_inputs([path], ReadOptions(targets=NAMES, id_column="material_id")))
    assert set(built) == {structures[0][0], structures[1][0]}
    assert rejected == {"many-2": "missing_id", structures[0][0]: "duplicate_id"}


def test_json_records_keep_their_targets(tmp_path, structures):
    path = write_records_json(tmp_path / "r.json", structures[:2])
    built, _ = built_and_rejected(read_inputs([path], OPTS))
    assert built[structures[0][0]].y.tolist() == [0.0, 0.5]
    assert built[structures[1][0]].y_mask.tolist() == [True, False]
    rows = json.loads(path.read_text())
    rows[0]["targets"] = [1.0, None]  # a list: in --targets order
    rows[1]["targets"] = {"heat_all": "n/a", "dir_gap": 2.0}
    path.write_text(json.dumps(rows))
    built, _ = built_and_rejected(read_inputs([path], OPTS))
    assert built[structures[0][0]].y.tolist() == [1.0, 0.0] and built[structures[0][0]].y_mask.tolist() == [True, False]
    assert built[structures[1][0]].y_mask.tolist() == [False, True]
    # without --targets the cache holds the OQMD four: a label under another name is named, not dropped,
    # and a list of two labels cannot be the four
    out = build_chunk(read_inputs([path]), DEFAULT_PARAMS, ("formation_energy", "volume_per_atom", "band_gap",
                                                             "magnetization"))
    assert [r.reason for r in out] == ["unknown_column", "unknown_column"]
    # named by the id (or, where BuildItem has a display name, by "r.json[k] id", as plain JSON rows are)
    assert out[0].name.endswith(structures[0][0]) and out[1].name.endswith(structures[1][0])
    assert "2 targets for the 4 names" in out[0].message and "label heat_all, dir_gap" in out[1].message


def test_plain_json_lists_still_allow_repeated_names(tmp_path, dev_corpus):
    rows = [r for r in dev_corpus if r["error"] is None][:2]
    (tmp_path / "l.json").write_text(json.dumps(rows * 2))
    items = read_inputs([tmp_path / "l.json"])
    built = build_chunk(items, DEFAULT_PARAMS, ("formation_energy", "volume_per_atom", "band_gap", "magnetization"))
    assert [b.name for b in built] == [r["name"] for r in rows * 2]
    assert all(hasattr(b, "numbers") for b in built)


def test_prediction_inputs_are_named_by_their_ids(tmp_path, structures):
    """`cgnn predict` reads the same formats (structures and ids only: no --targets, labels ignored)."""
    from cgnn_dgl.predict import build_inputs

    folder = write_id_prop(tmp_path / "cgcnn_nh", structures[:2], header=False)  # headerless: no names needed
    with open(folder / "id_prop.csv", "a") as fh:
        fh.write("absent,1.0,2.0\n")
    db = write_db(tmp_path / "d.db", structures[2:4])
    packed, rejects = build_inputs([folder, db])
    assert packed.names == [structures[0][0], structures[1][0], "1", "2"]
    assert [(r.name, r.reason) for r in rejects] == [("absent", "missing_file")]
    assert sorted(r.key for r in rejects) + list(packed.entry_id) == [2, 0, 1, 3, 4]


_label = st.one_of(st.none(), st.just(float("nan")), st.floats(allow_nan=False, allow_infinity=False, width=64))


@given(st.lists(st.tuples(_label, _label), min_size=1, max_size=8), st.sampled_from([",", ";", "\t"]))
def test_labels_survive_a_table_round_trip(labels, delimiter):
    """Any finite float comes back exactly; None and NaN come back as unlabelled; rows stay in order."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "POSCAR_x").write_text(POSCAR)
        with open(tmp / "t.txt.csv", "w", newline="") as fh:
            w = csv.writer(fh, delimiter=delimiter, lineterminator="\n")
            w.writerow(["id", "path", "a", "b"])
            w.writerows([f"s{k}", "POSCAR_x", "" if x is None else repr(x), "" if y is None else repr(y)]
                        for k, (x, y) in enumerate(labels))
        items = read_inputs([tmp / "t.txt.csv"], ReadOptions(targets=("a", "b"), delimiter=delimiter))
    assert [it.source.name for it in items] == [f"s{k}" for k in range(len(labels))]
    for it, pair in zip(items, labels):
        want = {n: (None if v is None or v != v else v) for n, v in zip("ab", pair)}
        assert it.targets == want


POSCAR = """NaCl
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
