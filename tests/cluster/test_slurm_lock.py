"""A folder lock held by a SLURM job on another node (graphpar.lock), against the real local
SLURM: refused while the job runs, taken over once squeue shows it ended."""

from __future__ import annotations

import json
import logging
import subprocess
import time

import pytest

from graphpar.lock import LOCK_NAME, FolderLocked, folder_lock, holder, slurm_job_state


def wait_for_state(job: str, states: set[str], seconds: float = 60) -> str:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        state = slurm_job_state(job)
        if state in states:
            return state
        time.sleep(0.2)
    raise AssertionError(f"SLURM job {job} did not reach {states} (last {state})")


def test_the_lock_of_an_ended_slurm_job_is_taken_over(slurm, tmp_path, caplog):
    submitted = subprocess.run(
        ["sbatch", "--parsable", "--output=/dev/null", "--wrap", "sleep 300"],
        capture_output=True,
        text=True,
        check=True,
    )
    job = submitted.stdout.strip().split(";")[0]
    try:
        wait_for_state(job, {"PENDING", "RUNNING"})
        # Held by that job's rank 0 on another node: its process cannot be checked from here.
        record = {**holder(), "host": "gpu-node-31", "pid": 1, "slurm_job_id": job}
        (tmp_path / LOCK_NAME).write_text(json.dumps(record))
        with pytest.raises(FolderLocked, match=f"SLURM job {job}"), folder_lock(tmp_path, "train"):
            pass
    finally:
        subprocess.run(["scancel", job], check=True)
    wait_for_state(job, {"CANCELLED", "ENDED"})
    with caplog.at_level(logging.WARNING, logger="graphpar.lock"), folder_lock(tmp_path, "train"):
        assert json.loads((tmp_path / LOCK_NAME).read_text())["slurm_job_id"] != job
    assert f"SLURM job {job} has ended" in caplog.text
