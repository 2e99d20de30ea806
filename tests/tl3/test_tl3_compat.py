"""TL 3.x ``HookedTransformer`` compatibility (run by ``.ci/tl3.sh`` in ``.tl3venv``).

Models are built from ``HookedTransformerConfig`` (no download). Checks that
the package imports, ``load_model`` passes a HookedTransformer through, the
probe measures the TL 3 facts (live scores masked with -inf, GQA kv heads,
RMS / gated MLP hooks, norm freeze), and smoke-runs the analysis and GIM
entry points where they exist.
"""

from __future__ import annotations

import math

import pytest
import torch

from transformer_lens import HookedTransformer, HookedTransformerConfig

import selfrepair
from selfrepair.analysis.gim import norm_freeze_hooks

TOKS = torch.tensor([[1, 17, 42, 7, 99, 42, 7, 150]])


def _ht(**kw):
    base = dict(
        n_layers=2, d_model=64, n_heads=4, d_head=16, d_mlp=128, d_vocab=200, n_ctx=64,
        act_fn="gelu", normalization_type="LN", seed=0, device="cpu",
    )
    base.update(kw)
    return HookedTransformer(HookedTransformerConfig(**base)).eval()


@pytest.fixture(scope="module")
def gpt_like():
    return _ht()


@pytest.fixture(scope="module")
def llama_like():
    return _ht(
        normalization_type="RMS", act_fn="silu", gated_mlp=True, n_key_value_heads=2,
        positional_embedding_type="rotary", rotary_dim=16, final_rms=True,
    )


def test_load_model_returns_hooked_transformer_as_is(gpt_like):
    assert selfrepair.load_model(gpt_like) is gpt_like
    assert not gpt_like.training


def test_probe_tl3_ln(gpt_like):
    b = selfrepair.probe(gpt_like)
    assert b.kind == "tl3"
    assert b.scores_live and b.score_site == "scores" and not b.scores_hook_is_pattern
    assert b.scores_hook == "blocks.{layer}.attn.hook_attn_scores"
    assert b.masked_score_value == -math.inf
    assert (b.n_heads, b.n_kv_heads, b.d_head) == (4, 4, 16)
    assert b.norm_type == "LN" and not b.gated_mlp
    assert b.supports_start_at_layer
    # TL 3 fires hook_q_input only with use_split_qkv_input: the probe switched it on and says so
    assert b.enabled == ("use_split_qkv_input",) and gpt_like.cfg.use_split_qkv_input
    assert b.q_input_hook == "blocks.{layer}.hook_q_input"
    # independent: masked scores are -inf in the cache, and editing the scores of layer 1 moves the logits
    _, cache = gpt_like.run_with_cache(TOKS)
    sc = cache["blocks.1.attn.hook_attn_scores"]
    assert torch.isneginf(sc[0, :, 0, 1:]).all()
    with torch.no_grad():
        clean = gpt_like(TOKS)
        with gpt_like.hooks(fwd_hooks=[("blocks.1.attn.hook_attn_scores", lambda x, hook: x * 3)]):
            assert (gpt_like(TOKS) - clean).abs().max() > 1e-4


def test_probe_tl3_gqa_rms_gated(llama_like):
    b = selfrepair.probe(llama_like)
    assert b.kind == "tl3" and b.norm_type == "RMS" and b.gated_mlp
    assert b.n_heads == 4 and b.n_kv_heads == 2 and b.kv_head_of == (0, 0, 1, 1)
    assert b.gate_hook is not None and b.up_hook is not None and b.gate_hook != b.up_hook
    # independent: the gate hook holds x @ W_gate, the up hook x @ W_in (TL 3 weights)
    _, cache = llama_like.run_with_cache(TOKS)
    x = cache["blocks.1.ln2.hook_normalized"]
    torch.testing.assert_close(cache[b.hook(b.gate_hook, 1)], x @ llama_like.blocks[1].mlp.W_gate, atol=1e-5, rtol=0)
    torch.testing.assert_close(cache[b.hook(b.up_hook, 1)], x @ llama_like.blocks[1].mlp.W_in + llama_like.blocks[1].mlp.b_in,
                               atol=1e-5, rtol=0)


@pytest.mark.parametrize("which", ["gpt_like", "llama_like"])
def test_norm_freeze_forward_unchanged(request, which):
    m = request.getfixturevalue(which)
    with torch.no_grad():
        clean = m(TOKS)
        with m.hooks(fwd_hooks=norm_freeze_hooks(m)):
            frozen = m(TOKS)
    assert torch.equal(clean, frozen)


def _optional(module: str, name: str):
    import importlib

    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        pytest.skip(f"{module}.{name} not available")


def test_smoke_gim(llama_like):
    gim = _optional("selfrepair.analysis.gim", "gim")
    emb = llama_like.embed(TOKS).detach().requires_grad_(True)
    with gim(llama_like):
        out = llama_like.run_with_hooks(TOKS, fwd_hooks=[("hook_embed", lambda x, hook: emb)])
        out[0, -1, 5].backward()
    assert emb.grad is not None and torch.isfinite(emb.grad).all() and emb.grad.abs().max() > 0


def test_smoke_analyze_self_repair(gpt_like):
    analyze = _optional("selfrepair.analysis.self_repair", "analyze_self_repair")
    from selfrepair import tasks

    task = tasks.load("induction", gpt_like, n=2)
    res = analyze(gpt_like, task, min_contribution=0.0, progress=False)
    assert len(res.groups) > 0
