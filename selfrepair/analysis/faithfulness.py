"""Faithfulness of token rankings: comprehensiveness and sufficiency against random rankings."""

from __future__ import annotations

import math
from typing import Dict, Mapping, Optional, Sequence, Union

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from .._typing import Tensor
from ..tasks import Task, bos_id, validate_task
from .common import baseline_token, forward_logits
from .records import Faithfulness

__all__ = ["faithfulness", "FAITHFULNESS_FRACTIONS", "RANDOM_SEEDS"]


FAITHFULNESS_FRACTIONS = (0.1, 0.2, 0.5)
RANDOM_SEEDS = (0, 1, 2, 3, 4)


def _eligible(model, task: Task, exclude_bos: Optional[bool]) -> Tensor:
    """Real tokens that may be ranked and replaced: padding and a leading BOS excluded."""
    elig = task.attention_mask.bool().clone()
    bos = bos_id(model)
    if exclude_bos is None:
        elig[:, 0] &= task.tokens[:, 0] != bos
    elif exclude_bos:
        elig[:, 0] = False
    return elig


def _metric_of(model, task: Task, tokens: Tensor, rows: Tensor, batch_size: Optional[int],
               progress: bool = False) -> Tensor:
    """m of (modified) token rows in batched forwards; ``rows[r]`` is the task prompt row r belongs to."""
    out = []
    bs = len(task) if not batch_size else int(batch_size)
    with torch.no_grad():
        for s in tqdm(range(0, len(tokens), bs), disable=not progress, desc="faithfulness"):
            idx = rows[s:s + bs]
            toks = tokens[s:s + bs]
            n = int(task.positions[idx].max()) + 1  # later positions cannot change m
            logits = forward_logits(model, toks[:, :n])
            r = torch.arange(len(idx), device=logits.device)
            out.append(task.metric_fn(logits[r, task.positions[idx].to(logits.device)], idx).detach().cpu())
    return torch.cat(out).to(torch.float64)


def faithfulness(
    model,
    task: Task,
    attributions: Union[Tensor, Mapping[str, Tensor]],
    *,
    baseline_id: Optional[int] = None,
    fractions: Sequence[float] = FAITHFULNESS_FRACTIONS,
    seeds: Sequence[int] = RANDOM_SEEDS,
    exclude_bos: Optional[bool] = None,
    batch_size: Optional[int] = None,
    progress: bool = True,
) -> Faithfulness:
    """Comprehensiveness and sufficiency of token rankings (docs/quantities.md, "Attributions"; the GIM paper's metrics).

    Per prompt, the eligible tokens (real tokens; a BOS at position 0 excluded:
    ``exclude_bos=None`` detects it as ``tokens[:, 0] == bos_id(model)``) are
    ranked by attribution, largest (most positive) first, ties to the lower
    position; the top ``k = max(1, ceil(q * n_eligible))`` are kept or replaced
    by the baseline token:

    - comprehensiveness ``m(x) - m(x with the top k replaced)`` (higher = better),
    - sufficiency ``m(x) - m(x with all other eligible tokens replaced)`` (lower = better).

    ``attributions``: one ``[batch, pos]`` tensor or ``{name: tensor}``; a
    random ranking (mean over ``seeds``) is added as ``"random"``. Returns one
    row per method and q (``"10%"``, ...) plus an ``"AOPC"`` row (mean over q):
    means over prompts of the raw values (metric units), of the values divided
    by ``|m(x)|`` (``*_rel``), ``k_mean`` (mean tokens per prompt) and ``m_clean_mean``,
    as a :class:`Faithfulness` table (a DataFrame with ``settings``, ``save`` / ``load``).
    ``batch_size``: prompts (token rows) per forward.
    """
    validate_task(task, model)
    if isinstance(attributions, Tensor):
        attributions = {"attribution": attributions}
    if not isinstance(attributions, Mapping) or not attributions:
        raise TypeError("attributions must be a [batch, pos] tensor or a non-empty {name: tensor} dict.")
    if "random" in attributions:
        raise ValueError("the name 'random' is reserved for the random-ranking floor; rename that attribution.")
    B, P = task.tokens.shape
    for name, a in attributions.items():
        if not isinstance(a, Tensor) or a.shape != (B, P):
            raise ValueError(f"attribution {name!r} must be a tensor of shape {(B, P)} (the task's tokens); "
                             f"got {getattr(a, 'shape', type(a))}.")
    fractions = tuple(float(q) for q in fractions)
    if not fractions or any(not 0 < q <= 1 for q in fractions):
        raise ValueError(f"fractions must lie in (0, 1]; got {fractions}.")
    if not seeds:
        raise ValueError("give at least one seed for the random ranking.")
    base = baseline_token(model, baseline_id)
    elig = _eligible(model, task, exclude_bos)
    n_elig = elig.sum(1)
    if (n_elig == 0).any():
        raise ValueError(f"prompt {int((n_elig == 0).nonzero()[0])} has no eligible token (only BOS/padding).")

    # rankings: method -> list of score tensors (one per seed for random)
    rankings: Dict[str, list] = {name: [a.detach().to(torch.float64).cpu()] for name, a in attributions.items()}
    rankings["random"] = [torch.rand(B, P, generator=torch.Generator().manual_seed(int(s)), dtype=torch.float64)
                          for s in seeds]

    variants, rows, keys = _replaced(task.tokens, rankings, elig, n_elig, fractions, base)
    m_clean = _metric_of(model, task, task.tokens, torch.arange(B), batch_size)
    ms = _metric_of(model, task, torch.cat(variants), torch.cat(rows), batch_size, progress).view(len(keys), B)

    acc: Dict[tuple, Dict[str, list]] = {}
    for (name, r_i, q, kind, k), mv in zip(keys, ms):
        d = acc.setdefault((name, q), {"comp": [], "suff": [], "k": k})
        d[kind].append(m_clean - mv)
    recs = _summary(rankings, fractions, acc, m_clean)
    settings = dict(baseline_id=base, fractions=list(fractions), seeds=list(seeds), exclude_bos=exclude_bos,
                    batch_size=batch_size, methods=list(attributions))
    return Faithfulness(pd.DataFrame(recs), settings=settings)


def _replaced(tokens: Tensor, rankings: Dict[str, list], elig: Tensor, n_elig: Tensor, fractions, base: int):
    """Every token row to run: per ranking and fraction q, the top k replaced (comprehensiveness) and the
    rest replaced (sufficiency) by the baseline token. Returns the rows, their prompts and their keys."""
    B, P = tokens.shape
    pos = torch.arange(P)
    variants, rows, keys = [], [], []
    for name, scores in rankings.items():
        for r_i, sc in enumerate(scores):
            sc = sc.masked_fill(~elig, -math.inf)
            # stable descending sort: ties go to the lower position
            order = torch.sort(-sc, dim=1, stable=True).indices
            rank = torch.empty_like(order)
            rank.scatter_(1, order, pos.expand(B, P).clone())
            for q in fractions:
                k = torch.clamp(torch.ceil(q * n_elig.double()).long(), min=1)
                top = (rank < k[:, None]) & elig
                comp = tokens.masked_fill(top, base)
                suff = tokens.masked_fill(elig & ~top, base)
                for kind, toks in (("comp", comp), ("suff", suff)):
                    variants.append(toks)
                    rows.append(torch.arange(B))
                    keys.append((name, r_i, q, kind, k))
    return variants, rows, keys


def _summary(rankings: Dict[str, list], fractions, acc: dict, m_clean: Tensor) -> list:
    """One record per method and q, plus its AOPC row (means over q)."""
    B = len(m_clean)
    absm = m_clean.abs()
    recs = []
    for name in rankings:
        per_q = []
        for q in fractions:
            d = acc[(name, q)]
            comp = torch.stack(d["comp"]).mean(0)  # mean over seeds (1 for real methods)
            suff = torch.stack(d["suff"]).mean(0)
            rec = dict(method=name, q=f"{round(100 * q)}%", comprehensiveness=float(comp.mean()),
                       sufficiency=float(suff.mean()), comprehensiveness_rel=float((comp / absm).mean()),
                       sufficiency_rel=float((suff / absm).mean()), k_mean=float(d["k"].double().mean()),
                       m_clean_mean=float(m_clean.mean()), n_prompts=B, n_rankings=len(d["comp"]))
            per_q.append(rec)
            recs.append(rec)
        aopc = {c: float(np.mean([r[c] for r in per_q])) for c in
                ("comprehensiveness", "sufficiency", "comprehensiveness_rel", "sufficiency_rel", "k_mean")}
        recs.append(dict(method=name, q="AOPC", **aopc, m_clean_mean=float(m_clean.mean()), n_prompts=B,
                         n_rankings=per_q[0]["n_rankings"]))
    return recs
