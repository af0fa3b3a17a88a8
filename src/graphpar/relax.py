"""Batched L-BFGS structure relaxation with a graphpar model (or any `model(batch)` callable).

    result = relax_batch(model, batch, fmax=0.05, steps=200)
    result.pos[i], result.energy[i], result.forces[i], result.steps[i], result.converged[i]
    summaries = relax_dataset(model, samples, "relaxed/", batch_size=8)

`relax_batch` is ASE's `ase.optimize.LBFGS` (no line search) run on every system of a batch at
once: each system has its own s/y/rho history, step cap and convergence test, and FixAtoms atoms
(`batch.fixed`) feel no force and never move. The optimiser state is float64 whatever the
model's dtype; the model sees positions in the batch's own dtype. Per-system sums are sequential
`index_add_` over that system's atoms, so (on CPU) a system's trajectory does not depend on the
other systems of its batch.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from graphpar.data.dataset import TRIPLET_FIELDS
from graphpar.data.graph import radius_graph_batch
from graphpar.io import atomic_path

# Batch fields derived from the graph; stale once atoms move (the models rebuild them if absent).
TRIPLET_KEYS = tuple(key for keys in TRIPLET_FIELDS.values() for key in keys)


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


def _segment_sum(values: Tensor, index: Tensor, size: int) -> Tensor:
    """Per-system sums of per-atom `values` [N] (sequential over each system's atoms on CPU)."""
    return torch.zeros(size, dtype=values.dtype, device=values.device).index_add_(0, index, values)


def _segment_max(values: Tensor, index: Tensor, size: int) -> Tensor:
    """Per-system maxima of non-negative per-atom `values` [N] (0 for a system with no atoms)."""
    out = torch.zeros(size, dtype=values.dtype, device=values.device)
    return out.scatter_reduce_(0, index, values, reduce="amax", include_self=True)


def _atom_norms(vectors: Tensor) -> Tensor:
    """Euclidean norm of each row of [N,3], as `np.linalg.norm(x, axis=1)`."""
    return torch.sqrt((vectors * vectors).sum(-1))


def _with_positions(batch, pos: Tensor, rebuild: bool, cutoff: float, max_neighbors: int | None):
    """A shallow copy of `batch` at positions `pos`, its graph rebuilt and triplets dropped."""
    moved = batch.clone() if hasattr(batch, "clone") else batch
    moved.pos = pos
    if rebuild:
        edge_index, cell_offsets, _ = radius_graph_batch(
            pos, moved.cell, moved.pbc, moved.natoms, cutoff, max_neighbors
        )
        moved.edge_index = edge_index
        moved.cell_offsets = cell_offsets
        for key in TRIPLET_KEYS:
            if key in moved:
                delattr(moved, key)
    return moved


def _systems(batch, keep: Tensor):
    """The systems of `batch` where `keep` [B] is true, as a new batch (all of it if all)."""
    if bool(keep.all()):
        return batch
    from graphpar.data.dataset import collate

    return collate([batch.get_example(i) for i in keep.nonzero().flatten().tolist()])


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
    converged (max force norm over free atoms < fmax, tested before each step) systems freeze;
    the loop ends when all have converged or `steps` steps were taken. After every move the
    graph is rebuilt (`rebuild_graph`) with `radius_graph_batch(cutoff, max_neighbors)`.
    Energies/forces of the result come from the model call at the final positions.
    """
    if maxstep > 1.0:
        raise ValueError(f"maxstep {maxstep} A is much too large")
    with _eval_mode(model), torch.no_grad():
        model_dtype = batch.pos.dtype
        device = batch.pos.device
        natoms = batch.natoms.reshape(-1).long()
        num_systems = natoms.numel()
        structure = getattr(batch, "batch", None)
        if structure is None:
            structure = torch.repeat_interleave(torch.arange(num_systems, device=device), natoms)
        fixed = getattr(batch, "fixed", None)
        free = (
            torch.ones(batch.pos.shape[0], dtype=torch.bool, device=device)
            if fixed is None
            else ~fixed.bool()
        )
        free3 = free.unsqueeze(-1).double()
        h0 = 1.0 / alpha  # ASE's initial inverse Hessian is diag(1/alpha)

        def dot(a: Tensor, b: Tensor) -> Tensor:
            return _segment_sum((a * b).sum(-1), structure, num_systems)

        def per_atom(values: Tensor) -> Tensor:
            return values[structure].unsqueeze(-1)

        pos = batch.pos.detach().double().clone()
        current = (
            batch
            if "edge_index" in batch
            else _with_positions(batch, batch.pos, True, cutoff, max_neighbors)
        )
        energy, raw_forces = _evaluate(model, current)
        calls = 1
        forces = raw_forces * free3
        active = torch.ones(num_systems, dtype=torch.bool, device=device)
        converged = torch.zeros(num_systems, dtype=torch.bool, device=device)
        nsteps = torch.zeros(num_systems, dtype=torch.long, device=device)
        traj_pos, traj_energy, traj_forces = [pos.clone()], [energy.clone()], [raw_forces.clone()]

        s_hist: list[Tensor] = []
        y_hist: list[Tensor] = []
        rho_hist: list[Tensor] = []
        r0 = f0 = None
        remaining = moving = template = None  # the systems (and atoms) the model last saw
        step = 0
        while True:
            fnorm = _segment_max(_atom_norms(forces), structure, num_systems)
            converged = converged | (active & (fnorm < fmax))
            active = active & ~converged
            if not bool(active.any()) or step >= steps:
                break
            # ASE LBFGS.update: history from the previous step (active systems only).
            if step > 0:
                s0 = (pos - r0) * per_atom(active.double())
                y0 = (f0 - forces) * per_atom(active.double())  # gradient - gradient0
                rho0 = torch.where(active, 1.0 / dot(y0, s0), torch.zeros_like(fnorm))
                s_hist.append(s0)
                y_hist.append(y0)
                rho_hist.append(rho0)
                if step > memory:
                    s_hist.pop(0)
                    y_hist.pop(0)
                    rho_hist.pop(0)
            # LBFGSMethod.compute_step: two-loop recursion with per-system dot products.
            q = -forces
            a = [None] * len(s_hist)
            for i in range(len(s_hist) - 1, -1, -1):
                a[i] = rho_hist[i] * dot(s_hist[i], q)
                q = q - per_atom(a[i]) * y_hist[i]
            z = q * h0
            for i in range(len(s_hist)):
                b = rho_hist[i] * dot(y_hist[i], z)
                z = z + s_hist[i] * per_atom(a[i] - b)
            p = -z
            # LBFGS.determine_step: scale each system's longest atomic step to maxstep.
            longest = _segment_max(_atom_norms(p), structure, num_systems)
            scale = torch.where(longest >= maxstep, maxstep / longest, torch.ones_like(longest))
            dr = p * per_atom(scale) * damping
            move = (active[structure] & free).unsqueeze(-1)
            r0, f0 = pos, forces
            pos = torch.where(move, pos + dr, pos)
            step += 1
            nsteps = nsteps + active.long()

            # The model sees only the systems still moving: converged ones cost nothing more,
            # and keep the values of their own final positions (batch independence).
            if remaining is None or not torch.equal(remaining, active):
                remaining, moving = active.clone(), active[structure]
                template = _systems(batch, remaining)
            current = _with_positions(
                template, pos[moving].to(model_dtype), rebuild_graph, cutoff, max_neighbors
            )
            new_energy, new_raw = _evaluate(model, current)
            calls += 1
            energy = energy.clone()
            energy[remaining] = new_energy
            raw_forces = raw_forces.clone()
            raw_forces[moving] = new_raw
            forces = raw_forces * free3
            if trajectory:
                traj_pos.append(pos.clone())
                traj_energy.append(energy.clone())
                traj_forces.append(raw_forces.clone())

        bounds = torch.cumsum(natoms, 0).tolist()
        starts = [0, *bounds[:-1]]
        result = RelaxResult(
            pos=[pos[s:e] for s, e in zip(starts, bounds, strict=True)],
            energy=energy,
            forces=[raw_forces[s:e] for s, e in zip(starts, bounds, strict=True)],
            steps=nsteps.cpu(),
            converged=converged.cpu(),
            model_calls=calls,
        )
        if trajectory:
            tp, te, tf = torch.stack(traj_pos), torch.stack(traj_energy), torch.stack(traj_forces)
            result.trajectory_pos, result.trajectory_energy, result.trajectory_forces = [], [], []
            for i, (s, e) in enumerate(zip(starts, bounds, strict=True)):
                n = int(nsteps[i]) + 1
                result.trajectory_pos.append(tp[:n, s:e])
                result.trajectory_energy.append(te[:n, i])
                result.trajectory_forces.append(tf[:n, s:e])
        return result


class CalculatorModel(torch.nn.Module):
    """An ASE calculator as a graphpar "model": `model(batch) -> {"energy", "forces"}`.

    Each call builds one `ase.Atoms` per system (numbers, positions, cell, pbc), attaches a fresh
    calculator from `calculator_factory()` and returns energies [B] and unconstrained forces
    [N,3] in the dtype/device of `batch.pos`. The graph of the batch is ignored.
    """

    def __init__(self, calculator_factory: Callable[[], object]):
        super().__init__()
        self.calculator_factory = calculator_factory

    def forward(self, batch) -> dict[str, Tensor]:
        from ase import Atoms

        pos = batch.pos.detach().cpu().double().numpy()
        numbers = batch.atomic_numbers.detach().cpu().long().numpy()
        cell = batch.cell.detach().cpu().double().reshape(-1, 3, 3).numpy()
        pbc = batch.pbc.detach().cpu().bool().reshape(-1, 3).numpy()
        natoms = batch.natoms.detach().cpu().reshape(-1).long().tolist()
        energies, forces = [], []
        start = 0
        for i, n in enumerate(natoms):
            atoms = Atoms(
                numbers=numbers[start : start + n],
                positions=pos[start : start + n],
                cell=cell[i],
                pbc=pbc[i],
            )
            atoms.calc = self.calculator_factory()
            energies.append(atoms.get_potential_energy())
            forces.append(atoms.get_forces(apply_constraint=False))
            start += n
        like = batch.pos
        return {
            "energy": torch.as_tensor(np.array(energies), dtype=like.dtype, device=like.device),
            "forces": torch.as_tensor(
                np.concatenate(forces).reshape(-1, 3), dtype=like.dtype, device=like.device
            ),
        }


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
    }


def relax_dataset(
    model,
    samples: Iterable,
    out_dir: str | os.PathLike,
    batch_size: int = 8,
    save_trajectory: bool = False,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    progress: bool = True,
    write: bool = True,
    **relax_options,
) -> list[dict]:
    """Relax `samples` in batches; write `out_dir/<sid>.extxyz` (and `<sid>.traj.extxyz`).

    Files are written atomically; systems whose `<sid>.extxyz` exists are skipped, so a killed
    run resumes where it stopped. `dtype` casts positions/cells (e.g. float64 for an oracle),
    `device` defaults to the model's. Returns one summary dict per sample (sid, steps,
    converged, energy, path), read back from the file for skipped systems. `write=False` on
    all but one rank of a graph-parallel group: they relax the same batches (every rank takes
    part in the model's collectives) and hold the same results.
    """
    from tqdm import tqdm

    from graphpar.data.dataset import collate

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    relax_options = {"trajectory": save_trajectory, **relax_options}
    if device is None:
        parameter = next(iter(model.parameters()), None) if hasattr(model, "parameters") else None
        device = parameter.device if parameter is not None else torch.device("cpu")
    samples = list(samples)
    summaries: dict[str, dict] = {}
    order: list[str] = []
    todo: list[tuple[str, object]] = []
    for index, sample in enumerate(samples):
        sid = _sid(sample, index)
        order.append(sid)
        if (out_dir / f"{sid}.extxyz").exists():
            summaries[sid] = _summary(out_dir / f"{sid}.extxyz")
        else:
            todo.append((sid, sample))

    bar = tqdm(
        total=len(samples),
        initial=len(samples) - len(todo),
        desc="relax",
        unit="system",
        disable=not progress,
    )
    try:
        for start in range(0, len(todo), batch_size):
            chunk = todo[start : start + batch_size]
            batch = collate([sample for _, sample in chunk]).to(device)
            if dtype is not None:
                batch.pos, batch.cell = batch.pos.to(dtype), batch.cell.to(dtype)
            result = relax_batch(model, batch, **relax_options)
            for i, (sid, sample) in enumerate(chunk):
                if not write:
                    continue
                info = {
                    "sid": sid,
                    "steps": int(result.steps[i]),
                    "converged": bool(result.converged[i]),
                }
                path = out_dir / f"{sid}.extxyz"
                if result.trajectory_pos is not None:
                    frames = [
                        _atoms(sample, p, e, f, {**info, "step": k})
                        for k, (p, e, f) in enumerate(
                            zip(
                                result.trajectory_pos[i],
                                result.trajectory_energy[i].tolist(),
                                result.trajectory_forces[i],
                                strict=True,
                            )
                        )
                    ]
                    _write_extxyz(out_dir / f"{sid}.traj.extxyz", frames)
                energy = float(result.energy[i])
                _write_extxyz(path, _atoms(sample, result.pos[i], energy, result.forces[i], info))
                summaries[sid] = {**info, "energy": energy, "path": str(path)}
            bar.update(len(chunk))
    finally:
        bar.close()
    return [summaries[sid] for sid in order] if write else []


def read_relaxed(samples: Iterable, out_dir: str | os.PathLike) -> list[dict]:
    """The summaries (sid, steps, converged, energy, path) of `relax_dataset`'s files for
    `samples`, e.g. after the data-parallel ranks relaxed their shares."""
    out_dir = Path(out_dir)
    summaries = []
    for index, sample in enumerate(samples):
        path = out_dir / f"{_sid(sample, index)}.extxyz"
        if not path.exists():
            raise FileNotFoundError(f"{path}: no relaxed structure (did a rank fail?)")
        summaries.append(_summary(path))
    return summaries
