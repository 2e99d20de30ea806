"""Global effects: batched, partial forward passes with one head's output ``z`` edited.

Every ablation the toolkit measures globally acts on ONE head's output
``z = hook_z[batch, pos, n_heads, d_head]`` of one prompt, from some position on
(docs/quantities.md, "Global effects"):

* a score ablation of keys S at ``(layer l, head h, query i)`` changes only row i
  of that head's pattern, so ``z_i' = z_i + sum_j (p'_j - p_j) v_j`` and nothing
  else in layer l changes;
* a value ablation at query i changes ``z_i`` by ``-sum_{j in S} p_j (v_j - v'_j)``;
* a whole-head ablation replaces ``z`` at every position (``replace_z``).

So the engine measures batches of "z edits" and returns, per edit,
``m(clean) - m(edited)`` (docs/quantities.md sign: positive = the edit lowers the metric).

API
---
``ZEdits(prompt, layer, head, start, delta)``
    n edits: ``prompt, layer, head, start`` are ``[n]`` integers, ``delta`` is
    ``[n, span, d_head]`` (or ``[n, d_head]`` for span 1) and is ADDED to
    ``z[prompt, start + t, head]`` for ``t < span``. Positions after the prompt's
    metric position (hence after its length) cannot change the metric and are
    ignored. ``ZEdits.cat([...])`` joins edit sets (spans zero-padded);
    ``len(edits)``; ``edits[idx]``.
``prepare_clean(model, task, *, path="auto", batch_size=None) -> CleanRun``
    one clean forward, cached: ``metric`` (m(clean) per prompt, computed the same
    way as the edited runs), ``z[layer]`` ``[batch, pos, n_heads, d_head]``,
    ``path``/``fast_kind``/``reason``, and on the fast path the residual stream
    entering each layer (``resid``, n_layers + 1 entries) and each layer's keys
    (after rotary) and values. Reusable across calls on the same model and task;
    a snapshot of the model (re-prepare after changing weights).
``measure_z_edits(model, task, edits, *, edits_per_forward=None, progress=True, clean=None, path="auto")``
    ``-> Float[Tensor, "n"]``: ``m(clean) - m(edited)`` per edit, float64 where the
    model is float64, else float32. Exactly 0, without a forward, for an edit
    that starts after the metric position P, or that sits in the last layer and
    ends before P (only position P of the last layer reaches the metric).
    ``edits_per_forward`` caps the edits per forward (default: what fits
    ``MEMORY_BUDGET``); results do not depend on it beyond rounding. With
    ``clean=None`` and a task whose cache would exceed ``CLEAN_BUDGET``, prompts
    are measured in groups.
``replace_z(clean, prompt, layer, head, start, value) -> ZEdits``
    edits that SET z to ``value`` ``[n, span, d_head]`` (delta = value - clean z).
``flops(model, task, edits) -> dict``
    the FLOP model behind ``ideal_speedup`` (issue 6); see its docstring.
``run_z_edits(...) -> EditRun``
    the same effects (``.effects``) with what the engine did: ``path`` ("fast" / "hooks"),
    ``fast_kind``, ``reason`` (why not fast), ``edits``, ``skipped`` (exact zeros),
    ``forwards`` (batched forwards run), ``positions`` (edit-positions recomputed).

Paths
-----
``"fast"`` (HF-wrapped GPT-2 and Llama bridges): a forward of our own on the
wrapped HF modules' weights (GPT-2: ln_1, c_attn's q/k/v, c_proj, ln_2, MLP,
absolute positions already in the residual; Llama: input_layernorm, q/k/v/o_proj
with grouped-query attention, rotary at the true positions ``start..P``,
post_attention_layernorm, gated MLP; then final norm and lm_head). The bridge's
own ``start_at_layer`` does not serve (it still runs every block below the start
and every position), nor does its KV cache (it cannot start at a layer).
Recomputation starts at the edited layer from the cached residual stream: there
only the edited positions change (o-projection and MLP at those positions);
layers above recompute only positions from the earliest start in the batch to
P, attending to the clean cache's keys/values for earlier positions (shared by
the batch, not copied per edit, on the materialised-softmax route); the last
layer computes keys/values for those positions but query, attention, o and MLP
at P only; only position P is unembedded. Attention mirrors the bridge:
``(q k^T) * scale`` (GPT-2: 1/sqrt(d_head), also / (layer + 1) with
``scale_attn_by_inverse_layer_idx``; Llama: the module's ``scaling``), masked
keys at the dtype's minimum, softmax in the model dtype (GPT-2; float32 with
``reorder_and_upcast_attn``) or in float32 (Llama). The clean forward is
materialised exactly like that; the partial forwards use one fused
``scaled_dot_product_attention`` where the bridge's softmax dtype is the model
dtype (float32/float64), else the materialised float32 softmax. Edits are
grouped by (prompt, layer) and, inside, by start so that a batch's window wastes
at most ~15%. ``prepare_clean`` checks the clean logits at the metric positions
against the bridge's own forward (max abs difference <= 1e-4 x (1 + max |logit|)
in float32, 1e-9 (GPT-2) / 1e-6 (Llama, float32 softmax and RMSNorm inside) in
float64): on every prompt the first time for a model and its settings (weights, dtype, device, kind;
cached), then on a sampled ``SPOT_CHECK_FRACTION`` (1/16, at least one prompt) of each later call's prompts
(``CleanRun.check_mode`` says which, ``check_prompts`` how many); on a mismatch ``path="auto"`` warns and takes the hook path,
``path="fast"`` raises. Not taken (auto -> hooks, ``reason`` says why): models in
training mode, processed / folded weights (``enable_compatibility_mode()`` with
processing), other architectures.

``"hooks"`` (TL4 native bridges, a TL3 ``HookedTransformer``, other
architectures, or any model carrying forward hooks): batched forwards with one
hook at ``hook_z`` per edited layer (``z_hook`` from ``selfrepair.probe`` (``models/probe.py``) when
it has already probed the model, else ``blocks.{layer}.attn.hook_z``); edits of
different prompts and layers share a forward, rows being each prompt's tokens
cut after the batch's largest metric position. ``start_at_layer`` is used only
on a TL3 ``HookedTransformer`` (where it skips the lower blocks; on bridges it
still runs them). The forward is stopped at the last block's
``hook_resid_post`` and only the metric positions go through ``ln_final`` and
``unembed`` (checked against the full logits in ``prepare_clean``; full logits
where the check fails).

Hooks of the user's: the fast path bypasses all TransformerLens hooks, so with
``path="auto"`` a model carrying forward hooks on any hook point is measured on
the hook path, where the user's hooks apply to the clean and the edited runs
alike (``path="fast"`` then raises rather than ignore them). The engine adds
its own hooks only inside ``model.hooks(...)`` contexts, which remove exactly
those on exit (also on errors); it never removes a user's hook.
"""

from __future__ import annotations

import math
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .._devices import is_split
from .._devices import analysis_dtype as _out_dtype, model_device as _model_device, model_dtype as _model_dtype
from .._typing import Float, Int, Tensor
from ..models.facts import ModelFacts, model_facts
from ..tasks import Task, validate_task
from .._deprecation import renamed_keyword
from .forward import FastMismatch, FastModel, fast_support, has_user_forward_hooks, weights_key

__all__ = ["ZEdits", "CleanRun", "EditRun", "prepare_clean", "measure_z_edits", "run_z_edits", "replace_z", "flops",
           "MEMORY_BUDGET", "CLEAN_BUDGET", "PATHS"]

#: activation memory (bytes) one batched forward may use when batch_size is None
MEMORY_BUDGET = 256 * 2**20
#: memory (bytes) of one CleanRun that measure_z_edits(clean=None) builds; more prompts are split into groups
CLEAN_BUDGET = 2**30
PATHS = ("auto", "fast", "hooks")



# --------------------------------------------------------------------------- edits


@dataclass
class ZEdits:
    """n edits of one head's output z: ``z[prompt, start + t, head] += delta[:, t]``."""

    prompt: Int[Tensor, "n"]
    layer: Int[Tensor, "n"]
    head: Int[Tensor, "n"]
    start: Int[Tensor, "n"]
    delta: Float[Tensor, "n span d_head"]

    def __post_init__(self):
        for nm in ("prompt", "layer", "head", "start"):
            v = torch.as_tensor(getattr(self, nm))
            if v.is_floating_point() or v.is_complex():
                raise TypeError(f"ZEdits.{nm} must be integers; got dtype {v.dtype}.")
            setattr(self, nm, v.to(torch.long).reshape(-1).cpu())
        n = self.prompt.shape[0]
        for nm in ("layer", "head", "start"):
            if getattr(self, nm).shape[0] != n:
                raise ValueError(f"ZEdits.{nm} has {getattr(self, nm).shape[0]} entries but prompt has {n}; "
                                 "give one (prompt, layer, head, start) per edit.")
        d = torch.as_tensor(self.delta)
        if not d.is_floating_point():
            raise TypeError(f"ZEdits.delta must be a float tensor [n, span, d_head]; got dtype {d.dtype}.")
        if d.ndim == 2 and d.shape[0] == n:  # [n, d_head]: span 1
            d = d[:, None, :]
        if d.ndim != 3 or d.shape[0] != n or d.shape[1] < 1:
            raise ValueError(f"ZEdits.delta must have shape [n={n}, span>=1, d_head]; got {tuple(d.shape)}.")
        self.delta = d
        if (self.start < 0).any():
            raise ValueError(f"ZEdits.start must be >= 0; edit {int((self.start < 0).nonzero()[0])} starts at "
                             f"{int(self.start[(self.start < 0)][0])}.")

    def __len__(self) -> int:
        return int(self.prompt.shape[0])

    @property
    def span(self) -> int:
        return int(self.delta.shape[1])

    def __getitem__(self, idx) -> "ZEdits":
        idx = torch.as_tensor(idx) if not isinstance(idx, slice) else idx
        if isinstance(idx, Tensor) and idx.ndim == 0:
            idx = idx[None]
        return ZEdits(self.prompt[idx], self.layer[idx], self.head[idx], self.start[idx], self.delta[idx])

    @staticmethod
    def cat(edits: Sequence["ZEdits"]) -> "ZEdits":
        """Join edit sets; shorter spans are padded with zeros (no change)."""
        edits = list(edits)
        if not edits:
            raise ValueError("ZEdits.cat needs at least one ZEdits.")
        span = max(e.span for e in edits)
        dh = {e.delta.shape[2] for e in edits}
        if len(dh) != 1:
            raise ValueError(f"ZEdits.cat: d_head differs between edit sets ({sorted(dh)}).")
        dt = torch.promote_types(*[e.delta.dtype for e in edits]) if len(edits) > 1 else edits[0].delta.dtype
        deltas = [F.pad(e.delta.to(dt), (0, 0, 0, span - e.span)) for e in edits]
        return ZEdits(torch.cat([e.prompt for e in edits]), torch.cat([e.layer for e in edits]),
                      torch.cat([e.head for e in edits]), torch.cat([e.start for e in edits]), torch.cat(deltas))


# --------------------------------------------------------------------------- model facts


# --------------------------------------------------------------------------- fast path: our own forward


# --------------------------------------------------------------------------- clean run


@dataclass
class CleanRun:
    """One cached clean forward of a task (see ``prepare_clean``)."""

    path: str                                   # "fast" or "hooks"
    metric: Float[Tensor, "batch"]              # m(clean) per prompt (float32, float64 for float64 models)
    z: List[Tensor]                             # per layer: [batch, pos, n_heads, d_head], model dtype
    positions: Int[Tensor, "batch"]             # metric positions
    fast_kind: Optional[str] = None             # "gpt2" / "llama" on the fast path
    reason: str = ""                            # why the fast path is not used
    resid: Optional[List[Tensor]] = None        # n_layers+1 x [batch, pos, d_model]: entering layer l / final
    k: Optional[List[Tensor]] = None            # per layer [batch, pos, n_kv_heads, d_head] (rotated keys)
    v: Optional[List[Tensor]] = None
    check_max_abs_diff: float = float("nan")    # fast-vs-bridge logits at the metric positions
    check_mode: str = ""                        # fast path: "full" (every prompt) or "spot" (sampled prompts)
    check_prompts: int = 0                      # prompts whose logits were checked against the bridge
    unembed_mode: str = "full"                  # hook path: "resid" (metric positions only) or "full"
    model_id: int = 0
    tokens: Optional[Tensor] = None
    _fm: Any = field(default=None, repr=False)

    def check(self, model, task: Task):
        if self.model_id != id(model):
            raise ValueError("clean= was prepared for a different model; call prepare_clean(model, task) again.")
        if self.tokens is None or self.tokens.shape != task.tokens.shape or not torch.equal(self.tokens, task.tokens):
            raise ValueError("clean= was prepared for a different task (tokens differ); call prepare_clean(model, task).")


def prepare_clean(model, task: Task, *, path: str = "auto", batch_size: Optional[int] = None) -> CleanRun:
    """One clean forward of ``task``, cached for ``measure_z_edits`` (which path: see the module docstring)."""
    if path not in PATHS:
        raise ValueError(f"unknown path {path!r}; valid: {', '.join(PATHS)}.")
    dims = model_facts(model)
    validate_task(task, model)
    kind, reason = fast_support(model, dims)
    if kind is not None and path != "hooks" and has_user_forward_hooks(model):
        kind, reason = None, "the model carries forward hooks (the fast path would bypass them)"
    if path == "hooks":
        kind, reason = None, "path='hooks' requested"
    elif kind is None and is_split(model):
        warnings.warn(f"selfrepair.engine: {reason}; the hook path measures the edits instead.")
    if path == "fast" and kind is None:
        raise ValueError(f"path='fast' is not available for this model: {reason}. Use path='auto' or 'hooks'.")
    if kind is not None:
        try:
            return _prepare_fast(model, task, dims, kind, batch_size=batch_size)
        except FastMismatch as e:
            if path == "fast":
                raise ValueError(f"path='fast': our forward disagrees with the model's own forward ({e}); "
                                 "use path='auto' or 'hooks'.") from None
            warnings.warn(f"selfrepair.engine: fast path disagrees with the model's own forward ({e}); "
                          "using the hook path.")
            reason = f"fast forward disagreed with the model's own forward ({e})"
    return _prepare_hooks(model, task, dims, reason, batch_size=batch_size)


#: share of the prompts whose logits ``prepare_clean`` checks against the bridge once the fast forward passed a full
#: check on this model with these settings (at least one prompt per call)
SPOT_CHECK_FRACTION = 1 / 16
_VERIFIED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _spot_rows(task: Task) -> Tensor:
    """The prompts of a spot check: ``SPOT_CHECK_FRACTION`` of them (at least one), drawn with a seed taken from
    the task's tokens (the same task gives the same sample; different tasks, different ones)."""
    B = len(task)
    n = min(B, max(1, math.ceil(SPOT_CHECK_FRACTION * B)))
    seed = int(task.tokens.to(torch.int64).sum()) * 1000003 + B
    g = torch.Generator().manual_seed(seed % (2 ** 63))
    return torch.randperm(B, generator=g)[:n].sort().values


@torch.no_grad()
def _prepare_fast(model, task: Task, dims: ModelFacts, kind: str, *, batch_size) -> CleanRun:
    fm = FastModel(model, kind, dims)
    dev, mdt = _model_device(model), _model_dtype(model)
    B, T = task.tokens.shape
    per_prompt = _bytes_per_token(dims, T, mdt) * T * 2
    bs = max(1, int(batch_size) if batch_size else int(MEMORY_BUDGET // max(per_prompt, 1)))
    parts = []
    for s in range(0, B, bs):
        toks = task.tokens[s:s + bs].to(dev)
        parts.append(fm.clean_forward(toks))
    resid = [torch.cat([p[0][i] for p in parts]) for i in range(dims.n_layers + 1)]
    zs = [torch.cat([p[1][i] for p in parts]) for i in range(dims.n_layers)]
    ks = [torch.cat([p[2][i] for p in parts]) for i in range(dims.n_layers)]
    vs = [torch.cat([p[3][i] for p in parts]) for i in range(dims.n_layers)]
    pos = task.positions.to(dev)
    rows = torch.arange(B, device=dev)
    logits = fm.final_logits(resid[-1][rows, pos])
    od = _out_dtype(mdt)
    metric = task.metric_fn(logits.to(od), torch.arange(B)).to(od).cpu()
    # check against the model's own forward (hooks of our own: none): every prompt the first time for this model
    # and these settings (weights, dtype, device, kind), then a sampled spot check (SPOT_CHECK_FRACTION of the
    # prompts, at least one) on every later call
    key = weights_key(model, kind, mdt, dev)
    full = _VERIFIED.get(model) != key
    check_rows = torch.arange(B) if full else _spot_rows(task)
    ref = []
    for s in range(0, len(check_rows), bs):
        r = check_rows[s:s + bs]
        out = model(task.tokens[r].to(dev))
        ref.append(out[torch.arange(out.shape[0], device=dev), pos[r.to(dev)]])
    ref = torch.cat(ref)
    mine = logits[check_rows.to(dev)]
    diff = float((ref.to(od) - mine.to(od)).abs().max())
    scale = float(ref.to(od).abs().max()) + 1.0
    # float64: GPT-2 is float64 throughout; HF Llama keeps its softmax and RMSNorm in float32
    tol = {torch.float64: 1e-9 if kind == "gpt2" else 1e-6, torch.float32: 1e-4}.get(mdt, 5e-2) * scale
    if not math.isfinite(diff) or diff > tol:
        _VERIFIED.pop(model, None)
        raise FastMismatch(f"max |logit difference| {diff:.3g} > {tol:.3g} at the metric positions"
                           f" ({'full check' if full else 'spot check'} of {len(check_rows)} prompt(s))")
    if full:
        _VERIFIED[model] = key
    return CleanRun(path="fast", metric=metric, z=zs, positions=task.positions.clone(), fast_kind=kind,
                    resid=resid, k=ks, v=vs, check_max_abs_diff=diff, check_mode="full" if full else "spot",
                    check_prompts=len(check_rows), model_id=id(model),
                    tokens=task.tokens.clone(), _fm=fm)


def _bytes_per_token(dims: ModelFacts, n_keys: int, dtype: torch.dtype, vocab: bool = False) -> int:
    el = torch.finfo(dtype).bits // 8
    per = (10 * dims.d_model + (3 if dims.gated else 2) * dims.d_mlp + 4 * dims.n_heads * dims.d_head) * el
    per += dims.n_heads * n_keys * (2 * el + 4)     # scores, pattern (+ float32 softmax copy)
    if vocab:
        per += dims.d_vocab * el
    return int(per)


# --------------------------------------------------------------------------- hook path


class _StopForward(Exception):
    def __init__(self, value):
        super().__init__("selfrepair.engine: forward stopped after the last block")
        self.value = value


def _hooks_forward(model, dims: ModelFacts, tokens: Tensor, positions: Tensor, fwd_hooks, mode: str,
                   start_at_layer: Optional[int] = None, resid: Optional[Tensor] = None) -> Tensor:
    """Logits at ``positions`` [n, vocab] of a forward with ``fwd_hooks`` (ours only, removed on exit)."""
    rows = torch.arange(tokens.shape[0], device=tokens.device)
    hooks = list(fwd_hooks)
    if mode == "resid":
        def stop(x, hook):
            raise _StopForward(x)

        hooks.append((f"blocks.{dims.n_layers - 1}.hook_resid_post", stop))
    inp = tokens if start_at_layer is None else resid
    kw = {} if start_at_layer is None else {"start_at_layer": start_at_layer}
    try:
        with model.hooks(fwd_hooks=hooks):
            out = model(inp, **kw)
    except _StopForward as s:
        return _unembed_rows(model, s.value[rows, positions])
    if mode == "resid":
        raise RuntimeError("the forward finished without reaching the last block's hook_resid_post")
    return out[rows, positions]


def _unembed_rows(model, h: Tensor) -> Tensor:
    """Logits [n, vocab] of final-block residuals ``h`` [n, d_model]: ``ln_final`` + unembed only."""
    return model.unembed(model.ln_final(h[:, None, :]))[:, 0]


@torch.no_grad()
def _prepare_hooks(model, task: Task, dims: ModelFacts, reason: str, *, batch_size) -> CleanRun:
    dev, mdt = _model_device(model), _model_dtype(model)
    od = _out_dtype(mdt)
    B, T = task.tokens.shape
    names = [dims.z_hook.format(layer=l) for l in range(dims.n_layers)]
    use_sal = dims.kind == "tl3"   # TL 4's start_at_layer still runs the blocks below it
    if use_sal:
        names += [f"blocks.{l}.hook_resid_pre" for l in range(dims.n_layers)]
    per_prompt = _bytes_per_token(dims, T, mdt, vocab=True) * T * 2
    bs = max(1, int(batch_size) if batch_size else int(MEMORY_BUDGET // max(per_prompt, 1)))
    store: Dict[str, List[Tensor]] = {n: [] for n in names}
    last = f"blocks.{dims.n_layers - 1}.hook_resid_post"   # its rows at the metric positions: the "resid" check
    if last not in model.hook_dict:
        last = None
    final: List[Tensor] = []
    logits_full = []
    for s in range(0, B, bs):
        toks = task.tokens[s:s + bs].to(dev)
        rows, pos = torch.arange(toks.shape[0], device=dev), task.positions[s:s + bs].to(dev)
        hooks = [(n, _saver(store[n])) for n in names]
        if last is not None:
            hooks.append((last, lambda x, hook, rows=rows, pos=pos: final.append(x[rows, pos].detach().clone())))
        with model.hooks(fwd_hooks=hooks):
            out = model(toks)
        logits_full.append(out[rows, pos])
    zs = [torch.cat(store[names[l]]) for l in range(dims.n_layers)]
    for l, z in enumerate(zs):
        if z.ndim != 4:
            raise RuntimeError(f"{names[l]} has shape {tuple(z.shape)}; expected [batch, pos, n_heads, d_head].")
    resid = None
    if use_sal:
        resid = [torch.cat(store[f"blocks.{l}.hook_resid_pre"]) for l in range(dims.n_layers)]
    logits_full = torch.cat(logits_full)
    metric_full = task.metric_fn(logits_full.to(od), torch.arange(B)).to(od).cpu()
    # only the metric positions through ln_final + unembed: check once (on the clean forward's own final
    # residuals), else full logits
    mode = "full"
    try:
        lg = _unembed_rows(model, torch.cat(final))          # raises if that hook is absent or never fired
        # float32: 1e-4 relative; bf16 / fp16: 16 eps of the dtype (a few roundings of the unembedding)
        rel = 1e-9 if mdt == torch.float64 else max(1e-4, 16 * float(torch.finfo(mdt).eps))
        tol = rel * (float(logits_full.abs().max()) + 1.0)
        if float((lg.to(od) - logits_full.to(od)).abs().max()) <= tol:
            mode = "resid"
            metric_full = task.metric_fn(lg.to(od), torch.arange(B)).to(od).cpu()
    except Exception:
        mode = "full"
    return CleanRun(path="hooks", metric=metric_full, z=zs, positions=task.positions.clone(), reason=reason,
                    resid=resid, unembed_mode=mode, model_id=id(model), tokens=task.tokens.clone())


def _saver(lst: List[Tensor]):
    def save(x, hook):
        lst.append(x.detach().clone())
    return save


# --------------------------------------------------------------------------- measuring


def _validate(edits: ZEdits, task: Task, dims: ModelFacts):
    if not isinstance(edits, ZEdits):
        raise TypeError(f"edits must be a ZEdits; got {type(edits).__name__}.")
    n = len(edits)
    if n == 0:
        return
    B = len(task)
    for nm, hi, what in (("prompt", B, "prompts in the task"), ("layer", dims.n_layers, "layers"),
                         ("head", dims.n_heads, "heads")):
        v = getattr(edits, nm)
        bad = (v < 0) | (v >= hi)
        if bad.any():
            i = int(bad.nonzero()[0])
            raise ValueError(f"edit {i}: {nm} {int(v[i])} out of range; the model/task has {hi} {what} "
                             f"(valid 0..{hi - 1}).")
    if edits.delta.shape[2] != dims.d_head:
        raise ValueError(f"ZEdits.delta has d_head {edits.delta.shape[2]} but the model's d_head is {dims.d_head}; "
                         "shape must be [n, span, d_head].")


@dataclass
class EditRun:
    """One ``run_z_edits`` call: the effects and what the engine did to measure them.

    ``path`` ("fast" / "hooks"), ``fast_kind``, ``reason`` (why not fast), ``edits``, ``skipped`` (exact zeros,
    no forward), ``forwards`` (batched forwards run), ``positions`` (edit-positions recomputed).
    ``run["path"]`` reads a field like a dict.
    """

    effects: Float[Tensor, "n"]
    path: str
    fast_kind: Optional[str]
    reason: str
    edits: int
    skipped: int = 0
    forwards: int = 0
    positions: int = 0

    def info(self) -> Dict[str, Any]:
        """The telemetry as a dict (everything but ``effects``)."""
        return {k: getattr(self, k) for k in ("path", "fast_kind", "reason", "edits", "skipped", "forwards", "positions")}

    def __getitem__(self, key: str):
        return self.info()[key]


def measure_z_edits(model, task: Task, edits: ZEdits, *, edits_per_forward: Optional[int] = None,
                    progress: bool = True, clean: Optional[CleanRun] = None, path: str = "auto",
                    **deprecated) -> Float[Tensor, "n"]:
    """``m(clean) - m(edited)`` per z edit, from real (batched, partial) forward passes.

    ``edits_per_forward``: edits per forward (default: what fits ``MEMORY_BUDGET``; the old name
    ``batch_size`` still works, with a DeprecationWarning). ``clean``: a ``prepare_clean(model, task)``
    result to reuse. ``path``: "auto", "fast" or "hooks". ``run_z_edits`` returns the same effects with
    what the engine did.
    """
    return run_z_edits(model, task, edits, edits_per_forward=edits_per_forward, progress=progress, clean=clean,
                       path=path, **deprecated).effects


def run_z_edits(model, task: Task, edits: ZEdits, *, edits_per_forward: Optional[int] = None, progress: bool = True,
                clean: Optional[CleanRun] = None, path: str = "auto", **deprecated) -> EditRun:
    """``measure_z_edits`` returning an :class:`EditRun`: the effects and the engine's telemetry."""
    name = "batch_size" if "batch_size" in deprecated else "edits_per_forward"   # the name the caller used
    batch_size = renamed_keyword(deprecated, "batch_size", "edits_per_forward", edits_per_forward, "measure_z_edits")
    if path not in PATHS:
        raise ValueError(f"unknown path {path!r}; valid: {', '.join(PATHS)}.")
    if batch_size is not None and int(batch_size) < 1:
        raise ValueError(f"{name} (edits per forward) must be >= 1 (or None for automatic); got {batch_size}.")
    validate_task(task, model)    # the one task check, also when clean= is given
    dims = model_facts(model)
    _validate(edits, task, dims)
    if clean is None:
        per_prompt = _clean_bytes(dims, task.tokens.shape[1], _model_dtype(model))
        max_prompts = max(1, int(CLEAN_BUDGET // max(per_prompt, 1)))
        if len(task) > max_prompts:
            return _measure_by_prompt_chunks(model, task, edits, max_prompts, batch_size, progress, path)
        clean = prepare_clean(model, task, path=path)
    else:
        clean.check(model, task)
        if clean.path == "fast" and has_user_forward_hooks(model):
            if path == "fast":
                raise ValueError("the model carries forward hooks, which the fast path would bypass; remove them "
                                 "or use path='auto' / 'hooks'.")
            warnings.warn("selfrepair.engine: the model now carries forward hooks; re-preparing the clean run "
                          "on the hook path so that they apply.")
            clean = prepare_clean(model, task, path="hooks")
        if path == "fast" and clean.path != "fast":
            raise ValueError(f"path='fast' requested but clean= was prepared on the hook path ({clean.reason}).")
        if path == "hooks" and clean.path != "hooks":
            raise ValueError("path='hooks' requested but clean= was prepared on the fast path; "
                             "call prepare_clean(model, task, path='hooks').")
    mdt = _model_dtype(model)
    od = _out_dtype(mdt)
    n = len(edits)
    out = torch.zeros(n, dtype=od)
    run = EditRun(out, path=clean.path, fast_kind=clean.fast_kind, reason=clean.reason, edits=n)
    if n == 0:
        return run
    P = task.positions[edits.prompt]
    # nothing after the metric position reaches it; at the last layer only the metric position does
    live = (edits.start <= P) & ((edits.layer < dims.n_layers - 1) | (edits.start + edits.span - 1 >= P))
    run.skipped = int((~live).sum())
    idx = live.nonzero()[:, 0]
    if idx.numel() == 0:
        return run
    with torch.no_grad():
        if clean.path == "fast":
            vals = _measure_fast(model, task, edits, idx, clean, dims, batch_size, progress, run)
        else:
            vals = _measure_hooks(model, task, edits, idx, clean, dims, batch_size, progress, run)
    out[idx] = clean.metric[edits.prompt[idx]].to(od) - vals.to(od).cpu()
    return run


def _clean_bytes(dims: ModelFacts, T: int, dtype: torch.dtype) -> int:
    """Bytes one prompt's CleanRun holds on the fast path (residuals, z, keys, values)."""
    el = torch.finfo(dtype).bits // 8
    L = dims.n_layers
    return el * T * ((L + 1) * dims.d_model + L * dims.n_heads * dims.d_head + 2 * L * dims.n_kv_heads * dims.d_head)


def _measure_by_prompt_chunks(model, task, edits, max_prompts, batch_size, progress, path) -> EditRun:
    """run_z_edits over groups of prompts, so that each group's CleanRun fits CLEAN_BUDGET."""
    out = torch.zeros(len(edits), dtype=_out_dtype(_model_dtype(model)))
    stats = dict(forwards=0, skipped=0, positions=0)
    info: Dict[str, Any] = dict(path=path, fast_kind=None, reason="")
    for s in tqdm(range(0, len(task), max_prompts), desc="prompt groups", disable=not progress, leave=False):
        sel = ((edits.prompt >= s) & (edits.prompt < s + max_prompts)).nonzero()[:, 0]
        if sel.numel() == 0:
            continue
        sub = task.subset(slice(s, s + max_prompts))
        e = edits[sel]
        e = ZEdits(e.prompt - s, e.layer, e.head, e.start, e.delta)
        part = run_z_edits(model, sub, e, edits_per_forward=batch_size, progress=progress, path=path)
        out[sel] = part.effects
        for k in stats:
            stats[k] += getattr(part, k)
        info = part.info()
    info.update(stats, edits=len(edits))
    return EditRun(out, **info)


def _chunks_by_window(starts: Tensor, P: int, max_tokens: int, max_edits: Optional[int]):
    """Split edits (sorted by start, descending) into chunks with a bounded window waste.

    Yields ``(i, j, s0)``: the chunk is ``starts[i:j]``. A chunk's window is [s0, P] with s0 its
    smallest start; a new chunk begins when the window would grow past 1.15x + 4 of the
    chunk's first window, when it would hold more than ``max_tokens`` edit-positions, or
    more than ``max_edits`` edits.
    """
    n = starts.shape[0]
    i = 0
    st = starts.tolist()
    while i < n:
        w0 = P - st[i] + 1
        j = i + 1
        while j < n:
            w = P - st[j] + 1
            if w > 1.15 * w0 + 4 or (j - i + 1) * w > max_tokens or (max_edits and j - i + 1 > max_edits):
                break
            j += 1
        yield i, j, st[j - 1]
        i = j


def _measure_fast(model, task, edits, idx, clean: CleanRun, dims: ModelFacts, batch_size, progress,
                  run: EditRun) -> Tensor:
    fm: FastModel = clean._fm
    dev, mdt = _model_device(model), _model_dtype(model)
    L = dims.n_layers
    vals = torch.zeros(idx.numel(), dtype=_out_dtype(mdt))
    pr, ly = edits.prompt[idx], edits.layer[idx]
    # group by (prompt, layer); inside, sort by start descending (smallest window first)
    key = (pr * L + ly) * (int(edits.start.max()) + 2) + (int(edits.start.max()) + 1 - edits.start[idx])
    order = torch.argsort(key, stable=True)
    plan = []
    gkey = (pr * L + ly)[order]
    bounds = torch.nonzero(torch.diff(gkey, prepend=gkey[:1] - 1)).flatten().tolist() + [order.numel()]
    for a, b in zip(bounds[:-1], bounds[1:]):
        sel = order[a:b]
        p, l = int(pr[sel[0]]), int(ly[sel[0]])
        Pp = int(task.positions[p])
        per_tok = _bytes_per_token(dims, Pp + 1, mdt)
        max_tokens = max(1, MEMORY_BUDGET // per_tok)
        for i, j, s0 in _chunks_by_window(edits.start[idx[sel]], Pp, max_tokens, batch_size):
            plan.append((p, l, s0, Pp, sel[i:j]))
    it = tqdm(plan, desc="global ablations", unit="batch", disable=not progress, leave=False)
    for p, l, s0, Pp, sel in it:
        e = idx[sel]
        hP = _fast_chunk(fm, clean, dims, p, l, s0, Pp, edits.head[e].to(dev), edits.start[e].to(dev),
                         edits.delta[e].to(device=dev, dtype=mdt))
        logits = fm.final_logits(hP)
        vals[sel] = task.metric_fn(logits.to(vals.dtype), torch.full((len(sel),), p, dtype=torch.long)).to(vals.dtype).cpu()
        run.forwards += 1
        run.positions += len(sel) * (Pp - s0 + 1)
    return vals


def _fast_chunk(fm: FastModel, clean: CleanRun, dims: ModelFacts, p: int, l: int, s0: int, P: int,
                head: Tensor, start: Tensor, delta: Tensor) -> Tensor:
    """Final residual at the metric position [n, d_model] for n edits of prompt p at layer l."""
    L, H, dh = dims.n_layers, dims.n_heads, dims.d_head
    n, span = delta.shape[0], delta.shape[1]
    dev = delta.device
    # ---- the edited layer: only the edited positions change (o-projection + MLP there)
    pos = start[:, None] + torch.arange(span, device=dev)[None, :]          # [n, span]
    valid = pos <= P
    if l == L - 1:
        valid = pos == P                                                    # nothing else reaches the metric
    e_idx, t_idx = valid.nonzero(as_tuple=True)
    pe = pos[e_idx, t_idx]
    blk = fm.blocks[l]
    z_new = clean.z[l][p, pe].clone()                                       # [M, H, dh]
    z_new[torch.arange(e_idx.numel(), device=dev), head[e_idx]] += delta[e_idx, t_idx]
    mid = clean.resid[l][p, pe] + blk["o"](z_new.flatten(-2))
    post = mid + fm.mlp(l, blk["ln2"](mid))
    if l == L - 1:
        hP = clean.resid[L][p, P].expand(n, -1).clone()
        hP[e_idx] = post
        return hP
    W = P - s0 + 1
    h = clean.resid[l + 1][p, s0:P + 1].expand(n, W, -1).clone()           # [n, W, d]
    h[e_idx, pe - s0] = post
    win_mask = torch.ones(W, W, dtype=torch.bool, device=dev).tril()        # window keys, causal
    for l2 in range(l + 1, L):
        blk = fm.blocks[l2]
        last = l2 == L - 1
        x = blk["ln1"](h)
        q, k, v = fm.qkv(l2, x, s0, q_rows=slice(W - 1, W) if last else None)   # q [n, Wq, H, dh]
        Wq = q.shape[1]
        Kp, Vp = clean.k[l2][p, :s0], clean.v[l2][p, :s0]                  # [s0, kvh, dh], shared
        z = fm.attend(l2, q, k, v, Kp, Vp, win_mask[W - Wq:])                # [n, H, Wq, dh]
        attn_out = blk["o"](z.permute(0, 2, 1, 3).flatten(-2))             # [n, Wq, d]
        if last:
            hP = h[:, -1] + attn_out[:, -1]
            return hP + fm.mlp(l2, blk["ln2"](hP))
        h = h + attn_out
        h = h + fm.mlp(l2, blk["ln2"](h))
    return h[:, -1]


def _measure_hooks(model, task, edits, idx, clean: CleanRun, dims: ModelFacts, batch_size, progress,
                   run: EditRun) -> Tensor:
    dev, mdt = _model_device(model), _model_dtype(model)
    L = dims.n_layers
    vals = torch.zeros(idx.numel(), dtype=_out_dtype(mdt))
    use_sal = clean.resid is not None
    pr, ly = edits.prompt[idx], edits.layer[idx]
    Pn = task.positions[pr]
    # sort by (layer if start_at_layer) then metric position (similar lengths share forwards)
    key = (ly * (int(Pn.max()) + 1) + Pn) if use_sal else Pn
    order = torch.argsort(key, descending=False, stable=True)
    plan = []
    i = 0
    N = order.numel()
    while i < N:
        j = i
        maxP = 0
        while j < N:
            if use_sal and int(ly[order[j]]) != int(ly[order[i]]):
                break
            mp = max(maxP, int(Pn[order[j]]))
            per_row = _bytes_per_token(dims, mp + 1, mdt, vocab=clean.unembed_mode == "full") * (mp + 1) * 2
            cap = batch_size or max(1, MEMORY_BUDGET // max(per_row, 1))
            if j - i + 1 > cap:
                break
            maxP = mp
            j += 1
        plan.append(order[i:j])
        i = j
    it = tqdm(plan, desc="global ablations", unit="batch", disable=not progress, leave=False)
    for sel in it:
        e = idx[sel]
        prm, pos = edits.prompt[e], task.positions[edits.prompt[e]]
        Tn = int(pos.max()) + 1
        toks = task.tokens[prm, :Tn].to(dev)
        n = len(sel)
        hooks = []
        for l in torch.unique(edits.layer[e]).tolist():
            rows = (edits.layer[e] == l).nonzero()[:, 0]
            span = edits.delta.shape[1]
            pp = edits.start[e][rows][:, None] + torch.arange(span)[None, :]
            ok = pp <= pos[rows][:, None]
            r_i, t_i = ok.nonzero(as_tuple=True)
            R, Pp = rows[r_i].to(dev), pp[r_i, t_i].to(dev)
            Hh = edits.head[e][rows][r_i].to(dev)
            D = edits.delta[e][rows][r_i, t_i].to(dev)

            def fn(z, hook, R=R, Pp=Pp, Hh=Hh, D=D):
                z = z.clone()
                dz = z.device  # a model split over devices: each layer's z on its own device
                z.index_put_((R.to(dz), Pp.to(dz), Hh.to(dz)), D.to(dz, z.dtype), accumulate=True)
                return z

            hooks.append((dims.z_hook.format(layer=l), fn))
        if use_sal:
            l0 = int(edits.layer[e][0])
            resid = clean.resid[l0][prm, :Tn].to(dev)
            logits = _hooks_forward(model, dims, toks, pos.to(dev), hooks, clean.unembed_mode, l0, resid)
        else:
            logits = _hooks_forward(model, dims, toks, pos.to(dev), hooks, clean.unembed_mode)
        vals[sel] = task.metric_fn(logits.to(vals.dtype), prm).to(vals.dtype).cpu()
        run.forwards += 1
        run.positions += n * Tn
    return vals


# --------------------------------------------------------------------------- helpers


def replace_z(clean: CleanRun, prompt, layer, head, start, value: Float[Tensor, "n span d_head"]) -> ZEdits:
    """Edits that SET ``z[prompt, start + t, head] = value[:, t]`` (delta = value - clean z)."""
    prompt = torch.as_tensor(prompt, dtype=torch.long).reshape(-1)
    layer = torch.as_tensor(layer, dtype=torch.long).reshape(-1)
    head = torch.as_tensor(head, dtype=torch.long).reshape(-1)
    start = torch.as_tensor(start, dtype=torch.long).reshape(-1)
    value = torch.as_tensor(value)
    if value.ndim == 2:
        value = value[:, None, :]
    n, span = value.shape[0], value.shape[1]
    for nm, t in (("prompt", prompt), ("layer", layer), ("head", head), ("start", start)):
        if t.shape[0] != n:
            raise ValueError(f"replace_z: {nm} has {t.shape[0]} entries for {n} values.")
    L = len(clean.z)
    if ((layer < 0) | (layer >= L)).any():
        raise ValueError(f"replace_z: layer out of range 0..{L - 1}.")
    B, T, H, dh = clean.z[0].shape
    if ((prompt < 0) | (prompt >= B)).any() or ((head < 0) | (head >= H)).any():
        raise ValueError(f"replace_z: prompt must lie in 0..{B - 1} and head in 0..{H - 1}.")
    if value.shape[2] != dh:
        raise ValueError(f"replace_z: value has d_head {value.shape[2]}, the model's is {dh}.")
    pos = start[:, None] + torch.arange(span)[None, :]
    inside = pos < T
    posc = pos.clamp(max=T - 1)
    cur = torch.zeros(n, span, dh, dtype=clean.z[0].dtype)
    for l in torch.unique(layer).tolist():                        # a loop over layers, not edits
        r = (layer == l).nonzero()[:, 0]
        zl = clean.z[l]
        cur[r] = zl[prompt[r][:, None].to(zl.device), posc[r].to(zl.device), head[r][:, None].to(zl.device)].cpu()
    delta = torch.where(inside[..., None], value.to(cur.dtype) - cur, torch.zeros((), dtype=cur.dtype))
    return ZEdits(prompt, layer, head, start, delta)


def flops(model, task: Task, edits: ZEdits) -> Dict[str, float]:
    """FLOP model of the global-ablation workload (multiply-add = 2 FLOPs; norms, softmax ignored).

    Per token and layer: ``proj = 2 d (H dh) + 2*2 d (kvh dh) + 2 (H dh) d`` (q, k, v, o),
    ``attn(i) = 2*2 H dh (i + 1)`` for query position i (scores and mixing over keys 0..i),
    ``mlp = 2 d d_mlp * (3 if gated else 2)``; unembedding ``2 d V`` per token.

    * ``baseline``: per edit, one full forward of the prompt (its real length T_b) through all
      layers with full logits (T_b unembeddings): what one ``run_with_hooks`` per ablation costs.
    * ``minimum`` (issue 6's model): per edit at layer l from position s, layers l..L-1 at
      positions s..P only (P the metric position) and one unembedding; 0 when s > P.
    * ``minimum_tight``: what this engine's algorithm needs at least: at layer l only the edited
      positions <= P change (o-projection + MLP there; at the last layer only P counts); layers
      l+1..L-2 in full at positions s..P; the last layer k, v at s..P and q, attention, o, MLP at
      P only; one unembedding.

    Returns ``dict(baseline, minimum, minimum_tight, ideal_speedup=baseline / minimum,
    ideal_speedup_tight=baseline / minimum_tight)``.
    """
    d = model_facts(model)
    _validate(edits, task, d)
    qo = 2 * d.d_model * d.n_heads * d.d_head
    kv = 4 * d.d_model * d.n_kv_heads * d.d_head
    proj = 2 * qo + kv
    mlp = 2 * d.d_model * d.d_mlp * (3 if d.gated else 2)
    un = 2 * d.d_model * d.d_vocab
    a = 4 * d.n_heads * d.d_head
    L = d.n_layers

    def layer_cost(s, e):  # positions s..e inclusive (tensors)
        npos = (e - s + 1).clamp(min=0).double()
        keys = ((e + 1) * (e + 2) / 2 - s * (s + 1) / 2).double()   # sum_{i=s}^{e} (i + 1)
        return npos * (proj + mlp) + a * keys

    T = task.lengths[edits.prompt]
    zero = torch.zeros_like(T)
    base = (L * layer_cost(zero, T - 1) + T.double() * un).sum()
    P = task.positions[edits.prompt]
    s = edits.start
    live = s <= P
    z64 = torch.zeros((), dtype=torch.float64)
    nl = (L - edits.layer).double()
    mn = torch.where(live, nl * layer_cost(s, P) + un, z64).sum()
    # tight
    l = edits.layer
    n_edit = (torch.minimum(s + edits.span - 1, P) - s + 1).clamp(min=0).double()
    at_l = torch.where(l == L - 1, ((s + edits.span - 1) >= P).double(), n_edit) * (qo + mlp)
    mids = (L - 2 - l).clamp(min=0).double() * layer_cost(s, P)
    last = torch.where(l < L - 1, (P - s + 1).double() * kv + qo * 2 + mlp + a * (P + 1).double(), z64)
    tight = torch.where(live, at_l + mids + last + un, z64).sum()
    base, mn, tight = float(base), float(mn), float(tight)
    inf = float("inf")
    return dict(baseline=base, minimum=mn, minimum_tight=tight, ideal_speedup=base / mn if mn > 0 else inf,
                ideal_speedup_tight=base / tight if tight > 0 else inf)
