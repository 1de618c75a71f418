"""The client being attacked (simulation side): computes, defends and shares an update on private data."""

from __future__ import annotations

from typing import Callable

import torch

from leakkit.client import defenses
from leakkit.client.defenses import ClientContext, Gradients
from leakkit.client.dpsgd import PrivateBatch
from leakkit.client.observation import Observation, fingerprint
from leakkit.tasks.base import Task


def observe(
    task: Task,
    inputs: torch.Tensor,
    labels: torch.Tensor,
    *,
    reduction: str = "mean",
    model_name: str = "",
    local_steps: int = 1,
    local_lr: float = 0.1,
    local_batch: int = 0,
) -> Observation:
    """One client round as the server sees it before any defense.

    With local_steps=1 this is FedSGD: the gradient of the task's loss. With more steps it is
    FedAvg: the weight difference θ0 - θK after local_steps SGD steps at local_lr
    (`Task.local_update`); the metadata records the protocol so the attacker can simulate it.

    Args:
        task: the adapter holding the shared model (used in its own dtype and device).
        inputs: Shape [B, *input_shape], in the task's input space (token ids [B, n] for text tasks).
        labels: Shape [B] class ids.
        reduction: how the loss combines the batch ("mean" or "sum").
        model_name: identity recorded in the metadata.
        local_steps, local_lr, local_batch: the FedAvg protocol (see `ClientSpec`).
    Returns:
        The observation: named tensors plus batch size, reduction and model fingerprint.
    """
    p0 = next(task.model.parameters())
    # token ids stay integers: the victim looks them up, so the embedding table gets its real gradient
    inputs = inputs.to(p0.device) if not inputs.is_floating_point() else inputs.to(p0)
    labels = labels.to(p0.device)
    extra: dict = {"task": task.name, "num_classes": task.num_classes}
    if local_steps > 1:
        update = task.local_update(inputs, labels, steps=local_steps, lr=local_lr, local_batch=local_batch, reduction=reduction)
        extra["fedavg"] = {"local_steps": local_steps, "local_lr": local_lr, "local_batch": local_batch}
    else:
        update = task.gradients(inputs, labels, reduction=reduction)
    names = [n for n, _ in task.parameters()]
    return Observation(
        gradients={n: g.detach().to("cpu") for n, g in zip(names, update)},
        batch_size=int(inputs.shape[0]),
        reduction=reduction,
        model=model_name,
        fingerprint=fingerprint(task.model),
        extra=extra,
    )


def per_example_gradients(task: Task, inputs: torch.Tensor, labels: torch.Tensor) -> list[Gradients]:
    """Each example's own gradient (summed loss of one example), for DP-SGD clipping."""
    names = [n for n, _ in task.parameters()]
    p0 = next(task.model.parameters())
    out = []
    for i in range(inputs.shape[0]):
        x = inputs[i : i + 1]
        x = x.to(p0.device) if not x.is_floating_point() else x.to(p0)
        grads = task.gradients(x, labels[i : i + 1].to(p0.device), reduction="sum")
        out.append({n: g.detach().to("cpu") for n, g in zip(names, grads)})
    return out


def defend(
    observation: Observation,
    spec: str,
    *,
    seed: int,
    per_example: Callable[[], list[Gradients]] | None = None,
    other_clients: Callable[[int], list[Observation]] | None = None,
    batch: PrivateBatch | None = None,
) -> Observation:
    """Apply the client's defense chain to its update (see `leakkit.client.defenses`).

    Args:
        observation: the undefended update from `observe`.
        spec: a defense chain such as "clip-noise:clip=1,multiplier=0.5+fp16" ("none" = as is).
        seed: the client's randomness for noise and masks.
        per_example: the batch's per-example gradients (e.g. `per_example_gradients`), for clipping.
        other_clients: updates of other clients of the round, for `clients:n`.
        batch: the client's model and batch, for defenses that recompute the update (`opacus`).
    """
    if spec == "none":
        return observation
    context = ClientContext(generator=torch.Generator().manual_seed(seed), per_example=per_example, other_clients=other_clients, batch=batch)
    return defenses.apply(observation, spec, context)
