"""``matcalc run``: batch runs written as they finish, resumable without recomputation."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from ase.build import bulk
from ase.io import write

import matcalc as mc
from matcalc.cli import main
from matcalc.runner import Journal, run_batch, task_key

RELAX = ["--fmax", "0.01", "--optimizer", "FIRE", "--relax-cell", "false"]


def make_inputs(folder: Path, n_small: int = 3, n_large: int = 2) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n_small + n_large):
        atoms = bulk("Cu", "fcc", a=3.6, cubic=True).repeat(1 if i < n_small else 2)
        atoms.rattle(0.15, seed=i)
        p = folder / f"s{i:02d}.cif"
        write(p, atoms)
        paths.append(p)
    return paths


def journal_lines(out: Path) -> list[dict]:
    j = out.with_name(out.name + ".journal.jsonl")
    if not j.exists():
        return []
    return [json.loads(line) for line in j.read_text().splitlines() if line.strip().endswith("}")]


def reference(path: Path) -> mc.RelaxResult:
    return mc.relax(str(path), "emt", fmax=0.01, optimizer="FIRE", relax_cell=False)


def test_interrupted_run_resumes_without_recomputing(tmp_path: Path):
    inputs = make_inputs(tmp_path / "in")
    out = tmp_path / "out" / "results.parquet"
    cmd = [sys.executable, "-m", "matcalc.cli", "run", "relax", str(tmp_path / "in"), "--model", "emt",
           "--out", str(out), "--no-progress", *RELAX]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300
        while not journal_lines(out) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)  # a hard crash: no cleanup runs
        proc.wait(60)
    first = {r["key"]: r for r in journal_lines(out)}
    assert 1 <= len(first) < len(inputs), "the first run should have been interrupted part-way"

    assert main(["run", "relax", str(tmp_path / "in"), "--model", "emt", "--out", str(out), "--no-progress",
                 *RELAX]) == 0
    lines = journal_lines(out)
    keys = [r["key"] for r in lines]
    assert len(keys) == len(set(keys)) == len(inputs)  # each structure computed exactly once
    frame = pd.read_parquet(out)
    assert len(frame) == len(inputs) and frame["key"].is_unique
    assert (frame["status"] == "COMPLETED").all() and frame["error"].isna().all()
    assert list(frame["label"]) == [p.stem for p in inputs]
    for key, row in first.items():  # finished rows kept, not recomputed
        assert frame.set_index("key").loc[key, "finished_at"] == pytest.approx(row["finished_at"])
    for path, (_, row) in zip(inputs, frame.iterrows(), strict=True):
        ref = reference(path)
        assert row["steps"] == ref.steps
        assert row["final_energy_eV"] == pytest.approx(ref.final_energy_eV, abs=1e-10)
        assert row["structure_hash"] == mc.structure_hash(mc.load_structure(str(path)))
    # the journal keeps the full result for each structure
    restored = mc.Result.from_dict(lines[0]["result"])
    assert isinstance(restored, mc.RelaxResult) and len(restored.energies_eV) == restored.steps + 1


def test_prepopulated_output_and_failures(tmp_path: Path):
    inputs = make_inputs(tmp_path / "in", n_small=3, n_large=0)
    bad = tmp_path / "in" / "broken.cif"
    bad.write_text("data_broken\n_cell_length_a 3.6\n")
    out = tmp_path / "r.parquet"
    params = {"fmax": 0.01, "optimizer": "FIRE", "relax_cell": False}
    s1 = run_batch("relax", inputs[:2], model="emt", out=out, params=params, show_progress=False)
    assert (s1.n_computed, s1.n_skipped, s1.n_failed) == (2, 0, 0)
    s2 = run_batch("relax", [tmp_path / "in", inputs[0]], model="emt", out=out, params=params, workers=2,
                   show_progress=False)
    # inputs[0] listed twice and already done; inputs[1] done; inputs[2] and the broken file are new
    assert (s2.n_inputs, s2.n_unique, s2.n_skipped, s2.n_computed, s2.n_failed) == (5, 4, 2, 1, 1)
    frame = pd.read_parquet(out)
    assert len(frame) == 4 and frame["key"].is_unique
    failed = frame[frame["status"] == "FAILED"]
    assert list(failed["label"]) == ["broken"] and "StructureError" in failed["error"].iloc[0]
    # failed structures are retried on the next run, and still give one row
    s3 = run_batch("relax", [tmp_path / "in"], model="emt", out=out, params=params, show_progress=False)
    assert (s3.n_skipped, s3.n_failed) == (3, 1)
    assert len(pd.read_parquet(out)) == 4
    # other parameters are other calculations
    key_a = task_key("h", "relax", "emt", "mofsimbench", {"fmax": 0.01})
    assert key_a != task_key("h", "relax", "emt", "mofsimbench", {"fmax": 0.02})
    assert key_a != task_key("h", "relax", "emt", "fast", {"fmax": 0.01})
    # a table without journal (e.g. copied elsewhere) is adopted, not recomputed
    out.with_name(out.name + ".journal.jsonl").unlink()
    s4 = run_batch("relax", inputs, model="emt", out=out, params=params, show_progress=False)
    assert s4.n_skipped == 3 and s4.n_computed == 0
    energies = pd.read_parquet(out).set_index("label").loc[[p.stem for p in inputs], "final_energy_eV"]
    np.testing.assert_allclose(energies, [reference(p).final_energy_eV for p in inputs], atol=1e-10)


def test_torn_journal_line_is_ignored(tmp_path: Path):
    j = Journal(tmp_path / "x.journal.jsonl")
    j.append({"key": "a", "status": "COMPLETED"})
    with j.path.open("a") as fh:
        fh.write('{"key": "b", "sta')  # killed mid-write
    assert set(j.read()) == {"a"}


def test_bad_arguments(tmp_path: Path, capsys):
    inputs = make_inputs(tmp_path / "in", n_small=1, n_large=0)
    with pytest.raises(ValueError, match="out"):
        run_batch("relax", inputs, model="emt", out=tmp_path / "r.txt", show_progress=False)
    with pytest.raises(ValueError, match="unknown property"):
        run_batch("melting", inputs, model="emt", out=tmp_path / "r.parquet", show_progress=False)
    with pytest.raises(ValueError, match="protocol"):
        run_batch("relax", inputs, model="emt", out=tmp_path / "r.parquet", protocol="slow", show_progress=False)
    with pytest.raises(ValueError, match="workers"):
        run_batch("relax", inputs, model="emt", out=tmp_path / "r.parquet", workers=0, show_progress=False)
    with pytest.raises(FileNotFoundError):
        run_batch("relax", [tmp_path / "missing.cif"], model="emt", out=tmp_path / "r.parquet", show_progress=False)
    # bad parameters and unknown models fail before any file is written
    for argv, message in [(["--fmax", "-1"], "fmax must be in"), (["--optimizer", "SGD"], "optimizer must be one of"),
                          (["--model", "nosuchnet"], "unknown model"), (["--relax-cell", "maybe"], "relax_cell")]:
        out = tmp_path / "never.parquet"
        assert main(["run", "relax", str(inputs[0]), "--model", "emt", *argv, "--out", str(out)]) == 2
        assert message in capsys.readouterr().err and not list(tmp_path.glob("never.parquet*"))
    assert main(["run", "relax", str(inputs[0]), "--model", "emt", "--out", str(tmp_path / "r.txt")]) == 2
    assert "out must end in" in capsys.readouterr().err


@pytest.mark.slow
def test_run_on_local_cluster_matches_in_process(tmp_path: Path):
    inputs = make_inputs(tmp_path / "in", n_small=2, n_large=1)
    out_cluster = tmp_path / "cluster.csv"
    assert main(["run", "single_point", str(tmp_path / "in"), "--model", "emt", "--out", str(out_cluster),
                 "--cluster", "local", "--workers", "1", "--no-progress"]) == 0
    out_local = tmp_path / "local.csv"
    assert main(["run", "single_point", str(tmp_path / "in"), "--model", "emt", "--out", str(out_local),
                 "--no-progress"]) == 0
    a, b = pd.read_csv(out_cluster), pd.read_csv(out_local)
    assert list(a["key"]) == list(b["key"]) and len(a) == len(inputs)
    np.testing.assert_allclose(a["energy_eV"], b["energy_eV"], rtol=0, atol=1e-12)
    np.testing.assert_allclose(a["max_force_eV_per_A"], b["max_force_eV_per_A"], rtol=0, atol=1e-12)
    assert not os.path.exists(str(out_cluster) + ".tmp")


def test_options_are_derived_from_the_declarations(tmp_path: Path):
    """Every declared parameter of every property is a `matcalc run PROPERTY --option`, parsed by its kind."""
    from matcalc.calculations import properties
    from matcalc.cli import build_parser
    from matcalc.runner import params_from_args

    parser = build_parser()
    for name, spec in properties().items():
        args = vars(parser.parse_args(["run", name, "x.cif"]))
        assert {f"param_{p.name}" for p in spec.remote_params} <= set(args), name
        assert params_from_args(parser.parse_args(["run", name, "x.cif"])) == {}
    args = parser.parse_args(["run", "heat_capacity", "x.cif", "--supercell", "2", "2", "1", "--mesh", "30",
                              "--relax-first", "false", "--t-max", "500"])
    assert params_from_args(args) == {"supercell": [2, 2, 1], "mesh": 30.0, "relax_first": False, "t_max": 500.0}
    args = parser.parse_args(["run", "bulk-modulus", "x.cif", "--n-points", "7", "--eos", "vinet"])
    assert args.spec.name == "bulk_modulus" and params_from_args(args) == {"n_points": 7, "eos": "vinet"}


def test_declared_options_run_end_to_end(tmp_path: Path):
    inputs = make_inputs(tmp_path / "in", n_small=1, n_large=0)
    out = tmp_path / "r.csv"
    assert main(["run", "relax", str(inputs[0]), "--model", "emt", "--fmax", "0.02", "--optimizer", "FIRE",
                 "--relax-cell", "false", "--out", str(out), "--no-progress", "--no-cache"]) == 0
    row = Journal(out.with_name(out.name + ".journal.jsonl")).read().popitem()[1]
    assert row["status"] == "COMPLETED"
    assert row["result"]["parameters"] == {"fmax": 0.02, "max_steps": 5000, "optimizer": "FIRE", "relax_cell": False}


def test_final_structures_are_written_next_to_the_table(tmp_path: Path):
    """Each finished relaxation's final structure goes to OUT_structures/<label>.cif (the row says where), equal to
    the journal's final structure and to a relaxation of the same file run directly; a failed input has none."""
    from ase.io import read

    inputs = make_inputs(tmp_path / "in", n_small=2, n_large=0)
    (tmp_path / "in" / "broken.cif").write_text("data_broken\n_cell_length_a 3.6\n")
    out = tmp_path / "r.parquet"
    assert main(["run", "relax", str(tmp_path / "in"), "--model", "emt", *RELAX, "--out", str(out),
                 "--no-progress"]) == 1  # one failure
    folder = tmp_path / "r_structures"
    assert sorted(p.name for p in folder.iterdir()) == ["s00.cif", "s01.cif"]
    frame = pd.read_parquet(out).set_index("label")
    assert frame.loc["s00", "structure_file"] == str(folder / "s00.cif")
    assert frame.loc["broken", "status"] == "FAILED" and pd.isna(frame.loc["broken", "structure_file"])
    for p in inputs:
        got = read(folder / f"{p.stem}.cif")
        ref = reference(p).final_structure
        np.testing.assert_allclose(got.cell[:], ref.cell[:], atol=1e-5)
        np.testing.assert_allclose(got.get_scaled_positions(), ref.get_scaled_positions(wrap=True), atol=1e-5)
    # extended XYZ on request, and nothing with --structures none
    out2 = tmp_path / "x.csv"
    run_batch("relax", inputs[:1], model="emt", out=out2, params={"fmax": 0.01, "relax_cell": False},
              structures="extxyz", show_progress=False)
    assert [p.name for p in (tmp_path / "x_structures").iterdir()] == ["s00.extxyz"]
    run_batch("relax", inputs[:1], model="emt", out=tmp_path / "n.csv", params={"fmax": 0.01}, structures="none",
              show_progress=False)
    assert not (tmp_path / "n_structures").exists()


def test_another_calculation_into_the_same_table_is_refused(tmp_path: Path, capsys):
    """`matcalc run` with another --model (or other parameters) and the same --out does not replace the table:
    it is refused with one clear message, before anything is written, naming both calculations and a free name."""
    inputs = make_inputs(tmp_path / "in", n_small=2, n_large=0)
    out = tmp_path / "r.parquet"
    base = ["run", "relax", *map(str, inputs), *RELAX, "--out", str(out), "--no-progress"]
    assert main([*base, "--model", "emt"]) == 0
    capsys.readouterr()
    table, journal = out.read_bytes(), out.with_name(out.name + ".journal.jsonl").read_bytes()
    assert main([*base, "--model", "lj"]) == 2
    err = capsys.readouterr().err
    assert err.count("holds results of another calculation") == 1 and len(err.strip().splitlines()) == 1, err
    assert "relax with model emt (protocol mofsimbench); this run is relax with model lj" in err
    assert str(tmp_path / "r-lj.parquet") in err
    assert main([*base[:-5], "--fmax", "0.02", "--out", str(out), "--no-progress", "--model", "emt"]) == 2
    assert "and other parameters" in capsys.readouterr().err
    assert out.read_bytes() == table and out.with_name(out.name + ".journal.jsonl").read_bytes() == journal
    # the same calculation again resumes (nothing recomputed), and the suggested name takes the other model
    assert main([*base, "--model", "emt"]) == 0 and "2 already done" in capsys.readouterr().out
    assert main([*base[:-3], "--out", str(tmp_path / "r-lj.parquet"), "--no-progress", "--model", "lj"]) == 0


def test_unknown_model_is_one_message_and_no_file(tmp_path: Path, capsys):
    inputs = make_inputs(tmp_path / "in", n_small=1, n_large=0)
    out = tmp_path / "never.parquet"
    assert main(["run", "relax", str(inputs[0]), "--model", "nosuchnet", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("unknown model 'nosuchnet'") == 1 and err.count("chgnet") == 1, err
    assert len(err.strip().splitlines()) == 1
    assert not list(tmp_path.glob("never*"))


def test_cluster_slurm_starts_jobs_with_the_given_options(tmp_path: Path, monkeypatch):
    """`matcalc run --cluster slurm --cluster-options JSON` hands the options to `matcalc.cluster.start(kind=...)`
    (the SLURM path itself runs against a real SLURM in tests/test_slurm.py)."""
    import matcalc.cluster.local as local

    seen: dict = {}

    class Stop(Exception):
        pass

    def fake_start(**kwargs):
        seen.update(kwargs)
        raise Stop

    monkeypatch.setattr(local, "start", fake_start)
    inputs = make_inputs(tmp_path / "in", n_small=1, n_large=0)
    with pytest.raises(Stop):
        main(["run", "relax", str(inputs[0]), "--model", "emt", "--cluster", "slurm", "--no-cache",
              "--cluster-options", '{"jobs": 3, "walltime": "01:00:00"}', "--out", str(tmp_path / "r.csv")])
    assert seen["kind"] == "slurm" and seen["jobs"] == 3 and seen["walltime"] == "01:00:00"
    assert main(["run", "relax", str(inputs[0]), "--model", "emt", "--cluster", "slurm",
                 "--cluster-options", "[1]", "--out", str(tmp_path / "r.csv")]) == 2
