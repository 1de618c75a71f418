"""An update from two checkpoints: what a server holds when it keeps the model before and after a client's round.

One local SGD step at learning rate lr moves the weights by -lr * gradient, so the FedSGD gradient is
(before - after) / lr. After several steps the difference itself is the FedAvg update the attack
simulates (`Task.local_update`). The protocol (lr, steps, local batch, batch size, reduction) is not
in the checkpoints: the caller states it.
"""

from __future__ import annotations

from pathlib import Path

from leakkit.client.observation import Observation, fingerprint
from leakkit.errors import InputError, few
from leakkit.tasks.base import Task
from leakkit.tasks.weights import read_state_dict


def update_from_checkpoints(
    before: str | Path,
    after: str | Path,
    task: Task,
    *,
    local_lr: float,
    local_steps: int = 1,
    local_batch: int = 0,
    batch_size: int,
    reduction: str = "mean",
    model_name: str = "",
) -> Observation:
    """The observation a checkpoint pair implies, for the parameters the task's model trains.

    Args:
        before, after: safetensors state_dicts of the model at the start and end of the client's round.
        task: the attacker's task; its trainable parameter names select what is compared.
        local_lr, local_steps, local_batch: the client's SGD protocol (see `ClientSpec`).
        batch_size, reduction: how many examples the client's loss covered, and how it combined them.
    Returns:
        A FedSGD gradient (local_steps=1) or FedAvg weight difference, with `extra["checkpoints"]`.
    Raises:
        InputError: unreadable files, parameters missing from either file, shapes that differ,
            or two identical checkpoints (no update to attack).
    """
    first, second = read_state_dict(before), read_state_dict(after)
    names = [n for n, _ in task.parameters()]
    shapes = {n: tuple(p.shape) for n, p in task.parameters()}
    for label, state, path in (("before", first, before), ("after", second, after)):
        missing = [n for n in names if n not in state]
        wrong = [f"{n} {tuple(state[n].shape)} != {shapes[n]}" for n in names if n in state and tuple(state[n].shape) != shapes[n]]
        if missing or wrong:
            what = "; ".join(filter(None, (missing and f"missing {few(missing)}", wrong and f"wrong shapes {few(wrong)}")))
            raise InputError(f"--checkpoints {label} ({path}) does not fit the model: {what}")
    # float64 difference of the stored values: exact, so the step is not lost to rounding
    diff = {n: first[n].double() - second[n].double() for n in names}
    if all(float(d.abs().max()) == 0.0 for d in diff.values()):
        raise InputError(f"--checkpoints {before} and {after} hold the same weights: there is no update to attack")
    extra: dict = {"task": task.name, "num_classes": task.num_classes,
                   "checkpoints": {"before": str(before), "after": str(after), "local_lr": local_lr, "local_steps": local_steps}}
    if local_steps > 1:
        update = diff
        extra["fedavg"] = {"local_steps": local_steps, "local_lr": local_lr, "local_batch": local_batch}
    else:
        update = {n: d / local_lr for n, d in diff.items()}
    dtype = next(iter(task.model.parameters())).dtype
    return Observation(
        gradients={n: update[n].to(dtype) for n in names},
        batch_size=batch_size,
        reduction=reduction,
        model=model_name,
        fingerprint=fingerprint(task.model),
        extra=extra,
    )

