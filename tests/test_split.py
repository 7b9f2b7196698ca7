"""The reference's formula-grouped split and its persistence."""
from __future__ import annotations

import json

import numpy as np
import pytest

from cgnn_dgl.errors import UsageError
from cgnn_dgl.split import formula_split, load_split, save_split


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


def test_bad_split_file(tmp_path):
    with pytest.raises(UsageError):
        load_split(tmp_path / "missing.json", [1], ["a"])
    (tmp_path / "bad.json").write_text("[1, 2]")
    with pytest.raises(UsageError):
        load_split(tmp_path / "bad.json", [1], ["a"])
    (tmp_path / "none.json").write_text(json.dumps({"key": "entry_id", "train": [99], "val": [], "test": []}))
    with pytest.raises(UsageError):
        load_split(tmp_path / "none.json", [1], ["a"])
