"""Metrics bundles: a colleague's results as one tar, regenerated into tables and figures here.

A bundle holds, relative to `results/`, `<experiment>/metrics/**` (metrics JSON with their
provenance, learning curves), `<experiment>/predictions/**` and `<experiment>/scaling/**`, plus
`MANIFEST.json` (sha256 of every file, the exporting checkout's git commit, the time). No
checkpoints, no data. Import checks every member (relative path under those folders, regular
file, sha256 as the manifest says, metrics with provenance and without NaN or Infinity), never
overwrites different local files unless asked, and records where the files came from in
`<experiment>/imported.json`. It streams each member to disk in chunks: the members' sizes are
checked against caps and the free disk before anything is written, and again while copying.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import io
import json
import os
import re
import shutil
import tarfile
import tempfile
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from graphpar.io import atomic_path, parse_json, write_json
from graphpar.provenance import git_commit, sha256_file

MANIFEST = "MANIFEST.json"
# An experiment's folder name, as the workflow's config schema allows it (full match: not "",
# ".", "..", "a/b", "x\n").
EXPERIMENT = r"[A-Za-z0-9][A-Za-z0-9_.-]*"
# Only results, never anything executable or large: what the report reads (full match).
MEMBER = re.compile(rf"{EXPERIMENT}/(metrics|predictions|scaling)/[A-Za-z0-9._/-]+")
# Folders of results/ that are no experiment: the published numbers and committed benchmarks.
RESERVED = ("paper", "benchmarks")
MB = 10**6
# Uncompressed size caps of an import (--max-member-mb, --max-total-mb). The largest real member
# is an OC20 S2EF split's predictions npz, ~0.7 GB (1M frames of float16 forces, float32 labels,
# ids); a full bundle with every val and test split's predictions ~4 GB.
DEFAULT_MAX_MEMBER_MB = 2000
DEFAULT_MAX_TOTAL_MB = 10000
# The manifest and metrics JSON are parsed in memory; real ones are kilobytes.
MAX_PARSED_JSON_BYTES = 16 * MB
CHUNK_BYTES = 1 << 20


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
    return [path for path in files if MEMBER.fullmatch(path.as_posix())]


def export_bundle(
    results: Path, experiments: list[str], out: Path, predictions: bool = True
) -> dict:
    """Write a bundle of `experiments` (folders of `results`) to `out` (tar, atomically)."""
    results = Path(results)
    for experiment in experiments:
        check_experiment(experiment, "--experiment")
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


def check_experiment(name: str, source: str) -> None:
    """Refuse an experiment name that is not one folder name of the workflow's pattern (full
    match), or that names a folder of results/ holding no experiment (`RESERVED`)."""
    if not re.fullmatch(EXPERIMENT, name):
        raise BundleError(f"{source} {name!r}: not an experiment folder name ({EXPERIMENT})")
    if name in RESERVED:
        raise BundleError(
            f"{source} {name!r}: results/{name}/ is reserved (the published numbers and "
            "benchmarks), not an experiment"
        )


def _member_name(member: tarfile.TarInfo, bundle: Path) -> str:
    """The member's path relative to results/ (or MANIFEST.json), refused unless it is a regular
    file at a normalised relative path under <experiment>/(metrics|predictions|scaling)/."""
    name = member.name.removeprefix("./")
    path = PurePosixPath(name)
    if not member.isfile() or path.is_absolute() or ".." in path.parts or path.as_posix() != name:
        raise BundleError(f"{bundle}: refusing member {member.name!r}")
    if name != MANIFEST and not MEMBER.fullmatch(name):
        raise BundleError(
            f"{bundle}: {member.name!r} is not <experiment>/(metrics|predictions|"
            "scaling)/...: a bundle carries results only"
        )
    return name


def _is_metrics_json(name: str) -> bool:
    """Whether member `name` is a metrics JSON (<experiment>/metrics/.../*.json)."""
    return PurePosixPath(name).parts[1] == "metrics" and name.endswith(".json")


def _check_size(bundle: Path, what: str, size: int, cap: int, option: str) -> None:
    """Refuse `size` bytes (uncompressed) over `cap`; `option` says which cap."""
    if size > cap:
        raise BundleError(
            f"{bundle}: {what} {size:,} bytes uncompressed, over the cap of {cap:,} ({option})"
        )


def _scan_headers(
    tar: tarfile.TarFile, bundle: Path, max_member_bytes: int, max_total_bytes: int
) -> dict[str, tarfile.TarInfo]:
    """The file members by name (MANIFEST.json included), checked from their headers as they are
    read, before any data: names, types, no duplicates, declared sizes within the per-member
    and total caps (a member over a cap stops the scan before its data is decompressed)."""
    members: dict[str, tarfile.TarInfo] = {}
    total = 0
    for member in tar:
        if member.isdir():
            continue
        name = _member_name(member, bundle)
        if name in members:
            raise BundleError(f"{bundle}: member {name!r} appears twice")
        if name == MANIFEST or _is_metrics_json(name):
            _check_size(bundle, f"{name} holds", member.size, MAX_PARSED_JSON_BYTES, "parsed JSON")
        _check_size(bundle, f"{name} holds", member.size, max_member_bytes, "--max-member-mb")
        total += member.size
        _check_size(bundle, "the members hold", total, max_total_bytes, "--max-total-mb")
        members[name] = member
    return members


def copy_capped(source: BinaryIO, target: BinaryIO, declared: int, what: str) -> str:
    """Copy `source` to `target` in 1 MiB chunks and return the data's sha256; data beyond the
    `declared` size (a header that lies) is a BundleError naming `what`, before it is written."""
    digest = hashlib.sha256()
    copied = 0
    while chunk := source.read(CHUNK_BYTES):
        copied += len(chunk)
        if copied > declared:
            raise BundleError(f"{what}: more than the {declared:,} bytes its header declares")
        digest.update(chunk)
        target.write(chunk)
    return digest.hexdigest()


def _parse_bundled_json(data: bytes, where: str) -> dict:
    """A bundled JSON object (manifest, metrics), NaN and Infinity refused; errors name `where`."""
    try:
        parsed = parse_json(data, where)
    except json.JSONDecodeError as error:
        raise BundleError(f"{where}: not JSON ({error})") from error
    except ValueError as error:  # NaN or Infinity: the message names `where`
        raise BundleError(str(error)) from error
    if not isinstance(parsed, dict):
        raise BundleError(f"{where}: a JSON object expected, found {type(parsed).__name__}")
    return parsed


def _read_manifest(tar: tarfile.TarFile, members: dict[str, tarfile.TarInfo], bundle: Path) -> dict:
    """The bundle's manifest (taken out of `members`), its file list the same as the members."""
    if MANIFEST not in members:
        raise BundleError(
            f"{bundle}: no {MANIFEST} (export with `python -m graphpar.report export`)"
        )
    member = members.pop(MANIFEST)
    data = io.BytesIO()
    with tar.extractfile(member) as source:
        copy_capped(source, data, member.size, f"{bundle}: {MANIFEST}")
    manifest = _parse_bundled_json(data.getvalue(), f"{bundle}: {MANIFEST}")
    listed = manifest.get("files")
    if not isinstance(listed, dict):
        raise BundleError(f"{bundle}: {MANIFEST} has no files object")
    if set(listed) != set(members):
        missing, unlisted = sorted(set(listed) - set(members)), sorted(set(members) - set(listed))
        raise BundleError(f"{bundle}: missing members {missing}, unlisted members {unlisted}")
    return manifest


def _destinations(
    names: list[str], results: Path, rename: str | None, bundle: Path
) -> dict[str, str]:
    """{member name: destination relative to `results`}: the experiment renamed to `rename` (a
    one-experiment bundle only); refused when an experiment is not a valid destination name or a
    destination resolves outside results/<experiment>/ (through a symlink)."""
    experiments = sorted({name.split("/", 1)[0] for name in names})
    if rename is not None and len(experiments) != 1:
        raise BundleError(f"{bundle}: --as needs a one-experiment bundle, not {experiments}")
    for experiment in experiments if rename is None else [rename]:
        check_experiment(experiment, f"{bundle}: experiment")
    destinations = {}
    for name in names:
        experiment, inner = name.split("/", 1)
        experiment = experiment if rename is None else rename
        root = (results / experiment).resolve()
        resolved = (results / experiment / inner).resolve()
        if not resolved.is_relative_to(root):
            raise BundleError(f"{bundle}: {name} would be written to {resolved}, outside {root}")
        destinations[name] = f"{experiment}/{inner}"
    return destinations


def _check_free_space(results: Path, needed: int, bundle: Path) -> None:
    """Refuse an import whose members need more bytes than the disk of `results` has free."""
    existing = next(p for p in (results.absolute(), *results.absolute().parents) if p.exists())
    free = shutil.disk_usage(existing).free
    if needed > free:
        raise BundleError(
            f"{bundle}: the members need {needed:,} bytes, {existing} has {free:,} free"
        )


def _stage(
    tar: tarfile.TarFile,
    members: dict[str, tarfile.TarInfo],
    listed: dict[str, str],
    staging: Path,
    bundle: Path,
) -> None:
    """Stream every member to `staging/<name>` in chunks and check it: no more than its declared
    size, the manifest's sha256, metrics JSON with task, split and provenance, no NaN."""
    for name, member in members.items():
        staged = staging / name
        staged.parent.mkdir(parents=True, exist_ok=True)
        with tar.extractfile(member) as source, open(staged, "xb") as target:
            digest = copy_capped(source, target, member.size, f"{bundle}: {name}")
        if digest != listed[name]:
            raise BundleError(f"{bundle}: {name} does not match its sha256 in {MANIFEST}")
        if _is_metrics_json(name):
            metrics = _parse_bundled_json(staged.read_bytes(), f"{bundle}: {name}")
            if not {"task", "split", "provenance"} <= set(metrics):
                raise BundleError(f"{bundle}: {name} lacks task, split or provenance")


def _unpack(
    tar: tarfile.TarFile,
    members: dict[str, tarfile.TarInfo],
    listed: dict[str, str],
    destinations: dict[str, str],
    results: Path,
    bundle: Path,
) -> None:
    """Stage and check every member beside the destination, then rename file by file (a reader
    sees old or new files); a refused member leaves nothing behind, folders created included."""
    created = [path for path in (results, *results.parents) if not path.exists()]
    results.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".bundle-", dir=results))
    try:
        _stage(tar, members, listed, staging, bundle)
    except BaseException:
        shutil.rmtree(staging)
        for folder in created:  # deepest first; only the empty folders made here
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise
    try:
        for name, destination in destinations.items():
            (results / destination).parent.mkdir(parents=True, exist_ok=True)
            os.replace(staging / name, results / destination)
    finally:
        shutil.rmtree(staging)


def import_bundle(
    bundle: Path,
    results: Path,
    rename: str | None = None,
    force: bool = False,
    *,
    max_member_bytes: int = DEFAULT_MAX_MEMBER_MB * MB,
    max_total_bytes: int = DEFAULT_MAX_TOTAL_MB * MB,
) -> list[str]:
    """Unpack `bundle` into `results`; returns the experiments imported.

    `rename` imports a one-experiment bundle under another name (e.g. when a local experiment
    has the same name). A local file that differs from the bundle's is an error unless `force`.
    A member over `max_member_bytes`, members over `max_total_bytes` together or over the free
    disk are refused (uncompressed, from the headers) before anything is written; members are
    streamed, never held in memory. Each experiment gets `imported.json`: the bundle's name,
    sha256, manifest and import time.
    """
    bundle, results = Path(bundle), Path(results)
    if rename is not None:
        check_experiment(rename, "--as")
    try:
        with tarfile.open(bundle, "r:*") as tar:
            members = _scan_headers(tar, bundle, max_member_bytes, max_total_bytes)
            manifest = _read_manifest(tar, members, bundle)
            destinations = _destinations(list(members), results, rename, bundle)
            _check_free_space(results, sum(m.size for m in members.values()), bundle)
            conflicts = [
                results / destination
                for name, destination in destinations.items()
                if (results / destination).is_file()
                and sha256_file(results / destination) != manifest["files"][name]
            ]
            if conflicts and not force:
                raise BundleError(
                    f"{bundle}: {len(conflicts)} local file(s) differ from the bundle's, e.g. "
                    f"{conflicts[0]}; import under another name (--as) or overwrite (--force)"
                )
            _unpack(tar, members, manifest["files"], destinations, results, bundle)
    except (tarfile.TarError, EOFError) as error:
        raise BundleError(f"{bundle}: cannot read the archive ({error})") from error
    record = {
        "bundle": bundle.name,
        "bundle_sha256": sha256_file(bundle),
        "imported": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "manifest": {key: manifest.get(key) for key in ("created", "git_commit", "experiments")},
    }
    experiments = sorted({destination.split("/", 1)[0] for destination in destinations.values()})
    for experiment in experiments:
        files = sorted(d for d in destinations.values() if d.startswith(f"{experiment}/"))
        write_json(results / experiment / "imported.json", {**record, "files": files})
    return experiments
