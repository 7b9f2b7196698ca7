"""Train / val / test splits (``train.split``): the reference's formula-grouped one (the default), a
seeded random one, or a user's split file keyed by id; persisted as the run's ``split.json``.

Reference semantics (``OQMD/oqmd.py data``, docs/cgnn-reference.md §2.2):

* every entry whose formula has a single element goes to train;
* the multi-element reduced formulas, in order of first appearance, are shuffled with
  ``np.random.seed(12345); np.random.shuffle(formulas)`` (identical to
  ``np.random.RandomState(12345).shuffle``);
* test = the first ``int(0.1 n)`` formulas, val = the next ``int(0.1 n)``, train = the rest + unary;
* an entry goes where its formula went, so no formula is shared between two parts.

``random`` shuffles the rows with ``numpy.random.default_rng(split_seed)``: test = the first
``int(test_fraction n)``, val = the next ``int(val_fraction n)``, train = the rest. A user's split file
(:func:`read_split_file`) is JSON ``{"train": [ids], "val": [...], "test": [...]}`` or a CSV with columns
``id,split``; ids are the cache's names (the id column, file stem or row id) or its entry ids.

Index arrays are returned in row order. On disk the split is keyed by entry id (or by name when entry ids
are missing or repeated) so it survives a rebuilt or reordered cache. A `cgnn graphs` cache's entry ids
only number its inputs, so its split is keyed by name (when the names are unique): a cache rebuilt from
the same structures in another order keeps every crystal in its part.
"""
from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from cgnn_dgl.errors import UsageError
from cgnn_dgl.fileio import atomic_write_text

log = logging.getLogger(__name__)

PARTS = ("train", "val", "test")
SPLIT_VERSION = 1


def formula_split(
    formulas: Sequence[str],
    n_elements: Sequence[int],
    seed: int = 12345,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
) -> dict[str, np.ndarray]:
    """Row indices of train / val / test for entries with the given reduced formulas."""
    formulas = list(formulas)
    n_elements = np.asarray(n_elements, dtype=np.int64).reshape(-1)
    if len(formulas) != len(n_elements):
        raise ValueError(f"{len(formulas)} formulas but {len(n_elements)} element counts")
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise UsageError(f"bad split fractions val={val_fraction} test={test_fraction}")
    # Unique multi-element formulas in order of first appearance (pandas' unique()).
    seen: dict[str, None] = {}
    for f, ne in zip(formulas, n_elements):
        if ne > 1 and f not in seen:
            seen[f] = None
    multi = np.array(list(seen), dtype=object)
    np.random.RandomState(seed).shuffle(multi)
    n = len(multi)
    n_test, n_val = int(test_fraction * n), int(val_fraction * n)
    part_of = dict.fromkeys(multi[:n_test], "test")
    part_of.update(dict.fromkeys(multi[n_test:n_test + n_val], "val"))
    which = np.array([part_of.get(f, "train") if ne > 1 else "train" for f, ne in zip(formulas, n_elements)],
                     dtype=object)
    return {part: np.flatnonzero(which == part).astype(np.int64) for part in PARTS}


def split_keys(entry_ids: np.ndarray, names: Sequence[str], prefer_names: bool = False) -> tuple[str, list]:
    """The key a split file uses: entry ids when they are all set and unique, else names. With
    ``prefer_names`` (entry ids that only number the inputs, as in a `cgnn graphs` cache) names come
    first when they are unique, and entry ids are the fallback."""
    ids = np.asarray(entry_ids, dtype=np.int64).reshape(-1)
    names = [str(n) for n in names]
    unique_names = len(set(names)) == len(names)
    if prefer_names and unique_names and names:
        return "name", names
    if len(ids) and (ids >= 0).all() and len(np.unique(ids)) == len(ids):
        return "entry_id", [int(i) for i in ids]
    if not unique_names:
        raise UsageError("cannot key the split: entry ids are missing or repeated and names repeat too")
    return "name", names


def save_split(path: str | os.PathLike, split: dict[str, np.ndarray], entry_ids, names, prefer_names: bool = False,
               **meta) -> None:
    """Write ``split.json`` atomically, keyed by entry id (or name; see :func:`split_keys`)."""
    key, keys = split_keys(entry_ids, names, prefer_names)
    doc = {"version": SPLIT_VERSION, "key": key, **meta}
    for part in PARTS:
        doc[part] = [keys[int(i)] for i in split.get(part, [])]
    atomic_write_text(path, json.dumps(doc))


def load_split(path: str | os.PathLike, entry_ids, names) -> dict[str, np.ndarray]:
    """Map a saved split onto the rows of a (possibly reordered) cache.

    Keys missing from the cache are skipped with a warning; cache rows not named by the file are left out
    of every part. A file that matches nothing is a usage error.
    """
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise UsageError(f"split file not found: {path}") from None
    except (OSError, ValueError) as exc:
        raise UsageError(f"cannot read split file {path}: {exc}") from None
    if not isinstance(doc, dict) or not all(isinstance(doc.get(p), list) for p in PARTS):
        raise UsageError(f"{path}: not a split file (needs lists 'train', 'val', 'test')")
    key = doc.get("key", "name")
    if key == "entry_id":
        lookup = {int(e): i for i, e in enumerate(np.asarray(entry_ids).reshape(-1))}
        conv = int
    elif key == "name":
        lookup = {str(n): i for i, n in enumerate(names)}
        conv = str
    else:
        raise UsageError(f"{path}: unknown split key {key!r}")
    out, missing, used = {}, 0, 0
    for part in PARTS:
        rows = []
        for k in doc[part]:
            i = lookup.get(conv(k))
            if i is None:
                missing += 1
            else:
                rows.append(i)
        out[part] = np.sort(np.asarray(rows, dtype=np.int64))
        used += len(rows)
    if used == 0:
        raise UsageError(f"{path}: none of its {missing} {key}s are in the cache")
    if missing:
        log.warning("split %s: %d of its entries are not in the cache and are skipped", path, missing)
    left = len(lookup) - used
    if left > 0:
        log.warning("split %s: %d cache entries are in no part of the split and are not used", path, left)
    return out


SPLIT_METHODS = ("formula", "random", "file")


def random_split(n: int, seed: int = 12345, val_fraction: float = 0.1,
                 test_fraction: float = 0.1) -> dict[str, np.ndarray]:
    """Row indices of a seeded random train / val / test split of ``n`` rows (no grouping)."""
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise UsageError(f"bad split fractions val={val_fraction} test={test_fraction}")
    perm = np.random.default_rng(seed).permutation(n)
    n_test, n_val = int(test_fraction * n), int(val_fraction * n)
    return {"test": np.sort(perm[:n_test]), "val": np.sort(perm[n_test:n_test + n_val]),
            "train": np.sort(perm[n_test + n_val:])}


def _read_user_parts(path: Path) -> tuple[dict[str, list[str]], str | None]:
    """{part: [id, ...]} and the declared key (JSON ``key``) of a user's split file."""
    import csv

    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise UsageError(f"split file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read split file {path}: {exc}") from None
    if path.suffix.lower() == ".json":
        try:
            doc = json.loads(text)
        except ValueError as exc:
            raise UsageError(f"cannot read split file {path}: {exc}") from None
        if not isinstance(doc, dict) or not all(isinstance(doc.get(p, []), list) for p in PARTS) \
                or not any(p in doc for p in PARTS):
            raise UsageError(f"{path}: not a split file (needs lists 'train', 'val', 'test')")
        return {p: [str(k) for k in doc.get(p, [])] for p in PARTS}, doc.get("key")
    rows = list(csv.reader(text.splitlines()))
    header = [h.strip().lower() for h in rows[0]] if rows else []
    id_col = next((header.index(c) for c in ("id", "name", "entry_id", "material_id") if c in header), None)
    part_col = next((header.index(c) for c in ("split", "part", "set") if c in header), None)
    if id_col is None or part_col is None:
        raise UsageError(f"{path}: a CSV split file needs a header with columns id and split (got {rows[0] if rows else 'nothing'})")
    parts: dict[str, list[str]] = {p: [] for p in PARTS}
    for line, row in enumerate(rows[1:], start=2):
        if not row or not any(c.strip() for c in row):
            continue
        part = row[part_col].strip().lower() if len(row) > part_col else ""
        if part not in parts:
            raise UsageError(f"{path} line {line}: split {part!r} is not one of train, val, test")
        parts[part].append(row[id_col].strip())
    return parts, ("entry_id" if header[id_col] == "entry_id" else None)


def read_split_file(path: str | os.PathLike, entry_ids, names) -> dict[str, np.ndarray]:
    """A user's split file (``train.split: file``) mapped onto the cache's rows. Ids are matched to the
    cache's names, or to its entry ids when that is what they are; an id the cache lacks or one given
    twice is a usage error (listing a few), cache rows the file leaves out are unused (with a warning)."""
    path = Path(path)
    parts, key = _read_user_parts(path)
    given = [k for p in PARTS for k in parts[p]]
    if not given:
        raise UsageError(f"{path}: the split file names no ids")
    seen: set[str] = set()
    twice = [k for k in given if k in seen or seen.add(k)]
    if twice:
        raise UsageError(f"{path}: {len(twice)} id(s) given more than once: {', '.join(twice[:5])}")
    by_name = {str(n): i for i, n in enumerate(names)}
    by_id = {str(int(e)): i for i, e in enumerate(np.asarray(entry_ids).reshape(-1)) if int(e) >= 0}
    if key == "entry_id":
        lookup = by_id
    elif key == "name":
        lookup = by_name
    else:  # names unless the ids are entry ids and not names
        lookup = by_name if sum(k in by_name for k in given) >= sum(k in by_id for k in given) else by_id
    unknown = [k for k in given if k not in lookup]
    if unknown:
        raise UsageError(f"{path}: {len(unknown)} of its {len(given)} ids are not in the cache: "
                         f"{', '.join(unknown[:5])}{' ...' if len(unknown) > 5 else ''}")
    out = {p: np.sort(np.asarray([lookup[k] for k in parts[p]], dtype=np.int64)) for p in PARTS}
    left = len(names) - len(given)
    if left > 0:
        log.warning("split %s: %d cache entries are in no part of the split and are not used", path, left)
    return out
