"""One call shape: every analysis returns a result with ``to_frame()``, ``save`` / ``load`` (exact round trip)
and ``settings``; renamed keywords keep working one release with a DeprecationWarning."""

import warnings

import numpy as np
import pandas as pd
import pytest
import torch

import selfrepair
from selfrepair import tasks
from selfrepair.analysis import (EstimateComparison, Faithfulness, HeadAttributions, SelfRepairResult,
                                 TokenAttributions, analyze_self_repair, compare_estimates, explain, faithfulness,
                                 head_attributions)
from selfrepair.engine import ZEdits, measure_z_edits, run_z_edits


@pytest.fixture(scope="module")
def small(gpt2_bridge64):
    model = gpt2_bridge64
    task = tasks.load("induction", model, n=3, seq_len=13, seed=4)
    return model, task


def _same_frame(a: pd.DataFrame, b: pd.DataFrame):
    """Equal columns, dtypes and values (NaN where NaN; tuples compared element by element)."""
    assert list(a.columns) == list(b.columns)
    assert list(a.dtypes) == list(b.dtypes)
    assert len(a) == len(b)
    for c in a.columns:
        x, y = a[c].tolist(), b[c].tolist()
        for u, v in zip(x, y):
            if isinstance(u, float) and np.isnan(u):
                assert isinstance(v, float) and np.isnan(v), c
            elif isinstance(u, tuple):                 # tuple cells may hold NaN (e.g. concealment without c_rest)
                assert type(v) is tuple and [type(e) for e in u] == [type(e) for e in v], (c, u, v)
                assert np.array_equal(np.array(u, dtype=float), np.array(v, dtype=float), equal_nan=True), (c, u, v)
            else:
                assert u == v and type(u) is type(v), (c, u, v)


def test_explain_round_trip(small, tmp_path):
    model, task = small
    a = explain(model, task, method="grad", baseline_id=3)
    assert isinstance(a, TokenAttributions) and isinstance(a, torch.Tensor)
    assert a.shape == task.tokens.shape and type(a.tensor) is torch.Tensor and type(a + 1) is torch.Tensor
    assert a.settings["method"] == "grad" and a.settings["baseline_id"] == 3
    f = a.to_frame()
    assert len(f) == a.numel() and float(f["attribution"].sum()) == pytest.approx(float(a.sum()), rel=1e-6)
    a.save(tmp_path / "a.parquet")
    b = TokenAttributions.load(tmp_path / "a.parquet")
    assert b.dtype == a.dtype and torch.equal(b.tensor, a.tensor) and b.settings == a.settings


def test_head_attributions_and_faithfulness_round_trip(small, tmp_path):
    model, task = small
    h = head_attributions(model, task, head_ablation="zero")
    assert isinstance(h, HeadAttributions) and isinstance(h, pd.DataFrame)
    assert h.settings["head_ablation"] == "zero"
    h.save(tmp_path / "h.parquet")
    h2 = HeadAttributions.load(tmp_path / "h.parquet")
    _same_frame(h2.to_frame(), h.to_frame())
    assert h2.settings == h.settings
    fa = faithfulness(model, task, {"grad": explain(model, task)}, seeds=(0,))
    assert isinstance(fa, Faithfulness) and fa.settings["seeds"] == [0]
    fa.save(tmp_path / "f.parquet")
    fa2 = Faithfulness.load(tmp_path / "f.parquet")
    _same_frame(fa2.to_frame(), fa.to_frame())
    assert fa2.settings == fa.settings
    with pytest.raises(ValueError, match="holds no head_attributions"):
        HeadAttributions.load(tmp_path / "f.parquet")


def test_self_repair_and_estimates_round_trip(small, tmp_path):
    model, task = small
    res = analyze_self_repair(model, task, layers=[1, 2], progress=False, min_contribution=0.0)
    assert isinstance(res, SelfRepairResult) and res.settings["k"] == 2
    res.save(tmp_path / "r.parquet")
    res2 = SelfRepairResult.load(tmp_path / "r.parquet")
    _same_frame(res2.to_frame(), res.to_frame())
    comp = compare_estimates(model, task, res)
    assert isinstance(comp, EstimateComparison) and comp.settings["top_frac"] == 0.1
    comp.save(tmp_path / "c.parquet")
    comp2 = EstimateComparison.load(tmp_path / "c.parquet")
    _same_frame(comp2.groups, comp.groups)
    _same_frame(comp2.to_frame(), comp.to_frame())
    assert comp2.notes == comp.notes and comp2.settings == json_like(comp.settings)


def json_like(d):
    import json
    return json.loads(json.dumps(d, default=str))


def test_old_keywords_warn_and_still_work(small):
    model, task = small
    e = ZEdits([0, 1], [0, 1], [0, 2], [2, 3], torch.ones(2, 1, model.cfg.d_head, dtype=torch.float64))
    new = measure_z_edits(model, task, e, edits_per_forward=1, progress=False)
    with pytest.warns(DeprecationWarning, match="batch_size= is deprecated"):
        old = measure_z_edits(model, task, e, batch_size=1, progress=False)
    assert torch.equal(new, old)
    with pytest.raises(TypeError, match="give edits_per_forward= only"):
        measure_z_edits(model, task, e, batch_size=1, edits_per_forward=2, progress=False)
    h_new = head_attributions(model, task, head_ablation="zero", frozen_qk=False)
    with pytest.warns(DeprecationWarning, match="ablation= is deprecated"):
        h_old = head_attributions(model, task, ablation="zero", frozen_qk=False)
    _same_frame(h_new.to_frame(), h_old.to_frame())
    with warnings.catch_warnings():
        warnings.simplefilter("error")       # the new names warn about nothing
        run = run_z_edits(model, task, e, edits_per_forward=1, progress=False)
    assert torch.equal(run.effects, new) and run["edits"] == 2


def test_public_names_of_0_1_still_work():
    for name in ("load_model", "probe", "Task", "tasks", "cached_run", "analyze_self_repair", "measure_z_edits",
                 "prepare_clean", "gim", "explain", "head_attributions", "compare_estimates", "faithfulness",
                 "plots", "SelfRepairResult", "ZEdits", "CachedRun", "Backend"):
        assert hasattr(selfrepair, name), name
    from selfrepair import plots, tasks as t  # noqa: F401
    assert callable(plots.plot_joint_vs_sum) and callable(t.load)
