"""A DP-SGD update computed by Opacus itself (per-sample gradients, clipping and noise by Opacus).

The `opacus` defense calls this on the client's own batch. The model is a deep copy wrapped in
Opacus' GradSampleModule, so the user's model is never hooked or changed.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass

import torch

from leakkit.errors import ConfigError
from leakkit.tasks.base import Task
from leakkit.tasks.weights import normalise_keys

Gradients = dict[str, torch.Tensor]


@dataclass
class PrivateBatch:
    """The client's model and batch, for a defense that recomputes the update from them.

    inputs: [B, *input_shape] in the task's input space (token ids for text tasks); labels: [B] class ids.
    """

    task: Task
    inputs: torch.Tensor
    labels: torch.Tensor
    reduction: str = "mean"


def opacus_gradients(batch: PrivateBatch, *, noise_multiplier: float, max_grad_norm: float, generator: torch.Generator) -> Gradients:
    """One DP-SGD step's noisy gradient, as Opacus' DPOptimizer leaves it in `.grad` before the weight update.

    Args:
        batch: the client's model and data.
        noise_multiplier: σ, the noise std relative to max_grad_norm.
        max_grad_norm: C, each example's gradient is clipped to this L2 norm.
        generator: the client's randomness (Opacus draws its noise from it).
    Returns:
        Parameter name (as in the bare model) -> gradient: (Σ clipped + N(0, σ²C²)) / B for "mean", undivided for "sum".
    Raises:
        ConfigError: Opacus is not installed, or it cannot compute per-sample gradients of this model.
    """
    try:
        from opacus import GradSampleModule
        from opacus.optimizers import DPOptimizer
        from opacus.validators import ModuleValidator
    except ImportError:
        raise ConfigError("the opacus defense needs Opacus: pip install 'leakkit[dp]'") from None
    model = copy.deepcopy(batch.task.model)
    problems = ModuleValidator.validate(model, strict=False)
    if problems:
        raise ConfigError(f"Opacus cannot train this model privately: {problems[0]}")
    try:
        wrapped = GradSampleModule(model, loss_reduction=batch.reduction)
    except NotImplementedError as e:
        raise ConfigError(f"Opacus cannot compute per-sample gradients here: {e}") from None
    trainable = [p for p in wrapped.parameters() if p.requires_grad]
    optimizer = DPOptimizer(
        torch.optim.SGD(trainable, lr=1.0), noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
        expected_batch_size=int(batch.inputs.shape[0]), loss_reduction=batch.reduction, generator=generator,
    )
    client = copy.copy(batch.task)
    client.model = wrapped
    optimizer.zero_grad()
    with warnings.catch_warnings():
        # the inputs need no gradient here; torch says so once per module hook, which is expected
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        client.loss(batch.inputs, batch.labels, reduction=batch.reduction).backward()
    optimizer.pre_step()  # clip, accumulate, add noise, scale: the update, without stepping the weights
    return normalise_keys({n: p.grad.detach().clone() for n, p in wrapped.named_parameters() if p.requires_grad})
