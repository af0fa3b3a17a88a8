"""Evaluation and relaxation refuse data preprocessed otherwise than the checkpoint's training
data (graphpar.training.data.check_checkpoint_data), naming both values, unless told."""

from __future__ import annotations

import json
import shutil

import pytest

from graphpar.evaluate import evaluate_s2ef
from graphpar.lock import FolderLocked, folder_lock
from graphpar.relax import evaluate_relaxations
from graphpar.training.checkpoint import read_checkpoint
from graphpar.training.config import TrainingError


def altered(source, destination, **changes):
    """A copy of a preprocessed split whose metadata.json records other settings."""
    shutil.copytree(source, destination)
    path = destination / "metadata.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))
    return destination


def test_evaluation_refuses_data_preprocessed_otherwise(tiny_workflow, tmp_path):
    checkpoint = tiny_workflow / "results/tiny/checkpoints/gemnet/final.pt"
    val = tiny_workflow / "resources/mini/lmdb/s2ef/val_id"
    trained = read_checkpoint(checkpoint)
    assert trained["data"]["energy_reference"] == "adsorption"
    assert (
        trained["graph"]["max_neighbors"]
        == json.loads((val / "metadata.json").read_text())["max_neighbors"]
    )
    cases = {
        "max_neighbors 12 but": altered(val, tmp_path / "fewer", max_neighbors=12),
        "energy_reference total but": altered(val, tmp_path / "total", energy_reference="total"),
    }
    for message, data in cases.items():
        metrics = tmp_path / f"{data.name}.json"
        with pytest.raises(TrainingError, match=f"{data} has {message} {checkpoint} was trained"):
            evaluate_s2ef(checkpoint, data, "val_id", metrics)
        assert not metrics.exists()
    found = evaluate_s2ef(
        checkpoint, cases["max_neighbors 12 but"], "val_id", metrics, None, 16, "cpu", True
    )
    assert found["n_systems"] > 0
    identity = json.loads((val / "metadata.json").read_text())["content_sha256"]
    assert found["provenance"]["dataset_identity"] == identity


def test_relaxation_refuses_energies_on_another_reference(tiny_workflow, tmp_path):
    checkpoint = tiny_workflow / "results/tiny/checkpoints/dimenetpp/final.pt"
    split = tiny_workflow / "resources/mini/lmdb/is2re/val_id"
    data = altered(split, tmp_path / "total", energy_reference="total")
    out = [tmp_path / name for name in ("relaxed", "metrics", "predictions")]
    with pytest.raises(TrainingError, match="energy_reference total but .* adsorption"):
        evaluate_relaxations(checkpoint, data, "val_id", *out, device="cpu")
    assert not any(path.exists() for path in out)
    # One relaxation job at a time in a relaxation folder.
    with folder_lock(out[0], "relaxation"), pytest.raises(FolderLocked, match="in use by"):
        evaluate_relaxations(checkpoint, split, "val_id", *out, device="cpu")
    assert [path.name for path in out[0].iterdir()] == []
