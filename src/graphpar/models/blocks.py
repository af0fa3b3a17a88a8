"""Pieces both models share."""

from __future__ import annotations

import re

import torch
from torch import Tensor


def scatter_sum(src: Tensor, index: Tensor, dim_size: int) -> Tensor:
    """Rows of `src` summed into `dim_size` rows by `index` (edges -> atoms -> structures)."""
    return src.new_zeros((dim_size, *src.shape[1:])).index_add(0, index, src)


def atom_structure(batch) -> Tensor:
    """Structure of each atom [N]: `batch.batch` when the batch carries it, else from `natoms`."""
    structure = getattr(batch, "batch", None)
    if structure is not None:
        return structure
    natoms = batch.natoms.reshape(-1)
    return torch.repeat_interleave(torch.arange(natoms.numel(), device=natoms.device), natoms)


def renamed(name: str, rules: tuple[tuple[str, str | None], ...]) -> str | None:
    """`name` renamed by the first of `rules` ((pattern, replacement); None drops the name)
    whose pattern matches (KeyError: none does). Loading fairchem state dicts: each model's
    `FAIRCHEM_NAME_MAP`."""
    for pattern, replacement in rules:
        if re.match(pattern, name):
            return None if replacement is None else re.sub(pattern, replacement, name)
    raise KeyError(name)


def unwrapped(name: str) -> str:
    """A state-dict name without its `module.` prefixes (DataParallel, DistributedDataParallel
    and fairchem's trainer wrappers each add one)."""
    while name.startswith("module."):
        name = name[len("module.") :]
    return name
