"""The model's token conventions: its tokenizer, BOS, special and content ids (one rule for every task)."""

from __future__ import annotations

import unicodedata
from typing import Sequence

import torch

from .._typing import Int, Tensor
from ..models.facts import model_dims

__all__ = ["get_tokenizer", "bos_id", "prepends_bos", "special_ids", "content_ids", "encode", "token_text",
           "right_pad"]


def get_tokenizer(model):
    """The model's Hugging Face tokenizer, or None for tokenizer-less models."""
    return getattr(model, "tokenizer", None)


def bos_id(model) -> int:
    """BOS id: the tokenizer's ``bos_token_id``; else the model config's ``bos_token_id``
    (``model.cfg``, then the wrapped HF model's config) when inside ``[0, d_vocab)``; else 0."""
    d_vocab, _ = model_dims(model)
    tok = get_tokenizer(model)
    if tok is not None and getattr(tok, "bos_token_id", None) is not None:
        return int(tok.bos_token_id)
    for cfg in (model.cfg, getattr(getattr(model, "original_model", None), "config", None)):
        v = getattr(cfg, "bos_token_id", None)
        if isinstance(v, int) and not isinstance(v, bool) and 0 <= v < d_vocab:
            return v
    return 0


def prepends_bos(model) -> bool:
    """Whether prompts get BOS prepended: ``model.cfg.default_prepend_bos`` (True if absent)."""
    return bool(getattr(model.cfg, "default_prepend_bos", True))


def special_ids(model) -> list[int]:
    """Ids that tasks never draw as content tokens.

    With a tokenizer: its special ids (``all_special_ids`` and added tokens marked
    special) and BOS. Without one (e.g. llama2.c models such as stories260K):
    ids 0, 1, 2 (the SentencePiece / llama2.c convention: 0 unk, 1 BOS, 2 EOS),
    BOS, and the config's ``eos_token_id`` / ``pad_token_id`` when in the vocabulary.
    """
    d_vocab, _ = model_dims(model)
    tok = get_tokenizer(model)
    ids = {bos_id(model)}
    if tok is not None:
        ids.update(int(i) for i in getattr(tok, "all_special_ids", []) or [])
        for i, t in (getattr(tok, "added_tokens_decoder", None) or {}).items():
            if getattr(t, "special", False):
                ids.add(int(i))
    else:
        ids.update((0, 1, 2))
        for cfg in (model.cfg, getattr(getattr(model, "original_model", None), "config", None)):
            for key in ("eos_token_id", "pad_token_id"):
                v = getattr(cfg, key, None)
                if isinstance(v, int) and not isinstance(v, bool):
                    ids.add(v)
    return sorted(i for i in ids if 0 <= i < d_vocab)


def content_ids(model) -> Int[Tensor, "n_ids"]:
    """The non-special vocabulary: ids in ``[0, d_vocab)`` (and inside the tokenizer's
    vocabulary when there is one) minus ``special_ids(model)``."""
    d_vocab, _ = model_dims(model)
    tok = get_tokenizer(model)
    top = d_vocab if tok is None else min(d_vocab, len(tok))
    keep = torch.ones(top, dtype=torch.bool)
    sp = [i for i in special_ids(model) if i < top]
    keep[sp] = False
    return keep.nonzero()[:, 0]


def encode(tok, text: str) -> list[int]:
    return list(tok.encode(text, add_special_tokens=False))


def token_text(model, ids: Sequence[int], max_len: int = 10) -> list[str]:
    """Readable text of each token (whitespace made visible, at most ``max_len`` characters); ``#id`` without a tokenizer."""
    tok = getattr(model, "tokenizer", None)
    out = []
    for i in ids:
        i = int(i)
        s = None
        if tok is not None:
            try:
                s = tok.decode([i])
            except Exception:
                s = None
        if s is None:
            s = f"#{i}"
        s = s.replace("\n", "\u23ce").replace("\t", "\u21e5").replace(" ", "\u00b7")
        # other control / unassigned characters as escapes (kaleido's PNG export fails on them)
        s = "".join(ch if unicodedata.category(ch)[0] != "C" else ascii(ch)[1:-1] for ch in s)
        if len(s) > max_len:
            s = s[: max_len - 1] + "\u2026"
        out.append(s if s else f"#{i}")
    return out


def right_pad(seqs: Sequence[Sequence[int]], pad: int) -> tuple:
    """Token id sequences of different lengths as ``(tokens [n, width], attention_mask [n, width])``, right-padded
    with ``pad`` (mask 1 on real tokens)."""
    width = max(len(s) for s in seqs)
    tokens = torch.full((len(seqs), width), int(pad), dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        tokens[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    return tokens, mask

