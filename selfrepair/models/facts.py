"""Facts about a loaded model that every stage reads: its vocabulary, context, layers and heads.

:class:`ModelFacts` is the one home of a model's dimensions. :func:`model_facts` reads them off the
config (no forward pass); the probe (:mod:`selfrepair.models.probe`) measures the head counts and widths
on the hooks and keeps its :class:`ModelFacts` in ``Backend.facts``.
"""

from __future__ import annotations

from dataclasses import dataclass

from .loading import model_kind

__all__ = ["ModelFacts", "model_facts", "model_dims", "model_architecture", "Z_HOOK"]

#: the hook whose output (``[batch, pos, n_heads, d_head]``) every head-output edit moves
Z_HOOK = "blocks.{layer}.attn.hook_z"


def model_dims(model) -> tuple[int, int]:
    """``(d_vocab, n_ctx)`` of a TransformerLens model (bridge or HookedTransformer)."""
    cfg = getattr(model, "cfg", None)
    if cfg is None or getattr(cfg, "d_vocab", None) is None or getattr(cfg, "n_ctx", None) is None:
        raise TypeError(f"expected a TransformerLens model with cfg.d_vocab and cfg.n_ctx, got {type(model).__name__}; "
                        "load one with selfrepair.load_model(...).")
    return int(cfg.d_vocab), int(cfg.n_ctx)


@dataclass(frozen=True)
class ModelFacts:
    """The shapes and kind of a TransformerLens model."""

    n_layers: int
    n_heads: int
    n_kv_heads: int      # < n_heads under grouped-query attention
    d_head: int
    d_model: int
    d_vocab: int
    d_mlp: int
    gated: bool          # the config says the MLP is gated
    kind: str            # backend kind: "bridge-hf", "bridge-native", "tl3"
    architecture: str    # e.g. "GPT2LMHeadModel", "LlamaForCausalLM"
    z_hook: str
    n_ctx: int


def model_architecture(model) -> str:
    """The architecture name the config records (``cfg.architecture`` / ``cfg.original_architecture``),
    else the model's class name."""
    cfg = model.cfg
    arch = getattr(cfg, "architecture", None) or getattr(cfg, "original_architecture", None)
    return str(arch) if arch else type(model).__name__


def model_facts(model) -> ModelFacts:
    """The :class:`ModelFacts` of ``model``, read off its config (no forward pass)."""
    cfg = getattr(model, "cfg", None)
    if cfg is None or not hasattr(model, "hooks"):
        raise TypeError(f"measure_z_edits needs a TransformerLens model (TransformerBridge or HookedTransformer); "
                        f"got {type(model).__name__}.")
    if Z_HOOK.format(layer=0) not in model.hook_dict:
        raise ValueError(f"{type(model).__name__} has no hook {Z_HOOK.format(layer=0)!r}; the global-effects "
                         "engine edits head outputs there.")
    n_heads = int(cfg.n_heads)
    n_kv = getattr(cfg, "n_key_value_heads", None) or n_heads
    d_mlp = int(getattr(cfg, "d_mlp", None) or 4 * int(cfg.d_model))
    return ModelFacts(n_layers=int(cfg.n_layers), n_heads=n_heads, n_kv_heads=int(n_kv), d_head=int(cfg.d_head),
                      d_model=int(cfg.d_model), d_vocab=int(cfg.d_vocab), d_mlp=d_mlp,
                      gated=bool(getattr(cfg, "gated_mlp", False)), kind=model_kind(model),
                      architecture=model_architecture(model), z_hook=Z_HOOK, n_ctx=int(cfg.n_ctx))
