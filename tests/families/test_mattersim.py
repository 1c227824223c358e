"""MatterSim adapter, against MatterSim's own ASE calculator on a tiny M3GNet (random, seeded).

Runs in .venvs/mattersim (scripts/setup-family mattersim). The mattersim wheel ships no checkpoints, so the
test builds a 2-block, 16-unit ``M3Gnet`` from mattersim's own code and writes it with MatterSim's own
``Potential.save`` (the format of the released checkpoints) under the catalogue file name. MatterSim computes
in float32: the fused batch must equal ``MatterSimCalculator`` one structure at a time to 1e-5 eV/atom,
1e-4 eV/Å and 1e-5 eV/Å³; forces and stress must equal finite differences of the energy.
"""

from __future__ import annotations

import pickle
import socket
from pathlib import Path

import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk, molecule

from .checks import assert_forces_are_gradient, assert_matches_calculator
from .conftest import require

mattersim = require("mattersim")

import torch
from mattersim.forcefield.m3gnet.m3gnet import M3Gnet
from mattersim.forcefield.potential import MatterSimCalculator
from mattersim.forcefield.potential import Potential as MatterSimModel

from matcalc.models import mattersim as matcalc_mattersim
from matcalc.models.registry import (
    ModelUnavailableError,
    get_model,
    list_models,
    unload_model,
)

CATALOGUE_NAME = "mattersim-v1-1m"
CATALOGUE_FILE = "mattersim-v1.0.0-1M.pth"


def _tiny_model() -> M3Gnet:
    """A 2-block, 16-unit M3GNet with random weights and a per-element scale and shift (fixed seed)."""
    with torch.random.fork_rng():
        torch.manual_seed(11)
        model = M3Gnet(num_blocks=2, units=16, max_l=2, max_n=3, cutoff=5.0, threebody_cutoff=4.0, device="cpu")
        with torch.no_grad():  # untrained outputs are ~1e-3 eV: scale them to forces of ~0.3 eV/Å
            model.normalizer.scale.copy_(300.0 + 100.0 * torch.rand_like(model.normalizer.scale))
            model.normalizer.shift.copy_(-torch.rand_like(model.normalizer.shift))
    return model


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The tiny model as MatterSim's checkpoint (catalogue name) and as a minimal weights-only dict."""
    folder = tmp_path_factory.mktemp("mattersim_models")
    model = _tiny_model()
    checkpoint = folder / CATALOGUE_FILE
    MatterSimModel(model, device="cpu").save(str(checkpoint))  # model, model_args, optimizer, EMA, scheduler...
    minimal = folder / "minimal.pt"
    torch.save({"model_name": "m3gnet", "model": model.state_dict(), "model_args": model.get_model_args()}, minimal)
    return {"dir": folder, "checkpoint": checkpoint, "minimal": minimal}


@pytest.fixture(scope="module")
def reference(files: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> MatterSimCalculator:
    """MatterSim's own calculator on the same file (its loader writes ~/.local/mattersim: HOME is a tmp dir)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HOME", str(tmp_path_factory.mktemp("home")))
        return MatterSimCalculator.from_checkpoint(load_path=str(files["checkpoint"]), device="cpu")


@pytest.fixture()
def catalogue_model(files: dict[str, Path], monkeypatch: pytest.MonkeyPatch):
    """The catalogue model loaded through the registry from MATCALC_MODELS_DIR, network and HOME cut off."""
    home = files["dir"] / "home"
    monkeypatch.setenv("MATCALC_MODELS_DIR", str(files["dir"]))
    monkeypatch.setenv("HOME", str(home))

    def no_network(*args, **kwargs):
        raise AssertionError(f"network access during a MatterSim load or evaluation: {args}")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    unload_model(CATALOGUE_NAME)
    yield get_model(CATALOGUE_NAME, device="cpu")
    unload_model(CATALOGUE_NAME)
    assert not (home / ".local" / "mattersim").exists(), "the load went through MatterSim's downloading loader"


def _structures() -> list[Atoms]:
    """Mixed sizes (2-27 atoms), elements and cell shapes, rattled; plus one molecule (no PBC)."""
    cells = [
        bulk("Si", "diamond", a=5.43),  # 2 atoms, fcc primitive (non-orthogonal)
        bulk("NaCl", "rocksalt", a=5.64, cubic=True),  # 8
        bulk("Cu", "fcc", a=3.61) * (2, 2, 2),  # 8, fcc primitive supercell
        bulk("ZnO", "wurtzite", a=3.25, c=5.2) * (1, 1, 2),  # 8, hexagonal
        bulk("Fe", "bcc", a=2.87) * (3, 3, 3),  # 27
        bulk("MgO", "rocksalt", a=4.21),  # 2
    ]
    cells[2].set_cell(cells[2].cell * [1.0, 1.02, 0.98], scale_atoms=True)  # strained: a non-zero stress pattern
    mol = molecule("CH4")
    mol.center(vacuum=4.0)
    mol.pbc = False
    out = cells + [mol]
    for i, atoms in enumerate(out):
        atoms.rattle(0.05, seed=i)
    return out


def test_card_names_missing_file_then_available(files: dict[str, Path], tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MATCALC_MODELS_DIR", str(tmp_path))
    cards = {c.name: c for c in list_models(device="cpu")}
    for name, filename in (("mattersim-v1-1m", "mattersim-v1.0.0-1M.pth"),
                           ("mattersim-v1-5m", "mattersim-v1.0.0-5M.pth")):
        for key in (name, name + "+d3"):
            assert key in cards and not cards[key].available
        assert str(tmp_path / filename) in cards[name].reason
        assert cards[name].family == "mattersim" and cards[name].batching and cards[name].dtype == "float32"
    with pytest.raises(ModelUnavailableError, match="mattersim-v1.0.0-1M.pth"):
        get_model(CATALOGUE_NAME, device="cpu")
    monkeypatch.setenv("MATCALC_MODELS_DIR", str(files["dir"]))
    cards = {c.name: c for c in list_models(device="cpu")}
    assert cards[CATALOGUE_NAME].available, cards[CATALOGUE_NAME].reason
    assert not cards["mattersim-v1-5m"].available


def test_fused_batch_equals_mattersim_calculator(catalogue_model, reference: MatterSimCalculator) -> None:
    potential = catalogue_model
    assert isinstance(potential, matcalc_mattersim.MatterSimPotential)
    assert potential.supports_batching and potential.dtype == "float32" and potential.cutoff_A == 5.0
    assert {"H", "Fe", "Pu"} <= potential.elements and "Am" not in potential.elements
    structures = _structures()
    assert potential.max_batch_atoms >= sum(len(a) for a in structures)
    assert_matches_calculator(potential, reference, structures, e_tol_eV_per_atom=1e-5, f_tol_eV_per_A=1e-4,
                              s_tol_eV_per_A3=1e-5)
    evals = potential.evaluate(structures)
    assert evals[-1].stress_eV_per_A3 is None  # the molecule
    assert all(e.stress_eV_per_A3 is not None for e in evals[:-1])
    forces = np.concatenate([e.forces_eV_per_A for e in evals])
    assert 0.05 < np.abs(forces).max() < 50  # the comparison is between non-trivial numbers
    # batching really mixes structures: one alone gives the same answer as inside the batch
    alone = potential.evaluate([structures[4]])[0]
    assert abs(alone.energy_eV - evals[4].energy_eV) < 1e-5 * len(structures[4])
    assert np.abs(alone.forces_eV_per_A - evals[4].forces_eV_per_A).max() < 1e-4


def test_forces_and_stress_are_derivatives_of_energy(catalogue_model) -> None:
    atoms = bulk("NaCl", "rocksalt", a=5.5, cubic=True)
    atoms.rattle(0.1, seed=3)
    # float32 energies of ~-90 eV carry ~5e-6 eV of rounding: a 0.01 Å step keeps it at ~3e-4 eV/Å
    assert_forces_are_gradient(catalogue_model, atoms, d=1e-2, tol_eV_per_A=2e-3)
    # stress = (1/V) dE/d(strain), ASE sign, eV/Å³: ASE's finite differences on the same calculator
    a = atoms.copy()
    a.set_cell(a.cell * [1.03, 0.99, 1.0], scale_atoms=True)
    calc = catalogue_model.calculator()
    a.calc = calc
    stress = a.get_stress(voigt=True)
    numeric = calc.calculate_numerical_stress(a, d=3e-3, voigt=True)
    assert np.abs(stress).max() > 1e-2
    assert np.abs(stress - numeric).max() < 5e-5, (stress, numeric)


def test_weights_only_formats(files: dict[str, Path], reference: MatterSimCalculator, tmp_path: Path) -> None:
    # MatterSim's own checkpoint (with optimizer, EMA and scheduler state) needs no unpickling of code
    checkpoint = torch.load(files["checkpoint"], map_location="cpu", weights_only=True)
    assert {"model", "model_args", "model_name"} <= set(checkpoint)
    assert matcalc_mattersim.FAMILY.custom_formats == ("weights_only",)
    # a minimal {model_name, model, model_args} upload loads through the family loader and gives the same numbers
    potential = matcalc_mattersim.load(files["minimal"], name="custom-mattersim", device="cpu")
    assert_matches_calculator(potential, reference, _structures()[:3])
    # a pickle that would build an arbitrary object is refused before any model code runs
    evil = tmp_path / "evil.pth"
    torch.save({"model_name": "m3gnet", "model": {}, "model_args": {}, "x": _Payload()}, evil)
    with pytest.raises(pickle.UnpicklingError):
        matcalc_mattersim.load(evil, name="evil", device="cpu")
    # a weights-only file that is not a MatterSim checkpoint, and one that lacks the model's parameters
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(3)}, other)
    with pytest.raises(ValueError, match="not a MatterSim checkpoint"):
        matcalc_mattersim.load(other, name="other", device="cpu")
    partial = tmp_path / "partial.pt"
    state = {k: v for k, v in checkpoint["model"].items() if not k.startswith("final.")}
    torch.save({"model_name": "m3gnet", "model": state, "model_args": checkpoint["model_args"]}, partial)
    with pytest.raises(ValueError, match="lacks parameters"):
        matcalc_mattersim.load(partial, name="partial", device="cpu")
    with pytest.raises(FileNotFoundError, match="never downloads"):
        matcalc_mattersim.load(tmp_path / "absent.pth", name="absent", device="cpu")


def test_custom_upload_is_validated_and_runs(files: dict[str, Path], reference: MatterSimCalculator,
                                             tmp_path: Path) -> None:
    """matcalc's upload path: inspection (weights_only), validation in a separate process, then use by name."""
    import matcalc
    from matcalc.models.custom import ModelFileError, unregister_model_file

    upload = tmp_path / "upload.pth"
    upload.write_bytes(files["checkpoint"].read_bytes())
    card = matcalc.register_model_file(upload, "mattersim", "test-mattersim-upload", timeout_s=120)
    try:
        assert card.available and card.family == "mattersim" and card.batching
        potential = get_model("test-mattersim-upload", device="cpu")
        assert_matches_calculator(potential, reference, _structures()[1:3])
    finally:
        unload_model("test-mattersim-upload")
        unregister_model_file("test-mattersim-upload")
    evil = tmp_path / "evil.pth"
    torch.save({"model_name": "m3gnet", "model": {}, "model_args": {}, "x": _Payload()}, evil)
    with pytest.raises(ModelFileError) as refused:
        matcalc.register_model_file(evil, "mattersim", "test-mattersim-evil")
    assert refused.value.kind == "unsafe"
    with pytest.raises(ValueError, match="float32"):
        matcalc_mattersim.load(files["minimal"], name="f64", device="cpu", dtype="float64")


class _Payload:
    """Stands for arbitrary code in a pickle: weights_only loading must refuse to build it."""
