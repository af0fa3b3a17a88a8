"""OC20 submission files (graphpar.submission) against fairchem's make_submission_file layout:
built by the tiny run's `submission` jobs, and from hand-made predictions for the checks."""

import json

import numpy as np
import pytest

from graphpar.data.dataset import LmdbDataset
from graphpar.submission import SubmissionError, main, split_arrays, write_submission

# fairchem's keys per split and their dtypes (make_submission_file.py, ocp_trainer.predict and
# run_relaxations of fairchem-core 1.x): S2EF float16 energies and free-atom forces, IS2RS every
# atom's positions, chunk_idx the cumulative atom counts without the last.
LAYOUT = {
    "s2ef": {"ids": "U", "energy": np.float16, "forces": np.float16, "chunk_idx": np.int64},
    "is2rs": {"ids": "U", "pos": np.float64, "chunk_idx": np.int64},
    "is2re": {"ids": "U", "energy": np.float64},
}


def test_tiny_run_writes_submission_files_in_fairchems_layout(tiny_workflow):
    """Every run's S2EF, IS2RS and IS2RE files of the evaluated test split (test_ood_cat):
    keys, dtypes, shapes and ordering as the leaderboard takes them, marked incomplete."""
    results = tiny_workflow / "results" / "tiny"
    s2ef_data = LmdbDataset(tiny_workflow / "resources/mini/lmdb/s2ef/test_ood_cat")
    is2re_data = LmdbDataset(tiny_workflow / "resources/mini/lmdb/is2re/test_ood_cat")
    for run in ("dimenetpp", "gemnet"):
        folder = results / "submissions" / run
        for task, layout in LAYOUT.items():
            manifest = json.loads((folder / f"{task}.json").read_text())
            assert manifest["splits"] == {"ood_cat": "test_ood_cat"}
            assert manifest["missing"] == ["id", "ood_ads", "ood_both"]
            assert manifest["complete"] is False
            with np.load(folder / f"{task}.npz") as npz:
                assert sorted(npz.files) == sorted(f"ood_cat_{key}" for key in layout)
                for key, dtype in layout.items():
                    value = npz[f"ood_cat_{key}"]
                    assert value.dtype.kind == "U" if dtype == "U" else value.dtype == dtype, key
                arrays = {key: npz[f"ood_cat_{key}"] for key in layout}
            ids = list(arrays["ids"])
            assert ids == sorted(ids)  # fairchem's np.unique order
            data = s2ef_data if task == "s2ef" else is2re_data
            samples = {
                (f"{int(s.sid)}_{int(s.fid)}" if task == "s2ef" else str(int(s.sid))): s
                for s in (data[i] for i in range(len(data)))
            }
            assert sorted(samples) == ids and manifest["n_systems"] == {"ood_cat": len(ids)}
            if task == "is2re":
                assert arrays["energy"].shape == (len(ids),)
                continue
            key = "forces" if task == "s2ef" else "pos"
            # S2EF forces cover the free atoms, IS2RS positions every atom.
            counts = [
                int((~samples[i].fixed.bool()).sum()) if task == "s2ef" else int(samples[i].natoms)
                for i in ids
            ]
            assert arrays[key].shape == (sum(counts), 3)
            np.testing.assert_array_equal(arrays["chunk_idx"], np.cumsum(counts)[:-1])
            if task == "is2rs":  # the relaxed structures, fixed atoms where they started
                chunks = np.split(arrays["pos"], arrays["chunk_idx"])
                for sid, chunk in zip(ids, chunks, strict=True):
                    fixed = samples[sid].fixed.bool().numpy()
                    np.testing.assert_allclose(chunk[fixed], samples[sid].pos.numpy()[fixed])


def _s2ef_predictions(ids, atoms):
    forces = [np.full((n, 3), k, np.float16) for k, n in enumerate(atoms)]
    return {
        "ids": np.array(ids),
        "energy": np.arange(len(ids), dtype=np.float16),
        "forces": np.concatenate(forces),
        "chunk_idx": np.cumsum(atoms)[:-1],
    }


def test_systems_are_reordered_with_their_atoms():
    """ids sorted as strings ("10_0" before "9_0"), each system's forces moved with it."""
    out = split_arrays("s2ef", _s2ef_predictions(["9_0", "10_0", "9_1"], [2, 3, 1]))
    assert list(out["ids"]) == ["10_0", "9_0", "9_1"]
    np.testing.assert_array_equal(out["energy"], [1, 0, 2])
    chunks = np.split(out["forces"], out["chunk_idx"])
    assert [c.shape[0] for c in chunks] == [3, 2, 1]
    assert [float(c[0, 0]) for c in chunks] == [1, 0, 2]


def test_all_four_splits_make_a_complete_file_and_flaws_are_refused(tmp_path):
    predictions = tmp_path / "predictions"
    predictions.mkdir()
    splits = ["test_id", "test_ood_ads", "test_ood_cat", "test_ood_both"]
    for k, split in enumerate(splits):
        made = _s2ef_predictions([f"{k}_0", f"{k}_1"], [1, 2])
        np.savez(predictions / f"s2ef_{split}.npz", **made)
    main(["--predictions-dir", str(predictions), "--splits", *splits, "--tasks", "s2ef",
          "--out-dir", str(tmp_path / "out")])  # fmt: skip
    manifest = json.loads((tmp_path / "out" / "s2ef.json").read_text())
    assert manifest["complete"] and manifest["missing"] == []
    with np.load(tmp_path / "out" / "s2ef.npz") as npz:
        assert len(npz.files) == 16 and list(npz["ood_both_ids"]) == ["3_0", "3_1"]

    np.savez(predictions / "s2ef_test_id.npz", **_s2ef_predictions(["1_0", "1_0"], [1, 2]))
    with pytest.raises(SubmissionError, match="more than once: 1_0"):
        write_submission("s2ef", predictions, splits, tmp_path / "again")
    with pytest.raises(SubmissionError, match="no s2ef predictions"):
        write_submission("s2ef", predictions, ["test_ood_cat", "val_id"], tmp_path / "x")
    with pytest.raises(SubmissionError, match="twice"):
        write_submission("s2ef", predictions, ["test_id", "val_id"], tmp_path / "x")
    bad = _s2ef_predictions(["1", "2", "3"], [1, 1, 1])
    bad["chunk_idx"] = bad["chunk_idx"][:1]
    with pytest.raises(SubmissionError, match="2 cuts for 3 systems|1 cuts for 3 systems"):
        split_arrays("s2ef", bad)
    assert not (tmp_path / "again").exists()
