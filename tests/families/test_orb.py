"""ORB adapter, tested on tiny orb models built from orb's own architecture code (no pretrained weights here).

Each test builds a seeded orb model with small widths, saves its ``state_dict`` (orb's checkpoint format) and
loads it through matcalc, which calls orb's own pretrained loader on the local file. The orb architecture
builders are patched to the tiny widths for the test, so that loader rebuilds the same tiny model. Results are
compared with orb's own ``ORBCalculator`` on the in-memory model (one structure at a time) and with ASE finite
differences. Tolerances: float32, the matcalc defaults (1e-5 eV/atom, 1e-4 eV/Å, 1e-5 eV/Å³); finite
differences run in float64 (``precision="float64"``) so that rounding does not swamp them.
"""

from __future__ import annotations

import os
import pickle
import socket
from functools import partial
from pathlib import Path

import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk, molecule

from tests.families.checks import assert_forces_are_gradient, assert_matches_calculator
from tests.families.conftest import require

require("orb_models")

import torch
from orb_models.forcefield import pretrained
from orb_models.forcefield.atomic_system import SystemConfig
from orb_models.forcefield.calculator import ORBCalculator

from matcalc.models import orb as orb_adapter
from matcalc.models.registry import (
    ModelUnavailableError,
    get_model,
    list_models,
    unload_model,
)

TINY_V3 = {"latent_dim": 16, "base_mlp_hidden_dim": 32, "head_mlp_hidden_dim": 16, "num_message_passing_steps": 2}
TINY_V2 = {"num_message_passing_steps": 1}
ARCH = {  # catalogue name -> (orb architecture builder, max neighbours orb documents for that model)
    "orb-v3-conservative-inf-omat": ("orb_v3_conservative_architecture", 120),
    "orb-v3-conservative-inf-mpa": ("orb_v3_conservative_architecture", 120),
    "orb-v3-conservative-20-omat": ("orb_v3_conservative_architecture", 20),
    "orb-v3-direct-inf-omat": ("orb_v3_direct_architecture", 120),
    "orb-v2": ("orb_v2_architecture", 20),
}


@pytest.fixture(autouse=True)
def tiny_architectures(monkeypatch: pytest.MonkeyPatch) -> None:
    """orb's pretrained loaders build their model through these module functions: make them tiny."""
    for fn, kwargs in (("orb_v3_conservative_architecture", TINY_V3), ("orb_v3_direct_architecture", TINY_V3),
                       ("orb_v2_architecture", TINY_V2)):
        monkeypatch.setattr(pretrained, fn, partial(getattr(pretrained, fn), **kwargs))


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


def tiny_model(name: str, seed: int = 0, energy_std_eV: float | None = None) -> torch.nn.Module:
    """A seeded tiny orb model of the architecture of catalogue entry ``name`` (eval mode, like orb's loader).

    ``energy_std_eV`` rescales the energy head (random init gives forces of only ~3 meV/Å).
    """
    builder, neighbours = ARCH[name]
    torch.manual_seed(seed)
    config = SystemConfig(radius=6.0, max_num_neighbors=neighbours)
    model = getattr(pretrained, builder)(device="cpu", system_config=config)
    if energy_std_eV is not None:
        with torch.no_grad():
            model.heads["energy"].normalizer.bn.running_var.fill_(energy_std_eV**2)
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def save(model: torch.nn.Module, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    return path


def structures() -> list[Atoms]:
    """Mixed sizes (2-27 atoms), elements and cell shapes, rattled; one molecule without periodicity."""
    si = bulk("Si", "diamond", 5.43, cubic=True)
    mgo = bulk("MgO", "rocksalt", 4.21)
    zno = bulk("ZnO", "wurtzite", a=3.25, c=5.2)
    cu = bulk("Cu", "fcc", 3.61) * (3, 3, 3)
    ethanol = molecule("CH3CH2OH")
    ethanol.set_cell([7.5, 8.0, 8.5])
    ethanol.pbc = True
    ethanol.center()
    co2 = molecule("CO2")
    co2.center(vacuum=4.0)
    out = [si, mgo, zno, cu, ethanol, co2]
    for i, a in enumerate(out):
        a.rattle(0.05, seed=i)
    return out


def catalogue_entry(name: str) -> orb_adapter.WeightsEntry:
    return next(e for e in orb_adapter.FAMILY.catalogue if e.name == name)


def test_catalogue_cards_name_the_missing_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               no_network: None) -> None:
    monkeypatch.setenv("MATCALC_MODELS_DIR", str(tmp_path))
    cards = {c.name: c for c in list_models(device="cpu")}
    assert {e.name for e in orb_adapter.FAMILY.catalogue} == set(ARCH)
    for entry in orb_adapter.FAMILY.catalogue:
        for name in (entry.name, entry.name + "+d3"):
            assert not cards[name].available
        assert str(tmp_path / entry.filename) in cards[entry.name].reason
        assert cards[entry.name].family == "orb" and cards[entry.name].batching
    with pytest.raises(ModelUnavailableError, match="orb-v3-conservative-inf-omat-20250404.ckpt"):
        get_model("orb-v3-conservative-inf-omat", device="cpu")
    with pytest.raises(FileNotFoundError):  # before orb (and its downloader) sees the name
        orb_adapter.load(tmp_path / "absent.ckpt", name="x", device="cpu", architecture="orb_v2")

    save(tiny_model("orb-v2"), tmp_path / catalogue_entry("orb-v2").filename)
    cards = {c.name: c for c in list_models(device="cpu")}
    assert cards["orb-v2"].available and cards["orb-v2"].reason == ""
    assert not cards["orb-v3-direct-inf-omat"].available


@pytest.mark.parametrize("name", list(ARCH))
def test_batched_catalogue_model_equals_orb_calculator(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      no_network: None) -> None:
    model = tiny_model(name)
    save(model, tmp_path / catalogue_entry(name).filename)
    monkeypatch.setenv("MATCALC_MODELS_DIR", str(tmp_path))
    unload_model(name)
    try:
        potential = get_model(name, device="cpu")
        assert isinstance(potential, orb_adapter.ORBPotential)
        assert potential.conservative == ("conservative" in name)
        assert potential.cutoff_A == 6.0 and potential.system_config.max_num_neighbors == ARCH[name][1]
        assert {"H", "C", "O", "Zn", "U"} <= potential.elements
        batch = structures()
        assert_matches_calculator(potential, ORBCalculator(model, device="cpu"), batch)
        assert potential.evaluate(batch)[-1].stress_eV_per_A3 is None  # the molecule without periodicity
    finally:
        unload_model(name)


def test_conservative_forces_and_stress_are_energy_gradients(tmp_path: Path, no_network: None) -> None:
    path = save(tiny_model("orb-v3-conservative-inf-omat", energy_std_eV=30.0), tmp_path / "tiny.ckpt")
    potential = orb_adapter.load(path, name="tiny", device="cpu", architecture="orb_v3_conservative_inf_omat",
                                 precision="float64")
    assert potential.dtype == "float64"
    zno = structures()[2]
    assert_forces_are_gradient(potential, zno)
    calc = potential.calculator()
    a = zno.copy()
    a.calc = calc
    stress = a.get_stress(voigt=True)
    numeric = calc.calculate_numerical_stress(a, d=1e-5, voigt=True)
    assert np.abs(stress).max() > 1e-3
    assert np.abs(stress - numeric).max() < 1e-5, np.abs(stress - numeric).max()
    assert torch.get_default_dtype() == torch.float32  # orb's loader sets it; the adapter restores it


def test_custom_upload_is_a_weights_only_state_dict(tmp_path: Path, no_network: None) -> None:
    model = tiny_model("orb-v3-direct-inf-omat", seed=3)
    path = save(model, tmp_path / "my-finetune.ckpt")
    state = torch.load(path, weights_only=True, map_location="cpu")
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    assert "weights_only" in orb_adapter.FAMILY.custom_formats

    potential = orb_adapter.load(path, name="my-orb", device="cpu", architecture="orb-v3-direct-inf-omat")
    assert_matches_calculator(potential, ORBCalculator(model, device="cpu"), structures()[:3])
    with pytest.raises(ValueError, match="architecture"):
        orb_adapter.load(path, name="my-orb", device="cpu")
    with pytest.raises(ValueError, match="unknown orb architecture"):
        orb_adapter.load(path, name="my-orb", device="cpu", architecture="orb_v1")


class _RunsCode:
    """Unpickling this calls ``os.mkdir(marker)``: a stand-in for code hidden in a checkpoint."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.mkdir, (str(self.marker),))


def test_a_checkpoint_that_would_run_code_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "code-ran"
    path = tmp_path / "evil.ckpt"
    torch.save({"model.x": _RunsCode(marker)}, path)
    with pytest.raises(pickle.UnpicklingError):
        orb_adapter.load(path, name="evil", device="cpu", architecture="orb_v2")
    assert not marker.exists()
