"""Forward hooks that hold every LayerNorm / RMSNorm scale constant in the backward pass.

The probe measures which of the two methods keeps a backend's forward unchanged; GIM
(``analysis.gim.norm_freeze_hooks``) installs the hooks the probe chose.
"""

from __future__ import annotations

import torch

__all__ = ["all_layers", "straight_through_hooks", "freeze_hooks"]


def all_layers(templates, n_layers: int) -> list:
    out = []
    for tpl in templates:
        if "{layer}" in tpl:
            out.extend(tpl.format(layer=i) for i in range(n_layers))
        else:
            out.append(tpl)
    return out


def straight_through_hooks(base: str, kind: str) -> list:
    """Straight-through norm freeze for one norm ``base`` (e.g. "blocks.0.ln1").

    Records the input x at ``base.hook_in`` and the scale s at ``base.hook_scale`` (observe only), and
    returns at ``base.hook_normalized`` ``n.detach() + (x_c - x_c.detach()) / s.detach()``: the same value
    bit for bit (the added term is exactly 0), with the gradient of ``x_c / s`` for constant s.
    """
    box = {}

    def grab_x(x, hook):
        box["x"] = x

    def grab_s(s, hook):
        box["s"] = s

    def replace(n, hook):
        x, s = box.pop("x"), box.pop("s")
        x = x.to(n.dtype) if x.dtype != n.dtype and n.dtype in (torch.float32, torch.float64) else x
        xc = x - x.mean(-1, keepdim=True) if kind == "LN" else x
        live = (xc - xc.detach()) / s.detach().to(xc.dtype)
        return n.detach() + live.to(n.dtype)

    return [(base + ".hook_in", grab_x), (base + ".hook_scale", grab_s), (base + ".hook_normalized", replace)]


def freeze_hooks(scale_templates, n_layers: int, norm_type: str, method: str) -> list:
    """The norm-freeze hooks for ``method`` on every layer of the given ``hook_scale`` templates
    (the probe checks exactly these before choosing a method)."""
    if method == "straight_through":
        bases = [t[: -len(".hook_scale")] for t in scale_templates]
        return [h for base in all_layers(bases, n_layers) for h in straight_through_hooks(base, norm_type)]
    return [(n, lambda t, hook: t.detach()) for n in all_layers(scale_templates, n_layers)]
