"""Atomic file and directory writes: a reader never sees a half-written output.

Every output of the pipeline is written to a temporary sibling and renamed into place, so a
killed job leaves either the old file, no file, or the complete new file.
"""

from __future__ import annotations

import contextlib
import json
import lzma
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _temp_sibling(path: Path, *, directory: bool) -> Path:
    """A fresh temporary file or directory beside `path`, with the usual (umask) permissions."""
    path.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{path.name}.tmp-"
    if directory:
        tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=path.parent))
        tmp.chmod(0o777 & ~_umask())  # mkdtemp makes it private (0700)
        return tmp
    fd, name = tempfile.mkstemp(prefix=prefix, dir=path.parent)
    os.close(fd)
    Path(name).chmod(0o666 & ~_umask())  # mkstemp makes it private (0600)
    return Path(name)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary file path beside `path`; rename it onto `path` if the block succeeds."""
    path = Path(path)
    tmp = _temp_sibling(path, directory=False)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory beside `path`; it replaces `path` if the block succeeds."""
    path = Path(path)
    tmp = _temp_sibling(path, directory=True)
    try:
        yield tmp
        replace_directory(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def replace_directory(source: str | os.PathLike, target: str | os.PathLike) -> None:
    """Move directory `source` to `target`, replacing any existing `target`.

    os.replace cannot overwrite a non-empty directory, so an old `target` is first renamed aside:
    at every moment `target` is either the complete old or the complete new directory.
    """
    source, target = Path(source), Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    if not target.exists():
        os.replace(source, target)
        return
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    os.replace(target, old)
    os.replace(source, target)
    shutil.rmtree(old)


def write_json(path: str | os.PathLike, obj) -> None:
    """Write `obj` as indented, key-sorted JSON, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def write_npz(path: str | os.PathLike, **arrays) -> None:
    """`np.savez_compressed(path, **arrays)`, atomically."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez_compressed(f, **arrays)


def open_text_or_xz(path: str | os.PathLike, mode: str = "rt"):
    """Open a file, decompressing on the fly when its name ends in `.xz` (OC20's raw files)."""
    return lzma.open(path, mode) if str(path).endswith(".xz") else open(path, mode)


def count_lines(path: str | os.PathLike) -> int:
    """Lines of a text file, `.xz`-compressed or not (a last line may lack its newline)."""
    lines = 0
    last = b"\n"
    with open_text_or_xz(path, "rb") as file:
        while chunk := file.read(1 << 20):
            lines += chunk.count(b"\n")
            last = chunk[-1:]
    return lines + (last != b"\n")
