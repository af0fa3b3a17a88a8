"""Converting OCP/fairchem checkpoints (tests/data/fairchem-checkpoints: written by fairchem-core
1.10.0 in the published layouts, with fairchem's float64 outputs) into graphpar checkpoints: the
converted models reproduce fairchem's outputs on fairchem's graphs and on graphs of our own
preprocessing under the fairchem convention; DimeNet++'s detached-angle forces; refusals."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from types import SimpleNamespace

import ase.io
import numpy as np
import pytest
import torch
from conftest import DATA

from graphpar.calculator import GraphparCalculator
from graphpar.convert import SUPPORTED_MODELS, convert_checkpoint, main
from graphpar.data.dataset import LmdbDataset, collate
from graphpar.preprocess import main as preprocess_main
from graphpar.training.checkpoint import load_trained, read_checkpoint, trained_model
from graphpar.training.config import TrainingError, load_config
from graphpar.training.data import check_checkpoint_data

FIXTURE = DATA / "fairchem-checkpoints"
STD, MEAN = 2.887317180633545, -0.7554450631141663  # the fixture checkpoints' normalizers
CASES = {  # name: (checkpoint, model, options)
    "gemnet_t-2021": ("gemnet_t-2021.pt", "gemnet_t", {}),
    "gemnet_t-fairchem1": ("gemnet_t-fairchem1.pt", "gemnet_t", {}),
    "gemnet_t-fairchem1+json": (
        "gemnet_t-fairchem1.pt",
        "gemnet_t",
        {"scale_factors": FIXTURE / "gemnet_t-scale-factors.json"},
    ),
    "dimenetplusplus-2021": ("dimenetplusplus-2021.pt", "dimenetplusplus", {}),
}


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny float64 models: one thread is the fastest (two threads on a busy CPU are 20x
    slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def outputs() -> dict[str, np.ndarray]:
    return dict(np.load(FIXTURE / "outputs.npz"))


def fixture_batch():
    """`graph.npz`: fairchem's batch with its own graph (row 0 source, row 1 target)."""
    graph = dict(np.load(FIXTURE / "graph.npz"))
    natoms = torch.from_numpy(graph["natoms"])
    return SimpleNamespace(
        pos=torch.from_numpy(graph["pos"]),
        atomic_numbers=torch.from_numpy(graph["atomic_numbers"]),
        cell=torch.from_numpy(graph["cell"]),
        natoms=natoms,
        batch=torch.repeat_interleave(torch.arange(natoms.numel()), natoms),
        edge_index=torch.from_numpy(graph["edge_index"]),
        cell_offsets=torch.from_numpy(graph["cell_offsets"]),
    )


def relative(a: torch.Tensor, b: np.ndarray) -> float:
    """Largest deviation relative to the largest reference value."""
    b = torch.as_tensor(b)
    return float((a.detach() - b).abs().max() / b.abs().max())


def converted(tmp_path: Path, case: str, **options) -> tuple[dict, torch.nn.Module]:
    """(the converted checkpoint as read back, its float64 model)."""
    source, _, defaults = CASES[case]
    path = tmp_path / f"{case}.pt"
    convert_checkpoint(FIXTURE / source, path, dtype="float64", **{**defaults, **options})
    state = read_checkpoint(path)
    return state, trained_model(state)


@pytest.mark.parametrize("case", list(CASES))
def test_converted_checkpoint_reproduces_fairchem(case, tmp_path):
    """Each fixture checkpoint converts; read_checkpoint/trained_model build it in float64; on
    fairchem's batch the network gives fairchem's raw outputs and the Normalized model energy *
    std + mean and forces * force std. The config is a valid run config; the record says where
    it came from and which graphs it expects."""
    state, model = converted(tmp_path, case)
    source, name, _ = CASES[case]
    expected = outputs()
    with torch.no_grad():
        raw = model.model(fixture_batch())
        physical = model(fixture_batch())
    for key in ("energy", "forces"):
        reference = expected[f"{name}_{key}"]
        assert float((raw[key] - torch.from_numpy(reference)).abs().max()) < 1e-6, key
        assert relative(raw[key], reference) < 1e-9, key
    assert torch.equal(physical["energy"], raw["energy"] * STD + MEAN)
    assert torch.equal(physical["forces"], raw["forces"] * STD)

    assert state["config"]["model"] == SUPPORTED_MODELS[name]
    assert load_config(state["config"]) == state["config"]
    assert state["source"]["file"] == source and len(state["source"]["sha256"]) == 64
    assert state["source"]["layout"] == ("fairchem-1" if "fairchem1" in case else "ocp-2021")
    graph = {"cutoff": 6.0, "max_neighbors": 50, "graph_convention": "fairchem"}
    assert state["graph"] == graph
    assert state["data"] == {**graph, "energy_reference": "adsorption", "datasets": {}}


def test_dimenetpp_detached_angles_reproduce_fairchem_full_gradient_does_not(tmp_path):
    """fairchem's DimeNet++ forces (angles on detached positions) by default; with
    detached_angles=False the forces are -dE/dpos (a central difference of the energy along a
    random direction) and differ from fairchem's; the energies are the same both ways."""
    expected = outputs()
    _, detached = converted(tmp_path, "dimenetplusplus-2021")
    state, full = converted(tmp_path, "dimenetplusplus-2021", detached_angles=False)
    assert state["config"]["model_args"]["detach_angles"] is False
    batch = fixture_batch()
    with torch.no_grad():
        fairchem_like, gradient = detached.model(batch), full.model(batch)
    assert torch.equal(fairchem_like["energy"], gradient["energy"])
    assert relative(fairchem_like["forces"], expected["dimenetplusplus_forces"]) < 1e-9
    assert relative(gradient["forces"], expected["dimenetplusplus_forces"]) > 1e-2

    direction = torch.randn(batch.pos.shape, generator=torch.Generator().manual_seed(0))
    h, energies = 1e-5, []
    for step in (h, -h):
        moved = SimpleNamespace(**dict(vars(batch), pos=batch.pos + step * direction))
        with torch.no_grad():
            energies.append(full.model(moved)["energy"].sum())
    slope = (energies[0] - energies[1]) / (2 * h)  # dE/dh = -forces . direction
    full_slope = -(gradient["forces"] * direction).sum()
    assert abs(slope - full_slope) < 1e-6 * abs(slope)
    assert abs(slope + (fairchem_like["forces"] * direction).sum()) > 1e-2 * abs(slope)


def _graph_parallel_forces(rank: int, world_size: int, port: int, path: str, out: str) -> None:
    import gloo

    from graphpar.parallel import init_groups

    with gloo.process_group(rank, world_size, port):
        init_groups(world_size)
        model = load_trained(path)
        result = model.model(fixture_batch())
        torch.save({k: v.detach() for k, v in result.items()}, f"{out}/rank{rank}.pt")


def test_detached_angles_at_two_graph_parallel_ranks(tmp_path):
    """The converted DimeNet++ (detached angles) split over G = 2 gloo ranks gives the serial
    energies and forces (fairchem's) on every rank."""
    import gloo

    state, model = converted(tmp_path, "dimenetplusplus-2021")
    serial = model.model(fixture_batch())
    path = tmp_path / "dimenetplusplus-2021.pt"
    gloo.spawn(_graph_parallel_forces, 2, str(path), str(tmp_path))
    for rank in range(2):
        result = torch.load(tmp_path / f"rank{rank}.pt")
        for key in ("energy", "forces"):
            assert relative(result[key], serial[key].detach().numpy()) < 1e-12, (rank, key)


def write_s2ef(directory: Path) -> Path:
    """structures.extxyz as an S2EF directory (its txt file: reference energies 0)."""
    directory.mkdir()
    (directory / "0.extxyz").write_bytes((FIXTURE / "structures.extxyz").read_bytes())
    (directory / "0.txt").write_text("random0,frame0,0.0\nrandom1,frame0,0.0\n")
    return directory


def test_our_preprocessing_with_the_fairchem_convention_reproduces_fairchem(tmp_path):
    """structures.extxyz through `python -m graphpar.preprocess --graph-convention fairchem`
    (our graphs, not graph.npz), our dataset and collate: fairchem's edge counts (990 and 1,792;
    1,924 on the Cu(100) frame by our own convention) and, with the converted models,
    fairchem's outputs. Evaluation refuses the converted checkpoint on graphpar-convention
    data; the ASE calculator builds fairchem's graphs from the checkpoint."""
    raw = write_s2ef(tmp_path / "raw")
    common = ["--input", str(raw), "--ref-energy", "--store-triplets", "never"]
    preprocess_main(
        [*common, "--out", str(tmp_path / "fairchem"), "--graph-convention", "fairchem"]
    )
    preprocess_main([*common, "--out", str(tmp_path / "graphpar")])
    ours, default = LmdbDataset(tmp_path / "fairchem"), LmdbDataset(tmp_path / "graphpar")
    assert ours.metadata["graph_convention"] == "fairchem"
    assert default.metadata["graph_convention"] == "graphpar"
    assert ours.sizes("edges").tolist() == [990, 1792]
    assert default.sizes("edges").tolist() == [990, 1924]

    expected = outputs()
    for case, name in (("gemnet_t-2021", "gemnet_t"), ("dimenetplusplus-2021", "dimenetplusplus")):
        state, model = converted(tmp_path, case)
        batch = collate([ours[0], ours[1]])
        batch.pos, batch.cell = batch.pos.double(), batch.cell.double()
        with torch.no_grad():
            raw_outputs = model.model(batch)
        # Our stored positions are float32 roundings of other numbers than fairchem's (it wraps
        # atoms into the cell first): 1e-7 A apart, hence relative agreement.
        for key in ("energy", "forces"):
            assert relative(raw_outputs[key], expected[f"{name}_{key}"]) < 1e-6, (case, key)

        checkpoint = tmp_path / f"{case}.pt"
        check_checkpoint_data(state, checkpoint, ours.metadata, ours.path)
        message = re.escape(f"has graph_convention graphpar but {checkpoint} was trained on")
        with pytest.raises(TrainingError, match=message):
            check_checkpoint_data(state, checkpoint, default.metadata, default.path)

    atoms = ase.io.read(FIXTURE / "structures.extxyz", index=1)
    atoms.calc = GraphparCalculator(checkpoint)
    assert atoms.calc.graph_convention == "fairchem"
    energy = expected["dimenetplusplus_energy"][1] * STD + MEAN
    assert abs(atoms.get_potential_energy() - energy) < 1e-6 * abs(energy)


class Payload:
    """Unpickling this runs os.mkdir(target): what a malicious checkpoint could do."""

    def __init__(self, target: Path):
        self.target = str(target)

    def __reduce__(self):
        return os.mkdir, (self.target,)


def test_a_checkpoint_that_asks_to_run_code_is_refused_unrun(tmp_path):
    """A checkpoint whose pickle names a global beyond tensors and plain values is refused
    before any of it runs, and nothing is written."""
    target, output = tmp_path / "pwned", tmp_path / "out.pt"
    state = torch.load(FIXTURE / "dimenetplusplus-2021.pt", weights_only=True)
    crafted = tmp_path / "crafted.pt"
    torch.save(dict(state, val_metrics=Payload(target)), crafted)
    with pytest.raises(TrainingError, match=re.escape(f"{crafted} is refused: it asks to run")):
        convert_checkpoint(crafted, output)
    assert not target.exists() and not output.exists()


def craft(tmp_path: Path, source: str, change) -> Path:
    """A copy of fixture checkpoint `source` with `change(state)` applied."""
    state = torch.load(FIXTURE / source, weights_only=True)
    change(state)
    path = tmp_path / f"crafted-{len(list(tmp_path.iterdir()))}.pt"
    torch.save(state, path)
    return path


def test_unknown_models_and_unsupported_arguments_are_clear_errors(tmp_path):
    def rename(state):
        state["config"]["model"] = "schnet"

    def periodic_off(state):
        state["config"]["model_attributes"]["use_pbc"] = False

    def unknown_argument(state):
        state["config"]["model"]["quadruplets"] = True

    cases = [
        ("dimenetplusplus-2021.pt", rename, "model 'schnet' cannot be converted; supported: "),
        ("dimenetplusplus-2021.pt", periodic_off, "use_pbc=False is not supported"),
        ("gemnet_t-fairchem1.pt", unknown_argument, "unsupported arguments quadruplets"),
    ]
    for source, change, message in cases:
        output = tmp_path / "out.pt"
        with pytest.raises(TrainingError, match=re.escape(message)):
            convert_checkpoint(craft(tmp_path, source, change), output)
        assert not output.exists()
    with pytest.raises(TrainingError, match="DimeNet\\+\\+ option"):
        convert_checkpoint(FIXTURE / "gemnet_t-2021.pt", output, detached_angles=True)


def test_ema_weights_are_the_converted_weights(tmp_path):
    """A checkpoint with fairchem's EMA state is converted with its shadow parameters (one per
    trainable parameter, in the state dict's order)."""

    def with_ema(state):
        shadow = [value + 0.5 for value in state["state_dict"].values()]
        state["ema"] = {
            "decay": 0.999,
            "num_updates": 10,
            "shadow_params": shadow,
            "collected_params": [],
        }

    path = craft(tmp_path, "dimenetplusplus-2021.pt", with_ema)
    convert_checkpoint(path, tmp_path / "ema.pt", dtype="float64")
    model = load_trained(tmp_path / "ema.pt")
    source = torch.load(FIXTURE / "dimenetplusplus-2021.pt", weights_only=True)["state_dict"]
    weights = model.model.state_dict()
    for key, value in source.items():
        assert torch.equal(weights[key.removeprefix("module.module.")], value + 0.5), key


def test_a_separate_force_std(tmp_path):
    """grad_target std != target std: a direct-force GemNet answers forces * force std (its force
    heads take the ratio); a gradient-force DimeNet++ is refused."""
    expected = outputs()

    def force_std(state):
        state["normalizers"]["grad_target"]["std"] = torch.tensor(2 * STD)

    path = craft(tmp_path, "gemnet_t-2021.pt", force_std)
    convert_checkpoint(path, tmp_path / "gemnet.pt", dtype="float64")
    with torch.no_grad():
        physical = load_trained(tmp_path / "gemnet.pt")(fixture_batch())
    reference = expected["gemnet_t_forces"] * float(torch.tensor(2 * STD))
    assert relative(physical["forces"], reference) < 1e-9
    with pytest.raises(TrainingError, match="force std .* differs from energy std"):
        convert_checkpoint(craft(tmp_path, "dimenetplusplus-2021.pt", force_std), tmp_path / "d")


def test_cli_converts_and_load_trained_reads_it(tmp_path, capsys):
    """`python -m graphpar.convert SOURCE OUTPUT`: its help is the module's usage; the output is
    a checkpoint load_trained reads (float32 by default)."""
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "python -m graphpar.convert" in capsys.readouterr().out
    output = tmp_path / "gemnet.pt"
    publication = {"name": "gemnet-dt", "url": "https://example.org/g.pt", "published": {}}
    main([str(FIXTURE / "gemnet_t-2021.pt"), str(output), "--published", json.dumps(publication)])
    assert "gemnet_t (ocp-2021) -> gemnet-dt" in capsys.readouterr().out
    assert read_checkpoint(output)["source"]["publication"] == publication
    model = load_trained(output)
    assert next(model.parameters()).dtype == torch.float32
    batch = fixture_batch()
    batch.pos, batch.cell = batch.pos.float(), batch.cell.float()
    with torch.no_grad():
        energy = model.model(batch)["energy"]
    assert relative(energy.double(), outputs()["gemnet_t_energy"]) < 1e-5
    with pytest.raises(SystemExit, match="error: .* is not an OCP/fairchem checkpoint"):
        main([str(output), str(tmp_path / "again.pt")])
