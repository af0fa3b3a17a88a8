"""Peak per-rank activation memory of graph parallelism at G = 1, 2, 4 (DimeNet++, GemNet-T).

One periodic fcc(111) Cu slab of ~1000 atoms (10x10x10, 7 A vacuum each side, pbc T T T; graph
from `atoms_to_sample` with a 6 A cutoff and 50 neighbours: OC20-like density) is trained on for
one step by G real gloo ranks on 127.0.0.1 (W = G, D = 1), for G = 1, 2, 4 and both models.
One step = energy + forces + loss (energy MAE + force L2) + backward + `sync_gradients`;
DimeNet++ forces are -dE/dpos by autograd with `create_graph=True`, GemNet-T forces are direct.

Memory measure (per rank): peak RSS during the measured step minus RSS just before it, where the
"before" point comes after the model and batch are loaded and one warm-up step has run. RSS is
read from /proc/self/statm by a background thread every ~1 ms (ru_maxrss cannot be reset);
glibc is told to return freed memory to the OS (MALLOC_MMAP_THRESHOLD_/MALLOC_TRIM_THRESHOLD_)
so that RSS follows live tensors. Each rank runs one torch thread.

Communication: bytes are counted by `graphpar.parallel.counting.count_communication`, which every
collective of `graphpar.parallel` (all-gather, reduce-scatter, all-reduce, in forward and
backward, and the gradient all-reduce of `sync_gradients`) reports to, during the measured step:
the payload each rank's call hands to gloo (all-gather: the gathered output buffer;
reduce-scatter: the padded input buffer; all-reduce: the tensor), not wire bytes of gloo's
algorithm. Bytes issued inside an interaction block's forward are recorded separately (forward
hooks), and the whole step's total (forward, force double backward, backward, gradient
all-reduce) is given too. `graphpar.parallel.predict.predict_step` predicts the same records
from shapes alone (tests/test_counting.py).

This machine has 2 cores: 4 ranks at once measure memory and exchanged bytes, not speed (the
step seconds recorded are for information only).

Usage:
    python bench/gp_memory.py                            # both models, G = 1 2 4
    python bench/gp_memory.py --models dimenetpp --sizes 1 2
    python bench/gp_memory.py --size 4 4 4 --dpp-hidden 32   # quick try at small scale
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from ase.build import fcc111
from machine import cpu_model

from graphpar.data.dataset import collate
from graphpar.data.graph import atoms_to_sample
from graphpar.models import build_model, count_parameters
from graphpar.parallel import destroy_groups, init_groups, sync_gradients
from graphpar.parallel.counting import count_communication

OUT = Path(__file__).resolve().parents[1] / "results" / "benchmarks" / "gp_memory.json"
PAGE = os.sysconf("SC_PAGE_SIZE")
MB = 2**20
GOAL = 0.35  # target fraction G=4 / G=1 (0.25 ideal)

NOTES = (
    "Replicated on every rank of the graph-parallel group (does not shrink with G): the "
    "positions, atomic numbers, cell and the whole graph and triplet index arrays (every rank "
    "loads the same batch and computes its share from them); the geometry of all edges "
    "(edge vectors and lengths, and the cosine of each of this rank's triplets, which reads "
    "input edges owned by other ranks) is computed on every rank, because it is cheap and "
    "parameter-free and avoids a communication of positions-derived tensors whose gradients "
    "must flow to the positions; per-atom state (DimeNet++ per-atom output-MLP activations, "
    "GemNet atom embeddings h and atom-update MLPs, energies per atom) is replicated work "
    "after an all-reduce of the rank's partial edge-to-atom sums, since atoms are few (N << E) "
    "and every rank's edges read arbitrary atoms; the parameters and their gradients are "
    "replicated (gradients all-reduced once per step). Partitioned: per-edge activations (the "
    "E x hidden tensors) and per-triplet activations of the triplets whose output edge a rank "
    "owns; each rank additionally holds the all-gathered down-projected input-edge features "
    "(E x int_emb for DimeNet++, E x trip for GemNet, plus GemNet's gathered bilinear output "
    "read at reverse edges), which is why the ratio stays above 1/G."
)


# ----------------------------------------------------------------------------------------------
# Measurement helpers
# ----------------------------------------------------------------------------------------------


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


class PeakRSS:
    """Samples RSS every `interval` seconds in a background thread; `peak` after `stop()`."""

    def __init__(self, interval: float = 0.001):
        self.interval = interval
        self.peak = rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())


class BlockBytes:
    """Payload bytes of the collectives issued inside the forward of `blocks` (the interaction
    blocks), read from the records of the active `count_communication` counter."""

    def __init__(self, blocks):
        self.counter = None  # set while the measured step runs
        self.bytes = 0
        self._start = None
        for block in blocks:
            block.register_forward_pre_hook(self._enter)
            block.register_forward_hook(self._leave)

    def _enter(self, *_) -> None:
        if self.counter is not None:
            self._start = len(self.counter.records)

    def _leave(self, *_) -> None:
        if self.counter is not None and self._start is not None:
            self.bytes += sum(r.payload_bytes for r in self.counter.records[self._start :])
            self._start = None


# ----------------------------------------------------------------------------------------------
# The structure and the models
# ----------------------------------------------------------------------------------------------


def make_batch(size: tuple[int, int, int]):
    slab = fcc111("Cu", size=size, vacuum=7.0)
    slab.pbc = True
    return collate([atoms_to_sample(slab, cutoff=6.0, max_neighbors=50)])


def model_settings(args) -> dict[str, tuple[str, dict]]:
    return {
        "dimenetpp": (
            "dimenetpp",
            dict(
                hidden_channels=args.dpp_hidden,
                out_emb_channels=args.dpp_hidden,
                int_emb_size=args.dpp_int_emb,
                basis_emb_size=8,
                num_blocks=3,
            ),
        ),
        "gemnet": (
            "gemnet-dt",
            dict(
                num_blocks=3,
                emb_size_atom=args.gemnet_edge,
                emb_size_edge=args.gemnet_edge,
                emb_size_trip=args.gemnet_trip,
                emb_size_bil_trip=args.gemnet_trip,
            ),
        ),
    }


def training_step(model, family: str, batch, params) -> None:
    pos = batch.pos.detach().requires_grad_(family == "dimenetpp")
    batch.pos = pos
    if family == "dimenetpp":
        energy = model.energy(batch, pos)
        (grad,) = torch.autograd.grad(energy.sum(), pos, create_graph=True)
        forces = -grad
    else:
        energy, forces = model.energy_and_forces(batch, pos)
    loss = energy.abs().mean() + 100 * forces.norm(dim=-1).mean()  # targets: zero
    loss.backward()
    sync_gradients(params)
    for p in params:
        p.grad = None


# ----------------------------------------------------------------------------------------------
# Ranks
# ----------------------------------------------------------------------------------------------


def rank_entry(rank, world_size, port, batch_file, family, name, overrides, result_file):
    torch.set_num_threads(1)  # up to 4 ranks share 2 cores
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=300),
    )
    try:
        init_groups(world_size)
        torch.manual_seed(0)
        model = build_model(name, **overrides)
        model.train()
        blocks = model.interaction_blocks if family == "dimenetpp" else model.int_blocks
        block_bytes = BlockBytes(blocks)
        params = [p for p in model.parameters() if p.requires_grad]
        batch = torch.load(batch_file, weights_only=False)
        rss_loaded = rss_bytes()
        start = time.perf_counter()
        training_step(model, family, batch, params)  # warm-up
        warmup_s = time.perf_counter() - start
        dist.barrier()
        rss_before = rss_bytes()
        start = time.perf_counter()
        with PeakRSS() as peak, count_communication() as counter:
            block_bytes.counter = counter
            training_step(model, family, batch, params)
        step_s = time.perf_counter() - start
        block_bytes.counter = None
        dist.barrier()
        result = {
            "rank": rank,
            "rss_loaded_mb": rss_loaded / MB,
            "rss_before_step_mb": rss_before / MB,
            "peak_rss_step_mb": peak.peak / MB,
            "activation_mb": (peak.peak - rss_before) / MB,
            "warmup_s": warmup_s,
            "step_s": step_s,
            "comm_bytes_step": counter.payload_bytes(),
            "comm_calls_step": counter.calls(),
            "comm_bytes_interaction_forward": block_bytes.bytes,
        }
        Path(f"{result_file}.{rank}").write_text(json.dumps(result))
    finally:
        destroy_groups()
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(world_size, batch_file, family, name, overrides, tmp: Path) -> list[dict]:
    result_file = tmp / f"{family}-G{world_size}"
    args = (world_size, free_port(), batch_file, family, name, overrides, str(result_file))
    mp.spawn(rank_entry, args=args, nprocs=world_size)
    return [json.loads(Path(f"{result_file}.{r}").read_text()) for r in range(world_size)]


def machine() -> str:
    model = cpu_model()
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (
        f"{model}, {os.cpu_count()} cores, {mem:.0f} GiB RAM, CPU gloo ranks on 127.0.0.1, "
        f"1 torch thread per rank, torch {torch.__version__} (memory, not speed)"
    )


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["dimenetpp", "gemnet"])
    parser.add_argument("--sizes", nargs="+", type=int, default=[1, 2, 4], help="values of G")
    parser.add_argument("--size", nargs=3, type=int, default=[10, 10, 10], help="fcc111 size")
    parser.add_argument("--dpp-hidden", type=int, default=32, help="DimeNet++ hidden/out_emb")
    parser.add_argument("--dpp-int-emb", type=int, default=8, help="DimeNet++ int_emb_size")
    parser.add_argument("--gemnet-edge", type=int, default=128, help="GemNet atom/edge width")
    parser.add_argument("--gemnet-trip", type=int, default=32, help="GemNet trip/bil width")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)

    # Return freed memory to the OS at once, so that RSS tracks live tensors (ranks inherit it).
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"
    os.environ["MALLOC_TRIM_THRESHOLD_"] = "0"
    batch = make_batch(tuple(args.size))
    graph = {
        "atoms": int(batch.num_nodes),
        "edges": int(batch.edge_index.shape[1]),
        "dimenetpp_triplets": int(batch.idx_kj.numel()),
        "gemnet_edges_symmetric": int(batch.edge_index_sym.shape[1]),
        "gemnet_triplets": int(batch.id3_ba.numel()),
    }
    print(graph, flush=True)
    settings = model_settings(args)
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        batch_file = str(Path(tmp) / "batch.pt")
        torch.save(batch, batch_file)
        del batch
        for family in args.models:
            name, overrides = settings[family]
            runs[family] = {
                "config": name,
                "overrides": overrides,
                "parameters": count_parameters(name, **overrides),
                "G": {},
            }
            for g in args.sizes:
                ranks = run_ranks(g, batch_file, family, name, overrides, Path(tmp))
                act = [r["activation_mb"] for r in ranks]
                runs[family]["G"][str(g)] = {
                    "ranks": ranks,
                    "max_activation_mb": max(act),
                    "mean_activation_mb": sum(act) / len(act),
                }
                per_block = max(r["comm_bytes_interaction_forward"] for r in ranks) / 3
                print(
                    f"{family} G={g}: activation MB per rank {[round(a) for a in act]}, "
                    f"step s {[round(r['step_s'], 1) for r in ranks]}, "
                    f"bytes/interaction block (forward) {per_block:.3g}",
                    flush=True,
                )
            base = runs[family]["G"].get("1")
            for entry in runs[family]["G"].values():
                if base:
                    entry["ratio_to_G1"] = entry["max_activation_mb"] / base["max_activation_mb"]
                num_blocks = overrides["num_blocks"]
                entry["comm_bytes_per_interaction_block_forward"] = (
                    max(r["comm_bytes_interaction_forward"] for r in entry["ranks"]) / num_blocks
                )
                entry["comm_bytes_step_total_per_rank"] = max(
                    sum(r["comm_bytes_step"].values()) for r in entry["ranks"]
                )

    ratios = {k: v["G"].get("4", {}).get("ratio_to_G1") for k, v in runs.items()}
    ours = ratios.get("dimenetpp")
    result = {
        "benchmark": "gp_memory",
        "settings": {
            "structure": f"fcc111 Cu {tuple(args.size)}, vacuum 7 A, pbc TTT, unrattled",
            "cutoff": 6.0,
            "max_neighbors": 50,
            **graph,
            "sizes_G": args.sizes,
            "step": "energy + forces (DimeNet++: autograd, create_graph; GemNet-T: direct) + "
            "energy MAE + 100 * force L2 loss + backward + sync_gradients",
            "memory_measure": "per rank: peak RSS during the measured step (sampled from "
            "/proc/self/statm every ~1 ms by a background thread) minus RSS just before it, "
            "after model and batch loaded and one warm-up step; max over ranks; glibc "
            "MALLOC_MMAP_THRESHOLD_=65536, MALLOC_TRIM_THRESHOLD_=0",
            "comm_measure": "observed: payload bytes handed to gloo by each rank's "
            "all-gather (gathered output buffer), reduce-scatter (padded input) and all-reduce "
            "(tensor) calls during the measured step, recorded by "
            "graphpar.parallel.counting.count_communication; per interaction block = bytes "
            "issued inside interaction blocks' forward / num_blocks (max over ranks); step "
            "total includes the force double backward, backward and the gradient all-reduce",
            "speed": "2 cores shared by up to 4 ranks: step seconds are not a speed result",
        },
        "runs": runs,
        "ratio_G4_over_G1": ratios,
        "notes": NOTES,
        "summary": {
            "metric": "peak per-rank activation memory at G=4 / G=1 (DimeNet++; GemNet-T in "
            "ratio_G4_over_G1); ratio = goal / ours, > 1 means within the 0.35 target",
            "ours": ours,
            "baseline": 1.0,
            "ratio": GOAL / ours if ours else None,
            "goal": GOAL,
            "higher_is_better": True,
            "machine": machine(),
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"G=4/G=1 activation: {ratios} (goal <= {GOAL}); wrote {args.out}")


if __name__ == "__main__":
    sys.exit(main())
