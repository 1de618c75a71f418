"""How far a shared gradient determines a batch of images: equations against unknowns per layer.

R-GAP's count (Zhu & Blaschko, ICLR 2021), extended to batches. Walking down from the output
layer, a Conv2d/Linear layer's inputs (B x its input size unknowns) are constrained by its forward
equation, once its outputs are known (B x its output size equations; none for the output layer,
whose logits are not shared), and by its weight gradient dW = sum_b dz_b x_b^T. A gradient matrix
[m, n] of rank r carries r(m + n - r) independent numbers (the dimension of rank-r matrices), plus
m in the bias gradient. Where a layer has fewer equations than unknowns the gradient alone does
not fix that layer's inputs: image priors, not the update, decide what comes back. The count is
attacker-side (the model and the update only) and linear: nonlinear coupling across layers can
pin down more than it says, so "under-determined" means hard for every layer-wise method, not
impossible.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from typing import Any, Mapping, Sequence

import torch
from torch import nn

# Singular values below this fraction of the largest count as zero: float32 gradients carry ~1e-7
# relative error, and a defended update (noise) is full rank however small the noise is.
RANK_TOLERANCE = 1e-5


@dataclass(frozen=True)
class LayerCount:
    """One affine layer's count, for the whole batch.

    unknowns: B x the layer's input size; forward: B x its output size (0 for the output layer);
    gradient: independent numbers in the weight and bias gradients; rank: of the weight gradient
    reshaped to [outputs, inputs per output] (per channel and kernel window for a convolution).
    """

    name: str
    unknowns: int
    forward: int
    gradient: int
    rank: int

    @property
    def equations(self) -> int:
        return self.forward + self.gradient

    @property
    def determined(self) -> bool:
        return self.equations >= self.unknowns

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "equations": self.equations, "determined": self.determined}


def _affine_shapes(model: nn.Module, input_shape: Sequence[int]) -> list[tuple[str, nn.Module, int, int]]:
    """(name, module, input size, output size) per example of every Conv2d/Linear leaf, in call order."""
    work = copy.deepcopy(model).to(torch.float32).eval()
    seen: list[tuple[str, nn.Module, int, int]] = []
    handles = [
        m.register_forward_hook(lambda mod, args, out, name=name: seen.append((name, mod, args[0][0].numel(), out[0].numel())))
        for name, m in work.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))
    ]
    try:
        with torch.no_grad():
            work(torch.zeros((1, *input_shape)))
    finally:
        for h in handles:
            h.remove()
    return seen


def count(model: nn.Module, gradients: Mapping[str, torch.Tensor], input_shape: Sequence[int], batch_size: int) -> list[LayerCount]:
    """Equations against unknowns of every affine layer, output layer first.

    Args:
        model: the shared model (not modified: a copy is traced).
        gradients: the update, by parameter name (`model.named_parameters()`); layers whose weight
            gradient is not shared count no gradient equations.
        input_shape: one example's input shape, e.g. (3, 32, 32).
        batch_size: examples in the update.
    Returns:
        One LayerCount per Conv2d/Linear layer, from the output layer down to the first.
    """
    layers = _affine_shapes(model, input_shape)
    out: list[LayerCount] = []
    for k, (name, module, n_in, n_out) in enumerate(reversed(layers)):
        prefix = f"{name}." if name else ""
        g = gradients.get(f"{prefix}weight")
        rank, numbers = 0, 0
        if g is not None:
            M = g.detach().double().reshape(g.shape[0], -1)
            s = torch.linalg.svdvals(M)
            rank = int((s > s[0] * RANK_TOLERANCE).sum()) if s.numel() and s[0] > 0 else 0
            numbers = rank * (M.shape[0] + M.shape[1] - rank)
        if module.bias is not None and f"{prefix}bias" in gradients:
            numbers += module.bias.numel()
        forward = 0 if k == 0 else batch_size * n_out
        out.append(LayerCount(name, batch_size * n_in, forward, numbers, rank))
    return out


def verdict(counts: Sequence[LayerCount], batch_size: int) -> str | None:
    """One line naming the first layer (from the output) the gradient does not determine, or None."""
    short = next((c for c in counts if not c.determined), None)
    if short is None:
        return None
    return (f"the gradient does not determine this batch of {batch_size} layer by layer: layer {short.name!r} has "
            f"{short.equations:,} equations for {short.unknowns:,} unknowns (R-GAP's count; 'determinacy' in metrics.json); "
            "image priors, not the update, decide what comes back below it")


def determined_in_general(task: Any, batch_size: int, *, seed: int = 0) -> bool:
    """Whether an update of `batch_size` examples determines its inputs at every layer, in general.

    The count of `count` on the gradient of random inputs with distinct labels (the attacker's own
    draw, never the client's data): the ranks a generic update has. A recipe's `[underdetermined]`
    settings are chosen from this before any update is seen.
    """
    gen = torch.Generator().manual_seed(seed)
    x = task.from_pixels(torch.rand((batch_size, *task.input_shape), generator=gen, dtype=torch.float64)).float()
    labels = torch.nn.functional.one_hot(torch.arange(batch_size) % task.num_classes, task.num_classes).float()
    names = [n for n, _ in task.matched_parameters()]
    with torch.enable_grad():
        grads = task.gradients(x, labels, reduction="mean", matched=True)
    counts = count(task.model, dict(zip(names, grads)), task.input_shape, batch_size)
    return all(c.determined for c in counts)
