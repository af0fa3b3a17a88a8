# Helpers shared by the workflow's modules: config validation, paths, targets.
import json
import re
import sys
from pathlib import Path

from snakemake.utils import min_version, validate

min_version("9.0")

# Jobs run this checkout's package, installed or not (e.g. inside a conda env built from envs/).
SRC = str(Path(workflow.basedir) / "src")
sys.path.insert(0, SRC)
# (Doubled braces: Snakemake formats the prefix like a shell command.)
shell.prefix(f"export PYTHONPATH={SRC}${{{{PYTHONPATH:+:$PYTHONPATH}}}}; ")

from graphpar import train as graphpar_train  # noqa: E402
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
    """The full graphpar.train config of a run: split names resolved to folders, validated."""
    run_config = dict(config["train"][run])
    run_config["train"] = [train_split_dir(run, split) for split in run_config["train"]]
    if run_config.get("val") is not None:
        run_config["val"] = train_split_dir(run, run_config["val"])
    try:
        return graphpar_train.load_config(run_config)
    except graphpar_train.TrainingError as error:
        raise ValueError(f"config train.{run}: {error}") from None


TRAIN = {run: train_config(run) for run in config["train"]}  # every run checked at startup


def train_inputs(wildcards):
    """Datasets, and the checkpoint a fine-tuning run starts from (e.g. another run's)."""
    run_config = TRAIN[wildcards.run]
    inputs = run_config["train"] + ([run_config["val"]] if run_config["val"] else [])
    if run_config["init_checkpoint"]:
        inputs.append(run_config["init_checkpoint"])
    return inputs


def train_processes(run):
    """torchrun processes: G x D (D defaults to 1 in the workflow)."""
    run_config = TRAIN[run]
    return run_config["gp_size"] * (run_config["dp_size"] or 1)


def checkpoint(run):
    return f"{RESULTS}/checkpoints/{run}/final.pt"


def train_targets():
    return [checkpoint(run) for run in TRAIN]


# ---- evaluation -------------------------------------------------------------------------------


def evaluated(splits):
    """The val and test splits among `splits`, limited to config evaluate.splits if set."""
    chosen = config["evaluate"]["splits"]
    return [
        split
        for split in splits
        if split.startswith(("val_", "test_")) and (chosen is None or split in chosen)
    ]


def s2ef_eval_splits():
    """S2EF splits every S2EF run is evaluated on (test splits with hidden labels: predictions)."""
    return evaluated(s2ef_splits())


def s2ef_metrics(run, split):
    return f"{RESULTS}/metrics/{run}/s2ef_{split}.json"


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


def all_targets():
    return data_targets() + preprocess_targets() + train_targets() + evaluate_targets()


# ---- OC20 archives ---------------------------------------------------------------------------

OC20_S2EF_SPLITS = [
    split
    for archive in oc20.CATALOGUE.values()
    if archive.kind == "s2ef"
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
