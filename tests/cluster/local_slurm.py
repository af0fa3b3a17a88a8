"""A real one-node SLURM on 127.0.0.1 for the cluster tests: munged, slurmctld and slurmd from
Debian's packages (slurm-wlm 22.05, munge), no accounting database.

Only what this module starts is stopped, by process id; a config it replaces under /etc/slurm is
restored afterwards.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import stat
import subprocess
import time
from pathlib import Path

from debian_packages import SLURM, Unavailable, ensure_packages

# The plugin drops SLURM_CONF before `srun` inside a job, so the config must be at the default.
CONF_DIR = Path("/etc/slurm")
# GPUs of the test node. SLURM 22.05 drops count-only GPUs ("Removing file-less GPU"), so each
# is backed by a stand-in character device (/dev/null's numbers) that nothing opens.
# Up to 8 per job (the scaling study's G = 8 rehearsed), several jobs at once (the four
# rehearsals of tests/cluster/test_rehearsal.py run together).
GPUS = 24
# Declared CPUs per real CPU: a job of two emulated nodes of 8 GPUs asks for 16 (one per
# process) and the rehearsals run several such jobs at once; most jobs ask for one or two.
CPU_OVERCOMMIT = 16
# A GPU node's memory, for the profile's train requests (128 GB each): the rehearsals run
# several trainings at once.
DECLARED_MEMORY_MB = 1_024_000


def memory_mb() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) // 1024
    raise RuntimeError("no MemTotal in /proc/meminfo")


def munge_works() -> bool:
    encode = subprocess.run(["munge", "-n"], capture_output=True)
    if encode.returncode != 0:
        return False
    return subprocess.run(["unmunge"], input=encode.stdout, capture_output=True).returncode == 0


class LocalSlurm:
    """One node (`node`): CPU_OVERCOMMIT x this machine's CPUs, DECLARED_MEMORY_MB and GPUS GPUs.

    `start()` brings the daemons up and waits for the node to be idle; `stop()` kills what
    `start()` started and restores /etc/slurm.
    """

    def __init__(self, root: Path):
        self.root = Path(root)
        self.node = socket.gethostname()
        self.cpus = os.cpu_count() or 1
        self.memory_mb = memory_mb()
        self.processes: list[subprocess.Popen] = []
        self.saved: dict[Path, bytes | None] = {}

    # -- configuration ---------------------------------------------------------------------

    def slurm_conf(self) -> str:
        state = self.root / "state"
        return "\n".join(
            [
                "ClusterName=graphpar-test",
                f"SlurmctldHost={self.node}(127.0.0.1)",
                "SlurmUser=root",
                "AuthType=auth/munge",
                f"StateSaveLocation={state}/ctld",
                f"SlurmdSpoolDir={state}/d",
                f"SlurmctldPidFile={state}/slurmctld.pid",
                f"SlurmdPidFile={state}/slurmd.pid",
                f"SlurmctldLogFile={self.root}/slurmctld.log",
                f"SlurmdLogFile={self.root}/slurmd.log",
                # No cgroups in a container: track processes by parent, bind nothing.
                "ProctrackType=proctrack/linuxproc",
                "TaskPlugin=task/none",
                "MpiDefault=none",
                "SelectType=select/cons_tres",
                "SelectTypeParameters=CR_CPU_Memory",
                # No accounting database: finished jobs must stay visible to squeue, which is
                # how the plugin learns their state (--slurm-status-command squeue).
                "MinJobAge=300",
                "AccountingStorageType=accounting_storage/none",
                "JobAcctGatherType=jobacct_gather/none",
                "JobCompType=jobcomp/none",
                "ReturnToService=2",
                "SchedulerType=sched/builtin",
                "SlurmctldTimeout=30",
                "SlurmdTimeout=30",
                "KillWait=5",
                "GresTypes=gpu",
                # The plugin always passes --mem, which needs RealMemory. Declared at least
                # DECLARED_MEMORY_MB (config_overrides: slurmd does not check it) so that the
                # shipped profile's per-node requests fit; nothing enforces memory here.
                "SlurmdParameters=config_overrides",
                f"NodeName={self.node} NodeAddr=127.0.0.1 CPUs={self.cpus * CPU_OVERCOMMIT} "
                f"RealMemory={max(self.memory_mb, DECLARED_MEMORY_MB)} Gres=gpu:{GPUS} "
                "State=UNKNOWN",
                f"PartitionName=test Nodes={self.node} Default=YES MaxTime=INFINITE State=UP",
                "",
            ]
        )

    def gres_conf(self) -> str:
        return f"NodeName={self.node} Name=gpu File={self.root}/gpu[0-{GPUS - 1}]\n"

    def _make_gpu_devices(self) -> None:
        null = os.stat("/dev/null").st_rdev
        for index in range(GPUS):
            path = self.root / f"gpu{index}"
            if not path.exists():
                os.mknod(path, 0o600 | stat.S_IFCHR, null)

    def _write(self, path: Path, text: str) -> None:
        if path not in self.saved:
            self.saved[path] = path.read_bytes() if path.exists() else None
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)

    def _restore(self) -> None:
        for path, content in self.saved.items():
            if content is None:
                path.unlink(missing_ok=True)
            else:
                path.write_bytes(content)
        self.saved.clear()

    # -- daemons ------------------------------------------------------------------------------

    def _spawn(self, command: list[str], log: str, **kwargs) -> subprocess.Popen:
        with open(self.root / log, "ab") as out:
            process = subprocess.Popen(
                command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, **kwargs
            )
        self.processes.append(process)
        return process

    def _start_munge(self) -> None:
        if munge_works():
            return  # a munged is already serving this machine: use it, never stop it
        for directory in ("/run/munge", "/var/lib/munge", "/var/log/munge"):
            Path(directory).mkdir(parents=True, exist_ok=True)
            shutil.chown(directory, "munge", "munge")
        self._spawn(["munged", "--foreground"], "munged.out", user="munge", group="munge")
        self._wait(munge_works, 20, "munged did not start")

    def start(self) -> None:
        if os.geteuid() != 0:
            raise Unavailable("a local SLURM needs root (slurmd runs jobs as their user)")
        ensure_packages(*SLURM)
        # (Zombies left by an earlier, killed run do not count.)
        running = subprocess.run(
            ["pgrep", "-x", "--runstates", "R,S,D,T", "slurmctld|slurmd"], capture_output=True
        )
        if running.returncode == 0:
            raise Unavailable("a slurmctld or slurmd is already running on this machine")
        for sub in ("state/ctld", "state/d"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        try:
            self._make_gpu_devices()
            self._write(CONF_DIR / "slurm.conf", self.slurm_conf())
            self._write(CONF_DIR / "gres.conf", self.gres_conf())
            self._start_munge()
            # -i: ignore any state left by an earlier test run (none: the state dir is new).
            self._spawn(["slurmctld", "-D", "-i"], "slurmctld.out")
            self._spawn(["slurmd", "-D", "-N", self.node], "slurmd.out")
            self._wait(self._node_idle, 60, "the test node did not become idle")
        except BaseException:
            self.stop()
            raise

    def _node_idle(self) -> bool:
        result = subprocess.run(
            ["sinfo", "-h", "-N", "-o", "%T", "-n", self.node], capture_output=True, text=True
        )
        return result.returncode == 0 and result.stdout.strip() == "idle"

    def _no_running_jobs(self) -> bool:
        result = subprocess.run(
            ["squeue", "-h", "-t", "RUNNING,COMPLETING", "-o", "%i"], capture_output=True, text=True
        )
        return result.returncode != 0 or not result.stdout.strip()

    def _wait(self, ready, seconds: float, message: str) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if ready():
                return
            for process in self.processes:
                if process.poll() is not None:
                    raise RuntimeError(f"{message}: {process.args[0]} exited\n{self.logs()}")
            time.sleep(0.5)
        raise RuntimeError(f"{message} within {seconds} s\n{self.logs()}")

    def logs(self) -> str:
        parts = []
        for name in ("slurmctld.log", "slurmd.log", "munged.out", "slurmctld.out", "slurmd.out"):
            path = self.root / name
            if path.exists():
                parts.append(f"--- {name}\n{path.read_text(errors='replace')[-3000:]}")
        return "\n".join(parts)

    def stop(self) -> None:
        """Cancel leftover jobs, then stop the daemons this object started (slurmd first)."""
        if any(p.poll() is None for p in self.processes):
            # Our test partition only, so that slurmd still runs while the jobs end.
            subprocess.run(["scancel", "--full", "--partition=test"], capture_output=True)
            deadline = time.monotonic() + 30
            while not self._no_running_jobs() and time.monotonic() < deadline:
                time.sleep(0.5)
        for process in reversed(self.processes):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(timeout=15)
        self.processes.clear()
        self._restore()
