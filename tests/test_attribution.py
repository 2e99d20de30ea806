"""explain / head_attributions / compare_estimates / faithfulness against independent computations.

References: the derivative of m along the straight path e -> e_baseline of each token (one scalar
per token, a different autograd route than explain's), brute-force one-prompt-at-a-time forwards
with hand-placed hooks, and hand-written formulas for the gradient estimates.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import selfrepair
from selfrepair.analysis import (agreement, compare_estimates, default_baseline_id, explain, faithfulness,
                                    head_attributions)
from selfrepair.analysis.gim import gim
from selfrepair.analysis import analyze_self_repair
from conftest import EPS32, scaled_atol
from selfrepair.tasks import Task, bos_id

OFF = dict(temperature=None, freeze_norm=False, q_scale=None, k_scale=None, v_scale=None, gate_scale=None,
           up_scale=None)


def rand_task(model, b=4, n=9, seed=0, pad=True, bos=None):
    g = torch.Generator().manual_seed(seed)
    V = int(model.cfg.d_vocab)
    toks = torch.randint(3, V, (b, n), generator=g)
    if bos is not None:
        toks[:, 0] = bos
    mask = torch.ones_like(toks)
    if pad:
        mask[1, n - 3:] = 0
        mask[b - 1, n - 5:] = 0
    toks = toks.masked_fill(mask == 0, 0)
    return Task(toks, torch.randint(3, V, (b,), generator=g), torch.randint(3, V, (b,), generator=g),
                attention_mask=mask)


def induction_task(model, b=4, seg=6, seed=0):
    """Repeated random segments: [x, x, x[:3]] -> next token x[3]."""
    g = torch.Generator().manual_seed(seed)
    V = int(model.cfg.d_vocab)
    s = torch.randint(3, V, (b, seg), generator=g)
    toks = torch.cat([s, s, s[:, :3]], 1)
    return Task(toks, s[:, 3], torch.randint(3, V, (b,), generator=g))


def path_attribution(model, task, base, ctx=None):
    """-(d/dt) m(e - t (e - e_base)) at t = 0, one t per token: = (dm/de).(e - e_base)."""
    e_base = model.W_E[base].detach()
    t = torch.zeros(task.tokens.shape, dtype=e_base.dtype, requires_grad=True)

    def path(e, hook):
        return e - t[..., None] * (e - e_base)

    with torch.enable_grad(), (ctx if ctx is not None else torch.enable_grad()), \
            model.hooks(fwd_hooks=[("hook_embed", path)]):
        m = task.metric_from_full_logits(model(task.tokens))
        (gt,) = torch.autograd.grad(m.sum(), t)
    return -gt * task.attention_mask


# ----------------------------------------------------------------------------- explain


@pytest.mark.parametrize("name", ["gpt2_bridge64", "llama_bridge64", "native_bridge", "stories_model"])
@pytest.mark.parametrize("method", ["grad", "gim"])
def test_explain_equals_path_derivative(request, name, method):
    model = request.getfixturevalue(name)
    task = rand_task(model)
    base = 7
    got = explain(model, task, method=method, baseline_id=base)
    ctx = gim(model) if method == "gim" else None
    want = path_attribution(model, task, base, ctx).to(got.dtype)
    assert got.shape == task.tokens.shape
    tol = 1e-10 if got.dtype == torch.float64 else 1e-5
    torch.testing.assert_close(got, want, rtol=tol, atol=tol * float(want.abs().max()))
    assert torch.all(got[task.attention_mask == 0] == 0)
    if method == "gim":
        plain = explain(model, task, baseline_id=base)
        assert not torch.allclose(plain, got)


def test_explain_batching_invariant(llama_bridge64):
    task = rand_task(llama_bridge64, b=5)
    a = explain(llama_bridge64, task, method="gim", baseline_id=3)
    b = explain(llama_bridge64, task, method="gim", baseline_id=3, batch_size=2)
    # Another batch shape changes the kernels' blocking, so each attribution (a dot product of terms as
    # large as the largest attribution) moves by an absolute rounding error that scales with the largest
    # one. HF Llama computes RMSNorm in float32 even for a float64 model, so that error is float32
    # rounding (measured 0.2 ulp32 of the largest on an AMD EPYC): allow 16 float32 ulps of it.
    torch.testing.assert_close(a, b, rtol=0, atol=scaled_atol(a, 16 * EPS32))


def test_explain_first_order_check(gpt2_bridge64):
    """For a tiny step along e -> e_base the attribution predicts the metric change (float64)."""
    model = gpt2_bridge64
    task = rand_task(model, b=1, pad=False)
    a = explain(model, task, baseline_id=5)
    e_base = model.W_E[5].detach()
    eps = 1e-6
    for pos in (0, 4, 8):
        def step(e, hook, pos=pos):
            e = e.clone()
            e[:, pos] = e[:, pos] - eps * (e[:, pos] - e_base)
            return e
        with torch.no_grad():
            m0 = task.metric_from_full_logits(model(task.tokens))
            with model.hooks(fwd_hooks=[("hook_embed", step)]):
                m1 = task.metric_from_full_logits(model(task.tokens))
        assert abs(float((m0 - m1) / eps) - float(a[0, pos])) < 1e-5 * (abs(float(a[0, pos])) + 1e-3)


def test_explain_errors_and_baseline(llama_bridge64):
    task = rand_task(llama_bridge64)
    with pytest.raises(ValueError, match="grad, gim"):
        explain(llama_bridge64, task, method="ig")
    with pytest.raises(ValueError, match="only apply to method='gim'"):
        explain(llama_bridge64, task, q_scale=0.5)
    with pytest.raises(ValueError, match="baseline_id"):
        explain(llama_bridge64, task, baseline_id=10**6)
    with pytest.raises(TypeError):
        explain(llama_bridge64, task.tokens)
    assert default_baseline_id(llama_bridge64) == 0  # no tokenizer: token 0
    a = explain(llama_bridge64, task)
    torch.testing.assert_close(a, explain(llama_bridge64, task, baseline_id=0))


def test_default_baseline_is_the_space_token(default_model):
    tok = default_model.tokenizer
    (space,) = tok.encode(" ", add_special_tokens=False)
    assert default_baseline_id(default_model) == space


# ----------------------------------------------------------------------------- faithfulness


def test_faithfulness_against_brute_force(gpt2_bridge64):
    model = gpt2_bridge64
    bos = bos_id(model)
    task = rand_task(model, b=3, n=10, bos=bos)
    base = 11
    att = torch.randn(task.tokens.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    att[:, 0] = 100.0  # BOS: must be excluded although it ranks first
    df = faithfulness(model, task, {"mine": att}, baseline_id=base)

    def m_of(toks, i):
        with torch.no_grad():
            logits = model(toks[None])
        return float(task.metric_fn(logits[:, int(task.positions[i])], torch.tensor([i]))[0])

    for q in (0.1, 0.2, 0.5):
        comps, suffs, comps_rel = [], [], []
        for i in range(len(task)):
            # BOS at 0 excluded, padding, the metric position and later excluded (docs/quantities.md)
            cand = list(range(1, int(task.positions[i])))
            k = max(1, math.ceil(q * len(cand)))
            order = sorted(cand, key=lambda j: (-float(att[i, j]), j))
            top = set(order[:k])
            m0 = m_of(task.tokens[i], i)
            comp = task.tokens[i].clone()
            suff = task.tokens[i].clone()
            for j in cand:
                if j in top:
                    comp[j] = base
                else:
                    suff[j] = base
            comps.append(m0 - m_of(comp, i))
            suffs.append(m0 - m_of(suff, i))
            comps_rel.append(comps[-1] / abs(m0))
        row = df[(df.method == "mine") & (df.q == f"{round(100 * q)}%")].iloc[0]
        assert row.comprehensiveness == pytest.approx(np.mean(comps), rel=1e-9, abs=1e-12)
        assert row.sufficiency == pytest.approx(np.mean(suffs), rel=1e-9, abs=1e-12)
        assert row.comprehensiveness_rel == pytest.approx(np.mean(comps_rel), rel=1e-9, abs=1e-12)
    aopc = df[(df.method == "mine") & (df.q == "AOPC")].iloc[0]
    per_q = df[(df.method == "mine") & (df.q != "AOPC")]
    assert aopc.comprehensiveness == pytest.approx(per_q.comprehensiveness.mean())
    assert aopc.sufficiency == pytest.approx(per_q.sufficiency.mean())
    rnd = df[df.method == "random"]
    assert len(rnd) == 4 and (rnd.n_rankings == 5).all()
    # batching does not change anything
    df2 = faithfulness(model, task, {"mine": att}, baseline_id=base, batch_size=2)
    np.testing.assert_allclose(df2.comprehensiveness.to_numpy(), df.comprehensiveness.to_numpy(), rtol=1e-9)


def test_faithfulness_errors(gpt2_bridge64):
    task = rand_task(gpt2_bridge64)
    with pytest.raises(ValueError, match="shape"):
        faithfulness(gpt2_bridge64, task, torch.zeros(2, 2))
    with pytest.raises(ValueError, match="reserved"):
        faithfulness(gpt2_bridge64, task, {"random": torch.zeros(task.tokens.shape)})
    with pytest.raises(ValueError, match="fractions"):
        faithfulness(gpt2_bridge64, task, torch.zeros(task.tokens.shape), fractions=(0.0,))


# ----------------------------------------------------------------------------- head attributions


def _brute_head(model, task, l, h, value, freeze=None, ctx=None):
    """Per prompt: m(clean) - m(z[:, :, h] <- value at every real position) with one forward per
    prompt; ``freeze`` = {layer: clean pattern} replaces later patterns."""
    b = selfrepair.probe(model)
    out = []
    for i in range(len(task)):
        n = int(task.lengths[i])
        toks = task.tokens[i:i + 1, :n]

        def edit(z, hook, i=i, n=n):
            z = z.clone()
            z[0, :, h] = value[i, :n]
            return z

        hooks = [(b.hook(b.z_hook, l), edit)]
        for lp, pat in (freeze or {}).items():
            hooks.append((b.hook(b.pattern_hook, lp), lambda x, hook, pat=pat, i=i, n=n: pat[i:i + 1, :, :n, :n]))
        with torch.no_grad():
            m0 = float(task.metric_from_full_logits(model(toks), torch.tensor([i]))[0])
            with model.hooks(fwd_hooks=hooks):
                m1 = float(task.metric_from_full_logits(model(toks), torch.tensor([i]))[0])
        out.append(m0 - m1)
    return np.array(out)


def _z_and_grad(model, task, ctx=None):
    b = selfrepair.probe(model)
    zs = {}

    def cap(l):
        def f(x, hook):
            x.retain_grad()
            zs[l] = x
            return x
        return f

    with torch.enable_grad(), (ctx if ctx is not None else torch.enable_grad()), \
            model.hooks(fwd_hooks=[(b.hook(b.z_hook, l), cap(l)) for l in range(b.n_layers)]):
        m = task.metric_from_full_logits(model(task.tokens))
        m.sum().backward(inputs=[zs[l] for l in range(b.n_layers)])
    return {l: zs[l].detach() for l in zs}, {l: zs[l].grad for l in zs}


def _measured_atol(model, task) -> float:
    """Absolute tolerance of a measured head effect ``m(clean) - m(ablated)``, engine vs bridge.

    The engine's own forward (GPT-2/Llama fast path) runs at the model dtype throughout, while HF
    Llama's RMSNorm (and rotary tables) compute in float32 even for a float64 model: the two forwards
    differ by float32 rounding of each logit, so the tolerance is a few float32 ulps of the largest
    logit at the metric positions (16 ulps: one rounding per norm, 2 layers + final, with margin). For
    GPT-2 (float64 LayerNorm) it is far looser than needed, never tighter."""
    with torch.no_grad():
        logits = model(task.tokens).double()
    at = logits[torch.arange(len(task)), task.positions]
    return 16 * EPS32 * max(1.0, float(at.abs().max()))


@pytest.mark.parametrize("ablation", ["mean", "zero"])
def test_head_attributions_against_brute_force(llama_bridge64, ablation):
    model = llama_bridge64
    task = rand_task(model, b=4, n=8)  # padded: "mean" averages over all real positions
    df = head_attributions(model, task, head_ablation=ablation, per_prompt=True)
    b = selfrepair.probe(model)
    z, gz = _z_and_grad(model, task)
    _, gz_gim = _z_and_grad(model, task, gim(model))
    real = task.attention_mask.bool()
    meas_atol = _measured_atol(model, task)
    pats = {}
    with torch.no_grad(), model.hooks(fwd_hooks=[(b.hook(b.pattern_hook, l), (lambda l: lambda x, hook: pats.__setitem__(l, x.clone()))(l))
                                                 for l in range(b.n_layers)]):
        model(task.tokens)
    for l in range(b.n_layers):
        for h in range(b.n_heads):
            zl = z[l][:, :, h]                                             # [B, P, d]
            if ablation == "zero":
                value = torch.zeros_like(zl)
            else:
                value = zl[real].mean(0).expand_as(zl)                     # over all real positions
            d = (zl - value) * real[..., None]
            want_grad = (gz[l][:, :, h] * d).sum((1, 2)).numpy()
            want_gim = (gz_gim[l][:, :, h] * d).sum((1, 2)).numpy()
            want_meas = _brute_head(model, task, l, h, value)
            rows = df[(df.layer == l) & (df["head"] == h)].sort_values("prompt")
            np.testing.assert_allclose(rows.grad_estimate, want_grad, rtol=1e-8, atol=scaled_atol(want_grad, 1e-8))
            np.testing.assert_allclose(rows.gim_estimate, want_gim, rtol=1e-8, atol=scaled_atol(want_gim, 1e-8))
            np.testing.assert_allclose(rows.measured, want_meas, rtol=1e-6, atol=meas_atol)
            if l == b.n_layers - 1:
                np.testing.assert_allclose(rows.via_qk, 0.0, atol=1e-12)   # no later heads
            elif h == 0:
                frozen = _brute_head(model, task, l, h, value, freeze={lp: pats[lp] for lp in range(l + 1, b.n_layers)})
                np.testing.assert_allclose(rows.measured_frozen_qk, frozen, rtol=1e-6, atol=meas_atol)
    agg = head_attributions(model, task, head_ablation=ablation)
    assert len(agg) == b.n_layers * b.n_heads
    m = df.groupby(["layer", "head"]).measured.mean().to_numpy()
    np.testing.assert_allclose(agg.measured.to_numpy(), m, rtol=1e-12)
    assert sorted(agg.rank_measured) == sorted(agg.measured.abs().rank(ascending=False, method="min").astype(int))


def test_head_attributions_equal_length_mean_is_per_position(gpt2_bridge64):
    """Prompts of equal length: the mean ablation uses the mean over prompts at each position."""
    model = gpt2_bridge64
    task = rand_task(model, b=3, n=7, pad=False)
    df = head_attributions(model, task, per_prompt=True, frozen_qk=False)
    z, _ = _z_and_grad(model, task)
    l, h = 1, 2
    value = z[l][:, :, h].mean(0, keepdim=True).expand(3, -1, -1)
    want = _brute_head(model, task, l, h, value)
    rows = df[(df.layer == l) & (df["head"] == h)].sort_values("prompt")
    np.testing.assert_allclose(rows.measured, want, rtol=1e-6, atol=_measured_atol(model, task))
    with pytest.raises(ValueError, match="mean, zero"):
        head_attributions(model, task, head_ablation="resample")


# ----------------------------------------------------------------------------- compare estimates


def test_agreement_statistics():
    x = np.array([1.0, 2.0, 3.0, -4.0, 5.0, np.nan])
    y = 2 * x
    a = agreement(x, y, top_frac=0.4)
    assert a["n"] == 5 and a["spearman"] == pytest.approx(1.0) and a["sign_agreement"] == 1.0
    assert a["topk"] == 2 and a["topk_overlap"] == 1.0
    assert a["ls_slope_origin"] == pytest.approx(2.0) and a["r2_origin"] == pytest.approx(1.0)
    b = agreement(x, -y)
    assert b["spearman"] == pytest.approx(-1.0) and b["sign_agreement"] == 0.0
    # ties share their average rank (Spearman = Pearson of average ranks)
    c = agreement(np.array([1.0, 1.0, 2.0, 3.0]), np.array([1.0, 2.0, 3.0, 4.0]))
    rx, ry = np.array([1.5, 1.5, 3, 4]), np.array([1, 2, 3, 4.0])
    assert c["spearman"] == pytest.approx(np.corrcoef(rx, ry)[0, 1])


@pytest.fixture(scope="module")
def llama_result(llama_bridge64):
    task = induction_task(llama_bridge64, b=3)
    r = analyze_self_repair(llama_bridge64, task, min_contribution=0.0, global_effects=True,
                                       progress=False, dtype=torch.float64)
    assert len(r.groups) > 20
    return task, r


def test_compare_estimates_gim_estimate_by_hand(llama_bridge64, llama_result):
    """gim_estimate = -sum_S s_j (c_j - <s, c>) (a'_j - a_j), s = softmax(a/T), c = g_gim . v, by hand."""
    model = llama_bridge64
    task, r = llama_result
    cmp = compare_estimates(model, task, r)
    b = selfrepair.probe(model)
    z, gz = _z_and_grad(model, task, gim(model))
    caps = {}
    hooks = []
    for l in range(b.n_layers):
        hooks.append((b.hook(b.scores_hook, l), (lambda l: lambda x, hook: caps.__setitem__(("a", l), x.clone()))(l)))
        hooks.append((b.hook(b.v_hook, l), (lambda l: lambda x, hook: caps.__setitem__(("v", l), x.clone()))(l)))
    with torch.no_grad(), gim(model), model.hooks(fwd_hooks=hooks):  # the forward g comes from
        model(task.tokens)
    T = r.settings["temperature"]
    rows = cmp.groups.sample(20, random_state=0)
    for _, row in rows.iterrows():
        p, l, h, i, S = int(row.prompt), int(row.layer), int(row["head"]), int(row.query), list(row["keys"])
        a = caps[("a", l)][p, h, i, :i + 1].double()
        v = caps[("v", l)][p, :i + 1, b.kv_head(h)].double()
        c = v @ gz[l][p, i, h].double()
        s = torch.softmax(a / T, 0)
        d_tsg = s * (c - (s * c).sum())
        a_new = a.mean()
        want = -sum(float(d_tsg[j] * (a_new - a[j])) for j in S)
        assert row.gim_estimate == pytest.approx(want, rel=1e-8, abs=1e-14)
    rep = cmp.report
    assert set(rep[rep.level == "group"].estimate) == {"grad_estimate", "tsg_estimate", "gim_estimate",
                                                       "contribution_sum"}
    assert set(rep[rep.level == "group"].effect) == {"global", "local"}
    one = rep[(rep.estimate == "gim_estimate") & (rep.effect == "global") & (rep.subset == "all")
              & (rep.split == "all")].iloc[0]
    ref = agreement(cmp.groups.gim_estimate, cmp.groups.global_effect_joint)
    assert one.spearman == pytest.approx(ref["spearman"]) and one.n == len(cmp.groups)


def test_compare_estimates_with_gim_off_is_tsg(llama_bridge64, llama_result):
    task, r = llama_result
    cmp = compare_estimates(llama_bridge64, task, r, **OFF)
    # two routes (a GIM backward vs the closed-form TSG Jacobian): rounding scales with the largest estimate
    np.testing.assert_allclose(cmp.groups.gim_estimate, cmp.groups.tsg_estimate, rtol=1e-9,
                               atol=scaled_atol(cmp.groups.tsg_estimate, 1e-9))


def test_compare_estimates_without_global_effects_says_so(llama_bridge64):
    task = induction_task(llama_bridge64, b=2)
    r = analyze_self_repair(llama_bridge64, task, min_contribution=0.0, progress=False)
    cmp = compare_estimates(llama_bridge64, task, r)
    assert set(cmp.report[cmp.report.level == "group"].effect) == {"local"}
    assert any("global" in n for n in cmp.notes)
    with pytest.raises(ValueError, match="different task"):
        compare_estimates(llama_bridge64, induction_task(llama_bridge64, b=2, seed=5), r)


# ----------------------------------------------------------------------------- the shipped model


def test_shipped_model_end_to_end(default_model):
    from selfrepair import tasks

    task = tasks.load("induction", default_model, n=4)
    for method in ("grad", "gim"):
        a = explain(default_model, task, method=method)
        assert a.shape == task.tokens.shape and torch.isfinite(a).all()
    df = head_attributions(default_model, task)
    b = selfrepair.probe(default_model)
    assert len(df) == b.n_layers * b.n_heads and df[["measured", "grad_estimate", "gim_estimate"]].notna().all().all()
    r = analyze_self_repair(default_model, task, global_effects=True, progress=False)
    cmp = compare_estimates(default_model, task, r)
    # group level: 4 estimates x 2 effects x 3 subsets x 3 c_ratio splits (no value_similarity_out column yet)
    grp = cmp.report[(cmp.report.level == "group")]
    assert "gim_estimate" in cmp.groups and len(grp) == 4 * 2 * 3 * len(set(grp.split))
