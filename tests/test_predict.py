"""`cgnn predict`: reference-checkpoint parity, trained checkpoints, bad inputs, weights_only loading."""
from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from test_train import tiny_config, usable_rows, write_cache

REPO = Path(__file__).resolve().parents[1]


def _cli(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "cgnn_dgl.cli", *args], capture_output=True, text=True, cwd=REPO,
                          timeout=timeout)


def _read(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _align(rows, corpus):
    """Pair output rows (input order, rejects left out) with corpus entries; names may repeat."""
    j = 0
    for r in rows:
        while corpus[j]["name"] != r["name"]:
            j += 1
        yield r, j, corpus[j]
        j += 1


def _same_graph(entry) -> bool:
    from cgnn_dgl.coordinator import DEFAULT_PARAMS, coordinate_csr
    from cgnn_dgl.structures import Crystal

    c = Crystal(entry["name"], entry["lattice"], entry["numbers"], entry["frac"])
    counts, nbr = coordinate_csr(c, DEFAULT_PARAMS)
    ptr = np.concatenate([[0], np.cumsum(counts)])
    mine = [sorted(nbr[ptr[i]:ptr[i + 1]].tolist()) for i in range(len(counts))]
    return mine == [sorted(n) for n in entry["neighbors"]]


def test_reference_checkpoint_parity_cli(shared, dev_corpus, tmp_path):
    """Acceptance: `cgnn predict --arch benchmark` reproduces benchmark_prediction to 1e-5 eV/atom on every
    structure (reference weights select the reference's KMeans pruning, so the graphs are the reference's)."""
    out = tmp_path / "p.csv"
    r = _cli("predict", "--model", str(shared / "reference" / "cgnn_oqmd_fe_benchmark.pth"), "--arch", "benchmark",
             str(shared / "reference" / "coordinator_dev.json"), "--out", str(out), "--workers", "2")
    assert r.returncode == 0, r.stderr[-2000:]
    rows = _read(out)
    with_ref = [e for e in dev_corpus if e["benchmark_prediction"] is not None]
    n_match, graph_diff = 0, []
    for row, j, entry in _align(rows, dev_corpus):
        ref = entry["benchmark_prediction"]
        if ref is None:
            continue
        d = abs(float(row["formation_energy"]) - ref)
        if d <= 1e-5:
            n_match += 1
        else:
            assert not _same_graph(entry), f"{j} {entry['name']}: same graph but |Δ| = {d:.3g} eV/atom"
            graph_diff.append(entry["name"])
    print(f"\nreference parity: {n_match} of {len(with_ref)} structures with a benchmark_prediction within 1e-5 eV/atom;"
          f" {len(graph_diff)} differ because the coordinator's graph differs: {graph_diff}")
    predicted = sum(1 for row, _, e in _align(rows, dev_corpus) if e["benchmark_prediction"] is not None)
    assert predicted == len(with_ref)  # every structure with a reference value got a prediction
    assert graph_diff == [] and n_match == len(with_ref)
    rejects = _read(tmp_path / "p.rejects.csv")
    assert {x["reason"] for x in rejects} <= {"unsupported_element", "no_radius"}


def test_reference_weights_on_reference_graphs(shared, dev_corpus):
    """Model-only parity: with the reference's own neighbour lists every prediction matches to 1e-5."""
    from cgnn_dgl.batching import PackedGraphs
    from cgnn_dgl.cache import Built
    from cgnn_dgl.predict import load_model, predict_packed

    model, _ = load_model(shared / "reference" / "cgnn_oqmd_fe_benchmark.pth", arch="benchmark")
    rows = [e for e in dev_corpus if e["benchmark_prediction"] is not None]
    built = []
    for k, e in enumerate(rows):
        counts = np.array([len(n) for n in e["neighbors"]], np.int64)
        nbr = np.array([i for n in e["neighbors"] for i in n], np.int64)
        built.append(Built(k, e["name"], np.asarray(e["numbers"]), counts, nbr, np.zeros(4), np.zeros(4, bool)))
    pred, prob = predict_packed(model, PackedGraphs.from_built(built), batch_size=512)
    ref = np.array([e["benchmark_prediction"] for e in rows])
    assert prob is None
    assert np.abs(pred[:, 0] - ref).max() <= 1e-5


def test_plain_state_dict_needs_arch(shared, tmp_path):
    r = _cli("predict", "--model", str(shared / "reference" / "cgnn_oqmd_fe_benchmark.pth"),
             str(shared / "reference" / "coordinator_dev.json"), "--out", str(tmp_path / "p.csv"))
    assert r.returncode == 2 and "--arch" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_checkpoint_with_pickled_objects_is_refused(tmp_path):
    import fractions

    from cgnn_dgl.errors import CgnnError
    from cgnn_dgl.predict import load_model

    torch.save({"format": "cgnn-dgl-checkpoint", "x": fractions.Fraction(1, 3)}, tmp_path / "evil.pt")
    with pytest.raises(CgnnError, match="cannot load checkpoint"):
        load_model(tmp_path / "evil.pt")


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, dev_corpus):
    from cgnn_dgl.train import train_run

    root = tmp_path_factory.mktemp("predict")
    rows = usable_rows(dev_corpus, 200, sources=("perov_val",))
    cache = write_cache(root / "cache", rows, seed=1)
    cfg = tiny_config(cache, root / "run", epochs=2)
    cfg.model = cfg.model.replace(classification_heads=True)
    train_run(cfg, root / "run")
    return root, rows


def test_predict_trained_checkpoint_files_and_bad_inputs(trained_run, tmp_path):
    from pymatgen.core import Lattice, Structure

    root, rows = trained_run
    folder = tmp_path / "inputs"
    (folder / "sub").mkdir(parents=True)
    s = Structure(Lattice(rows[0]["lattice"]), rows[0]["numbers"], rows[0]["frac"])
    s.to(filename=str(folder / "good.cif"))
    s.to(filename=str(folder / "sub" / "POSCAR"), fmt="poscar")
    (folder / "broken.cif").write_text("data_x\n_cell_length_a nonsense\n")
    po = Structure(Lattice.cubic(3.35), ["Po"], [[0, 0, 0]])
    po.to(filename=str(folder / "polonium.cif"))
    json_in = tmp_path / "list.json"
    json_in.write_text(json.dumps([{k: rows[1][k] for k in ("name", "lattice", "numbers", "frac")},
                                   {"name": "nolattice", "numbers": [1]}]))
    out = tmp_path / "preds.csv"
    r = _cli("predict", "--model", str(root / "run" / "best.pt"), str(folder), str(json_in),
             str(tmp_path / "missing.cif"), "--out", str(out), "--batch-size", "2")
    assert r.returncode == 0, r.stderr
    got = _read(out)
    assert list(got[0].keys()) == ["name", "formation_energy", "volume_per_atom", "band_gap", "magnetization",
                                   "p_insulator", "p_magnetic"]
    assert len(got) == 3  # good.cif, POSCAR, one JSON row
    preds = np.array([[float(v) for k, v in row.items() if k != "name"] for row in got])
    assert np.isfinite(preds).all() and ((preds[:, -2:] >= 0) & (preds[:, -2:] <= 1)).all()
    # the same crystal read from CIF and POSCAR gives the same prediction
    assert np.allclose(preds[0], preds[1], atol=1e-6)
    reasons = {x["name"]: x["reason"] for x in _read(tmp_path / "preds.rejects.csv")}
    assert reasons[str(tmp_path / "missing.cif")] == "not_found"
    assert any(v == "unsupported_element" for v in reasons.values())
    assert any(v == "parse_error" for v in reasons.values())
    assert len(reasons) == 4, reasons
    assert "rejected" in r.stderr


def test_predict_table_id_and_structure_columns(trained_run, tmp_path):
    """A CSV of the user's own: --id-column names the output rows, --structure-column picks the CIF
    column; the same crystals predicted from CIF files give the same numbers; a wrong column is a
    one-line usage error (exit 2)."""
    import csv

    from pymatgen.core import Lattice, Structure

    root, rows = trained_run
    table = tmp_path / "mine.csv"
    with open(table, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["idx", "code", "crystal"])
        for k, r in enumerate(rows[:3]):
            s = Structure(Lattice(r["lattice"]), r["numbers"], r["frac"])
            w.writerow([k, f"mat-{k}", s.to(fmt="cif")])
            s.to(filename=str(tmp_path / f"mat-{k}.cif"))
    model = str(root / "run" / "best.pt")
    r = _cli("predict", "--model", model, str(table), "--id-column", "code", "--structure-column", "crystal",
             "--out", str(tmp_path / "t.csv"))
    assert r.returncode == 0, r.stderr
    got = _read(tmp_path / "t.csv")
    assert [g["name"] for g in got] == ["mat-0", "mat-1", "mat-2"]
    r = _cli("predict", "--model", model, *[str(tmp_path / f"mat-{k}.cif") for k in range(3)], "--out", str(tmp_path / "f.csv"))
    assert r.returncode == 0, r.stderr
    for a, b in zip(got, _read(tmp_path / "f.csv")):
        assert float(a["formation_energy"]) == pytest.approx(float(b["formation_energy"]), abs=1e-6)
    r = _cli("predict", "--model", model, str(table), "--id-column", "nope", "--structure-column", "crystal",
             "--out", str(tmp_path / "x.csv"))
    assert r.returncode == 2 and "no column 'nope' for --id-column" in r.stderr


def test_predict_out_folder_and_unwritable_out_up_front(trained_run, tmp_path):
    """Issue 8, defect 9: --out EXISTING_DIR writes DIR/predictions.csv; an --out that cannot be written is
    a one-line error before the model is even loaded (here the model path is missing too)."""
    root, rows = trained_run
    js = tmp_path / "list.json"
    js.write_text(json.dumps([{k: rows[0][k] for k in ("name", "lattice", "numbers", "frac")}]))
    (tmp_path / "outdir").mkdir()
    r = _cli("predict", "--model", str(root / "run" / "best.pt"), str(js), "--out", str(tmp_path / "outdir"))
    assert r.returncode == 0, r.stderr
    assert len(_read(tmp_path / "outdir" / "predictions.csv")) == 1
    (tmp_path / "afile").write_text("x")
    r = _cli("predict", "--model", str(tmp_path / "missing.pt"), str(js), "--out", str(tmp_path / "afile" / "p.csv"))
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "cannot write --out" in r.stderr, r.stderr


def test_predict_matches_evaluate(trained_run, tmp_path):
    """predict (CIF -> coordinator graph) agrees with evaluate (cached graph) where the graphs agree, and
    both are in physical units."""
    from cgnn_dgl.evaluate import evaluate_run

    root, rows = trained_run
    evaluate_run(root / "run", split="test", out=str(tmp_path / "ev"), plots=False)
    ev = {r["name"]: r for r in _read(tmp_path / "ev" / "test_predictions.csv")}
    chosen = [r for r in rows if r["name"] in ev and _same_graph(r)][:10]
    assert len(chosen) >= 5
    json_in = tmp_path / "test.json"
    json_in.write_text(json.dumps([{k: r[k] for k in ("name", "lattice", "numbers", "frac")} for r in chosen]))
    r = _cli("predict", "--model", str(root / "run" / "best.pt"), str(json_in), "--out", str(tmp_path / "p.csv"))
    assert r.returncode == 0, r.stderr
    for row in _read(tmp_path / "p.csv"):
        for t in ("formation_energy", "volume_per_atom", "band_gap"):
            assert float(row[t]) == pytest.approx(float(ev[row["name"]][f"{t}_pred"]), abs=1e-5)


def test_predict_from_database(trained_run, tmp_path):
    pytest.importorskip("ingest.reader")
    root, _ = trained_run
    db = f"sqlite:///{tmp_path / 'syn.sqlite'}"
    r = _cli("db", "synth", "--db", db, "--entries", "60", "--seed", "3", "--bad-fraction", "0.1")
    assert r.returncode == 0, r.stderr
    out = tmp_path / "db.csv"
    r = _cli("predict", "--model", str(root / "run" / "best.pt"), "--db", db, "--out", str(out))
    assert r.returncode == 0, r.stderr
    got = _read(out)
    rejects = _read(tmp_path / "db.rejects.csv") if (tmp_path / "db.rejects.csv").exists() else []
    from ingest.db import make_engine, resolve_url
    from ingest.reader import OqmdReader

    engine = make_engine(resolve_url(db))
    n_selected = sum(1 for _ in OqmdReader(engine))
    engine.dispose()
    assert len(got) + len(rejects) == n_selected and len(got) >= 30
    assert all(np.isfinite(float(row["formation_energy"])) for row in got)


def test_outputs_without_training_labels_are_flagged(dev_corpus, tmp_path):
    """A model trained without magnetization labels: its checkpoint records the label counts, and
    `cgnn predict` names magnetization and p_magnetic as untrained in the sidecar and on stderr."""
    from cgnn_dgl.config import RunConfig
    from cgnn_dgl.tasks import untrained_columns
    from cgnn_dgl.train import train_run

    rows = usable_rows(dev_corpus, 120)
    cache = write_cache(tmp_path / "cache", rows, seed=2, unlabelled=(3,))
    cfg = tiny_config(cache, tmp_path / "run", epochs=1)
    cfg = RunConfig.from_dict({"model": {**cfg.model.to_dict(), "classification_heads": True},
                               "train": cfg.train.to_dict()})
    train_run(cfg, tmp_path / "run")
    tasks = torch.load(tmp_path / "run" / "best.pt", weights_only=True)["tasks"]
    assert tasks["training_labels"]["magnetization"] == 0 and tasks["training_labels"]["formation_energy"] > 0
    assert tasks["heads_trained"] == {"insulator": True, "magnetic": False}
    assert untrained_columns(tasks) == ["magnetization", "p_magnetic"]
    assert untrained_columns(None) == [] and untrained_columns({"training_labels": {"a": 3}}) == []
    json_in = tmp_path / "in.json"
    json_in.write_text(json.dumps([{k: r[k] for k in ("name", "lattice", "numbers", "frac")} for r in rows[:3]]))
    r = _cli("predict", "--model", str(tmp_path / "run"), str(json_in), "--out", str(tmp_path / "p.csv"))
    assert r.returncode == 0, r.stderr
    side = json.loads((tmp_path / "p.json").read_text())
    assert side["untrained_columns"] == ["magnetization", "p_magnetic"] and "not predictions" in side["untrained_note"]
    assert "magnetization, p_magnetic" in r.stderr


def test_hurdle_model_through_train_and_predict(dev_corpus, tmp_path):
    """A model with valence flags and a band-gap hurdle trains and predicts through the CLI, and the
    sidecar says which column is gated (the gate itself: tests/test_model.py)."""
    from cgnn_dgl.config import RunConfig
    from cgnn_dgl.train import train_run

    rows = usable_rows(dev_corpus, 80)
    cache = write_cache(tmp_path / "cache", rows, seed=3)
    cfg = tiny_config(cache, tmp_path / "run", epochs=1)
    cfg = RunConfig.from_dict({"model": {**cfg.model.to_dict(), "classification_heads": True,
                                         "valence_features": "classification", "hurdle_targets": ["band_gap"]},
                               "train": cfg.train.to_dict()})
    train_run(cfg, tmp_path / "run")
    json_in = tmp_path / "in.json"
    json_in.write_text(json.dumps([{k: r[k] for k in ("name", "lattice", "numbers", "frac")} for r in rows[:4]]))
    r = _cli("predict", "--model", str(tmp_path / "run"), str(json_in), "--out", str(tmp_path / "p.csv"))
    assert r.returncode == 0, r.stderr
    side = json.loads((tmp_path / "p.json").read_text())
    assert list(side["gated_columns"]) == ["band_gap"] and "p_insulator > 0.5" in side["gated_columns"]["band_gap"]
    with open(tmp_path / "p.csv") as fh:
        got = list(csv.DictReader(fh))
    assert len(got) == 4 and all(np.isfinite(float(g["band_gap"])) for g in got)
