"""Evaluation of a trained checkpoint on a preprocessed split: S2EF (energies and forces of
every frame) and direct IS2RE (energy-only models: the relaxed energy predicted from the initial
structure, no relaxation), metrics plus per-system predictions in OC20's submission layout.

    python -m graphpar.evaluate s2ef \\
        --checkpoint results/mini/checkpoints/gemnet/final.pt \\
        --data resources/mini/lmdb/s2ef/val_id --split val_id \\
        --metrics results/mini/metrics/gemnet/s2ef_val_id.json \\
        --predictions results/mini/predictions/gemnet/s2ef_val_id.npz

    python -m graphpar.evaluate is2re \\
        --checkpoint results/mini/checkpoints/gemnet-ft/final.pt \\
        --data resources/mini/lmdb/is2re/val_id --split val_id \\
        --metrics results/mini/metrics/gemnet-ft/is2re_val_id.json \\
        --predictions results/mini/predictions/gemnet-ft/is2re_val_id.npz

S2EF: the metrics file holds energy_mae (eV), forces_mae (eV/A), forces_cos, efwt (fraction)
and n_systems; the predictions are what the OC20 evaluation server takes: `ids`
("<sid>_<fid>"), `energy` and free-atom `forces` as float16 with `chunk_idx` (cumulative split
points of the forces per system), as fairchem's make_submission_file.py expects; labelled
splits add float32 `energy_target` and free-atom `forces_target` for parity plots. A checkpoint
trained for task is2re (energy only) has no forces: it is evaluated with `is2re`.

IS2RE (direct): the metrics file holds energy_mae (eV), ewt (fraction), n_systems and
`"method": "direct"` (the relaxations' IS2RE metrics, `python -m graphpar.relax`, are the other
method); the predictions `ids` ("<sid>"), float64 `energy` and `energy_target` (NaN where the
labels are hidden). Only checkpoints trained for task is2re: a force model's IS2RE energies come
from its relaxations.

Both write provenance (checkpoint sha256, its config hash, the dataset's metadata hash, git
commit, package versions) into the metrics; a split without labels (OC20's test splits) gets
`null` metrics with the reason.

Under torchrun with W = G x D processes (`--gp-size` G, default 1): each of the D data-parallel
groups evaluates a contiguous shard of the split (sizes differing by at most one system; none
dropped or repeated), with the model split over its G graph-parallel ranks as in training. Rank
0 gathers every group's per-system predictions, puts them back in the split's order, computes
the metrics from them (as one process does: the same numbers) and writes the files:

    torchrun --standalone --nproc_per_node=4 -m graphpar.evaluate s2ef --gp-size 2 ...
"""

from __future__ import annotations

import argparse
import datetime
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from graphpar.data.dataset import LmdbDataset, collate
from graphpar.io import write_json, write_npz
from graphpar.metrics import MetricSums
from graphpar.parallel import get_dims, is_main, join_processes, leave_processes
from graphpar.provenance import checkpoint_provenance
from graphpar.training.checkpoint import read_checkpoint, trained_model
from graphpar.training.config import TrainingError
from graphpar.training.data import check_checkpoint_data

TASKS = ("s2ef", "is2re")
# Metrics of each task, null where they cannot be computed.
METRIC_KEYS = {
    "s2ef": ("energy_mae", "forces_mae", "forces_cos", "efwt"),
    "is2re": ("energy_mae", "ewt"),
}
# Systems per MetricSums update on rank 0 (bounds the temporary arrays, not the result).
METRIC_CHUNK = 4096


@dataclass
class Predictions:
    """Per-system predictions of a contiguous run of a split's systems (in the split's order):
    energies [n] and free-atom forces [sum(counts), 3] in the model's dtype (S2EF only), with
    the labels where the split has them."""

    start: int = 0  # index in the split of the first system
    ids: list[str] = field(default_factory=list)
    energy: list[np.ndarray] = field(default_factory=list)
    counts: list[int] = field(default_factory=list)  # free atoms per system (S2EF)
    forces: list[np.ndarray] = field(default_factory=list)
    energy_target: list[np.ndarray] = field(default_factory=list)
    forces_target: list[np.ndarray] = field(default_factory=list)

    def joined(self) -> Predictions:
        """One array per field (fewer, larger objects to gather)."""
        out = Predictions(self.start, list(self.ids), counts=list(self.counts))
        for name in ("energy", "forces", "energy_target", "forces_target"):
            arrays = getattr(self, name)
            setattr(out, name, [np.concatenate(arrays)] if arrays else [])
        return out

    @staticmethod
    def concatenate(parts: list[Predictions]) -> Predictions:
        """The parts, ordered by their start in the split, as one run of systems."""
        out = Predictions()
        for part in sorted(parts, key=lambda p: p.start):
            if part.start != len(out.ids):
                raise RuntimeError(
                    f"evaluation shards do not tile the split: a shard starts at {part.start} "
                    f"after {len(out.ids)} systems"
                )
            out.ids += part.ids
            out.counts += part.counts
            for name in ("energy", "forces", "energy_target", "forces_target"):
                getattr(out, name).extend(getattr(part, name))
        return out.joined()

    def array(self, name: str, shape: tuple[int, ...] = (0,)) -> np.ndarray:
        arrays = getattr(self, name)
        return np.concatenate(arrays) if arrays else np.zeros(shape)


def shard(size: int, dp_rank: int, dp_size: int) -> range:
    """The contiguous share of data-parallel group `dp_rank` of a split of `size` systems:
    together the shares cover every index once, their sizes differing by at most one."""
    return range(size * dp_rank // dp_size, size * (dp_rank + 1) // dp_size)


def is_labelled(dataset: LmdbDataset, task: str) -> bool:
    if not len(dataset):
        return False
    sample = dataset[0]
    if task == "s2ef":
        return "energy" in sample and "forces" in sample
    return "energy_relaxed" in sample


def predict(
    model, dataset, indices: range, task: str, batch_size: int, device, labelled: bool
) -> Predictions:
    """The model's predictions on the systems `indices` of `dataset`, `batch_size` at a time
    (every rank of a graph-parallel group runs the same batches: the model's collectives pair
    them)."""
    dtype = next(model.parameters()).dtype
    found = Predictions(start=indices.start)
    starts = range(indices.start, indices.stop, batch_size)
    for start in tqdm(starts, desc=task, disable=None if is_main() else True):
        samples = [dataset[i] for i in range(start, min(start + batch_size, indices.stop))]
        batch = collate(samples).to(device)
        batch.pos, batch.cell = batch.pos.to(dtype), batch.cell.to(dtype)
        if task == "s2ef":
            out = model(batch)  # forces: the model differentiates its energy itself
        else:
            with torch.no_grad():
                out = model(batch)
        found.energy.append(out["energy"].detach().reshape(-1).cpu().numpy())
        if task == "is2re":
            found.ids += [str(int(sid)) for sid in batch.sid]
            if labelled:
                found.energy_target.append(batch.energy_relaxed.reshape(-1).cpu().numpy())
            continue
        found.ids += [f"{int(s)}_{int(f)}" for s, f in zip(batch.sid, batch.fid, strict=True)]
        force, free, structure = out["forces"].detach().cpu(), batch.free.cpu(), batch.batch.cpu()
        target = batch.forces.cpu() if labelled else None
        if labelled:
            found.energy_target.append(batch.energy.reshape(-1).cpu().numpy())
        for k in range(batch.num_graphs):
            mask = (structure == k) & free
            found.forces.append(force[mask].numpy())
            found.counts.append(int(mask.sum()))
            if labelled:
                found.forces_target.append(target[mask].numpy())
    return found.joined()


def gather_predictions(found: Predictions, group) -> Predictions | None:
    """Every data-parallel group's predictions, in the split's order, on rank 0 (None on the
    others). Rank gp_rank 0 of each group speaks for it (its G ranks hold the same values)."""
    dims = get_dims()
    if dims.world_size == 1:
        return Predictions.concatenate([found])
    mine = found if dims.gp_rank == 0 else None
    parts = [None] * dims.world_size if dims.rank == 0 else None
    # Data parallel: gather of each group's predictions to rank 0 (gloo: CPU memory, not GPU).
    dist.gather_object(mine, parts, dst=0, group=group)
    if dims.rank != 0:
        return None
    return Predictions.concatenate([part for part in parts if part is not None])


def task_metrics(task: str, found: Predictions) -> dict:
    """The task's metrics of labelled predictions, summed in float64 as OC20's evaluator does
    (`graphpar.metrics`), METRIC_CHUNK systems at a time."""
    sums = MetricSums()
    energy, target = found.array("energy"), found.array("energy_target")
    if task == "is2re":
        return sums.update_is2re(energy, target).result("is2re")
    counts = np.asarray(found.counts, dtype=np.int64)
    ends = np.cumsum(counts)
    forces, forces_target = found.array("forces", (0, 3)), found.array("forces_target", (0, 3))
    for first in range(0, len(counts), METRIC_CHUNK):
        last = min(first + METRIC_CHUNK, len(counts))
        atoms = slice(int(ends[first] - counts[first]), int(ends[last - 1]))
        # Free atoms only, so every atom counts (fixed=None), as `~fixed` does in a batch.
        sums.update_s2ef(
            energy[first:last],
            target[first:last],
            forces[atoms],
            forces_target[atoms],
            counts[first:last],
            None,
        )
    return sums.result("s2ef")


def check_task(state: dict, checkpoint: Path, task: str) -> None:
    """S2EF needs a force model; direct IS2RE is the energy-only models' (task is2re)."""
    trained = state["config"].get("task", "s2ef")
    if task == "s2ef" and trained == "is2re":
        raise TrainingError(
            f"{checkpoint} was trained for task is2re (energy only, no forces): evaluate it "
            "with `python -m graphpar.evaluate is2re`"
        )
    if task == "is2re" and trained != "is2re":
        raise TrainingError(
            f"{checkpoint} was trained for task {trained}: its IS2RE energies come from "
            "relaxations (`python -m graphpar.relax`); `is2re` evaluates energy-only models"
        )


def evaluate(
    task: str,
    checkpoint: Path,
    data: Path,
    split: str,
    metrics_path: Path,
    predictions_path: Path | None = None,
    batch_size: int = 16,
    device: str = "cpu",
    allow_data_mismatch: bool = False,
    gp_size: int = 1,
) -> dict | None:
    """Metrics of `checkpoint` on the preprocessed split `data` for `task` ("s2ef" or
    "is2re"); writes the metrics JSON (and the predictions) atomically on rank 0 and returns
    the metrics there, None on the other ranks of a torchrun launch of G x D processes
    (`gp_size` = G; one process without torchrun). `batch_size`: systems per batch of one
    data-parallel group. The split must have been preprocessed as the checkpoint's training
    data (cutoff, max_neighbors, energy reference), unless `allow_data_mismatch`."""
    if task not in TASKS:
        raise ValueError(f"unknown evaluation task {task!r} (known: {', '.join(TASKS)})")
    rank_device = join_processes(gp_size, device)
    dims = get_dims()
    group = None
    if dims.world_size > 1:
        # Data-parallel groups finish their shards minutes apart on big splits: gather on a
        # gloo group whose timeout is not the graph-parallel collectives' (short, for hangs).
        group = dist.new_group(backend="gloo", timeout=datetime.timedelta(days=7))
    state = read_checkpoint(checkpoint)
    check_task(state, checkpoint, task)
    model = trained_model(state, rank_device)
    dataset = LmdbDataset(data, triplets=(model.model.triplet_family,))
    check_checkpoint_data(state, checkpoint, dataset.metadata, data, allow=allow_data_mismatch)
    labelled = is_labelled(dataset, task)
    if is_main():
        print(f"{task} {split}: {len(dataset)} systems, G x D = {dims.gp_size} x {dims.dp_size}")
    indices = shard(len(dataset), dims.dp_rank, dims.dp_size)
    found = predict(model, dataset, indices, task, batch_size, rank_device, labelled)
    found = gather_predictions(found, group)
    if found is None:
        return None

    metrics = {"task": task, "split": split}
    if labelled:
        metrics.update(task_metrics(task, found))
    else:
        metrics.update({key: None for key in METRIC_KEYS[task]})
        metrics["n_systems"] = len(dataset)
        metrics["reason"] = (
            "the split has no systems"
            if not len(dataset)
            else f"the split has no {'energy/force' if task == 's2ef' else 'relaxed energy'} "
            "labels (hidden test labels)"
        )
    if task == "is2re":
        metrics["method"] = "direct"
    metrics["provenance"] = checkpoint_provenance(checkpoint, state, data)
    write_json(metrics_path, metrics)
    if predictions_path is not None:
        write_predictions(task, predictions_path, found, labelled)
    return metrics


def write_predictions(task: str, path: Path, found: Predictions, labelled: bool) -> None:
    ids = np.array(found.ids, dtype=str)
    if task == "is2re":
        energy = found.array("energy").astype(np.float64)
        target = found.array("energy_target") if labelled else np.full(len(energy), np.nan)
        write_npz(path, ids=ids, energy=energy, energy_target=target.astype(np.float64))
        return
    # OC20's submission keys (float16), plus float32 labels for parity plots where known.
    labels = {}
    if labelled:
        labels = {
            "energy_target": found.array("energy_target").astype(np.float32),
            "forces_target": found.array("forces_target", (0, 3)).astype(np.float32),
        }
    write_npz(
        path,
        ids=ids,
        energy=found.array("energy").astype(np.float16),
        forces=found.array("forces", (0, 3)).astype(np.float16),
        chunk_idx=np.cumsum(found.counts, dtype=np.int64)[:-1],
        **labels,
    )


def evaluate_s2ef(
    checkpoint: Path,
    data: Path,
    split: str,
    metrics_path: Path,
    predictions_path: Path | None = None,
    batch_size: int = 16,
    device: str = "cpu",
    allow_data_mismatch: bool = False,
    gp_size: int = 1,
) -> dict | None:
    """S2EF metrics and predictions: `evaluate("s2ef", ...)`."""
    return evaluate(
        "s2ef",
        checkpoint,
        data,
        split,
        metrics_path,
        predictions_path,
        batch_size,
        device,
        allow_data_mismatch,
        gp_size,
    )


def evaluate_is2re(
    checkpoint: Path,
    data: Path,
    split: str,
    metrics_path: Path,
    predictions_path: Path | None = None,
    batch_size: int = 16,
    device: str = "cpu",
    allow_data_mismatch: bool = False,
    gp_size: int = 1,
) -> dict | None:
    """Direct IS2RE metrics and predictions of an energy-only model: `evaluate("is2re", ...)`."""
    return evaluate(
        "is2re",
        checkpoint,
        data,
        split,
        metrics_path,
        predictions_path,
        batch_size,
        device,
        allow_data_mismatch,
        gp_size,
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m graphpar.evaluate",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    tasks = parser.add_subparsers(dest="task", required=True)
    helps = {
        "s2ef": ("S2EF metrics and predictions on one split", "preprocessed S2EF split folder"),
        "is2re": (
            "direct IS2RE metrics and predictions of an energy-only model on one split",
            "preprocessed IS2RE split folder",
        ),
    }
    for task, (summary, data_help) in helps.items():
        sub = tasks.add_parser(task, help=summary)
        sub.add_argument("--checkpoint", type=Path, required=True, help="a final.pt of a run")
        sub.add_argument("--data", type=Path, required=True, help=data_help)
        sub.add_argument("--split", required=True, help="split name recorded in the metrics")
        sub.add_argument("--metrics", type=Path, required=True, help="metrics JSON to write")
        sub.add_argument("--predictions", type=Path, help="predictions .npz to write")
        sub.add_argument(
            "--batch-size",
            type=int,
            default=16,
            help="systems per batch of one data-parallel group",
        )
        sub.add_argument(
            "--device",
            choices=("auto", "cpu", "cuda"),
            default="auto",
            help="auto: CUDA when available (NCCL under torchrun), else CPU (gloo)",
        )
        sub.add_argument(
            "--gp-size",
            type=int,
            default=1,
            help="G under torchrun: graph-parallel ranks per batch (default 1: the processes "
            "are D = W / G data-parallel groups sharing the split)",
        )
        sub.add_argument(
            "--allow-data-mismatch",
            action="store_true",
            help="evaluate even though the split was preprocessed with other settings (cutoff, "
            "max_neighbors, energy reference) than the checkpoint's training data",
        )
    args = parser.parse_args(argv)
    try:
        metrics = evaluate(
            args.task,
            args.checkpoint,
            args.data,
            args.split,
            args.metrics,
            args.predictions,
            args.batch_size,
            args.device,
            args.allow_data_mismatch,
            args.gp_size,
        )
    except (TrainingError, FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)
    finally:
        leave_processes()
    if metrics is None:
        return
    shown = {k: v for k, v in metrics.items() if k != "provenance"}
    print(
        " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in shown.items())
    )


if __name__ == "__main__":
    main()
