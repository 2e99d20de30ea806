"""The study pipeline the CLI and the notebooks share: every analysis of a model and task into a run
folder's tables (``run_study``), its figures (``make_figures``) and its headline numbers (``headline``)."""

from __future__ import annotations

import contextlib
import json
import re
import sys
import time
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Optional

import numpy as np
import pandas as pd
import torch

from ..analysis.attention_row import attention_row_data
from ..analysis.attention_rows import attention_rows_table
from ..analysis.context import context_sweep
from ..analysis.stability import stability
from ..analysis.attribution import explain, head_attributions, token_attribution_table
from ..analysis.estimates import agreement, compare_estimates
from ..analysis.faithfulness import PROTOCOLS, faithfulness
from ..analysis.identity import model_hash
from ..analysis.results import SelfRepairResult, overall_sweep, read_result_info
from ..analysis.self_repair import analyze_self_repair
from ..analysis.stats import spearman_interval
from ..models.probe import probe
from ..tasks.tokens import get_tokenizer
from ..report import figures as plots
from .rundir import CLIError, accepted_hashes, read_run_json, read_table, settings_hash, write_json, write_table

EXIT_ERROR = 2

__all__ = ["run_study", "token_tables", "row_stages", "Study", "Timings", "make_figures", "write_figures", "headline", "format_summary",
           "model_info", "figure_index", "what_r_is_made_of", "redraw", "api_kwargs", "is_dtype", "first_line", "FIGURES", "SWEEP_THRESHOLDS", "CONTEXT_SETTINGS", "sweep_task_for",
           "SUMMARY_THRESHOLDS"]


SWEEP_THRESHOLDS = (0.0, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0)
SUMMARY_THRESHOLDS = (0.0, 0.05, 0.1, 0.2, 0.5, 1.0)
FIGURES = {
    "01_joint_vs_sum": "joint ablation effect vs the sum of individual effects (the GIM paper's figure)",
    "02_estimates_local": "grad / TSG / GIM estimates vs the measured local joint effect",
    "02_estimates_global": "grad / TSG / GIM estimates vs the measured global joint effect",
    "03_head_heatmaps": "layer x head: fraction self-repairing and median interaction",
    "04_threshold_sweep": "fraction self-repairing vs the threshold, with its interval",
    "05_local_vs_global": "local vs global interaction and the downstream gap",
    "06_head_ranking": "heads ranked by measured ablation effect, beside grad and GIM",
    "07_attention_row": "one self-repairing row: attention weights clean, per ablation, joint",
    "08_token_attributions": "token attributions, grad vs GIM, over one prompt",
    "09_r_vs_mass": "interaction ratio r vs its pure-geometry part mass_interaction, coloured by c_ratio",
    "10_flag_rules": "per head: share self-repairing by r > threshold vs by the permutation test",
    "11_group_sizes": "per head: distribution of n_contributing and n_clusters",
    "12_excess_by_group_size": "excess interaction (r - mass_interaction) by group size",
    "13_key_estimates": "per-key grad / TSG estimates vs Shapley values and individual effects",
    "14_context_sweep": "share self-repairing, median r and estimate quality against the window length",
    "15_stability": "stability of the conclusions under meaning-preserving edits, per edit kind",
}


def is_dtype(x) -> bool:
    return type(x).__name__ == "dtype" and type(x).__module__ == "torch"


def api_kwargs(settings: dict) -> dict:
    """CLI settings (JSON-able: dtype as a string) -> keyword arguments of analyze_self_repair."""
    kw = dict(settings)
    if isinstance(kw.get("dtype"), str):
        kw["dtype"] = getattr(torch, kw["dtype"])
    return kw


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (its type name when it has none)."""
    msg = str(e).strip().splitlines()
    return msg[0] if msg else type(e).__name__


def model_info(model, spec) -> dict:
    cfg = getattr(model, "cfg", None)
    info = {"spec": spec if spec is not None else "default",
            "path": "default" if spec is None else str(spec),  # as given: no path of the machine that ran it
            "class": type(model).__name__,
            "weights_sha256": model_hash(model)}  # the analysis' own hash (selfrepair.analysis.model_hash)
    for k in ("n_layers", "n_heads", "d_model", "d_head", "n_ctx", "d_vocab"):
        v = getattr(cfg, k, None)
        if v is not None:
            info[k] = int(v)
    try:
        be = probe(model)
        info.update(architecture=be.architecture, backend=be.kind, n_kv_heads=be.n_kv_heads, score_site=be.score_site)
        info.setdefault("n_layers", be.n_layers)
        info.setdefault("n_heads", be.n_heads)
    except Exception:
        pass
    return info


class Timings:
    """Wall-clock and CPU seconds (all threads of this process) per step: ``with timings("step"): ...``."""

    def __init__(self):
        self.wall: dict[str, float] = {}
        self.cpu: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, label: str):
        t0, c0 = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            self.wall[label] = round(time.perf_counter() - t0, 3)
            self.cpu[label] = round(time.process_time() - c0, 3)


class Study:
    """One ``selfrepair analyze`` run: stages that each write their tables and a settings stamp beside them.

    A stage's tables are read back instead of recomputed only when ``resume`` is set, all its tables exist
    and its stamp (``tables/.stage-<name>.json``, written after the tables) holds the hash of this run's
    ``key``; tables that cannot be read are recomputed with a warning.
    """

    def __init__(self, out: Path, progress: bool, timings: Timings, *, resume: bool = False,
                 key: Optional[dict] = None):
        self.out = out
        self.tables = out / "tables"
        self.progress = progress
        self.timings = timings
        self.resume = resume
        self.key_hash = settings_hash(key if key is not None else {})
        self.accepted = accepted_hashes(key if key is not None else {})  # also the hash before a settings rename
        self.resumed: list[str] = []

    def has(self, name: str) -> bool:
        return (self.tables / f"{name}.parquet").is_file() and (self.tables / f"{name}.csv").is_file()

    def stamp_path(self, label: str) -> Path:
        return self.tables / f".stage-{re.sub(r'[^a-z0-9]+', '-', label.lower()).strip('-')}.json"

    def reusable(self, label: str, paths: list[Path], stamp: Path) -> bool:
        """May the files ``paths`` of stage ``label`` be read back? (--resume, all present, stamp matches)"""
        if not self.resume or not all(p.is_file() for p in paths):
            return False
        try:
            ok = json.loads(stamp.read_text()).get("settings_sha256") in self.accepted
        except (OSError, ValueError, AttributeError):
            ok = False
        if not ok:
            self._say(f"[{label}] the tables in {self.out} were not made with this run's settings "
                      f"({stamp.name} missing or different): recomputing", always=True)
        return ok

    def write_stamp(self, label: str, stamp: Path, names: list[str]) -> None:
        write_json(stamp, {"stage": label, "tables": names, "settings_sha256": self.key_hash})

    def stage(self, label: str, names: list[str], compute: Callable[[], dict]):
        """Tables ``names`` from disk when reusable (see the class), else ``compute()`` and write them."""
        stamp = self.stamp_path(label)
        files = [self.tables / f"{n}.{ext}" for n in names for ext in ("parquet", "csv")]
        if self.reusable(label, files, stamp):
            try:
                out = {n: read_table(self.tables, n) for n in names}
            except Exception as e:  # a damaged table is never trusted
                self._say(f"[{label}] warning: a table in {self.tables} cannot be read ({first_line(e)}): "
                          "recomputing", always=True)
            else:
                self.resumed.append(label)
                self._say(f"[{label}] kept from the interrupted run")
                return out
        stamp.unlink(missing_ok=True)
        with self.timings(label):
            out = compute()
            for n in names:
                write_table(self.tables, n, out[n])
            self.write_stamp(label, stamp, names)
        self._say(f"[{label}] done in {self.timings.wall[label]:.1f} s")
        return out

    def _say(self, msg: str, always: bool = False):
        if self.progress or always:
            print(msg, file=sys.stderr, flush=True)


#: the analysis settings a context sweep passes on to analyze_self_repair (global effects are left out: cost)
CONTEXT_SETTINGS = ("k", "min_contribution", "threshold", "score_ablation", "select", "exclude_bos", "temperature",
                    "value_ablation", "dtype", "batch_size", "min_effect")


#: random-ranking seeds per faithfulness protocol in the study: "paper" replaces tokens cumulatively (one forward
#: per k up to half the prompt), about 10x the default's forwards per ranking, so its floor and ERASER's use one seed
FAITHFULNESS_SEEDS = {"default": (0, 1, 2, 3, 4), "paper": (0,), "eraser": (0,)}


def sweep_task_for(model) -> str:
    """The copy task a context sweep runs on this model: code-copy with a tokenizer, else continuation-copy."""
    return "code-copy" if get_tokenizer(model) is not None else "continuation-copy"


def token_tables(model, task, *, progress: bool) -> dict:
    """Stage 3 of the study: token attributions (grad, GIM) and their faithfulness under every protocol."""
    attrs = {m: explain(model, task, method=m, progress=progress) for m in ("grad", "gim")}
    return {"token_attributions": token_attribution_table(model, task, attrs),
            "faithfulness": pd.concat([faithfulness(model, task, attrs, protocol=pr, progress=progress,
                                                    seeds=FAITHFULNESS_SEEDS[pr]).to_frame()
                                       for pr in PROTOCOLS], ignore_index=True)}


def row_stages(study: "Study", model, task, groups, settings: dict) -> dict:
    """Stages 4 and 5 (when there are groups): the attention row of figure 7 and the report's drill-down rows."""
    if not len(groups):
        return {}
    g = groups
    g.attrs["settings"] = settings
    out = dict(study.stage("attention row", ["attention_row"],
                           lambda: {"attention_row": attention_row_data(model, task, g)}))
    out.update(study.stage("attention rows (report drill-down)", ["attention_rows"],
                           lambda: {"attention_rows": attention_rows_table(model, task, g)}))
    return out


def run_study(model, task, settings: dict, *, out: Path, head_ablation: str, attribution_n: int, seed: int,
              progress: bool, timings: Timings, resume: bool = False, key: Optional[dict] = None,
              context_lengths: Optional[list] = None, with_stability: bool = False) -> dict:
    """Run every stage of the study into ``out``; returns the tables by name and the analysis meta.

    Stages (each writes its tables atomically, then a stamp with the hash of ``key``, the run's identity;
    with ``resume`` a stage whose tables exist and whose stamp matches is read back instead of recomputed):

    1. ``analyze_self_repair`` with ``checkpoint_dir`` (partial results batch by
       batch; the finished result is kept in ``checkpoints/self_repair_result.parquet``),
       then ``compare_estimates`` -> ``groups`` (with ``gim_estimate``),
       ``estimates``, ``estimate_keys`` (its per-key table), ``head_summary`` (``result.summary()``), ``sweep``,
       ``group_sizes`` (``result.group_sizes()``), ``by_group_size`` (``result.by_group_size()``);
    2. ``head_attributions`` -> ``heads``;
    3. ``explain`` (grad, gim) and ``faithfulness`` under every protocol (``"default"``, ``"paper"``,
       ``"eraser"``; one table, a ``protocol`` column) -> ``token_attributions``, ``faithfulness``;
       (2 and 3 on the first ``attribution_n`` prompts, all when 0);
    4. ``plots.attention_row_data`` for the figure of one self-repairing row -> ``attention_row``;
    5. ``attention_rows_table``: the pattern rows (clean, each individual ablation, joint) of up to 500
       groups, for the report's drill-down -> ``attention_rows``;
    6. with ``context_lengths``: ``context_sweep`` (code-copy, or continuation-copy without a tokenizer;
       ``len(task)`` prompts per length, capped at 64) -> ``context_sweep``;
    7. with ``with_stability``: ``stability`` on the attribution prompts -> ``stability`` (its table, with
       ``n_impossible``, ``n_variants`` and ``task_name`` per row).
    """


    study = Study(out, progress, timings, resume=resume, key=key)
    ck = settings.get("checkpoint_dir") or str(out / "checkpoints" / "self_repair")
    res_path = out / "checkpoints" / "self_repair_result.parquet"
    res_stamp = out / "checkpoints" / ".self_repair_result.stage.json"
    torch.manual_seed(seed)

    def read_result():
        if not study.reusable("self-repair analysis", [res_path], res_stamp):
            return None
        try:
            return SelfRepairResult.read_parquet(res_path)
        except Exception as e:  # a damaged file is never trusted: recompute (the batch checkpoints remain)
            study._say(f"[self-repair analysis] warning: {res_path} cannot be read ({first_line(e)}): recomputing",
                       always=True)
            return None

    def groups_stage():
        res = read_result()
        if res is not None:
            study.resumed.append("self-repair analysis")
        else:
            res_stamp.unlink(missing_ok=True)
            with timings("self-repair analysis"):
                kw = api_kwargs(settings)
                kw["checkpoint_dir"] = ck
                res = analyze_self_repair(model, task, **kw)
                res.to_parquet(res_path)  # atomic
                study.write_stamp("self-repair analysis", res_stamp, ["self_repair_result"])
        with timings("compare_estimates"), warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # small subsets: the table's `warning` column says which
            comp = compare_estimates(model, task, res, progress=progress)
        ths = sorted(set(SWEEP_THRESHOLDS) | {float(settings.get("threshold", 0.1))})
        return {"groups": comp.groups, "estimates": comp.report, "estimate_keys": comp.keys,
                "head_summary": res.summary(), "sweep": res.sweep(ths), "group_sizes": res.group_sizes(),
                "by_group_size": res.by_group_size()}

    tabs = dict(study.stage("self-repair analysis + estimates", ["groups", "estimates", "estimate_keys", "head_summary",
                                                                  "sweep", "group_sizes", "by_group_size"], groups_stage))
    sub = task if not attribution_n or attribution_n >= len(task) else task.subset(slice(0, attribution_n))
    tabs.update(study.stage("head attributions", ["heads"], lambda: {
        "heads": head_attributions(model, sub, head_ablation=head_ablation, progress=progress)}))

    tabs.update(study.stage("token attributions + faithfulness", ["token_attributions", "faithfulness"],
                            lambda: token_tables(model, sub, progress=progress)))
    tabs.update(row_stages(study, model, task, tabs["groups"], settings))
    if context_lengths:
        kw = {k: v for k, v in api_kwargs(settings).items() if k in CONTEXT_SETTINGS}
        tabs.update(study.stage("context sweep", ["context_sweep"], lambda: {"context_sweep": context_sweep(
            model, context_lengths, task=sweep_task_for(model), n=min(len(task), 64), seed=seed, **kw).to_frame()}))
    if with_stability:
        def stability_stage():
            st = stability(model, sub, seed=seed, progress=progress)
            t = st.table.copy()
            t["n_impossible"] = t["edit"].map(st.n_impossible).fillna(0).astype(int)
            t["n_variants"] = st.settings["n_variants"]
            t["task_name"] = st.settings["task_name"]
            return {"stability": t}
        tabs.update(study.stage("stability", ["stability"], stability_stage))
    try:
        meta = read_result_info(res_path).get("meta", {}) if res_path.is_file() else {}
    except Exception:  # pragma: no cover - the file was just read or written whole
        meta = {}
    return {"tables": tabs, "resumed": study.resumed, "analysis_meta": meta}


def make_figures(tables: dict, settings: dict, n_layers: Optional[int] = None, n_heads: Optional[int] = None) -> dict:
    """Every figure of the study from its tables (no model needed)."""
    g = tables["groups"].copy()
    g.attrs["settings"] = dict(settings, n_layers=n_layers, n_heads=n_heads)
    t = float(settings.get("threshold", 0.1))
    figs = {}
    has_global = "global_effect_joint" in g.columns
    if len(g):
        figs["01_joint_vs_sum"] = plots.plot_joint_vs_sum(g, threshold=t)
        figs["02_estimates_local"] = plots.plot_estimates(g, truth="local", threshold=t)
        if has_global:
            figs["02_estimates_global"] = plots.plot_estimates(g, truth="global", threshold=t)
        figs["03_head_heatmaps"] = plots.plot_head_heatmaps(g, threshold=t, n_layers=n_layers, n_heads=n_heads)
        figs["04_threshold_sweep"] = plots.plot_threshold_sweep(tables["sweep"], threshold=t)
        if has_global:
            figs["05_local_vs_global"] = plots.plot_local_vs_global(g, threshold=t)
        if "mass_interaction" in g.columns:
            figs["09_r_vs_mass"] = plots.plot_r_vs_mass(g, threshold=t)
            figs["12_excess_by_group_size"] = plots.plot_excess_by_group_size(g)
    if len(g) and "frac_permutation" in tables.get("head_summary", {}):
        figs["10_flag_rules"] = plots.plot_flag_rules(tables["head_summary"], threshold=t)
    if len(g) and "group_sizes" in tables and len(tables["group_sizes"]):
        figs["11_group_sizes"] = plots.plot_group_sizes(tables["group_sizes"])
    if "estimate_keys" in tables and len(tables["estimate_keys"]):
        figs["13_key_estimates"] = plots.plot_key_estimates(tables["estimate_keys"])
    if "context_sweep" in tables and len(tables["context_sweep"]):
        figs["14_context_sweep"] = plots.plot_context_sweep(tables["context_sweep"])
    if "stability" in tables and len(tables["stability"]):
        t = tables["stability"]
        figs["15_stability"] = plots.plot_stability(SimpleNamespace(
            table=t, n_impossible=dict(zip(t["edit"], t["n_impossible"])),
            settings={"edits": list(dict.fromkeys(t["edit"])), "task_name": t["task_name"].iloc[0],
                      "n_variants": int(t["n_variants"].iloc[0])}))
    if "heads" in tables:
        figs["06_head_ranking"] = plots.plot_head_ranking(tables["heads"])
    if "attention_row" in tables:
        figs["07_attention_row"] = plots.plot_attention_row(tables["attention_row"])
    if "token_attributions" in tables:
        figs["08_token_attributions"] = plots.plot_token_attributions(tables["token_attributions"])
    return figs


def write_figures(figs: dict, out: Path, *, png: bool, plotlyjs: str = "directory") -> tuple[list[Path], Optional[str]]:
    """Write every figure as HTML (+ PNG); returns the paths and the PNG error (None when fine)."""
    inc = True if plotlyjs == "inline" else plotlyjs
    paths = plots.save_figures(figs, out, png=False, include_plotlyjs=inc)
    err = None
    if png:
        try:
            paths += plots.save_figures(figs, out, png=True, html=False)
        except plots.FigureExportError as e:
            err = first_line(e)
            print(f"selfrepair: warning: {err}", file=sys.stderr)
    return paths, err


def headline(tables: dict, settings: dict) -> dict:
    """The numbers the summary prints (and summary.json keeps)."""
    g = tables["groups"]
    t = float(settings.get("threshold", 0.1))
    r = g["interaction"].astype(float) if len(g) else None
    n_def = int(np.isfinite(r).sum()) if r is not None else 0
    h: dict[str, Any] = {"groups": int(len(g)), "groups_defined": n_def, "groups_undefined": int(len(g) - n_def),
                         "threshold": t}
    sw = overall_sweep(tables["sweep"])

    def at(th):
        row = sw.iloc[(sw["threshold"].astype(float) - th).abs().argsort().iloc[0]]
        return {k: float(row[k]) for k in ("threshold", "fraction", "ci_low", "ci_high")}

    h["self_repairing"] = at(t) if len(sw) else None
    h["sweep"] = [at(th) for th in SUMMARY_THRESHOLDS] if len(sw) else []
    if len(g) and n_def:
        d = g[np.isfinite(r)]
        hs = tables["head_summary"]  # result.summary(): per head, fraction with its bootstrap interval
        min_n = max(5, int(0.01 * n_def))
        hs = hs[hs["n_defined"] >= min_n].sort_values(["frac_self_repair", "n_defined"], ascending=False).head(3)
        h["top_heads"] = [{"layer": int(x.layer), "head": int(x.head), "fraction": float(x.frac_self_repair),
                           "ci_low": float(x.ci_low), "ci_high": float(x.ci_high), "n": int(x.n_defined),
                           "median_r": float(x.median_interaction)} for x in hs.itertuples()]
        h["top_heads_min_groups"] = min_n
        rep = tables.get("estimates")
        if rep is not None and len(rep):  # compare_estimates' own statistics, all groups
            rep = rep[rep["subset"] == "all"]
            if "split" in rep.columns:  # one row per estimate: group level, every group
                keyrep = rep[(rep["split"] == "all") & (rep["level"] == "key")]
                rep = rep[(rep["split"] == "all") & (rep["level"] == "group")]
                h["spearman_key_estimates"] = {
                    truth: {str(r.estimate): [float(r.spearman), float(r.spearman_lo), float(r.spearman_hi)]
                            for r in keyrep[keyrep["effect"] == truth].itertuples()}
                    for truth in ("shapley", "individual") if (keyrep["effect"] == truth).any()}
            h["spearman_estimate_vs_measured"] = {
                truth: {str(r.estimate).replace("_estimate", ""): float(r.spearman)
                        for r in rep[rep["effect"] == truth].itertuples()}
                for truth in ("local", "global") if (rep["effect"] == truth).any()}
            h["sign_agreement_estimate_vs_measured"] = {
                truth: {str(r.estimate).replace("_estimate", ""): float(r.sign_agreement)
                        for r in rep[rep["effect"] == truth].itertuples()}
                for truth in ("local", "global") if (rep["effect"] == truth).any()}
        if "value_similarity" in g.columns:
            sr = d["self_repair"].astype(bool)
            h["value_similarity_median"] = {"self_repairing": float(d.loc[sr, "value_similarity"].median()),
                                            "other": float(d.loc[~sr, "value_similarity"].median())}
        if "downstream_gap" in g.columns:
            h["downstream_gap_median"] = float(g["downstream_gap"].median())
        if "mass_interaction" in g.columns:
            h.update(what_r_is_made_of(tables, settings))
    if "heads" in tables:
        hd = tables["heads"]
        h["head_ranking_spearman"] = {name: agreement(hd[f"{name}_estimate"], hd["measured"])["spearman"]
                                      for name in ("grad", "gim")}
    return h


def what_r_is_made_of(tables: dict, settings: dict) -> dict:
    """Headline numbers of docs/quantities.md "What r is made of": the share flagged by ``r > threshold`` and by
    the permutation test (with their intervals, from the sweep table), the medians of ``mass_interaction``,
    ``excess_interaction`` and ``concealment_share`` over the groups flagged by r, and Spearman's rho of r with
    ``mass_interaction`` (cluster-bootstrap interval over prompts)."""
    g = tables["groups"]
    t = float(settings.get("threshold", 0.1))
    out: dict[str, Any] = {}
    sw = overall_sweep(tables["sweep"])
    if "fraction_permutation" in sw.columns and len(sw):
        row = sw.iloc[(sw["threshold"].astype(float) - t).abs().argsort().iloc[0]]
        out["permutation_test"] = {"alpha": float(settings.get("alpha", 0.05)), "n_tested": int(row["n_tested"]),
                                   "n_flagged": int(row["n_permutation"]),
                                   "fraction": float(row["fraction_permutation"]),
                                   "ci_low": float(row["perm_ci_low"]), "ci_high": float(row["perm_ci_high"])}
    r = g["interaction"].to_numpy(float)
    flagged = g[np.isfinite(r) & (r > t)]
    out["flagged_medians"] = {c: float(flagged[c].astype(float).median()) if len(flagged) else float("nan")
                              for c in ("mass_interaction", "excess_interaction", "concealment_share")}
    rho, lo, hi = spearman_interval(r, g["mass_interaction"].to_numpy(float), g["prompt"].to_numpy(), seed=0)
    out["spearman_r_vs_mass"] = {"rho": rho, "ci_low": lo, "ci_high": hi}
    return out


def format_summary(h: dict, context: str) -> str:
    lines = [context]
    lines.append(f"groups analysed: {h['groups']} ({h['groups_defined']} with a defined ratio r, "
                 f"{h['groups_undefined']} below the effect floor)")
    sr = h.get("self_repairing")
    if not h["groups_defined"]:
        lines.append("no group with a defined ratio, so none to flag: more prompts (--n) or a lower "
                     "--min-contribution find more groups")
    else:
        ci = f" [95% CI {sr['ci_low']:.1%}, {sr['ci_high']:.1%}]"
        lines.append(f"self-repairing (r > {h['threshold']:g}): {sr['fraction']:.1%}{ci}")
        lines.append("over the sweep: " + ", ".join(f"r > {s['threshold']:g}: {s['fraction']:.1%}" for s in h["sweep"]))
    if h.get("top_heads"):
        lines.append(f"top self-repairing heads (>= {h['top_heads_min_groups']} groups): " + ", ".join(
            f"L{x['layer']}H{x['head']} {x['fraction']:.0%} [{x['ci_low']:.0%}, {x['ci_high']:.0%}] of {x['n']}"
            f" (median r {x['median_r']:.2f})" for x in h["top_heads"]))
    if h.get("value_similarity_median"):
        v = h["value_similarity_median"]
        lines.append(f"value similarity (median): self-repairing {v['self_repairing']:.2f}, other {v['other']:.2f}")
    signs = h.get("sign_agreement_estimate_vs_measured") or {}
    for truth, c in (h.get("spearman_estimate_vs_measured") or {}).items():
        lines.append(f"estimate vs measured {truth} joint effect: Spearman " +
                     ", ".join(f"{k} {v:.2f}" for k, v in c.items()) + "; sign agreement " +
                     ", ".join(f"{k} {v:.0%}" for k, v in signs.get(truth, {}).items()))
    pt = h.get("permutation_test")
    if pt:
        lines.append(f"self-repairing by the permutation test (BH at alpha {pt['alpha']:g}): {pt['fraction']:.1%} "
                     f"[95% CI {pt['ci_low']:.1%}, {pt['ci_high']:.1%}] of {pt['n_tested']} groups")
    fm = h.get("flagged_medians")
    if fm:
        lines.append(f"groups with r > {h['threshold']:g}, medians: mass_interaction {fm['mass_interaction']:.3g}, "
                     f"excess_interaction {fm['excess_interaction']:.3g}, concealment_share "
                     f"{fm['concealment_share']:.3g}")
    sm = h.get("spearman_r_vs_mass")
    if sm:
        lines.append(f"Spearman(r, mass_interaction): {sm['rho']:.2f} [95% CI {sm['ci_low']:.2f}, {sm['ci_high']:.2f}]"
                     " (1 = r is the attention geometry)")
    for truth, c in (h.get("spearman_key_estimates") or {}).items():
        lines.append(f"per-key estimate vs {truth} (Spearman [95% CI]): " +
                     ", ".join(f"{k} {v[0]:.2f} [{v[1]:.2f}, {v[2]:.2f}]" for k, v in c.items()))
    if "downstream_gap_median" in h:
        lines.append(f"downstream gap (global - local interaction), median: {h['downstream_gap_median']:.3g}")
    if h.get("head_ranking_spearman"):
        lines.append("head ranking vs measured ablation (Spearman): " +
                     ", ".join(f"{k} {v:.2f}" for k, v in h["head_ranking_spearman"].items()))
    return "\n".join(lines)


def figure_index(figs: dict, fig_dir: Path, *, png: bool) -> dict:
    """What summary.json says about each figure: what it shows, its files and the PNG's pixel size."""
    out = {}
    for name, fig in figs.items():
        w, h = plots.png_size(fig)
        out[name] = {"shows": FIGURES.get(name, name), "html": f"figures/{name}.html",
                     "png": f"figures/{name}.png" if png else None, "png_size": [w, h] if png else None}
    return out


def redraw(run_dir: Path, out: Path, *, png: bool, plotlyjs: str) -> int:
    if not (run_dir / "summary.json").is_file():
        raise CLIError(f"{run_dir} is not a finished selfrepair run (no summary.json)")
    summary = read_run_json(run_dir / "summary.json", hint=f"run the study again with --out {run_dir} --force")
    tables_dir = run_dir / "tables"
    tables = {p.stem: read_table(tables_dir, p.stem) for p in sorted(tables_dir.glob("*.parquet"))}
    info = summary.get("model", {})
    figs = make_figures(tables, summary["settings"], info.get("n_layers"), info.get("n_heads"))
    paths, err = write_figures(figs, out, png=png, plotlyjs=plotlyjs)
    for p in out.iterdir():  # figures of an earlier run that this one does not have (only our own file names)
        if re.fullmatch(r"\d\d_[a-z_]+\.(html|png)", p.name) and p not in paths:
            p.unlink()
    print(f"wrote {len(paths)} figure files to {out}" + (f" (PNG failed: {err})" if err else ""))
    return 0 if not err else EXIT_ERROR
