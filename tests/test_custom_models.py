"""User model files: inspection (unsafe, corrupt, oversized), validation in a separate process, registration.

The model under test is a Lennard-Jones potential written in TorchScript here; ASE's own LennardJones
calculator with the same parameters is the independent reference.
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import bulk
from ase.calculators.lj import LennardJones

from matcalc.models import Evaluation, Potential, UnknownModelError, get_model, model_names
from matcalc.models.custom import (
    ModelFileError,
    ModelValidationError,
    inspect_model_file,
    register_model_file,
    unregister_model_file,
)
from matcalc.models.validation import validate_model_file, validate_potential

EPS_EV, SIGMA_A, RC_A = 0.0104, 3.4, 6.0
LJ_OPTIONS = {"dtype": "float64", "elements": ["Ar"], "cutoff_A": RC_A}


class TorchLJ(torch.nn.Module):
    """Lennard-Jones (ASE's shifted form, no smoothing), minimum image: cells wider than 2 x rc."""

    def __init__(self, eps: float, sigma: float, rc: float, scale_x: float = 0.0) -> None:
        super().__init__()
        self.eps, self.sigma, self.rc, self.scale_x = eps, sigma, rc, scale_x

    def forward(self, pos: torch.Tensor, numbers: torch.Tensor, cell: torch.Tensor,
                pbc: torch.Tensor) -> torch.Tensor:
        d = pos.unsqueeze(0) - pos.unsqueeze(1)
        frac = d @ torch.linalg.inv(cell)
        frac = frac - torch.round(frac) * pbc.to(frac.dtype)
        d = frac @ cell
        mask = ~torch.eye(pos.shape[0], dtype=torch.bool)
        r = torch.sqrt(torch.where(mask, (d * d).sum(-1), torch.ones_like(d[..., 0])))
        sr6 = (self.sigma / r) ** 6
        e0 = 4 * self.eps * ((self.sigma / self.rc) ** 12 - (self.sigma / self.rc) ** 6)
        e = torch.where(mask & (r < self.rc), 4 * self.eps * (sr6 * sr6 - sr6) - e0, torch.zeros_like(r))
        return 0.5 * e.sum() + self.scale_x * pos[:, 0].sum()  # scale_x != 0 breaks rotation invariance


def argon(seed: int = 1) -> Atoms:
    atoms = bulk("Ar", "fcc", a=5.3, cubic=True).repeat(3)  # 108 atoms, 15.9 Å > 2 x rc
    atoms.rattle(0.05, seed=seed)
    return atoms


@pytest.fixture(scope="module")
def lj_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("models") / "lj.pt"
    torch.jit.script(TorchLJ(EPS_EV, SIGMA_A, RC_A)).save(str(path))
    return path


class Evil:
    """Unpickling this would run a shell command."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


# ----------------------------------------------------------------------------- inspection
def test_inspect_accepts_torchscript_and_weights(lj_file, tmp_path):
    info = inspect_model_file(lj_file, family="torchscript")
    assert info.format == "torchscript" and info.size_bytes == lj_file.stat().st_size and len(info.sha256) == 64
    weights = tmp_path / "state.pt"
    torch.save({"layer.weight": torch.randn(3, 3), "config": {"hidden": 8, "name": "x"}}, weights)
    assert inspect_model_file(weights).format == "weights_only"
    with pytest.raises(ModelFileError, match="does not accept 'weights_only'") as e:
        inspect_model_file(weights, family="torchscript")
    assert e.value.kind == "format"


def test_code_running_pickle_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"weights": torch.zeros(2), "payload": Evil(marker)}, path)
    with pytest.raises(ModelFileError, match="would run code") as e:
        inspect_model_file(path)
    assert e.value.kind == "unsafe" and "system" in str(e.value)
    assert not marker.exists()


@pytest.mark.parametrize("content, kind", [(b"", "empty"), (b"hello, not a model", "corrupt")])
def test_empty_and_garbage_files(tmp_path, content, kind):
    path = tmp_path / "m.pt"
    path.write_bytes(content)
    with pytest.raises(ModelFileError) as e:
        inspect_model_file(path)
    assert e.value.kind == kind


def test_truncated_and_oversized_files(lj_file, tmp_path):
    truncated = tmp_path / "cut.pt"
    truncated.write_bytes(lj_file.read_bytes()[: lj_file.stat().st_size // 2])
    with pytest.raises(ModelFileError) as e:
        inspect_model_file(truncated)
    assert e.value.kind in ("corrupt", "format")
    with pytest.raises(ModelFileError, match="exceeds the limit") as e:
        inspect_model_file(lj_file, max_bytes=1000)
    assert e.value.kind == "too_large"
    odd = tmp_path / "odd.zip"
    with zipfile.ZipFile(odd, "w") as zf:
        zf.writestr("readme.txt", "a zip, but no model")
    with pytest.raises(ModelFileError, match="neither TorchScript"):
        inspect_model_file(odd)
    with pytest.raises(ModelFileError) as e:
        inspect_model_file(tmp_path / "missing.pt")
    assert e.value.kind == "not_found"


# ----------------------------------------------------------------------------- registration
def test_registered_torchscript_model_equals_ase_lj(lj_file):
    card = register_model_file(lj_file, "torchscript", "test-lj", options=LJ_OPTIONS, overwrite=True)
    try:
        assert card.available and card.family == "torchscript" and card.dtype == "float64"
        assert "test-lj" in model_names() and "test-lj+d3" in model_names(include_d3=True)
        from matcalc.models.custom import custom_models

        report = next(m for m in custom_models() if m.name == "test-lj").validation
        assert report is not None and report["passed"]
        assert {c["name"] for c in report["checks"]} >= {"finite", "batch_energy", "rotation_forces",
                                                          "forces_are_gradient", "stress_is_strain_derivative"}
        import matcalc

        atoms = argon()
        result = matcalc.single_point(atoms, model="test-lj")
        ref = atoms.copy()
        ref.calc = LennardJones(epsilon=EPS_EV, sigma=SIGMA_A, rc=RC_A, smooth=False)
        assert result.energy_eV == pytest.approx(ref.get_potential_energy(), abs=1e-10)
        ev = get_model("test-lj", device="cpu").evaluate([atoms])[0]
        assert np.abs(ev.forces_eV_per_A - ref.get_forces()).max() < 1e-10
        assert np.abs(ev.stress_eV_per_A3 - ref.get_stress()).max() < 1e-12
    finally:
        assert unregister_model_file("test-lj")
    with pytest.raises(UnknownModelError):
        get_model("test-lj")


def test_register_refuses_builtin_names_and_unknown_families(lj_file):
    for taken in ("chgnet", "d3"):  # d3 is the dispersion part of every "+d3" model
        with pytest.raises(ValueError, match="built-in"):
            register_model_file(lj_file, "torchscript", taken, options=LJ_OPTIONS, validate=False)
    with pytest.raises(UnknownModelError, match="unknown model family"):
        register_model_file(lj_file, "no-such-family", "x", validate=False)


def test_model_that_fails_validation_is_not_registered(tmp_path):
    path = tmp_path / "tilted.pt"
    torch.jit.script(TorchLJ(EPS_EV, SIGMA_A, RC_A, scale_x=0.05)).save(str(path))
    with pytest.raises(ModelValidationError, match="rotation") as e:
        register_model_file(path, "torchscript", "tilted-lj", options=LJ_OPTIONS)
    failed = {c.name for c in e.value.report.checks if not c.passed}
    assert "rotation_energy" in failed and "forces_are_gradient" not in failed  # autograd forces stay exact
    assert "tilted-lj" not in model_names()


def test_validation_worker_that_fails_to_load_or_hangs(lj_file):
    bad = validate_model_file(lj_file, "torchscript", options={**LJ_OPTIONS, "bogus": 1})
    assert not bad.passed and "failed to load" in bad.error and "bogus" in bad.error
    # a worker that does not finish in time is killed (0.5 s: it cannot even import torch by then)
    slow = validate_model_file(lj_file, "torchscript", options=LJ_OPTIONS, timeout_s=0.5)
    assert not slow.passed and "timed out" in slow.error


# ----------------------------------------------------------------------------- the checks can fail
class _Broken(Potential):
    """EMT with a deliberate defect, to show each check catches what it should."""

    supports_batching = True

    def __init__(self, defect: str) -> None:
        super().__init__(f"broken-{defect}", dtype="float64", elements=frozenset({"Cu"}))
        from ase.calculators.emt import EMT

        self.defect = defect
        self.emt = EMT()

    def _evaluate_batch(self, atoms_list: Sequence[Atoms]) -> list[Evaluation]:
        out = []
        for a in atoms_list:
            b = a.copy()
            b.calc = self.emt
            e, f, s = b.get_potential_energy(), b.get_forces(), b.get_stress()
            if self.defect == "force_sign":
                f = -f
            elif self.defect == "stress_gpa":
                s = s * 160.21766208
            elif self.defect == "batch":
                e = e + 0.01 * len(atoms_list)
            elif self.defect == "nan":
                f = f * np.nan
            out.append(Evaluation(e, f, s))
        return out


@pytest.mark.parametrize("defect, failing", [
    ("none", set()),
    ("force_sign", {"forces_are_gradient"}),
    ("stress_gpa", {"stress_is_strain_derivative"}),
    ("batch", {"batch_energy"}),
    ("nan", {"finite"}),
])
def test_each_check_catches_its_defect(defect, failing):
    report = validate_potential(_Broken(defect))
    assert report.structures == ["Cu4", "Cu8"]
    assert {c.name for c in report.checks if not c.passed} == failing
    assert report.passed is (not failing)


def test_family_allowlist_admits_numpy_arrays_only(tmp_path):
    """SevenNet's released checkpoints hold numpy arrays in their config: allowed for that family (data types
    only), refused for a family without the allowlist; a pickled function stays refused for both."""
    pytest.importorskip("sevenn")
    ckpt = tmp_path / "checkpoint.pth"
    torch.save({"config": {"shift": np.arange(3.0), "cutoff": np.float32(5.0)},
                "model_state_dict": {"w": torch.ones(2)}}, ckpt)
    assert inspect_model_file(ckpt, family="sevennet").format == "weights_only"
    with pytest.raises(ModelFileError) as e:
        inspect_model_file(ckpt)
    assert e.value.kind == "unsafe"
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pth"
    torch.save({"config": {"shift": np.arange(3.0)}, "hook": Evil(marker)}, evil)
    with pytest.raises(ModelFileError) as e:
        inspect_model_file(evil, family="sevennet")
    assert e.value.kind == "unsafe" and not marker.exists()
