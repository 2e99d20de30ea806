"""``SelfRepairResult`` (the groups table, its settings and meta) and its Parquet codec."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Optional, Sequence, Union

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from .._io import atomic_write
from .rows import check_mode

__all__ = ["SelfRepairResult", "read_result_info", "json_default", "RESULT_FORMAT", "TUPLE_COLUMNS", "INT_COLUMNS",
           "BOOL_COLUMNS", "BASE_COLUMNS", "GLOBAL_COLUMNS", "empty_groups", "read_parquet_table", "write_parquet_table",
           "groups_of", "settings_of", "keys_str", "overall_sweep"]


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
                  "downstream_gap", "global_noise"]


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
        check_mode("cluster", cluster, ("prompt", "group"))
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
        check_mode("cluster", cluster, ("prompt", "group"))
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

    # ---------------------------------------------------------------- the result convention

    def to_frame(self) -> pd.DataFrame:
        """The groups table (a copy)."""
        return self.groups.copy()

    def save(self, path: Union[str, os.PathLike]) -> None:
        """Same as ``to_parquet``."""
        self.to_parquet(path)

    @classmethod
    def load(cls, path: Union[str, os.PathLike]) -> "SelfRepairResult":
        """Same as ``read_parquet``."""
        return cls.read_parquet(path)

    # ---------------------------------------------------------------- persistence

    def to_parquet(self, path: Union[str, os.PathLike]) -> None:
        """Write groups + settings + meta (Parquet key-value metadata ``selfrepair``) atomically."""
        write_parquet_table(self.groups, {"settings": self.settings, "meta": self.meta}, Path(path))

    @classmethod
    def read_parquet(cls, path: Union[str, os.PathLike]) -> "SelfRepairResult":
        """Read a file written by ``to_parquet``: tuple columns come back as tuples, dtypes restored."""
        groups, info = read_parquet_table(Path(path))
        return cls(groups, info.get("settings", {}), info.get("meta", {}))


def _arrow_schema(columns: Sequence[str]):
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


def write_parquet_table(df: pd.DataFrame, info: dict, path: Path) -> None:
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
                                     default=json_default, allow_nan=True)}
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

    return _parquet_info(pq.read_schema(path), Path(path))


def read_parquet_table(path: Path):
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


def json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, (torch.dtype,)):
        return str(o)
    if isinstance(o, (set, tuple)):
        return list(o)
    return str(o)


def empty_groups(global_effects: bool) -> pd.DataFrame:
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


def overall_sweep(sw: pd.DataFrame) -> pd.DataFrame:
    """The overall rows of a sweep table (``sweep(by_layer=True)`` adds per-layer rows with a ``layer``)."""
    return sw[sw["layer"].isna()] if "layer" in sw.columns and sw["layer"].isna().any() else sw


def groups_of(result) -> pd.DataFrame:
    """The groups table of a SelfRepairResult or a DataFrame given directly."""
    df = getattr(result, "groups", result)
    if not isinstance(df, pd.DataFrame):
        raise TypeError(f"expected a SelfRepairResult or its groups DataFrame, got {type(result).__name__}")
    return df


def settings_of(result) -> dict:
    """The analysis settings (and its meta: n_layers, n_heads, metric) carried by a result or a table's attrs."""
    out = {}
    for obj in (result, getattr(result, "groups", None)):
        if obj is None:
            continue
        for src in (getattr(obj, "meta", None), getattr(obj, "settings", None)):
            if isinstance(src, Mapping):
                out.update(src)
        attrs = getattr(obj, "attrs", None)
        if isinstance(attrs, Mapping):
            for key in ("meta", "settings"):
                if isinstance(attrs.get(key), Mapping):
                    out.update(attrs[key])
    return out


def keys_str(keys) -> str:
    try:
        return "(" + ", ".join(str(int(k)) for k in keys) + ")"
    except TypeError:
        return str(keys)
