"""Valence flags (model.valence_features): closed shells of textbook ions, the flags of known compounds,
invariance of the flags under supercells and element order (hypothesis), the batch module against the
plain function, and a model with the flags on its classification heads only keeping its regression."""
from __future__ import annotations

import dgl
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cgnn_dgl.config import ModelConfig
from cgnn_dgl.errors import UsageError
from cgnn_dgl.graph import graph_from_neighbors
from cgnn_dgl.graph_ops import GraphIndex
from cgnn_dgl.model import CGNN, SPECIES_Z
from cgnn_dgl.model.valence import (
    FLAG_NAMES,
    ValenceFlags,
    composition_flags,
    decode_states,
    is_closed_shell,
    valence_table,
)

TABLE = valence_table()
STATES = {s: decode_states(row) for s, row in enumerate(TABLE.tolist())}
IDX = {z: i for i, z in enumerate(SPECIES_Z)}
Z = {"H": 1, "Li": 3, "N": 7, "O": 8, "F": 9, "Na": 11, "Mg": 12, "Cl": 17, "Ca": 20, "Ti": 22, "Fe": 26,
     "Cu": 29, "Zn": 30, "Sr": 38, "Nb": 41, "Ag": 47, "Ba": 56, "La": 57, "Ce": 58, "Gd": 64, "Ta": 73,
     "Pt": 78, "Pb": 82, "Bi": 83}


def flags(formula: dict[str, int]) -> dict[str, bool]:
    return dict(zip(FLAG_NAMES, composition_flags({IDX[Z[e]]: n for e, n in formula.items()}, STATES)))


@pytest.mark.parametrize("z, group, block, ox, closed", [
    (22, 4, "d", 4, True),     # Ti4+ d0
    (30, 12, "d", 2, True),    # Zn2+ d10
    (47, 11, "d", 1, True),    # Ag+ d10
    (26, 8, "d", 3, False),    # Fe3+ d5
    (29, 11, "d", 2, False),   # Cu2+ d9
    (82, 14, "p", 2, True),    # Pb2+ 6s2 lone pair
    (82, 14, "p", 4, True),    # Pb4+
    (83, 15, "p", 3, True),    # Bi3+
    (8, 16, "p", -2, True),    # O2-
    (8, 16, "p", -1, False),   # O- (peroxide-like, open)
    (7, 15, "p", -3, True),    # N3-
    (1, 1, "s", -1, True),     # H-
    (1, 1, "s", 1, True),      # H+
    (12, 2, "s", 2, True),     # Mg2+
    (57, 3, "f", 3, True),     # La3+ f0
    (58, 3, "f", 4, True),     # Ce4+ f0
    (64, 3, "f", 3, False),    # Gd3+ f7
    (71, 3, "f", 3, True),     # Lu3+ f14
    (26, 8, "d", 0, False),    # a metal atom
    (18, 18, "p", 0, True),    # argon
])
def test_closed_shell_of_textbook_ions(z, group, block, ox, closed):
    assert is_closed_shell(z, group, block, ox) is closed


@pytest.mark.parametrize("formula, want", [
    ({"Sr": 1, "Ti": 1, "O": 3}, (True, True, True, True)),     # SrTiO3: Sr2+ Ti4+ O2-, a wide-gap insulator
    ({"Na": 1, "Cl": 1}, (True, True, True, True)),
    ({"La": 1, "Fe": 1, "O": 3}, (True, False, True, False)),   # Fe3+ d5: balanced, open shell
    ({"Cu": 1, "Zn": 1}, (False, False, False, False)),          # an alloy: nothing to balance
    ({"Ta": 1, "Cu": 1, "O": 3}, (False, False, True, True)),   # Cu+ Ta5+: only with an uncommon state of Cu
    ({"Li": 3, "N": 1}, (True, True, True, True)),
    ({"Ba": 2, "Bi": 1, "Nb": 1, "O": 6}, (True, True, True, True)),  # Bi3+ Nb5+ 2 Ba2+ = 12 = 6 O2-
    # BaBiO3 (Bi3+ and Bi5+ on two sites): one state per element misses it (Bi -3/3/5, O -2/-1/1/2, Ba 2)
    ({"Ba": 1, "Bi": 1, "O": 3}, (False, False, False, False)),
])
def test_flags_of_known_compounds(formula, want):
    assert tuple(flags(formula).values()) == want


def test_table_holds_the_common_states():
    row = {ox: common for ox, _closed, common in STATES[IDX[8]]}
    assert row[-2] is True and all(not c for ox, c in row.items() if ox != -2)  # O: -2 is the common state
    ti = {ox for ox, _, common in STATES[IDX[22]] if common}
    assert ti == {4}
    assert all(0 < len(STATES[s]) <= TABLE.shape[1] for s in STATES)


species = st.sampled_from(SPECIES_Z)


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(species, st.integers(1, 6), min_size=1, max_size=5), st.integers(2, 4), st.randoms())
def test_flags_invariant_under_supercell_and_order(comp, k, rnd):
    """A supercell (every count times k) and any order of the elements give the same flags, and the
    flags nest: closed shell implies balanced, common states imply any states."""
    counts = {IDX[z]: n for z, n in comp.items()}
    base = composition_flags(counts, STATES)
    items = list(counts.items())
    rnd.shuffle(items)
    assert composition_flags(dict(items), STATES) == base
    assert composition_flags({s: n * k for s, n in counts.items()}, STATES) == base
    balanced, closed, balanced_any, closed_any = base
    assert (not closed or balanced) and (not closed_any or balanced_any)
    assert (not balanced or balanced_any) and (not closed or closed_any)


def _batch(formulas):
    graphs = []
    for f in formulas:
        numbers = [Z[e] for e, n in f.items() for _ in range(n)]
        rng = np.random.default_rng(len(numbers))
        numbers = list(rng.permutation(numbers))
        neighbors = [[(i + 1) % len(numbers)] for i in range(len(numbers))]
        graphs.append(graph_from_neighbors(numbers, neighbors))
    return dgl.batch(graphs)


FORMULAS = [{"Sr": 1, "Ti": 1, "O": 3}, {"La": 1, "Fe": 1, "O": 3}, {"Cu": 1, "Zn": 1}, {"Sr": 2, "Ti": 2, "O": 6},
            {"Ta": 1, "Cu": 1, "O": 3}]


def test_module_matches_the_function_per_crystal():
    g = _batch(FORMULAS)
    gi = GraphIndex.from_graph(g)
    out = ValenceFlags()(g.nodes["atom"].data["Z"], gi.atom_crystal, gi.n_crystals)
    want = torch.tensor([[float(v) for v in flags(f).values()] for f in FORMULAS])
    assert out.shape == (len(FORMULAS), len(FLAG_NAMES))
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(out[0], out[3])  # SrTiO3 and its doubled cell


SMALL = dict(n_hidden_feat=8, n_graph_feat=12, n_conv=2, classification_heads=True, classification_detach=True,
             classification_hidden=6, use_batch_norm=True)


def test_classification_mode_leaves_the_regression_unchanged():
    """With the flags on the classification heads only, the same seed gives the same trunk and regression
    weights and outputs (bit for bit), and the flags reach the logits."""
    g = _batch(FORMULAS)
    z, gi = g.nodes["atom"].data["Z"], GraphIndex.from_graph(g)
    outs = {}
    for mode in ("none", "classification", "all"):
        torch.manual_seed(3)
        model = CGNN(ModelConfig.preset("benchmark", **SMALL, valence_features=mode)).eval()
        with torch.no_grad():
            outs[mode] = (model, model.forward_heads(z, gi))
    off, cls = outs["none"], outs["classification"]
    shared = {k: v for k, v in off[0].state_dict().items() if not k.startswith("classification.")}
    for k, v in shared.items():
        assert torch.equal(cls[0].state_dict()[k], v), k
    assert torch.equal(off[1]["regression"], cls[1]["regression"])
    assert "valence.valence_table" in cls[0].state_dict() and "valence.valence_table" not in off[0].state_dict()
    head = cls[0].classification.hidden.weight
    assert head.shape[1] == SMALL["n_graph_feat"] + len(FLAG_NAMES)
    assert cls[0].regression.linear.weight.shape[1] == SMALL["n_graph_feat"]
    assert outs["all"][0].regression.linear.weight.shape[1] == SMALL["n_graph_feat"] + len(FLAG_NAMES)
    # the flags move the logits: zero their columns and the logits change for the balanced crystals
    with torch.no_grad():
        head[:, SMALL["n_graph_feat"]:] = 0
        blind = cls[0].forward_heads(z, gi)["logits"]
    assert not torch.equal(blind[0], cls[1]["logits"][0])  # SrTiO3: flags 1
    assert torch.equal(blind[2], cls[1]["logits"][2])      # CuZn: flags 0, no change


def test_loaded_table_is_used_not_rebuilt():
    """The flags come from the state dict's table (a model predicts the same whatever pymatgen says)."""
    g = _batch(FORMULAS[:1])
    gi = GraphIndex.from_graph(g)
    mod = ValenceFlags()
    assert mod(g.nodes["atom"].data["Z"], gi.atom_crystal, 1)[0, 1] == 1.0
    sd = mod.state_dict()
    sd["valence_table"] = sd["valence_table"].clone()
    sd["valence_table"][IDX[22]] = 0  # Ti: no known state
    sd["valence_table"][IDX[22], 0] = TABLE[IDX[26], 1]  # ... but one of iron's
    mod.load_state_dict(sd)
    assert mod(g.nodes["atom"].data["Z"], gi.atom_crystal, 1)[0, 1] == 0.0


def test_config_checks_the_mode():
    with pytest.raises(UsageError, match="valence_features"):
        ModelConfig.preset("benchmark", valence_features="heads")
    with pytest.raises(UsageError, match="needs classification_heads"):
        ModelConfig.preset("benchmark", valence_features="classification")
    with pytest.raises(UsageError, match="expected str"):  # YAML's off / false
        ModelConfig.preset("benchmark", valence_features=False)
    assert ModelConfig.preset("benchmark").valence_features == "none"


def test_members_with_one_table_share_the_cache_and_a_changed_table_does_not():
    """An ensemble computes each new composition's flags once; a model with another table keeps its own."""
    g = _batch(FORMULAS[:1])
    gi = GraphIndex.from_graph(g)
    z = g.nodes["atom"].data["Z"]
    a, b = ValenceFlags(), ValenceFlags()
    flags = a(z, gi.atom_crystal, 1)
    b(z, gi.atom_crystal, 1)
    assert a._cache is b._cache and len(a._cache) >= 1
    other = ValenceFlags()
    sd = other.state_dict()
    sd["valence_table"] = sd["valence_table"].clone()
    sd["valence_table"][IDX[22]] = 0
    sd["valence_table"][IDX[22], 0] = TABLE[IDX[26], 1]  # Ti takes one of iron's states
    other.load_state_dict(sd)
    changed = other(z, gi.atom_crystal, 1)
    assert other._cache is not a._cache
    assert flags[0, 1] == 1.0 and changed[0, 1] == 0.0
    assert torch.equal(a(z, gi.atom_crystal, 1), flags)  # the first table's entry is untouched
