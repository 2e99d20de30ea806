"""selfrepair.engine.cached_run against independent computations on HF GPT-2, HF Llama (GQA) and native bridges.

- scores / pattern / values against TransformerLens' own cache (run_with_cache), masks explicit;
- the GQA kv-head mapping checked through z = p @ v (z taken from the model);
- g = dm/dz against central finite differences of the metric (float64 model);
- the native bridge's log-p scores against q.k / sqrt(d_head) from hook_q and hook_k;
- hook hygiene: nothing left behind after a run or an error; the user's hooks survive.
"""

from __future__ import annotations

import math

import pytest
import torch

from selfrepair.engine.cache import cached_run, expand_kv, key_mask
from selfrepair.tasks import Task

from conftest import make_gpt2_bridge, scaled_atol


def _n_hooks(model) -> int:
    return sum(len(hp.fwd_hooks) + len(hp.bwd_hooks) for hp in model.hook_dict.values())


def _task(n_prompts=3, n=10, vocab=200, pad_last=3, seed=0) -> Task:
    g = torch.Generator().manual_seed(seed)
    toks = torch.randint(3, vocab, (n_prompts, n), generator=g)
    am = torch.ones_like(toks)
    am[1, n - pad_last:] = 0                                  # prompt 1 is right-padded
    return Task(toks, torch.randint(3, vocab, (n_prompts,), generator=g),
                torch.randint(3, vocab, (n_prompts,), generator=g), attention_mask=am)


def _real_queries(task: Task):
    n = task.tokens.shape[1]
    return torch.arange(n)[None, :] < task.lengths[:, None]   # [b, q]


@pytest.mark.parametrize("fixture", ["gpt2_bridge", "llama_bridge", "native_bridge"])
def test_activations_match_tl_cache(fixture, request):
    model = request.getfixturevalue(fixture)
    task = _task()
    run = cached_run(model, task, dtype=torch.float64)
    assert run.layers == tuple(range(model.cfg.n_layers))
    _, cache = model.run_with_cache(task.tokens)
    mask = key_mask(task)
    # explicit mask: causal & padding (prompt 1's padded keys masked)
    assert torch.equal(run.mask, mask)
    assert not mask[1, -1, -1] and mask[0, -1, -1] and not mask[0, 0, 1]
    realq = _real_queries(task)
    for l in run.layers:
        pat = cache[f"blocks.{l}.attn.hook_pattern"].double()
        assert torch.allclose(run.pattern[l], pat, atol=0, rtol=0)
        a = run.scores[l]
        assert a.dtype == torch.float64
        assert torch.isneginf(a[~mask[:, None].expand_as(a)]).all()          # -inf from the explicit mask
        unm = mask[:, None].expand_as(a)
        if run.score_site == "scores":
            ref = cache[f"blocks.{l}.attn.hook_attn_scores"].double()
            assert torch.equal(a[unm], ref[unm])
        # softmax(a) is the model's pattern on real query rows (log p differs by a row constant only)
        p = torch.softmax(a, -1)
        rq = realq[:, None, :, None].expand_as(p)
        assert torch.allclose(p[rq], pat[rq], atol=1e-7, rtol=0)
        # values expanded to query heads reproduce the model's own z = p @ v (checks the GQA mapping)
        z_model = cache[f"blocks.{l}.attn.hook_z"].double()
        z = torch.einsum("bhqk,bkhd->bqhd", pat, run.values[l])
        assert torch.allclose(z[realq], z_model[realq], atol=1e-6, rtol=0)
        assert torch.equal(run.z[l], z_model)
    m_ref = task.metric_from_full_logits(model(task.tokens)).double()
    assert torch.allclose(run.metric, m_ref.detach(), atol=1e-6, rtol=0)


def test_gqa_mapping_is_h_div_rep(llama_bridge):
    """Under GQA query head h reads kv head h // (n_heads / n_kv_heads) (HF repeat_kv)."""
    task = _task()
    run = cached_run(llama_bridge, task, layers=[1])
    _, cache = llama_bridge.run_with_cache(task.tokens)
    v_raw = cache["blocks.1.attn.hook_v"]
    n_heads, n_kv = llama_bridge.cfg.n_heads, v_raw.shape[2]
    assert n_kv < n_heads and run.n_kv_heads == n_kv
    for h in range(n_heads):
        assert torch.equal(run.values[1][:, :, h], v_raw[:, :, h // (n_heads // n_kv)])
    # a wrong mapping (h % n_kv) would not reproduce z
    pat = cache["blocks.1.attn.hook_pattern"]
    wrong = torch.stack([v_raw[:, :, h % n_kv] for h in range(n_heads)], 2)
    z_wrong = torch.einsum("bhqk,bkhd->bqhd", pat, wrong)
    assert not torch.allclose(z_wrong, cache["blocks.1.attn.hook_z"], atol=1e-4)
    assert torch.equal(expand_kv(v_raw, n_heads), run.values[1])


# HF Llama computes RMSNorm (and the eager softmax) in float32 even in a float64 model, so its finite
# differences carry float32 noise: a larger step and a looser tolerance there.
@pytest.mark.parametrize("fixture,eps,abs_tol,rel_tol", [("gpt2_bridge64", 1e-5, 1e-8, 1e-6),
                                                         ("llama_bridge64", 1e-2, 2e-5, 1e-3)])
def test_grad_z_matches_finite_differences(fixture, eps, abs_tol, rel_tol, request):
    model = request.getfixturevalue(fixture)
    task = _task(n=8)
    run = cached_run(model, task, dtype=torch.float64)
    L = model.cfg.n_layers
    coords = [(0, L - 1, 7, 1, 3), (1, 0, 2, 0, 0), (2, 1, 7, 3, 5), (0, 0, 5, 2, 1)]
    for b, l, i, h, d in coords:
        def edit(sign):
            def fn(z, hook):
                z = z.clone()
                z[b, i, h, d] += sign * eps
                return z
            return fn
        with torch.no_grad():
            mp = task.metric_from_full_logits(model.run_with_hooks(task.tokens, fwd_hooks=[(f"blocks.{l}.attn.hook_z", edit(1))]))
            mm = task.metric_from_full_logits(model.run_with_hooks(task.tokens, fwd_hooks=[(f"blocks.{l}.attn.hook_z", edit(-1))]))
        fd = float((mp[b] - mm[b]) / (2 * eps))
        assert run.grad_z[l][b, i, h, d].item() == pytest.approx(fd, abs=abs_tol, rel=rel_tol)
    # g of another prompt does not see the edit: every prompt gets its own gradient (sum over prompts)
    assert _n_hooks(model) == 0


def test_native_log_p_scores_equal_qk_up_to_row_constant(native_bridge):
    task = _task()
    run = cached_run(native_bridge, task, dtype=torch.float64)
    assert run.score_site == "pattern"
    _, cache = native_bridge.run_with_cache(task.tokens)
    mask = key_mask(task)
    realq = _real_queries(task)
    for l in run.layers:
        q = cache[f"blocks.{l}.attn.hook_q"].double()
        k = expand_kv(cache[f"blocks.{l}.attn.hook_k"].double(), q.shape[2])
        qk = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.shape[-1])
        diff = (run.scores[l] - qk).masked_fill(~mask[:, None], float("nan"))
        for b in range(len(task)):
            for i in range(task.tokens.shape[1]):
                if not realq[b, i]:
                    continue
                d = diff[b, :, i][:, mask[b, i]]                             # [head, unmasked keys]
                assert (d - d[:, :1]).abs().max() < 1e-5                       # a per-row constant


def test_native_keep_nothing_hooks_no_pattern(native_bridge):
    """On a pattern-site backend the pattern is hooked only when kept or needed for the scores:
    keep=() adds no hook_pattern hook and gives the same dm/dz as a run that keeps everything."""
    task = _task()
    from selfrepair.models.probe import probe

    probe(native_bridge)                       # cached: its own hooks are not the ones counted here
    added = []
    real = native_bridge.hooks

    def spy(fwd_hooks=(), **kw):
        added.extend(n for n, _ in fwd_hooks)
        return real(fwd_hooks=fwd_hooks, **kw)

    native_bridge.hooks = spy
    try:
        bare = cached_run(native_bridge, task, dtype=torch.float64, keep=())
    finally:
        del native_bridge.hooks
    assert added and not [n for n in added if n.endswith("hook_pattern")]
    assert not bare.pattern and not bare.scores
    full = cached_run(native_bridge, task, dtype=torch.float64)
    for l in full.layers:
        assert torch.equal(bare.grad_z[l], full.grad_z[l])


def test_dtype_cast_layers_and_no_backward(gpt2_bridge):
    task = _task()
    run = cached_run(gpt2_bridge, task, layers=[2, 0], dtype=torch.float64)
    assert run.layers == (2, 0) and set(run.scores) == {0, 2} and set(run.grad_z) == {0, 2}
    for d in (run.scores, run.pattern, run.values, run.z, run.grad_z):
        assert all(t.dtype == torch.float64 for t in d.values())
    with torch.no_grad():
        run2 = cached_run(gpt2_bridge, task, layers=[1], backward=False, keep=("scores",))
    assert run2.grad_z is None and set(run2.scores) == {1} and not run2.values and not run2.pattern
    with pytest.raises(ValueError, match="out of range"):
        cached_run(gpt2_bridge, task, layers=[3])
    with pytest.raises(ValueError, match="keep"):
        cached_run(gpt2_bridge, task, keep=("bogus",))


def test_grad_context_wraps_forward_and_backward(gpt2_bridge64):
    """A grad_context scaling dm/d(final residual) by 3 scales every g exactly by 3."""
    model = gpt2_bridge64
    task = _task()
    L = model.cfg.n_layers
    run0 = cached_run(model, task, dtype=torch.float64)
    entered = []

    def ctx():
        entered.append(1)
        return model.hooks(bwd_hooks=[(f"blocks.{L - 1}.hook_resid_post", lambda g, hook: g * 3)])

    run1 = cached_run(model, task, dtype=torch.float64, grad_context=ctx)
    assert entered == [1]
    for l in range(L):
        # x3 on the output gradient: the same backward, scaled; rounding scales with the largest entry
        assert torch.allclose(run1.grad_z[l], 3 * run0.grad_z[l], atol=scaled_atol(run1.grad_z[l], 1e-12), rtol=1e-12)
    assert torch.equal(run1.metric, run0.metric)
    assert _n_hooks(model) == 0


def test_frozen_parameters_still_give_g():
    model = make_gpt2_bridge(seed=3, dtype=torch.float64)
    task = _task()
    run0 = cached_run(model, task, dtype=torch.float64)
    for p in model.parameters():
        p.requires_grad_(False)
    run1 = cached_run(model, task, dtype=torch.float64)
    for l in run0.layers:
        assert torch.allclose(run1.grad_z[l], run0.grad_z[l], atol=scaled_atol(run0.grad_z[l], 1e-12), rtol=0)
    assert all(p.grad is None for p in model.parameters())          # no parameter gradients accumulated


def test_hooks_removed_and_user_hooks_kept(gpt2_bridge):
    model = gpt2_bridge
    task = _task()
    calls = []
    user = model.hook_dict["blocks.0.hook_resid_pre"]
    user.add_hook(lambda x, hook: calls.append(1))
    try:
        before = _n_hooks(model)
        cached_run(model, task)
        assert _n_hooks(model) == before and len(calls) == 1

        def bad_metric(logits, ans, wrong):
            raise RuntimeError("metric exploded")

        bad = Task(task.tokens, task.answer_ids, task.wrong_ids, attention_mask=task.attention_mask, metric=bad_metric)
        with pytest.raises(RuntimeError, match="metric exploded"):
            cached_run(model, bad)
        assert _n_hooks(model) == before and len(calls) == 2
        model(task.tokens)
        assert len(calls) == 3                                        # the user's hook still fires
    finally:
        user.remove_hooks("fwd")
    assert _n_hooks(model) == 0


def test_task_longer_than_context(gpt2_bridge):
    n_ctx = gpt2_bridge.cfg.n_ctx
    t = Task(torch.randint(3, 100, (1, n_ctx + 1)), [5], [6])
    with pytest.raises(ValueError, match="context"):
        cached_run(gpt2_bridge, t)


def test_values_follow_the_kv_map_the_probe_measured(llama_bridge):
    """GQA: the cached values of query head h are hook_v's kv head ``probe(model).kv_head(h)``, read from the
    measured map (issue 12.11), checked against hook_v captured independently."""
    import selfrepair
    from selfrepair.engine.cache import expand_kv

    model = llama_bridge
    b = selfrepair.probe(model)
    assert b.n_kv_heads < b.n_heads
    task = _task()
    raw = {}
    with torch.no_grad(), model.hooks(fwd_hooks=[("blocks.0.attn.hook_v", lambda x, hook: raw.__setitem__(0, x.clone()))]):
        model(task.tokens)
    run = cached_run(model, task, layers=[0], backward=False, keep=("values",))
    n = run.values[0].shape[1]
    for h in range(b.n_heads):
        torch.testing.assert_close(run.values[0][:, :, h], raw[0][:, :n, b.kv_head(h)].float(), rtol=0, atol=0)
    # an explicit map is followed, and a wrong one refused
    x = torch.arange(2 * 3 * 2 * 1, dtype=torch.float32).reshape(2, 3, 2, 1)
    assert expand_kv(x, 4, [1, 1, 0, 0])[0, 0, :, 0].tolist() == [1.0, 1.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="kv_head_of"):
        expand_kv(x, 4, [0, 2, 0, 0])


def test_n_underflow_reaches_the_result_meta():
    """Pattern-site backends (native bridges): the count of clamped pattern entries is in the result's meta and
    equals the sum of CachedRun.n_underflow over the batches (issue 12.11)."""
    from conftest import make_native_bridge
    from selfrepair import analyze_self_repair

    model = make_native_bridge(seed=1)
    task = _task()
    res = analyze_self_repair(model, task, min_contribution=0.0, select="abs", progress=False, batch_size=2)
    want = 0
    for s in range(0, len(task), 2):
        run = cached_run(model, task.subset(slice(s, min(s + 2, len(task)))), keep=("scores",))
        want += sum(run.n_underflow.values())
    assert res.meta["score_site"] == "pattern" and res.meta["n_underflow"] == want
