"""Per-batch checkpoints of ``analyze_self_repair``: one Parquet file per batch, the run's identity in ``run.json``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import pandas as pd

from .._io import atomic_write
from .identity import identity_diff
from .results import RESULT_FORMAT, json_default, read_parquet_table, write_parquet_table

__all__ = ["BatchCheckpoint"]


class BatchCheckpoint:
    """Per-batch result files in a directory, written atomically; a run's identity in ``run.json``."""

    def __init__(self, d: Path, settings: dict, mhash: str, thash: str):
        self.dir = d
        d.mkdir(parents=True, exist_ok=True)
        ident = {"format": RESULT_FORMAT, "settings": settings, "model_hash": mhash, "task_hash": thash}
        f = d / "run.json"
        if f.exists():
            old = json.loads(f.read_text())
            if old != json.loads(json.dumps(ident)):
                what = identity_diff(old, ident)
                raise ValueError(
                    f"checkpoint_dir {d} holds a run with different {', '.join(what) or 'identity'}; "
                    "resume with the same settings, model and task, or use a new (or emptied) directory.")
        else:
            atomic_write(f, lambda tmp: tmp.write_text(json.dumps(ident, indent=1, default=json_default)))

    def path(self, s: int, e: int) -> Path:
        return self.dir / f"batch_{s:08d}_{e:08d}.parquet"

    def load(self, s: int, e: int) -> Optional[pd.DataFrame]:
        p = self.path(s, e)
        if not p.exists():
            return None
        df, _ = read_parquet_table(p)
        return df

    def save(self, s: int, e: int, df: pd.DataFrame) -> None:
        write_parquet_table(df, {"batch": [s, e]}, self.path(s, e))
