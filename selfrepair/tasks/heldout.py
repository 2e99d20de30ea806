"""The held-out standard-library files: never trained on, the text the code-copy task cuts its windows from."""

from __future__ import annotations

from pathlib import Path

__all__ = ["HELDOUT_DIR", "HELDOUT_FILES", "heldout_text"]


HELDOUT_DIR = Path(__file__).resolve().parents[1] / "data" / "heldout"
HELDOUT_FILES = sorted(p.name[: -len(".txt")] for p in HELDOUT_DIR.glob("*.py.txt"))


def heldout_text() -> dict[str, str]:
    """The held-out standard-library files shipped in the package (never trained on)."""
    return {p.name[: -len(".txt")]: p.read_text(encoding="utf-8") for p in sorted(HELDOUT_DIR.glob("*.py.txt"))}
