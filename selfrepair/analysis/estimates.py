"""How gradient estimates (grad, TSG, GIM) of a self-repair result track its measured effects."""

from __future__ import annotations

import math
import os
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
from .gim import gim
from .identity import model_hash, task_hash
from .records import read_frames, write_frames
from .results import SelfRepairResult
from .rows import row_effects

__all__ = ["compare_estimates", "estimate_report", "EstimateComparison", "agreement", "ESTIMATES", "TRUTHS", "SUBSETS"]


ESTIMATES = ("grad_estimate", "tsg_estimate", "gim_estimate")
TRUTHS = {"global": "global_effect_joint", "local": "effect_joint"}
SUBSETS = ("all", "self_repairing", "not_self_repairing")


@dataclass
class EstimateComparison:
    """Result of ``compare_estimates``.

    ``groups``: a copy of ``result.groups`` plus ``gim_estimate``; ``report``: one
    row per (estimate, effect, subset) with the agreement statistics; ``notes``:
    what could not be compared and why (e.g. no global effects in the result).
    """

    groups: pd.DataFrame
    report: pd.DataFrame
    notes: list
    settings: dict = field(default_factory=dict)

    KIND = "estimate_comparison"

    def to_frame(self) -> pd.DataFrame:
        """The report table (one row per estimate, effect and subset); ``groups`` holds the per-group estimates."""
        return self.report.copy()

    def save(self, path: Union[str, os.PathLike]) -> Path:
        """One Parquet file with both tables; notes and settings in its footer."""
        return write_frames(path, {"groups": self.groups, "report": self.report},
                            {"kind": self.KIND, "settings": self.settings, "notes": list(self.notes)})

    @classmethod
    def load(cls, path: Union[str, os.PathLike]) -> "EstimateComparison":
        """The comparison ``save`` wrote (equal tables, notes and settings)."""
        frames, info = read_frames(path, cls.KIND)
        return cls(frames["groups"], frames["report"], info.get("notes", []), info.get("settings", {}))


def _spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman rank correlation: Pearson correlation of average ranks (ties share their mean rank)."""
    if len(x) < 2:
        return float("nan")
    rx = pd.Series(x).rank(method="average").to_numpy()
    ry = pd.Series(y).rank(method="average").to_numpy()
    return _pearson(rx, ry)


def _pearson(x: np.ndarray, y: np.ndarray) -> float:
    if len(x) < 2:
        return float("nan")
    x, y = x - x.mean(), y - y.mean()
    den = math.sqrt(float((x * x).sum()) * float((y * y).sum()))
    return float((x * y).sum()) / den if den > 0 else float("nan")


def agreement(estimate, effect, *, top_frac: float = 0.1) -> dict:
    """How an (uncalibrated) estimate tracks a measured effect, rows where both are finite.

    ``spearman``; ``sign_agreement`` (share of rows with a non-zero effect whose
    estimate has the same sign); ``topk_overlap`` (share of the ``k = max(1,
    ceil(top_frac * n))`` rows of largest ``|effect|`` that are also among the k
    of largest ``|estimate|``); ``pearson``; ``ls_slope_origin`` (least-squares
    slope of effect on estimate through the origin, ``sum(xy) / sum(x^2)``, the
    fitted scale) and ``r2_origin`` (the fraction of ``sum(effect^2)`` it explains).
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
    out.update(spearman=_spearman(x, y),
               sign_agreement=float((np.sign(x[nz]) == np.sign(y[nz])).mean()) if nz.any() else float("nan"),
               topk=k, topk_overlap=len(top_x & top_y) / k, pearson=_pearson(x, y), ls_slope_origin=slope,
               r2_origin=(1.0 - float(((y - slope * x) ** 2).sum()) / syy) if (syy > 0 and sxx > 0) else float("nan"))
    return out


def _gim_estimates(model, task: Task, groups: pd.DataFrame, settings: dict, gim_options: dict,
                   progress: bool) -> np.ndarray:
    """TSG estimate of each group's joint score ablation with g = dm/dz from a GIM backward pass."""

    backend = resolve_backend(model)
    layers = tuple(int(l) for l in settings.get("layers", range(backend.n_layers)))
    T = float(settings.get("temperature", 2.0))
    opts = dict(gim_options)
    opts.setdefault("temperature", T)
    dtype = getattr(torch, str(settings.get("dtype", "float32")))
    out = np.full(len(groups), np.nan)
    if settings.get("ablation", "mean") != "mean" or len(groups) == 0:
        return out  # estimates are defined for finite (mean) ablations only
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
        size = np.array([len(k) for k in g_rows["keys"]], dtype=np.int64)     # k="auto": groups of several sizes
        for l, kk in sorted(set(zip(g_rows["layer"].tolist(), size.tolist()))):
            sel = rows[((g_rows["layer"] == l).to_numpy()) & (size == kk)]
            gr = groups.iloc[sel]
            bi = gr["prompt"].to_numpy(dtype=np.int64) - start
            qi = gr["query"].to_numpy(dtype=np.int64)
            a, v, g, mask = run.rows(bi, l, gr["head"].to_numpy(dtype=np.int64), qi)   # [R, n], [R, n, d], [R, d]
            keys = torch.as_tensor(np.array([list(k) for k in gr["keys"]], dtype=np.int64), device=a.device)
            c = torch.einsum("rnd,rd->rn", v.to(f64), g.to(f64))
            mm = mean_mask[torch.tensor(bi, device=a.device), torch.tensor(qi, device=a.device)]
            o = row_effects(a.to(f64), mask, c, keys, mm, ablation="mean", value_ablation="zero", temperature=T)
            out[sel] = o["tsg_estimate"].cpu().numpy()
    return out


def compare_estimates(model, task: Task, result, *, top_frac: float = 0.1, progress: bool = True,
                      **gim_options) -> EstimateComparison:
    """Add ``gim_estimate`` to a self-repair result and report how the estimates track measured effects.

    ``gim_estimate`` is the TSG estimate of each group's joint score ablation
    (docs/quantities.md, "Gradient estimates") with ``g`` from a GIM backward pass
    (``gim(model, **gim_options)``; its temperature defaults to the result's),
    same groups, keys, ablation and temperature as ``result``.

    ``report``: for each estimate (``grad_estimate``, ``tsg_estimate``,
    ``gim_estimate``), each effect (``"global"`` = ``global_effect_joint``, the
    real forward pass; ``"local"`` = ``effect_joint``, the softmax part alone)
    and each subset (``"all"``, ``"self_repairing"`` = ``self_repair``,
    ``"not_self_repairing"`` = a defined ratio not above the threshold) the
    statistics of ``agreement`` (Spearman, sign agreement and top-k overlap
    first; Pearson and the least-squares slope through the origin after).
    Without global effects in the result the "global" rows are left out and
    ``notes`` says so; under ``"knockout"`` every estimate is NaN (``n = 0``).
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
    groups = result.groups.copy()
    groups["gim_estimate"] = _gim_estimates(model, task, groups, result.settings, gim_options, progress)
    report, notes = estimate_report(groups, result.settings, top_frac=top_frac)
    settings = dict(top_frac=top_frac, gim_options=dict(gim_options), result_settings=dict(result.settings))
    return EstimateComparison(groups=groups, report=report, notes=notes, settings=settings)


def estimate_report(groups: pd.DataFrame, result_settings: dict, *, top_frac: float = 0.1) -> tuple:
    """``(report, notes)`` of ``compare_estimates`` from groups that already hold ``gim_estimate`` (one row
    per estimate, effect and subset with the statistics of ``agreement``); the merge of a sharded run
    (``selfrepair.study.distributed``) calls it on the shards' groups put together."""
    notes = []
    if result_settings.get("ablation", "mean") != "mean":
        notes.append(f"ablation={result_settings.get('ablation')!r}: gradient estimates are defined for finite "
                     "(mean) ablations only; every estimate is NaN.")
    truths = dict(TRUTHS)
    if "global_effect_joint" not in groups.columns:
        truths.pop("global")
        notes.append("no global effects in the result (run analyze_self_repair(..., global_effects=True)); "
                     "only local effects are compared.")
    sr = groups["self_repair"].to_numpy(dtype=bool)
    defined = groups["interaction"].notna().to_numpy()
    subsets = {"all": np.ones(len(groups), dtype=bool), "self_repairing": sr, "not_self_repairing": defined & ~sr}
    recs = []
    for est in ESTIMATES:
        for tname, tcol in truths.items():
            for sname in SUBSETS:
                m = subsets[sname]
                recs.append(dict(estimate=est, effect=tname, subset=sname,
                                 **agreement(groups[est].to_numpy()[m], groups[tcol].to_numpy()[m], top_frac=top_frac)))
    return pd.DataFrame(recs), notes
