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
    label = analytic.label_single(*_classifier_grads(observation, task))
    return torch.nn.functional.one_hot(torch.tensor([label]), task.num_classes).double()


@LABELS.register("batch")
def batch(observation: Observation, task: Task) -> torch.Tensor:
    """Infer the batch's labels from the output layer (distinct labels exact, repeats estimated)."""
    ids = analytic.label_counts(
        *_classifier_grads(observation, task), observation.batch_size, reduction=observation.reduction
    )
    return torch.nn.functional.one_hot(torch.tensor(ids), task.num_classes).double()
