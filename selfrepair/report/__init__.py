"""Report: figures drawn from tables (``figures``; never runs a model)."""

from . import figures

__all__ = ["figures"]
