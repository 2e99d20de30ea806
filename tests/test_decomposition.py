"""selfrepair.analysis.decomposition against independent computations: every ablation re-run as a plain
numpy softmax of one row at a time, explicit permutation loops, scipy's connected components.

Tolerances: ratios of float64 local effects of order 0.01-1 built from ~20 terms agree to ~1e-13
between two correct computations; 1e-9 (relative) leaves room for another CPU's summation order while
any real difference (a wrong key, mean or floor) is of order 1e-3 or larger.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from scipy.sparse.csgraph import connected_components

from selfrepair.analysis import decomposition as D

RTOL = 1e-9


# ----------------------------------------------------------------------------- the reference (one row, numpy)


def softmax(a, mask):
    e = np.where(mask, np.exp(np.where(mask, a, -np.inf) - np.max(a[mask])), 0.0)
    return e / e.sum()


def ablated(a, mask, S, mean_mask, ablation):
    """Pattern row after a score ablation of the keys S (SPEC "Local effects")."""
    a2 = a.copy()
    m2 = mask.copy()
    if ablation == "mean":
        a2[list(S)] = a[mean_mask].mean()
    else:
        m2[list(S)] = False
    return softmax(a2, m2)


def effect(a, mask, c, S, mean_mask, ablation):
    p = softmax(a, mask)
    return float(((p - ablated(a, mask, S, mean_mask, ablation)) * np.where(mask, c, 0.0)).sum())


def ref_r(a, mask, c, keys, mean_mask, ablation, min_effect=1e-4):
    p = softmax(a, mask)
    E = [effect(a, mask, c, [j], mean_mask, ablation) for j in keys]
    ES = effect(a, mask, c, list(keys), mean_mask, ablation)
    floor = max(min_effect, 0.01 * sum(abs(p[j] * c[j]) for j in keys))
    return (ES - sum(E)) / ES if abs(ES) >= floor else float("nan")


def random_rows(R, n, k, seed, *, pad=True, exclude_bos=False):
    g = np.random.default_rng(seed)
    a = g.normal(size=(R, n)) * 1.5
    c = g.normal(size=(R, n)) * 2.0
    mask = np.ones((R, n), bool)
    keys = np.zeros((R, k), int)
    for r in range(R):
        L = g.integers(k + 2, n + 1) if pad else n
        mask[r, L:] = False
        keys[r] = g.choice(np.arange(1, L), size=k, replace=False)
        a[r, L:] = 1e9                                   # masked entries hold anything
    mean_mask = mask.copy()
    if exclude_bos:
        mean_mask[:, 0] = False
    return a, mask, c, keys, mean_mask


def T(*xs):
    return [torch.as_tensor(x) for x in xs]


def close(x, ref):
    x, ref = np.asarray(x, float), np.asarray(ref, float)
    assert (np.isnan(x) == np.isnan(ref)).all(), (x, ref)
    ok = ~np.isnan(ref)
    np.testing.assert_allclose(x[ok], ref[ok], rtol=RTOL, atol=RTOL * np.abs(ref[ok]).max(initial=1.0))


# ----------------------------------------------------------------------------- mass_interaction


def equal_pair_rows(R, n, seed):
    """Two keys of equal score, every other key one common score (the case where r ignores c)."""
    g = np.random.default_rng(seed)
    a = np.repeat(g.normal(size=(R, 1)), n, 1)
    keys = np.stack([g.choice(np.arange(n), size=2, replace=False) for _ in range(R)])
    s = a[:, 0] + 1.0 + 2.0 * g.random(R)
    for r in range(R):
        a[r, keys[r]] = s[r]
    return a, np.ones((R, n), bool), keys


@pytest.mark.parametrize("ablation", ["mean", "knockout"])
def test_mass_interaction_equals_r_whatever_the_contributions(ablation):
    a, mask, keys = equal_pair_rows(6, 9, seed=0)
    mm = mask.copy()
    mass = D.mass_interaction(*T(a, mask, keys, mm), score_ablation=ablation).numpy()
    g = np.random.default_rng(1)
    for trial in range(5):
        c = g.normal(size=a.shape) * 3.0
        c[np.arange(6)[:, None], keys] += 4.0                 # keep E_S above the floor
        r = [ref_r(a[i], mask[i], c[i], keys[i], mm[i], ablation) for i in range(6)]
        close(mass, r)
        # the permutation test sees every r_b tie with r: p = 1
        pp = D.permutation_p(*T(a, mask, c, keys, mm), score_ablation=ablation, n_permutations=20, seed=trial)
        close(pp["permutation_p"], np.ones(6))


@pytest.mark.parametrize("ablation,k,exclude_bos", [("mean", 2, False), ("mean", 3, True), ("knockout", 2, True)])
def test_mass_interaction_by_a_plain_softmax_loop(ablation, k, exclude_bos):
    a, mask, c, keys, mm = random_rows(12, 10, k, seed=k, exclude_bos=exclude_bos)
    got = D.mass_interaction(*T(a, mask, keys, mm), score_ablation=ablation).numpy()
    ref = []
    for i in range(len(a)):
        one_s = np.zeros(a.shape[1])
        one_s[keys[i]] = 1.0
        ref.append(ref_r(a[i], mask[i], one_s, keys[i], mm[i], ablation))   # floor: 0.01 sum_S p_j
    close(got, ref)
    assert np.isfinite(ref).sum() >= 10


def test_mass_interaction_floor_is_in_mass_units():
    # knocking out keys that hold almost no mass: E_mass(S) = sum_S p_j ~ 2e-7 is under min_effect = 1e-4
    a = np.array([[5.0, 5.0, -10.0, -10.0, 5.0]])
    mask = np.ones_like(a, bool)
    args = T(a, mask, np.array([[2, 3]]), mask)
    assert np.isnan(D.mass_interaction(*args, score_ablation="knockout").numpy()).all()
    assert np.isfinite(D.mass_interaction(*args, score_ablation="knockout", min_effect=1e-12).numpy()).all()


# ----------------------------------------------------------------------------- key_changes


@pytest.mark.parametrize("ablation,k,exclude_bos", [("mean", 2, False), ("mean", 3, True), ("knockout", 3, False)])
def test_key_changes_against_explicit_softmaxes(ablation, k, exclude_bos):
    """The closed-form kernel's p_i - p'_i at the keys of S (log space) against plain numpy softmaxes of the
    individual and joint ablations; its effects against sum_j (p_j - p'_j) c_j over the whole row."""
    a, mask, c, keys, mm = random_rows(25, 11, k, seed=40 + k, exclude_bos=exclude_bos)
    ch = D.key_changes(*T(a, mask, keys, mm), score_ablation=ablation, c=torch.as_tensor(c))
    assert ch.at_keys.shape == (25, k + 1, k)
    for i in range(len(a)):
        p = softmax(a[i], mask[i])
        sets = [[j] for j in keys[i]] + [list(keys[i])]
        for t, S in enumerate(sets):
            ref = (p - ablated(a[i], mask[i], S, mm[i], ablation))[keys[i]]
            np.testing.assert_allclose(ch.at_keys[i, t].numpy(), ref, rtol=0, atol=1e-13)   # weights <= 1
        np.testing.assert_allclose(ch.p_keys[i].numpy(), p[keys[i]], rtol=0, atol=1e-15)
        close(ch.effects[i].numpy(), [effect(a[i], mask[i], c[i], [j], mm[i], ablation) for j in keys[i]])


# ----------------------------------------------------------------------------- concealment


@pytest.mark.parametrize("ablation,k,exclude_bos", [("mean", 2, False), ("mean", 3, True), ("knockout", 2, False)])
def test_concealment_against_rerunning_the_individual_ablation(ablation, k, exclude_bos):
    a, mask, c, keys, mm = random_rows(10, 9, k, seed=10 + k, exclude_bos=exclude_bos)
    out = {key: v.numpy() for key, v in D.concealment(*T(a, mask, c, keys, mm), score_ablation=ablation).items()}
    for i in range(len(a)):
        p = softmax(a[i], mask[i])
        rest = mask[i].copy()
        rest[keys[i]] = False
        if exclude_bos:
            rest[0] = False
        c_rest = (p[rest] * c[i][rest]).sum() / p[rest].sum()
        E0, E, conc = [], [], []
        for t, j in enumerate(keys[i]):
            c0 = c[i].copy()
            c0[[x for x in keys[i] if x != j]] = c_rest       # the other keys of S carry c_rest
            E0.append(effect(a[i], mask[i], c0, [j], mm[i], ablation))
            E.append(effect(a[i], mask[i], c[i], [j], mm[i], ablation))
            p_j = ablated(a[i], mask[i], [j], mm[i], ablation)
            conc.append(sum((p_j[x] - p[x]) * (c[i][x] - c_rest) for x in keys[i] if x != j))
        assert out["c_rest"][i] == pytest.approx(c_rest, rel=RTOL)
        close(out["E0"][i], E0)
        close(out["effects"][i], E)
        close(out["concealment"][i], np.array(E0) - np.array(E))
        close(out["concealment"][i], conc)                    # SPEC's closed form, from the explicit patterns
        floor = max(1e-4, 0.01 * sum(abs(p[j] * c[i][j]) for j in keys[i]))
        share = sum(conc) / sum(E0) if abs(sum(E0)) >= floor else float("nan")
        close([out["concealment_share"][i]], [share])


def test_concealment_is_zero_when_the_keys_carry_what_the_rest_carries():
    a, mask, c, keys, mm = random_rows(5, 8, 2, seed=3, pad=False)
    for i in range(5):
        p = softmax(a[i], mask[i])
        rest = np.ones(8, bool)
        rest[keys[i]] = False
        c[i, keys[i]] = (p[rest] * c[i, rest]).sum() / p[rest].sum()
    out = D.concealment(*T(a, mask, c, keys, mm))
    assert out["concealment"].abs().max() < 1e-12


# ----------------------------------------------------------------------------- permutation_p


@pytest.mark.parametrize("ablation,exclude_bos", [("mean", True), ("knockout", False)])
def test_permutation_p_against_a_loop_over_the_explicit_permutations(ablation, exclude_bos):
    R, n, k, B, seed = 7, 8, 2, 40, 5
    a, mask, c, keys, mm = random_rows(R, n, k, seed=20, exclude_bos=exclude_bos)
    c[np.arange(R)[:, None], keys] = np.abs(c[np.arange(R)[:, None], keys]) + 1.0
    out = D.permutation_p(*T(a, mask, c, keys, mm), score_ablation=ablation, n_permutations=B, seed=seed,
                          exclude_bos=exclude_bos)
    u = torch.rand(R, B, n, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)).numpy()
    ref_p = []
    for i in range(R):
        r = ref_r(a[i], mask[i], c[i], keys[i], mm[i], ablation)
        slots = [j for j in range(n) if mask[i, j] and not (exclude_bos and j == 0)]
        ge = n_def = 0
        for b in range(B):
            order = sorted(range(len(slots)), key=lambda t: (u[i, b, slots[t]], t))
            cb = c[i].copy()
            for t, src in enumerate(order):
                cb[slots[t]] = c[i, slots[src]]
            if exclude_bos:
                assert cb[0] == c[i, 0]
            rb = ref_r(a[i], mask[i], cb, keys[i], mm[i], ablation)
            if not math.isnan(rb):
                n_def += 1
                ge += rb >= r - D.TIE_RTOL * max(1.0, abs(r))
        ref_p.append((1 + ge) / (1 + n_def) if not math.isnan(r) else float("nan"))
    close(out["permutation_p"], ref_p)
    assert len(set(np.round(ref_p, 6))) > 3                   # the rows differ: not a constant
    # chunking the rows draws the same numbers
    again = D.permutation_p(*T(a, mask, c, keys, mm), score_ablation=ablation, n_permutations=B, seed=seed,
                            exclude_bos=exclude_bos, chunk_rows=2)
    torch.testing.assert_close(again["permutation_p"], out["permutation_p"], rtol=0, atol=0, equal_nan=True)


def test_permutation_p_is_nan_where_r_is_nan():
    a, mask, c, keys, mm = random_rows(4, 6, 2, seed=1, pad=False)
    c[0] = 0.0                                                # E_S = 0: under the floor
    out = D.permutation_p(*T(a, mask, c, keys, mm), n_permutations=5)
    assert math.isnan(out["interaction"][0]) and math.isnan(out["permutation_p"][0])
    assert not torch.isnan(out["permutation_p"][1:]).any()


# ----------------------------------------------------------------------------- c_ratio, similarities, sizes


def test_c_ratio_by_hand():
    c = torch.tensor([[2.0, 1.0, 1.0], [1.0, -4.0, 2.0], [0.0, 3.0, 1.0], [3.0, 3.0, 3.0],
                      [-2.0, -1.0, -4.0], [0.0, 0.0, 0.0], [0.0, -2.0, 1.0]])
    got = D.c_ratio(c).numpy()
    want = [0.5, -0.25, 0.0, 1.0, 0.25, float("nan"), 0.0]
    close(got, want)


def test_value_similarity_out_against_v_times_W_O():
    g = np.random.default_rng(7)
    R, k, d_head, d_model = 5, 3, 4, 6
    v = g.normal(size=(R, k, d_head))
    W = g.normal(size=(d_head, d_model))
    ref = []
    for r in range(R):
        o = [sum(v[r, j, e] * W[e] for e in range(d_head)) for j in range(k)]
        cos = [float(o[i] @ o[j] / math.sqrt((o[i] @ o[i]) * (o[j] @ o[j])))
               for i, j in itertools.combinations(range(k), 2)]
        ref.append(sum(cos) / len(cos))
    close(D.value_similarity_out(torch.tensor(v), torch.tensor(W)[None]).numpy(), ref)
    Wr = g.normal(size=(R, d_head, d_model))                  # one W_O^h per row (rows of different heads)
    ref_r_ = []
    for r in range(R):
        o = v[r] @ Wr[r]
        o = o / np.linalg.norm(o, axis=1, keepdims=True)
        ref_r_.append(np.mean([o[i] @ o[j] for i, j in itertools.combinations(range(k), 2)]))
    close(D.value_similarity_out(torch.tensor(v), torch.tensor(Wr)).numpy(), ref_r_)


def test_n_contributing_counts_the_selection_rule():
    w = torch.tensor([[2.0, 1.5, 0.5, -3.0, 1.0], [5.0, -5.0, 0.0, 2.0, 9.0]])
    mask = torch.tensor([[True, True, True, True, True], [True, True, True, True, False]])
    assert D.n_contributing(w, mask).tolist() == [2, 2]
    assert D.n_contributing(w, mask, exclude_bos=True).tolist() == [1, 1]
    assert D.n_contributing(w, mask, select="abs").tolist() == [3, 3]
    assert D.n_contributing(w, mask, min_contribution=0.2, select="abs", exclude_bos=True).tolist() == [4, 2]


def test_n_clusters_on_a_planted_row_and_against_scipy():
    g = np.random.default_rng(8)
    d = 16
    u1, u2 = g.normal(size=d), g.normal(size=d)
    u2 -= (u2 @ u1) / (u1 @ u1) * u1                         # orthogonal directions
    vec = np.stack([u1 + 0.05 * g.normal(size=d) for _ in range(3)] + [u2 + 0.05 * g.normal(size=d) for _ in range(2)]
                   + [g.normal(size=d)])
    members = np.array([True] * 5 + [False])
    got = D.n_clusters(torch.tensor(members[None]), vectors=torch.tensor(vec[None]))
    assert got.tolist() == [2]
    # a chain a-b-c with a, c dissimilar: single linkage joins it into one
    sim = np.array([[1.0, 0.9, 0.1], [0.9, 1.0, 0.85], [0.1, 0.85, 1.0]])
    assert D.n_clusters(torch.ones(1, 3, dtype=torch.bool), similarity=torch.tensor(sim[None])).tolist() == [1]
    assert D.n_clusters(torch.ones(1, 3, dtype=torch.bool), similarity=torch.tensor(sim[None]),
                        cluster_similarity=0.95).tolist() == [3]
    # random rows against scipy's connected components
    R, n = 30, 9
    V = g.normal(size=(R, n, 3))
    M = g.random((R, n)) < 0.7
    got = D.n_clusters(torch.tensor(M), vectors=torch.tensor(V), cluster_similarity=0.5).tolist()
    for r in range(R):
        idx = np.flatnonzero(M[r])
        o = V[r, idx] / np.linalg.norm(V[r, idx], axis=1, keepdims=True)
        ref = connected_components(o @ o.T >= 0.5, directed=False)[0] if len(idx) else 0
        assert got[r] == ref
    assert len(set(got)) > 2


# ----------------------------------------------------------------------------- bad input


def test_bad_input_raises_one_clear_error():
    a, mask, c, keys, mm = T(*random_rows(2, 5, 2, seed=0)[:5])
    with pytest.raises(ValueError, match="n_permutations"):
        D.permutation_p(a, mask, c, keys, mm, n_permutations=0)
    for bad in (1.5, -1.01):
        with pytest.raises(ValueError, match="cluster_similarity"):
            D.n_clusters(torch.ones(1, 2, dtype=torch.bool), vectors=torch.ones(1, 2, 3), cluster_similarity=bad)
    with pytest.raises(ValueError, match="ablation"):
        D.mass_interaction(a, mask, keys, mm, score_ablation="zero")
    with pytest.raises(ValueError, match="select"):
        D.n_contributing(c, mask, select="negative")
