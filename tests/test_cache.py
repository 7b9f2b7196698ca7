"""Graph cache: packing, atomic shards, resume, corrupt/stale shard rebuild, merge, batching."""
from __future__ import annotations

import json

import dgl
import numpy as np
import pytest
import torch

from cgnn_dgl.batching import PackedGraphs, iter_batches
from cgnn_dgl.cache import Built, CacheMismatch, CacheWriter, Reject, ShardStream, load_packed, merge_caches
from cgnn_dgl.errors import CgnnError
from cgnn_dgl.graph import graph_from_neighbors
from cgnn_dgl.schema import BOND

PARAMS = {"radius_factor": 1.2, "cc_cutoff": 0.03, "max_rounds": 10}
SOURCE = {"kind": "test"}


def _built(key: int, row: dict) -> Built:
    counts = np.array([len(n) for n in row["neighbors"]], dtype=np.int64)
    nbr = np.array([i for n in row["neighbors"] for i in n], dtype=np.int64)
    y = np.array([key * 0.01, 10.0 + key, np.nan, 0.5])
    return Built(key, row["name"], np.array(row["numbers"]), counts, nbr, np.nan_to_num(y), np.isfinite(y))


@pytest.fixture(scope="module")
def records(dev_corpus):
    """150 real reference graphs plus every 7th key rejected, keys with holes (like entry ids)."""
    out = []
    rows = [r for r in dev_corpus if r["error"] is None][:150]
    for k, row in enumerate(rows):
        key = 3 * k + 1
        out.append(Reject(key, row["name"], "test_reason", "rejected on purpose") if k % 7 == 3 else _built(key, row))
    return out


def _write(root, records, shard_size=32, stop_after=None, params=PARAMS, overwrite=False):
    writer = CacheWriter(root, source=SOURCE, params=params, shard_size=shard_size, overwrite=overwrite)
    stream = ShardStream(writer)
    for _n, rec in enumerate(r for r in records if not writer.covered(r.key)):
        if stop_after is not None and stream.counts["shards"] >= stop_after:
            return writer  # "killed": no flush, no close
        stream.add(rec)
    stream.flush()
    writer.close()
    return writer


def _shard_digests(root):
    m = json.loads((root / "manifest.json").read_text())
    return [(s["key_first"], s["key_last"], s["content_sha256"], s["meta_sha256"]) for s in m["shards"]]


def test_roundtrip_matches_single_graphs(tmp_path, records, dev_corpus):
    _write(tmp_path / "c", records)
    packed = load_packed(tmp_path / "c")
    built = [r for r in records if isinstance(r, Built)]
    assert len(packed) == len(built)
    assert packed.entry_id.tolist() == [b.key for b in built]
    idx = np.array([5, 0, 17, 3, 40])
    g = packed.batch(idx)
    ref = dgl.batch([graph_from_neighbors(built[i].numbers,
                                          np.split(built[i].nbr, np.cumsum(built[i].counts)[:-1]),
                                          built[i].y, entry_id=built[i].key) for i in idx])
    for a, b in zip(g.edges(etype=BOND, order="eid"), ref.edges(etype=BOND, order="eid")):
        assert torch.equal(a, b)
    assert torch.equal(g.nodes["atom"].data["Z"], ref.nodes["atom"].data["Z"])
    assert torch.equal(g.batch_num_nodes("atom"), ref.batch_num_nodes("atom"))
    assert torch.equal(g.nodes["crystal"].data["entry_id"], torch.tensor([built[i].key for i in idx]))
    np.testing.assert_array_equal(g.nodes["crystal"].data["y_mask"].numpy(), np.stack([built[i].y_mask for i in idx]))
    rejects = (tmp_path / "c" / "rejects.csv").read_text().splitlines()
    assert len(rejects) == 1 + sum(isinstance(r, Reject) for r in records)


def test_interrupted_build_resumes_identically(tmp_path, records):
    _write(tmp_path / "clean", records)
    for stop in (1, 3):
        _write(tmp_path / "resumed", records, stop_after=stop)
    # an orphan temporary file from a kill during a shard write must not survive
    (tmp_path / "resumed" / "shards" / ".shard-000099.xyz.tmp").write_bytes(b"partial")
    with pytest.raises(CgnnError, match="did not finish"):
        load_packed(tmp_path / "resumed")
    _write(tmp_path / "resumed", records)
    assert _shard_digests(tmp_path / "resumed") == _shard_digests(tmp_path / "clean")
    assert not list((tmp_path / "resumed" / "shards").glob(".*"))
    a, b = load_packed(tmp_path / "clean"), load_packed(tmp_path / "resumed")
    assert a.entry_id.tolist() == b.entry_id.tolist()
    assert np.array_equal(a.bond_src, b.bond_src) and np.array_equal(a.numbers, b.numbers)


def test_corrupt_shard_is_named_and_rebuilt_alone(tmp_path, records, caplog):
    root = tmp_path / "c"
    _write(root, records)
    manifest = json.loads((root / "manifest.json").read_text())
    victim = manifest["shards"][2]
    data = bytearray((root / victim["file"]).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (root / victim["file"]).write_bytes(bytes(data))
    with pytest.raises(CgnnError, match=victim["file"]):
        load_packed(root)
    untouched = {s["file"]: (root / s["file"]).stat().st_mtime_ns for s in manifest["shards"] if s is not victim}
    writer = CacheWriter(root, source=SOURCE, params=PARAMS)
    assert [s["file"] for s, _ in writer.invalid] == [victim["file"]]
    assert "checksum" in writer.invalid[0][1]
    assert writer.gaps == [(victim["key_first"], victim["key_last"])]
    _write(root, records)
    for f, mtime in untouched.items():
        assert (root / f).stat().st_mtime_ns == mtime
    _write(tmp_path / "clean", records)
    assert [d[2] for d in _shard_digests(root)] == [d[2] for d in _shard_digests(tmp_path / "clean")]


def test_stale_parameters_rebuild_everything(tmp_path, records):
    root = tmp_path / "c"
    _write(root, records)
    writer = CacheWriter(root, source=SOURCE, params=dict(PARAMS, radius_factor=1.3))
    assert writer.invalid and all("stale" in reason for _, reason in writer.invalid)
    assert writer.resume_key is None


def test_other_source_is_refused(tmp_path, records):
    _write(tmp_path / "c", records)
    with pytest.raises(CacheMismatch):
        CacheWriter(tmp_path / "c", source={"kind": "other"}, params=PARAMS)


def test_merge(tmp_path, records):
    even = [r for r in records if r.key % 2 == 0]
    odd = [r for r in records if r.key % 2 == 1]
    _write(tmp_path / "a", even, shard_size=20)
    _write(tmp_path / "b", odd, shard_size=20)
    totals = merge_caches([tmp_path / "a", tmp_path / "b"], tmp_path / "m")
    merged = load_packed(tmp_path / "m")
    assert sorted(merged.entry_id.tolist()) == sorted(r.key for r in records if isinstance(r, Built))
    assert totals["rejects"] == sum(isinstance(r, Reject) for r in records)
    with pytest.raises(CgnnError, match="more than one"):
        merge_caches([tmp_path / "a", tmp_path / "a"], tmp_path / "m2")


def test_iter_batches_cover_everything_once(records):
    packed = PackedGraphs.from_built([r for r in records if isinstance(r, Built)])
    seen = []
    for idx, g in iter_batches(packed, np.arange(len(packed)), 16, shuffle=True, rng=np.random.default_rng(0)):
        assert g.num_nodes("crystal") == len(idx)
        assert g.num_nodes("atom") == int(packed.n_atoms[idx].sum())
        seen.extend(idx.tolist())
    assert sorted(seen) == list(range(len(packed)))
    sub = packed.subset([4, 2])
    assert sub.names == [packed.names[4], packed.names[2]]
    assert np.array_equal(sub.batch([0]).nodes["atom"].data["Z"].numpy(), packed.batch([4]).nodes["atom"].data["Z"].numpy())


def test_key_range_queries(tmp_path):
    writer = CacheWriter(tmp_path / "c", source=SOURCE, params=PARAMS)
    writer._set_ranges([{"key_first": 1, "key_last": 5}, {"key_first": 6, "key_last": 9},
                        {"key_first": 20, "key_last": 30}])
    assert [k for k in range(33) if writer.covered(k)] == list(range(1, 10)) + list(range(20, 31))
    assert writer.next_uncovered(3) == 10 and writer.next_uncovered(12) == 12 and writer.next_uncovered(25) == 31
    assert writer.blocked_between(10, 21) and not writer.blocked_between(10, 20) and not writer.blocked_between(20, 25)


def _labelled(dev_corpus, names, n=12):
    """Real graphs labelled with ``len(names)`` made-up values each (every 3rd one unlabelled in column 0)."""
    rows = [r for r in dev_corpus if r["error"] is None][:n]
    out = []
    for k, row in enumerate(rows):
        counts = np.array([len(x) for x in row["neighbors"]], dtype=np.int64)
        nbr = np.array([i for x in row["neighbors"] for i in x], dtype=np.int64)
        y = np.array([k + 0.5 * j for j in range(len(names))], dtype=np.float64)
        if k % 3 == 0:
            y[0] = np.nan
        out.append(Built(k, row["name"], np.array(row["numbers"]), counts, nbr, np.nan_to_num(y), np.isfinite(y)))
    return out


def test_cache_records_any_target_names_and_units(tmp_path, dev_corpus):
    names = ("heat_all", "dir_gap", "bulk_modulus")
    built = _labelled(dev_corpus, names)
    writer = CacheWriter(tmp_path / "c", source=SOURCE, params=PARAMS, shard_size=5, targets=names,
                         units={"heat_all": "eV", "dir_gap": "eV"})
    stream = ShardStream(writer)
    for b in built:
        stream.add(b)
    stream.flush()
    writer.close()
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert manifest["targets"] == list(names)
    assert manifest["units"] == {"heat_all": "eV", "dir_gap": "eV", "bulk_modulus": ""}
    packed = load_packed(tmp_path / "c")
    assert packed.targets == names and packed.units["dir_gap"] == "eV"
    assert packed.y.shape == (len(built), 3)
    np.testing.assert_array_equal(packed.y_mask[:, 0], [k % 3 != 0 for k in range(len(built))])
    np.testing.assert_allclose(packed.y[:, 2], [k + 1.0 for k in range(len(built))])
    sub = packed.subset([1, 4])
    assert sub.targets == names and sub.y.shape == (2, 3)
    assert packed.batch([0, 1]).nodes["crystal"].data["y"].shape == (2, 3)
    # reopening with other targets is refused with a message naming what the cache holds
    with pytest.raises(CacheMismatch, match="holds the targets heat_all, dir_gap, bulk_modulus"):
        CacheWriter(tmp_path / "c", source=SOURCE, params=PARAMS, targets=("formation_energy",))


def test_cache_without_units_reads_as_oqmd_targets(tmp_path, records):
    """A manifest written before units were recorded still loads, with the OQMD units."""
    _write(tmp_path / "c", records)
    path = tmp_path / "c" / "manifest.json"
    manifest = json.loads(path.read_text())
    del manifest["units"]
    path.write_text(json.dumps(manifest))
    packed = load_packed(tmp_path / "c")
    assert packed.targets == ("formation_energy", "volume_per_atom", "band_gap", "magnetization")
    assert packed.units == {"formation_energy": "eV/atom", "volume_per_atom": "Å³/atom", "band_gap": "eV",
                            "magnetization": "μB/atom"}


def test_merge_refuses_caches_with_different_targets(tmp_path, dev_corpus):
    for sub_dir, names in (("a", ("heat_all",)), ("b", ("dir_gap",))):
        writer = CacheWriter(tmp_path / sub_dir, source={"kind": sub_dir}, params=PARAMS, targets=names)
        stream = ShardStream(writer)
        for b in _labelled(dev_corpus, names, n=3):
            stream.add(b)
        stream.flush()
        writer.close()
    with pytest.raises(CacheMismatch, match="different targets"):
        merge_caches([tmp_path / "a", tmp_path / "b"], tmp_path / "m")


# ------------------------------------------------------------------ per-bond ratios (model.geometry)


def test_bond_ratios_survive_cache_batching_and_subsets(tmp_path, dev_corpus):
    from cgnn_dgl.coordinator import coordinate_many
    from cgnn_dgl.pipeline import BuildItem, build_many
    from cgnn_dgl.schema import RATIO
    from cgnn_dgl.structures import Crystal

    rows = [r for r in dev_corpus if r["error"] is None][:60]
    crystals = [Crystal(r["name"], r["lattice"], r["numbers"], r["frac"]) for r in rows]
    built = list(build_many([BuildItem(k, c, np.zeros(4)) for k, c in enumerate(crystals)]))
    writer = CacheWriter(tmp_path / "c", source=SOURCE, params=PARAMS, shard_size=16)
    stream = ShardStream(writer)
    for b in built:
        stream.add(b)
    stream.flush()
    writer.close()
    packed = load_packed(tmp_path / "c")
    want = np.concatenate([res[2] for res in coordinate_many(crystals, ratios=True)]).astype(np.float32)
    assert packed.bond_ratio is not None and packed.bond_ratio.dtype == np.float32
    np.testing.assert_array_equal(packed.bond_ratio, want)
    idx = np.array([5, 2, 40])
    sub = packed.subset(idx)
    g = packed.batch(idx)
    np.testing.assert_array_equal(g.edges[BOND].data[RATIO].numpy(), sub.bond_ratio)
    e = [want[packed.edge_ptr[i]:packed.edge_ptr[i + 1]] for i in idx]
    np.testing.assert_array_equal(sub.bond_ratio, np.concatenate(e))
    joined = PackedGraphs.concatenate([sub, packed.subset([0])])
    assert joined.bond_ratio.shape == joined.bond_src.shape


def test_cache_without_ratios_loads_and_names_the_rebuild(tmp_path, records):
    """Shards written without ratios (older caches) still load for geometry-off models; a geometry
    model gets one line with the rebuild command."""
    from cgnn_dgl.cache import require_bond_ratios

    writer = CacheWriter(tmp_path / "old", source={"kind": "files", "inputs": ["/data/cifs"], "count": 3},
                         params=PARAMS, shard_size=32)
    stream = ShardStream(writer)
    for rec in records:
        stream.add(rec)
    stream.flush()
    writer.close()
    packed = load_packed(tmp_path / "old")
    assert packed.bond_ratio is None and len(packed) > 0
    assert RATIO_KEY not in packed.batch([0, 1]).edges[BOND].data
    with pytest.raises(CgnnError, match=r"no bond distance ratios.*cgnn graphs /data/cifs --out .*old --overwrite"):
        require_bond_ratios(packed, tmp_path / "old")
    mixed = PackedGraphs.concatenate([packed.subset([0]), packed.subset([1])])
    assert mixed.bond_ratio is None


RATIO_KEY = "ratio"


def test_a_shard_of_only_rejects_is_valid(tmp_path):
    """Issue 8.1: zero crystals in a shard used to crash read_shard_arrays (atom_off of length 1)."""
    rejects = [Reject(1, "in/a.cif", "parse_error", "bad"), Reject(2, "in/b.vasp", "parse_error", "bad")]
    _write(tmp_path / "c", rejects)
    m = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert [s["n_graphs"] for s in m["shards"]] == [0]
    assert len(load_packed(tmp_path / "c")) == 0
    assert "in/b.vasp" in (tmp_path / "c" / "rejects.csv").read_text()


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_cache_files_respect_the_umask(tmp_path, records, umask):
    """Issue 8.7: atomic writes used mkstemp's 0600 whatever the umask."""
    import os

    old = os.umask(umask)
    try:
        _write(tmp_path / "c", records[:40])
    finally:
        os.umask(old)
    files = [p for p in (tmp_path / "c").rglob("*") if p.is_file()]
    assert files and {p.stat().st_mode & 0o777 for p in files} == {0o666 & ~umask}
