"""DimeNet++ training-step time: ours against torch_geometric's `DimeNetPlusPlus`, same weights.

One step = energy, forces = -dE/dpos (create_graph), loss = energy MAE + force L2, backward:
the double backward that energy-centric training does. Both models get the same batch of
periodic slabs with the same graph and triplets (PyG's own `radius_graph`/triplets need pyg-lib,
absent here, so its blocks are called the way its forward calls them, on our edges, with the
periodic shift included so both compute the same geometry). Ours runs at G = 1. The two run
interleaved in one process after a warm-up; medians over `--repeats`.

Usage:
    python bench/model_speed.py                      # dimenetpp (1.8M), CPU
    python bench/model_speed.py --config dimenetpp-tiny --repeats 3
    python bench/model_speed.py --device cuda
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from ase.build import add_adsorbate, fcc111
from torch_geometric.nn.models import DimeNetPlusPlus as PygDimeNetPlusPlus

from graphpar.data.dataset import collate
from graphpar.data.graph import atoms_to_sample, edge_vectors
from graphpar.models import MODELS, build_model

OUT = Path(__file__).resolve().parents[1] / "results" / "benchmarks" / "model_speed.json"


def make_batch(structures: int, seed: int = 0):
    """OC20-like slabs: fcc(111) 3x3x3 Cu/Pt with O or C on top (28 atoms), rattled, pbc TTT."""
    rng = np.random.default_rng(seed)
    samples = []
    for k in range(structures):
        slab = fcc111(("Cu", "Pt")[k % 2], size=(3, 3, 3), vacuum=7.0)
        add_adsorbate(slab, ("O", "C")[k % 2], 1.8, "fcc")
        slab.pbc = True
        slab.positions += rng.normal(scale=0.05, size=slab.positions.shape)
        samples.append(atoms_to_sample(slab, cutoff=6.0, max_neighbors=50))
    return collate(samples)


def pyg_energy(pyg: PygDimeNetPlusPlus, batch, pos: torch.Tensor) -> torch.Tensor:
    """PyG's DimeNet++ forward (torch_geometric/nn/models/dimenet.py) on our periodic graph."""
    j, i = batch.edge_index
    idx_kj, idx_ji = batch.idx_kj, batch.idx_ji
    vec = edge_vectors(pos, batch.edge_index, batch.cell_offsets, batch.cell, batch.batch)
    dist = vec.norm(dim=-1)
    # PyG's angle between pos_ji and pos_kj, as atan2(|a x b|, a . b).
    pos_ji, pos_kj = vec[idx_ji], vec[idx_kj]
    angle = torch.atan2(torch.cross(pos_ji, pos_kj, dim=1).norm(dim=-1), (pos_ji * pos_kj).sum(-1))
    rbf = pyg.rbf(dist)
    sbf = pyg.sbf(dist, angle, idx_kj)
    x = pyg.emb(batch.atomic_numbers, rbf, i, j)
    energy_atoms = pyg.output_blocks[0](x, rbf, i, num_nodes=pos.size(0))
    for interaction, output in zip(pyg.interaction_blocks, pyg.output_blocks[1:], strict=True):
        x = interaction(x, rbf, sbf, idx_kj, idx_ji)
        energy_atoms = energy_atoms + output(x, rbf, i, num_nodes=pos.size(0))
    energy = torch.zeros(int(batch.num_graphs), dtype=pos.dtype, device=pos.device)
    return energy.index_add(0, batch.batch, energy_atoms.squeeze(-1))


def training_step(energy_fn, params, batch, energy_target, forces_target) -> float:
    """Seconds for one energy + forces + loss + backward step."""
    start = time.perf_counter()
    pos = batch.pos.detach().requires_grad_(True)
    energy = energy_fn(pos)
    (grad,) = torch.autograd.grad(energy.sum(), pos, create_graph=True)
    loss = (energy - energy_target).abs().mean()
    loss = loss + 100 * (-grad - forces_target).norm(dim=-1).mean()
    loss.backward()
    if batch.pos.is_cuda:
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    for p in params:
        p.grad = None
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="dimenetpp", choices=sorted(MODELS))
    parser.add_argument("--structures", type=int, default=2, help="structures per batch")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()

    torch.manual_seed(0)
    device = torch.device(args.device)
    ours = build_model(args.config).to(device)
    settings = MODELS[args.config][1]
    pyg = PygDimeNetPlusPlus(
        hidden_channels=settings["hidden_channels"],
        out_channels=1,
        num_blocks=settings["num_blocks"],
        int_emb_size=settings["int_emb_size"],
        basis_emb_size=settings.get("basis_emb_size", 8),
        out_emb_channels=settings["out_emb_channels"],
        num_spherical=7,
        num_radial=6,
        cutoff=6.0,
    ).to(device)
    ours.load_state_dict(pyg.state_dict())  # the same weights
    ours.train()
    batch = make_batch(args.structures).to(device)
    energy_target = torch.zeros(int(batch.num_graphs), device=device)
    forces_target = torch.zeros_like(batch.pos)

    def our_energy(pos):
        batch.pos = pos
        return ours.energy(batch, pos)

    runs = {
        "ours": (our_energy, list(ours.parameters())),
        "pyg": (lambda pos: pyg_energy(pyg, batch, pos), list(pyg.parameters())),
    }
    times = {name: [] for name in runs}
    for repeat in range(args.repeats + 1):  # the first round warms up
        for name, (energy_fn, params) in runs.items():
            seconds = training_step(energy_fn, params, batch, energy_target, forces_target)
            if repeat:
                times[name].append(seconds)
    median = {name: statistics.median(values) for name, values in times.items()}
    result = {
        "benchmark": "model_speed",
        "settings": {
            "config": args.config,
            "structures": args.structures,
            "atoms": int(batch.num_nodes),
            "edges": int(batch.edge_index.shape[1]),
            "triplets": int(batch.idx_kj.numel()),
            "repeats": args.repeats,
            "device": str(device),
            "torch_threads": torch.get_num_threads(),
            "step": "energy + forces (create_graph) + MAE/L2 loss + backward",
        },
        "raw_seconds": times,
        "summary": {
            "metric": "seconds per training step (forward + forces + backward)",
            "ours": median["ours"],
            "baseline": median["pyg"],
            "ratio": median["pyg"] / median["ours"],
            "goal": 1.0,
            "higher_is_better": True,
            "machine": f"{platform.processor() or platform.machine()}, {device}, torch "
            f"{torch.__version__}, {torch.get_num_threads()} threads",
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"ours {median['ours']:.3f} s, PyG {median['pyg']:.3f} s per step: ratio "
        f"{result['summary']['ratio']:.2f} (goal >= 1); wrote {args.out}"
    )


if __name__ == "__main__":
    main()
