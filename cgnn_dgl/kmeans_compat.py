"""Optional pruning that reproduces the reference's scikit-learn KMeans choices, not the optimum.

The reference prunes each atom's candidates with ``KMeans(n_clusters=2, random_state=0, n_init=10)``.
Our default (``pruning="exact"``) takes the globally optimal 1-D 2-means split instead, which is what
KMeans is trying to find; on about 0.1% of structures KMeans stops in a worse local optimum and the
graphs differ. ``pruning="kmeans"`` emulates that algorithm (k-means++ seeding, Lloyd iterations,
best of 10 by inertia) so that graphs match the official dataset bit for bit.

Why this can be vectorised: every ``fit`` re-seeds ``RandomState(0)``, and each k-means++ init with two
clusters draws exactly three uniforms (one for the first centre, two local trials for the second), so
the random numbers are the same 30 values for every candidate list. What remains is arithmetic, done
here for all lists at once, in the same order of operations as scikit-learn where it can matter
(distances as ``-2xc + c² + x²``, first index on ties, strict improvement in inertia).
"""
from __future__ import annotations

import numpy as np

N_INIT = 10
MAX_ITER = 300
TOL = 1e-4
_U = np.random.RandomState(0).random_sample(3 * N_INIT)  # the draws of every KMeans(random_state=0).fit


def _sq_dist_to(c: np.ndarray, x: np.ndarray, xsq: np.ndarray) -> np.ndarray:
    """Squared distances of every value to a per-row centre, the way scikit-learn's k-means++ computes them."""
    d = -2.0 * (c[:, None] * x)
    d += (c * c)[:, None]
    d += xsq
    return np.maximum(d, 0.0)


def _assign(x: np.ndarray, centers: np.ndarray) -> np.ndarray:
    """Lloyd's E-step: label 1 only when strictly closer to centre 1 (argmin keeps the first on ties)."""
    c0, c1 = centers[:, 0:1], centers[:, 1:2]
    d0 = c0 * c0 - 2.0 * (x * c0)
    d1 = c1 * c1 - 2.0 * (x * c1)
    return (d1 < d0).astype(np.int64)


def _means(x: np.ndarray, labels: np.ndarray, valid: np.ndarray, old: np.ndarray) -> np.ndarray:
    """M-step; an empty cluster takes the value farthest from its current centre (scikit-learn's fix-up)."""
    out = np.empty_like(old)
    w1 = (labels == 1) & valid
    w0 = (labels == 0) & valid
    n0, n1 = w0.sum(1), w1.sum(1)
    s0 = np.cumsum(np.where(w0, x, 0.0), axis=1)[:, -1]
    s1 = np.cumsum(np.where(w1, x, 0.0), axis=1)[:, -1]
    for empty, (n_e, n_o), (s_e, s_o) in ((n0 == 0, (n0, n1), (s0, s1)), (n1 == 0, (n1, n0), (s1, s0))):
        rows = np.flatnonzero(empty & valid.any(1))
        for r in rows:  # rare (only when the seeds coincide): plain Python is fine
            cen = old[r, labels[r]]
            far = int(np.argmax(np.where(valid[r], (x[r] - cen) ** 2, -1.0)))
            s_o[r] -= x[r, far]
            n_o[r] -= 1
            s_e[r] = x[r, far]
            n_e[r] = 1
    out[:, 0] = np.where(n0 > 0, s0 / np.maximum(n0, 1), old[:, 0])
    out[:, 1] = np.where(n1 > 0, s1 / np.maximum(n1, 1), old[:, 1])
    return out


def kmeans2_rows(values: np.ndarray, n: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``KMeans(n_clusters=2, random_state=0, n_init=10).fit`` on each row's first ``n`` values.

    Returns (labels (R, W), centres (R, 2)) in the rows' own coordinates.
    """
    R, W = values.shape
    valid = np.arange(W)[None, :] < n[:, None]
    nf = n.astype(np.float64)
    mean = np.where(valid, values, 0.0).sum(1) / nf
    x = np.where(valid, values - mean[:, None], 0.0)  # scikit-learn centres the data first
    xsq = x * x
    var = np.where(valid, (x - (x.sum(1) / nf)[:, None]) ** 2, 0.0).sum(1) / nf
    tol = var * TOL
    rows = np.arange(R)
    # k-means++ needs the cumulative distribution of uniform weights: cdf_j = (j + 1) / n up to rounding
    p = np.where(valid, 1.0 / nf[:, None], 0.0)
    cdf = np.cumsum(p, axis=1)
    cdf /= cdf[rows, n - 1][:, None]
    best_inertia = np.full(R, np.inf)
    best_labels = np.zeros((R, W), dtype=np.int64)
    best_centers = np.zeros((R, 2))
    for k in range(N_INIT):
        u0, u1, u2 = _U[3 * k], _U[3 * k + 1], _U[3 * k + 2]
        first = np.minimum((valid & (cdf <= u0)).sum(1), n - 1)  # searchsorted(side="right")
        c0 = x[rows, first]
        closest = np.where(valid, _sq_dist_to(c0, x, xsq), 0.0)
        pot = closest.sum(1)
        cum = np.cumsum(closest, axis=1)
        cands = []
        pots = []
        for u in (u1, u2):
            rv = u * pot
            cid = np.minimum(np.where(valid, cum < rv[:, None], False).sum(1), n - 1)  # searchsorted(left)
            d = np.where(valid, np.minimum(closest, _sq_dist_to(x[rows, cid], x, xsq)), 0.0)
            cands.append(cid)
            pots.append(d.sum(1))
        second = np.where(pots[1] < pots[0], cands[1], cands[0])
        centers = np.stack([c0, x[rows, second]], axis=1)
        labels_old = np.full((R, W), -1, dtype=np.int64)
        labels = labels_old.copy()
        active = np.ones(R, dtype=bool)
        strict = np.zeros(R, dtype=bool)
        for _ in range(MAX_ITER):
            a = np.flatnonzero(active)
            if a.size == 0:
                break
            lab = _assign(x[a], centers[a])
            new = _means(x[a], lab, valid[a], centers[a])
            shift = (np.sqrt((new - centers[a]) ** 2) ** 2).sum(1)
            labels[a] = lab
            centers[a] = new
            same = np.all((lab == labels_old[a]) | ~valid[a], axis=1)
            strict[a[same]] = True
            done = same | (shift <= tol[a])
            active[a[done]] = False
            labels_old[a] = lab
        loose = np.flatnonzero(~strict)
        if loose.size:
            labels[loose] = _assign(x[loose], centers[loose])
        resid = np.where(valid, (x - np.take_along_axis(centers, np.where(valid, labels, 0), 1)) ** 2, 0.0)
        inertia = np.cumsum(resid, axis=1)[:, -1]
        same_part = np.all(((labels == best_labels) | ~valid), axis=1) | np.all(((labels != best_labels) | ~valid), axis=1)
        better = (k == 0) | ((inertia < best_inertia) & ~same_part)
        best_inertia = np.where(better, inertia, best_inertia)
        best_labels = np.where(better[:, None], labels, best_labels)
        best_centers = np.where(better[:, None], centers, best_centers)
    return best_labels, best_centers + mean[:, None]


def prune_candidates_kmeans(x: np.ndarray, counts: np.ndarray, cc_cutoff: float, max_rounds: int) -> np.ndarray:
    """The reference loop (at most ``max_rounds`` rounds, keep the smaller-centre cluster when the centres
    differ by more than ``cc_cutoff``) with the emulated KMeans; returns a keep mask over ``x``.

    Lists are processed in buckets of similar length (padding to the longest list of a bucket only), so
    one huge candidate list does not blow up the memory of the whole batch.
    """
    x = np.asarray(x, dtype=np.float64)
    counts = np.asarray(counts, dtype=np.int64)
    keep = np.ones(x.shape[0], dtype=bool)
    if x.shape[0] == 0 or max_rounds <= 0:
        return keep
    starts = np.zeros(counts.shape[0], dtype=np.int64)
    np.cumsum(counts[:-1], out=starts[1:])
    width = 2
    while width // 2 < counts.max():
        rows = np.flatnonzero((counts <= width) & (counts > width // 2) & (counts >= 2))
        if rows.size:
            _prune_bucket(x, starts[rows], counts[rows], width, cc_cutoff, max_rounds, keep)
        width *= 2
    return keep


def _prune_bucket(x, starts, counts, W, cc_cutoff, max_rounds, keep) -> None:
    # members[r, j]: flat index of the j-th surviving candidate of list r (candidate order kept)
    members = starts[:, None] + np.arange(W)[None, :]
    n = counts.copy()
    todo = np.arange(counts.shape[0])
    for _ in range(max_rounds):
        if todo.size == 0:
            break
        m = members[todo]
        nn = n[todo]
        valid = np.arange(W)[None, :] < nn[:, None]
        vals = np.where(valid, x[np.where(valid, m, 0)], 0.0)
        labels, centers = kmeans2_rows(vals, nn)
        gap = np.abs(centers[:, 0] - centers[:, 1]) > cc_cutoff
        low = np.argmin(centers, axis=1)
        sub = valid & (~gap[:, None] | (labels == low[:, None]))
        n_sub = sub.sum(1)
        changed = n_sub < nn
        order = np.argsort(~sub, axis=1, kind="stable")  # survivors to the front, order kept
        members[todo] = np.take_along_axis(m, order, axis=1)
        n[todo] = n_sub
        todo = todo[changed & (n_sub >= 2)]
    dead = (np.arange(W)[None, :] >= n[:, None]) & (np.arange(W)[None, :] < counts[:, None])
    keep[members[dead]] = False
