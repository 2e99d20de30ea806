"""The run folder: creating, refusing, clearing and resuming it; its tables and JSON files (written atomically).

A run folder holds ``run.json`` (the settings, written first), ``checkpoints/``, ``tables/``, ``figures/``
and, last, ``summary.json``: a folder with ``summary.json`` is finished; one without it continues with
``--resume`` when its identity (``study_key``) matches.
"""

from __future__ import annotations

import hashlib
import json
import platform
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd

from .._io import atomic_write
from ..analysis.identity import identity_changes, versions as package_versions

__all__ = ["CLIError", "write_json", "jsonable", "write_table", "read_table", "versions", "default_out",
           "prepare_run_dir", "clear_run_dir", "study_key", "resume_mismatch", "has_partial_results", "file_sha256"]


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
    for c in df.columns:  # list columns come back as numpy arrays: make them tuples again
        if df[c].dtype == object and len(df) and isinstance(df[c].iloc[0], np.ndarray):
            df[c] = [tuple(v.tolist()) for v in df[c]]
    return df


def versions() -> dict:
    return {"python": platform.python_version(),
            **package_versions(("selfrepair", "torch", "transformer_lens", "transformers", "plotly", "kaleido", "pandas",
                         "numpy", "pyarrow"))}


def default_out(task_label: str) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = Path("runs") / f"{stamp}-{task_label}"
    out, i = base, 1
    while out.exists():
        i += 1
        out = base.with_name(f"{base.name}-{i}")
    return out


def prepare_run_dir(out: Path, *, resume: bool, force: bool) -> str:
    """Decide what to do with ``out``: 'new', 'resume' or 'overwrite' (raises CLIError to refuse)."""
    if not out.exists():
        if resume:
            raise CLIError(f"--resume: there is no run to continue at {out}")
        return "new"
    if not out.is_dir():
        raise CLIError(f"--out {out} exists and is not a folder")
    entries = [e for e in out.iterdir()]
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


def clear_run_dir(out: Path) -> None:
    """Remove what a selfrepair run writes in ``out`` (only our own files and folders)."""
    for name in ("summary.json", "run.json"):
        (out / name).unlink(missing_ok=True)
    for name in ("tables", "figures", "checkpoints"):
        if (out / name).is_dir():
            shutil.rmtree(out / name)


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
