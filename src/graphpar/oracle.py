"""Reference ("oracle") single points for FbT/AFbT (docs/paper.md, Metric definitions).

    result = oracle_max_forces(ml_relaxed_structures, spec="emt")
    fbt_afbt(result)  # {"fbt": ..., "afbt": ..., "fbt_reason": None}

OC20 runs DFT on the ML-relaxed structures; here the oracle is any ASE calculator, EMT by default
(the calculator that generated the embedded dataset). A spec is "emt" or an import path
("package.module:ClassName" or "package.module.ClassName") of a calculator class, built with
keyword arguments `kwargs`. When the oracle cannot describe every element of the structures
(EMT knows 11 elements; OC20 has 50+), FbT/AFbT are None with a reason, never a number.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from ase.data import atomic_numbers, chemical_symbols

from graphpar.metrics import FBT_THRESHOLD, fbt_curve, max_force_norms

__all__ = [
    "OracleResult",
    "covered_elements",
    "fbt_afbt",
    "load_calculator",
    "oracle_max_forces",
]

DEFAULT_SPEC = "emt"


@dataclass
class OracleResult:
    """Oracle single points of B structures.

    `max_forces` [B] eV/A: max over free atoms (FixAtoms excluded) of the per-atom force norm
    (0 for a structure without free atoms); `energies` [B] eV. Both None when the oracle cannot
    be used, with `reason` saying why.
    """

    max_forces: np.ndarray | None
    energies: np.ndarray | None = None
    reason: str | None = None


def _calculator_class(spec: str) -> type:
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"oracle calculator spec must be a non-empty string, got {spec!r}")
    spec = spec.strip()
    if spec.lower() == "emt":
        from ase.calculators.emt import EMT

        return EMT
    if ":" in spec:
        module_name, _, class_name = spec.partition(":")
    else:
        module_name, _, class_name = spec.rpartition(".")
    if not module_name or not class_name:
        raise ValueError(
            f"unknown oracle calculator {spec!r}: use 'emt' or an import path such as "
            "'ase.calculators.lj:LennardJones' (or 'ase.calculators.lj.LennardJones')"
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ValueError(
            f"oracle calculator {spec!r}: cannot import module {module_name!r} ({error})"
        ) from error
    cls = getattr(module, class_name, None)
    if cls is None or not callable(cls):
        raise ValueError(
            f"oracle calculator {spec!r}: module {module_name!r} has no {class_name!r}"
        )
    return cls


def _name(spec: str) -> str:
    return getattr(_calculator_class(spec), "__name__", str(spec))


def load_calculator(
    spec: str = DEFAULT_SPEC, kwargs: Mapping[str, Any] | None = None
) -> Callable[[], Any]:
    """A zero-argument factory of fresh calculators for `spec` ("emt" or an import path)."""
    cls = _calculator_class(spec)
    options = dict(kwargs or {})

    def factory() -> Any:
        return cls(**options)

    return factory


def _numbers(elements: Iterable[str | int]) -> set[int]:
    out = set()
    for element in elements:
        if isinstance(element, str):
            if element not in atomic_numbers:
                raise ValueError(f"unknown element {element!r} in the oracle's elements")
            out.add(atomic_numbers[element])
        else:
            out.add(int(element))
    return out


def covered_elements(
    spec: str = DEFAULT_SPEC, elements: Iterable[str | int] | None = None
) -> set[int] | None:
    """Atomic numbers the oracle can describe; None: unknown (assumed to cover everything).

    An explicit `elements` list (symbols or numbers, e.g. from the config) wins; otherwise EMT
    covers the elements of `ase.calculators.emt.parameters`, other calculators are unknown.
    """
    if elements is not None:
        return _numbers(elements)
    from ase.calculators.emt import EMT, parameters

    if _calculator_class(spec) is EMT:
        return _numbers(parameters)
    return None


def _symbols(numbers: Iterable[int]) -> str:
    return ", ".join(chemical_symbols[z] for z in sorted(numbers))


def _fixed_mask(atoms) -> np.ndarray:
    from ase.constraints import FixAtoms

    fixed = np.zeros(len(atoms), dtype=bool)
    for constraint in atoms.constraints:
        if isinstance(constraint, FixAtoms):
            fixed[constraint.get_indices()] = True
    return fixed


def oracle_max_forces(
    structures: Sequence,
    spec: str = DEFAULT_SPEC,
    kwargs: Mapping[str, Any] | None = None,
    elements: Iterable[str | int] | None = None,
    progress: bool = True,
) -> OracleResult:
    """Single points of the oracle on `structures` (`ase.Atoms`, their calculators untouched).

    Forces are read with `get_forces(apply_constraint=False)`, then FixAtoms atoms are masked
    out of the max. If any structure holds an element outside `covered_elements(spec,
    elements)`, nothing is computed: max_forces None with the reason.
    """
    from tqdm import tqdm

    structures = list(structures)
    covered = covered_elements(spec, elements)
    factory = load_calculator(spec, kwargs)
    name = _name(spec)
    if covered is not None:
        present: set[int] = set()
        for atoms in structures:
            present.update(int(z) for z in atoms.get_atomic_numbers())
        missing = present - covered
        if missing:
            return OracleResult(
                None,
                None,
                f"{name} has no parameters for {_symbols(missing)} (it covers "
                f"{_symbols(covered)}); FbT/AFbT need a reference calculator for every element",
            )
    if not structures:
        return OracleResult(None, None, "no structures to evaluate")

    max_forces = np.zeros(len(structures))
    energies: np.ndarray | None = np.zeros(len(structures))
    for i, structure in enumerate(
        tqdm(structures, desc=f"oracle {name}", unit="system", disable=not progress)
    ):
        atoms = structure.copy()  # keeps the constraints, drops the calculator
        atoms.calc = factory()
        forces = np.asarray(atoms.get_forces(apply_constraint=False), dtype=np.float64)
        max_forces[i] = max_force_norms(forces, [len(atoms)], _fixed_mask(atoms))[0]
        if energies is not None:
            try:
                energies[i] = atoms.get_potential_energy()
            except NotImplementedError:  # PropertyNotImplementedError: a forces-only oracle
                energies = None
    return OracleResult(max_forces, energies, None)


def fbt_afbt(result: OracleResult) -> dict[str, float | str | None]:
    """{"fbt", "afbt", "fbt_reason"}: FbT (max force < 0.05 eV/A) and AFbT (mean FbT over
    0.01..0.4 eV/A) of `graphpar.metrics`; None with the reason when the oracle could not run."""
    if result.max_forces is None:
        return {"fbt": None, "afbt": None, "fbt_reason": result.reason or "no oracle forces"}
    forces = np.asarray(result.max_forces, dtype=np.float64).reshape(-1)
    if forces.size == 0:
        return {"fbt": None, "afbt": None, "fbt_reason": "no structures to evaluate"}
    return {
        "fbt": float((forces < FBT_THRESHOLD).mean()),
        "afbt": float(fbt_curve(forces)[1].mean()),
        "fbt_reason": None,
    }
