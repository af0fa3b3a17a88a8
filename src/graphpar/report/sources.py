"""Find and read the files the report is drawn from; nothing here needs a checkpoint or data.

Layout (relative to a results folder, usually `results/`):

- `<experiment>/metrics/<run>/<task>_<split>.json`: metrics of one (run, task, split), task in
  s2ef | is2rs | is2re; fractions in [0, 1], energies in eV, forces in eV/A; null = not computable.
- `<experiment>/metrics/<run>/training.jsonl`: the run's learning curve (older results keep it
  only as `<experiment>/checkpoints/<run>/metrics.jsonl`, read when the first is missing).
- `<experiment>/predictions/<run>/<task>_<split>.npz`: per-system predictions.
- `<experiment>/scaling/<run>.json`: a scaling-study measurement (samples/s, memory per GPU).
- `benchmarks/*.json`: the committed CPU benchmarks, and the committed predictions of the
  scaling and memory models (`scaling_model.json`, `memory_model.json`, bench/scaling_model.py).
- `paper/`: the published numbers (tables.json, tableN.csv, models.csv).

Every experiment found is reported, so a colleague's imported results appear beside ours.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pandas as pd

from graphpar.io import read_json

TASKS = ("s2ef", "is2rs", "is2re")
# Paper order of the four OC20 subsplits; our split names are val_<key> or test_<key>.
SPLIT_LABELS = {"id": "ID", "ood_ads": "OOD Ads", "ood_cat": "OOD Cat", "ood_both": "OOD Both"}
METRIC_KEYS = {
    "s2ef": ("energy_mae", "forces_mae", "forces_cos", "efwt"),
    "is2rs": ("afbt", "adwt", "fbt"),
    "is2re": ("energy_mae", "ewt"),
}


# IS2RE metrics come from a force model's relaxation (the energy of its ML-relaxed structure,
# graphpar.relax) or from an energy-only model's direct prediction (graphpar.evaluate is2re);
# the files say which in `method` (files written before it was recorded: relaxations).
IS2RE_METHODS = ("relaxation", "direct")


def is2re_method(metrics: dict, path: Path) -> str:
    method = metrics.get("method", "relaxation")
    if method not in IS2RE_METHODS:
        raise ValueError(
            f"{path}: method {method!r} is not an IS2RE method ({', '.join(IS2RE_METHODS)})"
        )
    return method


def split_group(split: str) -> tuple[str, str]:
    """(split group, split label): `val_ood_ads` -> ("val", "OOD Ads"); a split outside OC20's
    naming keeps its name as its label."""
    group, _, key = split.partition("_")
    if group in ("val", "test") and key in SPLIT_LABELS:
        return group, SPLIT_LABELS[key]
    return group, split


def metrics_files(results: Path, task: str) -> list[Path]:
    """Every metrics JSON of `task` under `results`, all experiments and runs, sorted."""
    return sorted(Path(results).glob(f"*/metrics/*/{task}_*.json"))


def _dataset_name(provenance: dict) -> str:
    """`resources/<dataset>/lmdb/...` -> `<dataset>` (the evaluated dataset)."""
    parts = Path(provenance.get("dataset") or "").parts
    return parts[1] if len(parts) > 1 and parts[0] == "resources" else "?"


def read_metrics(results: Path, task: str) -> pd.DataFrame:
    """One row per metrics file of `task`: experiment, run, split, split_group (val/test),
    split_label, model (registered config), parameters (the evaluated network's, recorded in
    the provenance; for older files the registered config's), dataset, method (IS2RE:
    relaxation or direct; None for the other tasks), the task's metrics (None where null),
    n_systems, path. NaN or Infinity in a file is an error naming it
    (`graphpar.io.read_json`)."""
    rows = []
    for path in metrics_files(results, task):
        metrics = read_json(path)
        group, label = split_group(metrics["split"])
        provenance = metrics.get("provenance", {})
        rows.append(
            {
                "experiment": path.parents[2].name,
                "run": path.parent.name,
                "split": metrics["split"],
                "split_group": group,
                "split_label": label,
                "model": provenance.get("model", "?"),
                "parameters": provenance.get("parameters")
                or parameter_count(provenance.get("model", "?")),
                "dataset": _dataset_name(provenance),
                "method": is2re_method(metrics, path) if task == "is2re" else None,
                **{key: metrics.get(key) for key in METRIC_KEYS[task]},
                "n_systems": metrics.get("n_systems"),
                "path": str(path),
            }
        )
    columns = ["experiment", "run", "split", "split_group", "split_label", "model"]
    columns += ["parameters", "dataset", "method", *METRIC_KEYS[task], "n_systems", "path"]
    return pd.DataFrame(rows, columns=columns)


def publication(metrics: dict) -> dict | None:
    """What a metrics file of a converted published checkpoint records of its publication
    (name, url, published numbers: graphpar.convert --published), None for a trained run."""
    source = (metrics.get("provenance") or {}).get("source") or {}
    return source.get("publication")


def curve_files(results: Path) -> list[Path]:
    """The learning curve of every run: metrics/<run>/training.jsonl, else the checkpoint
    folder's metrics.jsonl (results from before the train rule copied it)."""
    results = Path(results)
    found = {
        (p.parents[2].name, p.parent.name): p for p in results.glob("*/metrics/*/training.jsonl")
    }
    for path in results.glob("*/checkpoints/*/metrics.jsonl"):
        found.setdefault((path.parents[2].name, path.parent.name), path)
    return [found[key] for key in sorted(found)]


def read_curves(results: Path) -> pd.DataFrame:
    """All learning curves, one row per logged line: experiment, run, split (train | val), step,
    loss, lr, samples_per_s, energy_mae (eV), forces_mae (eV/A), path."""
    columns = ["experiment", "run", "split", "step", "loss", "lr", "samples_per_s"]
    columns += ["energy_mae", "forces_mae", "path"]
    rows = []
    for path in curve_files(results):
        for line in path.read_text().splitlines():
            if line.strip():
                record = json.loads(line)
                rows.append(
                    {
                        "experiment": path.parents[2].name,
                        "run": path.parent.name,
                        **{key: record.get(key) for key in columns[2:-1]},
                        "path": str(path),
                    }
                )
    return pd.DataFrame(rows, columns=columns)


def prediction_files(results: Path, task: str) -> list[Path]:
    """Every predictions npz of `task` (`<experiment>/predictions/<run>/<task>_<split>.npz`)."""
    return sorted(Path(results).glob(f"*/predictions/*/{task}_*.npz"))


def scaling_files(results: Path) -> list[Path]:
    """Scaling-study measurements (`<experiment>/scaling/<run>.json`), when any were run."""
    return sorted(Path(results).glob("*/scaling/*.json"))


def benchmark_dir(results: Path, fallback: Path | None = None) -> Path:
    """`results/benchmarks`, or `fallback` (the checkout's committed files) when it has none."""
    local = Path(results) / "benchmarks"
    if fallback is not None and not any(local.glob("*.json")):
        return Path(fallback)
    return local


def committed_benchmarks() -> Path:
    """The checkout's committed `results/benchmarks` (this file is src/graphpar/report/)."""
    return Path(__file__).resolve().parents[3] / "results" / "benchmarks"


def model_prediction(benchmarks: Path, name: str) -> dict | None:
    """A committed model prediction, `<benchmarks>/<name>.json` (scaling_model,
    memory_model), or None when there is none."""
    path = Path(benchmarks) / f"{name}.json"
    return read_json(path) if path.is_file() else None


# ---- the published numbers --------------------------------------------------------------------


def paper_meta(paper: Path) -> dict:
    """tables.json: per table its title, task, layout (average | split), columns and notes."""
    return read_json(Path(paper) / "tables.json")["tables"]


def paper_table(paper: Path, table: str) -> pd.DataFrame:
    """A published table as printed: every cell a string (percentages without the % sign)."""
    return pd.read_csv(Path(paper) / f"{table}.csv", dtype=str, keep_default_na=False)


def paper_models(paper: Path) -> pd.DataFrame:
    """models.csv: model_id, our config of the same architecture, parameters, training cost."""
    return pd.read_csv(Path(paper) / "models.csv", dtype=str, keep_default_na=False)


@functools.cache
def parameter_count(config: str) -> int | None:
    """Parameters of a registered model configuration (counted on the meta device), or None
    for a name the registry does not know (e.g. a colleague's own model)."""
    from graphpar.models import MODELS, count_parameters

    return count_parameters(config) if config in MODELS else None


def parse_count(printed: str) -> float | None:
    """'34.8M' -> 34.8e6, '1.2k' -> 1200.0, '' -> None."""
    if not printed:
        return None
    scale = {"k": 1e3, "M": 1e6, "B": 1e9}.get(printed[-1], 1.0)
    return float(printed[:-1] if scale != 1.0 else printed) * scale


def format_count(count: int | None) -> str:
    """Parameters as the paper prints them: 31.0M -> '31.0M', 56198 -> '56.2k'."""
    if count is None:
        return "n/a"
    for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if count >= scale:
            return f"{count / scale:.1f}{suffix}"
    return str(count)
