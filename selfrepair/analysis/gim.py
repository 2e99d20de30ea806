"""GIM (docs/quantities.md, "GIM"): backward-only gradient modifications through TransformerLens hooks.

``with gim(model): ...`` leaves every forward value unchanged and changes the
backward pass of anything computed inside the block:

1. TSG at every attention softmax (and nowhere else): the gradient reaching the
   scores is ``s * (g - <s, g>)`` with ``s = softmax(a / T)`` and ``g = dm/dp``,
   with no ``1/T`` factor (as in the paper's code and its package).
   Where the backend has a live scores site (HF-wrapped bridges, TL 3) gim
   remembers the scores ``a`` at ``hook_attn_scores`` (no copy) and, at
   ``hook_pattern``, splices in one autograd function whose forward returns the
   backend's pattern unchanged and whose backward sends ``s * (g - <s, g>)``
   straight to ``a``: the backend's own softmax backward is off the graph and
   never runs, and ``s`` is computed once, in the backward. Masked keys get
   ``s = 0`` because the backend already filled them (-inf in TL 3, the dtype
   minimum in HF bridges; rows with no key at all, TL 3 left padding, give 0).
   If another hook runs after gim's at the scores, or the scores are edited in
   place, the softmax's input is not the tensor gim saw, and it falls back to
   the pattern-site form below. Where there is no live scores site (TL 4 native
   bridges) an identity at ``hook_pattern`` hands the true softmax backward
   ``g' = s * (g - <s, g>) / p`` (0 where ``p = 0``), ``s = p^(1/T) / sum p^(1/T)``,
   computed in float32 or better, which the softmax maps to the same result.
   A softmax in the user's metric or anywhere else keeps its true gradient:
   nothing is patched process-wide.
2. Normalisation freeze: every LayerNorm / RMSNorm scale (``hook_scale``, incl.
   ``ln_final``) is a constant in the backward pass, through the probe's
   ``norm_freeze_hooks``: ``hook_scale.detach()``, or, where a bridge would then
   rebuild the norm output differently (HF Llama bridges), a straight-through
   edit at ``hook_normalized`` that keeps the value bit-identical. Tests check it
   against autograd through a hand-built norm with a detached scale.
3. Gradient multipliers at ``hook_q`` / ``hook_k`` / ``hook_v`` (x 1/4, 1/4, 1/2).
4. Gated MLPs (SwiGLU, GeGLU): gate and up branch outputs x 1/2 each.

Each component is off when its argument is ``None`` (or ``1`` / ``False``);
with all off the gradients are exactly plain autograd. The hooks are
registered directly on the hook points (TSG's pattern hook first, so it sees
the softmax output before any user edit; every other hook after the user's),
as permanent hooks owned by the context (a ``model.reset_hooks()`` inside the
block leaves them), removed on exit also when the block raises; the user's own
hooks are never touched. On a normal exit it checks that every hook it needed fired in every
layer a forward pass reached (a forward-free block passes).

Cost: a forward without gradients inside the block does no extra work; with them, the identities
return aliases (no copies) unless another hook runs at the same point (then a copy, so that
hook may edit in place). ``benchmarks/run.py`` measures the overhead (``gim_overhead``).
"""

from __future__ import annotations

import functools
import math
import re
import warnings
import weakref
from contextlib import ExitStack, contextmanager
from typing import Callable, Dict, Iterator, Optional, Tuple

import torch

from .._devices import analysis_dtype as _out_dtype
from ..models.norm_freeze import freeze_hooks
from ..models.probe import Backend, probe

__all__ = ["gim", "GIMHookError", "tsg_scores_grad", "tsg_pattern_grad", "norm_freeze_hooks"]


class GIMHookError(RuntimeError):
    """A hook site GIM needs is missing, or did not fire during a forward pass."""


# ----------------------------------------------------------------------------- pure formulas


def _causal(nq: int, nk: int, device) -> torch.Tensor:
    """Causal key mask [q, k]: query i (the last nq of nk positions) sees keys j <= i."""
    return torch.ones(nq, nk, dtype=torch.bool, device=device).tril(diagonal=nk - nq)


def tsg_scores_grad(scores: torch.Tensor, grad_pattern: torch.Tensor, temperature: float) -> torch.Tensor:
    """TSG gradient at the scores: ``s * (g - <s, g>)``, ``s = softmax(a / T)`` over the unmasked keys.

    ``scores`` [..., q, k] are the masked scores (masked entries -inf or very
    negative); the causal mask is applied on top. Rows without any unmasked
    key give 0. Computed in float32 or better; returned in that dtype.
    """
    a = scores.detach().to(_out_dtype(scores.dtype))
    nq, nk = a.shape[-2:]
    a = a.masked_fill(~_causal(nq, nk, a.device), float("-inf"))
    return _tsg_from_scores(a, grad_pattern, float(temperature), nan_rows=True)


def tsg_pattern_grad(pattern: torch.Tensor, grad_pattern: torch.Tensor, temperature: float) -> torch.Tensor:
    """The pattern gradient ``g' = s * (g - <s, g>) / p`` (0 where p = 0), ``s = p^(1/T) / sum p^(1/T)``,
    that the true softmax backward ``p * (g' - <p, g'>)`` maps to the TSG gradient ``s * (g - <s, g>)``
    (docs/quantities.md, "GIM"). Computed in float32 or better; returned in that dtype."""
    return _tsg_from_pattern(pattern.detach().clamp_min(0), grad_pattern, float(temperature))


# ----------------------------------------------------------------------------- autograd pieces
# Every function is an identity in the forward pass with bit-identical values. Its output is
# an alias of the input (``view_as``: no copy) when no other hook runs after gim's at that hook
# point, else a copy: a user's hook may edit the tensor in place, which autograd forbids on an
# alias made inside a custom Function.


def _same(x: torch.Tensor, copy: bool) -> torch.Tensor:
    return x.clone() if copy else x.view_as(x)


def _softmax_backward(g: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """``s * (g - <s, g>)`` over the last dim (one fused kernel where torch has it)."""
    fused = getattr(torch, "_softmax_backward_data", None)
    if fused is not None:
        try:
            return fused(g, s, -1, s.dtype)
        except (TypeError, RuntimeError):  # a torch whose private signature differs
            pass
    t = s * g
    return t.addcmul_(s, t.sum(-1, keepdim=True), value=-1.0)


#: CPU: rows are processed in blocks of about this many bytes, so the temporaries stay in cache
#: and reuse one small allocation instead of faulting in fresh pages for every full-size tensor
_BLOCK_BYTES = 1 << 18


def _by_rows(fn: Callable, x: torch.Tensor, g: torch.Tensor, *args) -> torch.Tensor:
    """``fn(x, g, *args)`` on [..., k] tensors, row block by row block on the CPU (one call elsewhere)."""
    k = x.shape[-1]
    cd = _out_dtype(x.dtype)
    rows = max(1, _BLOCK_BYTES // (k * torch.finfo(cd).bits // 8))
    X, G = x.reshape(-1, k), g.reshape(-1, k)
    if x.device.type != "cpu" or X.shape[0] <= rows:
        return fn(X, G, *args).view(x.shape)
    out = torch.empty(X.shape, dtype=cd, device=x.device)
    for i in range(0, X.shape[0], rows):
        out[i:i + rows] = fn(X[i:i + rows], G[i:i + rows], *args)
    return out.view(x.shape)


def _tsg_from_scores_rows(a: torch.Tensor, g: torch.Tensor, temperature: float, nan_rows: bool) -> torch.Tensor:
    cd = _out_dtype(a.dtype)
    s = torch.softmax(a.to(cd) * (1.0 / temperature), dim=-1)
    if nan_rows:
        s.nan_to_num_(0.0)
    return _softmax_backward(g.to(cd), s)


def _tsg_from_scores(a: torch.Tensor, g: torch.Tensor, temperature: float, nan_rows: bool) -> torch.Tensor:
    """``s * (g - <s, g>)``, ``s = softmax(a / T)`` for scores whose masked keys the backend already
    filled (no explicit mask), in float32 or better. ``nan_rows``: the fill is -inf, so a row may
    have no key at all (TL 3 left padding) and gets 0."""
    return _by_rows(_tsg_from_scores_rows, a, g, temperature, nan_rows)


def _tsg_from_pattern_rows(p: torch.Tensor, g: torch.Tensor, temperature: float) -> torch.Tensor:
    cd = _out_dtype(p.dtype)
    p, g = p.to(cd), g.to(cd)
    w = p.rsqrt() if temperature == 2.0 else p.pow(1.0 / temperature - 1.0)   # w = p^(1/T - 1)
    w.masked_fill_(p == 0, 0.0)                                  # g' = 0 where p = 0 (a cast may follow)
    s = p * w                                                    # p^(1/T)
    tot = s.sum(-1, keepdim=True)
    tot.masked_fill_(tot == 0, 1.0)
    c = s.mul_(g).sum(-1, keepdim=True).div_(tot)                # <s, g> with s normalised
    return torch.sub(g, c).mul_(w.div_(tot))                     # (s / p) * (g - <s, g>)


def _tsg_from_pattern(p: torch.Tensor, g: torch.Tensor, temperature: float) -> torch.Tensor:
    """A pattern gradient ``g'`` that the true softmax backward ``p * (g' - <p, g'>)`` maps to the
    TSG gradient ``s * (g - <s, g>)``, ``s = p^(1/T) / sum p^(1/T)``: ``g' = (s / p) (g - <s, g>)``,
    and ``g' = 0`` where ``p = 0`` (a large value there would overflow where the backend casts the
    gradient down before its softmax, as HF Llama does)."""
    return _by_rows(_tsg_from_pattern_rows, p, g, temperature)


class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale, copy):
        ctx.scale = scale
        return _same(x, copy)

    @staticmethod
    def backward(ctx, g):
        return g * ctx.scale, None, None


class _TSGSoftmax(torch.autograd.Function):
    """The attention softmax with the TSG backward, spliced in at ``hook_pattern``.

    Forward: returns the backend's own pattern ``p`` (values untouched). Backward:
    returns ``s * (g - <s, g>)``, ``s = softmax(a / T)``, straight to the scores
    ``a`` that the paired ``hook_attn_scores`` saw, so the backend's own softmax
    backward never runs (``p`` enters detached: the softmax is off the graph).
    ``a`` is saved as is (autograd's version counter guards it) and ``s`` is
    computed once, in the backward, in float32 or better.
    """

    @staticmethod
    def forward(ctx, a, p, temperature, nan_rows, copy):
        ctx.temperature, ctx.nan_rows = temperature, nan_rows
        ctx.save_for_backward(a)
        return _same(p, copy)

    @staticmethod
    def backward(ctx, g):
        (a,) = ctx.saved_tensors
        return _tsg_from_scores(a, g, ctx.temperature, ctx.nan_rows).to(a.dtype), None, None, None, None


class _TSGAtPattern(torch.autograd.Function):
    """Identity on the softmax output p; backward hands ``s * (g - <s, g>) / p`` to the softmax."""

    @staticmethod
    def forward(ctx, p, temperature, copy):
        ctx.temperature = temperature
        ctx.save_for_backward(p)       # the softmax saved it too: an in-place edit would fail both
        return _same(p, copy)

    @staticmethod
    def backward(ctx, g):
        (p,) = ctx.saved_tensors
        return _tsg_from_pattern(p, g, ctx.temperature).to(g.dtype), None, None


def _others_after(hook) -> bool:
    """True if the hook point runs any forward hook besides the calling one (which is first or last);
    also when that cannot be told (then gim copies, which is always safe)."""
    fwd = getattr(hook, "_forward_hooks", None)
    return fwd is None or len(fwd) > 1


# ----------------------------------------------------------------------------- hook bookkeeping


class _HookSet:
    """Forward hooks added straight to TL hook points, each removable by its own handle.

    Records which hooks fired; ``check`` raises if a layer a forward pass reached
    is missing one of its hooks.
    """

    def __init__(self, model):
        self.model = model
        self.hook_dict = model.hook_dict
        self.fired: Dict[Tuple[str, str], int] = {}
        self.layer_of: Dict[Tuple[str, str], Optional[int]] = {}
        self.handle_of: Dict[Tuple[str, str], Tuple[object, object]] = {}   # in the order added

    def point(self, name: str):
        hp = self.hook_dict.get(name)
        if hp is None:
            raise GIMHookError(
                f"gim needs the hook {name!r}, which this model does not have. The backend probe named it; "
                "load the model with selfrepair.load_model, or pass backend= with the right hook names.")
        return hp

    def add(self, component: str, name: str, layer: Optional[int], fn: Callable, *, prepend: bool = False):
        hp = self.point(name)
        key = (component, name)
        if key in self.handle_of:
            raise GIMHookError(f"gim: {component} added twice at {name!r} (the backend lists that hook twice).")
        self.fired[key] = 0
        self.layer_of[key] = layer

        def hook(x, hook):
            self.fired[key] += 1
            return fn(x, hook)

        hook.__name__ = f"gim_{component}"
        before = list(hp.fwd_hooks)
        handle = hp.add_hook(hook, dir="fwd", is_permanent=True, prepend=prepend)
        if handle is None:  # TL 3: add_hook returns nothing; find the handle it appended/prepended
            new = [h for h in hp.fwd_hooks if not any(h is b for b in before)]
            if len(new) != 1:
                raise GIMHookError(f"could not identify the hook gim added at {name!r}.")
            handle = new[0]
        self.handle_of[key] = (hp, handle)

    def missing(self) -> list:
        """The hooks gim added that are no longer registered at their hook point (e.g. removed by
        ``model.reset_hooks(including_permanent=True)`` or ``hook_point.remove_hooks(...)``)."""
        out = []
        for (component, name), (hp, handle) in list(self.handle_of.items()):
            hid = getattr(handle.hook, "id", None)
            fwd = getattr(hp, "_forward_hooks", None)
            if hid is not None and fwd is not None:
                present = hid in fwd
            else:  # cannot read torch's registry: the TL list is the record
                present = any(h is handle for h in hp.fwd_hooks)
            if not present:
                out.append(f"{component} at {name!r}")
        return out

    def verify(self, when: str) -> None:
        """Raise :class:`GIMHookError` if any hook gim added has disappeared."""
        gone = self.missing()
        if gone:
            more = f" (and {len(gone) - 3} more)" if len(gone) > 3 else ""
            raise GIMHookError(
                f"gim: {len(gone)} of its {len(self.handle_of)} hooks were removed inside the `with gim(model)` "
                f"block ({', '.join(gone[:3])}{more}), detected {when}: gradients computed from then on would be "
                "plain autograd, not GIM. Do not call model.reset_hooks(including_permanent=True) or remove "
                "hooks inside the block (model.reset_hooks() without it keeps gim's hooks); re-enter gim.")

    def runs_last(self, component: str, name: str) -> bool:
        """Whether gim's hook ``component`` is the last forward hook its hook point runs now."""
        hp, handle = self.handle_of[(component, name)]
        return next(reversed(hp._forward_hooks), None) == getattr(handle.hook, "id", None)

    def remove(self):
        """Remove exactly the hooks gim added (those already gone are skipped); never anyone else's."""
        while self.handle_of:
            _, (hp, handle) = self.handle_of.popitem()
            handle.hook.remove()
            hp.fwd_hooks[:] = [h for h in hp.fwd_hooks if h is not handle]

    def check(self):
        """Raise if a layer some forward pass reached lacks one of gim's hooks (no forward: pass).

        Hooks outside the blocks (``ln_final``'s scale) are not required: a forward stopped
        after the last block (``stop_at_layer``) legitimately never reaches them.
        """
        reached = {l for k, l in self.layer_of.items() if l is not None and self.fired[k]}
        missing = [f"{key[0]} at {key[1]!r}" for key, n in self.fired.items()
                   if not n and self.layer_of[key] in reached]
        if missing:
            raise GIMHookError(
                "gim: a forward pass ran inside the block but these hooks never fired, so their "
                f"gradient modifications were silently skipped: {', '.join(missing)}. The backend's "
                "hook names are wrong for this model (check selfrepair.probe(model)).")


# ----------------------------------------------------------------------------- components


def _off(x) -> bool:
    return x is None or x is False or (not isinstance(x, bool) and x == 1)


def _check_scale(name: str, x) -> Optional[float]:
    if _off(x):
        return None
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(float(x)):
        raise ValueError(f"gim: {name} must be a finite number (or None / 1 to switch it off); got {x!r}.")
    return float(x)


@contextmanager
def _tsg(hooks: _HookSet, backend, temperature: float) -> Iterator[None]:
    site = backend.score_site
    if site == "scores":
        if not backend.scores_hook or not getattr(backend, "scores_live", True):
            raise GIMHookError("gim: the backend reports score_site='scores' but has no live scores hook; "
                               "TSG cannot be applied there.")
        pending: Dict[int, Tuple[torch.Tensor, int, bool]] = {}
        fill = getattr(backend, "masked_score_value", None)
        nan_rows = fill is None or not math.isfinite(fill)   # finite fills never leave a row without keys

        def at_scores(layer, name):
            def fn(a, hook):
                # ours must be the last hook to touch the scores: if a hook added later (a user's
                # run_with_hooks inside the block) runs after it, the softmax's input is not ``a``
                last = hooks.runs_last("tsg_scores", name)
                pending[layer] = (a, a._version, last)  # a reference, no copy: the backward recomputes s
                return a
            return fn

        def at_pattern(layer):
            def fn(p, hook):
                if layer not in pending:
                    raise GIMHookError(f"gim: hook_pattern of layer {layer} fired without its scores hook "
                                       "firing first; TSG cannot pair the softmax's input and output.")
                a, version, last = pending.pop(layer)
                if not (torch.is_grad_enabled() and p.requires_grad):
                    return p                            # no backward will run: nothing to do
                if a.shape != p.shape:
                    raise GIMHookError(f"gim: TSG at layer {layer}: scores shape {tuple(a.shape)} != pattern shape "
                                       f"{tuple(p.shape)}; the backend's scores and pattern hooks are not one "
                                       "softmax's input and output.")
                copy = _others_after(hook)
                if not last or a._version != version or not a.requires_grad:
                    # another hook ran after ours, or the scores were edited in place (or cut off the
                    # graph): the softmax's input is not the tensor we saw, so take s from p (the
                    # pattern-site TSG)
                    return _TSGAtPattern.apply(p, temperature, copy)
                return _TSGSoftmax.apply(a, p.detach(), temperature, nan_rows, copy)
            return fn

        for l in range(backend.n_layers):
            # scores: after the user's hooks (closest to the softmax); pattern: before them
            name = backend.hook(backend.scores_hook, l)
            hooks.add("tsg_scores", name, l, at_scores(l, name))
            hooks.add("tsg_pattern", backend.hook(backend.pattern_hook, l), l, at_pattern(l), prepend=True)
        try:
            yield
        finally:
            pending.clear()
    elif site == "pattern":
        def fn(p, hook):
            if not (torch.is_grad_enabled() and p.requires_grad):
                return p
            return _TSGAtPattern.apply(p, temperature, _others_after(hook))

        for l in range(backend.n_layers):
            hooks.add("tsg_pattern", backend.hook(backend.pattern_hook, l), l, fn, prepend=True)
        yield
    else:
        raise GIMHookError(f"gim: unknown score_site {site!r} in the backend (expected 'scores' or 'pattern').")


_LAYER = re.compile(r"^blocks\.(\d+)\.")
_NORM_WARNING = re.escape("A forward hook edited hook_scale/hook_normalized on the native-autograd path")


@contextmanager
def _freeze_norm(hooks: _HookSet, model, backend) -> Iterator[None]:
    """The probe's norm-freeze hooks: ``hook_scale.detach()``, or where the backend would then
    rebuild the norm output (HF Llama bridges) a straight-through edit at ``hook_normalized``
    that keeps the forward bit-identical (``probe.norm_freeze_hooks``)."""

    if not tuple(backend.norm_scale_hooks or ()):
        raise GIMHookError("gim: freeze_norm=True but the backend lists no norm scale hooks (hook_scale); "
                           "pass freeze_norm=False for a model without normalisation.")
    err = float(getattr(backend, "norm_detach_rel_err", 0.0) or 0.0)
    if getattr(backend, "norm_freeze_method", "detach_scale") == "detach_scale" and err > 1e-6:
        warnings.warn(f"gim: freezing the norms moves this model's logits by {err:.2g} (relative), more than the "
                      "1e-6 docs/quantities.md ('GIM') allows: the backend rebuilds the norm from the detached scale in other "
                      "arithmetic. Gradients are still those of a frozen scale.")
    for name, fn in norm_freeze_hooks(model, backend):
        m = _LAYER.match(name)
        hooks.add("freeze_norm", name, int(m.group(1)) if m else None, fn)
    with warnings.catch_warnings():
        # the bridge warns that it rebuilds the norm output from the (detached) hooked scale
        warnings.filterwarnings("ignore", message=_NORM_WARNING)
        yield


def _scale_hook(x, hook, scale):
    if not (torch.is_grad_enabled() and x.requires_grad):
        return x
    return _ScaleGrad.apply(x, scale, _others_after(hook))


@contextmanager
def _scale_site(hooks: _HookSet, backend, component: str, template: Optional[str], scale: float) -> Iterator[None]:
    if not template:
        raise GIMHookError(f"gim: {component} is on but the backend has no hook for it.")
    for l in range(backend.n_layers):
        hooks.add(component, backend.hook(template, l), l, functools.partial(_scale_hook, scale=scale))
    yield


# ----------------------------------------------------------------------------- nesting

#: models under an active ``gim`` block -> (its settings, its hook set); a nested block with the same
#: settings is a no-op, one with other settings raises
_ACTIVE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _active(model):
    try:
        return _ACTIVE.get(model)
    except TypeError:   # an object that cannot be weakly referenced: no nesting detection
        return None


def _describe(settings: dict) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in settings.items() if k != "backend")


def _check_temperature(temperature) -> Optional[float]:
    """``None`` / ``1`` (TSG off) or a finite temperature > 0; anything else is one ValueError."""
    if temperature is None or (not isinstance(temperature, bool) and isinstance(temperature, (int, float))
                               and temperature == 1):
        return None
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) \
            or not math.isfinite(float(temperature)) or not float(temperature) > 0:
        raise ValueError(f"gim: temperature must be a finite number > 0 (or None / 1 for no TSG); "
                         f"got {temperature!r}.")
    return float(temperature)


# ----------------------------------------------------------------------------- public


@contextmanager
def gim(
    model,
    *,
    temperature: Optional[float] = 2.0,
    freeze_norm: bool = True,
    q_scale: Optional[float] = 0.25,
    k_scale: Optional[float] = 0.25,
    v_scale: Optional[float] = 0.5,
    gate_scale: Optional[float] = 0.5,
    up_scale: Optional[float] = 0.5,
    backend=None,
) -> Iterator[None]:
    """GIM backward pass for everything computed inside the block (module docstring; docs/quantities.md, "GIM").

    ``temperature``: TSG temperature T (> 0); ``freeze_norm``: detach every norm
    scale; ``q/k/v_scale``: gradient multipliers at ``hook_q/k/v``;
    ``gate/up_scale``: multipliers on the gated-MLP branches (ignored on models
    without a gated MLP). ``None`` / ``1`` / ``False`` switches a component off.
    ``backend`` overrides ``selfrepair.probe(model)``.

    Raises on entry if a needed hook is missing (e.g. a gated MLP whose gate/up
    branches the probe could not find), and on exit if a forward pass ran but
    one of the hooks never fired.

    Nesting: entering ``gim`` on a model already inside a ``gim`` block with the SAME settings
    (e.g. ``explain(model, task, method="gim")`` inside ``with gim(model):``) is a no-op: the inner
    block adds no hook and its exit removes none, so gradients are those of one GIM. With DIFFERENT
    settings it raises ``ValueError`` naming both (the two would stack their multipliers). If hooks
    gim added disappear inside the block (``model.reset_hooks(including_permanent=True)``, or a
    hook point's ``remove_hooks(including_permanent=True)``), the next forward pass through the model
    and the block's exit raise :class:`GIMHookError`; the remaining hooks are still removed.
    """
    T = _check_temperature(temperature)
    if not isinstance(freeze_norm, bool):
        raise ValueError(f"gim: freeze_norm must be True or False; got {freeze_norm!r}.")
    scales = {k: _check_scale(k, v) for k, v in
              dict(q_scale=q_scale, k_scale=k_scale, v_scale=v_scale, gate_scale=gate_scale, up_scale=up_scale).items()}
    if backend is None:
        backend = probe(model)
    settings = dict(temperature=T, freeze_norm=freeze_norm, **scales, backend=backend)
    outer = _active(model)
    if outer is not None:
        outer_settings, outer_hooks = outer
        if outer_settings != settings:
            raise ValueError(
                f"gim: the model is already inside a `with gim(model)` block with other settings "
                f"({_describe(outer_settings)}); a nested gim with ({_describe(settings)}) would apply both. "
                "Use the same settings (the inner block is then a no-op) or leave the outer block first.")
        outer_hooks.verify("on entering a nested gim")
        yield
        outer_hooks.verify("at the exit of a nested gim")
        return
    # gated if the probe measured two branches OR the model's config says so (the probe may miss them)
    gated = bool(backend.gated_mlp) or bool(getattr(getattr(model, "cfg", None), "gated_mlp", False))
    if gated and (scales["gate_scale"] is not None or scales["up_scale"] is not None):
        missing = [n for n, t in (("gate", backend.gate_hook), ("up", backend.up_hook)) if not t]
        if missing:
            raise GIMHookError(
                f"gim: the model has a gated MLP but the backend found no {' / '.join(missing)} branch hook, "
                "so the gate/up multipliers cannot be applied. Pass gate_scale=None, up_scale=None to run "
                "GIM without them, or report the architecture.")

    hooks = _HookSet(model)
    with ExitStack() as stack:
        stack.callback(hooks.remove)
        try:
            _ACTIVE[model] = (settings, hooks)
            stack.callback(_ACTIVE.pop, model, None)
        except TypeError:
            pass
        # every forward pass through the model checks that gim's hooks are all still there: at the model
        # itself and at each block (``run_with_hooks`` and ``start_at_layer`` call ``forward`` directly)
        for module in [model, *list(getattr(model, "blocks", None) or [])]:
            register = getattr(module, "register_forward_pre_hook", None)
            if register is not None:
                pre = register(lambda module, args: hooks.verify("at a forward pass inside the block"))
                stack.callback(pre.remove)
        if T is not None:
            stack.enter_context(_tsg(hooks, backend, T))
        if freeze_norm:
            stack.enter_context(_freeze_norm(hooks, model, backend))
        for comp, template in (("q_scale", backend.q_hook), ("k_scale", backend.k_hook), ("v_scale", backend.v_hook)):
            if scales[comp] is not None:
                stack.enter_context(_scale_site(hooks, backend, comp, template, scales[comp]))
        if gated:
            for comp, template in (("gate_scale", backend.gate_hook), ("up_scale", backend.up_hook)):
                if scales[comp] is not None:
                    stack.enter_context(_scale_site(hooks, backend, comp, template, scales[comp]))
        yield
        hooks.verify("at the exit of the block")
        hooks.check()


def norm_freeze_hooks(model, backend: Optional[Backend] = None) -> list:
    """Forward hooks that treat every LN/RMS scale as a constant in the backward pass (GIM rule 2).

    The forward is unchanged: bit-identical where the probe verified it
    (``backend.norm_freeze_method == "straight_through"``, or a detach the backend
    applies without recomputing), else within ``backend.norm_detach_rel_err``.
    Use as ``with model.hooks(fwd_hooks=norm_freeze_hooks(model)): ...``.
    """
    b = backend or probe(model)
    return freeze_hooks(b.norm_scale_hooks, b.n_layers, b.norm_type, b.norm_freeze_method)
