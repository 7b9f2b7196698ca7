"""Stage 4: the graph cache — packed DGL binary graph files plus a manifest.

One DGL graph object per crystal is far too slow to save, load and batch at OQMD scale, so each shard
file holds ONE heterograph that packs thousands of crystals (same schema as ``graph.py``, crystals
stacked), with per-crystal atom/bond counts stored as labels. Loading a shard is then a few large
array copies.

Layout::

    CACHE/manifest.json            parameters, code version, source (never a password), shard list
    CACHE/shards/shard-NNNNNN.bin  dgl.save_graphs([packed graph], {"n_atoms", "n_bonds", "key"})
    CACHE/shards/shard-NNNNNN.json names and rejects of the shard (sidecar)
    CACHE/rejects.csv              every reject: key, name, reason, message

Every shard covers a contiguous range of input *keys* (input index or OQMD entry id) and is written
atomically (temporary file, fsync, rename; then the manifest the same way), so a build interrupted at
any point resumes without duplicates or gaps. On open, shards whose file is missing, whose checksum
differs or whose parameters are stale are named, dropped and rebuilt alone.
"""
from __future__ import annotations

import bisect
import csv
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import dgl
import numpy as np
import torch

import cgnn_dgl
from cgnn_dgl import TARGETS, default_units
from cgnn_dgl.batching import PackedGraphs
from cgnn_dgl.errors import CgnnError
from cgnn_dgl.fileio import atomic_open, atomic_write_json, sha256_file, umask_mode
from cgnn_dgl.schema import ATOM, BOND, CRYSTAL, Y_MASK, Y, Z, bond_ratio, crystal_of_atoms, heterograph

log = logging.getLogger(__name__)

FORMAT = "cgnn-dgl-cache"
FORMAT_VERSION = 2  # 2: shards carry the per-bond distance / cutoff ("ratio"); version-1 shards are rebuilt on resume
MANIFEST = "manifest.json"
DEFAULT_SHARD_SIZE = 8192


class CacheMismatch(CgnnError):
    """The cache at a path was built from other inputs or parameters."""


@dataclass
class Built:
    """One crystal's graph in compact form (cheap to pickle between processes)."""

    key: int
    name: str
    numbers: np.ndarray  # (n,) atomic numbers
    counts: np.ndarray  # (n,) neighbours per centre atom
    nbr: np.ndarray  # (sum counts,) neighbour index per bond, centre-major, reference order
    y: np.ndarray  # (T,) float64 in the cache's target order, 0 where missing
    y_mask: np.ndarray  # (T,) bool
    flags: dict = field(default_factory=dict)
    # (sum counts,) float32 distance / cutoff per bond (the model's optional geometry input); None for
    # graphs made without distances (e.g. from reference neighbour lists)
    ratio: np.ndarray | None = None


@dataclass
class Reject:
    key: int
    name: str
    reason: str
    message: str


# --------------------------------------------------------------------------------------------------
# shard encoding


def pack_graph(built: Sequence[Built], n_targets: int = len(TARGETS)) -> tuple[dgl.DGLHeteroGraph, dict[str, torch.Tensor]]:
    """Stack many crystals into one heterograph (int32 ids) with per-crystal counts as labels."""
    k = len(built)
    n_atoms = np.fromiter((len(b.numbers) for b in built), dtype=np.int64, count=k)
    n_bonds = np.fromiter((len(b.nbr) for b in built), dtype=np.int64, count=k)
    atom_off = np.concatenate([[0], np.cumsum(n_atoms)[:-1]]) if k else np.zeros(0, np.int64)
    if k:
        z = np.concatenate([b.numbers for b in built]).astype(np.int64)
        nbr = np.concatenate([b.nbr for b in built]).astype(np.int64)
        centre = np.concatenate([np.repeat(np.arange(len(b.counts)), b.counts) for b in built]).astype(np.int64)
        shift = np.repeat(atom_off, n_bonds)
        src, dst = nbr + shift, centre + shift
        y = np.stack([b.y for b in built]).astype(np.float64)
        mask = np.stack([b.y_mask for b in built]).astype(np.uint8)
    else:
        z = src = dst = np.zeros(0, np.int64)
        y, mask = np.zeros((0, n_targets)), np.zeros((0, n_targets), np.uint8)
    keys = np.fromiter((b.key for b in built), dtype=np.int64, count=k)
    ratio = None
    if k and all(b.ratio is not None for b in built):
        ratio = torch.from_numpy(np.concatenate([b.ratio for b in built]).astype(np.float32))
    g = heterograph(src, dst, crystal_of_atoms(n_atoms), k, numbers=torch.from_numpy(z.astype(np.int16)),
                    y=torch.from_numpy(y), y_mask=torch.from_numpy(mask), entry_id=torch.from_numpy(keys),
                    ratio=ratio, idtype=torch.int32)
    labels = {"n_atoms": torch.from_numpy(n_atoms), "n_bonds": torch.from_numpy(n_bonds), "key": torch.from_numpy(keys)}
    return g, labels


def content_digest(arrays: dict[str, np.ndarray]) -> str:
    """sha256 of a shard's decoded content: DGL's file bytes are not deterministic, the content is."""
    h = hashlib.sha256()
    for key in ("numbers", "n_atoms", "n_bonds", "bond_src", "bond_dst", "y", "y_mask", "entry_id", "bond_ratio"):
        if key == "bond_ratio" and arrays.get(key) is None:  # optional: digests of older shards stay valid
            continue
        a = np.ascontiguousarray(arrays[key])
        h.update(key.encode())
        h.update(str(a.dtype).encode())
        h.update(a.tobytes())
    return h.hexdigest()


def read_shard_arrays(path: Path) -> dict[str, np.ndarray]:
    """A shard file -> flat numpy arrays (bonds as per-crystal local indices; ``bond_ratio`` is None in
    shards written before the geometry input existed)."""
    graphs, labels = dgl.load_graphs(str(path))
    g = graphs[0]
    n_atoms = labels["n_atoms"].numpy()
    n_bonds = labels["n_bonds"].numpy()
    src, dst = (t.numpy().astype(np.int64) for t in g.edges(etype=BOND, order="eid"))
    # first atom of each crystal; length len(n_atoms) also for a shard of zero crystals
    atom_off = (np.cumsum(n_atoms) - n_atoms).astype(np.int64)
    shift = np.repeat(atom_off, n_bonds)
    return {
        "numbers": g.nodes[ATOM].data[Z].numpy().astype(np.uint8),
        "n_atoms": n_atoms,
        "n_bonds": n_bonds,
        "bond_src": (src - shift).astype(np.int32),
        "bond_dst": (dst - shift).astype(np.int32),
        "y": g.nodes[CRYSTAL].data[Y].numpy(),
        "y_mask": g.nodes[CRYSTAL].data[Y_MASK].numpy().astype(bool),
        "entry_id": labels["key"].numpy(),
        "bond_ratio": None if (ratio := bond_ratio(g)) is None else ratio.numpy(),
    }


# --------------------------------------------------------------------------------------------------
# manifest and writer


def _shard_name(index: int) -> str:
    return f"shard-{index:06d}"


def read_manifest(root: Path) -> dict | None:
    path = Path(root) / MANIFEST
    if not path.exists():
        return None
    try:
        with open(path) as fh:
            manifest = json.load(fh)
    except (OSError, json.JSONDecodeError) as exc:
        raise CgnnError(f"{path}: unreadable cache manifest ({exc}); remove the cache folder to rebuild") from None
    if manifest.get("format") != FORMAT:
        raise CgnnError(f"{path}: not a cgnn-dgl cache manifest")
    return manifest


def check_shard(root: Path, shard: dict, expected: dict | None = None) -> str | None:
    """Why a shard is unusable (missing, corrupt, stale), or None when it is good."""
    for key in ("file", "meta"):
        p = Path(root) / shard[key]
        if not p.exists():
            return f"missing file {shard[key]}"
        if sha256_file(p) != shard[f"{key}_sha256"]:
            return f"checksum mismatch in {shard[key]} (corrupt or modified)"
    if expected is not None:
        for k, v in expected.items():
            if shard.get(k) != v:
                return f"stale: built with {k}={shard.get(k)!r}, now {v!r}"
    return None


def _describe_source(src: dict) -> str:
    if src.get("kind") == "files":
        n = src.get("count")
        return f"{n} structure{'' if n == 1 else 's'} of {', '.join(src.get('inputs', []))}"
    if src.get("kind") == "oqmd-db":
        return f"{src.get('db')} (selection {src.get('selection')}, filters {src.get('filters')})"
    return str(src)


def source_change(root, old: dict, new: dict) -> str:
    """What differs between the inputs a cache was built from and the ones given now, and what to do.

    A cache is a snapshot of its inputs: resuming is for the same inputs only, so a folder that gained
    or lost files is a new build, not a resume.
    """
    what = "use a new --out folder, or --overwrite to rebuild it from the inputs as they are now"
    if old.get("kind") == new.get("kind") == "files" and old.get("inputs") == new.get("inputs"):
        if old.get("count") != new.get("count"):
            return (f"{root} was built from {old.get('count')} structures of {', '.join(new['inputs'])}, "
                    f"which hold {new.get('count')} now; a cache is a snapshot of its inputs, so it "
                    f"cannot resume with files added or removed: {what}")
        return (f"{root} was built from the same inputs read differently ({old.get('read', {})} then, "
                f"{new.get('read', {})} now): {what}")
    return f"{root} was built from {_describe_source(old)}, not from {_describe_source(new)}: {what}"


class CacheWriter:
    """Appends shards to a cache folder atomically and tells builders which keys are already done."""

    def __init__(self, root, *, source: dict, params, shard_size: int = DEFAULT_SHARD_SIZE, overwrite: bool = False,
                 targets: Sequence[str] = TARGETS, units: dict[str, str] | None = None):
        self.root = Path(root)
        self.targets = tuple(str(t) for t in targets)
        self.units = {**default_units(self.targets), **(units or {})}
        self.shard_size = int(shard_size)
        self.params = params.as_dict() if hasattr(params, "as_dict") else dict(params)
        self.source = dict(source)
        self.invalid: list[tuple[dict, str]] = []
        if overwrite and self.root.exists():
            shutil.rmtree(self.root)
        (self.root / "shards").mkdir(parents=True, exist_ok=True)
        manifest = read_manifest(self.root)
        if manifest is None:
            manifest = {
                "format": FORMAT,
                "format_version": FORMAT_VERSION,
                "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
                "source": self.source,
                "coordinator": self.params,
                "targets": list(self.targets),
                "units": dict(self.units),
                "shard_size": self.shard_size,
                "next_index": 0,
                "complete": False,
                "shards": [],
            }
        else:
            if manifest.get("source") != self.source:
                raise CacheMismatch(source_change(self.root, manifest.get("source") or {}, self.source))
            held = tuple(manifest.get("targets", TARGETS))
            if held != self.targets:
                raise CacheMismatch(
                    f"{self.root} holds the targets {', '.join(held)}, not {', '.join(self.targets)}; "
                    "use a new --out folder or --overwrite"
                )
            self.units = {**default_units(held), **manifest.get("units", {})}
            self.shard_size = int(manifest.get("shard_size", self.shard_size))
        self.manifest = manifest
        self._validate_existing()

    # -- state -------------------------------------------------------------------------------------
    @property
    def shards(self) -> list[dict]:
        return self.manifest["shards"]

    def _expected(self) -> dict:
        return {"coordinator": self.params, "code_version": cgnn_dgl.__version__, "format_version": FORMAT_VERSION}

    def _validate_existing(self) -> None:
        good = []
        for shard in self.shards:
            reason = check_shard(self.root, shard, self._expected())
            if reason is None:
                good.append(shard)
            else:
                self.invalid.append((shard, reason))
                log.warning("cache shard %s (keys %s..%s) %s: it will be rebuilt", shard["file"],
                            shard["key_first"], shard["key_last"], reason)
                for k in ("file", "meta"):
                    (self.root / shard[k]).unlink(missing_ok=True)
        listed = {self.root / s[k] for s in good for k in ("file", "meta")}
        for f in (self.root / "shards").iterdir():  # orphans of an interrupted write
            if f not in listed:
                f.unlink()
        if len(good) != len(self.shards) or self.manifest.get("coordinator") != self.params:
            self.manifest["shards"] = good
            self.manifest["coordinator"] = self.params
            self.manifest["complete"] = False
            self._save_manifest()
        self._set_ranges(good)

    @property
    def resume_key(self) -> int | None:
        """The largest key covered by a finished shard (None for an empty cache)."""
        return max((s["key_last"] for s in self.shards), default=None)

    @property
    def gaps(self) -> list[tuple[int, int]]:
        """Key ranges of shards dropped as corrupt or stale, to be rebuilt."""
        return sorted((s["key_first"], s["key_last"]) for s, _ in self.invalid)

    def _set_ranges(self, shards: Sequence[dict]) -> None:
        # finished key ranges never overlap, so sorted starts answer every query by bisection
        # (these run once per input item: a linear scan would cost O(items x shards) on the full OQMD)
        ranges = sorted((s["key_first"], s["key_last"]) for s in shards)
        self._starts = [a for a, _ in ranges]
        self._ends = [b for _, b in ranges]

    def covered(self, key: int) -> bool:
        i = bisect.bisect_right(self._starts, key) - 1
        return i >= 0 and key <= self._ends[i]

    def next_uncovered(self, key: int) -> int:
        """The smallest key >= ``key`` that no finished shard covers."""
        i = bisect.bisect_right(self._starts, key) - 1
        while 0 <= i < len(self._starts) and self._starts[i] <= key <= self._ends[i]:
            key = self._ends[i] + 1
            i += 1
        return key

    def blocked_between(self, k1: int, k2: int) -> bool:
        """True when a finished shard starts strictly between two keys (a shard must not span it)."""
        i = bisect.bisect_right(self._starts, k1)
        return i < len(self._starts) and self._starts[i] < k2

    # -- writing -----------------------------------------------------------------------------------
    def write_shard(self, built: Sequence[Built], rejects: Sequence[Reject], key_range: tuple[int, int]) -> dict:
        index = int(self.manifest["next_index"])
        name = _shard_name(index)
        bin_path = self.root / "shards" / f"{name}.bin"
        meta_path = self.root / "shards" / f"{name}.json"
        g, labels = pack_graph(built, len(self.targets))
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=bin_path.parent)
        os.close(fd)
        os.chmod(tmp, umask_mode())
        try:
            dgl.save_graphs(tmp, [g], labels)
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
            os.replace(tmp, bin_path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        meta = {
            "names": [b.name for b in built],
            "rejects": [[r.key, r.name, r.reason, r.message] for r in rejects],
        }
        atomic_write_json(meta_path, meta)
        keys = [b.key for b in built]
        shard = {
            "index": index,
            "file": f"shards/{name}.bin",
            "meta": f"shards/{name}.json",
            "key_first": int(key_range[0]),
            "key_last": int(key_range[1]),
            "n_graphs": len(built),
            "n_rejects": len(rejects),
            "n_atoms": int(labels["n_atoms"].sum()),
            "n_bonds": int(labels["n_bonds"].sum()),
            "id_min": int(min(keys)) if keys else None,
            "id_max": int(max(keys)) if keys else None,
            "file_sha256": sha256_file(bin_path),
            "content_sha256": content_digest(read_shard_arrays(bin_path)),
            "meta_sha256": sha256_file(meta_path),
            "coordinator": self.params,
            "code_version": cgnn_dgl.__version__,
            "format_version": FORMAT_VERSION,
        }
        self.manifest["next_index"] = index + 1
        self.shards.append(shard)
        self.shards.sort(key=lambda s: s["key_first"])
        self._set_ranges(self.shards)
        self._save_manifest()
        return shard

    def _save_manifest(self) -> None:
        atomic_write_json(self.root / MANIFEST, self.manifest)

    def close(self, summary: dict | None = None) -> dict:
        """Mark the cache complete and write the consolidated rejects file."""
        self.manifest["complete"] = True
        self.manifest["totals"] = {
            "graphs": sum(s["n_graphs"] for s in self.shards),
            "rejects": sum(s["n_rejects"] for s in self.shards),
            "atoms": sum(s["n_atoms"] for s in self.shards),
            "bonds": sum(s["n_bonds"] for s in self.shards),
        }
        if summary:
            self.manifest["summary"] = summary
        write_rejects_csv(self.root, self.shards)
        self._save_manifest()
        return self.manifest["totals"]


def iter_rejects(root: Path, shards: Iterable[dict]) -> Iterator[list]:
    for s in shards:
        with open(Path(root) / s["meta"]) as fh:
            yield from json.load(fh)["rejects"]


def write_rejects_csv(root: Path, shards: Sequence[dict]) -> Path:
    path = Path(root) / "rejects.csv"
    rows = sorted(iter_rejects(root, shards), key=lambda r: r[0])
    with atomic_open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["key", "name", "reason", "message"])
        w.writerows(rows)
    return path


class ShardStream:
    """Groups results (in key order) into shards of ``shard_size`` that never straddle finished shards."""

    def __init__(self, writer: CacheWriter):
        self.writer = writer
        self.built: list[Built] = []
        self.rejects: list[Reject] = []
        self.first: int | None = None
        self.last: int | None = None
        self.counts = {"graphs": 0, "rejects": 0, "shards": 0}
        self.reasons: dict[str, int] = {}

    def add(self, item: Built | Reject) -> None:
        if self.last is not None:
            if item.key <= self.last:
                raise ValueError(f"keys must increase: {item.key} after {self.last}")
            if self.writer.blocked_between(self.last, item.key):
                self.flush()
        if self.first is None:
            self.first = item.key
        self.last = item.key
        if isinstance(item, Reject):
            self.rejects.append(item)
            self.counts["rejects"] += 1
            self.reasons[item.reason] = self.reasons.get(item.reason, 0) + 1
        else:
            self.built.append(item)
            self.counts["graphs"] += 1
        if len(self.built) + len(self.rejects) >= self.writer.shard_size:
            self.flush()

    def flush(self, key_last: int | None = None) -> None:
        """Write the pending shard; ``key_last`` may extend its range (e.g. to the end of a DB page)."""
        if self.first is None:
            return
        self.writer.write_shard(self.built, self.rejects, (self.first, max(self.last, key_last or self.last)))
        self.counts["shards"] += 1
        self.built, self.rejects, self.first, self.last = [], [], None, None


# --------------------------------------------------------------------------------------------------
# reading, merging, CLI


def open_manifest(root) -> dict:
    root = Path(root)
    manifest = read_manifest(root)
    if manifest is None:
        raise CgnnError(f"{root}: no cache here (missing {MANIFEST}); build one with `cgnn graphs` or `cgnn ingest`")
    return manifest


def verify_cache(root, *, params=None) -> list[tuple[dict, str]]:
    """Every unusable shard with its reason (checksums, and parameters when ``params`` is given)."""
    manifest = open_manifest(root)
    expected = None
    if params is not None:
        expected = {"coordinator": params.as_dict() if hasattr(params, "as_dict") else dict(params)}
    bad = []
    for shard in manifest["shards"]:
        reason = check_shard(Path(root), shard, expected)
        if reason:
            bad.append((shard, reason))
    return bad


def rebuild_command(root) -> str:
    """The command that rebuilds the cache at ``root`` from its recorded source (for error messages)."""
    root = Path(root)
    source = (read_manifest(root) or {}).get("source", {})
    if source.get("kind") == "files":
        import shlex

        return "cgnn graphs " + " ".join(shlex.quote(p) for p in source.get("inputs", [])) + \
            f" --out {shlex.quote(str(root))} --overwrite"
    if source.get("kind") == "oqmd-db":
        return f"cgnn ingest --db {source.get('db', 'URL')} --out {root} --overwrite"
    return f"the command that built it, with --out {root} --overwrite"


def require_bond_ratios(packed, root) -> None:
    """One-line error for a geometry model on a cache without per-bond distance ratios (built before v2)."""
    if packed.bond_ratio is None:
        raise CgnnError(f"{root}: this cache has no bond distance ratios, which model.geometry needs (it was "
                        f"built by an older cgnn-dgl); rebuild it: {rebuild_command(root)}")


def load_packed(root, *, verify: bool = True, progress: bool = False) -> PackedGraphs:
    """All graphs of a cache as compact in-memory arrays (see :class:`cgnn_dgl.batching.PackedGraphs`),
    each shard checked against its recorded digest first unless ``verify`` is False."""
    from cgnn_dgl.report import progress as bar

    root = Path(root)
    manifest = open_manifest(root)
    if not manifest.get("complete"):
        raise CgnnError(f"{root}: the cache build did not finish; run the same build command again to resume")
    targets = tuple(manifest.get("targets", TARGETS))  # caches before the task layer hold the OQMD four
    units = {**default_units(targets), **manifest.get("units", {})}
    parts = []
    for shard in bar(manifest["shards"], desc="loading cache", unit="shard", disable=not progress or None):
        if verify:
            reason = check_shard(root, shard)
            if reason:
                raise CgnnError(f"{root}: shard {shard['file']} (keys {shard['key_first']}..{shard['key_last']}) "
                                f"is unusable: {reason}; rerun the build command to rebuild it")
        a = read_shard_arrays(root / shard["file"])
        with open(root / shard["meta"]) as fh:
            names = json.load(fh)["names"]
        parts.append(PackedGraphs.from_arrays(a["numbers"], a["n_atoms"], a["n_bonds"], a["bond_src"], a["bond_dst"],
                                              a["y"], a["y_mask"], a["entry_id"], names, targets, units,
                                              a.get("bond_ratio")))
    packed = PackedGraphs.concatenate(parts, targets, units)
    packed.positional_keys = (manifest.get("source") or {}).get("kind") == "files"
    return packed


def merge_caches(inputs: Sequence, out) -> dict:
    """Join caches built with the same parameters (e.g. ``cgnn ingest --shard i/N`` on many machines)."""
    out = Path(out)
    manifests = [(Path(p), open_manifest(p)) for p in inputs]
    coords = {json.dumps(m["coordinator"], sort_keys=True) for _, m in manifests}
    if len(coords) > 1:
        raise CacheMismatch("caches were built with different coordinator parameters; cannot merge")
    held = {tuple(m.get("targets", TARGETS)) for _, m in manifests}
    if len(held) > 1:
        raise CacheMismatch(f"caches hold different targets ({'; '.join(', '.join(t) for t in sorted(held))}); cannot merge")
    for p, m in manifests:
        if not m.get("complete"):
            raise CgnnError(f"{p}: cache is incomplete; finish its build (run the same command again) before merging")
        bad = verify_cache(p)
        if bad:
            raise CgnnError(f"{p}: shard {bad[0][0]['file']} is unusable ({bad[0][1]})")
    if out.exists() and any(out.iterdir()):
        raise CgnnError(f"{out} exists and is not empty; choose a new folder")
    (out / "shards").mkdir(parents=True, exist_ok=True)
    shards = []
    for p, m in manifests:
        for s in m["shards"]:
            shards.append((p, s))
    shards.sort(key=lambda ps: (ps[1]["key_first"], str(ps[0])))
    seen_keys: set[int] = set()
    merged = []
    for index, (p, s) in enumerate(shards):
        keys = read_shard_arrays(p / s["file"])["entry_id"].tolist()
        dup = seen_keys.intersection(keys)
        if dup:
            raise CgnnError(f"key {min(dup)} appears in more than one input cache; were shards overlapping?")
        seen_keys.update(keys)
        new = dict(s, index=index, file=f"shards/{_shard_name(index)}.bin", meta=f"shards/{_shard_name(index)}.json")
        shutil.copyfile(p / s["file"], out / new["file"])
        shutil.copyfile(p / s["meta"], out / new["meta"])
        merged.append(new)
    first = manifests[0][1]
    manifest = dict(first, source={"merged_from": [dict(m["source"]) for _, m in manifests]}, shards=merged,
                    next_index=len(merged), complete=True)
    manifest["totals"] = {k: sum(s[f"n_{k}"] for s in merged) for k in ("graphs", "rejects", "atoms", "bonds")}
    write_rejects_csv(out, merged)
    atomic_write_json(out / MANIFEST, manifest)
    return manifest["totals"]


def export_json(root, out) -> int:
    """Write a cache as a JSON list in the reference layout: {name, key, numbers, neighbors, targets}.

    ``neighbors[j]`` lists the neighbour atoms of atom ``j`` in the reference's order, so the file can be
    compared with the reference coordinator's output (or the official ``graph_data.npz``) directly.
    """
    packed = load_packed(root)
    rows = []
    for k in range(len(packed)):
        a0, a1 = packed.node_ptr[k], packed.node_ptr[k + 1]
        e0, e1 = packed.edge_ptr[k], packed.edge_ptr[k + 1]
        counts = np.bincount(packed.bond_dst[e0:e1], minlength=int(a1 - a0))
        nbr = packed.bond_src[e0:e1].tolist()
        ptr = np.concatenate([[0], np.cumsum(counts)]).tolist()
        y = {t: (float(packed.y[k, i]) if packed.y_mask[k, i] else None) for i, t in enumerate(packed.targets)}
        rows.append({"name": packed.names[k], "key": int(packed.entry_id[k]),
                     "numbers": packed.numbers[a0:a1].astype(int).tolist(),
                     "neighbors": [nbr[ptr[j]:ptr[j + 1]] for j in range(len(counts))], "targets": y})
    with atomic_open(out, "w") as fh:
        json.dump(rows, fh)
    return len(rows)


def _cmd_cache(args) -> int:
    from cgnn_dgl.report import print_table

    if args.cache_command == "export":
        from cgnn_dgl.fileio import output_file

        out = output_file(args.out, "graphs.json")
        n = export_json(args.cache, out)
        print(f"wrote {n} graphs (name, key, numbers, neighbors, targets) to {out}")
        return 0
    if args.cache_command == "merge":
        totals = merge_caches(args.inputs, args.out)
        print_table("merged cache", [(k, v) for k, v in totals.items()])
        return 0
    manifest = open_manifest(args.cache)
    if args.cache_command == "verify":
        bad = verify_cache(args.cache)
        for shard, reason in bad:
            print(f"{shard['file']} (keys {shard['key_first']}..{shard['key_last']}): {reason}")
        print(f"{len(manifest['shards']) - len(bad)} of {len(manifest['shards'])} shards good")
        return 1 if bad else 0
    rows = [
        ("source", json.dumps(manifest["source"])),
        ("coordinator", json.dumps(manifest["coordinator"])),
        ("targets", ", ".join(f"{t} ({u})" if u else t for t, u in
                              {**default_units(manifest.get("targets", TARGETS)), **manifest.get("units", {})}.items())),
        ("complete", manifest.get("complete")),
        ("shards", len(manifest["shards"])),
        ("graphs", sum(s["n_graphs"] for s in manifest["shards"])),
        ("rejects", sum(s["n_rejects"] for s in manifest["shards"])),
        ("atoms", sum(s["n_atoms"] for s in manifest["shards"])),
        ("bonds", sum(s["n_bonds"] for s in manifest["shards"])),
    ]
    print_table(f"cache {args.cache}", rows)
    return 0


def register(sub) -> None:
    p = sub.add_parser("cache", help="inspect, verify or merge graph caches")
    csub = p.add_subparsers(dest="cache_command", metavar="ACTION", required=True)
    info = csub.add_parser("info", help="summary of a cache")
    info.add_argument("cache", help="cache folder")
    ver = csub.add_parser("verify", help="check every shard's checksum")
    ver.add_argument("cache", help="cache folder")
    merge = csub.add_parser("merge", help="join caches built with --shard i/N into one")
    merge.add_argument("inputs", nargs="+", metavar="CACHE", help="cache folders built with --shard i/N")
    merge.add_argument("--out", required=True, metavar="CACHE", help="the merged cache folder (new)")
    exp = csub.add_parser("export", help="write the graphs as JSON in the reference layout (numbers, neighbors)")
    exp.add_argument("cache", help="cache folder")
    exp.add_argument("--out", required=True, metavar="JSON",
                     help="JSON file, or an existing folder to write graphs.json in")
    p.set_defaults(func=_cmd_cache)
