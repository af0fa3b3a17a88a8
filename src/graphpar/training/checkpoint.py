"""Checkpoints: what a run saves (`RunState`), writing and verified reading, resuming, and
loading a trained model for inference.

A checkpoint is one `torch.save` file (a zip archive) holding `RunState.state_dict()`: the
config and its hash, the progress (step, epoch, batch in the epoch, best validation), model,
optimiser, scheduler, EMA and (amp float16) gradient-scaler states, the normalisation
statistics, how the training graphs were built, the training data's settings and identities
(`graphpar.training.data.data_record`), and every random generator's state, so a resumed run
continues bit for bit.
"""

from __future__ import annotations

import os
import pickle
import random
import shutil
import zipfile
from collections.abc import Mapping, Sequence
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


# What a checkpoint holds beyond torch's own `weights_only` allow-list (tensors, plain
# containers, numbers, strings): the numpy generator's state in `rng_state`, whose key is a
# uint32 array. Its pickle rebuilds the array with `_reconstruct(ndarray, ...)` and its dtype
# with `dtype("u4", ...)`, then sets the state of that dtype (a `UInt32DType`). Nothing else is
# allowed: an array of any other dtype (objects included) is refused.
CHECKPOINT_GLOBALS = [
    np._core.multiarray._reconstruct,
    np.ndarray,
    np.dtype,
    np.dtypes.UInt32DType,
]


def read_checkpoint(path: Path, map_location="cpu") -> dict:
    """A graphpar checkpoint, read by `read_verified` allowing `CHECKPOINT_GLOBALS`; a file of
    another format is refused."""
    state = read_verified(path, CHECKPOINT_GLOBALS, map_location)
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise TrainingError(f"{path} is not a graphpar checkpoint")
    return state


def read_verified(
    path: Path,
    allowed: Sequence = (),
    map_location="cpu",
    kind: str = "graphpar checkpoint",
) -> Any:
    """A `torch.save` file (a checkpoint: graphpar's, or OCP's for `graphpar.convert`),
    verified (the CRC of every record) and unpickled without running any of its code: torch's
    `weights_only` loader, allowing only the functions and classes `allowed` beyond its own list.
    A file that asks for anything else is refused before any of it runs (the message says no
    `kind` holds it); every other flaw (truncated, a changed byte, not a zip archive) is one
    "corrupt checkpoint" error."""
    path = Path(path)
    try:
        file = open(path, "rb")  # noqa: SIM115 (closed by the block below)
    except OSError as error:
        raise TrainingError(f"cannot read checkpoint {path}: {error.strerror}") from error
    with file, torch.serialization.safe_globals(list(allowed)):
        _verify_archive(file, path)
        _refuse_other_globals(file, path, kind)
        return _unpickle(file, path, map_location)


def _corrupt(path: Path, detail: str | Exception) -> TrainingError:
    """The one error of a checkpoint that cannot be read; an exception's first line is the
    detail."""
    if isinstance(detail, Exception):
        detail = f"{type(detail).__name__}: {_first_line(detail)}"
    return TrainingError(
        f"{path} is a corrupt checkpoint ({detail}); delete it (a run then starts over) "
        "or restore a good copy"
    )


# The DOS directory bit of a zip entry's external attributes: torch's reader (miniz) takes an
# entry with it set for a directory and reads none of its bytes, leaving the tensor's memory
# as it was, while Python's zipfile (testzip) ignores the bit.
_DOS_DIRECTORY = 0x10


def _verify_archive(file, path: Path) -> None:
    """Refuse a checkpoint whose zip archive cannot be read, fails the CRC of a record, or has
    a record torch's reader would skip as a directory (torch.save writes none)."""
    try:
        with zipfile.ZipFile(file) as archive:
            bad = archive.testzip()
            folders = [i.filename for i in archive.infolist() if _is_directory(i)]
    except zipfile.BadZipFile as error:
        raise _corrupt(path, f"truncated or not a checkpoint: {error}") from error
    except Exception as error:  # any other flaw of the archive's bytes
        raise _corrupt(path, error) from error
    if bad is not None:
        raise _corrupt(path, f"record {bad!r} is corrupt: its CRC or header does not match")
    if folders:
        raise _corrupt(path, f"record {folders[0]!r} is marked as a directory")


def _is_directory(info: zipfile.ZipInfo) -> bool:
    return info.filename.endswith("/") or bool(info.external_attr & _DOS_DIRECTORY)


def _refuse_other_globals(file, path: Path, kind: str) -> None:
    """Refuse a checkpoint whose pickle names a function or class outside the allow-list
    (torch's and the reader's, in force around this call): read statically, nothing of the
    pickle runs."""
    file.seek(0)
    try:
        refused = sorted(torch.serialization.get_unsafe_globals_in_checkpoint(file))
    except pickle.UnpicklingError as error:  # an opcode torch's weights-only loader lacks
        raise _refused(path, _first_line(error)) from error
    except Exception as error:  # a record torch cannot read
        raise _corrupt(path, error) from error
    if refused:
        raise _refused(path, f"it asks to run {', '.join(refused)}, which no {kind} holds")


def _unpickle(file, path: Path, map_location) -> Any:
    """`torch.load(weights_only=True)` of a verified checkpoint. Its records passed their CRCs,
    so a pickle the weights-only loader stops at (an array of another dtype, say) is refused."""
    file.seek(0)
    try:
        return torch.load(file, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        reason = str(error).partition("WeightsUnpickler error:")[2] or str(error)
        raise _refused(path, f"the weights-only loader stops: {_first_line(reason)}") from error
    except Exception as error:  # any other failure to rebuild the state from the file's bytes
        raise _corrupt(path, error) from error


def _refused(path: Path, reason: str) -> TrainingError:
    """The error of a checkpoint that asks for more than tensors and plain values."""
    return TrainingError(
        f"{path} is refused: {reason} (nothing of it was run); delete it unless you know its source"
    )


def _first_line(text: str | Exception) -> str:
    """The first non-empty line of a message, at most 200 characters."""
    lines = str(text).strip().splitlines() or [""]
    return lines[0][:200]


def write_checkpoint(path: Path, state: Mapping) -> None:
    """Atomically (temporary file, then rename), on rank 0 only (parameters are replicated). A
    write that fails (a full disk, a quota, a file size limit) removes its temporary, keeps the
    previous checkpoint, and names the filesystem."""
    if is_main():
        try:
            with atomic_path(path) as temporary, open(temporary, "wb") as file:
                torch.save(dict(state), file)  # a file object: a failed write keeps its errno
        except OSError as error:
            raise TrainingError(_write_failure(Path(path), state, error)) from error


def _write_failure(path: Path, state: Mapping, error: OSError) -> str:
    """Why checkpoint `path` was not written: the reason, the filesystem (its mount point and
    free bytes), about how many bytes the checkpoint needs, and what is kept."""
    from graphpar.scaling import tensor_bytes  # only here: scaling is the study's module

    mount = _mount_point(path.parent)
    free = shutil.disk_usage(mount).free
    kept = f"the previous checkpoint {path} is kept" if path.exists() else "nothing was written"
    return (
        f"cannot write checkpoint {path} ({error.strerror or error}): the filesystem at {mount} "
        f"has {free:,} bytes free, the checkpoint needs about {tensor_bytes(dict(state)):,}; "
        f"{kept}"
    )


def _mount_point(path: Path) -> Path:
    """The mount point of the filesystem that holds `path` (or its nearest existing parent)."""
    path = path.absolute()
    while not os.path.ismount(path):
        path = path.parent
    return path


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
    optimizer: torch.optim.Optimizer | None  # None: never trained here (graphpar.convert)
    scheduler: Any  # a torch learning-rate scheduler or None
    ema: EMA | None
    normalization: Mapping[str, float]
    # How the training graphs were built (training.data.GRAPH_SETTINGS: cutoff, max_neighbors,
    # graph_convention).
    graph: Mapping[str, Any]
    data: Mapping[str, Any]  # the training data's settings and identities (training.data)
    progress: Progress = field(default_factory=Progress)
    scaler: torch.amp.GradScaler | None = None  # amp float16's (training.step.grad_scaler)

    def state_dict(self) -> dict:
        return {
            "format": CHECKPOINT_FORMAT,
            "config": dict(self.config),
            "config_hash": config_hash(self.config),
            "step": self.progress.step,
            "epoch": self.progress.epoch,
            "batch_in_epoch": self.progress.batch_in_epoch,
            "model": self.model.state_dict(),
            "optimizer": None if self.optimizer is None else self.optimizer.state_dict(),
            "scheduler": None if self.scheduler is None else self.scheduler.state_dict(),
            "ema": None if self.ema is None else self.ema.state_dict(),
            "scaler": None if self.scaler is None else self.scaler.state_dict(),
            "normalization": dict(self.normalization),
            "graph": dict(self.graph),
            "data": dict(self.data),
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
        if self.scaler is not None:  # amp float16; the config hash makes the checkpoint's so too
            self.scaler.load_state_dict(state["scaler"])
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
    # The state dict holds the scale factors: the config's file need not exist here.
    model = build_normalized_model(config, state["normalization"], scale_factors=False)
    # In the checkpoint's dtype before loading, so float64 weights load exactly.
    model = model.to(dtype=DTYPES[config["dtype"]])
    model.load_state_dict(state["model"])
    if state.get("ema") is not None:
        copy_weights(model, state["ema"]["shadow"])
    return model.to(device=device).eval()
