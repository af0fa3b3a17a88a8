"""Two runs on one machine give the same results: the tiny pipeline's training, evaluation and
relaxation jobs run a second time on the first run's data and must write the same metrics (all
but the fields of `graphpar.provenance.RUN_MEASURES`), the same predictions and the same relaxed
structures, bit for bit."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import run_snakemake

from graphpar.provenance import RUN_MEASURES


def without_run_measures(value):
    """`value` (parsed JSON) with every RUN_MEASURES field dropped, at any depth."""
    if isinstance(value, dict):
        return {k: without_run_measures(v) for k, v in value.items() if k not in RUN_MEASURES}
    if isinstance(value, list):
        return [without_run_measures(v) for v in value]
    return value


def read_json_lines(path: Path) -> list:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def second_run(tiny_workflow, tmp_path_factory) -> Path:
    """The tiny workflow's results computed again in another folder, from its data (copied with
    their times and Snakemake's records, so only training, evaluation and relaxations run)."""
    workdir = tmp_path_factory.mktemp("again") / "run"
    # Without results/ and without Snakemake's logs of the first run (.snakemake/log).
    ignore = shutil.ignore_patterns("results", "locks", "log")
    shutil.copytree(tiny_workflow, workdir, symlinks=True, ignore=ignore)
    run_snakemake(workdir, "--cores", "2")
    return workdir


def test_a_second_run_gives_the_same_metrics_predictions_and_structures(tiny_workflow, second_run):
    (log,) = (second_run / ".snakemake" / "log").glob("*.log")
    ran = set(re.findall(r"^(?:local)?rule (\w+):", log.read_text(), flags=re.MULTILINE))
    assert ran == {"train", "evaluate_s2ef", "relax", "all"}, ran
    # Everything but train.log (clock times) and the checkpoints (their sha256 are in the
    # metrics' provenance, compared below).
    results = sorted(
        path.relative_to(second_run)
        for path in (second_run / "results").rglob("*")
        if path.is_file() and path.suffix not in (".log", ".pt")
    )
    kinds = {path.suffix for path in results}
    assert kinds == {".json", ".jsonl", ".npz", ".extxyz"}, kinds
    for relative in results:
        first, again = tiny_workflow / relative, second_run / relative
        if relative.suffix == ".json":
            assert without_run_measures(json.loads(again.read_text())) == without_run_measures(
                json.loads(first.read_text())
            ), relative
        elif relative.suffix == ".jsonl":  # learning curves: samples/s and memory change
            assert without_run_measures(read_json_lines(again)) == without_run_measures(
                read_json_lines(first)
            ), relative
        elif relative.suffix == ".npz":
            with np.load(first) as a, np.load(again) as b:
                assert sorted(a.files) == sorted(b.files), relative
                for name in a.files:
                    np.testing.assert_array_equal(b[name], a[name], err_msg=f"{relative}:{name}")
        else:  # relaxed structures (.extxyz): the same text
            assert again.read_bytes() == first.read_bytes(), relative
