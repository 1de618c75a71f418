"""Label strategies: how the engine treats the unknown labels, by name.

A strategy returns fixed labels as probabilities [B, C], or None to optimise soft labels jointly.
"""

from __future__ import annotations

from typing import Callable

import torch

from leakkit.engine import analytic
from leakkit.errors import ConfigError, ObservationMismatch
from leakkit.client.observation import Observation
from leakkit.registry import Registry
from leakkit.tasks.base import Task

LabelStrategy = Callable[[Observation, Task], "torch.Tensor | None"]
LABELS: Registry[LabelStrategy] = Registry("label strategy")


def _classifier_grads(observation: Observation, task: Task) -> tuple[torch.Tensor, torch.Tensor | None]:
    w, b = task.classifier_parameter_names()
    if w not in observation.gradients:
        raise ObservationMismatch(f"this label strategy reads the output layer's gradient ({w}), which the update does not hold")
    return observation.gradients[w], (observation.gradients.get(b) if b else None)


@LABELS.register("soft")
def soft(observation: Observation, task: Task) -> None:
    """Optimise a soft label per example jointly with the input (DLG)."""
    return None


@LABELS.register("idlg")
def idlg(observation: Observation, task: Task) -> torch.Tensor:
    """Read the single example's label off the output layer's gradient sign (iDLG); batch 1 only."""
    if observation.batch_size != 1:
        raise ConfigError("label strategy 'idlg' needs batch size 1; use 'batch' for larger batches")
    params = dict(task.parameters())
    w, b = task.classifier_parameter_names()
    label = analytic.label_single(*_classifier_grads(observation, task), params[w].detach(), params[b].detach() if b else None)
    return torch.nn.functional.one_hot(torch.tensor([label]), task.num_classes).double()


@LABELS.register("batch")
def batch(observation: Observation, task: Task) -> torch.Tensor:
    """Infer the batch's labels from the output layer (distinct labels exact, repeats estimated).

    With an output bias, labels the sign rule misses (a present class that other examples predict
    confidently) are searched by the residual of the output layer's feature solve.
    """
    weight_grad, bias_grad = _classifier_grads(observation, task)
    w_name, b_name = task.classifier_parameter_names()
    if bias_grad is not None and observation.batch_size > 1 and not observation.extra.get("fedavg"):
        params = dict(task.parameters())
        ids, _ = analytic.label_search(
            weight_grad, bias_grad, params[w_name], params[b_name], observation.batch_size, reduction=observation.reduction
        )
    else:
        ids = analytic.label_counts(weight_grad, bias_grad, observation.batch_size, reduction=observation.reduction)
    return torch.nn.functional.one_hot(torch.tensor(ids), task.num_classes).double()
