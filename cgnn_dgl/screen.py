"""`cgnn screen`: from a prototype and element pools to ranked candidates, with hull distances.

CGNN's graph is scale-invariant, so a hypothetical compound is scored from the *unrelaxed* prototype with
its elements substituted, and the predicted volume per atom gives the equilibrium cell (the paper's data
mining loop). The stage:

1. **Enumeration** (:class:`Decorations`): every assignment of the ``--site`` pools, streamed in chunks of
   candidate keys (a key is the decoration's mixed-radix index, first named site most significant). A
   decoration is kept only when it is the smallest key of its orbit under the prototype's site
   permutations (spglib operations that respect the pools), so decorations equivalent by symmetry are
   scored once, with no set of seen candidates held in memory.
2. **Graphs** (:class:`ProtoNeighbours`): all decorations share the prototype's geometry, so the pair-image
   distances are computed once, with the coordinator's own formula, for every pair that could be within
   the largest cutoff any decoration can have. Per decoration only the cutoffs change (they depend on the
   radii), so the coordinator's test ``1e-8 < d < C`` and its 2-means pruning are re-run on those
   distances: the neighbour lists are bit for bit the coordinator's (tests check screen == predict).
3. **Prediction**: :func:`cgnn_dgl.predict.predict_packed` on the packed graphs (the model is loaded by
   :class:`Predictor`, through predict's loader).
4. **Stability** (:class:`Hull`): known formation energies from the database with ingest's selection rules
   (``ingest.reader.OqmdReader`` with an element filter), one pymatgen ``PhaseDiagram`` per chemical system
   with the elements at 0 eV/atom.
5. **Output**: each chunk is written as one part file, committed atomically (``cgnn_dgl.fileio``) and
   sorted by the ranking key, so a killed run resumes at the first missing chunk and the final ranking is
   a streaming k-way merge of the parts (also across ``--shard`` directories: ``cgnn screen merge``).
"""
from __future__ import annotations

import csv
import hashlib
import heapq
import io
import json
import logging
import math
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cgnn_dgl.config import ScreenConfig
from cgnn_dgl.errors import CgnnError, UsageError
from cgnn_dgl.fileio import atomic_write_json, atomic_write_text
from cgnn_dgl.rundir import best_model
from cgnn_dgl.structures import Crystal

log = logging.getLogger(__name__)

MANIFEST = "screen.json"
PARTS = "parts"
E_HULL = "e_above_hull"
PROBS = ("p_insulator", "p_magnetic")  # the OQMD preset's class probabilities (a model's own: Layout.classes)
UNITS = {"formation_energy": "eV/atom", "volume_per_atom": "Å^3/atom", "band_gap": "eV",
         "magnetization": "μB/atom", E_HULL: "eV/atom", "hull_energy": "eV/atom"}
_MAX_KEYS = 1 << 62


# ------------------------------------------------------------------------------------- arguments


def _element_z(symbol: str, where: str) -> int:
    from pymatgen.core.periodic_table import Element

    sym = symbol.strip()
    sym = sym[:1].upper() + sym[1:].lower()
    try:
        return int(Element(sym).Z)
    except (ValueError, KeyError):
        raise UsageError(f"{where}: {symbol.strip()!r} is not an element symbol") from None


def parse_site(text: str) -> tuple[tuple[int, ...], tuple[str, ...]]:
    """``"2,3,4=O,N,F"`` -> ((2, 3, 4), ("O", "N", "F")) (element symbols checked, duplicates dropped)."""
    from pymatgen.core.periodic_table import Element

    where = f"--site {text}"
    if "=" not in text:
        raise UsageError(f"{where}: expected SITES=ELEMENTS, e.g. 0=Li,Na,K")
    left, right = text.split("=", 1)
    try:
        sites = tuple(int(s) for s in left.split(",") if s.strip())
    except ValueError:
        raise UsageError(f"{where}: site indices must be integers") from None
    if not sites:
        raise UsageError(f"{where}: no site index")
    pool: list[str] = []
    for tok in right.split(","):
        if tok.strip():
            sym = Element.from_Z(_element_z(tok, where)).symbol
            if sym not in pool:
                pool.append(sym)
    if not pool:
        raise UsageError(f"{where}: empty element pool")
    return sites, tuple(pool)


def parse_shard(text: str | None) -> tuple[int, int]:
    from ingest.run import parse_shard as ingest_shard  # one syntax and one set of checks for both stages

    return ingest_shard(text)


# ------------------------------------------------------------------------------------- symmetry


def site_permutations(crystal: Crystal, symprec: float = 1e-3) -> np.ndarray:
    """(G, n) int64: for every space-group operation of the prototype, the atom each atom is sent to."""
    from pymatgen.symmetry.analyzer import SpacegroupAnalyzer

    sga = SpacegroupAnalyzer(crystal.to_pymatgen(), symprec=symprec)
    ds = sga.get_symmetry_dataset()
    rots = np.asarray(ds.rotations, dtype=np.float64)
    trans = np.asarray(ds.translations, dtype=np.float64)
    frac = crystal.frac
    perms = []
    for R, t in zip(rots, trans):
        moved = frac @ R.T + t
        diff = moved[:, None, :] - frac[None, :, :]
        diff -= np.round(diff)
        dist = np.abs(diff).max(axis=2)
        dist[crystal.numbers[:, None] != crystal.numbers[None, :]] = np.inf
        target = dist.argmin(axis=1)
        if dist[np.arange(len(frac)), target].max() > 10 * symprec + 1e-6:
            continue  # not a site permutation at this tolerance (never expected from spglib)
        if len(set(target.tolist())) == len(frac):
            perms.append(target)
    if not perms:
        perms = [np.arange(len(frac))]
    return np.unique(np.asarray(perms, dtype=np.int64), axis=0)


# ----------------------------------------------------------------------------------- enumeration


@dataclass
class Decorations:
    """The decorations of a prototype's named sites, one int key each, canonical ones only."""

    base_numbers: np.ndarray  # (n,) the prototype's elements
    named: np.ndarray  # (S,) site indices named by --site, ascending
    pools: list[np.ndarray]  # per named site: the pool's atomic numbers
    pool_id: np.ndarray  # (S,) which --site pool each named site draws from
    perms: np.ndarray  # (G, S) for each kept operation: the named position each position reads from
    radix: np.ndarray  # (S,) pool sizes
    weights: np.ndarray  # (S,) mixed-radix place values (first position most significant)

    @classmethod
    def build(cls, crystal: Crystal, sites: Sequence[tuple[Sequence[int], Sequence[str]]],
              symprec: float = 1e-3) -> Decorations:
        from pymatgen.core.periodic_table import Element

        n = crystal.n_atoms
        owner: dict[int, int] = {}
        pools_z: list[np.ndarray] = []
        for p, (idx, pool) in enumerate(sites):
            if not pool:
                raise UsageError(f"--site {','.join(map(str, idx))}=: empty element pool")
            for s in idx:
                if not 0 <= s < n:
                    raise UsageError(f"--site {s}: site index out of range; the prototype has sites 0..{n - 1}")
                if s in owner:
                    raise UsageError(f"--site {s}: site named twice")
                owner[s] = p
            pools_z.append(np.array([Element(e).Z for e in pool], dtype=np.int64))
        if not owner:
            raise UsageError("give at least one --site SITES=ELEMENTS")
        named = np.array(sorted(owner), dtype=np.int64)
        pool_id = np.array([owner[s] for s in named], dtype=np.int64)
        # label of every site for the stabiliser: pool id for named sites, -Z for fixed ones
        label = -crystal.numbers.astype(np.int64)
        label[named] = pool_id
        full = site_permutations(crystal, symprec)
        keep = [g for g in full if np.array_equal(label[g], label)]
        pos = np.full(n, -1, dtype=np.int64)
        pos[named] = np.arange(len(named))
        perms = np.unique(np.array([pos[g[named]] for g in keep], dtype=np.int64), axis=0)
        radix = np.array([len(pools_z[p]) for p in pool_id], dtype=np.int64)
        total = 1
        for r in radix.tolist():
            total *= r
        if total >= _MAX_KEYS:
            raise UsageError(f"{total} decorations exceed the 2^62 keys this enumeration can number")
        weights = np.ones(len(named), dtype=np.int64)
        for k in range(len(named) - 2, -1, -1):
            weights[k] = weights[k + 1] * radix[k + 1]
        return cls(crystal.numbers.astype(np.int64), named, [pools_z[p] for p in pool_id], pool_id, perms,
                   radix, weights)

    @property
    def total(self) -> int:
        """Number of decorations before symmetry reduction."""
        return int(np.prod(self.radix.astype(object)))

    def digits(self, keys: np.ndarray) -> np.ndarray:
        return (keys[:, None] // self.weights[None, :]) % self.radix[None, :]

    def canonical(self, k0: int, k1: int, shard: tuple[int, int] = (0, 1)) -> np.ndarray:
        """Keys in [k0, k1) that are the smallest of their orbit (and in ``shard``: key % N == i)."""
        keys = np.arange(k0, k1, dtype=np.int64)
        i, n = shard
        if n > 1:
            keys = keys[keys % n == i]
        if len(keys) == 0:
            return keys
        dig = self.digits(keys)
        ok = np.ones(len(keys), dtype=bool)
        for g in self.perms:
            ok &= dig[:, g] @ self.weights >= keys
        return keys[ok]

    def numbers(self, keys: np.ndarray) -> np.ndarray:
        """(m, n) atomic numbers of the decorations ``keys``."""
        dig = self.digits(keys)
        out = np.repeat(self.base_numbers[None, :], len(keys), axis=0)
        for k, s in enumerate(self.named.tolist()):
            out[:, s] = self.pools[k][dig[:, k]]
        return out


def count_distinct(crystal: Crystal, sites, symprec: float = 1e-3, chunk: int = 1 << 16) -> int:
    """How many symmetry-distinct decorations (helper for tests and the summary)."""
    dec = Decorations.build(crystal, sites, symprec)
    return sum(len(dec.canonical(a, min(a + chunk, dec.total))) for a in range(0, dec.total, chunk))


# ------------------------------------------------------------------------------ neighbour reuse


class ProtoNeighbours:
    """The prototype's pair-image distances, computed once, for every decoration's coordinator run.

    A pair (centre j, neighbour i, image k) is a candidate of a decoration when ``1e-8 < d < C``, with
    ``C = (r_i + r_j) * factor_vol * radius_factor``. ``d`` depends only on the geometry; ``C`` is at most
    ``(rmax_i + rmax_j) * (V / sum_s 4/3 pi rmin_s^3)^(1/3) * radius_factor`` over the elements each site
    can hold, so the pairs within that bound are a superset of every decoration's candidates. Their ``d``
    is computed with the coordinator's own expression, so comparisons and ratios are identical.
    """

    def __init__(self, crystal: Crystal, radii_min: np.ndarray, radii_max: np.ndarray, params):
        from cgnn_dgl.coordinator import IMAGES, MIN_DISTANCE

        self.crystal = crystal
        self.params = params
        n = crystal.n_atoms
        lat = crystal.lattice
        v_min = float(np.sum(4.0 / 3.0 * math.pi * radii_min ** 3))
        fvol_max = (crystal.volume / v_min) ** (1.0 / 3.0)
        bound = (radii_max[:, None] + radii_max[None, :]) * fvol_max * float(params.radius_factor) * (1 + 1e-6)
        j, i, k = np.meshgrid(np.arange(n), np.arange(n), np.arange(27), indexing="ij")  # (j, i, image) order
        j, i, k = j.ravel(), i.ravel(), k.ravel()
        r = (crystal.frac[i] - crystal.frac[j] + IMAGES[k]).T
        latT = lat.reshape(9)
        R0 = r[0] * latT[0] + r[1] * latT[3] + r[2] * latT[6]
        R1 = r[0] * latT[1] + r[1] * latT[4] + r[2] * latT[7]
        R2 = r[0] * latT[2] + r[1] * latT[5] + r[2] * latT[8]
        d = np.sqrt(R0 * R0 + R1 * R1 + R2 * R2)
        keep = (d > MIN_DISTANCE) & (d < bound[i, j])
        self.j, self.i, self.d = j[keep], i[keep], d[keep]

    def graphs(self, numbers: np.ndarray):
        """For (m, n) decorations: (counts (m*n,), bond_src, bond_dst, ratio) as the coordinator gives them."""
        from cgnn_dgl.coordinator import _factor_vol, radius_table

        m, n = numbers.shape
        radii = radius_table()[numbers]  # (m, n)
        lattices = np.broadcast_to(self.crystal.lattice, (m, 3, 3))
        fvol = _factor_vol(radii.reshape(-1), lattices, np.full(m, n, dtype=np.int64))
        scale = fvol * float(self.params.radius_factor)  # the coordinator's scale_of_atom
        cut = radii[:, self.i] + radii[:, self.j]
        cut *= scale[:, None]
        ok = cut > self.d[None, :]
        cand, pair = np.nonzero(ok)  # candidate-major, then (j, i, image): the coordinator's order
        C = cut[cand, pair]
        x = self.d[pair] / C
        centre = cand * n + self.j[pair]
        prune = _pruner(self.params)
        keep = prune(x, np.bincount(centre, minlength=m * n), float(self.params.cc_cutoff),
                     int(self.params.max_rounds))
        centre = centre[keep]
        counts = np.bincount(centre, minlength=m * n)
        return counts, self.i[pair[keep]], self.j[pair[keep]], x[keep]


def _pruner(params):
    from cgnn_dgl.coordinator import prune_candidates

    if params.pruning == "kmeans":
        from cgnn_dgl.kmeans_compat import prune_candidates_kmeans

        return prune_candidates_kmeans
    return prune_candidates


# ------------------------------------------------------------------------------------- the model


class Predictor:
    """The model a screen scores with: one checkpoint or an ensemble run folder, through
    :class:`cgnn_dgl.ensemble.Ensemble` (the same code `cgnn predict` uses), so that ``std`` is the
    ensemble's calibrated standard deviation (None for a single checkpoint)."""

    def __init__(self, path: str, device: str = "cpu", batch_size: int = 1024):
        from cgnn_dgl import predict
        from cgnn_dgl.ensemble import Ensemble, is_ensemble_dir, read_ensemble_json, std_note

        self.path = str(path)
        self.device = device
        self.batch_size = batch_size
        self.ensemble = Ensemble.load(path, device=device)
        self.config = self.ensemble.config
        self.targets = tuple(self.ensemble.targets)
        from cgnn_dgl.tasks import class_names

        self.classes = class_names(self.config)
        self.has_probs = bool(self.classes)
        self.is_ensemble = self.ensemble.is_ensemble
        # the checkpoint whose coordinator settings built the training graphs (member 0 of an ensemble)
        info = read_ensemble_json(path) if is_ensemble_dir(path) else None
        first = Path(path) / info["members"][0] if info else Path(path)
        first = best_model(first)
        from cgnn_dgl.tasks import untrained_columns

        ckpt = predict.ckpt_mod.load(first)
        self.params = predict.coordinator_params_for(ckpt)
        self.labels = _model_labels(str(first))
        self.untrained = untrained_columns(predict.ckpt_mod.record_of(ckpt).get("tasks"))
        # how <target>_std is computed (ensemble.json), for the candidates' metadata
        self.std_note = std_note(info) if info and self.is_ensemble else ""

    def __call__(self, packed):
        """(mean (m, T), std (m, T) or None, probabilities (m, 2) or None) in physical units."""
        res = self.ensemble.predict(packed, batch_size=self.batch_size, device=self.device)
        return res.mean, res.std, res.prob


def _model_labels(path: str) -> str:
    """'synthetic' / 'real' / 'unknown': what the model's training labels were, as its checkpoint records it
    (or, for a checkpoint older than that record, from its cache's ingest flags)."""
    try:
        from cgnn_dgl import checkpoint as ckpt_mod

        ckpt = ckpt_mod.load(path)
        if isinstance(ckpt.get("synthetic"), bool):  # recorded at training time (cgnn_dgl.checkpoint)
            return "synthetic" if ckpt["synthetic"] else "real"
        cache = (ckpt.get("train_config") or {}).get("cache")
        flags = Path(str(cache)) / "ingest_flags.csv"
        if not cache or not flags.exists():
            return "unknown"
        with open(flags, newline="") as fh:
            values = {row.get("synthetic") for row, _ in zip(csv.DictReader(fh), range(1000))}
        return "synthetic" if "True" in values else "real"
    except Exception:  # labels are informative metadata; never stop a screen over them
        return "unknown"


# ------------------------------------------------------------------------------------------ hull


@dataclass
class Hull:
    """Known phases (reduced composition -> formation energy per atom) and one PhaseDiagram per system."""

    phases: list[tuple[dict[str, float], float, str]] = field(default_factory=list)  # (composition, eV/atom, name)
    synthetic: int = 0
    source: str = ""
    _diagrams: dict = field(default_factory=dict)
    _cache: dict = field(default_factory=dict)

    @classmethod
    def from_db(cls, url: str, elements: Sequence[str], selection: str = "reference") -> Hull:
        """Formation energies of every material made only of ``elements``, chosen as ingest chooses them."""
        from pymatgen.core.periodic_table import Element

        from ingest.db import make_engine, resolve_url, safe_url
        from ingest.reader import OqmdReader
        from ingest.select import Filters

        engine = make_engine(resolve_url(url))
        hull = cls(source=safe_url(resolve_url(url)))
        try:
            reader = OqmdReader(engine, selection=selection, filters=Filters(elements=tuple(sorted(elements))))
            for rec in reader:
                if not rec.ok:
                    continue
                z, c = np.unique(rec.crystal.numbers, return_counts=True)
                comp = {Element.from_Z(int(a)).symbol: int(b) for a, b in zip(z, c)}
                hull.phases.append((comp, float(rec.targets[0]), rec.name))
                hull.synthetic += bool(rec.flags.get("synthetic"))
        finally:
            engine.dispose()
        return hull

    def diagram(self, system: frozenset[str]):
        pd = self._diagrams.get(system)
        if pd is None:
            from pymatgen.analysis.phase_diagram import PDEntry, PhaseDiagram
            from pymatgen.core import Composition

            entries = [PDEntry(Composition({e: 1}), 0.0, name=e) for e in sorted(system)]
            for comp, e_form, name in self.phases:
                if set(comp) <= system:
                    n = sum(comp.values())
                    entries.append(PDEntry(Composition(comp), e_form * n, name=name))
            pd = self._diagrams[system] = PhaseDiagram(entries)
        return pd

    def locate(self, comp: dict[str, int]) -> tuple[float, str]:
        """(hull energy per atom at ``comp``, decomposition text) — cached per reduced composition."""
        from pymatgen.core import Composition

        c = Composition(comp)
        key = c.reduced_formula
        hit = self._cache.get(key)
        if hit is None:
            pd = self.diagram(frozenset(comp))
            decomp = pd.get_decomposition(c)
            e_hull = sum(amt * pd.get_form_energy_per_atom(entry) for entry, amt in decomp.items())
            parts = sorted(((amt, entry.composition.reduced_formula, getattr(entry, "name", ""))
                            for entry, amt in decomp.items()), key=lambda t: -t[0])
            text = " + ".join(f"{amt:.4g} {formula}" for amt, formula, _ in parts)
            hit = self._cache[key] = (float(e_hull), text)
        return hit


# ---------------------------------------------------------------------------------------- layout


@dataclass
class Layout:
    """Column names of the part files and of candidates.csv."""

    sites: list[int]
    targets: tuple[str, ...]
    std: bool
    probs: bool
    hull: bool
    classes: tuple[str, ...] = ("insulator", "magnetic")  # the logit columns (screen.json before: the OQMD two)

    @property
    def columns(self) -> list[str]:
        cols = ["key", "formula"] + [f"site_{s}" for s in self.sites] + list(self.targets)
        if self.std:
            cols += [f"{t}_std" for t in self.targets]
        if self.probs:
            cols += [f"p_{c}" for c in self.classes]
        if self.hull:
            cols += ["hull_energy", E_HULL, "decomposition"]
        return cols


def _formula(numbers_row: np.ndarray, cache: dict) -> str:
    """pymatgen's reduced formula of one candidate (``cache`` keeps the per-element data and repeats)."""
    z, c = np.unique(numbers_row, return_counts=True)
    key = (z.tobytes(), c.tobytes())
    f = cache.get(key)
    if f is None:
        f = cache[key] = reduced_formula(z, c, cache)
    return f


def reduced_formula(z: np.ndarray, counts: np.ndarray, cache: dict | None = None) -> str:
    """``Composition(...).reduced_formula`` without building a Composition: every candidate of a screen
    has its own composition, so pymatgen's object path cost more than the model (issue 10's 5,000/s).
    Same ordering (electronegativity, then symbol), gcd reduction and one-less digits; the rare cases
    pymatgen rewrites (a polyanion group, its special formulas such as O2 or Li2O2, an element without an
    electronegativity) are handed to pymatgen itself. A property test checks it against pymatgen."""
    from math import gcd, isnan

    cache = {} if cache is None else cache
    els = []
    for a in z.tolist():
        e = cache.get(("el", a))
        if e is None:
            from pymatgen.core import Element

            el = Element.from_Z(int(a))
            e = cache[("el", a)] = (el.symbol, float(el.X))
        els.append(e)
    order = sorted(range(len(els)), key=lambda k: (els[k][1], els[k][0]))
    xs = [els[k][1] for k in order]
    amounts = [int(counts[k]) for k in order]
    factor = gcd(*amounts)
    rare = any(isnan(x) for x in xs) or (len(xs) >= 3 and xs[-1] - xs[-2] < 1.65
                                         and gcd(amounts[-1] // factor, amounts[-2] // factor) != 1)
    text = "".join(els[k][0] + (str(a // factor) if a != factor else "") for k, a in zip(order, amounts))
    if rare or (len(els) <= 2 and text in _SPECIAL):
        from pymatgen.core import Composition

        return Composition({els[k][0]: int(counts[k]) for k in range(len(els))}).reduced_formula
    return text


_SPECIAL = frozenset({"LiO", "NaO", "KO", "HO", "CsO", "RbO", "O", "N", "F", "Cl", "H"})  # pymatgen doubles these


# ----------------------------------------------------------------------------------------- runner


class Screen:
    """One screening run (or one shard of it) into ``cfg.out``."""

    def __init__(self, cfg: ScreenConfig, progress: bool = True):
        from cgnn_dgl.coordinator import radius_table
        from cgnn_dgl.model.species import SPECIES_Z
        from cgnn_dgl.structures import read_structure_file

        self.cfg = cfg
        self.out = Path(cfg.out)
        self.progress = progress
        if not Path(cfg.prototype).exists():
            raise UsageError(f"--prototype {cfg.prototype}: no such file")
        from cgnn_dgl.coordinator import check_overlap
        from cgnn_dgl.structures import StructureError

        try:
            self.proto = read_structure_file(cfg.prototype)
            check_overlap(self.proto, cfg.overlap_tolerance)
        except StructureError as exc:
            raise UsageError(f"--prototype {cfg.prototype}: {exc}") from None
        self.dec = Decorations.build(self.proto, cfg.sites, cfg.symprec)
        if not Path(cfg.model).exists():
            raise UsageError(f"--model {cfg.model}: no such file")
        self.model = Predictor(cfg.model, cfg.device, cfg.batch_size)
        self.rank_by = self._rank_key()
        # elements that cannot be scored: no radius (coordinator) or outside the model's species
        table = radius_table()
        species = set(SPECIES_Z)
        all_z = set(self.dec.base_numbers.tolist()) | {int(z) for p in self.dec.pools for z in p}
        self.bad_z = {z: ("no_radius" if not np.isfinite(table[z]) else "unsupported_element")
                      for z in all_z if not np.isfinite(table[z]) or z not in species}
        n = self.proto.n_atoms
        rmin, rmax = np.empty(n), np.empty(n)
        for s in range(n):
            zs = [int(self.proto.numbers[s])]
            where = np.flatnonzero(self.dec.named == s)
            if where.size:
                zs = [int(z) for z in self.dec.pools[int(where[0])]]
            rs = [table[z] for z in zs if z not in self.bad_z]
            rmin[s], rmax[s] = (min(rs), max(rs)) if rs else (1.0, 1.0)
        self.neigh = ProtoNeighbours(self.proto, rmin, rmax, self.model.params)
        self.hull: Hull | None = None
        self.layout = Layout(self.dec.named.tolist(), self.model.targets, self.model.is_ensemble,
                             self.model.has_probs, cfg.db is not None, tuple(self.model.classes))
        self._formulas: dict = {}

    def _rank_key(self) -> str:
        cfg, targets = self.cfg, self.model.targets
        if cfg.rank_by:
            if cfg.rank_by == E_HULL:
                if not cfg.db:
                    raise UsageError("--rank-by e_above_hull needs --db URL (the known phases)")
                if "formation_energy" not in targets:
                    raise UsageError(f"--rank-by e_above_hull: the model has no formation_energy target {targets}")
                return E_HULL
            if cfg.rank_by not in targets:
                raise UsageError(f"--rank-by {cfg.rank_by}: the model has no such target; it predicts {', '.join(targets)}")
            return cfg.rank_by
        if cfg.db and "formation_energy" in targets:
            return E_HULL
        return "formation_energy" if "formation_energy" in targets else targets[0]

    # -- bookkeeping ------------------------------------------------------------------------------
    def fingerprint(self) -> dict:
        proto = Path(self.cfg.prototype).read_bytes()
        return {"format": "cgnn-screen", "version": 1,
                "prototype_sha256": hashlib.sha256(proto).hexdigest(),
                "model": str(self.cfg.model), "sites": [[list(s), list(p)] for s, p in self.cfg.sites],
                "db": self.cfg.db, "selection": self.cfg.selection, "rank_by": self.rank_by,
                "descending": self.cfg.descending, "chunk_size": self.cfg.chunk_size,
                "symprec": self.cfg.symprec, "n_shards": self.cfg.shard[1]}

    def _prepare_out(self) -> dict:
        fp = self.fingerprint()
        man_path = self.out / MANIFEST
        if man_path.exists():
            old = json.loads(man_path.read_text())
            if old.get("fingerprint") != fp:
                diff = sorted(k for k in fp if old.get("fingerprint", {}).get(k) != fp[k])
                raise UsageError(f"{self.out} holds a screen with other settings ({', '.join(diff)}); "
                                 "use another --out or remove it")
            shards = set(old.get("shards", [])) | {self.cfg.shard[0]}
        else:
            shards = {self.cfg.shard[0]}
        (self.out / PARTS).mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.out / "prototype.cif", Path(self.cfg.prototype).read_text())
        manifest = {"fingerprint": fp, "shards": sorted(shards), "layout": self.layout.__dict__,
                    "total_decorations": self.dec.total, "n_chunks": self.n_chunks,
                    "model_targets": list(self.model.targets), "model_labels": self.model.labels,
                    "model_untrained": self.model.untrained, "model_std": self.model.std_note,
                    "model_units": dict(self.model.ensemble.units)}
        atomic_write_json(man_path, manifest)
        return manifest

    @property
    def n_chunks(self) -> int:
        return -(-self.dec.total // self.cfg.chunk_size)

    def part_path(self, chunk: int) -> Path:
        i, n = self.cfg.shard
        return self.out / PARTS / f"part-{i:04d}of{n:04d}-{chunk:08d}.csv"

    # -- the work ---------------------------------------------------------------------------------
    def run(self) -> dict:
        from cgnn_dgl.report import progress as bar

        self._prepare_out()
        if self.cfg.db:
            from pymatgen.core.periodic_table import Element

            elements = sorted({Element.from_Z(int(z)).symbol for z in self.dec.base_numbers}
                              | {Element.from_Z(int(z)).symbol for p in self.dec.pools for z in p})
            self.hull = Hull.from_db(self.cfg.db, elements, self.cfg.selection)
        todo = [c for c in range(self.n_chunks) if not self.part_path(c).exists()]
        done = self.n_chunks - len(todo)
        t0 = time.perf_counter()
        n_new = 0
        pbar = bar(total=self.n_chunks, desc="screen", unit="chunk", disable=None if self.progress else True)
        pbar.update(done)
        for c in todo:
            n_new += self.run_chunk(c)
            pbar.update(1)
            rate = n_new / max(time.perf_counter() - t0, 1e-9)
            pbar.set_postfix_str(f"{n_new} candidates, {rate:,.0f} candidates/s", refresh=False)
        pbar.close()
        elapsed = time.perf_counter() - t0
        return {"chunks_done_before": done, "chunks_run": len(todo), "candidates_scored_now": n_new,
                "seconds": elapsed, "candidates_per_s": n_new / elapsed if elapsed > 0 else None}

    def run_chunk(self, c: int) -> int:
        """Enumerate, score and write chunk ``c``; returns the number of candidates it held."""
        k0 = c * self.cfg.chunk_size
        keys = self.dec.canonical(k0, min(k0 + self.cfg.chunk_size, self.dec.total), self.cfg.shard)
        numbers = self.dec.numbers(keys)
        bad = np.zeros(len(keys), dtype=bool)
        reasons: list[str] = [""] * len(keys)
        if self.bad_z:
            from cgnn_dgl.coordinator import _symbol

            for z, why in self.bad_z.items():
                hit = np.flatnonzero((numbers == z).any(axis=1) & ~bad)
                for h in hit.tolist():
                    reasons[h] = f"{why}: {_symbol(z)}" + (" has no atomic radius" if why == "no_radius"
                                                           else " is outside the model's 89 species")
                bad[hit] = True
        good = np.flatnonzero(~bad)
        mean, std, prob = self.score(numbers[good])
        rows = self._rows(keys[good], numbers[good], mean, std, prob)
        text = io.StringIO()
        w = csv.writer(text, lineterminator="\n")
        w.writerow(["status"] + self.layout.columns)
        for row in rows:
            w.writerow(["ok"] + row)
        sites = self.dec.named.tolist()
        from pymatgen.core.periodic_table import Element

        for h in np.flatnonzero(bad).tolist():
            elems = [Element.from_Z(int(numbers[h, s])).symbol for s in sites]
            w.writerow([f"unscoreable:{reasons[h]}", int(keys[h]), _formula(numbers[h], self._formulas)] + elems
                       + [""] * (len(self.layout.columns) - 2 - len(sites)))
        atomic_write_text(self.part_path(c), text.getvalue())
        return len(keys)

    def score(self, numbers: np.ndarray):
        """Predictions for (m, n) decorations, from the shared geometry."""
        from cgnn_dgl.batching import PackedGraphs

        m, n = numbers.shape
        T = len(self.model.targets)
        if m == 0:
            return np.zeros((0, T)), (np.zeros((0, T)) if self.model.is_ensemble else None), \
                (np.zeros((0, len(self.model.classes))) if self.model.has_probs else None)
        counts, src, dst, ratio = self.neigh.graphs(numbers)
        n_bonds = counts.reshape(m, n).sum(axis=1)
        packed = PackedGraphs.from_arrays(numbers.reshape(-1), np.full(m, n), n_bonds, src, dst,
                                          np.zeros((m, T)), np.zeros((m, T), bool), np.arange(m), [""] * m,
                                          self.model.targets, bond_ratio=ratio)
        return self.model(packed)

    def _rows(self, keys, numbers, mean, std, prob) -> list[list]:
        from pymatgen.core.periodic_table import Element

        sites = self.dec.named.tolist()
        sym = {}
        rows = []
        fe_col = self.model.targets.index("formation_energy") if "formation_energy" in self.model.targets else None
        rank_col = None if self.rank_by == E_HULL else self.model.targets.index(self.rank_by)
        sort_keys = []
        for r in range(len(keys)):
            nums = numbers[r]
            row: list = [int(keys[r]), _formula(nums, self._formulas)]
            for s in sites:
                z = int(nums[s])
                if z not in sym:
                    sym[z] = Element.from_Z(z).symbol
                row.append(sym[z])
            row += [f"{v:.9g}" for v in mean[r]]
            if self.layout.std:
                row += [f"{v:.6g}" for v in std[r]]
            if self.layout.probs:
                row += [f"{v:.6g}" for v in prob[r]]
            value = float(mean[r, rank_col]) if rank_col is not None else math.nan
            if self.layout.hull:
                if fe_col is None or self.hull is None:
                    row += ["", "", ""]
                else:
                    z, c = np.unique(nums, return_counts=True)
                    comp = {sym.get(int(a)) or Element.from_Z(int(a)).symbol: int(b) for a, b in zip(z, c)}
                    e_hull, decomp = self.hull.locate(comp)
                    e_above = float(mean[r, fe_col]) - e_hull
                    row += [f"{e_hull:.9g}", f"{e_above:.9g}", decomp]
                    if rank_col is None:
                        value = e_above
            rows.append(row)
            sort_keys.append(rank_value(value, self.cfg.descending, int(keys[r])))
        order = sorted(range(len(rows)), key=sort_keys.__getitem__)
        return [rows[k] for k in order]


def rank_value(value: float, descending: bool, key: int) -> tuple:
    """Sort key: best first, NaN last, ties by candidate key (so every merge gives the same ranking)."""
    if not math.isfinite(value):
        return (1, 0.0, key)
    return (0, -value if descending else value, key)


# ----------------------------------------------------------------------------------- finishing


def _read_parts(dirs: Sequence[Path]) -> tuple[dict, list[Path]]:
    """(manifest of the first directory, all part files), checking the directories are one screen, complete."""
    manifests = []
    for d in dirs:
        p = Path(d) / MANIFEST
        if not p.exists():
            raise UsageError(f"{d}: not a screen output (no {MANIFEST})")
        manifests.append(json.loads(p.read_text()))
    fp = manifests[0]["fingerprint"]
    for d, m in zip(dirs, manifests):
        if m["fingerprint"] != fp:
            raise UsageError(f"{d}: a screen with other settings than {dirs[0]}; cannot merge")
    n_shards = int(fp["n_shards"])
    n_chunks = int(manifests[0]["n_chunks"])
    found: dict[tuple[int, int], Path] = {}
    for d in dirs:
        for p in sorted((Path(d) / PARTS).glob("part-*.csv")):
            stem = p.stem.split("-")
            i = int(stem[1].split("of")[0])
            found.setdefault((i, int(stem[2])), p)
    missing = [(i, c) for i in range(n_shards) for c in range(n_chunks) if (i, c) not in found]
    if missing:
        shards = sorted({i for i, _ in missing})
        raise CgnnError(f"{len(missing)} chunk(s) not screened yet (shard(s) {', '.join(f'{i}/{n_shards}' for i in shards)}); "
                        "run those shards (the same command resumes) and merge again")
    return manifests[0], [found[k] for k in sorted(found)]


def finish(dirs: Sequence[Path], out: Path, top: int, model_path: str | None = None,
           run_stats: dict | None = None, hull: Hull | None = None) -> dict:
    """Merge the sorted parts of ``dirs`` into ``out``: candidates.csv, unscoreable.csv, top/*.cif, summary, PNG."""
    manifest, parts = _read_parts(dirs)
    fp = manifest["fingerprint"]
    layout = Layout(**manifest["layout"])
    rank_by, descending = fp["rank_by"], bool(fp["descending"])
    out.mkdir(parents=True, exist_ok=True)
    cols = layout.columns
    rank_idx = cols.index(rank_by)

    def stream(path: Path) -> Iterator[tuple]:
        with open(path, newline="") as fh:
            reader = csv.reader(fh)
            next(reader)
            for row in reader:
                if row[0] == "ok":
                    v = float(row[1 + rank_idx]) if row[1 + rank_idx] else math.nan
                    yield rank_value(v, descending, int(row[1])), row[1:]

    values, tops = [], []
    n = 0
    with _atomic_csv(out / "candidates.csv") as w:
        w.writerow(cols + ["rank"])
        for n, (_, row) in enumerate(heapq.merge(*(stream(p) for p in parts)), start=1):
            w.writerow(row + [n])
            v = row[rank_idx]
            values.append(float(v) if v else math.nan)
            if n <= top:
                tops.append(row)
    n_bad = 0
    reasons: dict[str, int] = {}
    with _atomic_csv(out / "unscoreable.csv") as w:
        w.writerow(["key", "formula"] + [f"site_{s}" for s in layout.sites] + ["reason"])
        for p in parts:
            with open(p, newline="") as fh:
                for row in csv.reader(fh):
                    if row[0].startswith("unscoreable:"):
                        why = row[0].removeprefix("unscoreable:")
                        w.writerow(row[1:3 + len(layout.sites)] + [why])
                        n_bad += 1
                        reasons[why.split(":")[0]] = reasons.get(why.split(":")[0], 0) + 1
    proto_path = Path(dirs[0]) / "prototype.cif"
    model = model_path or fp["model"]
    labels = manifest.get("model_labels", "unknown")
    from cgnn_dgl.tasks import UNTRAINED_NOTE

    untrained = list(manifest.get("model_untrained") or [])
    cifs = write_top_cifs(out / "top", proto_path, tops, layout, model, labels)
    plot = plot_distribution(out / "hull_distance.png", np.asarray(values, dtype=float), rank_by, descending,
                             min(top, n), model, labels)
    recorded = manifest.get("model_units") or {}  # as the model's checkpoint records them
    units = {c: recorded.get(c.removesuffix("_std")) or UNITS.get(c.removesuffix("_std"), "") for c in cols}
    units.update({f"p_{c}": "probability" for c in layout.classes})
    units["rank"] = "1 = best"
    meta = {
        "what": "cgnn screen: symmetry-distinct decorations of a prototype, scored by a CGNN model",
        "model": model, "model_labels": labels,
        "labels_note": ("predictions of a model trained on SYNTHETIC labels: they show the pipeline works, "
                        "not physics") if labels == "synthetic" else "",
        "untrained_columns": untrained,
        "untrained_note": UNTRAINED_NOTE if untrained else "",
        "rank_by": rank_by, "order": "descending" if descending else "ascending",
        "columns": {c: units.get(c, "") for c in cols + ["rank"]},
        "column_notes": {"key": "the decoration's index in the enumeration (mixed radix over the named sites)",
                         "site_<i>": "element placed on prototype site i",
                         "hull_energy": "formation energy of the hull at the candidate's composition",
                         E_HULL: "predicted formation_energy - hull_energy (negative = below the known hull)",
                         "decomposition": "phases the hull decomposes the composition into (atom fractions)"},
    }
    if manifest.get("model_std"):
        meta["column_notes"]["<target>_std"] = manifest["model_std"]
    atomic_write_json(out / "candidates.meta.json", meta)
    summary = {
        **meta,
        "prototype": str(proto_path), "sites": fp["sites"], "db": fp["db"], "selection": fp["selection"],
        "total_decorations": manifest["total_decorations"], "symmetry_distinct": n + n_bad,
        "scored": n, "unscoreable": n_bad, "unscoreable_reasons": reasons,
        "shards": fp["n_shards"], "top": [dict(zip(cols + ["rank"], r + [k + 1])) for k, r in enumerate(tops)],
        "top_cifs": [str(p.relative_to(out)) for p in cifs], "plot": plot and str(Path(plot).relative_to(out)),
        "known_phases": None if hull is None else {"count": len(hull.phases), "synthetic": hull.synthetic,
                                                   "source": hull.source,
                                                   "note": "elements at 0 eV/atom; pymatgen PhaseDiagram per "
                                                           "chemical system"},
        "run": run_stats or {},
    }
    atomic_write_json(out / "summary.json", summary)
    return summary


class _atomic_csv:
    """``with _atomic_csv(path) as writer`` — LF line endings, file appears only when complete."""

    def __init__(self, path: Path):
        from cgnn_dgl.fileio import atomic_open

        self._cm = atomic_open(path, "w", newline="")

    def __enter__(self):
        fh = self._cm.__enter__()
        return csv.writer(fh, lineterminator="\n")

    def __exit__(self, *exc):
        return self._cm.__exit__(*exc)


def scaled_structure(proto: Crystal, numbers: np.ndarray, volume_per_atom: float | None) -> Crystal:
    """The decorated prototype with its cell scaled uniformly so that V / n = ``volume_per_atom``."""
    lattice = proto.lattice
    if volume_per_atom is not None and math.isfinite(volume_per_atom) and volume_per_atom > 0:
        lattice = lattice * (volume_per_atom * proto.n_atoms / proto.volume) ** (1.0 / 3.0)
    return Crystal("", lattice, numbers, proto.frac)


def write_top_cifs(folder: Path, proto_path: Path, tops: list[list], layout: Layout, model: str,
                   labels: str) -> list[Path]:
    from pymatgen.core.periodic_table import Element
    from pymatgen.io.cif import CifWriter

    from cgnn_dgl.structures import read_structure_file

    proto = read_structure_file(proto_path)
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("*.cif"):
        old.unlink()
    cols = layout.columns
    vcol = cols.index("volume_per_atom") if "volume_per_atom" in cols else None
    paths = []
    for rank, row in enumerate(tops, start=1):
        numbers = proto.numbers.copy()
        for s, sym in zip(layout.sites, row[2:2 + len(layout.sites)]):
            numbers[s] = Element(sym).Z
        vpa = float(row[vcol]) if vcol is not None else None
        crystal = scaled_structure(proto, numbers, vpa)
        text = str(CifWriter(crystal.to_pymatgen()))
        note = (f"# cgnn screen rank {rank}: {row[1]} (key {row[0]}), model {model}\n"
                + (f"# cell scaled uniformly to the predicted volume {vpa:.6g} A^3/atom\n" if vpa is not None
                   else "# prototype cell (the model predicts no volume_per_atom)\n")
                + ("# predictions from a model trained on SYNTHETIC labels\n" if labels == "synthetic" else ""))
        path = folder / f"{rank:04d}_{row[1]}_{row[0]}.cif"
        atomic_write_text(path, note + text)
        paths.append(path)
    return paths


def plot_distribution(path: Path, values: np.ndarray, rank_by: str, descending: bool, n_top: int, model: str,
                      labels: str) -> str | None:
    """Histogram of the ranking value (e_above_hull with --db) with the top candidates marked."""
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    ax.hist(finite, bins=min(60, max(10, int(np.sqrt(finite.size)))), color="0.7", edgecolor="0.4")
    for k, v in enumerate(values[:n_top]):
        if np.isfinite(v):
            ax.axvline(v, color="tab:red", lw=0.8, alpha=0.8, label="top candidates" if k == 0 else None)
    if rank_by == E_HULL:
        ax.axvline(0.0, color="k", ls="--", lw=0.8, label="known hull")
    unit = UNITS.get(rank_by, "")
    ax.set_xlabel(f"predicted {rank_by}" + (f" ({unit})" if unit else ""))
    ax.set_ylabel("candidates")
    title = f"{finite.size} candidates, model {Path(model).parent.name or model}"
    if labels == "synthetic":
        title += " (SYNTHETIC labels)"
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    from cgnn_dgl.fileio import atomic_write_bytes

    atomic_write_bytes(path, buf.getvalue())
    return str(path)


# ------------------------------------------------------------------------------------------ CLI


def config_from_args(args) -> ScreenConfig:
    if not args.site:
        raise UsageError("give at least one --site SITES=ELEMENTS, e.g. --site 0=Li,Na,K")
    if args.top < 0:
        raise UsageError("--top must be >= 0")
    if args.chunk_size < 1:
        raise UsageError("--chunk-size must be >= 1")
    return ScreenConfig(model=args.model, prototype=args.prototype, sites=tuple(parse_site(s) for s in args.site),
                        out=args.out, top=args.top, db=args.db, rank_by=args.rank_by, descending=args.descending,
                        shard=parse_shard(args.shard), chunk_size=args.chunk_size, batch_size=args.batch_size,
                        device=args.device, selection=args.selection, symprec=args.symprec,
                        overlap_tolerance=args.overlap_tolerance)


def _cmd_screen(args) -> int:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = config_from_args(args)
    screen = Screen(cfg, progress=True)
    stats = screen.run()
    out = Path(cfg.out)
    if cfg.shard[1] > 1:
        print(f"shard {cfg.shard[0]}/{cfg.shard[1]}: {stats['candidates_scored_now']} candidate(s) scored "
              f"({stats['chunks_done_before']} chunk(s) were already done) -> {out / PARTS}; "
              f"join the shards with `cgnn screen merge DIR... --out DIR`")
        return 0
    summary = finish([out], out, cfg.top, run_stats=stats, hull=screen.hull)
    _print_summary(summary, out)
    return 0


def _cmd_merge(args) -> int:
    out = Path(args.out)
    summary = finish([Path(d) for d in args.dirs], out, args.top)
    _print_summary(summary, out)
    return 0


def _print_summary(summary: dict, out: Path) -> None:
    rate = (summary.get("run") or {}).get("candidates_per_s")
    print(f"{summary['scored']} candidate(s) ranked by {summary['rank_by']} -> {out / 'candidates.csv'}"
          + (f"; {summary['unscoreable']} unscoreable (listed in {out / 'unscoreable.csv'})" if summary["unscoreable"] else "")
          + (f"; {rate:,.0f} candidates/s" if rate else ""))
    if summary.get("model_labels") == "synthetic":
        print("note: the model was trained on SYNTHETIC labels", file=sys.stderr)


def register(sub) -> None:
    p = sub.add_parser(
        "screen", help="score every symmetry-distinct decoration of a prototype; rank them (on the hull with --db)",
        description="Decorate a prototype's sites with element pools, score each symmetry-distinct candidate "
                    "with a trained model, scale its cell to the predicted volume per atom and rank. With --db, "
                    "energies above the hull of the database's known phases. `cgnn screen merge` joins shards.")
    p.add_argument("--model", metavar="RUN", help="best.pt of a `cgnn train` run (or a run folder holding it)")
    p.add_argument("--prototype", metavar="PROTO.cif", help="CIF/POSCAR of the prototype structure")
    p.add_argument("--site", action="append", default=[], metavar="I[,J..]=EL,EL..",
                   help="element pool for prototype site(s) by index, e.g. 0=Li,Na,K or 2,3,4=O,N,F (repeat; required)")
    p.add_argument("--out", metavar="DIR", help="output folder (a rerun with the same settings resumes)")
    p.add_argument("--top", type=int, default=20, help="write CIFs of the best K candidates (default 20)")
    p.add_argument("--db", metavar="URL", help="known phases (OQMD schema) for energies above the hull")
    p.add_argument("--selection", default="reference", choices=["reference", "canonical"],
                   help="which calculation represents a known material (as in cgnn ingest; default reference)")
    p.add_argument("--rank-by", metavar="TARGET",
                   help="ranking key: a model target or e_above_hull (default: e_above_hull with --db and a "
                        "formation-energy model, else formation_energy)")
    p.add_argument("--descending", action="store_true", help="rank the largest value first")
    p.add_argument("--shard", metavar="i/N", help="screen only candidates with key %% N == i (then merge)")
    from cgnn_dgl.errors import positive_int

    p.add_argument("--chunk-size", type=positive_int, default=8192,
                   help="decoration keys per chunk, one part file each (default 8192)")
    p.add_argument("--batch-size", type=positive_int, default=1024, help="candidates per forward pass (default 1024)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where the model runs (default cpu)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    p.add_argument("--symprec", type=float, default=1e-3, help="spglib tolerance for the prototype's symmetry, Å (default 0.001)")
    from cgnn_dgl.pipeline import add_overlap_arg

    add_overlap_arg(p)
    p.set_defaults(func=_cmd_screen_or_merge)
    p.add_argument("merge_dirs", nargs="*", metavar="merge DIR", help=argparse_suppress())


def argparse_suppress():
    import argparse

    return argparse.SUPPRESS


def _cmd_screen_or_merge(args) -> int:
    """`cgnn screen merge DIR... --out DIR` or a screen (argparse cannot nest an optional sub-command)."""
    if args.merge_dirs:
        if args.merge_dirs[0] != "merge":
            raise UsageError(f"unexpected argument {args.merge_dirs[0]!r} (did you mean `cgnn screen merge DIR...`?)")
        dirs = args.merge_dirs[1:]
        if not dirs or not args.out:
            raise UsageError("usage: cgnn screen merge DIR [DIR ...] --out DIR")
        args.dirs = dirs
        return _cmd_merge(args)
    missing = [f for f, v in (("--model", args.model), ("--prototype", args.prototype), ("--out", args.out)) if not v]
    if missing:
        raise UsageError(f"missing {', '.join(missing)}")
    args.model = str(best_model(args.model))
    return _cmd_screen(args)

