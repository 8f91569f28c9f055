"""Exponential moving average of model parameters (``ema = decay * ema + (1 - decay) * param``).

Own implementation of the usual EMA (the ILLUME+ trainer has an optional ``ema`` copy, off in the released recipe).
Only trainable floating-point parameters are averaged; buffers are copied. The shadow is kept in float32.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["ModelEMA"]


class ModelEMA:
    """EMA of ``model``'s trainable parameters.

    Args:
        model: the (unwrapped) model.
        decay: averaging factor in [0, 1).
    """

    def __init__(self, model: nn.Module, decay: float = 0.999):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"ema decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.shadow: dict[str, Tensor] = {
            name: p.detach().float().clone() for name, p in model.named_parameters() if p.requires_grad
        }

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """One EMA step from the current parameters of ``model``."""
        for name, p in model.named_parameters():
            if name in self.shadow:
                self.shadow[name].lerp_(p.detach().float(), 1.0 - self.decay)

    @torch.no_grad()
    def copy_to(self, model: nn.Module, shadow: dict[str, Tensor] | None = None) -> None:
        """Write the averaged parameters into ``model`` (from ``shadow``, e.g. gathered full tensors, if given)."""
        shadow = self.shadow if shadow is None else shadow
        for name, p in model.named_parameters():
            if name in shadow:
                p.copy_(shadow[name].to(p.dtype))

    def state_dict(self) -> dict:
        return {"decay": self.decay, "shadow": dict(self.shadow)}

    def load_state_dict(self, state: dict) -> None:
        missing = sorted(set(self.shadow) - set(state["shadow"]))
        if missing:
            raise ValueError(f"EMA state lacks parameters {missing[:4]}...")
        self.decay = float(state["decay"])
        for name in self.shadow:
            self.shadow[name] = state["shadow"][name].detach().float().clone()
