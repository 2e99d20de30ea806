"""TL 3.x compatibility suite: runs only where ``transformer_lens.HookedTransformer`` exists.

TL 4 removed ``HookedTransformer`` (accessing it raises ImportError), so in the
main environment every file here is ignored; ``.ci/tl3.sh`` builds ``.tl3venv``
with transformer-lens 3.x and runs ``pytest tests/tl3``.
"""


def _has_hooked_transformer() -> bool:
    try:
        from transformer_lens import HookedTransformer  # noqa: F401
    except Exception:
        return False
    return True


HAS_TL3 = _has_hooked_transformer()
collect_ignore_glob = [] if HAS_TL3 else ["test_*.py"]
