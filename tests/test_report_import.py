"""Metrics-bundle import on tiny in-process bundles: size caps and free disk checked before
anything is written, members streamed and held to their declared sizes, destination names
refused unless they are plain experiment folders inside results/; and NaN/Infinity refused
where a metrics JSON is written, bundled or read (null with its reason still renders n/a)."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import tarfile
from collections import namedtuple
from pathlib import Path

import pytest

from graphpar.io import read_json, write_json
from graphpar.report import __main__ as cli
from graphpar.report import sources
from graphpar.report.bundle import CHUNK_BYTES, MANIFEST, BundleError, import_bundle
from graphpar.report.tables import build_table

PAPER = Path(__file__).resolve().parents[1] / "results" / "paper"
METRICS = "exp/metrics/run/s2ef_val_id.json"
PREDICTIONS = "exp/predictions/run/s2ef_val_id.npz"


def metrics_json(**values) -> bytes:
    """A bundled metrics file: task, split, provenance and `values`."""
    record = {"task": "s2ef", "split": "val_id", "provenance": {"model": "m"}, **values}
    return json.dumps(record).encode()


def make_bundle(path: Path, files: dict[str, bytes], mode: str = "w:gz") -> Path:
    """A bundle (gzip tar by default) of `files` and a manifest listing their sha256."""
    manifest = {
        "experiments": sorted({name.split("/", 1)[0] for name in files}),
        "files": {name: hashlib.sha256(data).hexdigest() for name, data in files.items()},
    }
    with tarfile.open(path, mode) as tar:
        for name, data in {MANIFEST: json.dumps(manifest).encode(), **files}.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def run_import(bundle: Path, results: Path, *options: str) -> str:
    """`python -m graphpar.report import` in-process; its error message ('' on success)."""
    try:
        cli.main(["import", str(bundle), "--results", str(results), *options])
    except SystemExit as stop:
        return str(stop.code)
    return ""


def left_behind(folder: Path) -> list[Path]:
    """Everything under `folder` (nothing when it does not exist)."""
    return sorted(folder.rglob("*")) if folder.exists() else []


@pytest.fixture
def zeros_bundle(tmp_path) -> Path:
    """A ~1 KB gzip bundle whose predictions member holds 1.1 MB of zeros."""
    files = {METRICS: metrics_json(energy_mae=0.1), PREDICTIONS: bytes(1_100_000)}
    return make_bundle(tmp_path / "zeros.tar.gz", files)


# ---- sizes ------------------------------------------------------------------------------------


def test_import_refuses_a_member_over_the_cap_before_writing(zeros_bundle, tmp_path):
    assert zeros_bundle.stat().st_size < 10_000
    results = tmp_path / "results"
    error = run_import(zeros_bundle, results, "--max-member-mb", "1")
    assert f"{PREDICTIONS} holds 1,100,000 bytes uncompressed" in error
    assert "over the cap of 1,000,000 (--max-member-mb)" in error
    assert not results.exists()
    assert run_import(zeros_bundle, results) == ""  # the default cap takes it
    assert (results / PREDICTIONS).stat().st_size == 1_100_000


def test_import_refuses_members_over_the_total_cap(tmp_path):
    files = {METRICS: metrics_json(), PREDICTIONS: bytes(600_000), "exp/scaling/g1.json": b"{}"}
    files["exp/predictions/run/is2re_val_id.npz"] = bytes(600_000)
    bundle = make_bundle(tmp_path / "two.tar.gz", files)
    results = tmp_path / "results"
    error = run_import(bundle, results, "--max-member-mb", "1", "--max-total-mb", "1")
    assert "the members hold" in error and "(--max-total-mb)" in error
    assert not results.exists()


def test_import_refuses_a_bundle_larger_than_the_free_disk(zeros_bundle, tmp_path, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**6, 10**6 - 1000, 1000))
    results = tmp_path / "results"
    with pytest.raises(BundleError, match=r"need 1,100,\d+ bytes, .* has 1,000 free"):
        import_bundle(zeros_bundle, results)
    assert not results.exists()


def test_import_streams_members_in_chunks(zeros_bundle, tmp_path, monkeypatch):
    """No member is read whole: every read asks for at most CHUNK_BYTES."""
    reads = []
    extractfile = tarfile.TarFile.extractfile

    def recording(self, member):
        source = extractfile(self, member)
        read = source.read

        def chunked(size=-1):
            reads.append(size)
            return read(size)

        source.read = chunked
        return source

    monkeypatch.setattr(tarfile.TarFile, "extractfile", recording)
    import_bundle(zeros_bundle, tmp_path / "results")
    assert reads and all(0 < size <= CHUNK_BYTES for size in reads), reads


def test_import_refuses_a_member_longer_than_its_header_says(zeros_bundle, tmp_path, monkeypatch):
    """A tar member yields exactly its header's size, so the lie is simulated: one byte more
    stops the copy, and nothing (staging, folders) is left behind."""
    extractfile = tarfile.TarFile.extractfile

    def lying(self, member):
        source = extractfile(self, member)
        if member.name != PREDICTIONS:
            return source
        return io.BytesIO(source.read() + b"\0")

    monkeypatch.setattr(tarfile.TarFile, "extractfile", lying)
    results = tmp_path / "results"
    with pytest.raises(BundleError, match=f"{PREDICTIONS}: more than the 1,100,000 bytes"):
        import_bundle(zeros_bundle, results)
    assert left_behind(results) == [] and not results.exists()


def test_import_refuses_a_huge_metrics_json(tmp_path):
    """Metrics JSON are parsed in memory: one over 16 MB is refused from its header."""
    bundle = make_bundle(tmp_path / "big.tar.gz", {METRICS: b" " * 16_000_001})
    with pytest.raises(BundleError, match=r"16,000,001 bytes .* \(parsed JSON\)"):
        import_bundle(bundle, tmp_path / "results")


# ---- names and destinations ---------------------------------------------------------------------


@pytest.mark.parametrize("name", ["..", ".", "x\n", "a/b", "", ".hidden", "paper", "benchmarks"])
def test_import_as_refuses_names_outside_results_or_reserved(zeros_bundle, tmp_path, name):
    results = tmp_path / "work" / "results"
    error = run_import(zeros_bundle, results, "--as", name)
    assert error.startswith(f"error: --as {name!r}: "), error
    assert left_behind(tmp_path / "work") == []


@pytest.mark.parametrize(
    "member",
    [
        "exp/predictions/run/x.npz\n",  # `$` matched before a trailing newline
        "paper/metrics/run/s2ef_val_id.json",  # the published numbers
        "exp/metrics//run/x.json",  # not a normalised path
        ".exp/predictions/run/x.npz",
    ],
)
def test_import_refuses_bundled_names_that_are_not_experiment_results(tmp_path, member):
    data = metrics_json() if member.endswith(".json") else b"x"
    bundle = make_bundle(tmp_path / "names.tar", {member: data}, mode="w")
    results = tmp_path / "results"
    with pytest.raises(BundleError, match="refusing member|results only|is reserved"):
        import_bundle(bundle, results)
    assert not results.exists()


def test_import_refuses_a_destination_that_resolves_outside_the_experiment(zeros_bundle, tmp_path):
    results, outside = tmp_path / "results", tmp_path / "outside"
    outside.mkdir()
    (results / "exp").mkdir(parents=True)
    (results / "exp" / "predictions").symlink_to(outside)
    with pytest.raises(BundleError, match=f"would be written to {outside}"):
        import_bundle(zeros_bundle, results)
    assert left_behind(outside) == [] and not (results / "exp" / "metrics").exists()


def test_import_keeps_same_files_and_refuses_different_ones(zeros_bundle, tmp_path):
    results = tmp_path / "results"
    assert import_bundle(zeros_bundle, results, rename="colleague") == ["colleague"]
    record = read_json(results / "colleague" / "imported.json")
    assert record["files"] == sorted(f"colleague/{n[4:]}" for n in (METRICS, PREDICTIONS))
    assert import_bundle(zeros_bundle, results, rename="colleague") == ["colleague"]
    (results / "colleague" / PREDICTIONS[4:]).write_bytes(b"changed")
    with pytest.raises(BundleError, match="1 local file"):
        import_bundle(zeros_bundle, results, rename="colleague")
    import_bundle(zeros_bundle, results, rename="colleague", force=True)
    assert (results / "colleague" / PREDICTIONS[4:]).read_bytes() == bytes(1_100_000)


# ---- NaN and Infinity -------------------------------------------------------------------------


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_write_json_refuses_non_finite_numbers_naming_file_and_key(tmp_path, value):
    path = tmp_path / "s2ef_val_id.json"
    with pytest.raises(ValueError, match=rf"s2ef_val_id.json: provenance.losses\[1\] is {value}"):
        write_json(path, {"task": "s2ef", "provenance": {"losses": [0.5, value]}})
    assert left_behind(tmp_path) == []
    write_json(path, {"energy_mae": None, "reason": "no labels"})  # null is fine


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
def test_report_refuses_a_metrics_file_with_nan_or_infinity(tmp_path, constant):
    path = tmp_path / "results" / METRICS
    path.parent.mkdir(parents=True)
    path.write_text(metrics_json().decode().replace("{", f'{{"energy_mae": {constant}, ', 1))
    with pytest.raises(ValueError, match=f"{path}: {constant} is not a JSON number"):
        build_table("table1", tmp_path / "results", PAPER)


def test_null_fbt_with_its_reason_still_renders_na(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "parameter_count", lambda config: None)  # no torch import
    write_json(
        tmp_path / "results" / "exp/metrics/run/is2rs_val_id.json",
        {
            "task": "is2rs",
            "split": "val_id",
            "provenance": {"model": "m"},
            "adwt": 0.5,
            "fbt": None,
            "afbt": None,
            "fbt_reason": "the oracle covers no element of these systems",
        },
    )
    table = build_table("table2", tmp_path / "results", PAPER)
    ours = table[table["Model"] == "exp/run (m)"].iloc[0]
    assert ours["ADwT (%)"] == "50.00" and ours["FbT (%)"] == ours["AFbT (%)"] == "n/a"


def test_import_refuses_a_bundled_metrics_file_with_nan(tmp_path):
    bundle = make_bundle(tmp_path / "nan.tar", {METRICS: metrics_json(energy_mae=float("nan"))})
    results = tmp_path / "results"
    with pytest.raises(BundleError, match=f"{METRICS}: NaN is not a JSON number"):
        import_bundle(bundle, results)
    assert left_behind(results) == [] and not results.exists()
