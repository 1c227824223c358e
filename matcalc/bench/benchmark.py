"""The MOFSimBench benchmark in one call: every structure of MOFSimBench's sets through the ``mofsimbench``
protocol with any model, resumable, in-process or on a cluster, then the paper's metrics against the DFT
references shipped in the package.

``structures`` is a folder laid out as MOFSimBench's ``experiments/structures``:

* ``main_set/`` (optimisation, MD stability, bulk modulus) and ``hcmof/`` (heat capacity), CIF files;
* ``golddac/`` (interaction energies, optional): MOFSimBench's extracted xyz files (``{MOF}_{gas}.xyz``
  frameworks, ``{MOF}_{gas}_{config}.xyz`` complexes, ``CO2.xyz``/``H2O.xyz``) and/or GoldDAC's ``test.xyz``,
  which also holds the DFT energies (``DFT_E_total``, ``DFT_E_mof``, ``DFT_E_gas``, ``REF_forces``);
* ``structures.yaml`` (optional): MOFSimBench's list of which files form each set. A listed file that is
  absent is reported and skipped; without the yaml every structure file of the folder is used.

Each task runs through `matcalc.runner.run_batch` (its journal makes a rerun skip finished
structures). Written to ``out``: ``runs/<task>.csv`` (+ journal; every result field), ``<task>.csv``
(per structure vs DFT), ``<task>.png`` (parity plot), ``summary.json`` and ``leaderboard.txt``.
"""

from __future__ import annotations

import json
import logging
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from ase import Atoms

from matcalc.bench import metrics as M
from matcalc.bench.tasks import TASKS, Task
from matcalc.calculations.results import jsonable

log = logging.getLogger(__name__)


SCORERS: dict[str, Callable[..., M.TaskMetrics]] = {
    "optimization": M.optimization, "stability": M.stability, "bulk_modulus": M.bulk_modulus,
    "heat_capacity": M.heat_capacity, "interaction_energy": M.interaction_energy,
}
STRUCTURE_SUFFIXES = (".cif", ".xyz", ".extxyz", ".vasp")
GOLDDAC_REFERENCE = "test.xyz"
"""GoldDAC's file of complexes with their DFT energies (looked for in ``golddac/`` and ``structures``)."""
THIRD_PARTY_NOISE = (
    "Converting a tensor with requires_grad",  # CHGNet, every call
    "Creating a tensor from a list of numpy.ndarrays is extremely slow",  # torch-dftd, every call
)
"""Warnings of the models' packages silenced during a benchmark run (they repeat on every model call)."""
GAS_MARGIN_A = 5.0
"""A gas molecule given without a cell is evaluated in a cubic box of edge extent + model reach + this (Å)."""


@dataclass
class TaskSummary:
    """What one task did and how the model scored."""

    task: str
    property: str
    n_structures: int
    n_computed: int
    n_skipped: int
    """Finished in an earlier run (not recomputed)."""
    n_failed: int
    missing_files: list[str]
    metrics: dict[str, Any]
    time_per_structure_s: float | None
    """Mean wall time of one structure's calculation (s), over the structures with a result."""
    table: str
    plot: str | None
    leaderboard: str
    errors: list[str] = field(default_factory=list)


@dataclass
class BenchSummary:
    """The whole benchmark run (also written to ``summary.json``)."""

    benchmark: str
    model: str
    protocol: str
    structures: str
    out: str
    tasks: dict[str, TaskSummary]
    started_at: str
    finished_at: str
    wall_time_s: float
    matcalc_version: str

    def to_dict(self) -> dict[str, Any]:
        return jsonable(asdict(self))

    def leaderboard(self) -> list[str]:
        """One line per task."""
        return [t.leaderboard for t in self.tasks.values()]


# ---------------------------------------------------------------------------- structure sets
def _set_files(structures: Path, set_name: str) -> tuple[list[Path], list[str]]:
    """``(present files, missing files)`` of one set: from ``structures.yaml`` when it lists the set, else
    every structure file of ``structures/<set_name>/`` (sorted)."""
    listing = _yaml_sets(structures)
    if set_name in listing:
        listed = _expand(listing, set_name, set())
        present = [structures / f for f in listed if (structures / f).is_file()]
        missing = [f for f in listed if not (structures / f).is_file()]
        return present, missing
    folder = structures / set_name
    files = sorted(f for f in folder.iterdir() if f.is_file() and f.suffix.lower() in STRUCTURE_SUFFIXES
                   and f.name != GOLDDAC_REFERENCE) if folder.is_dir() else []
    return files, []


def _yaml_sets(structures: Path) -> dict[str, list[str]]:
    path = structures / "structures.yaml"
    if not path.is_file():
        return {}
    import yaml

    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    return {k: [str(x).strip() for x in v] for k, v in data.items() if isinstance(v, list)}


def _expand(listing: dict[str, list[str]], name: str, seen: set[str]) -> list[str]:
    out: list[str] = []
    for entry in listing[name]:
        if entry in listing and entry not in seen:  # a set made of other sets ("main_set: [essential, ...]")
            out += _expand(listing, entry, seen | {name})
        elif entry not in out:
            out.append(entry)
    return out


def _has_set(structures: Path, set_name: str) -> bool:
    return (structures / set_name).is_dir()


def parse_tasks(tasks: str | Sequence[str] | None, structures: Path) -> list[str]:
    """The task names to run, in MOFSimBench's order; ``None``: every task whose folder exists.
    ``ValueError`` for an unknown task."""
    if tasks is None:
        chosen = [t for t in TASKS if _has_set(structures, TASKS[t].structure_set)]
        if not chosen:
            raise FileNotFoundError(f"{structures} has none of the MOFSimBench folders "
                                    f"({', '.join(sorted({t.structure_set for t in TASKS.values()}))})")
        return chosen
    names = [t.strip().lower() for t in (tasks.split(",") if isinstance(tasks, str) else tasks) if t.strip()]
    unknown = [t for t in names if t not in TASKS]
    if unknown or not names:
        raise ValueError(f"unknown task(s) {', '.join(unknown) or '(none given)'}; tasks are {', '.join(TASKS)}")
    return [t for t in TASKS if t in names]


def _smallest_first(files: list[Path]) -> list[Path]:
    from matcalc.structures import DEFAULT_MAX_ATOMS, read_structure

    sizes = []
    for f in files:
        try:  # matcalc's reader: no ASE CIF-setting warnings, and a symmetry bomb refused before expanding
            sizes.append(len(read_structure(f, max_atoms=DEFAULT_MAX_ATOMS)))
        except Exception:  # noqa: BLE001 - unreadable files are reported by the run itself
            sizes.append(10**9)
    return [f for _, f in sorted(zip(sizes, files, strict=True), key=lambda p: p[0])]


# ---------------------------------------------------------------------------- GoldDAC
def read_golddac_references(path: Path) -> dict[str, M.GoldDACReference]:
    """DFT energies (and forces) of GoldDAC's complexes from its ``test.xyz`` (``info["name"]``)."""
    from ase.io import read

    out = {}
    for atoms in read(path, ":"):
        info = atoms.info
        forces = atoms.arrays.get("REF_forces")
        out[str(info["name"])] = M.GoldDACReference(
            float(info["DFT_E_total"]), float(info["DFT_E_mof"]), float(info["DFT_E_gas"]),
            None if forces is None else np.asarray(forces, dtype=float))
    return out


def _golddac_inputs(structures: Path, model_reach_A: float, work: Path,
                    reference: Path | None) -> tuple[list[Path], list[str], dict[str, M.GoldDACReference]]:
    """The single-point inputs of the interaction-energy task, the missing files, and the DFT references.

    Complexes, frameworks and gases are MOFSimBench's golddac files; when the folder holds only GoldDAC's
    ``test.xyz`` they are made from it as MOFSimBench's notebook does (each complex as given, its framework
    = the tag-0 atoms of the first complex of each ``{MOF}_{gas}`` group, the gases from ``ase.build``).
    A gas without a cell is put in a cubic vacuum box beyond the model's reach (copies under ``work``)."""
    from ase.build import molecule
    from ase.io import read, write

    ref_path = reference or next((p for p in (structures / "golddac" / GOLDDAC_REFERENCE,
                                              structures / GOLDDAC_REFERENCE) if p.is_file()), None)
    refs = read_golddac_references(ref_path) if ref_path is not None else {}
    files, missing = _set_files(structures, "golddac")
    work.mkdir(parents=True, exist_ok=True)
    if not files and ref_path is not None:  # extract from test.xyz
        first_of_group: set[str] = set()
        for atoms in read(ref_path, ":"):
            name = str(atoms.info["name"])
            write(work / f"{name}.xyz", atoms, format="extxyz")
            files.append(work / f"{name}.xyz")
            parts = M.golddac_parts(name)
            if parts is not None and parts[0] not in first_of_group:
                first_of_group.add(parts[0])
                write(work / f"{parts[0]}.xyz", atoms[atoms.get_tags() == 0], format="extxyz")
                files.append(work / f"{parts[0]}.xyz")
        for gas_name in ("CO2", "H2O"):
            write(work / f"{gas_name}.xyz", molecule(gas_name), format="extxyz")
            files.append(work / f"{gas_name}.xyz")
        missing = []
    out = []
    for f in files:
        if f.stem in ("CO2", "H2O"):
            gas = read(f, index=-1)
            assert isinstance(gas, Atoms)
            if not gas.pbc.any() or gas.cell.rank < 3:
                extent = float(np.ptp(gas.positions, axis=0).max()) if len(gas) > 1 else 0.0
                edge = extent + model_reach_A + GAS_MARGIN_A
                boxed = gas.copy()
                boxed.cell = np.eye(3) * edge
                boxed.pbc = True
                boxed.positions += boxed.cell.sum(axis=0) / 2 - gas.positions.mean(axis=0)
                f = work / f"boxed_{f.stem}" / f"{f.stem}.xyz"
                f.parent.mkdir(exist_ok=True)
                write(f, boxed, format="extxyz")
        out.append(f)
    return out, missing, refs


# ---------------------------------------------------------------------------- the benchmark
def mofsimbench(model: str, structures: str | Path, out: str | Path, *, tasks: str | Sequence[str] | None = None,
                protocol: str | None = None, cluster: Any = "inprocess", limit: int | None = None,
                smallest: bool = False, params: Mapping[str, Mapping[str, Any]] | None = None,
                device: str | None = None, workers: int | None = None, cache: bool | None = None,
                golddac_reference: str | Path | None = None, show_progress: bool = True) -> BenchSummary:
    """Run MOFSimBench with ``model`` on the structure sets under ``structures``; results and metrics to ``out``.

    Args:
        model: a registered or uploaded model name (``"chgnet"``, ``"sevennet+d3"``...).
        structures: folder laid out as MOFSimBench's ``experiments/structures`` (see the module docs).
        out: output folder (created); rerunning with the same ``out`` skips finished structures.
        tasks: comma-separated string or list of ``optimization, stability, bulk_modulus, heat_capacity,
            interaction_energy``; default: every task whose structure folder exists.
        protocol: ``"mofsimbench"`` (default: MOFSimBench's scripts) or ``"fast"``.
        cluster: ``"inprocess"`` (default), ``"local"`` (one dask cluster for all tasks), a scheduler address
            or a `matcalc.cluster.Cluster`.
        limit: at most this many structures per task (the first ones of each set, or with ``smallest`` the
            smallest cells); not for ``interaction_energy`` (each complex needs its framework and gas).
        params: per-task keyword overrides, ``{"stability": {"npt_steps": 5000}}`` (part of the resume key).
        device, workers, cache: as `matcalc.runner.run_batch` (``cache=False``: always compute).
        golddac_reference: GoldDAC's ``test.xyz`` with the DFT energies (default: looked for in ``structures``).

    Returns:
        `BenchSummary` (also ``out/summary.json``).

    Raises:
        ValueError: an unknown task, a bad protocol or parameter, a model that cannot load.
        FileNotFoundError: ``structures`` or a requested task's folder is missing.
    """
    from matcalc import __version__, provenance
    from matcalc.calculations import property_function
    from matcalc.calculations.contract import check_protocol
    from matcalc.runner import run_batch

    t0 = time.perf_counter()
    started = provenance.utc_now()
    root = Path(structures).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"structures folder {root} does not exist")
    names = parse_tasks(tasks, root)
    protocol_name = check_protocol(protocol)
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be an integer >= 1, got {limit!r}")
    overrides = {k.lower(): dict(v) for k, v in (params or {}).items()}
    if unknown := sorted(set(overrides) - set(TASKS)):
        raise ValueError(f"params for unknown task(s) {', '.join(unknown)}; tasks are {', '.join(TASKS)}")
    for name in names:
        set_name = TASKS[name].structure_set
        if not _has_set(root, set_name) and not (name == "interaction_energy" and golddac_reference):
            raise FileNotFoundError(f"task {name} reads {root / set_name}/, which does not exist")
        try:  # every parameter checked against its declaration before any work
            property_function(TASKS[name].prop).property.resolve(protocol_name, overrides.get(name))
        except TypeError as exc:
            raise ValueError(f"task {name}: {exc}") from None
    potential = _load_model(model, device)
    out_dir = Path(out).expanduser()
    out_dir.mkdir(parents=True, exist_ok=True)

    plans: dict[str, tuple[list[Path], list[str], dict[str, M.GoldDACReference]]] = {}
    for name in names:
        if name == "interaction_energy":
            reach = _model_reach_A(model, potential)
            ref = Path(golddac_reference).expanduser() if golddac_reference else None
            if ref is not None and not ref.is_file():
                raise FileNotFoundError(f"golddac_reference {ref} does not exist")
            plans[name] = _golddac_inputs(root, reach, out_dir / "inputs" / "golddac", ref)
        else:
            files, missing = _set_files(root, TASKS[name].structure_set)
            plans[name] = (files, missing, {})
        files, missing, _ = plans[name]
        if missing:
            log.warning("mofsimbench %s: %d file(s) of the %s set are missing and skipped: %s", name, len(missing),
                        TASKS[name].structure_set, ", ".join(missing))
        if not files:
            raise FileNotFoundError(f"task {name}: no structure files found for the {TASKS[name].structure_set} set "
                                    f"under {root}")
        if limit is not None and name != "interaction_energy":
            plans[name] = ((_smallest_first(files) if smallest else files)[:limit], missing, plans[name][2])

    owned = None
    if isinstance(cluster, str) and cluster.lower() == "local":
        from matcalc.cluster.local import start

        cluster = owned = start(n_workers=workers, preload=(model,))
    summaries: dict[str, TaskSummary] = {}
    try:
        with warnings.catch_warnings():  # third-party noise (models' own warnings) stays out of the user's output
            for message in THIRD_PARTY_NOISE:
                warnings.filterwarnings("ignore", message=message, category=UserWarning)
            for name in names:
                files, missing, refs = plans[name]
                summaries[name] = _run_task(TASKS[name], files, missing, refs, model, out_dir, cluster,
                                            protocol_name, overrides.get(name, {}), workers, cache, show_progress,
                                            run_batch)
    finally:
        if owned is not None:
            owned.close()
    summary = BenchSummary(benchmark="mofsimbench", model=model, protocol=protocol_name, structures=str(root),
                           out=str(out_dir), tasks=summaries, started_at=started, finished_at=provenance.utc_now(),
                           wall_time_s=time.perf_counter() - t0, matcalc_version=__version__)
    (out_dir / "summary.json").write_text(json.dumps(summary.to_dict(), indent=2, allow_nan=False) + "\n",
                                          encoding="utf-8")
    (out_dir / "leaderboard.txt").write_text("\n".join(summary.leaderboard()) + "\n", encoding="utf-8")
    return summary


def _load_model(model: str, device: str | None) -> Any:
    from matcalc.models import get_model

    if not isinstance(model, str) or not model.strip():
        raise ValueError(f"model must be a model name, got {model!r}")
    try:
        return get_model(model, device)
    except Exception as exc:  # any loading failure is the same clear error, before any work
        raise ValueError(f"model {model!r} cannot be loaded: {type(exc).__name__}: {exc}") from exc


def _model_reach_A(model: str, potential: Any) -> float:
    """How far the model (with D3 when ``+d3``) sees (Å)."""
    from matcalc.models.d3 import D3_CUTOFF_A

    reach = float(getattr(potential, "cutoff_A", None) or 6.0)
    return max(reach, D3_CUTOFF_A) if model.lower().endswith("+d3") else reach


def _run_task(task: Task, files: list[Path], missing: list[str], refs: dict[str, M.GoldDACReference], model: str,
              out_dir: Path, cluster: Any, protocol: str, params: dict[str, Any], workers: int | None,
              cache: bool | None, show_progress: bool, run_batch: Callable[..., Any]) -> TaskSummary:
    from matcalc.runner import Journal, read_table

    runs = out_dir / "runs"
    runs.mkdir(exist_ok=True)
    table_path = runs / f"{task.name}.csv"
    batch = run_batch(task.prop, [str(f) for f in files], model=model, out=table_path, cluster=cluster,
                      protocol=protocol, params=params, workers=workers, show_progress=show_progress, cache=cache)
    keys = [r["key"] for r in read_table(table_path) if "key" in r]
    journal = Journal(batch.journal).read()
    rows = [journal[k] for k in keys if k in journal]
    scorer = SCORERS[task.name]
    scored = scorer(rows, refs) if task.name == "interaction_energy" else scorer(rows)
    csv_path = out_dir / f"{task.name}.csv"
    scored.table.to_csv(csv_path, index=False)
    plot_path: Path | None = out_dir / f"{task.name}.png"
    try:
        _plot(task, scored, model, out_dir / f"{task.name}.png")
    except Exception as exc:  # noqa: BLE001 - a plot never loses the numbers
        log.warning("mofsimbench %s: plot failed: %s", task.name, exc)
        plot_path = None
    times = [float(r["result"]["wall_time_s"]) for r in rows
             if r.get("status") == "COMPLETED" and isinstance(r.get("result"), dict) and r["result"].get("wall_time_s")]
    per_structure = float(np.mean(times)) if times else None
    n_failed = sum(1 for r in rows if r.get("status") != "COMPLETED")
    value = scored.metrics.get(task.headline)
    shown = "n/a" if value is None else f"{value:.4g}{(' ' + task.unit) if task.unit else ''}"
    n_key = "n_structures" if task.name == "stability" else "n_compared"
    line = (f"MOFSimBench | {model} | {task.name} | {task.headline_text} = {shown} | "
            f"n = {scored.metrics.get(n_key)} of {len(rows)} ({n_failed} failed, {len(missing)} missing) | "
            f"{'n/a' if per_structure is None else f'{per_structure:.1f}'} s/structure | protocol {protocol}")
    return TaskSummary(task=task.name, property=task.prop, n_structures=len(rows), n_computed=batch.n_computed,
                       n_skipped=batch.n_skipped, n_failed=n_failed, missing_files=missing, metrics=scored.metrics,
                       time_per_structure_s=per_structure, table=str(csv_path),
                       plot=None if plot_path is None else str(plot_path), leaderboard=line, errors=batch.errors)


# ---------------------------------------------------------------------------- plots
_PARITY: dict[str, tuple[str, str, str, str]] = {
    "optimization": ("dft_volume_A3", "final_volume_A3", "DFT-optimised volume per atom (Å³/atom)",
                     "relaxed volume per atom (Å³/atom)"),
    "bulk_modulus": ("dft_bulk_modulus_GPa", "bulk_modulus_GPa", "DFT bulk modulus (GPa)", "model bulk modulus (GPa)"),
    "heat_capacity": ("dft_cv_300K_J_per_K_g", "cv_300K_J_per_K_g", "DFT Cv at 300 K (J/(K·g))",
                      "model Cv at 300 K (J/(K·g))"),
    "interaction_energy": ("dft_interaction_energy_eV", "interaction_energy_eV", "DFT interaction energy (eV)",
                           "model interaction energy (eV)"),
}


def _plot(task: Task, scored: M.TaskMetrics, model: str, path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.0, 4.6), layout="constrained")
    ax = fig.add_subplot()
    table = scored.table
    value = scored.metrics.get(task.headline)
    title = f"{model}: {task.headline_text} = {'n/a' if value is None else f'{value:.3g} {task.unit}'}"
    if task.name == "stability":
        dv = table["volume_change_percent"].dropna().to_numpy(dtype=float)
        ax.hist(dv, bins=max(5, min(40, len(dv))), color="C0")
        for x in (-M.STABLE_VOLUME_CHANGE_PERCENT, M.STABLE_VOLUME_CHANGE_PERCENT):
            ax.axvline(x, color="C3", ls="--", lw=1)
        ax.set_xlabel("volume change after NPT (%)")
        ax.set_ylabel("structures")
    else:
        xcol, ycol, xlabel, ylabel = _PARITY[task.name]
        x = table[xcol].to_numpy(dtype=float)
        y = table[ycol].to_numpy(dtype=float)
        if task.name == "optimization":
            x = x / table["dft_n_atoms"].to_numpy(dtype=float)
            y = y / table["n_atoms"].to_numpy(dtype=float)
        kept = np.ones(len(table), dtype=bool)
        if task.name == "bulk_modulus":
            kept = (table["excluded"] == "").to_numpy()
            ax.plot(x[~kept], y[~kept], "x", color="0.5", label="excluded")
        ax.plot(x[kept], y[kept], "o", color="C0", ms=4, label="structures")
        finite = np.isfinite(x) & np.isfinite(y)
        if finite.any():
            lo, hi = float(min(x[finite].min(), y[finite].min())), float(max(x[finite].max(), y[finite].max()))
            pad = 0.05 * (hi - lo or abs(hi) or 1.0)
            ax.plot([lo - pad, hi + pad], [lo - pad, hi + pad], "-", color="0.6", lw=1, label="y = x")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.legend(fontsize="small")
    ax.set_title(title, fontsize="medium")
    fig.savefig(path, dpi=120)


__all__ = ["TASKS", "BenchSummary", "Task", "TaskSummary", "mofsimbench", "parse_tasks", "read_golddac_references"]
