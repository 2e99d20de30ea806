"""selfrepair.probe (models/probe.py): the measured backend facts, checked against independent evidence.

Each claim of the probe (made at layer 0) is re-checked here by a different
route: at another layer, against the wrapped HF modules, or by an analytic
gradient.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

import selfrepair
from selfrepair.analysis.gim import norm_freeze_hooks
from selfrepair.models.facts import ModelFacts, model_facts
from selfrepair.models.probe import Backend, ProbeError, _Prober

from conftest import make_gpt2_bridge, make_llama_bridge, needs_bridge

pytestmark = needs_bridge

TOKS = torch.tensor([[1, 17, 42, 7, 99, 42, 7, 150]])


def _edit_moves_output(model, name, tokens=TOKS):
    with torch.no_grad():
        clean = model(tokens)

        def edit(x, hook):
            return x + torch.randn_like(x.masked_fill(~torch.isfinite(x), 0)) * 0.5

        torch.manual_seed(0)
        with model.hooks(fwd_hooks=[(name, edit)]):
            out = model(tokens)
    return float((out - clean).abs().max()) > 1e-4


def _hook_count(model):
    return sum(len(hp.fwd_hooks) + len(hp.bwd_hooks) for hp in set(model.hook_dict.values()))


# ----------------------------------------------------------------------------- per backend


def test_gpt2_bridge(gpt2_bridge):
    b = selfrepair.probe(gpt2_bridge)
    assert isinstance(b, Backend)
    assert (b.kind, b.architecture) == ("bridge-hf", "GPT2LMHeadModel")
    assert (b.n_layers, b.n_heads, b.n_kv_heads, b.d_head, b.d_model, b.d_vocab) == (3, 4, 4, 16, 64, 200)
    assert b.scores_live and b.score_site == "scores"
    assert b.scores_hook == "blocks.{layer}.attn.hook_attn_scores" and not b.scores_hook_is_pattern
    assert b.masked_score_value == torch.finfo(torch.float32).min
    assert b.norm_type == "LN" and not b.gated_mlp and b.gate_hook is None and b.up_hook is None
    assert "ln_final.hook_scale" in b.norm_scale_hooks and b.norm_detach_rel_err <= 1e-6
    assert b.supports_start_at_layer and b.kv_head_of == (0, 1, 2, 3)
    assert None not in (b.q_input_hook, b.k_input_hook, b.v_input_hook)
    # independent: at the LAST layer too, scores and pattern edits reach the output
    last = b.n_layers - 1
    assert _edit_moves_output(gpt2_bridge, b.hook(b.scores_hook, last))
    assert _edit_moves_output(gpt2_bridge, b.hook(b.pattern_hook, last))


def test_native_bridge_scores_site_is_a_pattern(native_bridge):
    b = selfrepair.probe(native_bridge)
    assert b.kind == "bridge-native"
    assert not b.scores_live and b.score_site == "pattern" and b.scores_hook is None
    assert b.scores_hook_is_pattern and b.masked_score_value is None
    assert b.norm_type == "LN" and not b.gated_mlp
    # independent: at layer 1 the scores edit is discarded, the pattern edit is not,
    # and the "scores" hook holds rows summing to 1
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert not _edit_moves_output(native_bridge, "blocks.1.attn.hook_attn_scores")
    assert _edit_moves_output(native_bridge, "blocks.1.attn.hook_pattern")
    _, cache = native_bridge.run_with_cache(TOKS)
    torch.testing.assert_close(cache["blocks.1.attn.hook_attn_scores"].sum(-1), torch.ones(1, 4, 8))
    # but the probe found hooks that reproduce the softmax: q k^T / attn_scale
    q, k = cache[b.hook(b.score_q_hook, 1)], cache[b.hook(b.score_k_hook, 1)]
    a = torch.einsum("bqhd,bkhd->bhqk", q, k) / b.attn_scale
    a = a.masked_fill(~torch.ones(8, 8, dtype=torch.bool).tril(), float("-inf"))
    torch.testing.assert_close(a.softmax(-1), cache["blocks.1.attn.hook_pattern"], atol=1e-6, rtol=0)


def test_llama_bridge_gqa_rms_gated(llama_bridge):
    b = selfrepair.probe(llama_bridge)
    assert (b.kind, b.architecture) == ("bridge-hf", "LlamaForCausalLM")
    assert (b.n_heads, b.n_kv_heads, b.d_head) == (4, 2, 16)
    assert b.kv_head_of == (0, 0, 1, 1) and b.kv_head(3) == 1
    assert b.norm_type == "RMS" and b.scores_live and b.score_site == "scores"
    assert b.gated_mlp and b.gate_hook is not None and b.up_hook is not None
    assert (b.score_q_hook, b.score_k_hook) == ("blocks.{layer}.attn.hook_rot_q", "blocks.{layer}.attn.hook_rot_k")
    # independent: hook_k really has n_kv_heads heads, and gate/up hold the HF gate_proj/up_proj outputs (layer 1)
    _, cache = llama_bridge.run_with_cache(TOKS)
    assert cache["blocks.1.attn.hook_k"].shape[2] == 2 and cache["blocks.1.attn.hook_q"].shape[2] == 4
    hf_mlp = llama_bridge.original_model.model.layers[1].mlp
    seen = {}
    handles = [
        hf_mlp.gate_proj.register_forward_hook(lambda m, i, o: seen.__setitem__("gate", o.detach())),
        hf_mlp.up_proj.register_forward_hook(lambda m, i, o: seen.__setitem__("up", o.detach())),
    ]
    try:
        with torch.no_grad():
            llama_bridge(TOKS)
    finally:
        for h in handles:
            h.remove()
    torch.testing.assert_close(cache[b.hook(b.gate_hook, 1)], seen["gate"], rtol=0, atol=0)
    torch.testing.assert_close(cache[b.hook(b.up_hook, 1)], seen["up"], rtol=0, atol=0)


def test_stories260k(stories_model):
    b = selfrepair.probe(stories_model)
    assert (b.n_layers, b.n_heads, b.n_kv_heads, b.d_head, b.d_vocab) == (5, 8, 4, 8, 512)
    assert b.kv_head_of == (0, 0, 1, 1, 2, 2, 3, 3)
    assert b.gated_mlp and b.norm_type == "RMS" and b.scores_live
    assert b.norm_freeze_method == "straight_through"


def test_default_model(default_model):
    b = selfrepair.probe(default_model)
    assert b.kind == "bridge-hf" and b.architecture == "GPT2LMHeadModel"
    assert b.norm_type == "LN" and not b.gated_mlp and b.scores_live
    assert b.n_layers >= 4 and b.n_heads >= 4 and b.n_ctx >= 256


def test_float64_bridges(gpt2_bridge64, llama_bridge64):
    assert selfrepair.probe(gpt2_bridge64).masked_score_value == torch.finfo(torch.float64).min
    b = selfrepair.probe(llama_bridge64)
    assert b.gated_mlp and b.n_kv_heads == 2



@pytest.mark.parametrize("fixture", ["gpt2_bridge", "llama_bridge"])
def test_backend_dims_live_in_model_facts(fixture, request):
    """The Backend holds one ModelFacts; its dimensions are read-only views of it, and they match the shapes
    of the hooks of a fresh forward pass and the wrapped HF config (independent of the probe)."""
    model = request.getfixturevalue(fixture)
    b = selfrepair.probe(model)
    assert isinstance(b.facts, ModelFacts)
    names = ("kind", "architecture", "n_layers", "n_heads", "n_kv_heads", "d_head", "d_model", "d_vocab", "n_ctx",
             "z_hook")
    assert all(getattr(b, n) == getattr(b.facts, n) for n in names)
    assert not ({"n_layers", "n_heads", "n_kv_heads", "d_head", "n_ctx"} & {f.name for f in dataclasses.fields(b)})
    with pytest.raises(AttributeError):
        b.n_heads = 99
    hf = model.original_model.config
    _, cache = model.run_with_cache(TOKS)
    last = hf.num_hidden_layers - 1
    assert b.n_layers == hf.num_hidden_layers and f"blocks.{last + 1}.attn.hook_z" not in model.hook_dict
    assert b.n_heads == hf.num_attention_heads == cache[f"blocks.{last}.attn.hook_pattern"].shape[1]
    n_kv = getattr(hf, "num_key_value_heads", None) or hf.num_attention_heads
    assert b.n_kv_heads == n_kv == cache[f"blocks.{last}.attn.hook_k"].shape[2]
    assert b.d_head == hf.hidden_size // hf.num_attention_heads == cache[f"blocks.{last}.attn.hook_z"].shape[-1]
    assert (b.d_model, b.d_vocab) == (hf.hidden_size, hf.vocab_size)
    # the config-only reading agrees with the measured one on every field
    assert model_facts(model) == b.facts

# ----------------------------------------------------------------------------- hygiene


def test_probe_is_cached_and_leaves_model_clean():
    m = make_gpt2_bridge(seed=7)
    marker = []
    m.add_hook("blocks.0.hook_resid_pre", lambda x, hook: marker.append(1))
    n_hooks = _hook_count(m)
    with torch.no_grad():
        before = m(TOKS)
    m.train()
    b = selfrepair.probe(m)
    assert m.training  # mode restored
    m.eval()
    assert selfrepair.probe(m) is b
    assert selfrepair.probe(m, refresh=True) == b
    assert _hook_count(m) == n_hooks  # the user's hook is still there, the probe's are gone
    assert all(p.grad is None for p in m.parameters())  # probe used autograd.grad, not backward
    marker.clear()
    with torch.no_grad():
        assert torch.equal(m(TOKS), before)
    assert marker == [1]
    m.reset_hooks()


def test_probe_under_no_grad(llama_bridge):
    with torch.no_grad():
        b = selfrepair.probe(llama_bridge, refresh=True)
    assert b.scores_live


def test_probe_rejects_non_models():
    with pytest.raises(TypeError, match="TransformerLens model"):
        selfrepair.probe(torch.nn.Linear(2, 2))


def test_dead_pattern_site_raises(monkeypatch):
    m = make_gpt2_bridge(seed=1)
    real_live = _Prober.live

    def fake_live(self, name, delta):  # simulate a backend whose pattern edits are discarded
        if name.endswith("hook_pattern"):
            return False, False
        return real_live(self, name, delta)

    monkeypatch.setattr(_Prober, "live", fake_live)
    with pytest.raises(ProbeError, match="no live hook_pattern site"):
        selfrepair.probe(m)


# ----------------------------------------------------------------------------- norm freeze


@pytest.mark.filterwarnings("ignore:A forward hook edited hook_scale")
@pytest.mark.parametrize("make", [make_gpt2_bridge, make_llama_bridge], ids=["gpt2-LN", "llama-RMS"])
def test_norm_freeze_hooks_exact(make):
    """Forward bit-identical; gradient at ln_final's input = frozen-scale analytic VJP (float64)."""
    m = make(seed=2, dtype=torch.float64)
    b = selfrepair.probe(m)
    hf = m.original_model
    if b.norm_type == "LN":
        w_norm, w_u = hf.transformer.ln_f.weight, hf.lm_head.weight
    else:
        w_norm, w_u = hf.model.norm.weight, hf.lm_head.weight
    tok = 11
    store = {}

    def run(extra):
        leaf = torch.zeros(1, TOKS.shape[1], b.d_model, dtype=torch.float64, requires_grad=True)
        hooks = [("ln_final.hook_in", lambda x, hook: x + leaf),
                 ("ln_final.hook_in", lambda x, hook: store.__setitem__("x", x.detach())),
                 ("ln_final.hook_scale", lambda s, hook: store.__setitem__("s", s.detach()))]
        with m.hooks(fwd_hooks=hooks + extra):
            logits = m(TOKS)
        (g,) = torch.autograd.grad(logits[0, -1, tok], leaf)
        return logits.detach(), g[0, -1]

    clean, g_true = run([])
    frozen, g_frozen = run(norm_freeze_hooks(m))
    assert torch.equal(clean, frozen) or b.norm_detach_rel_err > 0
    torch.testing.assert_close(frozen, clean, rtol=0, atol=1e-6 * float(clean.abs().max()))
    x, s = store["x"][0, -1], store["s"][0, -1]
    u = w_norm * w_u[tok] / s  # dL/d(x_c) with s constant
    expect = u - u.mean() if b.norm_type == "LN" else u
    torch.testing.assert_close(g_frozen, expect, rtol=1e-9, atol=1e-12)
    assert not torch.allclose(g_true, expect)  # the scale path was there before
    if b.norm_freeze_method == "straight_through":
        assert torch.equal(clean, frozen)
