"""DimeNet++ (Gasteiger et al. 2020), energy-centric, periodic, with graph parallelism.

Blocks and parameter names are PyG's `torch_geometric.nn.models.dimenet.DimeNetPlusPlus`, so
`model.load_state_dict(pyg.state_dict())` works. OCP/fairchem's `dimenetplusplus` uses the same
blocks and names except a bias in each output block's up-projection (`output_up_bias=True`) and
angles measured on detached positions (`detach_angles=True`); `load_fairchem_state_dict` loads
its weights (`graphpar.convert` converts its checkpoints). Differences from PyG/OCP:

* the graph comes from the batch (`edge_index`, `cell_offsets`, and `idx_kj`/`idx_ji` when
  present, else built: `graphpar.data.graph.triplet_fields`); edge vectors include the periodic
  image shift `cell_offsets @ cell` and positions are not detached (unless `detach_angles`);
* the angular basis is evaluated from cos(alpha) = <v_kj, v_ji> / (|v_kj| |v_ji|) instead of
  atan2 (see `graphpar.models.basis`), so collinear triplets have finite forces;
* forces = -dE/dpos by autograd (`create_graph` while training);
* graph parallelism (docs/architecture.md section 5), the identity for G = 1: each rank of the
  graph-parallel group owns a contiguous slice of the edges balanced by triplet count
  (`partition_edges`) and the triplets whose output edge j->i it owns; the down-projected `x_kj`
  is all-gathered for the triplets' input edges; edge-to-atom sums are local scatters followed
  by an all-reduce; the per-atom output MLPs are replicated work, their parameters wrapped in
  `scale_replicated`. Every communication is marked `# Graph parallel:`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn import Embedding, Linear

from graphpar.data.graph import edge_vectors, triplet_fields
from graphpar.models.basis import BesselBasisLayer, SphericalBasisLayer
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
from graphpar.parallel import (
    copy_to_partitioned,
    gather_for_partitioned,
    get_dims,
    reduce_partial,
    scale_replicated,
    share_edges,
)

__all__ = [
    "DimeNetPlusPlus",
    "EmbeddingBlock",
    "InteractionPPBlock",
    "OutputPPBlock",
    "ResidualLayer",
    "fairchem_to_graphpar_name",
    "glorot_orthogonal",
    "load_fairchem_state_dict",
]


def glorot_orthogonal(tensor: Tensor, scale: float) -> None:
    """PyG's/DimeNet's initialiser: a random orthogonal matrix rescaled to variance
    scale / (fan_in + fan_out). A no-op on the meta device (parameter counting)."""
    if tensor.is_meta:
        return
    with torch.no_grad():
        nn.init.orthogonal_(tensor)
        tensor.mul_((scale / ((tensor.size(-2) + tensor.size(-1)) * tensor.var())).sqrt())


def _replicated_linear(lin: Linear, x: Tensor) -> Tensor:
    """`lin(x)` as replicated work: the same on every rank of the graph-parallel group, so the
    parameters' gradients are scaled by 1/G here (`scale_replicated`, see `sync_gradients`)."""
    bias = None if lin.bias is None else scale_replicated(lin.bias)
    return F.linear(x, scale_replicated(lin.weight), bias)


class EmbeddingBlock(nn.Module):
    """Initial edge embedding m_ji = act(W [h_i, h_j, act(W_rbf e_RBF(d_ji))])."""

    def __init__(self, num_radial: int, hidden_channels: int, act: Callable[[Tensor], Tensor]):
        super().__init__()
        self.act = act
        self.emb = Embedding(95, hidden_channels)
        self.lin_rbf = Linear(num_radial, hidden_channels)
        self.lin = Linear(3 * hidden_channels, hidden_channels)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if not self.emb.weight.is_meta:
            with torch.no_grad():
                self.emb.weight.uniform_(-(3**0.5), 3**0.5)
        self.lin_rbf.reset_parameters()
        self.lin.reset_parameters()

    def forward(self, x: Tensor, rbf: Tensor, i: Tensor, j: Tensor) -> Tensor:
        # Only the rows of this rank's edges are read: partitioned work, no gradient scaling.
        x = self.emb(x)
        rbf = self.act(self.lin_rbf(rbf))
        return self.act(self.lin(torch.cat([x[i], x[j], rbf], dim=-1)))


class ResidualLayer(nn.Module):
    def __init__(self, hidden_channels: int, act: Callable[[Tensor], Tensor]):
        super().__init__()
        self.act = act
        self.lin1 = Linear(hidden_channels, hidden_channels)
        self.lin2 = Linear(hidden_channels, hidden_channels)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for lin in (self.lin1, self.lin2):
            glorot_orthogonal(lin.weight, scale=2.0)
            nn.init.zeros_(lin.bias)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.act(self.lin2(self.act(self.lin1(x))))


@dataclass(frozen=True)
class ChunkedBasis:
    """The angular basis of a rank's triplets, left unevaluated for the memory-lean triplet path
    (`DimeNetPlusPlus.triplet_chunk`): each chunk evaluates its triplets' rows."""

    layer: SphericalBasisLayer
    radial: Tensor  # [E, num_spherical, num_radial]: every edge (`SphericalBasisLayer.radial`)
    cos_angle: Tensor  # [T_r]: cosine of each of this rank's triplets
    chunks: list[TripletChunk]  # this rank's output edges with their triplets


class InteractionPPBlock(nn.Module):
    """DimeNet++ interaction: message update of every edge j->i from the triplets k->j->i."""

    def __init__(
        self,
        hidden_channels: int,
        int_emb_size: int,
        basis_emb_size: int,
        num_spherical: int,
        num_radial: int,
        num_before_skip: int,
        num_after_skip: int,
        act: Callable[[Tensor], Tensor],
    ):
        super().__init__()
        self.act = act
        self.lin_rbf1 = Linear(num_radial, basis_emb_size, bias=False)
        self.lin_rbf2 = Linear(basis_emb_size, hidden_channels, bias=False)
        self.lin_sbf1 = Linear(num_spherical * num_radial, basis_emb_size, bias=False)
        self.lin_sbf2 = Linear(basis_emb_size, int_emb_size, bias=False)
        self.lin_kj = Linear(hidden_channels, hidden_channels)
        self.lin_ji = Linear(hidden_channels, hidden_channels)
        self.lin_down = Linear(hidden_channels, int_emb_size, bias=False)
        self.lin_up = Linear(int_emb_size, hidden_channels, bias=False)
        self.layers_before_skip = nn.ModuleList(
            [ResidualLayer(hidden_channels, act) for _ in range(num_before_skip)]
        )
        self.lin = Linear(hidden_channels, hidden_channels)
        self.layers_after_skip = nn.ModuleList(
            [ResidualLayer(hidden_channels, act) for _ in range(num_after_skip)]
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for lin in (self.lin_rbf1, self.lin_rbf2, self.lin_sbf1, self.lin_sbf2):
            glorot_orthogonal(lin.weight, scale=2.0)
        for lin in (self.lin_kj, self.lin_ji):
            glorot_orthogonal(lin.weight, scale=2.0)
            nn.init.zeros_(lin.bias)
        glorot_orthogonal(self.lin_down.weight, scale=2.0)
        glorot_orthogonal(self.lin_up.weight, scale=2.0)
        for layer in self.layers_before_skip:
            layer.reset_parameters()
        glorot_orthogonal(self.lin.weight, scale=2.0)
        nn.init.zeros_(self.lin.bias)
        for layer in self.layers_after_skip:
            layer.reset_parameters()

    def forward(
        self,
        x: Tensor,
        rbf: Tensor,
        sbf: Tensor | ChunkedBasis,
        idx_kj: Tensor,
        idx_ji: Tensor,
        edge_sizes: Sequence[int] | None = None,
    ) -> Tensor:
        """x, rbf: this rank's edges; sbf, idx_ji (local edge ids): its triplets; idx_kj: global
        edge ids, rows of the gathered x_kj. `edge_sizes`: edges per rank (None: serial).
        `sbf` as a `ChunkedBasis`: the memory-lean triplet path (`blocks.chunked`)."""
        x_ji = self.act(self.lin_ji(x))
        x_kj = self.act(self.lin_kj(x))
        x_kj = x_kj * self.lin_rbf2(self.lin_rbf1(rbf))
        x_kj = self.act(self.lin_down(x_kj))
        if edge_sizes is not None:
            # Graph parallel: all-gather of the down-projected input-edge features (the narrowest
            # tensor on the triplet path); backward reduce-scatters into each owner's slice.
            x_kj = gather_for_partitioned(x_kj, edge_sizes)
        weights = (self.lin_sbf1.weight, self.lin_sbf2.weight)
        if isinstance(sbf, ChunkedBasis):
            # Triplets chunk by chunk, recomputed in backward: no [triplets x width] tensor kept.
            chunk_messages = partial(self._chunk_messages, sbf.layer, idx_kj, idx_ji)
            args = (x_kj, sbf.radial, sbf.cos_angle, *weights)
            x_kj = chunked(chunk_messages, sbf.chunks, *args)
        else:
            x_kj = self.messages(x_kj, sbf, idx_kj, idx_ji, x.size(0), *weights)
        x_kj = self.act(self.lin_up(x_kj))

        h = x_ji + x_kj
        for layer in self.layers_before_skip:
            h = layer(h)
        h = self.act(self.lin(h)) + x
        for layer in self.layers_after_skip:
            h = layer(h)
        return h

    @staticmethod
    def messages(
        x_kj: Tensor,
        sbf: Tensor,
        idx_kj: Tensor,
        idx_ji: Tensor,
        num_edges: int,
        w_sbf1: Tensor,
        w_sbf2: Tensor,
    ) -> Tensor:
        """Sum over the triplets k->j->i of x_kj[k->j] * W_sbf2 W_sbf1 a_SBF(kji), into each
        output edge j->i of `num_edges`: [num_edges, int_emb_size]."""
        sbf = F.linear(F.linear(sbf, w_sbf1), w_sbf2)
        return scatter_sum(x_kj[idx_kj] * sbf, idx_ji, num_edges)

    def _chunk_messages(
        self,
        layer: SphericalBasisLayer,
        idx_kj: Tensor,
        idx_ji: Tensor,
        chunk: TripletChunk,
        x_kj: Tensor,
        radial: Tensor,
        cos_angle: Tensor,
        w_sbf1: Tensor,
        w_sbf2: Tensor,
    ) -> Tensor:
        """`messages` into the output edges of one chunk, its basis evaluated here."""
        kj, ji = idx_kj[chunk.triplets], idx_ji[chunk.triplets] - chunk.edges.start
        sbf = layer.angular(radial, cos_angle[chunk.triplets], kj)
        return self.messages(x_kj, sbf, kj, ji, chunk.num_edges, w_sbf1, w_sbf2)


class OutputPPBlock(nn.Module):
    """Per-atom output: sum of W_rbf e_RBF * m_ji over edges into i, then an MLP."""

    def __init__(
        self,
        num_radial: int,
        hidden_channels: int,
        out_emb_channels: int,
        out_channels: int,
        num_layers: int,
        act: Callable[[Tensor], Tensor],
        output_initializer: str = "zeros",
        up_bias: bool = False,
    ):
        if output_initializer not in {"zeros", "glorot_orthogonal"}:
            raise ValueError(f"unknown output_initializer {output_initializer!r}")
        super().__init__()
        self.act = act
        self.output_initializer = output_initializer
        self.lin_rbf = Linear(num_radial, hidden_channels, bias=False)
        self.lin_up = Linear(hidden_channels, out_emb_channels, bias=up_bias)
        self.lins = nn.ModuleList(
            [Linear(out_emb_channels, out_emb_channels) for _ in range(num_layers)]
        )
        self.lin = Linear(out_emb_channels, out_channels, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        glorot_orthogonal(self.lin_rbf.weight, scale=2.0)
        glorot_orthogonal(self.lin_up.weight, scale=2.0)
        if self.lin_up.bias is not None:
            nn.init.zeros_(self.lin_up.bias)
        for lin in self.lins:
            glorot_orthogonal(lin.weight, scale=2.0)
            nn.init.zeros_(lin.bias)
        if self.output_initializer == "zeros":
            nn.init.zeros_(self.lin.weight)
        else:
            glorot_orthogonal(self.lin.weight, scale=2.0)

    def forward(self, x: Tensor, rbf: Tensor, i: Tensor, num_nodes: int) -> Tensor:
        """x, rbf, i: this rank's edges; returns [num_nodes, out_channels] on every rank."""
        x = self.lin_rbf(rbf) * x
        # Graph parallel: local scatter of this rank's edges, then all-reduce of the partial sums.
        x = reduce_partial(scatter_sum(x, i, num_nodes))
        # Replicated per-atom work from here: parameter gradients scaled by 1/G.
        x = _replicated_linear(self.lin_up, x)
        for lin in self.lins:
            x = self.act(_replicated_linear(lin, x))
        return _replicated_linear(self.lin, x)


class DimeNetPlusPlus(nn.Module):
    """DimeNet++ for energies and forces of (periodic) structures.

    `model(batch) -> {"energy": [B], "forces": [N, 3]}` (energy [B, out_channels] if
    out_channels > 1; forces only with `regress_forces`). The batch is a `graphpar.data` batch
    (`pos`, `atomic_numbers`, `cell` [B,3,3], `natoms`, `batch`, `edge_index`, `cell_offsets`,
    optionally `idx_kj`/`idx_ji`). Energy per structure = sum of its atoms' outputs.

    Hyperparameters (default, source). PyG = `torch_geometric.nn.models.DimeNetPlusPlus`,
    OCP = fairchem `ocpmodels/models/dimenet_plus_plus.py` and its S2EF configs [DPPCODE, CFG-DPP]:

    * hidden_channels (192, OCP dpp.yml): edge embedding size.
    * out_channels (1, OCP): outputs per atom (energy).
    * num_blocks (3, OCP dpp.yml): interaction blocks.
    * int_emb_size (64, OCP/PyG QM9 setting): triplet embedding size after `lin_down`.
    * basis_emb_size (8, OCP/PyG): basis embedding size.
    * out_emb_channels (192, OCP dpp.yml): output MLP width.
    * num_spherical (7, OCP/PyG): angular orders l.
    * num_radial (6, OCP/PyG): radial functions.
    * cutoff (6.0 A, OCP S2EF; PyG's default is 5.0).
    * envelope_exponent (5, OCP/PyG).
    * num_before_skip (1, OCP/PyG), num_after_skip (2, OCP/PyG): residual layers.
    * num_output_layers (3, OCP/PyG): layers of each output MLP.
    * act ("swish" = SiLU, OCP/PyG).
    * output_initializer ("zeros", PyG; OCP initialises the last output layer to zeros too).
    * regress_forces (True, OCP): forces = -dE/dpos.
    * output_up_bias (False, PyG; OCP: True): a bias in each output block's up-projection
      `lin_up`, which OCP's checkpoints hold.
    * detach_angles (False): compatibility with OCP's DimeNet++, which measures the triplet angles
      on detached positions: the same energies, but forces = -dE/dpos without the derivatives
      through the angles (what OCP's published DimeNet++ models were trained and scored with).
      Leave it off to train: forces are then the full gradient.

    Attribute `activation_checkpointing` (False; the training config's key of that name sets
    it): keep only each interaction block's inputs and recompute its activations in backward
    (`graphpar.models.blocks.recomputed`). The same results; the triplet-level tensors of a
    block live only while that block is (re)computed. Training differentiates the forces
    (double backward), whose graph holds the recomputed activations until the parameter
    gradients are taken, so DimeNet++ saves less than GemNet-dT (direct forces).

    Attribute `triplet_chunk` (None; the training config's key of that name sets it): the
    memory-lean triplet path. Each interaction block computes its triplet messages in chunks of
    this rank's output edges holding at most this many triplets each, evaluates the angular
    basis of a chunk's triplets there, and keeps none of it: backward recomputes each chunk,
    the force's double backward included (`graphpar.models.blocks.chunked`). No
    [triplets x width] tensor outlives its chunk; the same results. None: the plain path.
    """

    # Its triplets: `graphpar.data.graph.TRIPLET_FIELDS["dimenetpp"]`.
    triplet_family = "dimenetpp"

    def __init__(
        self,
        hidden_channels: int = 192,
        out_channels: int = 1,
        num_blocks: int = 3,
        int_emb_size: int = 64,
        basis_emb_size: int = 8,
        out_emb_channels: int = 192,
        num_spherical: int = 7,
        num_radial: int = 6,
        cutoff: float = 6.0,
        envelope_exponent: int = 5,
        num_before_skip: int = 1,
        num_after_skip: int = 2,
        num_output_layers: int = 3,
        act: str = "swish",
        output_initializer: str = "zeros",
        regress_forces: bool = True,
        output_up_bias: bool = False,
        detach_angles: bool = False,
    ):
        super().__init__()
        if num_spherical < 2:
            raise ValueError("num_spherical must be > 1")
        if act not in {"swish", "silu"}:
            raise ValueError(f"unsupported activation {act!r}")
        act_fn = F.silu
        self.cutoff = cutoff
        self.num_blocks = num_blocks
        self.out_channels = out_channels
        self.regress_forces = regress_forces
        self.detach_angles = detach_angles
        # Recompute each interaction block's activations in backward (an attribute, not a
        # hyperparameter: the training config's `activation_checkpointing` sets it).
        self.activation_checkpointing = False
        # The memory-lean triplet path's chunk size, in triplets (None: plain path; an
        # attribute, set by the training config's `triplet_chunk`).
        self.triplet_chunk: int | None = None

        self.rbf = BesselBasisLayer(num_radial, cutoff, envelope_exponent)
        self.sbf = SphericalBasisLayer(num_spherical, num_radial, cutoff, envelope_exponent)
        self.emb = EmbeddingBlock(num_radial, hidden_channels, act_fn)
        self.output_blocks = nn.ModuleList(
            [
                OutputPPBlock(
                    num_radial,
                    hidden_channels,
                    out_emb_channels,
                    out_channels,
                    num_output_layers,
                    act_fn,
                    output_initializer,
                    output_up_bias,
                )
                for _ in range(num_blocks + 1)
            ]
        )
        self.interaction_blocks = nn.ModuleList(
            [
                InteractionPPBlock(
                    hidden_channels,
                    int_emb_size,
                    basis_emb_size,
                    num_spherical,
                    num_radial,
                    num_before_skip,
                    num_after_skip,
                    act_fn,
                )
                for _ in range(num_blocks)
            ]
        )

    def reset_parameters(self) -> None:
        self.rbf.reset_parameters()
        self.emb.reset_parameters()
        for block in self.output_blocks:
            block.reset_parameters()
        for block in self.interaction_blocks:
            block.reset_parameters()

    def forward(self, batch) -> dict[str, Tensor]:
        grad_enabled = torch.is_grad_enabled()
        pos = batch.pos
        if self.regress_forces and not pos.requires_grad:
            pos = pos.detach().requires_grad_(True)
        with torch.set_grad_enabled(grad_enabled or self.regress_forces):
            energy = self.energy(batch, pos)
            out = {"energy": energy}
            if self.regress_forces:
                # Training differentiates the force loss: keep the graph of the gradient.
                create_graph = self.training and grad_enabled
                (grad,) = torch.autograd.grad(energy.sum(), pos, create_graph=create_graph)
                out["forces"] = -grad
        if not grad_enabled:
            out = {key: value.detach() for key, value in out.items()}
        return out

    def energy(self, batch, pos: Tensor) -> Tensor:
        """Energies [B] (or [B, out_channels]) of the batch at positions `pos` [N, 3]."""
        z = batch.atomic_numbers.long()
        num_nodes = pos.size(0)
        natoms = batch.natoms.reshape(-1)
        structure = atom_structure(batch)
        edge_index = batch.edge_index
        cell_offsets = batch.cell_offsets
        idx_kj, idx_ji = triplet_fields(batch, self.triplet_family)
        num_edges = edge_index.size(1)

        dims = get_dims()
        share = share_edges(idx_kj, idx_ji, num_edges, dims.gp_size, dims.gp_rank)
        edges, edge_sizes = share.edges, share.edge_sizes
        t_kj, t_ji, t_ji_local = share.input_edge, share.output_edge, share.output_edge_local
        # Graph parallel: replicated positions enter partitioned work (backward: all-reduce
        # of this rank's partial position gradients).
        pos = copy_to_partitioned(pos)

        # Geometry of every edge (cheap, parameter-free; triplets read other ranks' edges).
        j, i = edge_index
        vec = edge_vectors(pos, edge_index, cell_offsets, batch.cell, structure)
        dist = vec.norm(dim=-1)
        # Angle between v_kj and v_ji through its cosine (PyG/OCP: atan2(|v x w|, <v, w>), whose
        # gradient is undefined for collinear triplets). `detach_angles` (OCP's DimeNet++): the
        # same values, no gradient through them. Geometry is replicated on every rank, so under
        # graph parallelism this only drops the angles' share of each rank's partial gradient.
        side = vec.detach() if self.detach_angles else vec
        length = dist.detach() if self.detach_angles else dist
        cos_angle = (side[t_kj] * side[t_ji]).sum(-1) / (length[t_kj] * length[t_ji])

        rbf = self.rbf(dist[edges])
        i_local, j_local = i[edges], j[edges]
        if self.triplet_chunk is None:
            sbf = self.sbf(dist, cos_angle, t_kj)
        else:
            chunks = triplet_chunks(t_ji_local, i_local.numel(), self.triplet_chunk)
            sbf = ChunkedBasis(self.sbf, self.sbf.radial(dist), cos_angle, chunks)

        x = self.emb(z, rbf, i_local, j_local)
        energy_atoms = self.output_blocks[0](x, rbf, i_local, num_nodes)
        for interaction, output in zip(
            self.interaction_blocks, self.output_blocks[1:], strict=True
        ):
            # Graph parallel: with activation checkpointing, the block's all-gather runs again
            # when backward recomputes it (models.blocks.recomputed).
            x = recomputed(
                interaction,
                x,
                rbf,
                sbf,
                t_kj,
                t_ji_local,
                edge_sizes,
                enabled=self.activation_checkpointing,
            )
            energy_atoms = energy_atoms + output(x, rbf, i_local, num_nodes)

        energy = scatter_sum(energy_atoms, structure, natoms.numel())
        return energy.squeeze(-1) if self.out_channels == 1 else energy


# ----------------------------------------------------------------------------------------------
# Loading fairchem checkpoints
# ----------------------------------------------------------------------------------------------

# fairchem `dimenetplusplus` state_dict name -> ours, as (pattern, replacement) rules tried in
# order (the shape of `graphpar.models.gemnet.FAIRCHEM_NAME_MAP`): the blocks carry the same names
# (both follow PyG), so every name maps to itself; a name of another model is refused.
FAIRCHEM_NAME_MAP: tuple[tuple[str, str | None], ...] = (
    (r"^(rbf\.freq)$", r"\1"),
    (r"^(emb\..*)$", r"\1"),
    (r"^(output_blocks\.\d+\..*)$", r"\1"),
    (r"^(interaction_blocks\.\d+\..*)$", r"\1"),
)


def fairchem_to_graphpar_name(name: str) -> str | None:
    """Our state_dict name of fairchem's `name` (KeyError: not a DimeNet++ parameter)."""
    return renamed(name, FAIRCHEM_NAME_MAP)


def load_fairchem_state_dict(
    model: DimeNetPlusPlus, state_dict: Mapping[str, Tensor]
) -> DimeNetPlusPlus:
    """Load fairchem `dimenetplusplus` weights into `model` (built with `output_up_bias=True`),
    strictly. `state_dict`: fairchem names, any "module." prefixes stripped. Raises ValueError
    for a name that is not DimeNet++'s or a tensor of the wrong shape, and for missing ones."""
    ours: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        try:
            name = fairchem_to_graphpar_name(unwrapped(key))
        except KeyError:
            raise ValueError(f"{key} is not a parameter of fairchem's DimeNet++") from None
        if name is not None:
            ours[name] = torch.as_tensor(value)
    expected = model.state_dict()
    for key, value in ours.items():
        if key in expected and tuple(value.shape) != tuple(expected[key].shape):
            raise ValueError(
                f"{key}: shape {tuple(value.shape)}, expected {tuple(expected[key].shape)}"
            )
    missing = sorted(set(expected) - set(ours))
    unknown = sorted(set(ours) - set(expected))
    if missing or unknown:
        raise ValueError(f"DimeNet++ weights: missing {missing}, unexpected {unknown}")
    model.load_state_dict(ours, strict=True)
    return model
