"""Crash-safe file writes shared by every stage: write a temporary file in the same folder, fsync,
rename over the target, fsync the folder. A reader (or a resumed run) sees the old file or the new
one, never half of one."""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def umask_mode() -> int:
    """The mode ``open()`` would give a new file (0o666 less the umask): mkstemp's 0600 would keep a
    cache or a model from being shared with a group."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


@contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", **kwargs) -> Iterator[IO]:
    """``with atomic_open(p) as fh: ...`` — ``p`` appears only when the block finishes without error."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, umask_mode())
        with os.fdopen(fd, mode, **kwargs) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    fsync_dir(path.parent)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_open(path, "wb") as fh:
        fh.write(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_open(path, "w") as fh:
        fh.write(text)


def atomic_write_json(path: str | os.PathLike, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=1) + "\n")


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def output_file(out: str | os.PathLike, default_name: str) -> Path:
    """Where a command that writes one file puts it, checked before any work starts: ``out`` itself, or
    ``out/default_name`` when ``out`` is an existing folder (like ``--out`` of the folder-writing commands).
    Raises UsageError when it could not be written (its nearest existing folder is not writable)."""
    from cgnn_dgl.errors import UsageError

    path = Path(out)
    if path.is_dir():
        path = path / default_name
    if path.is_dir():
        raise UsageError(f"--out {path} is a folder; give a file name")
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise UsageError(f"cannot write --out {path}: {parent} is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise UsageError(f"cannot write --out {path}: no write permission in {parent}; choose another --out")
    return path
