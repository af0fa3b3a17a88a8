"""Preprocessing throughput on one CPU core: our graph + triplets against ASE and pymatgen.

Structures are OC20-sized (fcc(111) 4x4x5 Cu/Pt slabs, ~80 atoms, with a small adsorbate, 7 A
vacuum each side, rattled, pbc T T T); cutoff 6 A, 50 neighbours (docs/architecture.md section 4).

* ours: `radius_graph_batch` on chunks of `--batch-size` structures, then DimeNet++ triplets,
  GemNet's symmetric graph and its triplets (everything a DataLoader worker builds);
* ASE: `ase.neighborlist.neighbor_list("ijS", atoms, 6)` per structure (graph only);
* pymatgen: `Structure.get_neighbor_list(r=6, numerical_tol=0, exclude_self=True)` then the
  nearest 50 per centre, as OC20's AtomsToGraphs does (graph only).

The three run interleaved in one process, after a warm-up; medians over `--repeats`.

Usage:
    python bench/preprocess.py --structures 64 --repeats 5
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from ase.build import add_adsorbate, fcc111, molecule
from ase.neighborlist import neighbor_list
from machine import cpu_model
from threadpoolctl import threadpool_limits

from graphpar.data.graph import (
    dimenet_triplets,
    gemnet_triplets,
    radius_graph_batch,
    symmetric_graph,
)

CUTOFF = 6.0
MAX_NEIGHBORS = 50
ADSORBATES = ["O", "OH", "CO", "CH3"]


def make_structures(count: int, seed: int):
    structures = []
    for k in range(count):
        atoms = fcc111("Cu" if k % 2 else "Pt", size=(4, 4, 5), vacuum=7.0)
        add_adsorbate(atoms, molecule(ADSORBATES[k % len(ADSORBATES)]), 2.0, "fcc")
        atoms.center(vacuum=7.0, axis=2)
        atoms.pbc = True
        atoms.rattle(0.05, seed=seed + k)
        structures.append(atoms)
    return structures


def ours(structures, batch_size: int) -> int:
    """Graph + both triplet conventions; returns edges + triplets built."""
    built = 0
    for start in range(0, len(structures), batch_size):
        chunk = structures[start : start + batch_size]
        pos = torch.from_numpy(np.concatenate([a.positions for a in chunk])).float()
        cell = torch.from_numpy(np.stack([a.cell.array for a in chunk])).float()
        pbc = torch.from_numpy(np.stack([a.pbc for a in chunk]))
        natoms = torch.tensor([len(a) for a in chunk])
        edge_index, cell_offsets, _ = radius_graph_batch(
            pos, cell, pbc, natoms, CUTOFF, MAX_NEIGHBORS
        )
        num_nodes = pos.shape[0]
        idx_kj, _ = dimenet_triplets(edge_index, cell_offsets, num_nodes)
        edge_index_sym, _, _ = symmetric_graph(edge_index, cell_offsets)
        id3_ba, _ = gemnet_triplets(edge_index_sym, num_nodes)
        built += edge_index.shape[1] + idx_kj.numel() + id3_ba.numel()
    return built


def ase_graph(structures) -> int:
    return sum(neighbor_list("ijS", atoms, CUTOFF)[0].size for atoms in structures)


def pymatgen_graph(structures) -> int:
    from pymatgen.io.ase import AseAtomsAdaptor

    built = 0
    for atoms in structures:
        structure = AseAtomsAdaptor.get_structure(atoms)
        centre, neighbour, offsets, distance = structure.get_neighbor_list(
            r=CUTOFF, numerical_tol=0, exclude_self=True
        )
        kept = []
        for i in range(len(atoms)):  # OC20's AtomsToGraphs._get_neighbors_pymatgen
            mine = (centre == i).nonzero()[0]
            kept.append(mine[np.argsort(distance[mine])[:MAX_NEIGHBORS]])
        kept = np.concatenate(kept)
        edge_index = np.stack([neighbour[kept], centre[kept]])
        cell_offsets = offsets[kept]
        built += edge_index.shape[1] + 0 * cell_offsets.shape[0]
    return built


def machine() -> str:
    model = cpu_model()
    return f"{model}, 1 thread (torch + BLAS), torch {torch.__version__}"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--structures", type=int, default=64, help="structures per repeat")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats (median)")
    parser.add_argument("--batch-size", type=int, default=8, help="structures per call (ours)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="results/benchmarks/preprocess.json")
    args = parser.parse_args(argv)

    torch.set_num_threads(1)
    structures = make_structures(args.structures, args.seed)
    methods = {
        "ours": lambda s: ours(s, args.batch_size),
        "ase": ase_graph,
        "pymatgen": pymatgen_graph,
    }
    raw = {name: {"seconds": [], "items": None} for name in methods}
    with threadpool_limits(limits=1):
        for function in methods.values():  # warm-up
            function(structures[: min(len(structures), 2 * args.batch_size)])
        for _ in range(args.repeats):
            for name, function in methods.items():  # interleaved
                start = time.perf_counter()
                items = function(structures)
                raw[name]["seconds"].append(time.perf_counter() - start)
                raw[name]["items"] = items

    results = {}
    for name, record in raw.items():
        seconds = statistics.median(record["seconds"])
        results[name] = {
            "seconds_per_repeat": record["seconds"],
            "median_seconds": seconds,
            "structures_per_second": args.structures / seconds,
            "items_per_repeat": record["items"],
            "items_per_second": record["items"] / seconds,
        }
        print(
            f"{name:9s} {results[name]['structures_per_second']:8.1f} structures/s  "
            f"{results[name]['items_per_second']:12.0f} items/s"
        )
    baseline_name = max(("ase", "pymatgen"), key=lambda n: results[n]["structures_per_second"])
    ours_rate = results["ours"]["structures_per_second"]
    baseline_rate = results[baseline_name]["structures_per_second"]
    report = {
        "benchmark": "preprocess",
        "settings": {
            "structures": args.structures,
            "repeats": args.repeats,
            "batch_size": args.batch_size,
            "cutoff": CUTOFF,
            "max_neighbors": MAX_NEIGHBORS,
            "mean_atoms": float(np.mean([len(a) for a in structures])),
            "items": "ours: edges + DimeNet++ triplets + GemNet triplets; baselines: edges",
        },
        "raw": results,
        "summary": {
            "metric": "structures per second (graph + triplets vs graph only)",
            "ours": ours_rate,
            "baseline": baseline_rate,
            "baseline_name": baseline_name,
            "ratio": ours_rate / baseline_rate,
            "goal": 3.0,
            "higher_is_better": True,
            "machine": machine(),
        },
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"ratio {report['summary']['ratio']:.2f} (goal 3.0) vs {baseline_name}; wrote {out}")


if __name__ == "__main__":
    main()
