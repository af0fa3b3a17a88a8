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
the time (`top_ops`) and the shares of the step's device time spent in matrix products,
gathers, scatters and everything else (`time_shares`), both over the aten operations' self
device time (each kernel counted once, under the operation that launched it; the kernels
themselves, listed as `top_kernels`, and annotations such as the optimiser's step are not
counted again).

Before the models, the device's own ceilings are measured (`ceilings`): a 8192 x 8192 x 8192
matrix product on random data in float32, TF32 and bf16 (median of 10 after 3 warm-ups) and a
device-to-device copy (bytes read + written), so a step's rate can be read against what the
card sustains as well as against its datasheet peak. Each run that runs out of memory is
recorded as such and the others go on; the JSON is rewritten after every run, so a run cut
short keeps what it measured.

The memory model of Table 4 (`graphpar.scaling_model`, fitted and peak-factored on this
project's CPU) is checked against each float32 and TF32 run's peak: `memory_model_mb` =
parameters, gradients and AdamW amsgrad's three states (4 bytes each per parameter; this step
keeps no EMA and no gradient buffer) + the gemnet peak factor of
results/benchmarks/memory_model.json x the activations `predict_step` finds kept for backward
on the same batch (meta device). `--memory-model FILE` adds these to an existing record (they
need no GPU).

The scaling model's compute term on the H200 preset comes from this file
(bench/scaling_model.py: `measured_rate`): run

    python bench/gpu_step.py --models gemnet-125m --copies 2 --modes float32 \
        --out results/benchmarks/gpu_step_125m.json

for the rate of the 125M model on the scaling model's batch shape (two structures per group),
in float32 as the paper trained (no AMP; TF32 off, PyTorch's default for products).

Usage:
    python bench/gpu_step.py                           # CUDA: results/benchmarks/gpu_step.json
    python bench/gpu_step.py --models gemnet-dt --copies 8 --repeats 20 --no-ceilings
    python bench/gpu_step.py --memory-model results/benchmarks/gpu_step.json
    python bench/gpu_step.py --device cpu --models gemnet-tiny --copies 1 --repeats 2 \\
        --warmup 1 --ceiling-size 512 --out /tmp/gpu_step.json   # the script, checked on a CPU
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
from machine import cpu_model, step_seconds, synchronize
from triplet_memory import make_batch

from graphpar.io import atomic_path
from graphpar.models import count_parameters
from graphpar.parallel.counting import count_operations
from graphpar.parallel.predict import predict_step
from graphpar.scaling_model import state_bytes
from graphpar.training.config import load_config
from graphpar.training.normalization import build_normalized_model
from graphpar.training.step import build_optimizer, peak_memory_mb, to_device, train_step

BENCHMARKS = Path(__file__).resolve().parents[1] / "results" / "benchmarks"
OUT = BENCHMARKS / "gpu_step.json"
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
# Profiled aten operations by what they do (self device time; the rest is "other").
OP_CLASSES = {
    "matmul": {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_scaled_mm"},
    "gather": {"aten::index_select", "aten::index", "aten::gather", "aten::embedding"},
    "scatter": {
        "aten::index_add_",
        "aten::index_add",
        "aten::index_put_",
        "aten::_index_put_impl_",
        "aten::scatter_add_",
        "aten::scatter_add",
        "aten::scatter_",
        "aten::scatter_reduce_",
        "aten::embedding_dense_backward",
        "aten::index_select_backward",
    },
}


def device_peaks(device: torch.device) -> tuple[str, dict | None]:
    """(the device's name, its PEAKS row or None: no published figure here, e.g. a CPU)."""
    if device.type != "cuda":
        return f"{cpu_model()}, {os.cpu_count()} cores", None
    name = torch.cuda.get_device_name(device)
    return name, next((peaks for key, peaks in PEAKS.items() if key in name), None)


def set_tf32(enabled: bool) -> None:
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled


def ceilings(device: torch.device, size: int = 8192, copy_elements: int = 2**29) -> dict:
    """What the device sustains: a size^3 matrix product on random data by precision
    (TFLOP/s) and a copy of `copy_elements` float32 (2 GiB; GB/s, bytes read + written)."""
    generator = torch.Generator(device).manual_seed(0)
    rates = {}
    for precision, dtype, tf32 in (
        ("float32", torch.float32, False),
        ("tf32", torch.float32, True),
        ("bf16", torch.bfloat16, True),
    ):
        set_tf32(tf32)
        a = torch.randn(size, size, device=device, dtype=dtype, generator=generator)
        b = torch.randn(size, size, device=device, dtype=dtype, generator=generator)
        seconds = statistics.median(step_seconds(lambda a=a, b=b: a @ b, device, 10, warmup=3))
        rates[precision] = 2 * size**3 / seconds / 1e12
    set_tf32(False)
    source = torch.randn(copy_elements, device=device, generator=generator)
    target = torch.empty_like(source)
    seconds = statistics.median(step_seconds(lambda: target.copy_(source), device, 10, warmup=3))
    copy = 2 * source.numel() * source.element_size() / seconds / 1e9
    return {"matmul_tflops": rates, "matmul_size": size, "copy_gb_per_s": copy}


def memory_model_mb(
    model_name: str, batch, activation_checkpointing: bool, peak_factor: float
) -> float:
    """The memory model's peak of one float32 step of `measure` (module docstring), MB."""
    (rank,) = predict_step(
        model_name,
        batch,
        1,
        activation_checkpointing=activation_checkpointing,
        operations=False,
    )
    state = state_bytes(count_parameters(model_name))
    state = sum(bytes_ for key, bytes_ in state.items() if key not in ("ema", "gradient_buffer"))
    return (state + peak_factor * sum(rank.saved_bytes.values())) / 2**20


def add_memory_model(record: dict, batch) -> None:
    """Each float32 and TF32 run of `record` with `memory_model_mb` and its relative error
    (one prediction per model and checkpointing: the two precisions keep the same tensors)."""
    factor = json.loads((BENCHMARKS / "memory_model.json").read_text())["peak_factors"]["gemnet"]
    predictions = {}
    for run in record["runs"]:
        if run.get("precision") in ("float32", "tf32"):
            keys, _, _ = MODES[run["mode"]]
            key = (run["model"], keys.get("activation_checkpointing", False))
            if key not in predictions:
                predictions[key] = memory_model_mb(key[0], batch, key[1], factor)
            predicted = predictions[key]
            run["memory_model_mb"] = predicted
            run["memory_model_error"] = predicted / run["peak_memory_mb"] - 1


def time_shares(events, total_key: str) -> dict:
    """Shares of the profiled self time by `OP_CLASSES` (and "other"), with each class's
    operations and their shares."""
    total = sum(getattr(e, total_key) for e in events) or 1.0
    shares = {name: {"share": 0.0, "ops": {}} for name in (*OP_CLASSES, "other")}
    for event in events:
        name = next((c for c, ops in OP_CLASSES.items() if event.key in ops), "other")
        share = getattr(event, total_key) / total
        shares[name]["share"] += share
        if share >= 0.005:
            shares[name]["ops"][event.key] = share
    return shares


def measure(model_name: str, mode: str, batch, device: torch.device, args) -> dict:
    keys, tf32, precision = MODES[mode]
    set_tf32(tf32)
    config = load_config({"model": model_name, "train": ["unused"], "max_steps": 1, **keys})
    model = build_normalized_model(config, {"energy_mean": 0.0, "energy_std": 1.0}).to(device)
    optimizer, _ = build_optimizer(model, config)
    batch = to_device(batch, device, torch.float32)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seconds = step_seconds(
        lambda: train_step(model, batch, optimizer, config), device, args.repeats, args.warmup
    )
    peak_mb = peak_memory_mb(device)
    synchronize(device)
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
    everything = sorted(profile.key_averages(), key=lambda e: -getattr(e, total_key))
    events = [e for e in everything if e.key.startswith("aten::")]
    kernels = [e for e in everything if e.device_type == torch.autograd.DeviceType.CUDA]
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
        "operations": work.as_dict(),
        "time_shares": time_shares(events, total_key),
        "top_ops": [
            {"op": e.key, "share": getattr(e, total_key) / profiled, "calls": e.count}
            for e in events[: args.top]
        ],
        "top_kernels": [
            {"kernel": e.key[:160], "share": getattr(e, total_key) / profiled, "calls": e.count}
            for e in kernels[: args.top]
        ],
        "profiled_op_seconds": profiled / 1e6,
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
    parser.add_argument(
        "--no-ceilings", action="store_true", help="skip the matrix-product and copy ceilings"
    )
    parser.add_argument(
        "--ceiling-size", type=int, default=8192, help="matrix size of the product ceilings"
    )
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument(
        "--memory-model",
        type=Path,
        metavar="FILE",
        help="add the memory model's predictions to FILE (a record of this script) and stop",
    )
    args = parser.parse_args(argv)
    if args.memory_model:
        record = json.loads(args.memory_model.read_text())
        add_memory_model(record, make_batch(record["batch"]["copies"]))
        write(record, args.memory_model)
        for run in record["runs"]:
            if "memory_model_mb" in run:
                print(
                    f"{run['model']} {run['mode']}: measured {run['peak_memory_mb']:.0f} MB, "
                    f"memory model {run['memory_model_mb']:.0f} MB "
                    f"({run['memory_model_error']:+.1%})"
                )
        return
    device = torch.device(args.device)
    batch = make_batch(args.copies)
    name, peaks = device_peaks(device)
    record = {
        "benchmark": "gpu_step",
        "device": name,
        "peaks_tflops": peaks,
        "ceilings": None
        if args.no_ceilings
        else ceilings(device, args.ceiling_size, 2**29 if device.type == "cuda" else 2**24),
        "batch": {
            "copies": args.copies,
            "atoms": int(batch.pos.size(0)),
            "edges": int(batch.edge_index.size(1)),
        },
        "torch": torch.__version__,
        "python": platform.python_version(),
        "summary": None,
        "runs": [],
    }
    if record["ceilings"]:
        print(json.dumps(record["ceilings"]), flush=True)
    runs = record["runs"]
    for model_name in args.models:
        for mode in args.modes:
            started = time.perf_counter()
            try:
                run = measure(model_name, mode, batch, device, args)
            except torch.OutOfMemoryError as error:
                set_tf32(False)
                run = {"model": model_name, "mode": mode, "error": f"out of memory: {error}"}
            run["parameters"] = count_parameters(model_name)
            run["seconds"] = time.perf_counter() - started
            runs.append(run)
            print(
                f"{model_name} {mode}: "
                + (
                    run.get("error", "")[:80]
                    or f"{run['samples_per_s']:.2f} samples/s, {run['tflops']:.2f} TFLOP/s, "
                    f"{run['peak_memory_mb']:.0f} MB"
                )
                + f" ({run['seconds']:.0f} s)",
                flush=True,
            )
            if device.type == "cuda":
                torch.cuda.empty_cache()
            write(record, args.out)
    if device.type == "cuda":
        add_memory_model(record, batch)
        write(record, args.out)
    print(json.dumps(record["summary"]))


def write(record: dict, path: Path) -> None:
    """`record` with its summary brought up to date, written atomically to `path`."""
    record["summary"] = summary(record)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(record, indent=2) + "\n")


def summary(record: dict) -> dict:
    """The benchmarks' summary keys: the best fraction of the dense peak over the runs so far
    (any precision) against the paper's 25%; then the best in a tensor-core precision (TF32,
    bf16), the runs that failed, and the memory model's largest error."""
    runs = record["runs"]
    measured = [r for r in runs if r.get("fraction_of_peak") is not None]
    best = max(measured, key=lambda r: r["fraction_of_peak"], default=None)
    tensor = [r for r in measured if r["precision"] != "float32"]
    best_tensor = max(tensor, key=lambda r: r["fraction_of_peak"], default=None)
    ours = None if best is None else best["fraction_of_peak"]
    return {
        "metric": "sustained matrix-product TFLOP/s of a training step (G = 1) / the device's "
        "dense datasheet peak in the precision its products ran in, best run",
        "ours": ours,
        "baseline": GOAL,
        "baseline_name": "paper section 4.5: 32 TFLOP/s, ~25% of the V100's 125 TFLOP/s "
        "tensor-core peak",
        "ratio": None if ours is None else ours / GOAL,
        "goal": GOAL,
        "higher_is_better": True,
        "machine": f"{record['device']}, torch {record['torch']}",
        "best": None if best is None else f"{best['model']} {best['mode']}",
        "best_tflops": None if best is None else best["tflops"],
        "best_tensor_core": None
        if best_tensor is None
        else f"{best_tensor['model']} {best_tensor['mode']}: {best_tensor['tflops']:.1f} TFLOP/s, "
        f"{best_tensor['fraction_of_peak']:.1%} of {best_tensor['peak_tflops']:g}",
        "goal_met": ours is not None and ours >= GOAL,
        "failed": [f"{r['model']} {r['mode']}" for r in runs if "error" in r],
        "memory_model_largest_error": max(
            (abs(r["memory_model_error"]) for r in runs if "memory_model_error" in r),
            default=None,
        ),
    }


if __name__ == "__main__":
    main()
