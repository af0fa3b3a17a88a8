"""GemNet-T / GemNet-dT (Gasteiger, Becker, Guennemann 2021) as fairchem's `gemnet_t`.

`GemNetT(**fairchem_constructor_args)(batch) -> {"energy": [B], "forces": [N, 3]}`. With
`direct_forces=True` (GemNet-dT, the default) forces come from the output blocks as per-edge
scalars F_e times the unit vector V_e of the edge, summed at its target; otherwise
forces = -dE/dpos by autograd.

Conventions (ours = fairchem's): `edge_index[0]` = source s (neighbour), `[1]` = target t
(centre); V_st = (pos[t] - pos[s] - cell_offsets @ cell) / d_st, from the source image to the
target. GemNet works on the symmetrised graph (`graphpar.data.graph.symmetric_graph`: the same
edge set as fairchem's `reorder_symmetric_edges`, sorted by target) with `id_swap` (reverse edge)
and triplets b->a, c->a sharing the target a (`gemnet_triplets`); cos phi_cab = V_ca . V_ba.
The batch may carry them (`edge_index_sym`, `cell_offsets_sym`, `id_swap`, `id3_ba`, `id3_ca`);
otherwise they are built from `edge_index`, `cell_offsets` (`graphpar.data.graph.triplet_fields`).

Blocks (names as fairchem's modules, so that `load_fairchem_state_dict` is a short name map):
every `Dense` is a bias-free linear layer followed by ScaledSiLU = SiLU / 0.6 (none in the basis
projections and the last output layers); a `ResidualLayer` is (x + Dense(Dense(x))) / sqrt(2);
`ScaleFactor`s are fitted constants (buffers `scale_factor`, each with its fairchem name).

Graph parallelism (docs/architecture.md section 5), the identity for G = 1, as in DimeNet++: each
rank of the graph-parallel group owns a contiguous slice of the symmetric graph's edges balanced by
GemNet triplet count (`partition_edges` on `id3_ca`) and the triplets whose output edge c->a it
owns. Edge state m is partitioned; atom state h, the energy and the forces are replicated. The
down-projected x_ba is all-gathered for the triplets' input edges b->a, and the bilinear output for
the reverse edges (`id_swap`); edge-to-atom sums are local scatters followed by an all-reduce; h
enters edge work through `copy_to_partitioned`; per-atom MLPs (and the atom embedding) are
replicated work whose parameters go through `scale_replicated`. Every communication is
marked `# Graph parallel:`.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from graphpar.data.graph import edge_vectors, triplet_fields
from graphpar.models.blocks import (
    TripletChunk,
    atom_structure,
    chunked,
    recomputed,
    renamed,
    scatter_sum,
    triplet_chunks,
    unwrapped,
)
from graphpar.models.gemnet_basis import CircularBasis, RadialBasis, real_sph_harm_l0
from graphpar.parallel import (
    copy_to_partitioned,
    gather_for_partitioned,
    get_dims,
    reduce_partial,
    scale_replicated,
    share_edges,
)
from graphpar.parallel.meta import to_meta, values_of

__all__ = [
    "FAIRCHEM_NAME_MAP",
    "PAPER_UNUSED_SCALE_FACTOR",
    "AtomUpdateBlock",
    "Dense",
    "EdgeEmbedding",
    "GemNetT",
    "InteractionBlock",
    "OutputBlock",
    "ResidualLayer",
    "ScaleFactor",
    "TripletInteraction",
    "fairchem_to_graphpar_name",
    "load_fairchem_state_dict",
    "load_scale_factors",
    "read_scale_factors",
    "resolve_scale_factors",
]

_INV_SQRT_2 = 1 / math.sqrt(2.0)


def he_orthogonal_(tensor: Tensor) -> Tensor:
    """fairchem's HeOrthogonal init: a (semi-)orthogonal matrix per leading index, standardised,
    with variance 1 / fan_in. A no-op on the meta device."""
    if tensor.is_meta:
        return tensor
    with torch.no_grad():
        nn.init.orthogonal_(tensor)
        fan_in = tensor.shape[-1] if tensor.dim() == 2 else tensor.shape[:-1].numel()
        axis = list(range(tensor.dim() - 1)) if tensor.dim() > 2 else [1]
        mean = tensor.mean(dim=axis, keepdim=True)
        var = tensor.var(dim=axis, keepdim=True, unbiased=False)
        tensor.sub_(mean).div_((var + 1e-6).sqrt()).mul_(math.sqrt(1 / fan_in))
    return tensor


def scaled_silu(x: Tensor) -> Tensor:
    """SiLU(x) / 0.6 (fairchem's ScaledSiLU)."""
    return F.silu(x) * (1 / 0.6)


class Dense(nn.Linear):
    """Bias-free linear layer, optionally followed by ScaledSiLU. `replicated`: the layer is
    replicated per-atom work under graph parallelism (its gradient is scaled by 1/G)."""

    def __init__(self, in_features: int, out_features: int, activation: bool = True):
        super().__init__(in_features, out_features, bias=False)
        self.activation = activation
        self.replicated = False

    def reset_parameters(self) -> None:
        he_orthogonal_(self.weight)

    def forward(self, x: Tensor) -> Tensor:
        weight = scale_replicated(self.weight) if self.replicated else self.weight
        x = F.linear(x, weight)
        return scaled_silu(x) if self.activation else x


def _mark_replicated(module: nn.Module) -> None:
    for layer in module.modules():
        if isinstance(layer, Dense):
            layer.replicated = True


class ScaleFactor(nn.Module):
    """Multiplies by a fitted constant (buffer `scale_factor`, 1 until loaded or fitted). `name`
    is its key in fairchem's scale files (e.g. "OutBlock_0_sum"). `ref`: the tensor whose
    variance the scaled output should keep (fairchem's `ref=`), read only by the fitting's
    forward hooks (`graphpar.fit_scale_factors`)."""

    def __init__(self, name: str):
        super().__init__()
        self.name = name
        self.register_buffer("scale_factor", torch.tensor(1.0))

    def forward(self, x: Tensor, ref: Tensor | None = None) -> Tensor:
        return x * self.scale_factor


class ResidualLayer(nn.Module):
    """(x + Dense(Dense(x))) / sqrt(2)."""

    def __init__(self, units: int, num_layers: int = 2):
        super().__init__()
        self.dense_mlp = nn.Sequential(*[Dense(units, units) for _ in range(num_layers)])

    def forward(self, x: Tensor) -> Tensor:
        return (x + self.dense_mlp(x)) * _INV_SQRT_2


def _mlp(units_in: int, units: int, num_residual: int) -> nn.ModuleList:
    return nn.ModuleList(
        [Dense(units_in, units)] + [ResidualLayer(units) for _ in range(num_residual)]
    )


class AtomEmbedding(nn.Embedding):
    """h_a = table[Z_a - 1], uniform in +-sqrt(3)."""

    def reset_parameters(self) -> None:
        if not self.weight.is_meta:
            with torch.no_grad():
                self.weight.uniform_(-math.sqrt(3), math.sqrt(3))

    def forward(self, z: Tensor) -> Tensor:
        # Replicated work (every rank embeds every atom): gradient scaled by 1/G.
        return F.embedding(z - 1, scale_replicated(self.weight))


class EdgeEmbedding(nn.Module):
    """m_st = Dense([h_s, h_t, m])."""

    def __init__(self, atom_features: int, edge_features: int, out_features: int):
        super().__init__()
        self.dense = Dense(2 * atom_features + edge_features, out_features)

    def forward(self, h: Tensor, m: Tensor, idx_s: Tensor, idx_t: Tensor) -> Tensor:
        return self.dense(torch.cat([h[idx_s], h[idx_t], m], dim=-1))


def ragged_index(id3_ca: Tensor, num_edges: int) -> tuple[Tensor, int]:
    """Position of each triplet among the triplets of its output edge c->a, and the largest
    number of triplets of one edge (Kmax): the slots of the zero-padded dense layout. A meta index
    (shape-only prediction, `graphpar.parallel.predict`) is computed from the values it keeps."""
    if id3_ca.is_meta:
        rank, kmax = ragged_index(values_of(id3_ca), num_edges)
        return to_meta(rank), kmax
    if id3_ca.numel() == 0:
        return id3_ca.clone(), 0
    count = torch.bincount(id3_ca, minlength=num_edges)
    start = torch.cumsum(count, 0) - count
    order = torch.argsort(id3_ca, stable=True)
    rank = torch.empty_like(id3_ca)
    rank[order] = torch.arange(id3_ca.numel(), device=id3_ca.device) - start[id3_ca[order]]
    return rank, int(count.max())


class CircularBasisProjection(nn.Module):
    """fairchem's EfficientInteractionDownProjection: weight [S, R, C] maps the radial part of
    edge c->a [E, R] to rbf_W1 [E, C, S]; Y_l0 of the triplets is packed into a zero-padded
    [E, S, Kmax] by output edge."""

    def __init__(self, num_spherical: int, num_radial: int, emb_size_cbf: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_spherical, num_radial, emb_size_cbf))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        he_orthogonal_(self.weight)

    def forward(
        self, rad: Tensor, sph: Tensor, id3_ca: Tensor, ragged: Tensor, kmax: int
    ) -> tuple[Tensor, Tensor]:
        sph_dense = padded(sph, id3_ca, ragged, rad.size(0), kmax)
        return self.radial(rad), sph_dense.transpose(1, 2)  # [E, C, S], [E, S, Kmax]

    def radial(self, rad: Tensor) -> Tensor:
        """rbf_W1 [E, C, S] of the edges' radial parts `rad` [E, R]."""
        return torch.matmul(rad, self.weight).permute(1, 2, 0)


def padded(rows: Tensor, id3_ca: Tensor, ragged: Tensor, num_edges: int, kmax: int) -> Tensor:
    """Per-triplet `rows` [T, F] in the zero-padded layout [num_edges, Kmax, F]: the triplet of
    output edge `id3_ca` at slot `ragged` (`ragged_index`)."""
    dense = rows.new_zeros(num_edges, kmax, rows.size(1))
    dense[id3_ca, ragged] = rows
    return dense


class BilinearTripletSum(nn.Module):
    """fairchem's EfficientInteractionBilinear: for each output edge e = c->a,
    x_e[o] = sum_{k,c,l} W[k, c, o] rbf_W1[e, c, l] sum_{b} Y_l0(phi_cab) x_ba[k], with the
    sum over triplets done as a padded matmul."""

    def __init__(self, emb_size_trip: int, emb_size_cbf: int, emb_size_bilinear: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(emb_size_trip, emb_size_cbf, emb_size_bilinear))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        he_orthogonal_(self.weight)

    def forward(
        self, basis: tuple[Tensor, Tensor], x_ba: Tensor, id3_ca: Tensor, ragged: Tensor
    ) -> Tensor:
        rbf_w1, sph = basis  # [E, C, S], [E, S, Kmax]
        x_dense = padded(x_ba, id3_ca, ragged, rbf_w1.size(0), sph.size(2))  # [E, Kmax, K]
        return self.bilinear(rbf_w1, sph, x_dense, self.weight)

    @staticmethod
    def bilinear(rbf_w1: Tensor, sph: Tensor, x_dense: Tensor, weight: Tensor) -> Tensor:
        """The sum over triplets and bases in the padded layout: rbf_w1 [E, C, S], sph
        [E, S, Kmax], x_dense [E, Kmax, K], weight [K, C, O] -> [E, O]."""
        sum_k = torch.matmul(sph, x_dense)  # [E, S, K]
        rbf_sum_k = torch.matmul(rbf_w1, sum_k)  # [E, C, K]
        return torch.matmul(rbf_sum_k.permute(2, 0, 1), weight).sum(0)  # [E, O]

    def chunk(
        self,
        id3_ba: Tensor,
        id3_ca: Tensor,
        ragged: Tensor,
        num_spherical: int,
        chunk: TripletChunk,
        x_ba: Tensor,
        rbf_w1: Tensor,
        cos_cab: Tensor,
        weight: Tensor,
    ) -> Tensor:
        """`forward` for the output edges of one chunk (the memory-lean triplet path), with its
        triplets' Y_l0(cos phi_cab) and padded layout (Kmax of the chunk) made here. x_ba: the
        input edges' features (gathered), rbf_w1: this rank's edges, cos_cab: its triplets."""
        t = chunk.triplets
        ca, slot = id3_ca[t] - chunk.edges.start, ragged[t]
        sph = real_sph_harm_l0(cos_cab[t], num_spherical)
        sph = padded(sph, ca, slot, chunk.num_edges, chunk.width).transpose(1, 2)
        x_dense = padded(x_ba[id3_ba[t]], ca, slot, chunk.num_edges, chunk.width)
        return self.bilinear(rbf_w1[chunk.edges], sph, x_dense, weight)


@dataclass(frozen=True)
class ChunkedBasis:
    """The circular basis of a rank's triplets, left unevaluated for the memory-lean triplet path
    (`GemNetT.triplet_chunk`): each chunk evaluates and pads its triplets' rows."""

    rbf_w1: Tensor  # [E_r, C, S]: this rank's edges (`CircularBasisProjection.radial`)
    cos_cab: Tensor  # [T_r]: cosine of each of this rank's triplets
    num_spherical: int
    chunks: list[TripletChunk]  # this rank's output edges with their triplets


class TripletInteraction(nn.Module):
    """Message to each edge c->a from the triplets b->a, c->a (and to a->c via id_swap)."""

    def __init__(
        self,
        emb_size_edge: int,
        emb_size_trip: int,
        emb_size_bilinear: int,
        emb_size_rbf: int,
        emb_size_cbf: int,
        name: str,
    ):
        super().__init__()
        self.dense_ba = Dense(emb_size_edge, emb_size_edge)
        self.mlp_rbf = Dense(emb_size_rbf, emb_size_edge, activation=False)
        self.scale_rbf = ScaleFactor(name + "_had_rbf")
        self.mlp_cbf = BilinearTripletSum(emb_size_trip, emb_size_cbf, emb_size_bilinear)
        self.scale_cbf_sum = ScaleFactor(name + "_sum_cbf")
        self.down_projection = Dense(emb_size_edge, emb_size_trip)
        self.up_projection_ca = Dense(emb_size_bilinear, emb_size_edge)
        self.up_projection_ac = Dense(emb_size_bilinear, emb_size_edge)

    def forward(self, m, rbf3, cbf3, id_swap, id3_ba, id3_ca, ragged, edge_sizes=None):
        """m, rbf3, cbf3: this rank's edges; id3_ca, ragged (local edge ids): its triplets;
        id3_ba, id_swap: global edge ids. `edge_sizes`: edges per rank (None: serial). `cbf3`
        as a `ChunkedBasis`: the memory-lean triplet path (`blocks.chunked`)."""
        x_ba = self.dense_ba(m)
        x_ba = self.scale_rbf(x_ba * self.mlp_rbf(rbf3), ref=x_ba)
        x_ba = self.down_projection(x_ba)
        if edge_sizes is not None:
            # Graph parallel: all-gather of the down-projected input-edge features (the narrowest
            # tensor on the triplet path); backward reduce-scatters into each owner's slice.
            x_ba = gather_for_partitioned(x_ba, edge_sizes)
        if isinstance(cbf3, ChunkedBasis):
            # Triplets chunk by chunk, recomputed in backward: no [triplets x width] tensor
            # kept. (The scale factor's reference, x_ba per triplet, is not made: fit the
            # factors on the plain path.)
            chunk = partial(self.mlp_cbf.chunk, id3_ba, id3_ca, ragged, cbf3.num_spherical)
            args = (x_ba, cbf3.rbf_w1, cbf3.cos_cab, self.mlp_cbf.weight)
            x = self.scale_cbf_sum(chunked(chunk, cbf3.chunks, *args))
        else:
            x_ba = x_ba[id3_ba]  # per triplet
            x = self.mlp_cbf(cbf3, x_ba, id3_ca, ragged)
            x = self.scale_cbf_sum(x, ref=x_ba)
        x_ca = self.up_projection_ca(x)
        if edge_sizes is not None:
            # Graph parallel: all-gather of the bilinear output, read at the reverse edges.
            x = gather_for_partitioned(x, edge_sizes)
        x_ac = self.up_projection_ac(x[id_swap])  # the message of a->c goes to c->a
        return (x_ca + x_ac) * _INV_SQRT_2


class AtomUpdateBlock(nn.Module):
    """h_a' = MLP(scale * sum_{e into a} m_e * Dense(rbf_e))."""

    def __init__(
        self, emb_size_atom: int, emb_size_edge: int, emb_size_rbf: int, num_hidden: int, name: str
    ):
        super().__init__()
        self.dense_rbf = Dense(emb_size_rbf, emb_size_edge, activation=False)
        self.scale_sum = ScaleFactor(name + "_sum")
        self.layers = _mlp(emb_size_edge, emb_size_atom, num_hidden)
        _mark_replicated(self.layers)  # per-atom work, the same on every rank

    def aggregate(self, m: Tensor, rbf: Tensor, idx_t: Tensor, num_atoms: int) -> Tensor:
        x = scatter_sum(m * self.dense_rbf(rbf), idx_t, num_atoms)
        # Graph parallel: local scatter of this rank's edges, then all-reduce of the partial sums.
        return self.scale_sum(reduce_partial(x), ref=m)

    def forward(self, m: Tensor, rbf: Tensor, idx_t: Tensor, num_atoms: int) -> Tensor:
        x = self.aggregate(m, rbf, idx_t, num_atoms)
        for layer in self.layers:
            x = layer(x)
        return x


class OutputBlock(AtomUpdateBlock):
    """Per-atom energy (the atom-update path, then Dense to targets) and, for dT, per-edge force
    scalars (edge MLP * Dense(rbf), scaled, then Dense to targets)."""

    def __init__(
        self,
        emb_size_atom: int,
        emb_size_edge: int,
        emb_size_rbf: int,
        num_hidden: int,
        num_targets: int,
        direct_forces: bool,
        output_init: str,
        name: str,
    ):
        super().__init__(emb_size_atom, emb_size_edge, emb_size_rbf, num_hidden, name)
        self.direct_forces = direct_forces
        self.output_init = output_init
        self.out_energy = Dense(emb_size_atom, num_targets, activation=False)
        _mark_replicated(self.out_energy)
        if direct_forces:
            self.scale_rbf_F = ScaleFactor(name + "_had")
            self.seq_forces = _mlp(emb_size_edge, emb_size_edge, num_hidden)
            self.out_forces = Dense(emb_size_edge, num_targets, activation=False)
            self.dense_rbf_F = Dense(emb_size_rbf, emb_size_edge, activation=False)
        self.reset_output()

    def reset_output(self) -> None:
        heads = [self.out_energy] + ([self.out_forces] if self.direct_forces else [])
        for head in heads:
            if self.output_init.lower() == "zeros":
                if not head.weight.is_meta:
                    nn.init.zeros_(head.weight)
            elif self.output_init.lower() == "heorthogonal":
                he_orthogonal_(head.weight)
            else:
                raise ValueError(f"unknown output_init {self.output_init!r}")

    def forward(self, m: Tensor, rbf: Tensor, idx_t: Tensor, num_atoms: int):
        x_e = super().forward(m, rbf, idx_t, num_atoms)
        energy = self.out_energy(x_e)
        if not self.direct_forces:
            return energy, None
        x_f = m
        for layer in self.seq_forces:
            x_f = layer(x_f)
        x_f = self.scale_rbf_F(x_f * self.dense_rbf_F(rbf), ref=x_f)
        return energy, self.out_forces(x_f)


class InteractionBlock(nn.Module):
    """GemNet-T interaction (fairchem's InteractionBlockTripletsOnly): triplet message and skip,
    residual layers, atom update, and the edge update from [h_s, h_t, m]."""

    def __init__(
        self,
        emb_size_atom: int,
        emb_size_edge: int,
        emb_size_trip: int,
        emb_size_rbf: int,
        emb_size_cbf: int,
        emb_size_bil_trip: int,
        num_before_skip: int,
        num_after_skip: int,
        num_concat: int,
        num_atom: int,
        block_nr: int,
    ):
        super().__init__()
        self.dense_ca = Dense(emb_size_edge, emb_size_edge)
        self.trip_interaction = TripletInteraction(
            emb_size_edge,
            emb_size_trip,
            emb_size_bil_trip,
            emb_size_rbf,
            emb_size_cbf,
            name=f"TripInteraction_{block_nr}",
        )
        self.layers_before_skip = nn.ModuleList(
            [ResidualLayer(emb_size_edge) for _ in range(num_before_skip)]
        )
        self.layers_after_skip = nn.ModuleList(
            [ResidualLayer(emb_size_edge) for _ in range(num_after_skip)]
        )
        self.atom_update = AtomUpdateBlock(
            emb_size_atom, emb_size_edge, emb_size_rbf, num_atom, name=f"AtomUpdate_{block_nr}"
        )
        self.concat_layer = EdgeEmbedding(emb_size_atom, emb_size_edge, emb_size_edge)
        self.residual_m = nn.ModuleList([ResidualLayer(emb_size_edge) for _ in range(num_concat)])

    def forward(
        self,
        h,
        m,
        rbf3,
        cbf3,
        id_swap,
        id3_ba,
        id3_ca,
        ragged,
        rbf_h,
        idx_s,
        idx_t,
        edge_sizes=None,
    ):
        """h: replicated atom state; m and the rest: this rank's edges and triplets."""
        x = self.dense_ca(m)
        x3 = self.trip_interaction(m, rbf3, cbf3, id_swap, id3_ba, id3_ca, ragged, edge_sizes)
        x = (x + x3) * _INV_SQRT_2
        for layer in self.layers_before_skip:
            x = layer(x)
        m = (m + x) * _INV_SQRT_2
        for layer in self.layers_after_skip:
            m = layer(m)
        h = (h + self.atom_update(m, rbf_h, idx_t, h.size(0))) * _INV_SQRT_2
        # Graph parallel: replicated h enters this rank's edge work (backward: all-reduce).
        m2 = self.concat_layer(copy_to_partitioned(h), m, idx_s, idx_t)
        for layer in self.residual_m:
            m2 = layer(m2)
        return h, (m + m2) * _INV_SQRT_2


class GemNetT(nn.Module):
    """GemNet-T (triplets only) for energies and forces of (periodic) structures.

    Arguments follow fairchem's `GemNetT` (`model.json`'s `constructor_args` work as they are;
    `rbf`, `envelope`, `cbf` accept only the OC20 choices: gaussian, polynomial, spherical
    harmonics). Graph arguments (`max_neighbors`, `otf_graph`, `use_pbc`, ...) describe the input
    graph, which comes from the batch.

    Attribute `activation_checkpointing` (False; the training config's key of that name sets
    it): keep only each interaction block's inputs and recompute its activations, the triplet
    tensors among them, in backward (`graphpar.models.blocks.recomputed`). The same results.

    Attribute `triplet_chunk` (None; the training config's key of that name sets it): the
    memory-lean triplet path. Each triplet interaction computes its bilinear triplet sum in
    chunks of this rank's output edges holding at most this many triplets each (each chunk
    padded to its own Kmax), evaluates Y_l0 of a chunk's triplets there, and keeps none of it:
    backward recomputes each chunk, GemNet-T's force double backward included
    (`graphpar.models.blocks.chunked`). No [triplets x width] tensor outlives its chunk; the
    same results. ScaleFactor fitting reads a per-triplet reference the lean path does not
    make: fit on the plain path (None, the default).
    """

    # Its symmetric graph and triplets: `graphpar.data.graph.TRIPLET_FIELDS["gemnet"]`.
    triplet_family = "gemnet"

    def __init__(
        self,
        num_spherical: int = 7,
        num_radial: int = 128,
        num_blocks: int = 3,
        emb_size_atom: int = 512,
        emb_size_edge: int = 512,
        emb_size_trip: int = 64,
        emb_size_rbf: int = 16,
        emb_size_cbf: int = 16,
        emb_size_bil_trip: int = 64,
        num_before_skip: int = 1,
        num_after_skip: int = 2,
        num_concat: int = 1,
        num_atom: int = 3,
        regress_forces: bool = True,
        direct_forces: bool = True,
        cutoff: float = 6.0,
        max_neighbors: int = 50,
        rbf: Mapping | None = None,
        envelope: Mapping | None = None,
        cbf: Mapping | None = None,
        extensive: bool = True,
        otf_graph: bool = False,
        use_pbc: bool = True,
        use_pbc_single: bool = False,
        output_init: str = "HeOrthogonal",
        activation: str = "silu",
        num_elements: int = 83,
        num_targets: int = 1,
        scale_file: str | None = None,
    ):
        super().__init__()
        rbf = dict(rbf or {"name": "gaussian"})
        envelope = dict(envelope or {"name": "polynomial", "exponent": 5})
        cbf = dict(cbf or {"name": "spherical_harmonics"})
        if rbf.get("name") != "gaussian" or len(rbf) > 1:
            raise ValueError(f"only the gaussian radial basis is implemented, not {rbf}")
        if envelope.get("name") != "polynomial":
            raise ValueError(f"only the polynomial envelope is implemented, not {envelope}")
        if cbf.get("name") != "spherical_harmonics":
            raise ValueError(f"only spherical_harmonics cbf is implemented, not {cbf}")
        if activation.lower() not in {"silu", "swish"}:
            raise ValueError(f"unsupported activation {activation!r}")
        if scale_file is not None:
            raise ValueError(
                "scale_file: load the file with graphpar.models.gemnet.load_scale_factors (the "
                "training config's `scale_factors` key does) after building the model"
            )
        exponent = int(envelope.get("exponent", 5))
        self.num_blocks = num_blocks
        self.num_targets = num_targets
        self.regress_forces = regress_forces
        self.direct_forces = direct_forces
        self.extensive = extensive
        self.cutoff = cutoff
        self.max_neighbors = max_neighbors
        # Recompute each interaction block's activations in backward (an attribute, not a
        # hyperparameter: the training config's `activation_checkpointing` sets it).
        self.activation_checkpointing = False
        # The memory-lean triplet path's chunk size, in triplets (None: plain path; an
        # attribute, set by the training config's `triplet_chunk`).
        self.triplet_chunk: int | None = None

        self.radial_basis = RadialBasis(num_radial, cutoff, exponent)
        self.cbf_basis3 = CircularBasis(num_spherical, num_radial, cutoff, exponent)
        # Basis projections shared by all blocks.
        self.mlp_rbf3 = Dense(num_radial, emb_size_rbf, activation=False)
        self.mlp_cbf3 = CircularBasisProjection(num_spherical, num_radial, emb_size_cbf)
        self.mlp_rbf_h = Dense(num_radial, emb_size_rbf, activation=False)
        self.mlp_rbf_out = Dense(num_radial, emb_size_rbf, activation=False)

        self.atom_emb = AtomEmbedding(num_elements, emb_size_atom)
        self.edge_emb = EdgeEmbedding(emb_size_atom, num_radial, emb_size_edge)
        self.out_blocks = nn.ModuleList(
            [
                OutputBlock(
                    emb_size_atom,
                    emb_size_edge,
                    emb_size_rbf,
                    num_atom,
                    num_targets,
                    direct_forces,
                    output_init,
                    name=f"OutBlock_{i}",
                )
                for i in range(num_blocks + 1)
            ]
        )
        self.int_blocks = nn.ModuleList(
            [
                InteractionBlock(
                    emb_size_atom,
                    emb_size_edge,
                    emb_size_trip,
                    emb_size_rbf,
                    emb_size_cbf,
                    emb_size_bil_trip,
                    num_before_skip,
                    num_after_skip,
                    num_concat,
                    num_atom,
                    block_nr=i + 1,
                )
                for i in range(num_blocks)
            ]
        )

    def shared_parameters(self) -> list[tuple[str, nn.Parameter, int]]:
        """The basis projections every block shares, with their number of uses: (name,
        parameter, uses). fairchem's serial GemNet divides their gradients by the uses before
        each optimiser step (its `shared_parameters`; its GemNet-GP dropped this); the trainer
        does the same through `graphpar.models.scale_shared_gradients`."""
        uses = {
            "mlp_rbf3.weight": self.num_blocks,
            "mlp_cbf3.weight": self.num_blocks,
            "mlp_rbf_h.weight": self.num_blocks,
            "mlp_rbf_out.weight": self.num_blocks + 1,
        }
        params = dict(self.named_parameters())
        return [(name, params[name], count) for name, count in uses.items()]

    def scale_factors(self) -> dict[str, ScaleFactor]:
        """Every ScaleFactor by its buffer's state_dict name."""
        return {
            f"{name}.scale_factor": module
            for name, module in self.named_modules()
            if isinstance(module, ScaleFactor)
        }

    # ------------------------------------------------------------------------------------------

    def forward(self, batch) -> dict[str, Tensor]:
        grad_enabled = torch.is_grad_enabled()
        gradient_forces = self.regress_forces and not self.direct_forces
        pos = batch.pos
        if gradient_forces and not pos.requires_grad:
            pos = pos.detach().requires_grad_(True)
        with torch.set_grad_enabled(grad_enabled or gradient_forces):
            energy, forces = self.energy_and_forces(batch, pos)
            out = {"energy": energy}
            if gradient_forces:
                create_graph = self.training and grad_enabled
                (grad,) = torch.autograd.grad(energy.sum(), pos, create_graph=create_graph)
                forces = -grad
            if self.regress_forces:
                out["forces"] = forces
        if not grad_enabled:
            out = {key: value.detach() for key, value in out.items()}
        return out

    def energy_and_forces(self, batch, pos: Tensor) -> tuple[Tensor, Tensor | None]:
        """Energies [B] ([B, num_targets] if num_targets > 1) and direct forces [N, 3] (None
        unless direct_forces)."""
        z = batch.atomic_numbers.long()
        num_atoms = pos.size(0)
        natoms = batch.natoms.reshape(-1)
        structure = atom_structure(batch)
        graph = triplet_fields(batch, self.triplet_family)
        edge_index, cell_offsets, id_swap, id3_ba, id3_ca = graph
        num_edges = edge_index.size(1)

        dims = get_dims()
        share = share_edges(id3_ba, id3_ca, num_edges, dims.gp_size, dims.gp_rank)
        edges, edge_sizes = share.edges, share.edge_sizes
        t_ba, t_ca, t_ca_local = share.input_edge, share.output_edge, share.output_edge_local
        # Graph parallel: replicated positions enter partitioned work (backward: all-reduce
        # of this rank's partial position gradients).
        pos = copy_to_partitioned(pos)

        # Geometry of every edge (cheap, parameter-free; triplets read other ranks' edges):
        # V_st from the source image to the target, its length d_st.
        idx_s, idx_t = edge_index
        vec = edge_vectors(pos, edge_index, cell_offsets, batch.cell, structure)
        dist = vec.norm(dim=-1)
        unit = vec / dist.unsqueeze(-1)
        cos_cab = (unit[t_ca] * unit[t_ba]).sum(-1).clamp(-1, 1)

        # From here on, edge tensors hold this rank's edges only.
        idx_s, idx_t, id_swap = idx_s[edges], idx_t[edges], id_swap[edges]
        dist, unit = dist[edges], unit[edges]
        ragged, kmax = ragged_index(t_ca_local, dist.size(0))

        rbf = self.radial_basis(dist)
        h = self.atom_emb(z)
        # Graph parallel: replicated h enters this rank's edge work (backward: all-reduce).
        m = self.edge_emb(copy_to_partitioned(h), rbf, idx_s, idx_t)

        rbf3 = self.mlp_rbf3(rbf)
        if self.triplet_chunk is None:
            rad_cbf3, sph = self.cbf_basis3(dist, cos_cab)
            cbf3 = self.mlp_cbf3(rad_cbf3, sph, t_ca_local, ragged, kmax)
        else:
            rbf_w1 = self.mlp_cbf3.radial(self.cbf_basis3.radial_basis(dist))
            chunks = triplet_chunks(t_ca_local, dist.size(0), self.triplet_chunk)
            num_spherical = self.cbf_basis3.num_spherical
            cbf3 = ChunkedBasis(rbf_w1, cos_cab, num_spherical, chunks)
        rbf_h = self.mlp_rbf_h(rbf)
        rbf_out = self.mlp_rbf_out(rbf)

        energy_atoms, force_edges = self.out_blocks[0](m, rbf_out, idx_t, num_atoms)
        for interaction, output in zip(self.int_blocks, self.out_blocks[1:], strict=True):
            # Graph parallel: with activation checkpointing, the block's collectives run again
            # when backward recomputes it (models.blocks.recomputed).
            h, m = recomputed(
                interaction,
                h,
                m,
                rbf3,
                cbf3,
                id_swap,
                t_ba,
                t_ca_local,
                ragged,
                rbf_h,
                idx_s,
                idx_t,
                edge_sizes,
                enabled=self.activation_checkpointing,
            )
            e, f = output(m, rbf_out, idx_t, num_atoms)
            energy_atoms = energy_atoms + e
            if f is not None:
                force_edges = force_edges + f

        energy = scatter_sum(energy_atoms, structure, natoms.numel())
        if not self.extensive:
            energy = energy / natoms.unsqueeze(-1).to(energy.dtype)
        if self.num_targets == 1:
            energy = energy.squeeze(-1)
        forces = None
        if self.regress_forces and self.direct_forces:
            force_vec = force_edges.unsqueeze(-1) * unit.unsqueeze(1)  # [E, targets, 3]
            # Graph parallel: local scatter of this rank's edges, then all-reduce.
            forces = reduce_partial(scatter_sum(force_vec, idx_t, num_atoms))
            if self.num_targets == 1:
                forces = forces.squeeze(1)
        return energy, forces


# ----------------------------------------------------------------------------------------------
# Loading fairchem checkpoints
# ----------------------------------------------------------------------------------------------

# fairchem state_dict name -> ours, as (pattern, replacement) rules tried in order; None drops
# the entry (a duplicate name that `load_fairchem_state_dict` checks against its original).
FAIRCHEM_NAME_MAP: tuple[tuple[str, str | None], ...] = (
    (r"^out_blocks\.(\d+)\.seq_energy\.(.*)$", None),  # alias of out_blocks.N.layers.*
    (r"^atom_emb\.embeddings\.weight$", "atom_emb.weight"),
    (r"^(.*)\.linear\.weight$", r"\1.weight"),
    (r"^(.*)$", r"\1"),
)


def fairchem_to_graphpar_name(name: str) -> str | None:
    """Our state_dict name of fairchem's `name` (None: an alias we do not store)."""
    return renamed(name, FAIRCHEM_NAME_MAP)


def load_fairchem_state_dict(
    model: GemNetT,
    state_dict: Mapping[str, Tensor],
    scale_factors: Mapping[str, object] | None = None,
) -> GemNetT:
    """Load fairchem `gemnet_t` weights into `model`, strictly.

    `state_dict`: fairchem names (a checkpoint's "module." prefix is stripped). `scale_factors`:
    values of the ScaleFactors not in the state_dict (a checkpoint's `scale_dict`, or a scale
    file read by `read_scale_factors`), with the names and rules of `resolve_scale_factors`.
    Raises if a tensor or scale factor is missing, unknown, has the wrong shape, is given twice
    with different values, or if an alias (`seq_energy`) differs from its original.
    """
    state_dict = {
        (key[len("module.") :] if key.startswith("module.") else key): value
        for key, value in state_dict.items()
    }
    ours: dict[str, Tensor] = {}
    aliases: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        new = fairchem_to_graphpar_name(key)
        if new is None:
            aliases[key] = torch.as_tensor(value)
        else:
            ours[new] = torch.as_tensor(value)
    for key, value in aliases.items():
        original = fairchem_to_graphpar_name(key.replace(".seq_energy.", ".layers."))
        if original not in ours or not torch.equal(ours[original], value):
            raise ValueError(f"{key} is not an alias of {original}")

    factors = model.scale_factors()
    given = resolve_scale_factors(model, scale_factors or {}, provided=set(ours) & set(factors))
    for name, value in given.items():
        value = torch.as_tensor(value, dtype=torch.float64)
        if name in ours and not torch.equal(ours[name].double(), value):
            raise ValueError(f"scale factor {name} given twice with different values")
        ours[name] = value

    expected = model.state_dict()
    for key, value in ours.items():
        if key in expected and tuple(value.shape) != tuple(expected[key].shape):
            raise ValueError(
                f"{key}: shape {tuple(value.shape)}, expected {tuple(expected[key].shape)}"
            )
    model.load_state_dict(ours, strict=True)
    return model


# ----------------------------------------------------------------------------------------------
# Scale-factor files (fairchem's `scale_file`)
# ----------------------------------------------------------------------------------------------

# gemnet-xl.json (fairchem configs/s2ef/all/gp_gemnet/scaling_factors/, commit f1c77f61d203, the
# paper's code) names the interaction blocks' atom-update factors "IntBlock_{i}_sum", while the
# model code of that commit registers them as "AtomUpdate_{i}_sum"
# (ocpmodels/models/gemnet_gp/layers/interaction_block.py). Its loader looked each factor up by
# the model's name and left a factor it did not find at its initial value, 1.0 (AutomaticFit.
# load_maybe in ocpmodels/models/gemnet_gp/layers/scaling.py; read_value_json returns None), and
# never read the file's other keys. So the paper's GemNet-XL trained with AtomUpdate_{i}_sum = 1.0
# and the file's IntBlock_{i}_sum values unused. We do the same, explicitly: an
# "IntBlock_{i}_sum" key is accepted for a model with interaction block i, its value is ignored,
# and AtomUpdate_{i}_sum is set to 1.0 unless the file gives it too. (fairchem 1.x's
# load_scales_compat instead raises for the missing AtomUpdate_{i}_sum.)
PAPER_UNUSED_SCALE_FACTOR = re.compile(r"^IntBlock_(\d+)_sum$")
_METADATA_KEYS = ("comment",)


def read_scale_factors(path: str | os.PathLike) -> dict[str, object]:
    """A fairchem scale file as {name: value}: a JSON object of names and numbers, with an
    optional "comment" (any JSON value; dropped here). Raises for another layout."""
    path = Path(path)
    try:
        content = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"scale factor file {path}: {error}") from error
    if not isinstance(content, dict):
        raise ValueError(f"scale factor file {path}: not a JSON object of names and values")
    return {k: v for k, v in content.items() if k not in _METADATA_KEYS}


def _scale_value(key: str, value: object) -> float:
    if isinstance(value, Mapping):  # {"value": number}
        value = value.get("value")
    if isinstance(value, Tensor):
        value = value.item() if value.numel() == 1 else None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"scale factor {key!r}: {value!r} is not a number")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"scale factor {key!r}: {value!r} is not a finite number >= 0")
    # fairchem 1.x stores 0.0 for a factor it never fitted and then multiplies by nothing.
    return 1.0 if value == 0 else float(value)


def resolve_scale_factors(
    model: GemNetT,
    source: str | os.PathLike | Mapping[str, object],
    provided: set[str] | frozenset[str] = frozenset(),
) -> dict[str, float]:
    """The values of `source` (a scale file's path, or a mapping) by the model's state_dict
    names ("out_blocks.0.scale_sum.scale_factor"), checked; nothing is loaded.

    Keys: fairchem's factor names ("OutBlock_0_sum", the keys of the 2021 and 1.x scale files
    and of a 1.x checkpoint's `scale_dict`), module paths ("out_blocks.0.scale_sum", fairchem
    1.x's key for a factor without a name) or state_dict names, any "module." prefixes dropped;
    a "comment" key is metadata. Values: numbers, {"value": number} or one-element tensors; 0
    (fairchem 1.x: never fitted, used as 1) reads as 1.0. "IntBlock_{i}_sum" keys follow the
    paper's code (PAPER_UNUSED_SCALE_FACTOR): ignored, AtomUpdate_{i}_sum then 1.0 unless given
    (here or in `provided`).
    Raises KeyError for an unknown key or a model factor that neither `source` nor `provided`
    (names given elsewhere, e.g. in a checkpoint's state_dict) gives, ValueError for a key
    given twice with different values or a value that is not a finite number >= 0.
    """
    mapping = read_scale_factors(source) if not isinstance(source, Mapping) else source
    factors = model.scale_factors()
    names: dict[str, str] = {}
    for name, module in factors.items():
        names[name] = names[name.removesuffix(".scale_factor")] = names[module.name] = name
    values: dict[str, float] = {}
    unused: list[str] = []
    for key, value in mapping.items():
        if key in _METADATA_KEYS:
            continue
        bare = unwrapped(key)
        paper = PAPER_UNUSED_SCALE_FACTOR.match(bare)
        if paper and f"AtomUpdate_{paper.group(1)}_sum" in names:
            unused.append(f"AtomUpdate_{paper.group(1)}_sum")
            _scale_value(key, value)  # still a number
            continue
        if bare not in names:
            raise KeyError(f"unexpected scale factor {key!r}; known: {sorted(names)}")
        name, number = names[bare], _scale_value(key, value)
        if name in values and values[name] != number:
            raise ValueError(f"scale factor {name} given twice with different values")
        values[name] = number
    for atom_update in unused:
        if names[atom_update] not in provided:
            values.setdefault(names[atom_update], 1.0)
    missing = sorted(factors[n].name for n in set(factors) - set(values) - set(provided))
    if missing:
        raise KeyError(f"missing scale factors: {missing}")
    return values


def load_scale_factors(
    model: GemNetT, source: str | os.PathLike | Mapping[str, object]
) -> dict[str, float]:
    """Set every ScaleFactor of `model` from a fairchem scale file (its path) or a mapping,
    with the names and rules of `resolve_scale_factors` (every factor must be given: unknown or
    missing names raise). Returns the values set, by state_dict name."""
    values = resolve_scale_factors(model, source)
    factors = model.scale_factors()
    with torch.no_grad():
        for name, value in values.items():
            factors[name].scale_factor.fill_(value)
    return values
