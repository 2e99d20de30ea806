"""Renamed keywords: the old name keeps working one release, with a DeprecationWarning."""

from __future__ import annotations

import warnings

__all__ = ["renamed_keyword"]


def renamed_keyword(extra: dict, old: str, new: str, value, where: str, *, default=None, stacklevel: int = 4):
    """The value of keyword ``new``, or of the deprecated ``old`` when the caller used that name.

    ``extra``: the call's ``**kwargs`` (only ``old`` may be in it); ``value``: what ``new`` received;
    ``default``: ``new``'s default (giving both names raises); ``stacklevel``: of the warning (3: the caller of
    the function that calls this one).
    """
    unknown = sorted(set(extra) - {old})
    if unknown:
        raise TypeError(f"{where}() got an unexpected keyword argument {unknown[0]!r}")
    if old not in extra:
        return value
    if value is not default and value != default:
        raise TypeError(f"{where}(): give {new}= only ({old}= is its deprecated old name).")
    warnings.warn(f"{where}(): {old}= is deprecated and will be removed in the next release; use {new}= "
                  "(same meaning).", DeprecationWarning, stacklevel=stacklevel)
    return extra[old]
