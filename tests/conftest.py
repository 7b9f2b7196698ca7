"""Shared fixtures: where ../shared lives, and small sets of real reference structures."""
from __future__ import annotations

import json
import os
import secrets
import signal
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

REPO = Path(__file__).resolve().parents[1]

# Property-based tests: a fixed, derandomised profile in CI (CI=true) so a run is reproducible; a
# seeded but wider search on developer machines. Select another with HYPOTHESIS_PROFILE.
settings.register_profile("ci", derandomize=True, max_examples=60, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", derandomize=True, max_examples=100, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))


def shared_dir() -> Path:
    return Path(os.environ.get("CGNN_SHARED", REPO.parent / "shared"))


@pytest.fixture(scope="session")
def shared() -> Path:
    path = shared_dir()
    if not (path / "reference" / "coordinator_dev.json").exists():
        pytest.skip(f"reference data not found under {path} (set CGNN_SHARED)")
    return path


@pytest.fixture(scope="session")
def dev_corpus(shared) -> list[dict]:
    with open(shared / "reference" / "coordinator_dev.json") as fh:
        return json.load(fh)


@contextmanager
def readonly_mysql_user(admin_engine, database: str):
    """A throw-away MySQL user with SELECT only on ``database``; yields (user, password), drops it after."""
    user, password = f"cgnn_ro_{secrets.token_hex(3)}", "pw-" + secrets.token_hex(8)
    hosts = ("127.0.0.1", "localhost")
    with admin_engine.connect() as conn:
        for host in hosts:
            conn.exec_driver_sql(f"CREATE USER '{user}'@'{host}' IDENTIFIED BY '{password}'")
            conn.exec_driver_sql(f"GRANT SELECT ON `{database}`.* TO '{user}'@'{host}'")
    try:
        yield user, password
    finally:
        with admin_engine.connect() as conn:
            for host in hosts:
                conn.exec_driver_sql(f"DROP USER IF EXISTS '{user}'@'{host}'")


def sigkill_after_lines(proc, path: Path, lines: int, timeout: float) -> int | None:
    """kill -9 ``proc`` as soon as ``path`` holds ``lines`` lines; the data rows it had then, or None if the
    process ended (or the timeout passed) first. Shared by the kill-and-resume tests."""
    deadline = time.time() + timeout
    try:
        while time.time() < deadline and proc.poll() is None:
            if path.is_file() and len(path.read_text().splitlines()) >= lines:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
                return len(path.read_text().splitlines()) - 1
            time.sleep(0.005)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return None
