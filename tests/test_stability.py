"""stability(): its Spearmans recomputed from its own per-head / per-variant tables with numpy ranks, its
per-head shares re-derived from fresh runs of analyze_self_repair / head_attributions / explain on the original
task and on the same (seeded) variants, and an exact save/load round trip.

Tolerances: the recomputations use the same float64 inputs, so they agree to rounding (1e-12); the re-runs
repeat the same float32 forwards on the same CPU, so they agree to float32 rounding of the summed estimates
(rtol 1e-5 of the largest magnitude)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy.stats import rankdata

from selfrepair.analysis.stability import MEASURES, StabilityResult, stability
from selfrepair.report.figures import plot_stability
from selfrepair.tasks.edits import EDITS, EditError, edit_task

N_VARIANTS = 2


@pytest.fixture(scope="module")
def code_task(default_model):
    import selfrepair

    return selfrepair.tasks.load("code-copy", default_model, n=8, seed=0)


@pytest.fixture(scope="module")
def result(default_model, code_task):
    return stability(default_model, code_task, n_variants=N_VARIANTS, n_boot=200, seed=0)


def _rank_corr(x, y):
    x, y = np.asarray(x, float), np.asarray(y, float)
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    if len(x) < 3 or x.std() == 0 or y.std() == 0:
        return np.nan
    return float(np.corrcoef(rankdata(x), rankdata(y))[0, 1])


def test_table_shape_and_intervals(result):
    t = result.table
    assert list(t.columns) == ["edit", "measure", "value", "lo", "hi", "n"]
    assert len(t) == len(EDITS) * len(MEASURES)
    assert set(zip(t["edit"], t["measure"])) == {(e, m) for e in EDITS for m in MEASURES}
    ok = t["lo"].notna()
    assert (t.loc[ok, "lo"] <= t.loc[ok, "hi"]).all()
    sp = t[t["measure"] != "sr_kept"]
    assert ((sp["value"].dropna() >= -1) & (sp["value"].dropna() <= 1)).all()
    assert result.n_impossible == {e: int(result.impossible.query("edit == @e").eval("requested - made").sum())
                                   for e in EDITS}
    assert t.to_dict() == result.to_frame().to_dict()


def test_spearmans_recomputed_from_own_tables(result):
    t = result.table.set_index(["edit", "measure"])
    checked = 0
    for e, h in result.heads.groupby("edit"):
        for measure, a, b in (("self_repair_share", "share_orig", "share_var"),
                              ("head_attr_grad", "grad_orig", "grad_var"), ("head_attr_gim", "gim_orig", "gim_var")):
            want = _rank_corr(h[a], h[b])
            got = t.loc[(e, measure), "value"]
            assert (np.isnan(want) and np.isnan(got)) or abs(want - got) < 1e-12, (e, measure)
            checked += np.isfinite(want)
        # the shares are the summed counts' ratio
        with np.errstate(invalid="ignore"):
            want = np.where(h["def_orig"] > 0, h["sr_orig"] / h["def_orig"], np.nan)
            np.testing.assert_allclose(h["share_orig"], want)
    assert checked > 0
    for e, tk in result.tokens.groupby("edit"):
        for m in ("grad", "gim"):
            want = float(np.median(tk.groupby("origin")[f"spearman_{m}"].mean().dropna()))
            assert abs(want - t.loc[(e, f"token_attr_{m}"), "value"]) < 1e-12
    for e, kp in result.kept.groupby("edit"):
        el = kp["eligible"].sum()
        want = kp["kept"].sum() / el if el > 0 else np.nan
        got = t.loc[(e, "sr_kept"), "value"]
        assert (np.isnan(want) and np.isnan(got)) or abs(want - got) < 1e-12


def test_per_head_tables_match_fresh_runs(result, default_model, code_task):
    import selfrepair

    kind = "blank_lines"
    et = edit_task(code_task, default_model, kind, n_variants=N_VARIANTS, seed=0)
    used = sorted(set(et.variants["origin"]))
    s = result.settings
    g0 = selfrepair.analyze_self_repair(default_model, code_task.subset(used), k=s["k"],
                                        min_contribution=s["min_contribution"], progress=False).groups
    gv = selfrepair.analyze_self_repair(default_model, et.task, k=s["k"], min_contribution=s["min_contribution"],
                                        progress=False).groups
    h = result.heads[result.heads["edit"] == kind].set_index(["layer", "head"])
    for (l, hh), row in h.iterrows():
        for g, col in ((g0, "orig"), (gv, "var")):
            sel = g[(g["layer"] == l) & (g["head"] == hh)]
            assert row[f"sr_{col}"] == sel["self_repair"].sum()
            assert row[f"def_{col}"] == sel["interaction"].notna().sum()
    ha = selfrepair.head_attributions(default_model, et.task, head_ablation="zero", per_prompt=True, frozen_qk=False)
    ha["origin"] = et.variants["origin"].to_numpy()[ha["prompt"].to_numpy()]
    want = ha.groupby(["origin", "layer", "head"])["grad_estimate"].mean().groupby(["layer", "head"]).mean()
    got = h["grad_var"]
    np.testing.assert_allclose(got.to_numpy(), want.reindex(got.index).to_numpy(), rtol=0,
                               atol=1e-5 * float(np.abs(want).max()))
    # one variant's token-attribution Spearman, from explain directly
    e0 = selfrepair.explain(default_model, code_task, method="grad").numpy()
    ev = selfrepair.explain(default_model, et.task, method="grad").numpy()
    tk = result.tokens[result.tokens["edit"] == kind].reset_index(drop=True)
    for v in range(len(et.task)):
        al = et.alignment[v]
        j = np.nonzero(al >= 0)[0]
        want = _rank_corr(e0[int(et.variants["origin"][v]), j], ev[v, al[j]])
        assert abs(want - tk.loc[v, "spearman_grad"]) < 1e-4  # float32 attributions: ties may reorder at 1e-7


def test_save_load_round_trip(result, tmp_path):
    result.save(tmp_path / "stab")
    back = StabilityResult.load(tmp_path / "stab")
    for name in ("table", "heads", "tokens", "kept", "impossible", "variants"):
        pd.testing.assert_frame_equal(getattr(back, name), getattr(result, name), check_exact=True)
    assert back.settings == result.settings
    assert back.n_impossible == result.n_impossible
    with pytest.raises(FileNotFoundError, match="meta.json"):
        StabilityResult.load(tmp_path / "nothing")


def test_plot(result):
    fig = plot_stability(result)
    assert len(fig.data) == len(EDITS)
    assert list(fig.data[0].x) == list(MEASURES)


def test_bad_input(default_model, code_task, stories_model):
    import selfrepair

    with pytest.raises(ValueError, match="valid: rename, comments, blank_lines, spacing"):
        stability(default_model, code_task, edits=("paraphrase",))
    with pytest.raises(ValueError, match="head_ablation"):
        stability(default_model, code_task, head_ablation="resample")
    task = selfrepair.tasks.load("induction", stories_model, n=2)
    with pytest.raises(EditError, match="no tokenizer|has none"):
        stability(stories_model, task, edits=("rename",))
