"""What one training step communicates and computes on each rank, predicted from shapes alone.

`predict_step(model, batch, gp_size)` runs the step of every rank r of a graph-parallel group of
G on the meta device (tensors with shapes and no data, so even a GemNet-XL step on an OC20 batch
costs no memory) in shape-only mode (`graphpar.parallel.groups.simulate_groups`:
the collectives are recorded, nothing is sent). Each rank partitions the real batch's edges and
triplets exactly as in a run (`partition.share_edges` on the batch's index values, kept beside
the meta tensors by `graphpar.parallel.meta`), so its records are the ones a real run of the
same layout issues:

    from graphpar.parallel.predict import predict_step
    ranks = predict_step("gemnet-dt", batch, gp_size=4)
    ranks[1].communication.payload_bytes()   # bytes per collective kind, rank 1
    ranks[1].operations.matmul_flops         # FLOPs of its matrix products

One step = what `graphpar.training.step.train_step` runs between zeroing the gradients and the
optimiser: forward (energy, forces: DimeNet++ and GemNet-T by autograd with `create_graph`,
GemNet-dT direct), the loss (energy MAE + force L2-MAE on free atoms, with the trainer's three
data-parallel sums), backward (through the force gradient where there is one) and
`sync_gradients`. The optimiser, clipping and EMA (element-wise work on the parameters, no
communication) are not part of it.

Counted per rank (`RankStep`): the collectives with their payload (`counting.CommCounter`, the
same counter a real run uses, so prediction and measurement are compared record by record in
tests/test_counting.py), the work (`counting.OpCounter`: matrix-product FLOPs, gathers and
scatters separately), the rank's edges, triplets and atoms, and the bytes of the activations
autograd keeps from the forward pass (and DimeNet++'s force gradient) for backward, each storage
once, by the kind of their rows (`ROWS`: this rank's triplets, its edges, all edges, atoms,
other). GemNet's triplet tensors use a padded [edges, most triplets of one edge, ...] layout,
so its triplet-level activations count as edge rows; DimeNet++'s are triplet rows. That
figure is what a memory model needs per edge and per triplet, not a peak: transient
tensors and the allocator are not in it.

Limits: autocast (the config's `amp`) is not applied on the meta device, so the prediction is
for one `dtype` throughout; under bfloat16 autocast the gathered features travel in bfloat16 and
the partial sums in float32 (`models.blocks.scatter_sum`).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from graphpar.data.graph import TRIPLET_FIELDS, triplet_fields
from graphpar.models import build_model
from graphpar.parallel.comm import sync_gradients
from graphpar.parallel.counting import CommCounter, OpCounter, count_communication, count_operations
from graphpar.parallel.groups import simulate_groups
from graphpar.parallel.launch import dp_sum
from graphpar.parallel.meta import to_meta, values_of
from graphpar.parallel.partition import edge_costs, share_edges
from graphpar.training.normalization import Normalized

__all__ = ["RankStep", "meta_batch", "meta_model", "predict_step"]

# Index tensors of each family's triplets: (input edge, output edge) and the edges they index.
_TRIPLETS = {
    "dimenetpp": ("idx_kj", "idx_ji", "edge_index"),
    "gemnet": ("id3_ba", "id3_ca", "edge_index_sym"),
}


@dataclass
class RankStep:
    """One rank's step: its share of the batch, its collectives and its work."""

    gp_rank: int
    gp_size: int
    dp_size: int
    atoms: int  # replicated: every rank holds all of them
    edges: int  # this rank's edges (of the model's graph: GemNet's symmetric one)
    triplets: int  # this rank's triplets (those whose output edge it owns)
    communication: CommCounter
    operations: OpCounter | None  # None: not counted (predict_step's `operations`)
    # Bytes of the activations autograd keeps for backward, by what their rows are (`ROWS`).
    saved_bytes: dict[str, int]

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready summary (no per-call records)."""
        return {
            "gp_rank": self.gp_rank,
            "gp_size": self.gp_size,
            "dp_size": self.dp_size,
            "atoms": self.atoms,
            "edges": self.edges,
            "triplets": self.triplets,
            "payload_bytes": self.communication.payload_bytes(),
            "ring_send_bytes": self.communication.ring_send_bytes(),
            "calls": self.communication.calls(),
            "payload_bytes_by_primitive": self.communication.payload_bytes("primitive"),
            "payload_bytes_by_phase": self.communication.payload_bytes("phase"),
            "saved_bytes": dict(self.saved_bytes),
            **(self.operations.as_dict() if self.operations is not None else {}),
        }


def meta_model(
    model: str | nn.Module, overrides: Mapping[str, Any] | None = None, dtype=torch.float32
) -> nn.Module:
    """A model on the meta device: a registered configuration's name (`graphpar.models`) with
    `overrides`, or a copy of a module (no overrides then)."""
    if isinstance(model, str):
        with torch.device("meta"):
            built = build_model(model, **dict(overrides or {}))
    else:
        if overrides:
            raise ValueError("overrides apply to a configuration's name, not to a module")
        built = copy.deepcopy(model).to("meta")
    return built.to(dtype)


# The floating-point fields that `graphpar.training.step.to_device` casts to the run's dtype.
_CAST_FIELDS = ("pos", "cell", "energy", "forces", "energy_relaxed")


def meta_batch(batch, family: str, dtype: torch.dtype = torch.float32):
    """A shallow copy of a (CPU) batch with every tensor on the meta device, the triplet fields
    of `family` included (built on the CPU if the batch lacks them) and positions, cell and
    labels in `dtype` (as the trainer casts them); its integer tensors keep their values
    (`graphpar.parallel.meta`). `batch` itself is left as it is."""
    fields = dict(zip(TRIPLET_FIELDS[family], triplet_fields(batch, family), strict=True))
    out = copy.copy(batch)
    for key, value in fields.items():
        setattr(out, key, value)
    out = out.apply(to_meta)
    for key in _CAST_FIELDS:
        if key in out:
            out[key] = out[key].to(dtype)
    return out


# What the rows of a saved activation are (its first dimension): this rank's triplets, this
# rank's edges, all edges (gathered features, edge geometry), atoms, or anything else. A tensor
# whose first dimension matches two of these counts as the first in this order.
ROWS = ("triplets", "edges", "all_edges", "atoms", "other")


@contextlib.contextmanager
def _saved_activations(exclude: set[int], counts: dict[str, int]) -> Iterator[dict[str, int]]:
    """Bytes of the tensors autograd saves for backward inside the block, each storage once,
    by `ROWS` (`counts`: the rows of each kind); storages in `exclude` (parameters, buffers, the
    batch) are not activations."""
    tally = dict.fromkeys(ROWS, 0)
    kept = []  # the storages seen (kept alive, so that no address is reused while counting)
    seen: set[int] = set()

    def pack(tensor: Tensor) -> Tensor:
        storage = tensor.untyped_storage()
        key = storage._cdata
        if key not in exclude and key not in seen:
            seen.add(key)
            kept.append(storage)
            rows = tensor.shape[0] if tensor.dim() else -1
            kind = next((k for k in ROWS[:-1] if counts[k] == rows), "other")
            tally[kind] += storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        yield tally


def _loss(out: Mapping[str, Tensor], batch, model: Normalized, num_graphs: int, free_ids):
    """`graphpar.training.step.loss_terms` (S2EF) with unit coefficients: the same collectives
    (three data-parallel sums) and the same work. Free atoms are selected by their ids (known
    from the real batch) instead of a boolean mask, whose result size is data; a batch without
    labels is given zeros of their shapes."""
    std = model.energy_std.to(out["energy"])
    num_systems = dp_sum(torch.tensor(float(num_graphs), device=std.device))
    energy = getattr(batch, "energy", None)
    energy = torch.zeros_like(out["energy"]) if energy is None else energy
    loss = ((out["energy"] - energy) / std).abs().sum() / num_systems
    if "forces" in out:
        num_free = dp_sum(torch.ones(free_ids.shape, device=std.device).sum().to(std))
        forces = getattr(batch, "forces", None)
        forces = torch.zeros_like(out["forces"]) if forces is None else forces
        force_error = ((out["forces"][free_ids] - forces[free_ids]) / std).norm(dim=-1)
        loss = loss + force_error.sum() / num_free.clamp(min=1)
    dp_sum(loss.detach())  # the global loss the trainer checks and logs
    return loss


def predict_step(
    model: str | nn.Module,
    batch,
    gp_size: int,
    *,
    overrides: Mapping[str, Any] | None = None,
    dp_size: int = 1,
    dtype: torch.dtype = torch.float32,
    training: bool = True,
    activation_checkpointing: bool = False,
    ranks: Iterable[int] | None = None,
    operations: bool = True,
    partition: str = "triplets",
) -> list[RankStep]:
    """Predict, from shapes alone, the collectives and the work of each rank of a graph-parallel
    group of `gp_size` (G) ranks (in a G x `dp_size` layout) for one step on `batch`.

    Args:
        model: a registered configuration (`graphpar.models.MODELS`, e.g. "gemnet-xl") built
            with `overrides`, or a module (copied to the meta device).
        batch: a collated batch on the CPU (`graphpar.data.dataset.collate`); its triplet
            fields are built if it lacks them. Every data-parallel row is assumed to hold a
            batch of this shape. Its labels (energy, forces) enter the loss as in training
            (only their shapes matter); zeros of their shapes stand in for missing ones.
        gp_size, dp_size: G and D.
        dtype: the parameters' and positions' dtype (the config's `dtype`).
        training: one training step (module docstring); False: one inference pass (energy and
            forces, DimeNet++'s force gradient without `create_graph`; no loss, no backward of
            the loss, no gradient synchronisation).
        activation_checkpointing: the training config's key: each interaction block is
            recomputed (with its collectives) during backward.
        ranks: the graph-parallel ranks to predict (default all G).
        operations: count the work too (about half the time of a prediction on the meta
            device); False leaves `RankStep.operations` None.
        partition: what an edge costs when the edges are split over the G ranks
            (`partition.edge_costs`): "triplets" as training does, or "edges", fairchem's
            equal edge counts, to compare the two balances.

    Returns one `RankStep` per rank asked for, in order: `communication.records` are exactly the
    collectives a real run of the same step issues on that rank, and `operations` its matrix
    products, gathers and scatters exactly as `count_operations` counts them in a real run
    (tests/test_counting.py checks both against gloo); `saved_bytes` the activations kept for
    backward.

    Takes about a second per rank for the OC20 models, whatever the batch size (the meta device
    computes shapes only; counting the work doubles the time).
    """
    normalized = Normalized(meta_model(model, overrides, dtype)).to("meta")
    normalized.model.activation_checkpointing = activation_checkpointing
    normalized.train(training)
    family = normalized.model.triplet_family
    batch_meta = meta_batch(batch, family, dtype)
    input_key, output_key, edge_key = _TRIPLETS[family]
    input_edge = values_of(getattr(batch_meta, input_key))
    output_edge = values_of(getattr(batch_meta, output_key))
    num_edges = getattr(batch_meta, edge_key).size(1)
    num_atoms = int(batch.pos.size(0))
    num_graphs = int(batch.natoms.numel())
    free = getattr(batch, "free", None)
    free_ids = torch.arange(num_atoms) if free is None else torch.nonzero(free).reshape(-1)
    free_ids = to_meta(free_ids)

    not_activations = {
        t.untyped_storage()._cdata
        for t in [*normalized.parameters(), *normalized.buffers()]
        + [value for _, value in batch_meta if isinstance(value, Tensor)]
    }
    results = []
    with edge_costs(partition):
        for gp_rank in range(gp_size) if ranks is None else ranks:
            share = share_edges(input_edge, output_edge, num_edges, gp_size, gp_rank)
            for p in normalized.parameters():
                p.grad = None
            counts = {
                "triplets": int(share.output_edge.numel()),
                "edges": share.edges.stop - share.edges.start,
                "all_edges": num_edges,
                "atoms": num_atoms,
            }
            with (
                simulate_groups(gp_size, gp_rank, dp_size),
                count_communication() as communication,
                count_operations() if operations else contextlib.nullcontext() as work,
            ):
                with _saved_activations(not_activations, counts) as saved:
                    if training:
                        out = normalized(batch_meta)
                        loss = _loss(out, batch_meta, normalized, num_graphs, free_ids)
                    else:
                        with torch.no_grad():
                            normalized(batch_meta)
                if training:
                    (loss * dp_size).backward()
                    sync_gradients(normalized)
            results.append(
                RankStep(
                    gp_rank=gp_rank,
                    gp_size=gp_size,
                    dp_size=dp_size,
                    atoms=num_atoms,
                    edges=share.edges.stop - share.edges.start,
                    triplets=counts["triplets"],
                    communication=communication,
                    operations=work,
                    saved_bytes=saved,
                )
            )
    return results
