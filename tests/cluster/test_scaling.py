"""The scaling study: the measuring rule on the CPU (tiny model, G = 2 through torchrun and
gloo). The SLURM shapes of config/paper/scaling.yaml's jobs (Table 4: 1 to 256 GPUs) are
tests/test_workflow.py's, with every paper config's."""

from __future__ import annotations

import json
import shutil

import pytest
import yaml
from conftest import run_snakemake

from graphpar.models import build_model

pytestmark = pytest.mark.timeout(600)

KEYS = {
    "run",
    "model",
    "parameters",
    "gp_size",
    "dp_size",
    "batch_size",
    "device",
    "samples_per_s",
    "peak_memory_mb_per_gpu",
    "tflops_per_gpu",
    "steps_measured",
    "provenance",
}


def test_scaling_rule_measures_a_graph_parallel_run(tiny_workflow, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(tiny_workflow / "config", workdir / "config")
    shutil.copytree(tiny_workflow / "resources", workdir / "resources")  # no re-preprocessing
    config_file = workdir / "config" / "config.yaml"
    config = yaml.safe_load(config_file.read_text())
    run = {"model": "gemnet-tiny", "gp_size": 2, "batch_size": 2, "train": ["train"]}
    config["scaling"] = {"warmup": 1, "steps": 3, "runs": {"tiny-gp2": run}}
    config_file.write_text(yaml.safe_dump(config))

    run_snakemake(workdir, "--cores", "2", "scaling_study")

    result = json.loads((workdir / "results/tiny/scaling/tiny-gp2.json").read_text())
    assert set(result) == KEYS
    assert (result["run"], result["model"], result["device"]) == ("tiny-gp2", "gemnet-tiny", "cpu")
    assert (result["gp_size"], result["dp_size"], result["batch_size"]) == (2, 1, 2)
    assert result["parameters"] == sum(p.numel() for p in build_model("gemnet-tiny").parameters())
    assert result["steps_measured"] == 3
    assert result["samples_per_s"] > 0 and result["peak_memory_mb_per_gpu"] > 0
    provenance = result["provenance"]
    flops = provenance["flops_per_step_per_rank"]
    assert len(flops) == 2 and min(flops) > 0, "each rank counts its own share"
    seconds = provenance["step_seconds_median"]
    assert result["tflops_per_gpu"] == pytest.approx(sum(flops) / 2 / seconds / 1e12)
    assert provenance["world_size"] == 2 and provenance["dataset_metadata_sha256"][0]
