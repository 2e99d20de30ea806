"""One analysed attention row recomputed for display: its weights clean, after each individual and the joint ablation."""

from __future__ import annotations

from typing import Mapping, Optional, Union

import numpy as np
import pandas as pd
import torch

from .._deprecation import renamed_keyword
from ..engine.cache import cached_run
from ..engine.kernels import ablated_pattern
from ..tasks.tokens import token_text
from .results import groups_of, keys_str, settings_of

__all__ = ["attention_row_data", "pick_row"]


def pick_row(result) -> pd.Series:
    """A clear example of self-repair: among the self-repairing groups whose individual effects all have the
    sign of the joint effect (when there are any), the one with the largest interaction in metric units,
    ``|E_S - sum E_n|``.

    Falls back to the group with the largest defined r when none self-repairs,
    and to the first group when no ratio is defined.
    """
    df = groups_of(result)
    if len(df) == 0:
        raise ValueError("the result has no groups to show")
    sr = df["self_repair"].fillna(False).astype(bool) if "self_repair" in df.columns else pd.Series(False, index=df.index)
    ej = df["effect_joint"].astype(float)
    score = (ej - df["effect_sum"].astype(float)) * np.sign(ej)
    same_sign = pd.Series([bool(np.all(np.sign(np.asarray(e, float)) == np.sign(j))) for e, j in zip(df["effects"], ej)],
                          index=df.index)
    for cand in (sr & same_sign, sr):
        if cand.any():
            return df.loc[score[cand].idxmax()]
    r = df["interaction"].astype(float)
    if r.notna().any():
        return df.loc[r.idxmax()]
    return df.iloc[0]


def _row_scores(model, task, prompt: int, layer: int, head: int, query: int):
    """The score row ``a`` (float64, keys 0..query) of one head at one query, from one cached forward.

    :func:`selfrepair.engine.cached_run` reads the backend's live score site, or
    ``log p`` where the backend only exposes the pattern (the scores up to a
    per-row constant, which mean ablation and knockout both ignore; docs/quantities.md, "Local effects").
    """


    run = cached_run(model, task.subset([prompt]), layers=[layer], backward=False, dtype=torch.float64,
                     keep=("scores",))
    return run.scores[layer][0, head, query, : query + 1].cpu()


def attention_row_data(model, task, result, row: Union[None, int, Mapping, pd.Series] = None, *,
                       score_ablation: Optional[str] = None, exclude_bos: Optional[bool] = None,
                       min_weight: float = 0.005, max_keys: int = 40, **deprecated) -> pd.DataFrame:
    """Attention weights of one analysed row: clean, after each individual ablation, after the joint one.

    Recomputed in closed form from the row's scores (one forward pass of that
    prompt): ``p = softmax(a)``; mean ablation sets ``a'_j = mean(a_k)`` over
    the row's unmasked keys (key 0 left out when ``exclude_bos``), knockout
    removes the keys (docs/quantities.md, "Individual versus joint"). ``row``: a group (Series/dict with prompt, layer,
    head, query, keys), its index in ``result.groups``, or None for
    :func:`pick_row`. Keys whose weight is below ``min_weight`` in every
    condition are pooled into one "other keys" bar (at most ``max_keys`` keys
    are shown, the ablated ones always).

    ``score_ablation``: ``"mean"`` or ``"knockout"``, default the result's
    ``settings["score_ablation"]`` (the old keyword ``ablation=`` still works,
    with a DeprecationWarning).

    Returns a long table: ``condition, order, position, token, weight,
    ablated, effect, global_effect`` plus the group's ``prompt, layer, head,
    query, keys, interaction, score_ablation``.
    """
    score_ablation = renamed_keyword(deprecated, "ablation", "score_ablation", score_ablation, "attention_row_data",
                                     stacklevel=3)

    df = groups_of(result)
    s = settings_of(result)
    if row is None:
        g = pick_row(df)
    elif isinstance(row, (int, np.integer)):
        g = df.loc[int(row)]
    else:
        g = pd.Series(dict(row))
    score_ablation = score_ablation or s.get("score_ablation", "mean")
    exclude_bos = bool(s.get("exclude_bos", False)) if exclude_bos is None else bool(exclude_bos)
    p_i, l, h, q = int(g["prompt"]), int(g["layer"]), int(g["head"]), int(g["query"])
    keys = [int(k) for k in g["keys"]]
    a = _row_scores(model, task, p_i, l, h, q)  # [q + 1], keys 0..q (causal; no padding before the last real token)
    ref = torch.arange(q + 1)
    if exclude_bos:
        ref = ref[ref != 0]

    everything = torch.ones(q + 1, dtype=torch.bool)
    mean_mask = torch.zeros(q + 1, dtype=torch.bool)
    mean_mask[ref] = True

    def ablated(S):
        sel = torch.zeros(q + 1, dtype=torch.bool)
        sel[S] = True
        return ablated_pattern(a, everything, sel, score_ablation=score_ablation, mean_mask=mean_mask)

    effects = list(np.asarray(g.get("effects", [np.nan] * len(keys)), dtype=float))
    geff = list(np.asarray(g["global_effects"], dtype=float)) if "global_effects" in g and g["global_effects"] is not None else [np.nan] * len(keys)
    conds = [("clean run", [], np.nan, np.nan)]
    for n_, j in enumerate(keys):
        conds.append((f"ablate key {j}", [j], effects[n_] if n_ < len(effects) else np.nan,
                      geff[n_] if n_ < len(geff) else np.nan))
    conds.append((f"ablate keys {keys_str(keys)} jointly", keys, float(g.get("effect_joint", np.nan)),
                  float(g.get("global_effect_joint", np.nan)) if "global_effect_joint" in g else np.nan))
    P = torch.stack([torch.softmax(a, 0) if not S else ablated(S) for _, S, _, _ in conds]).numpy()  # [cond, q+1]
    show = set(np.nonzero((P >= min_weight).any(0))[0].tolist()) | set(keys)
    if len(show) > max_keys:
        rank = np.argsort(-P.max(0))
        show = set(keys) | set(rank[: max(0, max_keys - len(keys))].tolist())
    show = sorted(show)
    text = token_text(model, task.tokens[p_i, : q + 1].tolist())
    rows = []
    for ci, (name, S, e, ge) in enumerate(conds):
        for j in show:
            rows.append(dict(condition=name, order=ci, position=j, token=f"{j}: {text[j]}", weight=float(P[ci, j]),
                             ablated=j in S, effect=e, global_effect=ge))
        rest = [j for j in range(q + 1) if j not in show]
        if rest:
            rows.append(dict(condition=name, order=ci, position=-1, token=f"other keys ({len(rest)})",
                             weight=float(P[ci, rest].sum()), ablated=False, effect=e, global_effect=ge))
    out = pd.DataFrame(rows)
    out["prompt"], out["layer"], out["head"], out["query"] = p_i, l, h, q
    out["keys"] = keys_str(keys)
    out["query_token"] = text[q]
    out["interaction"] = float(g.get("interaction", np.nan))
    out["score_ablation"] = score_ablation
    return out
