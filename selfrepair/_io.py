"""Atomic file writes: a reader (or a resumed run) never sees a half-written file."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable, Union

__all__ = ["atomic_write"]


def atomic_write(path: Union[str, Path], write: Callable[[Path], object]) -> Path:
    """``write(tmp_path)`` to a temporary name beside ``path``, then rename it onto ``path`` (mode as umask says).

    A reader never sees a half-written file; results, checkpoints, tables, JSON and figures are written this way.
    Any ``OSError`` (a full disk, a read-only folder; also pyarrow's, which name no file) is raised as an
    ``OSError`` whose ``filename`` is ``path`` and whose ``strerror`` says the cause; ``path`` is then unchanged.
    """
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        tmp = Path(name)
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except OSError as e:
        lines = str(e).strip().splitlines()
        raise OSError(e.errno, e.strerror or (lines[0] if lines else type(e).__name__), str(path)) from e
    finally:
        if tmp is not None and tmp.exists():
            tmp.unlink()
    return path
