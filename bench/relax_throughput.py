"""Relaxation throughput: systems relaxed per second by graphpar's batched L-BFGS
(`graphpar.relax.relax_batch`, all systems of a batch in one model call per step) against ASE's
`LBFGS` looping over the same systems one at a time with the same model as an ASE calculator
(`graphpar.calculator.GraphparCalculator.from_model`), side by side in one process.

Both use the paper's relaxation settings (maxstep 0.04, memory 50, damping 1, alpha 70, fmax
0.05 eV/A, at most 200 steps) and rebuild the graph every step from the checkpoint's graph
settings. The two follow the same trajectories (float32 model: up to rounding), so the step
counts match and the ratio is the per-step cost. Rounds alternate batched and ASE, `--repeats`
times; the figures are medians over rounds.

Usage (the default pipeline's data and checkpoint: `snakemake --cores 2`):
    python bench/relax_throughput.py
    python bench/relax_throughput.py --checkpoint results/mini/checkpoints/dimenetpp/final.pt \\
        --systems 8 --repeats 1
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from ase import Atoms
from ase.constraints import FixAtoms
from ase.optimize import LBFGS
from machine import cpu_model

from graphpar.calculator import GraphparCalculator, graph_settings
from graphpar.data.dataset import LmdbDataset, collate
from graphpar.relax import relax_batch
from graphpar.training.checkpoint import read_checkpoint, trained_model

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "results" / "benchmarks" / "relax_throughput.json"
SETTINGS = {"maxstep": 0.04, "memory": 50, "damping": 1.0, "alpha": 70.0}
FMAX, STEPS = 0.05, 200


def to_atoms(sample) -> Atoms:
    atoms = Atoms(
        numbers=sample.atomic_numbers.long().numpy(),
        positions=sample.pos.double().numpy(),
        cell=sample.cell.reshape(3, 3).double().numpy(),
        pbc=sample.pbc.reshape(3).numpy(),
    )
    atoms.set_constraint(FixAtoms(mask=sample.fixed.bool().numpy()))
    return atoms


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def batched(model, samples, cutoff, max_neighbors, batch_size, device) -> dict:
    synchronize(device)
    start = time.perf_counter()
    steps, positions = [], []
    for first in range(0, len(samples), batch_size):
        batch = collate(samples[first : first + batch_size]).to(device)
        result = relax_batch(
            model,
            batch,
            fmax=FMAX,
            steps=STEPS,
            cutoff=cutoff,
            max_neighbors=max_neighbors,
            **SETTINGS,
        )
        steps += result.steps.tolist()
        positions += [p.cpu().numpy() for p in result.pos]
    synchronize(device)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "steps": steps, "positions": positions}


def ase_loop(model, samples, cutoff, max_neighbors) -> dict:
    calculator = GraphparCalculator.from_model(model, cutoff, max_neighbors)
    start = time.perf_counter()
    steps, positions = [], []
    for sample in samples:
        atoms = to_atoms(sample)
        atoms.calc = calculator
        optimizer = LBFGS(atoms, logfile=None, **SETTINGS)
        optimizer.run(fmax=FMAX, steps=STEPS)
        steps.append(optimizer.nsteps)
        positions.append(atoms.positions.copy())
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "steps": steps, "positions": positions}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--checkpoint", type=Path, default=REPO / "results/mini/checkpoints/dimenetpp/final.pt"
    )
    parser.add_argument("--data", type=Path, default=REPO / "resources/mini/lmdb/is2re/val_id")
    parser.add_argument("--systems", type=int, default=16, help="first N systems of --data")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()

    state = read_checkpoint(args.checkpoint)
    device = torch.device(args.device)
    model = trained_model(state, device)
    cutoff, max_neighbors = graph_settings(state.get("graph"), model)
    dataset = LmdbDataset(args.data)
    samples = [dataset[i] for i in range(min(args.systems, len(dataset)))]
    rounds = {"batched": [], "ase": []}
    for repeat in range(args.repeats):
        for name, run in (
            (
                "batched",
                lambda: batched(model, samples, cutoff, max_neighbors, args.batch_size, device),
            ),
            ("ase", lambda: ase_loop(model, samples, cutoff, max_neighbors)),
        ):
            result = run()
            rounds[name].append(result)
            print(f"round {repeat} {name}: {result['seconds']:.1f} s", flush=True)

    rate = {
        name: statistics.median(len(samples) / r["seconds"] for r in results)
        for name, results in rounds.items()
    }
    ours, theirs = rounds["batched"][0], rounds["ase"][0]
    pairs = zip(ours["positions"], theirs["positions"], strict=True)
    deviation = max(float(np.abs(a - b).max()) for a, b in pairs)
    same_steps = sum(a == b for a, b in zip(ours["steps"], theirs["steps"], strict=True))
    result = {
        "benchmark": "relax_throughput",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": "python bench/relax_throughput.py " + " ".join(sys.argv[1:]),
        "settings": {
            "checkpoint": str(args.checkpoint.relative_to(REPO))
            if args.checkpoint.is_relative_to(REPO)
            else str(args.checkpoint),
            "model": state["config"]["model"],
            "data": str(args.data.relative_to(REPO))
            if args.data.is_relative_to(REPO)
            else str(args.data),
            "systems": len(samples),
            "atoms_per_system_mean": float(np.mean([int(s.natoms) for s in samples])),
            "batch_size": args.batch_size,
            "repeats": args.repeats,
            "optimizer": {**SETTINGS, "fmax": FMAX, "steps": STEPS},
            "graph": {"cutoff": cutoff, "max_neighbors": max_neighbors},
            "threads": torch.get_num_threads(),
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        },
        "results": {
            "systems_per_s_median": rate,
            "seconds": {name: [r["seconds"] for r in results] for name, results in rounds.items()},
            "steps_batched": ours["steps"],
            "steps_ase": theirs["steps"],
            "systems_with_equal_steps": same_steps,
            "max_position_difference_A": deviation,
        },
        "summary": {
            "metric": "systems relaxed per second, batched L-BFGS over ASE LBFGS one by one",
            "ours": rate["batched"],
            "baseline": rate["ase"],
            "ratio": rate["batched"] / rate["ase"],
            "goal": 5.0,
            "higher_is_better": True,
            "machine": f"{cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__}, "
            + (torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"),
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result["summary"], indent=1))


if __name__ == "__main__":
    main()
