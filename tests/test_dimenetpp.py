"""DimeNet++ against PyG's implementation, finite differences and parameter counts (symmetries:
tests/test_models_symmetry.py; graph parallelism: tests/test_models_parallel.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import add_adsorbate, fcc111, molecule
from conftest import float64_batch as batch_of
from torch_geometric.nn.models import DimeNetPlusPlus as PygDimeNetPlusPlus

from graphpar.models import build_model, count_parameters
from graphpar.models.basis import SphericalBasisLayer, spherical_bessel_roots
from graphpar.models.dimenetpp import DimeNetPlusPlus

TINY = dict(hidden_channels=16, out_emb_channels=16, int_emb_size=8, basis_emb_size=4)


def tiny_model(cutoff=6.0, seed=0):
    torch.manual_seed(seed)
    # A non-zero last layer, so the energy depends on every parameter.
    model = DimeNetPlusPlus(
        **TINY, num_blocks=2, cutoff=cutoff, output_initializer="glorot_orthogonal"
    )
    return model.double().eval()


def slab(seed=0):
    atoms = fcc111("Cu", size=(2, 2, 2), vacuum=5.0)
    add_adsorbate(atoms, "O", 1.5, "fcc")
    atoms.rattle(0.05, seed=seed)
    return atoms


@pytest.fixture(scope="module")
def pyg_model():
    """PyG's DimeNet++ (tiny sizes, float64); building its sympy basis takes ~15 s."""
    torch.manual_seed(1)
    model = PygDimeNetPlusPlus(
        hidden_channels=16,
        out_channels=1,
        num_blocks=2,
        int_emb_size=8,
        basis_emb_size=4,
        out_emb_channels=16,
        num_spherical=7,
        num_radial=6,
        cutoff=6.0,
        output_initializer="glorot_orthogonal",
    )
    return model.double()


def test_spherical_basis_matches_pyg(pyg_model):
    """Same functions as PyG's sympy-generated basis. PyG builds its constants from float32
    roots turned into 24-bit sympy Floats, so it is float32-accurate: compare to 1e-6 relative."""
    torch.manual_seed(0)
    ours = SphericalBasisLayer(7, 6, 6.0, 5).double()
    theirs = pyg_model.sbf
    dist = torch.rand(50, dtype=torch.float64) * 5.9 + 0.1
    angle = torch.rand(80, dtype=torch.float64) * math.pi
    idx = torch.randint(0, 50, (80,))
    a, b = ours(dist, angle.cos(), idx), theirs(dist, angle, idx)
    assert float((a - b).abs().max() / b.abs().max()) < 1e-6
    roots = spherical_bessel_roots(7, 6)
    for order in range(7):  # interlacing of consecutive orders' roots
        assert np.all(roots[order, :-1] < roots[min(order + 1, 6), :-1] + 1e-12)


def pyg_energy(pyg, batch, pos, sbf_fn):
    """PyG's DimeNet++ forward with our graph (its own radius_graph/triplets need pyg-lib)."""
    j, i = batch.edge_index
    idx_kj, idx_ji = batch.idx_kj, batch.idx_ji
    idx_i, idx_j, idx_k = i[idx_ji], j[idx_ji], j[idx_kj]
    dist = (pos[i] - pos[j]).pow(2).sum(dim=-1).sqrt()
    pos_jk, pos_ij = pos[idx_j] - pos[idx_k], pos[idx_i] - pos[idx_j]
    a = (pos_ij * pos_jk).sum(dim=-1)
    b = torch.cross(pos_ij, pos_jk, dim=1).norm(dim=-1)
    angle = torch.atan2(b, a)
    rbf = pyg.rbf(dist)
    sbf = sbf_fn(dist, angle, idx_kj)
    x = pyg.emb(batch.atomic_numbers, rbf, i, j)
    P = pyg.output_blocks[0](x, rbf, i, num_nodes=pos.size(0))
    for interaction, output in zip(pyg.interaction_blocks, pyg.output_blocks[1:], strict=True):
        x = interaction(x, rbf, sbf, idx_kj, idx_ji)
        P = P + output(x, rbf, i, num_nodes=pos.size(0))
    return P.sum(dim=0)


def test_matches_pyg_dimenetpp(pyg_model):
    atoms = molecule("CH3CH2OH")
    atoms.center(vacuum=8.0)
    atoms.pbc = False
    batch = batch_of([atoms])
    pyg = pyg_model
    ours = DimeNetPlusPlus(**TINY, num_blocks=2, cutoff=6.0).double()
    ours.load_state_dict(pyg.state_dict())
    out = ours(batch)

    pos = batch.pos.clone().requires_grad_(True)
    for sbf_fn, tol in (
        (lambda d, ang, idx: ours.sbf(d, ang.cos(), idx), 1e-10),  # same basis: the blocks agree
        (pyg.sbf, 1e-6),  # PyG's own, float32-accurate basis
    ):
        energy = pyg_energy(pyg, batch, pos, sbf_fn)
        (grad,) = torch.autograd.grad(energy.sum(), pos)
        assert (
            float((out["energy"] - energy).detach().abs().max() / energy.detach().abs().max()) < tol
        )
        assert float((out["forces"] + grad).detach().abs().max() / grad.detach().abs().max()) < tol


def test_forces_are_finite_differences_on_periodic_slab():
    atoms = slab()
    batch = batch_of([atoms], cutoff=4.0)
    assert bool(batch.cell_offsets.abs().sum(1).gt(0).any())
    model = tiny_model(cutoff=4.0)
    forces = model(batch)["forces"]
    h = 1e-5
    for atom in (0, 3, len(atoms) - 1):
        for axis in range(3):
            energies = []
            for sign in (1, -1):
                shifted = batch.clone()
                shifted.pos = batch.pos.clone()
                shifted.pos[atom, axis] += sign * h
                energies.append(model(shifted)["energy"].sum())
            numeric = -(energies[0] - energies[1]) / (2 * h)
            assert abs(float(numeric - forces[atom, axis])) < 1e-6 * max(1.0, abs(float(numeric)))


def test_collinear_triplets_have_finite_forces():
    atoms = Atoms("CO2", positions=[[0, 0, 0], [1.16, 0, 0], [-1.16, 0, 0]], cell=[20, 20, 20])
    atoms.center()
    batch = batch_of([atoms])
    assert batch.idx_kj.numel() > 0
    model = tiny_model()
    model.train()
    out = model(batch)
    assert torch.isfinite(out["forces"]).all()
    out["forces"].pow(2).sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_triplets_built_when_absent_and_batching():
    atoms = [slab(0), slab(1)]
    model = tiny_model(cutoff=4.0)
    batch = batch_of(atoms, cutoff=4.0)
    ref = model(batch)
    del batch.idx_kj, batch.idx_ji
    out = model(batch)
    assert torch.equal(out["energy"], ref["energy"]) and out["energy"].shape == (2,)
    single = model(batch_of(atoms[1:], cutoff=4.0))
    assert torch.allclose(single["energy"], ref["energy"][1:], rtol=1e-12)
    with torch.no_grad():
        assert not model(batch)["forces"].requires_grad


def test_registry_and_parameter_counts():
    counts = {
        name: count_parameters(name) for name in ("dimenetpp", "dimenetpp-large", "dimenetpp-xl")
    }
    print("parameters:", counts)
    for name, paper in (("dimenetpp", 1.8e6), ("dimenetpp-large", 10.8e6), ("dimenetpp-xl", 240e6)):
        assert abs(counts[name] - paper) / paper < 0.10, name
    model = build_model("dimenetpp-tiny", cutoff=5.0)
    assert model.rbf.cutoff == 5.0
    assert count_parameters("dimenetpp-tiny") == sum(p.numel() for p in model.parameters())
    with pytest.raises(KeyError):
        build_model("nope")


def test_detached_angles_change_forces_only_through_angles():
    """detach_angles (OCP's DimeNet++): the same energies; forces differ where triplets exist
    and equal the full gradient for a dimer (no triplets, so no angles); output_up_bias adds a
    bias (zero-initialised) to each output block's up-projection."""
    slab_batch, dimer = batch_of([slab()], cutoff=4.0), batch_of([molecule("CO", vacuum=5.0)])
    full = tiny_model(cutoff=4.0)
    detached = tiny_model(cutoff=4.0)
    detached.detach_angles = True
    for batch, differ in ((slab_batch, True), (dimer, False)):
        a, b = full(batch), detached(batch)
        assert torch.equal(a["energy"], b["energy"])
        deviation = float((a["forces"] - b["forces"]).abs().max())
        assert deviation > 1e-6 if differ else deviation < 1e-12
    biased = DimeNetPlusPlus(**TINY, num_blocks=2, output_up_bias=True)
    assert all(not block.lin_up.bias.any() for block in biased.output_blocks)
    assert "lin_up.bias" not in dict(tiny_model().output_blocks[0].named_parameters())
