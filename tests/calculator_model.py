"""An ASE calculator (EMT in the tests) as a graphpar "model", so that relaxations can be checked
against ASE's own optimiser and against the force field that labelled the data."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor


class CalculatorModel(torch.nn.Module):
    """An ASE calculator as a graphpar "model": `model(batch) -> {"energy", "forces"}`.

    Each call builds one `ase.Atoms` per system (numbers, positions, cell, pbc), attaches a fresh
    calculator from `calculator_factory()` and returns energies [B] and unconstrained forces
    [N,3] in the dtype/device of `batch.pos`. The graph of the batch is ignored.
    """

    def __init__(self, calculator_factory: Callable[[], object]):
        super().__init__()
        self.calculator_factory = calculator_factory

    def forward(self, batch) -> dict[str, Tensor]:
        from ase import Atoms

        pos = batch.pos.detach().cpu().double().numpy()
        numbers = batch.atomic_numbers.detach().cpu().long().numpy()
        cell = batch.cell.detach().cpu().double().reshape(-1, 3, 3).numpy()
        pbc = batch.pbc.detach().cpu().bool().reshape(-1, 3).numpy()
        natoms = batch.natoms.detach().cpu().reshape(-1).long().tolist()
        energies, forces = [], []
        start = 0
        for i, n in enumerate(natoms):
            atoms = Atoms(
                numbers=numbers[start : start + n],
                positions=pos[start : start + n],
                cell=cell[i],
                pbc=pbc[i],
            )
            atoms.calc = self.calculator_factory()
            energies.append(atoms.get_potential_energy())
            forces.append(atoms.get_forces(apply_constraint=False))
            start += n
        like = batch.pos
        return {
            "energy": torch.as_tensor(np.array(energies), dtype=like.dtype, device=like.device),
            "forces": torch.as_tensor(
                np.concatenate(forces).reshape(-1, 3), dtype=like.dtype, device=like.device
            ),
        }
