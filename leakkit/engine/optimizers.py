"""Optimizers and learning-rate schedules for the engine, by name."""

from __future__ import annotations

from typing import Callable

import torch

from leakkit.registry import Registry

OptimizerBuilder = Callable[..., torch.optim.Optimizer]  # (params, *, lr, inner_steps, history)
ScheduleBuilder = Callable[[torch.optim.Optimizer, int], "torch.optim.lr_scheduler.LRScheduler | None"]

OPTIMIZERS: Registry[OptimizerBuilder] = Registry("optimizer")
SCHEDULES: Registry[ScheduleBuilder] = Registry("schedule")


class SignedAdam(torch.optim.Adam):
    """Adam fed with the sign of the gradient (Inverting Gradients' choice for cosine matching)."""

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.grad.sign_()
        super().step()
        return loss


@OPTIMIZERS.register("lbfgs")
def _lbfgs(params, *, lr, inner_steps, history):
    """L-BFGS with strong-Wolfe line search (inner_steps iterations per step)."""
    return torch.optim.LBFGS(
        params, lr=lr, max_iter=inner_steps, history_size=history, line_search_fn="strong_wolfe",
        tolerance_grad=0.0, tolerance_change=0.0,
    )


@OPTIMIZERS.register("lbfgs-plain")
def _lbfgs_plain(params, *, lr, inner_steps, history):
    """L-BFGS with a fixed step and no line search, as in the DLG paper's code."""
    return torch.optim.LBFGS(params, lr=lr, max_iter=inner_steps, history_size=history)


@OPTIMIZERS.register("adam")
def _adam(params, *, lr, inner_steps, history):
    """Adam."""
    return torch.optim.Adam(params, lr=lr)


@OPTIMIZERS.register("signed-adam")
def _signed_adam(params, *, lr, inner_steps, history):
    """Adam on the gradient's sign (Inverting Gradients)."""
    return SignedAdam(params, lr=lr)


@SCHEDULES.register("none")
def _constant(optimizer, steps):
    """Constant learning rate."""
    return None


@SCHEDULES.register("multistep")
def _multistep(optimizer, steps):
    """Divide the rate by 10 at 3/8, 5/8 and 7/8 of the budget (Inverting Gradients)."""
    marks = sorted({max(1, int(steps * f)) for f in (3 / 8, 5 / 8, 7 / 8)})
    return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=marks, gamma=0.1)


@SCHEDULES.register("cosine")
def _cosine(optimizer, steps):
    """Cosine decay to zero over the budget."""
    return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, steps))
