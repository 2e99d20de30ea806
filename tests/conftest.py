"""Shared pytest fixtures: small seeded models on every backend the toolkit supports.

All fixtures are session-scoped and cheap (a few layers, d_model 64). Tests must
not mutate them (no weight edits, no lasting hooks, no dtype changes): build your
own model with the ``make_*`` helpers when you need to.

Fixtures
--------
gpt2_bridge / gpt2_bridge64    HF-wrapped GPT-2 (3 layers, 4 heads, d_model 64, vocab 200, ctx 64)
llama_bridge / llama_bridge64  HF-wrapped Llama, GQA (4 heads, 2 kv heads), RMSNorm, SwiGLU, rotary
native_bridge                  ``TransformerBridge.boot_native`` (2 layers, 4 heads, d_model 64)
default_model                  the shipped default model (skipped until it exists)
stories_model                  llama2.c stories260K from ../shared/models (skipped if absent)
sr_tokenizer                   the default model's tokenizer, if found (skipped otherwise)
"""

from __future__ import annotations

import warnings
from pathlib import Path

import jaxtyping
import pytest
import torch

# Shapes in annotations are checked at run time in the whole suite: every function and dataclass of the
# package is wrapped by jaxtyping + beartype (tests/shape_check.py: the array annotations) as it is imported,
# so this must run before selfrepair is imported.
_JAXTYPING_HOOK = jaxtyping.install_import_hook("selfrepair", "shape_check.shapes_only")

# Small models: one thread is fastest and avoids oversubscription when other jobs share the cores.
torch.set_num_threads(1)

REPO_ROOT = Path(__file__).resolve().parent.parent
#: the shared data folder beside the repository (``../shared``); may be absent
SHARED = REPO_ROOT.parent / "shared"
STORIES_260K = SHARED / "models" / "stories260K.bin"

VOCAB = 200
N_CTX = 64


# ----------------------------------------------------------------------------- tolerances
# Floating point differs between CPUs (BLAS kernels, summation order, vector width): the same
# float64 code gave 5.6e-9 relative on an AMD EPYC where 1e-9 had been demanded on an Intel Xeon.
# Tolerances are therefore derived from the quantities compared:
# - an element computed from terms of magnitude S carries an absolute rounding error ~ eps * S,
#   whatever its own size: ``scaled_atol`` scales the absolute tolerance by the largest magnitude;
# - a ratio x / y inherits err(x) / |y| + |x / y| * err(y) / |y|: ``ratio_tol`` propagates it.

EPS64 = float(torch.finfo(torch.float64).eps)   # 2.2e-16
EPS32 = float(torch.finfo(torch.float32).eps)   # 1.2e-7


def scaled_atol(x, rel: float) -> float:
    """``rel`` times the largest finite magnitude in ``x`` (0 for an empty or all-NaN input)."""
    import numpy as np
    a = np.abs(np.asarray(x.detach().cpu() if isinstance(x, torch.Tensor) else x, dtype=float))
    a = a[np.isfinite(a)]
    return float(rel * a.max()) if a.size else 0.0


def ratio_tol(num_err, ratio, den):
    """Propagated absolute error of ``ratio = num / den`` when num and den each carry an absolute error
    ``num_err`` (elementwise): ``num_err * (1 + |ratio|) / |den|``."""
    import numpy as np
    return np.asarray(num_err, float) * (1.0 + np.abs(np.asarray(ratio, float))) / np.abs(np.asarray(den, float))


def _has_bridge() -> bool:
    try:
        import transformer_lens.model_bridge  # noqa: F401
    except Exception:
        return False
    return True


def gpt2_config(n_layers: int = 3, n_heads: int = 4, d_model: int = 64, vocab: int = VOCAB, n_ctx: int = N_CTX):
    import transformers

    return transformers.GPT2Config(
        n_layer=n_layers, n_head=n_heads, n_embd=d_model, vocab_size=vocab, n_positions=n_ctx,
        bos_token_id=0, eos_token_id=0,
    )


def llama_config(
    n_layers: int = 2, n_heads: int = 4, n_kv_heads: int = 2, d_model: int = 64,
    d_mlp: int = 128, vocab: int = VOCAB, n_ctx: int = N_CTX,
):
    import transformers

    return transformers.LlamaConfig(
        num_hidden_layers=n_layers, num_attention_heads=n_heads, num_key_value_heads=n_kv_heads,
        hidden_size=d_model, intermediate_size=d_mlp, vocab_size=vocab, max_position_embeddings=n_ctx,
        bos_token_id=1, eos_token_id=2, pad_token_id=None, rms_norm_eps=1e-5,
    )


def native_config(n_layers: int = 2, n_heads: int = 4, d_model: int = 64, vocab: int = VOCAB, n_ctx: int = N_CTX, seed: int = 0):
    from transformer_lens.config import TransformerBridgeConfig

    return TransformerBridgeConfig(
        d_model=d_model, n_layers=n_layers, n_heads=n_heads, d_head=d_model // n_heads,
        d_mlp=4 * d_model, d_vocab=vocab, n_ctx=n_ctx, act_fn="gelu", normalization_type="LN",
        seed=seed,
    )


def make_gpt2_bridge(seed: int = 0, dtype=torch.float32, **kw):
    """A fresh random HF GPT-2 bridge (seeded)."""
    import selfrepair

    torch.manual_seed(seed)
    return selfrepair.load_model(gpt2_config(**kw), dtype=dtype, device="cpu")


def make_llama_bridge(seed: int = 0, dtype=torch.float32, **kw):
    """A fresh random HF Llama (GQA) bridge (seeded)."""
    import selfrepair

    torch.manual_seed(seed)
    return selfrepair.load_model(llama_config(**kw), dtype=dtype, device="cpu")


def make_native_bridge(seed: int = 0, dtype=None, **kw):
    """A fresh TL-native bridge (seeded through its config)."""
    import transformer_lens.model_bridge.sources.native  # noqa: F401  (attaches boot_native)
    from transformer_lens.model_bridge import TransformerBridge

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = TransformerBridge.boot_native(native_config(seed=seed, **kw), dtype=dtype, device="cpu")
    return model.eval()


needs_bridge = pytest.mark.skipif(not _has_bridge(), reason="needs TransformerLens 4.x (TransformerBridge)")


@pytest.fixture(scope="session")
def gpt2_bridge():
    if not _has_bridge():
        pytest.skip("needs TransformerLens 4.x")
    return make_gpt2_bridge()


@pytest.fixture(scope="session")
def gpt2_bridge64():
    if not _has_bridge():
        pytest.skip("needs TransformerLens 4.x")
    return make_gpt2_bridge(dtype=torch.float64)


@pytest.fixture(scope="session")
def llama_bridge():
    if not _has_bridge():
        pytest.skip("needs TransformerLens 4.x")
    return make_llama_bridge()


@pytest.fixture(scope="session")
def llama_bridge64():
    if not _has_bridge():
        pytest.skip("needs TransformerLens 4.x")
    return make_llama_bridge(dtype=torch.float64)


@pytest.fixture(scope="session")
def native_bridge():
    if not _has_bridge():
        pytest.skip("needs TransformerLens 4.x")
    return make_native_bridge()


@pytest.fixture(scope="session")
def default_model():
    from selfrepair.models.loading import DEFAULT_MODEL_DIR

    if not (DEFAULT_MODEL_DIR / "config.json").is_file():
        pytest.skip(f"shipped default model not present at {DEFAULT_MODEL_DIR}")
    import selfrepair

    return selfrepair.load_model(device="cpu")


@pytest.fixture(scope="session")
def stories_model():
    if not STORIES_260K.is_file():
        pytest.skip(f"{STORIES_260K} absent (needs ../shared beside the repository)")
    import selfrepair

    return selfrepair.load_model(STORIES_260K, device="cpu")


@pytest.fixture(scope="session")
def sr_tokenizer():
    from selfrepair.models.loading import DEFAULT_MODEL_DIR

    for d in (DEFAULT_MODEL_DIR, Path("/tmp/sr_tokenizer")):
        if (d / "tokenizer.json").is_file():
            from transformers import PreTrainedTokenizerFast

            return PreTrainedTokenizerFast.from_pretrained(str(d))
    pytest.skip("default-model tokenizer not found")


def assert_frames_identical(a, b, obj: str = "frame") -> None:
    """Two DataFrames exactly equal, NaN matching NaN also inside tuple columns (pandas' exact comparison
    compares tuples with ==, for which NaN differs from itself)."""
    import numpy as np
    assert list(a.columns) == list(b.columns) and len(a) == len(b), obj
    for c in a.columns:
        if a[c].dtype == object:
            for i, (x, y) in enumerate(zip(a[c], b[c])):
                if isinstance(x, (tuple, list, np.ndarray)) or isinstance(y, (tuple, list, np.ndarray)):
                    np.testing.assert_array_equal(np.asarray(x, dtype=object if _nested(x) else None),
                                                  np.asarray(y, dtype=object if _nested(y) else None),
                                                  err_msg=f"{obj}.{c}[{i}]")
                else:
                    assert x == y or (x != x and y != y), f"{obj}.{c}[{i}]: {x!r} != {y!r}"
        else:
            assert a[c].dtype == b[c].dtype, f"{obj}.{c}: dtype {a[c].dtype} != {b[c].dtype}"
            np.testing.assert_array_equal(a[c].to_numpy(), b[c].to_numpy(), err_msg=f"{obj}.{c}")


def _nested(x) -> bool:
    return any(isinstance(e, (tuple, list)) for e in x) if isinstance(x, (tuple, list)) else False

