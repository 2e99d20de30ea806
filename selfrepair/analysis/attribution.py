"""Token and head attributions (docs/quantities.md, "Attributions").

Sign convention everywhere: an effect or estimate is ``m(clean) - m(changed)``,
positive when the change lowers the metric; a token attribution
``(dm/de) . (e - e_baseline)`` estimates ``m(x) - m(x with that token replaced
by the baseline)`` (the baseline token: ``analysis.common.default_baseline_id``).

- ``explain``: token attributions with plain (``"grad"``) or GIM (``"gim"``) gradients
  -> ``TokenAttributions``; ``token_attribution_table`` lays them out per token.
- ``head_attributions``: attribution patching per head, plain and GIM, beside
  the measured effect of ablating the head (and the part of it that acts
  through later heads' attention patterns, i.e. their queries and keys)
  -> ``HeadAttributions``.

``compare_estimates`` (``analysis.estimates``) and ``faithfulness`` (``analysis.faithfulness``)
build on these.
"""

from __future__ import annotations

import contextlib
from typing import Any, Mapping, Optional, Sequence

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from .._devices import computing_in_float32, model_device as _model_device
from .._typing import Tensor
from .._deprecation import renamed_keyword
from ..engine.cache import cached_run
from ..engine.edits import measure_z_edits, prepare_clean, replace_z
from ..models.probe import resolve_backend
from ..tasks import Task, validate_task
from ..tasks.tokens import token_text
from .common import baseline_token, calc_dtype, check_method, forward_logits
from .gim import gim
from .records import HeadAttributions, TokenAttributions

__all__ = ["explain", "head_attributions", "token_attribution_table", "HEAD_ABLATIONS"]

HEAD_ABLATIONS = ("mean", "zero")


# ----------------------------------------------------------------------------- small helpers


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
    progress: bool = True,
    **gim_options,
) -> TokenAttributions:
    """Token attributions ``(dm/de) . (e - e_baseline)`` per prompt and position (docs/quantities.md, "Attributions").

    ``e`` is the token embedding (``hook_embed``: no positional embedding);
    ``method="grad"`` uses plain autograd, ``"gim"`` the gradient inside
    ``gim(model, **gim_options)``. ``baseline_id`` defaults to
    ``default_baseline_id(model)``. Padding positions are 0. Returns a
    :class:`TokenAttributions`: the ``[batch, pos]`` tensor (on the CPU, float32;
    float64 for float64 models) with ``settings``, ``to_frame()``, ``save`` / ``load``.
    ``batch_size``: prompts per forward.
    """
    validate_task(task, model)
    check_method(method, gim_options)
    base = baseline_token(model, baseline_id)
    cd = calc_dtype(model)
    e_base = _token_embedding(model, base).to(cd)
    out = torch.zeros(task.tokens.shape, dtype=cd)
    for start, sub in tqdm(list(task.batches(batch_size)), disable=not progress, desc="explain"):
        leaf = {}

        def grab(x, hook):
            e = x.detach().requires_grad_(True)
            leaf["e"] = e
            return e

        ctx = gim(model, **gim_options) if method == "gim" else contextlib.nullcontext()
        # a bf16 / fp16 model: forward and backward in float32 on its own weights (docs/quantities.md,
        # "Reduced precision"), restored bit for bit on exit
        with computing_in_float32(model), torch.enable_grad(), ctx, model.hooks(fwd_hooks=[("hook_embed", grab)]):
            m = sub.metric_from_full_logits(forward_logits(model, sub.tokens))
            if "e" not in leaf:
                raise RuntimeError("hook_embed did not fire; explain needs the token embedding hook.")
            (grad,) = torch.autograd.grad(m.sum(), leaf["e"], allow_unused=True)
        e = leaf["e"].detach().to(cd)
        grad = torch.zeros_like(e) if grad is None else grad.to(cd)
        att = ((e - e_base) * grad).sum(-1) * sub.attention_mask.to(e.device, cd)
        n = att.shape[1]
        out[start:start + len(sub), :n] = att.cpu()
    settings = dict(method=method, baseline_id=base, batch_size=batch_size, gim_options=dict(gim_options))
    return TokenAttributions(out, settings)


# ----------------------------------------------------------------------------- faithfulness


# ----------------------------------------------------------------------------- head attributions


def _z_grads(model, task: Task, grad_context, batch_size, backend) -> list:
    """dm/dz per layer [batch, pos, head, d_head] over the whole task (float32 or float64)."""
    cd = calc_dtype(model)
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
            m0 = sub.metric_from_full_logits(forward_logits(model, toks)).double().cpu()
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
                    m1 = sub.metric_from_full_logits(forward_logits(model, toks)).double().cpu()
                out[start:start + len(sub), l, h] = m0 - m1
                bar.update(1)
    bar.close()
    return out


def head_attributions(
    model,
    task: Task,
    *,
    head_ablation: str = "mean",
    per_prompt: bool = False,
    frozen_qk: bool = True,
    batch_size: Optional[int] = None,
    progress: bool = True,
    backend=None,
    **gim_options,
) -> HeadAttributions:
    """Attribution patching per head vs the measured effect of ablating it at all positions.

    Per prompt, layer and head: ``grad_estimate = sum_pos dm/dz . (z - z_ablated)``
    (plain autograd), ``gim_estimate`` (the same with dm/dz from
    ``gim(model, **gim_options)``), and ``measured = m(clean) - m(z -> z_ablated
    at every position)`` (batched forwards, ``ablation.measure_z_edits``).
    ``head_ablation``: ``"mean"`` (z's mean over the task's prompts at the same
    position; over all real positions when prompts differ in length) or ``"zero"``
    (the old keyword ``ablation=`` still works, with a DeprecationWarning).
    ``batch_size``: prompts per forward (the measured ablations batch their
    edits by memory, as ``measure_z_edits`` does).

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
    The table is a :class:`HeadAttributions` (a DataFrame with ``settings``, ``save`` / ``load``).
    """
    ablation = renamed_keyword({k: gim_options.pop(k) for k in ("ablation",) if k in gim_options}, "ablation",
                               "head_ablation", head_ablation, "head_attributions", default="mean")

    validate_task(task, model)
    if ablation not in HEAD_ABLATIONS:
        raise ValueError(f"unknown head ablation {ablation!r}; valid: {', '.join(HEAD_ABLATIONS)}.")
    backend = resolve_backend(model, backend)
    L, H = backend.n_layers, backend.n_heads
    B, P = task.tokens.shape
    cd = calc_dtype(model)

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
    measured = measure_z_edits(model, task, edits, progress=progress, clean=clean)
    measured = measured.double().view(B, L, H)

    df = pd.DataFrame(dict(prompt=prompt_i.numpy(), layer=layer_i.numpy(), head=head_i.numpy(),
                           measured=measured.reshape(-1).numpy(), grad_estimate=est_grad.reshape(-1).numpy(),
                           gim_estimate=est_gim.reshape(-1).numpy()))
    if frozen_qk:
        frozen = _frozen_qk_effects(model, task, backend, z_abl, batch_size, progress)
        df["measured_frozen_qk"] = frozen.reshape(-1).numpy()
        df["via_qk"] = df["measured"] - df["measured_frozen_qk"]
    settings = dict(head_ablation=ablation, per_prompt=per_prompt, frozen_qk=frozen_qk, batch_size=batch_size,
                    gim_options=dict(gim_options))
    if per_prompt:
        return HeadAttributions(df, settings=settings)
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
    return HeadAttributions(agg, settings=settings)


# ----------------------------------------------------------------------------- compare estimates


def token_attribution_table(model, task, attributions: Mapping[str, Any], prompts: Optional[Sequence[int]] = None) -> pd.DataFrame:
    """Long table of token attributions: ``prompt, position, token, is_metric_position`` and one column per method.

    ``attributions``: ``{"grad": [batch, pos] tensor, "gim": ...}`` as
    :func:`selfrepair.explain` returns them. Padding is dropped; positions after
    the metric position are kept (their attribution is 0 in a causal model).
    """
    prompts = range(len(task)) if prompts is None else prompts
    rows = []
    mats = {k: np.asarray(v.detach().float().cpu() if hasattr(v, "detach") else v, dtype=float)  # tensors, TokenAttributions
            for k, v in attributions.items()}
    for p in prompts:
        n = int(task.lengths[p])
        ids = task.tokens[p, :n].tolist()
        text = token_text(model, ids)
        mpos = int(task.positions[p])
        for j in range(n):
            r = dict(prompt=int(p), position=j, token_id=int(ids[j]), token=text[j], is_metric_position=(j == mpos))
            for k, m in mats.items():
                r[k] = float(m[p, j])
            rows.append(r)
    return pd.DataFrame(rows)
