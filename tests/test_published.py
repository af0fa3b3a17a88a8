"""config `published` end to end, offline: a fixture checkpoint (written by fairchem-core 1.10.0
in OCP's 2021 layout) served by a local HTTP server on 127.0.0.1, downloaded, converted,
evaluated on the embedded data preprocessed with fairchem's graph convention, relaxed, written
into submission files, and compared with its "published" numbers in the report's table. One
checkpoint keeps the run short: tests/test_convert.py converts every fixture layout and model."""

import json

import numpy as np
import pandas as pd
import yaml
from conftest import DATA, REPO, copy_test_workdir, run_snakemake
from http_server import serve

from graphpar.report.tables import write_table
from graphpar.training.checkpoint import read_checkpoint

FIXTURES = DATA / "fairchem-checkpoints"
PAPER = REPO / "results" / "paper"
TASKS = ("s2ef", "is2rs", "is2re")
PUBLISHED = {  # name -> fixture file, its made-up "published" val_id numbers
    "gemnet-dt": ("gemnet_t-2021.pt", {"forces_mae": 0.5, "efwt": 0.01}),
}


def test_published_checkpoints_run_through_the_whole_chain(tmp_path):
    workdir = copy_test_workdir(tmp_path / "run")
    config_file = workdir / "config" / "config.yaml"
    config = yaml.safe_load(config_file.read_text())
    systems = {split: 0 for split in config["dataset"]["mini"]["systems"]}
    config["dataset"]["mini"]["systems"] = {**systems, "train": 1, "val_id": 1, "test_ood_cat": 1}
    config["preprocess"] = {"graph_convention": "fairchem"}
    config["train"] = {}
    config["evaluate"] = {"gp_size": 1, "relax_steps": 2, "splits": ["val_id", "test_ood_cat"]}
    with serve() as (base_url, served):
        config["published"] = {}
        for name, (file, numbers) in PUBLISHED.items():
            served.files[f"/models/{file}"] = (FIXTURES / file).read_bytes()
            config["published"][name] = {
                "url": f"{base_url}/models/{file}",
                "batch_size": 2,
                "published": {"source": f"test fixture {file}", "val_id": numbers},
            }
        config["published"]["gemnet-dt"]["size"] = (FIXTURES / "gemnet_t-2021.pt").stat().st_size
        config_file.write_text(yaml.safe_dump(config))
        # The chain's targets (not `all`: the train split is left unprocessed), one-process
        # jobs at one thread each, two at a time on two cores.
        results = "results/tiny"
        targets = [f"{results}/metrics/gemnet-dt/{task}_val_id.json" for task in TASKS]
        targets += [f"{results}/submissions/gemnet-dt/{task}.npz" for task in TASKS]
        one = ("preprocess_s2ef", "preprocess_is2re", "evaluate_s2ef", "relax")
        threads = [f"{rule}=1" for rule in one]
        run_snakemake(workdir, "--cores", "2", "--set-threads", *threads, "--", *targets)
        assert sorted(path for path, _ in served.requests) == sorted(
            f"/models/{file}" for file, _ in PUBLISHED.values()
        )

    results = workdir / "results" / "tiny"
    for name, (file, numbers) in PUBLISHED.items():
        downloaded = workdir / "resources" / "checkpoints" / f"{name}.pt"
        assert downloaded.read_bytes() == (FIXTURES / file).read_bytes()
        state = read_checkpoint(results / "checkpoints" / name / "final.pt")
        assert state["source"]["file"] == downloaded.name
        assert state["source"]["publication"]["published"]["val_id"] == numbers
        metrics = json.loads((results / "metrics" / name / "s2ef_val_id.json").read_text())
        assert metrics["n_systems"] > 0 and metrics["forces_mae"] > 0
        assert metrics["provenance"]["source"]["publication"]["url"].endswith(file)
        for task in TASKS[1:]:
            relaxed = json.loads((results / "metrics" / name / f"{task}_val_id.json").read_text())
            assert relaxed["n_systems"] == 1
        for task in TASKS:
            with np.load(results / "submissions" / name / f"{task}.npz") as npz:
                assert "ood_cat_ids" in npz.files
    # The report (after the pipeline, as `snakemake report`), here in this process.
    paths = write_table("published", workdir / "results", PAPER, tmp_path / "tables")
    table = pd.read_csv(paths["csv"], dtype=str, keep_default_na=False)
    assert set(table["Checkpoint"]) == {"tiny/gemnet-dt"}
    val = table[table["Split"] == "val_id"]  # the embedded test split has labels: no numbers
    forces = val[val["Metric"] == "Force MAE [eV/A]"].iloc[0]
    ours = metrics["forces_mae"]
    assert forces["Ours"] == f"{ours:.4f}" and forces["Published"] == "0.5000"
    assert forces["rel. diff."] == f"{100 * (ours - 0.5) / 0.5:+.1f}%"
    assert val[val["Metric"] == "EFwT [%]"].iloc[0]["Published"] == "1.00"
    assert set(table[table["Split"] == "test_ood_cat"]["Published"]) == {"n/a"}
    assert "tiny/gemnet-dt" in paths["md"].read_text()
