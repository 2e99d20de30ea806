"""Where a model lives and which dtypes the analysis uses (one rule for every module)."""

from __future__ import annotations

import torch

__all__ = ["model_device", "model_dtype", "analysis_dtype"]


def model_device(model) -> torch.device:
    """The device of the model's first parameter (CPU for a model without parameters)."""
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def model_dtype(model) -> torch.dtype:
    """The dtype of the model's first floating-point parameter (float32 if it has none)."""
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def analysis_dtype(dtype: torch.dtype) -> torch.dtype:
    """Analysis arithmetic: float64 for float64, float32 for everything else (float32 or better)."""
    return torch.float64 if dtype == torch.float64 else torch.float32
