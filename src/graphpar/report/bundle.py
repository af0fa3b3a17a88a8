"""Metrics bundles: a colleague's results as one tar, regenerated into tables and figures here.

A bundle holds, relative to `results/`, `<experiment>/metrics/**` (metrics JSON with their
provenance, learning curves), `<experiment>/predictions/**` and `<experiment>/scaling/**`, plus
`MANIFEST.json` (sha256 of every file, the exporting checkout's git commit, the time). No
checkpoints, no data. Import checks every member (relative path under those folders, regular
file, sha256 as the manifest says, metrics with provenance), never overwrites different local
files unless asked, and records where the files came from in `<experiment>/imported.json`.
"""

from __future__ import annotations

import datetime
import io
import json
import os
import re
import shutil
import tarfile
import tempfile
from pathlib import Path, PurePosixPath

from graphpar.io import atomic_path, write_json
from graphpar.provenance import git_commit, sha256_bytes, sha256_file

MANIFEST = "MANIFEST.json"
# Only results, never anything executable or large: what the report reads.
MEMBER = re.compile(r"^[A-Za-z0-9._-]+/(metrics|predictions|scaling)/[A-Za-z0-9._/-]+$")


class BundleError(ValueError):
    """A bundle that cannot be imported as it is (bad member, checksum, conflict)."""


def bundle_files(results: Path, experiment: str, predictions: bool = True) -> list[Path]:
    """The files of `experiment` a bundle carries, relative to `results` (OC20's S2EF
    predictions run to gigabytes: `predictions=False` leaves them, and the parity plots, out)."""
    results = Path(results)
    root = results / experiment
    if not (root / "metrics").is_dir():
        raise BundleError(f"{root}/metrics does not exist: nothing to export")
    folders = ("metrics", "predictions", "scaling") if predictions else ("metrics", "scaling")
    files = [
        path.relative_to(results)
        for folder in folders
        for path in sorted((root / folder).rglob("*"))
        if path.is_file() and not path.name.startswith(".")
    ]
    return [path for path in files if MEMBER.match(path.as_posix())]


def export_bundle(
    results: Path, experiments: list[str], out: Path, predictions: bool = True
) -> dict:
    """Write a bundle of `experiments` (folders of `results`) to `out` (tar, atomically)."""
    results = Path(results)
    files = [
        path
        for experiment in experiments
        for path in bundle_files(results, experiment, predictions)
    ]
    manifest = {
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "git_commit": git_commit(),
        "experiments": sorted(experiments),
        "files": {path.as_posix(): sha256_file(results / path) for path in files},
    }
    with atomic_path(out) as tmp, tarfile.open(tmp, "w") as tar:
        data = json.dumps(manifest, indent=2, sort_keys=True).encode()
        info = tarfile.TarInfo(MANIFEST)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
        for path in files:
            tar.add(results / path, arcname=path.as_posix(), recursive=False)
    return manifest


def _read_members(bundle: Path) -> tuple[dict, dict[str, bytes]]:
    """(manifest, {member path: bytes}) after checking every member."""
    contents: dict[str, bytes] = {}
    with tarfile.open(bundle, "r:*") as tar:
        for member in tar.getmembers():
            name = member.name.removeprefix("./")
            if member.isdir():
                continue
            path = PurePosixPath(name)
            if not member.isfile() or path.is_absolute() or ".." in path.parts:
                raise BundleError(f"{bundle}: refusing member {member.name!r}")
            if name != MANIFEST and not MEMBER.match(name):
                raise BundleError(
                    f"{bundle}: {member.name!r} is not <experiment>/(metrics|predictions|"
                    "scaling)/...: a bundle carries results only"
                )
            contents[name] = tar.extractfile(member).read()
    if MANIFEST not in contents:
        raise BundleError(
            f"{bundle}: no {MANIFEST} (export with `python -m graphpar.report export`)"
        )
    manifest = json.loads(contents.pop(MANIFEST))
    listed = manifest.get("files", {})
    if set(listed) != set(contents):
        missing, unlisted = sorted(set(listed) - set(contents)), sorted(set(contents) - set(listed))
        raise BundleError(f"{bundle}: missing members {missing}, unlisted members {unlisted}")
    for name, data in contents.items():
        if sha256_bytes(data) != listed[name]:
            raise BundleError(f"{bundle}: {name} does not match its sha256 in {MANIFEST}")
        if "/metrics/" in name and name.endswith(".json"):
            metrics = json.loads(data)
            if not {"task", "split", "provenance"} <= set(metrics):
                raise BundleError(f"{bundle}: {name} lacks task, split or provenance")
    return manifest, contents


def import_bundle(
    bundle: Path, results: Path, rename: str | None = None, force: bool = False
) -> list[str]:
    """Unpack `bundle` into `results`; returns the experiments imported.

    `rename` imports a one-experiment bundle under another name (e.g. when a local experiment
    has the same name). A local file that differs from the bundle's is an error unless `force`.
    Each experiment gets `imported.json`: the bundle's name, sha256, manifest and import time.
    """
    bundle, results = Path(bundle), Path(results)
    manifest, contents = _read_members(bundle)
    experiments = sorted({name.split("/", 1)[0] for name in contents})
    if rename is not None:
        if len(experiments) != 1:
            raise BundleError(f"{bundle}: --as needs a one-experiment bundle, not {experiments}")
        if not re.fullmatch(r"[A-Za-z0-9._-]+", rename):
            raise BundleError(f"--as {rename!r}: not a folder name")
        contents = {f"{rename}/{name.split('/', 1)[1]}": data for name, data in contents.items()}
        experiments = [rename]
    conflicts = [
        name
        for name, data in contents.items()
        if (results / name).is_file() and (results / name).read_bytes() != data
    ]
    if conflicts and not force:
        raise BundleError(
            f"{bundle}: {len(conflicts)} local file(s) differ from the bundle's, e.g. "
            f"{results / conflicts[0]}; import under another name (--as) or overwrite (--force)"
        )
    # Unpack beside the destination, then rename file by file: a reader sees old or new files.
    results.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".bundle-", dir=results))
    try:
        for name, data in contents.items():
            (staging / name).parent.mkdir(parents=True, exist_ok=True)
            (staging / name).write_bytes(data)
        for name in contents:
            (results / name).parent.mkdir(parents=True, exist_ok=True)
            os.replace(staging / name, results / name)
    finally:
        shutil.rmtree(staging)
    record = {
        "bundle": bundle.name,
        "bundle_sha256": sha256_file(bundle),
        "imported": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "manifest": {key: manifest.get(key) for key in ("created", "git_commit", "experiments")},
    }
    for experiment in experiments:
        files = sorted(name for name in contents if name.startswith(f"{experiment}/"))
        write_json(results / experiment / "imported.json", {**record, "files": files})
    return experiments
