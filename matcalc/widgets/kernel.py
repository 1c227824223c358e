"""Where the code runs: inside a Jupyter kernel or not, and which cell execution (no ipywidgets import)."""

from __future__ import annotations


def in_kernel() -> bool:
    """True inside a Jupyter kernel (where widgets and rich outputs render)."""
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    ip = get_ipython()
    return ip is not None and getattr(ip, "kernel", None) is not None


def execution_count() -> int | None:
    """The IPython execution count (the cell being run), ``None`` outside IPython."""
    try:
        from IPython import get_ipython
    except ImportError:
        return None
    ip = get_ipython()
    return None if ip is None else getattr(ip, "execution_count", None)


__all__ = ["execution_count", "in_kernel"]
