"""load_model(device_map=..., n_devices=...): accelerate's placement passed through; a model split over devices
is detected and the engine's own forward (fast path) steps aside for it with a warning.

On a CPU-only machine the one real placement is everything on "cpu": it must give the same numbers as the
usual load (exactly: the same weights, the same kernels). A split over two devices cannot be made here; it
is simulated by an accelerate map naming two devices on the wrapped model (the metadata the check reads).
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest
import torch
import transformers

import selfrepair
from conftest import assert_frames_identical
from selfrepair import tasks
from selfrepair._devices import is_split, model_devices
from selfrepair.engine import ZEdits, measure_z_edits, prepare_clean
from selfrepair.engine.forward import fast_support
from selfrepair.models.facts import model_facts


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_head=4, n_embd=64, vocab_size=200, n_positions=64,
                                  bos_token_id=0, eos_token_id=0)
    d = tmp_path_factory.mktemp("ckpt")
    transformers.GPT2LMHeadModel(cfg).save_pretrained(d)
    return d


def test_cpu_device_map_is_the_usual_model(checkpoint):
    plain = selfrepair.load_model(checkpoint, device="cpu")
    placed = selfrepair.load_model(checkpoint, device_map={"": "cpu"})
    assert not is_split(placed) and model_devices(placed) == [torch.device("cpu")]
    assert fast_support(placed, model_facts(placed))[0] == "gpt2"       # one device: the fast path stays
    task = tasks.load("induction", plain, n=3, seq_len=22, seed=0)
    kw = dict(min_contribution=0.0, progress=False, global_effects=True)
    a = selfrepair.analyze_self_repair(plain, task, **kw).groups
    b = selfrepair.analyze_self_repair(placed, task, **kw).groups
    assert len(a) > 0
    assert_frames_identical(a, b, obj="groups")   # exactly, NaN matching NaN inside tuples too


def test_split_model_detected_and_fast_path_steps_aside(checkpoint):
    m = selfrepair.load_model(checkpoint, device="cpu")
    task = tasks.load("induction", m, n=2, seq_len=22, seed=0)
    fast = prepare_clean(m, task)
    assert fast.path == "fast"
    hf = m.__dict__["original_model"]
    hf.hf_device_map = {"transformer.wte": "cpu", "transformer.h.0": "cpu", "transformer.h.1": 0}
    try:
        assert is_split(m) and torch.device("cuda:0") in model_devices(m)
        kind, reason = fast_support(m, model_facts(m))
        assert kind is None and "split over devices" in reason
        with pytest.warns(UserWarning, match="split over devices"):
            clean = prepare_clean(m, task)
        assert clean.path == "hooks"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            d = torch.randn(4, 1, m.cfg.d_head, generator=torch.Generator().manual_seed(0))
            edits = ZEdits(torch.tensor([0, 0, 1, 1]), torch.tensor([0, 1, 0, 1]), torch.tensor([0, 1, 2, 3]),
                           torch.tensor([5, 9, 7, 20]), d)
            hooks = measure_z_edits(m, task, edits, clean=clean, progress=False)
    finally:
        del hf.hf_device_map
    ref = measure_z_edits(m, task, edits, clean=fast, progress=False)
    # both paths compute the same float32 forward in a different order: |diff| within float32 rounding of
    # the logits (metric differences of order 1 here, relative eps 1.2e-7 times a few hundred operations)
    assert torch.allclose(hooks, ref, rtol=0, atol=1e-4 * max(1.0, float(ref.abs().max()))), (hooks, ref)


def test_placement_bad_input(checkpoint):
    with pytest.raises(ValueError, match="not both"):
        selfrepair.load_model(checkpoint, device="cpu", device_map={"": "cpu"})
    with pytest.raises(ValueError, match="n_devices"):
        selfrepair.load_model(checkpoint, n_devices=0)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA"):
            selfrepair.load_model(checkpoint, n_devices=2)
    cfg = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=50, n_positions=16)
    with pytest.raises(ValueError, match="model object"):
        selfrepair.load_model(cfg, device_map="auto")
