"""Are the conclusions stable under meaning-preserving edits of the prompts? (issue 10, part 3)

``stability(model, task, edits=...)`` makes variants of every prompt with
``selfrepair.tasks.edits.edit_task`` and runs the same analyses on the original
prompts and on the variants: ``analyze_self_repair``, ``head_attributions``
(plain gradient and GIM) and ``explain`` (plain gradient and GIM). Per edit
kind, over the prompts that have at least one variant (``n``):

* ``self_repair_share``: Spearman over heads of the per-head share of
  self-repairing groups (self-repairing / groups with a defined ratio), the
  original prompts against their variants (pooled);
* ``head_attr_grad`` / ``head_attr_gim``: Spearman over heads of the mean head
  attribution (``grad_estimate`` / ``gim_estimate``), original against variants
  (each prompt's variants averaged first);
* ``token_attr_grad`` / ``token_attr_gim``: Spearman of the token attributions
  over the positions aligned by token text (``EditedTask.alignment``), per
  variant; averaged over a prompt's variants, then the median over prompts;
* ``sr_kept``: of the original self-repairing groups whose query and keys all
  map to aligned tokens, the share whose variant group at the mapped query
  (same layer and head) has the mapped keys as its key set and is
  self-repairing; ``sr_kept_query`` the same without requiring the same keys.

Intervals: percentile bootstrap (95%) over prompts: the prompts are resampled
with replacement and every quantity is recomputed from the resampled prompts
(their original rows and all their variants). Spearman is ``stats.spearman``; the bootstrap
draws prompts as ``stats.spearman_interval`` does.
Head attributions use ``head_ablation="zero"`` by default so each prompt's estimate
depends on that prompt only (``"mean"`` would average z over the batch, which
differs between the original task and its variants). ``min_contribution``
defaults to 0.1 (not ``analyze_self_repair``'s 1.0): on the shipped model's
code-copy task 1.0 leaves about one analysed group per four prompts, 0.1 about eight per prompt.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Optional, Sequence, Union

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

# imports of existing code (re-point here when the layout changes)
from ..models.facts import model_facts
from ..tasks.base import Task
from ..tasks.edits import EDITS, check_edits, edit_task
from . import stats
from .attribution import explain, head_attributions
from .self_repair import analyze_self_repair

__all__ = ["stability", "StabilityResult", "MEASURES"]

MEASURES = ("self_repair_share", "head_attr_grad", "head_attr_gim", "token_attr_grad", "token_attr_gim",
            "sr_kept", "sr_kept_query")
_TABLES = ("table", "heads", "tokens", "kept", "impossible", "variants")


def _bootstrap(stat, n: int, n_boot: int, seed: int) -> tuple:
    """Cluster bootstrap over prompts, drawn as in ``stats.spearman_interval``: draw ``b`` is row ``b`` of
    ``np.random.default_rng(seed).integers(0, n, (n_boot, n))``, ``weights`` the prompts' multiplicities in
    it; percentile 95% interval of ``stat(weights)`` (NaN replicates ignored). The measures here are
    Spearman correlations of per-head aggregates (and shares / medians) recomputed from the resampled
    prompts, not correlations of per-prompt pairs, so ``spearman_interval`` itself does not apply."""
    if n == 0 or n_boot == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(n_boot, n))
    vals = np.array([stat(np.bincount(r, minlength=n).astype(np.float64)) for r in idx])
    vals = vals[np.isfinite(vals)]
    if not len(vals):
        return float("nan"), float("nan")
    lo, hi = np.percentile(vals, [2.5, 97.5])
    return float(lo), float(hi)


def _weighted_median(v: np.ndarray, w: np.ndarray) -> float:
    keep = np.isfinite(v) & (w > 0)
    v, w = v[keep], w[keep]
    if not len(v):
        return float("nan")
    return float(np.median(np.repeat(v, w.astype(np.int64))))


@dataclass
class StabilityResult:
    """``table``: one row per (edit, measure): ``value``, bootstrap ``lo``/``hi``, ``n`` prompts.
    ``heads``: per (edit, layer, head) the summed counts and means behind the head measures
    (``sr_orig``/``def_orig``/``share_orig``, ``sr_var``/``def_var``/``share_var``, ``grad_orig``,
    ``grad_var``, ``gim_orig``, ``gim_var``). ``tokens``: per variant the token-attribution Spearmans
    and ``n_aligned``. ``kept``: per (edit, prompt) ``eligible``, ``kept``, ``kept_query``.
    ``impossible``: per (edit, prompt) requested / made variants and the reason.
    ``variants``: the variants' texts and origins."""

    table: pd.DataFrame
    heads: pd.DataFrame
    tokens: pd.DataFrame
    kept: pd.DataFrame
    impossible: pd.DataFrame
    variants: pd.DataFrame
    settings: dict = field(default_factory=dict)

    @property
    def n_impossible(self) -> Dict[str, int]:
        """Per edit kind, requested variants that could not be made."""
        im = self.impossible
        d = (im["requested"] - im["made"]).groupby(im["edit"]).sum()
        return {str(e): int(d.get(e, 0)) for e in self.settings.get("edits", [])}

    def to_frame(self) -> pd.DataFrame:
        return self.table.copy()

    def __repr__(self) -> str:
        return f"StabilityResult(edits={self.settings.get('edits')}, n_impossible={self.n_impossible})\n" + \
            self.table.to_string(index=False)

    def save(self, path: Union[str, Path]) -> Path:
        """A directory: one parquet file per table and ``meta.json`` (settings)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        for name in _TABLES:
            getattr(self, name).to_parquet(path / f"{name}.parquet", index=False)
        (path / "meta.json").write_text(json.dumps({"format": 1, "settings": self.settings}, indent=1,
                                                   default=str))
        return path

    @classmethod
    def load(cls, path: Union[str, Path]) -> "StabilityResult":
        path = Path(path)
        if not (path / "meta.json").is_file():
            raise FileNotFoundError(f"{path}: not a saved StabilityResult (no meta.json); save one with .save(path).")
        meta = json.loads((path / "meta.json").read_text())
        tables = {name: pd.read_parquet(path / f"{name}.parquet") for name in _TABLES}
        return cls(**tables, settings=meta["settings"])


def _counts(groups: pd.DataFrame, n_rows: int, L: int, H: int):
    """Per (row, head) counts of self-repairing and of defined groups, as [n_rows, L*H] arrays."""
    sr = np.zeros((n_rows, L * H))
    de = np.zeros((n_rows, L * H))
    if len(groups):
        hi = groups["layer"].to_numpy() * H + groups["head"].to_numpy()
        pr = groups["prompt"].to_numpy()
        np.add.at(sr, (pr, hi), groups["self_repair"].to_numpy().astype(np.float64))
        np.add.at(de, (pr, hi), groups["interaction"].notna().to_numpy().astype(np.float64))
    return sr, de


def _head_matrix(df: pd.DataFrame, col: str, n_rows: int, L: int, H: int) -> np.ndarray:
    out = np.full((n_rows, L * H), np.nan)
    out[df["prompt"].to_numpy(), df["layer"].to_numpy() * H + df["head"].to_numpy()] = df[col].to_numpy()
    return out


def _analyses(model, task: Task, *, k, min_contribution, head_ablation, batch_size):
    sr = analyze_self_repair(model, task, k=k, min_contribution=min_contribution, batch_size=batch_size,
                             progress=False)
    ha = head_attributions(model, task, head_ablation=head_ablation, per_prompt=True, frozen_qk=False,
                           batch_size=batch_size, progress=False)
    ex = {m: explain(model, task, method=m, batch_size=batch_size, progress=False).double().numpy() for m in ("grad", "gim")}
    return sr.groups, ha, ex


def stability(model, task: Task, *, edits: Sequence[str] = tuple(EDITS), n_variants: int = 2, seed: int = 0,
              k: int = 2, min_contribution: float = 0.1, head_ablation: str = "zero", n_boot: int = 1000,
              batch_size: Optional[int] = None, progress: bool = False) -> StabilityResult:
    """Stability of self-repair shares, head attributions and token attributions under each edit kind
    (module docstring). Raises ``EditError`` for unknown edit kinds or a model without a tokenizer."""
    kinds = check_edits(edits)
    if not isinstance(task, Task):
        raise TypeError(f"stability needs a selfrepair.Task, got {type(task).__name__}; build one with "
                        "selfrepair.tasks.load(...).")
    if head_ablation not in ("zero", "mean"):
        raise ValueError(f"unknown head_ablation {head_ablation!r}; valid: zero, mean.")
    if not isinstance(n_boot, int) or isinstance(n_boot, bool) or n_boot < 0:
        raise ValueError(f"n_boot must be a non-negative int, got {n_boot!r}.")
    facts = model_facts(model)
    L, H = facts.n_layers, facts.n_heads
    opts = dict(k=k, min_contribution=min_contribution, head_ablation=head_ablation, batch_size=batch_size)
    edited = {kind: edit_task(task, model, kind, n_variants=n_variants, seed=seed) for kind in kinds}
    g0, ha0, ex0 = _analyses(model, task, **opts)
    P = len(task)
    sr0, de0 = _counts(g0, P, L, H)
    att0 = {m: _head_matrix(ha0, f"{m}_estimate", P, L, H) for m in ("grad", "gim")}
    sr_groups0 = g0[g0["self_repair"]]

    tab, heads, toks, kept, imps, vars_ = [], [], [], [], [], []
    for kind in tqdm(kinds, disable=not progress, desc="stability"):
        et = edited[kind]
        imps.append(et.impossible)
        v = et.variants
        vars_.append(pd.DataFrame(dict(edit=v["edit"], variant=v["variant"], origin=v["origin"],
                                       n_tokens=v["n_tokens"], position=v["position"], text=v["text"],
                                       details=[json.dumps(d, sort_keys=True) for d in v["details"]])))
        used = np.array(sorted(set(v["origin"].tolist())), dtype=np.int64)
        n = len(used)
        if n == 0:
            for mname in MEASURES:
                tab.append(dict(edit=kind, measure=mname, value=np.nan, lo=np.nan, hi=np.nan, n=0))
            continue
        gv, hav, exv = _analyses(model, et.task, **opts)
        V = len(et.task)
        origin = v["origin"].to_numpy()
        # variant rows summed (counts) or averaged (attributions) per origin prompt, indexed like `used`
        onehot = (origin[None, :] == used[:, None]).astype(np.float64)       # [n, V]
        srv_v, dev_v = _counts(gv, V, L, H)
        srv, dev = onehot @ srv_v, onehot @ dev_v
        attv = {m: (onehot @ _head_matrix(hav, f"{m}_estimate", V, L, H)) / onehot.sum(1, keepdims=True)
                for m in ("grad", "gim")}
        sro, deo = sr0[used], de0[used]
        atto = {m: att0[m][used] for m in ("grad", "gim")}

        def share(w, s, d):
            num, den = w @ s, w @ d
            with np.errstate(invalid="ignore", divide="ignore"):
                return np.where(den > 0, num / np.where(den > 0, den, 1), np.nan)

        ones = np.ones(n)

        def sr_stat(w):
            return stats.spearman(share(w, sro, deo), share(w, srv, dev))

        def att_stat(m):
            return lambda w: stats.spearman(w @ atto[m], w @ attv[m])

        for mname, fn in (("self_repair_share", sr_stat), ("head_attr_grad", att_stat("grad")),
                          ("head_attr_gim", att_stat("gim"))):
            lo, hi = _bootstrap(fn, n, n_boot, seed)
            tab.append(dict(edit=kind, measure=mname, value=fn(ones), lo=lo, hi=hi, n=n))
        hd = pd.DataFrame(dict(edit=kind, layer=np.arange(L * H) // H, head=np.arange(L * H) % H,
                               sr_orig=sro.sum(0), def_orig=deo.sum(0), share_orig=share(ones, sro, deo),
                               sr_var=srv.sum(0), def_var=dev.sum(0), share_var=share(ones, srv, dev),
                               grad_orig=atto["grad"].mean(0), grad_var=attv["grad"].mean(0),
                               gim_orig=atto["gim"].mean(0), gim_var=attv["gim"].mean(0)))
        heads.append(hd)

        # token attributions, aligned by token text
        trows = []
        for vi in range(V):
            p = int(origin[vi])
            al = et.alignment[vi]
            idx = np.nonzero(al >= 0)[0]
            row = dict(edit=kind, variant=vi, origin=p, n_aligned=len(idx), n_tokens=len(al))
            for m in ("grad", "gim"):
                row[f"spearman_{m}"] = stats.spearman(ex0[m][p, idx], exv[m][vi, al[idx]])
            trows.append(row)
        tk = pd.DataFrame(trows)
        toks.append(tk)
        for m in ("grad", "gim"):
            per_prompt = tk.groupby("origin")[f"spearman_{m}"].mean().reindex(used).to_numpy()
            fn = (lambda pp: (lambda w: _weighted_median(pp, w)))(per_prompt)
            lo, hi = _bootstrap(fn, n, n_boot, seed)
            tab.append(dict(edit=kind, measure=f"token_attr_{m}", value=fn(ones), lo=lo, hi=hi, n=n))

        # do self-repairing groups stay self-repairing at the aligned tokens?
        look = {}
        for r in gv.itertuples(index=False):
            look[(int(r.prompt), int(r.layer), int(r.head), int(r.query))] = (frozenset(int(x) for x in r.keys),
                                                                               bool(r.self_repair))
        elig, kp, kq = np.zeros(n), np.zeros(n), np.zeros(n)
        pos_of = {int(p): j for j, p in enumerate(used)}
        by_prompt = {int(p): df for p, df in sr_groups0.groupby("prompt")}
        for vi in range(V):
            p = int(origin[vi])
            al = et.alignment[vi]
            for r in by_prompt.get(p, pd.DataFrame()).itertuples(index=False):
                q = int(al[int(r.query)])
                ks = [int(al[int(x)]) for x in r.keys]
                if q < 0 or min(ks) < 0:
                    continue
                j = pos_of[p]
                elig[j] += 1
                hit = look.get((vi, int(r.layer), int(r.head), q))
                if hit is not None and hit[1]:
                    kq[j] += 1
                    kp[j] += hit[0] == frozenset(ks)
        kept.append(pd.DataFrame(dict(edit=kind, prompt=used, eligible=elig, kept=kp, kept_query=kq)))
        for mname, num in (("sr_kept", kp), ("sr_kept_query", kq)):
            fn = (lambda nu: (lambda w: (w @ nu) / (w @ elig) if (w @ elig) > 0 else np.nan))(num)
            lo, hi = _bootstrap(fn, n, n_boot, seed)
            tab.append(dict(edit=kind, measure=mname, value=fn(ones), lo=lo, hi=hi, n=int((elig > 0).sum())))

    def cat(frames, cols):
        frames = [f for f in frames if len(f)]
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=cols)

    table = pd.DataFrame(tab, columns=["edit", "measure", "value", "lo", "hi", "n"])
    table["n"] = table["n"].astype(np.int64)
    settings = dict(edits=kinds, n_variants=int(n_variants), seed=int(seed), k=int(k),
                    min_contribution=float(min_contribution), head_ablation=head_ablation, n_boot=int(n_boot),
                    n_prompts=P, task_name=str(task.name),
                    model_name=str(getattr(model.cfg, "model_name", type(model).__name__)))
    return StabilityResult(
        table=table,
        heads=cat(heads, ["edit", "layer", "head"]),
        tokens=cat(toks, ["edit", "variant", "origin", "n_aligned", "n_tokens", "spearman_grad", "spearman_gim"]),
        kept=cat(kept, ["edit", "prompt", "eligible", "kept", "kept_query"]),
        impossible=cat(imps, ["prompt", "edit", "requested", "made", "reason"]),
        variants=cat(vars_, ["edit", "variant", "origin", "n_tokens", "position", "text", "details"]),
        settings=settings,
    )
