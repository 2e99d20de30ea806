"""The engine: cached runs (``cache``), the score-ablation kernel (``kernels``), batched z edits measured in
partial forward passes (``edits``) and the own GPT-2 / Llama forward they run on (``forward``)."""

from .cache import (BatchRun, CachedRun, StreamedRun, StreamMismatch, cached_run, can_stream, check_backend, expand_kv, key_mask,
                    streamed_run)
from .edits import CleanRun, EditRun, ZEdits, flops, measure_z_edits, prepare_clean, replace_z, run_z_edits
from .kernels import SCORE_ABLATIONS, ablated_pattern

__all__ = ["BatchRun", "CachedRun", "cached_run", "StreamedRun", "streamed_run", "StreamMismatch", "can_stream", "check_backend", "expand_kv", "key_mask", "ZEdits", "CleanRun", "EditRun",
           "prepare_clean", "measure_z_edits", "run_z_edits", "replace_z", "flops", "ablated_pattern", "SCORE_ABLATIONS"]
