"""ML relaxations (IS2RS/IS2RE): batched L-BFGS with a trained checkpoint over a preprocessed
IS2RE split, with IS2RS (ADwT, FbT and AFbT from an oracle calculator) and IS2RE (energy MAE,
EwT) metrics, plus per-system predictions in OC20's submission layout.

    python -m graphpar.relax \\
        --checkpoint results/mini/checkpoints/gemnet/final.pt \\
        --data resources/mini/lmdb/is2re/val_id --split val_id \\
        --out-dir results/mini/relaxations/gemnet/val_id \\
        --metrics-dir results/mini/metrics/gemnet --predictions-dir results/mini/predictions/gemnet

Relaxations (batched L-BFGS, maxstep 0.04, memory 50, damping 1, alpha 70, fmax 0.05, at most
200 steps, graphs rebuilt every step as the model was trained) write `<out-dir>/<sid>.extxyz`
per system and resume, skipping systems already relaxed by this same relaxation (model weights,
settings and input recorded in each file: another checkpoint's files are relaxed again); one
job at a time holds `<out-dir>`. The metrics files are
`is2rs_<split>.json` (adwt, fbt, afbt, n_systems) and `is2re_<split>.json` (energy_mae, ewt,
n_systems), with provenance (checkpoint sha256, its config hash, the dataset's metadata hash, git
commit, package versions); the predictions `is2rs_<split>.npz` (ids, free-atom pos, chunk_idx;
per system `distance` to the relaxed label in A and `oracle_max_force` in eV/A, NaN where
unknown) and `is2re_<split>.npz` (ids, energy, energy_target).

Relaxations run under torchrun too: G x D processes, each system batch split over G
graph-parallel ranks and the systems shared by the D data-parallel groups:

    torchrun --standalone --nproc_per_node=4 -m graphpar.relax --gp-size 2 ...

As a library, with a graphpar model (or any `model(batch)` callable):

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

import argparse
import contextlib
import datetime
import hashlib
import inspect
import json
import os
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor
from tqdm import tqdm

from graphpar.calculator import graph_settings
from graphpar.data.dataset import LmdbDataset, collate
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
    batch_size: int = 8,
    save_trajectory: bool = False,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    progress: bool = True,
    write: bool = True,
    ids: list[str] | None = None,
    **relax_options,
) -> list[dict]:
    """Relax `samples` in batches; write `out_dir/<sid>.extxyz` (and `<sid>.traj.extxyz`).

    Files are written atomically and record their relaxation's identity (`relaxation_ids`):
    systems whose `<sid>.extxyz` holds this relaxation are skipped, so a killed run resumes
    where it stopped, and files of another model, checkpoint, setting or input are relaxed
    again (said on stderr). `dtype` casts positions/cells (e.g. float64 for an oracle),
    `device` defaults to the model's. Returns one summary dict per sample (sid, steps,
    converged, energy, path), read back from the file for skipped systems. `write=False` on
    all but one rank of a graph-parallel group: they relax the same batches (every rank takes
    part in the model's collectives) and hold the same results. `ids` are the samples'
    `relaxation_ids` when the caller has them already (computed here otherwise).
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
    try:
        for start in range(0, len(todo), batch_size):
            chunk = todo[start : start + batch_size]
            batch = collate([sample for _, sample, _ in chunk]).to(device)
            if dtype is not None:
                batch.pos, batch.cell = batch.pos.to(dtype), batch.cell.to(dtype)
            result = relax_batch(model, batch, **relax_options)
            for i, (sid, sample, relaxation) in enumerate(chunk):
                if not write:
                    continue
                info = {
                    "sid": sid,
                    "steps": int(result.steps[i]),
                    "converged": bool(result.converged[i]),
                    "relaxation": relaxation,
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
    batch_size: int = 8,
    fmax: float = 0.05,
    steps: int = 200,
    device: str = "auto",
    gp_size: int | None = None,
    allow_data_mismatch: bool = False,
) -> dict | None:
    """Relax every system of an IS2RE/IS2RS split with the model; IS2RS and IS2RE metrics
    (null with the reason where labels or an oracle are missing) and predictions.

    Under torchrun with W = G x D processes (`gp_size` = G, default W): each of the D
    data-parallel groups relaxes every D-th system with the model split over its G ranks;
    rank 0 then reads all relaxed structures back and writes the metrics. Returns the metrics
    on rank 0, None on the other ranks. `out_dir` is locked for the job (graphpar.lock). The
    split's energies must be on the reference of the checkpoint's training data, unless
    `allow_data_mismatch`.
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
    free = [~sample.fixed.bool().numpy() for sample in samples]
    pos = [atoms.positions[mask] for atoms, mask in zip(relaxed, free, strict=True)]
    found = relaxation_metrics(samples, relaxed, energy, oracle)
    extra = {
        "oracle": oracle,
        "relaxed_converged": sum(bool(summary["converged"]) for summary in summaries),
        "provenance": checkpoint_provenance(checkpoint, state, data),
    }
    is2rs = {"task": "is2rs", "split": split, **found["is2rs"], **extra}
    is2re = {"task": "is2re", "split": split, **found["is2re"], **extra}
    write_json(metrics_dir / f"is2rs_{split}.json", is2rs)
    write_json(metrics_dir / f"is2re_{split}.json", is2re)
    # OC20's submission keys (ids, pos + chunk_idx, energy), plus per-system values for plots.
    per_system = found["per_system"]
    write_npz(
        predictions_dir / f"is2rs_{split}.npz",
        ids=np.array(ids, dtype=str),
        pos=np.concatenate(pos) if pos else np.zeros((0, 3)),
        chunk_idx=np.cumsum([len(p) for p in pos])[:-1],
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
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--fmax", type=float, default=0.05, help="eV/A")
    parser.add_argument("--steps", type=int, default=200)
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
            args.batch_size,
            args.fmax,
            args.steps,
            args.device,
            args.gp_size,
            args.allow_data_mismatch,
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
