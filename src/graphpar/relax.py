"""ML relaxations (IS2RS/IS2RE): batched L-BFGS with a trained checkpoint over a preprocessed
IS2RE split, with IS2RS (ADwT, FbT and AFbT from an oracle calculator) and IS2RE (energy MAE,
EwT) metrics, plus per-system predictions in OC20's submission layout.

    python -m graphpar.relax \\
        --checkpoint results/mini/checkpoints/gemnet/final.pt \\
        --data resources/mini/lmdb/is2re/val_id --split val_id \\
        --out-dir results/mini/relaxations/gemnet/val_id \\
        --metrics-dir results/mini/metrics/gemnet --predictions-dir results/mini/predictions/gemnet

Relaxations (batched L-BFGS, maxstep 0.04, memory 50, damping 1, alpha 70, fmax 0.05, at most
200 steps, graphs rebuilt every step as the model was trained; `--fmax 0` runs every system
for exactly `--steps` steps, OC20's IS2RS protocol) run as a stream: a batch of at most
`--batch-size` systems and `--budget` atoms, edges or triplets (`--budget-on`) is refilled with
waiting systems as its systems converge or reach the step cap. Each system is written to
`<out-dir>/<sid>.extxyz` as soon as it is relaxed, and a rerun resumes, skipping systems
already relaxed by this same relaxation (model weights, settings and input recorded in each
file: another checkpoint's files are relaxed again); one job at a time holds `<out-dir>`.
The metrics files are `is2rs_<split>.json` (adwt, fbt, afbt, n_systems) and
`is2re_<split>.json` (energy_mae, ewt, n_systems), with provenance (checkpoint sha256, its
config hash, the dataset's metadata hash, git commit, package versions); the predictions
`is2rs_<split>.npz` (ids, pos of every atom, chunk_idx, fixed; per system `distance` to the
relaxed label in A and `oracle_max_force` in eV/A, NaN where unknown) and `is2re_<split>.npz`
(ids, energy, energy_target).

Relaxations run under torchrun too: G x D processes, each system batch split over G
graph-parallel ranks and the systems shared by the D data-parallel groups:

    torchrun --standalone --nproc_per_node=4 -m graphpar.relax --gp-size 2 ...

As a library, with a graphpar model (or any `model(batch)` callable):

    result = relax_batch(model, batch, fmax=0.05, steps=200)
    result.pos[i], result.energy[i], result.forces[i], result.steps[i], result.converged[i]
    for i, relaxed in RelaxStream(model, samples, budget=2000, budget_on="atoms"):
        relaxed.pos, relaxed.energy, relaxed.steps, relaxed.converged  # samples[i], as it ends
    summaries = relax_dataset(model, samples, "relaxed/", batch_size=None, budget=2000)

`RelaxStream` is ASE's `ase.optimize.LBFGS` (no line search) run on a batch of systems at once,
refilled as systems finish: each system has its own step counter, s/y/rho history (empty when it
enters), step cap and convergence test, and FixAtoms atoms (`fixed`) feel no force and never
move. `relax_batch` is the stream of one batch. The optimiser state is float64 whatever the
model's dtype; the model sees positions in the batch's own dtype. Per-system sums are sequential
`index_add_` over that system's atoms, so (on CPU) a system's trajectory depends neither on the
other systems of its batch nor on when it entered.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import hashlib
import inspect
import json
import os
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor
from torch_geometric.data import Batch
from tqdm import tqdm

from graphpar.calculator import graph_convention, graph_settings
from graphpar.data.dataset import LmdbDataset
from graphpar.data.graph import TRIPLET_FIELDS, radius_graph_batch
from graphpar.io import atomic_path, remove_temporaries, write_json, write_npz
from graphpar.lock import FolderLocked, main_rank_lock
from graphpar.metrics import MetricSums, is2re_metrics
from graphpar.oracle import fbt_afbt, oracle_max_forces
from graphpar.parallel import get_dims, is_main, join_processes, leave_processes
from graphpar.provenance import checkpoint_provenance
from graphpar.training.checkpoint import read_checkpoint, trained_model
from graphpar.training.config import TrainingError
from graphpar.training.data import check_checkpoint_data

# Batch fields derived from the graph; stale once atoms move (the models rebuild them if absent).
TRIPLET_KEYS = tuple(key for keys in TRIPLET_FIELDS.values() for key in keys)
# What a relaxation stream's batch budget counts per system (`RelaxStream`).
BUDGET_ON = ("atoms", "edges", "triplets")


@dataclass
class RelaxResult:
    """Per-system results of `relax_batch` (lists indexed by system; float64 tensors).

    `forces` are the model's raw forces (fixed atoms included, OC20's `apply_constraint=False`
    convention); the convergence test ignores fixed atoms. With `trajectory=True`,
    `trajectory_*[i]` hold system i at steps 0..steps[i] ([steps+1, N, 3] / [steps+1]).
    """

    pos: list[Tensor]
    energy: Tensor
    forces: list[Tensor]
    steps: Tensor
    converged: Tensor
    trajectory_pos: list[Tensor] | None = None
    trajectory_energy: list[Tensor] | None = None
    trajectory_forces: list[Tensor] | None = None
    model_calls: int = field(default=0)


@dataclass
class RelaxedSystem:
    """One system relaxed by a `RelaxStream` (float64, on the stream's device): final
    positions [N,3], energy (0-d), the model's raw forces [N,3], steps taken, whether it
    converged, and with `trajectory=True` its positions/energies/forces at steps 0..steps."""

    pos: Tensor
    energy: Tensor
    forces: Tensor
    steps: int
    converged: bool
    trajectory_pos: Tensor | None = None
    trajectory_energy: Tensor | None = None
    trajectory_forces: Tensor | None = None


@dataclass
class _System:
    """One structure waiting for (or in) a stream: its tensors on the stream's device."""

    numbers: Tensor  # [n] long
    pos: Tensor  # [n,3], the model's dtype
    cell: Tensor  # [3,3], the model's dtype
    pbc: Tensor  # [3] bool
    fixed: Tensor  # [n] bool
    tags: Tensor | None  # [n] long
    edge_index: Tensor | None = None  # [2,E] local atom ids (its own graph, rebuild_graph=False)
    cell_offsets: Tensor | None = None


def _segment_sum(values: Tensor, index: Tensor, size: int) -> Tensor:
    """Per-system sums of per-atom `values` [N] (sequential over each system's atoms on CPU)."""
    return torch.zeros(size, dtype=values.dtype, device=values.device).index_add_(0, index, values)


def _segment_max(values: Tensor, index: Tensor, size: int) -> Tensor:
    """Per-system maxima of non-negative per-atom `values` [N] (0 for a system with no atoms)."""
    out = torch.zeros(size, dtype=values.dtype, device=values.device)
    return out.scatter_reduce_(0, index, values, reduce="amax", include_self=True)


def _per_system(structure: Tensor, num: int):
    """`dot(a, b)`: per-system dot products [K] of per-atom vectors [N,3]; `per_atom(v)`: a
    per-system value [K] broadcast to the atoms [N,1] (`structure`: each atom's system)."""

    def dot(a: Tensor, b: Tensor) -> Tensor:
        return _segment_sum((a * b).sum(-1), structure, num)

    def per_atom(values: Tensor) -> Tensor:
        return values[structure].unsqueeze(-1)

    return dot, per_atom


def _atom_norms(vectors: Tensor) -> Tensor:
    """Euclidean norm of each row of [N,3], as `np.linalg.norm(x, axis=1)`."""
    return torch.sqrt((vectors * vectors).sum(-1))


@torch.no_grad()
def _evaluate(model, batch) -> tuple[Tensor, Tensor]:
    """Energies [B] and forces [N,3] (float64, detached) of `batch`.

    The model runs with gradients enabled: force models differentiate the energy themselves.
    """
    with torch.enable_grad():
        out = model(batch)
    return out["energy"].detach().reshape(-1).double(), out["forces"].detach().double()


@contextlib.contextmanager
def _eval_mode(model):
    """The model in eval mode inside the block, its own mode after."""
    was_training = getattr(model, "training", False)
    if hasattr(model, "eval"):
        model.eval()
    try:
        yield
    finally:
        if was_training and hasattr(model, "train"):
            model.train(True)


def _system(sample, device, dtype: torch.dtype, own_graph: bool, graph: tuple) -> _System:
    """The tensors of one structure (a `Sample` or anything with its fields) for a stream;
    with `own_graph`, its graph (the one it carries, else built with `graph`: cutoff, max
    neighbours and graph convention)."""
    from graphpar.data.graph import radius_graph

    pos = sample.pos.detach()
    n = pos.shape[0]
    fixed = getattr(sample, "fixed", None)
    tags = getattr(sample, "tags", None)
    system = _System(
        numbers=sample.atomic_numbers.reshape(-1).long().to(device),
        pos=pos.to(device=device, dtype=dtype),
        cell=sample.cell.reshape(3, 3).to(device=device, dtype=dtype),
        pbc=sample.pbc.reshape(3).bool().to(device),
        fixed=(
            torch.zeros(n, dtype=torch.bool, device=device)
            if fixed is None
            else fixed.reshape(-1).bool().to(device)
        ),
        tags=None if tags is None else tags.reshape(-1).long().to(device),
    )
    if own_graph:
        if getattr(sample, "edge_index", None) is None:
            cutoff, max_neighbors, convention = graph
            edge_index, cell_offsets = radius_graph(
                system.pos, system.cell, system.pbc, cutoff, max_neighbors, convention=convention
            )
        else:
            edge_index, cell_offsets = sample.edge_index, sample.cell_offsets
        system.edge_index, system.cell_offsets = edge_index.to(device), cell_offsets.to(device)
    return system


def _batch_systems(batch) -> list:
    """The structures of a collated batch as light per-system views (no `get_example`)."""
    from types import SimpleNamespace

    natoms = batch.natoms.reshape(-1).long().tolist()
    bounds = np.cumsum([0, *natoms]).tolist()
    fixed, tags = getattr(batch, "fixed", None), getattr(batch, "tags", None)
    cell = batch.cell.reshape(-1, 3, 3)
    pbc = batch.pbc.reshape(-1, 3)
    edges = None
    if "edge_index" in batch and "cell_offsets" in batch:
        structure = torch.repeat_interleave(torch.arange(len(natoms)), torch.tensor(natoms))
        owner = structure.to(batch.edge_index.device)[batch.edge_index[1]]
        counts = torch.bincount(owner, minlength=len(natoms)).tolist()
        edges = np.cumsum([0, *counts]).tolist()
    systems = []
    for i, (start, stop) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
        view = SimpleNamespace(
            pos=batch.pos[start:stop],
            atomic_numbers=batch.atomic_numbers[start:stop],
            cell=cell[i],
            pbc=pbc[i],
            fixed=None if fixed is None else fixed[start:stop],
            tags=None if tags is None else tags[start:stop],
        )
        if edges is not None:
            view.edge_index = batch.edge_index[:, edges[i] : edges[i + 1]] - start
            view.cell_offsets = batch.cell_offsets[edges[i] : edges[i + 1]]
        systems.append(view)
    return systems


def _triplet_family(model) -> str | None:
    inner = getattr(model, "model", model)  # training.normalization.Normalized wraps the network
    return getattr(inner, "triplet_family", None)


def system_cost(
    system,
    budget_on: str,
    cutoff: float,
    max_neighbors: int | None,
    family: str | None = None,
    convention: str = "graphpar",
) -> int:
    """What one structure costs a stream's batch budget: its atoms, or the edges or triplets
    (DimeNet++ or GemNet ones: `family`, the larger count if None) of its radius graph at its
    initial positions with the relaxation's graph settings. Fixed per system, computed from
    its own data only (graph parallel: the same on every rank of a group)."""
    from graphpar.data.graph import radius_graph, triplet_counts

    if budget_on not in BUDGET_ON:
        raise ValueError(f"budget_on {budget_on!r}: use one of {BUDGET_ON}")
    n = int(system.pos.shape[0])
    if budget_on == "atoms":
        return n
    edge_index, cell_offsets = radius_graph(
        system.pos,
        system.cell.reshape(3, 3),
        system.pbc.reshape(3),
        cutoff,
        max_neighbors,
        convention=convention,
    )
    if budget_on == "edges":
        return int(edge_index.shape[1])
    dimenet, gemnet = triplet_counts(
        edge_index, cell_offsets, n, torch.tensor([edge_index.shape[1]], device=edge_index.device)
    )
    counts = {"dimenetpp": int(dimenet[0]), "gemnet": int(gemnet[0])}
    return counts[family] if family in counts else max(counts.values())


class RelaxStream:
    """Relax a stream of structures with ASE's L-BFGS, a batch of them at a time, refilling the
    batch as systems finish: iterate to get `(position in systems, RelaxedSystem)` for each,
    in the order they finish.

    Every model call evaluates the systems in flight: those moved by their last step and those
    that just entered (at their initial positions). A system leaves when it has converged (max
    force norm over free atoms < fmax, tested before each step, as ASE) or taken `steps` steps;
    waiting systems then take its place, in the order of `systems`, while the batch stays within
    `budget` (the sum of `system_cost(budget_on)` over the systems in flight: atoms, edges or
    triplets) and `max_systems`. A system whose cost alone exceeds the budget runs alone. No
    budget and no `max_systems`: every system at once.

    Each system follows `LBFGS(atoms, maxstep, memory, damping, alpha).run(fmax, steps)` step
    for step: its own step counter and s/y/rho history (a ring of the last `memory` pairs, empty
    for a system entering mid-stream), convergence test and FixAtoms atoms (`fixed`: no force,
    never move). The optimiser state is float64; the model sees positions and cells in `dtype`
    (default: the first system's). After every move the graph is rebuilt (`rebuild_graph`) with
    `radius_graph_batch(cutoff, max_neighbors)`; with `rebuild_graph=False` each system keeps
    the graph it came with. Per-system sums are sequential `index_add_` over that system's atoms,
    so (on CPU) a system's trajectory depends neither on the other systems in flight nor on when
    it entered.

    `model_calls` counts the model calls, `max_batch_cost` the largest budget cost of one call;
    with `profile=True`, `seconds` splits the time into model (forward and backward), graph
    (radius graphs), lbfgs (the optimiser's arithmetic) and bookkeeping (admitting, retiring
    and collating systems), synchronising the device between parts.
    """

    def __init__(
        self,
        model,
        systems: Iterable,
        fmax: float = 0.05,
        steps: int = 200,
        maxstep: float = 0.04,
        memory: int = 50,
        damping: float = 1.0,
        alpha: float = 70.0,
        cutoff: float = 6.0,
        max_neighbors: int | None = 50,
        rebuild_graph: bool = True,
        trajectory: bool = False,
        *,
        budget: float | None = None,
        budget_on: str = "atoms",
        max_systems: int | None = None,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        profile: bool = False,
        graph_convention: str = "graphpar",
    ):
        if maxstep > 1.0:
            raise ValueError(f"maxstep {maxstep} A is much too large")
        if memory < 1:
            raise ValueError("memory must be at least 1")
        if budget_on not in BUDGET_ON:
            raise ValueError(f"budget_on {budget_on!r}: use one of {BUDGET_ON}")
        if max_systems is not None and max_systems < 1:
            raise ValueError("max_systems must be at least 1")
        self.model = model
        self.systems = systems
        self.fmax, self.steps, self.maxstep, self.memory = fmax, steps, maxstep, memory
        self.damping, self.alpha = damping, alpha
        self.cutoff, self.max_neighbors = cutoff, max_neighbors
        self.graph_convention = graph_convention  # graphpar.data.graph.GRAPH_CONVENTIONS
        self.rebuild_graph, self.trajectory = rebuild_graph, trajectory
        self.budget, self.budget_on, self.max_systems = budget, budget_on, max_systems
        self.device = None if device is None else torch.device(device)
        self.dtype = dtype
        self.profile = profile
        self.model_calls = 0
        self.max_batch_cost = 0
        self.seconds = {"model": 0.0, "graph": 0.0, "lbfgs": 0.0, "bookkeeping": 0.0}

    # -- timing ------------------------------------------------------------------------------

    def _lap(self, part: str | None) -> None:
        """Charge the time since the last lap to `part` (profile=True only)."""
        if not self.profile:
            return
        if self._device is not None and self._device.type == "cuda":
            torch.cuda.synchronize(self._device)
        now = time.perf_counter()
        if part is not None:
            self.seconds[part] += now - self._clock
        self._clock = now

    # -- the stream --------------------------------------------------------------------------

    def __iter__(self):
        with _eval_mode(self.model), torch.no_grad():
            yield from self._run()

    def _run(self):  # noqa: C901 - one loop, kept in one piece to follow ASE's order
        self._device, self._dtype, self._clock = self.device, self.dtype, time.perf_counter()
        own_graph = not self.rebuild_graph
        graph = (self.cutoff, self.max_neighbors, self.graph_convention)
        family = _triplet_family(self.model)
        source = iter(enumerate(self.systems))
        lookahead: list = []  # the next waiting system: [(position, _System, cost)]

        def peek():
            if not lookahead:
                try:
                    position, sample = next(source)
                except StopIteration:
                    return None
                if self._device is None:
                    self._device = sample.pos.device
                if self._dtype is None:
                    self._dtype = sample.pos.dtype
                system = _system(sample, self._device, self._dtype, own_graph, graph)
                cost = (
                    system_cost(
                        system,
                        self.budget_on,
                        self.cutoff,
                        self.max_neighbors,
                        family,
                        self.graph_convention,
                    )
                    if self.budget is not None
                    else int(system.pos.shape[0])
                )
                lookahead.append((position, system, cost))
            return lookahead[0]

        slots = max(1, min(self.memory, self.steps))  # ASE keeps min(steps taken, memory) pairs
        h0 = 1.0 / self.alpha  # ASE's initial inverse Hessian is diag(1/alpha)
        first = peek()
        if first is None:
            return
        device = self._device
        model_dtype = first[1].pos.dtype
        f64 = torch.float64

        # Systems in flight, in order of entry. Per system: [K]; per atom: [N]; history: [slots,
        # N,3] / [slots,K], written at the shared `head` every step by every system (a system at
        # step 0 writes zeros it never reads: its own pairs are always the newest `length`).
        keys: list[int] = []
        costs: list[int] = []
        graphs: list[tuple[Tensor, Tensor]] = []
        paths: list[list] = []
        natoms = torch.zeros(0, dtype=torch.long, device=device)
        nsteps = torch.zeros(0, dtype=torch.long, device=device)
        cell = torch.zeros(0, 3, 3, dtype=model_dtype, device=device)
        pbc = torch.zeros(0, 3, dtype=torch.bool, device=device)
        numbers = torch.zeros(0, dtype=torch.long, device=device)
        fixed = torch.zeros(0, dtype=torch.bool, device=device)
        tags: Tensor | None = torch.zeros(0, dtype=torch.long, device=device)
        pos = torch.zeros(0, 3, dtype=f64, device=device)
        r0 = torch.zeros(0, 3, dtype=f64, device=device)
        f0 = torch.zeros(0, 3, dtype=f64, device=device)
        s_hist = torch.zeros(slots, 0, 3, dtype=f64, device=device)
        y_hist = torch.zeros(slots, 0, 3, dtype=f64, device=device)
        rho_hist = torch.zeros(slots, 0, dtype=f64, device=device)
        head = 0
        in_flight = 0  # the budget cost of the systems in flight
        changed = True  # membership changed since the derived tensors were made
        structure = free3 = free = ptr = edges = None

        while True:
            # Admit waiting systems, in order, while the budget allows (the first one always).
            # Graph parallel: every rank of a group decides from the same systems, costs and
            # convergence tests (forces all-reduced within the group) in the same order, so the
            # ranks refill identically and take part in the same model calls; no collective.
            entering = []
            while True:
                nxt = peek()
                if nxt is None:
                    break
                count = len(keys) + len(entering)
                if count and (
                    (self.max_systems is not None and count >= self.max_systems)
                    or (self.budget is not None and in_flight + nxt[2] > self.budget)
                ):
                    break
                entering.append(lookahead.pop())
                in_flight += nxt[2]
            if entering:
                new = [system for _, system, _ in entering]
                keys += [position for position, _, _ in entering]
                costs += [cost for _, _, cost in entering]
                sizes = [int(system.pos.shape[0]) for system in new]
                added = sum(sizes)
                natoms = torch.cat([natoms, torch.tensor(sizes, device=device)])
                nsteps = torch.cat([nsteps, torch.zeros(len(new), dtype=torch.long, device=device)])
                cell = torch.cat([cell, torch.stack([system.cell for system in new])])
                pbc = torch.cat([pbc, torch.stack([system.pbc for system in new])])
                numbers = torch.cat([numbers, *(system.numbers for system in new)])
                fixed = torch.cat([fixed, *(system.fixed for system in new)])
                if tags is not None and all(system.tags is not None for system in new):
                    tags = torch.cat([tags, *(system.tags for system in new)])
                else:
                    tags = None
                pos = torch.cat([pos, *(system.pos.to(f64) for system in new)])
                zeros = torch.zeros(added, 3, dtype=f64, device=device)
                r0, f0 = torch.cat([r0, zeros]), torch.cat([f0, zeros])
                pad = torch.zeros(slots, added, 3, dtype=f64, device=device)
                s_hist, y_hist = torch.cat([s_hist, pad], 1), torch.cat([y_hist, pad], 1)
                rho_hist = torch.cat(
                    [rho_hist, torch.zeros(slots, len(new), dtype=f64, device=device)], 1
                )
                if own_graph:
                    graphs += [(system.edge_index, system.cell_offsets) for system in new]
                paths += [[] for _ in new]
                changed = True
            if not keys:
                return
            if changed:
                num = len(keys)
                structure = torch.repeat_interleave(torch.arange(num, device=device), natoms)
                free = ~fixed
                free3 = free.unsqueeze(-1).to(f64)
                ptr = torch.cat([natoms.new_zeros(1), torch.cumsum(natoms, 0)])
                if own_graph:
                    starts = ptr[:-1].tolist()
                    edges = (
                        torch.cat([g[0] + s for g, s in zip(graphs, starts, strict=True)], 1),
                        torch.cat([g[1] for g in graphs]),
                    )
                self.max_batch_cost = max(self.max_batch_cost, in_flight)
                changed = False
            num = len(keys)
            self._lap("bookkeeping")

            # The model at the current positions of every system in flight.
            model_pos = pos.to(model_dtype)
            if own_graph:
                edge_index, cell_offsets = edges
            else:
                edge_index, cell_offsets, _ = radius_graph_batch(
                    model_pos,
                    cell,
                    pbc,
                    natoms,
                    self.cutoff,
                    self.max_neighbors,
                    convention=self.graph_convention,
                )
            self._lap("graph")
            batch = Batch(
                pos=model_pos,
                atomic_numbers=numbers,
                natoms=natoms,
                batch=structure,
                ptr=ptr,
                cell=cell,
                pbc=pbc,
                fixed=fixed,
                free=free,
                edge_index=edge_index,
                cell_offsets=cell_offsets,
            )
            if tags is not None:
                batch.tags = tags
            self._lap("bookkeeping")
            energy, raw_forces = _evaluate(self.model, batch)
            self.model_calls += 1
            self._lap("model")
            forces = raw_forces * free3

            dot, per_atom = _per_system(structure, num)
            # ASE LBFGS.update: the pair of the last step (zeros for systems at step 0).
            stepped = nsteps > 0
            s0 = (pos - r0) * per_atom(stepped.to(f64))
            y0 = (f0 - forces) * per_atom(stepped.to(f64))  # gradient - gradient0
            rho0 = torch.where(stepped, 1.0 / dot(y0, s0), torch.zeros_like(energy))
            s_hist[head], y_hist[head], rho_hist[head] = s0, y0, rho0
            head = (head + 1) % slots
            length = torch.clamp(nsteps, max=self.memory)  # pairs each system holds
            fnorm = _segment_max(_atom_norms(forces), structure, num)
            converged = fnorm < self.fmax
            done = converged | (nsteps >= self.steps)
            self._lap("lbfgs")

            if self.trajectory:
                for i, (start, stop) in enumerate(pairwise(ptr.tolist())):
                    paths[i].append(
                        (pos[start:stop].clone(), energy[i].clone(), raw_forces[start:stop].clone())
                    )
            if bool(done.any()):
                finished = done.nonzero().flatten().tolist()
                flags = converged.tolist()
                taken = nsteps.tolist()
                bounds = ptr.tolist()
                for i in finished:
                    start, stop = bounds[i], bounds[i + 1]
                    relaxed = RelaxedSystem(
                        pos=pos[start:stop].clone(),
                        energy=energy[i].clone(),
                        forces=raw_forces[start:stop].clone(),
                        steps=int(taken[i]),
                        converged=bool(flags[i]),
                    )
                    if self.trajectory:
                        frames = paths[i]
                        relaxed.trajectory_pos = torch.stack([f[0] for f in frames])
                        relaxed.trajectory_energy = torch.stack([f[1] for f in frames])
                        relaxed.trajectory_forces = torch.stack([f[2] for f in frames])
                    self._lap("bookkeeping")
                    yield keys[i], relaxed
                    self._lap(None)
                # Retire the finished systems.
                keep = ~done
                kept = keep.nonzero().flatten().tolist()
                keep_atoms = keep[structure]
                keys = [keys[i] for i in kept]
                in_flight -= sum(costs[i] for i in finished)
                costs = [costs[i] for i in kept]
                paths = [paths[i] for i in kept]
                if own_graph:
                    graphs = [graphs[i] for i in kept]
                natoms, nsteps, cell, pbc = natoms[keep], nsteps[keep], cell[keep], pbc[keep]
                numbers, fixed, pos = numbers[keep_atoms], fixed[keep_atoms], pos[keep_atoms]
                tags = None if tags is None else tags[keep_atoms]
                forces, fnorm = forces[keep_atoms], fnorm[keep]
                s_hist, y_hist = s_hist[:, keep_atoms], y_hist[:, keep_atoms]
                rho_hist, length = rho_hist[:, keep], length[keep]
                changed = True
                num = len(keys)
                structure = torch.repeat_interleave(torch.arange(num, device=device), natoms)
                free = ~fixed
                free3 = free.unsqueeze(-1).to(f64)
                dot, per_atom = _per_system(structure, num)
                self._lap("bookkeeping")
                if not keys:
                    r0 = f0 = pos
                    continue

            # LBFGSMethod.compute_step: the two-loop recursion, newest pair first, each system
            # over its own `length` pairs (masked: a no-op for the others).
            q = -forces
            longest_history = int(length.max())
            alphas = []
            for k in range(longest_history):
                slot = (head - 1 - k) % slots
                has = length > k
                a = torch.where(has, rho_hist[slot] * dot(s_hist[slot], q), 0.0)
                q = q - per_atom(a) * y_hist[slot]
                alphas.append((slot, has, a))
            z = q * h0
            for slot, has, a in reversed(alphas):
                b = torch.where(has, rho_hist[slot] * dot(y_hist[slot], z), 0.0)
                z = z + s_hist[slot] * per_atom(a - b)
            p = -z
            # LBFGS.determine_step: scale each system's longest atomic step to maxstep.
            longest = _segment_max(_atom_norms(p), structure, num)
            scale = torch.where(
                longest >= self.maxstep, self.maxstep / longest, torch.ones_like(longest)
            )
            dr = p * per_atom(scale) * self.damping
            r0, f0 = pos, forces
            pos = torch.where(free.unsqueeze(-1), pos + dr, pos)
            nsteps = nsteps + 1
            self._lap("lbfgs")


def relax_batch(
    model,
    batch,
    fmax: float = 0.05,
    steps: int = 200,
    maxstep: float = 0.04,
    memory: int = 50,
    damping: float = 1.0,
    alpha: float = 70.0,
    cutoff: float = 6.0,
    max_neighbors: int | None = 50,
    rebuild_graph: bool = True,
    trajectory: bool = False,
) -> RelaxResult:
    """Relax every system of `batch` with ASE's L-BFGS, step for step (fmax in eV/A, A).

    Each system follows `LBFGS(atoms, maxstep, memory, damping, alpha).run(fmax, steps)`:
    converged (max force norm over free atoms < fmax, tested before each step) systems leave
    the model calls; the loop ends when all have converged or `steps` steps were taken. Every
    model call rebuilds the graph (`rebuild_graph`) with `radius_graph_batch(cutoff,
    max_neighbors)`, the first one included. Energies/forces of the result come from the model
    call at the final positions. The stream of one batch (`RelaxStream`, no refills).
    """
    stream = RelaxStream(
        model,
        _batch_systems(batch),
        fmax=fmax,
        steps=steps,
        maxstep=maxstep,
        memory=memory,
        damping=damping,
        alpha=alpha,
        cutoff=cutoff,
        max_neighbors=max_neighbors,
        rebuild_graph=rebuild_graph,
        trajectory=trajectory,
        device=batch.pos.device,
        dtype=batch.pos.dtype,
    )
    found = dict(stream)
    relaxed = [found[i] for i in range(len(found))]
    result = RelaxResult(
        pos=[r.pos for r in relaxed],
        energy=torch.stack([r.energy for r in relaxed]).reshape(-1),
        forces=[r.forces for r in relaxed],
        steps=torch.tensor([r.steps for r in relaxed], dtype=torch.long),
        converged=torch.tensor([r.converged for r in relaxed], dtype=torch.bool),
        model_calls=stream.model_calls,
    )
    if trajectory:
        result.trajectory_pos = [r.trajectory_pos for r in relaxed]
        result.trajectory_energy = [r.trajectory_energy for r in relaxed]
        result.trajectory_forces = [r.trajectory_forces for r in relaxed]
    return result


# ----------------------------------------------------------------------------------------------
# Datasets of samples -> relaxed extxyz files
# ----------------------------------------------------------------------------------------------


def _sid(sample, fallback: int) -> str:
    sid = getattr(sample, "sid", None)
    if sid is None:
        return str(fallback)
    return str(int(sid)) if isinstance(sid, Tensor | np.integer | int) else str(sid)


def _atoms(sample, pos: Tensor, energy: float, forces: Tensor, info: dict):
    """The relaxed structure of `sample` as `ase.Atoms` with a SinglePointCalculator."""
    from ase import Atoms
    from ase.calculators.singlepoint import SinglePointCalculator
    from ase.constraints import FixAtoms

    atoms = Atoms(
        numbers=sample.atomic_numbers.cpu().long().numpy(),
        positions=pos.cpu().double().numpy(),
        cell=sample.cell.cpu().double().reshape(3, 3).numpy(),
        pbc=sample.pbc.cpu().bool().reshape(3).numpy(),
    )
    if getattr(sample, "tags", None) is not None:
        atoms.set_tags(sample.tags.cpu().long().numpy())
    fixed = getattr(sample, "fixed", None)
    if fixed is not None and bool(fixed.any()):
        atoms.set_constraint(FixAtoms(mask=fixed.cpu().bool().numpy()))
    atoms.info.update(info)
    atoms.calc = SinglePointCalculator(
        atoms, energy=float(energy), forces=forces.cpu().double().numpy()
    )
    return atoms


def _write_extxyz(path: Path, images) -> None:
    """Write `images` to `path` atomically (temporary sibling, then os.replace)."""
    import ase.io

    with atomic_path(path) as tmp:
        ase.io.write(tmp, images, format="extxyz")


def _summary(path: Path) -> dict:
    import ase.io

    atoms = ase.io.read(path, format="extxyz")
    return {
        "sid": str(atoms.info["sid"]),
        "steps": int(atoms.info["steps"]),
        "converged": bool(atoms.info["converged"]),
        "energy": float(atoms.get_potential_energy()),
        "path": str(path),
        "relaxation": str(atoms.info.get("relaxation")),
    }


def _previous(path: Path) -> dict | None:
    """The summary of an earlier relaxation's file, None if there is none or it does not read
    (a file of another program or version: relaxed again)."""
    if not path.exists():
        return None
    try:
        return _summary(path)
    except (OSError, ValueError, KeyError, IndexError, RuntimeError):
        return None


def _digest(*parts) -> hashlib._Hash:
    digest = hashlib.sha256()
    for part in parts:
        if isinstance(part, Tensor):
            part = part.detach().cpu().contiguous()
            digest.update(f"{part.dtype}{tuple(part.shape)}".encode())
            digest.update(part.reshape(-1).view(torch.uint8).numpy().tobytes())
        else:
            digest.update(json.dumps(part, sort_keys=True, default=str).encode())
    return digest


def relaxation_ids(model, samples: list, options: dict, dtype: torch.dtype | None) -> list[str]:
    """What each system's relaxation is (sha256): the model's class, structure (an nn.Module's
    repr) and weights (parameters and buffers, normalisation included), every `relax_batch`
    setting with its default filled in,
    the dtype, and the system (numbers, positions, cell, pbc, fixed, tags). Recorded in each
    relaxed file (`relaxation`); a file is resumed only when its id matches, so relaxations of
    another model, checkpoint, setting or input are never credited to this one."""
    defaults = {
        name: parameter.default
        for name, parameter in inspect.signature(relax_batch).parameters.items()
        if parameter.default is not inspect.Parameter.empty and name != "trajectory"
    }
    settings = {**defaults, **{k: v for k, v in options.items() if k != "trajectory"}}
    state = model.state_dict() if isinstance(model, torch.nn.Module) else {}
    weights = _digest(
        f"{type(model).__module__}.{type(model).__qualname__}",
        repr(model) if isinstance(model, torch.nn.Module) else "",
        sorted(state),
        *state.values(),
        settings,
        str(dtype),
    )
    ids = []
    for sample in samples:
        digest = weights.copy()
        for name in ("atomic_numbers", "pos", "cell", "pbc", "fixed", "tags"):
            value = getattr(sample, name, None)
            digest.update(_digest(name, value if value is not None else "-").digest())
        ids.append(digest.hexdigest())
    return ids


def relax_dataset(
    model,
    samples: Iterable,
    out_dir: str | os.PathLike,
    batch_size: int | None = 8,
    save_trajectory: bool = False,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    progress: bool = True,
    write: bool = True,
    ids: list[str] | None = None,
    budget: float | None = None,
    budget_on: str = "atoms",
    **relax_options,
) -> list[dict]:
    """Relax `samples` as one stream (`RelaxStream`: at most `batch_size` systems, None for no
    limit, and at most `budget` atoms, edges or triplets (`budget_on`) per model call, refilled
    as systems finish); write `out_dir/<sid>.extxyz` (and `<sid>.traj.extxyz`) as soon as each
    system is relaxed.

    Files are written atomically and record their relaxation's identity (`relaxation_ids`):
    systems whose `<sid>.extxyz` holds this relaxation are skipped, so a killed run resumes
    where it stopped, and files of another model, checkpoint, setting or input are relaxed
    again (said on stderr). `dtype` casts positions/cells (e.g. float64 for an oracle),
    `device` defaults to the model's. Returns one summary dict per sample (sid, steps,
    converged, energy, path), read back from the file for skipped systems. `write=False` on
    all but one rank of a graph-parallel group: they relax the same stream in lockstep (every
    rank takes part in the model's collectives) and hold the same results. `ids` are the
    samples' `relaxation_ids` when the caller has them already (computed here otherwise).
    `batch_size`, `budget` and `budget_on` change what is relaxed together, never a system's
    trajectory: they are not part of the relaxation's identity.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    relax_options = {"trajectory": save_trajectory, **relax_options}
    if device is None:
        parameter = next(iter(model.parameters()), None) if hasattr(model, "parameters") else None
        device = parameter.device if parameter is not None else torch.device("cpu")
    samples = list(samples)
    if ids is None:
        ids = relaxation_ids(model, samples, relax_options, dtype)
    summaries: dict[str, dict] = {}
    order: list[str] = []
    todo: list[tuple[str, object, str]] = []
    stale = 0
    for index, (sample, relaxation) in enumerate(zip(samples, ids, strict=True)):
        sid = _sid(sample, index)
        order.append(sid)
        previous = _previous(out_dir / f"{sid}.extxyz")
        if previous is not None and previous["relaxation"] == relaxation:
            summaries[sid] = previous
        else:
            stale += (out_dir / f"{sid}.extxyz").exists()
            todo.append((sid, sample, relaxation))
    if stale and write:
        print(
            f"relax: {stale} relaxed structure(s) in {out_dir} are of another model, "
            "checkpoint, setting or input: relaxing them again",
            file=sys.stderr,
        )

    bar = tqdm(
        total=len(samples),
        initial=len(samples) - len(todo),
        desc="relax",
        unit="system",
        disable=not progress,
    )
    stream = RelaxStream(
        model,
        (sample for _, sample, _ in todo),
        **relax_options,
        budget=budget,
        budget_on=budget_on,
        max_systems=batch_size,
        device=device,
        dtype=dtype,
    )
    try:
        for position, result in stream:
            bar.update(1)
            if not write:
                continue
            sid, sample, relaxation = todo[position]
            info = {
                "sid": sid,
                "steps": result.steps,
                "converged": result.converged,
                "relaxation": relaxation,
            }
            path = out_dir / f"{sid}.extxyz"
            if result.trajectory_pos is not None:
                frames = [
                    _atoms(sample, p, e, f, {**info, "step": k})
                    for k, (p, e, f) in enumerate(
                        zip(
                            result.trajectory_pos,
                            result.trajectory_energy.tolist(),
                            result.trajectory_forces,
                            strict=True,
                        )
                    )
                ]
                _write_extxyz(out_dir / f"{sid}.traj.extxyz", frames)
            energy = float(result.energy)
            _write_extxyz(path, _atoms(sample, result.pos, energy, result.forces, info))
            summaries[sid] = {**info, "energy": energy, "path": str(path)}
    finally:
        bar.close()
    return [summaries[sid] for sid in order] if write else []


def read_relaxed(samples: Iterable, out_dir: str | os.PathLike, ids: list[str]) -> list[dict]:
    """The summaries (sid, steps, converged, energy, path) of `relax_dataset`'s files for
    `samples`, e.g. after the data-parallel ranks relaxed their shares; each file must hold
    the relaxation `ids` says (`relaxation_ids`)."""
    out_dir = Path(out_dir)
    summaries = []
    for index, (sample, relaxation) in enumerate(zip(samples, ids, strict=True)):
        path = out_dir / f"{_sid(sample, index)}.extxyz"
        if not path.exists():
            raise FileNotFoundError(f"{path}: no relaxed structure (did a rank fail?)")
        summary = _summary(path)
        if summary["relaxation"] != relaxation:
            raise ValueError(f"{path} holds another relaxation than this one (did a rank fail?)")
        summaries.append(summary)
    return summaries


# ----------------------------------------------------------------------------------------------
# The relaxation job: a checkpoint relaxes a split -> IS2RS/IS2RE metrics and predictions
# ----------------------------------------------------------------------------------------------


def relaxation_metrics(samples: list, relaxed: list, energy: np.ndarray, oracle: str) -> dict:
    """IS2RS and IS2RE metrics of ML-relaxed structures (`relaxed`: ase.Atoms in the order of
    `samples`, `energy`: their predicted energies): {"is2rs", "is2re", "per_system"}, metrics
    null with the reason where labels or an oracle are missing. `per_system` holds each
    system's mean free-atom distance to the relaxed label (A) and oracle max force (eV/A), NaN
    where not computable, for the DwT and FbT curves."""
    nan = np.full(len(samples), np.nan)
    per_system = {"distance": nan, "oracle_max_force": nan.copy()}
    labelled = bool(samples) and "pos_relaxed" in samples[0] and "energy_relaxed" in samples[0]
    if not labelled:
        reason = (
            "the split has no systems"
            if not samples
            else ("the split has no relaxed labels (hidden test labels)")
        )
        is2rs = {"adwt": None, "fbt": None, "afbt": None, "n_systems": len(samples)}
        is2re = {"energy_mae": None, "ewt": None, "n_systems": len(samples)}
        is2rs["reason"] = is2re["reason"] = reason
        return {"is2rs": is2rs, "is2re": is2re, "per_system": per_system}
    oracle_result = oracle_max_forces(relaxed, oracle)
    found = fbt_afbt(oracle_result)
    sums = MetricSums().update_is2rs(
        np.concatenate([atoms.positions for atoms in relaxed]),
        torch.cat([sample.pos_relaxed for sample in samples]),
        torch.stack([sample.cell.reshape(3, 3) for sample in samples]),
        torch.stack([sample.pbc.reshape(3) for sample in samples]),
        torch.stack([sample.natoms.reshape(()) for sample in samples]),
        torch.cat([sample.fixed.bool() for sample in samples]),
        oracle_max_force=oracle_result.max_forces,
    )
    is2rs = {**sums.result("is2rs"), "fbt": found["fbt"], "afbt": found["afbt"]}
    if found["fbt_reason"]:
        is2rs["fbt_reason"] = found["fbt_reason"]
    per_system["distance"] = np.array(sums.distances)
    if oracle_result.max_forces is not None:
        per_system["oracle_max_force"] = np.asarray(oracle_result.max_forces, dtype=np.float64)
    target = torch.stack([sample.energy_relaxed.reshape(()) for sample in samples])
    is2re = is2re_metrics(energy, target)
    per_system["energy_target"] = target.double().numpy()
    return {"is2rs": is2rs, "is2re": is2re, "per_system": per_system}


def evaluate_relaxations(
    checkpoint: Path,
    data: Path,
    split: str,
    out_dir: Path,
    metrics_dir: Path,
    predictions_dir: Path,
    oracle: str = "emt",
    batch_size: int | None = 8,
    fmax: float = 0.05,
    steps: int = 200,
    device: str = "auto",
    gp_size: int | None = None,
    allow_data_mismatch: bool = False,
    budget: float | None = None,
    budget_on: str = "atoms",
) -> dict | None:
    """Relax every system of an IS2RE/IS2RS split with the model; IS2RS and IS2RE metrics
    (null with the reason where labels or an oracle are missing) and predictions.

    Under torchrun with W = G x D processes (`gp_size` = G, default W): each of the D
    data-parallel groups relaxes every D-th system with the model split over its G ranks;
    rank 0 then reads all relaxed structures back and writes the metrics. Returns the metrics
    on rank 0, None on the other ranks. `out_dir` is locked for the job (graphpar.lock). The
    split's energies must be on the reference of the checkpoint's training data, unless
    `allow_data_mismatch`. Each group relaxes its systems as one stream of at most `batch_size`
    systems (None: no limit) and `budget` atoms, edges or triplets (`budget_on`) per model call
    (`relax_dataset`). `fmax` 0 runs every system for exactly `steps` steps (OC20's IS2RS
    protocol).
    """
    from ase.io import read

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank_device = join_processes(gp_size or world_size, device)
    dims = get_dims()
    if dims.world_size > 1:
        # Data-parallel ranks finish their shares hours apart on big splits: wait for them on
        # a group whose timeout is not the graph-parallel collectives' (short, to catch hangs).
        finished = dist.new_group(backend="gloo", timeout=datetime.timedelta(days=7))
    state = read_checkpoint(checkpoint)
    model = trained_model(state, rank_device)
    cutoff, max_neighbors = graph_settings(state.get("graph"), model)
    dataset = LmdbDataset(data)
    # Relaxations build their own graphs with the checkpoint's settings: only the energies'
    # reference (IS2RE targets) must agree.
    check_checkpoint_data(
        state, checkpoint, dataset.metadata, data, ("energy_reference",), allow_data_mismatch
    )
    samples = [dataset[i] for i in range(len(dataset))]
    options = {"fmax": fmax, "steps": steps, "cutoff": cutoff, "max_neighbors": max_neighbors}
    convention = graph_convention(state.get("graph"))
    if convention != "graphpar":  # the default stays out of the relaxation ids (resumes hold)
        options["graph_convention"] = convention
    relaxations = relaxation_ids(model, samples, options, None)  # for relaxing and reading back
    if is_main():
        print(f"relax {split}: {len(samples)} systems, G x D = {dims.gp_size} x {dims.dp_size}")
    with main_rank_lock(out_dir, "relaxation"):
        if is_main():
            for path in remove_temporaries(out_dir) if out_dir.is_dir() else []:
                print(f"removed {path}, left by a killed run", file=sys.stderr)
        relax_dataset(
            model,
            samples[dims.dp_rank :: dims.dp_size],
            out_dir,
            batch_size=batch_size,
            progress=is_main(),
            write=dims.gp_rank == 0,
            ids=relaxations[dims.dp_rank :: dims.dp_size],
            budget=budget,
            budget_on=budget_on,
            **options,
        )
        if dims.world_size > 1:
            dist.barrier(group=finished)
        if dims.rank != 0:
            return None
        summaries = read_relaxed(samples, out_dir, relaxations)
    relaxed = [read(summary["path"]) for summary in summaries]
    ids = [str(summary["sid"]) for summary in summaries]
    energy = np.array([summary["energy"] for summary in summaries])
    pos = [atoms.positions for atoms in relaxed]  # every atom, as fairchem's run-relaxations
    found = relaxation_metrics(samples, relaxed, energy, oracle)
    extra = {
        "oracle": oracle,
        "relaxed_converged": sum(bool(summary["converged"]) for summary in summaries),
        "provenance": checkpoint_provenance(checkpoint, state, data),
    }
    is2rs = {"task": "is2rs", "split": split, **found["is2rs"], **extra}
    is2re = {"task": "is2re", "split": split, "method": "relaxation", **found["is2re"], **extra}
    write_json(metrics_dir / f"is2rs_{split}.json", is2rs)
    write_json(metrics_dir / f"is2re_{split}.json", is2re)
    # OC20's submission keys (ids, pos + chunk_idx over all atoms, energy; graphpar.submission),
    # each atom's `fixed`, and per-system values for plots.
    per_system = found["per_system"]
    write_npz(
        predictions_dir / f"is2rs_{split}.npz",
        ids=np.array(ids, dtype=str),
        pos=np.concatenate(pos) if pos else np.zeros((0, 3)),
        chunk_idx=np.cumsum([len(p) for p in pos])[:-1],
        fixed=np.concatenate([s.fixed.bool().numpy() for s in samples] or [np.zeros(0, bool)]),
        distance=per_system["distance"],
        oracle_max_force=per_system["oracle_max_force"],
    )
    energy_target = per_system.get("energy_target", np.full(len(samples), np.nan))
    write_npz(
        predictions_dir / f"is2re_{split}.npz",
        ids=np.array(ids, dtype=str),
        energy=energy,
        energy_target=energy_target,
    )
    return {"is2rs": is2rs, "is2re": is2re}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m graphpar.relax",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--checkpoint", type=Path, required=True, help="a final.pt of a run")
    parser.add_argument("--data", type=Path, required=True, help="preprocessed IS2RE split folder")
    parser.add_argument("--split", required=True, help="split name recorded in the metrics")
    parser.add_argument("--out-dir", type=Path, required=True, help="relaxed structures (resumed)")
    parser.add_argument("--metrics-dir", type=Path, required=True)
    parser.add_argument("--predictions-dir", type=Path, required=True)
    parser.add_argument("--oracle", default="emt", help="'emt' or package.module:Calculator")
    parser.add_argument(
        "--batch-size",
        type=int,
        default=8,
        help="at most this many systems per model call (0: no limit; see --budget)",
    )
    parser.add_argument(
        "--budget",
        type=float,
        help="at most this many atoms, edges or triplets (--budget-on) per model call; the "
        "batch is refilled as systems finish, and a system over the budget alone runs alone",
    )
    parser.add_argument("--budget-on", choices=BUDGET_ON, default="atoms")
    parser.add_argument(
        "--fmax",
        type=float,
        default=0.05,
        help="eV/A: a system stops once its largest free-atom force is below (0: never, every "
        "system takes --steps steps, OC20's IS2RS protocol)",
    )
    parser.add_argument("--steps", type=int, default=200, help="L-BFGS steps at most")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--gp-size",
        type=int,
        help="G under torchrun: graph-parallel ranks per system batch (default: all processes)",
    )
    parser.add_argument(
        "--allow-data-mismatch",
        action="store_true",
        help="relax even though the split's energies are on another reference than the "
        "checkpoint's training data (total vs adsorption energies)",
    )
    args = parser.parse_args(argv)
    try:
        found = evaluate_relaxations(
            args.checkpoint,
            args.data,
            args.split,
            args.out_dir,
            args.metrics_dir,
            args.predictions_dir,
            args.oracle,
            args.batch_size or None,
            args.fmax,
            args.steps,
            args.device,
            args.gp_size,
            args.allow_data_mismatch,
            args.budget,
            args.budget_on,
        )
    except (TrainingError, FolderLocked, FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)
    finally:
        leave_processes()
    for metrics in [found["is2rs"], found["is2re"]] if found else []:
        shown = {k: v for k, v in metrics.items() if k != "provenance"}
        print(
            " ".join(
                f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in shown.items()
            )
        )


if __name__ == "__main__":
    main()
