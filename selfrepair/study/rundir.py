"""The run folder: creating, refusing, clearing and resuming it; its tables and JSON files (written atomically).

A run folder holds ``run.json`` (the settings, written first), ``checkpoints/``, ``tables/``, ``figures/``
and, last, ``summary.json``: a folder with ``summary.json`` is finished; one without it continues with
``--resume`` when its identity (``study_key``) matches.

One process owns a run folder at a time: :class:`RunLock` holds an OS lock (``fcntl.flock``) on
``<run>/.lock``, which the kernel releases when the process ends in any way (SIGKILL included); a second
process is refused with one line naming the owner. :func:`open_run_dir` creates (default names by an
exclusive ``mkdir``, so two runs never share one) and locks the folder before the model loads, which also
proves it writable. Clean-up (:func:`remove_run_files`) removes only the files a run writes, by name, and
folders only when empty.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import platform
import re
import socket
import time
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd

from .._io import atomic_write
from ..analysis.identity import identity_changes, versions as package_versions
from ..analysis.results import RENAMED_SETTINGS, canonical_settings, canonical_table

__all__ = ["CLIError", "RunInUse", "RunLock", "RunDir", "open_run_dir", "attach_run_dir", "remove_run_files", "LOCK_NAME", "settings_hash",
           "accepted_hashes",
           "write_json", "jsonable", "write_table", "read_table", "versions", "default_out",
           "prepare_run_dir", "clear_run_dir", "study_key", "resume_mismatch", "read_run_json", "RUN_FILES", "has_partial_results", "file_sha256"]


class CLIError(Exception):
    """A user error: printed as one line, exit status 2."""


def write_json(path: Path, obj) -> Path:
    return atomic_write(path, lambda t: t.write_text(json.dumps(jsonable(obj), indent=1) + "\n"))


def jsonable(o):
    if isinstance(o, dict):
        return {str(k): jsonable(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [jsonable(v) for v in o]
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating, float)):
        f = float(o)
        return f if np.isfinite(f) else None
    if isinstance(o, np.ndarray):
        return jsonable(o.tolist())
    if isinstance(o, np.bool_):
        return bool(o)
    if isinstance(o, Path):
        return str(o)
    if o is None or isinstance(o, (bool, int, str)):
        return o
    return str(o)


def _csv_safe(df):
    """Tuple / list / array cells as text for CSV (Parquet keeps them as lists)."""
    out = df.copy()
    for c in out.columns:
        if out[c].dtype == object and len(out) and isinstance(out[c].iloc[0], (tuple, list, np.ndarray)):
            out[c] = [json.dumps([jsonable(x) for x in v]) if v is not None else "" for v in out[c]]
    return out


def write_table(tables_dir: Path, name: str, df) -> list[Path]:
    """``tables/name.parquet`` and ``tables/name.csv``, each written atomically."""
    pq = atomic_write(tables_dir / f"{name}.parquet", lambda t: df.to_parquet(t, index=False))
    csv = atomic_write(tables_dir / f"{name}.csv", lambda t: _csv_safe(df).to_csv(t, index=False))
    return [pq, csv]


def read_table(tables_dir: Path, name: str):
    df = pd.read_parquet(tables_dir / f"{name}.parquet")
    for c in df.columns:  # list columns come back as numpy arrays: make them tuples again (nested ones too)
        if df[c].dtype == object and len(df) and isinstance(df[c].iloc[0], np.ndarray):
            df[c] = [_tuples(v) for v in df[c]]
    return canonical_table(df)  # a table written before a column rename: the new names


def _tuples(v):
    """A (nested) numpy array of a Parquet list column as (nested) tuples of Python scalars."""
    if isinstance(v, np.ndarray):
        return tuple(_tuples(x) for x in v) if v.dtype == object else tuple(v.tolist())
    return v


def versions() -> dict:
    return {"python": platform.python_version(),
            **package_versions(("selfrepair", "torch", "transformer_lens", "transformers", "plotly", "kaleido", "pandas",
                         "numpy", "pyarrow"))}


def default_out(task_label: str, root: Path = Path("runs")) -> Path:
    """A new, empty folder ``root/<YYYYMMDD-HHMMSS>-<task>`` (``-2``, ``-3``, ... when taken), created here.

    Each name is claimed with an exclusive ``mkdir`` (``exist_ok=False``), so two processes started in the same
    second never get the same folder.
    """
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = f"{stamp}-{task_label}"
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CLIError(f"cannot create the run folder under {root}: {_cause(e)}; choose a writable --out") from e
    for i in range(1, 10_000):
        out = root / (base if i == 1 else f"{base}-{i}")
        try:
            out.mkdir(exist_ok=False)
            return out
        except FileExistsError:
            continue
        except OSError as e:
            raise CLIError(f"cannot create the run folder {out}: {_cause(e)}; choose a writable --out") from e
    raise CLIError(f"no free run folder name {root / base}-N; choose --out")  # pragma: no cover


def _cause(e: BaseException) -> str:
    """``strerror`` of an OSError (``No space left on device``), else its first line."""
    s = getattr(e, "strerror", None)
    if s:
        return s
    msg = str(e).strip().splitlines()
    return msg[0] if msg else type(e).__name__


LOCK_NAME = ".lock"


class RunInUse(CLIError):
    """The run folder is locked by another live process."""


class RunLock:
    """An exclusive ``fcntl.flock`` on ``<run>/.lock``, which holds the owner's pid, host and start time.

    The lock belongs to the open file: the kernel drops it when this process ends in any way (SIGKILL
    included), so a stale ``.lock`` file never blocks a later run. ``release()`` closes it.
    """

    def __init__(self, run: Path, fd: int, owner: dict, created: bool = False):
        self.run, self.fd, self.owner = run, fd, owner
        self.created = created  # this process made the .lock file (a refused folder gets it removed)

    @classmethod
    def acquire(cls, run: Path) -> "RunLock":
        """Lock ``run`` (an existing folder) or raise :class:`RunInUse` naming the owner; ``CLIError`` when the
        folder is not writable."""
        path = run / LOCK_NAME
        for _ in range(20):
            existed = path.exists()
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
            except OSError as e:
                raise CLIError(f"cannot write to the run folder {run}: {_cause(e)}; choose a writable --out") from e
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                owner = _read_owner(fd)
                os.close(fd)
                if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise CLIError(f"cannot lock the run folder {run}: {_cause(e)}") from e
                raise RunInUse(f"{run} is in use by another selfrepair run ({describe_owner(owner)}); wait for it "
                               "to finish or choose another --out") from None
            try:  # the file we locked must still be the folder's .lock (a failed run may have removed it meanwhile)
                same = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                if not run.is_dir():
                    raise CLIError(f"the run folder {run} was removed while this run started; run the command again")
                continue
            owner = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
            try:
                os.ftruncate(fd, 0)
                os.write(fd, (json.dumps(owner) + "\n").encode())
            except OSError as e:
                os.close(fd)
                raise CLIError(f"cannot write to the run folder {run}: {_cause(e)}; choose a writable --out") from e
            return cls(run, fd, owner, created=not existed)
        raise CLIError(f"cannot lock the run folder {run}: it keeps being replaced")  # pragma: no cover

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the file drops the flock
            self.fd = None


def _read_owner(fd: int) -> dict:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        return json.loads(os.read(fd, 4096).decode() or "{}")
    except (OSError, ValueError):
        return {}


def describe_owner(owner: dict) -> str:
    if not owner.get("pid"):
        return "its owner is just starting"
    return f"pid {owner['pid']} on {owner.get('host', '?')} since {owner.get('since', '?')}"


class RunDir:
    """A run folder this process has locked; ``created`` lists the folders it made (outermost first)."""

    def __init__(self, path: Path, lock: RunLock, created: list[Path]):
        self.path, self.lock, self.created = path, lock, created

    def cleanup(self) -> None:
        """Remove what this run wrote (by name: :func:`remove_run_files`) and the folders it created when they are
        empty; anything else stays. Releases the lock."""
        remove_run_files(self.path, lock=True)
        self.lock.release()
        for d in reversed(self.created):
            try:
                d.rmdir()
            except OSError:
                break  # not empty (someone else's files) or gone: leave it and its parents

    def release(self) -> None:
        self.lock.release()

    def refuse(self) -> None:
        """This process will not run here: remove the folders it created, or else the ``.lock`` it added."""
        if self.created:
            self.cleanup()
            return
        if self.lock.created:
            (self.path / LOCK_NAME).unlink(missing_ok=True)
        self.lock.release()


class _SharedLock:
    """No lock: a torchrun rank other than 0 works inside the folder rank 0 owns (its own shard folder)."""

    created = False

    def release(self) -> None:
        pass


def attach_run_dir(out: Path) -> RunDir:
    """The run folder ``out`` for a torchrun rank other than 0: neither created nor locked here (rank 0 creates
    and locks it; every other rank writes only into its own ``checkpoints/shards/rank{r}-of-{W}``, after
    rank 0 has written run.json)."""
    return RunDir(Path(out), _SharedLock(), [])


def open_run_dir(out: Optional[Path], task_label: str) -> RunDir:
    """Create (when missing) and lock the run folder ``out``, or a new default folder under ``runs/`` when
    ``out`` is None. Runs before the model loads: an unwritable folder is one ``CLIError`` line at once."""
    created: list[Path] = []
    if out is None:
        out = default_out(task_label)
        created.append(out)
    else:
        missing = [p for p in [out, *out.parents] if not p.exists()]
        if out.exists() and not out.is_dir():
            raise CLIError(f"--out {out} exists and is not a folder")
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise CLIError(f"cannot create --out {out}: {_cause(e)}; choose a writable folder") from e
        created += sorted(missing, key=lambda p: len(p.parts))
    try:
        lock = RunLock.acquire(out)
    except CLIError:
        for d in reversed(created):
            try:
                d.rmdir()
            except OSError:
                break
        raise
    return RunDir(out, lock, created)


def prepare_run_dir(out: Path, *, resume: bool, force: bool) -> str:
    """Decide what to do with ``out``: 'new', 'resume' or 'overwrite' (raises CLIError to refuse)."""
    if not out.exists():
        if resume:
            raise CLIError(f"--resume: there is no run to continue at {out}")
        return "new"
    if not out.is_dir():
        raise CLIError(f"--out {out} exists and is not a folder")
    entries = [e for e in out.iterdir() if e.name != LOCK_NAME]
    ours = (out / "run.json").is_file()
    finished = (out / "summary.json").is_file()
    if not entries:
        if resume:
            raise CLIError(f"--resume: {out} is empty; there is no run to continue")
        return "new"
    if not ours:
        raise CLIError(f"--out {out} is a non-empty folder that holds no selfrepair run (no run.json); "
                       "choose a new or empty folder")
    if force:
        return "overwrite"
    if finished:
        raise CLIError(f"{out} already holds a finished run (summary.json); pass --force to overwrite it or "
                       "choose another --out")
    if not resume:
        raise CLIError(f"{out} holds an unfinished run; pass --resume to continue it or --force to start over")
    return "resume"


#: the files a selfrepair run writes, by folder (regular expressions on the file name); temporary files of
#: ``atomic_write`` (``.<name>.<random>.tmp``) are matched everywhere
RUN_FILES = {
    ".": r"run\.json|summary\.json|report\.html",
    "tables": r"[a-z0-9_]+\.(parquet|csv)|\.stage-[a-z0-9_-]+\.json",
    "figures": r"\d\d_[a-z0-9_]+\.(html|png)|plotly\.min\.js",
    "checkpoints": r"self_repair_result\.parquet|\.self_repair_result\.stage\.json",
    "checkpoints/self_repair": r"run\.json|batch_\d+_\d+\.parquet",
}
_TMP = r"\..+\.tmp"


def remove_run_files(out: Path, *, lock: bool = False) -> None:
    """Remove the files a selfrepair run writes in ``out`` (:data:`RUN_FILES`, by name; ``.lock`` too when ``lock``),
    then its subfolders when empty. Files of any other name, and folders holding them, stay."""
    for sub, pattern in RUN_FILES.items():
        d = out / sub
        if not d.is_dir():
            continue
        for p in d.iterdir():
            if p.is_file() and (re.fullmatch(pattern, p.name) or re.fullmatch(_TMP, p.name)):
                p.unlink(missing_ok=True)
    for sub in ("figures", "tables", "checkpoints/self_repair", "checkpoints"):
        try:
            (out / sub).rmdir()
        except OSError:
            pass  # missing, or holds files that are not ours
    if lock:
        (out / LOCK_NAME).unlink(missing_ok=True)


def clear_run_dir(out: Path) -> None:
    """``--force``: remove what a selfrepair run writes in ``out`` (only our own files, by name; see
    :func:`remove_run_files`); the folder and the lock stay."""
    remove_run_files(out)


def settings_hash(key: dict) -> str:
    """sha256 of a JSON-able identity (sorted keys): what a stage's tables were computed with."""
    return hashlib.sha256(json.dumps(jsonable(key), sort_keys=True).encode()).hexdigest()


def accepted_hashes(key: dict) -> set:
    """The stage-stamp hashes that mean "made with ``key``": ``settings_hash(key)``, and the hash of the same key
    with its settings under their names before a rename (a run folder written then resumes without recomputing)."""
    s = key.get("settings") if isinstance(key, dict) else None
    hashes = {settings_hash(key)}
    if isinstance(s, dict) and any(new in s for new in RENAMED_SETTINGS.values()):
        back = {new: old for old, new in RENAMED_SETTINGS.items()}
        hashes.add(settings_hash(dict(key, settings={back.get(k, k): v for k, v in s.items()})))
    return hashes


def read_run_json(path: Path, hint: Optional[str] = None) -> dict:
    """A run's ``run.json`` (or ``summary.json``), its ``settings`` under their current names
    (``analysis.results.canonical_settings``); a damaged file is a ``CLIError`` naming it and ``hint`` (what to
    do; by default: ``--force`` to start over)."""
    try:
        obj = json.loads(path.read_text())
        if not isinstance(obj, dict):
            raise ValueError("not a JSON object")
        if isinstance(obj.get("settings"), dict):
            obj["settings"] = canonical_settings(obj["settings"])
        return obj
    except (ValueError, UnicodeDecodeError) as e:
        hint = hint or (f"the run in {path.parent} cannot be continued: pass --force to start it over "
                        "(or choose another --out)")
        raise CLIError(f"{path} is damaged ({_cause(e)}); {hint}") from e


def study_key(run: dict) -> dict:
    """What must match for --resume to continue a run (settings that change the results)."""
    s = dict(run["settings"])
    s.pop("progress", None)
    s.pop("checkpoint_dir", None)
    return {"settings": s, "task": run["task"], "model": run["model"]["spec"], "seed": run["seed"],
            "head_ablation": run["head_ablation"], "attribution_n": run.get("attribution_n"), "device": run["device"]}


def resume_mismatch(old_run: dict, new_run: dict) -> str:
    """What differs between an interrupted run's ``run.json`` and the one asked for, as ``"k: 2 -> 3, seed: 0 -> 1"``
    (empty when ``--resume`` may continue it)."""
    changes = identity_changes(study_key(old_run), study_key(jsonable(new_run)))
    return ", ".join(f"{name.removeprefix('settings.')}: {a!r} -> {b!r}" for name, a, b in changes)


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def has_partial_results(out: Path) -> bool:
    ck = out / "checkpoints"
    return (ck.is_dir() and any(ck.rglob("*.parquet"))) or ((out / "tables").is_dir() and any((out / "tables").iterdir()))
