"""Training with real processes: `python -m graphpar.training.train` and `torchrun` (gloo on
127.0.0.1) on the tiny workflow's preprocessed data. Runs whose process no assertion is about
(references, refusals) call the trainer or its CLI's main in this process instead, and
independent runs overlap: starting Python with torch is most of a tiny run's time.

Graph x data parallel runs end with the serial run's weights; a run killed by a real signal
resumes to exactly the weights of an uninterrupted run (also under torchrun --max-restarts);
corrupt checkpoints, foreign checkpoints, NaN losses and impossible configs fail clearly.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import tool_env

from graphpar.data.dataset import BalancedBatchSampler
from graphpar.data.lmdb import ShardedLmdb, ShardWriter, write_metadata
from graphpar.scaling import tensor_bytes
from graphpar.training.checkpoint import read_checkpoint
from graphpar.training.config import (
    TrainingError,
    add_config_arguments,
    config_source,
    load_config,
)

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def data(tiny_workflow) -> dict[str, str]:
    root = tiny_workflow / "resources/mini/lmdb/s2ef"
    return {"train": str(root / "train"), "val": str(root / "val_id")}


def run_config(data, model="dimenetpp-tiny", **overrides) -> dict:
    """A few float64 steps of a tiny model on the tiny workflow's data."""
    config = {
        "model": model,
        "model_args": {"output_initializer": "glorot_orthogonal"} if "dimenet" in model else {},
        "train": [data["train"]],
        "val": data["val"],
        "batch_size": 4,
        "val_batch_size": 4,
        "max_steps": 4,
        "eval_every": 2,
        "checkpoint_every": 2,
        "dtype": "float64",
        "optimizer": {"lr": 1e-3},
        "normalization": {"energy_mean": -0.5, "energy_std": 0.7},
    }
    return {**config, **overrides}


def write_config(config, out: Path) -> Path:
    """The run's config file, next to its folder `out`."""
    out.parent.mkdir(parents=True, exist_ok=True)
    path = out.parent / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def launch(config, out: Path, processes: int = 1, torchrun_args=()) -> subprocess.Popen:
    """`python -m graphpar.training.train` (1 process) or torchrun (several), logs in out.parent."""
    path = write_config(config, out)
    if processes == 1 and not torchrun_args:
        command = [sys.executable, "-m", "graphpar.training.train"]
    else:
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={processes}",
            *torchrun_args,
            "-m",
            "graphpar.training.train",
        ]
    env = dict(tool_env(), GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1")
    log = open(out.parent / f"{out.name}.log", "a")  # noqa: SIM115 (closed with the process)
    return subprocess.Popen(
        [*command, "--config", str(path), "--out", str(out)],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        text=True,
    )


def finish(process: subprocess.Popen, out: Path) -> dict:
    """Wait for a launched run to succeed; its final.pt."""
    code = process.wait(timeout=500)
    log = (out.parent / f"{out.name}.log").read_text()
    assert code == 0, log[-4000:]
    return read_checkpoint(out / "final.pt")


def train(config, out: Path, processes: int = 1, torchrun_args=()) -> dict:
    return finish(launch(config, out, processes, torchrun_args), out)


def fails(config, out: Path, processes: int = 1) -> str:
    """Run expecting failure; the log (stdout + stderr)."""
    process = launch(config, out, processes)
    assert process.wait(timeout=300) != 0
    return (out.parent / f"{out.name}.log").read_text()


def close_log() -> None:
    """Drop the handlers that an in-process run's log_to added (its train.log and stderr)."""
    from graphpar.training.train import log

    for handler in log.handlers:
        handler.close()
    log.handlers.clear()


def train_here(config, out: Path) -> dict:
    """`train` in this process (no interpreter to start); final.pt."""
    from graphpar.training import train as trainer

    try:
        trainer.train(config, out)
    finally:
        close_log()
    return read_checkpoint(out / "final.pt")


def fails_here(config, out: Path, capsys) -> str:
    """The CLI's main in this process (`--config FILE --out out`), expecting it to exit with an
    error; its stdout + stderr. An exception other than SystemExit propagates: a traceback."""
    from graphpar.training.train import main

    capsys.readouterr()
    try:
        with pytest.raises(SystemExit) as exit:
            main(["--config", str(write_config(config, out)), "--out", str(out)])
    finally:
        close_log()
    assert exit.value.code not in (0, None)
    captured = capsys.readouterr()
    return captured.out + captured.err


def weights(state) -> dict[str, torch.Tensor]:
    named = dict(state["model"])
    named.update({f"ema.{i}": t for i, t in enumerate(state["ema"]["shadow"])})
    return named


def assert_close(a, b, rtol) -> None:
    assert a.keys() == b.keys()
    for name in a:
        scale = b[name].abs().max().clamp(min=1e-30)
        assert float((a[name] - b[name]).abs().max() / scale) <= rtol, name


def assert_equal(a, b) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def wait_for_checkpoint(out: Path, process: subprocess.Popen, step: int) -> None:
    """Poll until checkpoint.pt holds at least `step` steps."""
    deadline = time.time() + 300
    while time.time() < deadline:
        assert process.poll() is None, "the run ended before it could be killed"
        path = out / "checkpoint.pt"
        if path.exists():
            try:
                if read_checkpoint(path)["step"] >= step:
                    return
            except (TrainingError, RuntimeError, EOFError):
                pass  # replaced while reading
        time.sleep(0.05)
    raise AssertionError("no checkpoint appeared")


# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model", ["dimenetpp-tiny", "gemnet-tiny"])
def test_graph_and_data_parallel_training_match_serial(data, model, tmp_path):
    """4 steps (float64) with G x D = 2 x 2 end with the weights (and EMA weights) of G = 1 on
    the same global batches, to 1e-8 relative; validation metrics agree too. (G = 2 alone
    trains the tiny workflow's models, and tests/cluster/test_slurm.py runs it again.)"""
    config = run_config(data, model)
    parallel = launch(dict(config, gp_size=2, dp_size=2), tmp_path / "g2d2", processes=4)
    serial = train_here(config, tmp_path / "g1")  # while torchrun runs
    assert serial["step"] == 4
    both = finish(parallel, tmp_path / "g2d2")
    initial = read_checkpoint(tmp_path / "g1" / "checkpoint.pt")  # the end state, step 4
    assert_equal(weights(initial), weights(serial))
    assert_close(weights(both), weights(serial), rtol=1e-8)
    for key in ("energy_mae", "forces_mae"):
        assert both["best"][key] == pytest.approx(serial["best"][key], rel=1e-8)
    lines = [json.loads(x) for x in (tmp_path / "g2d2" / "metrics.jsonl").read_text().splitlines()]
    train_lines = [x for x in lines if x["split"] == "train"]
    assert [x["step"] for x in train_lines] == [1, 2, 3, 4]
    assert all(len(x["peak_memory_mb"]) == 4 for x in train_lines)
    assert {x["step"] for x in lines if x["split"] == "val"} == {2, 4}


def test_killed_run_resumes_to_the_same_weights(data, tmp_path):
    """SIGKILL after the step-2 checkpoint; the restarted run (same command, no flag) ends with
    exactly the uninterrupted run's weights, optimiser and EMA, and metrics.jsonl has one line
    per step."""
    config = run_config(data, max_steps=6, checkpoint_every=2, eval_every=4)
    uninterrupted = launch(config, tmp_path / "reference")  # alongside the killed run

    process = launch(config, tmp_path / "killed")
    wait_for_checkpoint(tmp_path / "killed", process, step=2)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (tmp_path / "killed" / "final.pt").exists()
    resumed = train(config, tmp_path / "killed")
    reference = finish(uninterrupted, tmp_path / "reference")
    assert "resumed from" in (tmp_path / "killed.log").read_text()
    assert "took over the lock of process" in (tmp_path / "killed.log").read_text()
    assert_equal(weights(resumed), weights(reference))
    assert resumed["optimizer"]["state"].keys() == reference["optimizer"]["state"].keys()
    steps = [json.loads(x)["step"] for x in (tmp_path / "killed" / "metrics.jsonl").open()]
    assert steps == [json.loads(x)["step"] for x in (tmp_path / "reference/metrics.jsonl").open()]


def test_one_run_per_folder_and_a_resumed_run_refuses_replaced_data(data, tmp_path):
    """A second training on a held run folder is refused (nothing written); a resumed run
    refuses a dataset replaced at the same path (naming both identities) unless told, and
    clears the temporaries a killed run left."""
    import shutil

    from graphpar.lock import folder_lock
    from graphpar.training import train as trainer

    shutil.copytree(data["train"], tmp_path / "train")
    config = run_config({**data, "train": str(tmp_path / "train")}, max_steps=2, val=None)
    out = tmp_path / "run"
    try:
        with folder_lock(out, "training"), pytest.raises(TrainingError, match="in use by another"):
            trainer.train(config, out)
        assert sorted(p.name for p in out.iterdir()) == []  # its lock released, nothing written
        trainer.train(config, out)

        shutil.rmtree(tmp_path / "train")
        shutil.copytree(data["val"], tmp_path / "train")  # other systems, at the same path
        left = out / ".checkpoint.pt.tmp-abc123"
        left.write_bytes(b"half a checkpoint")
        longer = dict(config, max_steps=3)
        with pytest.raises(TrainingError, match=r"is not the data .* \(identity \w{16} in the"):
            trainer.train(longer, out)
        assert not left.exists()
        assert trainer.train(longer, out, allow_data_mismatch=True).name == "final.pt"
        assert read_checkpoint(out / "final.pt")["step"] == 3
    finally:
        close_log()  # log_to's handlers on this run's train.log


def torchrun_config(data) -> dict:
    """G = 2 under torchrun: the killed-rank and preemption tests' run."""
    return run_config(data, "gemnet-tiny", gp_size=2, max_steps=6, checkpoint_every=2)


@pytest.fixture(scope="module")
def torchrun_reference(data, tmp_path_factory):
    """The uninterrupted run of torchrun_config, started when a test first asks for it and
    running alongside that test's own run: a function that waits for it and returns its
    final.pt."""
    out = tmp_path_factory.mktemp("torchrun") / "run"
    process = launch(torchrun_config(data), out, processes=2)
    final = {}

    def reference() -> dict:
        if not final:
            final["pt"] = finish(process, out)
        return final["pt"]

    yield reference
    if process.poll() is None:  # a test failed before it waited
        process.terminate()  # torchrun passes SIGTERM on to its workers
        process.wait(timeout=60)


def test_torchrun_restarts_a_killed_rank_from_the_checkpoint(data, torchrun_reference, tmp_path):
    """torchrun --max-restarts=1, G = 2: one rank killed by SIGKILL mid-run; the group restarts,
    resumes from the last checkpoint, and ends with the uninterrupted run's weights. (Without
    the trainer's per-attempt store prefix the restarted ranks read the dead attempt's gloo
    addresses and hang or fail to connect.)"""
    config = torchrun_config(data)
    out = tmp_path / "restarted"
    process = launch(config, out, processes=2, torchrun_args=["--max-restarts=1"])
    wait_for_checkpoint(out, process, step=2)
    workers = _children(process.pid)
    assert len(workers) == 2, workers
    os.kill(workers[-1], signal.SIGKILL)
    assert process.wait(timeout=500) == 0, (tmp_path / "restarted.log").read_text()[-4000:]
    assert "resumed from" in (tmp_path / "restarted.log").read_text()
    assert_equal(weights(read_checkpoint(out / "final.pt")), weights(torchrun_reference()))


def test_a_signalled_worker_stops_every_rank_with_a_checkpoint_and_resumes(
    data, torchrun_reference, tmp_path
):
    """Preemption under torchrun, G = 2: SIGUSR1 to ONE worker mid-run; both ranks stop after
    the same step (the all-reduced stop flag), rank 0 writes checkpoint.pt at that step, the
    workers exit with PREEMPTED (75; torchrun then fails), and the same command resumes at that
    very step (no step lost or repeated) to exactly the uninterrupted run's weights."""
    from graphpar.training.train import PREEMPTED

    config = torchrun_config(data)
    out = tmp_path / "preempted"
    process = launch(config, out, processes=2)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 300
    while not (metrics.exists() and metrics.read_text().count("\n") >= 1):
        assert process.poll() is None and time.time() < deadline, "no training steps"
        time.sleep(0.05)
    workers = _children(process.pid)
    assert len(workers) == 2, workers
    os.kill(workers[-1], signal.SIGUSR1)  # rank 1: rank 0 learns it through the all-reduce
    assert process.wait(timeout=300) != 0
    log = (tmp_path / "preempted.log").read_text()
    stopped = re.search(r"preempted at step (\d+), checkpoint written", log)
    assert stopped, log[-4000:]
    assert f"exitcode  : {PREEMPTED}" in log, log[-4000:]
    step = int(stopped[1])
    assert 1 <= step < 6 and read_checkpoint(out / "checkpoint.pt")["step"] == step
    assert not (out / "final.pt").exists()

    resumed = train(config, out, processes=2)
    assert (
        f"resumed from {out / 'checkpoint.pt'} at step {step} "
        in (tmp_path / "preempted.log").read_text()
    )
    assert_equal(weights(resumed), weights(torchrun_reference()))
    lines = [json.loads(x) for x in metrics.read_text().splitlines()]
    assert [x["step"] for x in lines if x["split"] == "train"] == list(range(1, 7))


def _children(pid: int) -> list[int]:
    """Child processes of `pid` (Linux /proc)."""
    children = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        text = (task / "children").read_text().split()
        children.extend(int(c) for c in text)
    return sorted(children)


def test_corrupt_and_foreign_checkpoints_are_refused(data, tmp_path, capsys):
    config = run_config(data, max_steps=2)
    out = tmp_path / "run"
    train_here(config, out)
    good = (out / "checkpoint.pt").read_bytes()

    # The CLI's refusal is checked below (another config); these are read_checkpoint's.
    bad = tmp_path / "bad.pt"
    bad.write_bytes(good[: len(good) // 2])
    with pytest.raises(TrainingError, match="truncated or not a checkpoint"):
        read_checkpoint(bad)
    corrupt = bytearray(good)
    corrupt[len(corrupt) // 3] ^= 0xFF
    bad.write_bytes(bytes(corrupt))
    with pytest.raises(TrainingError, match="is corrupt"):
        read_checkpoint(bad)

    (out / "checkpoint.pt").write_bytes(good)
    message = fails_here(dict(config, optimizer={"lr": 2e-3}), out, capsys)
    assert "belongs to a different config" in message
    # Longer runs of the same config continue from it.
    assert train_here(dict(config, max_steps=3), out)["step"] == 3


def test_non_finite_loss_stops_with_the_last_good_checkpoint(data, tmp_path):
    """A NaN energy label in the 3rd batch: the run stops naming step 3 and the systems, and
    checkpoint.pt stays the step-2 state."""
    source = ShardedLmdb(data["train"])
    arrays = {name: values[:12] for name, values in source.arrays.items()}
    batches = list(BalancedBatchSampler(arrays["natoms"], batch_size=4, seed=0))
    poisoned = batches[2][0]  # the order the run's sampler draws (balance_on atoms, seed 0)
    nan_data = tmp_path / "nan"
    nan_data.mkdir()
    with ShardWriter(nan_data / "data.0000.lmdb") as writer:
        for index in range(12):
            sample = dict(source[index])
            if index == poisoned:
                sample["energy"] = np.full_like(sample["energy"], np.nan)
            writer.append(sample)
    write_metadata(nan_data, {"cutoff": source.metadata["cutoff"]}, arrays)

    config = run_config({"train": str(nan_data), "val": None}, max_steps=6, checkpoint_every=1)
    out = tmp_path / "run"
    log = fails(dict(config, balance_on="atoms", seed=0), out)
    sid = int(source[poisoned]["sid"])
    assert "non-finite loss (nan) at step 3" in log and str(sid) in log, log[-2000:]
    assert "Traceback" not in log
    assert read_checkpoint(out / "checkpoint.pt")["step"] == 2
    assert not (out / "final.pt").exists()


def test_impossible_configs_fail_before_any_work(data, tmp_path, capsys):
    """The CLI (its main, in this process) stops with the reason and no traceback, before
    writing anything: for a config that the schema refuses, and for each check that needs the
    data or the process group. The other config errors are load_config's, which that first case
    runs. (test_non_finite_loss_... sees a real process fail without a traceback.)"""
    base = run_config(data)
    cases = {
        "Additional properties are not allowed ('learning_rate'": dict(base, learning_rate=1),
        "gp_size 2 does not divide the world size 1": dict(base, gp_size=2),
        "training dataset /nonexistent": dict(base, train=["/nonexistent"]),
        "task is2re has no force labels": dict(base, task="is2re"),
        "preprocessed with cutoff 6.0 A but the model uses 5.0 A": dict(
            base, model_args={"cutoff": 5.0}
        ),
    }
    for number, (message, config) in enumerate(cases.items()):
        out = tmp_path / f"case{number}"
        log = fails_here(config, out, capsys)
        assert message in log, (message, log[-2000:])
        assert not (out / "checkpoint.pt").exists()
        assert "Traceback" not in log, log[-2000:]
    refused = {
        "unknown model 'dimenetpp-huge'": dict(base, model="dimenetpp-huge"),
        "set max_steps or epochs": dict(base, max_steps=None),
        "unknown model_args hidden_size for model dimenetpp-tiny": dict(
            base, model_args={"hidden_size": 8}
        ),
        "batch_size": dict(base, batch_size=0),
    }
    for message, config in refused.items():
        with pytest.raises(TrainingError, match=re.escape(message)):
            load_config(config)
    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    for text, message in (("{model", "is not JSON"), ("[1]", "is not a JSON object")):
        with pytest.raises(TrainingError, match=message):
            config_source(parser.parse_args(["--config-json", text]))
    assert config_source(parser.parse_args(["--config-json", '{"a": 1}'])) == {"a": 1}


def test_cli_help(capsys):
    """--help, in this process (the other tests start the CLI as `python -m` and torchrun)."""
    from graphpar.training.train import main

    with pytest.raises(SystemExit) as exit:
        main(["--help"])
    assert exit.value.code == 0 and "torchrun" in capsys.readouterr().out


def test_fine_tuning_starts_from_a_checkpoint_with_exponential_decay(tiny_workflow, tmp_path):
    """GemNet-XL-FT's recipe on the tiny data: energy-only on IS2RE from the workflow's trained
    DimeNet++, x gamma per epoch; with a negligible learning rate the weights stay the source's
    EMA weights."""
    source = tiny_workflow / "results" / "tiny" / "checkpoints" / "dimenetpp" / "final.pt"
    is2re = tiny_workflow / "resources" / "mini" / "lmdb" / "is2re"
    config = {
        "model": "dimenetpp-tiny",
        "task": "is2re",
        "train": [str(is2re / "train")],
        "val": str(is2re / "val_id"),
        "init_checkpoint": str(source),
        "batch_size": 2,
        "epochs": 2,
        "eval_every": 100,
        "optimizer": {"lr": 1e-12},
        "scheduler": {"name": "exponential", "gamma": 0.5},
        "loss": {"energy_coefficient": 1, "force_coefficient": 0},
    }
    tuned = train_here(config, tmp_path / "ft")
    lines = [json.loads(x) for x in (tmp_path / "ft" / "metrics.jsonl").read_text().splitlines()]
    rates = {x["step"]: x["lr"] for x in lines if x["split"] == "train"}
    assert rates == {1: 1e-12, 2: 1e-12, 3: 5e-13, 4: 5e-13}  # 4 systems, 2 steps per epoch
    assert "forces_mae" not in [x for x in lines if x["split"] == "val"][-1]
    start = read_checkpoint(source)
    for shadow, tuned_param in zip(start["ema"]["shadow"], tuned["ema"]["shadow"], strict=True):
        assert torch.allclose(shadow, tuned_param, rtol=1e-6, atol=1e-9)
    assert tuned["normalization"] != start["normalization"]  # IS2RE statistics, not S2EF's


def test_datasets_concatenate(data):
    from graphpar.training.data import open_datasets

    config = load_config(run_config(data, train=[data["train"], data["val"]]))
    dataset, sizes, parts = open_datasets(config, "dimenetpp")
    assert len(dataset) == len(parts[0]) + len(parts[1]) == len(sizes)
    assert int(dataset[len(parts[0])].sid) == int(parts[1][0].sid)


def test_model_arguments_table_matches_the_constructors():
    """The torch-free config check of `model_args` reads a static table: it names every
    registered model and exactly its constructor's arguments."""
    import inspect

    from graphpar.models import MODELS
    from graphpar.training.config import MODEL_ARGUMENTS

    assert set(MODEL_ARGUMENTS) == set(MODELS)
    for name, (factory, defaults) in MODELS.items():
        arguments = set(inspect.signature(factory).parameters)
        assert MODEL_ARGUMENTS[name] == arguments, name
        assert set(defaults) <= arguments, name


def test_config_module_does_not_import_torch():
    """Snakemake validates run configs when it parses the workflow: that must not load torch."""
    code = (
        "import sys, graphpar.training.config; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'torch_geometric'}))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.strip() == "[]", result.stderr


def test_scaling_measures_the_trainers_step(data, tmp_path):
    """`python -m graphpar.scaling` runs the trainer's step: the same losses, step by step, and
    the same optimiser (AdamW with amsgrad) and EMA state bytes as `python -m
    graphpar.training.train` on the same config and data."""
    config = run_config(
        data,
        "gemnet-tiny",
        batch_size=2,
        val=None,
        normalization={"energy_mean": 0.0, "energy_std": 1.0},  # as the scaling study's
    )
    out = tmp_path / "scaling.json"
    command = [sys.executable, "-m", "graphpar.scaling", "--config-json", json.dumps(config)]
    command += ["--out", str(out), "--warmup", "2", "--steps", "2"]
    env = dict(tool_env(), OMP_NUM_THREADS="1")
    scaling = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )

    trained = train_here(config, tmp_path / "train")  # while the scaling run starts
    lines = (tmp_path / "train" / "metrics.jsonl").read_text().splitlines()
    losses = [json.loads(line)["loss"] for line in lines]

    _, stderr = scaling.communicate(timeout=300)
    assert scaling.returncode == 0, stderr[-4000:]
    provenance = json.loads(out.read_text())["provenance"]

    assert len(losses) == 4 and provenance["losses"] == pytest.approx(losses, rel=1e-12)
    optimizer_bytes = tensor_bytes(trained["optimizer"]["state"])
    weight_bytes = tensor_bytes(list(trained["ema"]["shadow"]))
    assert optimizer_bytes >= 3 * weight_bytes  # exp_avg, exp_avg_sq and amsgrad's max
    assert provenance["optimizer_state_bytes"] == optimizer_bytes
    assert provenance["ema_state_bytes"] == weight_bytes


def test_model_argument_types_match_the_constructors():
    """`model_args` values are checked against a static table of the constructors' annotations:
    it matches them, and each constructor default passes the check."""
    import inspect

    from graphpar.models import MODELS
    from graphpar.training.config import MODEL_ARGUMENT_TYPES

    checked = set()
    for name, (factory, _) in MODELS.items():
        parameters = inspect.signature(factory).parameters
        assert MODEL_ARGUMENT_TYPES[name] == {k: str(p.annotation) for k, p in parameters.items()}
        if factory in checked:
            continue
        checked.add(factory)
        for argument, parameter in parameters.items():
            config = {"model": name, "train": ["x"], "max_steps": 1}
            load_config(dict(config, model_args={argument: parameter.default}))


def test_model_args_errors_name_the_key_and_the_nearest_argument():
    base = {"model": "gemnet-tiny", "train": ["x"], "max_steps": 1}
    refused = {
        "unknown model_args emb_size_atoms for model gemnet-tiny (did you mean emb_size_atom?)": {
            "emb_size_atoms": 8
        },
        "unknown model_args cutof, num_blokcs for model gemnet-tiny (did you mean cutoff for "
        "cutof, num_blocks for num_blokcs?)": {"cutof": 5.0, "num_blokcs": 2},
        "model_args.cutoff is 'six', not float (model gemnet-tiny)": {"cutoff": "six"},
        "model_args.num_blocks is 2.5, not int": {"num_blocks": 2.5},
        "model_args.num_blocks is True, not int": {"num_blocks": True},
        "model_args.direct_forces is 1, not bool": {"direct_forces": 1},
        "model_args.rbf is 'gaussian', not Mapping | None": {"rbf": "gaussian"},
    }
    for message, model_args in refused.items():
        with pytest.raises(TrainingError, match=re.escape(f"training config: {message}")):
            load_config(dict(base, model_args=model_args))
    load_config(dict(base, model_args={"cutoff": 6, "rbf": {"name": "gaussian"}, "cbf": None}))


def test_layout_is_checked_by_load_config_with_the_launchs_message(monkeypatch):
    """One check of G, D, world size and batch: the trainer's at launch (setup_processes), and
    load_config's on the G x D launch that a set dp_size asks for (the workflow's, at parse
    time); with dp_size null only the launch knows D."""
    from graphpar.parallel.launch import setup_processes
    from graphpar.training.config import layout_error

    base = {"model": "dimenetpp-tiny", "train": ["x"], "max_steps": 1}
    with pytest.raises(
        TrainingError, match="^training config: batch_size 4 is not a multiple of D = 3$"
    ):
        load_config(dict(base, gp_size=2, dp_size=3, batch_size=4))
    config = load_config(dict(base, gp_size=2, batch_size=3))  # D = world size / 2
    assert layout_error(config, 2) is None
    assert layout_error(config, 4) == "batch_size 3 is not a multiple of D = 2"
    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(TrainingError, match="^batch_size 3 is not a multiple of D = 2$"):
        setup_processes(config)
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(TrainingError, match="^gp_size 2 does not divide the world size 3: "):
        setup_processes(config)
    config = load_config(dict(base, gp_size=2, dp_size=2, batch_size=4))
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(
        TrainingError, match=r"asks for G x D = 2 x 2 processes, torchrun started 2"
    ):
        setup_processes(config)
