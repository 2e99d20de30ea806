"""GIM nesting and hook bookkeeping (issue 12, items 1 and 6).

- a ``gim`` block entered on a model already under ``gim`` with the same settings is a no-op: the
  gradients equal those of ONE gim (the independent reference: the same backward run under a single
  block), the hook count inside the inner block equals the outer one's, and the inner exit removes
  nothing; with other settings it raises and adds nothing;
- ``explain(method="gim")`` (which enters gim itself) gives the same attributions inside
  ``with gim(model)`` as outside (today's bug: 74% off because the hooks stacked);
- hooks that disappear inside the block are detected at the next forward pass and at the exit;
- every hook gim added is removed on every exit path; the user's hooks stay;
- a temperature that is not a finite number > 0 is one ValueError everywhere it is accepted.
"""

from __future__ import annotations

import pytest
import torch

from selfrepair import analyze_self_repair, explain
from selfrepair.analysis.gim import GIMHookError, gim
from selfrepair.analysis.rows import local_effects
from selfrepair.tasks import Task


def tokens_for(model, b=2, n=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, int(model.cfg.d_vocab), (b, n), generator=g)


def n_hooks(model) -> int:
    return sum(len(hp.fwd_hooks) + len(hp.bwd_hooks) for hp in {id(h): h for h in model.hook_dict.values()}.values())


def n_torch_hooks(model) -> int:
    """Forward (pre-)hooks registered on the model and its blocks (where gim's forward check lives)."""
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in [model, *model.blocks])


def embed_grad(model, tokens, *ctxs):
    """d(logit 5 - logit 7 at the last position)/d hook_embed, under the nested contexts ``ctxs``."""
    cap = {}

    def grab(x, hook):
        x = x.detach().requires_grad_(True)
        cap["e"] = x
        return x

    with torch.enable_grad(), model.hooks(fwd_hooks=[("hook_embed", grab)]):
        stack = [c for c in ctxs]
        for c in stack:
            c.__enter__()
        try:
            logits = model(tokens)
            (logits[:, -1, 5] - logits[:, -1, 7]).sum().backward(inputs=[cap["e"]])
        finally:
            for c in reversed(stack):
                c.__exit__(None, None, None)
    return cap["e"].grad


def small_task(model, b=3, seg=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    V = int(model.cfg.d_vocab)
    s = torch.randint(3, V, (b, seg), generator=g)
    return Task(torch.cat([s, s, s[:, :2]], 1), s[:, 2], torch.randint(3, V, (b,), generator=g))


@pytest.mark.parametrize("name", ["gpt2_bridge64", "llama_bridge64"])
def test_nested_gim_with_same_settings_is_one_gim(request, name):
    model = request.getfixturevalue(name)
    toks = tokens_for(model)
    base, base_t = n_hooks(model), n_torch_hooks(model)
    plain = embed_grad(model, toks)
    once = embed_grad(model, toks, gim(model))
    assert not torch.allclose(once, plain)          # GIM does change this gradient: the comparison can fail
    with gim(model):
        inside = n_hooks(model)
        with gim(model):
            assert n_hooks(model) == inside           # the inner block added nothing
        assert n_hooks(model) == inside               # ... and its exit removed nothing
        twice = embed_grad(model, toks, gim(model))
    # bit-identical: the same hooks and the same backward ran
    assert torch.equal(twice, once)
    assert n_hooks(model) == base and n_torch_hooks(model) == base_t


def test_explain_gim_inside_gim_equals_outside(gpt2_bridge64):
    model = gpt2_bridge64
    task = small_task(model)
    out = explain(model, task, method="gim", baseline_id=3, progress=False)
    with gim(model):
        ins = explain(model, task, method="gim", baseline_id=3, progress=False)
    assert torch.equal(ins.tensor, out.tensor)
    plain = explain(model, task, method="grad", baseline_id=3, progress=False)
    assert not torch.allclose(plain.tensor, out.tensor)   # GIM matters on this task
    assert n_hooks(model) == 0


def test_nested_gim_with_other_settings_raises(gpt2_bridge64):
    model = gpt2_bridge64
    with gim(model):
        inside = n_hooks(model)
        with pytest.raises(ValueError, match="already inside"):
            with gim(model, temperature=1.5):
                pass
        with pytest.raises(ValueError, match="already inside"):
            explain(model, small_task(model), method="gim", baseline_id=3, progress=False, q_scale=None)
        assert n_hooks(model) == inside
    assert n_hooks(model) == 0
    # a different model is independent: no error
    with gim(model, temperature=1.5):
        pass


def test_reset_hooks_including_permanent_is_detected(gpt2_bridge64):
    model = gpt2_bridge64
    toks = tokens_for(model)
    base_t = n_torch_hooks(model)
    # detected at the next forward pass (before any gradient could be plain)
    with pytest.raises(GIMHookError, match="removed inside"):
        with gim(model):
            model.reset_hooks(including_permanent=True)
            model(toks)
    assert n_hooks(model) == 0 and n_torch_hooks(model) == base_t
    # detected at the exit when no forward ran after the removal
    with pytest.raises(GIMHookError, match="removed inside"):
        with gim(model):
            model(toks)
            model.reset_hooks(including_permanent=True)
    assert n_hooks(model) == 0 and n_torch_hooks(model) == base_t
    # ... also in a forward that calls model.forward directly (run_with_hooks, start_at_layer)
    with pytest.raises(GIMHookError, match="forward pass"):
        with gim(model):
            model.reset_hooks(including_permanent=True)
            model.run_with_hooks(toks)
    assert n_hooks(model) == 0 and n_torch_hooks(model) == base_t
    assert all(len(b._forward_pre_hooks) == 0 for b in model.blocks)


def test_one_removed_hook_is_detected_and_user_hooks_survive(gpt2_bridge64):
    model = gpt2_bridge64
    toks = tokens_for(model)
    seen = []
    user = ("blocks.1.attn.hook_z", lambda x, hook: seen.append(1))
    with model.hooks(fwd_hooks=[user]):
        n_user = n_hooks(model)
        with pytest.raises(GIMHookError, match="1 of its"):
            with gim(model):
                model.blocks[0].attn.hook_pattern.remove_hooks(including_permanent=True)
        assert n_hooks(model) == n_user            # gim removed exactly the rest of its own hooks
        model(toks)
        assert len(seen) == 1                      # the user's hook is still there
        with pytest.raises(GIMHookError, match="forward pass"):
            with gim(model):
                model.blocks[2].ln1.hook_scale.remove_hooks(including_permanent=True)
                model(toks)
        assert n_hooks(model) == n_user
    assert n_hooks(model) == 0


BAD_T = [float("inf"), float("nan"), 0, 0.0, -1, -1.0]


@pytest.mark.parametrize("T", BAD_T)
def test_temperature_must_be_finite_and_positive(gpt2_bridge64, T):
    model = gpt2_bridge64
    with pytest.raises(ValueError, match="finite number > 0"):
        with gim(model, temperature=T):
            pass
    with pytest.raises(ValueError, match="finite number > 0"):
        analyze_self_repair(model, small_task(model), temperature=T, progress=False)
    with pytest.raises(ValueError, match="finite number > 0"):
        local_effects(torch.zeros(4), torch.ones(4, 2), torch.ones(2), torch.ones(4, dtype=torch.bool),
                      torch.tensor([1, 2]), temperature=T)
    assert n_hooks(model) == 0
