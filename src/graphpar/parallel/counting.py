"""Counting what a step communicates and computes: one counter of the collectives the
graph-parallel primitives issue (`count_communication`), and one of the operations a rank runs
(`count_operations`: matrix-product FLOPs, gathers and scatters).

**Communication.** Every collective in `graphpar.parallel` (`comm`'s all-gather, reduce-scatter
and all-reduce, in forward and backward, the gradient all-reduces of `sync_gradients` and
`launch.dp_sum`) reports itself here before it runs, with its payload; a
`count_communication()` block keeps the reports of the collectives issued inside it:

    with count_communication() as counter:
        train_step(model, batch, optimizer, config)
    counter.payload_bytes()          # {"all_gather": ..., "reduce_scatter": ..., "all_reduce": ...}
    counter.records                  # one `Collective` per call, in order

Payload (`Collective.payload_bytes`) is the buffer each rank hands to the collective, and
`ring_send_bytes` what each rank sends under a ring algorithm:

* all-gather: payload = the gathered output buffer, G x the largest slice (slices are
  zero-padded to the largest); ring: (G - 1) / G x payload (every other rank's padded slice
  passes on);
* reduce-scatter: payload = the padded input buffer, G x the largest slice; ring:
  (G - 1) / G x payload;
* all-reduce: payload = the tensor; ring: 2 (G - 1) x ceil(numel / G) x element size (a
  reduce-scatter and an all-gather of G equal chunks).

G is the size of the group that runs it (`group_size`: G for graph-parallel collectives, D for
the data-parallel ones). The ring figures are a model of what crosses the links (NCCL's ring,
gloo's ring all-reduce), not what gloo's algorithm on loopback sends; payload is exact.

In shape-only mode (`graphpar.parallel.groups.simulate_groups`) the primitives report the same
records and return correctly shaped tensors without communicating: `graphpar.parallel.predict`
runs a step on the meta device that way.

**Operations.** `count_operations()` is a `TorchDispatchMode` that sees every aten operation of
the forward and backward passes (any device, the meta device included) and counts: matrix
products in FLOPs (torch.utils.flop_counter's formulas: 2 x m x n x k for a product, batched and
convolution products included); gathers (rows read by index: `x[idx]`, index_select, embedding,
gather) and scatters (rows written by index: index_add, index_put, scatter, and their
accumulating forms, which are the backward of the gathers), each in elements moved and bytes
(elements x element size; the index tensors themselves are not counted); accumulating scatters
also in FLOPs (one addition per element); everything else as the elements its results hold (a
proxy for the memory traffic of element-wise work; views and factories are skipped).
"""

from __future__ import annotations

import contextlib
import math
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import FlopCounterMode, flop_registry

from graphpar.parallel.groups import SimulatedGroup, get_dims

__all__ = [
    "COLLECTIVES",
    "Collective",
    "CommCounter",
    "OpCounter",
    "count_communication",
    "count_operations",
    "ring_send_bytes",
]

COLLECTIVES = ("all_gather", "reduce_scatter", "all_reduce")


@dataclass(frozen=True)
class Collective:
    """One collective call as one rank issued it.

    `primitive`: the function of `graphpar.parallel` whose forward computation it is
    (`reduce_partial`, `gather_for_partitioned`, `gather_for_replicated`, `reduce_scatter`,
    `sync_gradients`, `dp_sum`); a backward runs its partner's forward (the adjoint table of
    `comm`), so e.g. the all-reduce of `copy_to_partitioned`'s backward reads (all_reduce,
    reduce_partial, backward). `phase`: "forward", "backward" (inside an autograd backward
    pass: DimeNet++'s force gradient, the loss backward with its double backward, recomputed
    blocks) or "gradients" (`sync_gradients`); `backward_pass`: which backward pass of the
    counted block (1, 2, ...; 0 outside backward). `group`: "gp" or "dp" (the current
    layout's graph- or data-parallel group), "other" for a group passed explicitly."""

    kind: str  # "all_gather" | "reduce_scatter" | "all_reduce"
    primitive: str
    phase: str
    backward_pass: int
    group: str
    group_size: int
    dtype: str  # "float64", ...
    shape: tuple[int, ...]  # of the payload buffer
    payload_bytes: int
    ring_send_bytes: int


def ring_send_bytes(kind: str, numel: int, element_size: int, group_size: int) -> int:
    """Bytes one rank sends for a collective of `numel` payload elements under a ring algorithm
    over `group_size` ranks (module docstring)."""
    if group_size <= 1:
        return 0
    if kind == "all_reduce":
        return 2 * (group_size - 1) * math.ceil(numel / group_size) * element_size
    if kind in ("all_gather", "reduce_scatter"):
        return (group_size - 1) * (numel // group_size) * element_size
    raise ValueError(f"unknown collective {kind!r}; one of {COLLECTIVES}")


@dataclass
class CommCounter:
    """The collectives issued inside a `count_communication()` block, by this rank."""

    records: list[Collective] = field(default_factory=list)
    _passes: dict[int, int] = field(default_factory=dict)

    def _backward_pass(self) -> int:
        task = torch._C._current_graph_task_id()
        if task == -1:
            return 0
        return self._passes.setdefault(task, len(self._passes) + 1)

    def add(self, kind: str, primitive: str, buffer: Tensor, group: str, group_size: int) -> None:
        backward_pass = self._backward_pass()
        if primitive == "sync_gradients":
            phase = "gradients"
        else:
            phase = "backward" if backward_pass else "forward"
        numel, size = buffer.numel(), buffer.element_size()
        self.records.append(
            Collective(
                kind=kind,
                primitive=primitive,
                phase=phase,
                backward_pass=backward_pass,
                group=group,
                group_size=group_size,
                dtype=str(buffer.dtype).removeprefix("torch."),
                shape=tuple(buffer.shape),
                payload_bytes=numel * size,
                ring_send_bytes=ring_send_bytes(kind, numel, size, group_size),
            )
        )

    def _sums(self, by: str, value) -> dict[str, int]:
        sums: dict[str, int] = dict.fromkeys(COLLECTIVES, 0) if by == "kind" else {}
        for record in self.records:
            name = getattr(record, by)
            sums[name] = sums.get(name, 0) + value(record)
        return sums

    def payload_bytes(self, by: str = "kind") -> dict[str, int]:
        """Payload bytes summed by a field of `Collective` ("kind", "primitive", "phase",
        "group", ...); by "kind", every collective kind is present (0 when none ran)."""
        return self._sums(by, lambda record: record.payload_bytes)

    def ring_send_bytes(self, by: str = "kind") -> dict[str, int]:
        """Bytes this rank sends under ring algorithms, summed by a field of `Collective`."""
        return self._sums(by, lambda record: record.ring_send_bytes)

    def calls(self, by: str = "kind") -> dict[str, int]:
        """Number of collectives, counted by a field of `Collective`."""
        return self._sums(by, lambda record: 1)


_COUNTERS: list[CommCounter] = []


@contextlib.contextmanager
def count_communication() -> Iterator[CommCounter]:
    """Record every collective `graphpar.parallel` issues inside the block (on this rank; nested
    blocks each record them)."""
    counter = CommCounter()
    _COUNTERS.append(counter)
    try:
        yield counter
    finally:
        _COUNTERS.remove(counter)


def record_collective(kind: str, primitive: str, buffer: Tensor, group) -> None:
    """Called by every collective of `graphpar.parallel` before it runs: `buffer` is its payload
    (module docstring), `group` the process group or `SimulatedGroup` it runs on."""
    if not _COUNTERS:
        return
    dims = get_dims()
    name = "gp" if group is dims.gp_group else "dp" if group is dims.dp_group else "other"
    size = group.size if isinstance(group, SimulatedGroup) else dist.get_world_size(group)
    for counter in _COUNTERS:
        counter.add(kind, primitive, buffer, name, size)


# ----------------------------------------------------------------------------------------------
# Operations: matrix products (FLOPs), gathers and scatters
# ----------------------------------------------------------------------------------------------

_aten = torch.ops.aten

# Gathers: rows read by index. Elements moved = the output's.
_GATHERS = {
    _aten.index.Tensor,
    _aten.index_select.default,
    _aten.embedding.default,
    _aten.gather.default,
}
# Scatters: rows written by index. (op, argument holding the moved values, always accumulates)
_SCATTERS = {
    _aten.index_add.default: ("source", True),
    _aten.index_add_.default: ("source", True),
    _aten.index_put.default: ("values", None),
    _aten.index_put_.default: ("values", None),
    _aten._index_put_impl_.default: ("values", None),
    _aten.scatter_add.default: ("src", True),
    _aten.scatter_add_.default: ("src", True),
    _aten.scatter.src: ("src", False),
    _aten.scatter_.src: ("src", False),
    _aten.scatter.value: ("index", False),
    _aten.scatter_.value: ("index", False),
    _aten.embedding_dense_backward.default: ("grad_output", True),
}
# Operations that move no data of their own (views, metadata, factories of uninitialised memory):
# besides `func.is_view`, the copies that only stand for views, and `_unsafe_view` (the reshape
# of a fresh result, e.g. of a matrix product: a view that torch's schema does not mark as one).
_UNCOUNTED_TAGS = (torch.Tag.view_copy,)
_UNCOUNTED = (torch.ops.aten._unsafe_view,)


def _argument(func, args, kwargs, name: str):
    if name in kwargs:
        return kwargs[name]
    for position, schema_arg in enumerate(func._schema.arguments):
        if schema_arg.name == name:
            return args[position] if position < len(args) else schema_arg.default_value
    raise KeyError(name)


@dataclass
class OpCounter:
    """Work counted inside a `count_operations()` block (module docstring for definitions)."""

    matmul_flops: int = 0
    gather_elements: int = 0
    gather_bytes: int = 0
    scatter_elements: int = 0
    scatter_bytes: int = 0
    scatter_add_flops: int = 0
    other_elements: int = 0
    by_op: Counter = field(default_factory=Counter)  # elements moved per gather/scatter op
    matmul_by_op: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {
            "matmul_flops": self.matmul_flops,
            "gather_elements": self.gather_elements,
            "gather_bytes": self.gather_bytes,
            "scatter_elements": self.scatter_elements,
            "scatter_bytes": self.scatter_bytes,
            "scatter_add_flops": self.scatter_add_flops,
            "other_elements": self.other_elements,
            "index_ops": dict(self.by_op),
            "matmul_ops": dict(self.matmul_by_op),
        }


class _IndexOpMode(TorchDispatchMode):
    def __init__(self, counter: OpCounter):
        super().__init__()
        self.counter = counter

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        counter = self.counter
        name = str(func.overloadpacket.__name__)
        if func in _GATHERS:
            counter.gather_elements += out.numel()
            counter.gather_bytes += out.numel() * out.element_size()
            counter.by_op[name] += out.numel()
        elif func in _SCATTERS:
            which, accumulates = _SCATTERS[func]
            moved = _argument(func, args, kwargs, which)
            if accumulates is None:  # index_put: accumulate is an argument
                accumulates = bool(_argument(func, args, kwargs, "accumulate"))
            data = out[0] if isinstance(out, tuple) else out
            counter.scatter_elements += moved.numel()
            counter.scatter_bytes += moved.numel() * data.element_size()
            if accumulates:
                counter.scatter_add_flops += moved.numel()
            counter.by_op[name] += moved.numel()
        elif not (
            func.is_view
            or func.overloadpacket in _UNCOUNTED
            or func.overloadpacket in flop_registry  # matrix products: FlopCounterMode's
            or any(tag in func.tags for tag in _UNCOUNTED_TAGS)
        ):
            outputs, _ = tree_flatten(out)
            counter.other_elements += sum(t.numel() for t in outputs if isinstance(t, Tensor))
        return out


@contextlib.contextmanager
def count_operations() -> Iterator[OpCounter]:
    """Count the work of every aten operation run inside the block (forward and backward, any
    device including meta): matrix-product FLOPs by torch's `FlopCounterMode`, gathers and
    scatters in elements and bytes, accumulating scatters in FLOPs (module docstring)."""
    counter = OpCounter()
    flops = FlopCounterMode(display=False)
    with flops, _IndexOpMode(counter):
        yield counter
    counter.matmul_flops = int(flops.get_total_flops())
    counter.matmul_by_op = {
        str(op.__name__): int(n) for op, n in flops.get_flop_counts().get("Global", {}).items()
    }
