"""The paper's Tables 1-3 (averages over the four OC20 splits) and 5-7 (per split), with our
experiments' rows beside the published ones, rendered as Markdown, CSV and LaTeX.

Columns follow the paper's order and units (energies in eV, forces in eV/A, fractions in %),
then a `Source` column. Published cells are reproduced exactly as printed (from
`results/paper/`). Our rows come from every metrics file found under `results/*/metrics/`:
`<experiment>/<run> (<model config>)`, one row per split group (val, test) averaged over the
splits that have a value (the paper averages the four test splits; our test splits have
hidden labels on OC20, so the val splits stand in). Where our model configuration is one the
paper reports (results/paper/models.csv), a `rel. diff.` row gives (ours - paper) / paper.

IS2RE rows say how their energies were found, in the paper's words: `Relaxation` (a force model
relaxed the initial structure; the energy of the relaxed one) or `Direct` (an energy-only model,
task is2re, predicted the relaxed energy from the initial structure), in Table 3's Approach
column and, as Table 6 prints it, after the model (`(Relax)`, `(Direct)`). Their relative
difference is to the paper's row of the same approach: a direct row of a fine-tuned model is
compared with the paper's `<model>-FT` row (GemNet-XL-FT: GemNet-XL fine-tuned on IS2RE).

The model tables (`scaling_model`, `memory_model`) come from the committed predictions of
`graphpar.scaling_model` (results/benchmarks/{scaling,memory}_model.json, bench/scaling_model.py):
the paper's Fig. 2a efficiencies and Table 4 GPU counts beside what the models predict.
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
from tabulate import tabulate

from graphpar.io import atomic_path, read_json
from graphpar.report import ALL_TABLES, MODEL_TABLES, PUBLISHED_TABLE, sources

MISSING = "n/a"
# The paper's names of the IS2RE approaches (sources.IS2RE_METHODS): Table 3's Approach column,
# and the suffix of Table 6's model names.
APPROACHES = {"relaxation": "Relaxation", "direct": "Direct"}
APPROACH_SUFFIXES = {"relaxation": "Relax", "direct": "Direct"}


def _format(value: float | None, digits: int) -> str:
    return MISSING if value is None or math.isnan(value) else f"{value:.{digits}f}"


def _relative(ours: float | None, printed: str) -> str:
    """(ours - paper) / paper in %, signed; n/a when either is missing or the paper's is 0."""
    if ours is None or math.isnan(ours) or not printed or float(printed) == 0:
        return MISSING
    return f"{100 * (ours - float(printed)) / float(printed):+.1f}%"


def _metric_columns(meta: dict) -> list[dict]:
    return [column for column in meta["columns"] if "digits" in column]


def _ours_value(values: pd.Series, column: dict) -> float | None:
    """Mean of the non-null values in display units (fractions -> %), or None."""
    present = [float(v) for v in values if v is not None and not pd.isna(v)]
    if not present:
        return None
    mean = sum(present) / len(present)
    return 100 * mean if column.get("fraction") else mean


def _descriptive(column: str, group: pd.DataFrame) -> str:
    """Our value of a non-metric column (#Params, training data, approach)."""
    if column == "params":
        count = group["parameters"].iloc[0]
        return sources.format_count(None if pd.isna(count) else int(count))
    if column == "training_data":
        return f"{group['dataset'].iloc[0]} dataset"
    if column == "approach":  # IS2RE rows: sources.is2re_method
        return APPROACHES[group["method"].iloc[0]]
    return MISSING  # e.g. training GPU-days: not measured


def _paper_method(printed: pd.Series) -> str | None:
    """The IS2RE method of a published row: Table 3's Approach, Table 6's model-name suffix;
    None where the table says none."""
    approach = printed.get("approach")
    for method, name in APPROACHES.items():
        if approach == name or str(printed["model"]).endswith(f"({APPROACH_SUFFIXES[method]})"):
            return method
    return None


def _ours_rows(meta: dict, metrics: pd.DataFrame, paper: pd.DataFrame, models: pd.DataFrame):
    """Our rows (and their relative differences), in the table's columns, keyed for ordering."""
    config_to_model = {row.config: row.model_id for row in models.itertuples() if row.config}
    per_split = meta["layout"] == "split"
    is2re = meta["task"] == "is2re"
    has_approach = any(column["key"] == "approach" for column in meta["columns"])
    keys = ["experiment", "run", "split_group", "model", "dataset"] + (
        ["split"] if per_split else []
    )
    keys += ["method"] if is2re else []
    rows = []
    for key, group in metrics.groupby(keys, sort=True):
        record = dict(zip(keys, key, strict=True))
        values = {c["key"]: _ours_value(group[c["key"]], c) for c in _metric_columns(meta)}
        with_value = group[group[list(values)].notna().any(axis=1)]
        if per_split:
            source = f"ours: {record['split']}"
        else:
            source = (
                f"ours: {record['split_group']}, mean of {with_value['split'].nunique()} split(s)"
            )
        row = {"Model": f"{record['experiment']}/{record['run']} ({record['model']})"}
        if is2re and not has_approach:  # as Table 6: "GemNet-XL (Relax)"
            row["Model"] += f" ({APPROACH_SUFFIXES[record['method']]})"
        if per_split:
            row = {"Split": group["split_label"].iloc[0], **row}
        for column in meta["columns"]:
            if "digits" in column:
                row[column["label"]] = _format(values[column["key"]], column["digits"])
            else:
                row[column["label"]] = _descriptive(column["key"], group)
        row["Source"] = source
        split_label = group["split_label"].iloc[0] if per_split else None
        rows.append((split_label, row))

        # Relative difference to the paper's row of the same architecture (and split; IS2RE:
        # approach, a direct row's being the fine-tuned model's, `<model>-FT`).
        model_id = config_to_model.get(record["model"])
        candidates = [model_id] + ([f"{model_id}-FT"] if is2re else [])
        match = paper[paper["model_id"].isin(candidates)]
        if per_split:
            match = match[match["split"] == split_label]
        if is2re:
            method = record["method"]
            match = match.loc[[_paper_method(printed) == method for _, printed in match.iterrows()]]
        if model_id is None or match.empty:
            continue
        printed = match.iloc[0]
        diff = {"Model": f"rel. diff. vs paper {printed['model']}"}
        if per_split:
            diff = {"Split": split_label, **diff}
        for column in meta["columns"]:
            diff[column["label"]] = (
                _relative(values[column["key"]], printed[column["key"]])
                if "digits" in column
                else ""
            )
        diff["Source"] = "(ours - paper) / paper"
        rows.append((split_label, diff))
    return rows


def build_table(table: str, results: Path, paper: Path) -> pd.DataFrame:
    """Table `table` (table1..table7): the paper's rows as printed, then ours; all cells str."""
    meta = sources.paper_meta(paper)[table]
    published = sources.paper_table(paper, table)
    models = sources.paper_models(paper)
    metrics = sources.read_metrics(results, meta["task"])
    per_split = meta["layout"] == "split"

    def paper_row(printed: pd.Series) -> dict:
        row = {"Split": printed["split"]} if per_split else {}
        row["Model"] = printed["model"]
        row.update({c["label"]: printed[c["key"]] for c in meta["columns"]})
        row["Source"] = f"paper {meta['source'].split(' (')[0]}"
        return row

    ours = _ours_rows(meta, metrics, published, models)
    if not per_split:
        rows = [paper_row(printed) for _, printed in published.iterrows()]
        rows += [row for _, row in ours]
    else:
        # Grouped by split in the paper's order (our other splits last), ours after the paper's.
        order = list(dict.fromkeys([*published["split"], *(label for label, _ in ours)]))
        rows = []
        for split in order:
            rows += [paper_row(p) for _, p in published[published["split"] == split].iterrows()]
            rows += [row for label, row in ours if label == split]
    columns = (["Split"] if per_split else []) + ["Model"]
    columns += [c["label"] for c in meta["columns"]] + ["Source"]
    return pd.DataFrame(rows, columns=columns, dtype=str)


def render_markdown(table: str, frame: pd.DataFrame, paper: Path) -> str:
    meta = sources.paper_meta(paper)[table]
    body = tabulate(
        frame, headers="keys", tablefmt="github", showindex=False, disable_numparse=True
    )
    notes = [
        f"Published rows: {meta['source']} (Sriram et al., ICLR 2022), as printed.",
        "Our rows: `<experiment>/<run> (<model config>)`, from `results/<experiment>/metrics/`; "
        "averages over the splits that have a value (the paper averages the four test splits).",
        *meta["notes"],
    ]
    return f"# {meta['title']}\n\n{body}\n\n" + "".join(f"- {note}\n" for note in notes)


def render_latex(table: str, frame: pd.DataFrame, paper: Path) -> str:
    meta = sources.paper_meta(paper)[table]
    body = tabulate(
        frame, headers="keys", tablefmt="latex_booktabs", showindex=False, disable_numparse=True
    )
    return f"% {meta['title']}\n% {meta['source']}; generated by graphpar.report\n{body}\n"


# ---- published checkpoints ------------------------------------------------------------------

PUBLISHED_TITLE = "Published OCP checkpoints evaluated here, beside the val numbers published"
# (metrics key, label, digits, fraction shown in %)
PUBLISHED_METRICS = (
    ("energy_mae", "Energy MAE [eV]", 4, False),
    ("forces_mae", "Force MAE [eV/A]", 4, False),
    ("forces_cos", "Force Cos", 4, False),
    ("efwt", "EFwT [%]", 2, True),
)


def build_published_table(results: Path) -> pd.DataFrame:
    """Our S2EF metrics of every converted published checkpoint (metrics files whose provenance
    records a publication, `sources.publication`), one row per (checkpoint, split, metric),
    beside the number published for it where there is one, and (ours - published) /
    published. Splits without labels (test) have no metrics and no rows."""
    rows = []
    for path in sources.metrics_files(results, "s2ef"):
        metrics = read_json(path)
        record = sources.publication(metrics)
        if record is None:
            continue
        printed = record["published"].get(metrics["split"], {})
        for key, label, digits, fraction in PUBLISHED_METRICS:
            ours, theirs = metrics.get(key), printed.get(key)
            if ours is None and theirs is None:
                continue
            scale = 100 if fraction else 1
            rows.append(
                {
                    "Checkpoint": f"{path.parents[2].name}/{path.parent.name}",
                    "Split": metrics["split"],
                    "Metric": label,
                    "Ours": _format(None if ours is None else scale * ours, digits),
                    "Published": _format(None if theirs is None else scale * theirs, digits),
                    "rel. diff.": _relative(ours, "" if theirs is None else str(theirs)),
                    "Source": record["published"].get("source", record["url"]),
                }
            )
    columns = ["Checkpoint", "Split", "Metric", "Ours", "Published", "rel. diff.", "Source"]
    return pd.DataFrame(rows, columns=columns, dtype=str)


def render_published_markdown(frame: pd.DataFrame) -> str:
    body = tabulate(
        frame, headers="keys", tablefmt="github", showindex=False, disable_numparse=True
    )
    notes = [
        "Checkpoints: config `published` (config/paper/published.yaml), downloaded, converted "
        "(graphpar.convert) and evaluated by this pipeline; `<experiment>/<name>`.",
        "Published: the val numbers OCP published for each checkpoint (its `source`); "
        "n/a where none was published for that split or metric.",
        "rel. diff.: (ours - published) / published.",
    ]
    if frame.empty:
        notes.insert(0, "No published checkpoint has been evaluated (config `published`).")
    return f"# {PUBLISHED_TITLE}\n\n{body}\n\n" + "".join(f"- {note}\n" for note in notes)


# ---- model tables: Fig. 2a and Table 4 predicted ---------------------------------------------

MODEL_TITLES = {
    "scaling_model": "Fig. 2a: weak-scaling efficiency predicted (graphpar.scaling_model) and "
    "published",
    "memory_model": "Table 4: per-rank memory and the smallest G that fits a 32 GB V100, "
    "predicted (graphpar.scaling_model) and the paper's G",
}
POINT_NAMES = {
    "gp": "graph parallel, 960M",
    "dp": "data parallel, 125M",
    "gp_dp": "graph x data parallel, 960M",
}
MEMORY_SIZES = ("1", "2", "4", "8")


def model_benchmarks(results: Path) -> Path:
    """Where the model predictions are read: `<results>/benchmarks`, else the checkout's."""
    return sources.benchmark_dir(Path(results), fallback=sources.committed_benchmarks())


def build_scaling_model_table(benchmarks: Path) -> pd.DataFrame:
    """One row per (paper point, hardware preset, variant): predicted and published efficiency
    (%), the difference in percentage points and (ours - paper) / paper."""
    columns = ["Point", "GPUs", "Preset", "Variant", "Predicted [%]", "Paper [%]"]
    columns += ["Diff. [points]", "rel. diff.", "Source"]
    record = sources.model_prediction(benchmarks, "scaling_model")
    rows = []
    for entry in (record or {}).get("comparison", []):
        paper = entry["paper"]
        for key, ours in entry.items():
            if "/" not in key:
                continue
            preset, variant = key.split("/")
            rows.append(
                {
                    "Point": POINT_NAMES[entry["series"]],
                    "GPUs": str(entry["gpus"]),
                    "Preset": preset,
                    "Variant": variant,
                    "Predicted [%]": f"{100 * ours:.1f}",
                    "Paper [%]": f"{100 * paper:.0f}",
                    "Diff. [points]": f"{100 * (ours - paper):+.1f}",
                    "rel. diff.": _relative(ours, str(paper)),
                    "Source": "paper section 4.5; ours: scaling_model.json",
                }
            )
    return pd.DataFrame(rows, columns=columns, dtype=str)


def build_memory_model_table(benchmarks: Path) -> pd.DataFrame:
    """One row per Table 4 model: parameters, per-rank GB at G = 1, 2, 4, 8 (typical OC20
    batch), the smallest G that fits (typical and large batch) and the paper's G."""
    columns = ["Model", "Params (ours)", "Params (paper)"]
    columns += [f"GB/rank G={size}" for size in MEMORY_SIZES]
    columns += ["min. G (typical)", "min. G (large)", "Paper G", "Agrees"]
    record = sources.model_prediction(benchmarks, "memory_model")
    rows = []
    for model, entry in (record or {}).get("table4", {}).items():
        typical = entry["typical"]
        row = {
            "Model": model,
            "Params (ours)": sources.format_count(entry["parameters"]),
            "Params (paper)": sources.format_count(int(entry["paper_parameters"])),
        }
        for size in MEMORY_SIZES:
            row[f"GB/rank G={size}"] = f"{typical['per_rank_bytes'][size]['total'] / 1e9:.1f}"
        minimal = typical["minimal_G"]
        large = entry["large"]["minimal_G"]
        row["min. G (typical)"] = MISSING if minimal is None else str(minimal)
        row["min. G (large)"] = MISSING if large is None else str(large)
        row["Paper G"] = str(entry["paper_G"])
        row["Agrees"] = "yes" if minimal == entry["paper_G"] else "no"
        rows.append(row)
    return pd.DataFrame(rows, columns=columns, dtype=str)


def _model_notes(table: str, benchmarks: Path) -> list[str]:
    record = sources.model_prediction(benchmarks, table)
    if record is None:
        return [f"No {table}.json: run `python bench/scaling_model.py`."]
    if table == "scaling_model":
        settings = record["settings"]
        return [
            f"Efficiency: {settings['efficiency']}.",
            f"Compute: {settings['sustained_rate']}; nothing is fitted to Fig. 2a.",
            "Presets: "
            + "; ".join(
                f"{name}: {hw['gpu']}, F = {hw['matmul_flops'] / 1e12:.0f} TFLOP/s, HBM "
                f"{hw['memory_bandwidth'] / 1e9:.0f} GB/s, NVLink "
                f"{hw['nvlink_bandwidth'] / 1e9:.0f} GB/s per GPU and direction, network "
                f"{hw['network_bandwidth'] * 8 / 1e9:.0f} Gb/s per node"
                + (
                    f" (F {rate})"
                    if (rate := hw["sources"].get("rate", "")).startswith("measured")
                    else ""
                )
                for name, hw in record["hardware"].items()
            )
            + ".",
            "Variants: headline = the paper's system (fairchem's equal-edge split, DDP "
            "all-reduce over all ranks overlapped with backward, sampler balanced on "
            "neighbours); our_partition = our triplet-balanced split; ours_no_overlap = our "
            "split and sync_gradients after backward; unbalanced = no sampler balancing; "
            "with_optimiser = AdamW + EMA + clipping on every rank.",
            "Implied per-node network bandwidth at which the headline model meets the paper "
            "(a diagnostic, not an input): "
            + ", ".join(
                f"{key}: {'n/a' if value is None else f'{value / 1e9:.1f} GB/s'}"
                for key, value in record.get("implied_network_bandwidth", {}).items()
            )
            + ".",
        ]
    settings = record["settings"]
    errors = [
        f"{name} G={row['G']}: {100 * row['relative_error']:+.1f}%"
        for name, entry in record["validation"].items()
        for row in entry["rows"]
    ]
    return [
        "Per rank: "
        + ", ".join(f"{k} x{v}" for k, v in settings["state_copies_float32"].items())
        + " float32 copies of the parameters, plus activations (fitted per edge, per triplet, "
        "per gathered edge and per atom, times the measured peak factor).",
        f"Fits when the total is at most {settings['usable_bytes'] / 1e9:.1f} GB of the "
        f"{settings['capacity_bytes'] / 1e9:.1f} GB: less {settings['context_bytes'] / 2**30:.0f}"
        f" GiB for the CUDA context and {100 * settings['fragmentation']:.0f}% for "
        "fragmentation (assumed).",
        f"Batch: {settings['shape_meaning']}.",
        "Validation on bench/gp_memory.py's 1000-atom slab (activations, max over ranks, not "
        "fitted): " + ", ".join(errors) + ".",
    ]


def render_model_markdown(table: str, frame: pd.DataFrame, benchmarks: Path) -> str:
    body = tabulate(
        frame, headers="keys", tablefmt="github", showindex=False, disable_numparse=True
    )
    notes = _model_notes(table, benchmarks)
    return f"# {MODEL_TITLES[table]}\n\n{body}\n\n" + "".join(f"- {note}\n" for note in notes)


def write_table(table: str, results: Path, paper: Path, out_dir: Path) -> dict[str, Path]:
    """Write `<table>.md`, `.csv` and `.tex` into `out_dir` (atomically); returns the paths."""
    if table not in ALL_TABLES:
        raise ValueError(f"unknown table {table!r}; known: {', '.join(ALL_TABLES)}")
    if table in MODEL_TABLES:
        benchmarks = model_benchmarks(Path(results))
        builder = (
            build_scaling_model_table if table == "scaling_model" else (build_memory_model_table)
        )
        frame = builder(benchmarks)
        markdown = render_model_markdown(table, frame, benchmarks)
        latex = tabulate(
            frame, headers="keys", tablefmt="latex_booktabs", showindex=False,
            disable_numparse=True,
        )  # fmt: skip
        latex = f"% {MODEL_TITLES[table]}; generated by graphpar.report\n{latex}\n"
    elif table == PUBLISHED_TABLE:
        frame = build_published_table(Path(results))
        markdown = render_published_markdown(frame)
        latex = tabulate(
            frame, headers="keys", tablefmt="latex_booktabs", showindex=False,
            disable_numparse=True,
        )  # fmt: skip
        latex = f"% {PUBLISHED_TITLE}; generated by graphpar.report\n{latex}\n"
    else:
        frame = build_table(table, Path(results), Path(paper))
        markdown = render_markdown(table, frame, paper)
        latex = render_latex(table, frame, paper)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {ext: out_dir / f"{table}.{ext}" for ext in ("md", "csv", "tex")}
    with atomic_path(paths["md"]) as tmp:
        tmp.write_text(markdown)
    with atomic_path(paths["csv"]) as tmp:
        frame.to_csv(tmp, index=False)
    with atomic_path(paths["tex"]) as tmp:
        tmp.write_text(latex)
    return paths
