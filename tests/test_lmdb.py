"""Sharded LMDB datasets (pickle-free sample encoding) and safe reading of OC20's pickled LMDBs."""

from __future__ import annotations

import io
import json
import multiprocessing
import os
import pickle
import struct
import zlib
from pathlib import Path
from types import SimpleNamespace

import lmdb
import numpy as np
import pytest
import torch
import torch_geometric.data.data
from torch_geometric.data import Data

from graphpar.data.lmdb import (
    ENCODING_VERSION,
    LmdbFormatError,
    ShardedLmdb,
    ShardWriter,
    UnsafePickleError,
    decode_sample,
    encode_sample,
    iter_pyg_lmdb,
    load_pyg_pickle,
    shard_name,
    write_metadata,
)
from graphpar.data.mini import is2re_data, write_is2re_split

# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def make_sample(seed: int, natoms: int = 5, num_edges: int = 12, triplets: bool = True) -> dict:
    """A sample with every field of the schema (docs/architecture.md section 3), random but
    deterministic."""
    rng = np.random.default_rng(seed)
    sample = {
        "pos": rng.normal(size=(natoms, 3)).astype(np.float32),
        "atomic_numbers": rng.integers(1, 80, natoms, dtype=np.int64),
        "cell": (8 * np.eye(3, dtype=np.float32))[None],
        "pbc": np.array([[True, True, False]]),
        "natoms": natoms,  # a Python int: comes back as a 0-d int64 array
        "tags": rng.integers(0, 3, natoms, dtype=np.int64),
        "fixed": rng.random(natoms) < 0.5,
        "edge_index": rng.integers(0, max(natoms, 1), (2, num_edges), dtype=np.int64),
        "cell_offsets": rng.integers(-1, 2, (num_edges, 3), dtype=np.int64),
        "energy": float(rng.normal()),  # a Python float: comes back as a 0-d float64 array
        "forces": rng.normal(size=(natoms, 3)).astype(np.float32),
        "sid": np.int64(1000 + seed),
        "fid": np.int64(seed % 7),
        "pos_relaxed": rng.normal(size=(natoms, 3)).astype(np.float32),
        "energy_relaxed": np.float64(rng.normal()),
        "energy_init": np.float64(rng.normal()),
    }
    if triplets:
        num_triplets = 3 * num_edges
        for name in ("idx_kj", "idx_ji", "id3_ba", "id3_ca"):
            sample[name] = rng.integers(0, max(num_edges, 1), num_triplets, dtype=np.int64)
        sample["id_swap"] = rng.permutation(num_edges).astype(np.int64)
    return sample


def assert_same_sample(decoded: dict, original: dict) -> None:
    """Same names in the same order, same dtype and shape, bit-identical values."""
    assert list(decoded) == list(original)
    for name, value in original.items():
        expected = np.asarray(value)
        if isinstance(value, int) and not isinstance(value, bool):
            expected = np.asarray(value, dtype=np.int64)
        got = decoded[name]
        assert isinstance(got, np.ndarray), name
        assert got.dtype == expected.dtype, name
        assert got.shape == expected.shape, name
        assert got.tobytes() == expected.tobytes(), name


def write_dataset(directory: Path, shard_sizes: list[int], map_size: int = 2**20) -> list[dict]:
    """Write shards of make_sample()s plus metadata; returns the samples in dataset order."""
    samples = []
    for shard, size in enumerate(shard_sizes):
        with ShardWriter(directory / shard_name(shard), map_size=map_size) as writer:
            for _ in range(size):
                sample = make_sample(len(samples), natoms=3 + len(samples) % 4)
                writer.append(sample)
                samples.append(sample)
    natoms = np.array([s["natoms"] for s in samples], dtype=np.int64)
    num_edges = np.array([s["edge_index"].shape[1] for s in samples], dtype=np.int64)
    write_metadata(
        directory,
        {"cutoff": 6.0, "max_neighbors": 50, "source": "test"},
        {"natoms": natoms, "num_edges": num_edges},
    )
    return samples


def with_body(blob: bytes, body: bytes, header_length: int | None = None) -> bytes:
    """`blob` with its header+data replaced by `body`, with a valid checksum."""
    magic, version, old_header_length, _ = struct.unpack_from("<6sHII", blob)
    if header_length is None:
        header_length = old_header_length
    return struct.pack("<6sHII", magic, version, header_length, zlib.crc32(body)) + body


def write_pickled_lmdb(path: Path, values: list[bytes], length_key: bytes | None = None) -> None:
    """A single-file LMDB like OC20's: keys "0".."n-1" (and optionally "length")."""
    env = lmdb.open(str(path), subdir=False, lock=False, map_size=2**24)
    with env.begin(write=True) as txn:
        for index, value in enumerate(values):
            txn.put(str(index).encode("ascii"), value)
        if length_key is not None:
            txn.put(b"length", length_key)
    env.close()


class Evil:
    """Unpickling this runs a shell command that creates `marker`."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class EvilTensorBlob:
    """Pickles like a tensor storage whose inner torch.load would unpickle an Evil."""

    def __init__(self, marker: Path):
        buffer = io.BytesIO()
        torch.save({"payload": Evil(marker)}, buffer, _use_new_zipfile_serialization=False)
        self.blob = buffer.getvalue()

    def __reduce__(self):
        return (torch.storage._load_from_bytes, (self.blob,))


# --------------------------------------------------------------------------------------------
# Sample encoding
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_edges", [0, 1, 40])
def test_encode_decode_round_trip_is_exact(num_edges):
    sample = make_sample(3, num_edges=num_edges)
    decoded = decode_sample(encode_sample(sample))
    assert_same_sample(decoded, sample)
    assert decoded["natoms"].shape == () and decoded["natoms"].dtype == np.int64
    assert decoded["energy"].dtype == np.float64 and float(decoded["energy"]) == sample["energy"]
    assert decoded["edge_index"].shape == (2, num_edges)


def test_encode_decode_unusual_values():
    sample = {
        "special": np.array([np.nan, np.inf, -np.inf, -0.0, 1e-300]),
        "half": np.arange(5, dtype=np.float16),
        "bytes": np.arange(7, dtype=np.uint8),
        "big_endian": np.arange(4, dtype=">i4"),
        "transposed": np.arange(12, dtype=np.float32).reshape(3, 4).T,  # not C-contiguous
        "zero_d_bool": np.bool_(True),
        "python_bool": False,
        "empty_2d": np.zeros((0, 3), dtype=np.float32),
        "torch": torch.arange(6, dtype=torch.int32).view(2, 3),
    }
    decoded = decode_sample(encode_sample(sample))
    for name in ("special", "half", "bytes", "big_endian", "empty_2d"):
        assert decoded[name].dtype == sample[name].dtype
        assert decoded[name].tobytes() == sample[name].tobytes()
    np.testing.assert_array_equal(decoded["transposed"], sample["transposed"])
    assert decoded["zero_d_bool"].dtype == np.bool_ and decoded["zero_d_bool"].shape == ()
    assert decoded["python_bool"].dtype == np.bool_ and not decoded["python_bool"]
    assert decoded["torch"].dtype == np.int32
    np.testing.assert_array_equal(decoded["torch"], sample["torch"].numpy())


def test_decoded_arrays_are_read_only_unless_asked():
    blob = encode_sample(make_sample(0))
    assert not decode_sample(blob)["pos"].flags.writeable
    writable = decode_sample(blob, writable=True)
    assert all(array.flags.writeable for array in writable.values())
    writable["pos"][0, 0] = 123.0
    assert decode_sample(blob)["pos"][0, 0] != 123.0  # the blob itself is untouched


def test_encode_refuses_objects():
    with pytest.raises(TypeError, match="'bad'"):
        encode_sample({"bad": np.array([object()])})
    with pytest.raises(TypeError):
        encode_sample({1: np.zeros(2)})


def test_decode_refuses_malformed_blobs():
    blob = encode_sample(make_sample(1))
    with pytest.raises(LmdbFormatError, match="magic"):
        decode_sample(b"NOTSMP" + blob[6:])
    unknown_version = blob[:6] + struct.pack("<H", ENCODING_VERSION + 1) + blob[8:]
    with pytest.raises(LmdbFormatError, match="version"):
        decode_sample(unknown_version)
    with pytest.raises(LmdbFormatError, match="too short"):
        decode_sample(blob[:10])
    with pytest.raises(LmdbFormatError, match="checksum"):
        decode_sample(blob[:-1])  # truncated
    corrupted_header = bytearray(blob)
    corrupted_header[20] ^= 0xFF
    with pytest.raises(LmdbFormatError, match="checksum"):
        decode_sample(bytes(corrupted_header))
    corrupted_data = bytearray(blob)
    corrupted_data[-20] ^= 0x01
    with pytest.raises(LmdbFormatError, match="checksum"):
        decode_sample(bytes(corrupted_data))


def test_decode_refuses_malformed_headers_with_valid_checksums():
    def blob_with_header(header: dict, data: bytes = bytes(16)) -> bytes:
        text = json.dumps(header).encode()
        text += b" " * (-len(text) % 8)
        return with_body(encode_sample({}), text + data, header_length=len(text))

    assert decode_sample(blob_with_header({"fields": [["x", "<f8", [2], 0]]}))["x"].shape == (2,)
    bad_headers = [
        {"fields": [["x", "<f8", [3], 0]]},  # past the end of the data
        {"fields": [["x", "|O", [1], 0]]},  # object dtype
        {"fields": [["x", "<f8", [-1, -2], 0]]},  # negative shape
        {"fields": [["x", "<f8", [1], -8]]},  # negative offset
        {"fields": [["x", "<f8"]]},  # missing entries
        {"no_fields": []},
    ]
    for header in bad_headers:
        with pytest.raises(LmdbFormatError):
            decode_sample(blob_with_header(header))
    not_json = with_body(encode_sample({}), b"{not json", header_length=9)
    with pytest.raises(LmdbFormatError, match="malformed"):
        decode_sample(not_json)
    header_too_long = with_body(encode_sample({}), b"{}      ", header_length=1000)
    with pytest.raises(LmdbFormatError, match="header length"):
        decode_sample(header_too_long)


# --------------------------------------------------------------------------------------------
# Sharded datasets
# --------------------------------------------------------------------------------------------


def test_sharded_round_trip(tmp_path):
    # A tiny initial map forces ShardWriter to grow it on MapFullError; shard 1 is empty.
    samples = write_dataset(tmp_path, [4, 0, 3, 5], map_size=2**13)
    reader = ShardedLmdb(tmp_path)
    assert len(reader) == 12
    for index, sample in enumerate(samples):
        assert_same_sample(reader[index], sample)
    assert_same_sample(reader[-1], samples[-1])
    assert_same_sample(reader[np.int64(5)], samples[5])

    metadata = reader.metadata
    assert metadata["schema_version"] == 1 and metadata["length"] == 12
    assert [s["length"] for s in metadata["shards"]] == [4, 0, 3, 5]
    assert [s["file"] for s in metadata["shards"]] == [shard_name(k) for k in range(4)]
    assert (metadata["cutoff"], metadata["max_neighbors"], metadata["source"]) == (6.0, 50, "test")
    assert set(reader.arrays) == {"natoms", "num_edges"}
    np.testing.assert_array_equal(reader.arrays["natoms"], [s["natoms"] for s in samples])
    assert reader.arrays["natoms"].dtype == np.int64

    for bad_index in (12, -13, 10**9):
        with pytest.raises(IndexError, match=str(tmp_path)):
            reader[bad_index]
    with pytest.raises(TypeError):
        reader[1.0]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        *(shard_name(k) for k in range(4)),
        "metadata.json",
        "metadata.npz",
    ]


def test_shard_writer_is_atomic(tmp_path):
    path = tmp_path / shard_name(0)
    with pytest.raises(RuntimeError, match="boom"), ShardWriter(path) as writer:
        writer.append(make_sample(0))
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []  # neither the shard nor a temporary file

    with ShardWriter(path) as writer:
        assert writer.append(make_sample(0)) == 0
        assert writer.append(make_sample(1)) == 1
        assert len(writer) == 2
    env = lmdb.open(str(path), subdir=False, readonly=True, lock=False)
    with env.begin() as txn:
        assert txn.get(b"length") == b"2" and txn.stat()["entries"] == 3
    env.close()


def test_write_metadata_validates(tmp_path):
    write_dataset(tmp_path, [3])
    with pytest.raises(ValueError, match="rows"):
        write_metadata(tmp_path, {}, {"natoms": np.zeros(2)})
    with pytest.raises(ValueError, match="reserved"):
        write_metadata(tmp_path, {"length": 5}, {})
    with pytest.raises(ValueError, match="object"):
        write_metadata(tmp_path, {}, {"names": np.array([None, None, None])})


def read_all(reader: ShardedLmdb) -> list[bytes]:
    """Every sample of `reader`, re-encoded so results compare as bytes across processes."""
    return [encode_sample(reader[i]) for i in range(len(reader))]


def read_in_child(reader: ShardedLmdb, order: list[int]) -> tuple[int, dict[int, bytes]]:
    return os.getpid(), {i: encode_sample(reader[i]) for i in order}


class ShardedDataset(torch.utils.data.Dataset):
    def __init__(self, reader: ShardedLmdb):
        self.reader = reader

    def __len__(self) -> int:
        return len(self.reader)

    def __getitem__(self, index: int) -> tuple[int, bytes]:
        return index, encode_sample(self.reader[index])


def keep_as_list(batch):
    return batch


@pytest.mark.timeout(60)
def test_concurrent_readers_in_forked_processes(tmp_path):
    write_dataset(tmp_path, [5, 4, 6])
    reader = ShardedLmdb(tmp_path)
    expected = read_all(reader)  # the parent opens every shard before forking

    context = multiprocessing.get_context("fork")
    rng = np.random.default_rng(0)
    orders = [rng.permutation(len(reader)).tolist() for _ in range(4)]
    with context.Pool(4) as pool:
        results = pool.starmap(read_in_child, [(reader, order) for order in orders])
    assert {pid for pid, _ in results} != {os.getpid()}
    for _, samples in results:
        assert [samples[i] for i in range(len(reader))] == expected

    # The parent's handles still work after its children used their own.
    assert read_all(reader) == expected

    loader = torch.utils.data.DataLoader(
        ShardedDataset(reader),
        batch_size=3,
        shuffle=True,
        num_workers=2,
        multiprocessing_context="fork",
        collate_fn=keep_as_list,
    )
    for _ in range(2):  # two epochs: workers are started afresh for each
        seen = {index: blob for batch in loader for index, blob in batch}
        assert [seen[i] for i in range(len(reader))] == expected


def test_reader_pickles_without_open_handles(tmp_path):
    write_dataset(tmp_path, [2, 3])
    reader = ShardedLmdb(tmp_path)
    expected = read_all(reader)
    copy = pickle.loads(pickle.dumps(reader))  # what a spawn-started worker receives
    assert read_all(copy) == expected
    reader.close()
    assert read_all(reader) == expected  # reopens after close()


def test_several_readers_of_one_dataset_in_one_process(tmp_path):
    # py-lmdb refuses to open one file twice in a process: readers share its environment.
    write_dataset(tmp_path, [2, 3])
    first, second = ShardedLmdb(tmp_path), ShardedLmdb(tmp_path)
    expected = read_all(first)
    assert read_all(second) == expected
    first.close()
    assert read_all(second) == expected
    assert [index for index, _ in enumerate(first)] == list(range(5))  # reopens
    write_metadata(tmp_path, {}, {})  # reads every shard while both readers hold them open
    del first, second


def test_truncated_shard_names_the_file(tmp_path):
    write_dataset(tmp_path, [3, 4])
    shard = tmp_path / shard_name(1)
    os.truncate(shard, shard.stat().st_size // 2)
    reader = ShardedLmdb(tmp_path)
    assert_same_sample(reader[0], make_sample(0, natoms=3))  # shard 0 is fine
    with pytest.raises(LmdbFormatError, match=f"{shard}.*truncated"):
        reader[4]


def test_corrupt_shard_names_the_file_and_sample(tmp_path):
    samples = write_dataset(tmp_path, [6])
    shard = tmp_path / shard_name(0)
    content = bytearray(shard.read_bytes())
    # Overwrite bytes inside the stored value nearest the middle of the file (LMDB itself keeps
    # no checksums, so only the sample encoding can notice).
    starts = [i for i in range(len(content)) if content.startswith(b"GPSAMP", i)]
    middle = min(starts, key=lambda start: abs(start - len(content) // 2))
    content[middle + 100 : middle + 108] = b"\xa5" * 8
    shard.write_bytes(bytes(content))

    reader = ShardedLmdb(tmp_path)
    failed = []
    for index in range(len(samples)):
        try:
            assert_same_sample(reader[index], samples[index])
        except LmdbFormatError as err:
            assert str(shard) in str(err) and f"sample {index}" in str(err)
            failed.append(index)
    assert len(failed) == 1


def test_corrupt_lmdb_structure_names_the_file(tmp_path):
    write_dataset(tmp_path, [3])
    shard = tmp_path / shard_name(0)
    content = bytearray(shard.read_bytes())
    content[4096 : 4096 + 64] = b"\xa5" * 64  # the second meta page
    content[:64] = b"\xa5" * 64  # the first
    shard.write_bytes(bytes(content))
    with pytest.raises(LmdbFormatError, match=str(shard)):
        ShardedLmdb(tmp_path)[0]


def test_length_disagreeing_with_metadata(tmp_path):
    write_dataset(tmp_path, [3, 4])
    metadata_path = tmp_path / "metadata.json"
    metadata = json.loads(metadata_path.read_text())
    metadata["shards"][1]["length"] = 5
    metadata["length"] = 8
    metadata_path.write_text(json.dumps(metadata))
    reader = ShardedLmdb(tmp_path)
    assert len(reader) == 8
    with pytest.raises(LmdbFormatError, match=f"{tmp_path / shard_name(1)}.*holds 4 samples"):
        reader[3]

    metadata["length"] = 9  # counts that do not add up are refused up front
    metadata_path.write_text(json.dumps(metadata))
    with pytest.raises(LmdbFormatError, match="add up"):
        ShardedLmdb(tmp_path)


def test_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="metadata.json"):
        ShardedLmdb(tmp_path)
    write_dataset(tmp_path, [2, 2])
    (tmp_path / shard_name(1)).unlink()
    reader = ShardedLmdb(tmp_path)
    reader[1]
    with pytest.raises(FileNotFoundError, match=shard_name(1)):
        reader[2]
    metadata = json.loads((tmp_path / "metadata.json").read_text())
    metadata["schema_version"] = 99
    (tmp_path / "metadata.json").write_text(json.dumps(metadata))
    with pytest.raises(LmdbFormatError, match="schema version 99"):
        ShardedLmdb(tmp_path)


# --------------------------------------------------------------------------------------------
# OC20's pickled PyG LMDBs
# --------------------------------------------------------------------------------------------


def oc20_like_data(seed: int) -> Data:
    generator = torch.Generator().manual_seed(seed)
    return Data(
        pos=torch.randn(4, 3, generator=generator),
        pos_relaxed=torch.randn(4, 3, generator=generator),
        cell=torch.eye(3).view(1, 3, 3) * 7,
        atomic_numbers=torch.tensor([29.0, 29.0, 8.0, 1.0]),
        natoms=4,
        tags=torch.tensor([0, 1, 2, 2]),
        fixed=torch.tensor([1.0, 0.0, 0.0, 0.0]),
        force=torch.randn(4, 3, generator=generator),
        edge_index=torch.randint(0, 4, (2, 6), generator=generator),
        y_init=-1.25 + seed,
        y_relaxed=-2.5 + seed,
        sid=seed,
    )


def assert_same_attributes(loaded: dict, data: Data) -> None:
    expected = data.to_dict()
    assert set(loaded) == set(expected)
    for key, value in expected.items():
        if isinstance(value, torch.Tensor):
            assert loaded[key].dtype == value.dtype, key
            assert torch.equal(loaded[key], value), key
        else:
            assert loaded[key] == value and type(loaded[key]) is type(value), key


def test_modern_pyg_pickle_loads():
    data = oc20_like_data(1)
    assert_same_attributes(load_pyg_pickle(pickle.dumps(data, protocol=-1), source="x"), data)
    assert_same_attributes(load_pyg_pickle(pickle.dumps(data, protocol=2), source="x"), data)


class LegacyData:
    """Pickles like a PyG < 2.0 Data: attributes directly in the instance __dict__."""


LegacyData.__module__ = "torch_geometric.data.data"
LegacyData.__qualname__ = LegacyData.__name__ = "Data"


def test_pre_2_pyg_pickle_loads(monkeypatch):
    data = oc20_like_data(2)
    legacy = LegacyData()
    # PyG 1.x's Data.__init__ set the standard attributes to None and kept a private count.
    legacy.__dict__.update({"x": None, "edge_attr": None, "y": None, "face": None})
    legacy.__dict__["__num_nodes__"] = None
    legacy.__dict__.update(data.to_dict())
    # pickle checks that a class is importable under its name: point PyG's name at ours briefly.
    with monkeypatch.context() as patch:
        patch.setattr(torch_geometric.data.data, "Data", LegacyData)
        blob = pickle.dumps(legacy, protocol=-1)
    assert b"_store" not in blob
    assert_same_attributes(load_pyg_pickle(blob, source="x"), data)


def test_iter_single_file_and_sharded_pyg_lmdbs(tmp_path):
    datas = [oc20_like_data(seed) for seed in range(5)]
    single = tmp_path / "data.lmdb"
    write_pickled_lmdb(single, [pickle.dumps(d, protocol=-1) for d in datas])
    loaded = list(iter_pyg_lmdb(single))
    assert [index for index, _ in loaded] == list(range(5))
    for (_, attributes), data in zip(loaded, datas, strict=True):
        assert_same_attributes(attributes, data)

    # OC20 S2EF layout: a directory of shards, each with a pickled "length" key.
    shards = tmp_path / "s2ef"
    shards.mkdir()
    write_pickled_lmdb(
        shards / "data.0000.lmdb", [pickle.dumps(d) for d in datas[:2]], pickle.dumps(2)
    )
    write_pickled_lmdb(
        shards / "data.0001.lmdb", [pickle.dumps(d) for d in datas[2:]], pickle.dumps(3)
    )
    loaded = list(iter_pyg_lmdb(shards))
    assert [index for index, _ in loaded] == list(range(5))
    for (_, attributes), data in zip(loaded, datas, strict=True):
        assert_same_attributes(attributes, data)

    wrong_length = tmp_path / "wrong.lmdb"
    write_pickled_lmdb(wrong_length, [pickle.dumps(d) for d in datas[:2]], pickle.dumps(3))
    with pytest.raises(LmdbFormatError, match=f"{wrong_length}.*'length'"):
        list(iter_pyg_lmdb(wrong_length))


def test_embedded_dataset_is2re_lmdb_loads(tmp_path):
    rng = np.random.default_rng(0)
    results = []
    for sid in (11, 12):
        natoms = 6
        frames = [
            {
                "positions": rng.normal(size=(natoms, 3)),
                "energy": float(rng.normal()),
                "forces": rng.normal(size=(natoms, 3)),
            }
            for _ in range(3)
        ]
        tags = np.array([0, 0, 1, 1, 2, 2])
        results.append(
            {
                "spec": SimpleNamespace(sid=sid),
                "numbers": np.array([29, 29, 29, 29, 8, 1]),
                "cell": 6.0 * np.eye(3),
                "tags": tags,
                "fixed": tags == 0,
                "frames": frames,
                "reference_energy": -3.0,
            }
        )
    path = tmp_path / "is2re" / "data.lmdb"
    assert write_is2re_split(results, path) == 2
    loaded = list(iter_pyg_lmdb(path))
    assert [index for index, _ in loaded] == [0, 1]
    for (_, attributes), result in zip(loaded, results, strict=True):
        assert_same_attributes(attributes, is2re_data(result))
        assert attributes["sid"] == result["spec"].sid


def test_disallowed_global_is_refused_without_running(tmp_path):
    marker = tmp_path / "pwned"
    data = oc20_like_data(0)
    data.payload = Evil(marker)
    path = tmp_path / "evil.lmdb"
    write_pickled_lmdb(path, [pickle.dumps(oc20_like_data(1)), pickle.dumps(data)])
    with pytest.raises(UnsafePickleError) as caught:
        list(iter_pyg_lmdb(path))
    message = str(caught.value)
    assert f"{os.system.__module__}.system" in message
    assert str(path) in message and "key '1'" in message
    assert not marker.exists()

    with pytest.raises(UnsafePickleError, match="posix.system|nt.system"):
        load_pyg_pickle(pickle.dumps(Evil(marker)), source="x")
    assert not marker.exists()


def test_malicious_tensor_blob_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    data = oc20_like_data(0)
    data.payload = EvilTensorBlob(marker)
    blob = pickle.dumps(data, protocol=-1)
    with pytest.raises(UnsafePickleError, match="tensor blob") as caught:
        load_pyg_pickle(blob, source="evil.lmdb key '0'")
    assert "evil.lmdb key '0'" in str(caught.value)
    assert not marker.exists()


def test_other_non_data_pickles_are_refused():
    with pytest.raises(UnsafePickleError, match="builtins.eval"):
        load_pyg_pickle(b"cbuiltins\neval\n(S'1'\ntR.", source="x")
    with pytest.raises(LmdbFormatError, match="expected a pickled PyG Data"):
        load_pyg_pickle(pickle.dumps({"pos": torch.zeros(2)}), source="x")
    with pytest.raises(LmdbFormatError, match="cannot unpickle"):
        load_pyg_pickle(pickle.dumps(oc20_like_data(0))[:-30], source="x")
