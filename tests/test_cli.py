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


def test_version_says_which_matcalc_is_installed() -> None:
    """Ours is the distribution matcalc-mof (MVL's matcalc 0.7 has the same import name, another name on PyPI)."""
    import importlib.metadata

    import matcalc

    installed = importlib.metadata.version("matcalc-mof")
    assert matcalc.__version__ == installed and matcalc.__distribution__ == "matcalc-mof"
    out = run("--version")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(f"matcalc {installed} (distribution matcalc-mof, ")
    # the import name is matcalc, and the installed files are this checkout's
    assert str(__import__("pathlib").Path(matcalc.__file__).parent) in out.stdout
    # every install hint names our distribution, never MVL's (`pip install matcalc[...]` would install MVL's)
    from matcalc.models import list_models
    from matcalc.models.registry import families, get_family

    hints = [get_family(f).install_hint for f in families()] + [c.reason or "" for c in list_models()]
    assert any("matcalc-mof[" in h for h in hints)
    assert not [h for h in hints if re.search(r"install ['\"]?matcalc\[", h)]
