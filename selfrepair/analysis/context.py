"""Does self-repair change with context length? A sweep of the copy task over window lengths.

``context_sweep(model, lengths, task=...)`` builds, per window length L, a copy task whose prompts are L
tokens long, runs ``analyze_self_repair`` on it and reports per length (docs/quantities.md, "Context
length"): the share of groups self-repairing (r > threshold; Wilson interval with the prompts' design
effect, ``stats.proportion_interval``), the share with ``permutation_p < 0.05`` when the groups table has
``permutation_p``, the median r and the median ``mass_interaction`` (when present) with a cluster-bootstrap
percentile interval over prompts, and the estimates' quality (Spearman of ``grad_estimate`` and
``tsg_estimate`` against the local joint effect, ``stats.spearman_interval``).

Tasks: ``"code-copy"`` (the built-in task at ``seq_len = L``; needs the model's tokenizer) and
``"continuation-copy"`` (``continuation_copy_task``: token-id prompts cut from the model's own greedy
continuations, for models without a tokenizer such as llama2.c checkpoints): the same cut rule as
code-copy, i.e. the metric position's bigram (current token, answer) occurred at least ``min_repeats``
times earlier in the window, the wrong token by ``tasks.builtin.code_copy_wrong``.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import pandas as pd
import torch

from .._devices import model_device
from .._typing import Int, Tensor
from ..models.facts import model_dims
from ..tasks import Task, TaskError
from ..tasks import load as load_task
from ..tasks.builtin import code_copy_wrong
from ..tasks.tokens import bos_id, get_tokenizer, special_ids
from . import stats
from .common import forward_logits
from .records import TableResult
from .self_repair import analyze_self_repair

__all__ = ["context_sweep", "ContextSweep", "continuation_copy_task", "greedy_streams", "SWEEP_TASKS",
           "MIN_LENGTH"]

SWEEP_TASKS = ("code-copy", "continuation-copy")
#: the shortest window a copy task can hold (two earlier repeats of a bigram and the metric token)
MIN_LENGTH = 8


class ContextSweep(TableResult):
    """``context_sweep``: one row per window length and measure (``kind`` ``"share"``, ``"median"`` or
    ``"spearman"``), with ``value``, ``lo``, ``hi`` (95%), ``n`` (groups or pairs), ``n_prompts``."""

    KIND = "context_sweep"


def greedy_streams(model, *, n_streams: int, length: int, seed: int = 0) -> Int[Tensor, "n_streams length"]:
    """``n_streams`` token streams of ``length`` tokens, each ``[BOS, t]`` (t a seeded random non-special
    token) continued greedily by the model; past the model's context each next token is predicted from the
    last ``n_ctx`` tokens (a sliding window), so a window of ``n_ctx`` tokens ending at p is followed by the
    model's own top-1 at p."""
    V, n_ctx = model_dims(model)
    special = set(special_ids(model))
    ok = torch.tensor([i for i in range(V) if i not in special], dtype=torch.long)
    g = torch.Generator().manual_seed(int(seed))
    first = ok[torch.randint(0, len(ok), (n_streams,), generator=g)]
    s = torch.stack([torch.full((n_streams,), bos_id(model), dtype=torch.long), first], 1)
    dev = model_device(model)
    with torch.no_grad():
        while s.shape[1] < length:
            logits = forward_logits(model, s[:, -n_ctx:].to(dev))[:, -1]
            s = torch.cat([s, logits.argmax(-1).cpu()[:, None]], 1)
    return s[:, :length]


def continuation_copy_task(model, *, n: int, seq_len: int, seed: int = 0, min_repeats: int = 2,
                           streams: Optional[Tensor] = None, n_streams: int = 32, stream_len: Optional[int] = None
                           ) -> Task:
    """A copy task of ``seq_len``-token windows cut from the model's greedy continuations (``greedy_streams``,
    ``n_streams`` streams of ``stream_len`` tokens, default ``n_ctx + 64``; or the given ``streams``).

    A window ``s[p - seq_len + 1 .. p]`` is a valid cut when the bigram ``(s[p], s[p + 1])`` occurs at least
    ``min_repeats`` times at ``j`` in ``[p - seq_len + 1, p)`` and the answer ``s[p + 1]`` is not special;
    the metric position is the window's last token, the wrong token ``code_copy_wrong``'s. ``n`` cuts are
    drawn without replacement by a permutation seeded with ``seed``; fewer valid cuts raise ``TaskError``."""
    _, n_ctx = model_dims(model)
    if not MIN_LENGTH <= seq_len <= n_ctx:
        raise TaskError(f"continuation-copy: seq_len={seq_len} must lie in [{MIN_LENGTH}, n_ctx={n_ctx}].")
    if streams is None:
        streams = greedy_streams(model, n_streams=n_streams, length=stream_len or n_ctx + 64, seed=seed)
    special = set(special_ids(model))
    V, _ = model_dims(model)
    cand = []
    for si, s in enumerate(streams):
        N = len(s)
        if N < seq_len + 1:
            continue
        big = s[:-1] * V + s[1:]                                    # bigram id at start j
        P = torch.arange(seq_len - 1, N - 1)
        win = P[:, None] - seq_len + 1 + torch.arange(seq_len - 1)[None]   # j in [p - L + 1, p)
        cnt = (big[win] == big[P][:, None]).sum(1)
        ans = s[P + 1]
        good = (cnt >= min_repeats) & ~torch.isin(ans, torch.tensor(sorted(special), dtype=torch.long))
        cand += [(si, int(p)) for p in P[good]]
    order = torch.randperm(len(cand), generator=torch.Generator().manual_seed(int(seed))).tolist()
    rows, answers, wrongs, where = [], [], [], []
    for c in order:
        si, p = cand[c]
        window = streams[si, p - seq_len + 1: p + 1].tolist()
        answer = int(streams[si, p + 1])
        wrong, _ = code_copy_wrong(window, answer, special)
        if wrong is None:
            continue
        rows.append(window)
        answers.append(answer)
        wrongs.append(wrong)
        where.append((si, p))
        if len(rows) == n:
            break
    if len(rows) < n:
        raise TaskError(f"continuation-copy: only {len(rows)} valid cuts at seq_len={seq_len} in {len(streams)} "
                        f"streams, fewer than n={n}; ask for fewer prompts or more streams.")
    return Task(torch.tensor(rows), torch.tensor(answers), torch.tensor(wrongs), name="continuation-copy",
                meta={"seed": seed, "seq_len": seq_len, "min_repeats": min_repeats, "n_candidates": len(cand),
                      "per_prompt": {"stream": [w[0] for w in where], "end": [w[1] for w in where]}})


def _median_interval(x: np.ndarray, clusters: np.ndarray, *, n_boot: int, seed: int, level: float = 0.95):
    """Median of the finite ``x`` with a cluster-bootstrap percentile interval (clusters resampled with
    replacement, draws as in ``stats.spearman_interval``)."""
    ok = np.isfinite(x)
    x, cl = x[ok], clusters[ok]
    if not len(x):
        return float("nan"), float("nan"), float("nan")
    ids, inv = np.unique(cl, return_inverse=True)
    C = len(ids)
    members = [np.nonzero(inv == c)[0] for c in range(C)]
    draws = np.random.default_rng(seed).integers(0, C, size=(int(n_boot), C))
    boots = np.array([np.median(x[np.concatenate([members[c] for c in d])]) for d in draws])
    lo, hi = np.percentile(boots, [50 * (1 - level), 50 * (1 + level)])
    return float(np.median(x)), float(lo), float(hi)


def _check_lengths(lengths, n_ctx: int) -> list:
    try:
        L = [int(x) for x in lengths]
    except (TypeError, ValueError):
        raise ValueError(f"lengths must be integers (window lengths in tokens); got {lengths!r}.") from None
    if not L:
        raise ValueError("give at least one window length, e.g. lengths=[32, 64, 128].")
    bad = [x for x in L if x > n_ctx]
    if bad:
        raise ValueError(f"window length(s) {bad} exceed the model's context (n_ctx={n_ctx}); use lengths up to "
                         f"{n_ctx}.")
    small = [x for x in L if x < MIN_LENGTH]
    if small:
        raise ValueError(f"window length(s) {small} are below {MIN_LENGTH} tokens, too short for a copy task.")
    return sorted(set(L))


def context_sweep(model, lengths: Sequence[int], *, task: str = "code-copy", n: int = 64, seed: int = 0,
                  n_boot: int = 1000, min_prompts: int = 8, n_streams: int = 8, stream_extra: int = 32,
                  progress: bool = False, **analysis_kw) -> ContextSweep:
    """Self-repair and estimate quality per window length (module docstring).

    ``lengths`` (tokens; each at most the model's ``n_ctx``, checked before any work), ``task``
    (``"code-copy"`` or ``"continuation-copy"``), ``n`` prompts per length (fewer when fewer valid cuts
    exist, halving down to ``min_prompts``; ``n_prompts`` says how many), ``analysis_kw`` passed to
    ``analyze_self_repair`` (``threshold`` default 0.1 included). continuation-copy: ``n_streams`` greedy
    streams of ``max(lengths) + stream_extra`` tokens (the greedy decoding costs one forward per token;
    past ``n_ctx`` each costs a full-context forward). Rows: ``length``, ``kind``, ``measure``,
    ``value``, ``lo``, ``hi``, ``n``, ``n_prompts``, ``n_groups``; ``settings`` keeps the arguments and,
    per length, the prompts used.
    """
    if task not in SWEEP_TASKS:
        raise ValueError(f"unknown sweep task {task!r}; valid: {', '.join(repr(t) for t in SWEEP_TASKS)}.")
    _, n_ctx = model_dims(model)
    L = _check_lengths(lengths, n_ctx)
    if task == "code-copy" and get_tokenizer(model) is None:
        raise ValueError("code-copy needs the model's tokenizer; this model has none: use "
                         "task='continuation-copy' (prompts cut from the model's own greedy continuations).")
    if int(n) < int(min_prompts):
        raise ValueError(f"n={n} is below min_prompts={min_prompts}.")
    threshold = float(analysis_kw.get("threshold", 0.1))
    analysis_kw.setdefault("progress", progress)
    streams = (greedy_streams(model, n_streams=n_streams, length=max(L) + stream_extra, seed=seed)
               if task == "continuation-copy" else None)
    recs, used = [], {}
    for length in L:
        t, k = None, int(n)
        while t is None and k >= int(min_prompts):
            try:
                t = (load_task("code-copy", model, n=k, seq_len=length, seed=seed) if task == "code-copy" else
                     continuation_copy_task(model, n=k, seq_len=length, seed=seed, streams=streams))
            except TaskError:
                k //= 2
        if t is None:
            recs.append(dict(length=length, kind="share", measure="skipped: too few valid cuts", value=np.nan,
                             lo=np.nan, hi=np.nan, n=0, n_prompts=0, n_groups=0))
            continue
        used[length] = len(t)
        g = analyze_self_repair(model, t, **analysis_kw).groups
        pr = g["prompt"].to_numpy()
        r = g["interaction"].to_numpy(dtype=np.float64)
        base = dict(length=length, n_prompts=len(t), n_groups=len(g))

        def share(name, flags):
            s, lo, hi, nn, _ = stats.proportion_interval(flags, pr)
            recs.append(dict(kind="share", measure=name, value=s, lo=lo, hi=hi, n=nn, **base))

        share(f"self-repairing (r > {threshold:g})", np.where(np.isfinite(r), r > threshold, np.nan))
        if "permutation_p" in g.columns:
            pp = g["permutation_p"].to_numpy(dtype=np.float64)
            share("permutation_p < 0.05", np.where(np.isfinite(pp), pp < 0.05, np.nan))
        for col, name in (("interaction", "median r"), ("mass_interaction", "median mass_interaction")):
            if col in g.columns:
                x = g[col].to_numpy(dtype=np.float64)
                m, lo, hi = _median_interval(x, pr, n_boot=n_boot, seed=seed)
                recs.append(dict(kind="median", measure=name, value=m, lo=lo, hi=hi, n=int(np.isfinite(x).sum()),
                                 **base))
        for est in ("grad_estimate", "tsg_estimate"):
            x, y = g[est].to_numpy(dtype=np.float64), g["effect_joint"].to_numpy(dtype=np.float64)
            rho, lo, hi = stats.spearman_interval(x, y, pr, n_boot=n_boot, seed=seed)
            recs.append(dict(kind="spearman", measure=est, value=rho, lo=lo, hi=hi,
                             n=int((np.isfinite(x) & np.isfinite(y)).sum()), **base))
    cols = ["length", "kind", "measure", "value", "lo", "hi", "n", "n_prompts", "n_groups"]
    table = pd.DataFrame(recs, columns=cols)
    settings = dict(lengths=L, task=task, n=int(n), seed=int(seed), n_boot=int(n_boot), threshold=threshold,
                    prompts_per_length={str(k): v for k, v in used.items()},
                    analysis={k: v for k, v in analysis_kw.items() if k != "progress" and not callable(v)})
    return ContextSweep(table, settings=settings)
