"""Stage 2: the reference CGNN crystal graph coordinator (Tony-Y/cgnn ``tools/mp_graph.py``), vectorised.

For every centre atom ``j`` of a crystal the reference

1. computes the cutoff ``C[i, j] = (r_i + r_j) * factor_vol * radius_factor`` where ``r`` is pymatgen's
   ``atomic_radius_calculated`` (falling back to ``atomic_radius``) and
   ``factor_vol = (V_cell / sum_i 4/3 pi r_i^3) ** (1/3)``;
2. collects the candidates: every atom ``i`` in any of the 27 cells with offsets in ``{-1, 0, 1}^3``
   (``l`` outermost, fractional coordinates not wrapped) with ``1e-8 < d < C[i, j]``, ordered by
   ``(i, image)``;
3. prunes them with at most ``max_rounds`` rounds of 2-means on ``x = d / C``: when the two centres are
   more than ``cc_cutoff`` apart, only the cluster with the smaller centre is kept.

The reference uses scikit-learn ``KMeans(n_init=10)``; here the 2-means is solved exactly (1-D 2-means
has a contiguous optimal split of the sorted values, so every split is tried at once). Everything is
array code: :func:`coordinate_many` / :func:`coordinate_packed` coordinate a whole batch of crystals
with a fixed number of numpy calls per chunk of ~2^18 pair-images (the candidate search) plus one
vectorised pruning pass over all centres of the batch, which amortises the per-structure Python
overhead. :func:`coordinate_csr` and :func:`coordinate` are the one-crystal forms.

The neighbour multisets are directed (``nbr`` of centre ``j`` are the sources of its incoming bonds),
asymmetric, and contain repeated indices (several images of one atom) and self-images.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass

import numpy as np

from cgnn_dgl.structures import Crystal, StructureError, as_crystal

__all__ = [
    "DEFAULT_PARAMS",
    "OVERLAP_TOLERANCE",
    "CoordinatorParams",
    "MissingRadiusError",
    "candidates",
    "check_overlap",
    "closest_distances",
    "coordinate",
    "coordinate_csr",
    "coordinate_many",
    "coordinate_packed",
    "factor_vol",
    "prune_candidates",
    "radius_table",
]

MIN_DISTANCE = 1e-8
"""Distances at or below this are the atom itself (the reference's ``1e-8 < d``)."""

# The 27 image offsets, l outermost (l, m, n each in -1, 0, 1): the reference's enumeration order.
IMAGES = np.array([(l, m, n) for l in (-1, 0, 1) for m in (-1, 0, 1) for n in (-1, 0, 1)], dtype=np.float64)
N_IMAGES = 27
_TWO_SIGNS = np.array([-2.0, 0.0, 2.0])  # 2 * t_c for t_c = -1, 0, 1 (matches IMAGES' order)

# Screening runs on squared distances from an expansion that loses a few ulps; anything within this
# relative margin of the cutoff is re-checked with the direct formula.
_SCREEN_MARGIN = 1e-6
# Pair-images per internal chunk: big enough to amortise numpy call overhead, small enough for cache.
_CHUNK_PAIR_IMAGES = 1 << 18


PRUNINGS = ("exact", "kmeans")

OVERLAP_TOLERANCE = 0.5
"""Å: atoms closer than this (periodic minimum image, an atom's own images included) are on top of each
other and the structure is rejected (``overlapping_atoms``); pymatgen's own proximity tolerance."""


@dataclass(frozen=True)
class CoordinatorParams:
    """The coordinator's three knobs (reference defaults)."""

    radius_factor: float = 1.2
    cc_cutoff: float = 0.03
    max_rounds: int = 10
    pruning: str = "exact"  # "exact" 1-D 2-means (default) | "kmeans": the reference's KMeans choices
    overlap_tolerance: float = OVERLAP_TOLERANCE  # Å; atoms closer are rejected (0 turns the check off)

    def __post_init__(self) -> None:
        if self.pruning not in PRUNINGS:
            raise ValueError(f"pruning must be one of {PRUNINGS}, not {self.pruning!r}")
        if not self.overlap_tolerance >= 0:
            raise ValueError(f"overlap_tolerance must be >= 0 Å, not {self.overlap_tolerance!r}")

    def as_dict(self) -> dict:
        return asdict(self)


DEFAULT_PARAMS = CoordinatorParams()


class MissingRadiusError(StructureError):
    """An element with neither a calculated nor an empirical atomic radius in pymatgen."""

    def __init__(self, element: str, name: str = ""):
        where = f"{name}: " if name else ""
        super().__init__("no_radius", f"{where}no atomic radius for the element {element}")
        self.element = element
        self.structure_name = name

    def __reduce__(self):  # picklable, e.g. when returned from a worker process
        return (type(self), (self.element, self.structure_name))


# ----------------------------------------------------------------------------------------- radii

_RADII: np.ndarray | None = None
_SYMBOLS: list[str] | None = None


def radius_table() -> np.ndarray:
    """Radii in Å indexed by atomic number (index 0 and elements without any radius are NaN)."""
    global _RADII, _SYMBOLS
    if _RADII is None:
        from pymatgen.core.periodic_table import Element

        table = np.full(119, np.nan)
        symbols = [""] * 119
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pymatgen warns for every element lacking data
            for z in range(1, 119):
                el = Element.from_Z(z)
                symbols[z] = el.symbol
                r = el.atomic_radius_calculated
                if r is None:
                    r = el.atomic_radius
                if r is not None:
                    table[z] = float(r)
        table.setflags(write=False)
        _RADII, _SYMBOLS = table, symbols
    return _RADII


def _symbol(z: int) -> str:
    radius_table()
    assert _SYMBOLS is not None
    return _SYMBOLS[z] if 0 < z < len(_SYMBOLS) else f"Z={z}"


# --------------------------------------------------------------------------------- batch checks


def _volumes(lattices: np.ndarray) -> np.ndarray:
    """|a . (b x c)| for a stack (S, 3, 3) of lattices (pymatgen's ``Lattice.volume``)."""
    a, b, c = lattices[:, 0], lattices[:, 1], lattices[:, 2]
    return np.abs(np.einsum("si,si->s", np.cross(a, b), c))


def _check_batch(crystals: Sequence[Crystal], numbers: np.ndarray, frac: np.ndarray, lattices: np.ndarray,
                 n_atoms: np.ndarray) -> list[StructureError | None]:
    """Per-structure errors (None = fine), the same reasons as :meth:`Crystal.validate` plus no_radius."""
    S = len(crystals)
    errors: list[StructureError | None] = [None] * S
    struct_of_atom = np.repeat(np.arange(S), n_atoms)

    def flag(bad_struct: np.ndarray, make) -> None:
        for s in np.flatnonzero(bad_struct):
            if errors[s] is None:
                errors[s] = make(int(s))

    flag(n_atoms == 0, lambda s: StructureError("no_atoms", f"{crystals[s].name}: structure has no atoms"))
    finite_atoms = np.isfinite(frac).all(axis=1)
    bad = ~np.isfinite(lattices).all(axis=(1, 2))
    if not finite_atoms.all():
        bad |= np.bincount(struct_of_atom[~finite_atoms], minlength=S) > 0
    flag(bad, lambda s: StructureError("non_finite", f"{crystals[s].name}: non-finite lattice or coordinates"))
    with np.errstate(invalid="ignore"):
        det = np.linalg.det(lattices) if S else np.zeros(0)
    flag(~(np.abs(det) > 1e-8),
         lambda s: StructureError("singular_lattice",
                                  f"{crystals[s].name}: lattice volume {det[s]:.3g} <= 0 (singular cell)"))
    z_ok = (numbers >= 1) & (numbers <= 118)
    if not z_ok.all():
        flag(np.bincount(struct_of_atom[~z_ok], minlength=S) > 0,
             lambda s: StructureError("unknown_element", f"{crystals[s].name}: atomic number outside 1..118"))
    radii = radius_table()[np.where(z_ok, numbers, 0)]
    no_r = z_ok & np.isnan(radii)
    if no_r.any():
        first = {}
        for a in np.flatnonzero(no_r):
            first.setdefault(int(struct_of_atom[a]), int(numbers[a]))
        for s, z in first.items():
            if errors[s] is None:
                errors[s] = MissingRadiusError(_symbol(z), crystals[s].name)
    return errors


# ------------------------------------------------------------------------------ overlapping atoms

_OVERLAP_PAIR_BUDGET = 1 << 15  # atom pairs per chunk of the closest-pair search (x 27 images)


def _reduce_cells(lattices: np.ndarray) -> np.ndarray:
    """Integer unimodular ``M`` (S, 3, 3) with every ``M[s] @ lattices[s]`` pairwise reduced:
    ``|b_i . b_j| <= |b_j|^2 / 2`` for all i != j (each step shortens a vector, so it ends), vectorised over
    cells; on such a cell the 27 images around the wrapped difference hold the minimum image."""
    B = lattices.astype(np.float64).copy()
    S = B.shape[0]
    M = np.broadcast_to(np.eye(3), (S, 3, 3)).copy()
    for _ in range(200):
        changed = False
        for i in range(3):
            for j in range(3):
                if i == j:
                    continue
                bj2 = np.einsum("sd,sd->s", B[:, j], B[:, j])
                q = np.rint(np.einsum("sd,sd->s", B[:, i], B[:, j]) / bj2)
                q[~np.isfinite(q)] = 0
                if q.any():
                    changed = True
                    B[:, i] -= q[:, None] * B[:, j]
                    M[:, i] -= q[:, None] * M[:, j]
        if not changed:
            break
    return M


def _reduced(frac: np.ndarray, lattices: np.ndarray, n_atoms: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The same crystals (same Cartesian positions) on pairwise-reduced cells."""
    M = _reduce_cells(lattices)
    moved = np.flatnonzero(np.any(np.eye(3) != M, axis=(1, 2)))
    if moved.size == 0:
        return frac, lattices
    lattices = np.einsum("sij,sjd->sid", M, lattices)
    inv = np.linalg.inv(M[moved])  # unimodular: exact up to rounding
    struct_of_atom = np.repeat(np.arange(len(n_atoms)), n_atoms)
    pos = np.full(len(n_atoms), -1)
    pos[moved] = np.arange(moved.size)
    atoms = np.flatnonzero(pos[struct_of_atom] >= 0)
    frac = frac.copy()
    frac[atoms] = np.einsum("ac,acd->ad", frac[atoms], inv[pos[struct_of_atom[atoms]]])
    return frac, lattices


def closest_distances(frac: np.ndarray, lattices: np.ndarray, n_atoms: np.ndarray) -> np.ndarray:
    """Per structure, the shortest distance (Å) between two atoms, or an atom and its own periodic image,
    under the periodic minimum-image convention (coordinates are wrapped into the cell first, so this does
    not depend on how they were written). ``frac`` (N, 3) concatenates the structures' atoms."""
    S = n_atoms.shape[0]
    out = np.full(S, np.inf)
    if S == 0:
        return out
    frac, lattices = _reduced(np.asarray(frac, np.float64), np.asarray(lattices, np.float64), n_atoms)
    nonzero = np.any(IMAGES != 0, axis=1)
    self_img = np.linalg.norm(np.einsum("kc,scd->skd", IMAGES[nonzero], lattices), axis=2).min(axis=1)
    out = np.where(n_atoms > 0, self_img, np.inf)
    f = frac - np.floor(frac)
    struct_of_atom = np.repeat(np.arange(S), n_atoms)
    first = np.zeros(S + 1, dtype=np.int64)
    np.cumsum(n_atoms, out=first[1:])
    # pairs (j, i > j) of atoms of one structure: atom j pairs with the n - 1 - (j - first) atoms after it
    after = first[1:][struct_of_atom] - np.arange(f.shape[0]) - 1
    ends = np.cumsum(after)
    # |(df + t) A|^2 = df G df + 2 t . (G df) + t G t for the 27 images t: no per-image gather of vectors
    G = np.einsum("sid,sjd->sij", lattices, lattices)
    tgt = np.einsum("ki,sij,kj->sk", IMAGES, G, IMAGES)  # (S, 27)
    a, N = 0, f.shape[0]
    while a < N:
        b = max(int(np.searchsorted(ends, (ends[a - 1] if a else 0) + _OVERLAP_PAIR_BUDGET, side="right")), a + 1)
        cnt = after[a:b]
        if cnt.sum():
            gj = np.repeat(np.arange(a, b), cnt)
            start = np.repeat(np.cumsum(cnt) - cnt, cnt)
            gi = gj + 1 + (np.arange(gj.shape[0]) - start)
            df = f[gi] - f[gj]
            df -= np.rint(df)
            st = struct_of_atom[gj]
            w = np.einsum("pij,pj->pi", G[st], df)
            d2 = (w @ (2.0 * IMAGES.T)) + tgt[st]
            d2 = d2.min(axis=1) + np.einsum("pi,pi->p", df, w)
            # pairs come grouped by structure: one reduction per structure of the chunk
            cut = np.flatnonzero(np.diff(st)) + 1
            seg = np.concatenate([[0], cut])
            np.minimum.at(out, st[seg], np.sqrt(np.maximum(np.minimum.reduceat(d2, seg), 0.0)))
        a = b
    return out


def _overlap_message(crystal: Crystal, tol: float) -> str:
    """Which atoms of ``crystal`` are closer than ``tol`` (for the reject message; rare, so per pair)."""
    n = crystal.n_atoms
    frac, lat = _reduced(crystal.frac, crystal.lattice[None], np.array([n]))
    lat = lat[0]
    self_img = float(np.linalg.norm(IMAGES[np.any(IMAGES != 0, axis=1)] @ lat, axis=1).min())
    best = (self_img, 0, 0)
    f = frac - np.floor(frac)
    img = IMAGES @ lat
    for j in range(n - 1):
        df = f[j + 1:] - f[j]
        df -= np.rint(df)
        d = np.sqrt((((df @ lat)[:, None, :] + img[None]) ** 2).sum(axis=2).min(axis=1))
        k = int(np.argmin(d))
        if d[k] < best[0]:
            best = (float(d[k]), j, j + 1 + k)
    d, j, i = best
    what = (f"atom {j} is {d:.3g} Å from its own periodic image" if i == j else
            f"atoms {j} and {i} are {d:.3g} Å apart")
    return f"{crystal.name}: {what}, closer than the overlap tolerance {tol:g} Å (overlap_tolerance)"


# ------------------------------------------------------------------------------------- pruning


def prune_candidates(x: np.ndarray, counts: np.ndarray, cc_cutoff: float = DEFAULT_PARAMS.cc_cutoff,
                     max_rounds: int = DEFAULT_PARAMS.max_rounds) -> np.ndarray:
    """Nearest-neighbour clustering of many candidate lists at once.

    ``x`` holds the normalised distances of all lists back to back (``counts[j]`` values for list ``j``).
    Returns a boolean mask over ``x``: the candidates that survive at most ``max_rounds`` rounds of exact
    1-D 2-means, each round keeping the smaller-centre cluster when the centres differ by more than
    ``cc_cutoff`` (ties: a split is only allowed between distinct values, so equal values always stay
    together; among equally good splits the one with the fewest values on the left wins).
    """
    x = np.asarray(x, dtype=np.float64)
    counts = np.asarray(counts, dtype=np.int64)
    n_lists = counts.shape[0]
    keep = np.ones(x.shape[0], dtype=bool)
    if x.shape[0] == 0 or max_rounds <= 0:
        return keep
    starts = np.zeros(n_lists, dtype=np.int64)
    np.cumsum(counts[:-1], out=starts[1:])
    # threshold per list: candidates with x <= thr survive (the kept set is always a prefix of the
    # sorted values with no tie across its end, so a threshold describes it exactly)
    thr = np.full(n_lists, np.inf)
    owner = np.repeat(np.arange(n_lists), counts)
    todo = counts >= 2
    width = 2
    max_count = int(counts.max())
    while width // 2 < max_count:  # buckets of lists with width/2 < count <= width
        rows = np.flatnonzero(todo & (counts <= width) & (counts > width // 2))
        if rows.size:
            thr[rows] = _prune_bucket(x, starts[rows], counts[rows], width, cc_cutoff, max_rounds)
        width *= 2
    return x <= thr[owner]


def _prune_bucket(x: np.ndarray, starts: np.ndarray, counts: np.ndarray, width: int, cc_cutoff: float,
                  max_rounds: int) -> np.ndarray:
    """Exact 2-means rounds for lists padded to ``width``; returns each list's survival threshold."""
    R = starts.shape[0]
    col = np.arange(width)
    valid = col[None, :] < counts[:, None]
    src = np.where(valid, starts[:, None] + col[None, :], 0)
    v = np.where(valid, x[src], np.inf)
    v.sort(axis=1)
    # split t (t = 1..width-1) puts the t smallest values left; allowed only between distinct values
    distinct = v[:, 1:] > v[:, :-1]
    base = v[:, :1]
    shifted = np.where(valid, v - base, 0.0)  # shift for precision; 2-means is shift invariant
    P1 = np.cumsum(shifted, axis=1)
    tf = col[1:].astype(np.float64)
    L = counts.copy()
    active = np.arange(R)
    for _ in range(max_rounds):
        if active.size == 0:
            break
        La = L[active]
        w = int(La.max()) - 1  # splits t = 1..w are the only possible ones this round
        t = tf[:w]
        Lf = La.astype(np.float64)[:, None]
        S1L = P1[active, :w]
        S1T = P1[active, La - 1][:, None]
        ok = distinct[active, :w] & (col[None, 1:w + 1] < La[:, None])
        # between-cluster scatter t (L-t) / L * (m1 - m0)^2, up to the row constant 1/L: maximising it
        # minimises the total within-cluster SSE
        score = Lf * S1L
        score -= t * S1T
        score *= score
        den = Lf - t
        den *= t
        with np.errstate(divide="ignore", invalid="ignore"):
            score /= den
        np.copyto(score, -1.0, where=~ok)
        best = np.argmax(score, axis=1)  # first maximum
        rows = np.arange(active.size)
        has_split = ok[rows, best]
        tb = best + 1
        left = S1L[rows, best]
        c0 = left / tb
        with np.errstate(divide="ignore", invalid="ignore"):
            c1 = (S1T[:, 0] - left) / (La - tb)
        prune = has_split & (np.abs(c1 - c0) > cc_cutoff)
        L[active[prune]] = tb[prune]
        active = active[prune & (tb > 1)]
    return v[np.arange(R), L - 1]


# --------------------------------------------------------------------------------- coordinator


def _concat(crystals: Sequence[Crystal]):
    n_atoms = np.fromiter((c.numbers.shape[0] for c in crystals), dtype=np.int64, count=len(crystals))
    if len(crystals):
        numbers = np.concatenate([c.numbers for c in crystals])
        frac = np.concatenate([c.frac for c in crystals]).reshape(-1, 3)
        lattices = np.stack([c.lattice for c in crystals])
    else:
        numbers = np.zeros(0, np.int64)
        frac = np.zeros((0, 3))
        lattices = np.zeros((0, 3, 3))
    return numbers, frac, lattices, n_atoms


class _Batch:
    """Per-atom and per-structure arrays of a batch of valid crystals, shared by all chunks."""

    def __init__(self, numbers: np.ndarray, frac: np.ndarray, lattices: np.ndarray, n_atoms: np.ndarray,
                 radius_factor: float):
        S = n_atoms.shape[0]
        N = frac.shape[0]
        self.n_atoms = n_atoms
        self.frac = frac
        self.lattices = lattices
        self.struct_of_atom = np.repeat(np.arange(S), n_atoms)
        self.atom_off = np.zeros(S + 1, dtype=np.int64)
        np.cumsum(n_atoms, out=self.atom_off[1:])
        self.radii = radius_table()[numbers]
        self.fvol = _factor_vol(self.radii, lattices, n_atoms)
        # centre j pairs with every atom i of its structure: n_of_atom pairs starting at pair_start
        self.n_of_atom = n_atoms[self.struct_of_atom]
        self.first_of_atom = self.atom_off[:-1][self.struct_of_atom]
        self.pair_start = np.zeros(N + 1, dtype=np.int64)
        np.cumsum(self.n_of_atom, out=self.pair_start[1:])
        self.scale_of_atom = (self.fvol * radius_factor)[self.struct_of_atom]
        # Screening on squared distances: with x = frac @ lattice (Cartesian), G = lattice lattice^T and
        # y = G frac per atom, a pair r0 = f_i - f_j and an image t in {-1,0,1}^3 give
        #   |A (r0 + t)|^2 = |x_i - x_j|^2 + 2 (y_i - y_j) . t + t^T G t,
        # whose middle term separates over the three axes: no per-pair matrix product is needed.
        G = np.einsum("sid,sjd->sij", lattices, lattices)
        # per-pair work is done on (component, pair) arrays so that numpy's inner loops run over pairs
        self.QT = np.empty((6, N))
        np.einsum("ac,acd->da", frac, lattices[self.struct_of_atom], out=self.QT[:3])
        np.einsum("aij,aj->ia", G[self.struct_of_atom], frac, out=self.QT[3:])
        self.fracT = np.ascontiguousarray(frac.T)
        self.latT = np.ascontiguousarray(lattices.reshape(S, 9).T)  # (9, S): row 3*i+c = lattice[i, c]
        self.neg_tgtT = -np.einsum("ki,sij,kj->ks", IMAGES, G, IMAGES)  # (27, S): -t^T G t

    def chunks(self, budget: int) -> Iterable[tuple[int, int]]:
        """Ranges of centre atoms with about ``budget`` pair-images each (at least one centre)."""
        N = self.n_of_atom.shape[0]
        ends = self.pair_start[1:] * N_IMAGES
        a = 0
        while a < N:
            b = int(np.searchsorted(ends, self.pair_start[a] * N_IMAGES + budget, side="right"))
            b = max(b, a + 1)
            yield a, b
            a = b

    def candidates(self, c0: int, c1: int):
        """Candidates of the centres c0..c1-1 in the reference's (j, i, image) order.

        Returns ``centre`` (batch atom index of j), ``nbr_local`` (index of i within its structure),
        ``x`` = d / C[j, i] and ``d``.
        """
        n_c = self.n_of_atom[c0:c1]
        P = int(self.pair_start[c1] - self.pair_start[c0])
        gj = np.repeat(np.arange(c0, c1), n_c)
        gi = np.arange(P, dtype=np.int64)
        gi += np.repeat(self.first_of_atom[c0:c1] - (self.pair_start[c0:c1] - self.pair_start[c0]), n_c)
        diff = np.take(self.QT, gi, axis=1)
        diff -= np.take(self.QT, gj, axis=1)  # rows 0-2: x_i - x_j, rows 3-5: w = y_i - y_j
        d0sq = np.einsum("cp,cp->p", diff[:3], diff[:3])
        cut = np.take(self.radii, gi) + np.take(self.radii, gj)
        cut *= np.repeat(self.scale_of_atom[c0:c1], n_c)  # C[i, j]
        rhs = cut * cut * (1.0 + _SCREEN_MARGIN) - d0sq
        e = diff[3:, None, :] * _TWO_SIGNS[None, :, None]  # (axis, shift, P) = 2 w_c t_c
        e[0] -= rhs
        lhs = (e[0][:, None, :] + e[1][None, :, :]).reshape(9, P)
        lhs = (lhs[:, None, :] + e[2][None, :, :]).reshape(N_IMAGES, P)  # image k = 9 l + 3 m + n
        bound = np.repeat(np.take(self.neg_tgtT, self.struct_of_atom[c0:c1], axis=1), n_c, axis=1)
        hit = np.flatnonzero(np.ascontiguousarray(np.less(lhs, bound).T))  # (pair, image) order
        p = hit // N_IMAGES
        k = hit - p * N_IMAGES
        # exact distances of the survivors, the reference's way: r = f_i - f_j + lmn, R = A r, d = |R|
        pi = np.take(gi, p)
        pj = np.take(gj, p)
        r = np.take(self.fracT, pi, axis=1)
        r -= np.take(self.fracT, pj, axis=1)
        r += np.take(IMAGES.T, k, axis=1)
        lat = np.take(self.latT, np.take(self.struct_of_atom, pj), axis=1)
        R0 = r[0] * lat[0] + r[1] * lat[3] + r[2] * lat[6]
        R1 = r[0] * lat[1] + r[1] * lat[4] + r[2] * lat[7]
        R2 = r[0] * lat[2] + r[1] * lat[5] + r[2] * lat[8]
        d = np.sqrt(R0 * R0 + R1 * R1 + R2 * R2)
        C = np.take(cut, p)
        ok = (d > MIN_DISTANCE) & (d < C)
        d = d[ok]
        pi = pi[ok]
        pj = pj[ok]
        return pj, pi - np.take(self.first_of_atom, pj), d / C[ok], d


def _factor_vol(radii: np.ndarray, lattices: np.ndarray, n_atoms: np.ndarray) -> np.ndarray:
    S = n_atoms.shape[0]
    sa = np.repeat(np.arange(S), n_atoms)
    v_atoms = np.bincount(sa, weights=4.0 / 3.0 * math.pi * radii ** 3, minlength=S)
    with np.errstate(divide="ignore", invalid="ignore"):
        return (_volumes(lattices) / v_atoms) ** (1.0 / 3.0)


def _prepare(crystals: Sequence[Crystal], radius_factor: float, errors: str, overlap_tolerance: float = 0.0):
    """Concatenate and check; returns (per-structure errors, index of valid structures, _Batch or None)."""
    numbers, frac, lattices, n_atoms = _concat(crystals)
    errs = _check_batch(crystals, numbers, frac, lattices, n_atoms)
    if overlap_tolerance > 0:
        _check_overlaps(crystals, errs, frac, lattices, n_atoms, overlap_tolerance)
    if errors == "raise":
        for e in errs:
            if e is not None:
                raise e
    good = np.fromiter((e is None for e in errs), dtype=bool, count=len(errs))
    gidx = np.flatnonzero(good)
    if gidx.size == 0:
        return errs, gidx, None
    if gidx.size < len(crystals):
        atom_keep = np.repeat(good, n_atoms)
        numbers, frac, lattices, n_atoms = numbers[atom_keep], frac[atom_keep], lattices[gidx], n_atoms[gidx]
    return errs, gidx, _Batch(numbers, frac, lattices, n_atoms, radius_factor)


def check_overlap(crystal: Crystal, tol: float = OVERLAP_TOLERANCE) -> None:
    """Raise :class:`StructureError` ``overlapping_atoms`` when two atoms of ``crystal`` (or an atom and its
    own periodic image) are closer than ``tol`` Å, minimum image; ``tol`` 0 checks nothing."""
    errs: list[StructureError | None] = [None]
    if tol > 0 and crystal.n_atoms:
        _check_overlaps([crystal], errs, crystal.frac, crystal.lattice[None], np.array([crystal.n_atoms]), tol)
    if errs[0] is not None:
        raise errs[0]


def _check_overlaps(crystals, errs, frac, lattices, n_atoms, tol: float) -> None:
    """Flag, in ``errs``, the so far valid structures with two atoms closer than ``tol`` Å."""
    ok = np.fromiter((e is None for e in errs), dtype=bool, count=len(errs))
    if not ok.any():
        return
    keep = np.repeat(ok, n_atoms)
    closest = closest_distances(frac[keep], lattices[ok], n_atoms[ok])
    for s in np.flatnonzero(ok)[closest < tol]:
        errs[s] = StructureError("overlapping_atoms", _overlap_message(crystals[s], tol))


def coordinate_packed(crystals: Iterable, params: CoordinatorParams = DEFAULT_PARAMS, *,
                      errors: str = "raise", ratios: bool = False) -> tuple:
    """Coordinate a batch and return it packed: ``(errs, counts, nbr)`` (``+ (ratio,)`` with ``ratios``).

    ``errs[s]`` is None or the :class:`StructureError` of crystal ``s`` (``errors="return"``; with
    ``errors="raise"`` the first one is raised). ``counts`` concatenates the per-atom neighbour counts
    of the crystals without an error, in batch order, and ``nbr`` their neighbour lists (indices within
    each crystal). Cheaper to send between processes than one pair of arrays per crystal.

    ``ratio`` (float64, one per kept bond, aligned with ``nbr``) is the bond's distance over its cutoff,
    ``d / ((r_i + r_j) * factor_vol * radius_factor)``, in (0, 1): dimensionless, so unchanged by a uniform
    scaling of the cell (and by rotations), but it tells the neighbour shells apart. It is what the
    optional geometry input of the model (``model.geometry``) reads.
    """
    if errors not in ("raise", "return"):
        raise ValueError(f"errors must be 'raise' or 'return', not {errors!r}")
    crystals = [as_crystal(c) for c in crystals]
    errs, _gidx, batch = _prepare(crystals, float(params.radius_factor), errors, float(params.overlap_tolerance))
    if batch is None:
        empty = (errs, np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64))
        return empty + (np.zeros(0),) if ratios else empty
    parts = [batch.candidates(c0, c1) for c0, c1 in batch.chunks(_CHUNK_PAIR_IMAGES)]
    centre = np.concatenate([q[0] for q in parts])
    nbr = np.concatenate([q[1] for q in parts])
    x = np.concatenate([q[2] for q in parts])
    del parts
    N = batch.frac.shape[0]
    # one pruning pass over the whole batch: candidates are grouped by centre, in centre order
    prune = prune_candidates
    if params.pruning == "kmeans":
        from cgnn_dgl.kmeans_compat import prune_candidates_kmeans as prune
    keep = prune(x, np.bincount(centre, minlength=N), float(params.cc_cutoff), int(params.max_rounds))
    counts = np.bincount(centre[keep], minlength=N)
    if ratios:
        return errs, counts, nbr[keep], x[keep]
    return errs, counts, nbr[keep]


def coordinate_many(crystals: Iterable, params: CoordinatorParams = DEFAULT_PARAMS, *,
                    errors: str = "raise", ratios: bool = False) -> list:
    """Coordinate a batch of crystals (``Crystal`` or pymatgen ``Structure``) in one vectorised pass.

    Returns one ``(counts int64 (n,), nbr int64 (counts.sum(),))`` per crystal, as
    :func:`coordinate_csr`. A structure that cannot be coordinated raises its :class:`StructureError`
    (``errors="raise"``, the first in batch order) or, with ``errors="return"``, has the exception
    object in its place of the list. With ``ratios`` each result is ``(counts, nbr, ratio)``, ``ratio``
    the per-bond distance / cutoff of :func:`coordinate_packed`.
    """
    crystals = [as_crystal(c) for c in crystals]
    packed = coordinate_packed(crystals, params, errors=errors, ratios=ratios)
    errs, counts, nbr = packed[:3]
    results: list = list(errs)
    good = [s for s, err in enumerate(errs) if err is None]
    n_atoms = np.fromiter((crystals[s].numbers.shape[0] for s in good), dtype=np.int64, count=len(good))
    atom_off = np.zeros(len(good) + 1, dtype=np.int64)
    np.cumsum(n_atoms, out=atom_off[1:])
    edge_off = np.zeros(counts.shape[0] + 1, dtype=np.int64)
    np.cumsum(counts, out=edge_off[1:])
    a_off = atom_off.tolist()
    e_off = edge_off[atom_off].tolist()
    for k, s in enumerate(good):
        res = (counts[a_off[k]:a_off[k + 1]], nbr[e_off[k]:e_off[k + 1]])
        results[s] = res + (packed[3][e_off[k]:e_off[k + 1]],) if ratios else res
    return results


def coordinate_csr(crystal, params: CoordinatorParams = DEFAULT_PARAMS, *, ratios: bool = False) -> tuple:
    """Neighbours of one crystal in CSR form: ``counts`` (n,) and ``nbr`` (sum counts,), both int64.

    With ``ptr = [0, *cumsum(counts)]``, ``nbr[ptr[j]:ptr[j+1]]`` are the neighbour atoms of centre
    ``j`` in the reference's order (ascending ``i``, then image). Raises :class:`StructureError`
    (:class:`MissingRadiusError` for an element without a radius). ``ratios`` adds the per-bond
    distance / cutoff (see :func:`coordinate_packed`).
    """
    return coordinate_many([crystal], params, ratios=ratios)[0]


def coordinate(structure, *, radius_factor: float = DEFAULT_PARAMS.radius_factor,
               cc_cutoff: float = DEFAULT_PARAMS.cc_cutoff,
               max_rounds: int = DEFAULT_PARAMS.max_rounds) -> list[list[int]]:
    """The reference's ``neighbors``: one list of neighbour atom indices per atom (pymatgen or Crystal)."""
    params = CoordinatorParams(radius_factor, cc_cutoff, max_rounds)
    counts, nbr = coordinate_csr(as_crystal(structure), params)
    ptr = np.zeros(counts.shape[0] + 1, dtype=np.int64)
    np.cumsum(counts, out=ptr[1:])
    flat = nbr.tolist()
    return [flat[ptr[j]:ptr[j + 1]] for j in range(counts.shape[0])]


# ------------------------------------------------------------------------- inspection helpers


def factor_vol(structure) -> float:
    """``(V_cell / sum 4/3 pi r^3) ** (1/3)`` of one crystal (raises for elements without a radius)."""
    _, _, batch = _prepare([as_crystal(structure)], 1.0, "raise")
    return float(batch.fvol[0])


def candidates(structure, params: CoordinatorParams = DEFAULT_PARAMS) -> list[list[tuple[int, float, float]]]:
    """Before pruning: for every centre j the list of ``(i, d, d / C[j, i])`` in the reference's order."""
    c = as_crystal(structure)
    _, _, batch = _prepare([c], float(params.radius_factor), "raise")
    centre, nbr, x, d = batch.candidates(0, c.n_atoms)
    out: list[list[tuple[int, float, float]]] = [[] for _ in range(c.n_atoms)]
    for j, i, dd, xx in zip(centre.tolist(), nbr.tolist(), d.tolist(), x.tolist()):
        out[j].append((i, dd, xx))
    return out
