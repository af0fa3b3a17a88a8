"""The data of a training run: its datasets, checked against the model's cutoff and each other,
what a checkpoint records of them (and the checks against that record at evaluation,
relaxation and resume), and this rank's batches of every global batch."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from itertools import islice
from typing import Any

import numpy as np
import torch

from graphpar.data.dataset import BalancedBatchSampler, LmdbDataset, collate
from graphpar.data.lmdb import dataset_identity
from graphpar.models import build_model
from graphpar.parallel import get_dims
from graphpar.training.config import TrainingError


def model_facts(config: Mapping) -> tuple[str, float]:
    """(triplet family, cutoff in A) of the config's model, from a copy built on the meta
    device (no memory, no initialisation)."""
    with torch.device("meta"):
        probe = build_model(config["model"], **config["model_args"])
    return probe.triplet_family, float(probe.cutoff)


def open_datasets(config: Mapping, family: str):
    """(concatenated training set, per-sample balancing costs, the datasets one by one), with
    the triplets of `family` attached."""
    datasets = []
    for path in config["train"]:
        try:
            datasets.append(LmdbDataset(path, triplets=(family,)))
        except FileNotFoundError as error:
            raise TrainingError(f"training dataset {path}: {error}") from error
    cost = f"triplets_{family}" if config["balance_on"] == "triplets" else config["balance_on"]
    sizes = np.concatenate([d.sizes(cost) for d in datasets])
    return torch.utils.data.ConcatDataset(datasets), sizes, datasets


# The settings of a dataset that a model trained on it depends on: its graphs (cutoff in A,
# neighbours per atom, how they are capped: graphpar.data.graph.GRAPH_CONVENTIONS) and what its
# energies are (graphpar.preprocess.energy_reference).
DATA_SETTINGS = ("cutoff", "max_neighbors", "graph_convention", "energy_reference")
# How the graphs a model was trained on were built: what inference rebuilds them with.
GRAPH_SETTINGS = ("cutoff", "max_neighbors", "graph_convention")


def _differs(key: str, recorded, found) -> bool:
    """Two recorded values of a data setting differ (None: not recorded, so no comparison;
    except the graph convention: data and checkpoints that do not record it used "graphpar")."""
    if key == "graph_convention":
        recorded, found = recorded or "graphpar", found or "graphpar"
    if recorded is None or found is None:
        return False
    if key == "cutoff":
        return abs(float(recorded) - float(found)) > 1e-6
    return recorded != found


def check_cutoff(cutoff: float, datasets: list[LmdbDataset]) -> None:
    """The datasets' graphs were built with the model's cutoff, and all the datasets of a run
    (training and validation) with the same settings."""
    for dataset in datasets:
        recorded = dataset.metadata.get("cutoff")
        if _differs("cutoff", recorded, cutoff):
            raise TrainingError(
                f"{dataset.path} was preprocessed with cutoff {recorded} A but the model uses "
                f"{cutoff} A: set model_args.cutoff or preprocess again"
            )
    first = datasets[0]
    for dataset in datasets[1:]:
        for key in DATA_SETTINGS:
            mine, theirs = first.metadata.get(key), dataset.metadata.get(key)
            if _differs(key, mine, theirs):
                raise TrainingError(
                    f"{dataset.path} has {key} {theirs} but {first.path} has {mine}: a run's "
                    "datasets must be preprocessed alike"
                )


def data_record(datasets: list[LmdbDataset]) -> dict[str, Any]:
    """What a checkpoint records of the data it was trained on: the data settings and each
    dataset's identity ({path: identity}), checked by `check_checkpoint_data` and on resume."""
    first = datasets[0].metadata
    return {
        **{key: first.get(key) for key in DATA_SETTINGS},
        "datasets": {str(d.path): dataset_identity(d.metadata) for d in datasets},
    }


def check_checkpoint_data(
    state: Mapping,
    checkpoint,
    metadata: Mapping,
    data,
    keys: tuple[str, ...] = DATA_SETTINGS,
    allow: bool = False,
) -> None:
    """Evaluation and relaxation: the dataset `data` (its metadata.json `metadata`) was
    preprocessed with the `keys` settings the checkpoint was trained with; otherwise a
    TrainingError naming both values (unless `allow`, the --allow-data-mismatch of the CLIs)."""
    recorded = {**(state.get("graph") or {}), **(state.get("data") or {})}
    for key in keys:
        if not allow and _differs(key, recorded.get(key), metadata.get(key)):
            raise TrainingError(
                f"{data} has {key} {metadata.get(key)} but {checkpoint} was trained on "
                f"{key} {recorded.get(key)}: preprocess it as the training data was, or pass "
                "--allow-data-mismatch"
            )


def check_resumed_data(state: Mapping, record: Mapping, checkpoint, allow: bool = False) -> None:
    """Resuming: the run's datasets are the ones its checkpoint was trained on (identity), not
    data replaced at the same paths; otherwise a TrainingError naming both identities (unless
    `allow`: then training continues on the new data with the checkpoint's normalisation)."""
    before = (state.get("data") or {}).get("datasets")
    if before is None or allow:
        return
    for path, identity in record["datasets"].items():
        if path in before and before[path] != identity:
            raise TrainingError(
                f"{path} is not the data {checkpoint} was trained on (identity "
                f"{before[path][:16]} in the checkpoint, {identity[:16]} now): use another --out, "
                "or pass --allow-data-mismatch to continue on it with the old normalisation"
            )
        if path not in before:
            raise TrainingError(
                f"{path} is not among the datasets {checkpoint} was trained on "
                f"({', '.join(before)}): use another --out, or pass --allow-data-mismatch"
            )


@dataclass
class TrainingData:
    """A run's training set (with balancing costs), validation set (or None), how the
    training graphs were built (so inference builds the same ones) and the `data_record` of
    its datasets."""

    train: torch.utils.data.Dataset
    sizes: np.ndarray
    val: LmdbDataset | None
    graph: dict[str, Any]
    record: dict[str, Any]

    @classmethod
    def open(cls, config: Mapping) -> TrainingData:
        family, cutoff = model_facts(config)
        dataset, sizes, parts = open_datasets(config, family)
        val = None
        if config["val"] is not None:
            try:
                val = LmdbDataset(config["val"], triplets=(family,))
            except FileNotFoundError as error:
                raise TrainingError(f"validation dataset {config['val']}: {error}") from error
        every = [*parts, *([val] if val is not None else [])]
        check_cutoff(cutoff, every)
        graph = {key: parts[0].metadata.get(key) for key in GRAPH_SETTINGS}
        return cls(dataset, sizes, val, graph, data_record(every))


def batch_sampler(config: Mapping, sizes) -> BalancedBatchSampler:
    """This rank's share of every global batch: the config's batch split over the D
    data-parallel ranks, balanced by `sizes` (per-sample cost)."""
    dims = get_dims()
    return BalancedBatchSampler(
        sizes,
        batch_size=config["batch_size"] // dims.dp_size,
        num_replicas=dims.dp_size,
        rank=dims.dp_rank,
        seed=config["seed"],
    )


class ResumedSampler:
    """A batch sampler that skips the first `skip` batches of its epoch (resuming mid-epoch)."""

    def __init__(self, sampler: BalancedBatchSampler, skip: int = 0):
        self.sampler, self.skip = sampler, skip

    def __iter__(self):
        return islice(iter(self.sampler), self.skip, None)

    def __len__(self) -> int:
        return len(self.sampler) - self.skip


def epoch_batches(dataset, sampler: BalancedBatchSampler, epoch: int, skip: int, workers: int):
    """This rank's batches of `epoch`, after the first `skip` (collated, on the CPU)."""
    sampler.set_epoch(epoch)
    return torch.utils.data.DataLoader(
        dataset,
        batch_sampler=ResumedSampler(sampler, skip),
        collate_fn=collate,
        num_workers=workers,
    )
