"""Datasets, collation and load-balanced sampling over preprocessed LMDB directories.

    dataset = LmdbDataset("resources/mini/lmdb/s2ef/train", triplets=("dimenetpp",))
    sampler = BalancedBatchSampler(dataset.sizes("triplets_dimenetpp"), batch_size=8,
                                   num_replicas=D, rank=data_parallel_rank, seed=0)
    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=collate, num_workers=2)

All G ranks of a graph-parallel group load the same batch: the sampler is keyed by the
data-parallel rank, never by the global rank (docs/architecture.md section 5).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch_geometric.data import Batch

from graphpar.data.graph import TRIPLET_FAMILIES, attach_graphs, attach_triplets
from graphpar.data.lmdb import STORAGE_MODES, ShardedLmdb, widened
from graphpar.data.sample import Sample

# Per-sample sizes in metadata.npz, by the name a sampler balances on.
SIZE_ARRAYS = {
    "atoms": "natoms",
    "edges": "num_edges",
    "triplets_dimenetpp": "num_triplets_dimenetpp",
    "triplets_gemnet": "num_triplets_gemnet",
}


class LmdbDataset(torch.utils.data.Dataset):
    """A preprocessed dataset directory (shards + metadata) as `Sample` objects.

    `triplets` names the model families whose triplet fields each sample must carry
    (`graphpar.data.graph.TRIPLET_FIELDS`). Samples stored without them (datasets too large to
    store triplets) get them built here, from the stored edges, by `attach_triplets` as in
    preprocessing. Datasets stored without graphs (metadata.json `storage: on_the_fly`) get the
    graph built here too, by `attach_graphs` with the cutoff, max_neighbors and convention the
    metadata records, from the same float32 positions and with the same code as preprocessing:
    a sample is the same in both storage modes, bit for bit. In a DataLoader, workers do this
    building; every rank of a graph-parallel group loads (and builds) the whole batch.

    Integer fields come back as int64 whatever width they are stored in (`widened`). Safe in
    DataLoader workers and in several processes: shards open lazily, read-only, per process.
    """

    def __init__(self, path: str | os.PathLike, triplets: Sequence[str] = ()):
        if unknown := set(triplets) - set(TRIPLET_FAMILIES):
            raise ValueError(f"unknown triplet families {sorted(unknown)}; use {TRIPLET_FAMILIES}")
        self.path = path
        self.triplets = tuple(triplets)
        self.lmdb = ShardedLmdb(path)
        metadata = self.lmdb.metadata
        self.storage = metadata.get("storage", "graphs")
        if self.storage not in STORAGE_MODES:
            raise ValueError(f"{path}: unknown storage {self.storage!r}; not in {STORAGE_MODES}")
        self.graph = (
            metadata.get("cutoff"),
            metadata.get("max_neighbors"),
            metadata.get("graph_convention", "graphpar"),
        )

    def __len__(self) -> int:
        return len(self.lmdb)

    @property
    def metadata(self) -> dict:
        return self.lmdb.metadata

    def sizes(self, cost: str = "atoms") -> np.ndarray:
        """Per-sample cost for load balancing: atoms, edges, triplets_dimenetpp, triplets_gemnet."""
        if cost not in SIZE_ARRAYS:
            raise ValueError(f"unknown cost {cost!r}; use one of {list(SIZE_ARRAYS)}")
        return np.asarray(self.lmdb.arrays[SIZE_ARRAYS[cost]])

    def __getitem__(self, index: int) -> Sample:
        fields = widened(self.lmdb[index])
        sample = Sample(
            **{name: torch.from_numpy(np.array(value)) for name, value in fields.items()}
        )
        if self.storage == "on_the_fly":
            attach_graphs([sample], *self.graph)
        return attach_triplets(sample, self.triplets)


def collate(samples: Sequence[Sample]) -> Batch:
    """Samples -> one PyG Batch with batch-global atom, edge and triplet indices.

    `batch.free` marks the atoms that are not fixed: force losses and metrics use only those.
    """
    batch = Batch.from_data_list(list(samples))
    batch.free = ~batch.fixed.bool()
    return batch


def balanced_partition(sizes: np.ndarray, num_parts: int) -> list[np.ndarray]:
    """Split positions 0..len(sizes)-1 into `num_parts` groups of near-equal total size.

    Greedy longest-processing-time: largest item first, each into the currently lightest group
    (ties to the lowest group). Deterministic; each group keeps its items in ascending order.
    """
    loads = np.zeros(num_parts)
    groups: list[list[int]] = [[] for _ in range(num_parts)]
    for position in np.argsort(-np.asarray(sizes), kind="stable"):
        lightest = int(np.argmin(loads))
        groups[lightest].append(int(position))
        loads[lightest] += sizes[position]
    return [np.array(sorted(group), dtype=np.int64) for group in groups]


class BalancedBatchSampler(torch.utils.data.Sampler[list[int]]):
    """This data-parallel rank's share of every global batch, balanced by per-sample cost.

    Each step draws a global batch of `batch_size * num_replicas` samples (a seeded permutation
    per epoch: deterministic for `seed` and `set_epoch`), splits it among the replicas so their
    summed `sizes` (atoms, edges or triplets) are near-equal, and yields this `rank`'s part.
    Ranks may get different numbers of samples; losses are normalised by global counts. The last
    global batch is dropped with `drop_last`, otherwise padded from the start of the epoch's
    order so every rank gets at least one sample.
    """

    def __init__(
        self,
        sizes: Sequence[float] | np.ndarray,
        batch_size: int,
        num_replicas: int = 1,
        rank: int = 0,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = False,
    ):
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is outside 0..{num_replicas - 1}")
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        self.sizes = np.asarray(sizes, dtype=np.float64)
        self.batch_size = batch_size
        self.num_replicas = num_replicas
        self.rank = rank
        self.seed = seed
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.epoch = 0

    @property
    def global_batch_size(self) -> int:
        return self.batch_size * self.num_replicas

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        full, rest = divmod(len(self.sizes), self.global_batch_size)
        return full + int(rest > 0 and not self.drop_last)

    def __iter__(self) -> Iterator[list[int]]:
        if self.shuffle:
            order = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.sizes))
        else:
            order = np.arange(len(self.sizes))
        for step in range(len(self)):
            indices = order[step * self.global_batch_size : (step + 1) * self.global_batch_size]
            if len(indices) < self.num_replicas:
                padding = np.resize(order, self.num_replicas - len(indices))
                indices = np.concatenate([indices, padding])
            parts = balanced_partition(self.sizes[indices], self.num_replicas)
            yield indices[parts[self.rank]].tolist()
