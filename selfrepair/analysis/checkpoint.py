"""Per-batch checkpoints of ``analyze_self_repair``: one Parquet file per batch, the run's identity in ``run.json``."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Optional

import pandas as pd

from .._io import atomic_write
from .identity import identity_diff
from .results import RESULT_FORMAT, canonical_settings, json_default, read_parquet_table, write_parquet_table

__all__ = ["BatchCheckpoint"]


def _first_line(e: BaseException) -> str:
    msg = str(e).strip().splitlines()
    return msg[0] if msg else type(e).__name__


class BatchCheckpoint:
    """Per-batch result files in a directory, written atomically; a run's identity in ``run.json``.

    A damaged ``run.json`` is an error naming it; batch files found without a ``run.json`` (whose identity
    is unknown) and batch files that cannot be read are recomputed with a warning, never trusted.
    """

    def __init__(self, d: Path, settings: dict, mhash: str, thash: str):
        self.dir = d
        d.mkdir(parents=True, exist_ok=True)
        ident = {"format": RESULT_FORMAT, "settings": settings, "model_hash": mhash, "task_hash": thash}
        f = d / "run.json"
        self.trusted = True
        if f.exists():
            try:
                old = json.loads(f.read_text())
            except (ValueError, UnicodeDecodeError) as e:
                raise ValueError(f"checkpoint identity {f} is damaged ({_first_line(e)}); its batches cannot be "
                                 f"trusted: remove the folder {d} (they are recomputed) or use another "
                                 "checkpoint_dir (selfrepair analyze: --force starts the run over).") from e
            if isinstance(old, dict) and isinstance(old.get("settings"), dict):  # written before a rename
                old["settings"] = canonical_settings(old["settings"])
            if old != json.loads(json.dumps(ident)):
                what = identity_diff(old, ident)
                raise ValueError(
                    f"checkpoint_dir {d} holds a run with different {', '.join(what) or 'identity'}; "
                    "resume with the same settings, model and task, or use a new (or emptied) directory.")
        else:
            stray = sorted(d.glob("batch_*.parquet"))
            if stray:
                self.trusted = False
                warnings.warn(f"checkpoint_dir {d} holds {len(stray)} batch file(s) but no run.json: their settings "
                              "are unknown, so they are recomputed, not reused.", stacklevel=3)
            atomic_write(f, lambda tmp: tmp.write_text(json.dumps(ident, indent=1, default=json_default)))

    def path(self, s: int, e: int) -> Path:
        return self.dir / f"batch_{s:08d}_{e:08d}.parquet"

    def load(self, s: int, e: int) -> Optional[pd.DataFrame]:
        p = self.path(s, e)
        if not p.exists() or not self.trusted:
            return None
        try:
            df, _ = read_parquet_table(p)
        except Exception as err:  # truncated by a crash, or not ours: never trusted, recomputed
            warnings.warn(f"checkpoint batch {p} cannot be read ({_first_line(err)}); recomputing that batch.",
                          stacklevel=2)
            return None
        return df

    def save(self, s: int, e: int, df: pd.DataFrame) -> None:
        write_parquet_table(df, {"batch": [s, e]}, self.path(s, e))
