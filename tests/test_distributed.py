"""torchrun: a study sharded over 2 CPU processes (gloo) gives the one-process tables; a killed rank restarts
and resumes; disagreeing ranks and a rank dead for good are refused with one line.

Every table is compared EXACTLY with a one-process run of the same command: the analysis is computed
batch by batch and the sharded run deals the one-process run's batches to the ranks (each row comes from
the same batch, the same code and one torch thread in both), and the stages that are not per prompt run
whole on one rank; so there is no rounding difference to allow for.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from selfrepair.analysis import analyze_self_repair
from selfrepair.models.loading import DEFAULT_MODEL_DIR
from selfrepair.study import cli, distributed
from selfrepair.study.rundir import read_table
from conftest import assert_frames_identical

ROOT = Path(__file__).resolve().parents[1]
#: 4 induction prompts, one per batch (2 batches per rank), layers 0 and 3, global effects on; --n-prompts:
#: torchrun's own parser would take --n as an abbreviation of its options
ARGS = ["analyze", "--task", "induction", "--n-prompts", "4", "--seq-len", "31", "--layers", "0", "3",
        "--min-contribution", "0.5", "--batch-size", "1", "--threads", "1", "--no-png", "--no-progress"]
TABLES = ["groups", "estimates", "estimate_keys", "head_summary", "sweep", "group_sizes", "by_group_size", "heads",
          "token_attributions", "faithfulness", "attention_row", "attention_rows"]


def _env(**extra):
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1", **extra)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p])
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RESTART_COUNT"):
        if k not in extra:
            env.pop(k, None)
    return env


def _torchrun(out: Path, *, max_restarts: int = 0) -> list:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
            "--max-restarts", str(max_restarts), "-m", "selfrepair", *ARGS, "--out", str(out)]


def _assert_same_tables(a: Path, b: Path):
    names_a = sorted(p.stem for p in (a / "tables").glob("*.parquet"))
    assert names_a == sorted(p.stem for p in (b / "tables").glob("*.parquet")) == sorted(TABLES)
    for n in names_a:
        assert_frames_identical(read_table(a / "tables", n), read_table(b / "tables", n), obj=n)


def _worker_pid(root_pid: int, rank: int, restart: int) -> int | None:
    """The process below ``root_pid`` whose environment says RANK=rank, restart ``restart`` (Linux /proc)."""
    children: dict = {}
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                ppid = int((p / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(p.name))
    todo, seen = [root_pid], []
    while todo:
        pid = todo.pop()
        seen.append(pid)
        todo += children.get(pid, [])
    for pid in seen[1:]:
        try:
            env = dict(kv.split("=", 1) for kv in Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace")
                       .split("\0") if "=" in kv)
        except OSError:
            continue
        if env.get("RANK") == str(rank) and env.get("TORCHELASTIC_RESTART_COUNT", "0") == str(restart):
            return pid
    return None


def _kill_rank_after_first_batch(proc, out: Path, rank: int = 1, timeout: float = 600) -> Path:
    """SIGKILL rank ``rank`` as soon as it has checkpointed its first batch; returns that batch file."""
    ck = distributed.shard_dir(out, rank, 2) / "self_repair"
    t0 = time.time()
    while time.time() - t0 < timeout:
        assert proc.poll() is None, "torchrun ended before the rank could be killed"
        files = sorted(ck.glob("batch_*.parquet")) if ck.is_dir() else []
        if files:
            pid = _worker_pid(proc.pid, rank, 0)
            assert pid is not None, "rank process not found"
            os.kill(pid, signal.SIGKILL)
            return files[0]
        time.sleep(0.02)
    raise AssertionError("no batch checkpoint appeared")


needs_linux = pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds the rank's process in /proc")


@pytest.fixture(scope="module")
def shipped():
    if not (DEFAULT_MODEL_DIR / "config.json").is_file():
        pytest.skip(f"shipped default model not present at {DEFAULT_MODEL_DIR}")


@pytest.fixture(scope="module")
def single_run(tmp_path_factory, shipped):
    out = tmp_path_factory.mktemp("dist") / "single"
    p = subprocess.run([sys.executable, "-m", "selfrepair", *ARGS, "--out", str(out)], env=_env(),
                       capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    return out


def test_torchrun_two_ranks_identical_tables(single_run, tmp_path):
    out = tmp_path / "dist"
    p = subprocess.run(_torchrun(out), env=_env(), capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    _assert_same_tables(single_run, out)
    # each rank did its own batches (round robin) in its own folder, and only rank 0 wrote the summary
    for r, want in ((0, ["batch_00000000_00000001", "batch_00000002_00000003"]),
                    (1, ["batch_00000001_00000002", "batch_00000003_00000004"])):
        d = distributed.shard_dir(out, r, 2)
        assert sorted(f.stem for f in (d / "self_repair").glob("batch_*.parquet")) == want
        assert (d / "done.json").is_file()
    assert (out / "summary.json").is_file() and p.stdout.count("wrote ") == 1


@needs_linux
def test_killed_rank_restarts_and_resumes(single_run, tmp_path):
    out = tmp_path / "dist"
    proc = subprocess.Popen(_torchrun(out, max_restarts=1), env=_env(), cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        first = _kill_rank_after_first_batch(proc, out)
        before = first.stat().st_mtime_ns
        _, err = proc.communicate(timeout=900)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-3000:]
    assert first.stat().st_mtime_ns == before, "the restarted rank recomputed a batch it had checkpointed"
    _assert_same_tables(single_run, out)


@needs_linux
def test_rank_dead_for_good_leaves_checkpoints_and_merge_is_refused(shipped, tmp_path):
    out = tmp_path / "dist"
    proc = subprocess.Popen(_torchrun(out, max_restarts=0), env=_env(), cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        first = _kill_rank_after_first_batch(proc, out)
        proc.communicate(timeout=900)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0
    assert first.is_file()                                            # its shard's checkpoints are kept
    assert not (out / "summary.json").exists() and not (out / "tables" / "groups.parquet").exists()
    with pytest.raises(distributed.ShardError) as e:
        distributed.merge_shards(out, 2)
    msg = str(e.value)
    # rank 1 died; torchrun then stopped rank 0 too: the line names every unfinished shard, rank 1's among them
    assert "\n" not in msg and " of 2 missing" in msg and "rank1-of-2 (" in msg and "nothing was merged" in msg


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ranks_that_disagree_are_refused_before_any_work(shipped, tmp_path):
    """Two ranks launched by hand (as two nodes would be) with different --k: one line each, exit 2, no run folder."""
    out, port = tmp_path / "run", str(_free_port())
    procs = []
    for rank, k in ((0, "2"), (1, "3")):
        env = _env(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        procs.append(subprocess.Popen([sys.executable, "-m", "selfrepair", *ARGS, "--k", k, "--out", str(out)],
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    errs = []
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 2, err[-3000:]
        errs.append(err.strip())
    for err in errs:
        assert len(err.splitlines()) == 1 and "rank 1 differs from rank 0" in err and "k: 2 -> 3" in err, err
    assert not out.exists()


def test_cuda_under_torchrun_without_cuda_is_one_line(monkeypatch, capsys, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    for k, v in (("RANK", "0"), ("WORLD_SIZE", "2"), ("LOCAL_RANK", "0")):
        monkeypatch.setenv(k, v)
    assert cli.main(["analyze", "--device", "cuda", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "CUDA" in err and "--device cpu" in err


def test_rank_env_checks():
    assert distributed.ranks_from_env({}) == distributed.Ranks(0, 1, 0)
    r = distributed.ranks_from_env({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"})
    assert r.active and not r.is_main and distributed.rank_device("cuda", r) == "cuda:1"
    assert distributed.rank_device("cpu", r) == "cpu"
    for env in ({"RANK": "2", "WORLD_SIZE": "2"}, {"RANK": "x", "WORLD_SIZE": "2"}):
        with pytest.raises(cli.CLIError):
            distributed.ranks_from_env(env)
    assert [distributed.stage_owner(s, 2) for s in distributed.WHOLE_STAGES] == [1, 0]


def test_shards_of_the_analysis_put_together_are_the_whole_result(gpt2_bridge):
    """analyze_self_repair(shard=(r, W)) over every r, merged, equals one call on the whole task (exactly)."""
    from selfrepair import tasks

    task = tasks.load("induction", gpt2_bridge, n=5, seq_len=22, seed=0)
    kw = dict(min_contribution=0.0, batch_size=2, progress=False, global_effects=True)
    whole = analyze_self_repair(gpt2_bridge, task, **kw)
    parts = [analyze_self_repair(gpt2_bridge, task, shard=(r, 2), **kw) for r in range(2)]
    assert len(whole.groups) > 0 and all(len(p.groups) for p in parts)
    assert set(parts[0].groups["prompt"]) == {0, 1, 4} and set(parts[1].groups["prompt"]) == {2, 3}
    assert_frames_identical(distributed.merge_groups([p.groups for p in parts]), whole.groups, obj="groups")
    with pytest.raises(ValueError, match="shard must be"):
        analyze_self_repair(gpt2_bridge, task, shard=(2, 2), **kw)


_PY_RANK = r"""
import sys, torch, transformers, pandas as pd, selfrepair
from selfrepair import tasks
from selfrepair.study import distributed
ranks = distributed.init_process_group("cpu")
torch.manual_seed(0)
cfg = transformers.GPT2Config(n_layer=2, n_head=4, n_embd=64, vocab_size=200, n_positions=64, bos_token_id=0,
                              eos_token_id=0)
model = selfrepair.load_model(cfg, device="cpu")
task = tasks.load("induction", model, n=5, seq_len=22, seed=0)
kw = dict(min_contribution=0.0, batch_size=2, progress=False, global_effects=True)
res = distributed.analyze_sharded(model, task, **kw)
whole = selfrepair.analyze_self_repair(model, task, **kw)
import numpy as np
assert list(res.groups.columns) == list(whole.groups.columns) and len(res.groups) == len(whole.groups)
for c in whole.groups.columns:  # exact, NaN matching NaN inside tuple columns too
    for x, y in zip(res.groups[c], whole.groups[c]):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=c)
assert res.meta["n_batches"] == 3 and res.meta["world_size"] == 2 and len(res.groups) > 0
print("OK", ranks.rank, len(res.groups))
"""


def test_analyze_sharded_inside_a_process_group(tmp_path):
    """Python API inside an initialised gloo group of 2: every rank gets the one-process result, exactly."""
    port = str(_free_port())
    procs = [subprocess.Popen([sys.executable, "-c", _PY_RANK], env=_env(RANK=str(r), WORLD_SIZE="2",
                                                                          LOCAL_RANK=str(r), MASTER_ADDR="127.0.0.1",
                                                                          MASTER_PORT=port),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
             for r in range(2)]
    for r, p in enumerate(procs):
        o, e = p.communicate(timeout=600)
        assert p.returncode == 0, e[-3000:]
        assert o.strip().startswith(f"OK {r} "), o
