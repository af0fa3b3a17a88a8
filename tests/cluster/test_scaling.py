"""The scaling study: the measuring rule on the CPU (tiny model, G = 2 through torchrun and
gloo), and the job shapes of config/paper/scaling.yaml (Table 4: 1 to 256 GPUs)."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import yaml
from conftest import REPO, run_snakemake

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


def test_paper_scaling_study_shapes_every_job_for_slurm(tmp_path):
    """Table 4's runs: G GPUs on one node, and x32 data parallel over 4 to 32 nodes of 8 GPUs
    (one srun task and one torchrun agent per node, never a task per GPU)."""
    workdir = tmp_path / "run"
    shutil.copytree(REPO / "config", workdir / "config")
    config = REPO / "config" / "paper" / "scaling.yaml"
    result = run_snakemake(workdir, "scaling_study", "-n", "-p", "--configfile", str(config))
    jobs = result.stdout.split("rule scaling:")[1:]
    assert len(jobs) == 8
    shapes = {}
    for job in jobs:
        name = re.search(r"wildcards: run=(\S+)", job)[1]
        line = job.split("resources:", 1)[1].splitlines()[0]
        resources = dict(re.findall(r"(\w+)=([^,\s]*)", line))
        shapes[name] = resources
        assert resources["tasks_per_gpu"] == "0" and resources["tasks"] == resources["nodes"]
        nodes, per_node = int(resources["nodes"]), int(resources["gres"].split(":")[1])
        if nodes == 1:
            assert resources["mpi"] == "" and f"--standalone --nproc_per_node={per_node}" in job
        else:
            assert resources["mpi"] == "srun"
            assert f"srun --ntasks={nodes} " in job
            # One torchrun per task (srun passes on the shell prefix's PATH: common.smk).
            assert f"--label torchrun --nnodes={nodes} --nproc_per_node={per_node}" in job
            assert f"--nnodes={nodes} --nproc_per_node={per_node} --rdzv_backend=c10d" in job
    gpus = {name: int(s["nodes"]) * int(s["gres"].split(":")[1]) for name, s in shapes.items()}
    assert gpus == {
        "gemnet-125m-gp1": 1,
        "gemnet-245m-gp2": 2,
        "gemnet-480m-gp4": 4,
        "gemnet-960m-gp8": 8,
        "gemnet-125m-gp1-dp32": 32,
        "gemnet-245m-gp2-dp32": 64,
        "gemnet-480m-gp4-dp32": 128,
        "gemnet-960m-gp8-dp32": 256,
    }
