"""Train DimeNet++ or GemNet-T with graph parallelism x data parallelism.

One process (G = D = 1), then one node with G = 2 graph parallel x D = 2 data parallel:

    python -m graphpar.train --config run.yaml --out results/mini/checkpoints/dimenetpp
    torchrun --standalone --nproc_per_node=4 -m graphpar.train --config run.yaml --out DIR

Several nodes (the same command on every node; HEAD is the first node's address):

    torchrun --nnodes=32 --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint=$HEAD:29500 \\
        --rdzv-id=$SLURM_JOB_ID -m graphpar.train --config run.yaml --out DIR

A run restarted on the same --out continues from its last checkpoint, bit for bit, with no
flag; so `torchrun --max-restarts=3 ...` survives crashed ranks. The config keys are in
src/graphpar/schemas/train.schema.yaml and config/README.md. --out receives checkpoint.pt (the
latest state, replaced atomically), final.pt (at the end), metrics.jsonl (one line per logged
step and per validation), normalization.json and train.log.

The global batch of `batch_size` systems is shared among the D data-parallel groups (balanced by
`balance_on`); the G ranks of a group load the same systems and split their edges and triplets.
Loss = energy MAE x c_E + force L2-MAE on free atoms x c_F, in normalised units, each term
divided by its global count (systems, free atoms), so any G x D computes the same gradient.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import hashlib
import json
import logging
import math
import os
import random
import resource
import sys
import time
import zipfile
from collections.abc import Iterator, Mapping
from importlib import resources as package_files
from itertools import islice
from pathlib import Path
from typing import Any

import jsonschema
import numpy as np
import torch
import torch.distributed as dist
import yaml
from torch import Tensor, nn
from tqdm import tqdm

from graphpar.data.dataset import BalancedBatchSampler, LmdbDataset, collate
from graphpar.io import atomic_path, write_json
from graphpar.models import MODELS, DimeNetPlusPlus, build_model, scale_shared_gradients
from graphpar.parallel import destroy_groups, get_dims, init_groups, sync_gradients

CHECKPOINT_FORMAT = "graphpar-checkpoint-1"
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

log = logging.getLogger("graphpar.train")


class TrainingError(RuntimeError):
    """A run that cannot start or go on; the message says why and what to do."""


# ----------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------


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
    if config["model"] not in MODELS:
        raise TrainingError(
            f"{where}: unknown model {config['model']!r}; known: {', '.join(sorted(MODELS))}"
        )
    if config["max_steps"] is None and config["epochs"] is None:
        raise TrainingError(f"{where}: set max_steps or epochs (or both)")
    loss = config["loss"]
    if loss["energy_coefficient"] == 0 and loss["force_coefficient"] == 0:
        raise TrainingError(f"{where}: both loss coefficients are 0: nothing to train")
    if config["task"] == "is2re" and loss["force_coefficient"] > 0:
        raise TrainingError(f"{where}: task is2re has no force labels: set force_coefficient 0")
    return config


def config_hash(config: Mapping) -> str:
    """sha256 of the settings that determine a run's trajectory (not its length or logging)."""
    kept = {k: v for k, v in config.items() if k not in RUNTIME_KEYS}
    return hashlib.sha256(json.dumps(kept, sort_keys=True).encode()).hexdigest()


# ----------------------------------------------------------------------------------------------
# Processes: world = D data-parallel groups x G graph-parallel ranks
# ----------------------------------------------------------------------------------------------


def setup_processes(config: Mapping) -> torch.device:
    """Join torchrun's process group (gloo on CPU, NCCL on GPU) and build the G x D groups;
    check the layout before any work."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    gp_size, dp_size = config["gp_size"], config["dp_size"]
    if world_size % gp_size:
        raise TrainingError(
            f"gp_size {gp_size} does not divide the world size {world_size}: launch "
            f"torchrun --nproc_per_node={gp_size * (dp_size or 1)} (G x D processes)"
        )
    if dp_size is not None and world_size != gp_size * dp_size:
        raise TrainingError(
            f"the config asks for G x D = {gp_size} x {dp_size} processes, torchrun started "
            f"{world_size}: use --nproc_per_node (x --nnodes) = {gp_size * dp_size}"
        )
    if config["batch_size"] % (world_size // gp_size):
        raise TrainingError(
            f"batch_size {config['batch_size']} is not a multiple of D = {world_size // gp_size}"
        )
    return join_processes(gp_size, config["device"])


def join_processes(gp_size: int, device: str = "auto") -> torch.device:
    """Join torchrun's process group (gloo on CPU, NCCL on GPU; none for one process) and build
    the G x D groups; `device` is "cpu", "cuda" or "auto". Returns this rank's device."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    wants_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if wants_cuda and not torch.cuda.is_available():
        raise TrainingError("device: cuda, but CUDA is not available here")
    if wants_cuda:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        rank_device = torch.device("cuda", local_rank)
    else:
        rank_device = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        timeout = datetime.timedelta(minutes=10)
        store, rank, world_size = next(
            dist.rendezvous("env://", int(os.environ["RANK"]), world_size, timeout=timeout)
        )
        # torchrun --max-restarts keeps its store across restarts: without a per-attempt
        # prefix, restarted ranks read the dead attempt's addresses and never connect.
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        dist.init_process_group(
            "nccl" if wants_cuda else "gloo",
            store=dist.PrefixStore(f"graphpar/attempt_{attempt}", store),
            rank=rank,
            world_size=world_size,
            timeout=timeout,
        )
    init_groups(gp_size)
    return rank_device


def leave_processes() -> None:
    """Undo `join_processes`: drop the G x D groups and leave torchrun's process group."""
    destroy_groups()
    if dist.is_initialized():
        dist.destroy_process_group()


def dp_sum(value: Tensor) -> Tensor:
    """Sum over the data-parallel group (the G ranks of a group hold the same value)."""
    group = get_dims().dp_group
    if group is not None:
        value = value.clone()
        dist.all_reduce(value, group=group)
    return value


def world_rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def broadcast(value: Any) -> Any:
    """Rank 0's `value` on every rank."""
    if not dist.is_initialized():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# ----------------------------------------------------------------------------------------------
# Data, model, normalisation
# ----------------------------------------------------------------------------------------------


def triplet_kind(model: nn.Module) -> str:
    return "dimenetpp" if isinstance(model, DimeNetPlusPlus) else "gemnet"


def open_datasets(config: Mapping, kind: str):
    """(concatenated training set, per-sample balancing costs, the datasets one by one)."""
    datasets = []
    for path in config["train"]:
        try:
            datasets.append(LmdbDataset(path, triplets=(kind,)))
        except FileNotFoundError as error:
            raise TrainingError(f"training dataset {path}: {error}") from error
    size_kind = f"triplets_{kind}" if config["balance_on"] == "triplets" else config["balance_on"]
    sizes = np.concatenate([d.sizes(size_kind) for d in datasets])
    return torch.utils.data.ConcatDataset(datasets), sizes, datasets


def check_cutoff(model: nn.Module, datasets: list[LmdbDataset]) -> None:
    for dataset in datasets:
        cutoff = dataset.metadata.get("cutoff")
        if cutoff is not None and abs(float(cutoff) - float(model.cutoff)) > 1e-6:
            raise TrainingError(
                f"{dataset.path} was preprocessed with cutoff {cutoff} A but the model uses "
                f"{model.cutoff} A: set model_args.cutoff or preprocess again"
            )


def energy_target(batch, task: str) -> Tensor:
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


def build_normalized_model(config: Mapping, stats: Mapping[str, float]) -> Normalized:
    """Same initial weights on every rank (seeded on the CPU, then moved)."""
    torch.manual_seed(config["seed"])
    args = dict(config["model_args"])
    if config["loss"]["force_coefficient"] == 0:
        args.setdefault("regress_forces", False)
    model = build_model(config["model"], **args)
    return Normalized(model, stats["energy_mean"], stats["energy_std"])


# ----------------------------------------------------------------------------------------------
# EMA, learning rate, checkpoints
# ----------------------------------------------------------------------------------------------


class EMA:
    """Exponential moving average of the parameters, with the reference's warm start:
    decay_n = min(decay, (1 + n) / (10 + n)) after n updates (torch_ema, as OCP uses)."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.num_updates = 0
        self.shadow = [p.detach().clone() for p in model.parameters()]

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.num_updates += 1
        decay = min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))
        for shadow, p in zip(self.shadow, model.parameters(), strict=True):
            shadow.lerp_(p.detach(), 1 - decay)

    @contextlib.contextmanager
    def applied(self, model: nn.Module) -> Iterator[None]:
        """The model with the averaged weights inside the block, its own ones after."""
        saved = [p.detach().clone() for p in model.parameters()]
        with torch.no_grad():
            for p, shadow in zip(model.parameters(), self.shadow, strict=True):
                p.copy_(shadow)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, own in zip(model.parameters(), saved, strict=True):
                    p.copy_(own)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "num_updates": self.num_updates, "shadow": self.shadow}

    def load_state_dict(self, state: Mapping) -> None:
        self.num_updates = state["num_updates"]
        for shadow, saved in zip(self.shadow, state["shadow"], strict=True):
            shadow.copy_(saved)


def warmup_scale(step: int, config: Mapping) -> float:
    """Linear warmup from warmup_factor to 1 over warmup_steps (1 after)."""
    steps, factor = config["scheduler"]["warmup_steps"], config["scheduler"]["warmup_factor"]
    return 1.0 if step >= steps else factor + (1 - factor) * step / steps


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
    if world_rank() == 0:
        with atomic_path(path) as temporary:
            torch.save(dict(state), temporary)


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
        with torch.no_grad():
            for p, shadow in zip(model.parameters(), state["ema"]["shadow"], strict=True):
                p.copy_(shadow)
    dtype = torch.float64 if config["dtype"] == "float64" else torch.float32
    return model.to(device=device, dtype=dtype).eval()


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


# ----------------------------------------------------------------------------------------------
# Steps
# ----------------------------------------------------------------------------------------------


def to_device(batch, device: torch.device, dtype: torch.dtype):
    batch = batch.to(device)
    for key in ("pos", "cell", "energy", "forces", "energy_relaxed"):
        if key in batch:
            batch[key] = batch[key].to(dtype)
    return batch


def loss_terms(out: Mapping[str, Tensor], batch, model: Normalized, config: Mapping):
    """Loss terms in normalised units, each summed over this rank's share and divided by the
    global count (systems, free atoms): (energy term, force term or None, global systems)."""
    std = model.energy_std.to(out["energy"])
    num_systems = dp_sum(torch.tensor(float(batch.num_graphs), device=std.device))
    energy_error = (out["energy"] - energy_target(batch, config["task"])) / std
    energy_term = energy_error.abs().sum() / num_systems
    if config["loss"]["force_coefficient"] == 0:
        return energy_term, None, num_systems
    free = batch.free
    num_free = dp_sum(free.sum().to(std))
    force_error = ((out["forces"][free] - batch.forces[free]) / std).norm(dim=-1)
    return energy_term, force_error.sum() / num_free.clamp(min=1), num_systems


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kB


def gather_world(value: float) -> list[float]:
    if not dist.is_initialized():
        return [value]
    values = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def validate(model: Normalized, dataset, config: Mapping, device, dtype) -> dict[str, float]:
    """Energy MAE (eV) and force MAE on free atoms (eV/A) over the whole split, with the
    validation systems dealt to the data-parallel groups."""
    dims = get_dims()
    indices = list(range(dims.dp_rank, len(dataset), dims.dp_size))
    per_rank = max(1, config["val_batch_size"] // dims.dp_size)
    sums = torch.zeros(4, dtype=torch.float64, device=device)
    model.eval()
    for start in range(0, len(indices), per_rank):
        batch = collate([dataset[i] for i in indices[start : start + per_rank]])
        batch = to_device(batch, device, dtype)
        out = model(batch)
        sums[0] += (out["energy"].detach() - energy_target(batch, config["task"])).abs().sum()
        sums[1] += batch.num_graphs
        if "forces" in out and "forces" in batch:
            free = batch.free
            sums[2] += (out["forces"].detach()[free] - batch.forces[free]).abs().sum()
            sums[3] += 3 * free.sum()
    model.train()
    sums = dp_sum(sums)
    result = {"energy_mae": float(sums[0] / sums[1])}
    if sums[3] > 0:
        result["forces_mae"] = float(sums[2] / sums[3])
    return result


def batch_sampler(config: Mapping, sizes) -> BalancedBatchSampler:
    """This rank's share of every global batch: the config's batch split over the D
    data-parallel ranks, balanced by `sizes` (per-sample cost)."""
    dims = get_dims()
    return BalancedBatchSampler(
        sizes,
        batch_size=config["batch_size"] // dims.dp_size,
        num_replicas=dims.dp_size,
        rank=dims.dp_rank,
        seed=config["seed"],
    )


class ResumedSampler:
    """A batch sampler that skips the first `skip` batches of its epoch (resuming mid-epoch)."""

    def __init__(self, sampler: BalancedBatchSampler, skip: int = 0):
        self.sampler, self.skip = sampler, skip

    def __iter__(self):
        return islice(iter(self.sampler), self.skip, None)

    def __len__(self) -> int:
        return len(self.sampler) - self.skip


# ----------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------


def train(config: Mapping, out: str | os.PathLike) -> Path:
    """Train to the end (resuming from `out`/checkpoint.pt when present); returns final.pt."""
    config = load_config(config)
    out = Path(out)
    device = setup_processes(config)
    dims = get_dims()
    rank = world_rank()
    is_main = rank == 0
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
        _log_to(out / "train.log")
    dtype = torch.float64 if config["dtype"] == "float64" else torch.float32
    digest = config_hash(config)

    # ---- resume or start ----------------------------------------------------------------
    checkpoint_path, final_path = out / "checkpoint.pt", out / "final.pt"
    state = read_checkpoint(checkpoint_path) if checkpoint_path.exists() else None
    if state is not None and state["config_hash"] != digest:
        raise TrainingError(
            f"{checkpoint_path} belongs to a different config (hash {state['config_hash'][:12]}, "
            f"this config {digest[:12]}): use another --out, or delete the checkpoint"
        )

    probe = build_model(config["model"], **config["model_args"])
    kind = triplet_kind(probe)
    dataset, sizes, parts = open_datasets(config, kind)
    check_cutoff(probe, parts)
    del probe
    # How the training graphs were built, so inference (relaxations, the ASE calculator) builds
    # the same ones.
    graph_settings = {key: parts[0].metadata.get(key) for key in ("cutoff", "max_neighbors")}
    val_dataset = None
    if config["val"] is not None:
        try:
            val_dataset = LmdbDataset(config["val"], triplets=(kind,))
        except FileNotFoundError as error:
            raise TrainingError(f"validation dataset {config['val']}: {error}") from error

    if state is not None:
        stats = state["normalization"]
    else:
        stats = broadcast(normalization_stats(config, dataset, config["task"]) if is_main else None)
        if is_main:
            write_json(out / "normalization.json", stats)
    model = build_normalized_model(config, stats)
    if state is None and config["init_checkpoint"] is not None:
        _load_initial_weights(model, Path(config["init_checkpoint"]))
    model = model.to(device=device, dtype=dtype).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optim = config["optimizer"]
    optimizer = torch.optim.AdamW(
        params, lr=optim["lr"], weight_decay=optim["weight_decay"], amsgrad=optim["amsgrad"]
    )
    sched = config["scheduler"]
    if sched["kind"] == "plateau":
        scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode="min", factor=sched["factor"], patience=sched["patience"]
        )
    elif sched["kind"] == "exponential":
        scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=sched["gamma"])
    else:
        scheduler = None
    ema = EMA(model, config["ema_decay"]) if config["ema_decay"] is not None else None

    sampler = batch_sampler(config, sizes)
    steps_per_epoch = len(sampler)
    total_steps = math.inf if config["max_steps"] is None else config["max_steps"]
    if config["epochs"] is not None:
        total_steps = min(total_steps, math.ceil(config["epochs"] * steps_per_epoch))
    total_steps = int(total_steps)

    step, epoch, batch_in_epoch, best = 0, 0, 0, None
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if scheduler is not None:
            scheduler.load_state_dict(state["scheduler"])
        if ema is not None:
            ema.load_state_dict(state["ema"])
        set_rng_state(state["rng"])
        step, epoch, batch_in_epoch, best = (
            state["step"],
            state["epoch"],
            state["batch_in_epoch"],
            state["best"],
        )
        log.info("resumed from %s at step %d (epoch %d)", checkpoint_path, step, epoch)
    if is_main:
        _truncate_metrics(out / "metrics.jsonl", step)
        log.info(
            "model %s (%s parameters), G x D = %d x %d, %d training systems, %d steps per epoch",
            config["model"],
            f"{sum(p.numel() for p in params):,}",
            dims.gp_size,
            dims.dp_size,
            len(dataset),
            steps_per_epoch,
        )

    def checkpoint_state() -> dict:
        return {
            "format": CHECKPOINT_FORMAT,
            "config": dict(config),
            "config_hash": digest,
            "step": step,
            "epoch": epoch,
            "batch_in_epoch": batch_in_epoch,
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": None if scheduler is None else scheduler.state_dict(),
            "ema": None if ema is None else ema.state_dict(),
            "normalization": dict(stats),
            "graph": graph_settings,
            "rng": rng_state(),
            "best": best,
        }

    def run_validation() -> None:
        nonlocal best
        if val_dataset is None:
            return
        with ema.applied(model) if ema is not None else contextlib.nullcontext():
            metrics = validate(model, val_dataset, config, device, dtype)
        metric = "forces_mae" if config["loss"]["force_coefficient"] > 0 else "energy_mae"
        plateau = isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)
        if plateau and step >= sched["warmup_steps"]:
            scheduler.step(metrics[metric])
        if best is None or metrics[metric] < best[metric]:
            best = {"step": step, **metrics}
        _append_metrics(out, {"step": step, "epoch": epoch, "split": "val", **metrics})
        log.info("step %d validation: %s", step, json.dumps(metrics))

    progress = tqdm(
        total=total_steps, initial=step, desc="train", disable=not is_main or None, unit="step"
    )
    while step < total_steps:
        sampler.set_epoch(epoch)
        loader = torch.utils.data.DataLoader(
            dataset,
            batch_sampler=ResumedSampler(sampler, batch_in_epoch),
            collate_fn=collate,
            num_workers=config["num_workers"],
        )
        for batch in loader:
            started = time.perf_counter()
            if step <= sched["warmup_steps"] and sched["warmup_steps"]:
                for group in optimizer.param_groups:
                    group["lr"] = optim["lr"] * warmup_scale(step, config)
            batch = to_device(batch, device, dtype)
            optimizer.zero_grad(set_to_none=True)
            out_step = model(batch)
            energy_term, force_term, num_systems = loss_terms(out_step, batch, model, config)
            loss = config["loss"]["energy_coefficient"] * energy_term
            if force_term is not None:
                loss = loss + config["loss"]["force_coefficient"] * force_term
            global_loss = dp_sum(loss.detach())
            if not torch.isfinite(global_loss):
                raise TrainingError(
                    f"non-finite loss ({float(global_loss)}) at step {step + 1} (epoch {epoch}, "
                    f"batch {batch_in_epoch} of the epoch, systems {_sids(batch)}); "
                    f"the last good checkpoint is {checkpoint_path}"
                )
            # sync_gradients averages over D; each rank's loss is its share of the global one.
            (loss * dims.dp_size).backward()
            sync_gradients(model)
            if config["shared_gradient_scaling"]:
                scale_shared_gradients(model.model)
            clip = config["clip_grad_norm"]
            grad_norm = torch.nn.utils.clip_grad_norm_(params, clip if clip else math.inf)
            if not torch.isfinite(grad_norm):
                raise TrainingError(
                    f"non-finite gradient norm at step {step + 1} (epoch {epoch}, systems "
                    f"{_sids(batch)}); the last good checkpoint is {checkpoint_path}"
                )
            optimizer.step()
            if ema is not None:
                ema.update(model)
            step += 1
            batch_in_epoch += 1
            seconds = time.perf_counter() - started
            if step % config["log_every"] == 0 or step == total_steps:
                record = {
                    "step": step,
                    "epoch": epoch,
                    "split": "train",
                    "loss": float(global_loss),
                    "energy_loss": float(dp_sum(energy_term.detach())),
                    "lr": optimizer.param_groups[0]["lr"],
                    "grad_norm": float(grad_norm),
                    "samples_per_s": float(num_systems) / seconds,
                    "peak_memory_mb": gather_world(peak_memory_mb(device)),
                }
                if force_term is not None:
                    record["force_loss"] = float(dp_sum(force_term.detach()))
                _append_metrics(out, record)
                progress.set_postfix(
                    loss=f"{record['loss']:.4g}", sps=f"{record['samples_per_s']:.1f}"
                )
            progress.update(1)
            end_of_epoch = batch_in_epoch == steps_per_epoch
            if end_of_epoch:
                epoch, batch_in_epoch = epoch + 1, 0
                if isinstance(scheduler, torch.optim.lr_scheduler.ExponentialLR):
                    scheduler.step()
            if step % config["eval_every"] == 0 or step == total_steps:
                run_validation()
            if step % config["checkpoint_every"] == 0 or step == total_steps:
                write_checkpoint(checkpoint_path, checkpoint_state())
            if step >= total_steps or end_of_epoch:
                break
    progress.close()
    write_checkpoint(final_path, checkpoint_state())
    if is_main:
        log.info("done: step %d, best validation %s, wrote %s", step, best, final_path)
    return final_path


def _load_initial_weights(model: Normalized, path: Path) -> None:
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
        with torch.no_grad():
            for p, shadow in zip(model.parameters(), state["ema"]["shadow"], strict=True):
                p.copy_(shadow)


def _sids(batch) -> str:
    sid = getattr(batch, "sid", None)
    return "sid " + str(sid.tolist()) if sid is not None else f"{batch.num_graphs} systems"


def _append_metrics(out: Path, record: Mapping) -> None:
    if world_rank() == 0:
        with open(out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop lines written after the checkpoint a resumed run starts from (atomically)."""
    if not path.exists():
        return
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    kept = []
    for line in lines:
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line)
        except (json.JSONDecodeError, KeyError):
            continue  # a line cut by a kill
    with atomic_path(path) as temporary:
        Path(temporary).write_text("".join(line + "\n" for line in kept))


def _log_to(path: Path) -> None:
    if log.handlers:
        return
    log.setLevel(logging.INFO)
    formatter = logging.Formatter("%(asctime)s %(levelname)s %(message)s")
    for handler in (logging.FileHandler(path), logging.StreamHandler(sys.stderr)):
        handler.setFormatter(formatter)
        log.addHandler(handler)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m graphpar.train",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--config", type=Path, help="training config (YAML)")
    source.add_argument("--config-json", help="training config as one JSON string (Snakemake)")
    parser.add_argument("--out", type=Path, required=True, help="run folder (resumed if present)")
    args = parser.parse_args(argv)
    config = json.loads(args.config_json) if args.config_json else args.config
    try:
        train(config, args.out)
    except TrainingError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)
    finally:
        leave_processes()


if __name__ == "__main__":
    main()
