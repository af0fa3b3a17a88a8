"""An ASE calculator around a trained graphpar checkpoint.

    from ase.optimize import BFGS
    atoms.calc = GraphparCalculator("results/mini/checkpoints/dimenetpp/checkpoint.pt")
    BFGS(atoms).run(fmax=0.05)

Energies are what the model was trained on: OC20-style adsorption energies (eV) when the training
data was preprocessed with `ref_energy`, total energies otherwise. Forces (eV/A) are the model's
raw forces on every atom; FixAtoms and other constraints are applied by ASE as usual
(`atoms.get_forces()` zeroes fixed atoms, `get_forces(apply_constraint=False)` does not).

Each call builds the graph the way the training graphs were built (the checkpoint's `graph`
settings: cutoff, max neighbours and graph convention, `graph_settings` and `graph_convention`;
"fairchem" for checkpoints converted from OCP's, `graphpar.convert`), from the structure's
float32 positions as preprocessing does, while the model sees the positions and cell in its own
dtype (float64 checkpoints get the exact ASE positions, so forces match finite differences of the
energy).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ase.calculators.calculator import Calculator, PropertyNotImplementedError, all_changes

from graphpar.data.dataset import collate
from graphpar.data.graph import atoms_to_sample, check_graph_convention

__all__ = ["DEFAULT_MAX_NEIGHBORS", "GraphparCalculator", "graph_convention", "graph_settings"]

DEFAULT_MAX_NEIGHBORS = 50


def graph_settings(graph: Mapping | None, model: torch.nn.Module) -> tuple[float, int | None]:
    """(cutoff A, max_neighbors) from a checkpoint's `graph` entry.

    Old checkpoints (no entry, or no cutoff recorded) fall back to the model's cutoff and 50
    neighbours; a recorded max_neighbors of None means no limit.
    """
    if not graph or graph.get("cutoff") is None:
        return _model_cutoff(model), DEFAULT_MAX_NEIGHBORS
    max_neighbors = graph.get("max_neighbors", DEFAULT_MAX_NEIGHBORS)
    return float(graph["cutoff"]), None if max_neighbors is None else int(max_neighbors)


def graph_convention(graph: Mapping | None) -> str:
    """How a checkpoint's graphs cap neighbours (`graphpar.data.graph.GRAPH_CONVENTIONS`), from
    its `graph` entry: what relaxations and this calculator pass to the radius graph as
    `convention`. Checkpoints from before it was recorded used "graphpar"."""
    return (graph or {}).get("graph_convention") or "graphpar"


def _model_cutoff(model: torch.nn.Module) -> float:
    inner = getattr(model, "model", model)  # training.normalization.Normalized wraps the network
    cutoff = getattr(inner, "cutoff", None)
    if cutoff is None:
        raise ValueError("the model has no cutoff: pass cutoff explicitly")
    return float(cutoff)


class GraphparCalculator(Calculator):
    """ASE calculator of a trained graphpar model: energy (eV), free_energy (= energy), forces
    (eV/A, raw: ASE applies constraints).

    `GraphparCalculator(checkpoint, device)` loads a checkpoint (its EMA weights if any) with
    `graphpar.training.checkpoint.load_trained`;
    `GraphparCalculator.from_model(model, cutoff, max_neighbors, graph_convention)` wraps a
    model already in memory (`model(batch) -> {"energy", "forces"}` in eV, eV/A).
    """

    implemented_properties = ["energy", "free_energy", "forces"]

    def __init__(
        self, checkpoint: str | os.PathLike, device: str | torch.device = "cpu", **kwargs: Any
    ):
        from graphpar.training.checkpoint import read_checkpoint, trained_model

        state = read_checkpoint(Path(checkpoint))
        model = trained_model(state, device)
        cutoff, max_neighbors = graph_settings(state.get("graph"), model)
        self.checkpoint = str(checkpoint)
        convention = graph_convention(state.get("graph"))
        self._setup(model, cutoff, max_neighbors, convention, **kwargs)

    @classmethod
    def from_model(
        cls,
        model: torch.nn.Module,
        cutoff: float | None = None,
        max_neighbors: int | None = DEFAULT_MAX_NEIGHBORS,
        graph_convention: str = "graphpar",
        **kwargs: Any,
    ) -> GraphparCalculator:
        """A calculator around an in-memory model (put in eval mode; cutoff None: the model's).

        Its dtype and device are those of the model's parameters.
        """
        calc = cls.__new__(cls)
        calc.checkpoint = None
        cutoff = _model_cutoff(model) if cutoff is None else float(cutoff)
        calc._setup(model.eval(), cutoff, max_neighbors, graph_convention, **kwargs)
        return calc

    def _setup(
        self,
        model: torch.nn.Module,
        cutoff: float,
        max_neighbors: int | None,
        convention: str,
        **kwargs: Any,
    ) -> None:
        check_graph_convention(convention)
        Calculator.__init__(self, **kwargs)
        self.model = model
        self.cutoff = cutoff
        self.max_neighbors = max_neighbors
        self.graph_convention = convention
        parameter = next(iter(model.parameters()), None)
        self.dtype = parameter.dtype if parameter is not None else torch.float32
        self.device = parameter.device if parameter is not None else torch.device("cpu")

    def calculate(
        self,
        atoms=None,
        properties: list[str] | None = None,
        system_changes: list[str] = all_changes,
    ) -> None:
        """One model call on `atoms`; stores energy, free_energy and forces. A structure no
        graph can be built for (no atoms, atomic numbers outside 1..118, non-finite positions,
        a singular periodic cell) raises `graphpar.data.graph.StructureError`, a ValueError."""
        super().calculate(atoms, properties or ["energy"], system_changes)
        atoms = self.atoms
        # Triplets are left to the model, which builds the family it needs.
        sample = atoms_to_sample(
            atoms,
            self.cutoff,
            self.max_neighbors,
            triplets=False,
            convention=self.graph_convention,
        )
        batch = collate([sample]).to(self.device)
        # The graph comes from float32 positions (as preprocessing); the model sees exact ones.
        batch.pos = torch.as_tensor(
            np.asarray(atoms.get_positions()), dtype=self.dtype, device=self.device
        )
        batch.cell = torch.as_tensor(
            np.asarray(atoms.get_cell()), dtype=self.dtype, device=self.device
        ).reshape(1, 3, 3)
        with torch.enable_grad():  # force models differentiate the energy themselves
            out = self.model(batch)
        energy = float(out["energy"].detach().reshape(-1)[0])
        self.results = {"energy": energy, "free_energy": energy}
        if "forces" in out:
            forces = out["forces"].detach().cpu().double().numpy().reshape(-1, 3)
            self.results["forces"] = forces
        elif properties and "forces" in properties:
            raise PropertyNotImplementedError("this model predicts energies only (no forces)")
