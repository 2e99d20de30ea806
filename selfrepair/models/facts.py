"""Facts about a loaded model that every stage reads: its vocabulary, context, layers and heads."""

from __future__ import annotations

from dataclasses import dataclass

from .loading import model_kind
from .probe import cached_backend

__all__ = ["ModelFacts", "model_facts", "model_dims"]


def model_dims(model) -> tuple[int, int]:
    """``(d_vocab, n_ctx)`` of a TransformerLens model (bridge or HookedTransformer)."""
    cfg = getattr(model, "cfg", None)
    if cfg is None or getattr(cfg, "d_vocab", None) is None or getattr(cfg, "n_ctx", None) is None:
        raise TypeError(f"expected a TransformerLens model with cfg.d_vocab and cfg.n_ctx, got {type(model).__name__}; "
                        "load one with selfrepair.load_model(...).")
    return int(cfg.d_vocab), int(cfg.n_ctx)


@dataclass(frozen=True)
class ModelFacts:
    """The shapes and kind of a TransformerLens model, read off its config (no forward pass)."""

    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_head: int
    d_model: int
    d_vocab: int
    d_mlp: int
    gated: bool
    kind: str            # backend kind: "bridge-hf", "bridge-native", "tl3"
    architecture: str
    z_hook: str


def model_facts(model) -> ModelFacts:
    """The :class:`ModelFacts` of ``model``; the hook_z name comes from the probe when it has already run."""
    cfg = getattr(model, "cfg", None)
    if cfg is None or not hasattr(model, "hooks"):
        raise TypeError(f"measure_z_edits needs a TransformerLens model (TransformerBridge or HookedTransformer); "
                        f"got {type(model).__name__}.")
    be = cached_backend(model)
    n_heads = int(cfg.n_heads)
    n_kv = getattr(cfg, "n_key_value_heads", None) or n_heads
    hf = model.__dict__.get("original_model")
    arch = type(hf).__name__ if hf is not None else type(model).__name__
    if be is not None:
        kind, z_hook = be.kind, be.z_hook
    else:
        kind, z_hook = model_kind(model), "blocks.{layer}.attn.hook_z"
        if z_hook.format(layer=0) not in model.hook_dict:
            raise ValueError(f"{type(model).__name__} has no hook {z_hook.format(layer=0)!r}; the global-effects "
                             "engine edits head outputs there.")
    d_mlp = int(getattr(cfg, "d_mlp", None) or 4 * int(cfg.d_model))
    return ModelFacts(int(cfg.n_layers), n_heads, int(n_kv), int(cfg.d_head), int(cfg.d_model), int(cfg.d_vocab), d_mlp,
                 bool(getattr(cfg, "gated_mlp", False)), kind, arch, z_hook)
