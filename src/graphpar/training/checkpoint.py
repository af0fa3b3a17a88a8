"""Checkpoints: what a run saves (`RunState`), writing and verified reading, resuming, and
loading a trained model for inference.

A checkpoint is one `torch.save` file (a zip archive) holding `RunState.state_dict()`: the
config and its hash, the progress (step, epoch, batch in the epoch, best validation), model,
optimiser, scheduler and EMA states, the normalisation statistics, how the training graphs were
built, and every random generator's state, so a resumed run continues bit for bit.
"""

from __future__ import annotations

import os
import random
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from graphpar.io import atomic_path
from graphpar.parallel import is_main
from graphpar.training.config import TrainingError, config_hash
from graphpar.training.ema import EMA, copy_weights
from graphpar.training.normalization import Normalized, build_normalized_model
from graphpar.training.step import DTYPES

CHECKPOINT_FORMAT = "graphpar-checkpoint-1"


def read_checkpoint(path: Path, map_location="cpu") -> dict:
    """A checkpoint, verified: a truncated or corrupt file (CRC of every record) is refused."""
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError) as error:
        raise TrainingError(
            f"{path} is truncated or not a checkpoint ({error}); delete it to start over"
        ) from error
    if bad is not None:
        raise TrainingError(f"{path} is corrupt (record {bad} fails its CRC); delete it")
    state = torch.load(path, map_location=map_location, weights_only=False)
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise TrainingError(f"{path} is not a graphpar checkpoint")
    return state


def write_checkpoint(path: Path, state: Mapping) -> None:
    """Atomically (temporary file, then rename), on rank 0 only (parameters are replicated)."""
    if is_main():
        with atomic_path(path) as temporary:
            torch.save(dict(state), temporary)


def read_resumable(path: Path, config: Mapping) -> dict | None:
    """The checkpoint a run of `config` continues from (None when there is none yet); one of
    another config is refused."""
    if not path.exists():
        return None
    state = read_checkpoint(path)
    digest = config_hash(config)
    if state["config_hash"] != digest:
        raise TrainingError(
            f"{path} belongs to a different config (hash {state['config_hash'][:12]}, "
            f"this config {digest[:12]}): use another --out, or delete the checkpoint"
        )
    return state


def rng_state() -> dict:
    return {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }


def set_rng_state(state: Mapping) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


@dataclass
class Progress:
    """Where a run stands: optimiser steps done, the epoch and the batches of it done, and the
    best validation so far ({"step", metric: value} or None)."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    best: dict | None = None


@dataclass
class RunState:
    """Everything a checkpoint holds, as live objects; `state_dict` is what is saved."""

    config: Mapping
    model: Normalized
    optimizer: torch.optim.Optimizer
    scheduler: Any  # a torch learning-rate scheduler or None
    ema: EMA | None
    normalization: Mapping[str, float]
    graph: Mapping[str, Any]  # how the training graphs were built (cutoff, max_neighbors)
    progress: Progress = field(default_factory=Progress)

    def state_dict(self) -> dict:
        return {
            "format": CHECKPOINT_FORMAT,
            "config": dict(self.config),
            "config_hash": config_hash(self.config),
            "step": self.progress.step,
            "epoch": self.progress.epoch,
            "batch_in_epoch": self.progress.batch_in_epoch,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": None if self.scheduler is None else self.scheduler.state_dict(),
            "ema": None if self.ema is None else self.ema.state_dict(),
            "normalization": dict(self.normalization),
            "graph": dict(self.graph),
            "rng": rng_state(),
            "best": self.progress.best,
        }

    def load_state_dict(self, state: Mapping) -> None:
        """Resume: every state of the checkpoint, random generators included."""
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])
        set_rng_state(state["rng"])
        self.progress = Progress(
            state["step"], state["epoch"], state["batch_in_epoch"], state["best"]
        )


def load_initial_weights(model: Normalized, path: Path) -> None:
    """Fine-tuning: the network weights of another run (its EMA weights if any); this run's
    normalisation stays."""
    if not path.is_file():
        raise TrainingError(f"init_checkpoint {path} does not exist")
    state = read_checkpoint(path)
    weights = {
        name.removeprefix("model."): value
        for name, value in state["model"].items()
        if name.startswith("model.")
    }
    try:
        model.model.load_state_dict(weights)
    except RuntimeError as error:
        raise TrainingError(
            f"init_checkpoint {path} does not fit {model.model}: {error}"
        ) from error
    if state.get("ema") is not None:  # parameters in the same order: buffers are not in it
        copy_weights(model, state["ema"]["shadow"])


def load_trained(path: str | os.PathLike, device: str | torch.device = "cpu") -> Normalized:
    """A trained model from a checkpoint (its EMA weights if it has them), in eval mode, with
    outputs in eV and eV/A. For evaluation, relaxations and the ASE calculator."""
    return trained_model(read_checkpoint(Path(path)), device)


def trained_model(state: Mapping, device: str | torch.device = "cpu") -> Normalized:
    """`load_trained` of a checkpoint already read (`read_checkpoint`)."""
    config = state["config"]
    model = build_normalized_model(config, state["normalization"])
    model.load_state_dict(state["model"])
    if state.get("ema") is not None:
        copy_weights(model, state["ema"]["shadow"])
    return model.to(device=device, dtype=DTYPES[config["dtype"]]).eval()
