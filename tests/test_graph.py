"""Radius graphs and triplets against ASE's neighbour list, brute force and fairchem's fixture."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import add_adsorbate, fcc111
from ase.calculators.singlepoint import SinglePointCalculator
from ase.constraints import FixAtoms
from ase.neighborlist import neighbor_list
from conftest import DATA, bad_structure
from torch_geometric.data import Batch

from graphpar.data.graph import (
    TRIPLET_FIELDS,
    StructureError,
    atoms_to_sample,
    attach_triplets,
    dimenet_triplets,
    gemnet_triplets,
    radius_graph,
    radius_graph_batch,
    symmetric_graph,
    triplet_counts,
    triplet_fields,
)

FIXTURE = DATA / "fairchem-gemnet-dt" / "graph.npz"


def random_structure(seed: int, cell, pbc, num_atoms: int) -> Atoms:
    rng = np.random.default_rng(seed)
    atoms = Atoms("Cu" * num_atoms, cell=cell, pbc=pbc)
    atoms.set_scaled_positions(rng.random((num_atoms, 3)))
    return atoms


STRUCTURES = {
    "cubic": random_structure(0, np.eye(3) * 9.0, True, 20),
    "small cell": random_structure(1, np.eye(3) * 2.7, True, 2),
    "one atom": random_structure(2, np.eye(3) * 2.5, True, 1),
    "triclinic": random_structure(3, [[6.1, 0, 0], [4.5, 3.0, 0], [1.5, -2.0, 2.5]], True, 6),
    "thin skewed": random_structure(4, [[3.05, 0, 0], [2.9, 0.8, 0], [0.3, 0.2, 12.0]], True, 5),
    "mixed pbc": random_structure(5, [[7.0, 0, 0], [2.0, 6.0, 0], [0, 0, 15.0]], [1, 1, 0], 12),
}


def boundary_structure() -> Atoms:
    """Atoms exactly on the cell faces and corners (scaled 0 and 1), none coincident."""
    cell = [[5.0, 0, 0], [1.0, 4.0, 0], [0, 0, 5.5]]
    scaled = [[0, 0, 0], [1.0, 0.3, 0.7], [0.5, 1.0, 0.5], [0.25, 0.5, 1.0], [0, 0.6, 0]]
    return Atoms("Cu5", scaled_positions=scaled, cell=cell, pbc=True)


def slab(pbc) -> Atoms:
    atoms = fcc111("Pt", (2, 2, 3), vacuum=6.0)
    add_adsorbate(atoms, "O", 1.5, "fcc")
    atoms.rattle(0.05, seed=7)
    atoms.pbc = pbc
    return atoms


def graph_of(atoms: Atoms, cutoff: float, max_neighbors=None):
    return radius_graph(
        torch.tensor(atoms.positions),
        torch.tensor(np.array(atoms.cell)),
        atoms.pbc,
        cutoff,
        max_neighbors=max_neighbors,
    )


def edge_set(edge_index, cell_offsets) -> set:
    return set(zip(*edge_index.tolist(), map(tuple, cell_offsets.tolist()), strict=True))


def distances(atoms: Atoms, edge_index, cell_offsets) -> np.ndarray:
    pos, cell = atoms.positions, np.array(atoms.cell)
    source, target = edge_index.numpy()
    vec = pos[target] - (pos[source] + cell_offsets.numpy() @ cell)
    return np.linalg.norm(vec, axis=1)


@pytest.mark.parametrize(
    "atoms",
    [*STRUCTURES.values(), boundary_structure(), slab([1, 1, 0]), slab([1, 1, 1])],
    ids=[*STRUCTURES, "boundary", "slab TTF", "slab TTT"],
)
def test_graph_equals_ase(atoms):
    cutoff = 6.0
    # ASE: i is the centre (our target), j the neighbour (our source), S the shift of j.
    i, j, shift, dist = neighbor_list("ijSd", atoms, cutoff)
    expected = {
        (int(a), int(b), tuple(s)): d for a, b, s, d in zip(j, i, shift.tolist(), dist, strict=True)
    }
    edge_index, cell_offsets = graph_of(atoms, cutoff)
    assert edge_set(edge_index, cell_offsets) == set(expected)
    ours = distances(atoms, edge_index, cell_offsets)
    keys = zip(*edge_index.tolist(), map(tuple, cell_offsets.tolist()), strict=True)
    np.testing.assert_allclose(ours, [expected[k] for k in keys], atol=1e-9)
    assert (ours > 0).all() and (ours <= cutoff).all()
    # No images along non-periodic directions.
    assert (cell_offsets[:, ~torch.tensor(atoms.pbc)] == 0).all()
    # Sorted by target, then distance.
    target = edge_index[1].numpy()
    assert (np.diff(target) >= 0).all()
    same = np.diff(target) == 0
    assert (np.diff(ours)[same] >= -1e-12).all()


@pytest.mark.parametrize("max_neighbors", [1, 4, 12])
def test_max_neighbors_keeps_nearest_and_tied_shell(max_neighbors):
    atoms = STRUCTURES["cubic"]
    full_index, full_offsets = graph_of(atoms, 6.0)
    full_dist = distances(atoms, full_index, full_offsets)
    edge_index, cell_offsets = graph_of(atoms, 6.0, max_neighbors=max_neighbors)
    kept = edge_set(edge_index, cell_offsets)
    for centre in range(len(atoms)):
        mine = full_index[1].numpy() == centre
        d = np.sort(full_dist[mine])
        limit = d[max_neighbors - 1] + 0.01 if len(d) > max_neighbors else np.inf
        edges = zip(
            *full_index[:, mine].tolist(), map(tuple, full_offsets[mine].tolist()), strict=True
        )
        expected = {e for e, dist in zip(edges, full_dist[mine], strict=True) if dist <= limit}
        assert {e for e in kept if e[1] == centre} == expected


def test_max_neighbors_keeps_exact_shells():
    """Ideal fcc: 12 nearest neighbours at one distance; a cap of 8 keeps all 12."""
    atoms = fcc111("Cu", (3, 3, 4), vacuum=6.0)
    edge_index, _ = graph_of(atoms, 6.0, max_neighbors=8)
    degree = np.bincount(edge_index[1].numpy())
    assert set(degree.tolist()) == {9, 12}  # surface atoms have 9 nearest neighbours


def rotation(seed: int) -> np.ndarray:
    q, r = np.linalg.qr(np.random.default_rng(seed).normal(size=(3, 3)))
    return q * np.sign(np.diag(r))


@pytest.mark.parametrize("max_neighbors", [50, 8])
def test_invariant_under_rotation_and_permutation(max_neighbors):
    atoms = fcc111("Cu", (4, 4, 4), vacuum=7.0)
    atoms.pbc = True
    reference = edge_set(*graph_of(atoms, 6.0, max_neighbors))

    rotated = atoms.copy()
    rot = rotation(0)
    rotated.set_cell(np.array(atoms.cell) @ rot.T, scale_atoms=False)
    rotated.positions = atoms.positions @ rot.T
    assert edge_set(*graph_of(rotated, 6.0, max_neighbors)) == reference

    perm = np.random.default_rng(1).permutation(len(atoms))
    permuted = atoms[perm]
    edge_index, cell_offsets = graph_of(permuted, 6.0, max_neighbors)
    relabelled = torch.as_tensor(perm)[edge_index]  # back to the original atom ids
    assert edge_set(relabelled, cell_offsets) == reference


def batch_of(structures):
    pos = torch.tensor(np.concatenate([a.positions for a in structures]))
    cell = torch.tensor(np.stack([np.array(a.cell) for a in structures]))
    pbc = torch.tensor(np.stack([a.pbc for a in structures]))
    natoms = torch.tensor([len(a) for a in structures])
    return pos, cell, pbc, natoms


@pytest.mark.parametrize("max_neighbors", [None, 6])
def test_batch_equals_per_structure(max_neighbors):
    structures = [*STRUCTURES.values(), slab([1, 1, 0]), boundary_structure()]
    edge_index, cell_offsets, num_edges = radius_graph_batch(
        *batch_of(structures), 6.0, max_neighbors=max_neighbors
    )
    parts, first = [], 0
    for atoms in structures:
        index, offsets = graph_of(atoms, 6.0, max_neighbors)
        parts.append((index + first, offsets))
        first += len(atoms)
    assert num_edges.tolist() == [p[0].shape[1] for p in parts]
    assert torch.equal(edge_index, torch.cat([p[0] for p in parts], 1))
    assert torch.equal(cell_offsets, torch.cat([p[1] for p in parts]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("max_neighbors", [None, 6, 50])
def test_numpy_path_on_cpu_equals_the_torch_path_of_other_devices(dtype, max_neighbors):
    """On the CPU `radius_graph_batch` runs in numpy (graph module, `_NUMPY_ON_CPU`); on a GPU
    the torch code does: the same edges, order and offsets, bit for bit, alone and batched."""
    import graphpar.data.graph as graph

    structures = [*STRUCTURES.values(), slab([1, 1, 0]), slab(True), boundary_structure()]
    structures += [random_structure(10 + k, np.eye(3) * 7 + k * 0.3, True, 30) for k in range(4)]
    cases = [[atoms] for atoms in structures] + [structures]
    for case in cases:
        pos, cell, pbc, natoms = batch_of(case)
        found = []
        for numpy_path in (True, False):
            previous, graph._NUMPY_ON_CPU = graph._NUMPY_ON_CPU, numpy_path
            try:
                found.append(
                    radius_graph_batch(
                        pos.to(dtype), cell.to(dtype), pbc, natoms, 6.0, max_neighbors
                    )
                )
            finally:
                graph._NUMPY_ON_CPU = previous
        for numpy_result, torch_result in zip(*found, strict=True):
            assert numpy_result.dtype == torch_result.dtype
            assert torch.equal(numpy_result, torch_result)


def brute_dimenet(edge_index, cell_offsets):
    edges = list(zip(*edge_index.tolist(), map(tuple, cell_offsets.tolist()), strict=True))
    triplets = []
    for ji, (j, i, off_ji) in enumerate(edges):
        for kj, (k, j2, off_kj) in enumerate(edges):
            reverse = k == i and off_kj == tuple(-np.array(off_ji))
            if j2 == j and not reverse:
                triplets.append((kj, ji))
    return sorted(triplets, key=lambda t: (t[1], t[0]))


def brute_gemnet(edge_index_sym):
    target = edge_index_sym[1].tolist()
    return [
        (ba, ca)
        for ca in range(len(target))
        for ba in range(len(target))
        if ba != ca and target[ba] == target[ca]
    ]


@pytest.mark.parametrize("name", ["one atom", "small cell", "triclinic", "mixed pbc"])
# max_neighbors=1 leaves most edges one-sided (without a reverse), the hardest case.
@pytest.mark.parametrize("max_neighbors", [None, 5, 1])
def test_triplets_equal_brute_force(name, max_neighbors):
    atoms = STRUCTURES[name]
    cutoff = 4.0
    edge_index, cell_offsets = graph_of(atoms, cutoff, max_neighbors)
    idx_kj, idx_ji = dimenet_triplets(edge_index, cell_offsets, len(atoms))
    assert list(zip(idx_kj.tolist(), idx_ji.tolist(), strict=True)) == brute_dimenet(
        edge_index, cell_offsets
    )
    edge_index_sym, offsets_sym, _ = symmetric_graph(edge_index, cell_offsets)
    id3_ba, id3_ca = gemnet_triplets(edge_index_sym, len(atoms))
    assert list(zip(id3_ba.tolist(), id3_ca.tolist(), strict=True)) == brute_gemnet(edge_index_sym)
    dimenet, gemnet = triplet_counts(
        edge_index, cell_offsets, len(atoms), torch.tensor([edge_index.shape[1]])
    )
    assert dimenet.tolist() == [idx_kj.numel()] and gemnet.tolist() == [id3_ba.numel()]


def test_one_atom_cell_keeps_other_images_of_i():
    """1 atom, cell 2.5 A < cutoff: every edge is a periodic self-image; DimeNet++ keeps
    k = i from another image and drops only the exact reverse."""
    atoms = STRUCTURES["one atom"]
    edge_index, cell_offsets = graph_of(atoms, 4.0)
    assert (edge_index == 0).all() and edge_index.shape[1] == 18  # shells of 6 and 12
    idx_kj, idx_ji = dimenet_triplets(edge_index, cell_offsets, 1)
    assert idx_kj.numel() == 18 * 17


def test_symmetric_graph_matches_fairchem_fixture():
    graph = np.load(FIXTURE)
    edge_index = torch.as_tensor(graph["batch_edge_index"])
    cell_offsets = torch.as_tensor(graph["batch_cell_offsets"])
    edge_index_sym, offsets_sym, id_swap = symmetric_graph(edge_index, cell_offsets)
    expected = edge_set(
        torch.as_tensor(graph["batch_sym_edge_index"]),
        torch.as_tensor(graph["batch_sym_cell_offsets"]),
    )
    assert edge_index_sym.shape[1] == len(expected)
    assert edge_set(edge_index_sym, offsets_sym) == expected

    # id_swap is an involution that pairs each edge with its reverse.
    assert torch.equal(id_swap[id_swap], torch.arange(id_swap.numel()))
    assert torch.equal(edge_index_sym[:, id_swap], edge_index_sym.flip(0))
    assert torch.equal(offsets_sym[id_swap], -offsets_sym)

    # Same triplets as fairchem, compared as pairs of geometric edges.
    def named(ids, index, offsets):
        edges = list(zip(*index.tolist(), map(tuple, offsets.tolist()), strict=True))
        return [edges[e] for e in ids.tolist()]

    id3_ba, id3_ca = gemnet_triplets(edge_index_sym, int(graph["batch_natoms"].sum()))
    ours = set(
        zip(
            named(id3_ba, edge_index_sym, offsets_sym),
            named(id3_ca, edge_index_sym, offsets_sym),
            strict=True,
        )
    )
    sym_index = torch.as_tensor(graph["batch_sym_edge_index"])
    sym_offsets = torch.as_tensor(graph["batch_sym_cell_offsets"])
    theirs = set(
        zip(
            named(torch.as_tensor(graph["batch_id3_ba"]), sym_index, sym_offsets),
            named(torch.as_tensor(graph["batch_id3_ca"]), sym_index, sym_offsets),
            strict=True,
        )
    )
    assert len(ours) == id3_ba.numel() == graph["batch_id3_ba"].size and ours == theirs


def test_sample_batching_offsets_indices():
    structures = [slab([1, 1, 1]), STRUCTURES["triclinic"], STRUCTURES["small cell"]]
    samples = [atoms_to_sample(a, cutoff=5.0, max_neighbors=20) for a in structures]
    batch = Batch.from_data_list(samples)
    edge_start = np.cumsum([0] + [s.edge_index.shape[1] for s in samples])
    sym_start = np.cumsum([0] + [s.edge_index_sym.shape[1] for s in samples])
    atom_start = np.cumsum([0] + [len(a) for a in structures])
    assert batch.cell.shape == (3, 3, 3) and batch.natoms.tolist() == [len(a) for a in structures]
    for b, sample in enumerate(samples):
        # A triplet of the batch names the same geometric edges as in its structure.
        t = slice(
            int(np.sum([s.idx_kj.numel() for s in samples[:b]])),
            int(np.sum([s.idx_kj.numel() for s in samples[: b + 1]])),
        )
        for name in ("idx_kj", "idx_ji"):
            ids = batch[name][t]
            assert torch.equal(
                batch.edge_index[:, ids] - atom_start[b], sample.edge_index[:, sample[name]]
            )
            assert torch.equal(batch.cell_offsets[ids], sample.cell_offsets[sample[name]])
        t = slice(
            int(np.sum([s.id3_ba.numel() for s in samples[:b]])),
            int(np.sum([s.id3_ba.numel() for s in samples[: b + 1]])),
        )
        for name in ("id3_ba", "id3_ca"):
            ids = batch[name][t]
            expected = sample.edge_index_sym[:, sample[name]]
            assert torch.equal(batch.edge_index_sym[:, ids] - atom_start[b], expected)
        e = slice(int(sym_start[b]), int(sym_start[b + 1]))
        assert torch.equal(batch.id_swap[e] - int(sym_start[b]), sample.id_swap)
        assert int(edge_start[b + 1] - edge_start[b]) == sample.edge_index.shape[1]


def test_triplets_built_for_a_batch_equal_the_samples_batched():
    """A model builds the triplets of a batch that lacks them (`triplet_fields`); they equal the
    triplets attached to each sample (preprocessing, the loader) and offset by batching."""
    structures = [slab([1, 1, 1]), STRUCTURES["triclinic"], STRUCTURES["small cell"]]
    bare = [atoms_to_sample(a, cutoff=5.0, max_neighbors=20, triplets=False) for a in structures]
    attached = Batch.from_data_list([attach_triplets(s.clone()) for s in bare])
    batch = Batch.from_data_list(bare)
    for family, keys in TRIPLET_FIELDS.items():
        assert all(key not in batch for key in keys)
        built = triplet_fields(batch, family)
        assert all(key not in batch for key in keys)  # the batch is left as it is
        carried = triplet_fields(attached, family)
        for key, ours, expected in zip(keys, built, carried, strict=True):
            assert ours is not expected and torch.equal(ours, expected), (family, key)
            assert carried[keys.index(key)] is attached[key]  # carried fields, not rebuilt
    with pytest.raises(ValueError, match="unknown triplet family"):
        triplet_fields(batch, "schnet")


def test_atoms_to_sample_fields():
    atoms = slab([1, 1, 1])
    atoms.set_tags([0] * 4 + [1] * 8 + [2])
    atoms.set_constraint(FixAtoms(indices=range(4)))
    forces = np.random.default_rng(0).normal(size=(len(atoms), 3))
    atoms.calc = SinglePointCalculator(atoms, energy=-1.5, forces=forces)
    sample = atoms_to_sample(atoms)
    assert sample.pos.dtype == torch.float32 and sample.cell.shape == (1, 3, 3)
    assert sample.pbc.dtype == torch.bool and sample.pbc.shape == (1, 3)
    assert int(sample.natoms) == len(atoms) and sample.atomic_numbers.dtype == torch.int64
    assert sample.tags.tolist() == atoms.get_tags().tolist()
    assert sample.fixed.tolist() == [True] * 4 + [False] * 9
    assert sample.energy.dtype == torch.float64 and float(sample.energy) == -1.5
    # Forces as stored, not zeroed on the fixed atoms.
    np.testing.assert_allclose(sample.forces.numpy(), forces, rtol=1e-6)
    for name in ("idx_kj", "idx_ji", "id3_ba", "id3_ca", "id_swap", "edge_index_sym"):
        assert sample[name].dtype == torch.int64
    assert "energy" not in atoms_to_sample(slab([1, 1, 1]), triplets=False)


@pytest.mark.parametrize(
    ("problem", "message"),
    [
        ("no atoms", "no atoms"),
        ("atomic number 0", "atom 1 has atomic number 0, not in 1..118"),
        ("atomic number 119", "atom 1 has atomic number 119, not in 1..118"),
        ("negative atomic number", "atom 1 has atomic number -1, not in 1..118"),
        ("NaN position", r"Cu2: atom 1 has position \[nan, 1\.3, 0\.3\], not finite"),
        ("position beyond float32", r"Cu2: atom 1 has position \[1\.3, 1\.3, 1e\+39\], not finite"),
        ("infinite cell", r"Cu2: cell .*inf.* is not finite in float32"),
        ("singular cell", r"Cu2: cell .* is singular along its periodic directions"),
        ("zero periodic vector", r"Cu2: cell .* is singular .*\[True, True, True\]"),
    ],
)
def test_structure_without_a_graph_is_a_clear_error(problem, message):
    """Refused before any tensor is built (before: stored, an IndexError in a model, torch's
    `linalg.inv` or `upper bound and lower bound inconsistent`)."""
    with pytest.raises(StructureError, match=message):
        atoms_to_sample(bad_structure(problem))


def test_non_periodic_directions_may_have_no_cell_vector():
    """A molecule without a cell and a slab stored with a zero c vector are fine."""
    molecule = Atoms("CO", positions=[[0, 0, 0], [0, 0, 1.13]])
    assert atoms_to_sample(molecule, triplets=False).edge_index.shape[1] == 2
    flat = slab([1, 1, 0])
    flat.cell[2] = 0.0
    assert atoms_to_sample(flat, triplets=False).edge_index.shape[1] > 0


def test_fairchem_convention_keeps_exactly_max_neighbors():
    """Convention "fairchem" on an fcc lattice (whole shells tied): at most k sources per target
    (k - 1 where pymatgen would list the atom as its own neighbour), where "graphpar" keeps the
    tied shell; without a cap both are the same edge set; a batch is its structures' graphs
    concatenated; an unknown convention is an error."""
    from ase.build import bulk

    crystal = bulk("Cu", "fcc", a=3.61, cubic=True).repeat((2, 2, 2))
    crystal.positions += 0.3  # some atoms outside the cell: fairchem wraps them
    other = STRUCTURES["triclinic"]
    pos = torch.tensor(crystal.positions)
    cell = torch.tensor(crystal.cell[:])
    strict, strict_offsets = radius_graph(pos, cell, [True] * 3, 6.0, 20, convention="fairchem")
    shell, _ = radius_graph(pos, cell, [True] * 3, 6.0, 20)
    degree = torch.bincount(strict[1])
    assert int(degree.max()) == 20 and int(degree.min()) >= 19
    assert int(torch.bincount(shell[1]).min()) > 20
    vec = pos[strict[1]] - pos[strict[0]] - strict_offsets.double() @ cell
    assert float(vec.norm(dim=1).max()) <= 6.0

    def edges(edge_index, offsets):
        return set(zip(*edge_index.tolist(), map(tuple, offsets.tolist()), strict=True))

    uncapped = [
        radius_graph(pos, cell, [True] * 3, 6.0, None, convention=c)
        for c in ("graphpar", "fairchem")
    ]
    assert edges(*uncapped[0]) == edges(*uncapped[1])

    both = [crystal, other]
    batched, batched_offsets, counts = radius_graph_batch(
        torch.tensor(np.concatenate([a.positions for a in both])),
        torch.tensor(np.stack([a.cell[:] for a in both])),
        torch.tensor(np.array([a.pbc for a in both])),
        torch.tensor([len(a) for a in both]),
        6.0,
        20,
        convention="fairchem",
    )
    second, second_offsets = radius_graph(
        torch.tensor(other.positions),
        torch.tensor(other.cell[:]),
        other.pbc,
        6.0,
        20,
        convention="fairchem",
    )
    expected = torch.cat([strict, second + len(crystal)], dim=1)
    assert torch.equal(batched, expected) and counts.tolist() == [strict.size(1), second.size(1)]
    assert torch.equal(batched_offsets, torch.cat([strict_offsets, second_offsets]))
    with pytest.raises(ValueError, match="unknown graph convention 'ocp'"):
        radius_graph(pos, cell, [True] * 3, 6.0, 20, convention="ocp")
