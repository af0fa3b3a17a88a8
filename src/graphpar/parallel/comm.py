"""Communication primitives of graph parallelism, as autograd functions with correct adjoints.

Every tensor in a graph-parallel model is either **replicated** (every rank of the graph-parallel
group holds the same full value: positions, the graph, per-atom state, the energy) or
**partitioned** (each rank holds its own part: its slice of the edges, or a partial sum over its
slice). A collective's backward is the adjoint of its forward *given how the result is consumed*,
so the same forward needs two functions when its result can be consumed either way:

| primitive | forward | result consumed by | backward |
|---|---|---|---|
| `reduce_partial` | all-reduce (sum) of partial sums | replicated work | identity |
| `copy_to_partitioned` | identity | partitioned work | all-reduce (sum) |
| `split` | this rank's slice | partitioned work | all-gather |
| `gather_for_replicated` | all-gather of slices | replicated work | this rank's slice |
| `gather_for_partitioned` | all-gather of slices | partitioned work | reduce-scatter |
| `reduce_scatter` | this rank's slice of the sum | partitioned work | all-gather |

fairchem's `gather_from_model_parallel_region` uses the `gather_for_replicated` adjoint where the
gathered tensor feeds rank-local triplets, which drops every "rank r's triplet reads rank s's
edge" term from parameter gradients and gradient forces (docs/architecture.md section 5, the
adjoint table); the tests here pin that down.

The functions come in adjoint pairs (reduce_partial / copy_to_partitioned, split /
gather_for_replicated, gather_for_partitioned / reduce_scatter) and each backward calls its
partner's autograd function, never a bare collective, so the backward is itself differentiable
with the right adjoint: forces = -dE/dpos taken with `create_graph=True` can be trained on.

Slices are along dim 0 and given by `sizes` (one int per rank of the group, in rank order,
possibly unequal or zero; every rank passes the same sizes). `group` defaults to the current
graph-parallel group (`graphpar.parallel.groups.init_groups`); with a group of one every
primitive returns its input unchanged, so G = 1 runs the serial model.

Parameter gradients: see `sync_gradients` and `scale_replicated`.

Every collective reports its payload to `graphpar.parallel.counting` before it runs
(`count_communication` keeps the records); on the `SimulatedGroup`s of shape-only mode
(`groups.simulate_groups`) nothing is sent and each primitive returns a result of the right shape
(other ranks' contributions read as zeros), which is how `graphpar.parallel.predict` predicts a
step's communication from shapes.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.autograd import Function
from torch.distributed import ProcessGroup

from graphpar.parallel.counting import record_collective
from graphpar.parallel.groups import ParallelDims, SimulatedGroup, get_dims

__all__ = [
    "copy_to_partitioned",
    "gather_for_partitioned",
    "gather_for_replicated",
    "reduce_partial",
    "reduce_scatter",
    "scale_replicated",
    "split",
    "sync_gradients",
]

# torch 2.13 renamed the single-tensor collectives; older torch only has the old names.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


# ----------------------------------------------------------------------------------------------
# Groups and slices
# ----------------------------------------------------------------------------------------------


def _resolve(group: ProcessGroup | None) -> tuple[ProcessGroup | None, int, int]:
    """(group, its size, this rank's index in it); (None, 1, 0) for the process alone."""
    if group is None:
        group = get_dims().gp_group
    if isinstance(group, SimulatedGroup):  # shape-only mode (groups.simulate_groups)
        return group, group.size, group.rank
    if group is None or not dist.is_initialized():
        return None, 1, 0
    return group, dist.get_world_size(group), dist.get_rank(group)


def _check_sizes(
    x: Tensor, sizes: Sequence[int], group_size: int, rank: int, full: bool
) -> tuple[int, ...]:
    """`sizes` as ints, checked against the group and against x's rows along dim 0: every slice
    (`full`) or this rank's. Checked at G = 1 too, so that a caller's mistake shows in serial."""
    sizes = tuple(int(s) for s in sizes)
    if len(sizes) != group_size or min(sizes) < 0:
        raise ValueError(f"sizes {sizes} must give one slice length >= 0 per rank ({group_size})")
    expected = sum(sizes) if full else sizes[rank]
    if x.shape[0] != expected:
        what = "the slices together" if full else f"slice {rank}"
        raise ValueError(f"x has {x.shape[0]} rows, {what} of {sizes}: {expected}")
    return sizes


def _slice(x: Tensor, sizes: tuple[int, ...], rank: int) -> Tensor:
    """This rank's slice of a full tensor, as a new tensor (not a view of autograd's input)."""
    return x.narrow(0, sum(sizes[:rank]), sizes[rank]).clone()


# ----------------------------------------------------------------------------------------------
# Collectives (no autograd): the only places that talk to torch.distributed. Each reports its
# payload to graphpar.parallel.counting first; on a SimulatedGroup (shape-only mode) nothing is
# sent and what other ranks would contribute reads as zeros.
# ----------------------------------------------------------------------------------------------


def all_reduce_in_place(x: Tensor, group, primitive: str) -> None:
    """Sum `x` over `group` in place (a ProcessGroup, or a SimulatedGroup: counted, not sent),
    reported to `counting` as issued by `primitive`. Payload: the tensor."""
    record_collective("all_reduce", primitive, x, group)
    if not isinstance(group, SimulatedGroup):
        dist.all_reduce(x, group=group)


def _all_reduce(x: Tensor, group: ProcessGroup) -> Tensor:
    # Collectives work in place; autograd may still need the input.
    out = x.contiguous().clone()
    all_reduce_in_place(out, group, "reduce_partial")
    return out


def _all_gather(
    x: Tensor, sizes: tuple[int, ...], rank: int, group: ProcessGroup, primitive: str
) -> Tensor:
    largest = max(sizes)
    if largest == 0:  # nothing anywhere (every rank knows it: no collective, no zero-size message)
        return x.new_empty((0, *x.shape[1:]))
    # Gloo's all-gather wants equal shapes: pad every slice to the largest (with zeros, so the
    # buffer is deterministic), gather into one buffer, drop the padding.
    padded = x.new_zeros((largest, *x.shape[1:]))
    padded[: x.shape[0]] = x
    out = x.new_empty((len(sizes) * largest, *x.shape[1:]))
    record_collective("all_gather", primitive, out, group)  # payload: the gathered buffer
    if isinstance(group, SimulatedGroup):
        out.zero_()
        out[rank * largest : (rank + 1) * largest] = padded
    else:
        _all_gather_single(out, padded, group=group)
    if min(sizes) == largest:
        return out
    return torch.cat([out[r * largest : r * largest + s] for r, s in enumerate(sizes)])


def _reduce_scatter(x: Tensor, sizes: tuple[int, ...], rank: int, group: ProcessGroup) -> Tensor:
    largest = max(sizes)
    if largest == 0:
        return x.new_empty((0, *x.shape[1:]))
    # As in _all_gather: slices padded to the largest so that the collective sees equal pieces.
    # A reduce-scatter moves half the data of the equivalent all-reduce-then-slice.
    padded = x.new_zeros((len(sizes) * largest, *x.shape[1:]))
    start = 0
    for r, s in enumerate(sizes):
        padded[r * largest : r * largest + s] = x[start : start + s]
        start += s
    out = x.new_empty((largest, *x.shape[1:]))
    record_collective("reduce_scatter", "reduce_scatter", padded, group)  # payload: padded input
    if isinstance(group, SimulatedGroup):
        out.copy_(padded[rank * largest : (rank + 1) * largest])
    else:
        _reduce_scatter_single(out, padded, group=group)
    return out[: sizes[rank]]


# ----------------------------------------------------------------------------------------------
# Autograd functions, in adjoint pairs: each backward applies its partner (so double backward works)
# ----------------------------------------------------------------------------------------------


class _ReducePartial(Function):
    """Partial sums -> their sum, consumed by replicated work."""

    @staticmethod
    def forward(ctx, x: Tensor, group: ProcessGroup) -> Tensor:
        ctx.group = group
        return _all_reduce(x, group)

    @staticmethod
    def backward(ctx, grad: Tensor):
        # The consumer is replicated, so every rank already holds the full gradient of the sum,
        # and d(sum)/d(own part) = 1. The gradient then feeds this rank's partitioned work.
        return _CopyToPartitioned.apply(grad, ctx.group), None


class _CopyToPartitioned(Function):
    """Replicated tensor -> the same tensor, consumed by partitioned work."""

    @staticmethod
    def forward(ctx, x: Tensor, group: ProcessGroup) -> Tensor:
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        # Each rank's gradient covers only its own share of the consumers: the total is the sum,
        # needed on every rank because the producer is replicated.
        return _ReducePartial.apply(grad, ctx.group), None


class _Split(Function):
    """Replicated tensor -> this rank's slice, consumed by partitioned work."""

    @staticmethod
    def forward(ctx, x: Tensor, sizes: tuple[int, ...], rank: int, group: ProcessGroup):
        ctx.sizes, ctx.rank, ctx.group = sizes, rank, group
        return _slice(x, sizes, rank)

    @staticmethod
    def backward(ctx, grad: Tensor):
        # Rank s alone holds the gradient of slice s; the replicated producer needs all of them.
        return _GatherForReplicated.apply(grad, ctx.sizes, ctx.rank, ctx.group), None, None, None


class _GatherForReplicated(Function):
    """Slices -> their concatenation, consumed by replicated work."""

    @staticmethod
    def forward(ctx, x: Tensor, sizes: tuple[int, ...], rank: int, group: ProcessGroup):
        ctx.sizes, ctx.rank, ctx.group = sizes, rank, group
        return _all_gather(x, sizes, rank, group, "gather_for_replicated")

    @staticmethod
    def backward(ctx, grad: Tensor):
        # Replicated consumers: every rank holds the same, full gradient; keep our slice.
        return _Split.apply(grad, ctx.sizes, ctx.rank, ctx.group), None, None, None


class _GatherForPartitioned(Function):
    """Slices -> their concatenation, consumed by partitioned work."""

    @staticmethod
    def forward(ctx, x: Tensor, sizes: tuple[int, ...], rank: int, group: ProcessGroup):
        ctx.sizes, ctx.rank, ctx.group = sizes, rank, group
        return _all_gather(x, sizes, rank, group, "gather_for_partitioned")

    @staticmethod
    def backward(ctx, grad: Tensor):
        # Partitioned consumers: rank s's gradient is only the part from rank s's work (e.g. its
        # triplets reading our edges), so sum over ranks before keeping our slice. Splitting
        # without the sum is fairchem's bug.
        return _ReduceScatter.apply(grad, ctx.sizes, ctx.rank, ctx.group), None, None, None


class _ReduceScatter(Function):
    """Full-size partial sums -> this rank's slice of their sum, consumed by partitioned work."""

    @staticmethod
    def forward(ctx, x: Tensor, sizes: tuple[int, ...], rank: int, group: ProcessGroup):
        ctx.sizes, ctx.rank, ctx.group = sizes, rank, group
        return _reduce_scatter(x, sizes, rank, group)

    @staticmethod
    def backward(ctx, grad: Tensor):
        # Every rank's partial sum reaches every slice: each needs all slices' gradients, and
        # the result feeds its own (partitioned) producer.
        return _GatherForPartitioned.apply(grad, ctx.sizes, ctx.rank, ctx.group), None, None, None


class _ScaleGradient(Function):
    """Identity forward; gradient multiplied by a constant."""

    @staticmethod
    def forward(ctx, x: Tensor, factor: float) -> Tensor:
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad * ctx.factor, None


# ----------------------------------------------------------------------------------------------
# Public primitives
# ----------------------------------------------------------------------------------------------


def reduce_partial(x: Tensor, group: ProcessGroup | None = None) -> Tensor:
    """Sum of every rank's `x` (partial sums, e.g. a local scatter of edge messages into all
    atoms), for replicated work. Backward: identity."""
    group, size, _ = _resolve(group)
    return x if size == 1 else _ReducePartial.apply(x, group)


def copy_to_partitioned(x: Tensor, group: ProcessGroup | None = None) -> Tensor:
    """`x` unchanged: a replicated tensor entering partitioned work (e.g. positions read by this
    rank's edges). Backward: all-reduce (sum) of the ranks' partial gradients."""
    group, size, _ = _resolve(group)
    return x if size == 1 else _CopyToPartitioned.apply(x, group)


def split(x: Tensor, sizes: Sequence[int], group: ProcessGroup | None = None) -> Tensor:
    """This rank's slice (rows sum(sizes[:rank]) .. + sizes[rank]) of a replicated `x`, for
    partitioned work. Backward: all-gather of the slices' gradients."""
    group, size, rank = _resolve(group)
    sizes = _check_sizes(x, sizes, size, rank, full=True)
    return x if size == 1 else _Split.apply(x, sizes, rank, group)


def gather_for_replicated(
    x: Tensor, sizes: Sequence[int], group: ProcessGroup | None = None
) -> Tensor:
    """Concatenation of every rank's slice `x` ([sizes[rank], ...]), for replicated work (e.g.
    per-atom energies summed on every rank). Backward: this rank's slice of the gradient."""
    group, size, rank = _resolve(group)
    sizes = _check_sizes(x, sizes, size, rank, full=False)
    return x if size == 1 else _GatherForReplicated.apply(x, sizes, rank, group)


def gather_for_partitioned(
    x: Tensor, sizes: Sequence[int], group: ProcessGroup | None = None
) -> Tensor:
    """Concatenation of every rank's slice `x` ([sizes[rank], ...]), for partitioned work (e.g.
    DimeNet++'s down-projected x_kj read by this rank's triplets). Backward: reduce-scatter (the
    sum over ranks of the gradient, then this rank's slice)."""
    group, size, rank = _resolve(group)
    sizes = _check_sizes(x, sizes, size, rank, full=False)
    return x if size == 1 else _GatherForPartitioned.apply(x, sizes, rank, group)


def reduce_scatter(x: Tensor, sizes: Sequence[int], group: ProcessGroup | None = None) -> Tensor:
    """This rank's slice of the sum of every rank's full-size `x` (partial sums), for
    partitioned work (e.g. atom aggregates kept only for this rank's atoms). Backward:
    all-gather of the slices' gradients."""
    group, size, rank = _resolve(group)
    sizes = _check_sizes(x, sizes, size, rank, full=True)
    return x if size == 1 else _ReduceScatter.apply(x, sizes, rank, group)


def scale_replicated(x: Tensor, group: ProcessGroup | None = None) -> Tensor:
    """`x` unchanged; its gradient divided by G. Wrap a parameter at each place where replicated
    work uses it (see `sync_gradients`)."""
    _, size, _ = _resolve(group)
    return x if size == 1 else _ScaleGradient.apply(x, 1.0 / size)


# ----------------------------------------------------------------------------------------------
# Parameter gradients
# ----------------------------------------------------------------------------------------------


def sync_gradients(model: nn.Module | Iterable[Tensor], dims: ParallelDims | None = None) -> None:
    """After backward: every parameter's `.grad` becomes its sum over the graph-parallel group,
    averaged over the data-parallel group. Call exactly once per step, and do not also wrap the
    model in DistributedDataParallel.

    Parameters are replicated, and each rank's gradient covers the work that rank did. The sum
    over the graph-parallel group is the true gradient only if every piece of work is counted
    once, so models follow one rule: **a parameter used by replicated work (work every rank
    repeats on replicated data: per-atom embeddings and MLPs, the energy head, anything upstream
    of `copy_to_partitioned`) is wrapped in `scale_replicated` at that use**, so that the G
    identical contributions sum to one. Parameters used only by partitioned work (per-edge and
    per-triplet layers) are left alone. Losses are the same replicated value on every rank of a
    graph-parallel group; each data-parallel rank's loss is a mean over its own batch, hence the
    average over D.

    A parameter whose `.grad` is None (unused on this rank, e.g. an empty partition) takes part
    with zeros so that every rank runs the same collectives.
    """
    dims = get_dims() if dims is None else dims
    params = model.parameters() if isinstance(model, nn.Module) else model
    params = [p for p in params if p.requires_grad]
    if dims.gp_group is None and dims.dp_group is None:
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    # One flat buffer per dtype and device: one collective per group instead of one per tensor.
    buckets: dict[tuple[torch.dtype, torch.device], list[Tensor]] = {}
    for p in params:
        buckets.setdefault((p.grad.dtype, p.grad.device), []).append(p.grad)
    for grads in buckets.values():
        flat = torch.cat([g.reshape(-1) for g in grads])
        if dims.gp_group is not None:
            all_reduce_in_place(flat, dims.gp_group, "sync_gradients")
        if dims.dp_group is not None:
            all_reduce_in_place(flat, dims.dp_group, "sync_gradients")
            flat /= dims.dp_size
        start = 0
        for g in grads:
            g.copy_(flat[start : start + g.numel()].view_as(g))
            start += g.numel()
