"""The real snakemake CLI on the workflow: a tiny end-to-end run, config validation, dry runs."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import REPO, copy_test_workdir, run_snakemake

from graphpar.data import oc20
from graphpar.data.dataset import LmdbDataset, collate
from graphpar.training.checkpoint import load_trained, read_checkpoint

pytestmark = pytest.mark.timeout(600)

CONFIGS = sorted((REPO / "config").rglob("*.yaml"))


def test_tiny_run_produces_the_documented_raw_layout(tiny_workflow):
    raw = tiny_workflow / "resources" / "mini"
    manifest = json.loads((raw / "manifest.json").read_text())
    test_config = yaml.safe_load((tiny_workflow / "config" / "config.yaml").read_text())
    expected = {k: v for k, v in test_config["dataset"]["mini"]["systems"].items() if v}
    assert {split: s["systems"] for split, s in manifest["splits"].items()} == expected
    for split in expected:
        assert sorted((raw / "s2ef" / split).glob("*.extxyz.xz"))
        assert sorted((raw / "s2ef" / split).glob("*.txt.xz"))
        assert (raw / "is2re" / split / "data.lmdb").is_file()
    log = (tiny_workflow / "logs" / "generate_mini" / "mini.log").read_text()
    assert "mini dataset:" in log


def test_tiny_run_preprocesses_every_split(tiny_workflow):
    raw = tiny_workflow / "resources" / "mini"
    manifest = json.loads((raw / "manifest.json").read_text())
    for split, summary in manifest["splits"].items():
        s2ef = LmdbDataset(raw / "lmdb" / "s2ef" / split)
        assert len(s2ef) == summary["s2ef_frames"]
        assert s2ef.metadata["ref_energy"] is True and s2ef.metadata["cutoff"] == 6.0
        is2re = LmdbDataset(raw / "lmdb" / "is2re" / split)
        assert len(is2re) == summary["is2re_systems"]
        assert (tiny_workflow / "logs" / "preprocess_s2ef" / "mini" / f"{split}.log").is_file()


def test_tiny_run_trains_both_models_through_torchrun(tiny_workflow):
    """The train rule: G = 2 torchrun ranks per model, checkpoints, metrics and a log per run;
    the final checkpoint loads as a model in eV and eV/A."""
    val = LmdbDataset(tiny_workflow / "resources/mini/lmdb/s2ef/val_id", triplets=TRIPLETS)
    batch = collate([val[0], val[1]])
    for run in ("dimenetpp", "gemnet"):
        folder = tiny_workflow / "results" / "tiny" / "checkpoints" / run
        state = read_checkpoint(folder / "final.pt")
        assert state["step"] == 4 and state["config"]["gp_size"] == 2
        assert state["config"]["train"] == ["resources/mini/lmdb/s2ef/train"]
        lines = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]
        steps = [x["step"] for x in lines if x["split"] == "train"]
        assert steps == [1, 2, 3, 4]
        assert all(len(x["peak_memory_mb"]) == 2 for x in lines if x["split"] == "train")
        assert [x["step"] for x in lines if x["split"] == "val"] == [4]
        log = (tiny_workflow / "logs" / "train" / "tiny" / f"{run}.log").read_text()
        assert "G x D = 2 x 1" in log
        out = load_trained(folder / "final.pt")(batch)
        assert out["energy"].shape == (2,) and out["forces"].shape == batch.pos.shape
        assert torch.isfinite(out["energy"]).all() and torch.isfinite(out["forces"]).all()


TRIPLETS = ("dimenetpp", "gemnet")
TINY_EVALUATED = ("val_id", "test_ood_cat")  # .test/config/config.yaml, evaluate.splits


def test_tiny_run_relaxes_the_evaluated_splits(tiny_workflow):
    """IS2RS and IS2RE metrics per (run, split) with FbT/AFbT from EMT, relaxed structures and
    submission-format predictions."""
    results = tiny_workflow / "results" / "tiny"
    for run in ("dimenetpp", "gemnet"):
        for split in TINY_EVALUATED:
            data = LmdbDataset(tiny_workflow / "resources/mini/lmdb/is2re" / split)
            is2rs = json.loads((results / "metrics" / run / f"is2rs_{split}.json").read_text())
            is2re = json.loads((results / "metrics" / run / f"is2re_{split}.json").read_text())
            assert is2rs["n_systems"] == is2re["n_systems"] == len(data)
            if len(data) == 0:  # a tiny split whose only relaxation did not converge
                assert is2rs["adwt"] is None and is2re["energy_mae"] is None
                assert is2rs["reason"] == "the split has no systems"
                continue
            for key in ("adwt", "fbt", "afbt"):  # EMT covers every element of the mini data
                assert 0 <= is2rs[key] <= 1, key
            assert is2re["energy_mae"] >= 0 and 0 <= is2re["ewt"] <= 1
            assert is2rs["oracle"] == "emt" and is2rs["provenance"]["model"] == f"{run}-tiny"
            relaxed = sorted((results / "relaxations" / run / split).glob("*.extxyz"))
            assert [int(p.stem) for p in relaxed] == sorted(int(s.sid) for s in data)
            is2re_npz = np.load(results / "predictions" / run / f"is2re_{split}.npz")
            assert len(is2re_npz["energy"]) == len(data)
            targets = [float(data[i].energy_relaxed) for i in range(len(data))]
            np.testing.assert_allclose(is2re_npz["energy_target"], targets)
            is2rs_npz = np.load(results / "predictions" / run / f"is2rs_{split}.npz")
            assert np.all(is2rs_npz["distance"] >= 0) and len(is2rs_npz["distance"]) == len(data)
            assert np.all(is2rs_npz["oracle_max_force"] >= 0)
            log = tiny_workflow / "logs" / "relax" / "tiny" / run / f"{split}.log"
            assert "G x D = 2 x 1" in log.read_text()  # config evaluate.gp_size: 2


def test_tiny_run_evaluates_the_evaluated_splits(tiny_workflow):
    """One metrics JSON per (run, split) with OC20's S2EF keys and provenance, and predictions
    in OC20's submission layout, consistent with the split."""
    results = tiny_workflow / "results" / "tiny"
    for run in ("dimenetpp", "gemnet"):
        for split in TINY_EVALUATED:
            metrics = json.loads((results / "metrics" / run / f"s2ef_{split}.json").read_text())
            assert metrics["task"] == "s2ef" and metrics["split"] == split
            data = LmdbDataset(tiny_workflow / "resources/mini/lmdb/s2ef" / split)
            assert metrics["n_systems"] == len(data) > 0
            for key in ("energy_mae", "forces_mae", "forces_cos", "efwt"):
                assert isinstance(metrics[key], float), key
            assert 0 <= metrics["efwt"] <= 1 and -1 <= metrics["forces_cos"] <= 1
            origin = metrics["provenance"]
            assert origin["model"] == f"{run}-tiny" and len(origin["checkpoint_sha256"]) == 64
            assert origin["versions"]["torch"].startswith("2.13.0")
            log = tiny_workflow / "logs" / "evaluate_s2ef" / "tiny" / run / f"{split}.log"
            assert "G x D = 2 x 1" in log.read_text()  # torchrun, config evaluate.gp_size: 2
            predictions = np.load(results / "predictions" / run / f"s2ef_{split}.npz")
            assert len(predictions["ids"]) == len(predictions["energy"]) == len(data)
            free = sum(int((~data[i].fixed.bool()).sum()) for i in range(len(data)))
            assert predictions["forces"].shape == (free, 3)
            assert len(predictions["chunk_idx"]) == len(data) - 1
            np.testing.assert_allclose(
                predictions["energy_target"], [float(data[i].energy) for i in range(len(data))]
            )
            assert predictions["forces_target"].shape == (free, 3)


@pytest.mark.parametrize(
    "edit, named",
    [
        (lambda t: t["dimenetpp"].update(model="dimenetpp-huge"), "unknown model"),
        (lambda t: t["gemnet"].update(val="val_ood_cat"), "'val_ood_cat' is not a s2ef split"),
        (lambda t: t["gemnet"].update(learning_rate=1), "'learning_rate' was unexpected"),
    ],
)
def test_bad_training_config_stops_with_the_run_named(tmp_path, edit, named):
    workdir = copy_test_workdir(tmp_path / "run")
    config_file = workdir / "config" / "config.yaml"
    config = yaml.safe_load(config_file.read_text())
    edit(config["train"])
    config_file.write_text(yaml.safe_dump(config))
    result = run_snakemake(workdir, "-n", check=False)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "config train." in output and named in output, output[-3000:]
    assert not (workdir / "resources").exists()


def test_finished_run_has_nothing_left_to_do(tiny_workflow):
    result = run_snakemake(tiny_workflow, "-n")
    assert "Nothing to be done" in result.stdout + result.stderr


@pytest.mark.parametrize(
    "edit, named",
    [
        (lambda c: c["dataset"]["mini"].update(sytems={"train": 3}), "sytems"),
        (lambda c: c.update(experimnet="x"), "experimnet"),
        (lambda c: c["dataset"].update(source="oc21"), "source"),
        (lambda c: c["dataset"]["mini"].update(fmax=-1), "fmax"),
    ],
)
def test_bad_config_stops_with_the_key_named(tmp_path, edit, named):
    workdir = copy_test_workdir(tmp_path / "run")
    config_file = workdir / "config" / "config.yaml"
    config = yaml.safe_load(config_file.read_text())
    edit(config)
    config_file.write_text(yaml.safe_dump(config))
    result = run_snakemake(workdir, "-n", check=False)
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert "Error validating config file" in output
    assert f"'{named}'" in output
    assert not (workdir / "resources").exists()


def dry_run(
    workdir: Path,
    config_file: Path,
    overrides: dict | None = None,
    cluster: bool = False,
    targets: tuple[str, ...] = (),
):
    """Parse the workflow on `config_file` (plus `overrides`, as a profile's or the command
    line's `config:`) and dry-run its DAG for `targets` (default: all) in this process, as
    `snakemake -n --configfile` does in a fraction of its start-up: the DAG's jobs. Local
    (`--cores 1`) or, with `cluster`, as through a cluster executor's profile, whose jobs'
    threads no local core count caps."""
    from snakemake.api import SnakemakeApi
    from snakemake.settings.types import (
        ConfigSettings,
        DAGSettings,
        OutputSettings,
        Quietness,
        ResourceSettings,
    )

    resources = ResourceSettings(nodes=100) if cluster else ResourceSettings(cores=1)
    with SnakemakeApi(OutputSettings(quiet={Quietness.ALL})) as api:
        parsed = api.workflow(
            resources,
            ConfigSettings(configfiles=[config_file], config=overrides or {}),
            snakefile=REPO / "Snakefile",
            workdir=workdir,
        )
        parsed.dag(DAGSettings(targets=set(targets))).execute_workflow(executor="dryrun")
        return list(parsed._workflow.dag.jobs)


def dry_run_error(workdir: Path, config: dict) -> str | None:
    """dry_run() on `config`: the error that stops it, or None."""
    config_file = workdir / "config.yaml"
    config_file.write_text(yaml.safe_dump(config))
    try:
        dry_run(workdir, config_file)
    except Exception as error:  # noqa: BLE001 (whatever stops the workflow, as the CLI shows it)
        return str(error)
    return None


TINY_SPLITS = "known: val_id, val_ood_ads, test_ood_cat, test_ood_both"


@pytest.mark.parametrize(
    "edit, message",
    [
        pytest.param(lambda c: None, None, id="tiny config"),
        pytest.param(
            lambda c: c["evaluate"].update(splits=["val_bogus"]),
            f"config evaluate.splits: 'val_bogus' is not a val or test split of the mini "
            f"dataset ({TINY_SPLITS})",
            id="unknown eval split",
        ),
        pytest.param(
            lambda c: c["evaluate"].update(splits=["val_id", "val_ood_cat"]),
            "config evaluate.splits: 'val_ood_cat' is not a val or test split",  # 0 systems
            id="eval split left out",
        ),
        pytest.param(
            lambda c: c.update(train={}, evaluate={"splits": ["val_id"]}),
            "config evaluate.splits: val_id, but no run of config train evaluates them",
            id="nothing to evaluate",
        ),
        pytest.param(
            lambda c: c["train"]["dimenetpp"].update(model_args={"hiden_channels": 8}),
            "config train.dimenetpp: training config: unknown model_args hiden_channels for "
            "model dimenetpp-tiny (did you mean hidden_channels?)",
            id="model_args name",
        ),
        pytest.param(
            lambda c: c["train"]["gemnet"].update(model_args={"cutoff": "6"}),
            "config train.gemnet: training config: model_args.cutoff is '6', not float",
            id="model_args type",
        ),
        pytest.param(
            lambda c: c["train"]["gemnet"].update(dp_size=3),  # batch_size 4
            "config train.gemnet: training config: batch_size 4 is not a multiple of D = 3",
            id="batch over D",
        ),
        pytest.param(
            lambda c: c["scaling"].update(
                runs={"x": {"model": "gemnet-tiny", "train": ["train"], "dp_size": 3}}
            ),
            "config scaling.runs.x: training config: batch_size 8 is not a multiple of D = 3",
            id="scaling batch over D",
        ),
        pytest.param(
            lambda c: c.update(site={"gpus_per_node": 1}),  # dimenetpp: G = 2
            "config train.dimenetpp: G = 2 graph-parallel ranks do not fit in one node: "
            "site.gpus_per_node = 1 is not a multiple of G (G x D = 2 x 1)",
            id="G over a node",
        ),
        pytest.param(
            lambda c: [
                c.update(site={"gpus_per_node": 4}),
                c["train"]["gemnet"].update(dp_size=3, batch_size=6),
            ],
            "config train.gemnet: G x D = 2 x 3 = 6 processes are not a multiple of "
            "site.gpus_per_node = 4: they fill no whole number of nodes",
            id="G x D over nodes",
        ),
        pytest.param(
            lambda c: [c.update(site={"gpus_per_node": "4"}), c["evaluate"].update(dp_size=3)],
            "config evaluate (relaxations): G x D = 2 x 3 = 6 processes are not a multiple of "
            "site.gpus_per_node = 4",
            id="relaxations over nodes",
        ),
        pytest.param(
            lambda c: c["train"]["gemnet"].update(nodes=2),
            "config train.gemnet: nodes: 2 is no longer a run key: a job spans "
            "G x D / site.gpus_per_node nodes",
            id="nodes key",
        ),
        pytest.param(
            lambda c: c["train"]["gemnet"].update(gpu_days="a week"),
            "config train.gemnet: gpu_days must be a number of GPU-days, not 'a week'",
            id="gpu_days",
        ),
        pytest.param(
            lambda c: c.update(rehearsal={}, dataset={"source": "oc20"}),
            "config rehearsal: a rehearsal runs on the embedded data (dataset.source: mini",
            id="rehearsal of OC20",
        ),
        pytest.param(
            lambda c: c.update(dataset={"source": "oc20", "name": "oc20-copy"}),
            "config dataset.name: 'oc20-copy', but OC20 always lives in resources/oc20",
            id="OC20 renamed",
        ),
    ],
)
def test_inconsistent_config_stops_the_dag_with_the_key_named(tmp_path, edit, message):
    """Checks across keys, or against the dataset and the models, stop the workflow when it is
    parsed, before any job, with one line naming the key and both values."""
    config = yaml.safe_load((REPO / ".test" / "config" / "config.yaml").read_text())
    config.setdefault("scaling", {})
    edit(config)
    error = dry_run_error(tmp_path, config)
    if message is None:
        assert error is None
    else:
        assert error is not None and message in error.splitlines()[0], error
    assert not (tmp_path / "resources").exists()


# Every torchrun job (training, scaling, evaluation, relaxation) of every paper config on a site of
# 8 GPUs per node: (rule, run) -> (nodes, GPUs and torchrun processes per node). Evaluations use
# config evaluate's defaults (G = D = 1).
PAPER_SHAPES = {
    "dimenetpp-xl.yaml": {
        ("train", "dimenetpp-xl"): (32, 8),  # G = 4 x D = 64
        ("evaluate_s2ef", "dimenetpp-xl"): (1, 1),
        ("relax", "dimenetpp-xl"): (1, 1),
    },
    "gemnet-xl.yaml": {
        ("train", "gemnet-xl"): (32, 8),  # G = 4 x D = 64: the paper's 32 nodes of 8 V100s
        ("train", "gemnet-xl-ft"): (32, 8),
        ("evaluate_s2ef", "gemnet-xl"): (1, 1),
        ("relax", "gemnet-xl"): (1, 1),
        ("evaluate_is2re", "gemnet-xl-ft"): (1, 1),  # energy only: direct IS2RE, no relaxation
    },
    "oc20-200k.yaml": {
        ("train", "dimenetpp"): (1, 2),  # G = 2
        ("evaluate_s2ef", "dimenetpp"): (1, 1),
    },
    # OCP's published checkpoints (no training): converted, then evaluated and relaxed on one
    # GPU each (evaluate.gp_size x dp_size = 1 x 1).
    "published.yaml": {
        (rule, name): (1, 1)
        for rule in ("evaluate_s2ef", "relax")
        for name in ("gemnet-dt-all", "gemnet-dt-2m", "dimenetpp-large-all", "dimenetpp-20m-md")
    },
    "scaling.yaml": {
        ("scaling", "gemnet-125m-gp1"): (1, 1),
        ("scaling", "gemnet-245m-gp2"): (1, 2),
        ("scaling", "gemnet-480m-gp4"): (1, 4),
        ("scaling", "gemnet-960m-gp8"): (1, 8),
        ("scaling", "gemnet-125m-gp1-dp32"): (4, 8),
        ("scaling", "gemnet-245m-gp2-dp32"): (8, 8),
        ("scaling", "gemnet-480m-gp4-dp32"): (16, 8),
        ("scaling", "gemnet-960m-gp8-dp32"): (32, 8),
    },
}
RENDEZVOUS = (
    "--rdzv_backend=c10d --rdzv_endpoint=$(hostname):$((29500 + SLURM_JOB_ID % 10000))"
    " --rdzv_id=$SLURM_JOB_ID"
)


# gemnet-xl.yaml's evaluated S2EF splits: OC20's four val splits and its test splits.
OC20_S2EF_EVALUATED = [
    *("val_id", "val_ood_ads", "val_ood_cat", "val_ood_both"),
    *oc20.CATALOGUE["s2ef_test"].splits,
]
PREEMPTIBLE = " --signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1 --shutdown-timeout=270"


def sbatch_line(job) -> str:
    """The sbatch command line the SLURM plugin (2.8) submits `job` with, less its account,
    partition and log (from the site and the run)."""
    from snakemake_executor_plugin_slurm.submit_string import get_submit_command
    from snakemake_executor_plugin_slurm.utils import set_gres_string

    names = {"run_uuid": "x", "slurm_logfile": "x.log", "comment_str": "x"}
    params = {**names, "account": "", "partition": "", "workdir": "."}
    return get_submit_command(job, params) + set_gres_string(job)


def assert_torchrun_launch(job, name: str, nodes: int, per_node: int) -> None:
    """`job`'s shell starts one torchrun agent per node, `per_node` processes each: one task per
    node, a job step (what --signal reaches), on one node only inside a SLURM job (local runs
    start torchrun directly)."""
    what, command, resources = (
        f"{name}: {job.rule.name} {job.wildcards.run}",
        job.shellcmd,
        job.resources,
    )
    sbatch = sbatch_line(job)
    cpus = re.search(r"--cpus-per-task=(\d+) --kill", command)
    assert cpus and 1 <= int(cpus[1]) <= job.threads, what  # within the job's
    step = f"--ntasks={nodes} --cpus-per-task={cpus[1]} --kill-on-bad-exit=1 --label"
    if nodes == 1:
        assert resources["mpi"] == "" and "--ntasks" not in sbatch, what
        launch = f" ${{SLURM_JOB_ID:+srun {step} }}torchrun --standalone"
    else:
        assert resources["mpi"] == "srun" and f" --ntasks={nodes} " in sbatch, what
        launch = f"srun {step} torchrun --nnodes={nodes}"
    launch += f" --nproc_per_node={per_node}"
    launch += f" {RENDEZVOUS}" if nodes > 1 else ""
    # Training passes SLURM's warning on to its processes and waits for their checkpoint
    # (workflow/rules/common.smk, "Preemption").
    launch += PREEMPTIBLE if job.rule.name == "train" else ""
    if job.rule.name == "train":  # resubmissions: GemNet-XL's gpu_days, else 1
        assert job.rule.restart_times == (4 if name == "gemnet-xl.yaml" else 1), what
    assert command.count("torchrun") == 1 and f"{launch} -m " in command, what


def test_every_paper_run_is_shaped_for_a_site_of_8_gpus_per_node(tmp_path):
    """The SLURM submission of every training, scaling, evaluation and relaxation job of
    every config/paper/*.yaml with `site: {gpus_per_node: 8}` from a site profile (which hands
    it over as the string "8"), rendered without submitting: nodes, one task per node, GPUs per
    node, CPUs, and one torchrun agent per node with G x D / nodes processes."""
    assert sorted(PAPER_SHAPES) == sorted(p.name for p in (REPO / "config/paper").glob("*.yaml"))
    for name, expected in PAPER_SHAPES.items():
        site = {"site": {"gpus_per_node": "8"}}
        targets = ("all", "scaling_study") if name == "scaling.yaml" else ()
        jobs = dry_run(tmp_path, REPO / "config/paper" / name, site, True, targets)
        shapes = {}
        for job in jobs:
            if job.rule.name not in (
                "train",
                "scaling",
                "evaluate_s2ef",
                "evaluate_is2re",
                "relax",
            ):
                continue
            key = (job.rule.name, job.wildcards.run)
            what = f"{name}: {key}"
            resources, sbatch = job.resources, sbatch_line(job)
            nodes, per_node = resources["nodes"], int(resources["gres"].removeprefix("gpu:"))
            shapes.setdefault(key, set()).add((nodes, per_node))
            assert resources["tasks"] == nodes and resources["tasks_per_gpu"] == 0, what
            assert f" --nodes={nodes} " in sbatch and f" --gres=gpu:{per_node}" in sbatch, what
            assert f" --cpus-per-task={job.threads} " in sbatch, what
            assert "--ntasks-per-gpu" not in sbatch, what
            assert_torchrun_launch(job, name, nodes, per_node)
        assert shapes == {key: {shape} for key, shape in expected.items()}, name
    # With evaluations of G x D = 4 x 4 processes: 2 nodes of 8 (the overrides are merged).
    overrides = {"site": {"gpus_per_node": 8}, "evaluate": {"gp_size": 4, "dp_size": 4}}
    gemnet_xl = dry_run(tmp_path, REPO / "config/paper/gemnet-xl.yaml", overrides, True)
    train = next(j for j in gemnet_xl if j.rule.name == "train")
    assert " --nodes=32 --ntasks=32 --cpus-per-task=72 " in sbatch_line(train)  # 8 x (1 + 8)
    # 1,962 GPU-days on 256 GPUs in jobs of site.job_hours = 48: 4 jobs, so 3 resubmissions
    # and a spare; each asks for the site's time limit.
    assert train.rule.restart_times == 4 and train.resources["runtime"] == 48 * 60
    # Its S2EF evaluation takes the validation batch of one GPU: 128 / D = 2 systems, per
    # data-parallel group; GemNet-XL-FT (energy only) is evaluated directly on every IS2RE val
    # and test split, and never relaxed.
    evaluations = [j for j in gemnet_xl if j.rule.name.startswith(("evaluate", "relax"))]
    is2re = [s for s in oc20.CATALOGUE["is2re"].splits if s.startswith(("val_", "test_"))]
    assert len(is2re) == 8
    for rule, run, splits in [
        ("evaluate_s2ef", "gemnet-xl", OC20_S2EF_EVALUATED),
        ("relax", "gemnet-xl", is2re),
        ("evaluate_is2re", "gemnet-xl-ft", is2re),
    ]:
        jobs = [j for j in evaluations if j.rule.name == rule]
        assert {j.wildcards.run for j in jobs} == {run}, rule
        assert sorted(j.wildcards.split for j in jobs) == sorted(splits), rule
        for job in jobs:
            assert job.resources["nodes"] == 2 and job.resources["gres"] == "gpu:8", rule
            assert_torchrun_launch(job, "gemnet-xl.yaml", 2, 8)
            assert " --gp-size 4 " in job.shellcmd, rule
            if rule != "relax":
                assert " --batch-size 2 " in job.shellcmd, rule
    direct = next(j for j in evaluations if j.rule.name == "evaluate_is2re")
    assert " -m graphpar.evaluate is2re --gp-size 4 " in direct.shellcmd
    assert direct.output == [
        f"results/gemnet-xl/metrics/gemnet-xl-ft/is2re_{direct.wildcards.split}.json",
        f"results/gemnet-xl/predictions/gemnet-xl-ft/is2re_{direct.wildcards.split}.npz",
    ]
    # The profile asks SLURM for the warning (its set-resources apply on a real submission).
    profile = yaml.safe_load((REPO / "workflow/profiles/slurm/config.yaml").read_text())
    assert profile["set-resources"]["train"]["slurm_extra"] == "'--signal=USR1@300'"


@pytest.mark.parametrize("config_file", CONFIGS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_shipped_config_validates_and_builds_its_dag(tmp_path, config_file):
    workdir = tmp_path / "run"
    shutil.copytree(REPO / "config", workdir / "config")
    result = run_snakemake(workdir, "-n", "--configfile", str(config_file))
    config = yaml.safe_load(config_file.read_text())
    if config.get("dataset", {}).get("source") == "oc20":
        assert "download_oc20" in result.stdout
        assert "extract_oc20_s2ef" in result.stdout
    else:
        assert "generate_mini" in result.stdout
        name = config["dataset"].get("name") or "mini"  # its own folder (dataset.name)
        assert f"resources/{name}/manifest.json" in result.stdout


def test_oc20_dry_run_fetches_exactly_the_configured_archives(tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(REPO / "config", workdir / "config")
    config = REPO / "config" / "paper" / "dimenetpp-xl.yaml"
    result = run_snakemake(workdir, "-n", "--quiet", "rules", "--configfile", str(config))
    counts = {
        line.split()[0]: int(line.split()[1])
        for line in result.stdout.splitlines()
        if len(line.split()) == 2 and line.split()[1].isdigit()
    }
    # 20M + MD + 4 val tars + S2EF test + IS2RE; one extraction per S2EF split.
    assert counts["download_oc20"] == 8
    assert counts["extract_oc20_s2ef"] == 6
    assert counts["extract_oc20_s2ef_test"] == 1
    assert counts["extract_oc20_is2re"] == 1
    # Every S2EF split (2 train, 4 val, 4 test), planned (its shards are known once the plan
    # exists) and gathered, and every IS2RE split (3 train, 4 val, 4 test).
    assert counts["preprocess_plan"] == counts["preprocess_s2ef"] == 10
    assert counts["preprocess_is2re"] == 11


def test_configs_exist():
    assert REPO / "config" / "config.yaml" in CONFIGS
    assert any(Path(p).parent.name == "paper" for p in CONFIGS)
