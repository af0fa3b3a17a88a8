"""Multi-process side of tests/test_parallel.py: a toy model with DimeNet++'s communication
shape, and the per-rank scenarios that `torch.multiprocessing.spawn` runs (gloo, CPU).

The toy model, float64, reads exactly like a graph-parallel DimeNet++ interaction: replicated
positions and atom embeddings -> this rank's edges -> down-projection -> all-gather -> this
rank's triplets (input edges from any rank) -> its edges -> a local scatter into atoms ->
all-reduce -> a replicated per-atom MLP -> energy; forces = -dE/dpos by autograd. It also routes
a per-edge energy through `gather_for_replicated` and a per-atom update through `reduce_scatter`
/ `split` (GemNet's atom-update pattern), so that every primitive sits in a double backward.
With G = 1 every primitive is the identity and the same code is the serial model.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

from graphpar.data.graph import dimenet_triplets, radius_graph_batch
from graphpar.parallel import (
    copy_to_partitioned,
    gather_for_partitioned,
    gather_for_replicated,
    get_dims,
    init_groups,
    local_triplets,
    partition_atoms,
    partition_edges,
    reduce_partial,
    reduce_scatter,
    scale_replicated,
    split,
    sync_gradients,
)

FEATURES, DOWN, NUM_RBF, NUM_TYPES = 8, 4, 6, 5
CUTOFF = 3.0  # A


# ----------------------------------------------------------------------------------------------
# Toy model
# ----------------------------------------------------------------------------------------------


def make_batch(seed: int, natoms: tuple[int, ...] = (6, 5)) -> dict[str, Tensor]:
    """Random non-periodic structures (float64) with their radius graph, DimeNet++ triplets and
    random energy / force targets."""
    g = torch.Generator().manual_seed(seed)
    num_atoms = sum(natoms)
    pos = torch.rand(num_atoms, 3, generator=g, dtype=torch.float64) * 3.5
    cell = torch.eye(3, dtype=torch.float64).expand(len(natoms), 3, 3) * 10.0
    pbc = torch.zeros(len(natoms), 3, dtype=torch.bool)
    natoms_t = torch.tensor(natoms)
    edge_index, cell_offsets, _ = radius_graph_batch(pos, cell, pbc, natoms_t, CUTOFF)
    idx_kj, idx_ji = dimenet_triplets(edge_index, cell_offsets, num_atoms)
    return {
        "pos": pos,
        "atomic_numbers": torch.randint(NUM_TYPES, (num_atoms,), generator=g),
        "batch": torch.repeat_interleave(torch.arange(len(natoms)), natoms_t),
        "edge_index": edge_index,
        "idx_kj": idx_kj,
        "idx_ji": idx_ji,
        "energy": torch.randn(len(natoms), generator=g, dtype=torch.float64),
        "forces": torch.randn(num_atoms, 3, generator=g, dtype=torch.float64),
    }


class ToyModel(nn.Module):
    """Random float64 parameters, identical in every process for the same seed."""

    def __init__(self, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)

        def param(*shape: int) -> nn.Parameter:
            return nn.Parameter(torch.randn(*shape, generator=g, dtype=torch.float64) * 0.5)

        f, d = FEATURES, DOWN
        self.embedding = param(NUM_TYPES, f)  # replicated work
        self.w_source, self.w_target, self.w_rbf = param(f, f), param(f, f), param(NUM_RBF, f)
        self.w_down, self.w_angle, self.w_up = param(f, d), param(3, d), param(d, f)
        self.w_edge_energy = param(f)  # partitioned (edges), summed by replicated work
        self.w_atom_local = param(f, f)  # partitioned (atoms)
        self.w_hidden, self.w_out = param(f, f), param(f)  # replicated work


def energy_and_forces(
    model: ToyModel, batch: dict[str, Tensor], gather_edges=gather_for_partitioned
) -> tuple[Tensor, Tensor]:
    """Energies [B] and forces [N, 3] (= -dE/dpos, differentiable) on the current groups.

    `gather_edges` is the gather of the down-projected edge features; passing
    `gather_for_replicated` reproduces fairchem's wrong adjoint."""
    dims = get_dims()
    rank = dims.gp_rank
    edge_index, idx_kj, idx_ji = batch["edge_index"], batch["idx_kj"], batch["idx_ji"]
    num_atoms, num_edges = batch["pos"].shape[0], edge_index.shape[1]
    edges = partition_edges(idx_ji, num_edges, dims.gp_size)
    atoms = partition_atoms(num_atoms, dims.gp_size)
    triplets = local_triplets(edges, rank, idx_kj, idx_ji)
    source, target = edge_index[:, edges.slice(rank)]

    pos = batch["pos"].clone().requires_grad_(True)
    h = torch.tanh(scale_replicated(model.embedding)[batch["atomic_numbers"]])

    # Graph parallel: replicated positions and embeddings enter this rank's edges and triplets.
    pos_p, h_p = copy_to_partitioned(pos), copy_to_partitioned(h)
    vec = pos_p[target] - pos_p[source]
    centers = torch.linspace(0.5, CUTOFF, NUM_RBF, dtype=pos.dtype)
    rbf = torch.exp(-((vec.norm(dim=1, keepdim=True) - centers) ** 2))
    m = torch.tanh(h_p[source] @ model.w_source + h_p[target] @ model.w_target + rbf @ model.w_rbf)

    # Graph parallel: triplets read down-projected input edges owned by any rank.
    x_kj = gather_edges(m @ model.w_down, edges.sizes)
    vec_kj = (pos_p[edge_index[1]] - pos_p[edge_index[0]])[triplets.input_edge]
    vec_ji = vec[triplets.output_edge]
    cos = (vec_kj * vec_ji).sum(1) / (vec_kj.norm(dim=1) * vec_ji.norm(dim=1))
    angle = torch.stack([torch.ones_like(cos), cos, cos * cos], dim=1) @ model.w_angle
    aggregate = torch.zeros(m.shape[0], DOWN, dtype=pos.dtype)
    aggregate = aggregate.index_add(0, triplets.output_edge, x_kj[triplets.input_edge] * angle)
    m = m + torch.tanh(aggregate @ model.w_up)

    # Graph parallel: every rank sums all edges' energies into atoms (replicated work).
    e_edge = gather_for_replicated(m @ model.w_edge_energy, edges.sizes)
    e_atom = torch.zeros(num_atoms, dtype=pos.dtype).index_add(0, edge_index[1], e_edge)

    # Local scatter of this rank's messages into all atoms: partial sums.
    partial = torch.zeros(num_atoms, FEATURES, dtype=pos.dtype).index_add(0, target, m)
    # Graph parallel: this rank's atoms only (partitioned update, gathered back) ...
    y_local = reduce_scatter(partial, atoms.sizes) + split(h, atoms.sizes)
    u_local = torch.tanh(y_local @ model.w_atom_local).sum(1)
    e_atom = e_atom + gather_for_replicated(u_local, atoms.sizes)
    # Graph parallel: ... and all atoms for the replicated MLP.
    y = reduce_partial(partial) + h
    hidden = torch.tanh(y @ scale_replicated(model.w_hidden))
    e_atom = e_atom + hidden @ scale_replicated(model.w_out)

    energy = torch.zeros(int(batch["batch"].max()) + 1, dtype=pos.dtype)
    energy = energy.index_add(0, batch["batch"], e_atom)
    (grad,) = torch.autograd.grad(energy.sum(), pos, create_graph=True)
    return energy, -grad


def loss_fn(energy: Tensor, forces: Tensor, batch: dict[str, Tensor]) -> Tensor:
    """Energy MAE + mean squared force error: trains through the double backward."""
    energy_term = (energy - batch["energy"]).abs().mean()
    return energy_term + ((forces - batch["forces"]) ** 2).sum(1).mean()


def train_step(model: ToyModel, batch: dict[str, Tensor], gather_edges=gather_for_partitioned):
    """One forward/backward with synchronised gradients: (energy, forces, {name: grad})."""
    model.zero_grad(set_to_none=True)
    energy, forces = energy_and_forces(model, batch, gather_edges)
    loss_fn(energy, forces, batch).backward()
    sync_gradients(model)
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters()}
    return energy.detach(), forces.detach(), grads


# ----------------------------------------------------------------------------------------------
# Scenarios (one call per rank)
# ----------------------------------------------------------------------------------------------


def scenario_toy(gp_size: int) -> dict:
    """W = G: the toy model, with the right gather and with fairchem's."""
    init_groups(gp_size)
    model, batch = ToyModel(), make_batch(seed=1)
    right = train_step(model, batch)
    wrong = train_step(model, batch, gather_edges=gather_for_replicated)
    return {"right": right, "wrong": wrong}


def scenario_toy_dp(gp_size: int) -> tuple:
    """W = D x G: data-parallel row d trains on batch seed 100 + d."""
    dims = init_groups(gp_size)
    return train_step(ToyModel(), make_batch(seed=100 + dims.dp_rank))


def scenario_primitives(gp_size: int) -> str:
    """Every primitive's forward and backward against its definition, with random per-rank
    inputs and upstream gradients, on unequal and empty slices; then on a G = 2 x D = 2 layout;
    then gradcheck / gradgradcheck of the autograd functions on one-member groups."""
    world = dist.get_world_size()
    try:
        init_groups(3)
    except ValueError as error:
        assert "does not divide the world size W=4" in str(error), error
    else:
        raise AssertionError("init_groups(3) accepted a world of 4")

    dims = init_groups(gp_size)
    _check_primitives(dims.gp_rank, dims.gp_size, sizes=(3, 0, 2, 0)[: dims.gp_size])
    dims = init_groups(2)
    assert (dims.gp_size, dims.dp_size) == (2, world // 2)
    _check_primitives(dims.gp_rank, 2, sizes=(0, 3), seed=10 + dims.dp_rank)
    _check_primitives(dims.gp_rank, 2, sizes=(2, 2), seed=20 + dims.dp_rank)

    # One-member groups (every rank creates every group): the autograd functions' backward and
    # double backward are consistent with their forward, including argument plumbing.
    from graphpar.parallel import comm

    alone = [dist.new_group([r]) for r in range(world)][dist.get_rank()]
    x = torch.randn(4, 2, dtype=torch.float64, requires_grad=True)
    functions = [
        lambda t: comm._ReducePartial.apply(t, alone),
        lambda t: comm._CopyToPartitioned.apply(t, alone),
        lambda t: comm._Split.apply(t, (4,), 0, alone),
        lambda t: comm._GatherForReplicated.apply(t, (4,), 0, alone),
        lambda t: comm._GatherForPartitioned.apply(t, (4,), 0, alone),
        lambda t: comm._ReduceScatter.apply(t, (4,), 0, alone),
    ]  # (scale_replicated's gradient differs from its forward's on purpose: checked above)
    for fn in functions:
        # Squared, so that the second derivative is not trivially zero.
        assert torch.autograd.gradcheck(lambda t, fn=fn: fn(t) ** 2, (x,))
        assert torch.autograd.gradgradcheck(lambda t, fn=fn: fn(t) ** 2, (x,))
    return "ok"


def _check_primitives(rank: int, size: int, sizes: tuple[int, ...], seed: int = 0) -> None:
    """Forward values and gradients of each primitive, on the current graph-parallel group.
    Every rank draws every rank's inputs (same seeds), so it knows the expected results."""
    total = sum(sizes)
    bounds = [sum(sizes[:r]) for r in range(size + 1)]

    def draw(r: int, rows: int, salt: int) -> Tensor:
        g = torch.Generator().manual_seed(1000 * seed + 10 * r + salt)
        return torch.randn(rows, 2, generator=g, dtype=torch.float64)

    def run(fn, x: Tensor, upstream: Tensor) -> tuple[Tensor, Tensor]:
        x = x.clone().requires_grad_(True)
        y = fn(x)
        (grad,) = torch.autograd.grad(y, x, upstream)
        return y.detach(), grad

    def close(a: Tensor, b: Tensor, what: str) -> None:
        assert a.shape == b.shape and torch.allclose(a, b, rtol=0, atol=1e-12), (what, a, b)

    own = slice(bounds[rank], bounds[rank + 1])
    full = [draw(r, total, 1) for r in range(size)]  # a full-size tensor per rank
    part = [draw(r, sizes[r], 2) for r in range(size)]  # a slice per rank
    up_full = [draw(r, total, 3) for r in range(size)]  # upstream gradients, per rank
    up_part = [draw(r, sizes[r], 4) for r in range(size)]
    sum_full, sum_up_full = sum(full), sum(up_full)
    cat_part, cat_up_part = torch.cat(part), torch.cat(up_part)

    y, grad = run(reduce_partial, full[rank], up_full[rank])
    close(y, sum_full, "reduce_partial forward")
    close(grad, up_full[rank], "reduce_partial backward: identity")

    y, grad = run(copy_to_partitioned, full[0], up_full[rank])
    close(y, full[0], "copy_to_partitioned forward")
    close(grad, sum_up_full, "copy_to_partitioned backward: sum")

    y, grad = run(lambda t: split(t, sizes), full[0], up_part[rank])
    close(y, full[0][own], "split forward")
    close(grad, cat_up_part, "split backward: gather")

    y, grad = run(lambda t: gather_for_replicated(t, sizes), part[rank], up_full[rank])
    close(y, cat_part, "gather_for_replicated forward")
    close(grad, up_full[rank][own], "gather_for_replicated backward: own slice")

    y, grad = run(lambda t: gather_for_partitioned(t, sizes), part[rank], up_full[rank])
    close(y, cat_part, "gather_for_partitioned forward")
    close(grad, sum_up_full[own], "gather_for_partitioned backward: reduce-scatter")

    y, grad = run(lambda t: reduce_scatter(t, sizes), full[rank], up_part[rank])
    close(y, sum_full[own], "reduce_scatter forward")
    close(grad, cat_up_part, "reduce_scatter backward: gather")

    y, grad = run(scale_replicated, full[0], up_full[rank])
    close(y, full[0], "scale_replicated forward")
    close(grad, up_full[rank] / size, "scale_replicated backward: 1/G")

    # Second order through a pair: d/dx of <grad of gather_for_partitioned, v> is the
    # all-gather adjoint again (the reduce-scatter's backward).
    x = part[rank].clone().requires_grad_(True)
    u = up_full[rank].clone().requires_grad_(True)
    (g1,) = torch.autograd.grad(gather_for_partitioned(x, sizes), x, u, create_graph=True)
    (g2,) = torch.autograd.grad(g1, u, up_part[rank])
    # Summed over ranks, <reduce_scatter(u), v> has gradient concat(v) with respect to each u.
    close(g2, cat_up_part, "gather_for_partitioned double backward")


SCENARIOS = {
    "toy": scenario_toy,
    "toy_dp": scenario_toy_dp,
    "primitives": scenario_primitives,
}


def run(scenario: str, gp_size: int):
    """What one rank runs inside its world (tests/gloo.py's `spawn_worlds`): the scenario's
    result on this rank."""
    return SCENARIOS[scenario](gp_size)
