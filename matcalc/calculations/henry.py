"""Henry coefficient and isosteric heat of adsorption at infinite dilution by Widom test-particle insertion.

A rigid guest is inserted into a rigid framework at uniformly random positions (its centre of mass uniform
in the cell) with uniformly random orientations (uniform on SO(3)). For each insertion
E_int = E(framework + guest) − E(framework) − E(isolated guest), the two references computed once (the
isolated guest in a cubic vacuum box, as `matcalc.calculations.interaction` does). With the Boltzmann
weight w = exp(−E_int / k_B T):

* K_H = ⟨w⟩ / (ρ_framework R T), in mol/(kg·Pa): ρ_framework in kg/m³, R in J/(mol·K), T in K
  (1/(kg/m³ · J/mol) = mol/(kg·Pa)); multiply by 1e5 for mol/(kg·bar).
* Q_st = R T − ⟨E_int w⟩ / ⟨w⟩ (kJ/mol; positive = exothermic adsorption), the isosteric heat at
  infinite dilution; ⟨E_int w⟩ / ⟨w⟩ is the Boltzmann-weighted mean interaction energy.

An insertion that puts a guest atom closer than ``overlap_distance_A`` to a framework atom (minimum image)
has zero weight and costs no model call. Standard errors come from block averages: the insertions, in
order, are cut into ``n_blocks`` contiguous blocks, each block gives its own estimate, and the error is the
standard deviation of the block estimates divided by √n_blocks.

The random stream (so that a test or a user can reproduce every insertion): ``rng =
numpy.random.default_rng(seed)``; ``centres = rng.random((n_insertions, 3))`` (fractional coordinates of
the guest's centre of mass); ``orientations = scipy.spatial.transform.Rotation.random(n_insertions,
rng=rng)``; guest atom positions ``orientations[i].apply(guest − guest centre of mass) + centres[i] @ cell``.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
from ase import Atoms
from scipy.spatial import cKDTree
from scipy.spatial.transform import Rotation

from matcalc import progress
from matcalc.calculations.contract import (
    ModelInfo,
    Molecule,
    Number,
    Param,
    Property,
    Run,
)
from matcalc.calculations.interaction import (
    DEFAULT_CUTOFF_A,
    EV_TO_KJ_PER_MOL,
    GUEST_MOLECULES,
    guest_box_A,
    guest_molecule,
)
from matcalc.calculations.results import Result
from matcalc.structures import bare_copy

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from matcalc.models import Evaluator

log = logging.getLogger(__name__)

GAS_CONSTANT_J_PER_MOL_K = 1.380649e-23 * 6.02214076e23
"""R = k_B N_A (J/(mol·K)), exact in the 2019 SI."""
AMU_KG = 1.66053906660e-27
"""Atomic mass unit (kg), CODATA 2018."""
MAX_INSERTIONS = 200_000
"""Upper bound of ``n_insertions`` (each insertion's energy is kept in the result: ~1.6 MB per 100 000)."""
TRACE_POINTS = 100
"""Points of the running-estimate trace (evenly spaced in the number of insertions)."""
MIN_IMAGE_GAP_A = 0.5
"""With ``overlap_distance_A = 0`` the guest must still stay this far (Å) from its own periodic image."""


# ---------------------------------------------------------------------------------------------- result
@dataclass(kw_only=True)
class HenryResult(Result):
    """Widom insertion of a rigid guest into a rigid framework. K_H in mol/(kg·Pa), energies eV (kJ/mol where
    the name says so), temperature K, density kg/m³, positions Å (fractional where the name says so).

    The base fields (``formula``, ``n_atoms``, ``structure_hash``) describe the framework.
    """

    kind: ClassVar[str] = "henry_coefficient"

    henry_mol_per_kg_Pa: float
    """K_H = ⟨exp(−E_int/k_B T)⟩ / (ρ_framework R T); overlapping insertions count with weight 0."""
    henry_error_mol_per_kg_Pa: float
    """Standard error of K_H from ``n_blocks`` block averages (NaN with fewer than two blocks)."""
    heat_of_adsorption_kJ_per_mol: float
    """Isosteric heat at infinite dilution Q_st = R T − ⟨E_int w⟩/⟨w⟩ (positive = exothermic); NaN when every
    insertion overlapped."""
    heat_of_adsorption_error_kJ_per_mol: float
    """Standard error of Q_st from the block averages."""
    boltzmann_mean_interaction_kJ_per_mol: float
    """⟨E_int w⟩/⟨w⟩: the Boltzmann-weighted mean interaction energy."""
    lowest_interaction_energy_eV: float
    """The lowest E_int of all insertions (NaN when every insertion overlapped)."""
    temperature_K: float
    n_insertions: int
    """Insertions made (fewer than asked only when a stop was requested: see ``stopped_early``)."""
    n_overlaps: int
    """Insertions closer than ``overlap_distance_A`` to a framework atom (weight 0, no model call)."""
    n_blocks: int
    """Blocks of the error estimate actually used."""
    framework_density_kg_per_m3: float
    framework_energy_eV: float
    guest_energy_eV: float
    """Energy of the isolated (rigid) guest in its cubic vacuum box of edge ``guest_box_A``."""
    guest_box_A: float
    guest_formula: str
    stopped_early: bool = False
    insertion_energies_eV: np.ndarray = field(repr=False)
    """E_int of every insertion in order (NaN = overlap: not evaluated)."""
    lowest_energies_eV: np.ndarray = field(repr=False)
    """E_int of the ``n_lowest`` lowest insertions, ascending."""
    lowest_indices: list[int] = field(default_factory=list, repr=False)
    """Their positions in the insertion sequence."""
    lowest_centres_frac: np.ndarray = field(repr=False)
    """Fractional coordinates of their guest centres of mass, shape (n_lowest, 3)."""
    lowest_structures: list[Atoms] = field(default_factory=list, repr=False)
    """The framework + guest complexes of the lowest insertions (framework tag 0, guest tag 1)."""
    trace_n_insertions: np.ndarray = field(repr=False)
    """Insertions done at each point of the running estimate."""
    trace_henry_mol_per_kg_Pa: np.ndarray = field(repr=False)
    trace_henry_error_mol_per_kg_Pa: np.ndarray = field(repr=False)

    @property
    def henry_mol_per_kg_bar(self) -> float:
        """K_H in mol/(kg·bar) (= 1e5 × mol/(kg·Pa))."""
        return self.henry_mol_per_kg_Pa * 1e5

    @property
    def non_overlap_fraction(self) -> float:
        """Share of insertions that did not overlap the framework."""
        return 1.0 - self.n_overlaps / self.n_insertions if self.n_insertions else float("nan")

    def plot(self, ax: Axes | None = None) -> Figure:
        """Convergence of K_H (left) and the histogram of insertion energies (right); with ``ax``, the
        convergence alone on it (`plot_histogram` draws the other panel)."""
        if ax is not None:
            return super().plot(ax)
        from matplotlib.figure import Figure

        fig = Figure(figsize=(10.0, 3.8), layout="constrained")
        left, right = fig.subplots(1, 2)
        self._plot(left)
        self.plot_histogram(right)
        return fig

    def _plot(self, ax: Axes) -> None:
        n = self.trace_n_insertions
        k = self.trace_henry_mol_per_kg_Pa
        err = self.trace_henry_error_mol_per_kg_Pa
        ax.plot(n, k, "-", color="C0", label="running K_H")
        ok = np.isfinite(err)
        ax.fill_between(n[ok], (k - err)[ok], (k + err)[ok], color="C0", alpha=0.25, lw=0, label="± standard error")
        ax.axhline(self.henry_mol_per_kg_Pa, color="0.4", ls=":", lw=1)
        ax.set_xlabel("insertions (count)")
        ax.set_ylabel("K_H (mol/(kg·Pa))")
        ax.set_title(f"{self.guest_formula} in {self.formula} ({self.model}), {self.temperature_K:g} K: "
                     f"K_H = {self.henry_mol_per_kg_Pa:.3g} ± {self.henry_error_mol_per_kg_Pa:.2g}, "
                     f"Q_st = {self.heat_of_adsorption_kJ_per_mol:.1f} kJ/mol", fontsize="small")
        ax.legend(fontsize="small")

    def plot_histogram(self, ax: Axes | None = None, bins: int = 60, window_kJ_per_mol: float = 60.0) -> Figure:
        """Histogram of E_int (kJ/mol) of the evaluated insertions from the lowest to ``window_kJ_per_mol``
        above it, with each bin's share of the Boltzmann weight (right axis)."""
        if ax is None:
            from matplotlib.figure import Figure

            fig = Figure(figsize=(5.5, 3.8), layout="constrained")
            ax = fig.add_subplot()
        else:
            fig = ax.figure
        e = self.insertion_energies_eV[np.isfinite(self.insertion_energies_eV)] * EV_TO_KJ_PER_MOL
        if e.size == 0:
            ax.text(0.5, 0.5, "every insertion overlapped the framework", ha="center", va="center",
                    transform=ax.transAxes)
            return fig
        lo = float(e.min())
        hi = lo + window_kJ_per_mol
        inside = e[e <= hi]
        counts, edges = np.histogram(inside, bins=bins, range=(lo, hi))
        ax.stairs(counts, edges, fill=True, color="C0", alpha=0.6, label="insertions")
        ax.set_xlabel("E_int (kJ/mol)")
        ax.set_ylabel("insertions (count)")
        rt = GAS_CONSTANT_J_PER_MOL_K * self.temperature_K / 1000.0
        w = np.exp(-(inside - lo) / rt)
        share, _ = np.histogram(inside, bins=edges, weights=w / w.sum())
        twin = ax.twinx()
        twin.stairs(share, edges, color="C3", label="Boltzmann weight share")
        twin.set_ylabel("Boltzmann weight (share)", color="C3")
        ax.set_title(f"{e.size} evaluated, {int((e > hi).sum())} above the window, {self.n_overlaps} overlaps",
                     fontsize="small")
        return fig


# ---------------------------------------------------------------------------------------------- geometry
def framework_density_kg_per_m3(framework: Atoms) -> float:
    """Mass density of the framework cell (kg/m³)."""
    mass_kg = float(framework.get_masses().sum()) * AMU_KG
    return mass_kg / (framework.get_volume() * 1e-30)


def cell_widths_A(atoms: Atoms) -> np.ndarray:
    """Perpendicular widths of the cell (Å): the distances between opposite faces."""
    cell = np.asarray(atoms.cell)
    volume = abs(float(np.linalg.det(cell)))
    return np.array([volume / np.linalg.norm(np.cross(cell[(i + 1) % 3], cell[(i + 2) % 3])) for i in range(3)])


def guest_extent_A(guest: Atoms) -> float:
    """Largest distance between two guest atoms (Å; 0 for one atom)."""
    pos = guest.get_positions()
    if len(pos) < 2:
        return 0.0
    return float(np.max(np.linalg.norm(pos[:, None, :] - pos[None, :, :], axis=-1)))


def boxed_guest(guest: Atoms, box_A: float) -> Atoms:
    """The guest centred in a cubic periodic box of edge ``box_A`` (Å), for its isolated energy."""
    boxed = guest.copy()
    boxed.cell = np.eye(3) * box_A
    boxed.pbc = True
    boxed.positions += boxed.cell.sum(axis=0) / 2 - guest.get_center_of_mass()
    return boxed


def check_guest_fits(framework: Atoms, guest: Atoms, overlap_distance_A: float, cutoff_A: float | None) -> str | None:
    """``ValueError`` unless ``framework`` is 3D periodic and ``guest`` stays clear of its own periodic images
    (cell width > guest extent + max(``overlap_distance_A``, 0.5 Å)); the warning when the guest is within the
    model cutoff of its images (not infinite dilution), else ``None``."""
    if not (np.all(framework.pbc) and framework.cell.rank == 3):
        raise ValueError("the framework must be 3D periodic (a cell with three lattice vectors and pbc=True)")
    width = float(cell_widths_A(framework).min())
    extent = guest_extent_A(guest)
    gap = max(overlap_distance_A, MIN_IMAGE_GAP_A)
    if width <= extent + gap:
        raise ValueError(f"the guest {guest.get_chemical_formula()} (extent {extent:.2f} Å) does not fit in the "
                         f"framework cell (smallest width {width:.2f} Å): it would come within {gap:g} Å of its "
                         "own periodic image; use a supercell")
    reach = extent + (cutoff_A or DEFAULT_CUTOFF_A)
    if width < reach:
        return (f"the cell's smallest width {width:.2f} Å is below the guest extent plus the model cutoff "
                f"({reach:.2f} Å): each guest interacts with its own periodic images, so this is not infinite "
                "dilution; use a supercell for converged energies")
    return None


@dataclass
class Insertions:
    """Seeded random insertions of a rigid guest into a framework (the stream of the module doc)."""

    centres_frac: np.ndarray
    """(n, 3) fractional coordinates of the guest centre of mass."""
    rotations: np.ndarray
    """(n, 3, 3) rotation matrices."""
    positions: np.ndarray
    """(n, k, 3) Cartesian positions of the guest atoms (Å)."""

    @classmethod
    def draw(cls, framework: Atoms, guest: Atoms, n: int, seed: int) -> Insertions:
        rng = np.random.default_rng(seed)
        centres = rng.random((n, 3))
        rotations = Rotation.random(n, rng=rng).as_matrix().reshape(n, 3, 3)
        return cls.at(framework, guest, centres, rotations)

    @classmethod
    def at(cls, framework: Atoms, guest: Atoms, centres_frac: np.ndarray, rotations: np.ndarray) -> Insertions:
        local = guest.get_positions() - guest.get_center_of_mass()
        cart = np.asarray(centres_frac, dtype=float) @ np.asarray(framework.cell)
        positions = np.einsum("nij,kj->nki", rotations, local) + cart[:, None, :]
        return cls(np.asarray(centres_frac, dtype=float), np.asarray(rotations, dtype=float), positions)


class OverlapCheck:
    """Which insertions put a guest atom closer than ``distance_A`` to a framework atom (minimum image).

    A k-d tree over the framework and its 26 neighbouring images; guest atoms are wrapped into the cell
    first. Exact when ``distance_A`` is at most the cell's smallest width (``check_guest_fits`` ensures it).
    """

    def __init__(self, framework: Atoms, distance_A: float) -> None:
        self.distance_A = float(distance_A)
        self.cell = np.asarray(framework.cell)
        self.inverse = np.linalg.inv(self.cell)
        shifts = np.array([[i, j, k] for i in (-1, 0, 1) for j in (-1, 0, 1) for k in (-1, 0, 1)], dtype=float)
        frac = framework.get_scaled_positions(wrap=True)
        self.tree = cKDTree(((frac[None, :, :] + shifts[:, None, :]).reshape(-1, 3)) @ self.cell)

    def nearest_A(self, positions: np.ndarray) -> np.ndarray:
        """Distance (Å) from each guest atom to the nearest framework atom (inf beyond the cell width)."""
        pts = np.asarray(positions, dtype=float).reshape(-1, 3)
        frac = pts @ self.inverse
        wrapped = (frac - np.floor(frac)) @ self.cell
        dist, _ = self.tree.query(wrapped, k=1)
        return dist.reshape(np.shape(positions)[:-1])

    def __call__(self, positions: np.ndarray) -> np.ndarray:
        """(n,) booleans for (n, k, 3) guest positions: True = overlap."""
        if self.distance_A <= 0.0:
            return np.zeros(len(positions), dtype=bool)
        return (self.nearest_A(positions) < self.distance_A).any(axis=1)


def complex_template(framework: Atoms, guest: Atoms) -> Atoms:
    """Framework (tag 0) + guest (tag 1) in the framework's cell: the complexes are copies with new guest positions."""
    fw = bare_copy(framework)
    fw.set_tags(0)
    g = guest.copy()
    g.set_tags(1)
    g.cell = fw.cell
    g.pbc = fw.pbc
    return fw + g


def complexes(template: Atoms, n_framework: int, positions: np.ndarray) -> list[Atoms]:
    """Copies of ``template`` with the guest atoms at each of ``positions`` ((n, k, 3), Å)."""
    out = []
    for pos in positions:
        a = template.copy()
        a.positions[n_framework:] = pos
        out.append(a)
    return out


def energies_eV(evaluator: Evaluator, atoms_list: Sequence[Atoms]) -> np.ndarray:
    """Total energies (eV) of ``atoms_list`` in one request: the energy-only path of the evaluator (the batching
    engine or a Potential: no forces or stress where the model can skip them) when it has one."""
    if not atoms_list:
        return np.zeros(0)
    energies = getattr(evaluator, "energies", None)
    if callable(energies):
        values = energies(list(atoms_list))
    else:
        values = [e.energy_eV for e in evaluator.evaluate(list(atoms_list))]
    out = np.asarray(values, dtype=float)
    if not np.all(np.isfinite(out)):
        bad = int(np.flatnonzero(~np.isfinite(out))[0])
        raise RuntimeError(f"the model returned a non-finite energy ({out[bad]}) for structure {bad} of the request")
    return out


# ---------------------------------------------------------------------------------------------- statistics
@dataclass
class WidomEstimate:
    """K_H, Q_st and their block-average errors from a sequence of insertion energies."""

    henry_mol_per_kg_Pa: float
    henry_error_mol_per_kg_Pa: float
    heat_kJ_per_mol: float
    heat_error_kJ_per_mol: float
    boltzmann_mean_kJ_per_mol: float
    n_blocks: int


def _weights(energies_kJ: np.ndarray, rt_kJ: float) -> tuple[np.ndarray, float]:
    """Boltzmann weights divided by exp(shift) (overflow-safe; NaN energies = overlaps = weight 0), and shift."""
    finite = np.isfinite(energies_kJ)
    if not finite.any():
        return np.zeros(len(energies_kJ)), 0.0
    shift = float(-energies_kJ[finite].min() / rt_kJ)
    w = np.zeros(len(energies_kJ))
    w[finite] = np.exp(-energies_kJ[finite] / rt_kJ - shift)
    return w, shift


def _scaled(mean_w: float, shift: float) -> float:
    if mean_w == 0.0:
        return 0.0
    log_value = math.log(mean_w) + shift
    return math.exp(log_value) if log_value < 709.0 else math.inf


def widom_estimate(energies_eV: np.ndarray, temperature_K: float, density_kg_per_m3: float,
                   n_blocks: int) -> WidomEstimate:
    """K_H (mol/(kg·Pa)), Q_st and the Boltzmann mean (kJ/mol) with block-average standard errors from the
    insertion energies in order (eV; NaN = overlap, weight 0)."""
    e_kj = np.asarray(energies_eV, dtype=float) * EV_TO_KJ_PER_MOL
    n = len(e_kj)
    rt_kj = GAS_CONSTANT_J_PER_MOL_K * temperature_K / 1000.0
    denominator = density_kg_per_m3 * GAS_CONSTANT_J_PER_MOL_K * temperature_K  # kg/m³ · J/mol = Pa·kg/mol
    w, shift = _weights(e_kj, rt_kj)
    ew = np.where(w > 0, np.nan_to_num(e_kj) * w, 0.0)

    def estimate(sl: slice) -> tuple[float, float, float]:
        sw = float(w[sl].sum())
        count = len(w[sl])
        henry = _scaled(sw / count, shift) / denominator if count else math.nan
        mean_e = float(ew[sl].sum()) / sw if sw > 0 else math.nan
        return henry, rt_kj - mean_e, mean_e

    henry, heat, mean_e = estimate(slice(0, n))
    blocks = min(int(n_blocks), n)
    henry_err = heat_err = math.nan
    if blocks >= 2:
        bounds = np.linspace(0, n, blocks + 1).round().astype(int)
        per_block = np.array([estimate(slice(a, b)) for a, b in itertools.pairwise(bounds)])
        henry_err = float(np.std(per_block[:, 0], ddof=1) / math.sqrt(blocks))
        q = per_block[:, 1][np.isfinite(per_block[:, 1])]
        if len(q) >= 2:
            heat_err = float(np.std(q, ddof=1) / math.sqrt(len(q)))
    return WidomEstimate(henry, henry_err, heat, heat_err, mean_e, blocks)


def running_trace(energies_eV: np.ndarray, temperature_K: float, density_kg_per_m3: float, n_blocks: int,
                  points: int = TRACE_POINTS) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """K_H and its block error after the first n insertions, at up to ``points`` values of n."""
    n = len(energies_eV)
    marks = np.unique(np.linspace(1, n, min(points, n)).round().astype(int)) if n else np.zeros(0, dtype=int)
    est = [widom_estimate(energies_eV[:m], temperature_K, density_kg_per_m3, n_blocks) for m in marks]
    return (marks, np.array([e.henry_mol_per_kg_Pa for e in est]),
            np.array([e.henry_error_mol_per_kg_Pa for e in est]))


def progress_note(est: WidomEstimate) -> str:
    """The short line the progress views show: K_H ± error."""
    err = "" if not math.isfinite(est.henry_error_mol_per_kg_Pa) else f" ± {est.henry_error_mol_per_kg_Pa:.2g}"
    return f"K_H {est.henry_mol_per_kg_Pa:.3g}{err} mol/(kg·Pa)"


# ---------------------------------------------------------------------------------------------- Widom run
@dataclass
class WidomRun:
    """What `widom` returns: the insertions made and their energies."""

    insertions: Insertions
    energies_eV: np.ndarray
    """E_int per insertion (NaN = overlap)."""
    n_overlaps: int
    framework_energy_eV: float
    guest_energy_eV: float
    stopped_early: bool


def widom(run: Run, framework: Atoms, guest: Atoms, *, n_insertions: int, seed: int, overlap_distance_A: float,
          per_request: int, box_A: float, temperature_K: float | None = None, n_blocks: int = 10,
          stage: str = "widom") -> WidomRun:
    """Insert ``guest`` rigidly into ``framework`` ``n_insertions`` times (the module's random stream) and return
    E_int of each. The framework and the boxed guest are evaluated once (one request); the insertions go to the
    model ``per_request`` at a time through ``run.prep.evaluator`` (the batching engine). After each request a
    progress event (``stage``, insertions done; with ``temperature_K`` also the running K_H, its error and a
    ``note``) is reported and a stop request ends the run (``stopped_early``)."""
    evaluator = run.prep.evaluator
    e_fw, e_guest = energies_eV(evaluator, [framework, boxed_guest(guest, box_A)])
    draws = Insertions.draw(framework, guest, n_insertions, seed)
    overlap = OverlapCheck(framework, overlap_distance_A)(draws.positions)
    template = complex_template(framework, guest)
    nf = len(framework)
    density = framework_density_kg_per_m3(framework)
    energies = np.full(n_insertions, np.nan)
    done = 0
    stopped = False
    progress.report(stage, 0, n_insertions, insertions=0, overlaps=0)
    while done < n_insertions:
        stop = min(n_insertions, done + per_request)
        todo = np.flatnonzero(~overlap[done:stop]) + done
        if len(todo):
            e = energies_eV(evaluator, complexes(template, nf, draws.positions[todo]))
            energies[todo] = e - e_fw - e_guest
        done = stop
        extra: dict[str, Any] = {"insertions": done, "overlaps": int(overlap[:done].sum())}
        if temperature_K is not None:
            est = widom_estimate(energies[:done], temperature_K, density, n_blocks)
            extra.update(henry_mol_per_kg_Pa=est.henry_mol_per_kg_Pa,
                         henry_error_mol_per_kg_Pa=est.henry_error_mol_per_kg_Pa,
                         note=f"{done} insertions · {progress_note(est)}")
        else:
            extra["note"] = f"{done} insertions"
        progress.report(stage, done, n_insertions, **extra)
        if done < n_insertions and progress.should_stop():
            stopped = True
            break
    return WidomRun(Insertions(draws.centres_frac[:done], draws.rotations[:done], draws.positions[:done]),
                    energies[:done], int(overlap[:done].sum()), float(e_fw), float(e_guest), stopped)


# ---------------------------------------------------------------------------------------------- the property
def guest_of(params: dict[str, Any]) -> Atoms:
    """The guest molecule of the parameters (default CO2)."""
    return guest_molecule(params.get("guest", "CO2"))


def check_widom_structure(params: dict[str, Any], atoms: Atoms, model: ModelInfo) -> None:
    """Before any model call: a 3D periodic framework the guest fits in, and a valid guest box."""
    guest = guest_of(params)
    check_guest_fits(atoms, guest, params["overlap_distance_A"], model.cutoff_A)
    guest_box_A(params, guest, model.cutoff_A)


def _compute(run: Run) -> dict[str, Any]:
    p = run.params
    framework = run.atoms
    guest = guest_of(p)
    run.prep.potential.check_elements(guest)
    if (w := check_guest_fits(framework, guest, p["overlap_distance_A"], run.prep.potential.cutoff_A)) is not None:
        run.warnings.append(w)
    box = guest_box_A(p, guest, run.prep.potential.cutoff_A)
    p["box_A"] = box
    t = p["temperature_K"]
    out = widom(run, framework, guest, n_insertions=p["n_insertions"], seed=p["seed"],
                overlap_distance_A=p["overlap_distance_A"], per_request=p["insertions_per_request"], box_A=box,
                temperature_K=t, n_blocks=p["n_blocks"])
    n = len(out.energies_eV)
    if out.stopped_early:
        run.warnings.append(f"stopped after {n} of {p['n_insertions']} insertions (stop requested)")
    density = framework_density_kg_per_m3(framework)
    est = widom_estimate(out.energies_eV, t, density, p["n_blocks"])
    if out.n_overlaps == n:
        run.warnings.append(f"every insertion overlapped the framework (closer than {p['overlap_distance_A']} Å): "
                            "K_H = 0 and no heat of adsorption")
    elif not math.isfinite(est.henry_mol_per_kg_Pa):
        run.warnings.append("K_H overflowed (an insertion energy far below −700 k_B T): the model's energies are "
                            "unphysical there")
    finite = np.flatnonzero(np.isfinite(out.energies_eV))
    lowest = finite[np.argsort(out.energies_eV[finite], kind="stable")][: p["n_lowest"]]
    structures = complexes(complex_template(framework, guest), len(framework), out.insertions.positions[lowest])
    trace_n, trace_k, trace_err = running_trace(out.energies_eV, t, density, p["n_blocks"])
    log.info("henry %s in %s: K_H %.4g ± %.2g mol/(kg Pa), Q_st %.2f kJ/mol (%d insertions, %d overlaps)",
             guest.get_chemical_formula(), framework.get_chemical_formula(), est.henry_mol_per_kg_Pa,
             est.henry_error_mol_per_kg_Pa, est.heat_kJ_per_mol, n, out.n_overlaps)
    return {
        "henry_mol_per_kg_Pa": est.henry_mol_per_kg_Pa,
        "henry_error_mol_per_kg_Pa": est.henry_error_mol_per_kg_Pa,
        "heat_of_adsorption_kJ_per_mol": est.heat_kJ_per_mol,
        "heat_of_adsorption_error_kJ_per_mol": est.heat_error_kJ_per_mol,
        "boltzmann_mean_interaction_kJ_per_mol": est.boltzmann_mean_kJ_per_mol,
        "lowest_interaction_energy_eV": float(out.energies_eV[lowest[0]]) if len(lowest) else math.nan,
        "temperature_K": float(t),
        "n_insertions": n,
        "n_overlaps": out.n_overlaps,
        "n_blocks": est.n_blocks,
        "framework_density_kg_per_m3": density,
        "framework_energy_eV": out.framework_energy_eV,
        "guest_energy_eV": out.guest_energy_eV,
        "guest_box_A": box,
        "guest_formula": guest.get_chemical_formula(mode="hill"),
        "stopped_early": out.stopped_early,
        "insertion_energies_eV": out.energies_eV,
        "lowest_energies_eV": out.energies_eV[lowest],
        "lowest_indices": [int(i) for i in lowest],
        "lowest_centres_frac": out.insertions.centres_frac[lowest].reshape(-1, 3),
        "lowest_structures": structures,
        "trace_n_insertions": trace_n.astype(float),
        "trace_henry_mol_per_kg_Pa": trace_k,
        "trace_henry_error_mol_per_kg_Pa": trace_err,
    }


def guest_param(doc: str) -> Param:
    """The ``guest`` keyword the adsorption properties share (default CO2)."""
    return Param("guest", Molecule(GUEST_MOLECULES), doc, default="CO2")


def widom_params(n_default: int, n_fast: int) -> tuple[Param, ...]:
    """The insertion keywords the adsorption properties share."""
    return (
        Param("n_insertions", Number(1, MAX_INSERTIONS, integer=True), "number of random insertions",
              default=n_default, presets={"fast": n_fast}),
        Param("seed", Number(0, 2**32 - 1, integer=True), "seed of the random positions and orientations "
              "(the same seed gives the same insertions)", default=0),
        Param("overlap_distance_A", Number(0.0, 10.0), "an insertion with a guest atom closer than this to a "
              "framework atom (minimum image) has weight 0 and no model call", default=1.5, unit="Å"),
        Param("insertions_per_request", Number(1, 10_000, integer=True), "insertions sent to the batching engine "
              "in one request (progress and stop requests are checked between requests)", default=256),
        Param("box_A", Number(0.0, 1000.0, lo_open=True), "edge of the isolated guest's vacuum box (default "
              "20 Å + the guest's extent)", unit="Å"),
    )


PROPERTY = Property(
    name="henry_coefficient",
    task_type="henry-coefficient",
    summary="Henry coefficient K_H (mol/(kg·Pa)) and isosteric heat of adsorption (kJ/mol) at infinite dilution "
            "by Widom insertion of a rigid guest into a rigid framework.",
    details="""Widom test-particle insertion: the guest's centre of mass uniform in the cell, its orientation
    uniform on SO(3), framework and guest rigid. E_int = E(complex) − E(framework) − E(guest) (the isolated
    guest in a cubic vacuum box; both references computed once); w = exp(−E_int/k_B T);
    K_H = ⟨w⟩/(ρ_framework R T) in mol/(kg·Pa) (ρ in kg/m³; × 1e5 for mol/(kg·bar));
    Q_st = R T − ⟨E_int w⟩/⟨w⟩ in kJ/mol. Insertions with a guest atom closer than `overlap_distance_A` to a
    framework atom (minimum image) count with weight 0 and cost no model call; the others go to the
    model through the batching engine, `insertions_per_request` per request (energy only where the model
    can skip forces). Errors: standard error of `n_blocks` block averages. Seeded: `rng =
    numpy.random.default_rng(seed)`, centres `rng.random((n, 3))` (fractional), then
    `scipy.spatial.transform.Rotation.random(n, rng=rng)`. Guests: `CO2`, `H2O`, `N2`, `CH4`
    (`ase.build.molecule`), `Ar`, `Kr`, `Xe`, or any molecule as Atoms or structure text/file. The cell
    must be wider than the guest plus the overlap distance (a supercell otherwise); a warning says when
    the guest is within the model cutoff of its own periodic images.""",
    result=HenryResult,
    structure_arg="framework",
    positional=("guest",),
    params=(
        guest_param("the guest: a builtin name, a molecule (Atoms) or its structure text"),
        Param("temperature_K", Number(0.0, 10_000.0, lo_open=True), "temperature", default=298.15, unit="K"),
        *widom_params(5000, 1000),
        Param("n_blocks", Number(2, 1000, integer=True), "blocks of the block-average standard errors",
              default=10),
        Param("n_lowest", Number(0, 100, integer=True), "lowest-energy insertions kept as structures",
              default=5),
    ),
    compute=_compute,
    check_structure=check_widom_structure,
)
henry_coefficient = PROPERTY.function


__all__ = [
    "GAS_CONSTANT_J_PER_MOL_K",
    "MAX_INSERTIONS",
    "PROPERTY",
    "HenryResult",
    "Insertions",
    "OverlapCheck",
    "WidomEstimate",
    "WidomRun",
    "boxed_guest",
    "cell_widths_A",
    "check_guest_fits",
    "complex_template",
    "complexes",
    "energies_eV",
    "framework_density_kg_per_m3",
    "guest_extent_A",
    "guest_of",
    "guest_param",
    "henry_coefficient",
    "running_trace",
    "widom",
    "widom_estimate",
    "widom_params",
]
