"""Tasks: token batches with an answer, a wrong token and a metric position per prompt.

``Task`` is the one object every analysis takes. The metric ``m`` (docs/quantities.md,
"Notation") is evaluated on the logits at ``positions`` only:
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

from dataclasses import dataclass, field
from typing import Callable, Union

import pandas as pd
import torch

from .._devices import model_device
from ..models.facts import model_dims
from .._typing import Float, Int, Tensor

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
        if self.tokens.shape[0] == 0:
            raise TaskError("empty task: give at least one prompt.")
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


def validate_task(task, model) -> Task:
    """THE task check every entry point runs once: ``task`` is a :class:`Task` and fits ``model``
    (``Task.validate``: ids in the vocabulary, prompts within the context). Returns the task."""
    if not isinstance(task, Task):
        raise TypeError(f"task must be a selfrepair Task; got {type(task).__name__}. Build one with "
                        "selfrepair.tasks.load(...) or Task(tokens, answer_ids, wrong_ids).")
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
