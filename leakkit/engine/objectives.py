"""Gradient-matching objectives and per-layer weightings, by name.

An objective compares the candidate's gradient with the observed one, layer by layer:
`objective(pred, target, weights, options) -> scalar`, where `pred` and `target` are lists of
tensors in model parameter order and `weights` one float per layer. An `InputObjective`
(`subspace`) scores the candidate's own inputs against the update instead, and never needs the
candidate's gradient (no second-order backward pass).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch

from leakkit.engine.spans import row_span
from leakkit.errors import ConfigError
from leakkit.registry import Registry


@dataclass(frozen=True)
class ObjectiveOptions:
    """Hyper-parameters some objectives use. l1_weight: TAG's weight on the L1 term."""

    l1_weight: float = 1e-2


Objective = Callable[[Sequence[torch.Tensor], Sequence[torch.Tensor], Sequence[float], ObjectiveOptions], torch.Tensor]
LayerWeighting = Callable[[Sequence[torch.Tensor]], list[float]]

OBJECTIVES: Registry[Objective] = Registry("objective")
LAYER_WEIGHTS: Registry[LayerWeighting] = Registry("layer weighting")


@OBJECTIVES.register("l2")
def squared_l2(pred, target, weights, options):
    """Squared Euclidean distance, sum over layers (DLG)."""
    return sum(w * (p - t).pow(2).sum() for p, t, w in zip(pred, target, weights))


@OBJECTIVES.register("cosine")
def cosine(pred, target, weights, options):
    """1 - cosine similarity of the whole weighted gradient vectors (Inverting Gradients)."""
    dot = sum(w * (p * t).sum() for p, t, w in zip(pred, target, weights))
    pn = sum(w * p.pow(2).sum() for p, w in zip(pred, weights))
    tn = sum(w * t.pow(2).sum() for t, w in zip(target, weights))
    return 1 - dot / (pn.sqrt() * tn.sqrt() + 1e-30)


@OBJECTIVES.register("l2+l1")
def l2_plus_l1(pred, target, weights, options):
    """Squared L2 plus l1_weight times L1 distance, per layer (TAG)."""
    return sum(
        w * ((p - t).pow(2).sum() + options.l1_weight * (p - t).abs().sum())
        for p, t, w in zip(pred, target, weights)
    )


@dataclass(frozen=True)
class InputObjective:
    """An objective on the candidate's inputs: `fit(task, gradients by name, noise_std)` reads the
    update once and returns `score(inputs) -> scalar` (0 for the client's true inputs)."""

    fit: Callable[[Any, Mapping[str, torch.Tensor], float], Callable[[torch.Tensor], torch.Tensor]]


def _fit_subspace(task: Any, gradients: Mapping[str, torch.Tensor], noise_std: float) -> Callable[[torch.Tensor], torch.Tensor]:
    names, probe = task.span_probe()
    missing = [n for n in names if n not in gradients]
    if missing:
        raise ConfigError(f"the subspace objective reads the gradient of {missing[0]}, which the update withholds")
    rows = torch.cat([gradients[n].detach().double() for n in names])
    basis = row_span(rows, noise_std=noise_std)
    if basis.shape[1] >= basis.shape[0]:
        raise ConfigError(f"the first attention layer's gradient spans all {basis.shape[0]} directions: the batch holds "
                          "more tokens than the model is wide (or the noise was not declared), so its span constrains nothing")

    def score(inputs: torch.Tensor) -> torch.Tensor:
        z, mask = probe(inputs)
        b = basis.to(z)
        # squared, not spans.span_residual's norm: a norm's gradient is undefined where the residual is 0
        off = (z - (z @ b) @ b.T).pow(2).sum(-1) / z.pow(2).sum(-1).clamp_min(1e-30)
        m = mask.to(z)
        return (off * m).sum() / m.sum()

    return score


OBJECTIVES.register(
    "subspace",
    description="mean squared distance of the first attention layer's inputs from the span its gradient reveals (TIGER); no candidate gradient",
)(InputObjective(_fit_subspace))  # type: ignore[arg-type]


@LAYER_WEIGHTS.register("uniform")
def uniform(target):
    """Every layer counts equally."""
    return [1.0] * len(target)


@LAYER_WEIGHTS.register("inverse-norm")
def inverse_norm(target):
    """Each layer scaled by 1 / its observed squared norm, so small layers are not drowned out."""
    norms = [float(t.pow(2).sum()) for t in target]
    return [len(norms) / (n * sum(1 / max(m, 1e-30) for m in norms)) if n > 0 else 0.0 for n in norms]


@LAYER_WEIGHTS.register("input-first")
def input_first(target):
    """Weights falling linearly from 1 (first layer) to 1/L (last): layers near the input matter more (TAG)."""
    n = len(target)
    return [(n - i) / n for i in range(n)]


def relative_distance(pred: Sequence[torch.Tensor], target: Sequence[torch.Tensor]) -> float:
    """||pred - target||^2 / ||target||^2 over all layers: the objective-independent gradient distance."""
    with torch.no_grad():
        num = torch.stack([(p - t).pow(2).sum() for p, t in zip(pred, target)]).sum()
        den = torch.stack([t.pow(2).sum() for t in target]).sum()
        num, den = float(num), float(den)
    return num / den if den > 0 else num
