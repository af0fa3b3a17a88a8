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


def all_targets():
    return data_targets() + preprocess_targets()


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
