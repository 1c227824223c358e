"""Host–guest interaction energy from three single points (no relaxation):
E_int = E(host + guest) − E(host) − E(isolated guest); negative = binding.

The guest is given either inside a complex (atom indices, or ASE tags with the GoldDAC
convention tag 0 = framework, non-zero = guest) or as a separate molecule placed into the host.
The isolated guest is evaluated alone in a cubic periodic vacuum box, far beyond the model's
cutoff from its own images. The three structures go to the model as one batch.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
from ase import Atoms, units
from ase.geometry import get_distances

from matcalc.calculations.common import Prepared
from matcalc.calculations.contract import Indices, ModelInfo, Molecule, Number, Param, Property, Run, Vector
from matcalc.calculations.results import Result
from matcalc.structures import bare_copy, load_structure, structure_hash, validate_structure

if TYPE_CHECKING:
    from matplotlib.axes import Axes

log = logging.getLogger(__name__)

GUEST_MOLECULES = ("CO2", "H2O", "N2", "CH4", "Ar", "Kr", "Xe")
"""Builtin guests: molecules built with ``ase.build.molecule``, and single noble-gas atoms."""
EV_TO_KJ_PER_MOL = 1.0 / (units.kJ / units.mol)
"""Multiply eV (per guest) by this to get kJ/mol (≈ 96.485)."""
CLOSE_CONTACT_A = 1.5
"""A guest atom closer than this (Å) to a host atom triggers a warning (unphysically close for
physisorption; E_int is then dominated by repulsion)."""
VACUUM_A = 20.0
"""Default isolated-guest box: this plus the guest's largest extent (Å)."""
DEFAULT_CUTOFF_A = 6.0
"""Assumed model cutoff (Å) for models that do not state one (e.g. EMT)."""
POSITION_GRID_A = 0.5
"""Spacing (Å) of the grid searched for the default guest position (the largest pore centre)."""


@dataclass(kw_only=True)
class InteractionEnergyResult(Result):
    """Interaction energy of a guest in a host. Energies eV (kJ/mol per guest), forces eV/Å, Å.

    The base fields (``formula``, ``n_atoms``, ``structure_hash``) describe the complex.
    """

    kind: ClassVar[str] = "interaction_energy"

    interaction_energy_eV: float
    """E(complex) − E(host) − E(guest); negative = binding."""
    interaction_energy_kJ_per_mol: float
    complex_energy_eV: float
    host_energy_eV: float
    guest_energy_eV: float
    """Energy of the isolated guest (vacuum box)."""
    forces_eV_per_A: np.ndarray = field(repr=False)
    """Forces on the atoms of the complex."""
    guest_indices: list[int] = field(default_factory=list)
    """Indices of the guest atoms in the complex."""
    guest_formula: str = ""
    min_host_guest_distance_A: float
    """Shortest guest–host distance in the complex (minimum image)."""
    guest_box_A: float
    """Edge of the cubic vacuum box the isolated guest was evaluated in."""
    complex_structure: Atoms | None = field(default=None, repr=False)
    """The complex that was evaluated (with the guest placed, for host + molecule input)."""

    def _plot(self, ax: Axes) -> None:
        labels = ["complex", "host", "guest", "interaction"]
        values = [self.complex_energy_eV, self.host_energy_eV, self.guest_energy_eV, self.interaction_energy_eV]
        bars = ax.bar(labels, values, color=["C0", "C1", "C2", "C3"])
        ax.set_yscale("symlog", linthresh=max(1e-3, abs(self.interaction_energy_eV)))
        ax.axhline(0.0, color="0.3", lw=0.8)
        ax.bar_label(bars, labels=[f"{v:.4g}" for v in values], fontsize="small")
        ax.set_ylabel("energy (eV)")
        ax.set_title(f"{self.guest_formula} in {self.formula} ({self.model}): "
                     f"E_int = {self.interaction_energy_eV:.4f} eV "
                     f"({self.interaction_energy_kJ_per_mol:.2f} kJ/mol)", fontsize="small")


def guest_molecule(guest: Any) -> Atoms:
    """The guest as non-periodic Atoms: a name in `GUEST_MOLECULES` (case-insensitive),
    Atoms, or anything `matcalc.load_structure` reads (non-periodic allowed)."""
    if isinstance(guest, str) and "\n" not in guest.strip() and not Path(guest.strip()).is_file():
        lookup = {g.lower(): g for g in GUEST_MOLECULES}
        key = guest.strip().lower()
        if key not in lookup:
            raise ValueError(f"guest must be one of {', '.join(GUEST_MOLECULES)}, Atoms or a structure file; "
                             f"got {guest!r}")
        from ase.build import molecule

        name = lookup[key]
        atoms = Atoms(name) if name in ("Ar", "Kr", "Xe") else molecule(name)
    else:
        atoms = load_structure(guest, require_cell=False)
    atoms = bare_copy(atoms)
    return atoms


def _guest_selection(atoms: Atoms, guest_indices: Sequence[int] | None, guest_tag: int | None) -> list[int]:
    """Indices of the guest atoms of a complex (the parameters are already checked against their kinds)."""
    n = len(atoms)
    if guest_indices is not None:
        if not guest_indices:
            raise ValueError("guest_indices must be a non-empty list of atom indices")
        if max(guest_indices) >= n:
            raise ValueError(f"guest_indices must be in [0, {n - 1}], got {min(guest_indices)}..{max(guest_indices)}")
        idx = sorted(set(guest_indices))
        if len(idx) != len(guest_indices):
            raise ValueError("guest_indices contains duplicates")
    else:
        tags = atoms.get_tags()
        if guest_tag is not None:
            tag = int(guest_tag)
            idx = np.flatnonzero(tags == tag).tolist()
            if not idx:
                raise ValueError(f"guest_tag: no atom carries tag {tag} (tags present: {sorted(set(tags.tolist()))})")
        elif np.any(tags != 0):
            idx = np.flatnonzero(tags != 0).tolist()
            if len(idx) == n:
                raise ValueError("no guest given and every atom has a non-zero tag (ASE surface builders tag "
                                 "layers); pass guest_indices or guest_tag")
        else:
            raise ValueError("no guest given: pass guest (a molecule), guest_indices, or guest_tag "
                             "(or tag the guest atoms non-zero, framework 0)")
    if len(idx) == n:
        raise ValueError("guest_indices/guest_tag select all atoms: the host would be empty")
    return [int(i) for i in idx]


def pore_centre(host: Atoms, spacing_A: float = POSITION_GRID_A) -> np.ndarray:
    """Cartesian point (Å) of the cell farthest from every host atom (periodic images included),
    searched on a grid of about ``spacing_A``: the centre of the largest pore."""
    from scipy.spatial import cKDTree

    cell = np.asarray(host.cell)
    lengths = host.cell.lengths()
    n = np.maximum(2, np.ceil(lengths / spacing_A).astype(int))
    frac = np.stack(np.meshgrid(*[np.arange(k) / k for k in n], indexing="ij"), axis=-1).reshape(-1, 3)
    shifts = np.array([[i, j, k] for i in (-1, 0, 1) for j in (-1, 0, 1) for k in (-1, 0, 1)])
    scaled = host.get_scaled_positions(wrap=True)
    images = (scaled[None, :, :] + shifts[:, None, :]).reshape(-1, 3) @ cell
    dist, _ = cKDTree(images).query(frac @ cell)
    return np.asarray(frac[int(np.argmax(dist))] @ cell)


def _box(guest: Atoms, box_A: float) -> Atoms:
    boxed = guest.copy()
    boxed.cell = np.eye(3) * box_A
    boxed.pbc = True
    boxed.positions += boxed.cell.sum(axis=0) / 2 - guest.positions.mean(axis=0)
    return boxed


def _extent(guest: Atoms) -> float:
    pos = guest.get_positions()
    return float(np.ptp(pos, axis=0).max()) if len(pos) > 1 else 0.0


def _check(params: dict[str, Any]) -> None:
    if "guest" in params:
        if "guest_indices" in params or "guest_tag" in params:
            raise ValueError("guest_indices/guest_tag select a guest inside a complex; "
                             "do not combine them with a separate guest molecule")
    elif "position" in params:
        raise ValueError("position places a separate guest molecule; with a complex give guest=None "
                         "and no position")
    if "guest_indices" in params and "guest_tag" in params:
        raise ValueError("give either guest_indices or guest_tag, not both")


def _guest_of(params: dict[str, Any], atoms: Atoms) -> tuple[Atoms, list[int] | None]:
    """The guest molecule and, for a complex, its atom indices (``ValueError`` for a bad selection)."""
    if "guest" in params:
        return guest_molecule(params["guest"]), None
    idx = _guest_selection(atoms, params.get("guest_indices"), params.get("guest_tag"))
    guest = atoms[idx]
    guest.pbc = False
    guest.cell = np.zeros((3, 3))
    return guest, idx


def guest_box_A(params: dict[str, Any], guest: Atoms, cutoff_A: float | None) -> float:
    """Edge (Å) of the isolated guest's box: ``box_A`` or 20 Å + the guest's extent; it must exceed the
    extent plus the model cutoff (``ValueError`` otherwise)."""
    extent = _extent(guest)
    cutoff = cutoff_A or DEFAULT_CUTOFF_A
    box = params.get("box_A")
    if box is None:
        box = VACUUM_A + extent
    if box <= extent + cutoff:
        raise ValueError(f"box_A must exceed the guest extent plus the model cutoff "
                         f"({extent:.2f} + {cutoff:.1f} Å), got {box}")
    return float(box)


def _check_structure(params: dict[str, Any], atoms: Atoms, model: ModelInfo) -> None:
    """Before any model call: the guest selection picks some, not all, atoms; the guest's box fits the model."""
    guest, _ = _guest_of(params, atoms)
    guest_box_A(params, guest, model.cutoff_A)


def _compute(run: Run) -> dict[str, Any]:
    p = run.params
    prep = run.prep
    potential = prep.potential
    guest_atoms, idx = _guest_of(p, prep.atoms)
    if idx is not None:
        complex_atoms = prep.atoms
        host = complex_atoms.copy()
        del host[idx]
        position_used = complex_atoms[idx].get_center_of_mass()
    else:
        host = prep.atoms
        potential.check_elements(guest_atoms)
        position_used = pore_centre(host) if p.get("position") is None else np.asarray(p["position"], dtype=float)
        placed = guest_atoms.copy()
        placed.translate(position_used - placed.get_center_of_mass())
        placed.cell = host.cell
        placed.pbc = host.pbc
        placed.set_tags(1)
        host_tagged = host.copy()
        host_tagged.set_tags(0)
        complex_atoms = host_tagged + placed
        validate_structure(complex_atoms)  # overlapping guest -> StructureError naming the distance
        idx = list(range(len(host), len(complex_atoms)))
        run.prep = prep = Prepared(complex_atoms, potential, prep.label, structure_hash(complex_atoms), prep.t0)
    p["position_A"] = [float(x) for x in position_used]
    p["box_A"] = box = guest_box_A(p, guest_atoms, potential.cutoff_A)
    guest_box = _box(guest_atoms, box)

    d = get_distances(complex_atoms.positions[idx], host.positions, cell=complex_atoms.cell,
                      pbc=complex_atoms.pbc)[1]
    dmin = float(d.min())
    if dmin < CLOSE_CONTACT_A:
        run.warnings.append(f"guest atom {dmin:.2f} Å from a host atom (< {CLOSE_CONTACT_A} Å): "
                            "unphysically close; E_int is dominated by repulsion")

    evs = prep.evaluator.evaluate([complex_atoms, host, guest_box])
    e_complex, e_host, e_guest = (float(e.energy_eV) for e in evs)
    e_int = e_complex - e_host - e_guest
    log.info("interaction energy %s: %.6f eV", guest_atoms.get_chemical_formula(), e_int)
    stored = complex_atoms.copy()
    stored.calc = None
    return {
        "interaction_energy_eV": e_int,
        "interaction_energy_kJ_per_mol": e_int * EV_TO_KJ_PER_MOL,
        "complex_energy_eV": e_complex,
        "host_energy_eV": e_host,
        "guest_energy_eV": e_guest,
        "forces_eV_per_A": np.asarray(evs[0].forces_eV_per_A, dtype=float),
        "guest_indices": list(idx),
        "guest_formula": guest_atoms.get_chemical_formula(mode="hill"),
        "min_host_guest_distance_A": dmin,
        "guest_box_A": box,
        "complex_structure": stored,
    }


PROPERTY = Property(
    name="interaction_energy",
    task_type="interaction-energy",
    summary="Interaction energy E(host+guest) − E(host) − E(isolated guest) from single points.",
    details="""Two ways to give the guest:

    * `guest=None`: the structure is the complex; the guest atoms are `guest_indices`, or the atoms
      tagged `guest_tag`, or (neither given) every atom with a non-zero ASE tag (GoldDAC convention:
      tag 0 = framework). The host is the complex without those atoms.
    * `guest` = `"CO2"`, `"H2O"`, `"N2"`, `"CH4"` (`ase.build.molecule` geometry and orientation) or
      Atoms/a structure: it is translated so that its centre of mass lies at `position` (Cartesian Å;
      default: the pore centre, the grid point of the cell farthest from every host atom, see
      `pore_centre`) and added to the host.

    The isolated guest sits in a cubic periodic box of edge `box_A` (default 20 Å plus the guest's
    extent), which must exceed the guest extent plus the model cutoff. The three structures go to the
    model as one batch.""",
    result=InteractionEnergyResult,
    structure_arg="complex_or_host",
    positional=("guest",),
    params=(
        Param("guest", Molecule(GUEST_MOLECULES), "the guest molecule placed into the host (none: the structure "
              "is the complex)"),
        Param("guest_indices", Indices(), "indices of the guest atoms in the complex"),
        Param("guest_tag", Number(0, 2**31 - 1, integer=True), "ASE tag of the guest atoms in the complex"),
        Param("position", Vector(Number(-1e4, 1e4)), "where the guest's centre of mass goes (default: the "
              "pore centre)", unit="Å"),
        Param("box_A", Number(0.0, 1000.0, lo_open=True), "edge of the isolated guest's vacuum box (default "
              "20 Å + the guest's extent)", unit="Å"),
    ),
    compute=_compute,
    check=_check,
    check_structure=_check_structure,
)
interaction_energy = PROPERTY.function


__all__ = ["GUEST_MOLECULES", "PROPERTY", "InteractionEnergyResult", "guest_molecule", "interaction_energy",
           "pore_centre"]
