"""Preprocessing: raw S2EF / IS2RE files -> sharded LMDB graphs, and the dataset layer on top."""

from __future__ import annotations

import json
import lzma
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import ase.io
import lmdb
import numpy as np
import pytest
import torch
from ase.build import bulk
from conftest import (
    SNAKEFILE,
    SNAKEMAKE,
    bad_structure,
    run_snakemake,
    snakemake_env,
    tool_env,
)
from torch.utils.data import DataLoader

from graphpar.data import lmdb as lmdb_module
from graphpar.data.dataset import BalancedBatchSampler, LmdbDataset, balanced_partition, collate
from graphpar.data.graph import TRIPLET_FIELDS, atoms_to_sample, edge_vectors
from graphpar.data.lmdb import ShardedLmdb, ShardWriter, iter_pyg_lmdb, widened, write_metadata
from graphpar.data.mini import SPLITS, MiniConfig, generate, write_is2re_split, write_s2ef_file
from graphpar.io import CorruptFileError, count_lines, replace_directory
from graphpar.preprocess import PreprocessError, gather, main, plan, preprocess, read_txt, rows_name
from graphpar.training.checkpoint import read_checkpoint
from graphpar.training.train import train

pytestmark = pytest.mark.timeout(600)

TINY = {
    "seed": 11,
    "systems": {"train": 4, "val_id": 2, **{s: 0 for s in SPLITS if s not in ("train", "val_id")}},
    "supercell": [2],
    "facets": ["111", "100"],
    "max_steps": 40,
    "frames_per_file": 25,
}


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    root = tmp_path_factory.mktemp("raw")
    generate(MiniConfig.from_dict(TINY), root, workers=2)
    return root


@pytest.fixture(scope="module")
def processed(raw, tmp_path_factory):
    out = tmp_path_factory.mktemp("lmdb")
    preprocess(
        raw / "s2ef" / "train",
        out / "s2ef",
        workers=2,
        ref_energy=True,
        store_triplets="always",
        progress=False,
    )
    preprocess(
        raw / "s2ef" / "train",
        out / "s2ef_lean",
        workers=1,
        ref_energy=True,
        store_triplets="never",
        progress=False,
    )
    preprocess(
        raw / "s2ef" / "train",
        out / "s2ef_otf",
        workers=2,
        ref_energy=True,
        storage="on_the_fly",
        progress=False,
    )
    preprocess(raw / "is2re" / "train" / "data.lmdb", out / "is2re", workers=2, progress=False)
    return out


def raw_frames(raw):
    """{(sid, fid): (atoms, reference energy)} over every frame of the raw train split."""
    frames = {}
    for xyz in sorted((raw / "s2ef" / "train").glob("*.extxyz.xz")):
        rows = read_txt(xyz.with_name(xyz.name.replace(".extxyz", ".txt")))
        for atoms, (sid, fid, reference) in zip(ase.io.read(xyz, ":"), rows, strict=True):
            frames[sid, fid] = (atoms, reference)
    return frames


def test_s2ef_round_trip_is_exact(raw, processed):
    frames = raw_frames(raw)
    dataset = LmdbDataset(processed / "s2ef")
    assert len(dataset) == len(frames) == dataset.metadata["length"]
    assert dataset.metadata["triplets_stored"] is True
    seen = set()
    for sample in dataset:
        key = int(sample.sid), int(sample.fid)
        seen.add(key)
        atoms, reference = frames[key]
        expected = atoms_to_sample(atoms, cutoff=6.0, max_neighbors=50)
        for name in (
            "pos",
            "atomic_numbers",
            "cell",
            "tags",
            "fixed",
            "edge_index",
            "cell_offsets",
            "idx_kj",
            "idx_ji",
            "id3_ba",
            "id3_ca",
            "forces",
        ):
            assert torch.equal(sample[name], expected[name]), name
        # --ref-energy: adsorption-style energy = total - reference, exactly.
        assert float(sample.energy) == atoms.get_potential_energy() - reference
    assert seen == set(frames)
    sizes = dataset.sizes("edges")
    assert sizes.sum() == sum(s.edge_index.shape[1] for s in dataset)


def test_is2re_keeps_initial_and_relaxed_positions_and_energies(raw, processed):
    dataset = LmdbDataset(processed / "is2re")
    originals = [attrs for _, attrs in iter_pyg_lmdb(raw / "is2re" / "train" / "data.lmdb")]
    assert len(dataset) == len(originals) > 0
    for sample, original in zip(dataset, originals, strict=True):
        assert int(sample.sid) == int(original["sid"])
        assert torch.equal(sample.pos, original["pos"])
        assert torch.equal(sample.pos_relaxed, original["pos_relaxed"])
        assert float(sample.energy_init) == float(original["y_init"])
        assert float(sample.energy_relaxed) == float(original["y_relaxed"])
        assert torch.equal(sample.fixed, original["fixed"].bool())


def test_triplets_built_in_loader_workers_equal_stored_ones(processed):
    stored = LmdbDataset(processed / "s2ef", triplets=("dimenetpp", "gemnet"))
    lean = LmdbDataset(processed / "s2ef_lean", triplets=("dimenetpp", "gemnet"))
    assert lean.metadata["triplets_stored"] is False
    assert "idx_kj" not in LmdbDataset(processed / "s2ef_lean")[0]
    by_key = {(int(s.sid), int(s.fid)): s for s in stored}
    loader = DataLoader(lean, batch_size=None, num_workers=2)  # in order: index k is sample k
    count = 0
    for index, sample in enumerate(loader):
        reference = by_key[int(sample.sid), int(sample.fid)]
        for name in (name for names in TRIPLET_FIELDS.values() for name in names):
            assert torch.equal(sample[name], reference[name]), name
        # The counts stored for load balancing match the triplets the loader built.
        assert lean.sizes("triplets_dimenetpp")[index] == len(sample.idx_kj)
        assert lean.sizes("triplets_gemnet")[index] == len(sample.id3_ba)
        count += 1
    assert count == len(stored)


def test_sample_order_does_not_depend_on_the_number_of_workers(raw, processed):
    """Two workers and one build the same dataset, index for index: a machine with more cores
    trains on the same batches."""
    assert len(list((raw / "s2ef" / "train").glob("*.extxyz.xz"))) >= 3  # enough to split
    two = LmdbDataset(processed / "s2ef")
    one = LmdbDataset(processed / "s2ef_lean")
    assert len(two.metadata["shards"]) == 2
    order = [(int(s.sid), int(s.fid)) for s in two]
    assert order == [(int(s.sid), int(s.fid)) for s in one]
    assert len(set(order)) == len(order)


def test_dataset_identity_is_its_content_and_energies_say_their_reference(raw, processed, tmp_path):
    """metadata.json's content_sha256 (what checkpoints record of their data) is the same for
    one worker and two, and changes with any stored value; energy_reference says what the
    energies are."""
    options = {"ref_energy": True, "store_triplets": "always", "progress": False}
    one = preprocess(raw / "s2ef" / "train", tmp_path / "one", workers=1, **options)
    two = LmdbDataset(processed / "s2ef").metadata
    assert one["content_sha256"] == two["content_sha256"]
    assert one["energy_reference"] == "adsorption"
    total = preprocess(
        raw / "s2ef" / "train", tmp_path / "total", **{**options, "ref_energy": False}
    )
    assert total["energy_reference"] == "total"
    assert total["content_sha256"] != one["content_sha256"]  # other energies, other identity
    assert LmdbDataset(processed / "is2re").metadata["energy_reference"] == "adsorption"


def per_structure_quantities(batch):
    """Model-free sums per structure over edges and both triplet families."""
    structures = int(batch.num_graphs)
    edge_graph = batch.batch[batch.edge_index[1]]
    vectors = edge_vectors(batch.pos, batch.edge_index, batch.cell_offsets, batch.cell, batch.batch)
    lengths = torch.zeros(structures).index_add_(0, edge_graph, vectors.norm(dim=1))
    cos_kj_ji = torch.nn.functional.cosine_similarity(vectors[batch.idx_kj], vectors[batch.idx_ji])
    dimenet = torch.zeros(structures).index_add_(0, edge_graph[batch.idx_ji], cos_kj_ji)

    sym_graph = batch.batch[batch.edge_index_sym[1]]
    sym = edge_vectors(
        batch.pos, batch.edge_index_sym, batch.cell_offsets_sym, batch.cell, batch.batch
    )
    cos_ba_ca = torch.nn.functional.cosine_similarity(sym[batch.id3_ba], sym[batch.id3_ca])
    gemnet = torch.zeros(structures).index_add_(0, sym_graph[batch.id3_ca], cos_ba_ca)
    swapped = (sym + sym[batch.id_swap]).abs().max()  # a reversed edge is the negated vector
    return torch.stack([lengths, dimenet, gemnet], dim=1), swapped


def test_batches_carry_correct_offsets(processed):
    dataset = LmdbDataset(processed / "s2ef")
    samples = [dataset[i] for i in (0, 5, 9, 13)]
    batch = collate(samples)
    batched, swapped = per_structure_quantities(batch)
    alone = torch.cat([per_structure_quantities(collate([s]))[0] for s in samples])
    torch.testing.assert_close(batched, alone)
    assert swapped < 1e-4
    assert torch.equal(batch.free, ~batch.fixed)
    assert batch.energy.shape == (4,) and batch.natoms.tolist() == [int(s.natoms) for s in samples]


def test_sampler_is_deterministic_balanced_and_covers_each_global_batch():
    rng = np.random.default_rng(0)
    sizes = rng.integers(10, 1000, size=103)
    make = lambda rank, seed=1: BalancedBatchSampler(sizes, 4, num_replicas=3, rank=rank, seed=seed)  # noqa: E731
    samplers = [make(rank) for rank in range(3)]
    for sampler in samplers:
        sampler.set_epoch(2)
    steps = [list(sampler) for sampler in samplers]
    again = make(0)
    again.set_epoch(2)
    assert list(again) == steps[0]
    other_epoch = make(0)
    other_epoch.set_epoch(3)
    assert list(other_epoch) != steps[0]
    assert len(steps[0]) == len(samplers[0]) == 9
    seen = []
    for step in range(len(steps[0])):
        parts = [steps[rank][step] for rank in range(3)]
        assert all(parts), "every rank gets at least one sample"
        seen += [i for part in parts for i in part]
        loads = [sizes[part].sum() for part in parts]
        if step < 8:  # full global batches of 12 balance well
            assert max(loads) <= 1.35 * np.mean(loads)
    assert set(seen) == set(range(103))


def test_balanced_partition_is_greedy_lpt():
    parts = balanced_partition(np.array([5, 4, 3, 3, 1]), 2)
    assert [p.tolist() for p in parts] == [[0, 3], [1, 2, 4]]


def test_frame_count_mismatch_is_a_clear_error(raw, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    xyz = sorted((raw / "s2ef" / "train").glob("*.extxyz.xz"))[0]
    (bad / "0.extxyz.xz").write_bytes(xyz.read_bytes())
    with lzma.open(xyz.with_name(xyz.name.replace(".extxyz", ".txt")), "rt") as f:
        lines = f.read()
    with lzma.open(bad / "0.txt.xz", "wt") as f:
        f.write("".join(lines.splitlines(keepends=True)[:-1]))
    with pytest.raises(PreprocessError, match=r"0\.extxyz\.xz has \d+ frames but 0\.txt\.xz"):
        preprocess(bad, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_truncated_xz_is_a_clear_error(raw, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    xyz = sorted((raw / "s2ef" / "train").glob("*.extxyz.xz"))[0]
    data = xyz.read_bytes()
    (bad / "0.extxyz.xz").write_bytes(data[: len(data) // 2])
    txt = xyz.with_name(xyz.name.replace(".extxyz", ".txt"))
    (bad / "0.txt.xz").write_bytes(txt.read_bytes())
    with pytest.raises(PreprocessError, match="0.extxyz.xz"):
        preprocess(bad, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def mini_system(atoms, sid: int) -> dict:
    """`atoms` as one system of the mini generator (a single frame), for its writers."""
    frame = {"positions": atoms.positions, "energy": -1.0, "forces": np.zeros((len(atoms), 3))}
    return {
        "spec": SimpleNamespace(sid=sid),
        "sid": sid,
        "numbers": atoms.numbers,
        "cell": np.asarray(atoms.cell),
        "tags": atoms.get_tags(),
        "fixed": np.zeros(len(atoms), dtype=bool),
        "reference_energy": 0.0,
        "frames": [frame],
    }


def write_s2ef(directory: Path, structures) -> Path:
    """An S2EF directory of one file pair, 0.extxyz.xz + 0.txt.xz: a frame per structure."""
    directory.mkdir(parents=True)
    systems = [mini_system(atoms, sid) for sid, atoms in enumerate(structures)]
    write_s2ef_file(directory / "0", [(system, 0, system["frames"][0]) for system in systems])
    return directory


def snapshot(root: Path) -> dict:
    """Every path under `root` with its bytes (None for a directory)."""
    return {p: None if p.is_dir() else p.read_bytes() for p in sorted(root.rglob("*"))}


@pytest.mark.parametrize(
    ("problem", "message"),
    [
        ("no atoms", "the structure has no atoms"),
        ("atomic number 0", "atom 1 has atomic number 0, not in 1..118"),
        ("NaN position", r"atom 1 has position \[nan, 1\.3, 0\.3\], not finite"),
        ("singular cell", r"cell .* is singular along its periodic directions"),
    ],
)
def test_s2ef_frame_without_a_graph_is_refused_naming_file_and_frame(tmp_path, problem, message):
    """Before: stored (and counted), or torch tracebacks without the file."""
    source = write_s2ef(tmp_path / "in", [bulk("Cu", cubic=True), bad_structure(problem)])
    with pytest.raises(
        PreprocessError, match=rf"0\.extxyz\.xz: frame 1 \(sid 1, fid 0\): .*{message}"
    ):
        preprocess(source, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("number", [119, -1])
def test_lmdb_atomic_number_out_of_range_is_refused_naming_file_and_sample(tmp_path, number):
    systems = [mini_system(bulk("Cu", cubic=True), sid) for sid in range(2)]
    systems[1]["numbers"] = np.array([29, 29, number, 29])
    source = tmp_path / "data.lmdb"
    write_is2re_split(systems, source)
    with pytest.raises(
        PreprocessError, match=rf"data\.lmdb: sample 1: .*atom 2 has atomic number {number}, not"
    ):
        preprocess(source, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("cut", "reason"), [(10, "Frame has 2 atoms, expected 4"), (7, "")])
def test_cli_truncated_extxyz_is_one_line_naming_file_and_frame(tmp_path, cut, reason):
    """Cut inside frame 1's atoms (an XYZError before) or its header (a RuntimeError)."""
    source = write_s2ef(tmp_path / "in", [bulk("Cu", cubic=True)] * 3)
    xyz = source / "0.extxyz.xz"
    lines = lzma.decompress(xyz.read_bytes()).decode().splitlines(keepends=True)
    xyz.write_bytes(lzma.compress("".join(lines[:cut]).encode()))  # frame 0 has 6 lines
    with pytest.raises(
        SystemExit, match=rf"^error: \S*0\.extxyz\.xz: frame 1: cannot read.*{reason}"
    ):
        main(["--input", str(source), "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("damage", ["flipped", "truncated"])
def test_cli_corrupt_txt_xz_is_one_line_naming_the_file(tmp_path, damage):
    """Before: an LZMAError or EOFError traceback from count_lines."""
    source = write_s2ef(tmp_path / "in", [bulk("Cu", cubic=True)] * 3)
    txt = source / "0.txt.xz"
    data = bytearray(txt.read_bytes())
    middle = len(data) // 2
    if damage == "flipped":
        data[middle : middle + 4] = bytes(byte ^ 0xFF for byte in data[middle : middle + 4])
    else:
        del data[middle:]
    txt.write_bytes(bytes(data))
    with pytest.raises(CorruptFileError, match=rf"^{re.escape(str(txt))}: truncated or corrupt"):
        count_lines(txt)
    with pytest.raises(SystemExit, match=rf"^error: {re.escape(str(txt))}: truncated or corrupt"):
        main(["--input", str(source), "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("where", ["the input", "its parent", "inside it"])
def test_output_overlapping_the_input_is_refused(tmp_path, where):
    """Before: `--out` = the input deleted the input, `--out` = its parent the siblings."""
    source = write_s2ef(tmp_path / "data" / "in", [bulk("Cu", cubic=True)])
    (tmp_path / "data" / "sibling.txt").write_text("keep me")
    out = {"the input": source, "its parent": source.parent, "inside it": source / "lmdb"}[where]
    before = snapshot(tmp_path)
    with pytest.raises(
        PreprocessError,
        match=rf"^output {re.escape(str(out))} overlaps input {re.escape(str(source))}",
    ):
        preprocess(source, out, progress=False)
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("foreign", ["directory", "other metadata.json", "file"])
def test_foreign_output_is_refused_and_untouched(tmp_path, foreign):
    source = write_s2ef(tmp_path / "in", [bulk("Cu", cubic=True)])
    out = tmp_path / "out"
    if foreign == "file":
        out.write_text("mine")
    else:
        out.mkdir()
        name = "metadata.json" if foreign == "other metadata.json" else "notes.txt"
        (out / name).write_text('{"length": 3}')
    before = snapshot(tmp_path)
    with pytest.raises(PreprocessError, match=rf"^output {re.escape(str(out))} exists and is not"):
        preprocess(source, out, progress=False)
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("existing", ["graphpar dataset", "empty directory"])
def test_graphpar_dataset_or_empty_output_is_replaced(tmp_path, existing):
    source = write_s2ef(tmp_path / "in", [bulk("Cu", cubic=True)])
    out = tmp_path / "out"
    if existing == "graphpar dataset":
        preprocess(source, out, progress=False)
        (out / "stale.txt").write_text("from an older run")
    else:
        out.mkdir()
    assert preprocess(source, out, progress=False)["length"] == 1
    assert sorted(p.name for p in out.iterdir()) == [
        "data.0000.lmdb",
        "metadata.json",
        "metadata.npz",
    ]


def test_replace_directory_never_deletes_what_it_must_keep(tmp_path):
    """The last guard of every writer: a target that holds a kept path or the source itself."""
    kept = tmp_path / "data" / "in"
    kept.mkdir(parents=True)
    new = tmp_path / "new"
    new.mkdir()
    staged = tmp_path / "data" / "staged"
    staged.mkdir()
    before = snapshot(tmp_path)
    data = re.escape(str(tmp_path / "data"))
    with pytest.raises(
        ValueError, match=rf"refusing to replace {data}: it holds {re.escape(str(kept))}"
    ):
        replace_directory(new, tmp_path / "data", keep=[kept])
    with pytest.raises(
        ValueError, match=rf"refusing to replace {data}: it holds {re.escape(str(staged))}"
    ):
        replace_directory(staged, tmp_path / "data")
    assert snapshot(tmp_path) == before


class Exploit:
    def __reduce__(self):
        return (print, ("owned",))


def test_disallowed_pickle_is_refused_naming_file_and_key(tmp_path):
    path = tmp_path / "data.lmdb"
    env = lmdb.open(str(path), subdir=False, lock=False, map_size=2**20)
    with env.begin(write=True) as txn:
        txn.put(b"0", pickle.dumps(Exploit()))
    env.close()
    with pytest.raises(
        PreprocessError, match=r"builtins\.print.*data\.lmdb.*'0'|data\.lmdb.*builtins\.print"
    ):
        preprocess(path, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_cli_help():
    result = subprocess.run(
        [sys.executable, "-m", "graphpar.preprocess", "--help"],
        capture_output=True,
        text=True,
        env=tool_env(),
    )
    assert result.returncode == 0 and "--store-triplets" in result.stdout
    assert "--graph-convention {graphpar,fairchem}" in result.stdout


def test_unknown_graph_convention_is_refused(raw, tmp_path):
    with pytest.raises(PreprocessError, match="graph_convention must be one of graphpar, fair"):
        preprocess(raw / "s2ef" / "train", tmp_path / "out", graph_convention="ocp")
    assert not (tmp_path / "out").exists()


# ---- storage modes, compact graphs, shards ------------------------------------------------------


def test_graphs_on_the_fly_are_the_stored_graphs_bit_for_bit(processed):
    """Storage on_the_fly keeps structures and labels only; the loader (in its workers) builds
    graphs and triplets equal to the stored ones, and the per-sample costs agree."""
    stored = LmdbDataset(processed / "s2ef", triplets=("dimenetpp", "gemnet"))
    otf = LmdbDataset(processed / "s2ef_otf", triplets=("dimenetpp", "gemnet"))
    assert otf.metadata["storage"] == "on_the_fly" and stored.metadata["storage"] == "graphs"
    assert "edge_index" not in ShardedLmdb(processed / "s2ef_otf")[0]  # nothing of the graph
    for cost in ("atoms", "edges", "triplets_dimenetpp", "triplets_gemnet"):
        assert np.array_equal(otf.sizes(cost), stored.sizes(cost)), cost
    loader = DataLoader(otf, batch_size=None, num_workers=2)
    for built, kept in zip(loader, stored, strict=True):
        assert sorted(built.keys()) == sorted(kept.keys())
        for name, value in kept:  # a Data iterates over (key, value)
            assert value.dtype == built[name].dtype and torch.equal(value, built[name]), name


def test_a_training_step_and_an_evaluation_equal_in_both_storage_modes(processed, tmp_path):
    """The same run on stored graphs and on graphs built by the loader's worker: the same weights
    after the step and the same validation metrics, bit for bit."""
    found = {}
    for mode, split in (("graphs", "s2ef"), ("on_the_fly", "s2ef_otf")):
        config = {
            "model": "gemnet-tiny",
            "train": [str(processed / split)],
            "val": str(processed / split),
            "batch_size": 4,
            "max_steps": 1,
            "eval_every": 1,
            "num_workers": 1,
            "log_every": 1,
        }
        final = train(config, tmp_path / mode)
        lines = (tmp_path / mode / "metrics.jsonl").read_text().splitlines()
        records = [json.loads(line) for line in lines]
        for record in records:  # how fast, not what was computed
            record.pop("samples_per_s", None), record.pop("peak_memory_mb", None)
        found[mode] = (read_checkpoint(final)["model"], records)
    (graphs_weights, graphs_log), (otf_weights, otf_log) = found["graphs"], found["on_the_fly"]
    assert graphs_weights.keys() == otf_weights.keys()
    for name, value in graphs_weights.items():
        assert torch.equal(value, otf_weights[name]), name
    assert [r["split"] for r in graphs_log] == ["train", "val"]
    assert graphs_log == otf_log  # loss, gradient norm, validation MAEs


def test_stored_graphs_are_narrow_and_version_1_shards_still_read(processed, tmp_path, monkeypatch):
    """Integers are stored in the narrowest type that holds them (encoding version 2); a dataset
    written by the previous version (every integer int64, encoding version 1) reads the same."""
    reader = ShardedLmdb(processed / "s2ef")
    raw_sample = reader[0]
    assert raw_sample["edge_index"].dtype == np.uint8  # < 256 atoms
    assert raw_sample["cell_offsets"].dtype == np.int8
    assert raw_sample["idx_kj"].dtype.itemsize <= 2
    old = tmp_path / "v1"
    old.mkdir()
    monkeypatch.setattr(lmdb_module, "ENCODING_VERSION", 1)  # what the previous version wrote
    with ShardWriter(old / "data.0000.lmdb") as writer:
        for index in range(len(reader)):
            writer.append(widened(reader[index]))
    write_metadata(old, {k: v for k, v in reader.metadata.items() if k not in RESERVED}, {})
    monkeypatch.undo()
    assert (old / "data.0000.lmdb").stat().st_size > 2 * shard_bytes(processed / "s2ef")
    env = lmdb.open(str(old / "data.0000.lmdb"), subdir=False, readonly=True, lock=False)
    with env, env.begin() as txn:
        assert int.from_bytes(txn.get(b"0")[6:8], "little") == 1  # the blob's encoding version
    new = LmdbDataset(processed / "s2ef", triplets=("dimenetpp", "gemnet"))
    for index, sample in enumerate(LmdbDataset(old, triplets=("dimenetpp", "gemnet"))):
        for name, value in new[index]:
            assert value.dtype == sample[name].dtype and torch.equal(value, sample[name]), name


RESERVED = ("schema_version", "encoding_version", "length", "shards", "content_sha256")


def shard_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.glob("data.*.lmdb"))


def test_shards_written_one_by_one_gather_into_the_one_call_dataset(raw, processed, tmp_path):
    """plan -> shard (each its own command) -> gather builds what one call builds: whole files
    per shard, the same samples and identity; a missing shard is named, nothing is written."""
    source = raw / "s2ef" / "train"
    settings = ["--input", str(source), "--ref-energy", "--store-triplets", "always"]
    plan_file, shards = tmp_path / "plan.json", tmp_path / "shards"
    main(["plan", *settings, "--shard-frames", "40", "--out", str(plan_file)])
    the_plan = json.loads(plan_file.read_text())
    assert len(the_plan["shards"]) >= 3
    files = [xyz for shard in the_plan["shards"] for xyz, _ in shard["items"]]
    assert files == sorted(set(files), key=files.index) and len(files) == len(
        list(source.glob("*.extxyz.xz"))
    )  # each file in exactly one shard, in order
    for index in range(len(the_plan["shards"])):
        main(["shard", "--plan", str(plan_file), "--index", str(index), "--out", str(shards)])
    (shards / rows_name(1)).rename(tmp_path / "aside.npz")
    with pytest.raises(PreprocessError, match=r"shards \[1\] of"):
        gather(the_plan, shards, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    (tmp_path / "aside.npz").rename(shards / rows_name(1))
    main(
        [
            "gather",
            "--plan",
            str(plan_file),
            "--shards",
            str(shards),
            "--out",
            str(tmp_path / "out"),
        ]
    )
    assert_same_dataset(tmp_path / "out", processed / "s2ef")
    assert len(json.loads((tmp_path / "out" / "metadata.json").read_text())["shards"]) >= 3


def assert_same_dataset(found: Path, expected: Path) -> None:
    """The same samples, identity and per-sample arrays (sharded alike or not)."""
    mine, theirs = json.loads((found / "metadata.json").read_text()), LmdbDataset(expected).metadata
    assert mine["content_sha256"] == theirs["content_sha256"]
    assert {k: v for k, v in mine.items() if k not in ("shards", "source")} == {
        k: v for k, v in theirs.items() if k not in ("shards", "source")
    }
    with np.load(found / "metadata.npz") as a, np.load(expected / "metadata.npz") as b:
        assert sorted(a.files) == sorted(b.files)
        for name in a.files:
            assert np.array_equal(a[name], b[name]), name
    a, b = ShardedLmdb(found), ShardedLmdb(expected)
    assert len(a) == len(b)
    for index in range(len(a)):
        x, y = a[index], b[index]
        assert x.keys() == y.keys()
        assert all(x[k].dtype == y[k].dtype and np.array_equal(x[k], y[k]) for k in x), index


def test_storage_options_are_checked(raw, tmp_path):
    source = raw / "s2ef" / "train"
    with pytest.raises(PreprocessError, match="storage must be one of graphs, on_the_fly, auto"):
        plan(source, storage="lazy")
    with pytest.raises(PreprocessError, match="graph_convention fairchem builds them from float64"):
        plan(source, storage="on_the_fly", graph_convention="fairchem")
    small = plan(source)  # auto: a small split keeps its graphs
    assert small["info"]["storage"] == "graphs"


def test_killed_preprocessing_resumes_with_finished_shards_untouched(raw, processed, tmp_path):
    """The workflow's per-shard jobs (plan checkpoint, one job per shard, gather): Snakemake killed
    (SIGKILL, with its jobs) after two shards, then rerun: the finished shards are kept as they
    were (mtimes, inodes) and the dataset equals one uninterrupted preprocessing."""
    workdir = tmp_path / "run"
    shutil.copytree(raw, workdir / "resources" / "mini")
    config = {
        "experiment": "kill",
        "dataset": {"source": "mini", "mini": TINY},
        "preprocess": {"shard_frames": 40, "store_triplets": "always"},
        "train": {},
    }
    (workdir / "config.yaml").write_text(json.dumps(config))
    target = "resources/mini/lmdb/s2ef/train"
    shards = workdir / f"{target}.shards"
    options = ["--configfile", str(workdir / "config.yaml"), "--cores", "1"]
    options += ["--rerun-triggers", "mtime"]  # the copied raw data has no Snakemake record
    command = [str(SNAKEMAKE), "--snakefile", str(SNAKEFILE), "--directory", str(workdir)]
    job = subprocess.Popen(
        [*command, *options, "--", target],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=snakemake_env(),
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 300
        while len(list(shards.glob("data.*.npz"))) < 2:  # two shards finished (rows last)
            assert job.poll() is None and time.monotonic() < deadline, "no second shard"
            time.sleep(0.05)
    finally:
        os.killpg(job.pid, signal.SIGKILL)
        job.wait()
    assert not (workdir / target).exists()
    finished = {
        path.name: (path.stat().st_mtime_ns, path.stat().st_ino)
        for rows in shards.glob("data.*.npz")
        for path in (rows, rows.with_suffix(".lmdb"))
    }
    the_plan = json.loads((shards / "plan.json").read_text())
    assert 2 <= len(finished) // 2 < len(the_plan["shards"])

    run_snakemake(workdir, "--configfile", str(workdir / "config.yaml"), "--unlock")
    run_snakemake(workdir, *options, "--rerun-incomplete", "--", target)
    for name, (mtime, inode) in finished.items():  # the shards themselves, linked
        if name.endswith(".lmdb"):
            kept = (workdir / target / name).stat()
            assert (kept.st_mtime_ns, kept.st_ino) == (mtime, inode), name
    assert not list(shards.glob("data.*"))  # temporary: removed once gathered
    assert not list(shards.glob(".*tmp-*"))  # the killed job's partial shard, cleaned up
    log = (workdir / "logs" / "preprocess_shard" / "mini" / "train").iterdir()
    assert len(list(log)) == len(the_plan["shards"])
    assert_same_dataset(workdir / target, processed / "s2ef")
