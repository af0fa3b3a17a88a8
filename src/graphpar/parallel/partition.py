"""Partitions of a batch over the G ranks of a graph-parallel group.

A **partition** here is always a set of G contiguous slices of one batch dimension, in rank
order: rank r owns rows `bounds[r] .. bounds[r+1] - 1`. Slices may be empty (a tiny graph on many
ranks). Everything is deterministic: every rank of a group computes the same partition from the
same batch, with no communication.

Edges (sorted by target, as `graphpar.data.graph` builds them) are partitioned by cost: a
triplet belongs to the rank that owns its *output* edge (DimeNet++ `idx_ji`, GemNet `id3_ca`),
so the cost of an edge is the number of triplets it is the output edge of, and each rank's
triplets read their input edges (`idx_kj`, `id3_ba`) from the gathered, full edge tensor
(`comm.gather_for_partitioned`), wherever those edges live.

`edge_costs("edges")` switches, for the duration of a block, to fairchem's split (G slices of
equal edge count, triplets still following their output edge): `predict_step(...,
partition="edges")` uses it to compare the two balances; training always balances triplets.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from graphpar.parallel.meta import to_meta, values_of

__all__ = [
    "LocalTriplets",
    "Partition",
    "EdgeShare",
    "EDGE_COSTS",
    "balanced_partition",
    "edge_costs",
    "local_triplets",
    "partition_atoms",
    "partition_edges",
    "share_edges",
]


@dataclass(frozen=True)
class Partition:
    """G contiguous slices of a dimension of `total` rows: rank r owns bounds[r]:bounds[r+1]."""

    bounds: tuple[int, ...]  # G + 1 non-decreasing ints, from 0 to total

    @property
    def num_parts(self) -> int:
        return len(self.bounds) - 1

    @property
    def total(self) -> int:
        return self.bounds[-1]

    @property
    def sizes(self) -> tuple[int, ...]:
        """Rows per rank: the `sizes` argument of the primitives in `comm`."""
        return tuple(b - a for a, b in zip(self.bounds[:-1], self.bounds[1:], strict=True))

    def slice(self, rank: int) -> slice:
        return slice(self.bounds[rank], self.bounds[rank + 1])

    def owner(self, ids: Tensor) -> Tensor:
        """Rank that owns each of `ids` (global row ids)."""
        upper = torch.tensor(self.bounds[1:], dtype=torch.long, device=ids.device)
        return torch.searchsorted(upper, ids, right=True)  # empty slices are skipped


def balanced_partition(cost: Tensor, num_parts: int) -> Partition:
    """Contiguous slices of rows with integer costs >= 0, each holding about 1/G of the total.

    Each row goes to the slice where the midpoint of its cost interval falls (cumulative cost
    scaled to 0..G), so no slice exceeds its share by more than half a row's cost. Rows of a
    zero total are split by count. Exact integer arithmetic: every rank gets the same answer.
    """
    if num_parts < 1:
        raise ValueError(f"num_parts must be >= 1, got {num_parts}")
    cost = torch.as_tensor(cost).reshape(-1).cpu()
    if cost.is_floating_point() or cost.is_complex():
        raise TypeError(f"costs must be integers, got {cost.dtype}")
    cost = cost.long()
    if bool((cost < 0).any()):
        raise ValueError("costs must be >= 0")
    num_rows, total = cost.numel(), int(cost.sum())
    if total == 0:
        owner = torch.arange(num_rows) * num_parts // max(num_rows, 1)
    else:
        before = torch.cumsum(cost, 0) - cost
        owner = ((2 * before + cost) * num_parts // (2 * total)).clamp(max=num_parts - 1)
    sizes = torch.bincount(owner, minlength=num_parts)
    return Partition((0, *torch.cumsum(sizes, 0).tolist()))


# What an edge costs when edges are partitioned: "triplets" (the number of triplets it is the
# output edge of: ours) or "edges" (1 each: fairchem's equal edge counts).
EDGE_COSTS = ("triplets", "edges")
_edge_cost = "triplets"


@contextlib.contextmanager
def edge_costs(cost: str) -> Iterator[None]:
    """Partition edges by `cost` (one of EDGE_COSTS) inside the block (module docstring)."""
    global _edge_cost
    if cost not in EDGE_COSTS:
        raise ValueError(f"edge cost must be one of {', '.join(EDGE_COSTS)}, not {cost!r}")
    before, _edge_cost = _edge_cost, cost
    try:
        yield
    finally:
        _edge_cost = before


def partition_edges(output_edge: Tensor, num_edges: int, num_parts: int) -> Partition:
    """Edges balanced by triplet count: the cost of an edge is the number of triplets whose
    output edge it is (`output_edge` = DimeNet++ `idx_ji` or GemNet `id3_ca`); by edge count
    inside `edge_costs("edges")`."""
    cost = torch.bincount(output_edge.reshape(-1).cpu(), minlength=num_edges)
    if cost.numel() != num_edges:
        raise ValueError(f"output edge ids reach {cost.numel() - 1}, only {num_edges} edges")
    if _edge_cost == "edges":
        cost = torch.ones(num_edges, dtype=torch.long)
    return balanced_partition(cost, num_parts)


def partition_atoms(num_atoms: int, num_parts: int) -> Partition:
    """Atoms in G contiguous slices of equal size, the first `num_atoms % G` one atom larger
    (as `numpy.array_split`), for models that keep per-atom state partitioned."""
    base, extra = divmod(int(num_atoms), num_parts)
    sizes = [base + (r < extra) for r in range(num_parts)]
    bounds = [0]
    for s in sizes:
        bounds.append(bounds[-1] + s)
    return Partition(tuple(bounds))


@dataclass(frozen=True)
class LocalTriplets:
    """The triplets of one rank: those whose output edge it owns, in batch order."""

    ids: Tensor  # [T_r] ids in the batch's triplet list (to select per-triplet inputs)
    input_edge: Tensor  # [T_r] global edge ids: rows of the gathered (full) edge tensor
    output_edge: Tensor  # [T_r] local edge ids: rows of this rank's edge slice


def local_triplets(
    partition: Partition, rank: int, input_edge: Tensor, output_edge: Tensor
) -> LocalTriplets:
    """The triplets that `rank` computes, given the batch's triplets as (input edge, output
    edge) ids: DimeNet++ (`idx_kj`, `idx_ji`) or GemNet (`id3_ba`, `id3_ca`)."""
    start, stop = partition.bounds[rank], partition.bounds[rank + 1]
    ids = torch.nonzero((output_edge >= start) & (output_edge < stop)).reshape(-1)
    return LocalTriplets(ids, input_edge[ids], output_edge[ids] - start)


@dataclass(frozen=True)
class EdgeShare:
    """What one rank of a graph-parallel group computes: its edges and their triplets.

    With G = 1 it is the whole batch, so a model has one code path for any G."""

    edges: slice  # this rank's rows of the batch's edge tensors
    edge_sizes: tuple[int, ...] | None  # edges per rank, for the gathers (None: serial)
    input_edge: Tensor  # [T_r] global ids of its triplets' input edges (k->j, b->a)
    output_edge: Tensor  # [T_r] global ids of its triplets' output edges (j->i, c->a)
    output_edge_local: Tensor  # [T_r] the same, as rows of this rank's edges


def share_edges(
    input_edge: Tensor, output_edge: Tensor, num_edges: int, gp_size: int, gp_rank: int
) -> EdgeShare:
    """This rank's share of a batch whose triplets are (input edge, output edge) pairs: a
    contiguous slice of the edges balanced by triplet count (`partition_edges`), and the
    triplets whose output edge it owns (`local_triplets`).

    Meta tensors (shape-only prediction, `graphpar.parallel.predict`) must know their values
    (`graphpar.parallel.meta.to_meta`): the share is computed from those, and its index
    tensors are meta tensors that know theirs."""
    if input_edge.is_meta or output_edge.is_meta:
        share = share_edges(
            values_of(input_edge), values_of(output_edge), num_edges, gp_size, gp_rank
        )
        return EdgeShare(
            share.edges,
            share.edge_sizes,
            to_meta(share.input_edge),
            to_meta(share.output_edge),
            to_meta(share.output_edge_local),
        )
    if gp_size == 1:
        return EdgeShare(slice(0, num_edges), None, input_edge, output_edge, output_edge)
    part = partition_edges(output_edge, num_edges, gp_size)
    local = local_triplets(part, gp_rank, input_edge, output_edge)
    return EdgeShare(
        part.slice(gp_rank),
        part.sizes,
        local.input_edge,
        output_edge[local.ids],
        local.output_edge,
    )
