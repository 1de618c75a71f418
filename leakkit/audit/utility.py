"""What a defense costs: train the task's model briefly under it and report held-out accuracy.

The defense is applied to every training step's update exactly as the client applies it to the
update an attacker sees, so leakage and utility are measured for the same setting.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, Callable

import numpy as np
import torch

from leakkit.run.config import ClientSpec, Recipe
from leakkit.registry import Registry
from leakkit.client.dpsgd import PrivateBatch
from leakkit.client.victim import defend, observe, per_example_gradients

UtilityFn = Callable[[Recipe, int], dict[str, Any]]
UTILITY: Registry[UtilityFn] = Registry("utility task")

STEPS = 300
BATCH = 32
LR = 0.01  # 0.05 (with momentum 0.9) left seed 23's LeNet-sigmoid at chance (loss 2.30 from step 60 on); 0.01 trains seeds 0, 11, 23
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


TEXT_STEPS = 300  # MiniLM on SST-2 (seed 23): 51 % at 60 steps, 80 % at 120, 82-85 % from 240; at 60 every defense read as ruinous
TEXT_BATCH = 16
TEXT_LR = 1e-4
TEXT_EPS = 1e-6  # BERT's own Adam epsilon: coordinates with almost no gradient are not pushed a full step
TEXT_TEST = 400  # held-out sentences at most; the file's remaining sentences train


def text_utility_data(recipe: Recipe) -> str | None:
    """The sentence file a text audit fine-tunes on (labelled for classification), or None (no utility)."""
    return recipe.utility.data or None


@dataclasses.dataclass(frozen=True)
class _Scorer:
    """What a text task's fine-tune needs besides the loop: which sentences it can use and the
    held-out score (correct, counted) of a batch."""

    usable: Callable[[Any], bool]
    score: Callable[[Any, Any], tuple[int, int]]
    measure: str
    description: str


def _classified(task: Any, b: Any) -> tuple[int, int]:
    logits = task.model(input_ids=b.input_ids, attention_mask=b.layout.attention_mask()).logits
    return int((logits.argmax(-1) == b.labels).sum()), len(b.labels)


def _unmasked(task: Any, b: Any) -> tuple[int, int]:
    logits = task.model(input_ids=b.input_ids, attention_mask=b.layout.attention_mask()).logits
    masked = b.labels >= 0
    return int((logits.argmax(-1)[masked] == b.labels[masked]).sum()), int(masked.sum())


_SCORERS = {
    "sequence-classification": _Scorer(
        lambda s: s.label is not None, _classified, "held-out accuracy",
        f"fine-tune the recipe's classifier on the labelled sentences of utility.data ({TEXT_STEPS} Adam steps, batch {TEXT_BATCH}) "
        f"under the defense; accuracy on up to {TEXT_TEST} held-out sentences of the same file",
    ),
    "masked-lm": _Scorer(
        lambda s: True, _unmasked, "held-out masked-token accuracy (top 1)",
        f"fine-tune the recipe's masked LM on the sentences of utility.data ({TEXT_STEPS} Adam steps, batch {TEXT_BATCH}, "
        f"fresh masks each step) under the defense; masked-token accuracy on up to {TEXT_TEST} held-out sentences",
    ),
}


def _fine_tune(recipe: Recipe, seed: int, *, scorer: _Scorer) -> dict[str, Any]:
    """Fine-tune the recipe's text model as a FedSGD client under its defense; score held-out sentences."""
    from leakkit.errors import InputError
    from leakkit.run.text import build_text, client_update, make_text_batch
    from leakkit.text.data import read_input

    path = text_utility_data(recipe)
    if path is None:
        raise InputError(f"text utility needs sentences to fine-tune on: utility.data=FILE ({recipe.task.name})")
    u = recipe.utility
    steps, size, lr = u.steps or TEXT_STEPS, u.batch or TEXT_BATCH, u.lr or TEXT_LR
    # the audited model at the audited seed, trained as a FedSGD client: one step per update, no local epochs
    client_recipe = dataclasses.replace(recipe, client=ClientSpec())
    task = build_text(recipe, seed=seed)
    everything = read_input(path)
    usable = [s for s in everything if scorer.usable(s)]
    # sentences longer than the model takes are left out rather than cut: a cut sentence is other data
    pool = [s for s in usable if len(task.tokenizer(s.text)["input_ids"]) <= task.max_length]
    if len(pool) < 2 * size:
        raise InputError(f"utility.data {path}: {len(pool)} usable sentences that fit the model; at least {2 * size} are needed")
    order = np.random.default_rng(seed).permutation(len(pool))
    n_test = min(TEXT_TEST, len(pool) // 4)
    test, train = [pool[i] for i in order[:n_test]], [pool[i] for i in order[n_test:]]
    params = dict(task.parameters())
    opt = torch.optim.Adam(params.values(), lr=lr, eps=TEXT_EPS)
    rng = np.random.default_rng(seed + 1)
    started = time.perf_counter()

    def batch(step: int) -> Any:
        # masked LM: fresh masks every step, as a client draws them (classification ignores the seed)
        return make_text_batch(task, [train[i] for i in rng.choice(len(train), size, replace=False)], seed=step)

    for step in range(steps):
        update = client_update(task, batch(step), client_recipe, seed=seed, batch_index=step,
                               other_batches=lambda k, step=step: [batch(step) for _ in range(k)])
        opt.zero_grad(set_to_none=True)
        for n, p in params.items():
            if n in update.gradients:  # frozen parameters are not shared, so the server cannot train them
                p.grad = update.gradients[n].to(p)
        opt.step()
    correct = counted = 0
    task.model.eval()
    with torch.no_grad():
        for k in range(0, len(test), 64):
            c, n = scorer.score(task, make_text_batch(task, test[k : k + 64], seed=0))  # fixed test masks
            correct, counted = correct + c, counted + n
    return {
        "accuracy": correct / max(1, counted),
        "measure": scorer.measure,
        "dataset": f"{path} ({len(train)} train / {len(test)} test)",
        "left_out": {"unusable": len(everything) - len(usable), "too_long": len(usable) - len(pool)},
        "model": recipe.task.model,
        "defense": recipe.defense,
        "steps": steps,
        "batch": size,
        "lr": lr,
        "optimizer": f"Adam (eps {TEXT_EPS})",
        "seconds": round(time.perf_counter() - started, 2),
    }


for _name, _scorer in _SCORERS.items():
    UTILITY.register(_name, description=_scorer.description)(functools.partial(_fine_tune, scorer=_scorer))


def utility_available(recipe: Recipe) -> bool:
    """Whether an audit of this recipe can measure utility (a text model needs utility.data)."""
    if recipe.task.name not in UTILITY:
        return False
    return recipe.task.name not in _SCORERS or text_utility_data(recipe) is not None


def measure_utility(recipe: Recipe, *, seed: int) -> dict[str, Any]:
    """Held-out accuracy of the recipe's task trained under its defense (see UTILITY)."""
    return UTILITY.get(recipe.task.name)(recipe, seed)
