"""Attributions (SPEC, "Attributions") and how gradient estimates track measured effects.

Sign convention everywhere: an effect or estimate is ``m(clean) - m(changed)``,
positive when the change lowers the metric; a token attribution
``(dm/de) . (e - e_baseline)`` estimates ``m(x) - m(x with that token replaced
by the baseline)``.

- ``explain``: token attributions with plain (``"grad"``) or GIM (``"gim"``) gradients.
- ``head_attributions``: attribution patching per head, plain and GIM, beside
  the measured effect of ablating the head (and the part of it that acts
  through later heads' attention patterns, i.e. their queries and keys).
- ``compare_estimates``: grad / TSG / GIM estimates of a self-repair result
  against its measured global and local joint effects.
- ``faithfulness``: comprehensiveness and sufficiency of token rankings.

Default baseline token (``default_baseline_id``): the tokenizer's single-token
encoding of ``" "`` (a space: the GIM paper's and gim-explain's choice; 221 for
the shipped BPE), else its pad, unk or BOS token; without a tokenizer, token 0
(``<unk>`` in llama2.c / SentencePiece vocabularies such as stories260K).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Dict, Mapping, Optional, Sequence, Union

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from ._typing import Float, Tensor
from ._devices import analysis_dtype as _out_dtype, model_device as _model_device, model_dtype as _model_dtype
from .gim import gim
from .tasks import Task, bos_id, get_tokenizer

__all__ = ["explain", "head_attributions", "compare_estimates", "faithfulness", "default_baseline_id",
           "agreement", "EstimateComparison", "METHODS", "HEAD_ABLATIONS"]

METHODS = ("grad", "gim")
HEAD_ABLATIONS = ("mean", "zero")
FAITHFULNESS_FRACTIONS = (0.1, 0.2, 0.5)
RANDOM_SEEDS = (0, 1, 2, 3, 4)


# ----------------------------------------------------------------------------- small helpers


def _calc_dtype(model) -> torch.dtype:
    """Analysis arithmetic: float64 for float64 models, float32 otherwise."""
    return _out_dtype(_model_dtype(model))


def _check_task(task) -> None:
    if not isinstance(task, Task):
        raise TypeError(f"task must be a selfrepair Task; got {type(task).__name__}. Build one with "
                        "selfrepair.tasks.load(...) or Task(tokens, answer_ids, wrong_ids).")


def _check_method(method: str, gim_options: dict) -> None:
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; valid: {', '.join(METHODS)}.")
    if method == "grad" and gim_options:
        raise ValueError(f"GIM options {sorted(gim_options)} only apply to method='gim'.")


def _logits(model, tokens: Tensor) -> Tensor:
    logits = model(tokens.to(_model_device(model)))
    return logits if logits.dtype in (torch.float32, torch.float64) else logits.float()


def default_baseline_id(model) -> int:
    """The baseline token of ``explain`` / ``faithfulness`` (module docstring)."""
    tok = get_tokenizer(model)
    if tok is not None:
        try:
            ids = list(tok.encode(" ", add_special_tokens=False))
        except Exception:  # a tokenizer that cannot encode text
            ids = []
        if len(ids) == 1:
            return int(ids[0])
        for attr in ("pad_token_id", "unk_token_id", "bos_token_id"):
            v = getattr(tok, attr, None)
            if v is not None:
                return int(v)
    return 0


def _baseline(model, baseline_id: Optional[int]) -> int:
    b = default_baseline_id(model) if baseline_id is None else baseline_id
    d_vocab = int(model.cfg.d_vocab)
    if isinstance(b, bool) or not isinstance(b, (int, np.integer)) or not 0 <= int(b) < d_vocab:
        raise ValueError(f"baseline_id must be a token id in [0, {d_vocab}); got {b!r}.")
    return int(b)


# ----------------------------------------------------------------------------- explain


def _token_embedding(model, token_id: int) -> Tensor:
    """``hook_embed`` output for one token (the token embedding only, no positions)."""
    got = {}

    def save(x, hook):
        got["e"] = x.detach()[0, 0]

    with torch.no_grad(), model.hooks(fwd_hooks=[("hook_embed", save)]):
        model(torch.tensor([[token_id]], device=_model_device(model)))
    if "e" not in got:
        raise RuntimeError("hook_embed did not fire; explain needs the token embedding hook.")
    return got["e"]


def explain(
    model,
    task: Task,
    *,
    method: str = "grad",
    baseline_id: Optional[int] = None,
    batch_size: Optional[int] = None,
    progress: bool = False,
    **gim_options,
) -> Float[Tensor, "batch pos"]:
    """Token attributions ``(dm/de) . (e - e_baseline)`` per prompt and position (SPEC, "Attributions").

    ``e`` is the token embedding (``hook_embed``: no positional embedding);
    ``method="grad"`` uses plain autograd, ``"gim"`` the gradient inside
    ``gim(model, **gim_options)``. ``baseline_id`` defaults to
    ``default_baseline_id(model)``. Padding positions are 0. Returned on the
    CPU in float32 (float64 for float64 models).
    """
    _check_task(task)
    _check_method(method, gim_options)
    base = _baseline(model, baseline_id)
    cd = _calc_dtype(model)
    e_base = _token_embedding(model, base).to(cd)
    out = torch.zeros(task.tokens.shape, dtype=cd)
    for start, sub in tqdm(list(task.batches(batch_size)), disable=not progress, desc="explain"):
        leaf = {}

        def grab(x, hook):
            e = x.detach().requires_grad_(True)
            leaf["e"] = e
            return e

        ctx = gim(model, **gim_options) if method == "gim" else contextlib.nullcontext()
        with torch.enable_grad(), ctx, model.hooks(fwd_hooks=[("hook_embed", grab)]):
            m = sub.metric_from_full_logits(_logits(model, sub.tokens))
            if "e" not in leaf:
                raise RuntimeError("hook_embed did not fire; explain needs the token embedding hook.")
            (grad,) = torch.autograd.grad(m.sum(), leaf["e"], allow_unused=True)
        e = leaf["e"].detach().to(cd)
        grad = torch.zeros_like(e) if grad is None else grad.to(cd)
        att = ((e - e_base) * grad).sum(-1) * sub.attention_mask.to(e.device, cd)
        n = att.shape[1]
        out[start:start + len(sub), :n] = att.cpu()
    return out


# ----------------------------------------------------------------------------- faithfulness


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
            logits = _logits(model, toks[:, :n])
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
    progress: bool = False,
) -> pd.DataFrame:
    """Comprehensiveness and sufficiency of token rankings (SPEC, "Attributions"; the GIM paper's metrics).

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
    by ``|m(x)|`` (``*_rel``), ``k_mean`` (mean tokens per prompt) and ``m_clean_mean``.
    """
    _check_task(task)
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
    base = _baseline(model, baseline_id)
    elig = _eligible(model, task, exclude_bos)
    n_elig = elig.sum(1)
    if (n_elig == 0).any():
        raise ValueError(f"prompt {int((n_elig == 0).nonzero()[0])} has no eligible token (only BOS/padding).")

    # rankings: method -> list of score tensors (one per seed for random)
    rankings: Dict[str, list] = {name: [a.detach().to(torch.float64).cpu()] for name, a in attributions.items()}
    rankings["random"] = [torch.rand(B, P, generator=torch.Generator().manual_seed(int(s)), dtype=torch.float64)
                          for s in seeds]

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
                comp = task.tokens.masked_fill(top, base)
                suff = task.tokens.masked_fill(elig & ~top, base)
                for kind, toks in (("comp", comp), ("suff", suff)):
                    variants.append(toks)
                    rows.append(torch.arange(B))
                    keys.append((name, r_i, q, kind, k))
    m_clean = _metric_of(model, task, task.tokens, torch.arange(B), batch_size)
    ms = _metric_of(model, task, torch.cat(variants), torch.cat(rows), batch_size, progress).view(len(keys), B)

    acc: Dict[tuple, Dict[str, list]] = {}
    for (name, r_i, q, kind, k), mv in zip(keys, ms):
        d = acc.setdefault((name, q), {"comp": [], "suff": [], "k": k})
        d[kind].append(m_clean - mv)
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
    return pd.DataFrame(recs)


# ----------------------------------------------------------------------------- head attributions


def _z_grads(model, task: Task, grad_context, batch_size, backend) -> list:
    """dm/dz per layer [batch, pos, head, d_head] over the whole task (float32 or float64)."""
    from .cache import cached_run

    cd = _calc_dtype(model)
    B, P = task.tokens.shape
    out = None
    for start, sub in task.batches(batch_size):
        run = cached_run(model, sub, grad_context=grad_context, dtype=cd, backend=backend, keep=())
        if out is None:
            H, dh = run.grad_z[0].shape[2:]
            out = [torch.zeros(B, P, H, dh, dtype=cd) for _ in run.layers]
        for l in run.layers:
            g = run.grad_z[l]
            out[l][start:start + len(sub), :g.shape[1]] = g.cpu()
    return out


def _ablated_z(z: Tensor, real: Tensor, ablation: str) -> Tensor:
    """z_ablated [batch, pos, head, d_head]: 0, or the mean over prompts at each position
    (over all real positions of all prompts when the prompts differ in length). ``real``: [batch, pos]."""
    if ablation == "zero":
        return torch.zeros_like(z)
    lengths = real.sum(1)
    if bool((lengths == lengths[0]).all()):
        n = int(lengths[0])
        out = z.clone()
        out[:, :n] = z[:, :n].mean(0, keepdim=True)
        return out
    w = real[:, :, None, None].to(z.dtype)
    mean = (z * w).sum((0, 1)) / w.sum((0, 1))                      # [H, dh]
    return mean.expand_as(z).clone()


def _frozen_qk_effects(model, task, backend, z_abl: Sequence[Tensor], batch_size, progress) -> Tensor:
    """m(clean) - m(head ablated at all positions, later layers' patterns frozen to clean) [batch, L, H]."""
    L, H = backend.n_layers, backend.n_heads
    B = len(task)
    out = torch.zeros(B, L, H, dtype=torch.float64)
    dev = _model_device(model)
    jobs = [(s, sub) for s, sub in task.batches(batch_size)]
    bar = tqdm(total=len(jobs) * L * H, disable=not progress, desc="frozen-QK ablations")
    for start, sub in jobs:
        n = int(sub.positions.max()) + 1
        toks = sub.tokens[:, :n].to(dev)
        pats = {}

        def save(l):
            def fn(x, hook):
                pats[l] = x.detach().clone()
            return fn

        with torch.no_grad(), model.hooks(fwd_hooks=[(backend.hook(backend.pattern_hook, l), save(l))
                                                     for l in range(L)]):
            m0 = sub.metric_from_full_logits(_logits(model, toks)).double().cpu()
        for l in range(L):
            for h in range(H):
                value = z_abl[l][start:start + len(sub), :n, h].to(dev)

                def edit_z(x, hook, h=h, value=value):
                    x = x.clone()
                    x[:, :, h] = value.to(x.dtype)
                    return x

                def freeze(lp):
                    def fn(x, hook):
                        return pats[lp].to(x.dtype)
                    return fn

                hooks = [(backend.hook(backend.z_hook, l), edit_z)]
                hooks += [(backend.hook(backend.pattern_hook, lp), freeze(lp)) for lp in range(l + 1, L)]
                with torch.no_grad(), model.hooks(fwd_hooks=hooks):
                    m1 = sub.metric_from_full_logits(_logits(model, toks)).double().cpu()
                out[start:start + len(sub), l, h] = m0 - m1
                bar.update(1)
    bar.close()
    return out


def head_attributions(
    model,
    task: Task,
    *,
    ablation: str = "mean",
    per_prompt: bool = False,
    frozen_qk: bool = True,
    batch_size: Optional[int] = None,
    progress: bool = False,
    backend=None,
    **gim_options,
) -> pd.DataFrame:
    """Attribution patching per head vs the measured effect of ablating it at all positions.

    Per prompt, layer and head: ``grad_estimate = sum_pos dm/dz . (z - z_ablated)``
    (plain autograd), ``gim_estimate`` (the same with dm/dz from
    ``gim(model, **gim_options)``), and ``measured = m(clean) - m(z -> z_ablated
    at every position)`` (batched forwards, ``ablation.measure_z_edits``).
    ``ablation``: ``"mean"`` (z's mean over the task's prompts at the same
    position; over all real positions when prompts differ in length) or ``"zero"``.

    With ``frozen_qk`` also ``measured_frozen_qk``: the same ablation with every
    later layer's attention pattern frozen to its clean value, so the head acts
    only through values, MLPs and the residual stream; ``via_qk = measured -
    measured_frozen_qk`` is the part that acts through later heads' queries and
    keys (a previous-token head feeding an induction head), ``qk_share = via_qk
    / measured``, ``acts_via_qk = |via_qk| > |measured| / 2``.

    Returns one row per (layer, head) with means over prompts and ranks by
    ``|value|`` (1 = largest) of ``measured``, ``grad_estimate`` and
    ``gim_estimate``, plus ``grad_ratio`` / ``gim_ratio`` (estimate / measured);
    ``per_prompt=True`` returns one row per (prompt, layer, head) instead, without ranks.
    """
    from .ablation import measure_z_edits, prepare_clean, replace_z
    from .cache import _get_backend

    _check_task(task)
    if ablation not in HEAD_ABLATIONS:
        raise ValueError(f"unknown head ablation {ablation!r}; valid: {', '.join(HEAD_ABLATIONS)}.")
    backend = _get_backend(model, backend)
    L, H = backend.n_layers, backend.n_heads
    B, P = task.tokens.shape
    cd = _calc_dtype(model)

    clean = prepare_clean(model, task)
    z = [zl.detach().to(cd).cpu() for zl in clean.z]                          # L x [B, Pz, H, dh]
    Pz = z[0].shape[1]
    real = task.attention_mask.bool()[:, :Pz]
    z_abl = [_ablated_z(zl, real, ablation) for zl in z]

    g_plain = _z_grads(model, task, None, batch_size, backend)
    g_gim = _z_grads(model, task, lambda: gim(model, backend=backend, **gim_options), batch_size, backend)

    def estimate(g):
        est = torch.zeros(B, L, H, dtype=torch.float64)
        for l in range(L):
            d = (z[l] - z_abl[l]) * real[:, :, None, None]
            est[:, l] = (g[l][:, :Pz].to(cd) * d).sum((1, 3)).double()
        return est

    est_grad, est_gim = estimate(g_plain), estimate(g_gim)

    prompt_i, layer_i, head_i = torch.meshgrid(torch.arange(B), torch.arange(L), torch.arange(H), indexing="ij")
    prompt_i, layer_i, head_i = prompt_i.reshape(-1), layer_i.reshape(-1), head_i.reshape(-1)
    zs, zas = torch.stack(z), torch.stack(z_abl)                             # [L, B, Pz, H, dh]
    # the ablated value at real positions, the clean one (delta 0) at padding
    value = torch.where(real[prompt_i][:, :, None], zas[layer_i, prompt_i, :, head_i], zs[layer_i, prompt_i, :, head_i])
    edits = replace_z(clean, prompt_i, layer_i, head_i, torch.zeros_like(prompt_i), value.to(clean.z[0].dtype))
    measured = measure_z_edits(model, task, edits, batch_size=batch_size, progress=progress, clean=clean)
    measured = measured.double().view(B, L, H)

    df = pd.DataFrame(dict(prompt=prompt_i.numpy(), layer=layer_i.numpy(), head=head_i.numpy(),
                           measured=measured.reshape(-1).numpy(), grad_estimate=est_grad.reshape(-1).numpy(),
                           gim_estimate=est_gim.reshape(-1).numpy()))
    if frozen_qk:
        frozen = _frozen_qk_effects(model, task, backend, z_abl, batch_size, progress)
        df["measured_frozen_qk"] = frozen.reshape(-1).numpy()
        df["via_qk"] = df["measured"] - df["measured_frozen_qk"]
    if per_prompt:
        return df
    agg = df.drop(columns="prompt").groupby(["layer", "head"], as_index=False).mean()
    agg["n_prompts"] = B
    tiny = agg["measured"].abs() < 1e-12
    if frozen_qk:
        agg["qk_share"] = (agg["via_qk"] / agg["measured"]).where(~tiny)
        agg["acts_via_qk"] = agg["via_qk"].abs() > 0.5 * agg["measured"].abs()
    agg["grad_ratio"] = (agg["grad_estimate"] / agg["measured"]).where(~tiny)
    agg["gim_ratio"] = (agg["gim_estimate"] / agg["measured"]).where(~tiny)
    for col, rk in (("measured", "rank_measured"), ("grad_estimate", "rank_grad"), ("gim_estimate", "rank_gim")):
        agg[rk] = agg[col].abs().rank(ascending=False, method="min").astype(int)
    return agg


# ----------------------------------------------------------------------------- compare estimates

ESTIMATES = ("grad_estimate", "tsg_estimate", "gim_estimate")
TRUTHS = {"global": "global_effect_joint", "local": "effect_joint"}
SUBSETS = ("all", "self_repairing", "not_self_repairing")


@dataclass
class EstimateComparison:
    """Result of ``compare_estimates``.

    ``groups``: a copy of ``result.groups`` plus ``gim_estimate``; ``report``: one
    row per (estimate, effect, subset) with the agreement statistics; ``notes``:
    what could not be compared and why (e.g. no global effects in the result).
    """

    groups: pd.DataFrame
    report: pd.DataFrame
    notes: list


def _spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman rank correlation: Pearson correlation of average ranks (ties share their mean rank)."""
    if len(x) < 2:
        return float("nan")
    rx = pd.Series(x).rank(method="average").to_numpy()
    ry = pd.Series(y).rank(method="average").to_numpy()
    return _pearson(rx, ry)


def _pearson(x: np.ndarray, y: np.ndarray) -> float:
    if len(x) < 2:
        return float("nan")
    x, y = x - x.mean(), y - y.mean()
    den = math.sqrt(float((x * x).sum()) * float((y * y).sum()))
    return float((x * y).sum()) / den if den > 0 else float("nan")


def agreement(estimate, effect, *, top_frac: float = 0.1) -> dict:
    """How an (uncalibrated) estimate tracks a measured effect, rows where both are finite.

    ``spearman``; ``sign_agreement`` (share of rows with a non-zero effect whose
    estimate has the same sign); ``topk_overlap`` (share of the ``k = max(1,
    ceil(top_frac * n))`` rows of largest ``|effect|`` that are also among the k
    of largest ``|estimate|``); ``pearson``; ``ls_slope_origin`` (least-squares
    slope of effect on estimate through the origin, ``sum(xy) / sum(x^2)``, the
    fitted scale) and ``r2_origin`` (the fraction of ``sum(effect^2)`` it explains).
    """
    x = np.asarray(estimate, dtype=np.float64)
    y = np.asarray(effect, dtype=np.float64)
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    n = len(x)
    out = dict(n=n, spearman=float("nan"), sign_agreement=float("nan"), topk=0, topk_overlap=float("nan"),
               pearson=float("nan"), ls_slope_origin=float("nan"), r2_origin=float("nan"))
    if n == 0:
        return out
    nz = y != 0
    k = max(1, math.ceil(top_frac * n))
    top_y = set(np.argsort(-np.abs(y), kind="stable")[:k].tolist())
    top_x = set(np.argsort(-np.abs(x), kind="stable")[:k].tolist())
    sxx, syy = float((x * x).sum()), float((y * y).sum())
    slope = float((x * y).sum()) / sxx if sxx > 0 else float("nan")
    out.update(spearman=_spearman(x, y),
               sign_agreement=float((np.sign(x[nz]) == np.sign(y[nz])).mean()) if nz.any() else float("nan"),
               topk=k, topk_overlap=len(top_x & top_y) / k, pearson=_pearson(x, y), ls_slope_origin=slope,
               r2_origin=(1.0 - float(((y - slope * x) ** 2).sum()) / syy) if (syy > 0 and sxx > 0) else float("nan"))
    return out


def _gim_estimates(model, task: Task, groups: pd.DataFrame, settings: dict, gim_options: dict,
                   progress: bool) -> np.ndarray:
    """TSG estimate of each group's joint score ablation with g = dm/dz from a GIM backward pass."""
    from .cache import _get_backend, cached_run
    from .self_repair import _row_effects

    backend = _get_backend(model, None)
    layers = tuple(int(l) for l in settings.get("layers", range(backend.n_layers)))
    T = float(settings.get("temperature", 2.0))
    opts = dict(gim_options)
    opts.setdefault("temperature", T)
    dtype = getattr(torch, str(settings.get("dtype", "float32")))
    out = np.full(len(groups), np.nan)
    if settings.get("ablation", "mean") != "mean" or len(groups) == 0:
        return out  # estimates are defined for finite (mean) ablations only
    f64 = torch.float64
    bs = settings.get("batch_size") or None
    for start, sub in tqdm(list(task.batches(bs)), disable=not progress, desc="GIM estimates"):
        rows = np.nonzero((groups["prompt"].to_numpy() >= start)
                          & (groups["prompt"].to_numpy() < start + len(sub)))[0]
        if len(rows) == 0:
            continue
        run = cached_run(model, sub, layers=layers, dtype=dtype, backend=backend, keep=("scores", "values"),
                         grad_context=lambda: gim(model, backend=backend, **opts))
        mean_mask = run.mask.clone()
        if settings.get("exclude_bos", False):
            mean_mask[:, :, 0] = False
        g_rows = groups.iloc[rows]
        for l in sorted(set(g_rows["layer"].tolist())):
            sel = rows[(g_rows["layer"] == l).to_numpy()]
            gr = groups.iloc[sel]
            bi = gr["prompt"].to_numpy(dtype=np.int64) - start
            qi = gr["query"].to_numpy(dtype=np.int64)
            a, v, g, mask = run.rows(bi, l, gr["head"].to_numpy(dtype=np.int64), qi)   # [R, n], [R, n, d], [R, d]
            keys = torch.as_tensor(np.array([list(k) for k in gr["keys"]], dtype=np.int64), device=a.device)
            c = torch.einsum("rnd,rd->rn", v.to(f64), g.to(f64))
            mm = mean_mask[torch.tensor(bi, device=a.device), torch.tensor(qi, device=a.device)]
            o = _row_effects(a.to(f64), mask, c, keys, mm, ablation="mean", value_ablation="zero", temperature=T)
            out[sel] = o["tsg_estimate"].cpu().numpy()
    return out


def compare_estimates(model, task: Task, result, *, top_frac: float = 0.1, progress: bool = False,
                      **gim_options) -> EstimateComparison:
    """Add ``gim_estimate`` to a self-repair result and report how the estimates track measured effects.

    ``gim_estimate`` is the TSG estimate of each group's joint score ablation
    (SPEC, "Gradient estimates") with ``g`` from a GIM backward pass
    (``gim(model, **gim_options)``; its temperature defaults to the result's),
    same groups, keys, ablation and temperature as ``result``.

    ``report``: for each estimate (``grad_estimate``, ``tsg_estimate``,
    ``gim_estimate``), each effect (``"global"`` = ``global_effect_joint``, the
    real forward pass; ``"local"`` = ``effect_joint``, the softmax part alone)
    and each subset (``"all"``, ``"self_repairing"`` = ``self_repair``,
    ``"not_self_repairing"`` = a defined ratio not above the threshold) the
    statistics of ``agreement`` (Spearman, sign agreement and top-k overlap
    first; Pearson and the least-squares slope through the origin after).
    Without global effects in the result the "global" rows are left out and
    ``notes`` says so; under ``"knockout"`` every estimate is NaN (``n = 0``).
    """
    from .self_repair import SelfRepairResult, model_hash, task_hash

    _check_task(task)
    if not isinstance(result, SelfRepairResult):
        raise TypeError(f"result must be a SelfRepairResult from analyze_self_repair; got {type(result).__name__}.")
    meta = result.meta or {}
    if meta.get("task_hash") not in (None, task_hash(task)):
        raise ValueError("result was computed on a different task (task hash differs); pass the same task.")
    if meta.get("model_hash") not in (None, model_hash(model)):
        raise ValueError("result was computed with a different model (weights hash differs); pass the same model.")
    if not 0 < top_frac <= 1:
        raise ValueError(f"top_frac must lie in (0, 1]; got {top_frac}.")
    groups = result.groups.copy()
    notes = []
    groups["gim_estimate"] = _gim_estimates(model, task, groups, result.settings, gim_options, progress)
    if result.settings.get("ablation", "mean") != "mean":
        notes.append(f"ablation={result.settings.get('ablation')!r}: gradient estimates are defined for finite "
                     "(mean) ablations only; every estimate is NaN.")
    truths = dict(TRUTHS)
    if "global_effect_joint" not in groups.columns:
        truths.pop("global")
        notes.append("no global effects in the result (run analyze_self_repair(..., global_effects=True)); "
                     "only local effects are compared.")
    sr = groups["self_repair"].to_numpy(dtype=bool)
    defined = groups["interaction"].notna().to_numpy()
    subsets = {"all": np.ones(len(groups), dtype=bool), "self_repairing": sr, "not_self_repairing": defined & ~sr}
    recs = []
    for est in ESTIMATES:
        for tname, tcol in truths.items():
            for sname in SUBSETS:
                m = subsets[sname]
                recs.append(dict(estimate=est, effect=tname, subset=sname,
                                 **agreement(groups[est].to_numpy()[m], groups[tcol].to_numpy()[m], top_frac=top_frac)))
    return EstimateComparison(groups=groups, report=pd.DataFrame(recs), notes=notes)
