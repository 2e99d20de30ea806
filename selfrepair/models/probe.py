"""Backend probe: which hook sites of *this* model are live, measured, not looked up.

``probe(model) -> Backend`` runs a few tiny forward/backward passes (8 tokens,
batch 1) and measures, per model object (cached; cheap after the first call):

* liveness of a site: adding a perturbation ``delta`` (a leaf tensor) to the
  hook's output must move the logits AND ``d metric / d delta`` must be
  non-zero, with ``metric = sum(logits * w)`` for fixed random ``w``. A site
  that fires but whose edit is discarded (TL 4 native bridges at
  ``hook_attn_scores``) fails this;
* whether ``hook_attn_scores`` reports scores or the softmax pattern (rows of
  non-negative entries summing to 1), the value it holds at masked keys
  (``-inf`` on TL 3, the dtype minimum on HF-wrapped bridges) and which hooks
  reproduce it as ``q . k / attn_scale``;
* ``n_kv_heads`` from the shape of ``hook_k``, and which kv head serves each
  query head (``z_h = sum_k p_hk v_{kv(h), k}`` must hold);
* the norm type, from ``hook_scale`` against the norm input
  (LN: ``s^2 = var(x) + eps``, RMS: ``s^2 = mean(x^2) + eps``), and that
  detaching ``hook_scale`` leaves the forward within 1e-6 relative and turns
  the input gradient ``g_true`` into exactly the frozen-scale gradient ``g_f``:
  ``g_true = g_f - x_c (g_f . x_c) / (d s^2)`` (``x_c`` centred for LN);
* gated MLPs: two hook points A, B inside the MLP such that cutting the
  gradient through both removes the MLP's input gradient, through each alone
  removes a non-zero part and the two parts add up to the total; the branch in
  which the MLP output is linear (``f(2B) - f(0) = 2 (f(B) - f(0))``) is "up";
* q/k/v input hooks: cutting the gradient there must equal cutting it at
  ``hook_q`` / ``hook_k`` / ``hook_v`` (so the hook feeds that projection only);
* ``run_with_hooks(resid, start_at_layer=l)`` against the full forward.

Hook points gated off by a setting (``use_split_qkv_input`` on bridges and
TL 3) are switched on only if no default-on site passes, and recorded in
``Backend.enabled``.

Every template is a TransformerLens hook name with ``{layer}`` for the layer,
e.g. ``"blocks.{layer}.attn.hook_pattern"``; ``backend.hook(t, l)`` fills it.
"""

from __future__ import annotations

import math
import re
import warnings
import weakref
from dataclasses import dataclass, field, replace
from typing import Literal, Optional

import torch

from .._devices import model_device, model_dtype
from .facts import ModelFacts, model_facts
from .loading import model_kind
from .norm_freeze import freeze_hooks, straight_through_hooks

__all__ = ["Backend", "probe", "cached_backend", "resolve_backend", "ProbeError"]


class ProbeError(RuntimeError):
    """The model lacks a site the toolkit needs (e.g. no live pattern or z hook)."""


@dataclass(frozen=True)
class Backend:
    #: the model's dimensions, kind and architecture; n_heads, n_kv_heads (< n_heads under grouped-query
    #: attention: hook_k / hook_v have this many heads) and d_head as measured on the hooks
    facts: ModelFacts
    # attention sites
    q_hook: str                  # "blocks.{layer}.attn.hook_q"  [batch, pos, n_heads, d_head]
    k_hook: str                  # "blocks.{layer}.attn.hook_k"  [batch, pos, n_kv_heads, d_head]
    v_hook: str                  # "blocks.{layer}.attn.hook_v"  [batch, pos, n_kv_heads, d_head]
    scores_hook: Optional[str]   # live, exact pre-softmax scores (after rotary, scaled); None if no such site
    pattern_hook: str            # "blocks.{layer}.attn.hook_pattern" [batch, head, q, k]; edits move output + grad
    scores_live: bool            # an edit at scores_hook changes the output and the gradient
    score_site: Literal["scores", "pattern"]   # where score ablations / TSG are applied
    # inputs of q, k, v projections (for GIM multipliers; gradient multiplied at these points)
    q_input_hook: Optional[str]
    k_input_hook: Optional[str]
    v_input_hook: Optional[str]
    # normalisation
    norm_type: Literal["LN", "RMS"]
    norm_scale_hooks: tuple      # templates/names whose output is the norm scale (detach to freeze), incl. ln_final
    # MLP
    gated_mlp: bool
    gate_hook: Optional[str]     # output of the gate branch (gradient x gate_scale), None if not gated
    up_hook: Optional[str]       # output of the up branch
    supports_start_at_layer: bool
    # ---- added by the probe implementation (all measured) ----
    #: the hook literally named ``hook_attn_scores`` reports the softmax pattern (TL 4 native bridges)
    scores_hook_is_pattern: bool = False
    #: value held at masked keys by ``scores_hook``: -inf (TL 3) or the dtype minimum (HF bridges)
    masked_score_value: Optional[float] = None
    #: hooks whose ``einsum(q, k) / attn_scale`` reproduces the scores (post-rotary); kv heads repeat by kv_head_of
    score_q_hook: Optional[str] = None
    score_k_hook: Optional[str] = None
    attn_scale: Optional[float] = None
    #: kv head serving each query head (``z_h = p_h @ v[:, :, kv_head_of[h]]`` verified)
    kv_head_of: tuple = ()
    #: q, k, v hooks are live (edits move output and gradient)
    qkv_live: bool = True
    #: max |logit change| / max |logit| when every norm scale is detached (0.0 = bit-identical)
    norm_detach_rel_err: float = 0.0
    #: how :func:`norm_freeze_hooks` freezes norms: "detach_scale" (return ``hook_scale.detach()``) or
    #: "straight_through" (value of ``hook_normalized`` kept bit-identical, gradient of x_c / s with s constant);
    #: the latter is chosen where the backend recomputes the norm after a scale edit (HF Llama bridges)
    norm_freeze_method: Literal["detach_scale", "straight_through"] = "detach_scale"
    #: setters the probe switched on to make a site fire, e.g. ("use_split_qkv_input",)
    enabled: tuple = ()
    #: the name of the hook at which MLP-input gradients were measured (diagnostic)
    notes: tuple = field(default=(), compare=False)

    # the dimensions live in ``facts`` (one home); these read-only views keep ``backend.n_heads`` etc. working
    kind = property(lambda self: self.facts.kind, doc='"tl3", "bridge-hf" or "bridge-native"')
    architecture = property(lambda self: self.facts.architecture, doc='e.g. "GPT2LMHeadModel", "LlamaForCausalLM"')
    n_layers = property(lambda self: self.facts.n_layers)
    n_heads = property(lambda self: self.facts.n_heads)
    n_kv_heads = property(lambda self: self.facts.n_kv_heads, doc="heads of hook_k / hook_v")
    d_head = property(lambda self: self.facts.d_head)
    d_model = property(lambda self: self.facts.d_model)
    d_vocab = property(lambda self: self.facts.d_vocab)
    n_ctx = property(lambda self: self.facts.n_ctx)
    z_hook = property(lambda self: self.facts.z_hook,
                      doc='"blocks.{layer}.attn.hook_z" [batch, pos, n_heads, d_head]; edits move output + grad')

    def hook(self, template: str, layer: int) -> str:
        return template.format(layer=layer)

    def kv_head(self, head: int) -> int:
        """The kv head that serves query head ``head`` (identity without GQA)."""
        if self.kv_head_of:
            return self.kv_head_of[head]
        return head // max(1, self.n_heads // self.n_kv_heads)


_CACHE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def probe(model, *, refresh: bool = False) -> Backend:
    """Measure which hook sites of ``model`` are live and how attention/norm/MLP are laid out.

    Cached per model object; ``refresh=True`` re-probes (e.g. after changing settings).
    Raises :class:`ProbeError` when the model has no live pattern or z site.
    """
    if not refresh:
        try:
            hit = _CACHE.get(model)
        except TypeError:
            hit = None
        if hit is not None:
            return hit
    if not (hasattr(model, "hooks") and hasattr(model, "hook_dict") and hasattr(model, "cfg")):
        raise TypeError(
            f"probe expects a TransformerLens model (TransformerBridge or HookedTransformer), "
            f"got {type(model).__name__}; load one with selfrepair.load_model(...)"
        )
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(False), torch.enable_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            backend = _Prober(model).run()
    finally:
        model.train(was_training)
    try:
        _CACHE[model] = backend
    except TypeError:
        pass
    return backend


def cached_backend(model) -> Optional[Backend]:
    """The Backend ``probe`` already measured for ``model``, or None (never runs a new probe)."""
    try:
        return _CACHE.get(model)
    except TypeError:
        return None


def resolve_backend(model, backend: Optional[Backend] = None) -> Backend:
    """``backend`` when given, else ``probe(model)`` (cached per model)."""
    return backend if backend is not None else probe(model)


# ============================================================================ implementation

_LAYER_RE = re.compile(r"^blocks\.(\d+)\.")


def _template(name: str) -> str:
    return _LAYER_RE.sub("blocks.{layer}.", name)


class _Prober:
    T = 8  # tokens in the probe forward

    def __init__(self, model):
        self.m = model
        self.kind = model_kind(model)
        cfg = model.cfg
        self.cfg = cfg
        self.n_layers = int(cfg.n_layers)
        self.d_model = int(cfg.d_model)
        self.d_vocab = int(cfg.d_vocab)
        self.n_ctx = int(cfg.n_ctx)
        self.T = max(2, min(self.T, self.n_ctx))
        self.device = model_device(model)
        self.dtype = model_dtype(model)
        # rounding of the model's own dtype: every "must agree" check of the probe compares quantities the
        # model computed and stored in that dtype, each carrying up to eps/2 relative rounding per op
        self.eps = float(torch.finfo(self.dtype).eps) if self.dtype in (torch.bfloat16, torch.float16) else 0.0
        gen = torch.Generator().manual_seed(1234)
        lo = 3 if self.d_vocab > 8 else 0
        self.tokens = torch.randint(lo, self.d_vocab, (1, self.T), generator=gen).to(self.device)
        self.w = torch.randn(1, self.T, self.d_vocab, generator=gen).to(self.device)
        self.gen = gen
        self.L = 0  # layer where sites are tested (edits at layer 0 reach everything downstream)
        self.enabled: list[str] = []
        self.notes: list[str] = []

    # ------------------------------------------------------------------ primitives
    def forward(self, fwd_hooks=(), inp=None, **kw):
        inp = self.tokens if inp is None else inp
        with self.m.hooks(fwd_hooks=list(fwd_hooks)):
            out = self.m(inp, **kw)
        return out

    def metric(self, logits):
        return (logits.float() * self.w).sum()

    def collect(self):
        """Run the clean forward, saving every hook point (by every alias) of layers 0 and 1 and outside blocks."""
        store = {}
        gated = getattr(self.m, "_gated_hook_reason", None)
        hooks = []
        for name in list(self.m.hook_dict):
            mt = _LAYER_RE.match(name)
            if mt and int(mt.group(1)) > 1 and name != f"blocks.{self.n_layers - 1}.hook_resid_post":
                continue
            if gated is not None and gated(name) is not None:
                continue

            def save(x, hook, name=name):
                if torch.is_tensor(x):
                    store[name] = x.detach().clone()

            hooks.append((name, save))
        logits = self.forward(hooks)
        self.clean = logits.detach()
        self.scale_ref = float(self.clean.abs().max()) + 1e-12
        self.cache = store
        return store

    def present(self, name: str) -> bool:
        return name in self.cache

    def rel(self, a, b) -> float:
        return float((a.float() - b.float()).abs().max()) / self.scale_ref

    def live(self, name: str, delta: torch.Tensor) -> tuple[bool, bool]:
        """(output moved, gradient reached the edit) for ``hook output + delta`` at ``name``."""
        leaf = delta.detach().clone().to(self.device).float().requires_grad_(True)

        def edit(x, hook):
            return x + leaf.to(x.dtype)

        try:
            logits = self.forward([(name, edit)])
        except Exception as e:  # noqa: BLE001
            self.notes.append(f"edit at {name} raised {type(e).__name__}: {e}")
            return False, False
        moved = self.rel(logits, self.clean) > 1e-6
        if not logits.requires_grad:
            return moved, False
        (g,) = torch.autograd.grad(self.metric(logits), leaf, allow_unused=True)
        has_grad = g is not None and float(g.abs().max()) > 0
        return moved, has_grad

    def grad_at(self, site: str, cut: tuple = (), scale: Optional[dict] = None, extra: list = ()):
        """d metric / d (a zero perturbation at ``site``), with gradient cut (detach) at ``cut``."""
        x = self.cache[site]
        leaf = torch.zeros_like(x, dtype=torch.float32).requires_grad_(True)
        hooks = [(site, lambda t, hook: t + leaf.to(t.dtype))]
        for c in cut:
            hooks.append((c, lambda t, hook: t.detach()))
        for name, s in (scale or {}).items():
            hooks.append((name, lambda t, hook, s=s: t * s))
        hooks.extend(extra)
        logits = self.forward(hooks)
        if not logits.requires_grad:
            return torch.zeros_like(leaf), logits.detach()
        (g,) = torch.autograd.grad(self.metric(logits), leaf, allow_unused=True)
        return (torch.zeros_like(leaf) if g is None else g), logits.detach()

    def noise(self, x: torch.Tensor, scale: float = 0.5) -> torch.Tensor:
        n = torch.randn(x.shape, generator=self.gen).to(self.device)
        s = float(x.float()[torch.isfinite(x.float())].abs().mean()) if x.numel() else 1.0
        return n * scale * (s if s > 0 else 1.0)

    def tol(self, base: float) -> float:
        """A relative tolerance for values that should agree: ``base`` (float32 / float64 models), or ``16 eps``
        of a reduced-precision model dtype (bf16: 0.125, fp16: 0.016) when larger. Quantities the probe compares
        pass through a handful of roundings to that dtype (matmul output, softmax, residual adds), each up to
        eps/2 relative to the largest magnitude compared; 16 eps leaves room for a few of them while a wrong
        site (another head, a missing path) differs by O(1)."""
        return max(base, 16.0 * self.eps)

    def close(self, a, b, tol: float = 1e-4) -> bool:
        a, b = a.float(), b.float()
        ref = max(float(a.abs().max()), float(b.abs().max()), 1e-30)
        return float((a - b).abs().max()) <= self.tol(tol) * ref

    def same(self, a, b, tol: float = 1e-6) -> bool:
        """``a`` and ``b`` are equal up to float32 rounding (no reduced-precision allowance): used where a
        cut or edit must change NOTHING, which a bf16 forward reproduces bit for bit."""
        a, b = a.float(), b.float()
        ref = max(float(a.abs().max()), float(b.abs().max()), 1e-30)
        return float((a - b).abs().max()) <= tol * ref

    # ------------------------------------------------------------------ the probe
    A = "blocks.{layer}.attn."

    def t(self, template: str) -> str:
        """``template`` at the probed layer."""
        return template.format(layer=self.L)

    def run(self) -> Backend:
        """Every measurement in order, then the Backend they describe."""
        try:
            self.collect()
        except (RuntimeError, NotImplementedError) as e:
            if not self.eps:
                raise
            name = str(self.dtype).replace("torch.", "")
            raise ProbeError(f"the model cannot run in {name} on {self.device} ({str(e).strip().splitlines()[0]}); "
                             "load it with dtype=torch.float32 (selfrepair.load_model(spec, dtype=torch.float32))") from e
        att = self._attention_sites()
        kv_head_of = self._kv_heads(att)
        scores = self._scores_site(att)
        score_q_hook, score_k_hook, attn_scale = self._score_qk_hooks(att, scores, kv_head_of)
        inputs = self._qkv_inputs()
        norm_type, norm_hooks, detach_err, freeze_method = self._norms()
        gated, gate_hook, up_hook = self._mlp()
        sal = self._start_at_layer()
        self._check_every_layer(att, scores, inputs, gate_hook, up_hook)
        return self._backend(att, kv_head_of, scores, (score_q_hook, score_k_hook, attn_scale), inputs,
                             (norm_type, norm_hooks, detach_err, freeze_method), (gated, gate_hook, up_hook), sal)

    def _attention_sites(self) -> dict:
        """pattern / z / q / k / v must fire, and edits at pattern and z must reach the output."""
        A, t = self.A, self.t
        for nm in ("hook_pattern", "hook_z", "hook_q", "hook_k", "hook_v"):
            if not self.present(t(A + nm)):
                raise ProbeError(
                    f"{t(A + nm)} does not fire on this model ({self.kind}); the toolkit needs "
                    "attention pattern, z, q, k and v hook points"
                )
        pat = self.cache[t(A + "hook_pattern")]
        z = self.cache[t(A + "hook_z")]
        k = self.cache[t(A + "hook_k")]
        v = self.cache[t(A + "hook_v")]
        n_heads, d_head = int(pat.shape[1]), int(z.shape[-1])
        n_kv = int(k.shape[2])
        if z.dim() != 4 or z.shape[2] != n_heads:
            raise ProbeError(f"hook_z has shape {tuple(z.shape)}, expected [batch, pos, {n_heads}, d_head]")
        causal = torch.ones(self.T, self.T, dtype=torch.bool, device=self.device).tril()

        for nm, x in (("hook_pattern", pat), ("hook_z", z)):
            d = self.noise(x)
            if nm == "hook_pattern":
                d = d * causal
            moved, grad = self.live(t(A + nm), d)
            if not (moved and grad):
                raise ProbeError(
                    f"{t(A + nm)} fires but an edit there does not reach the output "
                    f"(output moved: {moved}, gradient: {grad}); this model offers no live {nm} site"
                )
        qkv_live = all(all(self.live(t(A + nm), self.noise(self.cache[t(A + nm)]))) for nm in ("hook_q", "hook_k", "hook_v"))
        return dict(pat=pat, z=z, v=v, n_heads=n_heads, d_head=d_head, n_kv=n_kv, causal=causal, qkv_live=qkv_live)

    def _kv_heads(self, att: dict) -> list:
        """The kv head serving each query head: ``z_h = p_h @ v_g``."""
        pat, z, v = att["pat"], att["z"], att["v"]
        kv_head_of = []
        for h in range(att["n_heads"]):
            errs = [
                float((torch.einsum("qk,kd->qd", pat[0, h].float(), v[0, :, g].float()) - z[0, :, h].float()).abs().max())
                for g in range(att["n_kv"])
            ]
            g = int(min(range(att["n_kv"]), key=lambda i: errs[i]))
            if errs[g] > self.tol(1e-4) * (float(z.abs().max()) + 1e-12):
                raise ProbeError(
                    f"hook_z of head {h} is not pattern @ hook_v for any kv head (best error {errs[g]:.3g}, "
                    f"relative {errs[g] / (float(z.abs().max()) + 1e-12):.3g} > {self.tol(1e-4):.3g} allowed for "
                    f"a {str(self.dtype).replace('torch.', '')} model); cannot relate values to heads on this model"
                )
            kv_head_of.append(g)
        return kv_head_of

    def _scores_site(self, att: dict) -> dict:
        """The scores hook: live? a pattern in disguise? the value it holds at masked keys."""
        causal = att["causal"]
        sname = self.t(self.A + "hook_attn_scores")
        scores_hook, scores_live, is_pattern, masked_value = None, False, False, None
        sc = self.cache.get(sname)
        if sc is not None:
            fin = sc.float()[0][:, causal]
            rows = torch.where(causal, sc.float()[0], torch.zeros((), device=self.device)).sum(-1)
            is_pattern = bool((fin >= 0).all() and (fin <= 1).all() and torch.allclose(rows, torch.ones_like(rows), atol=self.tol(1e-4)))
            moved, grad = self.live(sname, self.noise(sc.masked_fill(~causal, 0) if not is_pattern else sc) * causal)
            scores_live = bool(moved and grad and not is_pattern)
            if not is_pattern:
                masked_value = float(sc[0, 0, 0, 1]) if self.T > 1 else None
                if scores_live:
                    scores_hook = self.A + "hook_attn_scores"
        return dict(sc=sc, hook=scores_hook, live=scores_live, is_pattern=is_pattern, masked_value=masked_value)

    def _score_qk_hooks(self, att: dict, scores: dict, kv_head_of: list):
        """The q / k hooks (and scale) whose ``einsum(q, k) / scale`` reproduces the scores (or the pattern)."""
        t, causal, sc, is_pattern = self.t, att["causal"], scores["sc"], scores["is_pattern"]
        n_heads, d_head, pat = att["n_heads"], att["d_head"], att["pat"]
        score_q_hook = score_k_hook = attn_scale = None
        rep = torch.tensor(kv_head_of, device=self.device)
        cands = [(self.A + "hook_rot_q", self.A + "hook_rot_k"), (self.A + "hook_q", self.A + "hook_k")]
        scales = [math.sqrt(d_head)]
        cfg_scale = getattr(self.cfg, "attn_scale", None)
        if isinstance(cfg_scale, (int, float)) and cfg_scale > 0:
            scales.insert(0, float(cfg_scale))
        scales += [1.0, float(d_head)]
        for qn, kn in cands:
            if not (self.present(t(qn)) and self.present(t(kn))):
                continue
            qq, kk = self.cache[t(qn)].float(), self.cache[t(kn)].float()[:, :, rep]
            if qq.shape[2] != n_heads or kk.shape[-1] != qq.shape[-1]:
                continue
            raw = torch.einsum("bqhd,bkhd->bhqk", qq, kk)
            for s in scales:
                a = raw / s
                if sc is not None and not is_pattern:
                    ok = self.close(a[0][:, causal], sc.float()[0][:, causal], 1e-4)
                else:
                    p2 = a.masked_fill(~causal, float("-inf")).softmax(-1)
                    ok = float((p2 - pat.float()).abs().max()) < self.tol(1e-5)
                if ok:
                    score_q_hook, score_k_hook, attn_scale = qn, kn, s
                    break
            if attn_scale is not None:
                break
        return score_q_hook, score_k_hook, attn_scale

    def _qkv_inputs(self) -> dict:
        """The hooks on the inputs of the q / k / v projections (switching split inputs on if needed)."""
        resid = self.t("blocks.{layer}.hook_resid_pre")
        inputs = {}
        if self.present(resid):
            g0, _ = self.grad_at(resid)
            for which in ("q", "k", "v"):
                inputs[which] = self._find_input(which, resid, g0)
            if any(v is None for v in inputs.values()) and self._can_enable("use_split_qkv_input"):
                self._enable("use_split_qkv_input")
                g0, _ = self.grad_at(resid)
                for which in ("q", "k", "v"):
                    if inputs[which] is None:
                        inputs[which] = self._find_input(which, resid, g0)
        else:
            inputs = {"q": None, "k": None, "v": None}
        return inputs

    def _check_every_layer(self, att: dict, scores: dict, inputs: dict, gate_hook, up_hook) -> None:
        """Every template must name a hook point in every layer; live sites stay live at the last layer."""
        A, causal, pat, z = self.A, att["causal"], att["pat"], att["z"]
        last = self.n_layers - 1
        required = [A + "hook_q", A + "hook_k", A + "hook_v", A + "hook_pattern", A + "hook_z"]
        optional = dict(scores=scores["hook"], gate=gate_hook, up=up_hook, **{f"{w}_input": inputs[w] for w in "qkv"})
        for tpl in required + [x for x in optional.values() if x]:
            missing = [i for i in range(self.n_layers) if tpl.format(layer=i) not in self.m.hook_dict]
            if missing:
                raise ProbeError(f"hook point {tpl} is missing in layers {missing}; the model's blocks differ")
        if last != self.L:
            checks = [(A + "hook_pattern", self.noise(pat) * causal), (A + "hook_z", self.noise(z))]
            if scores["live"]:
                checks.append((A + "hook_attn_scores", self.noise(scores["sc"].masked_fill(~causal, 0)) * causal))
            for tpl, d in checks:
                if not all(self.live(tpl.format(layer=last), d)):
                    if tpl.endswith("hook_attn_scores"):
                        self.notes.append(f"scores edits are not live at layer {last}; using the pattern site")
                        scores["live"], scores["hook"] = False, None
                    else:
                        raise ProbeError(f"{tpl.format(layer=last)}: edits there do not reach the output")

    def _backend(self, att, kv_head_of, scores, score_qk, inputs, norms, mlp, sal) -> Backend:
        A = self.A
        score_q_hook, score_k_hook, attn_scale = score_qk
        norm_type, norm_hooks, detach_err, freeze_method = norms
        gated, gate_hook, up_hook = mlp
        facts = replace(model_facts(self.m), n_heads=att["n_heads"], n_kv_heads=att["n_kv"], d_head=att["d_head"])
        return Backend(
            facts=facts,
            q_hook=A + "hook_q",
            k_hook=A + "hook_k",
            v_hook=A + "hook_v",
            scores_hook=scores["hook"],
            pattern_hook=A + "hook_pattern",
            scores_live=scores["live"],
            score_site="scores" if scores["live"] else "pattern",
            q_input_hook=inputs["q"],
            k_input_hook=inputs["k"],
            v_input_hook=inputs["v"],
            norm_type=norm_type,
            norm_scale_hooks=tuple(norm_hooks),
            gated_mlp=gated,
            gate_hook=gate_hook,
            up_hook=up_hook,
            supports_start_at_layer=sal,
            scores_hook_is_pattern=scores["is_pattern"],
            masked_score_value=scores["masked_value"],
            score_q_hook=score_q_hook,
            score_k_hook=score_k_hook,
            attn_scale=attn_scale,
            kv_head_of=tuple(kv_head_of),
            qkv_live=att["qkv_live"],
            norm_detach_rel_err=detach_err,
            norm_freeze_method=freeze_method,
            enabled=tuple(self.enabled),
            notes=tuple(self.notes),
        )

    # ------------------------------------------------------------------ pieces
    def _can_enable(self, flag: str) -> bool:
        return hasattr(self.m, f"set_{flag}") and not bool(getattr(self.cfg, flag, False))

    def _enable(self, flag: str) -> None:
        try:
            getattr(self.m, f"set_{flag}")(True)
        except Exception as e:  # noqa: BLE001  (e.g. native bridges do not support it)
            self.notes.append(f"set_{flag}(True) failed: {type(e).__name__}: {e}")
            return
        # the forward must be unchanged by the setting
        before = self.clean
        self.collect()
        if self.rel(self.clean, before) > self.tol(1e-6):
            getattr(self.m, f"set_{flag}")(False)
            self.collect()
            self.notes.append(f"set_{flag}(True) changed the forward; reverted")
            return
        self.enabled.append(flag)

    def _find_input(self, which: str, resid: str, g0) -> Optional[str]:
        L = self.L
        ref_site = f"blocks.{L}.attn.hook_{which}"
        g_ref, _ = self.grad_at(resid, cut=(ref_site,))
        if self.same(g_ref, g0):
            self.notes.append(f"cutting the gradient at {ref_site} changes nothing")
            return None
        for cand in (
            "blocks.{layer}.hook_%s_input" % which,
            "blocks.{layer}.attn.hook_%s_input" % which,
            "blocks.{layer}.attn.%s.hook_in" % which,
        ):
            name = cand.format(layer=L)
            if not self.present(name):
                continue
            g_c, _ = self.grad_at(resid, cut=(name,))
            if self.close(g_c, g_ref, 1e-4) and not self.same(g_c, g0):
                return cand
        return None

    def _norms(self):
        """Norm type, scale hooks whose detach removes exactly the scale's gradient path, freeze method."""
        L = self.L
        templates = []
        for n in [n for n in self.cache if n.endswith(".hook_scale")]:
            tpl = _template(n)
            if tpl in templates or ("{layer}" in tpl and n != tpl.format(layer=L)):
                continue
            if "{layer}" in tpl and not all(tpl.format(layer=i) in self.m.hook_dict for i in range(self.n_layers)):
                continue
            templates.append(tpl)
        if not templates:
            raise ProbeError("no norm hook_scale point fires on this model; cannot freeze normalisation for GIM")
        types, weak_types, verified, st_ok = [], [], [], []
        last_resid = f"blocks.{self.n_layers - 1}.hook_resid_post"
        for tpl in templates:
            name = tpl.format(layer=L)
            base = name[: -len(".hook_scale")]
            x_name = base + ".hook_in"
            if not self.present(x_name) and base == "ln_final":
                x_name = last_resid  # TL 3: the last residual feeds ln_final only
            s = self.cache[name].float()
            if not self.present(x_name):
                # no exclusive input hook (TL 3 block norms): type from hook_normalized, weaker check
                kind = None
                nm = self.cache.get(base + ".hook_normalized")
                if nm is not None:
                    kind = "LN" if float(nm.float().mean(-1).abs().max()) < self.tol(1e-4) * float(nm.float().abs().max()) else "RMS"
                g_true, _ = self.grad_at(f"blocks.{L}.hook_resid_pre")
                g_frozen, logits = self.grad_at(f"blocks.{L}.hook_resid_pre", cut=(name,))
                if self.rel(logits, self.clean) <= self.tol(1e-6) and not self.same(g_frozen, g_true):
                    verified.append(tpl)
                    self.notes.append(f"{name}: detach verified by gradient change only (no exclusive norm input hook)")
                if kind:
                    weak_types.append(kind)
                continue
            x = self.cache[x_name].float()
            d = x.shape[-1]
            var = x.var(-1, unbiased=False, keepdim=True)
            ms = x.pow(2).mean(-1, keepdim=True)
            e_ln, e_rms = s.pow(2) - var, s.pow(2) - ms
            tol = self.tol(1e-3) * float(s.pow(2).max())
            is_ln = float(e_ln.abs().max()) <= tol and float(e_ln.min()) >= -tol
            is_rms = float(e_rms.abs().max()) <= tol and float(e_rms.min()) >= -tol
            if is_ln == is_rms:  # ambiguous only for an already-centred input
                nm = self.cache.get(base + ".hook_normalized")
                is_ln = nm is not None and float(nm.float().mean(-1).abs().max()) < self.tol(1e-4)
            kind = "LN" if is_ln else "RMS"
            types.append(kind)
            xc = x - x.mean(-1, keepdim=True) if kind == "LN" else x
            g_true, _ = self.grad_at(x_name)

            def frozen_ok(g_frozen):
                pred = g_frozen - xc * (g_frozen * xc).sum(-1, keepdim=True) / (d * s.pow(2))
                return self.close(pred, g_true, 1e-3) and not self.same(g_frozen, g_true)

            g_frozen, logits = self.grad_at(x_name, cut=(name,))
            if frozen_ok(g_frozen):
                verified.append(tpl)
            else:
                self.notes.append(f"detaching {name} does not remove exactly the scale's gradient path")
            # straight-through freeze at hook_normalized (value untouched)
            if self.present(base + ".hook_normalized") and x_name == base + ".hook_in":
                hooks = straight_through_hooks(base, kind)
                g_st, logits = self.grad_at(x_name, extra=hooks)
                if torch.equal(logits, self.clean) and frozen_ok(g_st):
                    st_ok.append(tpl)
        types = types or weak_types  # measured from the scale formula first, hook_normalized's mean as a fallback
        if not types:
            raise ProbeError("could not measure the norm type")
        if len(set(types)) > 1:
            self.notes.append(f"mixed norm types {types}; reporting the first")
        # forward with every scale frozen, all layers: exactly the hooks norm_freeze_hooks will install
        logits = self.forward(freeze_hooks(verified, self.n_layers, types[0], "detach_scale"))
        detach_err = self.rel(logits.detach(), self.clean)
        method = "detach_scale"
        if detach_err > 0 and st_ok and len(st_ok) == len(templates):
            logits = self.forward(freeze_hooks(verified, self.n_layers, types[0], "straight_through"))
            if torch.equal(logits.detach(), self.clean):
                method = "straight_through"
        if method == "detach_scale" and detach_err > self.tol(1e-6):
            self.notes.append(f"detaching all norm scales changes the logits by {detach_err:.2g} (relative to max |logit|)")
        return types[0], verified, detach_err, method

    def _mlp(self):
        L = self.L
        prefix = f"blocks.{L}.mlp."
        # a point whose output feeds the MLP only (TL 3 has no mlp.hook_in: its ln2.hook_normalized)
        site = next(
            (n for n in (prefix + "hook_in", f"blocks.{L}.ln2.hook_out", f"blocks.{L}.ln2.hook_normalized",
                         f"blocks.{L}.hook_mlp_in") if self.present(n)),
            None,
        )
        if site is None:
            self.notes.append("no MLP input hook fires; gating not measured")
            return False, None, None
        cands = [
            n for n in self.cache
            if n.startswith(prefix) and n != site and self.cache[n].dim() == 3
            and self.cache[n].shape[-1] != self.d_model
        ]
        pref = ["hook_pre", "hook_pre_linear"]
        cands.sort(key=lambda n: (pref.index(n[len(prefix):]) if n[len(prefix):] in pref else len(pref), n))
        g0, _ = self.grad_at(site)
        if float(g0.abs().max()) == 0:
            return False, None, None
        single: dict = {}

        def one(c):
            if c not in single:
                single[c] = self.grad_at(site, cut=(c,))[0]
            return single[c]

        for i, a in enumerate(cands):
            for b in cands[i + 1:]:
                ga, gb = one(a), one(b)
                if self.same(ga, g0) or self.same(gb, g0):
                    continue  # one of them is not on a gradient path
                if self.close(ga, torch.zeros_like(ga)) or self.close(gb, torch.zeros_like(gb)):
                    continue  # one of them carries every path
                if not self.close(ga + gb, g0, 1e-4):
                    continue
                gab, _ = self.grad_at(site, cut=(a, b))
                if float(gab.abs().max()) > 1e-6 * float(g0.abs().max()):
                    continue
                # which branch is linear ("up")?
                lin_a, lin_b = self._linear_branch(a), self._linear_branch(b)
                if lin_b and not lin_a:
                    gate, up = a, b
                elif lin_a and not lin_b:
                    gate, up = b, a
                else:
                    gate, up = a, b
                    self.notes.append(f"both MLP branches {a}, {b} are linear; gate/up assigned by name order")
                return True, _template(gate), _template(up)
        return False, None, None

    def _linear_branch(self, name: str) -> bool:
        """Is the MLP output affine-linear in this hook's value: f(2x) - f(0) == 2 (f(x) - f(0))?"""
        out = f"blocks.{self.L}.hook_mlp_out"
        if not self.present(out):
            out = f"blocks.{self.L}.mlp.hook_out"
        store = {}

        def save(x, hook):
            store["y"] = x.detach().float()

        ys = []
        for c in (0.0, 1.0, 2.0):
            self.forward([(name, lambda x, hook, c=c: x * c), (out, save)])
            ys.append(store["y"])
        return self.close(ys[2] - ys[0], 2 * (ys[1] - ys[0]), 1e-4)

    def _start_at_layer(self) -> bool:
        l = 1 if self.n_layers > 1 else 0
        name = f"blocks.{l}.hook_resid_pre"
        if not self.present(name):
            return False
        try:
            with self.m.hooks(fwd_hooks=[]):
                out = self.m.run_with_hooks(self.cache[name], start_at_layer=l)
        except Exception as e:  # noqa: BLE001
            self.notes.append(f"start_at_layer={l} raised {type(e).__name__}: {e}")
            return False
        if not torch.is_tensor(out) or out.shape != self.clean.shape:
            return False
        ok = self.rel(out.detach(), self.clean) <= self.tol(1e-5)
        if not ok:
            self.notes.append(f"start_at_layer={l} differs from the full forward by {self.rel(out, self.clean):.3g} (relative)")
        return ok


# ============================================================================ norm freeze


