"""bench/gpu.py, the GPU device proof: export from a real cache, then the whole script on the CPU
(--cpu-dry-run) in an interpreter where DGL, pymatgen, SQLAlchemy and PyYAML cannot be imported."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from tests.test_step import blocked_env
from tests.test_train import usable_rows, write_cache

REPO = Path(__file__).resolve().parents[1]


def test_export_then_cpu_dry_run_without_dgl(dev_corpus, tmp_path):
    cache = write_cache(tmp_path / "cache", usable_rows(dev_corpus, 120))
    out = tmp_path / "batches"
    r = subprocess.run([sys.executable, "bench/gpu.py", "--export", str(out), "--cache", str(cache), "--batch-size", "40"],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    meta = json.loads((out / "meta.json").read_text())
    assert meta["n_crystals"] == 120 and len(meta["files"]) == 3 and meta["bytes"] < 64 * 2**20
    assert meta["targets"] == ["formation_energy", "volume_per_atom", "band_gap", "magnetization"]
    with np.load(out / meta["files"][0]) as a:
        assert set(a.files) >= {"bond_src", "bond_dst", "atom_crystal", "Z", "y", "y_mask"}
        assert a["y"].shape == (40, 4) and a["atom_crystal"].max() == 39

    report = tmp_path / "dry.json"
    r = subprocess.run([sys.executable, "bench/gpu.py", "--batches", str(out), "--cpu-dry-run", "--out", str(report),
                        "--time-budget", "100000"],
                       cwd=REPO, env=blocked_env(tmp_path), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    assert "CPU-CUDA parity" in r.stdout and "training throughput" in r.stdout and "DDP smoke run" in r.stdout
    rep = json.loads(report.read_text())
    assert rep["dry_run"] and rep["ok"]
    assert len(rep["parity"]) == 6 and all(p["ok"] for p in rep["parity"])
    cells = {(t["preset"], t["batch"], t["amp"]) for t in rep["throughput"] if "skipped" not in t}
    assert len(cells) == 12 and all(t["structures_per_s"] > 0 for t in rep["throughput"])
    assert rep["ddp"]["ok"] and rep["ddp"]["backend"] == "gloo" and rep["ddp"]["steps"] == 5
    assert rep["deterministic"]["structures_per_s_deterministic"] > 0
