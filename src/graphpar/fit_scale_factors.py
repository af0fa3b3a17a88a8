"""Fit GemNet's scale factors before training, as the reference does (stage fit_scale_factors).

    python -m graphpar.fit_scale_factors --config-json '{...}' --out factors.json [--batches 16]

Each `ScaleFactor` of the model scales its output y so that its variance matches that of its
reference input x (fairchem's `ref=`; the paper-era `ScalingFactor(x_ref, y)`): factor =
sqrt(Var(x) / Var(y)), Var being the mean over features of the per-feature variance over the
rows (unbiased), accumulated over `--batches` batches weighted by their rows. A factor without a
reference aims at variance 1. The factors are fitted one by one in the order the forward pass
reaches them (found in one pass of the first batch), each with every earlier one already set
and every later one at 1, the model in eval mode without gradients; the same batches serve every
factor (the training set's first batches in the order the config's seed draws them, one data-
parallel group's share: batch_size / dp_size systems). fairchem `fit_scaling` (its
modules/scaling/fit.py, 16 batches) and the paper-era `gemnet_gp/fit_scaling.py` do the same,
but draw fresh batches for each factor.

The output is the reference's scale file: a JSON object of {fairchem name: value} plus
"comment", here an object holding what was fitted on (config hash, datasets and their
identities, batches, seed), the fitted variances, git commit and package versions. fairchem's
loaders and `graphpar.models.gemnet.load_scale_factors` read it as it is. One process, no graph
parallelism: the model must fit on one device (the workflow's rule `fit_scale_factors`).
"""

from __future__ import annotations

import argparse
import logging
import math
import random
import sys
from collections.abc import Iterable, Mapping
from itertools import islice
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from graphpar.data.dataset import BalancedBatchSampler, collate
from graphpar.data.lmdb import dataset_identity
from graphpar.io import write_json
from graphpar.models.gemnet import ScaleFactor
from graphpar.provenance import git_commit, package_versions
from graphpar.training.config import (
    TrainingError,
    add_config_arguments,
    config_hash,
    config_source,
    load_config,
)

__all__ = ["fit_scale_factors", "main", "scale_factor_order", "scale_variances"]

log = logging.getLogger("graphpar.fit_scale_factors")


def _network(model: nn.Module) -> nn.Module:
    """The GemNet inside a `Normalized` wrapper (or the model itself)."""
    inner = getattr(model, "model", model)
    if not hasattr(inner, "scale_factors"):
        raise TrainingError(f"{type(inner).__name__} has no scale factors to fit")
    return inner


def _variance(x: Tensor) -> float:
    """fairchem's statistic: mean over features of the per-feature variance over rows."""
    return float(torch.var(x.detach().double().reshape(x.shape[0], -1), dim=0).mean())


class _Observer:
    """Accumulates row-weighted Var(output) and Var(ref) of one ScaleFactor (forward hook)."""

    def __init__(self):
        self.variance_in = self.variance_out = 0.0
        self.rows = 0

    def __call__(self, module, args, kwargs, output) -> None:
        ref = kwargs.get("ref", args[1] if len(args) > 1 else None)
        rows = output.shape[0]
        self.variance_out += _variance(output) * rows
        self.variance_in += (1.0 if ref is None else _variance(ref)) * rows
        self.rows += rows

    def result(self) -> tuple[float, float]:
        if self.rows == 0:
            raise TrainingError("a scale factor was never reached by the forward pass")
        return self.variance_in / self.rows, self.variance_out / self.rows


def _forward_all(model: nn.Module, batches: Iterable, device) -> None:
    with torch.no_grad():
        for batch in batches:
            model(batch.to(device) if device is not None else batch)


def scale_factor_order(model: nn.Module, batch, device=None) -> list[str]:
    """The model's ScaleFactors (state_dict names) in the order one forward pass reaches them."""
    network, order = _network(model), []

    def reached(name: str):
        def hook(*_) -> None:
            if name not in order:
                order.append(name)

        return hook

    hooks = [
        module.register_forward_hook(reached(name))
        for name, module in network.scale_factors().items()
    ]
    try:
        _forward_all(model, [batch], device)
    finally:
        for hook in hooks:
            hook.remove()
    missing = sorted(set(network.scale_factors()) - set(order))
    if missing:
        raise TrainingError(f"scale factors the forward pass never reaches: {missing}")
    return order


def scale_variances(model: nn.Module, batches: list, device=None) -> dict[str, dict[str, float]]:
    """Var(ref) and Var(scaled output) of every ScaleFactor over `batches`, as they are now
    ({state_dict name: {"variance_in", "variance_out"}}): what a fit makes equal."""
    factors = _network(model).scale_factors()
    observers = {name: _Observer() for name in factors}
    hooks = [
        module.register_forward_hook(observers[name], with_kwargs=True)
        for name, module in factors.items()
    ]
    try:
        _forward_all(model, batches, device)
    finally:
        for hook in hooks:
            hook.remove()
    return {
        name: dict(zip(("variance_in", "variance_out"), observer.result(), strict=True))
        for name, observer in observers.items()
    }


def fit_scale_factors(model: nn.Module, batches: list, device=None) -> dict[str, dict]:
    """Fit every ScaleFactor of `model` (a GemNet or its `Normalized` wrapper), in forward
    order, on `batches` (collated). The model is left in eval mode with the factors set.
    Returns {fairchem name: {"value", "variance_in", "variance_out", "order"}}, variance_out
    being that of the unscaled output."""
    if not batches:
        raise TrainingError("no batches to fit the scale factors on")
    model.eval()
    factors: dict[str, ScaleFactor] = _network(model).scale_factors()
    with torch.no_grad():
        for module in factors.values():
            module.scale_factor.fill_(1.0)
    fitted = {}
    for index, name in enumerate(scale_factor_order(model, batches[0], device)):
        module = factors[name]
        observer = _Observer()
        hook = module.register_forward_hook(observer, with_kwargs=True)
        try:
            _forward_all(model, batches, device)
        finally:
            hook.remove()
        variance_in, variance_out = observer.result()
        if not (variance_in > 0 and variance_out > 0):
            raise TrainingError(
                f"{module.name}: variance in {variance_in}, out {variance_out}: cannot fit"
            )
        value = math.sqrt(variance_in / variance_out)
        with torch.no_grad():
            module.scale_factor.fill_(value)
        fitted[module.name] = {
            "value": value,
            "variance_in": variance_in,
            "variance_out": variance_out,
            "order": index,
        }
        log.info(
            "%s: Var_in %.4g, Var_out %.4g => scale factor %.4f",
            module.name,
            variance_in,
            variance_out,
            value,
        )
    return fitted


def training_batches(config: Mapping, count: int) -> tuple[list, list]:
    """The first `count` batches of the run's training data in its seed's order (one data-
    parallel group's share of the global batch), and the datasets."""
    from graphpar.training.data import model_facts, open_datasets

    family, _ = model_facts(config)
    dataset, sizes, parts = open_datasets(config, family)
    sampler = BalancedBatchSampler(
        sizes,
        batch_size=max(1, config["batch_size"] // (config["dp_size"] or 1)),
        num_replicas=1,
        rank=0,
        seed=config["seed"],
    )
    sampler.set_epoch(0)
    batches = [collate([dataset[i] for i in indices]) for indices in islice(sampler, count)]
    return batches, parts


def run(config: Mapping, out: Path, num_batches: int = 16) -> dict:
    """Fit the scale factors of `config`'s model on its training data; write `out`."""
    from graphpar.training.normalization import build_normalized_model
    from graphpar.training.step import DTYPES, to_device

    if num_batches < 1:
        raise TrainingError("--batches must be at least 1")
    config = dict(load_config(config), scale_factors=None)  # every factor is fitted from 1
    torch.manual_seed(config["seed"])
    np.random.seed(config["seed"])
    random.seed(config["seed"])
    want = config["device"]
    device = torch.device(
        "cuda" if want == "cuda" or (want == "auto" and torch.cuda.is_available()) else "cpu"
    )
    model = build_normalized_model(config, {"energy_mean": 0.0, "energy_std": 1.0})
    if not hasattr(model.model, "scale_factors"):
        raise TrainingError(f"model {config['model']} has no scale factors")
    dtype = DTYPES[config["dtype"]]
    model = model.to(device=device, dtype=dtype).eval()
    batches, datasets = training_batches(config, num_batches)
    fitted = fit_scale_factors(model, [to_device(b, device, dtype) for b in batches])
    comment = {
        "description": f"scale factors of {config['model']} (graphpar.fit_scale_factors)",
        "model": config["model"],
        "model_args": config["model_args"],
        "config_hash": config_hash(config),
        "datasets": {str(d.path): dataset_identity(d.metadata) for d in datasets},
        "batches": len(batches),
        "batch_systems": [int(b.natoms.numel()) for b in batches],
        "seed": config["seed"],
        "dtype": config["dtype"],
        "fitted": {
            k: {key: v[key] for key in ("order", "variance_in", "variance_out")}
            for k, v in fitted.items()
        },
        "git_commit": git_commit(),
        "versions": package_versions(),
    }
    result = {"comment": comment, **{name: v["value"] for name, v in fitted.items()}}
    write_json(out, result)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m graphpar.fit_scale_factors",
        description="Fit a GemNet run's scale factors on its training data (fairchem's "
        "fit_scaling); write them as a fairchem scale file.",
    )
    add_config_arguments(parser)
    parser.add_argument("--out", type=Path, required=True, help="the scale file (JSON)")
    parser.add_argument("--batches", type=int, default=16, help="batches per factor (fairchem: 16)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        result = run(config_source(args), args.out, args.batches)
    except TrainingError as error:
        print(f"fit_scale_factors: {error}", file=sys.stderr)
        return 1
    print(f"{len(result) - 1} scale factors written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
