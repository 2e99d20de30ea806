"""Softmax-redistribution self-repair: individual versus joint ablations of attention keys.

SPEC sections "Local effects", "Individual versus joint", "Global effects" and
"Gradient estimates". For a head (l, h), a query i and the k keys S of largest
contribution ``w_j = p_j c_j`` (``c_j = g . v_j``, ``g = dm/dz_i``):

- local effect of a changed pattern row: ``E(p') = sum_j (p_j - p'_j) c_j``
  (positive = the ablation lowers the metric); individual ``E_n = E({j_n})``,
  joint ``E_S``, interaction ``r = (E_S - sum_n E_n) / E_S`` (NaN when
  ``|E_S| < max(min_effect, 0.01 sum_S |w_j|)``), ``self_repair = r > threshold``;
- score ablation ``"mean"`` (``a'_j`` = the mean unmasked score of the original
  row) or ``"knockout"`` (``a'_j = -inf``); value ablation ``"zero"``/``"mean"``;
- exact Shapley values within S from the ``2^k`` local subset effects;
- gradient estimates (plain and TSG, temperature T) of the joint score ablation;
- global effects (``global_effects=True``): the same ablations in real forward
  passes (``selfrepair.ablation``), ``m(clean) - m(ablated)``.

Local effects are computed in closed form from ONE cached forward and backward
pass per batch (``selfrepair.cache``): no forward pass per ablation or subset.
All rows of a batch are processed at once, subsets as bitmasks, in float64
(the cached activations are float32 by default, ``dtype=`` for float64).

Columns of ``SelfRepairResult.groups`` (one row per analysed (prompt, layer, head, query); tuples are
per key of S, largest contribution first):

- ``prompt`` (index in the task), ``layer``, ``head``, ``query`` (position i);
- ``keys`` S (ties to the lower position), ``contributions`` ``w_j``, ``p`` ``p_j``, ``scores`` ``a_j``
  (``log p_j`` on backends whose score site is the pattern: shifted by a row constant), ``mass``
  ``sum_S p_j``, ``n_keys`` unmasked keys of the row, ``head_contribution`` ``g . z_i = sum_j w_j``,
  ``metric`` ``m(clean)`` of the prompt;
- ``effects`` ``E_n``, ``effect_sum``, ``effect_joint`` ``E_S``, ``interaction`` r, ``interaction_sym``,
  ``self_repair`` (r > threshold; False where r is NaN), ``shapley`` (sums to ``E_S``);
- ``value_similarity`` (mean pairwise cosine of the keys' value vectors), ``value_effects``,
  ``value_effect_joint``, ``value_interaction`` (0 up to rounding: value ablations do not renormalise);
- ``grad_estimate``, ``tsg_estimate`` (joint score ablation; NaN under knockout) and the per-key terms
  ``grad_estimates``, ``tsg_estimates`` (the estimates are linear, so they sum to the joint one);
- with ``global_effects=True``: ``global_effects`` ``G_n``, ``global_effect_joint`` ``G_S``,
  ``global_effect_sum``, ``global_interaction`` (same NaN floor as r, with the same ``w``),
  ``downstream_gap = (G_S - sum G_n) - (E_S - sum E_n)``.

Decisions where SPEC is silent (documented, tested):
- queries analysed: every real position ``i <= `` the prompt's metric position
  (later positions cannot influence ``m``; their ``g`` is exactly 0);
- ``exclude_bos=True`` drops key 0 from selection, from the score mean and from
  the value mean (``value_ablation="mean"``); key 0 stays in the row otherwise
  (it keeps its score and is renormalised like any other key, and it counts
  towards the "more than k unmasked keys" knockout condition);
- ``interaction_sym`` is reported for every row (NaN only when its denominator
  is 0); summary medians use rows with a defined ``interaction`` only;
- the summary's bootstrap resamples prompts (rows of one prompt are not
  independent); ``cluster="group"`` resamples rows instead.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Union

import numpy as np
import pandas as pd
import torch

from ._io import atomic_write
from ._devices import model_dtype
from ._typing import Bool, Float, Int, Tensor
from .cache import cached_run, check_backend
from .tasks import Task

__all__ = ["analyze_self_repair", "SelfRepairResult", "local_effects", "select_keys", "interaction_ratio",
           "ABLATIONS", "VALUE_ABLATIONS",
           "SELECT_MODES", "MAX_K"]

ABLATIONS = ("mean", "knockout")
VALUE_ABLATIONS = ("zero", "mean")
SELECT_MODES = ("positive", "abs")
MAX_K = 8
RESULT_FORMAT = 1

# column -> element type for tuple-valued columns (one entry per key of the group, largest contribution first)
TUPLE_COLUMNS = {
    "keys": "int", "contributions": "float", "effects": "float", "shapley": "float", "value_effects": "float",
    "grad_estimates": "float", "tsg_estimates": "float", "p": "float", "scores": "float",
    "global_effects": "float",
}
INT_COLUMNS = ("prompt", "layer", "head", "query", "n_keys")
BOOL_COLUMNS = ("self_repair",)
BASE_COLUMNS = [
    "prompt", "layer", "head", "query", "keys", "contributions", "effects", "effect_sum", "effect_joint",
    "interaction", "interaction_sym", "self_repair", "shapley", "value_similarity", "value_effects",
    "value_effect_joint", "value_interaction", "grad_estimate", "tsg_estimate", "grad_estimates", "tsg_estimates",
    "p", "scores", "mass", "n_keys", "head_contribution", "metric",
]
GLOBAL_COLUMNS = ["global_effects", "global_effect_joint", "global_effect_sum", "global_interaction",
                  "downstream_gap"]


# =========================================================================== closed-form row arithmetic


def _subset_bits(k: int, device=None) -> Bool[Tensor, "subsets k"]:
    """Row ``s`` of the result is subset ``s`` as a bitmask: key ``n`` is in it iff bit ``n`` of ``s`` is set."""
    s = torch.arange(2 ** k, device=device)
    return ((s[:, None] >> torch.arange(k, device=device)) & 1).bool()


def _shapley_matrix(k: int, dtype=torch.float64, device=None) -> Float[Tensor, "subsets k"]:
    """``phi = E_subsets @ M``: ``phi_n = sum_{S not n} |S|!(k-|S|-1)!/k! (E(S+n) - E(S))``."""
    bits = _subset_bits(k, device)
    size = bits.sum(1)
    wt = torch.tensor([math.factorial(s) * math.factorial(k - s - 1) / math.factorial(k) for s in range(k)],
                      dtype=dtype, device=device)
    # subset T containing n contributes +w(|T|-1) E(T); subset S without n contributes -w(|S|) E(S)
    plus = torch.where(bits, wt[(size - 1).clamp_min(0)][:, None], torch.zeros((), dtype=dtype, device=device))
    minus = torch.where(~bits, wt[size.clamp_max(k - 1)][:, None], torch.zeros((), dtype=dtype, device=device))
    return plus - minus


def _row_effects(
    a: Float[Tensor, "R n"],
    mask: Bool[Tensor, "R n"],
    c: Float[Tensor, "R n"],
    keys: Int[Tensor, "R k"],
    mean_mask: Bool[Tensor, "R n"],
    *,
    ablation: str,
    value_ablation: str,
    temperature: float,
    v_keys: Optional[Float[Tensor, "R k d"]] = None,
    v_rest: Optional[Float[Tensor, "R d"]] = None,
) -> Dict[str, Tensor]:
    """Local effects of every subset of ``keys`` for R rows, in closed form (float64 in, float64 out).

    ``a`` scores (any value at masked keys), ``mask`` unmasked keys, ``c = g . v``,
    ``mean_mask`` the keys entering the score/value means. The softmax is exact and
    computed in log space: for an ablated set S with new log-normaliser ``lse'``,
    every kept key changes by ``p_j - p'_j = rho p_j`` with ``rho = -expm1(lse - lse')``,
    the ablated keys by ``p_j - exp(a'_j - lse')``.
    With ``v_keys`` and ``v_rest`` (the softmax-over-the-rest weighted value) also the
    z edits ``z' - z`` of the individual and joint ablations (for global effects).
    """
    R, n = a.shape
    k = keys.shape[1]
    dt, dev = a.dtype, a.device
    ninf = torch.tensor(float("-inf"), dtype=dt, device=dev)
    am = torch.where(mask, a, ninf)
    aK = am.gather(1, keys)                                               # [R, k]
    cK = c.gather(1, keys)
    inK = torch.zeros_like(mask).scatter_(1, keys, True)
    rest = mask & ~inK
    has_rest = rest.any(1)
    a_rest = torch.where(rest, a, ninf)
    L_rest = torch.logsumexp(a_rest, 1)                                   # [R], -inf without a rest
    s_rest = torch.softmax(torch.where(has_rest[:, None], a_rest, torch.zeros((), dtype=dt, device=dev)), 1)
    cbar_rest = torch.where(has_rest, (s_rest * torch.where(rest, c, torch.zeros((), dtype=dt, device=dev))).sum(1),
                            torch.zeros((), dtype=dt, device=dev))
    cnt = mean_mask.sum(1).to(dt)
    abar = torch.where(mean_mask, a, torch.zeros((), dtype=dt, device=dev)).sum(1) / cnt   # mean score
    cbar = torch.where(mean_mask, c, torch.zeros((), dtype=dt, device=dev)).sum(1) / cnt   # mean of g . v

    bits = _subset_bits(k, dev)                                           # [B, k]
    B = bits.shape[0]
    nS = bits.sum(1).to(dt)                                               # [B]
    kept = torch.where(bits[None], ninf, aK[:, None, :])                  # [R, B, k]
    if ablation == "mean":
        abl = torch.where(nS[None] > 0, abar[:, None] + torch.log(nS.clamp_min(1))[None], ninf)  # [R, B]
    else:
        abl = ninf.expand(R, B)
    terms = torch.cat([L_rest[:, None, None].expand(R, B, 1), kept, abl[..., None]], 2)
    lse2 = torch.logsumexp(terms, 2)                                      # [R, B]
    lse = lse2[:, :1]                                                     # S = {} : the original normaliser
    pK = torch.exp(aK - lse)                                              # [R, k]
    wK = pK * cK
    x = lse - lse2                                                        # rho = -expm1(x)
    pos = x > 0
    # log|rho|: x > 0: log(e^x - 1) = x + log(1 - e^-x); x < 0: log(1 - e^x); x = 0: -inf (no change)
    log_abs_rho = torch.log(-torch.expm1(-x.abs())) + x.clamp_min(0)
    sign = torch.where(pos, -torch.ones((), dtype=dt, device=dev), torch.ones((), dtype=dt, device=dev))
    # kept keys: sum_j (p_j - p'_j) c_j = sign * sum_j exp(a_j - lse + log|rho|) c_j
    t_rest = torch.where(has_rest[:, None], torch.exp(L_rest[:, None] - lse + log_abs_rho) * cbar_rest[:, None],
                         torch.zeros((), dtype=dt, device=dev))
    fac_K = torch.exp(aK[:, None, :] - lse[:, :, None] + log_abs_rho[..., None])       # [R, B, k] = |p_j - p'_j|
    fac_K = torch.where(bits[None], torch.zeros((), dtype=dt, device=dev), fac_K)
    E = sign * (t_rest + (fac_K * cK[:, None, :]).sum(2))
    bitsf = bits.to(dt)
    if ablation == "mean":
        p_new = torch.exp(abar[:, None] - lse2)                            # new p of each ablated key
        dpK = torch.where(bits[None], pK[:, None, :] - p_new[..., None], torch.zeros((), dtype=dt, device=dev))
    else:
        p_new = torch.zeros_like(lse2)
        dpK = pK[:, None, :] * bitsf[None]
    E = E + (dpK * cK[:, None, :]).sum(2)                                 # [R, B]
    E[:, 0] = 0.0

    out: Dict[str, Tensor] = {}
    single = 2 ** torch.arange(k, device=dev)
    out["subset_effects"] = E
    out["effects"] = E[:, single]
    out["effect_joint"] = E[:, B - 1]
    out["shapley"] = E @ _shapley_matrix(k, dt, dev)
    out["contributions"] = wK
    out["p"] = pK
    out["scores"] = aK
    out["mass"] = pK.sum(1)
    out["n_keys"] = mask.sum(1)
    p_all = torch.exp(am - lse)
    zg = (p_all * torch.where(mask, c, torch.zeros((), dtype=dt, device=dev))).sum(1)   # g . z_i
    out["head_contribution"] = zg

    # gradient estimates of the score ablation (SPEC "Gradient estimates"); NaN under knockout
    if ablation == "mean":
        da = abar[:, None] - aK                                           # a'_j - a_j
        dmda = pK * (cK - zg[:, None])
        s = torch.softmax(am / temperature, 1)
        sc = (s * torch.where(mask, c, torch.zeros((), dtype=dt, device=dev))).sum(1)
        d_tsg = s.gather(1, keys) * (cK - sc[:, None])
        out["grad_estimates"] = -dmda * da
        out["tsg_estimates"] = -d_tsg * da
    else:
        nan = torch.full((R, k), float("nan"), dtype=dt, device=dev)
        out["grad_estimates"], out["tsg_estimates"] = nan, nan.clone()
    out["grad_estimate"] = out["grad_estimates"].sum(1)
    out["tsg_estimate"] = out["tsg_estimates"].sum(1)

    # value ablations: E_v(S) = sum_{j in S} p_j (v_j - v'_j) . g, no renormalisation
    c_prime = torch.zeros_like(cbar) if value_ablation == "zero" else cbar
    out["value_effects"] = pK * (cK - c_prime[:, None])
    # the joint one from the ablated head output: g . z - g . z'  with z' = z - sum_S p_j (v_j - v')
    zg_v = zg - (wK.sum(1) - pK.sum(1) * c_prime)
    out["value_effect_joint"] = zg - zg_v
    out["value_interaction"] = out["value_effect_joint"] - out["value_effects"].sum(1)

    if v_keys is not None:
        vn = v_keys / v_keys.norm(dim=2, keepdim=True)
        cos = vn @ vn.transpose(1, 2)
        iu = torch.triu_indices(k, k, 1, device=dev)
        out["value_similarity"] = cos[:, iu[0], iu[1]].mean(1)
    if v_keys is not None and v_rest is not None:
        # z' - z = -(sum_j (p_j - p'_j) v_j) for the individual and joint ablations
        which = torch.cat([single, torch.tensor([B - 1], device=dev)])
        sg = sign[:, which]                                               # [R, k+1]
        rest_fac = torch.where(has_rest[:, None], torch.exp(L_rest[:, None] - lse + log_abs_rho[:, which]),
                               torch.zeros((), dtype=dt, device=dev))     # [R, k+1]
        d_kept = sg[..., None] * (rest_fac[..., None] * v_rest[:, None, :]
                                  + torch.einsum("rsk,rkd->rsd", fac_K[:, which], v_keys))
        d_abl = torch.einsum("rsk,rkd->rsd", dpK[:, which], v_keys)
        out["z_deltas"] = -(d_kept + d_abl)                               # [R, k+1, d]
    return out


def local_effects(
    scores: Float[Tensor, "R n"],
    values: Float[Tensor, "R n d_head"],
    grad: Float[Tensor, "R d_head"],
    mask: Bool[Tensor, "R n"],
    keys: Int[Tensor, "R k"],
    *,
    ablation: str = "mean",
    value_ablation: str = "zero",
    exclude_bos: bool = False,
    temperature: float = 2.0,
) -> Dict[str, Tensor]:
    """Closed-form local effects for hand-built rows (one head, one query each), float64.

    ``scores`` a (masked entries may hold anything), ``values`` v_j, ``grad`` g = dm/dz_i,
    ``mask`` unmasked keys, ``keys`` the group S per row (its order is kept). Returns
    tensors keyed like the columns of ``SelfRepairResult.groups`` (``effects``,
    ``effect_joint``, ``shapley``, ``value_effects``, ``grad_estimate``, ...), plus
    ``subset_effects`` [R, 2^k] (subset ``s`` = the keys whose bit is set in ``s``) and
    ``z_deltas`` [R, k+1, d] (z' - z of the individual ablations, then the joint one).
    """
    _check_mode("ablation", ablation, ABLATIONS)
    _check_mode("value_ablation", value_ablation, VALUE_ABLATIONS)
    dt = torch.float64
    a = torch.as_tensor(scores).to(dt)
    v = torch.as_tensor(values).to(dt)
    g = torch.as_tensor(grad).to(dt)
    mask = torch.as_tensor(mask).bool()
    keys = torch.as_tensor(keys).long()
    if a.ndim == 1:
        a, v, g, mask, keys = a[None], v[None], g[None], mask[None], keys[None]
    if not bool(mask.gather(1, keys).all()):
        raise ValueError("every key of a group must be unmasked.")
    if keys.shape[1] > 1 and bool((keys.sort(1).values.diff(dim=1) == 0).any()):
        raise ValueError("the keys of a group must be distinct.")
    mean_mask = mask.clone()
    if exclude_bos:
        mean_mask[:, 0] = False
    c = torch.einsum("rnd,rd->rn", v, g)
    vK = v.gather(1, keys[..., None].expand(-1, -1, v.shape[2]))
    ninf = torch.tensor(float("-inf"), dtype=dt)
    rest = mask.clone().scatter_(1, keys, False)
    s_rest = torch.softmax(torch.where(rest, a, ninf), 1).nan_to_num(0.0)
    v_rest = torch.einsum("rn,rnd->rd", s_rest, v)
    return _row_effects(a, mask, c, keys, mean_mask, ablation=ablation, value_ablation=value_ablation,
                        temperature=temperature, v_keys=vK, v_rest=v_rest)


# =========================================================================== result object


def _bootstrap_fraction(flag: np.ndarray, defined: np.ndarray, cluster: np.ndarray, *, n_boot: int, seed: int,
                        thresholds_flags: Optional[np.ndarray] = None):
    """Fraction ``sum flag / sum defined`` with a percentile bootstrap 95% interval.

    ``cluster`` ids are resampled with replacement (prompts by default). With
    ``thresholds_flags`` [T, rows] the same resamples serve every threshold.
    """
    flags = flag[None] if thresholds_flags is None else thresholds_flags
    ids, inv = np.unique(cluster, return_inverse=True)
    C = len(ids)
    d_c = np.bincount(inv, weights=defined.astype(float), minlength=C)
    f_c = np.stack([np.bincount(inv, weights=(f & defined).astype(float), minlength=C) for f in flags])  # [T, C]
    tot = d_c.sum()
    frac = f_c.sum(1) / tot if tot > 0 else np.full(len(flags), np.nan)
    if C == 0 or tot == 0:
        nanv = np.full(len(flags), np.nan)
        return frac, nanv, nanv
    rng = np.random.default_rng(seed)
    draws = rng.multinomial(C, np.full(C, 1.0 / C), size=n_boot).astype(float)   # [n_boot, C]
    den = draws @ d_c
    with np.errstate(invalid="ignore", divide="ignore"):
        boots = (draws @ f_c.T) / den[:, None]                              # [n_boot, T]
    lo = np.nanpercentile(boots, 2.5, axis=0)
    hi = np.nanpercentile(boots, 97.5, axis=0)
    return frac, lo, hi


@dataclass
class SelfRepairResult:
    """``groups``: one row per analysed (prompt, layer, head, query); ``settings``; ``meta``."""

    groups: pd.DataFrame
    settings: dict = field(default_factory=dict)
    meta: dict = field(default_factory=dict)

    def __repr__(self) -> str:
        g = self.groups
        n_def = int(g["interaction"].notna().sum()) if len(g) else 0
        n_sr = int(g["self_repair"].sum()) if len(g) else 0
        return (f"SelfRepairResult({len(g)} groups, {n_def} with a defined ratio, {n_sr} self-repairing at "
                f"threshold {self.settings.get('threshold')}; model {self.meta.get('model_name')!r}, "
                f"task {self.meta.get('task_name')!r}, k={self.settings.get('k')}, "
                f"ablation={self.settings.get('ablation')!r})")

    # ---------------------------------------------------------------- tables

    def summary(self, *, n_boot: int = 2000, seed: int = 0, cluster: str = "prompt") -> pd.DataFrame:
        """Per layer x head: rows, defined ratios, NaN count, fraction self-repairing (over defined rows)
        with a bootstrap 95% interval, median interaction / interaction_sym (defined rows) and the median
        value similarity of self-repairing and of other defined groups."""
        _check_mode("cluster", cluster, ("prompt", "group"))
        g = self.groups
        pairs = [(l, h) for l in self.settings.get("layers", sorted(g["layer"].unique()))
                 for h in self.settings.get("heads", sorted(g["head"].unique()))]
        rows = []
        for l, h in pairs:
            s = g[(g["layer"] == l) & (g["head"] == h)]
            defined = s["interaction"].notna().to_numpy()
            flag = s["self_repair"].to_numpy(dtype=bool)
            cl = s["prompt"].to_numpy() if cluster == "prompt" else np.arange(len(s))
            frac, lo, hi = _bootstrap_fraction(flag, defined, cl, n_boot=n_boot, seed=seed)
            sd = s[defined]
            rows.append(dict(
                layer=l, head=h, n_groups=len(s), n_defined=int(defined.sum()), n_nan=int((~defined).sum()),
                n_self_repair=int((flag & defined).sum()), frac_self_repair=float(frac[0]),
                ci_low=float(lo[0]), ci_high=float(hi[0]),
                median_interaction=float(sd["interaction"].median()) if len(sd) else float("nan"),
                median_interaction_sym=float(sd["interaction_sym"].median()) if len(sd) else float("nan"),
                median_value_similarity_self_repair=float(sd.loc[sd["self_repair"], "value_similarity"].median())
                if sd["self_repair"].any() else float("nan"),
                median_value_similarity_other=float(sd.loc[~sd["self_repair"], "value_similarity"].median())
                if (~sd["self_repair"]).any() else float("nan"),
            ))
        return pd.DataFrame(rows)

    def sweep(self, thresholds: Optional[Sequence[float]] = None, *, by_layer: bool = False, n_boot: int = 2000,
              seed: int = 0, cluster: str = "prompt", column: str = "interaction") -> pd.DataFrame:
        """Fraction of defined groups with ``column > threshold`` as a function of the threshold, with
        bootstrap 95% intervals (the same resamples for every threshold). ``column="global_interaction"``
        sweeps the global ratio."""
        _check_mode("cluster", cluster, ("prompt", "group"))
        if column not in self.groups.columns:
            raise ValueError(f"column {column!r} is not in the result; valid: interaction"
                             + (", global_interaction" if "global_interaction" in self.groups else "") + ".")
        th = np.round(np.linspace(0.0, 1.0, 21), 10) if thresholds is None else np.asarray(thresholds, float)
        if th.ndim != 1 or len(th) == 0 or not np.isfinite(th).all():
            raise ValueError("thresholds must be a non-empty sequence of finite numbers.")
        parts = [(None, self.groups)] if not by_layer else [(l, self.groups[self.groups["layer"] == l])
                                                             for l in self.settings.get("layers", [])]
        out = []
        for l, s in parts:
            r = s[column].to_numpy(dtype=float)
            defined = ~np.isnan(r)
            with np.errstate(invalid="ignore"):
                flags = np.stack([(r > t) & defined for t in th])
            cl = s["prompt"].to_numpy() if cluster == "prompt" else np.arange(len(s))
            frac, lo, hi = _bootstrap_fraction(flags[0] if len(th) else defined, defined, cl, n_boot=n_boot,
                                               seed=seed, thresholds_flags=flags)
            for i, t in enumerate(th):
                row = dict(threshold=float(t), n_defined=int(defined.sum()), n_flagged=int(flags[i].sum()),
                           fraction=float(frac[i]), ci_low=float(lo[i]), ci_high=float(hi[i]))
                if by_layer:
                    row = dict(layer=int(l), **row)
                out.append(row)
        return pd.DataFrame(out)

    # ---------------------------------------------------------------- persistence

    def to_parquet(self, path: Union[str, os.PathLike]) -> None:
        """Write groups + settings + meta (Parquet key-value metadata ``selfrepair``) atomically."""
        _write_parquet(self.groups, {"settings": self.settings, "meta": self.meta}, Path(path))

    @classmethod
    def read_parquet(cls, path: Union[str, os.PathLike]) -> "SelfRepairResult":
        """Read a file written by ``to_parquet``: tuple columns come back as tuples, dtypes restored."""
        groups, info = _read_parquet(Path(path))
        return cls(groups, info.get("settings", {}), info.get("meta", {}))


def _arrow_schema(columns: Sequence[str]):
    import pyarrow as pa

    fields = []
    for c in columns:
        if c in TUPLE_COLUMNS:
            fields.append(pa.field(c, pa.list_(pa.int64() if TUPLE_COLUMNS[c] == "int" else pa.float64())))
        elif c in INT_COLUMNS:
            fields.append(pa.field(c, pa.int64()))
        elif c in BOOL_COLUMNS:
            fields.append(pa.field(c, pa.bool_()))
        else:
            fields.append(pa.field(c, pa.float64()))
    return pa.schema(fields)


def _write_parquet(df: pd.DataFrame, info: dict, path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    unknown = [c for c in df.columns if c not in TUPLE_COLUMNS and c not in INT_COLUMNS and c not in BOOL_COLUMNS
               and not pd.api.types.is_float_dtype(df[c])]
    if unknown:
        raise ValueError(f"cannot store columns {unknown}: only the analysis columns (numbers and tuples) are "
                         "written; drop or convert extra columns first.")
    schema = _arrow_schema(list(df.columns))
    arrays = []
    for f in schema:
        col = df[f.name]
        if f.name in TUPLE_COLUMNS:
            arrays.append(pa.array([list(t) for t in col], type=f.type))
        else:
            arrays.append(pa.array(col.to_numpy(), type=f.type))
    meta = {"selfrepair": json.dumps({"format": RESULT_FORMAT, "columns": list(df.columns), **info},
                                     default=_json_default, allow_nan=True)}
    table = pa.Table.from_arrays(arrays, schema=schema.with_metadata(meta))
    atomic_write(path, lambda tmp: pq.write_table(table, tmp))


def _parquet_info(schema, path: Path) -> dict:
    raw = (schema.metadata or {}).get(b"selfrepair")
    if raw is None:
        raise ValueError(f"{path} is not a selfrepair result (no 'selfrepair' key in its Parquet metadata).")
    return json.loads(raw)


def read_result_info(path: Union[str, os.PathLike]) -> dict:
    """``{"settings", "meta", ...}`` of a file written by ``SelfRepairResult.to_parquet``, from its
    Parquet footer only (the groups are not read)."""
    import pyarrow.parquet as pq

    return _parquet_info(pq.read_schema(path), Path(path))


def _read_parquet(path: Path):
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    info = _parquet_info(table.schema, path)
    cols = info.get("columns", table.column_names)
    data = {}
    for c in cols:
        arr = table.column(c).to_pylist()
        if c in TUPLE_COLUMNS:
            conv = int if TUPLE_COLUMNS[c] == "int" else float
            data[c] = pd.Series([tuple(conv(x) for x in t) for t in arr], dtype=object)
        elif c in INT_COLUMNS:
            data[c] = pd.Series(np.asarray(arr, dtype=np.int64))
        elif c in BOOL_COLUMNS:
            data[c] = pd.Series(np.asarray(arr, dtype=bool))
        else:
            data[c] = pd.Series(np.asarray([np.nan if x is None else x for x in arr], dtype=np.float64))
    df = pd.DataFrame(data, columns=cols)
    return df, info


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, (torch.dtype,)):
        return str(o)
    if isinstance(o, (set, tuple)):
        return list(o)
    return str(o)


# =========================================================================== the analysis


def _check_mode(name: str, value, valid: Sequence[str]) -> None:
    if value not in valid:
        raise ValueError(f"unknown {name} {value!r}; valid: {', '.join(repr(v) for v in valid)}.")


def _versions(packages=("selfrepair", "transformer_lens", "torch", "transformers", "pandas", "pyarrow")) -> dict:
    """Installed version of each package ("unknown" where it cannot be told)."""
    import importlib.metadata as md

    out = {}
    for pkg in packages:
        try:
            out[pkg] = md.version(pkg.replace("_", "-")) if pkg != "selfrepair" else md.version(pkg)
        except Exception:
            try:
                mod = __import__(pkg)
                out[pkg] = str(getattr(mod, "__version__", "unknown"))
            except Exception:
                out[pkg] = "unknown"
    return out


def model_hash(model) -> str:
    """sha256 over every parameter's name, shape, dtype and bytes (identifies the weights)."""
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        t = p.detach().cpu().contiguous()
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def task_hash(task: Task) -> str:
    """sha256 over the task's tokens, answers, wrongs, positions, mask and metric name."""
    h = hashlib.sha256()
    for t in (task.tokens, task.answer_ids, task.wrong_ids, task.positions, task.attention_mask):
        t = t.detach().cpu().to(torch.int64).contiguous()
        h.update(f"{tuple(t.shape)}|".encode())
        h.update(t.numpy().tobytes())
    metric = task.metric if isinstance(task.metric, str) else getattr(task.metric, "__qualname__", repr(task.metric))
    h.update(str(metric).encode())
    return h.hexdigest()


def _auto_batch_size(task: Task, n_layers: int, n_heads: int, d_head: int, itemsize: int) -> int:
    n = int(task.lengths.max())
    per_prompt = itemsize * n_layers * (n_heads * n * n + 3 * n * n_heads * d_head) + itemsize * 6 * n_heads * n * n
    return int(max(1, min(len(task), 64, (2 ** 28) // max(per_prompt, 1))))


def _validate(task, backend, *, k, min_contribution, select, threshold, min_effect, ablation,
              value_ablation, layers, heads, temperature, batch_size, dtype):
    if not isinstance(task, Task):
        raise TypeError(f"task must be a selfrepair.Task; got {type(task).__name__}.")
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 2 <= int(k) <= MAX_K:
        raise ValueError(f"k must be an integer from 2 to {MAX_K} (keys per group); got {k!r}.")
    for nm, v in (("threshold", threshold), ("min_effect", min_effect)):
        if not isinstance(v, (int, float, np.floating, np.integer)) or not math.isfinite(v) or v < 0:
            raise ValueError(f"{nm} must be a finite number >= 0; got {v!r}.")
    if not isinstance(min_contribution, (int, float, np.floating, np.integer)) or not math.isfinite(min_contribution):
        raise ValueError(f"min_contribution must be a finite number (metric units); got {min_contribution!r}.")
    if not isinstance(temperature, (int, float, np.floating, np.integer)) or not temperature > 0:
        raise ValueError(f"temperature must be > 0; got {temperature!r}.")
    _check_mode("select mode", select, SELECT_MODES)
    _check_mode("ablation", ablation, ABLATIONS)
    _check_mode("value_ablation", value_ablation, VALUE_ABLATIONS)
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer))
                                   or batch_size < 1):
        raise ValueError(f"batch_size must be a positive integer or None (automatic); got {batch_size!r}.")
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"dtype must be torch.float32 or torch.float64 (analysis precision); got {dtype}.")
    check_backend(backend)
    L, H = backend.n_layers, backend.n_heads

    def norm_list(x, n, what):
        if x is None:
            return list(range(n))
        xs = [x] if isinstance(x, (int, np.integer)) else list(x)
        if not xs:
            raise ValueError(f"{what}s is empty; give at least one {what} or None for all.")
        for v in xs:
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or not 0 <= int(v) < n:
                raise ValueError(f"{what} {v!r} out of range: the model has {n} {what}s per "
                                 f"{'model' if what == 'layer' else 'layer'} (0..{n - 1}).")
        return sorted({int(v) for v in xs})

    layers = norm_list(layers, L, "layer")
    heads = norm_list(heads, H, "head")
    if len(task) == 0:
        raise ValueError("empty task: give at least one prompt.")
    n = int(task.lengths.max())
    if n > backend.n_ctx:
        raise ValueError(f"the task's longest prompt has {n} tokens but the model's context is {backend.n_ctx}; "
                         "shorten the prompts (or use a model with a longer context).")
    if int(task.tokens.max()) >= backend.d_vocab or int(task.tokens.min()) < 0:
        raise ValueError(f"task tokens must lie in [0, {backend.d_vocab}) (the model's vocabulary).")
    return layers, heads


def analyze_self_repair(
    model,
    task: Task,
    *,
    k: int = 2,
    min_contribution: float = 1.0,
    select: str = "positive",
    exclude_bos: bool = False,
    threshold: float = 0.1,
    min_effect: float = 1e-4,
    ablation: str = "mean",
    value_ablation: str = "zero",
    global_effects: bool = False,
    layers: Optional[Iterable[int]] = None,
    heads: Optional[Iterable[int]] = None,
    temperature: float = 2.0,
    batch_size: Optional[int] = None,
    checkpoint_dir: Optional[Union[str, os.PathLike]] = None,
    progress: bool = True,
    dtype: torch.dtype = torch.float32,
) -> SelfRepairResult:
    """Individual versus joint ablations of the k keys of largest contribution, for every row
    ``(prompt, layer, head, query)`` with at least k keys above ``min_contribution`` (SPEC).

    Local effects in closed form from one cached forward + backward per batch of
    ``batch_size`` prompts; global effects (``global_effects=True``) from batched real
    forward passes. ``checkpoint_dir``: each batch's rows are written there atomically and
    a re-run with the same settings, model and task resumes. ``dtype``: precision of the
    cached activations (float32, or float64 for exactness checks); row arithmetic is float64.
    Columns of ``result.groups``: see the module docstring of ``selfrepair.self_repair``.
    """
    from .cache import _get_backend

    backend = _get_backend(model, None)
    layers, heads = _validate(task, backend, k=k, min_contribution=min_contribution, select=select,
                              threshold=threshold, min_effect=min_effect, ablation=ablation,
                              value_ablation=value_ablation, layers=layers, heads=heads, temperature=temperature,
                              batch_size=batch_size, dtype=dtype)
    k = int(k)
    itemsize = torch.empty((), dtype=dtype).element_size()
    bs = int(batch_size) if batch_size else _auto_batch_size(task, len(layers), backend.n_heads, backend.d_head,
                                                             itemsize)
    settings = dict(k=k, min_contribution=float(min_contribution), select=select, exclude_bos=bool(exclude_bos),
                    threshold=float(threshold), min_effect=float(min_effect), ablation=ablation,
                    value_ablation=value_ablation, global_effects=bool(global_effects), layers=layers, heads=heads,
                    temperature=float(temperature), batch_size=bs, dtype=str(dtype).replace("torch.", ""))
    mhash, thash = model_hash(model), task_hash(task)
    cfg = getattr(model, "cfg", None)
    meta = dict(
        model_name=str(getattr(cfg, "model_name", type(model).__name__)), model_architecture=backend.architecture,
        backend=backend.kind, score_site=backend.score_site, model_hash=mhash,
        model_dtype=str(model_dtype(model)).replace("torch.", ""),
        n_layers=backend.n_layers, n_heads=backend.n_heads, n_kv_heads=backend.n_kv_heads, d_head=backend.d_head,
        task_name=str(task.name), task_size=len(task), task_seq_len=int(task.tokens.shape[1]), task_hash=thash,
        metric=task.metric if isinstance(task.metric, str) else getattr(task.metric, "__qualname__", "callable"),
        versions=_versions(), created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    )
    ck = _Checkpoint(Path(checkpoint_dir), settings, mhash, thash) if checkpoint_dir is not None else None

    starts = list(range(0, len(task), bs))
    frames: List[pd.DataFrame] = []
    t_local = t_global = 0.0
    n_resumed = 0
    from tqdm.auto import tqdm

    bar = tqdm(total=len(starts), desc="self-repair", unit="batch", disable=not progress)
    try:
        for s in starts:
            stop = min(s + bs, len(task))
            df = ck.load(s, stop) if ck is not None else None
            if df is None:
                sub = task.subset(slice(s, stop))
                df, tl, tg = _analyze_batch(model, backend, sub, s, layers=layers, heads=heads, k=k,
                                            min_contribution=float(min_contribution), select=select,
                                            exclude_bos=bool(exclude_bos), threshold=float(threshold),
                                            min_effect=float(min_effect), ablation=ablation,
                                            value_ablation=value_ablation, global_effects=bool(global_effects),
                                            temperature=float(temperature), dtype=dtype)
                t_local += tl
                t_global += tg
                if ck is not None:
                    ck.save(s, stop, df)
            else:
                n_resumed += 1
            frames.append(df)
            bar.update(1)
            bar.set_postfix(groups=sum(len(f) for f in frames))
    finally:
        bar.close()
    nonempty = [f for f in frames if len(f)]
    groups = pd.concat(nonempty, ignore_index=True) if nonempty else _empty_frame(global_effects)
    groups = groups.sort_values(["prompt", "layer", "head", "query"], kind="stable").reset_index(drop=True)
    meta.update(seconds_local=t_local, seconds_global=t_global, n_batches=len(starts), n_batches_resumed=n_resumed)
    return SelfRepairResult(groups, settings, meta)


def _empty_frame(global_effects: bool) -> pd.DataFrame:
    cols = BASE_COLUMNS + (GLOBAL_COLUMNS if global_effects else [])
    data = {}
    for c in cols:
        if c in TUPLE_COLUMNS:
            data[c] = pd.Series([], dtype=object)
        elif c in INT_COLUMNS:
            data[c] = pd.Series([], dtype=np.int64)
        elif c in BOOL_COLUMNS:
            data[c] = pd.Series([], dtype=bool)
        else:
            data[c] = pd.Series([], dtype=np.float64)
    return pd.DataFrame(data, columns=cols)


class _Checkpoint:
    """Per-batch result files in a directory, written atomically; a run's identity in ``run.json``."""

    def __init__(self, d: Path, settings: dict, mhash: str, thash: str):
        self.dir = d
        d.mkdir(parents=True, exist_ok=True)
        ident = {"format": RESULT_FORMAT, "settings": settings, "model_hash": mhash, "task_hash": thash}
        f = d / "run.json"
        if f.exists():
            old = json.loads(f.read_text())
            if old != json.loads(json.dumps(ident)):
                diff = sorted(set(k for k in set(old.get("settings", {})) | set(settings)
                                  if old.get("settings", {}).get(k) != json.loads(json.dumps(settings)).get(k)))
                what = ([f"settings {diff}"] if diff else []) + \
                       (["model weights"] if old.get("model_hash") != mhash else []) + \
                       (["task"] if old.get("task_hash") != thash else []) + \
                       (["file format"] if old.get("format") != RESULT_FORMAT else [])
                raise ValueError(
                    f"checkpoint_dir {d} holds a run with different {', '.join(what) or 'identity'}; "
                    "resume with the same settings, model and task, or use a new (or emptied) directory.")
        else:
            atomic_write(f, lambda tmp: tmp.write_text(json.dumps(ident, indent=1, default=_json_default)))

    def path(self, s: int, e: int) -> Path:
        return self.dir / f"batch_{s:08d}_{e:08d}.parquet"

    def load(self, s: int, e: int) -> Optional[pd.DataFrame]:
        p = self.path(s, e)
        if not p.exists():
            return None
        df, _ = _read_parquet(p)
        return df

    def save(self, s: int, e: int, df: pd.DataFrame) -> None:
        _write_parquet(df, {"batch": [s, e]}, self.path(s, e))


def _analyze_batch(model, backend, task: Task, offset: int, *, layers, heads, k, min_contribution, select,
                   exclude_bos, threshold, min_effect, ablation, value_ablation, global_effects, temperature,
                   dtype):
    """Rows of one batch of prompts: cached run, selection, closed-form effects (+ global effects)."""
    t0 = time.perf_counter()
    run = cached_run(model, task, layers=layers, dtype=dtype, backend=backend, keep=("scores", "values"))
    dev = run.metric.device
    n = run.mask.shape[1]
    f64 = torch.float64
    qpos = torch.arange(n, device=dev)
    q_ok = (qpos[None] < run.lengths[:, None]) & (qpos[None] <= run.positions[:, None])          # [b, q]
    head_ok = torch.zeros(backend.n_heads, dtype=torch.bool, device=dev)
    head_ok[heads] = True
    sel_mask = run.mask.clone()                                                                  # [b, q, k]
    if exclude_bos:
        sel_mask[:, :, 0] = False
    n_unmasked = run.mask.sum(-1)                                                                # [b, q]
    parts, edits = [], []
    for l in layers:
        a = run.scores[l]                                                                        # [b, h, q, k]
        v = run.values[l]                                                                        # [b, k, h, d]
        g = run.grad_z[l]                                                                        # [b, q, h, d]
        c = torch.einsum("bqhd,bkhd->bhqk", g, v)
        w = torch.softmax(a, -1).nan_to_num(0.0) * c
        row_ok = q_ok[:, None] & head_ok[None, :, None]                                         # [b, h, q]
        if ablation == "knockout":
            row_ok = row_ok & (n_unmasked > k)[:, None]
        idx, keys = select_keys(w, sel_mask, row_ok, k=k, min_contribution=min_contribution, select=select)
        del w
        if idx.numel() == 0:
            continue
        bi, hi, qi = idx.unbind(1)
        a_r = a[bi, hi, qi].to(f64)
        c_r = c[bi, hi, qi].to(f64)
        m_r = run.mask[bi, qi]
        mm_r = sel_mask[bi, qi]                                    # the mean runs over the selectable keys
        vK = v[bi[:, None], keys, hi[:, None]].to(f64)                                           # [R, k, d]
        v_rest = None
        if global_effects:
            # softmax over each row's rest (unmasked keys outside S), weighted value, via a dense einsum
            rest = m_r.clone().scatter_(1, keys, False)
            s_rest = torch.softmax(a_r.masked_fill(~rest, float("-inf")), 1).nan_to_num(0.0)
            step = max(1, 2 ** 21 // (n * v.shape[-1]))
            v_rest = torch.cat([torch.einsum("rn,rnd->rd", s_rest[i:i + step],
                                             v[bi[i:i + step], :, hi[i:i + step]].to(f64))
                                for i in range(0, len(bi), step)])
        R = len(bi)
        chunk = max(1, 2 ** 22 // ((2 ** k) * (k + 2) + n))
        res: Dict[str, List[Tensor]] = {}
        for i in range(0, R, chunk):
            sl = slice(i, i + chunk)
            o = _row_effects(a_r[sl], m_r[sl], c_r[sl], keys[sl], mm_r[sl], ablation=ablation,
                             value_ablation=value_ablation, temperature=temperature, v_keys=vK[sl],
                             v_rest=None if v_rest is None else v_rest[sl])
            for key_, val in o.items():
                if key_ != "subset_effects":
                    res.setdefault(key_, []).append(val)
        o = {key_: torch.cat(vals) for key_, vals in res.items()}
        o.update(prompt=bi + offset, layer=torch.full_like(bi, l), head=hi, query=qi, keys=keys,
                 metric=run.metric[bi].to(f64))
        if global_effects:
            zd = o.pop("z_deltas")                                                               # [R, k+1, d]
            edits.append((bi, hi, qi, l, zd))
        parts.append(o)
    t_local = time.perf_counter() - t0
    df = _to_frame(parts, min_effect, threshold)
    t_global = 0.0
    if global_effects:
        t1 = time.perf_counter()
        G = _global(model, task, edits, k)                                                       # [R_total, k+1]
        t_global = time.perf_counter() - t1
        df = _add_global(df, G, k, min_effect)
    return df, t_local, t_global


def select_keys(
    w: Float[Tensor, "batch head qpos kpos"],
    keys_ok: Bool[Tensor, "batch qpos kpos"],
    row_ok: Bool[Tensor, "batch head qpos"],
    *,
    k: int,
    min_contribution: float,
    select: str = "positive",
) -> tuple:
    """Rows with at least k selectable keys of ``w_j > min_contribution`` (``|w_j|`` for ``"abs"``) and
    their groups S: the k keys of largest ``w_j`` (``|w_j|``), largest first, ties to the lower position.

    Returns ``(idx [R, 3] = (batch, head, query), keys [R, k])``.
    """
    _check_mode("select mode", select, SELECT_MODES)
    key = w if select == "positive" else w.abs()
    key = key.masked_fill(~keys_ok[:, None], float("-inf"))
    ok = ((key > min_contribution).sum(-1) >= k) & row_ok
    idx = ok.nonzero()
    if idx.numel() == 0:
        return idx, torch.zeros(0, k, dtype=torch.long, device=w.device)
    bi, hi, qi = idx.unbind(1)
    # stable sort of the negated key: equal keys keep their order, i.e. the lower position first
    order = torch.sort(-key[bi, hi, qi], dim=1, stable=True).indices
    return idx, order[:, :k]


def interaction_ratio(
    effects: Float[Tensor, "R k"],
    effect_joint: Float[Tensor, "R"],
    contributions: Float[Tensor, "R k"],
    min_effect: float = 1e-4,
) -> tuple:
    """SPEC ratio ``r = (E_S - sum_n E_n) / E_S`` (NaN when ``|E_S| < max(min_effect, 0.01 sum |w_j|)``) and
    ``interaction_sym = (E_S - sum_n E_n) / (|E_S| + sum_n |E_n|)`` (NaN only for a zero denominator)."""
    esum = effects.sum(1)
    floor = torch.clamp(0.01 * contributions.abs().sum(1), min=min_effect)
    defined = effect_joint.abs() >= floor
    nan = torch.full_like(effect_joint, float("nan"))
    r = torch.where(defined, (effect_joint - esum) / effect_joint, nan)
    den = effect_joint.abs() + effects.abs().sum(1)
    r_sym = torch.where(den > 0, (effect_joint - esum) / den, nan)
    return r, r_sym


def _to_frame(parts: List[Dict[str, Tensor]], min_effect: float, threshold: float) -> pd.DataFrame:
    if not parts:
        return _empty_frame(False)
    cat = {key: torch.cat([p[key] for p in parts]) for key in parts[0]}

    def np_(x):
        return x.detach().cpu().numpy()

    def tup(x, conv=float):
        return [tuple(conv(v) for v in row) for row in x.detach().cpu().tolist()]

    E = cat["effects"]
    ES = cat["effect_joint"]
    esum = E.sum(1)
    inter, inter_sym = interaction_ratio(E, ES, cat["contributions"], min_effect)
    sr = ~torch.isnan(inter) & (inter > threshold)
    data = {
        "prompt": np_(cat["prompt"]).astype(np.int64), "layer": np_(cat["layer"]).astype(np.int64),
        "head": np_(cat["head"]).astype(np.int64), "query": np_(cat["query"]).astype(np.int64),
        "keys": tup(cat["keys"], int), "contributions": tup(cat["contributions"]), "effects": tup(E),
        "effect_sum": np_(esum), "effect_joint": np_(ES), "interaction": np_(inter),
        "interaction_sym": np_(inter_sym), "self_repair": np_(sr).astype(bool), "shapley": tup(cat["shapley"]),
        "value_similarity": np_(cat["value_similarity"]), "value_effects": tup(cat["value_effects"]),
        "value_effect_joint": np_(cat["value_effect_joint"]), "value_interaction": np_(cat["value_interaction"]),
        "grad_estimate": np_(cat["grad_estimate"]), "tsg_estimate": np_(cat["tsg_estimate"]),
        "grad_estimates": tup(cat["grad_estimates"]), "tsg_estimates": tup(cat["tsg_estimates"]),
        "p": tup(cat["p"]), "scores": tup(cat["scores"]), "mass": np_(cat["mass"]),
        "n_keys": np_(cat["n_keys"]).astype(np.int64), "head_contribution": np_(cat["head_contribution"]),
        "metric": np_(cat["metric"]),
    }
    df = pd.DataFrame({c: (pd.Series(data[c], dtype=object) if c in TUPLE_COLUMNS else data[c])
                       for c in BASE_COLUMNS}, columns=BASE_COLUMNS)
    for c in BASE_COLUMNS:
        if c not in TUPLE_COLUMNS and c not in INT_COLUMNS and c not in BOOL_COLUMNS:
            df[c] = df[c].astype(np.float64)
    return df


def _global(model, task: Task, edits, k: int) -> Tensor:
    """Global effects of the individual and joint ablations of every row: [rows, k+1]."""
    from .ablation import ZEdits, measure_z_edits

    if not edits:
        return torch.zeros(0, k + 1, dtype=torch.float64)
    P, Hh, Q, Lr, D = [], [], [], [], []
    for bi, hi, qi, l, zd in edits:
        R = len(bi)
        P.append(bi.repeat_interleave(k + 1))
        Hh.append(hi.repeat_interleave(k + 1))
        Q.append(qi.repeat_interleave(k + 1))
        Lr.append(torch.full((R * (k + 1),), l, dtype=torch.long, device=bi.device))
        D.append(zd.reshape(R * (k + 1), 1, zd.shape[-1]))
    ze = ZEdits(torch.cat(P).cpu(), torch.cat(Lr).cpu(), torch.cat(Hh).cpu(), torch.cat(Q).cpu(), torch.cat(D).cpu())
    out = measure_z_edits(model, task, ze, progress=False)
    return out.to(torch.float64).reshape(-1, k + 1)


def _add_global(df: pd.DataFrame, G: Tensor, k: int, min_effect: float) -> pd.DataFrame:
    # rows of df are in the order the edits were built (layer loop, then nonzero order): same as G
    if len(df) == 0:
        return _empty_frame(True)
    w = torch.tensor([list(t) for t in df["contributions"]], dtype=torch.float64).reshape(len(df), k)
    gi = interaction_ratio(G[:, :k], G[:, k], w, min_effect)[0].numpy()
    Gn = G[:, :k].numpy()
    GS = G[:, k].numpy()
    gsum = Gn.sum(1)
    df = df.copy()
    df["global_effects"] = pd.Series([tuple(float(x) for x in r) for r in Gn.tolist()], dtype=object, index=df.index)
    df["global_effect_joint"] = GS.astype(np.float64)
    df["global_effect_sum"] = gsum.astype(np.float64)
    df["global_interaction"] = gi.astype(np.float64)
    df["downstream_gap"] = ((GS - gsum) - (df["effect_joint"].to_numpy() - df["effect_sum"].to_numpy()))
    return df
