"""OC20 submission files: one `.npz` per task with every split's predictions, in the layout
fairchem's `make_submission_file.py` writes and the OC20 leaderboard (EvalAI) takes.

    python -m graphpar.submission --predictions-dir results/mini/predictions/gemnet \\
        --splits test_id test_ood_ads test_ood_cat test_ood_both \\
        --tasks s2ef is2rs is2re --out-dir results/mini/submissions/gemnet

Each split's predictions (`graphpar.evaluate`, `graphpar.relax`: `<task>_<split>.npz` in
`--predictions-dir`) become the keys `<name>_<key>`, where <name> is the split without its
`val_`/`test_` prefix (id, ood_ads, ood_cat, ood_both), as fairchem keys them:

- s2ef: ids ("<sid>_<fid>", str [n]), energy (float16 [n]), forces (float16 [free atoms, 3]:
  the free, unfixed atoms only, system after system) and chunk_idx (int64 [n - 1]: where
  `np.split(forces, chunk_idx)` cuts the systems apart);
- is2rs: ids ("<sid>"), pos (float64 [atoms, 3]: every atom, fixed ones included, as fairchem's
  run-relaxations writes them) and chunk_idx (int64 [n - 1], over all atoms);
- is2re: ids ("<sid>") and energy (float64 [n]), from relaxations or from a direct energy model
  (fairchem writes float64 from relaxations and float16 from its predict; the leaderboard
  reads both).

Systems are in the order fairchem leaves them (ids sorted as strings, `np.unique`); a split
that holds an id twice is refused, where fairchem would keep one silently. The leaderboard
takes a file only with all four test splits: a file written with some missing still holds
the others, and `<task>.json` beside it lists the splits present, the systems per split, the
splits missing and `complete` (true only when all four are there), so a partial run (the
embedded dataset, or a split left out by `evaluate.splits`) is marked, never mistaken for a
submission.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from graphpar.io import write_json, write_npz

OC20_SPLITS = ("id", "ood_ads", "ood_cat", "ood_both")  # fairchem's SPLITS["OC20"]
TASKS = ("s2ef", "is2rs", "is2re")
# What each task's submission takes from our per-split predictions (the rest, labels and
# per-system metrics for plots, stays out).
KEYS = {"s2ef": ("ids", "energy", "forces", "chunk_idx"), "is2rs": ("ids", "pos", "chunk_idx")}
KEYS["is2re"] = ("ids", "energy")
# fairchem's dtypes: S2EF energies and forces float16 (its predict's default), IS2RS positions
# float64 (its run-relaxations' lists of floats), IS2RE energies float64 (its relaxation path;
# its predict writes a direct model's in float16 by default: the leaderboard reads both, and we
# keep the precision). ids are strings, chunk_idx int64.
DTYPES = {
    "s2ef": {"ids": str, "energy": np.float16, "forces": np.float16, "chunk_idx": np.int64},
    "is2rs": {"ids": str, "pos": np.float64, "chunk_idx": np.int64},
    "is2re": {"ids": str, "energy": np.float64},
}


class SubmissionError(ValueError):
    """Predictions that cannot make a submission file (missing, inconsistent, duplicated)."""


def split_name(split: str) -> str:
    """OC20's name of a split in a submission file: `test_ood_ads` -> `ood_ads`."""
    name = split.removeprefix("test_").removeprefix("val_")
    if name not in OC20_SPLITS:
        raise SubmissionError(f"{split!r} is not an OC20 val or test split ({OC20_SPLITS})")
    return name


def _per_system(values: np.ndarray, chunk_idx: np.ndarray, count: int) -> list[np.ndarray]:
    """Per-atom `values` cut into `count` systems at `chunk_idx` (checked)."""
    chunk_idx = np.asarray(chunk_idx, dtype=np.int64).reshape(-1)
    if count and len(chunk_idx) != count - 1:
        raise SubmissionError(f"chunk_idx has {len(chunk_idx)} cuts for {count} systems")
    if len(chunk_idx) and (np.any(np.diff(chunk_idx) < 0) or chunk_idx[-1] > len(values)):
        raise SubmissionError("chunk_idx is not a non-decreasing list of cuts into the atoms")
    return np.split(values, chunk_idx) if count else []


def split_arrays(task: str, predictions: dict) -> dict[str, np.ndarray]:
    """One split's submission arrays (ids sorted as strings, fairchem's order) from its
    predictions npz (`graphpar.evaluate`/`graphpar.relax`)."""
    missing = [key for key in KEYS[task] if key not in predictions]
    if missing:
        raise SubmissionError(f"the {task} predictions lack {', '.join(missing)}")
    ids = np.asarray(predictions["ids"]).astype(str)
    unique, counts = np.unique(ids, return_counts=True)
    if len(unique) != len(ids):
        twice = ", ".join(unique[counts > 1][:5])
        raise SubmissionError(f"ids appear more than once: {twice}")
    order = np.argsort(ids, kind="stable")
    out = {"ids": ids[order]}
    if task in ("s2ef", "is2re"):
        energy = np.asarray(predictions["energy"]).reshape(-1)
        if len(energy) != len(ids):
            raise SubmissionError(f"{len(energy)} energies for {len(ids)} systems")
        out["energy"] = energy[order]
    if task in ("s2ef", "is2rs"):
        key = "forces" if task == "s2ef" else "pos"
        per_atom = _per_system(np.asarray(predictions[key]), predictions["chunk_idx"], len(ids))
        chunks = [per_atom[i] for i in order]
        out[key] = np.concatenate(chunks) if chunks else np.zeros((0, 3), per_atom_dtype(task))
        out["chunk_idx"] = np.cumsum([len(c) for c in chunks], dtype=np.int64)[:-1]
    return {key: value.astype(DTYPES[task].get(key, value.dtype)) for key, value in out.items()}


def per_atom_dtype(task: str) -> type:
    return DTYPES[task]["forces" if task == "s2ef" else "pos"]


def write_submission(
    task: str, predictions_dir: Path, splits: list[str], out_dir: Path
) -> dict[str, object]:
    """`<out_dir>/<task>.npz` (every split's keys) and `<task>.json` (what it holds) from
    `<predictions_dir>/<task>_<split>.npz`; returns the JSON's content."""
    if task not in TASKS:
        raise SubmissionError(f"unknown task {task!r} (known: {', '.join(TASKS)})")
    names = [split_name(split) for split in splits]
    if len(set(names)) != len(names):
        raise SubmissionError(f"splits {splits} name an OC20 split twice (val and test?)")
    arrays: dict[str, np.ndarray] = {}
    systems = {}
    for split, name in zip(splits, names, strict=True):
        path = Path(predictions_dir) / f"{task}_{split}.npz"
        if not path.is_file():
            raise SubmissionError(f"{path}: no {task} predictions for split {split}")
        with np.load(path) as predictions:
            try:
                found = split_arrays(task, dict(predictions))
            except SubmissionError as error:
                raise SubmissionError(f"{path}: {error}") from error
        arrays.update({f"{name}_{key}": value for key, value in found.items()})
        systems[name] = len(found["ids"])
    missing = [name for name in OC20_SPLITS if name not in names]
    manifest = {
        "task": task,
        "splits": dict(zip(names, splits, strict=True)),
        "n_systems": systems,
        "missing": missing,
        "complete": not missing,
        "layout": "fairchem make_submission_file.py (OC20): <split>_<key>",
    }
    write_npz(Path(out_dir) / f"{task}.npz", **arrays)
    write_json(Path(out_dir) / f"{task}.json", manifest)
    return manifest


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m graphpar.submission",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--predictions-dir", type=Path, required=True, help="a run's predictions")
    parser.add_argument("--splits", nargs="+", required=True, help="e.g. test_id test_ood_ads")
    parser.add_argument("--tasks", nargs="+", choices=TASKS, required=True)
    parser.add_argument("--out-dir", type=Path, required=True, help="<task>.npz and <task>.json")
    args = parser.parse_args(argv)
    try:
        for task in args.tasks:
            manifest = write_submission(task, args.predictions_dir, args.splits, args.out_dir)
            state = "complete" if manifest["complete"] else f"missing {manifest['missing']}"
            print(f"{task}: {manifest['n_systems']} ({state})")
    except SubmissionError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
