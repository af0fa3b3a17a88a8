"""Convert OCP/fairchem checkpoints (the published OC20 models: GemNet-dT, DimeNet++) into
graphpar checkpoints, which `python -m graphpar.evaluate`, `python -m graphpar.relax`, the ASE
calculator (`graphpar.calculator.GraphparCalculator`) and `load_trained` read as they are:

    python -m graphpar.convert gemnet_t_direct_h512_all.pt checkpoints/gemnet-dt-ocp.pt
    python -m graphpar.convert dimenetpp_all.pt checkpoints/dimenetpp-ocp.pt
    python -m graphpar.convert gemnet_t.pt gemnet-dt.pt --scale-factors gemnet-dT.json
    python -m graphpar.convert dimenetpp_all.pt dpp-full-gradient.pt --full-gradient-forces

What it reads. Both layouts fairchem reads: OCP's 2021 checkpoints (`config["model"]` the model
name, `config["model_attributes"]` its arguments, normalizers `target`/`grad_target` with
`mean`/`std`, or only `config["dataset"][0]`'s `target_mean`, `target_std`, `grad_target_mean`,
`grad_target_std`) and fairchem 1.x's (`config["model"]` a dict with `name`, normalizers
`energy`/`forces` with `mean`/`rmsd`); state-dict names behind any number of `module.` prefixes.
The file is read by torch's weights-only loader after checking every record's CRC
(`graphpar.training.checkpoint.read_verified`): tensors, containers, numbers and strings only;
a file that asks to run anything else is refused before any of it runs.

Models. `gemnet_t` becomes graphpar's GemNet (`gemnet-dt`, direct or gradient forces as the
checkpoint's `direct_forces`), `dimenetplusplus` graphpar's DimeNet++ (`dimenetpp`, forces =
-dE/dpos), with the checkpoint's arguments and fairchem's defaults for those it leaves out.
Arguments that only describe how fairchem builds its graphs or are unused (`otf_graph: false`,
`use_pbc: true`, `num_atoms`, `bond_feat_dim`, a `scale_file` path, ...) are dropped and listed
in the converted checkpoint's `notes`; one that changes the computation and that graphpar lacks
is an error naming it.
* GemNet's scale factors come from the state dict, a 1.x checkpoint's `scale_dict`, and
  `--scale-factors` (the reference's JSON scale file, read by
  `graphpar.models.gemnet.read_scale_factors`); values given twice must agree.
* DimeNet++: OCP measures triplet angles on detached positions, so its forces leave out the
  derivatives through the angles; its published models were trained and scored with those forces.
  The converted model does the same (`detach_angles`) unless `--full-gradient-forces`
  (`detached_angles=False`): forces are then the full -dE/dpos (energies are the same).
* EMA: a checkpoint with an `ema` entry (fairchem's ExponentialMovingAverage: `shadow_params`
  in parameter order) is converted with its EMA weights, the ones fairchem evaluates with.

Outputs. fairchem reports energy * std + mean and forces * force std with the checkpoint's
normalizers; graphpar's `Normalized` applies one std to both. With a different force std, a
direct-force GemNet gets the ratio folded into its force heads (`out_forces`); a gradient-force
model cannot, and is refused (OC20's checkpoints use one std for both).

Graphs. The converted checkpoint records the graphs the published model was trained on: OC20's
S2EF/IS2RE LMDBs (cutoff and max_neighbors of the model, 6 A and 50; adsorption energies),
built by fairchem's `AtomsToGraphs`: graph convention `fairchem`. Evaluate it on data
preprocessed with `--graph-convention fairchem` (workflow: `preprocess.graph_convention:
fairchem`); data of the graphpar convention is refused as a data mismatch, like another
cutoff. Relaxations and the calculator rebuild graphs with the recorded convention.

The converted checkpoint also records `source` (file name, its sha256, layout, model name, and
with `--published JSON` the publication the workflow names: URL and published numbers; evaluation
copies `source` into every metrics file's provenance) and `notes`. `--dtype float64` converts for
float64 inference (weights kept exactly).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from graphpar.models import dimenetpp, gemnet
from graphpar.models.blocks import unwrapped
from graphpar.training.checkpoint import RunState, read_verified, write_checkpoint
from graphpar.training.config import TrainingError, load_config
from graphpar.training.normalization import Normalized, build_normalized_model
from graphpar.training.step import DTYPES

__all__ = [
    "FAIRCHEM_GLOBALS",
    "SUPPORTED_MODELS",
    "checkpoint_layout",
    "convert_checkpoint",
    "main",
    "read_fairchem_checkpoint",
]

# What OCP/fairchem checkpoints hold beyond torch's own weights-only allow-list: nothing
# (tensors, dicts, lists, numbers, strings; the optimiser state is torch's own).
FAIRCHEM_GLOBALS: list = []

# fairchem model name -> graphpar's registered configuration.
SUPPORTED_MODELS = {"gemnet_t": "gemnet-dt", "dimenetplusplus": "dimenetpp"}

# fairchem's constructor defaults (`GemNetT`, `DimeNetPlusPlusWrap`), for the arguments a
# checkpoint's config may leave out. None: required, no default.
_GEMNET_DEFAULTS: dict[str, Any] = {
    **dict.fromkeys(
        (
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
        )
    ),
    "regress_forces": True,
    "direct_forces": False,
    "cutoff": 6.0,
    "max_neighbors": 50,
    "rbf": {"name": "gaussian"},
    "envelope": {"name": "polynomial", "exponent": 5},
    "cbf": {"name": "spherical_harmonics"},
    "extensive": True,
    "output_init": "HeOrthogonal",
    "activation": "swish",
    "num_elements": 83,
    "num_targets": 1,
}
_DIMENETPP_DEFAULTS: dict[str, Any] = {
    "regress_forces": True,
    "hidden_channels": 128,
    "num_blocks": 4,
    "int_emb_size": 64,
    "basis_emb_size": 8,
    "out_emb_channels": 256,
    "num_spherical": 7,
    "num_radial": 6,
    "cutoff": 10.0,
    "envelope_exponent": 5,
    "num_before_skip": 1,
    "num_after_skip": 2,
    "num_output_layers": 3,
}
# fairchem's DimeNet++ caps its graphs at 50 neighbours (a constant of DimeNetPlusPlusWrap).
_DIMENETPP_MAX_NEIGHBORS = 50
# Arguments of either model that do not change what it computes from a given graph: dropped,
# with a note. (`use_pbc: false` and `otf_graph: true` do change it: refused.)
_DROPPED = {
    "num_atoms": "unused by fairchem",
    "bond_feat_dim": "unused by fairchem",
    "otf_graph": "graphs come from the data (fairchem convention)",
    "use_pbc": "periodic graphs come from the data",
    "use_pbc_single": "how fairchem batches its on-the-fly graphs",
    "scale_file": "scale factors come from the checkpoint or --scale-factors",
    "num_targets": "one energy per structure",
}
_REFUSED = {
    "use_pbc": (False, "non-periodic edge vectors (use_pbc: false)"),
    "otf_graph": (True, "graphs rebuilt on the fly by fairchem's radius_graph_pbc (otf_graph)"),
}


def read_fairchem_checkpoint(path: Path) -> dict:
    """An OCP/fairchem checkpoint, verified and unpickled without running any of its code
    (`read_verified` with `FAIRCHEM_GLOBALS`); TrainingError unless it holds a `state_dict` and
    a `config`."""
    state = read_verified(path, FAIRCHEM_GLOBALS, kind="OCP/fairchem checkpoint")
    if not isinstance(state, dict) or not {"state_dict", "config"} <= set(state):
        raise TrainingError(f"{path} is not an OCP/fairchem checkpoint (no state_dict and config)")
    return state


def checkpoint_layout(state: Mapping) -> str:
    """ "ocp-2021" (`config["model"]` a name, arguments in `model_attributes`) or
    "fairchem-1" (`config["model"]` a dict with `name`)."""
    model = state["config"].get("model")
    if isinstance(model, str):
        return "ocp-2021"
    if isinstance(model, Mapping) and isinstance(model.get("name"), str):
        return "fairchem-1"
    raise TrainingError(f"config.model is {model!r}: neither a model name nor a dict with a name")


def _model_name_and_arguments(state: Mapping, layout: str) -> tuple[str, dict]:
    config = state["config"]
    if layout == "ocp-2021":
        return config["model"], dict(config.get("model_attributes") or {})
    arguments = dict(config["model"])
    return arguments.pop("name"), arguments


def _strip_prefixes(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """State-dict names without their `module.` prefixes (DataParallel, DistributedDataParallel
    and fairchem's wrappers each add one)."""
    return {unwrapped(key): value for key, value in state_dict.items()}


def _graphpar_arguments(
    name: str, arguments: Mapping, detached_angles: bool | None, notes: list[str]
) -> dict:
    """graphpar's constructor arguments for fairchem model `name` with `arguments` (fairchem's
    defaults for the missing ones); dropped arguments are noted, unsupported ones raise."""
    defaults = _GEMNET_DEFAULTS if name == "gemnet_t" else _DIMENETPP_DEFAULTS
    for key, (value, what) in _REFUSED.items():
        if key in arguments and arguments[key] == value:
            raise TrainingError(f"{name}: {key}={value!r} is not supported: {what}")
    unknown = sorted(set(arguments) - set(defaults) - set(_DROPPED))
    if unknown:
        raise TrainingError(
            f"{name}: unsupported arguments {', '.join(unknown)} (graphpar's model has no such "
            f"setting); supported: {', '.join(sorted(defaults))}"
        )
    if arguments.get("num_targets", 1) != 1:
        raise TrainingError(f"{name}: num_targets={arguments['num_targets']!r}: one energy only")
    for key in sorted(set(arguments) & set(_DROPPED) - set(defaults)):
        notes.append(f"dropped {key}={arguments[key]!r} ({_DROPPED[key]})")
    missing = sorted(
        key for key, value in defaults.items() if value is None and key not in arguments
    )
    if missing:
        raise TrainingError(f"{name}: the checkpoint's config lacks {', '.join(missing)}")
    result = {key: arguments.get(key, default) for key, default in defaults.items()}
    if name == "dimenetplusplus":
        result.update(out_channels=1, act="swish", output_up_bias=True)
        result["detach_angles"] = detached_angles is not False
        if result["detach_angles"]:
            notes.append("detach_angles: forces without the angles' derivatives, as fairchem's")
    return result


def _normalizers(state: Mapping) -> dict[str, float]:
    """The checkpoint's energy mean and std and force mean and std, as fairchem's trainer applies
    them: `normalizers` (2021: target/grad_target with mean/std; 1.x: energy/forces with
    mean/rmsd), else `config["dataset"][0]`'s target_mean/std, grad_target_mean/std, else none
    (mean 0, std 1)."""
    given = state.get("normalizers") or {}
    energy = given.get("target") or given.get("energy")
    forces = given.get("grad_target") or given.get("forces")
    if energy is not None:
        forces = forces or {"mean": 0.0, "std": _std(energy)}
        return {
            "energy_mean": float(energy["mean"]),
            "energy_std": _std(energy),
            "force_mean": float(forces["mean"]),
            "force_std": _std(forces),
        }
    dataset = state["config"].get("dataset")
    first = dataset[0] if isinstance(dataset, list) and dataset else dataset or {}
    if isinstance(first, Mapping) and first.get("normalize_labels") and "target_std" in first:
        std = float(first["target_std"])
        return {
            "energy_mean": float(first.get("target_mean", 0.0)),
            "energy_std": std,
            "force_mean": float(first.get("grad_target_mean", 0.0)),
            "force_std": float(first.get("grad_target_std", std)),
        }
    return {"energy_mean": 0.0, "energy_std": 1.0, "force_mean": 0.0, "force_std": 1.0}


def _std(normalizer: Mapping) -> float:
    value = normalizer["std"] if "std" in normalizer else normalizer["rmsd"]
    return float(value)


def _ema_weights(state: Mapping, model: torch.nn.Module, names: list[str]) -> dict | None:
    """{our parameter name: EMA weight} of a checkpoint whose `ema` holds fairchem's shadow
    parameters (one per trainable parameter, in fairchem's parameter order: the state dict's
    order with buffers and aliases left out), or None without an EMA."""
    ema = state.get("ema")
    if not isinstance(ema, Mapping) or ema.get("shadow_params") is None:
        return None
    shadow = list(ema["shadow_params"])
    trainable = {key for key, p in model.named_parameters() if p.requires_grad}
    order = list(dict.fromkeys(name for name in names if name in trainable))
    if len(order) != len(shadow):
        raise TrainingError(
            f"the checkpoint's EMA has {len(shadow)} shadow parameters, the model "
            f"{len(order)} trainable ones"
        )
    parameters = dict(model.named_parameters())
    for name, value in zip(order, shadow, strict=True):
        if tuple(value.shape) != tuple(parameters[name].shape):
            raise TrainingError(f"EMA shadow of {name}: shape {tuple(value.shape)}")
    return dict(zip(order, shadow, strict=True))


def _load_gemnet(
    model: gemnet.GemNetT,
    weights: dict[str, torch.Tensor],
    state: Mapping,
    scale_factors: Path | None,
) -> None:
    """fairchem GemNet weights (and EMA weights, by our names) into `model`, with the scale
    factors of the state dict, the checkpoint's `scale_dict` and the `scale_factors` file."""
    given = dict(state.get("scale_dict") or {})
    if scale_factors is not None:
        try:
            from_file = gemnet.read_scale_factors(scale_factors)
        except ValueError as error:
            raise TrainingError(str(error)) from error
        for key, value in from_file.items():
            if key in given and float(given[key]) != float(value):
                raise TrainingError(
                    f"scale factor {key}: {value} in {scale_factors}, {given[key]} in the "
                    "checkpoint's scale_dict"
                )
            given[key] = value
    try:
        gemnet.load_fairchem_state_dict(model, weights, given)
    except (KeyError, ValueError, RuntimeError) as error:
        raise TrainingError(f"gemnet_t weights: {error}") from error


def _load_dimenetpp(model: dimenetpp.DimeNetPlusPlus, weights: dict[str, torch.Tensor]) -> None:
    try:
        dimenetpp.load_fairchem_state_dict(model, weights)
    except (ValueError, RuntimeError) as error:
        raise TrainingError(f"dimenetplusplus weights: {error}") from error


def _fold_force_std(model: torch.nn.Module, stats: Mapping[str, float], notes: list[str]) -> None:
    """Make `Normalized` (one std) give forces * force std: a direct-force GemNet's force heads
    are scaled by force std / energy std; refused for gradient forces (then forces must be the
    gradient of the energy, one std)."""
    if stats["force_mean"] != 0:
        raise TrainingError(f"force normalizer mean {stats['force_mean']}: forces have mean 0")
    ratio = stats["force_std"] / stats["energy_std"]
    if ratio == 1:
        return
    if not getattr(model, "direct_forces", False):
        raise TrainingError(
            f"force std {stats['force_std']} differs from energy std {stats['energy_std']}: a "
            "gradient-force model answers forces with the energy's std"
        )
    with torch.no_grad():
        for block in model.out_blocks:
            block.out_forces.weight.mul_(ratio)
    notes.append(f"force heads scaled by force std / energy std = {ratio!r}")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _run_config(
    registered: str, arguments: dict, state: Mapping, stats: Mapping, dtype: str, source: Path
) -> dict:
    """A graphpar training config (validated, defaults filled) that describes the converted
    model: its model and arguments, dtype, normalisation, loss, and the source's data and task."""
    config = state["config"]
    task_settings = config.get("task") or {}
    is2re = task_settings.get("dataset") == "single_point_lmdb" or not arguments["regress_forces"]
    optim = config.get("optim") or {}
    dataset = config.get("dataset")
    first = dataset[0] if isinstance(dataset, list) and dataset else dataset
    train = first.get("src") if isinstance(first, Mapping) else None
    return load_config(
        {
            "model": registered,
            "model_args": arguments,
            "task": "is2re" if is2re else "s2ef",
            "train": [str(train) if train else f"ocp:{source.name}"],
            "max_steps": max(1, int(state.get("step") or 1)),
            "dtype": dtype,
            "normalization": {
                "enabled": True,
                "energy_mean": stats["energy_mean"],
                "energy_std": stats["energy_std"],
            },
            "loss": {
                "energy_coefficient": float(optim.get("energy_coefficient", 1)),
                "force_coefficient": 0.0 if is2re else float(optim.get("force_coefficient", 100)),
            },
        }
    )


def convert_checkpoint(
    source: Path,
    output: Path,
    scale_factors: Path | None = None,
    detached_angles: bool | None = None,
    dtype: str = "float32",
    publication: Mapping | None = None,
) -> dict:
    """Convert the OCP/fairchem checkpoint `source` into the graphpar checkpoint `output`
    (written atomically by `write_checkpoint`) and return what was written.

    `scale_factors`: a GemNet scale file (the reference's JSON) for factors the checkpoint lacks
    (those it has must agree). `detached_angles`: DimeNet++ only; None or True reproduces
    fairchem's forces (angles on detached positions), False gives the full gradient. `dtype`:
    the converted model's ("float32" or "float64"). `publication`: JSON values recorded as
    `source["publication"]` (the workflow's URL and published numbers). Raises TrainingError
    naming what cannot be converted (module docstring); nothing is written then.
    """
    source, output = Path(source), Path(output)
    if dtype not in DTYPES:
        raise TrainingError(f"dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    state = read_fairchem_checkpoint(source)
    layout = checkpoint_layout(state)
    name, fairchem_arguments = _model_name_and_arguments(state, layout)
    if name not in SUPPORTED_MODELS:
        raise TrainingError(
            f"{source}: model {name!r} cannot be converted; supported: "
            f"{', '.join(sorted(SUPPORTED_MODELS))}"
        )
    if name == "gemnet_t" and detached_angles is not None:
        raise TrainingError("detached_angles is a DimeNet++ option; this is a gemnet_t checkpoint")
    if name == "dimenetplusplus" and scale_factors is not None:
        raise TrainingError("scale_factors: DimeNet++ has none; this is a dimenetplusplus one")

    notes: list[str] = []
    arguments = _graphpar_arguments(name, fairchem_arguments, detached_angles, notes)
    stats = _normalizers(state)
    config = _run_config(SUPPORTED_MODELS[name], arguments, state, stats, dtype, source)
    model = build_normalized_model(config, stats, scale_factors=False).to(DTYPES[dtype])
    weights = _strip_prefixes(state["state_dict"])
    ema = _ema_weights(state, model.model, [_our_name(name, key) for key in weights])
    if ema is not None:
        notes.append(f"EMA weights (decay {state['ema'].get('decay')})")
    if name == "gemnet_t":
        _load_gemnet(model.model, weights, state, scale_factors)
    else:
        _load_dimenetpp(model.model, weights)
    if ema is not None:
        parameters = dict(model.model.named_parameters())
        with torch.no_grad():
            for key, value in ema.items():
                parameters[key].copy_(value)
    _fold_force_std(model.model, stats, notes)

    converted = _graphpar_state(model, config, arguments, name, stats)
    converted["source"] = {
        "file": source.name,
        "sha256": _sha256(source),
        "layout": layout,
        "model": name,
        "step": int(state["step"]) if isinstance(state.get("step"), int | float) else None,
    }
    if publication is not None:
        converted["source"]["publication"] = dict(publication)
    converted["notes"] = notes
    write_checkpoint(output, converted)
    return converted


def _our_name(model_name: str, key: str) -> str | None:
    """Our name of a fairchem state-dict entry (None: an alias or a name we do not know)."""
    mapping = (
        gemnet.fairchem_to_graphpar_name
        if model_name == "gemnet_t"
        else dimenetpp.fairchem_to_graphpar_name
    )
    try:
        return mapping(key)
    except KeyError:
        return None


def _graphpar_state(
    model: Normalized, config: dict, arguments: Mapping, name: str, stats: Mapping
) -> dict:
    """The graphpar checkpoint of a converted model: what `trained_model` reads, and the graphs
    and data it expects (OC20's LMDBs, fairchem's graph convention, adsorption energies)."""
    cutoff = float(arguments["cutoff"])
    max_neighbors = (
        int(arguments["max_neighbors"]) if name == "gemnet_t" else _DIMENETPP_MAX_NEIGHBORS
    )
    graph = {"cutoff": cutoff, "max_neighbors": max_neighbors, "graph_convention": "fairchem"}
    normalization = {key: stats[key] for key in ("energy_mean", "energy_std")}
    data = {**graph, "energy_reference": "adsorption", "datasets": {}}
    state = RunState(
        config=config,
        model=model,
        optimizer=None,
        scheduler=None,
        ema=None,
        normalization=normalization,
        graph=graph,
        data=data,
    ).state_dict()
    state["rng"] = None  # nothing to resume, and the file stays the same conversion to conversion
    return state


def _json_object(text: str) -> dict:
    """argparse type of --published: one JSON object."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"not JSON: {error}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("not a JSON object")
    return value


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m graphpar.convert",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("source", type=Path, help="the OCP/fairchem checkpoint (.pt)")
    parser.add_argument("output", type=Path, help="the graphpar checkpoint to write")
    parser.add_argument(
        "--scale-factors",
        type=Path,
        default=None,
        help="GemNet: a scale-factor JSON (the reference's format) for factors the checkpoint "
        "lacks; those it has must agree",
    )
    parser.add_argument(
        "--full-gradient-forces",
        action="store_true",
        help="DimeNet++: forces = full -dE/dpos (default: fairchem's, without the derivatives "
        "through the angles)",
    )
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument(
        "--published",
        type=_json_object,
        default=None,
        help="a JSON object recorded as the checkpoint's source.publication (the workflow's "
        "name, URL and published numbers)",
    )
    args = parser.parse_args(argv)
    try:
        converted = convert_checkpoint(
            args.source,
            args.output,
            scale_factors=args.scale_factors,
            detached_angles=False if args.full_gradient_forces else None,
            dtype=args.dtype,
            publication=args.published,
        )
    except TrainingError as error:
        sys.exit(f"error: {error}")
    source = converted["source"]
    print(
        f"{args.output}: {source['model']} ({source['layout']}) -> {converted['config']['model']}, "
        f"graphs: {converted['graph']}"
    )
    for note in converted["notes"]:
        print(f"  note: {note}")


if __name__ == "__main__":
    main()
