"""Test-only model plugin (``MATCALC_PLUGINS=crash_plugin``, with ``tests/`` on ``PYTHONPATH``): potentials
that kill the process evaluating them, as a native abort, a segfault or the kernel's OOM killer would.

* ``crash-abort``: ``os.abort()`` (SIGABRT, like a failed native allocation);
* ``crash-segv``: reads address 0 through ``ctypes`` (SIGSEGV);
* ``crash-kill``: ``SIGKILL`` to itself (what the OOM killer sends);
* ``crash-once``: aborts the first time any process evaluates it (a marker file under
  ``$MATCALC_TEST_CRASH_DIR`` remembers it), then behaves exactly as EMT.

Never registered outside tests: the module is only imported when named in ``MATCALC_PLUGINS``.
"""

from __future__ import annotations

import ctypes
import os
import signal
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ase import Atoms

import matcalc
from matcalc.models.base import Evaluation
from matcalc.models.emt import EMTPotential

CRASH_DIR_ENV = "MATCALC_TEST_CRASH_DIR"


def _die(how: str) -> None:
    if how == "abort":
        os.abort()
    if how == "segv":
        ctypes.string_at(0)
    if how == "kill":
        os.kill(os.getpid(), signal.SIGKILL)


class CrashPotential(EMTPotential):
    """EMT that kills its process on evaluation (``how``: abort, segv, kill, once)."""

    family = "crash-test"

    def __init__(self, name: str, device: str = "cpu", *, how: str, **kwargs: Any) -> None:
        super().__init__(name, device, **kwargs)
        self.how = how

    def _evaluate_batch(self, atoms_list: Sequence[Atoms]) -> list[Evaluation]:
        if self.how != "once":
            _die(self.how)
        marker = Path(os.environ[CRASH_DIR_ENV]) / "crashed-once"
        try:
            marker.open("x").close()  # exactly one process wins
        except FileExistsError:
            return super()._evaluate_batch(atoms_list)
        _die("abort")
        raise AssertionError("unreachable")


for _how in ("abort", "segv", "kill", "once"):
    matcalc.register_model(f"crash-{_how}", lambda name, device, h=_how: CrashPotential(name, device, how=h),
                           family="crash-test", description=f"test only: EMT that dies ({_how})",
                           elements="Al Cu Ag Au Ni Pd Pt H C N O", overwrite=True)
