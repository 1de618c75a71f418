"""The client being attacked (simulation side): computes and shares a gradient on private data."""

from __future__ import annotations

import torch

from leakkit.observation import Observation, fingerprint
from leakkit.tasks.base import Task


def observe(task: Task, inputs: torch.Tensor, labels: torch.Tensor, *, reduction: str = "mean", model_name: str = "") -> Observation:
    """One FedSGD round: the gradient of the task's loss on (inputs, labels), as the server sees it.

    Args:
        task: the adapter holding the shared model (used in its own dtype and device).
        inputs: Shape [B, *input_shape], in the task's input space (token ids [B, n] for text tasks).
        labels: Shape [B] class ids.
        reduction: how the loss combines the batch ("mean" or "sum").
        model_name: identity recorded in the metadata.
    Returns:
        The observation: named gradients plus batch size, reduction and model fingerprint.
    """
    p0 = next(task.model.parameters())
    # token ids stay integers: the victim looks them up, so the embedding table gets its real gradient
    inputs = inputs.to(p0.device) if not inputs.is_floating_point() else inputs.to(p0)
    grads = task.gradients(inputs, labels.to(p0.device), reduction=reduction)
    names = [n for n, _ in task.parameters()]
    return Observation(
        gradients={n: g.detach().to("cpu") for n, g in zip(names, grads)},
        batch_size=int(inputs.shape[0]),
        reduction=reduction,
        model=model_name,
        fingerprint=fingerprint(task.model),
        extra={"task": task.name, "num_classes": task.num_classes},
    )
