"""The training config: schema (src/graphpar/schemas/train.schema.yaml), defaults, checks, hash.

Torch-free on purpose (standard library, yaml and jsonschema only): the workflow validates every
run's config when Snakemake parses it, and Snakemake starts often (twice per SLURM job). Checks
that would need the model constructors read `MODEL_ARGUMENTS`, a static table of their argument
names that tests/test_train.py compares with the real constructors.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
from collections.abc import Mapping
from importlib import resources as package_files
from pathlib import Path
from typing import Any

import jsonschema
import yaml

__all__ = [
    "MODEL_ARGUMENTS",
    "RUNTIME_KEYS",
    "TrainingError",
    "add_config_arguments",
    "config_hash",
    "config_source",
    "load_config",
]

# Keys that do not change the trajectory of a run: a checkpoint stays valid when they change.
RUNTIME_KEYS = (
    "max_steps",
    "epochs",
    "num_workers",
    "eval_every",
    "checkpoint_every",
    "log_every",
    "nodes",  # the same G x D processes on more or fewer nodes compute the same run
)

_DIMENETPP_ARGUMENTS = frozenset(
    {
        "hidden_channels",
        "out_channels",
        "num_blocks",
        "int_emb_size",
        "basis_emb_size",
        "out_emb_channels",
        "num_spherical",
        "num_radial",
        "cutoff",
        "envelope_exponent",
        "num_before_skip",
        "num_after_skip",
        "num_output_layers",
        "act",
        "output_initializer",
        "regress_forces",
    }
)
_GEMNET_ARGUMENTS = frozenset(
    {
        "num_spherical",
        "num_radial",
        "num_blocks",
        "emb_size_atom",
        "emb_size_edge",
        "emb_size_trip",
        "emb_size_rbf",
        "emb_size_cbf",
        "emb_size_bil_trip",
        "num_before_skip",
        "num_after_skip",
        "num_concat",
        "num_atom",
        "regress_forces",
        "direct_forces",
        "cutoff",
        "max_neighbors",
        "rbf",
        "envelope",
        "cbf",
        "extensive",
        "otf_graph",
        "use_pbc",
        "use_pbc_single",
        "output_init",
        "activation",
        "num_elements",
        "num_targets",
        "scale_file",
    }
)
# Every registered model configuration (graphpar.models.MODELS) and the arguments its
# constructor takes, which `model_args` may override.
MODEL_ARGUMENTS: dict[str, frozenset[str]] = {
    **dict.fromkeys(
        ("dimenetpp", "dimenetpp-large", "dimenetpp-xl", "dimenetpp-small", "dimenetpp-tiny"),
        _DIMENETPP_ARGUMENTS,
    ),
    **dict.fromkeys(
        (
            "gemnet-dt",
            "gemnet-xl",
            "gemnet-125m",
            "gemnet-245m",
            "gemnet-480m",
            "gemnet-960m",
            "gemnet-small",
            "gemnet-tiny",
        ),
        _GEMNET_ARGUMENTS,
    ),
}


class TrainingError(RuntimeError):
    """A run that cannot start or go on; the message says why and what to do."""


def _schema() -> dict:
    text = package_files.files("graphpar").joinpath("schemas/train.schema.yaml").read_text()
    return yaml.safe_load(text)


def _fill_defaults(schema: dict, value: Any) -> None:
    """Insert schema defaults for missing keys, recursively (after validation)."""
    if not isinstance(value, dict):
        return
    for key, sub in schema.get("properties", {}).items():
        if key not in value and "default" in sub:
            value[key] = copy.deepcopy(sub["default"])
        if key in value:
            _fill_defaults(sub, value[key])


def load_config(source: str | os.PathLike | Mapping) -> dict:
    """A training config (YAML file or mapping), validated, with defaults filled in."""
    if isinstance(source, Mapping):
        config, where = copy.deepcopy(dict(source)), "training config"
    else:
        path = Path(source)
        if not path.is_file():
            raise TrainingError(f"{path}: no such training config")
        config, where = yaml.safe_load(path.read_text()) or {}, str(path)
    schema = _schema()
    errors = sorted(jsonschema.Draft202012Validator(schema).iter_errors(config), key=str)
    if errors:
        details = "; ".join(
            f"{'.'.join(map(str, e.absolute_path)) or '(top level)'}: {e.message}" for e in errors
        )
        raise TrainingError(f"{where} is not a valid training config: {details}")
    _fill_defaults(schema, config)
    if config["model"] not in MODEL_ARGUMENTS:
        known = ", ".join(sorted(MODEL_ARGUMENTS))
        raise TrainingError(f"{where}: unknown model {config['model']!r}; known: {known}")
    unknown = sorted(set(config["model_args"]) - MODEL_ARGUMENTS[config["model"]])
    if unknown:
        raise TrainingError(
            f"{where}: unknown model_args {', '.join(unknown)} for model {config['model']}; "
            f"known: {', '.join(sorted(MODEL_ARGUMENTS[config['model']]))}"
        )
    if config["max_steps"] is None and config["epochs"] is None:
        raise TrainingError(f"{where}: set max_steps or epochs (or both)")
    loss = config["loss"]
    if loss["energy_coefficient"] == 0 and loss["force_coefficient"] == 0:
        raise TrainingError(f"{where}: both loss coefficients are 0: nothing to train")
    if config["task"] == "is2re" and loss["force_coefficient"] > 0:
        raise TrainingError(f"{where}: task is2re has no force labels: set force_coefficient 0")
    return config


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """--config (a YAML file) or --config-json (one JSON object, what the workflow's rules pass):
    the flags of every CLI that takes a training config (graphpar.training.train, scaling)."""
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--config", type=Path, help="the training config (YAML file)")
    source.add_argument("--config-json", help="the training config as one JSON object")


def config_source(args: argparse.Namespace) -> Path | dict:
    """What load_config reads from add_config_arguments' flags."""
    if args.config_json is None:
        return args.config
    try:
        config = json.loads(args.config_json)
    except json.JSONDecodeError as error:
        raise TrainingError(f"--config-json is not JSON: {error}") from None
    if not isinstance(config, dict):
        raise TrainingError("--config-json is not a JSON object")
    return config


def config_hash(config: Mapping) -> str:
    """sha256 of the settings that determine a run's trajectory (not its length or logging)."""
    kept = {k: v for k, v in config.items() if k not in RUNTIME_KEYS}
    return hashlib.sha256(json.dumps(kept, sort_keys=True).encode()).hexdigest()
