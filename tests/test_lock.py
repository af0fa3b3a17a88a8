"""One job at a time on an output folder (graphpar.lock): refused while the holder lives, taken
over (with a log line) once it is gone. The SLURM case is in tests/cluster/test_slurm.py."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys

import pytest

from graphpar.lock import LOCK_NAME, FolderLocked, folder_lock, holder


def write_lock(folder, **changes) -> dict:
    record = {**holder(), **changes}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / LOCK_NAME).write_text(json.dumps(record))
    return record


def test_a_second_job_is_refused_and_the_lock_is_released_after(tmp_path):
    with folder_lock(tmp_path, "training"):
        record = json.loads((tmp_path / LOCK_NAME).read_text())
        assert record["pid"] == os.getpid() and record["host"] == socket.gethostname()
        with (
            pytest.raises(
                FolderLocked, match=rf"in use by another training job: process {os.getpid()}"
            ),
            folder_lock(tmp_path, "training"),
        ):
            pass
        assert (tmp_path / LOCK_NAME).exists()  # the refused job left the holder's lock alone
    assert not (tmp_path / LOCK_NAME).exists()
    with folder_lock(tmp_path, "training"):  # free again
        pass


def test_the_lock_of_a_dead_process_is_taken_over_with_a_log_line(tmp_path, caplog):
    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    write_lock(tmp_path, pid=int(gone.stdout))
    with (
        caplog.at_level(logging.WARNING, logger="graphpar.lock"),
        folder_lock(tmp_path, "relaxation"),
    ):
        assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    assert f"took over the lock of process {int(gone.stdout)}" in caplog.text
    assert "no longer exists" in caplog.text
    assert [p.name for p in tmp_path.iterdir()] == []  # nothing moved aside is left


def test_a_reused_process_id_and_an_empty_lock_file_are_taken_over(tmp_path):
    write_lock(tmp_path, pid=os.getpid(), start=1)  # this pid, but another process's start time
    with folder_lock(tmp_path, "training"):
        pass
    (tmp_path / LOCK_NAME).write_text("")  # cut by a kill between its creation and its write
    with folder_lock(tmp_path, "training"):
        pass


def test_a_requeued_slurm_job_takes_over_its_own_lock(tmp_path, monkeypatch):
    """SLURM requeues a preempted job under the same id, maybe on another node."""
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    write_lock(tmp_path, host="node-17", pid=1, slurm_job_id="4242")
    with folder_lock(tmp_path, "training"):
        assert json.loads((tmp_path / LOCK_NAME).read_text())["host"] == socket.gethostname()


def test_a_holder_on_another_host_without_slurm_is_refused_with_the_file_to_delete(tmp_path):
    write_lock(tmp_path, host="workstation-2", pid=1, slurm_job_id=None)
    named = rf"on workstation-2 .*delete {tmp_path / LOCK_NAME}"
    with pytest.raises(FolderLocked, match=named), folder_lock(tmp_path, "training"):
        pass
