"""Process-wide on/off switches read from the environment (batching, batched stepping, the result cache).

A `Switch` is off when its variable is ``0``, ``false``, ``no`` or ``off`` (any case), on otherwise or when
unset; `Switch.set_enabled` overrides the variable for this process and `Switch.disabled` turns it off for
a ``with`` block (A/B runs).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

OFF_WORDS = frozenset({"0", "false", "no", "off"})
"""Values of a switch's environment variable that turn it off."""


def env_flag(name: str, default: bool = True) -> bool:
    """The environment variable ``name`` read as a flag: off for `OFF_WORDS`, ``default`` when unset."""
    value = os.environ.get(name)
    if value is None:
        return default
    return value.strip().lower() not in OFF_WORDS


class Switch:
    """One process-wide flag: `set_enabled` (``True``/``False``), else the environment variable ``env``."""

    def __init__(self, env: str) -> None:
        self.env = env
        self._override: bool | None = None

    def enabled(self) -> bool:
        """The override of `set_enabled` when set, else the environment variable (default on)."""
        return self._override if self._override is not None else env_flag(self.env)

    def set_enabled(self, flag: bool | None) -> None:
        """Force on (True) or off (False) for this process; ``None`` reads the environment again."""
        self._override = flag

    @contextmanager
    def disabled(self) -> Iterator[None]:
        """Off inside the ``with`` block (process-wide), the previous state after it."""
        before = self._override
        self._override = False
        try:
            yield
        finally:
            self._override = before
