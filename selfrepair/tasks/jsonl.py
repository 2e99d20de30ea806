"""The user's own prompts: one JSON object per line, as text or as token ids."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Union


from ..models.facts import model_dims
from .base import MetricFn, Task, TaskError
from .tokens import bos_id, encode, get_tokenizer, prepends_bos, right_pad

__all__ = ["from_jsonl"]


_TEXT_KEYS = ("prompt", "answer", "wrong")
_ID_KEYS = ("tokens", "answer_id", "wrong_id")
_OPTIONAL_KEYS = ("position", "id", "meta")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def from_jsonl(path: Union[str, Path], model, *, prepend_bos: Union[bool, None] = None,
               metric: Union[str, MetricFn] = "logit_diff") -> Task:
    """The user's prompts from a JSON-lines file, one prompt per line, as a right-padded Task.

    Each line is either text, ``{"prompt": str, "answer": str, "wrong": str}``,
    or ids, ``{"tokens": [int, ...], "answer_id": int, "wrong_id": int}``;
    optional keys: ``"position"`` (the metric position, a token index into the
    final sequence, BOS included; negative counts from the end; default the
    last token), ``"id"`` and ``"meta"`` (kept, not used). Blank lines are skipped.

    Text lines need the model's tokenizer. The prompt is tokenized without
    special tokens and BOS is prepended when ``prepend_bos`` (default
    ``model.cfg.default_prepend_bos``) unless the prompt already starts with
    it. ``answer`` and ``wrong`` must each be exactly one token, spelled as they
    appear after the prompt (``" foo"`` with its leading space); a warning says
    when the tokenizer would merge them with the prompt's end differently.
    Id lines are used as given (no BOS added).

    Padding: on the right with the tokenizer's pad id (else 0) and
    ``attention_mask`` 0. Errors (``TaskError``) name the file, the line and the
    problem: invalid JSON, missing or unknown keys, answer/wrong not one token,
    answer == wrong (logit_diff would be identically 0), empty prompt, prompt
    longer than ``n_ctx``, ids outside ``[0, d_vocab)``, a position outside the
    prompt, an empty file.
    """
    path = Path(path)
    if not path.is_file():
        raise TaskError(f"{path}: no such file.")
    reader = _LineReader(model, prepend_bos)
    seqs, answers, wrongs, positions, lines, ids_meta = [], [], [], [], [], []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            seq, ans, wr, pos, rec = reader.read(line, f"{path}, line {lineno}")
            seqs.append(seq)
            answers.append(ans)
            wrongs.append(wr)
            positions.append(pos % len(seq))
            lines.append(lineno)
            ids_meta.append(rec.get("id"))
    if not seqs:
        raise TaskError(f"{path}: no prompts (the file is empty); write one JSON object per line.")
    tok = reader.tok
    pad = getattr(tok, "pad_token_id", None) if tok is not None else None
    pad = 0 if pad is None else int(pad)
    tokens, mask = right_pad(seqs, pad)
    task = Task(tokens, answers, wrongs, positions=positions, attention_mask=mask, metric=metric, name=path.stem,
                meta={"source": str(path), "pad_id": pad, "prepend_bos": reader.pre,
                      "per_prompt": {"line": lines, "id": ids_meta}})
    return task.validate(model)


class _LineReader:
    """One JSONL line -> ``(token ids, answer id, wrong id, position, record)``, or a TaskError naming the line."""

    def __init__(self, model, prepend_bos: Union[bool, None]):
        self.d_vocab, self.n_ctx = model_dims(model)
        self.tok = get_tokenizer(model)
        self.pre = prepends_bos(model) if prepend_bos is None else bool(prepend_bos)
        self.bos = bos_id(model)

    def read(self, line: str, where: str):
        def err(msg):
            return TaskError(f"{where}: {msg}")

        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise err(f"invalid JSON ({e.msg} at column {e.colno}); each line must be one JSON object.") from None
        if not isinstance(rec, dict):
            raise err(f"expected a JSON object, got {type(rec).__name__}.")
        unknown = sorted(set(rec) - set(_TEXT_KEYS + _ID_KEYS + _OPTIONAL_KEYS))
        if unknown:
            raise err(f"unknown key(s) {', '.join(map(repr, unknown))}; valid keys: "
                      f"{', '.join(_TEXT_KEYS)} (text) or {', '.join(_ID_KEYS)} (ids), optional "
                      f"{', '.join(_OPTIONAL_KEYS)}.")
        has_text = [k for k in _TEXT_KEYS if k in rec]
        has_ids = [k for k in _ID_KEYS if k in rec]
        if has_text and has_ids:
            raise err(f"mixes text keys ({', '.join(has_text)}) and id keys ({', '.join(has_ids)}); "
                      f"use either {', '.join(_TEXT_KEYS)} or {', '.join(_ID_KEYS)}.")
        if not has_text and not has_ids:
            raise err(f"missing keys: give {', '.join(_TEXT_KEYS)} (text) or {', '.join(_ID_KEYS)} (ids).")
        seq, ans, wr = self._text(rec, where, err) if has_text else self._ids(rec, err)
        if ans == wr:
            raise err(f"answer and wrong are the same token (id {ans}); logit_diff would be identically 0.")
        pos = rec.get("position", None)
        if pos is None:
            pos = len(seq) - 1
        elif not _is_int(pos) or not -len(seq) <= pos < len(seq):
            raise err(f"position {pos!r} is outside the prompt's {len(seq)} tokens "
                      f"(give an int in [{-len(seq)}, {len(seq) - 1}]).")
        return seq, ans, wr, pos, rec

    def _too_long(self, seq, err):
        if len(seq) > self.n_ctx:
            raise err(f"prompt is {len(seq)} tokens, longer than the model's context (n_ctx={self.n_ctx}); "
                      "shorten it.")

    def _text(self, rec: dict, where: str, err):
        tok, d_vocab = self.tok, self.d_vocab
        missing = [k for k in _TEXT_KEYS if k not in rec]
        if missing:
            raise err(f"missing key(s) {', '.join(map(repr, missing))}; a text line needs "
                      f"{', '.join(_TEXT_KEYS)}.")
        for k in _TEXT_KEYS:
            if not isinstance(rec[k], str):
                raise err(f"{k!r} must be a string, got {type(rec[k]).__name__}.")
        if tok is None:
            raise err("text prompts need the model's tokenizer and this model has none "
                      "(model.tokenizer is None); give ids: "
                      '{"tokens": [...], "answer_id": ..., "wrong_id": ...}.')
        if rec["prompt"] == "":
            raise err("empty prompt.")
        plain = encode(tok, rec["prompt"])
        seq = [self.bos] + plain if self.pre and (not plain or plain[0] != self.bos) else plain
        self._too_long(seq, err)
        pair = []
        for k in ("answer", "wrong"):
            ids = encode(tok, rec[k])
            if len(ids) != 1:
                pieces = tok.convert_ids_to_tokens(ids) if ids else []
                raise err(f"{k} {rec[k]!r} is {len(ids)} tokens {ids} {pieces}, not exactly one; "
                          "give a single token, spelled as it appears after the prompt "
                          "(with its leading space, e.g. ' foo'), or use answer_id/wrong_id.")
            pair.append(ids[0])
        ans, wr = pair
        merged = [k for k, t in (("answer", ans), ("wrong", wr))
                  if encode(tok, rec["prompt"] + rec[k]) != plain + [t]]
        if merged:
            warnings.warn(f"{where}: the tokenizer splits prompt + {' / '.join(merged)} differently from "
                          "prompt then that token (they merge across the boundary); check the spacing.",
                          stacklevel=4)  # the caller of from_jsonl
        bad = [(k, v) for k, v in (("prompt token", max(seq)), ("answer", ans), ("wrong", wr))
               if v >= d_vocab]
        if bad:
            raise err(f"{bad[0][0]} id {bad[0][1]} is outside the model's vocabulary [0, {d_vocab}) "
                      "(the tokenizer does not match the model).")
        return seq, ans, wr

    def _ids(self, rec: dict, err):
        d_vocab = self.d_vocab
        missing = [k for k in _ID_KEYS if k not in rec]
        if missing:
            raise err(f"missing key(s) {', '.join(map(repr, missing))}; an id line needs "
                      f"{', '.join(_ID_KEYS)}.")
        seq = rec["tokens"]
        if not isinstance(seq, list) or not all(_is_int(t) for t in seq):
            raise err("'tokens' must be a list of ints.")
        if not seq:
            raise err("empty prompt ('tokens' is []).")
        for k in ("answer_id", "wrong_id"):
            if not _is_int(rec[k]):
                raise err(f"{k!r} must be an int, got {rec[k]!r}.")
        ans, wr = rec["answer_id"], rec["wrong_id"]
        for k, v in [("answer_id", ans), ("wrong_id", wr)] + [(f"tokens[{i}]", t) for i, t in enumerate(seq)]:
            if not 0 <= v < d_vocab:
                raise err(f"{k} = {v} is outside the model's vocabulary [0, {d_vocab}).")
        self._too_long(seq, err)
        return seq, ans, wr
