"""The one result convention of the analyses: ``.to_frame()``, ``.save(path)`` / ``.load(path)``, ``.settings``.

* ``TableResult``: a result that is one table. It IS a DataFrame (code that indexed the old DataFrame
  keeps working) and carries ``settings``; ``HeadAttributions`` and ``Faithfulness`` are tables.
* ``TokenAttributions``: ``explain``'s ``[batch, pos]`` attributions. It IS a tensor (indexing, arithmetic
  and ``torch.testing`` work as before; results of operations are plain tensors), ``.tensor`` / ``.values``
  give the plain tensor.
* ``EstimateComparison`` (``analysis.estimates``) and ``SelfRepairResult`` (``analysis.results``) hold
  several tables and follow the same convention.

Every ``save`` writes one Parquet file atomically, the settings (and the kind of result) in its footer
under the key ``selfrepair``; ``load`` gives back an equal object (exact round trip, tested).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional, Union

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from .._io import atomic_write
from .._typing import Float, Tensor
from .results import json_default

__all__ = ["TableResult", "HeadAttributions", "Faithfulness", "TokenAttributions", "write_frames", "read_frames"]

KEY = b"selfrepair"


def write_frames(path: Union[str, os.PathLike], frames: dict, info: dict) -> Path:
    """Several DataFrames in one Parquet file (a ``_table`` column names each row's table); ``info`` in the footer."""
    parts, layout = [], {}
    for name, df in frames.items():
        layout[name] = list(map(str, df.columns))
        t = pa.Table.from_pandas(df.reset_index(drop=True), preserve_index=False)
        parts.append((name, t))
    tables = []
    for name, t in parts:  # one file: columns are prefixed by the table name, rows padded with nulls
        cols = {f"{name}/{c}": t.column(c) for c in t.column_names}
        tables.append(pa.table(cols))
    merged = pa.concat_tables(tables, promote_options="default") if tables else pa.table({})
    meta = dict(merged.schema.metadata or {})
    meta[KEY] = json.dumps({**info, "tables": layout, "rows": {n: len(f) for n, f in frames.items()}},
                           default=json_default, allow_nan=True).encode()
    merged = merged.replace_schema_metadata(meta)
    return atomic_write(Path(path), lambda tmp: pq.write_table(merged, tmp))


def read_frames(path: Union[str, os.PathLike], kind: str) -> tuple:
    """``({name: DataFrame}, info)`` of a file written by ``write_frames`` for a result of ``kind``."""
    table = pq.read_table(path)
    raw = (table.schema.metadata or {}).get(KEY)
    info = json.loads(raw) if raw else {}
    if info.get("kind") != kind:
        raise ValueError(f"{path} holds no {kind} (it holds {info.get('kind') or 'no selfrepair result'}); "
                         f"load it with the class that saved it.")
    frames, start = {}, 0
    for name, cols in info["tables"].items():
        n = info["rows"][name]
        sub = table.slice(start, n).select([f"{name}/{c}" for c in cols]) if cols else pa.table({})
        sub = sub.rename_columns(cols) if cols else sub
        df = sub.to_pandas() if cols else pd.DataFrame(index=range(n))
        for c in cols:  # list columns (the groups' per-key tuples) come back as tuples, as they were written
            typ = sub.schema.field(c).type
            if pa.types.is_list(typ):
                # pandas' NaN inside a float tuple was written as null (from_pandas): read it back as NaN
                fl = pa.types.is_floating(typ.value_type)
                df[c] = pd.Series([None if v is None else tuple(float("nan") if fl and x is None else x for x in v)
                                   for v in sub.column(c).to_pylist()], dtype=object)
        frames[name] = df
        start += n
    return frames, info


class TableResult(pd.DataFrame):
    """An analysis result that is one table: a DataFrame with the ``settings`` it was made with."""

    _metadata = ["settings"]
    KIND = "table"

    def __init__(self, data=None, *args, settings: Optional[dict] = None, **kwargs):
        super().__init__(data, *args, **kwargs)
        self.settings = dict(settings or {})

    @property
    def _constructor(self):
        return pd.DataFrame  # derived tables (slices, sums) are plain DataFrames

    def to_frame(self) -> pd.DataFrame:
        """The table as a plain DataFrame (a copy)."""
        return pd.DataFrame(self, copy=True)

    def save(self, path: Union[str, os.PathLike]) -> Path:
        """One Parquet file with the table and, in its footer, the settings."""
        return write_frames(path, {"table": self.to_frame()}, {"kind": self.KIND, "settings": self.settings})

    @classmethod
    def load(cls, path: Union[str, os.PathLike]):
        """The result ``save`` wrote (equal table, equal settings)."""
        frames, info = read_frames(path, cls.KIND)
        return cls(frames["table"], settings=info.get("settings", {}))

    def equals_result(self, other) -> bool:
        return isinstance(other, type(self)) and self.settings == other.settings and self.to_frame().equals(other.to_frame())


class HeadAttributions(TableResult):
    """``head_attributions``: one row per (layer, head), or per (prompt, layer, head) with ``per_prompt=True``."""

    KIND = "head_attributions"


class Faithfulness(TableResult):
    """``faithfulness``: comprehensiveness and sufficiency per method and fraction, beside random rankings."""

    KIND = "faithfulness"


class TokenAttributions(torch.Tensor):
    """``explain``: token attributions ``[batch, pos]`` (a tensor) with the ``settings`` they were made with."""

    KIND = "token_attributions"
    __torch_function__ = torch._C._disabled_torch_function_impl  # operations give plain tensors

    @staticmethod
    def __new__(cls, data: Float[Tensor, "batch pos"], settings: Optional[dict] = None):
        t = torch.Tensor._make_subclass(cls, data.detach())
        t.settings = dict(settings or {})
        return t

    def __reduce_ex__(self, proto):  # pickle: the plain tensor and the settings
        return (TokenAttributions, (self.tensor.clone(), self.settings))

    def __deepcopy__(self, memo):
        return TokenAttributions(self.tensor.clone(), dict(self.settings))

    @property
    def tensor(self) -> Float[Tensor, "batch pos"]:
        """The attributions as a plain tensor."""
        return self.as_subclass(torch.Tensor)

    @property
    def values(self) -> Float[Tensor, "batch pos"]:
        """Same as ``tensor``."""
        return self.tensor

    def to_frame(self) -> pd.DataFrame:
        """Long table: ``prompt, position, attribution`` (every position; padding holds 0)."""
        t = self.tensor.cpu()
        B, P = t.shape
        return pd.DataFrame({"prompt": np.repeat(np.arange(B), P), "position": np.tile(np.arange(P), B),
                             "attribution": t.reshape(-1).numpy()})

    def save(self, path: Union[str, os.PathLike]) -> Path:
        """One Parquet file: the long table, with the dtype, shape and settings in its footer."""
        return write_frames(path, {"table": self.to_frame()},
                            {"kind": self.KIND, "settings": self.settings, "dtype": str(self.dtype).replace("torch.", ""),
                             "shape": list(self.shape)})

    @classmethod
    def load(cls, path: Union[str, os.PathLike]) -> "TokenAttributions":
        """The attributions ``save`` wrote (bit for bit, same dtype)."""
        frames, info = read_frames(path, cls.KIND)
        vals = frames["table"]["attribution"].to_numpy()
        t = torch.from_numpy(vals.copy()).to(getattr(torch, info["dtype"])).reshape(info["shape"])
        return cls(t, settings=info.get("settings", {}))
