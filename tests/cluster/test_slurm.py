"""The workflow on a real SLURM (tests/cluster/local_slurm.py: munged, slurmctld, slurmd on
127.0.0.1) through workflow/profiles/slurm plus the test node's site profile: every rule's jobs
are sbatch jobs, training starts torchrun the way a cluster would, and a preempted job resumes."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
from collections import Counter
from fnmatch import fnmatch
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import copy_test_workdir, tool_env

from cluster.conftest import run_on_slurm, site_settings, slurm_snakemake, submissions
from graphpar.provenance import RUN_MEASURES
from graphpar.training.checkpoint import read_checkpoint

# The fixtures' time counts too: the local tiny run, the SLURM daemons.
pytestmark = pytest.mark.timeout(3600)

# What the SLURM run builds of the tiny config: the data stages and the GemNet training (its
# scale factors' fit first), each rule once, not the whole DAG (each job starts Snakemake twice
# on its node). S2EF evaluation, relaxations, DimeNet++, the scaling study and multi-node
# launches run on SLURM in test_rehearsal.py (every paper config) and
# test_preempted_multi_node_training_job_resumes_to_the_uninterrupted_weights.
SLURM_TARGETS = ("results/tiny/checkpoints/gemnet/final.pt", "resources/mini/lmdb/is2re/val_id")
# The local run's files that the jobs of SLURM_TARGETS write (generate_mini writes every split).
SLURM_OUTPUTS = (
    "resources/mini/manifest.json",
    "resources/mini/s2ef/*",
    "resources/mini/is2re/*",
    "resources/mini/lmdb/s2ef/train/*",
    "resources/mini/lmdb/s2ef/train.shards/*",
    "resources/mini/lmdb/s2ef/val_id/*",
    "resources/mini/lmdb/s2ef/val_id.shards/*",
    "resources/mini/lmdb/is2re/val_id/*",
    "results/tiny/checkpoints/gemnet/*",
    "results/tiny/scale_factors/*",
    "results/tiny/metrics/gemnet/training.jsonl",
)
# The rules of the local tiny run that the rehearsals run on SLURM instead, and `submission`
# (one numpy process reading predictions, no GPU or torchrun: tests/test_submission.py).
REHEARSED = {"evaluate_s2ef", "relax", "submission"}
# The workflow's local rules among them (`localrules:` in workflow/rules/*.smk): jobs that only
# list and link files run where Snakemake runs, never as sbatch jobs.
LOCAL = {"preprocess_plan", "preprocess_s2ef"}
# Jobs planned only once a checkpoint ran, so absent from the first "Job stats" table: one
# preprocess_shard per shard of each S2EF split's plan (checkpoint preprocess_plan).
AFTER_CHECKPOINT = {"preprocess_shard"}

# What differs between two runs of one computation: the fields that measure the run itself,
# and the provenance (the machine and the launch).
MACHINE_KEYS = {*RUN_MEASURES, "provenance"}


def planned_jobs(output: str) -> Counter:
    """Snakemake's "Job stats" table: jobs per rule (without the target-only rule `all`)."""
    table = output.split("Job stats:", 1)[1].splitlines()[3:]
    counts = Counter()
    for line in table:
        fields = line.split()
        if len(fields) != 2 or fields[0] == "total":
            break
        counts[fields[0]] = int(fields[1])
    counts.pop("all", None)
    return counts


def rule_of(slurm_log: Path) -> str:
    """The rule of a SLURM job log: .snakemake/slurm_logs/rule_<rule>/<wildcards>/<id>.log."""
    return next(part[5:] for part in slurm_log.parts if part.startswith("rule_"))


def rendezvous(log: str) -> list[dict[str, str]]:
    """Every torchrun agent's "Rendezvous complete" report in a job log (LOGLEVEL=INFO)."""
    reports = []
    for block in log.split("Rendezvous complete for workers.")[1:]:
        fields = dict(re.findall(r"\]\s+(\w+)=(\S.*)$", block[:2500], flags=re.M))
        reports.append(fields)
    return reports


def without_machine_keys(value):
    """`value` (parsed JSON) without MACHINE_KEYS, at any depth."""
    if isinstance(value, dict):
        return {k: without_machine_keys(v) for k, v in value.items() if k not in MACHINE_KEYS}
    if isinstance(value, list):
        return [without_machine_keys(v) for v in value]
    return value


def assert_outputs_match(local: Path, remote: Path, outputs: tuple[str, ...]) -> None:
    """The SLURM run's resources/ and results/ against the local run's files that match
    `outputs` (glob patterns): the same files, and the same bits: raw data, LMDBs, predictions
    and relaxed structures byte for byte, checkpoints' weights exactly (and their bytes where
    the config is the same), metrics and training curves equal but for MACHINE_KEYS; logs
    aside. Two runs of one machine compute the same
    bits whatever launches them (workflow/rules/common.smk: one CPU thread per process), so
    this is also the test that a second run reproduces the first (README, "The machine")."""
    everything = set()
    for top in ("resources", "results"):
        files = {p.relative_to(local) for p in (local / top).rglob("*") if p.is_file()}
        files = {p for p in files if any(fnmatch(str(p), pattern) for pattern in outputs)}
        remote_files = {p.relative_to(remote) for p in (remote / top).rglob("*") if p.is_file()}
        assert files == remote_files, f"{top}: {sorted(map(str, files ^ remote_files))}"
        everything |= files
    suffixes = {path.suffix for path in everything}
    assert {".json", ".jsonl", ".pt", ".npz", ".xz", ".lmdb"} <= suffixes, suffixes
    same_config = []
    for path in sorted(everything):
        a, b = local / path, remote / path
        name = str(path)
        if path.suffix == ".log":
            continue
        elif path.suffix == ".json":
            mine, theirs = json.loads(a.read_text()), json.loads(b.read_text())
            assert without_machine_keys(theirs) == without_machine_keys(mine), name
        elif path.suffix == ".jsonl":
            mine = [json.loads(line) for line in a.read_text().splitlines()]
            theirs = [json.loads(line) for line in b.read_text().splitlines()]
            assert without_machine_keys(theirs) == without_machine_keys(mine), name
        elif path.suffix == ".pt":
            mine, theirs = read_checkpoint(a), read_checkpoint(b)
            assert mine["step"] == theirs["step"], name
            assert mine["model"].keys() == theirs["model"].keys(), name
            for key, tensor in mine["model"].items():
                assert torch.equal(theirs["model"][key], tensor), f"{name}: {key}"
            if mine["config"] == theirs["config"]:  # gemnet's: the same bytes, RNG states too
                assert a.read_bytes() == b.read_bytes(), name
                same_config.append(name)
        elif path.suffix == ".npz":
            with np.load(a) as x, np.load(b) as y:
                assert sorted(x.files) == sorted(y.files), name
                for key in x.files:
                    np.testing.assert_array_equal(y[key], x[key], err_msg=f"{name}: {key}")
        else:
            assert a.read_bytes() == b.read_bytes(), name
    assert any("gemnet" in name for name in same_config), same_config


def test_tiny_workflow_on_slurm_matches_the_local_run(slurm, tiny_workflow, tmp_path, monkeypatch):
    """Every job of SLURM_TARGETS is an sbatch job (its SLURM id in Snakemake's log, SLURM's
    own log for it), and these jobs cover every rule the local tiny run ran but those the
    rehearsals run on SLURM; the training is
    one task running torchrun with 2 processes (a site of 2 GPUs per node); every output has
    the local run's bits."""
    monkeypatch.setenv("LOGLEVEL", "INFO")  # torchrun then logs each agent's rendezvous
    workdir = copy_test_workdir(tmp_path / "run")

    started = time.monotonic()
    result = run_on_slurm(workdir, site_settings(tmp_path, gpus_per_node=2), *SLURM_TARGETS)
    print(f"tiny workflow on SLURM: {time.monotonic() - started:.0f} s")
    output = result.stdout
    assert result.returncode == 0, output[-6000:]

    submitted = submissions(output)
    rules = Counter(rule_of(log) for *_, log in submitted)
    planned = planned_jobs(output)
    shards = sum(
        len(json.loads(plan.read_text())["shards"])
        for plan in (workdir / "resources/mini/lmdb/s2ef").glob("*.shards/plan.json")
    )
    assert rules == Counter(
        {rule: n for rule, n in planned.items() if rule not in LOCAL}, preprocess_shard=shards
    )
    assert set(planned) >= LOCAL, "the local rules ran too, outside SLURM"
    first_local_log = sorted((tiny_workflow / ".snakemake" / "log").glob("*.snakemake.log"))[0]
    local_rules = set(planned_jobs(first_local_log.read_text())) | AFTER_CHECKPOINT
    assert set(rules) == local_rules - REHEARSED - LOCAL, "every other rule on SLURM"
    assert len({slurm_id for _, slurm_id, _ in submitted}) == len(submitted)
    for _, slurm_id, log in submitted:
        assert log.name == f"{slurm_id}.log" and log.is_file(), log
        assert f"rule {rule_of(log)}:" in log.read_text(), log

    agents = rendezvous((workdir / "logs/train/tiny/gemnet.log").read_text())
    assert len(agents) == 1 and agents[0]["global_world_sizes"] == "[2, 2]"

    assert_outputs_match(tiny_workflow, workdir, SLURM_OUTPUTS)


def test_preempted_multi_node_training_job_resumes_to_the_uninterrupted_weights(
    slurm, tiny_workflow, tmp_path
):
    """A run of G x D = 2 x 2 on a site of 2 GPUs per node spans 2 nodes (emulated on the one
    test node): 2 GPUs per node and one task per node (SLURM's record and the sbatch line, never
    a task per GPU), each running a torchrun agent of 2 processes at one c10d rendezvous, with
    the profile's warning signal. `scancel --signal=USR1` (what SLURM sends before the time
    limit) reaches the job step: the trainer stops after its step with checkpoint.pt written,
    Snakemake reports the failed job with its log, the rule's retry resubmits it, and training
    resumes at that step (none repeated) to the bits of the same run left alone, trained beside
    it in the same Snakemake call."""
    workdir = tmp_path / "run"
    shutil.copytree(tiny_workflow / "config", workdir / "config")
    shutil.copytree(tiny_workflow / "resources", workdir / "resources")  # no re-preprocessing
    # The tiny run's fitted scale factors (same model): no fitting job before this one.
    fitted = workdir / "scale_factors.json"
    shutil.copy(tiny_workflow / "results/tiny/scale_factors/gemnet.json", fitted)
    config_file = workdir / "config" / "config.yaml"
    config = yaml.safe_load(config_file.read_text())
    steps = 6  # signalled once its first checkpoint exists, the job resumes for the rest
    run = {
        "model": "gemnet-tiny",
        "scale_factors": str(fitted),
        "gp_size": 2,
        "dp_size": 2,
        "train": ["train"],
        "batch_size": 4,
        "max_steps": steps,
        "checkpoint_every": 1,
        "eval_every": 10**6,
    }
    config["train"] = {"gp4": run, "gp4-alone": run}
    config_file.write_text(yaml.safe_dump(config))
    site = site_settings(tmp_path, gpus_per_node=2)
    targets = [f"results/tiny/checkpoints/{name}/final.pt" for name in config["train"]]
    command = slurm_snakemake(workdir, site, "--verbose", *targets)
    env = dict(tool_env(), LOGLEVEL="INFO")  # torchrun then logs its rendezvous
    out_file = tmp_path / "snakemake.out"
    checkpoint = workdir / "results/tiny/checkpoints/gp4/checkpoint.pt"
    with open(out_file, "w") as out:
        snakemake = subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    try:
        deadline = time.monotonic() + 300
        while not checkpoint.exists():
            assert snakemake.poll() is None, out_file.read_text()[-4000:]
            assert time.monotonic() < deadline, "no checkpoint within 300 s"
            time.sleep(0.2)
        jobs = subprocess.run(
            ["squeue", "-h", "-t", "RUNNING", "-o", "%i %k"], capture_output=True, text=True
        ).stdout.splitlines()
        job = [line.split()[0] for line in jobs if line.endswith("rule_train_wildcards_gp4")]
        assert len(job) == 1, jobs
        record = subprocess.run(
            ["scontrol", "show", "job", job[0]], capture_output=True, text=True, check=True
        ).stdout
        subprocess.run(["scancel", "--signal=USR1", job[0]], check=True)
        snakemake.wait(timeout=600)
    finally:
        if snakemake.poll() is None:  # Snakemake may ignore SIGTERM while jobs are queued
            os.killpg(snakemake.pid, signal.SIGKILL)
    output = out_file.read_text()
    assert snakemake.returncode == 0, output[-6000:]

    # SLURM's record: a task per node with 2 GPUs per node (both "nodes" on the test node).
    assert re.search(r"\bNumTasks=2\b", record), record
    assert "TresPerNode=gres:gpu:2" in record, record
    calls = [line for line in output.splitlines() if "sbatch call:" in line]
    sbatch = [line for line in calls if "--comment rule_train_wildcards_gp4 " in line]
    assert len(sbatch) == 2, "the signalled job and its retry"
    for line in sbatch:
        assert "--gres=gpu:2" in line and "--ntasks-per-gpu" not in line, line
        assert "--ntasks=2 " in line and "--nodes=1 " in line, line  # the site's 1: emulated
        assert "--signal=USR1@300" in line, line  # the profile's warning before the time limit

    # Snakemake reported the stopped job as failed, with its logs, then resubmitted it.
    assert "Error in rule train" in output
    assert "logs/train/tiny/gp4.log" in output
    submitted = [s for s in submissions(output) if s[2].parent.name == "gp4"]
    assert [slurm_id for _, slurm_id, _ in submitted][0] == int(job[0])
    assert len(submitted) == 2
    assert str(submitted[0][2]) in output.split("Error in rule train", 1)[1]

    # The retry resumed at the step the signal stopped: two torchrun agents of 2 processes.
    agents = rendezvous((workdir / "logs/train/tiny/gp4.log").read_text())
    assert len(agents) == 2, "one torchrun agent per node"
    assert sorted(a["group_rank"] for a in agents) == ["0", "1"]
    assert {a["group_world_size"] for a in agents} == {"2"}
    assert {a["global_world_sizes"] for a in agents} == {"[4, 4]"}
    train_log = (workdir / "results/tiny/checkpoints/gp4/train.log").read_text()
    stopped = re.search(r"preempted at step (\d+), checkpoint written", train_log)
    resumed = re.search(r"resumed from \S+ at step (\d+)", train_log)
    assert stopped and resumed and stopped[1] == resumed[1], train_log
    assert 1 <= int(resumed[1]) < steps, train_log
    metrics = workdir / "results/tiny/checkpoints/gp4/metrics.jsonl"
    train_steps = [json.loads(x)["step"] for x in metrics.read_text().splitlines()]
    assert train_steps == list(range(1, steps + 1)), "no step lost or repeated"
    final = read_checkpoint(workdir / targets[0])
    alone = read_checkpoint(workdir / targets[1])
    assert final["step"] == alone["step"] == steps
    for key, tensor in alone["model"].items():
        assert torch.equal(final["model"][key], tensor), key
