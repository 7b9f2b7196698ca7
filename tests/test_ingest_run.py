"""OQMD ingest end to end: synthetic database -> `cgnn ingest` -> graph cache.

Covers: rejects by reason, workers 1 vs 2 identical, resume after SIGKILL at random points (>= 3
kills) equals a clean run, --shard i/N + merge equals the full run, the CLI (usage errors, summary,
password never shown), on SQLite and on a throwaway MariaDB database.
"""
from __future__ import annotations

import csv
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import readonly_mysql_user

from cgnn_dgl.cache import merge_caches, read_shard_arrays
from ingest.db import make_engine, mysql_reachable, safe_url, temporary_mysql_database
from ingest.run import run_ingest
from ingest.synth import synthesize

REPO = Path(__file__).resolve().parents[1]
MYSQL_SERVER = os.environ.get("CGNN_TEST_MYSQL", "mysql+pymysql://root@127.0.0.1:3306/")
_mysql_down = mysql_reachable(MYSQL_SERVER)


@pytest.fixture(scope="module")
def synth_sqlite(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("synth") / "oqmd.sqlite"
    engine = make_engine(f"sqlite:///{path}", must_exist=False)
    st = synthesize(engine, 1200, seed=7, bad_fraction=0.1)
    assert all(v > 0 for v in st.bad.values())
    engine.dispose()
    return f"sqlite:///{path}"


@pytest.fixture(scope="module")
def synth_mariadb():
    if _mysql_down:
        pytest.skip(f"MariaDB/MySQL not reachable: {_mysql_down}")
    with temporary_mysql_database(MYSQL_SERVER, "cgnn_test_run") as url:
        engine = make_engine(url)
        synthesize(engine, 1200, seed=7, bad_fraction=0.1)
        engine.dispose()
        yield url


def cache_content(root: Path) -> dict:
    """Everything that defines a cache's content (not timestamps): shards, rejects, flags."""
    m = json.loads((root / "manifest.json").read_text())
    shards = [(s["key_first"], s["key_last"], s["n_graphs"], s["n_rejects"], s["content_sha256"], s["meta_sha256"])
              for s in m["shards"]]
    return {"shards": shards, "rejects": (root / "rejects.csv").read_text(),
            "flags": (root / "ingest_flags.csv").read_text(), "complete": m["complete"]}


def by_key(root: Path) -> dict[int, tuple]:
    m = json.loads((root / "manifest.json").read_text())
    out = {}
    for s in m["shards"]:
        a = read_shard_arrays(root / s["file"])
        atom_off = np.concatenate([[0], np.cumsum(a["n_atoms"])])
        bond_off = np.concatenate([[0], np.cumsum(a["n_bonds"])])
        for k, key in enumerate(a["entry_id"]):
            out[int(key)] = (a["numbers"][atom_off[k]:atom_off[k + 1]].tobytes(),
                             a["bond_src"][bond_off[k]:bond_off[k + 1]].tobytes(),
                             a["bond_dst"][bond_off[k]:bond_off[k + 1]].tobytes(),
                             a["y"][k].tobytes(), a["y_mask"][k].tobytes())
    return out


def test_ingest_sqlite_workers_identical_and_rejects(synth_sqlite, tmp_path):
    s1 = run_ingest(synth_sqlite, tmp_path / "w1", workers=1, shard_size=300, batch_size=250, progress=False)
    s2 = run_ingest(synth_sqlite, tmp_path / "w2", workers=2, shard_size=300, batch_size=97, progress=False)
    assert cache_content(tmp_path / "w1") == cache_content(tmp_path / "w2")
    assert s1.entries_read == s2.entries_read == s1.graphs_written + sum(s1.rejects.values())
    assert set(s1.rejects) == {"no_atoms", "unknown_element", "singular_lattice", "nan_target", "no_radius"}
    rows = list(csv.DictReader((tmp_path / "w1" / "rejects.csv").open()))
    assert len(rows) == sum(s1.rejects.values())
    assert all(r["name"].startswith("synthetic-") for r in rows)
    flags = list(csv.DictReader((tmp_path / "w1" / "ingest_flags.csv").open()))
    graphs = by_key(tmp_path / "w1")
    built_flags = [f for f in flags if int(f["key"]) in graphs]
    assert len(built_flags) == len(graphs) == s1.graphs_written
    assert all(f["volume_deviation"] not in ("", None) for f in built_flags)
    # a second run finds everything done
    s3 = run_ingest(synth_sqlite, tmp_path / "w1", workers=1, shard_size=300, progress=False)
    assert s3.entries_read == 0 and s3.total_graphs == s1.graphs_written


def test_ingest_mariadb_matches_sqlite(synth_sqlite, synth_mariadb, tmp_path):
    """The same synthetic rows (same seed) through MariaDB and SQLite give the same graphs and targets."""
    run_ingest(synth_sqlite, tmp_path / "lite", workers=1, shard_size=400, progress=False)
    run_ingest(synth_mariadb, tmp_path / "maria", workers=2, shard_size=400, progress=False)
    assert by_key(tmp_path / "lite") == by_key(tmp_path / "maria")
    run_ingest(synth_mariadb, tmp_path / "maria57", workers=1, shard_size=400, progress=False, window=False)
    assert cache_content(tmp_path / "maria57") == cache_content(tmp_path / "maria")


def test_limit_then_resume_equals_clean(synth_sqlite, tmp_path):
    clean = tmp_path / "clean"
    run_ingest(synth_sqlite, clean, shard_size=200, progress=False)
    part = tmp_path / "part"
    first = run_ingest(synth_sqlite, part, shard_size=200, limit=400, progress=False)
    assert first.entries_read == 400
    second = run_ingest(synth_sqlite, part, shard_size=200, progress=False)
    assert second.resumed_after is not None
    assert cache_content(part) == cache_content(clean)


def test_shards_merge_to_full(synth_sqlite, tmp_path):
    run_ingest(synth_sqlite, tmp_path / "full", shard_size=250, progress=False)
    for i in range(3):
        run_ingest(synth_sqlite, tmp_path / f"s{i}", shard=(i, 3), shard_size=250, progress=False)
        keys = by_key(tmp_path / f"s{i}")
        assert keys and all(k % 3 == i for k in keys)
    merge_caches([tmp_path / f"s{i}" for i in range(3)], tmp_path / "merged")
    assert by_key(tmp_path / "merged") == by_key(tmp_path / "full")


def test_canonical_selection_run(synth_sqlite, tmp_path):
    s = run_ingest(synth_sqlite, tmp_path / "canon", selection="canonical", shard_size=500, progress=False)
    assert s.graphs_written > 0 and "nan_target" not in s.rejects  # standard fit with NULL delta_e is excluded
    ref = by_key(tmp_path / "canon")
    m = json.loads((tmp_path / "canon" / "manifest.json").read_text())
    assert m["source"]["selection"] == "canonical" and m["source"]["query_version"].startswith("canonical")
    assert ref


def _cgnn(*args, env=None, **kw):
    return subprocess.run([sys.executable, "-m", "cgnn_dgl.cli", *args], cwd=REPO, capture_output=True, text=True,
                          env=env, timeout=300, **kw)


def _shard_count(root: Path) -> int:
    try:
        return len(json.loads((root / "manifest.json").read_text())["shards"])
    except (OSError, ValueError):
        return 0


def test_sigkill_resume_equals_clean_run(tmp_path):
    """kill -9 `cgnn ingest` at random points (>= 3 times), resume each time: same cache as a clean run."""
    db = tmp_path / "kill.sqlite"
    engine = make_engine(f"sqlite:///{db}", must_exist=False)
    synthesize(engine, 4000, seed=11, bad_fraction=0.05)
    engine.dispose()
    args = ["ingest", "--db", str(db), "--workers", "1", "--shard-size", "150", "--batch-size", "64", "--no-progress"]
    clean = tmp_path / "clean"
    done = _cgnn(*args, "--out", str(clean))
    assert done.returncode == 0, done.stderr
    out = tmp_path / "killed"
    rng = random.Random(2024)
    kills = 0
    for _attempt in range(12):
        proc = subprocess.Popen([sys.executable, "-m", "cgnn_dgl.cli", *args, "--out", str(out)], cwd=REPO,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if kills < 3:
            start = _shard_count(out)
            deadline = time.time() + 120
            while proc.poll() is None and _shard_count(out) <= start and time.time() < deadline:
                time.sleep(0.02)
            time.sleep(rng.uniform(0.0, 0.4))  # somewhere inside the next shard, or inside its write
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                kills += 1
                continue
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
        if kills >= 3:
            break
    assert kills >= 3
    assert cache_content(out) == cache_content(clean)
    assert by_key(out) == by_key(clean)


def test_cli_usage_and_errors(synth_sqlite, tmp_path, monkeypatch):
    env = {k: v for k, v in os.environ.items() if k not in ("CGNN_DB_URL", "CGNN_DB_PASSWORD")}
    r = _cgnn("ingest", "--out", str(tmp_path / "c"), env=env)
    assert r.returncode == 2 and "CGNN_DB_URL" in r.stderr and "Traceback" not in r.stderr
    r = _cgnn("ingest", "--db", synth_sqlite, "--out", str(tmp_path / "c"), "--shard", "3/2", env=env)
    assert r.returncode == 2 and "--shard" in r.stderr
    r = _cgnn("ingest", "--db", synth_sqlite, "--out", str(tmp_path / "c"), "--elements", "Fe,Qq", env=env)
    assert r.returncode == 2 and "Qq" in r.stderr
    r = _cgnn("ingest", "--db", str(tmp_path / "nope.sqlite"), "--out", str(tmp_path / "c"), env=env)
    assert r.returncode == 2 and "does not exist" in r.stderr
    r = _cgnn("ingest", "--db", synth_sqlite, "--out", str(tmp_path / "c"), "--elements", "o,zn,Na,Cl",
              "--max-id", "800", "--no-progress", env={**env, "CGNN_DB_URL": "ignored://x"})
    assert r.returncode == 0, r.stderr
    assert "ingest summary" in r.stdout and "entries/s" in r.stdout
    m = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert m["source"]["filters"] == {"elements": ["Cl", "Na", "O", "Zn"], "min_id": None, "max_id": 800,
                                      "shard": "0/1"}
    for key in by_key(tmp_path / "c"):
        assert key <= 800


def test_db_init_and_synth_cli(tmp_path):
    db = tmp_path / "demo.sqlite"
    r = _cgnn("db", "init", "--db", f"sqlite:///{db}")
    assert r.returncode == 0 and "118 elements" in r.stdout, r.stderr
    r = _cgnn("db", "synth", "--db", str(db), "--entries", "50", "--seed", "1", "--bad-fraction", "0.2")
    assert r.returncode == 0, r.stderr
    assert "SYNTHETIC" in r.stdout and "/synthetic/1/" in r.stdout


@pytest.mark.skipif(_mysql_down is not None, reason=f"MariaDB/MySQL not reachable: {_mysql_down}")
def test_password_never_shown(synth_mariadb, tmp_path):
    """Wrong password: one-line error without it. Right password (read-only user): not in output/manifest."""
    import secrets

    import sqlalchemy as sa

    bogus = "wrong-" + secrets.token_hex(6)
    url = synth_mariadb.set(password=bogus)
    r = _cgnn("ingest", "--db", url.render_as_string(hide_password=False), "--out", str(tmp_path / "x"))
    assert r.returncode == 1 and bogus not in r.stdout + r.stderr and "Traceback" not in r.stderr
    assert "***" in r.stderr
    admin = sa.create_engine(synth_mariadb.set(database=None), isolation_level="AUTOCOMMIT")
    try:
        with readonly_mysql_user(admin, synth_mariadb.database) as (user, password):
            ro = synth_mariadb.set(username=user, password=None)
            env = {**os.environ, "CGNN_DB_PASSWORD": password}
            r = _cgnn("-v", "ingest", "--db", ro.render_as_string(), "--out", str(tmp_path / "ro"), "--workers", "2",
                      "--max-id", "400", env=env)
            assert r.returncode == 0, r.stderr
            with_pw = _cgnn("ingest", "--db", synth_mariadb.set(username=user, password=password)
                            .render_as_string(hide_password=False), "--out", str(tmp_path / "ro2"), "--max-id", "400")
            assert with_pw.returncode == 0, with_pw.stderr
            for out, root in ((r, tmp_path / "ro"), (with_pw, tmp_path / "ro2")):
                assert password not in out.stdout + out.stderr
                for f in root.rglob("*"):
                    if f.is_file() and f.suffix in (".json", ".csv", ".jsonl"):
                        assert password not in f.read_text()
            assert safe_url(synth_mariadb.set(username=user, password=password)) in \
                json.loads((tmp_path / "ro2" / "manifest.json").read_text())["source"]["db"]
    finally:
        admin.dispose()


def test_ingest_of_only_bad_entries_lists_them(tmp_path):
    """Issue 8.1: `db synth --bad-fraction 1.0` then ingest used to crash writing a shard of no graphs."""
    engine = make_engine(f"sqlite:///{tmp_path / 'bad.sqlite'}", must_exist=False)
    synthesize(engine, 50, seed=1, bad_fraction=1.0)
    engine.dispose()
    s = run_ingest(f"sqlite:///{tmp_path / 'bad.sqlite'}", tmp_path / "c", workers=1, progress=False)
    assert s.graphs_written == 0 and sum(s.rejects.values()) == s.entries_read > 0
    rows = list(csv.DictReader((tmp_path / "c" / "rejects.csv").open()))
    assert len(rows) == s.entries_read
