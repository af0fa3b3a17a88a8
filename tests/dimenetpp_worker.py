"""Graph-parallel DimeNet++ in real gloo processes: the batch, the training step, and the
per-rank scenario that tests/test_dimenetpp.py spawns (CPU, float64)."""

from __future__ import annotations

from pathlib import Path

import torch
from ase.build import add_adsorbate, fcc111
from gloo import process_group

from graphpar.data.dataset import collate
from graphpar.data.graph import atoms_to_sample
from graphpar.models import build_model
from graphpar.parallel import init_groups, sync_gradients


def make_batch(seed: int = 0):
    """Two small periodic slabs with adsorbates (float64), random energy and force targets."""
    samples = []
    for k, (metal, adsorbate) in enumerate((("Cu", "O"), ("Pt", "H"))):
        slab = fcc111(metal, size=(2, 2, 2), vacuum=5.0)
        add_adsorbate(slab, adsorbate, 1.5, "fcc")
        slab.rattle(0.05, seed=seed + k)
        samples.append(atoms_to_sample(slab, cutoff=4.0, max_neighbors=12))
    batch = collate(samples)
    batch.pos = batch.pos.double()
    batch.cell = batch.cell.double()
    g = torch.Generator().manual_seed(seed)
    batch.energy = torch.randn(batch.num_graphs, generator=g, dtype=torch.float64)
    batch.forces = torch.randn(batch.pos.shape, generator=g, dtype=torch.float64)
    return batch


def make_model():
    torch.manual_seed(0)
    model = build_model("dimenetpp-tiny", cutoff=4.0, output_initializer="glorot_orthogonal")
    return model.double().train()


def train_step(model, batch):
    """Energy MAE + force L2 loss, backward, synchronised gradients."""
    model.zero_grad(set_to_none=True)
    out = model(batch)
    loss = (out["energy"] - batch.energy).abs().mean()
    loss = loss + (out["forces"] - batch.forces).norm(dim=1).mean()
    loss.backward()
    sync_gradients(model)
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters()}
    return out["energy"].detach(), out["forces"].detach(), grads


def worker(rank: int, world_size: int, port: int, gp_size: int, out: str) -> None:
    with process_group(rank, world_size, port):
        init_groups(gp_size)
        result = train_step(make_model(), make_batch())
        torch.save(result, Path(out) / f"rank{rank}.pt")
