"""The reference's formula-grouped split and its persistence."""
from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from cgnn_dgl.errors import UsageError
from cgnn_dgl.split import formula_split, load_split, random_split, read_split_file, save_split


def _reference_split(formulas, nelements, seed=12345):
    """The reference recipe written out literally: global np.random.seed + shuffle of the unique list."""
    multi = []
    for f, n in zip(formulas, nelements):
        if n > 1 and f not in multi:
            multi.append(f)
    state = np.random.get_state()
    try:
        np.random.seed(seed)
        np.random.shuffle(multi)
    finally:
        np.random.set_state(state)
    n = len(multi)
    test_f, val_f = set(multi[: int(0.1 * n)]), set(multi[int(0.1 * n): 2 * int(0.1 * n)])
    parts = {"train": [], "val": [], "test": []}
    for i, (f, ne) in enumerate(zip(formulas, nelements)):
        parts["test" if ne > 1 and f in test_f else "val" if ne > 1 and f in val_f else "train"].append(i)
    return parts


def _corpus(n=700, seed=0):
    rng = np.random.default_rng(seed)
    formulas, nel = [], []
    for _ in range(n):
        if rng.random() < 0.1:
            formulas.append(f"E{rng.integers(5)}")
            nel.append(1)
        else:
            formulas.append(f"A{rng.integers(60)}B{rng.integers(4)}")
            nel.append(2)
    return formulas, np.array(nel)


def test_matches_literal_reference_recipe():
    formulas, nel = _corpus()
    got = formula_split(formulas, nel)
    want = _reference_split(formulas, nel)
    for part in ("train", "val", "test"):
        assert got[part].tolist() == want[part]


def test_formula_groups_and_unary_in_train():
    formulas, nel = _corpus()
    s = formula_split(formulas, nel)
    allidx = np.concatenate([s["train"], s["val"], s["test"]])
    assert sorted(allidx.tolist()) == list(range(len(formulas)))
    f = np.array(formulas, dtype=object)
    sets = {p: set(f[s[p]]) for p in s}
    assert not (sets["train"] & sets["val"]) and not (sets["train"] & sets["test"]) and not (sets["val"] & sets["test"])
    assert all(nel[i] > 1 for i in np.concatenate([s["val"], s["test"]]))
    n_multi = len({x for x, n in zip(formulas, nel) if n > 1})
    assert len(sets["test"]) == int(0.1 * n_multi) == len(sets["val"])
    # all unary entries in train
    assert set(np.flatnonzero(nel == 1)) <= set(s["train"].tolist())


def test_seed_changes_split():
    formulas, nel = _corpus()
    a = formula_split(formulas, nel, seed=12345)
    b = formula_split(formulas, nel, seed=1)
    assert a["test"].tolist() != b["test"].tolist()


def test_save_load_survives_reordering(tmp_path):
    formulas, nel = _corpus(200)
    ids = np.arange(1000, 1200)
    names = [f"x{i}" for i in ids]
    s = formula_split(formulas, nel)
    save_split(tmp_path / "split.json", s, ids, names)
    doc = json.loads((tmp_path / "split.json").read_text())
    assert doc["key"] == "entry_id"
    perm = np.random.default_rng(3).permutation(200)
    loaded = load_split(tmp_path / "split.json", ids[perm], [names[i] for i in perm])
    for part in s:
        assert sorted(ids[perm][loaded[part]].tolist()) == sorted(ids[s[part]].tolist())


def test_keys_by_name_when_ids_repeat(tmp_path):
    s = {"train": np.array([0, 2]), "val": np.array([1]), "test": np.array([], dtype=np.int64)}
    save_split(tmp_path / "s.json", s, [-1, -1, -1], ["a", "b", "c"])
    assert json.loads((tmp_path / "s.json").read_text())["key"] == "name"
    got = load_split(tmp_path / "s.json", [5, 6, 7], ["c", "a", "b"])
    assert got["train"].tolist() == [0, 1] and got["val"].tolist() == [2]


def test_positional_ids_key_by_name_and_fall_back_to_ids(tmp_path):
    """Input-order entry ids (a `cgnn graphs` cache): the split is keyed by name, so a cache rebuilt from the
    same inputs in another order (ids 0, 1, ... again) keeps each crystal in its part; repeated names fall
    back to the ids."""
    s = {"train": np.array([0, 2]), "val": np.array([1]), "test": np.array([3])}
    names = ["a", "b", "c", "d"]
    save_split(tmp_path / "s.json", s, [0, 1, 2, 3], names, prefer_names=True)
    assert json.loads((tmp_path / "s.json").read_text())["key"] == "name"
    got = load_split(tmp_path / "s.json", [0, 1, 2, 3], ["d", "c", "b", "a"])  # rebuilt, reversed
    assert got["train"].tolist() == [1, 3] and got["val"].tolist() == [2] and got["test"].tolist() == [0]
    save_split(tmp_path / "t.json", s, [0, 1, 2, 3], ["a", "a", "c", "d"], prefer_names=True)
    assert json.loads((tmp_path / "t.json").read_text())["key"] == "entry_id"


def test_bad_split_file(tmp_path):
    with pytest.raises(UsageError):
        load_split(tmp_path / "missing.json", [1], ["a"])
    (tmp_path / "bad.json").write_text("[1, 2]")
    with pytest.raises(UsageError):
        load_split(tmp_path / "bad.json", [1], ["a"])
    (tmp_path / "none.json").write_text(json.dumps({"key": "entry_id", "train": [99], "val": [], "test": []}))
    with pytest.raises(UsageError):
        load_split(tmp_path / "none.json", [1], ["a"])


# --------------------------------------------------------------------------------------------------
# train.split: random (seeded) and file (a user's ids per part)


@given(st.integers(0, 300), st.integers(0, 2**32 - 1), st.sampled_from([0.0, 0.1, 0.25]),
       st.sampled_from([0.0, 0.1, 0.3]))
def test_random_split_partitions_the_rows_by_the_fractions(n, seed, val, test):
    parts = random_split(n, seed, val, test)
    rows = np.concatenate([parts[p] for p in ("train", "val", "test")])
    assert sorted(rows.tolist()) == list(range(n))  # every row once
    assert len(parts["test"]) == int(test * n) and len(parts["val"]) == int(val * n)
    again = random_split(n, seed, val, test)
    assert all(np.array_equal(parts[p], again[p]) for p in parts)  # seeded


def test_random_split_depends_on_the_seed():
    a, b = random_split(200, 1), random_split(200, 2)
    assert not np.array_equal(a["test"], b["test"])


def test_user_split_file_json_and_csv_keyed_by_id(tmp_path):
    names = ["mp-1", "mp-2", "mp-3", "mp-4", "mp-5"]
    ids = [10, 11, 12, 13, 14]
    (tmp_path / "s.json").write_text(json.dumps({"train": ["mp-3", "mp-1"], "val": ["mp-5"], "test": ["mp-2"]}))
    got = read_split_file(tmp_path / "s.json", ids, names)
    assert {p: v.tolist() for p, v in got.items()} == {"train": [0, 2], "val": [4], "test": [1]}
    (tmp_path / "s.csv").write_text("id,split\nmp-3,train\nmp-1,train\nmp-5,val\nmp-2,test\n")
    got_csv = read_split_file(tmp_path / "s.csv", ids, names)
    assert all(np.array_equal(got[p], got_csv[p]) for p in got)
    (tmp_path / "e.json").write_text(json.dumps({"train": [13, 14], "val": [10], "test": []}))  # entry ids
    assert read_split_file(tmp_path / "e.json", ids, names)["train"].tolist() == [3, 4]


@pytest.mark.parametrize(("text", "suffix", "message"), [
    ('{"train": ["mp-1", "mp-9", "x"], "val": [], "test": []}', ".json", "2 of its 3 ids are not in the cache: mp-9, x"),
    ('{"train": ["mp-1"], "val": ["mp-1"], "test": []}', ".json", "1 id(s) given more than once: mp-1"),
    ("id,split\nmp-1,training\n", ".csv", "line 2: split 'training' is not one of train, val, test"),
    ("name\nmp-1\n", ".csv", "needs a header with columns id and split"),
    ('{"train": [], "val": [], "test": []}', ".json", "names no ids"),
    ("[1, 2]", ".json", "not a split file"),
])
def test_user_split_file_errors_are_clear(tmp_path, text, suffix, message):
    path = tmp_path / f"s{suffix}"
    path.write_text(text)
    with pytest.raises(UsageError) as exc:
        read_split_file(path, [10, 11], ["mp-1", "mp-2"])
    assert message in str(exc.value) and "\n" not in str(exc.value)


def test_train_split_options_choose_the_split(tmp_path):
    from cgnn_dgl.config import TrainConfig
    from cgnn_dgl.train import make_split

    packed = type("P", (), {"entry_id": np.arange(50), "names": [f"s{i}" for i in range(50)],
                            "__len__": lambda self: 50})()
    got = make_split(packed, TrainConfig(split="random", split_seed=7, val_fraction=0.2, test_fraction=0.2))
    want = random_split(50, 7, 0.2, 0.2)
    assert all(np.array_equal(got[p], want[p]) for p in want)
    (tmp_path / "s.csv").write_text("id,split\ns3,test\ns4,val\ns0,train\n")
    got = make_split(packed, TrainConfig(split="file", split_file=str(tmp_path / "s.csv")))
    assert {p: v.tolist() for p, v in got.items()} == {"train": [0], "val": [4], "test": [3]}
    with pytest.raises(UsageError, match=r"split: file needs train\.split_file"):
        TrainConfig(split="file").validate()
    with pytest.raises(UsageError, match="is not one of formula, random, file"):
        TrainConfig(split="kfold").validate()


def test_graphs_cache_split_survives_a_reordered_rebuild(tmp_path, dev_corpus):
    """A run on a `cgnn graphs` cache (entry ids = input order) keys its split by name: evaluated on the
    same crystals rebuilt in reverse order, every part holds the same crystals (by entry id, the reversed
    cache would have put other crystals in the test split)."""
    import json

    from test_train import tiny_config, usable_rows, write_cache

    from cgnn_dgl.split import load_split
    from cgnn_dgl.train import load_cache, train_run

    rows = [dict(r, name=f"{r['source']}-{r['name']}-{i}") for i, r in enumerate(usable_rows(dev_corpus, 120))]
    cache = write_cache(tmp_path / "cache", rows, seed=2, kind="files")
    train_run(tiny_config(cache, tmp_path / "run", epochs=1), tmp_path / "run")
    doc = json.loads((tmp_path / "run" / "split.json").read_text())
    assert doc["key"] == "name"
    rebuilt = load_cache(str(write_cache(tmp_path / "rev", rows[::-1], seed=2, kind="files")))
    got = load_split(tmp_path / "run" / "split.json", rebuilt.entry_id, rebuilt.names)
    for part in ("train", "val", "test"):
        assert sorted(rebuilt.names[i] for i in got[part]) == sorted(doc[part])
    db_like = write_cache(tmp_path / "db", rows, seed=2)  # a database cache: real entry ids stay the key
    train_run(tiny_config(db_like, tmp_path / "run2", epochs=1), tmp_path / "run2")
    assert json.loads((tmp_path / "run2" / "split.json").read_text())["key"] == "entry_id"
