"""The embedded dataset: OC20's raw layouts, exact EMT labels, determinism, OOD splits."""

from __future__ import annotations

import dataclasses
import filecmp
import json
import lzma
import pickle
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import ase.io
import lmdb
import numpy as np
import pytest
import yaml
from ase.calculators.emt import EMT
from ase.constraints import FixAtoms
from conftest import REPO, tool_env

from graphpar.data.mini import ADSORBATES, SPLITS, MiniConfig, generate, load_settings

pytestmark = pytest.mark.timeout(600)

TINY = {
    "seed": 3,
    "systems": {"train": 6, **{split: 1 for split in SPLITS if split != "train"}},
    "supercell": [2],
    "max_steps": 80,
    "frames_per_file": 30,
}
TXT_LINE = re.compile(r"^random(\d+),frame(\d+),(-?\d+\.\d+(?:e-?\d+)?)$")


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    """The tiny dataset generated twice with the same seed (2 workers, then 1 worker)."""
    config = MiniConfig.from_dict(TINY)
    first = tmp_path_factory.mktemp("mini") / "a"
    second = tmp_path_factory.mktemp("mini") / "b"
    generate(config, first, workers=2)
    generate(config, second, workers=1)
    return first, second


def read_split(root: Path, split: str):
    """(atoms, txt line) pairs of a split, file by file, in order."""
    pairs = []
    directory = root / "s2ef" / split
    for xyz in sorted(directory.glob("*.extxyz.xz"), key=lambda p: int(p.name.split(".")[0])):
        frames = ase.io.read(xyz, index=":", format="extxyz")
        with lzma.open(directory / xyz.name.replace(".extxyz.xz", ".txt.xz"), "rt") as f:
            lines = f.read().splitlines()
        assert len(frames) == len(lines), f"{xyz.name}: frames and txt lines differ"
        pairs.extend(zip(frames, lines, strict=True))
    return pairs


def adsorbate_formula(atoms) -> str:
    return "".join(sorted(atoms[atoms.get_tags() == 2].get_chemical_symbols()))


HELD_OUT_FORMULAS = {
    "".join(sorted(symbol for symbol, _ in ADSORBATES[name])) for name in ("*COH", "*NH2")
}


def test_layout_and_manifest(datasets):
    root, _ = datasets
    manifest = json.loads((root / "manifest.json").read_text())
    assert sorted(manifest["splits"]) == sorted(SPLITS)
    for split, summary in manifest["splits"].items():
        files = sorted(p.name for p in (root / "s2ef" / split).iterdir())
        assert len(files) == 2 * summary["s2ef_files"]
        assert all(f.endswith((".extxyz.xz", ".txt.xz")) for f in files)
        assert (root / "is2re" / split / "data.lmdb").is_file()
        counted = summary["is2re_systems"] + summary["unconverged"] + summary["slab_unconverged"]
        assert counted == summary["systems"] == TINY["systems"][split]
    assert len(manifest["systems"]) == sum(TINY["systems"].values())


def test_frames_carry_exact_emt_labels_tags_and_fixed_atoms(datasets):
    root, _ = datasets
    manifest = json.loads((root / "manifest.json").read_text())
    systems = {s["sid"]: s for s in manifest["systems"]}
    for split, summary in manifest["splits"].items():
        pairs = read_split(root, split)
        assert len(pairs) == summary["s2ef_frames"]
        references = {}
        seen = Counter()
        for atoms, line in pairs:
            sid, fid, reference = TXT_LINE.match(line).groups()
            sid, fid = int(sid), int(fid)
            system = systems[sid]
            assert system["split"] == split
            assert 0 <= fid <= system["steps"]
            assert references.setdefault(sid, float(reference)) == float(reference)
            seen[sid] += 1

            assert atoms.pbc.all()
            tags = atoms.get_tags()
            assert set(tags) <= {0, 1, 2} and (tags == 2).any() and (tags == 0).any()
            (constraint,) = atoms.constraints
            assert isinstance(constraint, FixAtoms)
            assert sorted(constraint.index) == list(np.flatnonzero(tags == 0))

            energy = atoms.get_potential_energy()
            forces = atoms.get_forces(apply_constraint=False)
            assert np.abs(forces[tags == 0]).max() > 0  # OC20 keeps forces on fixed atoms
            atoms.calc = EMT()
            assert energy == pytest.approx(atoms.get_potential_energy(), abs=1e-6)
            # extxyz keeps 8 decimals of positions; forces move by ~1e-7 with them.
            np.testing.assert_allclose(forces, atoms.get_forces(apply_constraint=False), atol=1e-5)
        # Every frame of every usable relaxation is an S2EF sample, each exactly once.
        for sid, count in seen.items():
            assert count == systems[sid]["steps"] + 1


def test_same_seed_gives_identical_files(datasets):
    first, second = datasets
    files = sorted(p.relative_to(first) for p in first.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(second) for p in second.rglob("*") if p.is_file())
    for relative in files:
        assert filecmp.cmp(first / relative, second / relative, shallow=False), relative


def test_held_out_adsorbates_and_metals_stay_out_of_in_distribution_splits(datasets):
    root, _ = datasets
    for split in SPLITS:
        for atoms, _ in read_split(root, split):
            formula = adsorbate_formula(atoms)
            has_pd = "Pd" in atoms.get_chemical_symbols()
            assert (formula in HELD_OUT_FORMULAS) == split.endswith(("ood_ads", "ood_both"))
            assert has_pd == split.endswith(("ood_cat", "ood_both")), split


def test_is2re_lmdb_in_oc20_pickled_layout(datasets):
    root, _ = datasets
    manifest = json.loads((root / "manifest.json").read_text())
    systems = {s["sid"]: s for s in manifest["systems"]}
    config = MiniConfig.from_dict(TINY)
    total = 0
    for split, summary in manifest["splits"].items():
        env = lmdb.open(
            str(root / "is2re" / split / "data.lmdb"), subdir=False, readonly=True, lock=False
        )
        assert env.stat()["entries"] == summary["is2re_systems"]
        with env.begin() as txn:
            for i in range(summary["is2re_systems"]):
                data = pickle.loads(txn.get(str(i).encode("ascii")))
                total += 1
                for key in ("pos", "pos_relaxed", "cell", "atomic_numbers", "tags", "fixed"):
                    assert key in data, key
                assert data.cell.shape == (1, 3, 3)
                assert data.natoms == len(data.atomic_numbers) == len(data.pos)
                system = systems[data.sid]
                assert system["split"] == split and system["converged"]

                relaxed = ase.Atoms(
                    numbers=data.atomic_numbers.long().numpy(),
                    positions=data.pos_relaxed.double().numpy(),
                    cell=data.cell[0].double().numpy(),
                    pbc=True,
                )
                relaxed.calc = EMT()
                # y_relaxed is an adsorption energy: total minus the system's reference.
                total_energy = relaxed.get_potential_energy()
                assert data.y_relaxed == pytest.approx(
                    total_energy - system["reference_energy"], abs=1e-3
                )
                free = data.fixed.numpy() == 0
                forces = relaxed.get_forces()[free]
                assert np.linalg.norm(forces, axis=1).max() < config.fmax + 0.01
        env.close()
    assert total > 0


def test_defaults_match_the_workflow_schema():
    schema = yaml.safe_load((REPO / "workflow/schemas/config.schema.yaml").read_text())
    properties = schema["properties"]["dataset"]["properties"]["mini"]["properties"]
    defaults = dataclasses.asdict(MiniConfig())
    for name, spec in properties.items():
        if name == "systems":
            schema_default = {k: v["default"] for k, v in spec["properties"].items()}
        else:
            schema_default = spec["default"]
        value = defaults[name]
        assert (list(value) if isinstance(value, tuple) else value) == schema_default, name
    assert set(properties) == set(defaults)


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="sytems"):
        MiniConfig.from_dict({"sytems": {"train": 3}})
    with pytest.raises(ValueError, match="not in metals"):
        MiniConfig.from_dict({"metals": ["Cu", "Ag"], "ood_metals": ["Pd"]})


def test_cli_help_and_clear_errors(tmp_path):
    run = [sys.executable, "-m", "graphpar.data.mini"]
    result = subprocess.run([*run, "--help"], capture_output=True, text=True, env=tool_env())
    assert result.returncode == 0 and "--workers" in result.stdout
    result = subprocess.run(
        [*run, "--out", str(tmp_path / "x"), "--config-json", '{"layers": 2, "fixed_layers": 2}'],
        capture_output=True,
        text=True,
        env=tool_env(),
    )
    assert result.returncode == 1
    assert result.stderr.strip() == "error: need 0 < fixed_layers < layers"
    assert not (tmp_path / "x").exists()


def test_settings_load_from_a_workflow_config_or_a_mini_section(tmp_path):
    workflow_config = REPO / "config" / "config.yaml"
    expected = yaml.safe_load(workflow_config.read_text())["dataset"]["mini"]
    assert load_settings(str(workflow_config), None) == expected
    section = tmp_path / "mini.yaml"
    section.write_text(yaml.safe_dump({"seed": 5, "layers": 4}))
    assert load_settings(str(section), '{"seed": 6}') == {"seed": 6, "layers": 4}
