"""graphpar.oracle: reference single points (EMT by default) for FbT/AFbT."""

from __future__ import annotations

import numpy as np
import pytest
from ase import Atoms
from ase.build import add_adsorbate, fcc111
from ase.calculators.emt import EMT
from ase.calculators.lj import LennardJones
from ase.constraints import FixAtoms
from ase.optimize import BFGS

from graphpar.metrics import is2rs_metrics
from graphpar.oracle import (
    OracleResult,
    covered_elements,
    fbt_afbt,
    load_calculator,
    oracle_max_forces,
)

EMT_ELEMENTS = {1, 6, 7, 8, 13, 28, 29, 46, 47, 78, 79}


def slab(metal: str = "Cu", adsorbate: str = "O"):
    """fcc111 (2,2,3) slab with an adsorbate, bottom layer (tag 3) fixed."""
    atoms = fcc111(metal, size=(2, 2, 3), vacuum=6.0)
    add_adsorbate(atoms, adsorbate, 1.8, "fcc")
    atoms.set_constraint(FixAtoms(mask=atoms.get_tags() == 3))
    return atoms


def test_covered_elements():
    assert covered_elements("emt") == EMT_ELEMENTS
    assert covered_elements() == EMT_ELEMENTS
    assert covered_elements("ase.calculators.emt:EMT") == EMT_ELEMENTS
    assert covered_elements("ase.calculators.lj:LennardJones") is None
    assert covered_elements("ase.calculators.lj.LennardJones", ["Ar", 36]) == {18, 36}


def test_max_forces_exclude_fixed_atoms():
    atoms = slab()
    fixed = atoms.get_tags() == 3
    # Push two fixed bottom-layer atoms together: the largest forces sit on fixed atoms.
    bottom = np.flatnonzero(fixed)
    atoms.positions[bottom[0]] += 0.6 * (atoms.positions[bottom[1]] - atoms.positions[bottom[0]])
    atoms.rattle(0.05, seed=1)  # moves free atoms only (FixAtoms)
    reference = atoms.copy()
    reference.calc = EMT()
    forces = reference.get_forces(apply_constraint=False)
    norms = np.linalg.norm(forces, axis=1)
    assert fixed[norms.argmax()] and norms.max() > 5.0
    expected = norms[~fixed].max()
    assert expected < norms.max()

    result = oracle_max_forces([atoms, slab()], progress=False)
    assert result.reason is None
    assert result.max_forces.shape == (2,)
    assert result.max_forces[0] == pytest.approx(expected, rel=1e-12)
    assert result.energies[0] == pytest.approx(reference.get_potential_energy(), rel=1e-12)
    assert atoms.calc is None  # the input structures are left alone


def test_fbt_relaxed_and_rattled():
    relaxed = slab()
    relaxed.calc = EMT()
    BFGS(relaxed, logfile=None).run(fmax=0.01, steps=200)
    relaxed.calc = None
    rattled = slab()
    rattled.rattle(0.1, seed=0)

    result = oracle_max_forces([relaxed], progress=False)
    assert result.max_forces[0] < 0.01
    assert fbt_afbt(result) == {"fbt": 1.0, "afbt": 1.0, "fbt_reason": None}
    result = oracle_max_forces([rattled], progress=False)
    assert result.max_forces[0] > 0.05
    metrics = fbt_afbt(result)
    assert metrics["fbt"] == 0.0 and metrics["afbt"] < 1.0

    # Same numbers as graphpar.metrics' IS2RS definitions.
    both = oracle_max_forces([relaxed, rattled], progress=False)
    pos = np.concatenate([relaxed.positions, rattled.positions])
    fixed = np.concatenate([relaxed.get_tags() == 3, rattled.get_tags() == 3])
    cells = np.stack([relaxed.cell.array, rattled.cell.array])
    reference = is2rs_metrics(pos, pos, cells, [True] * 3, [13, 13], fixed, both.max_forces)
    metrics = fbt_afbt(both)
    assert metrics["fbt"] == reference["fbt"] == 0.5
    assert metrics["afbt"] == reference["afbt"]


def test_uncovered_elements_give_none():
    iron = slab()
    iron.symbols[0], iron.symbols[-1] = "Fe", "S"
    result = oracle_max_forces([slab(), iron], progress=False)
    assert result.max_forces is None and result.energies is None
    assert "EMT" in result.reason and "Fe" in result.reason and "S" in result.reason
    assert "Cu" not in result.reason.split("(")[0]
    metrics = fbt_afbt(result)
    assert metrics["fbt"] is None and metrics["afbt"] is None
    assert "Fe" in metrics["fbt_reason"]
    # An explicit element list can restrict (or extend) the coverage.
    result = oracle_max_forces([slab()], elements=["Cu"], progress=False)
    assert result.max_forces is None and "O" in result.reason


def test_load_calculator():
    factory = load_calculator("ase.calculators.lj:LennardJones", {"sigma": 2.0})
    first, second = factory(), factory()
    assert isinstance(first, LennardJones) and first is not second
    assert first.parameters.sigma == 2.0
    assert isinstance(load_calculator("ase.calculators.lj.LennardJones")(), LennardJones)
    assert isinstance(load_calculator()(), EMT)
    assert isinstance(load_calculator("EMT")(), EMT)

    dimer = Atoms("Ar2", positions=[[0, 0, 0], [0, 0, 1.0]])
    result = oracle_max_forces([dimer], "ase.calculators.lj:LennardJones", progress=False)
    assert result.reason is None and result.max_forces[0] > 0.05

    for spec in ("nope:X", "nope.X", "ase.calculators.emt:Nope", "nope", ""):
        with pytest.raises(ValueError, match="oracle calculator"):
            load_calculator(spec)


def test_fbt_afbt_without_forces():
    assert fbt_afbt(OracleResult(None, None, "why"))["fbt_reason"] == "why"
    empty = oracle_max_forces([], progress=False)
    assert empty.max_forces is None and fbt_afbt(empty)["fbt"] is None
