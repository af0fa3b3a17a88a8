"""The relax CLI (python -m graphpar.relax): under torchrun with graph and data
parallelism, killed and resumed, and with EMT itself as the force field."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from ase.calculators.emt import EMT
from ase.io import read
from calculator_model import CalculatorModel
from conftest import tool_env

from graphpar.data.dataset import LmdbDataset
from graphpar.data.mini import SPLITS, MiniConfig, generate
from graphpar.preprocess import preprocess
from graphpar.relax import evaluate_relaxations, relax_dataset, relaxation_metrics

pytestmark = pytest.mark.timeout(600)

# Eight adsorbate+slab systems relaxed with EMT: more than one batch, more systems than ranks.
SYSTEMS = {"seed": 3, "systems": {**{s: 0 for s in SPLITS}, "train": 1, "val_id": 8}}
SMALL = {"supercell": [2], "facets": ["111", "100"]}
# EMT as the model, relaxed to fmax 0.03 from the initial structures, against the dataset's own
# relaxations (ASE BFGS to fmax 0.05): 0.89 here, 0.88 on the default val_id. Not 1: EMT's
# landscape for adsorbates is flat, so the tighter fmax and L-BFGS's path move atoms a few
# hundredths of an A further (up to 0.3 A for a sliding adsorbate).
ADWT_EMT = 0.85


@pytest.fixture(scope="module")
def is2re_split(tmp_path_factory):
    root = tmp_path_factory.mktemp("relax-data")
    generate(MiniConfig.from_dict({**SYSTEMS, **SMALL}), root / "raw", workers=2)
    preprocess(root / "raw/is2re/val_id/data.lmdb", root / "val_id", progress=False)
    return root / "val_id"


@pytest.fixture(scope="module")
def checkpoint(tiny_workflow):
    return tiny_workflow / "results/tiny/checkpoints/dimenetpp/final.pt"


def relax_command(checkpoint, data, out, processes: int, *options: str) -> list[str]:
    launch = [sys.executable, "-m", "graphpar.relax"]
    if processes > 1:
        launch = ["torchrun", "--standalone", f"--nproc_per_node={processes}", "-m"]
        launch.append("graphpar.relax")
    return [
        *launch,
        *("--checkpoint", str(checkpoint), "--data", str(data), "--split", "val_id"),
        *("--out-dir", str(out / "relaxed"), "--metrics-dir", str(out / "metrics")),
        *("--predictions-dir", str(out / "predictions"), "--device", "cpu"),
        *options,
    ]


def run(command: list[str]) -> subprocess.CompletedProcess:
    result = subprocess.run(command, env=tool_env(), capture_output=True, text=True, timeout=500)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def read_outputs(out):
    relaxed = {p.stem: read(p) for p in sorted((out / "relaxed").glob("*.extxyz"))}
    metrics = {
        task: json.loads((out / "metrics" / f"{task}_val_id.json").read_text())
        for task in ("is2rs", "is2re")
    }
    return relaxed, metrics


@pytest.fixture(scope="module")
def single_process(is2re_split, checkpoint, tmp_path_factory):
    """The reference: one process, G = D = 1."""
    out = tmp_path_factory.mktemp("single")
    evaluate_relaxations(
        checkpoint,
        is2re_split,
        "val_id",
        out / "relaxed",
        out / "metrics",
        out / "predictions",
        batch_size=3,
        device="cpu",
    )
    return read_outputs(out)


@pytest.mark.parametrize(
    ("gp_size", "batch"),
    [(2, ("--batch-size", "0", "--budget", "40")), (1, ("--batch-size", "3"))],
    ids=["G2xD1-budget", "G1xD2"],
)
def test_torchrun_relaxations_equal_one_process(
    is2re_split, checkpoint, single_process, tmp_path, gp_size, batch
):
    """Two torchrun ranks, as one graph-parallel group or as two data-parallel groups that
    share the systems, relax every system as one process does; the graph-parallel ranks refill
    their stream (a budget of 40 atoms) in lockstep."""
    result = run(
        relax_command(checkpoint, is2re_split, tmp_path, 2, "--gp-size", str(gp_size), *batch)
    )
    assert f"G x D = {gp_size} x {2 // gp_size}" in result.stdout
    relaxed, metrics = read_outputs(tmp_path)
    expected, expected_metrics = single_process
    assert sorted(relaxed) == sorted(expected) and len(relaxed) == len(LmdbDataset(is2re_split))
    for sid, atoms in relaxed.items():
        reference = expected[sid]
        assert atoms.info["steps"] == reference.info["steps"], sid
        np.testing.assert_allclose(atoms.positions, reference.positions, atol=1e-4, err_msg=sid)
        energies = atoms.get_potential_energy(), reference.get_potential_energy()
        np.testing.assert_allclose(*energies, atol=1e-4, err_msg=sid)
    for task in ("is2rs", "is2re"):
        for key in ("adwt", "fbt", "afbt", "energy_mae", "ewt", "n_systems"):
            if key in expected_metrics[task]:
                assert metrics[task][key] == pytest.approx(expected_metrics[task][key], abs=1e-3)


def test_killed_relaxation_resumes_without_redoing_systems(is2re_split, checkpoint, tmp_path):
    """SIGKILL after the first system is written; the rerun keeps its file untouched and
    relaxes only the rest. A tight fmax makes every system take all its steps."""
    options = ("--batch-size", "1", "--fmax", "0.001", "--steps", "8")
    command = relax_command(checkpoint, is2re_split, tmp_path, 1, *options)
    log = tmp_path / "killed.log"
    with open(log, "w") as output:
        process = subprocess.Popen(command, env=tool_env(), stdout=output, stderr=output)
    relaxed_dir = tmp_path / "relaxed"
    deadline = time.monotonic() + 300
    while not list(relaxed_dir.glob("*.extxyz")) and time.monotonic() < deadline:
        assert process.poll() is None, log.read_text()[-3000:]
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    done = {p.name: p.stat().st_mtime_ns for p in relaxed_dir.glob("*.extxyz")}
    total = len(LmdbDataset(is2re_split))
    assert 1 <= len(done) < total  # killed part-way
    assert not (tmp_path / "metrics").exists()

    result = run(command)
    relaxed = sorted(relaxed_dir.glob("*.extxyz"))
    assert len(relaxed) == total
    assert {name: (relaxed_dir / name).stat().st_mtime_ns for name in done} == done
    assert not list(relaxed_dir.glob(".*tmp*"))  # no temporary file left behind
    metrics = json.loads((tmp_path / "metrics" / "is2rs_val_id.json").read_text())
    assert metrics["n_systems"] == total
    assert "is2rs" in result.stdout or "adwt=" in result.stdout


def test_emt_as_the_model_finds_the_dataset_minima(is2re_split, tmp_path):
    """A perfect force field (EMT, which labelled the data) relaxed to fmax 0.03 passes the
    oracle's force test on every system and lands near the dataset's relaxed structures."""
    dataset = LmdbDataset(is2re_split)
    samples = [dataset[i] for i in range(len(dataset))]
    summaries = relax_dataset(
        CalculatorModel(EMT),
        samples,
        tmp_path,
        batch_size=4,
        fmax=0.03,
        steps=200,
        dtype=torch.float64,
        progress=False,
    )
    assert all(summary["converged"] for summary in summaries)
    relaxed = [read(summary["path"]) for summary in summaries]
    energy = np.array([summary["energy"] for summary in summaries])
    found = relaxation_metrics(samples, relaxed, energy, "emt")
    assert found["is2rs"]["fbt"] == 1.0
    assert found["is2rs"]["adwt"] >= ADWT_EMT
    assert np.all(found["per_system"]["oracle_max_force"] < 0.03)
