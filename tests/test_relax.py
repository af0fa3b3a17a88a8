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
from graphpar.relax import TRIPLET_KEYS, RelaxStream, relax_batch, relax_dataset, system_cost

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
    assert seen == [True] * 4  # every call, the first one included, on a graph built here
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
    # The batch's make-up is no part of a relaxation: another budget resumes all the same.
    relax_dataset(recorder, samples, tmp_path, batch_size=None, budget=20, **options)
    assert recorder.calls == 0
    (tmp_path / "101.extxyz").unlink()
    (tmp_path / "103.extxyz").unlink()
    third = relax_dataset(recorder, samples, tmp_path, batch_size=None, budget=13, **options)
    assert set(recorder.sizes) == {1}  # 13 atoms each: one at a time, the second refilled
    assert recorder.calls == first[1]["steps"] + first[3]["steps"] + 2
    for a, b in zip(first, third, strict=True):
        assert a["steps"] == b["steps"] and a["energy"] == pytest.approx(b["energy"], abs=1e-9)


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


# ----------------------------------------------------------------------------------------------
# Streams: batches refilled as systems finish, within a budget of atoms, edges or triplets
# ----------------------------------------------------------------------------------------------

# (metal, adsorbate, seed, slab size): 9 to 28 atoms, converging after different step counts.
STREAM = [
    ("Cu", "O", 0, (2, 2, 3)),
    ("Pt", "H", 1, (2, 2, 2)),
    ("Au", "C", 2, (3, 2, 3)),
    ("Cu", "H", 3, (2, 2, 2)),
    ("Pt", "O", 4, (3, 3, 3)),
    ("Au", "H", 5, (2, 2, 3)),
]


def sized_slab(metal: str, adsorbate: str, seed: int, size: tuple[int, int, int]):
    """As `slab`, of `size`; the bottom layer fixed."""
    atoms = fcc111(metal, size=size, vacuum=6.0)
    add_adsorbate(atoms, adsorbate, 1.8, "fcc")
    atoms.set_constraint(FixAtoms(mask=atoms.get_tags() == size[2]))
    atoms.rattle(0.08, seed=seed)
    atoms.set_cell(np.asarray(atoms.cell).astype(np.float32).astype(np.float64))
    atoms.positions = atoms.positions.astype(np.float32).astype(np.float64)
    return atoms


class Sizes(torch.nn.Module):
    """Wraps a model: records the systems and atoms of every call."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.calls: list[tuple[int, int]] = []

    def forward(self, batch):
        self.calls.append((batch.natoms.numel(), int(batch.natoms.sum())))
        return self.model(batch)


@pytest.fixture(scope="module")
def stream_systems():
    systems = [sized_slab(*spec) for spec in STREAM]
    samples = [atoms_to_sample(atoms, cutoff=6.0, max_neighbors=50) for atoms in systems]
    for sample in samples:
        sample.pos, sample.cell = sample.pos.double(), sample.cell.double()
    return systems, samples


@pytest.mark.parametrize("memory", [50, 4])
def test_stream_refills_within_budget_and_follows_each_system_alone(stream_systems, memory):
    """A budget of 30 atoms: systems enter as others finish (mid-stream, with an empty
    history), no call holds more than 30 atoms unless one system alone does (28 + 1 > 30: the
    largest runs alone), and every system takes the very steps it takes alone (memory 4: the
    history rings wrap)."""
    systems, samples = stream_systems
    model = Sizes(emt_model())
    options = {"fmax": FMAX, "steps": 20, "memory": memory, "trajectory": True}
    stream = RelaxStream(model, samples, **options, budget=30)
    found = dict(stream)
    assert sorted(found) == list(range(len(samples)))
    sizes = [len(atoms) for atoms in systems]
    assert sizes == [13, 9, 19, 9, 28, 13]
    assert all(atoms <= 30 or count == 1 for count, atoms in model.calls)
    assert (1, 28) in model.calls and stream.max_batch_cost == 28
    assert len(model.calls) == stream.model_calls
    # Refilled: some call holds a system that entered after the first call.
    assert any(count >= 2 for count, _ in model.calls[1:]) and model.calls[0][0] == 2
    steps = [found[i].steps for i in range(len(samples))]
    assert len(set(steps)) > 2 and max(steps) == 20 and min(steps) < 20  # capped and converged
    for i, atoms in enumerate(systems):
        alone = relax_batch(emt_model(), float64_batch([atoms]), **options)
        assert found[i].steps == int(alone.steps[0])
        assert found[i].converged == bool(alone.converged[0])
        np.testing.assert_allclose(
            found[i].trajectory_pos.numpy(), alone.trajectory_pos[0].numpy(), rtol=0, atol=1e-8
        )
        assert float(found[i].energy) == pytest.approx(float(alone.energy[0]), abs=1e-10)


def test_stream_of_edges_and_systems(stream_systems):
    """Budgets on edges (each system's cost: its radius graph at the start) and on systems."""
    systems, samples = stream_systems
    costs = [system_cost(sample, "edges", 6.0, 50) for sample in samples]
    edges = [
        int(radius_graph_batch(s.pos, s.cell, s.pbc, s.natoms.reshape(1), 6.0, 50)[0].shape[1])
        for s in samples
    ]
    assert costs == edges
    model = Sizes(emt_model())
    stream = RelaxStream(model, samples, fmax=FMAX, steps=3, budget=max(costs), budget_on="edges")
    assert len(dict(stream)) == len(samples) and stream.max_batch_cost <= max(costs)
    model = Sizes(emt_model())
    assert len(dict(RelaxStream(model, samples, fmax=FMAX, steps=3, max_systems=4))) == 6
    assert max(count for count, _ in model.calls) == 4
    triplets = [system_cost(sample, "triplets", 6.0, 50, "dimenetpp") for sample in samples]
    assert all(t > e for t, e in zip(triplets, edges, strict=True))


def test_fmax_zero_takes_every_step(stream_systems):
    """fmax 0 (OC20's IS2RS protocol): no early stop, every system takes exactly `steps`."""
    _, samples = stream_systems
    stream = RelaxStream(emt_model(), samples[:4], fmax=0.0, steps=6, budget=30)
    found = dict(stream)
    assert all(found[i].steps == 6 and not found[i].converged for i in range(4))


def test_relaxations_build_the_graphs_of_the_checkpoints_convention():
    """A converted OCP checkpoint records fairchem's graph convention; relaxations rebuild its
    graphs that way (fixture's Cu(100) frame: 1,792 edges, 1,924 by graphpar's convention),
    and the first model call of a stream sees those edges."""
    from conftest import DATA

    atoms = ase.io.read(DATA / "fairchem-checkpoints" / "structures.extxyz", index=1)
    sample = atoms_to_sample(atoms, 6.0, 50)
    # fairchem's cut depends on its float64 neighbour list (tests/test_convert.py): float64 here.
    sample.pos, sample.cell = torch.from_numpy(atoms.positions), sample.cell.double()
    edges = {
        convention: system_cost(sample, "edges", 6.0, 50, convention=convention)
        for convention in ("graphpar", "fairchem")
    }
    assert edges == {"graphpar": 1924, "fairchem": 1792}
    seen = []

    def model(batch):
        seen.append(batch.edge_index.shape[1])
        return {"energy": batch.pos.sum().reshape(1) * 0, "forces": torch.zeros_like(batch.pos)}

    stream = RelaxStream(model, [sample], steps=1, graph_convention="fairchem", dtype=torch.float64)
    assert len(list(stream)) == 1 and seen[0] == 1792
