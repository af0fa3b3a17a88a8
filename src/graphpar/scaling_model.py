"""A performance model of the paper's weak-scaling study (Fig. 2a) and a memory model of its
Table 4, from shapes alone: no GPU is needed, and nothing here is fitted to the paper's
efficiencies (79% on 8 GPUs graph parallel, 75% on 32 GPUs data parallel, 47% on 256 GPUs
graph x data parallel), which the model predicts.

`graphpar.scaling` measures real training steps on GPUs (`python -m graphpar.scaling`); this
module predicts them. The inputs are what `graphpar.parallel.predict.predict_step` counts per
rank on the meta device (matrix-product FLOPs, gather/scatter and element-wise traffic, every
collective with its payload, activations kept for backward) and the hardware figures of
`PRESETS` (vendor specifications, each with its source). `bench/scaling_model.py` runs it
on OC20-like batches and writes `results/benchmarks/{scaling,memory}_model.json`.

Vocabulary: G = graph-parallel size (ranks sharing one graph, one node), D = data-parallel
size, W = G x D GPUs; a *group* is the G ranks of one graph.

**Step time** of one rank r of a group, in seconds:

    t_r = matmul_flops_r / F  +  memory_bytes_r / B_mem  +  sum over its G-way collectives c of
          (latency(c) + ring_send_bytes_c / B_link)

where memory_bytes = gather bytes + scatter bytes + 2 x element size x other elements (one read
and one write per element of every other, element-wise, result). The group's step is the
slowest rank's (`group_seconds`: every collective synchronises the group). With D > 1 the
step is the slowest of the D groups on their own batches (the sampler's split of a global
batch) plus the gradient all-reduce that backward does not hide (`gradient_seconds`).

**Efficiency** (`weak_scaling_efficiency`): per-GPU throughput in useful FLOP/s, relative to
the 1-GPU run of the smallest model: (U_W / (W x t_W)) / (U_1 / t_1), where U is the matrix-
product FLOPs of a serial (G = 1) step of that model on the same batches (work duplicated on
graph-parallel ranks is not useful work) and t the expected step time. This is how the paper's
Fig. 2b (TFLOP/s) and its 47% relate: 3.5 PFLOP/s on 256 GPUs = 13.7 TFLOP/s per GPU, 43% of
the 32 TFLOP/s of one GPU.

**Memory** per rank (`memory_bytes`): parameters, gradients, AdamW (amsgrad: exp_avg,
exp_avg_sq, max_exp_avg_sq), the EMA copy and the flat gradient buffer of the all-reduce
(`STATE_COPIES`, 4 bytes each per parameter in float32), plus activations =
`peak_factor` x (bytes per triplet x the rank's triplets + bytes per edge x its edges + bytes
per gathered edge x all edges + bytes per atom x atoms), the coefficients fitted by
`fit_activation_coefficients`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace

import numpy as np

__all__ = [
    "GPU_BYTES",
    "Hardware",
    "PRESETS",
    "STATE_COPIES",
    "collective_seconds",
    "compute_seconds",
    "fit_activation_coefficients",
    "fit_linear",
    "gradient_seconds",
    "group_seconds",
    "memory_bytes",
    "minimal_gp_size",
    "ring_allreduce_seconds",
    "ring_seconds",
    "usable_bytes",
    "weak_scaling_efficiency",
]

GB = 1e9
GiB = 2**30


@dataclass(frozen=True)
class Hardware:
    """One GPU cluster. Rates in SI units: FLOP/s, bytes/s (per direction), seconds."""

    name: str
    gpu: str
    memory_bytes: float  # device memory
    peak_flops: float  # dense tensor-core peak of the precision the paper's 25% refers to
    matmul_flops: float  # sustained rate of matrix products (F; see `calibrate`)
    memory_bandwidth: float  # HBM, bytes/s (B_mem)
    nvlink_bandwidth: float  # per GPU per direction, bytes/s (B_link inside a node)
    gpus_per_node: int
    network_bandwidth: float  # InfiniBand per node per direction, bytes/s (all its NICs)
    nvlink_latency: float = 2e-6  # per ring step (assumed order of magnitude)
    network_latency: float = 5e-6  # per ring step across nodes (assumed order of magnitude)
    sources: Mapping[str, str] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)


V100_DATASHEET = (
    "NVIDIA Tesla V100 datasheet (SXM2 32 GB: 125 TFLOP/s tensor, 900 GB/s HBM2, NVLink 300 "
    "GB/s), https://images.nvidia.com/content/technologies/volta/pdf/"
    "tesla-volta-v100-datasheet-letter-fnl-web.pdf"
)
DGX1_WHITEPAPER = (
    "NVIDIA DGX-1 System Architecture white paper WP-08437-001 (8 V100 in an NVLink hybrid "
    "cube-mesh, four 100 Gb/s EDR InfiniBand NICs), https://images.nvidia.com/content/pdf/"
    "dgx1-v100-system-architecture-whitepaper.pdf"
)
A100_DATASHEET = (
    "NVIDIA A100 datasheet (SXM 80 GB: 312 TFLOP/s dense BF16 tensor, 2039 GB/s HBM2e, NVLink "
    "600 GB/s), https://www.nvidia.com/content/dam/en-zz/Solutions/Data-Center/a100/pdf/"
    "nvidia-a100-datasheet-us-nvidia-1758950-r4-web.pdf; DGX A100 datasheet (8 x 200 Gb/s HDR "
    "InfiniBand for compute), https://www.nvidia.com/content/dam/en-zz/Solutions/"
    "Data-Center/nvidia-dgx-a100-datasheet.pdf"
)
H100_DATASHEET = (
    "NVIDIA H100 datasheet (SXM 80 GB: 989 TFLOP/s dense BF16 tensor, 3.35 TB/s HBM3, NVLink "
    "900 GB/s), https://resources.nvidia.com/en-us-tensor-core/nvidia-tensor-core-gpu-datasheet; "
    "DGX H100 (8 x 400 Gb/s NDR ConnectX-7), https://docs.nvidia.com/dgx/dgxh100-user-guide/"
    "introduction-to-dgxh100.html"
)
H200_DATASHEET = (
    "NVIDIA H200 datasheet (SXM 141 GB: 989 TFLOP/s dense BF16 tensor, 4.8 TB/s HBM3e, NVLink "
    "900 GB/s), https://www.nvidia.com/en-us/data-center/h200/; DGX H200 (8 x 400 Gb/s NDR "
    "ConnectX-7), https://www.nvidia.com/en-us/data-center/dgx-h200/"
)
PAPER_RATE = (
    "Sriram et al. 2022, section 4.5: the 120M GemNet-T sustains 32 TFLOP/s on one V100, "
    "about 25% of its peak (125 TFLOP/s tensor)"
)

# matmul_flops are placeholders here: `calibrate` sets them from the paper's 32 TFLOP/s.
PRESETS: dict[str, Hardware] = {
    "v100-dgx1": Hardware(
        name="v100-dgx1",
        gpu="V100 SXM2 32 GB",
        memory_bytes=32 * GiB,
        peak_flops=125e12,
        matmul_flops=32e12,
        memory_bandwidth=900 * GB,
        nvlink_bandwidth=150 * GB,
        gpus_per_node=8,
        network_bandwidth=4 * 100e9 / 8,
        sources={
            "gpu": V100_DATASHEET,
            "node": DGX1_WHITEPAPER,
            "rate": PAPER_RATE,
            "cluster": "the paper names 32 GB V100s (section 4.1, 6) and one node for G = 8 "
            "(Table 4); FAIR papers of the time name DGX-1 nodes of 8 x 32 GB V100 with "
            "InfiniBand (Liu et al. 2019, RoBERTa, section 3.1): assumed here",
        },
    ),
    "v100-1nic": Hardware(
        name="v100-1nic",
        gpu="V100 SXM2 32 GB",
        memory_bytes=32 * GiB,
        peak_flops=125e12,
        matmul_flops=32e12,
        memory_bandwidth=900 * GB,
        nvlink_bandwidth=150 * GB,
        gpus_per_node=8,
        network_bandwidth=100e9 / 8,
        sources={
            "gpu": V100_DATASHEET,
            "node": "as v100-dgx1 but a single 100 Gb/s EDR InfiniBand NIC per node (issue "
            "18's reading of the paper's cluster; the paper states no network)",
            "rate": PAPER_RATE,
        },
    ),
    "a100": Hardware(
        name="a100",
        gpu="A100 SXM 80 GB",
        memory_bytes=80 * GiB,
        peak_flops=312e12,
        matmul_flops=0.0,
        memory_bandwidth=2039 * GB,
        nvlink_bandwidth=300 * GB,
        gpus_per_node=8,
        network_bandwidth=8 * 200e9 / 8,
        sources={"gpu": A100_DATASHEET, "rate": "V100's calibrated fraction of peak"},
    ),
    "h100": Hardware(
        name="h100",
        gpu="H100 SXM 80 GB",
        memory_bytes=80 * GiB,
        peak_flops=989e12,
        matmul_flops=0.0,
        memory_bandwidth=3350 * GB,
        nvlink_bandwidth=450 * GB,
        gpus_per_node=8,
        network_bandwidth=8 * 400e9 / 8,
        sources={"gpu": H100_DATASHEET, "rate": "V100's calibrated fraction of peak"},
    ),
    "h200": Hardware(
        name="h200",
        gpu="H200 SXM 141 GB",
        memory_bytes=141 * GB,
        peak_flops=989e12,
        matmul_flops=0.0,
        memory_bandwidth=4800 * GB,
        nvlink_bandwidth=450 * GB,
        gpus_per_node=8,
        network_bandwidth=8 * 400e9 / 8,
        sources={"gpu": H200_DATASHEET, "rate": "V100's calibrated fraction of peak"},
    ),
}
GPU_BYTES = 4  # float32 parameters, gradients and optimiser state (the paper used no AMP)


# ---- compute --------------------------------------------------------------------------------


def memory_traffic_bytes(operations: Mapping[str, float], element_size: int = 4) -> float:
    """Bytes the memory-bound work of a step moves: gathers and scatters (`OpCounter`'s bytes)
    plus one read and one write per element of every other (element-wise) result."""
    return (
        operations["gather_bytes"]
        + operations["scatter_bytes"]
        + 2 * element_size * operations["other_elements"]
    )


def compute_seconds(operations: Mapping[str, float], hardware: Hardware) -> float:
    """Seconds of a rank's work (`OpCounter.as_dict()`): matrix products at the sustained
    rate F plus memory-bound work at the HBM bandwidth."""
    return (
        operations["matmul_flops"] / hardware.matmul_flops
        + memory_traffic_bytes(operations) / hardware.memory_bandwidth
    )


def calibrate(hardware: Hardware, reference: Mapping[str, float], rate: float) -> Hardware:
    """`hardware` with the sustained matmul rate F set so that the `reference` step (an
    `OpCounter.as_dict()`) runs at `rate` useful FLOP/s (its matmul FLOPs / its time): the
    memory-bound part takes its time at the vendor's HBM bandwidth, the matrix products the
    rest. Raises if the memory-bound part alone is slower than `rate` allows."""
    total = reference["matmul_flops"] / rate
    memory = memory_traffic_bytes(reference) / hardware.memory_bandwidth
    if memory >= total:
        raise ValueError(
            f"{hardware.name}: memory-bound work ({memory:.4g} s) exceeds the step time "
            f"{total:.4g} s that {rate:.3g} FLOP/s allows"
        )
    return replace(hardware, matmul_flops=reference["matmul_flops"] / (total - memory))


# ---- communication --------------------------------------------------------------------------


def ring_seconds(send_bytes: float, steps: int, bandwidth: float, latency: float) -> float:
    """A ring collective: `steps` hops of `latency` plus `send_bytes` (what each rank sends)
    at `bandwidth` (bytes/s per direction)."""
    return steps * latency + send_bytes / bandwidth if steps else 0.0


def ring_allreduce_seconds(
    nbytes: float, ranks: int, bandwidth: float, latency: float = 0.0
) -> float:
    """Ring all-reduce of `nbytes` over `ranks`: each rank sends 2 (n - 1) / n x nbytes in
    2 (n - 1) steps (a reduce-scatter and an all-gather)."""
    if ranks <= 1:
        return 0.0
    return ring_seconds(2 * (ranks - 1) / ranks * nbytes, 2 * (ranks - 1), bandwidth, latency)


def link(hardware: Hardware, ranks: int, rings_per_node: int = 1) -> tuple[float, float]:
    """(bandwidth, latency) of a ring over `ranks` consecutive GPUs: NVLink inside a node; a
    ring that spans nodes crosses each node's InfiniBand once per direction, shared by the
    `rings_per_node` rings that run at once through that node."""
    if ranks <= hardware.gpus_per_node:
        return hardware.nvlink_bandwidth, hardware.nvlink_latency
    bandwidth = min(hardware.nvlink_bandwidth, hardware.network_bandwidth / rings_per_node)
    return bandwidth, hardware.network_latency


def collective_seconds(record: Mapping, hardware: Hardware) -> float:
    """Seconds of one graph-parallel collective (a `counting.Collective` as a dict):
    latency per ring step plus its ring send bytes over the group's link."""
    size = record["group_size"]
    steps = 2 * (size - 1) if record["kind"] == "all_reduce" else size - 1
    bandwidth, latency = link(hardware, size)
    return ring_seconds(record["ring_send_bytes"], steps, bandwidth, latency)


def gradient_seconds(
    gradient_bytes: float,
    gp_size: int,
    dp_size: int,
    hardware: Hardware,
    scheme: str = "world",
) -> float:
    """Seconds of the per-step gradient all-reduce (before any overlap).

    scheme "world": one ring all-reduce over all W = G x D ranks, as DistributedDataParallel
    over the default group does in fairchem's trainer (the paper's code); W consecutive
    ranks, 8 per node, so the ring crosses each node's network once.
    scheme "ours": `graphpar.parallel.sync_gradients`, a G-way all-reduce over NVLink, then a
    D-way one; the G data-parallel rings of a node share its network.
    """
    if scheme == "world":
        world = gp_size * dp_size
        bandwidth, latency = link(hardware, world)
        return ring_allreduce_seconds(gradient_bytes, world, bandwidth, latency)
    if scheme == "ours":
        bandwidth, latency = link(hardware, gp_size)
        seconds = ring_allreduce_seconds(gradient_bytes, gp_size, bandwidth, latency)
        spans_nodes = gp_size * dp_size > hardware.gpus_per_node
        rings = gp_size if spans_nodes else 1
        bandwidth, latency = link(hardware, gp_size * dp_size if spans_nodes else dp_size, rings)
        return seconds + ring_allreduce_seconds(gradient_bytes, dp_size, bandwidth, latency)
    raise ValueError(f"unknown gradient scheme {scheme!r}; 'world' or 'ours'")


def exposed_gradient_seconds(
    gradient_seconds: float, backward_seconds: float, bucket_fraction: float, overlap: bool
) -> float:
    """What the gradient all-reduce adds to a step. Overlapped (DDP's buckets all-reduce while
    backward still runs): the part longer than backward, but at least the last bucket's share
    (`bucket_fraction` of the gradient), which only starts when backward ends. Not
    overlapped: all of it."""
    if not overlap:
        return gradient_seconds
    return max(gradient_seconds - backward_seconds, bucket_fraction * gradient_seconds)


# ---- one group, and weak-scaling efficiency ------------------------------------------------


def rank_seconds(rank: Mapping, hardware: Hardware) -> dict[str, float]:
    """A rank's compute and graph-parallel communication seconds (rank: a dict with
    `operations` = `OpCounter.as_dict()` and `collectives` = its graph-parallel
    `Collective`s as dicts, gradient synchronisation excluded)."""
    compute = compute_seconds(rank["operations"], hardware)
    communication = sum(collective_seconds(c, hardware) for c in rank["collectives"])
    return {"compute": compute, "communication": communication, "total": compute + communication}


def group_seconds(ranks: Sequence[Mapping], hardware: Hardware) -> dict[str, float]:
    """One group's step without the gradient all-reduce: the slowest rank (ranks wait for each
    other at every collective, so this is a lower bound), with the mean rank beside it."""
    times = [rank_seconds(rank, hardware) for rank in ranks]
    slowest = max(times, key=lambda t: t["total"])
    mean = float(np.mean([t["total"] for t in times]))
    return {**slowest, "mean_rank": mean, "imbalance": slowest["total"] / mean - 1}


def weak_scaling_efficiency(
    useful_flops: float, gpus: int, step_seconds: float, baseline_flops: float, baseline_seconds
) -> float:
    """Per-GPU useful FLOP/s of a run relative to the 1-GPU baseline's:
    (U / (gpus x t)) / (U_1 / t_1)."""
    return (useful_flops / (gpus * step_seconds)) / (baseline_flops / baseline_seconds)


def fit_linear(features: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Least-squares coefficients of values ~ features @ coefficients (no intercept unless a
    column of ones is given)."""
    coefficients, *_ = np.linalg.lstsq(np.asarray(features, float), np.asarray(values, float))
    return coefficients


def expected_group_max(
    pool: np.ndarray,
    cost: np.ndarray,
    seconds: np.ndarray,
    useful: np.ndarray,
    per_group: int,
    dp_size: int,
    draws: int,
    balance: bool,
    seed: int = 0,
) -> tuple[float, float]:
    """(expected slowest-group seconds, expected useful FLOPs) per step of D groups, each
    given `per_group` structures of a global batch of `per_group` x D drawn from `pool`
    (indices), split by `graphpar.data.dataset.balanced_partition` on `cost` (the sampler)
    when `balance`, else in draw order. `seconds` and `useful` are per-structure linear
    contributions (a group's time = the sum of its structures' plus any constant the caller
    adds)."""
    from graphpar.data.dataset import balanced_partition

    rng = np.random.default_rng(seed)
    slowest, work = [], []
    for _ in range(draws):
        chosen = rng.choice(pool, per_group * dp_size, replace=len(pool) < per_group * dp_size)
        if balance and dp_size > 1:
            parts = balanced_partition(cost[chosen], dp_size)
        else:
            parts = np.array_split(np.arange(len(chosen)), dp_size)
        slowest.append(max(seconds[chosen[part]].sum() for part in parts))
        work.append(useful[chosen].sum())
    return float(np.mean(slowest)), float(np.mean(work))


# ---- memory ---------------------------------------------------------------------------------

# Float32 copies of the parameters every rank holds (graph parallelism replicates them).
STATE_COPIES = {
    "parameters": 1,
    "gradients": 1,
    "adamw_amsgrad": 3,  # exp_avg, exp_avg_sq, max_exp_avg_sq
    "ema": 1,
    "gradient_buffer": 1,  # DDP's buckets (paper) / sync_gradients' flat buffer (ours)
}
# What the CUDA context, cuBLAS/cuDNN workspaces and the caching allocator take from a GPU:
# assumed, not measured (context about 0.5-1 GiB on a V100; fragmentation ~10%).
CONTEXT_BYTES = 1 * GiB
FRAGMENTATION = 0.10
ACTIVATION_FEATURES = ("triplets", "edges", "all_edges", "atoms")


def usable_bytes(hardware: Hardware) -> float:
    """Device memory a training step can use: less the CUDA context, then less 10% for the
    allocator's fragmentation (both assumed)."""
    return (hardware.memory_bytes - CONTEXT_BYTES) * (1 - FRAGMENTATION)


def state_bytes(parameters: int) -> dict[str, float]:
    """Bytes per rank of the parameters and everything held per parameter (`STATE_COPIES`)."""
    return {key: copies * GPU_BYTES * parameters for key, copies in STATE_COPIES.items()}


def fit_activation_coefficients(samples: Iterable[Mapping]) -> dict[str, float]:
    """Bytes per triplet, per own edge, per edge of the whole graph and per atom, fitted by
    least squares (non-negative) to samples of {"triplets", "edges", "all_edges", "atoms",
    "bytes"} (one rank of one predicted or measured step each)."""
    from scipy.optimize import nnls

    rows = list(samples)
    features = np.array([[row[key] for key in ACTIVATION_FEATURES] for row in rows], float)
    values = np.array([row["bytes"] for row in rows], float)
    scale = features.max(axis=0)
    scale[scale == 0] = 1
    solution, _ = nnls(features / scale, values)
    return dict(zip(ACTIVATION_FEATURES, (solution / scale).tolist(), strict=True))


def activation_bytes(
    coefficients: Mapping[str, float], counts: Mapping[str, float], peak_factor: float = 1.0
) -> float:
    """Activation bytes of a rank: `peak_factor` x the coefficients x the rank's counts."""
    return peak_factor * sum(coefficients[key] * counts[key] for key in ACTIVATION_FEATURES)


def memory_bytes(
    parameters: int,
    coefficients: Mapping[str, float],
    counts: Mapping[str, float],
    peak_factor: float = 1.0,
) -> dict[str, float]:
    """Per-rank bytes by component (state of `state_bytes`, activations) and their total."""
    parts = state_bytes(parameters)
    parts["activations"] = activation_bytes(coefficients, counts, peak_factor)
    parts["total"] = sum(parts.values())
    return parts


def minimal_gp_size(totals: Mapping[int, float], capacity: float) -> int | None:
    """The smallest G whose per-rank total (bytes) fits `capacity`; None if none does."""
    fitting = [size for size, total in sorted(totals.items()) if total <= capacity]
    return fitting[0] if fitting else None


def relative_difference(ours: float, paper: float) -> float:
    """(ours - paper) / paper."""
    return (ours - paper) / paper if paper else math.nan
