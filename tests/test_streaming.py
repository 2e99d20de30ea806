"""The streaming engine (``engine.streamed_run``), the measured kv-head map, ``n_underflow`` and the cached
check of the own forward (``prepare_clean``), each against an independent computation.

- streamed scores (recomputed from q, k per block of queries) against the model's own scores read at its
  scores hook by ``run_with_cache`` (float64 bridges: to 1e-9 of the row's max |score|);
- ``analyze_self_repair`` streamed against the same analysis on the cached path (every column, float64 bridges);
- a wrong recomputation (a wrong attention scale) is caught and the analysis falls back to the cached scores;
- the values follow the kv-head map the probe measured (a permuted map moves them);
- ``n_underflow``: pattern entries zeroed by a user hook on a pattern-site backend, counted by hand;
- ``select_keys`` against a stable sort of whole rows (many ties);
- the own forward: a wrong forward is caught on the first call and, once verified, by the spot check.
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest
import torch

import selfrepair.analysis.self_repair as sr_mod
import selfrepair.engine.edits as edits_mod
from selfrepair import analyze_self_repair
from selfrepair.analysis.rows import select_keys
from selfrepair.engine import StreamMismatch, cached_run, can_stream, expand_kv, key_mask, streamed_run
from selfrepair.engine.edits import prepare_clean
from selfrepair.engine.forward import FastMismatch, FastModel
from selfrepair.models.probe import probe
from selfrepair.tasks import Task

from conftest import make_gpt2_bridge, make_native_bridge


def _task(n_prompts=3, n=12, vocab=200, seed=0) -> Task:
    g = torch.Generator().manual_seed(seed)
    toks = torch.randint(3, vocab, (n_prompts, n), generator=g)
    am = torch.ones_like(toks)
    am[1, n - 3:] = 0                                         # prompt 1 is right-padded
    return Task(toks, torch.randint(3, vocab, (n_prompts,), generator=g),
                torch.randint(3, vocab, (n_prompts,), generator=g), attention_mask=am)


@pytest.mark.parametrize("fixture", ["gpt2_bridge64", "llama_bridge64"])
@pytest.mark.parametrize("budget", [None, 40])                # 40 scores: blocks of one or two queries
def test_streamed_scores_equal_hooked_scores(fixture, budget, request):
    model = request.getfixturevalue(fixture)
    be = probe(model)
    assert can_stream(be)
    task = _task()
    run = streamed_run(model, task, dtype=torch.float64)
    _, cache = model.run_with_cache(task.tokens)
    mask = key_mask(task)
    for l in run.layers:
        own = cache[be.hook(be.scores_hook, l)].double()                      # [b, h, q, k]
        seen = torch.zeros(own.shape[2], dtype=torch.int64)
        for q0, q1, a in run.score_blocks(l, budget):
            seen[q0:q1] += 1
            nk = a.shape[-1]
            assert nk >= q1                                                    # every key a query of the block sees
            m = mask[:, None, q0:q1, :nk].expand_as(a)
            ref = own[:, :, q0:q1, :nk]
            assert torch.isneginf(a[~m]).all()
            scale = ref.masked_fill(~m, 0).abs().amax(-1, keepdim=True)       # the row's scale
            err = (a - ref).masked_fill(~m, 0).abs()
            # float64 recomputation of a d_head-term dot product: rounding ~1e-15 of the row scale
            assert bool((err <= 1e-9 * scale).all()), float((err / scale.clamp_min(1e-300)).max())
        assert (seen == 1).all()                                               # the blocks tile the queries
    # the check in streamed_run measured the same agreement
    assert run.check_error < 1e-12


def _frame(res) -> pd.DataFrame:
    return res.groups.sort_values(["prompt", "layer", "head", "query"]).reset_index(drop=True)


def _assert_same_groups(a: pd.DataFrame, b: pd.DataFrame):
    assert list(a.columns) == list(b.columns) and len(a) == len(b) and len(a) > 0
    for c in a.columns:
        x, y = a[c].to_numpy(), b[c].to_numpy()
        if x.dtype == object:
            x, y = np.array([list(t) for t in x], dtype=float), np.array([list(t) for t in y], dtype=float)
        if x.dtype.kind in "fc":
            # float64 model and analysis: the two paths differ by rounding of the scores (~1e-15 relative)
            np.testing.assert_allclose(x, y, rtol=1e-9, atol=1e-12, equal_nan=True, err_msg=c)
        else:
            np.testing.assert_array_equal(x, y, err_msg=c)


@pytest.mark.parametrize("fixture", ["gpt2_bridge64", "llama_bridge64"])
def test_streamed_analysis_equals_cached_analysis(fixture, request, monkeypatch):
    model = request.getfixturevalue(fixture)
    task = _task(n=16)
    kw = dict(k=2, min_contribution=0.0, select="abs", global_effects=True, dtype=torch.float64, progress=False)
    streamed = analyze_self_repair(model, task, **kw)
    assert streamed.meta["streamed_batches"] == streamed.meta["n_batches"] >= 1
    monkeypatch.setattr(sr_mod, "can_stream", lambda backend: False)
    cached = analyze_self_repair(model, task, **kw)
    assert cached.meta["streamed_batches"] == 0
    _assert_same_groups(_frame(streamed), _frame(cached))


def test_blocks_do_not_change_the_analysis(gpt2_bridge64, monkeypatch):
    task = _task(n=16)
    kw = dict(k=3, min_contribution=0.0, select="abs", dtype=torch.float64, progress=False)
    whole = analyze_self_repair(gpt2_bridge64, task, **kw)
    orig = sr_mod.StreamedRun.score_blocks
    monkeypatch.setattr(sr_mod.StreamedRun, "score_blocks", lambda self, l, m=None: orig(self, l, 30))
    small = analyze_self_repair(gpt2_bridge64, task, **kw)
    _assert_same_groups(_frame(whole), _frame(small))


@pytest.mark.parametrize("n,per_key,budget", [(4096, 12, 2 ** 20), (1024, 12, 2 ** 20), (300, 32, 40_000),
                                               (64, 2 ** 21, 2 ** 20), (1, 1, 1), (517, 3, 10_000)])
def test_query_blocks_are_the_largest_within_the_budget(n, per_key, budget):
    """Each block holds at most the budget's scores (or one query, where one query alone exceeds it) and is
    the longest that does: checked by a loop that grows each block one query at a time."""
    from selfrepair.engine.cache import query_blocks

    blocks = query_blocks(n, per_key, budget)
    q0 = 0
    for b0, b1 in blocks:
        assert b0 == q0 and b1 > b0
        q1 = q0 + 1
        while q1 < n and (q1 + 1 - q0) * (q1 + 1) * per_key <= budget:
            q1 += 1
        assert b1 == q1
        assert (b1 - b0) * b1 * per_key <= budget or b1 == b0 + 1
        q0 = b1
    assert q0 == n
    if (n, per_key) == (4096, 12):
        assert len(blocks) <= 100                   # not one query per block past the first third (the old loop)


def test_wrong_recomputation_is_caught_and_falls_back(gpt2_bridge64, monkeypatch):
    task = _task()
    be = probe(gpt2_bridge64)
    bad = type(be).__new__(type(be))                           # the probe's backend with a wrong attention scale
    bad.__dict__.update(be.__dict__, attn_scale=be.attn_scale * 1.001)
    with pytest.raises(StreamMismatch, match="differ from the model's own"):
        streamed_run(gpt2_bridge64, task, dtype=torch.float64, backend=bad)
    kw = dict(k=2, min_contribution=0.0, select="abs", dtype=torch.float64, progress=False)
    ref = analyze_self_repair(gpt2_bridge64, task, **kw)

    def mismatch(*a, **k):
        raise StreamMismatch("layer 0: injected")
    monkeypatch.setattr(sr_mod, "streamed_run", mismatch)
    with pytest.warns(RuntimeWarning, match="Falling back to the cached scores"):
        res = analyze_self_repair(gpt2_bridge64, task, **kw)
    assert res.meta["streamed_batches"] == 0
    _assert_same_groups(_frame(ref), _frame(res))


def test_values_follow_the_measured_kv_map(llama_bridge):
    be = probe(llama_bridge)
    assert be.n_kv_heads < be.n_heads and len(be.kv_head_of) == be.n_heads
    task = _task()
    _, cache = llama_bridge.run_with_cache(task.tokens)
    v0 = cache[be.hook(be.v_hook, 0)].double()                                  # [b, k, kv, d]
    run = cached_run(llama_bridge, task, layers=[0], dtype=torch.float64, keep=("values",))
    for h in range(be.n_heads):
        torch.testing.assert_close(run.values[0][:, :, h], v0[:, :, be.kv_head_of[h]], rtol=0, atol=0)
    # another map (as a probe could measure on another model) moves the values with it
    perm = tuple((g + 1) % be.n_kv_heads for g in be.kv_head_of)
    other = type(be).__new__(type(be))
    other.__dict__.update(be.__dict__, kv_head_of=perm)
    run2 = cached_run(llama_bridge, task, layers=[0], dtype=torch.float64, keep=("values",), backend=other)
    for h in range(be.n_heads):
        torch.testing.assert_close(run2.values[0][:, :, h], v0[:, :, perm[h]], rtol=0, atol=0)
    with pytest.raises(ValueError, match="does not map"):
        expand_kv(v0, be.n_heads, (0,) * (be.n_heads - 1))


def test_n_underflow_counts_clamped_pattern_entries():
    model = make_native_bridge(seed=3)
    be = probe(model)
    assert be.score_site == "pattern"
    task = _task(n=10)

    def zero_key1(p, hook):           # key 1 underflows to exactly 0 for queries >= 2 (rows renormalised)
        p = p.clone()
        p[:, :, 2:, 1] = 0.0
        return p / p.sum(-1, keepdim=True)
    for l in range(be.n_layers):
        model.add_hook(be.hook(be.pattern_hook, l), zero_key1)
    try:
        res = analyze_self_repair(model, task, k=2, min_contribution=0.0, select="abs", progress=False)
    finally:
        model.reset_hooks()
    # by hand: per layer, head and prompt, one entry at every query row >= 2 (key 1 is a real token in every
    # prompt; the key mask is causal & real keys, so padded query rows count too)
    n = task.tokens.shape[1]
    expected = be.n_layers * be.n_heads * len(task) * (n - 2)
    assert res.meta["n_underflow"] == expected > 0
    assert res.meta["streamed_batches"] == 0                 # pattern site: today's path


def test_n_underflow_in_the_cli_summary():
    from selfrepair.study.cli import underflow_line

    assert underflow_line({"n_underflow": 0}) is None
    assert "12 attention-pattern entries" in underflow_line({"n_underflow": 12, "score_site": "pattern"})


def test_select_keys_equals_stable_sort_with_ties():
    g = torch.Generator().manual_seed(0)
    w = torch.randint(-3, 4, (2, 3, 7, 9), generator=g).float()                # integers: many exact ties
    keys_ok = torch.rand(2, 7, 9, generator=g) > 0.2
    row_ok = torch.ones(2, 3, 7, dtype=torch.bool)
    for select in ("positive", "abs"):
        for k in (2, 3, 4):
            idx, keys = select_keys(w, keys_ok, row_ok, k=k, min_contribution=0.5, select=select)
            key = (w if select == "positive" else w.abs()).masked_fill(~keys_ok[:, None], float("-inf"))
            n_ok = 0
            for b in range(2):
                for h in range(3):
                    for q in range(7):
                        row = key[b, h, q].tolist()
                        if sum(x > 0.5 for x in row) < k:
                            continue
                        want = sorted(range(9), key=lambda j: (-row[j], j))[:k]      # largest first, lower position
                        assert idx[n_ok].tolist() == [b, h, q]
                        assert keys[n_ok].tolist() == want
                        n_ok += 1
            assert n_ok == len(idx) > 0


def test_wrong_own_forward_is_caught_first_and_by_the_spot_check(monkeypatch):
    model = make_gpt2_bridge(seed=5)
    task = _task(n_prompts=20, n=10)
    edits_mod._VERIFIED.pop(model, None)
    first = prepare_clean(model, task, path="fast")
    assert first.check_mode == "full" and first.check_prompts == len(task)
    again = prepare_clean(model, task, path="fast")
    assert again.check_mode == "spot" and 1 <= again.check_prompts <= 2       # 1/16 of 20 prompts, rounded up
    # the weights change: a full check again
    with torch.no_grad():
        next(model.parameters()).mul_(1.0)
    assert prepare_clean(model, task, path="fast").check_mode == "full"

    orig = FastModel.mlp

    def wrong_mlp(self, l, x):                                                 # a deliberately wrong forward
        return orig(self, l, x) * 1.01
    monkeypatch.setattr(FastModel, "mlp", wrong_mlp)
    # verified before: the spot check catches it
    with pytest.raises(ValueError, match="spot check"):
        prepare_clean(model, task, path="fast")
    # and a fresh model is caught by the full check; path="auto" falls back to the hooks
    fresh = make_gpt2_bridge(seed=6)
    with pytest.raises(ValueError, match="full check"):
        prepare_clean(fresh, task, path="fast")
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        assert prepare_clean(fresh, task).path == "hooks"


def test_length_beyond_context_is_refused_before_any_work(gpt2_bridge, monkeypatch):
    n_ctx = int(gpt2_bridge.cfg.n_ctx)
    task = Task(torch.randint(3, 100, (1, n_ctx + 1)), torch.tensor([5]), torch.tensor([6]))

    def no_work(*a, **k):
        raise AssertionError("work started before the length check")
    monkeypatch.setattr(sr_mod, "resolve_backend", no_work)
    monkeypatch.setattr(sr_mod, "streamed_run", no_work)
    monkeypatch.setattr(sr_mod, "cached_run", no_work)
    with pytest.raises(ValueError, match=str(n_ctx)):
        analyze_self_repair(gpt2_bridge, task, progress=False)
