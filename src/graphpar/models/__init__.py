"""Models and their named configurations.

`build_model(name, **overrides)` builds a registered configuration (keyword overrides replace
its hyperparameters); `count_parameters(name, **overrides)` counts its parameters on the meta
device, without allocating weights. Sizes (docs/paper.md, Models):

| name | class | settings | parameters (paper) |
|---|---|---|---|
| dimenetpp | DimeNet++ | hidden 192, out_emb 192, int_emb 64, 3 blocks (OCP dpp.yml) | 1.8M |
| dimenetpp-large | DimeNet++ | hidden 512, out_emb 384, int_emb 64, 3 blocks (OCP) | 10.8M |
| dimenetpp-xl | DimeNet++ | hidden 2048, out_emb 1536, int_emb 256, 4 blocks (paper 4.1) | ~240M |
| dimenetpp-small | DimeNet++ | hidden 64, out_emb 64, int_emb 32, basis 8, 3 blocks | default |
| dimenetpp-tiny | DimeNet++ | hidden 16, out_emb 16, int_emb 8, basis 4, 2 blocks | CPU tests |
| gemnet-dt | GemNet-dT | 3 blocks, atom/edge 512/512, trip/bil 64/64 (OCP gemnet-dT.yml) | 31M |
| gemnet-xl | GemNet-dT | 6 blocks, atom/edge 128/1536, trip/bil 384/192 (gp-gemnet-xl) | ~300M |
| gemnet-125m | GemNet-dT | 3 blocks, atom/edge 1280/768, trip/bil 128/64 (paper 2.4) | 125M |
| gemnet-245m | GemNet-dT | 4 blocks, atom/edge 1536/1024, trip/bil 192/96 (paper 2.4) | 245M |
| gemnet-480m | GemNet-dT | 6 blocks, atom/edge 1792/1184, trip/bil 288/160 (paper 2.4) | 480M |
| gemnet-960m | GemNet-dT | 8 blocks, atom/edge 2320/1302, trip/bil 512/288 (paper 2.4) | 960M |
| gemnet-small | GemNet-dT | 3 blocks, atom/edge 64/64, trip/bil 32/32, 16 Gaussians | default |
| gemnet-tiny | GemNet-dT | 2 blocks, atom/edge 16/16, trip/bil 8/8, rbf/cbf 4/4 | CPU tests |

GemNet configurations share the OC20 settings of gemnet-dT.yml (rbf/cbf 16, 128 Gaussians,
7 spherical orders, skip 1/2, concat 1, atom 3, cutoff 6, 50 neighbours); the scaling family
(paper section 2.4) varies blocks and widths only.

The configurations are plain data in `graphpar.model_configs` (importable without torch); other
model families register theirs in `MODELS` the same way: `MODELS[name] = (factory,
default_kwargs)`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from graphpar.model_configs import CONFIGURATIONS
from graphpar.models.dimenetpp import DimeNetPlusPlus
from graphpar.models.gemnet import GemNetT

__all__ = [
    "MODELS",
    "DimeNetPlusPlus",
    "GemNetT",
    "build_model",
    "count_parameters",
    "scale_shared_gradients",
]

# The registered configurations (graphpar.model_configs, plain data) with their families' classes.
FAMILIES: dict[str, Callable[..., nn.Module]] = {"dimenetpp": DimeNetPlusPlus, "gemnet": GemNetT}
MODELS: dict[str, tuple[Callable[..., nn.Module], dict[str, Any]]] = {
    name: (FAMILIES[family], kwargs) for name, (family, kwargs) in CONFIGURATIONS.items()
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


def scale_shared_gradients(model: nn.Module) -> None:
    """Divide the gradients of parameters shared by several blocks by their number of uses
    (GemNet's `shared_parameters`, as the reference trains it); other models are left alone.
    Call after `sync_gradients`, before clipping."""
    shared = getattr(model, "shared_parameters", None)
    for _, param, uses in shared() if shared is not None else ():
        if param.grad is not None:
            param.grad.div_(uses)
