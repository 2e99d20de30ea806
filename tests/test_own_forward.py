"""``streamed_run(forward="own")``: q, k, v and ``dm/dz`` from our own forward with a fused attention kernel
(``FastModel.grad_run``), and the pieces that keep the analysis at the cost of the model's own forward and
backward (``n_clusters`` from joined pairs, the output basis), each against an independent computation:

- q, k, v (at TransformerLens' hook_q / hook_k or hook_rot_q / hook_rot_k, and hook_v), ``dm/dz`` (autograd
  through the bridge with hooks, written out here) and the metric;
  float64 GPT-2: 1e-9 of the largest magnitude (two float64 computations of the same function differ by
  ~1e-15); float32 Llama (2 layers and a backward): 1e-4, ~800 float32 ulps, far above the few ulps two
  summation orders give and far below a wrong weight, scale or rotation (>= 1e-3);
- ``analyze_self_repair(forward="own")`` against ``forward="bridge"``: every column (float64);
- a wrong own forward is caught by the prefix check: ``"own"`` raises, ``"auto"`` warns and uses the bridge;
- ``"auto"`` takes the own forward by the size of the bridge's attention (``OWN_FORWARD_MIN_BYTES``);
- one clear error for an unknown ``forward`` and where the own forward cannot run;
- ``n_clusters_from_pairs`` against scipy's connected components (random subsets, long chains);
- ``output_basis``: ``(v R^T) . (u R^T) = (v W_O) . (u W_O)``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

import selfrepair.engine.cache as cache_mod
from selfrepair import analyze_self_repair
from selfrepair.analysis.decomposition import n_clusters_from_pairs, output_basis, similar_pairs
from selfrepair.engine import streamed_run
from selfrepair.engine.forward import FastModel
from selfrepair.tasks import Task

from conftest import scaled_atol
from test_streaming import _frame, _task


def _bridge_reference(model, task):
    """q, k, v and dm/dz of every layer and the metric through the bridge: hooks and autograd written out."""
    rot = "blocks.0.attn.hook_rot_q" in model.hook_dict
    qn, kn = ("hook_rot_q", "hook_rot_k") if rot else ("hook_q", "hook_k")
    L = model.cfg.n_layers
    got, zs = {}, {}

    def save(name):
        def fn(x, hook):
            got[name] = x.detach().clone()
        return fn

    def leaf(l):
        def fn(x, hook):
            # keep the graph (a detached leaf would cut the paths through later layers' attention)
            y = x.clone() if x.requires_grad else x.detach().clone().requires_grad_(True)
            zs[l] = y
            return y
        return fn

    hooks = []
    for l in range(L):
        for h in (qn, kn, "hook_v"):
            hooks.append((f"blocks.{l}.attn.{h}", save((h, l))))
        hooks.append((f"blocks.{l}.attn.hook_z", leaf(l)))
    n = int(task.lengths.max())
    with torch.enable_grad(), model.hooks(fwd_hooks=hooks):
        logits = model(task.tokens[:, :n])
        m = task.metric_from_full_logits(logits.double() if logits.dtype == torch.float64 else logits.float())
        grads = torch.autograd.grad(m.sum(), [zs[l] for l in range(L)])
    return ({l: got[(qn, l)] for l in range(L)}, {l: got[(kn, l)] for l in range(L)},
            {l: got[("hook_v", l)] for l in range(L)}, dict(enumerate(grads)), m.detach())


def _rel(a, b):
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


@pytest.mark.parametrize("fixture,tol", [("gpt2_bridge64", 1e-9), ("llama_bridge", 1e-4)])
def test_own_forward_equals_the_bridge(fixture, tol, request):
    model = request.getfixturevalue(fixture)
    task = _task(n=16)
    run = streamed_run(model, task, forward="own", dtype=torch.float64)
    assert run.forward == "own"
    q, k, v, g, m = _bridge_reference(model, task)
    rep = model.cfg.n_heads // k[0].shape[2]
    for l in run.layers:
        assert _rel(run.q[l], q[l]) <= tol
        assert _rel(run.k[l], k[l]) <= tol
        assert _rel(run.values[l], v[l].repeat_interleave(rep, dim=2)) <= tol      # expanded to query heads
        assert _rel(run.grad_z[l], g[l]) <= tol
    assert _rel(run.metric, m) <= tol
    assert run.check_error <= tol


def test_analysis_with_own_forward_equals_bridge(gpt2_bridge64):
    task = _task(n=16)
    kw = dict(k=2, min_contribution=0.0, select="abs", dtype=torch.float64, progress=False, n_permutations=20)
    own = analyze_self_repair(gpt2_bridge64, task, forward="own", **kw)
    bridge = analyze_self_repair(gpt2_bridge64, task, forward="bridge", **kw)
    assert own.meta["own_forward_batches"] == own.meta["n_batches"] >= 1
    assert bridge.meta["own_forward_batches"] == 0 and bridge.meta["streamed_batches"] >= 1
    a, b = _frame(own), _frame(bridge)
    assert list(a.columns) == list(b.columns) and len(a) == len(b) > 0
    for c in a.columns:
        x, y = a[c].to_numpy(), b[c].to_numpy()
        if x.dtype == object:
            x, y = np.array([list(t) for t in x], dtype=float), np.array([list(t) for t in y], dtype=float)
        if x.dtype.kind in "fc":
            # the two forwards' inputs differ by ~1e-14 relative; a column computed from them (differences,
            # ratios) carries an absolute error ~1e-14 of its largest magnitude, also where a value sits near 0;
            # columns that are 0 up to rounding (value_interaction) differences of effects ~1e-3: 1e-12
            np.testing.assert_allclose(x, y, rtol=1e-9, atol=max(scaled_atol(y, 1e-9), 1e-12), equal_nan=True, err_msg=c)
        else:
            np.testing.assert_array_equal(x, y, err_msg=c)


def test_wrong_own_forward_is_caught(gpt2_bridge64, monkeypatch):
    task = _task(n=16)
    ref = streamed_run(gpt2_bridge64, task, forward="bridge", dtype=torch.float64)
    orig = FastModel.qkv

    def wrong(self, l, x, pos0, q_rows=None):                  # a 0.1% error in the queries
        q, k_, v = orig(self, l, x, pos0, q_rows)
        return q * 1.001, k_, v
    monkeypatch.setattr(FastModel, "qkv", wrong)
    with pytest.raises(ValueError, match="forward='own': our forward disagrees.*q at layer 0"):
        streamed_run(gpt2_bridge64, task, forward="own", dtype=torch.float64)
    monkeypatch.setattr(cache_mod, "OWN_FORWARD_MIN_BYTES", 0)
    with pytest.warns(RuntimeWarning, match="streaming through the bridge instead"):
        run = streamed_run(gpt2_bridge64, task, forward="auto", dtype=torch.float64)
    assert run.forward == "bridge"
    assert torch.equal(run.grad_z[1], ref.grad_z[1])


def test_auto_takes_the_own_forward_by_the_bridges_attention_size(gpt2_bridge64, monkeypatch):
    task = _task(n=16)
    assert streamed_run(gpt2_bridge64, task, dtype=torch.float64).forward == "bridge"     # a few kB of attention
    L, H, n = gpt2_bridge64.cfg.n_layers, gpt2_bridge64.cfg.n_heads, 16
    held = 2 * L * len(task) * H * n * n * 8
    monkeypatch.setattr(cache_mod, "OWN_FORWARD_MIN_BYTES", held)
    assert streamed_run(gpt2_bridge64, task, dtype=torch.float64).forward == "own"
    monkeypatch.setattr(cache_mod, "OWN_FORWARD_MIN_BYTES", held + 1)
    assert streamed_run(gpt2_bridge64, task, dtype=torch.float64).forward == "bridge"
    # a grad_context (GIM) acts through the bridge's hooks: auto keeps the bridge, own refuses
    monkeypatch.setattr(cache_mod, "OWN_FORWARD_MIN_BYTES", 0)
    from contextlib import nullcontext
    assert streamed_run(gpt2_bridge64, task, grad_context=nullcontext).forward == "bridge"
    with pytest.raises(ValueError, match="grad_context"):
        streamed_run(gpt2_bridge64, task, grad_context=nullcontext, forward="own")


def test_one_clear_error(gpt2_bridge64, llama_bridge64):
    task = _task(n=12)
    for call in (lambda: streamed_run(gpt2_bridge64, task, forward="fast"),
                 lambda: analyze_self_repair(gpt2_bridge64, task, forward="fast", progress=False)):
        with pytest.raises(ValueError, match="unknown forward 'fast'; valid: auto, bridge, own") as e:
            call()
        assert "\n" not in str(e.value)
    # HF Llama in float64 runs its softmax in float32: the fused kernel would not reproduce it
    with pytest.raises(ValueError, match="forward='own' is not available for this model: .*upcast"):
        streamed_run(llama_bridge64, task, forward="own")
    assert streamed_run(llama_bridge64, task, forward="auto").forward == "bridge"


def _scipy_components(members, pairs, n):
    out = []
    for m in members:
        idx = np.nonzero(m)[0]
        keep = [(i, j) for i, j in pairs.T.tolist() if m[i] and m[j]]
        pos = {x: t for t, x in enumerate(idx)}
        if len(idx) == 0:
            out.append(0)
            continue
        rows = [pos[i] for i, _ in keep]
        cols = [pos[j] for _, j in keep]
        g = coo_matrix((np.ones(len(keep)), (rows, cols)), shape=(len(idx), len(idx)))
        out.append(connected_components(g, directed=False)[0])
    return out


@pytest.mark.parametrize("kind", ["random", "chain", "dense", "none"])
def test_n_clusters_from_pairs_against_scipy(kind):
    rng = np.random.default_rng(7)
    n, R = 60, 40
    if kind == "random":
        e = [(i, j) for i in range(n) for j in range(i + 1, n) if rng.random() < 0.04]
    elif kind == "chain":                                    # one path 0-1-...-59 (and a shuffled one)
        perm = rng.permutation(n)
        e = [tuple(sorted((int(perm[t]), int(perm[t + 1])))) for t in range(n - 1)]
    elif kind == "dense":
        e = [(i, j) for i in range(n) for j in range(i + 1, n) if rng.random() < 0.5]
    else:
        e = []
    pairs = torch.tensor(e, dtype=torch.long).reshape(-1, 2).T
    members = rng.random((R, n)) < rng.uniform(0.2, 1.0, size=(R, 1))
    members[0] = True                                        # all keys: the whole graph
    members[1] = False                                       # no member
    got = n_clusters_from_pairs(torch.from_numpy(members), pairs).tolist()
    assert got == _scipy_components(members, pairs.numpy(), n)


def test_output_basis_and_similar_pairs():
    g = torch.Generator().manual_seed(3)
    W_O = torch.randn(8, 32, generator=g, dtype=torch.float64)
    v = torch.randn(20, 8, generator=g, dtype=torch.float64)
    v[5] = 0.0                                               # a zero output joins nothing
    v[7] = 2.5 * v[3]                                        # cosine 1 with key 3
    o = v @ W_O
    u = v @ output_basis(W_O)
    torch.testing.assert_close(u @ u.T, o @ o.T, rtol=1e-12, atol=1e-12 * float((o @ o.T).abs().max()))
    pairs = similar_pairs(u, cluster_similarity=0.3)
    on = o / o.norm(dim=1, keepdim=True)
    cos = (on @ on.T).nan_to_num(-2.0)
    want = {(i, j) for i in range(20) for j in range(i + 1, 20) if cos[i, j] >= 0.3}
    assert set(map(tuple, pairs.T.tolist())) == want and (3, 7) in want


def test_similar_pairs_decides_near_threshold_cosines_in_float64():
    """Cosines within 1e-7 of the threshold (float32 cannot tell them apart) are joined exactly as the
    float64 cosines say, against numpy's float64 cosines."""
    rng = np.random.default_rng(11)
    thr = 0.8
    base = rng.normal(size=(1, 64))
    base /= np.linalg.norm(base)
    ortho = rng.normal(size=(40, 64))
    ortho -= (ortho @ base.T) * base
    ortho /= np.linalg.norm(ortho, axis=1, keepdims=True)
    cos = thr + rng.choice([-1, 1], size=40) * rng.uniform(1e-9, 1e-7, size=40)        # cosine with key 0
    vec = np.concatenate([base, cos[:, None] * base + np.sqrt(1 - cos[:, None] ** 2) * ortho]) * 3.0
    vn = vec / np.linalg.norm(vec, axis=1, keepdims=True)
    ref = vn @ vn.T
    want = {(i, j) for i in range(41) for j in range(i + 1, 41) if ref[i, j] >= thr}
    got = set(map(tuple, similar_pairs(torch.from_numpy(vec), cluster_similarity=thr).T.tolist()))
    assert got == want
    assert 5 < sum(1 for (i, j) in want if i == 0) < 35                # both sides of the threshold occur


@pytest.mark.parametrize("ablation", ["mean", "knockout"])
def test_pattern_changes_against_numpy_softmaxes(ablation):
    """``p - p'`` of each individual ablation and the joint one against test_decomposition's numpy softmax."""
    from test_decomposition import ablated, random_rows, softmax
    from selfrepair.analysis.decomposition import pattern_changes

    a, mask, _, keys, mm = random_rows(30, 14, 3, seed=5, exclude_bos=True)   # key 0 out of the mean
    dP, pK = pattern_changes(*(torch.from_numpy(x) for x in (a, mask, keys, mm)), score_ablation=ablation)
    for r in range(30):
        p = softmax(a[r], mask[r])
        sets = [[j] for j in keys[r]] + [list(keys[r])]
        for t, S in enumerate(sets):
            ref = p - ablated(a[r], mask[r], S, mm[r], ablation)
            np.testing.assert_allclose(dP[r, t].numpy(), ref, rtol=0, atol=1e-13)   # weights <= 1: float64 rounding
        np.testing.assert_allclose(pK[r].numpy(), p[keys[r]], rtol=0, atol=1e-15)


def test_full_check_once_then_spot_checks_that_still_catch(monkeypatch):
    """The first own-forward call per model and settings checks q, k, v and dm/dz on a 64-token prefix; later
    calls a 16-token forward-only prefix, which still catches a wrong forward; changed weights check fully."""
    from conftest import make_gpt2_bridge

    model = make_gpt2_bridge(dtype=torch.float64)                 # a fresh model: nothing verified yet
    task = _task(n=16)
    first = streamed_run(model, task, forward="own", dtype=torch.float64)
    again = streamed_run(model, task, forward="own", dtype=torch.float64)
    assert (first.check_mode, again.check_mode) == ("full", "spot")
    torch.testing.assert_close(again.grad_z[1], first.grad_z[1], rtol=0, atol=0)
    orig = FastModel.qkv

    def wrong(self, l, x, pos0, q_rows=None):                  # a 0.1% error in the values
        q, k_, v = orig(self, l, x, pos0, q_rows)
        return q, k_, v * 1.001
    monkeypatch.setattr(FastModel, "qkv", wrong)
    with pytest.raises(ValueError, match=r"at layer 1 differs from the bridge.s .* on a 1[0-6]-token prefix"):
        streamed_run(model, task, forward="own", dtype=torch.float64)
    monkeypatch.setattr(FastModel, "qkv", orig)
    assert streamed_run(model, task, forward="own", dtype=torch.float64).check_mode == "full"   # verification reset
    with torch.no_grad():
        model.blocks[0].attn.o.original_component.weight.mul_(1.0)      # an in-place write: a new version
    assert streamed_run(model, task, forward="own", dtype=torch.float64).check_mode == "full"
