"""Tasks: prompts with an answer token, a wrong token and a metric position each.

``Task`` (``base``) is the one object every analysis takes, and ``Task.validate`` the one check
that it fits a model. ``load`` (``builtin``) builds the built-in tasks by name, ``from_jsonl``
(``jsonl``) reads the user's prompts; ``tokens`` holds the model's token conventions and
``heldout`` the held-out text the code-copy task is cut from.
"""

from .base import METRICS, MetricFn, Task, TaskError, score, validate_task
from .builtin import TASKS, available, code_copy, code_copy_wrong, induction, load, register
from .heldout import HELDOUT_DIR, HELDOUT_FILES, heldout_text
from .jsonl import from_jsonl
from .tokens import bos_id, content_ids, encode, get_tokenizer, prepends_bos, special_ids
from ..models.facts import model_dims

__all__ = [
    "Task", "TaskError", "validate_task", "METRICS", "MetricFn", "score", "TASKS", "available", "load", "register", "induction",
    "code_copy", "code_copy_wrong", "from_jsonl", "bos_id", "content_ids", "encode", "get_tokenizer",
    "prepends_bos", "special_ids", "heldout_text", "HELDOUT_DIR", "HELDOUT_FILES", "model_dims",
]
