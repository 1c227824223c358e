"""CHGNet crystal graphs built straight from arrays, vectorised: the same graph as CHGNet's own converter.

``CrystalGraphConverter`` goes ``Atoms -> pymatgen Structure -> neighbour list -> Python Node/Edge objects ->
lists -> tensors``; the object graph and the line-graph loop are per-edge Python (~10 ms for a small MOF cell,
all of it holding the GIL). `crystal_graph` computes the same tensors with numpy over edge arrays, from the
same neighbour list (pymatgen's ``find_points_in_spheres``, on coordinates rounded exactly as a ``Structure``
rounds them), in the same order: directed edges in neighbour-list order, undirected edges in order of their
first directed edge, angles in CHGNet's order (bond by bond, each end in turn, the centre's edges grouped by
neighbour in order of first appearance). ``tests/test_models.py`` checks every tensor equal to CHGNet's.

When the neighbour list is not symmetric (an edge without its reverse, which CHGNet rejects), ``None`` is
returned and the caller uses CHGNet's converter, which raises its own error.
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np
from ase import Atoms


def structure_coords(positions: np.ndarray, lattice: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Fractional and Cartesian coordinates exactly as a pymatgen ``Structure`` made from ``Atoms`` holds them
    (one ``np.dot`` per site with the inverse lattice, then back: the same rounding as pymatgen)."""
    inv = np.linalg.inv(lattice)
    frac = np.array([np.dot(p, inv) for p in positions]).reshape(-1, 3)
    cart = np.array([np.dot(f, lattice) for f in frac]).reshape(-1, 3)
    return frac, cart


def neighbor_list(cart: np.ndarray, lattice: np.ndarray, cutoff: float) -> tuple[np.ndarray, ...]:
    """pymatgen's ``Structure.get_neighbor_list(cutoff, numerical_tol=1e-8)`` from its Cartesian coordinates."""
    from pymatgen.optimization.neighbors import find_points_in_spheres

    cart = np.ascontiguousarray(cart, dtype=float)
    center, neighbor, image, distance = find_points_in_spheres(
        cart, cart, r=cutoff, pbc=np.ones(3, dtype=np.int64), lattice=np.ascontiguousarray(lattice, dtype=float),
        tol=1e-8)
    keep = ~((center == neighbor) & (distance <= 1e-8))
    return center[keep], neighbor[keep], image[keep], distance[keep]


def graph_arrays(n_atoms: int, center: np.ndarray, neighbor: np.ndarray, image: np.ndarray,
                 distance: np.ndarray, bond_cutoff: float) -> dict[str, np.ndarray] | None:
    """Atom graph, undirected <-> directed maps and bond (angle) graph, as CHGNet's ``Graph`` builds them."""
    n_e = len(center)
    center = center.astype(np.int64)
    neighbor = neighbor.astype(np.int64)
    image = np.asarray(image, dtype=np.int64).reshape(n_e, 3)
    if n_e == 0:
        return None
    span = int(np.abs(image).max()) * 2 + 1
    off = span // 2

    def key(c: np.ndarray, n: np.ndarray, img: np.ndarray) -> np.ndarray:
        code = ((img[:, 0] + off) * span + (img[:, 1] + off)) * span + (img[:, 2] + off)
        return (c * n_atoms + n) * span**3 + code

    fwd = key(center, neighbor, image)
    rev = key(neighbor, center, -image)
    order = np.argsort(fwd, kind="stable")
    pos = np.searchsorted(fwd[order], rev)
    pos = np.minimum(pos, n_e - 1)
    partner = order[pos]
    if not np.array_equal(fwd[partner], rev) or len(np.unique(fwd)) != n_e:
        return None  # asymmetric or duplicated neighbour list: leave it to CHGNet
    creator = np.minimum(np.arange(n_e), partner)
    is_creator = creator == np.arange(n_e)
    und_of_creator = np.cumsum(is_creator) - 1
    directed2undirected = und_of_creator[creator]
    undirected2directed = np.flatnonzero(is_creator)
    # the centre's directed edges, grouped by neighbour in order of first appearance, then by index
    pair = center * n_atoms + neighbor
    first = np.full(n_atoms * n_atoms, n_e, dtype=np.int64)
    np.minimum.at(first, pair, np.arange(n_e))
    listed = np.lexsort((np.arange(n_e), first[pair], center))
    short = distance[listed] < bond_cutoff
    s_edges = listed[short]  # the edges that can form angles, in each centre's order
    s_center = center[s_edges]
    s_start = np.searchsorted(s_center, np.arange(n_atoms))
    s_count = np.bincount(s_center, minlength=n_atoms)
    # anchors: each undirected bond within the cutoff, its creator's end, then its partner's end
    und_ok = distance[undirected2directed] <= bond_cutoff
    bonds = np.flatnonzero(und_ok)
    d0 = undirected2directed[bonds]
    d1 = partner[d0]
    a_dir = np.stack([d0, d1], axis=1).reshape(-1)
    a_und = np.repeat(bonds, 2)
    a_center = center[a_dir]
    counts = s_count[a_center]
    total = int(counts.sum())
    rep = np.repeat(np.arange(len(a_dir)), counts)
    within = np.arange(total) - np.repeat(np.cumsum(counts) - counts, counts)
    other = s_edges[s_start[a_center][rep] + within]
    keep = other != a_dir[rep]
    rep, other = rep[keep], other[keep]
    bond_graph = np.stack([a_center[rep], a_und[rep], a_dir[rep], directed2undirected[other], other], axis=1)
    return {
        "atom_graph": np.stack([center, neighbor], axis=1),
        "directed2undirected": directed2undirected,
        "undirected2directed": undirected2directed,
        "bond_graph": bond_graph,
        "image": image,
    }


def crystal_graph(atoms: Atoms, converter: Any) -> Any | None:
    """CHGNet's ``CrystalGraph`` of ``atoms`` (3D periodic) for ``converter``'s cutoffs, or ``None`` (module doc)."""
    import torch
    from chgnet.graph.converter import TORCH_DTYPE
    from chgnet.graph.crystalgraph import CrystalGraph

    lattice = np.array(atoms.cell, dtype=float)
    frac, cart = structure_coords(atoms.positions, lattice)
    n_atoms = len(atoms)
    center, neighbor, image, distance = neighbor_list(cart, lattice, converter.atom_graph_cutoff)
    arrays = graph_arrays(n_atoms, center, neighbor, image, distance, converter.bond_graph_cutoff)
    if arrays is None:
        return None
    isolated = n_atoms - len(np.unique(center))
    if isolated:
        msg = (f"Structure graph_id=None has {isolated} isolated atom(s) with "
               f"atom_graph_cutoff={converter.atom_graph_cutoff}. CHGNet calculation will likely go wrong")
        if converter.on_isolated_atoms == "error":
            raise ValueError(msg)
        if converter.on_isolated_atoms == "warn":
            print(msg, file=sys.stderr)
    i32 = torch.int32
    return CrystalGraph(
        atomic_number=torch.tensor(atoms.numbers, dtype=i32),
        atom_frac_coord=torch.tensor(frac, dtype=TORCH_DTYPE, requires_grad=True),
        atom_graph=torch.tensor(arrays["atom_graph"], dtype=i32),
        neighbor_image=torch.tensor(arrays["image"], dtype=TORCH_DTYPE),
        directed2undirected=torch.tensor(arrays["directed2undirected"], dtype=i32),
        undirected2directed=torch.tensor(arrays["undirected2directed"], dtype=i32),
        bond_graph=torch.tensor(arrays["bond_graph"], dtype=i32),
        lattice=torch.tensor(lattice, dtype=TORCH_DTYPE, requires_grad=True),
        graph_id=None,
        mp_id=None,
        composition=atoms.get_chemical_formula(),
        atom_graph_cutoff=converter.atom_graph_cutoff,
        bond_graph_cutoff=converter.bond_graph_cutoff,
    )


__all__ = ["crystal_graph", "graph_arrays", "neighbor_list", "structure_coords"]
