"""Loader throughput with graphs built on the fly: samples/s from the training DataLoader with
N workers on OC20-like slabs, against the same loader over stored graphs, and how many workers
feed one GPU at GemNet-dT's and GemNet-XL's step times.

The data: `--frames` OC20-like slabs (~73 atoms, bench/preprocess.py's `make_structures`)
written as an S2EF directory and preprocessed twice by `graphpar.preprocess.preprocess`
(cutoff 6 A, 50 neighbours): storage on_the_fly (the loader builds graph and triplets) and
storage graphs without triplets (the loader builds the triplets). Each run iterates one epoch
of

    DataLoader(LmdbDataset(path, triplets=(family,)), batch_sampler=BalancedBatchSampler(
        dataset.sizes(f"triplets_{family}"), batch_size, seed=0), collate_fn=collate,
        num_workers=N)

for N in `--workers`, family in dimenetpp and gemnet, both storage modes (the same batches:
same sizes, same seed). Samples/s are counted from the first batch on (worker start-up left
out, reported apart), medians over `--repeats` interleaved rounds after a warm-up. The main
process runs one torch thread; DataLoader workers run one each.

Every rank of a G-way graph-parallel group loads the same batch and builds its graph itself
(G builds per group), so each rank's loader must deliver the whole group's batch per step.
Required rates come from published training costs (paper.md; estimates, see `requirements`).

Usage:
    python bench/loader.py
    python bench/loader.py --frames 128 --repeats 1 --workers 0 1   # quick
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from machine import cpu_model
from preprocess import CUTOFF, MAX_NEIGHBORS, cpu_seconds, make_structures, write_s2ef
from threadpoolctl import threadpool_limits

from graphpar.data.dataset import BalancedBatchSampler, LmdbDataset, collate
from graphpar.preprocess import preprocess

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "results" / "benchmarks" / "loader.json"
FAMILIES = ("dimenetpp", "gemnet")
STORAGE = {
    "on_the_fly": {"storage": "on_the_fly", "store_triplets": "never"},
    "graphs": {"storage": "graphs", "store_triplets": "never"},
}
S2EF_ALL = 133_934_018  # frames (src/graphpar/data/oc20.py CATALOGUE)
DAY = 86_400


def shown(path: Path) -> str:
    """`path` relative to the repository when inside it: the committed results name no
    machine's folders."""
    path = path.resolve()
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def requirements() -> dict:
    """Samples/s each GPU's loader must deliver, from the paper's training costs.

    Estimates: the paper gives GPU-days (Table 1) but not the epochs they covered, so rates are
    per epoch of S2EF-All per GPU-days budget (E = 1) and scale linearly with E."""
    dt_gpu_days, xl_gpu_days, xl_gpus, xl_gp, xl_batch = 47, 1962, 256, 4, 128
    dt_rate = S2EF_ALL / (dt_gpu_days * DAY)  # samples/s per GPU (data parallel only)
    xl_groups = xl_gpus // xl_gp
    xl_wall = xl_gpu_days * DAY / xl_gpus  # seconds of the 256-GPU run
    xl_step = xl_wall / (S2EF_ALL / xl_batch)  # seconds per step at E = 1
    xl_group_batch = xl_batch // xl_groups
    return {
        "gemnet-dt": {
            "source": "paper Table 1 (GemNet-T, 31M = fairchem's GemNet-dT): 47 GPU-days on "
            "S2EF-All (V100); batch 32 per GPU and num_workers 2 from fairchem "
            "configs/s2ef/all/gemnet/gemnet-dT.yml",
            "estimate": True,
            "batch_per_gpu": 32,
            "configured_workers_per_gpu": 2,
            "samples_per_s_per_gpu_at_1_epoch": dt_rate,
            "step_seconds_at_1_epoch": 32 / dt_rate,
            "graph_builds_per_sample": 1,
        },
        "gemnet-xl": {
            "source": "paper Table 1: 1962 GPU-days on S2EF-All; 256 V100s, 4-way graph x "
            "64-way data parallel, global batch 128 (paper section 4.1, config/paper/"
            "gemnet-xl.yaml: 2 per data-parallel group, num_workers 8)",
            "estimate": True,
            "batch_per_group": xl_group_batch,
            "gp_size": xl_gp,
            "configured_workers_per_gpu": 8,
            "step_seconds_at_1_epoch": xl_step,
            # Each rank loads (and builds) the group's whole batch every step.
            "samples_per_s_per_gpu_at_1_epoch": xl_group_batch / xl_step,
            "graph_builds_per_sample": xl_gp,
        },
    }


def build_datasets(frames: int, seed: int, workdir: Path) -> dict[str, Path]:
    structures = make_structures(frames, seed)
    source = workdir / "s2ef"
    write_s2ef(structures, source, frames_per_file=128)
    paths = {}
    for name, settings in STORAGE.items():
        paths[name] = workdir / name
        preprocess(
            source,
            paths[name],
            workers=1,
            progress=False,
            cutoff=CUTOFF,
            max_neighbors=MAX_NEIGHBORS,
            ref_energy=True,
            **settings,
        )
    return paths


def main_cpu_seconds() -> float:
    """CPU seconds of this (the main) process alone."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def one_epoch(path: Path, family: str, workers: int, batch_size: int) -> dict:
    """One epoch through the training loader: seconds to the first batch, then samples/s."""
    dataset = LmdbDataset(path, triplets=(family,))
    sampler = BalancedBatchSampler(dataset.sizes(f"triplets_{family}"), batch_size, seed=0)
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=sampler, collate_fn=collate, num_workers=workers
    )
    start, start_cpu, start_main = time.perf_counter(), cpu_seconds(), main_cpu_seconds()
    first = None
    samples = total = 0
    for batch in loader:
        total += int(batch.num_graphs)
        if first is None:
            first = time.perf_counter()
        else:
            samples += int(batch.num_graphs)
    end = time.perf_counter()
    del loader  # workers joined: their CPU time is counted
    cpu, main_cpu = cpu_seconds() - start_cpu, main_cpu_seconds() - start_main
    return {
        "first_batch_s": first - start,
        "samples": samples,
        "seconds": end - first,
        "cpu_ms_per_sample": 1e3 * cpu / total,
        "main_process_cpu_ms_per_sample": 1e3 * main_cpu / total,
    }


def breakdown(path: Path, family: str, batch_size: int) -> dict:
    """In this process: CPU ms per sample in `LmdbDataset.__getitem__` (read, decode, graph and
    triplets as needed) and in `collate`, over the same batches as `one_epoch`."""
    dataset = LmdbDataset(path, triplets=(family,))
    sampler = BalancedBatchSampler(dataset.sizes(f"triplets_{family}"), batch_size, seed=0)
    getitem = collating = 0.0
    for indices in sampler:
        start = cpu_seconds()
        samples = [dataset[i] for i in indices]
        middle = cpu_seconds()
        collate(samples)
        getitem += middle - start
        collating += cpu_seconds() - middle
    return {
        "getitem_ms": 1e3 * getitem / len(dataset),
        "collate_ms": 1e3 * collating / len(dataset),
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--frames", type=int, default=384, help="frames in each dataset")
    parser.add_argument("--batch-size", type=int, default=8, help="samples per batch")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2], help="N values")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds (median)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)

    torch.set_num_threads(1)
    load_before = os.getloadavg()
    configs = [
        (family, workers, storage)
        for family in FAMILIES
        for workers in args.workers
        for storage in STORAGE
    ]
    runs = {config: [] for config in configs}
    with tempfile.TemporaryDirectory(prefix="bench-loader-") as tmp, threadpool_limits(1):
        paths = build_datasets(args.frames, args.seed, Path(tmp))
        meta = LmdbDataset(paths["on_the_fly"]).metadata
        for family in FAMILIES:  # warm-up (imports, page cache)
            for storage in STORAGE:
                one_epoch(paths[storage], family, 0, args.batch_size)
        parts = {(family, storage): [] for family in FAMILIES for storage in STORAGE}
        for _ in range(args.repeats):
            for family, workers, storage in configs:
                runs[family, workers, storage].append(
                    one_epoch(paths[storage], family, workers, args.batch_size)
                )
            for family, storage in parts:
                parts[family, storage].append(breakdown(paths[storage], family, args.batch_size))
        sizes = {
            cost: float(np.mean(LmdbDataset(paths["on_the_fly"]).sizes(cost)))
            for cost in ("atoms", "edges", "triplets_dimenetpp", "triplets_gemnet")
        }

    results = {}
    for (family, workers, storage), values in runs.items():
        rates = [v["samples"] / v["seconds"] for v in values]
        results.setdefault(family, {}).setdefault(storage, {})[f"N={workers}"] = {
            "samples_per_s": statistics.median(rates),
            "samples_per_s_per_repeat": rates,
            "first_batch_s": statistics.median(v["first_batch_s"] for v in values),
            "cpu_ms_per_sample": statistics.median(v["cpu_ms_per_sample"] for v in values),
            "main_process_cpu_ms_per_sample": statistics.median(
                v["main_process_cpu_ms_per_sample"] for v in values
            ),
        }
        print(
            f"{family:9s} {storage:10s} N={workers}  {statistics.median(rates):8.1f} samples/s "
            f"(first batch after {results[family][storage][f'N={workers}']['first_batch_s']:.2f} s)"
        )

    for (family, storage), values in parts.items():
        cost = {k: statistics.median(v[k] for v in values) for k in values[0]}
        results[family][storage]["per_sample_ms_in_process"] = cost
        print(
            f"{family:9s} {storage:10s} per sample: __getitem__ {cost['getitem_ms']:.2f} ms, "
            f"collate {cost['collate_ms']:.2f} ms"
        )

    # Per-worker rate, N = 1 (N = 0 is the main process doing the work): samples per CPU second
    # of worker and main process together (the cost per core, which other processes on the
    # machine do not change; it counts the batch's transfer to the main process) and, for
    # reference, the wall-clock samples/s.
    one = "N=1" if 1 in args.workers else f"N={args.workers[0]}"
    per_worker = {
        family: 1e3 / results[family]["on_the_fly"][one]["cpu_ms_per_sample"] for family in FAMILIES
    }
    per_worker_wall = {
        family: results[family]["on_the_fly"][one]["samples_per_s"] for family in FAMILIES
    }
    for family in FAMILIES:
        print(
            f"{family:9s} on_the_fly, {one}: {per_worker[family]:.1f} samples per CPU second "
            f"(wall {per_worker_wall[family]:.1f} samples/s)"
        )
    need = requirements()
    feeding = {}
    for model, req in need.items():
        rate = per_worker["gemnet"]
        required = req["samples_per_s_per_gpu_at_1_epoch"]
        feeding[model] = {
            "on_the_fly_gemnet_samples_per_cpu_s": rate,
            "on_the_fly_gemnet_wall_samples_per_s_one_worker": per_worker_wall["gemnet"],
            "required_samples_per_s_per_gpu_at_1_epoch": required,
            "workers_per_gpu_at_1_epoch": required / rate,
            "epochs_fed_by_configured_workers": req["configured_workers_per_gpu"] * rate / required,
        }
        print(
            f"{model}: needs {required:.1f} samples/s per GPU per epoch of S2EF-All in the paper's "
            f"GPU-days (step {req['step_seconds_at_1_epoch']:.2f} s at 1 epoch); one on-the-fly "
            f"worker gives {rate:.1f}: {required / rate:.2f} workers per GPU per epoch; its "
            f"{req['configured_workers_per_gpu']} configured workers keep up with "
            f"{feeding[model]['epochs_fed_by_configured_workers']:.1f} epochs"
        )
    print(
        "every rank of a G-way graph-parallel group loads the group's whole batch and builds its "
        "graph itself (G builds per group): GemNet-XL's per-rank rate is the group's batch per step"
    )

    report = {
        "benchmark": "loader",
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
        "command": " ".join(["python", "bench/loader.py", *sys.argv[1:]]),
        "settings": {
            **{k: (shown(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "cutoff": CUTOFF,
            "max_neighbors": MAX_NEIGHBORS,
            "storage": STORAGE,
            "metadata_storage": meta.get("storage"),
            "mean_per_sample": sizes,
            "graph_parallel_note": (
                "every rank of a G-way graph-parallel group loads the same (whole) batch and "
                "builds its graph and triplets itself: G builds per group per step"
            ),
        },
        "results": results,
        "per_worker_samples_per_cpu_s": per_worker,
        "per_worker_wall_samples_per_s": per_worker_wall,
        "requirements": need,
        "feeding": feeding,
        "summary": {
            "metric": (
                "on-the-fly loader samples per CPU second, one worker (GemNet triplets, ~73-atom "
                "slabs; worker + main process CPU) over "
                "the samples/s one GPU needs for GemNet-dT (47 GPU-days per epoch of S2EF-All, "
                "an estimate); goal: one worker feeds one GPU"
            ),
            "ours": per_worker["gemnet"],
            "baseline": need["gemnet-dt"]["samples_per_s_per_gpu_at_1_epoch"],
            "baseline_name": "GemNet-dT's samples/s per GPU at 1 epoch in 47 GPU-days",
            "ratio": per_worker["gemnet"] / need["gemnet-dt"]["samples_per_s_per_gpu_at_1_epoch"],
            "goal": 1.0,
            "higher_is_better": True,
            "machine": (
                f"{cpu_model()}, {os.cpu_count()} cores, 1 torch thread per process, torch "
                f"{torch.__version__}, load average {load_before[0]:.2f} before / "
                f"{os.getloadavg()[0]:.2f} after"
            ),
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
