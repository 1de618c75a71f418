"""A found sentence's own share of a layer's gradient, for each label it may carry.

A batch's weight gradient is the sum of its sentences' gradients. Once the search has a sentence
that fits, its share can be recomputed and subtracted, so that the layer's span holds only the
sentences still missing (`leakkit.text.attack._SentenceSearch.deflate`). The share depends on
the sentence's label, which the attacker does not know: each task lists the labels a sentence can
carry, the likeliest first (`choices`), and `fit` searches them for the one whose share lowers the
gradient's rank by exactly the sentence's length (a wrong label leaves the rank where it was).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch

from leakkit.client.observation import Observation
from leakkit.engine.spans import span_residual
from leakkit.tasks.text import MaskedLanguageModeling, SequenceClassification, TextLayout, TextTask
from leakkit.text import analytic as ta

LABEL_CHOICES = 8  # labels per masked position tried, the likeliest by the decoder's gradient rows
# what the last sentence's right label may leave, relative to the whole batch's gradient: float32's
# rounding of every sentence subtracted before it (1.05e-6 on a test batch after three; a wrong
# label there left 0.6)
LAST_TOL = 1e-5
LABEL_SWEEPS = 16  # least-squares rounds (`fit`) before a sentence's label is given up

ChoicesFn = Callable[[TextTask, Observation, Sequence[int], list[str], int], "Choices | None"]


def deflatable(task: TextTask, observation: Observation) -> bool:
    """Whether `shares` can list this task's shares for this update: a mean or summed loss (a
    FedAvg update is several steps, not one sum), and for the masked LM the gradients its labels
    are read from (the decoder's and the layer feeding it)."""
    if observation.reduction not in ("mean", "sum"):
        return False
    if isinstance(task, SequenceClassification):
        return True
    if isinstance(task, MaskedLanguageModeling):
        head, (weight, _) = task.transform_name(), task.classifier_parameter_names()
        return head is not None and f"{head}.weight" in observation.gradients and weight in observation.gradients
    return False


@dataclass(frozen=True)
class Choices:
    """The labels a found sentence may carry, slot by slot (its class; or each masked position's
    token), the likeliest first, and the share of the gradient each combination gives."""

    slots: list[list[Any]]  # per slot, the values tried there, likeliest first
    share: Callable[[tuple[int, ...], int], list[torch.Tensor]]  # (pick: one index per slot, first name) -> a gradient per name from there
    label: Callable[[tuple[int, ...]], Any]  # the same pick as the label `exact` reports


def choices(task: TextTask, observation: Observation, row: Sequence[int], names: list[str], batch: int) -> Choices | None:
    """The labels sentence `row` may carry and their shares of the gradients `names`, scaled as the
    update's loss weighs one sentence; None where the task has no label to read here (no masked
    position).

    Args:
        task: the attacker's copy (float64 for a rank test at float32's floor).
        row: the sentence's token ids, [CLS] and [SEP] included.
        names: 2-D weights whose gradients are deflated.
        batch: the update's batch size.
    """
    for kind, fn in _CHOICES:
        if isinstance(task, kind):
            return fn(task, observation, row, names, batch)
    return None


def fit(
    options: Choices, rest: torch.Tensor, span: torch.Tensor, length: int, *, tested: int = 0, whole: float | None = None,
    sweeps: int = LABEL_SWEEPS,
) -> tuple[list[torch.Tensor], Any, torch.Tensor | None]:
    """The pick whose share, taken out of `rest`, lowers its rank by the sentence's `length`.

    The share is linear in the pick (a sum over slots), and the right pick leaves `rest` an
    n-dimensional null space (n = `length`) that the others do not. From the likeliest pick, each
    round takes the n directions where what is left is smallest, and solves by least squares which
    single-slot changes, added up, cancel it there; each slot takes the change whose weight passes
    1/2. A long sentence is often several slots off at once, and their effects do not add up in
    the size of what is left (fixing two of three wrong slots left 75 % of it on one SST-2
    sentence), so a walk on that size stops short; the least-squares weights name all three.

    Args:
        rest: what is left of the gradients of the names from `tested` on, stacked [rows, width].
        span: [width, T], an orthonormal basis of `rest`'s row space; the rank test runs in its
            coordinates (an SVD of [rows, T] instead of [rows, width]).
        length: the sentence's token count. Where it is T, the sentence is the batch's last and
            nothing may be left.
        whole: for the last sentence, the largest singular value of the whole batch's gradient
            (float32's rounding of it is what the right pick leaves; the sentence's own share
            may be far smaller).
    Returns:
        (share of every name, label, basis) for the last pick tried; basis [T, T - length] spans
        what that pick leaves, in the span's coordinates, where it passed, and is None where not.
    """
    total = span.shape[1]
    pick = (0,) * len(options.slots)
    if length > total:  # a span saturated at the layer's width: no rank drop can show
        return options.share(pick, 0), options.label(pick), None
    left = rest @ span
    scale = whole if length >= total else None
    seen = {pick}
    for _ in range(sweeps):
        share = options.share(pick, tested)
        m = left - torch.cat(share) @ span
        _, s, vh = np.linalg.svd(m.cpu().numpy(), full_matrices=False)  # numpy's LAPACK, as `row_span`
        cut = LAST_TOL * scale if scale else 1e-6 * s[0]  # `row_span`'s cut, or what may be left of the whole
        if int((s > cut).sum()) == total - length:
            return options.share(pick, 0), options.label(pick), torch.from_numpy(np.ascontiguousarray(vh[: total - length].T)).to(span)
        z = torch.from_numpy(vh[total - length :].T.copy()).to(span)  # [T, n]: where what is left is smallest
        null = span @ z  # the same directions, [width, n]
        here = torch.cat(share) @ null
        moves = [(i, r) for i, values in enumerate(options.slots) for r in range(len(values)) if r != pick[i]]
        if not moves:
            break
        # a change's effect on what is left there: share(pick) - share(changed)
        effect = torch.stack([(here - torch.cat(options.share(_changed(pick, i, r), tested)) @ null).flatten() for i, r in moves], 1)
        weight = torch.linalg.lstsq(effect, -(m @ z).flatten()[:, None]).solution.flatten()
        best: dict[int, tuple[float, int]] = {}
        for (i, r), w in zip(moves, weight.tolist()):
            if w > best.get(i, (0.5, 0))[0]:
                best[i] = (w, r)
        if not best:  # no change passes 1/2: the strongest one alone
            q = int(weight.argmax())
            best = {moves[q][0]: (float(weight[q]), moves[q][1])}
        pick = tuple(best[i][1] if i in best else r for i, r in enumerate(pick))
        if pick in seen:
            break
        seen.add(pick)
    return options.share(pick, 0), options.label(pick), None


def _changed(pick: tuple[int, ...], slot: int, to: int) -> tuple[int, ...]:
    return pick[:slot] + (to,) + pick[slot + 1 :]


def _params(task: TextTask, names: list[str]) -> list[torch.nn.Parameter]:
    params = dict(task.parameters())
    return [params[n] for n in names]


def _classification(task: TextTask, observation: Observation, row: Sequence[int], names: list[str], batch: int) -> Choices:
    # classes the batch holds first: each pulls the output bias gradient down by 1/B
    bias = observation.gradients.get(task.classifier_parameter_names()[1] or "")
    order = bias.double().argsort().tolist() if bias is not None else list(range(task.num_classes))
    scale = 1.0 / batch if observation.reduction == "mean" else 1.0
    one = task.with_layout(TextLayout(lengths=[len(row)]))
    dev = next(task.model.parameters()).device
    ids, params = torch.tensor([list(row)], device=dev), _params(task, names)

    @functools.cache
    def full(c: int) -> list[torch.Tensor]:
        loss = one.loss(ids, torch.tensor([c], device=dev), reduction="sum")
        return [scale * g for g in torch.autograd.grad(loss, params)]

    return Choices([order], lambda pick, start: full(order[pick[0]])[start:], lambda pick: order[pick[0]])


def _masked_lm(task: TextTask, observation: Observation, row: Sequence[int], names: list[str], batch: int) -> Choices | None:
    """The masked LM's share is linear in its labels: with p the model's probabilities and J_m the
    Jacobian of position m's logits, it is sum_m J_m^T (p_m - e_{y_m}), over the masked positions.
    Those are the positions whose state lies in the span of the decoder-feeding layer's gradient
    (its rank is the batch's masked count M, the mean's divisor). Each position's labels are
    ranked by the decoder's gradient rows (row v is sum_i (p_iv - y_iv) t_i / M over masked states
    t_i, solved here over this sentence's states alone), among the tokens the decoder bias
    gradient marks as labels, the position's top predictions and its own input token (BERT
    leaves one chosen token in ten unchanged), LABEL_CHOICES per position."""
    assert isinstance(task, MaskedLanguageModeling)
    grads = observation.gradients
    head = task.transform_name()
    weight, bias_name = task.classifier_parameter_names()
    basis = ta.input_span(observation, [f"{head}.weight"])
    count = basis.shape[1]
    scale = 1.0 / count if observation.reduction == "mean" else 1.0
    one = task.with_layout(TextLayout(lengths=[len(row)]))
    dev = next(task.model.parameters()).device
    ids, params = torch.tensor([list(row)], device=dev), _params(task, names)
    decoder = task.model.get_output_embeddings()
    box: dict[str, torch.Tensor] = {}
    hooks = [
        task.model.get_submodule(head).register_forward_pre_hook(lambda _m, a: box.__setitem__("h", a[0].detach())),
        decoder.register_forward_pre_hook(lambda _m, a: box.__setitem__("t", a[0].detach())),
    ]
    try:
        logits = one.encoder_outputs(ids).logits[0]  # [n, V]
    finally:
        for h in hooks:
            h.remove()
    fits = span_residual(box["h"][0], basis.to(box["h"])) < ta.SPAN_TOL
    masked = [j for j in range(len(row)) if bool(fits[j])]
    if not masked:
        return None
    probs = torch.softmax(logits.detach(), -1)
    V = logits.shape[-1]
    bias = grads.get(bias_name or "")
    pool = set((bias[:V] < 0).nonzero().flatten().tolist()) if bias is not None else set(range(V))
    # each position's likeliest labels: the decoder rows' estimate of its one-hot label
    states = box["t"][0, masked].double()
    estimate = probs[masked].double().T - (1.0 / scale) * (grads[weight][:V].double().to(dev) @ torch.linalg.pinv(states))  # [V, m]
    choices: list[list[int]] = []
    special = task.special_ids()  # [MASK] and the like are never labels, and their rows hold input parts
    for i, j in enumerate(masked):
        options = sorted((pool | set(logits[j].detach().topk(5).indices.tolist()) | {row[j]}) - special)
        ranked = sorted(options, key=lambda v: -float(estimate[v, i]))
        choices.append(ranked[:LABEL_CHOICES])
    flat = [(i, v) for i, c in enumerate(choices) for v in c]
    # one gather: a select per label would give each batched backward a [n, V] zero tensor per label
    picked = logits[[masked[i] for i, _ in flat], [v for _, v in flat]]
    # J_m^T p_m for every masked position, and J_m^T e_v for each label tried there
    soft = torch.autograd.grad((probs[masked] * logits[masked]).sum(), params, retain_graph=True)
    hard = torch.autograd.grad(picked, params, grad_outputs=torch.eye(len(flat), dtype=picked.dtype, device=dev), is_grads_batched=True)
    where = {key: k for k, key in enumerate(flat)}

    def share(pick: tuple[int, ...], start: int) -> list[torch.Tensor]:
        keys = torch.tensor([where[(i, choices[i][r])] for i, r in enumerate(pick)], device=dev)
        return [scale * (s - h.index_select(0, keys).sum(0)) for s, h in zip(soft[start:], hard[start:])]

    return Choices(choices, share, lambda pick: tuple((masked[i], choices[i][r]) for i, r in enumerate(pick)))


_CHOICES: list[tuple[type, ChoicesFn]] = [(SequenceClassification, _classification), (MaskedLanguageModeling, _masked_lm)]
