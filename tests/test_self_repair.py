"""The self-repair engine (selfrepair.analysis.self_repair) against independent computations.

- hand-built rows with hand-computed numbers (float64, 1e-12): the equal-score pair, value
  ablations, low-mass keys, knockout, Shapley against a brute-force permutation average;
- a planted GPT-2 (weights set by hand: head 0 copies from every occurrence of a marker token),
  end to end through a real HF bridge;
- local effects against brute-force hook re-runs (ablated pattern row at hook_pattern, change of
  g . z_i at hook_z), global effects against one forward per ablation, gradient estimates against
  autograd at hook_attn_scores, on HF GPT-2, HF Llama (GQA) and the shipped model;
- the native bridge's log-p score path against scores computed from hook_q and hook_k;
- batching invariance, resume after an interruption, the Parquet round trip, bad arguments.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pandas as pd
import pytest
import torch

import selfrepair.analysis.results as SR
import selfrepair.analysis.self_repair as SR_driver
from selfrepair.analysis import (SelfRepairResult, analyze_self_repair, interaction_ratio, local_effects,
                                    select_keys)
from selfrepair.tasks import Task

from conftest import make_native_bridge, ratio_tol, scaled_atol

F64 = torch.float64


# =========================================================================== hand-built rows


def _row(scores, cs, d=3, seed=0):
    """One row whose values give c_j = cs[j] exactly for g = (1, 0, ..., 0) (other coordinates random)."""
    gen = torch.Generator().manual_seed(seed)
    n = len(scores)
    v = torch.randn(n, d, generator=gen, dtype=F64)
    v[:, 0] = torch.tensor(cs, dtype=F64)
    g = torch.zeros(d, dtype=F64)
    g[0] = 1.0
    return torch.tensor(scores, dtype=F64), v, g


def test_equal_score_pair_hand_computed():
    """Keys 2 and 4 with score ln 8 carry the metric (c = 1); four background keys (score 0, c = 0).

    Z = 4 + 16 = 20, p = 0.4 each, g . z = 0.8, mean score ln8/3 (e^mean = 2).
    Mean ablation: one key -> Z' = 14, g.z' = 10/14: E_n = 0.8 - 5/7 = 3/35; both -> Z'' = 8, g.z'' = 1/2:
    E_S = 0.3; r = (0.3 - 6/35)/0.3 = 3/7; sym = 9/33. Knockout: E_n = 0.8 - 8/12 = 2/15, E_S = 0.8, r = 2/3.
    """
    L8 = math.log(8.0)
    a, v, g = _row([0, 0, L8, 0, L8, 0], [0, 0, 1, 0, 1, 0])
    mask = torch.ones(6, dtype=torch.bool)
    keys = torch.tensor([2, 4])
    o = local_effects(a, v, g, mask, keys)
    tol = dict(abs=1e-12, rel=0)
    assert o["effects"][0].tolist() == pytest.approx([3 / 35, 3 / 35], **tol)
    assert o["effect_joint"].item() == pytest.approx(0.3, **tol)
    assert o["effects"].sum().item() < o["effect_joint"].item()           # individual effects below the joint
    r, r_sym = interaction_ratio(o["effects"], o["effect_joint"], o["contributions"])
    assert r.item() == pytest.approx(3 / 7, **tol) and r.item() > 0.1
    assert r_sym.item() == pytest.approx(9 / 33, **tol)
    assert o["contributions"][0].tolist() == pytest.approx([0.4, 0.4], **tol)
    assert o["shapley"][0].tolist() == pytest.approx([0.15, 0.15], **tol)   # symmetric: E_S / 2 each
    # value ablations: zero -> w_j; mean (mean c = 1/3) -> p_j (c_j - 1/3) = 4/15; no interaction
    assert o["value_effects"][0].tolist() == pytest.approx([0.4, 0.4], **tol)
    assert o["value_effect_joint"].item() == pytest.approx(0.8, **tol)
    om = local_effects(a, v, g, mask, keys, value_ablation="mean")
    assert om["value_effects"][0].tolist() == pytest.approx([4 / 15, 4 / 15], **tol)
    assert om["value_effect_joint"].item() == pytest.approx(8 / 15, **tol)
    # plain gradient: dm/da_j = p_j (c_j - g.z) = 0.08, a'_j - a_j = -2 ln8/3  ->  2 * 0.08 * 2 ln8 / 3
    assert o["grad_estimate"].item() == pytest.approx(2 * 0.08 * 2 * L8 / 3, **tol)
    # TSG, T = 2: s = (sqrt8 for the keys, 1 else) / (4 + 2 sqrt8); d_j = s_j (1 - 2 s_j)
    s = math.sqrt(8) / (4 + 2 * math.sqrt(8))
    assert o["tsg_estimate"].item() == pytest.approx(2 * s * (1 - 2 * s) * 2 * L8 / 3, **tol)
    ok = local_effects(a, v, g, mask, keys, score_ablation="knockout")
    assert ok["effects"][0].tolist() == pytest.approx([2 / 15, 2 / 15], **tol)
    assert ok["effect_joint"].item() == pytest.approx(0.8, **tol)
    rk, _ = interaction_ratio(ok["effects"], ok["effect_joint"], ok["contributions"])
    assert rk.item() == pytest.approx(2 / 3, **tol)
    assert math.isnan(ok["grad_estimate"].item()) and math.isnan(ok["tsg_estimate"].item())


def test_exclude_bos_drops_key0_from_means():
    """BOS (key 0) with a big score: exclude_bos changes the mean score and the mean value."""
    a, v, g = _row([4.0, 0.0, 1.0, 0.0, 1.0], [5.0, 0.0, 1.0, 0.0, 1.0])
    mask = torch.ones(5, dtype=torch.bool)
    keys = torch.tensor([2, 4])
    for eb, mean_a, mean_c in ((False, 6 / 5, 7 / 5), (True, 2 / 4, 2 / 4)):
        o = local_effects(a, v, g, mask, keys, exclude_bos=eb, value_ablation="mean")
        ex = torch.tensor([4.0, 0.0, mean_a, 0.0, mean_a], dtype=F64)             # joint ablation row
        p, p2 = torch.softmax(a, 0), torch.softmax(ex, 0)
        c = torch.tensor([5.0, 0.0, 1.0, 0.0, 1.0], dtype=F64)
        assert o["effect_joint"].item() == pytest.approx(float(((p - p2) * c).sum()), abs=1e-13)
        assert o["value_effects"][0].tolist() == pytest.approx([float(p[2] * (1 - mean_c))] * 2, abs=1e-13)


def test_value_ablation_interaction_is_zero_and_matches_brute_force():
    gen = torch.Generator().manual_seed(1)
    R, n, d, k = 6, 9, 5, 3
    a = 2 * torch.randn(R, n, generator=gen, dtype=F64)
    v = torch.randn(R, n, d, generator=gen, dtype=F64)
    g = torch.randn(R, d, generator=gen, dtype=F64)
    mask = torch.ones(R, n, dtype=torch.bool)
    mask[0, 6:] = False
    keys = torch.tensor([[1, 3, 5]] * R)
    for mode in ("zero", "mean"):
        o = local_effects(a, v, g, mask, keys, value_ablation=mode)
        assert o["value_interaction"].abs().max() < 1e-14
        for r in range(R):
            p = torch.softmax(a[r].masked_fill(~mask[r], -math.inf), 0)
            vbar = v[r][mask[r]].mean(0) if mode == "mean" else torch.zeros(d, dtype=F64)
            z = p @ v[r]
            for sub in [[0], [1], [2], [0, 1, 2]]:
                v2 = v[r].clone()
                for i in sub:
                    v2[keys[r, i]] = vbar
                e = float(g[r] @ (z - p @ v2))
                got = o["value_effects"][r, sub[0]] if len(sub) == 1 else o["value_effect_joint"][r]
                assert got.item() == pytest.approx(e, abs=1e-13)


def test_two_low_mass_keys_give_r_of_the_order_of_their_mass():
    """Two keys of score 1 among 98 of score 0: mass ~0.05, r ~0.017 (hand arithmetic), far below 0.1."""
    n = 100
    scores = [0.0] * n
    cs = [0.0] * n
    for j in (40, 70):
        scores[j], cs[j] = 1.0, 1.0
    a, v, g = _row(scores, cs)
    o = local_effects(a, v, g, torch.ones(n, dtype=torch.bool), torch.tensor([40, 70]))
    e, m = math.e, math.exp(2 / n)                 # exp(mean score) = exp(2/100)
    Z = 2 * e + 98
    base = 2 * e / Z
    E1 = base - (e + m) / (Z - e + m)
    ES = base - 2 * m / (98 + 2 * m)
    r_hand = (ES - 2 * E1) / ES
    assert o["effects"][0].tolist() == pytest.approx([E1, E1], abs=1e-13)
    assert o["effect_joint"].item() == pytest.approx(ES, abs=1e-13)
    r, _ = interaction_ratio(o["effects"], o["effect_joint"], o["contributions"])
    mass = o["mass"].item()
    assert r.item() == pytest.approx(r_hand, abs=1e-10)
    assert mass == pytest.approx(base, abs=1e-14)
    assert 0.1 * mass < r.item() < mass and r.item() < 0.1


def _brute_E(a, c, mask, S, abar, ablation):
    am = a.masked_fill(~mask, -math.inf)
    a2 = am.clone()
    for j in S:
        a2[j] = abar if ablation == "mean" else -math.inf
    return float(((torch.softmax(am, 0) - torch.softmax(a2, 0)) * c).sum())


@pytest.mark.parametrize("k", [3, 4])
@pytest.mark.parametrize("ablation", ["mean", "knockout"])
def test_subsets_and_shapley_against_brute_force(k, ablation):
    gen = torch.Generator().manual_seed(k)
    n, d = 11, 4
    a = 2 * torch.randn(n, generator=gen, dtype=F64)
    v = torch.randn(n, d, generator=gen, dtype=F64)
    g = torch.randn(d, generator=gen, dtype=F64)
    mask = torch.ones(n, dtype=torch.bool)
    mask[9:] = False
    keys = torch.tensor([7, 2, 5, 0][:k])
    o = local_effects(a, v, g, mask, keys, score_ablation=ablation)
    c = v @ g
    abar = float(a[mask].mean())
    E = {}
    for size in range(k + 1):
        for sub in itertools.combinations(range(k), size):
            E[frozenset(sub)] = _brute_E(a, c, mask, [int(keys[i]) for i in sub], abar, ablation)
            bits = sum(1 << i for i in sub)
            assert o["subset_effects"][0, bits].item() == pytest.approx(E[frozenset(sub)], abs=1e-13)
    # Shapley: average marginal contribution over all k! orders
    phi = np.zeros(k)
    perms = list(itertools.permutations(range(k)))
    for perm in perms:
        have = set()
        for i in perm:
            phi[i] += E[frozenset(have | {i})] - E[frozenset(have)]
            have.add(i)
    phi /= len(perms)
    assert o["shapley"][0].tolist() == pytest.approx(phi.tolist(), abs=1e-13)
    assert o["shapley"].sum().item() == pytest.approx(o["effect_joint"].item(), abs=1e-13)


def test_extreme_score_gaps_stay_finite():
    """Keys 800 above the rest: the rest's p underflows even in float64; knockout must still be exact."""
    a, v, g = _row([0.0, 0.0, 800.0, 800.0, 0.0], [3.0, -1.0, 1.0, 2.0, 5.0])
    mask = torch.ones(5, dtype=torch.bool)
    o = local_effects(a, v, g, mask, torch.tensor([2, 3]), score_ablation="knockout")
    # before: p = (1/2, 1/2) on the keys -> g.z = 1.5; after both are removed the rest is uniform: mean c = 7/3
    assert o["effect_joint"].item() == pytest.approx(1.5 - 7 / 3, abs=1e-12)
    assert o["effects"][0].tolist() == pytest.approx([1.5 - 2.0, 1.5 - 1.0], abs=1e-12)
    assert torch.isfinite(o["z_deltas"]).all()


def test_interaction_nan_floor_and_threshold():
    w = torch.tensor([[1e-3, 1e-3], [1.0, 2.0], [1.0, 2.0], [0.0, 0.0]], dtype=F64)
    En = torch.tensor([[2e-5, 2e-5], [0.01, 0.01], [0.01, 0.01], [0.0, 0.0]], dtype=F64)
    ES = torch.tensor([0.99e-4, 0.0299, 0.03, 0.0], dtype=F64)
    r, sym = interaction_ratio(En, ES, w, min_effect=1e-4)
    # row 0: |E_S| < min_effect -> NaN; row 1: below 0.01 * sum|w| = 0.03 -> NaN; row 2: exactly at it -> defined
    assert math.isnan(r[0]) and math.isnan(r[1]) and math.isnan(r[3])
    assert r[2].item() == pytest.approx((0.03 - 0.02) / 0.03, abs=1e-15)
    assert sym[0].item() == pytest.approx((0.99e-4 - 4e-5) / (0.99e-4 + 4e-5), abs=1e-15)  # sym stays defined
    assert math.isnan(sym[3])
    r2, _ = interaction_ratio(En[:1], ES[:1], w[:1], min_effect=1e-5)
    assert r2[0].item() == pytest.approx((0.99e-4 - 4e-5) / 0.99e-4, abs=1e-15)
    # negative joint effects: r > 0 means the joint exceeds the sum in the direction of the effect
    r3, _ = interaction_ratio(-En[2:3], -ES[2:3], w[2:3])
    assert r3[0].item() == pytest.approx(r[2].item(), abs=1e-15)


def test_select_keys_ties_abs_and_bos():
    w = torch.tensor([[[[3.0, 0.5, 2.0, 2.0, -5.0, 0.0]]]], dtype=F64)          # [b=1, h=1, q=1, k=6]
    ok = torch.ones(1, 1, 6, dtype=torch.bool)
    row = torch.ones(1, 1, 1, dtype=torch.bool)
    idx, keys = select_keys(w, ok, row, k=2, min_contribution=1.0)
    assert idx.tolist() == [[0, 0, 0]] and keys.tolist() == [[0, 2]]
    _, keys = select_keys(w, ok, row, k=3, min_contribution=1.0)
    assert keys.tolist() == [[0, 2, 3]]                                         # tie 2.0/2.0 -> lower first
    idx, _ = select_keys(w, ok, row, k=4, min_contribution=1.0)
    assert idx.shape[0] == 0                                                    # only 3 keys above 1.0
    _, keys = select_keys(w, ok, row, k=2, min_contribution=1.0, select="abs")
    assert keys.tolist() == [[4, 0]]
    ok_bos = ok.clone()
    ok_bos[..., 0] = False
    _, keys = select_keys(w, ok_bos, row, k=2, min_contribution=1.0)
    assert keys.tolist() == [[2, 3]]
    idx, _ = select_keys(w, ok, torch.zeros_like(row), k=2, min_contribution=1.0)
    assert idx.shape[0] == 0


# =========================================================================== result tables


def _synthetic_result():
    rows = []
    rng = np.random.default_rng(0)
    for p in range(10):
        for q in range(4):
            r = [0.5, 0.05, np.nan, 0.2][q] if p % 2 == 0 else [0.01, np.nan, 0.3, -0.2][q]
            rows.append(dict(prompt=p, layer=q % 2, head=0, query=q, interaction=r, interaction_sym=r / 2,
                             self_repair=bool(r > 0.1) if not np.isnan(r) else False,
                             value_similarity=float(rng.uniform())))
    df = pd.DataFrame(rows)
    return SelfRepairResult(df, dict(layers=[0, 1], heads=[0, 1], threshold=0.1), {})


def test_summary_counts_and_intervals():
    res = _synthetic_result()
    s = res.summary()
    assert list(zip(s["layer"], s["head"])) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    l0 = s.iloc[0]
    # layer 0 (queries 0, 2): even prompts 0.5 and NaN, odd prompts 0.01 and 0.3 -> 15 defined, 10 flagged
    assert (l0.n_groups, l0.n_defined, l0.n_nan, l0.n_self_repair) == (20, 15, 5, 10)
    assert l0.frac_self_repair == pytest.approx(10 / 15)
    assert l0.ci_low <= l0.frac_self_repair <= l0.ci_high and l0.ci_high - l0.ci_low > 0
    d = res.groups[(res.groups.layer == 0) & res.groups.interaction.notna()]
    assert l0.median_interaction == pytest.approx(d.interaction.median())
    assert l0.median_value_similarity_self_repair == pytest.approx(d[d.self_repair].value_similarity.median())
    assert s.iloc[1].n_groups == 0 and math.isnan(s.iloc[1].frac_self_repair)
    pd.testing.assert_frame_equal(s, res.summary())                              # seeded
    g = res.summary(cluster="group")
    assert g.iloc[0].frac_self_repair == l0.frac_self_repair


def test_sweep_fraction_vs_threshold():
    res = _synthetic_result()
    sw = res.sweep()
    assert len(sw) == 21 and sw.threshold.iloc[0] == 0.0 and sw.threshold.iloc[-1] == 1.0
    assert (np.diff(sw.fraction.to_numpy()) <= 1e-12).all()                      # non-increasing
    r = res.groups.interaction.to_numpy()
    for _, row in sw.iterrows():
        exp = np.nansum(r > row.threshold) / np.sum(~np.isnan(r))
        assert row.fraction == pytest.approx(exp)
        assert row.ci_low - 1e-12 <= row.fraction <= row.ci_high + 1e-12
    at = res.sweep([0.1]).iloc[0]
    assert at.n_flagged == int(res.groups.self_repair.sum())
    per = res.sweep([0.1, 0.25], by_layer=True)
    assert list(per.layer) == [0, 0, 1, 1]
    with pytest.raises(ValueError, match="thresholds"):
        res.sweep([])


# =========================================================================== a planted model

MARKER, ANSWER, WRONG = 1, 2, 3


def planted_gpt2(score: float = 5.0, dtype=F64, seed: int = 0):
    """A 1-layer HF GPT-2 (d_model 16, 2 heads) whose head 0 copies from every occurrence of token 1.

    Token embeddings are zero-mean with norm 4 (LayerNorm with weight 1, bias 0 is the identity on them),
    positions embed to 0, the MLP is zero. Head 0: constant query, key (x . u0) e_0 so that the marker
    scores ``score`` and every other token 0, value (x . u0)/4 e_0 (= e_0 for the marker, 0 otherwise),
    written to a direction r that the unembedding reads as +gamma r (answer) / -gamma r (wrong). Head 1 is
    generic and writes to a direction no logit reads.
    """
    import transformers

    import selfrepair

    D, H, V = 16, 2, 12
    dh = D // H
    cfg = transformers.GPT2Config(n_layer=1, n_head=H, n_embd=D, vocab_size=V, n_positions=32,
                                  tie_word_embeddings=False, layer_norm_epsilon=1e-12, bos_token_id=0,
                                  eos_token_id=0)
    torch.manual_seed(seed)
    hf = transformers.GPT2LMHeadModel(cfg).to(F64)
    gen = torch.Generator().manual_seed(seed)
    A = torch.randn(D, D, generator=gen, dtype=F64)
    A[:, 0] = 1.0
    U = torch.linalg.qr(A)[0][:, 1:]                     # orthonormal, orthogonal to the ones vector
    u0, r, s_dir, span = U[:, 0], U[:, 1], U[:, 12], U[:, 2:10]
    E = torch.zeros(V, D, dtype=F64)
    for t in range(V):
        c = torch.randn(span.shape[1], generator=gen, dtype=F64)
        E[t] = 4.0 * u0 if t == MARKER else 4.0 * (span @ c) / c.norm()
    with torch.no_grad():
        tr, blk = hf.transformer, hf.transformer.h[0]
        tr.wte.weight.copy_(E)
        tr.wpe.weight.zero_()
        for ln in (blk.ln_1, blk.ln_2, tr.ln_f):
            ln.weight.fill_(1.0)
            ln.bias.zero_()
        W = torch.zeros(D, 3 * D, dtype=F64)
        b = torch.zeros(3 * D, dtype=F64)
        b[0] = score * math.sqrt(dh) / 4.0                 # q . k / sqrt(dh) = score for the marker
        W[:, D] = u0
        W[:, 2 * D] = u0 / 4.0
        for off in (0, D, 2 * D):                          # head 1: generic
            W[:, off + dh:off + 2 * dh] = 0.3 * torch.randn(D, dh, generator=gen, dtype=F64)
        Wo = torch.zeros(D, D, dtype=F64)
        Wo[0] = r
        Wo[dh:2 * dh] = 0.3 * torch.randn(dh, 1, generator=gen, dtype=F64) * s_dir[None, :]
        blk.attn.c_attn.weight.copy_(W)
        blk.attn.c_attn.bias.copy_(b)
        blk.attn.c_proj.weight.copy_(Wo)
        blk.attn.c_proj.bias.zero_()
        for prm in blk.mlp.parameters():
            prm.zero_()
        hf.lm_head.weight.zero_()
        hf.lm_head.weight[ANSWER] = 10.0 * r
        hf.lm_head.weight[WRONG] = -10.0 * r
    return selfrepair.load_model(hf.eval(), dtype=dtype)


@pytest.fixture(scope="module")
def planted():
    return planted_gpt2()


PLANTED_TOKENS = [[0, 4, 1, 5, 6, 7, 1, 8, 9, 10, 11, 4],
                  [0, 1, 5, 6, 7, 8, 9, 10, 1, 11, 4, 5],
                  [0, 5, 1, 1, 6, 7, 8, 9, 10, 11, 4, 6]]


def _planted_task(extra_short=False):
    toks = [list(t) for t in PLANTED_TOKENS]
    if extra_short:
        toks.append([1, 1] + [0] * 10)                      # a 2-token prompt: query 1 sees only the 2 markers
    am = torch.ones(len(toks), 12, dtype=torch.long)
    if extra_short:
        am[-1, 2:] = 0
    n = len(toks)
    return Task(torch.tensor(toks), [ANSWER] * n, [WRONG] * n, attention_mask=am, name="planted")


def test_planted_model_finds_the_redundant_keys(planted):
    task = _planted_task()
    res = analyze_self_repair(planted, task, progress=False, dtype=F64)
    g = res.groups
    assert len(g) == 3
    marker_pos = [tuple(j for j, t in enumerate(row) if t == MARKER) for row in PLANTED_TOKENS]
    assert g["keys"].tolist() == marker_pos                 # exactly the two markers, lower position first
    assert (g.layer == 0).all() and (g["head"] == 0).all() and (g["query"] == 11).all()
    assert (g.interaction > 0.1).all() and g.self_repair.all()
    assert np.allclose(g.value_similarity, 1.0, atol=1e-12, rtol=0)
    # r depends only on the scores here (c is the same for both keys, 0 elsewhere): hand arithmetic, 12 keys
    e5, ebar = math.exp(5.0), math.exp(10.0 / 12)
    Z = 2 * e5 + 10
    m0 = 2 * e5 / Z
    E1 = m0 - (e5 + ebar) / (e5 + ebar + 10)
    ES = m0 - 2 * ebar / (2 * ebar + 10)
    assert np.allclose(g.interaction, (ES - 2 * E1) / ES, atol=1e-9, rtol=0)
    assert np.allclose([p for ps in g.p for p in ps], e5 / Z, atol=1e-12, rtol=0)
    # the same rows from a CachedRun through the pure-tensor API (what compare_estimates builds on)
    from selfrepair.engine.cache import cached_run

    run = cached_run(planted, task, layers=[0], dtype=F64)
    o = local_effects(*run.rows(g.prompt.to_numpy(), 0, g["head"].to_numpy(), g["query"].to_numpy()),
                      torch.tensor(g["keys"].tolist()))
    np.testing.assert_allclose(o["effect_joint"].numpy(), g.effect_joint, rtol=1e-13, atol=0)
    np.testing.assert_allclose(o["tsg_estimate"].numpy(), g.tsg_estimate, rtol=1e-13, atol=0)
    # knockout: the 2-key row of a 2-token prompt is analysed under mean ablation, skipped under knockout
    short = _planted_task(extra_short=True)
    gm = analyze_self_repair(planted, short, progress=False, dtype=F64).groups
    gk = analyze_self_repair(planted, short, score_ablation="knockout", progress=False, dtype=F64).groups
    assert ((gm.prompt == 3) & (gm["query"] == 1)).sum() == 1
    assert (gk.prompt == 3).sum() == 0 and len(gk) == 3
    row = gm[gm.prompt == 3].iloc[0]
    assert row["keys"] == (0, 1) and row.effect_joint == 0.0 and math.isnan(row.interaction)


# =========================================================================== brute force on real bridges


def _scores_site(model):
    from selfrepair.models.probe import probe

    return probe(model).scores_hook


def _clean_capture(model, task, b, layers):
    """Independent clean run of prompt b: scores (live scores hook), z, g = dm/dz (TL backward hooks),
    dm/da at the scores hook (autograd), metric."""
    n = int(task.lengths[b])
    toks = task.tokens[b:b + 1, :n]
    idx = torch.tensor([b])
    site = _scores_site(model)
    st = {}

    def keep(name):
        def fn(x, hook):
            y = x.clone()
            st[name] = y
            return y
        return fn

    def keep_grad(name):
        def fn(gr, hook):
            st[name] = gr.detach().clone()
        return fn

    fwd, bwd = [], []
    for l in layers:
        fwd += [(f"blocks.{l}.attn.hook_z", keep(("z", l))), (site.format(layer=l), keep(("a", l)))]
        bwd += [(f"blocks.{l}.attn.hook_z", keep_grad(("g", l)))]
    with model.hooks(fwd_hooks=fwd, bwd_hooks=bwd):
        m = task.metric_from_full_logits(model(toks), idx)
        gs = torch.autograd.grad(m.sum(), [st[("a", l)] for l in layers])
    out = {"m": float(m), "n": n}
    for l, ga in zip(layers, gs):
        out[("z", l)] = st[("z", l)].detach()[0]
        out[("g", l)] = st[("g", l)][0]
        out[("a", l)] = st[("a", l)].detach()[0]
        out[("dmda", l)] = ga[0]
    return out


def _brute_row(model, task, row, clean, ablation="mean", exclude_bos=False):
    """For the individual and joint ablations of row's keys: local E (ablated pattern row at hook_pattern,
    change of g . z_i at hook_z) and global G = m(clean) - m(ablated), one forward each."""
    b, l, h, i = int(row.prompt), int(row.layer), int(row["head"]), int(row["query"])
    n = clean["n"]
    toks = task.tokens[b:b + 1, :n]
    idx = torch.tensor([b])
    a = clean[("a", l)][h, i].double()
    keymask = torch.arange(n) <= i
    mean_keys = keymask.clone()
    if exclude_bos:
        mean_keys[0] = False
    abar = a[mean_keys].mean()
    am = a.masked_fill(~keymask, -math.inf)
    g = clean[("g", l)][i, h].double()
    z = clean[("z", l)][i, h].double()
    keys = list(row["keys"])
    E, G = [], []
    for S in [[j] for j in keys] + [keys]:
        a2 = am.clone()
        for j in S:
            a2[j] = abar if ablation == "mean" else -math.inf
        p2 = torch.softmax(a2, 0)
        st = {}

        def set_row(p, hook, p2=p2):
            p = p.clone()
            p[0, h, i, :] = p2.to(p.dtype)
            return p

        def keep_z(x, hook):
            st["z"] = x.detach().clone()

        with torch.no_grad():
            logits = model.run_with_hooks(toks, fwd_hooks=[(f"blocks.{l}.attn.hook_pattern", set_row),
                                                           (f"blocks.{l}.attn.hook_z", keep_z)])
        m2 = float(task.metric_from_full_logits(logits, idx))
        E.append(float(g @ (z - st["z"][0, i, h].double())))
        G.append(clean["m"] - m2)
    # plain-gradient estimate from autograd at the scores hook; TSG from its Jacobian built explicitly
    dmda = clean[("dmda", l)][h, i].double()
    grad_est = float(-sum(dmda[j] * (abar - a[j]) for j in keys)) if ablation == "mean" else float("nan")
    return E, G, grad_est, abar, am


def _check_rows(model, task, res, n_rows, rtol, atol, ablation="mean", exclude_bos=False, check_global=True):
    g = res.groups
    assert len(g) >= 1
    rows = g.reindex(g.effect_joint.abs().sort_values(ascending=False).index).head(n_rows)
    cache = {}
    for _, row in rows.iterrows():
        b = int(row.prompt)
        if b not in cache:
            cache[b] = _clean_capture(model, task, b, res.settings["layers"])
        E, G, grad_est, abar, am = _brute_row(model, task, row, cache[b], ablation, exclude_bos)
        got_E = list(row.effects) + [row.effect_joint]
        np.testing.assert_allclose(got_E, E, rtol=rtol, atol=atol)
        if check_global:
            got_G = list(row.global_effects) + [row.global_effect_joint]
            np.testing.assert_allclose(got_G, G, rtol=rtol, atol=atol)
            gap = (G[-1] - sum(G[:-1])) - (E[-1] - sum(E[:-1]))
            np.testing.assert_allclose(row.downstream_gap, gap, rtol=rtol, atol=10 * atol)
        if ablation == "mean":
            np.testing.assert_allclose(row.grad_estimate, grad_est, rtol=rtol, atol=atol)
            # TSG: -(diag(s) - s s^T) c . (a' - a), s = softmax(a / 2), c = g . v from the explicit Jacobian
            c = torch.tensor(row.contributions, dtype=F64) / torch.tensor(row.p, dtype=F64)
            s = torch.softmax(am / 2.0, 0)
            l, h, i = int(row.layer), int(row["head"]), int(row["query"])
            clean = cache[b]
            # c for every key: c_j = dm/dz . v_j; v_j from z = p v is not available, so use dm/da:
            # dm/da_j = p_j (c_j - sum p c)  ->  c_j = dm/da_j / p_j + g . z
            p = torch.softmax(am, 0)
            dmda = clean[("dmda", l)][h, i].double()
            gz = float(clean[("g", l)][i, h].double() @ clean[("z", l)][i, h].double())
            keep = p > 1e-300
            c_all = torch.zeros_like(p)
            c_all[keep] = dmda[keep] / p[keep] + gz
            np.testing.assert_allclose(c_all[list(row["keys"])].numpy(), c.numpy(), rtol=1e-6, atol=1e-8)
            J = torch.diag(s) - torch.outer(s, s)
            d = J @ c_all
            tsg = float(-sum(d[j] * (abar - am[j]) for j in row["keys"]))
            np.testing.assert_allclose(row.tsg_estimate, tsg, rtol=1e-6, atol=1e-8)
    return rows


def _rand_task(model, n_prompts=3, n=12, seed=0, pad=True):
    gen = torch.Generator().manual_seed(seed)
    V = model.cfg.d_vocab
    toks = torch.randint(3, V, (n_prompts, n), generator=gen)
    am = torch.ones_like(toks)
    if pad:
        am[1, n - 4:] = 0
    return Task(toks, torch.randint(3, V, (n_prompts,), generator=gen), torch.randint(3, V, (n_prompts,), generator=gen),
                attention_mask=am, name="random")


@pytest.mark.parametrize("fixture", ["gpt2_bridge64", "llama_bridge64"])
def test_local_and_global_effects_equal_brute_force(fixture, request):
    """Random float64 bridges (HF Llama with GQA computes RMSNorm and softmax in float32 internally)."""
    model = request.getfixturevalue(fixture)
    task = _rand_task(model)
    layers = [0, model.cfg.n_layers - 1]
    res = analyze_self_repair(model, task, min_contribution=0.0, select="abs", layers=layers, global_effects=True,
                              progress=False, dtype=F64)
    tol = (1e-9, 1e-12) if fixture.startswith("gpt2") else (1e-5, 1e-7)
    _check_rows(model, task, res, 4, *tol)
    for ab, eb in (("knockout", False), ("mean", True)):
        r2 = analyze_self_repair(model, task, min_contribution=0.0, select="abs", layers=layers[-1:], heads=[1],
                                 score_ablation=ab, exclude_bos=eb, global_effects=True, progress=False, dtype=F64)
        _check_rows(model, task, r2, 2, *tol, ablation=ab, exclude_bos=eb)
        assert (r2.groups["keys"].map(lambda t: 0 not in t)).all() if eb else True


def test_shipped_model_brute_force_and_batching(default_model):
    from selfrepair import tasks

    task = tasks.load("induction", default_model, n=4, seed=0)
    res = analyze_self_repair(default_model, task, global_effects=True, progress=False, batch_size=2)
    assert len(res.groups) > 0 and res.groups.interaction.notna().any()
    _check_rows(default_model, task, res, 4, rtol=2e-4, atol=2e-4)
    res1 = analyze_self_repair(default_model, task, global_effects=True, progress=False, batch_size=4)
    _assert_frames_close(res.groups, res1.groups, rel=1e-4)


def test_native_log_p_path_equals_scores_from_q_and_k():
    model = make_native_bridge(seed=1, dtype=F64)
    task = _rand_task(model, seed=3)
    res = analyze_self_repair(model, task, min_contribution=0.0, select="abs", heads=[0, 2], progress=False,
                              dtype=F64)
    assert res.meta["score_site"] == "pattern" and len(res.groups) > 20
    st = {}

    def keep(name):
        def fn(x, hook):
            y = x.clone()
            st[name] = y
            return y
        return fn

    L = model.cfg.n_layers
    fwd = [(f"blocks.{l}.attn.hook_{s}", keep((s, l))) for l in range(L) for s in ("q", "k", "v", "z")]
    with model.hooks(fwd_hooks=fwd):
        m = task.metric_from_full_logits(model(task.tokens))
        gz = torch.autograd.grad(m.sum(), [st[("z", l)] for l in range(L)])
    for _, row in res.groups.iterrows():
        b, l, h, i = int(row.prompt), int(row.layer), int(row["head"]), int(row["query"])
        q, k, v = st[("q", l)].detach(), st[("k", l)].detach(), st[("v", l)].detach()
        a = (k[b, :, h] @ q[b, i, h]) / math.sqrt(q.shape[-1])          # scores from q and k
        keymask = (torch.arange(task.tokens.shape[1]) <= i) & task.attention_mask[b].bool()
        c = v[b, :, h] @ gz[l][b, i, h]
        abar = a[keymask].mean()
        E = [_brute_E(a, c, keymask, S, abar, "mean") for S in [[j] for j in row["keys"]] + [list(row["keys"])]]
        np.testing.assert_allclose(list(row.effects) + [row.effect_joint], E, rtol=1e-9, atol=1e-12)
        w = torch.softmax(a.masked_fill(~keymask, -math.inf), 0) * c
        np.testing.assert_allclose(row.contributions, w[list(row["keys"])].numpy(), rtol=1e-9, atol=1e-13)


# ratio columns: (column, numerator error from, denominator) -- see _assert_frames_close
_RATIOS = {"interaction": "effect_joint", "global_interaction": "global_effect_joint"}


def _assert_frames_close(a: pd.DataFrame, b: pd.DataFrame, rel: float):
    """Two group tables equal up to rounding, tolerances derived from the quantities compared.

    Re-batching changes BLAS blocking and summation order, so every number carries an absolute
    rounding error proportional to the magnitudes it was computed from, not to itself:
    - local effects, contributions, estimates, Shapley values: ``rel`` times the largest |w_j|
      or |effect| of the table (each is a short sum of p_j c_j terms);
    - global effects (``m(clean) - m(ablated)``): ``rel`` times the largest |m(clean)|, since
      a difference of two metrics inherits the metrics' rounding, however small it is;
    - ratios (``interaction``, ``global_interaction``): the error of numerator and denominator
      propagated through the division (conftest.ratio_tol), which is large near the floor;
      ``interaction_sym`` likewise with its denominator ``|E_S| + sum |E_n|``.
    """
    assert list(a.columns) == list(b.columns) and len(a) == len(b)
    local_scale = max(scaled_atol(np.array(a.contributions.tolist(), float), 1.0),
                      scaled_atol(np.array(a.effects.tolist(), float), 1.0), scaled_atol(a.effect_joint, 1.0))
    err_local = rel * local_scale
    err_global = rel * scaled_atol(a.metric, 1.0) if "global_effect_joint" in a else err_local
    for c in a.columns:
        if c in SR.TUPLE_COLUMNS:
            assert [len(t) for t in a[c]] == [len(t) for t in b[c]]
            if SR.TUPLE_COLUMNS[c] == "int":
                assert a[c].tolist() == b[c].tolist(), c
                continue
            x, y = np.array(a[c].tolist(), float), np.array(b[c].tolist(), float)
        elif a[c].dtype == bool or c in SR.INT_COLUMNS:
            assert a[c].tolist() == b[c].tolist(), c
            continue
        else:
            x, y = a[c].to_numpy(float), b[c].to_numpy(float)
        if c in _RATIOS:
            err = err_global if c.startswith("global") else err_local
            tol = ratio_tol(err * (len(a["keys"].iloc[0]) + 1), x, a[_RATIOS[c]].to_numpy(float))
        elif c == "interaction_sym":
            den = a.effect_joint.abs().to_numpy() + np.abs(np.array(a.effects.tolist(), float)).sum(1)
            tol = ratio_tol(err_local * 2 * (len(a["keys"].iloc[0]) + 1), x, den)
        elif c.startswith("global") or c == "downstream_gap" or c == "metric":
            tol = err_global * 4 if c != "metric" else err_global
        else:
            tol = err_local
        tol = np.broadcast_to(tol, x.shape) if np.ndim(tol) else np.full(x.shape, tol)
        both_nan = np.isnan(x) & np.isnan(y)
        assert (np.isnan(x) == np.isnan(y)).all(), f"{c}: NaN pattern differs"
        bad = ~both_nan & ~(np.abs(x - y) <= tol + rel * np.abs(y))
        assert not bad.any(), (f"{c}: {int(bad.sum())} values differ beyond the derived tolerance, e.g. "
                               f"{x[bad][:3]} vs {y[bad][:3]} (tol {tol[bad][:3]})")


def test_batch_size_invariance(gpt2_bridge64):
    task = _rand_task(gpt2_bridge64, n_prompts=4, seed=5)
    kw = dict(min_contribution=0.0, select="abs", layers=[1, 2], global_effects=True, progress=False, dtype=F64)
    r1 = analyze_self_repair(gpt2_bridge64, task, batch_size=1, **kw)
    r3 = analyze_self_repair(gpt2_bridge64, task, batch_size=3, **kw)
    assert len(r1.groups) > 20
    _assert_frames_close(r1.groups, r3.groups, rel=1e-10)
    assert sum(len(hp.fwd_hooks) + len(hp.bwd_hooks) for hp in gpt2_bridge64.hook_dict.values()) == 0
    # no group at all (threshold on contributions too high): an empty table with every column
    none = analyze_self_repair(gpt2_bridge64, task, batch_size=2, **{**kw, "min_contribution": 1e9, "select": "positive"})
    assert len(none.groups) == 0 and list(none.groups.columns) == SR.BASE_COLUMNS + SR.GLOBAL_COLUMNS
    assert none.summary().n_groups.sum() == 0 and len(none.sweep()) == 21


# =========================================================================== persistence


def _exact_equal(a: pd.DataFrame, b: pd.DataFrame):
    assert list(a.columns) == list(b.columns)
    for c in a.columns:
        assert a[c].dtype == b[c].dtype, c
        if c in SR.TUPLE_COLUMNS:
            for x, y in zip(a[c], b[c]):
                assert isinstance(y, tuple) and len(x) == len(y)
                assert all(type(u) is type(w) for u, w in zip(x, y))
                np.testing.assert_array_equal(np.array(x), np.array(y))
        else:
            np.testing.assert_array_equal(a[c].to_numpy(), b[c].to_numpy(), err_msg=c)


def test_parquet_round_trip(planted, tmp_path):
    import pyarrow.parquet as pq

    task = _planted_task(extra_short=True)
    res = analyze_self_repair(planted, task, k=2, global_effects=True, progress=False, dtype=F64)
    assert res.groups.interaction.isna().any()                 # NaN survives too
    path = tmp_path / "res.parquet"
    res.to_parquet(path)
    back = SelfRepairResult.read_parquet(path)
    _exact_equal(res.groups, back.groups)
    new = ["mass_interaction", "excess_interaction", "concealment", "concealment_share", "permutation_p", "c_ratio",
           "value_similarity_out", "n_contributing", "n_clusters"]
    assert set(new) <= set(back.groups.columns) and back.groups["permutation_p"].notna().any()
    assert back.groups["n_clusters"].dtype == np.int64 and all(len(t) == 2 for t in back.groups["concealment"])
    assert back.settings == res.settings and back.meta == res.meta
    assert isinstance(back.groups["keys"].iloc[0][0], int)
    kv = pq.read_schema(path).metadata
    assert b"selfrepair" in kv
    assert set(back.meta["versions"]) >= {"selfrepair", "transformer_lens", "torch"}
    assert back.meta["task_name"] == "planted" and back.meta["task_size"] == 4 and back.meta["model_hash"]
    assert back.settings["score_ablation"] == "mean" and back.settings["layers"] == [0]
    assert not list(tmp_path.glob("*.tmp"))                    # atomic write leaves no temp file
    info = SR.read_result_info(path)                           # the footer alone
    assert info["settings"] == res.settings and info["meta"] == res.meta
    pd.DataFrame({"x": [1]}).to_parquet(tmp_path / "other.parquet")
    with pytest.raises(ValueError, match="not a selfrepair result"):
        SR.read_result_info(tmp_path / "other.parquet")


def test_resume_after_interruption(planted, tmp_path, monkeypatch):
    task = _planted_task(extra_short=True)
    kw = dict(batch_size=1, progress=False, dtype=F64, global_effects=True)
    full = analyze_self_repair(planted, task, **kw)
    real = SR_driver._analyze_batch
    calls = []

    def flaky(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt("simulated interruption")
        return real(*a, **k)

    monkeypatch.setattr(SR_driver, "_analyze_batch", flaky)
    ck = tmp_path / "ck"
    with pytest.raises(KeyboardInterrupt):
        analyze_self_repair(planted, task, checkpoint_dir=ck, **kw)
    assert len(list(ck.glob("batch_*.parquet"))) == 2          # batches 0 and 1 were saved
    calls.clear()
    res = analyze_self_repair(planted, task, checkpoint_dir=ck, **kw)
    assert len(calls) == 2                                     # only batches 2 and 3 were computed
    assert res.meta["n_batches_resumed"] == 2
    _exact_equal(full.groups, res.groups)
    # a third run computes nothing
    calls.clear()
    again = analyze_self_repair(planted, task, checkpoint_dir=ck, **kw)
    assert calls == [] and again.meta["n_batches_resumed"] == 4
    with pytest.raises(ValueError, match=r"settings \['threshold'\]"):
        analyze_self_repair(planted, task, checkpoint_dir=ck, threshold=0.2, **kw)
    with pytest.raises(ValueError, match="task"):
        analyze_self_repair(planted, _planted_task(), checkpoint_dir=ck, **kw)


# =========================================================================== errors


def test_bad_arguments(gpt2_bridge, monkeypatch):
    task = _rand_task(gpt2_bridge)
    run = lambda **kw: analyze_self_repair(gpt2_bridge, task, progress=False, **kw)  # noqa: E731
    for k in (1, 9, 2.5):
        with pytest.raises(ValueError, match="k must be an integer from 2 to 8"):
            run(k=k)
    with pytest.raises(ValueError, match="threshold must be a finite number >= 0"):
        run(threshold=-0.1)
    with pytest.raises(ValueError, match="unknown score_ablation 'zero'; valid: 'mean', 'knockout'"):
        run(score_ablation="zero")
    with pytest.raises(ValueError, match="unknown value_ablation 'knockout'; valid: 'zero', 'mean'"):
        run(value_ablation="knockout")
    with pytest.raises(ValueError, match="unknown select mode 'top'; valid: 'positive', 'abs'"):
        run(select="top")
    with pytest.raises(ValueError, match=r"layer 3 out of range: the model has 3 layers"):
        run(layers=[0, 3])
    with pytest.raises(ValueError, match=r"head 4 out of range"):
        run(heads=[4])
    with pytest.raises(ValueError, match="temperature"):
        run(temperature=0)
    with pytest.raises(ValueError, match="batch_size"):
        run(batch_size=0)
    with pytest.raises(TypeError, match="selfrepair.Task"):
        analyze_self_repair(gpt2_bridge, task.tokens, progress=False)
    empty = _rand_task(gpt2_bridge)
    empty.tokens = empty.tokens[:0]
    with pytest.raises(ValueError, match="empty task"):
        analyze_self_repair(gpt2_bridge, empty, progress=False)
    n_ctx = gpt2_bridge.cfg.n_ctx
    long = Task(torch.randint(3, 100, (1, n_ctx + 1)), [5], [6])
    with pytest.raises(ValueError, match="context"):
        analyze_self_repair(gpt2_bridge, long, progress=False)

    import dataclasses
    import sys

    P = sys.modules["selfrepair.models.probe"]       # the module (selfrepair.probe the attribute is the function)

    real = P.probe(gpt2_bridge)
    dead = dataclasses.replace(real, scores_live=False)
    monkeypatch.setattr(P, "probe", lambda m: dead)
    with pytest.raises(RuntimeError, match="not live"):
        run()
    monkeypatch.setattr(P, "probe", lambda m: dataclasses.replace(real, score_site=None))
    with pytest.raises(RuntimeError, match="no live attention site"):
        run()
