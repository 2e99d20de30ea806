"""The ``selfrepair`` command end to end on the shipped model, on a small setting.

Every output file is opened and checked for content: tables load with the
expected columns (Parquet and CSV agree), summary.json parses and names every
setting, each PNG decodes (zlib stream, chunk CRCs) to the size summary.json
states. A run killed with SIGKILL in the middle of the analysis and continued
with ``--resume`` gives the same tables as an uninterrupted run. A finished
run is not overwritten without ``--force``. User errors are one line on
stderr with exit status 2.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
import re
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pandas as pd
import pytest

from selfrepair.study import cli
from selfrepair.models.loading import DEFAULT_MODEL_DIR

ROOT = Path(__file__).resolve().parents[1]
#: a small study: 3 induction prompts of 31 tokens, layers 0 and 3, one prompt per batch (= per checkpoint);
#: one torch thread (the test machine is shared: two threads on a busy 2-core machine are many times slower)
SMALL = ["--task", "induction", "--n", "3", "--seq-len", "31", "--layers", "0", "3", "--min-contribution", "0.5",
         "--batch-size", "1", "--threads", "1"]

GROUP_COLUMNS = ["prompt", "layer", "head", "query", "keys", "contributions", "effects", "effect_sum", "effect_joint",
                 "interaction", "interaction_sym", "self_repair", "shapley", "value_similarity", "value_effects",
                 "value_effect_joint", "grad_estimate", "tsg_estimate", "gim_estimate", "global_effects",
                 "global_effect_joint", "global_interaction", "downstream_gap", "mass_interaction", "excess_interaction",
                 "concealment", "concealment_share", "permutation_p", "c_ratio", "value_similarity_out",
                 "n_contributing", "n_clusters"]
TABLE_COLUMNS = {
    "groups": GROUP_COLUMNS,
    "estimates": ["level", "estimate", "effect", "subset", "split", "n", "spearman", "spearman_lo", "spearman_hi",
                  "sign_agreement", "topk_overlap", "warning"],
    "estimate_keys": ["group", "key", "grad_key", "tsg_key", "gim_key", "w_j", "individual", "shapley"],
    "head_summary": ["layer", "head", "n_groups", "n_defined", "frac_self_repair", "ci_low", "ci_high",
                     "median_interaction", "n_tested", "frac_permutation", "perm_ci_low", "perm_ci_high"],
    "sweep": ["threshold", "fraction", "ci_low", "ci_high", "n_defined", "fraction_permutation", "perm_ci_low",
              "perm_ci_high"],
    "group_sizes": ["layer", "head", "quantity", "value", "count", "share"],
    "by_group_size": ["layer", "head", "group_size", "n_groups", "median_interaction", "median_mass_interaction",
                      "median_excess_interaction"],
    "heads": ["layer", "head", "measured", "grad_estimate", "gim_estimate"],
    "faithfulness": ["protocol", "metric", "bins", "method", "q", "comprehensiveness", "sufficiency", "comprehensiveness_rel", "sufficiency_rel"],
    "token_attributions": ["prompt", "position", "token", "grad", "gim"],
    "attention_row": ["condition", "position", "token", "weight", "effect"],
    "attention_rows": ["group", "prompt", "layer", "head", "query", "keys", "tokens", "clean", "individual", "joint"],
}
FIGURE_KINDS = ["01_joint_vs_sum", "02_estimates_local", "02_estimates_global", "03_head_heatmaps",
                "04_threshold_sweep", "05_local_vs_global", "06_head_ranking", "07_attention_row",
                "08_token_attributions", "09_r_vs_mass", "10_flag_rules", "11_group_sizes",
                "12_excess_by_group_size", "13_key_estimates"]


def _env():
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p])
    return env


def run_cli(args, cwd, timeout=900):
    return subprocess.run([sys.executable, "-m", "selfrepair", *args], cwd=cwd, env=_env(), capture_output=True,
                          text=True, timeout=timeout)


def decode_png(path: Path) -> tuple[int, int]:
    """Decode a PNG far enough to prove it is whole: signature, chunk CRCs, IHDR, the zlib image data."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    i, idat, ihdr = 8, b"", None
    while i < len(data):
        (n,) = struct.unpack(">I", data[i:i + 4])
        kind, body = data[i + 4:i + 8], data[i + 8:i + 8 + n]
        (crc,) = struct.unpack(">I", data[i + 8 + n:i + 12 + n])
        assert zlib.crc32(kind + body) & 0xFFFFFFFF == crc, f"{path}: bad CRC in chunk {kind!r}"
        if kind == b"IHDR":
            ihdr = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat += body
        elif kind == b"IEND":
            break
        i += 12 + n
    assert ihdr is not None and kind == b"IEND", f"{path}: truncated"
    w, h, depth, colour = ihdr[:4]
    channels = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}[colour]
    raw = zlib.decompress(idat)
    assert len(raw) == h * (1 + (w * channels * depth + 7) // 8), f"{path}: image data does not match {w}x{h}"
    return w, h


def read_tables(run: Path) -> dict:
    return {p.stem: pd.read_parquet(p) for p in sorted((run / "tables").glob("*.parquet"))}


@pytest.fixture(scope="module")
def shipped_model():
    if not (DEFAULT_MODEL_DIR / "config.json").is_file():
        pytest.skip(f"shipped default model not present at {DEFAULT_MODEL_DIR}")
    return []  # no --model: the shipped default


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, shipped_model):
    d = tmp_path_factory.mktemp("cli")
    out = d / "run"
    t0 = time.perf_counter()
    p = run_cli(["analyze", *shipped_model, *SMALL, "--out", str(out)], cwd=d)
    assert p.returncode == 0, p.stderr[-4000:]
    return out, p, time.perf_counter() - t0


# ----------------------------------------------------------------------------- options come from the API


def test_analyze_options_are_the_api_signature(capsys):
    from selfrepair.analysis import analyze_self_repair

    # shard=(rank, world_size) is set by each torchrun rank (selfrepair.study.distributed), not a flag
    # (``**deprecated``: old keyword names, ``ablation=``, are not flags; --ablation is an alias of --score-ablation)
    params = [p for p in inspect.signature(analyze_self_repair).parameters.values()
              if p.name not in ("model", "task", "shard") and p.kind is not p.VAR_KEYWORD]
    args = cli.build_parser().parse_args(["analyze"])
    for p in params:
        expected = True if p.name == "global_effects" else p.default
        got = getattr(args, p.name)
        if type(p.default).__module__ == "torch":  # dtype travels as its name
            expected = str(p.default).replace("torch.", "")
        assert got == expected, f"--{p.name}: CLI default {got!r} != API default {expected!r}"
    with pytest.raises(SystemExit) as e:
        cli.main(["analyze", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    flat = re.sub(r"\s+", " ", text)
    for p in params:
        flag = "--global" if p.name == "global_effects" else f"--{p.name.replace('_', '-')}"
        assert re.search(re.escape(flag) + r"\b", text), f"{flag} missing from analyze --help"
        if p.default is not None and p.name != "global_effects":
            d = str(p.default).replace("torch.", "")
            assert f"(default: {d})" in flat, f"the default of {flag} ({d}) is not in --help"
    for flag in ("--model", "--task", "--prompts", "--n", "--seq-len", "--out", "--device", "--seed", "--resume",
                 "--force", "--no-global", "--threads", "--attribution-n", "--head-ablation", "--no-png"):
        assert flag in text
    # the Python spelling is accepted too, and values reach the settings unchanged
    a = cli.build_parser().parse_args(["analyze", "--min_contribution", "0.5", "--layers", "0,2", "--heads", "1", "3",
                                       "--no-global", "--exclude-bos", "--k", "3"])
    s = cli.settings_from_args(a)
    assert s["min_contribution"] == 0.5 and s["layers"] == [0, 2] and s["heads"] == [1, 3]
    assert s["global_effects"] is False and s["exclude_bos"] is True and s["k"] == 3


def test_top_level_help_and_train_flags(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    out = capsys.readouterr().out
    for cmd in ("analyze", "figures", "train-default-model", "notebooks"):
        assert cmd in out
    from selfrepair.training import Recipe

    with pytest.raises(SystemExit):
        cli.main(["train-default-model", "--help"])
    out = capsys.readouterr().out
    for f in dataclasses.fields(Recipe):
        assert f"--{f.name.replace('_', '-')}" in out, f"Recipe.{f.name} has no flag"
    args = cli.build_parser().parse_args(["train-default-model", "--steps", "7", "--seed", "3", "--lr", "0.01",
                                          "--heldout-files", "a.py", "b.py", "--out", "x"])
    r = cli.recipe_from_args(args)
    assert (r.steps, r.seed, r.lr, r.heldout_files) == (7, 3, 0.01, ["a.py", "b.py"])
    assert r.d_model == Recipe().d_model and args.out == "x"


def test_train_default_model_refuses_to_overwrite(tmp_path, capsys):
    """(A real training run takes minutes: the recipe mapping is tested above, training by its own module.)"""
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    _one_line_error(capsys, ["train-default-model", "--out", str(tmp_path / "m"), "--steps", "1"], "--force")


def test_python_m_and_console_script():
    p = run_cli(["--version"], cwd=ROOT)
    assert p.returncode == 0 and p.stdout.startswith("selfrepair ")
    assert 'selfrepair = "selfrepair.study.cli:main"' in (ROOT / "pyproject.toml").read_text()


# ----------------------------------------------------------------------------- the full study


def test_full_run_writes_every_file_with_content(full_run):
    out, proc, _ = full_run
    tables = read_tables(out)
    assert set(tables) == set(TABLE_COLUMNS)
    for name, cols in TABLE_COLUMNS.items():
        df = tables[name]
        assert len(df) > 0, f"{name} is empty"
        missing = [c for c in cols if c not in df.columns]
        assert not missing, f"tables/{name}.parquet lacks {missing}"
        csv = pd.read_csv(out / "tables" / f"{name}.csv")
        assert list(csv.columns) == list(df.columns) and len(csv) == len(df), f"{name}.csv differs from the Parquet"
    g = tables["groups"]
    assert set(g["layer"]) <= {0, 3} and set(g["prompt"]) == {0, 1, 2}  # (every batch has groups)
    assert all(len(k) == 2 for k in g["keys"])
    h = tables["heads"]
    assert len(h) == 4 * 4  # every head of the shipped model
    assert set(tables["faithfulness"]["method"]) == {"grad", "gim", "random"}
    assert set(tables["faithfulness"]["protocol"]) == {"default", "paper", "eraser"}

    s = json.loads((out / "summary.json").read_text())
    settings = s["settings"]
    assert settings["layers"] == [0, 3] and settings["min_contribution"] == 0.5 and settings["batch_size"] == 1
    assert settings["global_effects"] is True and settings["k"] == 2 and settings["threshold"] == 0.1
    from selfrepair.analysis import analyze_self_repair

    assert set(settings) == {p for p in inspect.signature(analyze_self_repair).parameters if p not in ("model", "task", "shard", "deprecated")}
    assert s["task"]["name"] == "induction" and s["task"]["n"] == 3 and s["task"]["seq_len"] == 31
    assert s["seed"] == 0 and s["head_ablation"] == "mean" and s["device"] == "cpu" and s["threads"] == 1
    assert s["attribution_n"] == 3
    for pkg in ("selfrepair", "torch", "transformer_lens"):
        assert s["versions"][pkg]
    assert s["model"]["spec"] == "default" and re.fullmatch(r"[0-9a-f]{64}", s["model"]["weights_sha256"])
    assert s["model"]["weights_sha256"] == s["analysis_meta"]["model_hash"]
    for stage in ("load model", "self-repair analysis", "compare_estimates", "head attributions",
                  "token attributions + faithfulness", "figures", "total"):
        assert s["timings_s"][stage] > 0, stage
    assert s["headline"]["groups"] == len(g)

    # every figure as HTML and as a PNG of the stated size
    assert set(s["figures"]) == set(FIGURE_KINDS)
    for name, f in s["figures"].items():
        html = (out / f["html"]).read_text()
        assert "Plotly.newPlot" in html and "plotly.min.js" in html
        assert decode_png(out / f["png"]) == tuple(f["png_size"])
    assert (out / "figures" / "plotly.min.js").is_file()
    for f in s["files"]:
        assert (out / f).is_file(), f
    hidden = [p for p in out.rglob("*") if p.name.startswith(".")]
    assert not [p for p in hidden if p.name.endswith(".tmp")], "temporary files left behind"
    # the only hidden files: the owner's lock and the stages' settings stamps (docs/run-folder.md)
    assert {str(p.relative_to(out)) for p in hidden} == {
        ".lock", "checkpoints/.self_repair_result.stage.json",
        *[f"tables/.stage-{x}.json" for x in ("self-repair-analysis-estimates", "head-attributions",
                                              "token-attributions-faithfulness", "attention-row",
                                              "attention-rows-report-drill-down")]}

    # the printed summary states the numbers of the tables
    text = proc.stdout
    assert f"groups analysed: {len(g)}" in text
    r = g["interaction"].dropna()
    assert f"self-repairing (r > 0.1): {(r > 0.1).mean():.1%}" in text
    assert "over the sweep:" in text and "Spearman" in text and "top self-repairing heads" in text


def test_refuses_a_finished_run_without_force(full_run):
    out, _, _ = full_run
    before = (out / "summary.json").stat().st_mtime_ns
    p = run_cli(["analyze", *SMALL, "--out", str(out)], cwd=out.parent)
    assert p.returncode == 2
    assert p.stderr.strip().count("\n") == 0 and "--force" in p.stderr and "finished run" in p.stderr
    assert (out / "summary.json").stat().st_mtime_ns == before


def test_figures_redrawn_from_a_run(full_run, tmp_path):
    out, _, _ = full_run
    (tmp_path / "figs").mkdir()
    (tmp_path / "figs" / "09_old_figure.png").write_bytes(b"stale")  # a figure the run does not have
    (tmp_path / "figs" / "notes.txt").write_text("not ours")
    assert cli.main(["figures", str(out), "--out", str(tmp_path / "figs"), "--no-png"]) == 0
    assert sorted(p.stem for p in (tmp_path / "figs").glob("*.html")) == sorted(FIGURE_KINDS)
    assert not (tmp_path / "figs" / "09_old_figure.png").exists() and (tmp_path / "figs" / "notes.txt").exists()
    html = (tmp_path / "figs" / "01_joint_vs_sum.html").read_text()
    assert "cdn.plot.ly" in html  # the repository's figures/ stay small
    # --figures-only redraws inside the run folder, from its tables
    before = (out / "figures" / "03_head_heatmaps.html").stat().st_mtime_ns
    assert cli.main(["analyze", "--out", str(out), "--figures-only", "--no-png"]) == 0
    assert (out / "figures" / "03_head_heatmaps.html").stat().st_mtime_ns > before


def test_prompts_jsonl_and_a_study_without_groups(tmp_path, capsys, shipped_model):
    """Users' own prompts (ids form); a threshold of contribution no row reaches: a finished run, no crash."""
    import hashlib

    import selfrepair
    from selfrepair import tasks

    t = tasks.load("induction", selfrepair.load_model(), n=2, seed=3)
    f = tmp_path / "mine.jsonl"
    f.write_text("".join(json.dumps({"tokens": t.tokens[i].tolist(), "answer_id": int(t.answer_ids[i]),
                                     "wrong_id": int(t.wrong_ids[i])}) + "\n" for i in range(2)))
    out = tmp_path / "run"
    assert cli.main(["analyze", "--prompts", str(f), "--min-contribution", "1000", "--out", str(out), "--no-png",
                     "--threads", "1", "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "groups analysed: 0" in text and "no group with a defined ratio" in text
    s = json.loads((out / "summary.json").read_text())
    assert s["task"]["name"] == "jsonl" and s["task"]["n"] == 2
    assert s["task"]["prompts_sha256"] == hashlib.sha256(f.read_bytes()).hexdigest()
    assert set(s["figures"]) == {"06_head_ranking", "08_token_attributions"}  # the rest need groups
    assert len(pd.read_parquet(out / "tables" / "groups.parquet")) == 0


def test_resume_after_kill_gives_the_same_tables(full_run, tmp_path):
    ref, _, _ = full_run
    out = tmp_path / "run"
    args = ["analyze", *SMALL, "--out", str(out), "--no-png"]
    proc = subprocess.Popen([sys.executable, "-m", "selfrepair", *args], cwd=tmp_path, env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ck = out / "checkpoints" / "self_repair"
    t0 = time.time()
    try:
        while not list(ck.glob("batch_*.parquet")):
            assert proc.poll() is None, "the run ended before its first checkpoint"
            assert time.time() - t0 < 600, "no checkpoint within 10 minutes"
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)  # killed mid-analysis: no clean-up of any kind
    finally:
        proc.wait()
    batches = len(list(ck.glob("batch_*.parquet")))
    assert 1 <= batches < 3, f"{batches} of 3 batches done when killed"
    assert not (out / "summary.json").exists()
    # an unfinished run is neither silently overwritten nor resumed with other options
    p = run_cli(args, cwd=tmp_path)
    assert p.returncode == 2 and "--resume" in p.stderr and p.stderr.strip().count("\n") == 0
    p = run_cli([*args, "--resume", "--k", "3"], cwd=tmp_path)
    assert p.returncode == 2 and "differ" in p.stderr and "k: 2 -> 3" in p.stderr
    # resumed: the same tables as the uninterrupted run
    p = run_cli([*args, "--resume"], cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    s = json.loads((out / "summary.json").read_text())
    assert s["analysis_meta"]["n_batches_resumed"] == batches
    got, want = read_tables(out), read_tables(ref)
    assert set(got) == set(want)
    for name in want:
        pd.testing.assert_frame_equal(got[name], want[name], check_exact=False, rtol=1e-7, atol=1e-10, obj=name)
    # --force starts over (here with other settings)
    p = run_cli(["analyze", *SMALL[:2], "--n", "2", "--seq-len", "31", "--layers", "0", "--min-contribution", "0.5",
                 "--threads", "1", "--out", str(out), "--no-png", "--force"], cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    s2 = json.loads((out / "summary.json").read_text())
    assert s2["settings"]["layers"] == [0] and s2["task"]["n"] == 2 and s2["analysis_meta"]["n_batches_resumed"] == 0
    assert set(pd.read_parquet(out / "tables" / "groups.parquet")["layer"]) <= {0}


# ----------------------------------------------------------------------------- one-line errors


def _one_line_error(capsys, argv, *must_contain):
    rc = cli.main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2, f"{argv}: exit status {rc}, stderr {err!r}"
    assert err.count("\n") == 0, f"{argv}: more than one line on stderr:\n{err}"
    assert err.startswith("selfrepair") and "Traceback" not in err
    for m in must_contain:
        assert m in err, f"{argv}: {m!r} not in {err!r}"
    return err


def _usage_error(capsys, argv, *must_contain):
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.count("\n") == 0, err
    for m in must_contain:
        assert m in err
    return err


def test_errors_are_one_line(capsys, tmp_path, monkeypatch, shipped_model):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    out = ["--out", str(tmp_path / "r")]
    # unknown model offline
    _one_line_error(capsys, ["analyze", "--model", "no-such-org/no-such-model-xyz", *out], "no-such-model-xyz")
    _one_line_error(capsys, ["analyze", "--model", str(tmp_path / "missing_dir"), *out], "missing_dir")
    # unreadable JSONL line
    bad = tmp_path / "p.jsonl"
    bad.write_text('{"prompt": "def f(x):\\n    return x", "answer": " x", "wrong": " y"}\n{"prompt": "oops"\n')
    _one_line_error(capsys, ["analyze", "--prompts", str(bad), *out], "line 2")
    _one_line_error(capsys, ["analyze", "--prompts", str(tmp_path / "none.jsonl"), *out], "none.jsonl")
    # CUDA asked for but absent
    import torch

    if not torch.cuda.is_available():
        _one_line_error(capsys, ["analyze", "--device", "cuda", *out], "CUDA", "--device cpu")
    # bad option values: found by argparse ...
    _usage_error(capsys, ["analyze", "--k", "two"], "--k", "expected an integer from 2 to 8 or 'auto'")
    _usage_error(capsys, ["analyze", "--ablation", "zero"], "--ablation", "knockout")
    _usage_error(capsys, ["analyze", "--score-ablation", "zero"], "--score-ablation", "knockout")
    _usage_error(capsys, ["analyze", "--n", "0"], "--n", "positive")
    _usage_error(capsys, ["analyze", "--task", "induction", "--prompts", "x.jsonl"], "not allowed")
    # ... and by the analysis itself (the same checks as the Python API)
    _one_line_error(capsys, ["analyze", *SMALL[:6], "--k", "1", *out], "k must be")
    _one_line_error(capsys, ["analyze", *SMALL[:6], "--k", "auto", "--k-max", "9", *out], "k_max must be")
    _one_line_error(capsys, ["analyze", *SMALL[:6], "--n-permutations=-1", "--alpha", "0.5", *out],
                    "n_permutations must be")
    _one_line_error(capsys, ["analyze", *SMALL[:6], "--layers", "9", *out], "layer 9")
    _one_line_error(capsys, ["analyze", "--task", "no-such-task", *out], "no-such-task")
    assert not (tmp_path / "r").exists(), "a failed start left a run folder behind"
    _one_line_error(capsys, ["analyze", "--resume"], "--out")
