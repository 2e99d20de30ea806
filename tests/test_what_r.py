"""What r is made of, group sizes and the intervals of the shares, wired into analyze_self_repair and the
result (docs/quantities.md "What r is made of", "Group sizes", "Intervals"), against independent computations:

- every new column of real rows (HF GPT-2 and HF Llama with grouped-query attention, float64) recomputed
  from the cached row with plain numpy softmaxes (tests/test_decomposition.py's reference), the head output
  vectors from the Hugging Face output projection's weights (not TransformerLens' W_O), the clusters by
  scipy's connected components, and permutation_p by an explicit loop over the permutations drawn with the
  same generator;
- ``k="auto"`` equal to a fixed-k analysis on the rows with exactly k contributing keys;
- summary() / sweep(): the Wilson interval written out, valid at 1 (all flagged), and Benjamini-Hochberg
  as an explicit step-up loop;
- group_sizes() / by_group_size() against value counts by hand; the Parquet round trip of groups of
  several sizes; one clear error per bad argument.

Tolerances: float64 rows of ~12 keys; ratios of local effects agree to ~1e-13 between two correct
computations (relative 1e-9 leaves room for another CPU's summation order; a wrong key, mean or floor
moves them by 1e-3 or more). Cosines of d_model-vectors: 1e-9 likewise.

The real models here are float32 and their scores site is live, so the analysis streams: it recomputes
each score ``q . k / sqrt(d_head)`` in float64 from the model's float32 q and k instead of reading the
model's float32-rounded scores. The reference does the same from TransformerLens' own hook_q / hook_k
(hook_rot_q / hook_rot_k under rotary), after checking that these scores equal the model's hooked ones
within the rounding of a d_head-term float32 dot product, ``(d_head + 2) eps32 max_j |q| |k_j| / sqrt(d_head)``.
So the rows are compared at 1e-9 like float64 rows.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from scipy.sparse.csgraph import connected_components

from selfrepair.analysis import SelfRepairResult, analyze_self_repair
from selfrepair.engine import cached_run
from selfrepair.tasks import Task

from test_decomposition import effect, ref_r, softmax
from test_self_repair import _assert_frames_close

F64 = torch.float64
RTOL = 1e-9
N_PERM = 40
ME = 1e-6      # min_effect: the random models' local effects are ~1e-3, far below the default floor 1e-4


def _task(model, n_prompts=3, n=12, seed=0):
    gen = torch.Generator().manual_seed(seed)
    V = model.cfg.d_vocab
    toks = torch.randint(3, V, (n_prompts, n), generator=gen)
    am = torch.ones_like(toks)
    am[1, n - 4:] = 0                                       # a padded prompt
    return Task(toks, torch.randint(3, V, (n_prompts,), generator=gen), torch.randint(3, V, (n_prompts,), generator=gen),
                attention_mask=am, name="random")


def _hf_W_O(model, layer, head):
    """Rows of the Hugging Face output projection that read head h: [d_head, d_model]."""
    hf = model.original_model
    dh = model.cfg.d_head
    if hasattr(hf, "transformer"):                          # GPT-2: Conv1D, y = x @ W, W [d_in, d_out]
        W = hf.transformer.h[layer].attn.c_proj.weight
        return W[head * dh:(head + 1) * dh].detach().double().numpy()
    W = hf.model.layers[layer].self_attn.o_proj.weight     # Llama: Linear, y = x @ W.T, W [d_out, d_in]
    return W[:, head * dh:(head + 1) * dh].T.detach().double().numpy()


def _exact_scores(model, task, layer, hooked):
    """q . k / sqrt(d_head) in float64 from the model's q and k hooks: [batch, head, q, k], checked against the
    model's own (float32) scores ``hooked`` within the rounding bound of the module docstring."""
    rot = f"blocks.{layer}.attn.hook_rot_q" in model.hook_dict
    qn, kn = ((f"blocks.{layer}.attn.hook_rot_q", f"blocks.{layer}.attn.hook_rot_k") if rot
              else (f"blocks.{layer}.attn.hook_q", f"blocks.{layer}.attn.hook_k"))
    n = int(task.lengths.max())
    _, cache = model.run_with_cache(task.tokens[:, :n], names_filter=lambda x: x in (qn, kn))
    q, k = cache[qn].double(), cache[kn].double()                  # [b, n, h, d], [b, n, h_kv, d]
    k = k.repeat_interleave(q.shape[2] // k.shape[2], dim=2)       # query head h reads kv head h // group
    d = q.shape[-1]
    a = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(d)
    bound = (d + 2) * torch.finfo(torch.float32).eps * (
        q.norm(dim=-1).permute(0, 2, 1)[..., None] * k.norm(dim=-1).permute(0, 2, 1)[:, :, None]).amax(-1) / math.sqrt(d)
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    err = torch.where(causal, (a - hooked.double()).abs(), torch.zeros(()))
    assert bool((err.amax(-1) <= bound).all()), float((err.amax(-1) / bound).max())
    return a


def _close(x, y, rtol=RTOL):
    if isinstance(y, float) and math.isnan(y):
        return math.isnan(x)
    return abs(x - y) <= rtol * max(1.0, abs(y))


@pytest.mark.parametrize("fixture,minc", [("default_model", 0.2), ("stories_model", 0.05)])
def test_columns_against_independent_computation(fixture, minc, request):
    """The shipped model (HF GPT-2) and stories260K (HF Llama, 8 query heads on 4 kv heads): real attention,
    so the groups have effects well above the floor. Activations cached in float64 by both sides."""
    from selfrepair import tasks

    model = request.getfixturevalue(fixture)
    task = tasks.load("induction", model, n=4, seed=0)
    res = analyze_self_repair(model, task, k="auto", k_max=4, min_contribution=minc, select="abs",
                              n_permutations=N_PERM, seed=3, progress=False, dtype=F64)
    g = res.groups
    assert res.meta["streamed_batches"] > 0             # the scores were recomputed from q and k (docstring)
    assert len(g) >= 8 and len({len(k) for k in g["keys"]}) >= 2, "too few rows / sizes to test on"
    assert g["permutation_p"].notna().sum() >= 4 and (g["c_ratio"] < 0).any()
    runs = {}
    rows = g.sample(n=min(12, len(g)), random_state=0)
    for row in rows.itertuples():
        l = row.layer
        if l not in runs:
            run = cached_run(model, task, layers=[l], dtype=F64, keep=("scores", "values"))
            runs[l] = run, _exact_scores(model, task, l, run.scores[l])
        run, exact = runs[l]
        b, h, q = row.prompt, row.head, row.query
        mask = run.mask[b, q].numpy()
        a = exact[b, h, q].numpy()
        v = run.values[l][b, :, h].numpy()                  # [n, d_head]
        c = v @ run.grad_z[l][b, q, h].numpy()
        keys = list(row.keys)
        mm = mask.copy()
        p = softmax(a, mask)
        w = p * np.where(mask, c, 0.0)
        # n_contributing and the group: all keys with |w| > minc, largest first, at most k_max
        contributing = np.nonzero(mask & (np.abs(w) > minc))[0]
        assert row.n_contributing == len(contributing)
        order = sorted(contributing, key=lambda j: (-abs(w[j]), j))
        assert keys == order[:4]
        r = ref_r(a, mask, c, keys, mm, "mean")
        assert _close(row.interaction, r)
        # mass_interaction: r with c = 1 on S, 0 elsewhere; excess = r - mass
        one_s = np.zeros_like(c)
        one_s[keys] = 1.0
        mass = ref_r(a, mask, one_s, keys, mm, "mean")
        assert _close(row.mass_interaction, mass)
        assert _close(row.excess_interaction, r - mass) if not math.isnan(r - mass) else math.isnan(row.excess_interaction)
        # concealment: re-run each individual ablation with the other keys of S carrying c_rest
        rest = mask & mm
        rest[keys] = False
        c_rest = (p[rest] * c[rest]).sum() / p[rest].sum()
        E0, conc = [], []
        for j in keys:
            c0 = c.copy()
            c0[[i for i in keys if i != j]] = c_rest
            E0.append(effect(a, mask, c0, [j], mm, "mean"))
            conc.append(E0[-1] - effect(a, mask, c, [j], mm, "mean"))
        assert len(row.concealment) == len(keys)
        assert all(_close(x, y) for x, y in zip(row.concealment, conc))
        floor = max(1e-4, 0.01 * sum(abs(w[j]) for j in keys))
        share = sum(conc) / sum(E0) if abs(sum(E0)) >= floor else float("nan")
        assert _close(row.concealment_share, share)
        # c_ratio by hand
        cK = c[keys]
        cr = np.abs(cK).min() / np.abs(cK).max()
        assert _close(row.c_ratio, -cr if (cK > 0).any() and (cK < 0).any() else cr)
        # value_similarity_out and n_clusters from v @ W_O read from the HF weights
        W = _hf_W_O(model, l, h)
        o = v @ W
        on = o / np.linalg.norm(o, axis=1, keepdims=True)
        cos = [on[i] @ on[j] for ii, i in enumerate(keys) for j in keys[ii + 1:]]
        assert _close(row.value_similarity_out, float(np.mean(cos)))
        sub = on[contributing]
        n_comp, _ = connected_components((sub @ sub.T) >= 0.8, directed=False)
        assert row.n_clusters == n_comp
        # permutation_p: an explicit loop over the permutations of this row's generator
        n_p = min(int(task.lengths[b]), q + 1)             # the keys the query sees
        seed = int(np.random.SeedSequence([3, b, l, h, q]).generate_state(1)[0])
        u = torch.rand(1, N_PERM, n_p, dtype=F64, generator=torch.Generator().manual_seed(seed))[0].numpy()
        pos = np.nonzero(mask[:n_p])[0]                     # permutable keys (no exclude_bos)
        ge = n_def = 0
        for bb in range(N_PERM):
            cb = np.where(mask[:n_p], c[:n_p], 0.0)
            cb[pos] = c[pos][np.argsort(u[bb, pos])]
            rb = ref_r(a[:n_p], mask[:n_p], cb, keys, mm[:n_p], "mean")
            if not math.isnan(rb):
                n_def += 1
                ge += rb >= r - 1e-9 * max(1.0, abs(r))
        expected = (1 + ge) / (1 + n_def) if not math.isnan(r) else float("nan")   # NaN where r is NaN
        assert row.permutation_p == pytest.approx(expected, abs=1e-15, nan_ok=True)


def test_k_auto_equals_fixed_k_on_rows_with_exactly_k(gpt2_bridge64):
    task = _task(gpt2_bridge64, seed=1)
    kw = dict(min_contribution=0.004, select="abs", layers=[1, 2], global_effects=True, progress=False, dtype=F64,
              n_permutations=20, min_effect=ME)
    auto = analyze_self_repair(gpt2_bridge64, task, k="auto", **kw).groups
    key = ["prompt", "layer", "head", "query"]
    two = analyze_self_repair(gpt2_bridge64, task, k=2, **kw).groups
    # auto analyses exactly the rows with >= 2 contributing keys, each with min(n_contributing, k_max) keys
    assert auto[key].values.tolist() == two[key].values.tolist()
    assert [len(k) for k in auto["keys"]] == np.minimum(auto["n_contributing"], 8).tolist()
    assert auto["n_contributing"].tolist() == two["n_contributing"].tolist()
    for k in sorted(set(auto["n_contributing"]) & {2, 3}):
        fixed = analyze_self_repair(gpt2_bridge64, task, k=k, **kw).groups
        a = auto[auto["n_contributing"] == k].reset_index(drop=True)
        f = fixed[fixed["n_contributing"] == k].reset_index(drop=True)
        assert len(a) > 0 and a[key].values.tolist() == f[key].values.tolist()
        # the same computation on the same rows: equal up to the rounding of batched forwards (global effects
        # replayed among other edits), tolerances derived as in test_self_repair's batching test
        _assert_frames_close(a, f, rel=1e-10)
    capped = analyze_self_repair(gpt2_bridge64, task, k="auto", k_max=2, **kw).groups
    assert {len(k) for k in capped["keys"]} == {2} and len(capped) == len(auto)


def test_auto_round_trip_and_group_tables(gpt2_bridge64, tmp_path):
    task = _task(gpt2_bridge64, seed=2)
    res = analyze_self_repair(gpt2_bridge64, task, k="auto", min_contribution=0.004, select="abs", layers=[2],
                              n_permutations=10, progress=False, dtype=F64, min_effect=ME)
    g = res.groups
    sizes = [len(k) for k in g["keys"]]
    assert len(set(sizes)) >= 2
    res.save(tmp_path / "r.parquet")
    back = SelfRepairResult.load(tmp_path / "r.parquet")
    assert list(back.groups.columns) == list(g.columns) and back.settings["k"] == "auto"
    for c in g.columns:
        for x, y in zip(g[c], back.groups[c]):
            if isinstance(x, tuple):
                assert isinstance(y, tuple) and np.array_equal(np.array(x), np.array(y)), c
            else:
                assert x == y or (math.isnan(x) and math.isnan(y)), c
        assert g[c].dtype == back.groups[c].dtype, c
    # group_sizes: value counts per head, by hand
    gs = res.group_sizes()
    for (l, h), s in g.groupby(["layer", "head"]):
        for q, col in (("n_contributing", s["n_contributing"]), ("n_clusters", s["n_clusters"]),
                       ("group_size", pd.Series([len(k) for k in s["keys"]]))):
            t = gs[(gs["layer"] == l) & (gs["head"] == h) & (gs["quantity"] == q)]
            vc = col.value_counts()
            assert dict(zip(t["value"], t["count"])) == {int(i): int(n) for i, n in vc.items()}
            assert t["share"].sum() == pytest.approx(1.0)
    tot = res.group_sizes(per_head=False)
    assert tot[tot.quantity == "group_size"]["count"].sum() == len(g)
    # by_group_size: medians of the defined rows of each size, by hand
    bg = res.by_group_size(per_head=False)
    assert bg["group_size"].tolist() == sorted(set(sizes))
    for row in bg.itertuples():
        d = g[(np.array(sizes) == row.group_size) & g["interaction"].notna()]
        assert row.n_groups == sizes.count(row.group_size) and row.n_defined == len(d)
        assert row.median_excess_interaction == pytest.approx(d["excess_interaction"].median(), nan_ok=True)
        assert row.median_mass_interaction == pytest.approx(d["mass_interaction"].median(), nan_ok=True)
        assert row.frac_self_repair == pytest.approx((d["interaction"] > 0.1).mean(), nan_ok=True)


def test_no_permutations_skips_only_the_test(gpt2_bridge64):
    """n_permutations=0: permutation_p is NaN in every row and summary() flags nothing by it; every other column
    is the very same as with the test (the test reads the rows, it changes none)."""
    task = _task(gpt2_bridge64, seed=2)
    kw = dict(min_contribution=0.004, select="abs", layers=[1, 2], progress=False, dtype=F64, min_effect=ME)
    with_test = analyze_self_repair(gpt2_bridge64, task, n_permutations=10, **kw)
    without = analyze_self_repair(gpt2_bridge64, task, n_permutations=0, **kw)
    assert len(with_test.groups) > 10 and with_test.groups["permutation_p"].notna().any()
    assert without.groups["permutation_p"].isna().all()
    cols = [c for c in with_test.groups.columns if c != "permutation_p"]
    pd.testing.assert_frame_equal(without.groups[cols], with_test.groups[cols])
    s = without.summary()
    assert (s["n_tested"] == 0).all() and (s["n_permutation"] == 0).all()
    assert with_test.summary()["n_tested"].sum() > 0


def test_bad_arguments_one_clear_error_each(gpt2_bridge):
    task = _task(gpt2_bridge)
    run = lambda **kw: analyze_self_repair(gpt2_bridge, task, progress=False, **kw)  # noqa: E731
    cases = [(dict(n_permutations=-1), "n_permutations must be an integer >= 0"),
             (dict(n_permutations=2.5), "n_permutations must be an integer >= 0"),
             (dict(cluster_similarity=1.5), r"cluster_similarity is a cosine and must lie in \[-1, 1\]"),
             (dict(cluster_similarity=float("nan")), r"cluster_similarity is a cosine"),
             (dict(k="auto", k_max=9), "k_max must be an integer from 2 to 8"),
             (dict(k="auto", k_max=1), "k_max must be an integer from 2 to 8"),
             (dict(k="all"), "k must be an integer from 2 to 8 .* or 'auto'"),
             (dict(alpha=0.0), r"alpha must lie strictly between 0 and 1"),
             (dict(alpha=1.0), r"alpha must lie strictly between 0 and 1"),
             (dict(seed=-1), "seed must be an integer >= 0")]
    for kw, msg in cases:
        with pytest.raises(ValueError, match=msg) as e:
            run(**kw)
        assert "\n" not in str(e.value)
    res = SelfRepairResult(pd.DataFrame({"prompt": [0], "layer": [0], "head": [0], "interaction": [0.5],
                                         "self_repair": [True]}), {"layers": [0], "heads": [0]}, {})
    with pytest.raises(ValueError, match="alpha must lie strictly between 0 and 1"):
        res.summary(alpha=1.5)


# ----------------------------------------------------------------------------- intervals and the two rules


Z95 = 1.959963984540054


def wilson(k, n):
    """The Wilson score interval written out (95%)."""
    p = k / n
    den = 1 + Z95 ** 2 / n
    centre = (p + Z95 ** 2 / (2 * n)) / den
    half = Z95 * math.sqrt(p * (1 - p) / n + Z95 ** 2 / (4 * n * n)) / den
    return centre - half, centre + half


def bh_loop(p, alpha):
    """Benjamini-Hochberg step-up as a loop: reject the i smallest p, i the largest with p_(i) <= i alpha / m."""
    idx = [i for i in range(len(p)) if not math.isnan(p[i])]
    order = sorted(idx, key=lambda i: p[i])
    m = len(order)
    top = 0
    for rank, i in enumerate(order, start=1):
        if p[i] <= rank * alpha / m:
            top = rank
    return {order[r] for r in range(top)}


def _two_rule_result():
    """Head (0, 0): 40 groups over 20 prompts, all r > 0.1, all p tiny. Head (0, 1): 30 groups, r and p mixed."""
    rng = np.random.default_rng(0)
    rows = []
    for i in range(40):
        rows.append(dict(prompt=i // 2, layer=0, head=0, query=i, interaction=0.3 + 0.01 * i, permutation_p=0.004))
    for i in range(30):
        r = float(rng.normal(0.1, 0.2)) if i % 7 else float("nan")
        rows.append(dict(prompt=i, layer=0, head=1, query=i, interaction=r,
                         permutation_p=float(rng.uniform(0.001, 1.0)) if not math.isnan(r) else float("nan")))
    df = pd.DataFrame(rows)
    df["self_repair"] = df["interaction"].fillna(-1) > 0.1
    return SelfRepairResult(df, dict(layers=[0], heads=[0, 1], threshold=0.1, alpha=0.05), {})


def test_all_flagged_head_gets_an_interval_valid_at_one():
    res = _two_rule_result()
    s = res.summary()
    h0 = s.iloc[0]
    assert h0.frac_self_repair == 1.0 and h0.ci_high == 1.0 and h0.ci_low < 1.0
    assert h0.frac_permutation == 1.0 and h0.perm_ci_high == 1.0 and h0.perm_ci_low < 1.0
    # every flag equal: no variance between prompts, design effect 1 -> the plain Wilson interval of 40/40
    assert h0.n_eff == 40 and h0.ci_low == pytest.approx(wilson(40, 40)[0], abs=1e-12)
    # cluster="group": every group its own cluster, design effect 1 -> Wilson on the counts
    sg = res.summary(cluster="group").iloc[1]
    d = res.groups[(res.groups["head"] == 1) & res.groups.interaction.notna()]
    k = int((d.interaction > 0.1).sum())
    lo, hi = wilson(k, len(d))
    assert (sg.ci_low, sg.ci_high) == (pytest.approx(lo, abs=1e-12), pytest.approx(hi, abs=1e-12))
    assert sg.n_eff == len(d) and sg.frac_self_repair == pytest.approx(k / len(d))


def test_permutation_rule_is_benjamini_hochberg_over_all_groups():
    res = _two_rule_result()
    p = res.groups["permutation_p"].tolist()
    for alpha in (0.05, 0.2):
        rej = bh_loop(p, alpha)
        flags = res.permutation_test(alpha)["permutation_flag"]
        assert set(np.nonzero(flags.to_numpy())[0]) == rej
        s = res.summary(alpha=alpha, cluster="group")
        for row in s.itertuples():
            sel = np.nonzero((res.groups["head"] == row.head).to_numpy())[0]
            tested = [i for i in sel if not math.isnan(p[i])]
            n_rej = sum(i in rej for i in tested)
            assert (row.n_tested, row.n_permutation) == (len(tested), n_rej)
            lo, hi = wilson(n_rej, len(tested))
            assert row.frac_permutation == pytest.approx(n_rej / len(tested))
            assert (row.perm_ci_low, row.perm_ci_high) == (pytest.approx(lo, abs=1e-12), pytest.approx(hi, abs=1e-12))
        sw = res.sweep([0.1], cluster="group", alpha=alpha).iloc[0]
        tested = [i for i in range(len(p)) if not math.isnan(p[i])]
        assert sw.n_tested == len(tested) and sw.n_permutation == len(rej)
        assert sw.fraction_permutation == pytest.approx(len(rej) / len(tested))
    # the default alpha is the analysis setting
    assert res.permutation_test()["permutation_flag"].sum() == len(bh_loop(p, 0.05))


def test_sweep_intervals_are_wilson_with_the_design_effect():
    res = _two_rule_result()
    sw = res.sweep([0.0, 0.1, 0.5], cluster="group")
    r = res.groups["interaction"].to_numpy()
    n = int(np.isfinite(r).sum())
    for row in sw.itertuples():
        k = int(np.nansum(r > row.threshold))
        lo, hi = wilson(k, n) if 0 < k < n else (wilson(k, n)[0] if k else 0.0, 1.0 if k == n else wilson(k, n)[1])
        assert row.fraction == pytest.approx(k / n)
        assert (row.ci_low, row.ci_high) == (pytest.approx(lo, abs=1e-12), pytest.approx(hi, abs=1e-12))


# ----------------------------------------------------------------------------- figures


def test_figures_show_the_columns(gpt2_bridge64):
    from selfrepair import plots

    task = _task(gpt2_bridge64, seed=2)
    res = analyze_self_repair(gpt2_bridge64, task, k="auto", min_contribution=0.004, select="abs", layers=[2],
                              n_permutations=10, progress=False, dtype=F64, min_effect=ME)
    g = res.groups
    fig = plots.plot_r_vs_mass(res)
    pts = [t for t in fig.data if t.mode == "markers"][0]
    ok = g["interaction"].notna() & g["mass_interaction"].notna()
    assert np.allclose(pts.x, g.loc[ok, "mass_interaction"]) and np.allclose(pts.y, g.loc[ok, "interaction"])
    assert np.allclose(pts.marker.color, g.loc[ok, "c_ratio"])
    assert any(t.name and t.name.startswith("y = x") for t in fig.data)
    # flag rules: per head, share r > 0.1 over defined r (by hand) and the permutation share
    fig = plots.plot_flag_rules(res)
    r_bar = [t for t in fig.data if t.name == "r > 0.1"][0]
    flags = res.permutation_test()["permutation_flag"]
    for x, y in zip(r_bar.x, r_bar.y):
        h = int(x.split("H")[1])
        d = g[(g["head"] == h) & g["interaction"].notna()]
        assert y == pytest.approx((d["interaction"] > 0.1).mean())
    p_bar = [t for t in fig.data if t.name.startswith("permutation")][0]
    for x, y in zip(p_bar.x, p_bar.y):
        h = int(x.split("H")[1])
        sel = (g["head"] == h) & g["permutation_p"].notna()
        assert y == pytest.approx(flags[sel].mean())
    # group sizes: the shares of n_contributing per head
    fig = plots.plot_group_sizes(res)
    hm = fig.data[0]
    for j, lab in enumerate(hm.x):
        h = int(lab.split("H")[1])
        vc = g.loc[g["head"] == h, "n_contributing"].value_counts(normalize=True)
        for i, v in enumerate(hm.y):
            want = vc.get(int(v), np.nan)
            assert (np.isnan(want) and np.isnan(hm.z[i][j])) or hm.z[i][j] == pytest.approx(want)
    # excess by group size: the box holds every group's excess_interaction at its size
    fig = plots.plot_excess_by_group_size(res)
    box = fig.data[0]
    assert list(box.x) == [len(k) for k in g["keys"]]
    assert np.allclose(np.asarray(box.y, float), g["excess_interaction"].to_numpy(float), equal_nan=True)


def test_row_seeds_equal_one_call_per_row():
    """decomposition.permutation_p with row_seeds / row_lengths (what the analysis uses) gives, for every row,
    what a call on that row alone, cut to its length, with that seed gives."""
    from selfrepair.analysis.decomposition import permutation_p

    g = np.random.default_rng(5)
    R, n = 7, 11
    a = torch.tensor(g.normal(size=(R, n)) * 2.0)
    c = torch.tensor(g.normal(size=(R, n)))
    lengths = [11, 9, 7, 11, 8, 10, 6]
    mask = torch.arange(n)[None] < torch.tensor(lengths)[:, None]
    keys = torch.stack([torch.randperm(L, generator=torch.Generator().manual_seed(i))[:2] for i, L in enumerate(lengths)])
    seeds = [int(x) for x in g.integers(0, 2 ** 31, R)]
    out = permutation_p(a, mask, c, keys, mask, n_permutations=30, row_seeds=seeds, row_lengths=lengths,
                        min_effect=1e-6)["permutation_p"]
    for r in range(R):
        L = lengths[r]
        one = permutation_p(a[r:r + 1, :L], mask[r:r + 1, :L], c[r:r + 1, :L], keys[r:r + 1], mask[r:r + 1, :L],
                            n_permutations=30, seed=seeds[r], min_effect=1e-6)["permutation_p"][0]
        assert out[r].item() == one.item() or (math.isnan(out[r].item()) and math.isnan(one.item()))
    with pytest.raises(ValueError, match="must be masked"):
        permutation_p(a, torch.ones_like(mask), c, keys, mask, row_seeds=seeds, row_lengths=lengths)
