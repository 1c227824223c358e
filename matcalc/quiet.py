"""Silencing third-party warnings a user cannot act on, inside one block only (never process-wide)."""

from __future__ import annotations

import contextlib
import threading
import warnings
from collections.abc import Iterator

_LOCK = threading.RLock()


@contextlib.contextmanager
def quiet_warnings(*messages: str, category: type[Warning] = UserWarning) -> Iterator[None]:
    """Silence the warnings of ``category`` whose text starts with one of ``messages`` inside this block only:
    for a package's own noise a user cannot act on (e.g. torch's "Converting a tensor with requires_grad"
    from CHGNet's graph batching), never process-wide. ``warnings.catch_warnings`` swaps the process's filter
    list, so every such block in the process takes one lock: keep them around the calls that warn."""
    with _LOCK, warnings.catch_warnings():
        for message in messages:
            warnings.filterwarnings("ignore", message=message, category=category)
        yield


__all__ = ["quiet_warnings"]
