"""Graph parallelism (docs/architecture.md section 5): process groups (G graph-parallel x D
data-parallel), communication primitives with the adjoints their consumers need, and balanced
partitions.

Vocabulary: `groups` (rank, group, G, D; shape-only mode), `comm` (replicated vs partitioned
tensors), `partition` (contiguous slices per rank), `launch` (joining torchrun's processes,
`is_main`), `counting` (the collectives a step issues, with their payload bytes; the FLOPs,
gathers and scatters it runs), `predict` (both, per rank, from shapes alone on the meta device:
`graphpar.parallel.predict.predict_step`; imported on demand, as it imports the models), `meta`
(meta index tensors that keep their values).
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
from graphpar.parallel.counting import (
    Collective,
    CommCounter,
    OpCounter,
    count_communication,
    count_operations,
)
from graphpar.parallel.groups import (
    ParallelDims,
    SimulatedGroup,
    destroy_groups,
    get_dims,
    init_groups,
    simulate_groups,
)
from graphpar.parallel.launch import (
    any_rank,
    broadcast,
    dp_sum,
    gather_world,
    is_main,
    join_processes,
    leave_processes,
    setup_processes,
    world_rank,
)
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
    "Collective",
    "CommCounter",
    "EdgeShare",
    "LocalTriplets",
    "OpCounter",
    "ParallelDims",
    "Partition",
    "SimulatedGroup",
    "any_rank",
    "balanced_partition",
    "broadcast",
    "copy_to_partitioned",
    "count_communication",
    "count_operations",
    "destroy_groups",
    "dp_sum",
    "gather_for_partitioned",
    "gather_for_replicated",
    "gather_world",
    "get_dims",
    "init_groups",
    "is_main",
    "join_processes",
    "leave_processes",
    "local_triplets",
    "partition_atoms",
    "partition_edges",
    "reduce_partial",
    "reduce_scatter",
    "scale_replicated",
    "setup_processes",
    "share_edges",
    "simulate_groups",
    "split",
    "sync_gradients",
    "world_rank",
]
