"""GIM on a TL 3.x HookedTransformer (run in the TL 3 environment, ``bash .ci/tl3.sh``).

Same independent references as tests/test_gim.py: the explicit softmax Jacobian with
``s = softmax(a / T)`` from the captured scores (TL 3 has a live ``hook_attn_scores`` and
masks with -inf), norms rebuilt by hand with a detached scale, exact multiples on the last
layer, and gim-explain 0.1.4 (whose TransformerLens path was written for TL 3).
"""

from __future__ import annotations

import pytest
import torch

try:
    from transformer_lens import HookedTransformer, HookedTransformerConfig
except Exception:  # TL 4 removed HookedTransformer
    pytest.skip("needs TransformerLens 3.x (HookedTransformer)", allow_module_level=True)

import selfrepair
from selfrepair.analysis import explain
from selfrepair.analysis.gim import gim
from selfrepair.tasks import Task

T = 2.0
OFF = dict(temperature=None, freeze_norm=False, q_scale=None, k_scale=None, v_scale=None, gate_scale=None,
           up_scale=None)


def only(**kw):
    return {**OFF, **kw}


def make(gated: bool = False):
    torch.manual_seed(0)
    kw = dict(n_layers=2, d_model=32, n_ctx=32, d_head=8, n_heads=4, d_vocab=100, d_mlp=64, dtype=torch.float64,
              seed=0)
    if gated:
        kw.update(act_fn="silu", normalization_type="RMS", positional_embedding_type="rotary", gated_mlp=True,
                  n_key_value_heads=2)
    else:
        kw.update(act_fn="gelu_new", normalization_type="LN")
    return HookedTransformer(HookedTransformerConfig(**kw)).eval()


@pytest.fixture(scope="module")
def ln_model():
    return make(False)


@pytest.fixture(scope="module")
def gated_model():
    return make(True)


@pytest.fixture(params=["ln_model", "gated_model"])
def model(request):
    return request.getfixturevalue(request.param)


def toks(model, b=2, n=9):
    return torch.randint(3, int(model.cfg.d_vocab), (b, n), generator=torch.Generator().manual_seed(0))


def n_hooks(model):
    return sum(len(hp.fwd_hooks) + len(hp.bwd_hooks) for hp in model.hook_dict.values())


def run(model, tokens, names, ctx=None, attention_mask=None, inner=()):
    """Forward + backward of sum_b m; -> (logits, {name: (value, grad)}). Capture hooks run before
    ``ctx``'s; ``inner`` hooks are added inside ``ctx`` (after gim's)."""
    caps = {}

    def cap(name):
        def f(x, hook):
            x.retain_grad()
            caps[name] = x
            return x
        return f

    with torch.enable_grad(), model.hooks(fwd_hooks=[(n, cap(n)) for n in names]):
        with (ctx if ctx is not None else torch.enable_grad()), model.hooks(fwd_hooks=list(inner)):
            logits = model(tokens, attention_mask=attention_mask)
            (logits[:, -1, 5] - logits[:, -1, 7]).sum().backward(inputs=[caps[n] for n in names])
    return logits.detach(), {n: (caps[n].detach(), caps[n].grad) for n in names}


def explicit_tsg(a, g, mask, temperature):
    s = torch.softmax(a.double().masked_fill(~mask, float("-inf")) / temperature, -1).nan_to_num(0.0)
    jac = torch.diag_embed(s) - s[..., :, None] * s[..., None, :]
    return torch.einsum("...ij,...j->...i", jac, g.double())


def test_probe_sees_live_scores(model):
    b = selfrepair.probe(model)
    assert b.kind == "tl3" and b.score_site == "scores"


def test_forward_unchanged_and_all_off_exact(model):
    t = toks(model)
    lp, cp = run(model, t, ["hook_embed"])
    lo, co = run(model, t, ["hook_embed"], gim(model, **OFF))
    assert torch.equal(lp, lo) and torch.equal(cp["hook_embed"][1], co["hook_embed"][1])
    lg, cg = run(model, t, ["hook_embed"], gim(model))
    assert float((lg - lp).abs().max()) <= 1e-6 * float(lp.abs().max())
    assert not torch.allclose(cg["hook_embed"][1], cp["hook_embed"][1])


def test_tsg_equals_explicit_jacobian(model):
    b = selfrepair.probe(model)
    names = [b.hook(b.scores_hook, l) for l in range(b.n_layers)] + [b.hook(b.pattern_hook, l) for l in range(b.n_layers)]
    _, caps = run(model, toks(model), names, gim(model, **only(temperature=T)))
    mask = torch.ones(9, 9, dtype=torch.bool).tril()
    for l in range(b.n_layers):
        a, got = caps[b.hook(b.scores_hook, l)]
        _, gp = caps[b.hook(b.pattern_hook, l)]
        assert torch.isneginf(a[..., ~mask]).all()  # TL 3 masks with -inf
        want = explicit_tsg(a, gp, mask, T)
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))


def test_tsg_fast_path_and_rows_without_keys(model):
    """The TSG autograd function spliced in at hook_pattern (the backend's softmax backward skipped)
    is the one used on TL 3, and left padding -- query rows whose every key is -inf, which TL 3 turns
    into a zero pattern row -- gives finite gradients equal to the explicit Jacobian (0 on those rows)."""
    b = selfrepair.probe(model)
    kinds = {}

    def record(x, hook):
        kinds[hook.name] = type(x.grad_fn).__name__
        return x

    t = toks(model)
    am = torch.ones_like(t)
    am[1, :3] = 0                                  # left padding on prompt 1
    names = [b.hook(b.scores_hook, l) for l in range(b.n_layers)] + [b.hook(b.pattern_hook, l) for l in range(b.n_layers)]
    _, caps = run(model, t, names, gim(model, **only(temperature=T)), attention_mask=am,
                  inner=[(n, record) for n in names[b.n_layers:]])
    assert set(kinds.values()) == {"_TSGSoftmaxBackward"}, kinds
    mask = (torch.ones(9, 9, dtype=torch.bool).tril()[None] & am.bool()[:, None, :])[:, None]
    for l in range(b.n_layers):
        a, got = caps[b.hook(b.scores_hook, l)]
        _, gp = caps[b.hook(b.pattern_hook, l)]
        assert torch.isfinite(got).all()
        assert torch.isneginf(a[1, :, :3]).all()   # the padded queries see no key at all
        want = explicit_tsg(a, gp, mask.expand_as(a), T)
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
        assert float(got[1, :, :3].abs().max()) == 0.0


def test_norm_freeze_equals_detached_scale(model):
    b = selfrepair.probe(model)
    handles = []
    for _, mod in model.named_modules():
        if not hasattr(mod, "hook_scale") or not hasattr(mod, "w"):
            continue

        def hook(module, args, out):
            x = args[0]
            xc = x - x.mean(-1, keepdim=True) if b.norm_type == "LN" else x
            y = xc / (xc.pow(2).mean(-1, keepdim=True) + module.eps).sqrt().detach() * module.w
            return y + module.b if hasattr(module, "b") else y

        handles.append(mod.register_forward_hook(hook))
    assert len(handles) == 2 * b.n_layers + 1
    try:
        _, cr = run(model, toks(model), ["hook_embed"])
    finally:
        for h in handles:
            h.remove()
    _, cg = run(model, toks(model), ["hook_embed"], gim(model, **only(freeze_norm=True)))
    want = cr["hook_embed"][1]
    torch.testing.assert_close(cg["hook_embed"][1], want, rtol=1e-9, atol=1e-9 * float(want.abs().max()))


@pytest.mark.parametrize("component", ["q_scale", "k_scale", "v_scale", "gate_scale", "up_scale"])
def test_multiplier_exact_on_last_layer(model, component):
    b = selfrepair.probe(model)
    site = {"q_scale": b.q_hook, "k_scale": b.k_hook, "v_scale": b.v_hook, "gate_scale": b.gate_hook,
            "up_scale": b.up_hook}[component]
    if site is None:
        pytest.skip("no gated MLP")
    name = b.hook(site, b.n_layers - 1)
    _, cp = run(model, toks(model), [name])
    _, cg = run(model, toks(model), [name], gim(model, **only(**{component: 0.25})))
    assert float(cp[name][1].abs().max()) > 0
    assert torch.equal(cg[name][1], 0.25 * cp[name][1])


def test_hooks_removed_user_hooks_kept(ln_model):
    base = n_hooks(ln_model)
    seen = []
    ln_model.add_hook("blocks.0.attn.hook_pattern", lambda x, hook: seen.append(1))
    try:
        with pytest.raises(RuntimeError, match="boom"):
            with gim(ln_model):
                ln_model(toks(ln_model))
                raise RuntimeError("boom")
        assert n_hooks(ln_model) == base + 1
        ln_model(toks(ln_model))
        assert len(seen) == 2
    finally:
        ln_model.reset_hooks()
    assert n_hooks(ln_model) == base


def test_matches_gim_explain(ln_model):
    gx = pytest.importorskip("gim")
    ids = toks(ln_model, b=1)
    task = Task(ids, [5], [7])
    pos = int(task.positions[0])
    theirs = (gx.explain(ln_model, ids, target_token_id=5, target_position=pos, baseline_token_id=3)
              - gx.explain(ln_model, ids, target_token_id=7, target_position=pos, baseline_token_id=3))
    ours = explain(ln_model, task, method="gim", baseline_id=3, gate_scale=None, up_scale=None)[0]
    torch.testing.assert_close(ours, theirs.to(ours.dtype), rtol=1e-5, atol=1e-5 * float(theirs.abs().max()))
