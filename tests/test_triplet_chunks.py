"""The memory-lean triplet path (config key `triplet_chunk`, `graphpar.models.blocks.chunked`).

Triplets computed in chunks of output edges and recomputed in backward change nothing: the
energies, forces and every parameter's synchronised gradient of an energy + force loss equal
the plain step's (float64, 1e-10) in real gloo worlds of G = 1 and G = 2, with several chunks
per rank, alone and combined with activation checkpointing; DimeNet++ and GemNet-T take their
force's double backward through the chunks, GemNet-dT its direct forces. The chunks cover a
rank's output edges in order, each with its own triplets.
"""

from __future__ import annotations

import gloo
import model_worker as mw
import pytest
import torch
from test_models_parallel import RTOL, errors

from graphpar.models.blocks import triplet_chunks
from graphpar.training.config import TrainingError, load_config

pytestmark = pytest.mark.timeout(300)

# The same operations on the same values, the triplet sums added up chunk by chunk: exact to
# rounding.
CHUNKED_RTOL = 1e-10


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> dict[str, list]:
    """model_worker.run_chunked's results by rank in gloo worlds of G = 1 and G = 2 (one
    launch of 2 processes)."""
    worlds = {"G=1": (1, (1,)), "G=2": (2, (2,))}
    return gloo.spawn_worlds(mw.run_chunked, worlds, tmp_path_factory.mktemp("ranks"), 120)


@pytest.mark.parametrize("world", ["G=1", "G=2"])
def test_chunked_triplets_give_the_plain_step(world, ranks):
    """The same energies, forces and gradients with triplet chunks as without, and with chunks
    and activation checkpointing together. Every interaction block ran several chunks; each
    chunk ran once in forward and once more per backward through it (three with gradient
    forces in training: the force; then, in the loss's backward, the energy term's gradient and
    the force graph's double backward), and once more per recomputation of its block under
    activation checkpointing (once per backward through the block: two with gradient forces)."""
    backwards = {"dimenetpp-tiny": 3, "gemnet-tiny": 1, "gemnet-tiny/gradient-forces": 3}
    blocks = {"dimenetpp-tiny": 2, "gemnet-tiny": 1, "gemnet-tiny/gradient-forces": 2}
    results = ranks[world]
    for rank, result in enumerate(results):
        for case in mw.RECOMPUTED:
            plain = result[case, "plain"]
            for key, recomputations in (("chunked", 0), ("chunked/recomputed", blocks[case])):
                deviations = errors(result[case, key], plain)
                worst = max(deviations, key=deviations.get)
                print(f"{case} {key} {world} rank {rank}: worst {worst} {deviations[worst]:.1e}")
                assert deviations[worst] <= CHUNKED_RTOL, (case, key, rank, worst)
                # And the graph-parallel step is the serial one (test_models_parallel's).
                serial = ranks["G=1"][0][case, "plain"]
                assert max(errors(result[case, key], serial).values()) < RTOL, (case, key)
                counts = result[case, key, "counts"]
                chunks = counts["chunks"][: len(counts["chunks"]) // (1 + recomputations)]
                assert len(chunks) == 2 and min(chunks) >= 3, (case, key, counts)
                runs = sum(chunks) * (1 + backwards[case] + recomputations)
                assert counts["runs"] == runs, (case, key, counts, runs)
            assert result[case, "plain", "counts"] == {"chunks": [], "runs": 0}, case


def test_chunks_cover_the_output_edges_in_order():
    """Consecutive edge ranges of at most `size` triplets (an edge with more alone), each with
    exactly its edges' triplets, as slices when the triplets are sorted by output edge and as
    ids otherwise; one empty chunk for no edges; the config key refuses sizes below 1."""
    output_edge = torch.tensor([0, 0, 0, 2, 2, 3, 3, 3, 3, 3, 3, 5])  # edges 1 and 4: none
    chunks = triplet_chunks(output_edge, 7, size=4)
    assert [(c.edges.start, c.edges.stop) for c in chunks] == [(0, 2), (2, 3), (3, 4), (4, 7)]
    assert [c.triplets for c in chunks] == [slice(0, 3), slice(3, 5), slice(5, 11), slice(11, 12)]
    assert [c.width for c in chunks] == [3, 2, 6, 1]
    shuffled = torch.randperm(output_edge.numel(), generator=torch.Generator().manual_seed(0))
    unsorted = triplet_chunks(output_edge[shuffled], 7, 4)
    for sorted_chunk, chunk in zip(chunks, unsorted, strict=True):
        assert chunk.edges == sorted_chunk.edges and chunk.width == sorted_chunk.width
        assert sorted(output_edge[shuffled][chunk.triplets].tolist()) == sorted(
            output_edge[sorted_chunk.triplets].tolist()
        )
    (empty,) = triplet_chunks(torch.zeros(0, dtype=torch.long), 0, 4)
    assert (empty.edges, empty.triplets, empty.width) == (slice(0, 0), slice(0, 0), 0)
    base = {"model": "gemnet-tiny", "train": ["unused"], "max_steps": 1}
    assert load_config(base)["triplet_chunk"] is None
    with pytest.raises(TrainingError, match="triplet_chunk: 0 is less than the minimum of 1"):
        load_config(dict(base, triplet_chunk=0))
