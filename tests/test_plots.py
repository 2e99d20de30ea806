"""selfrepair.plots (report/figures.py) on a real result of the shipped model: traces, axes, the y = x line, the threshold.

Every number a figure shows is checked against an independent computation
from the result's own columns (or the model's attention pattern), never
against the plotting code's helpers. PNG export is checked by decoding the PNG
header (width and height as stated in the figure's layout).
"""

from __future__ import annotations

import struct

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import pytest
import torch

from selfrepair import analysis, plots

N_PROMPTS = 6
MIN_CONTRIBUTION = 0.5


@pytest.fixture(scope="module")
def study(default_model):
    """One small real study on the shipped model: result (local + global), estimates, heads, attributions."""
    from selfrepair import analysis as attribution, tasks
    from selfrepair.analysis import analyze_self_repair

    torch.manual_seed(0)
    model = default_model
    task = tasks.load("induction", model, n=N_PROMPTS, seed=0)
    result = analyze_self_repair(model, task, min_contribution=MIN_CONTRIBUTION, global_effects=True, progress=False)
    assert len(result.groups) >= 10, "the small study found too few groups to test the figures on"
    comp = attribution.compare_estimates(model, task, result)
    heads = attribution.head_attributions(model, task)
    attrs = {m: attribution.explain(model, task, method=m) for m in ("grad", "gim")}
    return dict(model=model, task=task, result=result, groups=comp.groups, heads=heads, attrs=attrs)


def _trace(fig: go.Figure, startswith: str):
    found = [t for t in fig.data if (t.name or "").startswith(startswith)]
    assert found, f"no trace named {startswith!r}; traces: {[t.name for t in fig.data]}"
    return found[0]


def _assert_identity_line(trace):
    x, y = np.asarray(trace.x, float), np.asarray(trace.y, float)
    assert len(x) >= 2 and np.allclose(x, y) and x.max() > x.min()


def _ranks(a):
    a = np.asarray(a, float)
    r = np.empty(len(a))
    r[np.argsort(a, kind="stable")] = np.arange(len(a))
    return r


def _spearman_no_ties(x, y):
    x, y = np.asarray(x, float), np.asarray(y, float)
    ok = np.isfinite(x) & np.isfinite(y)
    return float(np.corrcoef(_ranks(x[ok]), _ranks(y[ok]))[0, 1])


# ----------------------------------------------------------------------------- 1


def test_joint_vs_sum(study):
    res = study["result"]
    g = res.groups
    fig = plots.plot_joint_vs_sum(res)
    assert "logit difference" in fig.layout.xaxis.title.text and "logit difference" in fig.layout.yaxis.title.text
    assert "joint" in fig.layout.title.text.lower()
    _assert_identity_line(_trace(fig, "y = x"))
    # threshold line y = x / (1 - 0.1), and the band between it and y = x
    th = _trace(fig, "threshold r = 0.1")
    assert np.allclose(np.asarray(th.y, float), np.asarray(th.x, float) / 0.9)
    assert _trace(fig, "0 < r <= 0.1").fill == "toself"
    # independent r from the effects
    e_sum = np.array([sum(e) for e in g["effects"]])
    r = (g["effect_joint"].to_numpy() - e_sum) / g["effect_joint"].to_numpy()
    defined = g["interaction"].notna().to_numpy()
    np.testing.assert_allclose(r[defined], g["interaction"].to_numpy()[defined], rtol=1e-9, atol=1e-12)
    n_sr = int((r[defined] > 0.1).sum())
    if n_sr:
        sr = _trace(fig, "self-repairing (r > 0.1)")
        assert len(sr.x) == n_sr
        assert set(np.round(sr.y, 9)) == set(np.round(g["effect_joint"].to_numpy()[defined][r[defined] > 0.1], 9))
    # the 95th-percentile highlight holds exactly the groups with r >= P95
    p95 = np.percentile(r[defined], 95)
    top = _trace(fig, "top 5% of r")
    assert len(top.x) == int((r[defined] >= p95).sum())
    assert "prompt" in top.text[0] and "keys" in top.text[0] and "query" in top.text[0]
    # global variant uses the global columns
    figg = plots.plot_joint_vs_sum(res, effects="global")
    pts = [t for t in figg.data if t.mode == "markers" and not (t.name or "").startswith("top")]
    ys = np.sort(np.concatenate([np.asarray(t.y, float) for t in pts]))
    np.testing.assert_allclose(ys, np.sort(g["global_effect_joint"].to_numpy()))
    with pytest.raises(ValueError, match="effects must be"):
        plots.plot_joint_vs_sum(res, effects="both")


def test_joint_vs_sum_custom_threshold(study):
    fig = plots.plot_joint_vs_sum(study["result"], threshold=0.3)
    th = _trace(fig, "threshold r = 0.3")
    assert np.allclose(np.asarray(th.y, float), np.asarray(th.x, float) / 0.7)


def test_every_figure_colours_by_the_threshold_it_labels(study):
    """With a threshold other than the analysis one (0.1), the points each figure calls self-repairing
    are exactly the groups with r > that threshold (not the stored ``self_repair`` flag at 0.1), and the
    heatmap fractions use it too."""
    res, t = study["result"], 0.3
    g = res.groups
    r = g["interaction"].to_numpy(float)
    want = int((np.isfinite(r) & (r > t)).sum())
    assert want != int(g["self_repair"].sum())          # the two thresholds disagree on this result

    def n_marked(fig, prefix):
        return sum(len(tr.x) for tr in fig.data if tr.type == "scatter" and (tr.name or "").startswith(prefix))

    assert n_marked(plots.plot_joint_vs_sum(res, threshold=t), f"self-repairing (r > {t:g})") == want
    panels = sum(c in g.columns for c in ("grad_estimate", "tsg_estimate", "gim_estimate"))
    assert n_marked(plots.plot_estimates(res, threshold=t), f"self-repairing (r > {t:g})") == panels * want
    assert n_marked(plots.plot_local_vs_global(res, threshold=t), f"self-repairing locally (r > {t:g})") == want
    frac = plots.plot_head_heatmaps(res, threshold=t).data[0]
    d = g[g["interaction"].notna()]
    for (l, h), s in d.groupby(["layer", "head"]):
        assert frac.z[l][h] == pytest.approx((s["interaction"] > t).mean())


# ----------------------------------------------------------------------------- 2


def test_estimates(study):
    g = study["groups"]
    assert "gim_estimate" in g.columns
    for truth, col in (("local", "effect_joint"), ("global", "global_effect_joint")):
        fig = plots.plot_estimates(g, truth=truth)
        titles = [a.text for a in fig.layout.annotations]
        assert len(titles) == 3 and titles[0].startswith("plain gradient") and titles[2].startswith("GIM")
        for est, title in zip(("grad_estimate", "tsg_estimate", "gim_estimate"), titles):
            rho = _spearman_no_ties(g[col], g[est])
            assert f"Spearman {rho:.2f}" in title
            sign = np.mean(np.sign(g[col]) == np.sign(g[est]))
            assert f"sign agreement {sign:.0%}" in title
        diags = [t for t in fig.data if (t.name or "").startswith("y = x")]
        assert len(diags) == 3
        for d in diags:
            _assert_identity_line(d)
        assert all("logit difference" in fig.layout[f"xaxis{'' if i == 1 else i}"].title.text for i in (1, 2, 3))
        assert "estimated" in fig.layout.yaxis.title.text
        # every group appears once per panel, coloured by self-repair
        pts = [t for t in fig.data if t.mode == "markers"]
        assert sum(len(t.x) for t in pts) == 3 * len(g)


# ----------------------------------------------------------------------------- 3


def test_head_heatmaps(study):
    res = study["result"]
    g = res.groups
    fig = plots.plot_head_heatmaps(res)
    frac, med = fig.data[0], fig.data[1]
    L, H = res.meta["n_layers"], res.meta["n_heads"]
    assert np.asarray(frac.z).shape == (L, H)
    d = g[g["interaction"].notna()]
    for (l, h), s in d.groupby(["layer", "head"]):
        assert frac.z[l][h] == pytest.approx((s["interaction"] > 0.1).mean())
        assert med.z[l][h] == pytest.approx(float(np.median(s["interaction"])))
    # diverging, centred at 0 for the signed panel
    assert med.zmid == 0 and med.zmin == -med.zmax and 0 < med.zmax <= 1
    assert frac.zmin == 0 and frac.zmax == 1
    assert fig.layout.xaxis.title.text == "head" and fig.layout.yaxis.title.text == "layer"


# ----------------------------------------------------------------------------- 4


def test_threshold_sweep(study):
    res = study["result"]
    fig = plots.plot_threshold_sweep(res)
    line = _trace(fig, "fraction self-repairing")
    r = res.groups["interaction"].dropna().to_numpy()
    for t, f in zip(line.x, line.y):
        assert f == pytest.approx(float((r > t).mean()))
    assert 0.1 in list(line.x)
    band = _trace(fig, "95% interval (Wilson, design effect)")
    assert band.fill == "toself"
    sw = res.sweep(sorted(set(line.x)))                        # the band is the sweep's interval (Wilson + deff)
    n = len(line.x)
    assert np.allclose(np.asarray(band.y[:n], float), sw["ci_high"]) and np.allclose(np.asarray(band.y[n:], float)[::-1], sw["ci_low"])
    vlines = [s for s in fig.layout.shapes if s.x0 == s.x1]
    assert any(s.x0 == pytest.approx(0.1) for s in vlines), "the threshold 0.1 is not marked"
    assert "threshold" in fig.layout.xaxis.title.text and "fraction" in fig.layout.yaxis.title.text
    # a sweep table works too
    fig2 = plots.plot_threshold_sweep(res.sweep([0.0, 0.1, 0.5]))
    assert list(_trace(fig2, "fraction self-repairing").x) == [0.0, 0.1, 0.5]


# ----------------------------------------------------------------------------- 5


def test_local_vs_global(study):
    g = study["result"].groups
    fig = plots.plot_local_vs_global(study["result"])
    _assert_identity_line(_trace(fig, "y = x"))
    pts = [t for t in fig.data if t.type == "scatter" and t.mode == "markers"]
    xs = np.concatenate([np.asarray(t.x, float) for t in pts])
    ys = np.concatenate([np.asarray(t.y, float) for t in pts])
    local = g["effect_joint"].to_numpy() - np.array([sum(e) for e in g["effects"]])
    glob = g["global_effect_joint"].to_numpy() - np.array([sum(e) for e in g["global_effects"]])
    np.testing.assert_allclose(np.sort(xs), np.sort(local), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(np.sort(ys), np.sort(glob), rtol=1e-9, atol=1e-12)
    box = [t for t in fig.data if t.type == "box"][0]
    np.testing.assert_allclose(np.sort(np.asarray(box.y, float)), np.sort(glob - local), rtol=1e-6, atol=1e-9)
    assert "local interaction" in fig.layout.xaxis.title.text and "global interaction" in fig.layout.yaxis.title.text
    with pytest.raises(ValueError, match="global_effects=True"):
        plots.plot_local_vs_global(g.drop(columns=["global_effects", "global_effect_joint", "downstream_gap"]))


# ----------------------------------------------------------------------------- 6


def test_head_ranking(study):
    h = study["heads"]
    fig = plots.plot_head_ranking(h)
    bars = [t for t in fig.data if t.type == "bar"]
    assert [b.name for b in bars] == ["measured ablation effect", "grad (attribution patching)", "GIM"]
    # heads ordered by |measured|, largest at the top (plotly draws the first category at the bottom)
    order = h.reindex(h["measured"].abs().sort_values(ascending=False).index)
    expect = [f"L{l}H{hh}" for l, hh in zip(order["layer"], order["head"])][::-1]
    assert list(bars[0].y) == expect
    np.testing.assert_allclose(bars[0].x, order["measured"].to_numpy()[::-1])
    np.testing.assert_allclose(bars[2].x, order["gim_estimate"].to_numpy()[::-1])
    assert "logit difference" in fig.layout.xaxis.title.text
    rho = _spearman_no_ties(h["measured"], h["grad_estimate"])
    assert f"Spearman {rho:.2f}" in fig.layout.title.text


# ----------------------------------------------------------------------------- 7


def test_attention_row(study):
    model, task, res = study["model"], study["task"], study["result"]
    data = analysis.attention_row_data(model, task, res)
    row = analysis.pick_row(res)
    p, l, h, q = int(row["prompt"]), int(row["layer"]), int(row["head"]), int(row["query"])
    keys = list(row["keys"])
    # the clean weights are the model's own attention pattern at that row (independent forward)
    n = int(task.lengths[p])
    _, cache = model.run_with_cache(task.tokens[p:p + 1, :n], names_filter=lambda nm: nm == f"blocks.{l}.attn.hook_pattern")
    pat = cache[f"blocks.{l}.attn.hook_pattern"][0, h, q].double()
    clean = data[(data["order"] == 0) & (data["position"] >= 0)]
    np.testing.assert_allclose(clean["weight"].to_numpy(), pat[torch.tensor(clean["position"].to_list())].numpy(), rtol=1e-4, atol=1e-6)
    conds = sorted(data["order"].unique())
    assert len(conds) == len(keys) + 2
    for c in conds:  # every panel is a full distribution over the row's keys
        assert data.loc[data["order"] == c, "weight"].sum() == pytest.approx(1.0, abs=1e-6)
    joint = data[data["order"] == conds[-1]].set_index("position")
    # mean ablation: the ablated keys share one score, so their weights are equal ...
    assert joint.loc[keys, "weight"].nunique() == 1 or np.ptp(joint.loc[keys, "weight"]) < 1e-9
    # ... and softmax redistribution keeps the ratios among the other keys
    others = [j for j in clean["position"] if j not in keys][:3]
    if len(others) >= 2:
        cl = clean.set_index("position")["weight"]
        assert joint.loc[others[0], "weight"] / joint.loc[others[1], "weight"] == pytest.approx(
            cl[others[0]] / cl[others[1]], rel=1e-6)
    fig = plots.plot_attention_row(data)
    panels = [t for t in fig.data if t.type == "bar" and not t.name.startswith("clean weight of an ablated key")]
    assert len(panels) == len(conds)
    ghosts = [t for t in fig.data if t.name == "clean weight of an ablated key"]
    assert len(ghosts) == len(conds) - 1  # every ablation panel shows where the ablated keys' weight was
    titles = [a.text for a in fig.layout.annotations]
    assert titles[0] == "clean run"
    for i, e in enumerate(row["effects"]):
        assert f"{e:.3g}" in titles[1 + i]
    assert f"{row['effect_joint']:.3g}" in titles[-1] and "jointly" in titles[-1]
    assert any(":" in str(x) for x in fig.data[0].x)  # token text on the axis
    # the same figure straight from the result with model and task
    fig2 = plots.plot_attention_row(res, model, task)
    assert len(fig2.data) == len(fig.data)
    assert "attention weight" in fig.layout.yaxis.title.text


# ----------------------------------------------------------------------------- 8


def test_token_attributions(study):
    model, task, attrs = study["model"], study["task"], study["attrs"]
    table = analysis.token_attribution_table(model, task, attrs)
    assert len(table) == int(task.lengths.sum())
    fig = plots.plot_token_attributions(table, prompt=1, window=30)
    assert [t.name for t in fig.data] == ["grad", "gim"]
    mpos = int(task.positions[1])
    lo = max(0, mpos - 29)
    np.testing.assert_allclose(fig.data[0].y, attrs["grad"][1, lo:mpos + 1].numpy(), rtol=1e-6)
    np.testing.assert_allclose(fig.data[1].y, attrs["gim"][1, lo:mpos + 1].numpy(), rtol=1e-6)
    assert str(fig.data[0].x[-1]).startswith(f"{mpos}:")
    assert "logit difference" in fig.layout.yaxis.title.text


# ----------------------------------------------------------------------------- saving


def _png_size(path):
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    return struct.unpack(">II", head[16:24])


def test_save_figure_html_and_png(study, tmp_path):
    fig = plots.plot_threshold_sweep(study["result"])
    paths = plots.save_figure(fig, tmp_path / "sweep")
    assert {p.name for p in paths} == {"sweep.html", "sweep.png"}
    assert _png_size(tmp_path / "sweep.png") == (fig.layout.width, fig.layout.height)
    html = (tmp_path / "sweep.html").read_text()
    assert "plotly.min.js" in html and "fraction of groups" in html
    assert (tmp_path / "plotly.min.js").stat().st_size > 1_000_000  # offline viewing
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary files left behind"
    # scale multiplies the pixel size
    plots.save_figure(fig, tmp_path / "big", html=False, scale=2)
    assert _png_size(tmp_path / "big.png") == (2 * fig.layout.width, 2 * fig.layout.height)


def test_missing_columns_are_named():
    df = pd.DataFrame({"prompt": [0], "layer": [0], "head": [0]})
    with pytest.raises(ValueError, match="effect_sum"):
        plots.plot_joint_vs_sum(df)
    with pytest.raises(ValueError, match="gim_estimate"):
        plots.plot_estimates(pd.DataFrame({"effect_joint": [1.0], "self_repair": [True], "grad_estimate": [1.0]}),
                             estimates=["grad_estimate", "gim_estimate"])


def test_token_text_with_control_characters_exports_to_png(tmp_path):
    """Byte-level BPE tokens can decode to control characters, which break kaleido: they are escaped."""
    from selfrepair.tasks import Task

    class Tok:
        def decode(self, ids):
            return ["def", "\x00", "\x1b[", " x\n", "\t"][ids[0]]

    class Model:
        tokenizer = Tok()

    task = Task(torch.tensor([[0, 1, 2, 3, 4]]), torch.tensor([0]), torch.tensor([1]))
    table = analysis.token_attribution_table(Model(), task, {"grad": torch.arange(5.0)[None], "gim": torch.ones(1, 5)})
    assert list(table["token"]) == ["def", "\\x00", "\\x1b[", "\u00b7x\u23ce", "\u21e5"]
    fig = plots.plot_token_attributions(table)
    plots.save_figure(fig, tmp_path / "tokens", html=False)
    assert _png_size(tmp_path / "tokens.png") == (fig.layout.width, fig.layout.height)
