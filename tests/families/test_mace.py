"""MACE adapter, against MACE's own ASE calculator on a tiny model built from mace.modules (random, seeded).

Runs in .venvs/mace (scripts/setup-family mace). The model is float64 like the foundation models, so the fused
batch must equal the one-by-one calculator to ~1e-8 (summation order only); the float32 conversion is checked
at float32 tolerances (1e-5 eV/atom, 1e-4 eV/Å).
"""

from __future__ import annotations

import os
import pickle
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk, molecule

# relative imports: the mace-torch wheel installs its own top-level ``tests`` package, which shadows this repo's
from .checks import assert_forces_are_gradient, assert_matches_calculator
from .conftest import require

mace = require("mace")

import torch
from mace.calculators import MACECalculator

from matcalc.models import mace as matcalc_mace
from matcalc.models.registry import (
    ModelUnavailableError,
    get_model,
    list_models,
    unload_model,
)

ZS = [1, 6, 7, 8, 29, 30]  # H C N O Cu Zn
CATALOGUE_NAME = "mace-mpa-0-medium"


def _tiny_model(heads: list[str] | None = None) -> torch.nn.Module:
    """A 2-layer ScaleShiftMACE with 8 channels, float64, fixed seed (optionally with several heads)."""
    from e3nn import o3
    from mace import modules

    block = modules.interaction_classes["RealAgnosticResidualInteractionBlock"]
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        with torch.random.fork_rng():
            torch.manual_seed(7)
            n = len(heads or ["Default"])
            e0 = np.array([-1.1, -8.2, -8.3, -7.4, -4.5, -1.6])
            return modules.ScaleShiftMACE(
                r_max=4.5, num_bessel=4, num_polynomial_cutoff=5, max_ell=2, interaction_cls=block,
                interaction_cls_first=block, num_interactions=2, num_elements=len(ZS),
                hidden_irreps=o3.Irreps("8x0e+8x1o"), MLP_irreps=o3.Irreps("8x0e"), gate=torch.nn.functional.silu,
                atomic_energies=np.stack([e0 * (1 + 0.1 * i) for i in range(n)]) if heads else e0,
                avg_num_neighbors=8.0, atomic_numbers=ZS, correlation=2, heads=heads,
                atomic_inter_scale=[4.0 - i for i in range(n)] if heads else 4.0,
                atomic_inter_shift=[0.1 * (i + 1) for i in range(n)] if heads else 0.1)
    finally:
        torch.set_default_dtype(before)


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The tiny model as MACE's two file formats: a pickled ``.model`` and TorchScript (``*_compiled.model``)."""
    from e3nn.util import jit

    folder = tmp_path_factory.mktemp("mace_models")
    model = _tiny_model()
    pickled = folder / "mace-mpa-0-medium.model"  # the catalogue file name of CATALOGUE_NAME
    torch.save(model, pickled)
    compiled = folder / "tiny_compiled.model"
    torch.jit.save(jit.compile(model), str(compiled))
    return {"pickle": pickled, "torchscript": compiled, "dir": folder}


@pytest.fixture(scope="module")
def reference(files: dict[str, Path]) -> MACECalculator:
    return MACECalculator(model_paths=str(files["pickle"]), device="cpu")


def _structures() -> list[Atoms]:
    """Small periodic cells (4-27 atoms, mixed elements, rattled) and one molecule without a cell."""
    cu = bulk("Cu", "fcc", a=3.6, cubic=True)
    zno = bulk("ZnO", "wurtzite", a=3.25, c=5.2)
    rocksalt = bulk("NaCl", "rocksalt", a=4.3, cubic=True).repeat((1, 1, 2))
    rocksalt.symbols = ["Zn", "O", "Cu", "N"] * 4
    organic = molecule("CH3CONH2") + molecule("H2O", positions=molecule("H2O").positions + [3.0, 3.0, 3.0])
    organic.set_cell([[7.0, 0, 0], [0.5, 7.5, 0], [0.3, 0.2, 7.2]])
    organic.pbc = True
    alloy = bulk("Cu", "fcc", a=3.6).repeat((3, 3, 3))
    alloy.symbols[::4] = "Zn"
    alloy.symbols[1] = "C"
    gas = molecule("CO2")
    out = [cu, zno, rocksalt, organic, alloy, gas]
    for seed, a in enumerate(out):
        a.rattle(0.08, seed=seed)
    return out


def test_batch_equals_mace_calculator_one_by_one(files: dict[str, Path], reference: MACECalculator) -> None:
    potential = matcalc_mace.load(files["pickle"], name="tiny", allow_pickle=True)
    assert potential.dtype == "float64" and potential.cutoff_A == pytest.approx(4.5)
    assert potential.elements == frozenset({"H", "C", "N", "O", "Cu", "Zn"})
    structures = _structures()
    assert_matches_calculator(potential, reference, structures, e_tol_eV_per_atom=1e-9, f_tol_eV_per_A=1e-8,
                              s_tol_eV_per_A3=1e-9)
    assert potential.evaluate([structures[-1]])[0].stress_eV_per_A3 is None
    assert torch.get_default_dtype() == torch.float32  # the float64 graphs did not leave the default changed


def test_float32_option(files: dict[str, Path]) -> None:
    potential = matcalc_mace.load(files["pickle"], name="tiny32", allow_pickle=True, dtype="float32")
    assert potential.dtype == "float32" and next(potential.model.parameters()).dtype == torch.float32
    calc = MACECalculator(model_paths=str(files["pickle"]), device="cpu", default_dtype="float32")
    assert_matches_calculator(potential, calc, _structures()[:5])


def test_forces_are_gradient(files: dict[str, Path]) -> None:
    potential = matcalc_mace.load(files["pickle"], name="tiny", allow_pickle=True)
    assert_forces_are_gradient(potential, _structures()[2], tol_eV_per_A=1e-5)


def test_multi_head_model(tmp_path: Path) -> None:
    """The head is chosen as MACE's calculator chooses it: given, else the one called 'default'."""
    path = tmp_path / "two_heads.model"
    torch.save(_tiny_model(heads=["omat_pbe", "Default"]), path)
    structures = _structures()[:4]
    energies = {}
    for head in ("omat_pbe", None):
        potential = matcalc_mace.load(path, name="heads", allow_pickle=True, head=head)
        assert potential.head == (head or "Default")
        calc = MACECalculator(model_paths=str(path), device="cpu", **({"head": head} if head else {}))
        assert_matches_calculator(potential, calc, structures, e_tol_eV_per_atom=1e-9, f_tol_eV_per_A=1e-8,
                                  s_tol_eV_per_A3=1e-9)
        energies[head] = potential.evaluate(structures[:1])[0].energy_eV
    assert abs(energies["omat_pbe"] - energies[None]) > 0.1  # the heads differ: the choice is really tested
    with pytest.raises(ValueError, match="not in the model's heads"):
        matcalc_mace.load(path, name="heads", allow_pickle=True, head="absent")


def test_catalogue_card_and_load(files: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                 reference: MACECalculator) -> None:
    monkeypatch.setenv("MATCALC_MODELS_DIR", str(tmp_path))
    cards = {c.name: c for c in list_models(device="cpu")}
    for entry in matcalc_mace.CATALOGUE:
        card = cards[entry.name]
        assert card.family == "mace" and not card.available and card.batching
        assert f"weights file not found: {tmp_path / entry.filename}" in card.reason
        assert cards[entry.name + "+d3"].family == "mace"
    with pytest.raises(ModelUnavailableError, match="mace-mpa-0-medium.model"):
        get_model(CATALOGUE_NAME, device="cpu")

    monkeypatch.setenv("MATCALC_MODELS_DIR", str(files["dir"]))
    card = {c.name: c for c in list_models(device="cpu")}[CATALOGUE_NAME]
    assert card.available, card.reason

    def no_network(*args: object, **kwargs: object) -> None:
        raise AssertionError("network access while loading a MACE model")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    unload_model(CATALOGUE_NAME)
    try:
        potential = get_model(CATALOGUE_NAME, device="cpu")
        assert isinstance(potential, matcalc_mace.MACEPotential)
        assert_matches_calculator(potential, reference, _structures()[:3], e_tol_eV_per_atom=1e-9,
                                  f_tol_eV_per_A=1e-8, s_tol_eV_per_A3=1e-9)
    finally:
        unload_model(CATALOGUE_NAME)


def test_torchscript_is_the_custom_format(files: dict[str, Path], reference: MACECalculator) -> None:
    assert matcalc_mace.FAMILY.custom_formats == ("torchscript",)
    assert matcalc_mace.is_torchscript(files["torchscript"]) and not matcalc_mace.is_torchscript(files["pickle"])
    # MACE's .model is a pickle of the whole module (e3nn code objects included): weights_only cannot read it
    with pytest.raises(pickle.UnpicklingError):
        torch.load(files["pickle"], weights_only=True, map_location="cpu")
    with pytest.raises(ValueError, match="not a TorchScript MACE model"):
        matcalc_mace.load(files["pickle"], name="untrusted")  # pickles need allow_pickle (catalogue only)

    scripted = matcalc_mace.load(files["torchscript"], name="custom")  # the default path of an upload
    assert isinstance(scripted.model, torch.jit.ScriptModule)
    assert_matches_calculator(scripted, reference, _structures(), e_tol_eV_per_atom=1e-9, f_tol_eV_per_A=1e-8,
                              s_tol_eV_per_A3=1e-9)

    restricted = matcalc_mace.load(files["torchscript"], name="custom", elements=["Cu", "Zn"], cutoff_A=4.5)
    assert restricted.elements == frozenset({"Cu", "Zn"})
    with pytest.raises(ValueError, match="r_max"):
        matcalc_mace.load(files["torchscript"], name="custom", cutoff_A=5.0)
    with pytest.raises(ValueError, match="Fe"):
        matcalc_mace.load(files["torchscript"], name="custom", elements=["Fe"])
    as_float32 = matcalc_mace.load(files["torchscript"], name="custom32", dtype="float32")
    calc32 = MACECalculator(model_paths=str(files["pickle"]), device="cpu", default_dtype="float32")
    assert_matches_calculator(as_float32, calc32, _structures()[:3])

    other = files["dir"] / "linear.pt"
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(other))
    with pytest.raises(ValueError, match="not a MACE energy model"):
        matcalc_mace.load(other, name="linear")
    with pytest.raises(FileNotFoundError):
        matcalc_mace.load(files["dir"] / "absent.model", name="absent")


def test_import_keeps_torch_load_safe() -> None:
    """``import mace`` sets TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1; matcalc's import of it puts the variable back."""
    env = {k: v for k, v in os.environ.items() if k != "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"}
    code = ("import os; from matcalc.models.mace import _import_mace; _import_mace(); "
            "assert 'TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD' not in os.environ, 'variable left set'")
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=120)
