"""The embedded OC20-style dataset ("mini"): adsorbate + slab relaxations computed with ASE's EMT.

Everything downstream (graphs, training, relaxations, metrics) runs on this dataset on a laptop
with no network, so it is written in OC20's own raw layouts and goes through the same import
code as the real files:

    <out>/s2ef/<split>/<k>.extxyz.xz   frames with *total* energies (eV) and forces (eV/A),
                                       tags, fixed atoms (extxyz `move_mask`), pbc T T T
    <out>/s2ef/<split>/<k>.txt.xz      one line per frame: random<sid>,frame<fid>,<reference eV>
    <out>/is2re/<split>/data.lmdb      pickled PyG `Data` per converged system (OC20's keys:
                                       pos, pos_relaxed, y_init, y_relaxed, cell, atomic_numbers,
                                       natoms, tags, fixed, force, sid); y_* are adsorption
                                       energies (total - reference), eV
    <out>/manifest.json                systems, convergence counts, frame counts, gas references

Systems: fcc(111)/(100)/(211) slabs of EMT metals (Cu, Ag, Au, Ni, Pd, Pt, Al) and their binary
alloys, bottom layers fixed, with one C/H/O/N adsorbate from OC20's list, relaxed with EMT to
fmax 0.05 eV/A (at most 200 steps). Tags follow OC20: 0 fixed subsurface, 1 surface, 2 adsorbate.
Reference energy of a system = its relaxed clean slab + OC20-style gas-phase references
(H: H2/2, O: H2O - H2, C: CO - O, N: N2/2), all EMT. Every frame of a relaxation is an S2EF
sample; initial and final structures of relaxations that converged are IS2RS/IS2RE samples
(unconverged ones are dropped there and counted in the manifest; their frames stay in S2EF).

Splits mirror OC20: held-out adsorbates (OOD-Ads) and held-out metals (OOD-Cat) never appear in
train, val_id or test_id. Output is a pure function of the settings (seed included).

Usage:
    python -m graphpar.data.mini --out resources/mini --workers 2
    python -m graphpar.data.mini --config config/config.yaml --out resources/mini
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import lzma
import os
import pickle
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path

import ase
import ase.io
import lmdb
import numpy as np
import yaml
from ase import Atoms
from ase.build import fcc100, fcc111, fcc211
from ase.calculators.emt import EMT
from ase.calculators.singlepoint import SinglePointCalculator
from ase.constraints import FixAtoms
from ase.data import atomic_numbers, reference_states
from ase.optimize import BFGS, LBFGS
from threadpoolctl import threadpool_limits
from tqdm import tqdm

from graphpar import __version__
from graphpar.io import atomic_directory, atomic_path, write_json

SPLITS = (
    "train",
    "val_id",
    "val_ood_ads",
    "val_ood_cat",
    "val_ood_both",
    "test_id",
    "test_ood_ads",
    "test_ood_cat",
    "test_ood_both",
)

# Adsorbates from OC20's list, as (element, position in A) with the binding atom first at the
# origin and the rest above it (+z points away from the surface).
ADSORBATES: dict[str, list[tuple[str, tuple[float, float, float]]]] = {
    "*H": [("H", (0.0, 0.0, 0.0))],
    "*O": [("O", (0.0, 0.0, 0.0))],
    "*N": [("N", (0.0, 0.0, 0.0))],
    "*C": [("C", (0.0, 0.0, 0.0))],
    "*OH": [("O", (0.0, 0.0, 0.0)), ("H", (0.0, 0.0, 0.97))],
    "*CO": [("C", (0.0, 0.0, 0.0)), ("O", (0.0, 0.0, 1.16))],
    "*COH": [("C", (0.0, 0.0, 0.0)), ("O", (0.0, 0.0, 1.33)), ("H", (0.89, 0.0, 1.70))],
    "*NH": [("N", (0.0, 0.0, 0.0)), ("H", (0.0, 0.0, 1.02))],
    "*NH2": [("N", (0.0, 0.0, 0.0)), ("H", (0.82, 0.0, 0.58)), ("H", (-0.82, 0.0, 0.58))],
    "*CH2": [("C", (0.0, 0.0, 0.0)), ("H", (0.93, 0.0, 0.60)), ("H", (-0.93, 0.0, 0.60))],
    "*CH3": [
        ("C", (0.0, 0.0, 0.0)),
        ("H", (1.03, 0.0, 0.36)),
        ("H", (-0.515, 0.892, 0.36)),
        ("H", (-0.515, -0.892, 0.36)),
    ],
}
EMT_METALS = ("Cu", "Ag", "Au", "Ni", "Pd", "Pt", "Al")
SLAB_BUILDERS = {"111": fcc111, "100": fcc100, "211": fcc211}
OPTIMIZERS = {"BFGS": BFGS, "LBFGS": LBFGS}
ALLOY_FRACTIONS = (0.25, 0.5, 0.75)  # fraction of the second metal in a binary alloy
# Height (A) of the adsorbate's binding atom above the top slab atom before relaxation.
BINDING_HEIGHT = {"H": 1.5, "C": 1.8, "N": 1.8, "O": 1.8}


def holds_out_adsorbates(split: str) -> bool:
    """Whether `split` draws the held-out adsorbates (OC20's OOD-Ads and OOD-Both)."""
    return split.endswith(("_ood_ads", "_ood_both"))


def holds_out_metals(split: str) -> bool:
    """Whether `split` draws catalysts with a held-out metal (OC20's OOD-Cat and OOD-Both)."""
    return split.endswith(("_ood_cat", "_ood_both"))


@dataclass(frozen=True)
class MiniConfig:
    """Settings of the embedded dataset (the `dataset.mini` section of the workflow config).

    The defaults here equal the defaults in workflow/schemas/config.schema.yaml (a test checks).
    """

    seed: int = 0
    systems: dict[str, int] = field(
        default_factory=lambda: {
            "train": 240,
            "val_id": 20,
            "val_ood_ads": 20,
            "val_ood_cat": 20,
            "val_ood_both": 20,
            "test_id": 20,
            "test_ood_ads": 20,
            "test_ood_cat": 20,
            "test_ood_both": 20,
        }
    )
    metals: tuple[str, ...] = EMT_METALS
    ood_metals: tuple[str, ...] = ("Pd",)
    adsorbates: tuple[str, ...] = tuple(ADSORBATES)
    ood_adsorbates: tuple[str, ...] = ("*COH", "*NH2")
    facets: tuple[str, ...] = ("111", "100", "211")
    alloy_fraction: float = 0.5  # probability that a catalyst is a binary alloy
    supercell: tuple[int, ...] = (2, 3)  # in-plane repeats to draw from ((211): 3 x n)
    layers: int = 3
    fixed_layers: int = 1
    vacuum: float = 7.0  # A on each side of the slab
    rattle: float = 0.05  # A, std of the random displacement of free slab atoms
    fmax: float = 0.05  # eV/A
    max_steps: int = 200
    optimizer: str = "BFGS"
    frames_per_file: int = 1000

    @classmethod
    def from_dict(cls, settings: dict) -> MiniConfig:
        """Build from a config mapping; list values become tuples, unknown keys are an error."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(settings) - names)
        if unknown:
            raise ValueError(f"unknown mini dataset setting(s): {', '.join(unknown)}")
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in settings.items()}
        if "systems" in values:
            values["systems"] = {**cls().systems, **values["systems"]}
        config = cls(**values)
        config.check()
        return config

    def check(self) -> None:
        """Raise ValueError for settings that cannot produce OC20-like splits."""
        if bad := sorted(set(self.systems) - set(SPLITS)):
            raise ValueError(f"unknown split(s) in systems: {bad}; valid: {list(SPLITS)}")
        if self.systems.get("train", 0) < 1:
            raise ValueError("systems.train must be at least 1")
        if bad := sorted(set(self.metals) - set(EMT_METALS)):
            raise ValueError(f"metal(s) {bad} have no EMT parameters; use {list(EMT_METALS)}")
        if bad := sorted(set(self.adsorbates) - set(ADSORBATES)):
            raise ValueError(f"unknown adsorbate(s) {bad}; known: {list(ADSORBATES)}")
        if bad := sorted(set(self.ood_metals) - set(self.metals)):
            raise ValueError(f"ood_metals {bad} are not in metals")
        if bad := sorted(set(self.ood_adsorbates) - set(self.adsorbates)):
            raise ValueError(f"ood_adsorbates {bad} are not in adsorbates")
        if not set(self.metals) - set(self.ood_metals):
            raise ValueError("every metal is held out: in-distribution splits need one")
        if not set(self.adsorbates) - set(self.ood_adsorbates):
            raise ValueError("every adsorbate is held out: in-distribution splits need one")
        for split in self.active_splits:
            if holds_out_adsorbates(split) and not self.ood_adsorbates:
                raise ValueError(f"{split} needs ood_adsorbates")
            if holds_out_metals(split) and not self.ood_metals:
                raise ValueError(f"{split} needs ood_metals")
        if bad := sorted(set(self.facets) - set(SLAB_BUILDERS)):
            raise ValueError(f"unknown facet(s) {bad}; known: {list(SLAB_BUILDERS)}")
        if not 0 < self.fixed_layers < self.layers:
            raise ValueError("need 0 < fixed_layers < layers")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {list(OPTIMIZERS)}")

    @property
    def active_splits(self) -> list[str]:
        return [s for s in SPLITS if self.systems.get(s, 0) > 0]


@dataclass(frozen=True)
class SystemSpec:
    """One adsorbate+slab system to build and relax; fully determines its result."""

    sid: int
    split: str
    metals: tuple[str, ...]  # one metal, or two for a binary alloy
    alloy_fraction: float  # fraction of metals[1] (0 for a pure metal)
    facet: str
    repeat: int
    adsorbate: str
    seed: int


def sample_systems(config: MiniConfig) -> list[SystemSpec]:
    """Draw every system of every split, deterministically from `config.seed`.

    In-distribution splits (train, val_id, test_id) use only in-distribution metals and
    adsorbates; `*_ood_ads` draws held-out adsorbates, `*_ood_cat` catalysts containing a
    held-out metal, `*_ood_both` both.
    """
    rng = random.Random(config.seed)
    id_metals = [m for m in config.metals if m not in config.ood_metals]
    id_adsorbates = [a for a in config.adsorbates if a not in config.ood_adsorbates]
    total = sum(config.systems.get(s, 0) for s in SPLITS)
    sids = rng.sample(range(100_000, 10_000_000), total)  # OC20-like random system ids

    specs = []
    for split in config.active_splits:
        adsorbates = list(config.ood_adsorbates) if holds_out_adsorbates(split) else id_adsorbates
        for _ in range(config.systems[split]):
            if holds_out_metals(split):
                first = rng.choice(config.ood_metals)
                partners = [m for m in config.metals if m != first]
            else:
                first = rng.choice(id_metals)
                partners = [m for m in id_metals if m != first]
            if partners and rng.random() < config.alloy_fraction:
                metals = tuple(rng.sample([first, rng.choice(partners)], 2))
                fraction = rng.choice(ALLOY_FRACTIONS)
            else:
                metals, fraction = (first,), 0.0
            specs.append(
                SystemSpec(
                    sid=sids[len(specs)],
                    split=split,
                    metals=metals,
                    alloy_fraction=fraction,
                    facet=rng.choice(config.facets),
                    repeat=rng.choice(config.supercell),
                    adsorbate=rng.choice(adsorbates),
                    seed=rng.randrange(2**32),
                )
            )
    return specs


def build_slab(spec: SystemSpec, config: MiniConfig, rng: np.random.Generator) -> Atoms:
    """The clean slab: fcc facet, Vegard lattice constant for alloys, bottom layers fixed."""
    lattice = [reference_states[atomic_numbers[m]]["a"] for m in spec.metals]
    if len(lattice) == 2:
        a = (1 - spec.alloy_fraction) * lattice[0] + spec.alloy_fraction * lattice[1]
    else:
        a = lattice[0]
    # fcc211's step unit cell is 3 atoms wide: its first repeat must be a multiple of 3.
    size = (3 if spec.facet == "211" else spec.repeat, spec.repeat, config.layers)
    slab = SLAB_BUILDERS[spec.facet](spec.metals[0], size=size, a=a, vacuum=config.vacuum)
    slab.info.clear()  # adsorbate_info does not survive extxyz
    slab.pbc = True  # OC20 structures are periodic in all three directions

    if len(spec.metals) == 2:
        numbers = slab.get_atomic_numbers()
        n_second = round(spec.alloy_fraction * len(slab))
        numbers[rng.choice(len(slab), size=n_second, replace=False)] = atomic_numbers[
            spec.metals[1]
        ]
        slab.set_atomic_numbers(numbers)

    # Fix the bottom `fixed_layers` of `layers` by height (works for stepped (211) too).
    z = slab.positions[:, 2]
    thickness = z.max() - z.min()
    fixed = z < z.min() + thickness * config.fixed_layers / config.layers + 1e-3
    slab.set_tags(np.where(fixed, 0, 1))
    slab.positions[~fixed] += rng.normal(scale=config.rattle, size=(int((~fixed).sum()), 3))
    slab.set_constraint(FixAtoms(mask=fixed))
    return slab


def add_adsorbate(slab: Atoms, spec: SystemSpec, rng: np.random.Generator) -> Atoms:
    """Place the adsorbate above a random surface site (top, bridge or hollow-like), tag 2."""
    template = ADSORBATES[spec.adsorbate]
    angle = rng.uniform(0, 2 * np.pi)
    rotation = np.array(
        [[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]]
    )
    top = np.flatnonzero(slab.positions[:, 2] > slab.positions[:, 2].max() - 0.5)
    anchor = slab.positions[rng.choice(top)].copy()
    radius, phi = rng.uniform(0.0, 1.3), rng.uniform(0, 2 * np.pi)
    anchor[:2] += radius * np.array([np.cos(phi), np.sin(phi)])
    anchor[2] = slab.positions[:, 2].max() + BINDING_HEIGHT[template[0][0]]

    adsorbate = Atoms(
        symbols=[symbol for symbol, _ in template],
        positions=[anchor + rotation @ np.array(xyz) for _, xyz in template],
        tags=[2] * len(template),
    )
    system = slab + adsorbate
    system.set_constraint(FixAtoms(mask=system.get_tags() == 0))
    return system


def relax(atoms: Atoms, config: MiniConfig) -> tuple[list[dict], bool]:
    """EMT relaxation; returns every visited state (energy eV, forces eV/A) and convergence."""
    atoms.calc = EMT()
    optimizer = OPTIMIZERS[config.optimizer](atoms, logfile=None)
    frames = []
    converged = False
    for converged in optimizer.irun(fmax=config.fmax, steps=config.max_steps):  # noqa: B007
        frames.append(
            {
                "positions": atoms.get_positions(),
                "energy": float(atoms.get_potential_energy()),
                # OC20 keeps the forces on fixed atoms: the constraint is not applied.
                "forces": atoms.get_forces(apply_constraint=False),
            }
        )
    return frames, bool(converged)


def gas_references() -> dict[str, float]:
    """OC20-style per-element gas-phase references from EMT molecules (eV)."""
    from ase.build import molecule

    def energy(name: str) -> float:
        mol = molecule(name)
        mol.center(vacuum=5.0)
        mol.calc = EMT()
        BFGS(mol, logfile=None).run(fmax=0.01, steps=200)
        return float(mol.get_potential_energy())

    h2, h2o, co, n2 = energy("H2"), energy("H2O"), energy("CO"), energy("N2")
    oxygen = h2o - h2
    return {"H": h2 / 2, "O": oxygen, "C": co - oxygen, "N": n2 / 2}


def relax_system(spec: SystemSpec, config: MiniConfig, gas: dict[str, float]) -> dict:
    """Build and relax one system and its clean slab (runs in a worker process)."""
    rng = np.random.default_rng(spec.seed)
    slab = build_slab(spec, config, rng)
    system = add_adsorbate(slab, spec, rng)

    clean = slab.copy()
    slab_frames, slab_converged = relax(clean, config)
    frames, converged = relax(system, config)
    adsorbate_symbols = system.get_chemical_symbols()[len(slab) :]
    reference = slab_frames[-1]["energy"] + sum(gas[s] for s in adsorbate_symbols)
    return {
        "spec": spec,
        "numbers": system.get_atomic_numbers(),
        "cell": np.array(system.get_cell()),
        "tags": system.get_tags(),
        "fixed": system.get_tags() == 0,
        "frames": frames,
        "converged": converged,
        "slab_converged": slab_converged,
        "reference_energy": reference,
    }


def _frame_atoms(system: dict, frame: dict) -> Atoms:
    atoms = Atoms(
        numbers=system["numbers"],
        positions=frame["positions"],
        cell=system["cell"],
        pbc=True,
        tags=system["tags"],
    )
    atoms.set_constraint(FixAtoms(mask=system["fixed"]))
    atoms.calc = SinglePointCalculator(atoms, energy=frame["energy"], forces=frame["forces"])
    return atoms


def write_s2ef_file(stem: Path, frames: list[tuple[dict, int, dict]]) -> None:
    """Write `<stem>.extxyz.xz` and its `<stem>.txt.xz` (one line per frame, same order)."""
    with lzma.open(stem.with_name(stem.name + ".extxyz.xz"), "wt") as f:
        ase.io.write(f, [_frame_atoms(system, frame) for system, _, frame in frames], "extxyz")
    with lzma.open(stem.with_name(stem.name + ".txt.xz"), "wt") as f:
        for system, fid, _ in frames:
            f.write(f"random{system['sid']},frame{fid},{system['reference_energy']!r}\n")


def _write_s2ef_file_task(args) -> None:
    write_s2ef_file(*args)


def write_s2ef_split(
    results: list[dict], directory: Path, frames_per_file: int, seed: int, map_fn=map
) -> int:
    """Write a split's frames, shuffled as in OC20, as numbered `.extxyz.xz` + `.txt.xz` pairs.

    `map_fn` (e.g. a process pool's `imap`) writes the files in parallel; returns the frame count.
    """
    frames = []
    for r in results:
        # Only what a frame needs travels to the writers (pickled once per file, not per frame).
        system = {key: r[key] for key in ("numbers", "cell", "tags", "fixed", "reference_energy")}
        system["sid"] = r["spec"].sid
        frames += [(system, fid, frame) for fid, frame in enumerate(r["frames"])]
    random.Random(seed).shuffle(frames)
    with atomic_directory(directory) as tmp:
        chunks = range(0, len(frames), frames_per_file)
        tasks = [
            (tmp / str(k), frames[start : start + frames_per_file])
            for k, start in enumerate(chunks)
        ]
        for _ in map_fn(_write_s2ef_file_task, tasks):
            pass
    return len(frames)


def is2re_data(result: dict):
    """An IS2RE/IS2RS sample as OC20 ships it: a PyG `Data` with adsorption energies (eV)."""
    import torch
    from torch_geometric.data import Data

    first, last = result["frames"][0], result["frames"][-1]
    reference = result["reference_energy"]
    return Data(
        pos=torch.tensor(first["positions"], dtype=torch.float32),
        pos_relaxed=torch.tensor(last["positions"], dtype=torch.float32),
        cell=torch.tensor(result["cell"], dtype=torch.float32).view(1, 3, 3),
        atomic_numbers=torch.tensor(result["numbers"], dtype=torch.float32),
        natoms=len(result["numbers"]),
        tags=torch.tensor(result["tags"], dtype=torch.long),
        fixed=torch.tensor(result["fixed"], dtype=torch.float32),
        force=torch.tensor(first["forces"], dtype=torch.float32),
        y_init=first["energy"] - reference,
        y_relaxed=last["energy"] - reference,
        sid=result["spec"].sid,
    )


def _pickled_string(text: bytes) -> bytes:
    return b"X" + len(text).to_bytes(4, "little") + text  # pickle's BINUNICODE opcode


class _ReproduciblePickler(pickle.Pickler):
    """Pickles tensors exactly as torch does, except for the storage keys.

    torch names each pickled storage after its memory address, so the same tensor pickles to
    different bytes in every process. Renaming the key (an opaque label, used twice in each
    storage's legacy-format blob) makes the dataset byte-for-byte reproducible while readers,
    ours and OC20's, see torch's own format.
    """

    def reducer_override(self, obj):
        import torch

        if not isinstance(obj, torch.storage.TypedStorage):
            return NotImplemented
        buffer = io.BytesIO()
        torch.save(obj, buffer, _use_new_zipfile_serialization=False)
        key = _pickled_string(str(obj._untyped_storage._cdata).encode())
        blob = buffer.getvalue()
        if blob.count(key) != 2:
            raise RuntimeError("unexpected torch storage serialization layout")
        return (torch.storage._load_from_bytes, (blob.replace(key, _pickled_string(b"0")),))


def reproducible_pickle(obj) -> bytes:
    """`pickle.dumps(obj)` whose bytes do not depend on where tensors live in memory."""
    buffer = io.BytesIO()
    _ReproduciblePickler(buffer, protocol=pickle.HIGHEST_PROTOCOL).dump(obj)
    return buffer.getvalue()


def write_is2re_split(results: list[dict], path: Path) -> int:
    """Write a single-file LMDB keyed "0".."n-1" of pickled `Data` (OC20's IS2RE layout)."""
    values = [reproducible_pickle(is2re_data(r)) for r in results]
    with atomic_path(path) as tmp:
        env = lmdb.open(
            str(tmp),
            subdir=False,
            lock=False,
            map_size=2 * sum(map(len, values)) + 2**20,
        )
        with env.begin(write=True) as txn:
            for i, value in enumerate(values):
                txn.put(str(i).encode("ascii"), value)
        env.sync()
        env.close()
    return len(values)


def _single_threaded_blas() -> None:
    """Pool initializer: one BLAS thread per worker.

    Every worker runs its own small optimiser; BLAS threads on top oversubscribe the cores
    (measured: 4x slower on 2 cores).
    """
    threadpool_limits(1)


def _relax_task(args):
    return relax_system(*args)


def generate(config: MiniConfig, out: str | os.PathLike, workers: int = 1) -> dict:
    """Generate the whole dataset under `out` and return its manifest."""
    out = Path(out)
    start = time.perf_counter()
    gas = gas_references()
    specs = sample_systems(config)

    tasks = [(spec, config, gas) for spec in specs]
    progress = dict(total=len(tasks), desc="EMT relaxations", unit="system", mininterval=2.0)
    with contextlib.ExitStack() as stack:
        map_fn = map
        if workers > 1:
            pool = get_context("fork").Pool(workers, initializer=_single_threaded_blas)
            map_fn = stack.enter_context(pool).imap
        results = list(tqdm(map_fn(_relax_task, tasks), **progress))

        manifest = {
            "format": "graphpar-mini",
            "version": 1,
            "generator": {"graphpar": __version__, "ase": ase.__version__},
            "config": dataclasses.asdict(config),
            "gas_references_eV": gas,
            "splits": {},
            "systems": [],
        }
        for split_index, split in enumerate(tqdm(config.active_splits, desc="writing splits")):
            in_split = [r for r in results if r["spec"].split == split]
            # A system without a relaxed clean slab has no reference energy: drop it entirely.
            usable = [r for r in in_split if r["slab_converged"]]
            relaxed = [r for r in usable if r["converged"]]
            frames = write_s2ef_split(
                usable,
                out / "s2ef" / split,
                config.frames_per_file,
                seed=config.seed + split_index,
                map_fn=map_fn,
            )
            write_is2re_split(relaxed, out / "is2re" / split / "data.lmdb")
            manifest["splits"][split] = {
                "systems": len(in_split),
                "slab_unconverged": len(in_split) - len(usable),
                "unconverged": len(usable) - len(relaxed),
                "is2re_systems": len(relaxed),
                "s2ef_frames": frames,
                "s2ef_files": -(-frames // config.frames_per_file),
                "adsorbates": sorted({r["spec"].adsorbate for r in in_split}),
                "metals": sorted({m for r in in_split for m in r["spec"].metals}),
            }
    for r in results:
        spec = r["spec"]
        manifest["systems"].append(
            {
                **dataclasses.asdict(spec),
                "natoms": len(r["numbers"]),
                "steps": len(r["frames"]) - 1,
                "converged": r["converged"],
                "slab_converged": r["slab_converged"],
                "reference_energy": r["reference_energy"],
            }
        )
    write_json(out / "manifest.json", manifest)
    elapsed = time.perf_counter() - start
    print(f"mini dataset: {len(specs)} systems in {elapsed:.1f} s with {workers} worker(s)")
    for split, summary in manifest["splits"].items():
        print(
            f"  {split:14s} systems {summary['systems']:4d}  S2EF frames "
            f"{summary['s2ef_frames']:6d}  IS2RE {summary['is2re_systems']:4d}  "
            f"unconverged {summary['unconverged']}"
        )
    return manifest


def load_settings(config_file: str | None, settings_json: str | None) -> dict:
    """Mini settings from a YAML file (a workflow config or the mini section) and/or JSON."""
    settings: dict = {}
    if config_file:
        loaded = yaml.safe_load(Path(config_file).read_text()) or {}
        if "dataset" in loaded:  # a whole workflow config
            loaded = loaded["dataset"].get("mini") or {}
        settings.update(loaded)
    if settings_json:
        settings.update(json.loads(settings_json))
    return settings


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m graphpar.data.mini",
        description=(
            "Generate the embedded OC20-style dataset: adsorbate+slab systems relaxed with ASE's "
            "EMT, written as OC20's raw S2EF (extxyz.xz + txt.xz) and IS2RE/IS2RS (LMDB) files."
        ),
    )
    parser.add_argument("--out", required=True, help="output directory (e.g. resources/mini)")
    parser.add_argument(
        "--config", help="YAML file: a workflow config (dataset.mini is used) or the mini section"
    )
    parser.add_argument(
        "--config-json", help="the mini settings as one JSON object (overrides --config)"
    )
    parser.add_argument("--seed", type=int, help="override the seed")
    parser.add_argument(
        "--workers", type=int, default=os.cpu_count(), help="worker processes (default: all CPUs)"
    )
    args = parser.parse_args(argv)

    try:
        settings = load_settings(args.config, args.config_json)
        if args.seed is not None:
            settings["seed"] = args.seed
        config = MiniConfig.from_dict(settings)
    except (ValueError, TypeError, OSError, yaml.YAMLError) as error:
        sys.exit(f"error: {error}")
    generate(config, args.out, workers=max(1, args.workers))


if __name__ == "__main__":
    main()
