# Helpers shared by the workflow's modules: config validation, paths, targets.
import json
import math
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

from graphpar.training.config import TrainingError, load_config, val_batch_per_group  # noqa: E402
from graphpar.data import mini, oc20  # noqa: E402
from graphpar.model_configs import tiny_widths  # noqa: E402 (plain data, no torch)

validate(config, "../schemas/config.schema.yaml")


# ---- rehearsal --------------------------------------------------------------------------------
# config/rehearsal.yaml after a paper config: the same runs in miniature (schema, "rehearsal").


def rehearsed(run_config, rehearsal, experiment):
    """A training or scaling run in miniature (schema, "rehearsal")."""
    run_config = dict(run_config)
    dp_size = min(run_config.get("dp_size") or 1, rehearsal["dp_size"])
    # OC20's training sets (train_all, train_20M, md, ...) are the embedded data's `train`.
    splits = [(split if split in mini.SPLITS else "train") for split in run_config["train"]]
    init = run_config.get("init_checkpoint")
    if init and init.startswith(f"results/{experiment}/"):
        init = f"results/{experiment}-rehearsal/{init.removeprefix(f'results/{experiment}/')}"
    run_config.update(
        train=list(dict.fromkeys(splits)),
        model_args={**run_config.get("model_args", {}), **tiny_widths(run_config["model"])},
        dp_size=dp_size,
        batch_size=rehearsal["batch_per_group"] * dp_size,
        val_batch_size=rehearsal["batch_per_group"] * dp_size,
        max_steps=rehearsal["steps"],
        eval_every=rehearsal["steps"],
        checkpoint_every=rehearsal["steps"],
        num_workers=0,
    )
    if init:
        run_config["init_checkpoint"] = init
    run_config.pop("gpu_days", None)
    return run_config


def rehearse(config):
    """Turn `config` into its rehearsal (in place)."""
    rehearsal, experiment = config["rehearsal"], config["experiment"]
    if config["dataset"]["source"] != "mini":
        raise ValueError(
            "config rehearsal: a rehearsal runs on the embedded data (dataset.source: mini, as "
            "config/rehearsal.yaml sets it); give config/rehearsal.yaml after the paper config"
        )
    config["experiment"] = f"{experiment}-rehearsal"
    for run, run_config in config["train"].items():
        config["train"][run] = rehearsed(run_config, rehearsal, experiment)
    scaling = config["scaling"]
    for run, run_config in scaling["runs"].items():
        scaling["runs"][run] = rehearsed(run_config, rehearsal, experiment)
    scaling.update(warmup=1, steps=1)
    if config["train"]:
        config["evaluate"]["splits"] = rehearsal["splits"]


if "rehearsal" in config:
    rehearse(config)


DATASET = config["dataset"]["source"]
DATASET_NAME = config["dataset"]["name"] or DATASET
if DATASET == "oc20" and DATASET_NAME != "oc20":
    raise ValueError(
        f"config dataset.name: {DATASET_NAME!r}, but OC20 always lives in resources/oc20 "
        "(dataset.name names embedded datasets only; leave it null)"
    )
RAW = f"resources/{DATASET_NAME}"  # raw data root; layout in config/README.md
# The embedded dataset generate_mini writes: the configured one (an OC20 config has none).
MINI = RAW if DATASET == "mini" else "resources/mini"
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
    if not OC20["is2re"]:
        return []
    splits = oc20.CATALOGUE["is2re"].splits
    return [s for s in splits if OC20["is2re_train"] or not s.startswith("train")]


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
    return f"{RAW}/lmdb/s2ef/{split}"


def preprocessed_is2re(split):
    return f"{RAW}/lmdb/is2re/{split}"


def preprocess_targets():
    """Every preprocessed LMDB directory of the configured dataset."""
    return [preprocessed_s2ef(s) for s in s2ef_splits()] + [
        preprocessed_is2re(s) for s in is2re_splits()
    ]


PREPROCESS = config["preprocess"]


def preprocess_options(ref_energy):
    """Command-line options of `python -m graphpar.preprocess` (a plan's settings) from the
    preprocess config."""
    options = [
        f"--cutoff {PREPROCESS['cutoff']}",
        f"--max-neighbors {PREPROCESS['max_neighbors']}",
        f"--graph-convention {PREPROCESS['graph_convention']}",
        f"--storage {PREPROCESS['storage']}",
        f"--store-triplets {PREPROCESS['store_triplets']}",
        f"--triplet-budget-gb {PREPROCESS['triplet_budget_gb']}",
        f"--shard-frames {PREPROCESS['shard_frames']}",
    ]
    if ref_energy:
        options.append("--ref-energy")
    return " ".join(options)


def preprocess_shards(wildcards):
    """The shard files of an S2EF split, as its plan (checkpoint preprocess_plan) cuts it."""
    plan_path = checkpoints.preprocess_plan.get(split=wildcards.split).output[0]
    with open(plan_path) as plan:
        count = len(json.load(plan)["shards"])
    folder = Path(plan_path).parent
    kinds = ("lmdb", "npz")
    return [f"{folder}/data.{index:04d}.{kind}" for index in range(count) for kind in kinds]


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
    return f"{RAW}/lmdb/{task}/{split}"


def no_nodes_key(name, run_config):
    """Runs no longer say their nodes: a job's nodes follow from G x D and the site's GPUs per
    node (cluster section below), so an old config's `nodes` stops with what to do instead."""
    if "nodes" in run_config:
        raise ValueError(
            f"config {name}: nodes: {run_config['nodes']} is no longer a run key: a job spans "
            "G x D / site.gpus_per_node nodes (set site.gpus_per_node in the site profile; "
            'config/README.md, "Cluster execution")'
        )


def train_config(run):
    """The full graphpar.training config of a run: split names resolved to folders, validated;
    without gpu_days (the workflow's: TRAIN_GPU_DAYS)."""
    run_config = dict(config["train"][run])
    no_nodes_key(f"train.{run}", run_config)
    run_config.pop("gpu_days", None)
    run_config["train"] = [train_split_dir(run, split) for split in run_config["train"]]
    if run_config.get("val") is not None:
        run_config["val"] = train_split_dir(run, run_config["val"])
    try:
        return load_config(run_config)
    except TrainingError as error:
        raise ValueError(f"config train.{run}: {error}") from None


TRAIN = {run: train_config(run) for run in config["train"]}  # every run checked at startup
# Published checkpoints (section "published checkpoints" below), evaluated as force runs.
PUBLISHED = config["published"]
for _name in set(PUBLISHED) & set(TRAIN):
    raise ValueError(f"config published.{_name}: a train run has this name too; rename one")


def gpu_days(run):
    """A run's expected cost in GPU-days (config key gpu_days), or None."""
    days = config["train"][run].get("gpu_days")
    if days is not None and (isinstance(days, bool) or not isinstance(days, (int, float))):
        raise ValueError(f"config train.{run}: gpu_days must be a number of GPU-days, not {days!r}")
    if days is not None and days <= 0:
        raise ValueError(f"config train.{run}: gpu_days must be positive, not {days}")
    return days


TRAIN_GPU_DAYS = {run: gpu_days(run) for run in config["train"]}


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


def relax_splits():
    """IS2RE/IS2RS splits every force model relaxes and every energy-only model evaluates
    directly (hidden labels: predictions only)."""
    return evaluated(is2re_splits())


def relax_metrics(run, split):
    return [f"{RESULTS}/metrics/{run}/{task}_{split}.json" for task in ("is2rs", "is2re")]


def run_task(run):
    """A trained or published run's task: s2ef (a force model) or is2re (energy only)."""
    return "s2ef" if run in PUBLISHED else TRAIN[run]["task"]


def run_device(run):
    """The device a run's evaluation asks for (a published checkpoint's: auto)."""
    return "auto" if run in PUBLISHED else TRAIN[run]["device"]


def runs_of_task(task):
    """Training runs and published checkpoints of `task`: s2ef (force models: S2EF evaluation
    and relaxations) or is2re (energy-only models: direct IS2RE evaluation)."""
    return [run for run in [*TRAIN, *PUBLISHED] if run_task(run) == task]


def direct_is2re_metrics(run, split):
    """An energy-only run's IS2RE metrics (`"method": "direct"`): the path of a force run's
    relaxation metrics, and the relax rule never runs for energy-only runs (evaluate.smk)."""
    return f"{RESULTS}/metrics/{run}/is2re_{split}.json"


def evaluation_batch(run):
    """A run's S2EF or direct IS2RE evaluation batch: its validation batch per data-parallel
    group in training (what one GPU held), for each data-parallel group of the evaluation; a
    published checkpoint's `batch_size`."""
    if run in PUBLISHED:
        return PUBLISHED[run].get("batch_size", 8)
    return val_batch_per_group(TRAIN[run], TRAIN[run]["dp_size"] or 1)


def evaluate_targets():
    force_runs = runs_of_task("s2ef")
    targets = [s2ef_metrics(run, split) for run in force_runs for split in s2ef_eval_splits()]
    for run in force_runs:
        for split in relax_splits():
            targets += relax_metrics(run, split)
    for run in runs_of_task("is2re"):
        targets += [direct_is2re_metrics(run, split) for split in relax_splits()]
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
    # Force runs evaluate every split; energy-only runs (task is2re) the IS2RE ones.
    if not runs_of_task("s2ef") and not (
        runs_of_task("is2re") and any(split in is2re_splits() for split in chosen)
    ):
        raise ValueError(
            f"config evaluate.splits: {', '.join(chosen)}, but no run of config train evaluates "
            "them (task s2ef: S2EF and IS2RE splits; task is2re: IS2RE splits)"
        )


check_evaluate_splits()


def all_targets():
    targets = data_targets() + preprocess_targets() + train_targets() + evaluate_targets()
    return targets + submission_targets()


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
# How a torchrun job (training, scaling, evaluation, relaxation) is shaped for a scheduler: SLURM
# through workflow/profiles/slurm; shapes in config/README.md ("Cluster execution"). A job of G x D
# processes (one GPU each) spans nodes = G x D / site.gpus_per_node, the site's GPUs per node
# (null: any job on one node). One node: one task running `torchrun --standalone`. Several nodes:
# one task per node, started by `srun` through the SLURM plugin's MPI path, each a torchrun agent;
# the agents meet at a c10d rendezvous on the job's first node. Checked for every job when the
# workflow starts: a job that does not fit the site stops it, naming the run and the numbers.

RDZV_PORT = 29500  # + job id modulo 10000, so jobs sharing a first node use different ports


def site_gpus_per_node():
    """site.gpus_per_node as a number, or None. A profile's or the command line's `config:`
    hands Snakemake nested values as strings ("8"): the schema accepts digits, this converts."""
    value = config["site"]["gpus_per_node"]
    return None if value is None else int(value)


GPUS_PER_NODE = site_gpus_per_node()


def launch_shape(name, gp_size, dp_size, device="auto", num_workers=0):
    """The shape of a job of G x D processes on this site: a dict of `name` (the config key, for
    messages), processes, nodes, per_node (processes and GPUs per node), gpu (whether it asks
    for GPUs: not when pinned to the CPU), num_workers (DataLoader workers per process).

    A job that fits one node takes G x D of its GPUs; a larger one takes whole nodes, with every
    graph-parallel group (G consecutive ranks) inside one node: G must divide GPUs per node and
    G x D must be a multiple of it."""
    processes, per_node = gp_size * dp_size, GPUS_PER_NODE
    where = f"site.gpus_per_node = {per_node}"
    if per_node is not None and processes > per_node:
        if gp_size > per_node or per_node % gp_size:
            raise ValueError(
                f"config {name}: G = {gp_size} graph-parallel ranks do not fit in one node: "
                f"{where} is not a multiple of G (G x D = {gp_size} x {dp_size})"
            )
        if processes % per_node:
            raise ValueError(
                f"config {name}: G x D = {gp_size} x {dp_size} = {processes} processes are not "
                f"a multiple of {where}: they fill no whole number of nodes"
            )
    nodes = 1 if per_node is None or processes <= per_node else processes // per_node
    return {
        "name": name,
        "processes": processes,
        "nodes": nodes,
        "per_node": processes // nodes,
        "gpu": device != "cpu",
        "num_workers": num_workers,
    }


def run_shape(name, run_config):
    """The shape of a training or scaling run (its validated config; D defaults to 1)."""
    return launch_shape(
        name,
        run_config["gp_size"],
        run_config["dp_size"] or 1,
        run_config["device"],
        run_config["num_workers"],
    )


def cpus_per_node(shape):
    """Each process (GPU) gets one CPU plus one per DataLoader worker."""
    return shape["per_node"] * (1 + shape["num_workers"])


def gres(shape):
    """A SLURM --gres request per node: a GPU per process, none for a job pinned to the CPU."""
    return f"gpu:{shape['per_node']}" if shape["gpu"] else ""


def mpi_launcher(shape):
    """The plugin's MPI launcher (resources.mpi) for multi-node jobs; none on one node. (The
    key is always there, so the plugin never wraps the job in an `srun -n1` of its own: the
    rule's shell starts the job step, srun_options.)"""
    return "srun" if shape["nodes"] > 1 else ""


# A rule's shell: `{params.requires_slurm}{resources.mpi} {params.srun}torchrun
# {params.torchrun} -m ...`.
def srun_options(shape):
    """srun's options, with a trailing space: one task per node, each a torchrun agent. Several
    nodes: after resources.mpi's `srun`. One node: the whole `srun ...` inside a SLURM job and
    nothing outside one (local runs), so that on SLURM every torchrun is a job step, which is
    what `--signal` (the train rule's warning before the time limit, workflow/profiles/slurm)
    and `scancel --signal` reach: they signal job steps, not the batch script."""
    nodes = shape["nodes"]
    options = (
        f"--ntasks={nodes} --cpus-per-task={cpus_per_node(shape)} --kill-on-bad-exit=1 --label "
    )
    if nodes == 1:
        return f"${{SLURM_JOB_ID:+srun {options}}}"
    return options


# Preemption: the signals a torchrun agent passes on to its training processes (the trainer
# stops after the step under way, writes checkpoint.pt and exits: graphpar.training.train),
# and how long the agent then waits for them before killing them. SLURM warns 300 s before the
# time limit (the profile's --signal=USR1@300, up to a minute late); what the step under way
# leaves of that is the checkpoint's write.
PREEMPT_SIGNALS = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"  # torchrun's four, and SLURM's USR1
PREEMPT_SHUTDOWN_S = 270


def torchrun_options(shape, preemptible=False):
    """torchrun's options: standalone on one node, else a c10d rendezvous. The batch script runs
    on the first node of the allocation, so its hostname (expanded there, before srun) is the
    rendezvous host. preemptible (training): the agents pass SIGUSR1 on too and wait
    PREEMPT_SHUTDOWN_S for the checkpoint."""
    nodes, per_node = shape["nodes"], shape["per_node"]
    options = f"--nproc_per_node={per_node}"
    if nodes == 1:
        options = f"--standalone {options}"
    else:
        options = (
            f"--nnodes={nodes} {options} --rdzv_backend=c10d"
            f" --rdzv_endpoint=$(hostname):$(({RDZV_PORT} + SLURM_JOB_ID % 10000))"
            " --rdzv_id=$SLURM_JOB_ID"
        )
    if preemptible:
        options += f" --signals-to-handle={PREEMPT_SIGNALS} --shutdown-timeout={PREEMPT_SHUTDOWN_S}"
    return options


def requires_slurm(shape):
    """A shell guard: a multi-node job started outside SLURM stops with the reason."""
    if shape["nodes"] == 1:
        return ""
    message = (
        f"{shape['name']}: G x D = {shape['processes']} processes on {shape['nodes']} nodes of "
        f"{GPUS_PER_NODE} GPUs (site.gpus_per_node): multi-node jobs need a SLURM allocation "
        "(snakemake --profile workflow/profiles/slurm --profile SITE)"
    )
    return f'[ -n "${{SLURM_JOB_ID:-}}" ] || {{ echo "{message}" >&2; exit 1; }}; '


JOB_HOURS = float(config["site"]["job_hours"])  # a string from a profile's `config:`


def train_jobs(run):
    """How many jobs of site.job_hours a run takes: its gpu_days over its G x D GPUs (1 when the
    run states no gpu_days)."""
    days = TRAIN_GPU_DAYS[run]
    if days is None:
        return 1
    return math.ceil(days * 24 / TRAIN_SHAPES[run]["processes"] / JOB_HOURS)


# Every job's shape, checked at startup.
TRAIN_SHAPES = {run: run_shape(f"train.{run}", run_config) for run, run_config in TRAIN.items()}
# The train rule's resubmissions (one number for the rule: Snakemake takes no per-job value):
# the longest run's jobs - 1 to finish, plus one spare for a node failure. Inside a cluster job
# (Snakemake's remote mode) none: the rule's retries would rerun a preempted training in the
# same allocation, minutes before its time limit, instead of resubmitting it.
TRAIN_RETRIES = 0 if workflow.remote_exec else max(map(train_jobs, TRAIN), default=1)
RELAX_SHAPE = launch_shape(
    "evaluate (relaxations)", config["evaluate"]["gp_size"], config["evaluate"]["dp_size"]
)
# S2EF and direct IS2RE evaluation (evaluate.smk): the same G x D (evaluate.gp_size x
# evaluate.dp_size), each data-parallel group a shard of the split.
EVALUATE_SHAPE = launch_shape(
    "evaluate (S2EF, direct IS2RE)", config["evaluate"]["gp_size"], config["evaluate"]["dp_size"]
)


def evaluate_gres(run):
    """S2EF or direct IS2RE evaluation of a run: EVALUATE_SHAPE's GPUs per node, none when the
    run is pinned to the CPU."""
    evaluation = config["evaluate"]
    shape = launch_shape(
        EVALUATE_SHAPE["name"], evaluation["gp_size"], evaluation["dp_size"], run_device(run)
    )
    return gres(shape)


# The scaling study (config/paper/scaling.yaml): throughput runs, validated like training runs.
SCALING = config["scaling"]


def scaling_config(run):
    """A scaling run's graphpar.training config: S2EF split names resolved to folders."""
    run_config = dict(SCALING["runs"][run])
    no_nodes_key(f"scaling.runs.{run}", run_config)
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
        return load_config(run_config)
    except TrainingError as error:
        raise ValueError(f"config scaling.runs.{run}: {error}") from None


SCALING_RUNS = {run: scaling_config(run) for run in SCALING["runs"]}
SCALING_SHAPES = {
    run: run_shape(f"scaling.runs.{run}", run_config) for run, run_config in SCALING_RUNS.items()
}


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

from graphpar.report import ALL_TABLES, FIGURES, PUBLISHED_TABLE, sources  # noqa: E402

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
    if figure == "gp_learning_curves":
        curves = Path(REPORT_BENCHMARKS) / "gp_learning_curves.json"
        return [str(curves)] if curves.is_file() else []
    if figure == "mae_vs_params":
        paper = [f"{PAPER}/table1.csv", f"{PAPER}/models.csv"]
        return folders(sources.metrics_files(results, "s2ef")) + paper
    if figure in ("scaling_model", "memory_model"):  # committed predictions, no rule writes them
        prediction = Path(REPORT_BENCHMARKS) / f"{figure}.json"
        return [str(prediction)] if prediction.is_file() else []
    raise ValueError(f"unknown figure {figure!r}")


def report_table_inputs(wildcards):
    from graphpar.report import MODEL_TABLES

    if wildcards.table in MODEL_TABLES:  # committed predictions (bench/scaling_model.py)
        prediction = Path(REPORT_BENCHMARKS) / f"{wildcards.table}.json"
        return {
            "predictions": [str(prediction)] if prediction.is_file() else [],
            "code": [f"{REPORT_CODE}/tables.py", f"{REPORT_CODE}/sources.py"],
        }
    if wildcards.table == PUBLISHED_TABLE:  # ours only: no published table of the paper
        return {
            "metrics": folders(sources.metrics_files(Path("results"), "s2ef")),
            "code": [f"{REPORT_CODE}/tables.py", f"{REPORT_CODE}/sources.py"],
        }
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
    tables = [f"results/tables/{t}.{ext}" for t in ALL_TABLES for ext in ("md", "csv", "tex")]
    figures = [f"results/figures/{f}.{ext}" for f in FIGURES for ext in ("png", "pdf", "csv")]
    return tables + figures + [report_config_path()]


# GemNet runs whose config names no `scale_factors` file and that start from no init_checkpoint
# (fine-tuning keeps its checkpoint's factors) train with the factors the rule
# fit_scale_factors (train.smk) fits first: their config's `scale_factors` is set to that file
# here, before any job starts.
def fits_scale_factors(run_config):
    return (
        run_config["model"].startswith("gemnet")
        and run_config["scale_factors"] is None
        and run_config["init_checkpoint"] is None
    )


FIT_SCALE_FACTORS = {
    run: dict(run_config) for run, run_config in TRAIN.items() if fits_scale_factors(run_config)
}


def scale_factor_file(run):
    return f"{RESULTS}/scale_factors/{run}.json"


for _run in FIT_SCALE_FACTORS:
    TRAIN[_run]["scale_factors"] = scale_factor_file(_run)


def scale_factor_inputs(run):
    """The fitted scale-factor file of a run, as a train input (a named file is checked by the
    trainer when it starts: relative to the working directory, like the config's other paths)."""
    return [scale_factor_file(run)] if run in FIT_SCALE_FACTORS else []


# ---- submission -------------------------------------------------------------------------------
# OC20 leaderboard files (graphpar.submission): per run, one npz per task over the test splits
# that were evaluated: S2EF (force runs), IS2RS and IS2RE from relaxations (force runs), IS2RE
# direct (energy-only runs, task is2re).


def submission_tasks(run):
    """{task: the test splits whose predictions go into the run's submission file}."""
    if run_task(run) == "is2re":
        tasks = {"is2re": relax_splits()}
    else:
        tasks = {"s2ef": s2ef_eval_splits(), "is2rs": relax_splits(), "is2re": relax_splits()}
    tests = {task: [s for s in splits if s.startswith("test_")] for task, splits in tasks.items()}
    return {task: splits for task, splits in tests.items() if splits}


def submission_inputs(wildcards):
    splits = submission_tasks(wildcards.run).get(wildcards.task, [])
    return [f"{RESULTS}/predictions/{wildcards.run}/{wildcards.task}_{s}.npz" for s in splits]


def submission_outputs(run):
    folder = f"{RESULTS}/submissions/{run}"
    return [f"{folder}/{task}.{ext}" for task in submission_tasks(run) for ext in ("npz", "json")]


def submission_targets():
    return [path for run in [*TRAIN, *PUBLISHED] for path in submission_outputs(run)]


# ---- published checkpoints --------------------------------------------------------------------
# Checkpoints OCP published (config `published`, e.g. config/paper/published.yaml): downloaded
# (data.smk, download_checkpoint), converted (convert.smk) to the path a trained run's final.pt
# has, then evaluated, relaxed and submitted as force runs (task s2ef) are.


def published_download(name):
    return f"resources/checkpoints/{name}.pt"


def published_size_option(name):
    size = PUBLISHED[name].get("size")
    return f"--size {size}" if size else ""


def convert_options(name):
    """`python -m graphpar.convert` options of a published checkpoint."""
    entry = PUBLISHED[name]
    options = []
    if entry.get("scale_factors"):
        options.append(f"--scale-factors {entry['scale_factors']}")
    if entry.get("detached_angles") is False:
        options.append("--full-gradient-forces")
    return " ".join(options)


def published_record(name):
    """What the converted checkpoint records of its publication (URL, published numbers):
    every metrics file's provenance carries it to the report's `published` table."""
    entry = PUBLISHED[name]
    return json.dumps({"name": name, "url": entry["url"], "published": entry["published"]})
