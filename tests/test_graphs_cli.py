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
