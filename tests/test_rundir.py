"""Run folders that never lose data, and one clear line for every mistake (docs/run-folder.md).

* one process owns a run folder (an OS lock on ``<run>/.lock``, gone with the process, SIGKILL included);
  two REAL processes started at once into the same default root get two folders, into the same ``--out``
  one of them gets one line naming the owner and exit status 2; nothing is lost and no table holds the
  other run's numbers;
* clean-up removes only what a run writes; stage tables are reused only under ``--resume`` and only when
  the settings stamp beside them matches;
* an unwritable or full ``--out`` is one line (checked before the model loads; a full disk keeps the run
  resumable), a damaged checkpoint batch is recomputed with a warning, a damaged ``run.json`` is named;
* every entry point validates the whole task once, before any forward pass, naming prompt and id;
* committed outputs name the shipped model ``default``, never a path of the machine that made them.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pandas as pd
import pytest
import torch

from selfrepair.analysis.results import read_result_info
from selfrepair.models.loading import DEFAULT_MODEL_DIR
from selfrepair.study import cli, pipeline, rundir
from selfrepair.study.rundir import CLIError, RunInUse, RunLock

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
#: a small study (the concurrency test runs four of them at once on a shared machine)
SMALL = ["--task", "induction", "--n", "8", "--seq-len", "31", "--layers", "0", "3", "--min-contribution", "0.5",
         "--attribution-n", "2", "--threads", "1", "--no-png", "--no-progress"]


def _env():
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p])
    return env


def _start(args, cwd):
    return subprocess.Popen([PY, "-m", "selfrepair", *args], cwd=cwd, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _finish(p, timeout=900):
    out, err = p.communicate(timeout=timeout)
    return p.returncode, out, err


def _one_line_error(capsys, argv, *must_contain):
    rc = cli.main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2, f"{argv}: exit status {rc}, stderr {err!r}"
    assert err.count("\n") == 0 and err.startswith("selfrepair: error:") and "Traceback" not in err, err
    for m in must_contain:
        assert m in err, f"{m!r} not in {err!r}"
    return err


@pytest.fixture(scope="module")
def shipped():
    if not (DEFAULT_MODEL_DIR / "config.json").is_file():
        pytest.skip(f"shipped default model not present at {DEFAULT_MODEL_DIR}")


def _check_own_numbers(run: Path, k: int):
    """Everything in ``run`` was made by the run with ``k`` keys per group: summary, run.json, the analysis'
    own record, the checkpoints' identity, every table listed exists, and every group has k keys."""
    s = json.loads((run / "summary.json").read_text())
    assert s["settings"]["k"] == k
    assert json.loads((run / "run.json").read_text())["settings"]["k"] == k
    assert read_result_info(run / "checkpoints" / "self_repair_result.parquet")["settings"]["k"] == k
    assert json.loads((run / "checkpoints" / "self_repair" / "run.json").read_text())["settings"]["k"] == k
    for f in s["files"]:
        assert (run / f).is_file(), f"{run}: {f} listed in summary.json is missing"
    g = pd.read_parquet(run / "tables" / "groups.parquet")
    assert len(g) == s["headline"]["groups"]
    assert all(len(keys) == k for keys in g["keys"]), "a groups table holds another run's groups"
    # the stamps beside the tables all carry this run's settings hash
    stamps = {json.loads(p.read_text())["settings_sha256"] for p in (run / "tables").glob(".stage-*.json")}
    assert len(stamps) == 1 and len(list((run / "tables").glob(".stage-*.json"))) >= 3
    return s


# ----------------------------------------------------------------------------- 12.2 two real processes


def test_two_processes_at_once(tmp_path, shipped):
    """Four real processes at once: two into the default root (k = 2 and k = 3), two identical ones into
    the same --out. The first pair gets two folders, each with only its own numbers; of the second pair
    one finishes and the other exits 2 with one line (the folder in use, naming the owner's pid, or, if it
    came after the first had finished, the finished run it refuses to overwrite)."""
    same = tmp_path / "same"
    procs = [_start(["analyze", *SMALL], tmp_path), _start(["analyze", *SMALL, "--k", "3"], tmp_path),
             _start(["analyze", *SMALL, "--out", str(same)], tmp_path),
             _start(["analyze", *SMALL, "--out", str(same)], tmp_path)]
    res = [_finish(p) for p in procs]
    pids = [p.pid for p in procs]
    for rc, out, err in res[:2]:
        assert rc == 0, err[-3000:]
    runs = sorted((tmp_path / "runs").iterdir())
    assert len(runs) == 2, runs
    ks = sorted(json.loads((r / "summary.json").read_text())["settings"]["k"] for r in runs)
    assert ks == [2, 3]
    for r in runs:
        _check_own_numbers(r, json.loads((r / "run.json").read_text())["settings"]["k"])
    # the same --out: one winner, one loser with one line
    rcs = sorted(r[0] for r in res[2:])
    assert rcs == [0, 2], [(r[0], r[2][-2000:]) for r in res[2:]]
    win, lose = (2, 3) if res[2][0] == 0 else (3, 2)
    err = res[lose][2].strip()
    assert err.count("\n") == 0 and err.startswith("selfrepair: error:"), err
    assert (f"in use by another selfrepair run (pid {pids[win]}" in err) or ("already holds a finished run" in err), err
    s = _check_own_numbers(same, 2)
    assert str(pids[win]) in (same / ".lock").read_text()
    # the finished run was not overwritten: summary.json is the winner's (its file list and timings intact)
    assert s["argv"] == ["analyze", *SMALL, "--out", str(same)]
    assert not list(same.rglob(".*.tmp")), "a temporary file was left behind"


# ----------------------------------------------------------------------------- 12.2 the lock


_HOLDER = """
import sys, time
from pathlib import Path
from selfrepair.study.rundir import RunLock
lock = RunLock.acquire(Path(sys.argv[1]))
print("locked", flush=True)
time.sleep(600)
"""


def test_lock_names_its_owner_and_dies_with_it(tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    run.mkdir()
    holder = subprocess.Popen([PY, "-c", _HOLDER, str(run)], env=_env(), stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunInUse, match=rf"in use by another selfrepair run \(pid {holder.pid} on "):
            RunLock.acquire(run)
        # the command is refused before the model loads
        monkeypatch.setattr(cli, "_load_model", lambda *a: pytest.fail("the model loaded for a locked folder"))
        _one_line_error(capsys, ["analyze", "--out", str(run)], str(run), f"pid {holder.pid}", "choose another --out")
        assert sorted(p.name for p in run.iterdir()) == [".lock"]
    finally:
        holder.send_signal(signal.SIGKILL)  # no clean-up of any kind: the kernel drops the flock
        holder.wait()
    lock = RunLock.acquire(run)  # the stale .lock file does not block
    assert json.loads((run / ".lock").read_text())["pid"] == os.getpid()
    lock.release()


def test_default_names_never_collide(tmp_path):
    root = tmp_path / "runs"
    made = [rundir.default_out("code-copy", root) for _ in range(5)]  # the same second, the same label
    assert len(set(made)) == 5 and all(p.is_dir() and not any(p.iterdir()) for p in made)


def test_cleanup_removes_only_our_files(tmp_path):
    run = tmp_path / "run"
    for rel in ("run.json", "summary.json", "tables/groups.parquet", "tables/groups.csv", "tables/.stage-x.json",
                "figures/01_joint_vs_sum.html", "figures/plotly.min.js", "checkpoints/self_repair/run.json",
                "checkpoints/self_repair/batch_00000000_00000001.parquet", "checkpoints/self_repair_result.parquet",
                "tables/.groups.parquet.abc.tmp"):
        (run / rel).parent.mkdir(parents=True, exist_ok=True)
        (run / rel).write_text("x")
    foreign = ["notes.txt", "tables/my_notes.txt", "figures/logo.svg", "checkpoints/self_repair/README"]
    for rel in foreign:
        (run / rel).write_text("mine")
    rundir.clear_run_dir(run)
    left = sorted(str(p.relative_to(run)) for p in run.rglob("*") if p.is_file())
    assert left == sorted(foreign)
    # a folder this process created is removed only when nothing foreign is in it
    d = rundir.open_run_dir(tmp_path / "new" / "deeper", "t")
    assert d.created == [tmp_path / "new", tmp_path / "new" / "deeper"]
    (d.path / "run.json").write_text("{}")
    (d.path / "user.txt").write_text("not ours")
    d.cleanup()
    assert sorted(p.name for p in d.path.iterdir()) == ["user.txt"]
    d2 = rundir.open_run_dir(tmp_path / "new2" / "deeper", "t")
    (d2.path / "run.json").write_text("{}")
    d2.cleanup()
    assert not (tmp_path / "new2").exists()


def test_failed_start_leaves_an_existing_folder_as_it_was(tmp_path, capsys, shipped):
    empty = tmp_path / "empty"
    empty.mkdir()
    (tmp_path / "keep.txt").write_text("x")
    _one_line_error(capsys, ["analyze", *SMALL[:6], "--layers", "9", "--out", str(empty)], "layer 9")
    assert empty.is_dir() and not any(empty.iterdir()), list(empty.iterdir())
    _one_line_error(capsys, ["analyze", *SMALL[:6], "--layers", "9", "--out", str(tmp_path / "a" / "b")], "layer 9")
    assert not (tmp_path / "a").exists() and (tmp_path / "keep.txt").is_file()
    # a refused folder (files that are not a run) is left exactly as it was: no .lock added
    other = tmp_path / "other"
    other.mkdir()
    (other / "data.txt").write_text("x")
    _one_line_error(capsys, ["analyze", "--out", str(other)], "holds no selfrepair run")
    assert [p.name for p in other.iterdir()] == ["data.txt"]


# ----------------------------------------------------------------------------- 12.2 stage reuse


def test_stage_tables_reused_only_under_resume_with_matching_settings(tmp_path, capsys):
    calls = []

    def compute():
        calls.append(1)
        return {"t": pd.DataFrame({"x": [len(calls), 7]})}

    def run(resume, key):
        st = pipeline.Study(tmp_path, False, pipeline.Timings(), resume=resume, key=key)
        return st.stage("my stage", ["t"], compute)["t"], st.resumed

    t, _ = run(False, {"k": 2})
    assert len(calls) == 1 and t["x"].tolist() == [1, 7]
    run(False, {"k": 2})  # no --resume: recomputed even though the tables are there
    assert len(calls) == 2
    t, resumed = run(True, {"k": 2})  # --resume, same settings: read back
    assert len(calls) == 2 and resumed == ["my stage"] and t["x"].tolist() == [2, 7]
    t, resumed = run(True, {"k": 3})  # --resume, other settings: recomputed, with a line saying why
    assert len(calls) == 3 and resumed == [] and t["x"].tolist() == [3, 7]
    assert "not made with this run's settings" in capsys.readouterr().err
    pq = tmp_path / "tables" / "t.parquet"
    pq.write_bytes(pq.read_bytes()[:20])  # truncated by a crash
    t, resumed = run(True, {"k": 3})
    assert len(calls) == 4 and resumed == [] and t["x"].tolist() == [4, 7]
    assert "cannot be read" in capsys.readouterr().err
    (tmp_path / "tables" / ".stage-my-stage.json").unlink()  # tables without a stamp: unknown settings
    run(True, {"k": 3})
    assert len(calls) == 5


# ----------------------------------------------------------------------------- 12.3 unwritable, full


def _mount_tmpfs(where: Path, opts: str):
    where.mkdir(parents=True, exist_ok=True)
    p = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(where)], capture_output=True, text=True)
    if p.returncode:
        pytest.skip(f"cannot mount a tmpfs here ({p.stderr.strip() or p.returncode})")


def _umount(where: Path):
    subprocess.run(["umount", str(where)], capture_output=True)


def test_unwritable_out_is_one_line_before_the_model_loads(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(cli, "_load_model", lambda *a: pytest.fail("the model loaded before --out was checked"))
    if Path("/sys/kernel").is_dir():
        _one_line_error(capsys, ["analyze", "--out", "/sys/selfrepair-run"], "/sys/selfrepair-run")
    f = tmp_path / "file"
    f.write_text("x")
    _one_line_error(capsys, ["analyze", "--out", str(f)], "not a folder")
    _one_line_error(capsys, ["analyze", "--out", str(f / "sub")], str(f / "sub"))
    ro = tmp_path / "ro"
    _mount_tmpfs(ro, "size=200k,ro")
    try:
        _one_line_error(capsys, ["analyze", "--out", str(ro / "run")], str(ro / "run"), "Read-only file system")
        _one_line_error(capsys, ["analyze", "--out", str(ro)], str(ro), "Read-only file system")
    finally:
        _umount(ro)


def test_full_disk_is_one_line_and_the_run_resumes(tmp_path, capsys, shipped):
    disk = tmp_path / "disk"
    _mount_tmpfs(disk, "size=200k")
    try:
        out = disk / "run"
        args = ["analyze", *SMALL, "--out", str(out)]
        err = _one_line_error(capsys, args, "No space left on device", str(out), "--resume")
        assert (out / "run.json").is_file() and not (out / "summary.json").exists()
        assert not list(out.rglob(".*.tmp")), "a temporary file was left on the full disk"
        subprocess.run(["mount", "-o", "remount,size=64m", str(disk)], check=True)
        assert cli.main([*args, "--resume"]) == 0, capsys.readouterr().err
        s = json.loads((out / "summary.json").read_text())
        assert s["settings"]["k"] == 2 and (out / "tables" / "groups.parquet").is_file(), err
    finally:
        _umount(disk)


def test_injected_write_error_is_one_line_and_the_run_resumes(tmp_path, capsys, monkeypatch, shipped):
    real = rundir.atomic_write

    def failing(path, write):  # the disk fills up when the head ranking's table is written
        if Path(path).name == "heads.parquet":
            def enospc(tmp):
                raise OSError(errno.ENOSPC, "No space left on device")  # as the OS says it: no file name
            return real(path, enospc)
        return real(path, write)

    monkeypatch.setattr(rundir, "atomic_write", failing)
    out = tmp_path / "run"
    args = ["analyze", *SMALL, "--out", str(out)]
    _one_line_error(capsys, args, str(out / "tables" / "heads.parquet"), "No space left on device",
                    "run the same command with --resume")
    assert (out / "tables" / "groups.parquet").is_file() and not (out / "tables" / "heads.parquet").exists()
    monkeypatch.setattr(rundir, "atomic_write", real)
    assert cli.main([*args, "--resume"]) == 0, capsys.readouterr().err
    s = json.loads((out / "summary.json").read_text())
    assert "self-repair analysis + estimates" in s["resumed_stages"] and "head attributions" not in s["resumed_stages"]


# ----------------------------------------------------------------------------- 12.4 damaged files


def test_damaged_files_are_named_and_never_trusted(tmp_path, capsys, shipped):
    out = tmp_path / "run"
    args = ["analyze", *SMALL, "--out", str(out)]
    assert cli.main(args) == 0, capsys.readouterr().err
    capsys.readouterr()
    ref = {p.stem: pd.read_parquet(p) for p in (out / "tables").glob("*.parquet")}
    # an interrupted run (no summary, no finished result) whose checkpoint batch was cut short by a crash
    (out / "summary.json").unlink()
    (out / "checkpoints" / "self_repair_result.parquet").unlink()
    for t in ("groups", "heads"):
        (out / "tables" / f"{t}.parquet").unlink()
    batch = sorted((out / "checkpoints" / "self_repair").glob("batch_*.parquet"))[0]
    batch.write_bytes(batch.read_bytes()[: batch.stat().st_size // 2])
    with pytest.warns(UserWarning, match=f"checkpoint batch {batch}.*recomputing"):
        assert cli.main([*args, "--resume"]) == 0, capsys.readouterr().err
    s = json.loads((out / "summary.json").read_text())
    assert s["analysis_meta"]["n_batches_resumed"] == s["analysis_meta"]["n_batches"] - 1
    for name, want in ref.items():  # recomputed, not trusted: the same tables as the undamaged run
        pd.testing.assert_frame_equal(pd.read_parquet(out / "tables" / f"{name}.parquet"), want, check_exact=False,
                                      rtol=1e-7, atol=1e-10, obj=name)
    # a damaged run.json: named, with what to do
    (out / "summary.json").unlink()
    rj = out / "run.json"
    rj.write_text(rj.read_text()[:100])
    _one_line_error(capsys, [*args, "--resume"], str(rj), "damaged", "--force")
    # a damaged checkpoint identity: named
    (out / "run.json").unlink()
    ident = out / "checkpoints" / "self_repair" / "run.json"
    ident.write_text(ident.read_text()[:50])
    from selfrepair import analyze_self_repair, load_model, tasks

    m = load_model()
    task = tasks.load("induction", m, n=2, seq_len=31)
    with pytest.raises(ValueError, match=f"checkpoint identity {ident} is damaged"):
        analyze_self_repair(m, task, layers=[0], checkpoint_dir=ident.parent, progress=False)


def test_batches_without_identity_are_recomputed(tmp_path, shipped):
    from selfrepair import analyze_self_repair, load_model, tasks

    m = load_model()
    task = tasks.load("induction", m, n=2, seq_len=31)
    kw = dict(layers=[0], batch_size=1, progress=False, min_contribution=0.5)
    ck = tmp_path / "ck"
    ref = analyze_self_repair(m, task, checkpoint_dir=ck, **kw)
    (ck / "run.json").unlink()  # batches whose settings are unknown
    with pytest.warns(UserWarning, match="no run.json"):
        again = analyze_self_repair(m, task, checkpoint_dir=ck, **kw)
    assert again.meta["n_batches_resumed"] == 0
    pd.testing.assert_frame_equal(again.groups, ref.groups)


# ----------------------------------------------------------------------------- 12.5 one task check everywhere


def _bad_task(model, which):
    from selfrepair.tasks import Task

    d_vocab = model.cfg.d_vocab
    toks = torch.randint(1, d_vocab, (3, 12), generator=torch.Generator().manual_seed(0))
    ans, wr = torch.tensor([1, 2, 3]), torch.tensor([4, 5, 6])
    if which == "answer":
        ans[1] = d_vocab + 5
    elif which == "wrong":
        wr[2] = d_vocab
    else:
        toks[1, 4] = d_vocab + 1
    return Task(toks, ans, wr, metric="logit_diff", name="bad")


ENTRY_POINTS = ["analyze_self_repair", "cached_run", "explain", "head_attributions", "faithfulness",
                "compare_estimates", "measure_z_edits"]


def _call(name, model, task):
    import selfrepair
    from selfrepair.engine.cache import cached_run
    from selfrepair.engine.edits import ZEdits, measure_z_edits

    if name == "cached_run":
        return cached_run(model, task)
    if name == "explain":
        return selfrepair.explain(model, task, method="grad", progress=False)
    if name == "faithfulness":
        return selfrepair.faithfulness(model, task, torch.zeros(task.tokens.shape), progress=False)
    if name == "compare_estimates":
        return selfrepair.compare_estimates(model, task, None, progress=False)
    if name == "measure_z_edits":
        d_head = model.cfg.d_head
        e = ZEdits(prompt=[0], layer=[0], head=[0], start=[1], delta=torch.zeros(1, 1, d_head))
        return measure_z_edits(model, task, e, progress=False)
    fn = getattr(selfrepair, name)
    return fn(model, task, progress=False)


@pytest.mark.parametrize("name", ENTRY_POINTS)
def test_every_entry_point_validates_the_task_first(name, gpt2_bridge, monkeypatch):
    from selfrepair.tasks import Task, TaskError

    model = gpt2_bridge
    calls = []
    real = Task.validate
    monkeypatch.setattr(Task, "validate", lambda self, m: (calls.append(1), real(self, m))[1])

    def no_forward(module, args):  # a forward of the task's prompts (3 x 12) before the check
        if args and torch.is_tensor(args[0]) and tuple(args[0].shape[:2]) == (3, 12):
            raise AssertionError("a forward pass of the task ran before the task was validated")

    h = model.register_forward_pre_hook(no_forward)
    try:
        for which, pattern in (("answer", rf"prompt 1: answer id {model.cfg.d_vocab + 5} is outside"),
                               ("wrong", rf"prompt 2: wrong id {model.cfg.d_vocab} is outside"),
                               ("token", rf"prompt 1: token id {model.cfg.d_vocab + 1} at position 4")):
            calls.clear()
            with pytest.raises(TaskError, match=pattern):
                _call(name, model, _bad_task(model, which))
            assert len(calls) == 1, f"{name} checked the task {len(calls)} times before failing"
    finally:
        h.remove()


# ----------------------------------------------------------------------------- 12.12 no machine paths


def _machine_paths() -> list[str]:
    home = str(Path.home())
    return [s for s in ("/work/", str(ROOT), home + "/" if len(home) > 1 else None) if s]


def _committed_outputs() -> list[Path]:
    try:
        names = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
        files = [ROOT / n for n in names]
    except (OSError, subprocess.CalledProcessError):  # not a git checkout: the folders of committed outputs
        files = [p for d in ("notebooks", "figures", "docs", "benchmarks") for p in (ROOT / d).rglob("*")]
        files += [ROOT / "README.md"]
    keep = [p for p in files if p.is_file() and (p.suffix in (".ipynb", ".html", ".json", ".md", ".csv", ".txt")
                                                 or "summary" in p.name) and "tests" not in p.relative_to(ROOT).parts]
    return keep


def test_no_machine_path_in_committed_outputs():
    files = _committed_outputs()
    assert any(p.suffix == ".ipynb" for p in files) and any(p.suffix == ".html" for p in files)
    bad = [(str(p.relative_to(ROOT)), s) for p in files for s in _machine_paths()
           if s in p.read_text(errors="replace")]
    assert not bad, f"committed outputs name paths of the machine that made them: {bad}"


def test_shipped_model_is_named_default(default_model, tmp_path):
    from selfrepair import analyze_self_repair, tasks

    assert default_model.cfg.model_name == "default"
    info = pipeline.model_info(default_model, None)
    assert info["spec"] == "default" and info["path"] == "default"
    res = analyze_self_repair(default_model, tasks.load("induction", default_model, n=2, seq_len=31), layers=[0],
                              progress=False)
    assert res.meta["model_name"] == "default" and "model 'default'" in repr(res)
    text = json.dumps(res.meta) + repr(res)
    assert not [s for s in _machine_paths() + [str(DEFAULT_MODEL_DIR)] if s in text]
