"""faithfulness(protocol=...) against brute-force loops: one prompt, one replaced row, one forward at a time."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from selfrepair.analysis import faithfulness
from selfrepair.analysis.faithfulness import PROTOCOL_BINS, eligible_tokens
from selfrepair.tasks import Task, bos_id

BASE = 11


def small_task(model, b=4, n=12, seed=0):
    """BOS first, right padding on two prompts, a metric position before the last real token on one."""
    g = torch.Generator().manual_seed(seed)
    V = int(model.cfg.d_vocab)
    toks = torch.randint(3, V, (b, n), generator=g)
    toks[:, 0] = bos_id(model)
    mask = torch.ones_like(toks)
    mask[1, n - 3:] = 0
    mask[b - 1, n - 4:] = 0
    toks = toks.masked_fill(mask == 0, 0)
    pos = mask.sum(1) - 1
    pos[2] = n - 4                      # a custom metric position: three real tokens after it
    return Task(toks, torch.randint(3, V, (b,), generator=g), torch.randint(3, V, (b,), generator=g),
                attention_mask=mask, positions=pos)


def m_of(model, task, toks, i, metric):
    with torch.no_grad():
        logits = model(toks[None])[0, int(task.positions[i])].double()
    if metric == "default":
        return float(task.metric_fn(logits[None].float(), torch.tensor([i]))[0])
    if metric == "paper":
        return float(logits[int(task.answer_ids[i])])
    return float(torch.softmax(logits, -1)[int(task.answer_ids[i])])


def ranked(att, i, cand):
    return sorted(cand, key=lambda j: (-float(att[i, j]), j))


def replaced(task, i, which):
    t = task.tokens[i].clone()
    for j in which:
        t[j] = BASE
    return t


def test_metric_position_and_later_tokens_are_never_ranked(gpt2_bridge64):
    """12.9: a custom metric position with real tokens after it; the top attributions sit on the metric
    token and on later tokens. Only tokens strictly before the metric position may be replaced."""
    model = gpt2_bridge64
    task = small_task(model)
    att = torch.randn(task.tokens.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    for i in range(len(task)):
        att[i, int(task.positions[i]):] = 1000.0      # metric position and everything after it
    elig = eligible_tokens(model, task)
    for i in range(len(task)):
        assert elig[i].nonzero()[:, 0].tolist() == list(range(1, int(task.positions[i])))
    df = faithfulness(model, task, {"a": att}, baseline_id=BASE, fractions=(0.1,), seeds=(0,), progress=False)
    row = df[(df.method == "a") & (df.q == "10%")].iloc[0]
    comps = []
    for i in range(len(task)):
        cand = list(range(1, int(task.positions[i])))
        top = ranked(att, i, cand)[:1]   # k = ceil(0.1 n) = 1 for these lengths
        comps.append(m_of(model, task, task.tokens[i], i, "default") - m_of(model, task, replaced(task, i, top), i, "default"))
    assert row.comprehensiveness == pytest.approx(np.mean(comps), rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("protocol", ["default", "paper", "eraser"])
def test_protocol_against_brute_force(gpt2_bridge64, protocol):
    model = gpt2_bridge64
    task = small_task(model, b=5, n=14, seed=1)
    att = torch.randn(task.tokens.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    if protocol == "paper":
        # make some prompts "correct": the answer is the model's own top-1 on prompts 0, 2, 3
        with torch.no_grad():
            logits = model(task.tokens)
        top1 = logits[torch.arange(len(task)), task.positions].argmax(-1)
        ans = task.answer_ids.clone()
        ans[[0, 2, 3]] = top1[[0, 2, 3]]
        ans[[1, 4]] = (top1[[1, 4]] + 1) % int(model.cfg.d_vocab)
        task = Task(task.tokens, ans, task.wrong_ids, attention_mask=task.attention_mask, positions=task.positions)
    df = faithfulness(model, task, {"a": att}, protocol=protocol, baseline_id=BASE, seeds=(0,), progress=False)
    bins = PROTOCOL_BINS[protocol]
    keep = [0, 2, 3] if protocol == "paper" else list(range(len(task)))
    comp_q = {q: [] for q in bins}
    suff_q = {q: [] for q in bins}
    comp_cum = []
    for i in keep:
        cand = list(range(1, int(task.positions[i])))
        order = ranked(att, i, cand)
        m0 = m_of(model, task, task.tokens[i], i, protocol)
        for q in bins:
            k = max(1, math.ceil(q * len(cand)))
            comp_q[q].append(m0 - m_of(model, task, replaced(task, i, order[:k]), i, protocol))
            suff_q[q].append(m0 - m_of(model, task, replaced(task, i, order[k:]), i, protocol))
        if protocol == "paper":
            K = max(1, math.ceil(0.5 * len(cand)))
            comp_cum.append(np.mean([m0 - m_of(model, task, replaced(task, i, order[:k]), i, protocol)
                                     for k in range(1, K + 1)]))
    # forwards of batched vs single rows differ by float32 rounding of logits of size ~1 (1e-6 relative)
    tol = dict(rel=1e-5, abs=1e-6 if protocol != "eraser" else 1e-9)
    a = df[df.method == "a"]
    assert set(a.protocol) == {protocol} and (a.n_prompts == len(keep)).all()
    assert set(a.metric) == {{"default": "task metric", "paper": "answer logit", "eraser": "answer probability"}[protocol]}
    assert set(a.bins) == {",".join(f"{100 * q:g}%" for q in bins)}
    for q in bins:
        row = a[a.q == f"{100 * q:g}%"].iloc[0]
        assert row.comprehensiveness == pytest.approx(np.mean(comp_q[q]), **tol)
        assert row.sufficiency == pytest.approx(np.mean(suff_q[q]), **tol)
    aopc = a[a.q == "AOPC"].iloc[0]
    if protocol == "default":
        assert aopc.comprehensiveness == pytest.approx(np.mean([np.mean(comp_q[q]) for q in bins]), **tol)
    elif protocol == "eraser":
        assert aopc.comprehensiveness == pytest.approx(sum(np.mean(comp_q[q]) for q in bins) / (len(bins) + 1), **tol)
        assert aopc.sufficiency == pytest.approx(sum(np.mean(suff_q[q]) for q in bins) / (len(bins) + 1), **tol)
    else:
        assert aopc.comprehensiveness == pytest.approx(np.mean(comp_cum), **tol)
        assert aopc.sufficiency == pytest.approx(np.mean([np.mean(suff_q[q]) for q in bins]), **tol)
        assert (a.n_excluded == 2).all()


def test_unknown_protocol_lists_the_valid_names(gpt2_bridge64):
    task = small_task(gpt2_bridge64)
    with pytest.raises(ValueError, match="valid: 'default', 'paper', 'eraser'"):
        faithfulness(gpt2_bridge64, task, torch.zeros(task.tokens.shape), protocol="deyoung")
    with pytest.raises(ValueError, match="fixes its bins"):
        faithfulness(gpt2_bridge64, task, torch.zeros(task.tokens.shape), protocol="eraser", fractions=(0.1,))
