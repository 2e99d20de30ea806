"""Smoke test of benchmarks/run.py (issue 6): the tiny setting runs end to end in a subprocess and reports
every headline field, finite, with the engine agreeing with the run_with_hooks baseline to 1e-4.

No timing assertions: timings depend on the machine and its load. What can fail here: a section crashing,
a missing or non-finite field, the engine's global effects disagreeing with the baseline loop's (an
independent computation: one full forward per ablation with a hook_pattern edit), and ``--device cuda``
without CUDA not failing with one clear line.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
RUN = ROOT / "benchmarks" / "run.py"


def _run(*args, timeout=300):
    return subprocess.run([sys.executable, str(RUN), *args], capture_output=True, text=True, cwd=str(ROOT),
                          timeout=timeout)


@pytest.fixture(scope="module")
def quick():
    p = _run("--quick", "--json", "--gim-components", timeout=900)  # the torchrun section runs 2 studies
    assert p.returncode == 0, p.stderr[-3000:]
    last = p.stdout.strip().splitlines()[-1]
    return json.loads(last), p.stdout


def test_quick_json_fields(quick):
    out, _ = quick
    for key in ("batched_speedup", "ideal_speedup", "max_abs_diff", "gim_overhead"):
        assert key in out, key
        assert isinstance(out[key], (int, float)) and math.isfinite(out[key]), (key, out[key])
        assert out[key] >= 0, (key, out[key])
    assert out["ideal_speedup"] >= 1.0          # the baseline never does less work than the minimum
    # bf16 section: the shipped model in bfloat16 against float32 (fractions and a median relative difference)
    for key in ("bf16_flag_agreement", "bf16_group_overlap"):
        assert 0.0 <= out[key] <= 1.0, (key, out[key])
    assert math.isfinite(out["bf16_effect_rel_diff"]) and out["bf16_effect_rel_diff"] >= 0
    assert isinstance(out["goal_met"], bool)
    m = out["machine"]
    assert m["cores"] >= 1 and m["torch_threads"] >= 1 and m["cpu_model"]


def test_quick_torchrun_identical(quick):
    """The torchrun section: one study as 1 and as 2 processes, every table equal (needs the shipped model)."""
    from selfrepair.models.loading import DEFAULT_MODEL_DIR

    out, text = quick
    if not (DEFAULT_MODEL_DIR / "config.json").is_file():
        assert "skipped" in out["torchrun"]
        return
    t = out["torchrun"]
    assert "error" not in t, t.get("error")
    # every table of the one-process run folder, compared exactly (the study's core tables among them)
    assert out["torchrun_identical"] is True and t["tables_differing"] == []
    assert {"groups", "estimates", "head_summary", "sweep", "heads", "faithfulness", "attention_rows"} <= set(t["tables"])
    assert math.isfinite(out["torchrun_speedup"]) and out["torchrun_speedup"] > 0
    assert "## torchrun" in text


def test_quick_engine_matches_baseline(quick):
    out, _ = quick
    g = out["global"]
    assert g["max_abs_diff"] <= 1e-4, g["max_abs_diff"]
    assert g["diff_checked_ablations"] >= 10
    assert g["ablations"] == 100                 # the seeded random workload (random weights)
    assert math.isfinite(g["engine_seconds"]) and g["engine_seconds"] > 0
    assert math.isfinite(g["baseline_seconds_per_ablation"]) and g["baseline_seconds_per_ablation"] > 0


def test_quick_sections_complete(quick):
    out, text = quick
    assert out["local"] and all("error" not in r for r in out["local"]), out["local"]
    for r in out["local"]:
        assert r["rows_selected"] > 0 and math.isfinite(r["seconds"])
    assert len(out["gim"]) >= 3                  # main model at two lengths + its native-bridge twin
    for r in out["gim"]:
        assert math.isfinite(r["gim_overhead"]) and r["gim_overhead"] > 0
        comp = r["components_overhead"]           # --gim-components: every component timed alone
        assert set(comp) == {"gim: TSG only", "gim: norm freeze only", "gim: q/k/v scales only",
                             "gim: all off (hooks only)"}, comp
        assert all(math.isfinite(v) and v > 0 for v in comp.values()), comp
    # gim-explain runs on the native twin and crashes on the HF-wrapped bridge: both recorded, neither fatal
    native = [r for r in out["gim"] if r["model"].startswith("native")]
    assert native and "gim_explain" in native[0]
    assert "## Global ablations" in text and "## GIM cost" in text


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA error")
def test_cuda_without_cuda_fails_clearly():
    p = _run("--device", "cuda", timeout=120)
    assert p.returncode == 2
    err = p.stderr.strip().splitlines()
    assert len(err) == 1 and "CUDA is not available" in err[0], p.stderr


def test_quick_trained_model_selected_groups():
    """On the shipped (trained) model the workload is the analysis's selected groups: individual AND joint
    ablations, and the engine must agree with both the baseline loop and analyze_self_repair's own global
    effects."""
    from selfrepair.models.loading import DEFAULT_MODEL_DIR

    if not (DEFAULT_MODEL_DIR / "config.json").is_file():
        pytest.skip("the shipped default model is not there")
    p = _run("--quick", "--json", "--model", "default", "--skip", "gim,local")
    assert p.returncode == 0, p.stderr[-3000:]
    out = json.loads(p.stdout.strip().splitlines()[-1])
    g = out["global"]
    assert g["workload"].startswith("self-repair groups"), g["workload"]
    assert g["ablations"] == 3 * g["groups"]    # k = 2: two individual + one joint per group
    assert g["max_abs_diff"] <= 1e-4, g["max_abs_diff"]
    assert g["analysis_vs_engine_max_abs_diff"] <= 1e-4, g["analysis_vs_engine_max_abs_diff"]
    for key in ("batched_speedup", "ideal_speedup", "max_abs_diff"):
        assert math.isfinite(out[key])
