"""What a defense costs: train the task's model briefly under it and report held-out accuracy.

The defense is applied to every training step's update exactly as the client applies it to the
update an attacker sees, so leakage and utility are measured for the same setting.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import numpy as np
import torch

from leakkit.run.config import Recipe
from leakkit.registry import Registry
from leakkit.client.dpsgd import PrivateBatch
from leakkit.client.victim import defend, observe, per_example_gradients

UtilityFn = Callable[[Recipe, int], dict[str, Any]]
UTILITY: Registry[UtilityFn] = Registry("utility task")

STEPS = 300
BATCH = 32
LR = 0.05
MOMENTUM = 0.9


@UTILITY.register(
    "image-classification",
    description=f"train the recipe's model on scikit-learn's 8x8 digits ({STEPS} SGD steps, batch {BATCH}) under the defense; held-out accuracy",
)
def digits_utility(recipe: Recipe, seed: int) -> dict[str, Any]:
    from sklearn.datasets import load_digits

    from leakkit.vision.data import resize
    from leakkit.tasks import TASKS

    t = recipe.task
    X, y = load_digits(return_X_y=True)
    # digits are 8x8 in [0, 16]; as RGB pictures at the model's size so the architecture is the audited one
    pictures = np.stack([resize(np.repeat((x.reshape(8, 8) / 16.0)[..., None], 3, axis=-1), t.image_size, t.channels) for x in X])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        task = TASKS.get(t.name)(model=t.model, num_classes=10, image_size=t.image_size, channels=t.channels, mean=t.mean or None, std=t.std or None)
    inputs = task.from_pixels(torch.from_numpy(pictures).double()).float()
    labels = torch.from_numpy(y).long()
    order = np.random.default_rng(seed).permutation(len(y))
    test, train = order[:500], order[500:]
    rng = np.random.default_rng(seed + 1)
    params = dict(task.parameters())
    velocity = {n: torch.zeros_like(p) for n, p in params.items()}
    started = time.perf_counter()

    def batch() -> tuple[torch.Tensor, torch.Tensor]:
        idx = rng.choice(train, BATCH, replace=False)
        return inputs[idx], labels[idx]

    for step in range(STEPS):
        x, yb = batch()
        update = defend(
            observe(task, x, yb, reduction=recipe.data.reduction), recipe.defense, seed=seed * 1_000_003 + step,
            per_example=lambda x=x, yb=yb: per_example_gradients(task, x, yb),
            other_clients=lambda k: [observe(task, *batch(), reduction=recipe.data.reduction) for _ in range(k)],
            batch=PrivateBatch(task, x, yb, recipe.data.reduction),
        )
        with torch.no_grad():
            for n, p in params.items():
                g = update.gradients[n].to(p)
                velocity[n].mul_(MOMENTUM).add_(g)
                p.sub_(LR * velocity[n])
    with torch.no_grad():
        predicted = task.model(inputs[test]).argmax(-1)
    accuracy = float((predicted == labels[test]).float().mean())
    return {
        "accuracy": accuracy,
        "dataset": "scikit-learn digits (1297 train / 500 test)",
        "model": t.model,
        "image_size": t.image_size,
        "defense": recipe.defense,
        "steps": STEPS,
        "batch": BATCH,
        "lr": LR,
        "momentum": MOMENTUM,
        "seconds": round(time.perf_counter() - started, 2),
    }


def measure_utility(recipe: Recipe, *, seed: int) -> dict[str, Any]:
    """Held-out accuracy of the recipe's task trained under its defense (see UTILITY)."""
    return UTILITY.get(recipe.task.name)(recipe, seed)
