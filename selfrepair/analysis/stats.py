"""Statistics used by the analyses, from ``scipy.stats`` (SPEC "Intervals").

- ``spearman``, ``pearson``: correlations of the pairs where both values are finite; NaN with
  fewer than 3 pairs or a constant input (no warning).
- ``spearman_interval``: Spearman's rho with a cluster-bootstrap percentile interval over
  prompts (clusters resampled with replacement), vectorised over the bootstrap draws.
- ``proportion_interval``: a share of 0/1 flags with the Wilson score interval on the
  sample size divided by the design effect of the prompt clusters (valid at 0 and 1,
  where a bootstrap collapses to [1, 1]); ``proportion_intervals`` for many shares at once
  (e.g. one per threshold); ``design_effect`` and ``wilson_interval`` are its two parts.
- ``benjamini_hochberg``: the Benjamini-Hochberg step-up procedure (NaN p values are not
  tested and do not count in m).
"""

from __future__ import annotations

from typing import Dict, Tuple

import numpy as np
from scipy import stats as _st

__all__ = ["spearman", "pearson", "spearman_interval", "proportion_interval", "proportion_intervals", "design_effect",
           "wilson_interval", "benjamini_hochberg"]

_MIN_PAIRS = 3


def _pairs(x, y) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    x = np.asarray(x, dtype=np.float64).ravel()
    y = np.asarray(y, dtype=np.float64).ravel()
    if x.shape != y.shape:
        raise ValueError(f"x and y must have the same length (got {len(x)} and {len(y)}).")
    ok = np.isfinite(x) & np.isfinite(y)
    return x[ok], y[ok], ok


def _usable(x: np.ndarray, y: np.ndarray) -> bool:
    return bool(len(x) >= _MIN_PAIRS and np.ptp(x) > 0 and np.ptp(y) > 0)


def _check_level(level: float) -> None:
    if not (0.0 < float(level) < 1.0):
        raise ValueError(f"level must lie strictly between 0 and 1 (got {level}); e.g. 0.95 for a 95% interval.")


def spearman(x, y) -> float:
    """Spearman's rank correlation (Pearson correlation of average ranks, ties share their mean rank)
    of the pairs where both values are finite; NaN with fewer than 3 pairs or a constant input."""
    x, y, _ = _pairs(x, y)
    if not _usable(x, y):
        return float("nan")
    return float(_st.spearmanr(x, y).statistic)


def pearson(x, y) -> float:
    """Pearson's correlation of the pairs where both values are finite; NaN with fewer than 3 pairs or a
    constant input."""
    x, y, _ = _pairs(x, y)
    if not _usable(x, y):
        return float("nan")
    return float(_st.pearsonr(x, y).statistic)


def _weighted_ranks(x: np.ndarray, w: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Average ranks of ``x`` in the samples where observation i appears ``w[b, i]`` times.

    Returns ranks [B, N] (the rank every copy of observation i gets in sample b) and the number of
    distinct values present in each sample [B].
    """
    u, inv = np.unique(x, return_inverse=True)
    order = np.argsort(inv, kind="stable")                      # observations grouped by value, ascending
    ends = np.cumsum(np.bincount(inv, minlength=len(u)))        # end (exclusive) of each value's run
    cs = np.cumsum(w[:, order], axis=1)                         # [B, N]
    upto = cs[:, ends - 1]                                      # copies with value <= u
    tot = np.diff(upto, axis=1, prepend=0.0)                    # copies with value == u
    rank_u = upto - tot + (tot + 1.0) / 2.0                     # average rank of the tied run
    return rank_u[:, inv], (tot > 0).sum(1)


def spearman_interval(x, y, clusters, *, n_boot: int = 2000, seed: int = 0,
                      level: float = 0.95) -> Tuple[float, float, float]:
    """Spearman's rho of the finite pairs with a cluster-bootstrap percentile interval.

    The clusters (e.g. prompt ids; ``np.unique`` order) of the finite pairs are resampled with
    replacement: draw ``b`` is row ``b`` of ``np.random.default_rng(seed).integers(0, C, (n_boot, C))``,
    and the sample is every pair of every drawn cluster, as often as the cluster was drawn. Its rho is
    the Pearson correlation of the sample's average ranks, computed for all draws at once from the
    multiplicities (no loop over draws). Draws with fewer than 3 pairs or a constant side are NaN
    and left out of the percentiles. Returns ``(rho, lo, hi)``; NaN bounds when rho is NaN.
    """
    _check_level(level)
    if int(n_boot) < 1:
        raise ValueError(f"n_boot must be at least 1 (got {n_boot}).")
    x, y, ok = _pairs(x, y)
    cl = np.asarray(clusters).ravel()
    if len(cl) != len(ok):
        raise ValueError(f"clusters must have one id per pair (got {len(cl)} for {len(ok)} pairs).")
    rho = spearman(x, y)
    if np.isnan(rho):
        return rho, float("nan"), float("nan")
    _, inv = np.unique(cl[ok], return_inverse=True)
    C, N = int(inv.max()) + 1, len(x)
    draws = np.random.default_rng(seed).integers(0, C, size=(int(n_boot), C))
    boots = np.empty(int(n_boot))
    step = max(1, 2 ** 20 // max(N, C))                         # ~10 arrays of [step, N] float64
    for s in range(0, int(n_boot), step):
        d = draws[s:s + step]
        B = len(d)
        counts = np.bincount((d + C * np.arange(B)[:, None]).ravel(), minlength=B * C).reshape(B, C)
        w = counts[:, inv].astype(np.float64)                   # [B, N] copies of each pair
        rx, kx = _weighted_ranks(x, w)
        ry, ky = _weighted_ranks(y, w)
        W = w.sum(1)
        dx = rx - (w * rx).sum(1, keepdims=True) / W[:, None]
        dy = ry - (w * ry).sum(1, keepdims=True) / W[:, None]
        with np.errstate(invalid="ignore", divide="ignore"):
            r = (w * dx * dy).sum(1) / np.sqrt((w * dx * dx).sum(1) * (w * dy * dy).sum(1))
        boots[s:s + B] = np.where((W >= _MIN_PAIRS) & (kx > 1) & (ky > 1), np.clip(r, -1.0, 1.0), np.nan)
    if np.isnan(boots).all():
        return rho, float("nan"), float("nan")
    lo, hi = np.nanpercentile(boots, [50.0 * (1.0 - level), 50.0 * (1.0 + level)])
    return rho, float(lo), float(hi)


def _design_effects(y: np.ndarray, valid: np.ndarray, inv: np.ndarray, C: int) -> np.ndarray:
    """Design effects of the rows of ``y`` [T, N] (0/1 where ``valid``), clusters ``inv`` in 0..C-1."""
    H = np.zeros((len(inv), C))
    H[np.arange(len(inv)), inv] = 1.0
    yv = np.where(valid, y, 0.0)
    m_c = valid.astype(np.float64) @ H                           # [T, C] cluster sizes
    s_c = yv @ H                                                 # flags per cluster
    N = m_c.sum(1)
    n_cl = (m_c > 0).sum(1)
    sum_m2 = (m_c ** 2).sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        ybar_c = np.where(m_c > 0, s_c / np.where(m_c > 0, m_c, 1.0), 0.0)
        ybar = s_c.sum(1) / N
        ssb = (m_c * (ybar_c - ybar[:, None]) ** 2).sum(1)
        ssw = (s_c * (1.0 - ybar_c)).sum(1)                       # sum (y - ybar_c)^2 for 0/1 flags
        msb = ssb / (n_cl - 1)
        msw = ssw / (N - n_cl)
        m0 = (N - sum_m2 / N) / (n_cl - 1)
        icc = (msb - msw) / (msb + (m0 - 1.0) * msw)
        deff = np.maximum(1.0, 1.0 + (sum_m2 / N - 1.0) * icc)
    deff = np.where((ssb + ssw) == 0.0, 1.0, deff)               # flags that do not vary
    deff = np.where(n_cl == N, 1.0, deff)                        # clusters of size 1
    deff = np.where(n_cl == 1, N, deff)                          # one cluster: one effective observation
    return np.where(N > 0, deff, np.nan)


def _clusters(flags, clusters):
    f = np.asarray(flags, dtype=np.float64)
    cl = np.asarray(clusters).ravel()
    if f.shape[-1] != len(cl):
        raise ValueError(f"clusters must have one id per flag (got {len(cl)} for {f.shape[-1]} flags).")
    valid = ~np.isnan(f)
    if not np.isin(f[valid], (0.0, 1.0)).all():
        raise ValueError("flags must be 0/1 (or True/False; NaN for rows not counted).")
    _, inv = np.unique(cl, return_inverse=True)
    return f, valid, inv.ravel(), int(inv.max()) + 1 if len(inv) else 0


def design_effect(flags, clusters) -> float:
    """Design effect of a share of 0/1 flags (NaN entries not counted) sampled in clusters (prompts), >= 1.

    ``deff = 1 + (m - 1) * icc`` with ``m = sum_c m_c^2 / N`` (the size-weighted mean cluster size;
    the common size when all are equal) and ``icc`` the one-way ANOVA estimator of the intra-cluster
    correlation: ``(MSB - MSW) / (MSB + (m0 - 1) MSW)``, ``MSB = sum_c m_c (ybar_c - ybar)^2 / (C - 1)``,
    ``MSW = sum (y - ybar_c)^2 / (N - C)``, ``m0 = (N - sum_c m_c^2 / N) / (C - 1)``; clamped to
    ``deff >= 1``. Special cases: every cluster of size 1 -> 1; flags that do not vary -> 1 (no
    variance to attribute to clusters; the estimator's limit when one flag flips); a single cluster
    holding N > 1 flags -> N (no replication across clusters: one effective observation); no flags -> NaN.
    """
    f, valid, inv, C = _clusters(np.asarray(flags, dtype=np.float64).ravel(), clusters)
    if C == 0:
        return float("nan")
    return float(_design_effects(f[None], valid[None], inv, C)[0])


def wilson_interval(share, n, *, level: float = 0.95) -> Tuple[np.ndarray, np.ndarray]:
    """Wilson score interval of a proportion ``share`` observed on ``n`` (may be fractional: an
    effective sample size) trials; arrays broadcast. Exactly [lo, 1] at share 1 and [0, hi] at share 0;
    NaN where n <= 0 or share is NaN."""
    _check_level(level)
    p = np.asarray(share, dtype=np.float64)
    n = np.asarray(n, dtype=np.float64)
    z = float(_st.norm.ppf(0.5 + level / 2.0))
    with np.errstate(invalid="ignore", divide="ignore"):
        den = 1.0 + z * z / n
        centre = p + z * z / (2.0 * n)
        half = z * np.sqrt(p * (1.0 - p) / n + z * z / (4.0 * n * n))
        lo = np.clip((centre - half) / den, 0.0, 1.0)
        hi = np.clip((centre + half) / den, 0.0, 1.0)
    lo = np.where(p == 0.0, 0.0, lo)
    hi = np.where(p == 1.0, 1.0, hi)
    bad = ~(n > 0) | np.isnan(p)
    return np.where(bad, np.nan, lo), np.where(bad, np.nan, hi)


def proportion_intervals(flags, clusters, *, level: float = 0.95) -> Dict[str, np.ndarray]:
    """``proportion_interval`` for many shares over the same rows at once (e.g. one per threshold):
    ``flags`` [T, N] (NaN = not counted in that share), ``clusters`` [N]. Returns arrays [T] ``share``,
    ``lo``, ``hi``, ``n``, ``n_eff``."""
    _check_level(level)
    f, valid, inv, C = _clusters(np.atleast_2d(np.asarray(flags, dtype=np.float64)), clusters)
    n = valid.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        share = np.where(valid, f, 0.0).sum(1) / n
    deff = _design_effects(f, valid, inv, C) if C else np.full(len(f), np.nan)
    n_eff = np.where(n > 0, n / deff, 0.0)
    lo, hi = wilson_interval(share, n_eff, level=level)
    return {"share": share, "lo": lo, "hi": hi, "n": n, "n_eff": n_eff}


def proportion_interval(flags, clusters, *, level: float = 0.95) -> Tuple[float, float, float, int, float]:
    """Share of 0/1 ``flags`` (NaN entries are not counted) with an interval valid at 0 and 1.

    Method: the Wilson score interval (``wilson_interval``) with the sample size ``n`` replaced by the
    effective size ``n_eff = n / deff``, ``deff`` the design effect of the ``clusters`` (``design_effect``:
    ANOVA intra-cluster correlation, at least 1). Returns ``(share, lo, hi, n, n_eff)``; all flagged
    gives ``hi = 1`` and ``lo < 1``; an empty sample gives NaN with n = 0.
    """
    o = proportion_intervals(np.asarray(flags, dtype=np.float64).ravel()[None], clusters, level=level)
    return (float(o["share"][0]), float(o["lo"][0]), float(o["hi"][0]), int(o["n"][0]), float(o["n_eff"][0]))


def benjamini_hochberg(p, alpha: float = 0.05) -> Tuple[np.ndarray, np.ndarray]:
    """Benjamini-Hochberg false-discovery-rate control at ``alpha`` over the non-NaN p values.

    Returns ``(reject, p_adjusted)`` shaped like ``p``: ``p_adjusted`` from
    ``scipy.stats.false_discovery_control(method="bh")`` (NaN where p is NaN), ``reject = p_adjusted <= alpha``
    (False where p is NaN), which is the step-up rule "reject the i smallest p, i the largest with
    p_(i) <= i alpha / m".
    """
    if not (0.0 < float(alpha) < 1.0):
        raise ValueError(f"alpha must lie strictly between 0 and 1 (got {alpha}); e.g. 0.05.")
    p = np.asarray(p, dtype=np.float64)
    tested = ~np.isnan(p)
    if ((p[tested] < 0) | (p[tested] > 1)).any():
        raise ValueError("p values must lie in [0, 1] (NaN for untested rows).")
    adj = np.full(p.shape, np.nan)
    if tested.any():
        adj[tested] = _st.false_discovery_control(p[tested], method="bh")
    reject = np.zeros(p.shape, dtype=bool)
    reject[tested] = adj[tested] <= alpha
    return reject, adj
