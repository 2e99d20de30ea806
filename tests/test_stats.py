"""selfrepair.analysis.stats against independent computations (formulas written out, plain loops).

Tolerances: every compared quantity is a float64 sum of at most a few hundred terms of order 1, so two
correct computations agree to ~1e-13; 1e-10 leaves room for another CPU's summation order and still
fails on any real difference (the quantities themselves are of order 0.01-1).
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats as st

from selfrepair.analysis import stats as S

TOL = 1e-10
Z95 = 1.959963984540054          # the 97.5% normal quantile


def ref_pearson(x, y):
    x = np.asarray(x, float) - np.mean(x)
    y = np.asarray(y, float) - np.mean(y)
    return float((x * y).sum() / math.sqrt((x * x).sum() * (y * y).sum()))


def ref_spearman(x, y):
    """Pearson correlation of average ranks (ties share their mean rank), the formula attribution.py used."""
    return ref_pearson(pd.Series(x).rank(method="average").to_numpy(), pd.Series(y).rank(method="average").to_numpy())


@pytest.mark.parametrize("ties", [False, True])
def test_correlations_match_the_formulas(ties):
    rng = np.random.default_rng(1)
    for n in (3, 7, 40, 300):
        x = rng.normal(size=n)
        y = 0.5 * x + rng.normal(size=n)
        if ties:
            x, y = np.round(x * 2), np.round(y)
        assert S.spearman(x, y) == pytest.approx(ref_spearman(x, y), abs=TOL)
        assert S.pearson(x, y) == pytest.approx(ref_pearson(x, y), abs=TOL)


def test_correlations_drop_non_finite_pairs_and_degenerate_inputs_are_nan():
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=30), rng.normal(size=30)
    x[[3, 7]] = np.nan
    y[[7, 11]] = np.inf
    keep = np.isfinite(x) & np.isfinite(y)
    assert keep.sum() == 27
    assert S.spearman(x, y) == pytest.approx(ref_spearman(x[keep], y[keep]), abs=TOL)
    assert S.pearson(x, y) == pytest.approx(ref_pearson(x[keep], y[keep]), abs=TOL)
    assert math.isnan(S.spearman([1.0, 2.0], [2.0, 1.0]))                # fewer than 3 pairs
    assert math.isnan(S.pearson([1.0, 2.0, np.nan], [2.0, 1.0, 3.0]))
    assert math.isnan(S.spearman([1.0, 1.0, 1.0, 1.0], [1.0, 2.0, 3.0, 4.0]))   # constant input
    assert math.isnan(S.pearson([1.0, 2.0, 3.0, 4.0], [5.0, 5.0, 5.0, 5.0]))


def test_spearman_interval_equals_a_plain_bootstrap_loop():
    rng = np.random.default_rng(3)
    sizes = [1, 4, 2, 6, 3, 1, 5, 2, 3, 4]                       # unequal clusters
    cl = np.repeat(np.arange(len(sizes)) * 10 + 5, sizes)        # ids need not be 0..C-1
    N = len(cl)
    x = np.round(rng.normal(size=N) * 2)                         # ties inside a sample and by resampling
    y = np.round(x + rng.normal(size=N) * 2)
    x[4] = np.nan                                                # a dropped pair
    n_boot, seed = 300, 11
    rho, lo, hi = S.spearman_interval(x, y, cl, n_boot=n_boot, seed=seed, level=0.9)

    ok = np.isfinite(x) & np.isfinite(y)
    xs, ys, cs = x[ok], y[ok], cl[ok]
    ids = np.unique(cs)
    draws = np.random.default_rng(seed).integers(0, len(ids), size=(n_boot, len(ids)))
    boots = []
    for d in draws:                                              # one bootstrap sample at a time
        idx = np.concatenate([np.flatnonzero(cs == ids[j]) for j in d])
        bx, by = xs[idx], ys[idx]
        if len(idx) < 3 or np.ptp(bx) == 0 or np.ptp(by) == 0:
            continue
        boots.append(ref_spearman(bx, by))
    assert rho == pytest.approx(ref_spearman(xs, ys), abs=TOL)
    assert len(boots) > 250
    assert lo == pytest.approx(np.percentile(boots, 5.0), abs=TOL)
    assert hi == pytest.approx(np.percentile(boots, 95.0), abs=TOL)
    assert lo < rho < hi


def ref_wilson(p, n, z=Z95):
    centre = p + z * z / (2 * n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return (centre - half) / (1 + z * z / n), (centre + half) / (1 + z * z / n)


def test_wilson_interval_matches_the_formula_and_scipy():
    for k, n in [(0, 5), (1, 5), (3, 10), (7, 12), (50, 146), (146, 146)]:
        lo, hi = S.wilson_interval(k / n, n)
        rlo, rhi = ref_wilson(k / n, n)
        assert float(lo) == pytest.approx(rlo, abs=TOL) and float(hi) == pytest.approx(rhi, abs=TOL)
        ci = st.binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
        assert float(lo) == pytest.approx(ci.low, abs=TOL) and float(hi) == pytest.approx(ci.high, abs=TOL)
    lo, hi = S.wilson_interval(0.3, 17.5)                         # a fractional effective size
    assert (float(lo), float(hi)) == pytest.approx(ref_wilson(0.3, 17.5), abs=TOL)


def ref_design_effect(flags, clusters):
    """One-way ANOVA intra-cluster correlation written out with loops; deff = 1 + (sum m^2/N - 1) icc."""
    groups = {}
    for f, c in zip(flags, clusters):
        groups.setdefault(c, []).append(float(f))
    N, C = len(flags), len(groups)
    ybar = sum(flags) / N
    ssb = ssw = 0.0
    for ys in groups.values():
        mc = sum(ys) / len(ys)
        ssb += len(ys) * (mc - ybar) ** 2
        ssw += sum((y - mc) ** 2 for y in ys)
    msb, msw = ssb / (C - 1), ssw / (N - C)
    sum_m2 = sum(len(ys) ** 2 for ys in groups.values())
    m0 = (N - sum_m2 / N) / (C - 1)
    icc = (msb - msw) / (msb + (m0 - 1) * msw)
    return max(1.0, 1 + (sum_m2 / N - 1) * icc)


def test_design_effect_by_hand():
    # positively clustered flags: prompts mostly all-in or all-out
    clusters = [0, 0, 0, 1, 1, 1, 2, 2, 3, 3, 3, 3, 4, 4]
    flags = [1, 1, 1, 0, 0, 1, 1, 1, 0, 0, 0, 0, 1, 0]
    d = S.design_effect(flags, clusters)
    assert d == pytest.approx(ref_design_effect(flags, clusters), abs=TOL)
    assert d > 1.5
    # perfectly clustered, equal sizes m: icc = 1, deff = m
    assert S.design_effect([1, 1, 1, 0, 0, 0, 1, 1, 1], [0, 0, 0, 1, 1, 1, 2, 2, 2]) == pytest.approx(3.0, abs=TOL)
    # flags alternating inside every prompt: negative icc, clamped to 1
    assert S.design_effect([1, 0, 1, 0, 1, 0], [0, 0, 1, 1, 2, 2]) == 1.0
    # special cases stated in the docstring
    assert S.design_effect([1, 0, 1], [0, 1, 2]) == 1.0          # clusters of size 1
    assert S.design_effect([1, 1, 1, 1], [0, 0, 1, 1]) == 1.0    # flags that do not vary
    assert S.design_effect([1, 0, 1, 1], [7, 7, 7, 7]) == 4.0    # one cluster: one effective observation


def test_proportion_interval_uses_the_effective_size():
    clusters = [0, 0, 0, 1, 1, 1, 2, 2, 3, 3, 3, 3, 4, 4]
    flags = np.array([1, 1, 1, 0, 0, 1, 1, 1, 0, 0, 0, 0, 1, 0], float)
    flags_nan = np.concatenate([flags, [np.nan]])               # a row with undefined r: not counted
    share, lo, hi, n, n_eff = S.proportion_interval(flags_nan, clusters + [9])
    assert n == 14 and share == pytest.approx(7 / 14, abs=TOL)
    assert n_eff == pytest.approx(14 / ref_design_effect(flags, clusters), abs=TOL)
    assert (lo, hi) == pytest.approx(ref_wilson(0.5, n_eff), abs=TOL)


def test_proportion_interval_is_valid_at_one_and_zero():
    clusters = np.arange(146) // 2
    share, lo, hi, n, n_eff = S.proportion_interval(np.ones(146, bool), clusters)
    assert (share, hi, n) == (1.0, 1.0, 146)
    assert lo < 1.0
    assert lo == pytest.approx(n_eff / (n_eff + Z95 ** 2), abs=TOL)      # Wilson's lower bound at p = 1
    share, lo, hi, n, n_eff = S.proportion_interval(np.zeros(20), np.arange(20))
    assert (share, lo) == (0.0, 0.0) and hi == pytest.approx(Z95 ** 2 / (20 + Z95 ** 2), abs=TOL)
    assert math.isnan(S.proportion_interval([], [])[0])
    with pytest.raises(ValueError, match="0/1"):
        S.proportion_interval([0.5, 1.0], [0, 1])


def ref_bh(p, alpha):
    """Textbook step-up loop over the tested p values and the adjusted p = min_{j >= i} m p_(j) / j."""
    idx = [i for i, v in enumerate(p) if not math.isnan(v)]
    m = len(idx)
    order = sorted(idx, key=lambda i: p[i])
    last = 0
    for rank, i in enumerate(order, 1):
        if p[i] <= rank * alpha / m:
            last = rank
    reject = [False] * len(p)
    for i in order[:last]:
        reject[i] = True
    adj = [float("nan")] * len(p)
    running = 1.0
    for rank in range(m, 0, -1):
        i = order[rank - 1]
        running = min(running, m * p[i] / rank)
        adj[i] = running
    return np.array(reject), np.array(adj)


def test_benjamini_hochberg_matches_the_step_up_loop():
    rng = np.random.default_rng(4)
    p = np.concatenate([rng.uniform(0, 0.01, 12), rng.uniform(0, 1, 40), [np.nan] * 5])
    rng.shuffle(p)
    for alpha in (0.05, 0.2):
        rej, adj = S.benjamini_hochberg(p, alpha)
        rrej, radj = ref_bh(list(p), alpha)
        assert (rej == rrej).all()
        np.testing.assert_allclose(adj, radj, atol=TOL)
        assert 0 < rej.sum() < 52
    assert not S.benjamini_hochberg(p)[0][np.isnan(p)].any()


@pytest.mark.parametrize("alpha", [0.0, 1.0, -0.1, 2.0])
def test_bad_alpha_and_level_raise(alpha):
    with pytest.raises(ValueError, match="alpha"):
        S.benjamini_hochberg([0.1, 0.2], alpha=alpha)
    with pytest.raises(ValueError, match="level"):
        S.proportion_interval([1, 0], [0, 1], level=alpha)


def test_proportion_intervals_per_threshold_equal_one_share_at_a_time():
    rng = np.random.default_rng(5)
    clusters = rng.integers(0, 12, size=80)
    r = rng.normal(size=80) + 0.5 * (clusters % 3)             # prompt-level shifts: clustered flags
    r[rng.random(80) < 0.1] = np.nan                           # undefined ratios: not counted
    thresholds = np.array([-np.inf, -0.5, 0.0, 0.1, 0.5, 1.0, 2.0, np.inf])
    flags = np.where(np.isnan(r), np.nan, (r[None] > thresholds[:, None]).astype(float))
    o = S.proportion_intervals(flags, clusters)
    for t in range(len(thresholds)):
        keep = ~np.isnan(flags[t])
        f, c = flags[t][keep], clusters[keep]
        n = len(f)
        p = f.mean()
        deff = 1.0 if np.ptp(f) == 0 else ref_design_effect(f, c)
        lo, hi = ref_wilson(p, n / deff)
        assert o["n"][t] == n and o["share"][t] == pytest.approx(p, abs=TOL)
        assert o["n_eff"][t] == pytest.approx(n / deff, abs=TOL)
        assert (o["lo"][t], o["hi"][t]) == pytest.approx((lo, hi), abs=TOL)
    assert o["hi"][0] == 1.0 and o["lo"][-1] == 0.0             # the all-flagged and none-flagged shares
    assert (o["n_eff"][1:-1] < o["n"][1:-1]).any()               # the clustering counts somewhere
