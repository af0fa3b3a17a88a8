"""Models and their named configurations.

`build_model(name, **overrides)` builds a registered configuration (keyword overrides replace
its hyperparameters); `count_parameters(name, **overrides)` counts its parameters on the meta
device, without allocating weights. Sizes (paper.md sections 1-2; reference-implementation.md):

| name | class | settings | parameters (paper) |
|---|---|---|---|
| dimenetpp | DimeNet++ | hidden 192, out_emb 192, int_emb 64, 3 blocks (OCP dpp.yml) | 1.8M |
| dimenetpp-large | DimeNet++ | hidden 512, out_emb 384, int_emb 64, 3 blocks (OCP) | 10.8M |
| dimenetpp-xl | DimeNet++ | hidden 2048, out_emb 1536, int_emb 256, 4 blocks (paper 4.1) | ~240M |
| dimenetpp-tiny | DimeNet++ | hidden 16, out_emb 16, int_emb 8, basis 4, 2 blocks | CPU tests |

Other model families register their configurations in `MODELS` the same way:
`MODELS[name] = (factory, default_kwargs)`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from graphpar.models.dimenetpp import DimeNetPlusPlus

__all__ = ["MODELS", "DimeNetPlusPlus", "build_model", "count_parameters"]

MODELS: dict[str, tuple[Callable[..., nn.Module], dict[str, Any]]] = {
    "dimenetpp": (
        DimeNetPlusPlus,
        dict(hidden_channels=192, out_emb_channels=192, int_emb_size=64, num_blocks=3),
    ),
    "dimenetpp-large": (
        DimeNetPlusPlus,
        dict(hidden_channels=512, out_emb_channels=384, int_emb_size=64, num_blocks=3),
    ),
    "dimenetpp-xl": (
        DimeNetPlusPlus,
        dict(hidden_channels=2048, out_emb_channels=1536, int_emb_size=256, num_blocks=4),
    ),
    "dimenetpp-tiny": (
        DimeNetPlusPlus,
        dict(
            hidden_channels=16,
            out_emb_channels=16,
            int_emb_size=8,
            basis_emb_size=4,
            num_blocks=2,
        ),
    ),
}


def build_model(name: str, **overrides: Any) -> nn.Module:
    """The registered configuration `name`, with `overrides` replacing its hyperparameters."""
    if name not in MODELS:
        raise KeyError(f"unknown model {name!r}; known: {sorted(MODELS)}")
    factory, defaults = MODELS[name]
    return factory(**{**defaults, **overrides})


def count_parameters(name: str, **overrides: Any) -> int:
    """Parameters of `build_model(name, **overrides)`, built on the meta device (no memory)."""
    with torch.device("meta"):
        model = build_model(name, **overrides)
    return sum(p.numel() for p in model.parameters())
