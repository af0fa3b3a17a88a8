"""Processes: joining and leaving torchrun's process group, and the few world-level helpers the
command lines share (`is_main`, `broadcast`, `gather_world`, `dp_sum`, `any_rank`).

A command that runs under torchrun calls `setup_processes(config)` (a training config: its
G x D layout is checked against the world first) or `join_processes(gp_size, device)`, and
`leave_processes()` in a `finally`. Rank 0 of the world is the one that writes files and logs:
ask `is_main()`. Every call here is a collective on every rank except `world_rank`/`is_main`.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from graphpar.parallel.comm import all_reduce_in_place
from graphpar.parallel.groups import destroy_groups, get_dims, init_groups
from graphpar.training.config import TrainingError, layout_error

__all__ = [
    "any_rank",
    "broadcast",
    "dp_sum",
    "gather_world",
    "is_main",
    "join_processes",
    "leave_processes",
    "setup_processes",
    "world_rank",
]


def setup_processes(config: Mapping) -> torch.device:
    """Join torchrun's process group (gloo on CPU, NCCL on GPU) and build the G x D groups of a
    training config, checking the layout before any work. Returns this rank's device."""
    error = layout_error(config, int(os.environ.get("WORLD_SIZE", "1")))
    if error is not None:
        raise TrainingError(error)
    return join_processes(config["gp_size"], config["device"])


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


def world_rank() -> int:
    """This process's rank in the world (0 without a process group)."""
    return dist.get_rank() if dist.is_initialized() else 0


def is_main() -> bool:
    """Whether this is rank 0 of the world: the process that writes shared files and logs."""
    return world_rank() == 0


def broadcast(value: Any) -> Any:
    """Rank 0's `value` on every rank."""
    if not dist.is_initialized():
        return value
    box = [value]
    # Data parallel: every rank of the world receives rank 0's object.
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_world(value: Any) -> list:
    """Every rank's `value`, in rank order, on every rank."""
    if not dist.is_initialized():
        return [value]
    values = [None] * dist.get_world_size()
    # Data parallel: all-gather of one object per rank over the world.
    dist.all_gather_object(values, value)
    return values


def dp_sum(value: Tensor) -> Tensor:
    """Sum over the data-parallel group (the G ranks of a group hold the same value)."""
    group = get_dims().dp_group
    if group is not None:
        value = value.clone()
        # Data parallel: all-reduce (sum) over the D ranks with this rank's gp_rank.
        all_reduce_in_place(value, group, "dp_sum")
    return value


def any_rank(flag: bool) -> bool:
    """Whether `flag` is true on any rank of the world (the same answer on every rank)."""
    if not dist.is_initialized():
        return flag
    value = torch.tensor([int(flag)], dtype=torch.int32)
    if dist.get_backend() == "nccl":
        value = value.cuda()
    # Data parallel: all-reduce (max) of one integer over every rank of the world.
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())
