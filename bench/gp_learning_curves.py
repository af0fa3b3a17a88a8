"""The same training run at G = 1, 2 and 4 graph-parallel ranks: its loss curves coincide.

Graph parallelism splits each batch's edges and triplets over G processes and sums the partial
results exactly (docs/architecture.md, the adjoint table), so a run must follow the same
trajectory whatever G: the loss of step k at G = 4 equals the loss at G = 1 up to float64
rounding, for hundreds of steps of AdamW. This script trains the tiny DimeNet++ and GemNet-dT
(float64, batch 4, lr 1e-3) on a small embedded dataset it generates and preprocesses itself,
through the real entry point (`torchrun --nproc_per_node=G -m graphpar.training.train`, gloo on
127.0.0.1), and records every step's loss and gradient norm and the validation MAEs.

Written to results/benchmarks/gp_learning_curves.json (the report's figure gp_learning_curves).
The curves start equal to float64 rounding and any difference then grows step by step, as it
does between any two float64 trajectories whose sums are ordered differently (README: one BLAS
thread against two moves a run as much): `summary.ours` is the largest relative loss difference
from G = 1 over the first `EXACT_STEPS` steps, models and G; `differences` gives the largest
over the whole run too.

Usage:
    python bench/gp_learning_curves.py                   # 300 steps, both models, G = 1 2 4
    python bench/gp_learning_curves.py --steps 20 --models gemnet-tiny
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import yaml
from machine import cpu_model

from graphpar.data.mini import SPLITS, MiniConfig, generate
from graphpar.preprocess import preprocess

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "results" / "benchmarks" / "gp_learning_curves.json"
EXACT_STEPS = 50  # the summary's window: before rounding differences have had time to grow
# A small embedded dataset: 12 relaxations (~400 frames) to train on, 2 to validate on.
MINI = {
    "seed": 3,
    "systems": {"train": 12, "val_id": 2, **{s: 0 for s in SPLITS if s not in ("train", "val_id")}},
    "supercell": [2],
    "facets": ["111", "100"],
    "max_steps": 40,
    "frames_per_file": 100,
}


def prepare(root: Path, max_neighbors: int) -> dict[str, Path]:
    """Generate and preprocess the dataset; the train and val folders."""
    generate(MiniConfig.from_dict(MINI), root / "raw", workers=os.cpu_count() or 1)
    folders = {}
    for split in ("train", "val_id"):
        folders[split] = root / "lmdb" / split
        preprocess(
            root / "raw" / "s2ef" / split,
            folders[split],
            workers=os.cpu_count() or 1,
            ref_energy=True,
            max_neighbors=max_neighbors,
            progress=False,
        )
    return folders


def train(model: str, gp_size: int, data: dict[str, Path], steps: int, workdir: Path) -> list:
    """One run at G = gp_size; its metrics.jsonl records."""
    config = {
        "model": model,
        "gp_size": gp_size,
        "train": [str(data["train"])],
        "val": str(data["val_id"]),
        "batch_size": 4,
        "max_steps": steps,
        "eval_every": max(1, steps // 6),
        "checkpoint_every": 10**9,
        "log_every": 1,
        "dtype": "float64",
        "optimizer": {"lr": 1e-3},
    }
    out = workdir / f"{model}-g{gp_size}"
    path = workdir / f"{model}-g{gp_size}.yaml"
    path.write_text(yaml.safe_dump(config))
    env = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += [f"--nproc_per_node={gp_size}", "-m", "graphpar.training.train"]
    command += ["--config", str(path), "--out", str(out)]
    subprocess.run(command, check=True, env=env, capture_output=True)
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def curve(records: list, split: str, key: str) -> list[float]:
    return [r[key] for r in records if r["split"] == split]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["dimenetpp-tiny", "gemnet-tiny"])
    parser.add_argument("--sizes", nargs="+", type=int, default=[1, 2, 4], help="G values")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--max-neighbors", type=int, default=12, help="per target (default 12)")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    if args.sizes[0] != 1:
        parser.error("the first size must be 1: the other curves are compared with it")

    runs: dict[str, dict[str, dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        data = prepare(Path(tmp), args.max_neighbors)
        for model in args.models:
            runs[model] = {}
            for gp_size in args.sizes:
                records = train(model, gp_size, data, args.steps, Path(tmp))
                runs[model][f"G={gp_size}"] = {
                    "step": curve(records, "train", "step"),
                    "loss": curve(records, "train", "loss"),
                    "grad_norm": curve(records, "train", "grad_norm"),
                    "val_step": curve(records, "val", "step"),
                    "val_forces_mae": curve(records, "val", "forces_mae"),
                    "val_energy_mae": curve(records, "val", "energy_mae"),
                }
                print(f"{model} G={gp_size}: final loss {runs[model][f'G={gp_size}']['loss'][-1]}")

    differences = {}
    for model, by_size in runs.items():
        reference = by_size["G=1"]["loss"]
        for size, run in by_size.items():
            if size == "G=1":
                continue
            relative = [abs(a - b) / abs(b) for a, b in zip(run["loss"], reference, strict=True)]
            differences[f"{model} {size}"] = {
                f"max_relative_loss_difference_first_{EXACT_STEPS}_steps": max(
                    relative[:EXACT_STEPS]
                ),
                "max_relative_loss_difference": max(relative),
                "final_relative_loss_difference": relative[-1],
                "max_relative_val_forces_mae_difference": max(
                    abs(a - b) / abs(b)
                    for a, b in zip(
                        run["val_forces_mae"], by_size["G=1"]["val_forces_mae"], strict=True
                    )
                ),
            }
            print(f"{model} {size}: {differences[f'{model} {size}']}")
    worst = max(
        d[f"max_relative_loss_difference_first_{EXACT_STEPS}_steps"] for d in differences.values()
    )
    result = {
        "benchmark": "gp_learning_curves",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": "python bench/gp_learning_curves.py " + " ".join(sys.argv[1:]),
        "settings": {
            "dataset": MINI,
            "max_neighbors": args.max_neighbors,
            "batch_size": 4,
            "steps": args.steps,
            "dtype": "float64",
            "optimizer": "AdamW, lr 1e-3 (the schema's defaults otherwise)",
        },
        "runs": runs,
        "differences": differences,
        "summary": {
            "metric": "largest relative training-loss difference from G = 1 over the first "
            f"{EXACT_STEPS} steps, every model and G in {args.sizes[1:]} (float64); the "
            "differences of the whole run are in `differences`",
            "ours": worst,
            "baseline": None,
            "ratio": None,
            "goal": 1e-12,
            "higher_is_better": False,
            "machine": f"{cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__}, gloo "
            "ranks on 127.0.0.1",
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result["summary"], indent=1))


if __name__ == "__main__":
    main()
