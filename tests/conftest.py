"""Shared fixtures: the repository's paths and one real Snakemake run of the tiny test config."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # this interpreter's bin/: the venv's under `make test`
SNAKEMAKE = BIN / "snakemake"
DATA = Path(__file__).resolve().parent / "data"  # fixtures kept in the repository
SNAKEFILE = REPO / "Snakefile"


def skips_fail() -> bool:
    """True when the environment variable CI holds a true value ("true", "1", "yes"): a skip is
    then a failure, so CI cannot pass by not running a test."""
    return os.environ.get("CI", "").strip().lower() in {"true", "1", "yes"}


def _fail_skip(report: pytest.CollectReport | pytest.TestReport, stopped: bool) -> None:
    """Under CI, turn a skipped report into a failed one that gives the skip's reason. A test
    that stopped by `pytest.xfail()` or `xfail(run=False)` (`stopped`) did not run either; an
    xfail mark on a test that ran to its failure stays xfailed (xfail_strict in pyproject.toml
    fails it if it passes)."""
    if not (skips_fail() and report.skipped) or (hasattr(report, "wasxfail") and not stopped):
        return
    if isinstance(report.longrepr, tuple):  # (path, 1-based line or None, "Skipped: reason")
        path, line, reason = report.longrepr
        where = f"{path}:{line}: " if line is not None else f"{path}: "
    else:
        where, reason = "", getattr(report, "wasxfail", None) or str(report.longrepr)
    report.outcome = "failed"
    report.longrepr = f"CI={os.environ['CI']} makes a skip a failure: {where}{reason}"
    report.skip_under_ci = True


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    """Skips of every phase: pytest.skip() in a test or fixture, skipif and skip marks."""
    report = yield
    stopped = call.excinfo is not None and call.excinfo.errisinstance(pytest.xfail.Exception)
    _fail_skip(report, stopped)
    return report


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(collector):
    """Skips while collecting: pytest.skip(allow_module_level=True), pytest.importorskip()."""
    report = yield
    _fail_skip(report, stopped=False)
    return report


@pytest.hookimpl(tryfirst=True)
def pytest_report_teststatus(report):
    """A skip failed under CI counts as failed in every phase (setup too, not as an error)."""
    if getattr(report, "skip_under_ci", False):
        return "failed", "F", "FAILED"
    return None


def tool_env() -> dict[str, str]:
    """Environment for commands the tests start by name (torchrun): this interpreter's bin/
    first."""
    env = dict(os.environ)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    return env


def snakemake_env() -> dict[str, str]:
    """Environment for Snakemake called by its path, as by a user who runs .venv/bin/snakemake
    without activating the venv: PATH without the venv's bin/, no VIRTUAL_ENV. Rules must then
    find python and torchrun through Snakemake's own interpreter (workflow/rules/common.smk)."""
    env = dict(os.environ)
    if sys.prefix == sys.base_prefix:  # not a venv: its bin/ may hold the shell's tools too
        return env
    env.pop("VIRTUAL_ENV", None)
    paths = env.get("PATH", "").split(os.pathsep)
    env["PATH"] = os.pathsep.join(p for p in paths if p and Path(p).resolve() != BIN.resolve())
    return env


def run_snakemake(workdir: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run the real snakemake CLI on this repository's Snakefile in `workdir` (snakemake_env)."""
    command = [
        str(SNAKEMAKE),
        "--snakefile",
        str(SNAKEFILE),
        "--directory",
        str(workdir),
        *args,
    ]
    result = subprocess.run(command, capture_output=True, text=True, env=snakemake_env())
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


def bad_structure(problem: str):
    """Two Cu atoms in a 4 A cubic periodic cell with one `problem` that leaves no graph to build
    (graphpar.data.graph.check_structure): "no atoms", "atomic number 0", "atomic number 119",
    "negative atomic number", "NaN position", "position beyond float32", "infinite cell",
    "zero periodic vector" or "singular cell"."""
    import numpy as np
    from ase import Atoms

    if problem == "no atoms":
        return Atoms(cell=4.0 * np.eye(3), pbc=True)
    atoms = Atoms("Cu2", positions=[[0, 0, 0], [1.3, 1.3, 0.3]], cell=4.0 * np.eye(3), pbc=True)
    attribute, index, value = {
        "atomic number 0": ("numbers", 1, 0),
        "atomic number 119": ("numbers", 1, 119),
        "negative atomic number": ("numbers", 1, -1),
        "NaN position": ("positions", (1, 0), np.nan),
        "position beyond float32": ("positions", (1, 2), 1e39),
        "infinite cell": ("cell", (2, 2), np.inf),
        "zero periodic vector": ("cell", 2, 0.0),
        "singular cell": ("cell", 2, [4.0, 4.0, 0.0]),
    }[problem]
    getattr(atoms, attribute)[index] = value
    return atoms


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
