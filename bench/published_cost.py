"""What `config/paper/published.yaml` costs per OC20 split, projected from measured throughput of
the published checkpoints' architectures (random weights: the same arithmetic as the trained
ones) on OC20-sized slabs (bench/preprocess.py's fcc(111) 4x4x5 slabs with an adsorbate, ~83
atoms; OC20's average is ~73), graphs of 6 A and 50 neighbours in fairchem's convention:

* S2EF evaluation: frames/s of a model call (energy and forces) on batches of `--batch-size`
  stored graphs, as `graphpar.evaluate` runs; a split is ~1.0M frames (OC20's counts);
* IS2RS/IS2RE relaxation: seconds per system and step = a model call per system plus its graph
  rebuilt (`radius_graph_batch`), as every L-BFGS step of `graphpar.relax` does; a split is
  ~25k systems at most 200 steps (the upper bound: fmax 0.05 stops many earlier).

Usage (minutes on 2 cores; `--device cuda` on a GPU):
    python bench/published_cost.py
    python bench/published_cost.py --device cuda --batch-size 32 --repeats 5
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
from pathlib import Path

import torch
from machine import cpu_model, step_seconds
from preprocess import make_structures

from graphpar.data.dataset import collate
from graphpar.data.graph import atoms_to_sample, radius_graph_batch
from graphpar.models import build_model, count_parameters

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "results" / "benchmarks" / "published_cost.json"
# The published checkpoints (config/paper/published.yaml) and the registered configuration of
# each one's architecture; DimeNet++ as converted (angles on detached positions).
PUBLISHED = {
    "gemnet-dt-all, gemnet-dt-2m": ("gemnet-dt", {}),
    "dimenetpp-large-all": ("dimenetpp-large", {"detach_angles": True}),
    "dimenetpp-20m-md": ("dimenetpp", {"detach_angles": True}),
}
S2EF_FRAMES = 1_000_000  # per val/test split: 999,736 to 999,973 (graphpar.data.oc20)
IS2RS_SYSTEMS = 25_000  # per val/test split: 24,930 to 24,987
STEPS = 200


def median_seconds(function, repeats: int, device: torch.device) -> float:
    return statistics.median(step_seconds(function, device, repeats))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch-size", type=int, default=4, help="systems per model call")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats (median)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    device = torch.device(args.device)

    structures = make_structures(args.batch_size, seed=0)
    samples = [atoms_to_sample(a, 6.0, 50, convention="fairchem") for a in structures]
    batch = collate(samples).to(device)
    atoms = int(batch.natoms.sum())

    def rebuild():
        radius_graph_batch(
            batch.pos, batch.cell, batch.pbc, batch.natoms, 6.0, 50, convention="fairchem"
        )

    graph_s = median_seconds(rebuild, args.repeats, device) / args.batch_size
    results = {}
    for names, (config, overrides) in PUBLISHED.items():
        torch.manual_seed(0)
        model = build_model(config, **overrides).to(device).eval()

        def call(model=model):
            out = model(batch)
            return out["energy"].sum() + out["forces"].sum()

        model_s = median_seconds(call, args.repeats, device) / args.batch_size
        step_s = model_s + graph_s
        results[names] = {
            "architecture": config,
            "parameters": count_parameters(config, **overrides),
            "s2ef_frames_per_s": 1 / model_s,
            "relax_system_steps_per_s": 1 / step_s,
            "s2ef_hours_per_split": S2EF_FRAMES * model_s / 3600,
            "is2rs_hours_per_split_at_200_steps": IS2RS_SYSTEMS * STEPS * step_s / 3600,
        }
        print(names, json.dumps(results[names]))
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    machine = f"{cpu_model()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    slowest = max(results.values(), key=lambda r: r["s2ef_hours_per_split"])
    record = {
        "benchmark": "published_cost",
        "date": datetime.date.today().isoformat(),
        "command": "python bench/published_cost.py " + " ".join(argv or []),
        "settings": {
            "structures": "bench/preprocess.py make_structures: fcc111 4x4x5 Pt/Cu + adsorbate",
            "atoms_per_system": atoms / args.batch_size,
            "batch_size": args.batch_size,
            "graph": "6 A, 50 neighbours, fairchem convention",
            "graph_rebuild_s_per_system": graph_s,
            "s2ef_frames_per_split": S2EF_FRAMES,
            "is2rs_systems_per_split": IS2RS_SYSTEMS,
            "steps": STEPS,
            "device": where,
        },
        "results": results,
        "summary": {
            "metric": "hours of S2EF evaluation per OC20 split (1M frames), the slowest model",
            "ours": slowest["s2ef_hours_per_split"],
            "baseline": None,
            "ratio": None,
            "goal": None,
            "higher_is_better": False,
            "machine": f"{machine}, {where}",
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
