"""Binding sites of a guest in a framework: guests relaxed in the fixed framework, distinct sites clustered.

1. The isolated guest is relaxed in its cubic vacuum box (same model and optimizer): the reference.
2. Candidates: the lowest-energy Widom insertions of the relaxed guest (rigid, the random stream of
   `matcalc.calculations.henry`), taken greedily so that no two guest centres are closer than
   ``site_distance_A``; or, with ``positions``, the guest at each given point in the lowest of
   ``n_orientations`` random orientations.
3. Every candidate complex is relaxed with the framework atoms fixed (``FixAtoms``), all of them stepped
   together (`matcalc.calculations.optimize.optimize_many`: one batched model request per step).
4. E_int = E(relaxed complex) − E(framework) − E(relaxed isolated guest); the relaxed candidates are sorted by
   E_int and clustered by the distance between guest centres of mass (minimum image): a candidate within
   ``site_distance_A`` of a lower one is the same site.
5. Stability check: the guest of each reported site is shaken (0.1 Å RMS per atom) and relaxed again (FIRE,
   which does not stop at saddle points the way quasi-Newton steps can; FIRE is also the default optimizer). A true
   minimum brings it back; a saddle point or a flat shoulder where the optimizer met ``fmax`` does not, and
   the site is replaced by wherever the guest went (up to three rounds).

The guest is **flexible** (all its atoms move; only the framework is fixed): ASE has no rigid-body optimizer
and the batched optimizers support exactly ``FixAtoms``, and a flexible guest is what DFT binding-site studies
relax. Because the reference is the relaxed isolated guest, E_int includes the guest's deformation energy
(reported per site as ``guest_rmsd_A``, the RMSD of its internal geometry from the relaxed isolated guest).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
from ase import Atoms
from ase.geometry import find_mic, get_distances
from scipy.spatial.transform import Rotation

from matcalc.calculations.contract import (
    STEPS,
    Choice,
    ModelInfo,
    Number,
    Param,
    Property,
    Run,
    fmax_param,
)
from matcalc.calculations.henry import (
    Insertions,
    OverlapCheck,
    boxed_guest,
    check_guest_fits,
    complex_template,
    complexes,
    energies_eV,
    guest_of,
    guest_param,
    widom,
    widom_params,
)
from matcalc.calculations.interaction import EV_TO_KJ_PER_MOL, guest_box_A
from matcalc.calculations.optimize import OPTIMIZERS, optimize, optimize_many
from matcalc.calculations.results import Result
from matcalc.structures import bare_copy

if TYPE_CHECKING:
    from matplotlib.axes import Axes

log = logging.getLogger(__name__)

N_NEAREST = 6
"""Framework atoms listed per site (the nearest to any guest atom)."""
SHAKE_A = 0.1
"""RMS displacement (Å) of each guest atom in the stability check of a site."""
SHAKE_ROUNDS = 3
"""Most rounds of the stability check (each round checks the reported sites not yet confirmed)."""
CHECK_OPTIMIZER = "FIRE"
"""Optimizer of the stability check: a damped-dynamics minimiser rolls off a saddle point, where the quasi-Newton
steps of BFGS/LBFGS (with an indefinite curvature estimate) can come back to it and meet ``fmax`` there."""
MAX_POSITIONS = 1000


@dataclass(frozen=True)
class Points:
    """A list of Cartesian points ``[[x, y, z], ...]`` (Å), each coordinate within ``item``'s bounds."""

    item: Number
    max_length: int = MAX_POSITIONS

    def coerce(self, name: str, value: Any) -> Any:
        what = f"a list of [x, y, z] points (at most {self.max_length}), each coordinate {self.item.describe()}"
        if isinstance(value, (str, bytes)) or not isinstance(value, (Sequence, np.ndarray)) or len(value) == 0:
            raise ValueError(f"{name} must be {what}, got {value!r}")
        if len(value) > self.max_length:
            raise ValueError(f"{name} must have at most {self.max_length} points, got {len(value)}")
        out = []
        for point in value:
            if isinstance(point, (str, bytes)) or not isinstance(point, (Sequence, np.ndarray)) or len(point) != 3:
                raise ValueError(f"{name} must be {what}, got {point!r}")
            try:
                out.append(tuple(self.item.coerce(name, x) for x in point))
            except ValueError:
                raise ValueError(f"{name} must be {what}, got {point!r}") from None
        return out

    def annotation(self) -> Any:
        return Sequence[Sequence[float]]

    def json_schema(self) -> dict[str, Any]:
        point = {"type": "array", "items": self.item.json_schema(), "minItems": 3, "maxItems": 3}
        return {"type": "array", "items": point, "minItems": 1, "maxItems": self.max_length}

    def describe(self) -> str:
        return f"list of [x, y, z] points, each coordinate {self.item.describe()}"

    def from_text(self, name: str, text: str) -> Any:
        """``"x y z; x y z"`` (commas allowed between coordinates)."""
        return [self.item_words(name, chunk) for chunk in text.split(";") if chunk.strip()]

    def item_words(self, name: str, chunk: str) -> list[float]:
        return [self.item.from_text(name, w) for w in chunk.replace(",", " ").split()]


@dataclass(kw_only=True)
class BindingSite:
    """One distinct binding site. Energies eV (kJ/mol where named), distances Å."""

    interaction_energy_eV: float
    """E(relaxed complex) − E(framework) − E(relaxed isolated guest); negative = binding."""
    interaction_energy_kJ_per_mol: float
    centre_frac: list[float]
    """Fractional coordinates of the guest's centre of mass (wrapped into [0, 1))."""
    centre_A: list[float]
    """Cartesian position of the guest's centre of mass in the cell (Å)."""
    nearest_indices: list[int]
    """The framework atoms nearest to any guest atom (minimum image), nearest first."""
    nearest_symbols: list[str]
    nearest_distances_A: list[float]
    converged: bool
    """The relaxation of this site's candidate reached ``fmax``."""
    stable: bool
    """The site passed the stability check: its guest, shaken (0.1 Å RMS per atom) and relaxed again, came back
    (a saddle point or a flat shoulder does not, and is replaced by where the guest went)."""
    steps: int
    multiplicity: int
    """How many relaxed candidates ended in this site."""
    guest_rmsd_A: float
    """RMSD of the guest's internal geometry from the relaxed isolated guest (after optimal superposition)."""
    structure: Atoms | None = field(default=None, repr=False)
    """The relaxed complex (framework tag 0, guest tag 1)."""


@dataclass(kw_only=True)
class BindingSitesResult(Result):
    """Binding sites, lowest first. Energies eV (kJ/mol where named), positions Å or fractional where named.

    The base fields (``formula``, ``n_atoms``, ``structure_hash``) describe the framework.
    """

    kind: ClassVar[str] = "binding_sites"

    sites: list[BindingSite] = field(default_factory=list)
    """At most ``n_sites`` distinct sites, lowest interaction energy first."""
    lowest_interaction_energy_eV: float
    """E_int of the best site (NaN when no candidate could be relaxed)."""
    n_distinct_sites: int
    """Distinct sites among the relaxed candidates (may exceed ``len(sites)``)."""
    n_candidates: int
    candidates_converged: int
    candidate_energies_eV: np.ndarray = field(repr=False)
    """E_int of every relaxed candidate (NaN: its relaxation failed), in candidate order."""
    candidate_start_energies_eV: np.ndarray = field(repr=False)
    """E_int of every candidate before relaxation (rigid guest)."""
    candidate_sites: list[int] = field(default_factory=list, repr=False)
    """Index in ``sites`` each candidate relaxed into (-1: a site beyond ``n_sites`` or a failed relaxation)."""
    framework_energy_eV: float
    guest_energy_eV: float
    """Energy of the relaxed isolated guest in its vacuum box of edge ``guest_box_A``."""
    guest_box_A: float
    guest_formula: str
    guest_relaxed_converged: bool
    n_insertions: int = 0
    """Widom insertions screened for candidates (0 when ``positions`` were given)."""
    n_overlaps: int = 0
    relaxed_guest: Atoms | None = field(default=None, repr=False)
    """The isolated guest after its relaxation (non-periodic, centre of mass at the origin)."""

    def _plot(self, ax: Axes) -> None:
        if not self.sites:
            ax.text(0.5, 0.5, "no binding site found", ha="center", va="center", transform=ax.transAxes)
            return
        e = [s.interaction_energy_kJ_per_mol for s in self.sites]
        labels = [f"{i + 1}: {s.nearest_symbols[0] if s.nearest_symbols else ''} "
                  f"{s.nearest_distances_A[0] if s.nearest_distances_A else float('nan'):.2f} Å"
                  for i, s in enumerate(self.sites)]
        bars = ax.bar(range(len(e)), e, color=["C0" if s.converged else "C1" for s in self.sites])
        ax.bar_label(bars, labels=[f"{v:.1f}\n×{s.multiplicity}" for v, s in zip(e, self.sites, strict=True)],
                     fontsize="small")
        ax.set_xticks(range(len(e)), labels, rotation=30, ha="right", fontsize="small")
        ax.axhline(0.0, color="0.3", lw=0.8)
        ax.set_xlabel("site: nearest framework atom, distance")
        ax.set_ylabel("E_int (kJ/mol)")
        ax.set_title(f"{self.guest_formula} in {self.formula} ({self.model}): {len(self.sites)} of "
                     f"{self.n_distinct_sites} sites from {self.n_candidates} candidates", fontsize="small")


# ---------------------------------------------------------------------------------------------- geometry
def internal_rmsd_A(reference: np.ndarray, positions: np.ndarray) -> float:
    """RMSD (Å) between two geometries of the same molecule after the optimal rotation (Kabsch) and translation."""
    p = np.asarray(reference, dtype=float) - np.mean(reference, axis=0)
    q = np.asarray(positions, dtype=float) - np.mean(positions, axis=0)
    if len(p) < 2:
        return 0.0
    u, _, vt = np.linalg.svd(q.T @ p)
    d = np.sign(np.linalg.det(u @ vt)) or 1.0
    rot = u @ np.diag([1.0, 1.0, d]) @ vt
    return float(np.sqrt(np.mean(np.sum((q @ rot - p) ** 2, axis=1))))


def mic_distance_A(framework: Atoms, a: np.ndarray, b: np.ndarray) -> float:
    """Minimum-image distance (Å) between two points of the framework's cell."""
    vec, _ = find_mic(np.asarray(b, dtype=float) - np.asarray(a, dtype=float), framework.cell, pbc=True)
    return float(np.linalg.norm(vec))


def distinct_lowest(framework: Atoms, centres_frac: np.ndarray, energies: np.ndarray, n: int,
                    distance_A: float) -> list[int]:
    """Up to ``n`` indices of the lowest finite ``energies`` whose centres are pairwise ≥ ``distance_A`` apart."""
    cell = np.asarray(framework.cell)
    order = [int(i) for i in np.argsort(np.where(np.isfinite(energies), energies, np.inf), kind="stable")
             if np.isfinite(energies[i])]
    chosen: list[int] = []
    for i in order:
        if len(chosen) >= n:
            break
        if all(mic_distance_A(framework, centres_frac[i] @ cell, centres_frac[j] @ cell) >= distance_A
               for j in chosen):
            chosen.append(i)
    return chosen


def orientations_at(framework: Atoms, guest: Atoms, positions_A: Sequence[Sequence[float]], n_orientations: int,
                    seed: int) -> Insertions:
    """The guest at every given point (Å) in ``n_orientations`` random orientations each (seeded): position-major."""
    rng = np.random.default_rng(seed)
    pts = np.asarray(positions_A, dtype=float)
    rot = Rotation.random(len(pts) * n_orientations, rng=rng).as_matrix().reshape(-1, 3, 3)
    centres = np.repeat(pts @ np.linalg.inv(np.asarray(framework.cell)), n_orientations, axis=0)
    return Insertions.at(framework, guest, centres, rot)


@dataclass
class _Relaxed:
    """One relaxed complex: E_int (eV; NaN when the relaxation failed) and its guest's centre of mass (Å)."""

    atoms: Atoms
    energy_eV: float
    centre_A: np.ndarray
    converged: bool
    steps: int
    error: str | None = None


class _Relaxer:
    """Relax complexes with the framework fixed (``optimize_many``: one batched request per step)."""

    def __init__(self, run: Run, n_framework: int, reference_eV: float) -> None:
        self.run, self.nf, self.reference_eV = run, n_framework, reference_eV

    def relax(self, structures: list[Atoms], stage: str, optimizer: str | None = None) -> list[_Relaxed]:
        if not structures:
            return []
        p = self.run.params
        k = len(structures)
        fixed = np.arange(len(structures[0])) < self.nf
        traces = optimize_many(structures, self.run.prep.calculator(), fmax=p["fmax"], max_steps=p["max_steps"],
                               optimizer=optimizer or p["optimizer"], relax_cell=False, fixed=[fixed] * k,
                               stage=[f"{stage} {i + 1}/{k}" for i in range(k)], return_exceptions=True)
        out = []
        for atoms, trace in zip(structures, traces, strict=True):
            centre = atoms[self.nf:].get_center_of_mass()
            if isinstance(trace, BaseException):
                out.append(_Relaxed(atoms, math.nan, centre, False, 0, f"{type(trace).__name__}: {trace}"))
                continue
            energy = float(atoms.get_potential_energy()) - self.reference_eV
            out.append(_Relaxed(atoms, energy, centre, bool(trace.converged), int(trace.steps)))
        return out


def _clusters(framework: Atoms, records: list[_Relaxed], active: set[int], distance_A: float) -> list[list[int]]:
    """The active records grouped into sites, lowest energy first: a record within ``distance_A`` (minimum image,
    guest centres) of a lower site's first record joins it."""
    clusters: list[list[int]] = []
    for i in sorted(active, key=lambda j: (records[j].energy_eV, j)):
        for members in clusters:
            if mic_distance_A(framework, records[members[0]].centre_A, records[i].centre_A) < distance_A:
                members.append(i)
                break
        else:
            clusters.append([i])
    return clusters


def check_sites_structure(params: dict[str, Any], atoms: Atoms, model: ModelInfo) -> None:
    """Before any model call: the guest fits the cell, the guest box fits the model, and each given position
    leaves room for the guest in at least one of its orientations."""
    guest = guest_of(params)
    check_guest_fits(atoms, guest, params["overlap_distance_A"], model.cutoff_A)
    guest_box_A(params, guest, model.cutoff_A)
    if "positions" in params:
        k = params["n_orientations"]
        trial = orientations_at(atoms, guest, params["positions"], k, params["seed"])
        overlap = OverlapCheck(atoms, params["overlap_distance_A"])(trial.positions).reshape(-1, k)
        blocked = np.flatnonzero(overlap.all(axis=1))
        if len(blocked):
            i = int(blocked[0])
            raise ValueError(f"positions[{i}] = {list(params['positions'][i])} Å: the guest overlaps the framework "
                             f"(closer than overlap_distance_A = {params['overlap_distance_A']} Å) in all {k} "
                             "orientations tried")


def _check(params: dict[str, Any]) -> None:
    if "positions" not in params and params["n_candidates"] > params["n_insertions"]:
        raise ValueError(f"n_candidates ({params['n_candidates']}) must not exceed n_insertions "
                         f"({params['n_insertions']}): candidates are the lowest insertions")


# ---------------------------------------------------------------------------------------------- compute
def _relaxed_guest(run: Run, guest: Atoms, box: float) -> tuple[Atoms, float, bool]:
    p = run.params
    boxed = boxed_guest(guest, box)
    trace = optimize(boxed, run.prep.calculator(), fmax=p["fmax"], max_steps=p["max_steps"], optimizer=p["optimizer"],
                     relax_cell=False, stage="guest")
    energy = float(boxed.get_potential_energy())
    relaxed = Atoms(boxed.get_chemical_symbols(), positions=boxed.get_positions() - boxed.get_center_of_mass())
    if not trace.stopped_early and (w := trace.warning("isolated guest relaxation", p["fmax"])) is not None:
        run.warnings.append(w)
    return relaxed, energy, trace.converged


def _compute(run: Run) -> dict[str, Any]:
    p = run.params
    framework = run.atoms
    potential = run.prep.potential
    guest = guest_of(p)
    potential.check_elements(guest)
    if (w := check_guest_fits(framework, guest, p["overlap_distance_A"], potential.cutoff_A)) is not None:
        run.warnings.append(w)
    box = guest_box_A(p, guest, potential.cutoff_A)
    p["box_A"] = box
    nf = len(framework)

    e_fw = float(run.prep.evaluator.evaluate([framework])[0].energy_eV)
    relaxed, e_guest, guest_ok = _relaxed_guest(run, guest, box)

    n_insertions = n_overlaps = 0
    if "positions" in p:
        k = p["n_orientations"]
        trial = orientations_at(framework, relaxed, p["positions"], k, p["seed"])
        overlap = OverlapCheck(framework, p["overlap_distance_A"])(trial.positions)
        energies = np.full(len(overlap), np.nan)
        todo = np.flatnonzero(~overlap)
        template = complex_template(framework, relaxed)
        energies[todo] = energies_eV(run.prep.evaluator, complexes(template, nf, trial.positions[todo])) - e_fw - e_guest
        per_point = energies.reshape(-1, k)
        best = [i * k + int(np.nanargmin(row)) for i, row in enumerate(per_point) if np.isfinite(row).any()]
        if len(best) < len(per_point):  # the relaxed guest is larger than the one checked at submission
            run.warnings.append(f"{len(per_point) - len(best)} given positions skipped: the relaxed guest overlaps "
                                "the framework there in every orientation")
        chosen_positions = trial.positions[best]
        start = energies[best]
    else:
        screen = widom(run, framework, relaxed, n_insertions=p["n_insertions"], seed=p["seed"],
                       overlap_distance_A=p["overlap_distance_A"], per_request=p["insertions_per_request"], box_A=box)
        n_insertions, n_overlaps = len(screen.energies_eV), screen.n_overlaps
        if screen.stopped_early:
            run.warnings.append(f"candidate screen stopped after {n_insertions} of {p['n_insertions']} insertions "
                                "(stop requested)")
        best = distinct_lowest(framework, screen.insertions.centres_frac, screen.energies_eV, p["n_candidates"],
                               p["site_distance_A"])
        chosen_positions = screen.insertions.positions[best]
        start = screen.energies_eV[best]
        if not best:
            run.warnings.append(f"every one of the {n_insertions} insertions overlapped the framework: no candidate")

    first = complexes(complex_template(framework, relaxed), nf, chosen_positions)
    k = len(first)
    relaxer = _Relaxer(run, nf, e_fw + e_guest)
    records = relaxer.relax(first, "site candidate")
    failed = [i for i, r in enumerate(records) if r.error is not None]
    for i in failed:
        run.warnings.append(f"candidate {i + 1}: relaxation failed: {records[i].error}")
    relaxed_e = np.array([r.energy_eV for r in records]) if k else np.zeros(0)
    ok = [i for i in range(k) if i not in failed]
    converged = sum(1 for i in ok if records[i].converged)
    if len(ok) > converged:
        run.warnings.append(f"{len(ok) - converged} of {len(ok)} candidate relaxations did not reach fmax "
                            f"{p['fmax']} eV/Å within {p['max_steps']} steps")

    # stability: shake each reported site's guest and relax again; a site it does not come back to is a saddle
    # or a flat shoulder, dropped (its candidates go where the shaken guest went)
    site_distance = p["site_distance_A"]
    active = set(ok)
    redirect: dict[int, int] = {}
    confirmed: set[int] = set()
    rng = np.random.default_rng([p["seed"], 1])
    for _round in range(SHAKE_ROUNDS):
        clusters = _clusters(framework, records, active, site_distance)
        reps = [c[0] for c in clusters[: p["n_sites"]] if c[0] not in confirmed]
        if not reps:
            break
        shaken = []
        for r in reps:
            atoms = records[r].atoms.copy()
            atoms.positions[nf:] += rng.normal(scale=SHAKE_A / math.sqrt(3.0), size=(len(atoms) - nf, 3))
            shaken.append(atoms)
        again = relaxer.relax(shaken, "site check", optimizer=CHECK_OPTIMIZER)
        for r, new in zip(reps, again, strict=True):
            members = next(c for c in clusters if c[0] == r)
            if new.error is not None or mic_distance_A(framework, new.centre_A, records[r].centre_A) < site_distance:
                confirmed.add(r)
                continue
            records.append(new)
            active.add(len(records) - 1)
            for m in members:
                active.discard(m)
                redirect[m] = len(records) - 1
        unstable = len(reps) - sum(1 for r in reps if r in confirmed)
        if unstable:
            log.info("binding sites: %d of %d sites were not minima (the shaken guest relaxed elsewhere)",
                     unstable, len(reps))

    clusters = _clusters(framework, records, active, site_distance)
    cluster_of = {m: c for c, members in enumerate(clusters) for m in members}
    site_of = []
    for i in range(k):
        j = i
        while j in redirect:
            j = redirect[j]
        c = cluster_of.get(j, -1)
        site_of.append(c if c < p["n_sites"] else -1)
    cell = np.asarray(framework.cell)
    sites = []
    for members in clusters[: p["n_sites"]]:
        rec = records[members[0]]
        atoms = rec.atoms
        frac = (rec.centre_A @ np.linalg.inv(cell)) % 1.0
        d = get_distances(atoms.positions[nf:], atoms.positions[:nf], cell=cell, pbc=True)[1].min(axis=0)
        near = np.argsort(d, kind="stable")[:N_NEAREST]
        stored = bare_copy(atoms)
        sites.append(BindingSite(
            interaction_energy_eV=rec.energy_eV,
            interaction_energy_kJ_per_mol=rec.energy_eV * EV_TO_KJ_PER_MOL,
            centre_frac=[float(x) for x in frac],
            centre_A=[float(x) for x in frac @ cell],
            nearest_indices=[int(j) for j in near],
            nearest_symbols=[framework[int(j)].symbol for j in near],
            nearest_distances_A=[float(d[j]) for j in near],
            converged=rec.converged,
            stable=members[0] in confirmed,
            steps=rec.steps,
            multiplicity=sum(1 for s in site_of if s == len(sites)),
            guest_rmsd_A=internal_rmsd_A(relaxed.positions, atoms.positions[nf:]),
            structure=stored,
        ))
    log.info("binding sites of %s in %s: %d distinct from %d candidates, lowest %.4f eV",
             guest.get_chemical_formula(), framework.get_chemical_formula(), len(clusters), k,
             sites[0].interaction_energy_eV if sites else math.nan)
    return {
        "sites": sites,
        "lowest_interaction_energy_eV": sites[0].interaction_energy_eV if sites else math.nan,
        "n_distinct_sites": len(clusters),
        "n_candidates": k,
        "candidates_converged": converged,
        "candidate_energies_eV": relaxed_e,
        "candidate_start_energies_eV": np.asarray(start, dtype=float),
        "candidate_sites": site_of,
        "framework_energy_eV": e_fw,
        "guest_energy_eV": e_guest,
        "guest_box_A": box,
        "guest_formula": guest.get_chemical_formula(mode="hill"),
        "guest_relaxed_converged": bool(guest_ok),
        "n_insertions": n_insertions,
        "n_overlaps": n_overlaps,
        "relaxed_guest": relaxed,
    }


PROPERTY = Property(
    name="binding_sites",
    task_type="binding-sites",
    summary="Binding sites of a guest in a framework: guests relaxed in the fixed framework from the lowest "
            "Widom insertions (or given positions), clustered into distinct sites with their interaction energies.",
    details="""The isolated guest is relaxed first (its vacuum box, same optimizer). Candidates: the
    `n_candidates` lowest of `n_insertions` rigid Widom insertions (`henry_coefficient`'s random stream),
    no two guest centres closer than `site_distance_A`; or, with `positions` (Cartesian Å), the guest at
    each point in the lowest of `n_orientations` random orientations. All candidates are relaxed together
    (batched stepping) with the framework atoms fixed (`FixAtoms`) and the guest flexible: E_int =
    E(relaxed complex) − E(framework) − E(relaxed isolated guest), so it includes the guest's deformation.
    Relaxed candidates are sorted by E_int and clustered by guest centre-of-mass distance (minimum image,
    `site_distance_A`); each reported site is checked by shaking its guest (0.1 Å RMS) and relaxing again
    (saddles and flat shoulders are replaced by where the guest goes); the lowest `n_sites` distinct sites
    are reported with their centre (fractional), nearest framework atoms and relaxed complex.""",
    result=BindingSitesResult,
    structure_arg="framework",
    positional=("guest",),
    params=(
        guest_param("the guest: a builtin name, a molecule (Atoms) or its structure text"),
        Param("n_sites", Number(1, 100, integer=True), "most distinct sites reported", default=5),
        Param("n_candidates", Number(1, 500, integer=True), "candidates relaxed (the lowest distinct Widom "
              "insertions)", default=20, presets={"fast": 10}),
        Param("positions", Points(Number(-1e4, 1e4)), "relax the guest from these points instead of Widom "
              "candidates (its centre of mass; Cartesian)", unit="Å"),
        Param("n_orientations", Number(1, 1000, integer=True), "random orientations tried at each given "
              "position (the lowest is relaxed)", default=20),
        *widom_params(2000, 500),
        Param("site_distance_A", Number(0.0, 10.0), "guest centres closer than this (minimum image) are one "
              "site; also the least distance between two candidates", default=1.0, unit="Å"),
        fmax_param("force threshold of the guest relaxations"),
        Param("max_steps", STEPS, "step limit of each relaxation", default=1000, presets={"fast": 300}),
        Param("optimizer", Choice(tuple(OPTIMIZERS)), "optimizer of the candidate relaxations (FIRE: damped "
              "dynamics does not stop at saddle points; the stability check always uses FIRE)", default="FIRE"),
    ),
    compute=_compute,
    check=_check,
    check_structure=check_sites_structure,
)
binding_sites = PROPERTY.function


__all__ = [
    "PROPERTY",
    "BindingSite",
    "BindingSitesResult",
    "Points",
    "binding_sites",
    "distinct_lowest",
    "internal_rmsd_A",
    "orientations_at",
]
