"""Process groups for graph parallelism x data parallelism.

Vocabulary (used with exactly these meanings throughout `graphpar.parallel`):

* **rank**: a process's index in the whole world, 0..W-1. `gp_rank` and `dp_rank` are its indices
  inside its graph-parallel and data-parallel group.
* **G** = graph-parallel size: how many ranks share one batch, each computing its partition of it.
* **D** = data-parallel size: how many different batches are processed at once. W = D * G.
* **group**: a set of ranks that run collectives together. The W ranks are laid out row-major as a
  D x G matrix: rank r sits at row r // G, column r % G.
    * a **graph-parallel group** is a row: G consecutive ranks (on one node, so that the
      frequent per-layer collectives stay on the fast intra-node links). All of them load the
      same batch.
    * a **data-parallel group** is a column: the D ranks with the same `gp_rank`. Each loads a
      different batch (the sampler is keyed by `dp_rank`); they average gradients once per step.
* **partition**: the contiguous slice of a batch dimension (edges, atoms) that one rank of a
  graph-parallel group owns; see `graphpar.parallel.partition`.

With G = 1, or without `torch.distributed` initialised, the graph-parallel group is the process
alone (size 1, rank 0) and every collective in `graphpar.parallel.comm` is skipped.

**Shape-only mode** (`simulate_groups`): one process plays one rank of a G x D layout. Its groups
are `SimulatedGroup`s (a size and this rank's index, no processes behind them): the models
partition the batch as that rank would, and the primitives report each collective to
`graphpar.parallel.counting` and return a correctly shaped result without communicating
(zeros where data would come from other ranks). `graphpar.parallel.predict` runs a step that
way on the meta device.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch.distributed as dist
from torch.distributed import ProcessGroup

__all__ = [
    "ParallelDims",
    "SimulatedGroup",
    "destroy_groups",
    "get_dims",
    "init_groups",
    "simulate_groups",
]


@dataclass(frozen=True)
class SimulatedGroup:
    """A group of `size` ranks in shape-only mode, seen from its member `rank`: the primitives
    of `graphpar.parallel.comm` record what they would send and communicate nothing."""

    size: int
    rank: int


@dataclass(frozen=True)
class ParallelDims:
    """This rank's place in the D x G layout and the two groups it belongs to.

    `gp_group` / `dp_group` are None when that group has one member (G = 1 / D = 1): there is
    nothing to communicate with, and the primitives treat None as "this process alone".
    """

    gp_size: int = 1  # G
    dp_size: int = 1  # D
    rank: int = 0  # in the world
    gp_group: ProcessGroup | SimulatedGroup | None = None
    dp_group: ProcessGroup | SimulatedGroup | None = None

    @property
    def world_size(self) -> int:
        return self.gp_size * self.dp_size

    @property
    def gp_rank(self) -> int:
        """Column of this rank: its position in its graph-parallel group."""
        return self.rank % self.gp_size

    @property
    def dp_rank(self) -> int:
        """Row of this rank: which batch its graph-parallel group works on."""
        return self.rank // self.gp_size

    def gp_ranks(self, dp_rank: int) -> list[int]:
        """World ranks of the graph-parallel group of row `dp_rank` (G consecutive ranks)."""
        return list(range(dp_rank * self.gp_size, (dp_rank + 1) * self.gp_size))

    def dp_ranks(self, gp_rank: int) -> list[int]:
        """World ranks of the data-parallel group of column `gp_rank` (stride G)."""
        return list(range(gp_rank, self.world_size, self.gp_size))


# The layout the primitives use by default; replaced by `init_groups`, reset by `destroy_groups`.
_DIMS = ParallelDims()


def init_groups(graph_parallel_size: int) -> ParallelDims:
    """Create the graph-parallel and data-parallel groups of this rank, and make them current.

    Call after `torch.distributed.init_process_group`, on every rank, with the same G. Without an
    initialised process group only G = 1 is possible and the result is the single process.

    Raises:
        ValueError: G < 1, or G does not divide the world size W.
        RuntimeError: G > 1 without an initialised process group.
    """
    global _DIMS
    gp_size = int(graph_parallel_size)
    if gp_size < 1:
        raise ValueError(f"graph_parallel_size must be >= 1, got {graph_parallel_size}")
    if not (dist.is_available() and dist.is_initialized()):
        if gp_size != 1:
            raise RuntimeError(
                f"graph_parallel_size={gp_size} needs torch.distributed.init_process_group first"
            )
        _DIMS = ParallelDims()
        return _DIMS

    world_size, rank = dist.get_world_size(), dist.get_rank()
    if world_size % gp_size != 0:
        divisors = [g for g in range(1, world_size + 1) if world_size % g == 0]
        raise ValueError(
            f"graph_parallel_size G={gp_size} does not divide the world size W={world_size}: "
            f"W = D x G needs G in {divisors}"
        )
    layout = ParallelDims(gp_size=gp_size, dp_size=world_size // gp_size, rank=rank)

    # new_group is collective over the whole world: every rank creates every group, in the same
    # order (all rows, then all columns), and keeps the two it belongs to. Single-member groups
    # are skipped on every rank alike.
    gp_group = dp_group = None
    if layout.gp_size > 1:
        for row in range(layout.dp_size):
            group = dist.new_group(layout.gp_ranks(row))
            if row == layout.dp_rank:
                gp_group = group
    if layout.dp_size > 1:
        for column in range(layout.gp_size):
            group = dist.new_group(layout.dp_ranks(column))
            if column == layout.gp_rank:
                dp_group = group
    _DIMS = ParallelDims(layout.gp_size, layout.dp_size, rank, gp_group, dp_group)
    return _DIMS


def get_dims() -> ParallelDims:
    """The current layout (the single process until `init_groups` has run)."""
    return _DIMS


def destroy_groups() -> None:
    """Forget the current groups (the single process again). Destroying the process group
    itself (`torch.distributed.destroy_process_group`) is left to whoever created it."""
    global _DIMS
    _DIMS = ParallelDims()


@contextlib.contextmanager
def simulate_groups(
    gp_size: int, gp_rank: int = 0, dp_size: int = 1, dp_rank: int = 0
) -> Iterator[ParallelDims]:
    """Shape-only mode for the body: this process plays rank (dp_rank, gp_rank) of a G x D
    layout whose groups are `SimulatedGroup`s (module docstring); the previous layout comes
    back afterwards. Every primitive then reports its collectives
    (`graphpar.parallel.counting.count_communication`) and returns shapes, not data."""
    global _DIMS
    if gp_size < 1 or dp_size < 1 or not (0 <= gp_rank < gp_size and 0 <= dp_rank < dp_size):
        raise ValueError(f"no rank ({dp_rank}, {gp_rank}) in a layout of G={gp_size} x D={dp_size}")
    saved = _DIMS
    _DIMS = ParallelDims(
        gp_size=gp_size,
        dp_size=dp_size,
        rank=dp_rank * gp_size + gp_rank,
        gp_group=SimulatedGroup(gp_size, gp_rank) if gp_size > 1 else None,
        dp_group=SimulatedGroup(dp_size, dp_rank) if dp_size > 1 else None,
    )
    try:
        yield _DIMS
    finally:
        _DIMS = saved
