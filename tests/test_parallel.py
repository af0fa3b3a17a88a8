"""Graph parallelism against the serial model, in real processes (gloo on 127.0.0.1, CPU).

One launch of 4 processes (the `ranks` fixture) runs every multi-process scenario of
tests/parallel_worker.py in turn, each in a gloo world of its own size W on the first W ranks
(tests/gloo.py's `spawn_worlds`); the ranks return their results, and the comparisons with the
serial model (the same code in this process, where no group exists so every primitive is the
identity) happen here, per test. Process groups time out after 60 s and tests after 120 s, so a
hung collective fails fast.
"""

from __future__ import annotations

import gloo
import parallel_worker as pw
import pytest
import torch

from graphpar.parallel import (
    ParallelDims,
    Partition,
    balanced_partition,
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

RTOL = 1e-9


# The worlds of the single launch: name -> (W, (scenario, G)).
WORLDS = {
    **{f"toy G={g}": (g, ("toy", g)) for g in (1, 2, 3, 4)},
    "toy G x D = 2 x 2": (4, ("toy_dp", 2)),
    "primitives": (4, ("primitives", 4)),
}


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> dict[str, list]:
    """Every world's results by rank, from one launch of 4 processes; a rank's exception fails
    every test that reads them."""
    return gloo.spawn_worlds(pw.run, WORLDS, tmp_path_factory.mktemp("ranks"))


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def assert_matches(result, reference, what: str) -> None:
    energy, forces, grads = result
    ref_energy, ref_forces, ref_grads = reference
    assert relative_error(energy, ref_energy) < RTOL, f"{what}: energy"
    assert relative_error(forces, ref_forces) < RTOL, f"{what}: forces"
    assert grads.keys() == ref_grads.keys()
    for name, grad in grads.items():
        assert relative_error(grad, ref_grads[name]) < RTOL, f"{what}: gradient of {name}"


def worst_error(result, reference) -> float:
    (_, forces, grads), (_, ref_forces, ref_grads) = result, reference
    errors = [relative_error(forces, ref_forces)]
    errors += [relative_error(grads[name], ref_grads[name]) for name in grads]
    return max(errors)


@pytest.fixture(scope="module")
def serial():
    """The serial toy model's (energy, forces, gradients) on the batch of the `toy` scenario."""
    assert get_dims().gp_size == 1
    energy, forces, grads = pw.train_step(pw.ToyModel(), pw.make_batch(seed=1))
    for name, grad in grads.items():
        assert grad.abs().max() > 1e-6, f"gradient of {name} is zero: the test would miss it"
    return energy, forces, grads


# ----------------------------------------------------------------------------------------------
# The toy model (DimeNet++'s communication shape) against the serial model
# ----------------------------------------------------------------------------------------------


@pytest.mark.timeout(120)
@pytest.mark.parametrize("gp_size", [1, 2, 3, 4])
def test_toy_model_matches_serial(gp_size, serial, ranks):
    batch = pw.make_batch(seed=1)
    edges = partition_edges(batch["idx_ji"], batch["edge_index"].shape[1], gp_size)
    if gp_size > 1:  # the test means something only if triplets read other ranks' edges
        remote = [
            bool((edges.owner(local.input_edge) != rank).any())
            for rank in range(gp_size)
            for local in [local_triplets(edges, rank, batch["idx_kj"], batch["idx_ji"])]
        ]
        assert any(remote), edges

    results = ranks[f"toy G={gp_size}"]
    assert len(results) == gp_size
    for rank, result in enumerate(results):
        assert_matches(result["right"], serial, f"G={gp_size}, rank {rank}")
        if gp_size > 1:
            # fairchem's gather (backward: split without the sum) loses the cross-rank terms.
            assert worst_error(result["wrong"], serial) > 1e-3


@pytest.mark.timeout(120)
def test_graph_and_data_parallel_match_serial_mean(ranks):
    """G x D = 2 x 2: two batches, gradients of the mean of their losses."""
    model = pw.ToyModel()
    grads = [pw.train_step(model, pw.make_batch(seed=100 + d))[2] for d in range(2)]
    expected = {name: (grads[0][name] + grads[1][name]) / 2 for name in grads[0]}

    results = ranks["toy G x D = 2 x 2"]
    assert len(results) == 4
    for rank, (energy, _, rank_grads) in enumerate(results):
        batch = pw.make_batch(seed=100 + rank // 2)  # row-major: ranks 0, 1 are row 0
        assert energy.shape == batch["energy"].shape
        for name, grad in rank_grads.items():
            assert grad.abs().max() > 1e-6, name
            assert relative_error(grad, expected[name]) < RTOL, (rank, name)


# ----------------------------------------------------------------------------------------------
# Primitives and groups
# ----------------------------------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_primitives_match_their_definitions(ranks):
    """Forward and backward of each primitive on 4 ranks with slices [3, 0, 2, 0], on a 2 x 2
    layout, double backward, gradcheck on one-member groups, and init_groups(3) on 4 ranks
    refused (all asserted inside the ranks)."""
    assert ranks["primitives"] == ["ok"] * 4


def test_single_process_is_the_identity():
    """Without torch.distributed every primitive returns its input and nothing is scaled."""
    dims = init_groups(1)
    assert (dims.gp_size, dims.dp_size, dims.gp_rank, dims.dp_rank) == (1, 1, 0, 0)
    assert dims.gp_group is None and dims.dp_group is None
    with pytest.raises(RuntimeError, match="init_process_group"):
        init_groups(2)
    with pytest.raises(ValueError, match=">= 1"):
        init_groups(0)

    x = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    for fn in (
        reduce_partial,
        copy_to_partitioned,
        scale_replicated,
        lambda t: split(t, [5]),
        lambda t: gather_for_replicated(t, [5]),
        lambda t: gather_for_partitioned(t, [5]),
        lambda t: reduce_scatter(t, [5]),
    ):
        assert fn(x) is x
    with pytest.raises(ValueError, match="one slice length"):
        split(x, [3, 2])
    with pytest.raises(ValueError, match="x has 5 rows"):
        gather_for_partitioned(x, [4])

    model = torch.nn.Linear(3, 1)
    model(x.float()).sum().backward()
    before = [p.grad.clone() for p in model.parameters()]
    sync_gradients(model)
    assert all(torch.equal(a, p.grad) for a, p in zip(before, model.parameters(), strict=True))


def test_layout_is_row_major():
    layout = ParallelDims(gp_size=4, dp_size=2, rank=6)
    assert (layout.world_size, layout.gp_rank, layout.dp_rank) == (8, 2, 1)
    assert layout.gp_ranks(1) == [4, 5, 6, 7]
    assert layout.dp_ranks(2) == [2, 6]


# ----------------------------------------------------------------------------------------------
# Partitions
# ----------------------------------------------------------------------------------------------


def test_balanced_partition():
    # Costs 1..8 (total 36) over 3 ranks: every slice within half a row's cost of 12.
    part = balanced_partition(torch.arange(1, 9), 3)
    costs = [int(torch.arange(1, 9)[part.slice(r)].sum()) for r in range(3)]
    assert part.bounds[0] == 0 and part.total == 8 and sum(costs) == 36
    assert max(abs(c - 12) for c in costs) <= 4
    # A tiny graph on many ranks: empty slices, and owners skip them.
    tiny = balanced_partition(torch.tensor([2, 1, 1, 0, 3]), 8)
    assert tiny.num_parts == 8 and tiny.total == 5 and 0 in tiny.sizes
    owner = tiny.owner(torch.arange(5))
    for e in range(5):
        assert tiny.bounds[owner[e]] <= e < tiny.bounds[owner[e] + 1]
    # Zero cost everywhere: split by count; no rows at all: every slice empty.
    assert balanced_partition(torch.zeros(5, dtype=torch.long), 2).sizes == (3, 2)
    assert balanced_partition(torch.zeros(0, dtype=torch.long), 3).sizes == (0, 0, 0)
    with pytest.raises(TypeError):
        balanced_partition(torch.ones(3), 2)


def test_partition_edges_and_triplets():
    batch = pw.make_batch(seed=1)
    idx_kj, idx_ji = batch["idx_kj"], batch["idx_ji"]
    num_edges = batch["edge_index"].shape[1]
    for gp_size in (1, 2, 3, 4, 64):
        edges = partition_edges(idx_ji, num_edges, gp_size)
        assert edges == partition_edges(idx_ji, num_edges, gp_size)  # deterministic
        assert edges.total == num_edges and len(edges.sizes) == gp_size
        owned = []
        for rank in range(gp_size):
            local = local_triplets(edges, rank, idx_kj, idx_ji)
            assert torch.equal(local.input_edge, idx_kj[local.ids])  # global input ids
            assert torch.equal(local.output_edge + edges.bounds[rank], idx_ji[local.ids])
            assert bool((local.output_edge < edges.sizes[rank]).all())
            owned.append(local.ids)
        assert torch.equal(torch.cat(owned), torch.arange(idx_ji.numel()))  # each exactly once
        if gp_size <= 4:  # balanced by triplets: no rank above its share by more than an edge
            per_rank = torch.tensor([len(t) for t in owned], dtype=torch.float64)
            largest_edge = torch.bincount(idx_ji).max()
            assert per_rank.max() <= idx_ji.numel() / gp_size + largest_edge


def test_partition_atoms():
    assert partition_atoms(5, 2) == Partition((0, 3, 5))
    assert partition_atoms(2, 4).sizes == (1, 1, 0, 0)
    assert partition_atoms(0, 3).sizes == (0, 0, 0)
