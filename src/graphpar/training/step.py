"""The training step and what surrounds it: the loss, the optimiser and its schedule, the one
`train_step` (used by the trainer, the scaling study and the graph-parallel tests), validation.

Loss = energy MAE x c_E + force L2-MAE on free atoms x c_F, in normalised units, each term
divided by its global count (systems, free atoms), so any G x D computes the same gradient.

Precision: parameters, gradients, optimiser and EMA state, the loss and validation are in the
config's `dtype`; `amp` runs the model's forward pass (the force graph included) under
`torch.autocast` in bfloat16 or float16, the latter with a gradient scaler (`grad_scaler`).
"""

from __future__ import annotations

import bisect
import contextlib
import math
import resource
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from graphpar.data.dataset import collate
from graphpar.models import scale_shared_gradients
from graphpar.parallel import dp_sum, get_dims, sync_gradients
from graphpar.training.config import TrainingError, val_batch_per_group
from graphpar.training.ema import EMA
from graphpar.training.normalization import Normalized, energy_target

DTYPES = {"float32": torch.float32, "float64": torch.float64}
# The config's `amp`: the dtype autocast computes the forward pass in.
AMP_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def to_device(batch, device: torch.device, dtype: torch.dtype):
    """The batch on `device`, its floating-point fields (positions, cell, labels) in `dtype`."""
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


def autocast(config: Mapping, device: torch.device):
    """The forward pass's precision context: torch.autocast in the config's `amp` dtype on
    `device`'s type, or nothing (amp null). Every rank runs the same, so the collectives inside
    the model carry tensors of the same dtype on every rank."""
    if config["amp"] is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=AMP_DTYPES[config["amp"]])


def grad_scaler(config: Mapping, device: torch.device) -> torch.amp.GradScaler | None:
    """torch's gradient scaler for amp float16 (its state is checkpointed), else None: bfloat16
    has float32's range, so its gradients neither underflow nor need scaling."""
    return torch.amp.GradScaler(device.type) if config["amp"] == "float16" else None


def build_optimizer(model: Normalized, config: Mapping):
    """(AdamW over the trainable parameters, the config's scheduler or None)."""
    settings = config["optimizer"]
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad],
        lr=settings["lr"],
        weight_decay=settings["weight_decay"],
        amsgrad=settings["amsgrad"],
    )
    schedule = config["scheduler"]
    if schedule["name"] == "plateau":
        scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode="min", factor=schedule["factor"], patience=schedule["patience"]
        )
    elif schedule["name"] == "exponential":
        scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=schedule["gamma"])
    else:
        # constant, and multistep: its learning rate is a function of the step count alone,
        # which `warm_up` sets before every step (so a resumed run recomputes it from the
        # checkpointed step and needs no scheduler state).
        scheduler = None
    return optimizer, scheduler


def warmup_scale(step: int, config: Mapping) -> float:
    """Linear warmup from warmup_factor to 1 over warmup_steps (1 after)."""
    steps, factor = config["scheduler"]["warmup_steps"], config["scheduler"]["warmup_factor"]
    return 1.0 if step >= steps else factor + (1 - factor) * step / steps


def multistep_scale(step: int, config: Mapping) -> float:
    """The multistep schedule's multiplier of the learning rate before optimiser step `step` + 1:
    the linear warmup up to warmup_steps, then gamma ** (milestones reached, a milestone m
    counting from step m on)."""
    schedule = config["scheduler"]
    if schedule["warmup_steps"] and step <= schedule["warmup_steps"]:
        return warmup_scale(step, config)
    return schedule["gamma"] ** bisect.bisect_right(sorted(schedule["milestones"]), step)


def warm_up(optimizer: torch.optim.Optimizer, step: int, config: Mapping) -> None:
    """Set the learning rate before optimiser step `step` + 1: the warmup's (none after it), or
    the multistep schedule's at every step."""
    warmup_steps = config["scheduler"]["warmup_steps"]
    if config["scheduler"]["name"] == "multistep":
        scale = multistep_scale(step, config)
    elif warmup_steps and step <= warmup_steps:
        scale = warmup_scale(step, config)
    else:
        return
    for group in optimizer.param_groups:
        group["lr"] = config["optimizer"]["lr"] * scale


def plateau_metric(config: Mapping) -> str:
    """The validation metric a plateau scheduler steps on and the best checkpoint is chosen by:
    scheduler.metric, else the primary one (forces_mae when forces are trained, else
    energy_mae)."""
    chosen = config["scheduler"].get("metric")
    if chosen is not None:
        return chosen
    return "forces_mae" if config["loss"]["force_coefficient"] > 0 else "energy_mae"


@dataclass(frozen=True)
class StepResult:
    """What one `train_step` leaves for logging. `loss` is the global loss (summed over the
    data-parallel groups); the terms are this rank's shares (sum them with `dp_sum`)."""

    loss: Tensor
    energy_term: Tensor
    force_term: Tensor | None
    num_systems: Tensor
    grad_norm: Tensor
    predictions: dict[str, Tensor]  # the model's outputs (eV, eV/A), detached


def train_step(
    model: Normalized,
    batch,
    optimizer: torch.optim.Optimizer,
    config: Mapping,
    ema: EMA | None = None,
    scaler: torch.amp.GradScaler | None = None,
) -> StepResult:
    """One optimiser step on this rank's share of a global batch (already on the model's device
    and dtype): forward (under the config's autocast, with its activation checkpointing and
    triplet chunks), loss, backward, gradient synchronisation over G x D, shared-gradient
    scaling, clipping, AdamW, EMA. A non-finite loss or gradient norm raises TrainingError
    before the weights change; with amp float16 (`scaler`: `grad_scaler(config, device)`,
    required then) a non-finite gradient instead skips the step and lowers the scale, as
    torch's GradScaler does."""
    if config["amp"] == "float16" and scaler is None:
        raise TrainingError("amp float16 needs a gradient scaler: pass grad_scaler(config, device)")
    if config["amp"] != "float16" and scaler is not None:
        raise TrainingError(f"a gradient scaler is for amp float16, not amp {config['amp']}")
    optimizer.zero_grad(set_to_none=True)
    # Model attributes, set here so that every caller of the step (trainer, scaling study)
    # trains with the config's settings.
    model.model.activation_checkpointing = config["activation_checkpointing"]
    model.model.triplet_chunk = config["triplet_chunk"]
    with autocast(config, batch.pos.device):
        out = model(batch)
    energy_term, force_term, num_systems = loss_terms(out, batch, model, config)
    loss = config["loss"]["energy_coefficient"] * energy_term
    if force_term is not None:
        loss = loss + config["loss"]["force_coefficient"] * force_term
    # Data parallel: the global loss, for the finite check and the log.
    global_loss = dp_sum(loss.detach())
    if not torch.isfinite(global_loss):
        raise TrainingError(f"non-finite loss ({float(global_loss)})")
    # sync_gradients averages over D; each rank's loss is its share of the global one.
    loss_for_gradients = loss * get_dims().dp_size
    if scaler is not None:
        loss_for_gradients = scaler.scale(loss_for_gradients)
    loss_for_gradients.backward()
    # Graph parallel and data parallel: gradients summed over G, averaged over D.
    sync_gradients(model)
    if scaler is not None:
        # After the sums: every rank unscales the same gradients, so all skip or all step.
        scaler.unscale_(optimizer)
    if config["shared_gradient_scaling"]:
        scale_shared_gradients(model.model)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    clip = config["clip_grad_norm"]
    grad_norm = torch.nn.utils.clip_grad_norm_(params, clip if clip else math.inf)
    if scaler is None:
        if not torch.isfinite(grad_norm):
            raise TrainingError("non-finite gradient norm")
        optimizer.step()
        stepped = True
    else:
        scale = scaler.get_scale()
        scaler.step(optimizer)  # skipped when unscale_ found a non-finite gradient
        scaler.update()  # which lowers the scale, and only then
        stepped = scaler.get_scale() >= scale
    if ema is not None and stepped:
        ema.update(model)
    return StepResult(
        loss=global_loss,
        energy_term=energy_term.detach(),
        force_term=None if force_term is None else force_term.detach(),
        num_systems=num_systems,
        grad_norm=grad_norm,
        predictions={key: value.detach() for key, value in out.items()},
    )


def validate(model: Normalized, dataset, config: Mapping, device, dtype) -> dict[str, float]:
    """Energy MAE (eV) and force MAE on free atoms (eV/A) over the whole split, with the
    validation systems dealt to the data-parallel groups."""
    dims = get_dims()
    indices = list(range(dims.dp_rank, len(dataset), dims.dp_size))
    per_rank = val_batch_per_group(config, dims.dp_size)
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
    # Data parallel: error sums and counts over the D groups.
    sums = dp_sum(sums)
    result = {"energy_mae": float(sums[0] / sums[1])}
    if sums[3] > 0:
        result["forces_mae"] = float(sums[2] / sums[3])
    return result


def peak_memory_mb(device: torch.device) -> float:
    """This process's peak memory: allocated CUDA memory on a GPU, else peak RSS (MB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kB
