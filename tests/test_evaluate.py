"""Evaluation and relaxation refuse data preprocessed otherwise than the checkpoint's training
data (graphpar.training.data.check_checkpoint_data), naming both values, unless told; S2EF and
direct IS2RE evaluation under G x D gloo ranks give one process's metrics and predictions;
direct IS2RE metrics by hand."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import gloo
import numpy as np
import pytest
import torch

import graphpar.evaluate as evaluate_module
from graphpar.data.dataset import LmdbDataset, collate
from graphpar.data.mini import SPLITS, MiniConfig, generate
from graphpar.evaluate import evaluate, evaluate_is2re, evaluate_s2ef
from graphpar.lock import FolderLocked, folder_lock
from graphpar.models import count_parameters
from graphpar.preprocess import preprocess
from graphpar.provenance import checkpoint_provenance
from graphpar.relax import evaluate_relaxations
from graphpar.training.checkpoint import (
    CHECKPOINT_FORMAT,
    load_trained,
    read_checkpoint,
    rng_state,
)
from graphpar.training.config import TrainingError, config_hash, load_config
from graphpar.training.normalization import build_normalized_model


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


# ---- evaluation under torchrun: G x D = 2 x 2 against one process ----------------------------

# Five adsorbate+slab systems: an S2EF split of 7 frames (the first raw file) and an IS2RE split
# of the 3 that converge; neither divisible by D = 2.
SYSTEMS = {"seed": 3, "systems": {**{s: 0 for s in SPLITS}, "train": 1, "val_id": 5}}
SMALL = {"supercell": [2], "facets": ["111", "100"], "max_steps": 40, "frames_per_file": 7}
NORMALIZATION = {"energy_mean": -1.0, "energy_std": 0.5}


@pytest.fixture(scope="module")
def splits(tmp_path_factory):
    """{"s2ef": 7 frames, "is2re": 3 labelled systems}, preprocessed as the mini data."""
    root = tmp_path_factory.mktemp("evaluate-data")
    generate(MiniConfig.from_dict({**SYSTEMS, **SMALL}), root / "raw", workers=2)
    frames = root / "raw/s2ef/val_id"
    for path in frames.iterdir():
        if not path.name.startswith("0."):
            path.unlink()
    preprocess(frames, root / "s2ef", ref_energy=True, progress=False)
    preprocess(root / "raw/is2re/val_id/data.lmdb", root / "is2re", progress=False)
    found = {task: root / task for task in ("s2ef", "is2re")}
    assert [len(LmdbDataset(path)) for path in found.values()] == [7, 3]
    return found


def untrained_checkpoint(path, model: str, task: str = "s2ef", model_args: dict | None = None):
    """A float64 checkpoint of an untrained tiny model in the format graphpar.training writes,
    recorded as trained on data preprocessed as `splits`' (cutoff 6, 50 neighbours)."""
    settings = {"model": model, "task": task, "train": ["unused"], "max_steps": 1}
    settings["dtype"] = "float64"
    settings["model_args"] = dict(model_args or {})
    if model.startswith("dimenetpp"):  # random output layers, not zeros
        settings["model_args"]["output_initializer"] = "glorot_orthogonal"
    if task == "is2re":
        settings["loss"] = {"force_coefficient": 0}
    config = load_config(settings)
    state = {
        "format": CHECKPOINT_FORMAT,
        "config": config,
        "config_hash": config_hash(config),
        "step": 1,
        "epoch": 0,
        "batch_in_epoch": 1,
        "model": build_normalized_model(config, NORMALIZATION, False).state_dict(),
        "optimizer": {},
        "scheduler": None,
        "ema": None,
        "normalization": NORMALIZATION,
        "graph": {"cutoff": 6.0, "max_neighbors": 50},
        "data": {"cutoff": 6.0, "max_neighbors": 50, "energy_reference": "adsorption"},
        "rng": rng_state(),
        "best": None,
    }
    torch.save(state, path)
    return path


# (task, model, checkpoint task) of each case: both force models on S2EF, the energy-only
# GemNet on direct IS2RE.
CASES = {
    "s2ef-dimenetpp": ("s2ef", "dimenetpp-tiny", "s2ef"),
    "s2ef-gemnet": ("s2ef", "gemnet-tiny", "s2ef"),
    "is2re-gemnet": ("is2re", "gemnet-tiny", "is2re"),
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate-checkpoints")
    return {
        name: untrained_checkpoint(root / f"{name}.pt", model, trained)
        for name, (_, model, trained) in CASES.items()
    }


def outputs(root, name):
    return root / f"{name}.json", root / f"{name}.npz"


def evaluate_cases(cases: list, out: str, gp_size: int) -> list:
    """What each rank of a world runs (tests/gloo.py's `spawn_worlds`): every case with
    `gp_size` graph-parallel ranks, batches of 2; the metrics (None off rank 0)."""
    found = []
    for name, task, checkpoint, data in cases:
        metrics, predictions = outputs(Path(out), name)
        found.append(
            evaluate(
                task, checkpoint, data, "val_id", metrics, predictions, 2, "cpu", False, gp_size
            )
        )
    return found


def without_provenance(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if k != "provenance"}


def test_g2_x_d2_evaluation_equals_one_process(splits, checkpoints, tmp_path):
    """Four gloo ranks (2 graph-parallel x 2 data-parallel groups, shards of 4 and 3 frames, 2
    and 1 systems) give one process's metrics to 1e-9 and its predictions, same ids in the same
    order, for both force models on S2EF and the energy-only model on direct IS2RE; only rank 0
    returns (and writes) them."""
    cases = [(name, task, checkpoints[name], splits[task]) for name, (task, *_) in CASES.items()]
    serial = tmp_path / "serial"
    expected = evaluate_cases(cases, str(serial), 1)  # in this process: no process group
    parallel = tmp_path / "parallel"
    worlds = {"2x2": (4, (cases, str(parallel), 2))}
    ranks = gloo.spawn_worlds(evaluate_cases, worlds, tmp_path / "ranks", timeout_s=120)["2x2"]
    assert all(found == [None] * len(cases) for found in ranks[1:])
    for (name, task, *_), reference, found in zip(cases, expected, ranks[0], strict=True):
        assert found["n_systems"] == reference["n_systems"] == len(LmdbDataset(splits[task]))
        assert found.keys() == reference.keys(), name
        assert isinstance(reference["energy_mae"], float) and reference["energy_mae"] > 0, name
        for key, value in without_provenance(reference).items():
            if isinstance(value, float):
                assert found[key] == pytest.approx(value, rel=1e-9, abs=1e-9), (name, key)
            else:
                assert found[key] == value, (name, key)
        want, got = (np.load(outputs(root, name)[1]) for root in (serial, parallel))
        assert sorted(got.files) == sorted(want.files), name
        for key in want.files:
            if want[key].dtype.kind == "f" and want[key].dtype.itemsize == 8:
                np.testing.assert_allclose(got[key], want[key], rtol=1e-9, atol=1e-9)
            else:
                np.testing.assert_array_equal(got[key], want[key], err_msg=f"{name}: {key}")
    assert sorted(p.name for p in parallel.iterdir()) == sorted(p.name for p in serial.iterdir())


def test_provenance_counts_the_evaluated_networks_parameters(splits, checkpoints, tmp_path):
    """A metrics file records the parameters of the network it evaluated, which a run's
    model_args (the size ladder's widths) change from the registered configuration's (the
    report's #Params and size figure read this)."""
    wider = {"emb_size_atom": 24, "emb_size_edge": 24}
    cases = {name: (checkpoints[name], task) for name, (task, *_) in CASES.items()}
    cases["wider"] = (untrained_checkpoint(tmp_path / "w.pt", "gemnet-tiny", "s2ef", wider), "s2ef")
    for name, (checkpoint, task) in cases.items():
        state = torch.load(checkpoint, weights_only=False)
        count = sum(p.numel() for p in load_trained(checkpoint).model.parameters())
        assert checkpoint_provenance(checkpoint, state, splits[task])["parameters"] == count
        registered = count_parameters(state["config"]["model"])
        assert (count == registered) == (name != "wider"), name


def test_direct_is2re_metrics_are_the_models_energies_against_the_labels(
    splits, checkpoints, tmp_path
):
    """Direct IS2RE: the model's energy of each initial structure against its relaxed energy,
    by hand; `"method": "direct"`; a split without labels gets null metrics with the reason and
    NaN targets; a force model is sent to the relaxations."""
    checkpoint = checkpoints["is2re-gemnet"]
    metrics_path, predictions_path = outputs(tmp_path, "direct")
    metrics = evaluate_is2re(checkpoint, splits["is2re"], "val_id", metrics_path, predictions_path)
    assert json.loads(metrics_path.read_text()) == metrics
    model = load_trained(checkpoint)
    dataset = LmdbDataset(splits["is2re"], triplets=("gemnet",))
    energies, targets = [], []
    for i in range(len(dataset)):
        batch = collate([dataset[i]])
        batch.pos, batch.cell = batch.pos.double(), batch.cell.double()
        energies.append(float(model(batch)["energy"][0].detach()))
        targets.append(float(dataset[i].energy_relaxed))
    errors = np.abs(np.array(energies) - np.array(targets))
    assert metrics["energy_mae"] == pytest.approx(errors.mean(), rel=1e-9)
    assert metrics["ewt"] == float(np.mean(errors < 0.02))
    assert metrics["n_systems"] == 3 and metrics["method"] == "direct"
    assert metrics["task"] == "is2re" and metrics["provenance"]["model"] == "gemnet-tiny"
    predictions = np.load(predictions_path)
    assert list(predictions["ids"]) == [str(int(dataset[i].sid)) for i in range(len(dataset))]
    np.testing.assert_allclose(predictions["energy"], energies, rtol=1e-9)
    np.testing.assert_allclose(predictions["energy_target"], targets, rtol=1e-7)

    class Hidden(LmdbDataset):  # a test split: no relaxed labels
        def __getitem__(self, index):
            sample = super().__getitem__(index)
            del sample.energy_relaxed, sample.pos_relaxed
            return sample

    hidden = evaluate_module.evaluate_is2re
    metrics_path, predictions_path = outputs(tmp_path, "hidden")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(evaluate_module, "LmdbDataset", Hidden)
        metrics = hidden(checkpoint, splits["is2re"], "test_id", metrics_path, predictions_path)
    assert metrics["energy_mae"] is None and metrics["ewt"] is None and metrics["n_systems"] == 3
    assert metrics["reason"] == "the split has no relaxed energy labels (hidden test labels)"
    predictions = np.load(predictions_path)
    np.testing.assert_allclose(predictions["energy"], energies, rtol=1e-9)
    assert np.isnan(predictions["energy_target"]).all()
    with pytest.raises(TrainingError, match="come from relaxations"):
        evaluate_is2re(checkpoints["s2ef-gemnet"], splits["is2re"], "val_id", metrics_path)
    with pytest.raises(TrainingError, match="trained for task is2re"):
        evaluate_s2ef(checkpoint, splits["s2ef"], "val_id", metrics_path)
