"""Pieces both models share."""

from __future__ import annotations

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
