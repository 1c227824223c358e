"""Harmonic phonons with phonopy: band structure along a standard path, total DOS, thermal properties.

Pre-relax (BFGS + ``FrechetCellFilter``), then phonopy's finite displacements of the input cell, every
displaced supercell evaluated in one batched request, force constants (optionally symmetrised), and from
them: frequencies along a band path, the total density of states and the harmonic thermal properties on a
q-point mesh (exactly as `matcalc.calculations.heat_capacity.heat_capacity` computes them).

Conventions (documented choices):

* The input cell is phonopy's unit and primitive cell (``primitive_matrix="P"``, as in ``heat_capacity``):
  a conventional cell gives the bands of that cell (folded), and thermal properties per mole of it.
* ``band_path="auto"``: ASE's standard path for the cell's Bravais lattice (Setyawan–Curtarolo,
  ``ase.cell.Cell.bandpath``: special points in the reduced reciprocal coordinates of this very cell, for any
  setting), sampled with phonopy's own helper (``band_points`` q-points per segment between two special
  points). A path is written as special-point labels, pieces separated by commas (``"GXWKGLUWLK,UX"``;
  ``G`` is Γ); a junction of two pieces is labelled ``"K|U"``.
* Band distances are phonopy's path lengths in reciprocal space, 1/Å (no 2π).
* Total DOS: phonopy's tetrahedron method on the q-point mesh, states per THz per input cell (integrates
  to 3 × n_atoms).
* Imaginary modes: as in ``heat_capacity`` (below −0.1 THz, Γ acoustic modes excluded), listed with the
  irreducible mesh q-points where they occur (reduced coordinates), lowest first.
"""

from __future__ import annotations

import re
import warnings as pywarnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
from ase import Atoms

from matcalc import progress
from matcalc.calculations.contract import Choice, Flag, ModelInfo, Number, Param, PreRelax, Property, Run
from matcalc.calculations.heat_capacity import (
    IMAGINARY_TOLERANCE_THZ,
    MAX_MESH_MODES,
    HeatCapacityResult,
    check_phonon_size,
    check_temperatures,
    count_imaginary,
    displaced_supercells,
    make_phonopy,
    phonon_params,
    set_forces,
    thermal_fields,
)
from matcalc.structures import bare_copy

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure
    from phonopy import Phonopy

MAX_STORED_FORCE_CONSTANTS = 4_000_000
"""Largest force-constant array kept in the result (numbers: n_atoms × supercell atoms × 9); beyond it
``to_phonopy()`` is unavailable (a warning says so)."""
MAX_IMAGINARY_QPOINTS = 1000
"""At most this many imaginary q-points are listed (the lowest)."""
_PATH_RE = re.compile(r"^[A-Za-z][A-Za-z0-9]*(,[A-Za-z][A-Za-z0-9]*)*$")


@dataclass(frozen=True)
class BandPath:
    """A band path: ``"auto"`` or special-point labels of the cell (ASE's notation, pieces separated by
    commas, e.g. ``"GXWKGLUWLK,UX"``); the labels are checked against the structure's lattice."""

    max_length: int = 200

    def coerce(self, name: str, value: Any) -> Any:
        what = (f'{name} must be "auto" or special-point labels such as "GXWKGLUWLK,UX" (pieces separated by '
                f"commas, each of at least two points)")
        if not isinstance(value, str):
            raise ValueError(f"{what}, got {value!r}")
        text = value.strip()
        if text.lower() == "auto":
            return "auto"
        if not text or len(text) > self.max_length or not _PATH_RE.match(text):
            raise ValueError(f"{what}, got {value!r}")
        from ase.dft.kpoints import parse_path_string

        if any(len(piece) < 2 for piece in parse_path_string(text)):
            raise ValueError(f"{what}, got {value!r}")
        return text

    def annotation(self) -> Any:
        return str

    def json_schema(self) -> dict[str, Any]:
        return {"type": "string", "minLength": 1, "maxLength": self.max_length,
                "pattern": r"^[A-Za-z][A-Za-z0-9]*(,[A-Za-z][A-Za-z0-9]*)*$",
                "description": '"auto" or special-point labels of the cell, e.g. "GXWKGLUWLK,UX" (G = Γ)'}

    def describe(self) -> str:
        return "`auto` or special-point labels (e.g. `GXWKGLUWLK,UX`; `G` = Γ)"

    def from_text(self, name: str, text: str) -> Any:
        return text


@dataclass(kw_only=True)
class PhononResult(HeatCapacityResult):
    """Phonon band structure (THz along a path in 1/Å), total DOS (states/THz per input cell) and the
    harmonic thermal properties of `HeatCapacityResult` (K; per mole of the input cell; per gram)."""

    kind: ClassVar[str] = "phonons"

    band_path: str = ""
    """The path computed (ASE labels; ``G`` = Γ; commas separate disconnected pieces)."""
    band_distances_per_A: np.ndarray = field(repr=False)
    """Distance along the path of every band q-point (1/Å, phonopy's convention: no 2π)."""
    band_frequencies_THz: np.ndarray = field(repr=False)
    """Frequencies (THz) at every band q-point: shape (q-points, 3 × n_atoms); imaginary < 0."""
    band_qpoints: np.ndarray = field(repr=False)
    """Band q-points in reduced coordinates of the input cell's reciprocal lattice."""
    band_segment_sizes: list[int] = field(default_factory=list)
    """Number of q-points in each segment (between two special points), in path order."""
    band_labels: list[str] = field(default_factory=list)
    """Special-point labels along the path (Γ written out; ``"K|U"`` at a break of the path)."""
    band_label_distances_per_A: list[float] = field(default_factory=list)
    """Distance (1/Å) of each label in `band_labels`."""
    band_lowest_frequency_THz: float = float("nan")
    """Lowest frequency on the path, Γ acoustic modes excluded (negative = imaginary)."""
    band_imaginary_modes: int = 0
    """Modes on the path below −``imaginary_tolerance_THz`` (Γ acoustic modes excluded)."""
    dos_frequencies_THz: np.ndarray = field(repr=False)
    dos_states_per_THz: np.ndarray = field(repr=False)
    """Total phonon DOS (states per THz per input cell; integrates to 3 × n_atoms); empty with ``dos="none"``."""
    imaginary_qpoints: np.ndarray = field(repr=False)
    """Irreducible mesh q-points (reduced coordinates) with an imaginary mode, lowest first (at most 1000)."""
    imaginary_qpoint_frequencies_THz: np.ndarray = field(repr=False)
    """Lowest frequency (THz, negative) at each of `imaginary_qpoints`."""
    supercell: list[int] = field(default_factory=list)
    symmetrized_force_constants: bool = False
    force_constants_eV_per_A2: np.ndarray = field(repr=False)
    """phonopy's compact force constants (input-cell atoms × supercell atoms × 3 × 3, eV/Å²); empty when too
    large to keep (`MAX_STORED_FORCE_CONSTANTS`)."""

    @property
    def band_distances(self) -> np.ndarray:
        """Alias of `band_distances_per_A` (the issue's name)."""
        return self.band_distances_per_A

    def to_phonopy(self) -> Phonopy:
        """A ``phonopy.Phonopy`` of the computed cell and supercell with its force constants set: continue in
        phonopy (``run_mesh``, ``auto_band_structure``, ``plot_band_structure_and_dos``, ``save``...)."""
        fc = np.asarray(self.force_constants_eV_per_A2, dtype=float)
        if self.relaxed_structure is None or fc.ndim != 4:
            raise ValueError("this result keeps no force constants (too large, see warnings): run phonons() "
                             "again locally and use phonopy directly")
        phonon = make_phonopy(self.relaxed_structure, self.supercell)
        phonon.force_constants = fc
        return phonon

    def segments(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """(distances 1/Å, frequencies THz) of each band segment, in path order."""
        out, start = [], 0
        for size in self.band_segment_sizes:
            out.append((self.band_distances_per_A[start:start + size], self.band_frequencies_THz[start:start + size]))
            start += size
        return out

    def plot(self, ax: Axes | None = None) -> Figure:
        """Bands (THz along the path) beside the total DOS (states/THz); with ``ax``, the DOS is drawn in an
        inset to its right. Bands alone when the DOS was not computed (``dos="none"``)."""
        with_dos = len(self.dos_frequencies_THz) > 0
        if ax is None:
            from matplotlib.figure import Figure

            fig = Figure(figsize=(7.5, 4.0) if with_dos else (6.0, 4.0), layout="constrained")
            if with_dos:
                ax_bands, ax_dos = fig.subplots(1, 2, sharey=True, gridspec_kw={"width_ratios": [3, 1]})
            else:
                ax_bands = fig.add_subplot()
        else:
            fig = ax.figure  # type: ignore[assignment]
            ax_bands = ax
            if with_dos:
                ax_dos = ax.inset_axes((1.04, 0.0, 0.3, 1.0), sharey=ax)
        self._plot_bands(ax_bands)
        if with_dos:
            self._plot_dos(ax_dos)
        return fig

    def _plot(self, ax: Axes) -> None:
        self._plot_bands(ax)

    def _plot_bands(self, ax: Axes) -> None:
        for d, f in self.segments():
            ax.plot(d, f, "-", color="C0", lw=1)
        for x in self.band_label_distances_per_A:
            ax.axvline(x, color="0.7", lw=0.8)
        ax.axhline(0.0, color="0.5", lw=0.8, ls=":")
        ax.set_xticks(self.band_label_distances_per_A, self.band_labels)
        if len(self.band_distances_per_A):
            ax.set_xlim(self.band_distances_per_A[0], self.band_distances_per_A[-1])
        ax.set_xlabel("wave vector along the path (1/Å)")
        ax.set_ylabel("frequency (THz)")
        ax.set_title(f"{self.formula} ({self.model})")

    def _plot_dos(self, ax: Axes) -> None:
        ax.plot(self.dos_states_per_THz, self.dos_frequencies_THz, "-", color="C1", lw=1)
        ax.axhline(0.0, color="0.5", lw=0.8, ls=":")
        ax.set_xlabel("DOS (states/THz)")
        ax.set_xlim(left=0)
        ax.tick_params(labelleft=False)
        ax.yaxis.set_label_position("right")
        ax.set_ylabel("frequency (THz)")


def band_path_points(atoms: Atoms, path: str) -> tuple[str, list[list[str]], dict[str, np.ndarray]]:
    """(path text, labels per connected piece, special points in reduced reciprocal coordinates of ``atoms``'
    cell) of ``path`` (``"auto"``: ASE's standard path of the cell's lattice). ``ValueError`` naming
    ``band_path`` for labels the lattice does not have."""
    from ase.dft.kpoints import parse_path_string

    try:
        standard = atoms.cell.bandpath(npoints=0)
    except Exception as exc:  # noqa: BLE001 - ASE raises several kinds for odd cells
        raise ValueError(f"band_path: no standard path for this cell ({type(exc).__name__}: {exc})") from None
    text = standard.path if path == "auto" else path
    special = {k: np.asarray(v, dtype=float) for k, v in standard.special_points.items()}
    pieces = parse_path_string(text)
    unknown = sorted({lab for piece in pieces for lab in piece} - set(special))
    if unknown:
        raise ValueError(f"band_path {path!r}: {', '.join(unknown)} are not special points of this cell's "
                         f"lattice (it has {', '.join(sorted(special))})")
    return text, pieces, special


def _display(label: str) -> str:
    return "Γ" if label == "G" else label


def check_phonons(params: dict[str, Any], atoms: Atoms, model: ModelInfo | None = None) -> None:
    """Supercell and mesh size (as ``heat_capacity``), band-path labels and size, before any model call."""
    check_phonon_size(params, atoms, model)
    _, pieces, _ = band_path_points(atoms, params["band_path"])
    n_q = sum(len(p) - 1 for p in pieces) * params["band_points"]
    modes = n_q * 3 * len(atoms)
    if modes > MAX_MESH_MODES:
        raise ValueError(f"band_points: {n_q} band q-points × {3 * len(atoms)} bands = {modes:.3g} modes exceed the "
                         f"limit {MAX_MESH_MODES:.3g}")


def run_bands(phonon: Phonopy, pieces: list[list[str]], special: dict[str, np.ndarray],
              band_points: int) -> dict[str, Any]:
    """Band structure of ``phonon`` (force constants set) along the labelled path: the band fields of
    `PhononResult`."""
    from phonopy.phonon.band_structure import get_band_qpoints_and_path_connections

    coords = [[special[lab] for lab in piece] for piece in pieces]
    qpoints, connections = get_band_qpoints_and_path_connections(coords, npoints=band_points)
    bands = phonon.run_band_structure(qpoints, path_connections=connections)
    distances = [np.asarray(d, dtype=float) for d in bands.distances]
    frequencies = [np.asarray(f, dtype=float) for f in bands.frequencies]
    labels: list[str] = []
    label_x: list[float] = []
    segment = 0
    for piece in pieces:
        for k, lab in enumerate(piece):
            if k == 0:
                x = float(distances[segment][0])
                if labels and np.isclose(label_x[-1], x):
                    labels[-1] = f"{labels[-1]}|{_display(lab)}"
                else:
                    labels.append(_display(lab))
                    label_x.append(x)
            else:
                labels.append(_display(lab))
                label_x.append(float(distances[segment][-1]))
                segment += 1
    all_q = np.concatenate([np.asarray(q, dtype=float) for q in qpoints])
    all_f = np.concatenate(frequencies)
    n_imag, lowest = count_imaginary(all_q, all_f, IMAGINARY_TOLERANCE_THZ)
    return {
        "band_distances_per_A": np.concatenate(distances),
        "band_frequencies_THz": all_f,
        "band_qpoints": all_q,
        "band_segment_sizes": [len(d) for d in distances],
        "band_labels": labels,
        "band_label_distances_per_A": label_x,
        "band_lowest_frequency_THz": lowest,
        "band_imaginary_modes": n_imag,
    }


def imaginary_qpoints(qpoints: np.ndarray, frequencies: np.ndarray,
                      tolerance_THz: float = IMAGINARY_TOLERANCE_THZ) -> tuple[np.ndarray, np.ndarray]:
    """(q-points, lowest frequency at each) of the q-points with a mode below −tolerance (Γ acoustic modes
    excluded, as `count_imaginary`), lowest first, at most `MAX_IMAGINARY_QPOINTS`."""
    q = np.asarray(qpoints, dtype=float)
    f = np.asarray(frequencies, dtype=float)
    found = []
    for i in range(len(q)):
        n, lowest = count_imaginary(q[i:i + 1], f[i:i + 1], tolerance_THz)
        if n:
            found.append((lowest, i))
    found.sort()
    found = found[:MAX_IMAGINARY_QPOINTS]
    return (q[[i for _, i in found]].reshape(-1, 3), np.array([lo for lo, _ in found], dtype=float))


def compact_force_constants(phonon: Phonopy) -> np.ndarray:
    """phonopy's compact force constants (primitive atoms × supercell atoms × 3 × 3) of ``phonon``."""
    fc = np.asarray(phonon.force_constants)
    n_prim = len(phonon.primitive)
    return fc if fc.shape[0] == n_prim else fc[np.asarray(phonon.primitive.p2s_map)]


def _compute(run: Run) -> dict[str, Any]:
    p = run.params
    relaxed = bare_copy(run.atoms)
    path_text, pieces, special = band_path_points(relaxed, p["band_path"])

    phonon = make_phonopy(relaxed, p["supercell"])
    supercells = displaced_supercells(phonon, p["displacement"])
    progress.report("phonons", 0, len(supercells))
    evaluations = run.prep.evaluator.evaluate(supercells)
    progress.report("phonons", len(supercells), len(supercells))
    max_drift = set_forces(phonon, [e.forces_eV_per_A for e in evaluations], symmetrize=p["symmetrize_fc"])
    with pywarnings.catch_warnings(record=True) as caught:
        pywarnings.simplefilter("always")
        fields = thermal_fields(phonon, relaxed, p, run.warnings)
        mesh = phonon.mesh
        q_imag, f_imag = imaginary_qpoints(np.asarray(mesh.qpoints), np.asarray(mesh.frequencies))
        if p["dos"] == "none":
            dos_f = dos_g = np.zeros(0)
        else:  # phonopy's default frequency sampling (201 points); smearing: its default sigma
            phonon.run_total_dos(use_tetrahedron_method=p["dos"] == "tetrahedron")
            dos_f, dos_g = phonon.total_dos.frequency_points, phonon.total_dos.dos
        bands = run_bands(phonon, pieces, special, p["band_points"])
    run.warnings.extend(f"phonopy: {w.message}" for w in caught if "GammaAcoustic" in type(w.message).__name__)
    if bands["band_imaginary_modes"] and not fields["imaginary_modes"]:
        run.warnings.append(f"{bands['band_imaginary_modes']} imaginary mode(s) on the band path (lowest "
                            f"{bands['band_lowest_frequency_THz']:.3f} THz) though none on the q-point mesh")
    fc = compact_force_constants(phonon)
    if fc.size > MAX_STORED_FORCE_CONSTANTS:
        run.warnings.append(f"force constants ({fc.size:.3g} numbers) are too large to keep in the result "
                            f"(limit {MAX_STORED_FORCE_CONSTANTS:.3g}): to_phonopy() is unavailable")
        fc = np.zeros((0,))
    progress.report("bands", 1, 1)
    return {
        **fields,
        "n_displacements": len(supercells),
        "max_drift_eV_per_A": max_drift,
        "band_path": path_text,
        **bands,
        "dos_frequencies_THz": np.asarray(dos_f, dtype=float),
        "dos_states_per_THz": np.asarray(dos_g, dtype=float),
        "imaginary_qpoints": q_imag,
        "imaginary_qpoint_frequencies_THz": f_imag,
        "supercell": [int(n) for n in p["supercell"]],
        "symmetrized_force_constants": bool(p["symmetrize_fc"]),
        "force_constants_eV_per_A2": fc,
    }


PROPERTY = Property(
    name="phonons",
    task_type="phonons",
    summary="Phonon band structure, total DOS and harmonic thermal properties of `structure` with `model` "
            "(phonopy).",
    details="""Pre-relax (BFGS + `FrechetCellFilter`), then phonopy's finite displacements of the input cell
    (`primitive_matrix="P"`), every displaced supercell evaluated in one batched request, force constants
    (symmetrised with `symmetrize_fc`), frequencies along `band_path` (`"auto"`: ASE's standard path of the
    cell's lattice), the total DOS (tetrahedron method) and the thermal properties on the q-point mesh, as
    `heat_capacity`. `result.to_phonopy()` returns a `phonopy.Phonopy` with the force constants.""",
    result=PhononResult,
    params=phonon_params() + (
        Param("band_path", BandPath(), "band path: `auto` (standard path of the lattice) or special-point labels",
              default="auto"),
        Param("band_points", Number(2, 1001, integer=True), "q-points per band segment (between two special points)",
              default=51, presets={"fast": 21}),
        Param("dos", Choice(("tetrahedron", "smearing", "none")), "total DOS: phonopy's tetrahedron method, "
              "Gaussian smearing (phonopy's default width; faster on large meshes), or none (bands and thermal "
              "properties only)", default="tetrahedron"),
        Param("symmetrize_fc", Flag(), "symmetrise the force constants (phonopy: translational and permutation "
              "symmetry)", default=False),
    ),
    prerelax=PreRelax(max_steps=1000, fast_max_steps=300, optimizer="BFGS"),  # as heat_capacity (MOFSimBench)
    compute=_compute,
    check=check_temperatures,
    check_structure=check_phonons,
)
phonons = PROPERTY.function


__all__ = ["PROPERTY", "BandPath", "PhononResult", "band_path_points", "check_phonons", "compact_force_constants",
           "imaginary_qpoints", "phonons", "run_bands"]
