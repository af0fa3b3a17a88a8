"""One job at a time on an output folder (a training run, a relaxation folder).

    with folder_lock(out, "training"):
        ...  # nobody else writes in `out` meanwhile

(`main_rank_lock` for a torchrun job: its main rank holds the lock for all its processes.)

The lock is the file `<folder>/.graphpar.lock`, created exclusively (O_EXCL, which NFS honours
too) and holding who holds it: host, process id and its start time, SLURM job id, command. A
second job on the same folder is refused with the holder named. A lock whose holder is gone is
taken over with a log line, so a killed, preempted or requeued job never waits on its own lock:

- the holder ran on this host and its process no longer exists (or the id now belongs to a
  younger process);
- the holder's SLURM job is this job (a requeued job keeps its id, and SLURM ended the previous
  run of it before starting this one);
- the holder's SLURM job has ended (squeue no longer knows it, or shows it in a final state).

A holder on another host outside SLURM cannot be checked from here: refused, naming the file to
delete once that job is known to be gone.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

LOCK_NAME = ".graphpar.lock"

# squeue states of a job that will not run again (SLURM's job state codes).
ENDED_STATES = {
    "BOOT_FAIL",
    "CANCELLED",
    "COMPLETED",
    "DEADLINE",
    "FAILED",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "PREEMPTED",
    "TIMEOUT",
}

log = logging.getLogger("graphpar.lock")


class FolderLocked(RuntimeError):
    """Another job holds the folder; the message names it."""


def _process_start(pid: int) -> int | None:
    """The start time of process `pid` in clock ticks since boot (None if it does not exist)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])  # field 22, after the command in parentheses


def holder() -> dict:
    """This process as a lock holder."""
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "start": _process_start(os.getpid()),
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        "command": " ".join(sys.argv),
        "since": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "token": uuid.uuid4().hex,
    }


def slurm_job_state(job_id: str) -> str | None:
    """The job's state as squeue shows it; "ENDED" when squeue no longer knows the job, None
    when there is no squeue to ask."""
    try:
        result = subprocess.run(
            ["squeue", "--noheader", "--jobs", str(job_id), "--format", "%T"],
            capture_output=True,
            text=True,
            timeout=60,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    state = result.stdout.strip()
    if result.returncode != 0 or not state:  # "Invalid job id specified": purged, long ended
        return "ENDED"
    return state.split()[0]


def gone(record: dict) -> str | None:
    """Why the holder of `record` is gone, or None while it may still be running."""
    if record.get("host") == socket.gethostname():
        start = _process_start(int(record.get("pid", -1)))
        if start is None:
            return f"process {record.get('pid')} no longer exists"
        if record.get("start") is not None and start != record["start"]:
            return f"process {record.get('pid')} is another process now"
        return None
    job = record.get("slurm_job_id")
    if job is None:
        return None
    if job == os.environ.get("SLURM_JOB_ID"):
        return f"SLURM job {job} is this job, requeued"
    state = slurm_job_state(job)
    if state == "ENDED":
        return f"SLURM job {job} has ended (squeue no longer lists it)"
    if state in ENDED_STATES:
        return f"SLURM job {job} has ended ({state.lower()})"
    return None


def _describe(record: dict) -> str:
    job = f", SLURM job {record['slurm_job_id']}" if record.get("slurm_job_id") else ""
    return (
        f"process {record.get('pid')} on {record.get('host')}{job} since {record.get('since')} "
        f"({record.get('command')})"
    )


def _read(path: Path) -> tuple[str, dict] | None:
    """(text, record) of a lock file; None if there is none. A file cut by a kill between its
    creation and its write reads as the empty record: nobody can hold it."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    try:
        record = json.loads(text)
    except ValueError:
        record = {}
    return text, record if isinstance(record, dict) else {}


def _move_aside(path: Path, text: str, aside: Path) -> bool:
    """Move the stale lock file `path` (read as `text`) aside; False if what was moved turned
    out to be another job's fresh lock (then it is put back)."""
    try:
        os.replace(path, aside)
    except FileNotFoundError:
        return False  # another job moved it first
    if aside.read_text() == text:
        aside.unlink()
        return True
    with contextlib.suppress(FileExistsError):
        os.link(aside, path)  # back where it was, unless a third job holds the name already
    aside.unlink()
    return False


def acquire(folder: Path, what: str) -> dict:
    """Take `folder`'s lock for `what` (a word for the messages); returns our record."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_NAME
    mine = holder()
    for _ in range(10):  # each round either takes the lock or moves a stale one aside
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            found = _read(path)
            if found is None:
                continue  # released meanwhile
            text, record = found
            reason = gone(record) if record else "its lock file is empty"
            if reason is None:
                if record.get("host") != mine["host"] and not record.get("slurm_job_id"):
                    hint = f"; if that job is gone, delete {path}"
                else:
                    hint = ""
                raise FolderLocked(
                    f"{folder} is in use by another {what} job: {_describe(record)}{hint}"
                ) from None
            aside = path.with_name(f"{LOCK_NAME}.stale-{mine['token']}")
            if _move_aside(path, text, aside):
                log.warning("%s: took over the lock of %s: %s", folder, _describe(record), reason)
            continue
        with os.fdopen(fd, "w") as file:
            json.dump(mine, file)
        return mine
    raise FolderLocked(f"{folder}: could not take its lock ({path}); several jobs compete for it")


def release(folder: Path, record: dict) -> None:
    """Give `folder`'s lock back, if it is still ours."""
    path = folder / LOCK_NAME
    found = _read(path)
    if found is not None and found[1].get("token") == record["token"]:
        path.unlink(missing_ok=True)


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike, what: str) -> Iterator[None]:
    """Hold `folder`'s lock for the block (see the module docstring)."""
    folder = Path(folder)
    record = acquire(folder, what)
    try:
        yield
    finally:
        release(folder, record)


@contextlib.contextmanager
def main_rank_lock(folder: str | os.PathLike, what: str) -> Iterator[None]:
    """`folder_lock` for a job of several processes: the main rank holds the lock, and every
    rank raises FolderLocked when it could not take it (a collective: every rank calls it)."""
    from graphpar.parallel import broadcast, is_main

    folder, record, refused = Path(folder), None, None
    if is_main():
        try:
            record = acquire(folder, what)
        except FolderLocked as error:
            refused = str(error)
    refused = broadcast(refused)
    if refused is not None:
        raise FolderLocked(refused)
    try:
        yield
    finally:
        if record is not None:
            release(folder, record)
