"""Throughput of one G x D layout for the paper's scaling study (Table 4, Fig. 2): samples/s,
peak memory per GPU (rank) and TFLOP/s per GPU of real training steps.

A scaling run is a training config (src/graphpar/schemas/train.schema.yaml: model, gp_size,
dp_size, batch_size, train, ...; `--config` a YAML file or `--config-json` a JSON string, as
for the trainer) run for `--warmup` + `--steps` optimiser steps of the trainer's own
`graphpar.training.step.train_step` (loss, gradient synchronisation, clipping, AdamW with the
config's settings, EMA when the config has `ema_decay`), so the peak memory includes the
optimiser state and the EMA weights; nothing is written but the result:

    torchrun --standalone --nproc_per_node=8 -m graphpar.scaling --config-json '{...}' \\
        --out results/scaling/scaling/gemnet-960m-gp8.json

Measured after the warmup, on every rank, then reduced over ranks:
  samples_per_s           global batch / median wall time of a step (data loading included;
                          CUDA synchronised before each clock reading)
  peak_memory_mb_per_gpu  the largest rank's peak: torch.cuda.max_memory_allocated on GPU (MB);
                          on CPU the process's peak RSS (ru_maxrss: libraries and all)
  tflops_per_gpu          FLOPs of one measured step (forward + backward + optimiser) counted by
                          torch.utils.flop_counter.FlopCounterMode on each rank (matrix products
                          and convolutions, which dominate these models; scatter/gather and
                          element-wise ops are not counted, so this is a lower bound), divided by
                          the median step time, averaged over ranks; in 1e12 FLOP/s
The CPU path (gloo) exists for smoke tests: its numbers measure nothing about GPUs.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from collections.abc import Mapping
from itertools import cycle
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils.flop_counter import FlopCounterMode

from graphpar.data.dataset import collate
from graphpar.io import write_json
from graphpar.parallel import gather_world, get_dims, is_main, leave_processes, setup_processes
from graphpar.provenance import git_commit, package_versions, sha256_file
from graphpar.training.config import (
    TrainingError,
    add_config_arguments,
    config_hash,
    config_source,
    load_config,
)
from graphpar.training.data import batch_sampler, model_facts, open_datasets
from graphpar.training.ema import EMA
from graphpar.training.normalization import build_normalized_model
from graphpar.training.step import (
    DTYPES,
    build_optimizer,
    grad_scaler,
    peak_memory_mb,
    to_device,
    train_step,
)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(config: Mapping, run: str, warmup: int = 3, steps: int = 10) -> dict:
    """Train `warmup` + `steps` steps of `config` on this torchrun world; the result (on every
    rank) in the scaling JSON layout of config/README.md."""
    if warmup < 1 or steps < 1:
        raise TrainingError("scaling: --warmup and --steps must be at least 1")
    config = load_config(config)
    device = setup_processes(config)
    dims = get_dims()
    dtype = DTYPES[config["dtype"]]

    family, _ = model_facts(config)
    dataset, sizes, _ = open_datasets(config, family)
    # Throughput does not depend on the targets' scale: no pass over the data for statistics.
    model = build_normalized_model(config, {"energy_mean": 0.0, "energy_std": 1.0})
    model = model.to(device=device, dtype=dtype).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer, _ = build_optimizer(model, config)
    ema = EMA(model, config["ema_decay"]) if config["ema_decay"] is not None else None
    scaler = grad_scaler(config, device)  # amp float16, as the trainer
    sampler = batch_sampler(config, sizes)
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=collate,
        num_workers=config["num_workers"],
        persistent_workers=config["num_workers"] > 0,
    )
    batches = cycle(loader)  # a tiny dataset is reused; the sampler's order stays fixed

    losses = []

    def step() -> None:
        # The trainer's step, data loading included (no learning-rate warmup: it changes no cost).
        batch = to_device(next(batches), device, dtype)
        losses.append(float(train_step(model, batch, optimizer, config, ema, scaler).loss))

    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seconds = []
    for index in range(steps):
        _synchronize(device)
        started = time.perf_counter()
        if index == 0:
            # Counting slows the step down: it is left out of the timing median below.
            with FlopCounterMode(display=False) as counter:
                step()
            flops = counter.get_total_flops()
        else:
            step()
        _synchronize(device)
        seconds.append(time.perf_counter() - started)
    timed = seconds[1:] or seconds
    step_s = statistics.median(gather_world(statistics.median(timed)))
    flops_per_rank = gather_world(float(flops))
    memory = gather_world(peak_memory_mb(device))

    metadata = [Path(path) / "metadata.json" for path in config["train"]]
    return {
        "run": run,
        "model": config["model"],
        "parameters": sum(p.numel() for p in params),
        "gp_size": dims.gp_size,
        "dp_size": dims.dp_size,
        "batch_size": config["batch_size"],
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "samples_per_s": config["batch_size"] / step_s,
        "peak_memory_mb_per_gpu": max(memory),
        "tflops_per_gpu": statistics.fmean(flops_per_rank) / step_s / 1e12,
        "steps_measured": steps,
        "provenance": {
            "config_hash": config_hash(config),
            "warmup_steps": warmup,
            "step_seconds_median": step_s,
            "flops_per_step_per_rank": flops_per_rank,
            "peak_memory_mb_per_rank": memory,
            # What the trainer keeps besides the weights (tests/test_train.py pins these).
            "optimizer_state_bytes": tensor_bytes(optimizer.state_dict()["state"]),
            "ema_state_bytes": 0 if ema is None else tensor_bytes(ema.shadow),
            "losses": losses,
            "flops_counted_by": "torch.utils.flop_counter.FlopCounterMode, one step per rank",
            "memory_measured_by": (
                "torch.cuda.max_memory_allocated" if device.type == "cuda" else "ru_maxrss"
            ),
            "world_size": dist.get_world_size() if dist.is_initialized() else 1,
            "datasets": [str(path.parent) for path in metadata],
            "dataset_metadata_sha256": [
                sha256_file(path) if path.is_file() else None for path in metadata
            ],
            "git_commit": git_commit(),
            "versions": package_versions(),
            "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        },
    }


def tensor_bytes(value) -> int:
    """Bytes of the tensors in a nested structure of dicts, lists and tuples."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(tensor_bytes(item) for item in value.values())
    if isinstance(value, list | tuple):
        return sum(tensor_bytes(item) for item in value)
    return 0


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m graphpar.scaling",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config_arguments(parser)
    # (No --run: torchrun would take it for an abbreviation of its own --run-path.)
    parser.add_argument("--out", required=True, type=Path, help="the result: <run>.json")
    parser.add_argument("--warmup", type=int, default=3, help="unmeasured steps first")
    parser.add_argument("--steps", type=int, default=10, help="measured steps")
    args = parser.parse_args(argv)
    try:
        result = measure(config_source(args), args.out.stem, args.warmup, args.steps)
    except TrainingError as error:
        sys.exit(f"graphpar.scaling: {error}")
    try:
        if is_main():
            args.out.parent.mkdir(parents=True, exist_ok=True)
            write_json(args.out, result)
            print(json.dumps({k: v for k, v in result.items() if k != "provenance"}))
    finally:
        leave_processes()


if __name__ == "__main__":
    main()
