"""Tests of the OC20 catalogue, resumable download and safe extraction.

Downloads run against a real HTTP server on 127.0.0.1 started by the tests; archives are small
tars built here in the OC20 layouts (S2EF text, S2EF test LMDB shards, IS2RE LMDBs).
"""

from __future__ import annotations

import hashlib
import io
import lzma
import pickle
import random
import re
import socket
import subprocess
import sys
import tarfile
from pathlib import Path

import lmdb
import pytest
from conftest import tool_env
from http_server import serve

from graphpar.data import oc20
from graphpar.data.lmdb import pyg_lmdb_length

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def server():
    """The local HTTP server (tests/http_server.py); yields (base_url, ServedFiles)."""
    with serve() as served:
        yield served


def closed_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (bound, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def md5_of(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


# --------------------------------------------------------------------------------------------
# Archives in the OC20 layouts


def make_tar(path: Path, members: dict[str, bytes], *, gzip: bool = False) -> Path:
    """Write a tar (optionally .tar.gz) of regular files with exactly these member names."""
    with tarfile.open(path, "w:gz" if gzip else "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


# Two S2EF chunks: 3 + 2 frames. The extxyz payload is random so that it does not compress and a
# transfer cut half-way through the tar is really cut half-way.
_RANDOM_PAYLOAD = random.Random(2022).randbytes(300_000)
S2EF_RAW = {
    "0.extxyz": b"3\nframe 0\n" + _RANDOM_PAYLOAD,
    "0.txt": b"random1,frame0,-0.5\nrandom1,frame1,-0.4\nrandom1,frame2,-0.3\n",
    "1.extxyz": b"2\nframe 0\n",
    "1.txt": b"random2,frame0,-1.0\nrandom2,frame1,-1.1",  # no final newline: still 2 lines
}


def s2ef_members(split_dir: str = "s2ef_val_id") -> dict[str, bytes]:
    """Members of an S2EF tar: <name>/<name>/*.extxyz.xz and *.txt.xz, plus a file to skip."""
    members = {f"{split_dir}/README": b"not data"}
    for filename, data in S2EF_RAW.items():
        members[f"{split_dir}/{split_dir}/{filename}.xz"] = lzma.compress(data)
    return members


def toy_s2ef_archive(frames: int | None = 5) -> oc20.Archive:
    return oc20.Archive("toy_val_id", "toy.tar", ("0" * 32,), "1K / 1K", "s2ef", {"val_id": frames})


@pytest.fixture(scope="module")
def s2ef_tar(tmp_path_factory) -> Path:
    return make_tar(tmp_path_factory.mktemp("tars") / "s2ef_val_id.tar", s2ef_members())


def make_lmdb(path: Path, entries: int, *, length_key: bool) -> bytes:
    """Create a real LMDB file with `entries` data keys (and a `length` key); return its bytes."""
    env = lmdb.open(str(path), subdir=False, map_size=1 << 24)
    with env.begin(write=True) as txn:
        for index in range(entries):
            txn.put(str(index).encode("ascii"), b"pickled data object %d" % index)
        if length_key:
            txn.put(b"length", pickle.dumps(entries))  # as OC20 writes it
    env.close()
    return path.read_bytes()


# --------------------------------------------------------------------------------------------
# Catalogue


def test_catalogue_entries_are_well_formed():
    assert len(oc20.CATALOGUE) == 12
    for name, archive in oc20.CATALOGUE.items():
        assert archive.name == name
        assert archive.layout in oc20.LAYOUTS
        assert archive.md5s and all(re.fullmatch(r"[0-9a-f]{32}", md5) for md5 in archive.md5s)
        assert re.fullmatch(r"[\d.]+[MGT] / [\d.]+[MGT]", archive.size)
        assert archive.splits == tuple(archive.counts)
        assert archive.url().startswith(oc20.BASE_URL)
    assert oc20.CATALOGUE["s2ef_train_all"].counts == {"train_all": 133_934_018}
    assert oc20.CATALOGUE["is2re"].counts["train"] == 460_328
    assert oc20.CATALOGUE["s2ef_test"].splits == (
        "test_id",
        "test_ood_ads",
        "test_ood_cat",
        "test_ood_both",
    )


def test_2m_and_20m_accept_both_documented_md5s():
    documented = {"953474cb93f0b08cdc523399f03f7c36", "863bc983245ffc0285305a1850e19cf7"}
    assert set(oc20.CATALOGUE["s2ef_train_2M"].md5s) == documented
    assert set(oc20.CATALOGUE["s2ef_train_20M"].md5s) == documented


def test_archive_lookups():
    assert oc20.archive_for_split("s2ef", "val_ood_cat").name == "s2ef_val_ood_cat"
    assert oc20.archive_for_split("s2ef", "train_2M").name == "s2ef_train_2M"
    assert oc20.archive_for_split("s2ef", "md").name == "s2ef_md"
    assert oc20.archive_for_split("s2ef", "rattled").name == "s2ef_rattled"
    assert oc20.archive_for_split("s2ef", "test_id").name == "s2ef_test"
    assert oc20.archive_for_split("is2re", "train_10k").name == "is2re"
    with pytest.raises(KeyError, match="valid splits: .*train_200k"):
        oc20.archive_for_split("s2ef", "train_5M")
    with pytest.raises(KeyError, match="unknown OC20 task"):
        oc20.archive_for_split("s2re", "train")
    assert oc20.archive_by_filename("downloads/s2ef_train_200K.tar").name == "s2ef_train_200k"
    with pytest.raises(KeyError):
        oc20.archive_by_filename("s2ef_train_200k.tar")  # case matters on the server
    assert oc20.CATALOGUE["is2re"].split_dir("val_id") == "is2re/val_id"
    assert oc20.CATALOGUE["s2ef_test"].split_dir("test_id") == "s2ef/test_id"


def test_module_imports_without_torch():
    code = "import sys, graphpar.data.oc20; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], env=tool_env(), check=True)


# --------------------------------------------------------------------------------------------
# Download


def test_clean_download_verifies(server, s2ef_tar, tmp_path):
    base_url, served = server
    data = s2ef_tar.read_bytes()
    served.files["/s2ef_val_id.tar"] = data
    dest = tmp_path / "downloads" / "s2ef_val_id.tar"

    matched = oc20.download(f"{base_url}/s2ef_val_id.tar", dest, [md5_of(data)], progress=False)

    assert matched == md5_of(data)
    assert dest.read_bytes() == data
    assert not Path(f"{dest}.part").exists()
    assert served.ranges("/s2ef_val_id.tar") == [None]


def test_cut_transfer_resumes_with_range(server, s2ef_tar, tmp_path):
    base_url, served = server
    data = s2ef_tar.read_bytes()
    cut = len(data) // 2
    served.files["/s2ef_val_id.tar"] = data
    served.cut_after["/s2ef_val_id.tar"] = cut
    dest = tmp_path / "s2ef_val_id.tar"

    oc20.download(f"{base_url}/s2ef_val_id.tar", dest, md5_of(data), backoff=0.01, progress=False)

    assert served.ranges("/s2ef_val_id.tar") == [None, f"bytes={cut}-"]
    assert dest.read_bytes() == data
    assert not Path(f"{dest}.part").exists()


def test_leftover_part_resumes_and_a_complete_part_gets_416(server, tmp_path):
    base_url, served = server
    data = random.Random(1).randbytes(50_000)
    served.files["/x.tar"] = data
    dest = tmp_path / "x.tar"
    part = Path(f"{dest}.part")

    part.write_bytes(data[:1234])  # a previous run died here
    oc20.download(f"{base_url}/x.tar", dest, md5_of(data), progress=False)
    assert dest.read_bytes() == data

    dest.unlink()
    part.write_bytes(data)  # died after the last byte but before the rename
    oc20.download(f"{base_url}/x.tar", dest, md5_of(data), progress=False)
    assert dest.read_bytes() == data
    assert served.ranges("/x.tar") == ["bytes=1234-", f"bytes={len(data)}-"]


def test_wrong_md5_fails_and_removes_the_partial(server, tmp_path):
    base_url, served = server
    data = b"not what the catalogue promised" * 100
    served.files["/s2ef_val_id.tar"] = data
    dest = tmp_path / "s2ef_val_id.tar"
    url = f"{base_url}/s2ef_val_id.tar"
    expected = "0123456789abcdef0123456789abcdef"

    with pytest.raises(oc20.DownloadError) as raised:
        oc20.download(url, dest, [expected], progress=False)

    message = str(raised.value)
    assert url in message and expected in message and md5_of(data) in message
    assert "removed" in message
    assert not dest.exists()
    assert not Path(f"{dest}.part").exists()


def test_a_file_without_checksum_is_checked_by_size(server, tmp_path):
    """Published checkpoints have no checksum: a cut transfer resumes and the file must have
    the size the server announced, or the configured one (a wrong size removes the part)."""
    base_url, served = server
    data = random.Random(2).randbytes(40_000)
    served.files["/model.pt"] = data
    served.cut_after["/model.pt"] = 15_000
    dest = tmp_path / "model.pt"

    assert oc20.download_sized(f"{base_url}/model.pt", dest, backoff=0, progress=False) == 40_000
    assert dest.read_bytes() == data
    assert served.ranges("/model.pt") == [None, "bytes=15000-"]

    with pytest.raises(oc20.DownloadError, match="40000 bytes received, 39999 configured"):
        oc20.download_sized(f"{base_url}/model.pt", tmp_path / "b.pt", 39_999, progress=False)
    assert not (tmp_path / "b.pt").exists() and not (tmp_path / "b.pt.part").exists()


def test_server_ignoring_range_restarts_cleanly(server, s2ef_tar, tmp_path):
    base_url, served = server
    data = s2ef_tar.read_bytes()
    served.files["/s2ef_val_id.tar"] = data
    served.cut_after["/s2ef_val_id.tar"] = len(data) // 3
    served.ignore_range = True
    dest = tmp_path / "s2ef_val_id.tar"

    oc20.download(f"{base_url}/s2ef_val_id.tar", dest, md5_of(data), backoff=0, progress=False)

    # The resume asked for a range, got the whole file with a 200, and started over.
    assert served.ranges("/s2ef_val_id.tar") == [None, f"bytes={len(data) // 3}-"]
    assert dest.read_bytes() == data


def test_unreachable_url_fails_after_retries_with_manual_hint(tmp_path, monkeypatch):
    sleeps = []
    monkeypatch.setattr(oc20.time, "sleep", sleeps.append)
    url = f"http://127.0.0.1:{closed_port()}/s2ef_val_id.tar"
    manual_dir = tmp_path / "manual"

    with pytest.raises(oc20.DownloadError) as raised:
        oc20.download(
            url,
            tmp_path / "s2ef_val_id.tar",
            ["a" * 32],
            retries=3,
            backoff=0.01,
            timeout=5,
            manual_dir=manual_dir,
            progress=False,
        )

    message = str(raised.value)
    assert url in message
    assert f"place it at {manual_dir / 's2ef_val_id.tar'}" in message
    assert "a" * 32 in message
    assert sleeps == [0.01, 0.02, 0.04]  # three retries, exponential backoff


def test_unreachable_without_manual_dir_names_dest(tmp_path):
    dest = tmp_path / "x.tar"
    url = f"http://127.0.0.1:{closed_port()}/x.tar"
    with pytest.raises(oc20.DownloadError, match=re.escape(f"place it at {dest} ")):
        oc20.download(url, dest, ["b" * 32], retries=0, progress=False)


def test_missing_file_is_not_retried(server, tmp_path):
    base_url, served = server
    with pytest.raises(oc20.DownloadError, match="HTTP 404"):
        oc20.download(f"{base_url}/nope.tar", tmp_path / "nope.tar", ["c" * 32], progress=False)
    assert len(served.requests) == 1


def test_manual_placement_is_verified_and_moved_without_network(server, tmp_path):
    base_url, served = server
    data = b"downloaded by hand" * 1000
    manual_dir = tmp_path / "manual"
    manual_dir.mkdir()
    (manual_dir / "s2ef_val_id.tar").write_bytes(data)
    dest = tmp_path / "downloads" / "s2ef_val_id.tar"

    matched = oc20.download(
        f"{base_url}/s2ef_val_id.tar",
        dest,
        ["f" * 32, md5_of(data)],
        manual_dir=manual_dir,
        progress=False,
    )

    assert matched == md5_of(data)
    assert dest.read_bytes() == data
    assert not (manual_dir / "s2ef_val_id.tar").exists()
    assert served.requests == []


def test_bad_manual_placement_fails_but_keeps_the_file(server, tmp_path):
    base_url, served = server
    manual_dir = tmp_path / "manual"
    manual_dir.mkdir()
    placed = manual_dir / "s2ef_val_id.tar"
    placed.write_bytes(b"truncated")
    dest = tmp_path / "s2ef_val_id.tar"

    with pytest.raises(oc20.DownloadError, match=md5_of(b"truncated")):
        oc20.download(
            f"{base_url}/s2ef_val_id.tar", dest, ["f" * 32], manual_dir=manual_dir, progress=False
        )

    assert placed.read_bytes() == b"truncated"
    assert not dest.exists()
    assert served.requests == []


# --------------------------------------------------------------------------------------------
# Extraction: safety


def _unsafe_tar(path: Path, bad: tarfile.TarInfo) -> Path:
    """A tar whose first member is fine and whose second member is `bad`."""
    good = s2ef_members()
    with tarfile.open(path, "w") as tar:
        name = "s2ef_val_id/s2ef_val_id/0.txt.xz"
        info = tarfile.TarInfo(name)
        info.size = len(good[name])
        tar.addfile(info, io.BytesIO(good[name]))
        tar.addfile(bad, io.BytesIO(b"x" * bad.size) if bad.isreg() else None)
    return path


def _regular(name: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = 1
    return info


@pytest.mark.parametrize("member", ["dotdot", "absolute", "symlink", "hardlink"])
def test_unsafe_members_are_refused(tmp_path, member):
    sandbox = tmp_path / "sandbox"
    root = sandbox / "data"
    root.mkdir(parents=True)
    absolute_target = sandbox / "absolute.txt"
    bad = {
        "dotdot": _regular("s2ef_val_id/../../escaped.txt"),
        "absolute": _regular(str(absolute_target)),
        "symlink": tarfile.TarInfo("s2ef_val_id/s2ef_val_id/link.txt"),
        "hardlink": tarfile.TarInfo("s2ef_val_id/s2ef_val_id/hard.txt"),
    }[member]
    if member == "symlink":
        bad.type, bad.linkname = tarfile.SYMTYPE, "/etc/passwd"
    if member == "hardlink":
        bad.type, bad.linkname = tarfile.LNKTYPE, "s2ef_val_id/s2ef_val_id/0.txt.xz"
    tar_path = _unsafe_tar(tmp_path / "evil.tar", bad)

    with pytest.raises(oc20.UnsafeArchiveError) as raised:
        oc20.extract(toy_s2ef_archive(), tar_path, root, progress=False)

    assert repr(bad.name) in str(raised.value) and str(tar_path) in str(raised.value)
    assert sorted(p.name for p in sandbox.rglob("*")) == ["data"]  # nothing written anywhere
    assert not absolute_target.exists()


def test_unreadable_archive_is_a_clear_error(tmp_path):
    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"this is not a tar file" * 100)
    with pytest.raises(oc20.ExtractError, match="cannot read the archive"):
        oc20.extract(toy_s2ef_archive(), junk, tmp_path / "root", progress=False)
    with pytest.raises(oc20.ExtractError, match="does not exist"):
        oc20.extract(toy_s2ef_archive(), tmp_path / "missing.tar", tmp_path / "root")


# --------------------------------------------------------------------------------------------
# Extraction: layouts and counts


def test_extract_s2ef(s2ef_tar, tmp_path):
    root = tmp_path / "root"

    summary = oc20.extract(toy_s2ef_archive(frames=5), s2ef_tar, root, progress=False)

    split_dir = root / "s2ef" / "val_id"
    assert sorted(p.name for p in split_dir.iterdir()) == [
        "0.extxyz.xz",
        "0.txt.xz",
        "1.extxyz.xz",
        "1.txt.xz",
    ]
    assert lzma.decompress((split_dir / "0.extxyz.xz").read_bytes()) == S2EF_RAW["0.extxyz"]
    assert summary["splits"]["val_id"] == {
        "path": "s2ef/val_id",
        "files": 4,
        "expected": 5,
        "found": 5,
    }
    assert sorted(p.name for p in root.iterdir()) == ["s2ef"]  # no staging left behind


def test_extract_replaces_an_existing_split(s2ef_tar, tmp_path):
    stale = tmp_path / "root" / "s2ef" / "val_id" / "stale.txt"
    stale.parent.mkdir(parents=True)
    stale.write_text("from an older extraction")

    oc20.extract(toy_s2ef_archive(), s2ef_tar, tmp_path / "root", progress=False)

    assert not stale.exists()
    assert (stale.parent / "0.txt.xz").exists()
    assert sorted(p.name for p in stale.parents[1].iterdir()) == ["val_id"]


def test_count_mismatch_is_an_error_and_leaves_nothing(s2ef_tar, tmp_path):
    root = tmp_path / "root"
    with pytest.raises(oc20.ExtractError, match=r"split val_id: expected 999 frames, found 5"):
        oc20.extract(toy_s2ef_archive(frames=999), s2ef_tar, root, progress=False)
    assert list(root.iterdir()) == []


def test_count_mismatch_of_2m_mentions_the_md5_ambiguity(tmp_path):
    tar_path = make_tar(tmp_path / "s2ef_train_2M.tar", s2ef_members("s2ef_train_2M"))
    with pytest.raises(oc20.ExtractError, match="expected 2,000,000 frames, found 5.*md5s"):
        oc20.extract(oc20.CATALOGUE["s2ef_train_2M"], tar_path, tmp_path / "root", progress=False)


def test_unknown_counts_and_no_verify_skip_the_check(s2ef_tar, tmp_path):
    summary = oc20.extract(toy_s2ef_archive(frames=None), s2ef_tar, tmp_path / "a", progress=False)
    assert summary["splits"]["val_id"]["found"] == 5
    summary = oc20.extract(
        toy_s2ef_archive(frames=999), s2ef_tar, tmp_path / "b", verify_counts=False, progress=False
    )
    assert summary["splits"]["val_id"]["found"] is None


def test_split_without_files_is_an_error(tmp_path):
    tar_path = make_tar(tmp_path / "empty.tar", {"s2ef_val_id/README": b"no data here"})
    with pytest.raises(oc20.ExtractError, match="no files for split val_id"):
        oc20.extract(toy_s2ef_archive(), tar_path, tmp_path / "root", progress=False)
    assert list((tmp_path / "root").iterdir()) == []


def test_archive_inside_a_split_directory_is_refused(s2ef_tar, tmp_path):
    """Before: the split directory was replaced, deleting the archive in it."""
    root = tmp_path / "root"
    tar_path = root / "s2ef" / "val_id" / s2ef_tar.name
    tar_path.parent.mkdir(parents=True)
    tar_path.write_bytes(s2ef_tar.read_bytes())
    with pytest.raises(oc20.ExtractError, match=r"lies in \S*val_id, which extraction replaces"):
        oc20.extract(toy_s2ef_archive(), tar_path, root, progress=False)
    assert tar_path.read_bytes() == s2ef_tar.read_bytes()
    assert sorted(p.name for p in root.rglob("*")) == ["s2ef", s2ef_tar.name, "val_id"]


def test_corrupt_xz_member_is_named_when_counting(tmp_path):
    members = s2ef_members()
    name = "s2ef_val_id/s2ef_val_id/1.txt.xz"
    members[name] = members[name][: len(members[name]) // 2]
    tar_path = make_tar(tmp_path / "bad.tar", members)
    with pytest.raises(
        oc20.ExtractError, match=r"split val_id: cannot count entries: \S*1\.txt\.xz: truncated"
    ):
        oc20.extract(toy_s2ef_archive(), tar_path, tmp_path / "root", progress=False)
    assert list((tmp_path / "root").iterdir()) == []


@pytest.mark.parametrize("threads", [1, 2])
def test_decompress_leaves_identical_uncompressed_files(s2ef_tar, tmp_path, threads):
    root = tmp_path / "root"

    summary = oc20.extract(
        toy_s2ef_archive(), s2ef_tar, root, decompress=True, threads=threads, progress=False
    )

    split_dir = root / "s2ef" / "val_id"
    assert sorted(p.name for p in split_dir.iterdir()) == sorted(S2EF_RAW)
    for filename, data in S2EF_RAW.items():
        assert (split_dir / filename).read_bytes() == data
    assert summary["splits"]["val_id"]["files"] == 4
    assert summary["decompressed"] is True


def test_decompress_xz(tmp_path):
    compressed = tmp_path / "a.txt.xz"
    compressed.write_bytes(lzma.compress(b"line\n" * 10))
    assert oc20.decompress_xz(compressed) == tmp_path / "a.txt"
    assert (tmp_path / "a.txt").read_bytes() == b"line\n" * 10
    assert not compressed.exists()


def test_extract_s2ef_test_lmdb_shards(tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    prefix = "s2ef_test_lmdbs/test_data/s2ef/all"
    members = {
        f"{prefix}/test_id/data.0000.lmdb": make_lmdb(shards / "a.lmdb", 3, length_key=True),
        f"{prefix}/test_id/data.0001.lmdb": make_lmdb(shards / "b.lmdb", 2, length_key=True),
        f"{prefix}/test_id/data.0000.lmdb-lock": b"\0" * 64,
        f"{prefix}/test_ood_ads/data.0000.lmdb": make_lmdb(shards / "c.lmdb", 4, length_key=False),
        "s2ef_test_lmdbs/README.md": b"skip me",
    }
    tar_path = make_tar(tmp_path / "s2ef_test_lmdbs.tar.gz", members, gzip=True)
    archive = oc20.Archive(
        "toy_test",
        "toy.tar.gz",
        ("0" * 32,),
        "1K / 1K",
        "s2ef_test",
        {"test_id": 5, "test_ood_ads": 4},
    )
    root = tmp_path / "root"

    summary = oc20.extract(archive, tar_path, root, progress=False)

    assert sorted(p.name for p in (root / "s2ef" / "test_id").iterdir()) == [
        "data.0000.lmdb",
        "data.0001.lmdb",
    ]
    assert [p.name for p in (root / "s2ef" / "test_ood_ads").iterdir()] == ["data.0000.lmdb"]
    assert {split: info["found"] for split, info in summary["splits"].items()} == {
        "test_id": 5,
        "test_ood_ads": 4,
    }
    assert pyg_lmdb_length(root / "s2ef" / "test_id" / "data.0001.lmdb") == 2


@pytest.fixture
def is2re_tar(tmp_path) -> Path:
    """An IS2RE tar in the real layout, with real LMDBs, a lock file and other members."""
    lmdbs = tmp_path / "lmdbs"
    lmdbs.mkdir()
    prefix = "is2res_train_val_test_lmdbs/data/is2re"
    sizes = {"10k/train": 2, "100k/train": 3, "all/train": 4, "all/val_id": 2, "all/test_id": 1}
    members = {}
    for subset_split, entries in sizes.items():
        lmdb_file = lmdbs / f"{subset_split.replace('/', '_')}.lmdb"
        members[f"{prefix}/{subset_split}/data.lmdb"] = make_lmdb(
            lmdb_file, entries, length_key=False
        )
    members[f"{prefix}/all/val_id/data.lmdb-lock"] = b"\0" * 64
    members[f"{prefix}/all/val_ood_ads/data.lmdb"] = members[f"{prefix}/all/val_id/data.lmdb"]
    members["is2res_train_val_test_lmdbs/data/is2re/README"] = b"skip me"
    return make_tar(tmp_path / "is2res_train_val_test_lmdbs.tar.gz", members, gzip=True)


def _toy_is2re(**counts) -> oc20.Archive:
    return oc20.Archive("toy_is2re", "toy.tar.gz", ("0" * 32,), "1K / 1K", "is2re", counts)


def test_extract_is2re(is2re_tar, tmp_path):
    root = tmp_path / "root"
    archive = _toy_is2re(train=4, train_10k=2, train_100k=3, val_id=2, test_id=1)

    summary = oc20.extract(archive, is2re_tar, root, progress=False)

    # val_ood_ads is in the tar but not in this archive's splits, so it is skipped.
    assert sorted(p.name for p in (root / "is2re").iterdir()) == sorted(archive.splits)
    for split in archive.splits:
        assert [p.name for p in (root / "is2re" / split).iterdir()] == ["data.lmdb"]
        assert summary["splits"][split]["found"] == archive.counts[split]
    assert pyg_lmdb_length(root / "is2re" / "train_100k" / "data.lmdb") == 3


def test_is2re_count_mismatch_leaves_no_split(is2re_tar, tmp_path):
    root = tmp_path / "root"
    archive = _toy_is2re(train=4, train_10k=10_000, val_id=2)
    with pytest.raises(
        oc20.ExtractError, match="split train_10k: expected 10,000 systems, found 2"
    ):
        oc20.extract(archive, is2re_tar, root, progress=False)
    assert list(root.iterdir()) == []


# --------------------------------------------------------------------------------------------
# Command line


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "graphpar.data.oc20", *args],
        env=tool_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize("command", [[], ["list"], ["download"], ["extract"]])
def test_cli_help(command):
    result = run_cli(*command, "--help")
    assert result.returncode == 0, result.stderr
    assert "usage:" in result.stdout


def test_cli_list():
    result = run_cli("list")
    assert result.returncode == 0, result.stderr
    for name, archive in oc20.CATALOGUE.items():
        assert name in result.stdout and archive.filename in result.stdout
    assert "train_all=133,934,018" in result.stdout


def test_cli_failed_download_is_one_error_line(tmp_path):
    out = tmp_path / "s2ef_val_id.tar"
    base_url = f"http://127.0.0.1:{closed_port()}/"
    result = run_cli(
        "download", "s2ef_val_id", "--out", str(out), "--base-url", base_url, "--retries", "0"
    )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1
    assert result.stderr.splitlines()[-1] == error_lines[0]
    assert f"{base_url}s2ef_val_id.tar" in error_lines[0]
    assert str(out) in error_lines[0]


def test_cli_extract_writes_summary(s2ef_tar, tmp_path):
    summary = tmp_path / "summary.json"
    result = run_cli(
        "extract",
        "s2ef_val_id",
        "--archive",
        str(s2ef_tar),
        "--root",
        str(tmp_path / "root"),
        "--no-verify-counts",
        "--summary",
        str(summary),
    )
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "root" / "s2ef" / "val_id" / "0.txt.xz").exists()
    assert '"path": "s2ef/val_id"' in summary.read_text()


def test_cli_count_mismatch_is_one_error_line(s2ef_tar, tmp_path):
    result = run_cli(
        "extract", "s2ef_val_id", "--archive", str(s2ef_tar), "--root", str(tmp_path / "root")
    )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert result.stderr.splitlines()[-1] == (
        "error: s2ef_val_id: split val_id: expected 999,866 frames, found 5"
    )
