"""Fixtures of the cluster tests: a real local SLURM (munge, slurmctld, slurmd) while they run,
and Snakemake runs through workflow/profiles/slurm plus this test node's site settings.

Needs root and apt (or the packages already installed): skipped with the reason otherwise, which
fails the tests under CI (tests/conftest.py turns every skip into a failure there).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import REPO, SNAKEFILE, tool_env

from cluster.local_slurm import CPU_OVERCOMMIT, LocalSlurm, Unavailable

PROFILE = REPO / "workflow" / "profiles" / "slurm"
CPUS = (os.cpu_count() or 1) * CPU_OVERCOMMIT  # the test node's, as SLURM knows it
# "Job 3 has been submitted with SLURM jobid 12 (log: /.../.snakemake/slurm_logs/...log)."
SUBMITTED = re.compile(r"Job (\d+) has been submitted with SLURM jobid (\d+) \(log: (\S+?)\)\.?$")


def site_settings(
    root: Path, gpus_per_node: int | None = None, name: str = "site", max_threads: int | None = None
) -> Path:
    """The test node's site profile, given after ours. It holds what a real cluster does not
    need: no accounting database (no account, squeue instead of sacct), status checks every
    second (the plugin first checks after 40 s, Snakemake then every 10 s), at most the
    machine's CPUs per job (max_threads: more, up to the node's CPUS as SLURM knows them, for
    jobs of many processes: each asks for a CPU per process), and optionally the site's
    `gpus_per_node` (its `config:`, as a real site profile sets it) with every node of a
    multi-node job emulated on the one test node: the job's tasks (one torchrun agent each)
    share it. `name`: the profile's folder under `root`."""
    settings = {
        "slurm-no-account": True,
        # sacct without a database: Snakemake hung for over 10 minutes and ignored SIGTERM.
        "slurm-status-command": "squeue",
        "slurm-init-seconds-before-status-checks": 1,
        "seconds-between-status-checks": 1,
        "max-threads": max_threads or os.cpu_count() or 1,
    }
    if gpus_per_node is not None:
        settings["config"] = {"site": {"gpus_per_node": gpus_per_node}}
        # A later profile replaces a whole top-level key: start from ours.
        ours = yaml.safe_load((PROFILE / "config.yaml").read_text())
        resources = ours["set-resources"]
        for rule in ("train", "scaling", "relax"):  # the rules whose jobs may span nodes
            resources[rule] = {**resources[rule], "nodes": 1}
        settings["set-resources"] = resources
    profile = root / name
    profile.mkdir(parents=True, exist_ok=True)
    (profile / "config.yaml").write_text(yaml.safe_dump(settings))
    return profile


def slurm_snakemake(workdir: Path, site: Path, *args: str) -> list[str]:
    """The command line of snakemake --profile workflow/profiles/slurm --profile SITE, checking
    its jobs every second as the site asks (snakemake_polling_every_second.py)."""
    command = [sys.executable, str(Path(__file__).with_name("snakemake_polling_every_second.py"))]
    command += ["--snakefile", str(SNAKEFILE), "--directory", str(workdir)]
    return [*command, "--profile", str(PROFILE), "--profile", str(site), *args]


def run_on_slurm(
    workdir: Path, site: Path, *args: str, timeout: float = 1800, env: dict | None = None
) -> subprocess.CompletedProcess:
    """Run Snakemake on the local SLURM to the end; output in the result, stdout and stderr
    together. Killed (SIGKILL: it ignores SIGTERM while jobs are queued) after `timeout` s."""
    log = workdir.parent / f"{workdir.name}-snakemake.out"
    with open(log, "w") as out:
        process = subprocess.Popen(
            slurm_snakemake(workdir, site, *args),
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env or tool_env(),
            start_new_session=True,
        )
    try:
        process.wait(timeout=timeout)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    return subprocess.CompletedProcess(process.args, process.returncode, log.read_text(), "")


def submissions(output: str) -> list[tuple[int, int, Path]]:
    """(Snakemake job id, SLURM job id, SLURM log) of every submission in Snakemake's output."""
    found = []
    for line in output.splitlines():
        match = SUBMITTED.search(line.strip())
        if match:
            found.append((int(match[1]), int(match[2]), Path(match[3])))
    return found


@pytest.fixture(scope="package")
def slurm(tmp_path_factory):
    """A running local SLURM for the cluster tests; stopped (only what it started) after them."""
    cluster = LocalSlurm(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start()
    except Unavailable as reason:
        pytest.skip(f"no local SLURM: {reason}")
    try:
        yield cluster
    finally:
        cluster.stop()
