"""Graph parallelism (design.md section 3): process groups (G graph-parallel x D data-parallel),
communication primitives with the adjoints their consumers need, and balanced partitions.

Vocabulary: `groups` (rank, group, G, D), `comm` (replicated vs partitioned tensors),
`partition` (contiguous slices per rank).
"""

from graphpar.parallel.comm import (
    copy_to_partitioned,
    gather_for_partitioned,
    gather_for_replicated,
    reduce_partial,
    reduce_scatter,
    scale_replicated,
    split,
    sync_gradients,
)
from graphpar.parallel.groups import ParallelDims, destroy_groups, get_dims, init_groups
from graphpar.parallel.partition import (
    EdgeShare,
    LocalTriplets,
    Partition,
    balanced_partition,
    local_triplets,
    partition_atoms,
    partition_edges,
    share_edges,
)

__all__ = [
    "EdgeShare",
    "LocalTriplets",
    "ParallelDims",
    "Partition",
    "balanced_partition",
    "copy_to_partitioned",
    "destroy_groups",
    "gather_for_partitioned",
    "gather_for_replicated",
    "get_dims",
    "init_groups",
    "local_triplets",
    "partition_atoms",
    "partition_edges",
    "reduce_partial",
    "reduce_scatter",
    "scale_replicated",
    "share_edges",
    "split",
    "sync_gradients",
]
