"""Communication counted at the collectives equals communication predicted from shapes.

Real gloo worlds on 127.0.0.1 (one launch of 4 processes, tests/gloo.py's `spawn_worlds`) train
the tiny models (tests/model_worker.py: DimeNet++ with gradient forces and double backward,
GemNet-dT with direct forces, float64) for one trainer step at G = 2, 3, 4 (and GemNet at
G x D = 2 x 2, for the data-parallel collectives),
recording every collective with `graphpar.parallel.counting.count_communication`. In this
process, where no group exists, `graphpar.parallel.predict.predict_step` runs the same steps
on the meta device in shape-only mode. Per rank, the two lists of collectives (kind, primitive,
phase, backward pass, group, dtype, shape, payload bytes) must be equal, in order; at G = 2 the
work counted in the real step (`count_operations`: matrix-product FLOPs, gathered and scattered
elements, scatter-add FLOPs) must equal the predicted work too. G = 4 adds the
sparse batches (ranks without edges, a batch without edges); G = 2 adds activation
checkpointing (blocks recomputed, with their collectives, in backward). The toy model of
tests/parallel_worker.py, which uses every primitive (split, gather_for_replicated and
reduce_scatter too), is compared with itself run in shape-only mode on the CPU.
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter

import gloo
import model_worker as mw
import parallel_worker as pw
import pytest
import torch

from graphpar.data.graph import triplet_fields
from graphpar.parallel import init_groups, partition_edges
from graphpar.parallel.counting import COLLECTIVES, count_communication, count_operations
from graphpar.parallel.groups import get_dims, simulate_groups
from graphpar.parallel.predict import predict_step

RECOMPUTED = dict(mw.STEP_CONFIG, activation_checkpointing=True)


def records(counter) -> list[dict]:
    """A counter's records as plain data (what `torch.load(weights_only=True)` reads back)."""
    return [dataclasses.asdict(record) for record in counter.records]


def counted(model, batch, config=mw.STEP_CONFIG) -> list[dict]:
    with count_communication() as counter:
        mw.train_step(model, batch, config)
    return records(counter)


# The work that a real step and its prediction must agree on exactly (the optimiser's
# element-wise work, in `other_elements`, is not part of a predicted step).
WORK = ("matmul_flops", "gather_elements", "scatter_elements", "scatter_add_flops")
WORK_G = 2  # the world whose work is counted


def counted_with_work(model, batch) -> tuple[list[dict], dict]:
    with count_communication() as counter, count_operations() as work:
        mw.train_step(model, batch)
    return records(counter), {key: getattr(work, key) for key in WORK}


def counted_toy() -> list[dict]:
    with count_communication() as counter:
        pw.train_step(pw.ToyModel(), pw.make_batch(seed=1))
    return records(counter)


def sparse_cases() -> list[tuple[str, str]]:
    """(model, sparse batch): ranks without edges (a dimer on 4 ranks) for both models, and a
    batch without edges (no collective on the edges at all) for the cheaper one."""
    return [(name, "dimer") for name in mw.MODELS] + [("gemnet-tiny", "no_edges")]


# The data-parallel collectives (three loss sums, the gradient all-reduce) do not depend on the
# model: G x D = 2 x 2 runs one.
DP_MODEL = "gemnet-tiny"


def run(gp_size: int) -> dict:
    """One rank of a real gloo world: the collectives of each counted step."""
    dims = init_groups(gp_size)
    batch = mw.make_batch(seed=100 + dims.dp_rank)
    result = {}
    for name in mw.MODELS if dims.dp_size == 1 else (DP_MODEL,):
        if gp_size == WORK_G and dims.dp_size == 1:  # (counting work slows a step down)
            result[name], result[name, "work"] = counted_with_work(mw.make_model(name), batch)
        else:
            result[name] = counted(mw.make_model(name), batch)
    if dims.dp_size == 1:
        result["toy"] = counted_toy()
    if gp_size == 4:
        sparse = mw.sparse_batches()
        for name, case in sparse_cases():
            result[name, case] = counted(mw.make_model(name), sparse[case])
    if gp_size == 2 and dims.dp_size == 1:
        for name in mw.MODELS:
            result[name, "recomputed"] = counted(mw.make_model(name), batch, RECOMPUTED)
    return result


WORLDS = {
    **{f"G={g}": (g, (g,)) for g in (2, 3, 4)},
    "G x D = 2 x 2": (4, (2,)),
}


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> dict[str, list]:
    return gloo.spawn_worlds(run, WORLDS, tmp_path_factory.mktemp("counting"), timeout_s=120)


def predicted(name, batch, gp_size, dp_size=1, **options) -> list[list[dict]]:
    return [
        records(step.communication)
        for step in predicted_steps(name, batch, gp_size, dp_size, **options)
    ]


def predicted_steps(name, batch, gp_size, dp_size=1, operations=False, **options):
    model = mw.make_model(name)
    return predict_step(
        model,
        batch,
        gp_size,
        dp_size=dp_size,
        dtype=torch.float64,
        operations=operations,
        **options,
    )


def compare(measured: list[dict], expected: list[dict], what: str) -> None:
    """Record by record, in order; the ring figure follows from the payload."""
    assert len(measured) == len(expected), (what, Counter(r["kind"] for r in measured))
    for index, (got, want) in enumerate(zip(measured, expected, strict=True)):
        assert got == want, (what, index, got, want)


def check_payload(name: str, batch, gp_size: int, rows: list[dict]) -> None:
    """The payload definition, independently of the counter: an all-gather's and a
    reduce-scatter's buffer holds G slices of the largest rank's edges (zero-padded), a
    graph-parallel all-reduce one row per atom."""
    family = mw.make_model(name).triplet_family
    if family == "dimenetpp":
        _, output_edge = triplet_fields(batch, family)  # idx_ji
        num_edges = batch.edge_index.size(1)
    else:
        edge_index, _, _, _, output_edge = triplet_fields(batch, family)  # id3_ca
        num_edges = edge_index.size(1)
    largest = max(partition_edges(output_edge, num_edges, gp_size).sizes)
    for row in rows:
        if row["kind"] in ("all_gather", "reduce_scatter"):
            assert row["shape"][0] == gp_size * largest, (name, row)
        elif row["primitive"] == "reduce_partial":
            assert row["shape"][0] == batch.pos.size(0), (name, row)
        size = torch.empty((), dtype=getattr(torch, row["dtype"])).element_size()
        assert row["payload_bytes"] == math.prod(row["shape"]) * size, row


def totals(rows: list[dict]) -> dict[str, int]:
    sums = dict.fromkeys(COLLECTIVES, 0)
    for row in rows:
        sums[row["kind"]] += row["payload_bytes"]
    return sums


@pytest.mark.timeout(300)
@pytest.mark.parametrize("gp_size", [2, 3, 4])
def test_predicted_bytes_equal_counted(gp_size, ranks):
    results = ranks[f"G={gp_size}"]
    assert len(results) == gp_size
    batch = mw.make_batch(seed=100)
    cases = [(name, name, batch, {}) for name in mw.MODELS]
    if gp_size == 4:
        sparse = mw.sparse_batches()
        cases += [((name, case), name, sparse[case], {}) for name, case in sparse_cases()]
    if gp_size == 2:
        cases += [
            ((name, "recomputed"), name, batch, {"activation_checkpointing": True})
            for name in mw.MODELS
        ]
    for key, name, case_batch, options in cases:
        with_work = key == name and gp_size == WORK_G
        steps = predicted_steps(name, case_batch, gp_size, operations=with_work, **options)
        for rank, result in enumerate(results):
            compare(result[key], records(steps[rank].communication), (key, gp_size, rank))
            if with_work:  # FLOPs, gathers and scatters of the real step, exactly
                work = {k: getattr(steps[rank].operations, k) for k in WORK}
                print(f"{name} G={gp_size} rank {rank}: work {work}")
                assert result[name, "work"] == work, (name, gp_size, rank)
                assert all(work.values()), work
            if key == name:  # the full batch: every kind of collective, in both directions
                check_payload(name, case_batch, gp_size, result[key])
                sums = totals(result[key])
                print(f"{name} G={gp_size} rank {rank}: payload bytes {sums}")
                assert all(sums.values()), sums
                assert {r["phase"] for r in result[key]} == {"forward", "backward", "gradients"}
            if key == (name, "recomputed"):  # blocks' collectives again, in backward
                plain = Counter((r["kind"], r["phase"]) for r in result[name])
                again = Counter((r["kind"], r["phase"]) for r in result[key])
                assert again[("all_gather", "backward")] > plain[("all_gather", "backward")]
    assert get_dims().gp_size == 1  # nothing leaked out of the shape-only mode


@pytest.mark.timeout(300)
def test_predicted_bytes_equal_counted_with_data_parallel(ranks):
    """G x D = 2 x 2: the data-parallel sums and gradient all-reduce are counted too."""
    results = ranks["G x D = 2 x 2"]
    expected = [predicted(DP_MODEL, mw.make_batch(seed=100 + row), 2, dp_size=2) for row in (0, 1)]
    for rank, result in enumerate(results):
        row, gp_rank = divmod(rank, 2)
        compare(result[DP_MODEL], expected[row][gp_rank], (DP_MODEL, "2 x 2", rank))
        groups = Counter((r["primitive"], r["group"]) for r in result[DP_MODEL])
        assert groups[("dp_sum", "dp")] == 3 and groups[("sync_gradients", "dp")] == 1


@pytest.mark.timeout(300)
def test_every_primitive_counted(ranks):
    """The toy model (every primitive, double backward) counted in gloo equals the same step in
    shape-only mode on the CPU."""
    for gp_size in (2, 3, 4):
        results = ranks[f"G={gp_size}"]
        for rank, result in enumerate(results):
            with simulate_groups(gp_size, rank):
                expected = counted_toy()
            compare(result["toy"], expected, ("toy", gp_size, rank))
            primitives = {r["primitive"] for r in result["toy"]}
            assert primitives == {
                "reduce_partial",
                "gather_for_partitioned",
                "gather_for_replicated",
                "reduce_scatter",
                "sync_gradients",
            }, primitives


def test_predicted_with_equal_edge_counts_splits_edges_evenly():
    """`partition="edges"` (fairchem's split, for comparison) gives every rank G-th of the edges
    and its output edges' triplets, where the default balances triplets; training is left on
    the triplet balance, and an unknown cost is refused."""
    batch = mw.make_batch(seed=3)
    even = predicted_steps(DP_MODEL, batch, 3, partition="edges")
    balanced = predicted_steps(DP_MODEL, batch, 3)  # after `even`: the default is back
    edges = [step.edges for step in even]
    assert max(edges) - min(edges) <= 1
    assert sum(edges) == sum(step.edges for step in balanced)
    assert sum(s.triplets for s in even) == sum(s.triplets for s in balanced)
    assert [s.edges for s in balanced] != edges
    with pytest.raises(ValueError, match="edge cost must be one of triplets, edges"):
        predicted_steps("gemnet-tiny", batch, 2, partition="atoms")


def test_views_are_not_counted_as_work():
    """A batched product's reshape (`aten._unsafe_view`, not marked as a view by torch) moves no
    data: only the product's FLOPs and the addition's elements are counted."""
    a, b = torch.randn(4, 3, 5), torch.randn(5, 6)
    with count_operations() as work:
        (a @ b) + 1.0
    assert work.matmul_flops == 2 * 4 * 3 * 5 * 6
    assert work.other_elements == 4 * 3 * 6
