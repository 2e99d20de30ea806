"""Our own forward pass for HF-wrapped GPT-2 and Llama bridges, on the wrapped modules' weights.

The fast path of ``engine.edits`` recomputes only what an edit of one head's ``z`` changes; this
module holds the forward it runs (norms, q/k/v, attention, MLP, unembedding) and
``fast_support``, which says whether a model can use it. See ``engine/edits.py`` for the paths.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Sequence

import torch
import torch.nn.functional as F

from .._devices import is_split, model_devices
from .._typing import Int, Tensor
from ..models.facts import ModelFacts

__all__ = ["FastModel", "FastMismatch", "fast_support", "has_user_forward_hooks", "weights_key"]


def _orig(component):
    """The wrapped HF module of a bridge component (the leaf that holds the weights)."""
    oc = getattr(component, "original_component", None)
    return oc if oc is not None else component


class _Norm:
    """Mirror of a bridge NormalizationBridge forward (hooks bypassed)."""

    def __init__(self, bridge_norm, model_cfg):
        self.mod = _orig(bridge_norm)
        self.native = bool(getattr(bridge_norm, "use_native_layernorm_autograd", False)) or bool(
            getattr(getattr(bridge_norm, "config", None), "layer_norm_folding", False))
        self.rms = bool(bridge_norm.uses_rms_norm)
        self.offset = bool(bridge_norm.uses_weight_offset)
        self.eps = float(getattr(getattr(bridge_norm, "config", None) or model_cfg, "eps", 1e-5))
        self.weight = getattr(self.mod, "weight", None)
        self.bias = getattr(self.mod, "bias", None) if not self.rms else None

    def __call__(self, x: Tensor) -> Tensor:
        if self.native:
            y = self.mod(x)
            return y if y.dtype == x.dtype else y.to(x.dtype)
        dt = x.dtype
        if not self.rms and not self.offset and dt in (torch.float32, torch.float64):
            # the bridge's from-scratch LayerNorm, fused (same formula, rounding-level differences)
            return F.layer_norm(x, x.shape[-1:], self.weight, self.bias, self.eps)
        h = x if dt in (torch.float32, torch.float64) else x.float()
        if not self.rms:
            h = h - h.mean(-1, keepdim=True)
        scale = (h.pow(2).mean(-1, keepdim=True) + self.eps).sqrt()
        h = h / scale
        w = (1.0 + self.weight) if self.offset else self.weight
        h = h * w
        if self.bias is not None:
            h = h + self.bias
        return h.to(dt)


class FastModel:
    """Our own forward for HF GPT-2 / Llama bridges, on the wrapped modules' weights."""

    def __init__(self, model, kind: str, dims: ModelFacts):
        self.kind, self.dims = kind, dims
        cfg = model.cfg
        self.blocks = []
        for l, blk in enumerate(model.blocks):
            attn = blk.attn
            hf_attn = _orig(attn)
            b = dict(ln1=_Norm(blk.ln1, cfg), ln2=_Norm(blk.ln2, cfg),
                     q=_orig(attn.q), k=_orig(attn.k), v=_orig(attn.v), o=_orig(attn.o))
            if kind == "gpt2":
                mlp = _orig(blk.mlp)
                b.update(fc=_orig(mlp.c_fc), proj=_orig(mlp.c_proj), act=_fast_act(mlp.act))
                scale = dims.d_head ** (-0.5)
                if getattr(hf_attn.config if hasattr(hf_attn, "config") else cfg, "scale_attn_by_inverse_layer_idx", False):
                    scale /= float(l + 1)
                b["scale"] = scale
                b["upcast"] = bool(getattr(hf_attn, "reorder_and_upcast_attn", False))
            else:
                mlp = _orig(blk.mlp)
                b.update(gate=_orig(mlp.gate_proj), up=_orig(mlp.up_proj), down=_orig(mlp.down_proj), act=mlp.act_fn)
                b["scale"] = float(getattr(hf_attn, "scaling", dims.d_head ** (-0.5)))
                b["upcast"] = True
            self.blocks.append(b)
        self.ln_f = _Norm(model.ln_final, cfg)
        self.unembed = _orig(model.unembed)
        hf = model.original_model
        if kind == "gpt2":
            self.wte, self.wpe = _orig(hf.transformer.wte), _orig(hf.transformer.wpe)
            self.rotary = None
        else:
            self.wte, self.wpe = _orig(hf.model.embed_tokens), None
            self.rotary = _orig(hf.model.rotary_emb)
        self._cos_sin: Dict[Any, Any] = {}
        dt = self.blocks[0]["q"].weight.dtype
        softmax_in_model_dtype = (kind == "gpt2" and not any(b["upcast"] for b in self.blocks)) or (
            kind == "llama" and dt == torch.float32)
        self.use_sdpa = softmax_in_model_dtype and dt in (torch.float32, torch.float64)
        # q, k, v as one matmul (a snapshot of the weights: CleanRun is a snapshot of the model)
        for b in self.blocks:
            ws = [b[nm].weight for nm in ("q", "k", "v")]
            bs = [b[nm].bias for nm in ("q", "k", "v")]
            b["w_qkv"] = torch.cat(ws, 0).detach()
            b["b_qkv"] = torch.cat(bs, 0).detach() if all(x is not None for x in bs) else None
            b["w_kv"], b["b_kv"] = b["w_qkv"][dims.n_heads * dims.d_head:], (
                b["b_qkv"][dims.n_heads * dims.d_head:] if b["b_qkv"] is not None else None)

    # --- pieces
    def embed(self, tokens: Tensor) -> Tensor:
        x = self.wte(tokens)
        if self.wpe is not None:
            pos = torch.arange(tokens.shape[1], device=tokens.device)[None]
            x = x + self.wpe(pos)
        return x

    def cos_sin(self, n_pos: int, like: Tensor):
        key = (like.dtype, like.device)
        cs = self._cos_sin.get(key)
        if cs is None or cs[0].shape[1] < n_pos:
            pos = torch.arange(max(n_pos, 1), device=like.device)[None]
            cos, sin = self.rotary(like, pos)
            cs = (cos.to(like.dtype), sin.to(like.dtype))
            self._cos_sin[key] = cs
        return cs

    def qkv(self, l: int, x: Tensor, pos0: int, q_rows: Optional[slice] = None):
        """q [.., Wq, H, dh], k, v [.., W, kvh, dh] (rotated) from normalised x [.., W, d]."""
        b, D = self.blocks[l], self.dims
        nq, nkv = D.n_heads * D.d_head, D.n_kv_heads * D.d_head
        if q_rows is None:
            qkv = F.linear(x, b["w_qkv"], b["b_qkv"])
            q, k, v = qkv.split([nq, nkv, nkv], dim=-1)
        else:
            q = b["q"](x[..., q_rows, :])
            k, v = F.linear(x, b["w_kv"], b["b_kv"]).split([nkv, nkv], dim=-1)
        q = q.unflatten(-1, (D.n_heads, D.d_head))
        k = k.unflatten(-1, (D.n_kv_heads, D.d_head))
        v = v.unflatten(-1, (D.n_kv_heads, D.d_head))
        if self.rotary is not None:
            W = x.shape[-2]
            cos, sin = self.cos_sin(pos0 + W, x)
            cos_k, sin_k = cos[0, pos0:pos0 + W, None, :], sin[0, pos0:pos0 + W, None, :]
            k = k * cos_k + _rotate_half(k) * sin_k
            if q_rows is None:
                cq, sq = cos_k, sin_k
            else:
                cq, sq = cos_k[q_rows], sin_k[q_rows]
            q = q * cq + _rotate_half(q) * sq
        return q, k, v

    def mlp(self, l: int, x: Tensor) -> Tensor:
        b = self.blocks[l]
        if self.kind == "gpt2":
            return b["proj"](b["act"](b["fc"](x)))
        return b["down"](b["act"](b["gate"](x)) * b["up"](x))

    def softmax(self, l: int, scores: Tensor, v_dtype: torch.dtype) -> Tensor:
        if self.blocks[l]["upcast"]:
            return torch.softmax(scores, dim=-1, dtype=torch.float32).to(v_dtype)
        return torch.softmax(scores, dim=-1)

    def attend(self, l: int, q: Tensor, k: Tensor, v: Tensor, Kp: Tensor, Vp: Tensor, win_mask: Tensor) -> Tensor:
        """Attention of window queries over [clean prefix keys Kp, window keys k].

        q [n, Wq, H, dh]; k, v [n, W, kvh, dh]; Kp, Vp [s0, kvh, dh] (one prompt's clean cache,
        shared by the n edits); win_mask [Wq, W] (True = visible). Returns z [n, H, Wq, dh].
        Where the bridge's softmax runs in the model dtype (GPT-2; Llama in float32), one fused
        ``scaled_dot_product_attention``; otherwise scores are materialised and the softmax runs
        in float32 exactly as the bridge does.
        """
        blk, D = self.blocks[l], self.dims
        n, Wq, W, s0 = q.shape[0], q.shape[1], k.shape[1], Kp.shape[0]
        rep = D.n_heads // D.n_kv_heads
        qh, kh, vh = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)   # [n, heads, pos, dh]
        if self.use_sdpa:
            if s0 > 0:
                kh = torch.cat([Kp.transpose(0, 1).expand(n, -1, -1, -1), kh], dim=2)
                vh = torch.cat([Vp.transpose(0, 1).expand(n, -1, -1, -1), vh], dim=2)
            mask = None
            if Wq > 1:                                                          # one query (the last row): all visible
                mask = torch.cat([win_mask.new_ones(Wq, s0), win_mask], dim=1) if s0 > 0 else win_mask
            if rep > 1:
                kh, vh = kh.repeat_interleave(rep, dim=1), vh.repeat_interleave(rep, dim=1)
            return F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=blk["scale"])
        if rep > 1:
            kh, vh = kh.repeat_interleave(rep, dim=1), vh.repeat_interleave(rep, dim=1)
        upc = blk["upcast"] and self.kind == "gpt2"
        if upc:
            qh, kh = qh.float(), kh.float()
        s_win = torch.matmul(qh, kh.transpose(-2, -1)) * blk["scale"]          # [n, H, Wq, W]
        s_win = s_win.masked_fill(~win_mask, torch.finfo(s_win.dtype).min)
        if s0 == 0:
            return torch.matmul(self.softmax(l, s_win, vh.dtype), vh)
        H, dh = D.n_heads, D.d_head
        if rep > 1:
            Kp, Vp = Kp.repeat_interleave(rep, dim=1), Vp.repeat_interleave(rep, dim=1)
        Kp, Vp = Kp.permute(1, 2, 0), Vp.permute(1, 0, 2)                      # [H, dh, s0], [H, s0, dh]
        if upc:
            Kp = Kp.float()
        qf = qh.permute(1, 0, 2, 3).reshape(H, n * Wq, dh)                     # [H, n*Wq, dh]
        s_pre = torch.matmul(qf, Kp).reshape(H, n, Wq, s0).permute(1, 0, 2, 3) * blk["scale"]
        pat = self.softmax(l, torch.cat([s_pre, s_win], dim=-1), vh.dtype)
        z = torch.matmul(pat[..., s0:], vh)
        return z + torch.matmul(pat[..., :s0].permute(1, 0, 2, 3).reshape(H, n * Wq, s0), Vp).reshape(
            H, n, Wq, dh).permute(1, 0, 2, 3)

    def final_logits(self, h: Tensor) -> Tensor:
        return self.unembed(self.ln_f(h))

    # --- forward + backward of the metric with a fused attention kernel (the streaming analysis)
    def grad_run(self, tokens: Int[Tensor, "batch pos"], positions: Int[Tensor, "batch"],
                 metric: Callable[[Tensor], Tensor], layers: Sequence[int], backward: bool = True) -> dict:
        """One forward and one backward of ``sum over prompts of metric(logits at positions)`` that never
        materialises an attention pattern: causal ``scaled_dot_product_attention`` (flash attention on CPU
        and CUDA), logits only at the metric positions. Returns, for ``layers``, the (rotated) queries
        ``q [batch, pos, head, d_head]``, keys and values ``[batch, pos, kv_head, d_head]``, ``grad_z`` =
        ``dm/dz [batch, pos, head, d_head]`` and the ``metric [batch]``, all detached. Requires
        ``use_sdpa`` (the bridge's softmax runs in the model dtype); causal masking only, as the bridge is
        called with the tokens alone (padding sits after each prompt's real tokens). ``backward=False``: the
        forward only (no ``grad_z``)."""
        if not self.use_sdpa:
            raise ValueError("grad_run needs the softmax in the model dtype (use_sdpa); this model upcasts it.")
        D = self.dims
        want = set(int(l) for l in layers)
        rep = D.n_heads // D.n_kv_heads
        out: Dict[str, Dict[int, Tensor]] = {"q": {}, "k": {}, "v": {}}
        zs: Dict[int, Tensor] = {}
        with torch.enable_grad() if backward else torch.no_grad():
            h = self.embed(tokens)
            if backward and not h.requires_grad:                 # frozen weights: dm/dz must still be defined
                h = h.detach().requires_grad_(True)
            for l in range(D.n_layers):
                blk = self.blocks[l]
                q, k, v = self.qkv(l, blk["ln1"](h), 0)
                if l in want:
                    out["q"][l], out["k"][l], out["v"][l] = q.detach(), k.detach(), v.detach()
                kk, vv = (k.repeat_interleave(rep, dim=2), v.repeat_interleave(rep, dim=2)) if rep > 1 else (k, v)
                z = F.scaled_dot_product_attention(q.transpose(1, 2), kk.transpose(1, 2), vv.transpose(1, 2),
                                                   is_causal=True, scale=blk["scale"]).transpose(1, 2)
                zs[l] = z
                h = h + blk["o"](z.flatten(-2))
                h = h + self.mlp(l, blk["ln2"](h))
            rows = torch.arange(tokens.shape[0], device=h.device)
            logits = self.final_logits(h[rows, positions.to(h.device)])
            if logits.dtype not in (torch.float32, torch.float64):
                logits = logits.float()
            m = metric(logits)
            if not backward:
                out["metric"] = m.detach()
                return out
            order = sorted(want)
            grads = torch.autograd.grad(m.sum(), [zs[l] for l in order], allow_unused=True)
        out["grad_z"] = {l: (torch.zeros_like(zs[l]) if g is None else g).detach() for l, g in zip(order, grads)}
        out["metric"] = m.detach()
        return out

    # --- clean forward over whole prompts (caches everything the partial forwards need)
    def clean_forward(self, tokens: Tensor):
        D = self.dims
        h = self.embed(tokens)
        B, T, _ = h.shape
        resid, zs, ks, vs = [h], [], [], []
        causal = torch.ones(T, T, dtype=torch.bool, device=h.device).tril()
        rep = D.n_heads // D.n_kv_heads
        for l in range(D.n_layers):
            blk = self.blocks[l]
            x = blk["ln1"](h)
            q, k, v = self.qkv(l, x, 0)
            ks.append(k)
            vs.append(v)
            kk = k.repeat_interleave(rep, dim=2) if rep > 1 else k
            vv = v.repeat_interleave(rep, dim=2) if rep > 1 else v
            qh, kh, vh = q.transpose(1, 2), kk.transpose(1, 2), vv.transpose(1, 2)   # [B, H, T, dh]
            if blk["upcast"] and self.kind == "gpt2":
                scores = torch.matmul(qh.float(), kh.float().transpose(-2, -1)) * blk["scale"]
            else:
                scores = torch.matmul(qh, kh.transpose(-2, -1)) * blk["scale"]
            scores = scores.masked_fill(~causal, torch.finfo(scores.dtype).min)
            p = self.softmax(l, scores, vh.dtype)
            z = torch.matmul(p, vh).transpose(1, 2)                                   # [B, T, H, dh]
            zs.append(z)
            h = h + blk["o"](z.flatten(-2))
            h = h + self.mlp(l, blk["ln2"](h))
            resid.append(h)
        return resid, zs, ks, vs


def _fast_act(act):
    """HF's tanh-GELU module as one fused op (same formula; rounding-level differences only)."""
    if type(act).__name__ in ("NewGELUActivation", "GELUTanh", "PytorchGELUTanh", "GELUPytorchTanh"):
        return lambda x: F.gelu(x, approximate="tanh")
    return act


def _rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def weights_key(model, kind: str, dtype: torch.dtype, device) -> tuple:
    """What a full check of our own forward vouches for: the kind, dtype, device, eval mode and the weights
    (each parameter's storage and version counter, which every in-place write bumps)."""
    return (kind, str(dtype), str(device), bool(model.training),
            tuple((n, p.data_ptr(), p._version, tuple(p.shape)) for n, p in model.named_parameters()))


def has_user_forward_hooks(model) -> bool:
    """Whether any hook point of the model carries a forward hook (our own forward would bypass it)."""
    try:
        hd = model.hook_dict
    except Exception:
        return False
    return any(len(getattr(hp, "fwd_hooks", []) or []) > 0 for hp in hd.values())


def fast_support(model, dims: ModelFacts):
    """(kind, None) when our own forward can stand in for this model, else (None, reason)."""
    if is_split(model):
        return None, (f"the model is split over devices {[str(d) for d in model_devices(model)]} (the fast path "
                      "runs on one device)")
    if dims.kind != "bridge-hf":
        return None, f"backend {dims.kind!r} (the fast path covers HF-wrapped GPT-2 and Llama bridges)"
    hf = model.__dict__.get("original_model")
    name = type(hf).__name__
    if name not in ("GPT2LMHeadModel", "LlamaForCausalLM"):
        return None, f"architecture {name} (the fast path covers GPT2LMHeadModel and LlamaForCausalLM)"
    if model.training:
        return None, "model is in training mode (dropout); call model.eval()"
    cfg = model.cfg
    if getattr(cfg, "layer_norm_folding", False) or getattr(model, "_weights_processed", False):
        return None, "processed (folded) weights"
    for blk in model.blocks:
        if getattr(blk.mlp, "_use_processed_weights", False):
            return None, "processed weights in the MLP"
    if name == "LlamaForCausalLM":
        hc = hf.config
        if getattr(hc, "pretraining_tp", 1) not in (None, 1):
            return None, "Llama pretraining_tp > 1"
        if dims.gated is False and not hasattr(_orig(model.blocks[0].mlp), "gate_proj"):
            return None, "Llama MLP without gate_proj"
        return "llama", None
    hc = hf.config
    if getattr(hc, "add_cross_attention", False):
        return None, "GPT-2 with cross attention"
    return "gpt2", None


class FastMismatch(RuntimeError):
    pass
