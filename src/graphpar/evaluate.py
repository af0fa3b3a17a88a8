"""Evaluate a trained checkpoint: S2EF metrics on a split, or ML relaxations of an IS2RE/IS2RS
split with IS2RS (ADwT, FbT and AFbT from an oracle calculator) and IS2RE (energy MAE, EwT)
metrics, plus per-system predictions in OC20's submission layout.

    python -m graphpar.evaluate s2ef \\
        --checkpoint results/mini/checkpoints/gemnet/final.pt \\
        --data resources/mini/lmdb/s2ef/val_id --split val_id \\
        --metrics results/mini/metrics/gemnet/s2ef_val_id.json \\
        --predictions results/mini/predictions/gemnet/s2ef_val_id.npz

The metrics file holds energy_mae (eV), forces_mae (eV/A), forces_cos, efwt (fraction) and
n_systems, plus provenance (checkpoint sha256, its config hash, the dataset's metadata hash, git
commit, package versions). A split without labels (OC20's test splits) gets `null` metrics
with the reason, and its predictions are what the OC20 evaluation server takes: `ids`
("<sid>_<fid>"), `energy` and free-atom `forces` as float16 with `chunk_idx` (cumulative split
points of the forces per system), as fairchem's make_submission_file.py expects; labelled
splits add float32 `energy_target` and free-atom `forces_target` for parity plots.

    python -m graphpar.evaluate relax \\
        --checkpoint results/mini/checkpoints/gemnet/final.pt \\
        --data resources/mini/lmdb/is2re/val_id --split val_id \\
        --out-dir results/mini/relaxations/gemnet/val_id \\
        --metrics-dir results/mini/metrics/gemnet --predictions-dir results/mini/predictions/gemnet

Relaxations (`graphpar.relax`: batched L-BFGS, maxstep 0.04, memory 50, damping 1, alpha 70,
fmax 0.05, at most 200 steps, graphs rebuilt every step as the model was trained) write
`<out-dir>/<sid>.extxyz` per system and resume, skipping systems already relaxed. The metrics
files are `is2rs_<split>.json` (adwt, fbt, afbt, n_systems) and `is2re_<split>.json`
(energy_mae, ewt, n_systems); the predictions `is2rs_<split>.npz` (ids, free-atom pos,
chunk_idx; per system `distance` to the relaxed label in A and `oracle_max_force` in eV/A, NaN
where unknown) and `is2re_<split>.npz` (ids, energy, energy_target).

Relaxations run under torchrun too: G x D processes, each system batch split over G
graph-parallel ranks and the systems shared by the D data-parallel groups:

    torchrun --standalone --nproc_per_node=4 -m graphpar.evaluate relax --gp-size 2 ...
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from graphpar.data.dataset import LmdbDataset, collate
from graphpar.io import atomic_path, write_json
from graphpar.metrics import MetricSums
from graphpar.parallel import get_dims
from graphpar.train import (
    TrainingError,
    join_processes,
    leave_processes,
    read_checkpoint,
    trained_model,
    triplet_kind,
)

PACKAGES = ("graphpar", "torch", "torch-geometric", "ase", "numpy")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def git_commit() -> str | None:
    """This checkout's commit (None outside a git checkout)."""
    try:
        result = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            check=True,
        )
    except (OSError, subprocess.CalledProcessError):
        return None
    return result.stdout.strip()


def package_versions(packages: tuple[str, ...] = PACKAGES) -> dict[str, str | None]:
    """Installed versions of `packages` (None for one that is not installed)."""
    versions = {}
    for package in packages:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    return versions


def provenance(checkpoint: Path, state: dict, data: Path) -> dict:
    """Where a metrics file's numbers come from (`state`: the checkpoint, already read)."""
    return {
        "checkpoint": str(checkpoint),
        "checkpoint_sha256": sha256_file(checkpoint),
        "config_hash": state["config_hash"],
        "model": state["config"]["model"],
        "step": state["step"],
        "dataset": str(data),
        "dataset_metadata_sha256": sha256_file(data / "metadata.json"),
        "git_commit": git_commit(),
        "versions": package_versions(),
    }


def evaluate_s2ef(
    checkpoint: Path,
    data: Path,
    split: str,
    metrics_path: Path,
    predictions_path: Path | None = None,
    batch_size: int = 16,
    device: str = "cpu",
) -> dict:
    """S2EF metrics of `checkpoint` on the preprocessed split `data`; writes the metrics JSON
    (and the predictions) atomically and returns the metrics."""
    state = read_checkpoint(checkpoint)
    model = trained_model(state, device)
    dtype = next(model.parameters()).dtype
    dataset = LmdbDataset(data, triplets=(triplet_kind(model.model),))
    labelled = len(dataset) > 0 and "energy" in dataset[0] and "forces" in dataset[0]
    sums = MetricSums()
    ids, energies, forces, counts = [], [], [], []
    energy_targets, force_targets = [], []
    for start in tqdm(range(0, len(dataset), batch_size), desc=f"s2ef {split}", disable=None):
        batch = collate([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
        batch = batch.to(device)
        batch.pos, batch.cell = batch.pos.to(dtype), batch.cell.to(dtype)
        out = model(batch)
        energy, force = out["energy"].detach().cpu(), out["forces"].detach().cpu()
        free = batch.free.cpu()
        if labelled:
            sums.update_s2ef(
                energy, batch.energy.cpu(), force, batch.forces.cpu(), batch.natoms.cpu(), ~free
            )
        structure = batch.batch.cpu()
        target_forces = batch.forces.cpu() if labelled else None
        for k in range(batch.num_graphs):
            ids.append(f"{int(batch.sid[k])}_{int(batch.fid[k])}")
            mask = (structure == k) & free
            forces.append(force[mask].numpy())
            counts.append(int(mask.sum()))
            if labelled:
                force_targets.append(target_forces[mask].numpy())
        energies.append(energy.numpy())
        if labelled:
            energy_targets.append(batch.energy.cpu().numpy())

    if not len(dataset):
        metrics = {
            "task": "s2ef",
            "split": split,
            **{k: None for k in ("energy_mae", "forces_mae", "forces_cos", "efwt")},
            "n_systems": 0,
            "reason": "the split has no systems",
        }
    elif labelled:
        metrics = {"task": "s2ef", "split": split, **sums.result("s2ef")}
    else:
        metrics = {
            "task": "s2ef",
            "split": split,
            **{k: None for k in ("energy_mae", "forces_mae", "forces_cos", "efwt")},
            "n_systems": len(dataset),
            "reason": "the split has no energy/force labels (hidden test labels)",
        }
    metrics["provenance"] = provenance(checkpoint, state, data)
    write_json(metrics_path, metrics)
    if predictions_path is not None:
        # OC20's submission keys (float16), plus float32 labels for parity plots where known.
        labels = {}
        if labelled:
            labels = {
                "energy_target": np.concatenate(energy_targets).astype(np.float32),
                "forces_target": np.concatenate(force_targets).astype(np.float32),
            }
        write_npz(
            predictions_path,
            ids=np.array(ids, dtype=str),
            energy=np.concatenate(energies or [np.zeros(0)]).astype(np.float16),
            forces=np.concatenate(forces or [np.zeros((0, 3))]).astype(np.float16),
            chunk_idx=np.cumsum(counts)[:-1],
            **labels,
        )
    return metrics


def relaxation_metrics(samples: list, relaxed: list, energy: np.ndarray, oracle: str) -> dict:
    """IS2RS and IS2RE metrics of ML-relaxed structures (`relaxed`: ase.Atoms in the order of
    `samples`, `energy`: their predicted energies): {"is2rs", "is2re", "per_system"}, metrics
    null with the reason where labels or an oracle are missing. `per_system` holds each
    system's mean free-atom distance to the relaxed label (A) and oracle max force (eV/A), NaN
    where not computable, for the DwT and FbT curves."""
    from graphpar.metrics import is2re_metrics
    from graphpar.oracle import fbt_afbt, oracle_max_forces

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
) -> dict | None:
    """Relax every system of an IS2RE/IS2RS split with the model; IS2RS and IS2RE metrics
    (null with the reason where labels or an oracle are missing) and predictions.

    Under torchrun with W = G x D processes (`gp_size` = G, default W): each of the D
    data-parallel groups relaxes every D-th system with the model split over its G ranks;
    rank 0 then reads all relaxed structures back and writes the metrics. Returns the metrics
    on rank 0, None on the other ranks.
    """
    from ase.io import read

    from graphpar.calculator import graph_settings
    from graphpar.relax import read_relaxed, relax_dataset

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
    samples = [dataset[i] for i in range(len(dataset))]
    if dims.rank == 0:
        print(f"relax {split}: {len(samples)} systems, G x D = {dims.gp_size} x {dims.dp_size}")
    relax_dataset(
        model,
        samples[dims.dp_rank :: dims.dp_size],
        out_dir,
        batch_size=batch_size,
        fmax=fmax,
        steps=steps,
        cutoff=cutoff,
        max_neighbors=max_neighbors,
        progress=dims.rank == 0,
        write=dims.gp_rank == 0,
    )
    if dims.world_size > 1:
        dist.barrier(group=finished)
    if dims.rank != 0:
        return None

    summaries = read_relaxed(samples, out_dir)
    relaxed = [read(summary["path"]) for summary in summaries]
    ids = [str(summary["sid"]) for summary in summaries]
    energy = np.array([summary["energy"] for summary in summaries])
    free = [~sample.fixed.bool().numpy() for sample in samples]
    pos = [atoms.positions[mask] for atoms, mask in zip(relaxed, free, strict=True)]
    found = relaxation_metrics(samples, relaxed, energy, oracle)
    extra = {
        "oracle": oracle,
        "relaxed_converged": sum(bool(summary["converged"]) for summary in summaries),
        "provenance": provenance(checkpoint, state, data),
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


def write_npz(path: Path, **arrays) -> None:
    """np.savez_compressed, atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as temporary, open(temporary, "wb") as f:
        np.savez_compressed(f, **arrays)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m graphpar.evaluate",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    tasks = parser.add_subparsers(dest="task", required=True)
    s2ef = tasks.add_parser("s2ef", help="S2EF metrics and predictions on one split")
    s2ef.add_argument("--checkpoint", type=Path, required=True, help="a final.pt of a run")
    s2ef.add_argument("--data", type=Path, required=True, help="preprocessed S2EF split folder")
    s2ef.add_argument("--split", required=True, help="split name recorded in the metrics")
    s2ef.add_argument("--metrics", type=Path, required=True, help="metrics JSON to write")
    s2ef.add_argument("--predictions", type=Path, help="predictions .npz to write")
    s2ef.add_argument("--batch-size", type=int, default=16)
    s2ef.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    relax = tasks.add_parser("relax", help="IS2RS/IS2RE: ML relaxations of one split")
    relax.add_argument("--checkpoint", type=Path, required=True, help="a final.pt of a run")
    relax.add_argument("--data", type=Path, required=True, help="preprocessed IS2RE split folder")
    relax.add_argument("--split", required=True, help="split name recorded in the metrics")
    relax.add_argument("--out-dir", type=Path, required=True, help="relaxed structures (resumed)")
    relax.add_argument("--metrics-dir", type=Path, required=True)
    relax.add_argument("--predictions-dir", type=Path, required=True)
    relax.add_argument("--oracle", default="emt", help="'emt' or package.module:Calculator")
    relax.add_argument("--batch-size", type=int, default=8)
    relax.add_argument("--fmax", type=float, default=0.05, help="eV/A")
    relax.add_argument("--steps", type=int, default=200)
    relax.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    relax.add_argument(
        "--gp-size",
        type=int,
        help="G under torchrun: graph-parallel ranks per system batch (default: all processes)",
    )
    args = parser.parse_args(argv)
    try:
        if args.task == "s2ef":
            options = (args.metrics, args.predictions, args.batch_size, args.device)
            results = [evaluate_s2ef(args.checkpoint, args.data, args.split, *options)]
        else:
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
            )
            results = [found["is2rs"], found["is2re"]] if found else []
    except (TrainingError, FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)
    finally:
        leave_processes()
    for metrics in results:
        shown = {k: v for k, v in metrics.items() if k != "provenance"}
        print(
            " ".join(
                f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in shown.items()
            )
        )


if __name__ == "__main__":
    main()
