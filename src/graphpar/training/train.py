"""Train DimeNet++ or GemNet-T with graph parallelism x data parallelism.

One process (G = D = 1), then one node with G = 2 graph parallel x D = 2 data parallel:

    python -m graphpar.training.train --config run.yaml --out results/mini/checkpoints/dimenetpp
    torchrun --standalone --nproc_per_node=4 -m graphpar.training.train --config run.yaml --out DIR

Several nodes (the same command on every node; HEAD is the first node's address):

    torchrun --nnodes=32 --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint=$HEAD:29500 \\
        --rdzv-id=$SLURM_JOB_ID -m graphpar.training.train --config run.yaml --out DIR

A run restarted on the same --out continues from its last checkpoint, bit for bit, with no
flag; so `torchrun --max-restarts=3 ...` survives crashed ranks. One run at a time holds --out
(a second is refused; a killed run's lock and temporaries are cleaned up by the next), and a
resumed run refuses datasets other than those its checkpoint was trained on.

Preemption: SIGTERM or SIGUSR1 on any rank (SLURM's warning before the time limit, a preempting
job, torchrun passing on its own signal) stops the run after the step under way: after each
step the ranks agree through one all-reduce of a stop flag, rank 0 writes checkpoint.pt, and
every process exits with status 75 (PREEMPTED, sysexits' EX_TEMPFAIL, "preempted at step N,
checkpoint written" in the log); rerunning the same command resumes from that step.

The config keys are in src/graphpar/schemas/train.schema.yaml and config/README.md (--config
a YAML file, or --config-json the same as one JSON string). --out receives checkpoint.pt (the
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
import json
import logging
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Mapping
from pathlib import Path

import torch
from tqdm import tqdm

from graphpar.io import atomic_path, remove_temporaries, write_json
from graphpar.lock import FolderLocked, main_rank_lock
from graphpar.parallel import (
    any_rank,
    broadcast,
    dp_sum,
    gather_world,
    get_dims,
    is_main,
    leave_processes,
    setup_processes,
)
from graphpar.training.checkpoint import (
    RunState,
    load_initial_weights,
    read_resumable,
    write_checkpoint,
)
from graphpar.training.config import (
    TrainingError,
    add_config_arguments,
    config_source,
    load_config,
)
from graphpar.training.data import (
    TrainingData,
    batch_sampler,
    check_resumed_data,
    epoch_batches,
)
from graphpar.training.ema import EMA
from graphpar.training.normalization import build_normalized_model, normalization_stats
from graphpar.training.step import (
    DTYPES,
    StepResult,
    build_optimizer,
    grad_scaler,
    peak_memory_mb,
    plateau_metric,
    to_device,
    train_step,
    validate,
    warm_up,
)

log = logging.getLogger("graphpar.training")

# The exit status of a run stopped by STOP_SIGNALS with its checkpoint written (sysexits.h's
# EX_TEMPFAIL, "try again later"): nonzero, so Snakemake counts the job as failed and retries it
# (the retry resumes); torchrun reports it as the workers' exit code and itself exits 1.
PREEMPTED = 75
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Preempted(Exception):
    """The run stopped early on a stop signal; checkpoint.pt holds its last step."""


class StopSignals:
    """While entered (in the main thread), STOP_SIGNALS only set `received`: the training loop
    stops at the end of its step. System calls interrupted by them are restarted, so a
    collective under way is not broken. The previous handlers come back on exit."""

    def __init__(self):
        self.received: int | None = None
        self.previous: dict[int, object] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for number in STOP_SIGNALS:
                self.previous[number] = signal.signal(number, self._handle)
                signal.siginterrupt(number, False)
        return self

    def _handle(self, number: int, frame) -> None:
        self.received = number

    def __exit__(self, *exception) -> None:
        for number, handler in self.previous.items():
            signal.signal(number, handler)


def train(config: Mapping, out: str | os.PathLike, allow_data_mismatch: bool = False) -> Path:
    """Train to the end (resuming from `out`/checkpoint.pt when present); returns final.pt.

    The run folder is locked for the duration (graphpar.lock). A resumed run must find the
    datasets its checkpoint was trained on, unless `allow_data_mismatch`. Raises Preempted
    after a stop signal (StopSignals), with checkpoint.pt written."""
    config, out = load_config(config), Path(out)
    device = setup_processes(config)
    try:
        with main_rank_lock(out, "training"), StopSignals() as stop:
            return train_in(config, out, device, allow_data_mismatch, stop)
    except FolderLocked as error:
        raise TrainingError(str(error)) from None


def train_in(
    config: Mapping, out: Path, device, allow_data_mismatch: bool, stop: StopSignals
) -> Path:
    """`train` in its locked run folder; stops after the step in which `stop` received a
    signal on any rank."""
    dtype = DTYPES[config["dtype"]]
    if is_main():
        log_to(out / "train.log")
        for path in remove_temporaries(out):
            log.info("removed %s, left by a killed run", path)
    checkpoint_path, final_path = out / "checkpoint.pt", out / "final.pt"
    resumed = read_resumable(checkpoint_path, config)
    data = TrainingData.open(config)
    if resumed is not None:
        check_resumed_data(resumed, data.record, checkpoint_path, allow_data_mismatch)
    stats = resumed["normalization"] if resumed else first_statistics(config, data, out)

    model = build_normalized_model(config, stats)
    if resumed is None and config["init_checkpoint"] is not None:
        load_initial_weights(model, Path(config["init_checkpoint"]))
    model = model.to(device=device, dtype=dtype).train()
    optimizer, scheduler = build_optimizer(model, config)
    ema = EMA(model, config["ema_decay"]) if config["ema_decay"] is not None else None
    run = RunState(config, model, optimizer, scheduler, ema, stats, data.graph, data.record)
    run.scaler = grad_scaler(config, device)
    if resumed is not None:
        run.load_state_dict(resumed)
        progress = run.progress
        log.info(
            "resumed from %s at step %d (epoch %d)", checkpoint_path, progress.step, progress.epoch
        )

    sampler = batch_sampler(config, data.sizes)
    total_steps = count_steps(config, len(sampler))
    metrics = MetricsLog(out / "metrics.jsonl", run.progress.step)
    log_start(run, len(data.train), len(sampler))
    progress, bar = run.progress, progress_bar(total_steps, run.progress.step)
    while progress.step < total_steps:
        batches = epoch_batches(
            data.train, sampler, progress.epoch, progress.batch_in_epoch, config["num_workers"]
        )
        for batch in batches:
            started = time.perf_counter()
            warm_up(optimizer, progress.step, config)
            batch = to_device(batch, device, dtype)
            try:
                result = train_step(model, batch, optimizer, config, ema, run.scaler)
            except TrainingError as error:
                raise TrainingError(
                    f"{error} at step {progress.step + 1} (epoch {progress.epoch}, batch "
                    f"{progress.batch_in_epoch} of the epoch, systems {_sids(batch)}); the last "
                    f"good checkpoint is {checkpoint_path}"
                ) from error
            progress.step += 1
            progress.batch_in_epoch += 1
            seconds = time.perf_counter() - started
            if progress.step % config["log_every"] == 0 or progress.step == total_steps:
                record = train_record(run, result, seconds, device)
                metrics.append(record)
                bar.set_postfix(loss=f"{record['loss']:.4g}", sps=f"{record['samples_per_s']:.1f}")
            bar.update(1)
            end_of_epoch = progress.batch_in_epoch == len(sampler)
            if end_of_epoch:
                progress.epoch, progress.batch_in_epoch = progress.epoch + 1, 0
                if isinstance(scheduler, torch.optim.lr_scheduler.ExponentialLR):
                    scheduler.step()
            if data.val is not None and (
                progress.step % config["eval_every"] == 0 or progress.step == total_steps
            ):
                run_validation(run, data.val, metrics, device, dtype)
            checkpointed = progress.step % config["checkpoint_every"] == 0
            if checkpointed or progress.step == total_steps:
                write_checkpoint(checkpoint_path, run.state_dict())
            # World collective, one integer per step: every rank stops after the same step.
            if any_rank(stop.received is not None) and progress.step < total_steps:
                if not checkpointed:
                    write_checkpoint(checkpoint_path, run.state_dict())
                bar.close()
                log.warning(
                    "preempted at step %d, checkpoint written (%s); the same command resumes it",
                    progress.step,
                    checkpoint_path,
                )
                raise Preempted(f"preempted at step {progress.step}")
            if progress.step >= total_steps or end_of_epoch:
                break
    bar.close()
    write_checkpoint(final_path, run.state_dict())
    log.info(
        "done: step %d, best validation %s, wrote %s", progress.step, progress.best, final_path
    )
    return final_path


# ---- the loop's helpers, in the order it calls them ---------------------------------------------


def first_statistics(config: Mapping, data: TrainingData, out: Path) -> dict[str, float]:
    """Normalisation statistics of a new run: computed on rank 0, shared, and written."""
    stats = broadcast(
        normalization_stats(config, data.train, config["task"]) if is_main() else None
    )
    if is_main():
        write_json(out / "normalization.json", stats)
    return stats


def count_steps(config: Mapping, steps_per_epoch: int) -> int:
    """Optimiser steps of the run: max_steps or epochs, whichever ends first."""
    total = math.inf if config["max_steps"] is None else config["max_steps"]
    if config["epochs"] is not None:
        total = min(total, math.ceil(config["epochs"] * steps_per_epoch))
    return int(total)


def log_start(run: RunState, num_systems: int, steps_per_epoch: int) -> None:
    dims = get_dims()
    parameters = sum(p.numel() for p in run.model.parameters() if p.requires_grad)
    log.info(
        "model %s (%s parameters), G x D = %d x %d, %d training systems, %d steps per epoch",
        run.config["model"],
        f"{parameters:,}",
        dims.gp_size,
        dims.dp_size,
        num_systems,
        steps_per_epoch,
    )


def progress_bar(total_steps: int, step: int) -> tqdm:
    return tqdm(total=total_steps, initial=step, desc="train", disable=not is_main() or None)


def train_record(run: RunState, result: StepResult, seconds: float, device) -> dict:
    """The metrics.jsonl line of a training step (collective: every rank calls it)."""
    progress = run.progress
    record = {
        "step": progress.step,
        "epoch": progress.epoch,
        "split": "train",
        "loss": float(result.loss),
        "energy_loss": float(dp_sum(result.energy_term)),
        "lr": run.optimizer.param_groups[0]["lr"],
        "grad_norm": float(result.grad_norm),
        "samples_per_s": float(result.num_systems) / seconds,
        "peak_memory_mb": gather_world(peak_memory_mb(device)),
    }
    if result.force_term is not None:
        record["force_loss"] = float(dp_sum(result.force_term))
    if run.scaler is not None:
        record["loss_scale"] = run.scaler.get_scale()  # amp float16: halved at each skipped step
    return record


def run_validation(run: RunState, dataset, metrics: MetricsLog, device, dtype) -> None:
    """Validate with the EMA weights, step a plateau scheduler, keep the best, log."""
    config, progress = run.config, run.progress
    with run.ema.applied(run.model) if run.ema is not None else contextlib.nullcontext():
        result = validate(run.model, dataset, config, device, dtype)
    metric = plateau_metric(config)
    plateau = isinstance(run.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)
    if plateau and progress.step >= config["scheduler"]["warmup_steps"]:
        run.scheduler.step(result[metric])
    if progress.best is None or result[metric] < progress.best[metric]:
        progress.best = {"step": progress.step, **result}
    metrics.append({"step": progress.step, "epoch": progress.epoch, "split": "val", **result})
    log.info("step %d validation: %s", progress.step, json.dumps(result))


class MetricsLog:
    """metrics.jsonl of a run, written by rank 0: lines after `step` (the checkpoint a resumed
    run starts from) are dropped at the start, then one line per record is appended."""

    def __init__(self, path: Path, step: int):
        self.path = path
        if is_main() and path.exists():
            kept = []
            for line in path.read_text().splitlines():
                try:
                    if json.loads(line)["step"] <= step:
                        kept.append(line)
                except (json.JSONDecodeError, KeyError):
                    continue  # an empty line, or one cut by a kill
            with atomic_path(path) as temporary:
                Path(temporary).write_text("".join(line + "\n" for line in kept))

    def append(self, record: Mapping) -> None:
        if is_main():
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


def _sids(batch) -> str:
    sid = getattr(batch, "sid", None)
    return "sid " + str(sid.tolist()) if sid is not None else f"{batch.num_graphs} systems"


def log_to(path: Path) -> None:
    """The run's log (rank 0): train.log and stderr."""
    if log.handlers:
        return
    log.setLevel(logging.INFO)
    formatter = logging.Formatter("%(asctime)s %(levelname)s %(message)s")
    for handler in (logging.FileHandler(path), logging.StreamHandler(sys.stderr)):
        handler.setFormatter(formatter)
        log.addHandler(handler)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m graphpar.training.train",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config_arguments(parser)
    parser.add_argument("--out", type=Path, required=True, help="run folder (resumed if present)")
    parser.add_argument(
        "--allow-data-mismatch",
        action="store_true",
        help="resume even though the datasets at the config's paths are not those the "
        "checkpoint was trained on (training continues on them with the old normalisation)",
    )
    args = parser.parse_args(argv)
    try:
        train(config_source(args), args.out, args.allow_data_mismatch)
    except TrainingError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)
    except Preempted:
        sys.exit(PREEMPTED)  # rank 0 logged the step; leave_processes runs first
    finally:
        leave_processes()


if __name__ == "__main__":
    main()
