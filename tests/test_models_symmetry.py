"""Both models' energies are invariant, and their forces equivariant, under rotation,
translation, atom permutation and the choice of periodic image (float64, tiny sizes)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ase.build import add_adsorbate, fcc111
from conftest import float64_batch

from graphpar.models import build_model

CUTOFF = 4.0


def batch_of(atoms_list):
    # No neighbour cap: a capped graph is not symmetric, and GemNet's symmetrisation (the
    # reference's: keep one direction of each edge, mirror it) then depends on atom order.
    return float64_batch(atoms_list, cutoff=CUTOFF, max_neighbors=50)


@pytest.fixture(scope="module")
def atoms():
    slab = fcc111("Cu", size=(2, 2, 2), vacuum=5.0)
    add_adsorbate(slab, "O", 1.5, "fcc")
    slab.rattle(0.05, seed=1)
    return slab


@pytest.fixture(params=["dimenetpp-tiny", "gemnet-tiny"])
def model(request):
    torch.manual_seed(0)
    extra = {"output_initializer": "glorot_orthogonal"} if "dimenet" in request.param else {}
    return build_model(request.param, cutoff=CUTOFF, **extra).double().eval()


def assert_same(out, ref, forces=None, tol=1e-10):
    assert torch.allclose(out["energy"], ref["energy"], rtol=tol, atol=tol)
    expected = ref["forces"] if forces is None else forces
    assert torch.allclose(out["forces"], expected, rtol=0, atol=tol)


def rotation() -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    q, _ = torch.linalg.qr(torch.randn(3, 3, generator=g, dtype=torch.float64))
    return q * torch.sign(torch.linalg.det(q))


def test_rotation_and_translation(model, atoms):
    # Transform the float64 batch itself (the graph is invariant): rebuilding it from ASE
    # would round positions to float32.
    ref = model(batch_of([atoms]))
    r = rotation()
    batch = batch_of([atoms])
    batch.pos, batch.cell = batch.pos @ r.T, batch.cell @ r.T
    assert_same(model(batch), ref, forces=ref["forces"] @ r.T)

    batch = batch_of([atoms])
    batch.pos = batch.pos + torch.tensor([0.3, -0.7, 0.2], dtype=torch.float64)
    assert_same(model(batch), ref)


def test_permutation(model, atoms):
    ref = model(batch_of([atoms]))
    perm = np.random.default_rng(0).permutation(len(atoms))
    out = model(batch_of([atoms[perm]]))
    assert_same(out, ref, forces=ref["forces"][torch.as_tensor(perm)], tol=1e-9)


def test_choice_of_periodic_image(model, atoms):
    """Moving atoms by lattice vectors changes the graph's cell offsets, not the results."""
    batch = batch_of([atoms])
    ref = model(batch)
    shifts = np.zeros((len(atoms), 3), dtype=np.int64)
    shifts[0], shifts[4], shifts[-1] = (1, 0, 0), (-1, 2, 0), (0, -1, 0)
    moved = atoms.copy()
    moved.positions += shifts @ atoms.cell.array
    moved_batch = batch_of([moved])
    assert not torch.equal(moved_batch.cell_offsets, batch.cell_offsets)
    moved_batch.pos = batch.pos + torch.from_numpy(shifts).double() @ batch.cell[0]
    assert_same(model(moved_batch), ref)
