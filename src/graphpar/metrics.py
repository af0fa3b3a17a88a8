"""OC20 evaluation metrics (S2EF, IS2RS, IS2RE), as OC20's evaluator defines them.

Definitions follow fairchem `ocpmodels/modules/evaluator.py` (docs/paper.md, Metric definitions).
System i has n_i evaluated atoms; forces and positions are evaluated on **free** atoms only
(`~fixed`, as fairchem's `eval_on_free_atoms: True` and its relaxation output do).

- energy_mae: mean_i |dE_i| (eV); forces_mae: mean over free atoms and 3 components of |dF| (eV/A).
- forces_cos: mean over free atoms of `torch.cosine_similarity(F_pred_a, F_true_a)` (eps 1e-8).
- efwt: fraction of systems with |dE| < 0.02 eV and max_{free atoms, components} |dF| < 0.03 eV/A
  (strict); a system with no free atoms needs only the energy condition.
- ewt (IS2RE): fraction of systems with |dE| < 0.02 eV.
- adwt (IS2RS): d_i = mean over evaluated atoms of the minimum-image |pred - true|; DwT(t) =
  fraction of systems with d_i < t; adwt = mean of DwT(t) over `np.arange(0.01, 0.5, 0.001)`
  (490 thresholds, 0.5 excluded).
- fbt: fraction of systems whose oracle max per-atom force norm (free atoms) is < 0.05 eV/A;
  afbt = mean of FbT(t) over `np.arange(0.01, 0.4 + 1e-9, 0.001)` (0.01 to 0.4 inclusive, 391
  thresholds; OC20 paper's "0.01 to 0.4 by 0.001", the public evaluator has no FbT code).

All computations are numpy float64 (float32 inputs are widened first, so a float32 0.02 counts as
just below 0.02); inputs may be torch tensors or numpy arrays. Results are
plain Python floats/ints. `MetricSums` accumulates them batch by batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

__all__ = [
    "AFBT_THRESHOLDS",
    "DWT_THRESHOLDS",
    "EFWT_ENERGY_THRESHOLD",
    "EFWT_FORCE_THRESHOLD",
    "FBT_THRESHOLD",
    "MetricSums",
    "dwt_curve",
    "fbt_curve",
    "is2re_metrics",
    "is2rs_metrics",
    "max_force_norms",
    "min_image_displacement",
    "s2ef_metrics",
]

EFWT_ENERGY_THRESHOLD = 0.02  # eV, also EwT
EFWT_FORCE_THRESHOLD = 0.03  # eV/A, per component
FBT_THRESHOLD = 0.05  # eV/A, per-atom force norm
DWT_THRESHOLDS = np.arange(0.01, 0.5, 0.001)  # A, 490 values, as OC20's evaluator
AFBT_THRESHOLDS = np.arange(0.01, 0.4 + 1e-9, 0.001)  # eV/A, 391 values, 0.4 included
_COS_EPS = 1e-8


def _np(x: Any, dtype: Any = np.float64) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=dtype)


def _check_atoms(natoms: np.ndarray, n: int, what: str) -> None:
    if natoms.ndim != 1:
        raise ValueError(f"natoms must be 1-D, got shape {natoms.shape}")
    if (natoms < 0).any() or int(natoms.sum()) != n:
        raise ValueError(f"natoms sums to {int(natoms.sum())}, but {what} has {n} atoms")


def _check_vectors(name: str, a: np.ndarray, b: np.ndarray) -> None:
    if a.ndim != 2 or a.shape[1] != 3 or a.shape != b.shape:
        raise ValueError(f"{name}: expected two [N,3] arrays, got {a.shape} and {b.shape}")


def _check_energies(pred: np.ndarray, true: np.ndarray) -> None:
    if pred.ndim != 1 or pred.shape != true.shape:
        raise ValueError(f"energies: expected two [B] arrays, got {pred.shape} and {true.shape}")


def _segment_ids(natoms: np.ndarray) -> np.ndarray:
    return np.repeat(np.arange(len(natoms)), natoms)


def _free_mask(fixed: Any, n: int, eval_on_free_atoms: bool = True) -> np.ndarray:
    if fixed is None or not eval_on_free_atoms:
        return np.ones(n, dtype=bool)
    fixed = _np(fixed, dtype=bool).reshape(-1)
    if fixed.shape != (n,):
        raise ValueError(f"fixed has {fixed.shape[0]} entries, expected {n}")
    return ~fixed


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise `torch.cosine_similarity` (each norm clamped to eps 1e-8)."""
    na = np.maximum(np.linalg.norm(a, axis=1), _COS_EPS)
    nb = np.maximum(np.linalg.norm(b, axis=1), _COS_EPS)
    return ((a / na[:, None]) * (b / nb[:, None])).sum(axis=1)


def min_image_displacement(pred_pos: Any, true_pos: Any, cell: Any, pbc: Any) -> np.ndarray:
    """Minimum-image displacement pred - true [n,3] of one system, as OC20's `min_diff`.

    Fractional displacements (cell rows are lattice vectors) are wrapped on periodic axes to
    (-0.5, 0.5] exactly as OC20 does (`% 1.0` twice, then `-1` where > 0.5), then mapped back to
    Cartesian. Non-periodic axes are left unwrapped. (OC20's code also applies the `> 0.5`
    shift on non-periodic axes; OC20 data is periodic on all three axes, so this never differs
    there.)
    """
    pred, true = _np(pred_pos), _np(true_pos)
    _check_vectors("positions", pred, true)
    cell = _np(cell).reshape(3, 3)
    pbc = _np(pbc, dtype=bool).reshape(3)
    frac = np.linalg.solve(cell.T, (pred - true).T).T
    for axis in np.flatnonzero(pbc):
        col = frac[:, axis] % 1.0
        col = col % 1.0  # a tiny negative value gives 1.0 after the first
        col[col > 0.5] -= 1.0
        frac[:, axis] = col
    return frac @ cell


def _threshold_curve(values: Any, thresholds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    values = _np(values).reshape(-1)
    if values.size == 0:
        raise ValueError("no systems")
    fractions = (values[None, :] < thresholds[:, None]).mean(axis=1)
    return thresholds.copy(), fractions


def dwt_curve(distances: Any) -> tuple[np.ndarray, np.ndarray]:
    """(thresholds [490] A, DwT(t) [490]): fraction of per-system mean distances d_i < t."""
    return _threshold_curve(distances, DWT_THRESHOLDS)


def fbt_curve(max_forces: Any) -> tuple[np.ndarray, np.ndarray]:
    """(thresholds [391] eV/A, FbT(t) [391]): fraction of oracle max force norms < t."""
    return _threshold_curve(max_forces, AFBT_THRESHOLDS)


def max_force_norms(forces: Any, natoms: Any, fixed: Any = None) -> np.ndarray:
    """Per-system max over free atoms of the per-atom force norm [B] (0 with no free atoms).

    Turns oracle (DFT) single-point forces [N,3] into `is2rs_metrics`' `oracle_max_force`.
    """
    forces = _np(forces)
    natoms = _np(natoms, dtype=np.int64).reshape(-1)
    _check_vectors("forces", forces, forces)
    _check_atoms(natoms, forces.shape[0], "forces")
    free = _free_mask(fixed, forces.shape[0])
    out = np.zeros(len(natoms))
    np.maximum.at(out, _segment_ids(natoms)[free], np.linalg.norm(forces[free], axis=1))
    return out


@dataclass
class MetricSums:
    """Additive sums of the metrics: `update_*` with each batch of systems, then `result`.

    Scalars add; per-system IS2RS values (mean distances, oracle max forces) concatenate.
    """

    n_energy: int = 0  # systems with energies (S2EF, IS2RE)
    energy_abs: float = 0.0  # sum |dE|
    energy_within: int = 0  # systems with |dE| < 0.02 (EwT)
    efwt_within: int = 0  # S2EF systems within both energy and force thresholds
    force_abs: float = 0.0  # sum |dF| over free atoms and components
    force_numel: int = 0  # free atoms x 3
    cos_sum: float = 0.0  # sum of per-atom cosines over free atoms
    n_free_atoms: int = 0
    distances: list[float] = field(default_factory=list)  # IS2RS d_i per system
    max_forces: list[float] = field(default_factory=list)  # IS2RS oracle max force per system

    def _update_energy(self, pred_energy: Any, true_energy: Any) -> np.ndarray:
        pred, true = _np(pred_energy).reshape(-1), _np(true_energy).reshape(-1)
        _check_energies(pred, true)
        err = np.abs(pred - true)
        self.n_energy += len(err)
        self.energy_abs += float(err.sum())
        self.energy_within += int((err < EFWT_ENERGY_THRESHOLD).sum())
        return err

    def update_is2re(self, pred_energy: Any, true_energy: Any) -> MetricSums:
        """Add IS2RE systems (relaxed energies [B])."""
        self._update_energy(pred_energy, true_energy)
        return self

    def update_s2ef(
        self,
        pred_energy: Any,
        true_energy: Any,
        pred_forces: Any,
        true_forces: Any,
        natoms: Any,
        fixed: Any,
    ) -> MetricSums:
        """Add S2EF systems: energies [B], forces [N,3], natoms [B], fixed [N] bool."""
        pred_f, true_f = _np(pred_forces), _np(true_forces)
        _check_vectors("forces", pred_f, true_f)
        natoms = _np(natoms, dtype=np.int64).reshape(-1)
        _check_atoms(natoms, pred_f.shape[0], "forces")
        if _np(pred_energy).reshape(-1).shape[0] != len(natoms):
            raise ValueError(f"{len(natoms)} systems in natoms, energies differ in length")
        free = _free_mask(fixed, pred_f.shape[0])
        e_err = self._update_energy(pred_energy, true_energy)
        f_err = np.abs(pred_f - true_f)[free]
        self.force_abs += float(f_err.sum())
        self.force_numel += int(f_err.size)
        self.cos_sum += float(_cosine(pred_f[free], true_f[free]).sum())
        self.n_free_atoms += int(free.sum())
        max_f = np.zeros(len(natoms))  # 0 for systems with no free atoms: energy test only
        np.maximum.at(max_f, _segment_ids(natoms)[free], f_err.max(axis=1, initial=0.0))
        ok = (e_err < EFWT_ENERGY_THRESHOLD) & (max_f < EFWT_FORCE_THRESHOLD)
        self.efwt_within += int(ok.sum())
        return self

    def update_is2rs(
        self,
        pred_pos: Any,
        true_pos: Any,
        cell: Any,
        pbc: Any,
        natoms: Any,
        fixed: Any,
        oracle_max_force: Any = None,
        eval_on_free_atoms: bool = True,
    ) -> MetricSums:
        """Add IS2RS systems; see `is2rs_metrics`."""
        pred, true = _np(pred_pos), _np(true_pos)
        _check_vectors("positions", pred, true)
        natoms = _np(natoms, dtype=np.int64).reshape(-1)
        _check_atoms(natoms, pred.shape[0], "positions")
        b = len(natoms)
        cell = _np(cell).reshape(-1, 3, 3)
        if cell.shape[0] != b:
            raise ValueError(f"cell has {cell.shape[0]} systems, natoms {b}")
        pbc = _np(pbc, dtype=bool).reshape(-1, 3)
        if pbc.shape[0] == 1:
            pbc = np.repeat(pbc, b, axis=0)
        if pbc.shape[0] != b:
            raise ValueError(f"pbc has {pbc.shape[0]} systems, natoms {b}")
        if oracle_max_force is not None:
            oracle = _np(oracle_max_force).reshape(-1)
            if oracle.shape[0] != b:
                raise ValueError(f"oracle_max_force has {oracle.shape[0]} systems, natoms {b}")
            if self.distances and len(self.max_forces) != len(self.distances):
                raise ValueError("mixing updates with and without oracle_max_force")
        elif self.max_forces:
            raise ValueError("mixing updates with and without oracle_max_force")
        mask = _free_mask(fixed, pred.shape[0], eval_on_free_atoms)
        starts = np.concatenate([[0], np.cumsum(natoms)])
        dists = []
        for i in range(b):
            sel = slice(starts[i], starts[i + 1])
            m = mask[sel]
            if not m.any():
                raise ValueError(f"system {i} has no evaluated atoms")
            disp = min_image_displacement(pred[sel][m], true[sel][m], cell[i], pbc[i])
            dists.append(float(np.linalg.norm(disp, axis=1).mean()))
        self.distances.extend(dists)
        if oracle_max_force is not None:
            self.max_forces.extend(float(v) for v in oracle)
        return self

    def result(self, task: str) -> dict[str, float | int | None]:
        """The dict of `s2ef_metrics`, `is2rs_metrics` or `is2re_metrics` for `task`."""
        if task == "s2ef":
            n = self.n_energy
            if n == 0:
                raise ValueError("no systems")
            return {
                "energy_mae": self.energy_abs / n,
                "forces_mae": self.force_abs / self.force_numel if self.force_numel else None,
                "forces_cos": self.cos_sum / self.n_free_atoms if self.n_free_atoms else None,
                "efwt": self.efwt_within / n,
                "n_systems": int(n),
            }
        if task == "is2re":
            n = self.n_energy
            if n == 0:
                raise ValueError("no systems")
            return {
                "energy_mae": self.energy_abs / n,
                "ewt": self.energy_within / n,
                "n_systems": int(n),
            }
        if task == "is2rs":
            _, dwt = dwt_curve(self.distances)
            out: dict[str, float | int | None] = {"adwt": float(dwt.mean())}
            if self.max_forces:
                forces = np.asarray(self.max_forces)
                out["fbt"] = float((forces < FBT_THRESHOLD).mean())
                out["afbt"] = float(fbt_curve(forces)[1].mean())
            else:
                out["fbt"] = out["afbt"] = None
            out["n_systems"] = len(self.distances)
            return out
        raise ValueError(f"task must be s2ef, is2rs or is2re, got {task!r}")


def s2ef_metrics(
    pred_energy: Any,
    true_energy: Any,
    pred_forces: Any,
    true_forces: Any,
    natoms: Any,
    fixed: Any,
) -> dict[str, float | int | None]:
    """S2EF: energy_mae, forces_mae, forces_cos, efwt, n_systems (forces on free atoms).

    Energies [B]; forces [N,3] concatenated over systems; natoms [B]; fixed [N] bool.
    """
    return (
        MetricSums()
        .update_s2ef(pred_energy, true_energy, pred_forces, true_forces, natoms, fixed)
        .result("s2ef")
    )


def is2rs_metrics(
    pred_pos: Any,
    true_pos: Any,
    cell: Any,
    pbc: Any,
    natoms: Any,
    fixed: Any,
    oracle_max_force: Any = None,
    eval_on_free_atoms: bool = True,
) -> dict[str, float | int | None]:
    """IS2RS: adwt, fbt, afbt, n_systems.

    Positions [N,3] concatenated over systems; cell [B,3,3] (rows are lattice vectors); pbc
    [B,3] or [3] bool; natoms [B]; fixed [N] bool. d_i averages over the free atoms (fairchem's
    relaxation output holds free atoms only); `eval_on_free_atoms=False` averages over all atoms.
    `oracle_max_force` [B] is the oracle's max per-atom force norm on the ML-relaxed structure
    (see `max_force_norms`); without it fbt and afbt are None.
    """
    sums = MetricSums().update_is2rs(
        pred_pos, true_pos, cell, pbc, natoms, fixed, oracle_max_force, eval_on_free_atoms
    )
    return sums.result("is2rs")


def is2re_metrics(pred_energy: Any, true_energy: Any) -> dict[str, float | int | None]:
    """IS2RE: energy_mae, ewt, n_systems (relaxed energies [B])."""
    return MetricSums().update_is2re(pred_energy, true_energy).result("is2re")
