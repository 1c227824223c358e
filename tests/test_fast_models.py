"""Host-side fast paths of the model adapters, each against the package's own API: CHGNet graphs built
vectorised from arrays (matcalc.models.chgnet_graph) equal CHGNet's converter; D3 evaluates a whole request in
one torch-dftd call with the same numbers as one calculator call per structure."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ase.build import bulk
from ase.units import Bohr
from pymatgen.io.ase import AseAtomsAdaptor

from matcalc.models import get_model
from matcalc.models.chgnet_graph import crystal_graph, graph_arrays
from matcalc.structures import load_structure

FIELDS = ("atomic_number", "atom_frac_coord", "atom_graph", "neighbor_image", "directed2undirected",
          "undirected2directed", "bond_graph", "lattice")


@pytest.mark.parametrize("name", ["RSM0009", "Zn-MOF-74", "Si", "Cu-sheared"])
def test_graph_tensors_equal_chgnet_converter(chgnet, name: str) -> None:
    if name == "Si":
        atoms = bulk("Si")
    elif name == "Cu-sheared":
        atoms = bulk("Cu") * (2, 1, 1)  # a primitive (sheared) cell: many periodic images of each atom
    else:
        atoms = load_structure(name)
    atoms.rattle(0.05, seed=2)
    converter = chgnet.model.graph_converter
    ref = converter(AseAtomsAdaptor.get_structure(atoms))
    got = crystal_graph(atoms, converter)
    assert got is not None and ref.bond_graph.shape[0] > 0
    for field in FIELDS:
        a, b = getattr(got, field), getattr(ref, field)
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.detach(), b.detach()), field
    assert got.atom_frac_coord.requires_grad and got.lattice.requires_grad


def test_asymmetric_neighbor_list_is_left_to_chgnet() -> None:
    center, neighbor = np.array([0, 1, 0]), np.array([1, 0, 1])
    image = np.array([[0, 0, 0], [0, 0, 0], [1, 0, 0]])  # the last edge has no reverse
    assert graph_arrays(2, center, neighbor, image, np.array([1.0, 1.0, 2.0]), 3.0) is None
    ok = graph_arrays(2, center[:2], neighbor[:2], image[:2], np.array([1.0, 1.0]), 3.0)
    assert ok is not None and ok["undirected2directed"].tolist() == [0] and ok["directed2undirected"].tolist() == [0, 0]


def test_d3_batch_equals_one_call_per_structure() -> None:
    from ase import Atoms
    from torch_dftd.torch_dftd3_calculator import TorchDFTD3Calculator

    cells = [bulk("Si"), bulk("Cu")]
    for i, a in enumerate(cells):
        a.rattle(0.05, seed=i)
    molecule = Atoms("H2O", positions=[[0, 0, 0], [0.96, 0, 0], [-0.24, 0.93, 0]])  # non-periodic: no stress
    d3 = get_model("d3", "cpu")
    d3.reset_stats()
    got = d3.evaluate([*cells, molecule])
    assert d3.stats.calls == 1 and d3.stats.batch_sizes == [3]
    ref_calc = TorchDFTD3Calculator(xc="pbe", damping="bj", device="cpu", cutoff=40 * Bohr, cnthr=40 * Bohr)
    for a, g in zip([*cells, molecule], got, strict=True):
        ref = a.copy()
        ref.calc = ref_calc
        assert g.energy_eV == pytest.approx(ref.get_potential_energy(), abs=1e-10)
        np.testing.assert_allclose(g.forces_eV_per_A, ref.get_forces(), atol=1e-5)
        if a.pbc.all():
            np.testing.assert_allclose(g.stress_eV_per_A3, ref.get_stress(), atol=1e-7)
        else:
            assert g.stress_eV_per_A3 is None
