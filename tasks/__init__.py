"""Task adapters: each owns a model, the input space an attack searches, and the loss.

Installed as `leakkit.tasks`, so research code can do
`from leakkit.tasks import ImageClassification`.

This is also the one home of the facts other layers ask about a task: its modality (image or
text), the metric that scores a recovery, and that metric's default success threshold.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from leakkit.errors import InputError
from leakkit.registry import Registry
from leakkit.tasks.base import Task
from leakkit.tasks.models import MODELS, build_model, torchvision_available
from leakkit.tasks.vision import ImageClassification


@dataclass(frozen=True)
class Modality:
    """What kind of data a task's inputs are, and how a recovery of it is judged.

    name: "image" or "text"; unit: what one example is called in messages;
    score: the per-example metric that decides success; threshold: its default success value
    (a recipe's `[metrics]` may change it).
    """

    name: str
    unit: str
    score: str
    threshold: float


MODALITIES: dict[str, Modality] = {
    "image": Modality("image", "image", "psnr", 40.0),
    "text": Modality("text", "sentence", "rouge1", 0.9),
}

TaskBuilder = Callable[..., Task]
TASKS: Registry[TaskBuilder] = Registry("task")
_TASK_MODALITY: dict[str, str] = {}


def register_task(name: str, *, modality: str, description: str) -> Callable[[TaskBuilder], TaskBuilder]:
    """Register a task builder under `name`, of a modality in MODALITIES."""
    if modality not in MODALITIES:
        raise ValueError(f"unknown modality {modality!r}")

    def add(builder: TaskBuilder) -> TaskBuilder:
        TASKS.register(name, description=description)(builder)
        _TASK_MODALITY[name] = modality
        return builder

    return add


def modality_of(task_name: str) -> Modality:
    """The modality of a registered task; ConfigError listing the valid tasks otherwise."""
    TASKS.get(task_name)
    return MODALITIES[_TASK_MODALITY[task_name]]


def tasks_of(modality: str) -> list[str]:
    """Names of the registered tasks of one modality, sorted."""
    return sorted(n for n, m in _TASK_MODALITY.items() if m == modality)


def check_labels(labels: list[int | None], num_classes: int) -> None:
    """InputError unless every given label is a class of the task (never wrapped modulo the class count)."""
    given = [y for y in labels if y is not None]
    if not given:
        return
    low, high, distinct = min(given), max(given), len(set(given))
    if low < 0 or high >= num_classes:
        raise InputError(
            f"the data has {distinct} class(es) with labels {low}..{high}, but task.num_classes={num_classes}; "
            f"set task.num_classes={max(high + 1, distinct)} (labels must be 0..num_classes-1)"
        )


@register_task("image-classification", modality="image", description="image classifier; attack searches normalised pixels")
def _image_classification(**options: Any) -> Task:
    return ImageClassification.from_name(**options)


@register_task("masked-lm", modality="text", description="BERT-style masked LM; attack searches word-embedding space")
def _masked_lm(**options: Any) -> Task:
    from leakkit.tasks.text import build_text_task

    return build_text_task("masked-lm", **options)


@register_task("sequence-classification", modality="text", description="BERT-style sentence classifier (TAG/LAMP setting)")
def _sequence_classification(**options: Any) -> Task:
    from leakkit.tasks.text import build_text_task

    return build_text_task("sequence-classification", **options)


@register_task("causal-lm", modality="text", description="GPT-style causal LM (next-token prediction); default: a random GPT-2-shaped model")
def _causal_lm(**options: Any) -> Task:
    from leakkit.tasks.text import build_text_task

    return build_text_task("causal-lm", **options)


__all__ = [
    "Task", "ImageClassification", "TASKS", "MODELS", "MODALITIES", "Modality", "build_model", "check_labels",
    "modality_of", "register_task", "tasks_of", "torchvision_available",
]
