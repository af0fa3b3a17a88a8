"""Real multi-process runs for the graph-parallel tests: gloo on 127.0.0.1, short timeouts.

A test calls `spawn(entry, world_size, *args)`; each process runs
`entry(rank, world_size, port, *args)`, whose body sits inside `process_group(rank, world_size,
port)`. A rank's exception is re-raised in the test; a hung collective fails after `timeout_s`
instead of gloo's 30-minute default.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import socket
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from graphpar.parallel import destroy_groups


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(entry, world_size: int, *args) -> None:
    """Run `entry(rank, world_size, port, *args)` on `world_size` processes."""
    mp.spawn(entry, args=(world_size, free_port(), *args), nprocs=world_size)


@contextlib.contextmanager
def process_group(rank: int, world_size: int, port: int, timeout_s: float = 60):
    """A gloo process group on 127.0.0.1 for the body of a spawned rank; torn down after it."""
    torch.set_num_threads(1)  # up to 4 ranks share 2 cores
    if sys.platform == "linux":
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # stay on 127.0.0.1
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=timeout_s),
    )
    try:
        yield
    finally:
        destroy_groups()
        dist.destroy_process_group()
