# Helpers shared by the workflow's modules: config validation, paths, targets.
import json
import re
import shlex
import sys
from pathlib import Path

from snakemake.settings.types import DeploymentMethod
from snakemake.utils import min_version, validate

min_version("9.0")

SRC = str(Path(workflow.basedir) / "src")
sys.path.insert(0, SRC)
# Every job's shell starts with this prefix (doubled braces: Snakemake formats it like a
# command):
# - PYTHONPATH: jobs run this checkout's package, installed or not;
# - one CPU thread per process: jobs get their parallelism from processes (torchrun ranks, data
#   workers), and PyTorch's multithreaded CPU kernels do not give the same bits from run to run
#   (two G = 2 trainings with 2 threads per rank differed from step 3);
# - PATH: the rules' `python` and `torchrun` are those of the environment Snakemake itself runs
#   in, so a Snakemake called by its path (.venv/bin/snakemake) needs no activated venv. Under
#   --sdm conda the rule's conda environment, activated before this prefix runs, must win.
ENVIRONMENT = [
    f"PYTHONPATH={SRC}${{{{PYTHONPATH:+:$PYTHONPATH}}}}",
    "OMP_NUM_THREADS=1",
    "MKL_NUM_THREADS=1",
]
if DeploymentMethod.CONDA not in workflow.deployment_settings.deployment_method:
    ENVIRONMENT.append(f"PATH={shlex.quote(str(Path(sys.executable).parent))}:$PATH")
shell.prefix(f"export {' '.join(ENVIRONMENT)}; ")

from graphpar.training.config import TrainingError, load_config  # noqa: E402
from graphpar.data import mini, oc20  # noqa: E402

validate(config, "../schemas/config.schema.yaml")


DATASET = config["dataset"]["source"]
RAW = f"resources/{DATASET}"  # raw data root; layout in config/README.md
OC20 = config["dataset"]["oc20"]


def mini_splits():
    """Splits of the embedded dataset that have at least one system."""
    systems = config["dataset"]["mini"]["systems"]
    return [split for split in mini.SPLITS if systems.get(split, 0) > 0]


def s2ef_splits():
    """S2EF splits of the configured dataset, as directories of raw files under RAW/s2ef/."""
    if DATASET == "mini":
        return mini_splits()
    test = oc20.CATALOGUE["s2ef_test"].splits if OC20["s2ef_test"] else []
    return [*OC20["s2ef_train"], *OC20["s2ef_val"], *test]


def is2re_splits():
    """IS2RE/IS2RS splits of the configured dataset, as RAW/is2re/<split>/data.lmdb."""
    if DATASET == "mini":
        return mini_splits()
    return list(oc20.CATALOGUE["is2re"].splits) if OC20["is2re"] else []


def raw_s2ef(split):
    return f"{RAW}/s2ef/{split}"


def raw_is2re(split):
    return f"{RAW}/is2re/{split}/data.lmdb"


def data_targets():
    """Every raw file or directory the data stage produces for the configured dataset."""
    targets = [raw_s2ef(split) for split in s2ef_splits()]
    targets += [raw_is2re(split) for split in is2re_splits()]
    if DATASET == "mini":
        targets.append(f"{RAW}/manifest.json")
    return targets


def preprocessed_s2ef(split):
    return f"resources/{DATASET}/lmdb/s2ef/{split}"


def preprocessed_is2re(split):
    return f"resources/{DATASET}/lmdb/is2re/{split}"


def preprocess_targets():
    """Every preprocessed LMDB directory of the configured dataset."""
    return [preprocessed_s2ef(s) for s in s2ef_splits()] + [
        preprocessed_is2re(s) for s in is2re_splits()
    ]


PREPROCESS = config["preprocess"]


def preprocess_options(ref_energy):
    """Command-line options of `python -m graphpar.preprocess` from the preprocess config."""
    options = [
        f"--cutoff {PREPROCESS['cutoff']}",
        f"--max-neighbors {PREPROCESS['max_neighbors']}",
        f"--store-triplets {PREPROCESS['store_triplets']}",
        f"--triplet-budget-gb {PREPROCESS['triplet_budget_gb']}",
    ]
    if ref_energy:
        options.append("--ref-energy")
    return " ".join(options)


# ---- training ---------------------------------------------------------------------------------

EXPERIMENT = config["experiment"]
RESULTS = f"results/{EXPERIMENT}"


def train_split_dir(run, split):
    """A training run's split name -> its preprocessed folder (task s2ef or is2re)."""
    task = config["train"][run].get("task", "s2ef")
    known = s2ef_splits() if task == "s2ef" else is2re_splits()
    if split not in known:
        raise ValueError(
            f"config train.{run}: split {split!r} is not a {task} split of this dataset "
            f"(known: {', '.join(known)})"
        )
    return f"resources/{DATASET}/lmdb/{task}/{split}"


def train_config(run):
    """The full graphpar.training config of a run: split names resolved to folders, validated."""
    run_config = dict(config["train"][run])
    run_config["train"] = [train_split_dir(run, split) for split in run_config["train"]]
    if run_config.get("val") is not None:
        run_config["val"] = train_split_dir(run, run_config["val"])
    try:
        return load_config(run_config)
    except TrainingError as error:
        raise ValueError(f"config train.{run}: {error}") from None


TRAIN = {run: train_config(run) for run in config["train"]}  # every run checked at startup


def train_inputs(wildcards):
    """Datasets, and the checkpoint a fine-tuning run starts from (e.g. another run's)."""
    run_config = TRAIN[wildcards.run]
    inputs = run_config["train"] + ([run_config["val"]] if run_config["val"] else [])
    if run_config["init_checkpoint"]:
        inputs.append(run_config["init_checkpoint"])
    return inputs


def checkpoint(run):
    return f"{RESULTS}/checkpoints/{run}/final.pt"


def train_targets():
    return [checkpoint(run) for run in TRAIN]


# ---- evaluation -------------------------------------------------------------------------------


def val_and_test(splits):
    """The splits among `splits` that evaluation may run on: val_* and test_*."""
    return [split for split in splits if split.startswith(("val_", "test_"))]


def evaluated(splits):
    """The val and test splits among `splits`, limited to config evaluate.splits if set."""
    chosen = config["evaluate"]["splits"]
    return [split for split in val_and_test(splits) if chosen is None or split in chosen]


def s2ef_eval_splits():
    """S2EF splits every S2EF run is evaluated on (test splits with hidden labels: predictions)."""
    return evaluated(s2ef_splits())


def s2ef_metrics(run, split):
    return f"{RESULTS}/metrics/{run}/s2ef_{split}.json"


def relax_processes():
    """torchrun processes of a relaxation job: G x D of config evaluate."""
    return config["evaluate"]["gp_size"] * config["evaluate"]["dp_size"]


def relax_splits():
    """IS2RE/IS2RS splits every force model relaxes (hidden labels: predictions only)."""
    return evaluated(is2re_splits())


def relax_metrics(run, split):
    return [f"{RESULTS}/metrics/{run}/{task}_{split}.json" for task in ("is2rs", "is2re")]


def evaluate_targets():
    force_runs = [run for run, run_config in TRAIN.items() if run_config["task"] == "s2ef"]
    targets = [s2ef_metrics(run, split) for run in force_runs for split in s2ef_eval_splits()]
    for run in force_runs:
        for split in relax_splits():
            targets += relax_metrics(run, split)
    return targets


def check_evaluate_splits():
    """Splits named in evaluate.splits exist in the configured dataset (S2EF or IS2RE), and some
    run is evaluated on them: otherwise the workflow would plan no evaluation and succeed."""
    chosen = config["evaluate"]["splits"]
    if not chosen:  # null: every val and test split; []: none
        return
    known = val_and_test(dict.fromkeys(s2ef_splits() + is2re_splits()))
    unknown = [split for split in chosen if split not in known]
    if unknown:
        names = ", ".join(map(repr, unknown))
        what = "is not a val or test split" if len(unknown) == 1 else "are not val or test splits"
        raise ValueError(
            f"config evaluate.splits: {names} {what} of the {DATASET} dataset "
            f"(known: {', '.join(known) or 'none'})"
        )
    if not any(run_config["task"] == "s2ef" for run_config in TRAIN.values()):
        raise ValueError(
            f"config evaluate.splits: {', '.join(chosen)}, but no run of config train has "
            "task s2ef: nothing to evaluate them with"
        )


check_evaluate_splits()


def all_targets():
    return data_targets() + preprocess_targets() + train_targets() + evaluate_targets()


# ---- OC20 archives ---------------------------------------------------------------------------

OC20_S2EF_SPLITS = [
    split
    for archive in oc20.CATALOGUE.values()
    if archive.layout == "s2ef"
    for split in archive.splits
]


def oc20_archive_path(archive):
    return f"resources/oc20/downloads/{archive.filename}"


def oc20_download_name(wildcards):
    return oc20.archive_by_filename(wildcards.filename).name


def oc20_s2ef_archive(wildcards):
    return oc20_archive_path(oc20.archive_for_split("s2ef", wildcards.split))


def oc20_s2ef_name(wildcards):
    return oc20.archive_for_split("s2ef", wildcards.split).name


def unless_kept(path):
    """Downloaded archives are deleted after extraction unless dataset.oc20.keep_archives."""
    return path if OC20["keep_archives"] else temp(path)


# ---- cluster ----------------------------------------------------------------------------------
# How a torchrun job (training, scaling) is shaped for a scheduler: SLURM through
# workflow/profiles/slurm; shapes in config/README.md. One node: one task running
# `torchrun --standalone`. Several nodes (a run's `nodes`): one task per node, started by `srun`
# through the SLURM plugin's MPI path, each a torchrun agent; the agents meet at a c10d
# rendezvous on the job's first node. These helpers take a run's validated config.

RDZV_PORT = 29500  # + job id modulo 10000, so jobs sharing a first node use different ports


def launch_processes(run_config):
    """torchrun processes of a run: G x D (D defaults to 1 in the workflow)."""
    return run_config["gp_size"] * (run_config["dp_size"] or 1)


def processes_per_node(run_config):
    """torchrun processes (GPUs) on each node: G x D / nodes."""
    return launch_processes(run_config) // run_config["nodes"]


def cpus_per_node(run_config):
    """Each process (GPU) gets one CPU plus one per DataLoader worker."""
    return processes_per_node(run_config) * (1 + run_config["num_workers"])


def gpus_per_node(run_config):
    """A SLURM --gres request: a GPU per process, none for a run pinned to the CPU."""
    if run_config["device"] == "cpu":
        return ""
    return f"gpu:{processes_per_node(run_config)}"


def mpi_launcher(run_config):
    """The plugin's MPI launcher (resources.mpi) for multi-node runs; none on one node."""
    return "srun" if run_config["nodes"] > 1 else ""


# A rule's shell: `{resources.mpi} {params.srun}torchrun {params.torchrun} -m ...`.
def srun_options(run_config):
    """srun's options on several nodes (one torchrun per task), with a trailing space; none on
    one node."""
    nodes = run_config["nodes"]
    if nodes == 1:
        return ""
    cpus = cpus_per_node(run_config)
    return f"--ntasks={nodes} --cpus-per-task={cpus} --kill-on-bad-exit=1 --label "


def torchrun_options(run_config):
    """torchrun's options: standalone on one node, else a c10d rendezvous. The batch script runs
    on the first node of the allocation, so its hostname (expanded there, before srun) is the
    rendezvous host."""
    nodes, per_node = run_config["nodes"], processes_per_node(run_config)
    if nodes == 1:
        return f"--standalone --nproc_per_node={per_node}"
    return (
        f"--nnodes={nodes} --nproc_per_node={per_node} --rdzv_backend=c10d"
        f" --rdzv_endpoint=$(hostname):$(({RDZV_PORT} + SLURM_JOB_ID % 10000))"
        " --rdzv_id=$SLURM_JOB_ID"
    )


def requires_slurm(name, run_config):
    """A shell guard: a multi-node run started outside SLURM stops with the reason."""
    if run_config["nodes"] == 1:
        return ""
    message = (
        f"{name} has nodes: {run_config['nodes']}: multi-node runs need a SLURM allocation "
        "(snakemake --profile workflow/profiles/slurm), or set nodes: 1"
    )
    return f'[ -n "${{SLURM_JOB_ID:-}}" ] || {{ echo "{message}" >&2; exit 1; }}; '


def check_layout(name, run_config):
    processes, nodes = launch_processes(run_config), run_config["nodes"]
    if processes % nodes:
        raise ValueError(
            f"config {name}: G x D = {processes} processes do not split evenly over "
            f"nodes: {nodes}"
        )


for _run, _run_config in TRAIN.items():  # every run's node layout checked at startup
    check_layout(f"train.{_run}", _run_config)


# The scaling study (config/paper/scaling.yaml): throughput runs, validated like training runs.
SCALING = config["scaling"]


def scaling_config(run):
    """A scaling run's graphpar.training config: S2EF split names resolved to folders."""
    run_config = dict(SCALING["runs"][run])
    for split in run_config["train"]:
        if split not in s2ef_splits():
            raise ValueError(
                f"config scaling.runs.{run}: {split!r} is not an S2EF split of this dataset "
                f"(known: {', '.join(s2ef_splits())})"
            )
    run_config["train"] = [preprocessed_s2ef(split) for split in run_config["train"]]
    # The trainer's config wants a length; a scaling run's is its warmup and measured steps.
    run_config.setdefault("max_steps", SCALING["warmup"] + SCALING["steps"])
    try:
        run_config = load_config(run_config)
    except TrainingError as error:
        raise ValueError(f"config scaling.runs.{run}: {error}") from None
    check_layout(f"scaling.runs.{run}", run_config)
    return run_config


SCALING_RUNS = {run: scaling_config(run) for run in SCALING["runs"]}


def scaling_result(run):
    return f"{RESULTS}/scaling/{run}.json"


def scaling_targets():
    return [scaling_result(run) for run in SCALING_RUNS]


# ---- report -----------------------------------------------------------------------------------
# The report reads results only. Its inputs are found when the DAG is built (globbed over every
# experiment under results/) and given as the run folders that hold them (metrics/<run>/,
# predictions/<run>/): no rule outputs a folder, so Snakemake never links a report job to the
# jobs that wrote those files, and `snakemake --cores 1 report` regenerates every table and
# figure from cached results, even when checkpoints and data are gone and rules or config have
# changed since (a file's own path would make its job's params and code rerun triggers count).
# A folder's mtime changes whenever a file in it is replaced (every result is written by an
# atomic rename), so the report still reruns when a result changes.

from graphpar.report import FIGURES, TABLES, sources  # noqa: E402

# The published numbers and the committed benchmarks travel with the code, not the working
# directory (a run in another directory, e.g. the tests', plots the checkout's benchmarks).
PAPER = str(Path(workflow.basedir) / "results" / "paper")
REPORT_BENCHMARKS = str(
    sources.benchmark_dir(Path("results"), fallback=Path(workflow.basedir) / "results/benchmarks")
)
REPORT_CODE = f"{SRC}/graphpar/report"


def folders(paths):
    """The folders holding `paths` (see above: folders, not files, are the report's inputs)."""
    return sorted({str(Path(path).parent) for path in paths})


def figure_data(figure):
    """The inputs of figure `figure`: folders of results, or files no rule writes."""
    results = Path("results")
    if figure == "learning_curves":
        curves = sources.curve_files(results)
        # Old results keep the curve only in the checkpoint folder: a file no rule outputs.
        return folders([c for c in curves if c.name == "training.jsonl"]) + [
            str(c) for c in curves if c.name != "training.jsonl"
        ]
    if figure == "parity":
        return folders(sources.prediction_files(results, "s2ef"))
    if figure == "threshold_curves":
        return folders(sources.prediction_files(results, "is2rs"))
    if figure == "gp_scaling":
        scaling = folders(sources.scaling_files(results))
        return scaling or [str(p) for p in sorted(Path(REPORT_BENCHMARKS).glob("*.json"))]
    if figure == "mae_vs_params":
        paper = [f"{PAPER}/table1.csv", f"{PAPER}/models.csv"]
        return folders(sources.metrics_files(results, "s2ef")) + paper
    raise ValueError(f"unknown figure {figure!r}")


def report_table_inputs(wildcards):
    task = sources.paper_meta(PAPER)[wildcards.table]["task"]
    return {
        "metrics": folders(sources.metrics_files(Path("results"), task)),
        "paper": [f"{PAPER}/{wildcards.table}.csv", f"{PAPER}/tables.json", f"{PAPER}/models.csv"],
        "code": [f"{REPORT_CODE}/tables.py", f"{REPORT_CODE}/sources.py"],
    }


def report_figure_inputs(wildcards):
    return {
        "data": figure_data(wildcards.figure),
        "code": [f"{REPORT_CODE}/figures.py", f"{REPORT_CODE}/sources.py"],
    }


def report_config_path():
    return f"results/report/{EXPERIMENT}.config.yaml"


def report_targets():
    """Every table (md, csv, tex), every figure (png, pdf, csv) and the config used."""
    tables = [f"results/tables/{t}.{ext}" for t in TABLES for ext in ("md", "csv", "tex")]
    figures = [f"results/figures/{f}.{ext}" for f in FIGURES for ext in ("png", "pdf", "csv")]
    return tables + figures + [report_config_path()]
