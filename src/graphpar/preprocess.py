"""Preprocessing: raw structures -> periodic graphs and triplets in sharded LMDB.

Reads the data stage's raw files (config/README.md), builds each structure's radius graph and
triplets with `graphpar.data.graph` (the same code the loader and relaxations use on the fly),
and writes a directory of `data.NNNN.lmdb` shards plus `metadata.json` / `metadata.npz`.

In one call (plan, every shard by `--workers` processes, gather):

    python -m graphpar.preprocess --input resources/mini/s2ef/train \\
        --out resources/mini/lmdb/s2ef/train --ref-energy --workers 2
    python -m graphpar.preprocess --input resources/mini/is2re/val_id/data.lmdb \\
        --out resources/mini/lmdb/is2re/val_id

or step by step, as the workflow runs each S2EF split (one job per shard, on many nodes; a
killed job redoes only its shard, a rerun skips finished ones: workflow/rules/preprocess.smk):

    python -m graphpar.preprocess plan --input resources/oc20/s2ef/train_all --ref-energy \\
        --shard-frames 100000 --out resources/oc20/lmdb/s2ef/train_all.shards/plan.json
    python -m graphpar.preprocess shard --plan .../plan.json --index 7 --out .../train_all.shards
    python -m graphpar.preprocess gather --plan .../plan.json --shards .../train_all.shards \\
        --out resources/oc20/lmdb/s2ef/train_all

A plan cuts the split into shards of whole input files (S2EF; OC20's hold ~5,000 frames each) or
sample ranges (LMDB) of about `--shard-frames` frames, and fixes every setting the shards share.
Each shard and its per-sample rows (`data.NNNN.npz`) are written atomically; the gather links the
shards into the output directory and writes metadata.json (the dataset's identity, the marker of
a graphpar dataset) last. The output directory is written beside `--out` and replaces it at the
end; an existing `--out` is replaced only if it is empty or a graphpar dataset, never if it is,
holds or lies inside the input. Every structure is checked as it is read (atoms, atomic numbers
1..118, finite positions, a non-singular periodic cell); errors name the file and frame or
sample, and nothing is written.

Inputs, recognised by their contents:
- an S2EF directory of `*.extxyz[.xz]` + `*.txt[.xz]` (read with ASE; `.xz` directly): total
  energies, and with `--ref-energy` the txt file's reference is subtracted (OC20's
  `--ref-energy`: adsorption-style energies, eV);
- an OC20-style pickled-PyG LMDB file or directory of shards (IS2RE/IS2RS, S2EF test), read
  through the restricted unpickler of `graphpar.data.lmdb`: initial and relaxed positions and
  energies are kept (`pos_relaxed`, `energy_init`, `energy_relaxed`, eV).

Storage (`--storage`, recorded in metadata.json): "graphs" stores each sample's graph, its
integers narrowed to the smallest type that holds them (`graphpar.data.lmdb.narrowed`), and its
triplets when `--store-triplets always`, or `auto` and their estimated size is within
`--triplet-budget-gb`; "on_the_fly" stores the structure and labels only (float32 positions and
forces, as models see them) and the loader builds graph and triplets from them with the same
code, so both modes give the same samples bit for bit; "auto" (the default) stores no graphs
from `ON_THE_FLY_FRAMES` frames up. Both keep each sample's atoms, edges and triplets in
metadata.npz for the balanced sampler.

Graphs keep `--max-neighbors` sources per target the graphpar way (plus the sources tied with the
last one within 0.01 A) unless `--graph-convention fairchem` asks for fairchem's (`AtomsToGraphs`,
the graphs of OCP's published checkpoints: `graphpar.data.graph.GRAPH_CONVENTIONS`; built from
float64 positions, so stored); the choice is recorded in metadata.json (`graph_convention`) next
to the cutoff and max_neighbors, and evaluation refuses a checkpoint trained on (or converted
from) graphs of the other convention.
"""

from __future__ import annotations

import argparse
import io
import itertools
import math
import multiprocessing
import os
import re
import shutil
import sys
import tempfile
import traceback
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import ase.io
import numpy as np
from ase.io.extxyz import XYZError
from tqdm import tqdm

# torch and graphpar.data.graph are imported where graphs are built, not here: a gather job
# (`python -m graphpar.preprocess gather`, one per split) then starts in half a second.
from graphpar.data.lmdb import (
    STORAGE_MODES,
    LmdbFormatError,
    ShardWriter,
    UnsafePickleError,
    encode_sample,
    is_graphpar_dataset,
    iter_pyg_lmdb,
    narrowed,
    pyg_lmdb_length,
    sample_crc32,
    shard_name,
    write_metadata,
)
from graphpar.io import (
    CorruptFileError,
    atomic_directory,
    contains,
    count_lines,
    read_json,
    read_text_or_xz,
    write_json,
    write_npz,
)

# Errors that mean bad input: reported as one clear line naming the file (and sample).
INPUT_ERRORS = (LmdbFormatError, UnsafePickleError, FileNotFoundError, CorruptFileError)
# What ASE raises on a truncated or malformed extxyz frame (XYZError is an OSError; a file cut
# inside a frame's header ends ASE's frame generator with a RuntimeError).
EXTXYZ_ERRORS = (XYZError, ValueError, IndexError, KeyError, RuntimeError)
TXT_LINE = re.compile(r"^random(\d+),frame(-?\d+),(\S+)$")
# Per-sample arrays of metadata.npz: samplers balance on them without reading the shards.
# crc32: each stored sample's checksum, from which write_metadata derives the dataset's identity.
METADATA_ARRAYS = (
    "natoms",
    "num_edges",
    "num_triplets_dimenetpp",
    "num_triplets_gemnet",
    "crc32",
)
# Frames per shard (about): a shard is one workflow job, here a few minutes of one core on
# OC20's ~73-atom frames (bench/preprocess.py); S2EF-All is then ~1,340 jobs.
SHARD_FRAMES = 100_000
# Storage "auto" keeps no graphs from this many frames up (OC20's S2EF 2M, 20M, All, MD): their
# stored graphs would take terabytes (config/README.md, "Preprocessing at OC20 scale").
ON_THE_FLY_FRAMES = 2_000_000


class PreprocessError(RuntimeError):
    """Bad input, named in the message; nothing is written."""


@dataclass(frozen=True)
class Options:
    cutoff: float = 6.0  # A
    max_neighbors: int | None = 50
    ref_energy: bool = False
    store_triplets: bool = True
    graph_convention: str = "graphpar"  # graphpar.data.graph.GRAPH_CONVENTIONS
    storage: str = "graphs"  # graphpar.data.dataset.STORAGE_MODES


def natural_key(path: Path) -> list:
    """Sort key: "2.extxyz.xz" before "10.extxyz.xz"."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path.name)]


# ---- reading inputs ------------------------------------------------------------------------


def s2ef_file_pairs(directory: Path) -> list[tuple[Path, Path]]:
    """(extxyz, txt) pairs of an S2EF directory, in numeric file order."""
    pairs = []
    for xyz in sorted(directory.iterdir(), key=natural_key):
        if xyz.name.endswith((".extxyz", ".extxyz.xz")):
            txt = xyz.with_name(xyz.name.replace(".extxyz", ".txt"))
            if not txt.exists():
                raise PreprocessError(f"{xyz}: no matching {txt.name}")
            pairs.append((xyz, txt))
    return pairs


def read_txt(path: Path) -> list[tuple[int, int, float]]:
    """(sid, fid, reference energy eV) per line of an OC20 S2EF txt file."""
    rows = []
    for number, line in enumerate(read_text_or_xz(path).splitlines(), start=1):
        match = TXT_LINE.match(line.strip())
        if not match:
            raise PreprocessError(f"{path}:{number}: not 'random<sid>,frame<fid>,<energy>'")
        rows.append((int(match[1]), int(match[2]), float(match[3])))
    return rows


def read_extxyz(xyz: Path) -> list:
    """Every frame (ase.Atoms) of an extxyz file; PreprocessError naming the file and the first
    frame (0-based) that cannot be read, CorruptFileError for a corrupt `.xz` stream."""
    # Decompress once into memory: ASE seeks between frames, and every seek in an xz stream
    # decompresses from the start (quadratic; 60x slower on a 1000-frame file).
    text = io.StringIO(read_text_or_xz(xyz))
    frames = []
    try:
        for atoms in ase.io.iread(text, index=":", format="extxyz"):
            frames.append(atoms)
    except EXTXYZ_ERRORS as error:
        raise PreprocessError(
            f"{xyz}: frame {len(frames)}: cannot read (truncated or malformed?): {error}"
        ) from error
    return frames


def checked(atoms, where: str):
    """`atoms` if a graph can be built for it (`check_structure`), else PreprocessError naming
    `where` (the file and frame or sample)."""
    from graphpar.data.graph import StructureError, check_structure

    try:
        check_structure(atoms)
    except StructureError as error:
        raise PreprocessError(f"{where}: {error}") from error
    return atoms


def read_s2ef_pair(xyz: Path, txt: Path) -> Iterator[tuple[object, dict]]:
    """(ase.Atoms, labels) for every frame of one extxyz file and its txt file."""
    rows = read_txt(txt)
    frames = read_extxyz(xyz)
    if len(frames) != len(rows):
        raise PreprocessError(
            f"{xyz} has {len(frames)} frames but {txt.name} has {len(rows)} lines; "
            "they must match one to one"
        )
    for index, (atoms, (sid, fid, reference)) in enumerate(zip(frames, rows, strict=True)):
        where = f"{xyz}: frame {index} (sid {sid}, fid {fid})"
        yield checked(atoms, where), {"sid": sid, "fid": fid, "reference_energy": reference}


# ---- structures -> samples ------------------------------------------------------------------

# Structures whose graphs are built in one call (`attach_graphs`): 1.5x faster per structure
# than one call each on OC20-size slabs (bench/preprocess.py), the same graphs.
GRAPH_CHUNK = 8


def build_samples(structures: list[tuple[object, dict]], options: Options) -> list[tuple]:
    """(ase.Atoms, labels) each -> (fields to store, per-sample metadata row) each."""
    import torch

    from graphpar.data.graph import (
        atoms_to_sample,
        attach_graphs,
        attach_triplets,
        float64_structure,
        triplet_counts,
    )

    samples = [atoms_to_sample(atoms, graph=False) for atoms, _ in structures]
    fairchem = options.graph_convention == "fairchem"
    exact = [float64_structure(atoms) for atoms, _ in structures] if fairchem else None
    attach_graphs(samples, options.cutoff, options.max_neighbors, options.graph_convention, exact)
    built = []
    for sample, (atoms, labels) in zip(samples, structures, strict=True):
        num_edges = sample.edge_index.shape[1]
        if options.store_triplets:
            attach_triplets(sample)
            counts = len(sample.idx_kj), len(sample.id3_ba)
        else:  # counted without building them: the loader builds them when a model needs them
            dimenet, gemnet = triplet_counts(
                sample.edge_index, sample.cell_offsets, len(atoms), torch.tensor([num_edges])
            )
            counts = int(dimenet[0]), int(gemnet[0])
        fields = {key: value.numpy() if hasattr(value, "numpy") else value for key, value in sample}
        if options.storage == "on_the_fly":  # the graph is built for its counts only
            del fields["edge_index"], fields["cell_offsets"]
        labels = dict(labels)
        reference = labels.pop("reference_energy", None)
        if options.ref_energy and "energy" in fields:
            if reference is None:
                raise PreprocessError("--ref-energy needs reference energies (S2EF txt files)")
            fields["energy"] = fields["energy"] - reference
        fields.update(labels)
        row = {
            "natoms": len(atoms),
            "num_edges": num_edges,
            "num_triplets_dimenetpp": counts[0],
            "num_triplets_gemnet": counts[1],
        }
        built.append((fields, row))
    return built


def pyg_to_atoms(attributes: dict):
    """An OC20 pickled-PyG sample -> (ase.Atoms at its initial positions, labels to store)."""
    from ase import Atoms
    from ase.constraints import FixAtoms

    def array(name, dtype):
        return np.asarray(
            attributes[name].numpy() if hasattr(attributes[name], "numpy") else attributes[name],
            dtype=dtype,
        )

    atoms = Atoms(
        numbers=array("atomic_numbers", np.int64),
        positions=array("pos", np.float64),
        cell=array("cell", np.float64).reshape(3, 3),
        pbc=True,  # OC20 structures are periodic in all three directions
    )
    if "tags" in attributes:
        atoms.set_tags(array("tags", np.int64))
    if "fixed" in attributes:
        atoms.set_constraint(FixAtoms(mask=array("fixed", np.float64) > 0))
    labels = {}
    for ours, theirs, dtype in (
        ("sid", "sid", np.int64),
        ("fid", "fid", np.int64),
        ("energy", "y", np.float64),
        ("forces", "force", np.float32),
        ("pos_relaxed", "pos_relaxed", np.float32),
        ("energy_init", "y_init", np.float64),
        ("energy_relaxed", "y_relaxed", np.float64),
    ):
        if attributes.get(theirs) is not None:
            labels[ours] = array(theirs, dtype)
    return atoms, labels


# ---- the plan: a split cut into shards -------------------------------------------------------


def _shard_bounds(weights: list[int], shards: int) -> list[int]:
    """Bounds cutting consecutive items of `weights` (frames per item) into `shards` runs of
    near-equal total weight, each run non-empty."""
    cumulative = np.cumsum([0, *weights])
    targets = np.linspace(0, cumulative[-1], shards + 1)[1:-1]
    inner = np.searchsorted(cumulative, targets, side="left")
    bounds = [0]
    for shard, bound in enumerate(inner, start=1):  # keep every run non-empty
        lowest, highest = bounds[-1] + 1, len(weights) - (shards - shard)
        bounds.append(int(min(max(bound, lowest), highest)))
    return [*bounds, len(weights)]


def _cut(source: Path, shard_frames: int, min_shards: int) -> tuple[str, list[dict], int]:
    """(input format "s2ef" or "lmdb", shards as {"items", "frames"}, total frames) of `source`:
    about `shard_frames` frames per shard and at least `min_shards` shards where the input has
    that many files (S2EF) or samples (LMDB)."""
    if source.is_dir() and any(
        p.name.endswith((".extxyz", ".extxyz.xz")) for p in source.iterdir()
    ):
        pairs = s2ef_file_pairs(source)
        frames = [count_lines(txt) for _, txt in pairs]
        total = sum(frames)
        # Whole files per shard (OC20's hold ~5,000 frames each), in consecutive runs: the
        # shards, read in order, hold the frames in file order whatever the number of shards.
        count = max(1, min(len(pairs), max(min_shards, round(total / shard_frames))))
        bounds = _shard_bounds(frames, count)
        shards = [
            {"items": [[str(x), str(t)] for x, t in pairs[a:b]], "frames": sum(frames[a:b])}
            for a, b in zip(bounds[:-1], bounds[1:], strict=True)
        ]
        return "s2ef", shards, total
    if source.suffix == ".lmdb" or (source.is_dir() and any(source.glob("*.lmdb"))):
        total = pyg_lmdb_length(source)
        count = max(1, min(total, max(min_shards, math.ceil(total / shard_frames))))
        bounds = np.linspace(0, total, count + 1).astype(int).tolist()
        shards = [
            {"items": [[str(source), a, b]], "frames": b - a}
            for a, b in zip(bounds[:-1], bounds[1:], strict=True)
        ]
        return "lmdb", shards, total
    raise PreprocessError(
        f"{source}: neither an S2EF directory (*.extxyz[.xz] + *.txt[.xz]) nor an LMDB"
    )


def read_items(input_format: str, items: list) -> Iterator[tuple[object, dict]]:
    """(ase.Atoms, labels) for every structure of a shard's items."""
    for item in items:
        if input_format == "s2ef":
            yield from read_s2ef_pair(Path(item[0]), Path(item[1]))
        else:
            path, start, stop = item
            for index, attributes in iter_pyg_lmdb(Path(path), start, stop):
                atoms, labels = pyg_to_atoms(attributes)
                yield checked(atoms, f"{path}: sample {index}"), labels


def energy_reference(input_format: str, items: list, ref_energy: bool) -> str | None:
    """What the stored energies are: "adsorption" (relative to OC20's gas-phase references:
    S2EF with --ref-energy, or IS2RE labels, which OC20 stores as adsorption energies),
    "total" (S2EF as the DFT gave them), or None when the input does not say (an S2EF LMDB)."""
    if input_format == "s2ef":
        return "adsorption" if ref_energy else "total"
    for _, labels in read_items(input_format, items):
        return "adsorption" if "energy_relaxed" in labels else None
    return None


def triplet_bytes(input_format: str, items: list, options: Options) -> int:
    """Stored size of the triplet fields of the first structure (for the `auto` budget)."""
    from graphpar.data.graph import TRIPLET_FIELDS

    for structure in read_items(input_format, items):
        [(fields, _)] = build_samples([structure], options)
        return sum(fields[name].nbytes for names in TRIPLET_FIELDS.values() for name in names)
    return 0


def plan(
    source: str | Path,
    *,
    shard_frames: int = SHARD_FRAMES,
    min_shards: int = 1,
    cutoff: float = 6.0,
    max_neighbors: int | None = 50,
    ref_energy: bool = False,
    storage: str = "auto",
    store_triplets: str = "auto",
    triplet_budget_gb: float = 0.5,
    graph_convention: str = "graphpar",
) -> dict:
    """How to preprocess `source` (S2EF directory or pickled-PyG LMDB): a JSON-able dict of the
    settings every shard uses ("options"), the dataset's metadata.json entries ("info"), and the
    shards, each a run of whole input files (S2EF) or of samples (LMDB) of about `shard_frames`
    frames; at least `min_shards` where the input allows.

    Decides what "auto" means for this split: `storage` on_the_fly from `ON_THE_FLY_FRAMES`
    frames up (graphs under convention fairchem, whose graphs need float64 positions), and
    `store_triplets` whether their estimated size fits `triplet_budget_gb`. Raises
    PreprocessError for bad options or an unreadable input.
    """
    from graphpar.data.graph import GRAPH_CONVENTIONS

    source = Path(source)
    if not source.exists():
        raise PreprocessError(f"input {source} does not exist")
    choices = {
        "storage": (storage, (*STORAGE_MODES, "auto")),
        "store_triplets": (store_triplets, ("auto", "always", "never")),
        "graph_convention": (graph_convention, GRAPH_CONVENTIONS),
    }
    for name, (value, allowed) in choices.items():
        if value not in allowed:
            raise PreprocessError(f"{name} must be one of {', '.join(allowed)}, not {value!r}")
    if storage == "on_the_fly" and graph_convention == "fairchem":
        raise PreprocessError(
            "storage on_the_fly builds graphs from the stored float32 positions; graph_convention "
            "fairchem builds them from float64 ones: store the graphs (storage graphs)"
        )
    if shard_frames < 1 or min_shards < 1:
        raise PreprocessError("shard_frames and min_shards must be at least 1")
    try:
        input_format, shards, total = _cut(source, shard_frames, min_shards)
        first = shards[0]["items"]
        if storage == "auto":
            large = total >= ON_THE_FLY_FRAMES and graph_convention == "graphpar"
            storage = "on_the_fly" if large else "graphs"
        store = storage == "graphs" and store_triplets != "never"
        options = Options(cutoff, max_neighbors, ref_energy, store, graph_convention, storage)
        if store and store_triplets == "auto" and total:
            estimate = total * triplet_bytes(input_format, first, options)
            options = replace(options, store_triplets=estimate <= triplet_budget_gb * 2**30)
        reference = energy_reference(input_format, first, ref_energy)
    except INPUT_ERRORS as error:
        raise PreprocessError(str(error)) from error
    return {
        "input_format": input_format,
        "total": total,
        "options": asdict(options),
        "info": {
            "source": str(source),
            "input_format": input_format,
            "cutoff": cutoff,
            "max_neighbors": max_neighbors,
            "graph_convention": graph_convention,
            "ref_energy": ref_energy,
            "energy_reference": reference,
            "storage": storage,
            "triplets_stored": options.store_triplets,
        },
        "shards": shards,
    }


def read_plan(path: str | Path) -> dict:
    """A plan written by `python -m graphpar.preprocess plan`; PreprocessError if unreadable."""
    try:
        found = read_json(path)
        if not isinstance(found, dict) or not {"options", "info", "shards"} <= set(found):
            raise ValueError("not a preprocessing plan (options, info, shards)")
        Options(**found["options"])
    except (OSError, ValueError, TypeError) as error:
        raise PreprocessError(f"{path}: cannot read the plan: {error}") from error
    return found


# ---- shards --------------------------------------------------------------------------------


def rows_name(index: int) -> str:
    """File name of shard `index`'s per-sample rows (`METADATA_ARRAYS`) beside the shard."""
    return shard_name(index).removesuffix(".lmdb") + ".npz"


def write_shard(the_plan: dict, index: int, directory: Path, progress=None) -> None:
    """Shard `index` of `the_plan` into `directory`: `shard_name(index)` and its rows
    (`rows_name`), each written atomically, the rows last: a shard whose rows exist is finished.
    Removes what a killed writer of this shard left. `progress(n)` is called per structure."""
    options = Options(**the_plan["options"])
    items = the_plan["shards"][index]["items"]
    for name in (shard_name(index), rows_name(index)):  # a killed job's (only one job writes it)
        for leftover in directory.glob(f".{name}.tmp-*"):
            leftover.unlink()
    rows = {name: [] for name in METADATA_ARRAYS}
    structures = read_items(the_plan["input_format"], items)
    with ShardWriter(directory / shard_name(index)) as writer:
        while chunk := list(itertools.islice(structures, GRAPH_CHUNK)):
            for fields, row in build_samples(chunk, options):
                blob = encode_sample(narrowed(fields))
                writer.append_encoded(blob)
                row["crc32"] = sample_crc32(blob)
                for name, value in row.items():
                    rows[name].append(value)
            if progress is not None:
                progress(len(chunk))
    write_npz(directory / rows_name(index), **{k: np.asarray(v, np.int64) for k, v in rows.items()})


def missing_shards(the_plan: dict, directory: Path) -> list[int]:
    """Shards of `the_plan` not (completely) written in `directory`."""
    return [
        index
        for index in range(len(the_plan["shards"]))
        if not (directory / rows_name(index)).is_file()
        or not (directory / shard_name(index)).is_file()
    ]


def gather(the_plan: dict, shards: Path, out: Path) -> dict:
    """The dataset directory `out` from the finished shards in `shards`: the shard files linked
    (or copied, across file systems) into it, metadata.json (the plan's info, the dataset's
    identity, the marker of a graphpar dataset) and metadata.npz (the shards' rows in order),
    written atomically. Returns the metadata; PreprocessError naming missing shards."""
    if missing := missing_shards(the_plan, shards):
        raise PreprocessError(
            f"{shards}: shards {missing} of {len(the_plan['shards'])} are not finished; "
            "preprocess them before gathering"
        )
    source = Path(the_plan["info"]["source"])
    check_output(source, out)
    with atomic_directory(out, keep=[source]) as tmp:
        parts = []
        for index in range(len(the_plan["shards"])):
            name = shard_name(index)
            try:
                os.link(shards / name, tmp / name)
            except OSError:  # another file system, or no hard links
                shutil.copy2(shards / name, tmp / name)
            with np.load(shards / rows_name(index), allow_pickle=False) as npz:
                parts.append({name: npz[name] for name in METADATA_ARRAYS})
        arrays = {name: np.concatenate([p[name] for p in parts]) for name in METADATA_ARRAYS}
        metadata = write_metadata(tmp, the_plan["info"], arrays)
    return metadata


class Inline:
    """Stands in for a worker's message queue when the worker runs in this process."""

    def __init__(self, receive):
        self.receive = receive

    def put(self, message: tuple) -> None:
        self.receive(*message)


def _worker(rank: int, the_plan: dict, indices: list[int], directory: Path, messages) -> None:
    """Write shards `indices` of `the_plan`; report progress, then "done" or the error."""
    import torch

    torch.set_num_threads(1)  # one process per core
    try:
        for index in indices:
            write_shard(the_plan, index, directory, lambda n: messages.put(("progress", rank, n)))
        messages.put(("done", rank, None))
    except (PreprocessError, *INPUT_ERRORS) as error:
        messages.put(("error", rank, str(error)))
    except Exception as error:  # noqa: BLE001 - any failure must reach the parent, with context
        messages.put(("error", rank, f"{type(error).__name__}: {error}\n{traceback.format_exc()}"))


def write_shards(the_plan: dict, directory: Path, workers: int, receive) -> None:
    """Every shard of `the_plan` into `directory`, by up to `workers` processes (shard k by
    worker k mod workers); relays their messages to `receive(message, rank, payload)`."""
    count = len(the_plan["shards"])
    workers = max(1, min(workers, count))
    assignments = [list(range(rank, count, workers)) for rank in range(workers)]
    if workers == 1:  # run it here, no process to start
        _worker(0, the_plan, assignments[0], directory, Inline(receive))
        return
    # fork, like torch's DataLoader workers: a spawned worker spends seconds importing torch.
    context = multiprocessing.get_context("fork")
    messages = context.Queue()
    processes = [
        context.Process(
            target=_worker, args=(rank, the_plan, indices, directory, messages), daemon=True
        )
        for rank, indices in enumerate(assignments)
    ]
    for process in processes:
        process.start()
    finished = 0
    try:
        while finished < len(processes):
            message = messages.get()
            receive(*message)
            finished += message[0] == "done"
    finally:
        for process in processes:
            if finished < len(processes):
                process.terminate()
            process.join()


def check_output(source: Path, out: Path) -> None:
    """Refuse (PreprocessError) an output directory whose replacement would lose data: the
    input itself, one that holds the input or lies inside it, or an existing non-empty
    directory (or a file) that is not a graphpar dataset."""
    if contains(out, source) or contains(source, out):
        raise PreprocessError(
            f"output {out} overlaps input {source}: the output directory is replaced, so it must "
            "lie outside the input and not hold it"
        )
    if out.exists() and not is_graphpar_dataset(out) and (not out.is_dir() or any(out.iterdir())):
        raise PreprocessError(
            f"output {out} exists and is not a graphpar dataset (no graphpar metadata.json); "
            f"refusing to replace it with the preprocessed {source}: remove it or choose another"
        )


def _progress_bar(total: int, name: str, enabled: bool):
    return tqdm(
        total=total,
        desc=f"preprocess {name}",
        unit="structure",
        mininterval=2.0,
        disable=not enabled,
    )


def preprocess(
    source: str | Path,
    out: str | Path,
    *,
    workers: int = 1,
    shard_frames: int = SHARD_FRAMES,
    progress: bool = True,
    **settings,
) -> dict:
    """Preprocess `source` (S2EF directory or pickled-PyG LMDB) into the dataset directory `out`
    in one call: `plan` (with `settings`: cutoff, max_neighbors, ref_energy, storage,
    store_triplets, triplet_budget_gb, graph_convention; at least `workers` shards), the shards
    by `workers` processes, then `gather`. The workflow runs the same three steps as separate
    jobs (workflow/rules/preprocess.smk).

    Returns the metadata written to `out/metadata.json`. Raises PreprocessError naming the bad
    file (and sample) when an input is corrupt or inconsistent, or when `out` may not be
    replaced (`check_output`); `out` is then left untouched.
    """
    source, out = Path(source), Path(out)
    if not source.exists():
        raise PreprocessError(f"input {source} does not exist")
    check_output(source, out)
    the_plan = plan(source, shard_frames=shard_frames, min_shards=workers, **settings)

    def receive(message: str, rank: int, payload) -> None:
        if message == "progress":
            bar.update(payload)
        elif message == "error":
            raise PreprocessError(payload)

    with _progress_bar(the_plan["total"], source.name, progress) as bar:
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=f".{out.name}.shards-", dir=out.parent) as tmp:
            write_shards(the_plan, Path(tmp), workers, receive)
            return gather(the_plan, Path(tmp), out)


# ---- command line ----------------------------------------------------------------------------


def _add_settings(parser: argparse.ArgumentParser) -> None:
    """The options of a split's plan (`plan`'s arguments)."""
    from graphpar.data.graph import GRAPH_CONVENTIONS

    parser.add_argument("--input", required=True, type=Path, help="raw split directory or LMDB")
    parser.add_argument("--cutoff", type=float, default=6.0, help="radius, A (default 6)")
    parser.add_argument("--max-neighbors", type=int, default=50, help="per target (default 50)")
    parser.add_argument(
        "--ref-energy", action="store_true", help="subtract the txt reference energies (S2EF)"
    )
    parser.add_argument(
        "--storage",
        choices=[*STORAGE_MODES, "auto"],
        default="auto",
        help="graphs: store each sample's graph; on_the_fly: store the structure and labels, "
        f"the loader builds the graph; auto (default): on_the_fly from {ON_THE_FLY_FRAMES:,} "
        "frames up",
    )
    parser.add_argument(
        "--store-triplets",
        choices=["auto", "always", "never"],
        default="auto",
        help="with stored graphs, store triplet indices too (auto: when within "
        "--triplet-budget-gb)",
    )
    parser.add_argument("--triplet-budget-gb", type=float, default=0.5, help="default 0.5")
    parser.add_argument(
        "--graph-convention",
        choices=GRAPH_CONVENTIONS,
        default="graphpar",
        help="how --max-neighbors caps a target: graphpar (the nearest plus the shell tied within "
        "0.01 A) or fairchem (fairchem's AtomsToGraphs, for OCP's published checkpoints)",
    )
    parser.add_argument(
        "--shard-frames",
        type=int,
        default=SHARD_FRAMES,
        help=f"frames per shard, about (default {SHARD_FRAMES:,}; S2EF shards hold whole files)",
    )


def _settings(args: argparse.Namespace) -> dict:
    return {
        "cutoff": args.cutoff,
        "max_neighbors": args.max_neighbors,
        "ref_energy": args.ref_energy,
        "storage": args.storage,
        "store_triplets": args.store_triplets,
        "triplet_budget_gb": args.triplet_budget_gb,
        "graph_convention": args.graph_convention,
    }


def _run_plan(argv: list[str]) -> str:
    parser = argparse.ArgumentParser(
        prog="python -m graphpar.preprocess plan",
        description="Cut a split into shards and decide its settings; write the plan (JSON).",
    )
    _add_settings(parser)
    parser.add_argument("--out", required=True, type=Path, help="plan file to write (JSON)")
    args = parser.parse_args(argv)
    the_plan = plan(args.input, shard_frames=args.shard_frames, **_settings(args))
    write_json(args.out, the_plan)
    info = the_plan["info"]
    return (
        f"{args.out}: {the_plan['total']} structures in {len(the_plan['shards'])} shard(s), "
        f"storage {info['storage']}, triplets {'stored' if info['triplets_stored'] else 'not'}"
    )


def _run_shard(argv: list[str]) -> str:
    parser = argparse.ArgumentParser(
        prog="python -m graphpar.preprocess shard",
        description="Write one shard of a plan (data.NNNN.lmdb and its rows data.NNNN.npz).",
    )
    parser.add_argument("--plan", required=True, type=Path, help="plan file (JSON)")
    parser.add_argument("--index", required=True, type=int, help="shard number, from 0")
    parser.add_argument("--out", required=True, type=Path, help="directory of the shards")
    args = parser.parse_args(argv)
    the_plan = read_plan(args.plan)
    if not 0 <= args.index < len(the_plan["shards"]):
        raise PreprocessError(f"{args.plan} has shards 0..{len(the_plan['shards']) - 1}")
    shard = the_plan["shards"][args.index]
    with _progress_bar(shard["frames"], f"shard {args.index}", True) as bar:
        try:
            write_shard(the_plan, args.index, args.out, bar.update)
        except INPUT_ERRORS as error:
            raise PreprocessError(str(error)) from error
    return f"{args.out / shard_name(args.index)}: {shard['frames']} structures"


def _run_gather(argv: list[str]) -> str:
    parser = argparse.ArgumentParser(
        prog="python -m graphpar.preprocess gather",
        description="Assemble a plan's finished shards into the dataset directory, with its "
        "metadata.json and metadata.npz.",
    )
    parser.add_argument("--plan", required=True, type=Path, help="plan file (JSON)")
    parser.add_argument("--shards", required=True, type=Path, help="directory of the shards")
    parser.add_argument("--out", required=True, type=Path, help="dataset directory to write")
    args = parser.parse_args(argv)
    metadata = gather(read_plan(args.plan), args.shards, args.out)
    return _summary(args.out, metadata)


def _summary(out: Path, metadata: dict) -> str:
    if metadata["storage"] == "on_the_fly":
        kept = "graphs built by the loader"
    else:
        kept = f"triplets {'stored' if metadata['triplets_stored'] else 'built by the loader'}"
    return f"{out}: {metadata['length']} structures in {len(metadata['shards'])} shard(s), {kept}"


def _run_all(argv: list[str]) -> str:
    parser = argparse.ArgumentParser(
        prog="python -m graphpar.preprocess",
        description=(
            "Build periodic radius graphs and triplets for an S2EF directory (*.extxyz[.xz] + "
            "*.txt[.xz]) or an OC20-style pickled LMDB (IS2RE/IS2RS, S2EF test), and write them "
            "as data.NNNN.lmdb shards plus metadata.json/.npz. The steps one by one, as the "
            "workflow's jobs run them: `python -m graphpar.preprocess plan|shard|gather --help`."
        ),
    )
    _add_settings(parser)
    parser.add_argument("--out", required=True, type=Path, help="output directory")
    parser.add_argument("--workers", type=int, default=1, help="worker processes (default 1)")
    args = parser.parse_args(argv)
    metadata = preprocess(
        args.input,
        args.out,
        workers=args.workers,
        shard_frames=args.shard_frames,
        **_settings(args),
    )
    return _summary(args.out, metadata)


STEPS = {"plan": _run_plan, "shard": _run_shard, "gather": _run_gather}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    step = STEPS.get(argv[0], _run_all) if argv else _run_all
    try:
        print(step(argv[1:] if step is not _run_all else argv))
    except PreprocessError as error:
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    main()
