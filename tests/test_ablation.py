"""Global-effects engine (selfrepair.engine.edits) against independent brute-force re-runs.

References are plain per-edit ``model.run_with_hooks`` forwards over the whole prompt with
full logits (one edit per forward), with the edit applied at ``hook_z`` or, for score
ablations, at ``hook_pattern``. Float64 comparisons use rtol 1e-5, atol 1e-6 (issue 3).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from conftest import gpt2_config, llama_config, make_gpt2_bridge, make_native_bridge, needs_bridge
from selfrepair.engine import edits as A
from selfrepair.models.facts import model_facts
from selfrepair.tasks import Task

pytestmark = needs_bridge

RTOL, ATOL = 1e-5, 1e-6


# ----------------------------------------------------------------------------- helpers


def _task(model, seed=0, B=3, T=24, pad=True, metric="logit_diff"):
    g = torch.Generator().manual_seed(seed)
    V = model.cfg.d_vocab
    toks = torch.randint(0, V, (B, T), generator=g)
    am = torch.ones(B, T, dtype=torch.long)
    positions = None
    if pad and B > 1:
        am[1, T - 6:] = 0                       # right padding: prompt 1 is 6 tokens shorter
        positions = am.sum(1) - 1
        positions[0] = T - 4                    # metric position before the end of prompt 0
    return Task(toks, torch.randint(0, V, (B,), generator=g), torch.randint(0, V, (B,), generator=g),
                positions=positions, attention_mask=am, metric=metric)


def _edits(model, task, n=30, span=3, seed=1, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    B, T = task.tokens.shape
    L, H, dh = model.cfg.n_layers, model.cfg.n_heads, model.cfg.d_head
    return A.ZEdits(torch.randint(0, B, (n,), generator=g), torch.randint(0, L, (n,), generator=g),
                    torch.randint(0, H, (n,), generator=g), torch.randint(0, T, (n,), generator=g),
                    0.5 * torch.randn(n, span, dh, generator=g, dtype=dtype))


@torch.no_grad()
def _ref_loop(model, task, edits):
    """Independent reference: one full forward per edit, hook at hook_z, full logits."""
    out, clean = [], {}
    for i in range(len(edits)):
        p, l, h, s = (int(edits.prompt[i]), int(edits.layer[i]), int(edits.head[i]), int(edits.start[i]))
        toks = task.tokens[p:p + 1]
        idx = torch.tensor([p])
        if p not in clean:                                          # plain full forward of the prompt
            clean[p] = task.metric_from_full_logits(model(toks), idx)
        m0 = clean[p]

        def fn(z, hook):
            z = z.clone()
            k = max(0, min(edits.span, z.shape[1] - s))
            z[0, s:s + k, h] += edits.delta[i, :k].to(z.dtype)
            return z

        m1 = task.metric_from_full_logits(model.run_with_hooks(toks, fwd_hooks=[(f"blocks.{l}.attn.hook_z", fn)]), idx)
        out.append(float(m0 - m1))
    return torch.tensor(out, dtype=torch.float64)


def _no_hooks_left(model):
    return all(len(hp.fwd_hooks) == 0 and len(hp.bwd_hooks) == 0 for hp in model.hook_dict.values())


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Brute-force references run many tiny forwards: one thread avoids oversubscription (restored after)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def native64():
    return make_native_bridge(dtype=torch.float64)


def _sharp(config, seed):
    """A random model with large weights (peaked attention, so score ablations matter), float64."""
    import selfrepair

    config.initializer_range = 0.25
    torch.manual_seed(seed)
    return selfrepair.load_model(config, dtype=torch.float64)


@pytest.fixture(scope="module")
def sharp_gpt2_64():
    return _sharp(gpt2_config(), 20)


@pytest.fixture(scope="module")
def sharp_llama_64():
    return _sharp(llama_config(), 21)


# ----------------------------------------------------------------------------- agreement with the reference loop


@pytest.mark.parametrize("name", ["sharp_gpt2_64", "sharp_llama_64", "native64"])
def test_matches_one_forward_per_edit(name, request):
    model = request.getfixturevalue(name)
    task = _task(model)
    edits = _edits(model, task)
    run = A.run_z_edits(model, task, edits, progress=False)
    got = run.effects
    info = run.info()
    assert got.dtype == torch.float64
    ref = _ref_loop(model, task, edits)
    assert ref.abs().max() > 1e-3                                   # the edits do something
    torch.testing.assert_close(got, ref, rtol=RTOL, atol=ATOL)
    assert info["path"] == ("hooks" if name == "native64" else "fast")
    # batched partial, unbatched (batch_size=1) and hook-path results agree
    one = A.measure_z_edits(model, task, edits, progress=False, batch_size=1)
    torch.testing.assert_close(one, ref, rtol=RTOL, atol=ATOL)
    hooks = A.measure_z_edits(model, task, edits, progress=False, path="hooks")
    torch.testing.assert_close(hooks, ref, rtol=RTOL, atol=ATOL)
    assert _no_hooks_left(model)
    # the hook path unembeds only the metric rows, once checked against the clean forward's logits
    clean = A.prepare_clean(model, task, path="hooks", batch_size=2)
    assert clean.unembed_mode == "resid"


def test_float32_model_returns_float32(gpt2_bridge):
    task = _task(gpt2_bridge)
    edits = _edits(gpt2_bridge, task, n=12, dtype=torch.float32)
    got = A.measure_z_edits(gpt2_bridge, task, edits, progress=False)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), _ref_loop(gpt2_bridge, task, edits), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["gpt2_bridge64", "native64"])
def test_batch_size_invariance(name, request):
    model = request.getfixturevalue(name)
    task = _task(model, seed=3)
    edits = _edits(model, task, n=25, seed=4)
    clean = A.prepare_clean(model, task)
    base = A.measure_z_edits(model, task, edits, progress=False, clean=clean)
    for bs in (1, 2, 7, 1000):
        got = A.measure_z_edits(model, task, edits, progress=False, clean=clean, batch_size=bs)
        torch.testing.assert_close(got, base, rtol=RTOL, atol=ATOL)
    # order of the edits does not matter either
    perm = torch.randperm(len(edits), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(A.measure_z_edits(model, task, edits[perm], progress=False, clean=clean),
                               base[perm], rtol=RTOL, atol=ATOL)


def test_prompt_groups_when_clean_cache_is_large(gpt2_bridge64, monkeypatch):
    """With a tiny CLEAN_BUDGET the task is measured in prompt groups: same numbers."""
    task = _task(gpt2_bridge64, seed=30, B=5)
    edits = _edits(gpt2_bridge64, task, n=20, seed=31)
    whole = A.measure_z_edits(gpt2_bridge64, task, edits, progress=False)
    monkeypatch.setattr(A, "CLEAN_BUDGET", 2 * A._clean_bytes(model_facts(gpt2_bridge64), task.tokens.shape[1], torch.float64))
    run = A.run_z_edits(gpt2_bridge64, task, edits, progress=False)
    grouped = run.effects
    torch.testing.assert_close(grouped, whole, rtol=RTOL, atol=ATOL)
    assert run["edits"] == len(edits) and run["forwards"] > 0


# ----------------------------------------------------------------------------- score ablation as a z delta


@pytest.mark.parametrize("name", ["sharp_gpt2_64", "sharp_llama_64"])
def test_score_ablation_as_z_delta_equals_pattern_edit(name, request):
    """Mean-ablate 2 keys' scores of one row; z delta sum_j (p'_j - p_j) v_j equals the hook_pattern edit."""
    model = request.getfixturevalue(name)
    task = _task(model, seed=5, pad=False)
    L, H = model.cfg.n_layers, model.cfg.n_heads
    rep = H // (getattr(model.cfg, "n_key_value_heads", None) or H)
    _, cache = model.run_with_cache(task.tokens, names_filter=lambda n: n.endswith(("hook_attn_scores", "hook_pattern", "hook_v")))
    g = torch.Generator().manual_seed(6)
    rows, deltas, ref = [], [], []
    for _ in range(10):
        p, l, h = int(torch.randint(0, len(task), (1,), generator=g)), int(torch.randint(0, L, (1,), generator=g)), \
            int(torch.randint(0, H, (1,), generator=g))
        i = int(torch.randint(2, int(task.positions[p]) + 1, (1,), generator=g))
        a = cache[f"blocks.{l}.attn.hook_attn_scores"][p, h, i, :i + 1]
        S = torch.randperm(i + 1, generator=g)[:2]
        a2 = a.clone()
        a2[S] = a.mean()                                            # docs/quantities.md "Local effects": mean over unmasked keys 0..i
        p_new = torch.softmax(a2, -1)
        p_old = cache[f"blocks.{l}.attn.hook_pattern"][p, h, i, :i + 1]
        v = cache[f"blocks.{l}.attn.hook_v"][p, :i + 1, h // rep]
        deltas.append(((p_new - p_old)[:, None] * v).sum(0))
        rows.append((p, l, h, i))

        def fn(pat, hook, h=h, i=i, p_new=p_new):
            pat = pat.clone()
            pat[0, h, i, :i + 1] = p_new
            return pat

        toks, idx = task.tokens[p:p + 1], torch.tensor([p])
        with torch.no_grad():
            m0 = task.metric_from_full_logits(model(toks), idx)
            m1 = task.metric_from_full_logits(
                model.run_with_hooks(toks, fwd_hooks=[(f"blocks.{l}.attn.hook_pattern", fn)]), idx)
        ref.append(float(m0 - m1))
    r = torch.tensor(rows)
    edits = A.ZEdits(r[:, 0], r[:, 1], r[:, 2], r[:, 3], torch.stack(deltas)[:, None, :])
    got = A.measure_z_edits(model, task, edits, progress=False)
    ref = torch.tensor(ref, dtype=torch.float64)
    assert ref.abs().max() > 1e-2
    torch.testing.assert_close(got, ref, rtol=RTOL, atol=ATOL)


# ----------------------------------------------------------------------------- the fast path is the one taken


@pytest.mark.parametrize("name", ["gpt2_bridge64", "llama_bridge64"])
def test_fast_path_taken_on_hf_bridges(name, request):
    model = request.getfixturevalue(name)
    task = _task(model, seed=7)
    edits = _edits(model, task, n=20, seed=8)
    clean = A.prepare_clean(model, task)
    assert clean.path == "fast" and clean.fast_kind == ("gpt2" if name.startswith("gpt2") else "llama")
    assert clean.check_max_abs_diff < 1e-8
    calls = []
    handles = [blk.register_forward_pre_hook(lambda m, a: calls.append(1)) for blk in model.blocks]
    handles.append(model.register_forward_pre_hook(lambda m, a: calls.append(1)))
    try:
        run = A.run_z_edits(model, task, edits, progress=False, clean=clean, path="fast")
        got = run.effects
    finally:
        for hd in handles:
            hd.remove()
    assert calls == []                                              # no model forward, no block forward
    assert run["path"] == "fast" and run["forwards"] >= 1
    # partial: fewer positions recomputed than full prompts would need
    assert run["positions"] < len(edits) * task.tokens.shape[1]
    run = A.run_z_edits(model, task, edits, progress=False, path="hooks")
    slow = run.effects
    assert run["path"] == "hooks"
    torch.testing.assert_close(got, slow, rtol=RTOL, atol=ATOL)


def test_user_hooks_kept_and_applied(gpt2_bridge64):
    """A user's own hook: auto takes the hook path (so the hook applies) and the hook stays attached."""
    model = gpt2_bridge64
    task = _task(model, seed=9)
    edits = _edits(model, task, n=8, seed=10)
    seen = []

    def user_hook(x, hook):                                         # doubles layer-0 MLP output
        seen.append(1)
        return 2 * x

    clean = A.prepare_clean(model, task)                            # fast, prepared before the hook
    assert clean.path == "fast"
    model.add_hook("blocks.0.hook_mlp_out", user_hook)
    try:
        run = A.run_z_edits(model, task, edits, progress=False)
        got = run.effects
        assert run["path"] == "hooks" and seen
        ref = _ref_loop(model, task, edits)                         # reference with the user's hook on
        torch.testing.assert_close(got, ref, rtol=RTOL, atol=ATOL)
        with pytest.warns(UserWarning, match="forward hooks"):
            again = A.measure_z_edits(model, task, edits, progress=False, clean=clean)
        torch.testing.assert_close(again, ref, rtol=RTOL, atol=ATOL)
        assert len(model.hook_dict["blocks.0.hook_mlp_out"].fwd_hooks) == 1
        with pytest.raises(ValueError, match="forward hooks"):
            A.measure_z_edits(model, task, edits, progress=False, path="fast")
        assert len(model.hook_dict["blocks.0.hook_mlp_out"].fwd_hooks) == 1
    finally:
        model.reset_hooks()
    assert _no_hooks_left(model)
    native = make_native_bridge()
    ntask = _task(native, seed=9)
    with pytest.raises(ValueError, match="path='fast'"):
        A.measure_z_edits(native, ntask, _edits(native, ntask, n=2, dtype=torch.float32), progress=False, path="fast")


def test_hooks_removed_after_error(native64):
    task = _task(native64, seed=11)
    bad = dataclasses.replace(task, metric=lambda logits, a, w: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError, match="boom"):
        A.measure_z_edits(native64, bad, _edits(native64, task, n=4), progress=False)
    assert _no_hooks_left(native64)


def test_start_at_layer_hook_variant(native64, monkeypatch):
    """The TL3 variant (hook path resuming at the edited layer) equals the reference loop."""
    real = model_facts(native64)
    fake = dataclasses.replace(real, kind="tl3")
    monkeypatch.setattr(A, "model_facts", lambda model: fake)
    task = _task(native64, seed=12)
    edits = _edits(native64, task, n=12, seed=13)
    clean = A.prepare_clean(native64, task)
    assert clean.path == "hooks" and clean.resid is not None
    got = A.measure_z_edits(native64, task, edits, progress=False, clean=clean)
    torch.testing.assert_close(got, _ref_loop(native64, task, edits), rtol=RTOL, atol=ATOL)


# ----------------------------------------------------------------------------- zeros, replace_z, flops


@pytest.mark.parametrize("name", ["gpt2_bridge64", "native64"])
def test_edits_after_metric_position_are_exactly_zero(name, request):
    model = request.getfixturevalue(name)
    task = _task(model, seed=14)
    n = 6
    P = task.positions
    prompt = torch.tensor([0, 0, 1, 1, 2, 2])
    start = P[prompt] + torch.tensor([1, 2, 1, 3, 1, 1])
    edits = A.ZEdits(prompt, torch.zeros(n, dtype=torch.long), torch.zeros(n, dtype=torch.long), start,
                     torch.ones(n, 2, model.cfg.d_head, dtype=torch.float64))
    run = A.run_z_edits(model, task, edits, progress=False)
    got = run.effects
    assert torch.equal(got, torch.zeros(n, dtype=torch.float64))
    assert run["forwards"] == 0 and run["skipped"] == n
    # at the last layer only the metric position reaches the metric: edits ending before it are 0 too,
    # and the reference agrees (to rounding)
    L = model.cfg.n_layers
    last = A.ZEdits(prompt, torch.full((n,), L - 1), torch.zeros(n, dtype=torch.long), P[prompt] - 3,
                    torch.ones(n, 3, model.cfg.d_head, dtype=torch.float64))
    run = A.run_z_edits(model, task, last, progress=False)
    assert torch.equal(run.effects, torch.zeros(n, dtype=torch.float64))
    assert run["skipped"] == n
    torch.testing.assert_close(_ref_loop(model, task, last[:2]), torch.zeros(2, dtype=torch.float64), rtol=0, atol=1e-12)


def test_replace_z_zero_head(gpt2_bridge64):
    """Zero-ablating a whole head via replace_z equals a full forward with z[..., h, :] = 0."""
    model = gpt2_bridge64
    task = _task(model, seed=15)
    clean = A.prepare_clean(model, task)
    T = task.tokens.shape[1]
    items = [(p, l, h) for p in range(len(task)) for l in range(model.cfg.n_layers) for h in (0, 3)]
    r = torch.tensor(items)
    edits = A.replace_z(clean, r[:, 0], r[:, 1], r[:, 2], torch.zeros(len(items), dtype=torch.long),
                        torch.zeros(len(items), T, model.cfg.d_head, dtype=torch.float64))
    got = A.measure_z_edits(model, task, edits, progress=False, clean=clean)
    ref = []
    with torch.no_grad():
        for p, l, h in items:
            toks, idx = task.tokens[p:p + 1], torch.tensor([p])

            def fn(z, hook, h=h):
                z = z.clone()
                z[:, :, h] = 0
                return z

            m0 = task.metric_from_full_logits(model(toks), idx)
            m1 = task.metric_from_full_logits(model.run_with_hooks(toks, fwd_hooks=[(f"blocks.{l}.attn.hook_z", fn)]), idx)
            ref.append(float(m0 - m1))
    torch.testing.assert_close(got, torch.tensor(ref, dtype=torch.float64), rtol=RTOL, atol=ATOL)
    # setting z to its own clean value changes nothing
    same = A.replace_z(clean, r[:, 0], r[:, 1], r[:, 2], torch.full((len(items),), 2),
                       torch.stack([clean.z[l][p, 2:5, h] for p, l, h in items]))
    assert A.measure_z_edits(model, task, same, progress=False, clean=clean).abs().max() < 1e-9


def test_flops_model():
    model = make_gpt2_bridge(n_layers=2, n_heads=2, d_model=8, vocab=10, n_ctx=16)
    task = Task(torch.zeros(1, 6, dtype=torch.long), [1], [2])    # P = 5
    d, V, L = 8, 10, 2
    dm = 4 * d
    edits = A.ZEdits([0, 0], [1, 0], [0, 1], [3, 7], torch.zeros(2, 1, 4))   # second starts after P
    f = A.flops(model, task, edits)
    per_tok = 2 * d * d * 4 + 2 * d * dm * 2                       # q, k, v, o + MLP (up, down)
    attn = lambda i: 4 * d * (i + 1)                               # scores + mixing over keys 0..i
    base = 2 * (L * sum(per_tok + attn(i) for i in range(6)) + 6 * 2 * d * V)
    minimum = 1 * sum(per_tok + attn(i) for i in (3, 4, 5)) + 2 * d * V
    assert f["baseline"] == pytest.approx(base) and f["minimum"] == pytest.approx(minimum)
    assert f["ideal_speedup"] == pytest.approx(base / minimum)


# ----------------------------------------------------------------------------- bad input


def test_bad_input_errors(gpt2_bridge64):
    model = gpt2_bridge64
    task = _task(model)
    dh, L, H = model.cfg.d_head, model.cfg.n_layers, model.cfg.n_heads
    one = lambda **kw: A.ZEdits(**{**dict(prompt=[0], layer=[0], head=[0], start=[1],
                                          delta=torch.zeros(1, 1, dh, dtype=torch.float64)), **kw})
    cases = [
        (dict(layer=[L]), "layer"), (dict(layer=[-1]), "layer"), (dict(head=[H]), "head"),
        (dict(prompt=[len(task)]), "prompt"), (dict(delta=torch.zeros(1, 1, dh + 1)), "d_head"),
    ]
    for kw, word in cases:
        with pytest.raises(ValueError, match=word):
            A.measure_z_edits(model, task, one(**kw), progress=False)
    with pytest.raises(ValueError, match="delta"):
        one(delta=torch.zeros(dh))
    with pytest.raises(ValueError, match="delta"):
        A.ZEdits([0, 1], [0, 0], [0, 0], [0, 0], torch.zeros(3, 1, dh))
    with pytest.raises(ValueError, match="start"):
        one(start=[-2])
    with pytest.raises(ValueError, match="entries"):
        A.ZEdits([0, 1], [0], [0, 0], [0, 0], torch.zeros(2, 1, dh))
    with pytest.raises(TypeError, match="integers"):
        one(layer=[0.5])
    with pytest.raises(ValueError, match="unknown path"):
        A.measure_z_edits(model, task, one(), progress=False, path="fastest")
    V, n_ctx = model.cfg.d_vocab, model.cfg.n_ctx
    with pytest.raises(ValueError, match=rf"token id {V} at position 1 is outside the model's vocabulary"):
        A.prepare_clean(model, Task(torch.tensor([[3, V, 4]]), [5], [6]))
    with pytest.raises(ValueError, match="answer id"):
        A.prepare_clean(model, Task(torch.tensor([[3, 4, 5]]), [V], [6]))
    with pytest.raises(ValueError, match="context"):
        A.prepare_clean(model, Task(torch.randint(3, 100, (1, n_ctx + 1)), [5], [6]))
    with pytest.raises(TypeError, match="selfrepair Task"):
        A.prepare_clean(model, task.tokens)
    with pytest.raises(ValueError, match="batch_size"):
        A.measure_z_edits(model, task, one(), progress=False, batch_size=0)
    other = _task(model, seed=99)
    with pytest.raises(ValueError, match="different task"):
        A.measure_z_edits(model, other, one(), progress=False, clean=A.prepare_clean(model, task))
    assert len(A.measure_z_edits(model, task, one()[torch.tensor([], dtype=torch.long)], progress=False)) == 0


# ----------------------------------------------------------------------------- real models (skipped when absent)


@pytest.mark.parametrize("name", ["default_model", "stories_model"])
def test_real_models_fast_equals_hooks(name, request):
    model = request.getfixturevalue(name)
    task = _task(model, seed=16, B=2, T=40)
    edits = _edits(model, task, n=10, seed=17, dtype=torch.float32)
    run = A.run_z_edits(model, task, edits, progress=False)
    fast = run.effects
    assert run["path"] == "fast"
    slow = A.measure_z_edits(model, task, edits, progress=False, path="hooks")
    torch.testing.assert_close(fast, slow, rtol=1e-3, atol=1e-4)
