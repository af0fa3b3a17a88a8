"""Where results come from: package versions, the checkout's git commit and sha256 checksums.

    package_versions()            {package: installed version or None} for PACKAGES
    git_commit()                  this checkout's commit, None outside a git checkout
    sha256_file(path)             hex digest of a file, read in 1 MiB blocks
    checkpoint_provenance(...)    the `provenance` of a metrics file computed from a checkpoint

Metrics files (graphpar.evaluate, graphpar.relax), scaling results (graphpar.scaling) and
metrics bundles (graphpar.report.bundle) record these.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import subprocess
from pathlib import Path

from graphpar.data.lmdb import dataset_identity
from graphpar.io import read_json

# The packages whose versions a result records.
PACKAGES = ("graphpar", "torch", "torch-geometric", "ase", "numpy")

# Fields of a result that measure the run itself (clock time, speed, memory), not what it
# computed: the only ones that differ between two runs on one machine (training curves, scaling
# results, metrics bundles). Metrics, predictions and relaxed structures hold none of them.
RUN_MEASURES = (
    "samples_per_s",
    "peak_memory_mb",
    "peak_memory_mb_per_gpu",
    "peak_memory_mb_per_rank",
    "tflops_per_gpu",
    "step_seconds_median",
    "created",
    "imported",
)


def sha256_bytes(data: bytes) -> str:
    """The sha256 hex digest of `data`."""
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | Path) -> str:
    """The sha256 hex digest of the file at `path`, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def git_commit() -> str | None:
    """This checkout's commit (None outside a git checkout)."""
    try:
        result = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            check=True,
        )
    except (OSError, subprocess.CalledProcessError):
        return None
    return result.stdout.strip()


def package_versions(packages: tuple[str, ...] = PACKAGES) -> dict[str, str | None]:
    """Installed versions of `packages` (None for one that is not installed)."""
    versions = {}
    for package in packages:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    return versions


def checkpoint_provenance(checkpoint: Path, state: dict, data: Path) -> dict:
    """Where a metrics file's numbers come from: the checkpoint (`state`: its contents, already
    read), its config hash, model and parameter count, the preprocessed dataset `data` (its
    metadata's sha256 and its content identity, `graphpar.data.lmdb.dataset_identity`), this
    checkout and its packages;
    for a converted published checkpoint (graphpar.convert) also its `source`: the original
    file, its sha256 and, from the workflow, its URL and published numbers (`publication`)."""
    from graphpar.models import count_parameters  # torch: only where a checkpoint is read
    from graphpar.training.normalization import model_arguments

    model_config = state["config"]
    found = {
        "checkpoint": str(checkpoint),
        "checkpoint_sha256": sha256_file(checkpoint),
        "config_hash": state["config_hash"],
        "model": model_config["model"],
        # The network's own count: a run's model_args (widths) change it from the registry's.
        "parameters": count_parameters(model_config["model"], **model_arguments(model_config)),
        "step": state["step"],
        "dataset": str(data),
        "dataset_metadata_sha256": sha256_file(data / "metadata.json"),
        "dataset_identity": dataset_identity(read_json(data / "metadata.json")),
        "git_commit": git_commit(),
        "versions": package_versions(),
    }
    if state.get("source") is not None:
        found["source"] = state["source"]
    return found
