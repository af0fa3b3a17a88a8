"""Throughput of one G x D layout for the paper's scaling study (Table 4, Fig. 2): samples/s,
peak memory per GPU (rank) and TFLOP/s per GPU of real training steps.

A scaling run is a training config (src/graphpar/schemas/train.schema.yaml: model, gp_size,
dp_size, batch_size, train, ...) run for `--warmup` + `--steps` optimiser steps with the trainer's
own pieces (process groups, balanced sampler, loss, gradient synchronisation, AdamW); nothing is
written but the result:

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
import hashlib
import json
import math
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
from graphpar.evaluate import git_commit, package_versions
from graphpar.io import write_json
from graphpar.models import build_model, scale_shared_gradients
from graphpar.parallel import get_dims, sync_gradients
from graphpar.train import (
    TrainingError,
    batch_sampler,
    build_normalized_model,
    config_hash,
    gather_world,
    leave_processes,
    load_config,
    loss_terms,
    open_datasets,
    peak_memory_mb,
    setup_processes,
    to_device,
    triplet_kind,
)

PACKAGES = ("graphpar", "torch", "torch-geometric", "numpy")


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
    dtype = torch.float64 if config["dtype"] == "float64" else torch.float32

    probe = build_model(config["model"], **config["model_args"])
    dataset, sizes, parts = open_datasets(config, triplet_kind(probe))
    del probe
    # Throughput does not depend on the targets' scale: no pass over the data for statistics.
    model = build_normalized_model(config, {"energy_mean": 0.0, "energy_std": 1.0})
    model = model.to(device=device, dtype=dtype).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config["optimizer"]["lr"])
    sampler = batch_sampler(config, sizes)
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=collate,
        num_workers=config["num_workers"],
        persistent_workers=config["num_workers"] > 0,
    )
    batches = cycle(loader)  # a tiny dataset is reused; the sampler's order stays fixed

    def step() -> None:
        # The trainer's step (graphpar.train.train), without logging or checks.
        batch = to_device(next(batches), device, dtype)
        optimizer.zero_grad(set_to_none=True)
        energy_term, force_term, _ = loss_terms(model(batch), batch, model, config)
        loss = config["loss"]["energy_coefficient"] * energy_term
        if force_term is not None:
            loss = loss + config["loss"]["force_coefficient"] * force_term
        (loss * dims.dp_size).backward()
        sync_gradients(model)
        if config["shared_gradient_scaling"]:
            scale_shared_gradients(model.model)
        clip = config["clip_grad_norm"]
        torch.nn.utils.clip_grad_norm_(params, clip if clip else math.inf)
        optimizer.step()

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
            "flops_counted_by": "torch.utils.flop_counter.FlopCounterMode, one step per rank",
            "memory_measured_by": (
                "torch.cuda.max_memory_allocated" if device.type == "cuda" else "ru_maxrss"
            ),
            "world_size": dist.get_world_size() if dist.is_initialized() else 1,
            "datasets": [str(path.parent) for path in metadata],
            "dataset_metadata_sha256": [
                hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None
                for path in metadata
            ],
            "git_commit": git_commit(),
            "versions": package_versions(PACKAGES),
            "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        },
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m graphpar.scaling", description=__doc__)
    parser.add_argument("--config-json", required=True, help="the run's training config (JSON)")
    # (No --run: torchrun would take it for an abbreviation of its own --run-path.)
    parser.add_argument("--out", required=True, type=Path, help="the result: <run>.json")
    parser.add_argument("--warmup", type=int, default=3, help="unmeasured steps first")
    parser.add_argument("--steps", type=int, default=10, help="measured steps")
    args = parser.parse_args(argv)
    try:
        result = measure(json.loads(args.config_json), args.out.stem, args.warmup, args.steps)
    except TrainingError as error:
        sys.exit(f"graphpar.scaling: {error}")
    try:
        if not dist.is_initialized() or dist.get_rank() == 0:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            write_json(args.out, result)
            print(json.dumps({k: v for k, v in result.items() if k != "provenance"}))
    finally:
        leave_processes()


if __name__ == "__main__":
    main()
