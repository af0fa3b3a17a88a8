"""Batched L-BFGS (graphpar.relax) against ASE's LBFGS, with EMT as the force field."""

from __future__ import annotations

import ase.io
import numpy as np
import pytest
import torch
from ase.build import add_adsorbate, fcc111
from ase.calculators.emt import EMT
from ase.constraints import FixAtoms
from ase.optimize import LBFGS
from calculator_model import CalculatorModel
from conftest import float64_batch

from graphpar.data.graph import atoms_to_sample, radius_graph_batch
from graphpar.relax import TRIPLET_KEYS, relax_batch, relax_dataset

OPTIONS = {"maxstep": 0.04, "damping": 1.0, "alpha": 70.0}
FMAX = 0.05
TIGHT = 0.002  # ASE comparisons: tight enough that every system takes more than 50 steps
SYSTEMS = [("Cu", "O", 0), ("Pt", "H", 1), ("Au", "C", 2), ("Cu", "H", 3)]


def slab(metal: str, adsorbate: str, seed: int):
    """A rattled fcc111 (2,2,3) slab with an adsorbate, bottom layer fixed, float32-exact."""
    atoms = fcc111(metal, size=(2, 2, 3), vacuum=6.0)
    add_adsorbate(atoms, adsorbate, 1.8, "fcc")
    atoms.set_constraint(FixAtoms(mask=atoms.get_tags() == 3))
    atoms.rattle(0.08, seed=seed)
    # The samples store float32 positions and cells: start ASE from the very same numbers.
    atoms.set_cell(np.asarray(atoms.cell).astype(np.float32).astype(np.float64))
    atoms.positions = atoms.positions.astype(np.float32).astype(np.float64)
    return atoms


def ase_relax(atoms, steps: int, memory: int, fmax: float = TIGHT):
    """ASE's LBFGS alone with EMT: positions at every step, steps taken, converged."""
    atoms = atoms.copy()
    atoms.calc = EMT()
    opt = LBFGS(atoms, logfile=None, memory=memory, **OPTIONS)
    path, flags = [], []
    for flag in opt.irun(fmax=fmax, steps=steps):
        path.append(atoms.get_positions().copy())
        flags.append(flag)
    return np.array(path), opt.nsteps, flags[-1]


def emt_model() -> CalculatorModel:
    return CalculatorModel(EMT)


@pytest.fixture(scope="module")
def systems():
    return [slab(*spec) for spec in SYSTEMS[:3]]


@pytest.fixture(scope="module")
def batched(systems):
    batch = float64_batch(systems)
    return relax_batch(emt_model(), batch, fmax=TIGHT, steps=200, memory=50, trajectory=True)


@pytest.mark.parametrize("memory", [50, 4])
def test_follows_ase_lbfgs(systems, batched, memory):
    limit = 200 if memory == 50 else 30
    if memory == 50:
        result = batched
    else:  # a short memory drops old pairs; 30 steps stop the run before convergence
        batch = float64_batch(systems)
        result = relax_batch(
            emt_model(), batch, fmax=TIGHT, steps=limit, memory=memory, trajectory=True
        )
        assert not result.converged.any() and (result.steps == limit).all()
    shortest = limit
    for i, atoms in enumerate(systems):
        path, nsteps, converged = ase_relax(atoms, limit, memory)
        ours = result.trajectory_pos[i].numpy()
        assert int(result.steps[i]) == nsteps
        assert bool(result.converged[i]) == converged
        assert ours.shape == path.shape
        compared = min(50, len(path))
        np.testing.assert_allclose(ours[:compared], path[:compared], rtol=0, atol=1e-8)
        np.testing.assert_allclose(result.pos[i].numpy(), path[-1], rtol=0, atol=1e-6)
        shortest = min(shortest, nsteps)
    assert shortest >= (50 if memory == 50 else 30)  # every compared step exists


def test_result_fields(systems, batched):
    for i, atoms in enumerate(systems):
        n = int(batched.steps[i])
        assert batched.trajectory_pos[i].shape == (n + 1, len(atoms), 3)
        assert batched.trajectory_energy[i].shape == (n + 1,)
        final = atoms.copy()
        final.positions = batched.pos[i].numpy()
        final.calc = EMT()
        assert float(batched.energy[i]) == pytest.approx(final.get_potential_energy(), abs=1e-10)
        forces = final.get_forces(apply_constraint=False)
        np.testing.assert_allclose(batched.forces[i].numpy(), forces, rtol=0, atol=1e-10)
        if batched.converged[i]:
            fmax = np.linalg.norm(final.get_forces(), axis=1).max()
            assert fmax < TIGHT


def test_batch_independence(systems, batched):
    for i, atoms in enumerate(systems):
        alone = relax_batch(emt_model(), float64_batch([atoms]), fmax=TIGHT, trajectory=True)
        assert int(alone.steps[0]) == int(batched.steps[i])
        assert bool(alone.converged[0]) == bool(batched.converged[i])
        assert torch.equal(alone.trajectory_pos[0], batched.trajectory_pos[i])
        torch.testing.assert_close(
            alone.trajectory_energy[0], batched.trajectory_energy[i], rtol=0, atol=1e-12
        )


def test_fixed_atoms_never_move(systems, batched):
    for i, atoms in enumerate(systems):
        fixed = atoms.constraints[0].get_indices()
        assert len(fixed) == 4
        path = batched.trajectory_pos[i]
        assert torch.equal(path[:, fixed], path[:1, fixed].expand(len(path), -1, -1))
        free = np.setdiff1d(np.arange(len(atoms)), fixed)
        assert (path[-1, free] != path[0, free]).any()


def test_float32_model_float64_state(systems):
    batch = float64_batch(systems[:2])
    batch.pos, batch.cell = batch.pos.float(), batch.cell.float()
    dtypes = set()

    class Float32(CalculatorModel):
        def forward(self, batch):
            dtypes.add(batch.pos.dtype)
            return super().forward(batch)

    result = relax_batch(Float32(EMT), batch, fmax=FMAX, steps=100)
    assert dtypes == {torch.float32}
    assert result.converged.all()
    assert result.pos[0].dtype == result.energy.dtype == torch.float64


class Recorder(torch.nn.Module):
    """Wraps a model: counts calls, records system counts, checks the graph it is given."""

    def __init__(self, model, cutoff: float = 6.0, max_neighbors: int = 50, check_graph=True):
        super().__init__()
        self.model = model
        self.calls = 0
        self.sizes: list[int] = []
        self.cutoff, self.max_neighbors = cutoff, max_neighbors
        self.check_graph = check_graph  # within one batch's relaxation only

    def forward(self, batch):
        if self.check_graph and self.calls and self.sizes[-1] == batch.natoms.numel():
            edge_index, cell_offsets, _ = radius_graph_batch(
                batch.pos, batch.cell, batch.pbc, batch.natoms, self.cutoff, self.max_neighbors
            )
            assert torch.equal(batch.edge_index, edge_index)
            assert torch.equal(batch.cell_offsets, cell_offsets)
        self.calls += 1
        self.sizes.append(batch.natoms.numel())
        return self.model(batch)


def test_graph_rebuilt_and_triplets_dropped(systems):
    batch = float64_batch(systems[:2])
    assert all(key in batch for key in TRIPLET_KEYS)
    seen = []

    class Check(Recorder):
        def forward(self, batch):
            seen.append(all(key not in batch for key in TRIPLET_KEYS))
            return super().forward(batch)

    model = Check(emt_model())
    result = relax_batch(model, batch, fmax=FMAX, steps=3)
    assert model.calls == result.model_calls == 4
    assert seen == [False, True, True, True]
    assert all(key in batch for key in TRIPLET_KEYS)  # the input batch is left untouched


def test_relax_dataset_resume(tmp_path):
    samples = []
    for sid, spec in enumerate(SYSTEMS):
        sample = atoms_to_sample(slab(*spec), cutoff=6.0, max_neighbors=50)
        sample.sid = torch.tensor(100 + sid)
        samples.append(sample)
    options = {"fmax": FMAX, "steps": 15, "dtype": torch.float64, "progress": False}
    # A Recorder throughout: the relaxations are the model's (and its wrapper's) own.
    model = Recorder(emt_model(), check_graph=False)
    first = relax_dataset(model, samples, tmp_path, batch_size=2, save_trajectory=True, **options)
    assert [s["sid"] for s in first] == ["100", "101", "102", "103"]
    for summary in first:
        atoms = ase.io.read(tmp_path / f"{summary['sid']}.extxyz")
        assert atoms.info["sid"] == int(summary["sid"])
        assert atoms.info["steps"] == summary["steps"] <= 15
        assert atoms.get_potential_energy() == pytest.approx(summary["energy"], abs=1e-9)
        assert atoms.get_forces(apply_constraint=False).shape == (len(atoms), 3)
        frames = ase.io.read(tmp_path / f"{summary['sid']}.traj.extxyz", index=":")
        assert len(frames) == summary["steps"] + 1
        np.testing.assert_allclose(frames[-1].positions, atoms.positions, rtol=0, atol=1e-12)
    assert not list(tmp_path.glob(".*tmp*"))  # no temporary file left behind

    (tmp_path / "102.extxyz").unlink()
    recorder = Recorder(emt_model())
    second = relax_dataset(recorder, samples, tmp_path, batch_size=2, **options)
    assert recorder.calls == first[2]["steps"] + 1
    assert set(recorder.sizes) == {1}
    assert [s["sid"] for s in second] == ["100", "101", "102", "103"]
    for a, b in zip(first, second, strict=True):
        assert a["steps"] == b["steps"] and a["converged"] == b["converged"]
        assert a["energy"] == pytest.approx(b["energy"], abs=1e-9)
    assert ase.io.read(tmp_path / "102.extxyz").get_potential_energy() is not None

    recorder = Recorder(emt_model())
    relax_dataset(recorder, samples, tmp_path, batch_size=2, **options)
    assert recorder.calls == 0


def tiny_model(seed: int):
    """dimenetpp-tiny with weights perturbed from seed `seed`, float64."""
    from graphpar.models import build_model

    torch.manual_seed(seed)
    model = build_model("dimenetpp-tiny").double()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    return model


def test_relaxations_of_another_model_or_setting_are_relaxed_again(systems, tmp_path, capsys):
    """A folder relaxed by one model is never credited to another: every system is relaxed again
    (and said so) when the weights or a setting differ, and resumed only when both are equal."""
    graph = {"cutoff": 4.0, "max_neighbors": 6}  # small graphs: a cheap test
    samples = [atoms_to_sample(atoms, **graph) for atoms in systems[:2]]
    for sid, sample in enumerate(samples):
        sample.sid = torch.tensor(sid)
    options = {"fmax": FMAX, "steps": 1, "dtype": torch.float64, "progress": False, **graph}
    first, second = tiny_model(0), tiny_model(1)

    def relax(model, folder, **changed):
        recorder = Recorder(model, **graph)
        found = relax_dataset(recorder, samples, tmp_path / folder, 2, **{**options, **changed})
        return recorder.calls, found

    relax(first, "a")
    assert relax(first, "a")[0] == 0  # the same relaxation: resumed, nothing to do
    assert "relaxing them again" not in capsys.readouterr().err

    calls, into_used = relax(second, "a")
    assert calls == 2  # both systems, 1 step
    assert "2 relaxed structure(s)" in capsys.readouterr().err
    for used, clean in zip(into_used, relax(second, "b")[1], strict=True):
        assert used["energy"] == clean["energy"]
        np.testing.assert_array_equal(
            ase.io.read(used["path"]).positions, ase.io.read(clean["path"]).positions
        )

    assert relax(second, "a", fmax=0.04)[0] == 2  # another setting: relaxed again
    assert "relaxing them again" in capsys.readouterr().err


def test_runs_a_graphpar_model(systems):
    from graphpar.models import build_model

    torch.manual_seed(0)
    model = build_model("dimenetpp-tiny").double()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    model.train()
    result = relax_batch(model, float64_batch(systems[:1]), fmax=FMAX, steps=2, trajectory=True)
    assert model.training  # restored after the relaxation (which runs in eval mode)
    assert int(result.steps[0]) == 2 and torch.isfinite(result.energy).all()
    step = (result.trajectory_pos[0][1:] - result.trajectory_pos[0][:-1]).norm(dim=-1)
    assert step.max() <= 0.04 + 1e-12
