"""SevenNet family: batched matcalc evaluation against sevenn's own ASE calculator, on real and built models.

Real weights: 7net-0 and the multi-fidelity 7net-mf-0 ship inside the sevenn wheel. Catalogue models whose
weights do not ship (7net-omat, 7net-mf-ompa) are tested with tiny models built by sevenn's own model builder
(seeded random init), saved as checkpoints under a temporary MATCALC_MODELS_DIR. Tolerances (float32 model,
identical graphs, different batching): 1e-5 eV/atom, 1e-4 eV/Å, 1e-5 eV/Å³. No test may touch the network.
"""

from __future__ import annotations

import copy
import socket
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk, molecule

from tests.families.checks import assert_forces_are_gradient, assert_matches_calculator
from tests.families.conftest import require

sevenn = require("sevenn")

import torch

from matcalc.models import get_model
from matcalc.models.registry import ModelUnavailableError, model_card, unload_model
from matcalc.models.sevennet import (
    DeployedSevenNetPotential,
    SevenNetPotential,
    load,
    read_checkpoint,
    shipped_checkpoint,
)
from matcalc.structures import StructureError

TINY_SPECIES = ["H", "C", "O", "Si", "Cu"]


pytestmark = pytest.mark.usefixtures("no_network")  # loading and evaluating never open a connection


def _calculator(model: str | Path, modal: str | None = None) -> Any:
    from sevenn.calculator import SevenNetCalculator

    return SevenNetCalculator(str(model), device="cpu", modal=modal)


def _rattled(atoms: Atoms, seed: int, stdev: float = 0.05) -> Atoms:
    atoms = atoms.copy()
    atoms.rattle(stdev, seed=seed)
    return atoms


def _in_box(names: list[str], box_A: float, seed: int) -> Atoms:
    """Molecules side by side in a skewed periodic box (C, H, O)."""
    atoms = Atoms(cell=[[box_A, 0, 0], [0.6, box_A, 0], [0.3, 0.4, box_A]], pbc=True)
    for i, name in enumerate(names):
        m = molecule(name)
        m.translate([1.5 + 3.0 * i, 2.5, 2.5])
        atoms += m
    return _rattled(atoms, seed)


def real_structures() -> list[Atoms]:
    """Mixed sizes (2-16 atoms) and elements, rattled; the last one is not periodic."""
    methane = molecule("CH4")
    methane.center(3.0)
    return [
        _rattled(bulk("Si", "diamond", a=5.43), 1),
        _rattled(bulk("NaCl", "rocksalt", a=5.64).repeat((2, 1, 1)), 2),
        _rattled(bulk("ZnO", "wurtzite", a=3.25, c=5.2).repeat((2, 2, 1)), 3),
        _in_box(["CO2", "H2O"], 7.0, 4),
        _rattled(bulk("Cu", "fcc", a=3.61, cubic=True), 5),
        _rattled(methane, 6),
    ]


def tiny_structures() -> list[Atoms]:
    """Structures made of TINY_SPECIES only."""
    return [
        _rattled(bulk("Si", "diamond", a=5.43), 11, 0.1),
        _rattled(bulk("Cu", "fcc", a=3.61, cubic=True), 12, 0.1),
        _in_box(["CO2", "CH4"], 7.5, 13),
        _rattled(bulk("Si", "diamond", a=5.43, cubic=True), 14, 0.1),
    ]


def tiny_checkpoint(path: Path, modals: list[str] | None = None, seed: int = 0) -> Path:
    """A tiny SevenNet built by sevenn's own model builder (seeded random init), saved as a checkpoint."""
    import sevenn._const as consts
    import sevenn._keys as KEY
    from sevenn.model_build import build_E3_equivariant_model
    from sevenn.util import chemical_species_preprocess

    cfg = copy.deepcopy(consts.DEFAULT_E3_EQUIVARIANT_MODEL_CONFIG)
    cfg.update(chemical_species_preprocess(TINY_SPECIES))
    n = cfg[KEY.NUM_SPECIES]
    cfg.update({KEY.CUTOFF: 4.0, KEY.NODE_FEATURE_MULTIPLICITY: 4, KEY.LMAX: 1, KEY.IS_PARITY: False,
                KEY.NUM_CONVOLUTION: 2, KEY.CONVOLUTION_WEIGHT_NN_HIDDEN_NEURONS: [8], KEY.CONV_DENOMINATOR: 4.0,
                KEY.SHIFT: [-3.0 - 0.2 * i for i in range(n)], KEY.SCALE: [8.0] * n, KEY.DTYPE: "single",
                "version": sevenn.__version__})
    if modals:
        cfg.update({KEY.USE_MODALITY: True, KEY.MODAL_MAP: {m: i for i, m in enumerate(modals)},
                    KEY.MODAL_LIST: list(modals), KEY.NUM_MODALITIES: len(modals),
                    KEY.USE_MODAL_SELF_INTER_INTRO: True, KEY.USE_MODAL_OUTPUT_BLOCK: True,
                    KEY.USE_MODAL_WISE_SHIFT: True, KEY.USE_MODAL_WISE_SCALE: False,
                    KEY.SHIFT: {m: -3.0 - 0.5 * i for i, m in enumerate(modals)}})
    torch.manual_seed(seed)
    model = build_E3_equivariant_model(cfg)
    torch.save({"config": cfg, "model_state_dict": model.state_dict()}, path)
    return path


@pytest.fixture(scope="module")
def sevennet_0() -> SevenNetPotential:
    pot = get_model("7net-0", device="cpu")
    assert isinstance(pot, SevenNetPotential)
    return pot


def test_7net0_fused_batch_matches_calculator(sevennet_0: SevenNetPotential) -> None:
    structures = real_structures()
    assert 2 <= min(map(len, structures)) and max(map(len, structures)) <= 30
    assert sevennet_0.supports_batching and sevennet_0.dtype == "float32" and sevennet_0.cutoff_A == 5.0
    assert {"H", "C", "O", "Zn", "Cu", "Pu"} <= sevennet_0.elements and "Po" not in sevennet_0.elements
    assert_matches_calculator(sevennet_0, _calculator("7net-0"), structures)
    assert sevennet_0.stats.batch_sizes == [len(structures)]
    evals = sevennet_0.evaluate(structures)
    assert evals[-1].stress_eV_per_A3 is None and evals[0].stress_eV_per_A3 is not None


def test_7net0_forces_are_gradient(sevennet_0: SevenNetPotential) -> None:
    assert_forces_are_gradient(sevennet_0, _rattled(bulk("NaCl", "rocksalt", a=5.64), 7, 0.1))


def test_7net0_rejects_unknown_elements(sevennet_0: SevenNetPotential) -> None:
    with pytest.raises(StructureError, match="Po"):
        sevennet_0.evaluate([Atoms("Po2", positions=[[0, 0, 0], [1.5, 1.5, 1.5]], cell=[3, 3, 3], pbc=True)])


def test_shipped_multi_fidelity_needs_and_uses_its_modal() -> None:
    structures = real_structures()[:4]
    pbe = load(None, name="7net-mf-0-pbe", device="cpu", checkpoint="7net-mf-0", modal="PBE")
    assert_matches_calculator(pbe, _calculator("7net-mf-0", modal="PBE"), structures)
    r2scan = load(None, name="7net-mf-0-r2scan", device="cpu", checkpoint="7net-mf-0", modal="r2scan")
    assert r2scan.modal == "R2SCAN"
    assert_matches_calculator(r2scan, _calculator("7net-mf-0", modal="R2SCAN"), structures)
    e_pbe = pbe.evaluate(structures[:1])[0].energy_eV
    e_r2scan = r2scan.evaluate(structures[:1])[0].energy_eV
    assert abs(e_pbe - e_r2scan) > 0.1, "the two fidelities should differ"
    with pytest.raises(ValueError, match="R2SCAN"):
        load(None, name="x", device="cpu", checkpoint="7net-mf-0")
    with pytest.raises(ValueError, match="unknown modal"):
        load(None, name="x", device="cpu", checkpoint="7net-mf-0", modal="omat24")


def test_catalogue_cards_and_tiny_multi_fidelity_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MATCALC_MODELS_DIR", str(tmp_path))
    for name in ("7net-0", "7net-l3i5"):
        assert model_card(name).available, model_card(name).reason
    for name, filename in [("7net-omat", "checkpoint_sevennet_omat.pth"),
                           ("7net-mf-ompa", "checkpoint_sevennet_mf_ompa.pth"),
                           ("7net-omni", "checkpoint_sevennet_omni.pth")]:
        card = model_card(name)
        assert not card.available and str(tmp_path / filename) in card.reason and "never downloads" in card.reason
        assert card.family == "sevennet" and card.batching
        with pytest.raises(ModelUnavailableError, match=filename):
            get_model(name, device="cpu")

    path = tiny_checkpoint(tmp_path / "checkpoint_sevennet_mf_ompa.pth", modals=["mpa", "omat24"])
    assert model_card("7net-mf-ompa").available and model_card("7net-mf-ompa+d3").name == "7net-mf-ompa+d3"
    unload_model("7net-mf-ompa")
    try:
        pot = get_model("7net-mf-ompa", device="cpu")  # the catalogue entry selects modal "mpa"
        assert isinstance(pot, SevenNetPotential) and pot.modal == "mpa"
        assert pot.elements == frozenset(TINY_SPECIES) and pot.cutoff_A == 4.0
        assert_matches_calculator(pot, _calculator(path, modal="mpa"), tiny_structures())
        omat = load(path, name="tiny-omat24", device="cpu", modal="omat24")
        assert_matches_calculator(omat, _calculator(path, modal="omat24"), tiny_structures())
        with pytest.raises(StructureError, match="Na"):
            pot.evaluate([bulk("NaCl", "rocksalt", a=5.64)])
    finally:
        unload_model("7net-mf-ompa")


def test_tiny_checkpoint_by_path_forces_are_gradient(tmp_path: Path) -> None:
    path = tiny_checkpoint(tmp_path / "tiny.pth", seed=3)
    pot = load(path, name="tiny", device="cpu")
    assert_matches_calculator(pot, _calculator(path), tiny_structures())
    assert_forces_are_gradient(pot, tiny_structures()[2])


def test_weights_only_checkpoints(tmp_path: Path) -> None:
    """A checkpoint sevenn writes from its own builder holds only tensors and plain data: weights_only=True
    loads it as is. Released checkpoints also hold numpy arrays (config shift/scale): plain weights_only=True
    refuses them, and matcalc reads them with numpy's array reconstructors allowlisted, nothing else."""
    tiny = tiny_checkpoint(tmp_path / "tiny.pth")
    assert set(torch.load(tiny, weights_only=True, map_location="cpu")) == {"config", "model_state_dict"}

    released = shipped_checkpoint("7net-0")
    unsafe = set(torch.serialization.get_unsafe_globals_in_checkpoint(str(released)))
    assert unsafe and all(g.startswith("numpy.") for g in unsafe), unsafe
    with pytest.raises(Exception, match="Weights only load failed"):
        torch.load(released, weights_only=True, map_location="cpu")
    assert isinstance(read_checkpoint(released)["config"]["shift"], np.ndarray)

    pickled = tmp_path / "code.pth"
    torch.save({"config": {"f": socket.getfqdn}, "model_state_dict": {}}, pickled)
    with pytest.raises(Exception, match="Weights only load failed"):
        read_checkpoint(pickled)


@pytest.mark.parametrize("modal", [None, "omat24"])
def test_deployed_torchscript_matches_checkpoint(tmp_path: Path, modal: str | None) -> None:
    """``sevenn``'s LAMMPS deployment (TorchScript; a multi-fidelity model is deployed for one fidelity)."""
    from sevenn.scripts.deploy import deploy

    path = tiny_checkpoint(tmp_path / "tiny.pth", modals=["mpa", "omat24"] if modal else None, seed=5)
    deployed = tmp_path / "deployed_serial.pt"
    deploy(str(path), str(deployed), modal=modal)
    pot = load(deployed, name="tiny-ts", device="cpu")
    assert isinstance(pot, DeployedSevenNetPotential)
    assert pot.elements == frozenset(TINY_SPECIES) and pot.cutoff_A == 4.0
    assert_matches_calculator(pot, _calculator(path, modal=modal), tiny_structures())


def test_missing_files_raise(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        load(tmp_path / "nope.pth", name="x", device="cpu")
    with pytest.raises(ValueError, match="unknown shipped"):
        shipped_checkpoint("7net-omat")
