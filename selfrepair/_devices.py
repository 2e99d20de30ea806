"""Where a model lives and which dtypes the analysis uses (one rule for every module)."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch

__all__ = ["model_device", "model_dtype", "analysis_dtype", "is_reduced", "computing_in_float32",
           "model_devices", "is_split"]


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


def is_reduced(dtype: torch.dtype) -> bool:
    """bfloat16 / float16 (any float narrower than float32)."""
    return dtype.is_floating_point and torch.finfo(dtype).bits < 32


@contextmanager
def computing_in_float32(model) -> Iterator[torch.dtype]:
    """Inside the block a bfloat16 / float16 model holds its weights in float32, so its forward and backward
    run in float32 arithmetic on exactly the model's own (reduced-precision) weight values; on exit, also on
    an error, it is cast back, which restores every weight bit for bit (a bf16 / fp16 value is exact in
    float32). Other models are left as they are. Yields the dtype the model computes in inside the block.

    Cost: the weights take twice the memory of bf16 while the block runs (the activations of the cached
    run, not the weights, dominate at long contexts)."""
    old = model_dtype(model)
    if not is_reduced(old):
        yield old
        return

    def cast(dtype):
        try:
            model.to(dtype, print_details=False)       # TransformerLens' .to prints by default
        except TypeError:                              # a model whose .to has no print_details
            model.to(dtype)

    cast(torch.float32)
    try:
        yield torch.float32
    finally:
        cast(old)


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
