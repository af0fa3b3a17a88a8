"""Every paper config rehearsed end to end on the local SLURM: `--configfile config/paper/X.yaml
config/rehearsal.yaml` through workflow/profiles/slurm and a site profile, as a user would
before spending GPU-days (config/rehearsal.yaml says what a rehearsal keeps and shrinks).

The four rehearsals run at once, each Snakemake in its own folder, on the embedded data the tiny
run already made (the overlay's dataset is the tiny config's). Each site's GPUs per node makes
the largest runs span two emulated nodes: GemNet-XL's and DimeNet++-XL's G x D = 4 x 2 on nodes
of 4, the scaling study's 8 x 2 on nodes of 8.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from conftest import REPO, tool_env

from cluster.conftest import CPUS, site_settings, slurm_snakemake, submissions
from cluster.test_slurm import planned_jobs, rendezvous, rule_of
from graphpar.model_configs import tiny_widths
from graphpar.training.checkpoint import read_checkpoint

pytestmark = pytest.mark.timeout(3600)

# Paper config: the site's GPUs per node for its rehearsal, and the targets (default: all).
REHEARSALS = {
    "gemnet-xl.yaml": (4, ()),
    "dimenetpp-xl.yaml": (4, ()),
    "oc20-200k.yaml": (2, ()),
    "scaling.yaml": (8, ("scaling_study",)),
}
OVERLAY = yaml.safe_load((REPO / "config/rehearsal.yaml").read_text())


@pytest.fixture(scope="module")
def rehearsals(slurm, tiny_workflow, tmp_path_factory):
    """Run every rehearsal at once on the local SLURM: {config name: (workdir, output, rc)}."""
    root = tmp_path_factory.mktemp("rehearsals")
    tiny = yaml.safe_load((tiny_workflow / "config/config.yaml").read_text())
    assert OVERLAY["dataset"] == tiny["dataset"], "the overlay's data is the tiny run's"
    running = {}
    for name, (gpus_per_node, targets) in REHEARSALS.items():
        workdir = root / name.removesuffix(".yaml")
        shutil.copytree(REPO / "config", workdir / "config")
        shutil.copytree(tiny_workflow / "resources", workdir / "resources")
        site = site_settings(workdir.parent, gpus_per_node, f"site-{name}", max_threads=CPUS)
        configs = ("--configfile", f"config/paper/{name}", "config/rehearsal.yaml")
        command = slurm_snakemake(workdir, site, *targets, *configs)  # --configfile takes 2
        out = open(root / f"{name}.out", "w")  # noqa: SIM115 (closed below)
        env = dict(tool_env(), LOGLEVEL="INFO")  # torchrun then logs its rendezvous
        running[name] = (workdir, out, subprocess.Popen(command, stdout=out, stderr=out, env=env))
    results = {}
    try:
        for name, (workdir, out, process) in running.items():
            process.wait(timeout=1500)
            out.close()
            results[name] = (workdir, Path(out.name).read_text(), process.returncode)
    finally:
        for _, out, process in running.values():
            if process.poll() is None:
                process.kill()
            out.close()
    return results


def paper_config(name: str) -> dict:
    return yaml.safe_load((REPO / "config/paper" / name).read_text())


@pytest.mark.parametrize("name", REHEARSALS)
def test_every_paper_config_rehearses_on_slurm(rehearsals, name):
    """Every job of the rehearsal is an sbatch job that succeeded; every training run keeps its
    model and depth, G, recipe and scale factors, with tiny widths and D at most 2, on one
    torchrun agent per node; a fine-tuning run starts from its rehearsed checkpoint; the
    scaling study measures every run."""
    workdir, output, returncode = rehearsals[name]
    assert returncode == 0, output[-6000:]
    submitted = submissions(output)
    planned = planned_jobs(output)
    for target_only in re.findall(r"^localrule (\w+):", output, flags=re.M):  # scaling_study
        planned.pop(target_only, None)
    assert sorted(rule_of(log) for *_, log in submitted) == sorted(planned.elements()), (
        "every job on SLURM"
    )
    experiment = f"{paper_config(name)['experiment']}-rehearsal"
    results = workdir / "results" / experiment
    gpus_per_node = REHEARSALS[name][0]
    steps = OVERLAY["rehearsal"]["steps"]

    for run, paper in paper_config(name).get("train", {}).items():
        checkpoint = read_checkpoint(results / "checkpoints" / run / "final.pt")
        config = checkpoint["config"]
        dp_size = min(paper.get("dp_size") or 1, OVERLAY["rehearsal"]["dp_size"])
        assert checkpoint["step"] == steps, run
        assert config["model"] == paper["model"] and config["gp_size"] == paper["gp_size"], run
        assert config["dp_size"] == dp_size, run
        for key in ("optimizer", "scheduler", "loss", "ema_decay", "clip_grad_norm", "task"):
            if key in paper:
                expected = paper[key]
                actual = config[key]
                if isinstance(expected, dict):
                    actual = {k: actual[k] for k in expected}
                assert actual == expected, (run, key)
        if "scale_factors" in paper:  # the paper's published file, as it is
            assert config["scale_factors"] == paper["scale_factors"], run
        widths = tiny_widths(paper["model"])
        assert widths and config["model_args"] == widths, run
        if paper.get("init_checkpoint"):
            start = paper["init_checkpoint"].replace(
                f"results/{paper_config(name)['experiment']}/", f"results/{experiment}/"
            )
            assert config["init_checkpoint"] == start, run
        processes = paper["gp_size"] * dp_size
        nodes = max(1, processes // gpus_per_node)
        agents = rendezvous((workdir / "logs/train" / experiment / f"{run}.log").read_text())
        assert len(agents) == nodes, (run, "one torchrun agent per node")
        per_node = processes // nodes
        assert {a["global_world_sizes"] for a in agents} == {str([processes] * per_node)}, run
        if config["task"] == "s2ef":  # evaluated and relaxed on the overlay's split
            for split in OVERLAY["rehearsal"]["splits"]:
                for task in ("s2ef", "is2rs", "is2re"):
                    metrics = json.loads(
                        (results / f"metrics/{run}/{task}_{split}.json").read_text()
                    )
                    assert metrics["n_systems"] >= 1, (run, task)
        else:  # energy only (GemNet-XL-FT): evaluated directly, never relaxed
            for split in OVERLAY["rehearsal"]["splits"]:
                metrics = json.loads((results / f"metrics/{run}/is2re_{split}.json").read_text())
                assert metrics["method"] == "direct" and metrics["n_systems"] >= 1, run
                assert not (results / f"metrics/{run}/is2rs_{split}.json").exists(), run

    for run, paper in paper_config(name).get("scaling", {}).get("runs", {}).items():
        measured = json.loads((results / "scaling" / f"{run}.json").read_text())
        dp_size = min(paper.get("dp_size") or 1, OVERLAY["rehearsal"]["dp_size"])
        assert (measured["model"], measured["gp_size"]) == (paper["model"], paper["gp_size"])
        assert measured["dp_size"] == dp_size and measured["steps_measured"] == 1, run
