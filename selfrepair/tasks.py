"""Tasks: token batches with an answer, a wrong token and a metric position per prompt.

``Task`` is the one object every analysis takes. The metric ``m`` (SPEC,
Notation) is evaluated on the logits at ``positions`` only:
``"logit_diff"`` = logit[answer] - logit[wrong] (default), ``"logprob"`` =
log-softmax of the answer, or a callable
``fn(logits: Float[Tensor, "batch vocab"], answer_ids, wrong_ids) -> Float[Tensor, "batch"]``.
Prompts are right-padded; ``attention_mask`` marks real tokens (1) and padding (0).

Where tasks come from:

* ``load(name, model, *, n, seq_len=None, seed=0)``: the built-in tasks, by
  name (``available()`` lists them): ``"induction"`` (repeated random
  segments) and ``"code-copy"`` (held-out standard-library code cut where the
  next token repeats what followed the current token at least twice before).
  Both put two or more earlier keys in the context that predict the answer:
  redundant keys, where softmax-redistribution self-repair shows up.
* ``from_jsonl(path, model)``: the user's own prompts.

Token conventions (one rule for every task, see ``bos_id`` and
``special_ids``): BOS is the tokenizer's ``bos_token_id``, else the model
config's ``bos_token_id`` (when inside the vocabulary), else 0. Induction
prompts always start with BOS; code-copy windows (cut mid-file) have none
unless asked; JSONL text prompts get it when ``model.cfg.default_prepend_bos``
is true (TransformerLens' default).
Tasks stay on the CPU; analyses move them to the model's device.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Union

import torch

from ._devices import model_device
from ._typing import Float, Int, Tensor

MetricFn = Callable[[Tensor, Tensor, Tensor], Tensor]
METRICS = ("logit_diff", "logprob")


class TaskError(ValueError):
    """Bad task input (unknown name, bad JSONL line, ids outside the vocabulary, too long for the model)."""


@dataclass
class Task:
    """A batch of prompts with per-prompt answer/wrong tokens and metric positions.

    ``meta["per_prompt"]`` (optional) maps names to per-prompt lists; ``subset``
    keeps them aligned with the prompts.
    """

    tokens: Int[Tensor, "batch pos"]
    answer_ids: Int[Tensor, "batch"]
    wrong_ids: Int[Tensor, "batch"]
    positions: Union[Int[Tensor, "batch"], None] = None
    attention_mask: Union[Int[Tensor, "batch pos"], None] = None
    metric: Union[str, MetricFn] = "logit_diff"
    name: str = "custom"
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        self.tokens = torch.as_tensor(self.tokens, dtype=torch.long)
        if self.tokens.ndim != 2:
            raise ValueError(f"Task.tokens must be a [batch, pos] LongTensor; got shape {tuple(self.tokens.shape)}.")
        b, n = self.tokens.shape
        if b == 0 or n == 0:
            raise ValueError("Task is empty: tokens has shape "
                             f"{tuple(self.tokens.shape)}; give at least one prompt of at least one token.")
        self.answer_ids = torch.as_tensor(self.answer_ids, dtype=torch.long).reshape(-1)
        self.wrong_ids = torch.as_tensor(self.wrong_ids, dtype=torch.long).reshape(-1)
        for nm in ("answer_ids", "wrong_ids"):
            if getattr(self, nm).shape[0] != b:
                raise ValueError(f"Task.{nm} has {getattr(self, nm).shape[0]} entries for {b} prompts; give one per prompt.")
        if self.attention_mask is None:
            self.attention_mask = torch.ones_like(self.tokens)
        self.attention_mask = torch.as_tensor(self.attention_mask, dtype=torch.long)
        if self.attention_mask.shape != self.tokens.shape:
            raise ValueError(f"attention_mask shape {tuple(self.attention_mask.shape)} != tokens shape {tuple(self.tokens.shape)}.")
        am = self.attention_mask.bool()
        lengths = am.sum(1)
        if (lengths == 0).any():
            raise ValueError(f"prompt {int((lengths == 0).nonzero()[0])} is empty (its attention_mask is all 0).")
        # right padding only: real tokens form a prefix of every row
        prefix = torch.arange(n)[None, :] < lengths[:, None]
        if not torch.equal(prefix, am):
            bad = int((prefix != am).any(1).nonzero()[0])
            raise ValueError(f"prompt {bad}: attention_mask is not right padding (1s then 0s); pad on the right.")
        if self.positions is None:
            self.positions = lengths - 1
        self.positions = torch.as_tensor(self.positions, dtype=torch.long).reshape(-1)
        if self.positions.shape[0] != b:
            raise ValueError(f"Task.positions has {self.positions.shape[0]} entries for {b} prompts.")
        if (self.positions < 0).any() or (self.positions >= lengths).any():
            bad = int(((self.positions < 0) | (self.positions >= lengths)).nonzero()[0])
            raise ValueError(f"prompt {bad}: metric position {int(self.positions[bad])} is outside its "
                             f"{int(lengths[bad])} real tokens.")
        if isinstance(self.metric, str) and self.metric not in METRICS:
            raise ValueError(f"unknown metric {self.metric!r}; valid: {', '.join(METRICS)} or a callable "
                             "fn(logits[batch, vocab], answer_ids, wrong_ids) -> [batch].")
        for key, vals in self.meta.get("per_prompt", {}).items():
            if len(vals) != b:
                raise ValueError(f"Task.meta['per_prompt'][{key!r}] has {len(vals)} entries for {b} prompts.")

    def __len__(self) -> int:
        return self.tokens.shape[0]

    @property
    def lengths(self) -> Int[Tensor, "batch"]:
        """Number of real (unpadded) tokens per prompt."""
        return self.attention_mask.sum(1)

    def metric_fn(self, logits: Float[Tensor, "batch vocab"], idx: Union[Tensor, slice, None] = None) -> Float[Tensor, "batch"]:
        """``m`` from the logits at the metric position, for prompts ``idx`` (all by default)."""
        idx = slice(None) if idx is None else idx
        ans, wr = self.answer_ids[idx].to(logits.device), self.wrong_ids[idx].to(logits.device)
        if callable(self.metric):
            return self.metric(logits, ans, wr)
        if self.metric == "logit_diff":
            return logits.gather(-1, ans[:, None])[:, 0] - logits.gather(-1, wr[:, None])[:, 0]
        lg = logits if logits.dtype == torch.float64 else logits.float()  # float32 or better
        return torch.log_softmax(lg, -1).gather(-1, ans[:, None])[:, 0]

    def metric_from_full_logits(self, logits: Float[Tensor, "batch pos vocab"], idx=None) -> Float[Tensor, "batch"]:
        """``m`` from full ``[batch, pos, vocab]`` logits (picks each prompt's metric position)."""
        pos = self.positions if idx is None else self.positions[idx]
        rows = torch.arange(logits.shape[0], device=logits.device)
        return self.metric_fn(logits[rows, pos.to(logits.device)], idx)

    def subset(self, idx) -> "Task":
        """The prompts ``idx`` (a slice, list or index tensor) as a new Task, padding trimmed."""
        idx = torch.arange(len(self))[idx] if isinstance(idx, slice) else torch.as_tensor(idx, dtype=torch.long)
        idx = idx.reshape(-1)
        n = int(self.lengths[idx].max())
        meta = dict(self.meta)
        if "per_prompt" in meta:
            meta["per_prompt"] = {k: [v[i] for i in idx.tolist()] for k, v in meta["per_prompt"].items()}
        return Task(self.tokens[idx, :n], self.answer_ids[idx], self.wrong_ids[idx], self.positions[idx],
                    self.attention_mask[idx, :n], self.metric, self.name, meta)

    def batches(self, batch_size: Union[int, None]):
        """Yield ``(start, Task)`` chunks of at most ``batch_size`` prompts."""
        bs = len(self) if not batch_size else int(batch_size)
        for s in range(0, len(self), bs):
            yield s, self.subset(slice(s, s + bs))

    def validate(self, model) -> "Task":
        """Check the task fits ``model``: every id (padding included) in ``[0, d_vocab)``,
        answer and wrong ids too, and no prompt longer than ``n_ctx``. Returns ``self``.

        Raises ``TaskError`` naming the first offending prompt and what to do.
        """
        d_vocab, n_ctx = model_dims(model)
        for nm, ids in (("answer_ids", self.answer_ids), ("wrong_ids", self.wrong_ids)):
            bad = (ids < 0) | (ids >= d_vocab)
            if bad.any():
                i = int(bad.nonzero()[0])
                raise TaskError(f"prompt {i}: {nm[:-4]} id {int(ids[i])} is outside the model's vocabulary "
                                f"[0, {d_vocab}); use ids of this model's tokenizer.")
        bad = (self.tokens < 0) | (self.tokens >= d_vocab)
        if bad.any():
            i, j = (int(v) for v in bad.nonzero()[0])
            what = "token" if self.attention_mask[i, j] else "padding token"
            raise TaskError(f"prompt {i}: {what} id {int(self.tokens[i, j])} at position {j} is outside the "
                            f"model's vocabulary [0, {d_vocab}); use ids of this model's tokenizer.")
        lengths = self.lengths
        if int(lengths.max()) > n_ctx:
            i = int(lengths.argmax())
            raise TaskError(f"prompt {i} has {int(lengths[i])} tokens, longer than the model's context "
                            f"(n_ctx={n_ctx}); shorten it or use a model with a longer context.")
        if self.tokens.shape[1] > n_ctx:
            raise TaskError(f"tokens are padded to {self.tokens.shape[1]} positions, more than the model's context "
                            f"(n_ctx={n_ctx}); trim the padding (Task.subset does).")
        return self


# ---------------------------------------------------------------------------
# the model's token conventions


def model_dims(model) -> tuple[int, int]:
    """``(d_vocab, n_ctx)`` of a TransformerLens model (bridge or HookedTransformer)."""
    cfg = getattr(model, "cfg", None)
    if cfg is None or getattr(cfg, "d_vocab", None) is None or getattr(cfg, "n_ctx", None) is None:
        raise TypeError(f"expected a TransformerLens model with cfg.d_vocab and cfg.n_ctx, got {type(model).__name__}; "
                        "load one with selfrepair.load_model(...).")
    return int(cfg.d_vocab), int(cfg.n_ctx)


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


def _encode(tok, text: str) -> list[int]:
    return list(tok.encode(text, add_special_tokens=False))


# ---------------------------------------------------------------------------
# registry

TASKS: dict[str, Callable[..., Task]] = {}


def register(name: str):
    """Decorator registering ``fn(model, *, n, seq_len, seed, **options) -> Task`` under ``name``."""
    def deco(fn):
        TASKS[name] = fn
        return fn
    return deco


def available() -> list[str]:
    """Names accepted by ``load``."""
    return sorted(TASKS)


def load(name: str, model, *, n: int, seq_len: Union[int, None] = None, seed: int = 0, **options) -> Task:
    """The built-in task ``name`` for ``model``: ``n`` prompts, deterministic in ``seed``.

    ``seq_len`` is the prompt length in tokens, BOS included (see each task);
    ``options`` go to the task's builder (documented there). The task is
    validated against the model (ids in the vocabulary, length <= n_ctx) and
    lives on the CPU.
    """
    if name not in TASKS:
        raise TaskError(f"unknown task {name!r}; valid names: {', '.join(available())} "
                        "(or selfrepair.tasks.from_jsonl(path, model) for your own prompts).")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise TaskError(f"n must be a positive int (the number of prompts), got {n!r}.")
    if seq_len is not None and (isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1):
        raise TaskError(f"seq_len must be a positive int (prompt length in tokens) or None, got {seq_len!r}.")
    import inspect

    builder = TASKS[name]
    extra = [p.name for p in inspect.signature(builder).parameters.values()
             if p.kind == p.KEYWORD_ONLY and p.name not in ("n", "seq_len", "seed")]
    unknown = sorted(set(options) - set(extra))
    if unknown:
        raise TaskError(f"task {name!r} has no option(s) {', '.join(unknown)}; its options: "
                        f"{', '.join(extra) or 'none'}.")
    task = builder(model, n=n, seq_len=seq_len, seed=seed, **options)
    return task.validate(model)


# ---------------------------------------------------------------------------
# induction


@register("induction")
def induction(model, *, n: int, seq_len: Union[int, None] = None, seed: int = 0) -> Task:
    """Repeated random segments: ``[BOS] + seg + seg + seg``.

    Each prompt: BOS, then a segment of ``L = 20`` distinct tokens drawn
    uniformly (without replacement, so the next token is unambiguous) from the
    non-special vocabulary (``content_ids``), repeated three times;
    ``seq_len`` (default 61) is the whole length, ``1 + 3 L``: giving it sets
    ``L = (seq_len - 1) / 3``, which must be a whole number >= 2. The metric
    position ``p`` is drawn uniformly (seeded) among the third copy's tokens
    that have a successor inside it (offsets 0 .. L-2 of the copy), so the
    tokens after ``p`` are in the prompt but never seen by the metric. The
    answer is the segment's next token ``x[p+1]``, which followed ``x[p]`` in
    both earlier copies (two redundant induction keys, at ``p+1-L`` and
    ``p+1-2L``); wrong is another token of the segment, drawn uniformly among
    the ``L - 1`` others. BOS is prepended whatever ``default_prepend_bos``
    says (the task's structure counts it). All draws use one
    ``torch.Generator`` seeded with ``seed``.
    """
    d_vocab, n_ctx = model_dims(model)
    if seq_len is None:
        L = 20
    else:
        if (seq_len - 1) % 3 or (seq_len - 1) // 3 < 2:
            raise TaskError(f"induction: seq_len={seq_len} is not 1 + 3 * L with a segment length L >= 2 "
                            "(BOS + three copies); e.g. 61 (L = 20, the default) or 1 + 3 * L for another L.")
        L = (seq_len - 1) // 3
    total = 1 + 3 * L
    if total > n_ctx:
        raise TaskError(f"induction: prompts of {total} tokens do not fit the model's context (n_ctx={n_ctx}); "
                        f"give seq_len <= {1 + 3 * ((n_ctx - 1) // 3)}.")
    vocab = content_ids(model)
    if len(vocab) < L:
        raise TaskError(f"induction: the model has only {len(vocab)} non-special tokens, fewer than the "
                        f"segment length {L}; give a smaller seq_len.")
    gen = torch.Generator().manual_seed(seed)
    # a uniform random L-subset of the vocabulary per prompt, in random order
    seg = vocab[torch.rand(n, len(vocab), generator=gen).argsort(dim=1)[:, :L]]  # [n, L]
    bos = bos_id(model)
    tokens = torch.cat([torch.full((n, 1), bos, dtype=torch.long), seg.repeat(1, 3)], dim=1)  # [n, 1+3L]
    k = torch.randint(0, L - 1, (n,), generator=gen)  # offset of the metric token in the third copy
    positions = 1 + 2 * L + k
    rows = torch.arange(n)
    answer = seg[rows, k + 1]
    r = torch.randint(0, L - 1, (n,), generator=gen)  # uniform among the L - 1 segment slots other than k + 1
    wrong = seg[rows, torch.where(r < k + 1, r, r + 1)]
    return Task(tokens, answer, wrong, positions=positions, name="induction",
                meta={"seed": seed, "seq_len": total, "segment_len": L, "bos_id": bos})


# ---------------------------------------------------------------------------
# code-copy


def _heldout_streams(tok) -> dict[str, Int[Tensor, "n_tokens"]]:
    from .training import heldout_text

    return {name: torch.tensor(_encode(tok, text), dtype=torch.long) for name, text in heldout_text().items()}


def _repeat_counts(s: Int[Tensor, "n_tokens"], body: int) -> Int[Tensor, "n_cut"]:
    """For each metric position ``p`` in ``body-1 .. len(s)-2`` (the last token of the window
    ``s[p-body+1 : p+1]``): how many ``j`` in ``[p-body+1, p)`` have ``s[j] == s[p]`` and
    ``s[j+1] == s[p+1]``, i.e. earlier occurrences of the bigram ``(s[p], s[p+1])``.

    Bigram starts are sorted by ``(bigram, position)``; the count is the difference of two
    ``searchsorted`` ranks, O(n log n) whatever the window length.
    """
    n = len(s)
    bigram = s[:-1] * (int(s.max()) + 1) + s[1:]  # [n-1], one id per bigram start j
    key = bigram * n + torch.arange(n - 1)  # unique, sorts by (bigram, position)
    keys = key.sort().values
    P = torch.arange(body - 1, n - 1)
    base = bigram[P] * n
    return torch.searchsorted(keys, base + P) - torch.searchsorted(keys, base + (P - body + 1))


def _pick(counts: dict, last: dict) -> Union[int, None]:
    """The most frequent key; ties go to the one seen latest."""
    if not counts:
        return None
    return max(counts, key=lambda t: (counts[t], last[t]))


def code_copy_wrong(window: list[int], answer: int, special: set) -> tuple[Union[int, None], str]:
    """The wrong token for a code-copy window whose last token is the current token.

    Rule: among the followers ``window[j+1]`` of earlier occurrences
    ``window[j] == window[-1]`` that differ from the answer (and are not special),
    the most frequent, ties to the latest occurrence (kind ``"follower"``);
    if there is none, the most frequent token of the window other than the
    answer (and non-special), ties to the latest occurrence (kind ``"frequent"``).
    """
    t = window[-1]
    cnt, last = {}, {}
    for j in range(len(window) - 1):
        f = window[j + 1]
        if window[j] == t and f != answer and f not in special:
            cnt[f] = cnt.get(f, 0) + 1
            last[f] = j + 1
    w = _pick(cnt, last)
    if w is not None:
        return w, "follower"
    cnt, last = {}, {}
    for j, x in enumerate(window):
        if x != answer and x not in special:
            cnt[x] = cnt.get(x, 0) + 1
            last[x] = j
    return _pick(cnt, last), "frequent"


@register("code-copy")
def code_copy(model, *, n: int, seq_len: Union[int, None] = None, seed: int = 0, min_repeats: int = 2,
              skip_whitespace: bool = False, prepend_bos: bool = False) -> Task:
    """Held-out standard-library code cut where the next token repeats an earlier bigram.

    The shipped held-out files (``selfrepair.training.HELDOUT_FILES``, never
    trained on) are tokenized, file by file, with the model's tokenizer (so a
    tokenizer is required). A prompt is a window of consecutive code tokens from
    inside one file (with ``[BOS]`` in front only if ``prepend_bos=True``), ``seq_len`` tokens in all
    (default ``min(128, n_ctx)``). The metric position ``p`` is the last
    token, the current token ``t = x[p]``, the answer the true next token
    ``x[p+1]`` (not in the prompt). A window is a valid cut when at least
    ``min_repeats`` (default 2) earlier positions ``j < p`` of the window have
    ``x[j] == t`` and ``x[j+1] == x[p+1]``: the answer followed the current
    token at two or more earlier places (redundant keys). Wrong (see
    ``code_copy_wrong``): the most frequent other follower of ``t`` in the
    window, else the most frequent other token of the window; ties to the
    latest occurrence; ``meta["per_prompt"]["wrong_kind"]`` says which.
    Answers are never special tokens; ``skip_whitespace=True`` also drops cuts
    whose answer decodes to whitespace only (indentation, newlines), which are
    kept by default. ``n`` cuts are drawn without replacement from all valid
    cuts across the files by a permutation seeded with ``seed`` (so a smaller
    ``n`` gives a prefix of a larger one); fewer valid cuts than ``n`` raises.

    No BOS by default, unlike ``default_prepend_bos``: a window starts in the
    middle of a file, and a BOS there tells the model "a new document starts
    here" (the shipped model saw BOS only at file starts and before its
    synthetic repeated-token sequences; a BOS in front of mid-file code cut
    its top-1 on this task from 0.38 to 0.06 in a training snapshot).
    """
    tok = get_tokenizer(model)
    if tok is None:
        raise TaskError("code-copy needs the model's tokenizer to tokenize the held-out code, and this model has "
                        "none (model.tokenizer is None); use the 'induction' task or from_jsonl with token ids.")
    d_vocab, n_ctx = model_dims(model)
    seq_len = min(128, n_ctx) if seq_len is None else seq_len
    if seq_len > n_ctx:
        raise TaskError(f"code-copy: seq_len={seq_len} is longer than the model's context (n_ctx={n_ctx}).")
    pre = bool(prepend_bos)
    bos = bos_id(model)
    body = seq_len - int(pre)
    if body < min_repeats + 1 or body < 2:
        raise TaskError(f"code-copy: seq_len={seq_len} is too short to hold {min_repeats} earlier repeats.")
    special = set(special_ids(model))
    streams = _heldout_streams(tok)
    names = sorted(streams)
    cand_file, cand_p = [], []
    for fi, name in enumerate(names):
        s = streams[name]
        if len(s) < body + 1:
            continue
        counts = _repeat_counts(s, body)
        P = torch.arange(body - 1, len(s) - 1)
        ok = counts >= min_repeats
        ans = s[P + 1]
        ok &= ~torch.isin(ans, torch.tensor(sorted(special), dtype=torch.long))
        if skip_whitespace:
            ws = {int(a): tok.decode([int(a)]).strip() == "" for a in ans[ok].unique()}
            ok &= torch.tensor([not ws.get(int(a), False) for a in ans])
        cand_p.append(P[ok])
        cand_file.append(torch.full((int(ok.sum()),), fi, dtype=torch.long))
    cand_p = torch.cat(cand_p) if cand_p else torch.zeros(0, dtype=torch.long)
    cand_file = torch.cat(cand_file) if cand_file else torch.zeros(0, dtype=torch.long)
    n_cand = len(cand_p)
    if n_cand < n:
        raise TaskError(f"code-copy: only {n_cand} valid cuts exist at seq_len={seq_len} "
                        f"(min_repeats={min_repeats}) across the held-out files, fewer than n={n}; "
                        "ask for fewer prompts or another seq_len.")
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(n_cand, generator=gen)
    rows, answers, wrongs, files, starts, kinds = [], [], [], [], [], []
    for c in order.tolist():
        fi, p = int(cand_file[c]), int(cand_p[c])
        s = streams[names[fi]]
        window = s[p - body + 1 : p + 1].tolist()
        answer = int(s[p + 1])
        wrong, kind = code_copy_wrong(window, answer, special)
        if wrong is None:
            continue
        rows.append(([bos] if pre else []) + window)
        answers.append(answer)
        wrongs.append(wrong)
        files.append(names[fi])
        starts.append(p - body + 1)
        kinds.append(kind)
        if len(rows) == n:
            break
    if len(rows) < n:
        raise TaskError(f"code-copy: only {len(rows)} valid cuts have a wrong token, fewer than n={n}.")
    return Task(torch.tensor(rows), torch.tensor(answers), torch.tensor(wrongs), name="code-copy",
                meta={"seed": seed, "seq_len": seq_len, "min_repeats": min_repeats, "n_candidates": n_cand,
                      "bos_id": bos if pre else None,
                      "per_prompt": {"file": files, "start": starts, "wrong_kind": kinds}})


# ---------------------------------------------------------------------------
# the user's prompts

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
    d_vocab, n_ctx = model_dims(model)
    tok = get_tokenizer(model)
    pre = prepends_bos(model) if prepend_bos is None else bool(prepend_bos)
    bos = bos_id(model)
    seqs, answers, wrongs, positions, lines, ids_meta = [], [], [], [], [], []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}, line {lineno}"

            def err(msg):
                return TaskError(f"{where}: {msg}")

            def too_long(seq):
                if len(seq) > n_ctx:
                    raise err(f"prompt is {len(seq)} tokens, longer than the model's context (n_ctx={n_ctx}); "
                              "shorten it.")

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
            if has_text:
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
                plain = _encode(tok, rec["prompt"])
                seq = [bos] + plain if pre and (not plain or plain[0] != bos) else plain
                too_long(seq)
                pair = []
                for k in ("answer", "wrong"):
                    ids = _encode(tok, rec[k])
                    if len(ids) != 1:
                        pieces = tok.convert_ids_to_tokens(ids) if ids else []
                        raise err(f"{k} {rec[k]!r} is {len(ids)} tokens {ids} {pieces}, not exactly one; "
                                  "give a single token, spelled as it appears after the prompt "
                                  "(with its leading space, e.g. ' foo'), or use answer_id/wrong_id.")
                    pair.append(ids[0])
                ans, wr = pair
                merged = [k for k, t in (("answer", ans), ("wrong", wr))
                          if _encode(tok, rec["prompt"] + rec[k]) != plain + [t]]
                if merged:
                    warnings.warn(f"{where}: the tokenizer splits prompt + {' / '.join(merged)} differently from "
                                  "prompt then that token (they merge across the boundary); check the spacing.",
                                  stacklevel=2)
                bad = [(k, v) for k, v in (("prompt token", max(seq)), ("answer", ans), ("wrong", wr))
                       if v >= d_vocab]
                if bad:
                    raise err(f"{bad[0][0]} id {bad[0][1]} is outside the model's vocabulary [0, {d_vocab}) "
                              "(the tokenizer does not match the model).")
            else:
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
                too_long(seq)
            if ans == wr:
                raise err(f"answer and wrong are the same token (id {ans}); logit_diff would be identically 0.")
            pos = rec.get("position", None)
            if pos is None:
                pos = len(seq) - 1
            elif not _is_int(pos) or not -len(seq) <= pos < len(seq):
                raise err(f"position {pos!r} is outside the prompt's {len(seq)} tokens "
                          f"(give an int in [{-len(seq)}, {len(seq) - 1}]).")
            seqs.append(seq)
            answers.append(ans)
            wrongs.append(wr)
            positions.append(pos % len(seq))
            lines.append(lineno)
            ids_meta.append(rec.get("id"))
    if not seqs:
        raise TaskError(f"{path}: no prompts (the file is empty); write one JSON object per line.")
    pad = getattr(tok, "pad_token_id", None) if tok is not None else None
    pad = 0 if pad is None else int(pad)
    width = max(len(s) for s in seqs)
    tokens = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        tokens[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    task = Task(tokens, answers, wrongs, positions=positions, attention_mask=mask, metric=metric, name=path.stem,
                meta={"source": str(path), "pad_id": pad, "prepend_bos": pre,
                      "per_prompt": {"line": lines, "id": ids_meta}})
    return task.validate(model)


# ---------------------------------------------------------------------------
# evaluation


@torch.no_grad()
def score(model, task: Task, *, batch_size: Union[int, None] = 64):
    """Per-prompt scores of ``model`` on ``task`` from plain forward passes (padding masked).

    Returns a DataFrame with ``prompt, position, answer_id, wrong_id, metric``
    (the task's metric), ``logit_diff``, ``logprob`` (of the answer), ``top1``
    (the answer is the arg-max) and ``rank`` (0 = top), computed in float32.
    """
    import pandas as pd

    dev = model_device(model)
    out = []
    for start, b in task.batches(batch_size):
        toks = b.tokens.to(dev)
        kw = {} if bool(b.attention_mask.all()) else {"attention_mask": b.attention_mask.to(dev)}
        logits = model(toks, **kw)
        rows = torch.arange(len(b), device=dev)
        lp = logits[rows, b.positions.to(dev)].float()  # [batch, vocab]
        ans, wr = b.answer_ids.to(dev), b.wrong_ids.to(dev)
        la = lp.gather(-1, ans[:, None])[:, 0]
        out.append(pd.DataFrame({
            "prompt": range(start, start + len(b)),
            "position": b.positions.tolist(),
            "answer_id": b.answer_ids.tolist(),
            "wrong_id": b.wrong_ids.tolist(),
            "metric": b.metric_fn(lp).float().cpu().numpy(),
            "logit_diff": (la - lp.gather(-1, wr[:, None])[:, 0]).cpu().numpy(),
            "logprob": torch.log_softmax(lp, -1).gather(-1, ans[:, None])[:, 0].cpu().numpy(),
            "top1": (lp.argmax(-1) == ans).cpu().numpy(),
            "rank": (lp > la[:, None]).sum(-1).cpu().numpy(),
        }))
    return pd.concat(out, ignore_index=True)
