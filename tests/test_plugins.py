"""Model plugins: ``MATCALC_PLUGINS`` modules and ``matcalc.models`` entry points are imported on the first
registry use, may register models, and a broken one is reported (warning, ``matcalc models``), never fatal.

Each case runs in a fresh interpreter: plugins are imported once per process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

TESTS = Path(__file__).resolve().parent

PROBE = textwrap.dedent("""
    import json, warnings
    warnings.simplefilter("always")
    with warnings.catch_warnings(record=True) as caught:
        import matcalc
        from matcalc.models import model_names, plugin_status
        names = model_names()
    out = {"names": names, "status": [s.to_dict() for s in plugin_status()],
           "warnings": [f"{w.category.__name__}: {w.message}" for w in caught]}
    if "plugin-morse" in names:
        from ase.build import bulk
        from morse_plugin import calculator
        atoms = bulk("Cu", "fcc", a=3.7) * (2, 1, 1)
        atoms.rattle(0.05, seed=1)
        ours = atoms.copy(); ours.calc = matcalc.get_model("plugin-morse", device="cpu").calculator()
        ref = atoms.copy(); ref.calc = calculator()
        out["energies"] = [ours.get_potential_energy(), ref.get_potential_energy()]
        out["forces"] = [ours.get_forces().tolist(), ref.get_forces().tolist()]
    print("PROBE" + json.dumps(out))
""")


def run_probe(plugins: str, *, path: list[Path] = (), cwd: Path | None = None) -> dict:
    env = {**os.environ, "MATCALC_PLUGINS": plugins,
           "PYTHONPATH": os.pathsep.join([*map(str, path), str(TESTS), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=300,
                          cwd=cwd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("PROBE")][-1]
    return json.loads(line[len("PROBE"):])


def test_env_plugin_registers_a_model_that_matches_its_ase_calculator():
    out = run_probe(" morse_plugin ,morse_plugin")
    assert "plugin-morse" in out["names"]
    assert out["status"] == [{"name": "morse_plugin", "source": "env", "loaded": True, "error": None,
                              "models": ["plugin-morse"]}]
    e_ours, e_ref = out["energies"]
    assert abs(e_ours - e_ref) < 1e-10 and e_ref < 0  # bound copper-like Morse crystal
    f_ours, f_ref = out["forces"]
    assert max(abs(a - b) for ra, rb in zip(f_ours, f_ref) for a, b in zip(ra, rb)) < 1e-10
    assert max(abs(v) for row in f_ref for v in row) > 1e-3  # rattled: the forces are not trivially zero
    assert not out["warnings"]


def test_broken_plugins_are_reported_not_fatal():
    out = run_probe("broken_plugin,morse_plugin,no_such_plugin_module")
    assert "plugin-morse" in out["names"] and "emt" in out["names"]  # the good plugin and the builtins still load
    status = {s["name"]: s for s in out["status"]}
    assert status["morse_plugin"]["loaded"]
    broken = status["broken_plugin"]
    assert not broken["loaded"] and "matcalc_test_missing_dependency" in broken["error"]
    assert "broken_plugin.py:3" in broken["error"]  # where it failed
    assert not status["no_such_plugin_module"]["loaded"]
    assert "No module named 'no_such_plugin_module'" in status["no_such_plugin_module"]["error"]
    warned = [w for w in out["warnings"] if w.startswith("PluginWarning")]
    assert len(warned) == 2 and any("'broken_plugin'" in w and "MATCALC_PLUGINS" in w for w in warned)


def test_entry_point_plugin_callable_is_called(tmp_path):
    site = tmp_path / "site"
    (site / "ep_plugin_pkg-1.0.dist-info").mkdir(parents=True)
    (site / "ep_plugin_pkg-1.0.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: ep-plugin-pkg\n"
                                                                     "Version: 1.0\n")
    (site / "ep_plugin_pkg-1.0.dist-info" / "entry_points.txt").write_text(
        "[matcalc.models]\nmorse = ep_plugin:register\n")
    (site / "ep_plugin.py").write_text(textwrap.dedent("""
        import matcalc
        from morse_plugin import _factory

        def register():
            matcalc.register_model("ep-morse", _factory, family="plugin")
    """))
    out = run_probe("", path=[site])
    assert "ep-morse" in out["names"]
    assert out["status"] == [{"name": "morse = ep_plugin:register", "source": "entry_point", "loaded": True,
                              "error": None, "models": ["ep-morse", "plugin-morse"]}]  # it imports morse_plugin


def test_matcalc_models_lists_plugins_and_their_errors():
    env = {**os.environ, "MATCALC_PLUGINS": "morse_plugin,broken_plugin",
           "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", "matcalc.cli", "models", "--no-d3"], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert any(ln.startswith("plugin-morse ") for ln in proc.stdout.splitlines())
    assert "morse_plugin [env]: ok (plugin-morse)" in proc.stdout
    assert "broken_plugin [env]: FAILED to import: ModuleNotFoundError" in proc.stdout
