"""Read llama2.c checkpoints (``.bin``) into a Hugging Face ``LlamaForCausalLM``.

llama2.c (Karpathy) stores a Llama in a flat float32 file. Two layouts exist:

* legacy (version 0, the TinyStories ``stories*.bin`` files): a header of seven
  int32 ``dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len``
  (``vocab_size < 0`` means the classifier is not shared with the embedding),
  then ``token_embedding, rms_att, wq, wk, wv, wo, rms_ffn, w1, w2, w3,
  rms_final, freq_cis_real, freq_cis_imag[, wcls]``;
* version 1 (``export.py --version 1``): a 256-byte header (magic ``ak42``,
  version, the seven ints, a shared-classifier byte), then all norms, the
  embedding, the per-layer matrices and the optional classifier; no freq_cis.

llama2.c applies rotary embeddings to interleaved pairs ``(x[2i], x[2i+1])``;
HF Llama rotates halves ``(x[i], x[i + d_head/2])``. The two are the same
linear map after reordering the rows of ``wq`` and ``wk`` within each head to
``[0, 2, 4, ..., 1, 3, 5, ...]`` (what HF's ``convert_llama_weights_to_hf``
``permute`` does to Meta checkpoints). Scores ``q . k`` are unchanged because
q and k are permuted alike.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import numpy as np
import torch

__all__ = ["Llama2cHeader", "read_llama2c", "llama2c_to_hf", "interleaved_to_half_rows"]

_MAGIC_V1 = 0x616B3432  # "ak42" read as little-endian uint32


@dataclass(frozen=True)
class Llama2cHeader:
    dim: int
    hidden_dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    vocab_size: int
    seq_len: int
    shared_classifier: bool
    version: int  # 0 = legacy, 1 = fp32 "ak42" format

    @property
    def head_size(self) -> int:
        return self.dim // self.n_heads

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_size


def _bad(path, why: str) -> ValueError:
    return ValueError(
        f"{path} is not a readable llama2.c checkpoint: {why}. Expected a llama2.c "
        "'.bin' (legacy or version-1 fp32 export); for a Hugging Face checkpoint pass its directory."
    )


def _parse_header(raw: bytes, path) -> tuple[Llama2cHeader, int]:
    if len(raw) < 28:
        raise _bad(path, f"file has {len(raw)} bytes, fewer than the 28-byte header")
    (magic,) = struct.unpack("<I", raw[:4])
    if magic == _MAGIC_V1:
        if len(raw) < 256:
            raise _bad(path, "truncated version-1 header")
        (version,) = struct.unpack("<i", raw[4:8])
        if version != 1:
            raise _bad(
                path,
                f"llama2.c export version {version} is not supported (only the fp32 "
                "formats: legacy and version 1; version 2 is int8-quantised)",
            )
        ints = struct.unpack("<7i", raw[8:36])
        shared = bool(raw[36])
        dim, hidden, n_layers, n_heads, n_kv, vocab, seq_len = ints
        offset = 256
    else:
        ints = struct.unpack("<7i", raw[:28])
        dim, hidden, n_layers, n_heads, n_kv, vocab, seq_len = ints
        shared = vocab > 0
        vocab = abs(vocab)
        version, offset = 0, 28
    for name, v in zip(("dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "seq_len"),
                       (dim, hidden, n_layers, n_heads, n_kv, vocab, seq_len)):
        if v <= 0:
            raise _bad(path, f"header field {name} = {v} is not positive")
    if dim % n_heads or n_heads % n_kv or (dim // n_heads) % 2:
        raise _bad(
            path,
            f"inconsistent header (dim={dim}, n_heads={n_heads}, n_kv_heads={n_kv}): "
            "dim must divide into heads of even size and n_heads must be a multiple of n_kv_heads",
        )
    hdr = Llama2cHeader(dim, hidden, n_layers, n_heads, n_kv, vocab, seq_len, shared, version)
    return hdr, offset


def _layout(h: Llama2cHeader) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every float32 array in file order."""
    L, d, hd, kv, V = h.n_layers, h.dim, h.hidden_dim, h.kv_dim, h.vocab_size
    mats = [
        ("wq", (L, d, d)), ("wk", (L, kv, d)), ("wv", (L, kv, d)), ("wo", (L, d, d)),
    ]
    if h.version == 0:
        out = [("token_embedding", (V, d)), ("rms_att", (L, d))] + mats + [
            ("rms_ffn", (L, d)), ("w1", (L, hd, d)), ("w2", (L, d, hd)), ("w3", (L, hd, d)),
            ("rms_final", (d,)),
            ("freq_cis_real", (h.seq_len, h.head_size // 2)),
            ("freq_cis_imag", (h.seq_len, h.head_size // 2)),
        ]
    else:
        out = [("rms_att", (L, d)), ("rms_ffn", (L, d)), ("rms_final", (d,)),
               ("token_embedding", (V, d))] + mats + [
            ("w1", (L, hd, d)), ("w2", (L, d, hd)), ("w3", (L, hd, d)),
        ]
    if not h.shared_classifier:
        out.append(("wcls", (V, d)))
    return out


def read_llama2c(path: Union[str, os.PathLike]) -> tuple[Llama2cHeader, dict[str, np.ndarray]]:
    """Parse a llama2.c checkpoint into its header and raw float32 arrays (llama2.c row order)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"llama2.c checkpoint {path} does not exist")
    raw = path.read_bytes()
    hdr, offset = _parse_header(raw, path)
    layout = _layout(hdr)
    n_floats = sum(int(np.prod(s)) for _, s in layout)
    expected = offset + 4 * n_floats
    if len(raw) != expected:
        raise _bad(
            path,
            f"size {len(raw)} bytes does not match the header {hdr} "
            f"(expects {expected} bytes)",
        )
    flat = np.frombuffer(raw, dtype="<f4", count=n_floats, offset=offset)
    arrays, pos = {}, 0
    for name, shape in layout:
        n = int(np.prod(shape))
        arrays[name] = flat[pos : pos + n].reshape(shape)
        pos += n
    return hdr, arrays


def interleaved_to_half_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder q/k projection rows from interleaved-pair rotary to rotate-half.

    ``w``: ``[n_heads * d_head, d_in]``. Within each head, new row order is
    ``[0, 2, 4, ..., 1, 3, 5, ...]`` of the old rows.
    """
    out_dim, d_in = w.shape
    d_head = out_dim // n_heads
    return (
        w.reshape(n_heads, d_head // 2, 2, d_in).transpose(1, 2).reshape(out_dim, d_in)
    )


def llama2c_to_hf(path: Union[str, os.PathLike], *, dtype: torch.dtype = torch.float32):
    """Convert a llama2.c checkpoint in memory to an HF ``LlamaForCausalLM`` (eval mode, eager attention)."""
    from transformers import LlamaConfig, LlamaForCausalLM  # heavy: only where a Hugging Face model is built

    hdr, a = read_llama2c(path)
    config = LlamaConfig(
        vocab_size=hdr.vocab_size,
        hidden_size=hdr.dim,
        intermediate_size=hdr.hidden_dim,
        num_hidden_layers=hdr.n_layers,
        num_attention_heads=hdr.n_heads,
        num_key_value_heads=hdr.n_kv_heads,
        head_dim=hdr.head_size,
        max_position_embeddings=hdr.seq_len,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        hidden_act="silu",
        attention_bias=False,
        mlp_bias=False,
        tie_word_embeddings=hdr.shared_classifier,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=None,
        architectures=["LlamaForCausalLM"],
    )
    # rope_theta location moved between transformers versions; make sure it is 10000.
    rp = getattr(config, "rope_parameters", None)
    if isinstance(rp, dict):
        rp["rope_theta"] = 10000.0
    config._attn_implementation = "eager"
    model = LlamaForCausalLM(config)  # random init is overwritten below (all parameters)

    def t(x: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.array(x, dtype=np.float32))

    sd = {"model.embed_tokens.weight": t(a["token_embedding"]), "model.norm.weight": t(a["rms_final"])}
    for l in range(hdr.n_layers):
        p = f"model.layers.{l}."
        sd[p + "input_layernorm.weight"] = t(a["rms_att"][l])
        sd[p + "post_attention_layernorm.weight"] = t(a["rms_ffn"][l])
        sd[p + "self_attn.q_proj.weight"] = interleaved_to_half_rows(t(a["wq"][l]), hdr.n_heads)
        sd[p + "self_attn.k_proj.weight"] = interleaved_to_half_rows(t(a["wk"][l]), hdr.n_kv_heads)
        sd[p + "self_attn.v_proj.weight"] = t(a["wv"][l])
        sd[p + "self_attn.o_proj.weight"] = t(a["wo"][l])
        sd[p + "mlp.gate_proj.weight"] = t(a["w1"][l])
        sd[p + "mlp.down_proj.weight"] = t(a["w2"][l])
        sd[p + "mlp.up_proj.weight"] = t(a["w3"][l])
    if not hdr.shared_classifier:              # the file has wcls exactly then (_layout)
        sd["lm_head.weight"] = t(a["wcls"])
    result = model.load_state_dict(sd, strict=False)
    unexpected = list(result.unexpected_keys)
    missing = [k for k in result.missing_keys if not (hdr.shared_classifier and k == "lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(f"llama2.c conversion mismatch: missing {missing}, unexpected {unexpected}")
    if hdr.shared_classifier:
        model.tie_weights()
        if model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr():
            model.lm_head.weight = model.model.embed_tokens.weight
    model = model.to(dtype).eval()
    model.config.llama2c_header = {k: getattr(hdr, k) for k in hdr.__dataclass_fields__}
    return model
