"""How gradient estimates (grad, TSG, GIM) of a self-repair result track its measured effects."""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Union

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from ..engine.cache import cached_run
from ..models.probe import resolve_backend
from ..tasks import Task, validate_task
from . import stats
from .decomposition import c_ratio
from .gim import gim
from .identity import model_hash, task_hash
from .records import read_frames, write_frames
from .results import SelfRepairResult
from .rows import row_effects

__all__ = ["compare_estimates", "estimate_report", "EstimateComparison", "agreement", "key_table", "group_c_ratio", "ESTIMATES",
           "KEY_ESTIMATES", "TRUTHS", "KEY_TRUTHS", "SUBSETS", "SPLITS", "BY", "MIN_N", "REDUNDANT_C_RATIO"]


ESTIMATES = ("grad_estimate", "tsg_estimate", "gim_estimate", "contribution_sum")
KEY_ESTIMATES = ("grad_key", "tsg_key", "gim_key", "w_j")
TRUTHS = {"global": "global_effect_joint", "local": "effect_joint"}
KEY_TRUTHS = {"individual": "individual", "shapley": "shapley"}
SUBSETS = ("all", "self_repairing", "not_self_repairing")
SPLITS = ("all", "redundant", "not_redundant", "value_similarity_out_low", "value_similarity_out_mid",
          "value_similarity_out_high")
BY = (None, "layer", "head")
#: rows of the report compared on fewer pairs than this carry a warning
MIN_N = 10
#: a group counts as redundant when its c_ratio is at least this (SPEC "What r is made of")
REDUNDANT_C_RATIO = 0.5


@dataclass
class EstimateComparison:
    """Result of ``compare_estimates``.

    ``groups``: a copy of ``result.groups`` plus ``gim_estimate``, ``gim_estimates`` (per key),
    ``contribution_sum`` and ``c_ratio``; ``keys``: one row per key of every group (``grad_key``,
    ``tsg_key``, ``gim_key``, ``w_j``, ``individual``, ``shapley`` and the group's flags); ``report``:
    one row per (level, estimate, effect, subset, split[, by]) with the agreement statistics and a
    bootstrap interval over prompts on Spearman; ``notes``: what could not be compared and why.
    """

    groups: pd.DataFrame
    report: pd.DataFrame
    notes: list
    settings: dict = field(default_factory=dict)
    keys: pd.DataFrame = field(default_factory=pd.DataFrame)

    KIND = "estimate_comparison"

    def to_frame(self) -> pd.DataFrame:
        """The report table (one row per estimate, effect, subset and split); ``groups`` / ``keys`` hold the estimates."""
        return self.report.copy()

    def save(self, path: Union[str, os.PathLike]) -> Path:
        """One Parquet file with the three tables; notes and settings in its footer."""
        return write_frames(path, {"groups": self.groups, "report": self.report, "keys": self.keys},
                            {"kind": self.KIND, "settings": self.settings, "notes": list(self.notes)})

    @classmethod
    def load(cls, path: Union[str, os.PathLike]) -> "EstimateComparison":
        """The comparison ``save`` wrote (equal tables, notes and settings)."""
        frames, info = read_frames(path, cls.KIND)
        return cls(frames["groups"], frames["report"], info.get("notes", []), info.get("settings", {}),
                   frames.get("keys", pd.DataFrame()))


def agreement(estimate, effect, *, top_frac: float = 0.1) -> dict:
    """How an (uncalibrated) estimate tracks a measured effect, rows where both are finite.

    ``spearman`` (``stats.spearman``: NaN with fewer than 3 pairs or a constant side);
    ``sign_agreement`` (share of rows with a non-zero effect whose estimate has the same sign);
    ``topk_overlap`` (share of the ``k = max(1, ceil(top_frac * n))`` rows of largest ``|effect|``
    that are also among the k of largest ``|estimate|``); ``pearson`` (``stats.pearson``);
    ``ls_slope_origin`` (least-squares slope of effect on estimate through the origin,
    ``sum(xy) / sum(x^2)``, the fitted scale) and ``r2_origin`` (the fraction of ``sum(effect^2)`` it explains).
    """
    x = np.asarray(estimate, dtype=np.float64)
    y = np.asarray(effect, dtype=np.float64)
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    n = len(x)
    out = dict(n=n, spearman=float("nan"), sign_agreement=float("nan"), topk=0, topk_overlap=float("nan"),
               pearson=float("nan"), ls_slope_origin=float("nan"), r2_origin=float("nan"))
    if n == 0:
        return out
    nz = y != 0
    k = max(1, math.ceil(top_frac * n))
    top_y = set(np.argsort(-np.abs(y), kind="stable")[:k].tolist())
    top_x = set(np.argsort(-np.abs(x), kind="stable")[:k].tolist())
    sxx, syy = float((x * x).sum()), float((y * y).sum())
    slope = float((x * y).sum()) / sxx if sxx > 0 else float("nan")
    out.update(spearman=stats.spearman(x, y),
               sign_agreement=float((np.sign(x[nz]) == np.sign(y[nz])).mean()) if nz.any() else float("nan"),
               topk=k, topk_overlap=len(top_x & top_y) / k, pearson=stats.pearson(x, y), ls_slope_origin=slope,
               r2_origin=(1.0 - float(((y - slope * x) ** 2).sum()) / syy) if (syy > 0 and sxx > 0) else float("nan"))
    return out


def _gim_estimates(model, task: Task, groups: pd.DataFrame, settings: dict, gim_options: dict,
                   progress: bool) -> tuple:
    """TSG estimate of each group's joint score ablation with g = dm/dz from a GIM backward pass, and its
    per-key terms (``(joint [G], per_key [G] of tuples)``)."""

    backend = resolve_backend(model)
    layers = tuple(int(l) for l in settings.get("layers", range(backend.n_layers)))
    T = float(settings.get("temperature", 2.0))
    opts = dict(gim_options)
    opts.setdefault("temperature", T)
    dtype = getattr(torch, str(settings.get("dtype", "float32")))
    out = np.full(len(groups), np.nan)
    per_key = [tuple(float("nan") for _ in k) for k in groups["keys"]] if len(groups) else []
    if settings.get("score_ablation", "mean") != "mean" or len(groups) == 0:
        return out, per_key  # estimates are defined for finite (mean) ablations only
    f64 = torch.float64
    bs = settings.get("batch_size") or None
    for start, sub in tqdm(list(task.batches(bs)), disable=not progress, desc="GIM estimates"):
        rows = np.nonzero((groups["prompt"].to_numpy() >= start)
                          & (groups["prompt"].to_numpy() < start + len(sub)))[0]
        if len(rows) == 0:
            continue
        run = cached_run(model, sub, layers=layers, dtype=dtype, backend=backend, keep=("scores", "values"),
                         grad_context=lambda: gim(model, backend=backend, **opts))
        mean_mask = run.mask.clone()
        if settings.get("exclude_bos", False):
            mean_mask[:, :, 0] = False
        g_rows = groups.iloc[rows]
        for l in sorted(set(g_rows["layer"].tolist())):
            sel_l = rows[(g_rows["layer"] == l).to_numpy()]
            ks = np.array([len(k) for k in groups["keys"].iloc[sel_l]])
            for kk in sorted(set(ks.tolist())):  # k="auto" groups differ in size
                sel = sel_l[ks == kk]
                gr = groups.iloc[sel]
                bi = gr["prompt"].to_numpy(dtype=np.int64) - start
                qi = gr["query"].to_numpy(dtype=np.int64)
                a, v, g, mask = run.rows(bi, l, gr["head"].to_numpy(dtype=np.int64), qi)   # [R, n], [R, n, d], [R, d]
                keys = torch.as_tensor(np.array([list(k) for k in gr["keys"]], dtype=np.int64), device=a.device)
                c = torch.einsum("rnd,rd->rn", v.to(f64), g.to(f64))
                mm = mean_mask[torch.tensor(bi, device=a.device), torch.tensor(qi, device=a.device)]
                o = row_effects(a.to(f64), mask, c, keys, mm, ablation="mean", value_ablation="zero", temperature=T)
                out[sel] = o["tsg_estimate"].cpu().numpy()
                for r_i, t in zip(sel, o["tsg_estimates"].cpu().numpy()):
                    per_key[r_i] = tuple(float(x) for x in t)
    return out, per_key


def group_c_ratio(groups: pd.DataFrame) -> np.ndarray:
    """``c_ratio`` per group (``decomposition.c_ratio`` of ``c_j = w_j / p_j`` over S): the groups table's
    column when it has one, else computed from its ``contributions`` and ``p`` (NaN where a p_j is 0)."""
    if "c_ratio" in groups.columns:
        return groups["c_ratio"].to_numpy(dtype=np.float64)
    out = np.full(len(groups), np.nan)
    ks = np.array([len(k) for k in groups["keys"]]) if len(groups) else np.zeros(0, dtype=int)
    for kk in sorted(set(ks.tolist())):
        sel = np.nonzero(ks == kk)[0]
        w = np.array([list(t) for t in groups["contributions"].iloc[sel]], dtype=np.float64).reshape(len(sel), kk)
        p = np.array([list(t) for t in groups["p"].iloc[sel]], dtype=np.float64).reshape(len(sel), kk)
        with np.errstate(invalid="ignore", divide="ignore"):
            c = np.where(p > 0, w / np.where(p > 0, p, 1.0), np.nan)
        r = c_ratio(torch.from_numpy(c)).numpy()
        out[sel] = np.where(np.isnan(c).any(1), np.nan, r)
    return out


_KEY_SOURCES = {"grad_key": "grad_estimates", "tsg_key": "tsg_estimates", "gim_key": "gim_estimates",
                "w_j": "contributions", "individual": "effects", "shapley": "shapley"}
_GROUP_COLUMNS = ("prompt", "layer", "head", "query", "interaction", "self_repair", "c_ratio",
                  "value_similarity_out")


def key_table(groups: pd.DataFrame) -> pd.DataFrame:
    """One row per key of every group: ``group`` (row of ``groups``), ``key_rank`` (0 = largest w_j),
    ``key`` (position), the per-key estimates ``grad_key``, ``tsg_key`` (``grad_estimates`` /
    ``tsg_estimates``: key j ablated alone), ``gim_key`` (when ``groups`` has ``gim_estimates``), the
    baseline ``w_j`` (``contributions``), and the truths ``individual`` (``effects``, E_n) and ``shapley``;
    plus the group's ``prompt, layer, head, query, interaction, self_repair`` (and ``c_ratio``,
    ``value_similarity_out`` when present)."""
    if not len(groups):
        return pd.DataFrame(columns=["group", "key_rank", "key", *[c for c in _KEY_SOURCES]])
    ks = np.array([len(k) for k in groups["keys"]])
    idx = np.repeat(np.arange(len(groups)), ks)
    df = pd.DataFrame({"group": idx, "key_rank": np.concatenate([np.arange(k) for k in ks]),
                       "key": np.concatenate([np.asarray(k, dtype=np.int64) for k in groups["keys"]])})
    for name, src in _KEY_SOURCES.items():
        if src in groups.columns:
            df[name] = np.concatenate([np.asarray(t, dtype=np.float64) for t in groups[src]])
    for c in _GROUP_COLUMNS:
        if c in groups.columns:
            df[c] = groups[c].to_numpy()[idx]
    return df


def _splits(c_ratios: np.ndarray, vso, notes: list) -> tuple:
    """Masks of every split over the groups, and the value_similarity_out tertile cut points."""
    n = len(c_ratios)
    out = {"all": np.ones(n, dtype=bool), "redundant": c_ratios >= REDUNDANT_C_RATIO,
           "not_redundant": c_ratios < REDUNDANT_C_RATIO}
    cuts = None
    if vso is None:
        notes.append("no value_similarity_out column in the groups table: the value_similarity_out split is left out.")
    else:
        v = np.asarray(vso, dtype=np.float64)
        fin = np.isfinite(v)
        if fin.sum() >= 3:
            q1, q2 = np.quantile(v[fin], [1 / 3, 2 / 3])
            cuts = [float(q1), float(q2)]
            out["value_similarity_out_low"] = fin & (v < q1)
            out["value_similarity_out_mid"] = fin & (v >= q1) & (v < q2)
            out["value_similarity_out_high"] = fin & (v >= q2)
        else:
            notes.append("fewer than 3 groups with a finite value_similarity_out: its split is left out.")
    return out, cuts


def _by_levels(frame: pd.DataFrame, by):
    """(label columns, boolean mask) per level of the breakdown ``by``."""
    if by is None:
        yield {}, np.ones(len(frame), dtype=bool)
        return
    cols = ["layer"] if by == "layer" else ["layer", "head"]
    if not len(frame):
        return
    for vals, sub in frame.groupby(cols, sort=True):
        vals = vals if isinstance(vals, tuple) else (vals,)
        m = np.zeros(len(frame), dtype=bool)
        m[frame.index.get_indexer(sub.index)] = True
        yield {c: int(v) for c, v in zip(cols, vals)}, m


def compare_estimates(model, task: Task, result, *, top_frac: float = 0.1, by=None, n_boot: int = 1000,
                      seed: int = 0, level: float = 0.95, progress: bool = True,
                      **gim_options) -> EstimateComparison:
    """Add GIM estimates to a self-repair result and report how every estimate tracks measured effects.

    ``gim_estimate`` is the TSG estimate of each group's joint score ablation
    (docs/quantities.md, "Gradient estimates") with ``g`` from a GIM backward pass
    (``gim(model, **gim_options)``; its temperature defaults to the result's),
    same groups, keys, ablation and temperature as ``result``; ``gim_estimates`` its per-key terms.

    ``report`` rows (docs/quantities.md, "Estimates per key"), ``level``:

    - ``"group"``: each estimate (``grad_estimate``, ``tsg_estimate``, ``gim_estimate`` and the
      no-gradient baseline ``contribution_sum = sum_S w_j``) against each effect (``"global"`` =
      ``global_effect_joint``, the real forward pass; ``"local"`` = ``effect_joint``);
    - ``"key"``: each per-key estimate (``grad_key``, ``tsg_key``, ``gim_key`` and the baseline ``w_j``)
      against ``"individual"`` (E_n, key j ablated alone) and ``"shapley"`` (j's Shapley value in S);

    each for every ``subset`` (``"all"``, ``"self_repairing"``, ``"not_self_repairing"`` = a defined
    ratio not above the threshold) crossed with every ``split`` of the groups: ``"all"``,
    ``"redundant"`` (``c_ratio >= 0.5``) and ``"not_redundant"`` (``c_ratio < 0.5``; c_ratio from the
    groups table, else from ``contributions / p``), and the tertiles of ``value_similarity_out``
    (``"value_similarity_out_low"`` / ``_mid`` / ``_high``; cut points in ``settings``; left out with a
    note when the column is absent). ``by="layer"`` or ``"head"`` adds one row per layer (per layer and
    head) with those columns. Statistics: ``agreement``'s (Spearman, sign agreement, top-k overlap,
    Pearson, slope through the origin), ``n`` the pairs compared, ``n_prompts``, and ``spearman_lo``,
    ``spearman_hi``: a cluster-bootstrap ``level`` interval over prompts (``stats.spearman_interval``,
    ``n_boot`` draws seeded by ``seed``). Rows with ``n < MIN_N`` (10) carry ``warning`` and one Python
    warning counts them. Without global effects the "global" rows are left out and ``notes`` says so;
    under ``"knockout"`` every gradient estimate is NaN (``n = 0``).
    """

    validate_task(task, model)
    if not isinstance(result, SelfRepairResult):
        raise TypeError(f"result must be a SelfRepairResult from analyze_self_repair; got {type(result).__name__}.")
    meta = result.meta or {}
    if meta.get("task_hash") not in (None, task_hash(task)):
        raise ValueError("result was computed on a different task (task hash differs); pass the same task.")
    if meta.get("model_hash") not in (None, model_hash(model)):
        raise ValueError("result was computed with a different model (weights hash differs); pass the same model.")
    if not 0 < top_frac <= 1:
        raise ValueError(f"top_frac must lie in (0, 1]; got {top_frac}.")
    if by not in BY:
        raise ValueError(f"unknown by={by!r}; valid: None, 'layer', 'head'.")
    if int(n_boot) < 1:
        raise ValueError(f"n_boot must be at least 1 (got {n_boot}).")
    groups = result.groups.copy()
    groups["gim_estimate"], groups["gim_estimates"] = _gim_estimates(model, task, groups, result.settings,
                                                                     gim_options, progress)
    report, notes, keys, cuts = estimate_report(groups, result.settings, top_frac=top_frac, by=by, n_boot=n_boot,
                                                seed=seed, level=level, stacklevel=3)
    settings = dict(top_frac=top_frac, by=by, n_boot=int(n_boot), seed=int(seed), level=float(level),
                    redundant_c_ratio=REDUNDANT_C_RATIO, value_similarity_out_tertiles=cuts,
                    gim_options=dict(gim_options), result_settings=dict(result.settings))
    return EstimateComparison(groups=groups, report=report, notes=notes, settings=settings, keys=keys)


def estimate_report(groups: pd.DataFrame, result_settings: dict, *, top_frac: float = 0.1, by=None,
                    n_boot: int = 1000, seed: int = 0, level: float = 0.95, stacklevel: int = 2) -> tuple:
    """``(report, notes, keys, cuts)`` of :func:`compare_estimates` from groups that already hold
    ``gim_estimate`` and ``gim_estimates`` (adds ``contribution_sum`` and, when missing, ``c_ratio`` to
    ``groups`` in place); the merge of a sharded run (``selfrepair.study.distributed``) calls it on the
    shards' groups put together, so a sharded report equals a one-process one."""
    notes = []
    groups["contribution_sum"] = np.array([float(np.sum(t)) for t in groups["contributions"]], dtype=np.float64)
    if "c_ratio" not in groups.columns:
        groups["c_ratio"] = group_c_ratio(groups)
    if result_settings.get("score_ablation", "mean") != "mean":
        notes.append(f"score_ablation={result_settings.get('score_ablation')!r}: gradient estimates are defined for finite "
                     "(mean) ablations only; every gradient estimate is NaN.")
    truths = dict(TRUTHS)
    if "global_effect_joint" not in groups.columns:
        truths.pop("global")
        notes.append("no global effects in the result (run analyze_self_repair(..., global_effects=True)); "
                     "only local effects are compared.")
    keys = key_table(groups)
    sr = groups["self_repair"].to_numpy(dtype=bool)
    defined = groups["interaction"].notna().to_numpy()
    subsets = {"all": np.ones(len(groups), dtype=bool), "self_repairing": sr, "not_self_repairing": defined & ~sr}
    splits, cuts = _splits(groups["c_ratio"].to_numpy(dtype=np.float64),
                           groups["value_similarity_out"] if "value_similarity_out" in groups.columns else None, notes)
    levels = [("group", groups, ESTIMATES, truths, np.arange(len(groups))),
              ("key", keys, KEY_ESTIMATES, dict(KEY_TRUTHS), keys["group"].to_numpy(dtype=np.int64))]
    recs = []
    for lvl, frame, ests, tr, gidx in levels:
        prompts = frame["prompt"].to_numpy(dtype=np.int64) if len(frame) else np.zeros(0, dtype=np.int64)
        for labels, bm in _by_levels(frame, by):
            for est in ests:
                x_all = frame[est].to_numpy(dtype=np.float64) if est in frame.columns else np.full(len(frame), np.nan)
                for tname, tcol in tr.items():
                    y_all = frame[tcol].to_numpy(dtype=np.float64)
                    for sname in SUBSETS:
                        for spname, spm in splits.items():
                            m = bm & subsets[sname][gidx] & spm[gidx]
                            x, y, cl = x_all[m], y_all[m], prompts[m]
                            a = agreement(x, y, top_frac=top_frac)
                            ok = np.isfinite(x) & np.isfinite(y)
                            _, lo, hi = stats.spearman_interval(x, y, cl, n_boot=n_boot, seed=seed, level=level)
                            recs.append(dict(level=lvl, estimate=est, effect=tname, subset=sname, split=spname,
                                             **labels, **a, spearman_lo=lo, spearman_hi=hi,
                                             n_prompts=int(len(np.unique(cl[ok]))),
                                             warning=f"n < {MIN_N}: unreliable" if a["n"] < MIN_N else ""))
    report = pd.DataFrame(recs)
    n_small = int((report["n"] < MIN_N).sum()) if len(report) else 0
    if n_small:
        msg = (f"{n_small} of {len(report)} comparison rows rest on fewer than {MIN_N} pairs (see their 'warning' "
               "column); read their statistics as unreliable.")
        notes.append(msg)
        warnings.warn(msg, stacklevel=stacklevel)
    return report, notes, keys, cuts
