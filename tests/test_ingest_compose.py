"""docker-compose.yml: valid for the compose CLI when one is installed, and shaped as documented."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
COMPOSE = REPO / "docker-compose.yml"


def _compose_cli() -> list[str] | None:
    candidates = []
    if shutil.which("docker"):
        candidates.append(["docker", "compose"])
    if shutil.which("docker-compose"):
        candidates.append(["docker-compose"])
    for cmd in candidates:
        try:
            r = subprocess.run([*cmd, "version"], capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if r.returncode == 0:
            return cmd
    return None


def test_compose_config_validates():
    cmd = _compose_cli()
    if cmd is None:
        pytest.skip("neither `docker compose` nor `docker-compose` works here (no compose plugin installed)")
    r = subprocess.run([*cmd, "-f", str(COMPOSE), "config", "-q"], capture_output=True, text=True, timeout=60,
                       cwd=REPO)
    assert r.returncode == 0, r.stderr


def test_compose_database_service_shape():
    doc = yaml.safe_load(COMPOSE.read_text())
    db = doc["services"]["database"]
    assert db["image"].startswith("mysql:8.0")
    assert "healthcheck" in db and "mysqladmin ping" in " ".join(db["healthcheck"]["test"])
    mounts = db["volumes"]
    named = [m.split(":")[0] for m in mounts if not m.startswith(".")]
    assert named and all(n in doc["volumes"] for n in named)
    assert any(m.startswith("./sql:/docker-entrypoint-initdb.d") for m in mounts)
    assert db["environment"]["MYSQL_DATABASE"] == "qmdb"
    flags = " ".join(db["command"])
    for setting in ("innodb-buffer-pool-size", "innodb-flush-log-at-trx-commit", "skip-log-bin", "max-allowed-packet"):
        assert setting in flags
    # the init folder holds exactly the scripts meant to run, schema first
    sql = sorted(p.name for p in (REPO / "sql").iterdir() if p.is_file() and p.suffix in (".sql", ".sh", ".gz"))
    assert sql == ["schema.sql", "seed_elements.sql"]
    from ingest.db import split_sql

    statements = split_sql((REPO / "sql" / "schema.sql").read_text())
    assert not any(s.upper().startswith(("CREATE DATABASE", "USE ")) for s in statements)  # runs in MYSQL_DATABASE
