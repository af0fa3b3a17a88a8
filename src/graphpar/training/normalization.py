"""Target normalisation: the energy statistics of a run and the model wrapper that learns in
normalised units while answering in physical ones (eV, eV/A)."""

from __future__ import annotations

import random
from collections.abc import Mapping

import numpy as np
import torch
from torch import Tensor, nn
from tqdm import tqdm

from graphpar.models import build_model
from graphpar.models.gemnet import load_scale_factors
from graphpar.training.config import TrainingError


def energy_target(batch, task: str) -> Tensor:
    """The energy label of `task`: the relaxed energy for IS2RE, the system's energy for S2EF."""
    return batch.energy_relaxed if task == "is2re" else batch.energy


class Normalized(nn.Module):
    """A model whose outputs are in physical units (eV, eV/A) while it learns normalised ones:
    energy = mean + std x model energy, forces = std x model forces (one std keeps the forces
    the negative gradient of the energy)."""

    def __init__(self, model: nn.Module, energy_mean: float = 0.0, energy_std: float = 1.0):
        super().__init__()
        self.model = model
        self.register_buffer("energy_mean", torch.tensor(float(energy_mean), dtype=torch.float64))
        self.register_buffer("energy_std", torch.tensor(float(energy_std), dtype=torch.float64))

    def forward(self, batch) -> dict[str, Tensor]:
        out = self.model(batch)
        mean, std = self.energy_mean.to(out["energy"]), self.energy_std.to(out["energy"])
        result = {"energy": out["energy"] * std + mean}
        if "forces" in out:
            result["forces"] = out["forces"] * std
        return result


def normalization_stats(config: Mapping, dataset, task: str) -> dict[str, float]:
    """Energy mean and std: from the config where given, else from (up to 20,000 samples of)
    the training set."""
    settings = config["normalization"]
    if not settings["enabled"]:
        return {"energy_mean": 0.0, "energy_std": 1.0}
    mean, std = settings["energy_mean"], settings["energy_std"]
    if mean is None or std is None:
        rng = np.random.default_rng(config["seed"])
        indices = rng.permutation(len(dataset))[:20000]
        energies = np.array(
            [
                float(energy_target(dataset[int(i)], task))
                for i in tqdm(indices, desc="normalisation", leave=False, disable=None)
            ]
        )
        mean = float(energies.mean()) if mean is None else mean
        std = float(energies.std()) if std is None else std
        if not std > 0:
            raise TrainingError("training energies have zero spread: set normalization.energy_std")
    return {"energy_mean": float(mean), "energy_std": float(std)}


def model_arguments(config: dict) -> dict:
    """The keyword arguments a training config builds its network with: its `model_args`, and
    no force head for an energy-only run (force_coefficient 0)."""
    args = dict(config["model_args"])
    if config["loss"]["force_coefficient"] == 0:
        args.setdefault("regress_forces", False)
    return args


def build_normalized_model(
    config: Mapping, stats: Mapping[str, float], scale_factors: bool = True
) -> Normalized:
    """The config's model around its statistics; the same initial weights on every rank (seeded
    on the CPU, then moved). NumPy's and Python's generators get the seed too: a checkpoint
    saves all three (checkpoint.rng_state), so two runs of one config write the same bytes.
    With `scale_factors`, the config's scale-factor file (key `scale_factors`) is loaded into
    the model (buffers: checkpoints keep them); a checkpoint's reader passes False."""
    torch.manual_seed(config["seed"])
    np.random.seed(config["seed"])
    random.seed(config["seed"])
    model = build_model(config["model"], **model_arguments(config))
    path = config.get("scale_factors")
    if scale_factors and path is not None:
        if not hasattr(model, "scale_factors"):
            raise TrainingError(f"scale_factors: model {config['model']} has no scale factors")
        try:
            load_scale_factors(model, path)
        except (KeyError, ValueError) as error:
            raise TrainingError(f"scale_factors {path}: {error}") from error
    return Normalized(model, stats["energy_mean"], stats["energy_std"])
