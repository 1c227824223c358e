"""GRACE family: batched matcalc evaluation against tensorpotential's own TPCalculator, on a built SavedModel.

GRACE weights do not ship with tensorpotential (``grace_fm`` downloads them), so the test builds a tiny
two-layer GRACE model from tensorpotential's own preset (``GRACE_2LAYER_v1_24``: 8-channel embedding, lmax
(2, 1), 4 radial functions, seeded random init, float64 like the GRACE-2L-OAM release), exports it the way
tensorpotential exports its models (``TPModel.save_model``: an XLA-compiled SavedModel folder with
metadata.yaml) and loads that folder through matcalc. Tolerances (float64 model, the same compute function,
different graph batching and padding): 1e-8 eV/atom, 1e-8 eV/Å, 1e-9 eV/Å³. No test may touch the network.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk

from tests.families.checks import assert_forces_are_gradient, assert_matches_calculator
from tests.families.conftest import require

tensorpotential = require("tensorpotential")

import tensorflow as tf  # after tensorpotential, which configures TensorFlow on import
from tensorpotential.calculator import TPCalculator
from tensorpotential.potentials.presets import GRACE_2LAYER_v1_24
from tensorpotential.tpmodel import TPModel

from matcalc.models import get_model, list_models
from matcalc.models.grace import FAMILY, GRACEPotential, load
from matcalc.models.registry import unload_model

FOLDER = "GRACE-2L-OAM"
ELEMENTS = {"Al": 0, "Cu": 1, "O": 2}
CUTOFF_A = 4.0


pytestmark = pytest.mark.usefixtures("no_network")  # loading and evaluating never open a connection


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A models dir holding a tiny seeded GRACE-2L SavedModel under the catalogue folder name."""
    tf.random.set_seed(7)
    np.random.seed(7)
    instructions = GRACE_2LAYER_v1_24(element_map=ELEMENTS, rcut=CUTOFF_A, avg_n_neigh=10.0, embedding_size=8,
                                      lmax=(2, 1), n_rad_max=(4, 4), n_rad_base=4, n_mlp_dens=4, max_order=2,
                                      constant_out_shift=-1.5).get_instructions()
    model = TPModel(instructions)
    model.build(tf.float64)
    root = tmp_path_factory.mktemp("grace-models")
    model.save_model(str(root / FOLDER), jit_compile=True)
    return root


@pytest.fixture(scope="module")
def potential(models_dir: Path) -> GRACEPotential:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MATCALC_MODELS_DIR", str(models_dir))
        pot = get_model("grace-2l-oam", device="cpu")
    yield pot
    unload_model("grace-2l-oam")


def _structures() -> list[Atoms]:
    """Small structures of mixed sizes (2-27 atoms) and elements, rattled; one non-periodic cluster."""
    al = bulk("Al", "fcc", 4.05) * (2, 1, 1)
    cu = bulk("Cu", "fcc", 3.61, cubic=True) * (2, 1, 1)
    cuo = bulk("CuO", "rocksalt", 4.26, cubic=True)
    cuo.set_cell(cuo.cell * [1.03, 1.0, 0.98], scale_atoms=True)
    alloy = bulk("Al", "fcc", 4.05) * (3, 3, 3)
    alloy.symbols[[0, 5, 13]] = "Cu"
    cluster = Atoms("Cu2O2", positions=[[0, 0, 0], [2.4, 0, 0], [1.2, 1.5, 0], [1.2, -1.5, 0.3]])
    structures = [al, cu, cuo, alloy, cluster]
    for i, atoms in enumerate(structures):
        atoms.rattle(0.08, seed=i)
    return structures


def test_fused_batch_matches_tpcalculator(potential: GRACEPotential, models_dir: Path) -> None:
    assert potential.family == "grace" and potential.supports_batching
    assert potential.elements == frozenset(ELEMENTS)
    assert potential.cutoff_A == pytest.approx(CUTOFF_A)
    assert potential.dtype == "float64"
    structures = _structures()
    reference = TPCalculator(model=str(models_dir / FOLDER))
    assert_matches_calculator(potential, reference, structures, e_tol_eV_per_atom=1e-8, f_tol_eV_per_A=1e-8,
                              s_tol_eV_per_A3=1e-9)
    evals = potential.evaluate(structures)
    assert evals[-1].stress_eV_per_A3 is None and all(e.stress_eV_per_A3 is not None for e in evals[:-1])
    assert len({round(e.energy_eV / len(a), 6) for e, a in zip(evals, structures)}) == len(structures)


def test_forces_and_stress_are_derivatives(potential: GRACEPotential) -> None:
    atoms = _structures()[2]
    assert_forces_are_gradient(potential, atoms, d=1e-4, tol_eV_per_A=1e-5)
    a = atoms.copy()
    a.calc = potential.calculator()
    stress = a.get_stress(voigt=True)
    numeric = a.calc.calculate_numerical_stress(a, d=1e-5, voigt=True)  # ASE sign: +dE/dε / V
    assert np.abs(stress).max() > 1e-3
    assert np.abs(stress - numeric).max() < 1e-6, np.abs(stress - numeric).max()


def test_one_by_one_fallback_matches_tpcalculator(models_dir: Path) -> None:
    """A SavedModel without atomic energies/pair forces is evaluated one structure per call (totals, virial)."""
    pot = load(models_dir / FOLDER, name="grace-fallback", device="cpu")
    pot._fused = False
    pot.supports_batching = False
    structures = [_structures()[i] for i in (0, 2)]
    assert_matches_calculator(pot, TPCalculator(model=str(models_dir / FOLDER)), structures, e_tol_eV_per_atom=1e-8,
                              f_tol_eV_per_A=1e-8, s_tol_eV_per_A3=1e-9, one_call=False)
    assert pot.stats.calls == len(structures)


def test_cards_name_the_missing_folder(models_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    names = {"grace-2l-oam": "GRACE-2L-OAM", "grace-2l-omat": "GRACE-2L-OMAT", "grace-1l-oam": "GRACE-1L-OAM"}
    monkeypatch.setenv("MATCALC_MODELS_DIR", str(tmp_path))
    cards = {c.name: c for c in list_models(device="cpu")}
    for name, folder in names.items():
        assert not cards[name].available and cards[name + "+d3"].family == "grace"
        assert str(tmp_path / folder / "saved_model.pb") in cards[name].reason
        assert f"grace_models download {folder}" in cards[name].reason
    monkeypatch.setenv("MATCALC_MODELS_DIR", str(models_dir))
    cards = {c.name: c for c in list_models(device="cpu")}
    assert cards["grace-2l-oam"].available and cards["grace-2l-oam"].batching
    assert not cards["grace-2l-omat"].available


def test_load_accepts_folder_or_pb_and_refuses_missing(potential: GRACEPotential, models_dir: Path,
                                                        tmp_path: Path) -> None:
    pot = load(models_dir / FOLDER / "saved_model.pb", name="custom-grace", device="cpu")
    atoms = _structures()[0]
    assert pot.evaluate([atoms])[0].energy_eV == pytest.approx(potential.evaluate([atoms])[0].energy_eV, abs=1e-10)
    with pytest.raises(FileNotFoundError, match="saved_model.pb"):
        load(tmp_path / "GRACE-2L-OMAT", name="missing", device="cpu")
    with pytest.raises(FileNotFoundError):
        load(None, name="missing", device="cpu")


def test_no_custom_upload_format(models_dir: Path) -> None:
    """A GRACE model is a TensorFlow SavedModel folder (graph code), not a torch file: no upload format."""
    import pickle

    import torch

    assert FAMILY.custom_formats == ()
    with pytest.raises(pickle.UnpicklingError):
        torch.load(models_dir / FOLDER / "saved_model.pb", weights_only=True, map_location="cpu")
