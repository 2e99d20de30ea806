"""The notebooks run end to end on the shipped model (nbclient), each in a temporary copy.

The committed notebooks keep their outputs: the tests execute a copy, so a
test run never rewrites them (`selfrepair notebooks` regenerates the committed
outputs). Each notebook must open with a markdown cell saying what it shows
and finish within NOTEBOOK_BUDGET_S; the measured time is printed (see it with
``pytest -s`` or in ``--durations``).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ["01_self_repair_tour.ipynb", "02_gim_vs_ablation.ipynb", "03_head_circuits.ipynb",
             "04_what_r_measures.ipynb"]
#: the issue's bound on 2 CPU cores is 2 minutes; the test allows headroom for a loaded CI machine
NOTEBOOK_BUDGET_S = 240


@pytest.fixture(scope="module")
def shipped_model():
    from selfrepair.models.loading import DEFAULT_MODEL_DIR

    if not (DEFAULT_MODEL_DIR / "config.json").is_file():
        pytest.skip(f"shipped default model not present at {DEFAULT_MODEL_DIR}")


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_committed_notebook_opens_with_what_it_shows_and_has_outputs(name):
    nb = json.loads((ROOT / "notebooks" / name).read_text())
    first = nb["cells"][0]
    assert first["cell_type"] == "markdown" and "what this notebook shows" in "".join(first["source"]).lower()
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert code and all(c.get("execution_count") for c in code), f"{name} is committed without being executed"
    assert all(c["outputs"] for c in code[-3:]), f"{name}: the last cells have no outputs"
    errors = [o for c in code for o in c["outputs"] if o.get("output_type") == "error"]
    assert not errors, f"{name} was committed with an error output: {errors[0].get('ename')}"


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_executes(name, shipped_model, tmp_path, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    committed = (ROOT / "notebooks" / name).read_bytes()
    src = tmp_path / name
    shutil.copy(ROOT / "notebooks" / name, src)
    nb = nbformat.read(src, as_version=4)
    for c in nb.cells:  # start from a clean notebook: the outputs must be produced by this run
        if c.cell_type == "code":
            c.outputs, c.execution_count = [], None
    # the kernel inherits the environment: make the package under test importable and stay offline
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    # one torch thread: on a busy shared 2-core machine two threads are many times slower, on an idle one
    # about as fast for these small models
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    t0 = time.perf_counter()
    NotebookClient(nb, timeout=NOTEBOOK_BUDGET_S, kernel_name="python3",
                   resources={"metadata": {"path": str(tmp_path)}}).execute()
    took = time.perf_counter() - t0
    print(f"\n{name}: executed in {took:.1f} s")
    assert took < NOTEBOOK_BUDGET_S, f"{name} took {took:.0f} s"
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.execution_count for c in code)
    figs = [o for c in code for o in c.outputs if "image/png" in o.get("data", {})]
    assert figs, f"{name} produced no figure"
    # outputs are the same wherever they were made: the shipped model is "default", no path of this machine
    from selfrepair.models.loading import DEFAULT_MODEL_DIR

    text = "\n".join(json.dumps(o.get("data", {}).get("text/plain", "")) + json.dumps(o.get("text", ""))
                      for c in code for o in c.outputs)
    for path in (str(ROOT), str(DEFAULT_MODEL_DIR), str(tmp_path)):
        assert path not in text, f"{name}: an output names the path {path} of the machine that executed it"
    assert (ROOT / "notebooks" / name).read_bytes() == committed, "the test rewrote the committed notebook"
