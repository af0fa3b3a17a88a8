"""Checkpoints are read without running any of their code, a damaged one is one clear error,
and a write that fails (here: a real file size limit, EFBIG) keeps the previous checkpoint.

The checkpoint tested is a real one: the tiny workflow's trained DimeNet++ (`tiny_workflow`).
"""

from __future__ import annotations

import builtins
import os
import random
import re
import subprocess
import sys
import time
import zipfile
from itertools import pairwise
from pathlib import Path

import numpy as np
import pytest
import torch

from graphpar.calculator import GraphparCalculator
from graphpar.training.checkpoint import (
    CHECKPOINT_FORMAT,
    load_initial_weights,
    load_trained,
    read_checkpoint,
    set_rng_state,
    trained_model,
    write_checkpoint,
)
from graphpar.training.config import TrainingError


@pytest.fixture(scope="module")
def checkpoint(tiny_workflow) -> Path:
    """A checkpoint written by the trainer (the tiny workflow's, G = 2); read-only."""
    return tiny_workflow / "results" / "tiny" / "checkpoints" / "dimenetpp" / "final.pt"


def assert_same(a, b, where="state") -> None:
    """Two checkpoint states are equal: the same keys, types, tensors and arrays, bit for bit."""
    assert type(a) is type(b), where
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and np.array_equal(a, b), where
    elif isinstance(a, dict):
        assert list(a) == list(b), where
        for key in a:
            assert_same(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), where
        for index, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{where}[{index}]")
    else:
        assert a == b or (a != a and b != b), where  # NaN equals NaN here


# ---- no code runs ------------------------------------------------------------------------------


class Payload:
    """Unpickles as a call of `function(*arguments)`: what a crafted checkpoint would run."""

    def __init__(self, function, *arguments):
        self.function, self.arguments = function, arguments

    def __reduce__(self):
        return self.function, self.arguments


def payloads(target: Path) -> dict[str, Payload]:
    """Each creates `target` if it runs; keyed by the global its pickle names (os.mkdir is
    posix's; pickle's protocol 2, torch.save's, names subprocess.Popen as in Python 2)."""
    return {
        "posix.mkdir": Payload(os.mkdir, str(target)),
        "builtins.exec": Payload(builtins.exec, f"open({str(target)!r}, 'w').close()"),
        "commands.Popen": Payload(subprocess.Popen, ["touch", str(target)]),
    }


@pytest.mark.parametrize("name", ["posix.mkdir", "builtins.exec", "commands.Popen"])
def test_a_checkpoint_that_asks_to_run_code_is_refused_unrun(checkpoint, name, tmp_path):
    """A real checkpoint with a payload in its state: read_checkpoint, load_trained (evaluation,
    relaxations), GraphparCalculator and load_initial_weights (init_checkpoint) all refuse it,
    naming the global and the file, and the payload never runs."""
    target = tmp_path / "pwned"
    state = read_checkpoint(checkpoint)
    crafted = tmp_path / "final.pt"
    torch.save(dict(state, normalization=payloads(target)[name]), crafted)
    model = trained_model(state)
    readers = {
        "read_checkpoint": lambda: read_checkpoint(crafted),
        "load_trained": lambda: load_trained(crafted),
        "GraphparCalculator": lambda: GraphparCalculator(crafted),
        "load_initial_weights": lambda: load_initial_weights(model, crafted),
    }
    for reader, read in readers.items():
        with pytest.raises(TrainingError) as error:
            read()
        message = str(error.value)
        assert f"{crafted} is refused: it asks to run {name}," in message, (reader, message)
        assert not target.exists(), reader
    time.sleep(0.2)  # a process it had started would have touched the file by now
    assert not target.exists()


def test_anything_else_is_refused(checkpoint, tmp_path):
    """The allow-list is exactly the uint32 array of numpy's generator state: an array of another
    dtype (objects included) is refused; so is a pickle of a later protocol (its globals are
    named by an opcode the weights-only loader lacks), and its payload does not run."""
    target = tmp_path / "pwned"
    state = read_checkpoint(checkpoint)
    cases = {
        "numpy.dtypes.Float64DType": (np.zeros(2), 2),
        "numpy.dtypes.ObjectDType": (np.array([None, "x"], dtype=object), 2),
        "Unsupported operand": (payloads(target)["posix.mkdir"], 4),
    }
    for reason, (value, protocol) in cases.items():
        path = tmp_path / f"{reason}.pt"
        torch.save(dict(state, best=value), path, pickle_protocol=protocol)
        with pytest.raises(TrainingError, match=f"{re.escape(str(path))} is refused: .*{reason}"):
            read_checkpoint(path)
    assert not target.exists()


def test_a_real_checkpoint_round_trips_weights_only(checkpoint, tmp_path, monkeypatch):
    """With every torch.load forced to weights_only (torch's own switch), the trainer's
    checkpoint reads whole: the same state as an unrestricted load of this trusted file, written
    again and read back identical, its generators restorable and its model loadable."""
    trusted = torch.load(checkpoint, map_location="cpu", weights_only=False)
    monkeypatch.setenv("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "1")
    state = read_checkpoint(checkpoint)
    assert_same(state, trusted)
    assert state["format"] == CHECKPOINT_FORMAT
    assert state["rng"]["numpy"][1].dtype == np.uint32

    copy = tmp_path / "copy.pt"
    write_checkpoint(copy, state)
    assert_same(read_checkpoint(copy), trusted)
    generators = (torch.get_rng_state(), np.random.get_state(), random.getstate())
    try:
        set_rng_state(state["rng"])
        assert random.getstate() == state["rng"]["python"]
    finally:
        torch.set_rng_state(generators[0])
        np.random.set_state(generators[1])
        random.setstate(generators[2])
    model = load_trained(copy)
    for parameter, shadow in zip(model.parameters(), state["ema"]["shadow"], strict=True):
        assert torch.equal(parameter.detach(), shadow.to(parameter.dtype))


# ---- damaged files -----------------------------------------------------------------------------


def small_checkpoint(checkpoint: Path, path: Path, parameters: int = 3) -> dict:
    """The real checkpoint with only its first `parameters` parameters (and their optimiser
    and EMA states): every kind of value a checkpoint holds, in a file of a few dozen KB."""
    state = read_checkpoint(checkpoint)
    optimizer = state["optimizer"]
    small = dict(
        state,
        model=dict(list(state["model"].items())[:parameters]),
        optimizer=dict(optimizer, state={i: optimizer["state"][i] for i in range(parameters)}),
        ema=dict(state["ema"], shadow=state["ema"]["shadow"][:parameters]),
    )
    write_checkpoint(path, small)
    return small


def changed_bytes(start: int, stop: int, count: int, rng: random.Random) -> list[tuple]:
    """`count` (position, nonzero XOR mask) pairs, one in each `count`-th of bytes
    [start, stop), seeded."""
    bounds = [start + part * (stop - start) // count for part in range(count + 1)]
    return [(rng.randrange(low, high), rng.randrange(1, 256)) for low, high in pairwise(bounds)]


def test_every_single_byte_corruption_is_one_clear_error(checkpoint, tmp_path):
    """200 single-byte changes spread over a small real checkpoint, and 100 more in its zip
    directory (where a changed byte made zipfile raise UnicodeDecodeError or
    NotImplementedError), each give the one "corrupt checkpoint" TrainingError, or, where the
    byte is one no reader checks (a timestamp, say), load the very same state; no other
    exception escapes."""
    good_path = tmp_path / "checkpoint.pt"
    reference = small_checkpoint(checkpoint, good_path)
    good = good_path.read_bytes()
    assert len(good) < 100_000
    with zipfile.ZipFile(good_path) as archive:
        directory = archive.start_dir
    rng = random.Random(14)
    changes = changed_bytes(0, len(good), 200, rng) + changed_bytes(directory, len(good), 100, rng)
    bad = tmp_path / "bad.pt"
    outcomes = {"corrupt": 0, "unchanged": 0}
    start = time.perf_counter()
    for position, mask in changes:
        damaged = bytearray(good)
        damaged[position] ^= mask
        bad.write_bytes(bytes(damaged))
        try:
            state = read_checkpoint(bad)
        except TrainingError as error:
            message = str(error)
            assert message.startswith(f"{bad} is a corrupt checkpoint ("), (position, message)
            assert message.endswith("or restore a good copy") and "\n" not in message, message
            outcomes["corrupt"] += 1
        else:
            assert_same(state, reference, f"byte {position}")
            outcomes["unchanged"] += 1
    elapsed = time.perf_counter() - start
    print(f"{len(changes)} corruptions of {len(good):,} bytes: {outcomes}, {elapsed:.2f} s")
    assert outcomes["corrupt"] >= 0.9 * len(changes), outcomes
    assert elapsed < 10, elapsed


def test_truncated_and_missing_checkpoints(checkpoint, tmp_path):
    good = checkpoint.read_bytes()
    path = tmp_path / "checkpoint.pt"
    for size in (0, 10, len(good) // 2, len(good) - 1):
        path.write_bytes(good[:size])
        with pytest.raises(TrainingError, match=re.escape(f"{path} is a corrupt checkpoint (")):
            read_checkpoint(path)
    with pytest.raises(TrainingError, match=re.escape(f"cannot read checkpoint {tmp_path}/no")):
        read_checkpoint(tmp_path / "no.pt")
    torch.save({"model": {}}, path)  # a valid file that is not ours
    with pytest.raises(TrainingError, match="is not a graphpar checkpoint"):
        read_checkpoint(path)


# ---- a write that fails ------------------------------------------------------------------------

# A process whose files may not grow past half the checkpoint's size (RLIMIT_FSIZE, SIGXFSZ
# ignored: the write fails with EFBIG, as a full disk fails with ENOSPC) writes the checkpoint
# again; exit status 3 and the message on stdout when it is refused.
WRITE_LIMITED = """
import resource, signal, sys
from pathlib import Path
from graphpar.training.checkpoint import read_checkpoint, write_checkpoint
from graphpar.training.config import TrainingError

path = Path(sys.argv[1])
state = read_checkpoint(path)
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (path.stat().st_size // 2, resource.RLIM_INFINITY))
try:
    write_checkpoint(path, dict(state, step=state["step"] + 1))
except TrainingError as error:
    print(error)
    sys.exit(3)
"""


def test_a_failed_write_keeps_the_previous_checkpoint(checkpoint, tmp_path):
    """The write fails for real (EFBIG); the message names the reason, the filesystem (mount
    point, free bytes) and what the checkpoint needs, the old checkpoint's bytes are unchanged
    and no temporary is left."""
    path = tmp_path / "run" / "checkpoint.pt"
    path.parent.mkdir()
    path.write_bytes(checkpoint.read_bytes())
    before = path.read_bytes()
    result = subprocess.run(
        [sys.executable, "-c", WRITE_LIMITED, str(path)], capture_output=True, text=True
    )
    assert result.returncode == 3, result.stdout + result.stderr
    message = result.stdout.strip()
    assert message.startswith(f"cannot write checkpoint {path} (File too large): "), message
    filesystem = re.search(
        r"the filesystem at (\S+) has ([\d,]+) bytes free, the checkpoint "
        r"needs about ([\d,]+); ",
        message,
    )
    assert filesystem, message
    mount = Path(filesystem[1])
    assert os.path.ismount(mount) and path.resolve().is_relative_to(mount.resolve()), message
    assert int(filesystem[3].replace(",", "")) > len(before) // 2, message
    assert message.endswith(f"the previous checkpoint {path} is kept"), message
    assert path.read_bytes() == before
    assert [p.name for p in path.parent.iterdir()] == ["checkpoint.pt"]
