"""Atomic file and directory writes: a reader never sees a half-written output.

Every output of the pipeline is written to a temporary sibling and renamed into place, so a
killed job leaves either the old file, no file, or the complete new file.
"""

from __future__ import annotations

import contextlib
import json
import lzma
import math
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator
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
def atomic_directory(path: str | os.PathLike, keep: Iterable = ()) -> Iterator[Path]:
    """Yield a temporary directory beside `path`; it replaces `path` if the block succeeds
    (`replace_directory`: never if `path` holds one of the paths to `keep`, e.g. the inputs)."""
    path = Path(path)
    tmp = _temp_sibling(path, directory=True)
    try:
        yield tmp
        replace_directory(tmp, path, keep=keep)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def replace_directory(
    source: str | os.PathLike, target: str | os.PathLike, keep: Iterable = ()
) -> None:
    """Move directory `source` to `target`, replacing any existing `target`.

    os.replace cannot overwrite a non-empty directory, so an old `target` is first renamed aside:
    at every moment `target` is either the complete old or the complete new directory. Refuses
    (ValueError, nothing moved) when `target` is or holds `source` or one of the paths to `keep`
    (the writer's inputs), which the replacement would delete.
    """
    source, target = Path(source), Path(target)
    for path in (source, *keep):
        if contains(target, path):
            raise ValueError(f"refusing to replace {target}: it holds {path}, which would be lost")
    target.parent.mkdir(parents=True, exist_ok=True)
    if not target.exists():
        os.replace(source, target)
        return
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    os.replace(target, old)
    os.replace(source, target)
    shutil.rmtree(old)


def contains(directory: str | os.PathLike, path: str | os.PathLike) -> bool:
    """True when `path` is `directory` or lies inside it (links resolved; neither need exist)."""
    directory, path = Path(directory).resolve(), Path(path).resolve()
    return path == directory or directory in path.parents


def write_json(path: str | os.PathLike, obj) -> None:
    """Write `obj` as indented, key-sorted JSON, atomically.

    NaN and +-Infinity are refused (ValueError naming the file and the value's key path): JSON
    has no such numbers, and a value that cannot be computed is written as null with its reason.
    """
    try:
        text = json.dumps(obj, indent=2, sort_keys=True, allow_nan=False)
    except ValueError as error:
        found = non_finite_value(obj)
        if found is None:
            raise  # not a NaN (e.g. a circular reference): json's own message
        key, value = found
        raise ValueError(
            f"{path}: {key} is {value!r}, not a JSON number; write null with the reason instead"
        ) from error
    with atomic_path(path) as tmp:
        tmp.write_text(text + "\n")


def non_finite_value(obj, key: str = "") -> tuple[str, float] | None:
    """(key path, value) of the first NaN or infinite float in nested dicts, lists and tuples,
    e.g. ("provenance.losses[2]", nan); None when every float is finite."""
    if isinstance(obj, float):
        return None if math.isfinite(obj) else (key or "the top-level value", obj)
    if isinstance(obj, dict):
        items = ((f"{key}.{name}" if key else str(name), value) for name, value in obj.items())
    elif isinstance(obj, list | tuple):
        items = ((f"{key}[{index}]", value) for index, value in enumerate(obj))
    else:
        return None
    for path, value in items:
        if (found := non_finite_value(value, path)) is not None:
            return found
    return None


def parse_json(text: str | bytes, source: str | os.PathLike) -> object:
    """`json.loads(text)`, refusing NaN, Infinity and -Infinity (Python's json reads them, no
    other reader does, and `write_json` never writes them); errors name `source`."""

    def refuse(constant: str):
        raise ValueError(
            f"{source}: {constant} is not a JSON number (a value that cannot be computed is "
            "null with its reason)"
        )

    return json.loads(text, parse_constant=refuse)


def read_json(path: str | os.PathLike) -> object:
    """The JSON file at `path`, parsed by `parse_json` (NaN and Infinity refused)."""
    return parse_json(Path(path).read_text(), path)


def write_npz(path: str | os.PathLike, **arrays) -> None:
    """`np.savez_compressed(path, **arrays)`, atomically."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez_compressed(f, **arrays)


class CorruptFileError(ValueError):
    """A file that cannot be read: a truncated or corrupt `.xz` stream, or text that is not
    UTF-8. The message names the file."""


def open_text_or_xz(path: str | os.PathLike, mode: str = "rt"):
    """Open a file, decompressing on the fly when its name ends in `.xz` (OC20's raw files)."""
    return lzma.open(path, mode) if str(path).endswith(".xz") else open(path, mode)


@contextlib.contextmanager
def _reading(path: str | os.PathLike) -> Iterator[None]:
    """Turn a truncated or corrupt `.xz` stream, or undecodable text, met while reading `path`
    in the block into CorruptFileError naming `path`."""
    try:
        yield
    except (lzma.LZMAError, EOFError, UnicodeDecodeError) as error:
        raise CorruptFileError(f"{path}: truncated or corrupt: {error}") from error


def read_text_or_xz(path: str | os.PathLike) -> str:
    """The whole text of a file, `.xz`-compressed or not; CorruptFileError if unreadable."""
    with _reading(path), open_text_or_xz(path) as file:
        return file.read()


def count_lines(path: str | os.PathLike) -> int:
    """Lines of a text file, `.xz`-compressed or not (a last line may lack its newline);
    CorruptFileError if unreadable."""
    lines = 0
    last = b"\n"
    with _reading(path), open_text_or_xz(path, "rb") as file:
        while chunk := file.read(1 << 20):
            lines += chunk.count(b"\n")
            last = chunk[-1:]
    return lines + (last != b"\n")


# The names of atomic_path's and atomic_directory's temporaries and of replace_directory's
# old directory while it is being replaced.
TEMPORARY = re.compile(r"\..+\.(tmp-\w+|old-\d+)")


def remove_temporaries(directory: str | os.PathLike) -> list[Path]:
    """Remove the temporaries that killed writers left in `directory` (`.<name>.tmp-*` of
    `atomic_path`/`atomic_directory`, `.<name>.old-*` of `replace_directory`); returns them.

    Only for a folder this process holds (`graphpar.lock.folder_lock`): a live writer's
    temporary looks the same.
    """
    removed = []
    for path in sorted(Path(directory).glob(".*")):
        if not TEMPORARY.fullmatch(path.name):
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
        removed.append(path)
    return removed
