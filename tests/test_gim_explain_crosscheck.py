"""Cross-check with the authors' package gim-explain 0.1.4 (``gim.explain``).

What theirs computes (gim/explain.py, TransformerLens path): the token embedding
``model.embed(ids)`` of the FIRST prompt is injected at ``hook_embed`` as a leaf,
one logit ``logits[0, target_position, target_token_id]`` is back-propagated
inside ``GIM(model, ...)``, and the attribution is ``sum_d grad * (e - e_baseline)``
with ``e_baseline`` the embedding of ``baseline_token_id``. Its GIM: TSG through a
process-wide ``F.softmax`` patch, ``hook_scale`` detached, q/k/v multipliers at
``hook_q/k/v``; no gate/up scaling in 0.1.4.

Ours with metric ``logit_diff`` explains ``logit[answer] - logit[wrong]``, i.e. the
difference of two of their calls. Where theirs runs (TL 4 native bridges; TL 3,
see tests/tl3) the two agree to 1e-5. On HF-wrapped TL 4 bridges theirs crashes:
the bridge calls ``F.softmax(x, dim=-1, dtype=...)`` and their replacement
``F_patched(input, dim=None)`` takes no ``dtype``.
"""

from __future__ import annotations

import pytest
import torch

from selfrepair.analysis import explain
from selfrepair.tasks import Task

gx = pytest.importorskip("gim", reason="gim-explain (test dependency) not installed")

from conftest import make_native_bridge  # noqa: E402

SETTINGS = {
    "default": dict(),
    "tsg_only": dict(freeze_norm=False, q_scale=None, k_scale=None, v_scale=None),
    "norm_only": dict(softmax_temperature=None, q_scale=None, k_scale=None, v_scale=None),
    "qkv_only": dict(freeze_norm=False, softmax_temperature=None),
    "T3_other_scales": dict(softmax_temperature=3.0, q_scale=0.5, k_scale=0.3, v_scale=0.7),
}


def ours_kwargs(theirs: dict) -> dict:
    kw = dict(freeze_norm=theirs.get("freeze_norm", True), temperature=theirs.get("softmax_temperature", 2.0),
              q_scale=theirs.get("q_scale", 0.25), k_scale=theirs.get("k_scale", 0.25),
              v_scale=theirs.get("v_scale", 0.5))
    return dict(kw, gate_scale=None, up_scale=None)  # 0.1.4 has no gate/up scaling


@pytest.fixture(scope="module")
def native64():
    return make_native_bridge(dtype=torch.float64, seed=3)


@pytest.fixture(scope="module")
def native32():
    return make_native_bridge(seed=3)


def one_prompt_task(model, seed=0, n=10):
    g = torch.Generator().manual_seed(seed)
    V = int(model.cfg.d_vocab)
    ids = torch.randint(3, V, (1, n), generator=g)
    ans, wrong = torch.randint(3, V, (2,), generator=g).tolist()
    return ids, Task(ids, [ans], [wrong])


def theirs_logit_diff(model, ids, task, base, **kw):
    pos = int(task.positions[0])
    a = gx.explain(model, ids, target_token_id=int(task.answer_ids[0]), target_position=pos,
                   baseline_token_id=base, **kw)
    w = gx.explain(model, ids, target_token_id=int(task.wrong_ids[0]), target_position=pos,
                   baseline_token_id=base, **kw)
    return (a - w).detach()


@pytest.mark.parametrize("setting", list(SETTINGS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_gim_explain_on_native_bridge(native64, native32, setting, dtype):
    model = native64 if dtype == torch.float64 else native32
    ids, task = one_prompt_task(model)
    base = 5
    kw = SETTINGS[setting]
    theirs = theirs_logit_diff(model, ids, task, base, **kw)
    ours = explain(model, task, method="gim", baseline_id=base, **ours_kwargs(kw))[0]
    scale = float(theirs.abs().max())
    assert scale > 0
    torch.testing.assert_close(ours.to(theirs.dtype), theirs, rtol=1e-5, atol=1e-5 * scale)


def test_matches_gim_explain_plain_gradient(native64):
    """Everything off in theirs is the plain gradient: our method='grad'."""
    ids, task = one_prompt_task(native64, seed=1)
    theirs = theirs_logit_diff(native64, ids, task, 7, freeze_norm=False, softmax_temperature=None,
                               q_scale=None, k_scale=None, v_scale=None)
    ours = explain(native64, task, baseline_id=7)[0]
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5 * float(theirs.abs().max()))


def test_theirs_touches_a_softmax_in_the_metric_ours_does_not(native64):
    """Their F.softmax patch also changes the gradient of a softmax inside the user's metric."""
    from gim import GIM

    ids, _ = one_prompt_task(native64, seed=2)

    def grad_at_final_ln(ctx_factory):
        cap = {}

        def f(x, hook):
            x.retain_grad()
            cap["x"] = x
            return x

        with torch.enable_grad(), native64.hooks(fwd_hooks=[("ln_final.hook_out", f)]), ctx_factory():
            logits = native64(ids)
            torch.softmax(logits[0, -1], -1)[5].backward(inputs=[cap["x"]])
        return cap["x"].grad

    from selfrepair.analysis.gim import gim

    plain = grad_at_final_ln(lambda: torch.enable_grad())
    ours = grad_at_final_ln(lambda: gim(native64, freeze_norm=False, q_scale=None, k_scale=None, v_scale=None))
    theirs = grad_at_final_ln(lambda: GIM(native64, freeze_norm=False, q_scale=None, k_scale=None, v_scale=None))
    assert torch.equal(ours, plain)
    assert not torch.allclose(theirs, plain, rtol=1e-3, atol=0)


def test_hf_bridge_ours_runs_theirs_crashes(gpt2_bridge):
    """HF-wrapped bridges: the bridge calls F.softmax(..., dtype=...), which their patch rejects."""
    ids, task = one_prompt_task(gpt2_bridge)
    ours = explain(gpt2_bridge, task, method="gim", baseline_id=5)
    assert torch.isfinite(ours).all() and float(ours.abs().max()) > 0
    try:
        theirs_logit_diff(gpt2_bridge, ids, task, 5)
    except TypeError as e:
        assert "dtype" in str(e)
    else:  # a later gim-explain or TransformerLens may fix this: then the two must agree
        pytest.xfail("gim-explain ran on an HF-wrapped bridge (no dtype crash): see the native-bridge cross-check")
    # the softmax patch is restored after their crash (their finally block)
    assert torch.nn.functional.softmax.__module__ == "torch.nn.functional"
