"""Preprocessing: raw structures -> periodic graphs and triplets in sharded LMDB.

Reads the data stage's raw files (config/README.md), builds each structure's radius graph and
triplets with `graphpar.data.graph` (the same code relaxations use on the fly), and writes a
directory of `data.NNNN.lmdb` shards (one per worker) plus `metadata.json` / `metadata.npz`:

    python -m graphpar.preprocess --input resources/mini/s2ef/train \\
        --out resources/mini/lmdb/s2ef/train --ref-energy --workers 2
    python -m graphpar.preprocess --input resources/mini/is2re/val_id/data.lmdb \\
        --out resources/mini/lmdb/is2re/val_id

The output directory is written beside `--out` and replaces it at the end; an existing `--out`
is replaced only if it is empty or a graphpar dataset, never if it is, holds or lies inside the
input. Every structure is checked as it is read (atoms, atomic numbers 1..118, finite positions,
a non-singular periodic cell); errors name the file and frame or sample, and nothing is written.

Inputs, recognised by their contents:
- an S2EF directory of `*.extxyz[.xz]` + `*.txt[.xz]` (read with ASE; `.xz` directly): total
  energies, and with `--ref-energy` the txt file's reference is subtracted (OC20's
  `--ref-energy`: adsorption-style energies, eV);
- an OC20-style pickled-PyG LMDB file or directory of shards (IS2RE/IS2RS, S2EF test), read
  through the restricted unpickler of `graphpar.data.lmdb`: initial and relaxed positions and
  energies are kept (`pos_relaxed`, `energy_init`, `energy_relaxed`, eV).

Graphs keep `--max-neighbors` sources per target the graphpar way (plus the sources tied with the
last one within 0.01 A) unless `--graph-convention fairchem` asks for fairchem's (`AtomsToGraphs`,
the graphs of OCP's published checkpoints: `graphpar.data.graph.GRAPH_CONVENTIONS`); the choice is
recorded in metadata.json (`graph_convention`) next to the cutoff and max_neighbors, and evaluation
refuses a checkpoint trained on (or converted from) graphs of the other convention.

Triplet indices are stored when `--store-triplets always`, or `auto` and their estimated size is
within `--triplet-budget-gb`; otherwise only their counts are, and DataLoader workers build them
from the stored edges (docs/architecture.md section 4).
"""

from __future__ import annotations

import argparse
import io
import multiprocessing
import re
import sys
import traceback
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import ase.io
import numpy as np
import torch
from ase.io.extxyz import XYZError
from tqdm import tqdm

from graphpar.data.graph import (
    GRAPH_CONVENTIONS,
    TRIPLET_FIELDS,
    StructureError,
    atoms_to_sample,
    check_structure,
    triplet_counts,
)
from graphpar.data.lmdb import (
    LmdbFormatError,
    ShardWriter,
    UnsafePickleError,
    encode_sample,
    is_graphpar_dataset,
    iter_pyg_lmdb,
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
    read_text_or_xz,
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


class PreprocessError(RuntimeError):
    """Bad input, named in the message; nothing is written."""


@dataclass(frozen=True)
class Options:
    cutoff: float = 6.0  # A
    max_neighbors: int | None = 50
    ref_energy: bool = False
    store_triplets: bool = True
    graph_convention: str = "graphpar"  # graphpar.data.graph.GRAPH_CONVENTIONS


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


# ---- one structure --------------------------------------------------------------------------


def build_sample(atoms, labels: dict, options: Options) -> tuple[dict, dict]:
    """One structure -> (fields to store, per-sample metadata row)."""
    sample = atoms_to_sample(
        atoms,
        cutoff=options.cutoff,
        max_neighbors=options.max_neighbors,
        triplets=options.store_triplets,
        convention=options.graph_convention,
    )
    fields = {key: value.numpy() if hasattr(value, "numpy") else value for key, value in sample}
    reference = labels.pop("reference_energy", None)
    if options.ref_energy and "energy" in fields:
        if reference is None:
            raise PreprocessError("--ref-energy needs reference energies (S2EF txt files)")
        fields["energy"] = fields["energy"] - reference
    fields.update(labels)

    if options.store_triplets:
        counts = len(sample.idx_kj), len(sample.id3_ba)
    else:  # counted without building them: the loader builds them when a model needs them
        num_edges = torch.tensor([sample.edge_index.shape[1]])
        dimenet, gemnet = triplet_counts(
            sample.edge_index, sample.cell_offsets, len(atoms), num_edges
        )
        counts = int(dimenet[0]), int(gemnet[0])
    row = {
        "natoms": len(atoms),
        "num_edges": sample.edge_index.shape[1],
        "num_triplets_dimenetpp": counts[0],
        "num_triplets_gemnet": counts[1],
    }
    return fields, row


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


# ---- planning and workers -------------------------------------------------------------------


def plan(source: Path, workers: int) -> tuple[str, list[list], int]:
    """(input format: "s2ef" or "lmdb", work items per worker, total samples) for `source`."""
    if source.is_dir() and any(
        p.name.endswith((".extxyz", ".extxyz.xz")) for p in source.iterdir()
    ):
        pairs = s2ef_file_pairs(source)
        total = sum(count_lines(txt) for _, txt in pairs)
        workers = max(1, min(workers, len(pairs)))
        # Whole files per worker (OC20's hold ~5000 frames each), in consecutive runs: the
        # shards, read in order, hold the frames in file order whatever the number of workers,
        # so a machine with more cores builds the same dataset, sample for sample.
        bounds = np.linspace(0, len(pairs), workers + 1).astype(int)
        return "s2ef", [pairs[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)], total
    if source.suffix == ".lmdb" or (source.is_dir() and any(source.glob("*.lmdb"))):
        total = pyg_lmdb_length(source)
        workers = max(1, min(workers, total))
        bounds = np.linspace(0, total, workers + 1).astype(int)
        return (
            "lmdb",
            [[(source, int(a), int(b))] for a, b in zip(bounds[:-1], bounds[1:], strict=True)],
            total,
        )
    raise PreprocessError(
        f"{source}: neither an S2EF directory (*.extxyz[.xz] + *.txt[.xz]) nor an LMDB"
    )


def read_items(input_format: str, items: list) -> Iterator[tuple[object, dict]]:
    """(ase.Atoms, labels) for every structure of a worker's items."""
    for item in items:
        if input_format == "s2ef":
            yield from read_s2ef_pair(*item)
        else:
            path, start, stop = item
            for index, attributes in iter_pyg_lmdb(path, start, stop):
                atoms, labels = pyg_to_atoms(attributes)
                yield checked(atoms, f"{path}: sample {index}"), labels


def _worker(
    rank: int, input_format: str, items: list, shard: Path, options: Options, messages
) -> None:
    """Process one worker's items into one shard; report progress and per-sample sizes."""
    torch.set_num_threads(1)  # one process per core
    try:
        rows = {name: [] for name in METADATA_ARRAYS}
        with ShardWriter(shard) as writer:
            for atoms, labels in read_items(input_format, items):
                fields, row = build_sample(atoms, labels, options)
                blob = encode_sample(fields)
                writer.append_encoded(blob)
                row["crc32"] = sample_crc32(blob)
                for name, value in row.items():
                    rows[name].append(value)
                messages.put(("progress", rank, 1))
        messages.put(("done", rank, {k: np.asarray(v, dtype=np.int64) for k, v in rows.items()}))
    except (PreprocessError, *INPUT_ERRORS) as error:
        messages.put(("error", rank, str(error)))
    except Exception as error:  # noqa: BLE001 - any failure must reach the parent, with context
        messages.put(("error", rank, f"{type(error).__name__}: {error}\n{traceback.format_exc()}"))


class Inline:
    """Stands in for a worker's message queue when the worker runs in this process."""

    def __init__(self, receive):
        self.receive = receive

    def put(self, message: tuple) -> None:
        self.receive(*message)


def _run_workers(input_format: str, work: list[list], tmp: Path, options: Options, receive) -> None:
    """One process per work list, each writing its own shard; relays their messages."""
    # fork, like torch's DataLoader workers: a spawned worker spends seconds importing torch.
    context = multiprocessing.get_context("fork")
    messages = context.Queue()
    processes = [
        context.Process(
            target=_worker,
            args=(rank, input_format, items, tmp / shard_name(rank), options, messages),
            daemon=True,
        )
        for rank, items in enumerate(work)
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


def energy_reference(input_format: str, items: list[list], ref_energy: bool) -> str | None:
    """What the stored energies are: "adsorption" (relative to OC20's gas-phase references:
    S2EF with --ref-energy, or IS2RE labels, which OC20 stores as adsorption energies),
    "total" (S2EF as the DFT gave them), or None when the input does not say (an S2EF LMDB)."""
    if input_format == "s2ef":
        return "adsorption" if ref_energy else "total"
    for _, labels in read_items(input_format, items[0]):
        return "adsorption" if "energy_relaxed" in labels else None
    return None


def triplet_bytes(input_format: str, items: list[list], options: Options) -> int:
    """Stored size of the triplet fields of the first structure (for the `auto` budget)."""
    for atoms, labels in read_items(input_format, items[0]):
        fields, _ = build_sample(atoms, labels, options)
        return sum(fields[name].nbytes for names in TRIPLET_FIELDS.values() for name in names)
    return 0


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


def preprocess(
    source: str | Path,
    out: str | Path,
    *,
    workers: int = 1,
    cutoff: float = 6.0,
    max_neighbors: int | None = 50,
    ref_energy: bool = False,
    store_triplets: str = "auto",
    triplet_budget_gb: float = 0.5,
    graph_convention: str = "graphpar",
    progress: bool = True,
) -> dict:
    """Preprocess `source` (S2EF directory or pickled-PyG LMDB) into the shard directory `out`.

    Returns the metadata written to `out/metadata.json`. Raises PreprocessError naming the bad
    file (and sample) when an input is corrupt or inconsistent, or when `out` may not be
    replaced (`check_output`); `out` is then left untouched.
    """
    source, out = Path(source), Path(out)
    if not source.exists():
        raise PreprocessError(f"input {source} does not exist")
    check_output(source, out)
    if store_triplets not in ("auto", "always", "never"):
        raise PreprocessError(
            f"store_triplets must be auto, always or never, not {store_triplets!r}"
        )
    if graph_convention not in GRAPH_CONVENTIONS:
        raise PreprocessError(
            f"graph_convention must be one of {', '.join(GRAPH_CONVENTIONS)}, "
            f"not {graph_convention!r}"
        )
    options = Options(
        cutoff, max_neighbors, ref_energy, store_triplets != "never", graph_convention
    )
    try:
        input_format, work, total = plan(source, workers)
        if store_triplets == "auto" and total:
            estimate = total * triplet_bytes(input_format, work, options)
            fits = estimate <= triplet_budget_gb * 2**30
            options = Options(cutoff, max_neighbors, ref_energy, fits, graph_convention)
    except INPUT_ERRORS as error:
        raise PreprocessError(str(error)) from error

    results: dict[int, dict] = {}
    bar = tqdm(
        total=total,
        desc=f"preprocess {source.name}",
        unit="structure",
        mininterval=2.0,
        disable=not progress,
    )

    def receive(message: str, rank: int, payload) -> None:
        if message == "progress":
            bar.update(payload)
        elif message == "done":
            results[rank] = payload
        else:
            raise PreprocessError(payload)

    with atomic_directory(out, keep=[source]) as tmp, bar:
        if len(work) == 1:
            # One worker: run it here, no process to start.
            _worker(0, input_format, work[0], tmp / shard_name(0), options, Inline(receive))
        else:
            _run_workers(input_format, work, tmp, options, receive)
        arrays = {
            name: np.concatenate([results[rank][name] for rank in range(len(work))])
            for name in METADATA_ARRAYS
        }
        info = {
            "source": str(source),
            "input_format": input_format,
            "cutoff": cutoff,
            "max_neighbors": max_neighbors,
            "graph_convention": graph_convention,
            "ref_energy": ref_energy,
            "energy_reference": energy_reference(input_format, work, ref_energy),
            "triplets_stored": options.store_triplets,
        }
        metadata = write_metadata(tmp, info, arrays)
    return metadata


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m graphpar.preprocess",
        description=(
            "Build periodic radius graphs and triplets for an S2EF directory (*.extxyz[.xz] + "
            "*.txt[.xz]) or an OC20-style pickled LMDB (IS2RE/IS2RS, S2EF test), and write them "
            "as data.NNNN.lmdb shards (one per worker) plus metadata.json/.npz."
        ),
    )
    parser.add_argument("--input", required=True, type=Path, help="raw split directory or LMDB")
    parser.add_argument("--out", required=True, type=Path, help="output directory")
    parser.add_argument("--workers", type=int, default=1, help="worker processes (default 1)")
    parser.add_argument("--cutoff", type=float, default=6.0, help="radius, A (default 6)")
    parser.add_argument("--max-neighbors", type=int, default=50, help="per target (default 50)")
    parser.add_argument(
        "--ref-energy", action="store_true", help="subtract the txt reference energies (S2EF)"
    )
    parser.add_argument(
        "--store-triplets",
        choices=["auto", "always", "never"],
        default="auto",
        help="store triplet indices (auto: when within --triplet-budget-gb)",
    )
    parser.add_argument("--triplet-budget-gb", type=float, default=0.5, help="default 0.5")
    parser.add_argument(
        "--graph-convention",
        choices=GRAPH_CONVENTIONS,
        default="graphpar",
        help="how --max-neighbors caps a target: graphpar (the nearest plus the shell tied within "
        "0.01 A) or fairchem (fairchem's AtomsToGraphs, for OCP's published checkpoints)",
    )
    args = parser.parse_args(argv)
    try:
        metadata = preprocess(
            args.input,
            args.out,
            workers=args.workers,
            cutoff=args.cutoff,
            max_neighbors=args.max_neighbors,
            ref_energy=args.ref_energy,
            store_triplets=args.store_triplets,
            triplet_budget_gb=args.triplet_budget_gb,
            graph_convention=args.graph_convention,
        )
    except PreprocessError as error:
        sys.exit(f"error: {error}")
    print(
        f"{args.out}: {metadata['length']} structures in {len(metadata['shards'])} shard(s), "
        f"triplets {'stored' if metadata['triplets_stored'] else 'built by the loader'}"
    )


if __name__ == "__main__":
    main()
