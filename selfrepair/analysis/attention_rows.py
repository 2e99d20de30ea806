"""The full attention rows of analysed groups, stored in a run so its report can draw any of them.

:func:`attention_rows_table` gives one row per group: the group's ``prompt,
layer, head, query, keys``, the text of every key token, and the complete
pattern row (keys ``0..query``) in the clean run, after each individual score
ablation and after the joint one, as lists. The report page
(:mod:`selfrepair.report.page`) embeds it and draws the attention-row figure
of the group a reader clicks, with no model at hand.

The rows are recomputed in closed form from each row's scores (SPEC, Local
effects): ``p = softmax(a)``; ``"mean"`` ablation sets ``a'_j = mean(a_k)``
over the row's unmasked keys (key 0 left out when ``exclude_bos``) for ``j``
in the ablated set, ``"knockout"`` sets them to ``-inf``; the same closed form
as :func:`selfrepair.plots.attention_row_data`, which draws one row; here the
scores come from one :func:`selfrepair.cached_run` forward per batch of
prompts, for every stored group at once. Arithmetic in float64.
"""

from __future__ import annotations

from typing import Mapping, Optional

import numpy as np
import pandas as pd
import torch

from ..engine.cache import cached_run
from ..engine.kernels import ablated_pattern
from .results import canonical_settings
from ..tasks.tokens import token_text

__all__ = ["attention_rows_table", "select_groups", "ATTENTION_ROWS_COLUMNS"]

#: the columns of :func:`attention_rows_table`, in order
ATTENTION_ROWS_COLUMNS = ("group", "prompt", "layer", "head", "query", "keys", "tokens", "clean", "individual",
                          "joint", "effects", "effect_joint", "interaction", "global_effects",
                          "global_effect_joint", "score_ablation", "exclude_bos")


def _groups_and_settings(result) -> tuple[pd.DataFrame, dict]:
    """The groups table and the analysis settings of a SelfRepairResult or a groups DataFrame (attrs)."""
    g = getattr(result, "groups", result)
    if not isinstance(g, pd.DataFrame):
        raise TypeError(f"attention_rows_table: expected a SelfRepairResult or its groups DataFrame, "
                        f"got {type(result).__name__}")
    settings: dict = {}
    for src in (getattr(result, "settings", None), g.attrs.get("settings"), g.attrs.get("meta")):
        if isinstance(src, Mapping):
            settings.update(canonical_settings(src))
    return g, settings


def select_groups(groups: pd.DataFrame, max_groups: Optional[int]) -> np.ndarray:
    """Positions (in ``groups``) of the groups to store, at most ``max_groups``, in table order.

    All groups when they fit; otherwise the self-repairing ones first, then the
    rest, each by the size of the interaction in metric units
    ``|E_S - sum E_n|`` (largest first): the rows a reader most wants to see.
    """
    n = len(groups)
    if max_groups is None or n <= max_groups:
        return np.arange(n)
    if max_groups < 0:
        raise ValueError(f"max_groups must be >= 0 or None, got {max_groups}")
    size = (groups["effect_joint"].astype(float) - groups["effect_sum"].astype(float)).abs().fillna(-1.0).to_numpy()
    sr = groups["self_repair"].fillna(False).astype(bool).to_numpy() if "self_repair" in groups else np.zeros(n, bool)
    order = np.lexsort((np.arange(n), -size, ~sr))  # self-repairing first, then larger interaction, then position
    return np.sort(order[:max_groups])


def _num_list(v, n: int) -> list:
    if v is None or (isinstance(v, float) and np.isnan(v)):
        return [float("nan")] * n
    return [float(x) for x in np.asarray(v, dtype=float).ravel()]


def attention_rows_table(model, task, result, *, max_groups: Optional[int] = 500,
                         batch_size: int = 16) -> pd.DataFrame:
    """One row per stored group: its key tokens and full pattern rows clean / per individual ablation / joint.

    ``result``: a :class:`~selfrepair.SelfRepairResult` or its groups DataFrame
    (``attrs["settings"]`` carries ``score_ablation`` and ``exclude_bos``; defaults
    ``"mean"`` and False, as in :func:`selfrepair.analyze_self_repair`).
    ``task``: the task the result was computed on. ``max_groups``: at most this
    many groups (chosen by :func:`select_groups`; None for all).

    Columns (:data:`ATTENTION_ROWS_COLUMNS`): ``group`` (the group's position
    in the groups table), ``prompt, layer, head, query``, ``keys`` (the ablated
    keys), ``tokens`` (text of keys ``0..query``), ``clean`` (``p``, length
    ``query + 1``), ``individual`` (one pattern row per key of ``keys``, after
    ablating that key alone), ``joint`` (after ablating all of them), the
    group's measured ``effects, effect_joint, interaction, global_effects,
    global_effect_joint`` (NaN where not measured), ``score_ablation, exclude_bos``.
    Lists are plain Python lists of float64 values.
    """
    groups, s = _groups_and_settings(result)
    score_ablation = s.get("score_ablation", "mean")
    if score_ablation not in ("mean", "knockout"):
        raise ValueError(f"attention_rows_table: unknown score_ablation {score_ablation!r}; valid: 'mean', 'knockout'")
    exclude_bos = bool(s.get("exclude_bos", False))
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    need = ["prompt", "layer", "head", "query", "keys"]
    missing = [c for c in need if c not in groups.columns]
    if missing:
        raise ValueError(f"attention_rows_table needs the groups columns {', '.join(missing)}; "
                         f"the table has {', '.join(map(str, groups.columns))}")
    pos = select_groups(groups, max_groups)
    sel = groups.iloc[pos]
    if len(sel) and int(sel["prompt"].max()) >= len(task):
        raise ValueError(f"the groups refer to prompt {int(sel['prompt'].max())} but the task has {len(task)} "
                         "prompts: pass the task the result was computed on")
    rows: dict[int, dict] = {}
    prompts = sorted(set(int(p) for p in sel["prompt"]))
    layers = sorted(set(int(l) for l in sel["layer"]))
    for b0 in range(0, len(prompts), batch_size):
        chunk = prompts[b0:b0 + batch_size]
        local = {p: i for i, p in enumerate(chunk)}
        run = cached_run(model, task.subset(chunk), layers=layers, backward=False, dtype=torch.float64,
                         keep=("scores",))
        texts = {p: token_text(model, task.tokens[p, : int(task.lengths[p])].tolist()) for p in chunk}
        part = sel[sel["prompt"].isin(chunk)]
        for i, g in zip(pos[sel["prompt"].isin(chunk).to_numpy()], part.itertuples(index=False)):
            p, l, h, q = int(g.prompt), int(g.layer), int(g.head), int(g.query)
            keys = [int(k) for k in g.keys]
            a = run.scores[l][local[p], h, q, : q + 1].to(torch.float64).cpu()  # causal: keys 0..q all real
            row_mask = torch.ones(q + 1, dtype=torch.bool)
            mean_mask = row_mask.clone()
            if exclude_bos:
                mean_mask[0] = False

            def pattern(S):
                ablated = torch.zeros(q + 1, dtype=torch.bool)
                ablated[S] = True
                return ablated_pattern(a, row_mask, ablated, score_ablation=score_ablation, mean_mask=mean_mask).tolist()

            gd = g._asdict()
            k = len(keys)
            rows[int(i)] = dict(
                group=int(i), prompt=p, layer=l, head=h, query=q, keys=keys, tokens=texts[p][: q + 1],
                clean=pattern([]), individual=[pattern([j]) for j in keys], joint=pattern(keys),
                effects=_num_list(gd.get("effects"), k), effect_joint=float(gd.get("effect_joint", np.nan)),
                interaction=float(gd.get("interaction", np.nan)),
                global_effects=_num_list(gd.get("global_effects"), k),
                global_effect_joint=float(gd.get("global_effect_joint", np.nan)),
                score_ablation=score_ablation, exclude_bos=exclude_bos)
    out = pd.DataFrame([rows[int(i)] for i in pos], columns=list(ATTENTION_ROWS_COLUMNS))
    out.attrs["max_groups"] = max_groups
    out.attrs["n_groups"] = len(groups)
    return out
