"""fileio: atomic writes give the mode a plain open() would (issue 8.7: mkstemp made every file 0600)."""
from __future__ import annotations

import os

import pytest

from cgnn_dgl.fileio import atomic_write_bytes, atomic_write_json


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_atomic_writes_respect_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        atomic_write_json(tmp_path / "m.json", {"a": 1})
        atomic_write_bytes(tmp_path / "b.pt", b"x")
    finally:
        os.umask(old)
    for name in ("m.json", "b.pt"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o666 & ~umask
