"""Shared fixtures: where ../shared lives, and small sets of real reference structures."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


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
