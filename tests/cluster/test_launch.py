"""Launch shapes outside SLURM: a multi-node run started locally stops with the reason."""

from __future__ import annotations

import shutil

import pytest
import yaml
from conftest import run_snakemake

pytestmark = pytest.mark.timeout(600)


def test_multi_node_run_without_slurm_says_what_it_needs(tiny_workflow, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(tiny_workflow / "config", workdir / "config")
    shutil.copytree(tiny_workflow / "resources", workdir / "resources")
    config_file = workdir / "config" / "config.yaml"
    config = yaml.safe_load(config_file.read_text())
    config["train"]["dimenetpp"]["nodes"] = 2
    config_file.write_text(yaml.safe_dump(config))

    result = run_snakemake(
        workdir, "--cores", "2", "results/tiny/checkpoints/dimenetpp/final.pt", check=False
    )

    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert "train.dimenetpp has nodes: 2: multi-node runs need a SLURM allocation" in output
    assert not (workdir / "results/tiny/checkpoints/dimenetpp").exists(), "nothing started"


def test_processes_that_do_not_split_over_nodes_are_refused(tiny_workflow, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(tiny_workflow / "config", workdir / "config")
    config_file = workdir / "config" / "config.yaml"
    config = yaml.safe_load(config_file.read_text())
    config["train"]["gemnet"]["nodes"] = 3  # G x D = 2
    config_file.write_text(yaml.safe_dump(config))

    result = run_snakemake(workdir, "-n", check=False)

    assert result.returncode != 0
    assert "G x D = 2 processes do not split evenly over nodes: 3" in result.stdout + result.stderr
