"""FAIRChem family: batched matcalc evaluation against fairchem's own FAIRChemCalculator, on a built checkpoint.

No fairchem weights ship in the wheel (the released ones are gated downloads), so the test builds a tiny UMA-type
model from fairchem's own architecture (eSCNMDMoeBackbone with 2 mixture-of-linear-experts, an omat/omol
dataset-specific MoE energy head with autograd forces and stress, element references and a normaliser; seeded
random init), saves it as fairchem's native inference checkpoint (MLIPInferenceCheckpoint, what
``load_predict_unit`` reads) and as the weights-only dict layout, and loads both through matcalc.
Tolerances (float32 model, the same graphs, different batching): 1e-5 eV/atom, 1e-4 eV/Å, 1e-5 eV/Å³.
No test may touch the network.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk, molecule

from tests.families.checks import assert_forces_are_gradient, assert_matches_calculator
from tests.families.conftest import require

fairchem_core = require("fairchem.core")

import torch  # after the family import check

from matcalc.models import get_model
from matcalc.models.fairchem import (
    FAIRChemPotential,
    UnsafeCheckpointError,
    export_weights_only,
    load,
    read_checkpoint,
)
from matcalc.models.registry import model_card, unload_model

DATASETS = ["omat", "omol"]


@dataclasses.dataclass
class Smuggled:
    """Any pickled object other than tensors and containers (unpickling it imports this module)."""

    payload: str = "not a tensor"


pytestmark = pytest.mark.usefixtures("no_network")  # loading and evaluating never open a connection


def _task(name: str, level: str, prop: str, dim: list[int], refs: list[float] | None = None) -> dict[str, Any]:
    task: dict[str, Any] = {
        "_target_": "fairchem.core.units.mlip_unit.mlip_unit.Task", "name": f"omat_{name}", "level": level,
        "property": prop, "out_spec": {"dim": dim, "dtype": "float32"}, "datasets": ["omat"],
        "normalizer": {"_target_": "fairchem.core.modules.normalization.normalizer.Normalizer",
                       "mean": 0.0, "rmsd": 8.0},
    }
    if refs is not None:
        task["element_references"] = {
            "_target_": "fairchem.core.modules.normalization.element_references.ElementReferences",
            "element_references": {"_target_": "torch.tensor", "_args_": [refs]}}
    return task


def tiny_fields(seed: int = 0) -> dict[str, Any]:
    """The four fields of a fairchem inference checkpoint of a tiny, seeded UMA-type model."""
    import hydra

    model_config = {
        "_target_": "fairchem.core.models.base.HydraModel", "model_id": "MATCALC-TINY-TEST",
        "backbone": {
            "model": "fairchem.core.models.uma.escn_moe.eSCNMDMoeBackbone", "num_experts": 2,
            "use_composition_embedding": True, "max_num_elements": 100, "sphere_channels": 16, "lmax": 2,
            "mmax": 2, "otf_graph": True, "max_neighbors": 30, "cutoff": 5.0, "edge_channels": 16,
            "num_distance_basis": 16, "direct_forces": False, "regress_forces": True, "regress_stress": True,
            "num_layers": 2, "hidden_channels": 16, "dataset_list": DATASETS, "always_use_pbc": False},
        "heads": {"efs": {"module": "fairchem.core.models.uma.escn_moe.DatasetSpecificMoEWrapper",
                          "head_cls": "fairchem.core.models.uma.escn_md.MLP_EFS_Head", "dataset_names": DATASETS,
                          "head_kwargs": {"wrap_property": False}}},
        "pass_through_head_outputs": True,
    }
    refs = [0.0] + [-1.0 - 0.5 * (z % 7) for z in range(1, 100)]
    tasks_config = [_task("energy", "system", "energy", [1], refs), _task("forces", "atom", "forces", [3]),
                    _task("stress", "system", "stress", [1, 9])]
    torch.manual_seed(seed)
    model = hydra.utils.instantiate(model_config)
    ema = torch.optim.swa_utils.AveragedModel(model)
    return {"model_config": model_config, "model_state_dict": model.state_dict(),
            "ema_state_dict": ema.state_dict(), "tasks_config": tasks_config}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The tiny model as a native checkpoint and as the weights-only dict layout."""
    from fairchem.core.units.mlip_unit.api.inference import MLIPInferenceCheckpoint

    folder = tmp_path_factory.mktemp("fairchem")
    fields = tiny_fields()
    native, plain = folder / "tiny-native.pt", folder / "tiny-weights-only.pt"
    torch.save(MLIPInferenceCheckpoint(**fields), native)
    torch.save(fields, plain)
    return {"native": native, "weights_only": plain}


@pytest.fixture(scope="module")
def potential(checkpoints: dict[str, Path]) -> FAIRChemPotential:
    return FAIRChemPotential(checkpoints["native"], "fairchem-tiny", "cpu")


def _calculator(path: Path) -> Any:
    """fairchem's own calculator on the same file (its own predict unit, batch inference mode)."""
    from fairchem.core import FAIRChemCalculator
    from fairchem.core.units.mlip_unit import load_predict_unit

    return FAIRChemCalculator(load_predict_unit(str(path), inference_settings="batch", device="cpu"),
                              task_name="omat")


def _rattled(atoms: Atoms, seed: int, stdev: float = 0.08) -> Atoms:
    atoms = atoms.copy()
    atoms.rattle(stdev, seed=seed)
    return atoms


def structures() -> list[Atoms]:
    """Mixed sizes (2-16 atoms) and elements, rattled, one skewed cell; the last one is not periodic."""
    skewed = bulk("Cu", "fcc", a=3.6) * (2, 2, 1)
    skewed.set_cell(skewed.cell[:] + [[0, 0, 0], [0.4, 0, 0], [0.2, 0.3, 0]], scale_atoms=True)
    return [
        _rattled(bulk("Si", "diamond", a=5.43), 1),
        _rattled(bulk("NaCl", "rocksalt", a=5.6), 2),
        _rattled(skewed, 3),
        _rattled(bulk("ZnO", "wurtzite", a=3.25, c=5.2) * (2, 2, 2), 4),
        _rattled(molecule("CH4"), 5),
    ]


def test_fused_batch_equals_fairchem_calculator(potential: FAIRChemPotential, checkpoints: dict[str, Path]) -> None:
    assert potential.supports_batching and potential.task == "omat"
    assert potential.cutoff_A == 5.0 and potential.dtype == "float32"
    assert {"H", "Si", "Zn", "Es"} <= potential.elements and "Fm" not in potential.elements
    assert_matches_calculator(potential, _calculator(checkpoints["native"]), structures())


def test_isolated_atom_is_refused_clearly(potential: FAIRChemPotential) -> None:
    with pytest.raises(ValueError, match="isolated single atom"):
        potential.evaluate([structures()[0], Atoms("Cu", positions=[[0.0, 0.0, 0.0]])])


def test_forces_and_stress_are_gradients(potential: FAIRChemPotential) -> None:
    atoms = _rattled(bulk("NaCl", "rocksalt", a=5.3), 7, stdev=0.1)
    assert_forces_are_gradient(potential, atoms, tol_eV_per_A=2e-3)
    a = atoms.copy()
    a.calc = potential.calculator()
    stress = a.get_stress()
    numeric = a.calc.calculate_numerical_stress(a, d=1e-3)
    assert np.abs(stress).max() > 2e-3, "stress vanishes: the check would prove nothing"
    assert np.abs(stress - numeric).max() < 2e-5, (stress, numeric)  # eV/Å³; float32 noise ~5e-6


def test_catalogue_cards_and_loading(checkpoints: dict[str, Path], tmp_path: Path,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MATCALC_MODELS_DIR", str(tmp_path))
    card = model_card("uma-s-1p1")
    assert not card.available and str(tmp_path / "uma-s-1p1.pt") in card.reason
    assert "facebook/UMA" in card.reason and card.family == "fairchem" and card.batching
    shutil.copy(checkpoints["native"], tmp_path / "uma-s-1p1.pt")
    assert model_card("uma-s-1p1").available and model_card("uma-s-1p1+d3").family == "fairchem"
    # a catalogue file placed by the operator goes straight to fairchem's loader (no weights-only copy)
    monkeypatch.setattr("matcalc.models.fairchem._checked_copy", pytest.fail)
    try:
        model = get_model("uma-s-1p1", device="cpu")
        atoms = structures()[1]
        ref = atoms.copy()
        ref.calc = _calculator(checkpoints["native"])
        assert abs(model.evaluate([atoms])[0].energy_eV - ref.get_potential_energy()) < 1e-5
    finally:
        unload_model("uma-s-1p1")
    for name, file in (("esen-30m-oam", "esen_30m_oam.pt"), ("eqv2-m-oam", "eqV2_86M_omat_mp_salex.pt")):
        shutil.copy(checkpoints["native"], tmp_path / file)  # even with the file present: fairchem 1.x only
        legacy = model_card(name)
        assert not legacy.available and "fairchem-core 1.x" in legacy.reason and file in legacy.reason


def test_weights_only_upload_layout(checkpoints: dict[str, Path], potential: FAIRChemPotential,
                                    tmp_path: Path) -> None:
    # the dict layout passes a plain weights-only load; fairchem's native layout needs its checkpoint
    # dataclass allowed, and matcalc reads both that way before checking the config
    torch.load(checkpoints["weights_only"], map_location="cpu", weights_only=True)
    with pytest.raises(Exception, match="Weights only load failed"):
        torch.load(checkpoints["native"], map_location="cpu", weights_only=True)
    assert set(read_checkpoint(checkpoints["native"])) == set(read_checkpoint(checkpoints["weights_only"]))
    atoms = structures()[:3]
    expected = potential.evaluate(atoms)
    exported = export_weights_only(checkpoints["native"], tmp_path / "exported.pt")
    torch.load(exported, map_location="cpu", weights_only=True)
    for path in (*checkpoints.values(), exported):
        custom = load(path, name="fairchem-custom", device="cpu")  # untrusted: checked copy
        for got, want in zip(custom.evaluate(atoms), expected, strict=True):
            assert got.energy_eV == pytest.approx(want.energy_eV, abs=1e-6)
            assert np.abs(got.forces_eV_per_A - want.forces_eV_per_A).max() < 1e-6


def test_unsafe_checkpoints_are_refused(tmp_path: Path) -> None:
    base = tiny_fields()
    cases = {
        "not an allowed fairchem class": {"_target_": "os.system", "_args_": ["true"]},
        "interpolation": {**base["model_config"], "model_id": "${oc.env:HOME}"},
        "another file": {**base["model_config"], "finetune_config": {"starting_checkpoint": "/tmp/x.pt"}},
        "not a fairchem model class": {**base["model_config"],
                                       "backbone": {**base["model_config"]["backbone"], "model": "os.system"}},
    }
    for i, (label, model_config) in enumerate(cases.items()):
        path = tmp_path / f"case{i}.pt"
        torch.save({**base, "model_config": model_config}, path)
        with pytest.raises(UnsafeCheckpointError, match=label):
            load(path, name=label, device="cpu")

    path = tmp_path / "pickled-object.pt"
    torch.save({**base, "tasks_config": [Smuggled()]}, path)
    with pytest.raises(UnsafeCheckpointError, match="weights-only"):
        load(path, name="pickled", device="cpu")
    with pytest.raises(FileNotFoundError):
        load(tmp_path / "absent.pt", name="absent", device="cpu")
    torch.save(base, tmp_path / "fine.pt")
    with pytest.raises(TypeError):  # no loader option lets an uploaded file skip the checks
        load(tmp_path / "fine.pt", name="fine", device="cpu", trusted=True)
