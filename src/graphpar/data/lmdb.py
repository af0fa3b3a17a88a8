"""Sharded LMDB datasets of preprocessed samples, and safe reading of OC20's pickled LMDBs.

A preprocessed dataset is a directory

    data.0000.lmdb, data.0001.lmdb, ...   single-file LMDBs (`subdir=False`); keys are the ascii
                                          decimal local indices "0".."n-1" plus "length" (ascii
                                          decimal n); values are `encode_sample` blobs
    metadata.json                         schema version, total and per-shard counts, the
                                          dataset's identity (`content_sha256`, see
                                          `dataset_identity`), and whatever the writer adds
                                          (cutoff, max_neighbors, energy_reference, source, ...)
    metadata.npz                          per-sample arrays (natoms, num_edges, triplet counts,
                                          crc32, ...) indexed like the dataset

written by `ShardWriter` (one shard each) and `write_metadata`, and read by `ShardedLmdb`.

Sample encoding (`encode_sample` / `decode_sample`), pickle-free and versioned:

    offset 0   magic b"GPSAMP" (6 bytes)
    offset 6   format version, uint16 little-endian (ENCODING_VERSION)
    offset 8   header length H in bytes, uint32 little-endian (a multiple of 8)
    offset 12  CRC-32 of everything from offset 16 to the end, uint32 little-endian
    offset 16  H bytes of ASCII JSON, space-padded: {"fields": [[name, dtype, shape, offset], ...]}
               dtype is numpy's `dtype.str` (e.g. "<f4", "|b1"), shape a list of ints, offset the
               array's byte offset from the start of the data section
    16 + H     data section: each array's raw C-order bytes, each starting 8-byte aligned

The checksum turns a flipped byte anywhere in a value, which LMDB itself cannot notice, into a
clear error instead of silently wrong positions or energies; CRC-32 runs at several GB/s, far
faster than anything else done per sample.

OC20's own LMDBs (IS2RE/IS2RS single files, S2EF shard directories) hold `pickle.dumps` of PyG
`Data` objects, and unpickling runs whatever the file says. `iter_pyg_lmdb` and `load_pyg_pickle`
read them through a restricted unpickler that admits only PyG's Data/storage classes (as inert
stand-ins), torch's tensor-rebuild functions, and numpy scalars/arrays; tensor bytes are loaded
with `torch.load(..., weights_only=True)`. Everything else raises `UnsafePickleError`.
"""

from __future__ import annotations

import bisect
import collections
import contextlib
import functools
import hashlib
import io
import json
import math
import operator
import os
import pickle
import re
import struct
import zlib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import lmdb
import numpy as np

from graphpar.io import atomic_path, write_json

SCHEMA_VERSION = 1
"""Version of the dataset layout (metadata.json, key scheme); readers refuse other versions."""

ENCODING_VERSION = 2
"""Version of the `encode_sample` value format written. 2: integer arrays may be narrowed to the
smallest dtype that holds their values (`narrowed`); readers widen them (`widened`). 1: every
integer array int64. The blob layout is the same in both."""

READABLE_ENCODING_VERSIONS = (1, 2)
"""Encoding versions `decode_sample` reads; it refuses others."""

STORAGE_MODES = ("graphs", "on_the_fly")
"""How a dataset stores its samples (metadata.json `storage`; absent means "graphs"). "graphs":
with their graphs (and triplets when metadata.json says `triplets_stored`); "on_the_fly": the
structures and labels only, the loader builds graphs and triplets
(`graphpar.data.dataset.LmdbDataset`)."""

MAGIC = b"GPSAMP"
METADATA_JSON = "metadata.json"
METADATA_NPZ = "metadata.npz"
LENGTH_KEY = b"length"
DEFAULT_MAP_SIZE = 2**30  # bytes; ShardWriter doubles it whenever a commit does not fit

_PREFIX = struct.Struct("<6sHII")  # magic, version, header length, crc32
_ALIGNMENT = 8  # bytes; every array starts on this boundary so np.frombuffer views are aligned
_ALLOWED_DTYPE_KINDS = "biufcSU"  # bool, ints, floats, complex, fixed-width strings: no objects
_SHARD_NAME = re.compile(r"^data\.(\d+)\.lmdb$")
_COMMIT_BYTES = 64 * 2**20  # ShardWriter commits a transaction once this many bytes are pending
_RESERVED_METADATA_KEYS = (
    "schema_version",
    "encoding_version",
    "length",
    "shards",
    "content_sha256",
)


class LmdbFormatError(ValueError):
    """A value, shard or metadata file is not in the expected format (corrupt, truncated, ...)."""


class UnsafePickleError(pickle.UnpicklingError):
    """A pickle asked for something the restricted unpickler does not admit; nothing was run."""


# --------------------------------------------------------------------------------------------
# Sample encoding
# --------------------------------------------------------------------------------------------


def _as_array(name: str, value) -> np.ndarray:
    """`value` as a numpy array; Python scalars get fixed dtypes so files do not depend on OS."""
    if isinstance(value, bool | np.bool_):
        return np.asarray(value, dtype=np.bool_)
    if isinstance(value, int):
        return np.asarray(value, dtype=np.int64)
    if isinstance(value, float):
        return np.asarray(value, dtype=np.float64)
    array = np.asarray(value)  # numpy arrays/scalars as they are; CPU torch tensors via __array__
    if array.dtype.kind not in _ALLOWED_DTYPE_KINDS:
        raise TypeError(f"field {name!r}: dtype {array.dtype} cannot be encoded (no objects)")
    return array


def encode_sample(sample: Mapping[str, Any]) -> bytes:
    """Encode one sample, a flat `{name: array or number}` dict, as bytes (no pickle).

    Values may be numpy arrays of any shape (0-d and empty included), numpy scalars, Python
    bool/int/float (stored as bool, int64, float64) or CPU torch tensors. Dtypes and shapes are
    kept exactly. Raises TypeError for a non-string name or an object/structured dtype.
    """
    fields = []
    chunks = []
    data_length = 0
    for name, value in sample.items():
        if not isinstance(name, str):
            raise TypeError(f"field names must be strings, got {name!r}")
        array = _as_array(name, value)
        raw = array.tobytes(order="C")
        fields.append([name, array.dtype.str, list(array.shape), data_length])
        chunks.append(raw)
        padding = -len(raw) % _ALIGNMENT
        if padding:
            chunks.append(bytes(padding))
        data_length += len(raw) + padding
    header = json.dumps({"fields": fields}, separators=(",", ":")).encode("ascii")
    header += b" " * (-len(header) % _ALIGNMENT)  # JSON ignores trailing whitespace
    body = b"".join([header, *chunks])
    prefix = _PREFIX.pack(MAGIC, ENCODING_VERSION, len(header), zlib.crc32(body))
    return prefix + body


_dtype_cache: dict[str, np.dtype] = {}


def _checked_dtype(text: str) -> np.dtype:
    """numpy dtype for a header's dtype string, refusing anything that could hold objects."""
    dtype = _dtype_cache.get(text)
    if dtype is None:
        dtype = np.dtype(text)
        if dtype.kind not in _ALLOWED_DTYPE_KINDS or dtype.fields is not None:
            raise LmdbFormatError(f"dtype {text!r} is not allowed in a sample")
        if len(_dtype_cache) < 1024:  # a hostile file cannot grow the cache without bound
            _dtype_cache[text] = dtype
    return dtype


def decode_sample(blob: bytes, *, writable: bool = False) -> dict[str, np.ndarray]:
    """Decode an `encode_sample` blob into `{name: numpy array}`, in the order it was encoded.

    Every value comes back as a numpy array with its original dtype and shape; scalars are 0-d
    arrays (`float(sample["energy"])` or `.item()` gives the Python number). By default the
    arrays are read-only views into `blob` (no copy); `writable=True` copies the blob once and
    returns writable views into that copy (use it before `torch.from_numpy`, which warns on
    read-only arrays, or before modifying values in place).

    Raises LmdbFormatError for a wrong magic, an unknown version, a checksum mismatch or any
    other malformed blob.
    """
    if len(blob) < _PREFIX.size:
        raise LmdbFormatError(f"blob of {len(blob)} bytes is too short for a sample header")
    magic, version, header_length, crc = _PREFIX.unpack_from(blob)
    if magic != MAGIC:
        raise LmdbFormatError(f"not an encoded sample (magic {magic!r}, expected {MAGIC!r})")
    if version not in READABLE_ENCODING_VERSIONS:
        raise LmdbFormatError(
            f"sample encoding version {version} is not supported (this reader knows "
            f"{', '.join(map(str, READABLE_ENCODING_VERSIONS))}); rerun preprocessing or update "
            "graphpar"
        )
    view = memoryview(blob)
    if zlib.crc32(view[_PREFIX.size :]) != crc:
        raise LmdbFormatError(f"sample checksum mismatch ({len(blob)} bytes): the value is corrupt")
    data_start = _PREFIX.size + header_length
    if data_start > len(blob):
        raise LmdbFormatError(f"sample header length {header_length} exceeds the blob")
    if writable:
        blob = bytearray(blob)
    try:
        fields = json.loads(bytes(view[_PREFIX.size : data_start]))["fields"]
        sample = {}
        for name, dtype_text, shape, offset in fields:
            dtype = _checked_dtype(dtype_text)
            count = math.prod(shape)
            if count < 0 or min(shape, default=0) < 0 or offset < 0:
                raise ValueError(f"negative shape {shape} or offset {offset}")
            array = np.frombuffer(blob, dtype, count=count, offset=data_start + offset)
            sample[name] = array.reshape(shape)
    except LmdbFormatError:
        raise
    except (ValueError, TypeError, KeyError) as err:  # JSONDecodeError is a ValueError
        raise LmdbFormatError(f"malformed sample: {err}") from err
    return sample


# Integer dtypes `narrowed` chooses from, narrowest first.
_NARROW_INTEGERS = tuple(np.dtype(t) for t in ("u1", "i1", "<u2", "<i2", "<u4", "<i4", "<i8"))


def narrowed(sample: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """`sample` with every integer array in the narrowest dtype that holds its values.

    Node ids of a 73-atom structure fit in uint8, cell offsets in int8, edge ids in uint16: the
    stored graph of an OC20 frame shrinks 4-8x against int64 (`bench/preprocess.py`). Exact:
    `widened` gives the int64 values back. Other arrays are returned as they are.
    """
    out = {}
    for name, value in sample.items():
        array = _as_array(name, value)
        if array.dtype.kind in "iu":
            low, high = (int(array.min()), int(array.max())) if array.size else (0, 0)
            dtype = next(
                t for t in _NARROW_INTEGERS if np.iinfo(t).min <= low and high <= np.iinfo(t).max
            )
            array = array.astype(dtype, copy=False)
        out[name] = array
    return out


def widened(sample: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """`sample` with every integer array as int64 (undoes `narrowed`; version-1 samples already
    are). Other arrays are returned as they are."""
    return {
        name: value.astype(np.int64) if value.dtype.kind in "iu" else value
        for name, value in sample.items()
    }


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


def shard_name(index: int) -> str:
    """File name of shard `index` in a dataset directory: data.0000.lmdb, data.0001.lmdb, ..."""
    return f"data.{index:04d}.lmdb"


class ShardWriter:
    """Write one shard (a single-file LMDB) of encoded samples, atomically.

    Usage:
        with ShardWriter(directory / shard_name(0)) as writer:
            for sample in samples:
                writer.append(sample)

    Samples get keys "0", "1", ... in order; closing adds the "length" key and renames the
    finished file onto `path`, so a reader never sees a partial shard. If the block raises,
    the temporary file is removed and `path` is left untouched.

    `map_size` (bytes) is only the starting size of LMDB's memory map: a commit that does not fit
    (`lmdb.MapFullError`) is retried after doubling it. Without `writemap` the file grows with the
    pages actually written, so a generous map costs no disk space.
    """

    def __init__(self, path: str | os.PathLike, map_size: int = DEFAULT_MAP_SIZE):
        self.path = Path(path)
        self.map_size = int(map_size)
        self._stack: contextlib.ExitStack | None = None
        self._env: lmdb.Environment | None = None
        self._pending: list[tuple[bytes, bytes]] = []
        self._pending_bytes = 0
        self._count = 0

    def __enter__(self) -> ShardWriter:
        self._stack = contextlib.ExitStack()
        temporary = self._stack.enter_context(atomic_path(self.path))
        # A single writer and no concurrent readers of the temporary file: no lock file needed;
        # sync happens once, in close().
        self._env = lmdb.open(
            str(temporary),
            subdir=False,
            map_size=self.map_size,
            lock=False,
            sync=False,
            metasync=False,
        )
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        if exc_type is None:
            self.close()
        else:
            self._abandon(exc_type, exc, traceback)

    def __len__(self) -> int:
        return self._count

    def append(self, sample: Mapping[str, Any]) -> int:
        """Add one sample; returns its index within the shard."""
        return self.append_encoded(encode_sample(sample))

    def append_encoded(self, blob: bytes) -> int:
        """Add one already-encoded sample (from `encode_sample`); returns its index."""
        if self._env is None:
            raise RuntimeError(f"{self.path}: ShardWriter used outside its `with` block")
        index = self._count
        self._pending.append((str(index).encode("ascii"), blob))
        self._pending_bytes += len(blob)
        self._count += 1
        if self._pending_bytes >= _COMMIT_BYTES:
            self._commit()
        return index

    def _commit(self) -> None:
        """Write the pending samples in one transaction, growing the map until they fit."""
        while True:
            try:
                with self._env.begin(write=True) as txn:  # aborted if a put raises
                    for key, value in self._pending:
                        txn.put(key, value)
                break
            except lmdb.MapFullError:
                self.map_size *= 2
                self._env.set_mapsize(self.map_size)
        self._pending.clear()
        self._pending_bytes = 0

    def close(self) -> None:
        """Commit everything, write the "length" key, and move the shard into place."""
        if self._env is None:
            return
        self._pending.append((LENGTH_KEY, str(self._count).encode("ascii")))
        self._commit()
        self._env.sync(True)
        self._env.close()
        self._env = None
        self._stack.close()  # renames the temporary file onto self.path

    def _abandon(self, exc_type, exc, traceback) -> None:
        if self._env is not None:
            self._env.close()
            self._env = None
        self._stack.__exit__(exc_type, exc, traceback)  # removes the temporary file


def _shard_files(directory: Path) -> list[Path]:
    """The dataset's shard files, ordered by shard number."""
    shards = [p for p in directory.iterdir() if _SHARD_NAME.match(p.name)]
    return sorted(shards, key=lambda p: int(_SHARD_NAME.match(p.name).group(1)))


def sample_crc32(blob: bytes) -> int:
    """The CRC-32 an `encode_sample` blob carries (of everything after its prefix)."""
    return _PREFIX.unpack_from(blob)[3]


def content_sha256(crc32: np.ndarray) -> str:
    """A dataset's identity: the sha256 of its samples' CRC-32s in dataset order.

    Any change to any stored value of any sample (positions, labels, graph) changes its CRC and
    so the identity, whatever the sharding; the same input preprocessed the same way gets the
    same identity.
    """
    return hashlib.sha256(np.asarray(crc32, dtype="<u4").tobytes()).hexdigest()


def dataset_identity(metadata: Mapping[str, Any]) -> str:
    """The identity of a dataset from its metadata.json: `content_sha256` (written when the
    per-sample `crc32` array is), else, for datasets written without it, the sha256 of the
    metadata itself."""
    if "content_sha256" in metadata:
        return str(metadata["content_sha256"])
    text = json.dumps(dict(metadata), sort_keys=True).encode()
    return "metadata-" + hashlib.sha256(text).hexdigest()


def write_metadata(
    directory: str | os.PathLike,
    info: Mapping[str, Any],
    arrays: Mapping[str, np.ndarray],
) -> dict:
    """Write metadata.json and metadata.npz for the shards already written in `directory`.

    The per-shard counts are read from the shards' "length" keys, so they always describe the
    files on disk. `info` (JSON-serialisable: cutoff, max_neighbors, source, ...) is merged into
    metadata.json; it must not use the reserved keys schema_version, encoding_version, length and
    shards. `arrays` are per-sample arrays indexed like the dataset (first dimension = total count,
    no object dtypes); when they include `crc32` (`sample_crc32` of every sample) metadata.json
    gets the dataset's identity `content_sha256`. Both files are written atomically, the npz
    first. Returns the JSON dict.
    """
    directory = Path(directory)
    clash = sorted(set(info) & set(_RESERVED_METADATA_KEYS))
    if clash:
        raise ValueError(f"metadata info may not set the reserved keys {clash}")
    shards = []
    for path in _shard_files(directory):
        with _shared_environment(path) as env, env.begin() as txn:
            shards.append({"file": path.name, "length": _our_shard_length(path, txn)})
    total = sum(shard["length"] for shard in shards)
    for name, array in arrays.items():
        array = np.asarray(array)
        if array.dtype.hasobject:
            raise ValueError(f"metadata array {name!r} has an object dtype")
        if array.ndim == 0 or len(array) != total:
            raise ValueError(
                f"metadata array {name!r} has shape {array.shape}; expected {total} rows "
                "(one per sample)"
            )
    metadata = {
        "schema_version": SCHEMA_VERSION,
        "encoding_version": ENCODING_VERSION,
        "length": total,
        "shards": shards,
        **info,
    }
    if "crc32" in arrays:
        metadata["content_sha256"] = content_sha256(arrays["crc32"])
    with atomic_path(directory / METADATA_NPZ) as temporary, open(temporary, "wb") as f:
        np.savez(f, **{name: np.asarray(array) for name, array in arrays.items()})
    write_json(directory / METADATA_JSON, metadata)
    return metadata


def is_graphpar_dataset(directory: str | os.PathLike) -> bool:
    """True when `directory` holds a metadata.json written by `write_metadata` (its schema
    version, encoding version, length and shards): a dataset graphpar may replace."""
    try:
        metadata = json.loads((Path(directory) / METADATA_JSON).read_text())
    except (OSError, ValueError):
        return False
    marker = ("schema_version", "encoding_version", "length", "shards")
    return isinstance(metadata, dict) and all(key in metadata for key in marker)


# --------------------------------------------------------------------------------------------
# Read-only LMDB environments, shared within a process
# --------------------------------------------------------------------------------------------

# py-lmdb refuses to open a file that is already open in the process (two LMDB environments on
# one file would share locks), so every reader in a process shares one environment per file,
# counted by its users: file identity (st_dev, st_ino) -> [environment, number of users].
_environments: dict[tuple[int, int], list] = {}
_environments_pid = os.getpid()


def _forget_environments_after_fork() -> None:
    """In a forked child, close the environments inherited from the parent.

    The child inherits py-lmdb's record of open files, so it could not reopen them otherwise.
    Closing a read-only, lock-free environment only unmaps the child's copy of the file: it
    cannot disturb the parent, which keeps using its own.
    """
    global _environments_pid
    if os.getpid() == _environments_pid:
        return
    for env, _ in _environments.values():
        env.close()
    _environments.clear()
    _environments_pid = os.getpid()


def _open_readonly(path: Path) -> lmdb.Environment:
    """Open a single-file LMDB read-only, lock-free, and check that it is not truncated.

    LMDB maps the file and would die with SIGBUS when touching a page past the end of a
    truncated file, so the size is checked against the last page the meta page records.
    """
    try:
        env = lmdb.open(
            str(path),
            subdir=False,
            readonly=True,
            lock=False,
            readahead=False,
            meminit=False,
            max_readers=1,
        )
    except lmdb.Error as err:
        raise LmdbFormatError(f"{path}: cannot open as an LMDB file: {err}") from err
    expected_size = (env.info()["last_pgno"] + 1) * env.stat()["psize"]
    actual_size = path.stat().st_size
    if actual_size < expected_size:
        env.close()
        raise LmdbFormatError(
            f"{path}: truncated LMDB file ({actual_size} bytes, its pages need {expected_size})"
        )
    return env


def _acquire_environment(path: Path) -> tuple[tuple[int, int], lmdb.Environment]:
    """This process's environment for `path` and its key; pair with `_release_environment`."""
    _forget_environments_after_fork()
    try:
        status = path.stat()
    except FileNotFoundError:
        raise FileNotFoundError(f"LMDB file {path} does not exist") from None
    key = (status.st_dev, status.st_ino)
    entry = _environments.get(key)
    if entry is None:
        entry = _environments[key] = [_open_readonly(path), 0]
    entry[1] += 1
    return key, entry[0]


def _release_environment(key: tuple[int, int]) -> None:
    """Drop one use of an environment; the last user's release closes it."""
    entry = _environments.get(key)
    if entry is None:  # acquired before a fork; _forget_environments_after_fork closed it
        return
    entry[1] -= 1
    if entry[1] == 0:
        del _environments[key]
        entry[0].close()


@contextlib.contextmanager
def _shared_environment(path: Path) -> Iterator[lmdb.Environment]:
    """`_acquire_environment` for the duration of a block."""
    key, env = _acquire_environment(path)
    try:
        yield env
    finally:
        _release_environment(key)


# --------------------------------------------------------------------------------------------
# Reading our datasets
# --------------------------------------------------------------------------------------------


def _our_shard_length(path: Path, txn: lmdb.Transaction) -> int:
    """A shard's sample count from its "length" key, checked against the number of entries."""
    raw = txn.get(LENGTH_KEY)
    if raw is None or not raw.isdigit():
        raise LmdbFormatError(f"{path}: missing or malformed 'length' key ({raw!r})")
    length = int(raw)
    entries = txn.stat()["entries"]
    if entries != length + 1:
        raise LmdbFormatError(f"{path}: 'length' says {length} samples but it has {entries} keys")
    return length


class ShardedLmdb:
    """Read-only random access to a dataset directory written by ShardWriter + write_metadata.

    `reader[i]` is the decoded sample i (read-only numpy arrays, see `decode_sample`);
    `reader.metadata` is metadata.json, `reader.arrays` the arrays of metadata.npz.

    Shards are opened lazily, read-only and lock-free, once per process and shared by all
    readers in it: a reader created (or used) in a parent process works in forked children,
    e.g. DataLoader workers, which reopen the shards themselves; it also pickles (for spawn)
    without its open handles. Any number of processes may read the same dataset at the same time.

    Errors name the file (and sample): FileNotFoundError for a missing metadata file or shard,
    LmdbFormatError for a corrupt or truncated shard, a "length" that disagrees with
    metadata.json, or a value that does not decode; IndexError for an index out of range.
    """

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        metadata_path = self.directory / METADATA_JSON
        if not metadata_path.is_file():
            raise FileNotFoundError(f"{metadata_path} does not exist: not a graphpar dataset")
        try:
            self.metadata: dict = json.loads(metadata_path.read_text())
            version = self.metadata["schema_version"]
            shards = self.metadata["shards"]
            self._files = [self.directory / shard["file"] for shard in shards]
            self._lengths = [int(shard["length"]) for shard in shards]
        except (ValueError, KeyError, TypeError) as err:
            raise LmdbFormatError(f"{metadata_path}: malformed metadata: {err}") from err
        if version != SCHEMA_VERSION:
            raise LmdbFormatError(
                f"{metadata_path}: dataset schema version {version} is not supported (this "
                f"reader knows {SCHEMA_VERSION}); rerun preprocessing"
            )
        # _ends[k] = number of samples in shards 0..k, so bisect_right finds an index's shard.
        self._ends = np.cumsum(self._lengths, dtype=np.int64).tolist()
        if len(self) != self.metadata.get("length", len(self)):
            raise LmdbFormatError(f"{metadata_path}: shard lengths do not add up to 'length'")
        self._arrays: dict[str, np.ndarray] | None = None
        self._pid = os.getpid()
        # shard -> (environment key, this reader's read transaction), for this process only
        self._handles: dict[int, tuple[tuple[int, int], lmdb.Transaction]] = {}

    def __len__(self) -> int:
        return self._ends[-1] if self._ends else 0

    @property
    def arrays(self) -> dict[str, np.ndarray]:
        """The per-sample arrays of metadata.npz (loaded once, without pickle)."""
        if self._arrays is None:
            path = self.directory / METADATA_NPZ
            if not path.is_file():
                raise FileNotFoundError(f"{path} does not exist")
            try:
                with np.load(path, allow_pickle=False) as npz:
                    self._arrays = {name: npz[name] for name in npz.files}
            except (ValueError, OSError) as err:
                raise LmdbFormatError(f"{path}: cannot read metadata arrays: {err}") from err
        return self._arrays

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        index = self._checked_index(index)
        shard = bisect.bisect_right(self._ends, index)
        local = index - (self._ends[shard - 1] if shard else 0)
        txn = self._transaction(shard)
        path = self._files[shard]
        try:
            blob = txn.get(str(local).encode("ascii"))
        except lmdb.Error as err:
            # LMDB invalidates a transaction that hit an error: start afresh on the next access.
            self._discard(shard)
            message = f"{path}: cannot read sample {index} (key {local}): {err}"
            raise LmdbFormatError(message) from err
        if blob is None:
            raise LmdbFormatError(f"{path}: sample {index} (key {local}) is missing")
        try:
            return decode_sample(blob)
        except LmdbFormatError as err:
            raise LmdbFormatError(f"{path}: sample {index} (key {local}): {err}") from err

    def _checked_index(self, index) -> int:
        index = operator.index(index)  # accepts numpy and torch integers, refuses floats
        length = len(self)
        if index < 0:
            index += length
        if not 0 <= index < length:
            raise IndexError(f"index {index} out of range for {self.directory} ({length} samples)")
        return index

    def _transaction(self, shard: int) -> lmdb.Transaction:
        """This reader's read transaction on a shard in this process, opened on first use."""
        if os.getpid() != self._pid:
            # A forked child: the inherited transactions belong to environments that
            # _forget_environments_after_fork closes; never touch them.
            self._handles = {}
            self._pid = os.getpid()
        handles = self._handles.get(shard)
        if handles is not None:
            return handles[1]
        path = self._files[shard]
        key, env = _acquire_environment(path)
        try:
            # Read-only and no writer can exist, so one long-lived read transaction is safe and
            # saves a begin() per sample.
            txn = env.begin(buffers=False)
            length = _our_shard_length(path, txn)
            if length != self._lengths[shard]:
                raise LmdbFormatError(
                    f"{path}: holds {length} samples but {self.directory / METADATA_JSON} says "
                    f"{self._lengths[shard]}"
                )
        except lmdb.Error as err:
            _release_environment(key)
            raise LmdbFormatError(f"{path}: cannot read the shard: {err}") from err
        except BaseException:
            _release_environment(key)
            raise
        self._handles[shard] = (key, txn)
        return txn

    def _discard(self, shard: int) -> None:
        key, txn = self._handles.pop(shard)
        txn.abort()
        _release_environment(key)

    def close(self) -> None:
        """Release this reader's shards in this process (they reopen on the next access)."""
        if os.getpid() != self._pid:
            self._handles = {}
            self._pid = os.getpid()
        for shard in list(self._handles):
            self._discard(shard)

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # e.g. at interpreter exit, module globals gone
            self.close()

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_handles"] = {}  # LMDB handles cannot cross processes; the receiver reopens
        return state

    def __repr__(self) -> str:
        return f"ShardedLmdb({str(self.directory)!r}, {len(self)} samples)"


# --------------------------------------------------------------------------------------------
# OC20's pickled PyG LMDBs
# --------------------------------------------------------------------------------------------


class _PickledPygObject:
    """Inert stand-in for a PyG class: unpickling only records the state it is given.

    Subclasses (one per admitted PyG class) carry `pickled_name`; no PyG code ever runs.
    """

    pickled_name = ""
    state: Any = None  # unpickling creates instances with __new__ and then calls __setstate__

    def __setstate__(self, state) -> None:
        self.state = state


_PYG_CLASS_NAMES = (
    "torch_geometric.data.data.Data",
    "torch_geometric.data.data.DataEdgeAttr",
    "torch_geometric.data.data.DataTensorAttr",
    "torch_geometric.data.storage.BaseStorage",
    "torch_geometric.data.storage.NodeStorage",
    "torch_geometric.data.storage.EdgeStorage",
    "torch_geometric.data.storage.GlobalStorage",
)
_PYG_STAND_INS = {
    name: type(name.rsplit(".", 1)[1], (_PickledPygObject,), {"pickled_name": name})
    for name in _PYG_CLASS_NAMES
}


def _safe_load_from_bytes(blob: bytes):
    """Replacement for torch.storage._load_from_bytes, which runs an unrestricted torch.load."""
    import torch

    try:
        storage = torch.load(io.BytesIO(blob), weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as err:
        raise UnsafePickleError(
            f"a tensor blob needs an unrestricted torch.load (refused): {err}"
        ) from err
    if not isinstance(storage, torch.storage.TypedStorage):
        raise UnsafePickleError(f"a tensor blob holds {type(storage).__name__}, not a storage")
    return storage


def _checked_storage(storage):
    import torch

    if not isinstance(storage, torch.storage.TypedStorage):
        raise UnsafePickleError(f"tensor rebuilt from {type(storage).__name__}, not a storage")
    return storage


def _safe_rebuild_tensor(storage, storage_offset, size, stride):
    import torch

    return torch._utils._rebuild_tensor(_checked_storage(storage), storage_offset, size, stride)


def _safe_rebuild_tensor_v2(
    storage, storage_offset, size, stride, requires_grad, backward_hooks, metadata=None
):
    import torch

    if backward_hooks:  # hooks would be called later, on backward: never load them
        raise UnsafePickleError("a pickled tensor carries backward hooks")
    return torch._utils._rebuild_tensor_v2(
        _checked_storage(storage),
        storage_offset,
        size,
        stride,
        requires_grad,
        collections.OrderedDict(),
        metadata,
    )


def _safe_numpy_scalar(dtype, data=None):
    """numpy's scalar reconstructor, for plain (non-object) dtypes only."""
    if not isinstance(dtype, np.dtype) or dtype.hasobject:
        raise UnsafePickleError(f"numpy scalar of dtype {dtype!r} is not allowed")
    if not isinstance(data, bytes) or len(data) != dtype.itemsize:
        raise LmdbFormatError(f"malformed numpy scalar of dtype {dtype}")
    return np.frombuffer(data, dtype)[0]


def _safe_numpy_reconstruct(subtype, shape, typecode):
    if subtype is not np.ndarray:
        raise UnsafePickleError(f"numpy array subclass {subtype!r} is not allowed")
    return np.ndarray.__new__(np.ndarray, shape, typecode)


def _safe_numpy_frombuffer(buffer, dtype, shape, order):
    """numpy's protocol-5 array reconstructor, for plain (non-object) dtypes only."""
    if not isinstance(dtype, np.dtype) or dtype.hasobject:
        raise UnsafePickleError(f"numpy array of dtype {dtype!r} is not allowed")
    return np.frombuffer(buffer, dtype=dtype).reshape(shape, order=order)


def _latin1_bytes(text, encoding):
    """How protocol-2 pickles spell bytes: `_codecs.encode(text, "latin1")`; no other codec."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise UnsafePickleError(f"_codecs.encode with {encoding!r} is not allowed")
    return text.encode("latin1")


def _safe_numpy_dtype(*args):
    dtype = np.dtype(*args)
    if dtype.hasobject:
        raise UnsafePickleError(f"numpy dtype {dtype} (objects) is not allowed")
    return dtype


@functools.cache
def _admitted_globals() -> dict[tuple[str, str], Any]:
    """(module, name) -> the object the restricted unpickler hands out for it."""
    import torch

    admitted: dict[tuple[str, str], Any] = {
        tuple(name.rsplit(".", 1)): stand_in for name, stand_in in _PYG_STAND_INS.items()
    }
    admitted.update(
        {
            ("torch._utils", "_rebuild_tensor"): _safe_rebuild_tensor,
            ("torch._utils", "_rebuild_tensor_v2"): _safe_rebuild_tensor_v2,
            ("torch.storage", "_load_from_bytes"): _safe_load_from_bytes,
            ("torch", "Size"): torch.Size,
            ("collections", "OrderedDict"): collections.OrderedDict,
            ("_codecs", "encode"): _latin1_bytes,
        }
    )
    for name in dir(torch):
        value = getattr(torch, name)
        if isinstance(value, torch.dtype):
            admitted["torch", name] = value
        elif name.endswith("Storage") and name not in ("Storage", "TypedStorage"):
            admitted["torch", name] = value  # legacy typed storages (FloatStorage, ...)
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        admitted[module, "scalar"] = _safe_numpy_scalar
        admitted[module, "_reconstruct"] = _safe_numpy_reconstruct
    for module in ("numpy.core.numeric", "numpy._core.numeric"):
        admitted[module, "_frombuffer"] = _safe_numpy_frombuffer
    admitted["numpy", "ndarray"] = np.ndarray
    admitted["numpy", "dtype"] = _safe_numpy_dtype
    return admitted


class _RestrictedUnpickler(pickle.Unpickler):
    """An Unpickler whose find_class admits only what OC20's PyG pickles need."""

    def __init__(self, file, *, source: str):
        super().__init__(file)
        self.source = source

    def find_class(self, module: str, name: str):
        found = _admitted_globals().get((module, name))
        if found is None:
            raise UnsafePickleError(
                f"{self.source}: refusing to unpickle {module}.{name}: only PyG Data objects "
                "holding tensors and numbers are allowed in these files"
            )
        return found


def _restricted_loads(blob: bytes, source: str):
    try:
        return _RestrictedUnpickler(io.BytesIO(blob), source=source).load()
    except UnsafePickleError as err:
        if source in str(err):
            raise
        raise UnsafePickleError(f"{source}: {err}") from err
    except Exception as err:  # truncated stream, bad opcode, wrong argument types, ...
        raise LmdbFormatError(f"{source}: cannot unpickle the value: {err}") from err


def _pyg_attributes(obj, source: str) -> dict[str, Any]:
    """The attributes of an unpickled PyG Data stand-in, for both PyG >= 2.0 and < 2.0."""
    if not isinstance(obj, _PickledPygObject) or not obj.pickled_name.endswith(".Data"):
        raise LmdbFormatError(f"{source}: expected a pickled PyG Data, got {type(obj).__name__}")
    state = obj.state
    if isinstance(state, tuple) and len(state) == 2:  # (__dict__, slot state)
        state = {**(state[0] or {}), **(state[1] or {})}
    if not isinstance(state, dict):
        raise LmdbFormatError(f"{source}: PyG Data state is {type(state).__name__}, not a dict")
    store = state.get("_store")
    if store is not None:  # PyG >= 2.0: the attributes live in a GlobalStorage's _mapping
        store_state = store.state if isinstance(store, _PickledPygObject) else None
        mapping = store_state.get("_mapping") if isinstance(store_state, dict) else None
        if not isinstance(mapping, dict):
            raise LmdbFormatError(f"{source}: PyG Data has a _store without a _mapping")
        state = mapping
    # Pre-2.0 Data keeps attributes directly in __dict__, with None for unset standard ones
    # (x, edge_attr, face, ...) and private bookkeeping such as __num_nodes__.
    return {
        key: value for key, value in state.items() if value is not None and not key.startswith("_")
    }


def load_pyg_pickle(blob: bytes, *, source: str) -> dict[str, Any]:
    """Safely unpickle one OC20 LMDB value (a pickled PyG `Data`) into `{attribute: value}`.

    Values are torch tensors (CPU) and Python/numpy numbers, as stored. Both PyG >= 2.0 pickles
    (attributes in `_store`) and pre-2.0 ones (attributes in the Data's `__dict__`) load; no PyG
    code runs. `source` (e.g. "path/data.lmdb key 12") names the value in error messages.

    Raises UnsafePickleError for anything outside the admitted classes (naming module.class and
    `source`), including tensor blobs whose inner torch.load would need more than
    `weights_only=True`; LmdbFormatError for a value that is not a well-formed pickled Data.
    """
    return _pyg_attributes(_restricted_loads(blob, source), source)


def _pyg_lmdb_length(path: Path, txn: lmdb.Transaction) -> int:
    """Samples in an OC20 LMDB: its entries minus a "length" key, which must then agree."""
    entries = txn.stat()["entries"]
    raw_length = txn.get(LENGTH_KEY)
    if raw_length is None:
        return entries
    stored = _restricted_loads(raw_length, f"{path} key 'length'")  # OC20 pickles an int
    if not isinstance(stored, int) or stored != entries - 1:
        raise LmdbFormatError(f"{path}: 'length' is {stored!r} but it holds {entries - 1} samples")
    return stored


def _pyg_lmdb_files(path: Path) -> list[Path]:
    if path.is_dir():
        files = sorted(path.glob("*.lmdb"))
        if not files:
            raise FileNotFoundError(f"{path} holds no *.lmdb files")
        return files
    if path.exists():
        return [path]
    raise FileNotFoundError(f"LMDB path {path} does not exist")


def _pyg_file_lengths(files: list[Path]) -> list[int]:
    lengths = []
    for file in files:
        with _shared_environment(file) as env, env.begin() as txn:
            try:
                lengths.append(_pyg_lmdb_length(file, txn))
            except lmdb.Error as err:
                raise LmdbFormatError(f"{file}: cannot read: {err}") from err
    return lengths


def pyg_lmdb_length(path: str | os.PathLike) -> int:
    """The number of samples of an OC20-layout LMDB file or directory of shards."""
    return sum(_pyg_file_lengths(_pyg_lmdb_files(Path(path))))


def iter_pyg_lmdb(
    path: str | os.PathLike, start: int = 0, stop: int | None = None
) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield `(index, attributes)` for the samples `start..stop-1` of an OC20-layout LMDB.

    `path` is a single-file LMDB (OC20 IS2RE/IS2RS, the embedded dataset's IS2RE files) or a
    directory of `*.lmdb` shards (OC20 S2EF), read in sorted name order with one global index
    (so several workers can each take a range). Each value goes through `load_pyg_pickle`;
    errors name the file and key.
    """
    files = _pyg_lmdb_files(Path(path))
    lengths = _pyg_file_lengths(files)
    stop = sum(lengths) if stop is None else stop
    first = 0  # global index of the current file's key "0"
    for file, length in zip(files, lengths, strict=True):
        local_range = range(max(start - first, 0), min(stop - first, length))
        if local_range:
            with _shared_environment(file) as env, env.begin() as txn:
                try:
                    for local in local_range:
                        key = str(local)
                        blob = txn.get(key.encode("ascii"))
                        if blob is None:
                            raise LmdbFormatError(f"{file}: key {key!r} is missing")
                        yield first + local, load_pyg_pickle(blob, source=f"{file} key {key!r}")
                except lmdb.Error as err:
                    raise LmdbFormatError(f"{file}: cannot read: {err}") from err
        first += length
