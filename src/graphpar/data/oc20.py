"""OC20 archives: the file catalogue, a resumable verified download and a safe extraction.

The Open Catalyst 2020 data ship as tar archives of up to 225 GB compressed (1.1 TB unpacked),
so everything here streams: downloads resume from a `.part` file with HTTP Range requests, and
extraction reads the tar in a single pass without ever holding it in memory.

Layout produced under a data root (matching the OCP `download_data.py` split names):

* `s2ef/<split>/` holds `*.extxyz.xz` + `*.txt.xz` (or uncompressed) for train/val/md/rattled
  splits, and LMDB shards for the S2EF test splits;
* `is2re/<split>/data.lmdb` for `train`, `train_10k`, `train_100k` and the val/test splits.

Sizes are bytes unless a string says otherwise ("344M / 1.7G" is compressed / uncompressed).
This module must stay importable without torch: the Snakefile imports it at parse time.

Command line: `python -m graphpar.data.oc20 {list,download,extract} --help`.
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import logging
import lzma
import multiprocessing
import os
import shutil
import sys
import tarfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from tqdm import tqdm

from graphpar import __version__
from graphpar.data.lmdb import LmdbFormatError, UnsafePickleError, pyg_lmdb_length
from graphpar.io import (
    CorruptFileError,
    atomic_path,
    contains,
    count_lines,
    replace_directory,
    write_json,
)

log = logging.getLogger(__name__)

BASE_URL = "https://dl.fbaipublicfiles.com/opencatalystproject/data/"

CHUNK_BYTES = 1 << 20  # 1 MiB: large enough to keep syscalls cheap, small enough to stream
PROGRESS_INTERVAL_S = 5.0  # tqdm redraw interval: the bars end up in Snakemake log files

# Archive layouts: how the members of a tar map onto splits (see `_destination`).
S2EF = "s2ef"  # one split per tar: <name>/<name>/*.extxyz.xz + *.txt.xz
S2EF_TEST = "s2ef_test"  # LMDB shards in .../<test_split>/*.lmdb
IS2RE = "is2re"  # .../is2re/{10k,100k,all}/<split>/data.lmdb
LAYOUTS = (S2EF, S2EF_TEST, IS2RE)

# The suffixes of the S2EF raw files we keep; everything else in an S2EF tar is skipped.
S2EF_SUFFIXES = (".extxyz.xz", ".txt.xz", ".extxyz", ".txt")


# --------------------------------------------------------------------------------------------
# Errors


class DataError(Exception):
    """An expected failure of the data stage: the CLI prints it as one line, no traceback."""


class DownloadError(DataError):
    """A download that could not be completed or did not verify."""


class ExtractError(DataError):
    """An archive that could not be extracted or did not hold what the catalogue says."""


class UnsafeArchiveError(ExtractError):
    """An archive member that could write outside the data root (or is not a plain file)."""


# --------------------------------------------------------------------------------------------
# Catalogue


@dataclass(frozen=True)
class Archive:
    """One downloadable OC20 archive.

    `layout` (S2EF, S2EF_TEST or IS2RE) says how its members map onto splits. `counts` maps our
    split names to the expected number of S2EF frames (or IS2RE systems); None where no source
    documents the number. `size` is the documented "compressed /
    uncompressed" size as a human-readable string.
    """

    name: str
    filename: str
    md5s: tuple[str, ...]
    size: str
    layout: str
    # hash=False: a dict is unhashable, and the other fields identify an archive anyway.
    counts: dict[str, int | None] = field(hash=False)

    @property
    def splits(self) -> tuple[str, ...]:
        """The split names this archive provides, in catalogue order."""
        return tuple(self.counts)

    @property
    def task(self) -> str:
        """The top-level data directory of its splits: "s2ef" or "is2re"."""
        return IS2RE if self.layout == IS2RE else S2EF

    def split_dir(self, split: str) -> str:
        """The directory of `split`, relative to the data root (e.g. "s2ef/val_id")."""
        if split not in self.counts:
            raise KeyError(f"archive {self.name} has no split {split!r}; it has {self.splits}")
        return f"{self.task}/{split}"

    def url(self, base_url: str = BASE_URL) -> str:
        """The download URL of the archive under `base_url`."""
        return f"{base_url.rstrip('/')}/{self.filename}"


# The two OC20 docs (DATASET.md at 14d63868b and docs/core/datasets/oc20.md at HEAD) swap the
# md5s of s2ef_train_2M.tar and s2ef_train_20M.tar, and one of them is wrong. Both archives
# therefore accept both values; the frame count checked after extraction (2M vs 20M) is what
# proves which file was really downloaded.
_MD5_2M_OR_20M = ("953474cb93f0b08cdc523399f03f7c36", "863bc983245ffc0285305a1850e19cf7")
AMBIGUOUS_MD5_ARCHIVES = frozenset({"s2ef_train_2M", "s2ef_train_20M"})

CATALOGUE: dict[str, Archive] = {
    archive.name: archive
    for archive in [
        Archive(
            "s2ef_train_200k",
            "s2ef_train_200K.tar",
            ("f8d0909c2623a393148435dede7d3a46",),
            "344M / 1.7G",
            S2EF,
            {"train_200k": 200_000},
        ),
        Archive(
            "s2ef_train_2M",
            "s2ef_train_2M.tar",
            _MD5_2M_OR_20M,
            "3.4G / 17G",
            S2EF,
            {"train_2M": 2_000_000},
        ),
        Archive(
            "s2ef_train_20M",
            "s2ef_train_20M.tar",
            _MD5_2M_OR_20M[::-1],
            "34G / 165G",
            S2EF,
            {"train_20M": 20_000_000},
        ),
        Archive(
            "s2ef_train_all",
            "s2ef_train_all.tar",
            ("12a7087bfd189a06ccbec9bc7add2bcd",),
            "225G / 1.1T",
            S2EF,
            {"train_all": 133_934_018},
        ),
        Archive(
            "s2ef_val_id",
            "s2ef_val_id.tar",
            ("f57f7f5c1302637940f2cc858e789410",),
            "1.7G / 8.3G",
            S2EF,
            {"val_id": 999_866},
        ),
        Archive(
            "s2ef_val_ood_ads",
            "s2ef_val_ood_ads.tar",
            ("431ab0d7557a4639605ba8b67793f053",),
            "1.7G / 8.2G",
            S2EF,
            {"val_ood_ads": 999_838},
        ),
        Archive(
            "s2ef_val_ood_cat",
            "s2ef_val_ood_cat.tar",
            ("532d6cd1fe541a0ddb0aa0f99962b7db",),
            "1.7G / 8.3G",
            S2EF,
            {"val_ood_cat": 999_809},
        ),
        Archive(
            "s2ef_val_ood_both",
            "s2ef_val_ood_both.tar",
            ("5731862978d80502bbf7017d68c2c729",),
            "1.9G / 9.5G",
            S2EF,
            {"val_ood_both": 999_944},
        ),
        Archive(
            "s2ef_rattled",
            "s2ef_rattled.tar",
            ("40431149b27b64ce1fb40cac4e2e064b",),
            "29G / 136G",
            S2EF,
            {"rattled": 16_677_031},
        ),
        Archive(
            "s2ef_md",
            "s2ef_md.tar",
            ("9fed845aaab8fb4bf85e3a8db57796e0",),
            "42G / 306G",
            S2EF,
            {"md": 38_315_405},
        ),
        Archive(
            "s2ef_test",
            "s2ef_test_lmdbs.tar.gz",
            ("bcada432482f6e87b24e14b6b744992a",),
            "30G / 415G",
            S2EF_TEST,
            {
                "test_id": 999_736,
                "test_ood_ads": 999_859,
                "test_ood_cat": 999_826,
                "test_ood_both": 999_973,
            },
        ),
        Archive(
            "is2re",
            "is2res_train_val_test_lmdbs.tar.gz",
            ("cfc04dd2f87b4102ab2f607240d25fb1",),
            "8.1G / 97G",
            IS2RE,
            {
                "train": 460_328,
                "train_10k": 10_000,
                "train_100k": 100_000,
                "val_id": 24_943,
                "val_ood_ads": 24_961,
                "val_ood_cat": 24_963,
                "val_ood_both": 24_987,
                "test_id": 24_948,
                "test_ood_ads": 24_930,
                "test_ood_cat": 24_965,
                "test_ood_both": 24_985,
            },
        ),
    ]
}

# The archive layouts of each task: S2EF splits come from the raw-text archives and the test
# LMDBs alike, which share the s2ef/ directory.
_TASK_LAYOUTS = {S2EF: (S2EF, S2EF_TEST), IS2RE: (IS2RE,)}


def archive_for_split(task: str, split: str) -> Archive:
    """The catalogue archive that provides `split` of `task` ("s2ef" or "is2re").

    Raises KeyError, listing the valid splits, for an unknown task or split.
    """
    if task not in _TASK_LAYOUTS:
        raise KeyError(f"unknown OC20 task {task!r}; expected one of {sorted(_TASK_LAYOUTS)}")
    candidates = [a for a in CATALOGUE.values() if a.layout in _TASK_LAYOUTS[task]]
    for archive in candidates:
        if split in archive.counts:
            return archive
    valid = [s for archive in candidates for s in archive.splits]
    raise KeyError(f"unknown OC20 {task} split {split!r}; valid splits: {', '.join(valid)}")


def archive_by_filename(filename: str | os.PathLike) -> Archive:
    """The catalogue archive whose file name is the base name of `filename`."""
    basename = Path(filename).name
    for archive in CATALOGUE.values():
        if archive.filename == basename:
            return archive
    known = ", ".join(a.filename for a in CATALOGUE.values())
    raise KeyError(f"no OC20 archive is named {basename!r}; known files: {known}")


# --------------------------------------------------------------------------------------------
# Download


def _progress_bar(*, total: int | None, desc: str, enabled: bool, initial: int = 0) -> tqdm:
    """A byte progress bar on stderr that redraws rarely (it is read in log files)."""
    return tqdm(
        total=total,
        initial=initial,
        desc=desc,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        mininterval=PROGRESS_INTERVAL_S,
        file=sys.stderr,
        disable=not enabled,
    )


def md5sum(path: str | os.PathLike, *, progress: bool = True) -> str:
    """The md5 hex digest of the file at `path`, read in 1 MiB chunks."""
    path = Path(path)
    digest = hashlib.md5()
    with (
        open(path, "rb") as file,
        _progress_bar(total=path.stat().st_size, desc=f"md5 {path.name}", enabled=progress) as bar,
    ):
        while chunk := file.read(CHUNK_BYTES):
            digest.update(chunk)
            bar.update(len(chunk))
    return digest.hexdigest()


def _manual_placement_hint(url: str, dest: Path, md5s: tuple[str, ...], manual_dir) -> str:
    place_at = Path(manual_dir) / dest.name if manual_dir is not None else dest
    return (
        f"download {url} by other means and place it at {place_at} "
        f"(md5 {' or '.join(md5s)}), then rerun"
    )


class _Interrupted(Exception):
    """A transfer that stopped early but can be resumed (short read, reset, timeout, 5xx)."""


def _content_range_start(header: str | None) -> int | None:
    """The first byte of a `Content-Range: bytes <start>-<end>/<total>` header."""
    if not header or not header.startswith("bytes "):
        return None
    first, _, _ = header[len("bytes ") :].partition("-")
    return int(first) if first.isdigit() else None


def _content_range_total(header: str | None) -> int | None:
    if not header:
        return None
    total = header.rpartition("/")[2]
    return int(total) if total.isdigit() else None


def _fetch_once(url: str, part: Path, *, timeout: float, progress: bool) -> int | None:
    """Make one request for `url`, appending to `part` from its current size.

    Returns the file's whole size as the server announced it (None if it did not). Raises
    `_Interrupted` (or OSError / HTTPException) for a failure worth retrying, DownloadError for
    one that is not.
    """
    offset = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": f"graphpar/{__version__}"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    request = urllib.request.Request(url, headers=headers)
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as error:
        error.close()
        if error.code == 416 and offset:
            # Nothing left to send: the part is complete (or too long, which the md5 catches).
            log.info("%s: server has no bytes past %d; verifying the partial file", url, offset)
            return _content_range_total(error.headers.get("Content-Range"))
        if error.code in (408, 429) or error.code >= 500:
            raise _Interrupted(f"HTTP {error.code} {error.reason}") from error
        raise DownloadError(f"HTTP {error.code} {error.reason}") from error

    with response:
        if response.status == 206:
            start = _content_range_start(response.headers.get("Content-Range"))
            if start != offset:
                # Appending bytes from another offset would corrupt the file: start over.
                part.unlink(missing_ok=True)
                raise _Interrupted(f"server resumed at byte {start}, not {offset}; restarting")
            mode = "ab"
            total = _content_range_total(response.headers.get("Content-Range"))
        elif response.status == 200:
            if offset:
                log.info("%s: server ignored the Range request; restarting from byte 0", url)
            offset = 0
            mode = "wb"
            total = None
        else:
            raise DownloadError(f"unexpected HTTP status {response.status} {response.reason}")

        length_header = response.headers.get("Content-Length")
        expected = int(length_header) if length_header and length_header.isdigit() else None
        if total is None and expected is not None:
            total = offset + expected

        received = 0
        with (
            open(part, mode) as out,
            _progress_bar(total=total, initial=offset, desc=part.name, enabled=progress) as bar,
        ):
            while chunk := response.read(CHUNK_BYTES):
                out.write(chunk)
                received += len(chunk)
                bar.update(len(chunk))
    # http.client returns b"" when the peer closes early, so a short transfer shows only here.
    if expected is not None and received < expected:
        raise _Interrupted(f"connection closed after {received} of {expected} bytes")
    return total


def _transfer(
    url: str, part: Path, *, retries: int, timeout: float, progress: bool, backoff: float
) -> int | None:
    """Fetch `url` into `part`, resuming after interruptions; raises DownloadError when stuck.
    Returns the file's size as the server announced it (None if it did not)."""
    failures = 0  # consecutive failed attempts
    while True:
        before = part.stat().st_size if part.exists() else 0
        try:
            return _fetch_once(url, part, timeout=timeout, progress=progress)
        except (_Interrupted, OSError, http.client.HTTPException) as error:
            reason = _describe(error)
            after = part.stat().st_size if part.exists() else 0
            # An attempt that added bytes starts the count afresh: a 225 GB transfer over a flaky
            # link may be cut many times, and every resume brings it closer to the end.
            failures = 1 if after > before else failures + 1
            if failures > retries:
                raise DownloadError(
                    f"could not download {url} after {retries} retries: {reason}"
                ) from error
            delay = backoff * 2 ** (failures - 1)
            log.warning(
                "%s: %s; retry %d of %d in %.2f s, resuming from byte %d",
                url,
                reason,
                failures,
                retries,
                delay,
                after,
            )
            time.sleep(delay)


def _describe(error: BaseException) -> str:
    """A short human reason for a network error (URLError hides the real one in `.reason`)."""
    if isinstance(error, urllib.error.URLError) and not isinstance(error, urllib.error.HTTPError):
        return str(error.reason)
    return str(error) or type(error).__name__


def _adopt_manual_file(manual: Path, dest: Path, md5s: tuple[str, ...], progress: bool) -> str:
    """Verify a file the user placed by hand and move it to `dest` (it is kept if it is bad)."""
    log.info("found %s placed by hand; verifying it instead of downloading", manual)
    actual = md5sum(manual, progress=progress)
    if actual not in md5s:
        raise DownloadError(
            f"{manual} (placed by hand) has md5 {actual}, expected {' or '.join(md5s)}; "
            "the file was left in place: replace it with a good copy and rerun"
        )
    # shutil.move copies across file systems; the atomic rename makes `dest` appear complete.
    with atomic_path(dest) as tmp:
        shutil.move(manual, tmp)
    log.info("verified %s (md5 %s) and moved it to %s", manual, actual, dest)
    return actual


def download(
    url: str,
    dest: str | os.PathLike,
    md5s: str | Iterable[str],
    *,
    retries: int = 5,
    timeout: float = 60.0,
    manual_dir: str | os.PathLike | None = None,
    progress: bool = True,
    backoff: float = 1.0,
) -> str:
    """Download `url` to `dest`, resuming interrupted transfers, and verify its md5.

    Bytes accumulate in `<dest>.part` (deliberately not `dest`, which Snakemake deletes when a job
    fails), so a rerun resumes with an HTTP Range request. `dest` appears, by an atomic rename,
    only once the whole file matches one of `md5s`; a mismatching `.part` is deleted.

    `retries`: how many times in a row an attempt may fail without receiving any byte before
    giving up; waits start at `backoff` seconds and double. `timeout`: seconds a connection may
    stay silent. If `manual_dir/<basename of dest>` exists it is verified and moved to `dest`
    without any network access. Returns the md5 that matched. Raises DownloadError.
    """
    dest = Path(dest)
    md5s = (md5s,) if isinstance(md5s, str) else tuple(md5s)
    dest.parent.mkdir(parents=True, exist_ok=True)

    if manual_dir is not None and (Path(manual_dir) / dest.name).exists():
        return _adopt_manual_file(Path(manual_dir) / dest.name, dest, md5s, progress)

    part = dest.with_name(dest.name + ".part")
    if part.exists():
        log.info("resuming %s from byte %d of %s", url, part.stat().st_size, part)
    else:
        log.info("downloading %s to %s", url, dest)
    try:
        _transfer(url, part, retries=retries, timeout=timeout, progress=progress, backoff=backoff)
    except DownloadError as error:
        hint = _manual_placement_hint(url, dest, md5s, manual_dir)
        raise DownloadError(f"{error}; {hint}") from error.__cause__

    actual = md5sum(part, progress=progress)
    if actual not in md5s:
        part.unlink()
        raise DownloadError(
            f"{url}: md5 mismatch: expected {' or '.join(md5s)}, got {actual}; "
            f"the corrupt partial download {part} was removed, rerun to download it again"
        )
    os.replace(part, dest)
    if len(md5s) > 1:
        log.info("verified %s: md5 %s (accepted: %s)", dest, actual, ", ".join(md5s))
    else:
        log.info("verified %s: md5 %s", dest, actual)
    return actual


def download_sized(
    url: str,
    dest: str | os.PathLike,
    size: int | None = None,
    *,
    retries: int = 5,
    timeout: float = 60.0,
    progress: bool = True,
    backoff: float = 1.0,
) -> int:
    """`download` for a file published without a checksum (OCP's model checkpoints): resumed
    the same way, then checked by size, `size` bytes when given, else the size the server
    announced (Content-Length or Content-Range); a `.part` of another size is deleted, and a
    server that announces no size with no `size` given is refused. Returns the size."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    log.info("%s %s to %s", "resuming" if part.exists() else "downloading", url, dest)
    announced = _transfer(
        url, part, retries=retries, timeout=timeout, progress=progress, backoff=backoff
    )
    expected = size if size is not None else announced
    actual = part.stat().st_size
    if expected is None:
        raise DownloadError(
            f"{url}: the server announced no size and none is configured: cannot verify the "
            f"{actual} bytes received in {part}"
        )
    if actual != expected:
        part.unlink()
        source = "configured" if size is not None else "announced by the server"
        raise DownloadError(
            f"{url}: {actual} bytes received, {expected} {source}; the partial download {part} "
            "was removed, rerun to download it again"
        )
    os.replace(part, dest)
    log.info("verified %s: %d bytes", dest, actual)
    return actual


# --------------------------------------------------------------------------------------------
# Extraction


def _check_member_is_safe(member: tarfile.TarInfo, tar_path: Path) -> None:
    """Refuse any member that could write outside the root or is not a file or directory."""
    name = member.name
    problem = None
    if name.startswith("/") or PurePosixPath(name).is_absolute():
        problem = "an absolute path"
    elif ".." in PurePosixPath(name).parts:
        problem = "a '..' path component"
    elif member.issym() or member.islnk():
        problem = f"a link (to {member.linkname!r})"
    elif member.ischr() or member.isblk() or member.isfifo():
        problem = "a device or fifo"
    elif not (member.isreg() or member.isdir()):
        problem = f"an unsupported member type {member.type!r}"
    if problem:
        raise UnsafeArchiveError(f"{tar_path}: refusing member {name!r}: it is {problem}")


# IS2RE tar layout: .../is2re/<subset>/<split>/data.lmdb, where the train split comes in three
# sizes and the val/test splits only under "all".
_IS2RE_TRAIN_SPLITS = {"all": "train", "10k": "train_10k", "100k": "train_100k"}


def _destination(archive: Archive, member_name: str) -> tuple[str, str] | None:
    """Map a tar member to (split, file name), or None to skip it."""
    parts = PurePosixPath(member_name).parts
    if not parts:
        return None
    basename = parts[-1]
    if archive.layout == S2EF:
        # One split per archive; its nested directories are flattened.
        if basename.endswith(S2EF_SUFFIXES):
            return archive.splits[0], basename
        return None
    if basename.endswith("-lock"):  # LMDB lock files are per-machine state, never data
        return None
    if archive.layout == S2EF_TEST:
        if len(parts) >= 2 and parts[-2] in archive.counts:
            return parts[-2], basename
        return None
    if archive.layout == IS2RE:
        if len(parts) < 4 or basename != "data.lmdb" or parts[-4] != "is2re":
            return None
        subset, split = parts[-3], parts[-2]
        if split == "train":
            split = _IS2RE_TRAIN_SPLITS.get(subset)
        elif subset != "all":
            return None
        if split in archive.counts:
            return split, basename
        return None
    raise ExtractError(f"archive {archive.name} has unknown layout {archive.layout!r}")


def _stream_into_staging(
    archive: Archive, tar_path: Path, staging: Path, *, progress: bool
) -> dict[str, list[str]]:
    """Read the tar once, writing the wanted members under `staging/<task>/<split>/`."""
    files: dict[str, list[str]] = {split: [] for split in archive.splits}
    with (
        open(tar_path, "rb") as raw,
        tqdm.wrapattr(
            raw,
            "read",
            total=tar_path.stat().st_size,
            desc=f"extract {tar_path.name}",
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            mininterval=PROGRESS_INTERVAL_S,
            file=sys.stderr,
            disable=not progress,
        ) as counted,
        tarfile.open(fileobj=counted, mode="r|*") as tar,
    ):
        for member in tar:
            _check_member_is_safe(member, tar_path)
            if member.isdir():
                continue  # directories are created as needed (and flattened for S2EF)
            destination = _destination(archive, member.name)
            if destination is None:
                continue
            split, filename = destination
            target = staging / archive.split_dir(split) / filename
            if target.exists():
                raise ExtractError(
                    f"{tar_path}: member {member.name!r} would overwrite {split}/{filename}, "
                    "already written from another member"
                )
            target.parent.mkdir(parents=True, exist_ok=True)
            source = tar.extractfile(member)
            with source, open(target, "xb") as out:
                shutil.copyfileobj(source, out, CHUNK_BYTES)
            files[split].append(filename)
    return files


def _count_split(archive: Archive, split_dir: Path) -> int:
    """Frames (S2EF text), or entries (LMDB), found in one staged split directory."""
    if archive.layout == S2EF:
        texts = [p for p in split_dir.iterdir() if p.name.endswith((".txt.xz", ".txt"))]
        return sum(count_lines(path) for path in texts)
    return sum(pyg_lmdb_length(path) for path in split_dir.iterdir() if path.name.endswith(".lmdb"))


def _verify_count(archive: Archive, split: str, staging: Path, tar_path: Path) -> int:
    """Count a staged split and compare it with the catalogue; returns the count found."""
    try:
        found = _count_split(archive, staging / archive.split_dir(split))
    except (CorruptFileError, LmdbFormatError, UnsafePickleError) as error:
        raise ExtractError(f"{tar_path}: split {split}: cannot count entries: {error}") from error
    expected = archive.counts[split]
    unit = "systems" if archive.layout == IS2RE else "frames"
    if expected is not None and found != expected:
        message = f"{archive.name}: split {split}: expected {expected:,} {unit}, found {found:,}"
        if archive.name in AMBIGUOUS_MD5_ARCHIVES:
            message += (
                " (the OC20 docs swap the md5s of s2ef_train_2M.tar and s2ef_train_20M.tar, so"
                " the checksum cannot tell them apart: this file is probably the other one)"
            )
        raise ExtractError(message)
    log.info("%s: split %s has %s %s", archive.name, split, f"{found:,}", unit)
    return found


def decompress_xz(path: str | os.PathLike) -> Path:
    """Decompress `<name>.xz` to `<name>` (atomically, via a temporary file), delete the `.xz`.

    Returns the path of the decompressed file.
    """
    path = Path(path)
    out = path.with_name(path.name.removesuffix(".xz"))
    with atomic_path(out) as tmp, lzma.open(path, "rb") as source, open(tmp, "wb") as target:
        shutil.copyfileobj(source, target, CHUNK_BYTES)
    path.unlink()
    return out


def _decompress_all(paths: list[Path], *, threads: int, progress: bool) -> None:
    """Decompress `paths` with `threads` worker processes (lzma is single-threaded)."""
    bar = tqdm(
        total=len(paths),
        desc="decompress",
        unit="file",
        mininterval=PROGRESS_INTERVAL_S,
        file=sys.stderr,
        disable=not progress,
    )
    with bar:
        if threads <= 1:
            for path in paths:
                decompress_xz(path)
                bar.update()
            return
        # spawn, not fork: forking a process that runs threads (tqdm's monitor) can deadlock.
        with multiprocessing.get_context("spawn").Pool(threads) as pool:
            for _ in pool.imap_unordered(decompress_xz, paths):
                bar.update()


def extract(
    archive: Archive,
    tar_path: str | os.PathLike,
    root: str | os.PathLike,
    *,
    decompress: bool = False,
    threads: int = 1,
    verify_counts: bool = True,
    progress: bool = True,
) -> dict:
    """Extract the splits of `archive` from `tar_path` into `root/s2ef/<split>` or `root/is2re/...`.

    The tar is streamed in one pass; every member is checked before anything of it is written
    (absolute paths, `..`, links and devices raise UnsafeArchiveError). Files go to a staging
    directory `root/.extract-<name>.tmp`; only when every split received files and (with
    `verify_counts`) holds the catalogue's number of frames or systems are the split directories
    moved into place, replacing older ones. On any error the staging directory is removed and no
    split directory is touched. `decompress` unpacks every `.xz` with `threads` processes.

    Returns a summary: {"archive", "tar", "root", "decompressed", "splits": {split: {"path",
    "files", "expected", "found"}}} ("found" is None when counts were not verified).
    """
    tar_path = Path(tar_path)
    root = Path(root)
    if not tar_path.is_file():
        raise ExtractError(f"archive {tar_path} does not exist")
    for split in archive.splits:
        if contains(root / archive.split_dir(split), tar_path):
            raise ExtractError(
                f"archive {tar_path} lies in {root / archive.split_dir(split)}, which extraction "
                "replaces: move the archive out of it"
            )
    root.mkdir(parents=True, exist_ok=True)
    staging = root / f".extract-{archive.name}.tmp"
    if staging.exists():
        shutil.rmtree(staging)  # left by a killed run; it is never complete
    staging.mkdir()
    try:
        try:
            files = _stream_into_staging(archive, tar_path, staging, progress=progress)
        except (tarfile.TarError, lzma.LZMAError, EOFError) as error:
            raise ExtractError(f"{tar_path}: cannot read the archive: {error}") from error

        for split, names in files.items():
            if not names:
                raise ExtractError(
                    f"{tar_path}: no files for split {split} of archive {archive.name}: "
                    "is this the right archive?"
                )

        found = dict.fromkeys(archive.splits)
        if verify_counts:
            for split in archive.splits:
                found[split] = _verify_count(archive, split, staging, tar_path)

        if decompress:
            compressed = sorted(staging.rglob("*.xz"))
            try:
                _decompress_all(compressed, threads=threads, progress=progress)
            except (lzma.LZMAError, EOFError) as error:
                raise ExtractError(f"{tar_path}: cannot decompress: {error}") from error

        splits = {}
        for split in archive.splits:
            staged = staging / archive.split_dir(split)
            splits[split] = {
                "path": archive.split_dir(split),
                "files": sum(1 for _ in staged.iterdir()),
                "expected": archive.counts[split],
                "found": found[split],
            }
        for split in archive.splits:
            target = root / archive.split_dir(split)
            replace_directory(staging / archive.split_dir(split), target, keep=[tar_path])
            log.info("%s: split %s is in %s", archive.name, split, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)

    return {
        "archive": archive.name,
        "tar": str(tar_path),
        "root": str(root),
        "decompressed": decompress,
        "splits": splits,
    }


# --------------------------------------------------------------------------------------------
# Command line


def _print_catalogue() -> None:
    rows = [("name", "file", "compressed / uncompressed", "splits (frames or systems)")]
    for archive in CATALOGUE.values():
        splits = ", ".join(
            f"{split}={'?' if count is None else f'{count:,}'}"
            for split, count in archive.counts.items()
        )
        rows.append((archive.name, archive.filename, archive.size, splits))
    # Pad the first three columns; the splits column is last and runs as long as it needs.
    name_width, file_width, size_width = (max(len(row[i]) for row in rows) for i in range(3))
    for name, filename, size, splits in rows:
        print(f"{name:<{name_width}}  {filename:<{file_width}}  {size:<{size_width}}  {splits}")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m graphpar.data.oc20",
        description=(
            "Download and unpack the Open Catalyst 2020 (OC20) archives: list the catalogue, "
            "download an archive with resume and md5 verification, and extract its splits "
            "safely into a data root."
        ),
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    commands.add_parser(
        "list",
        help="print the archive catalogue",
        description=(
            "Print every OC20 archive this pipeline knows: its catalogue name, file name, "
            "documented compressed / uncompressed size, and the splits it provides with the "
            "expected number of S2EF frames or IS2RE systems."
        ),
    )

    download_parser = commands.add_parser(
        "download",
        help="download one archive and verify its md5",
        description=(
            "Download one catalogue archive to --out. Bytes go to '<out>.part' first, so an "
            "interrupted download resumes where it stopped when rerun; --out appears only once "
            "the md5 matches the catalogue. If the file is already in --manual-dir (downloaded "
            "by other means), it is verified and moved to --out without using the network."
        ),
    )
    download_parser.add_argument("name", choices=sorted(CATALOGUE), metavar="NAME")
    download_parser.add_argument("--out", required=True, type=Path, help="archive file to write")
    download_parser.add_argument("--base-url", default=BASE_URL, help="default: %(default)s")
    download_parser.add_argument(
        "--retries", type=int, default=5, help="retries in a row without progress (default 5)"
    )
    download_parser.add_argument(
        "--manual-dir", type=Path, help="directory to look in first for a hand-placed archive"
    )
    download_parser.add_argument(
        "--timeout", type=float, default=60.0, help="seconds of network silence (default 60)"
    )

    checkpoint_parser = commands.add_parser(
        "download-checkpoint",
        help="download a published model checkpoint, checked by size",
        description=(
            "Download a file published without a checksum (OCP's model checkpoints) from --url "
            "to --out, resumed like `download`; --out appears only once it has --size bytes, "
            "or the size the server announced when --size is not given."
        ),
    )
    checkpoint_parser.add_argument("--url", required=True, help="the checkpoint's URL")
    checkpoint_parser.add_argument("--out", required=True, type=Path, help="file to write")
    checkpoint_parser.add_argument("--size", type=int, help="expected bytes (default: announced)")
    checkpoint_parser.add_argument(
        "--retries", type=int, default=5, help="retries in a row without progress (default 5)"
    )

    extract_parser = commands.add_parser(
        "extract",
        help="extract the splits of a downloaded archive",
        description=(
            "Extract a downloaded catalogue archive into --root/s2ef/<split> or "
            "--root/is2re/<split>. The tar is streamed once; absolute paths, '..' components, "
            "links and devices are refused; the number of frames or systems of every split is "
            "checked against the catalogue before anything replaces an existing split."
        ),
    )
    extract_parser.add_argument("name", choices=sorted(CATALOGUE), metavar="NAME")
    extract_parser.add_argument("--archive", required=True, type=Path, help="downloaded tar")
    extract_parser.add_argument("--root", required=True, type=Path, help="data root directory")
    extract_parser.add_argument(
        "--decompress", action="store_true", help="also decompress the .xz files"
    )
    extract_parser.add_argument(
        "--threads", type=int, default=1, help="processes for --decompress (default 1)"
    )
    extract_parser.add_argument(
        "--no-verify-counts",
        dest="verify_counts",
        action="store_false",
        help="skip the frame / system count check",
    )
    extract_parser.add_argument(
        "--summary", type=Path, help="write the extraction summary to this JSON file"
    )
    return parser


def main(argv: list[str] | None = None) -> None:
    """Run the command line; expected failures exit 1 with a one-line `error:` on stderr."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        if args.command == "list":
            _print_catalogue()
        elif args.command == "download":
            archive = CATALOGUE[args.name]
            download(
                archive.url(args.base_url),
                args.out,
                archive.md5s,
                retries=args.retries,
                timeout=args.timeout,
                manual_dir=args.manual_dir,
            )
        elif args.command == "download-checkpoint":
            download_sized(args.url, args.out, args.size, retries=args.retries)
        elif args.command == "extract":
            summary = extract(
                CATALOGUE[args.name],
                args.archive,
                args.root,
                decompress=args.decompress,
                threads=args.threads,
                verify_counts=args.verify_counts,
            )
            if args.summary is not None:
                write_json(args.summary, summary)
    except DataError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
