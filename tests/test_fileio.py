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


def test_output_file_accepts_a_folder_and_checks_up_front(tmp_path):
    """Issue 8, defect 9: --out of predict / cache export may be an existing folder (a default file name is
    written inside), and an output that could not be written is refused before any work."""
    from cgnn_dgl.errors import UsageError
    from cgnn_dgl.fileio import output_file

    assert output_file(tmp_path, "predictions.csv") == tmp_path / "predictions.csv"
    assert output_file(tmp_path / "new" / "p.csv", "predictions.csv") == tmp_path / "new" / "p.csv"
    (tmp_path / "afile").write_text("x")
    with pytest.raises(UsageError, match="is not a folder"):
        output_file(tmp_path / "afile" / "sub" / "p.csv", "predictions.csv")
    (tmp_path / "d" / "predictions.csv").mkdir(parents=True)
    with pytest.raises(UsageError, match="is a folder"):
        output_file(tmp_path / "d", "predictions.csv")


def test_cache_export_into_a_folder(tmp_path, dev_corpus):
    import json
    import subprocess
    import sys

    from test_train import usable_rows, write_cache

    cache = write_cache(tmp_path / "c", usable_rows(dev_corpus, 5))
    (tmp_path / "out").mkdir()
    r = subprocess.run([sys.executable, "-m", "cgnn_dgl.cli", "cache", "export", str(cache), "--out",
                        str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert len(json.loads((tmp_path / "out" / "graphs.json").read_text())) == 5
