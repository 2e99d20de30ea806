"""The built-in tasks by name: ``induction`` and ``code-copy``, and the registry ``load`` reads."""

from __future__ import annotations

import inspect
from typing import Callable, Union

import torch

from .._typing import Int, Tensor
from ..models.facts import model_dims
from .base import Task, TaskError
from .heldout import heldout_text
from .tokens import bos_id, content_ids, encode, get_tokenizer, special_ids

__all__ = ["TASKS", "register", "available", "load", "induction", "code_copy", "code_copy_wrong"]


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

    builder = TASKS[name]
    extra = [p.name for p in inspect.signature(builder).parameters.values()
             if p.kind == p.KEYWORD_ONLY and p.name not in ("n", "seq_len", "seed")]
    unknown = sorted(set(options) - set(extra))
    if unknown:
        raise TaskError(f"task {name!r} has no option(s) {', '.join(unknown)}; its options: "
                        f"{', '.join(extra) or 'none'}.")
    task = builder(model, n=n, seq_len=seq_len, seed=seed, **options)
    return task.validate(model)


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


def _heldout_streams(tok) -> dict[str, Int[Tensor, "n_tokens"]]:
    return {name: torch.tensor(encode(tok, text), dtype=torch.long) for name, text in heldout_text().items()}


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
