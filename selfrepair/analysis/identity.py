"""What identifies an analysis' inputs: hashes of the model's weights and of the task, package versions."""

from __future__ import annotations

import hashlib
import json
import weakref
import importlib.metadata as md

import torch

from ..tasks import Task

__all__ = ["model_hash", "task_hash", "versions", "identity_diff", "identity_changes"]


def versions(packages=("selfrepair", "transformer_lens", "torch", "transformers", "pandas", "pyarrow")) -> dict:
    """Installed version of each package ("unknown" where it cannot be told)."""
    out = {}
    for pkg in packages:
        try:
            out[pkg] = md.version(pkg.replace("_", "-")) if pkg != "selfrepair" else md.version(pkg)
        except Exception:
            try:
                mod = __import__(pkg)
                out[pkg] = str(getattr(mod, "__version__", "unknown"))
            except Exception:
                out[pkg] = "unknown"
    return out


_HASHES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _weights_state(model) -> tuple:
    """What changes when a parameter's bytes can have changed: its storage, version counter (every in-place
    write bumps it), shape and dtype."""
    return tuple((name, p.data_ptr(), p._version, tuple(p.shape), p.dtype) for name, p in model.named_parameters())


def model_hash(model) -> str:
    """sha256 over every parameter's name, shape, dtype and bytes (identifies the weights). Cached per model
    while no parameter was written or replaced since (storage and version counter unchanged)."""
    try:
        state = _weights_state(model)
        hit = _HASHES.get(model)
        if hit is not None and hit[0] == state:
            return hit[1]
    except TypeError:                      # not weak-referenceable: hash every time
        state = None
    out = _hash_weights(model)
    if state is not None:
        _HASHES[model] = (state, out)
    return out


def _hash_weights(model) -> str:
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        t = p.detach().cpu().contiguous()
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def task_hash(task: Task) -> str:
    """sha256 over the task's tokens, answers, wrongs, positions, mask and metric name."""
    h = hashlib.sha256()
    for t in (task.tokens, task.answer_ids, task.wrong_ids, task.positions, task.attention_mask):
        t = t.detach().cpu().to(torch.int64).contiguous()
        h.update(f"{tuple(t.shape)}|".encode())
        h.update(t.numpy().tobytes())
    metric = task.metric if isinstance(task.metric, str) else getattr(task.metric, "__qualname__", repr(task.metric))
    h.update(str(metric).encode())
    return h.hexdigest()


def identity_changes(old: dict, new: dict) -> list:
    """``(name, old value, new value)`` for every entry that differs between two run identities, compared as
    JSON stores them (tuples as lists, dtypes as text); the ``settings`` entry is compared setting by
    setting (names ``"settings.k"``). The one diff of run identities: checkpoints and ``--resume`` use it."""
    old, new = json.loads(json.dumps(old, default=str)), json.loads(json.dumps(new, default=str))
    out = []
    for key in list(old) + [k for k in new if k not in old]:
        a, b = old.get(key), new.get(key)
        if key == "settings" and isinstance(a, dict) and isinstance(b, dict):
            out += [(f"settings.{k}", a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
        elif a != b:
            out.append((key, a, b))
    return out


def identity_diff(old: dict, new: dict) -> list:
    """What differs between two checkpoint identities ``{"settings", "model_hash", "task_hash", "format"}``,
    in words: ``["settings [names]", "model weights", "task", "file format"]`` (empty when they agree)."""
    names = [n for n, _, _ in identity_changes(old, new)]
    settings = [n[len("settings."):] for n in names if n.startswith("settings.")]
    return (([f"settings {settings}"] if settings else []) + (["model weights"] if "model_hash" in names else [])
            + (["task"] if "task_hash" in names else []) + (["file format"] if "format" in names else []))
