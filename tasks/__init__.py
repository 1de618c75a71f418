"""Task adapters: each owns a model, the input space an attack searches, and the loss.

Installed as `leakkit.tasks`, so research code can do
`from leakkit.tasks import ImageClassification`.
"""

from __future__ import annotations

from typing import Any, Callable

from leakkit.registry import Registry
from leakkit.tasks.base import Task
from leakkit.tasks.models import MODELS, build_model, torchvision_available
from leakkit.tasks.vision import ImageClassification

TaskBuilder = Callable[..., Task]
TASKS: Registry[TaskBuilder] = Registry("task")


@TASKS.register("image-classification", description="image classifier; attack searches normalised pixels")
def _image_classification(**options: Any) -> Task:
    return ImageClassification.from_name(**options)


@TASKS.register("masked-lm", description="BERT-style masked LM; attack searches word-embedding space")
def _masked_lm(**options: Any) -> Task:
    from leakkit.tasks.text import build_text_task

    return build_text_task("masked-lm", **options)


@TASKS.register("sequence-classification", description="BERT-style sentence classifier (TAG/LAMP setting)")
def _sequence_classification(**options: Any) -> Task:
    from leakkit.tasks.text import build_text_task

    return build_text_task("sequence-classification", **options)


__all__ = ["Task", "ImageClassification", "TASKS", "MODELS", "build_model", "torchvision_available"]
