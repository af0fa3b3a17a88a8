"""Both graph-parallel models in real gloo processes: batches, the training step, and the
per-rank scenario that tests/test_models_parallel.py runs (CPU, float64).

The comparisons happen in the test process, where no group exists and every primitive is the
identity, so the reference is the serial model computed by the same code.
"""

from __future__ import annotations

import contextlib

import torch
from ase import Atoms
from ase.build import add_adsorbate, fcc111, molecule
from conftest import float64_batch

import graphpar.models.blocks
import graphpar.models.dimenetpp
import graphpar.models.gemnet
from graphpar.models import build_model
from graphpar.parallel import gather_for_replicated, init_groups
from graphpar.training import step
from graphpar.training.config import load_config
from graphpar.training.normalization import Normalized
from graphpar.training.step import build_optimizer

MODELS = ("dimenetpp-tiny", "gemnet-tiny")
CUTOFF = 4.0


def make_model(name: str, **overrides) -> torch.nn.Module:
    """A tiny model with random weights everywhere (no zero-initialised output layer);
    `overrides` replace its hyperparameters."""
    torch.manual_seed(0)
    if name.startswith("dimenet"):
        overrides = {"output_initializer": "glorot_orthogonal", **overrides}
    return build_model(name, cutoff=CUTOFF, **overrides).double().train()


def with_targets(batch, seed: int):
    g = torch.Generator().manual_seed(seed)
    batch.energy = torch.randn(batch.num_graphs, generator=g, dtype=torch.float64)
    batch.forces = torch.randn(batch.pos.shape, generator=g, dtype=torch.float64)
    return batch


def make_batch(seed: int = 0):
    """Two small periodic slabs with adsorbates, random energy and force targets."""
    slabs = []
    for k, (metal, adsorbate) in enumerate((("Cu", "O"), ("Pt", "H"))):
        slab = fcc111(metal, size=(2, 2, 2), vacuum=5.0)
        add_adsorbate(slab, adsorbate, 1.5, "fcc")
        slab.rattle(0.05, seed=seed + k)
        slabs.append(slab)
    return with_targets(float64_batch(slabs, cutoff=CUTOFF, max_neighbors=12), seed)


def sparse_batches() -> dict:
    """Inputs with few or no edges: no edges at all, an isolated atom beside a molecule, and
    a dimer (2 edges, no triplets: G = 4 leaves ranks without edges)."""
    far_apart = Atoms("CuO", positions=[[0, 0, 0], [9, 9, 9]], cell=[20, 20, 20], pbc=False)
    water = molecule("H2O", vacuum=6.0)
    lone = Atoms("Pt", positions=[[5, 5, 5]], cell=[10, 10, 10], pbc=True)  # 10 A to images
    dimer = Atoms("CO", positions=[[5, 5, 5], [5, 5, 6.2]], cell=[12, 12, 12], pbc=False)
    return {
        name: with_targets(float64_batch(atoms, cutoff=CUTOFF), 7)
        for name, atoms in (
            ("no_edges", [far_apart]),
            ("isolated_atom", [water, lone]),
            ("dimer", [dimer]),
        )
    }


# The trainer's config for `train_step`, which reads only the loss (energy MAE + force L2-MAE,
# unit weights), clipping (none here) and shared-gradient scaling settings.
STEP_CONFIG = load_config(
    {
        "model": "gemnet-tiny",
        "train": ["(unused: the batches are built here)"],
        "max_steps": 1,
        "dtype": "float64",
        "loss": {"energy_coefficient": 1, "force_coefficient": 1},
        "clip_grad_norm": None,
        "ema_decay": None,
    }
)


def train_step(model, batch, config=STEP_CONFIG):
    """The trainer's `train_step` (unnormalised targets; `config`: STEP_CONFIG or a variant of
    it), which synchronises the gradients over G x D: (energy, forces, grads), the gradients
    as the optimiser step used them."""
    normalized = Normalized(model)
    optimizer, _ = build_optimizer(normalized, config)
    result = step.train_step(normalized, batch, optimizer, config)
    grads = {
        name: torch.zeros_like(p) if p.grad is None else p.grad.detach().clone()
        for name, p in model.named_parameters()
    }
    return result.predictions["energy"], result.predictions["forces"], grads


@contextlib.contextmanager
def fairchem_gather():
    """Both models with fairchem's gather, whose backward only splits (no sum over ranks)."""
    modules = (graphpar.models.dimenetpp, graphpar.models.gemnet)
    saved = [m.gather_for_partitioned for m in modules]
    for m in modules:
        m.gather_for_partitioned = gather_for_replicated
    try:
        yield
    finally:
        for m, gather in zip(modules, saved, strict=True):
            m.gather_for_partitioned = gather


def run(gp_size: int, sparse: bool) -> dict:
    """What one rank runs inside its world (tests/gloo.py's `spawn_worlds`): every model on this
    rank's batch (data-parallel row d: seed 100 + d), right and wrong, and on the sparse batches
    if asked."""
    dims = init_groups(gp_size)
    batch = make_batch(seed=100 + dims.dp_rank)
    result = {}
    for name in MODELS:
        result[name] = train_step(make_model(name), batch)
        if gp_size > 1:
            with fairchem_gather():
                result[f"{name}/wrong"] = train_step(make_model(name), batch)
        if sparse:
            for case, sparse_batch in sparse_batches().items():
                result[f"{name}/{case}"] = train_step(make_model(name), sparse_batch)
    return result


# tests/test_amp_checkpointing.py: the models with recomputed interaction blocks, and in bfloat16.
RECOMPUTED = {
    "dimenetpp-tiny": {},  # gradient forces: training takes their double backward
    "gemnet-tiny": {},  # GemNet-dT: direct forces
    "gemnet-tiny/gradient-forces": {"direct_forces": False},  # GemNet-T: double backward
}


def interaction_calls(model) -> list[int]:
    """Counters of each interaction block's forward calls (recomputations included), kept up
    to date by forward hooks."""
    blocks = getattr(model, "interaction_blocks", None) or model.int_blocks
    calls = [0] * len(blocks)
    for index, block in enumerate(blocks):

        def count(module, args, index=index):
            calls[index] += 1

        block.register_forward_pre_hook(count)
    return calls


def run_recomputed(gp_size: int) -> dict:
    """What one rank runs for tests/test_amp_checkpointing.py: per model, the training step
    (float64) without and with activation checkpointing, each with its blocks' forward calls;
    and a float32 step under bfloat16 autocast, without and with checkpointing."""
    init_groups(gp_size)
    batch = make_batch(seed=100)
    recompute = dict(STEP_CONFIG, activation_checkpointing=True)
    bfloat16 = dict(STEP_CONFIG, dtype="float32", amp="bfloat16")
    bfloat16_recompute = dict(bfloat16, activation_checkpointing=True)
    single_precision = step.to_device(make_batch(seed=100), torch.device("cpu"), torch.float32)
    result = {}
    for case, overrides in RECOMPUTED.items():
        name = case.split("/")[0]
        for key, config in (("plain", STEP_CONFIG), ("recomputed", recompute)):
            model = make_model(name, **overrides)
            calls = interaction_calls(model)
            result[case, key] = train_step(model, batch, config)
            result[case, key, "calls"] = calls
        for key, config in (("bfloat16", bfloat16), ("bfloat16/recomputed", bfloat16_recompute)):
            model = make_model(name, **overrides).float()
            result[case, key] = train_step(model, single_precision, config)
    return result


# tests/test_triplet_chunks.py: the memory-lean triplet path (config key `triplet_chunk`).
# 300 triplets per chunk: each of make_batch's structures has about 1,000, so several chunks
# run per rank at G = 1 and G = 2.
TRIPLET_CHUNK = 300


@contextlib.contextmanager
def counted_chunks():
    """Both models' `chunked` wrapped to count: {"chunks": chunks per call (per interaction
    block), "runs": calls of the chunk function (first runs and recomputations)}."""
    modules = (graphpar.models.dimenetpp, graphpar.models.gemnet)
    counts = {"chunks": [], "runs": 0}

    def counting(fn, chunks, *inputs):
        def run_counted(*args):
            counts["runs"] += 1
            return fn(*args)

        counts["chunks"].append(len(chunks))
        return graphpar.models.blocks.chunked(run_counted, chunks, *inputs)

    for m in modules:
        m.chunked = counting
    try:
        yield counts
    finally:
        for m in modules:
            m.chunked = graphpar.models.blocks.chunked


def run_chunked(gp_size: int) -> dict:
    """What one rank runs for tests/test_triplet_chunks.py: per model (RECOMPUTED's cases), the
    training step (float64) on the plain path, with triplet chunks, and with triplet chunks
    and activation checkpointing, each chunked step with its counts (`counted_chunks`)."""
    init_groups(gp_size)
    batch = make_batch(seed=100)
    chunk = dict(STEP_CONFIG, triplet_chunk=TRIPLET_CHUNK)
    configs = {
        "plain": STEP_CONFIG,
        "chunked": chunk,
        "chunked/recomputed": dict(chunk, activation_checkpointing=True),
    }
    result = {}
    for case, overrides in RECOMPUTED.items():
        name = case.split("/")[0]
        for key, config in configs.items():
            with counted_chunks() as counts:
                result[case, key] = train_step(make_model(name, **overrides), batch, config)
            result[case, key, "counts"] = counts
    return result
