"""Training throughput (samples/s) and peak memory per rank at G = 1 and 2 (D = 1), both small
models, through the real entry point: `torchrun -m graphpar.training.train` on the embedded dataset.

Each configuration trains `--steps` steps (batch 8, no validation, float32) from scratch in a
temporary folder; samples/s is the median over the steps after the first `--warmup` of the
per-step values in metrics.jsonl (systems in the global batch / wall seconds of the step: load,
forward, forces, backward, gradient all-reduce, optimiser), and peak memory is each rank's peak
RSS (ru_maxrss, which includes the Python and torch libraries and the model). The
configurations run one after another, interleaved over `--repeats` rounds.

This machine has 2 cores: at G = 2 each rank gets one of them (OMP_NUM_THREADS=1, as torchrun
sets), at G = 1 the single rank uses both. The G = 2 / G = 1 ratio therefore measures the cost of
graph parallelism's communication and duplicated per-atom work on a CPU, not the speed-up GPUs
give; memory per rank is the figure graph parallelism is for.

Usage (the data comes from `snakemake --cores 2`, the default config):
    python bench/train_throughput.py
    python bench/train_throughput.py --steps 20 --repeats 1 --models dimenetpp-small
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import yaml
from machine import cpu_model

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "results" / "benchmarks" / "train_throughput.json"


def run(model: str, gp_size: int, data: Path, steps: int, workdir: Path) -> dict:
    """One training run; samples/s per step and peak memory per rank from metrics.jsonl."""
    config = {
        "model": model,
        "gp_size": gp_size,
        "train": [str(data)],
        "batch_size": 8,
        "max_steps": steps,
        "checkpoint_every": 10**9,
        "eval_every": 10**9,
        "normalization": {"energy_mean": 0.0, "energy_std": 1.0},
    }
    out = workdir / f"{model}-g{gp_size}"
    path = workdir / f"{model}-g{gp_size}.yaml"
    path.write_text(yaml.safe_dump(config))
    threads = str(max(1, (os.cpu_count() or 1) // gp_size))
    env = dict(os.environ, OMP_NUM_THREADS=threads, GLOO_SOCKET_IFNAME="lo")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += [f"--nproc_per_node={gp_size}", "-m", "graphpar.training.train"]
    command += ["--config", str(path), "--out", str(out)]
    subprocess.run(command, check=True, env=env, capture_output=True)
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {
        "samples_per_s": [x["samples_per_s"] for x in lines if x["split"] == "train"],
        "peak_memory_mb": lines[-1]["peak_memory_mb"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["dimenetpp-small", "gemnet-small"])
    parser.add_argument("--sizes", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument(
        "--data", type=Path, default=REPO / "resources" / "mini" / "lmdb" / "s2ef" / "train"
    )
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    if not (args.data / "metadata.json").exists():
        sys.exit(f"{args.data} is missing: run `snakemake --cores 2` (the default config) first")

    raw: dict[str, dict[int, list[dict]]] = {m: {g: [] for g in args.sizes} for m in args.models}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            for model in args.models:
                for gp_size in args.sizes:
                    workdir = Path(tmp) / f"r{repeat}"
                    workdir.mkdir(exist_ok=True)
                    result = run(model, gp_size, args.data, args.steps, workdir)
                    raw[model][gp_size].append(result)
                    rate = statistics.median(result["samples_per_s"][args.warmup :])
                    print(
                        f"{model} G={gp_size} round {repeat}: {rate:.1f} samples/s, "
                        f"peak memory per rank {result['peak_memory_mb']} MB"
                    )

    table = {}
    for model in args.models:
        table[model] = {}
        for gp_size in args.sizes:
            rates = [x for r in raw[model][gp_size] for x in r["samples_per_s"][args.warmup :]]
            memory = [max(r["peak_memory_mb"]) for r in raw[model][gp_size]]
            table[model][f"G={gp_size}"] = {
                "samples_per_s_median": statistics.median(rates),
                "peak_memory_mb_per_rank_max": max(memory),
            }
    first, last = f"G={args.sizes[0]}", f"G={args.sizes[-1]}"
    model = args.models[0]
    ours = table[model][last]["samples_per_s_median"]
    baseline = table[model][first]["samples_per_s_median"]
    result = {
        "benchmark": "train_throughput",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": "python bench/train_throughput.py " + " ".join(sys.argv[1:]),
        "settings": {
            "batch_size": 8,
            "steps": args.steps,
            "warmup_steps_dropped": args.warmup,
            "repeats": args.repeats,
            "data": str(
                args.data.relative_to(REPO) if args.data.is_relative_to(REPO) else args.data
            ),
            "dtype": "float32",
        },
        "results": table,
        "raw": raw,
        "summary": {
            "metric": f"training samples/s of {model} at {last} over {first} (D = 1)",
            "ours": ours,
            "baseline": baseline,
            "ratio": ours / baseline,
            "goal": None,
            "higher_is_better": True,
            "machine": f"{cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__}, CPU "
            "gloo ranks on 127.0.0.1 (all ranks share these cores: cost of graph parallelism "
            "on a CPU, not GPU speed-up)",
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result["summary"], indent=1))


if __name__ == "__main__":
    main()
