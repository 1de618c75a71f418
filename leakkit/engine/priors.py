"""Image and embedding priors added to the objective, by name: `prior(inputs, task) -> scalar`."""

from __future__ import annotations

from typing import Any, Callable

import torch

from leakkit.registry import Registry

Prior = Callable[[torch.Tensor, Any], torch.Tensor]
PRIORS: Registry[Prior] = Registry("prior")


@PRIORS.register("tv")
def total_variation(inputs: torch.Tensor, task: Any = None) -> torch.Tensor:
    """Mean absolute difference between neighbouring pixels (anisotropic total variation).

    Shape: inputs [B, C, H, W].
    """
    dx = (inputs[..., :, 1:] - inputs[..., :, :-1]).abs().mean()
    dy = (inputs[..., 1:, :] - inputs[..., :-1, :]).abs().mean()
    return dx + dy


@PRIORS.register("l2")
def squared_norm(inputs: torch.Tensor, task: Any = None) -> torch.Tensor:
    """Mean squared value of the inputs (keeps a candidate near the origin)."""
    return inputs.pow(2).mean()


@PRIORS.register("embedding-norm")
def embedding_norm(inputs: torch.Tensor, task: Any = None) -> torch.Tensor:
    """LAMP's embedding-length prior: mean squared gap between each position's vector norm and
    the average norm of the model's word embeddings (real tokens sit on that shell).

    Shape: inputs [B, n, d]; the task must have `embedding_matrix()`.
    """
    if not hasattr(task, "embedding_matrix"):
        raise TypeError("the embedding-norm prior needs a text task")
    target = task.embedding_matrix().detach().norm(dim=-1).mean().to(inputs)
    return (inputs.norm(dim=-1) - target).pow(2).mean()
