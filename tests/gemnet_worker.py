"""Graph-parallel GemNet-dT in real gloo processes: the fairchem fixture's batch with its
weights, a training step (energy MAE + force L2 loss), per rank (CPU, float64)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from conftest import DATA
from gloo import process_group
from model_worker import train_step

from graphpar.models.gemnet import GemNetT, load_fairchem_state_dict
from graphpar.parallel import get_dims, init_groups

FIXTURE = DATA / "fairchem-gemnet-dt"


def make_model(direct_forces: bool = True) -> GemNetT:
    config = json.loads((FIXTURE / "model.json").read_text())
    weights = {k: torch.from_numpy(v) for k, v in np.load(FIXTURE / "weights.npz").items()}
    scales = config["scale_factors"]
    if not direct_forces:  # without the force heads (gradient forces: GemNet-T)
        heads = ("seq_forces", "out_forces", "dense_rbf_F", "scale_rbf_F")
        weights = {k: v for k, v in weights.items() if not any(h in k for h in heads)}
        scales = {k: v for k, v in scales.items() if not any(h in k for h in heads)}
    args = dict(config["constructor_args"], direct_forces=direct_forces)
    model = GemNetT(**args).double()
    return load_fairchem_state_dict(model, weights, scales).train()


def make_batch(seed: int = 0):
    """The fixture's two structures with its input graph; random energy and force targets."""
    graph = dict(np.load(FIXTURE / "graph.npz"))
    natoms = torch.from_numpy(graph["batch_natoms"])
    pos = torch.from_numpy(graph["batch_pos"])
    g = torch.Generator().manual_seed(seed)
    return SimpleNamespace(
        pos=pos,
        atomic_numbers=torch.from_numpy(graph["batch_atomic_numbers"]),
        cell=torch.from_numpy(graph["batch_cell"]),
        natoms=natoms,
        num_graphs=natoms.numel(),
        free=torch.ones(pos.size(0), dtype=torch.bool),
        batch=torch.repeat_interleave(torch.arange(natoms.numel()), natoms),
        edge_index=torch.from_numpy(graph["batch_edge_index"]),
        cell_offsets=torch.from_numpy(graph["batch_cell_offsets"]),
        energy=1000 * torch.randn(natoms.numel(), generator=g, dtype=torch.float64),
        forces=10 * torch.randn(pos.shape, generator=g, dtype=torch.float64),
    )


def worker(rank: int, world_size: int, port: int, gp_size: int, out: str) -> None:
    with process_group(rank, world_size, port, timeout_s=120):
        init_groups(gp_size)
        assert get_dims().gp_size == gp_size
        result = {direct: train_step(make_model(direct), make_batch()) for direct in (True, False)}
        torch.save(result, Path(out) / f"rank{rank}.pt")
