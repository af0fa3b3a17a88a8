"""The data of a training run: its datasets, checked against the model's cutoff, and this rank's
batches of every global batch."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from itertools import islice
from typing import Any

import numpy as np
import torch

from graphpar.data.dataset import BalancedBatchSampler, LmdbDataset, collate
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


def check_cutoff(cutoff: float, datasets: list[LmdbDataset]) -> None:
    """The datasets' graphs were built with the model's cutoff."""
    for dataset in datasets:
        recorded = dataset.metadata.get("cutoff")
        if recorded is not None and abs(float(recorded) - cutoff) > 1e-6:
            raise TrainingError(
                f"{dataset.path} was preprocessed with cutoff {recorded} A but the model uses "
                f"{cutoff} A: set model_args.cutoff or preprocess again"
            )


@dataclass
class TrainingData:
    """A run's training set (with balancing costs), validation set (or None) and how the
    training graphs were built (so inference builds the same ones)."""

    train: torch.utils.data.Dataset
    sizes: np.ndarray
    val: LmdbDataset | None
    graph: dict[str, Any]

    @classmethod
    def open(cls, config: Mapping) -> TrainingData:
        family, cutoff = model_facts(config)
        dataset, sizes, parts = open_datasets(config, family)
        check_cutoff(cutoff, parts)
        graph = {key: parts[0].metadata.get(key) for key in ("cutoff", "max_neighbors")}
        val = None
        if config["val"] is not None:
            try:
                val = LmdbDataset(config["val"], triplets=(family,))
            except FileNotFoundError as error:
                raise TrainingError(f"validation dataset {config['val']}: {error}") from error
        return cls(dataset, sizes, val, graph)


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
