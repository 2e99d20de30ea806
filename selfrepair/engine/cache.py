"""One cached run: a forward pass (and one backward pass of ``sum_prompts m``) per batch.

Everything the closed-form self-repair analysis needs (docs/quantities.md, "Notation"), per
requested layer ``l``:

- ``scores[l]``  ``a``  [batch, head, q, k]: the pre-softmax scores from the live
  scores site; on backends whose ``score_site == "pattern"`` (TL 4 native
  bridges, where ``hook_attn_scores`` reports the pattern) ``log p``, the
  scores up to a per-row constant, which mean ablation, knockout and the
  gradient estimates all ignore. Masked entries are set to ``-inf`` from the
  EXPLICIT key mask, never detected from fill values (-3.4e38 on HF bridges).
- ``pattern[l]`` ``p``  [batch, head, q, k], as the model computed it.
- ``values[l]``  ``v``  [batch, k, head, d_head], expanded to query heads under
  grouped-query attention: query head ``h`` reads kv head
  ``h // (n_heads // n_kv_heads)`` (HF ``repeat_kv``, TL ``repeat_interleave``).
- ``z[l]`` [batch, q, head, d_head] and ``grad_z[l]`` ``g = dm/dz``
  [batch, q, head, d_head] (plain autograd, or whatever backward pass
  ``grad_context`` installs, e.g. GIM).
- ``metric`` ``m`` [batch] and ``mask`` [batch, q, k] = causal & padding.

All tensors are detached and cast to ``dtype`` (float32 by default) whatever
the model dtype. A bfloat16 / float16 model runs this forward and backward in
float32 (``upcast=True``, the default): its weights are held in float32 for the
duration and cast back on exit, bit for bit (``selfrepair._devices.computing_in_float32``),
so the local effects carry no reduced-precision rounding of activations or
gradients, only that of the weights themselves. The hooks added here are removed
on exit, also on errors; the user's own hooks are left alone.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, Optional, Sequence

import numpy as np
import torch

from .._devices import computing_in_float32, model_device as _model_device, model_dtype as _model_float_dtype
from .._typing import Bool, Float, Int, Tensor
from ..models.probe import resolve_backend
from ..tasks import Task, validate_task


@dataclass
class CachedRun:
    """Activations and gradients of one batch, for the requested layers only."""

    layers: tuple
    score_site: str                                   # "scores" or "pattern" (scores = log p)
    scores: Dict[int, Float[Tensor, "batch head qpos kpos"]]
    pattern: Dict[int, Float[Tensor, "batch head qpos kpos"]]
    values: Dict[int, Float[Tensor, "batch kpos head d_head"]]
    z: Dict[int, Float[Tensor, "batch qpos head d_head"]]
    grad_z: Optional[Dict[int, Float[Tensor, "batch qpos head d_head"]]]
    metric: Float[Tensor, "batch"]
    mask: Bool[Tensor, "batch qpos kpos"]
    lengths: Int[Tensor, "batch"]
    positions: Int[Tensor, "batch"]
    n_heads: int
    n_kv_heads: int
    # unmasked keys whose pattern underflowed to 0 on a "pattern" score site (log p clamped)
    n_underflow: Dict[int, int] = field(default_factory=dict)

    @property
    def batch(self) -> int:
        return int(self.metric.shape[0])

    def rows(self, prompt, layer: int, head, query) -> tuple:
        """The tensors of rows ``(prompt, layer, head, query)`` (prompt indices within this run), shaped for
        ``selfrepair.analysis.local_effects``: ``(scores [R, n], values [R, n, d_head], grad [R, d_head],
        mask [R, n])``. ``layer`` is one int; the others are ints or 1-D integer tensors."""
        if layer not in self.scores or layer not in self.values:
            raise KeyError(f"layer {layer} was not cached with scores and values (cached: {list(self.scores)}).")
        dev = self.metric.device
        b, h, q = (torch.tensor(np.asarray(x), dtype=torch.long, device=dev).reshape(-1) for x in (prompt, head, query))
        scores = self.scores[layer][b, h, q]
        values = self.values[layer][b, :, h]
        grad = self.grad_z[layer][b, q, h] if self.grad_z is not None else None
        return scores, values, grad, self.mask[b, q]


def key_mask(task: Task, n: Optional[int] = None) -> Bool[Tensor, "batch qpos kpos"]:
    """Explicit key mask: key ``j`` visible from query ``i`` iff ``j <= i`` and ``j`` is a real token."""
    n = task.tokens.shape[1] if n is None else n
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    pad = task.attention_mask[:, :n].bool()
    return causal[None] & pad[:, None, :]


def expand_kv(x: Float[Tensor, "batch pos kv_head d_head"], n_heads: int,
              kv_map: Optional[Sequence[int]] = None) -> Float[Tensor, "batch pos head d_head"]:
    """Expand kv heads to query heads: query head ``h`` reads kv head ``kv_map[h]`` (the map the probe measured
    with its z = p @ v check, ``Backend.kv_head``); without a map, ``h // (n_heads // n_kv)``."""
    n_kv = x.shape[2]
    if kv_map is not None:
        kv_map = [int(j) for j in kv_map]
        if len(kv_map) != n_heads or not all(0 <= j < n_kv for j in kv_map):
            raise ValueError(f"kv_map must give one kv head in 0..{n_kv - 1} for each of the {n_heads} query heads; "
                             f"got {kv_map}.")
        if kv_map == list(range(n_heads)):
            return x
        return x[:, :, torch.tensor(kv_map, device=x.device)]
    if n_kv == n_heads:
        return x
    if n_heads % n_kv:
        raise ValueError(f"n_heads={n_heads} is not a multiple of the {n_kv} kv heads in hook_v.")
    return x.repeat_interleave(n_heads // n_kv, dim=2)


def _smallest_positive(dtype: torch.dtype) -> float:
    z = torch.zeros((), dtype=dtype)
    return float(torch.nextafter(z, torch.ones((), dtype=dtype)))


def check_backend(backend) -> None:
    """Raise unless ``backend`` offers a live site for score ablations and a live ``hook_z``."""
    site = getattr(backend, "score_site", None)
    if site not in ("scores", "pattern"):
        raise RuntimeError(
            f"the backend probe found no live attention site (score_site={site!r}); the self-repair "
            "analysis needs a live scores hook or a live hook_pattern. Load the model with "
            "selfrepair.load_model so that its hooks are enabled, or report the model architecture.")
    if site == "scores" and (not backend.scores_hook or not backend.scores_live):
        raise RuntimeError(
            f"the backend reports score_site='scores' but its scores hook {backend.scores_hook!r} is not "
            "live (edits there do not move the output); the analysis cannot read exact scores.")
    if not backend.pattern_hook or not backend.z_hook or not backend.v_hook:
        raise RuntimeError("the backend has no hook_pattern / hook_z / hook_v site; cannot analyse attention.")


def cached_run(
    model,
    task: Task,
    *,
    layers: Optional[Iterable[int]] = None,
    backward: bool = True,
    grad_context: Optional[Callable[[], contextlib.AbstractContextManager]] = None,
    dtype: torch.dtype = torch.float32,
    backend=None,
    keep: Sequence[str] = ("scores", "pattern", "values", "z"),
    upcast: bool = True,
) -> CachedRun:
    """One forward (+ one backward of ``sum over prompts of m``) over ``task``; see the module docstring.

    Call it once per batch (``task.batches``). ``grad_context`` is a zero-arg
    callable returning a context manager entered around forward and backward
    (``lambda: gim(model)`` gives ``g`` from a GIM backward pass). ``keep``
    restricts what is stored (``"scores"``, ``"pattern"``, ``"values"``,
    ``"z"``) to save memory; ``grad_z`` is kept whenever ``backward``.
    ``upcast``: a bfloat16 / float16 model computes this run in float32 (module docstring);
    ``False`` runs it in the model's own dtype.
    """
    backend = resolve_backend(model, backend)
    check_backend(backend)
    n_layers, n_heads = backend.n_layers, backend.n_heads
    layers = tuple(range(n_layers)) if layers is None else tuple(int(l) for l in layers)
    for l in layers:
        if not 0 <= l < n_layers:
            raise ValueError(f"layer {l} out of range: the model has {n_layers} layers (0..{n_layers - 1}).")
    validate_task(task, model)
    n = int(task.lengths.max())
    keep = set(keep)
    unknown = keep - {"scores", "pattern", "values", "z"}
    if unknown:
        raise ValueError(f"unknown entries in keep: {sorted(unknown)}; valid: scores, pattern, values, z.")

    device = _model_device(model)
    tokens = task.tokens[:, :n].to(device)
    mask = key_mask(task, n)                                   # [b, q, k], CPU, explicit
    mask_dev = mask.to(device)
    up = computing_in_float32(model) if upcast else contextlib.nullcontext(_model_float_dtype(model))

    site = backend.score_site
    raw: Dict[str, Dict[int, Tensor]] = {"scores": {}, "pattern": {}, "values": {}}
    z_live: Dict[int, Tensor] = {}
    n_underflow: Dict[int, int] = {}

    def cast(x: Tensor) -> Tensor:
        return x.detach().to(dtype=dtype)

    def save(kind: str, layer: int):
        def fn(x, hook):
            raw[kind][layer] = cast(x)
        return fn

    def save_z(layer: int):
        def fn(x, hook):
            # Return a fresh tensor: on TL 4 bridges the tensor handed to a hook that returns None
            # is a view off the autograd path (its gradient stays None); the returned one is used.
            if backward and not x.requires_grad:
                # nothing upstream requires grad (e.g. frozen parameters): make z a leaf so that
                # dm/dz is still defined; later layers depend on it, so they require grad too
                y = x.detach().clone().requires_grad_(True)
            else:
                y = x.clone()
            z_live[layer] = y
            return y
        return fn

    # the pattern is needed when kept, or to derive the scores on pattern-site backends
    need_pattern = "pattern" in keep or (site == "pattern" and "scores" in keep)
    fwd = []
    for l in layers:
        if site == "scores" and "scores" in keep:
            fwd.append((backend.hook(backend.scores_hook, l), save("scores", l)))
        if need_pattern:
            fwd.append((backend.hook(backend.pattern_hook, l), save("pattern", l)))
        if "values" in keep:
            fwd.append((backend.hook(backend.v_hook, l), save("values", l)))
        fwd.append((backend.hook(backend.z_hook, l), save_z(l)))

    ctx = grad_context() if (grad_context is not None) else contextlib.nullcontext()
    grads = None
    with contextlib.ExitStack() as stack:
        run_dtype = stack.enter_context(up)            # the dtype the forward computes in
        tiny_log = float(torch.log(torch.tensor(_smallest_positive(run_dtype), dtype=torch.float64)))
        stack.enter_context(torch.enable_grad() if backward else torch.no_grad())
        stack.enter_context(ctx)
        stack.enter_context(model.hooks(fwd_hooks=fwd))
        logits = model(tokens)
        missing = [l for l in layers if l not in z_live]
        if missing:
            raise RuntimeError(f"hook_z did not fire at layers {missing}; the backend's z site is not live.")
        if logits.dtype not in (torch.float32, torch.float64):
            logits = logits.float()
        m = task.metric_from_full_logits(logits)
        metric = m.detach()
        if backward:
            if not m.requires_grad:
                raise RuntimeError("the metric does not depend on hook_z through autograd; cannot take dm/dz.")
            grads = torch.autograd.grad(m.sum(), [z_live[l] for l in layers], allow_unused=True)
        del logits, m

    scores, pattern, values, zd, gz = _per_layer(layers, keep, site, need_pattern, raw, z_live, grads, mask_dev,
                                                 tiny_log, n_heads, dtype, n_underflow,
                                                 kv_map=[backend.kv_head(h) for h in range(n_heads)])
    raw.clear()
    z_live.clear()

    return CachedRun(
        layers=layers, score_site=site, scores=scores, pattern=pattern, values=values, z=zd, grad_z=gz,
        metric=metric.to(dtype), mask=mask_dev, lengths=task.lengths.to(device), positions=task.positions.to(device),
        n_heads=n_heads, n_kv_heads=backend.n_kv_heads, n_underflow=n_underflow)


def _per_layer(layers, keep, site, need_pattern, raw, z_live, grads, mask_dev, tiny_log, n_heads, dtype, n_underflow,
               kv_map=None):
    """What the hooks saved, per layer: scores (-inf at masked keys; log p on pattern sites), pattern,
    values expanded to query heads, z and dm/dz, cast to ``dtype``."""
    backward = grads is not None

    def cast(x: Tensor) -> Tensor:
        return x.detach().to(dtype=dtype)

    scores, pattern, values, zd, gz = {}, {}, {}, {}, ({} if backward else None)
    for idx, l in enumerate(layers):
        if site == "scores" and "scores" in keep:
            if l not in raw["scores"]:
                raise RuntimeError(f"the scores hook did not fire at layer {l}.")
            a = raw["scores"][l]
            a = a.masked_fill(~mask_dev[:, None], float("-inf"))
            scores[l] = a
        if need_pattern:
            if l not in raw["pattern"]:
                raise RuntimeError(f"hook_pattern did not fire at layer {l}.")
            p = raw["pattern"][l]
            if site == "pattern" and "scores" in keep:
                unm = mask_dev[:, None].expand_as(p)
                under = unm & (p <= 0)
                n_underflow[l] = int(under.sum())
                a = torch.log(p.clamp_min(0)).masked_fill(under, tiny_log)
                a = a.masked_fill(~unm, float("-inf"))
                scores[l] = a
            if "pattern" in keep:
                pattern[l] = p
        if "values" in keep:
            if l not in raw["values"]:
                raise RuntimeError(f"hook_v did not fire at layer {l}.")
            values[l] = expand_kv(raw["values"][l], n_heads, kv_map)
        if "z" in keep:
            zd[l] = cast(z_live[l])
        if backward:
            g = grads[idx]
            gz[l] = torch.zeros_like(z_live[l], dtype=dtype) if g is None else cast(g)
    return scores, pattern, values, zd, gz
