"""Argument checks and small model calls shared by the attribution analyses (explain, faithfulness, estimates).

Default baseline token (``default_baseline_id``): the tokenizer's single-token
encoding of ``" "`` (a space: the GIM paper's and gim-explain's choice; 221 for
the shipped BPE), else its pad, unk or BOS token; without a tokenizer, token 0
(``<unk>`` in llama2.c / SentencePiece vocabularies such as stories260K).
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from .._devices import analysis_dtype, model_device, model_dtype
from .._typing import Tensor
from ..models.facts import model_dims
from ..tasks import get_tokenizer

__all__ = ["METHODS", "calc_dtype", "check_method", "forward_logits", "default_baseline_id",
           "baseline_token"]


METHODS = ("grad", "gim")


def calc_dtype(model) -> torch.dtype:
    """Analysis arithmetic: float64 for float64 models, float32 otherwise."""
    return analysis_dtype(model_dtype(model))


def check_method(method: str, gim_options: dict) -> None:
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; valid: {', '.join(METHODS)}.")
    if method == "grad" and gim_options:
        raise ValueError(f"GIM options {sorted(gim_options)} only apply to method='gim'.")


def forward_logits(model, tokens: Tensor) -> Tensor:
    logits = model(tokens.to(model_device(model)))
    return logits if logits.dtype in (torch.float32, torch.float64) else logits.float()


def default_baseline_id(model) -> int:
    """The baseline token of ``explain`` / ``faithfulness`` (module docstring)."""
    tok = get_tokenizer(model)
    if tok is not None:
        try:
            ids = list(tok.encode(" ", add_special_tokens=False))
        except Exception:  # a tokenizer that cannot encode text
            ids = []
        if len(ids) == 1:
            return int(ids[0])
        for attr in ("pad_token_id", "unk_token_id", "bos_token_id"):
            v = getattr(tok, attr, None)
            if v is not None:
                return int(v)
    return 0


def baseline_token(model, baseline_id: Optional[int]) -> int:
    b = default_baseline_id(model) if baseline_id is None else baseline_id
    d_vocab, _ = model_dims(model)
    if isinstance(b, bool) or not isinstance(b, (int, np.integer)) or not 0 <= int(b) < d_vocab:
        raise ValueError(f"baseline_id must be a token id in [0, {d_vocab}); got {b!r}.")
    return int(b)
