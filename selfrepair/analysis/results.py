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
from .stats import benjamini_hochberg, proportion_intervals

__all__ = ["SelfRepairResult", "read_result_info", "json_default", "RESULT_FORMAT", "TUPLE_COLUMNS", "INT_COLUMNS",
           "BOOL_COLUMNS", "BASE_COLUMNS", "GLOBAL_COLUMNS", "empty_groups", "read_parquet_table", "write_parquet_table",
           "groups_of", "settings_of", "keys_str", "overall_sweep", "canonical_settings", "canonical_table",
           "RENAMED_SETTINGS"]


RESULT_FORMAT = 1

#: settings keys (and table columns) renamed since a release: old name -> new name. Results, run folders and tables
#: written before the rename are read through :func:`canonical_settings` / :func:`canonical_table`, so readers only
#: ever see the new names (the old keyword ``ablation=`` of the score ablation is ``score_ablation=`` now).
RENAMED_SETTINGS = {"ablation": "score_ablation"}


def canonical_settings(settings: Mapping) -> dict:
    """``settings`` (a copy) with every old key of :data:`RENAMED_SETTINGS` under its new name (a new key already
    present wins). The one place where settings of old results, checkpoints and run folders are mapped."""
    out = dict(settings)
    for old, new in RENAMED_SETTINGS.items():
        if old in out:
            value = out.pop(old)
            out.setdefault(new, value)
    return out


def canonical_table(df: pd.DataFrame) -> pd.DataFrame:
    """A table read back from a run folder with its old column names (:data:`RENAMED_SETTINGS`) renamed, in
    place; its ``attrs["settings"]`` mapped likewise."""
    ren = {o: n for o, n in RENAMED_SETTINGS.items() if o in df.columns and n not in df.columns}
    if ren:
        df.rename(columns=ren, inplace=True)
    if isinstance(df.attrs.get("settings"), Mapping):
        df.attrs["settings"] = canonical_settings(df.attrs["settings"])
    return df


# column -> element type for tuple-valued columns (one entry per key of the group, largest contribution first)
TUPLE_COLUMNS = {
    "keys": "int", "contributions": "float", "effects": "float", "shapley": "float", "value_effects": "float",
    "grad_estimates": "float", "tsg_estimates": "float", "p": "float", "scores": "float",
    "global_effects": "float", "concealment": "float",
}


INT_COLUMNS = ("prompt", "layer", "head", "query", "n_keys", "n_contributing", "n_clusters")
BOOL_COLUMNS = ("self_repair",)
BASE_COLUMNS = [
    "prompt", "layer", "head", "query", "keys", "contributions", "effects", "effect_sum", "effect_joint",
    "interaction", "interaction_sym", "self_repair", "shapley", "value_similarity", "value_effects",
    "value_effect_joint", "value_interaction", "grad_estimate", "tsg_estimate", "grad_estimates", "tsg_estimates",
    "p", "scores", "mass", "n_keys", "head_contribution", "metric",
    # what r is made of and group sizes (docs/quantities.md)
    "mass_interaction", "excess_interaction", "concealment", "concealment_share", "permutation_p", "c_ratio",
    "value_similarity_out", "n_contributing", "n_clusters",
]


GLOBAL_COLUMNS = ["global_effects", "global_effect_joint", "global_effect_sum", "global_interaction",
                  "downstream_gap", "global_noise"]


def _median(df: pd.DataFrame, col: str) -> float:
    return float(df[col].astype(float).median()) if col in df.columns and len(df) else float("nan")


def _check_alpha(alpha) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float, np.floating, np.integer)) \
            or not 0.0 < float(alpha) < 1.0:
        raise ValueError(f"alpha must lie strictly between 0 and 1 (e.g. 0.05); got {alpha!r}.")
    return float(alpha)


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
                f"score_ablation={self.settings.get('score_ablation')!r})")

    # ---------------------------------------------------------------- tables

    def permutation_test(self, alpha: Optional[float] = None) -> pd.DataFrame:
        """The permutation test's decision per group (docs/quantities.md, "Intervals"): Benjamini-Hochberg over
        every group of this result with a defined ``permutation_p`` (``stats.benjamini_hochberg``).

        Returns a frame aligned with ``groups``: ``permutation_q`` (BH-adjusted p, NaN where untested) and
        ``permutation_flag`` (``permutation_q <= alpha``; False where untested). ``alpha``: default the
        analysis' ``alpha`` setting (0.05). A result without ``permutation_p`` gives NaN / False."""
        a = _check_alpha(self.settings.get("alpha", 0.05) if alpha is None else alpha)
        g = self.groups
        p = g["permutation_p"].to_numpy(dtype=float) if "permutation_p" in g.columns else np.full(len(g), np.nan)
        reject, adj = benjamini_hochberg(p, alpha=a)
        return pd.DataFrame({"permutation_q": adj, "permutation_flag": reject}, index=g.index)

    def _flags(self, s: pd.DataFrame, perm: pd.DataFrame, column: str = "interaction"):
        """0/1 flags of the permutation test (NaN where untested) for the rows of ``s``."""
        tested = s["permutation_p"].notna().to_numpy() if "permutation_p" in s.columns else np.zeros(len(s), bool)
        fl = perm.loc[s.index, "permutation_flag"].to_numpy(dtype=float)
        return np.where(tested, fl, np.nan)

    def summary(self, *, cluster: str = "prompt", alpha: Optional[float] = None, level: float = 0.95) -> pd.DataFrame:
        """Per layer x head: rows, defined ratios, NaN count, the share self-repairing by the two rules, medians.

        Rule 1, ``r > threshold`` (``frac_self_repair`` over the groups with a defined r, ``n_self_repair``);
        rule 2, the permutation test (``frac_permutation`` over the groups with a defined ``permutation_p``,
        ``n_tested``, ``n_permutation``: ``permutation_test(alpha)``, i.e. Benjamini-Hochberg over all groups of
        the result). Each share has a ``level`` interval valid at 0 and 1 (``ci_low`` / ``ci_high``,
        ``perm_ci_low`` / ``perm_ci_high``): ``stats.proportion_intervals``, the Wilson score interval on the
        effective size ``n_eff`` / ``perm_n_eff`` = n / design effect of the prompt clusters
        (``cluster="group"``: every group its own cluster). Medians over the groups with a defined r:
        ``median_interaction``, ``median_interaction_sym``, ``median_mass_interaction``,
        ``median_excess_interaction``, ``median_concealment_share``; ``median_value_similarity_self_repair`` /
        ``_other``: of the self-repairing and of the other defined groups."""
        check_mode("cluster", cluster, ("prompt", "group"))
        g = self.groups
        perm = self.permutation_test(alpha)
        pairs = [(l, h) for l in self.settings.get("layers", sorted(g["layer"].unique()))
                 for h in self.settings.get("heads", sorted(g["head"].unique()))]
        rows = []
        for l, h in pairs:
            s = g[(g["layer"] == l) & (g["head"] == h)]
            defined = s["interaction"].notna().to_numpy()
            flag = s["self_repair"].to_numpy(dtype=bool)
            pflag = self._flags(s, perm)
            cl = s["prompt"].to_numpy() if cluster == "prompt" else np.arange(len(s))
            o = proportion_intervals(np.stack([np.where(defined, flag, np.nan), pflag]), cl, level=level)
            sd = s[defined]
            rows.append(dict(
                layer=l, head=h, n_groups=len(s), n_defined=int(defined.sum()), n_nan=int((~defined).sum()),
                n_self_repair=int((flag & defined).sum()), frac_self_repair=float(o["share"][0]),
                ci_low=float(o["lo"][0]), ci_high=float(o["hi"][0]), n_eff=float(o["n_eff"][0]),
                n_tested=int(o["n"][1]), n_permutation=int(np.nansum(pflag)), frac_permutation=float(o["share"][1]),
                perm_ci_low=float(o["lo"][1]), perm_ci_high=float(o["hi"][1]), perm_n_eff=float(o["n_eff"][1]),
                median_interaction=_median(sd, "interaction"),
                median_interaction_sym=_median(sd, "interaction_sym"),
                median_mass_interaction=_median(sd, "mass_interaction"),
                median_excess_interaction=_median(sd, "excess_interaction"),
                median_concealment_share=_median(sd, "concealment_share"),
                median_value_similarity_self_repair=_median(sd[sd["self_repair"]], "value_similarity"),
                median_value_similarity_other=_median(sd[~sd["self_repair"]], "value_similarity"),
            ))
        return pd.DataFrame(rows)

    def sweep(self, thresholds: Optional[Sequence[float]] = None, *, by_layer: bool = False, cluster: str = "prompt",
              column: str = "interaction", alpha: Optional[float] = None, level: float = 0.95) -> pd.DataFrame:
        """Share of defined groups with ``column > threshold`` as a function of the threshold, each with a
        ``level`` interval valid at 0 and 1 (``stats.proportion_intervals``: Wilson on n / design effect of the
        prompt clusters; ``n_eff``). ``column="global_interaction"`` sweeps the global ratio.

        Beside it, the same for the permutation test (``fraction_permutation``, ``perm_ci_low``,
        ``perm_ci_high``, ``n_tested``, ``n_permutation``; ``permutation_test(alpha)``): it has no threshold, so
        these columns repeat on every threshold's row of a scope (overall, or one layer with ``by_layer``)."""
        check_mode("cluster", cluster, ("prompt", "group"))
        if column not in self.groups.columns:
            raise ValueError(f"column {column!r} is not in the result; valid: interaction"
                             + (", global_interaction" if "global_interaction" in self.groups else "") + ".")
        th = np.round(np.linspace(0.0, 1.0, 21), 10) if thresholds is None else np.asarray(thresholds, float)
        if th.ndim != 1 or len(th) == 0 or not np.isfinite(th).all():
            raise ValueError("thresholds must be a non-empty sequence of finite numbers.")
        perm = self.permutation_test(alpha)
        parts = [(None, self.groups)] if not by_layer else [(l, self.groups[self.groups["layer"] == l])
                                                             for l in self.settings.get("layers", [])]
        out = []
        for l, s in parts:
            r = s[column].to_numpy(dtype=float)
            defined = ~np.isnan(r)
            with np.errstate(invalid="ignore"):
                flags = np.stack([(r > t) & defined for t in th])
            cl = s["prompt"].to_numpy() if cluster == "prompt" else np.arange(len(s))
            pflag = self._flags(s, perm)
            o = proportion_intervals(np.vstack([np.where(defined, flags, np.nan), pflag[None]]), cl, level=level)
            for i, t in enumerate(th):
                row = dict(threshold=float(t), n_defined=int(defined.sum()), n_flagged=int(flags[i].sum()),
                           fraction=float(o["share"][i]), ci_low=float(o["lo"][i]), ci_high=float(o["hi"][i]),
                           n_eff=float(o["n_eff"][i]), n_tested=int(o["n"][-1]), n_permutation=int(np.nansum(pflag)),
                           fraction_permutation=float(o["share"][-1]), perm_ci_low=float(o["lo"][-1]),
                           perm_ci_high=float(o["hi"][-1]))
                if by_layer:
                    row = dict(layer=int(l), **row)
                out.append(row)
        return pd.DataFrame(out)

    def group_sizes(self, *, per_head: bool = True) -> pd.DataFrame:
        """Distribution of the group-size quantities (docs/quantities.md, "Group sizes"), per layer x head
        (``per_head``) or over all rows: one row per ``quantity`` (``n_contributing``, ``n_clusters``,
        ``group_size`` = keys in S) and ``value``, with ``count`` (analysed rows) and ``share`` (of the scope's
        rows). Read ``n_contributing`` from a ``k="auto"`` result: a fixed k only analyses rows with >= k."""
        g = self.groups
        by = ["layer", "head"] if per_head else []
        quantities = [q for q in ("n_contributing", "n_clusters") if q in g.columns]
        frame = g[by + quantities].copy()
        frame["group_size"] = [len(t) for t in g["keys"]] if len(g) else pd.Series([], dtype=np.int64)
        out = []
        for q in quantities + ["group_size"]:
            cnt = frame.groupby(by + [q]).size().rename("count").reset_index().rename(columns={q: "value"})
            tot = cnt.groupby(by)["count"].transform("sum") if by else cnt["count"].sum()
            cnt["share"] = cnt["count"] / tot
            cnt.insert(len(by), "quantity", q)
            out.append(cnt)
        cols = by + ["quantity", "value", "count", "share"]
        res = pd.concat(out, ignore_index=True)[cols] if out else pd.DataFrame(columns=cols)
        return res.astype({"value": np.int64, "count": np.int64, "share": np.float64})

    def by_group_size(self, *, per_head: bool = True) -> pd.DataFrame:
        """r and its parts by group size (keys in S; a ``k="auto"`` result holds several sizes), per layer x
        head (``per_head``) or over all rows: ``n_groups``, ``n_defined``, ``frac_self_repair`` (r > threshold,
        over defined r), ``median_interaction``, ``median_mass_interaction``, ``median_excess_interaction``,
        ``median_concealment_share`` (over defined r) and ``median_n_clusters``."""
        g = self.groups.copy()
        g["group_size"] = [len(t) for t in g["keys"]] if len(g) else pd.Series([], dtype=np.int64)
        by = (["layer", "head"] if per_head else []) + ["group_size"]
        rows = []
        for key, s in g.groupby(by):
            key = key if isinstance(key, tuple) else (key,)
            d = s[s["interaction"].notna()]
            rows.append(dict(zip(by, (int(x) for x in key)), n_groups=len(s), n_defined=len(d),
                             frac_self_repair=float(d["self_repair"].mean()) if len(d) else float("nan"),
                             median_interaction=_median(d, "interaction"),
                             median_mass_interaction=_median(d, "mass_interaction"),
                             median_excess_interaction=_median(d, "excess_interaction"),
                             median_concealment_share=_median(d, "concealment_share"),
                             median_n_clusters=_median(s, "n_clusters")))
        return pd.DataFrame(rows, columns=by + ["n_groups", "n_defined", "frac_self_repair", "median_interaction",
                                                "median_mass_interaction", "median_excess_interaction",
                                                "median_concealment_share", "median_n_clusters"])

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
    info = json.loads(raw)
    if isinstance(info.get("settings"), Mapping):  # a result written before a rename: the new names
        info["settings"] = canonical_settings(info["settings"])
    return info


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
                out.update(canonical_settings(src))
        attrs = getattr(obj, "attrs", None)
        if isinstance(attrs, Mapping):
            for key in ("meta", "settings"):
                if isinstance(attrs.get(key), Mapping):
                    out.update(canonical_settings(attrs[key]))
    return out


def keys_str(keys) -> str:
    try:
        return "(" + ", ".join(str(int(k)) for k in keys) + ")"
    except TypeError:
        return str(keys)
