"""The matching engine and its building blocks: objectives, optimizers, priors, label strategies
and the output layer's closed-form leaks. `reconstruct` is the only optimisation loop in leakkit.

    from leakkit.engine import AttackConfig, reconstruct
"""

from leakkit.engine.matching import AttackConfig, Recovery, StepCallback, StepEvent, reconstruct

__all__ = ["AttackConfig", "Recovery", "StepCallback", "StepEvent", "reconstruct"]
