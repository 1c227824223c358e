"""The console script, run as a user runs it (subprocess)."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from matcalc.models import model_names


def run(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "matcalc.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_models_lists_the_registry() -> None:
    out = run("models")
    assert out.returncode == 0, out.stderr
    for name in model_names(include_d3=True):
        assert re.search(rf"^\s*{re.escape(name)}\s", out.stdout, re.M), name
    assert "available" in out.stdout.splitlines()[0]


def test_demo_relaxes_a_shipped_mof_with_chgnet() -> None:
    out = run("demo", "--protocol", "fast")
    assert out.returncode == 0, out.stderr
    fields = dict(re.findall(r"^(\w+)\s+(.+?)\s*$", out.stdout, re.M))
    assert fields["model"] == "chgnet" and fields["formula"] == "C12H8N12O8Zn4"
    assert fields["converged"] == "True"
    assert float(fields["final_fmax_eV_per_A"]) <= 0.05
    assert float(fields["final_energy_eV"]) < float(fields["initial_energy_eV"])
    # a DFT-optimised cell barely moves under a good potential (MOFSimBench: |dV| of a few %)
    assert abs(float(fields["volume_change_percent"])) < 5


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("demo", "--model", "nosuchnet"), "unknown model 'nosuchnet'"),
        (("demo", "--structure", "NoSuchMOF"), "neither a file, structure text, nor a builtin"),
        (("demo", "--protocol", "slow"), "protocol must be one of"),
    ],
)
def test_bad_input_is_a_clear_error(args: tuple[str, ...], message: str) -> None:
    out = run(*args)
    assert out.returncode == 2
    assert message in out.stderr
    assert "Traceback" not in out.stderr
