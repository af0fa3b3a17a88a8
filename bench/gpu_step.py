"""Training-step throughput of GemNet at G = 1 on one GPU, by precision (issue 18, item 7).

GemNet-dT (31.7M) and GemNet-XL, each on an OC20-size batch (copies of bench/triplet_memory.py's
73-atom slab, 6 A, 50 neighbours), through the trainer's own `train_step` (forward with direct
forces, loss, backward, AdamW; the recipe's defaults), in four modes:

* `float32`: float32 products on the CUDA cores (TF32 off);
* `tf32`: float32 with TF32 tensor-core products (torch.backends.*.allow_tf32);
* `bf16`: the training key `amp: bfloat16` (autocast; float32 weights and optimiser);
* `bf16+checkpointing`: the same with `activation_checkpointing: true`.

For each: samples/s (median over `--repeats` timed steps after `--warmup`, synchronised), peak
memory (torch.cuda.max_memory_allocated; peak RSS on the CPU), the step's matrix-product FLOPs
(`graphpar.parallel.counting.count_operations` over one extra step: the model's own FLOPs, so
recomputation under checkpointing is not credited), sustained TFLOP/s = those FLOPs / median
step time, and its fraction of the device's dense peak in the precision the products ran in
(`PEAKS`, NVIDIA datasheets; the paper's "25%" is 32 TFLOP/s of the V100's 125 TFLOP/s
tensor-core peak). The bytes gathers and scatters move (same counter) over the step time give
their achieved bandwidth, and one profiled step (torch.profiler) names the operations that take
the time, gathers and scatters among them (`top_ops`).

Usage:
    python bench/gpu_step.py                           # CUDA: results/benchmarks/gpu_step.json
    python bench/gpu_step.py --models gemnet-dt --copies 8 --repeats 20
    python bench/gpu_step.py --device cpu --models gemnet-tiny --copies 1 --repeats 2 \\
        --warmup 1 --out /tmp/gpu_step.json             # the script itself, checked on a CPU
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
from machine import cpu_model
from triplet_memory import make_batch

from graphpar.io import atomic_path
from graphpar.models import count_parameters
from graphpar.parallel.counting import count_operations
from graphpar.training.config import load_config
from graphpar.training.normalization import build_normalized_model
from graphpar.training.step import build_optimizer, peak_memory_mb, to_device, train_step

OUT = Path(__file__).resolve().parents[1] / "results" / "benchmarks" / "gpu_step.json"
# Dense peak TFLOP/s by precision of the products: NVIDIA's datasheets (V100 SXM2; A100 SXM 80GB;
# H100 SXM and H200 SXM, the same GH100 chip: their tensor figures are printed "with sparsity",
# halved here). V100 has no TF32 or bfloat16 tensor cores: those modes run at its float32 rate.
PEAKS = {
    "V100": {"float32": 15.7, "tf32": 15.7, "bf16": 15.7, "fp16": 125.0},
    "A100": {"float32": 19.5, "tf32": 156.0, "bf16": 312.0, "fp16": 312.0},
    "H100": {"float32": 67.0, "tf32": 494.7, "bf16": 989.4, "fp16": 989.4},
    "H200": {"float32": 67.0, "tf32": 494.7, "bf16": 989.4, "fp16": 989.4},
}
# mode -> (training config keys, TF32 on, the precision the products run in)
MODES = {
    "float32": ({}, False, "float32"),
    "tf32": ({}, True, "tf32"),
    "bf16": ({"amp": "bfloat16"}, True, "bf16"),
    "bf16+checkpointing": ({"amp": "bfloat16", "activation_checkpointing": True}, True, "bf16"),
}
GOAL = 0.25  # of the dense peak, in some mode (the paper's V100 figure)


def device_peaks(device: torch.device) -> tuple[str, dict | None]:
    """(the device's name, its PEAKS row or None: no published figure here, e.g. a CPU)."""
    if device.type != "cuda":
        return f"{cpu_model()}, {os.cpu_count()} cores", None
    name = torch.cuda.get_device_name(device)
    return name, next((peaks for key, peaks in PEAKS.items() if key in name), None)


def set_tf32(enabled: bool) -> None:
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(model_name: str, mode: str, batch, device: torch.device, args) -> dict:
    keys, tf32, precision = MODES[mode]
    set_tf32(tf32)
    config = load_config({"model": model_name, "train": ["unused"], "max_steps": 1, **keys})
    model = build_normalized_model(config, {"energy_mean": 0.0, "energy_std": 1.0}).to(device)
    optimizer, _ = build_optimizer(model, config)
    batch = to_device(batch, device, torch.float32)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(args.warmup):
        train_step(model, batch, optimizer, config)
    seconds = []
    for _ in range(args.repeats):
        synchronize(device)
        start = time.perf_counter()
        train_step(model, batch, optimizer, config)
        synchronize(device)
        seconds.append(time.perf_counter() - start)
    peak_mb = peak_memory_mb(device)
    with count_operations() as work:
        train_step(model, batch, optimizer, config)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as profile:
        train_step(model, batch, optimizer, config)
        synchronize(device)
    step = statistics.median(seconds)
    total_key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events = sorted(profile.key_averages(), key=lambda e: -getattr(e, total_key))
    profiled = sum(getattr(e, total_key) for e in events) or 1.0
    name, peaks = device_peaks(device)
    tflops = work.matmul_flops / step / 1e12
    set_tf32(False)
    return {
        "model": model_name,
        "mode": mode,
        "precision": precision,
        "samples_per_s": batch.num_graphs / step,
        "step_s_median": step,
        "step_s": seconds,
        "peak_memory_mb": peak_mb,
        "matmul_flops": work.matmul_flops,
        "tflops": tflops,
        "peak_tflops": None if peaks is None else peaks[precision],
        "fraction_of_peak": None if peaks is None else tflops / peaks[precision],
        "gather_scatter_bytes": work.gather_bytes + work.scatter_bytes,
        "gather_scatter_gb_per_s": (work.gather_bytes + work.scatter_bytes) / step / 1e9,
        "index_ops_elements": dict(work.by_op),
        "top_ops": [
            {"op": e.key, "share": getattr(e, total_key) / profiled, "calls": e.count}
            for e in events[: args.top]
        ],
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["gemnet-dt", "gemnet-xl"])
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    parser.add_argument("--copies", type=int, default=8, help="73-atom slabs per batch")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--top", type=int, default=12, help="profiled operations kept")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    batch = make_batch(args.copies)
    runs = []
    for model_name in args.models:
        for mode in args.modes:
            started = time.perf_counter()
            runs.append(measure(model_name, mode, batch, device, args))
            runs[-1]["parameters"] = count_parameters(model_name)
            print(
                f"{model_name} {mode}: {runs[-1]['samples_per_s']:.2f} samples/s, "
                f"{runs[-1]['tflops']:.2f} TFLOP/s, {runs[-1]['peak_memory_mb']:.0f} MB "
                f"({time.perf_counter() - started:.0f} s)",
                flush=True,
            )
            if device.type == "cuda":
                torch.cuda.empty_cache()
    name, peaks = device_peaks(device)
    fractions = [r["fraction_of_peak"] for r in runs if r["fraction_of_peak"] is not None]
    best = max(runs, key=lambda r: r["fraction_of_peak"] or 0.0)
    record = {
        "benchmark": "gpu_step",
        "device": name,
        "peaks_tflops": peaks,
        "batch": {
            "copies": args.copies,
            "atoms": int(batch.pos.size(0)),
            "edges": int(batch.edge_index.size(1)),
        },
        "torch": torch.__version__,
        "python": platform.python_version(),
        "summary": {
            "best_fraction_of_peak": max(fractions) if fractions else None,
            "best": f"{best['model']} {best['mode']}",
            "goal": GOAL,
            "goal_met": bool(fractions) and max(fractions) >= GOAL,
        },
        "runs": runs,
    }
    with atomic_path(args.out) as tmp:
        tmp.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record["summary"]))


if __name__ == "__main__":
    main()
