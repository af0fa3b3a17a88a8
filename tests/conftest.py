"""Shared fixtures: the repository's paths and one real Snakemake run of the tiny test config."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SNAKEFILE = REPO / "Snakefile"


def tool_env() -> dict[str, str]:
    """Environment for subprocesses: this interpreter's bin/ first, so rules find its python."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def run_snakemake(workdir: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run the real snakemake CLI on this repository's Snakefile in `workdir`."""
    command = [
        shutil.which("snakemake", path=tool_env()["PATH"]) or "snakemake",
        "--snakefile",
        str(SNAKEFILE),
        "--directory",
        str(workdir),
        *args,
    ]
    result = subprocess.run(command, capture_output=True, text=True, env=tool_env())
    if check and result.returncode != 0:
        raise AssertionError(
            f"snakemake {' '.join(args)} failed ({result.returncode}):\n"
            f"{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
        )
    return result


def float64_batch(atoms_list, cutoff: float = 6.0, max_neighbors: int = 50):
    """A collated batch of `ase.Atoms` with float64 positions and cells (exactness tests)."""
    from graphpar.data.dataset import collate
    from graphpar.data.graph import atoms_to_sample

    batch = collate(
        [atoms_to_sample(a, cutoff=cutoff, max_neighbors=max_neighbors) for a in atoms_list]
    )
    batch.pos = batch.pos.double()
    batch.cell = batch.cell.double()
    return batch


def copy_test_workdir(destination: Path) -> Path:
    """A fresh working directory holding the tiny test config (.test/config/)."""
    shutil.copytree(REPO / ".test", destination)
    return destination


@pytest.fixture(scope="session")
def tiny_workflow(tmp_path_factory) -> Path:
    """Run the whole workflow once on .test/config/config.yaml; tests inspect its outputs."""
    workdir = copy_test_workdir(tmp_path_factory.mktemp("tiny") / "run")
    run_snakemake(workdir, "--cores", "2")
    return workdir
