"""Exponential moving average of the weights (validation and final weights use it)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn


class EMA:
    """Exponential moving average of the parameters, with the reference's warm start:
    decay_n = min(decay, (1 + n) / (10 + n)) after n updates (torch_ema, as OCP uses)."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.num_updates = 0
        self.shadow = [p.detach().clone() for p in model.parameters()]

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.num_updates += 1
        decay = min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))
        for shadow, p in zip(self.shadow, model.parameters(), strict=True):
            shadow.lerp_(p.detach(), 1 - decay)

    @contextlib.contextmanager
    def applied(self, model: nn.Module) -> Iterator[None]:
        """The model with the averaged weights inside the block, its own ones after."""
        saved = [p.detach().clone() for p in model.parameters()]
        copy_weights(model, self.shadow)
        try:
            yield
        finally:
            copy_weights(model, saved)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "num_updates": self.num_updates, "shadow": self.shadow}

    def load_state_dict(self, state: Mapping) -> None:
        self.num_updates = state["num_updates"]
        for shadow, saved in zip(self.shadow, state["shadow"], strict=True):
            shadow.copy_(saved)


@torch.no_grad()
def copy_weights(model: nn.Module, weights: Sequence[Tensor]) -> None:
    """Copy `weights` (one tensor per parameter, in `model.parameters()` order, as an EMA's
    shadow) into the model's parameters; buffers are left alone."""
    for p, weight in zip(model.parameters(), weights, strict=True):
        p.copy_(weight)
