"""Load any supported model spec into a TransformerLens model (eval mode).

``load_model(spec)`` accepts:

* ``None`` -- the shipped default model (``DEFAULT_MODEL_DIR``), offline;
* a local Hugging Face checkpoint directory, with or without tokenizer files
  (without one the model works on token ids; ``to_tokens`` is unavailable);
* a llama2.c checkpoint file (``.bin``), converted in memory to an HF Llama;
* a ``transformers`` config object -> a randomly initialised model (seeded by
  torch's global RNG, so ``torch.manual_seed`` makes it reproducible);
* a loaded ``transformers.PreTrainedModel`` (wrapped in place: the bridge takes
  it over; it stays on its device unless ``device`` is given);
* a ``TransformerBridge`` or TL 3.x ``HookedTransformer`` -> returned as is;
* a Hugging Face Hub name via ``TransformerBridge.boot_transformers``: used
  from the local cache when present; when the Hub cannot be reached this fails
  within seconds with a one-line :class:`ModelLoadError` naming the offline
  default, never a hub traceback.

``device_map`` / ``n_devices`` (checkpoint directories, the shipped model and Hub names only): the
model is placed by accelerate (``from_pretrained(device_map=...)``; ``n_devices=N`` is
TransformerLens' own translation, a balanced map over N GPUs), possibly split over devices; it
excludes ``device``. ``selfrepair._devices.is_split(model)`` tells a split model; the engine's own
forward (the fast path) steps aside for one, with a warning.

``device`` / ``dtype`` are applied in every case (for models given as objects
the object is moved/cast in place, as ``nn.Module.to`` does). Without ``device``
models built or read here go where TransformerLens puts them (CUDA if available,
else CPU); without ``dtype`` they are float32 (a checkpoint keeps its saved dtype).
With a reduced-precision ``dtype`` (``torch.bfloat16`` / ``torch.float16``) a two-token forward
checks that the model runs in that dtype on its device; if not (float16 on a CPU without
half-precision kernels) :class:`ModelLoadError` names the dtype and the device.
"""

from __future__ import annotations

import copy
import os
import socket
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Optional, Union
from urllib.parse import urlparse

import torch

from .llama2c import llama2c_to_hf

__all__ = ["load_model", "DEFAULT_MODEL_DIR", "ModelLoadError", "is_bridge", "is_hooked_transformer",
           "model_kind"]

DEFAULT_MODEL_DIR = Path(__file__).resolve().parents[1] / "data" / "default_model"

#: seconds to wait for the Hub host before declaring it unreachable
HUB_CONNECT_TIMEOUT = 3.0

_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "vocab.json",
    "spiece.model",
)


class ModelLoadError(RuntimeError):
    """A model spec could not be loaded; the message says why and what to do."""


# ----------------------------------------------------------------------------- type tests


def is_bridge(model: Any) -> bool:
    """True for a TL 4 ``TransformerBridge`` (without importing TL 4-only symbols eagerly)."""
    try:
        from transformer_lens.model_bridge import TransformerBridge  # optional: TransformerLens differs between 3.x and 4.x
    except Exception:  # TL 3.x without the bridge
        return False
    return isinstance(model, TransformerBridge)


def is_hooked_transformer(model: Any) -> bool:
    """True for a TL 3.x ``HookedTransformer`` (TL 4 removed the class)."""
    try:
        from transformer_lens import HookedTransformer  # raises ImportError on TL 4
    except Exception:
        return False
    return isinstance(model, HookedTransformer)


# ----------------------------------------------------------------------------- main entry


def load_model(
    spec: Any = None,
    *,
    device: Optional[Union[str, torch.device]] = None,
    dtype: Optional[torch.dtype] = None,
    device_map: Optional[Union[str, dict]] = None,
    n_devices: Optional[int] = None,
):
    """Load ``spec`` (see module docstring) as a TransformerLens model in eval mode.

    ``device_map`` (accelerate's: ``"auto"``, ``"balanced"``, ``{"": "cpu"}``, ``{module: device}``) or
    ``n_devices`` (split over that many GPUs) place a model read from disk or the Hub over devices."""
    if dtype is not None and not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype such as torch.float32, got {dtype!r}")
    placement = _placement(spec, device, device_map, n_devices)
    if placement is not None:
        return _load_placed(spec, dtype, placement)
    if spec is None:
        if not (DEFAULT_MODEL_DIR / "config.json").is_file():
            raise ModelLoadError(
                f"the shipped default model is missing at {DEFAULT_MODEL_DIR} (no config.json); "
                "reinstall the package, or train it with `selfrepair train-default-model`, "
                "or pass a local checkpoint directory / llama2.c .bin to load_model"
            )
        model = _load_dir(DEFAULT_MODEL_DIR, device, dtype, name="default")  # never a path of this machine
    elif isinstance(spec, (str, os.PathLike)):
        model = _load_path_or_name(spec, device, dtype)
    elif is_bridge(spec) or is_hooked_transformer(spec):
        model = _apply(spec, device, dtype)
    elif _is_hf_config(spec):
        model = _from_config(spec, device, dtype)
    elif _is_hf_model(spec):
        model = _bridge_from_hf(spec, tokenizer=None, device=device, dtype=dtype)
    else:
        raise TypeError(
            f"load_model cannot load a {type(spec).__module__}.{type(spec).__name__}; pass None "
            "(shipped default), a checkpoint directory, a llama2.c .bin path, a Hugging Face model "
            "name, a transformers config, a transformers PreTrainedModel, a TransformerBridge or a "
            "HookedTransformer"
        )
    model.eval()
    if dtype is not None and dtype.is_floating_point and torch.finfo(dtype).bits < 32:
        check_runs_in(model, dtype)
    return model


def check_runs_in(model, dtype: torch.dtype) -> None:
    """Raise :class:`ModelLoadError` naming ``dtype`` if a two-token forward of ``model`` fails in it."""
    dev = next((p.device for p in model.parameters()), torch.device("cpu"))
    try:
        with torch.no_grad():
            model(torch.zeros(1, 2, dtype=torch.long, device=dev))
    except (RuntimeError, NotImplementedError, TypeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        name = str(dtype).replace("torch.", "")
        raise ModelLoadError(
            f"the model cannot run in {name} on {dev} ({first}); load it with dtype=torch.float32"
            + (" or torch.bfloat16" if name == "float16" else "") + " (selfrepair analyses bf16 / fp16 models in "
            "float32 arithmetic either way)") from e


# ----------------------------------------------------------------------------- helpers


def _placement(spec, device, device_map, n_devices) -> Optional[dict]:
    """``{"device_map", "max_memory"}`` for ``from_pretrained`` (None: one device, the usual path)."""
    if device_map is None and (n_devices is None or n_devices == 1):
        return None
    if n_devices is not None and (isinstance(n_devices, bool) or not isinstance(n_devices, int) or n_devices < 1):
        raise ValueError(f"n_devices must be a positive integer; got {n_devices!r}.")
    if device is not None:
        raise ValueError("give device= or device_map= / n_devices=, not both (a device map places every layer)")
    if not (spec is None or (isinstance(spec, (str, os.PathLike)) and not str(spec).endswith(".bin"))):
        raise ValueError("device_map= / n_devices= place a model read from a checkpoint directory, the shipped "
                         "model or a Hub name; place a model object with accelerate yourself, then pass it")
    from transformer_lens.utilities.multi_gpu import resolve_device_map  # optional: TransformerLens 4.x only

    dm, mm = resolve_device_map(n_devices, device_map, None)
    return {"device_map": dm, **({"max_memory": mm} if mm is not None else {})}


def _load_placed(spec, dtype, placement: dict):
    """A checkpoint directory (the shipped model, a Hub snapshot in the cache) placed by accelerate."""
    if spec is None:
        return _load_dir(DEFAULT_MODEL_DIR, None, dtype, placement=placement)
    p = Path(os.fspath(spec)).expanduser()
    if p.is_dir():
        return _load_dir(p, None, dtype, placement=placement)
    snap = _cached_snapshot(os.fspath(spec))
    if snap is None:
        raise ModelLoadError(f"{os.fspath(spec)!r}: device_map= / n_devices= need a checkpoint directory or a Hub "
                             "model in the local cache (download it first)")
    return _load_dir(snap, None, dtype, name=os.fspath(spec), placement=placement)


def _apply(model, device, dtype):
    if device is not None:
        model = model.to(device) or model
    if dtype is not None:
        model = model.to(dtype) or model
    return model


def _default_device() -> str:
    """TransformerLens's default: CUDA when available, else CPU."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def _is_hf_config(x) -> bool:
    try:
        from transformers import PretrainedConfig  # heavy: only where a Hugging Face model is built
    except Exception:
        return False
    return isinstance(x, PretrainedConfig)


def _is_hf_model(x) -> bool:
    try:
        from transformers import PreTrainedModel  # heavy: only where a Hugging Face model is built
    except Exception:
        return False
    return isinstance(x, PreTrainedModel)


def _architecture(hf_model) -> str:
    archs = getattr(hf_model.config, "architectures", None)
    name = type(hf_model).__name__
    if not archs or name not in archs:
        hf_model.config.architectures = [name]
    return name


def _bridge_from_hf(hf_model, *, tokenizer, device, dtype, name: Optional[str] = None):
    """Wrap an HF causal LM (any supported architecture) in a TL model."""
    if dtype is not None:
        hf_model = hf_model.to(dtype)
    if device is not None:
        hf_model = hf_model.to(device)
    hf_model.eval()
    if not _has_bridge():
        return _hooked_from_hf(hf_model, tokenizer, device, dtype, name)
    from transformer_lens.model_bridge.sources._bridge_builder import build_bridge_from_module  # optional: TransformerLens differs between 3.x and 4.x
    from transformer_lens.utilities.attn_implementation import force_eager_attention  # optional: TransformerLens differs between 3.x and 4.x

    # Eager attention makes hook_attn_scores / hook_pattern fire (sdpa never materialises them).
    force_eager_attention(hf_model)
    arch = _architecture(hf_model)
    try:
        bridge = build_bridge_from_module(
            hf_model,
            arch,
            hf_config=hf_model.config,
            tokenizer=tokenizer,
            model_name=name or getattr(hf_model.config, "_name_or_path", None) or arch,
        )
    except Exception as e:  # unsupported architecture etc.
        raise ModelLoadError(
            f"TransformerLens cannot wrap a {arch}: {type(e).__name__}: {e}"
        ) from e
    return bridge


def _has_bridge() -> bool:
    try:
        import transformer_lens.model_bridge  # noqa: F401
        from transformer_lens.model_bridge.sources._bridge_builder import (  # noqa: F401
            build_bridge_from_module,
        )
    except Exception:
        return False
    return True


def _hooked_from_hf(hf_model, tokenizer, device, dtype, name):
    """TL 3.x fallback: convert an HF model into a HookedTransformer."""
    try:
        from transformer_lens import HookedTransformer  # optional: TransformerLens differs between 3.x and 4.x
    except Exception as e:
        raise ModelLoadError(
            "this TransformerLens has neither TransformerBridge nor HookedTransformer"
        ) from e
    kwargs = dict(hf_model=hf_model, tokenizer=tokenizer)
    if device is not None:
        kwargs["device"] = device
    if dtype is not None:
        kwargs["dtype"] = dtype
    return HookedTransformer.from_pretrained_no_processing(
        name or hf_model.config._name_or_path, **kwargs
    )


def _from_config(config, device, dtype):
    from transformers import AutoModelForCausalLM  # heavy: only where a Hugging Face model is built

    config = copy.deepcopy(config)
    config._attn_implementation = "eager"
    try:
        hf_model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    except Exception as e:
        raise ModelLoadError(
            f"cannot build a causal LM from a {type(config).__name__}: {e}"
        ) from e
    return _bridge_from_hf(hf_model, tokenizer=None, device=device or _default_device(), dtype=dtype)


@contextmanager
def _quiet_progress():
    """No "Loading weights" bar for a checkpoint that loads in a second; restores the user's setting."""
    try:
        from transformers.utils import logging as hf_logging  # heavy: only where a Hugging Face model is built
    except Exception:
        yield
        return
    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


def _has_tokenizer(d: Path) -> bool:
    return any((d / f).is_file() for f in _TOKENIZER_FILES)


def _load_dir(d: Path, device, dtype, name: Optional[str] = None, placement: Optional[dict] = None):
    from transformers import AutoModelForCausalLM, AutoTokenizer  # heavy: only where a Hugging Face model is built

    if not (d / "config.json").is_file():
        raise ModelLoadError(
            f"{d} is a directory but not a Hugging Face checkpoint (no config.json); "
            "save one with model.save_pretrained(dir)"
        )
    tokenizer = None
    if _has_tokenizer(d):
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(d), local_files_only=True)
        except Exception as e:
            raise ModelLoadError(f"tokenizer files in {d} could not be loaded: {e}") from e
    kwargs = {"local_files_only": True, "attn_implementation": "eager"}
    if dtype is not None:
        kwargs["dtype"] = dtype
    kwargs.update(placement or {})
    try:
        with _quiet_progress():
            hf_model = AutoModelForCausalLM.from_pretrained(str(d), **kwargs)
    except Exception as e:
        raise ModelLoadError(f"cannot load the checkpoint in {d}: {type(e).__name__}: {e}") from e
    if placement:  # accelerate has placed every layer: no .to(device)
        return _bridge_from_hf(hf_model, tokenizer=tokenizer, device=None, dtype=None, name=name or str(d))
    return _bridge_from_hf(
        hf_model, tokenizer=tokenizer, device=device or _default_device(), dtype=dtype, name=name or str(d)
    )


def _looks_like_path(s: str) -> bool:
    """Hub names are ``name`` or ``org/name``; anything else is meant as a path."""
    return (
        s.startswith((".", "/", "~"))
        or os.path.isabs(s)
        or "\\" in s
        or s.count("/") > 1
        or s.endswith((".bin", ".safetensors", ".pt", ".json"))
    )


def _load_path_or_name(spec, device, dtype):
    s = os.fspath(spec)
    p = Path(s).expanduser()
    if p.is_dir():
        return _load_dir(p, device, dtype, name=s)  # the model named as the user gave it
    if p.is_file():
        if p.suffix == ".bin":

            hf_model = llama2c_to_hf(p)
            return _bridge_from_hf(
                hf_model, tokenizer=None, device=device or _default_device(), dtype=dtype, name=p.name
            )
        raise ModelLoadError(
            f"{p} is a file but not a llama2.c .bin checkpoint; pass a checkpoint directory "
            "(with config.json) or a llama2.c .bin file"
        )
    if isinstance(spec, os.PathLike) or _looks_like_path(s) or not s.strip():
        raise FileNotFoundError(
            f"model path {s!r} does not exist; pass an existing checkpoint directory, a llama2.c "
            "'.bin' file, a Hugging Face model name, or None for the shipped default"
        )
    return _load_hub(s, device, dtype)


# ----------------------------------------------------------------------------- hub


def _offline_env() -> bool:
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").strip().upper() in ("1", "ON", "YES", "TRUE"):
            return True
    return False


def _hub_reachable(timeout: float = HUB_CONNECT_TIMEOUT) -> bool:
    """Open a TCP connection to the Hub host, giving up after ``timeout`` s (DNS included)."""
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    host, port = url.hostname or "huggingface.co", url.port or (443 if url.scheme != "http" else 80)
    ok = []

    def attempt():
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            ok.append(True)
        except Exception:  # unreachable, refused, or anything else: treated as offline
            pass

    th = threading.Thread(target=attempt, daemon=True)
    th.start()
    th.join(timeout)
    return bool(ok)


def _cached_snapshot(name: str) -> Optional[Path]:
    try:
        from huggingface_hub import try_to_load_from_cache  # optional: only when checking the local Hugging Face cache
    except Exception:
        return None
    try:
        hit = try_to_load_from_cache(name, "config.json")
    except Exception:
        return None
    if isinstance(hit, str) and os.path.isfile(hit):
        snap = Path(hit).parent
        if any(snap.glob("*.safetensors")) or any(snap.glob("pytorch_model*.bin")):
            return snap
    return None


def _offline_message(name: str, why: str) -> str:
    return (
        f"cannot load {name!r}: no such local path, and not from the Hugging Face Hub ({why}); "
        "offline, use the shipped "
        "default model `selfrepair.load_model()` or a local checkpoint directory / llama2.c .bin"
    )


def _load_hub(name: str, device, dtype):
    snap = _cached_snapshot(name)
    if snap is not None:  # everything needed is on disk: no network at all
        return _load_dir(snap, device, dtype, name=name)
    if _offline_env():
        raise ModelLoadError(_offline_message(name, "offline mode is set and it is not in the local cache"))
    if not _hub_reachable():
        raise ModelLoadError(_offline_message(name, "the Hub is unreachable and it is not in the local cache"))
    if not _has_bridge():
        from transformer_lens import HookedTransformer  # optional: TransformerLens differs between 3.x and 4.x

        kwargs = {}
        if device is not None:
            kwargs["device"] = device
        if dtype is not None:
            kwargs["dtype"] = dtype
        return HookedTransformer.from_pretrained(name, **kwargs)
    from transformer_lens.model_bridge import TransformerBridge  # optional: TransformerLens differs between 3.x and 4.x

    kwargs = {}
    if device is not None:
        kwargs["device"] = device
    if dtype is not None:
        kwargs["dtype"] = dtype
    try:
        return TransformerBridge.boot_transformers(name, **kwargs)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelLoadError(_offline_message(name, f"{type(e).__name__}: {first}")) from None


def model_kind(model) -> str:
    if is_hooked_transformer(model):
        return "tl3"
    if is_bridge(model):
        try:
            from transformers import PreTrainedModel  # heavy; absent under TL 3-only installs

            if isinstance(getattr(model, "original_model", None), PreTrainedModel):
                return "bridge-hf"
        except Exception:
            pass
        return "bridge-native"
    raise TypeError(
        f"probe supports TransformerBridge (TL 4) and HookedTransformer (TL 3) models, got "
        f"{type(model).__name__}"
    )
