"""Faithfulness of token rankings: comprehensiveness and sufficiency against random rankings."""

from __future__ import annotations

import math
from typing import Dict, Mapping, Optional, Sequence, Union

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from .._typing import Bool, Tensor
from ..tasks import Task, bos_id, validate_task
from .common import baseline_token, forward_logits
from .records import Faithfulness

__all__ = ["faithfulness", "eligible_tokens", "FAITHFULNESS_FRACTIONS", "RANDOM_SEEDS", "PROTOCOLS", "PROTOCOL_BINS"]


FAITHFULNESS_FRACTIONS = (0.1, 0.2, 0.5)
RANDOM_SEEDS = (0, 1, 2, 3, 4)
PROTOCOLS = ("default", "paper", "eraser")
#: the fractions of eligible tokens each protocol uses (``"default"``: ``fractions=``, default 10/20/50%)
PROTOCOL_BINS = {"default": FAITHFULNESS_FRACTIONS, "paper": (0.01, 0.05, 0.1, 0.2, 0.5),
                 "eraser": (0.01, 0.05, 0.1, 0.2, 0.5)}
_METRICS = {"default": "task metric", "paper": "answer logit", "eraser": "answer probability"}
_AOPC = {"default": "mean over bins",
         "paper": "comprehensiveness: mean over k = 1 .. ceil(50% of eligible) cumulative top-k replacements; "
                  "sufficiency: mean over bins",
         "eraser": "sum over bins / (number of bins + 1)"}
#: the paper protocol's cumulative comprehensiveness goes up to this fraction of the eligible tokens
PAPER_MAX_FRACTION = 0.5


def eligible_tokens(model, task: Task, exclude_bos: Optional[bool] = None) -> Bool[Tensor, "batch pos"]:
    """Tokens that may be ranked and replaced: real tokens strictly before the prompt's metric position,
    without padding and without a leading BOS (``exclude_bos=None`` detects it as
    ``tokens[:, 0] == bos_id(model)``; True / False force it)."""
    elig = task.attention_mask.bool().clone()
    B, P = elig.shape
    elig &= torch.arange(P)[None, :] < task.positions[:, None].cpu()
    bos = bos_id(model)
    if exclude_bos is None:
        elig[:, 0] &= task.tokens[:, 0] != bos
    elif exclude_bos:
        elig[:, 0] = False
    return elig


def _metric_fn(task: Task, protocol: str):
    """``fn(logits_row [R, V], prompt idx [R]) -> [R]``: the metric each protocol measures."""
    if protocol == "default":
        return task.metric_fn

    def answer(logits, idx):
        ans = task.answer_ids[idx].to(logits.device)
        vals = logits.float() if protocol == "paper" else torch.softmax(logits.double(), -1)
        return vals.gather(1, ans[:, None])[:, 0]

    return answer


def _metric_of(model, task: Task, tokens: Tensor, rows: Tensor, batch_size: Optional[int], metric,
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
            out.append(metric(logits[r, task.positions[idx].to(logits.device)], idx).detach().cpu())
    if not out:
        return torch.zeros(0, dtype=torch.float64)
    return torch.cat(out).to(torch.float64)


def _correct(model, task: Task, batch_size: Optional[int]) -> Tensor:
    """Prompts whose top-1 prediction at the metric position is the answer."""
    top = _metric_of(model, task, task.tokens, torch.arange(len(task)), batch_size,
                     lambda logits, idx: logits.argmax(-1).cpu().double())
    return top.long() == task.answer_ids


def faithfulness(
    model,
    task: Task,
    attributions: Union[Tensor, Mapping[str, Tensor]],
    *,
    protocol: str = "default",
    baseline_id: Optional[int] = None,
    fractions: Optional[Sequence[float]] = None,
    seeds: Sequence[int] = RANDOM_SEEDS,
    exclude_bos: Optional[bool] = None,
    batch_size: Optional[int] = None,
    progress: bool = True,
) -> Faithfulness:
    """Comprehensiveness and sufficiency of token rankings (docs/quantities.md, "Attributions" and
    "Faithfulness protocols"; the GIM paper's metrics).

    Per prompt, the eligible tokens (``eligible_tokens``: real tokens strictly before the metric
    position, no padding, no leading BOS; ``exclude_bos=None`` detects it as ``tokens[:, 0] ==
    bos_id(model)``) are ranked by attribution, largest (most positive) first, ties to the lower
    position; for a fraction q the top ``k = max(1, ceil(q * n_eligible))`` are kept or replaced by the
    baseline token:

    - comprehensiveness ``m(x) - m(x with the top k replaced)`` (higher = better),
    - sufficiency ``m(x) - m(x with all other eligible tokens replaced)`` (lower = better).

    ``protocol`` (its ``metric``, ``bins`` and ``aopc`` rule are columns of every row):

    - ``"default"``: m the task's metric, q in ``fractions`` (default 10, 20, 50%), AOPC the mean over q;
    - ``"paper"`` (the GIM authors' code): m the answer logit; only prompts the model gets right
      (top-1 = answer; ``n_prompts`` counts them, ``n_excluded`` the others); comprehensiveness
      replaces the top 1, 2, ..., ``ceil(50% n_eligible)`` tokens cumulatively and its AOPC is the
      mean over those k (per-bin rows read the curve at ``k(q)``); sufficiency keeps the top
      {1, 5, 10, 20, 50}%, AOPC the mean over bins;
    - ``"eraser"`` (DeYoung et al. 2020): m the answer probability, bins {1, 5, 10, 20, 50}%,
      AOPC = sum over bins / (number of bins + 1).

    ``attributions``: one ``[batch, pos]`` tensor or ``{name: tensor}``; a random ranking (mean over
    ``seeds``) is added as ``"random"``. Returns one row per method and q (``"10%"``, ...) plus an
    ``"AOPC"`` row: means over prompts of the raw values (metric units), of the values divided by
    ``|m(x)|`` (``*_rel``), ``k_mean`` (mean tokens per prompt) and ``m_clean_mean``, as a
    :class:`Faithfulness` table (a DataFrame with ``settings``, ``save`` / ``load``).
    ``batch_size``: prompts (token rows) per forward.
    """
    validate_task(task, model)
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; valid: {', '.join(repr(p) for p in PROTOCOLS)}.")
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
    if fractions is not None and protocol != "default":
        raise ValueError(f"the {protocol!r} protocol fixes its bins ({PROTOCOL_BINS[protocol]}); pass fractions= "
                         "only with protocol='default'.")
    fractions = tuple(float(q) for q in (PROTOCOL_BINS[protocol] if fractions is None else fractions))
    if not fractions or any(not 0 < q <= 1 for q in fractions):
        raise ValueError(f"fractions must lie in (0, 1]; got {fractions}.")
    if not seeds:
        raise ValueError("give at least one seed for the random ranking.")
    base = baseline_token(model, baseline_id)
    elig = eligible_tokens(model, task, exclude_bos)
    n_elig = elig.sum(1)
    if (n_elig == 0).any():
        raise ValueError(f"prompt {int((n_elig == 0).nonzero()[0])} has no eligible token (only BOS, padding or "
                         "tokens at / after the metric position).")

    metric = _metric_fn(task, protocol)
    sel = _correct(model, task, batch_size) if protocol == "paper" else torch.ones(B, dtype=torch.bool)
    prompts = sel.nonzero()[:, 0]

    # rankings: method -> list of score tensors (one per seed for random)
    rankings: Dict[str, list] = {name: [a.detach().to(torch.float64).cpu()] for name, a in attributions.items()}
    rankings["random"] = [torch.rand(B, P, generator=torch.Generator().manual_seed(int(s)), dtype=torch.float64)
                          for s in seeds]

    m_clean = _metric_of(model, task, task.tokens, torch.arange(B), batch_size, metric)
    variants, rows, keys = _replaced(task.tokens, rankings, elig, n_elig, fractions, base, prompts,
                                     cumulative=(protocol == "paper"))
    ms = _metric_of(model, task, torch.cat(variants) if variants else task.tokens[:0],
                    torch.cat(rows) if rows else torch.zeros(0, dtype=torch.long), batch_size, metric, progress)
    drops: Dict[tuple, Tensor] = {}
    at = 0
    for key, r in zip(keys, rows):
        d = torch.full((B,), float("nan"), dtype=torch.float64)
        d[r] = m_clean[r] - ms[at:at + len(r)]
        drops[key] = d
        at += len(r)
    recs = _summary(protocol, rankings, fractions, drops, m_clean, n_elig, prompts)
    settings = dict(protocol=protocol, metric=_METRICS[protocol], baseline_id=base, fractions=list(fractions),
                    seeds=list(seeds), exclude_bos=exclude_bos, batch_size=batch_size, methods=list(attributions),
                    n_excluded=int(B - len(prompts)))
    return Faithfulness(pd.DataFrame(recs), settings=settings)


def _k_of(q: float, n_elig: Tensor) -> Tensor:
    return torch.clamp(torch.ceil(q * n_elig.double()).long(), min=1)


def _replaced(tokens: Tensor, rankings: Dict[str, list], elig: Tensor, n_elig: Tensor, fractions, base: int,
              prompts: Tensor, *, cumulative: bool):
    """Every token row to run, for the prompts ``prompts``: per ranking and fraction q the rest replaced
    (sufficiency) and, per q or (``cumulative``) per k = 1 .. ceil(50% n_eligible), the top k replaced
    (comprehensiveness) by the baseline token. Returns the rows, their prompts and their keys
    ``(name, ranking index, kind, step)`` with step the fraction q or the count k."""
    B, P = tokens.shape
    pos = torch.arange(P)
    variants, rows, keys = [], [], []
    if len(prompts) == 0:
        return variants, rows, keys
    k_max = _k_of(PAPER_MAX_FRACTION, n_elig)
    for name, scores in rankings.items():
        for r_i, sc in enumerate(scores):
            sc = sc.masked_fill(~elig, -math.inf)
            # stable descending sort: ties go to the lower position
            order = torch.sort(-sc, dim=1, stable=True).indices
            rank = torch.empty_like(order)
            rank.scatter_(1, order, pos.expand(B, P).clone())

            def add(kind, step, toks, who):
                variants.append(toks[who])
                rows.append(who)
                keys.append((name, r_i, kind, step))

            for q in fractions:
                top = (rank < _k_of(q, n_elig)[:, None]) & elig
                add("suff", q, tokens.masked_fill(elig & ~top, base), prompts)
                if not cumulative:
                    add("comp", q, tokens.masked_fill(top, base), prompts)
            if cumulative:
                for k in range(1, int(k_max[prompts].max()) + 1):
                    who = prompts[k_max[prompts] >= k]
                    add("comp", k, tokens.masked_fill((rank < k) & elig, base), who)
    return variants, rows, keys


def _summary(protocol: str, rankings: Dict[str, list], fractions, drops: dict, m_clean: Tensor, n_elig: Tensor,
             prompts: Tensor) -> list:
    """One record per method and q, plus its AOPC row."""
    absm = m_clean.abs()
    k_max = _k_of(PAPER_MAX_FRACTION, n_elig)
    bins = ",".join(f"{100 * q:g}%" for q in fractions)
    common = dict(protocol=protocol, metric=_METRICS[protocol], bins=bins, aopc=_AOPC[protocol],
                  m_clean_mean=float(m_clean[prompts].mean()) if len(prompts) else float("nan"),
                  n_prompts=int(len(prompts)), n_excluded=int(len(m_clean) - len(prompts)))

    def mean(x):  # over the selected prompts
        return float(x[prompts].mean()) if len(prompts) else float("nan")

    recs = []
    for name, scores in rankings.items():
        R = len(scores)

        def per_prompt(kind, step):  # mean over rankings (seeds), per prompt
            # a variant no selected prompt needed (e.g. "paper" with no correctly predicted prompt) was never
            # run: NaN for every prompt, as the means over the (empty) selection are
            nan = torch.full_like(m_clean, float("nan"))
            return torch.stack([drops.get((name, r_i, kind, step), nan) for r_i in range(R)]).mean(0)

        if protocol == "paper":
            # cumulative curve per prompt: drop at k = 1 .. k_max (NaN beyond a prompt's k_max)
            K = int(k_max[prompts].max()) if len(prompts) else 0
            curve = torch.stack([per_prompt("comp", k) for k in range(1, K + 1)]) if K else torch.zeros(0, len(m_clean))
            comp_aopc = torch.nanmean(curve, 0) if K else torch.full_like(m_clean, float("nan"))
        per_q = []
        for q in fractions:
            k_q = _k_of(q, n_elig)
            suff = per_prompt("suff", q)
            if protocol == "paper":
                comp = torch.full_like(m_clean, float("nan"))
                if len(prompts):
                    comp[prompts] = curve[k_q[prompts] - 1, prompts]
            else:
                comp = per_prompt("comp", q)
            rec = dict(method=name, q=f"{100 * q:g}%", comprehensiveness=mean(comp), sufficiency=mean(suff),
                       comprehensiveness_rel=mean(comp / absm), sufficiency_rel=mean(suff / absm),
                       k_mean=mean(k_q.double()), n_rankings=R, **common)
            per_q.append(rec)
            recs.append(rec)
        cols = ("comprehensiveness", "sufficiency", "comprehensiveness_rel", "sufficiency_rel")
        div = len(fractions) + 1 if protocol == "eraser" else len(fractions)
        aopc = {c: float(np.sum([r[c] for r in per_q]) / div) for c in cols}
        aopc["k_mean"] = float(np.mean([r["k_mean"] for r in per_q]))
        if protocol == "paper":
            aopc.update(comprehensiveness=mean(comp_aopc), comprehensiveness_rel=mean(comp_aopc / absm),
                        k_mean=mean(k_max.double()))
        recs.append(dict(method=name, q="AOPC", **aopc, n_rankings=R, **common))
    return recs
