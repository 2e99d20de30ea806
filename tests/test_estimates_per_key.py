"""compare_estimates' per-key rows, baseline, intervals, splits and breakdowns, recomputed from the groups
table with scipy / numpy (an independent route: explicit tuple unpacking, scipy.stats.spearmanr, a loop bootstrap)."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats as st

from selfrepair.analysis import analyze_self_repair, compare_estimates
from selfrepair.analysis.estimates import EstimateComparison
from selfrepair.tasks import Task

N_BOOT = 150


def induction_task(model, b=6, seg=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    V = int(model.cfg.d_vocab)
    s = torch.randint(3, V, (b, seg), generator=g)
    toks = torch.cat([s, s, s[:, :3]], 1)
    return Task(toks, s[:, 3], torch.randint(3, V, (b,), generator=g))


@pytest.fixture(scope="module")
def comparison(gpt2_bridge64):
    task = induction_task(gpt2_bridge64)
    r = analyze_self_repair(gpt2_bridge64, task, min_contribution=0.0, progress=False, dtype=torch.float64)
    assert len(r.groups) > 30
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cmp = compare_estimates(gpt2_bridge64, task, r, n_boot=N_BOOT, seed=3, progress=False)
    return r, cmp


def _keys_by_hand(groups: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for gi, g in groups.iterrows():
        for n in range(len(g["keys"])):
            rows.append(dict(group=gi, prompt=int(g.prompt), sr=bool(g.self_repair), defined=np.isfinite(g.interaction),
                             grad=g.grad_estimates[n], tsg=g.tsg_estimates[n], w=g.contributions[n],
                             E=g.effects[n], phi=g.shapley[n], p=g.p[n]))
    return pd.DataFrame(rows)


def _loop_interval(x, y, prompts, n_boot, seed):
    """Percentile bootstrap over prompts, one sample at a time: every pair of each drawn prompt, as often as drawn."""
    ok = np.isfinite(x) & np.isfinite(y)
    x, y, prompts = x[ok], y[ok], prompts[ok]
    ids = np.unique(prompts)
    draws = np.random.default_rng(seed).integers(0, len(ids), size=(n_boot, len(ids)))
    vals = []
    for d in draws:
        idx = np.concatenate([np.nonzero(prompts == ids[c])[0] for c in d])
        xs, ys = x[idx], y[idx]
        if len(xs) < 3 or np.ptp(xs) == 0 or np.ptp(ys) == 0:
            continue
        vals.append(st.spearmanr(xs, ys).statistic)
    return np.percentile(vals, [2.5, 97.5])


def _row(rep, **kw):
    m = np.ones(len(rep), dtype=bool)
    for k, v in kw.items():
        m &= (rep[k] == v).to_numpy()
    assert m.sum() == 1, kw
    return rep[m].iloc[0]


@pytest.mark.parametrize("est,col", [("grad_key", "grad"), ("tsg_key", "tsg"), ("w_j", "w")])
@pytest.mark.parametrize("truth,tcol", [("individual", "E"), ("shapley", "phi")])
def test_per_key_spearman_and_interval_from_the_groups_table(comparison, est, col, truth, tcol):
    r, cmp = comparison
    k = _keys_by_hand(r.groups)
    row = _row(cmp.report, level="key", estimate=est, effect=truth, subset="all", split="all")
    x, y, pr = k[col].to_numpy(float), k[tcol].to_numpy(float), k.prompt.to_numpy()
    assert row.n == len(k) and row.n_prompts == len(np.unique(pr))
    # scipy's Spearman and ours are both float64 ranks -> Pearson; they agree to rounding of an O(1) number
    assert row.spearman == pytest.approx(st.spearmanr(x, y).statistic, abs=1e-12)
    lo, hi = _loop_interval(x, y, pr, N_BOOT, 3)
    # the same draws give the same samples; percentiles of identical values up to the rounding of rho
    assert row.spearman_lo == pytest.approx(lo, abs=1e-9) and row.spearman_hi == pytest.approx(hi, abs=1e-9)
    # the subsets: keys of flagged groups; of groups with a defined ratio not flagged
    checked = 0
    for name, sub in (("self_repairing", k[k.sr]), ("not_self_repairing", k[k.defined & ~k.sr])):
        row = _row(cmp.report, level="key", estimate=est, effect=truth, subset=name, split="all")
        assert row.n == len(sub)
        if len(sub) < 3:
            assert np.isnan(row.spearman)
            continue
        checked += 1
        assert row.spearman == pytest.approx(st.spearmanr(sub[col], sub[tcol]).statistic, abs=1e-12)
    assert checked


def test_group_baseline_and_c_ratio_split(comparison):
    r, cmp = comparison
    g = r.groups
    base = np.array([sum(t) for t in g.contributions])
    np.testing.assert_allclose(cmp.groups.contribution_sum.to_numpy(), base, rtol=0, atol=1e-12 * np.abs(base).max())
    # c_ratio by hand: c_j = w_j / p_j; min|c| / max|c|, negated on mixed signs
    cr = []
    for w, p in zip(g.contributions, g.p):
        c = np.asarray(w) / np.asarray(p)
        v = np.abs(c).min() / np.abs(c).max()
        cr.append(-v if (c > 0).any() and (c < 0).any() else v)
    cr = np.array(cr)
    np.testing.assert_allclose(cmp.groups.c_ratio.to_numpy(), cr, rtol=1e-12)
    for split, m in (("redundant", cr >= 0.5), ("not_redundant", cr < 0.5)):
        row = _row(cmp.report, level="group", estimate="contribution_sum", effect="local", subset="all", split=split)
        assert row.n == m.sum()
        if m.sum() >= 3:
            assert row.spearman == pytest.approx(st.spearmanr(base[m], g.effect_joint[m]).statistic, abs=1e-12)
        assert (row.warning != "") == (m.sum() < 10)
    row = _row(cmp.report, level="group", estimate="tsg_estimate", effect="local", subset="all", split="all")
    assert row.spearman == pytest.approx(st.spearmanr(g.tsg_estimate, g.effect_joint).statistic, abs=1e-12)


def test_by_layer_and_head(gpt2_bridge64, comparison):
    r, cmp = comparison
    task = induction_task(gpt2_bridge64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        by = compare_estimates(gpt2_bridge64, task, r, by="head", n_boot=10, progress=False)
    g = r.groups
    for (l, h), sub in g.groupby(["layer", "head"]):
        row = _row(by.report, level="group", estimate="grad_estimate", effect="local", subset="all", split="all",
                   layer=l, head=h)
        assert row.n == len(sub)
        if len(sub) >= 3 and np.ptp(sub.grad_estimate) > 0:
            assert row.spearman == pytest.approx(st.spearmanr(sub.grad_estimate, sub.effect_joint).statistic, abs=1e-12)
    with pytest.raises(ValueError, match="valid: None, 'layer', 'head'"):
        compare_estimates(gpt2_bridge64, task, r, by="prompt", progress=False)


def test_small_subsets_warn_and_round_trip(gpt2_bridge64, comparison, tmp_path):
    r, cmp = comparison
    task = induction_task(gpt2_bridge64)
    with pytest.warns(UserWarning, match="fewer than 10 pairs"):
        compare_estimates(gpt2_bridge64, task, r, by="head", n_boot=5, progress=False)
    cmp.save(tmp_path / "c.parquet")
    back = EstimateComparison.load(tmp_path / "c.parquet")
    pd.testing.assert_frame_equal(back.report, cmp.report)
    pd.testing.assert_frame_equal(back.keys, cmp.keys)
    assert back.settings == cmp.settings


def test_key_figure_titles_carry_the_recomputed_spearman(comparison):
    from selfrepair.report.figures import plot_key_estimates

    r, cmp = comparison
    k = _keys_by_hand(r.groups)
    fig = plot_key_estimates(cmp.keys)
    titles = [a.text for a in fig.layout.annotations]
    for e, col in (("plain gradient", "grad"), ("TSG", "tsg")):
        for t, tcol in (("Shapley value within S", "phi"), ("individual effect E_n", "E")):
            rho = st.spearmanr(k[col], k[tcol]).statistic
            assert any(x.startswith(f"{e} vs {t}") and f"Spearman {rho:.2f}" in x for x in titles), (e, t)
