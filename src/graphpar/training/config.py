"""The training config: schema (src/graphpar/schemas/train.schema.yaml), defaults, checks, hash.

Torch-free on purpose (standard library, yaml and jsonschema only): the workflow validates every
run's config when Snakemake parses it, and Snakemake starts often (twice per SLURM job). Checks
that would need the model constructors read `MODEL_ARGUMENT_TYPES`, a static table of their
argument names and annotations that tests/test_train.py compares with the real constructors.
"""

from __future__ import annotations

import argparse
import copy
import difflib
import hashlib
import json
import os
from collections.abc import Mapping
from importlib import resources as package_files
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from graphpar.model_configs import CONFIGURATIONS

__all__ = [
    "MODEL_ARGUMENTS",
    "MODEL_ARGUMENT_TYPES",
    "RUNTIME_KEYS",
    "TrainingError",
    "add_config_arguments",
    "config_hash",
    "config_source",
    "layout_error",
    "load_config",
    "val_batch_per_group",
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
    "activation_checkpointing",  # the same operations, some run twice: the same run
    "triplet_chunk",  # a memory setting: the same results, to the rounding of chunked sums
)

# Each constructor argument of a model family and its annotation there (as a string: the models
# use `from __future__ import annotations`); `model_args` values are checked against it.
_DIMENETPP_ARGUMENTS = {
    "hidden_channels": "int",
    "out_channels": "int",
    "num_blocks": "int",
    "int_emb_size": "int",
    "basis_emb_size": "int",
    "out_emb_channels": "int",
    "num_spherical": "int",
    "num_radial": "int",
    "cutoff": "float",
    "envelope_exponent": "int",
    "num_before_skip": "int",
    "num_after_skip": "int",
    "num_output_layers": "int",
    "act": "str",
    "output_initializer": "str",
    "regress_forces": "bool",
    "output_up_bias": "bool",
    "detach_angles": "bool",
}
_GEMNET_ARGUMENTS = {
    "num_spherical": "int",
    "num_radial": "int",
    "num_blocks": "int",
    "emb_size_atom": "int",
    "emb_size_edge": "int",
    "emb_size_trip": "int",
    "emb_size_rbf": "int",
    "emb_size_cbf": "int",
    "emb_size_bil_trip": "int",
    "num_before_skip": "int",
    "num_after_skip": "int",
    "num_concat": "int",
    "num_atom": "int",
    "regress_forces": "bool",
    "direct_forces": "bool",
    "cutoff": "float",
    "max_neighbors": "int",
    "rbf": "Mapping | None",
    "envelope": "Mapping | None",
    "cbf": "Mapping | None",
    "extensive": "bool",
    "otf_graph": "bool",
    "use_pbc": "bool",
    "use_pbc_single": "bool",
    "output_init": "str",
    "activation": "str",
    "num_elements": "int",
    "num_targets": "int",
    "scale_file": "str | None",
}
# Every registered model configuration (graphpar.model_configs): its constructor's arguments,
# which `model_args` may override, with their annotations.
_FAMILY_ARGUMENTS = {"dimenetpp": _DIMENETPP_ARGUMENTS, "gemnet": _GEMNET_ARGUMENTS}
MODEL_ARGUMENT_TYPES: dict[str, dict[str, str]] = {
    name: _FAMILY_ARGUMENTS[family] for name, (family, _) in CONFIGURATIONS.items()
}
MODEL_ARGUMENTS: dict[str, frozenset[str]] = {
    model: frozenset(arguments) for model, arguments in MODEL_ARGUMENT_TYPES.items()
}
# The values (YAML/JSON types) each annotation of MODEL_ARGUMENT_TYPES accepts.
_ANNOTATION_VALUES: dict[str, tuple[type, ...]] = {
    "int": (int,),
    "float": (int, float),
    "bool": (bool,),
    "str": (str,),
    "str | None": (str, type(None)),
    "Mapping | None": (dict, type(None)),
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
    error = _model_args_error(config["model"], config["model_args"])
    if error is None and config["dp_size"] is not None:
        # The launch the workflow makes (and the one a set dp_size asks for): G x D processes.
        error = layout_error(config, config["gp_size"] * config["dp_size"])
    if error is not None:
        raise TrainingError(f"{where}: {error}")
    if config["max_steps"] is None and config["epochs"] is None:
        raise TrainingError(f"{where}: set max_steps or epochs (or both)")
    loss = config["loss"]
    if loss["energy_coefficient"] == 0 and loss["force_coefficient"] == 0:
        raise TrainingError(f"{where}: both loss coefficients are 0: nothing to train")
    if config["task"] == "is2re" and loss["force_coefficient"] > 0:
        raise TrainingError(f"{where}: task is2re has no force labels: set force_coefficient 0")
    if config["scale_factors"] is not None and "scale_file" not in MODEL_ARGUMENTS[config["model"]]:
        raise TrainingError(f"{where}: scale_factors: model {config['model']} has none (GemNet)")
    if config["scheduler"]["metric"] == "forces_mae" and loss["force_coefficient"] == 0:
        raise TrainingError(f"{where}: scheduler.metric forces_mae needs forces trained")
    if config["amp"] is not None and config["dtype"] != "float32":
        raise TrainingError(
            f"{where}: amp {config['amp']} needs dtype float32 (autocast computes in "
            f"{config['amp']} only what would be float32; dtype {config['dtype']} is left as "
            "it is): set dtype float32, or amp null"
        )
    return config


def _model_args_error(model: str, model_args: Mapping) -> str | None:
    """Why `model_args` cannot be passed to the constructor of registered model `model` (a name
    it does not take, with the nearest one it does, or a value of the wrong type), or None."""
    arguments = MODEL_ARGUMENT_TYPES[model]
    unknown = sorted(set(model_args) - set(arguments))
    if unknown:
        nearest = {name: difflib.get_close_matches(name, arguments, n=1) for name in unknown}
        hints = [
            f"{match[0]} for {name}" if len(unknown) > 1 else match[0]
            for name, match in nearest.items()
            if match
        ]
        hint = f" (did you mean {', '.join(hints)}?)" if hints else ""
        return (
            f"unknown model_args {', '.join(unknown)} for model {model}{hint}; "
            f"known: {', '.join(sorted(arguments))}"
        )
    for name, value in model_args.items():
        annotation = arguments[name]
        accepted = _ANNOTATION_VALUES[annotation]
        if not isinstance(value, accepted) or (isinstance(value, bool) and bool not in accepted):
            return f"model_args.{name} is {value!r}, not {annotation} (model {model})"
    return None


def layout_error(config: Mapping, world_size: int) -> str | None:
    """Why a training config cannot run on `world_size` processes (G must divide it, a set D must
    make it G x D, D must divide the global batch), or None. The trainer checks its torchrun
    world (parallel.setup_processes); load_config checks the G x D launch a set dp_size asks for,
    which is the workflow's, so a bad layout stops Snakemake before any job."""
    gp_size, dp_size = config["gp_size"], config["dp_size"]
    if world_size % gp_size:
        return (
            f"gp_size {gp_size} does not divide the world size {world_size}: launch "
            f"torchrun --nproc_per_node={gp_size * (dp_size or 1)} (G x D processes)"
        )
    if dp_size is not None and world_size != gp_size * dp_size:
        return (
            f"the config asks for G x D = {gp_size} x {dp_size} processes, torchrun started "
            f"{world_size}: use --nproc_per_node (x --nnodes) = {gp_size * dp_size}"
        )
    if config["batch_size"] % (world_size // gp_size):
        return f"batch_size {config['batch_size']} is not a multiple of D = {world_size // gp_size}"
    return None


def val_batch_per_group(config: Mapping, dp_size: int) -> int:
    """Systems per validation batch on one of `dp_size` data-parallel groups: the global
    `val_batch_size` shared among them (at least 1). What the trainer's validation and the
    workflow's one-process S2EF evaluation put on one GPU."""
    return max(1, config["val_batch_size"] // dp_size)


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
