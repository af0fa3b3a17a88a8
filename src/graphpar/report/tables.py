"""The paper's Tables 1-3 (averages over the four OC20 splits) and 5-7 (per split), with our
experiments' rows beside the published ones, rendered as Markdown, CSV and LaTeX.

Columns follow the paper's order and units (energies in eV, forces in eV/A, fractions in %),
then a `Source` column. Published cells are reproduced exactly as printed (from
`results/paper/`). Our rows come from every metrics file found under `results/*/metrics/`:
`<experiment>/<run> (<model config>)`, one row per split group (val, test) averaged over the
splits that have a value (the paper averages the four test splits; our test splits have
hidden labels on OC20, so the val splits stand in). Where our model configuration is one the
paper reports (results/paper/models.csv), a `rel. diff.` row gives (ours - paper) / paper.
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
from tabulate import tabulate

from graphpar.io import atomic_path
from graphpar.report import TABLES, sources

MISSING = "n/a"


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
    model = group["model"].iloc[0]
    if column == "params":
        return sources.format_count(sources.parameter_count(model))
    if column == "training_data":
        return f"{group['dataset'].iloc[0]} dataset"
    if column == "approach":
        return "Relaxation"  # our IS2RE energies are those of the ML-relaxed structures
    return MISSING  # e.g. training GPU-days: not measured


def _ours_rows(meta: dict, metrics: pd.DataFrame, paper: pd.DataFrame, models: pd.DataFrame):
    """Our rows (and their relative differences), in the table's columns, keyed for ordering."""
    config_to_model = {row.config: row.model_id for row in models.itertuples() if row.config}
    per_split = meta["layout"] == "split"
    keys = ["experiment", "run", "split_group", "model", "dataset"] + (
        ["split"] if per_split else []
    )
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

        # Relative difference to the paper's row of the same architecture (and split).
        model_id = config_to_model.get(record["model"])
        match = paper[paper["model_id"] == model_id]
        if per_split:
            match = match[match["split"] == split_label]
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


def write_table(table: str, results: Path, paper: Path, out_dir: Path) -> dict[str, Path]:
    """Write `<table>.md`, `.csv` and `.tex` into `out_dir` (atomically); returns the paths."""
    if table not in TABLES:
        raise ValueError(f"unknown table {table!r}; known: {', '.join(TABLES)}")
    frame = build_table(table, Path(results), Path(paper))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {ext: out_dir / f"{table}.{ext}" for ext in ("md", "csv", "tex")}
    with atomic_path(paths["md"]) as tmp:
        tmp.write_text(render_markdown(table, frame, paper))
    with atomic_path(paths["csv"]) as tmp:
        frame.to_csv(tmp, index=False)
    with atomic_path(paths["tex"]) as tmp:
        tmp.write_text(render_latex(table, frame, paper))
    return paths
