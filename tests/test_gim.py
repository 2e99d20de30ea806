"""GIM (docs/quantities.md, "GIM") against independent computations, on HF GPT-2, HF Llama (GQA, rotary,
RMSNorm, SwiGLU), TL-native bridges and stories260K.

Independent references: the explicit softmax Jacobian ``(diag(s) - s s^T) g`` with
``s = softmax(a / T)`` computed here from the captured scores and explicit masks; norms
rebuilt by hand with a detached scale (torch forward hooks on the norm modules, no
``hook_scale``); plain autograd for the multipliers (exact multiples on the last layer).
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

import selfrepair
from selfrepair.analysis.gim import GIMHookError, gim, tsg_pattern_grad, tsg_scores_grad

from conftest import make_native_bridge

T = 2.0
OFF = dict(temperature=None, freeze_norm=False, q_scale=None, k_scale=None, v_scale=None, gate_scale=None,
           up_scale=None)


def only(**kw):
    """gim options with every component off except those given."""
    return {**OFF, **kw}


@pytest.fixture(scope="module")
def native_gated():
    """TL-native bridge with RMSNorm, rotary, GQA and a SwiGLU MLP (float64)."""
    import warnings

    from transformer_lens.config import TransformerBridgeConfig
    from transformer_lens.model_bridge import TransformerBridge

    cfg = TransformerBridgeConfig(d_model=32, n_layers=2, n_heads=4, d_head=8, d_mlp=64, d_vocab=200, n_ctx=64,
                                  act_fn="silu", normalization_type="RMS", positional_embedding_type="rotary",
                                  gated_mlp=True, n_key_value_heads=2, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return TransformerBridge.boot_native(cfg, dtype=torch.float64, device="cpu").eval()


@pytest.fixture(scope="module")
def native64():
    return make_native_bridge(dtype=torch.float64)


MODELS = ["gpt2_bridge64", "llama_bridge64", "native64", "native_gated", "stories_model"]


@pytest.fixture
def model(request):
    return request.getfixturevalue(request.param)


def tokens_for(model, b=2, n=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, int(model.cfg.d_vocab), (b, n), generator=g)


def n_hooks(model) -> int:
    return sum(len(hp.fwd_hooks) + len(hp.bwd_hooks) for hp in {id(h): h for h in model.hook_dict.values()}.values())


def run(model, tokens, names=(), ctx=None, metric="logit_diff", attention_mask=None, inputs=None):
    """Forward + backward of sum_b m; returns (logits, {name: (value, grad)}).

    Capture hooks are registered BEFORE ``ctx`` is entered, so they run before gim's hooks
    at every site except hook_pattern (where gim puts its hook first): at the scores and
    the q/k/v/gate/up sites they see the tensor gim receives, at the pattern its output.
    """
    caps = {}

    def cap(name):
        def f(x, hook):
            x = x if x.requires_grad else x.detach().requires_grad_(True)
            x.retain_grad()
            caps[name] = x
            return x
        return f

    ctx = ctx if ctx is not None else _Null()
    kw = {} if attention_mask is None else {"attention_mask": attention_mask}
    with torch.enable_grad(), model.hooks(fwd_hooks=[(n, cap(n)) for n in names]):
        with ctx:
            logits = model(tokens, **kw)
            last = logits[:, -1]
            if metric == "logit_diff":
                m = last[:, 5] - last[:, 7]
            elif metric == "logprob":
                m = torch.log_softmax(last, -1)[:, 5]
            else:  # a softmax inside the metric
                m = torch.softmax(last, -1)[:, 5]
            m.sum().backward(inputs=[caps[n] for n in names] + list(inputs or []))
    return logits.detach(), {n: (caps[n].detach(), caps[n].grad) for n in names}


class _Null:
    def __enter__(self):
        return None

    def __exit__(self, *a):
        return False


def explicit_tsg(a, g, mask, temperature):
    """(diag(s) - s s^T) g with s = softmax(a / T) over the explicit mask, float64."""
    a = a.double().masked_fill(~mask, float("-inf"))
    s = torch.softmax(a / temperature, -1).nan_to_num(0.0)
    g = g.double()
    jac = torch.diag_embed(s) - s[..., :, None] * s[..., None, :]
    return torch.einsum("...ij,...j->...i", jac, g)


# ----------------------------------------------------------------------------- pure formulas


def test_tsg_formulas_against_explicit_jacobian():
    """tsg_scores_grad = (diag(s) - s s^T) g, s = softmax(a/T), no 1/T factor; tsg_pattern_grad pushed
    through the real softmax backward gives the same; masked keys (causal, -inf) get 0."""
    gen = torch.Generator().manual_seed(0)
    n = 7
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    a = (torch.randn(3, 2, n, n, dtype=torch.float64, generator=gen) * 3).masked_fill(~causal, float("-inf"))
    a[0, 0, 4:, 1] = float("-inf")  # a padded key
    mask = torch.isfinite(a)
    g = torch.randn(3, 2, n, n, dtype=torch.float64, generator=gen)
    want = explicit_tsg(a, g, mask, T)
    torch.testing.assert_close(tsg_scores_grad(a, g, T), want, rtol=1e-12, atol=1e-14)
    a_leaf = a.clone().requires_grad_(True)
    p = torch.softmax(a_leaf, -1)
    gp = tsg_pattern_grad(p.detach(), g, T)
    assert torch.all(gp[~mask] == 0)
    (got,) = torch.autograd.grad(p, a_leaf, gp, retain_graph=True)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    # no 1/T factor: at T = 1 it is the plain softmax gradient
    (plain,) = torch.autograd.grad(p, a_leaf, g)
    torch.testing.assert_close(tsg_scores_grad(a, g, 1.0), plain, rtol=1e-10, atol=1e-12)
    assert float((tsg_scores_grad(a, g, T) - plain).abs().max()) > 1e-2


# ----------------------------------------------------------------------------- TSG on every backend


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_internal_tsg_kernels_equal_the_reference_formulas(dtype):
    """gim's fast kernels (processed in row blocks on the CPU), which the public formulas also use,
    against the formula written out here in float64: the scores form on backend-masked scores
    (dtype-minimum fill, and -inf with rows that have no key at all), the pattern form on softmax
    outputs with exact zeros; many blocks (3 x 4 x 300 rows)."""
    from selfrepair.analysis.gim import _BLOCK_BYTES, _tsg_from_pattern, _tsg_from_scores

    g = torch.Generator().manual_seed(3)
    b, h, n = 3, 4, 300
    assert b * h * n * n * torch.finfo(dtype).bits // 8 > 10 * _BLOCK_BYTES     # several blocks
    a = torch.randn(b, h, n, n, generator=g, dtype=torch.float64).to(dtype) * 3
    gp = torch.randn(b, h, n, n, generator=g, dtype=torch.float64).to(dtype)
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-12)

    def reference(scores, temperature):
        """s * (g - <s, g>), s = softmax(a / T), float64; rows without keys give 0."""
        s = torch.softmax(scores.double() / temperature, -1).nan_to_num(0.0)
        gd = gp.double()
        return s * (gd - (s * gd).sum(-1, keepdim=True))

    for temperature in (2.0, 1.5, 0.5):
        finite = a.masked_fill(~causal, torch.finfo(dtype).min)
        got = _tsg_from_scores(finite, gp, temperature, False)
        assert got.dtype == dtype
        torch.testing.assert_close(got.double(), reference(finite, temperature), **tol)
        inf = a.masked_fill(~causal, float("-inf")).clone()
        inf[1, :, :5] = float("-inf")                                           # rows without any key
        want = reference(inf, temperature)
        for got in (_tsg_from_scores(inf, gp, temperature, True), tsg_scores_grad(inf, gp, temperature)):
            assert torch.isfinite(got).all() and float(got[1, :, :5].abs().max()) == 0.0
            torch.testing.assert_close(got.double(), want, **tol)
        # pattern form: what matters is the true softmax backward of g', p (g' - <p, g'>), which must
        # be the TSG gradient (float64 reference from the scores); g' itself is ill-conditioned where p is tiny
        p = torch.softmax(inf, -1).nan_to_num(0.0)
        for gq in (_tsg_from_pattern(p, gp, temperature), tsg_pattern_grad(p, gp, temperature)):
            assert gq.dtype == dtype and float(gq[p == 0].abs().max()) == 0.0
            pd, gd = p.double(), gq.double()
            torch.testing.assert_close(pd * (gd - (pd * gd).sum(-1, keepdim=True)), want, **tol)


@pytest.mark.parametrize("model", ["gpt2_bridge64", "llama_bridge64", "stories_model"], indirect=True)
def test_tsg_at_scores_equals_explicit_jacobian(model):
    """Score-site backends: the gradient at hook_attn_scores inside gim(TSG only) equals
    (diag(s) - s s^T) g_p with g_p the pattern gradient of the same backward, every layer,
    with padded prompts (HF bridges fill masked scores with the dtype minimum)."""
    b = selfrepair.probe(model)
    assert b.score_site == "scores"
    toks = tokens_for(model, b=3, n=10)
    am = torch.ones_like(toks)
    am[1, 6:] = 0
    am[2, 3:] = 0
    names = [b.hook(b.scores_hook, l) for l in range(b.n_layers)] + [b.hook(b.pattern_hook, l) for l in range(b.n_layers)]
    _, caps = run(model, toks, names, gim(model, **only(temperature=T)), attention_mask=am)
    causal = torch.ones(10, 10, dtype=torch.bool).tril()
    mask = (causal[None] & am.bool()[:, None, :])[:, None]          # [b, 1, q, k], explicit
    for l in range(b.n_layers):
        a, got = caps[b.hook(b.scores_hook, l)]
        _, gp = caps[b.hook(b.pattern_hook, l)]
        assert bool((a[~mask.expand_as(a)] < -1e30).all())           # the backend masked them
        want = explicit_tsg(a, gp, mask, T)
        scale = float(want.abs().max())
        assert scale > 0
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5 * scale)
        assert float(got[~mask.expand_as(got)].abs().max()) == 0.0  # masked keys: s = 0
        # and it is not the plain softmax gradient
        p = torch.softmax(a.double().masked_fill(~mask, float("-inf")), -1)
        plain = p * (gp.double() - (p * gp.double()).sum(-1, keepdim=True))
        assert float((plain - want).abs().max()) > 1e-3 * scale


@pytest.mark.parametrize("model", ["native64"], indirect=True)
def test_tsg_at_pattern_on_native_bridge(model):
    """Native bridges (no live scores): TSG at hook_pattern. The gradient reaching hook_q must be
    (diag(s) - s s^T) g_p pushed through scores = q k^T / sqrt(d_head), s = softmax(a/T) from q, k."""
    b = selfrepair.probe(model)
    assert b.score_site == "pattern" and b.n_kv_heads == b.n_heads
    toks = tokens_for(model, b=2, n=9)
    names = []
    for l in range(b.n_layers):
        names += [b.hook(b.q_hook, l), b.hook(b.k_hook, l), b.hook(b.pattern_hook, l)]
    _, caps = run(model, toks, names, gim(model, **only(temperature=T)))
    mask = torch.ones(9, 9, dtype=torch.bool).tril()
    for l in range(b.n_layers):
        q, gq = caps[b.hook(b.q_hook, l)]
        k, _ = caps[b.hook(b.k_hook, l)]
        _, gp = caps[b.hook(b.pattern_hook, l)]
        scale = math.sqrt(b.d_head)
        a = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double()) / scale
        ga = explicit_tsg(a, gp, mask, T)
        want = torch.einsum("bhqk,bkhd->bqhd", ga, k.double()) / scale
        torch.testing.assert_close(gq.double(), want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))


def _embed_grad(model, toks, extra=(), **kw):
    """GIM gradient of sum_b m at hook_embed; ``extra`` hooks are added INSIDE the gim block (after
    gim's), as a user's run_with_hooks inside it would. Returns (grad, backend)."""
    leaf = {}

    def grab(x, hook):
        leaf["e"] = x.detach().requires_grad_(True)
        return leaf["e"]

    b = selfrepair.probe(model)
    with torch.enable_grad(), gim(model, **kw):
        with model.hooks(fwd_hooks=[("hook_embed", grab)] + list(extra)):
            logits = model(toks)
            m = (logits[:, -1, 5] - logits[:, -1, 7]).sum()
            (g,) = torch.autograd.grad(m, leaf["e"])
    return g, b


def _record(kinds):
    def f(x, hook):
        kinds[hook.name] = type(x.grad_fn).__name__
        return x
    return f


@pytest.mark.parametrize("model", ["gpt2_bridge64", "llama_bridge64", "stories_model"], indirect=True)
def test_tsg_fast_path_equals_the_pattern_site_fallback(model):
    """On score-site backends gim's TSG is one autograd function spliced in at hook_pattern that
    sends s * (g - <s, g>) straight to the scores (the backend's softmax backward is skipped) and
    returns the pattern as an alias when no other hook runs there. When a hook added inside the
    block runs after gim's at the scores (out of place or in place), the softmax input is not the
    tensor gim saw, and gim falls back to the pattern-site TSG. All routes give the same gradient
    (to float rounding), and a user's in-place edit of the pattern inside the block stays legal."""
    b = selfrepair.probe(model)
    toks = tokens_for(model, b=2, n=12)
    L = range(b.n_layers)
    scores = [b.hook(b.scores_hook, l) for l in L]
    pats = [b.hook(b.pattern_hook, l) for l in L]
    fast, _ = _embed_grad(model, toks)                                     # aliases, no other hooks
    kinds = {}
    copied, _ = _embed_grad(model, toks, [(n, _record(kinds)) for n in pats])
    assert set(kinds.values()) == {"_TSGSoftmaxBackward"}, kinds
    assert torch.equal(fast, copied)
    kinds.clear()
    out_of_place, _ = _embed_grad(model, toks, [(n, lambda x, hook: x * 1.0) for n in scores]
                                  + [(n, _record(kinds)) for n in pats])
    assert set(kinds.values()) == {"_TSGAtPatternBackward"}, kinds
    kinds.clear()
    in_place, _ = _embed_grad(model, toks, [(n, lambda x, hook: x.add_(0.0)) for n in scores]
                              + [(n, _record(kinds)) for n in pats])
    assert set(kinds.values()) == {"_TSGAtPatternBackward"}, kinds
    tol = dict(rtol=1e-6, atol=1e-6 * float(fast.abs().max()))
    torch.testing.assert_close(out_of_place, fast, **tol)
    torch.testing.assert_close(in_place, fast, **tol)
    assert not torch.allclose(fast, _embed_grad(model, toks, temperature=None)[0])  # TSG did something

    def edit(x, hook):
        x[:, 0, -1, 0] = x[:, 0, -1, 0] * 1.0     # the TL idiom: edit the pattern in place
        return x
    edited, _ = _embed_grad(model, toks, [(n, edit) for n in pats])
    torch.testing.assert_close(edited, fast, **tol)


@pytest.mark.parametrize("model", ["gpt2_bridge64", "llama_bridge64"], indirect=True)
def test_tsg_follows_a_user_edit_of_the_scores_inside_the_block(model):
    """A user hook added inside the block rescales the scores (a' = a / 2, out of place): TSG must
    act on the softmax's real input a', and the gradient must pass through the user's edit:
    dm/da = 1/2 (diag(s') - s' s'^T) g_p with s' = softmax(a' / T)."""
    b = selfrepair.probe(model)
    toks = tokens_for(model, b=2, n=10)
    names = [b.hook(b.scores_hook, l) for l in range(b.n_layers)] + [b.hook(b.pattern_hook, l) for l in range(b.n_layers)]
    halve = [(b.hook(b.scores_hook, l), lambda x, hook: x * 0.5) for l in range(b.n_layers)]

    class Ctx:
        def __enter__(self):
            self.g = gim(model, **only(temperature=T))
            self.g.__enter__()
            self.h = model.hooks(fwd_hooks=halve)
            self.h.__enter__()

        def __exit__(self, *exc):
            self.h.__exit__(*exc)
            return self.g.__exit__(*exc)

    _, caps = run(model, toks, names, Ctx())
    mask = torch.ones(10, 10, dtype=torch.bool).tril()
    for l in range(b.n_layers):
        a, got = caps[b.hook(b.scores_hook, l)]
        _, gp = caps[b.hook(b.pattern_hook, l)]
        want = 0.5 * explicit_tsg(0.5 * a.double(), gp, mask, T)
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))


@pytest.mark.parametrize("model", ["native64", "native_gated"], indirect=True)
def test_native_alias_and_copy_agree(model):
    """Native bridges: the pattern-site TSG returns an alias when no other hook runs at hook_pattern
    and a copy otherwise (a user's in-place pattern edit stays legal); same gradient either way."""
    b = selfrepair.probe(model)
    toks = tokens_for(model, b=2, n=12)
    pats = [b.hook(b.pattern_hook, l) for l in range(b.n_layers)]
    fast, _ = _embed_grad(model, toks)
    kinds = {}
    copied, _ = _embed_grad(model, toks, [(n, _record(kinds)) for n in pats])
    assert set(kinds.values()) == {"_TSGAtPatternBackward"}, kinds
    assert torch.equal(fast, copied)

    def edit(x, hook):
        x[:, 0, -1, 0] = x[:, 0, -1, 0] * 1.0
        return x
    edited, _ = _embed_grad(model, toks, [(n, edit) for n in pats])
    torch.testing.assert_close(edited, fast, rtol=1e-9, atol=1e-9 * float(fast.abs().max()))


@pytest.mark.parametrize("model", MODELS, indirect=True)
def test_all_off_is_plain_autograd_and_forward_unchanged(model):
    toks = tokens_for(model)
    names = ["hook_embed"]
    lp, cp = run(model, toks, names)
    lo, co = run(model, toks, names, gim(model, **OFF))
    assert torch.equal(lp, lo)
    assert torch.equal(cp["hook_embed"][1], co["hook_embed"][1])
    lg, cg = run(model, toks, names, gim(model))
    rel = float((lg - lp).abs().max()) / float(lp.abs().max())
    assert rel <= 1e-6, rel
    assert not torch.allclose(cg["hook_embed"][1], cp["hook_embed"][1])  # gim does change the gradient
    lt, _ = run(model, toks, names, gim(model, freeze_norm=False))
    assert torch.equal(lt, lp)  # without the norm freeze the forward is bit-identical


@pytest.mark.parametrize("model", ["gpt2_bridge64", "llama_bridge64", "native64"], indirect=True)
@pytest.mark.parametrize("metric", ["logprob", "softmax"])
def test_softmax_in_metric_keeps_true_gradient(model, metric):
    """TSG hits attention softmaxes only: downstream of the last attention layer the gradient is
    exactly plain autograd, with a (log-)softmax inside the metric."""
    b = selfrepair.probe(model)
    L = b.n_layers - 1
    names = ["ln_final.hook_out", b.hook(b.q_hook, L)]
    toks = tokens_for(model)
    _, cp = run(model, toks, names, metric=metric)
    _, cg = run(model, toks, names, gim(model, **only(temperature=T)), metric=metric)
    assert torch.equal(cp[names[0]][1], cg[names[0]][1])
    assert not torch.allclose(cp[names[1]][1], cg[names[1]][1])  # while the attention softmax is changed


# ----------------------------------------------------------------------------- norm freeze


def _eps(mod):
    for attr in ("eps", "variance_epsilon"):
        v = getattr(mod, attr, None)
        if v is not None:
            return float(v)
    raise AssertionError(f"no eps on {type(mod).__name__}")


def detached_norm_hooks(model):
    """Torch forward hooks replacing every norm module's output by a hand-built norm whose
    scale is detached: LN (x - mean) / sqrt(var + eps).detach() * w + b, RMS x / sqrt(mean x^2 + eps).detach() * w."""
    b = selfrepair.probe(model)
    handles = []
    for name, mod in model.named_modules():
        if not (hasattr(mod, "hook_scale") and getattr(mod, "original_component", None) is not None):
            continue
        orig = mod.original_component
        w = getattr(orig, "weight", None)
        bias = getattr(orig, "bias", None)
        eps = _eps(orig)

        def hook(module, args, out, w=w, bias=bias, eps=eps):
            x = args[0]
            xc = x - x.mean(-1, keepdim=True) if b.norm_type == "LN" else x
            s = (xc.pow(2).mean(-1, keepdim=True) + eps).sqrt().detach()
            y = xc / s
            if w is not None:
                y = y * w
            if bias is not None:
                y = y + bias
            return y.to(out.dtype)

        handles.append(mod.register_forward_hook(hook))
    assert len(handles) == 2 * b.n_layers + 1
    return handles


@pytest.mark.parametrize("model", ["gpt2_bridge64", "llama_bridge64", "native64", "native_gated"], indirect=True)
def test_norm_freeze_equals_detached_scale_autograd(model):
    toks = tokens_for(model)
    names = ["hook_embed"]
    _, cg = run(model, toks, names, gim(model, **only(freeze_norm=True)))
    handles = detached_norm_hooks(model)
    try:
        _, cr = run(model, toks, names)
    finally:
        for h in handles:
            h.remove()
    _, cp = run(model, toks, names)
    got, want, plain = cg["hook_embed"][1], cr["hook_embed"][1], cp["hook_embed"][1]
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9 * float(want.abs().max()))
    assert float((plain - want).abs().max()) > 1e-4 * float(want.abs().max())


# ----------------------------------------------------------------------------- multipliers


@pytest.mark.parametrize("model", ["gpt2_bridge64", "llama_bridge64", "native_gated"], indirect=True)
@pytest.mark.parametrize("component", ["q_scale", "k_scale", "v_scale", "gate_scale", "up_scale"])
@pytest.mark.parametrize("scale", [0.25, 0.3])
def test_multiplier_exact_on_last_layer(model, component, scale):
    """One multiplier alone: on the last layer the gradient at that branch's own hook is exactly
    scale x plain; branches parallel to it (the other attention inputs, or the other MLP
    branch) and downstream of it (the MLP, for q/k/v) keep exactly the plain gradient."""
    b = selfrepair.probe(model)
    sites = {"q_scale": b.q_hook, "k_scale": b.k_hook, "v_scale": b.v_hook, "gate_scale": b.gate_hook,
             "up_scale": b.up_hook}
    if sites[component] is None:
        assert not b.gated_mlp
        pytest.skip("no gated MLP on this model")
    L = b.n_layers - 1
    names = {c: b.hook(t, L) for c, t in sites.items() if t is not None}
    mlp = {"gate_scale", "up_scale"}
    unchanged = [c for c in names if c != component and (component not in mlp or c in mlp)]
    toks = tokens_for(model)
    _, cp = run(model, toks, list(names.values()))
    _, cg = run(model, toks, list(names.values()), gim(model, **only(**{component: scale})))
    plain, got = cp[names[component]][1], cg[names[component]][1]
    assert float(plain.abs().max()) > 0
    if scale == 0.25:
        assert torch.equal(got, plain * scale)
    else:
        torch.testing.assert_close(got, plain * scale, rtol=1e-12, atol=0)
    for c in unchanged:
        assert torch.equal(cg[names[c]][1], cp[names[c]][1]), c
    assert unchanged


def test_gate_up_ignored_without_gated_mlp(gpt2_bridge64):
    b = selfrepair.probe(gpt2_bridge64)
    assert not b.gated_mlp
    toks = tokens_for(gpt2_bridge64)
    _, c1 = run(gpt2_bridge64, toks, ["hook_embed"], gim(gpt2_bridge64, **only(gate_scale=0.5, up_scale=0.5)))
    _, c0 = run(gpt2_bridge64, toks, ["hook_embed"])
    assert torch.equal(c1["hook_embed"][1], c0["hook_embed"][1])


# ----------------------------------------------------------------------------- hooks


def test_user_hooks_survive_and_gim_hooks_are_removed(llama_bridge64):
    model = llama_bridge64
    base = n_hooks(model)
    seen = []
    user = ("blocks.0.attn.hook_pattern", lambda x, hook: seen.append(1))
    with model.hooks(fwd_hooks=[user]):
        n_user = n_hooks(model)
        with gim(model):
            assert n_hooks(model) > n_user
            model(tokens_for(model))
        assert n_hooks(model) == n_user and len(seen) == 1
        model(tokens_for(model))
        assert len(seen) == 2  # still registered after gim left
        with pytest.raises(ValueError, match="boom"):
            with gim(model):
                model(tokens_for(model))
                raise ValueError("boom")
        assert n_hooks(model) == n_user
    assert n_hooks(model) == base


def test_user_reset_hooks_inside_block_keeps_gim(native64):
    """gim's hooks are owned by the context: a user's model.reset_hooks() inside it does not remove them."""
    model = native64
    toks = tokens_for(model)
    _, cg = run(model, toks, ["hook_embed"], gim(model))
    with gim(model):
        model.reset_hooks()
        _, c2 = run(model, toks, ["hook_embed"])
    assert torch.equal(cg["hook_embed"][1], c2["hook_embed"][1])
    assert n_hooks(model) == 0


def test_missing_hook_site_raises_on_entry(llama_bridge64):
    model = llama_bridge64
    b = selfrepair.probe(model)
    base = n_hooks(model)
    with pytest.raises(GIMHookError, match="gated MLP"):
        with gim(model, backend=dataclasses.replace(b, up_hook=None)):
            pass
    # the probe missing the branches altogether: the config still says gated
    assert model.cfg.gated_mlp
    with pytest.raises(GIMHookError, match="gated MLP"):
        with gim(model, backend=dataclasses.replace(b, gated_mlp=False, gate_hook=None, up_hook=None)):
            pass
    with pytest.raises(GIMHookError, match="does not have"):
        with gim(model, backend=dataclasses.replace(b, q_hook="blocks.{layer}.attn.hook_nope")):
            pass
    assert n_hooks(model) == base
    with gim(model, backend=dataclasses.replace(b, up_hook=None), gate_scale=None, up_scale=None):
        pass  # explicitly switched off: fine


def test_hook_that_never_fires_raises_on_exit(gpt2_bridge64):
    """A backend naming a hook that exists but never fires: error after a forward, none without one."""
    model = gpt2_bridge64
    b = selfrepair.probe(model)
    dead = dataclasses.replace(b, q_hook="blocks.{layer}.attn.qkv.hook_out")  # never fires on GPT-2 bridges
    with gim(model, backend=dead):
        pass  # no forward ran: nothing to check
    with pytest.raises(GIMHookError, match="never fired"):
        with gim(model, backend=dead):
            model(tokens_for(model))
    assert n_hooks(model) == 0


def test_bad_arguments(gpt2_bridge64):
    for kw in (dict(temperature=0), dict(temperature=-1.0), dict(q_scale=float("nan")), dict(k_scale="x"),
               dict(v_scale=True), dict(freeze_norm=None)):
        with pytest.raises(ValueError):
            with gim(gpt2_bridge64, **kw):
                pass
    assert n_hooks(gpt2_bridge64) == 0


def test_partial_forward_checks_only_the_layers_it_ran(gpt2_bridge64):
    """run_with_hooks(resid, start_at_layer=l) inside gim: the layers below l need not fire, and the
    gradient w.r.t. that residual is the GIM gradient of the full run's residual."""
    model = gpt2_bridge64
    toks = tokens_for(model)
    _, full = run(model, toks, ["blocks.1.hook_resid_pre"], gim(model))
    resid = full["blocks.1.hook_resid_pre"][0].clone().requires_grad_(True)
    with gim(model):
        logits = model.run_with_hooks(resid, start_at_layer=1)
        (logits[:, -1, 5] - logits[:, -1, 7]).sum().backward(inputs=[resid])
    torch.testing.assert_close(resid.grad, full["blocks.1.hook_resid_pre"][1], rtol=1e-9, atol=1e-12)
    assert n_hooks(model) == 0
