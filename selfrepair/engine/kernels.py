"""The score-ablation kernel: one attention row's softmax after some of its keys are ablated.

docs/quantities.md, "Local effects": mean ablation sets each ablated key's score to the mean of the
row's unmasked scores (``mean_mask`` narrows the keys that enter the mean, e.g. without BOS);
knockout removes the key (score ``-inf``). The pattern is the softmax over the unmasked keys.

This is the definition every caller shares (the attention-row figure data, the benchmarks, the tests'
brute force). ``analysis.rows.row_effects`` evaluates the same definition in closed form for every
subset of a group at once, in log space (``tests/test_self_repair.py`` checks it against this kernel).
"""

from __future__ import annotations

from typing import Optional

import torch

from .._deprecation import renamed_keyword
from .._typing import Bool, Float, Tensor

__all__ = ["ablated_pattern", "SCORE_ABLATIONS"]

SCORE_ABLATIONS = ("mean", "knockout")


def ablated_pattern(
    scores: Float[Tensor, "*rows n"],
    mask: Bool[Tensor, "*rows n"],
    ablated: Bool[Tensor, "*rows n"],
    *,
    score_ablation: str = "mean",
    mean_mask: Optional[Bool[Tensor, "*rows n"]] = None,
    **deprecated,
) -> Float[Tensor, "*rows n"]:
    """The pattern of each row after the score ablation of its ``ablated`` keys (no key ablated: the clean pattern).

    ``scores`` may hold anything at masked keys; ``mask`` marks the unmasked keys; ``mean_mask`` (default
    ``mask``) the keys whose scores enter the mean; ``score_ablation``: ``"mean"`` or ``"knockout"`` (the old
    keyword ``ablation=`` still works, with a DeprecationWarning). Computed in the dtype of ``scores``.
    """
    score_ablation = renamed_keyword(deprecated, "ablation", "score_ablation", score_ablation, "ablated_pattern",
                                     default="mean", stacklevel=3)
    if score_ablation not in SCORE_ABLATIONS:
        raise ValueError(f"unknown score_ablation {score_ablation!r}; valid: 'mean', 'knockout'.")
    ninf = torch.tensor(float("-inf"), dtype=scores.dtype, device=scores.device)
    if score_ablation == "mean":
        mm = mask if mean_mask is None else mean_mask & mask
        fill = (scores.masked_fill(~mm, 0.0).sum(-1) / mm.sum(-1))[..., None]
    else:
        fill = ninf
    a = torch.where(ablated, fill, scores)
    return torch.softmax(a.masked_fill(~mask, ninf), -1)
