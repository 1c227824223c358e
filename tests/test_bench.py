"""``matcalc bench mofsimbench`` / ``mc.bench.mofsimbench``: a small real run (CHGNet, fast protocol, the three
smallest MOFs of each set) whose summary equals the metrics recomputed here from the per-structure outputs and
the shipped DFT tables; resume after SIGKILL; MOFSimBench's D3 arguments; bad input refused before any work."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from ase.build import molecule
from ase.io import read, write
from ase.units import Bohr

import matcalc as mc
from matcalc.calculations.interaction import pore_centre
from matcalc.cli import main

DATA = Path(__file__).parent / "data" / "mofsimbench"
REFERENCE = Path(mc.__file__).parent / "data" / "reference"
MODEL = "chgnet"
# fast protocol, and MD / EOS sampling cut to what a test affords (these overrides are part of the resume key)
PARAMS = {"stability": {"nvt_steps": 10, "npt_steps": 20, "interval": 10},
          "bulk_modulus": {"n_points": 5, "fixed_cell_max_steps": 100}}
GOLDDAC_DFT = {  # synthetic reference energies (eV) of the layout fixture: not DFT, only what the metric is checked on
    "RSM0009_CO2_E_A_1.0": (-150.25, -130.0, -20.0),
    "RSM0009_CO2_P_A_2.0": (-150.10, -130.0, -20.0),
}


def _make_golddac(root: Path) -> None:
    """MOFSimBench's golddac layout (as its extraction notebook writes it) for one framework and two CO2
    positions, plus a GoldDAC-style test.xyz holding the reference energies and forces."""
    framework = read(DATA / "hcmof" / "RSM0009.cif")
    framework.set_tags(0)
    folder = root / "golddac"
    folder.mkdir()
    write(folder / "RSM0009_CO2.xyz", framework, format="extxyz")
    write(folder / "CO2.xyz", molecule("CO2"), format="extxyz")
    centre = pore_centre(framework)  # CO2 >= 1.8 Å from every framework atom
    refs = []
    for (name, (e_tot, e_mof, e_gas)), shift in zip(GOLDDAC_DFT.items(), (0.0, 0.3), strict=True):
        gas = molecule("CO2")
        gas.positions += centre - gas.positions.mean(axis=0) + [shift, 0.0, 0.0]
        gas.set_tags(1)
        cplx = framework + gas
        write(folder / f"{name}.xyz", cplx, format="extxyz")
        ref = cplx.copy()
        ref.info.update(name=name, DFT_E_total=e_tot, DFT_E_mof=e_mof, DFT_E_gas=e_gas)
        ref.arrays["REF_forces"] = np.full((len(ref), 3), 0.01)
        refs.append(ref)
    write(folder / "test.xyz", refs, format="extxyz")


def _journal_lines(out: Path, task: str) -> list[dict]:
    path = out / "runs" / f"{task}.csv.journal.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip().endswith("}")]


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    """A heat-capacity run killed with SIGKILL after its first structure, then the whole benchmark in-process
    on the same output folder, then the same call again."""
    root = tmp_path_factory.mktemp("structures")
    for sub in ("main_set", "hcmof"):
        shutil.copytree(DATA / sub, root / sub)
    shutil.copy(DATA / "structures.yaml", root / "structures.yaml")
    _make_golddac(root)
    out = tmp_path_factory.mktemp("bench")
    env = {**os.environ, "MATCALC_CACHE": "0", "OPENBLAS_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "matcalc.cli", "bench", "mofsimbench", "--model", MODEL,
                             "--structures", str(root), "--out", str(out), "--tasks", "heat_capacity",
                             "--protocol", "fast", "--no-progress"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 600
    while not _journal_lines(out, "heat_capacity") and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed = _journal_lines(out, "heat_capacity")
    params = {"stability": PARAMS["stability"], "bulk_modulus": PARAMS["bulk_modulus"]}
    first = mc.bench.mofsimbench(MODEL, root, out, protocol="fast", params=params, cache=False, show_progress=False)
    again = mc.bench.mofsimbench(MODEL, root, out, protocol="fast", params=params, cache=False, show_progress=False)
    return {"root": root, "out": out, "killed": killed, "first": first, "again": again}


@pytest.mark.slow  # the fixture: a real CHGNet benchmark run (~150 s on 2 cores)
def test_resume_after_sigkill_does_not_recompute(bench):
    killed, first, again = bench["killed"], bench["first"], bench["again"]
    assert 1 <= len(killed) < 3, "the killed run should have finished some but not all heat-capacity structures"
    hc = first.tasks["heat_capacity"]
    assert hc.n_skipped == len(killed) and hc.n_computed == 3 - len(killed) and hc.n_failed == 0
    lines = _journal_lines(bench["out"], "heat_capacity")
    assert len(lines) == 3 and len({r["key"] for r in lines}) == 3  # each structure journaled exactly once
    assert lines[: len(killed)] == killed  # the finished ones untouched
    for name, task in again.tasks.items():  # a rerun computes nothing and scores the same
        assert task.n_computed == 0 and task.n_skipped == first.tasks[name].n_structures
        assert task.metrics == first.tasks[name].metrics


def _runs(out: Path, task: str) -> pd.DataFrame:
    return pd.read_csv(out / "runs" / f"{task}.csv")


@pytest.mark.slow
def test_summary_equals_metrics_recomputed_from_outputs(bench):
    out, summary = bench["out"], json.loads((bench["out"] / "summary.json").read_text())
    assert summary["model"] == MODEL and summary["protocol"] == "fast"
    tasks = summary["tasks"]
    assert list(tasks) == ["optimization", "stability", "bulk_modulus", "heat_capacity", "interaction_energy"]
    for name in ("optimization", "stability", "bulk_modulus"):
        assert tasks[name]["missing_files"] == ["main_set/NUVCUD_full.cif"]  # listed in the yaml, not shipped
        assert tasks[name]["n_structures"] == 3 and tasks[name]["n_failed"] == 0

    # optimisation: relaxed volume per atom vs the DFT-optimised cell
    cells = pd.read_csv(REFERENCE / "dft_optimised_cells.csv").set_index("structure")
    opt = _runs(out, "optimization")
    dv = [100 * (r.final_volume_A3 / r.n_atoms / (cells.at[r.label.replace("_primitive", ""), "volume_A3"]
                                                   / cells.at[r.label.replace("_primitive", ""), "n_atoms"]) - 1)
          for r in opt.itertuples()]
    m = tasks["optimization"]["metrics"]
    assert m["n_compared"] == 3
    assert m["mean_abs_volume_change_vs_dft_percent"] == pytest.approx(np.mean(np.abs(dv)), rel=1e-9)
    assert m["fraction_within_10_percent_of_dft"] == pytest.approx(np.mean(np.abs(dv) <= 10.0))

    # stability: |ΔV| <= 10 % and no blow-up
    st = _runs(out, "stability")
    stable = [(abs(r.volume_change_percent) <= 10.0) and not isinstance(r.reason, str) for r in st.itertuples()]
    assert list(st["stable"]) == stable
    assert tasks["stability"]["metrics"]["stable_fraction"] == pytest.approx(np.mean(stable))
    assert tasks["stability"]["metrics"]["mean_abs_volume_change_percent"] == pytest.approx(
        np.mean(np.abs(st["volume_change_percent"])), rel=1e-9)

    # bulk modulus vs DFT B0, fits whose minimum leaves the sampled volumes (0.96-1.04 V0) excluded
    b0 = pd.read_csv(REFERENCE / "dft_bulk_modulus.csv").set_index("structure")["B0_GPa"]
    bm = _runs(out, "bulk_modulus")
    keep, err = [], []
    for r in bm.itertuples():
        e = r.bulk_modulus_GPa - b0[r.label.replace("_primitive", "")]
        err.append(e)
        if r.bulk_modulus_GPa > 0 and 0.96 * r.relaxed_volume_A3 <= r.equilibrium_volume_A3 <= 1.04 * r.relaxed_volume_A3:
            keep.append(e)
    m = tasks["bulk_modulus"]["metrics"]
    assert m["n_compared"] == len(keep) and m["n_excluded"] == 3 - len(keep)
    assert m["mae_all_GPa"] == pytest.approx(np.mean(np.abs(err)), rel=1e-9)
    if keep:
        assert m["mae_GPa"] == pytest.approx(np.mean(np.abs(keep)), rel=1e-9)
        dft_kept = [b0[r.label.replace("_primitive", "")] for r, e in zip(bm.itertuples(), err, strict=True)
                    if e in keep]
        assert m["mape_percent"] == pytest.approx(np.mean(100 * np.abs(keep) / np.asarray(dft_kept)), rel=1e-9)

    # heat capacity: Cv(300 K) per gram vs DFT
    cv = pd.read_csv(REFERENCE / "dft_cv_300k.csv").set_index("cif_name")["cv_300K_JperKperg"]
    hc = _runs(out, "heat_capacity")
    assert sorted(hc["label"]) == ["RSM0009", "RSM0010", "RSM0011"]
    m = tasks["heat_capacity"]["metrics"]
    assert m["n_compared"] == 3
    assert m["mae_J_per_K_g"] == pytest.approx(np.mean(np.abs(hc["cv_300K_J_per_K_g"] - cv[hc["label"]].to_numpy())),
                                               rel=1e-9)

    # interaction energy: E(complex) - E(framework) - E(gas) vs the reference's E_total - E_mof - E_gas
    sp = _runs(out, "interaction_energy").set_index("label")["energy_eV"]
    errors = [sp[n] - sp["RSM0009_CO2"] - sp["CO2"] - (t - h - g) for n, (t, h, g) in GOLDDAC_DFT.items()]
    m = tasks["interaction_energy"]["metrics"]
    assert m["n_compared"] == 2
    assert m["mae_eV"] == pytest.approx(np.mean(np.abs(errors)), rel=1e-9)
    assert m["mae_kJ_per_mol"] == pytest.approx(m["mae_eV"] * 96.4853, rel=1e-5)
    assert math.isfinite(m["force_mae_eV_per_A"])
    gas = read(out / "inputs" / "golddac" / "boxed_CO2" / "CO2.xyz")  # the cell-less gas, boxed beyond the reach
    assert gas.pbc.all() and gas.cell.lengths().min() > 5.0 + 5.0

    # per-structure CSVs, parity plots, one leaderboard line per task
    for name, task in tasks.items():
        assert len(pd.read_csv(out / f"{name}.csv")) == (2 if name == "interaction_energy" else 3)
        png = Path(task["plot"])
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
        assert task["time_per_structure_s"] > 0
    lines = (out / "leaderboard.txt").read_text().splitlines()
    assert len(lines) == 5 and all(line.startswith(f"MOFSimBench | {MODEL} | ") for line in lines)


def test_dft_cell_table_matches_the_bulk_modulus_reference():
    """The shipped DFT-optimised cell volumes equal the unstrained point of MOFSimBench's DFT E(V) table."""
    import ast

    cells = pd.read_csv(REFERENCE / "dft_optimised_cells.csv").set_index("structure")
    bm = pd.read_csv(REFERENCE / "dft_bulk_modulus.csv")
    assert len(cells) == len(bm) == 100
    for r in bm.itertuples():
        strains, volumes = ast.literal_eval(r.strains), ast.literal_eval(r.volumes_A3)
        assert cells.at[r.structure, "volume_A3"] == pytest.approx(volumes[strains.index(1.0)], rel=1e-6)


def test_d3_equals_torch_dftd3_with_mofsimbench_arguments():
    """MOFSimBench: SumCalculator([model, TorchDFTD3Calculator(device, damping="bj", xc="pbe",
    cutoff=40 * units.Bohr)]) (cnthr and three-body at torch-dftd's defaults)."""
    from ase.calculators.mixing import SumCalculator
    from chgnet.model.dynamics import CHGNetCalculator
    from torch_dftd.torch_dftd3_calculator import TorchDFTD3Calculator

    atoms = read(DATA / "main_set" / "calf.cif")
    ours = mc.get_model("d3", "cpu").evaluate([atoms])[0]
    ref = atoms.copy()
    ref.calc = TorchDFTD3Calculator(device="cpu", damping="bj", xc="pbe", cutoff=40 * Bohr)
    assert ours.energy_eV == pytest.approx(ref.get_potential_energy(), abs=1e-6)
    np.testing.assert_allclose(ours.forces_eV_per_A, ref.get_forces(), atol=1e-5)
    np.testing.assert_allclose(ours.stress_eV_per_A3, ref.get_stress(), atol=1e-7)
    default = atoms.copy()
    default.calc = TorchDFTD3Calculator(device="cpu", damping="bj", xc="pbe")  # torch-dftd's 95 Bohr
    assert abs(default.get_potential_energy() - ours.energy_eV) > 1e-3  # the cutoff matters for a MOF

    summed = mc.single_point(atoms, "chgnet+d3", cache=False)
    plain = atoms.copy()
    plain.calc = SumCalculator([CHGNetCalculator(use_device="cpu"),
                                TorchDFTD3Calculator(device="cpu", damping="bj", xc="pbe", cutoff=40 * Bohr)])
    assert summed.energy_eV == pytest.approx(plain.get_potential_energy(), abs=2e-4)


@pytest.mark.parametrize(("args", "message"), [
    (["--structures", "NOPE"], "does not exist"),
    (["--tasks", "optimization,melting_point"], "unknown task(s) melting_point"),
    (["--model", "no-such-model"], "cannot be loaded"),
    (["--tasks", "interaction_energy"], "golddac"),
    (["-p", "stability.npt_step=5"], "npt_step"),
])
def test_bad_input_is_refused_before_any_work(tmp_path, capsys, args, message):
    argv = {"--model": MODEL, "--structures": str(DATA), "--out": str(tmp_path / "out")}
    extra = []
    for flag, value in zip(args[::2], args[1::2], strict=True):
        if flag in argv:
            argv[flag] = str(tmp_path / value) if value == "NOPE" else value
        else:
            extra += [flag, value]
    cmd = ["bench", "mofsimbench", *[x for kv in argv.items() for x in kv], *extra, "--no-progress"]
    assert main(cmd) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # nothing written, nothing run
