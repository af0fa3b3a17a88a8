"""Real multi-process runs for the graph-parallel tests: gloo on 127.0.0.1, short timeouts.

Two ways to run ranks:

* `spawn(entry, world_size, *args)`: each of `world_size` new processes runs
  `entry(rank, world_size, port, *args)`, whose body sits inside `process_group(rank,
  world_size, port)`.
* `spawn_worlds(run, worlds, out)`: one launch of as many processes as the largest world
  (forked from one fresh process, so torch is imported once) runs several worlds in turn, each
  a real gloo world of its own size (its own default process group, `init_groups` on it as in a
  launch of that size) on the first ranks of the launch, the others idle. Starting a process
  (importing torch) costs far more than a tiny world's work, so tests share one launch and each
  reads its world's results.

A rank's exception is re-raised in the test; a hung collective fails after `timeout_s`
instead of gloo's 30-minute default.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import socket
import sys
from collections.abc import Callable
from pathlib import Path

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


def _set_up_process() -> None:
    torch.set_num_threads(1)  # up to 4 ranks share 2 cores
    if sys.platform == "linux":
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # stay on 127.0.0.1


@contextlib.contextmanager
def process_group(
    rank: int, world_size: int, port: int | None = None, timeout_s: float = 60, store=None
):
    """A gloo process group on 127.0.0.1 (at `port`, or on `store`) for the body of a spawned
    rank; torn down after it."""
    _set_up_process()
    dist.init_process_group(
        "gloo",
        init_method=None if store is not None else f"tcp://127.0.0.1:{port}",
        store=store,
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=timeout_s),
    )
    try:
        yield
    finally:
        destroy_groups()
        dist.destroy_process_group()


def spawn_worlds(
    run: Callable, worlds: dict[str, tuple[int, tuple]], out: Path, timeout_s: float = 60
) -> dict[str, list]:
    """Run each world `name: (size, args)` in turn in one launch: ranks 0..size-1 of the launch
    form a gloo world of `size` and each calls `run(*args)` inside it (a picklable, module-level
    function). The results: {name: [what `run` returned on rank 0, 1, ..., size - 1]}.

    Any rank's exception aborts the whole launch and is re-raised here."""
    nprocs = max(size for size, _ in worlds.values())
    out = Path(out)
    for name in worlds:
        (out / name).mkdir(parents=True)
    args = (nprocs, free_port(), run, worlds, str(out), timeout_s)
    mp.spawn(_fork_ranks, args=args, nprocs=1)
    return {
        name: [torch.load(out / name / f"rank{r}.pt") for r in range(size)]
        for name, (size, _) in worlds.items()
    }


def _fork_ranks(_, nprocs: int, *args) -> None:
    """A fresh process that has imported torch and `run`'s module (to unpickle it) forks the
    ranks, which so start with them imported: one import of torch per launch instead of one per
    rank. It has run nothing that forking could break (no threads, no process group)."""
    mp.start_processes(_run_worlds, args=(nprocs, *args), nprocs=nprocs, start_method="fork")


def _run_worlds(rank, nprocs, port, run, worlds, out, timeout_s) -> None:
    """Entry point of each process of `spawn_worlds`: one TCP store for the launch, one key
    prefix (hence one fresh default process group) per world."""
    _set_up_process()
    timeout = datetime.timedelta(seconds=timeout_s)
    store = dist.TCPStore("127.0.0.1", port, nprocs, is_master=rank == 0, timeout=timeout)
    patience = datetime.timedelta(seconds=600)  # for whole worlds: a test's timeout is shorter
    for name, (size, args) in worlds.items():
        if rank < size:
            with process_group(
                rank, size, timeout_s=timeout_s, store=dist.PrefixStore(name, store)
            ):
                result = run(*args)
            torch.save(result, Path(out) / name / f"rank{rank}.pt")
            if rank == 0:
                store.set(f"over/{name}", "1")
        # Worlds run one after the other: nobody waits for the next one inside its rendezvous.
        store.wait([f"over/{name}"], patience)
    # Rank 0 serves the store: it leaves only once every rank is done with it.
    store.set(f"done/{rank}", "1")
    if rank == 0:
        store.wait([f"done/{r}" for r in range(nprocs)], patience)
