"""Closed-form leaks read straight off a shared gradient, with no optimisation.

All functions take gradient tensors only (never ground truth).
"""

from __future__ import annotations

from itertools import combinations_with_replacement

import torch

# A label set whose feature solve fits the gradient this closely is the batch's (wrong labels leave > 1e-3).
LABEL_FIT = 1e-8


def class_signal(weight_grad: torch.Tensor, bias_grad: torch.Tensor | None) -> torch.Tensor:
    """Per-class value that is negative exactly for classes present in the batch.

    For cross-entropy, the output-bias gradient of class c is mean_i(p_ic - y_ic): only a class
    that is some example's label can be negative. Without a bias, the row sums of the weight
    gradient carry the same sign when the layer's inputs are non-negative (sigmoid/GELU-ish features).

    Shape: weight_grad [C, D], bias_grad [C] -> [C].
    """
    if bias_grad is not None:
        return bias_grad.detach().double()
    return weight_grad.detach().double().sum(dim=1)


def label_single(
    weight_grad: torch.Tensor, bias_grad: torch.Tensor | None, weight: torch.Tensor | None = None, bias: torch.Tensor | None = None
) -> int:
    """iDLG: the label of a single example is the class with the negative (smallest) signal.

    Where no signal is negative the softmax saturated: the client's model put probability 1 (in
    float32) on the true class, whose gradient rounds to 0 like every other (seed 53's LeNet-ReLU,
    a logit gap of 28). Given the output layer's `weight` and `bias`, the label is then the model's
    own prediction on the input solved from the gradient, which a saturated softmax makes certain.
    """
    signal = class_signal(weight_grad, bias_grad)
    if float(signal.min()) < 0 or weight is None or bias is None or bias_grad is None or not bool((bias_grad != 0).any()):
        return int(signal.argmin())
    h = linear_layer_input(weight_grad.double(), bias_grad.double())
    return int((weight.double() @ h + bias.double()).argmax())


def label_counts(
    weight_grad: torch.Tensor, bias_grad: torch.Tensor | None, batch_size: int, *, reduction: str = "mean"
) -> list[int]:
    """Labels of a batch, as a sorted list of class ids with multiplicity.

    Distinct labels are exact whenever the other examples' summed probability for each present class
    stays below its count (the usual case for many classes): then exactly the present classes have
    a negative signal. A model confidently predicting a present class for another example hides it. Repeated labels are
    estimated: with reduction "mean", signal_c = mean_p_c - n_c / B, and mean_p_c is estimated by
    the mean signal of the absent (non-negative) classes, so n_c ~ B * (m - signal_c).
    Counts are then adjusted to sum to the batch size.
    """
    s = class_signal(weight_grad, bias_grad)
    if reduction == "sum":
        s = s / batch_size
    present = torch.nonzero(s < 0).flatten()
    if len(present) == 0:  # degenerate: fall back to the most negative classes
        present = s.argsort()[:1]
    if len(present) >= batch_size:
        chosen = present[s[present].argsort()[:batch_size]]
        return sorted(int(c) for c in chosen)
    absent = s[s >= 0]
    m = float(absent.mean()) if len(absent) else 0.0
    raw = batch_size * (m - s[present])
    counts = torch.clamp(raw.floor(), min=1).long()
    while int(counts.sum()) < batch_size:  # give the rest to the largest remainders
        counts[int((raw - counts).argmax())] += 1
    while int(counts.sum()) > batch_size:
        over = torch.where(counts > 1, raw - counts, torch.full_like(raw, float("inf")))
        counts[int(over.argmin())] -= 1
    return sorted(int(c) for c, k in zip(present, counts) for _ in range(int(k)))


def linear_layer_input(weight_grad: torch.Tensor, bias_grad: torch.Tensor) -> torch.Tensor:
    """Exact input of a linear layer with bias, for batch size 1: x = dW[c] / db[c].

    The row c with the largest |db[c]| is used for numerical stability.
    Shape: weight_grad [C, D], bias_grad [C] -> [D].
    """
    c = int(bias_grad.abs().argmax())
    return weight_grad[c] / bias_grad[c]


def linear_layer_inputs(
    weight_grad: torch.Tensor,
    bias_grad: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    labels: torch.Tensor,
    *,
    reduction: str = "mean",
    iterations: int = 2000,
) -> tuple[torch.Tensor, float]:
    """Per-example inputs of the output linear layer, from its gradient, its weights and the labels.

    With cross-entropy, dW = s * sum_i (p_i - y_i) h_i^T and db = s * sum_i (p_i - y_i), where
    p_i = softmax(W h_i + b) and s = 1/B ("mean") or 1 ("sum"). For batch 1 this is exact in closed
    form (`linear_layer_input`); for a batch with known labels, the same equations are solved for all
    h_i at once, starting from the per-label-row ratio dW[c]/db[c], which is exact when the other
    examples give class c negligible probability.

    Args:
        weight_grad, bias_grad: observed gradients, shapes [C, D] and [C].
        weight, bias: the layer's parameters, shapes [C, D] and [C].
        labels: [B, C] label distributions (one-hot), the order of the returned rows.
    Returns:
        ([B, D] float64 inputs, relative residual of the equations). A residual far above zero
        means the labels are not the batch's (e.g. a repeated label estimated wrongly).
    """
    gW, gb = weight_grad.double(), bias_grad.double()
    W, b, Y = weight.detach().double(), bias.detach().double(), labels.detach().double()
    batch = Y.shape[0]
    scale = 1.0 / batch if reduction == "mean" else 1.0
    nW, nb = float(gW.pow(2).sum()), float(gb.pow(2).sum())

    def residual(H: torch.Tensor) -> torch.Tensor:
        A = scale * (torch.softmax(H @ W.T + b, dim=-1) - Y)
        return (A.T @ H - gW).pow(2).sum() / nW + (A.sum(0) - gb).pow(2).sum() / nb

    if batch == 1:  # closed form; its residual still tells whether the label fits
        H = linear_layer_input(gW, gb)[None]
        return H, float(residual(H))
    rows = Y.argmax(dim=1)
    H = torch.stack([gW[c] / gb[c] for c in rows])
    # repeated labels start from the same row: nudge them apart so the solve can separate them
    H = H + 1e-3 * H.abs().mean() * torch.randn(H.shape, generator=torch.Generator().manual_seed(0), dtype=H.dtype)
    H.requires_grad_(True)
    opt = torch.optim.LBFGS([H], lr=1, max_iter=iterations, history_size=100, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-14, tolerance_change=1e-20)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = residual(H)
        loss.backward()
        return loss

    opt.step(closure)
    H = H.detach()
    return H, float(residual(H))


def label_search(
    weight_grad: torch.Tensor,
    bias_grad: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    batch_size: int,
    *,
    reduction: str = "mean",
    candidates: int = 8,
    max_missing: int = 2,
    iterations: int = 300,
) -> tuple[list[int], float]:
    """Labels of a batch, searching the ones the sign rule cannot see.

    A present class is hidden from `label_counts` when other examples predict it confidently (their
    summed probability outweighs its count). When the sign rule finds fewer distinct classes than the
    batch size, each candidate completion (repeats of the classes found, or one of the `candidates`
    non-negative classes with the largest signal) is scored by the residual of the output layer's
    feature solve (`linear_layer_inputs`), and the best fit is kept; a fit below LABEL_FIT ends the
    search. More than `max_missing` unseen labels keep `label_counts`' estimate.

    Args:
        weight_grad, bias_grad: the output layer's observed gradients, shapes [C, D] and [C].
        weight, bias: the output layer's parameters.
        batch_size: examples in the batch.
    Returns:
        (sorted class ids with multiplicity, residual of their feature solve).
    """
    num_classes = bias_grad.shape[0]

    def residual(ids: list[int]) -> float:
        Y = torch.nn.functional.one_hot(torch.tensor(ids), num_classes).double()
        _, r = linear_layer_inputs(weight_grad, bias_grad, weight, bias, Y, reduction=reduction, iterations=iterations)
        return r

    estimate = label_counts(weight_grad, bias_grad, batch_size, reduction=reduction)
    found = sorted(set(estimate))
    missing = batch_size - len(found)
    best = (residual(estimate), estimate)
    if missing == 0 or missing > max_missing or best[0] < LABEL_FIT:
        return best[1], best[0]
    s = class_signal(weight_grad, bias_grad)
    unseen = [int(c) for c in s.argsort(descending=True) if int(c) not in found][:candidates]
    for extra in combinations_with_replacement(found + unseen, missing):
        ids = sorted(found + list(extra))
        if ids == best[1]:
            continue
        r = residual(ids)
        if r < best[0]:
            best = (r, ids)
            if r < LABEL_FIT:
                break
    return best[1], best[0]
