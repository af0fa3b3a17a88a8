"""Evaluate a trained checkpoint on an S2EF split: OC20's metrics and per-system predictions.

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
points of the forces per system), as fairchem's make_submission_file.py expects.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from graphpar.data.dataset import LmdbDataset, collate
from graphpar.io import atomic_path, write_json
from graphpar.metrics import MetricSums
from graphpar.train import TrainingError, load_trained, read_checkpoint, triplet_kind

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


def provenance(checkpoint: Path, data: Path) -> dict:
    """Where a metrics file's numbers come from."""
    state = read_checkpoint(checkpoint)
    versions = {}
    for package in PACKAGES:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    return {
        "checkpoint": str(checkpoint),
        "checkpoint_sha256": sha256_file(checkpoint),
        "config_hash": state["config_hash"],
        "model": state["config"]["model"],
        "step": state["step"],
        "dataset": str(data),
        "dataset_metadata_sha256": sha256_file(data / "metadata.json"),
        "git_commit": git_commit(),
        "versions": versions,
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
    model = load_trained(checkpoint, device)
    dtype = next(model.parameters()).dtype
    dataset = LmdbDataset(data, triplets=(triplet_kind(model.model),))
    labelled = len(dataset) > 0 and "energy" in dataset[0] and "forces" in dataset[0]
    sums = MetricSums()
    ids, energies, forces, counts = [], [], [], []
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
        for k in range(batch.num_graphs):
            ids.append(f"{int(batch.sid[k])}_{int(batch.fid[k])}")
            mask = (structure == k) & free
            forces.append(force[mask].numpy())
            counts.append(int(mask.sum()))
        energies.append(energy.numpy())

    if labelled:
        metrics = {"task": "s2ef", "split": split, **sums.result("s2ef")}
    else:
        metrics = {
            "task": "s2ef",
            "split": split,
            **{k: None for k in ("energy_mae", "forces_mae", "forces_cos", "efwt")},
            "n_systems": len(dataset),
            "reason": "the split has no energy/force labels (hidden test labels)",
        }
    metrics["provenance"] = provenance(checkpoint, data)
    write_json(metrics_path, metrics)
    if predictions_path is not None:
        predictions_path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(predictions_path) as temporary, open(temporary, "wb") as f:
            np.savez_compressed(
                f,
                ids=np.array(ids),
                energy=np.concatenate(energies).astype(np.float16),
                forces=np.concatenate(forces).astype(np.float16),
                chunk_idx=np.cumsum(counts)[:-1],
            )
    return metrics


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
    args = parser.parse_args(argv)
    try:
        metrics = evaluate_s2ef(
            args.checkpoint,
            args.data,
            args.split,
            args.metrics,
            args.predictions,
            args.batch_size,
            args.device,
        )
    except (TrainingError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)
    shown = {k: v for k, v in metrics.items() if k != "provenance"}
    print(
        " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in shown.items())
    )


if __name__ == "__main__":
    main()
