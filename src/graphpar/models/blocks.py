"""Pieces both models share."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable
from torch.utils.checkpoint import checkpoint

from graphpar.parallel.meta import values_of


def scatter_sum(src: Tensor, index: Tensor, dim_size: int) -> Tensor:
    """Rows of `src` summed into `dim_size` rows by `index` (edges -> atoms -> structures).
    Half-precision rows (bfloat16 or float16 under autocast) are summed in float32: a sum of many
    edges or triplets in 8 or 11 bits of mantissa loses the small terms."""
    dtype = torch.promote_types(src.dtype, torch.float32) if src.is_floating_point() else src.dtype
    return src.new_zeros((dim_size, *src.shape[1:]), dtype=dtype).index_add(0, index, src.to(dtype))


def recomputed(block: Callable, *args, enabled: bool):
    """`block(*args)`; with `enabled` (and autograd recording), its activations are not kept but
    recomputed in backward (`torch.utils.checkpoint`, non-reentrant: `torch.autograd.grad`
    with `create_graph`, hence the training of gradient forces, works through it). Only the
    block's inputs stay in memory; the block runs its forward once more per backward through
    it, with the autocast state of the first run.

    Graph parallel: collectives inside `block` run again during backward. Every rank of the
    group records the same graph (the same operations on its own slices), so every rank
    recomputes the same blocks in the same order, and the collectives meet."""
    if enabled and torch.is_grad_enabled():
        return checkpoint(block, *args, use_reentrant=False)
    return block(*args)


@dataclass(frozen=True)
class TripletChunk:
    """A contiguous range of a rank's output edges and the triplets whose output edge lies in
    it: one piece of the memory-lean triplet path (`chunked`)."""

    edges: slice  # rows of this rank's edges (output edges j->i, c->a)
    triplets: slice | Tensor  # this rank's triplets of those edges (a slice when sorted)
    width: int  # most triplets of one of its edges (GemNet's padded layout: its Kmax)

    @property
    def num_edges(self) -> int:
        return self.edges.stop - self.edges.start


def triplet_chunks(output_edge: Tensor, num_edges: int, size: int) -> list[TripletChunk]:
    """This rank's `num_edges` output edges cut into consecutive ranges of at most `size`
    triplets each (`output_edge` [T_r]: local output edge of each triplet); an edge with more
    triplets than `size` makes a chunk of its own. The chunks cover every edge, in order (one
    empty chunk when there are none). Triplets sorted by output edge (as `graphpar.data.graph`
    builds them) give slices; others are sorted here. Meta tensors use the values they keep
    (`graphpar.parallel.meta`)."""
    if size < 1:
        raise ValueError(f"triplet chunk size must be >= 1, got {size}")
    values = values_of(output_edge) if output_edge.is_meta else output_edge.detach().cpu()
    count = torch.bincount(values, minlength=num_edges)
    end = torch.cumsum(count, 0)
    order = None
    if values.numel() > 1 and bool((values[1:] < values[:-1]).any()):
        order = torch.argsort(output_edge, stable=True)
    chunks, start = [], 0
    while start < num_edges or not chunks:
        first = int(end[start - 1]) if start > 0 else 0
        stop = int(torch.searchsorted(end, first + size, right=True)) if num_edges else 0
        stop = min(max(stop, start + 1), num_edges)
        last = int(end[stop - 1]) if stop > 0 else 0
        triplets = slice(first, last) if order is None else order[first:last]
        width = int(count[start:stop].max()) if stop > start else 0
        chunks.append(TripletChunk(slice(start, stop), triplets, width))
        start = stop
    return chunks


def chunked(fn: Callable, chunks: Sequence[TripletChunk], *inputs: Tensor) -> Tensor:
    """`torch.cat([fn(chunk, *inputs) for chunk in chunks])`, the memory-lean triplet path:
    `fn` maps the floating-point `inputs` (edge-level tensors, per-triplet scalars, weights;
    everything differentiable that `fn` reads, parameters included, must be among them) to the
    rows `chunk.edges` of its output, and nothing it computes is kept: its backward recomputes
    it chunk by chunk, so only one chunk's triplet-level activations are alive at a time.

    Up to second order: the gradient taken with `create_graph` (DimeNet++'s and GemNet-T's
    forces in training) is itself a chunked, recomputed node, whose backward recomputes each
    chunk once more and takes its double backward there. (`recomputed`, torch's checkpoint,
    keeps the recomputed activations in the graph of such a gradient until the parameters'
    gradients are taken, i.e. all of them at once.) The same operations on the same values as
    `fn` on all rows at once, summed in chunks: equal to rounding.

    The recomputation runs under the autocast state of the forward pass. Graph parallel: `fn`
    must not communicate (chunks are a rank's own; ranks may have different numbers)."""
    device_type = inputs[0].device.type
    autocast = (
        device_type,
        torch.get_autocast_dtype(device_type),
        torch.is_autocast_enabled(device_type),
    )
    return _Chunked.apply(fn, tuple(chunks), autocast, *inputs)


def _run(fn: Callable, chunk: TripletChunk, autocast: tuple, inputs: Sequence[Tensor]) -> Tensor:
    device_type, dtype, enabled = autocast
    with torch.autocast(device_type, dtype=dtype, enabled=enabled):
        return fn(chunk, *inputs)


def _leaves(inputs: Sequence[Tensor], needed: Sequence[bool]) -> list[Tensor]:
    return [x.detach().requires_grad_(need) for x, need in zip(inputs, needed, strict=True)]


def _added(total: Tensor | None, part: Tensor | None) -> Tensor | None:
    if part is None:
        return total
    return part if total is None else total + part


class _Chunked(torch.autograd.Function):
    """Forward of `chunked`, no activations kept; backward: `_ChunkedGradient`."""

    @staticmethod
    def forward(ctx, fn, chunks, autocast, *inputs):
        ctx.fn, ctx.chunks, ctx.autocast = fn, chunks, autocast
        ctx.save_for_backward(*inputs)
        return torch.cat([_run(fn, chunk, autocast, inputs) for chunk in chunks])

    @staticmethod
    def backward(ctx, grad):
        needed = ctx.needs_input_grad[3:]
        # With create_graph, this node records its own backward (the second order).
        grads = _ChunkedGradient.apply(
            ctx.fn, ctx.chunks, ctx.autocast, needed, grad, *ctx.saved_tensors
        )
        grads = iter((grads,) if isinstance(grads, Tensor) else grads)
        return (None, None, None, *(next(grads) if need else None for need in needed))


class _ChunkedGradient(torch.autograd.Function):
    """The gradients of `chunked`'s inputs (those `needed`) for the output gradient `grad`,
    chunk by chunk; its backward recomputes each chunk and takes its double backward."""

    @staticmethod
    def forward(ctx, fn, chunks, autocast, needed, grad, *inputs):
        ctx.fn, ctx.chunks, ctx.autocast, ctx.needed = fn, chunks, autocast, needed
        ctx.save_for_backward(grad, *inputs)
        totals: list[Tensor | None] = [None] * len(inputs)
        for chunk in chunks:
            with torch.enable_grad():
                leaves = _leaves(inputs, needed)
                out = _run(fn, chunk, autocast, leaves)
                wanted = [x for x in leaves if x.requires_grad]
                parts = iter(
                    torch.autograd.grad(out, wanted, grad[chunk.edges], allow_unused=True)
                    if out.requires_grad
                    else [None] * len(wanted)
                )
            for k, need in enumerate(needed):
                if need:
                    totals[k] = _added(totals[k], next(parts))
        return tuple(
            torch.zeros_like(x) if total is None else total
            for x, total, need in zip(inputs, totals, needed, strict=True)
            if need
        )

    @staticmethod
    @once_differentiable
    def backward(ctx, *grad_grads):
        grad, *inputs = ctx.saved_tensors
        needed = ctx.needed
        second = ctx.needs_input_grad[5:]  # the inputs' gradients asked for now
        grad_needed = ctx.needs_input_grad[4]
        d_grad = torch.zeros_like(grad) if grad_needed else None
        totals: list[Tensor | None] = [None] * len(inputs)
        for chunk in ctx.chunks:
            with torch.enable_grad():
                leaves = _leaves(inputs, [a or b for a, b in zip(needed, second, strict=True)])
                grad_chunk = grad[chunk.edges].detach().requires_grad_(grad_needed)
                out = _run(ctx.fn, chunk, ctx.autocast, leaves)
                if not out.requires_grad:
                    continue
                wanted = [x for x, need in zip(leaves, needed, strict=True) if need]
                firsts = torch.autograd.grad(
                    out, wanted, grad_chunk, create_graph=True, allow_unused=True
                )
                inner = [
                    (first * grad_grad).sum()
                    for first, grad_grad in zip(firsts, grad_grads, strict=True)
                    if first is not None and grad_grad is not None and first.requires_grad
                ]
                if not inner:
                    continue
                targets = [grad_chunk] if grad_needed else []
                targets += [x for x, need in zip(leaves, second, strict=True) if need]
                parts = iter(torch.autograd.grad(sum(inner), targets, allow_unused=True))
            if grad_needed:
                part = next(parts)
                if part is not None:
                    d_grad[chunk.edges] += part
            for k, need in enumerate(second):
                if need:
                    totals[k] = _added(totals[k], next(parts))
        return (None, None, None, None, d_grad, *totals)


def atom_structure(batch) -> Tensor:
    """Structure of each atom [N]: `batch.batch` when the batch carries it, else from `natoms`."""
    structure = getattr(batch, "batch", None)
    if structure is not None:
        return structure
    natoms = batch.natoms.reshape(-1)
    return torch.repeat_interleave(torch.arange(natoms.numel(), device=natoms.device), natoms)


def renamed(name: str, rules: tuple[tuple[str, str | None], ...]) -> str | None:
    """`name` renamed by the first of `rules` ((pattern, replacement); None drops the name)
    whose pattern matches (KeyError: none does). Loading fairchem state dicts: each model's
    `FAIRCHEM_NAME_MAP`."""
    for pattern, replacement in rules:
        if re.match(pattern, name):
            return None if replacement is None else re.sub(pattern, replacement, name)
    raise KeyError(name)


def unwrapped(name: str) -> str:
    """A state-dict name without its `module.` prefixes (DataParallel, DistributedDataParallel
    and fairchem's trainer wrappers each add one)."""
    while name.startswith("module."):
        name = name[len("module.") :]
    return name
