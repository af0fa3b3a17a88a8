"""S2EF evaluation: metrics of a trained checkpoint on a preprocessed S2EF split, plus
per-system predictions in OC20's submission layout.

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

ML relaxations of IS2RE splits (IS2RS and IS2RE metrics) are `python -m graphpar.relax`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from graphpar.data.dataset import LmdbDataset, collate
from graphpar.io import write_json, write_npz
from graphpar.metrics import MetricSums
from graphpar.provenance import checkpoint_provenance
from graphpar.training.checkpoint import read_checkpoint, trained_model
from graphpar.training.config import TrainingError
from graphpar.training.data import check_checkpoint_data


def evaluate_s2ef(
    checkpoint: Path,
    data: Path,
    split: str,
    metrics_path: Path,
    predictions_path: Path | None = None,
    batch_size: int = 16,
    device: str = "cpu",
    allow_data_mismatch: bool = False,
) -> dict:
    """S2EF metrics of `checkpoint` on the preprocessed split `data`; writes the metrics JSON
    (and the predictions) atomically and returns the metrics. The split must have been
    preprocessed as the checkpoint's training data (cutoff, max_neighbors, energy reference),
    unless `allow_data_mismatch`."""
    state = read_checkpoint(checkpoint)
    model = trained_model(state, device)
    dtype = next(model.parameters()).dtype
    dataset = LmdbDataset(data, triplets=(model.model.triplet_family,))
    check_checkpoint_data(state, checkpoint, dataset.metadata, data, allow=allow_data_mismatch)
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
    metrics["provenance"] = checkpoint_provenance(checkpoint, state, data)
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
    s2ef.add_argument(
        "--allow-data-mismatch",
        action="store_true",
        help="evaluate even though the split was preprocessed with other settings (cutoff, "
        "max_neighbors, energy reference) than the checkpoint's training data",
    )
    args = parser.parse_args(argv)
    try:
        options = (
            args.metrics,
            args.predictions,
            args.batch_size,
            args.device,
            args.allow_data_mismatch,
        )
        metrics = evaluate_s2ef(args.checkpoint, args.data, args.split, *options)
    except (TrainingError, FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)
    shown = {k: v for k, v in metrics.items() if k != "provenance"}
    print(
        " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in shown.items())
    )


if __name__ == "__main__":
    main()
