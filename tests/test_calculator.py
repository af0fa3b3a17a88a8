"""graphpar.calculator: the ASE calculator against direct model calls and finite differences."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ase.build import add_adsorbate, fcc111
from ase.constraints import FixAtoms
from ase.optimize import BFGS
from conftest import bad_structure, float64_batch

from graphpar.calculator import GraphparCalculator, graph_settings
from graphpar.data.graph import StructureError
from graphpar.models import build_model
from graphpar.training.checkpoint import CHECKPOINT_FORMAT, rng_state
from graphpar.training.config import config_hash, load_config
from graphpar.training.normalization import Normalized


@pytest.fixture(scope="module")
def model() -> Normalized:
    """An untrained dimenetpp-tiny, its zero-initialised output layers randomised."""
    torch.manual_seed(0)
    model = Normalized(build_model("dimenetpp-tiny"), energy_mean=-0.3, energy_std=0.5)
    with torch.no_grad():
        for parameter in model.parameters():
            if not parameter.any():
                parameter.normal_(0.0, 0.3)
    return model.double().eval()


def slab(seed: int = 0):
    """A rattled Cu(111) (2,2,2) slab with O, bottom layer fixed, float32-exact positions."""
    atoms = fcc111("Cu", size=(2, 2, 2), vacuum=5.0)
    add_adsorbate(atoms, "O", 1.8, "fcc")
    atoms.set_constraint(FixAtoms(mask=atoms.get_tags() == 2))
    atoms.rattle(0.05, seed=seed)  # no ties in the neighbour ranking
    atoms.set_cell(np.asarray(atoms.cell).astype(np.float32).astype(np.float64))
    atoms.positions = atoms.positions.astype(np.float32).astype(np.float64)
    return atoms


def test_matches_direct_model_call(model):
    atoms = slab()
    atoms.calc = GraphparCalculator.from_model(model)
    assert atoms.calc.cutoff == 6.0 and atoms.calc.max_neighbors == 50
    assert atoms.calc.dtype == torch.float64
    out = model(float64_batch([atoms]))
    energy = atoms.get_potential_energy()
    assert isinstance(energy, float)
    assert energy == pytest.approx(float(out["energy"].detach()[0]), rel=1e-12, abs=1e-12)
    assert atoms.calc.get_property("free_energy") == energy
    forces = atoms.get_forces(apply_constraint=False)
    assert isinstance(forces, np.ndarray) and forces.shape == (len(atoms), 3)
    np.testing.assert_allclose(forces, out["forces"].detach().numpy(), rtol=1e-10, atol=1e-12)
    # ASE applies FixAtoms; the calculator itself returns raw forces.
    fixed = atoms.get_tags() == 2
    assert np.abs(forces[fixed]).max() > 0
    assert np.all(atoms.get_forces()[fixed] == 0)


def test_forces_are_minus_energy_gradient(model):
    atoms = slab(1)
    atoms.calc = GraphparCalculator.from_model(model)
    forces = atoms.get_forces(apply_constraint=False)
    atom, axis = np.unravel_index(np.abs(forces).argmax(), forces.shape)
    step = 1e-5
    energies = []
    for sign in (1, -1):
        moved = atoms.copy()
        moved.positions[atom, axis] += sign * step
        moved.calc = GraphparCalculator.from_model(model)
        energies.append(moved.get_potential_energy())
    numeric = -(energies[0] - energies[1]) / (2 * step)
    assert numeric == pytest.approx(forces[atom, axis], rel=1e-6)


def test_cache_invalidated_by_moves(model):
    atoms = slab(2)
    atoms.calc = GraphparCalculator.from_model(model)
    e0, f0 = atoms.get_potential_energy(), atoms.get_forces().copy()
    assert atoms.get_potential_energy() == e0
    assert not atoms.calc.calculation_required(atoms, ["energy", "forces"])
    atoms.positions[-1] += [0.0, 0.0, 0.1]
    assert atoms.calc.calculation_required(atoms, ["energy"])
    assert atoms.get_potential_energy() != e0
    assert not np.allclose(atoms.get_forces(), f0)


def test_ase_bfgs_runs(model):
    atoms = slab(3)
    atoms.calc = GraphparCalculator.from_model(model)
    start = atoms.positions.copy()
    fixed = atoms.get_tags() == 2
    optimizer = BFGS(atoms, logfile=None, maxstep=0.04)
    optimizer.run(fmax=1e-4, steps=3)
    assert optimizer.nsteps == 3
    np.testing.assert_array_equal(atoms.positions[fixed], start[fixed])
    assert not np.allclose(atoms.positions[~fixed], start[~fixed])
    assert np.isfinite(atoms.get_potential_energy())


@pytest.mark.parametrize(
    ("problem", "message"),
    [
        ("NaN position", r"structure Cu2: atom 1 has position \[nan, 1\.3, 0\.3\], not finite"),
        ("singular cell", r"structure Cu2: cell .* is singular along its periodic directions"),
        ("atomic number 0", "atom 1 has atomic number 0, not in 1..118"),
    ],
)
def test_structure_without_a_graph_is_a_clear_error(model, problem, message):
    """A ValueError naming the structure and the value (before: torch's `linalg.inv` or `upper
    bound and lower bound inconsistent` tracebacks, or an energy for element 0)."""
    atoms = bad_structure(problem)
    atoms.calc = GraphparCalculator.from_model(model)
    with pytest.raises(StructureError, match=message) as error:
        atoms.get_potential_energy()
    assert isinstance(error.value, ValueError)


def write_checkpoint(path, model: Normalized, graph) -> None:
    """A checkpoint in the format graphpar.training writes (one untrained step)."""
    config = load_config(
        {"model": "dimenetpp-tiny", "train": ["unused"], "max_steps": 1, "dtype": "float64"}
    )
    state = {
        "format": CHECKPOINT_FORMAT,
        "config": config,
        "config_hash": config_hash(config),
        "step": 1,
        "epoch": 0,
        "batch_in_epoch": 1,
        "model": model.state_dict(),
        "optimizer": {},
        "scheduler": None,
        "ema": None,
        "normalization": {"energy_mean": -0.3, "energy_std": 0.5},
        "graph": graph,
        "rng": rng_state(),
        "best": None,
    }
    torch.save(state, path)


def test_from_checkpoint_file(model, tmp_path):
    path = tmp_path / "checkpoint.pt"
    write_checkpoint(path, model, {"cutoff": 6.0, "max_neighbors": 50})
    calc = GraphparCalculator(path)
    assert (calc.cutoff, calc.max_neighbors, calc.dtype) == (6.0, 50, torch.float64)
    assert not calc.model.training
    atoms = slab(4)
    atoms.calc = calc
    energy = atoms.get_potential_energy()
    reference = slab(4)
    reference.calc = GraphparCalculator.from_model(model)
    assert energy == pytest.approx(reference.get_potential_energy(), rel=1e-12, abs=1e-12)
    np.testing.assert_allclose(atoms.get_forces(), reference.get_forces(), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(
    ("graph", "expected"),
    [
        (None, (6.0, 50)),  # old checkpoints: the model's cutoff, 50 neighbours
        ({"cutoff": None, "max_neighbors": None}, (6.0, 50)),
        ({"cutoff": 5.0, "max_neighbors": 12}, (5.0, 12)),
        ({"cutoff": 5.0, "max_neighbors": None}, (5.0, None)),  # recorded: no limit
    ],
)
def test_graph_settings(model, graph, expected):
    assert graph_settings(graph, model) == expected


def test_old_checkpoint_falls_back_to_model_cutoff(model, tmp_path):
    path = tmp_path / "checkpoint.pt"
    write_checkpoint(path, model, None)
    calc = GraphparCalculator(path)
    assert (calc.cutoff, calc.max_neighbors) == (6.0, 50)
