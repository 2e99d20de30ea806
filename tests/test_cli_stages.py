"""The optional study stages' command-line checks (the full stages run in tests/test_cli.py-style runs by hand)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_context_sweep_above_the_context_is_refused_before_any_work(tmp_path, default_model):
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONPATH=str(ROOT))
    out = tmp_path / "run"
    n_ctx = int(default_model.cfg.n_ctx)
    p = subprocess.run([sys.executable, "-m", "selfrepair", "analyze", "--n", "2", "--out", str(out), "--no-png",
                        "--threads", "1", "--context-sweep", f"32,{n_ctx + 1}"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 2
    assert p.stderr.strip().splitlines()[-1] == (f"selfrepair: error: --context-sweep: window lengths must lie in "
                                                 f"[8, {n_ctx}] (the model's context); got [32, {n_ctx + 1}]")
    assert not out.exists()  # nothing written: no run.json, no tables
