"""Debian packages the tests need beyond the venv (slurm-wlm and munge for tests/cluster, chromium
for the HTML report), installed with apt-get when a command is missing and the tests run as root.

    python tests/debian_packages.py    install them all now (.ci/run does, beside `make install`)
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Sequence

SYSTEM_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"

# {what needs them: (Debian packages, the commands they provide)}
SLURM = (
    ("slurm-wlm", "munge"),
    ("slurmctld", "slurmd", "sbatch", "srun", "squeue", "scancel", "munged", "munge"),
)
CHROMIUM = (("chromium",), ("chromium",))
NEEDED = {"tests/cluster (a local SLURM)": SLURM, "tests/test_report_html.py": CHROMIUM}


class Unavailable(RuntimeError):
    """A prerequisite (root, apt, the packages) is missing: the reason says which."""


def ensure_packages(packages: Sequence[str], commands: Sequence[str]) -> None:
    """Install `packages` with apt-get unless every one of `commands` is already there."""
    if all(shutil.which(c, path=SYSTEM_PATH) for c in commands):
        return
    names = "/".join(packages)
    if os.geteuid() != 0:
        raise Unavailable(f"{names} not installed and installing needs root")
    if shutil.which("apt-get") is None:
        raise Unavailable(f"{names} not installed and apt-get is not available")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for command in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", *packages]):
        result = subprocess.run(command, capture_output=True, text=True, env=env)
        if result.returncode != 0:
            raise Unavailable(f"{' '.join(command)} failed: {result.stderr[-2000:]}")


if __name__ == "__main__":
    import sys

    for user, (packages, commands) in NEEDED.items():
        try:
            ensure_packages(packages, commands)
            print(f"{' '.join(packages)}: installed ({user})")
        except Unavailable as reason:  # the tests that need them say so again
            print(f"{' '.join(packages)}: {reason}", file=sys.stderr)
