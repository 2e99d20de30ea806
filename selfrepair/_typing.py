"""Shared jaxtyping aliases (shapes spelled once, used everywhere)."""

from jaxtyping import Bool, Float, Int
from torch import Tensor

Tokens = Int[Tensor, "batch pos"]
PerPrompt = Float[Tensor, "batch"]
Logits = Float[Tensor, "batch vocab"]
Pattern = Float[Tensor, "batch head qpos kpos"]
KeyMask = Bool[Tensor, "batch qpos kpos"]
HeadVectors = Float[Tensor, "batch pos head d_head"]

__all__ = ["Tokens", "PerPrompt", "Logits", "Pattern", "KeyMask", "HeadVectors", "Bool", "Float", "Int", "Tensor"]
