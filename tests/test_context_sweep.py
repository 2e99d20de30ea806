"""context_sweep and its continuation-copy task, checked by loops over the streams and by re-running the analysis."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats as st

from selfrepair.analysis import analyze_self_repair
from selfrepair.analysis import context as ctx
from selfrepair.analysis.context import ContextSweep, context_sweep, continuation_copy_task, greedy_streams
from selfrepair.tasks import TaskError


def test_length_above_context_is_refused_before_any_work(gpt2_bridge64, monkeypatch):
    def boom(*a, **k):
        raise AssertionError("work started")

    monkeypatch.setattr(ctx, "greedy_streams", boom)
    monkeypatch.setattr(ctx, "analyze_self_repair", boom)
    n_ctx = int(gpt2_bridge64.cfg.n_ctx)
    with pytest.raises(ValueError, match=rf"exceed the model's context \(n_ctx={n_ctx}\)"):
        context_sweep(gpt2_bridge64, [16, n_ctx + 1], task="continuation-copy")
    with pytest.raises(ValueError, match="valid: 'code-copy', 'continuation-copy'"):
        context_sweep(gpt2_bridge64, [16], task="induction")
    with pytest.raises(ValueError, match="tokenizer"):
        context_sweep(gpt2_bridge64, [16], task="code-copy")


def test_continuation_cuts_by_loop(gpt2_bridge64):
    model = gpt2_bridge64
    g = torch.Generator().manual_seed(0)
    streams = torch.randint(3, 6, (3, 40), generator=g)     # three tokens: many repeated bigrams
    L = 16
    t = continuation_copy_task(model, n=10, seq_len=L, seed=1, streams=streams)
    valid = set()
    for si, s in enumerate(streams.tolist()):
        for p in range(L - 1, len(s) - 1):
            cnt = sum(1 for j in range(p - L + 1, p) if s[j] == s[p] and s[j + 1] == s[p + 1])
            if cnt >= 2:
                valid.add((si, p))
    assert t.meta["n_candidates"] == len(valid)
    for i, (si, p) in enumerate(zip(t.meta["per_prompt"]["stream"], t.meta["per_prompt"]["end"])):
        assert (si, p) in valid
        assert t.tokens[i].tolist() == streams[si, p - L + 1:p + 1].tolist()
        assert int(t.answer_ids[i]) == int(streams[si, p + 1]) and int(t.positions[i]) == L - 1
        assert int(t.wrong_ids[i]) != int(t.answer_ids[i])
    with pytest.raises(TaskError, match="fewer than n="):
        continuation_copy_task(model, n=10 ** 4, seq_len=L, streams=streams)


def test_greedy_streams_are_the_models_top1(gpt2_bridge64):
    s = greedy_streams(gpt2_bridge64, n_streams=2, length=12, seed=3)
    with torch.no_grad():
        logits = gpt2_bridge64(s)
    assert torch.equal(logits[:, 1:-1].argmax(-1), s[:, 2:])


def test_sweep_numbers_from_a_rerun(gpt2_bridge64, tmp_path):
    model = gpt2_bridge64
    kw = dict(min_contribution=0.0)
    res = context_sweep(model, [24, 16], task="continuation-copy", n=8, n_boot=50, **kw)
    tab = res.to_frame()
    assert sorted(set(tab.length)) == [16, 24] and res.settings["lengths"] == [16, 24]
    streams = greedy_streams(model, n_streams=8, length=24 + 32, seed=0)
    for L in (16, 24):
        t = continuation_copy_task(model, n=res.settings["prompts_per_length"][str(L)], seq_len=L, streams=streams)
        g = analyze_self_repair(model, t, progress=False, **kw).groups
        r = g.interaction.to_numpy(float)
        d = tab[tab.length == L]
        share = d[d.kind == "share"].iloc[0]
        assert share.n == np.isfinite(r).sum()
        assert share.value == pytest.approx(np.mean(r[np.isfinite(r)] > 0.1), abs=1e-12)
        assert share.lo <= share.value <= share.hi
        med = d[d.measure == "median r"].iloc[0]
        assert med.value == pytest.approx(np.median(r[np.isfinite(r)]), abs=1e-12)
        rho = d[d.measure == "tsg_estimate"].iloc[0]
        assert rho.value == pytest.approx(st.spearmanr(g.tsg_estimate, g.effect_joint).statistic, abs=1e-12)
    res.save(tmp_path / "s.parquet")
    back = ContextSweep.load(tmp_path / "s.parquet")
    assert back.equals_result(res)


def test_context_figure_has_one_line_per_measure():
    import pandas as pd

    from selfrepair.report.figures import plot_context_sweep

    t = pd.DataFrame(dict(length=[16, 32, 16, 32, 16, 32], kind=["share"] * 2 + ["median"] * 2 + ["spearman"] * 2,
                          measure=["s", "s", "m", "m", "g", "g"], value=[0.5, 0.6, 0.3, 0.4, 0.9, 0.8],
                          lo=[0.4, 0.5, 0.2, 0.3, 0.8, 0.7], hi=[0.6, 0.7, 0.4, 0.5, 1.0, 0.9], n=[5] * 6))
    fig = plot_context_sweep(t)
    assert [tr.name for tr in fig.data] == ["s", "m", "g"]
    assert list(fig.data[1].y) == [0.3, 0.4] and list(fig.data[1].error_y.array) == pytest.approx([0.1, 0.1])
