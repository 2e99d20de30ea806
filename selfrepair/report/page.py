"""``report.html``: one self-contained page per run folder that tells the story of the run.

:func:`build_report` reads what a finished run folder holds (``summary.json``,
``tables/*.parquet``), rebuilds every figure from the tables with the
functions of :mod:`selfrepair.plots` and renders ``report.html`` with Jinja2
(``templates/report.html.j2``): the headline numbers, settings, model, task and
versions at the top; then one section per registered stage with its figures
(interactive plotly, each with a caption computed from this run's numbers) and
its tables (click a header to sort, a box to filter; at most
:data:`MAX_TABLE_ROWS` rows each). Clicking a row of the groups table draws
that group's attention row (clean, each individual ablation, joint) from
``tables/attention_rows.parquet``
(:func:`selfrepair.analysis.attention_rows.attention_rows_table`).

The page needs no network: plotly.js (from the installed ``plotly`` package)
and the page's own JavaScript and CSS (``static/``) are inlined, or with
``plotlyjs="directory"`` plotly.js is written once beside the page as
``plotly.min.js``.

Stages register their sections with :func:`register_section`; the page's code
does not name them, so a stage added later appears by registering its
figures and tables. A section is shown when at least one of its figures or
tables has the tables it needs; the others are skipped.

URL fragment (also a test hook): ``#sort=TABLE:COLUMN:asc|desc``,
``filter=TABLE:TEXT``, ``drill=TABLE:ROW`` (``ROW`` = the row's position in
the table) and ``at=ELEMENT_ID`` (scrolls it to the top), joined by ``&``, are
applied when the page opens.
"""

from __future__ import annotations

import json
import math
import argparse
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import jinja2
import numpy as np
import pandas as pd
import plotly.io as pio
from markupsafe import Markup
from plotly.offline import get_plotlyjs

# existing code, imported only here (re-point these lines when the package layout changes)
from .._io import atomic_write
from .._version import __version__ as SELFREPAIR_VERSION
from ..analysis.results import canonical_settings, canonical_table, overall_sweep
from . import figures as plots

__all__ = [
    "build_report", "report_main", "register_section", "unregister_section", "sections", "Section",
    "FigureSpec", "TableSpec", "Run", "load_run", "MAX_TABLE_ROWS", "ReportError", "add_report_arguments",
    "report_cli",
]

MAX_TABLE_ROWS = 2000  # rows per table on the page (the full tables are in tables/*.csv)
HERE = Path(__file__).resolve().parent
UNITS = {"logit_diff": "logit difference", "logprob": "log-probability"}


class ReportError(ValueError):
    """The run folder cannot be reported (not a finished run, unreadable table); the message says what to do."""


# ----------------------------------------------------------------------------- the run, as the page sees it


@dataclass
class Run:
    """A finished run folder: ``summary`` (summary.json) and ``tables`` (every tables/*.parquet by name)."""

    run_dir: Path
    summary: dict
    tables: dict[str, pd.DataFrame]

    def has(self, *names: str) -> bool:
        return all(n in self.tables for n in names)

    @property
    def settings(self) -> dict:
        return dict(self.summary.get("settings") or {})

    @property
    def threshold(self) -> float:
        return float(self.settings.get("threshold", 0.1))

    @property
    def model(self) -> dict:
        return dict(self.summary.get("model") or {})

    @property
    def units(self) -> str:
        return UNITS.get((self.summary.get("task") or {}).get("metric"), "metric units")

    def groups(self) -> pd.DataFrame:
        """The groups table with the settings (and n_layers, n_heads) in ``attrs`` as the plots expect."""
        g = self.tables["groups"].copy()
        g.attrs["settings"] = dict(self.settings, n_layers=self.model.get("n_layers"),
                                   n_heads=self.model.get("n_heads"))
        return g


def _read_table(path: Path) -> pd.DataFrame:
    df = pd.read_parquet(path)
    for c in df.columns:  # list cells come back as numpy arrays: plain tuples, as the run wrote them
        if df[c].dtype == object and len(df) and isinstance(df[c].iloc[0], np.ndarray):
            df[c] = [tuple(v.tolist()) if isinstance(v, np.ndarray) else v for v in df[c]]
    return canonical_table(df)  # a run written before a column rename: the new names


def load_run(run_dir: Union[str, Path]) -> Run:
    """Read ``summary.json`` and every ``tables/*.parquet`` of a finished run folder."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ReportError(f"{run_dir} is not a folder: give the folder `selfrepair analyze --out` wrote")
    sp = run_dir / "summary.json"
    if not sp.is_file():
        raise ReportError(f"{run_dir} is not a finished selfrepair run (no summary.json): finish it with "
                          f"`selfrepair analyze --out {run_dir} --resume`, or run `selfrepair analyze` first")
    try:
        summary = json.loads(sp.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ReportError(f"{sp} is not valid JSON ({e}); rerun the analysis with --force") from e
    if isinstance(summary, dict) and isinstance(summary.get("settings"), dict):  # written before a settings rename
        summary["settings"] = canonical_settings(summary["settings"])
    tables = {}
    for p in sorted((run_dir / "tables").glob("*.parquet")):
        try:
            tables[p.stem] = _read_table(p)
        except Exception as e:  # pyarrow's errors for a truncated file
            raise ReportError(f"cannot read {p} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                              "rerun the analysis with --force") from e
    return Run(run_dir, summary, tables)


# ----------------------------------------------------------------------------- the registry


@dataclass(frozen=True)
class FigureSpec:
    """A figure of a section: ``build(run) -> plotly Figure``; ``caption(run) -> str``, one sentence from this
    run's numbers; drawn when the run has the tables ``needs`` and ``when(run)`` (if given) is true."""

    key: str
    build: Callable[[Run], Any]
    caption: Callable[[Run], str]
    needs: tuple[str, ...] = ()
    when: Optional[Callable[[Run], bool]] = None

    def available(self, run: Run) -> bool:
        return run.has(*self.needs) and (self.when is None or bool(self.when(run)))


@dataclass(frozen=True)
class TableSpec:
    """A table of a section: ``tables/<name>.parquet`` as an HTML table (sortable, filterable).

    ``columns``: the columns shown, in order (those absent are skipped; None: all);
    ``caption(run)``: a sentence above it; ``max_rows``: the cap on rows shown;
    ``drill_key``: columns matching a row to the attention-row drill-down data
    (``tables/attention_rows.parquet``): clicking the row draws its figure.
    """

    name: str
    title: str
    columns: Optional[tuple[str, ...]] = None
    caption: Optional[Callable[[Run], str]] = None
    max_rows: int = MAX_TABLE_ROWS
    drill_key: Optional[tuple[str, ...]] = None

    def available(self, run: Run) -> bool:
        return run.has(self.name)


@dataclass(frozen=True)
class Section:
    key: str
    title: str
    figures: tuple[FigureSpec, ...] = ()
    tables: tuple[TableSpec, ...] = ()
    order: float = 100.0
    intro: Optional[Callable[[Run], str]] = None
    needs: tuple[str, ...] = ()

    def available(self, run: Run) -> bool:
        return run.has(*self.needs) and (any(f.available(run) for f in self.figures)
                                         or any(t.available(run) for t in self.tables))


_SECTIONS: dict[str, Section] = {}


def register_section(key: str, title: str, *, figures: Sequence[FigureSpec] = (), tables: Sequence[TableSpec] = (),
                     order: float = 100.0, intro: Optional[Callable[[Run], str]] = None,
                     needs: Sequence[str] = ()) -> Section:
    """Add (or replace, same ``key``) a section of the report; sections appear by ``order``, then ``key``.

    ``needs``: tables the whole section requires (beyond each figure's and
    table's own); ``intro(run)``: an optional paragraph under the title.
    """
    if not key or not isinstance(key, str):
        raise ValueError(f"register_section: key must be a non-empty string, got {key!r}")
    for f in figures:
        if not isinstance(f, FigureSpec):
            raise TypeError(f"register_section({key!r}): figures must be FigureSpec, got {type(f).__name__}")
    for t in tables:
        if not isinstance(t, TableSpec):
            raise TypeError(f"register_section({key!r}): tables must be TableSpec, got {type(t).__name__}")
    s = Section(key, title, tuple(figures), tuple(tables), float(order), intro, tuple(needs))
    _SECTIONS[key] = s
    return s


def unregister_section(key: str) -> None:
    _SECTIONS.pop(key, None)


def sections() -> list[Section]:
    """The registered sections in page order."""
    return sorted(_SECTIONS.values(), key=lambda s: (s.order, s.key))


# ----------------------------------------------------------------------------- captions: numbers of this run


def _fmt(x, spec: str = ".3g") -> str:
    if x is None:
        return "n/a"
    try:
        x = float(x)
    except (TypeError, ValueError):
        return str(x)
    return "n/a" if not math.isfinite(x) else format(x, spec)


def _pct(x, digits: int = 1) -> str:
    return _fmt(100 * float(x), f".{digits}f") + "%" if x is not None and math.isfinite(float(x)) else "n/a"


def _cap_joint_vs_sum(run: Run, *, effects: str = "local") -> str:
    g = run.tables["groups"]
    col = "interaction" if effects == "local" else "global_interaction"
    r = g[col].astype(float)
    d = r[np.isfinite(r)]
    t = run.threshold
    if not len(d):
        return (f"None of the {len(g)} groups has a defined {effects} ratio r (every joint effect is below the "
                "effect floor), so no group can be flagged; more prompts or a lower --min-contribution find more.")
    n_sr = int((d > t).sum())
    k = run.settings.get("k")
    what = f"top-{k} keys" if k else "top keys"
    s = (f"{n_sr} of the {len(d)} groups with a defined {effects} ratio ({_pct(n_sr / len(d))}) lie beyond the "
         f"threshold line r = {t:g}: ablating their {what} together costs more than the individual ablations added "
         f"up; the median r is {_fmt(d.median())}")
    if effects == "global" and "interaction" in g:
        rl = g["interaction"].astype(float)
        dl = rl[np.isfinite(rl)]
        s += f" (locally {int((dl > t).sum())} of {len(dl)}, {_pct((dl > t).mean() if len(dl) else float('nan'))})"
    return s + "."


def _cap_sweep(run: Run) -> str:
    sw = overall_sweep(run.tables["sweep"]).sort_values("threshold")
    if not len(sw) or not np.isfinite(sw["fraction"].astype(float)).any():
        return "No group has a defined ratio, so the share flagged is undefined at every threshold."
    x = sw["threshold"].to_numpy(float)
    f = sw["fraction"].to_numpy(float)
    i = int(np.argmin(np.abs(x - run.threshold)))
    row = sw.iloc[i]
    return (f"The share of groups flagged falls from {_pct(f[0])} at r > {x[0]:g} to {_pct(f[-1])} at r > {x[-1]:g}; "
            f"at the chosen threshold {x[i]:g} it is {_pct(row['fraction'])} "
            f"(95% interval {_pct(row['ci_low'])} to {_pct(row['ci_high'])}, {int(row['n_defined'])} groups).")


def _cap_heatmaps(run: Run) -> str:
    hs = run.tables["head_summary"] if run.has("head_summary") else None
    g = run.tables["groups"]
    if hs is None or not len(hs) or not (hs["n_defined"] > 0).any():
        return f"No head has a group with a defined ratio ({len(g)} groups in all)."
    with_groups = hs[hs["n_defined"] > 0]
    min_n = max(5, int(0.01 * int(hs["n_defined"].sum())))
    pool = with_groups[with_groups["n_defined"] >= min_n]
    basis = f"heads with at least {min_n} groups"
    if not len(pool):
        pool, basis = with_groups, "no head has 5 groups, so over all heads with one"
    top = pool.sort_values(["frac_self_repair", "n_defined"], ascending=False).iloc[0]
    return (f"{len(with_groups)} of {len(hs)} heads have a group with a defined ratio; L{int(top['layer'])}"
            f"H{int(top['head'])} self-repairs most often, in {_pct(top['frac_self_repair'], 0)} of its "
            f"{int(top['n_defined'])} groups ({basis}).")


def _cap_local_vs_global(run: Run) -> str:
    g = run.tables["groups"]
    gap = g["downstream_gap"].astype(float)
    gap = gap[np.isfinite(gap)]
    if not len(gap):
        return "No group has a measured downstream gap."
    n_pos = int((gap > 0).sum())
    return (f"The downstream gap (G_S - sum G_n) - (E_S - sum E_n) is positive in {n_pos} of {len(gap)} groups "
            f"(median {_fmt(gap.median())} {run.units}): in those, the rest of the network adds interaction to "
            f"what the softmax makes inside the head, in the others it takes some away.")


def _estimate_stats(run: Run, truth: str) -> dict:
    est = run.tables.get("estimates")
    out = {}
    if est is not None and len(est):
        e = est[(est["subset"] == "all") & (est["effect"] == truth)]
        out = {str(r.estimate).replace("_estimate", ""): (float(r.spearman), float(r.sign_agreement))
               for r in e.itertuples()}
    return out


def _cap_estimates(run: Run, truth: str) -> str:
    st = _estimate_stats(run, truth)
    if not st:
        g = run.tables["groups"]
        return f"Gradient estimates against the measured {truth} joint effect of {len(g)} groups."
    order = sorted(st, key=lambda k: -st[k][0] if math.isfinite(st[k][0]) else math.inf)
    parts = ", ".join(f"{k} {_fmt(st[k][0], '.2f')}" for k in order)
    return (f"Against the measured {truth} joint effect, the estimates rank the groups with Spearman {parts} "
            f"(sign agreement {', '.join(f'{k} {_pct(st[k][1], 0)}' for k in order)}); {order[0]} ranks best here.")


def _cap_estimates_table(run: Run) -> str:
    st = _estimate_stats(run, "local")
    if "gim" in st and "grad" in st:
        return (f"Agreement of each estimate with the measured effects, all groups and the self-repairing ones; "
                f"on all groups' local effects GIM's Spearman is {_fmt(st['gim'][0], '.2f')} against the plain "
                f"gradient's {_fmt(st['grad'][0], '.2f')}.")
    return "Agreement of each estimate with the measured effects, on all groups and on the self-repairing ones."


def _spearman(a, b) -> float:
    a, b = pd.Series(np.asarray(a, float)), pd.Series(np.asarray(b, float))
    ok = np.isfinite(a) & np.isfinite(b)
    if ok.sum() < 2:
        return float("nan")
    return float(a[ok].rank().corr(b[ok].rank()))


def _cap_head_ranking(run: Run) -> str:
    h = run.tables["heads"]
    m = h["measured"].astype(float)
    top = h.loc[m.abs().idxmax()]
    parts = [f"{name} {_fmt(_spearman(h[c], m), '.2f')}" for name, c in (("GIM", "gim_estimate"),
                                                                         ("the plain gradient", "grad_estimate"))
             if c in h.columns]
    s = (f"Ablating L{int(top['layer'])}H{int(top['head'])} moves the metric most ({_fmt(top['measured'])} "
         f"{run.units}, over {int(top['n_prompts']) if 'n_prompts' in h else '?'} prompts)")
    if parts:
        s += "; the rankings by attribution patching have Spearman " + " and ".join(parts) + " with the measured one"
    return s + "."


def _cap_heads_table(run: Run) -> str:
    h = run.tables["heads"]
    if "acts_via_qk" in h.columns:
        n = int(h["acts_via_qk"].astype(bool).sum())
        return (f"One row per head ({len(h)}); {n} of them act mostly through later heads' queries and keys "
                "(acts_via_qk), where patching estimates miss the most.")
    return f"One row per head ({len(h)})."


def _cap_tokens(run: Run) -> str:
    t = run.tables["token_attributions"]
    p = int(t["prompt"].iloc[0])
    d = t[t["prompt"] == p]
    if "is_metric_position" in d:
        mpos = d.loc[d["is_metric_position"].astype(bool), "position"]
        if len(mpos):
            d = d[d["position"] <= int(mpos.iloc[0])]
    parts = []
    for m in ("grad", "gim"):
        if m in d.columns:
            v = d[m].astype(float)
            j = v.abs().idxmax()
            parts.append(f"{m} attributions sum to {_fmt(v.sum())} {run.units} and put the most weight on "
                         f"{d.loc[j, 'token']!r} (position {int(d.loc[j, 'position'])})")
    return f"For prompt {p}, " + "; ".join(parts) + "."


def _cap_faithfulness(run: Run) -> str:
    f = run.tables["faithfulness"]
    if "protocol" in f.columns:  # the caption reads the default protocol (the task's metric)
        f = f[f["protocol"] == "default"]
    means = f.groupby("method")["comprehensiveness"].mean()
    if not len(means):
        return "No faithfulness rows."
    best = means.idxmax()
    return ("Deleting each method's top tokens lowers the metric on average by " +
            ", ".join(f"{k} {_fmt(v)}" for k, v in means.items()) +
            f" {run.units} over the fractions q (comprehensiveness, higher is more faithful): {best} is the more "
            "faithful here.")


def _cap_attention_row(run: Run) -> str:
    d = run.tables["attention_row"]
    c = d.drop_duplicates("order").sort_values("order")
    f = d.iloc[0]
    e_sum, e_joint = float(c["effect"].iloc[1:-1].sum()), float(c["effect"].iloc[-1])
    return (f"In prompt {int(f['prompt'])}, L{int(f['layer'])}H{int(f['head'])}, query {int(f['query'])}, ablating "
            f"keys {f['keys']} one at a time costs {_fmt(e_sum)} {run.units} added up and together {_fmt(e_joint)} "
            f"(r = {_fmt(f['interaction'])}): the softmax hands each ablated key's weight to the other one. "
            "Click a row of the groups table to draw any group's row.")


def _cap_groups(run: Run) -> str:
    g = run.tables["groups"]
    n_sr = int(g["self_repair"].fillna(False).astype(bool).sum()) if "self_repair" in g else 0
    s = (f"{len(g)} groups, {n_sr} self-repairing at r > {run.threshold:g}; the full table, with every column, is "
         "tables/groups.csv.")
    if run.has("attention_rows"):
        s += (f" Click a row to draw its attention row ({len(run.tables['attention_rows'])} of the groups are stored "
              "in tables/attention_rows.parquet).")
    return s


def _has_global(run: Run) -> bool:
    return run.has("groups") and "global_effect_joint" in run.tables["groups"].columns and len(run.tables["groups"]) > 0


def _has_groups(run: Run) -> bool:
    return run.has("groups") and len(run.tables["groups"]) > 0


def _estimates_when(truth: str):
    col = {"local": "effect_joint", "global": "global_effect_joint"}[truth]

    def ok(run: Run) -> bool:
        g = run.tables["groups"]
        return len(g) > 0 and col in g.columns and any(c in g.columns for c in ("grad_estimate", "gim_estimate"))
    return ok


GROUP_COLUMNS = ("prompt", "layer", "head", "query", "keys", "effects", "effect_sum", "effect_joint", "interaction",
                 "interaction_sym", "self_repair", "value_similarity", "global_effect_joint", "global_interaction",
                 "downstream_gap", "grad_estimate", "tsg_estimate", "gim_estimate", "mass", "metric")


def _register_builtin() -> None:
    t = lambda run: run.threshold  # noqa: E731
    register_section(
        "self_repair", "Self-repair inside attention", order=10,
        intro=lambda run: (f"Each group is one (prompt, layer, head, query) row with its top-{run.settings.get('k', '?')} "
                           f"keys; its interaction ratio r = (E_S - sum E_n) / E_S compares the joint score ablation "
                           f"({run.settings.get('score_ablation', 'mean')}) with the individual ones; r > {run.threshold:g} "
                           "counts as self-repair."),
        figures=[
            FigureSpec("joint_vs_sum", lambda run: plots.plot_joint_vs_sum(run.groups(), threshold=t(run)),
                       _cap_joint_vs_sum, needs=("groups",), when=_has_groups),
            FigureSpec("threshold_sweep", lambda run: plots.plot_threshold_sweep(run.tables["sweep"], threshold=t(run)),
                       _cap_sweep, needs=("sweep",), when=_has_groups),
            FigureSpec("head_heatmaps", lambda run: plots.plot_head_heatmaps(
                run.groups(), threshold=t(run), n_layers=run.model.get("n_layers"), n_heads=run.model.get("n_heads")),
                _cap_heatmaps, needs=("groups",), when=_has_groups),
        ],
        tables=[
            TableSpec("groups", "Groups", columns=GROUP_COLUMNS, caption=_cap_groups,
                      drill_key=("prompt", "layer", "head", "query")),
            TableSpec("head_summary", "Per head", caption=lambda run: (
                "Per layer and head: groups, how many have a defined ratio, the fraction self-repairing with its "
                f"bootstrap interval; {int((run.tables['head_summary']['n_self_repair'] > 0).sum())} of "
                f"{len(run.tables['head_summary'])} heads have a self-repairing group.")),
            TableSpec("sweep", "Threshold sweep"),
        ])
    register_section(
        "local_global", "Inside the head and in the whole network", order=20,
        figures=[
            FigureSpec("joint_vs_sum_global", lambda run: plots.plot_joint_vs_sum(run.groups(), effects="global",
                                                                                  threshold=t(run)),
                       lambda run: _cap_joint_vs_sum(run, effects="global"), needs=("groups",), when=_has_global),
            FigureSpec("local_vs_global", lambda run: plots.plot_local_vs_global(run.groups(), threshold=t(run)),
                       _cap_local_vs_global, needs=("groups",),
                       when=lambda run: _has_global(run) and "downstream_gap" in run.tables["groups"]),
        ])
    register_section(
        "estimates", "Gradient estimates against measured effects", order=30,
        figures=[
            FigureSpec("estimates_local", lambda run: plots.plot_estimates(run.groups(), truth="local", threshold=t(run)),
                       lambda run: _cap_estimates(run, "local"), needs=("groups",), when=_estimates_when("local")),
            FigureSpec("estimates_global", lambda run: plots.plot_estimates(run.groups(), truth="global",
                                                                            threshold=t(run)),
                       lambda run: _cap_estimates(run, "global"), needs=("groups",), when=_estimates_when("global")),
        ],
        tables=[TableSpec("estimates", "Estimate against measured effect", caption=_cap_estimates_table)])
    register_section(
        "head_ranking", "Head ranking", order=40,
        figures=[FigureSpec("head_ranking", lambda run: plots.plot_head_ranking(run.tables["heads"], units=run.units),
                            _cap_head_ranking, needs=("heads",))],
        tables=[TableSpec("heads", "Heads", caption=_cap_heads_table)])
    register_section(
        "token_attributions", "Token attributions and faithfulness", order=50,
        figures=[FigureSpec("token_attributions", lambda run: plots.plot_token_attributions(
            run.tables["token_attributions"], units=run.units), _cap_tokens, needs=("token_attributions",),
            when=lambda run: len(run.tables["token_attributions"]) > 0)],
        tables=[TableSpec("faithfulness", "Faithfulness", caption=_cap_faithfulness)])
    register_section(
        "attention_row", "One row made visible", order=60,
        figures=[FigureSpec("attention_row", lambda run: plots.plot_attention_row(run.tables["attention_row"],
                                                                                  units=run.units),
                            _cap_attention_row, needs=("attention_row",),
                            when=lambda run: len(run.tables["attention_row"]) > 0)])


_register_builtin()


# ----------------------------------------------------------------------------- rendering pieces


def _script_json(obj) -> str:
    """JSON text safe inside <script>: '<' written as \\u003c (valid JSON), so no '</script>' or '<!--'."""
    text = obj if isinstance(obj, str) else json.dumps(obj, separators=(",", ":"), allow_nan=False)
    return text.replace("<", "\\u003c")


def _script_js(code: str) -> str:
    """JavaScript source safe inside <script>: '</script' cannot occur in it (checked, not rewritten)."""
    if "</script" in code.lower():
        raise ValueError("inlined JavaScript contains '</script'; serve it as a file instead (plotlyjs='directory')")
    return code


def _figure_json(fig) -> str:

    fig = fig.to_dict() if hasattr(fig, "to_dict") else fig
    lay = fig.setdefault("layout", {})
    lay.pop("width", None)  # the page's width; the figure's height is kept
    lay["autosize"] = True
    return _script_json(pio.to_json(fig, validate=False, pretty=False, remove_uids=True))


def _is_seq(v) -> bool:
    return isinstance(v, (list, tuple, np.ndarray))


def _cell(v) -> tuple[str, Optional[str]]:
    """(text shown, sort value or None) of one table cell."""
    if v is None or (isinstance(v, float) and math.isnan(v)) or v is pd.NA:
        return "", None
    if isinstance(v, (bool, np.bool_)):
        return ("yes" if v else "no"), ("1" if v else "0")
    if isinstance(v, (int, np.integer)):
        return str(int(v)), str(int(v))
    if isinstance(v, (float, np.floating)):
        f = float(v)
        if not math.isfinite(f):
            return str(f), None
        return format(f, ".4g"), repr(f)
    if _is_seq(v):
        items = list(v)
        txt = ", ".join(format(float(x), ".3g") if isinstance(x, (float, np.floating)) else str(x) for x in items)
        return f"({txt})", None
    return str(v), None


def _table_model(spec: TableSpec, run: Run, drill_keys: Optional[set]) -> dict:
    df = run.tables[spec.name]
    cols = [c for c in (spec.columns or df.columns) if c in df.columns]
    n = len(df)
    shown = df.iloc[: spec.max_rows]
    numeric = {c: (pd.api.types.is_numeric_dtype(df[c]) or pd.api.types.is_bool_dtype(df[c])) for c in cols}
    rows = []
    key_cols = spec.drill_key if spec.drill_key and all(c in df.columns for c in spec.drill_key) else None
    for i, rec in enumerate(shown[cols].itertuples(index=False, name=None)):
        cells = [_cell(v) for v in rec]
        key = None
        if key_cols is not None:
            key = ":".join(str(int(shown[c].iloc[i])) for c in key_cols)
        rows.append({"i": i, "cells": cells, "key": key, "drillable": key is not None and drill_keys is not None
                     and key in drill_keys})
    hidden = [c for c in df.columns if c not in cols]
    return {"id": spec.name, "title": spec.title, "columns": [{"name": c, "numeric": numeric[c]} for c in cols],
            "rows": rows, "n_total": n, "n_shown": len(shown), "capped": n > len(shown), "hidden": hidden,
            "caption": _safe_caption(spec.caption, run) if spec.caption else None,
            "drill": key_cols is not None, "drill_key": list(key_cols or ())}


def _safe_caption(fn, run: Run) -> str:
    try:
        return str(fn(run))
    except Exception as e:  # a caption must never take the page down; say what failed
        warnings.warn(f"report caption failed: {type(e).__name__}: {e}", stacklevel=2)
        return f"(caption unavailable: {type(e).__name__}: {e})"


def _drill_data(run: Run, scale: int = 100_000) -> Optional[dict]:
    """attention_rows as compact JSON for the page: token lists once per prompt, weights as integers in units of
    ``1 / scale`` (1e-5 by default: the page shows 4 decimals; a third of the size of rounded decimals)."""
    if not run.has("attention_rows"):
        return None
    d = run.tables["attention_rows"]
    tokens: dict[str, list] = {}
    rows = {}

    def rnd(v):
        return [int(round(float(x) * scale)) for x in v]

    def num(v):
        v = float(v)
        return v if math.isfinite(v) else None

    for r in d.itertuples(index=False):
        p = str(int(r.prompt))
        tok = [str(x) for x in r.tokens]
        if len(tok) > len(tokens.get(p, ())):
            tokens[p] = tok
        key = f"{int(r.prompt)}:{int(r.layer)}:{int(r.head)}:{int(r.query)}"
        rows[key] = {"prompt": int(r.prompt), "layer": int(r.layer), "head": int(r.head), "query": int(r.query),
                     "keys": [int(k) for k in r.keys], "clean": rnd(r.clean),
                     "individual": [rnd(x) for x in r.individual], "joint": rnd(r.joint),
                     "effects": [num(x) for x in r.effects], "effect_joint": num(r.effect_joint),
                     "interaction": num(r.interaction), "global_effects": [num(x) for x in r.global_effects],
                     "global_effect_joint": num(r.global_effect_joint), "score_ablation": str(r.score_ablation)}
    return {"tokens": tokens, "rows": rows, "units": run.units, "scale": scale}


def _headline(run: Run) -> list[tuple[str, str]]:
    """(label, value) pairs of the summary's headline numbers."""
    h = run.summary.get("headline") or {}
    out: list[tuple[str, str]] = []
    if "groups" in h:
        out.append(("groups analysed", f"{h['groups']} ({h.get('groups_defined', '?')} with a defined ratio r, "
                                       f"{h.get('groups_undefined', '?')} below the effect floor)"))
    sr = h.get("self_repairing")
    if sr:
        out.append((f"self-repairing (r > {_fmt(h.get('threshold'), 'g')})",
                    f"{_pct(sr['fraction'])} [95% CI {_pct(sr['ci_low'])}, {_pct(sr['ci_high'])}]"))
    if h.get("sweep"):
        out.append(("over the sweep", ", ".join(f"r > {_fmt(s['threshold'], 'g')}: {_pct(s['fraction'])}"
                                                for s in h["sweep"])))
    if h.get("top_heads"):
        out.append((f"top self-repairing heads (>= {h.get('top_heads_min_groups')} groups)", ", ".join(
            f"L{x['layer']}H{x['head']} {_pct(x['fraction'], 0)} of {x['n']} (median r {_fmt(x['median_r'], '.2f')})"
            for x in h["top_heads"])))
    v = h.get("value_similarity_median")
    if v:
        out.append(("value similarity (median)", f"self-repairing {_fmt(v.get('self_repairing'), '.2f')}, "
                                                 f"other {_fmt(v.get('other'), '.2f')}"))
    signs = h.get("sign_agreement_estimate_vs_measured") or {}
    for truth, c in (h.get("spearman_estimate_vs_measured") or {}).items():
        out.append((f"estimates vs measured {truth} joint effect",
                    "Spearman " + ", ".join(f"{k} {_fmt(x, '.2f')}" for k, x in c.items()) + "; sign agreement "
                    + ", ".join(f"{k} {_pct(x, 0)}" for k, x in (signs.get(truth) or {}).items())))
    if h.get("downstream_gap_median") is not None:
        out.append(("downstream gap, median", f"{_fmt(h['downstream_gap_median'])} {run.units}"))
    if h.get("head_ranking_spearman"):
        out.append(("head ranking vs measured ablation", "Spearman " + ", ".join(
            f"{k} {_fmt(x, '.2f')}" for k, x in h["head_ranking_spearman"].items())))
    return out


def _kv(d: Mapping, skip: Sequence[str] = ()) -> list[tuple[str, str]]:
    return [(str(k), json.dumps(v) if isinstance(v, (list, dict)) else str(v)) for k, v in d.items() if k not in skip]


def _static(name: str) -> str:
    return (HERE / "static" / name).read_text(encoding="utf-8")


# ----------------------------------------------------------------------------- build


def build_report(run_dir: Union[str, Path], *, out: Union[str, Path, None] = None, plotlyjs: str = "inline",
                 strict: bool = False) -> Path:
    """Write ``run_dir/report.html`` (or ``out``) from the run folder's summary.json and tables; returns its path.

    ``plotlyjs``: ``"inline"`` (default: one self-contained file, about 5 MB
    of it plotly.js) or ``"directory"`` (``plotly.min.js`` written beside the
    page once; the page then needs that file). ``strict``: raise when a figure
    or caption fails instead of showing the error in its place.
    """

    if plotlyjs not in ("inline", "directory"):
        raise ValueError(f"plotlyjs must be 'inline' or 'directory', got {plotlyjs!r}")
    t0 = time.perf_counter()
    run = load_run(run_dir)
    out = Path(out) if out is not None else run.run_dir / "report.html"
    drill = _drill_data(run)
    drill_keys = set(drill["rows"]) if drill else None
    page_sections = []
    n_fig = 0
    for s in sections():
        if not s.available(run):
            continue
        figs = []
        for f in s.figures:
            if not f.available(run):
                continue
            n_fig += 1
            item = {"key": f.key, "id": f"fig-{s.key}-{f.key}", "json": None, "error": None, "caption": None}
            try:
                item["json"] = _figure_json(f.build(run))
                item["caption"] = str(f.caption(run))
            except Exception as e:
                if strict:
                    raise
                warnings.warn(f"report figure {s.key}/{f.key} failed: {type(e).__name__}: {e}", stacklevel=2)
                item["error"] = f"{type(e).__name__}: {e}"
            figs.append(item)
        tables = [_table_model(t, run, drill_keys) for t in s.tables if t.available(run)]
        intro = _safe_caption(s.intro, run) if s.intro else None
        page_sections.append({"key": s.key, "title": s.title, "intro": intro, "figures": figs, "tables": tables})

    sm = run.summary
    model = run.model
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(HERE / "templates")),
                             autoescape=jinja2.select_autoescape(["html", "j2"]), trim_blocks=True,
                             lstrip_blocks=True, undefined=jinja2.StrictUndefined)
    if plotlyjs == "inline":

        plotly_inline, plotly_src = _script_js(get_plotlyjs()), None
    else:
        js = out.parent / "plotly.min.js"
        if not js.exists():

            atomic_write(js, lambda tmp: tmp.write_text(get_plotlyjs(), encoding="utf-8"))
        plotly_inline, plotly_src = None, "plotly.min.js"
    task = dict(sm.get("task") or {})
    ctx = dict(
        title=f"selfrepair run {run.run_dir.name}",
        run_name=run.run_dir.name,
        headline=_headline(run),
        model=model, weights=model.get("weights_sha256", ""),
        model_rows=_kv(model, skip=("weights_sha256",)),
        task_rows=_kv(task),
        settings_rows=_kv(run.settings),
        study_rows=_kv({k: sm[k] for k in ("seed", "head_ablation", "attribution_n", "device", "threads", "started",
                                            "finished") if k in sm}),
        versions_rows=_kv(sm.get("versions") or {}),
        timings_rows=_kv(sm.get("timings_s") or {}),
        task=task, sections=page_sections, max_rows=MAX_TABLE_ROWS,
        drill_json=Markup(_script_json(drill)) if drill else None,
        plotly_inline=Markup(plotly_inline) if plotly_inline else None,
        plotly_src=plotly_src,
        css=Markup(_static("report.css")),
        js=Markup(_script_js(_static("report.js"))),
        built=time.strftime("%Y-%m-%d %H:%M:%S"), builder_version=SELFREPAIR_VERSION,
        n_figures=n_fig,
    )
    for sec in page_sections:
        for f in sec["figures"]:
            if f["json"] is not None:
                f["json"] = Markup(f["json"])
    text = env.get_template("report.html.j2").render(**ctx)
    atomic_write(out, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    return out


def report_main(run_dir: Union[str, Path], *, plotlyjs: str = "inline") -> int:
    """``selfrepair report RUN_DIR``: rebuild the run's report.html; prints one line, returns the exit status
    (2 with one line on stderr when the folder is not a finished run)."""
    try:
        t0 = time.perf_counter()
        path = build_report(run_dir, plotlyjs=plotlyjs)
    except ReportError as e:
        print(f"selfrepair: error: {e}", file=sys.stderr)
        return 2
    size = path.stat().st_size
    print(f"wrote {path} ({size / 1e6:.1f} MB) in {time.perf_counter() - t0:.1f} s; open it in a browser "
          "(works offline)")
    return 0


REPORT_HELP = "rebuild a run folder's report.html from its tables (offline, no model needed)"


def add_report_arguments(parser) -> None:
    """The ``selfrepair report`` arguments on an argparse parser (a subparser of the main CLI, or its own)."""
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a finished run folder (with summary.json and tables/)")
    parser.add_argument("--plotlyjs", choices=["inline", "directory"], default="inline",
                        help="'inline': one self-contained file (about 5 MB of plotly.js); 'directory': "
                             "plotly.min.js written beside report.html")


def report_cli(argv: Optional[Sequence[str]] = None) -> int:
    """``selfrepair report RUN_DIR [--plotlyjs inline|directory]`` without the main parser; returns the exit
    status."""

    ap = argparse.ArgumentParser(prog="selfrepair report", description=REPORT_HELP)
    add_report_arguments(ap)
    args = ap.parse_args(list(sys.argv[1:] if argv is None else argv))
    return report_main(args.run_dir, plotlyjs=args.plotlyjs)
