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
  grouped-query attention: query head ``h`` reads kv head ``backend.kv_head_of[h]``,
  the map the probe measured (``h // (n_heads // n_kv_heads)`` on HF and TL models).
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
import math
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, Optional, Sequence

import numpy as np
import torch

from .._devices import computing_in_float32, model_device as _model_device, model_dtype as _model_float_dtype
from .._typing import Bool, Float, Int, Tensor
from ..models.facts import model_facts
from ..models.probe import resolve_backend
from ..tasks import Task, validate_task
from .forward import FastMismatch, FastModel, fast_support, has_user_forward_hooks, weights_key


@dataclass(kw_only=True)
class BatchRun:
    """What every run of one batch holds, for the requested layers only: the values, ``dm/dz``, the metric, the
    key mask and the prompts' lengths and metric positions (``CachedRun`` adds the cached scores, ``StreamedRun``
    the q and k it recomputes them from); built with keywords."""

    layers: tuple
    values: Dict[int, Float[Tensor, "batch kpos head d_head"]]
    grad_z: Optional[Dict[int, Float[Tensor, "batch qpos head d_head"]]]
    metric: Float[Tensor, "batch"]
    mask: Bool[Tensor, "batch qpos kpos"]
    lengths: Int[Tensor, "batch"]
    positions: Int[Tensor, "batch"]
    n_heads: int
    n_kv_heads: int
    score_site: str = "scores"                        # "scores" or "pattern" (scores = log p)
    # unmasked keys whose pattern underflowed to 0 on a "pattern" score site (log p clamped)
    n_underflow: Dict[int, int] = field(default_factory=dict)

    @property
    def batch(self) -> int:
        return int(self.metric.shape[0])


@dataclass(kw_only=True)
class CachedRun(BatchRun):
    """Activations and gradients of one batch, for the requested layers only (the fields of ``BatchRun`` plus
    the cached scores, pattern and z)."""

    scores: Dict[int, Float[Tensor, "batch head qpos kpos"]]
    pattern: Dict[int, Float[Tensor, "batch head qpos kpos"]]
    z: Dict[int, Float[Tensor, "batch qpos head d_head"]]

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

    def score_blocks(self, layer: int, max_elements: Optional[int] = None):
        """The scores of ``layer`` as ``(q0, q1, scores [batch, head, q1 - q0, keys])`` blocks of queries; a cached
        run holds them whole, so this is one block over every query and key (``StreamedRun`` streams them)."""
        yield 0, int(self.mask.shape[1]), self.scores[layer]


def key_mask(task: Task, n: Optional[int] = None) -> Bool[Tensor, "batch qpos kpos"]:
    """Explicit key mask: key ``j`` visible from query ``i`` iff ``j <= i`` and ``j`` is a real token."""
    n = task.tokens.shape[1] if n is None else n
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    pad = task.attention_mask[:, :n].bool()
    return causal[None] & pad[:, None, :]


def expand_kv(x: Float[Tensor, "batch pos kv_head d_head"], n_heads: int,
              kv_head_of: Optional[Sequence[int]] = None) -> Float[Tensor, "batch pos head d_head"]:
    """Expand kv heads to query heads: query head ``h`` reads kv head ``kv_head_of[h]``, the map the probe
    measured (``Backend.kv_head_of``: ``z_h = p_h @ v[kv_head_of[h]]`` verified on the model); without a map,
    ``h // (n_heads // n_kv)`` (HF ``repeat_kv``, TL ``repeat_interleave``)."""
    n_kv = x.shape[2]
    if kv_head_of is not None and len(kv_head_of):
        idx = [int(g) for g in kv_head_of]
        if len(idx) != n_heads or not all(0 <= g < n_kv for g in idx):
            raise ValueError(f"kv_head_of {tuple(idx)} does not map {n_heads} query heads to the {n_kv} kv heads.")
        if idx == list(range(n_kv)) and n_kv == n_heads:
            return x
        return x[:, :, torch.tensor(idx, device=x.device)]
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
                                                 tiny_log, n_heads, dtype, n_underflow, backend.kv_head_of)
    raw.clear()
    z_live.clear()

    return CachedRun(
        layers=layers, score_site=site, scores=scores, pattern=pattern, values=values, z=zd, grad_z=gz,
        metric=metric.to(dtype), mask=mask_dev, lengths=task.lengths.to(device), positions=task.positions.to(device),
        n_heads=n_heads, n_kv_heads=backend.n_kv_heads, n_underflow=n_underflow)


def _per_layer(layers, keep, site, need_pattern, raw, z_live, grads, mask_dev, tiny_log, n_heads, dtype, n_underflow,
               kv_head_of=None):
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
            values[l] = expand_kv(raw["values"][l], n_heads, kv_head_of)
        if "z" in keep:
            zd[l] = cast(z_live[l])
        if backward:
            g = grads[idx]
            gz[l] = torch.zeros_like(z_live[l], dtype=dtype) if g is None else cast(g)
    return scores, pattern, values, zd, gz


# =========================================================================== the streaming run


class StreamMismatch(RuntimeError):
    """The scores recomputed from q and k differ from the model's own scores (the caller falls back to
    ``cached_run``)."""


@dataclass(kw_only=True)
class StreamedRun(BatchRun):
    """What the analysis needs of one batch without any ``[head, q, k]`` tensor kept (the fields of ``BatchRun``
    plus q and k at the hooks the probe found to reproduce the scores: ``Backend.score_q_hook`` /
    ``score_k_hook``, ``attn_scale``). ``score_blocks(layer)`` recomputes the scores
    ``a = q . k / attn_scale`` in blocks of queries (keys beyond the block's last query are masked for
    every query of the block, so a block holds only keys ``0 .. q1 - 1``)."""

    q: Dict[int, Float[Tensor, "batch qpos head d_head"]]
    k: Dict[int, Float[Tensor, "batch kpos kv_head d_head"]]
    kv_head_of: tuple
    attn_scale: float
    #: bridge forward: largest |recomputed - hooked| score at the checked rows, relative to the row's max
    #: |q_i| |k_j| / scale; own forward: largest |own - bridge| of q, k, v and dm/dz on the checked prefix,
    #: relative to the bridge's largest magnitude of each
    check_error: float = 0.0
    #: "bridge" (the model's forward and backward through hooks) or "own" (``FastModel.grad_run``, a fused
    #: attention kernel: no attention pattern is ever materialised)
    forward: str = "bridge"
    #: own forward: "full" (q, k, v, dm/dz on an OWN_CHECK_TOKENS prefix: the first call per model and settings)
    #: or "spot" (q, k, v and the metric on an OWN_SPOT_TOKENS prefix, forward only: every later call)
    check_mode: str = ""

    def scores_rows(self, layer: int, q0: int, q1: int, n_keys: Optional[int] = None
                    ) -> Float[Tensor, "batch head qrows kpos"]:
        """Scores of queries ``q0 .. q1 - 1`` over keys ``0 .. n_keys - 1`` (default all), ``-inf`` at masked keys."""
        nk = int(self.mask.shape[2]) if n_keys is None else int(n_keys)
        q = self.q[layer][:, q0:q1]
        k = expand_kv(self.k[layer][:, :nk], self.n_heads, self.kv_head_of)
        a = torch.einsum("bqhd,bkhd->bhqk", q, k) / self.attn_scale
        return a.masked_fill(~self.mask[:, None, q0:q1, :nk], float("-inf"))

    def score_blocks(self, layer: int, max_elements: Optional[int] = None):
        """``(q0, q1, scores [batch, head, q1 - q0, q1])`` over consecutive blocks of queries, each block holding at
        most about ``max_elements`` scores (default ``2**20``); every block is computed when asked for."""
        n = int(self.mask.shape[1])
        for q0, q1 in query_blocks(n, self.batch * self.n_heads, max_elements):
            yield q0, q1, self.scores_rows(layer, q0, q1, q1)


def query_blocks(n: int, per_key: int, max_elements: Optional[int] = None) -> list:
    """Consecutive blocks ``(q0, q1)`` of ``n`` queries for ``StreamedRun.score_blocks``: each block's scores
    ``[per_key, q1 - q0, q1]`` hold at most ``max_elements`` (default ``2**20``) entries, or one query where
    a single query exceeds that: ``q1`` is the largest with ``(q1 - q0) * q1 * per_key <= max_elements``."""
    budget = int(max_elements or 2 ** 20)
    per_key = max(1, int(per_key))
    out, q0 = [], 0
    while q0 < n:
        # the positive root of q1^2 - q0 q1 - budget / per_key = 0, then corrected for rounding
        q1 = int((q0 + math.sqrt(q0 * q0 + 4.0 * budget / per_key)) // 2)
        while q1 > q0 + 1 and (q1 - q0) * q1 * per_key > budget:
            q1 -= 1
        while q1 < n and (q1 + 1 - q0) * (q1 + 1) * per_key <= budget:
            q1 += 1
        q1 = min(max(q1, q0 + 1), n)
        out.append((q0, q1))
        q0 = q1
    return out


def can_stream(backend) -> bool:
    """Whether ``streamed_run`` applies: a live scores site and q / k hooks that reproduce it (``Backend``)."""
    return (getattr(backend, "score_site", None) == "scores" and bool(getattr(backend, "scores_hook", None))
            and bool(getattr(backend, "score_q_hook", None)) and bool(getattr(backend, "score_k_hook", None))
            and bool(getattr(backend, "attn_scale", None)))


#: ``forward="auto"`` takes our own forward (``FastModel.grad_run``) where the bridge's forward and backward would
#: hold at least this many bytes of attention scores and patterns for the batch (``2 n_layers batch n_heads n^2``
#: elements): GPT-2 small, one prompt, from about 620 tokens on
OWN_FORWARD_MIN_BYTES = 256 * 2 ** 20
#: tokens of the prefix on which the first own-forward run per model and settings is checked against the bridge
#: (q, k, v, dm/dz, metric), and of the forward-only spot check of every later run (q, k, v, metric)
OWN_CHECK_TOKENS = 64
OWN_SPOT_TOKENS = 16
_OWN_VERIFIED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
FORWARDS = ("auto", "bridge", "own")


def own_forward_support(model, backend, task: Task, *, grad_context=None) -> tuple:
    """``(FastModel, None)`` when ``streamed_run`` can take our own forward with a fused attention kernel for this
    model, else ``(None, reason)``: an HF GPT-2 / Llama bridge whose softmax runs in the model dtype (float32 or
    float64 after any reduced-precision upcast), no forward hooks of the user's, no ``grad_context`` (GIM)."""
    if grad_context is not None:
        return None, "a grad_context (e.g. GIM) acts through the bridge's hooks"
    facts = getattr(backend, "facts", None) or model_facts(model)
    kind, reason = fast_support(model, facts)
    if kind is None:
        return None, reason
    if has_user_forward_hooks(model):
        return None, "the model carries forward hooks (our own forward would bypass them)"
    fm = FastModel(model, kind, facts)
    if not fm.use_sdpa:
        return None, "the model's softmax is upcast (the fused kernel would not reproduce it)"
    return fm, None


def streamed_run(
    model,
    task: Task,
    *,
    layers: Optional[Iterable[int]] = None,
    grad_context: Optional[Callable[[], contextlib.AbstractContextManager]] = None,
    dtype: torch.dtype = torch.float32,
    backend=None,
    forward: str = "auto",
    upcast: bool = True,
) -> StreamedRun:
    """One forward and one backward of ``sum over prompts of m`` over ``task`` that keep no ``[head, q, k]`` tensor:
    q, k, v, ``dm/dz`` per layer (the memory of the model's own forward and backward, plus O(tokens) per layer);
    the scores are recomputed per block of queries by ``StreamedRun.score_blocks``.

    ``forward``: ``"bridge"`` runs the model itself with hooks; its backward still materialises every layer's
    attention pattern (the bridge's eager attention). ``"own"`` runs ``FastModel.grad_run`` on the model's
    weights with ``scaled_dot_product_attention`` (flash attention: memory linear in the length, and about
    half the bridge's time on GPT-2 small at 1,024 tokens); ``"auto"`` takes it where ``own_forward_support``
    allows and the bridge would hold at least ``OWN_FORWARD_MIN_BYTES`` of attention for the batch.

    Checks, on every call. Bridge forward: at each layer the model's own scores (read at the live scores
    hook) of each prompt's metric-position query must equal the recomputed ones within the rounding of a
    ``d_head``-term dot product in the model's dtype, ``(d_head + 2) eps max_j |q_i| |k_j| / attn_scale``; otherwise
    ``StreamMismatch`` is raised (``analyze_self_repair`` then falls back to ``cached_run``). Own forward: on a
    prefix of ``OWN_CHECK_TOKENS`` tokens of one seeded prompt, q, k, v at every layer, dm/dz and the metric (at
    the prefix's last token; the first call per model and settings: weights, dtype, device), or q, k, v and the
    metric of a forward over ``OWN_SPOT_TOKENS`` tokens (every later call), must equal the bridge's (hooks) within ``1e-9`` (float64 GPT-2), ``1e-6`` (float64
    Llama, whose norms HF computes in float32) or ``1e-4`` (float32) of the bridge's largest magnitude, or
    ``"auto"`` warns and takes the bridge (``"own"`` raises). The forward taken is ``run.forward``.
    A bfloat16 / float16 model computes in float32 (``upcast``, as ``cached_run``).
    Requires ``can_stream(backend)`` (live scores site; on pattern-site backends use ``cached_run``).
    """
    if forward not in FORWARDS:
        raise ValueError(f"unknown forward {forward!r}; valid: {', '.join(FORWARDS)}.")
    backend = resolve_backend(model, backend)
    check_backend(backend)
    if not can_stream(backend):
        raise ValueError("streamed_run needs a live scores site and q / k hooks that reproduce it "
                         f"(backend score_site={backend.score_site!r}, score_q_hook={backend.score_q_hook!r}); "
                         "use cached_run on this model.")
    n_layers = backend.n_layers
    layers = tuple(range(n_layers)) if layers is None else tuple(int(l) for l in layers)
    for l in layers:
        if not 0 <= l < n_layers:
            raise ValueError(f"layer {l} out of range: the model has {n_layers} layers (0..{n_layers - 1}).")
    validate_task(task, model)
    up = computing_in_float32(model) if upcast else contextlib.nullcontext(_model_float_dtype(model))
    with up as run_dtype:
        fm = None
        if forward != "bridge":
            fm, reason = own_forward_support(model, backend, task, grad_context=grad_context)
            if fm is None and forward == "own":
                raise ValueError(f"forward='own' is not available for this model: {reason}. Use 'auto' or 'bridge'.")
            n = int(task.lengths.max())
            held = 2 * n_layers * len(task) * backend.n_heads * n * n * torch.empty((), dtype=run_dtype).element_size()
            if forward == "auto" and held < OWN_FORWARD_MIN_BYTES:
                fm = None
        if fm is not None:
            try:
                return _streamed_own(model, task, fm, backend, layers, dtype, run_dtype)
            except FastMismatch as e:
                if forward == "own":
                    raise ValueError(f"forward='own': our forward disagrees with the model's own ({e}); "
                                     "use forward='auto' or 'bridge'.") from None
                warnings.warn(f"selfrepair.engine: our own forward disagrees with the model's ({e}); "
                              "streaming through the bridge instead.", RuntimeWarning, stacklevel=2)
        return _streamed_bridge(model, task, backend, layers, grad_context, dtype)


def _streamed_bridge(model, task: Task, backend, layers: tuple, grad_context, dtype) -> StreamedRun:
    """``streamed_run`` through the model's own forward and backward (hooks)."""
    n_heads = backend.n_heads
    n = int(task.lengths.max())
    device = _model_device(model)
    tokens = task.tokens[:, :n].to(device)
    mask_dev = key_mask(task, n).to(device)
    positions = task.positions.to(device)
    b_idx = torch.arange(len(task), device=device)
    raw: Dict[str, Dict[int, Tensor]] = {"q": {}, "k": {}, "v": {}, "check": {}}
    z_live: Dict[int, Tensor] = {}

    def save_rows(layer: int):
        def fn(x, hook):   # the model's own scores at each prompt's metric-position query: [batch, head, k]
            raw["check"][layer] = x.detach()[b_idx, :, positions].to(dtype=dtype).clone()
        return fn

    fwd = _qkvz_hooks(backend, layers, raw, z_live, dtype)
    fwd += [(backend.hook(backend.scores_hook, l), save_rows(l)) for l in layers]
    ctx = grad_context() if (grad_context is not None) else contextlib.nullcontext()
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.enable_grad())
        stack.enter_context(ctx)
        stack.enter_context(model.hooks(fwd_hooks=fwd))
        logits = model(tokens)
        missing = [l for l in layers if l not in z_live or any(l not in raw[kd] for kd in ("q", "k", "v", "check"))]
        if missing:
            raise RuntimeError(f"the q / k / v / scores / z hooks did not all fire at layers {missing}.")
        if logits.dtype not in (torch.float32, torch.float64):
            logits = logits.float()
        m = task.metric_from_full_logits(logits)
        metric = m.detach()
        if not m.requires_grad:
            raise RuntimeError("the metric does not depend on hook_z through autograd; cannot take dm/dz.")
        grads = torch.autograd.grad(m.sum(), [z_live[l] for l in layers], allow_unused=True)
        del logits, m
    gz = {l: (torch.zeros_like(z_live[l], dtype=dtype) if g is None else g.detach().to(dtype))
          for l, g in zip(layers, grads)}
    z_live.clear()
    values = {l: expand_kv(raw["v"][l], n_heads, backend.kv_head_of) for l in layers}
    run = StreamedRun(layers=layers, q=raw["q"], k=raw["k"], values=values, grad_z=gz, metric=metric.to(dtype),
                      mask=mask_dev, lengths=task.lengths.to(device), positions=positions, n_heads=n_heads,
                      n_kv_heads=backend.n_kv_heads, kv_head_of=tuple(backend.kv_head_of), attn_scale=float(backend.attn_scale))
    run.check_error = _check_recomputed(run, raw["check"], _model_float_dtype(model), backend.d_head)
    return run


def _check_recomputed(run: StreamedRun, hooked: Dict[int, Tensor], model_dtype: torch.dtype, d_head: int) -> float:
    """Compare the recomputed scores of each prompt's metric-position row with the model's own (see streamed_run)."""
    # the coarser of the model's dtype and the analysis dtype the scores are recomputed in (a float64 model
    # analysed in float32 recomputes float32 scores)
    run_dtype = next(iter(run.q.values())).dtype if run.q else model_dtype
    if torch.finfo(run_dtype).eps > torch.finfo(model_dtype).eps:
        model_dtype = run_dtype
    eps = float(torch.finfo(model_dtype).eps)
    b_idx = torch.arange(run.batch, device=run.mask.device)
    m = run.mask[b_idx, run.positions]                                          # [b, k]
    worst = 0.0
    for l, own in hooked.items():
        q = run.q[l][b_idx, run.positions]                                     # [b, h, d]
        k = expand_kv(run.k[l], run.n_heads, run.kv_head_of)                   # [b, k, h, d]
        a = torch.einsum("bhd,bkhd->bhk", q, k) / run.attn_scale
        scale = (q.norm(dim=-1)[..., None] * k.norm(dim=-1).transpose(1, 2)).amax(-1) / run.attn_scale  # [b, h]
        err = torch.where(m[:, None], (a - own.to(a.dtype)).abs(), torch.zeros((), dtype=a.dtype, device=a.device))
        rel = err.amax(-1) / scale.clamp_min(torch.finfo(a.dtype).tiny)
        worst = max(worst, float(rel.max()))
        if not bool((rel <= (d_head + 2) * eps).all()):
            raise StreamMismatch(
                f"layer {l}: scores recomputed from q and k differ from the model's own by {float(rel.max()):.3g} of "
                f"max|q||k|/scale (allowed {(d_head + 2) * eps:.3g}, the rounding of a {d_head}-term dot product in "
                f"{str(model_dtype).replace('torch.', '')}).")
    return worst


def _check_prefix_rows(task: Task) -> int:
    """The prompt whose prefix checks our own forward: drawn with a seed taken from the task's tokens."""
    seed = int(task.tokens.to(torch.int64).sum()) * 1000003 + len(task)
    return int(torch.randint(len(task), (1,), generator=torch.Generator().manual_seed(seed % (2 ** 63))))


def _streamed_own(model, task: Task, fm: FastModel, backend, layers: tuple, dtype, run_dtype) -> StreamedRun:
    """``streamed_run`` through ``FastModel.grad_run`` (see streamed_run), checked against the bridge on a prefix."""
    n_heads = backend.n_heads
    n = int(task.lengths.max())
    device = _model_device(model)
    tokens = task.tokens[:, :n].to(device)
    positions = task.positions.to(device)
    out = fm.grad_run(tokens, positions, lambda lg: task.metric_fn(lg, None), layers)
    # the check: one seeded prompt's first tokens through our forward and the bridge's, the metric of that prompt
    # read at the prefix's last token (causal: the prefix's activations are those of the whole run). The first
    # time for this model and these settings (weights, dtype, device): OWN_CHECK_TOKENS tokens with dm/dz; then a
    # forward-only spot check of OWN_SPOT_TOKENS tokens (q, k, v, metric) on every call
    key = weights_key(model, fm.kind, run_dtype, device)
    full = _OWN_VERIFIED.get(model) != key
    i = _check_prefix_rows(task)
    t = min(OWN_CHECK_TOKENS if full else OWN_SPOT_TOKENS, int(task.lengths[i]))
    pre = tokens[i:i + 1, :t]
    pos = torch.tensor([t - 1], device=device)
    idx = torch.tensor([i])
    mine = fm.grad_run(pre, pos, lambda lg: task.metric_fn(lg, idx), range(backend.n_layers), backward=full)
    ref = _bridge_prefix(model, backend, pre, lambda lg: task.metric_fn(lg[:, t - 1], idx), backward=full)
    tol = {torch.float64: 1e-9 if fm.kind == "gpt2" else 1e-6}.get(run_dtype, 1e-4)
    worst = 0.0
    for what in ("q", "k", "v", "grad_z") if full else ("q", "k", "v"):
        for l in range(backend.n_layers):
            a, b = mine[what][l].double(), ref[what][l].double()
            scale = float(b.abs().max()) if b.numel() else 0.0
            err = float((a - b).abs().max()) / max(scale, torch.finfo(torch.float64).tiny) if b.numel() else 0.0
            worst = max(worst, err)
            if not err <= tol:
                _OWN_VERIFIED.pop(model, None)
                raise FastMismatch(f"{what} at layer {l} differs from the bridge's by {err:.3g} of its largest "
                                   f"magnitude (allowed {tol:g}) on a {t}-token prefix")
    m_err = float((mine["metric"].double() - ref["metric"].double()).abs().max())
    if not m_err <= tol * (float(ref["metric"].double().abs().max()) + 1.0):
        _OWN_VERIFIED.pop(model, None)
        raise FastMismatch(f"the metric differs from the bridge's by {m_err:.3g} on a {t}-token prefix")
    if full:
        _OWN_VERIFIED[model] = key
    values = {l: expand_kv(out["v"][l].to(dtype), n_heads, backend.kv_head_of) for l in layers}
    run = StreamedRun(layers=layers, q={l: out["q"][l].to(dtype) for l in layers},
                      k={l: out["k"][l].to(dtype) for l in layers}, values=values,
                      grad_z={l: out["grad_z"][l].to(dtype) for l in layers}, metric=out["metric"].to(dtype),
                      mask=key_mask(task, n).to(device), lengths=task.lengths.to(device), positions=positions,
                      n_heads=n_heads, n_kv_heads=backend.n_kv_heads, kv_head_of=tuple(backend.kv_head_of),
                      attn_scale=float(backend.attn_scale), check_error=worst, forward="own",
                      check_mode="full" if full else "spot")
    return run


def _qkvz_hooks(backend, layers, out: Dict[str, Dict[int, Tensor]], z_live: Dict[int, Tensor], dtype) -> list:
    """Forward hooks that save q, k (the score q / k hooks) and v (hook_v) of ``layers`` into ``out`` (detached, cast
    to ``dtype``, or cloned when None) and make hook_z a tensor on the autograd path (``z_live``) for dm/dz."""
    def save(kind: str, layer: int):
        def fn(x, hook):
            out[kind][layer] = x.detach().clone() if dtype is None else x.detach().to(dtype=dtype)
        return fn

    def save_z(layer: int):
        def fn(x, hook):
            # a fresh tensor on the autograd path (a detached leaf when nothing upstream requires grad)
            y = x.detach().clone().requires_grad_(True) if not x.requires_grad else x.clone()
            z_live[layer] = y
            return y
        return fn

    fwd = []
    for l in layers:
        fwd += [(backend.hook(backend.score_q_hook, l), save("q", l)), (backend.hook(backend.score_k_hook, l), save("k", l)),
                (backend.hook(backend.v_hook, l), save("v", l)), (backend.hook(backend.z_hook, l), save_z(l))]
    return fwd


def _bridge_prefix(model, backend, tokens: Tensor, metric: Callable[[Tensor], Tensor], backward: bool = True) -> dict:
    """q, k, v (at the score q / k hooks and hook_v) and dm/dz of every layer and the metric, through the model's
    own forward and backward with hooks: the reference of ``_streamed_own``'s check."""
    L = backend.n_layers
    out: Dict[str, Dict[int, Tensor]] = {"q": {}, "k": {}, "v": {}}
    z_live: Dict[int, Tensor] = {}
    fwd = _qkvz_hooks(backend, range(L), out, z_live, None)
    with (torch.enable_grad() if backward else torch.no_grad()), model.hooks(fwd_hooks=fwd):
        logits = model(tokens)
        if logits.dtype not in (torch.float32, torch.float64):
            logits = logits.float()
        m = metric(logits)
        if not backward:
            return dict(out, metric=m.detach())
        grads = torch.autograd.grad(m.sum(), [z_live[l] for l in range(L)], allow_unused=True)
    out["grad_z"] = {l: (torch.zeros_like(z_live[l]) if g is None else g.detach()) for l, g in zip(range(L), grads)}
    out["metric"] = m.detach()
    return out
