"""Preprocessing: raw S2EF / IS2RE files -> sharded LMDB graphs, and the dataset layer on top."""

from __future__ import annotations

import lzma
import pickle
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import ase.io
import lmdb
import numpy as np
import pytest
import torch
from ase.build import bulk
from conftest import bad_structure, tool_env
from torch.utils.data import DataLoader

from graphpar.data.dataset import BalancedBatchSampler, LmdbDataset, balanced_partition, collate
from graphpar.data.graph import TRIPLET_FIELDS, atoms_to_sample, edge_vectors
from graphpar.data.lmdb import iter_pyg_lmdb
from graphpar.data.mini import SPLITS, MiniConfig, generate, write_is2re_split, write_s2ef_file
from graphpar.io import CorruptFileError, count_lines, replace_directory
from graphpar.preprocess import PreprocessError, main, preprocess, read_txt

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
