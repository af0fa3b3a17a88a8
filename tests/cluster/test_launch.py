"""Launch shapes outside SLURM: a multi-node run started locally stops with the reason."""

from __future__ import annotations

import shutil

import pytest
import yaml
from conftest import run_snakemake

pytestmark = pytest.mark.timeout(600)


def test_multi_node_run_without_slurm_says_what_it_needs(tiny_workflow, tmp_path):
    """A site of 2 GPUs per node puts a run of G x D = 2 x 2 on 2 nodes: started outside SLURM,
    its job stops with the reason before torchrun starts."""
    workdir = tmp_path / "run"
    shutil.copytree(tiny_workflow / "config", workdir / "config")
    shutil.copytree(tiny_workflow / "resources", workdir / "resources")
    config_file = workdir / "config" / "config.yaml"
    config = yaml.safe_load(config_file.read_text())
    config["site"] = {"gpus_per_node": 2}
    config["train"]["dimenetpp"]["dp_size"] = 2
    config_file.write_text(yaml.safe_dump(config))

    result = run_snakemake(
        workdir, "--cores", "2", "results/tiny/checkpoints/dimenetpp/final.pt", check=False
    )

    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert (
        "train.dimenetpp: G x D = 4 processes on 2 nodes of 2 GPUs (site.gpus_per_node): "
        "multi-node jobs need a SLURM allocation"
    ) in output
    assert not (workdir / "results/tiny/checkpoints/dimenetpp").exists(), "nothing started"
