"""Models: loading (``loading``, ``llama2c``), what a model is (``facts``), which hook sites are live (``probe``)."""

from .facts import ModelFacts, model_dims, model_facts
from .loading import DEFAULT_MODEL_DIR, ModelLoadError, is_bridge, is_hooked_transformer, load_model, model_kind
from .probe import Backend, ProbeError, cached_backend, probe, resolve_backend

__all__ = ["load_model", "DEFAULT_MODEL_DIR", "ModelLoadError", "is_bridge", "is_hooked_transformer", "probe",
           "Backend", "ProbeError", "cached_backend", "resolve_backend", "model_dims", "model_kind", "ModelFacts",
           "model_facts"]
