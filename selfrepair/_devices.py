"""Where a model lives and which dtypes the analysis uses (one rule for every module)."""

from __future__ import annotations

import torch

__all__ = ["model_device", "model_dtype", "analysis_dtype", "model_devices", "is_split"]


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


def model_devices(model) -> list:
    """Every device the model's parameters and buffers lie on, in order of first appearance; with an
    accelerate placement (``hf_device_map``) also the devices it names (an int is ``cuda:N``)."""
    out: list = []
    tensors = list(model.parameters()) + (list(model.buffers()) if hasattr(model, "buffers") else [])
    for t in tensors:
        if t.device not in out:
            out.append(t.device)
    hf = getattr(model, "__dict__", {}).get("original_model", model)
    for v in (getattr(hf, "hf_device_map", None) or {}).values():
        d = torch.device(f"cuda:{v}" if isinstance(v, int) else ("meta" if v == "disk" else str(v)))
        if d not in out:
            out.append(d)
    return out


def is_split(model) -> bool:
    """True when the model lies on more than one device (placed by ``device_map`` / ``n_devices``)."""
    return len(model_devices(model)) > 1
