"""The report's figures (matplotlib, Agg): PNG + PDF, and beside them the CSV of what is plotted.

- `learning_curves`: training loss and validation force MAE (eV/A) against the step, every run.
- `parity`: predicted against DFT energy (eV) and force components (eV/A), per run and split
  (needs `energy_target`/`forces_target` in the S2EF predictions npz; NaN targets are skipped).
- `threshold_curves`: DwT(t) against the distance threshold (A) and FbT(t) against the force
  threshold (eV/A), per run and split (needs per-system `distance` and `oracle_max_force` in
  the IS2RS predictions npz; NaN, i.e. no label or no oracle, is skipped).
- `gp_scaling`: the paper's Fig. 2 for what this machine can run: per-rank memory (MB),
  throughput (samples/s) and, from the scaling study, TFLOP/s per GPU against the
  graph-parallel size G, from the scaling study's files (`results/*/scaling/*.json`) when
  present, else from the committed CPU benchmarks (labelled: ranks share cores).
- `gp_learning_curves`: the training loss of one run at G = 1, 2, 4 graph-parallel ranks
  (float64) and each step's relative difference from G = 1: the curves coincide; the differences
  start at float64 rounding and grow as between any two float64 trajectories
  (bench/gp_learning_curves.py).
- `mae_vs_params`: force MAE (eV/A), ADwT and AFbT (%) against parameter count: our runs in one
  column (the size ladder, config/experiments/size-ladder.yaml: each seed a dot, a line through
  the means), the paper's Tables 1 and 2 in the other.
- `scaling_model`: Fig. 2a predicted: weak-scaling efficiency against GPUs (graph parallel
  1-8, graph x 32-way data parallel 32-256, data parallel 1-32) for each hardware preset, and
  the V100 variants, with the paper's three published points
  (`results/benchmarks/scaling_model.json`, bench/scaling_model.py; `graphpar.scaling_model`).
- `memory_model`: Table 4 predicted: per-rank memory (GB) against G per model with the 32 GB
  V100's usable memory, and the model's validation against the measured 1000-atom slab
  (`results/benchmarks/memory_model.json`).

A figure whose data is absent still gets drawn (with a note saying what is missing) and an empty
CSV with the header, so every target exists and regenerates the same way.
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display (must precede pyplot)
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from graphpar.io import atomic_path, read_json  # noqa: E402
from graphpar.report import FIGURES, sources  # noqa: E402

# At most this many points per (run, split, quantity) in a parity plot and its CSV: OC20's val
# splits hold ~1M frames (~10^8 force components); a fixed-seed sample keeps files small.
PARITY_POINTS = 5000
CPU_LABEL = "this machine (2 CPU cores), ranks share cores: memory, not speed"
QUANTITY_LABELS = {
    "max_activation_mb": "activation memory, max over ranks (bench/gp_memory.py)",
    "peak_memory_mb_per_rank_max": "peak memory, max over ranks (bench/train_throughput.py)",
    "samples_per_s_median": "samples/s, median (bench/train_throughput.py)",
    "peak_memory_mb_per_gpu": "peak memory per GPU",
    "samples_per_s": "samples/s",
    "tflops_per_gpu": "TFLOP/s per GPU",
}
STYLE = {
    "font.size": 9,
    "axes.titlesize": 9,
    "axes.labelsize": 9,
    "legend.fontsize": 7,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "savefig.dpi": 150,
    "savefig.bbox": "tight",
}


def _note(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", wrap=True, transform=ax.transAxes)
    ax.set_xticks([])
    ax.set_yticks([])


def _save(fig, data: pd.DataFrame, out_dir: Path, name: str) -> dict[str, Path]:
    """`name`.png, .pdf and .csv into `out_dir`, each written atomically."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {ext: out_dir / f"{name}.{ext}" for ext in ("png", "pdf", "csv")}
    with atomic_path(paths["png"]) as tmp:
        fig.savefig(tmp, format="png")
    with atomic_path(paths["pdf"]) as tmp:
        fig.savefig(tmp, format="pdf", metadata={"CreationDate": None})
    with atomic_path(paths["csv"]) as tmp:
        data.to_csv(tmp, index=False)
    plt.close(fig)
    return paths


def _run_label(experiment: str, run: str) -> str:
    return f"{experiment}/{run}"


# ---- learning curves ------------------------------------------------------------------------


def learning_curves(results: Path, paper: Path, benchmarks: Path) -> tuple:
    data = sources.read_curves(results)
    fig, (loss_ax, mae_ax) = plt.subplots(1, 2, figsize=(9, 3.5))
    if data.empty:
        _note(loss_ax, "no learning curves found (results/*/metrics/*/training.jsonl)")
        _note(mae_ax, "")
        return fig, data
    for (experiment, run), curve in data.groupby(["experiment", "run"], sort=True):
        label = _run_label(experiment, run)
        train = curve[curve["split"] == "train"]
        loss_ax.plot(train["step"], train["loss"], label=label, linewidth=1)
        val = curve[(curve["split"] == "val") & curve["forces_mae"].notna()]
        mae_ax.plot(val["step"], val["forces_mae"], marker="o", markersize=3, label=label)
    loss_ax.set(xlabel="step", ylabel="training loss (normalised units)", yscale="log")
    loss_ax.set_title("training loss")
    mae_ax.set(xlabel="step", ylabel="validation force MAE (eV/Å)")
    mae_ax.set_title("validation force MAE")
    loss_ax.legend()
    mae_ax.legend()
    return fig, data


# ---- parity ---------------------------------------------------------------------------------


def _parity_data(results: Path) -> pd.DataFrame:
    """Predicted and DFT values (a fixed-seed sample of at most PARITY_POINTS per quantity),
    with their index into the npz arrays (forces flattened over atoms and components)."""
    frames = []
    for path in sources.prediction_files(results, "s2ef"):
        with np.load(path) as npz:
            if "energy_target" not in npz or "forces_target" not in npz:
                continue
            arrays = {
                "energy": (npz["energy"], npz["energy_target"]),
                "force": (npz["forces"].reshape(-1), npz["forces_target"].reshape(-1)),
            }
        for quantity, (predicted, target) in arrays.items():
            index = np.flatnonzero(np.isfinite(target.astype(np.float64)))  # NaN: no label
            if len(index) > PARITY_POINTS:
                index = np.sort(np.random.default_rng(0).choice(index, PARITY_POINTS, False))
            frames.append(
                pd.DataFrame(
                    {
                        "experiment": path.parents[2].name,
                        "run": path.parent.name,
                        "split": path.stem.removeprefix("s2ef_"),
                        "quantity": quantity,
                        "index": index,
                        "predicted": predicted[index].astype(np.float64),
                        "target": target[index].astype(np.float64),
                    }
                )
            )
    columns = ["experiment", "run", "split", "quantity", "index", "predicted", "target"]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=columns)


def parity(results: Path, paper: Path, benchmarks: Path) -> tuple:
    data = _parity_data(results)
    runs = sorted(data.groupby(["experiment", "run"]).groups) if not data.empty else []
    fig, axes = plt.subplots(max(len(runs), 1), 2, figsize=(8, 3.6 * max(len(runs), 1)))
    axes = np.atleast_2d(axes)
    if not runs:
        _note(axes[0, 0], "no S2EF predictions with DFT targets (energy_target, forces_target)")
        _note(axes[0, 1], "")
        return fig, data
    units = {"energy": "eV", "force": "eV/Å"}
    for row, (experiment, run) in enumerate(runs):
        for col, quantity in enumerate(("energy", "force")):
            ax = axes[row, col]
            chosen = data[
                (data["experiment"] == experiment)
                & (data["run"] == run)
                & (data["quantity"] == quantity)
            ]
            for split, points in chosen.groupby("split", sort=True):
                ax.scatter(points["target"], points["predicted"], s=4, alpha=0.5, label=split)
            low = min(chosen["target"].min(), chosen["predicted"].min())
            high = max(chosen["target"].max(), chosen["predicted"].max())
            ax.plot([low, high], [low, high], color="black", linewidth=0.8, label="y = x")
            unit = units[quantity]
            ax.set(xlabel=f"reference {quantity} ({unit})", ylabel=f"predicted {quantity} ({unit})")
            ax.set_title(f"{_run_label(experiment, run)}: {quantity}")
            ax.legend()
    return fig, data


# ---- DwT / FbT threshold curves ---------------------------------------------------------------


def _threshold_data(results: Path) -> pd.DataFrame:
    from graphpar.metrics import dwt_curve, fbt_curve

    frames = []
    for path in sources.prediction_files(results, "is2rs"):
        with np.load(path) as npz:
            per_system = {key: npz[key] for key in ("distance", "oracle_max_force") if key in npz}
        for key, (curve, function) in {
            "distance": ("DwT", dwt_curve),
            "oracle_max_force": ("FbT", fbt_curve),
        }.items():
            values = per_system.get(key, np.zeros(0)).astype(np.float64)
            values = values[np.isfinite(values)]  # NaN: no relaxed label or no oracle
            if values.size == 0:
                continue
            thresholds, fractions = function(values)
            frames.append(
                pd.DataFrame(
                    {
                        "experiment": path.parents[2].name,
                        "run": path.parent.name,
                        "split": path.stem.removeprefix("is2rs_"),
                        "curve": curve,
                        "threshold": thresholds,
                        "fraction": fractions,
                    }
                )
            )
    columns = ["experiment", "run", "split", "curve", "threshold", "fraction"]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=columns)


def threshold_curves(results: Path, paper: Path, benchmarks: Path) -> tuple:
    data = _threshold_data(results)
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    titles = {
        "DwT": ("distance threshold t (Å)", "DwT(t): systems within t (%)"),
        "FbT": ("force threshold t (eV/Å)", "FbT(t): oracle max force < t (%)"),
    }
    for ax, (curve, (xlabel, ylabel)) in zip(axes, titles.items(), strict=True):
        chosen = data[data["curve"] == curve]
        if chosen.empty:
            key = "distance" if curve == "DwT" else "oracle_max_force"
            _note(ax, f"no IS2RS predictions with per-system '{key}'")
            continue
        for (experiment, run, split), line in chosen.groupby(["experiment", "run", "split"]):
            ax.plot(
                line["threshold"],
                100 * line["fraction"],
                label=f"{_run_label(experiment, run)} {split}",
            )
        ax.set(xlabel=xlabel, ylabel=ylabel, ylim=(0, 100))
        ax.set_title(f"{curve}(t); its mean over t is A{curve}")
        ax.legend()
    return fig, data


# ---- Fig. 2: memory and throughput per rank against G ----------------------------------------


def _scaling_data(results: Path, benchmarks: Path) -> tuple[pd.DataFrame, str]:
    """Long table (source, model, G, D, device, quantity, value, unit) and a label for the
    figure. The scaling study's files win; without them the committed CPU benchmarks are used."""
    columns = ["source", "model", "G", "D", "device", "quantity", "value", "unit"]
    rows = []
    files = sources.scaling_files(results)
    if files:
        for path in files:
            record = read_json(path)
            for quantity, unit in (
                ("peak_memory_mb_per_gpu", "MB"),
                ("samples_per_s", "samples/s"),
                ("tflops_per_gpu", "TFLOP/s"),
            ):
                if record.get(quantity) is not None:
                    rows.append(
                        {
                            "source": str(path),
                            "model": record["model"],
                            "G": record["gp_size"],
                            "D": record.get("dp_size", 1),
                            "device": record.get("device", "?"),
                            "quantity": quantity,
                            "value": record[quantity],
                            "unit": unit,
                        }
                    )
        devices = sorted({row["device"] for row in rows})
        return pd.DataFrame(rows, columns=columns), f"scaling study on {', '.join(devices)}"
    memory = benchmarks / "gp_memory.json"
    if memory.is_file():
        for model, run in json.loads(memory.read_text())["runs"].items():
            for size, result in run["G"].items():
                rows.append(
                    {
                        "source": str(memory),
                        "model": model,
                        "G": int(size),
                        "D": 1,
                        "device": "cpu",
                        "quantity": "max_activation_mb",
                        "value": result["max_activation_mb"],
                        "unit": "MB",
                    }
                )
    throughput = benchmarks / "train_throughput.json"
    if throughput.is_file():
        for model, by_size in json.loads(throughput.read_text())["results"].items():
            for size, result in by_size.items():
                for quantity, unit in (
                    ("peak_memory_mb_per_rank_max", "MB"),
                    ("samples_per_s_median", "samples/s"),
                ):
                    rows.append(
                        {
                            "source": str(throughput),
                            "model": model,
                            "G": int(size.removeprefix("G=")),
                            "D": 1,
                            "device": "cpu",
                            "quantity": quantity,
                            "value": result[quantity],
                            "unit": unit,
                        }
                    )
    return pd.DataFrame(rows, columns=columns), CPU_LABEL


def gp_scaling(results: Path, paper: Path, benchmarks: Path) -> tuple:
    data, label = _scaling_data(results, benchmarks)
    panels = [("MB", "memory per rank (MB)"), ("samples/s", "throughput (samples/s)")]
    if (data["unit"] == "TFLOP/s").any():  # the scaling study also measures FLOPs (Fig. 2b)
        panels.append(("TFLOP/s", "TFLOP/s per GPU"))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.6))
    fig.suptitle(f"Fig. 2 analogue: {label}")
    for ax, (unit, ylabel) in zip(axes, panels, strict=True):
        chosen = data[data["unit"] == unit]
        if chosen.empty:
            _note(ax, "no scaling or benchmark files found")
            continue
        for (model, dp, quantity), line in chosen.groupby(["model", "D", "quantity"], sort=True):
            line = line.sort_values("G")
            name = model if dp == 1 else f"{model}, D = {dp}"
            label = f"{name}: {QUANTITY_LABELS.get(quantity, quantity)}"
            ax.plot(line["G"], line["value"], marker="o", label=label)
        sizes = sorted(chosen["G"].unique())
        ax.set(xlabel="graph-parallel size G (ranks per graph)", ylabel=ylabel, xscale="log")
        ax.set_xticks(sizes, [str(size) for size in sizes])
        ax.minorticks_off()
        ax.legend()
    return fig, data


# ---- the same run at G = 1, 2, 4 -------------------------------------------------------------

GP_CURVES = "gp_learning_curves.json"


def _gp_curve_data(benchmarks: Path) -> pd.DataFrame:
    """Long table (model, G, step, loss, relative_difference from G = 1)."""
    columns = ["model", "G", "step", "loss", "relative_difference"]
    path = benchmarks / GP_CURVES
    if not path.is_file():
        return pd.DataFrame(columns=columns)
    rows = []
    for model, by_size in read_json(path)["runs"].items():
        reference = np.asarray(by_size["G=1"]["loss"])
        for size, run in by_size.items():
            loss = np.asarray(run["loss"])
            relative = np.abs(loss - reference) / np.abs(reference)
            for step, value, difference in zip(run["step"], loss, relative, strict=True):
                rows.append(
                    {
                        "model": model,
                        "G": int(size.removeprefix("G=")),
                        "step": step,
                        "loss": value,
                        "relative_difference": difference,
                    }
                )
    return pd.DataFrame(rows, columns=columns)


def gp_learning_curves(results: Path, paper: Path, benchmarks: Path) -> tuple:
    data = _gp_curve_data(benchmarks)
    models = sorted(data["model"].unique())
    fig, axes = plt.subplots(1, len(models) + 1, figsize=(4 * (len(models) + 1), 3.4))
    if data.empty:
        for ax in axes:
            _note(ax, f"no {GP_CURVES} (python bench/gp_learning_curves.py)")
        return fig, data
    fig.suptitle("one training run at G = 1, 2, 4 graph-parallel ranks (float64)")
    styles = {1: dict(linewidth=3, alpha=0.35), 2: dict(linestyle="--"), 4: dict(linestyle=":")}
    for ax, model in zip(axes, models, strict=False):
        for size, line in data[data["model"] == model].groupby("G", sort=True):
            ax.plot(line["step"], line["loss"], label=f"G = {size}", **styles.get(size, {}))
        ax.set(xlabel="step", ylabel="training loss (normalised units)", yscale="log")
        ax.set_title(model)
        ax.legend()
    spread = axes[-1]
    for (model, size), line in data[data["G"] != 1].groupby(["model", "G"], sort=True):
        spread.plot(
            line["step"],
            line["relative_difference"].clip(lower=1e-18),
            label=f"{model}, G = {size}",
        )
    spread.set(xlabel="step", ylabel="|loss(G) - loss(1)| / loss(1)", yscale="log")
    spread.set_title("difference from G = 1: rounding, growing (0 drawn at 1e-18)")
    spread.legend()
    return fig, data


# ---- force MAE against parameters ------------------------------------------------------------


# The metrics of the size figure: (task, metric key, axis label); percentages for IS2RS.
SIZE_METRICS = (
    ("s2ef", "forces_mae", "force MAE (eV/Å)"),
    ("is2rs", "adwt", "ADwT (%)"),
    ("is2rs", "afbt", "AFbT (%)"),
)


METRIC_NAMES = {"forces_mae": "force MAE", "adwt": "ADwT", "afbt": "AFbT"}


def _family(model: str) -> str:
    from graphpar.model_configs import CONFIGURATIONS

    return CONFIGURATIONS[model][0] if model in CONFIGURATIONS else model


def _our_sizes(results: Path) -> list[dict]:
    """One row per (run, split, metric): in and out of distribution apart, as they differ."""
    rows = []
    for task, key, _ in SIZE_METRICS:
        metrics = sources.read_metrics(results, task)
        for row in metrics.itertuples():
            value = getattr(row, key)
            if pd.isna(row.parameters) or pd.isna(value):
                continue
            rows.append(
                {
                    "panel": "ours",
                    "source": f"ours ({row.split})",
                    "experiment": row.experiment,
                    "family": _family(row.model),
                    "label": f"{_run_label(row.experiment, row.run)} ({row.model})",
                    "parameters": float(row.parameters),
                    "metric": key,
                    "value": float(value) * (100 if task == "is2rs" else 1),
                }
            )
    return rows


def _paper_sizes(paper: Path) -> list[dict]:
    rows = []
    for table, task in (("table1", "s2ef"), ("table2", "is2rs")):
        for printed in sources.paper_table(paper, table).itertuples():
            for metric_task, key, _ in SIZE_METRICS:
                if metric_task != task or not getattr(printed, key):
                    continue
                rows.append(
                    {
                        "panel": "paper",
                        "source": f"paper {table.replace('table', 'Table ')} (test)",
                        "experiment": "paper",
                        "family": printed.model_id,
                        "label": printed.model_id,
                        "parameters": sources.parse_count(printed.params),
                        "metric": key,
                        "value": float(getattr(printed, key)),
                    }
                )
    return rows


def mae_vs_params(results: Path, paper: Path, benchmarks: Path) -> tuple:
    """Force MAE, ADwT and AFbT against parameters: our runs in the left column (each run a
    dot; a line through the mean over runs of equal size, e.g. the size ladder's seeds, per
    experiment, model family and split; AFbT only for series where it is not zero), the
    paper's Tables 1 and 2 in the right column. Apart because they share no data: ours trained
    on EMT data in minutes, the paper's on OC20's DFT for GPU-months."""
    columns = ["panel", "source", "experiment", "family", "label", "parameters", "metric"]
    data = pd.DataFrame(_our_sizes(results) + _paper_sizes(paper), columns=[*columns, "value"])
    ours = data[data["panel"] == "ours"]
    afbt_is_zero = not (ours[ours["metric"] == "afbt"]["value"] > 0).any()
    fig, axes = plt.subplots(2, 2, figsize=(10, 7), squeeze=False)
    for column, panel in enumerate(("ours", "paper")):
        points = data[data["panel"] == panel]
        top, bottom = axes[0][column], axes[1][column]
        for ax, keys in ((top, ("forces_mae",)), (bottom, ("adwt", "afbt"))):
            keys = [k for k in keys if not (panel == "ours" and k == "afbt" and afbt_is_zero)]
            shown = points[points["metric"].isin(keys)]
            if shown.empty:
                _note(ax, f"no {' or '.join(keys)} of {panel} runs yet")
                continue
            if panel == "ours":
                _size_lines(ax, shown)
            else:
                _size_points(ax, shown)
            ax.set(xlabel="parameters", xscale="log")
            ax.set_ylabel(" / ".join(label for _, k, label in SIZE_METRICS if k in keys))
            ax.legend(fontsize=6)
    axes[0][0].set_title("ours: EMT-labelled embedded data, CPU minutes (per split)")
    axes[0][1].set_title("the paper: OC20 DFT, GPU-days (Tables 1 and 2, test)")
    if afbt_is_zero and not ours.empty:
        axes[1][0].set_title("AFbT is 0 for every run of ours: not drawn")
    fig.suptitle("accuracy against model size")
    return fig, data


def _size_lines(ax, points: pd.DataFrame) -> None:
    """Each run a dot; per series a line through the mean of the runs of each size."""
    series = ["experiment", "family", "source", "metric"]
    for (experiment, family, source, metric), line in points.groupby(series, sort=True):
        if metric == "afbt" and not (line["value"] > 0).any():
            continue  # AFbT 0 everywhere: nothing to see, only where it is not zero
        mean = line.groupby("parameters", sort=True)["value"].mean()
        split = source.removeprefix("ours (").removesuffix(")")
        style = "--" if metric == "afbt" else "-"
        label = f"{experiment}: {family}, {split}" + (
            f" ({METRIC_NAMES[metric]})" if metric != "forces_mae" else ""
        )
        drawn = ax.plot(mean.index, mean.values, style, marker="o", label=label)
        ax.scatter(line["parameters"], line["value"], color=drawn[0].get_color(), alpha=0.4, s=12)


def _size_points(ax, points: pd.DataFrame) -> None:
    for metric, shown in points.groupby("metric", sort=True):
        marker = {"forces_mae": "s", "adwt": "s", "afbt": "D"}[metric]
        ax.scatter(shown["parameters"], shown["value"], marker=marker, label=METRIC_NAMES[metric])
        for point in shown.itertuples():
            ax.annotate(point.label, (point.parameters, point.value), fontsize=6)


# ---- Fig. 2a and Table 4 predicted (graphpar.scaling_model) ---------------------------------

SERIES_LABELS = {
    "gp": "graph parallel (G = 1-8, D = 1)",
    "gp_dp": "graph x 32-way data parallel",
    "dp": "data parallel (125M, G = 1)",
}
SERIES_MARKERS = {"gp": "o", "gp_dp": "s", "dp": "^"}
HEADLINE = ("v100-dgx1", "headline")


def _scaling_model_data(benchmarks: Path) -> pd.DataFrame:
    """Long table: preset, variant, series, model, G, D, gpus, efficiency, step_seconds."""
    columns = ["preset", "variant", "series", "model", "G", "D", "gpus", "efficiency"]
    columns += ["step_seconds"]
    record = sources.model_prediction(benchmarks, "scaling_model")
    rows = []
    for preset, variants in (record or {}).get("points", {}).items():
        for variant, points in variants.items():
            for point in points:
                rows.append(
                    {
                        "preset": preset,
                        "variant": variant,
                        "series": point["series"],
                        "model": point["model"],
                        "G": point["gp_size"],
                        "D": point["dp_size"],
                        "gpus": point["gpus"],
                        "efficiency": point["efficiency"],
                        "step_seconds": point["step_seconds"],
                    }
                )
    return pd.DataFrame(rows, columns=columns)


def _paper_points(record: dict) -> list[tuple[str, int, float]]:
    return [
        (key.split("@")[0], int(key.split("@")[1]), value)
        for key, value in record["settings"]["paper_points"].items()
    ]


def scaling_model(results: Path, paper: Path, benchmarks: Path) -> tuple:
    data = _scaling_model_data(benchmarks)
    fig, (presets_ax, variants_ax) = plt.subplots(1, 2, figsize=(10, 4))
    if data.empty:
        _note(presets_ax, "no scaling_model.json (python bench/scaling_model.py)")
        _note(variants_ax, "")
        return fig, data
    record = sources.model_prediction(benchmarks, "scaling_model")
    fig.suptitle("Fig. 2a predicted from shapes (graphpar.scaling_model); black: the paper")
    panels = (
        (presets_ax, data[data["variant"] == "headline"], "preset", "hardware presets"),
        (variants_ax, data[data["preset"] == HEADLINE[0]], "variant", f"{HEADLINE[0]} variants"),
    )
    for ax, chosen, key, title in panels:
        for index, (name, group) in enumerate(chosen.groupby(key, sort=False)):
            color = f"C{index}"
            bold = name in HEADLINE
            for series, line in group.groupby("series", sort=False):
                line = line.sort_values("gpus")
                ax.plot(
                    line["gpus"],
                    100 * line["efficiency"],
                    marker=SERIES_MARKERS[series],
                    color=color,
                    linewidth=2 if bold else 1,
                    alpha=1 if bold else 0.6,
                    markersize=4,
                    label=f"{name}: {SERIES_LABELS[series]}",
                )
        for series, gpus, value in _paper_points(record):
            ax.scatter(
                [gpus], [100 * value], color="black", marker=SERIES_MARKERS[series], s=60,
                zorder=5, label=f"paper: {SERIES_LABELS[series]}, {gpus} GPUs",
            )  # fmt: skip
        ticks = [1, 2, 4, 8, 16, 32, 64, 128, 256]
        ax.set(xlabel="GPUs", ylabel="weak-scaling efficiency (%)", xscale="log", ylim=(0, 120))
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.minorticks_off()
        ax.axhline(100, color="grey", linewidth=0.5)
        ax.set_title(title)
        ax.legend(fontsize=5, ncol=2)
    return fig, data


def _memory_model_data(benchmarks: Path) -> pd.DataFrame:
    """Long table: kind (table4 | validation), model, shape, G, component, GB."""
    columns = ["kind", "model", "shape", "G", "quantity", "GB"]
    record = sources.model_prediction(benchmarks, "memory_model")
    rows = []
    for model, entry in (record or {}).get("table4", {}).items():
        for shape in ("typical", "large"):
            for size, parts in entry[shape]["per_rank_bytes"].items():
                for quantity, value in parts.items():
                    rows.append(
                        {"kind": "table4", "model": model, "shape": shape, "G": int(size),
                         "quantity": quantity, "GB": value / 1e9}
                    )  # fmt: skip
    for name, entry in (record or {}).get("validation", {}).items():
        for row in entry["rows"]:
            for quantity in ("predicted_mb", "measured_mb"):
                rows.append(
                    {"kind": "validation", "model": f"{name} ({entry['config']})",
                     "shape": "1000-atom slab", "G": row["G"],
                     "quantity": quantity.removesuffix("_mb"), "GB": row[quantity] * 2**20 / 1e9}
                )  # fmt: skip
    return pd.DataFrame(rows, columns=columns)


def memory_model(results: Path, paper: Path, benchmarks: Path) -> tuple:
    data = _memory_model_data(benchmarks)
    fig, (table_ax, check_ax) = plt.subplots(1, 2, figsize=(10, 4))
    if data.empty:
        _note(table_ax, "no memory_model.json (python bench/scaling_model.py)")
        _note(check_ax, "")
        return fig, data
    record = sources.model_prediction(benchmarks, "memory_model")
    fig.suptitle("Table 4 memory predicted (graphpar.scaling_model)")
    totals = data[(data["kind"] == "table4") & (data["quantity"] == "total")]
    for index, (model, group) in enumerate(totals.groupby("model", sort=False)):
        color = f"C{index}"
        for shape, style in (("typical", "-"), ("large", ":")):
            line = group[group["shape"] == shape].sort_values("G")
            ax_label = f"{model} ({shape} batch)" if shape == "typical" else None
            table_ax.plot(line["G"], line["GB"], style, marker="o", color=color, label=ax_label)
        paper_g = record["table4"][model]["paper_G"]
        at_paper = group[(group["shape"] == "typical") & (group["G"] == paper_g)]
        table_ax.scatter(at_paper["G"], at_paper["GB"], marker="*", s=150, color=color, zorder=5)
    settings = record["settings"]
    table_ax.axhline(settings["capacity_bytes"] / 1e9, color="black", label="V100 32 GiB")
    table_ax.axhline(
        settings["usable_bytes"] / 1e9, color="black", linestyle="--",
        label="usable (less context, fragmentation)",
    )  # fmt: skip
    sizes = sorted(totals["G"].unique())
    table_ax.set(xlabel="graph-parallel size G", ylabel="memory per rank (GB)", xscale="log")
    table_ax.set_xticks(sizes, [str(size) for size in sizes])
    table_ax.minorticks_off()
    table_ax.set_title("per-rank memory; star: the paper's G (Table 4); dotted: large batch")
    table_ax.legend(fontsize=6)
    checks = data[data["kind"] == "validation"]
    for index, (model, group) in enumerate(checks.groupby("model", sort=False)):
        for quantity, style in (("measured", "-"), ("predicted", "--")):
            line = group[group["quantity"] == quantity].sort_values("G")
            check_ax.plot(
                line["G"], line["GB"], style, marker="o", color=f"C{index}",
                label=f"{model}: {quantity}",
            )  # fmt: skip
    check_ax.set(xlabel="graph-parallel size G", ylabel="activation memory per rank (GB)")
    check_ax.set_xticks([1, 2, 4])
    check_ax.set_title("validation: 1000-atom slab (bench/gp_memory.py), not fitted")
    check_ax.legend(fontsize=6)
    return fig, data


def write_figure(
    name: str, results: Path, paper: Path, benchmarks: Path, out_dir: Path
) -> dict[str, Path]:
    """Draw figure `name` and write `<name>.png`, `.pdf` and `.csv` into `out_dir`."""
    if name not in FIGURES:
        raise ValueError(f"unknown figure {name!r}; known: {', '.join(FIGURES)}")
    with plt.rc_context(STYLE):
        fig, data = globals()[name](Path(results), Path(paper), Path(benchmarks))
        fig.tight_layout()
        return _save(fig, data, Path(out_dir), name)
