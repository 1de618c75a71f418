"""Image and embedding priors added to the objective, by name: `prior(inputs) -> scalar`."""

from __future__ import annotations

from typing import Callable

import torch

from leakkit.registry import Registry

Prior = Callable[[torch.Tensor], torch.Tensor]
PRIORS: Registry[Prior] = Registry("prior")


@PRIORS.register("tv")
def total_variation(inputs: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference between neighbouring pixels (anisotropic total variation).

    Shape: inputs [B, C, H, W].
    """
    dx = (inputs[..., :, 1:] - inputs[..., :, :-1]).abs().mean()
    dy = (inputs[..., 1:, :] - inputs[..., :-1, :]).abs().mean()
    return dx + dy


@PRIORS.register("l2")
def squared_norm(inputs: torch.Tensor) -> torch.Tensor:
    """Mean squared value of the inputs (keeps a candidate near the origin)."""
    return inputs.pow(2).mean()
