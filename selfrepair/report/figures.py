"""Figures of a self-repair study: each function takes a result and returns a plotly Figure.

Nothing here shows a figure or touches the model's hooks: the functions take a
:class:`~selfrepair.analysis.SelfRepairResult` (or its ``groups``
DataFrame, or another table of the study) and return a
``plotly.graph_objects.Figure``. :func:`save_figure` writes one as interactive
HTML and as PNG (through kaleido 1.x, which drives a local Chrome/Chromium;
no network needed).

Sign convention (docs/quantities.md, "Notation"): every effect is ``m(clean) - m(ablated)`` in metric
units (logit difference by default), so a positive effect means the ablation
lowers the metric. A group self-repairs when its interaction ratio
``r = (E_S - sum_n E_n) / E_S`` exceeds the threshold (0.1 by default).

The figures:

1. :func:`plot_joint_vs_sum` -- joint ablation effect against the sum of the
   individual effects, y = x, the threshold band, the top 5% of r (the GIM
   paper's self-repair figure);
2. :func:`plot_estimates` -- gradient, TSG and GIM estimates of the joint
   effect against the measured one, coloured by self-repair;
3. :func:`plot_head_heatmaps` -- layer x head fraction self-repairing and
   median interaction;
4. :func:`plot_threshold_sweep` -- fraction flagged against the threshold,
   with its 95% interval;
5. :func:`plot_local_vs_global` -- local against global interaction and the
   downstream gap;
6. :func:`plot_head_ranking` -- per head: measured ablation effect beside grad
   and GIM attribution patching;
7. :func:`plot_attention_row` -- one self-repairing row: attention weights
   clean, after each individual ablation and after the joint one
   (:func:`attention_row_data` recomputes them from the model);
8. :func:`plot_token_attributions` -- token attributions, grad versus GIM,
   over one prompt (:func:`token_attribution_table` builds the table);
9. what r is made of and group sizes: :func:`plot_r_vs_mass` (r against its pure-geometry part,
   coloured by ``c_ratio``), :func:`plot_flag_rules` (share flagged by r > threshold versus by the
   permutation test, per head), :func:`plot_group_sizes` (``n_contributing`` / ``n_clusters`` per
   head), :func:`plot_excess_by_group_size`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from pathlib import Path
from typing import Iterable, Mapping, Optional, Sequence, Union

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import plotly.io as pio
from plotly.offline import get_plotlyjs
from plotly.subplots import make_subplots

from .._io import atomic_write
from ..analysis.attention_row import attention_row_data
from ..analysis.estimates import agreement
from ..analysis.results import groups_of, keys_str, overall_sweep, settings_of
from ..analysis.stats import spearman

__all__ = [
    "plot_joint_vs_sum",
    "plot_estimates",
    "plot_head_heatmaps",
    "plot_threshold_sweep",
    "plot_local_vs_global",
    "plot_head_ranking",
    "plot_attention_row",
    "plot_token_attributions",
    "plot_stability",
    "plot_r_vs_mass",
    "plot_flag_rules",
    "plot_group_sizes",
    "plot_excess_by_group_size",
    "plot_key_estimates",
    "plot_context_sweep",
    "save_figure",
    "save_figures",
    "FigureExportError",
    "png_size",
    "atomic_write",
]

# colours (colour-blind safe: Okabe-Ito)
SR_COLOR = "#D55E00"  # self-repairing
NOT_COLOR = "#0072B2"  # not self-repairing
NAN_COLOR = "#999999"  # ratio undefined
TOP_COLOR = "#000000"
GRAD_COLOR = "#0072B2"
GIM_COLOR = "#D55E00"
MEASURED_COLOR = "#444444"

UNITS = {"logit_diff": "logit difference", "logprob": "log-probability"}
DEFAULT_SIZE = (1000, 650)


class FigureExportError(RuntimeError):
    """A figure could not be written as PNG (no Chrome/Chromium for kaleido); the message says what to do."""


# ----------------------------------------------------------------------------- helpers


def _threshold(result, threshold: Optional[float]) -> float:
    if threshold is not None:
        return float(threshold)
    return float(settings_of(result).get("threshold", 0.1))


def _units(result, units: Optional[str]) -> str:
    if units:
        return units
    s = settings_of(result)
    metric = s.get("metric")
    if metric is None:
        task = s.get("task")
        metric = task.get("metric") if isinstance(task, Mapping) else None
    return UNITS.get(metric, "logit difference") if isinstance(metric, (str, type(None))) else "metric units"


def _require(df: pd.DataFrame, cols: Iterable[str], what: str):
    missing = [c for c in cols if c not in df.columns]
    if missing:
        hint = ""
        if any(c.startswith("global") or c == "downstream_gap" for c in missing):
            hint = " (run analyze_self_repair with global_effects=True)"
        elif "gim_estimate" in missing:
            hint = " (run compare_estimates first)"
        raise ValueError(f"{what} needs the column(s) {', '.join(missing)}{hint}; the table has {', '.join(map(str, df.columns))}")


def _hover(df: pd.DataFrame, extra: Sequence[tuple[str, str, str]] = ()) -> list[str]:
    """Hover text per group: prompt, layer, head, query, keys, then ``extra`` (label, column, format)."""
    out = []
    cols = {c: df[c].to_numpy() if c in df.columns else None for c in ("prompt", "layer", "head", "query", "keys")}
    ex = [(lab, df[c].to_numpy(), fmt) for lab, c, fmt in extra if c in df.columns]
    for i in range(len(df)):
        parts = []
        if cols["prompt"] is not None:
            parts.append(f"prompt {cols['prompt'][i]}")
        if cols["layer"] is not None and cols["head"] is not None:
            parts.append(f"L{cols['layer'][i]}H{cols['head'][i]}")
        if cols["query"] is not None:
            parts.append(f"query {cols['query'][i]}")
        if cols["keys"] is not None:
            parts.append(f"keys {keys_str(cols['keys'][i])}")
        s = ", ".join(parts)
        for lab, vals, fmt in ex:
            v = vals[i]
            try:
                s += f"<br>{lab} = {format(float(v), fmt)}"
            except (TypeError, ValueError):
                s += f"<br>{lab} = {v}"
        out.append(s)
    return out


def _agreement(estimate, effect, **kw) -> dict:
    """:func:`selfrepair.analysis.agreement` (Spearman, sign agreement, top-k overlap), the numbers
    ``compare_estimates`` reports."""

    return agreement(np.asarray(estimate, dtype=float), np.asarray(effect, dtype=float), **kw)


def _range(*arrays, pad: float = 0.05) -> tuple[float, float]:
    vals = np.concatenate([np.asarray(a, dtype=float).ravel() for a in arrays])
    vals = vals[np.isfinite(vals)]
    if vals.size == 0:
        return -1.0, 1.0
    lo, hi = float(vals.min()), float(vals.max())
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    span = hi - lo or 1.0
    return lo - pad * span, hi + pad * span


def _diag(lo: float, hi: float, name: str = "y = x", showlegend: bool = True, **kw) -> go.Scatter:
    return go.Scatter(x=[lo, hi], y=[lo, hi], mode="lines", name=name, showlegend=showlegend,
                      line=dict(color="black", dash="dash", width=1), hoverinfo="skip", **kw)


def _base_layout(fig: go.Figure, title: str, size=DEFAULT_SIZE, **kw) -> go.Figure:
    fig.update_layout(title=dict(text=title, x=0.01, xanchor="left"), width=size[0], height=size[1],
                      template="plotly_white", legend=dict(orientation="v"),
                      hoverlabel=dict(align="left"), **kw)
    return fig


def _seq_sum(col: pd.Series) -> np.ndarray:
    return np.array([float(np.sum(np.asarray(v, dtype=float))) for v in col], dtype=float)


def _repairs(r: np.ndarray, t: float) -> np.ndarray:
    """``self_repair`` at the plotted threshold: ``r > t`` where r is defined (docs/quantities.md, "Individual versus joint")."""
    return np.isfinite(r) & (r > t)


def _add_classes(fig: go.Figure, x, y, hover, classes, *, opacity: float = 0.6, row=None, col=None,
                 showlegend: bool = True, counts: bool = False) -> None:
    """One marker trace per (mask, name, colour) class that has any point."""
    for mask, name, color in classes:
        if mask.any():
            fig.add_trace(go.Scatter(x=x[mask], y=y[mask], mode="markers",
                                     name=f"{name}: {int(mask.sum())}" if counts else name, legendgroup=name,
                                     showlegend=showlegend, marker=dict(color=color, size=5, opacity=opacity),
                                     text=hover[mask], hovertemplate="%{text}<extra></extra>"), row=row, col=col)


# ----------------------------------------------------------------------------- 1. joint vs sum


def plot_joint_vs_sum(result, *, effects: str = "local", threshold: Optional[float] = None,
                      percentile: float = 95.0, units: Optional[str] = None) -> go.Figure:
    """Joint ablation effect ``E_S`` against the sum of individual effects ``sum_n E_n``.

    Points on y = x are additive. A group self-repairs (``r > threshold``) when
    it lies beyond the line ``y = x / (1 - threshold)``, away from y = x; the
    shaded band between the two lines holds ``0 < r <= threshold``. Groups with
    ``r`` at or above its ``percentile``-th percentile are ringed. ``effects``:
    ``"local"`` (softmax part, head-local) or ``"global"`` (real forward passes).
    """
    df = groups_of(result)
    t = _threshold(result, threshold)
    if effects == "local":
        _require(df, ["effect_sum", "effect_joint", "interaction"], "plot_joint_vs_sum")
        x, y, r = df["effect_sum"].to_numpy(float), df["effect_joint"].to_numpy(float), df["interaction"].to_numpy(float)
        sym = "E"
    elif effects == "global":
        _require(df, ["global_effects", "global_effect_joint", "global_interaction"], "plot_joint_vs_sum(effects='global')")
        x = df["global_effect_sum"].to_numpy(float) if "global_effect_sum" in df.columns else _seq_sum(df["global_effects"])
        y, r = df["global_effect_joint"].to_numpy(float), df["global_interaction"].to_numpy(float)
        sym = "G"
    else:
        raise ValueError(f"effects must be 'local' or 'global', got {effects!r}")
    u = _units(result, units)
    defined = np.isfinite(r)
    sr = _repairs(r, t)
    hover = _hover(df.assign(_x=x, _y=y, _r=r), [(f"sum {sym}_n", "_x", ".4g"), (f"{sym}_S", "_y", ".4g"), ("r", "_r", ".3g")])
    hover = np.array(hover, dtype=object)
    lo, hi = _range(x, y)

    fig = go.Figure()
    if t < 1:
        # threshold band between y = x and y = x / (1 - t)
        s = 1.0 / (1.0 - t)
        xs = np.array([lo, hi])
        fig.add_trace(go.Scatter(x=np.r_[xs, xs[::-1]], y=np.r_[xs, s * xs[::-1]], fill="toself", mode="lines",
                                 line=dict(width=0), fillcolor="rgba(230,159,0,0.18)", hoverinfo="skip",
                                 name=f"0 < r <= {t:g} (below threshold)"))
        fig.add_trace(go.Scatter(x=xs, y=s * xs, mode="lines", line=dict(color="#E69F00", width=1.5),
                                 name=f"threshold r = {t:g}: y = x / (1 - {t:g})", hoverinfo="skip"))
    fig.add_trace(_diag(lo, hi, name="y = x (additive, r = 0)"))
    _add_classes(fig, x, y, hover, [(~defined, "ratio undefined (|joint| below floor)", NAN_COLOR),
                                     (defined & ~sr, f"not self-repairing (r <= {t:g})", NOT_COLOR),
                                     (sr, f"self-repairing (r > {t:g})", SR_COLOR)], opacity=0.65, counts=True)
    if defined.sum() >= 1:
        p = float(np.nanpercentile(r[defined], percentile))
        top = defined & (r >= p)
        fig.add_trace(go.Scatter(x=x[top], y=y[top], mode="markers",
                                 name=f"top {100 - percentile:g}% of r (r >= {p:.3g})",
                                 marker=dict(symbol="circle-open", size=11, color=TOP_COLOR, line=dict(width=1.5)),
                                 text=hover[top], hovertemplate="%{text}<extra>top r</extra>"))
    k = settings_of(result).get("k")
    what = f"top-{k} keys" if k else "top keys"
    n_def, n = int(defined.sum()), len(df)
    frac = sr.sum() / n_def if n_def else float("nan")
    title = (f"Self-repair inside attention: joint vs individual score ablations of the {what} ({effects} effects)"
             f"<br><sup>{n} groups, {n_def} with a defined ratio; {100 * frac:.1f}% self-repairing (r > {t:g})</sup>")
    _base_layout(fig, title)
    fig.update_xaxes(title=f"sum of individual effects  \u03a3 {sym}_n  ({u})", range=[lo, hi], zeroline=True)
    fig.update_yaxes(title=f"joint effect  {sym}_S  ({u})", range=[lo, hi], zeroline=True)
    return fig


# ----------------------------------------------------------------------------- 2. estimates


def plot_estimates(result, *, truth: str = "local", estimates: Optional[Sequence[str]] = None,
                   threshold: Optional[float] = None, units: Optional[str] = None) -> go.Figure:
    """Gradient estimates of the joint score ablation against the measured joint effect.

    One panel per estimate (``grad_estimate``, ``tsg_estimate`` and
    ``gim_estimate`` when present), each with y = x and its Spearman rank
    correlation and sign agreement in the panel title; points coloured by
    self-repair. ``truth``: ``"local"`` (``effect_joint``, the softmax part the
    estimates linearise) or ``"global"`` (``global_effect_joint``).
    """
    df = groups_of(result)
    tcol = {"local": "effect_joint", "global": "global_effect_joint"}.get(truth)
    if tcol is None:
        raise ValueError(f"truth must be 'local' or 'global', got {truth!r}")
    if estimates is None:
        estimates = [c for c in ("grad_estimate", "tsg_estimate", "gim_estimate") if c in df.columns]
    estimates = list(estimates)
    _require(df, [tcol, "interaction", *estimates], "plot_estimates")
    if not estimates:
        raise ValueError("plot_estimates: the table has none of grad_estimate, tsg_estimate, gim_estimate")
    t = _threshold(result, threshold)
    u = _units(result, units)
    x = df[tcol].to_numpy(float)
    sr = _repairs(df["interaction"].to_numpy(float), t)
    label = {"grad_estimate": "plain gradient", "tsg_estimate": "TSG (T = {T})", "gim_estimate": "GIM"}
    T = settings_of(result).get("temperature", 2.0)
    titles = []
    for c in estimates:
        a = _agreement(df[c], x)
        rho, sa = a["spearman"], a["sign_agreement"]
        titles.append(f"{label.get(c, c).format(T=T)}<br><sup>Spearman {rho:.2f}, sign agreement {sa:.0%}</sup>")
    fig = make_subplots(rows=1, cols=len(estimates), subplot_titles=titles, horizontal_spacing=0.07)
    hover = np.array(_hover(df.assign(_x=x), [("measured", "_x", ".4g"), *[(c, c, ".4g") for c in estimates],
                                               ("r", "interaction", ".3g")]), dtype=object)
    for j, c in enumerate(estimates, start=1):
        y = df[c].to_numpy(float)
        lo, hi = _range(x, y)
        fig.add_trace(_diag(lo, hi, showlegend=(j == 1), legendgroup="diag"), row=1, col=j)
        _add_classes(fig, x, y, hover, [(~sr, f"not self-repairing (r <= {t:g})", NOT_COLOR),
                                         (sr, f"self-repairing (r > {t:g})", SR_COLOR)],
                     row=1, col=j, showlegend=(j == 1))
        fig.update_xaxes(title=f"measured joint effect, {truth} ({u})", row=1, col=j)
        fig.update_yaxes(title=f"estimated joint effect ({u})" if j == 1 else None, row=1, col=j)
    _base_layout(fig, f"Gradient estimates of the joint score ablation vs the measured {truth} effect "
                      f"({len(df)} groups)", size=(max(DEFAULT_SIZE[0], 430 * len(estimates)), 560))
    fig.update_layout(margin=dict(t=120))
    return fig


# ----------------------------------------------------------------------------- 3. heatmaps


def _head_table(df: pd.DataFrame, n_layers: int, n_heads: int, t: float, col: str = "interaction"):
    frac = np.full((n_layers, n_heads), np.nan)
    med = np.full((n_layers, n_heads), np.nan)
    cnt = np.zeros((n_layers, n_heads), dtype=int)
    ok = np.isfinite(df[col].to_numpy(float))
    d = df.loc[ok]
    for (l, h), g in d.groupby(["layer", "head"]):
        frac[l, h] = _repairs(g[col].to_numpy(float), t).mean()
        med[l, h] = g[col].median()
        cnt[l, h] = len(g)
    return frac, med, cnt


def plot_head_heatmaps(result, *, n_layers: Optional[int] = None, n_heads: Optional[int] = None,
                       threshold: Optional[float] = None) -> go.Figure:
    """Layer x head heatmaps: fraction of groups self-repairing, and median interaction ratio r.

    Fractions are over groups with a defined r (the count is written in each
    cell); the median is on a diverging scale centred at 0. Empty cells: no
    group with a defined ratio at that head.
    """
    df = groups_of(result)
    _require(df, ["layer", "head", "interaction"], "plot_head_heatmaps")
    s = settings_of(result)
    n_layers = int(n_layers or s.get("n_layers") or (df["layer"].max() + 1 if len(df) else 1))
    n_heads = int(n_heads or s.get("n_heads") or (df["head"].max() + 1 if len(df) else 1))
    t = _threshold(result, threshold)
    frac, med, cnt = _head_table(df, n_layers, n_heads, t)
    fig = make_subplots(rows=1, cols=2, horizontal_spacing=0.14,
                        subplot_titles=(f"fraction self-repairing (r > {t:g}), n groups in each cell",
                                        "median interaction ratio r (signed)"))
    heads = [f"H{h}" for h in range(n_heads)]
    layers = [f"L{l}" for l in range(n_layers)]
    text = [[("" if cnt[l, h] == 0 else f"{frac[l, h]:.0%}<br>n={cnt[l, h]}") for h in range(n_heads)] for l in range(n_layers)]
    fig.add_trace(go.Heatmap(z=frac, x=heads, y=layers, zmin=0, zmax=1, colorscale="Viridis", text=text,
                             texttemplate="%{text}", colorbar=dict(title="fraction", x=0.43, len=0.9),
                             hovertemplate="%{y}%{x}<br>fraction self-repairing %{z:.1%}<extra></extra>"),
                  row=1, col=1)
    # colour range symmetric about 0 and capped at |r| = 1 (a few heads with tiny joint effects can reach
    # |r| >> 1 and would wash out the rest); the cell text gives the exact value
    m = min(float(np.nanmax(np.abs(med))), 1.0) if np.isfinite(med).any() and np.nanmax(np.abs(med)) > 0 else 1.0
    text2 = [[("" if cnt[l, h] == 0 else f"{med[l, h]:.2g}") for h in range(n_heads)] for l in range(n_layers)]
    fig.add_trace(go.Heatmap(z=med, x=heads, y=layers, zmid=0, zmin=-m, zmax=m, colorscale="RdBu_r", text=text2,
                             texttemplate="%{text}", colorbar=dict(title=f"median r{' (colour capped at 1)' if m == 1.0 else ''}", x=1.0, len=0.9),
                             hovertemplate="%{y}%{x}<br>median r %{z:.3g}<extra></extra>"), row=1, col=2)
    for c in (1, 2):
        fig.update_xaxes(title="head", row=1, col=c)
        fig.update_yaxes(title="layer", autorange="reversed", row=1, col=c)
    _base_layout(fig, f"Where self-repair happens: per layer and head ({int(cnt.sum())} groups with a defined ratio)",
                 size=(1100, max(420, 110 * n_layers + 200)))
    return fig


# ----------------------------------------------------------------------------- 4. threshold sweep


DEFAULT_SWEEP = tuple(np.round(np.r_[0.0, np.geomspace(0.01, 2.0, 24)], 4))


def plot_threshold_sweep(result, *, thresholds: Optional[Sequence[float]] = None,
                         threshold: Optional[float] = None) -> go.Figure:
    """Fraction of groups flagged self-repairing as a function of the threshold, with its 95% interval.

    ``result``: a SelfRepairResult (its ``sweep(thresholds)`` is called) or
    the DataFrame ``SelfRepairResult.sweep`` returns (``threshold, fraction,
    ci_low, ci_high, n_defined``).
    The chosen threshold (0.1 by default) is marked.
    """
    t = _threshold(result, threshold)
    if isinstance(result, pd.DataFrame) and "threshold" in result.columns:
        sw = result
    elif hasattr(result, "sweep"):
        ths = sorted(set(float(v) for v in (thresholds if thresholds is not None else DEFAULT_SWEEP)) | {t})
        sw = result.sweep(ths)
    else:
        raise TypeError("plot_threshold_sweep takes a SelfRepairResult or a sweep DataFrame")
    _require(sw, ["threshold", "fraction", "ci_low", "ci_high", "n_defined"], "plot_threshold_sweep")
    sw = overall_sweep(sw).sort_values("threshold")
    x = sw["threshold"].to_numpy(float)
    f = sw["fraction"].to_numpy(float)
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=np.r_[x, x[::-1]], y=np.r_[sw["ci_high"].to_numpy(float), sw["ci_low"].to_numpy(float)[::-1]],
                             fill="toself", fillcolor="rgba(0,114,178,0.2)", line=dict(width=0),
                             name="95% interval (Wilson, design effect)", hoverinfo="skip"))
    fig.add_trace(go.Scatter(x=x, y=f, mode="lines+markers", name="fraction self-repairing", line=dict(color=NOT_COLOR),
                             customdata=np.c_[sw["ci_low"], sw["ci_high"], sw["n_defined"]],
                             hovertemplate="threshold %{x:.3g}: %{y:.1%} [%{customdata[0]:.1%}, %{customdata[1]:.1%}]"
                                           " of %{customdata[2]} groups with a defined ratio<extra></extra>"))
    at = f[np.argmin(np.abs(x - t))] if len(x) else float("nan")
    fig.add_vline(x=t, line=dict(color=SR_COLOR, dash="dash"),
                  annotation_text=f"threshold {t:g}: {at:.1%}", annotation_position="top right")
    _base_layout(fig, "How the share of self-repairing groups depends on the threshold on r", size=(900, 520))
    fig.update_xaxes(title="threshold on the interaction ratio r = (E_S - \u03a3 E_n) / E_S", rangemode="tozero")
    fig.update_yaxes(title="fraction of groups with r > threshold", range=[0, 1], tickformat=".0%")
    return fig


# ----------------------------------------------------------------------------- 5. local vs global


def plot_local_vs_global(result, *, threshold: Optional[float] = None, units: Optional[str] = None) -> go.Figure:
    """Local (softmax only) against global (real forward) interaction, and the downstream gap.

    Left: ``E_S - sum E_n`` against ``G_S - sum G_n`` in metric units with
    y = x (points above it gain interaction downstream of the head). Right: the
    ``downstream_gap = (G_S - sum G_n) - (E_S - sum E_n)`` per layer.
    """
    df = groups_of(result)
    _require(df, ["effect_joint", "effect_sum", "interaction", "global_effects", "global_effect_joint",
                  "downstream_gap"], "plot_local_vs_global")
    t = _threshold(result, threshold)
    u = _units(result, units)
    x = df["effect_joint"].to_numpy(float) - df["effect_sum"].to_numpy(float)
    gsum = df["global_effect_sum"].to_numpy(float) if "global_effect_sum" in df.columns else _seq_sum(df["global_effects"])
    y = df["global_effect_joint"].to_numpy(float) - gsum
    sr = _repairs(df["interaction"].to_numpy(float), t)
    hover = np.array(_hover(df.assign(_x=x, _y=y), [("local E_S - \u03a3E_n", "_x", ".4g"), ("global G_S - \u03a3G_n", "_y", ".4g"),
                                                     ("r local", "interaction", ".3g"), ("r global", "global_interaction", ".3g"),
                                                     ("downstream gap", "downstream_gap", ".4g")]), dtype=object)
    rho = _agreement(y, x)["spearman"]
    fig = make_subplots(rows=1, cols=2, column_widths=[0.55, 0.45], horizontal_spacing=0.1,
                        subplot_titles=(f"interaction in metric units (Spearman {rho:.2f})",
                                        "downstream gap per layer"))
    lo, hi = _range(x, y)
    fig.add_trace(_diag(lo, hi, name="y = x (no downstream change)"), row=1, col=1)
    _add_classes(fig, x, y, hover, [(~sr, f"not self-repairing locally (r <= {t:g})", NOT_COLOR),
                                     (sr, f"self-repairing locally (r > {t:g})", SR_COLOR)], row=1, col=1)
    gap = df["downstream_gap"].to_numpy(float)
    fig.add_trace(go.Box(x=[f"L{l}" for l in df["layer"]], y=gap, name="downstream gap", marker_color=MEASURED_COLOR,
                         boxpoints="outliers", showlegend=False, text=hover, hovertemplate="%{text}<extra></extra>"),
                  row=1, col=2)
    fig.add_hline(y=0, line=dict(color="black", width=1, dash="dot"), row=1, col=2)
    fig.update_xaxes(title=f"local interaction  E_S - \u03a3 E_n  ({u})", row=1, col=1)
    fig.update_yaxes(title=f"global interaction  G_S - \u03a3 G_n  ({u})", row=1, col=1)
    fig.update_xaxes(title="layer of the ablated head", categoryorder="category ascending", row=1, col=2)
    fig.update_yaxes(title=f"downstream gap ({u})", row=1, col=2)
    med = float(np.nanmedian(gap)) if np.isfinite(gap).any() else float("nan")
    _base_layout(fig, "Self-repair inside the head vs in the whole network"
                      f"<br><sup>{len(df)} groups; median downstream gap {med:.3g} {u}</sup>", size=(1150, 560))
    fig.update_layout(margin=dict(t=110))
    return fig


# ----------------------------------------------------------------------------- 6. head ranking


def plot_head_ranking(heads: pd.DataFrame, *, top: Optional[int] = None, units: str = "logit difference") -> go.Figure:
    """Per head: the measured effect of ablating it beside its grad and GIM attribution-patching estimates.

    ``heads``: the table of :func:`selfrepair.head_attributions` (one row per
    layer and head). Heads are sorted by the size of the measured effect
    ``|measured|`` (largest at the top); the title gives each estimate's
    Spearman correlation with the measured effects and how many of the top-5
    heads by ``|measured|`` it also puts in its top 5 (``attribution.agreement``).
    """
    _require(heads, ["layer", "head", "measured"], "plot_head_ranking")
    measured = "measured"
    ests = [(label, c) for label, c in (("grad (attribution patching)", "grad_estimate"), ("GIM", "gim_estimate"))
            if c in heads.columns]
    d = heads.reindex(heads[measured].astype(float).abs().sort_values(ascending=False, kind="stable").index)
    if top:
        d = d.head(int(top))
    d = d.iloc[::-1]  # plotly draws the first category at the bottom
    names = [f"L{l}H{h}" for l, h in zip(d["layer"], d["head"])]
    fig = go.Figure()
    qk = d["via_qk"].to_numpy(float) if "via_qk" in d.columns else None
    fig.add_trace(go.Bar(y=names, x=d[measured].to_numpy(float), orientation="h", name="measured ablation effect",
                         marker_color=MEASURED_COLOR, customdata=qk,
                         hovertemplate="%{y}: measured %{x:.4g}"
                         + ("<br>of which through later heads' queries/keys: %{customdata:.4g}" if qk is not None else "")
                         + "<extra></extra>"))
    info = []
    for (label, c), color in zip(ests, (GRAD_COLOR, GIM_COLOR)):
        fig.add_trace(go.Bar(y=names, x=d[c].to_numpy(float), orientation="h", name=label, marker_color=color,
                             hovertemplate="%{y}: " + label + " %{x:.4g}<extra></extra>"))
        a = _agreement(heads[c], heads[measured], top_frac=min(1.0, 5 / max(len(heads), 1)))
        info.append(f"{label.split(' ')[0]}: Spearman {a['spearman']:.2f}, "
                    f"top-{a['topk']} overlap {round(a['topk_overlap'] * a['topk'])}/{a['topk']}")
    fig.update_layout(barmode="group")
    _base_layout(fig, "Heads ranked by the measured effect of ablating them (largest |effect| at the top)"
                      + (f"<br><sup>{'; '.join(info)}</sup>" if info else ""),
                 size=(950, max(500, 26 * len(d) + 200)))
    fig.update_xaxes(title=f"effect of ablating the head: m(clean) - m(ablated) ({units})")
    fig.update_yaxes(title="head (layer, head)")
    fig.update_layout(margin=dict(t=110))
    return fig


# ----------------------------------------------------------------------------- 7. one row made visible


def plot_attention_row(data, model=None, task=None, row=None, *, units: str = "logit difference") -> go.Figure:
    """One analysed row made visible: bars of attention weight over the context tokens, per condition.

    Panels from top: the clean run, each individual ablation, the joint
    ablation; ablated keys in orange. Each panel states its effect on the
    metric (local, and global when measured), so the reader sees the softmax
    hand the weight of an ablated key to the others and the joint ablation
    cost more than the individual ones added up. ``data``: the table of
    :func:`selfrepair.analysis.attention_row_data` (figures draw tables; they
    never run a model). Passing a result with ``model`` and ``task`` still
    works for one release, with a DeprecationWarning.
    """
    if not (isinstance(data, pd.DataFrame) and "condition" in data.columns):
        if model is None or task is None:
            raise ValueError("plot_attention_row needs the table of selfrepair.analysis.attention_row_data(model, "
                             "task, result); build it first and pass it as data")
        warnings.warn("plot_attention_row(result, model, task) is deprecated and will be removed in the next release: "
                      "pass selfrepair.analysis.attention_row_data(model, task, result, row) instead.",
                      DeprecationWarning, stacklevel=2)
        data = attention_row_data(model, task, data, row)
    conds = data.drop_duplicates("order").sort_values("order")
    nrow = len(conds)
    first = data.iloc[0]
    titles = []
    for _, c in conds.iterrows():
        if c["order"] == 0:
            titles.append("clean run")
        else:
            t = f"{c['condition']}: effect {c['effect']:.3g} {units}"
            if np.isfinite(c["global_effect"]):
                t += f" (global {c['global_effect']:.3g})"
            titles.append(t)
    fig = make_subplots(rows=nrow, cols=1, shared_xaxes=True, vertical_spacing=0.045, subplot_titles=titles)
    clean = data[data["order"] == conds["order"].iloc[0]].set_index("token")["weight"]
    for i, (_, c) in enumerate(conds.iterrows(), start=1):
        d = data[data["order"] == c["order"]]
        d = pd.concat([d[d["position"] >= 0].sort_values("position"), d[d["position"] < 0]])
        colors = [SR_COLOR if a else (NAN_COLOR if pos < 0 else NOT_COLOR) for a, pos in zip(d["ablated"], d["position"])]
        w = d["weight"].to_numpy(float)
        fig.add_trace(go.Bar(x=d["token"], y=w, marker_color=colors, name=c["condition"], showlegend=False,
                             text=[f"{v:.2f}" if v >= 0.05 else "" for v in w], textposition="outside",
                             hovertemplate="key %{x}<br>attention weight %{y:.3f}<extra>" + c["condition"] + "</extra>"),
                      row=i, col=1)
        abl = d[d["ablated"].astype(bool)]
        if len(abl):  # where the ablated keys' weight was in the clean run
            fig.add_trace(go.Bar(x=abl["token"], y=clean.reindex(abl["token"]).to_numpy(float), showlegend=(i == 2),
                                 name="clean weight of an ablated key", legendgroup="ghost",
                                 marker=dict(color="rgba(0,0,0,0)", line=dict(color=SR_COLOR, width=2)),
                                 hovertemplate="key %{x}<br>clean weight %{y:.3f}<extra>before ablation</extra>"),
                          row=i, col=1)
        fig.update_yaxes(title="attention weight", range=[0, 1.15 * max(1e-9, data["weight"].max())], row=i, col=1)
    fig.update_layout(barmode="overlay", legend=dict(orientation="h", y=1.0, yanchor="bottom", x=1, xanchor="right"))
    fig.update_xaxes(title="key position: token (orange: the ablated keys)", tickangle=-60, row=nrow, col=1)
    e_sum = conds["effect"].iloc[1:-1].sum()
    e_joint = conds["effect"].iloc[-1]
    title = (f"Softmax hands the weight over: prompt {first['prompt']}, L{first['layer']}H{first['head']}, "
             f"query {first['query']} ({first['query_token']!r}), keys {first['keys']}"
             f"<br><sup>{first['score_ablation']} ablation of the scores; sum of individual effects {e_sum:.3g}, "
             f"joint {e_joint:.3g} {units}, r = {first['interaction']:.3g}</sup>")
    _base_layout(fig, title, size=(1200, 190 * nrow + 230))
    fig.update_layout(margin=dict(t=110, b=140))
    return fig


# ----------------------------------------------------------------------------- 8. token attributions


def plot_token_attributions(table: pd.DataFrame, prompt: Optional[int] = None, *, methods: Optional[Sequence[str]] = None,
                            window: int = 48, units: str = "logit difference") -> go.Figure:
    """Token attributions of one prompt, grad versus GIM, one panel per method over the prompt text.

    Shows the ``window`` tokens up to and including the metric position
    (marked). ``table``: from :func:`token_attribution_table`. ``prompt``:
    which prompt (default: the first in the table).
    """
    _require(table, ["prompt", "position", "token"], "plot_token_attributions")
    prompt = int(table["prompt"].iloc[0]) if prompt is None else int(prompt)
    d = table[table["prompt"] == prompt].sort_values("position")
    if d.empty:
        raise ValueError(f"prompt {prompt} is not in the attribution table")
    if methods is None:
        methods = [c for c in ("grad", "gim") if c in d.columns]
    if not methods:
        raise ValueError("the attribution table has no 'grad' or 'gim' column")
    mpos = int(d.loc[d["is_metric_position"].astype(bool), "position"].iloc[0]) if "is_metric_position" in d else int(d["position"].max())
    d = d[(d["position"] <= mpos) & (d["position"] > mpos - window)]
    labels = [f"{p}: {t}" for p, t in zip(d["position"], d["token"])]
    label = {"grad": "plain gradient x (e - e_baseline)", "gim": "GIM gradient x (e - e_baseline)"}
    fig = make_subplots(rows=len(methods), cols=1, shared_xaxes=True, vertical_spacing=0.08,
                        subplot_titles=[f"{label.get(m, m)}: total {d[m].sum():.3g} {units}" for m in methods])
    for i, m in enumerate(methods, start=1):
        v = d[m].to_numpy(float)
        colors = [GIM_COLOR if x >= 0 else GRAD_COLOR for x in v]
        fig.add_trace(go.Bar(x=labels, y=v, marker_color=colors, name=m, showlegend=False,
                             hovertemplate="%{x}<br>" + m + " attribution %{y:.4g}<extra></extra>"), row=i, col=1)
        fig.update_yaxes(title=f"attribution ({units})", row=i, col=1)
    fig.add_vline(x=labels[-1], line=dict(color="black", dash="dot"))
    fig.update_xaxes(title="position: token (last = metric position)", tickangle=-60, row=len(methods), col=1)
    _base_layout(fig, f"Token attributions for prompt {prompt}, grad vs GIM (last {len(d)} tokens up to the metric position)"
                      "<br><sup>positive (orange) pushes the metric up; blue pushes it down</sup>",
                 size=(1300, 260 * len(methods) + 300))
    fig.update_layout(margin=dict(t=110, b=150))
    return fig


# ----------------------------------------------------------------------------- saving


def _atomic_write_text(path: Path, text: str):
    atomic_write(path, lambda t: t.write_text(text, encoding="utf-8"))


def _html(fig: go.Figure, path: Path, include_plotlyjs):
    if include_plotlyjs == "directory":
        js = path.parent / "plotly.min.js"
        if not js.exists():
            _atomic_write_text(js, get_plotlyjs())
    _atomic_write_text(path, fig.to_html(include_plotlyjs=include_plotlyjs, full_html=True))


def png_size(fig: go.Figure) -> tuple[int, int]:
    return int(fig.layout.width or DEFAULT_SIZE[0]), int(fig.layout.height or DEFAULT_SIZE[1])


@contextlib.contextmanager
def _quiet_browser_pipe():
    """kaleido's Chromium driver (choreographer) logs, with a traceback on stderr, and then ignores a message
    split across two reads of its pipe (``JSONError decoding message. Ignoring``), which happens on a loaded
    machine; the export itself is unaffected. Its loggers are silenced below CRITICAL for the export and
    restored after; errors that stop the export still raise."""
    try:
        from choreographer.channels import pipe  # function-level: kaleido's driver, loaded only for PNG export
    except ImportError:
        yield
        return
    loggers = [pipe._logger]   # the driver's own logger object (logistro), not one created here by name
    old = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for lg, lv in zip(loggers, old):
            lg.setLevel(lv)


def _write_pngs(figs: Sequence[go.Figure], paths: Sequence[Path], scale: float):
    tmps = [p.with_name(f".{p.name}.tmp.png") for p in paths]
    try:
        try:
            with _quiet_browser_pipe():
                pio.write_images(list(figs), [str(t) for t in tmps], format="png", scale=scale,
                                 width=[png_size(f)[0] for f in figs], height=[png_size(f)[1] for f in figs])
        except Exception as e:  # kaleido raises its own ChromeNotFoundError etc.
            name = type(e).__name__
            if "Chrome" in name or "chrome" in str(e).lower() or "browser" in str(e).lower():
                raise FigureExportError(
                    f"PNG export needs Chrome or Chromium for kaleido ({name}: {str(e).splitlines()[0] if str(e) else ''}); "
                    "install one (Debian/Ubuntu: apt-get install -y chromium) or skip PNGs with --no-png") from e
            raise
        for t, p in zip(tmps, paths):
            os.replace(t, p)
    finally:
        for t in tmps:
            if t.exists():
                t.unlink()


def save_figure(fig: go.Figure, path_stem: Union[str, Path], *, png: bool = True, html: bool = True,
                include_plotlyjs: Union[bool, str] = "directory", scale: float = 1.0) -> list[Path]:
    """Write ``fig`` as ``<path_stem>.html`` (interactive) and ``<path_stem>.png`` (static); returns the paths.

    Each file is written under a temporary name and renamed when complete.
    HTML: ``include_plotlyjs="directory"`` (default) writes ``plotly.min.js``
    once beside the files so they open offline; ``"cdn"`` keeps them small but
    needs network to view; ``True`` embeds plotly.js in every file. PNG: at the
    figure's layout width x height times ``scale`` pixels, rendered by kaleido
    through a local Chrome/Chromium (offline).
    """
    return save_figures({Path(path_stem).name: fig}, Path(path_stem).parent, png=png, html=html,
                        include_plotlyjs=include_plotlyjs, scale=scale)


def save_figures(figs: Mapping[str, go.Figure], out_dir: Union[str, Path], *, png: bool = True, html: bool = True,
                 include_plotlyjs: Union[bool, str] = "directory", scale: float = 1.0) -> list[Path]:
    """Write every ``{name: figure}`` as ``out_dir/name.html`` and ``out_dir/name.png`` (one browser start for all PNGs)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    if html:
        for name, fig in figs.items():
            p = out_dir / f"{name}.html"
            _html(fig, p, include_plotlyjs)
            written.append(p)
    if png and figs:
        paths = [out_dir / f"{name}.png" for name in figs]
        _write_pngs(list(figs.values()), paths, scale)
        written.extend(paths)
    return written


def plot_stability(result) -> go.Figure:
    """Per measure, the value and its 95% interval for each edit kind (plotly)."""

    t = result.table
    fig = go.Figure()
    for kind in result.settings.get("edits", sorted(t["edit"].unique())):
        d = t[t["edit"] == kind]
        fig.add_trace(go.Scatter(
            x=d["measure"], y=d["value"], mode="markers", name=f"{kind} (impossible: "
            f"{result.n_impossible.get(kind, 0)})",
            error_y=dict(type="data", symmetric=False, array=(d["hi"] - d["value"]).to_numpy(),
                         arrayminus=(d["value"] - d["lo"]).to_numpy()),
            customdata=d["n"], hovertemplate="%{x}: %{y:.3f} (n=%{customdata})"))
    fig.update_layout(title=f"Stability under meaning-preserving edits ({result.settings.get('task_name')}, "
                            f"{result.settings.get('n_variants')} variants per prompt)",
                      xaxis_title="measure", yaxis_title="Spearman / share kept", scattermode="group",
                      yaxis_range=[-1.05, 1.05])
    return fig


# ----------------------------------------------------------------------------- what r is made of, group sizes


def _head_label(layer, head) -> str:
    return f"L{int(layer)}H{int(head)}"


def plot_r_vs_mass(result, *, threshold: Optional[float] = None) -> go.Figure:
    """Interaction ratio r against ``mass_interaction`` (r with ``c = 1_S``: pure softmax geometry), y = x,
    each group coloured by ``c_ratio`` (1 = equal contributions, < 0 = opposite signs). Points on the diagonal
    are groups whose r the attention geometry alone fixes (docs/quantities.md, "What r is made of")."""
    df = groups_of(result)
    _require(df, ["interaction", "mass_interaction", "c_ratio"], "plot_r_vs_mass")
    t = _threshold(result, threshold)
    x = df["mass_interaction"].to_numpy(float)
    y = df["interaction"].to_numpy(float)
    ok = np.isfinite(x) & np.isfinite(y)
    rho = spearman(x[ok], y[ok])
    lo, hi = _range(x[ok], y[ok])
    hover = np.array(_hover(df, [("r", "interaction", ".3g"), ("mass_interaction", "mass_interaction", ".3g"),
                                 ("excess", "excess_interaction", ".3g"), ("c_ratio", "c_ratio", ".2f"),
                                 ("concealment_share", "concealment_share", ".3g"),
                                 ("permutation_p", "permutation_p", ".3g")]), dtype=object)
    fig = go.Figure()
    fig.add_trace(_diag(lo, hi, name="y = x (r is all geometry)"))
    fig.add_trace(go.Scatter(x=x[ok], y=y[ok], mode="markers", name="groups", text=hover[ok],
                             hovertemplate="%{text}<extra></extra>",
                             marker=dict(size=6, opacity=0.75, color=df["c_ratio"].to_numpy(float)[ok],
                                         colorscale="RdBu", cmin=-1, cmax=1,
                                         colorbar=dict(title="c_ratio<br>min|c|/max|c|<br>(< 0: signs differ)"))))
    fig.add_hline(y=t, line=dict(color=SR_COLOR, dash="dot"), annotation_text=f"r = {t:g}",
                  annotation_position="bottom right")
    fig.add_vline(x=t, line=dict(color=NAN_COLOR, dash="dot"))
    _base_layout(fig, "What r is made of: the interaction ratio against its pure-geometry part"
                      f"<br><sup>{int(ok.sum())} groups with both defined; Spearman {rho:.2f}</sup>", size=(900, 650))
    fig.update_xaxes(title="mass_interaction: r with c = 1 on S, 0 elsewhere (scores only)", range=[lo, hi])
    fig.update_yaxes(title="interaction ratio r (the row's own contributions)", range=[lo, hi])
    return fig


def plot_flag_rules(result, *, threshold: Optional[float] = None, min_groups: int = 1) -> go.Figure:
    """Per head, the share of groups flagged self-repairing by ``r > threshold`` beside the share flagged by
    the permutation test (Benjamini-Hochberg at the analysis' alpha), each with its 95% interval (Wilson
    with the prompts' design effect). ``result``: a SelfRepairResult or its ``summary()`` table; heads with
    fewer than ``min_groups`` defined groups are left out."""
    if isinstance(result, pd.DataFrame) and "frac_permutation" in result.columns:
        hs = result
    elif hasattr(result, "summary"):
        hs = result.summary()
    else:
        raise TypeError("plot_flag_rules takes a SelfRepairResult or its summary() DataFrame")
    _require(hs, ["layer", "head", "n_defined", "frac_self_repair", "ci_low", "ci_high", "frac_permutation",
                  "perm_ci_low", "perm_ci_high"], "plot_flag_rules")
    t = _threshold(result, threshold)
    hs = hs[hs["n_defined"] >= max(1, int(min_groups))]
    labels = [_head_label(l, h) for l, h in zip(hs["layer"], hs["head"])]
    fig = go.Figure()
    for col, lo, hi_, name, color in (("frac_self_repair", "ci_low", "ci_high", f"r > {t:g}", SR_COLOR),
                                      ("frac_permutation", "perm_ci_low", "perm_ci_high",
                                       "permutation test (BH)", NOT_COLOR)):
        v = hs[col].to_numpy(float)
        fig.add_trace(go.Bar(x=labels, y=v, name=name, marker_color=color,
                             error_y=dict(type="data", symmetric=False, array=hs[hi_].to_numpy(float) - v,
                                          arrayminus=v - hs[lo].to_numpy(float)),
                             customdata=np.c_[hs[lo], hs[hi_], hs["n_defined"]],
                             hovertemplate="%{x}: %{y:.1%} [%{customdata[0]:.1%}, %{customdata[1]:.1%}] of "
                                           "%{customdata[2]} groups<extra>" + name + "</extra>"))
    _base_layout(fig, "Self-repairing by the threshold rule versus by the permutation test, per head"
                      "<br><sup>95% intervals: Wilson on n / design effect of the prompts</sup>",
                 size=(max(700, 60 * len(labels) + 300), 520), barmode="group")
    fig.update_xaxes(title="head")
    fig.update_yaxes(title="share of groups flagged", range=[0, 1.02], tickformat=".0%")
    return fig


def plot_group_sizes(result) -> go.Figure:
    """Per head, the distribution of ``n_contributing`` (keys passing the selection rule) and ``n_clusters``
    (groups of keys with similar outputs v_j W_O) over the analysed rows, as shares (docs/quantities.md,
    "Group sizes"). ``result``: a SelfRepairResult or its ``group_sizes()`` table."""
    if isinstance(result, pd.DataFrame) and "quantity" in result.columns:
        gs = result
    elif hasattr(result, "group_sizes"):
        gs = result.group_sizes()
    else:
        raise TypeError("plot_group_sizes takes a SelfRepairResult or its group_sizes() DataFrame")
    _require(gs, ["layer", "head", "quantity", "value", "count", "share"], "plot_group_sizes")
    qs = [q for q in ("n_contributing", "n_clusters") if (gs["quantity"] == q).any()] or ["n_contributing"]
    fig = make_subplots(rows=len(qs), cols=1, vertical_spacing=0.18,
                        subplot_titles=[f"{q}: share of each head's analysed rows" for q in qs])
    for i, q in enumerate(qs, start=1):
        d = gs[gs["quantity"] == q]
        heads = sorted({(int(l), int(h)) for l, h in zip(d["layer"], d["head"])})
        vals = sorted(int(v) for v in d["value"].unique()) if len(d) else []
        z = np.full((len(vals), len(heads)), np.nan)
        txt = [["" for _ in heads] for _ in vals]
        for r in d.itertuples():
            a, b = vals.index(int(r.value)), heads.index((int(r.layer), int(r.head)))
            z[a, b] = r.share
            txt[a][b] = f"{r.share:.0%}<br>{int(r.count)}"
        fig.add_trace(go.Heatmap(z=z, x=[_head_label(*h) for h in heads], y=[str(v) for v in vals], zmin=0, zmax=1,
                                 colorscale="Viridis", text=txt, texttemplate="%{text}", showscale=i == 1,
                                 colorbar=dict(title="share"),
                                 hovertemplate="%{x}: " + q + " = %{y}: %{z:.1%}<extra></extra>"), row=i, col=1)
        fig.update_xaxes(title="head", row=i, col=1)
        fig.update_yaxes(title=q, type="category", row=i, col=1)
    _base_layout(fig, "How many keys contribute, and in how many clusters of similar outputs, per head",
                 size=(max(800, 55 * gs[["layer", "head"]].drop_duplicates().shape[0] + 300), 380 * len(qs) + 120))
    return fig


def plot_excess_by_group_size(result) -> go.Figure:
    """``excess_interaction = r - mass_interaction`` by group size (keys in S; a ``k="auto"`` result holds
    several sizes): a box per size, with the medians of r and of ``mass_interaction`` beside it."""
    df = groups_of(result)
    _require(df, ["keys", "interaction", "mass_interaction", "excess_interaction"], "plot_excess_by_group_size")
    size = np.array([len(k) for k in df["keys"]], dtype=int)
    fig = go.Figure()
    sizes = sorted(set(size.tolist()))
    fig.add_trace(go.Box(x=size, y=df["excess_interaction"].to_numpy(float), name="excess_interaction",
                         marker_color=SR_COLOR, boxpoints="outliers"))
    for col, name, color, sym in (("interaction", "median r", NOT_COLOR, "diamond"),
                                  ("mass_interaction", "median mass_interaction", NAN_COLOR, "square")):
        med = [float(df.loc[size == s, col].astype(float).median()) for s in sizes]
        fig.add_trace(go.Scatter(x=sizes, y=med, mode="lines+markers", name=name,
                                 marker=dict(color=color, symbol=sym, size=9), line=dict(color=color, dash="dot")))
    counts = {s: int((size == s).sum()) for s in sizes}
    fig.add_hline(y=0, line=dict(color="black", width=1))
    _base_layout(fig, "The part of r the geometry does not explain, by group size"
                      "<br><sup>groups per size: " + ", ".join(f"{s}: {c}" for s, c in counts.items()) + "</sup>",
                 size=(900, 560))
    fig.update_xaxes(title="group size (keys in S)", dtick=1)
    fig.update_yaxes(title="excess_interaction = r - mass_interaction (ratio units)")
    return fig


def plot_key_estimates(keys: pd.DataFrame, *, estimates: Sequence[str] = ("grad_key", "tsg_key"),
                       units: str = "logit difference") -> go.Figure:
    """Per-key estimates (``compare_estimates(...).keys``) against each key's Shapley value and its
    individual effect, side by side: one row per estimate (plain gradient, TSG), one column per truth;
    Spearman and sign agreement in each panel title, points coloured by the group's self-repair flag."""
    _require(keys, ["individual", "shapley", *estimates], "plot_key_estimates")
    truths = (("shapley", "Shapley value within S"), ("individual", "individual effect E_n"))
    label = {"grad_key": "plain gradient", "tsg_key": "TSG", "gim_key": "GIM", "w_j": "w_j (no gradient)"}
    titles = []
    for e in estimates:
        for t, tl in truths:
            a = _agreement(keys[e], keys[t])
            titles.append(f"{label.get(e, e)} vs {tl}<br><sup>Spearman {a['spearman']:.2f}, "
                          f"sign agreement {a['sign_agreement']:.0%}, {a['n']} keys</sup>")
    fig = make_subplots(rows=len(estimates), cols=2, subplot_titles=titles, horizontal_spacing=0.09,
                        vertical_spacing=0.14)
    sr = keys["self_repair"].to_numpy(bool) if "self_repair" in keys.columns else np.zeros(len(keys), bool)
    for i, e in enumerate(estimates, start=1):
        y = keys[e].to_numpy(float)
        for j, (t, tl) in enumerate(truths, start=1):
            x = keys[t].to_numpy(float)
            lo, hi = _range(x, y)
            first = i == 1 and j == 1
            fig.add_trace(_diag(lo, hi, showlegend=first, legendgroup="diag"), row=i, col=j)
            hover = np.array([f"{t} {a:.4g}<br>{e} {b:.4g}" for a, b in zip(x, y)], dtype=object)
            _add_classes(fig, x, y, hover, [(~sr, "key of a group not self-repairing", NOT_COLOR),
                                             (sr, "key of a self-repairing group", SR_COLOR)],
                         row=i, col=j, showlegend=first)
            fig.update_xaxes(title=f"{tl} ({units})", row=i, col=j)
            fig.update_yaxes(title=f"{label.get(e, e)} ({units})" if j == 1 else None, row=i, col=j)
    _base_layout(fig, f"Per-key estimates vs Shapley values and individual effects ({len(keys)} keys)",
                 size=(1000, 430 * len(estimates) + 80))
    fig.update_layout(margin=dict(t=120))
    return fig


def plot_context_sweep(table: pd.DataFrame) -> go.Figure:
    """``context_sweep(...).to_frame()``: per window length, the share self-repairing (with its interval),
    the median r and the estimates' Spearman against the local joint effect (with intervals)."""
    _require(table, ["length", "measure", "value", "lo", "hi"], "plot_context_sweep")
    panels = (("share", "share self-repairing"), ("median", "median r"), ("spearman", "Spearman vs local joint effect"))
    fig = make_subplots(rows=1, cols=3, subplot_titles=[p[1] for p in panels], horizontal_spacing=0.08)
    palette = ["#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9"]
    colour = {m: palette[i % len(palette)] for i, m in enumerate(dict.fromkeys(table["measure"]))}
    ticks = sorted(set(int(x) for x in table["length"]))
    for j, (kind, _) in enumerate(panels, start=1):
        d = table[table["kind"] == kind] if "kind" in table.columns else table.iloc[0:0]
        for name, s in d.groupby("measure", sort=False):
            s = s.sort_values("length")
            fig.add_trace(go.Scatter(
                x=s["length"], y=s["value"], mode="lines+markers", name=str(name),
                line=dict(color=colour[name]),
                error_y=dict(type="data", symmetric=False, array=(s["hi"] - s["value"]).to_numpy(float),
                             arrayminus=(s["value"] - s["lo"]).to_numpy(float)),
                customdata=s["n"] if "n" in s.columns else None,
                hovertemplate="length %{x}: %{y:.3f} (n=%{customdata})<extra>" + str(name) + "</extra>"),
                row=1, col=j)
        fig.update_xaxes(title="window length (tokens)", type="log", tickvals=ticks, row=1, col=j)
    _base_layout(fig, "Self-repair and estimate quality against context length", size=(1300, 520))
    fig.update_layout(margin=dict(t=110))
    return fig
